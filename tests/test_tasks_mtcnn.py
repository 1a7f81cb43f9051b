"""Real weights for the detection and keypoint tasks: MTCNN (facenet-pytorch, installed with --no-deps,
its weights inside the package) as `python:` targets (tests/mtcnn_target.py), proven against
facenet-pytorch's own `detect()` on scikit-image's astronaut photo, then through zoom's flip criteria:
hiding the face loses the detection, moving it moves the landmarks past the eye-normalised threshold,
and a small change keeps both."""

from pathlib import Path

import numpy as np
import pytest
import torch
from skimage import data

from zoom.errors import ZoomError
from zoom.targets import load_target, make_criterion
from zoom.tasks import as_output, base_outputs

HERE = Path(__file__).resolve().parent
DETECTOR = f"python:{HERE / 'mtcnn_target.py'}:detector"
LANDMARKS = f"python:{HERE / 'mtcnn_target.py'}:landmarks"


@pytest.fixture(scope="module")
def astronaut():
    return data.astronaut()  # uint8 [512, 512, 3], one face


def as_batch(pixels: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(pixels).permute(2, 0, 1)[None].float() / 255


def test_the_adapter_equals_facenet_pytorchs_own_detect(astronaut):
    from facenet_pytorch import MTCNN

    boxes, probs, points = MTCNN(keep_all=True, device="cpu").detect(astronaut, landmarks=True)
    assert len(boxes) == 1 and probs[0] >= 0.99  # the astronaut's face, found with certainty
    with torch.no_grad():
        dets = as_output(load_target(DETECTOR)(as_batch(astronaut)))
        marks = load_target(LANDMARKS)(as_batch(astronaut))
    assert np.abs(dets.dets[0]["boxes"].numpy() - boxes).max() <= 1e-4
    assert np.abs(dets.dets[0]["scores"].numpy() - probs).max() <= 1e-6
    assert np.abs(marks[0].numpy() - points[0]).max() <= 1e-4


def _flipped(criterion, target, base, edited):
    with torch.no_grad():
        with base_outputs(criterion):
            keys = criterion.decision(as_output(target(base)))
        out = as_output(target(edited))
        margin = criterion.margin(out, keys)
    return bool(margin[0] < 0), float(margin[0])


def test_hiding_the_face_loses_the_detection_and_a_small_change_keeps_it(astronaut):
    target, criterion = load_target(DETECTOR), make_criterion("detection")
    (x0, y0, x1, y1) = [int(v) for v in as_output(target(as_batch(astronaut))).dets[0]["boxes"][0]]
    hidden = astronaut.copy()
    hidden[y0:y1, x0:x1] = 128
    brighter = np.clip(astronaut.astype(int) + 8, 0, 255).astype(np.uint8)
    assert _flipped(criterion, target, as_batch(astronaut), as_batch(hidden))[0]
    kept, margin = _flipped(criterion, target, as_batch(astronaut), as_batch(brighter))
    assert not kept and margin > 0.4  # still found, with a score near 1


def test_moving_the_face_moves_the_landmarks_past_the_eye_normalised_threshold(astronaut):
    target = load_target(LANDMARKS)
    criterion = make_criterion("keypoints", keypoint_norm="left_eye,right_eye",
                               keypoint_names=target.keypoint_names if hasattr(target, "keypoint_names") else
                               target.model.keypoint_names)
    shifted = np.roll(astronaut, 24, axis=1)  # 24 px right: far more than 8% of the eye distance
    assert _flipped(criterion, target, as_batch(astronaut), as_batch(shifted))[0]
    assert not _flipped(criterion, target, as_batch(astronaut), as_batch(astronaut))[0]
    kept, margin = _flipped(criterion, target, as_batch(astronaut), as_batch(np.roll(astronaut, 1, axis=1)))
    assert not kept and 0 < margin < 0.08  # 1 px: a small error, under the threshold


def test_landmarks_are_not_a_detection_output(tmp_path, tiny):
    from zoom.config import load_config
    from zoom.models import check_target_output

    config = load_config(Path(__file__).parents[1] / "configs" / "tiny.yaml",
                         {"target.spec": LANDMARKS, "target.task": "detection"})
    with pytest.raises(ZoomError, match="detection"):
        check_target_output(load_target(LANDMARKS), config, 64, "cpu", make_criterion("detection"))
