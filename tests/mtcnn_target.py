"""MTCNN (facenet-pytorch 2.6.0, its P/R/O-Net weights shipped in the package; a test-only dependency
installed with --no-deps) as zoom `python:` targets: a face detector in torchvision's output format and
the five facial landmarks of the most confident face. Real weights, offline, proven against
facenet-pytorch's own `detect()` in tests/test_tasks_mtcnn.py.

    python:tests/mtcnn_target.py:detector     -> target.task: detection
    python:tests/mtcnn_target.py:landmarks    -> target.task: keypoints (left eye, right eye, nose, mouth corners)
"""

import numpy as np
import torch
from torch import nn

LANDMARKS = ["left_eye", "right_eye", "nose", "mouth_left", "mouth_right"]


class MTCNNFaces(nn.Module):
    """Images [B, 3, H, W] in [0, 1] -> per image {"boxes", "labels" (1: face), "scores"}, or the top face's
    landmarks [B, 5, 2] (-1 where no face is found). MTCNN's cascade is not differentiable end to end
    (it resizes through numpy and filters by thresholds), so only the bracket and the sweep use it."""

    labels = ["background", "face"]

    def __init__(self, keypoints: bool = False):
        super().__init__()
        from facenet_pytorch import MTCNN

        self.mtcnn = MTCNN(keep_all=True, device="cpu")
        self.keypoints = keypoints
        self.keypoint_names = LANDMARKS if keypoints else None

    def forward(self, images: torch.Tensor):
        pixels = (images.detach().clamp(0, 1) * 255).round().permute(0, 2, 3, 1).cpu()
        out = []
        for image in pixels:
            boxes, probs, points = self.mtcnn.detect(image, landmarks=True)
            if boxes is None:
                boxes, probs, points = torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, 5, 2)
            else:  # numpy object arrays from facenet-pytorch
                boxes, probs, points = (torch.tensor(np.asarray(x).tolist(), dtype=torch.float32)
                                        for x in (boxes, probs, points))
            out.append((boxes, probs, points))
        if self.keypoints:
            return torch.stack([p[s.argmax()] if len(s) else torch.full((5, 2), -1.0) for _, s, p in out])
        return [{"boxes": b, "labels": torch.ones(len(b), dtype=torch.int64), "scores": s} for b, s, _ in out]


def detector():
    return MTCNNFaces()


def landmarks():
    return MTCNNFaces(keypoints=True)
