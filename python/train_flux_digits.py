"""Train the bundled flow-matching model ``flux-digits`` (a diffusers FluxTransformer2DModel) on 2 CPU cores.

    python python/train_flux_digits.py --steps 3000 --batch 32 --warmup 50 --seed 0 --threads 1 --max-minutes 75

Rectified flow, the loss Flux models are trained with: ``x_t = (1 - t) x0 + t noise``, the transformer
(called with ``timestep = t`` as FluxPipeline does, ``t / 1000`` of the scheduler's scale) predicts the
velocity ``noise - x0``; ``t`` logit-normal (mean 0, std 1; ``--t-sampling uniform`` for uniform). Pixels
are packed 2x2 into 64 tokens with FluxPipeline's img_ids / txt_ids. Captions through the caption encoder
(trained with the model) plus its masked mean as the pooled projection; 10% of captions are dropped to the
empty caption for classifier-free guidance. AdamW with warm-up and cosine decay, gradient clipping, EMA
weights (those are shipped). With ``--max-minutes`` the cosine decay follows whichever of step count and
elapsed time is further along, so a run cut by the time cap still ends at the low learning rate.
Writes ``l2c_kernels/models/weights/flux-digits.safetensors`` and ``flux-digits.json`` (config, losses,
the exact command), checkpointing as it goes so an interrupted run still leaves usable weights.
"""
from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "python"))

from l2c_kernels.models import flux_digits  # noqa: E402
from l2c_kernels.models.digits_data import augment, load_digits_tensor  # noqa: E402
from l2c_kernels.models.registry import build, save_bundle  # noqa: E402
from train_loop import EmaTrainer, dropped_captions, warmup_cosine  # noqa: E402



def sample_t(n: int, how: str, gen: torch.Generator) -> torch.Tensor:
    """Training times in (0, 1): logit-normal(0, 1) (SD3 / Flux) or uniform."""
    if how == "logit-normal":
        return torch.sigmoid(torch.randn(n, generator=gen))
    if how == "uniform":
        return torch.rand(n, generator=gen).clamp(1e-4, 1 - 1e-4)
    raise ValueError(f"unknown t sampling {how!r}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--name", default="flux-digits", choices=["flux-digits", "flux-heldout"],
                    help="which model of the family: flux-digits, or flux-heldout (the held-out model of the "
                         "comparisons: another size, train it with another --seed)")
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--ema", type=float, default=0.995)
    ap.add_argument("--caption-dropout", type=float, default=0.1)
    ap.add_argument("--t-sampling", choices=["logit-normal", "uniform"], default="logit-normal")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-minutes", type=float, default=None, help="stop early (and save) after this long")
    ap.add_argument("--out", type=Path, default=ROOT / "l2c_kernels" / "models" / "weights")
    ap.add_argument("--checkpoint-every", type=int, default=100)
    ap.add_argument("--log-every", type=int, default=25)
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)

    NAME = args.name
    bundle = build(NAME)
    model, text = bundle.transformer, bundle.text_encoder
    trainer = EmaTrainer([model, text], args.lr, args.ema)
    ema = trainer.ema_modules

    x_all, y_all = load_digits_tensor(bundle.image_size)
    n = len(x_all)
    img_ids = flux_digits.image_ids()
    txt_ids = flux_digits.text_ids(text.config["max_length"])
    log, t0 = [], time.time()
    print(f"training {NAME}: {trainer.num_parameters() / 1e6:.2f} M parameters, {n} digits, "
          f"batch {args.batch}, {args.steps} steps, t {args.t_sampling}", flush=True)

    # on a shared machine the time cap may come first: the decay follows whichever is nearer
    lr_at = warmup_cosine(args.lr, args.warmup, args.steps, t0, args.max_minutes)

    def save(step, final):
        info = dict(model=NAME, steps_done=step, steps=args.steps, batch=args.batch, lr=args.lr, seed=args.seed,
                    ema=args.ema, caption_dropout=args.caption_dropout, t_sampling=args.t_sampling,
                    objective="rectified flow: x_t = (1 - t) x0 + t noise, target noise - x0",
                    guidance="classifier-free (caption dropout)", threads=args.threads, final=final,
                    wall_time_s=round(time.time() - t0, 1),
                    command="python python/train_flux_digits.py "
                    + " ".join(argv if argv is not None else sys.argv[1:]),
                    loss_log=log)
        save_bundle(NAME, ema[0], ema[1], args.out, info, scheduler_config=bundle.scheduler_config)

    loss_ema, step = None, 0
    for step in range(args.steps):
        idx = torch.randint(0, n, (args.batch,), generator=gen)
        x0 = flux_digits.pack(augment(x_all[idx], generator=gen))
        labels = y_all[idx]
        noise = torch.randn(x0.shape, generator=gen)
        t = sample_t(args.batch, args.t_sampling, gen)
        xt = (1 - t.view(-1, 1, 1)) * x0 + t.view(-1, 1, 1) * noise
        caps = dropped_captions(labels, args.caption_dropout, gen)
        ids, mask = text.tokenizer(caps)
        enc, pooled = flux_digits.caption_embeddings(text, ids, mask)
        v = model(hidden_states=xt, encoder_hidden_states=enc, pooled_projections=pooled, timestep=t,
                  img_ids=img_ids, txt_ids=txt_ids).sample
        loss = F.mse_loss(v, noise - x0)
        trainer.step(loss, step, lr_at(step))
        loss_ema = loss.item() if loss_ema is None else 0.98 * loss_ema + 0.02 * loss.item()
        if (step + 1) % args.log_every == 0:
            log.append([step + 1, round(loss_ema, 5), round(time.time() - t0, 1)])
            print(f"step {step + 1}/{args.steps} loss {loss_ema:.4f} lr {lr_at(step):.2e} "
                  f"{time.time() - t0:.0f} s", flush=True)
        if (step + 1) % args.checkpoint_every == 0:
            save(step + 1, False)
        if args.max_minutes and time.time() - t0 > 60 * args.max_minutes:
            print(f"time budget reached after {step + 1} steps", flush=True)
            break
    save(step + 1, True)
    print(f"done: {step + 1} steps in {time.time() - t0:.0f} s, loss {loss_ema:.4f}", flush=True)


if __name__ == "__main__":
    main()
