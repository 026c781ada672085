"""The reproducible study: execute the notebooks with papermill, build the book.

``difstudy run --params ci`` executes every notebook of :data:`NOTEBOOKS`
with the parameters in ``notebooks/<name>.<params>.yaml`` into
``book/_generated/`` (the stored notebooks carry no outputs; executed copies
are build artefacts) and then builds the Jupyter Book (``_config.yml``,
``book/_toc.yml``) into ``_build/html`` with warnings as errors. The book
build does not execute anything again.

``difstudy probe --params ci`` runs the benchmark tables without a notebook
and writes ``results.csv`` (tidy) and ``table.md``.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

from .errors import DifstudyError

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ("mini_model_card", "activations", "benchmark_tables")


def load_params(name: str, params: str, root: Path = ROOT) -> dict:
    """Parameters of notebook ``name``: ``params`` is ``ci``/``full`` or a YAML path."""
    path = Path(params) if params.endswith((".yaml", ".yml")) else root / "notebooks" / f"{name}.{params}.yaml"
    if not path.exists():
        options = sorted(p.name for p in (root / "notebooks").glob(f"{name}.*.yaml"))
        raise DifstudyError(f"no parameter file {path}; available for {name}: {options}")
    return yaml.safe_load(path.read_text()) or {}


def execute(name: str, params: str = "ci", root: Path = ROOT, out_dir: Path | None = None) -> Path:
    """Execute one notebook with papermill; returns the executed copy's path."""
    import papermill as pm

    src = root / "notebooks" / f"{name}.ipynb"
    if not src.exists():
        raise DifstudyError(f"notebook {src} not found; notebooks: {list(NOTEBOOKS)}")
    out_dir = out_dir or root / "book" / "_generated"
    out_dir.mkdir(parents=True, exist_ok=True)
    dst = out_dir / f"{name}.ipynb"
    tmp = out_dir / f".{name}.running.ipynb"
    pm.execute_notebook(
        str(src),
        str(tmp),
        parameters=load_params(name, params, root),
        cwd=str(root),
        kernel_name="python3",
        progress_bar=False,
    )
    tmp.replace(dst)  # a failed run never replaces the last good executed copy
    return dst


def build_book(root: Path = ROOT) -> Path:
    """``jupyter-book build`` (warnings are errors); returns ``_build/html``."""
    exe = shutil.which("jupyter-book") or str(Path(sys.executable).parent / "jupyter-book")
    cmd = [
        exe,
        "build",
        str(root),
        "--config",
        str(root / "_config.yml"),
        "--toc",
        str(root / "book" / "_toc.yml"),
        "-W",
        "--keep-going",
    ]
    r = subprocess.run(cmd, cwd=root, capture_output=True, text=True)
    if r.returncode != 0:
        raise DifstudyError("book build failed:\n" + (r.stdout[-4000:] + r.stderr[-4000:]))
    return root / "_build" / "html"


def run(params: str = "ci", only: list[str] | None = None, book: bool = True, root: Path = ROOT) -> None:
    names = only or list(NOTEBOOKS)
    unknown = [n for n in names if n not in NOTEBOOKS]
    if unknown:
        raise DifstudyError(f"unknown notebooks {unknown}; choose from {list(NOTEBOOKS)}")
    for n in names:
        t0 = time.time()
        print(f"[difstudy run] executing {n} ({params}) ...", flush=True)
        execute(n, params, root)
        print(f"[difstudy run] {n} done in {time.time() - t0:.0f} s", flush=True)
    if book:
        missing = [n for n in NOTEBOOKS if not (root / "book" / "_generated" / f"{n}.ipynb").exists()]
        if missing:
            raise DifstudyError(f"cannot build the book: {missing} have never been executed; run without --only first")
        t0 = time.time()
        html = build_book(root)
        print(f"[difstudy run] book built in {time.time() - t0:.0f} s: {html / 'index.html'}")


def probe(params: str = "ci", out: str | None = None) -> Path:
    """Benchmark tables without a notebook: results.csv + table.md in ``out``."""
    from .tables import BenchConfig, render, run_benchmark

    p = load_params("benchmark_tables", params)
    out_dir = Path(out or p.pop("out_dir", "results/benchmark"))
    p.pop("out_dir", None)
    fields = BenchConfig.__dataclass_fields__
    cfg = BenchConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in p.items() if k in fields})
    df, ranking = run_benchmark(cfg)
    out_dir.mkdir(parents=True, exist_ok=True)
    df.to_csv(out_dir / "results.csv", index=False)
    ranking.to_csv(out_dir / "ranking.csv", index=False)
    table = render(df)
    (out_dir / "table.md").write_text(table.to_markdown() if _has_tabulate() else table.to_string())
    print(table.to_string())
    return out_dir


def _has_tabulate() -> bool:
    try:
        import tabulate  # noqa: F401
    except ImportError:
        return False
    return True


def add_cli(sub) -> None:
    r = sub.add_parser("run", help="execute the notebooks (papermill) and build the book")
    r.add_argument("--params", default="ci", help="ci, full, or a YAML file")
    r.add_argument("--only", nargs="+", default=None, help=f"notebooks to execute (of {', '.join(NOTEBOOKS)})")
    r.add_argument("--no-book", action="store_true", help="execute only, do not build the book")
    r.set_defaults(fn=lambda a: run(a.params, a.only, not a.no_book))
    p = sub.add_parser("probe", help="run the probe benchmark tables (toy world) and write results.csv / table.md")
    p.add_argument("--params", default="ci", help="ci, full, or a YAML file with BenchConfig fields")
    p.add_argument("--out", default=None)
    p.set_defaults(fn=lambda a: probe(a.params, a.out))
