"""GATE, step 1: the content-shift scores between an image and its reconstruction, and the image
helpers (Canny edges, resizing) the ControlNet conditions share with them.

**Content shift, measured.** The paper shows content shift only as pictures
(contours and exact shapes that the U-Net's reconstruction of a noised image
gets wrong), and its official repository (Darkbblue/diffusion-content-shift)
has no scoring code. difstudy therefore defines five scores between an input
image ``x`` and a reconstruction ``y`` (both RGB, compared in [0, 1]; :data:`MEASURES`):

- ``contour``: mean absolute difference of the Laplacians of the grey images,
  ``mean_p |L(g(x))_p - L(g(y))_p|`` with ``g`` = luminance
  (``skimage.color.rgb2gray``) after an optional Gaussian blur of ``sigma``
  pixels (``skimage.filters.gaussian``, default 1; 0 = none) and ``L`` the
  3x3 Laplacian of ``skimage.filters.laplace``. Edges that move, vanish or
  appear all add to it; a vertical step edge of height 1 that moves by one
  pixel gives ``4 / W`` (without blur) on a ``W`` px wide image.
- ``structure``: ``1 - SSIM(x, y)`` (``skimage.metrics.structural_similarity``
  over the RGB channels, data range 1, default 7x7 window).
- ``lost`` and ``invented`` (:func:`detail_shift`): the two directions that ``contour`` adds
  up. With the detail map ``D = |L(g(.))|`` (:func:`detail_map`) and ``M_r`` a maximum filter
  over a ``(2r+1)``-pixel square (``r`` = ``tolerance``, default 1),
  ``lost = mean_p max(0, D(x)_p - M_r(D(y))_p)`` is detail of the input that the
  reconstruction has nowhere near (a blurred reconstruction loses detail), and
  ``invented = mean_p max(0, D(y)_p - M_r(D(x))_p)`` detail of the reconstruction that the input
  has nowhere near (an added object or texture). GATE's content shift is the second: detail
  that is not in the input. Detail that moves by up to ``r`` pixels counts as kept.
- ``judge`` (:class:`JudgeDistance`): ``1 - cos(f(x), f(y))`` with ``f`` the committed
  toy-world judge's pooled penultimate features (:mod:`difstudy.judge`; images resized to its
  64 px), a distance of what the images show rather than of their edges. The judge was trained
  on the toy world only, so the score is defined for toy-world images only; real-image runs
  switch it off (``ShiftConfig(judge=False)``, the column is then NaN).

All are 0 for identical images. ``vae`` rows (encode then decode, no U-Net)
measure the floor that the autoencoder alone causes; the claims compare the
U-Net's reconstructions against it (:mod:`difstudy.gate.shift` makes the
reconstructions, :mod:`difstudy.gate.claims` decides the claims).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..errors import DifstudyError
from ..judge import JUDGE_PATH, load_judge, to_input

# every content-shift score, a column of :func:`difstudy.gate.content_shift_table` (module doc)
MEASURES = ("contour", "structure", "lost", "invented", "judge")
# the judge's input size (px)
JUDGE_SIZE = 64


def _rgb01(image, name: str) -> np.ndarray:
    a = np.asarray(image)
    if a.ndim != 3 or a.shape[2] != 3:
        raise DifstudyError(f"{name} must be an RGB image (H, W, 3), got shape {a.shape}")
    if a.dtype == np.uint8:
        return a.astype(np.float64) / 255.0
    a = a.astype(np.float64)
    if a.min() < -1e-6 or a.max() > 1 + 1e-6:
        raise DifstudyError(
            f"{name}: float images must lie in [0, 1], got values in [{a.min():.3g}, {a.max():.3g}]; "
            "pass uint8 or rescale"
        )
    return a


def laplacian_map(image, sigma: float = 1.0) -> np.ndarray:
    """Laplacian (skimage 3x3 kernel) of the grey image in [0, 1], after a Gaussian blur of ``sigma`` px."""
    from skimage.color import rgb2gray
    from skimage.filters import gaussian, laplace

    g = rgb2gray(_rgb01(image, "image"))
    if sigma > 0:
        g = gaussian(g, sigma=sigma, preserve_range=True)
    return laplace(g, ksize=3)


def content_shift(image, reconstruction, sigma: float = 1.0) -> dict[str, float]:
    """``{"contour", "structure"}`` between an image and its reconstruction (module doc).

    Both RGB (H, W, 3), uint8 or float in [0, 1], of the same size."""
    from skimage.metrics import structural_similarity

    x, y = _rgb01(image, "image"), _rgb01(reconstruction, "reconstruction")
    if x.shape != y.shape:
        raise DifstudyError(
            f"image {x.shape} and reconstruction {y.shape} differ in size; resize the image to the model's size first"
        )
    contour = float(np.abs(laplacian_map(x, sigma) - laplacian_map(y, sigma)).mean())
    ssim = structural_similarity(x, y, channel_axis=2, data_range=1.0)
    return {"contour": contour, "structure": float(1.0 - ssim)}


# -- detail lost and detail invented, and a distance that is not about edges ----------------
def detail_map(image, sigma: float = 1.0) -> np.ndarray:
    """Local detail of an RGB image, (H, W): ``D(x) = |L(g(x))|``, the magnitude of the Laplacian
    of the grey image after a Gaussian blur of ``sigma`` px (the ``g`` and ``L`` of ``contour``,
    :func:`laplacian_map`). 0 on flat regions, largest along edges and in texture."""
    return np.abs(laplacian_map(image, sigma))


def detail_shift(image, reconstruction, sigma: float = 1.0, tolerance: int = 1) -> dict[str, float]:
    """``{"lost", "invented"}``: detail lost and detail invented between an input ``x`` and a
    reconstruction ``y`` (both RGB (H, W, 3), uint8 or float in [0, 1], of the same size).

    With ``D`` = :func:`detail_map` (blur ``sigma``) and ``M_r`` the maximum over a
    ``(2r+1) x (2r+1)`` square (``scipy.ndimage.maximum_filter``, edges reflected), ``r`` =
    ``tolerance`` (so detail moved by up to ``r`` px counts as kept):

    - ``lost = mean_p max(0, D(x)_p - M_r(D(y))_p)``: detail of the input with no detail as strong
      near it in the reconstruction (a blurred reconstruction loses detail and invents none);
    - ``invented = mean_p max(0, D(y)_p - M_r(D(x))_p)``: detail of the reconstruction with none as
      strong near it in the input (a reconstruction that adds an object or a texture invents it).

    Both are 0 for identical images and for a shift of at most ``r`` px; a contour that moves
    farther counts in both. Units: those of ``contour`` (Laplacian of [0, 1] grey per pixel), and
    ``lost - invented`` need not be small: they measure the two directions apart."""
    from scipy.ndimage import maximum_filter

    if int(tolerance) != tolerance or tolerance < 0:
        raise DifstudyError(f"tolerance must be a whole number of pixels >= 0, got {tolerance!r}")
    x, y = _rgb01(image, "image"), _rgb01(reconstruction, "reconstruction")
    if x.shape != y.shape:
        raise DifstudyError(
            f"image {x.shape} and reconstruction {y.shape} differ in size; resize the image to the model's size first"
        )
    dx, dy = detail_map(x, sigma), detail_map(y, sigma)
    k = 2 * int(tolerance) + 1
    return {
        "lost": float(np.maximum(0.0, dx - maximum_filter(dy, size=k)).mean()),
        "invented": float(np.maximum(0.0, dy - maximum_filter(dx, size=k)).mean()),
    }


def _uint8(image, name: str) -> np.ndarray:
    a = np.asarray(image)
    x = _rgb01(a, name)  # checks the shape and the range
    return a if a.dtype == np.uint8 else (x * 255).round().astype(np.uint8)


class JudgeDistance:
    """``judge(images, reconstructions)``: per pair, ``1 - cos(f(x), f(y))``, with ``f(x)`` the
    committed toy-world judge's penultimate features (:class:`difstudy.judge.ToyCNN`'s ``body``,
    averaged over space: 128 non-negative numbers, so the distance lies in [0, 1]) of ``x`` resized to 64 px (:func:`resize_uint8`, bicubic).

    The judge is a CNN trained to name the toy world's classes (:mod:`difstudy.judge`), so the
    distance compares what the images show, not their pixels or edges: 0 for identical images,
    near 0 for a slightly blurred copy, larger for another object. It is defined for toy-world
    images only (the judge has seen nothing else). Load it once and call it on batches:
    ``judge = JudgeDistance(); judge(xs, ys)`` -> (B,) float."""

    def __init__(self, path: str | Path = JUDGE_PATH):
        self.net, self.meta = load_judge(path)

    @torch.no_grad()
    def features(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """(B, 128): the judge's pooled penultimate features of RGB images (any size)."""
        batch = [resize_uint8(_uint8(im, "image"), JUDGE_SIZE) for im in images]
        if not batch:
            raise DifstudyError("JudgeDistance needs at least one image")
        return self.net.body(to_input(np.stack(batch))).mean((2, 3))

    def __call__(self, images: Sequence[np.ndarray], reconstructions: Sequence[np.ndarray]) -> np.ndarray:
        images, reconstructions = list(images), list(reconstructions)
        if len(images) != len(reconstructions):
            raise DifstudyError(f"got {len(images)} images and {len(reconstructions)} reconstructions; pair them")
        a, b = self.features(images), self.features(reconstructions)
        return (1 - F.cosine_similarity(a, b, dim=1)).clamp_min(0).numpy().astype(float)


def edge_map(image, sigma: float = 1.0) -> np.ndarray:
    """Canny edges (``skimage.feature.canny``, default thresholds) of the grey image: (H, W) bool."""
    from skimage.color import rgb2gray
    from skimage.feature import canny

    return canny(rgb2gray(_rgb01(image, "image")), sigma=sigma)


def resize_uint8(image: np.ndarray, size: int) -> np.ndarray:
    """RGB uint8 at ``size`` x ``size`` (bicubic, as :func:`difstudy.extract.to_tensor`)."""
    image = np.asarray(image)
    if image.shape[:2] == (size, size):
        return image
    return np.asarray(Image.fromarray(image).resize((size, size), Image.BICUBIC))
