"""The reproducible study: execute the notebooks with papermill, build the book.

``difstudy run --params ci`` executes every study notebook with the
parameters in ``notebooks/<name>.<params>.yaml`` into ``book/_generated/``
(the stored notebooks carry no outputs; executed copies are build artefacts)
and then builds the Jupyter Book (``_config.yml``, ``book/_toc.yml``) into
``_build/html`` with warnings as errors. The book build does not execute
anything again.

**Which notebooks, in which order.** The table of contents is the list: every
``book/_generated/<name>`` entry of ``book/_toc.yml`` is the notebook ``notebooks/<name>.ipynb``,
executed in the order the book shows it (so the claims ledger and the performance page, placed last,
see the results of the notebooks before them). Registering a notebook = the notebook, its
``<name>.ci.yaml`` and ``<name>.full.yaml``, and one toc line.

**What an executed page shows.** After papermill, :func:`present` removes the
``parameters`` cell and papermill's ``injected-parameters`` cell from the
page and puts one small table of the parameters the notebook actually ran with
in their place; cells that start with imports show their output with the code
folded (``hide-input``).

**Failures** raise :class:`~difstudy.errors.DifstudyError` naming the notebook, the cell (counted
from 1 in the stored notebook), the line that raised and the error; the executed copy with the
traceback is kept as ``book/_generated/.<name>.failed.ipynb``. A failed run never replaces the last
good executed copy.

**Times.** Each notebook's wall time is printed at the end of a run and kept in
``results/times.csv`` (columns ``notebook, params, seconds, status,
finished``; rewritten atomically after every notebook, rows of notebooks not
run this time are kept), which the book's performance page shows.

**Runs.** Every ``difstudy run`` has a run id (``YYYYMMDD-HHMMSS-xxxxxx``: the start
time and six random hex digits), recorded before the first notebook in
``results/run.json``::

    {"run_id": "20250301-141502-3fa9c1", "params": "ci", "commit": "34bd345+dirty",
     "started": "2025-03-01T14:15:02", "notebooks": ["mini_model_card", "...", "performance"]}

(``commit``: :func:`git_commit` at the start; ``notebooks``: those of that
invocation). A run of only the pages that read results and write no claims
(:data:`READERS`: the claims ledger and the performance page) with the same
``params`` keeps the recorded run id, so ``difstudy run --only claims_ledger``
rebuilds the ledger of the last run; any other run starts a new id (rerunning
one page alone therefore starts a new run, whose ledger holds only that page).
:func:`execute` hands the notebook its provenance through the environment,
which the papermill kernel inherits: ``DIFSTUDY_NOTEBOOK`` (the notebook's
name), ``DIFSTUDY_PARAMS`` (``ci``, ``full`` or the YAML file as given) and
``DIFSTUDY_RUN_ID``.

**Results conventions** shared by the notebooks, :mod:`difstudy.sweep` and the
claims ledger:

- a notebook writes its tidy results to ``{out_dir}/results.csv``
  (:func:`write_results`), ``out_dir`` being one of its parameters;
- a notebook that tests a claim of the papers writes
  ``{out_dir}/claims.csv`` (or ``claims_<part>.csv`` when pages share an
  ``out_dir``) with :func:`write_claims`: rows built by
  :mod:`difstudy.verdicts` (:data:`CLAIM_COLUMNS` ``claim, measure, estimate,
  lo, hi, min_effect, control, n_units, verdict, note``, extra columns such as
  ``vs_lo`` kept; verdict one of :data:`VERDICTS`, decided only in
  :mod:`difstudy.verdicts`), each stamped with :data:`PROVENANCE_COLUMNS`
  ``notebook, params, run_id, commit, model_fingerprint``. Outside ``difstudy
  run`` (a notebook run by hand) ``notebook`` and ``params`` are ``""`` and
  ``run_id`` is ``manual-<id>``, one per Python process, so the ledger never
  takes those rows;
- :func:`collect_claims` builds the ledger ``results/claims.csv`` from the
  current run only: for each notebook of the toc, the ``claims*.csv`` files
  directly in its ``out_dir`` (never ``results/sweeps`` or other folders). A
  file whose rows carry another run id (an earlier run, a hand run) is refused
  with an error naming it, never silently mixed in; :func:`read_claims` reads a claims file back.

``difstudy probe --params ci`` runs the benchmark tables without a notebook
and writes ``results.csv`` (tidy) and ``table.md``.
"""

from __future__ import annotations

import ast
import html
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pandas as pd
import yaml

from .errors import DifstudyError
from .fileio import write_csv_atomic, write_text_atomic
from .verdicts import CLAIM_COLUMNS, VERDICTS

ROOT = Path(os.environ.get("DIFSTUDY_ROOT") or Path(__file__).resolve().parent.parent)  # a rehearsal's own folder
TOC = Path("book") / "_toc.yml"
GENERATED = Path("book") / "_generated"
TIMES = Path("results") / "times.csv"
RUN = Path("results") / "run.json"
# stamped on every claim row by write_claims: which page, parameters, run, code and weights made it
PROVENANCE_COLUMNS = ("notebook", "params", "run_id", "commit", "model_fingerprint")
# the environment difstudy run gives a notebook's kernel (papermill kernels inherit it)
ENV_NOTEBOOK, ENV_PARAMS, ENV_RUN_ID = "DIFSTUDY_NOTEBOOK", "DIFSTUDY_PARAMS", "DIFSTUDY_RUN_ID"
# pages that read the results and write no claims: a run of only these keeps the recorded run id
READERS = ("claims_ledger", "performance")
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


# -- runs and provenance -----------------------------------------------------------------
_MANUAL_RUN_ID: str | None = None  # the run id of rows written outside difstudy run, one per process


def new_run_id() -> str:
    """``YYYYMMDD-HHMMSS-xxxxxx``: the local time and six random hex digits."""
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"


def git_commit(root: Path = ROOT) -> str:
    """The short sha of ``root``'s git HEAD, plus ``+dirty`` when the tree has changes (untracked
    files that git does not ignore included); ``unknown`` outside git or without git."""
    try:
        sha = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=30
        )
        if sha.returncode != 0 or not sha.stdout.strip():
            return "unknown"
        status = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain"], capture_output=True, text=True, timeout=60
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    dirty = status.returncode != 0 or bool(status.stdout.strip())
    return sha.stdout.strip() + ("+dirty" if dirty else "")


def read_run(path: str | os.PathLike = RUN) -> dict | None:
    """The run recorded in ``results/run.json`` by :func:`start_run` (None when there is none)."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DifstudyError(f"{path} is not valid JSON ({e}); delete it and run the study again") from None
    if not isinstance(data, dict) or not data.get("run_id"):
        raise DifstudyError(f"{path} records no run_id; delete it and run the study again")
    return data


def start_run(params: str, names: list[str], root: Path = ROOT) -> dict:
    """The run of one ``difstudy run``: the recorded one (``results/run.json``) when every
    notebook in ``names`` is one of :data:`READERS` and the params are the same, else a new
    one, recorded (atomically) before the first notebook runs. Returns the record."""
    path = root / RUN
    last = read_run(path)
    if last is not None and last.get("params") == params and set(names) <= set(READERS):
        return last
    record = dict(
        run_id=new_run_id(),
        params=params,
        commit=git_commit(root),
        started=time.strftime("%Y-%m-%dT%H:%M:%S"),
        notebooks=list(names),
        cpus=os.cpu_count(),
    )
    write_text_atomic(path, json.dumps(record, indent=2) + "\n")
    return record


@contextmanager
def run_environment(notebook: str, params: str, run_id: str):
    """Set ``DIFSTUDY_NOTEBOOK``, ``DIFSTUDY_PARAMS`` and ``DIFSTUDY_RUN_ID`` in this process
    (and so in the kernels it starts) for the ``with`` block; the old values come back after."""
    new = {ENV_NOTEBOOK: notebook, ENV_PARAMS: str(params), ENV_RUN_ID: run_id}
    old = {k: os.environ.get(k) for k in new}
    os.environ.update(new)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def model_fingerprint(model) -> str:
    """What ``model_fingerprint`` records: :func:`difstudy.extract.module_fingerprint` of a
    pipeline's denoiser (its U-Net or transformer) or of a network itself; a string (a model
    name) as given; ``""`` for None."""
    if model is None:
        return ""
    if isinstance(model, str):
        return model
    from .extract import module_fingerprint

    net = next((n for n in (getattr(model, "unet", None), getattr(model, "transformer", None)) if n is not None), model)
    if not (hasattr(net, "named_parameters") and hasattr(net, "config")):
        raise DifstudyError(
            f"model must be a diffusers pipeline, a network with a config, a model name or None; "
            f"got {type(model).__name__}"
        )
    return module_fingerprint(net)


def provenance(model=None, root: Path = ROOT) -> dict:
    """The :data:`PROVENANCE_COLUMNS` of rows written now: ``notebook``, ``params``, ``run_id``
    from the environment :func:`execute` sets (outside ``difstudy run``: ``""``, ``""`` and
    ``manual-<id>``, one id per process), ``commit`` (:func:`git_commit` of ``root``) and
    ``model_fingerprint`` (:func:`model_fingerprint` of ``model``)."""
    global _MANUAL_RUN_ID
    run_id = os.environ.get(ENV_RUN_ID, "")
    if not run_id:
        _MANUAL_RUN_ID = _MANUAL_RUN_ID or f"manual-{new_run_id()}"
        run_id = _MANUAL_RUN_ID
    return dict(
        notebook=os.environ.get(ENV_NOTEBOOK, ""),
        params=os.environ.get(ENV_PARAMS, ""),
        run_id=run_id,
        commit=git_commit(root),
        model_fingerprint=model_fingerprint(model),
    )


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


def execute(
    name: str, params: str = "ci", root: Path = ROOT, out_dir: Path | None = None, run_id: str | None = None
) -> Path:
    """Execute one notebook with papermill and :func:`present` it; returns the executed copy's path.

    The kernel sees ``DIFSTUDY_NOTEBOOK=name``, ``DIFSTUDY_PARAMS=params`` and
    ``DIFSTUDY_RUN_ID=run_id`` (:func:`run_environment`). Without ``run_id`` it is a run of
    its own, like ``difstudy run --only name`` (:func:`start_run`)."""
    src = notebook_path(name, root)
    values = load_params(name, params, root)
    out_dir = Path(out_dir or root / GENERATED)
    dst = out_dir / f"{name}.ipynb"
    label = params_path(src, params)
    label = label.relative_to(root) if label.is_relative_to(root) else label
    if run_id is None:
        run_id = start_run(params, [name], root)["run_id"]
    with run_environment(name, params, run_id):
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
    """``jupyter-book build`` (warnings are errors); returns ``_build/html``. The widget scripts
    the pages load are fetched first (:func:`difstudy.bookassets.ensure_widget_js`)."""
    from .bookassets import ensure_widget_js

    ensure_widget_js(root)
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

    One run id for all of them (:func:`start_run`: new, or the recorded one for a run of
    :data:`READERS` only). Stops at the first failing notebook (its error names the cell);
    the times so far are printed either way."""
    study = notebook_names(root)
    names = only or study
    available = {p.stem for p in (root / "notebooks").glob("*.ipynb")}
    unknown = [n for n in names if n not in available]
    if unknown:
        raise DifstudyError(f"unknown notebooks {unknown}; choose from {study} (or any of {sorted(available)})")
    run_id = start_run(params, names, root)["run_id"]
    print(f"[difstudy run] run {run_id} ({root / RUN})", flush=True)
    times: list[dict] = []

    def timed(name, fn):
        t0, ok = time.time(), False
        try:
            result, ok = fn(), True
            return result
        finally:
            row = dict(
                notebook=name,
                params=params,
                seconds=round(time.time() - t0, 1),
                status="ok" if ok else "failed",
                run_id=run_id,
            )
            row["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S")
            times.append(row)
            record_time(row, root)

    try:
        for n in names:
            print(f"[difstudy run] executing {n} ({params}) ...", flush=True)
            timed(n, lambda n=n: execute(n, params, root, run_id=run_id))
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


_NUMERIC = ("estimate", "lo", "hi", "min_effect", "control", "n_units")


def claims_frame(rows) -> pd.DataFrame:
    """Validate claim rows (dicts or a DataFrame): every column of :data:`CLAIM_COLUMNS` (extra
    columns kept), numbers where numbers belong, verdicts from :data:`VERDICTS` only (a verdict is
    decided by :mod:`difstudy.verdicts`, never here: True/False are refused). No rows at all give
    an empty table with those columns."""
    df = pd.DataFrame(rows).copy()
    if df.empty and len(df.columns) == 0:
        return pd.DataFrame(columns=list(CLAIM_COLUMNS))
    missing = [c for c in CLAIM_COLUMNS if c not in df.columns]
    if missing:
        hint = " (the old column `value` is now `estimate`, with its interval lo, hi)" if "value" in df.columns else ""
        raise DifstudyError(
            f"claim rows lack the columns {missing}{hint}; each row needs {list(CLAIM_COLUMNS)}: "
            "build rows with difstudy.verdicts (Verdict.row or controlled_row)"
        )
    for c in _NUMERIC:
        num = pd.to_numeric(df[c], errors="coerce")
        bad = df.loc[num.isna() & df[c].notna(), c]
        if len(bad):
            raise DifstudyError(
                f"claim column {c!r} must hold numbers (NaN where none); got {bad.unique()[:5].tolist()}"
            )
        df[c] = num
    bad = [v for v in dict.fromkeys(df["verdict"]) if not (isinstance(v, str) and v in VERDICTS)]
    if bad:
        raise DifstudyError(
            f"unknown claim verdicts {bad}; use one of {list(VERDICTS)}, as difstudy.verdicts decides them "
            "(True/False are no verdicts)"
        )
    return df


def write_claims(rows, out_dir: str | os.PathLike, name: str = "claims.csv", model=None, root: Path = ROOT) -> Path:
    """``{out_dir}/{name}``: one row per claim tested, from :mod:`difstudy.verdicts` (``Verdict.row``,
    ``controlled_row``), validated by :func:`claims_frame` (extra columns kept) and stamped with
    :data:`PROVENANCE_COLUMNS` (:func:`provenance`; any such columns in ``rows`` are replaced).

    ``name``: ``claims.csv``, or ``claims_<part>.csv`` when notebooks share an ``out_dir`` (the
    ledger reads ``claims*.csv``). ``model``: the diffusers pipeline the claims were measured on
    (its U-Net's weights fingerprint is recorded), a model name, or None. Returns the path."""
    if Path(name).name != name or not (name.startswith("claims") and name.endswith(".csv")):
        raise DifstudyError(f"claims file name must look like claims.csv or claims_<part>.csv, got {name!r}")
    df = claims_frame(rows)
    extra = [c for c in df.columns if c not in CLAIM_COLUMNS and c not in PROVENANCE_COLUMNS]
    df = df[[*CLAIM_COLUMNS, *extra]].copy()
    for k, v in provenance(model, root).items():
        df[k] = v
    return write_csv_atomic(df, Path(out_dir) / name)


def read_claims(path: str | os.PathLike) -> pd.DataFrame:
    """A claims file, validated, its provenance read as text (commit ``6867189``, fingerprint ``12e4567``)."""
    return claims_frame(pd.read_csv(path, dtype=dict.fromkeys(PROVENANCE_COLUMNS, str)))


def notebook_values(name: str, params: str, root: Path = ROOT) -> dict:
    """The parameters notebook ``name`` runs with: its parameters cell's defaults, then ``params``."""
    import nbformat

    declared = declared_parameters(nbformat.read(notebook_path(name, root), as_version=4))
    return {**declared, **load_params(name, params, root)}


def collect_claims(
    params: str | None = None,
    run_id: str | None = None,
    results_dir: str | os.PathLike = "results",
    out: str | os.PathLike | None = None,
    root: Path = ROOT,
) -> pd.DataFrame:
    """The claims ledger of one run: ``{results_dir}/claims.csv`` (or ``out``), also returned.

    For each notebook of the book's toc (:func:`notebook_names`), the ``claims*.csv`` files
    directly in its ``out_dir`` (from ``params``), each folder once however many notebooks share
    it; never ``results/sweeps`` or any other folder. Rows keep the ``notebook`` that wrote them
    and are ordered as the toc; a ``source`` column names the file. ``run_id`` and ``params``
    default to the current run's: the environment ``difstudy run`` sets (``DIFSTUDY_RUN_ID``,
    ``DIFSTUDY_PARAMS``), else ``{results_dir}/run.json``.

    A file whose rows carry another run id (an earlier run, a notebook run by hand, a file from
    before rows had provenance) or that a notebook outside the toc wrote is refused: a
    :class:`DifstudyError` lists every such file with its run id and the fix; nothing is written."""
    root = Path(root)
    results = root / results_dir
    out = root / out if out is not None else results / "claims.csv"
    run_id = run_id or os.environ.get(ENV_RUN_ID) or None
    params = params or os.environ.get(ENV_PARAMS) or None
    if run_id is None or params is None:
        record = read_run(results / "run.json")
        if record is None and run_id is None:
            raise DifstudyError(
                f"no run recorded in {results / 'run.json'}: the ledger takes the claims of one run; "
                "run the study with `difstudy run --params ci`"
            )
        run_id = run_id or record["run_id"]
        params = params or (record or {}).get("params") or "ci"
    toc = notebook_names(root)
    folders: dict[Path, list[str]] = {}
    for name in toc:
        values = notebook_values(name, params, root)
        if values.get("out_dir"):
            folders.setdefault((root / values["out_dir"]).resolve(), []).append(name)
    frames, refused = [], []
    for folder, writers in folders.items():
        for path in sorted(folder.glob("claims*.csv")):
            if path.resolve() == out.resolve():
                continue
            shown = path.relative_to(root) if path.is_relative_to(root) else path
            try:
                df = read_claims(path)
            except (DifstudyError, pd.errors.EmptyDataError, pd.errors.ParserError) as e:
                raise DifstudyError(f"{shown}: {e}; rerun the notebook that writes it ({', '.join(writers)})") from None
            if "run_id" not in df.columns or "notebook" not in df.columns:
                refused.append(
                    (shown, "no run_id column (written before claim rows carried their provenance)", writers)
                )
                continue
            ids = sorted(df["run_id"].astype(str).unique())
            by = [str(n) for n in dict.fromkeys(df["notebook"].fillna(""))]
            if ids and ids != [run_id]:
                hand = (
                    " (a notebook run by hand, not by `difstudy run`)"
                    if any(i.startswith("manual-") for i in ids)
                    else ""
                )
                who = ", ".join(n for n in by if n) or "unknown"
                refused.append(
                    (shown, f"run_id {', '.join(ids)}{hand}, written by {who}", [n for n in by if n] or writers)
                )
                continue
            foreign = [n for n in by if n not in writers]
            if foreign:
                raise DifstudyError(
                    f"{shown}: rows written by {foreign}, but only {writers} of the book's toc write to "
                    f"{shown.parent}; delete the file or give that notebook its own out_dir"
                )
            df["source"] = shown.as_posix()
            frames.append(df)
    if refused:
        lines = "\n".join(f"  - {f}: {why}" for f, why, _ in refused)
        notebooks = sorted({n for *_, ns in refused for n in ns}, key=lambda n: toc.index(n) if n in toc else len(toc))
        raise DifstudyError(
            f"the claims ledger takes only the claims of the current run {run_id} (params {params}); refused:\n"
            f"{lines}\n"
            f"fix: rerun {', '.join(notebooks)} with `difstudy run` in the same run as the ledger, e.g. the "
            f"whole study: `difstudy run --params {params}` (a run of some notebooks starts a new run id); "
            "or delete a file that no notebook writes any more"
        )
    extra = [c for df in frames for c in df.columns if c not in CLAIM_COLUMNS and c not in PROVENANCE_COLUMNS]
    cols = [*CLAIM_COLUMNS, *dict.fromkeys(c for c in extra if c != "source"), *PROVENANCE_COLUMNS, "source"]
    if frames:
        table = pd.concat(frames, ignore_index=True).reindex(columns=cols)
        order = {n: i for i, n in enumerate(toc)}
        table = table.sort_values("notebook", key=lambda s: s.map(order), kind="stable").reset_index(drop=True)
    else:
        table = pd.DataFrame(columns=cols)
    write_csv_atomic(table, out)
    return table


# what the ledger page shows of each row, provenance aside (the verdict next to the claim, so it
# stays in view in the text column; measure and note are in results/claims.csv)
LEDGER_COLUMNS = (
    "claim",
    "verdict",
    "estimate",
    "lo",
    "hi",
    "min_effect",
    "control",
    "n_units",
    "notebook",
)


def ledger_table(claims: pd.DataFrame) -> tuple[pd.DataFrame, dict]:
    """The ledger as its page shows it: the :data:`LEDGER_COLUMNS` of every row plus the
    :data:`PROVENANCE_COLUMNS` that differ between rows, and (second) the provenance every row
    shares, column -> value (shown once above the table)."""
    shared, varying = {}, []
    for c in PROVENANCE_COLUMNS:
        if c == "notebook" or c not in claims.columns:
            continue
        values = claims[c].fillna("").astype(str).unique()
        if len(values) == 1:
            shared[c] = values[0]
        elif len(values) > 1:
            varying.append(c)
    cols = [c for c in LEDGER_COLUMNS if c in claims.columns] + varying
    return claims[cols].reset_index(drop=True), shared


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
    from .rehearsal import run_cli

    r = sub.add_parser("run", help="execute the notebooks (papermill) and build the book")
    r.add_argument("notebooks", nargs="*", help="notebooks to execute (default: every book/_generated page of the toc)")
    r.add_argument("-p", "--params", default="ci", help="ci, full, or a YAML file")
    r.add_argument("--only", nargs="+", default=None, help="same as the positional notebooks")
    r.add_argument("--no-book", action="store_true", help="execute only, do not build the book")
    r.add_argument("--rehearse", action="store_true", help="with --params full: random-weight stand-ins on CPU")
    r.set_defaults(fn=run_cli)
    p = sub.add_parser("probe", help="run the probe benchmark tables (toy world) and write results.csv / table.md")
    p.add_argument("--params", default="ci", help="ci, full, or a YAML file with BenchConfig fields")
    p.add_argument("--out", default=None)
    p.set_defaults(fn=lambda a: probe(a.params, a.out))
