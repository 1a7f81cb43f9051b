"""Bad input through the CLI: exit code 2, one `zoom: error:` line on stderr, no traceback, no output left."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from zoom.cli import main

ROOT = Path(__file__).parents[1]
DEMO = ROOT / "configs" / "tiny.yaml"


def demo_data() -> dict:
    """configs/tiny.yaml as written (its ${ZOOM_TINY} paths are expanded when the config loads)."""
    return yaml.safe_load(DEMO.read_text(encoding="utf-8"))


def write_config(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def assert_bad_input(result, *, must_mention=()):
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert isinstance(result.exception, SystemExit)
    stderr = result.stderr
    lines = stderr.rstrip("\n").split("\n")
    assert len(lines) == 1, f"expected one stderr line, got: {stderr!r}"
    assert lines[0].startswith("zoom: error:") and lines[0][len("zoom: error:"):].strip(), stderr
    assert "Traceback" not in result.output and "Traceback" not in stderr
    for word in must_mention:
        assert word in lines[0], (word, lines[0])
    return lines[0]


def run_audit_cli(config, out, *extra):
    args = ["audit", "--config", str(config)]
    if out is not None:
        args += ["--out", str(out)]
    return CliRunner().invoke(main, args + list(extra))


def check_no_output(out: Path, workdir: Path):
    assert not out.exists(), f"{out} was left behind: {list(out.rglob('*'))}"
    assert list(workdir.iterdir()) == [], "something was written to the current directory"


# ---------------------------------------------------------------------------------------------
# Config problems (no model is loaded)
# ---------------------------------------------------------------------------------------------


def test_config_file_missing(tmp_path, workdir):
    out = tmp_path / "run"
    result = run_audit_cli(tmp_path / "missing.yaml", out)
    assert_bad_input(result, must_mention=["missing.yaml", "does not exist"])
    check_no_output(out, workdir)


def test_malformed_yaml(tmp_path, workdir):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("generator:\n  model: [unclosed\nsearch: {samples: 3\n", encoding="utf-8")
    out = tmp_path / "run"
    assert_bad_input(run_audit_cli(cfg, out), must_mention=["bad.yaml", "YAML"])
    check_no_output(out, workdir)


def test_unknown_config_key(tmp_path, tiny, workdir):
    data = demo_data()
    data["search"]["foo"] = 1
    out = tmp_path / "run"
    assert_bad_input(run_audit_cli(write_config(tmp_path / "c.yaml", data), out), must_mention=["search.foo"])
    check_no_output(out, workdir)


def test_unknown_target_spec(tmp_path, tiny, workdir):
    data = demo_data()
    data["target"] = {"spec": "keras:foo"}
    out = tmp_path / "run"
    assert_bad_input(run_audit_cli(write_config(tmp_path / "c.yaml", data), out), must_mention=["keras:foo"])
    check_no_output(out, workdir)


def test_unknown_target_spec_from_option(tmp_path, tiny, workdir):
    out = tmp_path / "run"
    assert_bad_input(run_audit_cli(DEMO, out, "--target", "keras:foo"), must_mention=["keras:foo"])
    check_no_output(out, workdir)


def test_empty_attribute_list(tmp_path, tiny, workdir):
    prompts = tmp_path / "empty.yaml"
    prompts.write_text('domain: "a photo of a face"\nattributes: []\n', encoding="utf-8")
    data = demo_data()
    data["prompts"] = str(prompts)
    out = tmp_path / "run"
    assert_bad_input(run_audit_cli(write_config(tmp_path / "c.yaml", data), out),
                     must_mention=["empty.yaml", "attributes"])
    check_no_output(out, workdir)


def test_duplicated_attribute_names(tmp_path, tiny, workdir):
    prompts = tmp_path / "dup.yaml"
    prompts.write_text('domain: "a photo of a face"\nattributes:\n'
                       '  - {name: smile, prompt: "a photo of a smiling face"}\n'
                       '  - {name: Smile, prompt: "a photo of a grinning face"}\n', encoding="utf-8")
    data = demo_data()
    data["prompts"] = str(prompts)
    out = tmp_path / "run"
    assert_bad_input(run_audit_cli(write_config(tmp_path / "c.yaml", data), out), must_mention=["Smile"])
    check_no_output(out, workdir)


@pytest.mark.parametrize("samples", ["0", "-3"])
def test_bad_samples(tmp_path, tiny, workdir, samples):
    out = tmp_path / "run"
    assert_bad_input(run_audit_cli(DEMO, out, "--samples", samples), must_mention=["search.samples"])
    check_no_output(out, workdir)


def test_resume_without_out(tmp_path, tiny, workdir):
    assert_bad_input(run_audit_cli(DEMO, None, "--resume"), must_mention=["--resume", "--out"])
    assert list(workdir.iterdir()) == []


def test_out_exists_without_resume(tmp_path, tiny, workdir):
    out = tmp_path / "run"
    out.mkdir()
    (out / "marker.txt").write_text("keep me", encoding="utf-8")
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert_bad_input(run_audit_cli(DEMO, out), must_mention=["already exists", "--resume"])
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before
    assert sorted(p.name for p in out.iterdir()) == ["marker.txt"]
    assert list(workdir.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# A model that cannot be loaded (fails before the run directory is created)
# ---------------------------------------------------------------------------------------------


def test_generator_folder_missing(tmp_path, tiny, workdir):
    data = demo_data()
    data["generator"] = {"model": "./no/such/folder"}
    out = tmp_path / "run"
    assert_bad_input(run_audit_cli(write_config(tmp_path / "c.yaml", data), out),
                     must_mention=["generator.model", "no/such/folder"])
    check_no_output(out, workdir)


# ---------------------------------------------------------------------------------------------
# The real console entry point
# ---------------------------------------------------------------------------------------------


def test_console_script_missing_config(tmp_path):
    missing = tmp_path / "missing.yaml"
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "zoom", "audit", "--config", str(missing),
                           "--out", str(tmp_path / "run")],
                          capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    lines = proc.stderr.rstrip("\n").split("\n")
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("zoom: error:") and "missing.yaml" in lines[0]
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
    assert not (tmp_path / "run").exists()
