"""Tests of difstudy.properties on synthetic maps with known answers, the table and the claims."""

from __future__ import annotations

import math

import matplotlib
import numpy as np
import pandas as pd
import pytest
import torch

from difstudy import properties as P
from difstudy.properties import (
    claims,
    distance_thresholds,
    granularity,
    locality_index,
    noise_share,
    properties_from_cache,
    resize_mask,
    write_part,
)

matplotlib.use("Agg")
torch.set_num_threads(1)


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------
# noise share
def test_noise_share_of_a_map_that_ignores_the_noise_is_zero():
    signal = _randn(8, 12, 12)
    assert noise_share(signal[None].repeat(6, 1, 1, 1)) == pytest.approx(0.0, abs=1e-12)


def test_noise_share_ignores_constant_channel_offsets():
    # pure spatial noise plus large per-channel constants: the offsets are neither signal nor noise
    offsets = 10 * _randn(1, 8, 1, 1, seed=5)
    assert noise_share(_randn(4, 8, 16, 16, seed=6) + offsets) == pytest.approx(1.0, abs=0.02)
    # a signal plus offsets that differ per draw is still all signal
    signal = _randn(8, 16, 16, seed=7)
    assert noise_share(signal[None] + 10 * _randn(4, 8, 1, 1, seed=8)) == pytest.approx(0.0, abs=1e-9)


def test_noise_share_of_pure_independent_noise_is_one():
    assert noise_share(_randn(8, 16, 16, 16)) == pytest.approx(1.0, abs=0.01)
    # no (K - 1) / K bias with few draws: a naive "variance across draws / total variance" gives 0.5 here
    assert noise_share(_randn(2, 16, 16, 16, seed=1)) == pytest.approx(1.0, abs=0.05)


@pytest.mark.parametrize("a", [0.5, 1.0, 2.0])
def test_noise_share_of_a_mixture_is_the_analytic_share(a):
    signal = _randn(16, 16, 16)  # unit variance across positions
    maps = signal[None] + a * _randn(8, 16, 16, 16, seed=3)  # unit-variance noise per draw, scaled by a
    assert noise_share(maps) == pytest.approx(a * a / (a * a + 1), abs=0.02)


def test_noise_share_of_a_constant_map_is_nan():
    assert math.isnan(noise_share(torch.full((4, 3, 5, 5), 2.5)))
    assert math.isnan(noise_share(torch.zeros(4, 3, 5, 5)))


def test_noise_share_accepts_numpy_and_attention_map_layouts():
    keys_hw = np.random.default_rng(0).random((5, 64, 8, 8))  # (K, keys, H, W)
    assert 0.9 < noise_share(keys_hw) <= 1.0


@pytest.mark.parametrize("shape", [(8, 16, 16), (1, 4, 8, 8), (2, 0, 8, 8)])
def test_noise_share_bad_shapes_raise_naming_the_shape(shape):
    with pytest.raises(ValueError, match=str(shape).replace("(", r"\(").replace(")", r"\)")):
        noise_share(torch.zeros(shape))


# ----------------------------------------------------------------------------
# granularity
def _wave(ky, kx, h, w, c=3):
    y, x = torch.meshgrid(torch.arange(h).double(), torch.arange(w).double(), indexing="ij")
    phases = torch.arange(c).double()[:, None, None]
    return torch.cos(2 * math.pi * (ky * y / h + kx * x / w) + phases)


def test_granularity_of_a_sinusoid_is_its_frequency_in_cycles_per_pixel():
    assert granularity(_wave(0, 2, 16, 16)) == pytest.approx(2 / 16, abs=1e-9)
    assert granularity(_wave(3, 4, 20, 20)) == pytest.approx(5 / 20, abs=1e-9)  # radial: sqrt(3^2 + 4^2) / 20
    assert granularity(_wave(2, 0, 16, 24)) == pytest.approx(2 / 16, abs=1e-9)


def test_granularity_is_comparable_across_resolutions():
    # the same period in pixels (8 px) at 16 and 64 px: the same granularity
    assert granularity(_wave(0, 2, 16, 16)) == pytest.approx(granularity(_wave(0, 8, 64, 64)), abs=1e-9)
    # the same pattern relative to the map (2 cycles per map) at twice the size: half the cycles per pixel
    assert granularity(_wave(0, 2, 32, 32)) == pytest.approx(granularity(_wave(0, 2, 16, 16)) / 2, abs=1e-9)


def test_granularity_orders_smooth_below_noise_and_ignores_channel_means():
    smooth, noise = _wave(1, 1, 16, 16), _randn(4, 16, 16).double()
    assert granularity(smooth) < 0.1 < 0.3 < granularity(noise) < 0.45
    assert granularity(smooth + 100.0) == pytest.approx(granularity(smooth), abs=1e-9)


def test_granularity_of_a_spatially_constant_map_is_nan():
    assert math.isnan(granularity(torch.ones(3, 8, 8) * torch.arange(3.0)[:, None, None]))


@pytest.mark.parametrize("shape", [(16, 16), (1, 3, 8, 8), (3, 0, 8)])
def test_granularity_bad_shapes_raise_naming_the_shape(shape):
    with pytest.raises(ValueError, match=str(shape).replace("(", r"\(").replace(")", r"\)")):
        granularity(torch.zeros(shape))


# ----------------------------------------------------------------------------
# locality
H = 16


def _grid(h=H):
    return torch.meshgrid(torch.arange(h).double(), torch.arange(h).double(), indexing="ij")


def _positional(h=H):
    """Smooth sin/cos ramps of the position, like a positional embedding."""
    y, x = _grid(h)
    return torch.stack([f(math.pi * k * c / h) for k in (1, 2) for c in (y, x) for f in (torch.sin, torch.cos)])


def _blocks(h=H):
    """Parts independent of position: a 3-colouring of 4x4 blocks."""
    y, x = _grid(h)
    return ((y // 4 + x // 4) % 3).long()


def _one_hot(parts):
    return torch.nn.functional.one_hot(parts, int(parts.max()) + 1).permute(2, 0, 1).double()


def test_locality_of_a_positional_ramp_is_clearly_positive():
    assert locality_index(_positional(), _blocks()) > 0.8


def test_locality_of_a_part_one_hot_is_clearly_negative():
    # the paper's comparison: near pixels of different parts (one-hots: dissimilar) against far
    # pixels of the same part (identical): semantics wins, the index is well below 0
    y, x = _grid()
    quadrants = ((y >= 8).long() * 2 + (x >= 8).long()).long()
    assert locality_index(_one_hot(quadrants), quadrants) == pytest.approx(-4 / 3)  # centred one-hots of 4 parts
    assert locality_index(_one_hot(_blocks()), _blocks()) < -1.0


def test_locality_ranks_position_above_semantics_above_noise():
    parts = _blocks()
    pos, sem, noise = _positional(), _one_hot(parts), _randn(16, H, H).double()
    mixed = torch.cat([pos, 3 * sem])
    scores = [locality_index(f, parts) for f in (pos, mixed, sem)]
    assert scores[0] > scores[1] > scores[2]
    assert abs(locality_index(noise, parts)) < 0.05


def test_locality_is_deterministic_and_resolution_relative():
    a = locality_index(_positional(), _blocks())
    assert locality_index(_positional(), _blocks()) == a
    # the same smooth pattern at 32 px (thresholds scale with the map) scores about the same
    big = locality_index(_positional(32), _blocks(32))
    assert big == pytest.approx(a, abs=0.15)


def test_locality_is_nan_without_enough_pairs():
    assert math.isnan(locality_index(_randn(4, 2, 2), torch.tensor([[0, 1], [0, 1]])))  # 2x2: no far pairs
    assert math.isnan(locality_index(_positional(), torch.zeros(H, H, dtype=torch.long)))  # one part only
    assert math.isnan(locality_index(torch.ones(4, H, H), _blocks()))  # constant map


def test_distance_thresholds_scale_with_the_map_and_never_overlap():
    assert distance_thresholds(16, 16) == pytest.approx((1.6, 4.8))
    assert distance_thresholds(64, 64) == pytest.approx((6.4, 19.2))
    assert distance_thresholds(4, 4) == (1.0, 2.0)
    with pytest.raises(ValueError, match="near=0.5, far=0.3"):
        distance_thresholds(8, 8, near=0.5, far=0.3)


def test_locality_bad_shapes_raise_naming_the_shape():
    with pytest.raises(ValueError, match=r"\(8, 8\)"):
        locality_index(torch.zeros(8, 8), torch.zeros(8, 8, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\(8, 9\)"):
        locality_index(torch.zeros(3, 8, 8), torch.zeros(8, 9, dtype=torch.long))
    with pytest.raises(ValueError, match="float"):
        locality_index(torch.zeros(3, 8, 8), torch.zeros(8, 8))


def test_resize_mask_is_nearest():
    m = np.kron(np.array([[1, 2], [3, 4]]), np.ones((4, 4), int))
    assert (resize_mask(m, (2, 2)) == np.array([[1, 2], [3, 4]])).all()
    assert set(np.unique(resize_mask(m, (5, 3)))) <= {1, 2, 3, 4}


# ----------------------------------------------------------------------------
# the table, from a cache stand-in with known maps
class FakeCache:
    """``load`` like FeatureCache: maps keyed by (activation, image, t, seed)."""

    def __init__(self, maps):
        self.maps = maps

    def load(self, activation, image_ids, t, variant, seed):
        return torch.stack([self.maps[activation, i, t, seed] for i in image_ids])


def _frame():
    return pd.DataFrame(
        dict(
            name=["a-still", "a-noisy"],
            kind=["res-out", "self-k"],
            stage=["down", "up"],
            level=pd.array([0, 1], dtype="Int64"),
            repeat=pd.array([0, 0], dtype="Int64"),
        )
    )


def test_properties_from_cache_matches_the_measures_per_image():
    ids, seeds, ts = ["i0", "i1"], [0, 1, 2], [50, 300]
    maps = {}
    for n, i in enumerate(ids):
        for t in ts:
            for s in seeds:
                maps["a-still", i, t, s] = _wave(0, 1 + n, 8, 8).float()  # same for every draw
                maps["a-noisy", i, t, s] = _randn(3, 8, 8, seed=100 * n + s + t).float()
    masks = [np.kron(np.array([[0, 1], [2, 3]]), np.ones((8, 8), int))] * 2  # 16 px masks, resized to 8
    df = properties_from_cache(FakeCache(maps), _frame(), ids, ts, seeds, masks=masks, progress=False)
    assert list(df.columns) == P.COLUMNS
    assert len(df) == 2 * 2 * 3  # activations x timesteps x measures
    still = df[(df.activation == "a-still") & (df.t == 50)].set_index("measure")
    assert still.loc["noise_share", "value"] == 0.0
    assert still.loc["granularity", "value"] == pytest.approx((1 / 8 + 2 / 8) / 2)  # mean over the two images
    assert (df["n_images"] == 2).all() and (df["size"] == 8).all()
    noisy = df[(df.activation == "a-noisy") & (df.measure == "noise_share")]
    assert (noisy["value"] > 0.8).all()
    one = noise_share(torch.stack([maps["a-noisy", "i1", 300, s] for s in seeds]))
    two = noise_share(torch.stack([maps["a-noisy", "i0", 300, s] for s in seeds]))
    assert noisy[noisy.t == 300]["value"].item() == pytest.approx((one + two) / 2)
    # one row per image (the claims' units) summarises to the same table
    images = properties_from_cache(
        FakeCache(maps), _frame(), ids, ts, seeds, masks=masks, progress=False, per_image=True
    )
    assert list(images.columns) == P.IMAGE_COLUMNS and len(images) == 2 * len(df)
    pd.testing.assert_frame_equal(P.summarise(images), df)


def test_properties_from_cache_counts_only_images_with_a_value():
    maps = {("a-still", "i0", 50, 0): torch.ones(2, 4, 4), ("a-still", "i1", 50, 0): _wave(1, 0, 4, 4, 2).float()}
    maps |= {("a-noisy", i, 50, 0): _randn(2, 4, 4, seed=k) for k, i in enumerate(["i0", "i1"])}
    df = properties_from_cache(FakeCache(maps), _frame(), ["i0", "i1"], [50], [0], measures=["granularity"])
    row = df[df.activation == "a-still"].iloc[0]
    assert row["n_images"] == 1 and row["value"] == pytest.approx(0.25)  # the constant image gives nan


def test_properties_from_cache_rejects_bad_requests():
    with pytest.raises(ValueError, match="unknown measures"):
        properties_from_cache(FakeCache({}), _frame(), ["i0"], [50], [0, 1], measures=["sharpness"])
    with pytest.raises(ValueError, match="at least 2 seeds"):
        properties_from_cache(FakeCache({}), _frame(), ["i0"], [50], [0], measures=["noise_share"])
    with pytest.raises(ValueError, match="0 masks for 1 images"):
        properties_from_cache(FakeCache({}), _frame(), ["i0"], [50], [0], measures=["locality"])


# ----------------------------------------------------------------------------
# claims
GROUPS = [("down", lv) for lv in range(4)] + [("mid", None)] + [("up", lv) for lv in range(4)]


def _table(noise: dict, t_scale: float = 2.0, n_images: int = 8, jitter: float = 0.01, seed: int = 0):
    """A per-image property table over a 4-level U-Net with the given noise share per group,
    each image's values jittered (seeded)."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n_images):
        for stage, lv in GROUPS:
            key = "mid" if stage == "mid" else f"{stage}{lv}"
            for r in range(2):
                for t, scale in ((50, 1.0), (300, t_scale)):
                    value = min(1.0, noise[key] * scale) + jitter * rng.standard_normal()
                    rows.append(
                        dict(activation=f"{key}-r{r}", kind="res-out", stage=stage, level=lv, repeat=r, t=t,
                             measure="noise_share", image_id=f"val_0_{i:06d}", value=value, size=16)
                    )  # fmt: skip
    return pd.DataFrame(rows, columns=P.IMAGE_COLUMNS).astype({"level": "Int64", "repeat": "Int64"})


ASYMMETRIC = dict(down0=0.3, down1=0.1, down2=0.05, down3=0.04, mid=0.02, up0=0.01, up1=0.01, up2=0.02, up3=0.4)
FLAT = {k: 0.1 for k in ASYMMETRIC}


def test_noise_claims_hold_on_the_asymmetric_pattern_against_a_flat_control():
    c = claims(_table(ASYMMETRIC), _table(FLAT, t_scale=1.0, seed=1)).set_index("claim")
    assert len(c) == 3 and set(c["verdict"]) == {"holds"}, c[["estimate", "lo", "hi", "verdict"]]
    down = c.iloc[0]
    # median of the down stage (0.3, 0.1, 0.05, 0.04, twice each) minus min(mid, up0+up1) = 0.01
    assert down["estimate"] == pytest.approx(np.median([0.3, 0.1, 0.05, 0.04]) - 0.01, abs=0.01)
    assert down["control"] == pytest.approx(0.0, abs=0.01) and down["n_units"] == 8
    assert down["min_effect"] == P.MIN_NOISE_GAP


def test_noise_claims_that_the_control_shows_as_well_fail():
    # a pattern the random-weight control shows just as much says nothing about training
    c = claims(_table(ASYMMETRIC), _table(ASYMMETRIC, seed=1))
    assert list(c["verdict"]) == ["fails", "fails", "fails"]
    assert (c["estimate"].iloc[:2] > P.MIN_NOISE_GAP).all()  # the trained model alone shows it


def test_noise_claims_fail_when_the_pattern_is_absent():
    flat = FLAT | {"mid": 0.5}
    c = claims(_table(flat, t_scale=0.5), _table(FLAT, t_scale=1.0, seed=1))
    assert list(c["verdict"]) == ["fails", "fails", "fails"]


def test_claims_with_too_few_images_are_inconclusive_and_need_per_image_tables():
    c = claims(_table(ASYMMETRIC, n_images=3), _table(FLAT, n_images=3, seed=1))
    assert set(c["verdict"]) == {"inconclusive"} and c["note"].str.contains("only 3 units").all()
    df = _table(ASYMMETRIC)
    assert claims(df[df.t == 50], _table(FLAT, seed=1)).iloc[2]["verdict"] == "inconclusive"  # one timestep
    with pytest.raises(ValueError, match="per_image=True"):
        claims(P.summarise(df), df)


def _gran_locality_table(slope: float, qk_extra: float, n_images: int = 8, seed: int = 0, size: int = 8):
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n_images):
        for stage, lv, base in (("down", 0, 0.2), ("down", 1, 0.3), ("up", 2, 0.3), ("up", 3, 0.2)):
            for r, kind in enumerate(["res-out", "self-q", "self-k", "vit-out"]):
                g = base + slope * r + 0.02 * rng.standard_normal()
                loc = 0.2 + (qk_extra if kind in ("self-q", "self-k") else 0.0) + 0.02 * rng.standard_normal()
                common = dict(activation=f"{stage}{lv}-{kind}", kind=kind, stage=stage, level=lv, repeat=0, t=50)
                common |= dict(image_id=f"val_0_{i:06d}", size=size)
                rows.append(common | dict(measure="granularity", value=g))
                rows.append(common | dict(measure="locality", value=loc))
    return pd.DataFrame(rows, columns=P.IMAGE_COLUMNS).astype({"level": "Int64", "repeat": "Int64"})


def test_granularity_and_locality_claims_follow_the_numbers():
    control = _gran_locality_table(slope=0.0, qk_extra=0.0, seed=1)
    held = claims(_gran_locality_table(slope=0.05, qk_extra=0.2), control).set_index("measure")
    assert list(held["verdict"]) == ["holds", "holds"]
    assert held.iloc[0]["estimate"] > 0.8  # a clear monotone trend within each level
    assert held.iloc[1]["estimate"] == pytest.approx(0.2, abs=0.02)  # q/k minus the block output
    # coarse-to-fine *against* the forward order, and q/k no more local than the output: both fail
    failed = claims(_gran_locality_table(slope=-0.05, qk_extra=0.0), control)
    assert list(failed["verdict"]) == ["fails", "fails"]


def test_claims_leave_out_levels_too_small_for_granularity():
    df = _gran_locality_table(slope=0.05, qk_extra=0.2)
    df.loc[df["level"] == 1, "size"] = 2
    order = P.granularity_order(df)
    assert "down1" not in set(order["group"]) and "down0" in set(order["group"])
    row = claims(df[df.measure == "granularity"], _gran_locality_table(0.0, 0.0, seed=1)).iloc[0]
    assert "down1" not in row["measure"] and "down0" in row["measure"]


def test_property_tables_for_the_filter_refuse_test_images(tiny_sd15, tmp_path):
    from difstudy.data.toyworld import ToyWorld

    with pytest.raises(ValueError, match="not on 'test'"):
        P.measure_with_control(tiny_sd15, ToyWorld("test", n=2), "granularity", tmp_path)
    assert P.dataset_split([ToyWorld("val", n=2)[1]]) == "val"


# ----------------------------------------------------------------------------
# results on disk and plots
def test_write_part_replaces_only_its_own_rows(tmp_path):
    path = tmp_path / "props" / "properties.csv"
    a = pd.DataFrame(dict(measure=["noise_share", "noise_share"], value=[1.0, 2.0]))
    b = pd.DataFrame(dict(measure=["granularity"], value=[3.0]))
    write_part(a, path)
    write_part(b, path)
    write_part(a.assign(value=[5.0, 6.0]), path)
    got = pd.read_csv(path).sort_values("value")
    assert list(got["value"]) == [3.0, 5.0, 6.0]
    with pytest.raises(ValueError, match="'claim'"):
        write_part(a, path, key="claim")


def test_property_plots_need_one_timestep_or_a_grid():
    from difstudy import plots

    df = P.summarise(_table(ASYMMETRIC))
    with pytest.raises(ValueError, match=r"\[50, 300\]"):
        plots.plot_property_profile(df, "noise_share")
    ax = plots.plot_property_profile(df, "noise_share", t=300)
    assert len(ax.get_xticklabels()) == 9  # one tick per resolution level
    axes = plots.plot_properties_grid(df)
    assert axes.shape == (1, 2)
    upper, lower = (a.get_position() for a in axes[0])
    assert upper.y0 > lower.y1 and upper.width == lower.width  # stacked, each the full width
    assert axes[0, 0].get_legend() is not None and axes[0, 1].get_legend() is None


def test_pca_grid_places_every_activation():
    from difstudy import plots

    frame = _frame().assign(block=pd.array([None, 0], dtype="Int64"))
    pics = P.pca_pictures({"a-still": _wave(0, 1, 8, 8).float(), "a-noisy": _randn(5, 4, 4)})
    assert pics["a-noisy"].shape == (4, 4, 3) and 0 <= pics["a-noisy"].min() <= pics["a-noisy"].max() <= 1
    ax = plots.plot_pca_grid(pics, frame, image=np.zeros((16, 16, 3), np.uint8), cell=8)
    assert [t.get_text() for t in ax.get_yticklabels()] == ["input", "down-level0-repeat0", "up-level1-repeat0"]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["res-out", "self-k"]


# ----------------------------------------------------------------------------
# through extraction and the feature cache (tiny random-weight model)
def test_measure_properties_through_the_feature_cache(tiny_sd15, tmp_path):
    from difstudy.cache import Key
    from difstudy.data.toyworld import ToyWorld
    from difstudy.extract import extract

    world = ToyWorld("test", n=2)
    acts = ["up-level1-repeat2-res-out", "up-level3-repeat0-vit-block0-self-k", "up-level3-repeat0-vit-block0-self-map"]
    kw = dict(timesteps=[50, 500], cache_dir=tmp_path, model_name="tiny-sd15")
    df = P.measure_properties(tiny_sd15, world, seeds=[0, 1, 2], activations=acts, progress=False, **kw)
    assert list(df.columns) == P.COLUMNS and len(df) == 3 * 2 * 3
    assert list(dict.fromkeys(df["activation"])) == acts  # forward order
    assert set(df["kind"]) == {"res-out", "self-k", "self-map"} and (df["stage"] == "up").all()
    assert (df.loc[df.measure != "locality", "n_images"] == 2).all()
    # the table's noise share is the mean over images of the measure on the cached draws
    cache, summary = extract(tiny_sd15, world, acts, seed=2, progress=False, **kw)
    assert summary.computed == 0  # all cached by measure_properties
    a, t = acts[1], 500
    per_image = [
        noise_share(torch.stack([cache.get(Key(a, t, "empty", s, world[i].image_id)).float() for s in (0, 1, 2)]))
        for i in range(2)
    ]
    got = df[(df.activation == a) & (df.t == t) & (df.measure == "noise_share")]["value"].item()
    assert got == pytest.approx(np.mean(per_image), rel=1e-6)


def test_massive_channels_are_the_ones_far_above_the_median_channel():
    from difstudy.properties import massive_channels, massive_ratio

    g = torch.Generator().manual_seed(0)
    feat = torch.randn(2, 16, 4, 4, generator=g)  # |N(0,1)| has mean 0.8 in every channel
    assert massive_channels(feat) == [] and 1 < massive_ratio(feat) < 2
    feat[:, 3] = 500.0
    feat[:, 9] = -1000.0  # magnitudes: the sign does not matter
    assert massive_channels(feat) == [9, 3] and massive_ratio(feat) > 500
    assert massive_channels(feat[0], ratio=700) == [9]  # one image (C, H, W); a higher threshold
    assert massive_channels(torch.zeros(4, 2, 2)) == [] and np.isnan(massive_ratio(torch.zeros(4, 2, 2)))
    with pytest.raises(ValueError, match="ratio must be > 1"):
        massive_channels(feat, ratio=0.5)
