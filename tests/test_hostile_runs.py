"""Hostile run directories, part two: every field report, check and compare read is validated (by type,
naming the file, the line and the field), a run folder's special files (named pipes, devices, links out
of the folder, sparse giants) are refused before they are opened, and paths no file system call can
take (a 300-byte name, a loop of links, a dangling link as --out) get one line from every subcommand.

Each refusal is exactly one `zoom: error:` line, exit code 2, no traceback, and nothing half-written (no
report.json/.csv/.html in the run, no compare page). The cases are data, as in test_hostile.py.
"""

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from synthetic import pattern, write_run
from test_hostile import assert_one_line_exit_2, invoke

REPORT_FILES = ("report.json", "report.csv", "report.html")


@contextlib.contextmanager
def deadline(seconds: int = 60):
    """Fail (instead of hanging the suite) if the code under test blocks, e.g. opening a named pipe: the
    alarm interrupts the blocked system call in this, the main, thread."""
    def fire(signum, frame):
        raise TimeoutError(f"blocked for {seconds} s: zoom opened a named pipe or a device")

    previous = signal.signal(signal.SIGALRM, fire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def _run(folder: Path, images: bool = False, **kwargs) -> Path:
    return write_run(folder, {"hat": pattern(3, 8), "null": pattern(2, 8)}, images=images, **kwargs)


# ---------------------------------------------------------------------------------------------
# Damage helpers: each changes one thing in a finished synthetic run


def _record(**changes):
    def damage(run: Path):
        path = run / "records" / "rank-0.jsonl"
        lines = path.read_text().splitlines()
        record = json.loads(lines[0])
        record.update(changes)
        path.write_text("\n".join([json.dumps(record)] + lines[1:]) + "\n")
    return damage


def _config(dotted: str, value):
    def damage(run: Path):
        config = yaml.safe_load((run / "config.yaml").read_text())
        node = config
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
        (run / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return damage


def _config_text(extra: str):
    def damage(run: Path):
        with open(run / "config.yaml", "a") as f:
            f.write(extra)
    return damage


def _run_json(text: str | None = None, **changes):
    def damage(run: Path):
        if text is not None:
            (run / "run.json").write_text(text)
            return
        data = json.loads((run / "run.json").read_text())
        data.update(changes)
        (run / "run.json").write_text(json.dumps(data))
    return damage


def _meta(**changes):
    def damage(run: Path):
        path = run / "records" / "rank-0.meta.json"
        data = json.loads(path.read_text())
        data.update(changes)
        path.write_text(json.dumps(data))
    return damage


def _nested(depth: int):
    value = 1
    for _ in range(depth):
        value = [value]
    return value


REC = ["rank-0.jsonl", "line 1"]
CFG = ["config.yaml", "line "]

# (id, damage, words the error must contain): one per class of unchecked field a reader used to crash on
FIELD_CASES = [
    # records: optional fields, type checked when present
    ("record-reach-text", _record(reach="x"), REC + ["'reach'"]),
    ("record-reach-nan", _record(reach=float("nan")), REC + ["'reach'"]),
    ("record-reach-infinite", _record(reach=float("inf")), REC + ["'reach'"]),
    ("record-strength-low-text", _record(strength_low="x"), REC + ["'strength_low'"]),
    ("record-alpha-text", _record(alpha="x"), REC + ["'alpha'"]),
    ("record-alpha-bool", _record(alpha=True), REC + ["'alpha'"]),
    ("record-delta-rel-list", _record(delta_rel=[1]), REC + ["'delta_rel'"]),
    ("record-validity-score-text", _record(validity_score="high"), REC + ["'validity_score'"]),
    ("record-judge-change-text", _record(judge_change="x"), REC + ["'judge_change'"]),
    ("record-judge-toward-list", _record(judge_change_toward=[1]), REC + ["'judge_change_toward'"]),
    ("record-judge-toward-text-value", _record(judge_change_toward={"p": "x"}), REC + ["'judge_change_toward'"]),
    ("record-curve-number", _record(curve=5), REC + ["'curve'"]),
    ("record-curve-bad-point", _record(curve=[[0.0, "x", 1]]), REC + ["'curve'"]),
    ("record-curve-short-point", _record(curve=[[0.0, 0.5]]), REC + ["'curve'"]),
    ("record-oracle-text", _record(oracle="yes"), REC + ["'oracle'"]),
    ("record-oracle-without-base", _record(oracle=True), REC + ["'oracle_base'"]),
    ("record-oracle-toward-text", _record(oracle_toward={"hat": "yes"}), REC + ["'oracle_toward'"]),
    ("record-share-text", _record(share="x"), REC + ["'share'"]),
    ("record-any-flip-text", _record(any_flip="no"), REC + ["'any_flip'"]),
    ("record-raw-flipped-number", _record(raw_flipped=1), REC + ["'raw_flipped'"]),
    ("record-monotone-text", _record(monotone="x"), REC + ["'monotone'"]),
    ("record-pair-number", _record(pair=5), REC + ["'pair'"]),
    ("record-final-pred-text", _record(final_pred="x"), REC + ["'final_pred'"]),
    ("record-final-label-float", _record(final_label=1.5), REC + ["'final_label'"]),
    ("record-base-image-number", _record(base_image=5), REC + ["'base_image'"]),
    ("record-cf-image-list", _record(counterfactual_image=["a"]), REC + ["'counterfactual_image'"]),
    ("record-mode-number", _record(mode=5), REC + ["'mode'"]),
    ("record-seed-past-64-bits", _record(seed=2 ** 70), REC + ["'seed'"]),
    ("record-nested-too-deep", lambda run: (run / "records" / "rank-0.jsonl").write_text(
        "[" * 100_000 + "]" * 100_000 + "\n"), REC + ["nested too deeply"]),
    # config.yaml: the sections the report reads, by config.py's types, choices and ranges
    ("config-resolution-text", _config("generator.resolution", "big"), CFG + ["generator.resolution"]),
    ("config-steps-text", _config("generator.steps", "one"), CFG + ["generator.steps"]),
    ("config-generator-list", _config("generator", [1]), CFG + ["generator", "a mapping"]),
    ("config-guide-model-number", _config("guide.model", 5), CFG + ["guide.model"]),
    ("config-alpha-max-text", _config("search.alpha_max", "x"), CFG + ["search.alpha_max"]),
    ("config-lr-nan", _config("search.lr", float("nan")), CFG + ["search.lr"]),
    ("config-samples-huge", _config("search.samples", 10 ** 12), CFG + ["search.samples", "between"]),
    ("config-seed-negative", _config("search.seed", -1), CFG + ["search.seed"]),
    ("config-samples-bool", _config("search.samples", True), CFG + ["search.samples"]),
    ("config-mode-unknown", _config("search.mode", "wild"), CFG + ["search.mode", "one of"]),
    ("config-edit-space-number", _config("search.edit_space", 5), CFG + ["search.edit_space"]),
    ("config-spec-number", _config("target.spec", 5), CFG + ["target.spec"]),
    ("config-task-unknown", _config("target.task", "regression"), CFG + ["target.task"]),
    ("config-precision-number", _config("precision", 16), CFG + ["precision"]),
    ("config-domain-number", _config("prompts.domain", 5), CFG + ["prompts.domain"]),
    ("config-null-numbers", _config("prompts.null", [1]), CFG + ["prompts.null"]),
    ("config-description-date", _config_text("description: 2020-01-01\n"), CFG + ["description"]),
    ("config-key-not-text", _config_text("extra:\n  1: one\n"), ["config.yaml", "extra", "not text"]),
    ("config-nested-too-deep", _config("extra", _nested(40)), ["config.yaml", "extra", "nested"]),
    # run.json: everything the report and compare read from it
    ("run-json-models-list", _run_json(models=[1]), ["run.json", "'models'"]),
    ("run-json-model-text", _run_json(models={"target": "x"}), ["run.json", "'models.target'"]),
    ("run-json-sha-number", _run_json(models={"generator": {"files": {"sha256": 5}}}),
     ["run.json", "'models.generator.files.sha256'"]),
    ("run-json-versions-list", _run_json(versions=[1]), ["run.json", "'versions'"]),
    ("run-json-version-number", _run_json(versions={"zoom": 1}), ["run.json", "'versions'"]),
    ("run-json-overridden-number", _run_json(overridden=5), ["run.json", "'overridden'"]),
    ("run-json-overridden-numbers", _run_json(overridden=[1]), ["run.json", "'overridden'"]),
    ("run-json-command-number", _run_json(command=5), ["run.json", "'command'"]),
    ("run-json-start-not-a-time", _run_json(start_time="yesterday"), ["run.json", "'start_time'"]),
    ("run-json-start-without-offset", _run_json(start_time="2026-01-01T00:00:00"), ["run.json", "'start_time'"]),
    ("run-json-processes-text", _run_json(num_processes="2"), ["run.json", "'num_processes'"]),
    ("run-json-random-text", _run_json(random_models="yes"), ["run.json", "'random_models'"]),
    ("run-json-nan", _run_json('{"device": "cpu", "x": NaN}'), ["run.json", "x", "nan"]),
    ("run-json-huge-number", _run_json('{"x": ' + "9" * 5000 + "}"), ["run.json", "4,300 digits"]),
    ("run-json-nested-too-deep", _run_json('{"x": ' + "[" * 100_000 + "]" * 100_000 + "}"),
     ["run.json", "nested too deeply"]),
    ("run-json-nested-deep", _run_json(json.dumps({"x": _nested(40)})), ["run.json", "nested"]),
    # rank meta files
    ("meta-end-time-number", _meta(end_time=5), ["rank-0.meta.json", "'end_time'"]),
    ("meta-end-time-not-a-time", _meta(end_time="soon"), ["rank-0.meta.json", "'end_time'"]),
    ("meta-peak-text", _meta(peak_memory_bytes="big"), ["rank-0.meta.json", "'peak_memory_bytes'"]),
    ("meta-peak-nan", _meta(peak_memory_bytes=float("nan")), ["rank-0.meta.json", "'peak_memory_bytes'"]),
]


def _refused_everywhere(tmp_path: Path, run: Path, words, seconds: int = 60):
    good = _run(tmp_path / "good")
    with deadline(seconds):
        for args in (["report", run], ["check", run, "--max-flip-rate", "0.2"], ["compare", good, run],
                     ["compare", run, good, "--html", tmp_path / "cmp.html"]):
            assert_one_line_exit_2(invoke(*args), *words)
    assert not any((run / f).exists() for f in REPORT_FILES)
    assert not (tmp_path / "cmp.html").exists()


@pytest.mark.parametrize("case", FIELD_CASES, ids=[c[0] for c in FIELD_CASES])
def test_unchecked_fields_are_checked(case, tmp_path):
    name, damage, words = case
    run = _run(tmp_path / "run")
    damage(run)
    _refused_everywhere(tmp_path, run, words)


def test_what_zoom_writes_still_passes(tmp_path):
    """The checks refuse what zoom never writes, not what it does: sweep curves, joint shares, oracles."""
    sweep = write_run(tmp_path / "sweep", {"hat": pattern(3, 8), "null": pattern(2, 8)}, mode="sweep", images=True)
    joint = write_run(tmp_path / "joint", {"hat": pattern(3, 8), "null": pattern(2, 8)}, mode="joint", images=False)
    oracle = _run(tmp_path / "oracle")
    _record(oracle=True, oracle_base=False)(oracle)
    for run in (sweep, joint, oracle):
        result = invoke("report", run)
        assert result.exit_code == 0, result.output
        assert (run / "report.html").exists()


def test_a_rank_without_end_time_or_peak_is_unknown_not_a_crash(tmp_path):
    """A second rank's meta with end_time/peak null (allowed by its schema): the run's end time and peak
    memory are unknown (null), since the largest is not known; report, check and compare all work."""
    run = _run(tmp_path / "run")
    (run / "records" / "rank-1.meta.json").write_text(json.dumps(
        {"rank": 1, "peak_memory_bytes": None, "memory_kind": None, "end_time": None}))
    result = invoke("report", run)
    assert result.exit_code == 0, result.output
    report = json.loads((run / "report.json").read_text())
    assert report["run"]["end_time"] is None and report["cost"]["peak_memory_bytes"] is None
    assert invoke("check", run, "--max-flip-rate", "0.9").exit_code in (0, 1)
    assert invoke("compare", run, _run(tmp_path / "other")).exit_code == 0


def test_rank_end_times_compare_as_times_not_text(tmp_path):
    run = _run(tmp_path / "run")
    (run / "records" / "rank-1.meta.json").write_text(json.dumps(  # 23:30 UTC the day before: earlier
        {"rank": 1, "peak_memory_bytes": 5, "memory_kind": "cpu peak", "end_time": "2026-01-01T01:30:00+02:00"}))
    assert invoke("report", run).exit_code == 0
    report = json.loads((run / "report.json").read_text())
    assert report["run"]["end_time"] == "2026-01-01T00:01:00+00:00"
    assert report["cost"]["peak_memory_bytes"] == 123456789


# ---------------------------------------------------------------------------------------------
# Special files in a run folder: read regular files only, within bounds, never blocking


def _replace(path: Path, make):
    path.unlink()
    make(path)


def _sparse(size: int):
    def make(path: Path):
        with open(path, "wb") as f:
            f.truncate(size)
    return make


SPECIAL_CASES = [
    ("config-fifo", lambda run: _replace(run / "config.yaml", os.mkfifo), ["config.yaml", "named pipe"]),
    ("records-fifo", lambda run: _replace(run / "records" / "rank-0.jsonl", os.mkfifo), ["rank-0.jsonl", "named pipe"]),
    ("run-json-fifo", lambda run: _replace(run / "run.json", os.mkfifo), ["run.json", "named pipe"]),
    ("meta-fifo", lambda run: _replace(run / "records" / "rank-0.meta.json", os.mkfifo),
     ["rank-0.meta.json", "named pipe"]),
    ("records-dev-zero", lambda run: _replace(run / "records" / "rank-0.jsonl", lambda p: os.symlink("/dev/zero", p)),
     ["rank-0.jsonl", "character device"]),
    ("config-dev-zero", lambda run: _replace(run / "config.yaml", lambda p: os.symlink("/dev/zero", p)),
     ["config.yaml", "character device"]),
    ("records-sparse-5-gib", lambda run: _replace(run / "records" / "rank-0.jsonl", _sparse(5 << 30)),
     ["rank-0.jsonl", "5.0 GiB", "more than zoom reads"]),
    ("config-sparse-5-mib", lambda run: _replace(run / "config.yaml", _sparse(5 << 20)),
     ["config.yaml", "more than zoom reads"]),
    ("run-json-sparse-5-mib", lambda run: _replace(run / "run.json", _sparse(5 << 20)),
     ["run.json", "more than zoom reads"]),
    ("records-line-17-mib", lambda run: (run / "records" / "rank-0.jsonl").write_bytes(b" " * (17 << 20)),
     ["rank-0.jsonl", "line 1", "longer than"]),
]


@pytest.mark.parametrize("case", SPECIAL_CASES, ids=[c[0] for c in SPECIAL_CASES])
def test_special_files_in_a_run_are_refused_unopened(case, tmp_path):
    name, damage, words = case
    run = _run(tmp_path / "run")
    damage(run)
    _refused_everywhere(tmp_path, run, words, seconds=30)


def test_a_fifo_config_does_not_block_the_real_command(tmp_path):
    """The same through `python -m zoom` in its own process, with a timeout: a block fails the test."""
    run = _run(tmp_path / "run")
    _replace(run / "config.yaml", os.mkfifo)
    result = subprocess.run([sys.executable, "-m", "zoom", "report", str(run)], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("zoom: error: ") and "named pipe" in lines[0], result.stderr
    assert not any((run / f).exists() for f in REPORT_FILES)


@pytest.mark.parametrize("kind", ["symlink", "fifo"])
def test_a_lock_file_that_is_not_a_file_is_refused_and_nothing_is_written_through_it(kind, tmp_path):
    """`zoom report` writes its pid into RUN_DIR/.lock: a link there must not truncate the file it points at."""
    run = _run(tmp_path / "run")
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    if kind == "symlink":
        os.symlink(victim, run / ".lock")
    else:
        os.mkfifo(run / ".lock")
    with deadline(30):
        assert_one_line_exit_2(invoke("report", run), ".lock", "symbolic link" if kind == "symlink" else "named pipe")
    assert victim.read_text() == "precious\n"
    assert not any((run / f).exists() for f in REPORT_FILES)


def test_a_link_planted_under_the_temporary_name_is_not_written_through(tmp_path):
    run = _run(tmp_path / "run")
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    os.symlink(victim, run / f".report.json.tmp{os.getpid()}")  # the name atomic_write uses in this process
    assert_one_line_exit_2(invoke("report", run), "report.json")
    assert victim.read_text() == "precious\n"
    assert not any((run / f).exists() for f in REPORT_FILES)


# ---------------------------------------------------------------------------------------------
# The gallery: images are regular files inside the run directory, or they are left out (with a warning)

SECRET = "TOP-SECRET-7c1e-not-an-image"


def _report_with_warning(run: Path):
    with deadline(60):
        result = invoke("report", run)
    assert result.exit_code == 0, (result.output, result.exception)
    warnings = [line for line in result.stderr.splitlines() if line.startswith("zoom: warning:")]
    assert len(warnings) == 1 and "left out of report.html" in warnings[0], result.stderr
    return (run / "report.html").read_text(encoding="utf-8"), warnings[0]


def test_gallery_never_follows_a_link_out_of_the_run(tmp_path):
    secret = tmp_path / "secret.png"
    secret.write_text(SECRET)
    run = _run(tmp_path / "run", images=True)
    _replace(run / "images" / "base" / "seed-0.png", lambda p: os.symlink(secret, p))
    _replace(run / "images" / "base" / "seed-1.png", lambda p: os.symlink("/etc/passwd", p))
    _replace(run / "images" / "base" / "seed-2.png", lambda p: os.symlink("seed-3.png", p))  # inside: fine
    html, warning = _report_with_warning(run)
    assert "outside the run directory" in warning and "2 gallery image(s)" in warning
    assert SECRET not in html and "root:" not in html
    assert 'src="images/base/seed-0.png"' not in html and 'src="images/base/seed-1.png"' not in html
    assert 'src="images/base/seed-2.png"' in html and 'src="images/base/seed-4.png"' in html
    assert (run / "report.json").exists()


def test_gallery_refuses_an_images_folder_linked_elsewhere_and_special_files(tmp_path):
    run = _run(tmp_path / "run", images=True)
    os.rename(run / "images", tmp_path / "elsewhere")
    os.symlink(tmp_path / "elsewhere", run / "images")
    html, warning = _report_with_warning(run)
    assert 'src="images/' not in html and "outside the run directory" in warning

    other = _run(tmp_path / "other", images=True)
    _replace(other / "images" / "base" / "seed-1.png", os.mkfifo)
    html, warning = _report_with_warning(other)
    assert "named pipe" in warning and 'src="images/base/seed-1.png"' not in html


def test_read_run_image_reads_inside_only(tmp_path):
    from zoom.rundir import read_run_image

    secret = tmp_path / "secret.png"
    secret.write_text(SECRET)
    run = _run(tmp_path / "run", images=True)
    os.symlink(secret, run / "images" / "out.png")
    refused = []
    assert read_run_image(run, "images/base/seed-0.png")[:8] == b"\x89PNG\r\n\x1a\n"
    assert read_run_image(run, "images/out.png", refused) is None and refused
    for hostile in ("../secret.png", "/etc/passwd", "images/../../secret.png", "images/nothing.png", 5, None):
        assert read_run_image(run, hostile) is None


# ---------------------------------------------------------------------------------------------
# Paths no file system call can take, in every subcommand

LONG = "a" * 300


DEEP = "/".join(["b" * 200] * 21)  # 4,220 bytes: every name fits, the whole path does not

# (id, arguments given (tmp, a run, another run, a link that points at itself), words)
PATH_CASES = [
    ("audit-out", lambda t, run, other, loop: ["audit", "--config", "tiny", "--out", t / LONG], ["--out", "300 bytes"]),
    ("audit-out-below-missing", lambda t, run, other, loop: ["audit", "--config", "tiny", "--out",
                                                             t / "missing" / LONG / "run"], ["--out", "300 bytes"]),
    ("audit-out-too-deep", lambda t, run, other, loop: ["audit", "--config", "tiny", "--out", t / DEEP],
     ["--out", "path is"]),
    ("audit-out-loop", lambda t, run, other, loop: ["audit", "--config", "tiny", "--out", loop / "run"],
     ["--out", "loop"]),
    ("report", lambda t, run, other, loop: ["report", t / LONG], ["run directory", "300 bytes"]),
    ("report-loop", lambda t, run, other, loop: ["report", loop], ["run directory", "loop"]),
    ("check", lambda t, run, other, loop: ["check", t / LONG, "--max-flip-rate", "0.2"], ["run directory", "300 bytes"]),
    ("check-loop", lambda t, run, other, loop: ["check", loop, "--max-flip-rate", "0.2"], ["run directory", "loop"]),
    ("compare-a", lambda t, run, other, loop: ["compare", t / LONG, run], ["run directory", "300 bytes"]),
    ("compare-b", lambda t, run, other, loop: ["compare", run, t / LONG / "x"], ["run directory", "300 bytes"]),
    ("compare-html", lambda t, run, other, loop: ["compare", run, other, "--html", t / (LONG + ".html")],
     ["--html", "305 bytes"]),
]


@pytest.mark.parametrize("case", PATH_CASES, ids=[c[0] for c in PATH_CASES])
def test_paths_no_file_system_takes_get_one_line(case, tmp_path, workdir):
    name, args, words = case
    run, other, loop = _run(tmp_path / "run"), _run(tmp_path / "other"), tmp_path / "loop"
    os.symlink(loop, loop)
    before = sorted(p.name for p in tmp_path.iterdir())
    assert_one_line_exit_2(invoke(*args(tmp_path, run, other, loop)), *words)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing created (no 'missing' folder)
    assert list(workdir.iterdir()) == []
    assert not any((r / f).exists() for r in (run, other) for f in REPORT_FILES)


@pytest.mark.parametrize("resume", [False, True])
def test_a_dangling_link_as_out_is_refused_up_front(resume, tmp_path, workdir):
    link = tmp_path / "link"
    os.symlink(tmp_path / "target-that-does-not-exist", link)
    result = invoke("audit", "--config", "tiny", "--samples", "2", "--out", link, *(["--resume"] * resume))
    assert_one_line_exit_2(result, "--out", "symbolic link", "does not exist")
    assert "another process" not in result.stderr
    assert os.path.islink(link) and not os.path.exists(tmp_path / "target-that-does-not-exist")
