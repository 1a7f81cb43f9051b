"""Scale and crash safety: several processes, kills at awkward moments, concurrent writers,
out-of-memory retries, non-finite outputs, mixed precision, checkpointing, the loop decoder."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).parents[1]
DEMO = str(ROOT / "configs" / "tiny.yaml")


def _records(run_dir) -> dict:
    """key -> record without its wall time, from every rank's file."""
    out = {}
    for path in sorted((Path(run_dir) / "records").glob("rank-*.jsonl")):
        for line in path.read_text().splitlines():
            record = json.loads(line)
            record.pop("seconds")
            assert record["key"] not in out, f"duplicated record {record['key']}"
            out[record["key"]] = record
    return out


def _statistics(run_dir) -> dict:
    report = json.loads((Path(run_dir) / "report.json").read_text())
    return {"attributes": report["attributes"], "null": report["null"]}


def _env(**extra):
    # One thread per process, in every run compared here: CPU kernels reduce in thread-count-dependent
    # order, and accelerate's launcher gives each process one thread.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **extra}
    return env


def _zoom(*args, env=None, timeout=600):
    return subprocess.run([sys.executable, "-m", "zoom", *args], env=env or _env(), capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, tiny):
    """An uninterrupted single-process run of 16 seeds (2 blocks of 8) x 8 arms (4 attributes, 4 null twins)."""
    out = tmp_path_factory.mktemp("ref") / "run"
    done = _zoom("audit", "--config", DEMO, "--samples", "16", "--out", str(out))
    assert done.returncode == 0, done.stderr
    return out


def test_two_cpu_processes_give_the_single_process_records(tmp_path, reference_run):
    out = tmp_path / "two"
    command = ["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "zoom", "audit", "--config", DEMO,
               "--samples", "16", "--out", str(out)]
    launcher = Path(sys.executable).parent / "accelerate"
    done = subprocess.run([str(launcher), *command[1:]], env=_env(ACCELERATE_USE_CPU="1"), capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    per_rank = [len((out / "records" / f"rank-{r}.jsonl").read_text().splitlines()) for r in (0, 1)]
    print(f"items per rank: {per_rank}")
    assert per_rank == [64, 64]  # two blocks of 8 seeds x 8 arms (4 attributes, 4 null twins), one block each
    assert _records(out) == _records(reference_run)
    assert _statistics(out) == _statistics(reference_run)
    assert json.loads((out / "report.json").read_text())["run"]["num_processes"] == 2


def test_a_failure_under_two_processes_is_one_line_from_the_main_process(tmp_path, tiny):
    """A target every process fails to load: one `zoom: error:` line and exit 2, not a traceback per
    process, and no run directory."""
    out = tmp_path / "run"
    done = _zoom("audit", "--config", DEMO, "--samples", "16", "--num-processes", "2", "--out", str(out),
                 "--target", f"torchscript:{tmp_path / 'missing.pt'}")
    assert done.returncode == 2, done.stderr[-2000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("zoom: error: ") and "missing.pt" in lines[0], done.stderr
    assert not out.exists()


def test_lonely_ranks_are_refused(tmp_path, tiny):
    """A launcher says 2 processes but they never joined: each would redo everything. Refuse."""
    from accelerate import PartialState

    from zoom.errors import ZoomError
    from zoom.runner import refuse_lonely_ranks

    os.environ["WORLD_SIZE"] = "2"
    try:
        with pytest.raises(ZoomError, match="ACCELERATE_USE_CPU=1"):
            refuse_lonely_ranks(PartialState())
    finally:
        del os.environ["WORLD_SIZE"]


# A real audit process that SIGKILLs itself at a chosen moment, by wrapping one of zoom's own functions.
KILLER = textwrap.dedent("""
    import importlib, json, os, signal, sys, time
    import zoom.runner as runner
    aggregate = importlib.import_module("zoom.report.aggregate")  # (zoom.report.aggregate is also a function)
    moment, count = sys.argv[1], [0]

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    if moment == "early":  # after the third PNG of the first block
        save_png = runner.save_png
        def wrapped(path, image):
            save_png(path, image)
            count[0] += 1
            if count[0] == 3:
                die()
        runner.save_png = wrapped
    elif moment == "mid-batch":  # halfway through writing the second batch of records: a torn line
        write = runner.RecordWriter.write
        def wrapped(self, records):
            count[0] += 1
            if count[0] == 2:
                line = json.dumps(records[0], sort_keys=True)
                self._file.write(line + "\\n" + line[: len(line) // 2])
                self._file.flush()
                die()
            write(self, records)
        runner.RecordWriter.write = wrapped
    elif moment == "stall":  # hold the run directory for a while after the first image
        save_png = runner.save_png
        def wrapped(path, image):
            save_png(path, image)
            open(str(path.parents[2] / "stalled"), "w").close()
            time.sleep(120)
        runner.save_png = wrapped
    elif moment == "report":  # while report.json is being written
        atomic_write = aggregate.atomic_write
        def wrapped(path, data):
            if path.name == "report.json":
                tmp = path.with_name(".report.json.partial")
                tmp.write_text(data[: len(data) // 2])
                die()
            atomic_write(path, data)
        aggregate.atomic_write = wrapped
    from zoom.cli import main
    main(sys.argv[2:], prog_name="zoom")
""")


@pytest.mark.parametrize("moment", ["early", "mid-batch", "report"])
def test_kill_and_resume_gives_the_uninterrupted_records_and_report(tmp_path, reference_run, moment):
    out = tmp_path / "run"
    killed = subprocess.run([sys.executable, "-c", KILLER, moment, "audit", "--config", DEMO, "--samples", "16",
                             "--out", str(out)], env=_env(), capture_output=True, text=True, timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert not (out / "report.json").exists()
    resumed = _zoom("audit", "--config", DEMO, "--samples", "16", "--out", str(out), "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert _records(out) == _records(reference_run)  # none lost, none duplicated, same values
    assert _statistics(out) == _statistics(reference_run)


def test_a_second_writer_on_the_same_run_directory_is_refused(tmp_path, tiny):
    out = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "-c", KILLER, "stall", "audit", "--config", DEMO, "--samples", "8",
                              "--out", str(out)], env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    try:
        deadline = time.time() + 120
        while not (out / "stalled").exists():  # the first audit holds the lock and is mid-run
            assert first.poll() is None and time.time() < deadline, "the first audit never started"
            time.sleep(0.2)
        second = _zoom("audit", "--config", DEMO, "--samples", "8", "--out", str(out), "--resume")
        third = _zoom("audit", "--config", DEMO, "--samples", "8", "--out", str(out))
        assert first.poll() is None, "the first audit must still hold the directory"
    finally:
        first.kill()
        first.communicate(timeout=60)
    assert second.returncode == 2 and "in use by another zoom process" in second.stderr
    assert third.returncode == 2 and "already exists" in third.stderr
    for result in (second, third):
        assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert not (out / "records" / "rank-0.jsonl").exists() or not (out / "records" / "rank-0.jsonl").read_text()
    # The lock died with its holder: the run can now be resumed to completion.
    resumed = _zoom("audit", "--config", DEMO, "--samples", "8", "--out", str(out), "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert len(_records(out)) == 8 * 8  # 4 attributes and their null twins


def test_out_of_memory_halves_the_batch_and_gives_the_same_records(tmp_path, demo_config, demo_models,
                                                                   monkeypatch):
    from zoom.runner import run_audit
    from zoom.search import Searcher

    config = dataclasses.replace(demo_config, search=dataclasses.replace(demo_config.search, samples=8))
    run_audit(config, tmp_path / "plain", models=demo_models, progress=False)
    real_base, calls = Searcher.base, []

    def base_that_fits_two(self, seeds, domain):
        calls.append(len(seeds))
        if len(seeds) > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_base(self, seeds, domain)

    monkeypatch.setattr(Searcher, "base", base_that_fits_two)
    run_audit(config, tmp_path / "oom", models=demo_models, progress=False)
    assert calls[:3] == [8, 4, 2]
    plain, oom = _records(tmp_path / "plain"), _records(tmp_path / "oom")
    assert plain.keys() == oom.keys()
    # Batches of 2 instead of 8 change float rounding only: the same base images and predictions, and
    # the same flip decisions except where the optimiser's path passes within rounding of a boundary.
    for key in plain:
        assert plain[key]["base_pred"] == oom[key]["base_pred"]
        assert plain[key]["base_prob"] == pytest.approx(oom[key]["base_prob"], abs=1e-5)
    agree = sum(plain[k]["flipped"] == oom[k]["flipped"] for k in plain) / len(plain)
    print(f"flip decisions equal with batch 8 and after OOM halving to 2: {agree:.0%} of {len(plain)}")
    assert agree >= 0.9


class NanForBrightImages(torch.nn.Module):
    """A target whose output is NaN for some images (brighter than a threshold), finite for others."""

    def __init__(self, inner, threshold):
        super().__init__()
        self.inner, self.threshold = inner, threshold

    def forward(self, images):
        logits = self.inner(images)
        bright = images.mean((1, 2, 3)) > self.threshold
        return torch.where(bright[:, None], torch.full_like(logits, float("nan")), logits)


def test_non_finite_outputs_fail_their_items_and_the_run_goes_on(tmp_path, demo_config, demo_models):
    from zoom.models import Models
    from zoom.runner import run_audit
    from zoom.targets import Target

    config = dataclasses.replace(demo_config, search=dataclasses.replace(demo_config.search, samples=8))
    brightness = demo_models.generator.images(list(range(8)), demo_models.generator.embed(
        "a photo of a person's face").expand(8, -1, -1)).mean((1, 2, 3))
    target = Target(NanForBrightImages(demo_models.target, float(brightness.median())))
    models = dataclasses.replace(demo_models, target=target)
    report = run_audit(config, tmp_path / "run", models=models, progress=False)
    records = _records(tmp_path / "run").values()
    failed = [r for r in records if r["status"] != "ok"]
    assert failed and len(failed) < len(records)
    assert all(r["status"] == "failed: non-finite target output" for r in failed)
    assert sum(a["failed"] for a in report["attributes"]) + report["null"]["failed"] == len(failed)
    assert all(a["n"] + a["failed"] == 8 for a in report["attributes"])


def test_fp16_decodes_the_vae_in_fp32_and_bf16_runs_end_to_end(tmp_path, demo_config, demo_models, calibration):
    gen = demo_models.generator
    seen = []
    hook = gen.vae.decoder.conv_out.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    try:
        latents = gen.sample_latents([0, 1], gen.embed("a photo of a person's face").expand(2, -1, -1))
        with torch.autocast("cpu", dtype=torch.float16):
            images = gen.decode(latents)
    finally:
        hook.remove()
    assert seen == [torch.float32] and torch.isfinite(images).all()

    from planted import planted_readout

    from zoom.runner import run_audit
    from zoom.targets import Target, make_criterion

    # The planted model of tests/planted.py: its flips are driven by one attribute, not by noise.
    models = dataclasses.replace(demo_models, target=Target(planted_readout(calibration)),
                                 criterion=make_criterion("multiclass"))
    runs = {}
    for precision in ("fp32", "bf16"):
        config = dataclasses.replace(demo_config, precision=precision,
                                     search=dataclasses.replace(demo_config.search, samples=16))
        run_audit(config, tmp_path / precision, models=models, progress=False)
        runs[precision] = _records(tmp_path / precision)
    assert all(r["precision"] == "bf16" and r["status"] == "ok" for r in runs["bf16"].values())
    agree = sum(runs["fp32"][k]["flipped"] == runs["bf16"][k]["flipped"] for k in runs["fp32"]) / len(runs["fp32"])
    base_agree = sum(runs["fp32"][k]["base_pred"] == runs["bf16"][k]["base_pred"] for k in runs["fp32"]) / len(runs["fp32"])
    print(f"bf16 vs fp32 on CPU: flip decisions agree on {agree:.0%}, base predictions on {base_agree:.0%} "
          f"of {len(runs['fp32'])} items")
    assert agree >= 0.9


def test_gradient_checkpointing_gives_the_same_gradients(tiny):
    from zoom.generator import Generator

    grads = []
    for checkpointing in (False, True):
        gen = Generator.from_pretrained(str(tiny["sd"]), steps=2, gradient_checkpointing=checkpointing)
        cond = gen.embed("a photo of a person's face").expand(2, -1, -1)
        direction = gen.embed("a photo of a smiling person's face") - gen.embed("a photo of a person's face")
        alpha = torch.full((2, 1, 1), 0.5, requires_grad=True)
        gen.images([0, 1], cond + alpha * direction).square().mean().backward()
        grads.append(alpha.grad)
    assert gen.unet.is_gradient_checkpointing
    assert torch.allclose(grads[0], grads[1], rtol=1e-4, atol=1e-7) and grads[0].abs().sum() > 0


def test_loop_decoder_searches_with_taesd_and_judges_with_the_full_vae(tmp_path, tiny, demo_config):
    from zoom.models import load_models
    from zoom.runner import run_audit

    generator = dataclasses.replace(demo_config.generator, loop_decoder=str(tiny["taesd"]))
    config = dataclasses.replace(demo_config, generator=generator,
                                 search=dataclasses.replace(demo_config.search, samples=8))
    models = load_models(config, "cpu")
    assert type(models.generator.loop_decoder).__name__ == "AutoencoderTiny"
    report = run_audit(config, tmp_path / "run", models=models, progress=False)
    records = list(_records(tmp_path / "run").values())
    assert len(records) == 64 and all(r["status"] == "ok" for r in records)
    # Saved counterfactuals come from the full VAE, and their recorded verdict is the target's on them.
    from PIL import Image
    import numpy as np

    agree = 0
    for r in records:
        image = torch.from_numpy(np.array(Image.open(tmp_path / "run" / r["counterfactual_image"]))).permute(2, 0, 1)
        with torch.no_grad():
            logits = models.target(image[None].float() / 255)
        agree += int(models.criterion.decision(logits)) == r["final_pred"]
    assert agree >= 0.9 * len(records)  # (PNGs are 8-bit: near-ties may go either way)
    assert report["attributes"]


def test_bench_tiny_prints_one_json_line_with_every_field(tiny):
    done = subprocess.run([sys.executable, str(ROOT / "tools" / "bench.py"), "--tiny", "--samples", "4"],
                          env=_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    assert len(lines) == 1
    result = json.loads(lines[0])
    for field in ("counterfactuals_per_s", "steps_per_counterfactual", "unet_calls_per_counterfactual",
                  "time_split", "overhead_ratio", "peak_memory_bytes", "device", "precision"):
        assert field in result, field
    assert set(result["time_split"]) == {"generator", "decoder", "guide", "target"}
    assert result["counterfactuals_per_s"] > 0 and result["overhead_ratio"] > 0
