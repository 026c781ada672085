"""Every study notebook can be swept with `difstudy sweep`, or says why not before any point runs.

The static part (no kernel, seconds): each notebook of the book's toc either passes the sweep's
check (an ``out_dir`` parameter, ``write_results`` into a folder made from it) or is declared not
sweepable with its reason; the property pages have their own out_dirs, which the filtering page
reads; a notebook that writes no results is refused before any point runs.

The sweeps (``slow``): each study notebook run by :func:`difstudy.sweep.sweep` under its ci
parameters with the smallest sizes it accepts (a YAML base file, as ``--params`` takes one), in a
scratch project folder, and the collected table checked. A notebook execution costs 15-20 s of
kernel start, imports and model load before any cell of its own, 20-90 s in all on 2 busy cores,
so within this file's 4-minute budget the default run sweeps:

- ``property_noise`` over two points (``timesteps`` [50] and [300], the grid of the user report
  that found the property pages unsweepable);
- ``property_granularity``, ``property_locality``, ``benchmark_tables``,
  ``activation_filtering`` and ``gate`` over the first point of their grid (one point each; GATE
  with a reduced base: 2 shift images, one seed, no ControlNet or LoRA, tiny probes, about 25 s
  where its ci point takes 10 minutes).

``DIFSTUDY_SWEEP_ALL=1`` sweeps every notebook over its two-point grid (about 10 minutes on 2 busy
cores), adding ``content_shift`` (unchanged by the move to write_results: it wrote
``results.csv`` before, and GATE's guideline cell runs the same content-shift table) and
``mini_model_card`` (about 90 s a point even at its smallest: the feature scores of every block
output for trained and random weights, the judge's 500 test images and the 60-image prompt test
have fixed sizes). Without the variable those two are covered by the static check only.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import nbformat
import pandas as pd
import pytest
import yaml
from nbformat.v4 import new_code_cell, new_notebook

from difstudy import cli, filtering
from difstudy.errors import DifstudyError
from difstudy.study import ROOT, claims_frame, notebook_names, read_params
from difstudy.sweep import point_id, results_writes, sweep, why_not_sweepable

NOTEBOOKS = ROOT / "notebooks"
STUDY = notebook_names()
# pages that measure nothing: each says why in its metadata (difstudy.not_sweepable)
NOT_SWEEPABLE = {"activations", "explorer", "claims_ledger", "performance"}
PROPERTY_PAGES = {
    "property_noise": "noise_share",
    "property_granularity": "granularity",
    "property_locality": "locality",
}
SWEEP_ALL = bool(os.environ.get("DIFSTUDY_SWEEP_ALL"))

SMALL_PROPERTIES = {"n_images": 2, "timesteps": [50], "seeds": [0, 1]}  # 2 noise draws: noise share's minimum
# toy-world correspondence pairs need at least 20 images of a split (fewer give no same-class pair)
SMALL_PROTOCOLS = {"n_train": 20, "n_test": 20, "n_pairs": 4, "n_seg_train": 2, "n_seg_test": 2, "seeds": [0]}
SMALL_PART_SEG = {"part_seg": {"resolution": 16, "n_models": 1, "max_epochs": 1}}


@dataclass(frozen=True)
class Case:
    """One notebook's sweep: the ci parameters with ``overrides``, over the two-point ``grid`` (one
    key); ``default``: the points swept without DIFSTUDY_SWEEP_ALL (2, 1: the first, or 0)."""

    overrides: dict = field(hash=False)
    grid: dict = field(hash=False)
    default: int


SWEEPS = {
    "property_noise": Case(SMALL_PROPERTIES, {"timesteps": [[50], [300]]}, 2),
    "property_granularity": Case(SMALL_PROPERTIES, {"timesteps": [[50], [300]]}, 1),
    "property_locality": Case(SMALL_PROPERTIES, {"timesteps": [[50], [300]]}, 1),
    "benchmark_tables": Case(
        {
            **SMALL_PROTOCOLS,
            **SMALL_PART_SEG,
            "n_val": 20,
            "rank_candidates": "mid-vit-out",
            "semantic_seg": {"dim": 8},
        },
        {"timestep": [50, 25]},
        1,
    ),
    "activation_filtering": Case(
        {
            "n_property_images": 2,
            "property_seeds": [0, 1],
            "n_val_images": 20,
            "n_val_pairs": 4,
            "n_test_images": 20,
            "n_test_pairs": 4,
            "seeds": [0],
            "k": 1,
            "greedy_pool": 2,
        },
        {"t": [50, 25]},
        1,
    ),
    "content_shift": Case(
        {"n_images": 2, "methods": ["vae", "x0"], "prompts": ["generic"], "n_show": 1},
        {"timesteps": [[50], [100]]},
        0,
    ),
    "gate": Case(
        {
            **SMALL_PROTOCOLS,
            **SMALL_PART_SEG,
            "controlnet": None,
            "lora": None,
            "n_shift_images": 2,
            "shift_methods": ["vae", "x0"],
            "control_timesteps": [50],
            "amalgamation": {"k": 1, "epochs": 1},
        },
        {"seeds": [[0], [1]]},
        1,
    ),
    "unet_vs_dit": Case(
        {
            "n_images": 2,
            "seeds": [0, 1],
            "n_train": 20,
            "n_val": 10,
            "n_val_images": 20,
            "n_test": 20,
            "n_pairs": 4,
            "n_seg_train": 2,
            "n_seg_test": 2,
            "probe_seeds": [0],
            "per_class": 2,
            "sample_steps": 2,
            **SMALL_PART_SEG,
        },
        {"timesteps": [[50], [300]]},
        0,
    ),  # fmt: skip
    "mini_model_card": Case(
        # 6 samples per class are shown; 10 VAE reconstructions
        {"n_val": 10, "n_per_class": 6, "sample_steps": 2, "n_train": 20, "n_test": 20, "n_pairs": 4},
        {"seeds": [[0], [1]]},
        0,
    ),
}


def nb_path(name: str) -> Path:
    return NOTEBOOKS / f"{name}.ipynb"


# -- static: every study notebook is sweepable or says why -----------------------------------------
def test_every_study_notebook_is_sweepable_or_declared_not_with_a_reason():
    assert NOT_SWEEPABLE <= set(STUDY)
    for name in STUDY:
        why = why_not_sweepable(nb_path(name))
        if name in NOT_SWEEPABLE:
            assert why is not None and why.startswith("it is declared not sweepable"), name
            assert "notebooks beside it that can be swept: activation_filtering, benchmark_tables" in why
        else:
            assert why is None, f"{name}: {why}"
    # every sweepable study notebook has its sweep below
    assert set(SWEEPS) == set(STUDY) - NOT_SWEEPABLE


def test_every_study_notebook_has_its_own_out_dir():
    for params in ("ci", "full"):
        out_dirs = {}
        for name in STUDY:
            out_dir = read_params(nb_path(name), params).get("out_dir")
            if out_dir is not None:
                assert out_dir not in out_dirs, f"{name} and {out_dirs[out_dir]} share {out_dir} ({params})"
                out_dirs[out_dir] = name
        assert {out_dirs[f"results/properties/{p}"] for p in ("noise", "granularity", "locality")} == set(
            PROPERTY_PAGES
        )


def test_the_filtering_page_reads_the_property_pages_results(tmp_path):
    """activation_filtering's properties_csvs are the property pages' results.csv, and
    filtering.read_properties puts the three tables together."""
    frame = pd.DataFrame(dict(name=["a", "b"], kind=["res-out", "vit-out"], shape=["4x8x8", "4x4x4"]))
    for params in ("ci", "full"):
        wanted = [f"{read_params(nb_path(n), params)['out_dir']}/results.csv" for n in PROPERTY_PAGES]
        assert read_params(nb_path("activation_filtering"), params)["properties_csvs"] == wanted
    for page, measure in PROPERTY_PAGES.items():
        rows = [
            dict(activation=a, kind=k, stage="up", level=0, repeat=0, t=50, measure=measure, value=v, n_images=2)
            for a, k, v in (("a", "res-out", 0.1), ("b", "vit-out", 0.2))
        ]
        out = tmp_path / read_params(nb_path(page), "ci")["out_dir"]
        out.mkdir(parents=True)
        pd.DataFrame(rows).assign(size=[8, 4], split="val").to_csv(out / "results.csv", index=False)
    paths = [tmp_path / p for p in read_params(nb_path("activation_filtering"), "ci")["properties_csvs"]]
    table, why = filtering.read_properties(paths, frame, t=50)
    assert why.startswith("read from ") and table is not None
    assert sorted(table["measure"].unique()) == sorted(PROPERTY_PAGES.values())
    assert len(table) == 2 * 3


# -- static: the refusal comes before any point --------------------------------------------------
def notebook(path: Path, body: str, metadata: dict | None = None) -> Path:
    params = new_code_cell('a = 1\nout_dir = "results/x"', metadata={"tags": ["parameters"]})
    nb = new_notebook(cells=[params, new_code_cell(body)])
    nb.metadata.update(metadata or {})
    nbformat.write(nb, path)
    return path


@pytest.mark.parametrize(
    "body, reason",
    [
        (
            "import pandas as pd\nfrom pathlib import Path\n"
            'pd.DataFrame({"v": [a]}).to_csv(Path(out_dir) / "results.csv")',
            "no cell calls difstudy.study.write_results(df, out_dir), so no grid point would write the results.csv",
        ),
        (
            'from difstudy.study import write_results\nwrite_results(df, out_dir, "scores.csv")',
            "no cell calls difstudy.study.write_results(df, out_dir)",
        ),
        (
            'from difstudy.study import write_results\nwrite_results(df, "results/fixed")',
            "it calls difstudy.study.write_results, but never into a folder made from its out_dir parameter",
        ),
    ],
    ids=["to_csv", "another-file", "fixed-folder"],
)
def test_a_notebook_that_writes_no_results_is_refused_before_any_point(tmp_path, body, reason):
    nb = notebook(tmp_path / "page.ipynb", body)
    with pytest.raises(DifstudyError) as e:
        sweep(nb, {"a": [1, 2]}, out=tmp_path / "sweep", root=tmp_path, progress=False)
    assert str(e.value).startswith(f"{nb} cannot be swept: {reason}")
    assert "Fix: " in str(e.value)
    assert not (tmp_path / "sweep").exists()  # no point ran, no folder made


def test_results_writes_follows_imports_and_folders_made_from_out_dir(tmp_path):
    def writes(body):
        return results_writes(nbformat.read(notebook(tmp_path / "p.ipynb", body), as_version=4))

    assert writes("from difstudy.study import write_results as save\nout = Path(out_dir)\nsave(df, out)") == (1, 1)
    assert writes(
        "%matplotlib inline\nimport difstudy.study as s\nd = Path(out_dir) / 'x'\ns.write_results(df, d)"
    ) == (
        1,
        1,
    )
    assert writes(
        "from difstudy.study import write_results\nwrite_results(df, out_dir=out_dir, name='results.csv')"
    ) == (
        1,
        1,
    )
    assert writes("def write_results(df, d): pass\nwrite_results(df, out_dir)") == (0, 0)  # not difstudy's
    assert writes("from difstudy.study import write_results\nwrite_results(df, 'results')") == (1, 0)


def test_a_page_declared_not_sweepable_is_refused_by_the_cli_with_its_reason(tmp_path, capsys):
    grid = tmp_path / "grid.yaml"
    grid.write_text("t: [25, 50]\n")
    with pytest.raises(SystemExit) as e:
        cli.main(["sweep", "explorer", "--grid", str(grid), "--out", str(tmp_path / "s"), "--no-progress"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"difstudy sweep: error: {nb_path('explorer')} cannot be swept: it is declared not sweepable")
    assert "an interactive page" in err and "can be swept: activation_filtering" in err
    assert not (tmp_path / "s").exists()


# -- the sweeps --------------------------------------------------------------------------------
def sweep_cases():
    for name, case in SWEEPS.items():
        marks = [pytest.mark.slow]
        if not SWEEP_ALL and case.default == 0:
            marks.append(pytest.mark.skip(reason="swept with DIFSTUDY_SWEEP_ALL=1 (see the module docstring)"))
        yield pytest.param(name, id=name, marks=marks)


@pytest.mark.parametrize("name", list(sweep_cases()))
def test_a_study_notebook_sweeps_into_one_table(tmp_path, name):
    case = SWEEPS[name]
    grid = case.grid if SWEEP_ALL or case.default == 2 else {k: v[:1] for k, v in case.grid.items()}
    params = read_params(nb_path(name), "ci")
    base = tmp_path / "base.yaml"  # the ci parameters at their smallest, as --params takes them
    base.write_text(yaml.safe_dump({**params, **case.overrides}))
    out = tmp_path / "sweep"

    report = sweep(nb_path(name), grid, params=str(base), out=out, root=tmp_path, progress=False)

    assert report.ok, "\n".join(f.error for f in report.failed)
    [key] = grid
    ids = [point_id({key: v}) for v in grid[key]]
    assert list(report.ran) == ids and [p.id for p in report.points] == ids
    table = pd.read_csv(report.table)
    per_point = {i: pd.read_csv(out / "points" / i / "results.csv") for i in ids}
    assert all(len(df) for df in per_point.values())
    assert table["point"].value_counts().to_dict() == {i: len(df) for i, df in per_point.items()}
    for v, i in zip(grid[key], ids):
        rows = table[table["point"] == i]
        shown = ", ".join(map(str, v)) if isinstance(v, list) else v
        assert (rows[key].astype(str) == str(shown)).all()  # the grid's value, as a column
    assert report.figure.exists()
    # every point wrote into its own folder, none into the notebook's own out_dir
    assert not (tmp_path / params["out_dir"]).exists()
    writes_claims = "write_claims(" in nb_path(name).read_text()
    for i in ids:
        claims = list((out / "points" / i).glob("claims*.csv"))
        assert bool(claims) == writes_claims, f"{name} point {i}: claims files {claims}"
        for c in claims:
            assert len(claims_frame(pd.read_csv(c)))
    check_values(name, grid[key], per_point)


def check_values(name, values, per_point: dict[str, pd.DataFrame]):
    """The value the grid gave each point reached the notebook: the point's own results.csv (as
    the notebook wrote it; the collected table carries the grid's value in any case) measured it."""
    for v, df in zip(values, per_point.values()):
        if name == "unet_vs_dit":  # the property means of both denoisers
            assert set(df["t"]) == set(v) and set(df["model"]) == {"mini", "mini-dit"}
        elif name in PROPERTY_PAGES:
            assert set(df["measure"]) == {PROPERTY_PAGES[name]}
            assert df["activation"].nunique() == 197  # the mini model's whole catalogue
            assert set(df["t"]) == set(v)
        elif name == "content_shift":
            assert set(df["t"]) == {0, *v}  # the VAE round trip has no t
        elif name in ("benchmark_tables", "activation_filtering"):
            assert set(df["t"]) == {v}
        elif name in ("gate", "mini_model_card"):
            assert set(df["seed"]) == set(v)
        else:
            raise AssertionError(f"no check for {name}")
