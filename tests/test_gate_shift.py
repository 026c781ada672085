"""GATE content shift beyond edges: detail lost vs detail invented, the toy-world judge's distance,
their columns in the content-shift table and their claims (difstudy.gate.scores, shift, claims)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
from scipy.ndimage import gaussian_filter

from difstudy import gate, verdicts
from difstudy.data.toyworld import ToyWorld
from difstudy.errors import DifstudyError
from difstudy.models import vae_scale_factor


def _square(size=64, at=(20, 20), side=16, grey=0.5, dark=0.1) -> np.ndarray:
    """A grey RGB image in [0, 1] with one dark square whose top-left corner is ``at``."""
    x = np.full((size, size, 3), grey)
    x[at[0] : at[0] + side, at[1] : at[1] + side] = dark
    return x


def _blur(x: np.ndarray, sigma: float) -> np.ndarray:
    out = np.stack([gaussian_filter(x[..., c].astype(float), sigma) for c in range(3)], -1)
    return out.round().clip(0, 255).astype(np.uint8) if x.dtype == np.uint8 else out


@pytest.fixture(scope="module")
def judge():
    return gate.JudgeDistance()


# ----------------------------------------------------------------------------
# 1. detail lost and detail invented, on planted cases
def test_a_blurred_reconstruction_loses_detail_and_invents_almost_none():
    x = _square()
    got = gate.detail_shift(x, _blur(x, 1.5))
    assert got["lost"] > 1e-3  # the square's edges are weaker everywhere
    assert got["invented"] < 0.1 * got["lost"]  # measured: lost 0.0022, invented 0.00013


def test_an_added_object_is_invented_and_nothing_is_lost():
    x = _square()
    rng = np.random.default_rng(0)
    textured, bright = x.copy(), x.copy()
    textured[40:56, 40:56] = rng.choice([0.0, 1.0], size=(16, 16, 1))  # a black-and-white texture
    bright[42:54, 42:54] = 1.0  # a plain bright square
    for y in (textured, bright):
        got = gate.detail_shift(x, y)
        assert got["invented"] > 1e-3 and got["lost"] < 0.1 * got["invented"]
    assert gate.detail_shift(x, textured)["invented"] > gate.detail_shift(x, bright)["invented"]  # more detail
    # the reverse (the object erased) is loss, not invention: the two directions swap exactly
    there, back = gate.detail_shift(x, textured), gate.detail_shift(textured, x)
    assert (back["lost"], back["invented"]) == pytest.approx((there["invented"], there["lost"]))


def test_identical_images_shift_nothing():
    x = _square()
    assert gate.detail_shift(x, x) == {"lost": 0.0, "invented": 0.0}
    u8 = (x * 255).round().astype(np.uint8)
    assert gate.detail_shift(u8, u8) == {"lost": 0.0, "invented": 0.0}


def test_a_move_within_the_tolerance_is_kept_and_a_larger_one_counts_both_ways():
    x = _square()
    one, four = (gate.detail_shift(x, _square(at=(20, 20 + k)), tolerance=1) for k in (1, 4))
    assert four["lost"] > 1e-3 and four["invented"] > 1e-3
    assert one["lost"] < 0.01 * four["lost"] and one["invented"] < 0.01 * four["invented"]
    # without tolerance a 1 px move is lost and invented like any other change
    strict = gate.detail_shift(x, _square(at=(20, 21)), tolerance=0)
    assert strict["lost"] > 0.1 * four["lost"] and strict["invented"] > 0.1 * four["invented"]


def test_without_tolerance_lost_and_invented_split_the_detail_difference():
    """With r = 0, lost + invented = mean |D(x) - D(y)| and lost - invented = mean D(x) - mean D(y),
    recomputed here from the detail maps; and |D(x) - D(y)| <= |L(x) - L(y)| bounds them by contour."""
    rng = np.random.default_rng(1)
    x, y = rng.random((32, 32, 3)), rng.random((32, 32, 3))
    got = gate.detail_shift(x, y, sigma=1.0, tolerance=0)
    dx, dy = gate.detail_map(x, 1.0), gate.detail_map(y, 1.0)
    assert np.array_equal(dx, np.abs(gate.laplacian_map(x, 1.0)))
    assert got["lost"] + got["invented"] == pytest.approx(np.abs(dx - dy).mean(), rel=1e-9)
    assert got["lost"] - got["invented"] == pytest.approx(dx.mean() - dy.mean(), abs=1e-12)
    assert got["lost"] + got["invented"] <= gate.content_shift(x, y)["contour"] + 1e-12


@pytest.mark.parametrize(
    "y, kwargs, pattern",
    [
        (np.zeros((32, 32, 3)), {}, "differ in size"),
        (np.zeros((64, 64)), {}, "RGB image"),
        (np.full((64, 64, 3), 2.0), {}, r"\[0, 1\]"),
        (np.zeros((64, 64, 3)), {"tolerance": -1}, "tolerance"),
        (np.zeros((64, 64, 3)), {"tolerance": 1.5}, "tolerance"),
    ],
)
def test_detail_shift_bad_inputs(y, kwargs, pattern):
    with pytest.raises(DifstudyError, match=pattern):
        gate.detail_shift(_square(), y, **kwargs)


# ----------------------------------------------------------------------------
# 2. the judge's distance: what the image shows, not its edges
def test_judge_distance_is_zero_for_identical_images_and_small_for_a_blur(judge):
    world = ToyWorld("test", n=20)
    xs = [world[i].image for i in range(20)]
    assert np.abs(judge(xs, xs)).max() < 1e-5
    assert judge(xs[:2], [x / 255.0 for x in xs[:2]]) == pytest.approx(0.0, abs=1e-5)  # float input alike
    blurred = judge(xs, [_blur(x, 0.7) for x in xs])
    other = judge(xs, xs[1:] + xs[:1])  # labels cycle through the classes: each neighbour is another class
    assert [world[i].label for i in range(20)] != [world[(i + 1) % 20].label for i in range(20)]
    assert (blurred < other).all()  # measured: blur <= 0.021, another class >= 0.2
    same_class = judge(xs[:10], xs[10:])  # another image of the same class
    assert same_class.mean() < other.mean()
    assert (other <= 1.0).all() and (blurred >= 0).all()


def test_judge_distance_resizes_and_rejects_unpaired_batches(judge):
    x = ToyWorld("test", n=1, size=128)[0].image
    assert judge([x], [x])[0] == pytest.approx(0.0, abs=1e-5)
    assert judge.features([x]).shape == (1, 128)
    with pytest.raises(DifstudyError, match="pair them"):
        judge([x, x], [x])


# ----------------------------------------------------------------------------
# 3. the table and the claims
def test_content_shift_table_writes_lost_invented_and_judge(tiny_sd15):
    ds = ToyWorld("test", n=2)
    cfg = gate.ShiftConfig(timesteps=(50,), methods=("vae", "x0"), batch_size=2)
    df = gate.content_shift_table(tiny_sd15, ds, [gate.BASIC], cfg, progress=False)
    assert set(gate.MEASURES) <= set(df.columns) and len(df) == 2 * 2
    assert df[list(gate.MEASURES)].notna().all().all()
    # the VAE rows recomputed from the VAE round trip, scored on their own
    size = tiny_sd15.unet.config.sample_size * vae_scale_factor(tiny_sd15)
    images = [gate.resize_uint8(ds[i].image, size) for i in range(2)]
    rec = gate.vae_reconstruction(tiny_sd15, images, size)
    vae = df[df["method"] == "vae"].set_index("image_id").loc[[ds[i].image_id for i in range(2)]]
    want = [gate.detail_shift(images[i], rec[i]) for i in range(2)]
    assert vae["lost"].tolist() == pytest.approx([w["lost"] for w in want], rel=1e-6)
    assert vae["invented"].tolist() == pytest.approx([w["invented"] for w in want], rel=1e-6)
    assert vae["judge"].tolist() == pytest.approx(gate.JudgeDistance()(images, rec).tolist(), abs=1e-5)
    # switched off (real images): the column is there, NaN, and the other scores unchanged
    off = gate.content_shift_table(tiny_sd15, ds, [gate.BASIC], replace(cfg, judge=False), progress=False)
    assert off["judge"].isna().all()
    assert off["lost"].tolist() == pytest.approx(df["lost"].tolist(), rel=1e-6)


def _frame(n=12, seed=0, judge=True):
    """Per image an offset; the VAE round trip scores ``base + offset``, x0 at t scores
    ``base + offset + 4 x min effect`` plus noise (the shift exists, 4x the minimum above the control)."""
    rng = np.random.default_rng(seed)
    base = {m: 5 * gate.MIN_SHIFT[m] for m in gate.MEASURES}
    rows = []
    for i in range(n):
        off = rng.normal(0, 0.5)
        rows.append(dict(image_id=f"i{i}", technique="basic", method="vae", t=0,
                         **{m: b * (1 + 0.2 * off) for m, b in base.items()}))  # fmt: skip
        for t in (50, 200):
            rows.append(dict(image_id=f"i{i}", technique="basic", method="x0", t=t,
                             **{m: b * (1 + 0.2 * off) + 4 * gate.MIN_SHIFT[m] * (1 + t / 200)
                                + rng.normal(0, 0.3 * gate.MIN_SHIFT[m]) for m, b in base.items()}))  # fmt: skip
    df = pd.DataFrame(rows)
    return df if judge else df.assign(judge=np.nan)


def test_content_shift_claims_compare_every_score_with_the_vae_round_trip():
    df = _frame()
    claims = gate.content_shift_claims(df)
    exists = claims[claims["claim"].str.startswith("content shift exists")].set_index("measure")
    assert len(exists) == len(gate.MEASURES)
    vae = df[df["method"] == "vae"].set_index("image_id")
    x0 = df[(df["method"] == "x0") & (df["t"] == 50)].set_index("image_id")
    for m in gate.MEASURES:
        row = exists.loc[f"{m} shift - VAE floor, mean over images"]
        assert row["estimate"] == pytest.approx((x0[m] - vae[m]).mean())  # per image, minus its own control
        assert row["control"] == pytest.approx(vae[m].mean())  # the control's value beside the estimate
        assert "VAE round trip" in row["note"] and row["min_effect"] == gate.MIN_SHIFT_EXISTS[m]
        assert row["verdict"] == "holds" and row["n_units"] == 12
    assert list(claims.columns) == list(verdicts.CLAIM_COLUMNS)


def test_a_judge_switched_off_gives_not_measured_rows_and_no_guideline():
    claims = gate.content_shift_claims(_frame(judge=False))
    judge = claims[claims["measure"].str.contains("judge")]
    assert len(judge) == 2  # exists and grows with t
    assert (judge["verdict"] == "inconclusive").all() and judge["note"].str.startswith(gate.NOT_MEASURED).all()
    others = claims[~claims["measure"].str.contains("judge")]
    assert (others["verdict"] == "holds").all()
    df = _frame(judge=False)
    better = df[df["method"] == "x0"].assign(technique="better")
    guide = gate.guideline_table(pd.concat([df, better], ignore_index=True))
    assert set(guide["measure"]) == set(gate.MEASURES) - {"judge"}


def test_shift_summary_keeps_each_subset_with_its_own_baseline():
    general, domain = _frame(n=6, seed=0), _frame(n=6, seed=1)
    domain = domain.assign(image_id="d" + domain["image_id"], subset="checkered")
    summary = gate.shift_summary(pd.concat([general, domain], ignore_index=True))
    assert list(summary.columns) == list(gate.MEASURES)
    assert summary.index.names == ["subset", "technique", "method"]
    got = summary.loc[("checkered", "basic", "x0"), "invented"]
    assert got == pytest.approx(domain.loc[domain["method"] == "x0", "invented"].mean())  # domain rows only
    assert summary.loc[("all backgrounds", "basic", "vae"), "lost"] == pytest.approx(
        general.loc[general["method"] == "vae", "lost"].mean()
    )
    assert gate.shift_summary(general).index.names == ["technique", "method"]  # no subset column: no level
