import pytest
import torch
from conftest import unet_inputs

from difstudy.capture import Capture, expand_batch, run_with_cache, split_batch
from difstudy.catalog import Catalog


def _hook_count(unet):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in unet.modules())


def test_block_outputs_equal_plain_forward_hooks(tiny_sd15):
    unet = tiny_sd15.unet
    x, t, kw = unet_inputs(tiny_sd15)
    seen = {}
    paths = {
        "up-level1-repeat2-res-out": "up_blocks.1.resnets.2",
        "up-level2-repeat0-vit-out": "up_blocks.2.attentions.0",
    }
    mods = dict(unet.named_modules())
    hs = [
        mods[p].register_forward_hook(lambda m, i, o, n=n: seen.__setitem__(n, o[0] if isinstance(o, tuple) else o))
        for n, p in paths.items()
    ]
    with torch.no_grad():
        unet(x, t, **kw)
    for h in hs:
        h.remove()
    _, cache = run_with_cache(unet, list(paths), x, t, **kw)
    for n in paths:
        ref = seen[n].sample if hasattr(seen[n], "sample") else seen[n]
        assert torch.equal(cache[n], ref)


def test_qkv_equal_manual_projections_and_maps_are_probabilities(tiny_sd15):
    unet = tiny_sd15.unet
    x, t, kw = unet_inputs(tiny_sd15)
    pre = "up-level3-repeat1-vit-block0"
    names = [f"{pre}-{k}" for k in ("self-q", "self-k", "self-v", "self-map", "cross-q", "cross-map", "out")]
    blk = unet.up_blocks[3].attentions[1].transformer_blocks[0]
    got = {}
    h = blk.register_forward_pre_hook(
        lambda m, a, k: got.__setitem__("in", (a[0] if a else k["hidden_states"])), with_kwargs=True
    )
    _, cache = run_with_cache(unet, names, x, t, **kw)
    h.remove()
    hidden = got["in"]
    n1 = blk.norm1(hidden)
    b, n, c = n1.shape
    hw = int(n**0.5)
    as_map = lambda z: z.transpose(1, 2).reshape(b, -1, hw, hw)
    with torch.no_grad():
        assert torch.allclose(cache[f"{pre}-self-q"], as_map(blk.attn1.to_q(n1)), atol=1e-6)
        assert torch.allclose(cache[f"{pre}-self-k"], as_map(blk.attn1.to_k(n1)), atol=1e-6)
        assert torch.allclose(cache[f"{pre}-self-v"], as_map(blk.attn1.to_v(n1)), atol=1e-6)
    for kind, keys in (("self-map", n), ("cross-map", 77)):
        m = cache[f"{pre}-{kind}"]
        assert m.shape == (b, blk.attn1.heads, n, keys)
        assert torch.allclose(m.sum(-1), torch.ones(m.shape[:-1]), atol=1e-5)
        assert (m >= 0).all()
    # self-attention output recomputed from the captured maps and v equals the real attention output
    heads = blk.attn1.heads
    v = cache[f"{pre}-self-v"].flatten(2).transpose(1, 2).reshape(b, n, heads, -1).transpose(1, 2)
    attn_out = (cache[f"{pre}-self-map"] @ v).transpose(1, 2).reshape(b, n, -1)
    with torch.no_grad():
        ref = blk.attn1(n1)
        assert torch.allclose(blk.attn1.to_out[0](attn_out), ref, atol=1e-5)


def test_res_increment_is_output_minus_shortcut(tiny_sd15):
    unet = tiny_sd15.unet
    x, t, kw = unet_inputs(tiny_sd15)
    res = unet.up_blocks[1].resnets[0]  # has a conv shortcut (channel change)
    got = {}
    h = res.register_forward_pre_hook(lambda m, a: got.__setitem__("in", a[0]))
    _, cache = run_with_cache(unet, ["up-level1-repeat0-res-increment", "up-level1-repeat0-res-out"], x, t, **kw)
    h.remove()
    with torch.no_grad():
        shortcut = res.conv_shortcut(got["in"])
    inc, out = cache["up-level1-repeat0-res-increment"], cache["up-level1-repeat0-res-out"]
    assert torch.allclose(out - shortcut, inc, atol=1e-5)
    assert not torch.allclose(out, inc)


@pytest.mark.parametrize("model", ["tiny_sd15", "tiny_sdxl"])
def test_capture_all_leaves_output_bitwise_unchanged(model, request):
    pipe = request.getfixturevalue(model)
    x, t, kw = unet_inputs(pipe)
    with torch.no_grad():
        ref = pipe.unet(x, t, **kw).sample
    before = _hook_count(pipe.unet)
    procs = {k: type(v) for k, v in pipe.unet.attn_processors.items()}
    out, cache = run_with_cache(pipe.unet, "all", x, t, stop=False, **kw)
    assert torch.equal(out.sample, ref)
    cat = Catalog(pipe.unet)
    assert list(cache) and set(cache) == set(cat.names)
    assert all(tuple(cache[a.name].shape[1:]) == a.shape for a in cat)
    assert _hook_count(pipe.unet) == before
    assert {k: type(v) for k, v in pipe.unet.attn_processors.items()} == procs


def test_early_stop_runs_no_later_module(tiny_sd15):
    unet = tiny_sd15.unet
    x, t, kw = unet_inputs(tiny_sd15)
    calls = {}
    hs = [
        m.register_forward_hook(lambda m, i, o, n=n: calls.__setitem__(n, calls.get(n, 0) + 1))
        for n, m in unet.named_modules()
        if n
    ]
    try:
        out, cache = run_with_cache(unet, ["down-level1-repeat0-vit-block0-self-k", "mid-vit-out"], x, t, **kw)
    finally:
        for h in hs:
            h.remove()
    assert out is None and set(cache) == {"down-level1-repeat0-vit-block0-self-k", "mid-vit-out"}
    assert "mid_block.attentions.0" in calls
    assert not any(n.startswith(("mid_block.resnets.1", "up_blocks", "conv_norm_out", "conv_out")) for n in calls)
    # a stop in the middle of a ResNet: the shortcut conv after conv2 does not run
    calls.clear()
    hs = [m.register_forward_hook(lambda m, i, o, n=n: calls.__setitem__(n, 1)) for n, m in unet.named_modules() if n]
    try:
        run_with_cache(unet, ["down-level1-repeat0-res-increment"], x, t, **kw)
    finally:
        for h in hs:
            h.remove()
    assert "down_blocks.1.resnets.0.conv2" in calls and "down_blocks.1.resnets.0.conv_shortcut" not in calls


def test_batched_timesteps_and_variants_equal_per_item(tiny_sd15):
    unet = tiny_sd15.unet
    g = torch.Generator().manual_seed(3)
    lat = torch.randn(2, 3, 4, 8, 8, generator=g)  # N=2 images, T=3 noised latents each
    ts = [25, 50, 300]
    conds = torch.randn(2, 77, 768, generator=g)  # V=2 prompts
    names = ["ours-v1.5", "mid-vit-block0-cross-map"]
    sample, t, ehs = expand_batch(lat, ts, conds)
    _, batched = run_with_cache(unet, names, sample, t, encoder_hidden_states=ehs)
    for name, val in batched.items():
        val = split_batch(val, 2, 3, 2)
        for i in range(2):
            for j, tt in enumerate(ts):
                for v in range(2):
                    _, single = run_with_cache(unet, [name], lat[i, j][None], tt, encoder_hidden_states=conds[v][None])
                    torch.testing.assert_close(val[i, j, v], single[name][0], rtol=1e-4, atol=1e-5)


def test_hooks_removed_and_processors_restored_on_error(tiny_sd15):
    unet = tiny_sd15.unet
    before = _hook_count(unet)
    procs = dict(unet.attn_processors)
    x, t, kw = unet_inputs(tiny_sd15)
    bad = dict(encoder_hidden_states=torch.randn(2, 77, 5))  # wrong text width
    with pytest.raises(RuntimeError):
        with Capture(unet, ["up-level1-repeat0-vit-block0-self-map", "unet-out"]) as cap:
            cap.run(x, t, **bad)
    assert _hook_count(unet) == before
    assert dict(unet.attn_processors) == procs
    with pytest.raises(RuntimeError, match="context manager"):
        Capture(unet, ["unet-out"]).run(x, t, **kw)


def test_dtype_conversion_and_unet_in(tiny_sd15):
    x, t, kw = unet_inputs(tiny_sd15)
    with Capture(tiny_sd15.unet, ["unet-in", "unet-after-conv-in"], dtype=torch.float16) as cap:
        cap.run(x, t, **kw)
    assert cap.cache["unet-in"].dtype == torch.float16
    assert torch.equal(cap.cache["unet-in"], x.half())
