"""The final choice among the best few schedules, on as many calibration samples as it takes to tell them apart.

Two schedules a dB or two apart on a batch of 16 swap places on another batch of 16 more often than not (on a
model's held-out samples the per-image PSNR of one schedule spreads over 5-15 dB, and a batch's PSNR follows its
worst images). The choice therefore races the finalists: every finalist still in the race is measured on one more
batch of new samples (own noise and conditions, full compute as the reference) at a time; a finalist that is
significantly worse than the leader on every sample measured so far (:func:`~.candidates.logs_better`, paired)
drops out; the race ends when one finalist is left or ``max_samples`` are spent, and the leader on all samples
measured wins. A stopping rule on measured spread, not a sample count tuned on any model: a clear winner costs no
further batch, a near tie spends the budget."""
from __future__ import annotations

import torch

from .candidates import SIGNIFICANCE_Z, _Best, _calibration_error, error_from_logs, logs_better


def finalists(seen: dict, top: int, also=()) -> list:
    """The ``top`` best ``(mask key, forecast)`` measurements of ``seen`` by calibration error, and ``also``'s."""
    ranked = [k for _, k in sorted((e, k) for k, e in seen.items())[:top]]
    return ranked + [k for k in also if k not in ranked]


def race(logs: dict, more, measure, max_samples: int, z: float = SIGNIFICANCE_Z) -> tuple:
    """``(winner, logs)``. ``logs``: ``{finalist: per-sample 10 log10(MSE)}`` on the first batch, the same samples
    for every finalist. ``more(k)``: the k-th further batch (k = 1, 2, ...); ``measure(batch, finalist)``: the
    finalist's per-sample errors there. Returns the finalist with the lowest error (:func:`error_from_logs`) over
    every sample measured and the per-sample errors of the finalists left in the race."""
    logs = dict(logs)
    alive = _drop_worse(list(logs), logs, z)
    used, k = len(next(iter(logs.values()))), 1
    while len(alive) > 1 and used < max_samples:
        batch = more(k)
        for e in alive:
            logs[e] = torch.cat([logs[e], measure(batch, e)])
        used, k = len(logs[alive[0]]), k + 1
        alive = _drop_worse(alive, logs, z)
    winner = min(alive, key=lambda e: error_from_logs(logs[e]))
    return winner, {e: logs[e] for e in alive}


def _drop_worse(alive: list, logs: dict, z: float) -> list:
    leader = min(alive, key=lambda e: error_from_logs(logs[e]))
    return [e for e in alive if e == leader or not logs_better(logs[leader], logs[e], z)]


def measure_on(best: _Best):
    """``measure(batch, (mask key, forecast))`` for :func:`race`: the mask of ``best.masks`` run through the runtime
    on a calibration batch (once per batch: a front's budgets share the batches)."""
    def measure(batch, entry):
        if entry not in batch.logs:
            _calibration_error(batch, best.masks[entry[0]], entry[1])   # records batch.logs[entry]
        return batch.logs[entry]
    return measure
