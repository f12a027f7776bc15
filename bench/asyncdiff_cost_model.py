"""A cost model for AsyncDiff: predicted speedup on N devices from per-component compute time and collective cost.

One generation of S steps with W warm-up steps, N components, stride s (N + s - 1 devices):

    single device:  S * (T_full + T_host)
    AsyncDiff:      W * (T_full + T_host + T_ag(D, bytes_out))                       # exact warm-up
                  + ceil((S - W) / s) * (max_n T_n + T_ag(D, bytes_msg) + T_book)   # parallel rounds
                  + (S - W) * T_host                                                 # sampler, every step

``T_full``: one transformer call; ``T_n``: component n alone (its blocks, plus the embedding for the
first and the final layer for the last); ``T_host``: the sampler's work per step outside the
transformer; ``T_ag(D, m) = latency + (D - 1) * m / bandwidth``: an all_gather of m bytes per
rank over D ranks (ring); ``bytes_msg``: the larger of the residual stream and the output;
``T_book``: AsyncDenoiser's own work per round (packing, header checks, a host sync).

Checked against what ``bench/bench_asyncdiff.py`` measured on CPU; H100 predictions for 2/4/8 GPUs from FLOPs and
the assumptions below. bench/NOTES.md ("AsyncDiff on CPU").

    python bench/asyncdiff_cost_model.py     # writes bench/results/asyncdiff_cost_model.{json,md}
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import harness

H100 = dict(
    name="H100 SXM 80GB, NVLink 4 via NVSwitch, NCCL",
    peak_bf16_flops=989e12,            # dense bf16 tensor-core peak
    mfu_large=0.45,                    # fraction of peak reached by a block's GEMMs/attention at >= 4k rows
    mfu_small=0.20,                    # ... at ~512 rows (one image with CFG on DiT-XL/2 256px)
    kernel_launch_s=4e-6,              # per kernel, eager launches (about 15 kernels per block)
    kernels_per_block=15,
    allgather_latency_s=15e-6,         # NCCL all_gather of a small message, 2-8 GPUs on NVSwitch
    allgather_busbw_Bps=360e9,         # NCCL all_gather bus bandwidth at MB-sized messages (nccl-tests, DGX H100)
    host_per_step_s=0.3e-3,            # scheduler step, CFG combine, Python dispatch per sampling step
    bookkeeping_per_round_s=0.2e-3,    # AsyncDenoiser per round: pack/unpack, header check, host sync
    bytes_per_element=2,               # bf16 activations
)
# text: text tokens for cross-attention; images: per generation (the transformer batch is twice that, CFG)
_XL = dict(blocks=28, hidden=1152, patch=2, out_channels=8)
MODELS = [
    dict(name="DiT-XL/2 256px", tokens=256, text=0, images=8, **_XL),
    dict(name="DiT-XL/2 256px", tokens=256, text=0, images=1, **_XL),
    dict(name="PixArt-alpha 1024px", tokens=4096, text=120, images=1, **_XL),
]


def t_allgather(devices: int, nbytes: float, latency: float, bandwidth: float) -> float:
    return 0.0 if devices <= 1 else latency + (devices - 1) * nbytes / bandwidth


def predict(t_full: float, t_components: list[float], t_host: float, steps: int, warm_up: int, stride: int,
            ag_latency: float, ag_bandwidth: float, bytes_msg: float, bytes_out: float,
            t_book: float = 0.0) -> dict:
    """Seconds per generation on one device and with AsyncDiff, and the predicted speedup."""
    n = len(t_components)
    devices = n + stride - 1
    single = steps * (t_full + t_host)
    rounds = math.ceil((steps - warm_up) / stride)
    ag_msg = t_allgather(devices, bytes_msg, ag_latency, ag_bandwidth)
    warm = warm_up * (t_full + t_host + t_allgather(devices, bytes_out, ag_latency, ag_bandwidth))
    total = warm + rounds * (max(t_components) + ag_msg + t_book) + (steps - warm_up) * t_host
    return dict(devices=devices, components=n, stride=stride, single_s=single, asyncdiff_s=total,
                speedup=single / total, ideal_speedup=steps / (warm_up + rounds / n),  # equal components, free comm.
                comm_fraction=rounds * ag_msg / total)


def cpu_check(cpu: dict) -> dict:
    """The model fed with what bench_asyncdiff.py measured, against the speedup it measured."""
    m = cpu["measured"]
    st, ag = m["single_thread"], m["allgather_gloo_loopback"]
    kw = dict(t_host=m["outside_transformer_s"], steps=cpu["steps"], warm_up=cpu["warm_up"], stride=1,
              ag_latency=ag["latency_s"], ag_bandwidth=ag["bandwidth_Bps"],
              bytes_msg=max(m["hidden_bytes"], m["output_bytes"]) + 48, bytes_out=m["output_bytes"] + 48)
    alone = predict(st["full_s"], st["component_s"], **kw)
    # the same with the component times measured while both processes ran (shared caches and memory)
    together = predict(st["full_s"], m["async_round_compute_s"], **kw)
    measured = cpu["speedup_2p_vs_1p1t"]
    return dict(inputs=dict(t_full_s=st["full_s"], t_components_alone_s=st["component_s"],
                            t_components_concurrent_s=m["async_round_compute_s"], t_host_s=m["outside_transformer_s"],
                            allgather_latency_s=ag["latency_s"], allgather_bandwidth_Bps=ag["bandwidth_Bps"],
                            bytes_msg=kw["bytes_msg"]),
                predicted_from_components_alone=alone, predicted_from_components_concurrent=together,
                measured_speedup=measured, error_alone=alone["speedup"] / measured - 1,
                error_concurrent=together["speedup"] / measured - 1)


def block_flops(hidden: int, tokens: int, text: int, batch: int) -> float:
    """FLOPs of one transformer block (2 x MACs): self-attention, optional cross-attention, 4x MLP."""
    d, n = hidden, tokens
    macs = n * 4 * d * d + 2 * n * n * d           # q, k, v, out projections; QK^T and AV
    if text:
        macs += 2 * n * d * d + 2 * text * d * d + 2 * n * text * d  # q, out; k, v of the text; attention
    macs += n * 8 * d * d                           # MLP 4x
    return 2.0 * batch * macs


def gpu_predictions(hw: dict, steps: int, warm_up: int) -> list[dict]:
    rows = []
    for m in MODELS:
        batch = 2 * m["images"]  # classifier-free guidance
        mfu = hw["mfu_large"] if batch * m["tokens"] >= 4096 else hw["mfu_small"]  # by the GEMMs' rows
        t_block = (block_flops(m["hidden"], m["tokens"], m["text"], batch) / (hw["peak_bf16_flops"] * mfu)
                   + hw["kernels_per_block"] * hw["kernel_launch_s"])
        t_edges = 20 * hw["kernel_launch_s"]  # patch embedding, timestep embedding, final layer
        t_full = m["blocks"] * t_block + 2 * t_edges
        hidden_bytes = batch * m["tokens"] * m["hidden"] * hw["bytes_per_element"]
        out_bytes = batch * m["tokens"] * m["patch"] ** 2 * m["out_channels"] * hw["bytes_per_element"]
        for devices in (2, 4, 8):
            for stride in (1, 2):
                n = devices - stride + 1
                if n < 2 or n > m["blocks"]:
                    continue
                per = m["blocks"] // n
                comps = [per * t_block + (t_edges if i in (0, n - 1) else 0) for i in range(n)]
                comps[-1] += (m["blocks"] - per * n) * t_block
                p = predict(t_full, comps, hw["host_per_step_s"], steps, warm_up, stride, hw["allgather_latency_s"],
                            hw["allgather_busbw_Bps"], max(hidden_bytes, out_bytes), out_bytes,
                            hw["bookkeeping_per_round_s"])
                rows.append(dict(model=m["name"], images=m["images"], transformer_batch=batch,
                                 source="FLOPs and assumptions", t_full_ms=t_full * 1e3, block_ms=t_block * 1e3,
                                 message_MB=hidden_bytes / 1e6, **p))
    return rows


def main(argv=None):
    ap = harness.parser(__doc__, threads=None)
    ap.add_argument("--cpu-json", default=str(harness.RESULTS / "asyncdiff_cpu.json"))
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--warm-up", type=int, default=3)
    args = harness.parse(ap, argv)
    cpu = json.loads(Path(args.cpu_json).read_text())
    check = cpu_check(cpu)
    gpu = gpu_predictions(H100, args.steps, args.warm_up)
    a, c, i = check["predicted_from_components_alone"], check["predicted_from_components_concurrent"], check["inputs"]
    formula = __doc__.split("\n\n")[1]
    res = dict(model="bench/asyncdiff_cost_model.py", formula=formula, cpu_check=check, h100_assumptions=H100,
               h100_models=MODELS, steps=args.steps, warm_up=args.warm_up, h100_predictions=gpu)
    md = ["# AsyncDiff cost model (`bench/asyncdiff_cost_model.py`)", "", "```", formula.strip(), "```", "",
          "## Check against the CPU measurement", "",
          f"From `asyncdiff_cpu.json` ({cpu['cpu']}, {cpu['date']}): transformer call {i['t_full_s'] * 1e3:.1f} ms, "
          "components alone " + ", ".join(f"{x * 1e3:.1f}" for x in i["t_components_alone_s"]) + " ms, while both ran "
          + ", ".join(f"{x * 1e3:.1f}" for x in i["t_components_concurrent_s"]) + " ms; gloo all_gather "
          f"{i['allgather_latency_s'] * 1e6:.0f} us + {i['bytes_msg'] / 1e6:.2f} MB at "
          f"{i['allgather_bandwidth_Bps'] / 1e9:.2f} GB/s.", ""]
    md += harness.table(["", "speedup, 2 processes vs 1 process x 1 thread"], [
        [f"ideal ({cpu['warm_up']} of {cpu['steps']} steps whole)", f"{a['ideal_speedup']:.2f}x"],
        ["predicted, components timed alone", f"{a['speedup']:.2f}x"],
        ["predicted, components timed while both processes ran", f"{c['speedup']:.2f}x"],
        ["measured", f"{check['measured_speedup']:.2f}x"]], ["---", "---:"])
    md += ["", "## Predictions for H100s over NVLink", "",
           "Assumptions: " + "; ".join(f"`{k}` = {v}" for k, v in H100.items()) + ". Block time = FLOPs / "
           "(peak x MFU) + launches; the components split the blocks evenly; one all_gather per round of the "
           f"larger of residual stream and output per rank; {args.steps} steps, {args.warm_up} warm-up steps. N "
           "components on N + stride - 1 GPUs.", ""]
    md += harness.table(["model", "images", "GPUs", "components", "stride", "transformer call (1 GPU)",
                         "predicted speedup", "ideal", "collective share"],
                        [[r["model"], r["images"], r["devices"], r["components"], r["stride"],
                          f"{r['t_full_ms']:.2f} ms", f"{r['speedup']:.2f}x", f"{r['ideal_speedup']:.2f}x",
                          f"{100 * r['comm_fraction']:.1f}%"] for r in gpu], ["---"] + ["---:"] * 8)
    harness.write_result(args.out, "asyncdiff_cost_model", res, "\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
