"""Probes that read diffusion U-Net features: keypoint correspondence (PCK),
semantic segmentation (DDPM-seg pixel-MLP ensemble, light decoder heads; mIoU)
and image classification (linear probe), plus their metrics.

Features arrive as tensors, a (C, h, w) map per image (float16 or float32),
possibly at a lower resolution than the image. The study's task protocols,
which feed these probes from dataset records, live in :mod:`difstudy.protocols`.
"""

from .classification import LinearProbe, ProbeResult, linear_probe, pool_features
from .correspondence import ConvHead, evaluate_pairs, match_keypoints, summarize_pck, train_conv_head
from .metrics import (
    accuracy,
    confusion_matrix,
    ddpmseg_iou_per_class,
    ddpmseg_miou,
    iou_per_class,
    label_confusion,
    miou,
    miou_from_confusion,
    pck,
)
from .segmentation import (
    LinearPixelProbe,
    PixelMLPEnsemble,
    SegHead,
    ShuffleBuffer,
    eval_seg_head,
    official_hidden,
    pixel_mlp,
    pixels_from_map,
    seg_predictions,
    train_seg_head,
)

__all__ = [
    "ConvHead",
    "LinearPixelProbe",
    "LinearProbe",
    "PixelMLPEnsemble",
    "ProbeResult",
    "SegHead",
    "ShuffleBuffer",
    "accuracy",
    "confusion_matrix",
    "ddpmseg_iou_per_class",
    "ddpmseg_miou",
    "eval_seg_head",
    "evaluate_pairs",
    "iou_per_class",
    "label_confusion",
    "linear_probe",
    "match_keypoints",
    "miou",
    "miou_from_confusion",
    "official_hidden",
    "pck",
    "pixel_mlp",
    "pixels_from_map",
    "pool_features",
    "seg_predictions",
    "summarize_pck",
    "train_conv_head",
    "train_seg_head",
]
