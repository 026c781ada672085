"""Measurements for the mini model's card (all computed, none typed in).

- :func:`training_curves`: the training log as a tidy frame;
- :func:`vae_psnr`: VAE reconstruction PSNR per validation image;
- :func:`train_toy_classifier` / :func:`generation_recognition`: a small CNN
  trained on real toy-world images judges class-conditional samples;
- :func:`feature_pck`: keypoint-matching PCK@0.1 of single activations for
  the trained U-Net, the same architecture with random weights, and raw pixels.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..data.toyworld import CLASS_NAMES, ToyWorld


def model_folder(model: str) -> Path:
    """The pipeline folder of ``model`` (``mini`` or a local path), where the training files are."""
    from . import MINI_PATH

    return MINI_PATH if model == "mini" else Path(model)


def training_curves(log_csv: str | Path) -> pd.DataFrame:
    """Tidy training log (stage, step, loss, lr); a resumed run's repeated steps keep their last value."""
    df = pd.read_csv(log_csv)
    return df.drop_duplicates(["stage", "step"], keep="last").sort_values(["stage", "step"]).reset_index(drop=True)


def _images(world: ToyWorld, idx) -> torch.Tensor:
    return torch.stack([torch.tensor(world[i].image).permute(2, 0, 1) for i in idx]).float() / 127.5 - 1


@torch.no_grad()
def vae_psnr(pipe, world: ToyWorld, batch: int = 50) -> pd.DataFrame:
    """PSNR (dB, on 8-bit images) of VAE reconstructions (posterior mean) per image."""
    rows = []
    for s in range(0, len(world), batch):
        idx = list(range(s, min(s + batch, len(world))))
        x = _images(world, idx)
        rec = pipe.vae.decode(pipe.vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
        a, b = ((x + 1) * 127.5).round(), ((rec + 1) * 127.5).round()
        mse = (a - b).pow(2).flatten(1).mean(1)
        for i, m in zip(idx, mse):
            rows.append(
                dict(
                    image_id=world[i].image_id,
                    complexity=world[i].complexity,
                    psnr=float(10 * torch.log10(255**2 / m.clamp_min(1e-10))),
                )
            )
    return pd.DataFrame(rows)


@torch.no_grad()
def reconstructions(pipe, world: ToyWorld, idx) -> np.ndarray:
    """(N, H, W, 3) uint8 VAE reconstructions of ``world[idx]``."""
    x = _images(world, idx)
    rec = pipe.vae.decode(pipe.vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
    return ((rec + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()


class ToyCNN(nn.Module):
    """A small CNN classifier for 64 px toy-world images."""

    def __init__(self, n_classes: int = len(CLASS_NAMES)):
        super().__init__()
        c = [3, 32, 64, 96]
        layers = []
        for a, b in zip(c[:-1], c[1:]):
            layers += [nn.Conv2d(a, b, 3, padding=1), nn.BatchNorm2d(b), nn.ReLU(), nn.MaxPool2d(2)]
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(c[-1], n_classes)

    def forward(self, x):
        return self.head(self.body(x).mean((2, 3)))


def train_toy_classifier(n_train: int = 2000, epochs: int = 3, seed: int = 0, size: int = 64) -> tuple[ToyCNN, float]:
    """Train :class:`ToyCNN` on real toy-world training images (flip augmentation);
    returns the model and its accuracy on 300 real test images."""
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = ToyCNN()
    train = ToyWorld("train", n=n_train, size=size, seed=1000 + seed)  # other images than the model saw
    x = _images(train, range(n_train))
    y = torch.tensor([train[i].label for i in range(n_train)])
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
    net.train()
    for _ in range(epochs):
        for b in torch.randperm(n_train, generator=g).split(64):
            xb = x[b]
            flip = torch.rand(len(b), generator=g) < 0.5
            xb = torch.where(flip[:, None, None, None], xb.flip(-1), xb)
            loss = F.cross_entropy(net(xb), y[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
    net.eval()
    test = ToyWorld("test", n=300, size=size)
    with torch.no_grad():
        pred = net(_images(test, range(300))).argmax(1)
    acc = float((pred == torch.tensor([test[i].label for i in range(300)])).float().mean())
    return net, acc


@torch.no_grad()
def generate(
    pipe, prompts: list[str], steps: int = 30, guidance: float = 4.0, seed: int = 0, size: int = 64
) -> np.ndarray:
    """(N, H, W, 3) uint8 samples, one per prompt (DDIM, classifier-free guidance)."""
    g = torch.Generator().manual_seed(seed)
    out = pipe(
        prompts,
        num_inference_steps=steps,
        guidance_scale=guidance,
        height=size,
        width=size,
        generator=g,
        output_type="np",
    )
    return (out.images * 255).round().astype(np.uint8)


@torch.no_grad()
def generation_recognition(
    pipe, clf: nn.Module, n_per_class: int = 4, steps: int = 30, guidance: float = 4.0, seed: int = 0
):
    """Generate ``n_per_class`` samples for "a photo of a <class>" and classify them.

    Returns ``(frame, images)``: one row per sample (class, predicted, correct)."""
    prompts = [f"a photo of a {c}" for c in CLASS_NAMES for _ in range(n_per_class)]
    images = np.concatenate(
        [generate(pipe, prompts[i : i + 20], steps, guidance, seed + i) for i in range(0, len(prompts), 20)]
    )
    x = torch.tensor(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    pred = clf(x).argmax(1).numpy()
    labels = np.repeat(np.arange(len(CLASS_NAMES)), n_per_class)
    df = pd.DataFrame(
        dict(cls=[CLASS_NAMES[i] for i in labels], predicted=[CLASS_NAMES[i] for i in pred], correct=pred == labels)
    )
    return df, images


def feature_pck(
    model: str, activations, n_pairs: int = 40, seeds=(0, 1, 2), n_images: int = 100, cache_dir: str = "cache/features"
) -> pd.DataFrame:
    """PCK@0.1 (img) of each activation alone for the trained U-Net and for
    the same architecture with random weights, plus raw pixels; tidy rows."""
    import copy

    from ..tables import BenchConfig, cache_features, correspondence, pixel_features
    from . import load
    from .tiny import random_like

    cfg = BenchConfig(model=model, n_test=n_images, cache_dir=cache_dir)
    worlds = {"train": ToyWorld("train", n=32), "test": ToyWorld("test", n=n_images)}
    pipe = load(model)
    rnd = copy.copy(pipe)
    rnd.unet = random_like(pipe, seed=0)
    rows = []
    for weights, p, name in (("trained", pipe, model), ("random", rnd, f"{model}-random")):
        for a in activations:
            f = cache_features(p, name, worlds, [a], cfg)
            for s in seeds:
                rows.append(
                    dict(
                        weights=weights,
                        activation=a,
                        seed=s,
                        pck=correspondence(f, worlds["test"], "test", n_pairs, s)["PCK@0.1 img"],
                    )
                )
    f = pixel_features(worlds)
    for s in seeds:
        rows.append(
            dict(
                weights="raw pixels",
                activation="pixels",
                seed=s,
                pck=correspondence(f, worlds["test"], "test", n_pairs, s)["PCK@0.1 img"],
            )
        )
    return pd.DataFrame(rows)


def describe(pipe) -> pd.DataFrame:
    """Components of a pipeline with their class and parameter count."""
    rows = []
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        m = getattr(pipe, name, None)
        if m is not None:
            rows.append(dict(component=name, cls=type(m).__name__, parameters=sum(p.numel() for p in m.parameters())))
    return pd.DataFrame(rows)
