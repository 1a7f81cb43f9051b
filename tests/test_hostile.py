"""A corpus of hostile and careless inputs through every subcommand: each must end in exactly one
`zoom: error:` line on stderr, exit code 2, no traceback, and nothing half-written (no run directory
for a refused audit, no report files in a damaged run, no page for a refused compare).

The corpus is data: CONFIG_CASES change one thing in the tiny test config (tests run offline on the
tiny random models), PROMPT_CASES write a prompt file, RUN_CASES damage a finished synthetic run
directory and run `zoom report`, `zoom check` and `zoom compare` on it.
"""

import json
import os
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from synthetic import pattern, write_run
from zoom.cli import main

ROOT = Path(__file__).parents[1]
TINY = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text(encoding="utf-8"))
BOMB = "".join(f"l{i}: &l{i} [" + ",".join([f"*l{i - 1}" if i else '"lol"'] * 9) + "]\n" for i in range(8))


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_one_line_exit_2(result, *needles):
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert isinstance(result.exception, SystemExit), result.exception
    lines = result.stderr.rstrip("\n").split("\n")
    assert len(lines) == 1 and lines[0].startswith("zoom: error: "), result.stderr
    assert "Traceback" not in result.output
    assert all(c.isprintable() for c in lines[0]), lines[0]  # no raw control characters reach the terminal
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def _set(data: dict, dotted: str, value):
    node = data
    *parents, leaf = dotted.split(".")
    for p in parents:
        node = node.setdefault(p, {})
    node[leaf] = value
    return data


# (id, dotted key, value, words the error must contain)
CONFIG_CASES = [
    ("samples-huge", "search.samples", 10 ** 12, ["search.samples", "between"]),
    ("samples-zero", "search.samples", 0, ["search.samples"]),
    ("samples-text", "search.samples", "ten", ["search.samples", "expected int"]),
    ("samples-bool", "search.samples", True, ["search.samples"]),
    ("seed-past-64-bit", "search.seed", 2 ** 63, ["search.seed"]),
    ("seed-negative", "search.seed", -1, ["search.seed"]),
    ("alpha-nan", "search.alpha_max", float("nan"), ["search.alpha_max", "finite"]),
    ("lambda-inf", "search.lambda_clip", float("inf"), ["search.lambda_clip", "finite"]),
    ("lr-negative", "search.lr", -1.0, ["search.lr"]),
    ("batch-zero", "search.batch_size", 0, ["search.batch_size"]),
    ("steps-negative", "search.max_steps", -3, ["search.max_steps"]),
    ("kappa-negative", "search.kappa", -1.0, ["search.kappa"]),
    ("device-unknown", "device", "tpu", ["device"]),
    ("device-cuda-garbage", "device", "cuda:x", ["device"]),
    ("precision-unknown", "precision", "fp8", ["precision"]),
    ("mode-unknown", "search.mode", "wild", ["search.mode"]),
    ("sweep-in-latent", "search.edit_space", "latent", ["sweep"]),  # with mode sweep, below
    ("spec-unknown-kind", "target.spec", "foo:bar", ["target.spec"]),
    ("spec-missing-file", "target.spec", "torchscript:/nowhere/model.pt", ["does not exist"]),
    ("target-class-negative", "target.target_class", -1, ["target.target_class", ">= 0"]),
    ("task-unknown", "target.task", "regression", ["target.task"]),
    ("resolution-tiny", "generator.resolution", 3, ["generator.resolution"]),
    ("guidance-nan", "generator.guidance_scale", float("nan"), ["generator.guidance_scale"]),
    ("unknown-key", "search.samplez", 3, ["unknown config key", "samplez"]),
    ("section-not-mapping", "search", [1, 2], ["search"]),
    ("oracle-bad-shape", "oracle", {"smile": "hf:/x"}, ["oracle.smile", "spec"]),
    ("description-not-text", "description", ["a", "b"], ["description"]),
    ("prompts-missing-file", "prompts", "/nowhere/prompts.yaml", ["prompts", "neither a file nor a bundled"]),
    ("prompts-unknown-name", "prompts", "facez", ["facez", "zoom prompts"]),
]

# (id, prompt file text or bytes, words)
PROMPT_CASES = [
    ("not-utf8", b"domain: \"caf\xe9\"\nattributes: []\n", ["not UTF-8"]),
    ("alias-bomb", BOMB, ["aliases"]),
    ("a-list", "- a\n- b\n", ["mapping"]),
    ("no-attributes", 'domain: "a face"\n', ["attributes"]),
    ("duplicate-names", 'domain: "a face"\nattributes:\n  - {name: a, prompt: "a b"}\n  - {name: A, prompt: "a c"}\n',
     ["appears twice"]),
    ("prompt-is-domain", 'domain: "a face"\nattributes:\n  - {name: a, prompt: "a  face"}\n', ["domain's own prompt"]),
    ("null-list-with-number", 'domain: "a face"\nattributes:\n  - {name: a, prompt: "a b"}\nnull: ["x", 3]\n', ["null"]),
    ("null-is-domain", 'domain: "a face"\nattributes:\n  - {name: a, prompt: "a b"}\nnull: "a face"\n',
     ["domain prompt itself"]),
    ("reserved-name", 'domain: "a face"\nattributes:\n  - {name: "NULL", prompt: "a b"}\n', ["reserved"]),
    ("invalid-yaml", 'domain: "a face\nattributes: [\n', ["not valid YAML", "line"]),
]


def _audit(tmp_path, config: dict, *extra):
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    out = tmp_path / "run"
    return invoke("audit", "--config", path, "--out", out, *extra), out


@pytest.mark.parametrize("case", CONFIG_CASES, ids=[c[0] for c in CONFIG_CASES])
def test_hostile_config_values(case, tmp_path, workdir):
    name, key, value, words = case
    config = _set(json.loads(json.dumps(TINY)), key, value) if key != "search" else {**TINY, "search": value}
    if name == "sweep-in-latent":
        config["search"]["mode"] = "sweep"
    result, out = _audit(tmp_path, config)
    assert_one_line_exit_2(result, *words)
    assert not out.exists() and list(workdir.iterdir()) == []


@pytest.mark.parametrize("case", PROMPT_CASES, ids=[c[0] for c in PROMPT_CASES])
def test_hostile_prompt_files(case, tmp_path, workdir):
    name, text, words = case
    prompts = tmp_path / "prompts.yaml"
    prompts.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
    result, out = _audit(tmp_path, {**TINY, "prompts": str(prompts)})
    assert_one_line_exit_2(result, *words)
    assert not out.exists()


@pytest.mark.parametrize("case", [
    ("not-utf8", b"search:\n  samples: 4 # caf\xe9\n", ["not UTF-8"]),
    ("alias-bomb", BOMB.encode(), ["aliases"]),
    ("a-list", b"- 1\n- 2\n", ["mapping"]),
    ("empty-file-means-hub-defaults", b"", ["stabilityai/sd-turbo", "HF_HUB_OFFLINE"]),
], ids=lambda c: c[0])
def test_hostile_config_files(case, tmp_path, workdir):
    name, data, words = case
    path = tmp_path / "c.yaml"
    path.write_bytes(data)
    result = invoke("audit", "--config", path, "--out", tmp_path / "run")
    assert_one_line_exit_2(result, *words)
    assert not (tmp_path / "run").exists()


def test_hostile_command_lines(tmp_path, workdir):
    existing = tmp_path / "exists"
    existing.mkdir()
    assert_one_line_exit_2(invoke("audit", "--config", "tiny", "--out", existing), "already exists", "--resume")
    assert_one_line_exit_2(invoke("audit", "--config", "tiny", "--resume"), "--resume needs --out")
    assert_one_line_exit_2(invoke("audit", "--config", "nowhere"), "neither a file nor a bundled config")
    assert_one_line_exit_2(invoke("audit", "--config", "tiny", "--samples", "x"), "--samples")
    assert_one_line_exit_2(invoke("audit"), "--config")
    assert_one_line_exit_2(invoke("report", tmp_path / "missing"), "does not exist")
    assert list(workdir.iterdir()) == []


def test_audit_into_a_folder_that_cannot_be_created(tmp_path, workdir):
    """/proc refuses new folders even to root (a read-only folder would not stop root)."""
    result = invoke("audit", "--config", "tiny", "--samples", "2", "--out", "/proc/zoom-cannot-be-here/run")
    assert_one_line_exit_2(result, "/proc/zoom-cannot-be-here")
    assert not os.path.exists("/proc/zoom-cannot-be-here")


def test_disk_full_mid_run_keeps_finished_work_and_resume_finishes(tmp_path, workdir, monkeypatch):
    """The disk fills while the second batch of records is written: one line naming the file and what was
    kept, no temporary file left, and --resume then finishes the run with every record."""
    import errno

    import zoom.rundir as rundir

    real_fsync, calls = rundir.os.fsync, {"n": 0}

    def fsync(fd):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_fsync(fd)

    out = tmp_path / "run"
    args = ["audit", "--config", "tiny", "--samples", "2", "--out", out]
    monkeypatch.setattr(rundir.os, "fsync", fsync)
    assert_one_line_exit_2(invoke(*args), "No space left on device", "rank-0.jsonl", "--resume")
    monkeypatch.setattr(rundir.os, "fsync", real_fsync)
    kept = (out / "records" / "rank-0.jsonl").read_text().splitlines()
    assert len(kept) == 2  # the first batch (one arm, two seeds) is whole; the second is gone
    assert not [p for p in out.rglob("*") if ".tmp" in p.name]
    resumed = invoke(*args, "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert len((out / "records" / "rank-0.jsonl").read_text().splitlines()) == 2 * 8  # 4 attributes + 4 twins


def test_target_class_beyond_the_classes_is_refused_before_any_work(tmp_path, workdir):
    config = _set(json.loads(json.dumps(TINY)), "target.target_class", 12)
    result, out = _audit(tmp_path, config)
    assert_one_line_exit_2(result, "target.target_class=12", "10 outputs")
    assert not out.exists()


def test_prompt_equal_to_the_domain_after_truncation_is_refused(tmp_path, workdir):
    domain = "a photo of a person's face " + "very " * 80
    prompts = tmp_path / "p.yaml"
    prompts.write_text(yaml.safe_dump({"domain": domain, "attributes": [{"name": "late", "prompt": domain + "smiling"}]}))
    result, out = _audit(tmp_path, {**TINY, "prompts": str(prompts)})
    assert_one_line_exit_2(result, "'late'", "encodes exactly like the domain")
    assert not out.exists()


# ---------------------------------------------------------------------------------------------
# Damaged run directories through report, check and compare


def _damage_records(run: Path, content: bytes):
    (run / "records" / "rank-0.jsonl").write_bytes(content)


RUN_CASES = [
    ("record-empty-object", lambda run: _damage_records(run, b"{}\n"), ["line 1", "missing"]),
    ("record-null", lambda run: _damage_records(run, b"null\n"), ["line 1", "not a record"]),
    ("record-list", lambda run: _damage_records(run, b"[1, 2]\n"), ["line 1", "not a record"]),
    ("record-wrong-type", lambda run: _damage_records(run, _records_with(run, flipped="yes")), ["'flipped'"]),
    ("record-missing-field", lambda run: _damage_records(run, _records_with(run, drop="status")), ["'status'"]),
    ("record-nan", lambda run: _damage_records(run, _records_with(run, seconds=float("nan"))), ["'seconds'"]),
    ("record-not-utf8", lambda run: _damage_records(run, b'{"key": "\xff"}\n'), ["line 1", "UTF-8"]),
    ("record-broken-json", lambda run: _damage_records(run, b'{"key": \n'), ["line 1", "not valid JSON"]),
    ("records-file-is-a-folder", lambda run: ((run / "records" / "rank-0.jsonl").unlink(),
                                              (run / "records" / "rank-0.jsonl").mkdir()), ["is a directory"]),
    ("run-json-is-a-list", lambda run: (run / "run.json").write_text("[1]"), ["run.json", "JSON object"]),
    ("run-json-broken", lambda run: (run / "run.json").write_text("{"), ["run.json", "not valid JSON"]),
    ("meta-is-garbage", lambda run: (run / "records" / "rank-0.meta.json").write_text('"x"'), ["meta", "JSON object"]),
    ("config-is-a-list", lambda run: (run / "config.yaml").write_text("- 1\n"), ["config", "prompts.attributes"]),
    ("config-not-yaml", lambda run: (run / "config.yaml").write_text("a: [\n"), ["config", "not valid YAML"]),
    ("config-not-utf8", lambda run: (run / "config.yaml").write_bytes(b"a: \xff\n"), ["config", "UTF-8"]),
    ("config-missing", lambda run: (run / "config.yaml").unlink(), ["not a zoom run directory"]),
    ("no-records-folder", lambda run: __import__("shutil").rmtree(run / "records"), ["no records/"]),
]


def _records_with(run: Path, drop=None, **changes) -> bytes:
    lines = (run / "records" / "rank-0.jsonl").read_text().splitlines()
    record = json.loads(lines[0])
    record.update(changes)
    if drop:
        record.pop(drop)
    return (json.dumps(record) + "\n" + "\n".join(lines[1:]) + "\n").encode()


@pytest.mark.parametrize("case", RUN_CASES, ids=[c[0] for c in RUN_CASES])
def test_damaged_run_directories(case, tmp_path):
    name, damage, words = case
    good = write_run(tmp_path / "good", {"hat": pattern(3, 8), "null": pattern(2, 8)}, images=False)
    run = write_run(tmp_path / "run", {"hat": pattern(3, 8), "null": pattern(2, 8)}, images=False)
    damage(run)
    for args in (["report", run], ["check", run, "--max-flip-rate", "0.2"], ["compare", good, run],
                 ["compare", run, good, "--html", tmp_path / "cmp.html"]):
        assert_one_line_exit_2(invoke(*args), *words)
    assert not any((run / f).exists() for f in ("report.json", "report.csv", "report.html"))
    assert not (tmp_path / "cmp.html").exists()


def test_hostile_gate_and_compare_arguments(tmp_path):
    run = write_run(tmp_path / "run", {"hat": pattern(3, 8), "null": pattern(2, 8)}, images=False)
    assert_one_line_exit_2(invoke("check", run, "--max-flip-rate", "2"), "between 0 and 1")
    assert_one_line_exit_2(invoke("check", run, "--max-flip-rate", "0.2", "--attribute", "\x1b[31mred"),
                           "is not an attribute")
    assert_one_line_exit_2(invoke("compare", run, run), "two different run directories")
    assert_one_line_exit_2(invoke("compare", run, run.parent / "nowhere"), "does not exist")
    assert_one_line_exit_2(invoke("compare", run, tmp_path / "x", "--html", tmp_path / "no" / "cmp.html"),
                           "folder does not exist")
    other = write_run(tmp_path / "other", {"hat": pattern(4, 8), "null": pattern(2, 8)}, images=False)
    assert_one_line_exit_2(invoke("compare", run, other, "--html", "/proc/zoom-cmp.html"), "/proc/zoom-cmp.html")


def test_idle_processes_are_announced():
    from zoom.runner import idle_processes_warning

    assert idle_processes_warning(blocks=1, batch_size=8, processes=2).count("1 process(es) get no work") == 1
    assert idle_processes_warning(blocks=2, batch_size=8, processes=2) is None


def test_unfinished_run_is_named_as_such_by_check(tmp_path):
    run = write_run(tmp_path / "run", {"hat": pattern(3, 8), "null": pattern(2, 8)}, images=False)
    path = run / "records" / "rank-0.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(line for line in lines if '"attribute": "null"' not in line))  # the nulls never ran
    assert_one_line_exit_2(invoke("check", run, "--max-flip-rate", "0.2"), "unfinished", "8 of 16", "--resume")


def test_a_slow_audit_never_writes_into_a_run_that_appeared_meanwhile(tmp_path):
    """The race the review found: audit A checks --out, loads a slow target; audit B creates the same --out
    and finishes; A must then refuse, not write into B's run."""
    from zoom.errors import ZoomError
    from zoom.rundir import check_out_dir, open_run_dir

    out = tmp_path / "R"
    resolved = {"prompts": {"domain": "d", "attributes": [{"name": "a", "prompt": "a d"}]}, "search": {}}
    check_out_dir(out, resolved, resume=False)  # A: fine, R does not exist yet
    b = write_run(out, {"hat": pattern(2, 8), "null": pattern(1, 8)}, images=False)  # B runs to the end
    before = {p: p.read_bytes() for p in b.rglob("*") if p.is_file()}
    with pytest.raises(ZoomError, match="created by another process meanwhile"):
        open_run_dir(out, resolved, resume=False, run_info={})  # A, once its models are loaded
    assert {p: p.read_bytes() for p in b.rglob("*") if p.is_file()} == before
