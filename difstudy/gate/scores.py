"""GATE, step 1: the two content-shift scores between an image and its reconstruction, and
the image helpers (Canny edges, resizing) the ControlNet conditions share with them.

**Content shift, measured.** The paper shows content shift only as pictures
(contours and exact shapes that the U-Net's reconstruction of a noised image
gets wrong), and its official repository (Darkbblue/diffusion-content-shift)
has no scoring code. difstudy therefore defines two scores between an input
image ``x`` and a reconstruction ``y`` (both RGB, compared in [0, 1]):

- ``contour``: mean absolute difference of the Laplacians of the grey images,
  ``mean_p |L(g(x))_p - L(g(y))_p|`` with ``g`` = luminance
  (``skimage.color.rgb2gray``) after an optional Gaussian blur of ``sigma``
  pixels (``skimage.filters.gaussian``, default 1; 0 = none) and ``L`` the
  3x3 Laplacian of ``skimage.filters.laplace``. Edges that move, vanish or
  appear all add to it; a vertical step edge of height 1 that moves by one
  pixel gives ``4 / W`` (without blur) on a ``W`` px wide image.
- ``structure``: ``1 - SSIM(x, y)`` (``skimage.metrics.structural_similarity``
  over the RGB channels, data range 1, default 7x7 window).

Both are 0 for identical images. ``vae`` rows (encode then decode, no U-Net)
measure the floor that the autoencoder alone causes; the claims compare the
U-Net's reconstructions against it (:mod:`difstudy.gate.shift` makes the
reconstructions, :mod:`difstudy.gate.claims` decides the claims).
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from ..errors import DifstudyError

MEASURES = ("contour", "structure")


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
