"""The qualitative filter, greedy selection and the recall check on cases with known answers."""

import math

import numpy as np
import pandas as pd
import pytest

from difstudy import filtering as F


def props(rows, t=50):
    """A tidy property table from (activation, stage, level, noise_share, granularity, locality) rows."""
    out = []
    for name, stage, level, *values in rows:
        for measure, v in zip(("noise_share", "granularity", "locality"), values):
            out.append(
                dict(activation=name, kind="res-out", stage=stage, level=level, repeat=0, t=t,
                     measure=measure, value=v, n_images=4, size=8)
            )  # fmt: skip
    return pd.DataFrame(out)


def level(prefix, noise, gran, loc, stage="up", lv=1):
    return [(f"{prefix}{i}", stage, lv, n, g, lc) for i, (n, g, lc) in enumerate(zip(noise, gran, loc))]


def by_name(df):
    return df.set_index("activation")


# -- the qualitative filter --------------------------------------------------------------
def test_noise_dominated_activation_is_dropped_with_its_reason():
    df = props(level("a", [0.71, 0.1], [0.2, 0.4], [0.3, 0.3]))
    out = by_name(F.qualitative_filter(df, F.FilterConfig(n_granularity_groups=2)))
    assert not out.loc["a0", "kept"]
    assert out.loc["a0", "reason"] == "noise-dominated (noise_share=0.71 > 0.5)"
    assert out.loc["a1", "kept"] and out.loc["a1", "reason"] == "kept"


def test_noise_threshold_is_strict_and_configurable():
    df = props(level("a", [0.5, 0.51, 0.9], [0.1, 0.2, 0.3], [0.3, 0.3, 0.3]))
    cfg = F.FilterConfig(n_granularity_groups=3)
    assert by_name(F.qualitative_filter(df, cfg))["kept"].tolist() == [True, False, False]
    loose = F.FilterConfig(max_noise_share=0.8, n_granularity_groups=3)
    assert by_name(F.qualitative_filter(df, loose))["kept"].tolist() == [True, True, False]


def test_constant_map_is_dropped():
    df = props(level("a", [float("nan"), 0.1], [0.2, 0.4], [0.3, 0.3]))
    out = by_name(F.qualitative_filter(df, F.FilterConfig(n_granularity_groups=2)))
    assert out.loc["a0", "reason"].startswith("constant map")


def test_locality_is_judged_against_the_level_median_and_only_for_correspondence():
    # median of the level is 0.2; a3 is 0.5 above it, a2 0.1 above it
    df = props(level("a", [0.1] * 4, [0.1, 0.2, 0.3, 0.4], [0.2, 0.2, 0.3, 0.7]))
    cfg = F.FilterConfig(max_locality_excess=0.15, n_granularity_groups=4)
    out = by_name(F.qualitative_filter(df, cfg, task="correspondence"))
    assert out["kept"].tolist() == [True, True, True, False]
    assert out.loc["a3", "reason"].startswith("locality dominates (locality=0.70 > up1 median 0.25 + 0.15)")
    # for classification the locality rule does not apply
    assert F.qualitative_filter(df, cfg, task="classification")["kept"].all()
    # the threshold is respected: a larger excess keeps a3
    assert F.qualitative_filter(df, F.FilterConfig(max_locality_excess=0.5, n_granularity_groups=4))["kept"].all()


def test_missing_locality_passes_the_locality_rule():
    df = props(level("a", [0.1] * 3, [0.1, 0.2, 0.3], [float("nan"), 0.2, 0.2]))
    assert F.qualitative_filter(df, F.FilterConfig(n_granularity_groups=3))["kept"].all()


def test_representatives_per_granularity_group():
    # nine activations of one level, granularity rising with the index: groups {0,1,2}, {3,4,5}, {6,7,8}
    noise = [0.30, 0.10, 0.20, 0.05, 0.40, 0.06, 0.01, 0.02, 0.03]
    df = props(level("a", noise, [0.1 * i for i in range(9)], [0.3] * 9))
    out = by_name(F.qualitative_filter(df, F.FilterConfig(n_granularity_groups=3, representatives=2)))
    assert sorted(out.index[out["kept"]]) == ["a1", "a2", "a3", "a5", "a6", "a7"]
    assert "not a representative of its granularity group (up1 group 1/3" in out.loc["a0", "reason"]
    one = by_name(F.qualitative_filter(df, F.FilterConfig(n_granularity_groups=3, representatives=1)))
    assert sorted(one.index[one["kept"]]) == ["a1", "a3", "a6"]


def test_groups_are_formed_per_resolution_level():
    rows = level("u", [0.1, 0.2], [0.1, 0.2], [0.3, 0.3], lv=1) + level(
        "d", [0.2, 0.1], [0.1, 0.2], [0.3, 0.3], "down", 0
    )
    out = by_name(F.qualitative_filter(props(rows), F.FilterConfig(n_granularity_groups=1)))
    assert sorted(out.index[out["kept"]]) == ["d1", "u0"]
    assert out.loc["u1", "group"] == "up1" and out.loc["d0", "group"] == "down0"


def test_activations_without_granularity_form_their_own_group():
    df = props(level("a", [0.1, 0.2, 0.3], [0.2, float("nan"), float("nan")], [0.3] * 3))
    out = by_name(F.qualitative_filter(df, F.FilterConfig(n_granularity_groups=2)))
    assert out["kept"].tolist() == [True, True, False]
    assert "without granularity" in out.loc["a2", "reason"]


def test_filter_reads_the_requested_timestep():
    clean = props(level("a", [0.1, 0.1], [0.1, 0.2], [0.3, 0.3]), t=50)
    noisy = props(level("a", [0.9, 0.1], [0.1, 0.2], [0.3, 0.3]), t=300)
    df = pd.concat([clean, noisy], ignore_index=True)
    assert F.qualitative_filter(df, F.FilterConfig(t=50, n_granularity_groups=2))["kept"].all()
    assert F.qualitative_filter(df, F.FilterConfig(t=300, n_granularity_groups=2))["kept"].tolist() == [False, True]
    with pytest.raises(ValueError, match="t=25 is not in the property table"):
        F.qualitative_filter(df, F.FilterConfig(t=25))


def test_filter_names_a_missing_measure():
    df = props(level("a", [0.1], [0.1], [0.3]))
    df = df[df["measure"] != "locality"]
    with pytest.raises(ValueError, match="lacks \\['locality'\\]"):
        F.qualitative_filter(df, F.FilterConfig(), task="correspondence")
    assert F.qualitative_filter(df, F.FilterConfig(), task="classification")["kept"].all()


def test_filter_summary_counts_each_rule():
    df = props(level("a", [0.9, 0.1, 0.2, 0.1], [0.1, 0.2, 0.3, 0.4], [0.3, 0.3, 0.3, 0.3]))
    s = F.filter_summary(F.qualitative_filter(df, F.FilterConfig(n_granularity_groups=1)))
    assert dict(zip(s["rule"], s["n"])) == {
        "noise-dominated": 1,
        "not a representative of its granularity group": 2,
        "kept": 1,
    }


def test_bad_filter_config_is_refused():
    with pytest.raises(ValueError, match="max_noise_share"):
        F.FilterConfig(max_noise_share=1.5)
    with pytest.raises(ValueError, match="representatives"):
        F.FilterConfig(representatives=0)


# -- greedy selection -----------------------------------------------------------------------
class Additive:
    """value(set) = sum of weights - 0.4 for each redundant pair in the set; counts calls."""

    task, metric = "toy", "score"
    weights = {"a": 0.5, "b": 0.45, "c": 0.3, "d": 0.1, "e": -0.1}
    redundant = {frozenset("ab")}

    def __init__(self):
        self.calls = []

    def __call__(self, names):
        self.calls.append(tuple(names))
        pairs = {frozenset((x, y)) for x in names for y in names if x < y}
        return sum(self.weights[n] for n in names) - 0.4 * len(pairs & self.redundant)


def test_greedy_finds_the_known_best_set_and_skips_redundant_ones():
    s = Additive()
    g = F.greedy_select(s, list("abcde"), k=3)
    assert F.selected(g) == ["a", "c", "d"]  # b is redundant with a (gain 0.05 < 0.3, 0.1)
    assert np.allclose(g["value"], [0.5, 0.8, 0.9])
    assert np.allclose(g["gain"], [0.5, 0.3, 0.1])
    assert g["n_tried"].tolist() == [5, 4, 3]
    assert g["set"].iloc[-1] == "a c d"


def test_greedy_stops_when_nothing_improves():
    g = F.greedy_select(Additive(), list("abcde"), k=5)
    assert F.selected(g) == ["a", "c", "d", "b"]  # adding e (-0.1) would lower the score


def test_greedy_reuses_single_scores_and_respects_the_pool():
    singles = F.score_each(Additive(), list("abcde"))
    s = Additive()
    g = F.greedy_select(s, list("abcde"), k=2, singles=singles, pool=2)
    assert F.selected(g) == ["a", "b"]  # only a and b are searched
    assert s.calls == [("a", "b")]  # no single was probed again
    assert g["n_tried"].tolist() == [0, 1]


def test_score_each_ranks_best_first_with_shared_ranks_for_ties():
    def scorer(n):
        return {"x": 0.2, "y": 0.5, "z": 0.2}[n[0]]

    df = F.score_each(scorer, ["x", "y", "z"])
    assert df["activation"].tolist() == ["y", "x", "z"]
    assert df["rank"].tolist() == [1, 2, 2]


# -- recall of the exhaustive top-k ------------------------------------------------------------
def scores(values):
    return pd.DataFrame(dict(activation=list(values), value=list(values.values())))


def test_recall_at_k_against_a_hand_computation():
    s = scores(dict(a=0.9, b=0.8, c=0.7, d=0.6, e=0.5, f=0.4))
    kept = ["a", "c", "f"]
    assert F.recall_at_k(s, kept, 1) == 1.0  # {a}
    assert F.recall_at_k(s, kept, 2) == 0.5  # {a, b}
    assert math.isclose(F.recall_at_k(s, kept, 3), 2 / 3)  # {a, b, c}
    assert F.recall_at_k(s, kept, 5) == 0.4  # {a..e}: a, c


def test_top_k_includes_ties_at_the_boundary():
    s = scores(dict(a=0.9, b=0.8, c=0.8, d=0.1))
    assert F.top_k(s, 2) == ["a", "b", "c"]
    assert math.isclose(F.recall_at_k(s, ["c"], 2), 1 / 3)
    t = F.recall_table(s, ["a", "c"], ks=(1, 2))
    assert t["n_top"].tolist() == [1, 3] and t["n_top_kept"].tolist() == [1, 2]
    assert t["chance"].tolist() == [0.5, 0.5]


def _set_results(selected, legacy, metric="PCK@0.1 img"):
    rows = [
        dict(setting=name, seed=i, metric=metric, value=v)
        for name, vals in (("selected", selected), ("legacy-v1.5", legacy))
        for i, v in enumerate(vals)
    ]
    return pd.DataFrame(rows)


def test_claims_verdicts_come_from_intervals_against_chance_and_minimum_effects():
    recall = pd.DataFrame(dict(k=[10], n_top=[10], n_top_kept=[9], recall=[0.9], chance=[0.15]))
    clear = _set_results([0.40, 0.41, 0.39, 0.40, 0.42], [0.30, 0.31, 0.30, 0.29, 0.31])
    c = F.claims(recall, clear, "PCK@0.1 img")
    assert c["verdict"].tolist() == ["holds", "holds"]
    assert math.isclose(c["estimate"].iloc[0], 0.75) and c["control"].iloc[0] == 0.15
    assert math.isclose(c["estimate"].iloc[1], 0.102, abs_tol=1e-9) and math.isclose(c["control"].iloc[1], 0.302)
    # a filter that keeps everything keeps the whole top ten, but so would chance: it fails
    everything = recall.assign(n_top_kept=10, recall=1.0, chance=1.0)
    assert F.claims(everything, clear, "PCK@0.1 img")["verdict"].iloc[0] == "fails"
    # a +0.001 difference measured precisely is no gain (below the one-point minimum); 3 seeds decide nothing
    tiny = _set_results([0.301, 0.302, 0.300, 0.301, 0.302], [0.300, 0.301, 0.299, 0.300, 0.301])
    assert F.claims(recall, tiny, "PCK@0.1 img")["verdict"].iloc[1] == "fails"
    few = _set_results([0.5, 0.5, 0.5], [0.1, 0.1, 0.1])
    assert F.claims(recall, few, "PCK@0.1 img")["verdict"].iloc[1] == "inconclusive"
    with pytest.raises(ValueError, match="no setting 'legacy-v1.5'"):
        F.claims(recall, clear[clear.setting == "selected"], "PCK@0.1 img")


def test_cost_table_totals():
    f = dict(extraction=1.0, probing=2.0, properties=4.0, probed=3)
    e = dict(extraction=5.0, probing=10.0, probed=9)
    df = F.cost_table(f, e).pivot(index="quantity", columns="approach", values="value")
    assert df.loc["CPU s: total", "filter then rank"] == 7.0
    assert df.loc["CPU s: total", "exhaustive"] == 15.0
    assert df.loc["activations probed", "exhaustive"] == 9


def test_read_properties_refuses_another_models_table(tmp_path):
    frame = pd.DataFrame(dict(name=["a", "b"], kind=["res-out", "res-out"], shape=["4x8x8", "4x4x4"]))
    df = pd.concat([props([("a", "up", 0, 0.1, 0.2, 0.3)]), props([("b", "up", 1, 0.1, 0.2, 0.3)])])
    df.loc[df["activation"] == "b", "size"] = 4
    df.to_csv(tmp_path / "p.csv", index=False)
    with pytest.raises(ValueError, match="does not record the split"):
        F.read_properties(tmp_path / "p.csv", frame, t=50)
    df["split"] = "test"
    df.to_csv(tmp_path / "p.csv", index=False)
    with pytest.raises(ValueError, match=r"measured on the \['test'\] split"):
        F.read_properties(tmp_path / "p.csv", frame, t=50)
    df["split"] = "val"
    df.to_csv(tmp_path / "p.csv", index=False)
    table, why = F.read_properties(tmp_path / "p.csv", frame, t=50)
    assert table is not None and set(table["activation"]) == {"a", "b"}
    df.loc[df["activation"] == "b", "size"] = 16  # e.g. SD1.5 at 512 px
    df.to_csv(tmp_path / "p.csv", index=False)
    table, why = F.read_properties(tmp_path / "p.csv", frame, t=50)
    assert table is None and "another model" in why
    assert F.read_properties(tmp_path / "none.csv", frame, t=50)[0] is None


def test_read_properties_puts_one_table_per_property_page_together(tmp_path):
    """The property pages write one results.csv each (own out_dir); the filter reads all three."""
    frame = pd.DataFrame(dict(name=["a", "b"], kind=["res-out", "res-out"], shape=["4x8x8", "4x8x8"]))
    df = props([("a", "up", 0, 0.1, 0.2, 0.3), ("b", "up", 1, 0.4, 0.5, 0.6)]).assign(split="val")
    paths = []
    for m in ("noise_share", "granularity", "locality"):
        paths.append(tmp_path / m / "results.csv")
        paths[-1].parent.mkdir()
        df[df["measure"] == m].to_csv(paths[-1], index=False)
    table, why = F.read_properties(paths, frame, t=50)
    assert why == f"read from {', '.join(map(str, paths))}"
    key = ["activation", "measure"]
    assert table.sort_values(key)["value"].tolist() == df.sort_values(key)["value"].tolist()
    table, why = F.read_properties(paths[:2], frame, t=50)  # a page not run yet: measure instead
    assert table is None and why.endswith("lacks locality at t=50 for 2 of the 2 activations")
    table, why = F.read_properties([*paths[:2], tmp_path / "locality" / "nosuch.csv"], frame, t=50)
    assert table is None and why == f"{tmp_path / 'locality' / 'nosuch.csv'} does not exist"
    df.to_csv(tmp_path / "all.csv", index=False)  # the noise table twice: which one?
    with pytest.raises(
        ValueError, match=r"the measure 'noise_share' is in both .*noise_share/results.csv and .*all.csv"
    ):
        F.read_properties([paths[0], tmp_path / "all.csv"], frame, t=50)


# -- through the protocol layer on a tiny random model ----------------------------------------
def test_scorer_reads_the_same_features_as_a_source_of_one_activation(tiny_sd15, tmp_path):
    from difstudy import protocols as P

    pairs = F.toy_task_data("correspondence", "val", 30, 4)
    names = ["up-level1-repeat0-res-out", "up-level2-repeat0-vit-out"]
    sources = F.Sources(tiny_sd15, model_name="tiny", cache_dir=str(tmp_path / "a"))
    scorer = F.Scorer(sources(names), "correspondence", pairs, F.task_config("correspondence", {"match_size": None}))
    scorer.prepare()
    ranked = F.score_each(scorer, names)
    cfg = P.CorrespondenceConfig(match_size=None)
    for n in names:  # a separate extraction of that activation alone, into another cache
        alone = F.Sources(tiny_sd15, model_name="tiny", cache_dir=str(tmp_path / "b"))([n])
        want = P.correspondence(alone, pairs, cfg, 0)
        want = float(want.loc[want["metric"] == "PCK@0.1 img", "value"].iloc[0])
        assert ranked.set_index("activation").loc[n, "value"] == want
    assert scorer.calls == 2


def test_ranking_cost_counts_what_it_probed_and_cleans_up(tiny_sd15, tmp_path):
    import tempfile
    from pathlib import Path

    pairs = F.toy_task_data("correspondence", "val", 30, 3)
    names = ["up-level1-repeat0-res-out", "up-level1-upsampler-out", "mid-vit-out"]
    before = set(Path(tempfile.gettempdir()).glob("difstudy-ranking-*"))
    sources = F.Sources(tiny_sd15, model_name="tiny", cache_dir=str(tmp_path))
    scores, cost = F.ranking_cost(sources, names, "correspondence", pairs, F.task_config("correspondence"))
    assert cost["probed"] == 3 and sorted(scores["activation"]) == sorted(names)
    assert cost["extraction"] > 0 and cost["probing"] > 0
    assert set(Path(tempfile.gettempdir()).glob("difstudy-ranking-*")) == before
    assert not any(tmp_path.iterdir())  # nothing went into the persistent cache


def test_unknown_task_is_refused():
    with pytest.raises(ValueError, match="unknown task 'segmentation'"):
        F.task_config("segmentation")
