"""Hostile sizes and a damaged world: huge values are named, not echoed; files too large to be zoom files
are refused before they are read or parsed; a run of thousands of attributes still gets its report; and a
copy of the shapes world whose files no longer match its MANIFEST.json is refused, naming the file.

Every refusal is the project's one line: `zoom: error: ...` on stderr, exit code 2, nothing written.
"""

import json
import os
import shutil
import time
from pathlib import Path

import pytest
import yaml

from synthetic import write_run
from test_hostile import TINY, assert_one_line_exit_2, invoke

LINE_BOUND = 400  # characters of an error line that names a huge value


def _line(result) -> str:
    return result.stderr.rstrip("\n")


def _audit_with(tmp_path, config: dict, *extra):
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False, width=10 ** 9), encoding="utf-8")
    out = tmp_path / "run"
    return invoke("audit", "--config", path, "--out", out, *extra), out


# ---------------------------------------------------------------------------------------------
# Huge values: named with their size, never echoed whole

HUGE_TEXT = "x" * 3_000_000  # under the 4 MiB file bound, so it reaches the value check
LONG_LIST = list(range(60_000))  # under the 100,000-value bound

VALUE_CASES = [
    ("device-3mb-string", {"device": HUGE_TEXT}, ["device=", "3,000,000 characters"]),
    ("section-60k-list", {"search": LONG_LIST}, ["config section search", "60,000 items"]),
    ("description-60k-list", {"description": LONG_LIST}, ["config key description", "60,000 items"]),
    ("unknown-key-3mb", {"search": {HUGE_TEXT: 1}}, ["unknown config key search.", "3,000,000 characters"]),
    ("oracle-60k-list", {"oracle": {"smile": LONG_LIST}}, ["oracle.smile", "60,000 items"]),
    ("spec-3mb-string", {"target": {"spec": "foo:" + HUGE_TEXT}}, ["target.spec", "characters"]),
]


@pytest.mark.parametrize("case", VALUE_CASES, ids=[c[0] for c in VALUE_CASES])
def test_huge_config_values_are_named_with_their_size_not_echoed(case, tmp_path, workdir):
    name, change, words = case
    config = json.loads(json.dumps(TINY))
    for key, value in change.items():
        config[key] = {**config.get(key, {}), **value} if isinstance(value, dict) and key != "oracle" else value
    result, out = _audit_with(tmp_path, config)
    assert_one_line_exit_2(result, *words)
    assert len(_line(result)) < LINE_BOUND, len(_line(result))
    assert not out.exists()


def test_huge_prompt_values_and_command_line_values_are_bounded(tmp_path, workdir):
    prompts = tmp_path / "prompts.yaml"
    twice = [{"name": "n" * 1_000_000, "prompt": "a b"}, {"name": "N" * 1_000_000, "prompt": "a c"}]
    prompts.write_text(yaml.safe_dump({"domain": "a face", "attributes": twice}, width=10 ** 9), encoding="utf-8")
    result, _ = _audit_with(tmp_path, {**TINY, "prompts": str(prompts)})
    assert_one_line_exit_2(result, "appears twice", "1,000,000 characters")
    assert len(_line(result)) < LINE_BOUND

    cases = [
        (["--target", "foo:" + "y" * 200_000], ["target.spec", "characters"]),
        (["--samples", "9" * 100_000], ["--samples"]),  # click's own message, shortened by the CLI
        (["--prompts", "z" * 100_000], ["prompts", "characters)", "does not exist"]),  # made absolute first
    ]
    for args, words in cases:
        result = invoke("audit", "--config", "tiny", "--out", tmp_path / "r2", *args)
        assert_one_line_exit_2(result, *words)
        assert len(_line(result)) < LINE_BOUND + 300, len(_line(result))  # the CLI's last guard: 600
    result = invoke("audit", "--config", "c" * 100_000 + ".yaml", "--out", tmp_path / "r3")
    assert_one_line_exit_2(result, "does not exist", "characters")
    assert len(_line(result)) < LINE_BOUND
    assert list(workdir.iterdir()) == [] and not (tmp_path / "r2").exists()


def test_numbers_past_python_limits_are_refused_in_one_line(tmp_path, workdir):
    path = tmp_path / "c.yaml"
    path.write_text("search:\n  samples: " + "1" * 5000 + "\n", encoding="utf-8")
    assert_one_line_exit_2(invoke("audit", "--config", path, "--out", tmp_path / "run"), "4,300 digits")
    path.write_text("search:\n  samples: " + "1" * 4000 + "\n", encoding="utf-8")
    result = invoke("audit", "--config", path, "--out", tmp_path / "run")
    assert_one_line_exit_2(result, "search.samples", "digits", "between")
    assert len(_line(result)) < LINE_BOUND


# ---------------------------------------------------------------------------------------------
# Large files: too large is not an alias bomb, and a huge file is refused before it is read


def test_a_plain_200000_item_list_is_too_large_not_an_alias_bomb(tmp_path, workdir):
    prompts = tmp_path / "prompts.yaml"
    prompts.write_text('domain: "a face"\nattributes:\n  - {name: a, prompt: "a b"}\nnull:\n'
                       + "  - p\n" * 200_000, encoding="utf-8")  # 1.2 MB: under the byte bound
    result, out = _audit_with(tmp_path, {**TINY, "prompts": str(prompts)})
    assert_one_line_exit_2(result, "too large", "100,000 YAML values")
    assert "alias" not in _line(result)
    assert not out.exists()
    config = tmp_path / "big.yaml"
    config.write_text("search:\n  samples: 2\nlots:\n" + "- 1\n" * 200_000, encoding="utf-8")
    result = invoke("audit", "--config", config, "--out", tmp_path / "run2")
    assert_one_line_exit_2(result, "config file", "too large")
    assert "alias" not in _line(result)


@pytest.mark.parametrize("kind", ["prompts", "config"])
def test_an_oversized_file_is_refused_before_it_is_read(kind, tmp_path, workdir):
    """A sparse 8 GiB file: reading it, let alone parsing it, would take minutes and gigabytes."""
    path = tmp_path / "huge.yaml"
    with open(path, "wb") as f:
        f.truncate(8 << 30)
    start = time.perf_counter()
    if kind == "prompts":
        result, out = _audit_with(tmp_path, {**TINY, "prompts": str(path)})
    else:
        out = tmp_path / "run"
        result = invoke("audit", "--config", path, "--out", out)
    seconds = time.perf_counter() - start
    assert_one_line_exit_2(result, "too large", "8,192.0 MiB", "up to 4.0 MiB")
    assert seconds < 30, seconds  # in fact well under a second beyond the CLI's start
    assert not out.exists()


def test_files_within_the_bounds_still_load(tmp_path):
    """The bounds leave real files alone: a 5,000-attribute prompt set, and a YAML anchor used a few times."""
    from zoom.files import read_yaml
    from zoom.prompts import load_prompts

    prompts = tmp_path / "prompts.yaml"
    attributes = [{"name": f"attribute {i}", "prompt": f"a face with attribute number {i}"} for i in range(5000)]
    prompts.write_text(yaml.safe_dump({"domain": "a face", "attributes": attributes}), encoding="utf-8")
    assert len(load_prompts(str(prompts)).attributes) == 5000
    anchors = tmp_path / "a.yaml"
    anchors.write_text("base: &b {steps: 1, resolution: 64}\none: *b\ntwo: *b\n", encoding="utf-8")
    assert read_yaml(anchors, "config file")["two"] == {"steps": 1, "resolution": 64}


# ---------------------------------------------------------------------------------------------
# Thousands of attributes: the report is written, its figures show the top ones and say so

ATTRIBUTES = 5000


def test_a_5000_attribute_run_gets_its_report_with_the_top_attributes_plotted(tmp_path):
    import random

    from zoom.report.html import GALLERY_TOP, PLOT_TOP

    rng = random.Random(3)
    flips = {f"attribute {i:04d}": [rng.random() < (0.8 if i % 500 == 0 else 0.1) for _ in range(4)]
             for i in range(ATTRIBUTES)}
    flips["null"] = [False, True, False, False]
    run = write_run(tmp_path / "run", flips, images=False, rng=rng)
    start = time.perf_counter()
    result = invoke("report", run)
    seconds = time.perf_counter() - start
    assert result.exit_code == 0, (result.output, result.exception)
    page = (run / "report.html").read_text(encoding="utf-8")
    assert f"Only the top {PLOT_TOP} of 5,000 attributes are plotted" in page
    assert f"Only the top {GALLERY_TOP} of 5,000 attributes are shown" in page
    assert page.count('<div class="name">attribute ') == ATTRIBUTES  # the summary table keeps every attribute
    report = json.loads((run / "report.json").read_text())
    assert len(report["attributes"]) == ATTRIBUTES
    assert len((run / "report.csv").read_text().splitlines()) == ATTRIBUTES + 2  # header, attributes, null
    print(f"\nzoom report of {ATTRIBUTES:,} attributes x 4 seeds: {seconds:.1f} s")
    assert seconds < 120, seconds


def test_a_small_run_plots_every_attribute_and_says_nothing_about_a_top(tmp_path):
    flips = {"hat": [True, False, True, False], "glasses": [False, False, True, False], "null": [False] * 4}
    run = write_run(tmp_path / "run", flips, images=False)
    assert invoke("report", run).exit_code == 0
    assert "Only the top" not in (run / "report.html").read_text(encoding="utf-8")


# ---------------------------------------------------------------------------------------------
# The world's integrity: its MANIFEST.json sums are checked when an audit loads it

UNET = "sd/unet/diffusion_pytorch_model.safetensors"


@pytest.fixture
def world_copy(tmp_path, monkeypatch):
    """A copy of zoom/data/world that zoom loads (through ${ZOOM_WORLD}), with its own sum cache."""
    from zoom.world import models_dir

    copy = tmp_path / "world"
    shutil.copytree(models_dir(), copy)
    monkeypatch.setenv("ZOOM_WORLD", str(copy))
    monkeypatch.setenv("ZOOM_CACHE", str(tmp_path / "cache"))
    return copy


def _manifest(world: Path) -> dict:
    return json.loads((world / "MANIFEST.json").read_text())


def _flip_one_byte(path: Path, offset: int = -100) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    mtime = path.stat().st_mtime_ns
    path.write_bytes(bytes(data))
    os.utime(path, ns=(mtime, mtime))  # same size, same modification time: only the content differs


def _audit_world(tmp_path):
    out = tmp_path / "run"
    return invoke("audit", "--config", "demo", "--samples", "1", "--out", out), out


def test_an_intact_world_copy_is_checked_once_then_read_from_the_cache(world_copy, monkeypatch):
    from zoom import manifest
    from zoom.config import load_config

    config = load_config("demo")
    assert config.generator.model == str(world_copy / "sd")
    assert manifest.check_models(config) == [world_copy]
    cache = json.loads(manifest.cache_file().read_text())
    listed = _manifest(world_copy)["files"]
    entries = {k: v for k, v in cache["files"].items() if k.startswith(str(world_copy) + os.sep)}
    assert len(entries) == len(listed)
    for name, digest in listed.items():
        assert entries[str(world_copy / name)]["sha256"] == digest

    def no_hashing(path):
        raise AssertionError(f"{path} hashed again: the cache should have answered")

    monkeypatch.setattr(manifest, "_sha256", no_hashing)
    assert manifest.check_models(config) == [world_copy]  # the second check only stats the files


def test_a_world_copy_with_one_edited_weight_byte_is_refused(world_copy, tmp_path):
    from zoom import manifest
    from zoom.config import load_config

    manifest.check_models(load_config("demo"))  # a warm cache must not hide the edit that follows
    _flip_one_byte(world_copy / UNET)
    result, out = _audit_world(tmp_path)
    assert_one_line_exit_2(result, UNET, "MANIFEST.json says", _manifest(world_copy)["files"][UNET][:12])
    assert not out.exists()


def test_a_zeroed_manifest_sum_is_refused(world_copy, tmp_path):
    data = _manifest(world_copy)
    name = "targets/shape-red-circles-p99/model.safetensors"
    assert name in data["files"]
    data["files"][name] = "0" * 64
    (world_copy / "MANIFEST.json").write_text(json.dumps(data))
    result, out = _audit_world(tmp_path)
    assert_one_line_exit_2(result, name, "000000000000…")
    assert not out.exists()


def test_a_missing_world_file_or_a_malformed_manifest_is_refused(world_copy, tmp_path):
    (world_copy / "oracles" / "colour" / "config.json").unlink()
    assert_one_line_exit_2(_audit_world(tmp_path)[0], "oracles/colour/config.json", "missing")
    (world_copy / "MANIFEST.json").write_text('{"files": {"sd/model_index.json": "abc"}}')
    assert_one_line_exit_2(_audit_world(tmp_path)[0], "MANIFEST.json", "malformed", "sha256")
    (world_copy / "MANIFEST.json").write_text("{ not json")
    assert_one_line_exit_2(_audit_world(tmp_path)[0], "MANIFEST.json", "not valid JSON")
    (world_copy / "MANIFEST.json").unlink()
    assert_one_line_exit_2(_audit_world(tmp_path)[0], "has no MANIFEST.json")
    assert not (tmp_path / "run").exists()
