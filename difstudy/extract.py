"""Feature extraction: a dataset through a diffusion U-Net into the feature cache.

The papers' protocol (Meng et al.; GATE): encode the image with the VAE
(posterior mean, scaled), add scheduler noise for timestep ``t`` with a noise
draw fixed per (image, t, seed), run **one** U-Net forward without
classifier-free guidance and read the activations, stopping right after the
last requested one.

Batching: a batch of B images, T timesteps and V conditioning variants is one
forward of B*T*V samples; the VAE runs once per image and the text encoder
once per distinct prompt (embeddings are memoised). A conditioning variant is
a named prompt rule: ``empty`` (""), ``generic`` (the image's caption, e.g.
"a photo of a bird"), ``fine`` (its fine-grained caption) or ``text:<prompt>``
(one literal prompt for all images). Later GATE techniques are further
variants of the same forward and cache.

Stored features are (C, H, W) per image: spatial activations as captured;
attention maps (``self-map``/``cross-map``) averaged over heads and laid out
as (keys, H, W) so that every entry is a feature map.
"""

from __future__ import annotations

import hashlib
import json
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from .cache import FeatureCache, Key
from .capture import Capture
from .catalog import Catalog
from .errors import DifstudyError

BUILTIN_VARIANTS = ("empty", "generic", "fine")


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
    notes: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        rate = self.images / self.seconds if self.seconds else 0.0
        return (
            f"extract: {self.computed} feature maps computed, {self.reused} reused, {self.repaired} repaired "
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


def noise_for(image_id: str, t: int, seed: int, shape, dtype=torch.float32) -> torch.Tensor:
    """The noise draw for (image, t, seed): identical across runs, batches and variants."""
    s = zlib.crc32(f"{seed}|{t}|{image_id}".encode())
    return torch.randn(shape, generator=torch.Generator().manual_seed(s), dtype=torch.float32).to(dtype)


# -- the extractor ----------------------------------------------------------------
class Extractor:
    """Holds a pipeline and runs the protocol on batches of images.

    ``Extractor(pipe, activations, timesteps=(50,), variants=("empty",), seed=0, image_size=None)``;
    :meth:`features` returns ``{Key: tensor}`` for a batch, :func:`extract`
    drives it over a dataset into a cache.
    """

    def __init__(
        self, pipe, activations, timesteps=(50,), variants=("empty",), seed=0, image_size=None, stop_early=True
    ):
        from .models import vae_scale_factor

        self.pipe = pipe
        self.unet = pipe.unet
        self.device = self.unet.device
        self.dtype = self.unet.dtype
        self.factor = vae_scale_factor(pipe)
        native = self.unet.config.sample_size * self.factor
        self.image_size = int(image_size or native)
        mult = self.factor * 2 ** (len(self.unet.config.block_out_channels) - 1)
        if self.image_size % mult:
            raise DifstudyError(
                f"image size {self.image_size} is not a multiple of {mult} (VAE factor {self.factor} x "
                f"{mult // self.factor} for the U-Net's downsamplers); try {max(mult, round(self.image_size / mult) * mult)}"
            )
        n_train = pipe.scheduler.config.num_train_timesteps
        self.timesteps = [int(t) for t in timesteps]
        bad = [t for t in self.timesteps if not 0 <= t < n_train]
        if bad:
            raise DifstudyError(
                f"timesteps {bad} out of range: the scheduler has {n_train} steps, use 0 <= t < {n_train}"
            )
        for v in variants:
            prompt_for(v, {"generic": "x", "fine": "x"})  # validates the name
        self.variants = list(variants)
        self.seed = int(seed)
        text_len = pipe.tokenizer.model_max_length
        self.catalog = Catalog(self.unet, latent_size=self.image_size // self.factor, text_len=text_len)
        self.names = self.catalog.resolve(activations)
        self.stop_early = stop_early
        self._text: dict[str, tuple] = {}
        self.is_xl = getattr(self.unet.config, "addition_embed_type", None) == "text_time"

    # text encoder once per distinct prompt
    @torch.no_grad()
    def _embed(self, prompt: str):
        if prompt not in self._text:
            if self.is_xl:
                e, _, pooled, _ = self.pipe.encode_prompt(prompt, device=self.device, do_classifier_free_guidance=False)
                self._text[prompt] = (e[0], pooled[0])
            else:
                e, _ = self.pipe.encode_prompt(prompt, self.device, 1, False)
                self._text[prompt] = (e[0], None)
        return self._text[prompt]

    @torch.no_grad()
    def encode_images(self, images: list[np.ndarray]) -> torch.Tensor:
        """VAE posterior means, scaled: (B, 4, h, w)."""
        x = torch.stack([to_tensor(im, self.image_size) for im in images]).to(self.device)
        vae = self.pipe.vae
        upcast = self.dtype == torch.float16 and getattr(vae.config, "force_upcast", False)
        vdtype = torch.float32 if upcast else vae.dtype
        if upcast:
            vae = vae.to(torch.float32)
        z = vae.encode(x.to(vdtype)).latent_dist.mean * vae.config.scaling_factor
        if upcast:
            vae.to(self.dtype)
        return z.to(self.dtype)

    @torch.no_grad()
    def features(self, ids: Sequence[str], images: list[np.ndarray], captions: list[dict]) -> dict[Key, torch.Tensor]:
        B, T, V = len(ids), len(self.timesteps), len(self.variants)
        z0 = self.encode_images(images)
        sched = self.pipe.scheduler
        noisy = []
        for b, iid in enumerate(ids):
            for t in self.timesteps:
                n = noise_for(iid, t, self.seed, z0.shape[1:]).to(self.device, self.dtype)
                noisy.append(sched.add_noise(z0[b : b + 1], n[None], torch.tensor([t], device=self.device)))
        sample = torch.cat(noisy).reshape(B, T, *z0.shape[1:])
        sample = sample[:, :, None].expand(B, T, V, *z0.shape[1:]).reshape(B * T * V, *z0.shape[1:])
        tt = torch.tensor(self.timesteps, device=self.device)[None, :, None].expand(B, T, V).reshape(-1)
        embs = [[self._embed(prompt_for(v, captions[b])) for v in self.variants] for b in range(B)]
        ehs = torch.stack([torch.stack([e for e, _ in row]) for row in embs])  # (B, V, L, D)
        ehs = ehs[:, None].expand(B, T, *ehs.shape[1:]).reshape(B * T * V, *ehs.shape[2:])
        kw = dict(encoder_hidden_states=ehs)
        if self.is_xl:
            pooled = torch.stack([torch.stack([p for _, p in row]) for row in embs])
            pooled = pooled[:, None].expand(B, T, *pooled.shape[1:]).reshape(B * T * V, -1)
            s = self.image_size
            time_ids = torch.tensor([s, s, 0, 0, s, s], device=self.device, dtype=self.dtype).expand(B * T * V, 6)
            kw["added_cond_kwargs"] = dict(text_embeds=pooled, time_ids=time_ids)
        with Capture(self.unet, self.names, stop=self.stop_early, catalog=self.catalog) as cap:
            cap.run(sample, tt, **kw)
        out: dict[Key, torch.Tensor] = {}
        for name, val in cap.cache.items():
            a = self.catalog[name] if name in self.catalog else None
            if a is not None and a.is_map:  # (N, heads, Nq, Nk) -> (N, Nk, H, W)
                h, w = self.catalog[name.replace("-map", "-q")].shape[1:]
                val = val.float().mean(1).transpose(1, 2).reshape(val.shape[0], -1, h, w)
            val = val.reshape(B, T, V, *val.shape[1:])
            for b, iid in enumerate(ids):
                for j, t in enumerate(self.timesteps):
                    for k, v in enumerate(self.variants):
                        out[Key(name, t, variant_key(v), self.seed, iid)] = val[b, j, k]
        return out


def cache_group(pipe, model_name: str, image_size: int, store_dtype: torch.dtype) -> tuple[str, dict]:
    """Group folder name and metadata: features of different models/sizes never mix."""
    # private keys ("_use_default_values" is a list whose order changes from process to process,
    # "_name_or_path", "_diffusers_version") do not describe the network: leave them out
    cfg = {k: v for k, v in dict(pipe.unet.config).items() if not k.startswith("_")}
    cfg = json.dumps(cfg, sort_keys=True, default=str)
    # fingerprint of the weights: exact bytes of a strided sample of every parameter
    # (independent of device and thread count, cheap even for SDXL)
    h = hashlib.sha1(cfg.encode())
    for p in pipe.unet.parameters():
        h.update(p.detach().flatten()[::997].float().cpu().numpy().tobytes())
    digest = h.hexdigest()[:12]
    slug = "".join(c if c.isalnum() or c in "-_." else "_" for c in str(model_name))[-40:]
    meta = dict(
        model=str(model_name), unet_digest=digest, image_size=image_size, dtype=str(store_dtype).replace("torch.", "")
    )
    return f"{slug}-{digest}-s{image_size}-{meta['dtype']}", meta


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
) -> tuple[FeatureCache, Summary]:
    """Extract ``activations`` for every image of ``dataset`` into ``cache_dir``.

    ``model``: a pipeline or a name for :func:`difstudy.models.load`.
    ``dataset``: a sequence of ToySample or loader dicts (``image``, ``image_id``,
    optional captions). Resumable: only missing entries are computed; corrupt
    shards are detected by checksum and recomputed. Returns the cache and a
    :class:`Summary`.
    """
    from .models import load

    t0 = time.time()
    if isinstance(model, str):
        model_name = model_name or model
        model = load(model, dtype=dtype, device=device)
    model_name = model_name or getattr(model, "name_or_path", None) or type(model).__name__
    ex = Extractor(model, activations, timesteps, variants, seed, image_size)
    group, meta = cache_group(model, model_name, ex.image_size, store_dtype)
    cache = FeatureCache(cache_dir, group, meta)
    summary = Summary(cache_dir=str(cache.dir))
    summary.repaired = len(cache.verify())
    n = len(dataset)
    ids_all = [None] * n
    batches = [list(range(i, min(i + batch_size, n))) for i in range(0, n, batch_size)]

    def keys_of(ids):
        return [
            Key(a, t, variant_key(v), ex.seed, i)
            for i in ids
            for a in ex.names
            for t in ex.timesteps
            for v in ex.variants
        ]

    def batch_key(ids):
        spec = json.dumps([ids, ex.names, ex.timesteps, [variant_key(v) for v in ex.variants], ex.seed])
        return hashlib.sha1(spec.encode()).hexdigest()[:16]

    pending = list(batches)
    bar = tqdm(
        total=n,
        desc=f"extract {len(ex.names)} acts x {len(ex.timesteps)} t x {len(ex.variants)} var",
        unit="img",
        disable=not progress,
    )
    while pending:
        busy = []
        for idx in pending:
            items = [_item(dataset, i) for i in idx]
            ids = [it[0] for it in items]
            for i, iid in zip(idx, ids):
                ids_all[i] = iid
            cache.refresh()
            todo = cache.missing(keys_of(ids))
            if not todo:
                summary.reused += len(keys_of(ids))
                bar.update(len(idx))
                continue
            bk = batch_key(ids)
            lock = cache.claim(bk)
            if lock is None:  # another process computes this batch
                busy.append(idx)
                continue
            try:
                cache.refresh()
                todo = cache.missing(keys_of(ids))
                if todo:
                    need = sorted({k.image_id for k in todo})
                    sel = [it for it in items if it[0] in need]
                    feats = ex.features([s[0] for s in sel], [s[1] for s in sel], [s[2] for s in sel])
                    feats = {k: v.to(store_dtype) for k, v in feats.items() if k in set(todo)}
                    cache.write(bk, feats, extra=dict(model=model_name))
                    summary.computed += len(feats)
                    summary.images += len(sel)
                summary.reused += len(keys_of(ids)) - len(todo)
            finally:
                lock.release()
            bar.update(len(idx))
        if busy:
            summary.skipped_busy += len(busy)
            time.sleep(0.5)
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

    Fitted jointly over all images (or ``fit_on``), as in the papers' PCA pictures."""
    from sklearn.decomposition import PCA

    x = feat.float()
    n, c, h, w = x.shape
    flat = x.permute(0, 2, 3, 1).reshape(-1, c).numpy()
    ref = flat if fit_on is None else fit_on.float().permute(0, 2, 3, 1).reshape(-1, c).numpy()
    pca = PCA(n_components=n_components, random_state=0).fit(ref)
    y = pca.transform(flat)
    lo, hi = np.percentile(y, 1, axis=0), np.percentile(y, 99, axis=0)
    y = np.clip((y - lo) / (hi - lo + 1e-8), 0, 1)
    return torch.from_numpy(y.reshape(n, h, w, n_components)).float()


# -- CLI ----------------------------------------------------------------------------
def _run_cli(a) -> None:
    from .data.loaders import load_dataset

    if a.dataset.startswith("toyworld"):
        from .data.toyworld import ToyWorld

        split = a.dataset.split(":", 1)[1] if ":" in a.dataset else "test"
        ds = ToyWorld(split, n=a.n, size=a.toy_size)
    else:
        kind, _, root = a.dataset.partition(":")
        ds = load_dataset(kind, root)
        if a.n:
            ds = [ds[i] for i in range(min(a.n, len(ds)))]
    extract(
        a.model,
        ds,
        a.acts,
        timesteps=a.t,
        variants=a.variants,
        seed=a.seed,
        image_size=a.size,
        batch_size=a.batch,
        cache_dir=a.cache,
        dtype=a.dtype,
        device=a.device,
        store_dtype=torch.float16 if a.store == "fp16" else torch.float32,
    )


def add_cli(sub) -> None:
    p = sub.add_parser("extract", help="extract activations of a dataset into the feature cache")
    p.add_argument("--model", default="mini")
    p.add_argument(
        "--dataset",
        default="toyworld:test",
        help="toyworld[:split] or KIND:ROOT (spair, horse21, ade20k, cityscapes, cifar10...)",
    )
    p.add_argument("--n", type=int, default=None, help="number of images (default: all)")
    p.add_argument("--toy-size", type=int, default=64)
    p.add_argument(
        "--acts",
        nargs="+",
        default=["ours-v1.5"],
        help="paper names, module paths or sets (ours-v1.5, legacy-v1.5, ours-xl, legacy-xl, all)",
    )
    p.add_argument("--t", nargs="+", type=int, default=[50])
    p.add_argument("--variants", nargs="+", default=["empty"], help="empty, generic, fine or text:<prompt>")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=None, help="image size (default: the model's native size)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--cache", default="cache/features")
    p.add_argument("--dtype", default=None, help="model dtype: fp32, fp16, bf16")
    p.add_argument("--device", default=None)
    p.add_argument("--store", choices=["fp16", "fp32"], default="fp16")
    p.set_defaults(fn=_run_cli)
