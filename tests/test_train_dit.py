"""The mini DiT's training script (issue 26): it trains, resumes from its checkpoint with one log
row per step, refuses another recipe, and exports a transformer that loads as a PixArt pipeline."""

from __future__ import annotations

import csv

import pytest
import torch

from difstudy.train import dit


def _rows(path):
    return [int(r["step"]) for r in csv.DictReader(open(path)) if r["stage"] == "dit"]


def test_the_mini_dit_trains_resumes_and_exports(tmp_path):
    out = tmp_path / "run"
    small = ["--out", str(out), "--n-train", "40", "--depth", "1", "--batch", "4", "--ckpt-every", "1"]
    dit.main([*small, "--steps", "2"])
    assert _rows(out / "log.csv") == [1, 2]
    dit.main([*small, "--steps", "3", "--export", str(tmp_path / "export")])  # resumes at step 2
    assert _rows(out / "log.csv") == [1, 2, 3]
    with pytest.raises(ValueError, match="mini DiT checkpoint.*another recipe.*heads: checkpoint 6, now 2"):
        dit.main([*small, "--steps", "4", "--heads", "2"])
    from diffusers import PixArtTransformer2DModel

    model = PixArtTransformer2DModel.from_pretrained(tmp_path / "export" / "transformer")
    assert model.config.num_layers == 1 and model.config.caption_channels == 64
    assert (tmp_path / "export" / "training_log.csv").exists()
    assert "_name_or_path" not in (tmp_path / "export" / "transformer" / "config.json").read_text()


def test_a_continuation_starts_from_the_exported_weights_and_counts_its_steps_on(tmp_path):
    import json

    from diffusers import PixArtTransformer2DModel

    small = ["--n-train", "40", "--depth", "1", "--batch", "4", "--ckpt-every", "1"]
    first, second = tmp_path / "first", tmp_path / "second"
    dit.main([*small, "--out", str(tmp_path / "run1"), "--steps", "2", "--export", str(first)])
    init, _ = dit.load_init(first)
    dit.main([*small, "--out", str(tmp_path / "run2"), "--steps", "3", "--lr", "0", "--warmup", "0",
              "--init-from", str(first), "--export", str(second)])  # fmt: skip
    # learning rate 0: the continuation's EMA of unchanged weights is the model it continued
    cont = PixArtTransformer2DModel.from_pretrained(second / "transformer")
    for (name, a), b in zip(init.state_dict().items(), cont.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert _rows(second / "training_log.csv") == [1, 2, 3, 4, 5]  # the first run's rows, then steps 3-5
    meta = json.loads((second / "difstudy_training.json").read_text())
    assert meta["total_steps"] == 5 and meta["init_from"] == str(first) and meta["previous_run"]["total_steps"] == 2
    with pytest.raises(ValueError, match="not this recipe's architecture.*num_layers"):
        dit.main([*small, "--depth", "2", "--out", str(tmp_path / "run3"), "--steps", "1", "--init-from", str(first)])
    with pytest.raises(FileNotFoundError, match="no transformer/config.json there"):
        dit.main([*small, "--out", str(tmp_path / "run4"), "--steps", "1", "--init-from", str(tmp_path)])


def test_the_caption_mask_covers_the_text_and_its_end_token():
    ids = torch.tensor([[0, 5, 6, 9, 9, 9], [0, 9, 9, 9, 9, 9]])
    assert dit.caption_mask(ids, eos_id=9).tolist() == [[1, 1, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0]]


def test_the_committed_mini_dit_loads_on_the_mini_models_vae_and_text_encoder():
    import json

    from difstudy.extract import Extractor, module_fingerprint
    from difstudy.models import MINI_DIT_PATH, load

    pipe = load("mini-dit")
    meta = json.loads((MINI_DIT_PATH / "difstudy_training.json").read_text())
    assert (
        type(pipe).__name__ == "PixArtAlphaPipeline" and pipe.transformer.config.num_layers == meta["recipe"]["depth"]
    )
    # the denoisers differ only in architecture: the DiT was trained on exactly these VAE and text encoder weights
    assert module_fingerprint(pipe.vae) == meta["vae_fingerprint"]
    assert module_fingerprint(pipe.text_encoder) == meta["text_fingerprint"]
    ex = Extractor(pipe, "all", [50])
    assert ex.image_size == 64 and len(ex.names) == 3 + 10 * meta["recipe"]["depth"]
    assert ex.catalog["vit-block0-cross-map"].shape[-1] == pipe.tokenizer.model_max_length


def test_the_object_weighted_loss_weighs_the_objects_cells_and_keeps_its_scale():
    from difstudy.train.common import object_weighted_mse

    pred, target = torch.zeros(2, 4, 2, 2), torch.zeros(2, 4, 2, 2)
    target[0, :, 0, 0] = 2.0  # image 0: error 4 on one cell, the object's
    target[1, :, 1, 1] = 2.0  # image 1: error 4 on one cell, background
    fg = torch.zeros(2, 2, 2)
    fg[:, 0, 0] = 1.0
    assert object_weighted_mse(pred, target).tolist() == [1.0, 1.0]  # the plain mean
    w = object_weighted_mse(pred, target, fg.numpy(), fg_weight=3.0)
    # weights 4, 1, 1, 1 (sum 7): the object's error counts 4/7, the background cell's 1/7
    assert torch.allclose(w, torch.tensor([4 * 4 / 7, 4 * 1 / 7]))
    same = torch.full((2, 4, 2, 2), 2.0)  # the same error everywhere: the weighting keeps the loss's scale
    assert torch.allclose(object_weighted_mse(pred, same, fg.numpy(), 3.0), object_weighted_mse(pred, same))
    with pytest.raises(ValueError, match="needs the object masks"):
        object_weighted_mse(pred, target, None, 3.0)


def test_the_dit_trains_with_the_object_weighted_loss_and_records_it(tmp_path):
    import json

    import numpy as np

    out = tmp_path / "run"
    dit.main(["--out", str(out), "--n-train", "40", "--depth", "1", "--batch", "4", "--steps", "1",
              "--fg-weight", "2", "--class-weights", "dog=4", "--export", str(tmp_path / "export")])  # fmt: skip
    assert "foreground" in np.load(out / "data.npz").files
    recipe = json.loads((tmp_path / "export" / "difstudy_training.json").read_text())["recipe"]
    assert recipe["fg_weight"] == 2 and recipe["class_weights"] == [["dog", 4.0]]
    with pytest.raises(ValueError, match="another recipe.*fg_weight: checkpoint 2.0, now 0.0"):
        dit.main(["--out", str(out), "--n-train", "40", "--depth", "1", "--batch", "4", "--steps", "2",
                  "--class-weights", "dog=4"])  # fmt: skip
    with pytest.raises(SystemExit):  # an unknown class is refused before anything is loaded
        dit.main(["--out", str(out), "--class-weights", "cat=2"])
