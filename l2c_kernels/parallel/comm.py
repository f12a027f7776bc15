"""Collectives for AsyncDenoiser: process-group setup, timed all_gather, start-up agreement checks.

Every collective is issued asynchronously and waited on with a timeout, so a rank that exits,
crashes or hangs makes the others raise :class:`AsyncDiffError` within ``timeout_s`` instead of
blocking forever. Messages carry a small header (generation, step, timestep, a checksum of the
latents) that every rank compares, so ranks that drift apart (different seeds, schedulers or
step counts) fail with a clear error rather than silently producing different images.
"""
from __future__ import annotations

import datetime
import os
import zlib
from typing import Sequence

import torch
import torch.distributed as dist


class AsyncDiffError(RuntimeError):
    """A collective failed or timed out, or the ranks disagree."""


class ConfigMismatchError(AsyncDiffError):
    """The ranks were started with different AsyncDenoiser settings or models."""


def world_from_env() -> int:
    """The world size torchrun (or another launcher) announces, 1 when there is none."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def ensure_process_group(device: torch.device, timeout_s: float, backend: str | None = None) -> bool:
    """Initialise the default process group from the launcher's environment when there is one.

    Returns True if a process group is (now) initialised. Uses NCCL for CUDA models and gloo
    otherwise, with ``timeout_s`` as the process group's timeout.
    """
    if not dist.is_available():
        return False
    if dist.is_initialized():
        return True
    if world_from_env() <= 1:
        return False
    if backend is None:
        backend = "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl" and "LOCAL_RANK" in os.environ:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return True


def local_init_method(directory) -> str:
    """The rendezvous of a process group spawned on this host: a file in ``directory`` (an empty folder the ranks
    share, e.g. a temporary one). No TCP port is picked beforehand, so no other process can take it between the
    pick and the bind."""
    import pathlib

    return (pathlib.Path(directory).resolve() / "process_group_rendezvous").as_uri()


def crc(text: str) -> int:
    """A hash of ``text`` that is the same in every process (Python's ``hash`` is salted)."""
    return zlib.crc32(text.encode())


class Comm:
    """Timed collectives on one process group."""

    HEADER = 6  # float64 words: generation, step, timestep, latent checksum, payload kind, reserved

    def __init__(self, group=None, timeout_s: float = 60.0, device: torch.device | str = "cpu"):
        self.group = group
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        self.backend = str(dist.get_backend(group))
        self.timeout = datetime.timedelta(seconds=float(timeout_s))
        self.timeout_s = float(timeout_s)
        self.seconds = 0.0  # time spent in collectives (including waiting for slower ranks)
        self.calls = 0
        device = torch.device(device)
        #: where message buffers live: the model's GPU for NCCL, host memory for gloo
        if "nccl" in self.backend and device.type == "cuda":
            self.device = device
        elif "gloo" in self.backend or device.type == "cpu" and "nccl" not in self.backend:
            self.device = torch.device("cpu")
        elif device.type == "cpu":
            raise ValueError(f"the process group's backend is {self.backend!r}, which cannot move host tensors; "
                             f"use gloo for a model on the CPU")
        else:
            self.device = device

    def _wait(self, work, what: str) -> None:
        try:
            ok = work.wait(timeout=self.timeout)
        except Exception as exc:  # gloo/NCCL raise RuntimeError (or DistBackendError) on peer loss or timeout
            raise AsyncDiffError(
                f"rank {self.rank}/{self.world}: {what} failed: {type(exc).__name__}: {str(exc).strip()[:400]}. "
                f"Another rank probably exited, crashed or stopped calling the model (timeout_s={self.timeout_s:g}); "
                f"the process group cannot be used any more.") from exc
        if ok is False:
            raise AsyncDiffError(f"rank {self.rank}/{self.world}: {what} timed out after {self.timeout_s:g} s; "
                                 f"another rank probably hangs or exited")

    def all_gather(self, t: torch.Tensor, what: str) -> list[torch.Tensor]:
        import time

        dev = t.device
        src = t.to(self.device).contiguous()
        out = [torch.empty_like(src) for _ in range(self.world)]
        t0 = time.perf_counter()
        work = dist.all_gather(out, src, group=self.group, async_op=True)
        self._wait(work, what)
        self.seconds += time.perf_counter() - t0
        self.calls += 1
        return [o.to(dev) for o in out] if src.device != dev else out

    # ---------------------------------------------------------------- start-up agreement
    def check_agreement(self, fields: dict[str, int | float], what: str = "start-up configuration check") -> None:
        """All ranks must pass identical ``fields``; raises ConfigMismatchError naming the fields that differ."""
        names = list(fields)
        local = torch.tensor([float(fields[k]) for k in names], dtype=torch.float64)
        # the number of fields must agree before the values can be gathered
        n = self.all_gather(torch.tensor([len(names)], dtype=torch.float64), what)
        if len({int(x.item()) for x in n}) != 1:
            raise ConfigMismatchError(f"rank {self.rank}: ranks run different versions of l2c_kernels.parallel "
                                      f"({[int(x.item()) for x in n]} configuration fields)")
        allv = self.all_gather(local, what)
        bad = [k for i, k in enumerate(names) if len({float(v[i]) for v in allv}) != 1]
        if bad:
            rows = "; ".join(f"{k}: " + ", ".join(f"rank {r}={_fmt(v[names.index(k)])}" for r, v in enumerate(allv))
                             for k in bad)
            raise ConfigMismatchError(f"rank {self.rank}: the ranks disagree on {', '.join(bad)} ({rows}). Start every "
                                      f"rank with the same model, AsyncDenoiser arguments and number of steps.")

    def mean(self, values: Sequence[float], what: str) -> list[float]:
        """Element-wise mean over the ranks (identical result on every rank)."""
        allv = self.all_gather(torch.tensor(list(values), dtype=torch.float64), what)
        stacked = torch.stack([v.cpu() for v in allv])
        return [float(x) for x in stacked.mean(0)]


def _fmt(v) -> str:
    v = float(v)
    return str(int(v)) if v.is_integer() else f"{v:g}"


# ------------------------------------------------------------------------ message packing
def pack(header: torch.Tensor, payload, payload_bytes: int) -> torch.Tensor:
    """One uint8 buffer: ``header`` (float64) then the bytes of ``payload`` (a tensor, or a sequence of tensors
    laid end to end), padded to ``payload_bytes``."""
    hb = header.to(torch.float64).reshape(-1)
    parts = [] if payload is None else [payload] if isinstance(payload, torch.Tensor) else list(payload)
    dev = parts[0].device if parts else hb.device
    buf = torch.zeros(hb.numel() * 8 + payload_bytes, dtype=torch.uint8, device=dev)
    buf[: hb.numel() * 8].copy_(hb.to(dev).view(torch.uint8))
    pos = hb.numel() * 8
    for p in parts:
        raw = p.detach().contiguous().reshape(-1).view(torch.uint8)
        if pos + raw.numel() > buf.numel():
            raise ValueError("payload larger than the message size")
        buf[pos: pos + raw.numel()].copy_(raw)
        pos += raw.numel()
    return buf


def unpack_header(buf: torch.Tensor, words: int) -> torch.Tensor:
    return buf[: words * 8].view(torch.float64)


def unpack_payload(buf: torch.Tensor, words: int, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
    return unpack_payloads(buf, words, [(shape, dtype)])[0]


def unpack_payloads(buf: torch.Tensor, words: int, specs) -> list[torch.Tensor]:
    """The tensors :func:`pack` laid end to end, given each one's ``(shape, dtype)``."""
    out, pos = [], words * 8
    for shape, dtype in specs:
        n = 1
        for s in shape:
            n *= int(s)
        nbytes = n * torch.empty((), dtype=dtype).element_size()
        out.append(buf[pos: pos + nbytes].view(dtype).view(tuple(shape)))
        pos += nbytes
    return out


def payload_bytes(specs) -> int:
    """Bytes of the tensors of ``specs`` (``(shape, dtype)`` each) laid end to end."""
    total = 0
    for shape, dtype in specs:
        n = 1
        for s in shape:
            n *= int(s)
        total += n * torch.empty((), dtype=dtype).element_size()
    return total
