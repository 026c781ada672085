"""The chapter "U-Net or transformer?" (issue 26): its per-image statistics and claims
(difstudy.architectures), the massive-activation measures, and per-image classification units."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from difstudy import architectures as A
from difstudy import properties


def _table(rows):
    df = pd.DataFrame(list(rows), columns=["activation", "kind", "t", "measure", "image_id", "value"])
    for c, v in dict(stage="transformer", level=pd.NA, repeat=pd.NA, size=8).items():
        df[c] = v
    return df[properties.IMAGE_COLUMNS].astype({"level": "Int64", "repeat": "Int64"})


def _dit(noise_by_block, images=6, depth=6, t=50, jitter=0.0):
    rng = np.random.default_rng(0)
    return _table(
        dict(activation=f"vit-block{b}-out", kind="out", t=t, measure="noise_share", image_id=f"im{i}",
             value=noise_by_block(b) + jitter * rng.standard_normal())
        for i in range(images) for b in range(depth)
    )  # fmt: skip


def test_depth_thirds_split_the_blocks_in_order():
    assert A.depth_thirds(8) == {0: "early", 1: "early", 2: "early", 3: "middle", 4: "middle", 5: "middle",
                                 6: "late", 7: "late"}  # fmt: skip
    with pytest.raises(ValueError, match="at least 3 blocks"):
        A.depth_thirds(2)


def test_the_depth_dip_is_the_lower_end_third_minus_the_middle():
    # blocks 0-1 at 0.5, 2-3 at 0.1, 4-5 at 0.3: dip = min(0.5, 0.3) - 0.1
    dip = A.depth_noise_dip(_dit(lambda b: [0.5, 0.5, 0.1, 0.1, 0.3, 0.3][b]))
    assert len(dip) == 6 and np.allclose(dip, 0.2)
    flat = A.depth_noise_dip(_dit(lambda b: 0.3))
    assert np.allclose(flat, 0.0)


def test_the_depth_claim_holds_for_a_dip_and_fails_for_a_flat_profile():
    dipped = _dit(lambda b: [0.5, 0.5, 0.1, 0.1, 0.3, 0.3][b], jitter=0.01)
    flat = _dit(lambda b: 0.3, jitter=0.01)
    unet = _table([])
    rows = A.property_claims(unet, dipped, unet, flat)
    assert list(rows["verdict"]) == ["holds"] and "analogue" in rows["claim"][0]
    rows = A.property_claims(unet, flat, unet, flat)
    assert list(rows["verdict"]) == ["fails"]


def test_the_locality_claim_compares_the_common_kinds_only():
    def both(unet_value, dit_value, images=6):
        rng = np.random.default_rng(1)
        rows = []
        for i in range(images):
            for kind in ("self-q", "out", "res-out"):  # res-out: the U-Net's own kind, left out
                v = 9.0 if kind == "res-out" else unet_value + 0.01 * rng.standard_normal()
                rows.append(
                    dict(activation=f"u-{kind}", kind=kind, t=50, measure="locality", image_id=f"im{i}", value=v)
                )
        unet = _table(rows)
        dit = _table(dict(activation=f"d-{k}", kind=k, t=50, measure="locality", image_id=f"im{i}",
                          value=dit_value + 0.01 * rng.standard_normal()) for i in range(images) for k in ("self-q", "out"))  # fmt: skip
        return unet, dit

    u, d = both(0.3, 0.1)
    u0, d0 = both(0.0, 0.0)
    assert np.allclose(A.mean_locality(u), 0.3, atol=0.02)  # the res-out 9.0 is not in the mean
    row = A.property_claims(u, d, u0, d0).iloc[0]
    assert row["verdict"] == "holds" and row["estimate"] == pytest.approx(0.2, abs=0.02)
    # the same gap with random weights too: the architecture, not training; the claim does not hold
    assert A.property_claims(u, d, u, d).iloc[0]["verdict"] == "fails"


def test_a_probe_claim_is_paired_over_images_and_seeds_against_its_control():
    ids = pd.Index([f"im{i}" for i in range(40)], name="image_id")
    rng = np.random.default_rng(0)
    base = {s: pd.Series((rng.random(40) < 0.5).astype(float), index=ids) for s in (0, 1)}
    better = {s: pd.Series(np.maximum(base[s], (rng.random(40) < 0.6).astype(float)), index=ids) for s in (0, 1)}
    row = A.probe_claim("a beats b", "correct a - b", better, base, base, base)
    assert row["verdict"] == "holds" and row["n_units"] == 40 and "2 seeds" in row["note"]
    same = A.probe_claim("a beats b", "correct a - b", base, base, base, base)
    assert same["verdict"] == "fails" and same["estimate"] == 0


def test_best_of_kinds_picks_within_the_kinds():
    scores = pd.DataFrame(dict(activation=["a", "b", "c"], value=[0.9, 0.5, 0.7]))
    kinds = {"a": "out", "b": "self-q", "c": "self-k"}
    assert A.best_of_kinds(scores, kinds, A.ATTENTION_KINDS) == ("c", 0.7)
    with pytest.raises(ValueError, match="no scored activation"):
        A.best_of_kinds(scores, kinds, ("ffn-inner",))


def test_massive_measures_count_the_channels_above_the_ratio():
    from difstudy.properties import properties_from_cache

    feat = torch.ones(2, 8, 4, 4)
    feat[0, 3] = 500.0  # image 0: one massive channel; image 1: none

    class Cache:
        def load(self, name, ids, t, variant, seed):
            return feat

    frame = pd.DataFrame([dict(name="x", kind="out", stage="transformer", level=pd.NA, repeat=pd.NA)])
    df = properties_from_cache(Cache(), frame, ["a", "b"], [50], [0], measures=properties.MASSIVE_MEASURES,
                               progress=False, per_image=True)  # fmt: skip
    v = df.set_index(["measure", "image_id"])["value"]
    assert v["massive_count", "a"] == 1 and v["massive_count", "b"] == 0
    assert v["massive_ratio", "a"] == pytest.approx(500.0) and v["massive_ratio", "b"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="unknown measures.*massive_ratio"):
        properties.measure_properties("mini", [], measures=["massive"])


def test_correct_per_image_matches_the_accuracy_of_the_same_probe():
    from difstudy.data.toyworld import ToyWorld
    from difstudy.protocols import PixelFeatures, classification, correct_per_image, toy_records

    train, test = toy_records(ToyWorld("train", n=40)), toy_records(ToyWorld("test", n=20))
    hits = correct_per_image(PixelFeatures(), train, test, seed=0)
    acc = classification(PixelFeatures(), train, test, seed=0)
    assert list(hits.index) == [r.image_id for r in test] and set(hits.unique()) <= {0.0, 1.0}
    assert hits.mean() == pytest.approx(float(acc.loc[acc["metric"] == "accuracy", "value"].iloc[0]))


def test_the_denoiser_table_shows_the_shared_components():
    from difstudy.models import load

    pipes = {"mini": load("mini"), "mini-dit": load("mini-dit")}
    t = A.denoiser_table(pipes)
    assert (
        t.loc["mini", "vae"] == t.loc["mini-dit", "vae"]
        and t.loc["mini", "text_encoder"] == t.loc["mini-dit", "text_encoder"]
    )
    assert t.loc["mini-dit", "denoiser"] == "PixArtTransformer2DModel" and t.loc["mini-dit", "training_steps"] >= 2000
    assert t.loc["mini-dit", "features"] == t.loc["mini-dit", "activations"] - 16  # 8 blocks x 2 attention maps
    for m in ("mini", "mini-dit"):  # compute: FLOPs per sample x batch x steps, and the denoiser's CPU hours
        row = t.loc[m]
        assert row["training_pflop"] == pytest.approx(
            row["gflop_per_training_sample"] * 1e9 * row["training_batch"] * row["training_steps"] / 1e15, rel=1e-3
        )
        assert 0 < row["denoiser_cpu_hours"] <= row["training_cpu_hours"]
    assert t.loc["mini", "denoiser_cpu_hours"] < t.loc["mini", "training_cpu_hours"]  # its log begins with the VAE


def test_training_flops_of_the_transformer_follow_the_6nd_rule_with_its_attention():
    """A transformer's training FLOPs per sample are about 6 x (block parameters) x (image tokens);
    the mini DiT's attention products add about 6% (counted only through the math kernel: torch's
    registry has no CPU flash kernel), so without them the count falls below the bound. The
    pipeline's parameters keep their gradient state."""
    from difstudy.denoisers import denoiser
    from difstudy.models import load

    pipe = load("mini-dit")
    net = denoiser(pipe)
    before = [(p.requires_grad, p.grad) for p in net.parameters()]
    flops = A.training_flops_per_sample(pipe)
    tokens = (16 // net.config.patch_size) ** 2
    six_nd = 6 * sum(p.numel() for p in net.transformer_blocks.parameters()) * tokens
    assert 0.97 < flops / six_nd < 1.1
    assert [(p.requires_grad, p.grad) for p in net.parameters()] == before


def test_the_dit_samples_without_a_caption_cleaning_warning(capfd):
    """PixArt cleans captions with ftfy/bs4 by default and warns in every output when they are not
    installed (a warning in the chapter's output fails the book check); the toy captions need none."""
    from difstudy import card
    from difstudy.models import load

    images = card.generate(load("mini-dit"), ["a photo of a fish", "a photo of a boat"], steps=2)
    assert images.shape == (2, 64, 64, 3)
    assert "clean_caption" not in capfd.readouterr().err
