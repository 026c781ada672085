import csv
import json
import shlex
import subprocess
import sys

import numpy as np
import pytest
import torch

from difstudy.catalog import Catalog
from difstudy.errors import ModelNotFoundError
from difstudy.models import MINI_PATH, load


def test_tiny_models_are_seeded_and_identical():
    a, b = load("tiny-sd15"), load("tiny-sd15")
    for (n, p), (_, q) in zip(a.unet.named_parameters(), b.unet.named_parameters()):
        assert torch.equal(p, q), n
    assert torch.equal(a.text_encoder.get_input_embeddings().weight, b.text_encoder.get_input_embeddings().weight)


def test_tiny_tokenizer_holds_the_toy_world_vocabulary():
    """The tiny models' word list is written out in difstudy.models.tiny (the models layer does not
    import the dataset): it stays the toy world's caption vocabulary, each word one token."""
    from difstudy.data.toyworld import vocabulary
    from difstudy.models.tiny import TINY_WORDS, build_tiny

    assert TINY_WORDS == tuple(vocabulary())
    tok = load("tiny-sd15").tokenizer
    assert all(len(tok(w, add_special_tokens=False).input_ids) == 1 for w in TINY_WORDS)
    other = build_tiny("tiny-sd15", words=["zebra"]).tokenizer  # a caller may pass its own words
    assert len(other("zebra", add_special_tokens=False).input_ids) == 1 and len(other) < len(tok)


def test_tiny_layouts_match_the_real_ones():
    sd21, xl = load("tiny-sd21"), load("tiny-sdxl")
    assert sd21.unet.config.cross_attention_dim == 1024 and sd21.unet.config.use_linear_projection
    assert sd21.scheduler.config.prediction_type == "v_prediction"
    assert [b.attentions[0].transformer_blocks[0].attn1.heads for b in sd21.unet.down_blocks[:3]] == [5, 10, 20]
    assert xl.unet.config.addition_embed_type == "text_time" and xl.unet.config.cross_attention_dim == 2048
    assert [len(b.attentions[0].transformer_blocks) for b in xl.unet.down_blocks[1:]] == [2, 10]
    assert len(xl.unet.mid_block.attentions[0].transformer_blocks) == 10
    assert type(xl).__name__ == "StableDiffusionXLPipeline"


def test_fp16_conversion():
    p = load("tiny-sd15", dtype="fp16")
    assert p.unet.dtype == torch.float16
    with pytest.raises(ValueError, match="unknown dtype"):
        load("tiny-sd15", dtype="fp8")


def test_mini_loads_offline_with_the_sd15_catalogue():
    assert (MINI_PATH / "model_index.json").exists(), "the committed mini model is missing"
    pipe = load("mini")
    assert type(pipe).__name__ == "StableDiffusionPipeline"
    assert len(Catalog(pipe.unet)) == 197
    assert pipe.unet.config.sample_size == 16 and pipe.vae.config.latent_channels == 4
    ids = pipe.tokenizer("a photo of a bird").input_ids
    assert len(ids) == 7  # every caption word is one token
    size = sum(f.stat().st_size for f in MINI_PATH.rglob("*") if f.is_file())
    assert size < 60e6


@pytest.mark.parametrize(
    "name,match",
    [
        ("/nonexistent/model", "does not exist"),
        ("tiny-sd51", "unknown model 'tiny-sd51'.*tiny-sd15"),
        ("no-such-org/no-such-model", "huggingface-cli download no-such-org/no-such-model"),
    ],
)
def test_bad_model_names_are_clear(name, match):
    with pytest.raises(ModelNotFoundError, match=match):
        load(name)


def test_folder_without_model_index(tmp_path):
    (tmp_path / "unet").mkdir()
    with pytest.raises(ModelNotFoundError, match="model_index.json is missing"):
        load(str(tmp_path))


def test_saved_pipeline_folder_round_trips(tmp_path):
    p = load("tiny-sd15")
    p.save_pretrained(tmp_path / "m")
    q = load(str(tmp_path / "m"))
    assert torch.equal(next(p.unet.parameters()), next(q.unet.parameters()))


def test_unet_recipe_loss_weights_are_min_snr_gamma():
    from difstudy.train.mini import UNetRecipe

    snr = torch.tensor([0.5, 5.0, 20.0])
    v = UNetRecipe(snr_gamma=5.0).loss_weights(snr, "v_prediction")
    assert torch.allclose(v, torch.tensor([0.5 / 1.5, 5 / 6, 5 / 21]))
    eps = UNetRecipe(snr_gamma=5.0).loss_weights(snr, "epsilon")
    assert torch.allclose(eps, torch.tensor([1.0, 1.0, 0.25]))
    assert UNetRecipe().snr_gamma == 1.0
    assert torch.equal(UNetRecipe(snr_gamma=0).loss_weights(snr, "v_prediction"), torch.ones(3))


def test_training_smoke_loss_goes_down_and_resumes(tmp_path):
    from difstudy.train import mini as train_mini

    args = [
        "--out",
        str(tmp_path),
        "--n-train",
        "64",
        "--batch",
        "8",
        "--vae-steps",
        "40",
        "--unet-steps",
        "40",
        "--vae-full-steps",
        "10",
        "--ckpt-every",
        "20",
        "--snapshot-every",
        "20",
        "--threads",
        "1",
    ]
    args += ["--vae-lr", "3e-3", "--unet-lr", "3e-3"]
    train_mini.main(args + ["--export", str(tmp_path / "export")])
    rows = list(csv.DictReader(open(tmp_path / "log.csv")))
    for stage in ("vae", "unet"):
        loss = [float(r["loss"]) for r in rows if r["stage"] == stage]
        assert len(loss) == 40
        assert sum(loss[-10:]) < sum(loss[:10]), stage
    assert (tmp_path / "export" / "training_log.csv").exists()
    assert sorted(p.name for p in (tmp_path / "snapshots").glob("unet_*")) == [
        "unet_000020.safetensors",
        "unet_000040.safetensors",
    ]
    cpu = [float(r["cpu_seconds"]) for r in rows]
    assert cpu == sorted(cpu) and cpu[-1] > 0
    pipe = load(str(tmp_path / "export"))
    assert len(Catalog(pipe.unet)) == 197
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    # a rerun with more steps resumes from the checkpoint instead of starting over
    train_mini.main(args[:-8] + ["--unet-steps", "50", "--vae-lr", "3e-3", "--unet-lr", "3e-3"])
    rows = list(csv.DictReader(open(tmp_path / "log.csv")))
    assert [int(r["step"]) for r in rows if r["stage"] == "unet"][-10:] == list(range(41, 51))
    # resuming that checkpoint with another recipe is refused by name, and nothing is written
    with pytest.raises(ValueError, match="another recipe .*snr_gamma: checkpoint 1.0, now 5.0.*new --out"):
        train_mini.main(args[:-8] + ["--unet-steps", "60", "--vae-lr", "3e-3", "--unet-lr", "3e-3", "--snr-gamma", "5"])
    assert list(csv.DictReader(open(tmp_path / "log.csv"))) == rows

    # --init-from continues the exported model: same VAE, U-Net starts from its weights, the log
    # and snapshots count total steps, and the exported record says so
    cont = tmp_path / "cont"
    before = load(str(tmp_path / "export"))
    train_mini.main(
        ["--out", str(cont), "--n-train", "64", "--batch", "8", "--unet-steps", "6", "--ckpt-every", "3"]
        + ["--snapshot-every", "3", "--threads", "1", "--init-from", str(tmp_path / "export")]
        + ["--export", str(cont / "export"), "--noise-offset", "0.1", "--fg-weight", "4", "--pooled-text"]
        + ["--pooled-text-gain", "0.1"]
        + ["--only-backgrounds", "plain,gradient", "--class-weights", "dog=4", "--freeze-text-encoder"]
    )
    after = load(str(cont / "export"))
    vae_a, vae_b = before.vae.state_dict(), after.vae.state_dict()
    assert all(torch.equal(vae_a[k], vae_b[k]) for k in vae_a)
    te_a, te_b = before.text_encoder.state_dict(), after.text_encoder.state_dict()
    assert all(torch.equal(te_a[k], te_b[k]) for k in te_a)  # --freeze-text-encoder kept it
    moved = [not torch.equal(p, q) for p, q in zip(before.unet.parameters(), after.unet.parameters())]
    assert any(moved)
    head = list(csv.DictReader(open(tmp_path / "export" / "training_log.csv")))
    crows = list(csv.DictReader(open(cont / "export" / "training_log.csv")))
    assert crows[: len(head)] == head  # the continued model's log is the head
    assert [int(r["step"]) for r in crows if r["stage"] == "unet"][-6:] == list(range(41, 47))
    assert sorted(p.name for p in (cont / "snapshots").glob("unet_*")) == [
        "unet_000043.safetensors",
        "unet_000046.safetensors",
    ]
    meta = json.loads((cont / "export" / "difstudy_training.json").read_text())
    assert meta["total_unet_steps"] == 46 and meta["previous_run"]["unet_steps"] == 40
    assert meta["noise_offset"] == 0.1 and meta["previous_run"]["noise_offset"] == 0.0 and meta["fg_weight"] == 4
    assert meta["only_backgrounds"] == "plain,gradient" and meta["pooled_text_gain"] == 0.1
    assert meta["class_weights"] == "dog=4" and meta["freeze_text_encoder"] is True
    assert meta["previous_run"]["freeze_text_encoder"] is False
    # the record replays as the chain of commands that made it, each parsing back to its run's options
    commands = train_mini.reproduce_commands(meta)
    assert len(commands) == 2 and "--init-from" not in commands[0] and "--vae-steps" not in commands[1]
    for command, run in zip(commands, (meta["previous_run"], meta)):
        parsed = vars(train_mini.build_parser().parse_args(shlex.split(command)[3:]))
        for key, value in run.items():
            if key in ("out", "export", "init_from"):
                assert str(parsed[key]) == str(value), key
            elif key in parsed and not (run.get("init_from") and key.startswith("vae_")):
                assert parsed[key] == value, key
    runs = train_mini.training_runs(meta)  # the card's table: one column per run, oldest first
    assert list(runs.columns) == [f"1: {tmp_path}", f"2: {cont}"]
    assert runs.loc["vae_steps"].tolist() == ["40", "kept"] and runs.loc["pooled_text_gain"].tolist()[1] == "0.1"
    assert before.unet.config.addition_embed_type is None  # pure SD1.5 layout by default
    assert after.unet.config.addition_embed_type == "text"  # --pooled-text added the embedding

    # the continuation's snapshots add to the curve already beside the weights (a re-evaluated
    # step is replaced, earlier steps stay)
    from difstudy.train import evaluate

    model = cont / "export"
    old = "step,recognised,n,ci95_low,ci95_high\n40,0.5,999,0.4,0.6\n43,0.5,999,0.4,0.6\n"
    (model / "recognition_curve.csv").write_text(old)
    evaluate.main(["--run", str(cont), "--model", str(model), "--per-class", "1", "--threads", "1"])
    curve = list(csv.DictReader(open(model / "recognition_curve.csv")))
    assert [(int(r["step"]), int(r["n"])) for r in curve] == [(40, 999), (43, 10), (46, 10)]
    # --prompt-effect adds the class prompt's effect per snapshot (empty for the older rows)
    evaluate.main(["--run", str(cont), "--model", str(model), "--per-class", "1", "--threads", "1", "--prompt-effect"])
    curve = list(csv.DictReader(open(model / "recognition_curve.csv")))
    assert [r["other_over_own"] != "" for r in curve] == [False, True, True]
    from difstudy.card import prompt_effect

    effect = prompt_effect(load(str(model))).loc["mean"]  # the last snapshot: the exported EMA weights, fp16
    assert float(curve[-1]["loss_own_class"]) == pytest.approx(effect["own class"], rel=1e-2)
    assert float(curve[-1]["other_over_own"]) == pytest.approx(effect["other / own"], rel=1e-2)
    # --only-steps re-evaluates just those snapshots; a step without a snapshot is named with the ones there
    evaluate.main(
        ["--run", str(cont), "--model", str(model), "--per-class", "2", "--threads", "1", "--only-steps", "43"]
    )
    curve = list(csv.DictReader(open(model / "recognition_curve.csv")))
    assert [(int(r["step"]), int(r["n"])) for r in curve] == [(40, 999), (43, 20), (46, 10)]
    with pytest.raises(ValueError, match=r"no snapshot at step\(s\) \[44\].*it has \[43, 46\]"):
        evaluate.main(["--run", str(cont), "--model", str(model), "--only-steps", "44"])


def test_class_weights_parse_and_steer_the_class_draw():
    from difstudy.train.common import balanced_draw, class_draw_weights, class_pools, parse_class_weights

    assert parse_class_weights("") is None
    assert parse_class_weights("dog=4, bird=0.5") == (("dog", 4.0), ("bird", 0.5))
    for bad, match in (
        ("dgo=4", "'dgo=4'.*a class of bird"),
        ("dog", "expected <class>=<weight>"),
        ("dog=0", "positive"),
    ):
        with pytest.raises(ValueError, match=match):
            parse_class_weights(bad)
    for bad in ("dog=x", "dog=nan", "dog=inf"):
        with pytest.raises(ValueError, match="positive number"):
            parse_class_weights(bad)
    labels = np.repeat(np.arange(10), 5)
    keep = labels != 1  # fish held out: its pool is absent, the weights follow the pools present
    data = dict(labels=labels)
    pools = class_pools(data, keep)
    weights = class_draw_weights(data, pools, parse_class_weights("dog=9,fish=100"))
    assert len(weights) == len(pools) == 9 and weights[4] == 9.0 and sum(weights) == 17.0
    assert class_draw_weights(data, pools, None) is None
    idx = balanced_draw(pools, 4000, torch.Generator().manual_seed(0), weights).numpy()
    share = np.bincount(labels[idx], minlength=10) / len(idx)
    assert share[1] == 0 and abs(share[5] - 9 / 17) < 0.03 and abs(share[0] - 1 / 17) < 0.02
    uniform = balanced_draw(pools, 4000, torch.Generator().manual_seed(0)).numpy()
    assert abs(np.bincount(labels[uniform], minlength=10)[5] / 4000 - 1 / 9) < 0.02


def test_make_data_reuses_an_older_file_unless_the_masks_are_needed(tmp_path):
    import numpy as np

    from difstudy.data.toyworld import vocabulary
    from difstudy.models import mini
    from difstudy.train.mini import make_data

    tok = mini.build_tokenizer(vocabulary())
    d = make_data(tmp_path, 4, 0, tok)
    assert d["foreground"].shape == (4, mini.IMAGE_SIZE // 4, mini.IMAGE_SIZE // 4)
    old = {k: v for k, v in d.items() if k != "foreground"}
    old["images"] = np.zeros_like(d["images"])  # marks the file as the one written here
    np.savez(tmp_path / "data.npz", **old)
    assert not make_data(tmp_path, 4, 0, tok)["images"].any()  # reused: no masks needed
    again = make_data(tmp_path, 4, 0, tok, need_foreground=True)  # --fg-weight: rendered again
    assert again["images"].any() and np.array_equal(again["foreground"], d["foreground"])


def test_pooled_text_continuation_starts_as_the_model_it_continues():
    """``--pooled-text`` on a continued U-Net: gain 0 reproduces it exactly but leaves the new
    embedding's projection without gradient; a small gain perturbs it and lets the projection learn."""
    from difstudy.models import mini
    from difstudy.train.mini import _with_pooled_text

    torch.manual_seed(0)
    old = mini.build_unet().eval()
    z, t, text = torch.randn(2, 4, 16, 16), torch.tensor([10, 700]), torch.randn(2, mini.TEXT_LENGTH, 64)
    with torch.no_grad():
        ref = old(z, t, text).sample
    for gain in (0.0, 0.1):
        new = _with_pooled_text(old, gain).eval()
        out = new(z, t, text).sample
        assert torch.equal(out, ref) if gain == 0 else not torch.allclose(out, ref)
        out.square().mean().backward()
        proj = new.add_embedding.proj.weight.grad
        assert (proj is None or not proj.any()) if gain == 0 else proj.abs().sum() > 0
    assert _with_pooled_text(new) is new  # already has it: unchanged


def test_cli_missing_model_folder_message():
    r = subprocess.run(
        [sys.executable, "-m", "difstudy", "catalog", "./no/such/folder"], capture_output=True, text=True
    )
    assert r.returncode == 2 and "does not exist" in r.stderr and "Traceback" not in r.stderr


def test_loading_with_a_dtype_prints_no_deprecation_warning():
    """diffusers deprecates ``torch_dtype``: its FutureWarning would land in every page that loads a
    model with a dtype (the rehearsal's fp32) and fail the book check."""
    import warnings

    from difstudy.models import load

    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        pipe = load("mini", dtype="fp32")
    assert pipe.unet.dtype == torch.float32


def test_training_records_are_written_whole_and_a_damaged_one_is_named(tmp_path):
    from difstudy.errors import DifstudyError
    from difstudy.models import TRAINING_RECORD, training_record, write_training_record

    assert training_record(tmp_path) is None and training_record(tmp_path / "absent") is None
    f = write_training_record(tmp_path, {"batch": 32, "recipe": {"steps": 5}})
    assert f == tmp_path / TRAINING_RECORD and training_record(tmp_path)["recipe"] == {"steps": 5}
    assert training_record(f) == training_record(tmp_path)  # a file in the folder finds it too
    assert [p.name for p in tmp_path.iterdir()] == [TRAINING_RECORD]  # no temporary file left
    f.write_text('{"batch": 3')
    with pytest.raises(DifstudyError, match=f"{TRAINING_RECORD}.*not readable JSON.*restore or delete"):
        training_record(tmp_path)
    f.write_text("[1, 2]")
    with pytest.raises(DifstudyError, match="holds list, expected a JSON object"):
        training_record(tmp_path)
