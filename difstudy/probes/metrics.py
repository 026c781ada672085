"""Evaluation metrics for the probes: PCK (keypoint transfer), mIoU (semantic
segmentation) and accuracy (classification).

Every function accepts numpy arrays or torch tensors (any device, any dtype;
they are copied to CPU numpy) and returns plain Python floats (or an int64
numpy array for the confusion matrix). Bad shapes raise ``ValueError`` naming
the shape received and the shape expected.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

ArrayLike = Any  # numpy array, torch tensor or nested sequence


def as_numpy(x: ArrayLike) -> np.ndarray:
    """``x`` as a CPU numpy array (torch tensors are detached; half becomes float32)."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        if x.dtype in (torch.float16, torch.bfloat16):
            x = x.float()
        return x.numpy()
    return np.asarray(x)


def _check_xy(name: str, xy: np.ndarray) -> None:
    if xy.ndim != 2 or xy.shape[1] != 2:
        raise ValueError(f"{name} must have shape (N, 2) holding (x, y) per keypoint, got shape {tuple(xy.shape)}")


def pck(pred_xy: ArrayLike, gt_xy: ArrayLike, ref_size: ArrayLike, alpha: float = 0.1) -> float:
    """Percentage of correct keypoints, as a fraction in [0, 1].

    Args:
        pred_xy: (N, 2) predicted keypoints, (x, y) in pixels.
        gt_xy: (N, 2) ground-truth keypoints, (x, y) in pixels.
        ref_size: (N,) reference size per keypoint (``max(H, W)`` of the image or of
            the bounding box), or a scalar used for every keypoint.
        alpha: threshold factor; a keypoint is correct when its Euclidean error is
            ``<= alpha * ref_size`` (boundary included; computed in float64).

    Returns:
        The fraction of correct keypoints.
    """
    pred, gt = as_numpy(pred_xy).astype(np.float64), as_numpy(gt_xy).astype(np.float64)
    _check_xy("pred_xy", pred)
    _check_xy("gt_xy", gt)
    if pred.shape != gt.shape:
        raise ValueError(f"pred_xy and gt_xy must have the same shape, got {pred.shape} and {gt.shape}")
    if len(pred) == 0:
        raise ValueError("pck needs at least one keypoint, got N = 0")
    ref = as_numpy(ref_size).astype(np.float64)
    if ref.ndim == 0:
        ref = np.full(len(pred), float(ref))
    if ref.shape != (len(pred),):
        raise ValueError(f"ref_size must be a scalar or have shape ({len(pred)},), got shape {tuple(ref.shape)}")
    if alpha <= 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    dist = np.linalg.norm(pred - gt, axis=1)
    return float(np.mean(dist <= alpha * ref))


def confusion_matrix(pred: ArrayLike, target: ArrayLike, num_classes: int, ignore_index: int = 255) -> np.ndarray:
    """Confusion matrix of a labelling, ``cm[true, predicted]`` (rows: target).

    Args:
        pred: integer labels of any shape (e.g. (H, W) or (B, H, W)).
        target: integer labels, same shape as ``pred``; pixels equal to
            ``ignore_index`` are excluded.
        num_classes: K; valid labels are ``0 .. K-1``.
        ignore_index: target value to skip.

    Returns:
        (K, K) int64 counts. Sum such matrices over images to evaluate a stream.
    """
    p, t = as_numpy(pred), as_numpy(target)
    if p.shape != t.shape:
        raise ValueError(f"pred and target must have the same shape, got {p.shape} and {t.shape}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    p, t = p.reshape(-1).astype(np.int64), t.reshape(-1).astype(np.int64)
    keep = t != ignore_index
    p, t = p[keep], t[keep]
    for name, v in (("pred", p), ("target", t)):
        if v.size and (v.min() < 0 or v.max() >= num_classes):
            raise ValueError(
                f"{name} holds labels outside 0..{num_classes - 1} (min {v.min()}, max {v.max()});"
                f" only target pixels equal to ignore_index={ignore_index} are skipped"
            )
    cm = np.bincount(t * num_classes + p, minlength=num_classes * num_classes)
    return cm.reshape(num_classes, num_classes).astype(np.int64)


def iou_per_class(cm: ArrayLike) -> np.ndarray:
    """(K,) IoU per class from a (K, K) confusion matrix; NaN for classes absent
    from both prediction and target (union 0)."""
    cm = as_numpy(cm).astype(np.float64)
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1]:
        raise ValueError(f"confusion matrix must be square (K, K), got shape {cm.shape}")
    inter = np.diag(cm)
    union = cm.sum(0) + cm.sum(1) - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, inter / union, np.nan)


def miou_from_confusion(cm: ArrayLike) -> float:
    """Mean IoU over the classes present in prediction or target (union > 0).

    Args:
        cm: (K, K) confusion matrix, rows target, columns prediction.

    Returns:
        The mean IoU, NaN when no class is present (only ignored pixels).
    """
    iou = iou_per_class(cm)
    present = ~np.isnan(iou)
    return float(iou[present].mean()) if present.any() else float("nan")


def miou(pred: ArrayLike, target: ArrayLike, num_classes: int, ignore_index: int = 255) -> float:
    """Mean IoU of one labelling (same rules as :func:`miou_from_confusion`).

    Args:
        pred: integer labels of any shape.
        target: integer labels, same shape; ``ignore_index`` pixels are excluded.
        num_classes: K.
        ignore_index: target value to skip.
    """
    return miou_from_confusion(confusion_matrix(pred, target, num_classes, ignore_index))


def accuracy(pred: ArrayLike, target: ArrayLike) -> float:
    """Fraction of positions where ``pred == target`` (same shape, non-empty)."""
    p, t = as_numpy(pred), as_numpy(target)
    if p.shape != t.shape:
        raise ValueError(f"pred and target must have the same shape, got {p.shape} and {t.shape}")
    if p.size == 0:
        raise ValueError("accuracy needs at least one element, got an empty array")
    return float(np.mean(p == t))


def label_confusion(pred: ArrayLike, target: ArrayLike, num_classes: int, ignore_index: int | None) -> np.ndarray:
    """Confusion counts that keep the ignored pixels, for :func:`ddpmseg_miou`.

    Args:
        pred: integer predictions in ``0 .. K-1``, any shape.
        target: integer labels, same shape; values in ``0 .. K-1`` or ``ignore_index``.
        num_classes: K.
        ignore_index: the unlabelled value. Inside ``0 .. K-1`` (Bedroom-28's 0) it keeps its
            own row; outside (255) its pixels go to an extra last row.

    Returns:
        (K + 1, K) int64 counts ``cm[target, pred]``; row K holds the out-of-range ignored pixels.
    """
    p, t = as_numpy(pred), as_numpy(target)
    if p.shape != t.shape:
        raise ValueError(f"pred and target must have the same shape, got {p.shape} and {t.shape}")
    p, t = p.reshape(-1).astype(np.int64), t.reshape(-1).astype(np.int64).copy()
    if ignore_index is not None and not 0 <= ignore_index < num_classes:
        t[t == ignore_index] = num_classes
    if p.size and (p.min() < 0 or p.max() >= num_classes):
        raise ValueError(f"pred holds labels outside 0..{num_classes - 1} (min {p.min()}, max {p.max()})")
    if t.size and (t.min() < 0 or t.max() > num_classes):
        raise ValueError(
            f"target holds labels outside 0..{num_classes - 1} that are not ignore_index={ignore_index}"
            f" (min {t.min()}, max {t.max()})"
        )
    cm = np.bincount(t * num_classes + p, minlength=(num_classes + 1) * num_classes)
    return cm.reshape(num_classes + 1, num_classes).astype(np.int64)


def ddpmseg_iou_per_class(cm: ArrayLike, ignore_index: int | None) -> np.ndarray:
    """Per-class IoU exactly as DDPM-segmentation's ``compute_iou`` (``src/pixel_classifier.py``,
    the same in generic-diffusion-feature's ``scarce_segmentation``).

    For every class ``c != ignore_index``: ``inter / (1e-8 + union)`` with ``union`` counted over
    **all** pixels, ignored ones included (a prediction of ``c`` on an unlabelled pixel is a false
    positive), and a class absent from both prediction and target scoring 0 (not skipped).

    Args:
        cm: (K + 1, K) counts from :func:`label_confusion` summed over images.
        ignore_index: the class left out of the mean (None: none).

    Returns:
        IoU of the classes ``0 .. K-1`` except ``ignore_index``, in order.
    """
    cm = as_numpy(cm).astype(np.float64)
    k = cm.shape[1]
    if cm.ndim != 2 or cm.shape[0] != k + 1:
        raise ValueError(f"expected (K + 1, K) counts from label_confusion, got shape {cm.shape}")
    inter = np.diag(cm[:k])
    union = cm.sum(0) + cm[:k].sum(1) - inter
    keep = [c for c in range(k) if c != ignore_index]
    return inter[keep] / (1e-8 + union[keep])


def ddpmseg_miou(cm: ArrayLike, ignore_index: int | None) -> float:
    """Mean of :func:`ddpmseg_iou_per_class` (DDPM-seg's reported mIoU, as a fraction)."""
    return float(ddpmseg_iou_per_class(cm, ignore_index).mean())
