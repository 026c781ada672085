"""What the GATE training scripts (:mod:`difstudy.train.controlnet`, :mod:`difstudy.train.lora`)
share: atomic checkpoints, the CSV log with accumulated CPU time, the learning-rate schedule,
toy-world data rendered once into ``data.npz``; the diffusion loss target of the base model's
prediction type and the denoising loss are re-exported from :mod:`difstudy.diffusion`."""

from __future__ import annotations

import csv
import math
import os
import time
import zlib
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..diffusion import denoising_losses as denoising_losses  # re-exported: moved below the training layer
from ..diffusion import diffusion_target as diffusion_target  # re-exported (the training scripts import it here)


def atomic_save(obj, path: Path) -> None:
    """``torch.save`` to a temporary name, then rename: a kill leaves the old checkpoint or the new one."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


class CsvLog:
    """Append-only CSV log (``step, loss, lr, seconds, cpu_seconds``); ``cpu_seconds`` adds this
    process's CPU time to the last logged total, so it accumulates across resumed runs."""

    COLUMNS = ("stage", "step", "loss", "lr", "seconds", "cpu_seconds")

    def __init__(self, path: Path):
        self.path = path
        new = not path.exists()
        self.cpu0 = 0.0
        if not new:
            rows = list(csv.DictReader(open(path)))
            if rows and rows[-1].get("cpu_seconds"):
                self.cpu0 = float(rows[-1]["cpu_seconds"])
        self.t0 = time.process_time()
        self.f = open(path, "a", newline="")
        self.w = csv.writer(self.f)
        if new:
            self.w.writerow(self.COLUMNS)

    def __call__(self, stage: str, step: int, loss: float, lr: float, seconds: float) -> None:
        cpu = self.cpu0 + time.process_time() - self.t0
        self.w.writerow([stage, step, f"{loss:.5f}", f"{lr:.2e}", f"{seconds:.1f}", f"{cpu:.1f}"])
        self.f.flush()

    def resumed(self, stage: str, step: int) -> None:
        """A run resumed from its checkpoint at ``step``: drop the rows of ``stage`` logged after it
        by the run that was stopped (they are logged again), so that every step has one row."""
        self.f.close()
        rows = list(csv.DictReader(open(self.path)))
        keep = [r for r in rows if not (r["stage"] == stage and int(r["step"]) > step)]
        if len(keep) < len(rows):
            tmp = self.path.with_suffix(".tmp")
            with open(tmp, "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=self.COLUMNS)
                w.writeheader()
                w.writerows(keep)
            os.replace(tmp, self.path)
        self.f = open(self.path, "a", newline="")
        self.w = csv.writer(self.f)

    def close(self) -> None:
        self.f.close()


def drop_local_paths(folder: Path) -> list[Path]:
    """Remove ``_name_or_path`` from every ``config.json`` under ``folder`` (diffusers writes the
    folder a model was loaded from, a path of the machine that trained it, into the config it
    saves). Returns the files changed; each is rewritten atomically."""
    import json

    changed = []
    for path in sorted(Path(folder).rglob("config.json")):
        cfg = json.loads(path.read_text())
        if isinstance(cfg, dict) and "_name_or_path" in cfg:
            del cfg["_name_or_path"]
            tmp = path.with_name(f".{path.name}.tmp")
            tmp.write_text(json.dumps(cfg, indent=2) + "\n")
            os.replace(tmp, path)
            changed.append(path)
    return changed


def cosine_lr(step: int, total: int, base: float, warmup: int = 100) -> float:
    """Linear warmup, then cosine decay to 0 at ``total``."""
    if step < warmup:
        return base * (step + 1) / warmup
    return base * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def toy_data(
    out: Path,
    n: int,
    seed: int,
    size: int,
    tokenizer,
    background: str | None = None,
    exclude_background: str | None = None,
    canny_sigma: float | None = None,
    canny: str = "skimage",
) -> dict:
    """Render ``n`` toy-world training images once into ``out/data.npz`` (reused when it matches):
    images, backgrounds, tokenised fine/generic/empty captions and, with ``canny_sigma``, Canny
    edge maps (``canny``: the detector, :func:`difstudy.gate.canny_edges`). ``background`` keeps
    only images with that background (rendering more as needed); ``exclude_background`` drops them."""
    from ..data.toyworld import ToyWorld

    path = out / "data.npz"
    spec = np.array(
        [
            n,
            seed,
            size,
            zlib.crc32(
                repr((background, exclude_background, canny_sigma) + ((canny,) if canny != "skimage" else ())).encode()
            ),
        ]
    )
    if path.exists():
        d = dict(np.load(path))
        if np.array_equal(d.get("spec"), spec):
            return d
    world = ToyWorld("train", n=10**7, size=size, seed=seed)
    images, backgrounds, generic, fine = [], [], [], []
    bar = tqdm(total=n, desc="render toy world", mininterval=5)
    i = 0
    while len(images) < n:
        s = world[i]
        i += 1
        bg = s.attributes["background"]
        if (background and bg != background) or (exclude_background and bg == exclude_background):
            continue
        images.append(s.image)
        backgrounds.append(bg)
        generic.append(s.caption)
        fine.append(s.fine_caption)
        bar.update(1)
    bar.close()

    def tok(texts):
        ml = tokenizer.model_max_length
        return tokenizer(texts, padding="max_length", max_length=ml, truncation=True, return_tensors="np").input_ids

    d = dict(
        spec=spec,
        images=np.stack(images),
        backgrounds=np.array(backgrounds),
        ids_generic=tok(generic),
        ids_fine=tok(fine),
        ids_empty=tok([""]),
    )
    if canny_sigma is not None:
        from ..gate import canny_edges

        d["edges"] = np.stack([canny_edges(im, canny, canny_sigma) for im in d["images"]])
    tmp = out / "data.tmp.npz"
    np.savez(tmp, **d)
    os.replace(tmp, path)
    return d


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """(B, H, W, 3) uint8 -> (B, 3, H, W) in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1)


@torch.no_grad()
def encode_latents(out: Path, vae, images: np.ndarray, batch: int = 128) -> dict:
    """VAE posterior means and stds of all images, computed once into ``out/latents.npz``."""
    path = out / "latents.npz"
    if path.exists():
        d = dict(np.load(path))
        if len(d["mean"]) == len(images):
            return d
    means, stds = [], []
    for i in tqdm(range(0, len(images), batch), desc="encode latents", mininterval=10):
        post = vae.encode(to_tensor(images[i : i + batch]).to(vae.device, vae.dtype)).latent_dist
        means.append(post.mean.float().cpu().numpy())
        stds.append(post.std.float().cpu().numpy())
    d = dict(mean=np.concatenate(means), std=np.concatenate(stds))
    tmp = out / "latents.tmp.npz"
    np.savez(tmp, **d)
    os.replace(tmp, path)
    return d


def caption_ids(data: dict, idx: np.ndarray, u: torch.Tensor) -> torch.Tensor:
    """Token ids per drawn image: fine (60%), generic (30%) or empty (10%), as the mini model trained."""
    f, g = torch.from_numpy(data["ids_fine"][idx]), torch.from_numpy(data["ids_generic"][idx])
    e = torch.from_numpy(data["ids_empty"]).expand(len(idx), -1)
    ids = torch.where((u < 0.6)[:, None], f, g)
    return torch.where((u >= 0.9)[:, None], e, ids)


def noisy_batch(data: dict, lat: dict, scaling: float, sched, batch: int, gen: torch.Generator, device) -> dict:
    """One training batch of the adapter scripts: images drawn with ``gen`` (a CPU generator, so
    a run draws the same images, captions, timesteps and noise on every device), latents sampled
    from their VAE posteriors and noised by ``sched``; tensors on ``device``. Keys: ``idx`` (numpy),
    ``z0``, ``noise``, ``t``, ``zt``, ``ids``."""
    idx = torch.randint(0, len(data["images"]), (batch,), generator=gen).numpy()
    mean, std = torch.from_numpy(lat["mean"][idx]), torch.from_numpy(lat["std"][idx])
    z0 = (mean + std * torch.randn(mean.shape, generator=gen)) * scaling
    ids = caption_ids(data, idx, torch.rand(batch, generator=gen))
    t = torch.randint(0, sched.config.num_train_timesteps, (batch,), generator=gen)
    noise = torch.randn(z0.shape, generator=gen)
    z0, noise, t = z0.to(device), noise.to(device), t.to(device)
    return dict(idx=idx, z0=z0, noise=noise, t=t, zt=sched.add_noise(z0, noise, t), ids=ids.to(device))


def check_recipe(saved: dict | None, mine: dict, what: str) -> None:
    """Refuse to resume a ``what`` checkpoint written with another recipe (``steps`` may change: a
    longer or shorter cosine; checkpoints without a record are trusted)."""
    if saved is None:
        return
    differ = {k: (saved[k], mine[k]) for k in mine if k != "steps" and k in saved and saved[k] != mine[k]}
    if differ:
        listing = ", ".join(f"{k}: checkpoint {a!r}, now {b!r}" for k, (a, b) in differ.items())
        raise ValueError(
            f"the {what} checkpoint in this run folder was trained with another recipe ({listing}); "
            "rerun with the checkpoint's options to resume it, or pass a new --out to start a new run"
        )


def class_pools(data: dict, keep: np.ndarray) -> list[torch.Tensor]:
    """Indices of the kept images of each class present (for :func:`balanced_draw`)."""
    labels = data["labels"]
    pools = [torch.from_numpy(np.flatnonzero(keep & (labels == c))) for c in range(int(labels.max()) + 1)]
    return [ix for ix in pools if len(ix)]


def parse_class_weights(text: str) -> tuple[tuple[str, float], ...] | None:
    """``--class-weights`` of the training scripts: ``"dog=4,bird=2"`` -> ``(("dog", 4.0), ("bird", 2.0))``
    (a class not named keeps weight 1; ``""``: None, the uniform draw). Raises ValueError naming the
    bad entry (an unknown class, a weight that is not a positive number)."""
    from ..data.toyworld import CLASS_NAMES

    out = []
    for item in (x.strip() for x in text.split(",")):
        if not item:
            continue
        name, sep, value = item.partition("=")
        if not sep or name.strip() not in CLASS_NAMES:
            raise ValueError(f"{item!r}: expected <class>=<weight> with a class of {', '.join(CLASS_NAMES)}")
        try:
            w = float(value)
        except ValueError:
            w = float("nan")
        if not w > 0 or not math.isfinite(w):
            raise ValueError(f"{item!r}: the weight must be a positive number")
        out.append((name.strip(), w))
    return tuple(out) or None


def class_draw_weights(data: dict, pools: list[torch.Tensor], class_weights) -> list[float] | None:
    """The draw weight of each of :func:`class_pools`' ``pools`` (read from the class of its first
    image, so the weights follow the pools) from ``class_weights`` (:func:`parse_class_weights`);
    None keeps the uniform draw."""
    if not class_weights:
        return None
    from ..data.toyworld import CLASS_NAMES

    named = dict(class_weights)
    return [named.get(CLASS_NAMES[int(data["labels"][int(ix[0])])], 1.0) for ix in pools]


def balanced_draw(pools: list[torch.Tensor], batch: int, gen: torch.Generator, weights=None) -> torch.Tensor:
    """``batch`` image indices: a class drawn uniformly (or in proportion to ``weights``, one per
    pool), then an image of it."""
    if weights is None:
        cls = torch.randint(0, len(pools), (batch,), generator=gen)
    else:
        cls = torch.multinomial(torch.as_tensor(weights, dtype=torch.float64), batch, replacement=True, generator=gen)
    return torch.stack([pools[c][torch.randint(0, len(pools[c]), (1,), generator=gen)][0] for c in cls])


def training_device(name: str) -> torch.device:
    """``--device`` of the training scripts, checked: a clear error where CUDA is asked for and absent."""
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: torch sees no CUDA device here ({torch.__version__}); use --device cpu")
    return dev


def object_weighted_mse(
    pred: torch.Tensor, target: torch.Tensor, foreground=None, fg_weight: float = 0.0
) -> torch.Tensor:
    """Per-sample MSE of ``(B, C, h, w)`` predictions; with ``fg_weight`` W the latent cells covered
    by the object (``foreground``, ``(B, h, w)`` coverage in [0, 1]) weigh 1 + W times, normalised
    by the total weight so that the loss's scale does not depend on the object's size (``--fg-weight``
    of :mod:`difstudy.train.mini` and :mod:`difstudy.train.dit`; 0: the plain mean)."""
    err = F.mse_loss(pred.float(), target.float(), reduction="none")
    if not fg_weight:
        return err.mean((1, 2, 3))
    if foreground is None:
        raise ValueError("fg_weight needs the object masks (foreground); render the data with need_foreground")
    cells = 1 + fg_weight * torch.as_tensor(np.asarray(foreground, np.float32), device=err.device)[:, None]
    return (err * cells).sum((1, 2, 3)) / (cells.sum((1, 2, 3)) * err.shape[1])
