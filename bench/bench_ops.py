"""Fused ops vs the eager PyTorch expressions they replace, at DiT activation shapes.

For each op of :mod:`l2c_kernels.ops`: ``fused`` (the public op, default backend), ``kernel`` (the registered
kernel alone), ``triton`` (on CUDA), ``eager`` (the obvious multi-kernel expression, ``callables``) and ``torch`` (the
package's PyTorch backend), on the same tensors, interleaved, median of repeated samples; with the bytes each moves
(``BYTES``) and the bandwidth of a plain copy. Reading the tables: bench/NOTES.md ("Fused ops on CPU").

    python bench/bench_ops.py                        # CPU, fp32 + bf16: ops_cpu.{json,md}
    python bench/bench_ops.py --device cuda          # GPU, fp32 + bf16 + fp16: ops_cuda.{json,md}
    python -m pytest bench/bench_ops.py --benchmark-only --benchmark-group-by=group   # with pytest-benchmark
"""
from __future__ import annotations

import os
import statistics
from pathlib import Path

import harness
import torch
import torch.nn.functional as F

import l2c_kernels
from l2c_kernels import ops
from l2c_kernels.ops import reference

#: name -> (B, N, C)
SHAPES = {
    "dit-digits": (32, 64, 128),      # the bundled model: CFG batch 32, 64 tokens, hidden 128
    "DiT-XL/2 256px": (2, 256, 1152),  # one image with CFG, 256 tokens, hidden 1152
    "DiT-XL/2 512px": (8, 1024, 1152),  # four images with CFG, 1024 tokens: 38 MB per fp32 tensor
    "PixArt 1024px": (2, 4096, 1152),  # one image with CFG, 4096 tokens
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

#: The benchmarked calls: op variant -> (what it computes, bytes read + written per call by fused / eager / torch in
#: units of one [B, N, C] tensor). Per-sample vectors are negligible; each kernel reads its inputs and writes its
#: output once.
CASES = {
    # fused: x r+w, y r, cache w | eager: copy y->cache 2, gate*y 2, x.add_ 3 | torch: copy 2, addcmul_ 3
    "gated_residual_ store": ("x += gate * y; cache <- y", 4, 7, 5),
    # fused: x r+w, cache r | eager: gate*cache 2, x.add_ 3 | torch: addcmul_ 3
    "gated_residual_ reuse": ("x += gate * cache", 3, 5, 3),
    # fused: x r+w, y r, cache w (half) | eager: x.add_ 3, ya+yb 1.5, /2 1, copy_ 1
    # | torch: x.add_ 3, copy_ 1, mul_ 1, add_ 1.5
    "cfg_mean_store_": ("x += y; cache <- (y[:B/2] + y[B/2:]) / 2", 3.5, 6.5, 6.5),
    # fused: 2 r + 1 w | eager: out - inp 3, copy_ 2 | torch: torch.sub(out=) 3
    "residual_delta_store_": ("cache <- out - inp", 3, 5, 3),
    "residual_apply_": ("out <- inp + cache", 3, 5, 3),
    # fused: x r+w, y0, y1, y2 r | eager: c0*y0 2, c1*y1 2, + 3, c2*y2 2, + 3, gate* 2, x.add_ 3
    # | torch: the same with x.float() + v 3 and copy_ 2 instead of x.add_
    "forecast_residual_": ("x += gate * (c0 * y0 + c1 * y1 + c2 * y2)", 5, 17, 19),
    # fused: x r, out w | eager: layer_norm 2, * (1 + scale) 2, + shift 2 | torch (fp32): layer_norm 2, addcmul 2
    "adaln_modulate": ("LayerNorm(x) * (1 + scale) + shift", 2, 6, 4),
}
BYTES = {k: dict(fused=f, eager=e, torch=t, kernel=f, triton=f) for k, (_, f, e, t) in CASES.items()}

IMPLS = ("fused", "kernel", "triton", "eager", "torch")


def make_inputs(B, N, C, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    emb = randn(B, 6 * C) * 0.1
    shift, scale, gate = emb.chunk(6, dim=1)[:3]  # strided views, as in a DiT block
    full = {k: randn(B, N, C) for k in ("x", "y", "inp", "cache", "y1", "y2")}
    return dict(full, half=randn(B // 2, N, C), out=torch.empty(B, N, C, dtype=dtype, device=device),
                gate=gate, shift=shift, scale=scale)


def _eager_cfg(x, y, cache):
    h = x.shape[0] // 2
    x.add_(y)
    cache.copy_((y[:h] + y[h:]) / 2)


def callables(case: str, t: dict) -> dict:
    """The ways to compute ``case`` on the tensors ``t`` (those not available here left out)."""
    x, y, cache, gate, inp, out, half, y1, y2, shift, scale = (t[k] for k in (
        "x", "y", "cache", "gate", "inp", "out", "half", "y1", "y2", "shift", "scale"))
    eps, c, C = 1e-6, (3.0, -3.0, 1.0), x.shape[-1]
    gate_c, shift_c, scale_c = gate.contiguous(), shift.contiguous(), scale.contiguous()  # what the kernels take
    # the public op (any backend), the registered kernel `k` alone, the eager expression, the PyTorch backend
    fused, kernel, eager, torch_ = {
        "gated_residual_ store": (
            lambda b=None: ops.gated_residual_(x, y, gate, cache, backend=b), lambda: k(x, y, gate_c, cache),
            lambda: (cache.copy_(y), x.add_(gate.unsqueeze(1) * y)),
            lambda: reference.gated_residual_(x, y, gate, cache)),
        "gated_residual_ reuse": (
            lambda b=None: ops.gated_residual_(x, cache, gate, backend=b), lambda: k(x, cache, gate_c, None),
            lambda: x.add_(gate.unsqueeze(1) * cache), lambda: reference.gated_residual_(x, cache, gate)),
        "cfg_mean_store_": (
            lambda b=None: ops.cfg_mean_store_(x, y, half, backend=b), lambda: k(x, y, half),
            lambda: _eager_cfg(x, y, half), lambda: reference.cfg_mean_store_(x, y, half)),
        "residual_delta_store_": (
            lambda b=None: ops.residual_delta_store_(cache, x, inp, backend=b), lambda: k(cache, x, inp),
            lambda: cache.copy_(x - inp), lambda: reference.residual_delta_store_(cache, x, inp)),
        "residual_apply_": (
            lambda b=None: ops.residual_apply_(out, inp, cache, backend=b), lambda: k(out, inp, cache),
            lambda: out.copy_(inp + cache), lambda: reference.residual_apply_(out, inp, cache)),
        "forecast_residual_": (
            lambda b=None: ops.forecast_residual_(x, cache, y1, y2, gate, *c, backend=b),
            lambda: k(x, cache, y1, y2, gate_c, *c),
            lambda: x.add_(gate.unsqueeze(1) * (c[0] * cache + c[1] * y1 + c[2] * y2)),
            lambda: reference.forecast_residual_(x, cache, y1, y2, gate, *c)),
        "adaln_modulate": (
            lambda b=None: ops.adaln_modulate(x, shift, scale, eps, backend=b), lambda: k(x, shift_c, scale_c, eps),
            lambda: F.layer_norm(x, (C,), eps=eps) * (1 + scale[:, None]) + shift[:, None],
            lambda: reference.adaln_modulate(x, shift, scale, eps)),
    }[case]
    k = getattr(torch.ops.l2c, case.split()[0]) if ops.HAS_EXTENSION else None  # after the lookup: KeyError first
    fns = dict(fused=fused, kernel=kernel, eager=eager, torch=torch_)
    if k is None or (x.device.type != "cpu" and ops.default_backend(x.device) != "cuda"):
        del fns["kernel"]
    if x.device.type == "cuda" and "triton" in ops.available_backends("cuda"):
        fns["triton"] = lambda: fused("triton")  # the Triton kernel compiled for the GPU, beside the CUDA one
    return fns


def time_case(fns: dict, device: torch.device, repeats: int, sample_s: float) -> dict:
    """Median seconds per call of each function: samples of about ``sample_s`` each, the functions interleaved."""
    clock = harness.device_clock(device)

    def sample(fn, n):
        return lambda: [fn() for _ in range(n)]
    calls = {}
    for name, fn in fns.items():
        for _ in range(3):
            fn()
        once = harness.interleave({name: sample(fn, 3)}, 1, warmup=0, clock=clock)[name][0] / 3
        calls[name] = max(1, int(sample_s / max(once, 1e-7)))
    times = harness.interleave({k: sample(fn, calls[k]) for k, fn in fns.items()}, repeats, warmup=0, clock=clock)
    return {k: dict(median_s=statistics.median(v) / calls[k], min_s=min(v) / calls[k], max_s=max(v) / calls[k],
                    calls_per_sample=calls[k]) for k, v in times.items()}


def cpu_caches() -> dict:
    """{'L1d': '32K', 'L2': '1024K', 'L3': '32768K'} of CPU 0, where Linux reports them."""
    caches = {}
    for d in sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*")):
        try:
            level, kind, size = ((d / f).read_text().strip() for f in ("level", "type", "size"))
        except OSError:
            continue
        if kind != "Instruction":
            caches[f"L{level}{'d' if kind == 'Data' else ''}"] = size
    return caches


def run(device: torch.device, dtypes: list[str], shapes: dict, cases: list[str], repeats: int,
        sample_s: float) -> list[dict]:
    rows = []
    for shape_name, (B, N, C) in shapes.items():
        for dt in dtypes:
            t = make_inputs(B, N, C, DTYPES[dt], device)
            unit = B * N * C * DTYPES[dt].itemsize
            # the roofline: a device-to-device copy of one [B, N, C] tensor (reads + writes 2 tensors' bytes)
            src, dst = t["y"], torch.empty_like(t["y"])
            copy_s = time_case({"copy": lambda: dst.copy_(src)}, device, repeats, sample_s)["copy"]["median_s"]
            copy_gbps = 2 * unit / copy_s / 1e9
            for case in cases:
                timed = time_case(callables(case, t), device, repeats, sample_s)
                row = dict(op=case, computes=CASES[case][0], shape=shape_name, B=B, N=N, C=C, dtype=dt,
                           tensor_bytes=unit,
                           predicted_eager_over_fused=round(BYTES[case]["eager"] / BYTES[case]["fused"], 3))
                for impl, tm in timed.items():
                    moved = BYTES[case][impl] * unit
                    row[impl] = dict(**{f"{s}_us": round(1e6 * tm[f"{s}_s"], 2) for s in ("median", "min", "max")},
                                     calls_per_sample=tm["calls_per_sample"], bytes=moved,
                                     gb_per_s=round(moved / tm["median_s"] / 1e9, 2))
                row["copy_gb_per_s"] = round(copy_gbps, 2)
                for impl in ("fused", "triton"):
                    if impl in timed:
                        row[f"{impl}_fraction_of_copy_bw"] = round(row[impl]["gb_per_s"] / copy_gbps, 3)
                for slow, fast in (("eager", "fused"), ("torch", "fused"), ("eager", "kernel")):
                    if fast in timed:
                        row[f"{slow}_over_{fast}"] = round(timed[slow]["median_s"] / timed[fast]["median_s"], 3)
                rows.append(row)
                harness.log(f"{shape_name:>15} {dt} {case:<22} fused {row['fused']['median_us']:9.1f} us  "
                            f"eager {row['eager']['median_us']:9.1f} us  eager/fused {row['eager_over_fused']:.2f} "
                            f"(predicted {row['predicted_eager_over_fused']:.2f})  "
                            f"torch/fused {row['torch_over_fused']:.2f}")
    return rows


def markdown(result: dict) -> str:
    e = {**result.get("meta", {}), **result["environment"]}
    caches = ", ".join(f"{k} {v}" for k, v in e["cpu_caches"].items())
    lines = [f"# Fused ops vs eager PyTorch on {e['device']} ({result['device_type']})", "",
             f"{harness.describe(e)}; triton {e['triton']}"
             + (f"; CPU caches {caches}; C++ kernels {e['cpu_vectorization']}, {e['cpu_parallel']}"
                if result["device_type"] == "cpu" else "") + f"; fused = default backend `{e['fused_backend']}`.",
             f"Median of {result['repeats']} interleaved samples of ~{result['sample_ms']} ms each; per-sample vectors "
             "are strided `.chunk` views of a `[B, 6C]` embedding. `predicted` = bytes moved by eager / by fused; "
             "`kernel` = the registered kernel without the Python wrapper; `of copy BW` = fused GB/s over a measured "
             "`dst.copy_(src)` of one `[B, N, C]` tensor in the same run.", ""]
    header = ["op", "dtype", "fused us", "kernel us", "eager us", "torch us", "eager/fused", "predicted",
              "eager/kernel", "torch/fused", "fused GB/s", "of copy BW", "triton GB/s", "triton of copy BW"]
    for shape in dict.fromkeys(r["shape"] for r in result["rows"]):
        rows = [r for r in result["rows"] if r["shape"] == shape]
        lines += [f"## {shape}: B={rows[0]['B']}, N={rows[0]['N']}, C={rows[0]['C']}", ""]
        lines += harness.table(header, [[
            r["op"], r["dtype"], f"{r['fused']['median_us']:.1f}",
            f"{r['kernel']['median_us']:.1f}" if "kernel" in r else "-", f"{r['eager']['median_us']:.1f}",
            f"{r['torch']['median_us']:.1f}", f"**{r['eager_over_fused']:.2f}x**",
            f"{r['predicted_eager_over_fused']:.2f}x",
            f"{r['eager_over_kernel']:.2f}x" if "kernel" in r else "-", f"{r['torch_over_fused']:.2f}x",
            f"{r['fused']['gb_per_s']:.1f}", f"{100 * r['fused_fraction_of_copy_bw']:.0f}%",
            *((f"{r['triton']['gb_per_s']:.1f}", f"{100 * r['triton_fraction_of_copy_bw']:.0f}%") if "triton" in r
              else ("-", "-"))] for r in rows], align=["---"] * 2 + ["---:"] * 12) + [""]
    return "\n".join(lines)


def main(argv=None):
    ap = harness.parser(__doc__, threads=os.cpu_count())
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dtypes", default=None, help="comma-separated of fp32,bf16,fp16 (default: fp32,bf16 on CPU, "
                                                  "fp32,bf16,fp16 on CUDA)")
    ap.add_argument("--shapes", default=",".join(SHAPES), help=f"comma-separated of {list(SHAPES)}")
    ap.add_argument("--ops", default=",".join(CASES), help="comma-separated subset of the op variants")
    ap.add_argument("--repeats", type=int, default=21)
    ap.add_argument("--sample-ms", type=float, default=10.0, help="length of one timing sample")
    args = harness.parse(ap, argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device is available")
    dtypes = (args.dtypes or ("fp32,bf16,fp16" if device.type == "cuda" else "fp32,bf16")).split(",")
    shapes = {k: SHAPES[k] for k in args.shapes.split(",")}
    cases = args.ops.split(",")
    for c in cases:
        if c not in CASES:
            ap.error(f"unknown op variant {c!r}; expected some of {list(CASES)}")
    info = l2c_kernels.build_info()  # what the tables need beyond the run's meta
    env = dict(fused_backend=ops.default_backend(device), cpu_caches=cpu_caches(),
               **{k: info[k] for k in ("cpu_vectorization", "cpu_parallel", "extension_loaded")})
    harness.log(f"torch {torch.__version__}, {args.threads} threads, fused backend {env['fused_backend']}")
    with torch.inference_mode():
        rows = run(device, dtypes, shapes, cases, args.repeats, args.sample_ms / 1e3)
    result = dict(benchmark="fused ops vs eager PyTorch", device_type=device.type, environment=env,
                  repeats=args.repeats, sample_ms=args.sample_ms, shapes=shapes, bytes_model=BYTES, rows=rows,
                  meta=harness.meta(device))
    md = markdown(result)
    harness.write_result(args.out, f"ops_{device.type}", result, md, device=device)
    print(md)
    return result


# ------------------------------------------------------------------------------------- pytest-benchmark
try:
    import pytest
except ImportError:  # script mode needs no pytest
    pytest = None

if pytest is not None:
    @pytest.mark.parametrize("case,impl,shape,dt", [
        pytest.param(case, impl, shape, dt, id=f"{case.replace(' ', '-')}-{impl}-{shape.split()[0]}-{dt}")
        for shape in SHAPES for dt in ("fp32", "bf16") for case in CASES for impl in IMPLS])
    def test_op(benchmark, case, impl, shape, dt):
        """One variant of one op; compare within a group (``--benchmark-group-by=group``)."""
        B, N, C = SHAPES[shape]
        fns = callables(case, make_inputs(B, N, C, DTYPES[dt], torch.device("cpu")))
        if impl not in fns:
            pytest.skip(f"{impl} is not available here")
        benchmark.group = f"{case} {shape} {dt}"
        benchmark.extra_info.update(bytes=BYTES[case][impl] * B * N * C * DTYPES[dt].itemsize,
                                    predicted_eager_over_fused=BYTES[case]["eager"] / BYTES[case]["fused"])
        with torch.inference_mode():
            benchmark(fns[impl])


if __name__ == "__main__":
    main()
