import re
import subprocess
import sys

import pytest

from difstudy.catalog import NAMED_SETS, Catalog
from difstudy.errors import UnknownActivationError
from difstudy.models import load

BLOCK = ("self-q", "self-k", "self-v", "self-map", "cross-q", "cross-map", "ffn-inner", "out")
GRAMMAR = re.compile(
    r"^(unet-in|unet-after-conv-in|unet-out"
    r"|(down|up)-level\d+-repeat\d+-(res-increment|res-out|vit-out|vit-block\d+-(" + "|".join(BLOCK) + "))"
    r"|down-level\d+-downsampler-out|up-level\d+-upsampler-out"
    r"|mid-repeat\d+-(res-increment|res-out)|mid-vit-out|mid-vit-block\d+-(" + "|".join(BLOCK) + "))$"
)


def expected_names(down_attn, up_attn, depth_down, depth_mid, depth_up, n_down_res=2, n_up_res=3):
    """Independent expansion of the paper grammar for a U-Net layout."""

    def vit(p, depth):
        return [f"{p}-vit-block{b}-{k}" for b in range(depth) for k in BLOCK] + [f"{p}-vit-out"]

    names = ["unet-in", "unet-after-conv-in"]
    for L, has in enumerate(down_attn):
        for r in range(n_down_res):
            p = f"down-level{L}-repeat{r}"
            names += [f"{p}-res-increment", f"{p}-res-out"] + (vit(p, depth_down[L]) if has else [])
        if L < len(down_attn) - 1:
            names.append(f"down-level{L}-downsampler-out")
    names += ["mid-repeat0-res-increment", "mid-repeat0-res-out", *vit("mid", depth_mid)]
    names += ["mid-repeat1-res-increment", "mid-repeat1-res-out"]
    for L, has in enumerate(up_attn):
        for r in range(n_up_res):
            p = f"up-level{L}-repeat{r}"
            names += [f"{p}-res-increment", f"{p}-res-out"] + (vit(p, depth_up[L]) if has else [])
        if L < len(up_attn) - 1:
            names.append(f"up-level{L}-upsampler-out")
    return names + ["unet-out"]


SD15 = expected_names([1, 1, 1, 0], [0, 1, 1, 1], [1, 1, 1, 0], 1, [0, 1, 1, 1])
SDXL = expected_names([0, 1, 1], [1, 1, 0], [0, 2, 10], 10, [10, 2, 0])


@pytest.mark.parametrize("model,expected", [("tiny-sd15", SD15), ("tiny-sd21", SD15), ("tiny-sdxl", SDXL)])
def test_catalogue_names_order_and_counts(model, expected):
    cat = Catalog(load(model).unet)
    assert cat.names == expected
    assert len(cat) == {"tiny-sdxl": 612}.get(model, 197)
    assert all(GRAMMAR.match(n) for n in cat.names)


def test_selected_sets_are_in_their_catalogues(tiny_sd15, tiny_sdxl):
    c15, cxl = Catalog(tiny_sd15.unet), Catalog(tiny_sdxl.unet)
    for s in ("ours-v1.5", "legacy-v1.5"):
        assert set(NAMED_SETS[s]) <= set(c15.names)
    for s in ("ours-xl", "legacy-xl"):
        assert set(NAMED_SETS[s]) <= set(cxl.names)


def test_shapes_follow_resolution(tiny_sd15):
    cat = Catalog(tiny_sd15.unet, latent_size=64)  # 512 px SD1.5
    assert cat["down-level0-repeat0-res-out"].shape == (32, 64, 64)
    assert cat["down-level0-downsampler-out"].shape == (32, 32, 32)
    assert cat["mid-vit-block0-self-map"].shape == (8, 64, 64)
    assert cat["up-level0-upsampler-out"].shape == (64, 16, 16)
    assert cat["up-level3-repeat2-vit-block0-cross-map"].shape == (8, 64 * 64, 77)
    assert cat["up-level3-repeat0-vit-block0-ffn-inner"].shape == (32 * 4, 64, 64)


def test_resolve_sets_module_paths_and_order(tiny_sd15):
    cat = Catalog(tiny_sd15.unet)
    got = cat.resolve(["up-level3-repeat0-vit-block0-self-k", "up_blocks.1.resnets.2", "ours-v1.5"])
    assert got == list(NAMED_SETS["ours-v1.5"])  # module path mapped to res-out, deduplicated, forward order
    assert cat.resolve(["up_blocks.1.attentions.0"]) == ["up-level1-repeat0-vit-out"]
    assert cat.resolve(["conv_in"]) == ["unet-after-conv-in"]
    assert cat.resolve(["up_blocks.1.attentions.0.proj_out"]) == ["up_blocks.1.attentions.0.proj_out"]


def test_unknown_name_lists_closest(tiny_sd15):
    cat = Catalog(tiny_sd15.unet)
    with pytest.raises(UnknownActivationError) as e:
        cat.resolve(["up-level1-repeat1-vit-block0-crossq"])
    assert "up-level1-repeat1-vit-block0-cross-q" in str(e.value)
    with pytest.raises(UnknownActivationError, match="ours-xl"):  # SDXL-only names in an SD1.5 set
        Catalog(tiny_sd15.unet).resolve(["ours-xl"])


def test_frame_is_tidy(tiny_sd15):
    df = Catalog(tiny_sd15.unet).to_frame()
    assert len(df) == 197 and df["name"].is_unique
    assert set(df["kind"]) >= {"res-increment", "self-map", "upsampler-out", "vit-out"}


def test_cli_catalog_counts():
    out = subprocess.run([sys.executable, "-m", "difstudy", "catalog", "tiny-sdxl"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == SDXL


def test_cli_unknown_name_is_a_clear_error():
    out = subprocess.run(
        [sys.executable, "-m", "difstudy", "catalog", "tiny-sd15", "--only", "mid-vit-blok0-out"],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2
    assert "mid-vit-block0-out" in out.stderr and "Traceback" not in out.stderr
