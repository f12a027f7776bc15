"""Per-step latency of compile_schedule's module against the original model, next to its ideal speedups.

    python bench/bench_compile_schedule.py            # 12-block DiT, CPU: compile_schedule_cpu_fp32.{json,md}
    python bench/bench_compile_schedule.py --device cuda --dtype bf16 --xl         # DiT-XL/2 shape on a GPU
    python bench/bench_compile_schedule.py --model flux                 # block level: compile_schedule_cpu_flux
    python bench/bench_compile_schedule.py --model flux --level branch  # compile_schedule_cpu_flux_branches

Every step of every runner is interleaved (rotating order); ms/step = mean over steps of each step's median. The
models (the Flux-shaped one: Flux.1-dev's structure sized for 2 cores, random weights), the schedules and how to read
the ideal columns: bench/NOTES.md ("compile_schedule on CPU", "Block-level runtime", "SD3 / Flux at branch level").
"""
from __future__ import annotations

import statistics

import harness
import torch
import torch.nn.functional as F

import l2c_kernels as l2c

#: fraction of the steps after the first that reuse everything -> (period, steps of each period reused)
PATTERNS = {0.0: (1, set()), 0.25: (4, {3}), 0.5: (2, {1}), 0.75: (4, {1, 2, 3})}
FLUX_SHAPED = dict(patch_size=1, in_channels=64, num_layers=4, num_single_layers=8, attention_head_dim=128,
                   num_attention_heads=3, joint_attention_dim=1024, pooled_projection_dim=768, guidance_embeds=True,
                   axes_dims_rope=[16, 56, 56])
IDEAL_MODEL = ("`ideal (model)` = the original's FLOPs over the compiled module's, both counted with "
               "`torch.utils.flop_counter` over a whole generation.")


def reused(i: int, r: float, phase: int = 0) -> bool:
    k, drop = PATTERNS[r]
    return i > 0 and (i + phase) % k in drop


def uniform_branches(model, timesteps, r: float) -> l2c.Schedule:
    """A DiT's schedule that reuses every branch of every block at the steps ``PATTERNS[r]`` names (FORA-like)."""
    nb, ad = len(model.transformer_blocks), l2c.adapters.adapter_for(model)
    plan = [["RR" if reused(i, r) else "CC"] * nb for i in range(len(timesteps))]
    return l2c.Schedule(timesteps=timesteps, plan=plan, branches=list(ad.branches(model)), num_blocks=nb,
                        model_class=type(model).__name__, method=f"uniform-{int(r * 100)}",
                        branch_flops=ad.branch_flops(model))


# ---------------------------------------------------------------------------------------------- models
def dit(args):
    """``(model, call, info)``: the dit-digits-shaped DiT (``--xl``: DiT-XL/2's shape) on a CFG batch."""
    from diffusers import DDIMScheduler, DiTTransformer2DModel

    from l2c_kernels.models import configs

    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    cfg = dict(configs.DIT_DIGITS)
    if args.xl:
        cfg.update(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28,
                   sample_size=32, norm_eps=1e-5)
    torch.manual_seed(0)
    model = DiTTransformer2DModel(**cfg).to(device=device, dtype=dtype).eval().requires_grad_(False)
    sch = DDIMScheduler(**{k: v for k, v in configs.NOISE_SCHEDULE.items() if k != "clip_sample_range"})
    sch.set_timesteps(args.steps)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, cfg["in_channels"], cfg["sample_size"], cfg["sample_size"], generator=g)
    x = x.to(device=device, dtype=dtype)
    labels = torch.randint(0, 10, (args.batch,), generator=g).to(device)

    def call(fn, t):
        return fn(x, timestep=torch.full((x.shape[0],), t, device=device), class_labels=labels)
    info = dict(model="DiT-XL/2 shape" if args.xl else "dit-digits shape", blocks=cfg["num_layers"],
                hidden=cfg["num_attention_heads"] * cfg["attention_head_dim"],
                tokens=(cfg["sample_size"] // cfg["patch_size"]) ** 2, timesteps=[int(t) for t in sch.timesteps])
    return model, call, info


def flux_shaped(image_side: int, text_tokens: int, steps: int):
    """``(model, call, timesteps)``: the Flux-shaped model; ``call(fn, t)``, one call of ``fn`` (it or a compiled
    module) at timestep ``t`` (0-1000) on fixed inputs of ``image_side**2`` packed image tokens and ``text_tokens``
    (``call.flops_inputs``: them at timestep 1, for counting FLOPs); ``steps`` timesteps from 1000 to 50."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    model = FluxTransformer2DModel(**FLUX_SHAPED).eval().requires_grad_(False)
    with torch.no_grad():
        for p in model.parameters():  # diffusers zero-initialises some projections; speed does not care
            p.normal_(0, 0.02)
    g = torch.Generator().manual_seed(0)
    ids = torch.zeros(image_side, image_side, 3)
    ids[..., 1] = torch.arange(image_side)[:, None]
    ids[..., 2] = torch.arange(image_side)[None, :]
    cond = dict(hidden_states=torch.randn(1, image_side * image_side, 64, generator=g),
                encoder_hidden_states=torch.randn(1, text_tokens, 1024, generator=g),
                pooled_projections=torch.randn(1, 768, generator=g), img_ids=ids.reshape(-1, 3),
                txt_ids=torch.zeros(text_tokens, 3), guidance=torch.full((1,), 3.5), return_dict=False)

    def call(fn, t):
        return fn(timestep=torch.full((1,), t / 1000.0), **cond)
    call.flops_inputs = dict(timestep=torch.full((1,), 1.0), **cond)
    return model, call, [int(round(1000 - i * 950 / (steps - 1))) for i in range(steps)]


# ---------------------------------------------------------------------------------------------- timing
def step_latency(scheds: dict, model, call, timesteps, repeats: int, removed_key: str, device="cpu",
                 custom_flops: bool = True) -> tuple[list[dict], dict]:
    """One row per schedule ``k`` (runner ``"compiled k"``) against ``"original"``: ms/step, speedup, the ideal
    speedup from the schedule's FLOPs removed (``removed_key``) and from counted whole-generation FLOPs; and every
    runner's per-step medians (seconds)."""
    runners = {"original": model, **{f"compiled {k}": l2c.compile_schedule(model, s) for k, s in scheds.items()}}
    fns = {name: (lambda t, m=m: call(m, t)) for name, m in runners.items()}
    with torch.no_grad():
        times = harness.interleave(fns, list(timesteps) * repeats, warmup=list(timesteps),
                                   clock=harness.device_clock(device))
    steps = len(timesteps)
    per_step = {k: harness.step_medians(v, steps) for k, v in times.items()}
    med = {k: statistics.mean(v) for k, v in per_step.items()}

    def generation_flops(fn):
        if hasattr(fn, "reset"):
            fn.reset()
        return harness.flops(lambda: [call(fn, t) for t in timesteps], custom=custom_flops)
    flops_original, rows = generation_flops(model), []
    for k, s in scheds.items():
        name = f"compiled {k}"
        speed, f = med["original"] / med[name], s.flops_removed_fraction()
        ideal, ideal_whole = 1.0 / (1.0 - f), flops_original / generation_flops(runners[name])
        rows.append({"schedule": name, removed_key: round(f, 4), "step_ms": round(1e3 * med[name], 3),
                     "speedup_vs_original": round(speed, 3), "ideal_speedup": round(ideal, 3),
                     "measured_over_ideal": round(speed / ideal, 3), "ideal_speedup_whole_model": round(ideal_whole, 3),
                     "measured_over_ideal_whole_model": round(speed / ideal_whole, 3),
                     "spread_ms": harness.spread(harness.generation_means(times[name], steps), 1e3, 3),
                     "repeats": repeats})
    return rows, dict(per_step, original_step_ms=round(1e3 * med["original"], 3))


def latency_table(rows: list[dict], key: str, what: str, ideal: str, pct: str = "{:.0f}") -> list[str]:
    return harness.table(
        ["schedule", f"{what} FLOPs removed", "ms/step", "speedup", ideal, "measured/ideal", "ideal (model)",
         "measured/ideal (model)"],
        [[r["schedule"], pct.format(100 * r[key]) + "%", r["step_ms"], f"{r['speedup_vs_original']:.2f}x",
          f"{r['ideal_speedup']:.2f}x", f"{r['measured_over_ideal']:.2f}", f"{r['ideal_speedup_whole_model']:.2f}x",
          f"{r['measured_over_ideal_whole_model']:.2f}"] for r in rows])


def intro(title: str, args, device="cpu", each: str = "", caveat: str = "") -> list[str]:
    """A result's title and how it was timed."""
    return [title, f"{harness.describe(harness.meta(device))}; {each}{args.repeats} generations of {args.steps} steps, "
            f"every step of every runner interleaved; ms/step = mean over steps of each step's median{caveat}.", ""]


# ---------------------------------------------------------------------------------------------- the three cases
def dit_case(args) -> tuple[str, dict, str]:
    model, call, info = dit(args)
    ts = info.pop("timesteps")
    scheds = {f"{int(r * 100)}%": uniform_branches(model, ts, r) for r in PATTERNS}
    rows, med = step_latency(scheds, model, call, ts, args.repeats, "branch_flops_removed", args.device,
                             custom_flops=False)
    res = dict(benchmark="compile_schedule per-step latency", dtype=args.dtype, batch=args.batch, steps=args.steps,
               repeats=args.repeats, **info, backend=l2c.build_info(), original_step_ms=med["original_step_ms"],
               rows=rows)
    md = intro(f"# compile_schedule vs original, {res['model']} ({res['blocks']} blocks, hidden {res['hidden']}, "
               f"{res['tokens']} tokens), batch {args.batch}, {args.dtype}", args, args.device) + [
        f"original: {res['original_step_ms']} ms/step", "",
        "`ideal (branches)` = 1 / (1 - branch FLOPs removed): every FLOP outside the branches (patch and timestep "
        "embeddings, adaLN projections, final layer) counted as free; " + IDEAL_MODEL, ""]
    name = f"compile_schedule_{torch.device(args.device).type}{'_xl' if args.xl else ''}_{args.dtype}"
    return name, res, "\n".join(md + latency_table(rows, "branch_flops_removed", "branch", "ideal (branches)"))


def flux_block_case(args) -> tuple[str, dict, str]:
    from l2c_kernels.runtime.block_flops import measure_block_flops

    side, txt = args.image_sides[0], args.text_tokens
    model, call, ts = flux_shaped(side, txt, args.steps)
    flops = measure_block_flops(model, **call.flops_inputs)

    def schedule(mask, method):
        return l2c.Schedule.from_mask(model, ts, mask, branches=["block"], unit_flops=flops, method=method)
    scheds = {f"{int(r * 100)}%": schedule([[not reused(i, r)] * len(flops) for i in range(len(ts))],
                                           f"uniform-{int(r * 100)}") for r in PATTERNS}
    scheds["50% spread"] = schedule([[i == 0 or (i + b) % 2 == 0 for b in range(len(flops))] for i in range(len(ts))],
                                    "spread-50")
    rows, med = step_latency(scheds, model, call, ts, args.repeats, "block_flops_removed")
    res = dict(benchmark="compile_schedule block level, per-step latency", load_average=harness.load_average(),
               dtype="fp32", batch=1, steps=args.steps, repeats=args.repeats,
               model="FluxTransformer2DModel, Flux.1-dev structure", config=FLUX_SHAPED, image_tokens=side * side,
               text_tokens=txt, block_flops=flops, backend=l2c.build_info(), original_step_ms=med["original_step_ms"],
               rows=rows)
    md = intro(f"# compile_schedule at block level vs original, Flux-shaped model (4 double + 8 single blocks, hidden "
               f"384, {side * side} image + {txt} text tokens), batch 1, fp32", args) + [
        f"original: {res['original_step_ms']} ms/step", "",
        f"Block FLOPs counted on a real call: double-stream {flops[0] / 1e6:.0f} MFLOP, single-stream "
        f"{flops[-1] / 1e6:.0f} MFLOP per block. `ideal (blocks)` = 1 / (1 - block FLOPs removed): everything "
        "outside the blocks counted as free; " + IDEAL_MODEL, ""]
    name = "compile_schedule_cpu_flux" + (args.tag and f"_{args.tag}")
    return name, res, "\n".join(md + latency_table(rows, "block_flops_removed", "block", "ideal (blocks)"))


def flux_branch_size(side: int, txt: int, steps: int, repeats: int) -> dict:
    """Every branch-level schedule at one model size, and the uniform 75% runner's computed vs reused steps."""
    from l2c_kernels.adapters.mmdit_branches import branch_names
    from l2c_kernels.runtime.branch_wrappers import measure_branch_flops

    model, call, ts = flux_shaped(side, txt, steps)
    names, ubf = branch_names(model), measure_branch_flops(model, **call.flops_inputs)
    scheds = {"0%": l2c.Schedule.full(model, ts, branches=names)}
    scheds["0%"].unit_branch_flops = ubf
    for kind in ("uniform", "spread"):  # spread: unit j of block b reuses at the steps the pattern names, shifted b + j
        scheds.update({f"{kind} {int(100 * r)}%": l2c.Schedule.from_mask(
            model, ts, [[[not reused(i, r, (b + j) if kind == "spread" else 0) for j in range(len(names))]
                         for b in range(len(ubf))] for i in range(len(ts))],
            branches=names, unit_branch_flops=ubf, method=f"{kind}-{int(100 * r)}") for r in PATTERNS if r})
    rows, med = step_latency(scheds, model, call, ts, repeats, "unit_flops_removed")
    u, computed = med["compiled uniform 75%"], [i for i in range(steps) if not reused(i, 0.75)]
    split = dict(original_step_ms=round(1e3 * statistics.mean(med["original"]), 3),
                 computed_step_ms=round(1e3 * statistics.mean(u[i] for i in computed), 3),
                 reused_step_ms=round(1e3 * statistics.mean(u[i] for i in range(steps) if i not in computed), 3))
    split["reused_over_original"] = round(split["reused_step_ms"] / split["original_step_ms"], 4)
    return dict(image_tokens=side * side, text_tokens=txt, unit_branch_flops=ubf, branches=names,
                original_step_ms=med["original_step_ms"], rows=rows, uniform_75_steps=split)


def split_cost(tokens: int, dim: int, mlp: int, repeats: int) -> dict:
    """A Flux single block's ``proj_out`` as one product on ``cat(a, m)`` against its two column blocks (ms)."""
    g = torch.Generator().manual_seed(0)
    a, m = torch.randn(1, tokens, dim, generator=g), torch.randn(1, tokens, mlp, generator=g)
    w, b = torch.randn(dim, dim + mlp, generator=g) / (dim + mlp) ** 0.5, torch.zeros(dim)
    t = harness.interleave(dict(fused=lambda: F.linear(torch.cat([a, m], dim=2), w, b),
                                split=lambda: F.linear(a, w[:, :dim]) + F.linear(m, w[:, dim:], b),
                                attention_half=lambda: F.linear(a, w[:, :dim]),
                                mlp_half=lambda: F.linear(m, w[:, dim:], b)), repeats)
    ms = {k: round(1e3 * statistics.median(v), 3) for k, v in t.items()}
    return dict(tokens=tokens, dim=dim, mlp_hidden=mlp, fused_ms=ms["fused"], split_ms=ms["split"],
                split_over_fused=round(ms["split"] / ms["fused"], 3), attention_half_ms=ms["attention_half"],
                mlp_half_ms=ms["mlp_half"])


def flux_branch_case(args) -> tuple[str, dict, str]:
    txt = args.text_tokens
    sizes = [flux_branch_size(side, txt, args.steps, args.repeats) for side in args.image_sides]
    splits = [split_cost(96, 384, 1536, 20), split_cost(64, 3072, 12288, 3)]
    res = dict(benchmark="compile_schedule branch level (SD3 / Flux units), per-step latency",
               load_average_at_end=harness.load_average(), dtype="fp32", batch=1, steps=args.steps,
               repeats=args.repeats, model="FluxTransformer2DModel, Flux.1-dev structure", config=FLUX_SHAPED,
               backend=l2c.build_info(), sizes=sizes, proj_out_split=splits)
    md = intro(f"# compile_schedule at branch level vs original, Flux-shaped model (4 double + 8 single blocks, "
               f"hidden 384, {txt} text tokens), batch 1, fp32", args, each="at each size ",
               caveat=" (valid only on an otherwise idle machine)")
    md += ["ideal = 1 / (1 - unit FLOPs removed) (everything outside the units counted as free); " + IDEAL_MODEL
           + " The per-block adaLN modulations, embeddings and output layers run at every step."]
    for sz in sizes:
        d, s = sz["unit_branch_flops"][0], sz["unit_branch_flops"][-1]
        md += ["", f"## {sz['image_tokens']} image + {sz['text_tokens']} text tokens: original "
                   f"{sz['original_step_ms']} ms/step", "",
               f"Unit FLOPs counted on a real call (MFLOP): double block attn1 {d[0] / 1e6:.1f}, ff {d[1] / 1e6:.1f}, "
               f"ff_context {d[2] / 1e6:.1f}; single block attn1 {s[0] / 1e6:.1f}, ff {s[1] / 1e6:.1f}.", ""]
        md += latency_table(sz["rows"], "unit_flops_removed", "unit", "ideal", "{:.1f}")
    md += ["", "Where uniform 75% loses against its ideal: a fully reused step still runs the embeddings, every "
               "block's adaLN gates (the gate rows only), the cached outputs' gated adds and the output layer; that "
               "fixed work is a smaller share of a step as the token count grows (means over steps of each step's "
               "median):",
           ""] + harness.table(["image tokens", "original ms/step", "computed step ms", "fully reused step ms",
                                "reused / original"],
                               [[sz["image_tokens"], *sz["uniform_75_steps"].values()] for sz in sizes])
    md += ["", "Flux single block `proj_out`: one product on `cat(a, m)` vs the two column blocks (ms, median of "
               "interleaved calls):", ""] + harness.table(
        ["tokens", "dim", "mlp", "fused", "split", "split/fused", "attention half", "MLP half"],
        [list(sp.values()) for sp in splits])
    return "compile_schedule_cpu_flux_branches", res, "\n".join(md)


def main(argv=None):
    ap = harness.parser(__doc__)
    ap.add_argument("--model", default="dit", choices=["dit", "flux"])
    ap.add_argument("--level", default=None, choices=["block", "branch"],
                    help="flux: cache per block (default) or per branch (dit: branches always)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"], help="dit only")
    ap.add_argument("--batch", type=int, default=32, help="dit: transformer batch (CFG: 2 x images)")
    ap.add_argument("--xl", action="store_true", help="dit: DiT-XL/2 shape (28 blocks, hidden 1152, 256 tokens)")
    ap.add_argument("--steps", type=int, default=None, help="default 20 (dit), 8 (flux; a multiple of 4)")
    ap.add_argument("--repeats", type=int, default=None, help="generations timed; default 7 (dit), 3 (flux)")
    ap.add_argument("--image-sides", "--image-side", type=int, nargs="+", default=None,
                    help="flux: packed latent sides, image tokens = side^2 (default 16; branch level 16 24)")
    ap.add_argument("--text-tokens", type=int, default=64, help="flux")
    ap.add_argument("--tag", default="", help="flux block level: suffix of the result files")
    args = harness.parse(ap, argv)
    flux = args.model == "flux"
    args.steps = args.steps or (8 if flux else 20)
    args.repeats = args.repeats or (3 if flux else 7)
    args.image_sides = args.image_sides or ([16, 24] if args.level == "branch" else [16])
    case = dit_case if not flux else flux_branch_case if args.level == "branch" else flux_block_case
    name, res, md = case(args)
    harness.write_result(args.out, name, res, md, device=args.device)
    print(md)
    return res


if __name__ == "__main__":
    main()
