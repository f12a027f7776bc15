"""The dynamic caches people use today (diffusers FirstBlockCache, PyramidAttentionBroadcast, TaylorSeer, MagCache;
cache-dit DBCache), each applied to its own copy of a bundled model's transformer behind a wrapper with the
transformer's call signature and a ``reset()``; every peer counts the branch (or block) computations that really
ran. How each peer is applied and counted: bench/NOTES.md ("How the benchmarks run ... and the dynamic-cache peers").
"""
from __future__ import annotations

import copy
import logging
import os
from dataclasses import dataclass, field

import torch
from torch import nn

PEER_FAMILIES = ("fbc", "pab", "taylorseer", "dbcache")  # the peers of the DiT / PixArt comparisons
BLOCK_LEVEL_FAMILIES = ("fbc", "taylorseer", "dbcache", "magcache")  # the peers of the Flux comparison
ALL_FAMILIES = PEER_FAMILIES + ("magcache",)
FAMILY_NAMES = {"fbc": "diffusers FirstBlockCache", "pab": "diffusers PyramidAttentionBroadcast",
                "taylorseer": "diffusers TaylorSeer", "dbcache": "cache-dit DBCache", "magcache": "diffusers MagCache"}
BLOCK_UNIT = "block"  # the one branch of a model cached per block


class PeerUnavailable(RuntimeError):
    """The peer cannot be applied to this model (the message says exactly why)."""


def _adapter(model):
    from l2c_kernels.adapters import adapter_for

    return adapter_for(model)


def _branch_leaf(block, branch: str) -> nn.Module:
    """The innermost module that runs exactly when ``branch`` of ``block`` is really computed."""
    if branch in ("attn1", "attn2"):
        return getattr(block, branch).to_out[0]
    if branch == "ff":
        return block.ff.net[0]
    raise ValueError(f"unknown branch {branch!r}")


def _block_lists(model) -> list[str]:
    """Names of the model's block lists in call order (Flux: ``transformer_blocks``, ``single_transformer_blocks``)."""
    from l2c_kernels.adapters.patterns import find_blocks

    names = []
    for ref in find_blocks(model):
        if ref.list_name not in names:
            names.append(ref.list_name)
    return names


def _block_costs(model) -> list[float]:
    from l2c_kernels.adapters.patterns import estimate_block_flops

    return estimate_block_flops(model)


def _block_linears(model, b: int) -> list[tuple[nn.Module, float]]:
    """``(layer, cost)`` for every linear/convolution layer of block ``b``: ``2 x weights / streams``, so the
    costs of a block's layers add up to its cost in ``estimate_block_flops``."""
    from l2c_kernels.adapters.patterns import find_blocks

    ref = find_blocks(model)[b]
    streams = len(ref.pattern.returns)
    return [(m, 2.0 * m.weight.numel() / streams) for m in ref.module.modules()
            if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d))]


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
            return (f"MagCache t={p['threshold']} K={p.get('max_skip_steps', 3)} "
                    f"retain {p.get('retention_ratio', 0.2)}")
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
        ad = _adapter(self.inner)
        self.branches = list(ad.branches(self.inner))
        self.branch_flops = {k: float(v) for k, v in ad.branch_flops(self.inner).items()}
        self.num_blocks = ad.num_blocks(self.inner)
        self._timestep = 0.0
        self.calls = 0
        self.branch_calls = [[0] * len(self.branches) for _ in range(self.num_blocks)]
        self.total_calls = 0
        self.total_branch_calls = [[0] * len(self.branches) for _ in range(self.num_blocks)]
        self._diffusers_hooks = False
        self._cache_dit_config = None
        self.block_level = self.branches == [BLOCK_UNIT]
        # block level: each block's cost and what each of its linear layers adds to it when it runs
        self.unit_flops = _block_costs(self.inner) if self.block_level else []
        self.block_flops_done = [0.0] * self.num_blocks
        self.total_block_flops_done = [0.0] * self.num_blocks
        self._calibrator_config = None
        getattr(self, f"_apply_{setting.family}")(**setting.params)
        for b, block in enumerate(ad.blocks(self.inner)):
            if self.block_level:
                for lin, cost in _block_linears(self.inner, b):
                    lin.register_forward_hook(self._flops_counter(b, cost))
                continue
            for i, br in enumerate(self.branches):
                _branch_leaf(block, br).register_forward_hook(self._counter(b, i))

    # ------------------------------------------------------------------ counting
    def _counter(self, b: int, i: int):
        def hook(_mod, _inp, _out):
            self.branch_calls[b][i] += 1
            self.total_branch_calls[b][i] += 1
        return hook

    def _flops_counter(self, b: int, cost: float):
        def hook(_mod, _inp, _out):
            self.block_flops_done[b] += cost
            self.total_block_flops_done[b] += cost
        return hook

    def flops_removed_fraction(self, total: bool = True) -> float:
        """Fraction of branch FLOPs not computed over the calls counted (all runs, or since the last reset)."""
        calls = self.total_calls if total else self.calls
        counts = self.total_branch_calls if total else self.branch_calls
        if calls == 0:
            return 0.0
        if self.block_level:
            done = sum(self.total_block_flops_done if total else self.block_flops_done)
            return 1.0 - done / (calls * sum(self.unit_flops))
        w = [self.branch_flops[b] for b in self.branches]
        done = sum(c * wi for row in counts for c, wi in zip(row, w))
        return 1.0 - done / (calls * self.num_blocks * sum(w))

    # ------------------------------------------------------------------ peers
    def _apply_fbc(self, threshold: float):
        from diffusers.hooks import FirstBlockCacheConfig, apply_first_block_cache

        self._apply_diffusers(FirstBlockCacheConfig(threshold=float(threshold)), apply_first_block_cache)

    def _apply_pab(self, skip: int, cross_skip: int | None = None, timestep_range=(100, 800)):
        from diffusers.hooks import PyramidAttentionBroadcastConfig, apply_pyramid_attention_broadcast

        has_cross = "attn2" in self.branches
        if cross_skip and not has_cross:
            raise PeerUnavailable(f"{type(self.inner).__name__} has no cross-attention to broadcast")
        cfg = PyramidAttentionBroadcastConfig(
            spatial_attention_block_skip_range=int(skip),
            spatial_attention_timestep_skip_range=tuple(timestep_range),
            cross_attention_block_skip_range=int(cross_skip) if cross_skip else None,
            cross_attention_timestep_skip_range=tuple(timestep_range),
            current_timestep_callback=lambda: self._timestep)
        self._apply_diffusers(cfg, apply_pyramid_attention_broadcast)

    def _apply_taylorseer(self, interval: int, order: int = 1, warmup: int = 3, targets: str = "branches"):
        from diffusers.hooks import TaylorSeerCacheConfig, apply_taylorseer_cache

        # targets="branches": every branch of every block. The default identifiers ("^transformer_blocks.*attn")
        # fullmatch modules named "...attn" (FLUX); DiT/PixArt name them attn1/attn2 and would get no hook at
        # all, so the branches are named here. targets="default": diffusers' own identifiers (on Flux: the
        # attention of both block lists; the MLPs always run). targets="blocks": every whole block of every
        # block list (all the model's block compute predicted).
        if targets == "default":
            ids = None
        elif targets == "blocks":
            ids = [rf"({'|'.join(_block_lists(self.inner))})\.\d+"]
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
        from diffusers.hooks import MagCacheConfig, apply_mag_cache

        if len(mag_ratios) != self.num_inference_steps:
            raise PeerUnavailable(f"MagCache ratios were calibrated for {len(mag_ratios)} steps, not "
                                  f"{self.num_inference_steps}")
        cfg = MagCacheConfig(threshold=float(threshold), max_skip_steps=int(max_skip_steps),
                             retention_ratio=float(retention_ratio), num_inference_steps=self.num_inference_steps,
                             mag_ratios=torch.tensor([float(r) for r in mag_ratios]))
        self._apply_diffusers(cfg, apply_mag_cache)

    def _apply_diffusers(self, config, apply_fn):
        from diffusers.hooks import HookRegistry

        if hasattr(self.inner, "enable_cache"):
            self.inner.enable_cache(config)
        else:
            apply_fn(self.inner, config)
        reg = HookRegistry.check_if_exists_or_initialize(self.inner)
        reg.invalidate_child_registries_cache()
        if not reg._get_child_registries() and not reg.hooks:
            raise PeerUnavailable(f"{type(config).__name__} found no module to hook in {type(self.inner).__name__}")
        self._diffusers_hooks = True
        self._set_context()

    def _set_context(self):
        from diffusers.hooks.hooks import CacheContext, _set_cache_context

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
            from diffusers.hooks import HookRegistry

            HookRegistry.check_if_exists_or_initialize(self.inner).reset_stateful_hooks(recurse=True)
            self._set_context()  # StateManager.reset() drops the context
        if self._cache_dit_config is not None:
            import cache_dit

            extra = {} if self._calibrator_config is None else dict(
                calibrator_config=copy.deepcopy(self._calibrator_config))
            cache_dit.refresh_context(self.inner, cache_config=copy.deepcopy(self._cache_dit_config), **extra)
        self.calls = 0
        self.branch_calls = [[0] * len(self.branches) for _ in range(self.num_blocks)]
        self.block_flops_done = [0.0] * self.num_blocks

    def forward(self, hidden_states, timestep=None, **kwargs):
        if timestep is not None:
            t = timestep.reshape(-1)[0] if isinstance(timestep, torch.Tensor) else timestep
            self._timestep = float(t)
        self.calls += 1
        self.total_calls += 1
        return self.inner(hidden_states, timestep=timestep, **kwargs)


def default_settings(model, num_inference_steps: int, mag_ratios=None) -> list[PeerSetting]:
    """The grid of settings each peer is run at (chosen to span ~1.1x to ~4x where the peer can).

    Models cached per block (Flux) get :func:`block_level_settings` (``mag_ratios``: MagCache's calibrated
    ratios for this step count; without them MagCache is left out)."""
    n = int(num_inference_steps)
    if _adapter(model).branches(model) == [BLOCK_UNIT]:
        return block_level_settings(model, n, mag_ratios)
    has_cross = "attn2" in _adapter(model).branches(model)
    warm = max(1, n // 10)
    out = [PeerSetting("fbc", dict(threshold=t)) for t in (0.05, 0.1, 0.2, 0.3, 0.5, 0.8)]
    for skip, rng in ((2, (100, 800)), (2, (-1, 1001)), (3, (-1, 1001)), (5, (-1, 1001))):
        out.append(PeerSetting("pab", dict(skip=skip, timestep_range=rng, cross_skip=2 * skip if has_cross else None)))
    for interval, order in ((2, 1), (3, 1), (3, 2), (4, 1), (5, 1), (5, 2), (6, 1)):
        out.append(PeerSetting("taylorseer", dict(interval=interval, order=order, warmup=warm)))
    for fn, thresholds in ((1, (0.1, 0.2, 0.4)), (2, (0.1, 0.2, 0.4)), (4, (0.05, 0.1, 0.2, 0.4, 0.8))):
        for t in thresholds:
            out.append(PeerSetting("dbcache", dict(Fn=fn, Bn=0, threshold=t, warmup=warm)))
    return out


def block_level_settings(model, num_inference_steps: int, mag_ratios=None) -> list[PeerSetting]:
    """The grid for a model cached per block (Flux): FirstBlockCache; TaylorSeer on diffusers' default targets
    (attention) and on whole blocks; MagCache with ratios calibrated on the model; cache-dit DBCache with the
    first 1 and the first 4 blocks always computed, TaylorSeer calibrator off and on."""
    n = int(num_inference_steps)
    nb = _adapter(model).num_blocks(model)
    warm = max(1, n // 10)
    out = [PeerSetting("fbc", dict(threshold=t)) for t in (0.05, 0.1, 0.2, 0.3, 0.5, 0.8)]
    for interval in (3, 5):
        out.append(PeerSetting("taylorseer", dict(interval=interval, order=1, warmup=warm, targets="default")))
    # TaylorSeer on whole blocks at its best phase, order and interval: warm-up 3 (its default) and 10% of the steps
    for w in sorted({3, warm}):
        for interval, order in ((2, 1), (3, 1), (3, 2), (4, 1), (4, 2), (5, 1), (6, 1)):
            out.append(PeerSetting("taylorseer", dict(interval=interval, order=order, warmup=w, targets="blocks")))
    if mag_ratios is not None:
        for t, k in ((0.06, 3), (0.12, 3), (0.24, 4), (0.5, 6), (1.0, 8)):
            out.append(PeerSetting("magcache", dict(threshold=t, max_skip_steps=k, retention_ratio=0.2,
                                                    mag_ratios=[float(r) for r in mag_ratios])))
    for fn, thresholds in ((1, (0.1, 0.2, 0.4, 0.8)), (min(4, nb - 1), (0.2, 0.4))):
        for t in thresholds:
            for cal in (None, "taylorseer"):
                out.append(PeerSetting("dbcache", dict(Fn=fn, Bn=0, threshold=t, warmup=warm, calibrator=cal)))
    return out


def calibrate_magcache(model, num_inference_steps: int, generate) -> list[float]:
    """MagCache's magnitude ratios for ``model``, calibrated as diffusers documents it: a copy of the model with
    ``MagCacheConfig(calibrate=True)`` runs one generation (``generate(transformer)``, which must make exactly
    ``num_inference_steps`` transformer calls), nothing is skipped, and the ratios it prints are read back."""
    import contextlib
    import io
    import re

    from diffusers.hooks import MagCacheConfig, apply_mag_cache

    inner = copy.deepcopy(model).eval().requires_grad_(False)
    cfg = MagCacheConfig(calibrate=True, num_inference_steps=int(num_inference_steps))
    if hasattr(inner, "enable_cache"):
        inner.enable_cache(cfg)
    else:
        apply_mag_cache(inner, cfg)
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


__all__ = ["PEER_FAMILIES", "BLOCK_LEVEL_FAMILIES", "ALL_FAMILIES", "FAMILY_NAMES", "PeerSetting", "PeerTransformer", "PeerUnavailable",
           "block_level_settings", "calibrate_magcache", "default_settings", "make_peer"]
