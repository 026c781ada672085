"""Tests of the real-dataset loaders (on tiny fixture trees) and of the toy-world exporters."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from difstudy.data import loaders as L
from difstudy.data.export import export_all, to_class_folders, to_ddpmseg, to_spair
from difstudy.data.toyworld import CLASS_NAMES, CLASSES, NUM_PARTS, ToyWorld, local_part_mask
from difstudy.errors import DatasetError


def _save(path: Path, array: np.ndarray, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, **kw)
    return path


def _rgb(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _solid(h: int, w: int, colour: tuple[int, int, int]) -> np.ndarray:
    return np.broadcast_to(np.array(colour, np.uint8), (h, w, 3)).copy()


def _assert_dataset_error(fn, *fragments: object) -> DatasetError:
    with pytest.raises(DatasetError) as info:
        fn()
    for frag in fragments:
        assert str(frag) in str(info.value)
    assert isinstance(info.value, FileNotFoundError)
    return info.value


# ----------------------------------------------------------------------------
# fixture trees
def _spair_pair(name: str, cat: str, src: str, trg: str, src_kps, trg_kps, **extra) -> dict:
    return dict(
        pair_id=name, src_imname=src, trg_imname=trg, src_imsize=[40, 30, 3], trg_imsize=[40, 30, 3],
        src_kps=src_kps, trg_kps=trg_kps, src_bndbox=[1, 2, 30, 25], trg_bndbox=[0, 0, 39, 29],
        category=cat, kps_ids=[str(i) for i in range(len(src_kps))], viewpoint_variation=0, **extra,
    )  # fmt: skip


@pytest.fixture
def spair_root(tmp_path: Path) -> Path:
    root = tmp_path / "SPair-71k"
    colours = {"a": (200, 10, 10), "b": (10, 200, 10), "c": (10, 10, 200)}
    for cat, names in (("cat", ("a", "b")), ("dog", ("c",))):
        for n in names:
            _save(root / "JPEGImages" / cat / f"{n}.jpg", _solid(30, 40, colours[n]), quality=95)
    pairs = {
        "000001-a-b:cat": _spair_pair("1", "cat", "a.jpg", "b.jpg", [[1, 2], [3.5, 4]], [[5, 6], [7, 8]]),
        "000002-c-c:dog": _spair_pair("2", "dog", "c.jpg", "c.jpg", [[9, 10]], [[11, 12]]),
    }
    ann = root / "PairAnnotation" / "test"
    ann.mkdir(parents=True)
    for name, d in pairs.items():
        (ann / f"{name}.json").write_text(json.dumps(d))
    (root / "Layout" / "large").mkdir(parents=True)
    (root / "Layout" / "large" / "test.txt").write_text("000002-c-c:dog\n000001-a-b:cat\n")
    return root


def _cifar_batch(images: np.ndarray, labels: list[int]) -> dict:
    return {b"data": images.transpose(0, 3, 1, 2).reshape(len(images), -1), b"labels": labels, b"batch_label": b"x"}


@pytest.fixture
def cifar_root(tmp_path: Path) -> tuple[Path, dict[str, np.ndarray]]:
    base = tmp_path / "cifar-10-batches-py"
    base.mkdir()
    rng = np.random.default_rng(1)
    images = {"test": rng.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8),
              "train": rng.integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)}  # fmt: skip
    (base / "test_batch").write_bytes(pickle.dumps(_cifar_batch(images["test"], [3, 9])))
    for k in range(5):
        batch = _cifar_batch(images["train"][k : k + 1], [k])
        (base / f"data_batch_{k + 1}").write_bytes(pickle.dumps(batch))
    names = [n.encode() for n in L.CIFAR10_CLASSES]
    (base / "batches.meta").write_bytes(pickle.dumps({b"label_names": names}))
    return tmp_path, images


# ----------------------------------------------------------------------------
# SPair-71k
def test_spair_official_layout(spair_root: Path):
    ds = L.SPair71k(spair_root, split="test")
    assert len(ds) == 2 and ds.class_names == ("cat", "dog") and ds.num_classes == 2
    first, second = ds[0], ds[1]  # layout order: dog pair first
    assert first["pair_id"] == "000002-c-c:dog" and first["category"] == "dog"
    assert second["src_id"] == "spair/cat/a" and second["trg_id"] == "spair/cat/b"
    np.testing.assert_array_equal(second["src_kps"], np.array([[1, 2], [3.5, 4]], np.float32))
    np.testing.assert_array_equal(second["trg_kps"], np.array([[5, 6], [7, 8]], np.float32))
    np.testing.assert_array_equal(second["src_bbox"], np.array([1, 2, 30, 25], np.float32))
    assert second["src_kps"].dtype == np.float32 and second["src_bbox"].shape == (4,)
    assert second["src_image"].shape == (30, 40, 3) and second["src_image"].dtype == np.uint8
    assert np.abs(second["src_image"].astype(int) - (200, 10, 10)).max() <= 3
    assert set(first) == {"pair_id", "category", "src_image", "trg_image", "src_kps", "trg_kps",
                          "src_bbox", "trg_bbox", "src_id", "trg_id"}  # fmt: skip


def test_spair_category_filter_and_no_layout(spair_root: Path):
    assert [d["pair_id"] for d in L.SPair71k(spair_root, "test", category="cat")] == ["000001-a-b:cat"]
    (spair_root / "Layout" / "large" / "test.txt").unlink()
    assert [L.SPair71k(spair_root, "test")[i]["category"] for i in range(2)] == ["cat", "dog"]  # sorted files
    _assert_dataset_error(lambda: L.SPair71k(spair_root, "test", category="horse"), "horse", "JPEGImages")


def test_spair_hyperfeatures_json(spair_root: Path, tmp_path: Path):
    pairs = [
        dict(source_path="cat/a.jpg", target_path="b.jpg", source_points=[[1, 2]], target_points=[[3, 4]],
             category="cat", source_bounding_box=[0, 0, 5, 5], target_bounding_box=[1, 1, 6, 6]),
        dict(source_path="dog/c.jpg", target_path="dog/c.jpg", source_points=[[5, 6], [7, 8]],
             target_points=[[7, 8], [5, 6]], category="dog", source_bounding_box=[0, 0, 1, 1],
             target_bounding_box=[0, 0, 2, 2]),
    ]  # fmt: skip
    path = tmp_path / "spair_71k_test-2.json"
    path.write_text(json.dumps(pairs))
    ds = L.SPair71k.from_hyperfeatures_json(path, spair_root / "JPEGImages")
    assert len(ds) == 2 and ds.class_names == ("cat", "dog")
    item = ds[0]
    assert item["pair_id"] == "000000-a-b:cat" and (item["src_id"], item["trg_id"]) == ("spair/cat/a", "spair/cat/b")
    np.testing.assert_array_equal(item["trg_kps"], np.array([[3, 4]], np.float32))
    np.testing.assert_array_equal(item["trg_bbox"], np.array([1, 1, 6, 6], np.float32))
    assert item["trg_image"].shape == (30, 40, 3)
    assert len(L.SPair71k.from_hyperfeatures_json(path, spair_root / "JPEGImages", category="dog")) == 1
    path.write_text(json.dumps([{"source_path": "a.jpg"}]))
    _assert_dataset_error(lambda: L.SPair71k.from_hyperfeatures_json(path, spair_root), path, "target_path")


def test_spair_errors(spair_root: Path):
    _assert_dataset_error(lambda: L.SPair71k(spair_root / "nope"), spair_root / "nope", "PairAnnotation/test/", "http")
    _assert_dataset_error(lambda: L.SPair71k(spair_root, "val"), "PairAnnotation/val", "SPair-71k")
    bad = spair_root / "PairAnnotation" / "test" / "000001-a-b:cat.json"
    bad.write_text('{"src_imname": "a.jpg", ')
    ds = L.SPair71k(spair_root, "test")
    _assert_dataset_error(lambda: ds[1], bad, "malformed JSON")
    bad.write_text(json.dumps({"src_imname": "a.jpg"}))
    _assert_dataset_error(lambda: ds[1], bad, "trg_kps")
    corrupt = spair_root / "JPEGImages" / "dog" / "c.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    _assert_dataset_error(lambda: ds[0], corrupt)


# ----------------------------------------------------------------------------
# segmentation
def test_ddpmseg_folder_and_presets(tmp_path: Path):
    folder = tmp_path / "horse_21" / "real" / "train"
    imgs = [_rgb(16, 16, seed=1), _rgb(16, 16, seed=2)]
    masks = [np.random.default_rng(3).integers(0, 21, (16, 16)).astype(np.uint8), np.full((16, 16), 255, np.uint8)]
    for name, im, m in zip(("img_b", "img_a"), imgs, masks, strict=True):
        _save(folder / f"{name}.png", im)
        np.save(folder / f"{name}.npy", m)
    ds = L.DDPMSeg.horse21(tmp_path / "horse_21", "train")
    assert (ds.num_classes, ds.ignore_index, len(ds.class_names), len(ds)) == (21, 255, 21, 2)
    item = ds[0]  # sorted: img_a first
    assert item["image_id"] == "horse21/train/img_a" and item["mask"].dtype == np.int64
    np.testing.assert_array_equal(item["image"], imgs[1])
    np.testing.assert_array_equal(item["mask"], masks[1])
    np.testing.assert_array_equal(ds[1]["mask"], masks[0])
    bedroom = L.DDPMSeg.bedroom28(tmp_path / "horse_21", "train")
    assert (bedroom.num_classes, bedroom.ignore_index, len(bedroom.class_names)) == (29, 0, 29)
    assert L.DDPMSeg(tmp_path / "horse_21" / "real", "train").num_classes is None  # root = real/ works too
    _assert_dataset_error(lambda: L.DDPMSeg(tmp_path / "horse_21", "test"), "real/test", "ddpm-segmentation")
    (folder / "img_a.npy").write_bytes(b"garbage")
    _assert_dataset_error(lambda: ds[0], folder / "img_a.npy")
    (folder / "img_a.npy").unlink()
    _assert_dataset_error(lambda: L.DDPMSeg(tmp_path / "horse_21"), folder / "img_a.npy")


@pytest.mark.parametrize("nested", [True, False])
def test_ade20k(tmp_path: Path, nested: bool):
    base = tmp_path / "ADEChallengeData2016" if nested else tmp_path
    image, raw = _rgb(8, 12), np.array([[0, 1, 150] * 4] * 8, np.uint8)
    _save(base / "images" / "validation" / "ADE_val_00000001.jpg", image, quality=95)
    _save(base / "annotations" / "validation" / "ADE_val_00000001.png", raw)
    ds = L.ADE20K(tmp_path, "val")
    assert (len(ds), ds.num_classes, ds.ignore_index, len(ds.class_names)) == (1, 150, 255, 150)
    item = ds[0]
    assert item["image_id"] == "ade20k/validation/ADE_val_00000001" and item["image"].shape == (8, 12, 3)
    np.testing.assert_array_equal(item["mask"], np.array([[255, 0, 149] * 4] * 8, np.int64))
    assert item["mask"].dtype == np.int64
    _assert_dataset_error(lambda: L.ADE20K(tmp_path, "training"), "images/training", "sceneparsing")


def test_cityscapes(tmp_path: Path):
    image, mask = _rgb(8, 16), np.random.default_rng(4).choice(np.array([0, 5, 18, 255], np.uint8), (8, 16))
    _save(tmp_path / "leftImg8bit" / "val" / "lindau" / "lindau_000000_000019_leftImg8bit.png", image)
    label = tmp_path / "gtFine" / "val" / "lindau" / "lindau_000000_000019_gtFine_labelTrainIds.png"
    _save(label, mask)
    ds = L.Cityscapes(tmp_path, "val")
    assert (len(ds), ds.num_classes, ds.ignore_index) == (1, 19, 255)
    item = ds[0]
    assert item["image_id"] == "cityscapes/val/lindau_000000_000019"
    np.testing.assert_array_equal(item["image"], image)
    np.testing.assert_array_equal(item["mask"], mask.astype(np.int64))
    _save(label, _rgb(8, 16, seed=5))  # colour label map: wrong kind of file
    _assert_dataset_error(lambda: ds[0], label, "single-channel")
    label.unlink()
    _assert_dataset_error(lambda: L.Cityscapes(tmp_path, "val"), label, "createTrainIdLabelImgs")
    _assert_dataset_error(lambda: L.Cityscapes(tmp_path, "train"), "leftImg8bit/train", "cityscapes-dataset.com")


# ----------------------------------------------------------------------------
# classification
def test_cifar10(cifar_root):
    root, images = cifar_root
    for where in (root, root / "cifar-10-batches-py"):
        test = L.CIFAR10(where, "test")
        assert len(test) == 2 and test.class_names == L.CIFAR10_CLASSES and test.num_classes == 10
        item = test[1]
        assert (item["image_id"], item["label"]) == ("cifar10/test/00001", 9)
        np.testing.assert_array_equal(item["image"], images["test"][1])
        assert item["image"].shape == (32, 32, 3) and item["image"].dtype == np.uint8
    train = L.CIFAR10(root, "train")
    assert [train[i]["label"] for i in range(5)] == [0, 1, 2, 3, 4]
    np.testing.assert_array_equal(train[4]["image"], images["train"][4])


def test_cifar10_errors(cifar_root, tmp_path: Path):
    root, _ = cifar_root
    base = root / "cifar-10-batches-py"
    (base / "data_batch_3").unlink()
    _assert_dataset_error(lambda: L.CIFAR10(root, "train"), base / "data_batch_3", "cs.toronto.edu")
    (base / "test_batch").write_bytes(b"not a pickle")
    _assert_dataset_error(lambda: L.CIFAR10(root, "test"), base / "test_batch")
    (base / "test_batch").write_bytes(pickle.dumps({b"labels": [1]}))
    _assert_dataset_error(lambda: L.CIFAR10(root, "test"), base / "test_batch", "b'data'")


def test_class_folders(tmp_path: Path):
    a, b = _rgb(8, 8, seed=6), _rgb(8, 8, seed=7)
    _save(tmp_path / "train" / "zebra" / "x.png", a)
    _save(tmp_path / "train" / "ant" / "y.png", b)
    ds = L.ClassFolders(tmp_path, "train")
    assert ds.class_names == ("ant", "zebra") and len(ds) == 2
    assert (ds[0]["image_id"], ds[0]["label"], ds[1]["label"]) == ("classfolders/train/ant/y", 0, 1)
    np.testing.assert_array_equal(ds[1]["image"], a)
    (tmp_path / "classes.txt").write_text("zebra\nbee\nant\n")
    ds = L.ClassFolders(tmp_path, "train")
    assert ds.class_names == ("zebra", "bee", "ant") and [ds[i]["label"] for i in range(2)] == [0, 2]
    (tmp_path / "classes.txt").write_text("zebra\n")
    _assert_dataset_error(lambda: L.ClassFolders(tmp_path, "train"), "ant", "classes.txt")
    _assert_dataset_error(lambda: L.ClassFolders(tmp_path, "test"), tmp_path / "test")


# ----------------------------------------------------------------------------
# factory
def test_load_dataset(spair_root: Path):
    assert isinstance(L.load_dataset("spair", spair_root, split="test"), L.SPair71k)
    world = L.load_dataset("toyworld", split="val", n=3, size=32)
    assert isinstance(world, ToyWorld) and len(world) == 3
    with pytest.raises(ValueError, match="cityscapes"):
        L.load_dataset("imagenet", spair_root)
    assert set(L._factories()) == set(L.DATASET_KINDS)


@pytest.mark.parametrize("kind", [k for k in L.DATASET_KINDS if k != "toyworld"])
def test_missing_root_raises_dataset_error(kind: str, tmp_path: Path):
    missing = tmp_path / "no" / "such" / "folder"
    err = _assert_dataset_error(lambda: L.load_dataset(kind, missing), missing)
    assert "expected" in str(err) and "comes from" in str(err)


# ----------------------------------------------------------------------------
# round trips: toy world -> exporter -> loader
@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict[str, Path]:
    return export_all(tmp_path_factory.mktemp("toy"), n=20, size=64, seed=3, n_pairs=4, progress=False)


def _world(split: str) -> ToyWorld:
    return ToyWorld(split, n=20, size=64, seed=3)


def test_export_all_layout(exported: dict[str, Path]):
    assert set(exported) == {"spair", "ddpmseg", "classes"}
    assert not list(exported["spair"].parent.rglob("*.tmp"))  # atomic writes leave nothing behind
    for split in ("trn", "val", "test"):
        assert len((exported["spair"] / "Layout" / "large" / f"{split}.txt").read_text().split()) == 4
    sample = _world("val")[5]
    seg = exported["spair"] / "Segmentation" / sample.class_name / f"{sample.image_id}.png"
    np.testing.assert_array_equal(np.asarray(Image.open(seg)), sample.mask)
    ann_path = exported["spair"] / "ImageAnnotation" / sample.class_name / f"{sample.image_id}.json"
    ann = json.loads(ann_path.read_text())
    assert ann["bndbox"] == list(sample.bbox) and ann["category"] == sample.class_name
    assert [k is not None for k in ann["kps"].values()] == sample.visible.tolist()


@pytest.mark.parametrize("split, spair_split", [("train", "train"), ("test", "test")])
def test_roundtrip_spair(exported: dict[str, Path], split: str, spair_split: str):
    world = _world(split)
    pairs = world.pairs(4, seed=3)
    ds = L.SPair71k(exported["spair"], spair_split)
    assert len(ds) == len(pairs) == 4
    for item, (a, b) in zip(ds, pairs, strict=True):
        src, trg = world[a], world[b]
        both = src.visible & trg.visible
        ids = (f"spair/{src.class_name}/{src.image_id}", f"spair/{trg.class_name}/{trg.image_id}", src.class_name)
        assert (item["src_id"], item["trg_id"], item["category"]) == ids
        np.testing.assert_array_equal(item["src_kps"], src.keypoints[both])
        np.testing.assert_array_equal(item["trg_kps"], trg.keypoints[both])
        np.testing.assert_array_equal(item["src_bbox"], np.array(src.bbox, np.float32))
        for got, want in ((item["src_image"], src.image), (item["trg_image"], trg.image)):
            assert got.shape == want.shape
            assert np.abs(got.astype(int) - want).mean() < 4  # JPEG, quality 95


def test_roundtrip_ddpmseg_and_class_folders(exported: dict[str, Path]):
    world = _world("test")
    seg = L.load_dataset("ddpmseg", exported["ddpmseg"], split="test", num_classes=NUM_PARTS)
    cls = L.load_dataset("classfolders", exported["classes"], split="test")
    assert len(seg) == len(cls) == len(world) and cls.class_names == CLASS_NAMES
    by_id = {cls[i]["image_id"].split("/")[-1]: cls[i] for i in range(len(cls))}
    for i in range(len(world)):
        s, item = world[i], seg[i]
        assert item["image_id"] == f"ddpmseg/test/{s.image_id}"
        np.testing.assert_array_equal(item["image"], s.image)
        np.testing.assert_array_equal(item["mask"], s.mask.astype(np.int64))
        assert by_id[s.image_id]["label"] == s.label
        np.testing.assert_array_equal(by_id[s.image_id]["image"], s.image)
    assert len(L.ClassFolders(exported["classes"], "val")) == 20


def test_single_exporters_and_class_local_masks(tmp_path: Path):
    world = ToyWorld("val", n=20, size=32, seed=1)
    folder = to_ddpmseg(world, tmp_path / "seg", class_name="car", progress=False)
    assert folder == tmp_path / "seg" / "real" / "val"
    ds = L.DDPMSeg(tmp_path / "seg", "val", num_classes=1 + len(CLASSES[2].parts))
    cars = [s for s in world if s.class_name == "car"]
    assert len(ds) == len(cars) == 2
    for item, s in zip(ds, cars, strict=True):
        np.testing.assert_array_equal(item["mask"], local_part_mask(s.mask, s.label))
        assert item["mask"].max() <= len(CLASSES[2].parts)
    with pytest.raises(ValueError, match="unicorn"):
        to_ddpmseg(world, tmp_path / "seg", class_name="unicorn", progress=False)
    assert to_class_folders(world, tmp_path / "cls", progress=False) == tmp_path / "cls"
    assert len(L.ClassFolders(tmp_path / "cls", "val")) == 20
    to_spair(world, tmp_path / "spair", n_pairs=2, progress=False)
    assert len(L.SPair71k(tmp_path / "spair", "val")) == 2


# ----------------------------------------------------------------------------
# ids: the feature cache is keyed by them, so they must be unique across splits and datasets
def test_ids_are_unique_across_splits_and_datasets(tmp_path: Path, cifar_root):
    """Every split of every layout holds a file of the same name; no two items may share an id."""
    im = _rgb(8, 8)
    label = np.zeros((8, 8), np.uint8)
    for split in ("train", "test"):
        _save(tmp_path / "cls" / split / "cat" / "0001.png", im)
        for ds_name in ("horse_21", "bedroom_28"):
            _save(tmp_path / ds_name / "real" / split / "0001.png", im)
            np.save(tmp_path / ds_name / "real" / split / "0001.npy", label)
    for split in ("training", "validation"):
        _save(tmp_path / "ade" / "images" / split / "0001.jpg", im)
        _save(tmp_path / "ade" / "annotations" / split / "0001.png", label)
    for split in ("train", "val"):
        _save(tmp_path / "city" / "leftImg8bit" / split / "x" / "0001_leftImg8bit.png", im)
        _save(tmp_path / "city" / "gtFine" / split / "x" / "0001_gtFine_labelTrainIds.png", label)
    datasets = [L.ClassFolders(tmp_path / "cls", s) for s in ("train", "test")]
    datasets += [L.DDPMSeg.horse21(tmp_path / "horse_21", s) for s in ("train", "test")]
    datasets += [L.DDPMSeg.bedroom28(tmp_path / "bedroom_28", s) for s in ("train", "test")]
    datasets += [L.DDPMSeg(tmp_path / "bedroom_28", "test")]  # another name for the same files: "bedroom_28"
    datasets += [L.ADE20K(tmp_path / "ade", s) for s in ("training", "validation")]
    datasets += [L.Cityscapes(tmp_path / "city", s) for s in ("train", "val")]
    datasets += [L.CIFAR10(cifar_root[0], s) for s in ("train", "test")]
    ids = [ds[i]["image_id"] for ds in datasets for i in range(len(ds))]
    assert len(ids) == len(set(ids)) == 1 + 1 + 2 + 2 + 1 + 2 + 2 + 5 + 2
    assert "classfolders/test/cat/0001" in ids and "horse21/train/0001" in ids and "bedroom_28/test/0001" in ids


def test_spair_ids_name_the_image_not_the_split(spair_root: Path, tmp_path: Path):
    """SPair-71k images are shared by the splits' pairs: one image, one id, whatever the pair list."""
    ds = L.SPair71k(spair_root, "test")
    pairs = [dict(source_path="JPEGImages/cat/a.jpg", target_path="b.jpg", source_points=[[1, 2]],
                  target_points=[[3, 4]], category="cat")]  # fmt: skip
    path = tmp_path / "pairs.json"
    path.write_text(json.dumps(pairs))
    hyper = L.SPair71k.from_hyperfeatures_json(path, spair_root)
    assert (
        (hyper[0]["src_id"], hyper[0]["trg_id"]) == (ds[1]["src_id"], ds[1]["trg_id"]) == ("spair/cat/a", "spair/cat/b")
    )
