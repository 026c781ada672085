"""Train ``difstudy-mini`` on the toy world, on CPU::

    python -m difstudy.models.train_mini --out runs/mini --export difstudy/models/difstudy-mini

Stages (each resumable from its last checkpoint in ``--out``):

1. ``data``: render ``--n-train`` toy-world training images and tokenise their
   captions (generic, fine-grained, empty).
2. ``vae``: train the VAE (L1 + MSE reconstruction, KL weight 1e-6), then set
   its ``scaling_factor`` to 1 / std of the training latents (as SD does).
3. ``unet``: train U-Net and text encoder jointly with the epsilon objective on
   VAE latents; captions are fine-grained (60%), generic (30%) or empty (10%,
   so classifier-free guidance and empty-prompt feature extraction are in
   distribution). EMA of the weights (decay 0.999) is what gets exported.
4. ``export``: write a diffusers ``StableDiffusionPipeline`` folder
   (safetensors, fp32) that ``difstudy.models.load("mini")`` reads offline,
   with the training log (``training_log.csv``) and arguments beside it.

Every ``--ckpt-every`` steps the stage's state (weights, optimiser, EMA, RNG,
step) is written atomically, so a killed run resumes where it stopped. Losses
go to ``--out/log.csv`` (stage, step, loss, lr, seconds).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..data.toyworld import ToyWorld
from . import mini


def _atomic_save(obj, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


class _Log:
    def __init__(self, path: Path):
        self.path = path
        new = not path.exists()
        self.f = open(path, "a", newline="")
        self.w = csv.writer(self.f)
        if new:
            self.w.writerow(["stage", "step", "loss", "lr", "seconds"])

    def __call__(self, *row):
        self.w.writerow(row)
        self.f.flush()


def _lr(step: int, total: int, base: float, warmup: int = 100) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    return base * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def make_data(out: Path, n: int, seed: int, tokenizer) -> dict:
    path = out / "data.npz"
    if path.exists():
        d = np.load(path)
        if len(d["images"]) == n:
            return dict(d)
    world = ToyWorld("train", n=n, size=mini.IMAGE_SIZE, seed=seed)
    images, labels, generic, fine = [], [], [], []
    for s in tqdm(world, total=n, desc="render toy world", mininterval=5):
        images.append(s.image)
        labels.append(s.label)
        generic.append(s.caption)
        fine.append(s.fine_caption)

    def tok(texts):
        return tokenizer(
            texts, padding="max_length", max_length=mini.TEXT_LENGTH, truncation=True, return_tensors="np"
        ).input_ids

    d = dict(
        images=np.stack(images),
        labels=np.array(labels),
        ids_generic=tok(generic),
        ids_fine=tok(fine),
        ids_empty=tok([""]),
    )
    tmp = out / "data.tmp.npz"
    np.savez(tmp, **d)
    os.replace(tmp, path)
    return d


def _to_tensor(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1)


def train_vae(out: Path, data: dict, steps: int, batch: int, lr: float, seed: int, log: _Log, ckpt_every: int):
    vae = mini.build_vae()
    ckpt = out / "vae.pt"
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    step = 0
    gen = torch.Generator().manual_seed(seed)
    if ckpt.exists():
        st = torch.load(ckpt, weights_only=False)
        vae.load_state_dict(st["model"])
        opt.load_state_dict(st["opt"])
        gen.set_state(st["gen"])
        step = st["step"]
    n = len(data["images"])
    t0 = time.time()
    bar = tqdm(total=steps, initial=step, desc="vae", mininterval=10)
    while step < steps:
        for g in opt.param_groups:
            g["lr"] = _lr(step, steps, lr)
        idx = torch.randint(0, n, (batch,), generator=gen).numpy()
        x = _to_tensor(data["images"][idx])
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen)
        rec = vae.decode(z).sample
        loss = F.l1_loss(rec, x) + F.mse_loss(rec, x) + 1e-6 * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        bar.update(1)
        log("vae", step, f"{loss.item():.5f}", f"{opt.param_groups[0]['lr']:.2e}", f"{time.time() - t0:.1f}")
        if step % ckpt_every == 0 or step == steps:
            _atomic_save(dict(model=vae.state_dict(), opt=opt.state_dict(), gen=gen.get_state(), step=step), ckpt)
    bar.close()
    return vae


@torch.no_grad()
def encode_latents(out: Path, vae, data: dict, batch: int = 256) -> dict:
    path = out / "latents.npz"
    if path.exists():
        return dict(np.load(path))
    vae.eval()
    means, stds = [], []
    for i in tqdm(range(0, len(data["images"]), batch), desc="encode latents", mininterval=10):
        post = vae.encode(_to_tensor(data["images"][i : i + batch])).latent_dist
        means.append(post.mean.numpy())
        stds.append(post.std.numpy())
    mean, std = np.concatenate(means), np.concatenate(stds)
    scaling = float(1.0 / np.sqrt(mean.var() + (std**2).mean()))
    d = dict(mean=mean.astype(np.float32), std=std.astype(np.float32), scaling=np.array(scaling))
    tmp = out / "latents.tmp.npz"
    np.savez(tmp, **d)
    os.replace(tmp, path)
    return d


def train_unet(
    out: Path, data: dict, lat: dict, steps: int, batch: int, lr: float, seed: int, log: _Log, ckpt_every: int
):
    from diffusers.training_utils import EMAModel

    torch.manual_seed(seed)
    tokenizer = mini.build_tokenizer()
    unet, te = mini.build_unet(), mini.build_text_encoder(tokenizer)
    params = list(unet.parameters()) + list(te.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-2)
    ema = EMAModel(params, decay=0.999, use_ema_warmup=True, power=0.75)
    sched = mini.build_noise_scheduler()
    gen = torch.Generator().manual_seed(seed + 1)
    step = 0
    ckpt = out / "unet.pt"
    if ckpt.exists():
        st = torch.load(ckpt, weights_only=False)
        unet.load_state_dict(st["unet"])
        te.load_state_dict(st["te"])
        opt.load_state_dict(st["opt"])
        ema.load_state_dict(st["ema"])
        gen.set_state(st["gen"])
        step = st["step"]
    n = len(lat["mean"])
    scaling = float(lat["scaling"])
    ids_g, ids_f = torch.from_numpy(data["ids_generic"]), torch.from_numpy(data["ids_fine"])
    ids_e = torch.from_numpy(data["ids_empty"])
    t0 = time.time()
    bar = tqdm(total=steps, initial=step, desc="unet", mininterval=10)
    while step < steps:
        for g in opt.param_groups:
            g["lr"] = _lr(step, steps, lr, warmup=200)
        idx = torch.randint(0, n, (batch,), generator=gen)
        mean, std = torch.from_numpy(lat["mean"][idx.numpy()]), torch.from_numpy(lat["std"][idx.numpy()])
        z0 = (mean + std * torch.randn(mean.shape, generator=gen)) * scaling
        u = torch.rand(batch, generator=gen)
        ids = torch.where((u < 0.6)[:, None], ids_f[idx], ids_g[idx])
        ids = torch.where((u >= 0.9)[:, None], ids_e.expand(batch, -1), ids)
        t = torch.randint(0, sched.config.num_train_timesteps, (batch,), generator=gen)
        noise = torch.randn(z0.shape, generator=gen)
        zt = sched.add_noise(z0, noise, t)
        pred = unet(zt, t, te(ids).last_hidden_state).sample
        loss = F.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema.step(params)
        step += 1
        bar.update(1)
        log("unet", step, f"{loss.item():.5f}", f"{opt.param_groups[0]['lr']:.2e}", f"{time.time() - t0:.1f}")
        if step % ckpt_every == 0 or step == steps:
            state = dict(unet=unet.state_dict(), te=te.state_dict(), opt=opt.state_dict(), ema=ema.state_dict())
            _atomic_save(dict(state, gen=gen.get_state(), step=step), ckpt)
    bar.close()
    ema.copy_to(params)
    return unet, te, tokenizer


def export(folder: Path, vae, unet, te, tokenizer, scaling: float, meta: dict) -> None:
    from diffusers import StableDiffusionPipeline

    vae.register_to_config(scaling_factor=scaling)
    pipe = StableDiffusionPipeline(
        vae=vae.eval(),
        text_encoder=te.eval(),
        tokenizer=tokenizer,
        unet=unet.eval(),
        scheduler=mini.build_sampling_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    folder.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(folder, safe_serialization=True)
    (folder / "difstudy_training.json").write_text(json.dumps(meta, indent=2) + "\n")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m difstudy.models.train_mini", description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("runs/mini"), help="run folder (checkpoints, log.csv)")
    ap.add_argument("--export", type=Path, default=None, help="write the diffusers pipeline folder here at the end")
    ap.add_argument("--n-train", type=int, default=16000)
    ap.add_argument("--vae-steps", type=int, default=2200)
    ap.add_argument("--unet-steps", type=int, default=6000)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--vae-lr", type=float, default=1e-3)
    ap.add_argument("--unet-lr", type=float, default=5e-4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ckpt-every", type=int, default=200)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    a.out.mkdir(parents=True, exist_ok=True)
    log = _Log(a.out / "log.csv")
    t_start = time.time()
    torch.manual_seed(a.seed)
    tokenizer = mini.build_tokenizer()
    data = make_data(a.out, a.n_train, a.seed, tokenizer)
    vae = train_vae(a.out, data, a.vae_steps, a.batch, a.vae_lr, a.seed, log, a.ckpt_every)
    lat = encode_latents(a.out, vae, data)
    unet, te, tokenizer = train_unet(a.out, data, lat, a.unet_steps, a.batch, a.unet_lr, a.seed, log, a.ckpt_every)
    if a.export:
        meta = dict(vars(a), out=str(a.out), export=str(a.export), scaling_factor=float(lat["scaling"]))
        meta["wall_seconds_this_invocation"] = round(time.time() - t_start, 1)
        export(a.export, vae, unet, te, tokenizer, float(lat["scaling"]), meta)
        shutil.copyfile(a.out / "log.csv", a.export / "training_log.csv")
        print(f"exported pipeline to {a.export}")


if __name__ == "__main__":
    main()
