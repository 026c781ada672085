"""Capture activations of a diffusers U-Net during one forward pass::

    with Capture(unet, ["up-level1-repeat1-vit-block0-cross-q", "up-level1-repeat2-res-out"]) as cap:
        out = cap.run(sample, t, encoder_hidden_states=ehs)   # None when stopped early
    cap.cache["up-level1-repeat2-res-out"]                     # (B, C, H, W)

or in one call: ``out, cache = run_with_cache(unet, names, sample, t, encoder_hidden_states=ehs)``.

How each kind is read (nothing in diffusers is patched):

- module outputs (``res-out``, ``out``, ``vit-out``, ``*sampler-out``,
  ``unet-after-conv-in``, ``unet-out``, ``ffn-inner`` from ``ff.net.0``,
  ``res-increment`` from the ResNet's ``conv2``) and ``unet-in`` (the input of
  ``conv_in``) through forward hooks;
- ``self-q/k/v``, ``cross-q``, ``self-map`` and ``cross-map`` through an
  attention processor (:class:`CaptureAttnProcessor`) set only on the
  ``Attention`` modules that are captured and restored on exit. It wraps the
  module's own processor, so the output of the attention is computed exactly
  as without capture; probabilities are recomputed from the captured q and k
  with ``Attention.get_attention_scores`` (the explicit, non-fused path) only
  when a map is requested.

Tensor layouts are documented in :mod:`difstudy.catalog`. Hooks are removed
and processors restored in ``__exit__``, also when the forward raises. With
``stop=True`` the forward is interrupted right after the last requested
activation is recorded, so no later module runs.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn as nn

from .catalog import MAP_KINDS, QKV_KINDS, Catalog


class StopForward(Exception):
    """Raised inside the forward pass once every requested activation is recorded."""


def _first_tensor(out):
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "sample"):
        return out.sample
    if isinstance(out, (tuple, list)):
        return out[0]
    raise TypeError(f"cannot read a tensor from module output of type {type(out).__name__}")


def _tokens_to_map(x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """(B, H*W, C) -> (B, C, H, W)."""
    b, n, c = x.shape
    h, w = hw
    if h * w != n:
        raise RuntimeError(f"token count {n} does not match the spatial size {h}x{w}")
    return x.transpose(1, 2).reshape(b, c, h, w)


def attention_probs(attn, q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """(B, heads, Lq, Lk) attention probabilities of a diffusers ``Attention`` from its ``to_q`` /
    ``to_k`` outputs (B, L, heads * d), on the explicit path (``get_attention_scores``); ``mask``:
    as ``prepare_attention_mask`` returns it."""
    probs = attn.get_attention_scores(attn.head_to_batch_dim(q), attn.head_to_batch_dim(k), mask)
    return probs.reshape(q.shape[0], attn.heads, *probs.shape[1:])


class CaptureAttnProcessor:
    """Wraps an attention processor to read q, k, v and attention probabilities.

    ``wanted`` maps kind (``self-q``, ``self-k``, ``self-v``, ``self-map``,
    ``cross-q``, ``cross-map``) to the activation name to record it under.
    """

    def __init__(self, inner, wanted: dict[str, str], capture: Capture, transformer_path: str):
        self.inner = inner
        self.wanted = wanted
        self.capture = capture
        self.transformer_path = transformer_path
        need = set()
        for kind in wanted:
            if kind in MAP_KINDS:
                need |= {"q", "k"}
            else:
                need.add(kind.split("-")[1])
        self.need = sorted(need)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kw):
        got: dict[str, torch.Tensor] = {}
        handles = [
            getattr(attn, f"to_{x}").register_forward_hook(lambda m, i, o, x=x: got.__setitem__(x, o))
            for x in self.need
        ]
        try:
            out = self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kw)
        finally:
            for h in handles:
                h.remove()
        hw = self.capture._spatial[self.transformer_path]
        for kind, name in self.wanted.items():
            if kind in QKV_KINDS:
                self.capture._record(name, _tokens_to_map(got[kind.split("-")[1]], hw), check_stop=False)
        for kind, name in self.wanted.items():
            if kind in MAP_KINDS:
                self.capture._record(name, attention_probs(attn, got["q"], got["k"]), check_stop=False)
        self.capture._maybe_stop()
        return out


class Capture:
    """Context manager recording activations (paper names or module paths).

    Parameters
    ----------
    unet: a diffusers ``UNet2DConditionModel``, or a diffusion transformer
        (``PixArtTransformer2DModel``, ``SD3Transformer2DModel``, ``FluxTransformer2DModel``:
        :mod:`difstudy.capture_dit`).
    names: activation names, named sets (``ours-v1.5``, ``all``) or module paths.
    stop: interrupt the forward after the last requested activation.
    dtype / device: convert captured tensors (e.g. ``torch.float16``, ``"cpu"``)
        as they are recorded, so GPU memory is freed early.
    catalog: a prebuilt :class:`Catalog` of ``unet`` (built if omitted).
    """

    def __init__(
        self,
        unet: nn.Module,
        names: str | Iterable[str],
        stop: bool = True,
        dtype: torch.dtype | None = None,
        device: str | torch.device | None = None,
        catalog: Catalog | None = None,
    ):
        self.unet = unet
        self.catalog = catalog or Catalog(unet)
        self.names = self.catalog.resolve(names)
        if not self.names:
            raise ValueError("no activations requested")
        self.stop = stop
        self.dtype, self.device = dtype, device
        self.cache: dict[str, torch.Tensor] = {}
        self._handles: list = []
        self._processors: list = []
        self._spatial: dict[str, tuple[int, int]] = {}
        self._active = False

    # -- recording -------------------------------------------------------
    def _record(self, name: str, t: torch.Tensor, check_stop: bool = True) -> None:
        t = t.detach()
        if self.device is not None or self.dtype is not None:
            t = t.to(device=self.device, dtype=self.dtype)
        self.cache[name] = t
        if check_stop:
            self._maybe_stop()

    def _maybe_stop(self) -> None:
        if self.stop and len(self.cache) == len(self.names):
            raise StopForward

    # -- installing ------------------------------------------------------
    def __enter__(self) -> Capture:
        if self._active:
            raise RuntimeError("this Capture is already active")
        self._active = True
        try:
            self._install()
        except BaseException:
            self._remove()
            raise
        return self

    def __exit__(self, *exc) -> bool:
        self._remove()
        return False

    def _install(self) -> None:
        mods = dict(self.unet.named_modules())
        if self.catalog.family != "unet":  # a diffusion transformer: difstudy.capture_dit
            from .capture_dit import DitHooks

            self._handles += DitHooks(self).install(mods)
            return
        hooks: dict[str, list[tuple[str, str]]] = {}
        attn: dict[str, dict[str, str]] = {}
        transformers: set[str] = set()
        for name in self.names:
            if name not in self.catalog:  # raw module path
                hooks.setdefault(name, []).append((name, "raw"))
                continue
            a = self.catalog[name]
            if a.kind in QKV_KINDS or a.kind in MAP_KINDS:
                attn.setdefault(a.module, {})[a.kind] = name
                transformers.add(_transformer_of(a.module))
            elif a.kind == "unet-in":
                self._handles.append(mods[a.module].register_forward_pre_hook(self._pre_hook(name)))
            else:
                hooks.setdefault(a.module, []).append((name, a.kind))
                if a.kind in ("ffn-inner", "out"):
                    transformers.add(_transformer_of(a.module))
        for path in sorted(transformers):
            self._handles.append(mods[path].register_forward_pre_hook(self._spatial_hook(path)))
        for path, items in hooks.items():
            self._handles.append(mods[path].register_forward_hook(self._hook(path, items)))
        for path, wanted in attn.items():
            m = mods[path]
            orig = m.processor
            self._processors.append((m, orig))
            m.set_processor(CaptureAttnProcessor(orig, wanted, self, _transformer_of(path)))

    def _remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for m, orig in reversed(self._processors):
            m.set_processor(orig)
        self._processors.clear()
        self._active = False

    def _pre_hook(self, name):
        def hook(module, args):
            self._record(name, args[0])

        return hook

    def _spatial_hook(self, path):
        def hook(module, args, kwargs=None):
            x = args[0] if args else kwargs["hidden_states"]
            self._spatial[path] = tuple(x.shape[-2:])

        return hook

    def _hook(self, path, items):
        tpath = _transformer_of(path) if ".transformer_blocks." in path else None

        def hook(module, args, out):
            t = _first_tensor(out)
            for name, kind in items:
                if kind in ("out", "ffn-inner"):
                    self._record(name, _tokens_to_map(t, self._spatial[tpath]), check_stop=False)
                else:
                    self._record(name, t, check_stop=False)
            self._maybe_stop()

        return hook

    # -- running ---------------------------------------------------------
    def run(self, *args, **kwargs):
        """Call the U-Net; returns its output, or None if stopped early.
        Clears the cache of any previous run first."""
        if not self._active:
            raise RuntimeError("use Capture as a context manager: `with Capture(unet, names) as cap: cap.run(...)`")
        self.cache = {}
        self._spatial = {}
        try:
            with torch.no_grad():
                out = self.unet(*args, **kwargs)
        except StopForward:
            return None
        missing = [n for n in self.names if n not in self.cache]
        if missing:
            raise RuntimeError(f"the forward pass finished without producing {missing[:5]}")
        return out


def _transformer_of(module_path: str) -> str:
    """'up_blocks.1.attentions.0.transformer_blocks.0.attn1' -> 'up_blocks.1.attentions.0'."""
    return module_path.split(".transformer_blocks.")[0]


def run_with_cache(unet, names, *args, stop: bool = True, catalog: Catalog | None = None, **kwargs):
    """One forward pass with capture: returns ``(output_or_None, {name: tensor})``."""
    with Capture(unet, names, stop=stop, catalog=catalog) as cap:
        out = cap.run(*args, **kwargs)
    return out, cap.cache


# -- batching of timesteps and conditioning variants ---------------------------
def expand_batch(latents: torch.Tensor, timesteps, conds: torch.Tensor, per_image: bool = False):
    """Lay out N images x T timesteps x V conditioning variants as one batch.

    latents: (N, C, h, w) or (N, T, C, h, w) already-noised latents per timestep;
    timesteps: sequence of T ints; conds: (V, L, D) text embeddings shared by
    all images, or with ``per_image`` (N, V, ...) one row per image (captions
    differ per image; any trailing shape, e.g. SDXL's pooled (N, V, P)).
    Returns ``(sample (N*T*V, C, h, w), t (N*T*V,), ehs (N*T*V, ...))`` in
    (n, t, v) order; :func:`split_batch` undoes it.
    """
    ts = torch.as_tensor(list(timesteps), dtype=torch.long, device=latents.device)
    n, T = latents.shape[0], len(ts)
    if per_image and conds.shape[0] != n:
        raise ValueError(f"per-image conditioning has {conds.shape[0]} rows for {n} images")
    per = conds if per_image else conds[None].expand(n, *conds.shape)  # (N, V, ...)
    V = per.shape[1]
    if latents.dim() == 4:
        latents = latents[:, None].expand(n, T, *latents.shape[1:])
    if latents.shape[1] != T:
        raise ValueError(f"latents have {latents.shape[1]} timesteps, expected {T}")
    sample = latents[:, :, None].expand(n, T, V, *latents.shape[2:]).reshape(n * T * V, *latents.shape[2:])
    t = ts[None, :, None].expand(n, T, V).reshape(-1)
    ehs = per[:, None].expand(n, T, *per.shape[1:]).reshape(n * T * V, *per.shape[2:])
    return sample, t, ehs


def split_batch(x: torch.Tensor, n: int, T: int, V: int) -> torch.Tensor:
    """(N*T*V, ...) -> (N, T, V, ...)."""
    return x.reshape(n, T, V, *x.shape[1:])
