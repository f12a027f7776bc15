"""A small CNN that reads the 16x16 digits: the judge of generated samples (:func:`class_accuracy`).

Trained by ``python/train_classifier.py`` on the scikit-learn digits (held-out split reported in
``weights/digit-classifier.json``), shipped beside the diffusion models.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from .registry import WEIGHTS_DIR

NAME = "digit-classifier"


class DigitClassifier(nn.Module):
    """[B, 1, 16, 16] images in [-1, 1] -> [B, 10] logits."""

    def __init__(self, width: int = 32):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.GELU(),
            nn.Conv2d(width, width, 3, padding=1), nn.GELU(), nn.MaxPool2d(2),          # 8x8
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.GELU(), nn.MaxPool2d(2),    # 4x4
            nn.Flatten(), nn.Dropout(0.2), nn.Linear(2 * width * 16, 128), nn.GELU(), nn.Linear(128, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or tuple(x.shape[1:]) != (1, 16, 16):
            raise ValueError(f"the digit classifier takes [B, 1, 16, 16] images, got {tuple(x.shape)}")
        return self.net(x)


def load_classifier(weights_dir: Path | None = None) -> DigitClassifier:
    from safetensors.torch import load_file

    wdir = Path(weights_dir) if weights_dir else WEIGHTS_DIR
    wfile, mfile = wdir / f"{NAME}.safetensors", wdir / f"{NAME}.json"
    if not wfile.exists():
        raise FileNotFoundError(f"{wfile} not found; train it with `python python/train_classifier.py`")
    meta = json.loads(mfile.read_text()) if mfile.exists() else {}
    model = DigitClassifier(**meta.get("config", {}))
    model.load_state_dict(load_file(str(wfile)))
    return model.eval().requires_grad_(False)


_CLASSIFIER = None


def digit_classifier():
    """The bundled digit classifier (loaded once)."""
    global _CLASSIFIER
    if _CLASSIFIER is None:
        _CLASSIFIER = load_classifier()
    return _CLASSIFIER


@torch.no_grad()
def predict_digits(images: torch.Tensor, classifier=None) -> torch.Tensor:
    clf = classifier or digit_classifier()
    return clf(images.detach().float().cpu()).argmax(1)


def class_accuracy(images: torch.Tensor, labels, classifier=None) -> float:
    """Fraction of generated ``images`` the bundled classifier reads as the digit they were asked for."""
    labels = torch.as_tensor(list(labels) if not isinstance(labels, torch.Tensor) else labels).long().cpu()
    if labels.numel() != images.shape[0]:
        raise ValueError(f"{images.shape[0]} images but {labels.numel()} labels")
    return float((predict_digits(images, classifier) == labels).float().mean())
