"""AsyncDiff on CPU: two processes with one thread each against one process.

The bundled ``dit-digits`` (or ``--model flux-digits``) samples a CFG batch three ways: 1 process x 1 thread, 1
process x 2 threads, and ``parallel.AsyncDenoiser`` with 2 components over gloo on loopback (2 processes x 1
thread), interleaved round by round in the same two processes; medians over the rounds, PSNR of the AsyncDiff images
against one process. Also measured, for ``asyncdiff_cost_model.py``: every component's time, the step time, the
sampler's work per step and gloo all_gather latency and bandwidth. Notes: bench/NOTES.md ("AsyncDiff on CPU").

    python bench/bench_asyncdiff.py            # writes asyncdiff_cpu.{json,md}
    python bench/bench_asyncdiff.py --model flux-digits   # -> asyncdiff_cpu_flux-digits.{json,md}
    python bench/bench_asyncdiff.py --quick    # 10 steps, 2 rounds: a smoke run (no files written)
"""
from __future__ import annotations

import datetime
import json
import statistics
import tempfile
import time
from pathlib import Path

import harness
import torch

from l2c_kernels.parallel.comm import local_init_method

MODELS = {  # what the report says of each model
    "dit-digits": dict(stem="asyncdiff_cpu", scheduler="DDIM",
                       model="dit-digits (bundled, trained): DiTTransformer2DModel, 12 blocks, hidden 128, 64 tokens",
                       transformer_input=lambda b: [b, 1, 16, 16]),
    "flux-digits": dict(stem="asyncdiff_cpu_flux-digits", scheduler="Euler flow matching",
                        model="flux-digits (bundled, trained): FluxTransformer2DModel, 2 double + 6 single blocks, "
                              "hidden 96, 64 image + 8 text tokens",
                        transformer_input=lambda b: [b, 64, 4]),
}


def sample(transformer, scheduler_config: dict, images: int, steps: int, cfg: float,
           step_times: list | None = None) -> torch.Tensor:
    """Class-conditional DDIM with classifier-free guidance (what ``DiTPipeline`` does), labels 0..9 cycled;
    ``step_times`` gets (seconds in the transformer, seconds of the sampler's step) per step."""
    from l2c_kernels.sampling import make_scheduler

    sched = make_scheduler(scheduler_config, "ddim")
    sched.set_timesteps(steps)
    labels = torch.arange(images) % 10
    lab = torch.cat([labels, torch.full_like(labels, 1000)])  # 1000: the null class
    x = torch.randn(images, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for t in sched.timesteps:
            t0 = time.perf_counter()
            inp = torch.cat([x, x])
            eps = transformer(inp, timestep=t.expand(inp.shape[0]), class_labels=lab).sample
            t1 = time.perf_counter()
            c, u = eps.chunk(2)
            x = sched.step(u + cfg * (c - u), t, x).prev_sample
            if step_times is not None:
                step_times.append((t1 - t0, time.perf_counter() - t1))
    return x


def _sample_inputs(images: int) -> dict:
    """dit-digits' call arguments of a CFG batch for ``images`` images (built-in shapes, fixed values)."""
    b = 2 * images
    return dict(hidden_states=torch.randn(b, 1, 16, 16, generator=torch.Generator().manual_seed(2)),
                timestep=torch.full((b,), 500), class_labels=torch.arange(b) % 10)


class Workload:
    """The bundled model sampled by the benchmark and how: ``sample(transformer)`` -> images in [-1, 1]."""

    def __init__(self, args):
        from l2c_kernels import models

        self.name, self.args, self.bundle = args.model, args, models.load(args.model)
        self.model = self.bundle.transformer
        self.cfg = args.cfg if args.cfg is not None else self.bundle.recommended_cfg

    def sample(self, transformer, steps: int | None = None, step_times: list | None = None) -> torch.Tensor:
        from l2c_kernels import models

        steps = steps or self.args.steps
        if self.name == "dit-digits":
            return sample(transformer, self.bundle.scheduler_config, self.args.images, steps, self.cfg, step_times)
        tr = transformer if step_times is None else _StepTimer(transformer, step_times)
        return models.sample(self.bundle, labels=[i % 10 for i in range(self.args.images)], steps=steps,
                             cfg=self.cfg, seed=0, transformer=tr, progress=False)

    def call_args(self) -> dict:
        """The keyword arguments of one transformer call of a generation (flux-digits: its first)."""
        if self.name == "dit-digits":
            return _sample_inputs(self.args.images)
        rec = _StepTimer(self.model, [])
        self.sample(rec, steps=1)
        return rec.first


class _StepTimer(torch.nn.Module):
    """Calls ``model``; appends (seconds in the call, seconds since the previous call returned) per call after the
    first to ``times``; keeps the first call's keyword arguments in ``first``."""

    def __init__(self, model, times: list):
        super().__init__()
        self.model, self.times, self.first, self._last = model, times, None, None

    def reset(self):
        if hasattr(self.model, "reset"):
            self.model.reset()
        self._last = None

    def forward(self, **kw):
        if self.first is None:
            self.first = dict(kw)
        t0 = time.perf_counter()
        out = self.model(**kw)
        t1 = time.perf_counter()
        if self._last is not None:  # (this call, the sampler's work since the previous call)
            self.times.append((t1 - t0, t0 - self._last))
        self._last = t1
        return out


def psnr(a: torch.Tensor, b: torch.Tensor, data_range: float = 2.0) -> float:
    from l2c_kernels import metrics

    return metrics.psnr(a.clamp(-1, 1).double(), b.clamp(-1, 1).double(), data_range)


def _paired(times: dict, base: str, other: str) -> float:
    """Median over rounds of ``time[base] / time[other]`` (each round runs every configuration back to
    back, so a slow phase of a shared machine hits both sides of a ratio)."""
    return statistics.median(a / b for a, b in zip(times[base], times[other]))


def component_seconds(model, ranges, args: dict, repeats: int = 5) -> dict:
    """One thread: fastest-of-``repeats`` time of every component and of the whole model on one call's
    arguments ``args`` (a CFG batch), interleaved."""
    from l2c_kernels.parallel.runners import ModelRunner

    runner = ModelRunner(model)
    caps = [a for a, _ in ranges[1:]]  # the state entering every component but the first
    with torch.no_grad():
        _, captured = runner.full(args, caps, 0)
        inputs = [None] + [captured[c] for c in caps]
        t = harness.interleave({"full": lambda: model(**args), **{
            i: (lambda i=i, a=a, e=e: runner.component(args, a, e, inputs[i], 0)) for i, (a, e) in enumerate(ranges)}},
            repeats, warmup=0)
    return dict(full_s=min(t["full"]), component_s=[min(t[i]) for i in range(len(ranges))])


def allgather_fit(sizes=(8, 4096, 65536, 262144, 1048576, 4194304), repeats: int = 30) -> dict:
    """gloo all_gather time per message size (median of ``repeats`` after 3 untimed), and a least-squares fit
    t = latency + bytes / bandwidth."""
    import torch.distributed as dist

    pts = []
    for n in sizes:
        buf = torch.zeros(n, dtype=torch.uint8)
        out = [torch.empty_like(buf) for _ in range(dist.get_world_size())]
        times = []
        for _ in range(repeats + 3):
            dist.barrier()
            t0 = time.perf_counter()
            dist.all_gather(out, buf)
            times.append(time.perf_counter() - t0)
        pts.append((n, statistics.median(times[3:])))
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    mx, my = statistics.mean(xs), statistics.mean(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return dict(points=[dict(bytes=n, seconds=t) for n, t in pts], latency_s=max(my - slope * mx, min(ys)),
                bandwidth_Bps=1.0 / slope if slope > 0 else float("inf"))


def rank_main(rank: int, world: int, init_method: str, args, outdir: str) -> None:
    import torch.distributed as dist

    from l2c_kernels import parallel
    from l2c_kernels.parallel.comm import payload_bytes

    def gather(x: float) -> list:
        out = [None] * world
        dist.all_gather_object(out, x)
        return out

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=1800))
    w = Workload(args)
    model = w.model
    # dit-digits: timed on built-in-shaped inputs at construction; flux-digits: on the first call's own inputs
    ad = parallel.AsyncDenoiser(model, num_components=2, stride=1, warm_up=args.warm_up, timeout_s=600,
                                sample_inputs=_sample_inputs(args.images) if w.name == "dit-digits" else None)

    def solo(threads):
        """Rank 0 samples alone with ``threads`` threads; rank 1 waits."""
        out = dt = None
        if rank == 0:
            torch.set_num_threads(threads)
            t0 = time.perf_counter()
            out = w.sample(model)
            dt = time.perf_counter() - t0
            torch.set_num_threads(1)
        dist.barrier()
        return out, dt

    def together():
        dist.barrier()
        t0 = time.perf_counter()
        out = w.sample(ad)
        return out, max(gather(time.perf_counter() - t0))

    runs = {"1p1t": lambda: solo(1), "1p2t": lambda: solo(2), "2p1t": together}
    if args.skip_two_threads:
        del runs["1p2t"]
    first = {k: run()[0] for k, run in runs.items()}  # untimed first runs (allocator, lazy initialisation)
    for v in ad.timings.values():
        v.clear()
    times, last = {k: [] for k in runs}, {}
    for _ in range(args.rounds):  # interleaved rounds, in this order
        for k, run in runs.items():
            last[k], dt = run()
            times[k].append(dt)
        assert torch.equal(last["2p1t"], first["2p1t"]), "AsyncDiff images changed between rounds"
        if rank == 0:
            assert torch.equal(last["1p1t"], first["1p1t"])

    # what the cost model needs
    compute, comm = (gather(statistics.median(ad.timings[k])) for k in ("compute", "comm"))
    step_times = []
    if rank == 0:
        w.sample(model, steps=min(args.steps, 10), step_times=step_times)
        comps = component_seconds(model, ad.component_ranges, w.call_args())
    dist.barrier()
    fit = allgather_fit()
    if rank == 0:
        ref, out2 = first["1p1t"], last.get("1p2t")
        res = dict(
            times_s=times, cfg=w.cfg, ranges=ad.component_ranges, split=ad.split.to_dict(),
            psnr_2p_vs_1p=psnr(first["2p1t"], ref), psnr_1p2t_vs_1p1t=psnr(out2, ref) if out2 is not None else None,
            state_shapes=[list(sh) for sh, _ in ad._shapes["states"][0]], loadavg=harness.load_average() or [],
            measured=dict(single_thread=comps, async_round_compute_s=compute, async_round_comm_s=comm,
                          transformer_call_s=statistics.median(s[0] for s in step_times),
                          outside_transformer_s=statistics.median(s[1] for s in step_times),
                          allgather_gloo_loopback=fit, hidden_bytes=payload_bytes(ad._shapes["states"][0]),
                          output_bytes=payload_bytes([ad._shapes["out"]])))
        Path(outdir, "result.json").write_text(json.dumps(res))
    dist.barrier()
    dist.destroy_process_group()


def write_report(res: dict, args, out: Path) -> dict:
    times, ms = res["times_s"], res["measured"]
    med = {k: statistics.median(v) for k, v in times.items()}
    two = "1p2t" in med
    m = MODELS[args.model]
    report = dict(
        benchmark="AsyncDiff (l2c_kernels.parallel.AsyncDenoiser) on CPU", model=m["model"], dtype="float32",
        images=args.images, transformer_batch=2 * args.images,  # date, machine, command: the result's meta
        shapes=dict(latents=[args.images, 1, 16, 16], transformer_input=m["transformer_input"](2 * args.images),
                    boundary_state=res.get("state_shapes")),
        loadavg_1_5_15_at_end=res.get("loadavg"),
        steps=args.steps, scheduler=m["scheduler"], cfg=res["cfg"], warm_up=args.warm_up, num_components=2, stride=1,
        rounds=args.rounds, component_ranges=res["ranges"], split=res["split"],
        median_s=med, all_s=times,
        speedup_2p_vs_1p1t=med["1p1t"] / med["2p1t"], speedup_2p_vs_1p2t=med["1p2t"] / med["2p1t"] if two else None,
        speedup_1p2t_vs_1p1t=med["1p1t"] / med["1p2t"] if two else None,
        # the same ratios round by round (robust to the machine's speed drifting between rounds)
        paired_speedup_2p_vs_1p1t=_paired(times, "1p1t", "2p1t"),
        paired_speedup_2p_vs_1p2t=_paired(times, "1p2t", "2p1t") if two else None,
        psnr_db_2p_vs_single_process=res["psnr_2p_vs_1p"], psnr_db_1p2t_vs_1p1t=res["psnr_1p2t_vs_1p1t"],
        measured=ms)
    st, ag, ranges = ms["single_thread"], ms["allgather_gloo_loopback"], res["ranges"]
    md = [f"# AsyncDiff on CPU, {args.model}", "",
          f"{harness.describe(harness.meta())}, float32. Model: {report['model']}. {args.images} images per generation "
          f"(transformer batch {2 * args.images} with CFG {res['cfg']:g}), {args.steps} {m['scheduler']} steps; "
          f"AsyncDiff with 2 components (blocks {ranges[0]} and {ranges[1]}), stride 1, {args.warm_up} warm-up steps, "
          f"gloo on loopback. Medians of {args.rounds} interleaved rounds; per-round ratios: the configurations run "
          "back to back in every round, median over rounds of the ratio.", ""]
    rows = [["1 process x 1 thread", f"{med['1p1t']:.2f}", "1.00x", "1.00x", "reference"]]
    if two:
        rows.append(["1 process x 2 threads", f"{med['1p2t']:.2f}", f"{med['1p1t'] / med['1p2t']:.2f}x",
                     f"{_paired(times, '1p1t', '1p2t'):.2f}x", _db(res["psnr_1p2t_vs_1p1t"])])
    rows.append(["2 processes x 1 thread (AsyncDiff)", f"{med['2p1t']:.2f}", f"**{med['1p1t'] / med['2p1t']:.2f}x**",
                 f"**{report['paired_speedup_2p_vs_1p1t']:.2f}x**", _db(res["psnr_2p_vs_1p"])])
    md += harness.table(["configuration", "seconds per generation (median)", "speedup vs 1 process x 1 thread: ratio "
                         "of medians", "median of per-round ratios", "PSNR vs 1 process"], rows,
                        ["---"] + ["---:"] * 4) + [""]
    md += [f"AsyncDiff against one process with both cores: **{med['1p2t'] / med['2p1t']:.2f}x** (per round "
           f"{report['paired_speedup_2p_vs_1p2t']:.2f}x)." if two else "1 process x 2 threads was left out "
           "(`--skip-two-threads`): with the cores busy it measures thread oversubscription.", "",
           f"The asynchronous rounds' collective moves {ms['hidden_bytes'] / 1e6:.2f} MB per rank (the state "
           f"{res.get('state_shapes')}; gloo all_gather: latency {ag['latency_s'] * 1e6:.0f} us, "
           f"{ag['bandwidth_Bps'] / 1e9:.2f} GB/s on loopback).", ""]
    ms_rows = [("whole transformer call", st["full_s"])] + [
        (f"component {i} (blocks {a}-{b - 1}{', embedding' if i == 0 else ''}"
         f"{', final layer' if i == len(ranges) - 1 else ''})", c)
        for i, ((a, b), c) in enumerate(zip(ranges, st["component_s"]))]
    ms_rows += [(f"asynchronous round compute, rank {r} (median)", c)
                for r, c in enumerate(ms["async_round_compute_s"])]
    ms_rows += [(f"asynchronous round collective, rank {r} (median, includes waiting)", c)
                for r, c in enumerate(ms["async_round_comm_s"])]
    ms_rows.append(("sampler work per step outside the transformer", ms["outside_transformer_s"]))
    md += harness.table(["measured (one thread)", "ms"], [[k, f"{s * 1e3:.2f}"] for k, s in ms_rows], ["---", "---:"])
    harness.write_result(out, m["stem"], report, "\n".join(md))
    return report


def _db(x: float) -> str:
    return "identical" if x == float("inf") else f"{x:.1f} dB"


def main(argv=None):
    ap = harness.parser(__doc__, threads=None)
    ap.add_argument("--model", choices=sorted(MODELS), default="dit-digits")
    ap.add_argument("--images", type=int, default=16, help="images per generation (transformer batch is twice this)")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--warm-up", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--cfg", type=float, default=None, help="guidance scale (default: the model's recommended)")
    ap.add_argument("--skip-two-threads", action="store_true",
                    help="leave out 1 process x 2 threads (on a machine whose cores are busy it measures the "
                         "oversubscription, not the model)")
    ap.add_argument("--quick", action="store_true", help="10 steps, 2 rounds, print only")
    args = harness.parse(ap, argv)
    if args.quick:
        args.steps, args.rounds = 10, 2
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as outdir:
        mp.start_processes(rank_main, args=(2, local_init_method(outdir), args, outdir), nprocs=2, start_method="spawn")
        res = json.loads(Path(outdir, "result.json").read_text())
    med = {k: statistics.median(v) for k, v in res["times_s"].items()}
    vs2 = f"; vs 1 process x 2 threads: {med['1p2t'] / med['2p1t']:.2f}x" if "1p2t" in med else ""
    print(f"2 processes x 1 thread vs 1 process x 1 thread: {med['1p1t'] / med['2p1t']:.2f}x{vs2}; "
          f"PSNR {res['psnr_2p_vs_1p']:.1f} dB; medians {med}")
    if not args.quick:
        write_report(res, args, Path(args.out))
        print(f"wrote {args.out}/{MODELS[args.model]['stem']}.json and .md")


if __name__ == "__main__":
    main()
