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


def test_a_second_writer_or_zoom_report_on_a_running_audit_is_refused_naming_its_pid(tmp_path, tiny):
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
        report = _zoom("report", str(out))
        assert first.poll() is None, "the first audit must still hold the directory"
    finally:
        first.kill()
        first.communicate(timeout=60)
    for refused in (second, report):  # both name the audit that holds the run
        assert refused.returncode == 2 and "in use by another zoom process" in refused.stderr, refused.stderr
        assert f"(pid {first.pid})" in refused.stderr, refused.stderr
    assert not (out / "report.json").exists()
    assert third.returncode == 2 and "already exists" in third.stderr
    for result in (second, third, report):
        assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert not (out / "records" / "rank-0.jsonl").exists() or not (out / "records" / "rank-0.jsonl").read_text()
    # The lock died with its holder: the run can now be resumed to completion.
    resumed = _zoom("audit", "--config", DEMO, "--samples", "8", "--out", str(out), "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert len(_records(out)) == 8 * 8  # 4 attributes and their null twins


@pytest.mark.parametrize("what", [
    "images-files",
    "images-folder",
])
def test_a_folder_made_read_only_mid_run_ends_in_one_line_and_resume_finishes(tmp_path, tiny, monkeypatch, what):
    """README: a read-only folder ends the run with one line naming the path and what was kept (whole batches
    of records, no temporary file); --resume finishes it later. After the first batch of records is on disk
    the run's images/ folder turns read-only (EACCES as a user gets it; root ignores chmod, so the refusal is
    simulated at the system calls): for the PNGs of its existing folders ("images-files"), and also for
    the new folders of the next arms ("images-folder")."""
    import errno

    from click.testing import CliRunner

    from zoom.cli import main

    out = tmp_path / "run"
    images = str(out / "images") + os.sep
    real_open, real_mkdir, real_fsync, read_only = os.open, os.mkdir, os.fsync, []

    def refuse(path):
        if read_only and os.path.abspath(os.fspath(path)).startswith(images):
            raise PermissionError(errno.EACCES, "Permission denied", os.fspath(path))

    def fsync(fd):  # the first batch of records is on disk: now the folder turns read-only
        real_fsync(fd)
        read_only.append(True)

    def opener(path, flags, *args, **kwargs):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            refuse(path)
        return real_open(path, flags, *args, **kwargs)

    def mkdir(path, *args, **kwargs):
        if what == "images-folder":
            refuse(path)
        return real_mkdir(path, *args, **kwargs)

    args = ["audit", "--config", DEMO, "--samples", "2", "--out", str(out)]
    with monkeypatch.context() as patch:
        patch.setattr(os, "open", opener)
        patch.setattr(os, "mkdir", mkdir)
        patch.setattr(os, "fsync", fsync)
        refused = CliRunner().invoke(main, args)
    assert read_only, "the run never wrote a batch of records"
    assert refused.exit_code == 2, (refused.exit_code, refused.output)
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("zoom: error: ") and "Traceback" not in refused.output, lines
    assert images.rstrip(os.sep) in lines[0] and "Permission denied" in lines[0]  # names the path and why
    assert "kept" in lines[0] and "--resume" in lines[0], lines[0]  # what was kept, and how to go on
    kept = (out / "records" / "rank-0.jsonl").read_text().splitlines()
    assert len(kept) == 2 and all(json.loads(line)["status"] == "ok" for line in kept)  # the whole first batch
    assert not [p for p in out.rglob("*") if ".tmp" in p.name]
    resumed = CliRunner().invoke(main, [*args, "--resume"])
    assert resumed.exit_code == 0, resumed.output
    assert len(_records(out)) == 2 * 8  # 4 attributes and their null twins, 2 seeds


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


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_gradient_search_scales_the_loss_under_fp16_only_and_keeps_its_parameters_fp32(
        tmp_path, demo_config, demo_models, precision):
    """A gradient search (latent edits: every item is searched by Adam) under autocast: with fp16 the loss is
    scaled (torch.amp.GradScaler, enabled, its factor applied before backward) and Adam steps on unscaled
    fp32 gradients; bf16 has fp32's exponent range and needs no scaling. Either way the edit parameters
    and Adam's state stay fp32 and every item finishes."""
    from zoom.runner import run_audit

    scalers, steps = [], []
    real_scaler, real_step = torch.amp.GradScaler, torch.optim.Adam.step

    class Spy(real_scaler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.factors = []
            scalers.append(self)

        def scale(self, outputs):
            scaled = super().scale(outputs)
            self.factors.append(float(scaled.detach()) / float(outputs.detach()))
            return scaled

    def step(self, *args, **kwargs):
        result = real_step(self, *args, **kwargs)
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state.get(p, {})
                steps.append((p.dtype, p.grad.dtype if p.grad is not None else None,
                              state.get("exp_avg", p).dtype, state.get("exp_avg_sq", p).dtype))
        return result

    config = dataclasses.replace(demo_config, precision=precision, search=dataclasses.replace(
        demo_config.search, samples=4, batch_size=4, edit_space="latent", max_steps=8))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.amp, "GradScaler", Spy)
        patch.setattr(torch.optim.Adam, "step", step)
        run_audit(config, tmp_path / "run", models=demo_models, progress=False)
    records = _records(tmp_path / "run").values()
    assert len(records) == 32 and all(r["status"] == "ok" and r["precision"] == precision for r in records)
    assert scalers and all(s.factors for s in scalers)  # one scaler per search, used at every step
    if precision == "fp16":
        assert all(s.is_enabled() and min(s.factors) > 1 for s in scalers)
    else:
        assert not any(s.is_enabled() for s in scalers) and {f for s in scalers for f in s.factors} == {1.0}
    # Adam stepped (GradScaler skips a step whose scaled gradients overflowed), on fp32 everything
    assert steps and set(steps) == {(torch.float32,) * 4}
    print(f"{precision}: {sum(len(s.factors) for s in scalers)} scaled backward passes, "
          f"{len(steps)} Adam parameter updates, final scales {sorted({s.get_scale() for s in scalers})}")


def test_cpu_threads_default_to_one_for_small_models_and_one_per_core_for_big_ones(monkeypatch, demo_config,
                                                                                     demo_models, tmp_path):
    """README (Scale, CPU threads): a UNet under 20 M parameters runs on one thread per process; a bigger one
    gets one thread per core, divided among processes; OMP_NUM_THREADS overrides both; GPUs are left alone.
    Checked on configure_threads itself and on a real audit (which must call it)."""
    from types import SimpleNamespace

    from zoom.models import SMALL_UNET, configure_threads
    from zoom.runner import run_audit

    def generator(parameters):  # a UNet of that size, on the meta device (no memory)
        return SimpleNamespace(unet=torch.nn.Linear(parameters, 1, bias=False, device="meta"))

    cpu, before = torch.device("cpu"), torch.get_num_threads()
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        assert configure_threads(cpu, generator(SMALL_UNET - 1)) == 1 == torch.get_num_threads()
        assert configure_threads(cpu, generator(SMALL_UNET)) == 16 == torch.get_num_threads()
        assert configure_threads(cpu, generator(SMALL_UNET), processes=4) == 4 == torch.get_num_threads()
        assert configure_threads(cpu, generator(SMALL_UNET), processes=32) == 1
        torch.set_num_threads(3)
        assert configure_threads(torch.device("cuda"), generator(SMALL_UNET - 1)) == 3  # a GPU run: untouched
        monkeypatch.setenv("OMP_NUM_THREADS", "3")
        assert configure_threads(cpu, generator(SMALL_UNET - 1)) == 3 == torch.get_num_threads()
        monkeypatch.delenv("OMP_NUM_THREADS")
        torch.set_num_threads(2)  # as torch starts on a 2-core machine
        config = dataclasses.replace(demo_config, search=dataclasses.replace(demo_config.search, samples=1))
        run_audit(config, tmp_path / "run", models=demo_models, progress=False)
        assert torch.get_num_threads() == 1  # the tiny models are small: the audit ran on one thread
    finally:
        torch.set_num_threads(before)


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
    """With `loop_decoder`, the gradient search decodes with TAESD; every saved counterfactual is the full
    VAE's decode of the latents the search ended at (not TAESD's decode of them: the tiny TAESD is random
    and far from the tiny VAE), and its recorded verdict is the target's on that image. Latent edits: the
    gradient search runs for every item (the text bracket uses the full VAE only)."""
    import numpy as np
    from PIL import Image

    from zoom.models import load_models
    from zoom.runner import run_audit
    from zoom.search import Searcher

    generator = dataclasses.replace(demo_config.generator, loop_decoder=str(tiny["taesd"]))
    config = dataclasses.replace(demo_config, generator=generator,
                                 search=dataclasses.replace(demo_config.search, samples=4, batch_size=4,
                                                            edit_space="latent", max_steps=2))
    models = load_models(config, "cpu")
    gen = models.generator
    assert type(gen.loop_decoder).__name__ == "AutoencoderTiny"
    loop_images, ended = [], []  # every TAESD image of the run; (latents, saved image) of items ended in the loop
    real_decode, real_confirm = gen.decode, Searcher._confirm_with_full_vae

    def decode(latents, in_loop=False):
        image = real_decode(latents, in_loop=in_loop)
        if in_loop:
            loop_images.extend(image.detach().float())
        return image

    def confirm(self, outcome, latents, base, idx):
        real_confirm(self, outcome, latents, base, idx)
        ended.extend((latents[i].detach().clone(), outcome.images[i].detach().clone()) for i in idx)

    gen.decode = decode
    Searcher._confirm_with_full_vae = confirm
    try:
        run_audit(config, tmp_path / "run", models=models, progress=False)
    finally:
        del gen.decode
        Searcher._confirm_with_full_vae = real_confirm
    records = list(_records(tmp_path / "run").values())
    assert len(records) == 32 and all(r["status"] == "ok" for r in records)
    saved = {r["key"]: torch.from_numpy(np.array(Image.open(tmp_path / "run" / r["counterfactual_image"])))
             .permute(2, 0, 1).float() / 255 for r in records}
    png = 0.5 / 255 + 1e-6  # PNGs are 8-bit

    assert len(ended) == len(records)  # with latent edits every item ends in the gradient loop
    with torch.no_grad():
        for latents, image in ended:
            full, fast = gen.decode(latents[None])[0], gen.decode(latents[None], in_loop=True)[0]
            assert float((image - full).abs().max()) < 1e-5  # the full VAE's decode of the same latents ...
            assert float((full - fast).abs().max()) > 0.1  # ... which TAESD's decode of them is not
            assert min(float((s - image).abs().max()) for s in saved.values()) <= png  # and that image is saved
    assert loop_images, "the search never decoded with TAESD"
    for key, image in saved.items():  # no saved counterfactual is an image TAESD made in the loop
        assert min(float((image - t).abs().max()) for t in loop_images) > 0.1, key
    with torch.no_grad():  # the recorded verdict is the target's on the saved (full-VAE) image
        verdicts = {k: int(models.criterion.decision(models.target(x[None]))) for k, x in saved.items()}
    agree = sum(verdicts[r["key"]] == r["final_pred"] for r in records)
    assert agree >= 0.9 * len(records)  # (8-bit PNGs: near-ties may go either way)


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


def test_discover_on_two_cpu_processes_gives_the_one_process_discovery(tmp_path):
    """`zoom discover --num-processes 2`: both audits (screen, confirm) sharded as `zoom audit` shards them, the
    same proposals, scores, choice and confirmed table as one process, written once."""
    config = tmp_path / "world.yaml"  # the demo, in blocks of 2 seeds: both processes get screening work
    config.write_text((ROOT / "zoom" / "data" / "configs" / "demo.yaml").read_text().replace(
        "batch_size: 16", "batch_size: 2"))
    vocabulary = tmp_path / "colours.yaml"
    vocabulary.write_text("categories: [{name: colour, words: [green, red, blue]}]\n")
    found = {}
    for k in (1, 2):
        out = tmp_path / f"found-{k}"
        done = _zoom("discover", "--config", str(config), "--vocabulary", str(vocabulary), "--screen-samples", "4",
                     "--samples", "4", "--top-k", "2", "--out", str(out), "--num-processes", str(k))
        assert done.returncode == 0, done.stderr[-3000:]
        assert done.stdout.count("zoom discover:") == 1  # printed by the main process only
        found[k] = json.loads((out / "discover.json").read_text())
        found[k]["cost"] = {stage: {"counterfactuals": c["counterfactuals"], "unet_calls": c["unet_calls"]}
                            for stage, c in found[k]["cost"].items() if c}  # without the wall times
    for rank in (0, 1):  # each process searched its share of the screening seeds
        assert (tmp_path / "found-2" / "screen" / "records" / f"rank-{rank}.jsonl").read_text().strip()
    assert found[1]["confirm"]["chosen"], "nothing confirmed: the test would not cover the confirmation"
    for key in ("proposals", "confirmed", "discovered", "cost"):
        assert found[2][key] == found[1][key], key
    assert found[2]["confirm"]["chosen"] == found[1]["confirm"]["chosen"]
