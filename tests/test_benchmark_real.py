"""The benchmark tables on datasets in their official layouts under one data root (issue 23: the
full parameters run the real protocols). Here the data root holds the toy world exported in those
layouts, as the rehearsal does; the model is the tiny random-weight SD1.5 layout."""

from __future__ import annotations

import pytest

from difstudy.data.export import to_class_folders, to_ddpmseg, to_spair
from difstudy.data.toyworld import ToyWorld
from difstudy.real import PAPER_DATASETS, dataset_records
from difstudy.tables import BenchConfig, run_benchmark

TASKS = ("correspondence", "label-scarce-seg", "classification")
DATASETS = {"correspondence": "spair", "label-scarce-seg": "horse21", "classification": "classfolders"}


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    for split in ("train", "val", "test"):
        world = ToyWorld(split, n=40, size=32)
        to_spair(world, root / "SPair-71k", n_pairs=6, progress=False)
        if split != "val":
            to_ddpmseg(world, root / "ddpm-segmentation" / "horse_21", class_name="bird", progress=False)
            to_class_folders(world, root / "classfolders", progress=False)
    return root


def _cfg(root, **kw):
    kw = dict(
        model="tiny-sd15", image_size=64, n_train=12, n_test=12, n_pairs=4, n_seg_train=3, n_seg_test=3,
        seeds=(0,), tasks=TASKS, settings=("raw pixels", "ours-v1.5"), data_root=str(root), datasets=DATASETS,
        part_seg={"resolution": 32, "n_models": 1, "max_epochs": 1}, batch_size=4,
    ) | kw  # fmt: skip
    return BenchConfig(**kw)


def test_dataset_records_read_the_official_layouts(data_root):
    cfg = _cfg(data_root)
    rec = dataset_records(cfg, data_root, DATASETS)
    assert len(rec["correspondence"]["test_pairs"]) == 4 and len(rec["correspondence"]["train_pairs"]) == 4
    assert rec["correspondence"]["test_pairs"][0].pair_id.endswith(
        ":" + rec["correspondence"]["test_pairs"][0].category
    )
    assert len(rec["label-scarce-seg"]["train"]) == 3 and len(rec["classification"]["test"]) == 12
    with pytest.raises(ValueError, match="no dataset for the tasks"):
        dataset_records(cfg, data_root, {"correspondence": "spair"})
    with pytest.raises(ValueError, match="'cifar10' is not a correspondence dataset"):
        dataset_records(cfg, data_root, dict(DATASETS, correspondence="cifar10"))
    assert set(PAPER_DATASETS) == {"correspondence", "label-scarce-seg", "semantic-seg", "classification"}


@pytest.mark.slow
def test_run_benchmark_on_a_data_root(data_root, tmp_path):
    results, _ = run_benchmark(_cfg(data_root, cache_dir=str(tmp_path / "cache")), progress=False)
    assert set(results["dataset"]) == {"spair", "horse21", "classfolders"}
    assert set(results["setting"]) == {"raw pixels", "ours-v1.5"} and set(results["task"]) == set(TASKS)
    assert results["value"].notna().all()
    # the correspondence rows are on the exported test pairs, the same for every seed
    toy, _ = run_benchmark(
        _cfg(None, data_root=None, datasets={}, tasks=("correspondence",), cache_dir=str(tmp_path / "c2")),
        progress=False,
    )
    assert set(toy["dataset"]) == {"toy world"}
