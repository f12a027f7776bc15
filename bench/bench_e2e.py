"""End-to-end sampling latency: the original diffusers transformer, its ``torch.compile``, the dynamic caches
(diffusers FirstBlockCache, cache-dit DBCache, at their defaults) and ``compile_schedule`` at 0 / 25 / 50% of branch
FLOPs removed (CUDA graphs on a GPU), on a DiT-XL/2-shaped model with random weights, DiTPipeline's sampling loop
without the VAE (DDIM, CFG). Rounds interleaved (every runner once per batch size, in a new order each round); median
latency per image. bench/NOTES.md ("The GPU check").

    python bench/bench_e2e.py --device cuda --dtype bf16 --images 2,8 --steps 50 --out OUT
    python bench/bench_e2e.py --tiny            # CPU, 2-block model, 4 steps: checks the script runs
"""
from __future__ import annotations

import statistics
import subprocess

import harness
import torch
from bench_compile_schedule import uniform_branches

import l2c_kernels as l2c
from l2c_kernels import metrics

XL = dict(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28,
          sample_size=32, patch_size=2, num_embeds_ada_norm=1000, norm_type="ada_norm_zero")
TINY = dict(XL, num_attention_heads=2, attention_head_dim=16, num_layers=2, sample_size=8)
REMOVE = (0.0, 0.25, 0.5)  #: fractions of branch FLOPs our schedules remove (bench_compile_schedule.PATTERNS)
DTYPES = dict(fp32=torch.float32, bf16=torch.bfloat16, fp16=torch.float16)
PEERS = {"FirstBlockCache (default t=0.05)": ("fbc", dict(threshold=0.05)),
         "cache-dit DBCache (default F8B0 t=0.08, warm-up 8)": ("dbcache", dict(Fn=8, Bn=0, threshold=0.08, warmup=8))}
log = harness.log


@torch.no_grad()
def generate(fn, noise: torch.Tensor, labels: torch.Tensor, scheduler, steps: int, cfg: float = 4.0) -> torch.Tensor:
    """DiTPipeline's denoising loop (no VAE): CFG batch [cond; null], learned sigma dropped, DDIM."""
    scheduler.set_timesteps(steps)
    x = noise.clone()
    class_in = torch.cat([labels, torch.full_like(labels, 1000)])
    if hasattr(fn, "reset"):
        fn.reset()
    for t in scheduler.timesteps:
        xin = torch.cat([x, x])
        out = fn(xin, timestep=t.to(x.device).reshape(1).expand(xin.shape[0]), class_labels=class_in).sample
        cond, uncond = out[:, : x.shape[1]].chunk(2)
        x = scheduler.step(uncond + cfg * (cond - uncond), t, x).prev_sample
    return x


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR against ``b`` with ``b``'s range as the peak (latents of random weights have no fixed range)."""
    return metrics.psnr(a.float(), b.float(), float(b.float().max() - b.float().min()))


def build_runners(model, timesteps, args, device) -> tuple[dict, dict, dict]:
    """name -> callable module; name -> branch FLOPs removed (ours); name -> reason it is missing."""
    from peers import PeerSetting, PeerUnavailable, make_peer

    runners, removed, missing = {"diffusers eager": model}, {}, {}
    if args.compile:
        runners["torch.compile (original)"] = torch.compile(model, fullgraph=False, dynamic=False)
    for label, (kind, params) in PEERS.items():
        try:
            runners[label] = make_peer(model, PeerSetting(kind, params), args.steps)
        except PeerUnavailable as e:
            missing[label] = str(e)
            log(f"  {label}: unavailable ({e})")
    graphs = device.type == "cuda"
    for frac in REMOVE:
        s = uniform_branches(model, timesteps, frac)
        name = f"ours {int(frac * 100)}%" + (" + CUDA graphs" if graphs else "")
        runners[name] = l2c.compile_schedule(model, s, cuda_graphs=graphs)
        removed[name] = s.flops_removed_fraction()
    return runners, removed, missing


def measure(runners: dict, removed: dict, missing: dict, n: int, args, model_cfg, scheduler, clock) -> list[dict]:
    """Rows of every runner at ``n`` images: its first generation (compilation, capture), then interleaved rounds."""
    g = torch.Generator().manual_seed(0)
    size, device, dtype = model_cfg["sample_size"], torch.device(args.device), DTYPES[args.dtype]
    noise = torch.randn(n, model_cfg["in_channels"], size, size, generator=g).to(device=device).to(dtype)
    labels = torch.randint(0, 1000, (n,), generator=g).to(device)
    outs, first = {}, {}
    for name, fn in runners.items():
        t0 = clock()
        try:
            outs[name] = generate(fn, noise, labels, scheduler, args.steps)
        except Exception as e:  # noqa: BLE001 - a runner that fails is reported, the others go on
            missing[name] = f"{type(e).__name__}: {e}"
            log(f"  {name}: FAILED ({missing[name][:200]})")
            continue
        first[name] = clock() - t0
        log(f"  images={n} {name}: first generation {first[name]:.2f} s")
    live = {k: (lambda fn=runners[k]: generate(fn, noise, labels, scheduler, args.steps)) for k in runners if k in outs}
    times = harness.interleave(live, args.rounds, warmup=0, order="shuffle", clock=clock,
                               stop=lambda r: r >= 2 and harness.elapsed() > args.budget_s)
    base = statistics.median(times["diffusers eager"])
    ref0 = "ours 0%" + (" + CUDA graphs" if device.type == "cuda" else "")
    rows = []
    for name, t in times.items():
        med = statistics.median(t)
        row = dict(images=n, runner=name, first_generation_s=round(first[name], 3), generation_s=round(med, 5),
                   per_image_ms=round(1e3 * med / n, 3), speedup_vs_eager=round(base / med, 3), rounds=len(t),
                   spread_s=harness.spread(t), psnr_vs_eager_db=round(psnr(outs[name], outs["diffusers eager"]), 2))
        if hasattr(runners[name], "flops_removed_fraction"):  # a dynamic cache: what it skipped, counted by hooks
            row["branch_flops_removed"] = round(runners[name].flops_removed_fraction(), 4)
        if name in removed:
            ideal = 1.0 / (1.0 - removed[name])
            speed = statistics.median(times[ref0]) / med if times.get(ref0) else float("nan")
            row.update(branch_flops_removed=round(removed[name], 4), ideal_speedup=round(ideal, 3),
                       speedup_vs_ours_0=round(speed, 3), measured_over_ideal=round(speed / ideal, 3))
        rows.append(row)
        log(f"  images={n} {name}: {row['per_image_ms']} ms/image, {row['speedup_vs_eager']}x vs eager")
    return rows


def main(argv=None):
    ap = harness.parser(__doc__, threads=None)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bf16", choices=list(DTYPES))
    ap.add_argument("--images", default="2,8", help="comma-separated numbers of images per generation (CFG doubles "
                                                     "the transformer batch)")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=5, help="interleaved timed rounds per batch size")
    ap.add_argument("--compile", action="store_true", help="add torch.compile of the original")
    ap.add_argument("--tiny", action="store_true", help="a 2-block model, 4 steps, fp32 on CPU: checks the script")
    ap.add_argument("--budget-s", type=float, default=420.0, help="stop starting new rounds after this many seconds")
    args = harness.parse(ap, argv)
    if args.tiny:
        args.device, args.dtype, args.steps, args.rounds, args.images = "cpu", "fp32", 4, 2, "1,2"
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device is available")
    from diffusers import DDIMScheduler, DiTTransformer2DModel

    cfg = TINY if args.tiny else XL
    torch.manual_seed(0)
    model = DiTTransformer2DModel(**cfg)
    with torch.no_grad():  # random weights of a trained model's scale (zero-initialised adaLN would skip every block)
        for p in model.parameters():
            p.normal_(0, 0.02)
    model = model.to(device=device, dtype=DTYPES[args.dtype]).eval().requires_grad_(False)
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=False)
    scheduler.set_timesteps(args.steps)
    log(f"model {'tiny' if args.tiny else 'DiT-XL/2 shape'}, {args.dtype}, {device}, {args.steps} steps")
    runners, removed, missing = build_runners(model, [int(t) for t in scheduler.timesteps], args, device)
    clock = harness.device_clock(device)
    rows = [row for n in map(int, args.images.split(","))
            for row in measure(runners, removed, missing, n, args, cfg, scheduler, clock)]
    env = dict(driver=_driver(), dtype=args.dtype, steps=args.steps, config=cfg, build=l2c.build_info(),
               model="tiny DiT" if args.tiny else "DiT-XL/2 shape")
    result = dict(benchmark="end-to-end sampling latency", environment=env, rows=rows, missing=missing)
    m = harness.meta(device)
    md = [f"# End-to-end sampling, {env['model']}, {args.steps} DDIM steps, CFG, {args.dtype}", "",
          f"{harness.describe(m)}, driver {env['driver']}, triton {m['triton']}. Median over interleaved rounds; "
          "`measured/ideal` = speedup over our 0% run / (1 / (1 - branch FLOPs removed)). Random weights: PSNR only "
          "shows the runners compute the same kind of thing.", ""]
    md += harness.table(["images", "runner", "ms/image", "vs eager", "first generation s", "branch FLOPs removed",
                         "measured/ideal", "PSNR vs eager dB"],
                        [[r["images"], r["runner"], r["per_image_ms"], f"{r['speedup_vs_eager']:.2f}x",
                          f"{r['first_generation_s']:.1f}", f"{100 * r.get('branch_flops_removed', 0):.0f}%",
                          r.get("measured_over_ideal", "-"), r["psnr_vs_eager_db"]] for r in rows],
                        ["---:", "---"] + ["---:"] * 6)
    md += [f"\n- {k}: not measured: {v}" for k, v in missing.items()]
    name = f"e2e_{'tiny' if args.tiny else 'dit-xl'}_{device.type}_{args.dtype}"
    harness.write_result(args.out, name, result, "\n".join(md), device=device)
    print("\n".join(md))
    return result


def _driver() -> str | None:
    if not torch.cuda.is_available():
        return None
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=20).stdout.strip() or None
    except Exception:  # noqa: BLE001
        return None


if __name__ == "__main__":
    main()
