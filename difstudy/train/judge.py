"""Train the toy-world judge (:class:`difstudy.judge.ToyCNN`)::

    python -m difstudy.train.judge --out difstudy/assets/judge

Real toy-world images only (a seed the mini model never trained on), random
horizontal flips and colour-channel shuffles (classes differ in shape, not
colour), AdamW with a one-cycle learning rate. Writes ``model.safetensors``
and ``meta.json`` (accuracy on real test images, epochs, seconds) atomically.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..data.toyworld import CLASS_NAMES, ToyWorld, stack
from ..judge import ToyCNN, predict, to_input

TRAIN_SEED = 1000  # toy-world seed of the judge's training images (the mini model used seed 0)


def render(split: str, n: int, seed: int, size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    world = ToyWorld(split, n=n, size=size, seed=seed)
    samples = list(tqdm(world, total=n, desc=f"render {split}", mininterval=5))
    return stack(samples, "image"), np.array([s.label for s in samples])


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    flip = torch.rand(len(x), generator=gen) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    perm = torch.stack([torch.randperm(3, generator=gen) for _ in range(len(x))])
    return torch.gather(x, 1, perm[:, :, None, None].expand_as(x))


def rendered(work: Path | None, n_train: int, n_test: int):
    """Training and test images, rendered once and kept in ``work/data.npz`` when ``work`` is given."""
    path = work / f"data_{n_train}_{n_test}.npz" if work else None
    if path is not None and path.exists():
        d = np.load(path)
        return d["xs"], d["ys"], d["xt"], d["yt"]
    xs, ys = render("train", n_train, TRAIN_SEED)
    xt, yt = render("test", n_test, 0)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npz")
        np.savez(tmp, xs=xs, ys=ys, xt=xt, yt=yt)
        os.replace(tmp, path)
    return xs, ys, xt, yt


def train(
    n_train: int = 8000,
    n_test: int = 500,
    epochs: int = 12,
    batch: int = 64,
    lr: float = 3e-3,
    seed: int = 0,
    work: Path | None = None,
):
    """Returns (model, meta) with the accuracy on ``n_test`` real test images."""
    t0, c0 = time.time(), time.process_time()
    xs, ys, xt, yt = rendered(work, n_train, n_test)
    x, y = to_input(xs), torch.from_numpy(ys)
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = ToyCNN(n_classes=len(CLASS_NAMES))
    steps_per_epoch = (n_train + batch - 1) // batch
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * steps_per_epoch)
    history = []
    for ep in range(epochs):
        net.train()
        losses = []
        for b in tqdm(torch.randperm(n_train, generator=gen).split(batch), desc=f"epoch {ep + 1}", mininterval=10):
            loss = F.cross_entropy(net(augment(x[b], gen)), y[b])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
        acc = float((predict(net, xt) == yt).mean())
        history.append(dict(epoch=ep + 1, loss=float(np.mean(losses)), test_accuracy=acc))
        print(f"epoch {ep + 1}: loss {np.mean(losses):.3f}, real test accuracy {acc:.3f}", flush=True)
    meta = dict(
        test_accuracy=history[-1]["test_accuracy"],
        n_train=n_train,
        n_test=n_test,
        train_images=f"ToyWorld('train', seed={TRAIN_SEED})",
        test_images="ToyWorld('test', seed=0)",
        epochs=epochs,
        batch=batch,
        lr=lr,
        seed=seed,
        wall_seconds=round(time.time() - t0, 1),
        cpu_seconds=round(time.process_time() - c0, 1),
        history=history,
    )
    return net.eval(), meta


def save(net, meta: dict, out: Path) -> None:
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    tmp = out / ".model.tmp"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp))
    os.replace(tmp, out / "model.safetensors")
    tmp = out / ".meta.tmp"
    tmp.write_text(json.dumps(meta, indent=2) + "\n")
    os.replace(tmp, out / "meta.json")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m difstudy.train.judge", description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("difstudy/assets/judge"))
    ap.add_argument("--n-train", type=int, default=8000)
    ap.add_argument("--n-test", type=int, default=500)
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--work", type=Path, default=None, help="keep the rendered images here (data_*.npz)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    net, meta = train(a.n_train, a.n_test, a.epochs, seed=a.seed, work=a.work)
    save(net, meta, a.out)
    print(f"judge: {meta['test_accuracy']:.1%} on {a.n_test} real test images -> {a.out}")


if __name__ == "__main__":
    main()
