"""GATE, step 2: generation techniques, their ControlNet and LoRA weights, and fine captions.

**Techniques** are conditioning variants of the one extraction protocol
(:class:`Technique`): a prompt rule (``empty``, ``generic``, ``fine``,
``text:<prompt>``; real data get fine captions from a CSV with
:func:`with_captions`), optionally a ControlNet fed the image's Canny edges
(:func:`control_images`; its residuals are added to the U-Net as
``down_block_additional_residuals`` / ``mid_block_additional_residual``),
optionally a LoRA adapter (diffusers/peft format). This module loads and checks
their weights (:func:`load_controlnet`, :func:`load_lora`, :func:`technique_status`);
:mod:`difstudy.gate.features` extracts the techniques' features.
"""

from __future__ import annotations

import csv
import hashlib
import os
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from ..errors import DifstudyError, ModelNotFoundError
from ..extract import prompt_for
from .scores import edge_map, resize_uint8

MODELS_DIR = Path(__file__).parent.parent / "models"
MINI_CONTROLNET_PATH = MODELS_DIR / "difstudy-mini-canny"
MINI_LORA_PATH = MODELS_DIR / "difstudy-mini-lora-checkered"
CONTROLNET_ALIASES = {
    "sd15-canny": "lllyasviel/sd-controlnet-canny",  # what the official GATE code uses for SD1.5
    "sdxl-canny": "diffusers/controlnet-canny-sdxl-1.0",  # ... and for SDXL
}


def control_images(images: Sequence[np.ndarray], size: int, sigma: float = 1.0) -> torch.Tensor:
    """ControlNet conditions: Canny edges of each image at ``size`` px as (B, 3, size, size) in {0, 1}."""
    e = np.stack([edge_map(resize_uint8(im, size), sigma) for im in images]).astype(np.float32)
    return torch.from_numpy(e)[:, None].expand(-1, 3, -1, -1).contiguous()


# -- techniques, ControlNets and LoRAs -----------------------------------------------
@dataclass(frozen=True)
class Technique:
    """A generation technique as an extraction variant.

    name: unique label (``basic``, ``fine``, ``controlnet``, ``lora`` ...).
    prompt: prompt rule of :func:`difstudy.extract.prompt_for` (``empty``, ``generic``,
        ``fine``, ``text:<prompt>``).
    controlnet: ``None``, a ``ControlNetModel``, ``"mini"`` (the committed mini canny
        ControlNet), an alias (``sd15-canny``, ``sdxl-canny``), a hub id or a folder.
    lora: ``None``, ``"mini"`` (the committed mini LoRA), or a diffusers/peft LoRA
        folder, file or hub id (its U-Net part is used).
    conditioning_scale: ControlNet residual scale (1 as in the official code).
    canny_sigma: Gaussian sigma of the Canny edge detector for the ControlNet condition.
    """

    name: str
    prompt: str = "empty"
    controlnet: Any = None
    lora: str | os.PathLike | None = None
    conditioning_scale: float = 1.0
    canny_sigma: float = 1.0

    def __post_init__(self):
        if not self.name or "|" in self.name or "/" in self.name:
            raise DifstudyError(f"technique name {self.name!r} must be non-empty without '|' or '/'")
        prompt_for(self.prompt, {"generic": "x", "fine": "x"})  # validates the rule


BASIC = Technique("basic")


def _weights_digest(tensors) -> str:
    h = hashlib.sha1()
    for name, p in tensors:
        h.update(name.encode())
        h.update(p.detach().flatten()[::997].float().cpu().numpy().tobytes())
    return h.hexdigest()[:8]


def load_controlnet(name_or_path, dtype=None, device=None):
    """A diffusers ``ControlNetModel`` from a built-in name, alias, hub id or folder (see :class:`Technique`)."""
    from diffusers import ControlNetModel

    if isinstance(name_or_path, ControlNetModel):
        cn = name_or_path
    else:
        name = str(name_or_path)
        kw = {"torch_dtype": dtype} if dtype is not None else {}
        path = MINI_CONTROLNET_PATH if name == "mini" else Path(name).expanduser()
        if name == "mini" or path.exists() or name.startswith((".", "/", "~")):
            if not path.is_dir():
                hint = " Train it with `python -m difstudy.train.controlnet`." if name == "mini" else ""
                raise ModelNotFoundError(f"ControlNet folder {str(path)!r} does not exist.{hint}")
            if not (path / "config.json").exists():
                found = sorted(p.name for p in path.iterdir())[:10]
                raise ModelNotFoundError(
                    f"{str(path)!r} is not a diffusers ControlNet folder: config.json is missing (found: {found}). "
                    "Expected config.json and diffusion_pytorch_model.safetensors, as written by "
                    "`controlnet.save_pretrained(folder)` or `huggingface-cli download ID --local-dir folder`."
                )
            try:
                cn = ControlNetModel.from_pretrained(str(path), local_files_only=True, **kw)
            except (OSError, ValueError) as e:
                raise ModelNotFoundError(f"could not load the ControlNet folder {str(path)!r}: {e}") from None
        elif "/" in CONTROLNET_ALIASES.get(name, name):
            repo = CONTROLNET_ALIASES.get(name, name)
            try:
                cn = ControlNetModel.from_pretrained(repo, **kw)
            except Exception as e:  # hub/network errors come in many types
                reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
                raise ModelNotFoundError(
                    f"could not load the ControlNet {repo!r} from the Hugging Face hub or its local cache: {reason}. "
                    f"On a machine with network run `huggingface-cli download {repo} --local-dir DIR` and pass DIR."
                ) from None
        else:
            raise ModelNotFoundError(
                f"unknown ControlNet {name!r}: use 'mini', an alias ({', '.join(CONTROLNET_ALIASES)}), "
                "a hub id (org/name) or an existing folder"
            )
    if (dtype is not None and cn.dtype != dtype) or (device is not None and cn.device != torch.device(device)):
        cn = cn.to(device=device, dtype=dtype)
    return cn.eval().requires_grad_(False)


def build_controlnet(pipe):
    """A new ControlNet initialised from the pipeline's U-Net (``ControlNetModel.from_unet``), its
    condition encoder downsampling by the VAE factor (4 for the mini model, 8 for SD)."""
    from diffusers import ControlNetModel

    from ..models import vae_scale_factor

    levels = int(np.log2(vae_scale_factor(pipe))) + 1
    channels = (16, 32, 96, 256, 256)[:levels]
    return ControlNetModel.from_unet(pipe.unet, conditioning_embedding_out_channels=channels)


def _check_controlnet(cn, unet, label: str) -> None:
    for key in ("block_out_channels", "cross_attention_dim", "in_channels"):
        a, b = getattr(cn.config, key), getattr(unet.config, key)
        if (tuple(a) if isinstance(a, (list, tuple)) else a) != (tuple(b) if isinstance(b, (list, tuple)) else b):
            raise DifstudyError(
                f"ControlNet of technique {label!r} has {key}={a}, the pipeline's U-Net {key}={b}: "
                "use a ControlNet made for this model family (e.g. sd15-canny for SD1.5)"
            )


def _lora_source(lora) -> str:
    if str(lora) == "mini":
        if not MINI_LORA_PATH.is_dir():
            raise ModelNotFoundError(
                f"the mini LoRA is missing from {MINI_LORA_PATH}; train it with `python -m difstudy.train.lora`"
            )
        return str(MINI_LORA_PATH)
    p = Path(str(lora)).expanduser()
    if p.exists():
        return str(p)
    if str(lora).startswith((".", "/", "~")) or str(lora).count("/") != 1:
        raise ModelNotFoundError(
            f"LoRA {str(lora)!r} does not exist: pass 'mini', a folder holding pytorch_lora_weights.safetensors "
            "(as written by `StableDiffusionPipeline.save_lora_weights`), a .safetensors file or a hub id (org/name)"
        )
    return str(lora)


def load_lora(pipe, lora, adapter_name: str) -> str:
    """Load the U-Net part of a diffusers/peft LoRA into ``pipe.unet`` as ``adapter_name``;
    returns a digest of its weights. Remove it with ``pipe.unet.delete_adapters(adapter_name)``."""
    src = _lora_source(lora)
    kw = {}
    if Path(src).is_file():
        kw = {"weight_name": Path(src).name}
        src = str(Path(src).parent)
    try:
        got = pipe.lora_state_dict(src, **kw)
    except Exception as e:
        raise ModelNotFoundError(f"could not read the LoRA {str(lora)!r}: {str(e).splitlines()[0][:200]}") from None
    state, alphas = got[0], got[1]
    unet_keys = [k for k in state if k.startswith("unet.")]
    if not unet_keys:
        raise DifstudyError(f"LoRA {str(lora)!r} holds no U-Net weights (keys start with {sorted(state)[:3]})")
    digest = _weights_digest(sorted((k, state[k]) for k in unet_keys))
    pipe.load_lora_into_unet(state, alphas, pipe.unet, adapter_name=adapter_name, _pipeline=pipe)
    pipe.unet.enable_lora()
    return digest


@contextmanager
def _adapter_rows(unet, names: list[str] | None):
    """Route each batch row through its own LoRA adapter (peft mixed-adapter batches)."""
    if names is None:
        yield
        return
    from peft.tuners.lora import LoraLayer

    def hook(module, args, kwargs):
        return args, {**kwargs, "adapter_names": names}

    handles = [m.register_forward_pre_hook(hook, with_kwargs=True) for m in unet.modules() if isinstance(m, LoraLayer)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _has_peft_layers(unet) -> bool:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return any(isinstance(m, BaseTunerLayer) for m in unet.modules())


def _remove_adapters(unet, names: list[str], keep_layers: bool) -> None:
    """Delete ``names``; without other adapters (``keep_layers`` False) unload the peft layers too."""
    if keep_layers:
        unet.delete_adapters(names)
    else:
        unet.unload_lora()


# -- real data: fine-grained captions from a CSV ------------------------------------
def read_captions(path: str | os.PathLike) -> dict[str, str]:
    """``{image_id: caption}`` from a CSV with the header ``image_id,caption``."""
    p = Path(path)
    if not p.is_file():
        raise DifstudyError(f"caption file {str(p)!r} does not exist; expected a CSV with columns image_id,caption")
    with open(p, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or not {"image_id", "caption"} <= set(reader.fieldnames):
            raise DifstudyError(
                f"caption file {str(p)!r} has columns {reader.fieldnames}; it needs a header image_id,caption"
            )
        return {row["image_id"]: row["caption"] for row in reader}


class with_captions:  # noqa: N801 - used like a function
    """A dataset view whose items carry fine-grained captions from a CSV (``image_id,caption``).

    ``extract(..., variants=["fine"])`` and ``Technique("fine", prompt="fine")`` then read the
    user's captions: ``ds = with_captions(load_dataset("spair", root), "captions.csv")``.
    Items become dicts (``image_id``, ``image``, ``caption``, ``fine_caption`` and the item's
    other fields); an image without a caption is an error naming it. The cache keys these
    features ``fine``: keep one caption file per cache folder."""

    def __init__(self, dataset, path: str | os.PathLike):
        self.dataset, self.path = dataset, str(path)
        self.captions = read_captions(path)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict:
        s = self.dataset[i]
        d = dict(s) if isinstance(s, dict) else {k: getattr(s, k) for k in s.__dataclass_fields__}
        if "caption" not in d:
            d["caption"] = None
        iid = str(d["image_id"])
        if iid not in self.captions:
            raise DifstudyError(f"image {iid!r} has no caption in {self.path!r}; add a row '{iid},<caption>'")
        d["fine_caption"] = self.captions[iid]
        return d


# -- which techniques' weights can be found -----------------------------------------
TRAIN_COMMANDS = {
    "controlnet": (
        "python -m difstudy.train.controlnet --model mini --out runs/controlnet "
        f"--export {MINI_CONTROLNET_PATH.relative_to(MODELS_DIR.parent.parent)}"
    ),
    "lora": (
        "python -m difstudy.train.lora --model mini --background checkered --out runs/lora "
        f"--export {MINI_LORA_PATH.relative_to(MODELS_DIR.parent.parent)}"
    ),
}


def technique_status(techniques: Sequence[Technique]) -> pd.DataFrame:
    """Whether each technique's weights can be found: columns ``technique, available, reason,
    how_to_get``. Nothing is loaded into a pipeline (a ControlNet given by hub id is read from the
    hub cache, or downloaded, to check it)."""
    rows = []
    for tq in techniques:
        reason, how = "", ""
        try:
            if tq.controlnet is not None and not hasattr(tq.controlnet, "config"):
                if str(tq.controlnet) == "mini":
                    if not (MINI_CONTROLNET_PATH / "config.json").exists():
                        raise ModelNotFoundError(f"the mini ControlNet is missing from {MINI_CONTROLNET_PATH}")
                else:
                    load_controlnet(tq.controlnet)
            if tq.lora is not None:
                _lora_source(tq.lora)
        except ModelNotFoundError as e:
            reason = str(e)
            how = TRAIN_COMMANDS["controlnet" if tq.controlnet is not None else "lora"]
            if str(tq.controlnet if tq.controlnet is not None else tq.lora) != "mini":
                how = "pass an existing ControlNet/LoRA (folder or hub id) as the technique's parameter"
        rows.append(dict(technique=tq.name, available=not reason, reason=reason, how_to_get=how))
    return pd.DataFrame(rows, columns=["technique", "available", "reason", "how_to_get"])
