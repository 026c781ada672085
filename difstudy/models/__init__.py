"""Model loading: ``load(name_or_path, dtype=None, device=None)``.

Accepted names:

- built-ins: ``mini`` (the committed CPU-trained toy-world model, see
  :mod:`difstudy.models.mini`), ``mini-dit`` (the mini diffusion transformer trained beside it,
  :mod:`difstudy.train.dit`), ``tiny-sd15``, ``tiny-sd21``, ``tiny-sdxl``
  (random weights, real block layouts, see :mod:`difstudy.models.tiny`), ``tiny-pixart``,
  ``tiny-sd3``, ``tiny-flux`` (the diffusion-transformer pipelines at small widths,
  :mod:`difstudy.models.tiny_dit`);
- aliases of real models: ``sd15``, ``sd21``, ``sdxl``, ``playground-v2``, and the
  diffusion-transformer layouts ``pixart-alpha``, ``pixart-sigma``, ``sd3-medium``, ``sd35-large``,
  ``flux-dev``, ``flux-schnell`` (their hub ids, :mod:`difstudy.models.layouts`);
- any Hugging Face hub id (``org/name``) of the SD1.x/2.x/SDXL/Playground v2
  families, or a local diffusers pipeline folder (one with
  ``model_index.json``).

Everything loads through diffusers' ``from_pretrained``; nothing is patched.
"""

from __future__ import annotations

import os
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch

from .. import costs
from ..denoisers import denoiser
from ..errors import DifstudyError, ModelNotFoundError, closest
from . import layouts, standins
from .tiny import TINY_MODELS, build_tiny
from .tiny_dit import TINY_DIT_MODELS, build_tiny_dit

MINI_PATH = Path(__file__).parent / "difstudy-mini"
MINI_DIT_PATH = Path(__file__).parent / "difstudy-mini-dit"
ALIASES = {
    "sd15": "stable-diffusion-v1-5/stable-diffusion-v1-5",
    "sd21": "stabilityai/stable-diffusion-2-1",
    "sdxl": "stabilityai/stable-diffusion-xl-base-1.0",
    "playground-v2": "playgroundai/playground-v2-1024px-aesthetic",
}
BUILTINS = ("mini", "mini-dit", *TINY_MODELS, *TINY_DIT_MODELS)
_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16}
_DTYPES |= {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
LORA_TARGET_MODULES = ("to_q", "to_k", "to_v", "to_out.0")


TRAINING_RECORD = "difstudy_training.json"


def training_record(path) -> dict | None:
    """The ``difstudy_training.json`` that difstudy's training scripts write beside a model or an
    adapter (``path``: its folder, or a weights file in it) as a dict; None when there is none
    (public hub models and adapters, users' own). A damaged record is an error naming the file."""
    import json

    p = Path(str(path)).expanduser()
    if not p.exists():
        return None
    f = (p if p.is_dir() else p.parent) / TRAINING_RECORD
    if not f.is_file():
        return None
    try:
        record = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DifstudyError(f"training record {str(f)!r} is not readable JSON ({e}); restore or delete it") from None
    if not isinstance(record, dict):
        raise DifstudyError(f"training record {str(f)!r} holds {type(record).__name__}, expected a JSON object")
    return record


def write_training_record(folder: str | os.PathLike, record: dict) -> Path:
    """Write ``record`` as ``folder/difstudy_training.json`` (indented JSON, atomically: a reader
    never sees half a record); returns its path."""
    import json

    from ..fileio import write_text_atomic

    return write_text_atomic(Path(folder) / TRAINING_RECORD, json.dumps(record, indent=2) + "\n")


def dtype_kwargs(dtype) -> dict:
    """The dtype keyword of diffusers' ``from_pretrained``: ``dtype`` where diffusers has it (it
    deprecates ``torch_dtype``, with a warning in every output that loads a model), else
    ``torch_dtype``; empty for None."""
    if dtype is None:
        return {}
    try:
        from diffusers.utils.deprecation_utils import _resolve_dtype  # noqa: F401  (diffusers that take dtype=)
    except ImportError:
        return {"torch_dtype": dtype}
    return {"dtype": dtype}


def cast(obj, dtype):
    """``obj`` (a pipeline or a model) with its floating-point weights in ``dtype``, in place.
    diffusers' ``ModelMixin.to(dtype)`` warns about modules to keep in float32 (a warning in every
    output that builds a model this way) even when a model has none; the models cast here (tiny
    and stand-in models built from configs) have none, so torch's own ``Module.to`` does it."""
    import torch

    modules = [obj] if isinstance(obj, torch.nn.Module) else list(getattr(obj, "components", {}).values())
    for m in modules:
        if isinstance(m, torch.nn.Module):
            if getattr(m, "_keep_in_fp32_modules", None):
                m.to(dtype)  # modules that should stay in float32: diffusers says so, rightly
            else:
                torch.nn.Module.to(m, dtype)
    return obj


def lora_config(rank: int = 8):
    """difstudy's LoRA recipe (rank = alpha, the attention projections, peft's gaussian init): what
    ``difstudy.train.lora`` trains and what the rehearsal's random LoRA is made with."""
    from peft import LoraConfig

    return LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=list(LORA_TARGET_MODULES))


def save_random_lora(unet, folder: str | os.PathLike, rank: int = 8, seed: int = 0) -> Path:
    """A LoRA of difstudy's recipe (rank ``rank`` = alpha, on the Linear layers that
    :func:`lora_config` targets) with seeded random weights for ``unet``'s layout, both matrices
    random so it changes the output; written as diffusers writes one, ``unet`` left untouched."""
    from diffusers import StableDiffusionPipeline

    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, mod in unet.named_modules():
        if isinstance(mod, torch.nn.Linear) and any(name.endswith("." + t) for t in LORA_TARGET_MODULES):
            state[f"{name}.lora_A.weight"] = torch.randn(rank, mod.in_features, generator=g) / mod.in_features**0.5
            state[f"{name}.lora_B.weight"] = torch.randn(mod.out_features, rank, generator=g) * 0.01
    StableDiffusionPipeline.save_lora_weights(Path(folder), unet_lora_layers=state)
    return Path(folder)


def as_dtype(dtype) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype in _DTYPES:
        return _DTYPES[dtype]
    raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(_DTYPES)} or a torch.dtype")


@contextmanager
def _quiet_loading():
    """No per-component progress bars while a pipeline loads (they clutter notebooks and logs)."""
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    dlog.disable_progress_bar()
    tlog.disable_progress_bar()
    try:
        yield
    finally:
        dlog.enable_progress_bar()
        tlog.enable_progress_bar()


def _from_folder(path: Path, dtype):
    from diffusers import DiffusionPipeline

    if not path.is_dir():
        raise ModelNotFoundError(f"model folder {str(path)!r} does not exist")
    if not (path / "model_index.json").exists():
        found = sorted(p.name for p in path.iterdir())[:10]
        raise ModelNotFoundError(
            f"{str(path)!r} is not a diffusers pipeline folder: model_index.json is missing (found: {found}). "
            "Expected model_index.json with unet/, vae/, text_encoder/, tokenizer/, scheduler/ beside it, "
            "as written by `pipe.save_pretrained(folder)` or `huggingface-cli download ID --local-dir folder`."
        )
    kw = dtype_kwargs(dtype)
    try:
        with _quiet_loading():
            return DiffusionPipeline.from_pretrained(str(path), local_files_only=True, **kw)
    except (OSError, ValueError) as e:
        raise ModelNotFoundError(
            f"could not load the pipeline folder {str(path)!r}: {str(e).splitlines()[0]}"
        ) from None


def _mini_dit(dtype):
    """The mini DiT (:mod:`difstudy.train.dit`): its transformer and scheduler with the mini model's
    VAE, tokenizer and text encoder, as a ``PixArtAlphaPipeline``."""
    from diffusers import DDIMScheduler, PixArtAlphaPipeline, PixArtTransformer2DModel

    if not (MINI_DIT_PATH / "transformer" / "config.json").exists():
        raise ModelNotFoundError(
            f"the mini DiT is missing from {MINI_DIT_PATH}; it is committed with difstudy. Restore it with "
            "`git checkout -- difstudy/models/difstudy-mini-dit` or train it with `python -m difstudy.train.dit "
            "--export difstudy/models/difstudy-mini-dit`."
        )
    base = load("mini", dtype=dtype)
    kw = dtype_kwargs(dtype)
    with _quiet_loading():
        transformer = PixArtTransformer2DModel.from_pretrained(MINI_DIT_PATH / "transformer", **kw)
    scheduler = DDIMScheduler.from_pretrained(MINI_DIT_PATH / "scheduler")
    return PixArtAlphaPipeline(
        tokenizer=base.tokenizer, text_encoder=base.text_encoder, vae=base.vae, transformer=transformer.eval(),
        scheduler=scheduler,
    )  # fmt: skip


def _from_hub(repo_id: str, dtype):
    from diffusers import DiffusionPipeline

    kw = dtype_kwargs(dtype)
    try:
        with _quiet_loading():
            return DiffusionPipeline.from_pretrained(repo_id, **kw)
    except Exception as e:  # hub/network errors come in many types; report them as one
        cache = os.environ.get("HF_HOME", str(Path.home() / ".cache" / "huggingface"))
        reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise ModelNotFoundError(
            f"could not load {repo_id!r} from the Hugging Face hub or its local cache ({cache}): {reason}. "
            f"On a machine with network run `huggingface-cli download {repo_id} --local-dir DIR` and pass DIR, "
            "or point HF_HOME at a cache that holds it. Built-in models that need no download: "
            f"{', '.join(BUILTINS)}."
        ) from None


def resolve_name(name_or_path: str | os.PathLike) -> str:
    """Alias -> hub id; other names unchanged."""
    return ALIASES.get(str(name_or_path), str(name_or_path))


def load(name_or_path: str | os.PathLike, dtype=None, device=None):
    """Load a diffusers pipeline (see module doc for accepted names).

    ``dtype``: None (as stored), a torch dtype or ``"fp16"``/``"bf16"``/``"fp32"``.
    ``device``: e.g. ``"cuda"``; default CPU. Half precision on CPU is allowed
    but slow and warned about.
    """
    dtype = as_dtype(dtype)
    name = str(name_or_path)
    cache = standins.rehearsal_cache()
    if cache is not None:
        dtype, device = rehearsal_device(name, dtype, device)
    standin = standins.standin_name(resolve_name(name))
    if cache is not None and standin:
        print(f"rehearsal: {name} is a random-weight stand-in (the real {standin} architecture, random weights)")
        pipe = standins.standin_pipeline(standin, cache, dtype)
    elif name == "mini":
        if not (MINI_PATH / "model_index.json").exists():
            raise ModelNotFoundError(
                f"the mini model is missing from {MINI_PATH}; it is committed with difstudy. "
                "Restore it with `git checkout -- difstudy/models/difstudy-mini` or retrain it with "
                "`python -m difstudy.models.train_mini --export difstudy/models/difstudy-mini`."
            )
        pipe = _from_folder(MINI_PATH, dtype)
    elif name == "mini-dit":
        pipe = _mini_dit(dtype)
    elif name in TINY_MODELS or name in TINY_DIT_MODELS:
        pipe = build_tiny(name) if name in TINY_MODELS else build_tiny_dit(name)
        if dtype is not None:
            pipe = cast(pipe, dtype)
    elif Path(name).expanduser().exists() or name.startswith((".", "/", "~")):
        pipe = _from_folder(Path(name).expanduser(), dtype)
    elif "/" in resolve_name(name) or layouts.layout_name(name):  # a hub id, an alias or a transformer layout's hub id
        pipe = _from_hub(layouts.layout(name)["hub"] if layouts.layout_name(name) else resolve_name(name), dtype)
    else:
        aliases = [*ALIASES, *[n for n in layouts.names() if n not in TINY_DIT_MODELS]]
        hint = closest(name, list(BUILTINS) + aliases)
        raise ModelNotFoundError(
            f"unknown model {name!r}: not a built-in ({', '.join(BUILTINS)}), an alias ({', '.join(aliases)}), "
            "a hub id (org/name) or an existing folder"
            + (f"; did you mean {', '.join(repr(h) for h in hint[:3])}?" if hint else "")
        )
    if device is not None:
        pipe = pipe.to(device)
    dev = torch.device(device or "cpu")
    net_dtype = denoiser(pipe).dtype
    if dev.type == "cpu" and net_dtype in (torch.float16, torch.bfloat16):
        warnings.warn(f"{name}: {net_dtype} on CPU is slow and some ops may be unsupported; use fp32 on CPU")
    pipe.set_progress_bar_config(disable=True)
    costs.watch(pipe, name)  # counts the U-Net's forwards in a rehearsal (DIFSTUDY_COST_LOG); else nothing
    return pipe


def rehearsal_device(name: str, dtype, device):
    """In a rehearsal (CPU): ``cuda`` becomes ``cpu`` and half precision fp32, each with a line."""
    if device is not None and torch.device(device).type == "cuda":
        print(f"rehearsal: {name} on cpu instead of {device}")
        device = None
    if dtype in (torch.float16, torch.bfloat16):
        print(f"rehearsal: {name} in float32 instead of {str(dtype).removeprefix('torch.')}")
        dtype = torch.float32
    return dtype, device


def vae_scale_factor(pipe) -> int:
    """Pixels per latent cell (8 for SD, 4 for the mini model)."""
    return 2 ** (len(pipe.vae.config.block_out_channels) - 1)


__all__ = ["load", "BUILTINS", "ALIASES", "MINI_PATH", "vae_scale_factor", "build_tiny"]
