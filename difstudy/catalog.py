"""The activation catalogue: every candidate activation of a diffusion U-Net
under the papers' names, in forward order (diffusion transformers: :mod:`difstudy.catalog_dit`,
the same :class:`Catalog`).

Names follow the official code of Meng et al. (NeurIPS'24)::

    unet-in | unet-after-conv-in | unet-out
    {down|up}-level{L}-repeat{R}-res-{increment|out}
    {down|up}-level{L}-repeat{R}-vit-block{B}-{self-q|self-k|self-v|self-map|cross-q|cross-map|ffn-inner|out}
    {down|up}-level{L}-repeat{R}-vit-out
    down-level{L}-downsampler-out | up-level{L}-upsampler-out
    mid-repeat{R}-res-{increment|out} | mid-vit-block{B}-... | mid-vit-out

Levels count from the first block of each stage (up-level0 is the lowest
resolution of the up stage). For the SD1.5 layout this gives 197 names, for
SDXL 612.

Each :class:`Activation` also records the diffusers module that produces it,
its kind, and its per-sample tensor shape at a given latent size. Captured
tensor layouts (see :mod:`difstudy.capture`):

- spatial kinds (everything except maps): ``(B, C, H, W)``; token
  activations of the transformer blocks, ``(B, H*W, C)`` inside diffusers,
  are reshaped to ``(B, C, H, W)``. q/k/v have ``C = heads * head_dim``
  (heads merged).
- ``self-map``: ``(B, heads, H*W, H*W)``; ``cross-map``: ``(B, heads, H*W, T)``
  with T text tokens. Post-softmax probabilities: rows sum to 1.
- ``res-increment``: output of the ResNet block's ``conv2``, i.e. what the
  block adds to its shortcut (output minus shortcut when
  ``output_scale_factor`` is 1, as in every SD model).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import pandas as pd
import torch.nn as nn

from .errors import UnknownActivationError, closest

BLOCK_KINDS = ("self-q", "self-k", "self-v", "self-map", "cross-q", "cross-map", "ffn-inner", "out")
KINDS = (
    "unet-in",
    "unet-after-conv-in",
    "unet-out",
    "res-increment",
    "res-out",
    *BLOCK_KINDS,
    "vit-out",
    "downsampler-out",
    "upsampler-out",
)
MAP_KINDS = ("self-map", "cross-map")
QKV_KINDS = ("self-q", "self-k", "self-v", "cross-q")

NAMED_SETS: dict[str, tuple[str, ...]] = {
    "ours-v1.5": (
        "up-level1-repeat1-vit-block0-cross-q",
        "up-level1-repeat2-res-out",
        "up-level2-repeat1-vit-block0-cross-q",
        "up-level3-repeat0-vit-block0-self-k",
    ),
    "legacy-v1.5": (
        "up-level0-upsampler-out",
        "up-level1-upsampler-out",
        "up-level2-upsampler-out",
        "up-level3-repeat2-vit-out",
    ),
    "ours-xl": (
        "up-level0-repeat0-vit-block7-out",
        "up-level0-repeat0-vit-block5-out",
        "up-level1-repeat0-vit-block0-cross-q",
        "up-level1-repeat0-vit-block0-out",
    ),
    "legacy-xl": (
        "up-level0-upsampler-out",
        "up-level1-upsampler-out",
        "up-level2-repeat2-res-out",
    ),
}


@dataclass(frozen=True)
class Activation:
    """One catalogue entry."""

    index: int  # position in forward order
    name: str  # paper name
    module: str  # diffusers module path of the module whose call produces it
    kind: str
    stage: str  # unet | down | mid | up
    level: int | None
    repeat: int | None
    block: int | None
    shape: tuple[int, ...]  # per-sample shape at the catalogue's latent size (see module doc)

    @property
    def is_map(self) -> bool:
        return self.kind in MAP_KINDS

    @property
    def channels(self) -> int:
        return self.shape[0]


class Catalog:
    """Ordered activations of one U-Net, or of one diffusion transformer (PixArt, SD3, FLUX:
    :mod:`difstudy.catalog_dit`), looked up by paper name or module path.

    ``Catalog(unet, latent_size=64, text_len=77)``; ``latent_size`` is image
    size divided by the VAE factor (64 for SD1.5 at 512 px); ``text_len`` the
    text tokens the cross-attention maps have as keys.
    """

    def __init__(self, unet: nn.Module, latent_size: int | tuple[int, int] | None = None, text_len: int = 77):
        from . import catalog_dit

        self.family = catalog_dit.family(unet) or "unet"
        if latent_size is None:
            latent_size = int(getattr(unet.config, "sample_size", None) or 128)  # FLUX's config has none: 1024 px
        self.latent_hw = (latent_size, latent_size) if isinstance(latent_size, int) else tuple(latent_size)
        self.text_len = text_len
        if self.family == "unet":
            rows = _enumerate(unet, self.latent_hw, text_len)
        else:  # a diffusion transformer (difstudy.catalog_dit)
            rows = [Activation(i, *r[:7], tuple(int(x) for x in r[7])) for i, r in
                    enumerate(catalog_dit.enumerate_transformer(unet, self.latent_hw, text_len))]  # fmt: skip
        self.entries: tuple[Activation, ...] = tuple(rows)
        self._by_name = {a.name: a for a in self.entries}
        self._modules = {name for name, _ in unet.named_modules()}

    def __len__(self) -> int:
        return len(self.entries)

    def __iter__(self):
        return iter(self.entries)

    def __contains__(self, name: str) -> bool:
        return name in self._by_name

    @property
    def names(self) -> list[str]:
        return [a.name for a in self.entries]

    def __getitem__(self, name: str) -> Activation:
        try:
            return self._by_name[name]
        except KeyError:
            raise UnknownActivationError(self._unknown_message(name)) from None

    def _unknown_message(self, name: str) -> str:
        hint = closest(name, self.names + sorted(NAMED_SETS))
        return (
            f"unknown activation {name!r} for this U-Net ({len(self)} activations). "
            f"Closest valid names: {', '.join(hint) or '(none)'}. "
            "List them all with `python -m difstudy catalog MODEL`."
        )

    def resolve(self, names) -> list[str]:
        """Expand named sets (``ours-v1.5``, ``all``...), map module paths to
        paper names, check every name; keeps forward order, drops duplicates.

        A module path that is not a catalogue entry's own module is accepted
        as a raw module output (returned unchanged)."""
        if isinstance(names, str):
            names = [names]
        out: list[str] = []
        for n in names:
            if n == "all":
                out += self.names
            elif n in NAMED_SETS:
                missing = [m for m in NAMED_SETS[n] if m not in self._by_name]
                if missing:
                    raise UnknownActivationError(
                        f"named set {n!r} does not fit this U-Net: {missing} are not among its {len(self)} "
                        f"activations (the -v1.5 sets are for the SD1.x/2.x layout, the -xl sets for SDXL)"
                    )
                out += list(NAMED_SETS[n])
            elif n in self._by_name:
                out.append(n)
            elif n in self._modules:
                out.append(self.module_default(n) or n)
            else:
                raise UnknownActivationError(self._unknown_message(n))
        seen: set[str] = set()
        uniq = [n for n in out if not (n in seen or seen.add(n))]
        order = {a.name: a.index for a in self.entries}
        return sorted(uniq, key=lambda n: order.get(n, len(order)))

    def module_default(self, module: str) -> str | None:
        """Paper name of the natural output of ``module`` (e.g. a Transformer2DModel's vit-out)."""
        natural = ("res-out", "out", "vit-out", "downsampler-out", "upsampler-out", "unet-after-conv-in", "unet-out",
                   "transformer-after-patch-embed", "transformer-out")  # fmt: skip
        for a in self.entries:
            if a.module == module and a.kind in natural:
                return a.name
        return None

    def to_frame(self) -> pd.DataFrame:
        """One row per activation (tidy)."""
        rows = []
        for a in self.entries:
            d = asdict(a)
            d["shape"] = "x".join(str(s) for s in a.shape)
            d["channels"] = a.channels
            rows.append(d)
        df = pd.DataFrame(rows).astype({"level": "Int64", "repeat": "Int64", "block": "Int64"})
        return df.set_index("index")


def _token_dims(block: nn.Module) -> dict[str, int]:
    """Channel counts of a BasicTransformerBlock's captured activations."""
    dims = {
        "out": block.norm1.normalized_shape[0] if hasattr(block.norm1, "normalized_shape") else block.attn1.query_dim
    }
    dims["self-q"] = block.attn1.to_q.out_features
    dims["self-k"] = block.attn1.to_k.out_features
    dims["self-v"] = block.attn1.to_v.out_features
    dims["self-heads"] = block.attn1.heads
    if getattr(block, "attn2", None) is not None:
        dims["cross-q"] = block.attn2.to_q.out_features
        dims["cross-heads"] = block.attn2.heads
    linears = [m for m in block.ff.net if isinstance(m, nn.Linear)]
    dims["ffn-inner"] = linears[0].in_features
    return dims


def _vit_entries(prefix: str, path: str, attn: nn.Module, hw: tuple[int, int], text_len: int):
    h, w = hw
    n = h * w
    for b, blk in enumerate(attn.transformer_blocks):
        d = _token_dims(blk)
        bpath = f"{path}.transformer_blocks.{b}"
        for kind in BLOCK_KINDS:
            if kind.startswith("cross") and "cross-q" not in d:
                continue
            if kind == "self-map":
                yield f"{prefix}-vit-block{b}-{kind}", f"{bpath}.attn1", kind, b, (d["self-heads"], n, n)
            elif kind == "cross-map":
                yield f"{prefix}-vit-block{b}-{kind}", f"{bpath}.attn2", kind, b, (d["cross-heads"], n, text_len)
            elif kind in QKV_KINDS:
                mod = f"{bpath}.attn1" if kind.startswith("self") else f"{bpath}.attn2"
                yield f"{prefix}-vit-block{b}-{kind}", mod, kind, b, (d[kind], h, w)
            elif kind == "ffn-inner":
                yield f"{prefix}-vit-block{b}-{kind}", f"{bpath}.ff.net.0", kind, b, (d[kind], h, w)
            else:
                yield f"{prefix}-vit-block{b}-out", bpath, "out", b, (d["out"], h, w)
    yield f"{prefix}-vit-out", path, "vit-out", None, (attn.config.out_channels or attn.config.in_channels, h, w)


def _res_entries(prefix: str, path: str, res: nn.Module, hw: tuple[int, int]):
    c = res.conv2.out_channels
    yield f"{prefix}-res-increment", f"{path}.conv2", "res-increment", None, (c, *hw)
    yield f"{prefix}-res-out", path, "res-out", None, (c, *hw)


def _half(hw):
    return (-(-hw[0] // 2), -(-hw[1] // 2))


def _block_entries(add, stage: str, L: int, blk: nn.Module, hw: tuple[int, int], text_len: int) -> None:
    """ResNets and transformers of one down/up block, interleaved in forward order."""
    attns = getattr(blk, "attentions", None) or []
    for r, res in enumerate(blk.resnets):
        pre, path = f"{stage}-level{L}-repeat{r}", f"{stage}_blocks.{L}"
        entries = list(_res_entries(pre, f"{path}.resnets.{r}", res, hw))
        if r < len(attns):
            entries += list(_vit_entries(pre, f"{path}.attentions.{r}", attns[r], hw, text_len))
        for e in entries:
            add(e[0], e[1], e[2], stage, L, r, e[3], e[4])


def _enumerate(unet: nn.Module, latent_hw: tuple[int, int], text_len: int):
    rows = []

    def add(name, module, kind, stage, level, repeat, block, shape):
        rows.append(
            Activation(len(rows), name, module, kind, stage, level, repeat, block, tuple(int(s) for s in shape))
        )

    cfg = unet.config
    add("unet-in", "conv_in", "unet-in", "unet", None, None, None, (cfg.in_channels, *latent_hw))
    add(
        "unet-after-conv-in",
        "conv_in",
        "unet-after-conv-in",
        "unet",
        None,
        None,
        None,
        (unet.conv_in.out_channels, *latent_hw),
    )
    hw = latent_hw
    res_by_level = []
    for L, blk in enumerate(unet.down_blocks):
        res_by_level.append(hw)
        _block_entries(add, "down", L, blk, hw, text_len)
        for i, ds in enumerate(getattr(blk, "downsamplers", None) or []):
            hw = _half(hw)
            c = ds.out_channels if hasattr(ds, "out_channels") else ds.channels
            add(
                f"down-level{L}-downsampler-out",
                f"down_blocks.{L}.downsamplers.{i}",
                "downsampler-out",
                "down",
                L,
                None,
                None,
                (c, *hw),
            )
    mid = unet.mid_block
    if mid is not None:
        attns = getattr(mid, "attentions", None) or []
        for r, res in enumerate(mid.resnets):
            for e in _res_entries(f"mid-repeat{r}", f"mid_block.resnets.{r}", res, hw):
                add(e[0], e[1], e[2], "mid", None, r, e[3], e[4])
            if r < len(attns):
                pre = "mid" if len(attns) == 1 else f"mid-repeat{r}"
                for e in _vit_entries(pre, f"mid_block.attentions.{r}", attns[r], hw, text_len):
                    add(e[0], e[1], e[2], "mid", None, None, e[3], e[4])
    for L, blk in enumerate(unet.up_blocks):
        hw = res_by_level[len(unet.up_blocks) - 1 - L]
        _block_entries(add, "up", L, blk, hw, text_len)
        for i, us in enumerate(getattr(blk, "upsamplers", None) or []):
            up_hw = res_by_level[len(unet.up_blocks) - 2 - L] if L < len(unet.up_blocks) - 1 else (hw[0] * 2, hw[1] * 2)
            c = us.out_channels if hasattr(us, "out_channels") else us.channels
            add(
                f"up-level{L}-upsampler-out",
                f"up_blocks.{L}.upsamplers.{i}",
                "upsampler-out",
                "up",
                L,
                None,
                None,
                (c, *up_hw),
            )
    add("unet-out", "conv_out", "unet-out", "unet", None, None, None, (cfg.out_channels, *latent_hw))
    return rows
