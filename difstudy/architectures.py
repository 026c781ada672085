"""U-Net or transformer? The mini U-Net and the mini DiT side by side (issue 26).

The two denoisers share the toy world, the VAE, the text encoder, the data and the objective
(:mod:`difstudy.train.dit`), so what differs between their features is the architecture. This
module holds what the chapter ``notebooks/unet_vs_dit.ipynb`` computes beyond the property and
protocol layers: which activations are comparable, the per-image statistics of its four claims,
and the claims themselves, each decided by :mod:`difstudy.verdicts` against a declared minimum
effect and a control (paired over the real sampling units: images for the property claims,
test images x probe seeds for the probe claims).

The claims (:func:`claims`):

- **transformer features are less local than U-Net features**: per image, the mean locality
  index (:func:`difstudy.properties.locality_index`) over the activations of the kinds both have
  (:data:`COMMON_KINDS`: self-attention q/k/v, cross-attention q, FFN inner, transformer-block
  output) of the U-Net minus that of the DiT; minimum
  :data:`~difstudy.property_claims.MIN_LOCALITY_GAP`; control: the same difference between the
  two architectures with random weights;
- **the asymmetric-noise pattern has an analogue in the transformer's depth**: the U-Net's
  pattern is noisy early (down stage), clean in the middle, noisy again late (the last up
  level). Per image, the lower of the median noise share of the DiT's first and last thirds of
  blocks minus that of its middle third (:func:`depth_noise_dip`); minimum
  :data:`~difstudy.property_claims.MIN_NOISE_GAP`; control: the random-weight DiT;
- **dropping massive channels improves transformer features**: per test image and probe seed,
  classification correctness of the DiT's best activation (chosen on the validation split) with
  its massive channels zeroed (:meth:`difstudy.protocols.CachedFeatures.without_massive`) minus
  without zeroing; minimum :data:`MIN_ACCURACY_GAIN`; control: as many random channels zeroed;
- **the best transformer activation is inside the attention rather than a block output**: per
  test image and probe seed, correctness of the best attention activation (q/k/v, chosen on the
  validation split) minus that of the best block output; minimum :data:`MIN_ACCURACY_GAIN`;
  control: the same comparison on the random-weight DiT (its own best of each, chosen the same way).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from .gate.claims import MIN_FEATURE_GAIN
from .models import training_record
from .properties import _at_t
from .property_claims import MIN_LOCALITY_GAP, MIN_NOISE_GAP, _controlled
from .verdicts import controlled_row, paired

# attention maps (heads x query tokens x key tokens) are not image-space features: not probed
MAP_KINDS = ("self-map", "cross-map")
# the activation kinds both denoisers have (a U-Net's transformer blocks and the DiT's blocks)
COMMON_KINDS = ("self-q", "self-k", "self-v", "cross-q", "ffn-inner", "out")
ATTENTION_KINDS = ("self-q", "self-k", "self-v")
BLOCK_OUTPUT_KINDS = ("out",)
MIN_ACCURACY_GAIN = MIN_FEATURE_GAIN
"""The probe claims' minimum effect: one point of accuracy (as GATE's feature claims)."""


def feature_activations(pipe) -> list[str]:
    """Every activation of ``pipe``'s denoiser that is an image-space feature map (not an
    attention map, :data:`MAP_KINDS`), in forward order."""
    from .denoisers import pipeline_catalog

    df = pipeline_catalog(pipe).to_frame()
    return df.loc[~df["kind"].isin(MAP_KINDS), "name"].tolist()


def kind_of(pipe) -> dict[str, str]:
    from .denoisers import pipeline_catalog

    return pipeline_catalog(pipe).to_frame().set_index("name")["kind"].to_dict()


def training_flops_per_sample(pipe, timestep: int = 500) -> float:
    """FLOPs of one training sample through the denoiser, forward and backward, at the model's native
    size with the empty caption (torch's ``FlopCounterMode``; attention through the math kernel, so
    that its matrix products are counted: the CPU flash kernel is not in torch's FLOP registry). The
    frozen VAE and text encoder are not counted: the two mini denoisers share them. The count does
    not depend on the timestep or the caption; the pipeline's weights and gradients are left as they were."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from .denoisers import Noising, denoiser, embed_prompt, model_kwargs, native_size
    from .models import vae_scale_factor

    net = denoiser(pipe)
    device, dtype = net.device, net.dtype
    factor = vae_scale_factor(pipe)
    size = native_size(pipe, factor)
    with torch.no_grad():
        tokens, extra = embed_prompt(pipe, "", device)
    z = torch.zeros(1, net.config.in_channels, size // factor, size // factor, device=device, dtype=dtype)
    kw = model_kwargs(
        pipe, Noising(pipe), z, torch.tensor([timestep], device=device), tokens[None].to(dtype),
        None if extra is None else extra[None], size, 1.0,
    )  # fmt: skip
    params = list(net.parameters())
    before = [(p.requires_grad, p.grad) for p in params]
    try:
        for p in params:
            p.requires_grad_(True)
            p.grad = None
        with torch.enable_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            net(**kw).sample.float().pow(2).mean().backward()
    finally:
        for p, (req, grad) in zip(params, before):
            p.requires_grad_(req)
            p.grad = grad
    return float(counter.get_total_flops())


def _training_batch(folder: Path) -> int | None:
    meta = training_record(folder) or {}
    return meta.get("batch") or meta.get("recipe", {}).get("batch")


def denoiser_table(pipes: dict) -> pd.DataFrame:
    """One row per denoiser: class, parameters, activations (all and image-space features),
    training steps, training compute in FLOPs (``training_flops_per_sample`` x batch x steps; the
    field's hardware-free unit) and in CPU hours (from the committed training log: the same FLOPs cost
    a convolution far more CPU time than a matrix product; all stages, and the denoiser's stage alone),
    VAE and text-encoder fingerprints."""
    from .card import denoiser_cpu_hours, training_cpu_hours, training_curves
    from .denoisers import denoiser, pipeline_catalog
    from .extract import module_fingerprint
    from .models import MINI_DIT_PATH, MINI_PATH

    folders = {"mini": MINI_PATH, "mini-dit": MINI_DIT_PATH}
    rows = []
    for name, pipe in pipes.items():
        net = denoiser(pipe)
        log_path = folders[name] / "training_log.csv" if name in folders else None
        log = training_curves(log_path) if log_path is not None and log_path.exists() else None
        steps = int(log.loc[log["stage"] != "vae", "step"].max()) if log is not None else None
        batch = _training_batch(folders[name]) if name in folders else None
        per_sample = training_flops_per_sample(pipe)
        rows.append(dict(
            model=name, denoiser=type(net).__name__,
            parameters_M=round(sum(p.numel() for p in net.parameters()) / 1e6, 2),
            activations=len(pipeline_catalog(pipe).to_frame()), features=len(feature_activations(pipe)),
            training_steps=steps, training_batch=batch, gflop_per_training_sample=round(per_sample / 1e9, 3),
            training_pflop=round(per_sample * batch * steps / 1e15, 3) if steps and batch else None,
            training_cpu_hours=round(training_cpu_hours(log), 2) if log is not None else None,
            denoiser_cpu_hours=round(denoiser_cpu_hours(log), 2) if log is not None else None,
            vae=module_fingerprint(pipe.vae), text_encoder=module_fingerprint(pipe.text_encoder),
        ))  # fmt: skip
    return pd.DataFrame(rows).set_index("model")


def block_index(images: pd.DataFrame) -> pd.Series:
    """A DiT activation's block (``vit-block<i>-...``), else NA."""
    return images["activation"].str.extract(r"^vit-block(\d+)-")[0].astype("Int64")


def depth_thirds(depth: int) -> dict[int, str]:
    """Blocks ``0 .. depth-1`` split into ``early`` / ``middle`` / ``late`` thirds (numpy's
    ``array_split``: the first thirds take the remainder)."""
    if depth < 3:
        raise ValueError(f"a depth analogue needs at least 3 blocks, got {depth}")
    parts = np.array_split(np.arange(depth), 3)
    return {int(b): name for name, part in zip(("early", "middle", "late"), parts) for b in part}


def depth_noise_dip(images: pd.DataFrame, t: int | None = None) -> pd.Series:
    """Per image, the DiT's analogue of the U-Net's asymmetric noise at ``t``: the lower of the
    median noise share of the first and of the last third of blocks minus the middle third's
    (positive: noisy early and late, clean in the middle). Indexed by image id."""
    d, _ = _at_t(images, "noise_share", t)
    d = d.assign(block=block_index(d)).dropna(subset=["block"])
    if d.empty:
        return pd.Series(dtype=float, name="dip")
    third = depth_thirds(int(d["block"].max()) + 1)
    d["third"] = d["block"].astype(int).map(third)
    med = d.pivot_table(index="image_id", columns="third", values="value", aggfunc="median")
    return (med[["early", "late"]].min(axis=1) - med["middle"]).rename("dip")


def mean_locality(images: pd.DataFrame, t: int | None = None, kinds: Sequence[str] = COMMON_KINDS) -> pd.Series:
    """Per image, the mean locality index over the activations of ``kinds`` at ``t``."""
    d, _ = _at_t(images, "locality", t)
    return d[d["kind"].isin(kinds)].groupby("image_id", sort=False)["value"].mean()


def best_of_kinds(scores: pd.DataFrame, kinds: dict[str, str], which: Sequence[str]) -> tuple[str, float]:
    """The best-scoring activation of ``scores`` (:func:`difstudy.filtering.score_each`) among
    those whose kind is in ``which``, and its score."""
    d = scores[scores["activation"].map(kinds).isin(which)]
    if d.empty:
        raise ValueError(f"no scored activation of the kinds {list(which)}")
    best = d.sort_values("value", ascending=False, kind="stable").iloc[0]
    return str(best["activation"]), float(best["value"])


def _units(correct: dict[int, pd.Series]) -> pd.DataFrame:
    """Per-seed correctness Series (image id -> 0/1) as an images x seeds table."""
    return pd.concat(correct, axis=1)


def probe_claim(claim: str, measure: str, a: dict, b: dict, ctrl_a: dict, ctrl_b: dict, **extra) -> dict:
    """A claim that probe ``a`` beats probe ``b``: per test image and probe seed, correctness of
    ``a`` minus ``b`` (dicts seed -> :func:`difstudy.protocols.correct_per_image`), against
    :data:`MIN_ACCURACY_GAIN`, and beating the control's same difference (``ctrl_a`` - ``ctrl_b``)."""
    trained = _units(a) - _units(b)
    control = _units(ctrl_a) - _units(ctrl_b)
    return controlled_row(
        claim, measure,
        paired(trained.to_numpy(), MIN_ACCURACY_GAIN),
        paired((trained - control).to_numpy(), MIN_ACCURACY_GAIN),
        control=float(control.to_numpy().mean()), **extra,
    )  # fmt: skip


def property_claims(unet: pd.DataFrame, dit: pd.DataFrame, unet_random: pd.DataFrame, dit_random: pd.DataFrame,
                    t: int | None = None) -> pd.DataFrame:  # fmt: skip
    """The chapter's two property claims from per-image property tables
    (:func:`difstudy.properties.measure_properties` with ``per_image=True``) of both denoisers,
    trained and with random weights, on the same images."""
    rows = []
    if "locality" in set(unet["measure"]) and "locality" in set(dit["measure"]):
        kinds = "/".join(COMMON_KINDS)
        rows.append(_controlled(
            "transformer features are less local than U-Net features",
            f"per image: mean locality index over the U-Net's {kinds} activations minus over the DiT's, "
            f"t={_at_t(unet, 'locality', t)[1]} (random weights: the control)",
            mean_locality(unet, t) - mean_locality(dit, t), mean_locality(unet_random, t) - mean_locality(dit_random, t),
            MIN_LOCALITY_GAP,
        ))  # fmt: skip
    if "noise_share" in set(dit["measure"]):
        rows.append(_controlled(
            "the asymmetric-noise pattern has an analogue in the transformer's depth (noisy early and late, clean in the middle)",
            f"per image: min(median noise share of the DiT's first, last third of blocks) minus the middle third's, "
            f"t={_at_t(dit, 'noise_share', t)[1]}",
            depth_noise_dip(dit, t), depth_noise_dip(dit_random, t), MIN_NOISE_GAP,
        ))  # fmt: skip
    return pd.DataFrame(rows)


def rank(pipe, names: Sequence[str], tasks: dict, t: int = 50, model_name: str | None = None,
         cache_dir: str = "cache/features") -> dict[str, pd.DataFrame]:  # fmt: skip
    """Each of ``names`` alone, ranked per task of ``tasks`` (task -> ``(data, cfg)`` as
    :func:`difstudy.filtering.run_protocol` takes them): task -> :func:`difstudy.filtering.score_each`."""
    from . import filtering

    src = filtering.Sources(pipe, t=t, model_name=model_name, cache_dir=cache_dir)(list(names))
    out = {}
    for task, (data, cfg) in tasks.items():
        scorer = filtering.Scorer(src, task, data, cfg)
        scorer.prepare()
        out[task] = filtering.score_each(scorer, list(names))
    return out


BENCH_METRICS = {"classification": "accuracy", "correspondence": "PCK@0.1 img", "label-scarce-seg": "mIoU"}


def benchmark(pipes: dict, best: dict, data: dict, cfgs: dict, extraction, seeds: Sequence[int]) -> pd.DataFrame:
    """The three protocols on each denoiser's best activations, trained and with random weights
    (new weights per seed), and on raw pixels, over ``seeds``.

    ``best``: model -> task -> activation (part segmentation uses the correspondence choice);
    ``data``: ``classification`` -> (train, test) records, ``correspondence`` -> test pairs,
    ``label-scarce-seg`` -> (train, test) part records; ``cfgs``: task -> protocol config. Tidy
    protocol rows (:data:`BENCH_METRICS` only) with ``model`` and ``weights``."""
    from . import protocols as P

    def run(source_for, seed):
        cls_train, cls_test = data["classification"]
        seg_train, seg_test = data["label-scarce-seg"]
        return [
            P.classification(source_for("classification"), cls_train, cls_test, cfgs.get("classification") or P.ClassifyConfig(), seed),
            P.correspondence(source_for("correspondence"), data["correspondence"], cfgs["correspondence"], seed),
            P.part_segmentation(source_for("correspondence"), seg_train, seg_test, cfgs["label-scarce-seg"], seed),
        ]  # fmt: skip

    rows = []
    for seed in seeds:
        for name, pipe in pipes.items():
            for weights, cls in (("trained", P.CachedFeatures), ("random", P.RandomUNetFeatures)):

                def source_for(task, cls=cls, pipe=pipe, name=name, seed=seed):
                    return cls(pipe, [best[name][task]], extraction, seed=seed, model_name=name)

                rows += [df.assign(model=name, weights=weights) for df in run(source_for, seed)]
        rows += [df.assign(model="pixels", weights="-") for df in run(lambda task: P.PixelFeatures(), seed)]
    out = pd.concat(rows, ignore_index=True)
    return out[out["metric"].isin(BENCH_METRICS.values())].reset_index(drop=True)


def bench_value(bench: pd.DataFrame, model: str, weights: str, metric: str) -> float:
    """The mean over seeds of ``metric`` for ``model`` with ``weights`` in a :func:`benchmark` table."""
    d = bench[(bench["model"] == model) & (bench["weights"] == weights) & (bench["metric"] == metric)]
    return float(d["value"].mean())


def images_with_massive(source, records, ratio: float) -> int:
    """How many of ``records`` have, in some map of ``source``, a channel above ``ratio`` times
    the median channel's magnitude (:func:`difstudy.properties.massive_channels`)."""
    from .properties import massive_channels

    source.prepare(records)
    return sum(any(massive_channels(m, ratio) for m in source.maps(r)) for r in records)


def correct_by_seed(
    pipe, names: Sequence[str], extraction, train, test, seeds: Sequence[int], model_name: str,
    drop: str | None = None, ratio: float | None = None,
) -> dict[int, pd.Series]:  # fmt: skip
    """Per probe seed, :func:`difstudy.protocols.correct_per_image` of ``names`` of ``pipe`` (cache
    group ``model_name``); ``drop``: ``"massive"`` zeroes each map's channels above ``ratio`` times
    the median, ``"control"`` as many random ones (:meth:`~difstudy.protocols.CachedFeatures.without_massive`)."""
    from .protocols import CachedFeatures, correct_per_image

    if drop not in (None, "massive", "control"):
        raise ValueError(f"drop must be None, 'massive' or 'control', got {drop!r}")
    out = {}
    for s in seeds:
        src = CachedFeatures(pipe, list(names), extraction, seed=int(s), model_name=model_name)
        if drop is not None:
            src = src.without_massive(ratio, control=drop == "control")
        out[int(s)] = correct_per_image(src, train, test, seed=int(s))
    return out


__all__ = [
    "MAP_KINDS",
    "COMMON_KINDS",
    "ATTENTION_KINDS",
    "BLOCK_OUTPUT_KINDS",
    "MIN_ACCURACY_GAIN",
    "feature_activations",
    "kind_of",
    "denoiser_table",
    "block_index",
    "depth_thirds",
    "depth_noise_dip",
    "mean_locality",
    "best_of_kinds",
    "probe_claim",
    "property_claims",
    "rank",
    "BENCH_METRICS",
    "benchmark",
    "bench_value",
    "correct_by_seed",
    "images_with_massive",
]
