"""Train ``difstudy-mini`` on the toy world, on CPU::

    python -m difstudy.train.mini --out runs/mini --export difstudy/models/difstudy-mini

Stages (each resumable from its last checkpoint in ``--out``):

1. ``data``: render ``--n-train`` toy-world training images and tokenise their
   captions (generic, fine-grained, empty).
2. ``vae``: train the VAE (L1 + MSE reconstruction, KL weight 1e-6) on all
   training images, first on random ``--vae-crop`` px crops (the VAE is fully
   convolutional, so crops train the same weights at a quarter of the cost),
   then ``--vae-full-steps`` at full size; its ``scaling_factor`` is set to
   1 / std of the training latents (as SD does).
3. ``unet``: train U-Net and text encoder jointly on VAE latents with the
   v-prediction objective and Min-SNR-gamma loss weighting (Hang et al. 2023;
   gamma 1 by default: at equal steps it gave a lower test loss and a larger
   class signal than the paper's 5, which lets the low-noise steps dominate),
   warmup + cosine learning rate, gradient clipping and EMA (what
   gets exported). Captions are fine-grained (60%), generic (30%) or empty
   (10%, so classifier-free guidance and empty-prompt feature extraction are
   in distribution); images are drawn class-balanced. Images whose background
   is ``--holdout-background`` (default ``checkered``) are left out of the
   U-Net's data, so that a LoRA has a sub-domain to adapt to (GATE). Every
   ``--snapshot-every`` steps the EMA weights are saved to ``snapshots/`` for
   the model card's recognition-vs-step curve. ``--noise-offset`` adds a
   per-channel constant to the training noise (Guttenberg 2023; diffusers'
   ``--noise_offset``): with SD's schedule the last step keeps a little signal,
   so without it samples drift to the training set's mean colour.
   Two experiments of the second mini-model session are options, off by
   default: ``--pooled-text`` (the prompt also enters the time embedding, see
   :mod:`difstudy.models.mini`; a continued model gets the new embedding with
   its output gain at ``--pooled-text-gain``, 0 by default: exactly the model
   it continues) and ``--fg-weight W`` (latent cells covered by the object
   weigh 1 + W in the loss, from the toy world's masks).
4. ``export``: write a diffusers ``StableDiffusionPipeline`` folder
   (safetensors, fp32) that ``difstudy.models.load("mini")`` reads offline,
   with the training log (``training_log.csv``) and arguments beside it.

Every ``--ckpt-every`` steps the stage's state (weights, optimiser, EMA, RNG,
step) is written atomically, so a killed run resumes where it stopped. The U-Net's
checkpoint also records its :class:`UNetRecipe`: resuming it with other options (``--unet-steps``
aside, which lengthens or shortens the cosine) is refused with the differing options named. Losses
go to ``--out/log.csv`` (stage, step, loss, lr, seconds).
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..data.toyworld import BACKGROUNDS, ToyWorld, vocabulary
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
    to_tensor,
)


def make_data(out: Path, n: int, seed: int, tokenizer, need_foreground: bool = False) -> dict:
    """The run's rendered training set, reused from ``out/data.npz`` when it has ``n`` images (and
    the object masks' ``foreground`` cells if ``need_foreground``: older runs' files lack them)."""
    path = out / "data.npz"
    if path.exists():
        d = np.load(path)
        if len(d["images"]) == n and ("foreground" in d or not need_foreground):
            return dict(d)
    world = ToyWorld("train", n=n, size=mini.IMAGE_SIZE, seed=seed)
    images, labels, generic, fine, backgrounds, foreground = [], [], [], [], [], []
    side = mini.IMAGE_SIZE // 4  # latent cells per side (the VAE downsamples by 4)
    for s in tqdm(world, total=n, desc="render toy world", mininterval=5):
        fg = (s.mask > 0).astype(np.float32)  # object coverage of each latent cell
        foreground.append(fg.reshape(side, 4, side, 4).mean((1, 3)).astype(np.float16))
        images.append(s.image)
        labels.append(s.label)
        generic.append(s.caption)
        fine.append(s.fine_caption)
        backgrounds.append(s.attributes["background"])

    def tok(texts):
        return tokenizer(
            texts, padding="max_length", max_length=mini.TEXT_LENGTH, truncation=True, return_tensors="np"
        ).input_ids

    d = dict(
        images=np.stack(images),
        labels=np.array(labels),
        backgrounds=np.array(backgrounds),
        foreground=np.stack(foreground),
        ids_generic=tok(generic),
        ids_fine=tok(fine),
        ids_empty=tok([""]),
    )
    tmp = out / "data.tmp.npz"
    np.savez(tmp, **d)
    os.replace(tmp, path)
    return d


def _crop(x: torch.Tensor, size: int, gen: torch.Generator) -> torch.Tensor:
    """One random ``size`` x ``size`` crop per image (multiples of 4 keep latent cells aligned)."""
    if size >= x.shape[-1]:
        return x
    h = x.shape[-1]
    ox = torch.randint(0, (h - size) // 4 + 1, (len(x),), generator=gen) * 4
    oy = torch.randint(0, (h - size) // 4 + 1, (len(x),), generator=gen) * 4
    return torch.stack([xi[:, y : y + size, z : z + size] for xi, y, z in zip(x, oy.tolist(), ox.tolist())])


def train_vae(
    out: Path,
    data: dict,
    steps: int,
    batch: int,
    lr: float,
    seed: int,
    log: CsvLog,
    ckpt_every: int,
    crop: int = 32,
    full_steps: int = 300,
):
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
        log.resumed("vae", step)
    n = len(data["images"])
    t0 = time.time()
    bar = tqdm(total=steps, initial=step, desc="vae", mininterval=10)
    while step < steps:
        for g in opt.param_groups:
            g["lr"] = cosine_lr(step, steps, lr)
        idx = torch.randint(0, n, (batch,), generator=gen).numpy()
        x = to_tensor(data["images"][idx])
        if step < steps - full_steps:
            x = _crop(x, crop, gen)
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen)
        rec = vae.decode(z).sample
        loss = F.l1_loss(rec, x) + F.mse_loss(rec, x) + 1e-6 * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        bar.update(1)
        log("vae", step, loss.item(), opt.param_groups[0]["lr"], time.time() - t0)
        if step % ckpt_every == 0 or step == steps:
            atomic_save(dict(model=vae.state_dict(), opt=opt.state_dict(), gen=gen.get_state(), step=step), ckpt)
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
        post = vae.encode(to_tensor(data["images"][i : i + batch])).latent_dist
        means.append(post.mean.numpy())
        stds.append(post.std.numpy())
    mean, std = np.concatenate(means), np.concatenate(stds)
    scaling = float(1.0 / np.sqrt(mean.var() + (std**2).mean()))
    d = dict(mean=mean.astype(np.float32), std=std.astype(np.float32), scaling=np.array(scaling))
    tmp = out / "latents.tmp.npz"
    np.savez(tmp, **d)
    os.replace(tmp, path)
    return d


def _save_snapshot(folder: Path, step: int, unet, te) -> None:
    """EMA weights (fp16 safetensors) for the recognition-vs-step curve."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    for name, m in (("unet", unet), ("text_encoder", te)):
        sd = {k: v.detach().half().contiguous() for k, v in m.state_dict().items()}
        tmp = folder / f".{name}_{step:06d}.tmp"
        save_file(sd, str(tmp))
        os.replace(tmp, folder / f"{name}_{step:06d}.safetensors")


@dataclass(frozen=True)
class UNetRecipe:
    """How the U-Net stage trains: one value per ``train.mini`` option, recorded in the stage's
    checkpoint so that a resumed run cannot silently continue with another recipe."""

    steps: int = 6000
    batch: int = 32
    lr: float = 1e-3
    seed: int = 0
    holdout_background: str | None = "checkered"
    snr_gamma: float = 1.0
    noise_offset: float = 0.0
    fg_weight: float = 0.0
    pooled_text: bool = False
    pooled_text_gain: float = 0.0
    only_backgrounds: tuple[str, ...] | None = None
    class_weights: tuple[tuple[str, float], ...] | None = None
    freeze_text_encoder: bool = False

    def loss_weights(self, snr: torch.Tensor, prediction_type: str) -> torch.Tensor:
        """Per-sample weights of the MSE: Min-SNR-gamma (Hang et al. 2023; for v-prediction
        min(snr, gamma) / (snr + 1)), or ones with ``snr_gamma`` 0."""
        if not self.snr_gamma:
            return torch.ones_like(snr)
        w = torch.minimum(snr, torch.full_like(snr, self.snr_gamma))
        return w / (snr + 1) if prediction_type == "v_prediction" else w / snr

    def check_resume(self, saved: dict | None) -> None:
        """Refuse to resume a checkpoint written with another recipe (:func:`~difstudy.train.common.check_recipe`)."""
        check_recipe(saved, asdict(self), "U-Net")


def train_unet(
    out: Path,
    data: dict,
    lat: dict,
    recipe: UNetRecipe,
    log: CsvLog,
    ckpt_every: int,
    snapshot_every: int = 1000,
    init=None,
    step_offset: int = 0,
):
    """Train U-Net and text encoder by ``recipe``; ``init`` (a loaded pipeline) continues from its
    weights, and ``step_offset`` (the steps it already had) names the snapshots by total U-Net steps."""
    from diffusers.training_utils import EMAModel, compute_snr

    r = recipe
    torch.manual_seed(r.seed)
    if init is not None:
        unet = _with_pooled_text(init.unet, r.pooled_text_gain) if r.pooled_text else init.unet
        tokenizer, unet, te = init.tokenizer, unet.train(), init.text_encoder.train()
    else:
        tokenizer = mini.build_tokenizer(vocabulary())
        unet, te = mini.build_unet(r.pooled_text), mini.build_text_encoder(tokenizer)
    if r.freeze_text_encoder:  # the text encoder stays as it is (the mini DiT reads the same one)
        te.requires_grad_(False).eval()
    params = list(unet.parameters()) + ([] if r.freeze_text_encoder else list(te.parameters()))
    opt = torch.optim.AdamW(params, lr=r.lr, weight_decay=1e-2)
    ema = EMAModel(params, decay=0.999, use_ema_warmup=True, power=0.75)
    sched = mini.build_noise_scheduler()
    gen = torch.Generator().manual_seed(r.seed + 1)
    step = 0
    ckpt = out / "unet.pt"
    if ckpt.exists():
        st = torch.load(ckpt, weights_only=False)
        r.check_resume(st.get("recipe"))
        unet.load_state_dict(st["unet"])
        te.load_state_dict(st["te"])
        opt.load_state_dict(st["opt"])
        ema.load_state_dict(st["ema"])
        gen.set_state(st["gen"])
        step = st["step"]
        log.resumed("unet", step_offset + step)
    keep = np.ones(len(lat["mean"]), bool)
    if r.holdout_background:
        keep = data["backgrounds"] != r.holdout_background
    if r.only_backgrounds:  # an easy-first curriculum: train on these background kinds only
        keep &= np.isin(data["backgrounds"], list(r.only_backgrounds))
    pools = class_pools(data, keep)
    draw_weights = class_draw_weights(data, pools, r.class_weights)
    scaling = float(lat["scaling"])
    t0 = time.time()
    bar = tqdm(total=r.steps, initial=step, desc="unet", mininterval=10)
    while step < r.steps:
        for g in opt.param_groups:
            g["lr"] = cosine_lr(step, r.steps, r.lr, warmup=200)
        idx = balanced_draw(pools, r.batch, gen, draw_weights)  # class-balanced (or --class-weights) draws
        mean, std = torch.from_numpy(lat["mean"][idx.numpy()]), torch.from_numpy(lat["std"][idx.numpy()])
        z0 = (mean + std * torch.randn(mean.shape, generator=gen)) * scaling
        ids = caption_ids(data, idx.numpy(), torch.rand(r.batch, generator=gen))
        t = torch.randint(0, sched.config.num_train_timesteps, (r.batch,), generator=gen)
        noise = torch.randn(z0.shape, generator=gen)
        if r.noise_offset:  # offset noise: a per-image, per-channel constant lets samples leave the mean colour
            noise = noise + r.noise_offset * torch.randn((r.batch, z0.shape[1], 1, 1), generator=gen)
        zt = sched.add_noise(z0, noise, t)
        pred = unet(zt, t, te(ids).last_hidden_state).sample
        target = diffusion_target(sched, z0, noise, t)
        fg = data["foreground"][idx.numpy()] if r.fg_weight else None  # object cells weigh 1 + fg_weight
        per = object_weighted_mse(pred, target, fg, r.fg_weight)
        loss = (r.loss_weights(compute_snr(sched, t), sched.config.prediction_type) * per).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema.step(params)
        step += 1
        bar.update(1)
        log("unet", step_offset + step, loss.item(), opt.param_groups[0]["lr"], time.time() - t0)
        if step % ckpt_every == 0 or step == r.steps:
            state = dict(unet=unet.state_dict(), te=te.state_dict(), opt=opt.state_dict(), ema=ema.state_dict())
            atomic_save(dict(state, gen=gen.get_state(), step=step, recipe=asdict(r)), ckpt)
        if snapshot_every and (step % snapshot_every == 0 or step == r.steps):
            ema.store(params)
            ema.copy_to(params)
            _save_snapshot(out / "snapshots", step_offset + step, unet, te)
            ema.restore(params)
    bar.close()
    ema.copy_to(params)
    return unet, te, tokenizer


def _with_pooled_text(unet, gain: float = 0.0):
    """``unet`` itself if it already has the pooled-text embedding, else the mini U-Net with it,
    holding ``unet``'s weights and a new embedding whose final LayerNorm weight starts at ``gain``.
    With 0 the continued model starts exactly as the one it continues, but no gradient reaches the
    embedding's projection and pooling until that weight has grown (it reached 0.001 in 700 steps);
    a small gain (0.1) perturbs the start a little and lets the whole embedding learn at once."""
    if getattr(unet.config, "addition_embed_type", None) == "text":
        return unet
    new = mini.build_unet(pooled_text=True)
    missing, unexpected = new.load_state_dict(unet.state_dict(), strict=False)
    if unexpected or any(not k.startswith("add_embedding.") for k in missing):
        raise ValueError(
            f"--init-from: the U-Net is not the mini architecture (unexpected {unexpected[:3]}, missing {missing[:3]})"
        )
    torch.nn.init.constant_(new.add_embedding.norm2.weight, gain)
    return new


def _load_init(folder: Path):
    """Load the exported pipeline to continue from, and the arguments it was trained with."""
    from diffusers import StableDiffusionPipeline

    if not (folder / "model_index.json").exists():
        raise FileNotFoundError(f"--init-from {folder}: no model_index.json there; pass an exported pipeline folder")
    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    for module in (pipe.unet, pipe.text_encoder, pipe.vae):  # own memory: export may overwrite these files
        for t in list(module.parameters()) + list(module.buffers()):
            t.data = t.data.clone()
    return pipe, training_record(folder) or {}


def _seed_log(folder: Path, out: Path) -> None:
    """The continued model's training log becomes the head of this run's log (once), so the
    exported log and its CPU total cover the whole training."""
    head = out / "log.csv"
    if (folder / "training_log.csv").exists() and not head.exists():
        shutil.copyfile(folder / "training_log.csv", head)


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
    drop_local_paths(folder)
    write_training_record(folder, meta)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m difstudy.train.mini", description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("runs/mini"), help="run folder (checkpoints, log.csv)")
    ap.add_argument("--export", type=Path, default=None, help="write the diffusers pipeline folder here at the end")
    ap.add_argument("--n-train", type=int, default=20000)
    ap.add_argument("--vae-steps", type=int, default=3300)
    ap.add_argument("--vae-crop", type=int, default=32, help="crop size (px) for all but the last --vae-full-steps")
    ap.add_argument("--vae-full-steps", type=int, default=300)
    ap.add_argument("--unet-steps", type=int, default=UNetRecipe.steps)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--vae-lr", type=float, default=1e-3)
    ap.add_argument("--unet-lr", type=float, default=UNetRecipe.lr)
    ap.add_argument(
        "--snr-gamma", type=float, default=UNetRecipe.snr_gamma, help="Min-SNR-gamma loss weighting (0: off)"
    )
    ap.add_argument(
        "--noise-offset",
        type=float,
        default=UNetRecipe.noise_offset,
        help="offset noise (diffusers' --noise_offset): add this times a per-channel constant to the noise (0: off)",
    )
    ap.add_argument(
        "--fg-weight",
        type=float,
        default=UNetRecipe.fg_weight,
        help="latent cells covered by the object weigh 1 + this in the U-Net loss (a masked loss; 0: off)",
    )
    ap.add_argument(
        "--pooled-text",
        action="store_true",
        help="the prompt also enters the time embedding, pooled (diffusers addition_embed_type='text')",
    )
    ap.add_argument(
        "--pooled-text-gain",
        type=float,
        default=UNetRecipe.pooled_text_gain,
        help="with --pooled-text and --init-from: the new embedding's initial output gain (0: starts as the "
        "continued model, but the embedding's projection gets no gradient until the gain grows)",
    )
    ap.add_argument(
        "--only-backgrounds",
        default="",
        help="comma-separated background kinds (plain, gradient, striped, cluttered) to train on ('' all)",
    )
    ap.add_argument(
        "--holdout-background",
        default=UNetRecipe.holdout_background,
        help="background kind the U-Net never sees ('' none)",
    )
    ap.add_argument(
        "--class-weights",
        default="",
        help="draw these classes more (or less) often than the others, e.g. 'dog=4' ('' uniform over classes)",
    )
    ap.add_argument(
        "--freeze-text-encoder",
        action="store_true",
        help="train the U-Net only, keeping the text encoder (with --init-from: the mini DiT reads the same one)",
    )
    ap.add_argument("--snapshot-every", type=int, default=1000, help="save EMA weights every N U-Net steps (0: off)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ckpt-every", type=int, default=200)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument(
        "--init-from",
        type=Path,
        default=None,
        help="continue from an exported pipeline folder: keep its VAE, train its U-Net and text encoder "
        "for --unet-steps more steps (fresh optimiser, warmup + cosine); the log and snapshots count total steps",
    )
    return ap


# keys of difstudy_training.json that are results, not options; and options a continuation ignores
_RECORD_ONLY = ("scaling_factor", "total_unet_steps", "wall_seconds_this_invocation", "init_from")
_VAE_OPTIONS = ("vae_steps", "vae_crop", "vae_full_steps", "vae_lr")


def _kept_vae_option(run: dict, key: str) -> bool:
    """A VAE option of a continuation: recorded, but not used (it keeps the VAE it continues)."""
    return bool(run.get("init_from")) and key in _VAE_OPTIONS


def run_chain(meta: dict) -> list[dict]:
    """The runs recorded in ``meta`` (a ``difstudy_training.json``), oldest first: each
    continuation nests the run it continued under ``previous_run``."""
    chain = []
    while meta:
        chain.append({k: v for k, v in meta.items() if k != "previous_run"})
        meta = meta.get("previous_run")
    return chain[::-1]


def training_runs(meta: dict) -> pd.DataFrame:
    """The recorded runs side by side, for the model card: one column per run, oldest first, one
    row per option; blank where a run's record lacks the option (it did not exist yet), "kept" for
    a continuation's VAE options (it keeps the VAE it continues)."""
    chain = run_chain(meta)
    keys = list(dict.fromkeys(k for run in chain for k in run if k != "out"))

    def shown(run: dict, key: str) -> str:
        if _kept_vae_option(run, key):
            return "kept"
        return "" if run.get(key) is None else str(run[key])

    columns = {f"{i + 1}: {run['out']}": [shown(run, k) for k in keys] for i, run in enumerate(chain)}
    return pd.DataFrame(columns, index=keys)


def reproduce_commands(meta: dict) -> list[str]:
    """The ``train.mini`` invocations, oldest first, that made the model whose
    ``difstudy_training.json`` is ``meta``: one per run of its ``previous_run`` chain, every
    recorded option spelled out (the defaults have changed between runs), a continuation's VAE
    options left out (it keeps the VAE). An option a record lacks did not exist then, so it was off."""
    commands = []
    for run in run_chain(meta):
        words = ["python", "-m", "difstudy.train.mini"]
        for key, value in run.items():
            if key in _RECORD_ONLY or value is None or _kept_vae_option(run, key):
                continue
            flag = "--" + key.replace("_", "-")
            if isinstance(value, bool):
                words += [flag] if value else []
            else:
                words += [flag, str(value)]
        if run.get("init_from"):
            words += ["--init-from", str(run["init_from"])]
        commands.append(shlex.join(words))
    return commands


def main(argv=None) -> None:
    ap = build_parser()
    a = ap.parse_args(argv)
    only_backgrounds = tuple(b for b in a.only_backgrounds.split(",") if b)
    unknown = [b for b in only_backgrounds if b not in BACKGROUNDS]
    if unknown:
        ap.error(f"--only-backgrounds: unknown background kind(s) {unknown}; choose from {', '.join(BACKGROUNDS)}")
    try:
        class_weights = parse_class_weights(a.class_weights)
    except ValueError as e:
        ap.error(f"--class-weights: {e}")
    if a.threads:
        torch.set_num_threads(a.threads)
    a.out.mkdir(parents=True, exist_ok=True)
    if a.init_from:
        _seed_log(a.init_from, a.out)
    log = CsvLog(a.out / "log.csv")
    t_start = time.time()
    torch.manual_seed(a.seed)
    tokenizer = mini.build_tokenizer(vocabulary())
    data = make_data(a.out, a.n_train, a.seed, tokenizer, need_foreground=bool(a.fg_weight))
    init, offset, prior = None, 0, {}
    if a.init_from:
        init, prior = _load_init(a.init_from)
        vae, offset = init.vae, int(prior.get("total_unet_steps", prior.get("unet_steps", 0)))
    else:
        vae = train_vae(
            a.out, data, a.vae_steps, a.batch, a.vae_lr, a.seed, log, a.ckpt_every, a.vae_crop, a.vae_full_steps
        )
    lat = encode_latents(a.out, vae, data)
    recipe = UNetRecipe(
        steps=a.unet_steps,
        batch=a.batch,
        lr=a.unet_lr,
        seed=a.seed,
        holdout_background=a.holdout_background or None,
        snr_gamma=a.snr_gamma,
        noise_offset=a.noise_offset,
        fg_weight=a.fg_weight,
        pooled_text=a.pooled_text,
        pooled_text_gain=a.pooled_text_gain,
        only_backgrounds=only_backgrounds or None,
        class_weights=class_weights,
        freeze_text_encoder=a.freeze_text_encoder,
    )
    unet, te, tokenizer = train_unet(
        a.out, data, lat, recipe, log, a.ckpt_every, snapshot_every=a.snapshot_every, init=init, step_offset=offset
    )
    if a.export:
        meta = dict(vars(a), out=str(a.out), export=str(a.export), scaling_factor=float(lat["scaling"]))
        meta["init_from"] = str(a.init_from) if a.init_from else None
        meta["total_unet_steps"] = offset + a.unet_steps
        if prior:
            meta["previous_run"] = prior
        meta["wall_seconds_this_invocation"] = round(time.time() - t_start, 1)
        export(a.export, vae, unet, te, tokenizer, float(lat["scaling"]), meta)
        shutil.copyfile(a.out / "log.csv", a.export / "training_log.csv")
        print(f"exported pipeline to {a.export}")


if __name__ == "__main__":
    main()
