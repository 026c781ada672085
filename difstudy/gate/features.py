"""GATE, step 3: extraction with techniques as variants, into the feature cache, and the
techniques as feature sources of the protocol layer.

All techniques of a batch go through **one** U-Net forward (:class:`GateExtractor`): rows
without a ControlNet get zero residuals (adding 0 is exact) and LoRA rows are
routed through peft's mixed-adapter batches (``adapter_names``; other rows use
``__base__``), with capture and early stop as usual. Each technique is a cache
variant: a prompt-only technique has exactly the key of that prompt variant
(``fine`` features from ``difstudy extract --variants fine`` are reused), a
ControlNet/LoRA technique gets ``<prompt>+<name>-<digest of its weights>``.
The official code runs one full extraction per technique.

:func:`extract_techniques` fills the feature cache (resumable, as
:func:`difstudy.extract.extract`); :class:`TechniqueFeatures` reads one bucket
``(technique, t)`` of it as a :class:`difstudy.protocols.FeatureSource`.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ..cache import FeatureCache, Key
from ..capture import Capture, split_batch
from ..errors import DifstudyError
from ..extract import (
    Extractor,
    Summary,
    cache_group,
    ddpm_noise,
    image_digest,
    noise_for,
    variant_key,
)
from .noising import ddim_invert, denoise, denoising_steps
from .techniques import (
    BASIC,
    Technique,
    _adapter_rows,
    _check_controlnet,
    _has_peft_layers,
    _remove_adapters,
    _weights_digest,
    adapter_name,
    base_fingerprint,
    control_images,
    load_controlnet,
    load_lora,
    trained_canny,
)


# -- extraction with techniques as variants ------------------------------------------
class GateExtractor(Extractor):
    """The extraction protocol of :class:`difstudy.extract.Extractor` with techniques as variants.

    ``GateExtractor(pipe, activations, techniques=(BASIC,), timesteps=(50,), seed=0)``; use it as a
    context manager (LoRA adapters are loaded into ``pipe.unet`` for its lifetime and removed on
    exit). :meth:`features` returns ``{Key: tensor}`` with ``Key.variant`` = :attr:`variant_keys`.
    """

    def __init__(
        self, pipe, activations, techniques=(BASIC,), timesteps=(50,), seed=0, image_size=None, stop_early=True
    ):
        from diffusers import DDPMScheduler

        techniques = tuple(techniques)
        names = [tq.name for tq in techniques]
        if not techniques or len(set(names)) != len(names):
            raise DifstudyError(f"techniques need distinct names, got {names}")
        super().__init__(pipe, activations, timesteps, [tq.prompt for tq in techniques], seed, image_size, stop_early)
        self.techniques = techniques
        # x0 from the model output for any prediction type (noising itself is the Extractor's ddpm_noise)
        self.step_scheduler = DDPMScheduler.from_config(pipe.scheduler.config, clip_sample=False, thresholding=False)
        self._had_peft = _has_peft_layers(self.unet)
        self.controlnets: dict[int, Any] = {}
        self.canny: dict[int, str] = {}  # technique index -> Canny detector of its condition
        self.adapters: dict[int, str] = {}
        self.variant_keys: list[str] = []
        # the U-Net's own fingerprint, taken once: adapters trained by difstudy record the U-Net
        # they were trained on and are refused on another one
        adapters = any(tq.controlnet is not None or tq.lora is not None for tq in techniques)
        base = base_fingerprint(self.unet) if adapters else None
        try:
            for v, tq in enumerate(techniques):
                parts = []
                if tq.controlnet is not None:
                    cn = load_controlnet(
                        tq.controlnet, dtype=self.dtype, device=self.device, unet=self.unet, unet_fingerprint=base
                    )
                    _check_controlnet(cn, self.unet, tq.name)
                    self.controlnets[v] = cn
                    self.canny[v] = tq.canny or trained_canny(tq.controlnet)
                    parts.append(_weights_digest(cn.named_parameters()))
                    parts.append(f"{tq.conditioning_scale:g}/{self.canny[v]}/{tq.canny_sigma:g}/span{tq.span}")
                if tq.span and tq.controlnet is None:
                    parts.append(f"span{tq.span}")
                if tq.noising != "ddpm":
                    parts.append(tq.noising)
                if tq.noise_seed:
                    parts.append(f"seed+{tq.noise_seed}")
                if tq.lora is not None:
                    adapter = adapter_name(tq.name)
                    parts.append(load_lora(pipe, tq.lora, adapter, unet_fingerprint=base))
                    if tq.lora_scale != 1.0:
                        parts.append(f"x{tq.lora_scale:g}")
                    self.adapters[v] = adapter
                key = variant_key(tq.prompt)
                if parts:
                    key += f"+{tq.name}-" + hashlib.sha1("|".join(parts).encode()).hexdigest()[:10]
                self.variant_keys.append(key)
            if self.adapters:  # each adapter's weight (peft scaling), used by its rows
                vs = sorted(self.adapters)
                self.unet.set_adapters([self.adapters[v] for v in vs], [techniques[v].lora_scale for v in vs])
        except BaseException:
            self.close()
            raise

    def adapter_of(self, technique) -> str | None:
        """The name of the adapter this extractor loaded for ``technique`` (None: it loaded none)."""
        for v, tq in enumerate(self.techniques):
            if tq == technique and v in self.adapters:
                return self.adapters[v]
        return None

    def close(self) -> None:
        """Remove the LoRA adapters loaded for the techniques (all peft layers when the U-Net had
        none before, so its module tree, and with it its cache group, is as it was)."""
        if self.adapters:
            _remove_adapters(self.unet, list(self.adapters.values()), self._had_peft)
            self.adapters = {}

    def __enter__(self) -> GateExtractor:
        return self

    def __exit__(self, *exc) -> bool:
        self.close()
        return False

    def _rows_kwargs(self, kw: dict, rows: torch.Tensor) -> dict:
        """The U-Net conditioning of ``rows`` only (text, and SDXL's extra conditioning)."""
        out = dict(encoder_hidden_states=kw["encoder_hidden_states"][rows])
        if self.is_xl:
            out["added_cond_kwargs"] = {k: x[rows] for k, x in kw["added_cond_kwargs"].items()}
        return out

    def _residuals(self, v: int, x: torch.Tensor, t: torch.Tensor, rkw: dict, cond: torch.Tensor):
        """ControlNet residuals ``(down, mid)`` of technique ``v`` for latents ``x`` at ``t``."""
        extra = {"added_cond_kwargs": rkw["added_cond_kwargs"]} if "added_cond_kwargs" in rkw else {}
        return self.controlnets[v](
            x,
            t,
            encoder_hidden_states=rkw["encoder_hidden_states"],
            controlnet_cond=cond,
            conditioning_scale=self.techniques[v].conditioning_scale,
            return_dict=False,
            **extra,
        )

    def _model_fn(self, v: int, rkw: dict, cond: torch.Tensor | None):
        """``(x, s) -> U-Net output`` of technique ``v`` for a batch of its rows: its LoRA
        adapter, and its ControlNet when ``cond`` is given (the guided denoising steps)."""
        names = [self.adapters.get(v, "__base__")] * len(rkw["encoder_hidden_states"]) if self.adapters else None

        def run(x: torch.Tensor, s: int) -> torch.Tensor:
            ts = torch.full((len(x),), int(s), device=self.device, dtype=torch.long)
            extra = {"added_cond_kwargs": rkw["added_cond_kwargs"]} if "added_cond_kwargs" in rkw else {}
            if cond is not None:
                d, m = self._residuals(v, x, ts, rkw, cond)
                extra.update(down_block_additional_residuals=d, mid_block_additional_residual=m)
            with _adapter_rows(self.unet, names):
                return self.unet(x, ts, encoder_hidden_states=rkw["encoder_hidden_states"], **extra).sample

        return run

    @torch.no_grad()
    def _path_latents(self, v: int, t: int, z0, images, rkw: dict, cond: torch.Tensor | None) -> torch.Tensor:
        """Latents at ``t`` of technique ``v``'s rows at ``t`` (one per image), by its official
        path (:mod:`difstudy.gate.noising`): DDPM noising or DDIM inversion to the start, then
        ControlNet-guided scheduler steps down to ``t`` when it has a denoising span."""
        tq = self.techniques[v]
        sched, steps = denoising_steps(self.pipe.scheduler, t, tq.span) if tq.span else (None, [])
        start = steps[0] if steps else t
        if tq.noising == "ddim-inversion":
            pred_type = self.pipe.scheduler.config.get("prediction_type", "epsilon")
            x = ddim_invert(self._model_fn(v, rkw, None), z0, start, self.alphas_cumprod, pred_type)
        else:
            keys = [image_digest(im) for im in images]
            noise = torch.stack([noise_for(k, start, self.seed + tq.noise_seed, z0.shape[1:]) for k in keys])
            x = ddpm_noise(z0, noise, start, self.alphas_cumprod)
        if steps:
            x = denoise(self._model_fn(v, rkw, cond), sched, x, steps)
        return x.to(z0.dtype)

    @torch.no_grad()
    def unet_inputs(self, images, captions, z0=None):
        """``(sample, t, kwargs, adapter_names)`` of the one feature forward of B images x T
        timesteps x V techniques, rows in (b, t, v) order: :meth:`Extractor.unet_kwargs` with
        each technique's latents brought to t by its path (:meth:`_path_latents`: DDPM noising
        by default), the techniques' ControlNet residuals (zeros on other rows) and per-row
        LoRA adapter names."""
        B, T, V = len(images), len(self.timesteps), len(self.techniques)
        N = B * T * V
        z0 = self.encode_images(images) if z0 is None else z0
        sample, tt, kw = self.unet_kwargs(captions, self.noisy_latents(z0, images))
        conds = {
            v: control_images(images, self.image_size, self.techniques[v].canny_sigma, self.canny[v]).to(
                self.device, self.dtype
            )
            for v in self.controlnets
        }
        if any(tq.own_path for tq in self.techniques):
            sample = sample.clone()  # may be an expanded view shared by the techniques' rows
        for v, tq in enumerate(self.techniques):
            if tq.own_path:
                for j, t in enumerate(self.timesteps):
                    rows = torch.arange(B, device=self.device) * T * V + j * V + v
                    rkw = self._rows_kwargs(kw, rows)
                    sample[rows] = self._path_latents(v, t, z0, images, rkw, conds.get(v))
        tech = torch.arange(V, device=self.device).repeat(B * T)
        if self.controlnets:
            down, mid = None, None
            for v in self.controlnets:
                rows = (tech == v).nonzero().flatten()
                d, m = self._residuals(
                    v, sample[rows], tt[rows], self._rows_kwargs(kw, rows), conds[v][rows // (T * V)]
                )
                if down is None:  # rows without a ControlNet add zeros, which is exact
                    down = [x.new_zeros((N, *x.shape[1:])) for x in d]
                    mid = m.new_zeros((N, *m.shape[1:]))
                for full, part in zip(down, d):
                    full[rows] = part
                mid[rows] = m
            kw["down_block_additional_residuals"] = down
            kw["mid_block_additional_residual"] = mid
        names = [self.adapters.get(int(v), "__base__") for v in tech] if self.adapters else None
        return sample, tt, kw, names

    @torch.no_grad()
    def features(
        self, ids: Sequence[str], images: list[np.ndarray], captions: list[dict], store_dtype=None
    ) -> dict[Key, torch.Tensor]:
        """``{Key: (C, H, W)}`` for one batch, ``Key.variant`` from :attr:`variant_keys`; with
        ``store_dtype`` on the CPU in that dtype."""
        B, T, V = len(ids), len(self.timesteps), len(self.techniques)
        sample, tt, kw, adapter_names = self.unet_inputs(images, captions)
        with (
            _adapter_rows(self.unet, adapter_names),
            Capture(self.unet, self.names, stop=self.stop_early, catalog=self.catalog) as cap,
        ):
            cap.run(sample, tt, **kw)
        out: dict[Key, torch.Tensor] = {}
        for name, val in cap.cache.items():
            a = self.catalog[name] if name in self.catalog else None
            if a is not None and a.is_map:  # (N, heads, Nq, Nk) -> (N, Nk, H, W), as Extractor stores maps
                h, w = self.catalog[name.replace("-map", "-q")].shape[1:]
                val = val.float().mean(1).transpose(1, 2).reshape(val.shape[0], -1, h, w)
            if store_dtype is not None:
                val = val.to(dtype=store_dtype).cpu()
            val = split_batch(val, B, T, V)
            for b, iid in enumerate(ids):
                for j, t in enumerate(self.timesteps):
                    for k, vk in enumerate(self.variant_keys):
                        out[Key(name, t, vk, self.seed, iid)] = val[b, j, k]
        return out

    @torch.no_grad()
    def reconstruct_x0(self, images, captions) -> dict[tuple[str, int], np.ndarray]:
        """``{(technique name, t): (B, S, S, 3) uint8}``: the decoded ``pred_original_sample`` of
        the same forward that gives the features (one U-Net pass for all techniques and t)."""
        B, T, V = len(images), len(self.timesteps), len(self.techniques)
        sample, tt, kw, adapter_names = self.unet_inputs(images, captions)
        with _adapter_rows(self.unet, adapter_names):
            pred = self.unet(sample, tt, **kw).sample
        pred, sample = split_batch(pred, B, T, V), split_batch(sample, B, T, V)
        out = {}
        g = torch.Generator(device=self.device).manual_seed(self.seed)
        for j, t in enumerate(self.timesteps):
            for v, tq in enumerate(self.techniques):
                x0 = self.step_scheduler.step(pred[:, j, v], t, sample[:, j, v], generator=g).pred_original_sample
                out[(tq.name, t)] = decode_latents(self.pipe, x0)
        return out


def _vae_dtype(pipe):
    vae = pipe.vae
    upcast = vae.dtype == torch.float16 and getattr(vae.config, "force_upcast", False)
    return torch.float32 if upcast else vae.dtype


@torch.no_grad()
def decode_latents(pipe, latents: torch.Tensor) -> np.ndarray:
    """Scaled VAE latents -> (B, H, W, 3) uint8 through the VAE decoder."""
    vae, dt = pipe.vae, _vae_dtype(pipe)
    orig = vae.dtype
    if dt != orig:
        vae.to(dt)
    try:
        x = vae.decode(latents.to(dt) / vae.config.scaling_factor).sample
    finally:
        if dt != orig:
            vae.to(orig)
    return (x.float().clamp(-1, 1).add(1).mul(127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()).copy()


def _sample(ds, i):
    """(image_id, RGB uint8, captions dict, complexity or None) of a ToySample or a loader dict."""
    s = ds[i]
    if isinstance(s, dict):
        caps = {"generic": s.get("caption"), "fine": s.get("fine_caption")}
        return str(s["image_id"]), s["image"], caps, s.get("complexity")
    return s.image_id, s.image, {"generic": s.caption, "fine": s.fine_caption}, getattr(s, "complexity", None)


# -- extraction of techniques into the feature cache --------------------------------
def extract_techniques(
    model,
    dataset,
    activations,
    techniques=(BASIC,),
    timesteps=(50,),
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
    """:func:`difstudy.extract.extract` with techniques as variants: the same cache group (the
    base model's), keys and resumability; only missing (image, activation, t, technique) entries
    are computed, all techniques of a batch in one U-Net forward."""
    from ..models import load

    t0 = time.time()
    if isinstance(model, str):
        model_name = model_name or model
        model = load(model, dtype=dtype, device=device)
    model_name = model_name or getattr(model, "name_or_path", None) or type(model).__name__
    probe = Extractor(model, activations, timesteps, [tq.prompt for tq in techniques], seed, image_size)
    group, meta = cache_group(model, model_name, probe.image_size, store_dtype)  # before any LoRA is loaded
    cache = FeatureCache(cache_dir, group, meta)
    summary = Summary(cache_dir=str(cache.dir))
    summary.repaired = len(cache.verify())
    n = len(dataset)
    pending = [list(range(i, min(i + batch_size, n))) for i in range(0, n, batch_size)]
    seen: dict[str, int] = {}
    with GateExtractor(model, activations, techniques, timesteps, seed, probe.image_size) as ex:
        per_image = len(ex.names) * len(ex.timesteps) * len(ex.variant_keys)

        def keys_of(ids):
            return [Key(a, t, v, seed, i) for i in ids for a in ex.names for t in ex.timesteps for v in ex.variant_keys]

        def load_batch(idx):
            items = [_sample(dataset, i) for i in idx]
            for i, it in zip(idx, items):
                if seen.setdefault(it[0], i) != i:
                    raise DifstudyError(
                        f"image id {it[0]!r} names two images of the dataset (index {seen[it[0]]} and {i}); "
                        "ids key the feature cache: make them unique, e.g. '<dataset>/<split>/<path>'"
                    )
            digests = {it[0]: image_digest(it[1]) for it in items}
            for iid, d in digests.items():
                if cache.image_digest(iid) not in (None, d):
                    raise DifstudyError(
                        f"image id {iid!r} is cached in {cache.dir} for another image (different pixels); "
                        "namespace the ids or use another cache_dir"
                    )
            return items, digests

        bar = tqdm(total=n, desc=f"extract {len(techniques)} techniques", unit="img", disable=not progress)
        while pending:
            busy = []
            for idx in pending:
                items, digests = load_batch(idx)
                ids = [it[0] for it in items]
                if not cache.missing(keys_of(ids)):
                    summary.reused += len(ids) * per_image
                    bar.update(len(idx))
                    continue
                bk = hashlib.sha1(repr([ids, ex.names, ex.timesteps, ex.variant_keys, seed]).encode()).hexdigest()[:16]
                lock = cache.claim(bk)
                if lock is None:  # another process computes this batch
                    busy.append(idx)
                    continue
                try:
                    cache.refresh()
                    todo = set(cache.missing(keys_of(ids)))
                    if todo:
                        need = {k.image_id for k in todo}
                        sel = [it for it in items if it[0] in need]
                        feats = ex.features([s[0] for s in sel], [s[1] for s in sel], [s[2] for s in sel], store_dtype)
                        feats = {k: v for k, v in feats.items() if k in todo}
                        cache.write(bk, feats, extra=dict(model=model_name), images={i: digests[i] for i in need})
                        summary.computed += len(feats)
                        summary.images += len(sel)
                    summary.reused += len(ids) * per_image - len(todo)
                finally:
                    lock.release()
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


# -- techniques as feature sources of the protocol layer ----------------------------
def bucket_label(technique: str, t: int) -> str:
    """Table label of one bucket: ``"<technique> (t=<t>)"``."""
    return f"{technique} (t={t})"


class TechniqueFeatures:
    """A feature source (:class:`difstudy.protocols.FeatureSource`) of technique buckets.

    All ``techniques`` at all ``timesteps`` are extracted together (:func:`extract_techniques`:
    one U-Net forward per batch, one cache, keyed by image content as
    :class:`~difstudy.protocols.CachedFeatures`); :meth:`maps` reads the activations of the
    selected ``bucket`` ``(technique name, t)``. :meth:`bucket_maps` reads any bucket.

    Args:
        pipe: a loaded pipeline; activations: names or named sets;
        techniques: the techniques extracted together; timesteps: their timesteps;
        extraction: :class:`~difstudy.protocols.ExtractionConfig` (its ``t`` and ``variant`` unused);
        seed: noise-draw seed; bucket: ``(technique, t)`` that :meth:`maps` reads (default: the
        first technique at the first t); label: table label (default: the bucket's).
    """

    def __init__(
        self,
        pipe,
        activations: Sequence[str],
        techniques: Sequence[Technique],
        timesteps: Sequence[int] = (50,),
        extraction=None,
        seed: int = 0,
        model_name: str | None = None,
        bucket: tuple[str, int] | None = None,
        label: str | None = None,
    ):
        from ..catalog import Catalog
        from ..protocols import ExtractionConfig

        self.pipe, self.seed = pipe, int(seed)
        self.extraction = extraction or ExtractionConfig()
        self.activations, self.techniques = tuple(activations), tuple(techniques)
        self.timesteps = tuple(int(t) for t in timesteps)
        self.model_name = model_name or str(getattr(pipe, "name_or_path", "") or type(pipe).__name__)
        self.names = tuple(Catalog(pipe.unet).resolve(list(self.activations)))
        self.bucket = self._check_bucket(bucket or (self.techniques[0].name, self.timesteps[0]))
        self.label = label or bucket_label(*self.bucket)
        self._keys: dict[str, str] = {}
        self._variants: dict[str, str] = {}  # technique name -> cache variant key
        self._cache = None

    def _check_bucket(self, bucket) -> tuple[str, int]:
        name, t = bucket
        names = [tq.name for tq in self.techniques]
        if name not in names or int(t) not in self.timesteps:
            raise DifstudyError(
                f"bucket {bucket!r} is not extracted here: techniques {names}, timesteps {self.timesteps}"
            )
        return name, int(t)

    def select(self, bucket: tuple[str, int], label: str | None = None) -> TechniqueFeatures:
        """The same source (cache, seed, prepared images) reading another bucket."""
        import copy

        other = copy.copy(self)
        other.bucket = self._check_bucket(bucket)
        other.label = label or bucket_label(*other.bucket)
        return other

    def for_seed(self, seed: int) -> TechniqueFeatures:
        import copy

        if int(seed) == self.seed:
            return self
        other = copy.copy(self)
        other.seed, other._keys, other._cache = int(seed), dict(self._keys), None
        return other

    def prepare(self, records) -> None:
        """Extract every technique and t of every distinct image of ``records`` (cached entries reused)."""
        from ..protocols.features import ExtractionView, distinct_images

        positions, keys = distinct_images(records, self._keys)
        if not positions:
            return
        cfg = self.extraction
        if not self._variants:
            with GateExtractor(
                self.pipe, ["unet-out"], self.techniques, self.timesteps, self.seed, cfg.image_size
            ) as ex:
                self._variants = dict(zip([tq.name for tq in self.techniques], ex.variant_keys))
        self._cache, _ = extract_techniques(
            self.pipe,
            ExtractionView(records, positions, keys),
            list(self.names),
            self.techniques,
            self.timesteps,
            seed=self.seed,
            image_size=cfg.image_size,
            batch_size=cfg.batch_size,
            cache_dir=cfg.cache_dir,
            store_dtype=torch.float16 if cfg.store_dtype == "fp16" else torch.float32,
            model_name=self.model_name,
            progress=cfg.progress,
        )

    def bucket_maps(self, record, bucket: tuple[str, int]) -> list[torch.Tensor]:
        """The activations (C_i, h_i, w_i) float32 of ``record`` in ``bucket``."""
        from ..protocols import content_key

        if self._cache is None:
            raise DifstudyError(f"features of {self.label!r} were never extracted; call prepare(records) first")
        name, t = self._check_bucket(bucket)
        key = self._keys.get(record.image_id) or content_key(record.image)
        v = self._variants[name]
        return [self._cache.get(Key(n, t, v, self.seed, key)).float() for n in self.names]

    def maps(self, record) -> list[torch.Tensor]:
        return self.bucket_maps(record, self.bucket)
