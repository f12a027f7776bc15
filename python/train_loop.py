"""What the training scripts of the bundled diffusion models share: one optimiser step with EMA weights,
the learning-rate schedule, and caption dropout for classifier-free guidance."""
from __future__ import annotations

import copy
import math
import random
import time

import torch

from l2c_kernels.models.text_encoder import CAPTION_TEMPLATES, caption_for


class EmaTrainer:
    """AdamW over ``modules`` (betas 0.9/0.99, no weight decay), gradient clipping at 1, and EMA copies of
    the modules (the weights that are shipped) with the warm-up ``min(ema, (1 + step) / (10 + step))``."""

    def __init__(self, modules: list[torch.nn.Module], lr: float, ema: float):
        self.modules = modules
        self.params = [p for m in modules for p in m.parameters()]
        for m in modules:
            m.train()
        self.ema_modules = [copy.deepcopy(m).eval().requires_grad_(False) for m in modules]
        self.ema = ema
        self.opt = torch.optim.AdamW(self.params, lr=lr, weight_decay=0.0, betas=(0.9, 0.99))

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.params)

    def step(self, loss: torch.Tensor, step: int, lr: float) -> None:
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        for g in self.opt.param_groups:
            g["lr"] = lr
        self.opt.step()
        decay = min(self.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for m, e in zip(self.modules, self.ema_modules):
                for pe, pm in zip(e.parameters(), m.parameters()):
                    pe.lerp_(pm, 1 - decay)


def warmup_cosine(lr: float, warmup: int, steps: int, start: float | None = None, max_minutes: float | None = None):
    """Linear warm-up over ``warmup`` steps, then cosine decay to 10% of ``lr`` at ``steps``. With ``max_minutes``
    (and the ``start`` time) the decay follows whichever of step count and elapsed time is further along."""

    def lr_at(step: int) -> float:
        if step < warmup:
            return lr * (step + 1) / warmup
        p = (step - warmup) / max(1, steps - warmup)
        if max_minutes:
            p = min(max(p, (time.time() - start) / (60 * max_minutes)), 1.0)
        return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)))

    return lr_at


def dropped_captions(labels: torch.Tensor, dropout: float, gen: torch.Generator) -> list[str]:
    """A caption per digit label, the empty caption with probability ``dropout`` (template drawn with ``random``)."""
    drop = torch.rand(len(labels), generator=gen) < dropout
    return ["" if d else caption_for(int(v), random.randrange(len(CAPTION_TEMPLATES)))
            for v, d in zip(labels.tolist(), drop.tolist())]
