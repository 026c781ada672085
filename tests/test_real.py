"""The real-data protocols on toy data exported in the official layouts."""

import numpy as np
import pytest
from PIL import Image

from difstudy import real
from difstudy.data.export import export_all, to_ddpmseg
from difstudy.data.toyworld import ToyWorld


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy")
    paths = export_all(root, n=20, size=64, n_pairs=6, progress=False)
    for split in ("train", "test"):  # Horse-21-like: one class, class-local part ids
        to_ddpmseg(ToyWorld(split, n=40), root / "birds", class_name="bird", progress=False)
    ade = root / "ADEChallengeData2016"
    for split, folder in (("train", "training"), ("test", "validation")):
        (ade / "images" / folder).mkdir(parents=True)
        (ade / "annotations" / folder).mkdir(parents=True)
        for s in ToyWorld(split, n=8):
            Image.fromarray(s.image).save(ade / "images" / folder / f"{s.image_id}.jpg", quality=95)
            Image.fromarray(np.where(s.mask > 0, s.label + 1, 0).astype(np.uint8)).save(
                ade / "annotations" / folder / f"{s.image_id}.png"
            )
    return paths, root


def _ok(df, metric):
    vals = df[df.metric == metric]["value"]
    assert len(vals) and vals.between(0, 1).all()
    return vals


def test_spair_protocol(exported, tmp_path):
    paths, _ = exported
    df = real.spair_pck("tiny-sd15", paths["spair"], ["ours-v1.5"], split="test", cache_dir=tmp_path)
    for m in ("PCK@0.1 img", "PCK@0.1 bbox", "PCK@0.1 img (per image)"):
        _ok(df, m)


def test_ddpmseg_protocol(exported, tmp_path):
    _, root = exported
    df = real.ddpmseg_miou(
        "tiny-sd15",
        root / "birds",
        ["up-level2-repeat2-res-out"],
        preset="horse21",
        seeds=(0, 1),
        res=16,
        mlp_hidden=(16,),
        mlp_models=2,
        epochs=1,
        cache_dir=tmp_path,
    )
    assert len(_ok(df, "mIoU")) == 2


def test_semseg_protocol(exported, tmp_path):
    _, root = exported
    df = real.semseg_miou(
        "tiny-sd15",
        "ade20k",
        root / "ADEChallengeData2016",
        ["up-level1-upsampler-out", "up-level2-upsampler-out"],
        seeds=(0,),
        epochs=2,
        label_size=32,
        cache_dir=tmp_path,
    )
    _ok(df, "mIoU")


def test_classification_protocol(exported, tmp_path):
    paths, _ = exported
    df = real.classification_accuracy(
        "tiny-sd15", "classfolders", paths["classes"], ["up-level1-upsampler-out"], seeds=(0, 1), cache_dir=tmp_path
    )
    assert len(_ok(df, "accuracy")) == 2
