"""Numbers as a page shows them: with the digits their interval needs.

A claim's estimate printed with a fixed precision either hides the effect ("-0.000 holds" when
the effect lies in the fourth decimal) or prints noise (six decimals on an interval 0.3 wide).
Here every number of a row that has an interval is printed with the decimals that show the
interval's width to :data:`SIGNIFICANT` significant digits (:func:`interval_decimals`), and a
value that rounds to zero is printed without a sign. Numbers without an interval keep
:data:`SIGNIFICANT` + 2 significant digits.

:func:`show_claims` is the one way a page shows claim rows (and any table with ``lo``/``hi``
columns, e.g. the GATE guideline): ``estimate [lo, hi]`` in one column, the verdict coloured.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd

from .verdicts import VERDICTS

SIGNIFICANT = 2  # significant digits of an interval's width
MAX_DECIMALS = 8
# one colour per verdict of difstudy.verdicts, in its order (holds, fails, inconclusive)
VERDICT_COLOURS = dict(
    zip(VERDICTS, ("background-color: #d8f0d8", "background-color: #f6d5d5", "background-color: #eeeeee"), strict=True)
)
# interval columns a claim table may carry: (estimate, lo, hi, shown name)
INTERVALS = (("estimate", "lo", "hi", "estimate [95% CI]"), ("vs_control", "vs_lo", "vs_hi", "vs control [95% CI]"))


def interval_decimals(lo: float, hi: float, significant: int = SIGNIFICANT) -> int:
    """Decimals that show the width ``hi - lo`` to ``significant`` significant digits (0 for a
    width of 10 or more; :data:`MAX_DECIMALS` for a zero or non-finite width)."""
    width = abs(float(hi) - float(lo))
    if not math.isfinite(width) or width == 0:
        return MAX_DECIMALS if math.isfinite(width) else 4
    return int(min(MAX_DECIMALS, max(0, significant - 1 - math.floor(math.log10(width)))))


def number(x, decimals: int) -> str:
    """``x`` with ``decimals`` decimals; never a negative zero; '' for a missing value."""
    if x is None or (isinstance(x, float) and np.isnan(x)):
        return ""
    if not isinstance(x, (int, float, np.integer, np.floating)) or isinstance(x, bool):
        return str(x)
    s = f"{float(x):.{decimals}f}"
    return s[1:] if s.startswith("-") and float(s) == 0 else s


def significant(x, digits: int = SIGNIFICANT + 2) -> str:
    """``x`` with up to ``digits`` significant digits (Python's ``g`` format: no trailing zeros;
    an exponent only below 1e-4 or from 10**digits on), never a negative zero."""
    if x is None or (isinstance(x, float) and np.isnan(x)):
        return ""
    if not isinstance(x, (int, float, np.integer, np.floating)) or isinstance(x, bool):
        return str(x)
    if isinstance(x, (int, np.integer)):
        return str(int(x))
    s = f"{float(x):.{digits}g}"
    return s[1:] if s.startswith("-") and float(s) == 0 else s


def interval_text(estimate, lo, hi) -> str:
    """``"estimate [lo, hi]"`` with the interval's decimals."""
    if any(v is None or (isinstance(v, float) and np.isnan(v)) for v in (lo, hi)):
        return significant(estimate)
    d = interval_decimals(lo, hi)
    return f"{number(estimate, d)} [{number(lo, d)}, {number(hi, d)}]"


def claim_frame(frame: pd.DataFrame, columns: Sequence[str] | None = None) -> pd.DataFrame:
    """The rows as text: each interval (``estimate``/``lo``/``hi``, ``vs_control``/``vs_lo``/
    ``vs_hi``) in one column with its own decimals; whole numbers (counts, timesteps) as
    integers; other numbers (``min_effect``, ``control``, the means a difference is made of) with
    the decimals of the row's ``lo``/``hi`` interval, or :func:`significant` where a row has none. ``columns``: the
    columns to show, in order (an interval's three columns may be named by any of them)."""
    columns = list(frame.columns if columns is None else columns)
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise KeyError(f"columns {missing} are not in the table; it has {list(frame.columns)}")
    out = {}
    done: set[str] = set()
    for c in columns:
        if c in done:
            continue
        group = next((g for g in INTERVALS if c in g[:3] and all(x in frame.columns for x in g[:3])), None)
        if group is not None:
            est, lo, hi, shown = group
            out[shown] = [interval_text(*v) for v in zip(frame[est], frame[lo], frame[hi])]
            done.update(group[:3])
        elif pd.api.types.is_numeric_dtype(frame[c]) and not pd.api.types.is_bool_dtype(frame[c]):
            values = frame[c].astype(float)
            if values.dropna().apply(float.is_integer).all():  # counts, timesteps
                out[c] = ["" if np.isnan(v) else str(int(v)) for v in values]
            elif {"lo", "hi"} <= set(frame.columns):  # on the scale of the row's interval
                out[c] = [
                    number(v, interval_decimals(a, b)) if np.isfinite([a, b]).all() else significant(v)
                    for v, a, b in zip(values, frame["lo"].astype(float), frame["hi"].astype(float))
                ]
            else:
                out[c] = [significant(v) for v in values]
        else:
            out[c] = frame[c].astype(object).where(frame[c].notna(), "").tolist()
        done.add(c)
    return pd.DataFrame(out, index=frame.index)


def show_claims(frame: pd.DataFrame, columns: Sequence[str] | None = None):
    """A pandas Styler of :func:`claim_frame`: no index, verdict columns coloured, text left."""
    text = claim_frame(frame, columns).reset_index(drop=True)
    verdicts = [c for c in text.columns if "verdict" in c]
    styler = text.style.hide(axis="index").set_properties(**{"text-align": "left"})
    if verdicts:
        styler = styler.map(lambda v: VERDICT_COLOURS.get(v, ""), subset=verdicts)
    return styler
