"""GATE (Meng et al., "Suppress Content Shift", NeurIPS 2024): content shift,
the Img2Img guideline, generation techniques as extraction variants, and
feature amalgamation.

The modules follow the study's steps; each imports only the ones above it:

- :mod:`~difstudy.gate.scores`: the two content-shift scores (``contour``, ``structure``);
- :mod:`~difstudy.gate.techniques`: techniques (prompt rules, ControlNets, LoRAs) and
  their weights, fine captions;
- :mod:`~difstudy.gate.features`: extraction with all techniques in one U-Net forward,
  the feature cache, techniques as feature sources of :mod:`difstudy.protocols`;
- :mod:`~difstudy.gate.shift`: reconstructions (VAE, predicted ``x0``, Img2Img) and the
  content-shift table;
- :mod:`~difstudy.gate.amalgamation`: weight assigners and amalgamated feature sources;
- :mod:`~difstudy.gate.claims`: the claims (decided by :mod:`difstudy.verdicts` only), the
  guideline and the page's tables;
- :mod:`~difstudy.gate.runs`: the page's settings and probe runs through the protocol layer.

Every public name is re-exported here: ``from difstudy import gate; gate.content_shift(...)``.
"""

from .amalgamation import (
    AMALGAMATED_LABEL,
    FIT_TASKS,
    AmalgamatedFeatures,
    AmalgamatedHead,
    Amalgamation,
    AmalgamationConfig,
    WeightAssigner,
    fit_amalgamation,
    stack_buckets,
    train_amalgamated_head,
)
from .claims import (
    EFFECTS,
    FAILS,
    HOLDS,
    INCONCLUSIVE,
    MIN_AMALGAMATION_GAIN,
    MIN_DIVERSITY_GAIN,
    MIN_FEATURE_GAIN,
    MIN_SHIFT,
    MIN_SHIFT_EXISTS,
    MIN_SHIFT_REDUCTION,
    MIN_SHIFT_RHO,
    NOT_MEASURED,
    SEED_UNITS,
    TASK_METRICS,
    content_shift_claims,
    feature_claims,
    guideline_claims,
    guideline_effect,
    guideline_rows,
    guideline_summary,
    guideline_table,
    reference_table,
    spearman,
    t_label,
    technique_summary,
)
from .features import (
    GateExtractor,
    TechniqueFeatures,
    bucket_label,
    decode_latents,
    extract_techniques,
)
from .runs import (
    gate_sources,
    run_gate_probes,
)
from .scores import (
    MEASURES,
    content_shift,
    edge_map,
    laplacian_map,
    resize_uint8,
)
from .shift import (
    METHODS,
    TIMESTEPS,
    ShiftConfig,
    content_shift_table,
    domain_indices,
    img2img,
    img2img_start,
    predicted_x0,
    vae_reconstruction,
)
from .techniques import (
    BASIC,
    CONTROLNET_ALIASES,
    MINI_CONTROLNET_PATH,
    MINI_LORA_PATH,
    MODELS_DIR,
    TRAIN_COMMANDS,
    Technique,
    build_controlnet,
    control_images,
    load_controlnet,
    load_lora,
    read_captions,
    technique_status,
    with_captions,
)

__all__ = [
    "AMALGAMATED_LABEL",
    "BASIC",
    "CONTROLNET_ALIASES",
    "EFFECTS",
    "FAILS",
    "FIT_TASKS",
    "HOLDS",
    "INCONCLUSIVE",
    "MEASURES",
    "METHODS",
    "MINI_CONTROLNET_PATH",
    "MINI_LORA_PATH",
    "MIN_AMALGAMATION_GAIN",
    "MIN_DIVERSITY_GAIN",
    "MIN_FEATURE_GAIN",
    "MIN_SHIFT",
    "MIN_SHIFT_EXISTS",
    "MIN_SHIFT_REDUCTION",
    "MIN_SHIFT_RHO",
    "MODELS_DIR",
    "NOT_MEASURED",
    "SEED_UNITS",
    "TASK_METRICS",
    "TIMESTEPS",
    "TRAIN_COMMANDS",
    "AmalgamatedFeatures",
    "AmalgamatedHead",
    "Amalgamation",
    "AmalgamationConfig",
    "GateExtractor",
    "ShiftConfig",
    "Technique",
    "TechniqueFeatures",
    "WeightAssigner",
    "bucket_label",
    "build_controlnet",
    "content_shift",
    "content_shift_claims",
    "content_shift_table",
    "control_images",
    "decode_latents",
    "domain_indices",
    "edge_map",
    "extract_techniques",
    "feature_claims",
    "fit_amalgamation",
    "gate_sources",
    "guideline_claims",
    "guideline_effect",
    "guideline_rows",
    "guideline_summary",
    "guideline_table",
    "img2img",
    "img2img_start",
    "laplacian_map",
    "load_controlnet",
    "load_lora",
    "predicted_x0",
    "read_captions",
    "reference_table",
    "resize_uint8",
    "run_gate_probes",
    "spearman",
    "stack_buckets",
    "t_label",
    "technique_status",
    "technique_summary",
    "train_amalgamated_head",
    "vae_reconstruction",
    "with_captions",
]
