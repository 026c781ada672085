"""difstudy.study: the notebook list from the toc, the page tidy-up, loud failures, times, claims."""

import nbformat
import pandas as pd
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

from difstudy import study
from difstudy.errors import DifstudyError


def test_notebooks_run_in_the_toc_reading_order(tmp_path):
    (tmp_path / "book").mkdir()
    (tmp_path / "book" / "_toc.yml").write_text(
        "format: jb-book\nroot: book/intro\nparts:\n"
        "  - caption: A\n    chapters:\n      - file: book/_generated/b\n      - file: book/page\n"
        "        sections:\n          - file: book/_generated/a\n"
        "  - caption: B\n    chapters:\n      - file: book/_generated/c\n"
    )
    assert study.toc_files(tmp_path / "book" / "_toc.yml") == [
        "book/intro",
        "book/_generated/b",
        "book/page",
        "book/_generated/a",
        "book/_generated/c",
    ]
    assert study.notebook_names(tmp_path) == ["b", "a", "c"]


def test_the_real_toc_names_existing_notebooks_and_ends_with_ledger_and_performance():
    names = study.notebook_names()
    assert all((study.ROOT / "notebooks" / f"{n}.ipynb").exists() for n in names)
    # the ledger and the performance page read what the notebooks before them wrote
    assert names.index("claims_ledger") > names.index("benchmark_tables")
    assert names[-1] == "performance"


def executed_notebook():
    params = new_code_cell('model = "mini"\nt = 50\nacts = ["a", "b"]', metadata={"tags": ["parameters"]})
    injected = new_code_cell("# Parameters\nt = 25\n", metadata={"tags": ["injected-parameters"]})
    imports = new_code_cell("import numpy as np\n\nx = np.ones(3)\nx")
    kept = new_code_cell("import os", metadata={"tags": ["remove-input"]})
    return new_notebook(cells=[new_markdown_cell("# Title"), params, injected, imports, kept, new_code_cell("x + 1")])


def test_present_shows_the_parameters_once_and_folds_imports():
    nb = study.present(executed_notebook(), {"t": 25}, "notebooks/x.ci.yaml")
    tags = [c.metadata.get("tags", []) for c in nb.cells]
    assert "remove-cell" in tags[1] and "remove-cell" in tags[2]  # defaults and papermill's cell
    table = nb.cells[3]
    assert table.cell_type == "markdown" and tags[3] == ["difstudy-parameters"]
    assert table.source.count("<tr>") == 3  # model, t, acts: one row each
    assert "<strong><code>25</code></strong>" in table.source  # changed from the default 50
    assert "<code>mini</code>" in table.source and "<code>a, b</code>" in table.source
    assert "notebooks/x.ci.yaml" in table.source
    assert tags[4] == ["hide-input"]  # starts with imports
    assert tags[5] == ["remove-input"]  # the author's tag is kept
    assert tags[6] == []
    assert len(study.present(nb, {"t": 25}).cells) == len(nb.cells)  # idempotent


def test_params_table_escapes_html():
    assert "&lt;b&gt;" in study.params_table({"x": "<b>"}, {"x": "<b>"})


@pytest.mark.slow
def test_a_failing_cell_names_notebook_cell_line_and_error(tmp_path):
    src = tmp_path / "broken.ipynb"
    nb = new_notebook(
        cells=[
            new_markdown_cell("# broken"),
            new_code_cell("n = 0", metadata={"tags": ["parameters"]}),
            new_code_cell("x = 1\ny = x / n"),
        ]
    )
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, src)
    dst = tmp_path / "out" / "broken.ipynb"
    dst.parent.mkdir()
    dst.write_text("last good copy")
    with pytest.raises(DifstudyError) as e:
        study.run_notebook(src, dst, {"n": 0}, cwd=tmp_path, failed=tmp_path / "out" / ".broken.failed.ipynb")
    msg = str(e.value)
    assert f"notebook {src} failed in cell 3" in msg  # the stored notebook's third cell, not papermill's count
    assert "line 2: y = x / n" in msg
    assert "ZeroDivisionError: division by zero" in msg
    assert (tmp_path / "out" / ".broken.failed.ipynb").exists() and ".broken.failed.ipynb" in msg
    assert dst.read_text() == "last good copy"  # a failed run never replaces the last good copy


def test_record_time_replaces_one_row_and_keeps_the_others(tmp_path):
    (tmp_path / "book").mkdir()
    (tmp_path / "book" / "_toc.yml").write_text(
        "format: jb-book\nroot: i\nchapters:\n  - file: book/_generated/a\n  - file: book/_generated/b\n"
    )
    row = dict(params="ci", status="ok", finished="t")
    study.record_time(dict(notebook="(book build)", seconds=9.0, **row), tmp_path)
    study.record_time(dict(notebook="b", seconds=2.0, **row), tmp_path)
    study.record_time(dict(notebook="a", seconds=1.0, **row), tmp_path)
    df = study.record_time(dict(notebook="b", seconds=3.0, **row), tmp_path)
    assert df["notebook"].tolist() == ["a", "b", "(book build)"]  # toc order, book build last
    assert pd.read_csv(tmp_path / "results" / "times.csv")["seconds"].tolist() == [1.0, 3.0, 9.0]


def test_bad_claims_name_the_accepted_values(tmp_path):
    row = dict(claim="c", measure="m", estimate=1.0, lo=0.5, hi=1.5, min_effect=0.2, control=float("nan"))
    row.update(n_units=30, note="")
    with pytest.raises(DifstudyError, match=r"unknown claim verdicts \['maybe'\].*holds"):
        study.write_claims([dict(row, verdict="maybe")], tmp_path)
    with pytest.raises(DifstudyError, match=r"unknown claim verdicts \[True\]"):  # no bool -> verdict mapping
        study.write_claims([dict(row, verdict=True)], tmp_path)
    with pytest.raises(DifstudyError, match=r"lack the columns \['verdict'\]"):
        study.write_claims([row], tmp_path)
    assert not (tmp_path / "claims.csv").exists()
    # the ledger's own tests: tests/test_ledger.py
