"""Planted-answer tests of the protocol wrappers (issue 20, item 6).

Every test goes through :mod:`difstudy.protocols` (records, feature source, config, the
task function) with a *planted* feature source: its maps are given per image id, so the
answer is known in advance.

- Perfect features: the maps are a one-hot code of the very labels the records hold
  (part / class id per pixel, class id per image). Every protocol must then score
  mIoU 1.0 (part and semantic segmentation) or accuracy 1.0 (classification). Where the
  protocol resizes (bilinear features, nearest labels) the planted geometry is chosen
  so that nearest-resized labels are still the argmax of the bilinear features, so the
  answer stays exactly learnable.
- Shuffled labels: the same features, with the labels permuted (seeded) independently
  of them. Nothing can then be learned, and the score must sit at chance:

  * accuracy (image or pixel): every image of the planted sets holds each of the ``K``
    classes equally often (segmentation), or the classes are balanced over images
    (classification), so for *any* prediction independent of the labels the expected
    accuracy is exactly ``1 / K``. The tolerance is 5 binomial standard deviations of
    the test-set size (a permutation without replacement varies less than that).
  * mIoU: with balanced labels and predictions independent of them, class ``c`` predicted
    with frequency ``q_c`` has expected IoU ``q_c / (1 + (K - 1) q_c)``. That is concave
    in ``q``, so the mean over the ``K`` classes lies between ``1 / K**2`` (one class
    predicted everywhere) and ``1 / (2K - 1)`` (predictions balanced). Both the official
    DDPM-seg ``compute_iou`` and mmseg's mIoU average over all ``K`` classes here (every
    class is present in the test labels, no pixel is ignored). The assertion is that
    envelope, widened by a small noise tolerance.

Sizes are small (16 px maps, 4 classes, few epochs, small heads/ensembles) so each test
runs in a few seconds on one core; the configs are the protocols' defaults with only
sizes and epochs shrunk.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from difstudy import protocols as P

torch.set_num_threads(1)

K = 4  # classes (parts / semantic classes / image classes)
SIZE = 16  # side of the planted maps, in pixels
DATA_SEED = 20  # the planted data (features, images)
SHUFFLE_SEED = 6  # the label permutation, drawn apart from the data
IGNORE = 255  # unlabelled pixels, where a test plants them

ACC_CHANCE = 1 / K
MIOU_CHANCE_LOW = 1 / K**2  # one class predicted everywhere
MIOU_CHANCE_HIGH = 1 / (2 * K - 1)  # predictions balanced over the classes
MIOU_NOISE = 0.03  # sampling noise of a per-class IoU over thousands of pixels

# Sizes per task. The noise channels are distractors next to the planted code, and give a
# probe something to memorise: with them, a protocol that scored the (shuffled) images it
# trained on would land far outside the chance band (measured: part seg 0.51 pixel accuracy
# against a band of 0.25 +- 0.048, classification 0.44 against 0.25 +- 0.054; the light
# semantic head, without noise, 0.29 against 0.25 +- 0.024), while the planted code still
# scores 1.0 on test images.
PART_TRAIN, PART_TEST, PART_NOISE = 8, 8, 8
PART_CFG = P.PartSegConfig(resolution=SIZE, n_models=3, max_epochs=10)  # official: 256, 10, 100
SEM_TRAIN, SEM_TEST = 48, 32  # no noise: the light head at the official lr stops at ~0.996 with it
SEM_CFG = P.SemSegConfig(dim=64)  # the default head, optimiser and 8 epochs; a narrower head (512)
CLS_TRAIN, CLS_TEST, CLS_NOISE = 400, 1600, 32  # 64 noise channels: ~0.99 on planted classes
CLS_CFG = P.ClassifyConfig()  # the defaults: 100 epochs (20 leave the probe at ~0.76)


def acc_tolerance(n: int, k: int = K) -> float:
    """5 binomial standard deviations of an accuracy at chance ``1 / k`` over ``n`` items."""
    p = 1 / k
    return 5 * math.sqrt(p * (1 - p) / n)


# ----------------------------------------------------------------------------
# the planted feature source and records
class PlantedFeatures:
    """A feature source whose maps are planted per image id.

    Implements what the protocols read (:class:`~difstudy.protocols.FeatureSource`):
    ``label``, ``names``, ``for_seed``, ``prepare(records)`` and ``maps(record)``; it also
    records the seeds and prepared ids, and refuses to read an image that was never
    prepared (every protocol must prepare train and test before reading them).
    """

    def __init__(self, maps: dict[str, list[torch.Tensor]], label: str = "planted"):
        self._maps, self.label = maps, label
        self.names = tuple(f"planted{i}" for i in range(len(next(iter(maps.values())))))
        self.seeds: list[int] = []
        self.prepared: set[str] = set()

    def for_seed(self, seed: int) -> PlantedFeatures:
        self.seeds.append(int(seed))
        return self

    def prepare(self, records) -> None:
        self.prepared |= {r.image_id for r in records}

    def maps(self, record: P.ImageRecord) -> list[torch.Tensor]:
        assert record.image_id in self.prepared, f"{record.image_id} read before prepare()"
        return [m.clone() for m in self._maps[record.image_id]]


def one_hot_map(z: np.ndarray, k: int = K) -> torch.Tensor:
    """(H, W) ids -> (k, H, W) float32 one-hot."""
    return F.one_hot(torch.as_tensor(z, dtype=torch.long), k).permute(2, 0, 1).float()


def balanced_map(rng: np.random.Generator, rows: int, cols: int, k: int = K) -> np.ndarray:
    """(rows, cols) ids, every class on exactly rows * cols / k pixels, in random places."""
    z = np.resize(np.arange(k), rows * cols)
    rng.shuffle(z)
    return z.reshape(rows, cols)


def distinct_image(rng: np.random.Generator, side: int) -> np.ndarray:
    return rng.integers(0, 256, (side, side, 3), dtype=np.uint8)


def seg_sets(
    n_train: int,
    n_test: int,
    map_side: int = SIZE,
    mask_up: int = 1,
    shuffled: bool = False,
    noise: int = 0,
    ignore_rows: int = 0,
) -> tuple[PlantedFeatures, P.Records, P.Records]:
    """Planted segmentation sets: per image a balanced id map ``z`` (map_side x map_side);
    the feature map is ``one_hot(z)`` followed by ``noise`` channels of per-pixel Gaussian
    noise (distractors that also let a probe memorise the pixels it trains on); the label
    mask is ``z`` upsampled ``mask_up`` times by pixel repetition, or (``shuffled``) a seeded
    permutation of the mask's pixels within the image, independent of the features.
    With ``ignore_rows``, the top rows of ``z`` (balanced on their own) are unlabelled in the
    mask (``IGNORE``, the label space's ``ignore_index``); the features there are planted all
    the same."""
    rng = np.random.default_rng(DATA_SEED)
    shuffle = np.random.default_rng(SHUFFLE_SEED)
    maps, recs = {}, []
    for i in range(n_train + n_test):
        z = np.concatenate(
            [balanced_map(rng, ignore_rows, map_side), balanced_map(rng, map_side - ignore_rows, map_side)]
        )
        mask = z.repeat(mask_up, 0).repeat(mask_up, 1).astype(np.int64)
        mask[: ignore_rows * mask_up] = IGNORE
        if shuffled:
            mask = shuffle.permutation(mask.ravel()).reshape(mask.shape)
        iid = f"planted/{'train' if i < n_train else 'test'}/{i:04d}"
        extra = torch.from_numpy(rng.standard_normal((noise, map_side, map_side)).astype(np.float32))
        maps[iid] = [torch.cat([one_hot_map(z), extra])]
        recs.append(P.ImageRecord(iid, distinct_image(rng, mask.shape[0]), mask=mask))
    space = P.LabelSpace(K, IGNORE if ignore_rows else None, tuple(f"part{c}" for c in range(K)))
    train = P.Records.from_sequence("planted/train", recs[:n_train], labels=space)
    test = P.Records.from_sequence("planted/test", recs[n_train:], labels=space)
    return PlantedFeatures(maps), train, test


def class_sets(n_train: int, n_test: int, shuffled: bool = False) -> tuple[PlantedFeatures, P.Records, P.Records]:
    """Planted classification sets: classes balanced over the images; per image two maps, a
    one-hot of its planted class over a SIZE x SIZE grid and a half-size map of per-image
    noise (a distractor, so the probe has to find the planted channels). Labels are the
    planted classes, or (``shuffled``) a seeded permutation of them over all images."""
    rng = np.random.default_rng(DATA_SEED)
    n = n_train + n_test
    z = np.resize(np.arange(K), n)
    rng.shuffle(z)
    labels = np.random.default_rng(SHUFFLE_SEED).permutation(z) if shuffled else z
    maps, recs = {}, []
    for i in range(n):
        iid = f"planted/{'train' if i < n_train else 'test'}/{i:04d}"
        noise = torch.from_numpy(rng.standard_normal((CLS_NOISE, SIZE // 2, SIZE // 2)).astype(np.float32))
        maps[iid] = [one_hot_map(np.full((SIZE, SIZE), z[i])), noise]
        recs.append(P.ImageRecord(iid, distinct_image(rng, SIZE), label=int(labels[i])))
    space = P.LabelSpace(K, None, tuple(f"class{c}" for c in range(K)))
    train = P.Records.from_sequence("planted/train", recs[:n_train], labels=space)
    test = P.Records.from_sequence("planted/test", recs[n_train:], labels=space)
    return PlantedFeatures(maps), train, test


def values(df) -> dict[str, float]:
    return df.set_index("metric")["value"].to_dict()


def check_rows(df, source: PlantedFeatures, train, test, task: str, cfg) -> None:
    """What every protocol row must say, and that the source was used as documented."""
    assert (df["task"] == task).all() and (df["protocol"] == P.protocol_label(cfg)).all()
    assert (df["features"] == source.label).all() and (df["seed"] == 0).all()
    assert (df["n_train"] == len(train)).all() and (df["n_test"] == len(test)).all()
    assert source.seeds == [0]
    assert source.prepared == {r.image_id for r in (*train, *test)}


# ----------------------------------------------------------------------------
# part segmentation (DDPM-seg pixel-MLP ensemble)
@pytest.mark.parametrize(
    "map_side, mask_up, noise",
    [
        (SIZE, 1, PART_NOISE),  # maps, masks and resolution alike: nothing is resized
        # maps bilinearly up to 16, masks (32 px) nearest down to 16: the nearest-resized label
        # is the argmax of the bilinear one-hot (weight >= 0.5625); without noise channels,
        # with which 10 epochs leave 1 pixel in 2048 wrong for some data / run seeds
        (SIZE // 2, 4, 0),
    ],
    ids=["native", "resized"],
)
def test_part_segmentation_of_planted_parts_is_perfect(map_side, mask_up, noise):
    src, train, test = seg_sets(PART_TRAIN, PART_TEST, map_side, mask_up, noise=noise)
    df = P.part_segmentation(src, train, test, PART_CFG, seed=0)
    v = values(df)
    # the official compute_iou divides by 1e-8 + union: 1 - O(1e-10), not exactly 1
    assert v["mIoU"] == pytest.approx(1.0, abs=1e-6)
    assert v["pixel accuracy"] == 1.0
    check_rows(df, src, train, test, "label-scarce-seg", PART_CFG)


@pytest.mark.parametrize(
    "metric, expected",
    [
        # the official compute_iou counts a prediction on an unlabelled pixel as a false positive:
        # per image, each class holds 56 labelled pixels and 8 of the 32 unlabelled ones (the two
        # top rows), where the planted code predicts it, so every IoU is 56 / (56 + 8)
        ("ddpmseg", 56 / 64),
        ("present", 1.0),  # mmseg-style: unlabelled pixels skipped
    ],
)
def test_part_segmentation_scores_unlabelled_pixels_as_documented(metric, expected):
    src, train, test = seg_sets(PART_TRAIN, PART_TEST, noise=PART_NOISE, ignore_rows=2)
    cfg = P.PartSegConfig(resolution=SIZE, n_models=3, max_epochs=10, metric=metric)
    v = values(P.part_segmentation(src, train, test, cfg, seed=0))
    assert v["mIoU"] == pytest.approx(expected, abs=1e-6)
    assert v["pixel accuracy"] == 1.0  # over labelled pixels


def test_part_segmentation_of_shuffled_parts_is_chance():
    src, train, test = seg_sets(PART_TRAIN, PART_TEST, shuffled=True, noise=PART_NOISE)
    v = values(P.part_segmentation(src, train, test, PART_CFG, seed=0))
    n_pixels = PART_TEST * SIZE * SIZE
    assert v["pixel accuracy"] == pytest.approx(ACC_CHANCE, abs=acc_tolerance(n_pixels))
    assert MIOU_CHANCE_LOW - MIOU_NOISE <= v["mIoU"] <= MIOU_CHANCE_HIGH + MIOU_NOISE


# ----------------------------------------------------------------------------
# semantic segmentation (light conv head)
@pytest.mark.parametrize(
    "mask_up, label_size, ignore_rows",
    [
        (1, None, 0),  # labels scored at their own size, the size of the maps
        (2, SIZE, 0),  # 32 px masks nearest-resized to the maps' 16 px (label_size)
        (1, None, 2),  # two unlabelled rows: skipped in training and scoring (mmseg)
    ],
    ids=["native", "label_size", "ignored"],
)
def test_semantic_segmentation_of_planted_classes_is_perfect(mask_up, label_size, ignore_rows):
    src, train, test = seg_sets(SEM_TRAIN, SEM_TEST, SIZE, mask_up, ignore_rows=ignore_rows)
    cfg = P.SemSegConfig(dim=SEM_CFG.dim, label_size=label_size)
    df = P.semantic_segmentation(src, train, test, cfg, seed=0)
    v = values(df)
    assert v["mIoU"] == pytest.approx(1.0, abs=1e-6)
    assert v["pixel accuracy"] == pytest.approx(1.0, abs=1e-6)
    check_rows(df, src, train, test, "semantic-seg", cfg)


def test_semantic_segmentation_of_shuffled_classes_is_chance():
    src, train, test = seg_sets(SEM_TRAIN, SEM_TEST, shuffled=True)
    v = values(P.semantic_segmentation(src, train, test, SEM_CFG, seed=0))
    n_pixels = SEM_TEST * SIZE * SIZE
    assert v["pixel accuracy"] == pytest.approx(ACC_CHANCE, abs=acc_tolerance(n_pixels))
    assert MIOU_CHANCE_LOW - MIOU_NOISE <= v["mIoU"] <= MIOU_CHANCE_HIGH + MIOU_NOISE


# ----------------------------------------------------------------------------
# classification (linear probe on pooled maps)
def test_classification_of_planted_classes_is_perfect():
    src, train, test = class_sets(CLS_TRAIN, CLS_TEST)
    df = P.classification(src, train, test, CLS_CFG, seed=0)
    assert values(df) == {"accuracy": 1.0}
    check_rows(df, src, train, test, "classification", CLS_CFG)


def test_classification_of_shuffled_classes_is_chance():
    src, train, test = class_sets(CLS_TRAIN, CLS_TEST, shuffled=True)
    acc = values(P.classification(src, train, test, CLS_CFG, seed=0))["accuracy"]
    assert acc == pytest.approx(ACC_CHANCE, abs=acc_tolerance(CLS_TEST))
