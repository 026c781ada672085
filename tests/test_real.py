"""The official-layout runner (``difstudy probe-real``) against the toy-world tables.

The toy world exported to the official layouts and read back by the loaders must give
exactly the numbers of the toy table for the same settings: the same records, the same
features, the same metric, through the one protocol implementation.
"""

from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from difstudy import real
from difstudy.cli import _option, main
from difstudy.data.export import export_all, to_ddpmseg
from difstudy.data.toyworld import ToyWorld
from difstudy.tables import BenchConfig, run_benchmark, seg_world_size

N, PAIRS, SEG = 20, 6, 4
CONFIGS = {  # the same protocol settings for the table and for probe-real's --option
    "correspondence": {"concat_size": None, "match_size": None},
    "label-scarce-seg": {"resolution": 16, "n_models": 2, "max_epochs": 3, "hidden": [16]},
    "classification": {"epochs": 5},
}


def _cli_options(task: str) -> list[str]:
    return [a for k, v in CONFIGS[task].items() for a in ("--option", f"{k}={v}")]


def _lossless_spair_images(spair: Path) -> None:
    """Rewrite the export's JPEG files with the exact toy pixels (PNG data under the official
    ``.jpg`` names; the loader reads by content), so that both sides see the same images."""
    for path in (spair / "JPEGImages").rglob("*.jpg"):
        split, seed, index = path.stem.rsplit("_", 2)
        Image.fromarray(ToyWorld(split, n=int(index) + 1, seed=int(seed))[int(index)].image).save(path, format="PNG")


@pytest.fixture(scope="module")
def toy_table(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy")
    cfg = BenchConfig(
        model="tiny-sd15",
        n_train=N,
        n_test=N,
        n_pairs=PAIRS,
        n_seg_train=SEG,
        n_seg_test=SEG,
        seeds=(0,),
        settings=("ours-v1.5",),
        tasks=("correspondence", "label-scarce-seg", "classification"),
        batch_size=1,  # one image per forward: features independent of batch composition
        cache_dir=str(root / "cache-table"),
        correspondence=CONFIGS["correspondence"],
        part_seg=CONFIGS["label-scarce-seg"],
        classification=CONFIGS["classification"],
    )
    table, _ = run_benchmark(cfg, progress=False)
    export_all(root / "export", n=N, size=64, seed=0, n_pairs=PAIRS, progress=False)
    _lossless_spair_images(root / "export" / "spair")
    for split in ("train", "test"):  # Horse-21-like: one class, class-local part ids
        to_ddpmseg(ToyWorld(split, n=seg_world_size(cfg, SEG)), root / "birds", class_name="bird", progress=False)
    return root, table


@pytest.mark.slow
@pytest.mark.parametrize(
    "dataset, folder, task, extra",
    [
        ("spair", "export/spair", "correspondence", ["--n", str(PAIRS)]),
        ("ddpmseg", "birds", "label-scarce-seg", ["--num-classes", "7", "--n-train", str(SEG), "--n", str(SEG)]),
        ("classfolders", "export/classes", "classification", []),
    ],
)
def test_probe_real_on_the_export_equals_the_toy_table(toy_table, dataset, folder, task, extra):
    root, table = toy_table
    out = root / f"{dataset}.csv"
    options = _cli_options(task)
    common = ["--model", "tiny-sd15", "--acts", "ours-v1.5", "--size", "64", "--seeds", "0", "--batch", "1"]
    main(["probe-real", dataset, "--root", str(root / folder), *common, *extra, *options, "--out", str(out)])
    got = pd.read_csv(out).set_index("metric")
    want = table[table.task == task].set_index("metric")
    assert list(got.index) == list(want.index) and (got["protocol"] == want["protocol"]).all()
    assert (got[["n_train", "n_test"]].values == want[["n_train", "n_test"]].values).all()
    pd.testing.assert_series_equal(got["value"], want["value"], check_exact=True)


def test_task_options_are_checked():
    assert real.task_config("horse21", {"n_models": 3}).n_models == 3
    assert real.task_config("spair", {"concat_size": None}).concat_size is None
    with pytest.raises(ValueError, match="PartSegConfig has no field\\(s\\) \\['n_model'\\]"):
        real.task_config("horse21", {"n_model": 3})
    with pytest.raises(ValueError, match="unknown dataset 'coco'"):
        real.task_config("coco")
    assert _option("hidden=[64, 32]") == ("hidden", [64, 32]) and _option("match-size=None") == ("match_size", None)
    with pytest.raises(Exception, match="expected KEY=VALUE"):
        _option("n_models")


def test_generic_ddpmseg_needs_its_class_count(tmp_path):
    with pytest.raises(ValueError, match="num_classes"):
        real.ddpmseg_miou(None, tmp_path, preset="ddpmseg")
    with pytest.raises(ValueError, match="unknown DDPM-seg preset 'horse'"):
        real.ddpmseg_miou(None, tmp_path, preset="horse")
