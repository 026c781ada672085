"""The model card's recognition summary and goals (difstudy.card), on made-up judge outputs."""

import pandas as pd
import pytest

from difstudy import card
from difstudy.data.toyworld import CLASS_NAMES


def _judged(shares: dict, per_class: int = 20) -> pd.DataFrame:
    rows = []
    for c, share in shares.items():
        k = round(share * per_class)
        rows += [dict(cls=c, predicted=c, correct=i < k) for i in range(per_class)]
    return pd.DataFrame(rows)


def test_recognition_summary_per_class_and_the_goals_it_feeds():
    shares = {c: 0.6 for c in CLASS_NAMES} | {CLASS_NAMES[3]: 0.1}
    r = card.recognition_summary(_judged(shares))
    assert list(r["per_class"]) == list(CLASS_NAMES)
    assert r["per_class"][CLASS_NAMES[3]] == pytest.approx(0.1) and r["n"] == 20 * len(CLASS_NAMES)
    assert r["recognised"] == pytest.approx((0.6 * (len(CLASS_NAMES) - 1) + 0.1) / len(CLASS_NAMES))
    assert r["ci95_low"] < r["recognised"] < r["ci95_high"]
    summary = dict(
        vae_psnr_db=26.0, judge_accuracy_real=0.95, samples_recognised=r["recognised"],
        samples_recognised_ci95=[r["ci95_low"], r["ci95_high"]], samples_recognised_per_class=r["per_class"],
        n_samples=r["n"], cls_acc_trained=0.5, cls_acc_pixels=0.1, cls_acc_random=0.1,
        pck_best_up_trained=0.3, pck_best_up_random=0.1, pck_pixels=0.1,
    )  # fmt: skip
    g = card.goals(summary).set_index("goal")
    worst = g.loc[f"... the least recognised class ({CLASS_NAMES[3]})"]
    assert worst["measured"] == pytest.approx(0.1) and worst["verdict"] == "missed"
    assert g.loc["... its 95% interval's lower bound", "verdict"] == "met"  # 0.55 of 200: lower bound about 0.48
