"""What every module ``compile_schedule`` returns shares: it stands in for the diffusers transformer it wraps.

A pipeline reads ``config``, ``dtype``, ``device`` and any other attribute off ``pipe.transformer``; these come
from ``original_model`` (registered as a submodule, so ``.to()`` / ``.half()`` reach the shared weights).
"""
from __future__ import annotations

import torch
from torch import nn

#: how a drop-in module reads the timestep argument: ``"host"`` only where that costs no device sync (Python numbers,
#: CPU tensors), ``"strict"`` always (a sync per step on a GPU), ``"off"`` never (the call counter decides the step)
TIMESTEP_CHECKS = ("host", "strict", "off")


def check_timestep_mode(timestep_check: str) -> str:
    if timestep_check not in TIMESTEP_CHECKS:
        raise ValueError(f"timestep_check must be one of {TIMESTEP_CHECKS}, got {timestep_check!r}")
    return timestep_check


class DropInModule(nn.Module):
    """Base of the branch-level and block-level cached transformers (they set ``original_model``, ``_step``,
    ``schedule``, ``_graphs``, ``_caches`` (cache sets with ``nbytes()``), ``step_counts`` and ``_step_flops``
    (:func:`~l2c_kernels.runtime.block_flops.step_flops` of the schedule), and define ``reset``)."""

    def release(self) -> None:
        """Free the cache buffers and CUDA graphs (they are made again on the next call)."""
        self._graphs.release()
        self._caches.clear()
        self.reset()

    def cache_bytes(self) -> int:
        return sum(c.nbytes() for c in self._caches.values())

    def num_graphs(self) -> int:
        return self._graphs.num_graphs()

    def distinct_plans(self) -> int:
        """Distinct step plans of the schedule (one CUDA graph each, per input shape and pass)."""
        return len(set(self._plan_ids()))

    def compiled_variants(self) -> int | None:
        """Distinct kinds of work run so far on the ``torch.compile`` path, one compiled graph each (per input
        shape); None without ``torch_compile``."""
        kinds = self._compiled_kinds()
        return None if kinds is None else len(kinds)

    def summary(self) -> dict:
        """What ran: steps and generations, the unit FLOPs the steps run removed (weighed as the schedule weighs
        them), plans used, CUDA graphs, compiled variants, cache bytes; and what the level adds."""
        level = "block" if self.schedule.is_block_level else "branch"
        total = sum(c * f[0] for c, f in zip(self.step_counts, self._step_flops))
        removed = sum(c * f[1] for c, f in zip(self.step_counts, self._step_flops))
        ids = self._plan_ids()
        used = {ids[s] for s, c in enumerate(self.step_counts) if c}
        return {"level": level, "steps_run": sum(self.step_counts), "generations": self.generations,
                "schedule_steps": self.schedule.num_steps,
                f"{level}_flops_removed": round(removed / total, 4) if total else 0.0,
                "schedule_flops_removed": round(self.schedule.flops_removed_fraction(), 4),
                "plans_used": len(used), "distinct_plans": self.distinct_plans(), "cuda_graphs": self.num_graphs(),
                "graph_backend": self._graphs.backend.name if self.num_graphs() else None,
                "compiled_variants": self.compiled_variants(), "cache_bytes": self.cache_bytes(),
                **self._summary_extra()}

    def _plan_ids(self) -> list:
        """Per step of the schedule: what tells its plan from another step's (equal for steps that run alike)."""
        raise NotImplementedError

    def _compiled_kinds(self) -> set | None:
        raise NotImplementedError

    def _summary_extra(self) -> dict:
        return {}

    @property
    def config(self):
        return self.original_model.config

    @property
    def dtype(self) -> torch.dtype:
        return self._weight().dtype

    @property
    def device(self) -> torch.device:
        return self._weight().device

    def _weight(self) -> torch.Tensor:
        """One parameter of the wrapped model (the weights' dtype and device), read every call: where it is
        (a module and a parameter name) is found once, so a call does not walk the module tree; ``.to()`` and a
        replaced parameter are followed."""
        at = self.__dict__.get("_weight_at")
        if at is None:
            at = self.__dict__["_weight_at"] = next(
                ((m, n) for m in self.original_model.modules() for n, p in m._parameters.items() if p is not None), ())
        w = at[0]._parameters.get(at[1]) if at else None
        return w if w is not None else next(self.original_model.parameters())

    def _check_latents(self, x) -> None:
        """(Every runtime level, before any block runs.) The latents fit the weights (dtype and device: metadata, free) and are finite (a read of the data:
        done where it costs no device sync -- CPU tensors -- or with ``timestep_check="strict"``)."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"hidden_states must be a tensor, got {type(x).__name__}")
        w = self._weight()
        if x.dtype != w.dtype:
            raise ValueError(f"hidden_states are {str(x.dtype).removeprefix('torch.')} but the model's weights are "
                             f"{str(w.dtype).removeprefix('torch.')}: cast the latents (or the model) so they match")
        if x.device != w.device:
            raise ValueError(f"hidden_states are on {x.device} but the model's weights are on {w.device}")
        if self.timestep_check == "strict" or (self.timestep_check == "host" and x.device.type == "cpu"):
            if not bool(torch.isfinite(x).all()):
                bad = "NaN" if bool(torch.isnan(x).any()) else "infinite values"
                raise ValueError(f"hidden_states contain {bad}: the sampler diverged or the inputs are corrupt")

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["original_model"], name)

    def set_step(self, step: int) -> None:
        """Make the next call run step ``step`` of the schedule, whatever timestep it gets (at block level the
        same step again is its next pass)."""
        if not 0 <= step < self.schedule.num_steps:
            raise ValueError(f"step {step} out of range: the schedule has {self.schedule.num_steps} steps")
        self._forced_step = step

    def _host_timestep(self, t) -> float | None:
        """The call's timestep where reading it costs no device sync -- a Python number or a CPU tensor -- or always
        with ``timestep_check="strict"``; None where it is not read (``"off"``, a device tensor, no timestep). Of a
        tensor, its largest entry (Wan 2.2's per-token timesteps hold 0 for the clean conditioning frames)."""
        if t is None or self.timestep_check == "off":
            return None
        if not isinstance(t, torch.Tensor):
            return float(t)
        if (self.timestep_check == "host" and t.device.type != "cpu") or not t.numel():
            return None
        return float(t.max())

    @property
    def current_step(self) -> int | None:
        """Index of the step run last (None before the first call or after ``reset``)."""
        return self._step
