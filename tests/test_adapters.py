"""Adapters know their base: ControlNet and LoRA training records name the U-Net they were
trained on (``base_fingerprint``), and loading one into another U-Net is refused."""

import copy
import json
import shutil
import warnings

import numpy as np
import pytest
import torch

from difstudy import gate
from difstudy.errors import DifstudyError
from difstudy.extract import module_fingerprint
from difstudy.gate.techniques import (
    MINI_CONTROLNET_PATH,
    MINI_LORA_PATH,
    TRAINING_RECORD,
    _has_peft_layers,
    base_fingerprint,
    base_record,
    check_adapter_base,
    recorded_command,
)
from difstudy.models import load
from difstudy.models.tiny import with_random_unet

OTHER = "0123456789ab"  # a fingerprint no U-Net here has


@pytest.fixture(scope="module")
def mini():
    return load("mini")


def _copy_with_record(src, dst, **changes):
    """``src`` adapter folder copied to ``dst`` with its record's keys changed (None: removed)."""
    shutil.copytree(src, dst)
    record = json.loads((dst / TRAINING_RECORD).read_text())
    for k, v in changes.items():
        if v is None:
            record.pop(k, None)
        else:
            record[k] = v
    (dst / TRAINING_RECORD).write_text(json.dumps(record))
    return dst


# ----------------------------------------------------------------------------
# the record: what base_record writes, on a tiny model (fast)
def test_base_record_fingerprints_the_unet_in_each_dtype(tiny_sd15):
    unet = tiny_sd15.unet
    rec = base_record(unet)
    fp32 = module_fingerprint(unet)
    assert rec["base_fingerprint"] == rec["base_fingerprint_by_dtype"]["float32"] == fp32
    assert base_fingerprint(unet) == fp32  # no adapters: the plain module fingerprint
    assert rec["base_dtype"] == "float32"
    # the cast view gives what a real cast copy (a pipeline loaded in that dtype) has
    for name, dt in (("float16", torch.float16), ("bfloat16", torch.bfloat16)):
        assert rec["base_fingerprint_by_dtype"][name] == module_fingerprint(copy.deepcopy(unet).to(dt))
    assert len(set(rec["base_fingerprint_by_dtype"].values())) == 3
    # a float16 base records only its own dtype (it cannot be cast up to its float32 original)
    half = base_record(copy.deepcopy(unet).to(torch.float16))
    assert half["base_dtype"] == "float16" and set(half["base_fingerprint_by_dtype"]) == {"float16"}
    assert half["base_fingerprint"] == rec["base_fingerprint_by_dtype"]["float16"]


def test_recorded_command_rebuilds_the_training_options():
    record = json.loads((MINI_LORA_PATH / TRAINING_RECORD).read_text())
    cmd = recorded_command("lora", record)
    assert cmd.startswith("python -m difstudy.train.lora ")
    assert "--model mini" in cmd and "--steps 800" in cmd and "--n-train 1000" in cmd
    assert "base" not in cmd and "wall" not in cmd and "target" not in cmd  # not options
    assert recorded_command("controlnet", {"base_fingerprint": OTHER}) == gate.TRAIN_COMMANDS["controlnet"]


def test_adapter_without_record_or_fingerprint_is_not_checked(tiny_sd15, tmp_path):
    (tmp_path / "plain").mkdir()
    check_adapter_base("controlnet", tmp_path / "plain", tiny_sd15.unet)  # no record
    check_adapter_base("lora", "org/name", tiny_sd15.unet)  # a hub id
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / TRAINING_RECORD).write_text(json.dumps({"model": "mini"}))  # predates the field
    check_adapter_base("controlnet", tmp_path / "old", tiny_sd15.unet)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / TRAINING_RECORD).write_text("{not json")
    with pytest.raises(DifstudyError, match="not readable JSON"):
        check_adapter_base("controlnet", tmp_path / "bad", tiny_sd15.unet)


def test_dtype_without_recorded_fingerprint_warns_and_loads(tiny_sd15, tmp_path):
    (tmp_path / "a").mkdir()
    record = {"model": "tiny-sd15", "base_fingerprint": module_fingerprint(tiny_sd15.unet)}
    (tmp_path / "a" / TRAINING_RECORD).write_text(json.dumps(record))
    half = copy.deepcopy(tiny_sd15.unet).to(torch.float16)
    with pytest.warns(UserWarning, match="without the check"):
        check_adapter_base("controlnet", tmp_path / "a", half)
    check_adapter_base("controlnet", tmp_path / "a", tiny_sd15.unet)  # float32: checked, and right


# ----------------------------------------------------------------------------
# the committed mini adapters on the mini model
@pytest.mark.slow
def test_committed_records_name_the_committed_mini_unet(mini):
    fp = module_fingerprint(mini.unet)
    for folder in (MINI_CONTROLNET_PATH, MINI_LORA_PATH):
        record = json.loads((folder / TRAINING_RECORD).read_text())
        assert record["base_fingerprint"] == fp, folder
        assert record["base_fingerprint_by_dtype"]["float32"] == fp


@pytest.mark.slow
def test_committed_adapters_load_into_the_mini_pipeline(mini):
    assert gate.load_controlnet("mini", unet=mini.unet) is not None
    # two LoRA techniques: the second is checked against the bare U-Net, not the one carrying the first
    techs = [
        gate.Technique("cn", controlnet="mini"),
        gate.Technique("lora", lora="mini"),
        gate.Technique("lora2", lora="mini"),
    ]
    with gate.GateExtractor(mini, ["unet-out"], techs) as ex:
        assert len(ex.controlnets) == 1 and len(ex.adapters) == 2
    assert not _has_peft_layers(mini.unet)


@pytest.mark.slow
def test_unfused_loras_do_not_count_and_a_fused_one_does():
    """An unfused LoRA leaves the U-Net's own fingerprint as it was, so a second direct load_lora
    passes; fusing one changes the weights, and the check sees it."""
    pipe = load("mini")  # its own: fusing and unfusing does not restore the weights bit for bit
    bare = module_fingerprint(pipe.unet)
    gate.load_lora(pipe, "mini", "a")
    assert module_fingerprint(pipe.unet) != bare and base_fingerprint(pipe.unet) == bare
    gate.load_lora(pipe, "mini", "b")
    pipe.unet.fuse_lora(adapter_names=["a"])
    fused = base_fingerprint(pipe.unet)
    assert fused != bare
    with pytest.raises(DifstudyError, match=f"{bare}.*{fused}"):
        gate.load_lora(pipe, "mini", "c")


@pytest.mark.slow
def test_committed_adapters_load_into_the_half_precision_mini():
    half = load("mini", dtype="fp16")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # checked (a recorded float16 fingerprint), not skipped
        gate.load_controlnet("mini", dtype=torch.float16, unet=half.unet)
        gate.load_lora(half, "mini", "x")
    assert _has_peft_layers(half.unet)


@pytest.mark.slow
def test_record_naming_another_unet_is_refused(mini, tmp_path):
    fp = module_fingerprint(mini.unet)
    other = dict(base_fingerprint=OTHER, base_fingerprint_by_dtype={"float32": OTHER})
    cn = _copy_with_record(MINI_CONTROLNET_PATH, tmp_path / "cn", **other)
    with pytest.raises(DifstudyError) as e:
        gate.load_controlnet(cn, unet=mini.unet)
    msg = str(e.value)
    assert OTHER in msg and fp in msg and str(cn) in msg
    assert "python -m difstudy.train.controlnet --model mini" in msg  # the fix: the recorded command
    gate.load_controlnet(cn)  # without a U-Net to check against it loads as before

    lora = _copy_with_record(MINI_LORA_PATH, tmp_path / "lora", **other)
    for source in (lora, lora / "pytorch_lora_weights.safetensors"):  # the folder, or its weights file
        with pytest.raises(DifstudyError, match=f"{OTHER}.*{fp}"):
            gate.load_lora(mini, str(source), "x")
        assert not _has_peft_layers(mini.unet)  # refused before anything was loaded
    with pytest.raises(DifstudyError, match=OTHER):
        gate.GateExtractor(mini, ["unet-out"], [gate.Technique("l", lora=str(lora))])


@pytest.mark.slow
def test_random_weight_unet_is_refused_for_the_mini_adapters(mini, tmp_path):
    rnd = with_random_unet(mini, seed=0)
    fp, trained_on = module_fingerprint(rnd.unet), module_fingerprint(mini.unet)
    assert fp != trained_on
    for tq in (gate.Technique("cn", controlnet="mini"), gate.Technique("lora", lora="mini")):
        with pytest.raises(DifstudyError, match=f"{trained_on}.*{fp}"):
            gate.GateExtractor(rnd, ["unet-out"], [tq])
        assert not _has_peft_layers(rnd.unet)
    # the same weights without the fingerprint in their record load as before
    plain = _copy_with_record(
        MINI_CONTROLNET_PATH, tmp_path / "cn", base_fingerprint=None, base_fingerprint_by_dtype=None
    )
    with gate.GateExtractor(rnd, ["unet-out"], [gate.Technique("cn", controlnet=str(plain))]) as ex:
        assert len(ex.controlnets) == 1


# ----------------------------------------------------------------------------
# the training scripts write the record (one step on tiny-sd15)
@pytest.mark.parametrize("kind", ["controlnet", "lora"])
def test_training_scripts_record_their_base_unet(kind, tiny_sd15, tmp_path):
    import importlib

    script = importlib.import_module(f"difstudy.train.{kind}")
    args = ["--model", "tiny-sd15", "--n-train", "4", "--batch", "2", "--steps", "1", "--threads", "1"]
    script.main([*args, "--out", str(tmp_path / "run"), "--export", str(tmp_path / "exp")])
    record = json.loads((tmp_path / "exp" / TRAINING_RECORD).read_text())
    assert record["base_fingerprint"] == module_fingerprint(load("tiny-sd15").unet)  # the bare U-Net
    assert record["base_fingerprint_by_dtype"] == base_record(tiny_sd15.unet)["base_fingerprint_by_dtype"]
    if kind == "controlnet":  # trained on the official OpenCV Canny edges, and fed them again
        assert record["canny"] == "opencv" and gate.trained_canny(str(tmp_path / "exp")) == "opencv"
        data = np.load(tmp_path / "run" / "data.npz")
        assert np.array_equal(data["edges"][0], gate.canny_edges(data["images"][0], "opencv"))
    tq = gate.Technique("t", **{kind: str(tmp_path / "exp")})
    with gate.GateExtractor(tiny_sd15, ["unet-out"], [tq]):
        pass
    with pytest.raises(DifstudyError, match=record["base_fingerprint"]):
        gate.GateExtractor(with_random_unet(tiny_sd15, seed=7), ["unet-out"], [tq])
