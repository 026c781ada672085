"""Tests of difstudy.probes: metrics, correspondence, segmentation, classification."""

from __future__ import annotations

import weakref
from collections import Counter

import numpy as np
import pytest
import torch

from difstudy.probes import (
    ConvHead,
    LinearPixelProbe,
    PixelMLPEnsemble,
    SegHead,
    accuracy,
    confusion_matrix,
    ddpmseg_iou_per_class,
    ddpmseg_miou,
    eval_seg_head,
    evaluate_pairs,
    label_confusion,
    linear_probe,
    match_keypoints,
    miou,
    miou_from_confusion,
    official_hidden,
    pck,
    pixel_mlp,
    pool_features,
    summarize_pck,
    train_conv_head,
    train_seg_head,
)
from difstudy.probes.segmentation import _EarlyStop

torch.set_num_threads(1)


# ----------------------------------------------------------------------------
# metrics
def test_pck_perfect_predictions():
    gt = torch.tensor([[3.0, 4.0], [10.5, 2.0], [0.0, 0.0]])
    assert pck(gt.clone(), gt, torch.tensor([10.0, 10.0, 10.0])) == 1.0
    assert pck(gt.numpy(), gt.numpy(), 10.0) == 1.0


def test_pck_threshold_boundary_is_inclusive():
    gt = np.zeros((1, 2))
    at = np.array([[6.0, 8.0]])  # distance exactly 10 = 0.1 * 100
    beyond = np.array([[6.0, 8.001]])
    assert pck(at, gt, [100.0], alpha=0.1) == 1.0
    assert pck(beyond, gt, [100.0], alpha=0.1) == 0.0
    assert pck(np.concatenate([at, beyond]), np.zeros((2, 2)), [100.0, 100.0]) == 0.5


def test_pck_all_wrong_is_zero():
    gt = np.zeros((4, 2))
    assert pck(gt + 50.0, gt, np.full(4, 100.0)) == 0.0


def test_pck_respects_per_keypoint_ref_size():
    gt = np.zeros((3, 2))
    pred = np.tile([[6.0, 8.0]], (3, 1))  # all at distance 10
    assert pck(pred, gt, [100.0, 99.0, 200.0], alpha=0.1) == pytest.approx(2 / 3)
    assert pck(pred, gt, [100.0, 99.0, 200.0], alpha=0.05) == pytest.approx(1 / 3)


@pytest.mark.parametrize(
    "pred, gt, ref",
    [
        (np.zeros((3, 3)), np.zeros((3, 3)), np.ones(3)),  # not (N, 2)
        (np.zeros((3, 2)), np.zeros((4, 2)), np.ones(3)),  # N mismatch
        (np.zeros((3, 2)), np.zeros((3, 2)), np.ones(4)),  # ref_size length
        (np.zeros((0, 2)), np.zeros((0, 2)), np.ones(0)),  # empty
    ],
)
def test_pck_bad_shapes_raise(pred, gt, ref):
    with pytest.raises(ValueError):
        pck(pred, gt, ref)


# target / prediction on a 3x3 image with 5 classes; 255 = ignore.
# class 3 is predicted only on an ignored pixel and class 4 never occurs: both excluded.
TARGET = np.array([[0, 0, 1], [1, 1, 255], [2, 2, 255]])
PRED = np.array([[0, 1, 1], [1, 0, 0], [2, 1, 3]])
# IoU: class 0: 1 / (2 + 2 - 1); class 1: 2 / (4 + 3 - 2); class 2: 1 / (1 + 2 - 1)
EXPECTED_MIOU = (1 / 3 + 2 / 5 + 1 / 2) / 3


def test_miou_hand_computed():
    assert miou(PRED, TARGET, num_classes=5) == pytest.approx(EXPECTED_MIOU)
    assert miou(torch.from_numpy(PRED), torch.from_numpy(TARGET), 5, ignore_index=255) == pytest.approx(EXPECTED_MIOU)


def test_confusion_matrix_and_miou_from_confusion():
    cm = confusion_matrix(PRED, TARGET, 5)
    assert cm.dtype == np.int64 and cm.shape == (5, 5)
    assert cm.sum() == 7  # two ignored pixels
    assert cm[1, 1] == 2 and cm[1, 0] == 1 and cm[2, 1] == 1 and cm[:, 3].sum() == 0
    assert miou_from_confusion(cm) == pytest.approx(miou(PRED, TARGET, 5))
    # streamed: summing per-row matrices equals the whole
    streamed = sum(confusion_matrix(PRED[i], TARGET[i], 5) for i in range(3))
    np.testing.assert_array_equal(streamed, cm)


def test_confusion_matrix_bad_input_raises():
    with pytest.raises(ValueError):
        confusion_matrix(PRED, TARGET[:2], 5)
    with pytest.raises(ValueError):
        confusion_matrix(PRED + 5, TARGET, 5)  # labels out of range


def test_accuracy():
    assert accuracy(np.array([1, 2, 3, 4]), np.array([1, 2, 0, 4])) == 0.75
    with pytest.raises(ValueError):
        accuracy(np.zeros(3), np.zeros(4))


# ----------------------------------------------------------------------------
# correspondence
def _shifted_pair(c=16, h=8, w=8, dx=2, dy=1, seed=0):
    """Source map and a target map holding the source shifted by (dx, dy) cells."""
    g = torch.Generator().manual_seed(seed)
    src = torch.randn(c, h, w, generator=g)
    trg = torch.randn(c, h, w, generator=g)
    trg[:, dy:, dx:] = src[:, : h - dy, : w - dx]
    return src, trg


def test_match_keypoints_recovers_known_shift_upsampled():
    src, trg = _shifted_pair()  # 8x8 maps, images 32x32: a shift of (8, 4) pixels
    src_xy = torch.tensor([[4.0, 4.0], [10.0, 7.0], [17.0, 20.0], [21.0, 25.0], [5.0, 13.0]])
    pred = match_keypoints(src.half(), trg, src_xy, (32, 32), (32, 32), chunk_size=2, block_pixels=100)
    torch.testing.assert_close(pred, src_xy + torch.tensor([8.0, 4.0]), rtol=0, atol=0)


def test_match_keypoints_recovers_known_shift_on_feature_grid():
    src, trg = _shifted_pair()
    src_xy = torch.tensor([[1.0, 2.0], [9.0, 13.0], [22.0, 25.0]])  # cells (0, 0), (2, 3), (5, 6)
    pred = match_keypoints(src, trg, src_xy, (32, 32), (32, 32), upsample=False)
    cells = torch.tensor([[2, 1], [4, 4], [7, 7]]).float()  # shifted by (2, 1) cells
    torch.testing.assert_close(pred, (cells + 0.5) * 4 - 0.5, rtol=0, atol=0)


def test_match_keypoints_bad_shapes_raise():
    src, trg = _shifted_pair()
    with pytest.raises(ValueError):
        match_keypoints(src[0], trg, torch.zeros(1, 2), (32, 32), (32, 32))
    with pytest.raises(ValueError):
        match_keypoints(src, trg[:3], torch.zeros(1, 2), (32, 32), (32, 32))
    with pytest.raises(ValueError):
        match_keypoints(src, trg, torch.zeros(1, 3), (32, 32), (32, 32))
    with pytest.raises(ValueError):
        match_keypoints(src, trg, torch.zeros(1, 2), (32,), (32, 32))


def _identity_pair(gt_offsets, bbox, pair_id, seed):
    """Equal source and target maps at image resolution (20x20): keypoint k goes to its
    own pixel, so the error is exactly its ground-truth offset."""
    feat = torch.randn(8, 20, 20, generator=torch.Generator().manual_seed(seed))
    src = torch.tensor([[2.0 + 3 * k, 5.0] for k in range(len(gt_offsets))])
    trg = src + torch.tensor(gt_offsets)
    sizes = dict(src_size=(20, 20), trg_size=(20, 20), trg_bbox=bbox)
    return dict(src_feat=feat, trg_feat=feat.clone(), src_kps=src, trg_kps=trg, category="cat", pair_id=pair_id) | sizes


def test_evaluate_pairs_and_summarize_pck_per_image_vs_per_keypoint():
    # alpha 0.1: thr_img = 2 for both; thr_bbox = 1 (pair a, box 10 wide) and 2 (pair b, box 20)
    a = _identity_pair([[0.0, 0.0], [1.5, 0.0], [0.0, 5.0], [5.0, 0.0]], (0, 0, 10, 8), "a", 0)
    b = _identity_pair([[0.0, 0.0]], (0, 0, 20, 20), "b", 1)
    df = evaluate_pairs([a, b], alpha=0.1)
    assert len(df) == 5 and list(df["pair_id"]) == ["a"] * 4 + ["b"]
    np.testing.assert_allclose(df["dist"], [0, 1.5, 5, 5, 0])
    np.testing.assert_allclose(df["thr_img"], 2.0)
    np.testing.assert_allclose(df["thr_bbox"], [1, 1, 1, 1, 2])
    assert list(df["correct_img"]) == [True, True, False, False, True]
    assert list(df["correct_bbox"]) == [True, False, False, False, True]
    s = summarize_pck(df)
    assert s["pck_img_per_kp"] == pytest.approx(3 / 5)
    assert s["pck_img_per_image"] == pytest.approx((2 / 4 + 1) / 2)
    assert s["pck_bbox_per_kp"] == pytest.approx(2 / 5)
    assert s["pck_bbox_per_image"] == pytest.approx((1 / 4 + 1) / 2)
    assert s["n_pairs"] == 2 and s["n_keypoints"] == 5


def test_evaluate_pairs_missing_key_raises():
    a = _identity_pair([[0.0, 0.0]], (0, 0, 10, 10), "a", 0)
    del a["trg_bbox"]
    with pytest.raises(ValueError, match="trg_bbox"):
        evaluate_pairs([a])


def _nuisance_pairs(n, seed):
    """Pairs whose 8 signal channels shift by one cell (4 pixels) while 8 louder channels
    are independent noise: raw matching mostly fails, a learnt projection onto the signal works."""
    g = torch.Generator().manual_seed(seed)
    pairs = []
    for i in range(n):
        src, trg = _shifted_pair(c=8, h=8, w=8, dx=1, dy=1, seed=seed * 1000 + i)
        src = torch.cat([src, 2 * torch.randn(8, 8, 8, generator=g)])
        trg = torch.cat([trg, 2 * torch.randn(8, 8, 8, generator=g)])
        kps = torch.randint(0, 7, (12, 2), generator=g) * 4 + 1.5  # centres of 4-pixel cells
        sizes = dict(src_size=(32, 32), trg_size=(32, 32), trg_bbox=(0, 0, 32, 32))
        pairs.append(dict(src_feat=src, trg_feat=trg, src_kps=kps, trg_kps=kps + 4, pair_id=i) | sizes)
    return pairs


def test_conv_head_is_seeded():
    train = _nuisance_pairs(6, seed=1)
    a, b = (train_conv_head(train, out_dim=4, epochs=2, seed=5) for _ in range(2))
    c = train_conv_head(train, out_dim=4, epochs=2, seed=6)
    assert isinstance(a, ConvHead)
    torch.testing.assert_close(a.conv.weight, b.conv.weight, rtol=0, atol=0)
    assert not torch.equal(a.conv.weight, c.conv.weight)


def test_conv_head_learns_to_ignore_nuisance_channels():
    train, test = _nuisance_pairs(160, seed=1), _nuisance_pairs(8, seed=2)
    head = train_conv_head(train, out_dim=8, epochs=3, lr=1e-2, seed=0)
    raw = summarize_pck(evaluate_pairs(test, upsample=False))["pck_img_per_kp"]
    learnt = summarize_pck(evaluate_pairs(test, head=head, upsample=False))["pck_img_per_kp"]
    assert raw < 0.3 and learnt > 0.8, (raw, learnt)


# ----------------------------------------------------------------------------
# segmentation: DDPM-seg ensemble
CENTRES = torch.tensor([[4.0, 0, 0, 0, 0, 0], [0, 4.0, 0, 0, 0, 0], [0, 0, 4.0, 0, 0, 0]])


def _blob_chunks(n_chunks, chunk=500, seed=0, live=None):
    """A function returning a fresh generator of (features (chunk, 6), labels (chunk,)) chunks
    of 3 separable Gaussian blobs, plus rows labelled 255 (ignored) with wild features.
    ``live`` (a set) tracks chunk tensors still alive."""

    def batch_fn():
        g = torch.Generator().manual_seed(seed)
        for _ in range(n_chunks):
            y = torch.randint(0, 3, (chunk,), generator=g)
            x = CENTRES[y] + torch.randn(chunk, 6, generator=g)
            y[:20] = 255
            x[:20] = 100 * torch.randn(20, 6, generator=g)
            if live is not None:
                live["now"] += 1
                live["max"] = max(live["max"], live["now"])
                weakref.finalize(x, lambda: live.__setitem__("now", live["now"] - 1))
            yield x, y

    return batch_fn


def _blob_eval(n=2000, seed=99):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=g)
    return CENTRES[y] + torch.randn(n, 6, generator=g), y


def test_pixel_mlp_ensemble_learns_separable_toy_problem():
    ens = PixelMLPEnsemble(6, 3, n_models=3, hidden=(32, 16), seed=0)
    ens.fit(_blob_chunks(6), max_epochs=2, batch_pixels=64, buffer_pixels=1024)
    x, y = _blob_eval()
    assert accuracy(ens.predict(x), y) > 0.95
    proba = ens.predict_proba(x)
    assert proba.shape == (2000, 3)
    torch.testing.assert_close(proba.sum(1), torch.ones(2000))
    assert ens.n_pixels_ == 6 * 480  # per epoch; ignored rows never reach the buffer
    assert miou(ens.predict(x), y, 3) > 0.9


def test_pixel_mlp_ensemble_memory_bounded_by_buffer():
    stats = {}
    for n_chunks in (4, 40):  # 10x more pixels
        live = {"now": 0, "max": 0}
        ens = PixelMLPEnsemble(6, 3, n_models=2, hidden=(8,), seed=0)
        ens.fit(_blob_chunks(n_chunks, live=live), max_epochs=1, batch_pixels=256, buffer_pixels=600)
        stats[n_chunks] = (ens.max_buffer_rows_, live["max"], ens.n_pixels_)
    assert stats[40][2] == 10 * stats[4][2]
    for rows, live_chunks, _ in stats.values():
        assert rows <= 600  # the buffer bound holds
        assert live_chunks <= 2  # chunks are consumed as they stream, never hoarded
    assert stats[40][0] == stats[4][0]


def test_pixel_mlp_ensemble_is_seeded_and_checks_shapes():
    x, _ = _blob_eval(200)
    a = PixelMLPEnsemble(6, 3, n_models=2, hidden=(8,), seed=3).fit(_blob_chunks(2), max_epochs=1, batch_pixels=128)
    b = PixelMLPEnsemble(6, 3, n_models=2, hidden=(8,), seed=3).fit(_blob_chunks(2), max_epochs=1, batch_pixels=128)
    torch.testing.assert_close(a.predict_proba(x), b.predict_proba(x), rtol=0, atol=0)
    with pytest.raises(ValueError):
        a.predict(torch.zeros(5, 7))
    with pytest.raises(ValueError):
        a.fit(lambda: iter([(torch.zeros(5, 6), torch.zeros(4, dtype=torch.long))]), max_epochs=1)


# ----------------------------------------------------------------------------
# segmentation: decoder heads
def _seg_batches(n_batches, seed):
    """Two-level features (4ch 8x8, 6ch 4x4) and 16x16 label maps: class = which of three
    one-hot channels of level 0 is on (nearest-upsampled), a border of ignored pixels."""

    def fn():
        g = torch.Generator().manual_seed(seed)
        for _ in range(n_batches):
            lab8 = torch.randint(0, 3, (4, 8, 8), generator=g)
            lvl0 = torch.cat([torch.nn.functional.one_hot(lab8, 3).permute(0, 3, 1, 2).float(),
                              torch.randn(4, 1, 8, 8, generator=g)], 1)  # fmt: skip
            lvl1 = torch.randn(4, 6, 4, 4, generator=g)
            labels = lab8.repeat_interleave(2, 1).repeat_interleave(2, 2)
            labels[:, 0, :] = 255
            yield [lvl0.half(), lvl1], labels

    return fn


@pytest.mark.parametrize("kind", ["conv", "linear"])
def test_seg_head_learns_trivial_segmentation(kind):
    head = train_seg_head(_seg_batches(8, seed=0), [4, 6], 3, kind=kind, dim=16, epochs=15, lr=2e-2, seed=0)
    assert isinstance(head, SegHead if kind == "conv" else LinearPixelProbe)
    scores = eval_seg_head(head, _seg_batches(3, seed=1), 3)
    assert scores["miou"] > 0.8, scores
    assert head(next(iter(_seg_batches(1, 2)()))[0]).shape == (4, 3, 8, 8)


def test_seg_head_bad_channels_raise():
    head = SegHead([4, 6], 3, dim=8)
    with pytest.raises(ValueError):
        head([torch.zeros(1, 4, 8, 8), torch.zeros(1, 5, 4, 4)])
    with pytest.raises(ValueError):
        head([torch.zeros(4, 8, 8), torch.zeros(1, 6, 4, 4)])


# ----------------------------------------------------------------------------
# classification and runner
def _blobs(n, seed):
    g = np.random.default_rng(seed)
    y = g.integers(0, 3, n)
    return np.eye(3, 10)[y] * 5 + g.normal(size=(n, 10)), y


def test_linear_probe_separable_blobs():
    (xtr, ytr), (xte, yte) = _blobs(300, 0), _blobs(200, 1)
    result = linear_probe(xtr, ytr, torch.from_numpy(xte), torch.from_numpy(yte), seed=0)
    assert result.accuracy > 0.95
    assert result.model.predict(xte[:3]).shape == (3,)


def test_pool_features_and_probe_shape_checks():
    feat = torch.arange(2 * 3 * 2 * 2, dtype=torch.float16).reshape(2, 3, 2, 2)
    torch.testing.assert_close(pool_features(feat), feat.float().mean((2, 3)))
    with pytest.raises(ValueError):
        pool_features(torch.zeros(3, 2, 2))
    with pytest.raises(ValueError, match="pool_features"):
        linear_probe(np.zeros((4, 3, 2, 2)), np.arange(4), np.zeros((4, 3)), np.arange(4))
    with pytest.raises(ValueError):
        linear_probe(np.zeros((4, 3)), np.arange(5), np.zeros((4, 3)), np.arange(4))


# ----------------------------------------------------------------------------
# official semantics, checked against independent computations
def _official_compute_iou(preds, gts, number_class, ignore_label):
    """A literal port of DDPM-segmentation's ``compute_iou`` (src/pixel_classifier.py)."""
    unions, intersections = Counter(), Counter()
    for pred, gt in zip(preds, gts):
        for c in range(number_class):
            if c == ignore_label:
                continue
            p, g = (pred == c).astype(int), (gt == c).astype(int)
            unions[c] += (p | g).sum()
            intersections[c] += (p & g).sum()
    return np.array([intersections[c] / (1e-8 + unions[c]) for c in range(number_class) if c != ignore_label]).mean()


def test_ddpmseg_miou_hand_computed():
    # 4 classes, ignore 255. Class 3 never occurs and is never predicted: IoU 0, still averaged.
    # The prediction 1 on an ignored pixel is a false positive of class 1.
    target = np.array([[0, 0, 1, 255], [2, 2, 1, 1]])
    pred = np.array([[0, 1, 1, 1], [2, 0, 1, 1]])
    # class 0: inter 1, union 3; class 1: inter 3, union 5; class 2: inter 1, union 2; class 3: 0
    expected = (1 / 3 + 3 / 5 + 1 / 2 + 0) / 4
    cm = label_confusion(pred, target, 4, 255)
    assert cm.shape == (5, 4) and cm[4].tolist() == [0, 1, 0, 0]  # the ignored pixel's row
    assert ddpmseg_miou(cm, 255) == pytest.approx(expected, abs=1e-7)
    # the mmseg-style mean skips both the ignored pixel and the absent class: a higher number
    assert miou(pred, target, 4) == pytest.approx((1 / 3 + 3 / 4 + 1 / 2) / 3)


@pytest.mark.parametrize("ignore", [255, 0])  # Horse-21 style, Bedroom-28 style (ignore inside the classes)
def test_ddpmseg_miou_equals_official_compute_iou(ignore):
    rng = np.random.default_rng(0)
    k = 6
    gts = [rng.integers(0, k - 1, (9, 7)) for _ in range(4)]  # class k-1 absent from every target
    for g in gts:
        g[rng.random(g.shape) < 0.2] = ignore
    preds = [rng.integers(0, k, (9, 7)) for _ in range(4)]
    cm = sum(label_confusion(p, g, k, ignore) for p, g in zip(preds, gts))
    assert ddpmseg_miou(cm, ignore) == pytest.approx(_official_compute_iou(preds, gts, k, ignore), abs=1e-9)
    assert len(ddpmseg_iou_per_class(cm, ignore)) == (k - 1 if ignore < k else k)


def test_label_confusion_rejects_unknown_labels():
    with pytest.raises(ValueError, match="ignore_index=255"):
        label_confusion(np.zeros(3), np.array([0, 7, 255]), 4, 255)
    with pytest.raises(ValueError, match="pred holds labels"):
        label_confusion(np.array([0, 9, 1]), np.zeros(3), 4, 255)


def test_pixel_mlp_has_the_official_layers():
    assert official_hidden(21) == (128, 32) and official_hidden(29) == (128, 32)
    assert official_hidden(30) == (256, 128) and official_hidden(150) == (256, 128)
    for k, sizes in ((21, [(64, 128), (128, 32), (32, 21)]), (34, [(64, 256), (256, 128), (128, 34)])):
        net = pixel_mlp(64, k)
        linears = [m for m in net if isinstance(m, torch.nn.Linear)]
        assert [(m.in_features, m.out_features) for m in linears] == sizes
        kinds = [type(m).__name__ for m in net]
        assert kinds == ["Linear", "ReLU", "BatchNorm1d", "Linear", "ReLU", "BatchNorm1d", "Linear"]
        assert all(float(m.bias.detach().abs().max()) == 0 for m in linears)
        assert 0.015 < float(linears[0].weight.detach().std()) < 0.025  # N(0, 0.02)
    assert PixelMLPEnsemble(8, 21, n_models=1).hidden == (128, 32)


def _official_stop_iteration(losses, per_epoch, max_epochs=100):
    """The iteration at which DDPM-seg's ``train`` loop breaks (a literal port), or None."""
    it, best, count = 0, 10000000, 0
    for epoch in range(max_epochs):
        for _ in range(per_epoch):
            loss = losses[min(it, len(losses) - 1)]
            it += 1
            if epoch > 3:
                if loss < best:
                    best, count = loss, 0
                else:
                    count += 1
                if count > 50:
                    return it
    return None


def test_early_stop_matches_the_official_loop():
    rng = np.random.default_rng(1)
    losses = list(np.maximum(0.1, 2 - 0.01 * np.arange(600)) + rng.random(600) * 0.05)  # plateaus at 0.1
    per_epoch = 40
    stop, it = _EarlyStop(min_epochs=4, patience=50), 0
    stopped_at = None
    for epoch in range(100):
        for _ in range(per_epoch):
            it += 1
            if stop.update(epoch, losses[min(it - 1, len(losses) - 1)]):
                stopped_at = it
                break
        if stopped_at:
            break
    assert stopped_at is not None and stopped_at == _official_stop_iteration(losses, per_epoch)


def test_ensemble_stops_early_and_votes_ties_to_the_smallest_label():
    ens = PixelMLPEnsemble(6, 3, n_models=2, hidden=(8,), seed=0)
    ens.fit(_blob_chunks(1, chunk=300), max_epochs=100, batch_pixels=64, min_epochs=1, patience=3)
    assert all(1 < e < 100 for e in ens.epochs_)  # stopped early, after the first epoch
    assert all(n <= e * (280 // 64) for n, e in zip(ens.n_steps_, ens.epochs_))  # drop_last: 4 full batches
    # two models voting 2 and 0 on every pixel: the tie goes to 0 (torch.mode's CPU choice)
    for net, label in zip(ens.models, (2, 0)):
        last = net[-1]
        torch.nn.init.zeros_(last.weight)
        with torch.no_grad():
            last.bias.copy_(torch.nn.functional.one_hot(torch.tensor(label), 3).float())
    assert ens.predict(torch.randn(5, 6)).tolist() == [0] * 5


def test_linear_probe_seed_changes_the_fit():
    (xtr, ytr), (xte, yte) = _blobs(120, 0), _blobs(200, 1)
    a, b = (linear_probe(xtr, ytr, xte, yte, seed=3, epochs=2).model for _ in range(2))
    c = linear_probe(xtr, ytr, xte, yte, seed=4, epochs=2).model
    torch.testing.assert_close(a.linear.weight, b.linear.weight, rtol=0, atol=0)
    assert not torch.equal(a.linear.weight, c.linear.weight)
