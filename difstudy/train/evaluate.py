"""Recognition of class-conditional samples against training step::

    python -m difstudy.train.evaluate --run runs/mini2 --model difstudy/models/difstudy-mini

For every EMA snapshot that :mod:`difstudy.train.mini` saved in
``RUN/snapshots`` (U-Net and text encoder at step N), load it into the
exported pipeline, generate ``--per-class`` samples per class prompt and let
the judge (:mod:`difstudy.judge`) name them. Writes ``recognition_curve.csv``
(step, recognised, n, ci95_low, ci95_high) into the model folder, where the
model card reads it: the snapshots themselves are too large to commit.
"""

from __future__ import annotations

import argparse
import os
import re
from pathlib import Path

import pandas as pd
import torch

from ..card import recognition_summary, sample_recognition
from ..judge import load_judge
from ..models import load


def evaluate_snapshots(model: str | Path, run: Path, per_class: int = 20, steps: int = 30, guidance: float = 4.0):
    from safetensors.torch import load_file

    pipe = load(str(model))
    judge, _ = load_judge()
    found = sorted(run.glob("snapshots/unet_*.safetensors"))
    if not found:
        raise FileNotFoundError(f"no snapshots in {run / 'snapshots'}; train with --snapshot-every N")
    rows = []
    for path in found:
        step = int(re.search(r"(\d+)", path.stem).group(1))
        pipe.unet.load_state_dict({k: v.float() for k, v in load_file(str(path)).items()})
        te = path.with_name(path.name.replace("unet_", "text_encoder_"))
        pipe.text_encoder.load_state_dict({k: v.float() for k, v in load_file(str(te)).items()})
        df, _ = sample_recognition(pipe, judge, per_class=per_class, steps=steps, guidance=guidance)
        row = recognition_summary(df)
        rows.append(dict(step=step, **row))
        print(f"step {step}: {row['recognised']:.1%} recognised", flush=True)
    return pd.DataFrame(rows)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m difstudy.train.evaluate", description=__doc__.split("\n")[0])
    ap.add_argument("--run", type=Path, required=True, help="training run folder with snapshots/")
    ap.add_argument("--model", type=Path, default=Path("difstudy/models/difstudy-mini"))
    ap.add_argument("--per-class", type=int, default=20)
    ap.add_argument("--threads", type=int, default=None)
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    df = evaluate_snapshots(a.model, a.run, a.per_class)
    tmp = a.model / ".recognition_curve.tmp"
    df.to_csv(tmp, index=False)
    os.replace(tmp, a.model / "recognition_curve.csv")
    print(df.to_string(index=False))


if __name__ == "__main__":
    main()
