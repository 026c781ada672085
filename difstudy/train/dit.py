"""Train ``difstudy-mini-dit``: a PixArt-style diffusion transformer on the toy world, beside the
mini U-Net, on CPU (or ``--device cuda``)::

    python -m difstudy.train.dit --out runs/mini-dit --data-from runs/mini --export difstudy/models/difstudy-mini-dit

The two denoisers differ only in architecture: the transformer reads the committed mini model's
VAE latents and its text encoder's token states (both frozen), and trains on the U-Net's data and
objective: the same 20,000 rendered toy-world images (``--data-from`` reuses a ``train.mini`` run
folder's ``data.npz`` / ``latents.npz``; otherwise they are rendered and encoded here), the
checkered background held out, class-balanced draws, captions fine (60%) / generic (30%) / empty
(10%), the mini scheduler's DDPM noising, v-prediction with Min-SNR-gamma 1 weighting
(:class:`difstudy.train.mini.UNetRecipe`'s loss; ``--fg-weight`` weighs the object's latent cells
as ``train.mini --fg-weight`` does), AdamW, warmup + cosine learning rate, gradient
clipping at 1 and EMA (what gets exported).

Architecture (:func:`build_transformer`): diffusers' ``PixArtTransformer2DModel`` with AdaLN-single,
``--depth`` blocks of ``--heads`` heads of ``--head-dim``, patch size 2 on the 16x16 latent (64
tokens), cross-attention to the text encoder's 32 token states under their caption mask (as
``PixArtAlphaPipeline`` passes it), and 4 output channels (v-prediction, no learned variance).

``--init-from FOLDER`` continues an exported mini DiT (its EMA weights) with a fresh optimiser, warmup
and cosine schedule of ``--steps`` steps, in a new run folder: the exported log becomes the head of
the new log, the steps are counted on from it, and the new record nests the old one under
``previous_run`` (as ``train.mini --init-from``).

Every ``--ckpt-every`` steps the state (weights, optimiser, EMA, generator, step, recipe) is saved
atomically to ``--out/dit.pt``; a killed run resumes there (another recipe is refused). Losses go
to ``--out/log.csv``. ``--export`` writes the transformer (safetensors), the scheduler and the
training record; :func:`difstudy.models.load` ("mini-dit") assembles the pipeline with the mini
model's VAE, tokenizer and text encoder, so they are stored once.
"""

from __future__ import annotations

import argparse
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..models import mini, training_record, write_training_record
from .common import (
    CsvLog,
    atomic_save,
    balanced_draw,
    caption_ids,
    check_recipe,
    class_draw_weights,
    class_pools,
    cosine_lr,
    diffusion_target,
    drop_local_paths,
    object_weighted_mse,
    parse_class_weights,
    training_device,
)


@dataclass(frozen=True)
class DitRecipe:
    """How the transformer trains: one value per option, recorded in its checkpoint."""

    steps: int = 10000
    batch: int = 32
    lr: float = 5e-4
    warmup: int = 500
    seed: int = 0
    depth: int = 8
    heads: int = 6
    head_dim: int = 32
    patch: int = 2
    snr_gamma: float = 1.0
    holdout_background: str | None = "checkered"
    ema_decay: float = 0.999
    fg_weight: float = 0.0
    class_weights: tuple[tuple[str, float], ...] | None = None

    def check_resume(self, saved: dict | None) -> None:
        check_recipe(saved, asdict(self), "mini DiT")


def build_transformer(r: DitRecipe, caption_channels: int):
    """The mini DiT: PixArt's block (AdaLN-single, self- and cross-attention, GELU MLP) at small width."""
    from diffusers import PixArtTransformer2DModel

    latent = mini.IMAGE_SIZE // 4
    return PixArtTransformer2DModel(
        sample_size=latent, patch_size=r.patch, in_channels=4, out_channels=4, num_layers=r.depth,
        num_attention_heads=r.heads, attention_head_dim=r.head_dim, cross_attention_dim=r.heads * r.head_dim,
        caption_channels=caption_channels, norm_type="ada_norm_single", norm_elementwise_affine=False,
        norm_eps=1e-6, activation_fn="gelu-approximate", attention_bias=True, num_embeds_ada_norm=1000,
        use_additional_conditions=False, interpolation_scale=1,
    )  # fmt: skip


def caption_mask(ids: torch.Tensor, eos_id: int) -> torch.Tensor:
    """The tokenizer's attention mask of padded ids: every token up to and including the first end token."""
    first_eos = (ids == eos_id).int().argmax(1, keepdim=True)
    return (torch.arange(ids.shape[1])[None] <= first_eos).long()


def _data(
    out: Path, data_from: Path | None, n: int, seed: int, tokenizer, vae, need_foreground: bool = False
) -> tuple[dict, dict]:
    from .mini import encode_latents, make_data

    out.mkdir(parents=True, exist_ok=True)
    for name in ("data.npz", "latents.npz"):
        src = data_from / name if data_from else None
        if src is not None and src.exists() and not (out / name).exists():
            os.link(src, out / name) if src.stat().st_dev == out.stat().st_dev else shutil.copyfile(src, out / name)
    data = make_data(out, n, seed, tokenizer, need_foreground=need_foreground)
    return data, encode_latents(out, vae, data)


def load_init(folder: Path):
    """The exported transformer to continue from (own memory: the export may overwrite its files)
    and the record it was trained with."""
    from diffusers import PixArtTransformer2DModel

    if not (folder / "transformer" / "config.json").exists():
        raise FileNotFoundError(
            f"--init-from {folder}: no transformer/config.json there; pass an exported mini DiT folder "
            "(e.g. difstudy/models/difstudy-mini-dit)"
        )
    model = PixArtTransformer2DModel.from_pretrained(folder / "transformer")
    for t in list(model.parameters()) + list(model.buffers()):
        t.data = t.data.clone()
    return model, training_record(folder) or {}


def total_steps(meta: dict) -> int:
    """The training steps of an exported mini DiT, its continued runs included."""
    return int(meta.get("total_steps", meta.get("recipe", {}).get("steps", 0)))


def train(out: Path, r: DitRecipe, data: dict, lat: dict, base, log: CsvLog, device, ckpt_every: int,
          init=None, step_offset: int = 0):  # fmt: skip
    """Train by ``r`` on ``data`` / ``lat`` with ``base``'s (the mini pipeline's) frozen text encoder;
    ``init`` (a transformer) continues from its weights, ``step_offset`` (its steps) numbers the log
    rows by total steps. Returns the EMA transformer."""
    from diffusers.training_utils import EMAModel, compute_snr

    from .mini import UNetRecipe

    torch.manual_seed(r.seed)
    te = base.text_encoder.to(device).eval().requires_grad_(False)
    model = (init if init is not None else build_transformer(r, te.config.hidden_size)).to(device).train()
    if init is not None:
        mine = build_transformer(r, te.config.hidden_size).config
        differ = {
            k: (init.config[k], mine[k])
            for k in mine
            if not k.startswith("_")
            and k in init.config
            and list(np.atleast_1d(init.config[k])) != list(np.atleast_1d(mine[k]))
        }
        if differ:
            raise ValueError(f"--init-from: the transformer is not this recipe's architecture (config {differ})")
    params = list(model.parameters())
    opt = torch.optim.AdamW(params, lr=r.lr, weight_decay=1e-2)
    ema = EMAModel(params, decay=r.ema_decay, use_ema_warmup=True, power=0.75)
    sched = mini.build_noise_scheduler()
    weights = UNetRecipe(snr_gamma=r.snr_gamma).loss_weights
    gen = torch.Generator().manual_seed(r.seed + 1)
    step, ckpt = 0, out / "dit.pt"
    if ckpt.exists():
        st = torch.load(ckpt, weights_only=False, map_location="cpu")
        r.check_resume(st.get("recipe"))
        model.load_state_dict(st["model"])
        opt.load_state_dict(st["opt"])
        ema.load_state_dict(st["ema"])
        gen.set_state(st["gen"])
        step = st["step"]
        log.resumed("dit", step_offset + step)
    keep = data["backgrounds"] != r.holdout_background if r.holdout_background else np.ones(len(lat["mean"]), bool)
    pools = class_pools(data, keep)
    draw_weights = class_draw_weights(data, pools, r.class_weights)
    scaling, eos = float(base.vae.config.scaling_factor), int(base.tokenizer.eos_token_id)
    print(
        f"mini DiT: {sum(p.numel() for p in params) / 1e6:.2f} M parameters, {r.steps} steps of {r.batch} on {device}"
    )
    t0 = time.time()
    bar = tqdm(total=r.steps, initial=step, desc="dit", mininterval=10)
    while step < r.steps:
        for g in opt.param_groups:
            g["lr"] = cosine_lr(step, r.steps, r.lr, warmup=r.warmup)
        idx = balanced_draw(pools, r.batch, gen, draw_weights)  # class-balanced (or --class-weights) draws
        mean, std = torch.from_numpy(lat["mean"][idx.numpy()]), torch.from_numpy(lat["std"][idx.numpy()])
        z0 = (mean + std * torch.randn(mean.shape, generator=gen)) * scaling
        ids = caption_ids(data, idx.numpy(), torch.rand(r.batch, generator=gen))
        t = torch.randint(0, sched.config.num_train_timesteps, (r.batch,), generator=gen)
        noise = torch.randn(z0.shape, generator=gen)
        z0, noise, t, ids = z0.to(device), noise.to(device), t.to(device), ids.to(device)
        mask = caption_mask(ids.cpu(), eos).to(device)
        with torch.no_grad():
            text = te(ids, attention_mask=mask).last_hidden_state
        zt = sched.add_noise(z0, noise, t)
        pred = model(zt, encoder_hidden_states=text, timestep=t, encoder_attention_mask=mask,
                     added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample  # fmt: skip
        fg = data["foreground"][idx.numpy()] if r.fg_weight else None  # object cells weigh 1 + fg_weight
        per = object_weighted_mse(pred, diffusion_target(sched, z0, noise, t), fg, r.fg_weight)
        loss = (weights(compute_snr(sched, t.cpu()).to(device), sched.config.prediction_type) * per).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema.step(params)
        step += 1
        bar.update(1)
        log("dit", step_offset + step, loss.item(), opt.param_groups[0]["lr"], time.time() - t0)
        if step % ckpt_every == 0 or step == r.steps:
            state = dict(model=model.state_dict(), opt=opt.state_dict(), ema=ema.state_dict())
            atomic_save(dict(state, gen=gen.get_state(), step=step, recipe=asdict(r)), ckpt)
    bar.close()
    ema.copy_to(params)
    return model.eval().cpu()


def export(folder: Path, model, meta: dict) -> None:
    """The transformer and scheduler (the VAE, tokenizer and text encoder are the mini model's)."""
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder / "transformer", safe_serialization=True)
    mini.build_sampling_scheduler().save_pretrained(folder / "scheduler")
    drop_local_paths(folder)
    write_training_record(folder, meta)


def build_parser() -> argparse.ArgumentParser:
    d = DitRecipe()
    ap = argparse.ArgumentParser(prog="python -m difstudy.train.dit", description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("runs/mini-dit"), help="run folder (checkpoint, log.csv)")
    ap.add_argument("--export", type=Path, default=None, help="write the model folder here at the end")
    ap.add_argument(
        "--data-from", type=Path, default=None, help="a train.mini run folder: reuse its data.npz, latents.npz"
    )
    ap.add_argument("--n-train", type=int, default=20000)
    ap.add_argument("--steps", type=int, default=d.steps)
    ap.add_argument("--batch", type=int, default=d.batch)
    ap.add_argument("--lr", type=float, default=d.lr)
    ap.add_argument("--warmup", type=int, default=d.warmup)
    ap.add_argument("--depth", type=int, default=d.depth)
    ap.add_argument("--heads", type=int, default=d.heads)
    ap.add_argument("--head-dim", type=int, default=d.head_dim)
    ap.add_argument("--snr-gamma", type=float, default=d.snr_gamma)
    ap.add_argument(
        "--fg-weight", type=float, default=d.fg_weight,
        help="latent cells covered by the object weigh 1 + this in the loss (as train.mini's; 0: off)",
    )  # fmt: skip
    ap.add_argument(
        "--class-weights", default="",
        help="draw these classes more (or less) often, e.g. 'dog=4' (as train.mini's; '' uniform over classes)",
    )  # fmt: skip
    ap.add_argument("--holdout-background", default=d.holdout_background)
    ap.add_argument("--seed", type=int, default=d.seed)
    ap.add_argument("--ckpt-every", type=int, default=200)
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument(
        "--init-from", type=Path, default=None,
        help="continue an exported mini DiT folder (its weights; fresh optimiser, warmup and cosine of --steps)",
    )  # fmt: skip
    return ap


def main(argv=None) -> None:
    from ..models import load

    ap = build_parser()
    a = ap.parse_args(argv)
    try:
        class_weights = parse_class_weights(a.class_weights)
    except ValueError as e:
        ap.error(f"--class-weights: {e}")
    device = training_device(a.device)
    if a.threads:
        torch.set_num_threads(a.threads)
    t_start = time.time()
    base = load("mini")
    recipe = DitRecipe(
        steps=a.steps, batch=a.batch, lr=a.lr, warmup=a.warmup, seed=a.seed, depth=a.depth, heads=a.heads,
        head_dim=a.head_dim, snr_gamma=a.snr_gamma, holdout_background=a.holdout_background or None,
        fg_weight=a.fg_weight, class_weights=class_weights,
    )  # fmt: skip
    init, prior = load_init(a.init_from) if a.init_from else (None, {})
    offset = total_steps(prior)
    data, lat = _data(a.out, a.data_from, a.n_train, a.seed, base.tokenizer, base.vae, bool(a.fg_weight))
    if a.init_from and (a.init_from / "training_log.csv").exists() and not (a.out / "log.csv").exists():
        shutil.copyfile(a.init_from / "training_log.csv", a.out / "log.csv")  # the head of this run's log
    log = CsvLog(a.out / "log.csv")
    model = train(a.out, recipe, data, lat, base, log, device, a.ckpt_every, init=init, step_offset=offset)
    log.close()
    if a.export:
        from ..extract import module_fingerprint

        meta = dict(recipe=asdict(recipe), out=str(a.out), device=str(device), n_train=a.n_train,
                    parameters=sum(p.numel() for p in model.parameters()),
                    vae_fingerprint=module_fingerprint(base.vae), text_fingerprint=module_fingerprint(base.text_encoder),
                    wall_seconds_this_invocation=round(time.time() - t_start, 1),
                    init_from=str(a.init_from) if a.init_from else None, total_steps=offset + recipe.steps)  # fmt: skip
        if prior:
            meta["previous_run"] = prior
        export(a.export, model, meta)
        shutil.copyfile(a.out / "log.csv", a.export / "training_log.csv")
        print(f"exported the mini DiT to {a.export}")


if __name__ == "__main__":
    main()
