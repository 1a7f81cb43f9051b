"""Audits of the world's segmentation targets (zoom/data/world/tasks): the segmenter trained with
striped shapes annotated as background is found sensitive to "striped", first among the attributes
that keep the scene's ground truth and significant, and `zoom compare` against the unbiased segmenter
on the same seeds names "striped" alone. Through tools/validate_tasks.py's own functions, on the
demo's domain, 16 seeds; ZOOM_WORLD_SEED=100 (or any first seed) reruns them on other seeds (README:
the assertions held at 0, 100 and 200; its table is at 1000, 32 seeds, with the keypoint and
detection targets, whose defects these audits do not find).
"""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1] / "tools"))
from validate_tasks import MODELS, compared, summarise, task_audit  # noqa: E402

SAMPLES = int(os.environ.get("ZOOM_WORLD_SAMPLES", "16"))
SEED = int(os.environ.get("ZOOM_WORLD_SEED", "0"))


def test_the_segmenter_that_misses_stripes_is_found(tmp_path):
    unbiased, biased, planted = MODELS["segmentation"]
    domain = "green-square"
    found = summarise(task_audit(tmp_path, "segmentation", biased, domain, SAMPLES, SEED), "striped",
                      tmp_path / f"{biased}-{domain}")
    task_audit(tmp_path, "segmentation", unbiased, domain, SAMPLES, SEED)
    above = compared(tmp_path, unbiased, biased, domain)
    print(f"\nbiased: {found['attributes']}; biased above unbiased: {above}")
    assert planted[domain] == "striped"
    assert found["first_non_causal"] == "striped" and found["attributes"]["striped"]["significant"], found
    assert above == ["striped"]
