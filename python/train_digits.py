"""Train a bundled digits diffusion transformer (DiT or PixArt-style) on 2 CPU cores.

    python python/train_digits.py --model dit-digits    --steps 3000 --seed 0
    python python/train_digits.py --model pixart-digits --steps 3000 --seed 0

Pixel space (16x16x1 in [-1, 1]), epsilon prediction, DDPM linear noise schedule, 10%
null-class / empty-caption dropout for classifier-free guidance, AdamW with warm-up and cosine
decay, gradient clipping, EMA weights (those are shipped). Writes
``l2c_kernels/models/weights/<model>.safetensors`` and ``<model>.json`` (config + training log),
and checkpoints as it goes so an interrupted run still leaves usable weights.
"""
from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "python"))

from l2c_kernels.models import configs  # noqa: E402
from l2c_kernels.models.digits_data import augment, load_digits_tensor  # noqa: E402
from l2c_kernels.models.registry import build, save_bundle  # noqa: E402
from train_loop import EmaTrainer, dropped_captions, warmup_cosine  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=["dit-digits", "pixart-digits"], required=True)
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--ema", type=float, default=0.995)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-minutes", type=float, default=None, help="stop early (and save) after this long")
    ap.add_argument("--out", type=Path, default=ROOT / "l2c_kernels" / "models" / "weights")
    ap.add_argument("--checkpoint-every", type=int, default=250)
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)

    bundle = build(args.model)
    model, text = bundle.transformer, bundle.text_encoder
    trainer = EmaTrainer([model] + ([text] if text is not None else []), args.lr, args.ema)
    ema = trainer.ema_modules

    from diffusers import DDPMScheduler

    sched = DDPMScheduler(**{k: v for k, v in configs.NOISE_SCHEDULE.items() if k != "clip_sample_range"})
    acp = sched.alphas_cumprod

    x_all, y_all = load_digits_tensor(configs.IMAGE_SIZE)
    n = len(x_all)
    log, t0 = [], time.time()
    print(f"training {args.model}: {trainer.num_parameters() / 1e6:.2f} M parameters, "
          f"{n} digits, batch {args.batch}, {args.steps} steps", flush=True)
    lr_at = warmup_cosine(args.lr, args.warmup, args.steps)

    def save(step, final):
        info = dict(model=args.model, steps_done=step, steps=args.steps, batch=args.batch, lr=args.lr,
                    seed=args.seed, ema=args.ema, threads=args.threads, final=final,
                    wall_time_s=round(time.time() - t0, 1),
                    command="python python/train_digits.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                    loss_log=log)
        save_bundle(args.model, ema[0], ema[1] if len(ema) > 1 else None, args.out, info)

    bar = tqdm(range(args.steps), desc=args.model, mininterval=5)
    loss_ema = None
    for step in bar:
        idx = torch.randint(0, n, (args.batch,), generator=gen)
        x0 = augment(x_all[idx], generator=gen)
        labels = y_all[idx]
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, sched.config.num_train_timesteps, (args.batch,), generator=gen)
        a = acp[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        if text is None:
            # DiT's label embedding drops 10% of labels to the null class itself in train mode
            out = model(xt, timestep=t, class_labels=labels).sample
        else:
            caps = dropped_captions(labels, 0.1, gen)
            ids, mask = text.tokenizer(caps)
            enc = text(ids, mask)
            out = model(xt, encoder_hidden_states=enc, encoder_attention_mask=mask, timestep=t,
                        added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample
        loss = F.mse_loss(out, noise)
        trainer.step(loss, step, lr_at(step))
        loss_ema = loss.item() if loss_ema is None else 0.98 * loss_ema + 0.02 * loss.item()
        bar.set_postfix(loss=f"{loss_ema:.4f}")
        if (step + 1) % 50 == 0:
            log.append([step + 1, round(loss_ema, 5), round(time.time() - t0, 1)])
        if (step + 1) % args.checkpoint_every == 0:
            save(step + 1, False)
        if args.max_minutes and time.time() - t0 > 60 * args.max_minutes:
            print(f"time budget reached after {step + 1} steps", flush=True)
            break
    save(step + 1, True)
    print(f"done: {step + 1} steps in {time.time() - t0:.0f} s, loss {loss_ema:.4f}", flush=True)


if __name__ == "__main__":
    main()
