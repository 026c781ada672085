"""Project-level checks: dependency lists agree, notebooks follow the house rules, imports follow the layers."""

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


def _imported_modules(path: Path, source: str | None = None) -> set[str]:
    """Absolute names of the modules a file of the package imports (relative imports resolved;
    ``from . import x`` counts as importing ``<package>.x``)."""
    rel = path.relative_to(ROOT).with_suffix("").parts
    package = rel[:-1]  # the package a module (or an __init__) belongs to
    tree = ast.parse(path.read_text() if source is None else source)
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(package[: len(package) - node.level + 1]) if node.level else ""
            module = ".".join(p for p in (base, node.module or "") if p)
            found.add(module)
            found |= {f"{module}.{a.name}" for a in node.names}  # submodules imported by name
    return found


def _imports_from(path: Path, package: str, source: str | None = None) -> list[str]:
    return sorted(m for m in _imported_modules(path, source) if m == package or m.startswith(package + "."))


def test_layer_check_sees_every_import_form():
    judge, tiny = ROOT / "difstudy" / "judge.py", ROOT / "difstudy" / "models" / "tiny.py"
    for src in ("from .data.toyworld import CLASS_NAMES", "from . import data", "import difstudy.data.toyworld"):
        assert _imports_from(judge, "difstudy.data", src), src
    for src in ("from ..data.toyworld import vocabulary", "from .. import data"):
        assert _imports_from(tiny, "difstudy.data", src), src
    assert not _imports_from(tiny, "difstudy.data", "from .tokenizer import build_clip_tokenizer")
    assert _imports_from(judge, "difstudy.train", "def f():\n    from .train.common import denoising_losses")
    assert not _imports_from(judge, "difstudy.train", "from .errors import DifstudyError")


def test_imports_follow_the_layers():
    """The toy world (difstudy.data) is a dataset: the judge and the models layer take class names
    and vocabulary from their callers. Nothing outside difstudy.train imports the training package
    (the card's loss helper lives in difstudy.diffusion; the CLI dispatches no training command)."""
    pkg = ROOT / "difstudy"
    files = sorted(pkg.rglob("*.py"))
    assert len(files) > 20
    lower = [pkg / "judge.py", *sorted((pkg / "models").rglob("*.py"))]
    assert {p.name for p in lower} >= {"judge.py", "__init__.py", "tiny.py", "mini.py", "tokenizer.py"}
    bad = {str(p.relative_to(ROOT)): _imports_from(p, "difstudy.data") for p in lower}
    assert not {k: v for k, v in bad.items() if v}, "imports of the toy-world dataset below it"
    outside = [p for p in files if (pkg / "train") not in p.parents]
    bad = {str(p.relative_to(ROOT)): _imports_from(p, "difstudy.train") for p in outside}
    assert not {k: v for k, v in bad.items() if v}, "imports of the training package from outside it"


def test_training_helpers_stay_importable_from_train_common():
    from difstudy import diffusion
    from difstudy.train import common

    assert common.denoising_losses is diffusion.denoising_losses
    assert common.diffusion_target is diffusion.diffusion_target
