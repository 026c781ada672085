"""Tests of difstudy.protocols: records, feature sources, configs, results and the task protocols."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from difstudy import protocols as P
from difstudy.data.toyworld import ToyWorld
from difstudy.errors import DifstudyError

torch.set_num_threads(1)


# ----------------------------------------------------------------------------
# records
def test_records_select_lazily_and_concatenate():
    calls = []
    recs = P.Records("r", lambda i: calls.append(i) or i * 10, tuple(range(5)))
    sub = recs.subset([4, 1]).head(1)
    assert calls == [] and len(sub) == 1 and sub[0] == 40 and calls == [4]
    assert list(recs[1:3]) == [10, 20] and list(recs.head(None)) == [0, 10, 20, 30, 40]
    both = P.concat_records(recs.head(2), sub)
    assert list(both) == [0, 10, 40]
    with pytest.raises(IndexError, match="out of range"):
        recs.subset([7])


def test_canonical_order_ignores_the_listing_order():
    world = ToyWorld("test", n=6)
    a = P.toy_records(world, [0, 1, 2, 3, 4, 5])
    b = P.toy_records(world, [5, 3, 1, 0, 2, 4])
    assert [r.image_id for r in P.canonical(a)] == [r.image_id for r in P.canonical(b)]
    keys = [P.content_key(r.image) for r in P.canonical(a)]
    assert keys == sorted(keys) and len(set(keys)) == 6


def test_toy_adapters_give_task_labels():
    world = ToyWorld("train", n=40)
    obj = P.toy_records(world, [3], target="object")[0]
    s = world[3]
    np.testing.assert_array_equal(obj.mask, np.where(s.mask > 0, s.label + 1, 0))
    assert P.toy_records(world).labels.num_classes == 10 and obj.label == s.label
    parts = P.toy_part_records(world, "bird", 4)
    assert [r.image_id for r in parts] == [world[i].image_id for i in (0, 10, 20, 30)]
    assert parts.labels.num_classes == 7 and all(r.mask.max() < 7 for r in parts)
    with pytest.raises(ValueError, match="fewer than 5 'bird' images"):
        P.toy_part_records(world, "bird", 5)
    with pytest.raises(ValueError, match="unknown toy-world class 'horse'"):
        P.toy_part_records(world, "horse", 1)
    pairs = P.toy_pairs(world, 3, seed=1)
    for k, (a, b) in enumerate(world.pairs(3, 1)):
        p = pairs[k]
        common = world[a].visible & world[b].visible
        np.testing.assert_array_equal(p.src_kps, world[a].keypoints[common])
        np.testing.assert_array_equal(p.trg_kps, world[b].keypoints[common])
        assert p.pair_id == f"{k + 1:06d}-{world[a].image_id}-{world[b].image_id}:{world[a].class_name}"


# ----------------------------------------------------------------------------
# feature combination
def test_concat_maps_raw_is_the_official_upsample_and_concatenate():
    g = torch.Generator().manual_seed(0)
    maps = [torch.randn(3, 2, 2, generator=g) * 100, torch.randn(2, 4, 4, generator=g).half()]
    raw = P.concat_maps(maps)
    ref = torch.cat([F.interpolate(maps[0][None], (4, 4), mode="bilinear")[0], maps[1].float()])
    torch.testing.assert_close(raw, ref, rtol=0, atol=0)
    rms = P.concat_maps(maps, size=8, norm="rms")
    assert rms.shape == (5, 8, 8)
    for m in P.scale_maps(maps, "rms"):
        assert float(m.pow(2).mean().sqrt()) == pytest.approx(1.0, rel=1e-5)
    with pytest.raises(ValueError, match="unknown feature norm 'l2'"):
        P.concat_maps(maps, norm="l2")


def test_drop_small_labels_as_ddpmseg():
    y = torch.zeros(10, 10, dtype=torch.long)
    y[0, :5] = 1  # 5 pixels: dropped
    y[1:3] = 2  # 20 pixels: kept
    y[5, 5] = 255  # already ignored
    out = P.drop_small_labels(y, 3, 255, 20)
    assert (out[0, :5] == 255).all() and (out[1:3] == 2).all() and int((out == 0).sum()) == 74
    assert (y[0, :5] == 1).all()  # the input is left alone


# ----------------------------------------------------------------------------
# configs and labels
def test_protocol_labels_name_every_deviation():
    assert P.protocol_label(P.CorrespondenceConfig()) == "zero-shot NN"
    assert P.protocol_label(P.CorrespondenceConfig(method="conv")) == "trained conv head"
    assert P.protocol_label(P.CorrespondenceConfig(concat_size=None, head_lr=1.0)) == "zero-shot NN; concat_size=None"
    assert P.protocol_label(P.PartSegConfig(n_models=3, buffer_pixels=10)) == "pixel-MLP ensemble; n_models=3"
    assert P.protocol_label(P.SemSegConfig()) == "light head (paper: UperNet)"
    assert P.deviations(P.PartSegConfig()) == []


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: P.CorrespondenceConfig(method="dift"), "use one of \\['nn', 'conv'\\]"),
        (lambda: P.PartSegConfig(metric="mmseg"), "use one of \\('ddpmseg', 'present'\\)"),
        (lambda: P.SemSegConfig(head="upernet"), "use one of \\('conv', 'linear'\\)"),
        (lambda: P.ClassifyConfig(norm="z"), "unknown feature norm 'z'"),
    ],
)
def test_bad_config_values_are_named(make, match):
    with pytest.raises(ValueError, match=match):
        make()


# ----------------------------------------------------------------------------
# results
def test_render_says_na_for_one_seed():
    rows = [P.result_frame("classification", "lp", {"accuracy": v}, s, "f", 1, 1) for s, v in ((0, 0.5), (1, 0.7))]
    two = pd.concat(rows)
    assert (
        P.render(two).loc["f", ("classification", "lp", "accuracy")] == f"60.0 ± {100 * np.std([0.5, 0.7], ddof=1):.1f}"
    )
    assert P.render(rows[0]).loc["f", ("classification", "lp", "accuracy")] == "50.0 ± n/a"
    assert list(P.over_seeds(lambda s: rows[s], [1, 0])["seed"]) == [1, 0]


# ----------------------------------------------------------------------------
# protocols on raw pixels (fast) and on a tiny U-Net
def _part_sets():
    tr, te = ToyWorld("train", n=40), ToyWorld("test", n=40)
    return P.toy_part_records(tr, "fish", 3), P.toy_part_records(te, "fish", 3)


def test_part_segmentation_seed_changes_the_result():
    train, test = _part_sets()
    cfg = P.PartSegConfig(resolution=16, n_models=2, max_epochs=3)
    a, b, c = (P.part_segmentation(P.PixelFeatures(), train, test, cfg, seed=s) for s in (0, 0, 1))
    pd.testing.assert_frame_equal(a, b)
    assert a["value"].tolist() != c["value"].tolist()
    assert set(a["metric"]) == {"mIoU", "pixel accuracy"} and (a["protocol"] == P.protocol_label(cfg)).all()


def test_correspondence_of_an_image_with_itself_is_perfect():
    rng = np.random.default_rng(0)
    recs = [P.ImageRecord(f"noise{i}", rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for i in range(2)]
    kps = rng.integers(0, 32, (6, 2)).astype(np.float32)
    pairs = [P.PairRecord(f"p{i}", r, r, kps, kps, (0.0, 0.0, 3.0, 3.0)) for i, r in enumerate(recs)]
    for match_size in (None, 64):  # the image grid, and a grid twice as fine (points scaled there and back)
        cfg = P.CorrespondenceConfig(match_size=match_size, concat_size=None)
        df = P.correspondence(P.PixelFeatures(), pairs, cfg).set_index("metric")["value"]
        assert df["PCK@0.1 bbox"] == 1.0 and df["PCK@0.1 img (per image)"] == 1.0  # bbox threshold 0.3 px
    with pytest.raises(ValueError, match="needs train_pairs"):
        P.correspondence(P.PixelFeatures(), pairs, P.CorrespondenceConfig(method="conv"))


def test_one_id_for_two_images_is_refused(tiny_sd15, tmp_path):
    world = ToyWorld("test", n=2)
    a, b = P.toy_records(world)
    clash = P.ImageRecord(a.image_id, b.image)
    src = P.CachedFeatures(tiny_sd15, ["up-level1-upsampler-out"], P.ExtractionConfig(cache_dir=str(tmp_path)))
    with pytest.raises(DifstudyError, match=f"image id '{a.image_id}' names two different images"):
        src.prepare([a, clash])


def test_the_seed_changes_the_noise_draw(tiny_sd15, tmp_path):
    recs = P.toy_records(ToyWorld("test", n=2))
    acts = ["up-level2-upsampler-out", "up-level1-upsampler-out"]
    src = P.CachedFeatures(tiny_sd15, acts, P.ExtractionConfig(image_size=64, cache_dir=str(tmp_path)))
    maps = {}
    for s in (0, 1):
        one = src.for_seed(s)
        one.prepare(recs)
        maps[s] = one.maps(recs[0])
    assert maps[0][0].shape == maps[1][0].shape and not torch.equal(maps[0][0], maps[1][0])
    # src is the seed-0 source: the same picture under another id reads the same entries
    alias = P.ImageRecord("another/id", recs[0].image)
    torch.testing.assert_close(src.maps(alias)[0], maps[0][0], rtol=0, atol=0)
    # one activation of a prepared source: read back, not extracted again
    before = sorted(tmp_path.rglob("*"))
    one = src.select(acts[1:])
    one.prepare(recs)
    assert sorted(tmp_path.rglob("*")) == before
    k = src.names.index(one.names[0])  # names are in the U-Net's forward order
    torch.testing.assert_close(one.maps(recs[1])[0], src.maps(recs[1])[k], rtol=0, atol=0)
    with pytest.raises(DifstudyError, match="not among the activations"):
        src.select(["up-level0-upsampler-out"])
