"""The reproducible study: execute the notebooks with papermill, build the book.

``difstudy run --params ci`` executes every study notebook with the
parameters in ``notebooks/<name>.<params>.yaml`` into ``book/_generated/``
(the stored notebooks carry no outputs; executed copies are build artefacts)
and then builds the Jupyter Book (``_config.yml``, ``book/_toc.yml``) into
``_build/html`` with warnings as errors. The book build does not execute
anything again.

**Which notebooks, in which order.** The table of contents is the list: every
``book/_generated/<name>`` entry of ``book/_toc.yml`` is the notebook
``notebooks/<name>.ipynb``, executed in the order the book shows it (so the
claims ledger and the performance page, placed last, see the results of the
notebooks before them). Registering a notebook = the notebook, its
``<name>.ci.yaml`` and ``<name>.full.yaml``, and one toc line.

**What an executed page shows.** After papermill, :func:`present` removes the
``parameters`` cell and papermill's ``injected-parameters`` cell from the
page and puts one small table of the parameters the notebook actually ran with
in their place; cells that start with imports show their output with the code
folded (``hide-input``).

**Failures** raise :class:`~difstudy.errors.DifstudyError` naming the
notebook, the cell (counted from 1 in the stored notebook), the line that
raised and the error; the executed copy with the traceback is kept as
``book/_generated/.<name>.failed.ipynb``. A failed run never replaces the last
good executed copy.

**Times.** Each notebook's wall time is printed at the end of a run and kept in
``results/times.csv`` (columns ``notebook, params, seconds, status,
finished``; rewritten atomically after every notebook, rows of notebooks not
run this time are kept), which the book's performance page shows.

**Results conventions** shared by the notebooks, :mod:`difstudy.sweep` and the
claims ledger:

- a notebook writes its tidy results to ``{out_dir}/results.csv``
  (:func:`write_results`), ``out_dir`` being one of its parameters;
- a notebook that tests a claim of the papers writes ``{out_dir}/claims.csv``
  with the columns ``claim, measure, value, verdict`` (:func:`write_claims`;
  verdict one of :data:`VERDICTS`); :func:`collect_claims` gathers every
  ``results/**/claims*.csv`` into ``results/claims.csv`` for the ledger.

``difstudy probe --params ci`` runs the benchmark tables without a notebook
and writes ``results.csv`` (tidy) and ``table.md``.
"""

from __future__ import annotations

import ast
import html
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import yaml

from .errors import DifstudyError
from .fileio import write_csv_atomic

ROOT = Path(__file__).resolve().parent.parent
TOC = Path("book") / "_toc.yml"
GENERATED = Path("book") / "_generated"
TIMES = Path("results") / "times.csv"
CLAIM_COLUMNS = ("claim", "measure", "value", "verdict")
VERDICTS = ("holds", "fails", "inconclusive")
# seconds for a kernel to start: nbclient's 60 s is too short on a busy 2-core machine
KERNEL_START_TIMEOUT = 300
BOILERPLATE_TAGS = {"hide-input", "remove-input", "remove-cell", "hide-cell", "hide-output", "remove-output"}


# -- the list of notebooks --------------------------------------------------------------
def toc_files(toc: str | os.PathLike) -> list[str]:
    """Every ``file`` entry of a Jupyter Book ``_toc.yml`` (root first, then in reading order)."""
    data = yaml.safe_load(Path(toc).read_text()) or {}
    out = [data["root"]] if "root" in data else []

    def walk(entries):
        for e in entries or []:
            if "file" in e:
                out.append(e["file"])
            for key in ("parts", "chapters", "sections"):
                walk(e.get(key))

    for key in ("parts", "chapters"):
        walk(data.get(key))
    return out


def notebook_names(root: Path = ROOT) -> list[str]:
    """The study's notebooks in reading (= execution) order: the toc's ``book/_generated/*`` pages."""
    prefix = GENERATED.as_posix() + "/"
    return [f[len(prefix) :] for f in toc_files(root / TOC) if f.startswith(prefix)]


def notebook_path(name: str, root: Path = ROOT) -> Path:
    src = root / "notebooks" / f"{name}.ipynb"
    if not src.exists():
        available = sorted(p.stem for p in (root / "notebooks").glob("*.ipynb"))
        raise DifstudyError(f"notebook {src} not found; notebooks: {available}")
    return src


def params_path(notebook: Path, params: str) -> Path:
    """``params`` is ``ci``/``full`` (the YAML beside ``notebook``) or a YAML file."""
    if params.endswith((".yaml", ".yml")):
        return Path(params)
    return notebook.parent / f"{notebook.stem}.{params}.yaml"


def load_params(name: str, params: str, root: Path = ROOT) -> dict:
    """Parameters of notebook ``name``: ``params`` is ``ci``/``full`` or a YAML path."""
    return read_params(root / "notebooks" / f"{name}.ipynb", params)


def read_params(notebook: Path, params: str) -> dict:
    path = params_path(Path(notebook), params)
    if not path.exists():
        options = sorted(p.name for p in Path(notebook).parent.glob(f"{Path(notebook).stem}.*.yaml"))
        raise DifstudyError(f"no parameter file {path}; available for {Path(notebook).stem}: {options}")
    values = yaml.safe_load(path.read_text()) or {}
    if not isinstance(values, dict):
        raise DifstudyError(f"{path} must map parameter names to values, got {type(values).__name__}")
    return values


def declared_parameters(nb) -> dict:
    """The literal assignments of a notebook's ``parameters`` cell (name -> default value)."""
    cells = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    if not cells:
        return {}
    out = {}
    for stmt in ast.parse(cells[0].source).body:
        if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name):
            try:
                out[stmt.targets[0].id] = ast.literal_eval(stmt.value)
            except ValueError:
                out[stmt.targets[0].id] = ast.unparse(stmt.value)
    return out


# -- executing one notebook --------------------------------------------------------------
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def describe_failure(err, source: Path, executed=None, kept: Path | None = None) -> str:
    """A one-screen message for papermill's ``PapermillExecutionError``: notebook, cell, line, error."""
    injected = 0
    if executed is not None:  # cell_index counts papermill's injected cell, not its error notes
        cells = [c for c in executed.cells if "papermill-error-cell-tag" not in c.metadata.get("tags", [])]
        injected = sum("injected-parameters" in c.metadata.get("tags", []) for c in cells[: err.cell_index])
    cell = err.cell_index - injected + 1
    lines = _ANSI.sub("", "\n".join(err.traceback or [])).splitlines()
    at = ""
    for i, ln in enumerate(lines):  # the first frame in the cell itself: "Cell In[n], line k"
        m = re.match(r"Cell In\[\d*\], line (\d+)", ln.strip())
        if m:
            arrow = next((x for x in lines[i + 1 :] if re.match(r"^-+>", x)), "")
            at = f"line {m.group(1)}: " + re.sub(r"^-+>\s*\d*\s?", "", arrow).strip()
            break
    first = next((s for s in (err.source or "").splitlines() if s.strip()), "")
    msg = f"notebook {source} failed in cell {cell} (counted from 1; starts `{first[:80]}`)"
    if at:
        msg += f"\n  at {at}"
    msg += f"\n  {err.ename}: {err.evalue}"
    if kept is not None:
        msg += f"\n  the executed copy with the full traceback: {kept}"
    return msg


def execute(name: str, params: str = "ci", root: Path = ROOT, out_dir: Path | None = None) -> Path:
    """Execute one notebook with papermill and :func:`present` it; returns the executed copy's path."""
    src = notebook_path(name, root)
    values = load_params(name, params, root)
    out_dir = Path(out_dir or root / GENERATED)
    dst = out_dir / f"{name}.ipynb"
    label = params_path(src, params)
    label = label.relative_to(root) if label.is_relative_to(root) else label
    run_notebook(src, dst, values, cwd=root, failed=out_dir / f".{name}.failed.ipynb", label=str(label))
    return dst


def run_notebook(src: Path, dst: Path, values: dict, cwd: Path, failed: Path, label: str = "") -> Path:
    """papermill ``src`` -> ``dst`` with ``values``, atomically; failures raise a :class:`DifstudyError`.

    The copy is written next to ``dst`` and renamed into place only after the
    last cell ran and :func:`present` tidied it, so ``dst`` existing means a
    complete run. A failing cell leaves ``failed`` (with the traceback) instead."""
    import nbformat
    import papermill as pm
    from papermill.exceptions import PapermillExecutionError

    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.stem}.running.ipynb")
    try:
        pm.execute_notebook(
            str(src),
            str(tmp),
            parameters=values,
            cwd=str(cwd),
            kernel_name="python3",
            progress_bar=False,
            start_timeout=KERNEL_START_TIMEOUT,
        )
    except PapermillExecutionError as e:
        executed = nbformat.read(tmp, as_version=4) if tmp.exists() else None
        if tmp.exists():
            tmp.replace(failed)
        raise DifstudyError(describe_failure(e, src, executed, failed if failed.exists() else None)) from e
    except Exception as e:  # no cell ran or the kernel died: still name the notebook
        hint = ""
        if "No such kernel" in str(e):
            hint = "\n  install it: `python -m ipykernel install --sys-prefix --name python3`"
        raise DifstudyError(f"notebook {src} could not be executed: {type(e).__name__}: {e}{hint}") from e
    nb = nbformat.read(tmp, as_version=4)
    present(nb, values, label)
    nbformat.write(nb, tmp)
    tmp.replace(dst)  # a failed run never replaces the last good executed copy
    failed.unlink(missing_ok=True)  # an earlier failure's copy is stale now
    return dst


def _format_value(v) -> str:
    if isinstance(v, (list, tuple)):
        return ", ".join(_format_value(x) for x in v) if v else "(none)"
    if isinstance(v, dict):
        return ", ".join(f"{k}: {_format_value(x)}" for k, x in v.items())
    return str(v)


def params_table(values: dict, defaults: dict, label: str = "") -> str:
    """HTML table of the effective parameters; values that differ from the notebook's defaults in bold."""
    effective = {**defaults, **values}
    changed = False
    rows = []
    for k, v in effective.items():
        cell = f"<code>{html.escape(_format_value(v))}</code>"
        if k in values and k in defaults and values[k] != defaults[k]:
            cell, changed = f"<strong>{cell}</strong>", True
        rows.append(f"<tr><th>{html.escape(k)}</th><td>{cell}</td></tr>")
    note = "Parameters of this run"
    if label:
        note += f" (<code>{html.escape(label)}</code>)"
    if changed:
        note += "; <strong>bold</strong>: not the notebook's default"
    table = "\n".join(["<table>", *rows, "</table>"])
    return f'<div class="difstudy-params">\n<p>{note}</p>\n{table}\n</div>'


def _starts_with_imports(source: str) -> bool:
    try:
        body = ast.parse(source).body
    except SyntaxError:
        return False
    return bool(body) and isinstance(body[0], (ast.Import, ast.ImportFrom))


def present(nb, values: dict, label: str = ""):
    """Tidy an executed notebook for the book (in place; returns it).

    The ``parameters`` and ``injected-parameters`` cells get ``remove-cell``
    and one markdown cell with :func:`params_table` takes their place; code
    cells that start with imports get ``hide-input`` (unless already tagged)."""
    import nbformat

    if any("difstudy-parameters" in c.metadata.get("tags", []) for c in nb.cells):
        return nb  # already presented
    defaults = declared_parameters(nb)
    where = None
    for i, c in enumerate(nb.cells):
        tags = c.metadata.setdefault("tags", [])
        if "parameters" in tags or "injected-parameters" in tags:
            if "remove-cell" not in tags:
                tags.append("remove-cell")
            where = i
        elif c.cell_type == "code" and not BOILERPLATE_TAGS & set(tags) and _starts_with_imports(c.source):
            tags.append("hide-input")
    if where is not None and (defaults or values):
        table = nbformat.v4.new_markdown_cell(params_table(values, defaults, label))
        table.metadata["tags"] = ["difstudy-parameters"]
        nb.cells.insert(where + 1, table)
    return nb


# -- the whole study ------------------------------------------------------------------
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
        str(root / TOC),
        "-W",
        "--keep-going",
    ]
    r = subprocess.run(cmd, cwd=root, capture_output=True, text=True)
    if r.returncode != 0:
        raise DifstudyError("book build failed:\n" + (r.stdout[-4000:] + r.stderr[-4000:]))
    return root / "_build" / "html"


def record_time(row: dict, root: Path = ROOT) -> pd.DataFrame:
    """Replace ``row['notebook']``'s row in ``results/times.csv`` (others kept); returns the table."""
    path = root / TIMES
    old = pd.read_csv(path) if path.exists() else pd.DataFrame(columns=list(row))
    df = pd.concat([old[old["notebook"] != row["notebook"]], pd.DataFrame([row])], ignore_index=True)
    order = {n: i for i, n in enumerate([*notebook_names(root), "(book build)"])}
    df = df.sort_values("notebook", key=lambda s: s.map(lambda n: order.get(n, len(order))), kind="stable")
    write_csv_atomic(df, path)
    return df


def read_times(path: str | os.PathLike = TIMES) -> pd.DataFrame:
    """``results/times.csv`` as written by :func:`run` (an empty table with its columns if missing)."""
    path = Path(path)
    if path.exists():
        return pd.read_csv(path)
    return pd.DataFrame(columns=["notebook", "params", "seconds", "status", "finished"])


def run(params: str = "ci", only: list[str] | None = None, book: bool = True, root: Path = ROOT) -> list[dict]:
    """Execute the notebooks (all, in toc order, or ``only``), then build the book; returns the times.

    Stops at the first failing notebook (its error names the cell); the times
    so far are printed either way."""
    study = notebook_names(root)
    names = only or study
    available = {p.stem for p in (root / "notebooks").glob("*.ipynb")}
    unknown = [n for n in names if n not in available]
    if unknown:
        raise DifstudyError(f"unknown notebooks {unknown}; choose from {study} (or any of {sorted(available)})")
    times: list[dict] = []

    def timed(name, fn):
        t0, ok = time.time(), False
        try:
            result, ok = fn(), True
            return result
        finally:
            row = dict(
                notebook=name, params=params, seconds=round(time.time() - t0, 1), status="ok" if ok else "failed"
            )
            row["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S")
            times.append(row)
            record_time(row, root)

    try:
        for n in names:
            print(f"[difstudy run] executing {n} ({params}) ...", flush=True)
            timed(n, lambda n=n: execute(n, params, root))
            print(f"[difstudy run] {n} done in {times[-1]['seconds']:.0f} s", flush=True)
        if book:
            missing = [n for n in study if not (root / GENERATED / f"{n}.ipynb").exists()]
            if missing:
                raise DifstudyError(
                    f"cannot build the book: {missing} have never been executed; run without --only first"
                )
            html_dir = timed("(book build)", lambda: build_book(root))
            print(f"[difstudy run] book built: {html_dir / 'index.html'}")
    finally:
        print_times(times, root)
    return times


def print_times(times: list[dict], root: Path = ROOT) -> None:
    if not times:
        return
    df = pd.DataFrame(times)[["notebook", "seconds", "status"]]
    total = df["seconds"].sum()
    print(f"\n[difstudy run] times ({root / TIMES}):")
    print(df.to_string(index=False))
    print(f"total {total:.0f} s ({total / 60:.1f} min)", flush=True)


# -- results and claims conventions ----------------------------------------------------
def write_results(df: pd.DataFrame, out_dir: str | os.PathLike, name: str = "results.csv") -> Path:
    """A notebook's tidy results as ``{out_dir}/results.csv`` (atomic; what :mod:`difstudy.sweep` collects)."""
    return write_csv_atomic(df, Path(out_dir) / name)


def claims_frame(rows) -> pd.DataFrame:
    """Validate claim rows (dicts or a DataFrame with :data:`CLAIM_COLUMNS`; bool verdicts become holds/fails)."""
    df = pd.DataFrame(rows).copy()
    missing = [c for c in CLAIM_COLUMNS if c not in df.columns]
    if missing:
        raise DifstudyError(f"claim rows lack the columns {missing}; each row needs {list(CLAIM_COLUMNS)}")
    df["verdict"] = df["verdict"].map(lambda v: ("holds" if v else "fails") if isinstance(v, bool) else v)
    bad = sorted(set(df["verdict"]) - set(VERDICTS), key=str)
    if bad:
        raise DifstudyError(f"unknown claim verdicts {bad}; use one of {list(VERDICTS)} (or True/False)")
    return df


def write_claims(rows, out_dir: str | os.PathLike) -> Path:
    """``{out_dir}/claims.csv``: one row per claim tested (claim, measure, value, verdict, extra columns kept)."""
    return write_csv_atomic(claims_frame(rows), Path(out_dir) / "claims.csv")


def collect_claims(results_dir: str | os.PathLike = "results", out: str | os.PathLike | None = None) -> pd.DataFrame:
    """Concatenate every ``results_dir/**/claims*.csv`` (a ``source`` column names the folder) into
    ``results_dir/claims.csv`` (or ``out``); returns the table, empty when no notebook wrote claims."""
    results_dir = Path(results_dir)
    out = Path(out) if out is not None else results_dir / "claims.csv"
    frames = []
    for path in sorted(results_dir.glob("**/claims*.csv")):
        if path.resolve() == out.resolve():
            continue
        try:
            df = claims_frame(pd.read_csv(path))
        except DifstudyError as e:
            raise DifstudyError(f"{path}: {e}") from None
        df.insert(0, "source", path.parent.relative_to(results_dir).as_posix() or ".")
        frames.append(df)
    cols = ["source", *CLAIM_COLUMNS]
    table = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=cols)
    write_csv_atomic(table, out)
    return table


# -- probe without a notebook -----------------------------------------------------------
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
    r.add_argument("notebooks", nargs="*", help="notebooks to execute (default: every book/_generated page of the toc)")
    r.add_argument("-p", "--params", default="ci", help="ci, full, or a YAML file")
    r.add_argument("--only", nargs="+", default=None, help="same as the positional notebooks")
    r.add_argument("--no-book", action="store_true", help="execute only, do not build the book")
    r.set_defaults(fn=lambda a: run(a.params, (a.only or []) + a.notebooks or None, not a.no_book))
    p = sub.add_parser("probe", help="run the probe benchmark tables (toy world) and write results.csv / table.md")
    p.add_argument("--params", default="ci", help="ci, full, or a YAML file with BenchConfig fields")
    p.add_argument("--out", default=None)
    p.set_defaults(fn=lambda a: probe(a.params, a.out))
