"""The seaborn plots draw what their tables say: one mark per row, the table's own intervals where it
carries them (never a bootstrap of seaborn's), and the named errorbar where seaborn aggregates."""

import matplotlib
import matplotlib.colors as mcolors
import numpy as np
import pandas as pd
import pytest
from matplotlib.container import BarContainer

from difstudy import plots

matplotlib.use("Agg")


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    matplotlib.pyplot.close("all")


def hexes(colours):
    return [mcolors.to_hex(c) for c in colours]


def bars(ax):
    """Bar patches (not legend proxies) in drawing order."""
    return [p for c in ax.containers if isinstance(c, BarContainer) for p in c]


def spans(lines, horizontal=False):
    """(centre, low, high) of each errorbar Line2D (seaborn draws one per point, caps included)."""
    out = []
    for ln in lines:
        xy = ln.get_xydata()
        xy = xy[np.isfinite(xy).all(axis=1)]
        pos, val = (xy[:, 1], xy[:, 0]) if horizontal else (xy[:, 0], xy[:, 1])
        out.append((float(np.median(pos)), float(val.min()), float(val.max())))
    return np.array(sorted(out))


def segments(ax, gid="interval"):
    """[(start, end)] of the LineCollection with ``gid`` (the table's own intervals)."""
    (coll,) = [c for c in ax.collections if c.get_gid() == gid]
    return np.array(coll.get_segments())


def legend(ax):
    return [t.get_text() for t in ax.get_legend().get_texts()]


# -- lines over steps --------------------------------------------------------------------------
def test_training_curves_draw_the_running_mean_of_each_stage():
    df = pd.DataFrame(dict(stage=["vae"] * 4 + ["unet"] * 3, step=[1, 2, 3, 4, 1, 2, 3], loss=[8.0, 4, 2, 1, 3, 1, 2]))
    ax = plots.plot_training_curves(df, smooth=2)
    drawn = [ln for ln in ax.lines if len(ln.get_xdata())]
    assert len(drawn) == 2
    assert list(drawn[0].get_ydata()) == pytest.approx([8, 6, 3, 1.5])  # running mean of 2
    assert list(drawn[1].get_ydata()) == pytest.approx([3, 2, 1.5])
    assert legend(ax) == ["vae (running mean of 2)", "unet (running mean of 2)"]
    assert ax.get_yscale() == "log"


def test_recognition_curve_draws_the_curves_own_interval():
    curve = pd.DataFrame(
        dict(step=[400, 800, 1600], recognised=[0.1, 0.2, 0.5], ci95_low=[0.05, 0.12, 0.4], ci95_high=[0.2, 0.25, 0.7])
    )
    ax = plots.plot_recognition_curve(curve)
    (line,) = [ln for ln in ax.lines if ln.get_marker() == "o"]  # the caps are lines of their own
    assert list(line.get_xdata()) == [400, 800, 1600] and list(line.get_ydata()) == [0.1, 0.2, 0.5]
    # asymmetric around the estimate: the table's interval, not one seaborn made
    want = [[(400, 0.05), (400, 0.2)], [(800, 0.12), (800, 0.25)], [(1600, 0.4), (1600, 0.7)]]
    np.testing.assert_allclose(segments(ax), want)
    assert legend(ax)[0] == "recognised"


# -- per-activation scores over seeds --------------------------------------------------------
def card_scores():
    rng = np.random.default_rng(0)
    rows = [
        dict(weights=w, activation=a, metric=m, value=rng.random(), seed=s)
        for w in ("trained", "random")
        for a in ("down-a", "mid-b", "up-c")
        for m in ("accuracy", "PCK@0.1 img")
        for s in range(3)
    ]
    rows += [
        dict(weights="raw pixels", activation="pixels", metric="accuracy", value=0.1 * s, seed=s) for s in range(3)
    ]
    return pd.DataFrame(rows)


def test_card_scores_draw_mean_and_sd_over_seeds_per_activation():
    scores = card_scores()
    ax = plots.plot_card_scores(scores, metric="accuracy")
    acc = scores[scores["metric"] == "accuracy"]
    g = acc.groupby(["weights", "activation"])["value"]
    mean, sd = g.mean(), g.std()  # std with ddof=1, as seaborn's errorbar="sd"
    means = [ln for ln in ax.lines if len(ln.get_xdata()) == 3]
    assert [mcolors.to_hex(ln.get_color()) for ln in means] == hexes(["tab:blue", "tab:grey"])
    for ln, w in zip(means, ("trained", "random")):
        assert list(ln.get_ydata()) == pytest.approx(mean[w].reindex(["down-a", "mid-b", "up-c"]).tolist())
    errs = [ln for ln in ax.lines if len(ln.get_xdata()) == 2 and ln.get_xdata()[0] == ln.get_xdata()[1]]
    want = sorted(
        (i, mean[w, a] - sd[w, a], mean[w, a] + sd[w, a])
        for w in ("trained", "random")
        for i, a in enumerate(["down-a", "mid-b", "up-c"])
    )
    np.testing.assert_allclose(spans(errs), want)
    assert [t.get_text() for t in ax.get_xticklabels()] == ["down-a", "mid-b", "up-c"]
    (pixels,) = [ln for ln in ax.lines if ln.get_label() == "raw pixels"]
    assert pixels.get_ydata()[0] == pytest.approx(0.1)
    assert legend(ax) == ["trained weights", "random weights", "raw pixels"]
    with pytest.raises(ValueError, match="metrics: \\['PCK@0.1 img', 'accuracy'\\]"):
        plots.plot_card_scores(scores, metric="mIoU")


def test_pck_bars_one_bar_per_activation_and_weights_with_sd():
    df = card_scores().query("metric == 'accuracy' and weights != 'raw pixels'").rename(columns={"value": "pck"})
    ax = plots.plot_pck_bars(df)
    g = df.groupby(["weights", "activation"])["pck"]
    got = bars(ax)
    assert len(got) == 6
    assert sorted(p.get_height() for p in got) == pytest.approx(sorted(100 * g.mean()))
    errs = [ln for ln in ax.lines if len(ln.get_xdata()) > 2]  # seaborn's sd bars (with caps)
    assert sorted(hi - lo for _, lo, hi in spans(errs)) == pytest.approx(sorted(2 * 100 * g.std()))
    assert [t.get_text() for t in ax.get_xticklabels()] == ["down-a", "mid-b", "up-c"]


def test_ranking_keeps_the_top_rows_best_on_top():
    ranking = pd.DataFrame({"activation": [f"act{i}" for i in range(20)], "PCK@0.1 img": np.linspace(0.5, 0.1, 20)})
    ax = plots.plot_ranking(ranking, top=5)
    got = sorted(bars(ax), key=lambda p: p.get_y())  # top of the axes first
    assert [p.get_width() for p in got] == pytest.approx(100 * ranking["PCK@0.1 img"][:5].to_numpy())
    assert [t.get_text() for t in ax.get_yticklabels()] == ["act0", "act1", "act2", "act3", "act4"]
    assert ax.yaxis_inverted()


# -- a property along the forward order ---------------------------------------------------------
def profile_table():
    stages = ["unet", "down", "down", "mid", "up", "up", "unet"]
    levels = [np.nan, 0, 1, np.nan, 1, 0, np.nan]
    values = [0.1, 0.2, 0.3, np.nan, 0.5, 0.6, 0.7]  # the mid block unmeasured
    return pd.DataFrame(
        dict(activation=[f"a{i}" for i in range(7)], stage=stages, level=levels, t=50, measure="locality", value=values)
    )


def test_property_profile_one_point_per_activation_coloured_by_stage():
    df = profile_table()
    ax = plots.plot_property_profile(df, "locality")
    (points,) = ax.collections
    offsets = np.asarray(points.get_offsets())
    finite = np.isfinite(offsets).all(axis=1)
    assert offsets[finite].tolist() == [[0, 0.1], [1, 0.2], [2, 0.3], [4, 0.5], [5, 0.6], [6, 0.7]]
    colours = hexes(points.get_facecolors()[finite])
    want = [plots.STAGE_COLOURS[s] for s in df["stage"] if s != "mid"]
    assert colours == hexes(want)
    guide = [ln for ln in ax.lines if len(ln.get_xdata()) > 1 and ln.get_color() == "0.8"]
    assert [list(ln.get_xdata()) for ln in guide] == [[0, 1, 2], [4, 5, 6]]  # a gap where the value is NaN
    assert [t.get_text() for t in ax.get_xticklabels()] == ["io", "d0", "d1", "mid", "u1", "u0", "io"]
    assert legend(ax) == ["unet", "down", "mid", "up"]


# -- content shift and the GATE guideline ---------------------------------------------------
def shift_frame():
    rng = np.random.default_rng(1)
    rows = [
        dict(image_id=f"i{c}{k}", complexity=c, technique="basic", method="x0", t=t, contour=rng.random() + c)
        for c in (0, 1)
        for k in range(4)
        for t in (25, 100)
    ]
    rows += [dict(image_id=f"i{k}", complexity=0, technique="basic", method="vae", t=0, contour=0.05) for k in range(3)]
    rows += [dict(image_id="i00", complexity=0, technique="fine", method="x0", t=25, contour=9.0)]  # not basic
    return pd.DataFrame(rows)


def test_content_shift_levels_and_the_mean_with_196_standard_errors():
    df = shift_frame()
    ax = plots.plot_content_shift(df, "contour", "x0")
    basic = df[(df["technique"] == "basic") & (df["method"] == "x0")]
    levels = [ln for ln in ax.lines if len(ln.get_xdata()) == 2 and ln.get_linewidth() == 1]
    for ln, c in zip(levels, (0, 1)):
        assert list(ln.get_ydata()) == pytest.approx(basic[basic["complexity"] == c].groupby("t")["contour"].mean())
    g = basic.groupby("t")["contour"]
    want = [((t, m - 1.96 * s), (t, m + 1.96 * s)) for t, m, s in zip(g.mean().index, g.mean(), g.sem())]
    (errors,) = [c for c in ax.collections if len(c.get_segments()) == 2]
    np.testing.assert_allclose(np.asarray(errors.get_segments()), want)
    (floor,) = [ln for ln in ax.lines if ln.get_label() == "VAE only (no U-Net)"]
    assert floor.get_ydata()[0] == pytest.approx(0.05)
    assert legend(ax) == ["complexity 0", "complexity 1", "all images (95% CI)", "VAE only (no U-Net)"]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["25", "100"]


def guideline_table():
    return pd.DataFrame(
        dict(
            technique=["fine", "lora", "controlnet", "fine"],
            method=["x0", "x0", "img2img", "x0"],
            t="t=25",
            measure=["contour", "contour", "contour", "structure"],
            difference=[-0.004, 0.002, -0.0005, -0.1],
            ci_low=[-0.006, -0.001, -0.0009, -0.2],
            ci_high=[-0.003, 0.007, -0.0001, 0.0],
            verdict=["helps", "no clear effect", "negligible", "helps"],
        )
    )


def test_guideline_bars_carry_the_tables_interval_and_verdict():
    table = guideline_table()
    ax = plots.plot_guideline(table, "contour")
    got = sorted(bars(ax), key=lambda p: p.get_y())
    got = [p for p in got if p.get_width() != 0]
    assert [p.get_width() for p in got] == pytest.approx([-0.004, 0.002, -0.0005])
    assert hexes(p.get_facecolor() for p in got) == hexes(["tab:green", "goldenrod", "tab:gray"])
    assert [t.get_text() for t in ax.get_yticklabels()] == ["fine (x0)", "lora (x0)", "controlnet (img2img)"]
    # the asymmetric interval of the table, row by row
    want = [[(-0.006, 0), (-0.003, 0)], [(-0.001, 1), (0.007, 1)], [(-0.0009, 2), (-0.0001, 2)]]
    np.testing.assert_allclose(segments(ax), want)
    assert sorted(legend(ax)) == ["helps", "negligible", "no clear effect"]


def test_guideline_keeps_rows_that_share_a_label_apart_and_draws_an_empty_measure():
    table = pd.concat([guideline_table(), guideline_table().assign(t="t=400")], ignore_index=True)
    ax = plots.plot_guideline(table, "contour")
    assert len([p for p in bars(ax) if p.get_width() != 0]) == 6
    assert "fine (x0, t=400)" in [t.get_text() for t in ax.get_yticklabels()]
    empty = plots.plot_guideline(table, "judge")  # judge switched off: no rows, a panel saying so
    assert not bars(empty) and "no rows for judge" in [t.get_text() for t in empty.texts]


def gate_results():
    long = "amalgamated: fine + fine-seed2 + lora + lora-x0.5 + controlnet + controlnet-seed2 + attention maps"
    rows = [
        dict(task="classification", metric="accuracy", setting=s, seed=k, value=v + (0.0, 0.01, 0.05)[k])
        for s, v in (("basic", 0.2), ("fine", 0.3), (long, 0.4))
        for k in range(3)
    ]
    return pd.DataFrame(rows + [dict(task="correspondence", metric="PCK@0.1 img", setting="basic", seed=0, value=0.9)])


def test_gate_features_mean_and_sd_over_seeds_per_setting():
    results = gate_results()
    ax = plots.plot_gate_features(results, "classification", "accuracy")
    got = sorted(bars(ax), key=lambda p: p.get_y())
    assert [p.get_width() for p in got] == pytest.approx([22, 32, 42])  # mean over seeds, in %
    assert hexes(p.get_facecolor() for p in got) == hexes(["tab:gray", "tab:blue", "tab:purple"])
    errs = [ln for ln in ax.lines if len(ln.get_xdata()) > 2]
    sd = 100 * np.std([0.0, 0.01, 0.05], ddof=1)  # skewed: a bootstrap interval would not be mean ± sd
    np.testing.assert_allclose(spans(errs, horizontal=True), [(i, m - sd, m + sd) for i, m in enumerate((22, 32, 42))])
    (base,) = [ln for ln in ax.lines if ln.get_linestyle() == "--"]
    assert base.get_xdata()[0] == pytest.approx(22)
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert labels[:2] == ["basic", "fine"] and labels[2].startswith("amalgamated:") and "\n" in labels[2]
    with pytest.raises(ValueError, match="tasks: \\['classification', 'correspondence'\\]"):
        plots.plot_gate_features(results, "segmentation", "mIoU")


# -- the forest plot (tests/test_ledger.py checks the basic layout) --------------------------
def ledger():
    return pd.DataFrame(
        dict(
            claim=["same text", "same text", "no estimate", "trained beats random"],
            estimate=[-1.0, 2.0, np.nan, 3.0],
            lo=[-1.5, 1.0, np.nan, 2.0],
            hi=[-0.5, 4.0, np.nan, 5.0],
            min_effect=[0.5, 0.5, 0.5, 2.0],
            verdict=["fails", "holds", "inconclusive", "holds"],
            vs_control=[np.nan, np.nan, np.nan, 1.0],
            vs_lo=[np.nan, np.nan, np.nan, 0.5],
            vs_hi=[np.nan, np.nan, np.nan, 1.5],
            vs_min_effect=[np.nan, np.nan, np.nan, 0.25],
        ),
        index=[10, 11, 12, 13],  # a ledger slice: the plot numbers rows itself
    )


def test_forest_keeps_every_row_colours_dots_by_verdict_and_scales_each_row():
    claims = ledger()
    ax = plots.plot_forest(claims)
    est = sorted((ln for ln in ax.lines if ln.get_gid() == "estimate"), key=lambda ln: ln.get_ydata()[0])
    assert [(ln.get_xdata()[0], ln.get_ydata()[0]) for ln in est] == [(-1, 0), (2, 1), (3, 3)]  # same text: two rows
    assert hexes(ln.get_color() for ln in est) == hexes(plots.VERDICT_COLOURS[v] for v in ("fails", "holds", "holds"))
    assert [t.get_text() for t in ax.texts] == [" no estimate"]
    assert [t.get_text() for t in ax.get_yticklabels()] == claims["claim"].tolist()
    (vs,) = [ln for ln in ax.lines if ln.get_gid() == "vs_interval"]
    assert list(vs.get_xdata()) == [0.5, 1.5] and vs.get_ydata()[0] == pytest.approx(3.28)
    assert "trained - random weights" in legend(ax)
    rel = plots.plot_forest(claims, relative=True)
    by = {g: [ln for ln in rel.lines if ln.get_gid() == g] for g in ("interval", "vs_interval", "vs_min_effect")}
    assert [list(ln.get_xdata()) for ln in by["interval"]] == [[-3, -1], [2, 8], [1, 2.5]]
    assert list(by["vs_interval"][0].get_xdata()) == [2, 6] and by["vs_min_effect"][0].get_xdata()[0] == 1
    plain = plots.plot_forest(claims.drop(columns=["vs_control", "vs_lo", "vs_hi", "vs_min_effect"]))
    assert "trained - random weights" not in legend(plain)
