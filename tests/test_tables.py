import pandas as pd
import pytest

from difstudy import protocols as P
from difstudy.study import load_params
from difstudy.tables import REFERENCE, BenchConfig, render, run_benchmark

SMALL = dict(
    model="tiny-sd15",
    n_train=20,
    n_val=12,
    n_test=20,
    n_pairs=6,
    n_seg_train=3,
    n_seg_test=3,
    rank_candidates="legacy-v1.5",
    correspondence=dict(concat_size=None, match_size=None),
    part_seg=dict(resolution=16, n_models=2, max_epochs=2, hidden=[16]),
    semantic_seg=dict(dim=16, epochs=2),
    classification=dict(epochs=3),
)


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    cfg = BenchConfig(
        seeds=(0, 1),
        settings=("raw pixels", "ours-v1.5", "best single activation"),
        cache_dir=str(tmp_path_factory.mktemp("cache")),
        **SMALL,
    )
    return cfg, *run_benchmark(cfg, progress=False)


@pytest.mark.slow
def test_results_are_tidy_complete_and_labelled(small_run):
    cfg, df, ranking = small_run
    metrics_per_setting = 4 + 2 + 2 + 1  # PCK img/bbox per keypoint and per image; mIoU + pixel acc twice; accuracy
    assert len(df) == len(cfg.settings) * metrics_per_setting * len(cfg.seeds)
    assert set(P.RESULT_COLUMNS) | {"setting", "activations", "model"} <= set(df.columns)
    assert set(df["task"]) == set(cfg.tasks)
    labels = df.groupby("task")["protocol"].first()
    assert labels["correspondence"] == "zero-shot NN; concat_size=None; match_size=None"
    assert labels["label-scarce-seg"] == P.protocol_label(cfg.part_seg)
    assert labels["semantic-seg"].startswith("light head (paper: UperNet); dim=16")
    # the best single activation is the top of the validation ranking, over the requested candidates
    assert sorted(ranking["activation"]) == sorted(
        ["up-level0-upsampler-out", "up-level1-upsampler-out", "up-level2-upsampler-out", "up-level3-repeat2-vit-out"]
    )
    best = df[df.setting == "best single activation"]["activations"].iloc[0]
    assert best == ranking.iloc[0]["activation"]
    assert ranking["PCK@0.1 img"].is_monotonic_decreasing


@pytest.mark.slow
def test_a_seed_changes_every_task(small_run):
    _, df, _ = small_run
    unet = df[df.setting == "ours-v1.5"].pivot_table(index=["task", "metric"], columns="seed", values="value")
    main = unet.loc[[("correspondence", "PCK@0.1 img"), ("label-scarce-seg", "mIoU"), ("semantic-seg", "mIoU")]]
    assert (main[0] != main[1]).all(), main
    # different pairs per seed: the per-image and per-keypoint counts differ between seeds
    assert len(df[(df.task == "correspondence") & (df.seed == 0)]) == 12


@pytest.mark.slow
def test_render_is_mean_and_std_per_setting(small_run):
    _, df, _ = small_run
    table = render(df)
    assert list(table.index) == ["raw pixels", "ours-v1.5", "best single activation"]
    col = ("classification", P.protocol_label(P.ClassifyConfig(epochs=3)), "accuracy")
    vals = df[(df.setting == "raw pixels") & (df.metric == "accuracy")]["value"]
    assert table.loc["raw pixels", col] == f"{100 * vals.mean():.1f} ± {100 * vals.std():.1f}"
    one = render(df[df.seed == 0])
    assert one.loc["raw pixels", col] == f"{100 * vals.iloc[0]:.1f} ± n/a"


def test_reference_rows_are_labelled():
    assert (REFERENCE["source"].str.startswith(("Meng et al. 2024", "Baranchuk et al. 2022"))).all()
    assert (REFERENCE["includes"].str.len() > 0).all()
    assert REFERENCE.query("setting == 'Ours-v1.5' and metric == 'SPair-71k PCK@0.1 img'")["value"].item() == 77.78


def test_bad_settings_and_tasks_are_clear_errors():
    with pytest.raises(ValueError, match="unknown setting 'ours-v2'"):
        BenchConfig(settings=("ours-v2",))
    with pytest.raises(ValueError, match="unknown tasks \\['depth'\\]"):
        BenchConfig(tasks=("depth",))
    with pytest.raises(TypeError, match="n_model"):
        BenchConfig(part_seg={"n_model": 3})


def test_parameter_files_build_configs():
    for which in ("ci", "full"):
        p = load_params("benchmark_tables", which)
        cfg = BenchConfig.from_params(p)
        assert isinstance(cfg.part_seg, P.PartSegConfig) and isinstance(cfg.seeds, tuple)
        assert cfg.part_seg.resolution <= cfg.image_size  # toy images are 64 px
    ci = BenchConfig.from_params(load_params("benchmark_tables", "ci"))
    assert P.protocol_label(ci.part_seg) == "pixel-MLP ensemble; resolution=32; n_models=3; max_epochs=8"
    assert isinstance(pd.DataFrame([ci.__dict__]), pd.DataFrame)
