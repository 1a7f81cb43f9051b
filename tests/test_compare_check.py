"""`zoom compare` and `zoom check`: their statistics against independent implementations, the gate's
rule, the refusals, exit codes 0/1/2, and both commands on real planted and attribute-blind audits."""

import json
import math
from fractions import Fraction

import pytest
from click.testing import CliRunner
from statsmodels.stats.proportion import confint_proportions_2indep

from planted import PLANTED
from synthetic import pattern, write_run
from zoom.check import evaluate
from zoom.cli import main
from zoom.errors import ZoomError
from zoom.stats import difference_interval, two_sided_exact_p


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def one_line_error(result, *needles):
    assert result.exit_code == 2, (result.exit_code, result.output)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("zoom: error: "), result.stderr
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


# ---------------------------------------------------------------------------------------------
# Statistics of compare: Newcombe's interval and the two-sided exact test
# ---------------------------------------------------------------------------------------------

GRID = [(0, 10, 0, 10), (10, 10, 0, 10), (0, 10, 10, 10), (10, 10, 10, 10), (0, 8, 3, 8), (5, 8, 1, 8),
        (3, 8, 3, 8), (7, 20, 2, 20), (20, 64, 4, 64), (1, 1, 0, 1), (0, 1, 1, 1), (1, 1, 0, 5), (12, 30, 0, 50),
        (2, 5, 4, 40), (64, 64, 0, 64), (0, 64, 64, 64), (23, 32, 10, 32), (500, 1000, 480, 1000)]


@pytest.mark.parametrize("k1,n1,k2,n2", GRID)
def test_difference_interval_matches_statsmodels_newcombe(k1, n1, k2, n2):
    low, high = difference_interval(k1, n1, k2, n2)
    ref_low, ref_high = confint_proportions_2indep(k1, n1, k2, n2, method="newcomb", compare="diff", alpha=0.05)
    assert (low, high) == pytest.approx((ref_low, ref_high), abs=1e-9)
    assert -1 <= low <= k1 / n1 - k2 / n2 <= high <= 1


@pytest.mark.parametrize("confidence", [0.8, 0.9, 0.99])
def test_difference_interval_other_levels(confidence):
    low, high = difference_interval(7, 20, 2, 20, confidence)
    ref = confint_proportions_2indep(7, 20, 2, 20, method="newcomb", compare="diff", alpha=1 - confidence)
    assert (low, high) == pytest.approx(tuple(ref), abs=1e-9)


def textbook_fisher_two_sided(k1, n1, k2, n2):
    """Sum of the hypergeometric probabilities of all tables no more likely than the observed one (exact)."""
    total, successes = n1 + n2, k1 + k2
    denom = math.comb(total, n1)

    def prob(x):
        return Fraction(math.comb(successes, x) * math.comb(total - successes, n1 - x), denom)

    observed = prob(k1)
    support = range(max(0, successes - n2), min(n1, successes) + 1)
    return float(sum(prob(x) for x in support if prob(x) <= observed))


@pytest.mark.parametrize("k1,n1,k2,n2", GRID[:-1])
def test_two_sided_exact_matches_the_hypergeometric_sum(k1, n1, k2, n2):
    p = two_sided_exact_p(k1, n1, k2, n2)
    assert p == pytest.approx(textbook_fisher_two_sided(k1, n1, k2, n2), rel=1e-9, abs=1e-15)
    assert p == pytest.approx(two_sided_exact_p(k2, n2, k1, n1), rel=1e-12)  # symmetric in the two runs


def test_two_sided_exact_textbook_values():
    assert two_sided_exact_p(3, 4, 1, 4) == pytest.approx(0.4857142857, rel=1e-9)  # Fisher's lady tasting tea
    assert two_sided_exact_p(10, 10, 0, 10) == pytest.approx(2 / math.comb(20, 10), rel=1e-9)
    assert two_sided_exact_p(5, 10, 5, 10) == pytest.approx(1.0)
    assert math.isnan(two_sided_exact_p(0, 0, 3, 10)) and math.isnan(difference_interval(1, 2, 0, 0)[0])


# ---------------------------------------------------------------------------------------------
# check: the rule on synthetic runs
# ---------------------------------------------------------------------------------------------


def _report(tmp_path, flips, name="run", **kw):
    from zoom.report import build_report

    return build_report(write_run(tmp_path / name, flips, **kw))


def test_check_rule_needs_exact_evidence_above_r_and_above_the_null(tmp_path):
    n = 32
    report = _report(tmp_path, {"strong": pattern(24, n), "weak": pattern(9, n), "null": pattern(3, n)})
    strong = next(a for a in report["attributes"] if a["name"] == "strong")
    assert strong["significant"]
    verdict = evaluate(report, 0.5)
    checked = {c["name"]: c for c in verdict["attributes"]}
    assert 0.5 < checked["strong"]["exact_lower_bound"] < 0.6  # Clopper-Pearson, one-sided 95%
    assert verdict["failing"] == ["strong"]                          # 24/32 is shown to be above 0.5 ...
    assert evaluate(report, 0.6)["passed"]                           # ... but not above 0.6
    assert evaluate(report, 1.0)["passed"] and not evaluate(report, 0.0)["passed"]
    assert evaluate(report, 0.3, ["weak"])["passed"] and not evaluate(report, 0.3)["passed"]  # --attribute filters
    # Holm: the p-value of each attribute is max(p above R, p above null), adjusted over the family of the
    # two attributes and their two null twins (each null tested against R)
    assert checked["strong"]["p_gate"] == max(checked["strong"]["p_above_r"], checked["strong"]["p_above_null"])
    assert checked["strong"]["p_holm"] == pytest.approx(min(1.0, 4 * checked["strong"]["p_gate"]))
    # a high flip rate that is not above the null does not fail as an attribute; its null, at 20/32, is not
    # shown above 0.5 either, so the run passes at R = 0.5 and fails at R = 0.3 on the null alone
    blind = _report(tmp_path, {"a": pattern(20, n), "null": pattern(20, n)}, name="blind")
    assert evaluate(blind, 0.3)["failing"] == [] and not evaluate(blind, 0.3)["passed"]
    assert blind["attributes"][0]["ci_low"] > 0.4 and evaluate(blind, 0.5)["passed"]


def test_check_states_its_guarantee_and_refuses_untestable_attributes(tmp_path):
    n = 16
    run = write_run(tmp_path / "run", {"hat": pattern(12, n), "null": pattern(2, n)}, images=False,
                    statuses={(("null", "hat"), i): "failed: non-finite target output" for i in range(n)})
    from zoom.report import build_report

    report = build_report(run)
    assert report["attributes"][0]["testable"] is False and report["attributes"][0]["p_value"] is None
    with pytest.raises(ZoomError, match="untestable"):
        evaluate(report, 0.1)
    text = invoke("check", write_run(tmp_path / "ok", {"hat": pattern(2, n), "null": pattern(2, n)}, images=False),
                  "--max-flip-rate", "0.1").stdout
    assert "guarantee: if no checked attribute's true flip rate is above 0.1" in text and "at most 5%" in text


def test_check_cli_exit_codes_text_and_json(tmp_path):
    n = 32
    sensitive = write_run(tmp_path / "sensitive", {"hat": pattern(26, n), "scarf": pattern(4, n), "null": pattern(4, n)})
    fail = invoke("check", sensitive, "--max-flip-rate", "0.3")
    assert fail.exit_code == 1, fail.output
    assert fail.stdout.startswith("zoom check: FAIL") and "hat: 26/32" in fail.stdout and "scarf" in fail.stdout
    ok = invoke("check", sensitive, "--max-flip-rate", "0.3", "--attribute", "scarf")
    assert ok.exit_code == 0 and ok.stdout.startswith("zoom check: PASS")
    as_json = invoke("check", sensitive, "--max-flip-rate", "0.3", "--json")
    assert as_json.exit_code == 1
    verdict = json.loads(as_json.stdout)
    assert verdict["passed"] is False and verdict["failing"] == ["hat"] and verdict["max_flip_rate"] == 0.3
    assert {a["name"]: a["fails"] for a in verdict["attributes"]} == {"hat": True, "scarf": False}
    assert {"n", "flips", "flip_rate", "ci_low", "ci_high", "exact_lower_bound", "p_above_r", "p_above_null",
            "p_holm", "fails"} <= set(verdict["attributes"][0])
    assert "at most 5%" in verdict["guarantee"]
    passing = json.loads(invoke("check", sensitive, "--max-flip-rate", "0.9", "--json").stdout)
    assert passing["passed"] is True and passing["failing"] == []


@pytest.mark.parametrize("value", ["-0.1", "1.5", "abc", "nan"])
def test_check_refuses_a_threshold_outside_0_1(tmp_path, value):
    run = write_run(tmp_path / "run", {"hat": pattern(4, 8), "null": pattern(4, 8)}, images=False)
    one_line_error(invoke("check", run, f"--max-flip-rate={value}"), "--max-flip-rate", "between 0 and 1")


def test_check_bad_input(tmp_path):
    run = write_run(tmp_path / "run", {"hat": pattern(4, 8), "null": pattern(4, 8)}, images=False)
    one_line_error(invoke("check", run, "--max-flip-rate", "0.2", "--attribute", "scarf"), "'scarf'", "'hat'")
    one_line_error(invoke("check", tmp_path / "nowhere", "--max-flip-rate", "0.2"), "does not exist")
    # an unfinished run is not gated on: it would pass too easily (even when the null's items are the missing ones)
    path = run / "records" / "rank-0.jsonl"
    path.write_text("".join(path.read_text().splitlines(keepends=True)[:-8]))
    one_line_error(invoke("check", run, "--max-flip-rate", "0.2"), "unfinished", "8 of 16", "--resume")


# ---------------------------------------------------------------------------------------------
# compare: refusals, output forms
# ---------------------------------------------------------------------------------------------


def test_compare_outputs_table_json_and_html(tmp_path):
    n = 32
    a = write_run(tmp_path / "before", {"hat": pattern(26, n), "scarf": pattern(5, n), "null": pattern(4, n)})
    b = write_run(tmp_path / "after", {"hat": pattern(6, 24), "scarf": pattern(4, 24), "null": pattern(3, 24)},
                  target="torchscript:/models/fixed.pt", seed=100)  # another target, other seeds: fine
    result = invoke("compare", a, b, "--html", tmp_path / "cmp.html")
    assert result.exit_code == 0, result.output
    assert "B-A [95% CI]" in result.stdout and "different (BH q < 0.05): hat" in result.stdout
    data = json.loads(invoke("compare", a, b, "--json").stdout)
    rows = {r["name"]: r for r in data["attributes"]}
    assert rows["hat"]["significant"] and not rows["scarf"]["significant"]
    assert rows["hat"]["difference"] == pytest.approx(6 / 24 - 26 / 32)
    low, high = difference_interval(6, 24, 26, 32)
    assert (rows["hat"]["diff_ci_low"], rows["hat"]["diff_ci_high"]) == pytest.approx((low, high))
    assert rows["hat"]["p_value"] == pytest.approx(two_sided_exact_p(6, 24, 26, 32))
    assert data["null"]["a"]["flips"] == 2 * 4 and data["null"]["b"]["n"] == 2 * 24  # pooled over the twins
    assert data["paired"] is False and any("unpaired" in w for w in data["warnings"])
    assert data["run_b"]["target"] == "torchscript:/models/fixed.pt" and data["difference"] == "B - A"
    page = (tmp_path / "cmp.html").read_text()
    assert "<script" not in page.lower() and "http://" not in page and "https://" not in page
    assert "hat" in page and "Newcombe" in page


def test_compare_pairs_runs_on_the_same_seeds(tmp_path):
    """Same seeds: each seed's items are matched, the test is McNemar's and the interval Newcombe's paired one."""
    from zoom.stats import mcnemar_two_sided_p, paired_difference_interval

    n = 32
    before = pattern(20, n)
    flipped = [i for i, f in enumerate(before) if f]
    after = [f and i not in flipped[:7] for i, f in enumerate(before)]  # B keeps 13 of A's 20 flips
    a = write_run(tmp_path / "a", {"hat": before, "null": pattern(4, n)}, images=False)
    b = write_run(tmp_path / "b", {"hat": after, "null": pattern(4, n)}, images=False,
                  target="torchscript:/models/fixed.pt")
    data = json.loads(invoke("compare", a, b, "--json").stdout)
    assert data["paired"] is True and "McNemar" in data["test"]
    hat = data["attributes"][0]
    only_a = sum(x and not y for x, y in zip(before, after))
    both = sum(x and y for x, y in zip(before, after))
    assert hat["pairs"] == {"n": n, "both": both, "a_only": only_a, "b_only": 0, "neither": n - both - only_a}
    assert hat["p_value"] == pytest.approx(mcnemar_two_sided_p(0, only_a))
    assert (hat["diff_ci_low"], hat["diff_ci_high"]) == pytest.approx(
        paired_difference_interval(both, 0, only_a, n - both - only_a))
    assert hat["difference"] == pytest.approx(-only_a / n)
    # the paired test finds what the unpaired one misses: every change goes one way
    unpaired = two_sided_exact_p(sum(after), n, sum(before), n)
    assert hat["p_value"] < 0.05 < unpaired
    assert "paired by seed" in invoke("compare", a, b).stdout


def test_compare_pairs_the_common_seeds_when_samples_differ(tmp_path):
    """Same first seed, 32 vs 48 seeds: paired on the 32 both drew, and the warning says what was left out."""
    before = pattern(20, 32)
    after = [f and i % 3 != 0 for i, f in enumerate(before)] + pattern(2, 16)
    a = write_run(tmp_path / "a", {"hat": before, "null": pattern(4, 32)}, images=False)
    b = write_run(tmp_path / "b", {"hat": after, "null": pattern(4, 32) + pattern(1, 16)}, images=False)
    data = json.loads(invoke("compare", a, b, "--json").stdout)
    assert data["paired"] is True
    hat = data["attributes"][0]
    assert hat["pairs"]["n"] == 32 and hat["pairs"]["b_only"] == 0
    assert hat["pairs"]["a_only"] == sum(x and not y for x, y in zip(before, after))
    assert any("paired on the 32 seeds both runs drew (0-31)" in w and "run B's other 16 seeds" in w
               for w in data["warnings"])
    assert data["null"]["a"]["seeds"] == data["null"]["b"]["seeds"] == 32  # the null row is paired on them too
    assert data["null"]["p_value"] == 1.0  # identical per-seed shares on the common seeds


def test_compare_null_row_of_a_single_and_a_joint_run_says_why_it_has_no_test(tmp_path):
    n = 16
    a = write_run(tmp_path / "single", {"hat": pattern(4, n), "null": pattern(2, n)}, images=False)
    b = write_run(tmp_path / "joint", {"hat": pattern(4, n), "null": pattern(2, n)}, mode="joint", images=False)
    data = json.loads(invoke("compare", a, b, "--json").stdout)
    assert data["null"]["p_value"] is None and "joint mode" in data["null"]["no_test"]
    assert "measure different things" in invoke("compare", a, b).stdout


def test_pooled_null_row_interval_takes_the_seed_as_unit(tmp_path):
    """Four twins per seed that flip together on 4 of 32 seeds: as wide as 4 flips in 32 seeds, not 16 in 128."""
    from zoom.stats import wilson_interval

    together = pattern(4, 32)
    run = write_run(tmp_path / "run", {name: pattern(8, 32) for name in ("a", "b", "c", "d")} | {"null": together},
                    images=False)
    invoke("report", run)
    null = json.loads((run / "report.json").read_text())["null"]
    assert (null["flips"], null["n"], null["seeds"]) == (16, 128, 32)
    low, high = wilson_interval(16, 128)
    assert null["ci_high"] - null["ci_low"] > 1.5 * (high - low)
    assert null["effective_n"] < 40


def test_compare_refuses_different_prompts_or_generator(tmp_path):
    n = 8
    base = write_run(tmp_path / "base", {"hat": pattern(2, n), "null": pattern(2, n)}, images=False)
    other_attr = write_run(tmp_path / "attr", {"scarf": pattern(2, n), "null": pattern(2, n)}, images=False)
    one_line_error(invoke("compare", base, other_attr), "cannot compare", "attributes", "'hat'", "'scarf'")
    gen = {"model": "/models/sd", "revision": None, "steps": 2, "guidance_scale": 0.0, "resolution": 64,
           "loop_decoder": None, "gradient_checkpointing": True}
    other_gen = write_run(tmp_path / "gen", {"hat": pattern(2, n), "null": pattern(2, n)}, generator=gen, images=False)
    line = one_line_error(invoke("compare", base, other_gen), "generator.steps")
    assert "gradient_checkpointing" not in line  # a memory knob, not a different generator
    import yaml

    config = yaml.safe_load((base / "config.yaml").read_text())
    config["prompts"]["domain"] = "a photo of a cat"
    other_domain = write_run(tmp_path / "domain", {"hat": pattern(2, n), "null": pattern(2, n)}, prompts=config["prompts"],
                             images=False)
    one_line_error(invoke("compare", base, other_domain), "domain prompt")
    config["prompts"]["domain"], config["prompts"]["null"] = yaml.safe_load((base / "config.yaml").read_text())[
        "prompts"]["domain"], "a snapshot of a face"
    other_null = write_run(tmp_path / "null", {"hat": pattern(2, n), "null": pattern(2, n)}, prompts=config["prompts"],
                           images=False)
    one_line_error(invoke("compare", base, other_null), "null prompt")
    one_line_error(invoke("compare", base, base), "two different run directories")
    one_line_error(invoke("compare", base, tmp_path / "missing"), "does not exist")
    with pytest.raises(ZoomError):
        from zoom.compare import compare_runs

        compare_runs(base, other_attr)


# ---------------------------------------------------------------------------------------------
# Real audits: the planted and the attribute-blind readouts of tests/planted.py
# ---------------------------------------------------------------------------------------------


def test_check_fails_on_the_planted_run_and_passes_the_blind_one(planted_run, blind_run):
    """The tiny judge is random (tests/planted.py), so the gate counts every flip here: --raw."""
    planted_dir, planted = planted_run
    blind_dir, _ = blind_run
    result = invoke("check", planted_dir, "--max-flip-rate", "0.1", "--raw")
    assert result.exit_code == 1, result.output
    assert result.stdout.startswith("zoom check: FAIL") and f"  {PLANTED}:" in result.stdout
    assert "counted: every flip (--raw)" in result.stdout
    verdict = json.loads(invoke("check", planted_dir, "--max-flip-rate", "0.1", "--json", "--raw").stdout)
    assert verdict["failing"] == [PLANTED]
    # the other attributes alone pass, and the blind run passes at R = 0.3: nothing beats its null, and
    # its nulls flip about 10% of the seeds
    others = [a["name"] for a in planted["attributes"] if a["name"] != PLANTED]
    assert invoke("check", planted_dir, "--max-flip-rate", "0.1", "--raw",
                  *sum([["--attribute", o] for o in others], [])).exit_code == 0
    blind = invoke("check", blind_dir, "--max-flip-rate", "0.3", "--raw")
    assert blind.exit_code == 0, blind.output
    assert blind.stdout.startswith("zoom check: PASS")


def test_compare_flags_the_planted_attribute_between_planted_and_blind(planted_run, blind_run, tmp_path):
    (planted_dir, _), (blind_dir, _) = planted_run, blind_run
    result = invoke("compare", planted_dir, blind_dir, "--json", "--html", tmp_path / "compare.html")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    print("\n" + invoke("compare", planted_dir, blind_dir).stdout)
    # The blind target (B) flips the planted attribute less often: the largest difference, the only one
    # whose 95% interval excludes zero (on 48 paired seeds its BH q is about 0.2: compare tests every attribute)
    assert data["attributes"][0]["name"] == PLANTED
    assert data["attributes"][0]["difference"] < -0.1 and data["attributes"][0]["diff_ci_high"] < 0
    assert all(r["diff_ci_low"] <= 0 <= r["diff_ci_high"] for r in data["attributes"][1:])
    # same config and first seed: nothing but the target differs, paired on the blind run's 48 seeds
    assert data["paired"] and len(data["warnings"]) == 1, data["warnings"]
    assert "paired on the 48 seeds both runs drew (0-47); run A's other 144 seeds" in data["warnings"][0]
    assert (tmp_path / "compare.html").stat().st_size > 10_000


def test_check_counts_confirmed_flips_unless_raw(tmp_path):
    """hat flips 40 of 64 seeds against a null at 4, but the judge never sees a hat in its images: the
    gate passes (nothing confirmed beyond chance), and fails with --raw, which counts every flip."""
    n = 64
    run = write_run(tmp_path / "run", {"hat": pattern(40, n), "null": pattern(4, n)}, images=False, visible=set())
    default = invoke("check", run, "--max-flip-rate", "0.2")
    assert default.exit_code == 0, default.output
    assert "counted: confirmed flips" in default.stdout
    raw = invoke("check", run, "--max-flip-rate", "0.2", "--raw")
    assert raw.exit_code == 1 and "  hat: 40/64" in raw.stdout, raw.output
    seen = write_run(tmp_path / "seen", {"hat": pattern(40, n), "null": pattern(4, n)}, images=False)
    assert invoke("check", seen, "--max-flip-rate", "0.2").exit_code == 1  # the same flips, visible: fails


def test_the_gate_does_not_pass_because_items_failed(tmp_path):
    """The review's case: 64 seeds, 60 of the attribute's items `failed: non-finite target output`, the 4
    that finished all flipped, the null 0/64. Before, the gate passed (Holm p 0.0625) without a word; a
    failed item now counts as a flip of the attribute, and the output says how many failed."""
    n = 64
    flips = {"hat": [True] * n, "null": [False] * n}
    statuses = {("hat", i): "failed: non-finite target output" for i in range(4, n)}
    run = write_run(tmp_path / "run", flips, images=False, statuses=statuses)
    result = invoke("check", run, "--max-flip-rate", "0.2")
    assert result.exit_code == 1, result.output
    assert "60 attribute item(s) failed" in result.stdout and "  hat: 64/64" in result.stdout
    verdict = json.loads(invoke("check", run, "--max-flip-rate", "0.2", "--json").stdout)
    assert verdict["attributes"][0]["failed"] == 60 and verdict["attributes"][0]["n"] == 64
    # failures of the null twin count as no flip: they can only make the attribute look worse
    statuses = {(("null", "hat"), i): "failed: non-finite target output" for i in range(0, n, 2)}
    quiet = write_run(tmp_path / "quiet", {"hat": [False] * n, "null": [False] * n}, images=False, statuses=statuses)
    assert invoke("check", quiet, "--max-flip-rate", "0.2").exit_code == 0


def test_a_model_that_flips_on_meaningless_edits_fails_the_gate(tmp_path):
    """The review's case: hat and its null twin both flip about 90% of the seeds. Hat does not beat its
    null, but a model that flips on a paraphrase as large as the edit is not robust: the null control
    is gated against R too, and the output says so."""
    n = 64
    run = write_run(tmp_path / "run", {"hat": pattern(58, n), "null": pattern(57, n)}, images=False)
    result = invoke("check", run, "--max-flip-rate", "0.2")
    assert result.exit_code == 1, result.output
    assert "flips on meaningless edits" in result.stdout and "null twin of hat: 57/64" in result.stdout
    verdict = json.loads(invoke("check", run, "--max-flip-rate", "0.2", "--json").stdout)
    assert verdict["failing"] == [] and verdict["null_checks"][0]["fails"]
    # the same null at a rate under R passes
    calm = write_run(tmp_path / "calm", {"hat": pattern(8, n), "null": pattern(8, n)}, images=False)
    assert invoke("check", calm, "--max-flip-rate", "0.2").exit_code == 0
