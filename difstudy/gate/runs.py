"""GATE, the page's probe runs: the feature settings (baseline, each technique, their
amalgamation, the timestep control) and every setting, task and seed through the protocol
layer (:func:`difstudy.protocols.run_task`).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import pandas as pd
import torch
from tqdm.auto import tqdm

from ..errors import DifstudyError
from .features import TechniqueFeatures
from .sources import AMALGAMATED_LABEL, FIT_TASKS, AmalgamatedFeatures, AmalgamationConfig
from .techniques import BASIC, Technique

# The official SPair-71k bucket set (diffusion-content-shift, correspondence_gate/README.md): no
# basic bucket; the fine prompt with two noise seeds, a LoRA with a simple prompt at two weights,
# the canny ControlNet (denoising from t + 10) with the simple prompt and two noise seeds; then the
# up-block cross-attention maps (ControlNet, LoRA, a prompt listing the classes) concatenated
# last, unweighted. The README says "different LoRA weights" without values: difstudy reads it as
# two adapter scales, 1 and 0.5 (a labelled reading).
OFFICIAL_LORA_SCALES = (1.0, 0.5)
ATTENTION_LABEL = "attention maps (unweighted)"


def official_techniques(
    controlnet=None, lora=None, lora_scales: Sequence[float] = OFFICIAL_LORA_SCALES, simple_prompt: str = "generic"
) -> list[Technique]:
    """The official bucket set's techniques (see :data:`OFFICIAL_LORA_SCALES`); a ControlNet or
    LoRA of None leaves its pair out. ``simple_prompt``: the prompt rule of the LoRA and ControlNet
    buckets (official: "a photo"; the toy world's generic caption)."""
    out = [Technique("fine", prompt="fine"), Technique("fine-seed2", prompt="fine", noise_seed=1)]
    if lora is not None:
        a, b = lora_scales
        out += [
            Technique("lora", prompt=simple_prompt, lora=lora, lora_scale=a),
            Technique(f"lora-x{b:g}", prompt=simple_prompt, lora=lora, lora_scale=b),
        ]
    if controlnet is not None:
        out += [
            Technique("controlnet", prompt=simple_prompt, controlnet=controlnet),
            Technique("controlnet-seed2", prompt=simple_prompt, controlnet=controlnet, noise_seed=1),
        ]
    return out


BUCKET_SETS = ("official", "per-technique")


def study_techniques(
    bucket_set: str = "official",
    controlnet=None,
    lora=None,
    timestep: int = 50,
    denoising_from: int | None = None,
    noising: str = "ddpm",
) -> list[Technique]:
    """The GATE page's candidate techniques.

    ``official``: :func:`official_techniques`; ``per-technique``: difstudy's earlier set, one
    bucket per technique (``generic``, ``fine``, ``controlnet``, ``lora``), amalgamated with the
    basic bucket. ``denoising_from``: where the ControlNet techniques' denoising path starts
    (official 60 for t = 50; equal to ``timestep``: the one-forward variant; None: the
    default span of 10); ``noising``: ``ddpm`` or ``ddim-inversion`` for every technique."""
    from dataclasses import replace

    if bucket_set not in BUCKET_SETS:
        raise DifstudyError(f"bucket_set must be one of {list(BUCKET_SETS)}, got {bucket_set!r}")
    if bucket_set == "official":
        techs = official_techniques(controlnet, lora)
    else:
        techs = [Technique("generic", prompt="generic"), Technique("fine", prompt="fine")]
        techs += [Technique("controlnet", controlnet=controlnet)] if controlnet is not None else []
        techs += [Technique("lora", lora=lora)] if lora is not None else []
    span = None
    if denoising_from is not None:
        span = int(denoising_from) - int(timestep)
        if span < 0:
            raise DifstudyError(
                f"denoising_from={denoising_from} is below the feature timestep {timestep}: "
                "the ControlNet path denoises from denoising_from down to the timestep (official 60 for 50)"
            )
    return [replace(tq, denoise_span=span if tq.controlnet is not None else None, noising=noising) for tq in techs]


def attention_technique(
    class_names: Sequence[str], controlnet=None, lora=None, denoise_span: int | None = None
) -> Technique:
    """The official attention bucket's conditioning: ControlNet (its denoising path), LoRA and a
    prompt listing the dataset's classes ("a photo of aeroplane, bicycle, ..." for SPair)."""
    prompt = "text:a photo of " + ", ".join(class_names)
    return Technique("attention", prompt=prompt, controlnet=controlnet, lora=lora, denoise_span=denoise_span)


def up_cross_maps(unet) -> list[str]:
    """Names of the up blocks' cross-attention maps (the official ``--attention up_cross``)."""
    from ..catalog import Catalog

    return [a.name for a in Catalog(unet) if a.name.startswith("up-") and a.name.endswith("-cross-map")]


class SizeMean:
    """A feature source averaging its source's maps of equal spatial size, one map per size, largest
    first (the official ``aggregate_attention`` averages the attention maps of one resolution)."""

    def __init__(self, source, label: str = ATTENTION_LABEL):
        self.source, self.label = source, label

    @property
    def seed(self) -> int:
        return self.source.seed

    def for_seed(self, seed: int) -> SizeMean:
        return SizeMean(self.source.for_seed(seed), self.label)

    def prepare(self, records) -> None:
        self.source.prepare(records)

    def maps(self, record) -> list[torch.Tensor]:
        groups: dict[tuple[int, int], list[torch.Tensor]] = {}
        for m in self.source.maps(record):
            groups.setdefault(tuple(m.shape[-2:]), []).append(m.float())
        order = sorted(groups, key=lambda hw: -hw[0] * hw[1])
        return [torch.stack(groups[hw]).mean(0) for hw in order]


def technique_label(base, name: str) -> str:
    """A technique's row label: its name, and how its latent reaches t when that is not the
    official default (``controlnet [one forward]``, ``fine [ddim-inversion]``)."""
    tq = next((tq for tq in getattr(base, "techniques", ()) if tq.name == name), None)
    return f"{name} [{tq.path_label}]" if tq is not None and tq.path_label else name


def gate_sources(
    base: TechniqueFeatures,
    techniques: Sequence[str],
    t: int,
    records: dict,
    bench,
    control_timesteps: Sequence[int] | None = None,
    config: AmalgamationConfig = AmalgamationConfig(),
    baseline: str = "basic",
    control_base: TechniqueFeatures | None = None,
    amalgamate: Sequence[str] | None = None,
    extra=None,
    singles: Sequence[str] | None = None,
) -> dict[str, dict[str, Any]]:
    """``{setting: {task: source}}``: the baseline, each technique alone, all of them amalgamated
    (``baseline`` and ``techniques`` at ``t``) and, when ``control_timesteps`` has two or more
    timesteps, the baseline at those timesteps amalgamated (read from ``control_base``, default
    ``base``, which must extract them; a source of the baseline alone shares its cache entries).
    ``records`` and ``bench`` are :func:`difstudy.protocols.task_records` and its
    :class:`~difstudy.protocols.TaskConfig` (or a config extending it); an amalgamation is fit
    per task on the training data its protocol trains on for the seed
    (:func:`difstudy.protocols.train_records`).

    ``amalgamate``: the techniques amalgamated (default: ``baseline`` and ``techniques``; the
    official set passes its techniques, no baseline); ``extra``: a feature source appended
    unweighted after the mix (the official attention maps, :class:`SizeMean`); ``singles``: the
    techniques measured alone (default: all of ``techniques``; the official set's second seeds and
    weights are amalgamation material, never reported alone by the official code)."""
    from ..protocols import train_records

    train = {task: lambda seed, task=task: train_records(task, records[task], bench, seed) for task in FIT_TASKS}
    tasks = list(bench.tasks)
    other = [task for task in tasks if task not in FIT_TASKS]
    if other:
        raise DifstudyError(f"the GATE page runs the tasks {list(FIT_TASKS)}; remove {other} from the config's tasks")
    out: dict[str, dict[str, Any]] = {}
    out[baseline] = {task: base.select((baseline, t), label=baseline) for task in tasks}
    for name in techniques if singles is None else singles:
        out[name] = {task: base.select((name, t), label=technique_label(base, name)) for task in tasks}
    names = list(amalgamate) if amalgamate is not None else ([baseline, *techniques] if techniques else [])
    if names:
        label = " + ".join(technique_label(base, n) for n in names)
        label = AMALGAMATED_LABEL + label + (f" + {ATTENTION_LABEL}" if extra is not None else "")
        buckets = [(n, t) for n in names]
        out[label] = {
            task: AmalgamatedFeatures(base, buckets, task, train[task], fit_config(task, bench, config), label=label,
                                      extra=extra)
            for task in tasks
        }  # fmt: skip
    if control_timesteps is not None and len(control_timesteps) >= 2:
        label = AMALGAMATED_LABEL + " + ".join(f"{baseline} t={s}" for s in control_timesteps)
        buckets = [(baseline, int(s)) for s in control_timesteps]
        cb = control_base or base
        out[label] = {
            task: AmalgamatedFeatures(cb, buckets, task, train[task], fit_config(task, bench, config), label=label)
            for task in tasks
        }
    return out


def fit_config(task: str, bench, config: AmalgamationConfig) -> AmalgamationConfig:
    """``config`` for ``task``: the joint fit where the task's protocol trains a model the assigners
    can join (label-scarce segmentation; correspondence with the conv head, ``method="conv"``),
    the two-stage fit otherwise (the zero-shot correspondence protocol has no head; each row's label
    names its fit)."""
    from dataclasses import replace

    zero_shot = task == "correspondence" and bench.correspondence.method != "conv"
    return replace(config, fit="two-stage") if config.fit == "joint" and zero_shot else config


def study_sources(
    pipe,
    model: str,
    activations,
    techniques: Sequence[Technique],
    bench,
    records: dict,
    *,
    bucket_set: str = "official",
    control_timesteps: Sequence[int] = (25, 50),
    amalgamation: AmalgamationConfig = AmalgamationConfig(),
    class_names: Sequence[str] = (),
    controlnet=None,
    lora=None,
    denoising_from: int = 60,
) -> dict[str, dict[str, Any]]:
    """The GATE page's feature settings (:func:`gate_sources`) for the ``techniques`` that are
    available, at ``bench.timestep``:

    - the baseline and each technique from one :class:`TechniqueFeatures` over ``activations``;
    - the timestep control: the baseline at ``control_timesteps``, amalgamated;
    - ``bucket_set="official"``: every technique amalgamated without the basic bucket, and, when
      both a ControlNet and a LoRA are among them, the up blocks' cross-attention maps under the
      official attention conditioning (:func:`attention_technique` with ``class_names``,
      ControlNet denoising from ``denoising_from``) appended last, unweighted (:class:`SizeMean`);
      each technique alone only for its first seed and weight (the rest is amalgamation material);
    - ``per-technique``: the basic bucket and every technique amalgamated, each alone."""
    from ..protocols import ExtractionConfig

    t = int(bench.timestep)
    ex = ExtractionConfig(image_size=bench.image_size, batch_size=bench.batch_size, cache_dir=bench.cache_dir)
    names = [tq.name for tq in techniques]
    base = TechniqueFeatures(pipe, [activations], [BASIC, *techniques], (t,), ex, 0, model)
    control = TechniqueFeatures(pipe, [activations], [BASIC], tuple(control_timesteps), ex, 0, model)
    official = bucket_set == "official"
    extra = None
    if official and {"controlnet", "lora"} <= set(names):
        attn = attention_technique(class_names, controlnet, lora, int(denoising_from) - t)
        extra = SizeMean(TechniqueFeatures(pipe, up_cross_maps(pipe.unet), [attn], (t,), ex, 0, model))
    singles = [tq.name for tq in techniques if tq.noise_seed == 0 and tq.lora_scale == 1.0]
    return gate_sources(
        base, names, t, records, bench, control_timesteps, amalgamation,
        control_base=control, amalgamate=names if official else None, extra=extra, singles=singles,
    )  # fmt: skip


def run_gate_probes(sources: dict[str, dict[str, Any]], records: dict, bench, progress: bool = True) -> pd.DataFrame:
    """Every setting, task and seed through the protocols (:func:`difstudy.protocols.run_task`):
    tidy rows with ``setting``, ``model``, ``t`` and ``seconds`` added."""
    from ..protocols import run_task

    frames = []
    total = sum(len(v) for v in sources.values()) * len(bench.seeds)
    bar = tqdm(total=total, desc="GATE probes", disable=not progress)
    for setting, per_task in sources.items():
        for task, source in per_task.items():
            for seed in bench.seeds:
                t0 = time.time()
                df = run_task(task, source, records[task], bench, int(seed))
                frames.append(df.assign(setting=setting, model=bench.model, seconds=round(time.time() - t0, 2)))
                bar.update(1)
    bar.close()
    return pd.concat(frames, ignore_index=True)
