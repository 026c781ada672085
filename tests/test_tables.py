import pytest

from difstudy.study import load_params
from difstudy.tables import REFERENCE, BenchConfig, render, run_benchmark


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    cfg = BenchConfig(
        model="tiny-sd15",
        n_train=20,
        n_val=20,
        n_test=20,
        n_pairs=8,
        seeds=(0, 1),
        settings=("raw pixels", "ours-v1.5", "best single activation"),
        mlp_models=2,
        mlp_hidden=(16,),
        mlp_epochs=1,
        head_epochs=2,
        seg_size=16,
        rank_candidates="legacy-v1.5",
        cache_dir=str(tmp_path_factory.mktemp("cache")),
    )
    return cfg, *run_benchmark(cfg, progress=False)


def test_results_are_tidy_and_complete(small_run):
    cfg, df, ranking = small_run
    metrics_per_setting = 3 + 1 + 1 + 1  # correspondence has three PCK variants
    assert len(df) == len(cfg.settings) * metrics_per_setting * len(cfg.seeds)
    assert {"model", "setting", "activations", "task", "metric", "seed", "value"} <= set(df.columns)
    assert df["value"].between(0, 1).all()
    assert set(df["task"]) == set(cfg.tasks)
    # the best single activation is the top of the validation ranking, over the requested candidates
    assert sorted(ranking["activation"]) == sorted(
        ["up-level0-upsampler-out", "up-level1-upsampler-out", "up-level2-upsampler-out", "up-level3-repeat2-vit-out"]
    )
    best = df[df.setting == "best single activation"]["activations"].iloc[0]
    assert best == ranking.iloc[0]["activation"]
    assert ranking["PCK@0.1 img"].is_monotonic_decreasing


def test_render_is_mean_and_std_per_setting(small_run):
    _, df, _ = small_run
    table = render(df)
    assert list(table.index) == ["raw pixels", "ours-v1.5", "best single activation"]
    cell = table.loc["raw pixels", ("classification", "accuracy")]
    vals = df[(df.setting == "raw pixels") & (df.metric == "accuracy")]["value"]
    assert cell == f"{100 * vals.mean():.1f} ± {100 * vals.std():.1f}"


def test_reference_rows_are_labelled():
    assert (REFERENCE["source"].str.startswith("paper (reference")).all()
    assert REFERENCE.query("setting == 'Ours-v1.5' and metric == 'SPair-71k PCK@0.1 img'")["value"].item() == 77.78


def test_unknown_setting_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="unknown setting"):
        run_benchmark(BenchConfig(model="tiny-sd15", settings=("ours-v2",), cache_dir=str(tmp_path)), progress=False)


def test_parameter_files_build_configs():
    for which in ("ci", "full"):
        p = load_params("benchmark_tables", which)
        p.pop("out_dir")
        BenchConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in p.items()})
