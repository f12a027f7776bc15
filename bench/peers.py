"""The dynamic caches people use today (diffusers FirstBlockCache, PyramidAttentionBroadcast, TaylorSeer, MagCache;
cache-dit DBCache), each applied to its own copy of a bundled model's transformer behind a wrapper with the
transformer's call signature and a ``reset()``; every peer counts the branch (or block) computations that really
ran. How each peer is applied and counted: bench/NOTES.md ("How the benchmarks run ... and the dynamic-cache peers").
"""
from __future__ import annotations

import contextlib
import copy
import io
import logging
import os
import re
from dataclasses import dataclass, field

import torch
from diffusers.hooks import (FirstBlockCacheConfig, HookRegistry, MagCacheConfig, PyramidAttentionBroadcastConfig,
                             TaylorSeerCacheConfig, apply_first_block_cache, apply_mag_cache,
                             apply_pyramid_attention_broadcast, apply_taylorseer_cache)
from diffusers.hooks.hooks import CacheContext, _set_cache_context
from torch import nn

from l2c_kernels.adapters import adapter_for
from l2c_kernels.adapters.patterns import estimate_block_flops, find_blocks

PEER_FAMILIES = ("fbc", "pab", "taylorseer", "dbcache")  # the peers of the DiT / PixArt comparisons
BLOCK_LEVEL_FAMILIES = ("fbc", "taylorseer", "dbcache", "magcache")  # the peers of the Flux comparison
ALL_FAMILIES = PEER_FAMILIES + ("magcache",)
FAMILY_NAMES = {"fbc": "diffusers FirstBlockCache", "pab": "diffusers PyramidAttentionBroadcast",
                "taylorseer": "diffusers TaylorSeer", "dbcache": "cache-dit DBCache", "magcache": "diffusers MagCache"}
BLOCK_UNIT = "block"  # the one branch of a model cached per block


class PeerUnavailable(RuntimeError):
    """The peer cannot be applied to this model (the message says exactly why)."""


def _branch_leaf(block, branch: str) -> nn.Module:
    """The innermost module that runs exactly when ``branch`` of ``block`` is really computed."""
    if branch in ("attn1", "attn2"):
        return getattr(block, branch).to_out[0]
    if branch == "ff":
        return block.ff.net[0]
    raise ValueError(f"unknown branch {branch!r}")


def _enable(model, config, apply_fn) -> None:
    """diffusers' cache ``config`` on ``model``: ``enable_cache`` where the model has it, else ``apply_fn``."""
    if hasattr(model, "enable_cache"):
        model.enable_cache(config)
    else:
        apply_fn(model, config)


@dataclass
class PeerSetting:
    family: str
    params: dict = field(default_factory=dict)

    @property
    def label(self) -> str:
        p = self.params
        if self.family == "fbc":
            return f"FirstBlockCache t={p['threshold']}"
        if self.family == "pab":
            extra = f" cross={p['cross_skip']}" if p.get("cross_skip") else ""
            lo, hi = p.get("timestep_range", (100, 800))
            return f"PAB skip={p['skip']}{extra} t=({lo},{hi})"
        if self.family == "taylorseer":
            where = {"branches": "", "default": ", attention", "blocks": ", whole blocks"}[p.get("targets", "branches")]
            return f"TaylorSeer every {p['interval']} order {p.get('order', 1)} warm-up {p.get('warmup', 3)}{where}"
        if self.family == "dbcache":
            cal = f" + TaylorSeer{p.get('calibrator_order', 1)}" if p.get("calibrator") else ""
            return f"DBCache F{p['Fn']}B{p.get('Bn', 0)} t={p['threshold']} warm-up {p.get('warmup', 0)}{cal}"
        if self.family == "magcache":
            return f"MagCache t={p['threshold']} K={p.get('max_skip_steps', 3)} retain {p.get('retention_ratio', 0.2)}"
        return f"{self.family} {p}"


class PeerTransformer(nn.Module):
    """A copy of ``model`` with one dynamic cache applied; same call signature as the transformer."""

    def __init__(self, model: nn.Module, setting: PeerSetting, num_inference_steps: int):
        super().__init__()
        if setting.family not in ALL_FAMILIES:
            raise ValueError(f"unknown peer {setting.family!r}; choose one of {ALL_FAMILIES}")
        self.setting = setting
        self.num_inference_steps = int(num_inference_steps)
        self.inner = copy.deepcopy(model).eval().requires_grad_(False)
        ad = adapter_for(self.inner)
        self.branches = list(ad.branches(self.inner))
        self.branch_flops = {k: float(v) for k, v in ad.branch_flops(self.inner).items()}
        self.num_blocks = ad.num_blocks(self.inner)
        self.block_level = self.branches == [BLOCK_UNIT]
        self.unit_flops = estimate_block_flops(self.inner) if self.block_level else []
        self._timestep = 0.0
        self._diffusers_hooks = False
        self._cache_dit_config = self._calibrator_config = None
        # what ran, per block (since the last reset, and in all): at block level the FLOPs of the linear layers that
        # ran (2 x weights / streams each, adding up to the block's cost), else how often each branch ran
        self.calls = self.total_calls = 0
        self.ran, self.total_ran = self._nothing_ran(), self._nothing_ran()
        getattr(self, f"_apply_{setting.family}")(**setting.params)
        for b, block in enumerate(ad.blocks(self.inner)):
            if self.block_level:
                ref = find_blocks(self.inner)[b]
                for m in ref.module.modules():
                    if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
                        m.register_forward_hook(self._counter(b, 0, 2.0 * m.weight.numel() / len(ref.pattern.returns)))
            else:
                for i, br in enumerate(self.branches):
                    _branch_leaf(block, br).register_forward_hook(self._counter(b, i, 1))

    # ------------------------------------------------------------------ counting
    def _nothing_ran(self) -> list[list]:
        return [[0.0] if self.block_level else [0] * len(self.branches) for _ in range(self.num_blocks)]

    def _counter(self, b: int, i: int, amount):
        def hook(_mod, _inp, _out):
            self.ran[b][i] += amount
            self.total_ran[b][i] += amount
        return hook

    def flops_removed_fraction(self, total: bool = True) -> float:
        """Fraction of branch FLOPs not computed over the calls counted (all runs, or since the last reset)."""
        calls, ran = (self.total_calls, self.total_ran) if total else (self.calls, self.ran)
        if calls == 0:
            return 0.0
        if self.block_level:
            return 1.0 - sum(row[0] for row in ran) / (calls * sum(self.unit_flops))
        w = [self.branch_flops[b] for b in self.branches]
        done = sum(c * wi for row in ran for c, wi in zip(row, w))
        return 1.0 - done / (calls * self.num_blocks * sum(w))

    # ------------------------------------------------------------------ peers
    def _apply_fbc(self, threshold: float):
        self._apply_diffusers(FirstBlockCacheConfig(threshold=float(threshold)), apply_first_block_cache)

    def _apply_pab(self, skip: int, cross_skip: int | None = None, timestep_range=(100, 800)):
        if cross_skip and "attn2" not in self.branches:
            raise PeerUnavailable(f"{type(self.inner).__name__} has no cross-attention to broadcast")
        cfg = PyramidAttentionBroadcastConfig(
            spatial_attention_block_skip_range=int(skip),
            spatial_attention_timestep_skip_range=tuple(timestep_range),
            cross_attention_block_skip_range=int(cross_skip) if cross_skip else None,
            cross_attention_timestep_skip_range=tuple(timestep_range),
            current_timestep_callback=lambda: self._timestep)
        self._apply_diffusers(cfg, apply_pyramid_attention_broadcast)

    def _apply_taylorseer(self, interval: int, order: int = 1, warmup: int = 3, targets: str = "branches"):
        # "branches": every branch of every block, named (diffusers' default identifiers fullmatch modules named
        # "...attn", as in Flux; DiT/PixArt's attn1/attn2 would get no hook). "default": diffusers' identifiers (on
        # Flux the attention of both block lists; the MLPs always run). "blocks": every whole block of every list.
        if targets == "default":
            ids = None
        elif targets == "blocks":
            ids = [rf"({'|'.join(dict.fromkeys(ref.list_name for ref in find_blocks(self.inner)))})\.\d+"]
        elif targets == "branches":
            if self.branches == [BLOCK_UNIT]:
                raise PeerUnavailable(f"{type(self.inner).__name__} is cached per block (no branches to name): "
                                      "use targets='default' or 'blocks'")
            ids = [rf"transformer_blocks\.\d+\.({'|'.join(self.branches)})"]
        else:
            raise ValueError(f"TaylorSeer targets must be 'branches', 'default' or 'blocks', got {targets!r}")
        cfg = TaylorSeerCacheConfig(cache_interval=int(interval), disable_cache_before_step=int(warmup),
                                    max_order=int(order), taylor_factors_dtype=torch.float32,
                                    cache_identifiers=ids)
        self._apply_diffusers(cfg, apply_taylorseer_cache)

    def _apply_magcache(self, mag_ratios, threshold: float = 0.06, max_skip_steps: int = 3,
                        retention_ratio: float = 0.2):
        if len(mag_ratios) != self.num_inference_steps:
            raise PeerUnavailable(f"MagCache ratios were calibrated for {len(mag_ratios)} steps, not "
                                  f"{self.num_inference_steps}")
        cfg = MagCacheConfig(threshold=float(threshold), max_skip_steps=int(max_skip_steps),
                             retention_ratio=float(retention_ratio), num_inference_steps=self.num_inference_steps,
                             mag_ratios=torch.tensor([float(r) for r in mag_ratios]))
        self._apply_diffusers(cfg, apply_mag_cache)

    def _apply_diffusers(self, config, apply_fn):
        _enable(self.inner, config, apply_fn)
        reg = HookRegistry.check_if_exists_or_initialize(self.inner)
        reg.invalidate_child_registries_cache()
        if not reg._get_child_registries() and not reg.hooks:
            raise PeerUnavailable(f"{type(config).__name__} found no module to hook in {type(self.inner).__name__}")
        self._diffusers_hooks = True
        _set_cache_context(self.inner, CacheContext("inference"))

    def _apply_dbcache(self, Fn: int, threshold: float, Bn: int = 0, warmup: int = 0,
                       max_continuous: int = -1, calibrator: str | None = None, calibrator_order: int = 1):
        os.environ.setdefault("CACHE_DIT_LOG_LEVEL", "warning")  # cache-dit logs every hook it installs
        try:
            import cache_dit
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise PeerUnavailable(f"cache-dit is not installed (pip install cache-dit): {e}") from None
        if Fn + Bn > self.num_blocks:
            raise PeerUnavailable(f"DBCache F{Fn}B{Bn} computes more blocks than the model has ({self.num_blocks})")
        cfg = cache_dit.DBCacheConfig(Fn_compute_blocks=int(Fn), Bn_compute_blocks=int(Bn),
                                      residual_diff_threshold=float(threshold), max_warmup_steps=int(warmup),
                                      max_continuous_cached_steps=int(max_continuous),
                                      enable_separate_cfg=False, num_inference_steps=self.num_inference_steps)
        if calibrator not in (None, "taylorseer"):
            raise ValueError(f"DBCache calibrator must be None or 'taylorseer', got {calibrator!r}")
        self._cache_dit_config = cfg
        self._calibrator_config = None if calibrator is None else cache_dit.TaylorSeerCalibratorConfig(
            taylorseer_order=int(calibrator_order))
        for name in list(logging.root.manager.loggerDict):
            if name.startswith("cache_dit"):
                logging.getLogger(name).setLevel(logging.WARNING)
        cache_dit.enable_cache(self.inner, cache_config=copy.deepcopy(cfg),
                               calibrator_config=copy.deepcopy(self._calibrator_config))

    # ------------------------------------------------------------------ module interface
    @property
    def config(self):
        return self.inner.config

    @property
    def dtype(self):
        return next(self.inner.parameters()).dtype

    @property
    def device(self):
        return next(self.inner.parameters()).device

    def reset(self) -> None:
        """Forget the previous generation (hook state, cache-dit context, per-run counters)."""
        if self._diffusers_hooks:
            HookRegistry.check_if_exists_or_initialize(self.inner).reset_stateful_hooks(recurse=True)
            _set_cache_context(self.inner, CacheContext("inference"))  # StateManager.reset() drops the context
        if self._cache_dit_config is not None:
            import cache_dit

            extra = {} if self._calibrator_config is None else dict(
                calibrator_config=copy.deepcopy(self._calibrator_config))
            cache_dit.refresh_context(self.inner, cache_config=copy.deepcopy(self._cache_dit_config), **extra)
        self.calls = 0
        self.ran = self._nothing_ran()

    def forward(self, hidden_states, timestep=None, **kwargs):
        if timestep is not None:
            t = timestep.reshape(-1)[0] if isinstance(timestep, torch.Tensor) else timestep
            self._timestep = float(t)
        self.calls += 1
        self.total_calls += 1
        return self.inner(hidden_states, timestep=timestep, **kwargs)


def default_settings(model, num_inference_steps: int, mag_ratios=None) -> list[PeerSetting]:
    """The grid of settings each peer is run at (chosen to span ~1.1x to ~4x where the peer can).

    Models cached per block (Flux): FirstBlockCache; TaylorSeer on diffusers' default targets (attention) and on
    whole blocks; MagCache with ``mag_ratios`` (calibrated for this step count; without them MagCache is left out);
    cache-dit DBCache with the first 1 and the first 4 blocks always computed, TaylorSeer calibrator off and on."""
    branches, warm = adapter_for(model).branches(model), max(1, int(num_inference_steps) // 10)
    out = [PeerSetting("fbc", dict(threshold=t)) for t in (0.05, 0.1, 0.2, 0.3, 0.5, 0.8)]
    if branches != [BLOCK_UNIT]:
        cross = "attn2" in branches
        out += [PeerSetting("pab", dict(skip=skip, timestep_range=rng, cross_skip=2 * skip if cross else None))
                for skip, rng in ((2, (100, 800)), (2, (-1, 1001)), (3, (-1, 1001)), (5, (-1, 1001)))]
        out += [PeerSetting("taylorseer", dict(interval=interval, order=order, warmup=warm))
                for interval, order in ((2, 1), (3, 1), (3, 2), (4, 1), (5, 1), (5, 2), (6, 1))]
        return out + [PeerSetting("dbcache", dict(Fn=fn, Bn=0, threshold=t, warmup=warm))
                      for fn, ts in ((1, (0.1, 0.2, 0.4)), (2, (0.1, 0.2, 0.4)), (4, (0.05, 0.1, 0.2, 0.4, 0.8)))
                      for t in ts]
    out += [PeerSetting("taylorseer", dict(interval=interval, order=1, warmup=warm, targets="default"))
            for interval in (3, 5)]
    # TaylorSeer on whole blocks at its best phase, order and interval: warm-up 3 (its default) and 10% of the steps
    out += [PeerSetting("taylorseer", dict(interval=interval, order=order, warmup=w, targets="blocks"))
            for w in sorted({3, warm}) for interval, order in ((2, 1), (3, 1), (3, 2), (4, 1), (4, 2), (5, 1), (6, 1))]
    if mag_ratios is not None:
        out += [PeerSetting("magcache", dict(threshold=t, max_skip_steps=k, retention_ratio=0.2,
                                             mag_ratios=[float(r) for r in mag_ratios]))
                for t, k in ((0.06, 3), (0.12, 3), (0.24, 4), (0.5, 6), (1.0, 8))]
    nb = adapter_for(model).num_blocks(model)
    return out + [PeerSetting("dbcache", dict(Fn=fn, Bn=0, threshold=t, warmup=warm, calibrator=cal))
                  for fn, ts in ((1, (0.1, 0.2, 0.4, 0.8)), (min(4, nb - 1), (0.2, 0.4)))
                  for t in ts for cal in (None, "taylorseer")]


def calibrate_magcache(model, num_inference_steps: int, generate) -> list[float]:
    """MagCache's magnitude ratios for ``model``, calibrated as diffusers documents it: a copy of the model with
    ``MagCacheConfig(calibrate=True)`` runs one generation (``generate(transformer)``, which must make exactly
    ``num_inference_steps`` transformer calls), nothing is skipped, and the ratios it prints are read back."""
    inner = copy.deepcopy(model).eval().requires_grad_(False)
    _enable(inner, MagCacheConfig(calibrate=True, num_inference_steps=int(num_inference_steps)), apply_mag_cache)
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        generate(inner)
    found = re.findall(r"mag_ratios=\.\.\.\):\s*\n(\[[^\]]*\])", buf.getvalue())
    if not found:
        raise PeerUnavailable(f"MagCache calibration printed no ratios (did the generation make "
                              f"{num_inference_steps} transformer calls?): {buf.getvalue()[-300:]!r}")
    ratios = [float(v) for v in found[-1].strip("[]").split(",")]
    if len(ratios) != num_inference_steps:
        raise PeerUnavailable(f"MagCache calibration gave {len(ratios)} ratios for {num_inference_steps} steps")
    return ratios


def make_peer(model, setting: PeerSetting, num_inference_steps: int) -> PeerTransformer:
    """Apply ``setting`` to a copy of ``model``; raises :class:`PeerUnavailable` with the reason if it can't."""
    try:
        return PeerTransformer(model, setting, num_inference_steps)
    except PeerUnavailable:
        raise
    except Exception as e:  # the peer's own code rejected the model: record its words
        raise PeerUnavailable(f"{FAMILY_NAMES.get(setting.family, setting.family)} failed on "
                              f"{type(model).__name__}: {type(e).__name__}: {e}") from e
