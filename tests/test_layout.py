"""Layout checks: modules stay short enough to read, and GATE sits on the protocol layer."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "difstudy"
MAX_LINES = 800  # any file of the package
MAX_GATE_LINES = 550  # a module of difstudy/gate: one step of the study each


def _lines(path: Path) -> int:
    return len(path.read_text().splitlines())


def test_no_module_is_too_long():
    files = sorted(PKG.rglob("*.py"))
    assert len(files) > 20
    offenders = {str(p.relative_to(ROOT)): _lines(p) for p in files if _lines(p) > MAX_LINES}
    assert offenders == {}, f"split these files (over {MAX_LINES} lines)"


def test_gate_modules_are_one_step_each():
    files = sorted((PKG / "gate").glob("*.py"))
    steps = {"scores", "techniques", "features", "shift", "amalgamation", "claims", "runs"}
    assert {p.stem for p in files} >= {"__init__", *steps}
    assert not (PKG / "gate.py").exists()  # the package replaced the module
    offenders = {p.name: _lines(p) for p in files if _lines(p) > MAX_GATE_LINES}
    assert offenders == {}, f"split these GATE modules (over {MAX_GATE_LINES} lines)"


def _imported(path: Path, source: str | None = None) -> set[str]:
    """Absolute names a file imports, relative imports resolved (``from .. import tables`` gives
    ``difstudy`` and ``difstudy.tables``), imports inside functions included."""
    package = path.relative_to(ROOT).with_suffix("").parts[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text() if source is None else source)):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(package[: len(package) - node.level + 1]) if node.level else ""
            module = ".".join(p for p in (base, node.module or "") if p)
            found |= {module} | {f"{module}.{a.name}" for a in node.names}
    return found


def _imports_tables(path: Path, source: str | None = None) -> bool:
    return any(m == "difstudy.tables" or m.startswith("difstudy.tables.") for m in _imported(path, source))


def test_the_check_sees_every_import_form():
    shift = PKG / "gate" / "shift.py"
    for src in (
        "from ..tables import run_task",
        "from .. import tables",
        "import difstudy.tables",
        "from difstudy.tables import BenchConfig",
        "def f():\n    from ..tables import task_records",
    ):
        assert _imports_tables(shift, src), src
    assert not _imports_tables(shift, "from ..protocols import run_task")
    assert not _imports_tables(PKG / "gate" / "__init__.py", "from .claims import reference_table")


def test_gate_calls_the_protocol_layer_not_the_book():
    files = sorted((PKG / "gate").glob("*.py"))
    assert len(files) > 1
    assert [p.name for p in files if _imports_tables(p)] == []
