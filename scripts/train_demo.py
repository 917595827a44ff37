"""Train the embedded demo classifier and write `camshaft/demo/weights.pt`.

Images come fresh from `render_sample` at every step (the generator already randomises shape
pose, size, position, colour and clutter, so there is no further augmentation). Runs on CPU in
a few minutes; prints held-out accuracy and the CAM pointing game on a separately seeded set.

    python -m scripts.train_demo [--steps 600] [--seed 0] [--out camshaft/demo/weights.pt]

(from the repository root; or `python scripts/train_demo.py` with camshaft installed.)
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from camshaft.demo.model import CLASS_NAMES, WEIGHTS_PATH, build_demo_model, preprocess
from camshaft.demo.shapes import render_sample

EVAL_SEED_OFFSET = 1_000_003  # held-out images never share a stream with training images


def make_batch(rng: np.random.Generator, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`n` fresh samples: images (n, 3, H, W), labels (n,), boxes (n, 4) as x0, y0, x1, y1."""
    samples = [render_sample(rng) for _ in range(n)]
    x = preprocess([s[0] for s in samples])
    y = torch.tensor([s[1] for s in samples])
    boxes = torch.tensor([s[2] for s in samples])
    return x, y, boxes


@torch.no_grad()
def cam_pointing(model: torch.nn.Module, x: torch.Tensor, boxes: torch.Tensor, *, tol: float = 8.0
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Predictions (B,) and whether the predicted class's CAM peak lies in the box (B,)."""
    feats = model.features(x)  # (B, K, h, w)
    pred = model.fc(torch.flatten(model.avgpool(feats), 1)).argmax(1)  # (B,)
    cams = torch.einsum("bk,bkhw->bhw", model.fc.weight[pred], feats)  # (B, h, w)
    h, w = cams.shape[1:]
    peak = cams.flatten(1).argmax(1)
    cy = (peak // w + 0.5) * x.shape[2] / h  # cell centre, image pixels
    cx = (peak % w + 0.5) * x.shape[3] / w
    x0, y0, x1, y1 = boxes.float().unbind(1)
    hit = (cx >= x0 - tol) & (cx <= x1 + tol) & (cy >= y0 - tol) & (cy <= y1 + tol)
    return pred, hit


def evaluate(model: torch.nn.Module, *, seed: int, n: int) -> dict[str, float]:
    """Accuracy, per-class accuracy and CAM pointing game on `n` held-out images."""
    model.eval()
    rng = np.random.default_rng(seed)
    preds, labels, hits = [], [], []
    for start in range(0, n, 250):
        x, y, boxes = make_batch(rng, min(250, n - start))
        pred, hit = cam_pointing(model, x, boxes)
        preds.append(pred), labels.append(y), hits.append(hit)
    pred, y, hit = torch.cat(preds), torch.cat(labels), torch.cat(hits)
    out = {"accuracy": (pred == y).float().mean().item(), "pointing": hit.float().mean().item()}
    for c, name in enumerate(CLASS_NAMES):
        out[f"acc/{name}"] = (pred[y == c] == c).float().mean().item()
    return out


def train(*, steps: int, batch_size: int, lr: float, seed: int) -> torch.nn.Module:
    """AdamW with a one-cycle schedule over freshly rendered batches."""
    model = build_demo_model(generator=torch.Generator().manual_seed(seed))
    model = model.to(memory_format=torch.channels_last).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    rng = np.random.default_rng(seed)
    t0, running = time.perf_counter(), 0.0
    for step in range(1, steps + 1):
        x, y, _ = make_batch(rng, batch_size)
        loss = F.cross_entropy(model(x.to(memory_format=torch.channels_last)), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        running = 0.9 * running + 0.1 * loss.item() if step > 1 else loss.item()
        if step % 50 == 0 or step == steps:
            print(f"step {step:4d}/{steps}  loss {running:.4f}  {time.perf_counter() - t0:6.1f}s",
                  flush=True)
    return model.to(memory_format=torch.contiguous_format).eval()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-n", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=WEIGHTS_PATH)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    n_params = sum(p.numel() for p in build_demo_model().parameters())
    print(f"classes {CLASS_NAMES}, {n_params} parameters")
    t0 = time.perf_counter()
    model = train(steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed)
    train_s = time.perf_counter() - t0
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, args.out)
    print(f"trained in {train_s:.1f}s; wrote {args.out} ({args.out.stat().st_size} bytes)")

    metrics = evaluate(model, seed=args.seed + EVAL_SEED_OFFSET, n=args.eval_n)
    print(f"held-out ({args.eval_n} images): accuracy {metrics['accuracy']:.4f}, "
          f"CAM pointing game {metrics['pointing']:.4f}")
    print("  per class: " + ", ".join(
        f"{name} {metrics[f'acc/{name}']:.3f}" for name in CLASS_NAMES))


if __name__ == "__main__":
    main()
