"""The papers' protocols on datasets in their official layouts (real or exported toy data).

The same loaders (:mod:`difstudy.data.loaders`), extraction (one forward per
batch into the feature cache) and probes (:mod:`difstudy.probes`) serve real
and toy data; with a GPU and the datasets these give the real-data numbers::

    difstudy probe-real spair --root /data/SPair-71k --model sd15 --acts ours-v1.5 --size 512 --device cuda --dtype fp16
    difstudy probe-real horse21 --root /data/ddpm-seg/horse_21 --model sdxl --acts ours-xl --size 1024 --device cuda --dtype fp16
    difstudy probe-real ade20k --root /data/ADEChallengeData2016 --model sd15 --acts ours-v1.5 --size 512 --device cuda
    difstudy probe-real cityscapes --root /data/cityscapes --model sd15 --acts ours-v1.5 --size 512 --device cuda
    difstudy probe-real cifar10 --root /data/cifar-10-batches-py --model sd15 --acts ours-v1.5 --size 512 --device cuda

Every function returns a tidy DataFrame (task, metric, seed, value, model,
activations) and never holds more than one image's features per step except
the pooled vectors of the classification probe.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from .cache import Key
from .data import loaders
from .extract import concat, extract, variant_key
from .probes import PixelMLPEnsemble, eval_seg_head, evaluate_pairs, linear_probe, summarize_pck, train_seg_head


class _Images:
    """A dataset view of ``(image_id, image)`` records for :func:`extract`."""

    def __init__(self, records):
        self.records = records

    def __len__(self):
        return len(self.records)

    def __getitem__(self, i):
        iid, get = self.records[i]
        return {"image_id": iid, "image": get()}


class _Run:
    """Extract a dataset once, then read per-image feature lists from the cache."""

    def __init__(
        self, model, images: _Images, activations, t, variant, seed, size, cache_dir, batch_size, dtype, device
    ):
        from .models import load

        self.pipe = load(model, dtype=dtype, device=device) if isinstance(model, str) else model
        self.cache, _ = extract(
            self.pipe,
            images,
            activations,
            timesteps=[t],
            variants=[variant],
            seed=seed,
            image_size=size,
            batch_size=batch_size,
            cache_dir=cache_dir,
            model_name=str(model),
        )
        from .catalog import Catalog

        self.names = Catalog(self.pipe.unet).resolve(activations)
        self.t, self.v, self.seed = t, variant_key(variant), seed

    def maps(self, image_id: str) -> list[torch.Tensor]:
        return [self.cache.get(Key(n, self.t, self.v, self.seed, image_id)).float() for n in self.names]

    def concat(self, image_id: str) -> torch.Tensor:
        return concat(self.maps(image_id), norm=False)


def _rows(task, res: dict, seed, model, activations):
    return [
        dict(task=task, metric=k, seed=seed, value=float(v), model=str(model), activations=" ".join(activations))
        for k, v in res.items()
    ]


def spair_pck(
    model,
    root,
    activations,
    split="test",
    n_pairs=None,
    t=50,
    variant="empty",
    seed=0,
    size=None,
    cache_dir="cache/features",
    batch_size=8,
    dtype=None,
    device=None,
) -> pd.DataFrame:
    """SPair-71k protocol: nearest-neighbour keypoint transfer, PCK@0.1 (img and bbox; per keypoint and per image)."""
    ds = loaders.SPair71k(root, split=split)
    n = len(ds) if n_pairs is None else min(n_pairs, len(ds))
    pairs = [ds[i] for i in range(n)]
    imgs = {}
    for p in pairs:
        imgs.setdefault(p["src_id"], p["src_image"])
        imgs.setdefault(p["trg_id"], p["trg_image"])
    run = _Run(
        model,
        _Images([(k, (lambda v=v: v)) for k, v in imgs.items()]),
        activations,
        t,
        variant,
        seed,
        size,
        cache_dir,
        batch_size,
        dtype,
        device,
    )

    def stream():
        for p in pairs:
            yield dict(
                src_feat=run.concat(p["src_id"]),
                trg_feat=run.concat(p["trg_id"]),
                src_kps=p["src_kps"],
                trg_kps=p["trg_kps"],
                src_size=p["src_image"].shape[:2],
                trg_size=p["trg_image"].shape[:2],
                trg_bbox=p["trg_bbox"],
                category=p["category"],
                pair_id=p["pair_id"],
            )

    s = summarize_pck(evaluate_pairs(stream(), show_progress=False))
    res = {
        "PCK@0.1 img": s["pck_img_per_kp"],
        "PCK@0.1 bbox": s["pck_bbox_per_kp"],
        "PCK@0.1 img (per image)": s["pck_img_per_image"],
        "PCK@0.1 bbox (per image)": s["pck_bbox_per_image"],
    }
    return pd.DataFrame(_rows("spair", res, seed, model, activations))


def _seg_records(ds, n):
    n = len(ds) if n is None else min(n, len(ds))
    return [(str(ds[i]["image_id"]), (lambda i=i: ds[i]["image"])) for i in range(n)], n


def _split_run(
    model, train, test, n_train, n_test, activations, t, variant, size, cache_dir, batch_size, dtype, device
):
    """Extract the first ``n_train`` / ``n_test`` images of a train and a test split in one run."""
    rec_tr, n_tr = _seg_records(train, n_train)
    rec_te, n_te = _seg_records(test, n_test)
    run = _Run(model, _Images(rec_tr + rec_te), activations, t, variant, 0, size, cache_dir, batch_size, dtype, device)
    return run, n_tr, n_te


def ddpmseg_miou(
    model,
    root,
    activations,
    preset="horse21",
    n_train=None,
    n_test=None,
    seeds=(0, 1, 2),
    res=None,
    mlp_hidden=(256, 128),
    mlp_models=10,
    epochs=4,
    t=50,
    variant="empty",
    size=None,
    cache_dir="cache/features",
    batch_size=8,
    dtype=None,
    device=None,
) -> pd.DataFrame:
    """DDPM-seg protocol (Horse-21, Bedroom-28): pixel-MLP ensemble on upsampled features, mIoU over seeds."""
    make = {"horse21": loaders.DDPMSeg.horse21, "bedroom28": loaders.DDPMSeg.bedroom28}[preset]
    train, test = make(root, "train"), make(root, "test")
    run, n_tr, n_te = _split_run(
        model, train, test, n_train, n_test, activations, t, variant, size, cache_dir, batch_size, dtype, device
    )

    def pixels(ds, n):
        for i in range(n):
            item = ds[i]
            mask = torch.as_tensor(item["mask"]).long()
            hw = (res, res) if res else tuple(mask.shape)
            f = F.interpolate(run.concat(str(item["image_id"]))[None], size=hw, mode="bilinear", align_corners=False)[0]
            y = F.interpolate(mask[None, None].float(), size=hw, mode="nearest")[0, 0].long()
            yield f.flatten(1).T.contiguous(), y.flatten()

    c = run.concat(str(train[0]["image_id"])).shape[0]
    rows = []
    for s in seeds:
        ens = PixelMLPEnsemble(
            c, train.num_classes, n_models=mlp_models, hidden=mlp_hidden, seed=s, ignore_index=train.ignore_index
        )
        ens.fit(lambda: pixels(train, n_tr), epochs=epochs, show_progress=False)
        rows += _rows(preset, {"mIoU": ens.evaluate(pixels(test, n_te))["miou"]}, s, model, activations)
    return pd.DataFrame(rows)


def semseg_miou(
    model,
    kind,
    root,
    activations,
    n_train=None,
    n_test=None,
    seeds=(0, 1, 2),
    epochs=10,
    label_size=128,
    t=50,
    variant="empty",
    size=None,
    cache_dir="cache/features",
    batch_size=8,
    dtype=None,
    device=None,
) -> pd.DataFrame:
    """ADE20K / Cityscapes: a light multi-scale decoder head on the activations, mIoU over seeds."""
    split_tr, split_te = ("training", "validation") if kind == "ade20k" else ("train", "val")
    train, test = loaders.load_dataset(kind, root, split=split_tr), loaders.load_dataset(kind, root, split=split_te)
    run, n_tr, n_te = _split_run(
        model, train, test, n_train, n_test, activations, t, variant, size, cache_dir, batch_size, dtype, device
    )

    def batches(ds, n, order):
        for i in order:
            item = ds[i]
            y = torch.as_tensor(item["mask"]).long()[None, None].float()
            y = F.interpolate(y, size=(label_size, label_size), mode="nearest")[0].long()
            yield [m[None] for m in run.maps(str(item["image_id"]))], y

    chans = [m.shape[0] for m in run.maps(str(train[0]["image_id"]))]
    rows = []
    for s in seeds:
        perm = np.random.default_rng(s).permutation(n_tr)
        head = train_seg_head(
            lambda perm=perm: batches(train, n_tr, perm),
            chans,
            train.num_classes,
            epochs=epochs,
            seed=s,
            ignore_index=train.ignore_index,
            show_progress=False,
        )
        r = eval_seg_head(head, batches(test, n_te, range(n_te)), train.num_classes, ignore_index=train.ignore_index)
        rows += _rows(kind, {"mIoU": r["miou"]}, s, model, activations)
    return pd.DataFrame(rows)


def classification_accuracy(
    model,
    kind,
    root,
    activations,
    n_train=None,
    n_test=None,
    seeds=(0, 1, 2),
    t=50,
    variant="empty",
    size=None,
    cache_dir="cache/features",
    batch_size=16,
    dtype=None,
    device=None,
) -> pd.DataFrame:
    """CIFAR-10 (python batches) or class folders: linear probe on pooled features, accuracy over seeds."""
    train, test = loaders.load_dataset(kind, root, split="train"), loaders.load_dataset(kind, root, split="test")
    run, n_tr, n_te = _split_run(
        model, train, test, n_train, n_test, activations, t, variant, size, cache_dir, batch_size, dtype, device
    )

    def pooled(ds, n):
        X = np.stack([torch.cat([m.mean((1, 2)) for m in run.maps(str(ds[i]["image_id"]))]).numpy() for i in range(n)])
        return X, np.array([ds[i]["label"] for i in range(n)])

    X, y = pooled(train, n_tr)
    Xt, yt = pooled(test, n_te)
    rows = []
    for s in seeds:
        rows += _rows(kind, {"accuracy": linear_probe(X, y, Xt, yt, seed=s).accuracy}, s, model, activations)
    return pd.DataFrame(rows)


def _cli(a) -> None:
    common = dict(t=a.t, size=a.size, cache_dir=a.cache, dtype=a.dtype, device=a.device)
    if a.task == "spair":
        df = spair_pck(a.model, a.root, a.acts, n_pairs=a.n, **common)
    elif a.task in ("horse21", "bedroom28"):
        df = ddpmseg_miou(a.model, a.root, a.acts, preset=a.task, n_train=a.n_train, n_test=a.n, **common)
    elif a.task in ("ade20k", "cityscapes"):
        df = semseg_miou(a.model, a.task, a.root, a.acts, n_train=a.n_train, n_test=a.n, **common)
    else:
        df = classification_accuracy(a.model, a.task, a.root, a.acts, n_train=a.n_train, n_test=a.n, **common)
    print(df.groupby("metric")["value"].agg(["mean", "std", "count"]).to_string())
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        df.to_csv(a.out, index=False)


def add_cli(sub) -> None:
    p = sub.add_parser(
        "probe-real",
        help="a paper protocol on a dataset in its official layout (SPair-71k, DDPM-seg, ADE20K, Cityscapes, CIFAR-10)",
    )
    p.add_argument("task", choices=["spair", "horse21", "bedroom28", "ade20k", "cityscapes", "cifar10", "classfolders"])
    p.add_argument("--root", required=True)
    p.add_argument("--model", default="sd15")
    p.add_argument("--acts", nargs="+", default=["ours-v1.5"])
    p.add_argument("--t", type=int, default=50)
    p.add_argument("--size", type=int, default=None)
    p.add_argument("--n", type=int, default=None, help="test pairs / images (default: all)")
    p.add_argument("--n-train", type=int, default=None)
    p.add_argument("--cache", default="cache/features")
    p.add_argument("--dtype", default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--out", default=None, help="CSV of the tidy results")
    p.set_defaults(fn=_cli)
