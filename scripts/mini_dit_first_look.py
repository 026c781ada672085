"""A first look at the mini DiT after a training run (issue 26; its card is in the chapter "U-Net or transformer?"):
judge recognition of 200 samples by the mini card's protocol, the prompt effect, the components.

    .venv/bin/python scripts/mini_dit_first_look.py > difstudy/models/difstudy-mini-dit/evaluate.log
"""

import json
import time

from difstudy import card
from difstudy.judge import load_judge
from difstudy.models import load

t0 = time.time()
pipe = load("mini-dit")
judge, _ = load_judge()
df, images = card.sample_recognition(pipe, judge, per_class=20, steps=30, guidance=4.0)
rec = card.recognition_summary(df)
print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in rec.items()}, indent=1, default=str))
print(card.prompt_effect(pipe).round(4))
print(card.describe(pipe))
print(f"{time.time() - t0:.0f} s")
