"""The messages of a bad sweep input, one test each: a malformed or empty grid file (file, line,
what was expected), an unknown parameter, an unknown model (a suggestion only when one is close)."""

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_notebook

from difstudy import cli
from difstudy.errors import DifstudyError, ModelNotFoundError
from difstudy.models import load
from difstudy.sweep import load_grid, load_job_config, sweep

EXPECTED = "a grid file is a YAML mapping of parameter names to lists of values, e.g. `t: [25, 50]`"


def grid_file(tmp_path, text, name="grid.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def grid_error(path) -> str:
    with pytest.raises(DifstudyError) as e:
        load_grid(path)
    return str(e.value)


def notebook(tmp_path):
    """A notebook a sweep accepts: parameters a, offset, out_dir; writes results.csv."""
    params = new_code_cell('a = 1\noffset = 0\nout_dir = "results/tiny"', metadata={"tags": ["parameters"]})
    body = new_code_cell(
        "import pandas as pd\n\nfrom difstudy.study import write_results\n\n"
        'write_results(pd.DataFrame({"value": [a + offset]}), out_dir)'
    )
    path = tmp_path / "tiny.ipynb"
    nbformat.write(new_notebook(cells=[params, body]), path)
    return path


# -- malformed or empty grid files ----------------------------------------------------------------
def test_an_unclosed_list_names_the_file_the_line_and_what_yaml_expected(tmp_path):
    path = grid_file(tmp_path, "seed: [0, 1]\nt: [25, 50\n")
    msg = grid_error(path)
    # the problem is found at the end of the file; the list that is not closed starts on line 2
    assert msg.startswith(f"grid file {path}, line 3, column 1: expected ',' or ']', but got '<stream end>'")
    assert "(while parsing a flow sequence that starts at line 2, column 4)" in msg
    assert "\n  2 | t: [25, 50\n" in msg  # the offending line, quoted
    assert msg.endswith(EXPECTED)
    assert "Traceback" not in msg and "yaml." not in msg


def test_a_misindented_key_names_its_line_and_column(tmp_path):
    path = grid_file(tmp_path, "t: [25, 50]\n  model: [mini]\n")
    msg = grid_error(path)
    assert msg.startswith(f"grid file {path}, line 2, column 3: expected <block end>")
    assert "\n  1 | t: [25, 50]\n  2 |   model: [mini]\n" in msg
    assert msg.endswith(EXPECTED)


def test_a_tab_in_the_indentation_is_named(tmp_path):
    path = grid_file(tmp_path, "t:\n\t- 25\n")
    msg = grid_error(path)
    assert msg.startswith(f"grid file {path}, line 2, column 1: found character '\\t' that cannot start any token")
    assert msg.endswith(EXPECTED)


@pytest.mark.parametrize("text", ["", "\n\n", "# t: [25, 50]\n"], ids=["empty", "blank", "comments"])
def test_an_empty_grid_file_says_it_is_empty(tmp_path, text):
    path = grid_file(tmp_path, text)
    assert grid_error(path) == f"grid file {path} is empty (or only comments); {EXPECTED}"


@pytest.mark.parametrize(
    "text, kind", [("- 25\n- 50\n", "a list"), ("t 25\n", "a single value"), ("25\n", "a single int")]
)
def test_a_grid_that_is_not_a_mapping_says_what_it_got(tmp_path, text, kind):
    path = grid_file(tmp_path, text)
    assert grid_error(path) == f"grid file {path}, line 1: got {kind}; {EXPECTED}"


def test_a_parameter_given_twice_names_both_lines(tmp_path):
    path = grid_file(tmp_path, "t: [25]\nseed: [0]\nt: [50]\n")
    msg = grid_error(path)
    assert msg == (
        f"grid file {path}, line 3: parameter 't' appears twice (lines 1 and 3); YAML would keep only the last: "
        "give all its values in one list, `t: [..., ...]`"
    )


def test_an_empty_list_of_values_names_its_line(tmp_path):
    path = grid_file(tmp_path, "seed: 0\nt: []\n")
    assert grid_error(path) == (
        f"grid file {path}, line 2: grid parameter 't' has an empty list of values; give at least one, `t: [...]`"
    )
    # a grid given as a dict has no file or line to name
    with pytest.raises(DifstudyError, match=r"^grid parameter 't' has an empty list of values"):
        load_grid({"t": []})


def test_a_missing_grid_file_is_named(tmp_path):
    path = tmp_path / "nosuch.yaml"
    assert grid_error(path) == f"grid file {path} not found; {EXPECTED}"


def test_the_job_section_reader_gives_the_same_messages(tmp_path):
    """`difstudy sweep` reads the slurm: section first: a malformed file must not leak PyYAML there."""
    path = grid_file(tmp_path, "t: [25, 50\n")
    with pytest.raises(DifstudyError, match=rf"^grid file {path}, line 2, column 1: expected"):
        load_job_config(path)


def test_the_cli_prints_the_grid_message_and_no_traceback(tmp_path, capsys):
    path = grid_file(tmp_path, "t: [25, 50\n")
    with pytest.raises(SystemExit) as e:
        cli.main(["sweep", str(notebook(tmp_path)), "--grid", str(path), "--out", str(tmp_path / "s")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"difstudy sweep: error: grid file {path}, line 2, column 1: expected ',' or ']'")
    assert "Traceback" not in err
    assert not (tmp_path / "s").exists()  # refused before anything ran


# -- unknown parameter ----------------------------------------------------------------------------
def test_an_unknown_parameter_names_the_closest_declared_one(tmp_path):
    nb = notebook(tmp_path)
    with pytest.raises(DifstudyError) as e:
        sweep(nb, {"ofset": [1, 2]}, out=tmp_path / "s", progress=False)
    assert str(e.value) == f"'ofset' is not a parameter of {nb}; closest: ['offset']"
    # nothing close: every declared parameter is listed
    with pytest.raises(DifstudyError, match=r"'zzz' is not a parameter of .*; closest: \['a', 'offset', 'out_dir'\]"):
        sweep(nb, {"zzz": [1]}, out=tmp_path / "s", progress=False)
    assert not (tmp_path / "s" / "points").exists()


# -- unknown model --------------------------------------------------------------------------------
def test_an_unknown_model_without_a_close_name_suggests_nothing():
    with pytest.raises(ModelNotFoundError) as e:
        load("nosuch")
    msg = str(e.value)
    assert msg == (
        "unknown model 'nosuch': not a built-in (mini, mini-dit, tiny-sd15, tiny-sd21, tiny-sdxl, tiny-pixart, "
        "tiny-sd3, tiny-flux), an alias (sd15, sd21, sdxl, playground-v2, flux-dev, flux-schnell, pixart-alpha, "
        "pixart-sigma, sd3-medium, sd35-large), a hub id (org/name) or an existing folder"
    )
    assert "mean" not in msg and "-?" not in msg


def test_an_unknown_model_close_to_a_known_one_suggests_it():
    with pytest.raises(ModelNotFoundError, match=r"an existing folder; did you mean 'mini', 'mini-dit'\?$"):
        load("mni")
    with pytest.raises(ModelNotFoundError, match=r"did you mean 'sd15', "):
        load("sd-15")


def test_the_extract_command_reports_an_unknown_model_cleanly(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["extract", "--model", "nosuch"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("difstudy extract: error: unknown model 'nosuch': not a built-in")
    assert err.endswith("a hub id (org/name) or an existing folder")
