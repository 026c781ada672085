"""Capture of diffusion-transformer activations (PixArt, SD3, FLUX) for :class:`difstudy.capture.Capture`.

Names and layouts are :mod:`difstudy.catalog_dit`'s. Everything is read through forward hooks and
pre-hooks (nothing in diffusers is patched and no processor is replaced, so the model's output is
computed exactly as without capture):

- ``transformer-in`` / ``transformer-out``: the model's input ``hidden_states`` / output sample;
  ``transformer-after-patch-embed``: the patch embedding's tokens;
- q / k / v: the outputs of the attention's ``to_q`` / ``to_k`` / ``to_v`` (before q/k norms and
  rotary embeddings, as the official code reads them); ``attn-out``: the image part of the
  attention module's output; ``norm-out``: the feed-forward's input (FLUX single-stream: the
  output of the block's AdaLN ``norm``); ``ffn-inner``: the output of ``ff.net.0``;
- ``out``: the image stream of the block's output; ``increment``: that minus the block's input;
- attention maps: recomputed in a forward hook of the attention module from its own inputs, the
  way its processor computes them (PixArt: ``Attention.get_attention_scores`` with the caption
  mask; SD3 and FLUX: the joint sequence's projections with their q/k norms, FLUX's rotary
  embedding, softmax over all keys), only when a map is requested.

Where text and image tokens share one sequence (FLUX single-stream blocks: text first) the text
tokens are sliced off before the tokens become a ``(C, h, w)`` map.
"""

from __future__ import annotations

import math

import torch

from .capture import attention_probs
from .catalog_dit import DIT_MAP_KINDS


def _arg(args, kwargs, name: str, pos: int):
    return kwargs[name] if name in kwargs else (args[pos] if len(args) > pos else None)


def _grid_of(model, family: str, hidden, kwargs) -> tuple[int, int]:
    if family == "flux":
        ids = kwargs.get("img_ids")
        if ids is not None:
            ids = ids[0] if ids.dim() == 3 else ids
            return int(ids[:, 1].max()) + 1, int(ids[:, 2].max()) + 1
        side = math.isqrt(hidden.shape[1])
        return side, hidden.shape[1] // side
    p = int(model.config.patch_size)
    return hidden.shape[-2] // p, hidden.shape[-1] // p


class DitHooks:
    """The hooks of one :class:`~difstudy.capture.Capture` on a diffusion transformer."""

    def __init__(self, capture):
        self.cap = capture
        self.model = capture.unet
        self.family = capture.catalog.family
        self.grid: tuple[int, int] | None = None
        self.text_len = 0
        self.block_in: dict[str, torch.Tensor] = {}
        self.inputs: list[str] = []

    # -- helpers -------------------------------------------------------------------------
    def to_map(self, tokens: torch.Tensor, joint: bool = False) -> torch.Tensor:
        """(B, N, C) image tokens -> (B, C, h, w); ``joint``: text tokens first, sliced off."""
        if joint:
            tokens = tokens[:, self.text_len :]
        b, n, c = tokens.shape
        h, w = self.grid
        if h * w != n:
            raise RuntimeError(f"{n} image tokens do not fill the {h}x{w} token grid")
        return tokens.transpose(1, 2).reshape(b, c, h, w)

    def install(self, mods: dict) -> list:
        handles = [self.model.register_forward_pre_hook(self._model_pre, with_kwargs=True)]
        by_module: dict[str, list] = {}
        for name in self.cap.names:
            a = self.cap.catalog[name] if name in self.cap.catalog else None
            by_module.setdefault(a.module if a else name, []).append((name, a.kind if a else "raw"))
        self.inputs = [n for n, k in by_module.get("", []) if k == "transformer-in"]
        for path, items in by_module.items():
            kinds = {k for _, k in items}
            m = mods[path]
            if "increment" in kinds:
                handles.append(m.register_forward_pre_hook(self._block_pre(path), with_kwargs=True))
            if kinds & {"norm-out"} and path.endswith(".ff"):
                handles.append(m.register_forward_pre_hook(self._ff_pre(items)))
            if kinds & set(DIT_MAP_KINDS):
                handles.append(m.register_forward_hook(self._maps(path, items), with_kwargs=True))
            rest = [(n, k) for n, k in items if k not in DIT_MAP_KINDS and k != "transformer-in"]
            rest = [(n, k) for n, k in rest if not (k == "norm-out" and path.endswith(".ff"))]
            if rest:
                handles.append(m.register_forward_hook(self._output(path, rest)))
        return handles

    # -- hooks ---------------------------------------------------------------------------
    def _model_pre(self, module, args, kwargs):
        hidden = _arg(args, kwargs, "hidden_states", 0)
        ehs = kwargs.get("encoder_hidden_states")
        self.grid = _grid_of(module, self.family, hidden, kwargs)
        self.text_len = int(ehs.shape[1]) if ehs is not None else 0
        self.block_in = {}
        for name in self.inputs:  # transformer-in: the model's own input (FLUX: packed tokens)
            self.cap._record(name, self.to_map(hidden) if self.family == "flux" else hidden, check_stop=False)
        if self.inputs:
            self.cap._maybe_stop()

    def _block_pre(self, path):
        def hook(module, args, kwargs):
            self.block_in[path] = _arg(args, kwargs, "hidden_states", 0)

        return hook

    def _ff_pre(self, items):
        def hook(module, args):
            for name, kind in items:
                if kind == "norm-out":
                    self.cap._record(name, self.to_map(args[0]), check_stop=False)
            self.cap._maybe_stop()

        return hook

    def _output(self, path, items):
        single = path.startswith("single_transformer_blocks.")

        def hook(module, args, out):
            for name, kind in items:
                if kind == "transformer-out":
                    t = out.sample if hasattr(out, "sample") else out[0]
                    self.cap._record(name, self.to_map(t) if self.family == "flux" else t, check_stop=False)
                elif kind in ("out", "increment"):
                    t = out[1] if isinstance(out, tuple) else out  # joint blocks return (text, image)
                    if kind == "increment":
                        t = t - self.block_in[path]
                    self.cap._record(name, self.to_map(t), check_stop=False)
                elif kind == "raw":
                    t = out if isinstance(out, torch.Tensor) else out[0]
                    self.cap._record(name, t, check_stop=False)
                else:  # q/k/v, attn-out, norm-out (single), ffn-inner, patch embedding: tokens
                    t = out[0] if isinstance(out, tuple) else out
                    self.cap._record(name, self.to_map(t, joint=single and kind != "ffn-inner"), check_stop=False)
            self.cap._maybe_stop()

        return hook

    def _maps(self, path, items):
        single = path.startswith("single_transformer_blocks.")

        def hook(module, args, kwargs, out):
            hidden = _arg(args, kwargs, "hidden_states", 0)
            ehs = _arg(args, kwargs, "encoder_hidden_states", 1)
            if self.family == "pixart":
                probs = _pixart_probs(module, hidden, ehs, kwargs.get("attention_mask"))
                for name, kind in items:
                    if kind in DIT_MAP_KINDS:
                        self.cap._record(name, probs, check_stop=False)
            else:
                shared = self.text_len if single else 0
                probs, n_text, text_first = _joint_probs(module, self.family, hidden, ehs, kwargs, shared)
                n_img = probs.shape[-1] - n_text
                img_keys = slice(n_text, None) if text_first else slice(0, n_img)
                txt_keys = slice(0, n_text) if text_first else slice(n_img, None)
                for name, kind in items:
                    if kind == "self-map":
                        self.cap._record(name, probs[..., img_keys], check_stop=False)
                    elif kind == "cross-map":
                        self.cap._record(name, probs[..., txt_keys], check_stop=False)
            self.cap._maybe_stop()

        return hook


def _pixart_probs(attn, hidden, ehs, mask) -> torch.Tensor:
    """(B, heads, N, keys) as PixArt's processor computes them (``get_attention_scores``)."""
    context = hidden if ehs is None else ehs
    if mask is not None:
        mask = attn.prepare_attention_mask(mask, context.shape[1], hidden.shape[0])
    return attention_probs(attn, attn.to_q(hidden), attn.to_k(context), mask)


def _joint_probs(attn, family: str, hidden, ehs, kwargs, shared_text: int = 0):
    """Image-query rows of a joint attention's probabilities: ``(probs (B, heads, N_img, keys),
    text tokens among the keys, whether text comes first)``, computed as the SD3 / FLUX processors
    do. ``shared_text``: text tokens already at the start of ``hidden`` (FLUX single-stream blocks)."""
    heads = attn.heads

    def split(x):
        return x.unflatten(-1, (heads, -1))  # (B, L, heads, d)

    def normed(x, norm):
        return norm(x) if norm is not None else x

    q = normed(split(attn.to_q(hidden)), getattr(attn, "norm_q", None))
    k = normed(split(attn.to_k(hidden)), getattr(attn, "norm_k", None))
    text_first = family == "flux"
    n_text = 0
    if ehs is not None and getattr(attn, "add_q_proj", None) is not None:
        eq = normed(split(attn.add_q_proj(ehs)), getattr(attn, "norm_added_q", None))
        ek = normed(split(attn.add_k_proj(ehs)), getattr(attn, "norm_added_k", None))
        n_text = ehs.shape[1]
        q, k = (
            (torch.cat([eq, q], 1), torch.cat([ek, k], 1))
            if text_first
            else (torch.cat([q, eq], 1), torch.cat([k, ek], 1))
        )
    else:  # FLUX single-stream: the sequence already holds the text tokens, first
        n_text = shared_text
    rotary = kwargs.get("image_rotary_emb")
    if rotary is not None:
        from diffusers.models.embeddings import apply_rotary_emb

        q, k = apply_rotary_emb(q, rotary, sequence_dim=1), apply_rotary_emb(k, rotary, sequence_dim=1)
    rows = slice(n_text, None) if text_first else slice(0, q.shape[1] - n_text)  # the image queries only
    scores = torch.einsum("blhd,bmhd->bhlm", q[:, rows].float(), k.float()) / math.sqrt(q.shape[-1])
    return scores.softmax(-1).to(hidden.dtype), n_text, text_first
