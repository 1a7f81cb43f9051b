"""`zoom export` (a Hugging Face `datasets` image folder) and `zoom finetune` (counterfactual training of an
hf: target), on hand-built runs (tests/synthetic.py) and a tiny transformers classifier: fast, offline."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from synthetic import CLASSES, DOMAIN, pattern, write_run
from test_hostile import assert_one_line_exit_2 as assert_bad_input
from test_hostile import invoke


N = 8




def no_leftovers(folder: Path, out: Path):
    assert not out.exists()
    assert not [p.name for p in folder.iterdir() if p.name.startswith(f".{out.name}.")]


def prompts(changes: tuple = ()) -> dict:
    return {"domain": DOMAIN, "null": "a picture of a person's face",
            "attributes": [{"name": n, "prompt": f"{DOMAIN} with {n}", **({"changes_label": True} if n in changes else {})}
                           for n in ("glasses", "hat")]}


def a_run(folder: Path, *, target="torchscript:/models/m.pt", changes=(), flips=None, **kw) -> Path:
    flips = flips or {"glasses": pattern(3, N), "hat": pattern(5, N), "null": pattern(1, N)}
    return write_run(folder, flips, prompts=prompts(changes), target=target, **kw)


def rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------------------------------------
# export


def test_export_writes_an_imagefolder(tmp_path):
    run = a_run(tmp_path / "run")
    out = tmp_path / "data" / "cf"  # folders above it are created, as `zoom audit --out` does
    result = invoke("export", run, "--out", out)
    assert result.exit_code == 0, result.output
    assert f"exported {N} base images and {2 * N} counterfactuals" in result.output
    meta = rows(out)
    assert len(meta) == 3 * N
    assert len({r["file_name"] for r in meta}) == len(meta)
    for r in meta:
        assert (out / r["file_name"]).is_file()
        assert {"label", "label_id", "attribute", "flipped", "strength", "seed", "key", "kind"} <= set(r)
        assert r["label"] == CLASSES[r["label_id"]] == CLASSES[r["seed"] % len(CLASSES)]  # the base's label
    cfs = [r for r in meta if r["kind"] == "counterfactual"]
    assert {r["attribute"] for r in cfs} == {"glasses", "hat"}  # null edits are not exported
    assert sum(r["flipped"] for r in cfs if r["attribute"] == "glasses") == 3
    assert all(r["key"] == f"seed-{r['seed']}/" + r["file_name"].split("/")[-2] for r in cfs)
    records = {json.loads(line)["key"]: json.loads(line)
               for line in (run / "records" / "rank-0.jsonl").read_text().splitlines()}
    assert all(r["strength"] == records[r["key"]]["strength"] for r in cfs)
    assert (out / cfs[0]["file_name"]).read_bytes() == (run / records[cfs[0]["key"]]["counterfactual_image"]).read_bytes()


def test_export_loads_with_datasets(tmp_path):
    import datasets  # a test extra (pyproject)
    out = tmp_path / "cf"
    assert invoke("export", a_run(tmp_path / "run"), "--out", out).exit_code == 0
    ds = datasets.load_dataset("imagefolder", data_dir=str(out), split="train")
    assert len(ds) == 3 * N
    assert {"image", "label", "attribute", "flipped", "strength", "seed", "key"} <= set(ds.column_names)
    first = ds[0]
    assert first["image"].size == (32, 32)
    assert first["label"] in CLASSES


def test_export_filters(tmp_path):
    run = a_run(tmp_path / "run", visible=["hat"])  # the judge sees only hat's edits
    out = tmp_path / "flips"
    assert invoke("export", run, "--out", out, "--flipped-only", "--attribute", "glasses").exit_code == 0
    cfs = [r for r in rows(out) if r["kind"] == "counterfactual"]
    assert len(cfs) == 3 and all(r["flipped"] and r["attribute"] == "glasses" for r in cfs)
    assert len([r for r in rows(out) if r["kind"] == "base"]) == 3  # only the bases of exported items
    records = [json.loads(line) for line in (run / "records" / "rank-0.jsonl").read_text().splitlines()]
    out = tmp_path / "valid"
    assert invoke("export", run, "--out", out, "--valid-only").exit_code == 0
    cfs = [r for r in rows(out) if r["kind"] == "counterfactual"]
    assert len(cfs) == sum(r["validity"] is True for r in records) and all(r["validity"] for r in cfs)
    out = tmp_path / "confirmed"
    assert invoke("export", run, "--out", out, "--confirmed-only").exit_code == 0
    cfs = [r for r in rows(out) if r["kind"] == "counterfactual"]
    assert all(r["confirmed"] and r["flipped"] for r in cfs)
    assert sum(r["attribute"] == "hat" for r in cfs) == 5  # every flip of the edit the judge sees


def test_export_of_an_unfinished_run(tmp_path):
    run = a_run(tmp_path / "run")
    records = run / "records" / "rank-0.jsonl"
    lines = records.read_text().splitlines(keepends=True)
    records.write_text("".join(lines[:-3]))  # killed before its last items
    out = tmp_path / "new" / "cf"
    assert_bad_input(invoke("export", run, "--out", out), "unfinished", "--resume")
    assert not (tmp_path / "new").exists()  # not even the folder above it


def test_empty_export(tmp_path):
    run = a_run(tmp_path / "run", flips={"glasses": [False] * N, "hat": [False] * N, "null": [False] * N})
    out = tmp_path / "cf"
    assert_bad_input(invoke("export", run, "--out", out, "--flipped-only"), "nothing to export", "--flipped-only")
    no_leftovers(tmp_path, out)


@pytest.mark.parametrize("case", ["exists", "attribute", "not-a-run"])
def test_export_bad_input(tmp_path, case):
    run = a_run(tmp_path / "run")
    out = tmp_path / "cf"
    if case == "exists":
        out.mkdir()
        assert_bad_input(invoke("export", run, "--out", out), "already exists")
        assert list(out.iterdir()) == []
        return
    if case == "attribute":
        assert_bad_input(invoke("export", run, "--out", out, "--attribute", "scarf"), "scarf", "glasses")
    else:
        assert_bad_input(invoke("export", tmp_path / "nowhere", "--out", out), "does not exist")
    no_leftovers(tmp_path, out)


# ---------------------------------------------------------------------------------------------
# finetune


@pytest.fixture
def classifier(tmp_path):
    """A tiny transformers ResNet with the synthetic runs' three classes, saved like the world's targets."""
    from transformers import ResNetConfig, ResNetForImageClassification, ViTImageProcessor

    folder = tmp_path / "model"
    config = ResNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic",
                          num_labels=3, id2label=dict(enumerate(CLASSES)), label2id={c: i for i, c in enumerate(CLASSES)})
    torch.manual_seed(0)
    ResNetForImageClassification(config).eval().save_pretrained(folder, safe_serialization=True)
    ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.5] * 3, image_std=[0.5] * 3).save_pretrained(folder)
    return f"hf:{folder}"


def weights(folder) -> dict:
    from safetensors.torch import load_file

    return load_file(str(Path(folder) / "model.safetensors"))


def test_finetune_saves_an_hf_target(tmp_path, classifier):
    from zoom.targets import load_target

    run = a_run(tmp_path / "run", target=classifier)
    out = tmp_path / "fixed"
    result = invoke("finetune", "--target", classifier, "--runs", run, "--out", out, "--steps", 2, "--batch-size", 4,
                    "--checkpoint-every", 1, "--device", "cpu")
    assert result.exit_code == 0, (result.output, result.exception)
    assert f"target spec: hf:{out.resolve()}" in result.output
    assert "step 2/2" in result.stderr  # progress
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "finetune.json"} <= {
        p.name for p in out.iterdir()}
    summary = json.loads((out / "finetune.json").read_text())
    assert summary["bases"] == N and summary["counterfactuals"] == 2 * N and summary["left_out"] == {}
    before, after = weights(classifier[3:]), weights(out)
    assert before.keys() == after.keys()
    assert any(not torch.equal(before[k], after[k]) for k in before)  # it trained
    target = load_target(f"hf:{out}")
    assert target.labels == CLASSES and target(torch.rand(2, 3, 32, 32)).shape == (2, 3)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".fixed.")]  # checkpoints cleaned up


def test_finetune_leaves_out_label_changing_attributes(tmp_path, classifier):
    run = a_run(tmp_path / "run", target=classifier, changes=("hat",))
    out = tmp_path / "fixed"
    result = invoke("finetune", "--target", classifier, "--runs", run, "--out", out, "--steps", 1, "--batch-size", 4)
    assert result.exit_code == 0, (result.output, result.exception)
    assert "left out 'hat': marked changes_label in the prompt file" in result.output
    assert json.loads((out / "finetune.json").read_text())["counterfactuals"] == N
    # only label-changing attributes: nothing to train on
    run = a_run(tmp_path / "run2", target=classifier, changes=("glasses", "hat"))
    out = tmp_path / "fixed2"
    assert_bad_input(invoke("finetune", "--target", classifier, "--runs", run, "--out", out), "nothing to train on",
                     "glasses")
    no_leftovers(tmp_path, out)


def test_finetune_resumes_from_its_checkpoint(tmp_path, classifier):
    from zoom.finetune import finetune

    run = a_run(tmp_path / "run", target=classifier)
    settings = dict(steps=4, batch_size=4, lr=1e-2, checkpoint_every=2, device="cpu")
    finetune(classifier, [run], tmp_path / "whole", **settings)

    class Killed(Exception):
        pass

    def kill(text):
        if text.startswith("step 2/"):
            raise Killed

    with pytest.raises(Killed):
        finetune(classifier, [run], tmp_path / "cut", progress=kill, **settings)
    assert not (tmp_path / "cut").exists() and (tmp_path / ".cut.partial" / "checkpoint").is_dir()
    bad = invoke("finetune", "--target", classifier, "--runs", run, "--out", tmp_path / "cut")
    assert_bad_input(bad, "--resume")
    said = []
    finetune(classifier, [run], tmp_path / "cut", resume=True, progress=said.append, **settings)
    assert said[0] == "resuming at step 2 of 4"
    whole, cut = weights(tmp_path / "whole"), weights(tmp_path / "cut")
    assert all(torch.allclose(whole[k], cut[k], atol=1e-6) for k in whole)
    assert not (tmp_path / ".cut.partial").exists()


def test_finetune_refuses_a_torchscript_target(tmp_path):
    module = torch.jit.freeze(torch.jit.script(torch.nn.Linear(3, 3).eval()))  # a frozen TorchScript model
    path = tmp_path / "m.pt"
    module.save(str(path))
    run = a_run(tmp_path / "run", target=f"torchscript:{path}")
    out = tmp_path / "fixed"
    assert_bad_input(invoke("finetune", "--target", f"torchscript:{path}", "--runs", run, "--out", out),
                     "cannot be fine-tuned", "TorchScript")
    no_leftovers(tmp_path, out)


def test_finetune_bad_runs(tmp_path, classifier):
    run = a_run(tmp_path / "run", target=classifier)
    records = run / "records" / "rank-0.jsonl"
    records.write_text("".join(records.read_text().splitlines(keepends=True)[:-1]))
    out = tmp_path / "fixed"
    assert_bad_input(invoke("finetune", "--target", classifier, "--runs", run, "--out", out), "unfinished")
    no_leftovers(tmp_path, out)
    out.mkdir()
    assert_bad_input(invoke("finetune", "--target", classifier, "--runs", run, "--out", out), "already exists")


def test_changes_label_is_kept_in_the_prompt_set():
    from zoom.errors import ZoomError
    from zoom.prompts import load_prompts

    ps = load_prompts(prompts(("hat",)))
    assert [a.changes_label for a in ps.attributes] == [False, True]
    assert ps.to_dict()["attributes"][1]["changes_label"] is True
    assert "changes_label" not in ps.to_dict()["attributes"][0]
    with pytest.raises(ZoomError, match="changes_label must be true or false"):
        load_prompts({**prompts(), "attributes": [{"name": "x", "prompt": "a face with x", "changes_label": "yes"}]})


def test_finetune_damaged_image(tmp_path, classifier):
    run = a_run(tmp_path / "run", target=classifier)
    (run / "images" / "base" / "seed-0.png").write_bytes(b"not a png")
    out = tmp_path / "fixed"
    assert_bad_input(invoke("finetune", "--target", classifier, "--runs", run, "--out", out), "cannot read image")
    no_leftovers(tmp_path, out)


def test_finetune_on_two_processes_gives_the_one_process_weights(tmp_path, classifier):
    """`--num-processes 2` (accelerate's launcher, two CPU processes, each half of every batch) trains the
    same model as one process: the same batches, gradients averaged across the processes."""
    import os
    import subprocess
    import sys

    run = a_run(tmp_path / "run", target=classifier)
    outs = {}
    for k in (1, 2):
        outs[k] = tmp_path / f"fixed-{k}"
        done = subprocess.run([sys.executable, "-m", "zoom", "finetune", "--target", classifier, "--runs", str(run),
                               "--out", str(outs[k]), "--steps", "2", "--batch-size", "4", "--device", "cpu",
                               "--num-processes", str(k)],
                              env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
    one, two = weights(outs[1]), weights(outs[2])
    assert one.keys() == two.keys()
    assert max(float((one[k].float() - two[k].float()).abs().max()) for k in one) <= 1e-5
    assert any(not torch.equal(one[k], weights(classifier[3:])[k]) for k in one)  # both trained
