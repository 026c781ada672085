"""An interactive activation explorer: one activation of one image, pictured and measured.

Three entry points, each a thin layer over the package's own extraction and
measures (nothing here is a second implementation of either):

- :func:`explore` runs the feature-extraction protocol of
  :class:`difstudy.extract.Extractor` (VAE mean, DDPM noising at ``t``, one
  U-Net forward without guidance, the prompt of a conditioning variant) for
  one image under several noise draws, and returns an :class:`ExplorerView`:
  the activation's PCA-to-RGB picture (:func:`difstudy.properties.pca_pictures`)
  and its three property values on that image,
  :func:`~difstudy.properties.noise_share` over the draws,
  :func:`~difstudy.properties.granularity` and
  :func:`~difstudy.properties.locality_index` (with the sample's part mask,
  resized by :func:`~difstudy.properties.resize_mask`) on the first draw,
  exactly as :func:`difstudy.properties.properties_from_cache` computes them
  per image. Maps are kept in float32 in memory (the feature cache stores
  float16), so values can differ from a cached run in the last digits.
- :func:`gallery`: a grid figure of several activations' pictures of one
  image, property values in the titles (one forward per noise draw for all of
  them, not one per activation).
- :func:`build_widget`: an ipywidgets UI (model, kind filter, activation,
  timestep, image, prompt variant) that shows the picture and the three
  numbers; loaded models are cached. In a kernel without a browser (papermill,
  tests) it builds and computes its first view; only the display stays inert.

Activations are named as in :mod:`difstudy.catalog`; an unknown name raises
:class:`~difstudy.errors.UnknownActivationError` listing the closest valid
names.
"""

from __future__ import annotations

import html
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd
import torch

from .catalog import KINDS, NAMED_SETS, Catalog
from .errors import DifstudyError, UnknownActivationError
from .extract import BUILTIN_VARIANTS, Extractor, _item
from .properties import (
    LocalityConfig,
    granularity,
    locality_index,
    noise_share,
    part_mask,
    pca_pictures,
    resize_mask,
)

DEFAULT_SEEDS = (0, 1, 2, 3)
VALUE_COLUMNS = ["activation", "kind", "stage", "shape", "noise_share", "granularity", "locality"]


@dataclass(frozen=True, eq=False)
class ExplorerView:
    """One activation of one image at one timestep and prompt variant.

    ``draws``: the map under each noise draw, ``(K, C, H, W)`` float32 (attention
    maps laid out as ``(keys, H, W)``, as stored by :mod:`difstudy.extract`);
    ``picture``: PCA-to-RGB of the first draw, ``(H, W, 3)`` in [0, 1];
    ``parts``: the part mask at the map's size (``None`` when the sample has
    none, and then ``locality`` is ``nan``)."""

    activation: str
    kind: str
    stage: str
    image_id: str
    t: int
    prompt: str  # the conditioning variant: empty, generic, fine or text:<prompt>
    seeds: tuple[int, ...]
    draws: torch.Tensor
    picture: np.ndarray
    parts: np.ndarray | None
    noise_share: float
    granularity: float
    locality: float

    @property
    def feature(self) -> torch.Tensor:
        """The map of the first noise draw, ``(C, H, W)`` (granularity, locality and the picture use it)."""
        return self.draws[0]

    @property
    def values(self) -> dict[str, float]:
        return {"noise_share": self.noise_share, "granularity": self.granularity, "locality": self.locality}

    def row(self) -> dict:
        """One tidy row (:data:`VALUE_COLUMNS`)."""
        shape = "x".join(str(s) for s in self.feature.shape)
        return dict(activation=self.activation, kind=self.kind, stage=self.stage, shape=shape, **self.values)


def explore_many(
    pipe,
    activations,
    sample,
    t: int = 50,
    prompt: str = "empty",
    seeds: Sequence[int] = DEFAULT_SEEDS,
    image_size: int | None = None,
    locality: LocalityConfig = LocalityConfig(),
) -> list[ExplorerView]:
    """:func:`explore` for several activations of one image, one forward per noise draw.

    ``activations``: paper names or named sets (``ours-v1.5``, ``all``: see
    :meth:`difstudy.catalog.Catalog.resolve`); views come in forward order."""
    seeds = tuple(int(s) for s in seeds)
    if len(seeds) < 2:
        raise ValueError(f"the explorer needs at least 2 noise draws (seeds) for noise_share, got seeds={list(seeds)}")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be distinct noise draws, got {list(seeds)}")
    if t is None or isinstance(t, bool) or int(t) != t:
        raise ValueError(f"t must be an integer timestep, got {t!r}")
    extractors = [Extractor(pipe, activations, [int(t)], [prompt], s, image_size) for s in seeds]
    cat = extractors[0].catalog
    raw = [n for n in extractors[0].names if n not in cat]
    if raw:
        raise UnknownActivationError(
            f"the explorer shows catalogue activations only; {raw} are module outputs without a paper name. "
            f"Use a name of the catalogue, e.g. {cat.module_default(raw[0]) or cat.names[0]!r}"
        )
    iid, image, captions = _item([sample], 0)
    feats = [
        {k.activation: v for k, v in ex.features([iid], [image], [captions], store_dtype=torch.float32).items()}
        for ex in extractors
    ]
    parts = part_mask(sample, required=False)
    views = []
    for name in extractors[0].names:
        a = cat[name]
        draws = torch.stack([f[name] for f in feats]).float()
        feat = draws[0]
        mask = None if parts is None else resize_mask(parts, tuple(feat.shape[-2:]))
        views.append(
            ExplorerView(
                activation=name,
                kind=a.kind,
                stage=a.stage,
                image_id=iid,
                t=int(t),
                prompt=prompt,
                seeds=seeds,
                draws=draws,
                picture=pca_pictures({name: feat})[name],
                parts=mask,
                noise_share=noise_share(draws),
                granularity=granularity(feat),
                locality=float("nan") if mask is None else locality_index(feat, mask, **asdict(locality)),
            )
        )
    return views


def explore(
    pipe,
    activation: str,
    t: int,
    sample,
    prompt: str = "empty",
    seeds: Sequence[int] = DEFAULT_SEEDS,
    image_size: int | None = None,
    locality: LocalityConfig = LocalityConfig(),
) -> ExplorerView:
    """One activation of one image: its PCA-to-RGB picture and three property values.

    ``pipe``: a loaded pipeline (:func:`difstudy.models.load`); ``activation``:
    one paper name of its catalogue; ``sample``: a toy-world sample or loader
    dict (``image``, ``image_id``, captions for the ``generic`` / ``fine``
    prompts, ``mask`` for locality); ``prompt``: a conditioning variant
    (``empty``, ``generic``, ``fine`` or ``text:<prompt>``); ``seeds``: the
    noise draws (at least 2). Raises
    :class:`~difstudy.errors.UnknownActivationError` with the closest names
    for an unknown activation."""
    if not isinstance(activation, str):
        raise TypeError(f"activation must be one paper name (a str), got {type(activation).__name__}")
    views = explore_many(pipe, [activation], sample, t, prompt, seeds, image_size, locality)
    if len(views) != 1:
        raise UnknownActivationError(
            f"explore shows one activation at a time; {activation!r} names {len(views)} of them "
            f"({', '.join(v.activation for v in views[:5])}{', ...' if len(views) > 5 else ''}); "
            "use gallery() for several"
        )
    return views[0]


def views_frame(views: Sequence[ExplorerView]) -> pd.DataFrame:
    """Tidy table of views: one row per activation (:data:`VALUE_COLUMNS`)."""
    return pd.DataFrame([v.row() for v in views], columns=VALUE_COLUMNS)


def view_title(view: ExplorerView, width: int = 40) -> str:
    """Two-line title: the name, then the three property values."""
    name = view.activation if len(view.activation) <= width else "..." + view.activation[-(width - 3) :]
    return f"{name}\nnoise {view.noise_share:.2f} | gran {view.granularity:.3f} | loc {view.locality:.2f}"


def gallery(
    pipe,
    activations,
    sample,
    t: int = 50,
    prompt: str = "empty",
    seeds: Sequence[int] = DEFAULT_SEEDS,
    ncols: int = 4,
    show_input: bool = False,
    image_size: int | None = None,
    title: str | None = None,
):
    """Grid figure of several activations' PCA pictures of one image.

    One axes per activation (forward order), titled with its name and its
    noise share, granularity (cycles per pixel) and locality index on this
    image; with ``show_input`` the input image comes first, on an axes of its
    own. Returns the matplotlib figure; the views are on ``fig.views``."""
    import matplotlib.pyplot as plt

    views = explore_many(pipe, activations, sample, t, prompt, seeds, image_size)
    panels = len(views) + bool(show_input)
    ncols = max(1, min(int(ncols), panels))
    nrows = -(-panels // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(2.6 * ncols, 2.75 * nrows), squeeze=False)
    flat = list(axes.flat)
    for ax in flat[panels:]:
        fig.delaxes(ax)
    if show_input:
        iid, image, _ = _item([sample], 0)
        flat[0].imshow(image)
        flat[0].set_title(f"input\n{iid}", fontsize=7)
    for ax, v in zip(flat[int(show_input) :], views):
        ax.imshow(v.picture, interpolation="nearest")
        ax.set_title(view_title(v), fontsize=7)
        ax.set_xlabel(f"{v.feature.shape[-2]}x{v.feature.shape[-1]} map, {v.feature.shape[0]} ch", fontsize=6)
    for ax in flat[:panels]:
        ax.set_xticks([])
        ax.set_yticks([])
    if title is None:
        title = f"PCA-to-RGB pictures at t={int(t)}, prompt {prompt!r}, {len(seeds)} noise draws"
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.views = views
    return fig


# -- the live widget ----------------------------------------------------------------------
VALUE_HELP = {
    "noise_share": "share of the variance that changes with the noise draw (0: ignores it, 1: pure noise)",
    "granularity": "power-weighted mean spatial frequency, cycles per pixel of the map (higher: finer)",
    "locality": "near minus far similarity with the part held fixed (> 0: position beats semantics)",
}


def values_html(view: ExplorerView) -> str:
    """The three numbers of a view as a small HTML table (what the widget shows)."""
    rows = "".join(
        f"<tr><th style='text-align:left'>{k}</th><td><code>{v:.3f}</code></td><td>{html.escape(VALUE_HELP[k])}</td></tr>"
        for k, v in view.values.items()
    )
    head = (
        f"<b>{html.escape(view.activation)}</b> ({view.kind}, {view.stage} stage, map "
        f"{'x'.join(str(s) for s in view.feature.shape)}), image <code>{html.escape(view.image_id)}</code>, "
        f"t={view.t}, prompt {html.escape(view.prompt)}, {len(view.seeds)} noise draws"
    )
    return f"<div>{head}<table>{rows}</table></div>"


class ModelCache:
    """Pipelines loaded on first use and kept: ``cache[name]``.

    ``loader(name)`` defaults to :func:`difstudy.models.load` (with ``dtype``
    and ``device``); ``preloaded`` maps names to pipelines already loaded."""

    def __init__(self, loader: Callable | None = None, preloaded: Mapping | None = None, dtype=None, device=None):
        if loader is None:
            from .models import load

            def loader(name):
                return load(name, dtype=dtype, device=device)

        self.loader = loader
        self.pipes = dict(preloaded or {})
        self.loads = 0

    def __getitem__(self, name: str):
        if name not in self.pipes:
            self.pipes[name] = self.loader(name)
            self.loads += 1
        return self.pipes[name]


class ExplorerUI:
    """The widget of :func:`build_widget`: controls, the picture and the three numbers.

    Controls: ``model``, ``kind`` (filter), ``activation``, ``t``, ``image``,
    ``prompt``; ``widget`` is the whole UI (it also displays itself). Every
    change recomputes :attr:`view` (the current :class:`ExplorerView`); an
    error (a model that cannot be loaded, a prompt without a caption) is shown
    in the UI instead of raised."""

    def __init__(self, models, dataset, t=50, prompt="empty", seeds=DEFAULT_SEEDS, cache=None, activation=None):
        import ipywidgets as w

        if not models:
            raise ValueError("build_widget needs at least one model name")
        if len(dataset) == 0:
            raise ValueError("build_widget needs a dataset with at least one image")
        if prompt not in BUILTIN_VARIANTS:
            raise ValueError(f"unknown prompt variant {prompt!r}; use one of {BUILTIN_VARIANTS}")
        self.dataset = dataset
        self.seeds = tuple(seeds)
        self.cache = cache or ModelCache()
        self.view: ExplorerView | None = None
        self.error: str | None = None
        self._models: dict[str, tuple[Catalog, pd.DataFrame, int]] = {}
        self._hold = False
        layout = w.Layout(width="420px")
        style = {"description_width": "90px"}
        self.model = w.Dropdown(options=list(models), value=list(models)[0], description="model", style=style)
        self.kind = w.Dropdown(options=["all"], value="all", description="kind", style=style)
        self.activation = w.Dropdown(options=[], description="activation", layout=layout, style=style)
        self.t = w.IntSlider(
            value=int(t), min=0, max=999, description="timestep t", continuous_update=False, style=style
        )
        self.image = w.IntSlider(
            value=0, min=0, max=len(dataset) - 1, description="image", continuous_update=False, style=style
        )
        self.prompt = w.ToggleButtons(options=list(BUILTIN_VARIANTS), value=prompt, description="prompt", style=style)
        self.values = w.HTML()
        self.output = w.Output()
        self._set_model(self.model.value, activation)
        self.kind.observe(self._on_kind, "value")
        self.model.observe(lambda ch: self._set_model(ch["new"]), "value")
        for c in (self.activation, self.t, self.image, self.prompt):
            c.observe(lambda _: self.update(), "value")
        controls = w.VBox([self.model, self.kind, self.activation, self.t, self.image, self.prompt])
        self.widget = w.VBox([w.HBox([controls, self.output]), self.values])
        self.update()

    def _repr_mimebundle_(self, **kwargs):
        return self.widget._repr_mimebundle_(**kwargs)

    def frame(self, model: str | None = None) -> pd.DataFrame:
        """The catalogue of ``model`` (default: the selected one) as :meth:`Catalog.to_frame`."""
        return self._model_info(model or self.model.value)[1]

    def _model_info(self, model: str) -> tuple[Catalog, pd.DataFrame, int]:
        """(catalogue at the extraction's latent size, its frame, number of training timesteps), cached."""
        if model not in self._models:
            ex = Extractor(self.cache[model], "all", [50])  # t = 50 is valid for every model family
            self._models[model] = (ex.catalog, ex.catalog.to_frame(), ex.noising.n_train)
        return self._models[model]

    def _set_model(self, model: str, activation: str | None = None) -> None:
        self._hold = True
        try:
            try:
                catalog, frame, n_steps = self._model_info(model)
            except DifstudyError as e:
                self._show_error(f"could not load model {model!r}: {e}")
                return
            self.t.max = n_steps - 1
            present = set(frame["kind"])
            # the U-Net's kinds in the catalogue's order, then a transformer's (difstudy.catalog_dit)
            own = [k for k in dict.fromkeys(frame["kind"]) if k not in KINDS]
            self.kind.options = ["all", *[k for k in KINDS if k in present], *own]
            if self.kind.value not in self.kind.options:
                self.kind.value = "all"
            if activation is not None:
                catalog[activation]  # an unknown name raises the catalogue's closest-names error
            elif not self.activation.value:  # first view: the paper's first SD1.5 pick, if this U-Net has it
                activation = next((n for n in NAMED_SETS["ours-v1.5"] if n in catalog), None)
            self._fill_activations(activation)
        finally:
            self._hold = False
        self.update()

    def _on_kind(self, change) -> None:
        self._hold = True
        try:
            self._fill_activations()
        finally:
            self._hold = False
        self.update()

    def _fill_activations(self, prefer: str | None = None) -> None:
        frame = self.frame()
        kind = self.kind.value
        names = list(frame["name"] if kind == "all" else frame.loc[frame["kind"] == kind, "name"])
        keep = prefer if prefer in names else (self.activation.value if self.activation.value in names else None)
        self.activation.options = names
        self.activation.value = keep or names[0]

    def _show_error(self, msg: str) -> None:
        self.error = msg
        self.values.value = f"<div style='color:#b00'>{html.escape(msg)}</div>"

    def update(self) -> ExplorerView | None:
        """Recompute and show the view of the current selection (returns it)."""
        if self._hold or not self.activation.value:
            return self.view
        try:
            view = explore(
                self.cache[self.model.value],
                self.activation.value,
                self.t.value,
                self.dataset[self.image.value],
                self.prompt.value,
                self.seeds,
            )
        except (DifstudyError, ValueError) as e:
            self._show_error(str(e))
            return None
        self.view, self.error = view, None
        self.values.value = values_html(view)
        self._draw(view)
        return view

    def _draw(self, view: ExplorerView) -> None:
        import matplotlib.pyplot as plt
        from IPython import get_ipython
        from IPython.display import display

        if get_ipython() is None:  # plain Python (tests, scripts): nothing to show the picture in
            return
        image = _item(self.dataset, self.image.value)[1]
        fig, (a0, a1) = plt.subplots(1, 2, figsize=(6, 3.2))
        a0.imshow(image)
        a0.set_title(f"input {view.image_id}", fontsize=7)
        a1.imshow(view.picture, interpolation="nearest")
        a1.set_title(view_title(view), fontsize=7)
        for a in (a0, a1):
            a.set_xticks([])
            a.set_yticks([])
        fig.tight_layout()
        with self.output:
            self.output.clear_output(wait=True)
            display(fig)
        plt.close(fig)


def build_widget(
    models: Sequence[str] = ("mini", "tiny-sd15"),
    dataset=None,
    n_images: int = 8,
    t: int = 50,
    prompt: str = "empty",
    seeds: Sequence[int] = DEFAULT_SEEDS,
    activation: str | None = None,
    preloaded: Mapping | None = None,
    loader: Callable | None = None,
    dtype=None,
    device=None,
) -> ExplorerUI:
    """The live explorer (:class:`ExplorerUI`; display it, or its ``widget``, in Jupyter).

    ``models``: names for :func:`difstudy.models.load`, offered in a dropdown
    and loaded on first selection (then cached; ``preloaded`` maps names to
    pipelines already loaded); ``dataset``: samples to pick from (default the
    first ``n_images`` toy-world test images); ``activation``: the first one
    shown (default ``up-level1-repeat1-vit-block0-cross-q``, the first of the paper's
    Ours-v1.5 selection, where the U-Net has it, else the catalogue's first)."""
    if dataset is None:
        from .data.toyworld import ToyWorld

        dataset = ToyWorld("test", n=n_images)
    cache = ModelCache(loader, preloaded, dtype=dtype, device=device)
    return ExplorerUI(list(models), dataset, t=t, prompt=prompt, seeds=seeds, cache=cache, activation=activation)


__all__ = [
    "ExplorerView",
    "ExplorerUI",
    "ModelCache",
    "explore",
    "explore_many",
    "views_frame",
    "view_title",
    "values_html",
    "gallery",
    "build_widget",
]
