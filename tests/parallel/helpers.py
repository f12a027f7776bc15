"""Helpers for the AsyncDenoiser tests: a DDIM loop, free loopback ports, spawned gloo ranks."""
from __future__ import annotations

import datetime
import os
import pickle
import tempfile
import time
import traceback
from pathlib import Path

import torch

from l2c_kernels.parallel.comm import local_init_method

NULL_CLASS = 1000


def ddim(scheduler_config: dict):
    from diffusers import DDIMScheduler

    return DDIMScheduler(**{k: v for k, v in scheduler_config.items() if k != "clip_sample_range"})


def ddim_sample(transformer, scheduler_config: dict, labels, steps: int, cfg: float = 1.5, seed: int = 0,
                size: int = 16, channels: int = 1, return_timesteps: bool = False):
    """Class-conditional DDIM sampling with classifier-free guidance (null class 1000), like DiTPipeline."""
    sched = ddim(scheduler_config)
    sched.set_timesteps(steps)
    labels = torch.as_tensor(labels)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(len(labels), channels, size, size, generator=g)
    lab = torch.cat([labels, torch.full_like(labels, NULL_CLASS)]) if cfg > 1 else labels
    with torch.no_grad():
        for t in sched.timesteps:
            inp = torch.cat([x, x]) if cfg > 1 else x
            eps = transformer(inp, timestep=t.expand(inp.shape[0]), class_labels=lab).sample
            if cfg > 1:
                c, u = eps.chunk(2)
                eps = u + cfg * (c - u)
            x = sched.step(eps, t, x).prev_sample
    if return_timesteps:
        return x, [int(t) for t in sched.timesteps]
    return x


def psnr(a: torch.Tensor, b: torch.Tensor, data_range: float = 2.0) -> float:
    """PSNR in dB of images in [-1, 1] (clamped)."""
    a, b = a.clamp(-1, 1).double(), b.clamp(-1, 1).double()
    mse = float(((a - b) ** 2).mean())
    return float("inf") if mse == 0 else 10 * torch.log10(torch.tensor(data_range ** 2 / mse)).item()


# ------------------------------------------------------------------------ spawned ranks
def _worker(rank: int, world: int, init_method: str, outdir: str, fn, args, pg_timeout_s: float):
    torch.set_num_threads(1)
    import torch.distributed as dist

    result = {}
    try:
        dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=pg_timeout_s))
        result = {"ok": True, "value": fn(rank, world, *args)}
    except BaseException as exc:  # report, then leave quickly
        result = {"ok": False, "type": type(exc).__name__, "message": str(exc), "trace": traceback.format_exc(),
                  "time": time.time()}
    with open(Path(outdir) / f"rank{rank}.pkl.tmp", "wb") as f:
        pickle.dump(result, f)
    os.replace(Path(outdir) / f"rank{rank}.pkl.tmp", Path(outdir) / f"rank{rank}.pkl")
    os._exit(0)  # no process-group teardown: a dead peer must not make the exit hang


def run_ranks(fn, world: int, *args, deadline_s: float = 90.0, pg_timeout_s: float = 60.0) -> dict[int, dict]:
    """Run ``fn(rank, world, *args)`` in ``world`` spawned processes joined by a gloo group on loopback.

    Returns ``{rank: {"ok": True, "value": ...}}`` or ``{"ok": False, "type", "message", "trace"}``
    (``{"ok": False, "type": "NoResult"}`` for a rank that exited without a result).
    """
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as outdir:
        ctx = mp.start_processes(_worker, args=(world, local_init_method(outdir), outdir, fn, args, pg_timeout_s),
                                 nprocs=world,
                                 start_method="spawn", join=False)
        end = time.time() + deadline_s
        procs = ctx.processes
        while time.time() < end and any(p.is_alive() for p in procs):
            time.sleep(0.05)
        for p in procs:
            if p.is_alive():
                p.kill()
            p.join(5)
        out = {}
        for r in range(world):
            f = Path(outdir) / f"rank{r}.pkl"
            out[r] = pickle.loads(f.read_bytes()) if f.exists() else {"ok": False, "type": "NoResult"}
        return out


def raise_failures(results: dict) -> None:
    bad = {r: v for r, v in results.items() if not v["ok"]}
    if bad:
        raise AssertionError("\n".join(f"rank {r}: {v.get('type')}: {v.get('trace', '')}" for r, v in bad.items()))
