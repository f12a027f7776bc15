"""What the hook-based references of a schedule share: a step is the unmodified model run with that step's hooks."""
from __future__ import annotations

import torch


class HookSteps:
    """``hooks(s)`` (defined by a reference) installs step ``s``'s hooks and returns their handles."""

    def hooks(self, s: int) -> list:
        raise NotImplementedError

    def step(self, s: int, kwargs: dict):
        """Run step ``s`` of the schedule on ``kwargs`` (step 0 starts a new generation)."""
        handles = self.hooks(s)
        try:
            with torch.no_grad():
                return self.model(**kwargs)
        finally:
            for h in handles:
                h.remove()
