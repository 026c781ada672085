"""Diffusion transformers (issue 25): the catalogue of the real layouts without weights (FLUX's
official vit-block0..56 order), and capture on the tiny layouts: outputs unchanged bit for bit,
shapes as catalogued, attention maps that are the attention the model computes, text tokens
sliced off, early stop."""

import subprocess
import sys

import pytest
import torch

from difstudy.capture import Capture
from difstudy.catalog import Catalog
from difstudy.models import layouts

TINY = ["tiny-pixart", "tiny-sd3", "tiny-flux"]
REAL_COUNTS = {"pixart-alpha": 283, "pixart-sigma": 283, "sd3-medium": 243, "sd35-large": 383, "flux-dev": 535}


def catalog(name):
    rec = layouts.layout(name)
    model = layouts.tiny_transformer(name) if name in layouts.TINY_DIT else layouts.meta_transformer(name)
    return model, Catalog(model, latent_size=layouts.latent_size(name), text_len=rec["text_len"])


@pytest.mark.parametrize("name, count", sorted(REAL_COUNTS.items()))
def test_real_layouts_are_catalogued_without_weights(name, count):
    model, cat = catalog(name)
    assert next(model.parameters()).device.type == "meta"
    assert len(cat) == count and cat.names[0] == "transformer-in" and cat.names[-1] == "transformer-out"


def test_flux_blocks_follow_the_official_numbering():
    _, cat = catalog("flux-dev")
    blocks = list(dict.fromkeys(a.block for a in cat if a.block is not None))
    assert blocks == list(range(57))
    assert cat["vit-block18-out"].module == "transformer_blocks.18"
    assert cat["vit-block19-out"].module == "single_transformer_blocks.0"
    assert cat["vit-block56-q"].module == "single_transformer_blocks.37.attn.to_q"
    assert cat["vit-block0-ffn-inner"].shape == (12288, 64, 64)  # 1024 px: 128 latent cells, 2x2 packed
    assert cat["vit-block30-cross-map"].shape == (24, 64 * 64, 512)
    assert "vit-block19-ffn-inner" not in cat  # the single-stream MLP is fused into proj_out


def test_the_cli_lists_a_real_transformer_without_downloading():
    out = subprocess.run(
        [sys.executable, "-m", "difstudy", "catalog", "pixart-sigma", "--only", "vit-block27-out"],
        capture_output=True, text=True, check=True, timeout=120,
    ).stdout  # fmt: skip
    assert "no weights loaded" in out and out.strip().endswith("vit-block27-out")


@pytest.mark.parametrize("name", TINY)
def test_capture_leaves_the_output_unchanged_and_matches_the_catalogue(name):
    model, cat = catalog(name)
    kw = layouts.example_inputs(name)
    with torch.no_grad():
        ref = model(**kw, return_dict=False)[0]
    with Capture(model, "all", stop=False, catalog=cat) as cap:
        out = cap.run(**kw, return_dict=False)[0]
    assert torch.equal(out, ref)
    assert sorted(cap.cache) == sorted(cat.names)
    assert {n: tuple(cap.cache[n].shape[1:]) for n in cat.names} == {a.name: a.shape for a in cat}
    for a in cat:
        if a.kind == "increment":
            inc = cap.cache[a.name]
            out_ = cap.cache[a.name.replace("increment", "out")]
            assert inc.abs().max() > 0 and not torch.equal(inc, out_)
    last = [n for n in cat.names if n.endswith("-out") and n.startswith("vit-block")][-1]
    final = cap.cache["transformer-out"]
    assert final.shape[0] == 2 and torch.isfinite(cap.cache[last]).all()


@pytest.mark.parametrize("name", TINY)
def test_attention_maps_are_the_attention_the_model_computes(name):
    """Rows sum to 1 (a joint attention's self and cross parts together), and the maps times the
    values give the attention module's own output."""
    model, cat = catalog(name)
    kw = layouts.example_inputs(name)
    with Capture(model, "all", stop=False, catalog=cat) as cap:
        cap.run(**kw)
    c = cap.cache
    if name == "tiny-pixart":
        for kind in ("self-map", "cross-map"):
            assert torch.allclose(c[f"vit-block1-{kind}"].sum(-1), torch.ones(()), atol=1e-5)
        assert c["vit-block1-cross-map"][..., -4:].abs().max() < 1e-3  # the caption's padding is masked
        attn = model.transformer_blocks[1].attn1
        probs, v = c["vit-block1-self-map"], c["vit-block1-self-v"]  # (B, H, N, N), (B, C, h, w)
        vh = v.flatten(2).transpose(1, 2).unflatten(-1, (attn.heads, -1)).transpose(1, 2)
        rows = (probs @ vh).transpose(1, 2).flatten(2)
        ref = {}
        h = attn.register_forward_hook(lambda m, i, o: ref.__setitem__("out", o))
        hp = attn.to_out[0].register_forward_hook(lambda m, i, o: ref.__setitem__("in", i[0]))
        with torch.no_grad():
            model(**kw)
        h.remove(), hp.remove()
        assert torch.allclose(rows, ref["in"], atol=1e-5)
        return
    for block in (0, len(model.transformer_blocks)):  # a joint block, and FLUX's first single block (or SD3's 2nd)
        if f"vit-block{block}-self-map" not in c:
            continue
        total = c[f"vit-block{block}-self-map"].sum(-1) + c[f"vit-block{block}-cross-map"].sum(-1)
        assert torch.allclose(total, torch.ones(()), atol=1e-5)
    # the joint attention of block 0: the maps times the values (image and text) give the image rows
    attn = model.transformer_blocks[0].attn
    seen = {}
    h1 = attn.register_forward_pre_hook(lambda m, a, k: seen.update(k), with_kwargs=True)
    h2 = attn.to_out[0].register_forward_hook(lambda m, i, o: seen.__setitem__("rows", i[0]))
    with torch.no_grad():
        model(**kw)
    h1.remove(), h2.remove()
    heads = attn.heads
    v_img = attn.to_v(seen["hidden_states"]).unflatten(-1, (heads, -1)).transpose(1, 2)
    v_txt = attn.add_v_proj(seen["encoder_hidden_states"]).unflatten(-1, (heads, -1)).transpose(1, 2)
    self_map, cross_map = c["vit-block0-self-map"], c["vit-block0-cross-map"]
    rows = (self_map @ v_img + cross_map @ v_txt).transpose(1, 2).flatten(2)
    assert torch.allclose(rows, seen["rows"], atol=1e-5)
    if name == "tiny-flux":  # single-stream: attn-out is the attention itself, image rows, text sliced off
        blk = model.single_transformer_blocks[0]
        seen = {}
        h = blk.attn.register_forward_hook(lambda m, i, o: seen.__setitem__("o", o))
        with torch.no_grad():
            model(**kw)
        h.remove()
        n_text = kw["encoder_hidden_states"].shape[1]
        img = seen["o"][:, n_text:]
        assert torch.equal(c["vit-block2-attn-out"], img.transpose(1, 2).reshape(c["vit-block2-attn-out"].shape))
        assert c["vit-block2-q"].shape[-2:] == (8, 8)


@pytest.mark.parametrize("name", TINY)
def test_early_stop_skips_the_later_blocks(name):
    model, cat = catalog(name)
    ran = []
    last = (getattr(model, "single_transformer_blocks", None) or model.transformer_blocks)[-1]
    h = last.register_forward_pre_hook(lambda m, a: ran.append(1))
    with Capture(model, ["vit-block0-out"], stop=True, catalog=cat) as cap:
        out = cap.run(**layouts.example_inputs(name))
    h.remove()
    assert out is None and ran == [] and cap.cache["vit-block0-out"].shape[1:] == cat["vit-block0-out"].shape


def test_an_unknown_transformer_name_is_a_clear_error():
    with pytest.raises(KeyError, match="pixart-gamma.*known: .*flux-dev.*tiny-flux"):
        layouts.layout("pixart-gamma")


def test_a_transformer_layout_name_loads_its_hub_pipeline():
    """``load("flux-dev")`` is the layout's hub id: offline (as here) the usual clear error names it."""
    from difstudy.errors import ModelNotFoundError
    from difstudy.models import load

    with pytest.raises(ModelNotFoundError, match="could not load 'black-forest-labs/FLUX.1-dev'.*--local-dir"):
        load("flux-dev")
