"""The benchmark tables on the toy world: probes over activation settings.

``run_benchmark(BenchConfig(...))`` extracts features (through the cache),
runs every task for every setting and seed and returns a tidy DataFrame (one
row per model, setting, task, metric and seed). ``render(df)`` turns it into
the mean +- std table; :data:`REFERENCE` holds the papers' numbers, which are
only ever shown as separate, labelled reference rows.

Tasks (toy-world versions of the papers' protocols):

- ``correspondence``: nearest-neighbour keypoint transfer with cosine
  similarity on upsampled features (DIFT protocol), PCK@0.1 per keypoint and
  per image, thresholds from the image and the bounding box (SPair-71k style);
  seeds draw different test pairs.
- ``label-scarce-seg``: DDPM-seg protocol, an ensemble of pixel MLPs trained on
  ``n_seg_train`` labelled images of one category (``seg_class``, as Horse-21
  is one category), segmenting its parts and the background, mIoU; pixels are
  streamed from the cache one image at a time.
- ``semantic-seg``: a light multi-scale decoder head, object-class
  segmentation (10 classes + background), mIoU.
- ``classification``: logistic regression on globally pooled features, accuracy.

Settings: ``raw pixels``; ``random-weight U-Net`` (the model's architecture,
fresh weights, ours-v1.5 set); ``legacy-v1.5``; ``ours-v1.5``; ``best single
activation`` (the catalogue entry with the best validation correspondence).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from .cache import Key
from .catalog import NAMED_SETS
from .data.toyworld import CLASS_NAMES, CLASSES, ToyWorld, local_part_mask
from .extract import concat, extract, variant_key
from .probes import (
    PixelMLPEnsemble,
    eval_seg_head,
    evaluate_pairs,
    linear_probe,
    summarize_pck,
    train_seg_head,
)

TASKS = ("correspondence", "label-scarce-seg", "semantic-seg", "classification")

# Papers' numbers (../shared/STUDY.md): real models on real datasets. Reference only.
REFERENCE = pd.DataFrame(
    [
        ("Legacy-v1.5", "SPair-71k PCK@0.1 img", 75.14),
        ("Legacy-v1.5", "SPair-71k PCK@0.1 bbox", 66.73),
        ("Legacy-XL", "SPair-71k PCK@0.1 img", 66.00),
        ("Legacy-XL", "SPair-71k PCK@0.1 bbox", 59.16),
        ("Ours-v1.5", "SPair-71k PCK@0.1 img", 77.78),
        ("Ours-v1.5", "SPair-71k PCK@0.1 bbox", 69.83),
        ("Ours-v1.5", "ADE20K mIoU", 41.07),
        ("Ours-v1.5", "Cityscapes mIoU", 64.10),
        ("Ours-XL", "SPair-71k PCK@0.1 img", 81.72),
        ("Ours-XL", "SPair-71k PCK@0.1 bbox", 75.18),
        ("Ours-XL", "ADE20K mIoU", 43.45),
        ("Ours-XL", "Cityscapes mIoU", 74.47),
        ("Ours-XL", "Horse-21 mIoU", 62.7),
        ("Ours-XL-t", "SPair-71k PCK@0.1 img", 83.90),
        ("Ours-XL-t", "SPair-71k PCK@0.1 bbox", 76.86),
        ("Ours-XL-t", "ADE20K mIoU", 45.71),
        ("Ours-XL-t", "Cityscapes mIoU", 75.89),
        ("Ours-XL-t", "Horse-21 mIoU", 66.3),
        ("DDPM-seg", "Horse-21 mIoU", 65.0),
        ("GATE (SD1.5)", "SPair-71k PCK@0.1 img", 76.60),
        ("GATE (SD1.5)", "SPair-71k PCK@0.1 bbox", 69.10),
        ("GATE baseline (SD1.5)", "SPair-71k PCK@0.1 img", 73.96),
        ("GATE baseline (SD1.5)", "SPair-71k PCK@0.1 bbox", 65.74),
        ("GATE (SD1.5)", "ADE20K mIoU", 40.51),
        ("GATE (SD1.5)", "Cityscapes mIoU", 64.20),
        ("GATE (SD1.5)", "Horse-21 mIoU", 67.2),
        ("ResNet-50", "CIFAR-10 accuracy", 93.62),
        ("diffusion-feature baseline", "CIFAR-10 accuracy", 94.55),
        ("GATE (SD1.5)", "CIFAR-10 accuracy", 95.21),
    ],
    columns=["setting", "metric", "value"],
).assign(source="paper (reference; real models, real data)")


@dataclass(frozen=True)
class BenchConfig:
    """Parameters of one benchmark run (the notebooks' ``ci``/``full`` sets)."""

    model: str = "mini"
    image_size: int = 64
    timestep: int = 50
    variant: str = "empty"
    n_train: int = 60  # labelled images for the trained probes
    n_val: int = 40  # images for ranking single activations
    n_test: int = 60
    n_pairs: int = 60  # correspondence pairs per seed
    seeds: tuple[int, ...] = (0, 1, 2)
    tasks: tuple[str, ...] = TASKS
    settings: tuple[str, ...] = (
        "raw pixels",
        "random-weight U-Net",
        "legacy-v1.5",
        "ours-v1.5",
        "best single activation",
    )
    seg_class: str = "bird"  # label-scarce segmentation is on one category's parts, as Horse-21
    n_seg_train: int = 20  # labelled images of that category (Horse-21: 30)
    n_seg_test: int = 20
    seg_size: int = 32  # pixel-MLP resolution (features upsampled, masks nearest-downsampled)
    mlp_hidden: tuple[int, ...] = (256, 128)
    mlp_models: int = 10
    mlp_epochs: int = 2
    head_epochs: int = 15
    rank_candidates: str = "all"  # catalogue entries ranked for the best single activation
    cache_dir: str = "cache/features"
    batch_size: int = 16
    data_seed: int = 0
    extra: dict = field(default_factory=dict)


# -- feature access --------------------------------------------------------------
class Features:
    """Per-image feature maps of one setting, normalised per activation.

    ``maps(split, i)`` -> list of (C, h, w) float32 tensors (one per activation);
    each activation is divided by its root-mean-square over (up to 32) training
    images so that concatenated activations weigh alike.
    """

    def __init__(self, worlds: dict[str, ToyWorld], getter: Callable[[str, int], list[torch.Tensor]]):
        self.worlds, self._get = worlds, getter
        ref = [self._get("train", i) for i in range(min(32, len(worlds["train"])))]
        self.scale = [
            torch.stack([r[a].float().pow(2).mean() for r in ref]).mean().sqrt().clamp_min(1e-6)
            for a in range(len(ref[0]))
        ]

    def maps(self, split: str, i: int) -> list[torch.Tensor]:
        return [m.float() / s for m, s in zip(self._get(split, i), self.scale)]

    def concat(self, split: str, i: int, size: int | None = None) -> torch.Tensor:
        """Channels of all activations at one resolution (``size`` or the largest)."""
        return concat(self.maps(split, i), size=size, norm=False)

    def pooled(self, split: str, i: int) -> torch.Tensor:
        return torch.cat([m.mean((1, 2)) for m in self.maps(split, i)])


def pixel_features(worlds) -> Features:
    def get(split, i):
        img = worlds[split][i].image
        return [torch.tensor(img).permute(2, 0, 1).float() / 127.5 - 1]

    return Features(worlds, get)


class _Subset:
    """Some indices of a toy-world split, as a dataset for :func:`extract`."""

    def __init__(self, world: ToyWorld, idx):
        self.world, self.idx = world, sorted(idx)

    def __len__(self):
        return len(self.idx)

    def __getitem__(self, i):
        return self.world[self.idx[i]]


def seg_indices(cfg: BenchConfig, n: int) -> list[int]:
    """The first ``n`` images of ``cfg.seg_class`` in ``world`` (classes cycle, so every tenth image)."""
    c = CLASS_NAMES.index(cfg.seg_class)
    return [c + len(CLASS_NAMES) * k for k in range(n)]


def needed_indices(cfg: BenchConfig) -> dict[str, set[int]]:
    """Toy-world images each split needs for the configured tasks."""
    seg = "label-scarce-seg" in cfg.tasks
    return {
        "train": set(range(max(cfg.n_train, 32))) | (set(seg_indices(cfg, cfg.n_seg_train)) if seg else set()),
        "test": set(range(cfg.n_test)) | (set(seg_indices(cfg, cfg.n_seg_test)) if seg else set()),
    }


def cache_features(
    pipe, model_name: str, worlds, names, cfg: BenchConfig, splits=("train", "test"), indices=None
) -> Features:
    """Extract ``names`` for the ``indices`` of each split (default: all) and read them back per image."""
    caches = {}
    for split in splits:
        idx = range(len(worlds[split])) if indices is None else indices[split]
        caches[split], _ = extract(
            pipe,
            _Subset(worlds[split], idx),
            list(names),
            timesteps=[cfg.timestep],
            variants=[cfg.variant],
            seed=cfg.data_seed,
            image_size=cfg.image_size,
            batch_size=cfg.batch_size,
            cache_dir=cfg.cache_dir,
            model_name=model_name,
            progress=False,
        )
    v = variant_key(cfg.variant)

    def get(split, i):
        iid = worlds[split][i].image_id
        return [caches[split].get(Key(n, cfg.timestep, v, cfg.data_seed, iid)) for n in names]

    return Features(worlds, get)


# -- tasks -------------------------------------------------------------------------
def correspondence(feats: Features, world: ToyWorld, split: str, n_pairs: int, seed: int) -> dict[str, float]:
    def pairs():
        for a, b in world.pairs(n_pairs, seed=seed):
            sa, sb = world[a], world[b]
            vis = sa.visible & sb.visible
            yield dict(
                src_feat=feats.concat(split, a),
                trg_feat=feats.concat(split, b),
                src_kps=sa.keypoints[vis],
                trg_kps=sb.keypoints[vis],
                src_size=sa.image.shape[:2],
                trg_size=sb.image.shape[:2],
                trg_bbox=sb.bbox,
                category=sa.class_name,
                pair_id=f"{a}-{b}",
            )

    s = summarize_pck(evaluate_pairs(pairs(), show_progress=False))
    return {
        "PCK@0.1 img": s["pck_img_per_kp"],
        "PCK@0.1 bbox": s["pck_bbox_per_kp"],
        "PCK@0.1 img (per image)": s["pck_img_per_image"],
    }


def _pixels(feats: Features, world: ToyWorld, split: str, idx, size: int):
    """(pixels, C) features and class-local part labels of images ``idx``, one image at a time."""
    for i in idx:
        f = feats.concat(split, i, size=size)
        s = world[i]
        y = torch.tensor(local_part_mask(s.mask, s.label).astype(np.int64))[None, None].float()
        y = F.interpolate(y, size=(size, size), mode="nearest")[0, 0].long()
        yield f.flatten(1).T.contiguous(), y.flatten()


def label_scarce_seg(feats: Features, worlds, cfg: BenchConfig, seed: int) -> dict[str, float]:
    """DDPM-seg protocol on one category (``cfg.seg_class``): its parts + background."""
    train_idx, test_idx = seg_indices(cfg, cfg.n_seg_train), seg_indices(cfg, cfg.n_seg_test)
    k = len(CLASSES[CLASS_NAMES.index(cfg.seg_class)].parts) + 1
    c = feats.concat("train", train_idx[0], size=cfg.seg_size).shape[0]
    ens = PixelMLPEnsemble(c, k, n_models=cfg.mlp_models, hidden=cfg.mlp_hidden, seed=seed)
    ens.fit(
        lambda: _pixels(feats, worlds["train"], "train", train_idx, cfg.seg_size),
        epochs=cfg.mlp_epochs,
        batch_pixels=64,
        show_progress=False,
    )
    r = ens.evaluate(_pixels(feats, worlds["test"], "test", test_idx, cfg.seg_size))
    return {"mIoU": r["miou"]}


def _semantic_batches(feats: Features, world: ToyWorld, split: str, idx, batch: int, shuffle_seed: int | None):
    order = list(idx)
    if shuffle_seed is not None:
        order = [order[j] for j in torch.randperm(len(order), generator=torch.Generator().manual_seed(shuffle_seed))]
    for s in range(0, len(order), batch):
        chunk = order[s : s + batch]
        maps = [feats.maps(split, i) for i in chunk]
        levels = [torch.stack([m[a] for m in maps]) for a in range(len(maps[0]))]
        labels = torch.stack(
            [torch.from_numpy(np.where(world[i].mask > 0, world[i].label + 1, 0).astype(np.int64)) for i in chunk]
        )
        yield levels, labels


def semantic_seg(feats: Features, worlds, cfg: BenchConfig, seed: int) -> dict[str, float]:
    chans = [m.shape[0] for m in feats.maps("train", 0)]
    k = len(CLASS_NAMES) + 1
    ep = iter(range(10**6))
    head = train_seg_head(
        lambda: _semantic_batches(feats, worlds["train"], "train", range(cfg.n_train), 8, seed * 1000 + next(ep)),
        chans,
        k,
        epochs=cfg.head_epochs,
        seed=seed,
        dim=64,
        show_progress=False,
    )
    r = eval_seg_head(head, _semantic_batches(feats, worlds["test"], "test", range(cfg.n_test), 16, None), k)
    return {"mIoU": r["miou"]}


def classification(feats: Features, worlds, cfg: BenchConfig, seed: int) -> dict[str, float]:
    X = torch.stack([feats.pooled("train", i) for i in range(cfg.n_train)]).numpy()
    y = np.array([worlds["train"][i].label for i in range(cfg.n_train)])
    Xt = torch.stack([feats.pooled("test", i) for i in range(cfg.n_test)]).numpy()
    yt = np.array([worlds["test"][i].label for i in range(cfg.n_test)])
    return {"accuracy": linear_probe(X, y, Xt, yt, seed=seed).accuracy}


# -- ranking and the whole run --------------------------------------------------------
def rank_single(pipe, model_name: str, worlds, cfg: BenchConfig, names) -> pd.DataFrame:
    """Validation correspondence PCK of every activation alone (tidy, best first)."""
    _, _ = extract(
        pipe,
        worlds["val"],
        list(names),
        [cfg.timestep],
        [cfg.variant],
        cfg.data_seed,
        cfg.image_size,
        cfg.batch_size,
        cfg.cache_dir,
        model_name=model_name,
        progress=False,
    )
    rows = []
    vworlds = {"train": worlds["val"]}  # features normalised on the validation images themselves
    for n in names:
        f = cache_features(pipe, model_name, vworlds, [n], cfg, splits=("train",))  # all cached above: no forward
        s = correspondence(f, worlds["val"], "train", cfg.n_pairs, seed=0)
        rows.append(dict(activation=n, **s))
    return pd.DataFrame(rows).sort_values("PCK@0.1 img", ascending=False, kind="stable").reset_index(drop=True)


def run_benchmark(cfg: BenchConfig, progress: bool = True) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Returns ``(results, ranking)``: tidy results and the single-activation ranking."""
    from tqdm.auto import tqdm

    from .catalog import Catalog
    from .models import load, vae_scale_factor
    from .models.tiny import random_like

    need = needed_indices(cfg)
    worlds = {
        "train": ToyWorld("train", n=max(need["train"]) + 1, size=cfg.image_size, seed=cfg.data_seed),
        "val": ToyWorld("val", n=cfg.n_val, size=cfg.image_size, seed=cfg.data_seed),
        "test": ToyWorld("test", n=max(need["test"]) + 1, size=cfg.image_size, seed=cfg.data_seed),
    }
    pair_world = ToyWorld("test", n=cfg.n_test, size=cfg.image_size, seed=cfg.data_seed)
    pipe = load(cfg.model)
    ranking = pd.DataFrame()
    sources: dict[str, tuple[Callable[[], Features], str]] = {}
    for s in cfg.settings:
        if s == "raw pixels":
            sources[s] = (lambda: pixel_features(worlds), "pixels")
        elif s == "random-weight U-Net":

            def rnd():
                import copy

                rp = copy.copy(pipe)
                rp.unet = random_like(pipe, seed=0)
                return cache_features(rp, f"{cfg.model}-random", worlds, NAMED_SETS["ours-v1.5"], cfg, indices=need)

            sources[s] = (rnd, "ours-v1.5")
        elif s in NAMED_SETS:
            sources[s] = (lambda s=s: cache_features(pipe, cfg.model, worlds, NAMED_SETS[s], cfg, indices=need), s)
        elif s == "best single activation":
            cands = Catalog(pipe.unet, latent_size=cfg.image_size // vae_scale_factor(pipe)).resolve(
                [cfg.rank_candidates]
            )
            cands = [c for c in cands if c not in ("unet-in", "unet-out")] or cands
            ranking = rank_single(pipe, cfg.model, worlds, cfg, cands)
            best = ranking.iloc[0]["activation"]
            sources[s] = (lambda best=best: cache_features(pipe, cfg.model, worlds, [best], cfg, indices=need), best)
        else:
            raise ValueError(
                f"unknown setting {s!r}; use raw pixels, random-weight U-Net, best single activation or {sorted(NAMED_SETS)}"
            )
    rows = []
    fns = {"label-scarce-seg": label_scarce_seg, "semantic-seg": semantic_seg, "classification": classification}
    total = len(sources) * len(cfg.tasks) * len(cfg.seeds)
    bar = tqdm(total=total, desc="benchmark", disable=not progress)
    for s, (make, acts) in sources.items():
        feats = make()
        for task in cfg.tasks:
            for seed in cfg.seeds:
                t0 = time.time()
                if task == "correspondence":
                    res = correspondence(feats, pair_world, "test", cfg.n_pairs, seed)
                else:
                    res = fns[task](feats, worlds, cfg, seed)
                for metric, value in res.items():
                    rows.append(
                        dict(
                            model=cfg.model,
                            setting=s,
                            activations=acts,
                            task=task,
                            metric=metric,
                            seed=seed,
                            value=float(value),
                            seconds=round(time.time() - t0, 2),
                            t=cfg.timestep,
                            n_train=cfg.n_train,
                            n_test=cfg.n_test,
                        )
                    )
                bar.update(1)
    bar.close()
    return pd.DataFrame(rows), ranking


def render(df: pd.DataFrame, digits: int = 1) -> pd.DataFrame:
    """Mean +- std over seeds (in %), one row per setting, one column per task/metric."""
    g = df.groupby(["setting", "task", "metric"], sort=False)["value"]
    stats = g.agg(["mean", "std", "count"]).reset_index()
    stats["cell"] = [
        f"{100 * m:.{digits}f} ± {100 * (s if s == s else 0):.{digits}f}" for m, s in zip(stats["mean"], stats["std"])
    ]
    out = stats.pivot(index="setting", columns=["task", "metric"], values="cell")
    order = list(dict.fromkeys(df["setting"]))
    return out.reindex(order)


def config_dict(cfg: BenchConfig) -> dict:
    return asdict(cfg)
