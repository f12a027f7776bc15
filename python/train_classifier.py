"""Train the bundled digit classifier (the judge of generated samples) on 2 CPU cores in ~2 minutes.

    python python/train_classifier.py --seed 0

scikit-learn digits upsampled to 16x16 in [-1, 1]; 20% held out (stratified, seeded) for the
reported accuracy; shift augmentation plus light Gaussian noise so that slightly imperfect
generated digits are still read. Writes l2c_kernels/models/weights/digit-classifier.{safetensors,json}.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from l2c_kernels.models.classifier import NAME, DigitClassifier  # noqa: E402
from l2c_kernels.models.digits_data import augment, load_digits_tensor  # noqa: E402
from l2c_kernels.models.registry import WEIGHTS_DIR  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=WEIGHTS_DIR)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)

    x, y = load_digits_tensor(16)
    from sklearn.model_selection import train_test_split

    tr_idx, te_idx = train_test_split(list(range(len(y))), test_size=0.2, random_state=args.seed, stratify=y.numpy())
    xtr, ytr, xte, yte = x[tr_idx], y[tr_idx], x[te_idx], y[te_idx]
    model = DigitClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    steps = args.epochs * ((len(xtr) + args.batch - 1) // args.batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=steps)
    t0 = time.time()
    bar = tqdm(range(args.epochs), desc="digit classifier")
    for _ in bar:
        model.train()
        perm = torch.randperm(len(xtr), generator=gen)
        for i in range(0, len(xtr), args.batch):
            idx = perm[i:i + args.batch]
            xb = augment(xtr[idx], generator=gen)
            xb = (xb + 0.1 * torch.randn(xb.shape, generator=gen)).clamp(-1, 1)
            loss = F.cross_entropy(model(xb), ytr[idx], label_smoothing=0.05)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        model.eval()
        with torch.no_grad():
            acc = (model(xte).argmax(1) == yte).float().mean().item()
        bar.set_postfix(loss=f"{loss.item():.3f}", test_acc=f"{acc:.3f}")
    from safetensors.torch import save_file

    args.out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(args.out / f"{NAME}.safetensors"))
    info = dict(name=NAME, config={"width": 32}, held_out_accuracy=round(acc, 4), held_out=len(te_idx),
                epochs=args.epochs, seed=args.seed, wall_time_s=round(time.time() - t0, 1),
                command="python python/train_classifier.py " + " ".join(argv if argv is not None else sys.argv[1:]))
    (args.out / f"{NAME}.json").write_text(json.dumps(info, indent=1))
    print(f"held-out accuracy {acc:.4f} on {len(te_idx)} digits, {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
