"""difstudy sweep: a 2x2 grid end to end on a tiny notebook, resume, a failing point."""

import nbformat
import pandas as pd
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

from difstudy.errors import DifstudyError
from difstudy.sweep import grid_points, load_grid, point_id, sweep

SOURCE = """import pandas as pd

from difstudy.study import write_results

if a == 2 and b == 20:
    raise ValueError(f"point a={a} b={b} is broken on purpose")
write_results(pd.DataFrame({"seed": [0, 1], "value": [a * b + offset, a * b + offset + 1]}), out_dir)"""


def tiny_notebook(path):
    params = new_code_cell('a = 1\nb = 10\noffset = 0\nout_dir = "results/tiny"', metadata={"tags": ["parameters"]})
    nb = new_notebook(cells=[new_markdown_cell("# tiny"), params, new_code_cell(SOURCE)])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)
    (path.parent / f"{path.stem}.ci.yaml").write_text("offset: 100\n")
    return path


@pytest.mark.slow
def test_sweep_2x2_end_to_end_resume_and_a_failing_point(tmp_path):
    nb = tiny_notebook(tmp_path / "tiny.ipynb")
    grid = tmp_path / "grid.yaml"
    grid.write_text("a: [1, 2]\nb: [10, 20]\n")
    out = tmp_path / "sweep"

    first = sweep(nb, grid, params="ci", out=out, progress=False)
    assert len(first.points) == 4 and len(first.ran) == 3 and not first.skipped
    [failure] = first.failed
    assert failure.point == point_id({"a": 2, "b": 20})
    assert "ValueError" in failure.error and "broken on purpose" in failure.error and "cell 3" in failure.error
    assert failure.notebook.exists()  # the failed copy with the traceback
    assert not (out / "points" / failure.point / "notebook.ipynb").exists()

    table = pd.read_csv(first.table)
    assert len(table) == 3 * 2  # two rows per finished point
    assert set(zip(table["a"], table["b"])) == {(1, 10), (1, 20), (2, 10)}
    # the notebook's value is a*b + offset (offset from the ci parameters) + seed
    assert (table["value"] == table["a"] * table["b"] + 100 + table["seed"]).all()
    assert first.figure.exists() and first.figure.stat().st_size > 1000
    assert pd.read_csv(out / "failures.csv")["point"].tolist() == [failure.point]

    done = out / "points" / point_id({"a": 1, "b": 10}) / "notebook.ipynb"
    mtime = done.stat().st_mtime_ns
    second = sweep(nb, grid, params="ci", out=out, progress=False)
    assert len(second.skipped) == 3 and second.ran == () and len(second.failed) == 1
    assert done.stat().st_mtime_ns == mtime  # finished points are not run again
    assert len(pd.read_csv(second.table)) == 6


def test_grid_is_the_cartesian_product_and_ids_are_stable(tmp_path):
    grid = load_grid({"model": ["mini", "tiny-sd15"], "t": [25, 50, 100], "acts": [["x", "y"]], "seed": 0})
    points = grid_points(grid)
    assert len(points) == 2 * 3
    assert points[0].values == {"model": "mini", "t": 25, "acts": ["x", "y"], "seed": 0}
    assert len({p.id for p in points}) == 6
    assert point_id({"t": 25, "model": "mini"}) != point_id({"t": 50, "model": "mini"})
    assert point_id({"acts": ["a/b"]}).startswith("acts=a-b-")  # filesystem-safe


def test_sweep_rejects_unknown_parameters_and_notebooks_without_out_dir(tmp_path):
    nb = tiny_notebook(tmp_path / "tiny.ipynb")
    with pytest.raises(DifstudyError, match=r"'offst' is not a parameter .*offset"):
        sweep(nb, {"offst": [1]}, out=tmp_path / "s", progress=False)
    with pytest.raises(DifstudyError, match="empty list"):
        sweep(nb, {"a": []}, out=tmp_path / "s", progress=False)
    no_out = new_notebook(cells=[new_code_cell("a = 1", metadata={"tags": ["parameters"]})])
    nbformat.write(no_out, tmp_path / "no_out.ipynb")
    with pytest.raises(DifstudyError, match="declares no out_dir"):
        sweep(tmp_path / "no_out.ipynb", {"a": [1, 2]}, out=tmp_path / "s", progress=False)
