"""The claims ledger: rows stamped with their provenance, one run only, never a sweep or a stale file."""

import json
import os
import re
import subprocess
import types

import matplotlib
import matplotlib.colors as mcolors
import nbformat
import numpy as np
import pandas as pd
import pytest
from nbformat.v4 import new_code_cell, new_notebook

from difstudy import plots, study
from difstudy import verdicts as V
from difstudy.errors import DifstudyError

matplotlib.use("Agg")

# a toy study: two property pages sharing one out_dir, the GATE page, the ledger, the performance page
PAGES = {
    "property_noise": "results/properties",
    "property_granularity": "results/properties",
    "gate": "results/gate",
    "claims_ledger": None,
    "performance": None,
}


@pytest.fixture(autouse=True)
def no_run_environment(monkeypatch):
    """Tests start outside `difstudy run`, whatever the shell that runs pytest has set."""
    for k in (study.ENV_NOTEBOOK, study.ENV_PARAMS, study.ENV_RUN_ID):
        monkeypatch.delenv(k, raising=False)


@pytest.fixture
def project(tmp_path):
    (tmp_path / "book").mkdir()
    chapters = "".join(f"  - file: book/_generated/{n}\n" for n in PAGES)
    (tmp_path / "book" / "_toc.yml").write_text(f"format: jb-book\nroot: book/intro\nchapters:\n{chapters}")
    (tmp_path / "notebooks").mkdir()
    for name, out_dir in PAGES.items():
        p = f'out_dir = "{out_dir}"' if out_dir else 'results_dir = "results"'
        nbformat.write(
            new_notebook(cells=[new_code_cell(p, metadata={"tags": ["parameters"]})]),
            tmp_path / "notebooks" / f"{name}.ipynb",
        )
        for which in ("ci", "full"):
            (tmp_path / "notebooks" / f"{name}.{which}.yaml").write_text(f"out_dir: {out_dir}\n" if out_dir else "")
    return tmp_path


def rows(*claims, verdict_shift=0.0):
    """Real claim rows from difstudy.verdicts: 30 paired differences around 1 + shift, min effect 0.2."""
    x = np.linspace(0.5, 1.5, 30) + verdict_shift
    return [V.paired(x, 0.2).row(c, "mean difference") for c in claims]


# what each page writes when "executed": file name -> claims
WRITES = {
    "property_noise": {"claims_noise.csv": ["noise is asymmetric", "noise grows with t"]},
    "property_granularity": {"claims_granularity.csv": ["coarse to fine within a level"]},
    "gate": {"claims.csv": ["GATE helps"]},
}


@pytest.fixture
def fake_papermill(project, monkeypatch):
    """study.run with every notebook "executed" in this process (no kernel): a page writes its
    claims with write_claims, the ledger collects them; the environment is the one execute sets."""
    seen = []

    def run_notebook(src, dst, values, cwd, failed, label=""):
        name = src.stem
        seen.append({k: os.environ.get(k) for k in (study.ENV_NOTEBOOK, study.ENV_PARAMS, study.ENV_RUN_ID)})
        for file, claims in WRITES.get(name, {}).items():
            study.write_claims(rows(*claims), cwd / values["out_dir"], name=file, model="mini", root=cwd)
        if name == "claims_ledger":
            study.collect_claims(root=cwd)
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_text("{}")
        return dst

    monkeypatch.setattr(study, "run_notebook", run_notebook)
    return seen


def ledger(project):
    return pd.read_csv(project / "results" / "claims.csv", keep_default_na=False)


# -- provenance --------------------------------------------------------------------------------
def test_provenance_that_looks_like_a_number_is_read_back_as_written(tmp_path, monkeypatch):
    """A short commit hash can be all digits (``6867189``: a fresh CI clone failed on it) or start
    with a zero, and a fingerprint can read as a float (``12e4567``): read_claims keeps them text."""
    monkeypatch.setattr(study, "git_commit", lambda root=None: "0123456")
    with study.run_environment("gate", "ci", "20250101-000000-abcdef"):
        path = study.write_claims(rows("a"), tmp_path / "gate", model="12e4567")
    assert "0123456" in path.read_text() and pd.read_csv(path)["commit"][0] == 123456  # what pandas alone does
    df = study.read_claims(path)
    assert df["commit"][0] == "0123456" and df["model_fingerprint"][0] == "12e4567"
    assert df["estimate"].dtype.kind == "f"  # numbers stay numbers


def test_write_claims_stamps_every_row_with_its_provenance(tmp_path):
    import torch

    net = torch.nn.Linear(3, 2)
    net.config = {"in": 3, "out": 2}
    unet = types.SimpleNamespace(unet=net)  # a pipeline: its U-Net's weights fingerprint is recorded
    with study.run_environment("gate", "ci", "20250101-000000-abcdef"):
        path = study.write_claims(rows("a", "b"), tmp_path / "gate", model=unet)
    df = study.read_claims(path)
    assert list(df.columns[: len(V.CLAIM_COLUMNS)]) == list(V.CLAIM_COLUMNS)
    assert list(df.columns[-len(study.PROVENANCE_COLUMNS) :]) == list(study.PROVENANCE_COLUMNS)
    assert (df["notebook"] == "gate").all() and (df["params"] == "ci").all()
    assert (df["run_id"] == "20250101-000000-abcdef").all()
    assert re.fullmatch(r"[0-9a-f]{7,}(\+dirty)?", df["commit"][0])  # the package's repository
    from difstudy.extract import module_fingerprint

    assert (df["model_fingerprint"] == module_fingerprint(net)).all()
    net.weight.data += 1  # other weights, another fingerprint
    assert study.model_fingerprint(unet) != df["model_fingerprint"][0]
    assert study.model_fingerprint("mini") == "mini" and study.model_fingerprint(None) == ""
    with pytest.raises(DifstudyError, match="diffusers pipeline"):
        study.model_fingerprint(3)
    assert os.environ.get(study.ENV_RUN_ID) is None  # the environment is restored after the block


def test_rows_written_by_hand_carry_a_manual_run_id_and_no_notebook(tmp_path):
    a = pd.read_csv(study.write_claims(rows("a"), tmp_path, root=tmp_path), keep_default_na=False)
    b = pd.read_csv(study.write_claims(rows("b"), tmp_path, name="claims_b.csv"), keep_default_na=False)
    assert a["notebook"][0] == "" and a["params"][0] == ""
    assert a["run_id"][0].startswith("manual-") and a["run_id"][0] == b["run_id"][0]  # one id per process
    assert a["commit"][0] == "unknown"  # outside git
    assert a["model_fingerprint"][0] == ""


def test_extra_columns_of_a_controlled_row_are_kept(tmp_path):
    x = np.linspace(0.5, 1.5, 30)
    row = V.controlled_row("trained beats random", "d", V.paired(x, 0.2), V.paired(x - 0.5, 0.1), control=0.3)
    df = pd.read_csv(study.write_claims([row], tmp_path))
    assert {"vs_control", "vs_lo", "vs_hi", "vs_min_effect"} <= set(df.columns)
    assert df["control"][0] == 0.3


def test_git_commit_is_the_short_head_plus_dirty(tmp_path):
    git = ["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t"]
    assert study.git_commit(tmp_path) == "unknown"
    subprocess.run([*git, "init", "-q"], check=True)
    (tmp_path / "a.txt").write_text("a")
    subprocess.run([*git, "add", "a.txt"], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "a"], check=True)
    head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert study.git_commit(tmp_path) == head
    (tmp_path / "a.txt").write_text("b")
    assert study.git_commit(tmp_path) == head + "+dirty"


def test_execute_gives_the_kernel_its_notebook_params_and_run_id(project, fake_papermill):
    study.execute("gate", "full", root=project, run_id="r1")
    assert fake_papermill == [{"DIFSTUDY_NOTEBOOK": "gate", "DIFSTUDY_PARAMS": "full", "DIFSTUDY_RUN_ID": "r1"}]
    assert study.ENV_RUN_ID not in os.environ  # set for the kernel only
    df = pd.read_csv(project / "results" / "gate" / "claims.csv")
    assert df["run_id"].tolist() == ["r1"] and df["params"].tolist() == ["full"]


# -- runs ---------------------------------------------------------------------------------
def test_a_run_has_one_run_id_recorded_before_the_first_notebook(project, fake_papermill):
    study.run("ci", book=False, root=project)
    record = json.loads((project / "results" / "run.json").read_text())
    assert set(record) == {"run_id", "params", "commit", "started", "notebooks", "cpus"}
    assert record["params"] == "ci" and record["notebooks"] == list(PAGES)
    assert re.fullmatch(r"\d{8}-\d{6}-[0-9a-f]{6}", record["run_id"])
    assert {e["DIFSTUDY_RUN_ID"] for e in fake_papermill} == {record["run_id"]}
    assert [e["DIFSTUDY_NOTEBOOK"] for e in fake_papermill] == list(PAGES)
    df = ledger(project)
    assert (df["run_id"] == record["run_id"]).all() and (df["params"] == "ci").all()
    assert (df["model_fingerprint"] == "mini").all()


def test_rerunning_only_the_ledger_keeps_the_run_id_and_other_runs_start_a_new_one(project, fake_papermill):
    first = study.start_run("ci", list(PAGES), project)["run_id"]
    study.run("ci", only=["property_noise", "property_granularity", "gate"], book=False, root=project)
    current = study.read_run(project / study.RUN)["run_id"]
    assert current != first  # a run with pages that write claims starts a new id
    study.run("ci", only=["claims_ledger"], book=False, root=project)
    study.run("ci", only=["claims_ledger", "performance"], book=False, root=project)
    assert study.read_run(project / study.RUN)["run_id"] == current
    assert len(ledger(project)) == 4
    study.run("ci", only=["gate"], book=False, root=project)  # a new run: the property pages are stale now
    assert study.read_run(project / study.RUN)["run_id"] != current
    with pytest.raises(DifstudyError, match="claims_noise.csv"):
        study.run("ci", only=["claims_ledger"], book=False, root=project)
    assert study.start_run("full", ["claims_ledger"], project)["params"] == "full"  # other params: a new run


# -- what the ledger takes -----------------------------------------------------------------------
def test_the_ledger_never_takes_a_sweep_or_a_folder_no_page_writes_to(project, fake_papermill):
    study.run("ci", book=False, root=project)
    run_id = study.read_run(project / study.RUN)["run_id"]
    with study.run_environment("gate", "ci", run_id):  # even with the current run id
        study.write_claims(rows("a sweep point"), project / "results" / "sweeps" / "gate" / "points" / "t=25")
        study.write_claims(rows("an old folder"), project / "results" / "old_gate")
        study.write_claims(rows("a subfolder"), project / "results" / "gate" / "mini")
    table = study.collect_claims(root=project)
    assert table["claim"].tolist() == [
        "noise is asymmetric",
        "noise grows with t",
        "coarse to fine within a level",
        "GATE helps",
    ]
    assert ledger(project)["claim"].tolist() == table["claim"].tolist()


def test_two_pages_sharing_an_out_dir_keep_their_own_rows(project, fake_papermill):
    study.run("ci", book=False, root=project)
    df = ledger(project)
    assert df["notebook"].tolist() == ["property_noise", "property_noise", "property_granularity", "gate"]
    assert df["source"].tolist() == [
        "results/properties/claims_noise.csv",
        "results/properties/claims_noise.csv",
        "results/properties/claims_granularity.csv",
        "results/gate/claims.csv",
    ]
    assert list(df.columns[: len(V.CLAIM_COLUMNS)]) == list(V.CLAIM_COLUMNS)
    assert set(study.PROVENANCE_COLUMNS) <= set(df.columns)
    # a file in the shared folder from a page outside the toc is refused
    with study.run_environment("property_locality", "ci", study.read_run(project / study.RUN)["run_id"]):
        study.write_claims(rows("far"), project / "results" / "properties", name="claims_locality.csv")
    with pytest.raises(DifstudyError, match=r"claims_locality.csv: rows written by \['property_locality'\]"):
        study.collect_claims(root=project)


def test_a_stale_file_is_refused_with_its_run_id_and_the_fix(project, fake_papermill):
    study.run("ci", book=False, root=project)
    before = (project / "results" / "claims.csv").read_text()
    with study.run_environment("property_granularity", "ci", "20240101-000000-0ld0ld"):
        study.write_claims(rows("an old claim"), project / "results" / "properties", name="claims_granularity.csv")
    with pytest.raises(DifstudyError) as e:
        study.collect_claims(root=project)
    msg = str(e.value)
    assert "results/properties/claims_granularity.csv: run_id 20240101-000000-0ld0ld" in msg
    assert "written by property_granularity" in msg
    assert "fix: rerun property_granularity with `difstudy run`" in msg and "difstudy run --params ci" in msg
    assert "claims_noise.csv" not in msg  # the current files are fine
    assert (project / "results" / "claims.csv").read_text() == before  # no ledger with the stale rows


def test_rows_from_a_hand_run_or_without_provenance_are_refused(project, fake_papermill):
    study.run("ci", book=False, root=project)
    study.write_claims(rows("by hand"), project / "results" / "gate")
    with pytest.raises(DifstudyError, match=r"run_id manual-.*run by hand"):
        study.collect_claims(root=project)
    old = pd.DataFrame(dict(claim=["c"], measure="m", estimate=1.0, lo=0.5, hi=1.5, min_effect=0.2))
    old = old.assign(control=np.nan, n_units=30, verdict="holds", note="")
    old.to_csv(project / "results" / "gate" / "claims.csv", index=False)
    with pytest.raises(DifstudyError, match=r"gate/claims.csv: no run_id column"):
        study.collect_claims(root=project)


def test_collect_claims_needs_a_recorded_run(project):
    with pytest.raises(DifstudyError, match=r"no run recorded in .*run.json.*difstudy run --params ci"):
        study.collect_claims(root=project)
    assert study.collect_claims(params="ci", run_id="r", root=project).empty  # nothing written yet


# -- claim rows --------------------------------------------------------------------------------
def test_claims_frame_names_missing_columns():
    with pytest.raises(DifstudyError, match=r"lack the columns \['estimate', 'lo'.*old column `value`"):
        study.claims_frame([dict(claim="c", measure="m", value=1, verdict="holds")])
    row = rows("c")[0]
    del row["min_effect"], row["n_units"]
    with pytest.raises(DifstudyError, match=r"lack the columns \['min_effect', 'n_units'\]"):
        study.claims_frame([row])


@pytest.mark.parametrize("verdict", ["maybe", True, False, None, "Holds"])
def test_claims_frame_refuses_unknown_verdicts(verdict):
    row = {**rows("c")[0], "verdict": verdict}
    with pytest.raises(DifstudyError, match=r"unknown claim verdicts \[.*\]; use one of \['holds', 'fails'"):
        study.claims_frame([row])


def test_claims_frame_wants_numbers_and_write_claims_a_claims_file_name(tmp_path):
    with pytest.raises(DifstudyError, match=r"column 'estimate' must hold numbers"):
        study.claims_frame([{**rows("c")[0], "estimate": "large"}])
    with pytest.raises(DifstudyError, match="claims_<part>.csv"):
        study.write_claims(rows("c"), tmp_path, name="noise.csv")
    assert list(study.claims_frame([]).columns) == list(V.CLAIM_COLUMNS)


def test_the_one_definition_of_columns_and_verdicts():
    assert study.CLAIM_COLUMNS is V.CLAIM_COLUMNS and study.VERDICTS is V.VERDICTS


def test_ledger_table_shows_shared_provenance_once():
    df = pd.DataFrame(rows("a", "b")).assign(
        notebook=["x", "y"], params="ci", run_id="r", commit="abc", model_fingerprint=["f1", "f2"], source="s"
    )
    table, shared = study.ledger_table(df)
    assert shared == dict(params="ci", run_id="r", commit="abc")
    assert list(table.columns) == [*study.LEDGER_COLUMNS, "model_fingerprint"]


# -- the forest plot -------------------------------------------------------------------------
def forest_claims():
    few = V.paired([1.0, 2.0], 0.2).row("too few units", "d")  # NaN interval
    holds = rows("a long claim " * 8)[0]
    fails = V.paired(np.linspace(-1.5, -0.5, 30), 0.2).row("fails", "d")
    return pd.DataFrame([holds, fails, few])


def test_plot_forest_draws_one_row_per_claim():
    claims = forest_claims()
    ax = plots.plot_forest(claims)
    by = {g: [ln for ln in ax.lines if ln.get_gid() == g] for g in ("estimate", "interval", "min_effect")}
    assert len(ax.get_yticks()) == 3 and len(by["estimate"]) == 3 and len(by["min_effect"]) == 3
    assert len(by["interval"]) == 2  # the row without an interval has just its dot
    assert [ln.get_ydata()[0] for ln in by["estimate"]] == [0, 1, 2]
    assert [ln.get_xdata()[0] for ln in by["estimate"]] == pytest.approx(claims["estimate"].tolist())
    assert list(by["interval"][0].get_xdata()) == pytest.approx([claims["lo"][0], claims["hi"][0]])
    assert [ln.get_xdata()[0] for ln in by["min_effect"]] == pytest.approx([0.2] * 3)
    colours = [mcolors.to_hex(ln.get_color()) for ln in by["estimate"]]
    assert colours == [mcolors.to_hex(c) for c in ("tab:green", "tab:red", "goldenrod")]
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert "\n" in labels[0] and labels[1] == "fails"  # long claims wrapped
    assert any(ln.get_xdata()[0] == 0 for ln in ax.lines if ln.get_gid() is None)  # the line at 0
    rel = plots.plot_forest(claims, relative=True)
    assert [ln.get_xdata()[0] for ln in rel.lines if ln.get_gid() == "min_effect"] == pytest.approx([1.0] * 3)
    with pytest.raises(ValueError, match="unknown verdicts"):
        plots.plot_forest(claims.assign(verdict="maybe"))


@pytest.mark.slow
def test_a_papermill_kernel_inherits_the_run_environment(project):
    code = (
        "from difstudy import study\nfrom difstudy import verdicts as V\n"
        "study.write_claims([V.paired([1.0, 1.1, 0.9, 1.2, 1.0], 0.2).row('c', 'd')], out_dir, model='mini')"
    )
    nb = nbformat.read(project / "notebooks" / "gate.ipynb", as_version=4)
    nb.cells.append(new_code_cell(code))
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, project / "notebooks" / "gate.ipynb")
    study.execute("gate", "ci", root=project, run_id="20250101-000000-kernel")
    df = pd.read_csv(project / "results" / "gate" / "claims.csv")
    assert df[["notebook", "params", "run_id"]].values.tolist() == [["gate", "ci", "20250101-000000-kernel"]]
