"""The papers' numbers, for labelled reference rows only (real models on real data, never
measured here).

One record per (setting, metric): :data:`REFERENCE_NUMBERS`, as a tidy table by
:func:`reference_frame` (``difstudy.tables.REFERENCE``, ``difstudy.gate.reference_table``).
Every row says where its number comes from (``source``: paper, task, row) and what produced
it (``includes``: models, activations, techniques, head, as the official code runs it). The
numbers are those of the study notes (``../shared/STUDY.md``, "Reference numbers from the
papers"); the ``includes`` texts were read from the official repositories
(``Darkbblue/generic-diffusion-feature`` for paper 1, ``Darkbblue/diffusion-content-shift``
for GATE, ``yandex-research/ddpm-segmentation`` for DDPM-seg). The papers' table numbers are
not given: neither the notes nor the official READMEs state them, so each source names the
paper, the task and the row instead.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import pandas as pd

ACTIVATIONS_PAPER = (
    "Meng et al. 2024, Not All Diffusion Model Activations Have Been Evaluated (NeurIPS, arXiv 2410.03558)"
)
GATE_PAPER = "Meng et al. 2024 (GATE), Suppress Content Shift (NeurIPS, arXiv 2410.06719)"
NOT_VERIFIED = "table number not verified"

_SPAIR = "SPair-71k semantic correspondence, PCK@0.1"
_LEGACY15 = "up-level0/1/2-upsampler-out + up-level3-repeat2-vit-out (config_15_legacy.json)"
_OURS15 = "the four Ours-v1.5 activations (config_15_practical.json)"
_OURSXL = "the four Ours-XL activations (config_xl_practical.json)"
_SD15, _SDXL = "SD1.5 at 512 px, t = 50", "SDXL at 1024 px, t = 50"
_CORR_HEAD = "aggregation network with a conv head (official command: --algorithm conv)"
_SEG_HEAD = "UPerNet head, 80k iterations (official mmseg config)"
_PIXEL = "ensemble of pixel MLPs, mean of 5 random train/test splits (official README)"
_XLT_3 = (
    "amalgamation of SDXL (Ours-XL set), SD1.5 (config_15_amalgamation.json with up_cross attention maps) "
    "and Playground v2 (config_pg_amalgamation.json), learned weight assigners"
)
_XLT_2 = (
    "amalgamation of SDXL (Ours-XL set) and Playground v2 only: the official ade_full/city_full configs "
    "hold no SD1.5 features"
)
_GATE_TECH = "learned weight assigners over the technique feature sets"


@dataclass(frozen=True)
class ReferenceNumber:
    """One number from a paper.

    setting: the paper's name for the features (with what else they include when the name hides
    it, e.g. ``GATE (SD1.5 + LSUN-horse DDPM)``); metric: task and score; value: as reported;
    spread: the ± the paper reports (None when it reports none); source: paper, task, row;
    includes: what produced the number."""

    setting: str
    metric: str
    value: float
    source: str
    includes: str
    spread: float | None = None


def _activations(task: str, setting: str) -> str:
    return f"{ACTIVATIONS_PAPER}; {task} results, row {setting!r}; {NOT_VERIFIED}"


def _gate(task: str, row: str) -> str:
    return f"{GATE_PAPER}; {task} results, row {row!r}; {NOT_VERIFIED}"


def _spair(setting: str, img: float, bbox: float, source: str, includes: str) -> list[ReferenceNumber]:
    return [
        ReferenceNumber(setting, "SPair-71k PCK@0.1 img", img, source, includes),
        ReferenceNumber(setting, "SPair-71k PCK@0.1 bbox", bbox, source, includes),
    ]


REFERENCE_NUMBERS: tuple[ReferenceNumber, ...] = (
    # -- paper 1 (Not All Diffusion Model Activations) --------------------------------
    *_spair("Legacy-v1.5", 75.14, 66.73, _activations(_SPAIR, "Legacy-v1.5"), f"{_SD15}, {_LEGACY15}; {_CORR_HEAD}"),
    *_spair(
        "Legacy-XL",
        66.00,
        59.16,
        _activations(_SPAIR, "Legacy-XL"),
        f"{_SDXL}, up-level0/1-upsampler-out + up-level2-repeat2-res-out; {_CORR_HEAD}",
    ),
    *_spair("Ours-v1.5", 77.78, 69.83, _activations(_SPAIR, "Ours-v1.5"), f"{_SD15}, {_OURS15}; {_CORR_HEAD}"),
    ReferenceNumber(
        "Ours-v1.5",
        "ADE20K mIoU",
        41.07,
        _activations("ADE20K semantic segmentation", "Ours-v1.5"),
        f"{_SD15}, {_OURS15}; {_SEG_HEAD}, 512 px crops",
    ),
    ReferenceNumber(
        "Ours-v1.5",
        "Cityscapes mIoU",
        64.10,
        _activations("Cityscapes semantic segmentation", "Ours-v1.5"),
        f"{_SD15}, {_OURS15}; {_SEG_HEAD}, 1024 px crops",
    ),
    *_spair("Ours-XL", 81.72, 75.18, _activations(_SPAIR, "Ours-XL"), f"{_SDXL}, {_OURSXL}; {_CORR_HEAD}"),
    ReferenceNumber(
        "Ours-XL",
        "ADE20K mIoU",
        43.45,
        _activations("ADE20K semantic segmentation", "Ours-XL"),
        f"{_SDXL}, {_OURSXL}; {_SEG_HEAD}, 512 px crops",
    ),
    ReferenceNumber(
        "Ours-XL",
        "Cityscapes mIoU",
        74.47,
        _activations("Cityscapes semantic segmentation", "Ours-XL"),
        f"{_SDXL}, {_OURSXL}; {_SEG_HEAD}, 1024 px crops",
    ),
    ReferenceNumber(
        "Ours-XL",
        "Horse-21 mIoU",
        62.7,
        _activations("Horse-21 label-scarce segmentation", "Ours-XL"),
        f"{_SDXL}, {_OURSXL}, prompt 'a photo of a horse'; {_PIXEL}",
    ),
    *_spair("Ours-XL-t", 83.90, 76.86, _activations(_SPAIR, "Ours-XL-t"), f"{_XLT_3}; {_CORR_HEAD}"),
    ReferenceNumber(
        "Ours-XL-t",
        "ADE20K mIoU",
        45.71,
        _activations("ADE20K semantic segmentation", "Ours-XL-t"),
        f"{_XLT_2}; {_SEG_HEAD}, 512 px crops",
    ),
    ReferenceNumber(
        "Ours-XL-t",
        "Cityscapes mIoU",
        75.89,
        _activations("Cityscapes semantic segmentation", "Ours-XL-t"),
        f"{_XLT_2}; {_SEG_HEAD}, 1024 px crops",
    ),
    ReferenceNumber(
        "Ours-XL-t",
        "Horse-21 mIoU",
        66.3,
        _activations("Horse-21 label-scarce segmentation", "Ours-XL-t"),
        f"{_XLT_3}, 8154 channels; {_PIXEL}",
    ),
    ReferenceNumber(
        "DDPM-seg",
        "Horse-21 mIoU",
        65.0,
        "Baranchuk et al. 2022 (DDPM-seg, arXiv 2112.03126) as quoted by Meng et al. 2024; Horse-21 label-scarce "
        f"segmentation results, row 'DDPM-seg'; which of the two papers, and {NOT_VERIFIED}; DDPM-seg's own "
        "README reports 63.1 ± 0.9 (the quoting paper's splits may differ)",
        "LSUN-horse DDPM (guided-diffusion, 256 px) decoder features at several steps (official "
        "experiments/horse_21/ddpm.json: blocks 6-9, t = 50/150/250/350); ensemble of 10 pixel MLPs",
    ),
    # -- paper 2 (GATE) ------------------------------------------------------------------
    *_spair(
        "GATE (SD1.5)",
        76.60,
        69.10,
        _gate(_SPAIR, "GATE"),
        f"{_SD15}, {_LEGACY15}: 6 feature sets (fine-grained prompt x 2 seeds, LoRA x 2 weights, ControlNet canny "
        "x 2 seeds, denoising from t = 60) + attention maps (ControlNet, LoRA, prompt); "
        f"{_GATE_TECH}; official commands use the conv head (gate_conv), an nn variant exists: which one "
        "these numbers are is not verified",
    ),
    *_spair(
        "GATE baseline (SD1.5)",
        73.96,
        65.74,
        _gate(_SPAIR, "baseline"),
        "SD1.5 diffusion features without generation techniques (the GATE paper's baseline; its layers and "
        "head are not in the official READMEs: not verified)",
    ),
    ReferenceNumber(
        "GATE (SD1.5)",
        "ADE20K mIoU",
        40.51,
        _gate("ADE20K semantic segmentation", "GATE"),
        f"{_SD15}, up-level0/1/2-upsampler-out: 3 feature sets (plain, LoRA lora2a + ControlNet canny, LoRA lora2b "
        f"+ ControlNet canny; one generic scene prompt); {_GATE_TECH}; {_SEG_HEAD}, 512 px crops (gate_ade.py)",
    ),
    ReferenceNumber(
        "GATE (SD1.5)",
        "Cityscapes mIoU",
        64.20,
        _gate("Cityscapes semantic segmentation", "GATE"),
        f"{_SD15}, up-level0/1/2-upsampler-out: 3 feature sets (plain, two LoRAs each with ControlNet canny; "
        f"one street-scene prompt); {_GATE_TECH}; {_SEG_HEAD}, 1024 px crops (gate_city.py)",
    ),
    ReferenceNumber(
        "GATE (SD1.5 + LSUN-horse DDPM)",
        "Horse-21 mIoU",
        67.2,
        _gate("Horse-21 label-scarce segmentation", "GATE"),
        "SD1.5 + LSUN-horse DDPM features: 4 SD1.5 feature sets at 512 px, t = 50, "
        f"{_LEGACY15} with up_cross attention maps (fine-grained prompt; ControlNet canny, denoising from t = 60; "
        "LoRA a1; LoRA b1), and the DDPM-seg LSUN-horse DDPM features through a second set of weight "
        "assigners (official scarce_segmentation_gate, --ddpm_feature); pixel MLP classifiers",
        spread=1.1,
    ),
    ReferenceNumber(
        "ResNet-50",
        "CIFAR-10 accuracy",
        93.62,
        _gate("CIFAR-10 classification", "ResNet-50"),
        "a ResNet-50 classifier (the official repository holds no classification code: setup not verified)",
    ),
    ReferenceNumber(
        "diffusion-feature baseline",
        "CIFAR-10 accuracy",
        94.55,
        _gate("CIFAR-10 classification", "diffusion-feature baseline"),
        "diffusion features without generation techniques (no classification code in the official repository: "
        "model and layers not verified)",
    ),
    ReferenceNumber(
        "GATE",
        "CIFAR-10 accuracy",
        95.21,
        _gate("CIFAR-10 classification", "GATE"),
        "GATE technique features amalgamated (no classification code in the official repository: model, "
        "techniques and head not verified)",
    ),
)

COLUMNS = ("setting", "metric", "value", "spread", "source", "includes")


def reference_frame(paper: str | None = None) -> pd.DataFrame:
    """:data:`REFERENCE_NUMBERS` as a tidy table (one row per setting and metric), columns
    ``setting, metric, value, spread, source, includes``; ``paper``: only the rows whose source
    starts with it (e.g. :data:`GATE_PAPER`)."""
    rows = [asdict(r) for r in REFERENCE_NUMBERS if paper is None or r.source.startswith(paper)]
    return pd.DataFrame(rows, columns=list(COLUMNS))
