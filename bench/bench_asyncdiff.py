"""AsyncDiff on CPU: two processes with one thread each against one process.

The bundled ``dit-digits`` (or ``--model flux-digits``) samples a CFG batch three ways: 1 process x 1 thread, 1
process x 2 threads, and ``parallel.AsyncDenoiser`` with 2 components over gloo on loopback (2 processes x 1
thread), interleaved round by round in the same two processes; medians over the rounds, PSNR of the AsyncDiff images
against one process. Also measured, for ``asyncdiff_cost_model.py``: every component's time, the step time, the
sampler's work per step and gloo all_gather latency and bandwidth. Notes: bench/NOTES.md ("AsyncDiff on CPU").

    python bench/bench_asyncdiff.py            # writes asyncdiff_cpu.{json,md}
    python bench/bench_asyncdiff.py --model flux-digits   # -> asyncdiff_cpu_flux-digits.{json,md}
    python bench/bench_asyncdiff.py --quick    # 10 steps, 2 rounds: a smoke run (no files written)
    python bench/bench_asyncdiff.py --quality  # image quality for 2-4 components and stride 2 (emulated)
"""
from __future__ import annotations

import datetime
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import harness
import torch

from l2c_kernels.models import classifier
from l2c_kernels.parallel.comm import local_init_method

NULL_CLASS = 1000


# ----------------------------------------------------------------------------- sampling
def sample(transformer, scheduler_config: dict, images: int, steps: int, cfg: float, seed: int = 0,
           step_times: list | None = None) -> torch.Tensor:
    """Class-conditional DDIM with classifier-free guidance (what ``DiTPipeline`` does), labels 0..9 cycled."""
    from l2c_kernels.sampling import make_scheduler

    sched = make_scheduler(scheduler_config, "ddim")
    sched.set_timesteps(steps)
    labels = torch.arange(images) % 10
    lab = torch.cat([labels, torch.full_like(labels, NULL_CLASS)])
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(images, 1, 16, 16, generator=g)
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


def _paired(times: dict, base: str, other: str) -> float:
    """Median over rounds of ``time[base] / time[other]`` (each round runs every configuration back to
    back, so a slow phase of a shared machine hits both sides of a ratio)."""
    return statistics.median(a / b for a, b in zip(times[base], times[other]))


def psnr(a: torch.Tensor, b: torch.Tensor, data_range: float = 2.0) -> float:
    from l2c_kernels import metrics

    return metrics.psnr(a.clamp(-1, 1).double(), b.clamp(-1, 1).double(), data_range)


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


# ----------------------------------------------------------------------------- measurements
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
    """gloo all_gather time per message size (median), and a least-squares fit t = latency + bytes / bandwidth."""
    import torch.distributed as dist

    pts = []
    for n in sizes:
        buf = torch.zeros(n, dtype=torch.uint8)
        out = [torch.empty_like(buf) for _ in range(dist.get_world_size())]
        times = []
        for i in range(repeats + 3):
            dist.barrier()
            t0 = time.perf_counter()
            dist.all_gather(out, buf)
            if i >= 3:
                times.append(time.perf_counter() - t0)
        pts.append((n, statistics.median(times)))
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    mx, my = statistics.mean(xs), statistics.mean(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    latency = max(my - slope * mx, min(ys))
    return dict(points=[dict(bytes=n, seconds=t) for n, t in pts], latency_s=latency,
                bandwidth_Bps=1.0 / slope if slope > 0 else float("inf"))


# ----------------------------------------------------------------------------- the two ranks
def rank_main(rank: int, world: int, init_method: str, args, outdir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=1800))
    from l2c_kernels import parallel

    w = Workload(args)
    model, cfg = w.model, w.cfg
    # dit-digits: timed on built-in-shaped inputs at construction; flux-digits: on the first call's own inputs
    ad = parallel.AsyncDenoiser(model, num_components=2, stride=1, warm_up=args.warm_up, timeout_s=600,
                                sample_inputs=_sample_inputs(args.images) if w.name == "dit-digits" else None)

    def solo(threads):
        """Rank 0 samples alone with ``threads`` threads; rank 1 waits."""
        out = dt = None
        if rank == 0:
            torch.set_num_threads(threads)
            out, dt = timed(lambda: w.sample(model))
            torch.set_num_threads(1)
        dist.barrier()
        return out, dt

    def together():
        dist.barrier()
        out, dt = timed(lambda: w.sample(ad))
        return out, max(_all(dt))

    # untimed first runs (allocator, lazy initialisation), then interleaved rounds
    two_threads = not args.skip_two_threads
    ref1, _ = solo(1)
    if two_threads:
        solo(2)
    asy, _ = together()
    for v in ad.timings.values():
        v.clear()
    times = {"1p1t": [], "1p2t": [], "2p1t": []} if two_threads else {"1p1t": [], "2p1t": []}
    out2 = None
    for _ in range(args.rounds):
        out1, dt = solo(1)
        times["1p1t"].append(dt)
        if two_threads:
            out2, dt = solo(2)
            times["1p2t"].append(dt)
        outa, dt = together()
        times["2p1t"].append(dt)
        assert torch.equal(outa, asy), "AsyncDiff images changed between rounds"
        if rank == 0:
            assert torch.equal(out1, ref1)

    # what the cost model needs
    per_rank_compute = _all(statistics.median(ad.timings["compute"]))
    per_rank_comm = _all(statistics.median(ad.timings["comm"]))
    step_times = []
    if rank == 0:
        w.sample(model, steps=min(args.steps, 10), step_times=step_times)
        comps = component_seconds(model, ad.component_ranges, w.call_args())
    dist.barrier()
    fit = allgather_fit()
    from l2c_kernels.parallel.comm import payload_bytes

    if rank == 0:
        res = dict(
            times_s={k: v for k, v in times.items()}, cfg=cfg, ranges=ad.component_ranges,
            split=ad.split.to_dict(), psnr_2p_vs_1p=psnr(asy, ref1),
            psnr_1p2t_vs_1p1t=psnr(out2, ref1) if out2 is not None else None,
            async_round_compute_s=per_rank_compute, async_round_comm_s=per_rank_comm,
            single_thread=comps, outside_transformer_s=statistics.median(s[1] for s in step_times),
            transformer_call_s=statistics.median(s[0] for s in step_times), allgather=fit,
            hidden_bytes=payload_bytes(ad._shapes["states"][0]), output_bytes=payload_bytes([ad._shapes["out"]]),
            state_shapes=[list(sh) for sh, _ in ad._shapes["states"][0]], loadavg=harness.load_average() or [])
        Path(outdir, "result.json").write_text(json.dumps(res))
    dist.barrier()
    dist.destroy_process_group()


def _all(x: float) -> list[float]:
    import torch.distributed as dist

    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, x)
    return out


class Workload:
    """The bundled model sampled by the benchmark and how: ``sample(transformer)`` -> images in [-1, 1]."""

    def __init__(self, args):
        from l2c_kernels import models

        self.name, self.args = args.model, args
        self.bundle = models.load(args.model)
        self.model = self.bundle.transformer
        self.cfg = args.cfg if args.cfg is not None else self.bundle.recommended_cfg

    def sample(self, transformer, steps: int | None = None, step_times: list | None = None) -> torch.Tensor:
        steps = steps or self.args.steps
        if self.name == "dit-digits":
            return sample(transformer, self.bundle.scheduler_config, self.args.images, steps, self.cfg,
                          step_times=step_times)

        tr = transformer if step_times is None else _StepTimer(transformer, step_times)
        from l2c_kernels import models

        return models.sample(self.bundle, labels=[i % 10 for i in range(self.args.images)], steps=steps,
                               cfg=self.cfg, seed=0, transformer=tr, progress=False)

    def call_args(self) -> dict:
        """The keyword arguments of one transformer call of a generation (its first)."""
        if self.name == "dit-digits":
            return _sample_inputs(self.args.images)
        rec = _StepTimer(self.model, [], record=True)
        try:
            self.sample(rec, steps=1)
        except _Recorded:
            pass
        return rec.recorded


class _Recorded(Exception):
    pass


class _StepTimer(torch.nn.Module):
    """Calls ``model``; appends (seconds in the call, seconds since the previous call returned) per call, or
    (``record``) keeps the first call's keyword arguments and stops the sampling."""

    def __init__(self, model, times: list, record: bool = False):
        super().__init__()
        self.model, self.times, self.record, self.recorded, self._last = model, times, record, None, None

    def reset(self):
        if hasattr(self.model, "reset"):
            self.model.reset()
        self._last = None

    def forward(self, **kw):
        if self.record:
            self.recorded = dict(kw)
            raise _Recorded()
        t0 = time.perf_counter()
        out = self.model(**kw)
        t1 = time.perf_counter()
        if self._last is not None:  # (this call, the sampler's work since the previous call)
            self.times.append((t1 - t0, t0 - self._last))
        self._last = t1
        return out


def _sample_inputs(images: int) -> dict:
    b = 2 * images
    return dict(hidden_states=torch.randn(b, 1, 16, 16, generator=torch.Generator().manual_seed(2)),
                timestep=torch.full((b,), 500), class_labels=torch.arange(b) % 10)


# ----------------------------------------------------------------------------- report
MODELS = {
    "dit-digits": dict(stem="asyncdiff_cpu", scheduler="DDIM",
                       model="dit-digits (bundled, trained): DiTTransformer2DModel, 12 blocks, hidden 128, 64 tokens",
                       transformer_input=lambda b: [b, 1, 16, 16]),
    "flux-digits": dict(stem="asyncdiff_cpu_flux-digits", scheduler="Euler flow matching",
                        model="flux-digits (bundled, trained): FluxTransformer2DModel, 2 double + 6 single blocks, "
                              "hidden 96, 64 image + 8 text tokens",
                        transformer_input=lambda b: [b, 64, 4]),
}


def write_report(res: dict, args, out: Path) -> dict:
    med = {k: statistics.median(v) for k, v in res["times_s"].items()}
    two = "1p2t" in med
    m = MODELS[args.model]
    report = dict(
        benchmark="AsyncDiff (l2c_kernels.parallel.AsyncDenoiser) on CPU", date=datetime.date.today().isoformat(),
        cpu=harness.machine()["cpu"], logical_cpus=os.cpu_count(), model=m["model"], dtype="float32",
        images=args.images, transformer_batch=2 * args.images,
        shapes=dict(latents=[args.images, 1, 16, 16], transformer_input=m["transformer_input"](2 * args.images),
                    boundary_state=res.get("state_shapes")),
        loadavg_1_5_15_at_end=res.get("loadavg"),
        steps=args.steps, scheduler=m["scheduler"], cfg=res["cfg"], warm_up=args.warm_up, num_components=2, stride=1,
        rounds=args.rounds, component_ranges=res["ranges"], split=res["split"],
        median_s=med, all_s=res["times_s"],
        speedup_2p_vs_1p1t=med["1p1t"] / med["2p1t"], speedup_2p_vs_1p2t=med["1p2t"] / med["2p1t"] if two else None,
        speedup_1p2t_vs_1p1t=med["1p1t"] / med["1p2t"] if two else None,
        # the same ratios round by round (each round runs the three back to back), median over rounds:
        # robust to the machine's speed drifting between rounds
        paired_speedup_2p_vs_1p1t=_paired(res["times_s"], "1p1t", "2p1t"),
        paired_speedup_2p_vs_1p2t=_paired(res["times_s"], "1p2t", "2p1t") if two else None,
        psnr_db_2p_vs_single_process=res["psnr_2p_vs_1p"], psnr_db_1p2t_vs_1p1t=res["psnr_1p2t_vs_1p1t"],
        measured=dict(single_thread=res["single_thread"], async_round_compute_s=res["async_round_compute_s"],
                      async_round_comm_s=res["async_round_comm_s"], transformer_call_s=res["transformer_call_s"],
                      outside_transformer_s=res["outside_transformer_s"], allgather_gloo_loopback=res["allgather"],
                      hidden_bytes=res["hidden_bytes"], output_bytes=res["output_bytes"]),
        command=harness.command())
    st, ag, ranges = res["single_thread"], res["allgather"], res["ranges"]
    md = [f"# AsyncDiff on CPU, {args.model}", "",
          f"{harness.describe(harness.meta())}, float32. Model: {report['model']}. {args.images} images per generation "
          f"(transformer batch {2 * args.images} with CFG {res['cfg']:g}), {args.steps} {m['scheduler']} steps; "
          f"AsyncDiff with 2 components (blocks {ranges[0]} and {ranges[1]}), stride 1, {args.warm_up} warm-up steps, "
          f"gloo on loopback. Medians of {args.rounds} interleaved rounds; per-round ratios: the configurations run "
          "back to back in every round, median over rounds of the ratio.", ""]
    rows = [["1 process x 1 thread", f"{med['1p1t']:.2f}", "1.00x", "1.00x", "reference"]]
    if two:
        rows.append(["1 process x 2 threads", f"{med['1p2t']:.2f}", f"{med['1p1t'] / med['1p2t']:.2f}x",
                     f"{_paired(res['times_s'], '1p1t', '1p2t'):.2f}x", _db(res["psnr_1p2t_vs_1p1t"])])
    rows.append(["2 processes x 1 thread (AsyncDiff)", f"{med['2p1t']:.2f}", f"**{med['1p1t'] / med['2p1t']:.2f}x**",
                 f"**{report['paired_speedup_2p_vs_1p1t']:.2f}x**", _db(res["psnr_2p_vs_1p"])])
    md += harness.table(["configuration", "seconds per generation (median)", "speedup vs 1 process x 1 thread: ratio "
                         "of medians", "median of per-round ratios", "PSNR vs 1 process"], rows,
                        ["---"] + ["---:"] * 4) + [""]
    md += [f"AsyncDiff against one process with both cores: **{med['1p2t'] / med['2p1t']:.2f}x** (per round "
           f"{report['paired_speedup_2p_vs_1p2t']:.2f}x)." if two else "1 process x 2 threads was left out "
           "(`--skip-two-threads`): with the cores busy it measures thread oversubscription.", "",
           f"The asynchronous rounds' collective moves {res['hidden_bytes'] / 1e6:.2f} MB per rank (the state "
           f"{res.get('state_shapes')}; gloo all_gather: latency {ag['latency_s'] * 1e6:.0f} us, "
           f"{ag['bandwidth_Bps'] / 1e9:.2f} GB/s on loopback).", ""]
    md += harness.table(["measured (one thread)", "ms"], [["whole transformer call", f"{st['full_s'] * 1e3:.2f}"]] + [
        [f"component {i} (blocks {a}-{b - 1}{', embedding' if i == 0 else ''}"
         f"{', final layer' if i == len(ranges) - 1 else ''})", f"{c * 1e3:.2f}"]
        for i, ((a, b), c) in enumerate(zip(ranges, st["component_s"]))] + [
        [f"asynchronous round compute, rank {r} (median)", f"{c * 1e3:.2f}"]
        for r, c in enumerate(res["async_round_compute_s"])] + [
        [f"asynchronous round collective, rank {r} (median, includes waiting)", f"{c * 1e3:.2f}"]
        for r, c in enumerate(res["async_round_comm_s"])] + [
        ["sampler work per step outside the transformer", f"{res['outside_transformer_s'] * 1e3:.2f}"]],
        ["---", "---:"])
    harness.write_result(out, m["stem"], report, "\n".join(md))
    return report


def quality_sweep(args, out: Path | None) -> list[dict]:
    """PSNR / SSIM against the single-process images and the digit classifier's accuracy, for several numbers of
    components, strides and warm-ups; the asynchronous schedule of all ranks is computed in one process
    (``emulate=True``: the same images as separate processes)."""
    from l2c_kernels import metrics, models, parallel

    torch.set_num_threads(os.cpu_count() or 1)
    bundle = models.load("dit-digits")
    cfg = args.cfg if args.cfg is not None else bundle.recommended_cfg
    labels = [i % 10 for i in range(40)]

    def row(steps, setting, img, ref, **kw):
        return dict(steps=steps, setting=setting, **kw, psnr_db=metrics.psnr(img, ref), ssim=metrics.ssim(img, ref),
                    accuracy=classifier.class_accuracy(img, labels))
    rows = []
    for steps in (20, 50):
        ts = models.timesteps_for(bundle, steps)
        ref = models.sample(bundle, labels=labels, steps=steps, cfg=cfg, seed=0, progress=False)
        other = models.sample(bundle, labels=labels, steps=steps, cfg=cfg, seed=1, progress=False)
        rows += [row(steps, "single process (reference)", ref, ref),
                 row(steps, "another seed (unrelated images)", other, ref)]
        for n, stride in ((2, 1), (3, 1), (4, 1), (2, 2)):
            for warm in (3, 5):
                ad = parallel.AsyncDenoiser(bundle.transformer, num_components=n, stride=stride, warm_up=warm,
                                            emulate=True, balance="uniform", timesteps=ts)
                img = models.sample(bundle, labels=labels, steps=steps, cfg=cfg, seed=0, progress=False, transformer=ad)
                rows.append(row(steps, f"{n} components, stride {stride}, warm-up {warm} ({n + stride - 1} processes)",
                                img, ref, num_components=n, stride=stride, warm_up=warm))
                harness.log(rows[-1])
    if out is not None:
        res = dict(model="dit-digits", images=len(labels), labels="0-9 cycled", cfg=cfg, scheduler="DDIM",
                   dtype="float32", rows=rows)
        md = ["# AsyncDiff image quality", "",
              f"{harness.describe(harness.meta())}. dit-digits, {len(labels)} images (labels 0-9 cycled), cfg {cfg:g}, "
              "DDIM, same noise. PSNR and SSIM against the single-process images (images in [-1, 1]); accuracy: the "
              "bundled digit classifier reads the digit that was asked for.", ""]
        md += harness.table(["steps", "setting", "PSNR", "SSIM", "class accuracy"],
                            [[r["steps"], r["setting"], _db(r["psnr_db"]), f"{r['ssim']:.3f}", f"{r['accuracy']:.3f}"]
                             for r in rows], ["---:", "---", "---:", "---:", "---:"])
        harness.write_result(out, "asyncdiff_quality", res, "\n".join(md))
    return rows


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
    ap.add_argument("--quality", action="store_true",
                    help="instead of timing: image quality for 2-4 components and stride 2 (one process)")
    args = harness.parse(ap, argv)
    if args.quick:
        args.steps, args.rounds = 10, 2
    if args.quality:
        if args.model != "dit-digits":
            ap.error("--quality sweeps dit-digits only")
        quality_sweep(args, Path(args.out))
        return

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
