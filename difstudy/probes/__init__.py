"""Probes that read diffusion U-Net features: keypoint correspondence (PCK),
semantic segmentation (DDPM-seg pixel-MLP ensemble, light decoder heads; mIoU)
and image classification (linear probe), plus metrics and a multi-seed runner.

Features arrive as tensors, a (C, h, w) map per image (float16 or float32),
possibly at a lower resolution than the image.
"""

from .classification import ProbeResult, linear_probe, pool_features
from .correspondence import ConvHead, evaluate_pairs, match_keypoints, summarize_pck, train_conv_head
from .metrics import accuracy, confusion_matrix, iou_per_class, miou, miou_from_confusion, pck
from .runner import mean_std_over_seeds, seed_summary
from .segmentation import (
    LinearPixelProbe,
    PixelMLPEnsemble,
    SegHead,
    ShuffleBuffer,
    eval_seg_head,
    pixels_from_map,
    train_seg_head,
)

__all__ = [
    "ConvHead",
    "LinearPixelProbe",
    "PixelMLPEnsemble",
    "ProbeResult",
    "SegHead",
    "ShuffleBuffer",
    "accuracy",
    "confusion_matrix",
    "eval_seg_head",
    "evaluate_pairs",
    "iou_per_class",
    "linear_probe",
    "match_keypoints",
    "mean_std_over_seeds",
    "miou",
    "miou_from_confusion",
    "pck",
    "pixels_from_map",
    "pool_features",
    "seed_summary",
    "summarize_pck",
    "train_conv_head",
    "train_seg_head",
]
