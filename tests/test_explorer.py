"""The activation explorer (difstudy.explorer) on the tiny random-weight SD1.5 layout."""

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch

from difstudy import explorer
from difstudy.catalog import KINDS, Catalog
from difstudy.data.toyworld import ToyWorld
from difstudy.errors import UnknownActivationError
from difstudy.extract import Extractor
from difstudy.properties import granularity, locality_index, noise_share, pca_pictures, resize_mask

matplotlib.use("Agg")

SEEDS = (0, 1, 2)


@pytest.fixture(scope="module")
def world():
    return ToyWorld("test", n=3)


def _captured(pipe, name, sample, t, prompt, seeds=SEEDS):
    """The map of ``name`` under each seed, captured with the Extractor directly: (K, C, H, W)."""
    out = []
    for s in seeds:
        ex = Extractor(pipe, [name], [t], [prompt], seed=s)
        feats = ex.features(
            [sample.image_id],
            [sample.image],
            [{"generic": sample.caption, "fine": sample.fine_caption}],
            store_dtype=torch.float32,
        )
        (val,) = feats.values()
        out.append(val)
    return torch.stack(out)


@pytest.mark.parametrize(
    "name",
    ["down-level0-repeat0-res-out", "up-level3-repeat0-vit-block0-self-k", "up-level2-repeat1-vit-block0-cross-map"],
)
def test_explore_map_and_values_match_the_property_functions(tiny_sd15, world, name):
    sample = world[1]
    v = explorer.explore(tiny_sd15, name, 50, sample, "generic", seeds=SEEDS)
    a = Catalog(tiny_sd15.unet)[name]
    # spatial kinds as catalogued; attention maps stored as (keys, H, W): 77 text tokens for cross-map
    want = (77, 4, 4) if a.kind == "cross-map" else a.shape
    assert tuple(v.feature.shape) == want
    assert tuple(v.draws.shape) == (len(SEEDS), *want)
    assert v.picture.shape == (*want[1:], 3)
    assert (v.activation, v.kind, v.stage, v.t, v.prompt) == (name, a.kind, a.stage, 50, "generic")
    # the same map as the protocol captures, one noise draw per seed (and the draws differ)
    draws = _captured(tiny_sd15, name, sample, 50, "generic")
    assert torch.equal(v.draws, draws)
    assert not torch.equal(draws[0], draws[1])
    # the three numbers are properties.py's functions on that map, with the toy part mask
    mask = resize_mask(sample.mask, want[1:])
    np.testing.assert_array_equal(v.parts, mask)
    assert v.noise_share == noise_share(draws)
    assert v.granularity == granularity(draws[0])
    assert v.locality == locality_index(draws[0], mask)
    np.testing.assert_array_equal(v.picture, pca_pictures({name: draws[0]})[name])
    assert np.isfinite([v.noise_share, v.granularity, v.locality]).all()


def test_explore_uses_the_prompt_variant_and_the_timestep(tiny_sd15, world):
    s = world[0]
    before = "down-level0-repeat0-res-out"  # before any cross-attention: the prompt cannot reach it
    after = "down-level0-repeat0-vit-out"
    assert torch.equal(
        explorer.explore(tiny_sd15, before, 50, s, "empty").draws,
        explorer.explore(tiny_sd15, before, 50, s, "fine").draws,
    )
    assert not torch.equal(
        explorer.explore(tiny_sd15, after, 50, s, "empty").draws,
        explorer.explore(tiny_sd15, after, 50, s, "fine").draws,
    )
    assert not torch.equal(
        explorer.explore(tiny_sd15, before, 50, s).draws, explorer.explore(tiny_sd15, before, 400, s).draws
    )


def test_explore_without_a_mask_gives_nan_locality(tiny_sd15, world):
    s = world[0]
    v = explorer.explore(tiny_sd15, "up-level3-repeat2-vit-out", 50, dict(image_id=s.image_id, image=s.image))
    assert v.parts is None and np.isnan(v.locality)
    assert v.noise_share == noise_share(v.draws)


def test_unknown_activation_lists_the_closest_names(tiny_sd15, world):
    with pytest.raises(UnknownActivationError, match="up-level3-repeat0-vit-block0-self-k") as e:
        explorer.explore(tiny_sd15, "up-level3-repeat0-vit-block0-self-kk", 50, world[0])
    assert "Closest valid names" in str(e.value)
    with pytest.raises(UnknownActivationError, match="up-level1-upsampler-out"):
        explorer.gallery(tiny_sd15, ["down-level0-repeat0-res-out", "up-level1-upsampler"], world[0])
    with pytest.raises(UnknownActivationError, match="one activation at a time"):
        explorer.explore(tiny_sd15, "ours-v1.5", 50, world[0])
    with pytest.raises(UnknownActivationError, match="module outputs without a paper name"):
        explorer.explore(tiny_sd15, "up_blocks.1.attentions.0.proj_in", 50, world[0])


def test_explore_rejects_bad_draws_and_prompts(tiny_sd15, world):
    with pytest.raises(ValueError, match="at least 2 noise draws"):
        explorer.explore(tiny_sd15, "up-level2-repeat0-res-out", 50, world[0], seeds=[0])
    with pytest.raises(ValueError, match="distinct"):
        explorer.explore(tiny_sd15, "up-level2-repeat0-res-out", 50, world[0], seeds=[1, 1])
    with pytest.raises(Exception, match="unknown conditioning variant 'detailed'"):
        explorer.explore(tiny_sd15, "up-level2-repeat0-res-out", 50, world[0], prompt="detailed")
    with pytest.raises(Exception, match="timestep"):
        explorer.explore(tiny_sd15, "up-level2-repeat0-res-out", 1000, world[0])


def test_gallery_has_one_axes_per_activation_with_values_in_titles(tiny_sd15, world):
    acts = [
        "up-level3-repeat2-vit-out",
        "down-level0-repeat0-res-out",
        "down-level1-repeat0-vit-block0-self-q",
        "up-level1-upsampler-out",
    ]
    fig = explorer.gallery(tiny_sd15, acts, world[2], seeds=SEEDS, ncols=3)
    try:
        assert len(fig.axes) == len(acts)
        order = Catalog(tiny_sd15.unet).resolve(acts)  # forward order
        assert [v.activation for v in fig.views] == order
        for ax, v in zip(fig.axes, fig.views):
            title = ax.get_title()
            assert title.startswith(v.activation)
            assert f"noise {v.noise_share:.2f}" in title and f"gran {v.granularity:.3f}" in title
            assert f"loc {v.locality:.2f}" in title
            np.testing.assert_array_equal(ax.images[0].get_array(), v.picture)
        # the gallery's numbers are explore()'s
        one = explorer.explore(tiny_sd15, order[1], 50, world[2], seeds=SEEDS)
        assert fig.views[1].values == one.values
        table = explorer.views_frame(fig.views)
        assert list(table["activation"]) == order and list(table.columns) == explorer.VALUE_COLUMNS
    finally:
        plt.close(fig)
    fig = explorer.gallery(tiny_sd15, acts, world[2], seeds=SEEDS, show_input=True)
    try:
        assert len(fig.axes) == len(acts) + 1 and fig.axes[0].get_title().startswith("input")
    finally:
        plt.close(fig)


def test_widget_kind_filter_narrows_the_activation_options(tiny_sd15, world):
    ui = explorer.build_widget(["tiny-sd15"], dataset=world, preloaded={"tiny-sd15": tiny_sd15}, seeds=SEEDS)
    frame = Catalog(tiny_sd15.unet).to_frame()
    assert list(ui.kind.options) == ["all", *[k for k in KINDS if k in set(frame["kind"])]]
    assert list(ui.activation.options) == list(frame["name"])
    assert ui.view.activation == ui.activation.value == "up-level1-repeat1-vit-block0-cross-q"
    ui.kind.value = "self-k"
    want = list(frame.loc[frame["kind"] == "self-k", "name"])
    assert list(ui.activation.options) == want and 0 < len(want) < len(frame)
    assert ui.activation.value == want[0] and ui.view.activation == want[0] and ui.view.kind == "self-k"
    ui.kind.value = "upsampler-out"
    assert list(ui.activation.options) == [
        "up-level0-upsampler-out",
        "up-level1-upsampler-out",
        "up-level2-upsampler-out",
    ]
    ui.kind.value = "all"
    assert list(ui.activation.options) == list(frame["name"])
    assert ui.activation.value == "up-level0-upsampler-out"  # the selection survives widening the filter
    # the other controls reach the view
    ui.t.value, ui.image.value, ui.prompt.value = 300, 2, "fine"
    v = ui.view
    assert (v.t, v.image_id, v.prompt) == (300, world[2].image_id, "fine")
    np.testing.assert_equal(
        v.values, explorer.explore(tiny_sd15, v.activation, 300, world[2], "fine", seeds=SEEDS).values
    )
    assert "noise_share" in ui.values.value and f"{v.granularity:.3f}" in ui.values.value
    assert ui.t.max == 999 and ui.image.max == len(world) - 1


def test_widget_caches_models_and_shows_errors_instead_of_raising(tiny_sd15, world):
    calls = []

    def loader(name):
        calls.append(name)
        return tiny_sd15

    ui = explorer.build_widget(
        ["a", "b"], dataset=world, loader=loader, seeds=SEEDS, activation="up-level2-repeat0-res-out"
    )
    assert calls == ["a"] and ui.view.activation == "up-level2-repeat0-res-out"
    ui.model.value = "b"
    ui.model.value = "a"
    ui.model.value = "b"
    assert calls == ["a", "b"] and ui.cache.loads == 2
    assert ui.activation.value == "up-level2-repeat0-res-out"  # kept across models that have it
    # a dataset without captions: the fine prompt is reported in the UI, the last view kept
    s = world[0]
    ui = explorer.build_widget(["a"], dataset=[dict(image_id=s.image_id, image=s.image)], loader=loader, seeds=SEEDS)
    before = ui.view
    ui.prompt.value = "fine"
    assert "needs a fine caption" in ui.error and "needs a fine caption" in ui.values.value
    assert ui.view is before


def test_widget_rejects_an_unknown_first_activation(tiny_sd15, world):
    with pytest.raises(UnknownActivationError, match="mid-vit-block0-self-q"):
        explorer.build_widget(
            ["tiny-sd15"], dataset=world, preloaded={"tiny-sd15": tiny_sd15}, activation="mid-vit-block0-self-qq"
        )
