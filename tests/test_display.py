"""Numbers shown with the digits their interval needs (difstudy.display)."""

import numpy as np
import pandas as pd
import pytest

from difstudy.display import claim_frame, interval_decimals, interval_text, number, show_claims, significant


@pytest.mark.parametrize(
    ("lo", "hi", "decimals"),
    [(0.05, 0.2, 2), (-0.00021, 0.00016, 5), (0.0, 12.0, 0), (0.1, 0.10002, 6), (3.0, 3.0, 8), (0.0, np.nan, 4)],
)
def test_interval_decimals_show_the_width_to_two_significant_digits(lo, hi, decimals):
    assert interval_decimals(lo, hi) == decimals


def test_no_negative_zero_and_small_effects_stay_visible():
    assert number(-0.00001, 3) == "0.000" and number(-0.0015, 3) == "-0.002" and number(np.nan, 2) == ""
    assert significant(-0.0) == "0" and significant(0.050000) == "0.05" and significant(7) == "7"
    # the case of the issue: a contour-shift difference in the fourth decimal was shown as "-0.000 holds"
    assert interval_text(-0.00031, -0.00052, -0.00011) == "-0.00031 [-0.00052, -0.00011]"
    assert interval_text(0.1234, 0.05, 0.2) == "0.12 [0.05, 0.20]"


def test_claim_frame_joins_intervals_and_keeps_counts_whole():
    df = pd.DataFrame(
        {
            "claim": ["a", "b"],
            "verdict": ["holds", "fails"],
            "estimate": [0.0004, 0.1234],
            "lo": [0.0001, 0.05],
            "hi": [0.0007, 0.2],
            "min_effect": [0.0002, 0.02],
            "n_units": [40.0, np.nan],
            "vs_control": [0.3, 0.01],
            "vs_lo": [0.2, -0.1],
            "vs_hi": [0.4, 0.12],
        }
    )
    got = claim_frame(df, ["claim", "verdict", "estimate", "min_effect", "n_units", "vs_control"])
    assert list(got.columns) == [
        "claim",
        "verdict",
        "estimate [95% CI]",
        "min_effect",
        "n_units",
        "vs control [95% CI]",
    ]
    assert got["estimate [95% CI]"].tolist() == ["0.00040 [0.00010, 0.00070]", "0.12 [0.05, 0.20]"]
    assert got["min_effect"].tolist() == ["0.00020", "0.02"]
    assert got["n_units"].tolist() == ["40", ""]
    assert got["vs control [95% CI]"].tolist() == ["0.30 [0.20, 0.40]", "0.01 [-0.10, 0.12]"]
    html = show_claims(df).to_html()
    assert "#d8f0d8" in html and "-0.000" not in html
    with pytest.raises(KeyError, match="nosuch"):
        claim_frame(df, ["nosuch"])
