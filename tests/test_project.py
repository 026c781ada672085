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


def _machine_paths(value, where=""):
    """(where, string) of every string in a JSON value that names a folder of the machine it was made on."""
    if isinstance(value, dict):
        return [hit for k, v in value.items() for hit in _machine_paths(v, f"{where}.{k}")]
    if isinstance(value, list):
        return [hit for i, v in enumerate(value) for hit in _machine_paths(v, f"{where}[{i}]")]
    if isinstance(value, str) and (value.startswith(("/", "~")) or re.match(r"^(runs|tmp|\.\.?)/", value)):
        return [(where, value)]
    return []


def test_committed_model_configs_hold_no_local_paths(tmp_path):
    from difstudy.train.common import drop_local_paths

    configs = sorted((ROOT / "difstudy" / "models").rglob("config.json"))
    assert configs, "no committed model config found"
    for path in configs:
        cfg = json.loads(path.read_text())
        assert "_name_or_path" not in cfg, f"{path}: diffusers wrote the training folder; run drop_local_paths"
        assert not _machine_paths(cfg), f"{path}: {_machine_paths(cfg)}"
    # the exporters' scrubber removes what diffusers writes, and only that
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text(json.dumps({"_name_or_path": "/work/x/runs/a", "in_channels": 4}))
    assert drop_local_paths(tmp_path) == [tmp_path / "unet" / "config.json"]
    assert json.loads((tmp_path / "unet" / "config.json").read_text()) == {"in_channels": 4}
    assert drop_local_paths(tmp_path) == []
