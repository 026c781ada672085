"""Feature extraction: a dataset through a diffusion U-Net into the feature cache.

The papers' protocol (Meng et al.; GATE), one U-Net forward per image:

1. encode the image with the VAE and scale it (``scaling_factor``). difstudy
   takes the posterior **mean**; diffusers' img2img pipelines, which the
   official code drives, take a posterior *sample* (``retrieve_latents``).
   The mean is a deliberate choice: the features then depend on the image and
   the noise draw only, not on the VAE's (small) posterior noise as well;
2. noise it for timestep ``t`` with **DDPM forward noising**
   ``z_t = sqrt(alpha_bar_t) z0 + sqrt(1 - alpha_bar_t) n`` (:func:`ddpm_noise`),
   ``alpha_bar`` computed from the betas of the pipeline's scheduler config
   (:func:`ddpm_alphas_cumprod`), whatever scheduler the pipeline samples with.
   The U-Net was trained on exactly this input. An Euler or DPM-Solver
   scheduler's ``add_noise`` works in sigma space and expects
   ``scale_model_input`` before the U-Net (SDXL's Euler default fed without it
   gives an input 1/sqrt(alpha_bar_t) too large), so it is never used here;
3. run **one** U-Net forward without classifier-free guidance and read the
   activations, stopping right after the last requested one.

The noise draw ``n`` is fixed per (image content, t, seed): :func:`noise_for`
keyed by :func:`image_digest`, so it is identical across runs, batches,
conditioning variants and whatever name a dataset gives the image.

Batching: a batch of B images, T timesteps and V conditioning variants is one
forward of B*T*V samples laid out by :func:`~difstudy.capture.expand_batch`
(and read back with :func:`~difstudy.capture.split_batch`); the VAE runs once
per image and the text encoder once per distinct prompt (embeddings are
memoised, also across extractions: see :func:`clear_text_memo`). A conditioning variant is a named prompt rule: ``empty`` (""),
``generic`` (the image's caption, e.g. "a photo of a bird"), ``fine`` (its
fine-grained caption) or ``text:<prompt>`` (one literal prompt for all
images). Later GATE techniques are further variants of the same forward and cache.

Image ids key the cache, so they must name one image each across splits and
datasets (the loaders namespace them: ``"<dataset>/<split>/<path>"``).
:func:`extract` refuses a dataset that repeats an id, and an id the cache
already holds for different pixels (each shard records the content digest of
its images).

Sharding: ``extract(..., shard="I/N")`` computes every N-th batch of the
dataset, starting at batch I: the same batches as a single run, so N workers
(processes, GPUs, nodes) on one cache together write exactly a single run's
entries; ``shard="auto"`` takes the rank of an ``accelerate launch`` or
``torchrun`` process (see :mod:`difstudy.scaleout`). Each run records its
request and the ids of each batch in the cache, which lets
:func:`difstudy.cache.verify_cache` tell what is missing.

Cache groups (:func:`cache_group`) separate features that differ: the
fingerprints of the U-Net, VAE and text encoder(s) (config and weights), the
noising schedule, the image size, the storage dtype and
:data:`PROTOCOL_VERSION`, bumped whenever the protocol changes a feature.

Stored features are (C, H, W) per image: spatial activations as captured;
attention maps (``self-map``/``cross-map``) averaged over heads and laid out
as (keys, H, W) so that every entry is a feature map.
"""

from __future__ import annotations

import functools
import hashlib
import json
import time
import zlib
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from .cache import FeatureCache, Key
from .capture import Capture, expand_batch, split_batch
from .catalog import Catalog
from .errors import DifstudyError
from .scaleout import Shard

BUILTIN_VARIANTS = ("empty", "generic", "fine")
# Version of the extraction protocol, part of every cache group: bump it whenever a change here
# changes a stored feature, so caches written by older code are never reused.
# 1: scheduler.add_noise, ids as given; 2: DDPM forward noising, noise keyed by image content.
PROTOCOL_VERSION = 2


@dataclass
class Summary:
    """What one extraction run did."""

    computed: int = 0
    reused: int = 0
    repaired: int = 0
    skipped_busy: int = 0
    images: int = 0
    seconds: float = 0.0
    cache_dir: str = ""
    shard: str = "0/1"
    notes: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        rate = self.images / self.seconds if self.seconds else 0.0
        part = "" if self.shard == "0/1" else f" [shard {self.shard}]"
        return (
            f"extract{part}: {self.computed} feature maps computed, {self.reused} reused, {self.repaired} repaired "
            f"({self.images} images in {self.seconds:.1f} s, {rate:.1f} img/s) -> {self.cache_dir}"
        )


# -- inputs ----------------------------------------------------------------------
def _item(ds, i):
    """(image_id, RGB uint8 array, captions dict) from a ToySample or a loader dict."""
    s = ds[i]
    if isinstance(s, dict):
        return str(s["image_id"]), s["image"], {"generic": s.get("caption"), "fine": s.get("fine_caption")}
    return s.image_id, s.image, {"generic": s.caption, "fine": s.fine_caption}


def prompt_for(variant: str, captions: dict) -> str:
    if variant == "empty":
        return ""
    if variant.startswith("text:"):
        return variant[5:]
    if variant in ("generic", "fine"):
        if not captions.get(variant):
            raise DifstudyError(
                f"variant {variant!r} needs a {variant} caption, and this dataset has none; use 'empty' or 'text:<prompt>'"
            )
        return captions[variant]
    raise DifstudyError(f"unknown conditioning variant {variant!r}; use one of {BUILTIN_VARIANTS} or 'text:<prompt>'")


def variant_key(variant: str) -> str:
    """Cache-safe variant name: literal prompts are keyed by a short hash."""
    if variant.startswith("text:"):
        return "text-" + hashlib.sha1(variant[5:].encode()).hexdigest()[:10]
    return variant


def to_tensor(image: np.ndarray, size: int) -> torch.Tensor:
    """RGB uint8 (H, W, 3) -> (3, size, size) in [-1, 1] (bicubic resize)."""
    if image.ndim != 3 or image.shape[2] != 3:
        raise DifstudyError(f"expected an RGB image (H, W, 3), got shape {tuple(image.shape)}")
    if image.shape[:2] != (size, size):
        image = np.asarray(Image.fromarray(image).resize((size, size), Image.BICUBIC))
    return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).float().div(127.5).sub(1)


def image_digest(image: np.ndarray) -> str:
    """Content digest of an image array (shape, dtype and pixels): 16 hex characters."""
    a = np.ascontiguousarray(image)
    h = hashlib.blake2b(f"{a.shape}|{a.dtype}".encode(), digest_size=8)
    h.update(a.data)
    return h.hexdigest()


def noise_for(key: str, t: int, seed: int, shape, dtype=torch.float32) -> torch.Tensor:
    """The noise draw for (``key``, t, seed), identical across runs and batches.

    Extraction keys it by :func:`image_digest` of the image, so it does not
    depend on the image's name or on the conditioning variant."""
    s = zlib.crc32(f"{seed}|{t}|{key}".encode())
    return torch.randn(shape, generator=torch.Generator().manual_seed(s), dtype=torch.float32).to(dtype)


# -- DDPM forward noising ------------------------------------------------------------
def ddpm_alphas_cumprod(scheduler) -> torch.Tensor:
    """``alpha_bar_t`` (float32, one per training step) of DDPM forward noising for the betas
    of ``scheduler``'s config (beta_start/end, beta_schedule, trained_betas, zero-SNR rescaling),
    whatever scheduler class it is: a ``DDPMScheduler`` is built from the same config."""
    from diffusers import DDPMScheduler

    cfg = dict(scheduler.config)
    if cfg.get("trained_betas") is not None:  # an array: not memoised
        return DDPMScheduler.from_config(cfg).alphas_cumprod.detach().clone()
    return _alphas_cumprod(json.dumps(cfg, sort_keys=True, default=str)).clone()


@functools.lru_cache(maxsize=16)
def _alphas_cumprod(config_json: str) -> torch.Tensor:
    """Memoised per config (building a DDPMScheduler takes ~10 ms, twice per :func:`extract`)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_config(json.loads(config_json)).alphas_cumprod.detach().clone()


def ddpm_noise(z0: torch.Tensor, noise: torch.Tensor, t, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """DDPM forward noising ``sqrt(alpha_bar_t) z0 + sqrt(1 - alpha_bar_t) noise``.

    ``z0``, ``noise``: (B, ...); ``t``: an int or (B,) ints; ``alphas_cumprod``
    from :func:`ddpm_alphas_cumprod`. Computed in float32 (coefficients in
    float64), returned in ``z0``'s dtype."""
    n_steps = len(alphas_cumprod)
    t = torch.as_tensor(t, dtype=torch.long).cpu().reshape(-1)
    bad = [int(v) for v in t if not 0 <= int(v) < n_steps]
    if bad:
        raise DifstudyError(f"timestep {bad[0]} out of range: the schedule has {n_steps} steps, use 0 <= t < {n_steps}")
    ab = alphas_cumprod.detach().to("cpu", torch.float64)[t]
    shape = (-1,) + (1,) * (z0.dim() - 1)
    a = ab.sqrt().to(z0.device, torch.float32).reshape(shape)
    s = (1 - ab).sqrt().to(z0.device, torch.float32).reshape(shape)
    return (a * z0.float() + s * noise.to(z0.device).float()).to(z0.dtype)


# -- the extractor ----------------------------------------------------------------
# Prompt embeddings, keyed by the text encoders' fingerprint (config and weights), device, dtype
# and prompt, shared by every Extractor of the process (most runs embed the same few prompts).
_TEXT_MEMO: OrderedDict[tuple, tuple] = OrderedDict()
_TEXT_MEMO_SIZE = 64


def clear_text_memo() -> None:
    """Forget the memoised prompt embeddings (the next extraction runs the text encoder again)."""
    _TEXT_MEMO.clear()


class Extractor:
    """Holds a pipeline and runs the protocol on batches of images.

    ``Extractor(pipe, activations, timesteps=(50,), variants=("empty",), seed=0, image_size=None)``;
    :meth:`features` returns ``{Key: tensor}`` for a batch, :func:`extract`
    drives it over a dataset into a cache.
    """

    def __init__(
        self, pipe, activations, timesteps=(50,), variants=("empty",), seed=0, image_size=None, stop_early=True,
        flow_steps="default", guidance: float | None = None,
    ):  # fmt: skip
        from . import denoisers
        from .models import vae_scale_factor

        self.pipe = pipe
        self.unet = denoisers.denoiser(pipe)  # the U-Net or the diffusion transformer
        self.family = denoisers.family(pipe)
        self.device = self.unet.device
        self.dtype = self.unet.dtype
        self.factor = vae_scale_factor(pipe)
        self.image_size = int(image_size or denoisers.native_size(pipe, self.factor))
        mult = denoisers.pixel_multiple(pipe, self.factor)
        if self.image_size % mult:
            what = "U-Net's downsamplers" if self.family == "unet" else "transformer's patches"
            raise DifstudyError(
                f"image size {self.image_size} is not a multiple of {mult} (VAE factor {self.factor} x "
                f"{mult // self.factor} for the {what}); try {max(mult, round(self.image_size / mult) * mult)}"
            )
        self.noising = denoisers.Noising(pipe, flow_steps)
        self.timesteps = [int(t) for t in timesteps]
        self.noising.check(self.timesteps)
        self.guidance = denoisers.OFFICIAL_FLUX_GUIDANCE if guidance is None else float(guidance)
        for v in variants:
            prompt_for(v, {"generic": "x", "fine": "x"})  # validates the name
        self.variants = list(variants)
        self.seed = int(seed)
        latent = self.image_size // self.factor
        self.catalog = Catalog(self.unet, latent_size=latent, text_len=denoisers.text_len(pipe))
        self.names = self.catalog.resolve(activations)
        self.stop_early = stop_early
        self.image_seq_len = denoisers.image_tokens(pipe, (latent, latent))
        self.is_xl = self.family == "unet" and getattr(self.unet.config, "addition_embed_type", None) == "text_time"
        self._text_key: tuple | None = None

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        """``alpha_bar`` of DDPM noising (U-Nets and PixArt; flow-matching models have none)."""
        return self.noising.alphas_cumprod

    # text encoder once per distinct prompt (and text encoder weights: memoised across extractors)
    def _embed(self, prompt: str):
        from .denoisers import embed_prompt

        if self._text_key is None:
            self._text_key = (_text_fingerprint(self.pipe), str(self.device), str(self.dtype), self.family)
        key = (*self._text_key, prompt)
        if key in _TEXT_MEMO:
            _TEXT_MEMO.move_to_end(key)
            return _TEXT_MEMO[key]
        value = embed_prompt(self.pipe, prompt, self.device)
        _TEXT_MEMO[key] = value
        while len(_TEXT_MEMO) > _TEXT_MEMO_SIZE:
            _TEXT_MEMO.popitem(last=False)
        return value

    @torch.no_grad()
    def encode_images(self, images: list[np.ndarray]) -> torch.Tensor:
        """VAE posterior means, shifted and scaled: (B, C, h, w)."""
        from .denoisers import scale_latents

        x = torch.stack([to_tensor(im, self.image_size) for im in images]).to(self.device)
        vae = self.pipe.vae
        upcast = self.dtype == torch.float16 and getattr(vae.config, "force_upcast", False)
        vdtype = torch.float32 if upcast else vae.dtype
        if upcast:
            vae = vae.to(torch.float32)
        z = scale_latents(vae, vae.encode(x.to(vdtype)).latent_dist.mean)
        if upcast:
            vae.to(self.dtype)
        return z.to(self.dtype)

    def noisy_latents(self, z0: torch.Tensor, images: list[np.ndarray]) -> torch.Tensor:
        """(B, C, h, w) clean latents -> (B, T, C, h, w) noised at every timestep (DDPM, or the
        flow models' interpolation), with the fixed noise draw of each image's content."""
        B, T = len(images), len(self.timesteps)
        keys = [image_digest(im) for im in images]
        noise = torch.stack([noise_for(k, t, self.seed, z0.shape[1:]) for k in keys for t in self.timesteps])
        tt = torch.tensor(self.timesteps).repeat(B)
        z = z0[:, None].expand(B, T, *z0.shape[1:]).reshape(B * T, *z0.shape[1:])
        return self.noising.noise(z, noise, tt, self.image_seq_len).reshape(B, T, *z0.shape[1:])

    def model_kwargs(self, captions: list[dict], latents: torch.Tensor) -> dict:
        """Keyword inputs of the one denoiser forward for (B, T, C, h, w) noisy ``latents``, in the
        (n, t, v) layout of :func:`~difstudy.capture.expand_batch` (:func:`difstudy.denoisers.model_kwargs`)."""
        from .denoisers import model_kwargs

        embs = [[self._embed(prompt_for(v, c)) for v in self.variants] for c in captions]
        ehs = torch.stack([torch.stack([e for e, _ in row]) for row in embs])  # (B, V, L, D)
        sample, tt, ehs = expand_batch(latents, self.timesteps, ehs, per_image=True)
        extra = None
        if embs[0][0][1] is not None:  # pooled text embedding or caption mask
            extra = torch.stack([torch.stack([x for _, x in row]) for row in embs])  # (B, V, ...)
            _, _, extra = expand_batch(latents, self.timesteps, extra, per_image=True)
        return model_kwargs(self.pipe, self.noising, sample, tt, ehs, extra, self.image_size, self.guidance)

    def unet_kwargs(self, captions: list[dict], latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """``(sample, t, kwargs)`` of a U-Net's forward (see :meth:`model_kwargs`)."""
        kw = self.model_kwargs(captions, latents)
        return kw.pop("sample"), kw.pop("timestep"), kw

    def _map_hw(self, name: str) -> tuple[int, int]:
        """The query grid of an attention map: its q's (U-Net) or the token grid (transformers)."""
        if self.family == "unet":
            return self.catalog[name.replace("-map", "-q")].shape[1:]
        from .catalog_dit import token_grid

        return token_grid(self.unet, self.catalog.latent_hw)

    @torch.no_grad()
    def features(
        self, ids: Sequence[str], images: list[np.ndarray], captions: list[dict], store_dtype=None
    ) -> dict[Key, torch.Tensor]:
        """``{Key: (C, H, W)}`` for one batch; with ``store_dtype`` on the CPU in that dtype."""
        B, T, V = len(ids), len(self.timesteps), len(self.variants)
        kw = self.model_kwargs(captions, self.noisy_latents(self.encode_images(images), images))
        args = (
            (kw.pop("sample"), kw.pop("timestep")) if self.family == "unet" else ()
        )  # a U-Net's call as diffusers makes it
        with Capture(self.unet, self.names, stop=self.stop_early, catalog=self.catalog) as cap:
            cap.run(*args, **kw)
        out: dict[Key, torch.Tensor] = {}
        vkeys = [variant_key(v) for v in self.variants]
        for name, val in cap.cache.items():
            a = self.catalog[name] if name in self.catalog else None
            if a is not None and a.is_map:  # (N, heads, Nq, Nk) -> (N, Nk, H, W)
                h, w = self._map_hw(name)
                val = val.float().mean(1).transpose(1, 2).reshape(val.shape[0], -1, h, w)
            if store_dtype is not None:  # one conversion and one transfer per activation
                val = val.to(dtype=store_dtype).cpu()
            val = split_batch(val, B, T, V)
            for b, iid in enumerate(ids):
                for j, t in enumerate(self.timesteps):
                    for k, vk in enumerate(vkeys):
                        out[Key(name, t, vk, self.seed, iid)] = val[b, j, k]
        return out


# -- cache groups ----------------------------------------------------------------------
_SAMPLES = 256  # weights fingerprint: about this many evenly strided values of every tensor, plus its last one


def _public_config(config) -> dict:
    """A component's config without private or version keys (``_use_default_values`` changes order
    between processes; ``_name_or_path``, ``*_version`` do not describe the network)."""
    cfg = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    return {k: v for k, v in cfg.items() if not k.startswith("_") and not k.endswith("_version")}


def module_fingerprint(module) -> str:
    """Fingerprint of a network: its config and, for every parameter and buffer, its name,
    shape, dtype and the exact bytes of an evenly strided sample (every value of tensors up
    to 256 values, about 256 of larger ones, and the last).

    Independent of device and thread count; cheap even for SDXL (one transfer of the
    samples; about 10 ms for the SD1.5 U-Net on one CPU thread). A change of every weight
    of a layer (a fused LoRA, another checkpoint) or of the set of parameters (an unfused
    LoRA adapter) changes it; a change of a few values of a large tensor may not."""
    h = hashlib.sha1(json.dumps(_public_config(module.config), sort_keys=True, default=str).encode())
    tensors = [*module.named_parameters(), *module.named_buffers()]
    h.update("\n".join(f"{name}:{tuple(p.shape)}:{p.dtype}" for name, p in tensors).encode())
    groups: dict[tuple, list] = {}  # one concatenation per (device, dtype)
    for _, p in tensors:
        flat = p.detach().reshape(-1)
        if flat.numel():
            if flat.device.type == "cpu" and flat.dtype != torch.bfloat16:
                flat = flat.numpy()  # numpy views: a fraction of torch's per-call cost
            groups.setdefault((str(p.device), str(p.dtype)), []).extend(
                (flat[:: max(1, len(flat) // _SAMPLES)], flat[-1:])
            )
    for key in sorted(groups):
        parts = groups[key]
        if isinstance(parts[0], np.ndarray):
            h.update(np.concatenate(parts).tobytes())
        else:  # GPU (or bf16) tensors: gathered on their device, one transfer; bf16 bits read as int16
            cat = torch.cat(parts)
            cat = cat.view(torch.int16) if cat.dtype == torch.bfloat16 else cat
            h.update(cat.cpu().numpy().tobytes())
    return h.hexdigest()[:12]


def schedule_fingerprint(scheduler) -> str:
    """Fingerprint of what extraction takes from the scheduler: the DDPM noising schedule
    (``alpha_bar`` from its betas: beta range and schedule, trained betas, zero-SNR rescaling,
    number of training steps) and the prediction type the U-Net was trained for.

    Sampling-only settings (the scheduler class, timestep spacing, solver order) do not
    change a single forward at a given training timestep ``t``, so they are left out:
    swapping SDXL's Euler scheduler for DDIM keeps the cached features."""
    h = hashlib.sha1(ddpm_alphas_cumprod(scheduler).numpy().tobytes())
    h.update(str(dict(scheduler.config).get("prediction_type", "epsilon")).encode())
    return h.hexdigest()[:12]


def _text_fingerprint(pipe) -> str:
    parts = []
    for suffix in ("", "_2", "_3"):
        enc, tok = getattr(pipe, f"text_encoder{suffix}", None), getattr(pipe, f"tokenizer{suffix}", None)
        if enc is not None:
            parts.append(module_fingerprint(enc))
        if tok is not None:
            parts.append(f"{type(tok).__name__}:{len(tok)}:{tok.model_max_length}")
    return hashlib.sha1("|".join(parts).encode()).hexdigest()[:12]


def cache_group(pipe, model_name: str, image_size: int, store_dtype: torch.dtype, noising=None) -> tuple[str, dict]:
    """Group folder name and metadata: features that could differ never share a group.

    The group digest covers the denoiser (U-Net or transformer), the VAE and the text encoder(s)
    (config and weights, :func:`module_fingerprint`), the tokenizers, the noising schedule
    (:func:`schedule_fingerprint`; for a flow-matching model the sigma rule of ``noising``, a
    :class:`difstudy.denoisers.Noising`, by default the pipeline's), the image size, the storage
    dtype and :data:`PROTOCOL_VERSION`; the metadata lists each part."""
    from .denoisers import Noising, denoiser

    dtype = str(store_dtype).replace("torch.", "")
    noising = noising or Noising(pipe)
    parts = dict(
        protocol=PROTOCOL_VERSION,
        unet=module_fingerprint(denoiser(pipe)),
        vae=module_fingerprint(pipe.vae),
        text=_text_fingerprint(pipe),
        schedule=noising.fingerprint() if noising.flow else schedule_fingerprint(pipe.scheduler),
        image_size=int(image_size),
        dtype=dtype,
    )
    digest = hashlib.sha1(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:12]
    slug = "".join(c if c.isalnum() or c in "-_." else "_" for c in str(model_name))[-40:]
    meta = dict(model=str(model_name), digest=digest, **parts)
    return f"{slug}-{digest}-s{image_size}-{dtype}", meta


# -- the driver ------------------------------------------------------------------------
def _duplicate_error(iid: str, first: int, again: int) -> DifstudyError:
    return DifstudyError(
        f"image id {iid!r} names two images of the dataset (index {first} and {again}); ids key the feature "
        "cache, so the second image would be served the first one's features. Make ids unique across splits "
        "and datasets: namespace them, e.g. '<dataset>/<split>/<relative path>' (the loaders of "
        "difstudy.data.loaders do)"
    )


def _stale_error(iid: str, cache: FeatureCache) -> DifstudyError:
    return DifstudyError(
        f"image id {iid!r} is cached in {cache.dir} for another image (different pixels); ids must name one "
        "image across every dataset extracted into a cache. Namespace the ids (e.g. "
        "'<dataset>/<split>/<relative path>', as difstudy.data.loaders does) or use another cache_dir"
    )


def extract(
    model,
    dataset,
    activations,
    timesteps=(50,),
    variants=("empty",),
    seed: int = 0,
    image_size: int | None = None,
    batch_size: int = 8,
    cache_dir="cache/features",
    store_dtype=torch.float16,
    dtype=None,
    device=None,
    model_name: str | None = None,
    progress: bool = True,
    shard: str | Shard | None = None,
    dataset_name: str | None = None,
    flow_steps: int | str | None = "default",
    guidance: float | None = None,
) -> tuple[FeatureCache, Summary]:
    """Extract ``activations`` for every image of ``dataset`` into ``cache_dir``.

    ``model``: a pipeline or a name for :func:`difstudy.models.load`.
    ``dataset``: a sequence of ToySample or loader dicts (``image``, ``image_id``,
    optional captions); ids must be unique (a repeated id, or an id the cache
    holds for other pixels, raises :class:`DifstudyError` before that batch is
    computed). Resumable: only missing entries are computed; corrupt shards are
    detected by checksum and recomputed. Returns the cache and a :class:`Summary`.
    ``shard``: ``"I/N"``, ``"auto"`` or a :class:`~difstudy.scaleout.Shard`: only
    batches I, I+N, ... (see the module docstring); ``dataset_name`` labels the
    request recorded in the cache (default: the dataset's type). ``flow_steps`` and ``guidance``:
    SD3 / FLUX only (:class:`difstudy.denoisers.Noising`, FLUX's guidance embedding; default the
    official 28-step grid and guidance 1 for FLUX).
    """
    from .models import load

    t0 = time.time()
    shard = Shard.parse(shard)
    if isinstance(model, str):
        model_name = model_name or model
        model = load(model, dtype=dtype, device=device)
    model_name = model_name or getattr(model, "name_or_path", None) or type(model).__name__
    ex = Extractor(model, activations, timesteps, variants, seed, image_size, flow_steps=flow_steps, guidance=guidance)
    group, meta = cache_group(model, model_name, ex.image_size, store_dtype, ex.noising)
    cache = FeatureCache(cache_dir, group, meta)
    summary = Summary(cache_dir=str(cache.dir), shard=str(shard))
    summary.repaired = len(cache.verify())
    n = len(dataset)
    # (batch number, dataset indices): a single run's batches, this shard's share of them
    batches = shard.select([(j, list(range(i, min(i + batch_size, n)))) for j, i in enumerate(range(0, n, batch_size))])
    vkeys = [variant_key(v) for v in ex.variants]
    spec = dict(activations=ex.names, timesteps=ex.timesteps, variants=vkeys, seed=ex.seed, n_images=n)
    spec |= dict(batch_size=batch_size, dataset=dataset_name or type(dataset).__name__)
    request = cache.record_request(spec)
    seen: dict[str, int] = {}

    def keys_of(ids):
        return [Key(a, t, v, ex.seed, i) for i in ids for a in ex.names for t in ex.timesteps for v in vkeys]

    def batch_key(ids):
        spec = json.dumps([ids, ex.names, ex.timesteps, vkeys, ex.seed])
        return hashlib.sha1(spec.encode()).hexdigest()[:16]

    def load_batch(idx):
        items = [_item(dataset, i) for i in idx]
        for i, (iid, _, _) in zip(idx, items):
            if seen.setdefault(iid, i) != i:
                raise _duplicate_error(iid, seen[iid], i)
        digests = {iid: image_digest(im) for iid, im, _ in items}
        for iid, d in digests.items():
            if cache.image_digest(iid) not in (None, d):
                raise _stale_error(iid, cache)
        return items, digests

    def compute(idx, items, digests):
        """Compute and write one claimed batch; returns False when another process holds it."""
        ids = [it[0] for it in items]
        bk = batch_key(ids)
        lock = cache.claim(bk)
        if lock is None:
            return False
        try:
            cache.refresh()  # another process may have finished it meanwhile
            todo = set(cache.missing(keys_of(ids)))
            if todo:
                need = {k.image_id for k in todo}
                sel = [it for it in items if it[0] in need]
                feats = ex.features([s[0] for s in sel], [s[1] for s in sel], [s[2] for s in sel], store_dtype)
                feats = {k: v for k, v in feats.items() if k in todo}
                cache.write(bk, feats, extra=dict(model=model_name), images={i: digests[i] for i in need})
                summary.computed += len(feats)
                summary.images += len(sel)
            summary.reused += len(ids) * len(ex.names) * len(ex.timesteps) * len(vkeys) - len(todo)
        finally:
            lock.release()
        return True

    pending = list(batches)
    bar = tqdm(
        total=sum(len(idx) for _, idx in batches),
        desc=f"extract {len(ex.names)} acts x {len(ex.timesteps)} t x {len(vkeys)} var",
        unit="img",
        disable=not progress,
    )
    while pending:
        busy = []
        for j, idx in pending:
            items, digests = load_batch(idx)
            cache.record_batch(request, j, [it[0] for it in items])
            if not cache.missing(keys_of([it[0] for it in items])):
                summary.reused += len(idx) * len(ex.names) * len(ex.timesteps) * len(vkeys)
            elif not compute(idx, items, digests):  # another process computes this batch
                busy.append((j, idx))
                continue
            bar.update(len(idx))
        if busy:
            summary.skipped_busy += len(busy)
            time.sleep(0.5)
            cache.refresh()
        pending = busy
    bar.close()
    summary.seconds = time.time() - t0
    if progress:
        print(summary)
    return cache, summary


# -- post-processing helpers (the papers' feature handling) -----------------------
def resize(feat: torch.Tensor, size: int | tuple[int, int], mode: str = "bilinear") -> torch.Tensor:
    """(N, C, h, w) or (C, h, w) -> spatial ``size`` (bilinear, as the papers upsample features)."""
    squeeze = feat.dim() == 3
    x = feat[None] if squeeze else feat
    size = (size, size) if isinstance(size, int) else tuple(size)
    x = F.interpolate(x.float(), size=size, mode=mode, align_corners=False if mode != "nearest" else None)
    return x[0] if squeeze else x


def normalize(feat: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Per-activation normalisation: zero mean, unit variance per channel over (N, h, w)."""
    x = feat.float()
    dims = (0, 2, 3) if x.dim() == 4 else (1, 2)
    mean, std = x.mean(dims, keepdim=True), x.std(dims, keepdim=True)
    return (x - mean) / (std + eps)


def concat(feats: Sequence[torch.Tensor], size: int | tuple[int, int] | None = None, norm: bool = True) -> torch.Tensor:
    """Concatenate a set of activations along channels at a common resolution
    (the largest by default), each normalised first when ``norm``."""
    if size is None:
        size = max((f.shape[-2:] for f in feats), key=lambda s: s[0] * s[1])
    return torch.cat([resize(normalize(f) if norm else f.float(), size) for f in feats], dim=-3)


def pca_rgb(feat: torch.Tensor, n_components: int = 3, fit_on: torch.Tensor | None = None) -> torch.Tensor:
    """PCA of the channels to 3 components scaled to [0, 1]: (N, C, h, w) -> (N, h, w, 3).

    Fitted jointly over all images (or ``fit_on``), as in the papers' PCA pictures. With fewer
    pixel vectors (or channels) than components, e.g. two images of a 1x1 map, only as many
    components as they allow are fitted and the rest are 0 (one pixel vector: all 0, a flat picture)."""
    from sklearn.decomposition import PCA

    x = feat.float()
    n, c, h, w = x.shape
    flat = x.permute(0, 2, 3, 1).reshape(-1, c).numpy()
    ref = flat if fit_on is None else fit_on.float().permute(0, 2, 3, 1).reshape(-1, c).numpy()
    k = min(n_components, ref.shape[0] - 1, ref.shape[1])  # one pixel vector has no variance to fit
    y = np.zeros((len(flat), n_components), dtype=np.float32)
    if k > 0:
        y[:, :k] = PCA(n_components=k, random_state=0).fit(ref).transform(flat)
    lo, hi = np.percentile(y, 1, axis=0), np.percentile(y, 99, axis=0)
    y = np.clip((y - lo) / (hi - lo + 1e-8), 0, 1)
    return torch.from_numpy(y.reshape(n, h, w, n_components)).float()
