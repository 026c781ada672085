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


def test_the_curves_per_class_rows_come_back_as_a_table_through_a_csv(tmp_path):
    from difstudy.train.evaluate import merge_curve

    old = pd.DataFrame([dict(step=100, recognised=0.2, n=200, ci95_low=0.15, ci95_high=0.26)])  # before per_class
    r = card.recognition_summary(_judged({c: 0.5 for c in CLASS_NAMES} | {CLASS_NAMES[0]: 0.0}))
    new = pd.DataFrame([dict(step=200, **r)])
    merge_curve(old, new).to_csv(tmp_path / "curve.csv", index=False)  # as train.evaluate writes it
    table = card.curve_per_class(pd.read_csv(tmp_path / "curve.csv"))
    assert list(table.index) == [200] and list(table.columns) == [*CLASS_NAMES, "all"]
    assert table.loc[200, CLASS_NAMES[0]] == 0.0 and table.loc[200, "all"] == pytest.approx(r["recognised"])
    assert card.curve_per_class(old).empty  # no per_class column: an empty table, no error
    bad = pd.DataFrame([dict(step=300, recognised=0.5, per_class="{'bird': 0.1,")])
    with pytest.raises(ValueError, match="step 300: per_class is not.*--only-steps 300"):
        card.curve_per_class(bad)


def test_classification_limits_are_shown_only_for_the_weights_they_were_measured_on(tmp_path):
    """The probe-against-feature table beside the weights: read when its fingerprint is the loaded
    U-Net's, with a sentence naming the card's probe, the best probe and the controls; refused
    (None and the reason) when it is missing or measured on other weights; a damaged file is a
    clear error."""
    from difstudy.extract import module_fingerprint
    from difstudy.models import load

    pipe = load("tiny-sd15")
    table, text = card.classification_limits(pipe, tmp_path)
    assert table is None and "not measured" in text
    rows = [
        dict(pooling=p, labels=n, weights=w, linear=lin, mlp=mlp)
        for p, n, w, lin, mlp in [
            ("mean (card)", 300, "trained", 0.33, 0.34), ("mean (card)", 3000, "trained", 0.36, 0.48),
            ("max", 300, "trained", 0.39, 0.37), ("mean (card)", 300, "random", 0.12, 0.14),
            ("mean (card)", 3000, "random", 0.11, 0.15), ("max", 300, "random", 0.09, 0.12),
            ("mean (card)", 300, "pixels", 0.11, 0.10), ("mean (card)", 3000, "pixels", 0.09, 0.10),
            ("max", 300, "pixels", 0.11, 0.11),
        ]
    ]  # fmt: skip
    df = pd.DataFrame(rows).assign(activation="up-level0-upsampler-out", unet_fingerprint="other")
    df.to_csv(tmp_path / card.LIMITS_FILE, index=False)
    table, text = card.classification_limits(pipe, tmp_path)
    assert table is None and "other weights" in text
    assert card.measured_limits(pipe, tmp_path) is None
    df.assign(unet_fingerprint=module_fingerprint(pipe.unet)).to_csv(tmp_path / card.LIMITS_FILE, index=False)
    table, text = card.classification_limits(pipe, tmp_path)
    assert table.loc[("mean (card)", 3000), ("mlp", "trained")] == pytest.approx(0.48)
    numbers = card.measured_limits(pipe, tmp_path)
    assert (numbers["n_card"], numbers["n_max"], numbers["card"]) == (300, 3000, 0.33)
    assert numbers["best_any"] == (0.48, "mlp, mean (card), 3000 labels") and numbers["controls"]["random"] == 0.15
    assert "card's probe (linear, mean pooling, 300 labels) 0.330" in text
    assert "with 300 labels 0.390 (linear, max, 300 labels), with any number of labels 0.480 (mlp, mean (card)" in text
    assert "pixels 0.110, random 0.150" in text and "not on this card's best" not in text
    text = card.classification_limits(pipe, tmp_path, best_activation="up-level0-upsampler-out")[1]
    assert "not on this card's best" not in text
    text = card.classification_limits(pipe, tmp_path, best_activation="up-level1-repeat2-res-out")[1]
    assert text.endswith(
        "Measured on up-level0-upsampler-out, not on this card's best activation (up-level1-repeat2-res-out):"
        " run scripts/classification_limits.py --activation up-level1-repeat2-res-out"
    )
    import difstudy.extract

    with pytest.MonkeyPatch.context() as mp:  # a fingerprint that pandas alone would read as a number
        mp.setattr(difstudy.extract, "module_fingerprint", lambda module: "0123456789ab")
        df.assign(unet_fingerprint="0123456789ab").to_csv(tmp_path / card.LIMITS_FILE, index=False)
        assert card.classification_limits(pipe, tmp_path)[0] is not None
    df.drop(columns="mlp").to_csv(tmp_path / card.LIMITS_FILE, index=False)
    with pytest.raises(ValueError, match="mlp"):
        card.classification_limits(pipe, tmp_path)


def test_recognition_through_the_vae_is_the_judge_on_reconstructions(monkeypatch):
    """The sample ceiling: per class, the judge on real test images and on their VAE reconstructions;
    with a lossless "VAE" the two rows are equal; the mini VAE changes them."""
    from difstudy.judge import load_judge
    from difstudy.models import load

    pipe, (judge, _) = load("mini"), load_judge()
    table = card.recognition_through_vae(pipe, judge, n_test=60, batch=25)
    assert list(table.columns) == list(CLASS_NAMES) and table.shape == (2, len(CLASS_NAMES))
    assert ((table >= 0) & (table <= 1)).all().all()
    monkeypatch.setattr(card, "reconstructions", lambda pipe, images: images)
    lossless = card.recognition_through_vae(pipe, judge, n_test=60, batch=25)
    assert lossless.iloc[0].equals(lossless.iloc[1]) and lossless.iloc[0].equals(table.iloc[0])
    assert not table.iloc[1].equals(table.iloc[0])  # the mini VAE loses detail the judge needs


def test_a_missed_classification_goal_gets_its_measured_reason_and_decision():
    limits = dict(
        activation="down-level3-repeat1-res-out", n_card=300, n_max=3000, card=0.31,
        best_card_labels=(0.36, "mlp, 2x2 grid of means, 300 labels"), best_any=(0.46, "mlp, mean (card), 3000 labels"),
        controls={"pixels": 0.11, "random": 0.15},
    )  # fmt: skip
    assert card.classification_decision(dict(cls_acc_trained=0.5), limits) is None  # met: nothing to decide
    d = card.classification_decision(dict(cls_acc_trained=0.32), limits)
    assert d["measured"] == 0.32 and "0.460 (mlp, mean (card), 3000 labels)" in d["reason"]
    assert "random weights or pixels 0.150" in d["reason"] and "down-level3-repeat1-res-out" in d["reason"]
    assert "31 points above" in d["decision"] and "3,000 labels" in d["decision"] and "wider U-Net" in d["decision"]
    probe = card.classification_decision(dict(cls_acc_trained=0.32), limits | dict(best_any=(0.52, "mlp")))
    assert probe["decision"].startswith("a probe reaches 0.50 on the same features (mlp): the card's protocol")
    assert "300 labels), not the features, is the limit" in probe["decision"]
    weak = card.classification_decision(dict(cls_acc_trained=0.2), limits | dict(best_any=(0.25, "mlp")))
    assert "retrained" in weak["decision"]
    unmeasured = card.classification_decision(dict(cls_acc_trained=0.32), None)
    assert "scripts/classification_limits.py" in unmeasured["reason"]
