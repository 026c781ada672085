"""Measurements for the mini model's card (all computed, none typed in).

- :func:`training_curves`: the training log as a tidy frame;
- :func:`vae_psnr`: VAE reconstruction PSNR per validation image;
- :func:`judge_accuracy` / :func:`sample_recognition`: the committed judge
  (:mod:`difstudy.judge`) on real test images, then on class-conditional samples;
- :func:`feature_scores`: classification and correspondence from single
  activations for the trained U-Net, the same architecture with random
  weights, and raw pixels, through the one protocol layer.

This is the study layer: :mod:`difstudy.models` only builds and loads models.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch

from .data.toyworld import CLASS_NAMES, ToyWorld, stack
from .judge import predict, to_input, wilson_interval
from .models import vae_scale_factor


def model_folder(model: str) -> Path:
    """The pipeline folder of ``model`` (``mini`` or a local path), where the training files are."""
    from .models import MINI_PATH

    return MINI_PATH if model == "mini" else Path(model)


def training_curves(log_csv: str | Path) -> pd.DataFrame:
    """Tidy training log (stage, step, loss, lr, ...); a resumed run's repeated steps keep their last value."""
    df = pd.read_csv(log_csv)
    return df.drop_duplicates(["stage", "step"], keep="last").sort_values(["stage", "step"]).reset_index(drop=True)


def training_cpu_hours(log: pd.DataFrame) -> float:
    """Total process CPU time of the training run (the log's cumulative ``cpu_seconds``), in hours."""
    if "cpu_seconds" not in log:
        raise ValueError("this training log has no cpu_seconds column (it predates difstudy.train.mini v2)")
    return float(log["cpu_seconds"].max()) / 3600


def denoiser_cpu_hours(log: pd.DataFrame) -> float:
    """CPU hours of the denoiser's training alone: the log's cumulative ``cpu_seconds`` at its end
    minus that at the end of the VAE stage (the mini U-Net's log begins with the VAE it shares)."""
    vae = log.loc[log["stage"] == "vae", "cpu_seconds"]
    return float(log["cpu_seconds"].max() - (vae.max() if len(vae) else 0.0)) / 3600


@torch.no_grad()
def vae_psnr(pipe, world: ToyWorld, batch: int = 50) -> pd.DataFrame:
    """PSNR (dB, on 8-bit images) of VAE reconstructions (posterior mean) per image."""
    rows = []
    for s in range(0, len(world), batch):
        samples = [world[i] for i in range(s, min(s + batch, len(world)))]
        x = to_input(stack(samples))
        rec = pipe.vae.decode(pipe.vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
        a, b = ((x + 1) * 127.5).round(), ((rec + 1) * 127.5).round()
        mse = (a - b).pow(2).flatten(1).mean(1)
        for smp, m in zip(samples, mse):
            psnr = float(10 * torch.log10(255**2 / m.clamp_min(1e-10)))
            rows.append(dict(image_id=smp.image_id, complexity=smp.complexity, psnr=psnr))
    return pd.DataFrame(rows)


@torch.no_grad()
def reconstructions(pipe, images: np.ndarray) -> np.ndarray:
    """(N, H, W, 3) uint8 VAE reconstructions (posterior mean) of uint8 ``images``."""
    rec = pipe.vae.decode(pipe.vae.encode(to_input(images)).latent_dist.mean).sample.clamp(-1, 1)
    return ((rec + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()


def judge_accuracy(judge, n_test: int = 500) -> float:
    """Accuracy of the judge on ``n_test`` real toy-world test images."""
    test = ToyWorld("test", n=n_test)
    samples = list(test)
    return float((predict(judge, stack(samples)) == np.array([s.label for s in samples])).mean())


@torch.no_grad()
def recognition_through_vae(pipe, judge, n_test: int = 500, batch: int = 100) -> pd.DataFrame:
    """Per class, the share of ``n_test`` real test images the judge recognises, as they are and
    through the VAE (posterior-mean reconstruction): a sample is decoded by the same VAE, so the
    second row is about the most of a class's samples the judge can recognise (the judge learnt on
    real images; detail the VAE loses is lost to every sample)."""
    samples = list(ToyWorld("test", n=n_test))
    images, labels = stack(samples), np.array([s.label for s in samples])
    rec = np.concatenate([reconstructions(pipe, images[i : i + batch]) for i in range(0, len(images), batch)])
    df = pd.DataFrame(
        {
            "cls": [CLASS_NAMES[i] for i in labels],
            "real test images": predict(judge, images) == labels,
            "their VAE reconstructions": predict(judge, rec) == labels,
        }
    )
    return df.groupby("cls")[["real test images", "their VAE reconstructions"]].mean().T.reindex(columns=CLASS_NAMES)


@torch.no_grad()
def generate(pipe, prompts: list[str], steps: int = 30, guidance: float = 4.0, seed: int = 0) -> np.ndarray:
    """(N, H, W, 3) uint8 samples, one per prompt, with the pipeline's own
    sampler (the mini model's DDIM) and classifier-free guidance."""
    from .denoisers import family, native_size, text_len

    size = native_size(pipe, vae_scale_factor(pipe))
    g = torch.Generator().manual_seed(seed)
    kw = {}
    if family(pipe) == "pixart":  # no size binning (the mini sizes are not PixArt's); the tokenizer's length
        # clean_caption needs ftfy and bs4 (PixArt's T5 caption cleaning): the toy captions need no cleaning
        kw = dict(use_resolution_binning=False, max_sequence_length=text_len(pipe), clean_caption=False)
    out = pipe(
        prompts,
        num_inference_steps=steps,
        guidance_scale=guidance,
        height=size,
        width=size,
        generator=g,
        output_type="np",
        **kw,
    )
    return (out.images * 255).round().astype(np.uint8)


def sample_recognition(pipe, judge, per_class: int = 20, steps: int = 30, guidance: float = 4.0, seed: int = 0):
    """Generate ``per_class`` samples for each prompt "a photo of a <class>"
    and let the judge name them.

    Returns ``(frame, images)``: one row per sample (cls, predicted, correct)."""
    prompts = [f"a photo of a {c}" for c in CLASS_NAMES for _ in range(per_class)]
    chunks = [prompts[i : i + 50] for i in range(0, len(prompts), 50)]
    images = np.concatenate([generate(pipe, p, steps, guidance, seed + i) for i, p in enumerate(chunks)])
    pred = predict(judge, images)
    labels = np.repeat(np.arange(len(CLASS_NAMES)), per_class)
    df = pd.DataFrame(
        dict(cls=[CLASS_NAMES[i] for i in labels], predicted=[CLASS_NAMES[i] for i in pred], correct=pred == labels)
    )
    return df, images


@torch.no_grad()
def prompt_effect(pipe, n: int = 60, timesteps=(300, 500, 700), seed: int = 0) -> pd.DataFrame:
    """Does the prompt steer the U-Net? Denoising loss (MSE to the model's target) of ``n`` test
    images at each of ``timesteps``, with the image's own class prompt ("a photo of a <class>"),
    another class's prompt, and the empty prompt, on the same noise draws. A model that follows
    its class prompt has a clearly lower loss with its own prompt than with another's; equal
    losses mean the class word is ignored and guidance cannot make a sample follow its class."""
    from .diffusion import denoising_losses

    world = ToyWorld("test", n=n)
    labels = [world[i].label for i in range(n)]
    prompts = {
        "own class": [f"a photo of a {CLASS_NAMES[c]}" for c in labels],
        "other class": [f"a photo of a {CLASS_NAMES[(c + 1 + i % 9) % 10]}" for i, c in enumerate(labels)],
        "empty": [""] * n,
    }
    losses = denoising_losses(pipe, [world[i].image for i in range(n)], prompts, timesteps, seed)
    rows = [{"t": int(t), **{k: v[j] for k, v in losses.items()}} for j, t in enumerate(timesteps)]
    df = pd.DataFrame(rows).set_index("t")
    df.loc["mean"] = df.mean()
    df["other / own"] = df["other class"] / df["own class"]
    return df


def recognition_summary(df: pd.DataFrame) -> dict:
    """Share recognised with its 95% Wilson interval, and the share per class prompt
    (``per_class``: class name -> share, in the order of ``CLASS_NAMES``)."""
    k, n = int(df["correct"].sum()), len(df)
    lo, hi = wilson_interval(k, n)
    shares = df.groupby("cls")["correct"].mean()
    per_class = {c: float(shares[c]) for c in CLASS_NAMES if c in shares.index}
    return dict(recognised=k / n, n=n, ci95_low=lo, ci95_high=hi, per_class=per_class)


def curve_per_class(curve: pd.DataFrame) -> pd.DataFrame:
    """Share recognised per class at each step of a recognition curve that recorded it
    (``recognition_curve.csv``'s ``per_class`` column, written by ``difstudy.train.evaluate``):
    one row per such step, one column per class in ``CLASS_NAMES`` order, then ``all``."""
    import ast

    if "per_class" not in curve:
        return pd.DataFrame(columns=[*CLASS_NAMES, "all"])
    rows = {}
    for _, r in curve.dropna(subset=["per_class"]).iterrows():
        try:
            shares = ast.literal_eval(str(r["per_class"]))
        except (ValueError, SyntaxError) as e:
            raise ValueError(
                f"recognition_curve.csv, step {r['step']}: per_class is not a class -> share mapping "
                f"({e}); rerun python -m difstudy.train.evaluate --only-steps {r['step']} to rewrite it"
            ) from None
        rows[int(r["step"])] = {**{c: shares.get(c) for c in CLASS_NAMES}, "all": float(r["recognised"])}
    return pd.DataFrame.from_dict(rows, orient="index", columns=[*CLASS_NAMES, "all"]).rename_axis("step")


def describe(pipe) -> pd.DataFrame:
    """Components of a pipeline with their class and parameter count."""
    rows = []
    for name in ("unet", "transformer", "vae", "text_encoder", "text_encoder_2", "controlnet"):
        m = getattr(pipe, name, None)
        if m is not None:
            rows.append(dict(component=name, cls=type(m).__name__, parameters=sum(p.numel() for p in m.parameters())))
    return pd.DataFrame(rows)


CARD_KINDS = ("res-out", "vit-out", "upsampler-out", "downsampler-out", "out")


def card_candidates(pipe, kinds=CARD_KINDS) -> list[str]:
    """Block-level activations (every ResNet, ViT, up/downsampler output; a transformer's block
    outputs) in forward order."""
    from .denoisers import pipeline_catalog

    df = pipeline_catalog(pipe).to_frame()
    return df[df["kind"].isin(kinds)]["name"].tolist()


def feature_scores(
    pipe,
    activations,
    n_train: int = 300,
    n_test: int = 300,
    n_pairs: int = 100,
    seeds=(0, 1, 2),
    t: int = 50,
    cache_dir: str = "cache/features",
    correspondence_cfg=None,
    pck_stages=("up",),
) -> pd.DataFrame:
    """Classification accuracy (linear probe on pooled features) and PCK@0.1
    of each activation **alone**, for the trained U-Net, the same architecture
    with random weights (new weights per seed), and raw pixels.

    One protocol layer (:mod:`difstudy.protocols`): the same functions as the
    benchmark tables and the official-layout runners. Every activation is
    extracted in one pass per (weights, seed) and then read back one at a
    time from the cache. Correspondence is scored for activations of
    ``pck_stages`` only (the card reports the best up-stage one). Tidy rows:
    weights, activation, stage, task, metric, value, seed, protocol.
    """
    from .denoisers import pipeline_catalog
    from .protocols import (
        CachedFeatures,
        ClassifyConfig,
        CorrespondenceConfig,
        ExtractionConfig,
        PixelFeatures,
        RandomUNetFeatures,
        classification,
        concat_records,
        correspondence,
        pair_images,
        toy_pairs,
        toy_records,
    )

    ccfg = correspondence_cfg or CorrespondenceConfig()
    train = toy_records(ToyWorld("train", n=n_train))
    test = toy_records(ToyWorld("test", n=n_test))
    pairs = toy_pairs(ToyWorld("test", n=n_test), n_pairs, seed=0)
    everything = concat_records(train, test, pair_images(pairs))
    stage = pipeline_catalog(pipe).to_frame().set_index("name")["stage"].to_dict()
    ex = ExtractionConfig(t=t, cache_dir=cache_dir)
    rows = []

    def score(source, weights, act, seed):
        frames = [classification(source, train, test, ClassifyConfig(), seed)]
        if stage.get(act, "pixels") in (*pck_stages, "pixels"):
            frames.append(correspondence(source, pairs, ccfg, seed))
        for df in frames:
            df = df[df["metric"].isin(["accuracy", "PCK@0.1 img", "PCK@0.1 bbox"])]
            for r in df.itertuples():
                rows.append(
                    dict(
                        weights=weights,
                        activation=act,
                        stage=stage.get(act, "pixels"),
                        task=r.task,
                        metric=r.metric,
                        value=r.value,
                        seed=int(seed),
                        protocol=r.protocol,
                    )
                )

    for seed in seeds:
        for weights, cls in (("trained", CachedFeatures), ("random", RandomUNetFeatures)):
            everyone = cls(pipe, activations, ex, seed=seed)
            everyone.prepare(everything)  # one extraction pass for all activations
            for act in activations:
                # same weights (random ones are seeded), same cache group: read back, nothing recomputed
                score(cls(pipe, [act], ex, seed=seed), weights, act, seed)
        score(PixelFeatures(), "raw pixels", "pixels", seed)
    return pd.DataFrame(rows)


def best_of(scores: pd.DataFrame, weights: str, metric: str) -> tuple[str, float]:
    """The activation with the highest mean ``metric`` (over seeds) for ``weights``, and that mean."""
    df = scores[(scores["weights"] == weights) & (scores["metric"] == metric)]
    if df.empty:
        raise ValueError(f"no {metric!r} scores for weights {weights!r}")
    means = df.groupby("activation")["value"].mean()
    return str(means.idxmax()), float(means.max())


def card_summary(
    scores: pd.DataFrame,
    psnr: pd.DataFrame,
    judge_acc: float,
    recognition: dict,
    cpu_hours: float,
    prompt: pd.DataFrame | None = None,
) -> dict:
    """The card's headline numbers (the keys of ``card.json``); ``prompt`` is :func:`prompt_effect`'s table."""
    acc, pck = "accuracy", "PCK@0.1 img"
    best_cls, cls_trained = best_of(scores, "trained", acc)
    best_pck, pck_trained = best_of(scores, "trained", pck)
    return dict(
        vae_psnr_db=float(psnr["psnr"].mean()),
        vae_psnr_db_by_complexity={int(k): float(v) for k, v in psnr.groupby("complexity")["psnr"].mean().items()},
        judge_accuracy_real=float(judge_acc),
        samples_recognised=float(recognition["recognised"]),
        samples_recognised_ci95=[float(recognition["ci95_low"]), float(recognition["ci95_high"])],
        samples_recognised_per_class=dict(recognition.get("per_class", {})),
        n_samples=int(recognition["n"]),
        cls_acc_trained=cls_trained,
        cls_best_activation=best_cls,
        cls_acc_random=best_of(scores, "random", acc)[1],
        cls_acc_pixels=best_of(scores, "raw pixels", acc)[1],
        pck_best_up_trained=pck_trained,
        pck_best_up_activation=best_pck,
        pck_best_up_random=best_of(scores, "random", pck)[1],
        pck_pixels=best_of(scores, "raw pixels", pck)[1],
        training_cpu_hours=float(cpu_hours),
    ) | (
        {}
        if prompt is None
        else dict(
            prompt_loss_own_class=float(prompt.loc["mean", "own class"]),
            prompt_loss_other_class=float(prompt.loc["mean", "other class"]),
            prompt_loss_empty=float(prompt.loc["mean", "empty"]),
        )
    )


LIMITS_FILE = "classification_limits.csv"


def _limits_frame(pipe, folder: str | Path) -> tuple[pd.DataFrame | None, str]:
    """The limits table saved beside the weights in ``folder``, checked (its columns, and that it
    was measured on the U-Net ``pipe`` holds); else None and the sentence that says why not."""
    from .extract import module_fingerprint

    path = Path(folder) / LIMITS_FILE
    if not path.exists():
        return None, f"not measured for these weights (no {path.name}; run scripts/classification_limits.py)"
    df = pd.read_csv(path, dtype={"unet_fingerprint": str})  # hex text that may look like a number
    need = {"pooling", "labels", "weights", "linear", "mlp", "unet_fingerprint", "activation"}
    if missing := need - set(df.columns):
        raise ValueError(f"{path}: columns {sorted(missing)} are missing; rerun scripts/classification_limits.py")
    fp, measured_on = module_fingerprint(pipe.unet), set(df["unet_fingerprint"].fillna(""))
    if measured_on != {fp}:
        return None, (
            f"{path.name} was measured on other weights ({', '.join(sorted(measured_on))},"
            f" these are {fp}); rerun scripts/classification_limits.py"
        )
    return df, ""


def limits_numbers(df: pd.DataFrame) -> dict:
    """The limits table's headline numbers: the card's probe (linear, mean pooling, fewest labels),
    the best probe on the trained features with that many labels and with any number, each as
    ``(accuracy, "probe, pooling, N labels")``, and the best any probe reaches per control."""
    long = df.melt(id_vars=["pooling", "labels", "weights"], value_vars=["linear", "mlp"], var_name="probe")
    n_card = int(long["labels"].min())
    card_row = long[(long["pooling"] == "mean (card)") & (long["labels"] == n_card)]
    base = float(card_row.loc[(card_row["weights"] == "trained") & (card_row["probe"] == "linear"), "value"].iloc[0])
    trained = long[long["weights"] == "trained"]

    def best(rows: pd.DataFrame) -> tuple[float, str]:
        b = rows.sort_values("value", kind="stable").iloc[-1]
        return float(b["value"]), f"{b['probe']}, {b['pooling']}, {int(b['labels'])} labels"

    controls = long[long["weights"] != "trained"].groupby("weights")["value"].max()
    return dict(
        activation=str(df["activation"].iloc[0]),
        n_card=n_card,
        n_max=int(long["labels"].max()),
        card=base,
        best_card_labels=best(trained[trained["labels"] == n_card]),
        best_any=best(trained),
        controls={str(w): float(v) for w, v in controls.items()},
    )


def measured_limits(pipe, folder: str | Path) -> dict | None:
    """:func:`limits_numbers` of the limits table beside the weights in ``folder``, or None where it
    is missing or was measured on other weights than ``pipe``'s U-Net."""
    df, _ = _limits_frame(pipe, folder)
    return None if df is None else limits_numbers(df)


def classification_limits(
    pipe, folder: str | Path, best_activation: str | None = None
) -> tuple[pd.DataFrame | None, str]:
    """The probe-against-feature measurement of ``scripts/classification_limits.py`` saved beside
    the weights in ``folder``, when it was measured on the U-Net ``pipe`` holds (its fingerprint),
    and a sentence that says what it shows (or why there is no table: not measured, or measured on
    other weights). Accuracy per pooling x labels x weights, the card's linear probe and an MLP.
    ``best_activation`` (the card's best for classification): a table measured on another
    activation is still shown, and the sentence says so and how to measure the best one."""
    df, why = _limits_frame(pipe, folder)
    if df is None:
        return None, why
    n = limits_numbers(df)
    k = n["n_card"]
    text = (
        f"{n['activation']}: the card's probe (linear, mean pooling, {k} labels) {n['card']:.3f}; the best"
        f" probe on the same features with {k} labels {n['best_card_labels'][0]:.3f} ({n['best_card_labels'][1]}),"
        f" with any number of labels {n['best_any'][0]:.3f} ({n['best_any'][1]}); the best any probe reaches on "
        + ", ".join(f"{w} {v:.3f}" for w, v in n["controls"].items())
    )
    if best_activation is not None and best_activation != n["activation"]:
        text += (
            f". Measured on {n['activation']}, not on this card's best activation ({best_activation}):"
            f" run scripts/classification_limits.py --activation {best_activation}"
        )
    table = df.pivot_table(index=["pooling", "labels"], columns="weights", values=["linear", "mlp"])
    return table, text


def classification_decision(summary: dict, limits: dict | None) -> dict | None:
    """The classification goal (best trained activation >= 0.50 at 300 labels) when it is missed:
    the measured reason from the limits table's numbers (:func:`limits_numbers`, None where it is
    not measured for these weights) and the decision that follows. None when the goal is met.

    Three cases: a probe on the same features reaches 0.50 (the card's probe is the limit: the
    model stays); the features hold class information the controls lack by the card's 15-point
    margin but no probe reaches 0.50, even with the most labels measured (the model's size is the
    limit: the next model is wider); neither (the features fall short: the model is retrained)."""
    acc = summary["cls_acc_trained"]
    if acc >= 0.5:
        return None
    row = dict(goal="best trained activation, classification >= 0.50", measured=acc)
    if limits is None:
        return row | dict(
            reason="not measured on these weights (run scripts/classification_limits.py)",
            decision="measure the limits table before deciding",
        )
    best, how = limits["best_any"]
    control = max(limits["controls"].values())
    row["reason"] = (
        f"on {limits['activation']}: the card's probe {limits['card']:.3f}; the best probe on the same features"
        f" {best:.3f} ({how}); the best any probe reaches on random weights or pixels {control:.3f}"
    )
    if best >= 0.5:
        row["decision"] = (
            f"a probe reaches 0.50 on the same features ({how}): the card's protocol (a linear probe on the"
            f" spatial mean, {limits['n_card']:,} labels), not the features, is the limit. The model is kept, the"
            " card keeps the study's protocol, and classification is read by its margins over the controls"
        )
    elif best - control >= 0.15:
        row["decision"] = (
            f"the features hold class information the controls lack ({100 * (best - control):.0f} points above"
            f" them), but no probe reaches 0.50 on them, even with {limits['n_max']:,} labels: the goal is out of reach"
            " at this size. This model is kept for the study, whose classification claims rest on the margins"
            " over random weights and pixels; 0.50 is the goal of the next, wider U-Net"
        )
    else:
        row["decision"] = "the features themselves fall short of the controls' margin: the model is retrained"
    return row


def goals(summary: dict) -> pd.DataFrame:
    """Each quality goal of the mini model with its measured number and met / missed."""
    s = summary
    rows = [
        ("VAE PSNR on validation images (dB)", ">= 25", s["vae_psnr_db"], s["vae_psnr_db"] >= 25),
        ("judge accuracy on real test images", ">= 0.90", s["judge_accuracy_real"], s["judge_accuracy_real"] >= 0.9),
        (
            f"samples recognised by the judge (n={s['n_samples']})",
            ">= 0.50",
            s["samples_recognised"],
            s["samples_recognised"] >= 0.5,
        ),
        (
            "... its 95% interval's lower bound",
            ">= 0.43",
            s["samples_recognised_ci95"][0],
            s["samples_recognised_ci95"][0] >= 0.43,
        ),
        *(
            [
                (
                    f"... the least recognised class ({min(per, key=per.get)})",
                    ">= 0.20",
                    min(per.values()),
                    min(per.values()) >= 0.2,
                )
            ]
            if (per := s.get("samples_recognised_per_class"))
            else []
        ),
        ("best trained activation, classification", ">= 0.50", s["cls_acc_trained"], s["cls_acc_trained"] >= 0.5),
        (
            "... minus raw pixels (points)",
            ">= 15",
            100 * (s["cls_acc_trained"] - s["cls_acc_pixels"]),
            s["cls_acc_trained"] - s["cls_acc_pixels"] >= 0.15,
        ),
        (
            "... minus random weights (points)",
            ">= 15",
            100 * (s["cls_acc_trained"] - s["cls_acc_random"]),
            s["cls_acc_trained"] - s["cls_acc_random"] >= 0.15,
        ),
        (
            "best up-stage PCK@0.1, trained minus random (points)",
            "> 0",
            100 * (s["pck_best_up_trained"] - s["pck_best_up_random"]),
            s["pck_best_up_trained"] > s["pck_best_up_random"],
        ),
        (
            "best up-stage PCK@0.1, trained minus pixels (points)",
            "> 0",
            100 * (s["pck_best_up_trained"] - s["pck_pixels"]),
            s["pck_best_up_trained"] > s["pck_pixels"],
        ),
    ]
    df = pd.DataFrame(rows, columns=["goal", "target", "measured", "met"])
    df["verdict"] = np.where(df["met"], "met", "missed")
    return df.drop(columns="met")
