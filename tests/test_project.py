"""Project-level checks: dependency lists agree, notebooks follow the house rules."""

import ast
import json
import re
from pathlib import Path

import pytest
import tomllib
import yaml

ROOT = Path(__file__).resolve().parent.parent


def _name(req: str) -> str:
    return re.split(r"[<>=!~\[ ]", req.strip(), maxsplit=1)[0].lower()


def test_environment_yml_matches_pyproject():
    py = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    want = {_name(r) for r in py["dependencies"]}
    for extra in py["optional-dependencies"].values():
        want |= {_name(r) for r in extra}
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    got = {_name(r) for r in pip if not r.startswith("-e")}
    assert got == want


@pytest.mark.parametrize("nb", sorted((ROOT / "notebooks").glob("*.ipynb")), ids=lambda p: p.stem)
def test_notebooks_have_one_parameters_cell_and_no_outputs(nb):
    cells = json.loads(nb.read_text())["cells"]
    tagged = [c for c in cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(tagged) == 1
    assert all(not c.get("outputs") for c in cells if c["cell_type"] == "code")
    # parameters hold plain literals only
    tree = ast.parse("".join(tagged[0]["source"]))
    names = set()
    for stmt in tree.body:
        assert isinstance(stmt, ast.Assign) and len(stmt.targets) == 1, ast.dump(stmt)[:80]
        ast.literal_eval(stmt.value)  # raises on names, calls, expressions
        names.add(stmt.targets[0].id)
    # both parameter files exist and only set parameters the notebook declares
    for which in ("ci", "full"):
        params = yaml.safe_load((nb.parent / f"{nb.stem}.{which}.yaml").read_text())
        assert set(params) <= names, set(params) - names


def test_notebooks_keep_logic_in_the_package():
    for nb in (ROOT / "notebooks").glob("*.ipynb"):
        for c in json.loads(nb.read_text())["cells"]:
            if c["cell_type"] != "code":  # prose may start a line with "class"
                continue
            src = "".join(c["source"])
            assert len(re.findall(r"^\s*def ", src, re.M)) <= 1 and not re.search(r"^\s*class ", src, re.M), nb.name


def test_book_toc_lists_every_notebook():
    from difstudy.study import toc_files

    files = set(toc_files(ROOT / "book" / "_toc.yml"))
    for nb in (ROOT / "notebooks").glob("*.ipynb"):
        assert f"book/_generated/{nb.stem}" in files
