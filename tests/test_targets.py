"""Target specs and flip criteria."""

import json
import shutil

import pytest
import torch
from torch import nn

from zoom.errors import ZoomError
from zoom.targets import BinaryFlip, MulticlassFlip, load_target, make_criterion


def test_multiclass_untargeted_margin_is_positive_until_the_top1_changes():
    c = MulticlassFlip()
    logits = torch.tensor([[3.0, 1.0, 0.0], [0.0, 2.0, 2.5]])
    base = c.decision(logits)
    assert base.tolist() == [0, 2]
    assert c.margin(logits, base).tolist() == pytest.approx([2.0, 0.5])
    moved = torch.tensor([[1.0, 3.0, 0.0], [0.0, 2.0, 2.5]])
    assert (c.margin(moved, base) < 0).tolist() == [True, False]
    assert c.base_prob(logits, base)[0] == pytest.approx(torch.softmax(logits[0], 0)[0].item())


def test_multiclass_targeted_flip_needs_the_target_class_to_win():
    c = make_criterion("multiclass", target_class="cat", labels=["dog", "cat", "car"])
    logits = torch.tensor([[3.0, 1.0, 2.5]])
    base = c.decision(logits)
    assert c.margin(logits, base).item() == pytest.approx(2.0)  # cat must beat dog (3.0)
    # Leaving the base class for another class is not a targeted flip.
    assert c.margin(torch.tensor([[1.0, 1.5, 4.0]]), base).item() > 0
    assert c.margin(torch.tensor([[1.0, 4.5, 4.0]]), base).item() < 0
    assert c.skip_reason(1) and c.skip_reason(0) is None


@pytest.mark.parametrize("logits", [torch.tensor([[1.5], [-0.5]]), torch.tensor([[0.0, 1.5], [0.5, 0.0]])])
def test_binary_flip_on_one_or_two_logits(logits):
    c = BinaryFlip()
    base = c.decision(logits)
    assert base.tolist() == [1, 0]
    assert c.margin(logits, base).tolist() == pytest.approx([1.5, 0.5])
    assert c.base_prob(logits, base).tolist() == pytest.approx([torch.sigmoid(torch.tensor(1.5)).item()] * 1
                                                              + [1 - torch.sigmoid(torch.tensor(-0.5)).item()])


def test_multilabel_audits_one_named_label():
    c = make_criterion("multilabel", label="hat", labels=["glasses", "hat"])
    logits = torch.tensor([[5.0, -1.0]])
    base = c.decision(logits)
    assert base.tolist() == [0] and c.margin(logits, base).item() == pytest.approx(1.0)
    with pytest.raises(ZoomError, match="target.label"):
        make_criterion("multilabel", label="scarf", labels=["glasses", "hat"])
    with pytest.raises(ZoomError, match="needs target.label"):
        make_criterion("multilabel")


def test_python_spec_with_its_own_preprocess_and_torchscript_spec(tmp_path):
    module = tmp_path / "my_model.py"
    module.write_text(
        "import torch\n"
        "def build():\n"
        "    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.LazyLinear(3))\n"
        "    model(torch.zeros(1, 3, 8, 8))\n"
        "    return model, torch.nn.Upsample(size=(8, 8))\n"
    )
    target = load_target(f"python:{module}:build")
    assert target(torch.rand(2, 3, 32, 32)).shape == (2, 3)  # its preprocess resized 32 -> 8 in the graph
    scripted = torch.jit.script(nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 2)))
    scripted.save(str(tmp_path / "m.pt"))
    assert load_target(f"torchscript:{tmp_path / 'm.pt'}")(torch.rand(1, 3, 4, 4)).shape == (1, 2)
    with pytest.raises(ZoomError, match="no callable"):
        load_target(f"python:{module}:missing")


def test_torchvision_specs(tmp_path):
    from safetensors.torch import save_file
    from torchvision.models import resnet18

    model = resnet18(num_classes=5)
    save_file(model.state_dict(), str(tmp_path / "mine.safetensors"))
    target = load_target(f"torchvision:resnet18:{tmp_path / 'mine.safetensors'}")
    assert target(torch.rand(1, 3, 64, 64)).shape == (1, 5)  # classes read from the classifier layer
    assert target.preprocess.crop_size == 224  # ImageNet defaults for a file torchvision did not publish
    with pytest.raises(ZoomError, match="IMAGENET1K_V1"):
        load_target("torchvision:resnet18:IMAGENET9K")
    with pytest.raises(ZoomError, match="no model"):
        load_target("torchvision:resnet9000")
    with pytest.raises(ZoomError, match="does not exist"):
        load_target(f"torchvision:resnet18:{tmp_path / 'missing.pth'}")


def test_sdxl_class_pipelines_are_refused_with_a_clear_error(tiny, tmp_path):
    from zoom.generator import Generator

    xl = tmp_path / "xl"
    shutil.copytree(tiny["sd"], xl)
    index = json.loads((xl / "model_index.json").read_text())
    index["_class_name"] = "StableDiffusionXLPipeline"
    (xl / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ZoomError, match="SDXL"):
        Generator.from_pretrained(str(xl))


REMOTE_CODE = '''import os
from pathlib import Path

from transformers import ResNetConfig, ResNetForImageClassification

Path(os.environ["ZOOM_TEST_REMOTE_CODE_MARKER"]).write_text("remote code ran")


class MarkedConfig(ResNetConfig):
    model_type = "zoom-marked-resnet"


class MarkedResNet(ResNetForImageClassification):
    config_class = MarkedConfig
'''


def test_remote_code_of_an_hf_target_runs_only_with_trust_remote_code(tmp_path, tiny):
    """README: "remote code runs only with --trust-remote-code". A transformers folder whose model is custom
    code (auto_map) that leaves a marker file when imported: without the flag the audit is refused in one
    line before the code runs; with it the code runs and the audit finishes. Each in its own process, with
    transformers' module cache in tmp_path."""
    import os
    import subprocess
    import sys

    folder = tmp_path / "remote-model"
    shutil.copytree(tiny["target"], folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="zoom-marked-resnet", architectures=["MarkedResNet"],
                  auto_map={"AutoConfig": "modeling_marked.MarkedConfig",
                            "AutoModelForImageClassification": "modeling_marked.MarkedResNet"})
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "modeling_marked.py").write_text(REMOTE_CODE)
    marker = tmp_path / "marker"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "HF_MODULES_CACHE": str(tmp_path / "modules"),
           "ZOOM_TEST_REMOTE_CODE_MARKER": str(marker)}

    def audit(out, *flag):
        return subprocess.run([sys.executable, "-m", "zoom", "audit", "--config", "tiny", "--target", f"hf:{folder}",
                               "--samples", "1", "--out", str(tmp_path / out), *flag],
                              env=env, capture_output=True, text=True, timeout=600)

    refused = audit("refused")
    assert refused.returncode == 2, refused.stderr[-2000:]
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("zoom: error: target.spec") and "custom code" in lines[0], lines
    assert not marker.exists() and not (tmp_path / "refused").exists()  # nothing ran, nothing written
    trusted = audit("trusted", "--trust-remote-code")
    assert trusted.returncode == 0, trusted.stderr[-2000:]
    assert marker.read_text() == "remote code ran"
    resolved = (tmp_path / "trusted" / "config.yaml").read_text()
    assert "trust_remote_code: true" in resolved  # the run says it trusted the code
