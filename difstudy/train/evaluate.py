"""Recognition of class-conditional samples against training step::

    python -m difstudy.train.evaluate --run runs/mini2 --model difstudy/models/difstudy-mini

For every EMA snapshot that :mod:`difstudy.train.mini` saved in
``RUN/snapshots`` (U-Net and text encoder at step N), load it into the
exported pipeline, generate ``--per-class`` samples per class prompt and let
the judge (:mod:`difstudy.judge`) name them; with ``--prompt-effect`` also
measure :func:`difstudy.card.prompt_effect` (does the class word lower the
denoising loss?), which moves long before recognition does; ``--only-steps``
evaluates the named snapshots only. Writes
``recognition_curve.csv`` (step, recognised, n, ci95_low, ci95_high, and
loss_own_class, other_over_own with ``--prompt-effect``) into the model folder,
where the model card reads it: the snapshots themselves are too large to commit.

A model continued with ``--init-from`` names its snapshots by total step, so
evaluating the continuation's run **adds** its steps to the curve already there
(rows of a re-evaluated step are replaced); ``--replace`` starts the curve afresh.
"""

from __future__ import annotations

import argparse
import os
import re
from pathlib import Path

import pandas as pd
import torch

from ..card import prompt_effect, recognition_summary, sample_recognition
from ..judge import load_judge
from ..models import load


def evaluate_snapshots(
    model: str | Path,
    run: Path,
    per_class: int = 20,
    steps: int = 30,
    guidance: float = 4.0,
    with_prompt_effect: bool = False,
    only_steps: list[int] | None = None,
):
    """One curve row per snapshot in ``run`` (only those at ``only_steps``, if given)."""
    from safetensors.torch import load_file

    pipe = load(str(model))
    judge, _ = load_judge()
    found = sorted(run.glob("snapshots/unet_*.safetensors"))
    if not found:
        raise FileNotFoundError(f"no snapshots in {run / 'snapshots'}; train with --snapshot-every N")
    by_step = {int(re.search(r"(\d+)", path.stem).group(1)): path for path in found}
    if only_steps:
        missing = sorted(set(only_steps) - set(by_step))
        if missing:
            raise ValueError(f"no snapshot at step(s) {missing} in {run / 'snapshots'}; it has {sorted(by_step)}")
        by_step = {k: by_step[k] for k in sorted(set(only_steps))}
    rows = []
    for step, path in by_step.items():
        pipe.unet.load_state_dict({k: v.float() for k, v in load_file(str(path)).items()})
        te = path.with_name(path.name.replace("unet_", "text_encoder_"))
        pipe.text_encoder.load_state_dict({k: v.float() for k, v in load_file(str(te)).items()})
        df, _ = sample_recognition(pipe, judge, per_class=per_class, steps=steps, guidance=guidance)
        row = dict(step=step, **recognition_summary(df))
        if with_prompt_effect:
            effect = prompt_effect(pipe).loc["mean"]  # no_grad inside
            row.update(loss_own_class=float(effect["own class"]), other_over_own=float(effect["other / own"]))
        rows.append(row)
        extra = f", other/own {row['other_over_own']:.4f}" if with_prompt_effect else ""
        print(f"step {step}: {row['recognised']:.1%} recognised{extra}", flush=True)
    return pd.DataFrame(rows)


def merge_curve(old: pd.DataFrame | None, new: pd.DataFrame) -> pd.DataFrame:
    """``old`` rows whose step ``new`` does not re-evaluate, then ``new``, sorted by step."""
    if old is None or old.empty:
        return new.sort_values("step").reset_index(drop=True)
    keep = old[~old["step"].isin(new["step"])]
    return pd.concat([keep, new], ignore_index=True).sort_values("step").reset_index(drop=True)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m difstudy.train.evaluate", description=__doc__.split("\n")[0])
    ap.add_argument("--run", type=Path, required=True, help="training run folder with snapshots/")
    ap.add_argument("--model", type=Path, default=Path("difstudy/models/difstudy-mini"))
    ap.add_argument("--per-class", type=int, default=20)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument(
        "--prompt-effect",
        action="store_true",
        help="also record the class prompt's effect on the denoising loss (card.prompt_effect, about 10 s each)",
    )
    ap.add_argument("--replace", action="store_true", help="drop the curve already in the model folder")
    ap.add_argument(
        "--only-steps",
        default="",
        help="comma-separated snapshot steps to evaluate ('' all), e.g. the last one first to decide quickly",
    )
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    path = a.model / "recognition_curve.csv"
    old = pd.read_csv(path) if path.exists() and not a.replace else None
    only = [int(x) for x in a.only_steps.split(",") if x.strip()]
    new = evaluate_snapshots(a.model, a.run, a.per_class, with_prompt_effect=a.prompt_effect, only_steps=only)
    df = merge_curve(old, new)
    tmp = a.model / ".recognition_curve.tmp"
    df.to_csv(tmp, index=False)
    os.replace(tmp, path)
    print(df.to_string(index=False))


if __name__ == "__main__":
    main()
