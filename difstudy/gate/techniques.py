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

import hashlib
import os
import warnings
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
from ..models import TRAINING_RECORD as TRAINING_RECORD  # re-exported: adapters' records
from ..models import training_record as training_record
from .scores import edge_map, resize_uint8

MODELS_DIR = Path(__file__).parent.parent / "models"
MINI_CONTROLNET_PATH = MODELS_DIR / "difstudy-mini-canny"
MINI_LORA_PATH = MODELS_DIR / "difstudy-mini-lora-checkered"
CONTROLNET_ALIASES = {
    "sd15-canny": "lllyasviel/sd-controlnet-canny",  # what the official GATE code uses for SD1.5
    "sdxl-canny": "diffusers/controlnet-canny-sdxl-1.0",  # ... and for SDXL
}


CANNY = ("opencv", "skimage")


def canny_edges(image: np.ndarray, detector: str = "opencv", sigma: float = 1.0) -> np.ndarray:
    """Canny edges of an RGB uint8 image as (H, W) bool.

    ``opencv``: the official GATE condition, ``cv2.Canny(image, 100, 200)`` on the RGB array
    (``feature/components/controlnet.py``, ``ControlNetCanny``); ``skimage``:
    ``skimage.feature.canny`` of the grey image with Gaussian ``sigma`` (the detector the
    committed mini ControlNet was trained with, :func:`edge_map`)."""
    if detector == "opencv":
        import cv2

        return cv2.Canny(np.ascontiguousarray(np.asarray(image, dtype=np.uint8)), 100, 200) > 0
    if detector == "skimage":
        return edge_map(image, sigma)
    raise DifstudyError(f"unknown Canny detector {detector!r}; use one of {list(CANNY)}")


def control_images(
    images: Sequence[np.ndarray], size: int, sigma: float = 1.0, detector: str = "skimage"
) -> torch.Tensor:
    """ControlNet conditions: Canny edges (:func:`canny_edges`) of each image at ``size`` px as
    (B, 3, size, size) in {0, 1}."""
    e = np.stack([canny_edges(resize_uint8(im, size), detector, sigma) for im in images]).astype(np.float32)
    return torch.from_numpy(e)[:, None].expand(-1, 3, -1, -1).contiguous()


def trained_canny(controlnet) -> str:
    """The Canny detector a ControlNet was trained with: ``canny`` of its folder's
    ``difstudy_training.json`` (``skimage`` for records that predate the field: they name only
    ``canny_sigma``); ``opencv`` for every other ControlNet (the public canny ControlNets were
    trained on OpenCV Canny edges, which the official GATE code feeds them)."""
    if controlnet is None or hasattr(controlnet, "config"):
        folder = getattr(getattr(controlnet, "config", None), "_name_or_path", None) if controlnet is not None else None
    else:
        folder = MINI_CONTROLNET_PATH if str(controlnet) == "mini" else str(controlnet)
    record = training_record(folder) if folder else None
    if record is None:
        return "opencv"
    return str(record.get("canny", "skimage" if "canny_sigma" in record else "opencv"))


# -- techniques, ControlNets and LoRAs -----------------------------------------------
@dataclass(frozen=True)
class Technique:
    """A generation technique as an extraction variant.

    Attributes:
        name: unique label (``basic``, ``fine``, ``controlnet``, ``lora`` ...).
        prompt: prompt rule of :func:`difstudy.extract.prompt_for` (``empty``, ``generic``,
            ``fine``, ``text:<prompt>``).
        controlnet: ``None``, a ``ControlNetModel``, ``"mini"`` (the committed mini canny
            ControlNet), an alias (``sd15-canny``, ``sdxl-canny``), a hub id or a folder.
        lora: ``None``, ``"mini"`` (the committed mini LoRA), or a diffusers/peft LoRA
            folder, file or hub id (its U-Net part is used).
        conditioning_scale: ControlNet residual scale (1 as in the official code).
        canny: Canny detector of the ControlNet condition (:func:`canny_edges`): ``opencv``
            (official, thresholds 100/200) or ``skimage``; None: the detector the ControlNet was
            trained with (:func:`trained_canny`).
        canny_sigma: Gaussian sigma of the ``skimage`` detector.
        denoise_span: the ControlNet denoising path (:mod:`difstudy.gate.noising`): the latent is
            noised to ``t + denoise_span`` and denoised to ``t`` by ControlNet-guided scheduler
            steps before the feature forward; None: 10 for a ControlNet technique (the official
            ``--denoising_from 60`` for features at t = 50), else 0; 0: one forward at ``t`` (the
            ControlNet's residuals added; a named alternative, labelled ``one forward``).
        noising: ``ddpm`` (forward noising, official default) or ``ddim-inversion``
            (:func:`difstudy.gate.noising.ddim_invert`; labelled in every row that uses it).
        noise_seed: added to the run seed for this technique's noise draw (the official bucket set
            extracts each technique twice "with a different random seed").
        lora_scale: the LoRA adapter's weight (peft scaling; the official set uses two weights).
    """

    name: str
    prompt: str = "empty"
    controlnet: Any = None
    lora: str | os.PathLike | None = None
    conditioning_scale: float = 1.0
    canny: str | None = None
    canny_sigma: float = 1.0
    denoise_span: int | None = None
    noising: str = "ddpm"
    noise_seed: int = 0
    lora_scale: float = 1.0

    def __post_init__(self):
        from .noising import NOISINGS

        if not self.name or "|" in self.name or "/" in self.name:
            raise DifstudyError(f"technique name {self.name!r} must be non-empty without '|' or '/'")
        prompt_for(self.prompt, {"generic": "x", "fine": "x"})  # validates the rule
        if self.canny is not None and self.canny not in CANNY:
            raise DifstudyError(
                f"technique {self.name!r}: canny must be one of {list(CANNY)} or None, got {self.canny!r}"
            )
        if self.noising not in NOISINGS:
            raise DifstudyError(
                f"technique {self.name!r}: noising must be one of {list(NOISINGS)}, got {self.noising!r}"
            )
        if self.denoise_span is not None and int(self.denoise_span) < 0:
            raise DifstudyError(f"technique {self.name!r}: denoise_span must be >= 0, got {self.denoise_span}")

    @property
    def span(self) -> int:
        """Timesteps of guided denoising before the feature forward (see ``denoise_span``)."""
        if self.denoise_span is not None:
            return int(self.denoise_span)
        return 10 if self.controlnet is not None else 0

    @property
    def own_path(self) -> bool:
        """Whether the latent at t is not the shared DDPM-noised one (a span, an inversion or
        another noise draw)."""
        return bool(self.span or self.noising != "ddpm" or self.noise_seed)

    @property
    def path_label(self) -> str:
        """How this technique's latent reaches t, for labels: empty for the official default."""
        parts = []
        if self.noising != "ddpm":
            parts.append(self.noising)
        if self.controlnet is not None and self.span == 0:
            parts.append("one forward")
        return ", ".join(parts)


BASIC = Technique("basic")


def _weights_digest(tensors) -> str:
    h = hashlib.sha1()
    for name, p in tensors:
        h.update(name.encode())
        h.update(p.detach().flatten()[::997].float().cpu().numpy().tobytes())
    return h.hexdigest()[:8]


def load_controlnet(name_or_path, dtype=None, device=None, unet=None, unet_fingerprint: str | None = None):
    """A diffusers ``ControlNetModel`` from a built-in name, alias, hub id or folder (see :class:`Technique`).

    ``unet``: the U-Net the ControlNet will feed; a folder whose ``difstudy_training.json`` records
    another base U-Net is refused (:func:`check_adapter_base`; ``unet_fingerprint``: ``unet``'s
    fingerprint when already known). Hub ControlNets and folders without a record load unchecked."""
    from diffusers import ControlNetModel

    from ..models import as_dtype, dtype_kwargs, rehearsal_device, standins

    dtype = as_dtype(dtype)  # "fp16" / "fp32" / "bf16" as for load()
    cache = standins.rehearsal_cache()
    standin = standins.standin_name(CONTROLNET_ALIASES.get(str(name_or_path), str(name_or_path)), "controlnet")
    if cache is not None:
        dtype, device = rehearsal_device(f"ControlNet {name_or_path}", dtype, device)
    if isinstance(name_or_path, ControlNetModel):
        cn = name_or_path
    elif cache is not None and standin:
        print(f"rehearsal: ControlNet {name_or_path} is a random-weight stand-in (the real {standin} layout)")
        cn = standins.standin_controlnet(standin, cache, dtype)
    else:
        name = str(name_or_path)
        kw = dtype_kwargs(dtype)
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
            if unet is not None:
                check_adapter_base("controlnet", path, unet, unet_fingerprint)
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


def load_lora(pipe, lora, adapter_name: str, unet_fingerprint: str | None = None) -> str:
    """Load the U-Net part of a diffusers/peft LoRA into ``pipe.unet`` as ``adapter_name``;
    returns a digest of its weights. Remove it with ``pipe.unet.delete_adapters(adapter_name)``.

    A LoRA whose ``difstudy_training.json`` records another base U-Net than ``pipe.unet`` is
    refused (:func:`check_adapter_base`; ``unet_fingerprint``: :func:`base_fingerprint` of
    ``pipe.unet`` when already known)."""
    src = _lora_source(lora)
    check_adapter_base("lora", src, pipe.unet, unet_fingerprint)
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
    with warnings.catch_warnings():
        # difstudy holds several adapters on purpose (one per technique variant, each batch row routed
        # through its own: _adapter_rows); peft warns at every adapter after the first that several
        # adapters will be held, which is exactly what is meant here, so that one message is not shown
        warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute", category=UserWarning)
        pipe.load_lora_into_unet(state, alphas, pipe.unet, adapter_name=adapter_name, _pipeline=pipe)
    pipe.unet.enable_lora()
    return digest


def active_adapters(unet) -> list[str]:
    """The adapters active in ``unet``'s peft layers (empty without any)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layer = next((m for m in unet.modules() if isinstance(m, BaseTunerLayer)), None)
    return list(layer.active_adapters) if layer is not None else []


@contextmanager
def only_adapter(unet, name: str, scale: float, restore: list[str] | None = None):
    """Only adapter ``name``, at ``scale``, is active inside the block; after it ``restore`` is
    active again (default: the adapters active before the block; pass them when ``name`` was just
    loaded, since peft activates a new adapter), their scales untouched (diffusers' ``set_adapters``
    sets the scale of the adapters it names only). A later ``delete_adapters(name)`` then deletes
    an inactive adapter, which peft does without a warning."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in unet.modules() if isinstance(m, BaseTunerLayer)]
    before = active_adapters(unet) if restore is None else list(restore)
    unet.set_adapters([name], [scale])
    try:
        yield
    finally:
        for m in layers:
            m.set_adapter([a for a in before if a in m.lora_A] if hasattr(m, "lora_A") else before)


def adapter_name(technique: str) -> str:
    """The peft adapter name of a technique's LoRA: ``difstudy-<name>`` with every character peft
    does not take in a module name (``.``, spaces ...) replaced by ``_`` (``lora-x0.5`` ->
    ``difstudy-lora-x0_5``)."""
    import re

    return "difstudy-" + re.sub(r"[^A-Za-z0-9_-]", "_", technique)


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


# -- adapters know their base U-Net --------------------------------------------------
_RECORD_NOT_OPTIONS = ("wall_seconds_this_invocation", "final_loss_mean_last_100", "target_modules", "trained_on")


def _dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "")


class _BaseWeights:
    """What :func:`difstudy.extract.module_fingerprint` reads of ``module`` (``config``,
    ``named_parameters``, ``named_buffers``) with unfused peft LoRA layers set aside (their
    ``lora_*`` weights dropped, ``base_layer`` names restored) and, given ``dtype``, cast as
    ``module.to(dtype)`` would; nothing is copied but the cast tensors."""

    def __init__(self, module, dtype: torch.dtype | None = None):
        self.module, self.dtype, self.config = module, dtype, module.config

    def _view(self, named):
        for name, p in named:
            parts = name.split(".")
            if any(part.startswith("lora_") for part in parts):
                continue
            if self.dtype is not None and p.is_floating_point() and p.dtype != self.dtype:
                p = p.to(self.dtype)
            yield ".".join(part for part in parts if part != "base_layer"), p

    def named_parameters(self):
        return self._view(self.module.named_parameters())

    def named_buffers(self):
        return self._view(self.module.named_buffers())


def base_fingerprint(unet, dtype: torch.dtype | None = None) -> str:
    """:func:`difstudy.extract.module_fingerprint` of ``unet``'s own weights: unfused LoRA adapters
    (peft layers) do not count, so it is the same before and after ``load_lora``; a fused LoRA
    changes the weights and the fingerprint. Without adapters and ``dtype`` it equals
    ``module_fingerprint(unet)``. ``dtype``: of the weights cast to it."""
    from ..extract import module_fingerprint

    return module_fingerprint(_BaseWeights(unet, dtype))


def base_record(unet) -> dict:
    """What an adapter's training record says about the U-Net it was trained on.

    ``base_fingerprint``: :func:`base_fingerprint` of ``unet`` (``module_fingerprint`` of the bare
    U-Net); ``base_dtype``: its dtype; ``base_fingerprint_by_dtype``: its fingerprints as
    ``difstudy.models.load(..., dtype=...)`` loads it in float32, float16 and bfloat16 (a float32
    base cast down; the weights' bytes, hence the fingerprint, depend on the dtype), so an adapter
    is checked in every dtype. Costs one cast copy of the U-Net's weights per lower dtype."""
    own = _dtype_name(unet.dtype)
    by_dtype = {own: base_fingerprint(unet)}
    if unet.dtype == torch.float32:  # a lower-precision base cannot be cast up to its float32 original
        for dt in (torch.float16, torch.bfloat16):
            by_dtype[_dtype_name(dt)] = base_fingerprint(unet, dt)
    return dict(base_fingerprint=by_dtype[own], base_dtype=own, base_fingerprint_by_dtype=by_dtype)


def recorded_command(kind: str, record: dict) -> str:
    """The training command of an adapter rebuilt from its record's options (``kind``:
    ``controlnet`` or ``lora``); ``TRAIN_COMMANDS[kind]`` when the record holds none."""
    import shlex

    opts = []
    for k, v in record.items():
        if k in _RECORD_NOT_OPTIONS or k.startswith("base_") or v is None or isinstance(v, (list, dict)):
            continue
        opts += [f"--{k.replace('_', '-')}", shlex.quote(str(v))]
    return f"python -m difstudy.train.{kind} {' '.join(opts)}" if opts else TRAIN_COMMANDS[kind]


def check_adapter_base(kind: str, path, unet, unet_fingerprint: str | None = None) -> None:
    """Refuse an adapter trained by difstudy on another U-Net than ``unet``.

    ``kind``: ``controlnet`` or ``lora``; ``path``: the adapter's folder or weights file;
    ``unet``: the U-Net it is loaded into (other LoRAs in it do not count); ``unet_fingerprint``:
    its :func:`base_fingerprint` when already known (computed otherwise).
    The record's fingerprint for ``unet``'s dtype is compared (:func:`base_record`); adapters
    without a record holding ``base_fingerprint`` pass unchecked, and so (with a warning) does a
    U-Net in a dtype the record holds no fingerprint for. Raises :class:`DifstudyError` naming
    both fingerprints, the adapter and the fixes."""
    record = training_record(path)
    if record is None or "base_fingerprint" not in record:
        return
    dtype = _dtype_name(unet.dtype)
    expected = {record.get("base_dtype", "float32"): record["base_fingerprint"]}
    expected.update(record.get("base_fingerprint_by_dtype") or {})
    if dtype not in expected:
        warnings.warn(
            f"the {kind} {str(path)!r} records its base U-Net's fingerprint for {sorted(expected)} only; "
            f"it is loaded into a {dtype} U-Net without the check",
            stacklevel=3,
        )
        return
    got = unet_fingerprint or base_fingerprint(unet)
    if got == expected[dtype]:
        return
    raise DifstudyError(
        f"the {kind} {str(path)!r} was trained on the U-Net with fingerprint {expected[dtype]} ({dtype}; "
        f"{TRAINING_RECORD} records base_fingerprint {record['base_fingerprint']}, model "
        f"{record.get('model', '?')!r}), but the U-Net it is loaded into has fingerprint {got}: "
        f"its weights fit another network. Load the base it was trained for, or retrain it on this U-Net "
        f"with the recorded command (its --model naming this pipeline): `{recorded_command(kind, record)}`"
    )
