"""Train a canny-edge ControlNet for a difstudy pipeline (the mini model by default), on CPU::

    python -m difstudy.train.controlnet --model mini --out runs/controlnet \\
        --export difstudy/models/difstudy-mini-canny

The GATE ControlNet technique feeds the U-Net the Canny edges of the input image. Real models
have public canny ControlNets (``sd15-canny``, ``sdxl-canny``); the mini model gets its own:

1. ``data``: render ``--n-train`` toy-world training images (without the held-out background,
   ``checkered`` by default, which the mini U-Net never saw either) and their Canny edge maps
   (``--canny opencv``, the official ``cv2.Canny(image, 100, 200)``, by default; ``--canny skimage``:
   ``skimage.feature.canny`` with sigma ``--canny-sigma``, what the committed mini ControlNet was
   trained with; the detector is recorded as ``canny`` and :func:`difstudy.gate.trained_canny` feeds
   it again at extraction), and tokenise their captions.
2. ``latents``: VAE posterior means and stds of all images, computed once.
3. ``controlnet``: ``ControlNetModel.from_unet`` (:func:`difstudy.gate.build_controlnet`) trained
   with the base U-Net, VAE and text encoder frozen; loss: MSE to the base model's prediction
   target (epsilon, v or sample, from its scheduler config); captions fine (60%), generic (30%)
   or empty (10%); warmup + cosine learning rate, gradient clipping.
4. ``export``: ``controlnet.save_pretrained(--export)`` (safetensors) with ``training_log.csv``
   and ``difstudy_training.json`` beside it (the options, and ``base_fingerprint`` of the base
   U-Net, :func:`difstudy.gate.techniques.base_record`); :func:`difstudy.gate.load_controlnet`
   reads it and refuses to feed another U-Net.

Every ``--ckpt-every`` steps the state (weights, optimiser, RNG, step) is written atomically to
``--out/controlnet.pt``, so a killed run resumes where it stopped. Losses go to
``--out/log.csv`` (stage, step, loss, lr, seconds, cpu_seconds).
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .common import (
    CsvLog,
    atomic_save,
    cosine_lr,
    diffusion_target,
    drop_local_paths,
    encode_latents,
    noisy_batch,
    toy_data,
    training_device,
)


def train(
    pipe,
    out: Path,
    steps: int,
    batch: int = 32,
    lr: float = 1e-4,
    n_train: int = 4000,
    seed: int = 0,
    ckpt_every: int = 200,
    holdout_background: str | None = "checkered",
    canny_sigma: float = 1.0,
    log: CsvLog | None = None,
    canny: str = "opencv",
):
    """Train (or resume) the ControlNet in ``out``; returns it in eval mode."""
    from diffusers import DDPMScheduler

    from ..gate import build_controlnet
    from ..models import vae_scale_factor

    if getattr(pipe.unet.config, "addition_embed_type", None) == "text_time":
        raise ValueError("difstudy.train.controlnet trains SD1.x/2.x-layout pipelines; for SDXL load 'sdxl-canny'")
    out.mkdir(parents=True, exist_ok=True)
    log = log or CsvLog(out / "log.csv")
    size = pipe.unet.config.sample_size * vae_scale_factor(pipe)
    data = toy_data(
        out,
        n_train,
        seed,
        size,
        pipe.tokenizer,
        exclude_background=holdout_background,
        canny_sigma=canny_sigma,
        canny=canny,
    )
    for m in (pipe.unet, pipe.vae, pipe.text_encoder):
        m.requires_grad_(False).eval()
    lat = encode_latents(out, pipe.vae, data["images"])
    scaling = pipe.vae.config.scaling_factor
    sched = DDPMScheduler.from_config(pipe.scheduler.config)
    torch.manual_seed(seed)
    dev = pipe.unet.device
    cn = build_controlnet(pipe).to(dev).train()
    opt = torch.optim.AdamW(cn.parameters(), lr=lr, weight_decay=1e-2)
    gen = torch.Generator().manual_seed(seed + 1)
    step = 0
    ckpt = out / "controlnet.pt"
    if ckpt.exists():
        st = torch.load(ckpt, weights_only=False, map_location="cpu")  # the generator state stays on the CPU
        cn.load_state_dict(st["model"])
        opt.load_state_dict(st["opt"])
        gen.set_state(st["gen"])
        step = st["step"]
        log.resumed("controlnet", step)
    edges = torch.from_numpy(data["edges"])
    t0 = time.time()
    bar = tqdm(total=steps, initial=step, desc="controlnet", mininterval=10)
    while step < steps:
        for g in opt.param_groups:
            g["lr"] = cosine_lr(step, steps, lr)
        b = noisy_batch(data, lat, scaling, sched, batch, gen, dev)
        zt, t = b["zt"], b["t"]
        cond = edges[b["idx"]].float()[:, None].expand(-1, 3, -1, -1).to(dev)
        with torch.no_grad():
            ehs = pipe.text_encoder(b["ids"])[0]
        down, mid = cn(zt, t, encoder_hidden_states=ehs, controlnet_cond=cond, return_dict=False)
        pred = pipe.unet(zt, t, ehs, down_block_additional_residuals=down, mid_block_additional_residual=mid).sample
        loss = F.mse_loss(pred.float(), diffusion_target(sched, b["z0"], b["noise"], t).float())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(cn.parameters(), 1.0)
        opt.step()
        step += 1
        bar.update(1)
        log("controlnet", step, loss.item(), opt.param_groups[0]["lr"], time.time() - t0)
        if step % ckpt_every == 0 or step == steps:
            atomic_save(dict(model=cn.state_dict(), opt=opt.state_dict(), gen=gen.get_state(), step=step), ckpt)
    bar.close()
    return cn.eval()


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m difstudy.train.controlnet", description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="mini", help="base pipeline for difstudy.models.load (default: mini)")
    ap.add_argument("--out", type=Path, default=Path("runs/controlnet"), help="run folder (checkpoint, log.csv)")
    ap.add_argument("--export", type=Path, default=None, help="write the diffusers ControlNet folder here at the end")
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--n-train", type=int, default=4000)
    ap.add_argument("--holdout-background", default="checkered", help="background left out ('' none)")
    ap.add_argument(
        "--canny",
        default="opencv",
        choices=("opencv", "skimage"),
        help="edge detector of the condition: opencv = the official cv2.Canny(100, 200) (default); skimage = "
        "skimage.feature.canny with --canny-sigma (what the committed mini ControlNet was trained with)",
    )
    ap.add_argument("--canny-sigma", type=float, default=1.0, help="Gaussian sigma of the skimage detector")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ckpt-every", type=int, default=200)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument(
        "--device", default="cpu", help="where to train: cpu (default) or cuda[:N]; batches are drawn on the CPU"
    )
    a = ap.parse_args(argv)
    dev = training_device(a.device)
    if a.threads:
        torch.set_num_threads(a.threads)
    from ..gate.techniques import base_record
    from ..models import load, write_training_record

    t_start = time.time()
    pipe = load(a.model)
    base = base_record(pipe.unet)  # the U-Net the ControlNet is trained for, checked when it is loaded (on the CPU)
    pipe.to(dev)
    a.out.mkdir(parents=True, exist_ok=True)
    log = CsvLog(a.out / "log.csv")
    cn = train(
        pipe,
        a.out,
        a.steps,
        a.batch,
        a.lr,
        a.n_train,
        a.seed,
        a.ckpt_every,
        a.holdout_background or None,
        a.canny_sigma,
        log,
        a.canny,
    )
    log.close()
    if a.export:
        a.export.mkdir(parents=True, exist_ok=True)
        cn.to("cpu").save_pretrained(a.export, safe_serialization=True)
        drop_local_paths(a.export)
        shutil.copyfile(a.out / "log.csv", a.export / "training_log.csv")
        meta = {k: str(v) if isinstance(v, Path) else v for k, v in vars(a).items()}
        meta["wall_seconds_this_invocation"] = round(time.time() - t_start, 1)
        meta["final_loss_mean_last_100"] = float(np.mean(_last_losses(a.out / "log.csv", 100)))
        meta.update(base)
        write_training_record(a.export, meta)
        print(f"exported ControlNet to {a.export}")


def _last_losses(path: Path, n: int) -> list[float]:
    import csv

    rows = list(csv.DictReader(open(path)))
    return [float(r["loss"]) for r in rows[-n:]] or [float("nan")]


if __name__ == "__main__":
    main()
