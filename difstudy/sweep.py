"""Parameter sweeps of a notebook: ``difstudy sweep NOTEBOOK --grid grid.yaml [--params ci] [--out DIR]``.

**The grid** is a YAML mapping of notebook parameters to lists of values; the
sweep runs their cartesian product (keys in file order). A scalar is a fixed
value; a parameter whose value is itself a list is written as a list of lists::

    model: [mini, tiny-sd15]
    t: [25, 50, 100]
    acts: [[mid-vit-out], [up-level1-repeat1-vit-out, up-level2-repeat1-vit-out]]

Every other parameter comes from ``--params`` (``ci``/``full``: the YAML beside
the notebook, or a YAML file), else the notebook's defaults.

**The convention.** The notebook declares an ``out_dir`` parameter and writes
its tidy results to ``{out_dir}/results.csv`` (:func:`difstudy.study.write_results`).
The sweep sets ``out_dir`` to the grid point's own folder. Before any point runs,
a notebook that cannot be swept is refused with the reason and the fix
(:func:`why_not_sweepable`, read from its source, nothing executed): one whose
metadata declares it not sweepable (``"difstudy": {"not_sweepable": "<why>"}``,
for pages that measure nothing), one without an ``out_dir`` parameter, or one in
which no cell calls ``write_results`` with the default file name into a folder made
from ``out_dir`` (:func:`results_writes`). A malformed grid
file is refused with its file, line and what was expected (:func:`read_grid_file`).

**Layout of DIR** (one folder per grid point, named from its values plus a
hash of them, so the same point keeps its folder when the grid grows)::

    points/<point>/params.json          the point's parameters
    points/<point>/notebook.ipynb       the executed notebook
    points/<point>/results.csv          the point's tidy results (written by the notebook)
    points/<point>/notebook.failed.ipynb  only after a failure: the traceback
    points/<point>/job.json             submitit executors: the point's job id and stderr log
    jobs/           submitit executors: sbatch scripts, pickled calls, results and logs of the jobs
    results.csv     every finished point's rows, the grid's values added as columns (plus ``point``)
    failures.csv    the points that failed in this run: point, notebook, error, log (the job's stderr)
    summary.png     mean of the metric per grid point

**Resume.** A point is finished when both its executed notebook and its
``results.csv`` exist; the notebook is renamed into place only after its last
cell ran, so a crash or a failing cell never leaves a finished-looking point.
Finished points are skipped; failed ones run again next time.

**Failures** of one point (a failing cell, a missing ``results.csv``) are listed
with the point's notebook and error while the other points run; the command
then exits non-zero.

**Executors** (``--executor``): ``local`` runs the points one after another in
this process; ``submitit-local`` and ``slurm`` submit one job per unfinished
point through submitit (on Slurm: one job array, one task per point) and wait
for them, so the same resume rule, table and failure list apply. Job
resources come from a ``slurm:`` section of the grid file (not a parameter)
and CLI flags, which win (:class:`difstudy.scaleout.JobConfig`)::

    slurm: {partition: gpu, time: "2:00:00", gpus: 1, cpus: 8, parallelism: 16}

submitit keeps each job's script, pickles and logs in ``DIR/jobs/``; a failed
point is listed with its job's stderr log. A job takes a lock on its point
folder and skips a point found finished, so a resubmission while old jobs
still run never runs a point twice at once.
"""

from __future__ import annotations

import ast
import hashlib
import itertools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import yaml

from .errors import DifstudyError, closest
from .fileio import atomic_write, write_csv_atomic
from .scaleout import EXECUTORS, JobConfig, make_executor
from .study import ROOT, declared_parameters, read_params, run_notebook


@dataclass(frozen=True)
class Point:
    """One grid point: its folder name and the grid's values for it."""

    id: str
    values: dict = field(hash=False)


@dataclass(frozen=True)
class Failure:
    point: str
    notebook: Path
    error: str
    log: Path | None = None  # the job's stderr (submitit executors)


@dataclass(frozen=True)
class SweepReport:
    out: Path
    points: tuple[Point, ...]
    ran: tuple[str, ...]
    skipped: tuple[str, ...]
    failed: tuple[Failure, ...]
    table: Path | None
    figure: Path | None

    @property
    def ok(self) -> bool:
        return not self.failed


JOB_SECTION = "slurm"  # the grid file's section of job resources (not a parameter)


GRID_EXAMPLE = "t: [25, 50]"  # shown in every message about a malformed grid file


def read_grid_file(path: str | Path) -> tuple[dict, dict[str, int]]:
    """A grid file's top-level mapping and the line (from 1) of each key; every malformed file is
    refused with a :class:`DifstudyError` naming the file, the line and what was expected."""
    path = Path(path)
    expected = f"a grid file is a YAML mapping of parameter names to lists of values, e.g. `{GRID_EXAMPLE}`"
    if not path.is_file():
        raise DifstudyError(f"grid file {path} not found; {expected}")
    text = path.read_text()
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise DifstudyError(_yaml_error(path, text, e, expected)) from None
    if node is None or data is None:
        raise DifstudyError(f"grid file {path} is empty (or only comments); {expected}")
    if not isinstance(node, yaml.MappingNode) or not isinstance(data, dict):
        kind = {list: "a list", str: "a single value"}.get(type(data), f"a single {type(data).__name__}")
        raise DifstudyError(f"grid file {path}, line {node.start_mark.line + 1}: got {kind}; {expected}")
    lines: dict[str, int] = {}
    for key, _ in node.value:
        name, line = str(key.value), key.start_mark.line + 1
        if name in lines:
            raise DifstudyError(
                f"grid file {path}, line {line}: parameter {name!r} appears twice (lines {lines[name]} and {line}); "
                f"YAML would keep only the last: give all its values in one list, `{name}: [..., ...]`"
            )
        lines[name] = line
    return data, lines


def _yaml_error(path: Path, text: str, e: yaml.YAMLError, expected: str) -> str:
    """PyYAML's error as one message: file, line and column, the problem, the line itself."""
    mark, ctx = getattr(e, "problem_mark", None), getattr(e, "context_mark", None)
    mark = mark or ctx
    if mark is None:
        return f"grid file {path} is not valid YAML ({e}); {expected}"
    msg = f"grid file {path}, line {mark.line + 1}, column {mark.column + 1}: {getattr(e, 'problem', None) or e}"
    context = getattr(e, "context", None)
    if context and ctx is not None and ctx is not mark:
        msg += f" ({context} that starts at line {ctx.line + 1}, column {ctx.column + 1})"
    lines = text.splitlines()
    for m in sorted({x.line for x in (mark, ctx) if x is not None and x.line < len(lines)}):
        msg += f"\n  {m + 1} | {lines[m]}"
    return f"{msg}\n{expected}"


def load_grid(grid: str | Path | dict) -> dict[str, list]:
    """The grid as ``{parameter: [values]}`` (a YAML file or a dict); scalars become one-value lists."""
    where = {}
    if not isinstance(grid, dict):
        path = Path(grid)
        grid, lines = read_grid_file(path)
        where = {k: f"grid file {path}, line {n}: " for k, n in lines.items()}
    out = {}
    for k, v in grid.items():
        if k == JOB_SECTION:  # job resources, not a parameter: see load_job_config
            continue
        values = v if isinstance(v, list) else [v]
        if not values:
            raise DifstudyError(
                f"{where.get(str(k), '')}grid parameter {k!r} has an empty list of values; give at least one, "
                f"`{k}: [...]`"
            )
        out[str(k)] = values
    return out


def load_job_config(grid: str | Path | dict) -> JobConfig:
    """The job resources of the grid file's ``slurm:`` section (defaults without one)."""
    if not isinstance(grid, dict):
        grid = read_grid_file(grid)[0]
    section = (grid or {}).get(JOB_SECTION) or {}
    if not isinstance(section, dict):
        raise DifstudyError(f"the grid's {JOB_SECTION}: section must be a mapping, e.g. `slurm: {{partition: gpu}}`")
    return JobConfig.from_dict(section)


def _short(v) -> str:
    if isinstance(v, (list, tuple)):
        return "+".join(_short(x) for x in v)
    return str(v)


def point_id(values: dict) -> str:
    """Readable, filesystem-safe and unique: ``t=50_model=mini-1a2b3c4d``."""
    readable = "_".join(f"{k}={_short(v)}" for k, v in values.items())
    readable = re.sub(r"[^A-Za-z0-9.=+_-]", "-", readable)[:60].strip("-_")
    digest = hashlib.sha1(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()[:8]
    return f"{readable}-{digest}"


def grid_points(grid: dict[str, list]) -> list[Point]:
    """The cartesian product of ``grid`` (first key varies slowest), each point with its :func:`point_id`."""
    keys = list(grid)
    points = [dict(zip(keys, combo)) for combo in itertools.product(*(grid[k] for k in keys))]
    return [Point(point_id(p), p) for p in points]


def resolve_notebook(notebook: str | Path, root: Path = ROOT) -> Path:
    """A path to an ``.ipynb``, or a study notebook's name (``notebooks/<name>.ipynb``)."""
    path = Path(notebook)
    if path.suffix == ".ipynb" and path.exists():
        return path
    named = root / "notebooks" / f"{notebook}.ipynb"
    if named.exists():
        return named
    available = sorted(p.stem for p in (root / "notebooks").glob("*.ipynb"))
    raise DifstudyError(f"notebook {notebook!r} not found: give a .ipynb path or one of {available}")


NOT_SWEEPABLE = "not_sweepable"  # notebook metadata difstudy.not_sweepable: why a page cannot be swept


def _code_trees(nb) -> list[ast.Module]:
    """The parsed code cells of ``nb`` (IPython magics and shell lines left out; a cell that still
    does not parse is skipped)."""
    trees = []
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        source = "\n".join(ln for ln in cell.source.splitlines() if not ln.lstrip().startswith(("%", "!")))
        try:
            trees.append(ast.parse(source))
        except SyntaxError:
            continue
    return trees


def _names(node) -> set[str]:
    return {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}


def results_writes(nb) -> tuple[int, int]:
    """``(calls, into_out_dir)``: how many calls in ``nb``'s code write ``results.csv`` with
    :func:`difstudy.study.write_results` (imported from ``difstudy.study`` under any name, or
    called as ``<module>.write_results``; no ``name`` or ``name="results.csv"``), and how many
    of them write into a folder made from the ``out_dir`` parameter (``out_dir`` itself or a
    variable assigned from it, e.g. ``out = Path(out_dir)``).

    Decided from the source alone, nothing runs: a call in a branch that never runs still counts,
    which the sweep's check after each point catches."""
    trees = _code_trees(nb)
    imported: set[str] = set()
    assigns: list[tuple[set[str], set[str]]] = []  # (targets, names the value reads)
    calls: list[ast.Call] = []
    for tree in trees:
        for n in ast.walk(tree):
            if isinstance(n, ast.ImportFrom) and n.module == "difstudy.study":
                imported |= {a.asname or a.name for a in n.names if a.name == "write_results"}
            elif isinstance(n, (ast.Assign, ast.AnnAssign, ast.AugAssign, ast.NamedExpr)):
                targets = n.targets if isinstance(n, ast.Assign) else [n.target]
                assigns.append((set().union(*(_names(t) for t in targets)), _names(n.value) if n.value else set()))
            elif isinstance(n, ast.Call):
                calls.append(n)
    derived, grown = {"out_dir"}, True
    while grown:  # every variable computed from out_dir, however indirectly
        grown = False
        for targets, reads in assigns:
            if reads & derived and not targets <= derived:
                derived |= targets
                grown = True
    writes = 0
    into = 0
    for c in calls:
        f = c.func
        if not (
            (isinstance(f, ast.Name) and f.id in imported)
            or (isinstance(f, ast.Attribute) and f.attr == "write_results")
        ):
            continue
        name = c.args[2] if len(c.args) > 2 else next((k.value for k in c.keywords if k.arg == "name"), None)
        if isinstance(name, ast.Constant) and name.value != "results.csv":
            continue  # another table beside results.csv
        writes += 1
        folder = c.args[1] if len(c.args) > 1 else next((k.value for k in c.keywords if k.arg == "out_dir"), None)
        into += folder is not None and bool(_names(folder) & derived)
    return writes, into


def why_not_sweepable(nb_path: Path) -> str | None:
    """Why ``nb_path`` cannot be swept, or None: a page declared not sweepable (notebook metadata
    ``difstudy.not_sweepable``: the reason; the notebooks beside it that can be swept are named),
    no ``out_dir`` parameter, or no call of :func:`difstudy.study.write_results` into a folder made
    from it (:func:`results_writes`). Each reason ends with the fix."""
    nb_path = Path(nb_path)
    nb = _read(nb_path)
    declared = _declared(nb)
    if declared:
        others = [p for p in sorted(nb_path.parent.glob("*.ipynb")) if p != nb_path]
        sweepable = [p.stem for p in others if not _declared(_read(p)) and _source_problem(_read(p), p) is None]
        return (
            f"it is declared not sweepable (its metadata difstudy.{NOT_SWEEPABLE}): {declared}; "
            f"notebooks beside it that can be swept: {', '.join(sweepable) or 'none'}"
        )
    return _source_problem(nb, nb_path)


def _read(nb_path: Path):
    import nbformat

    return nbformat.read(nb_path, as_version=4)


def _declared(nb) -> str | None:
    return (nb.metadata.get("difstudy") or {}).get(NOT_SWEEPABLE)


def _source_problem(nb, nb_path: Path) -> str | None:
    """What in the notebook's source keeps a sweep from collecting its results (None: nothing)."""
    if "out_dir" not in declared_parameters(nb):
        return (
            "it declares no out_dir parameter; the sweep gives each grid point its own folder through "
            f'it: add `out_dir = "results/{nb_path.stem}"` to the parameters cell and write '
            "{out_dir}/results.csv with difstudy.study.write_results"
        )
    writes, into_out_dir = results_writes(nb)
    if not writes:
        return (
            "no cell calls difstudy.study.write_results(df, out_dir), so no grid point would write the "
            "results.csv the sweep collects. Fix: write the notebook's tidy results (one row per observation) "
            "with `from difstudy.study import write_results` and `write_results(df, out_dir)` (default file "
            "name results.csv)"
        )
    if not into_out_dir:
        return (
            "it calls difstudy.study.write_results, but never into a folder made from its out_dir parameter, "
            "so the grid points would not write into their own folders. Fix: pass out_dir (or a path made "
            "from it, e.g. `out = Path(out_dir)`) as write_results' folder"
        )
    return None


def check_sweepable(nb_path: Path) -> None:
    """Refuse, before any grid point runs, a notebook that cannot be swept (:func:`why_not_sweepable`)."""
    why = why_not_sweepable(nb_path)
    if why is not None:
        raise DifstudyError(f"{nb_path} cannot be swept: {why}")


def check_parameters(nb_path: Path, grid: dict, base: dict) -> None:
    """The grid and base parameters must be parameters the notebook declares."""
    import nbformat

    declared = declared_parameters(nbformat.read(nb_path, as_version=4))
    for k in [*grid, *base]:
        if k not in declared:
            raise DifstudyError(
                f"{k!r} is not a parameter of {nb_path}; closest: {closest(k, declared) or sorted(declared)}"
            )


def is_finished(point_dir: Path) -> bool:
    return (point_dir / "notebook.ipynb").exists() and (point_dir / "results.csv").exists()


def run_point(nb_path: Path, point_dir: Path, values: dict, root: Path) -> tuple[str, str]:
    """Run one grid point (here or in a submitit job): ``("ran" | "skipped" | "failed", error)``.

    Holds a lock on the point folder; a point found finished is skipped."""
    from filelock import FileLock

    d = Path(point_dir)
    d.mkdir(parents=True, exist_ok=True)
    with FileLock(str(d / ".point.lock")):
        if is_finished(d):
            return "skipped", ""
        (d / "params.json").write_text(json.dumps(values, indent=2, default=str))
        try:
            run_notebook(nb_path, d / "notebook.ipynb", values, cwd=root, failed=d / "notebook.failed.ipynb")
            if not (d / "results.csv").exists():
                (d / "notebook.ipynb").replace(d / "notebook.failed.ipynb")
                raise DifstudyError(
                    f"the notebook ran but wrote no {d / 'results.csv'}; "
                    "write it with difstudy.study.write_results(df, out_dir)"
                )
        except Exception as e:  # one point's failure must not stop the others
            return "failed", str(e) if isinstance(e, DifstudyError) else f"{type(e).__name__}: {e}"
    return "ran", ""


def _failure(point: Point, d: Path, error: str, log: Path | None = None) -> Failure:
    kept = d / "notebook.failed.ipynb"
    return Failure(point.id, kept if kept.exists() else d, error, log)


def _run_local(nb_path, jobs: list[tuple[Point, Path, dict]], root, bar) -> list[tuple[Point, str, Failure | None]]:
    done = []
    for p, d, values in jobs:
        bar.set_postfix_str(p.id[:40])
        state, error = run_point(nb_path, d, values, root)
        done.append((p, state, _failure(p, d, error) if state == "failed" else None))
        bar.update(1)
    return done


def submit_points(executor, nb_path: Path, jobs: list[tuple[Point, Path, dict]], root: Path) -> list:
    """One submitit job per point (a job array on Slurm); returns the jobs, not waiting for them."""
    if not jobs:
        return []
    n = len(jobs)
    return executor.map_array(run_point, [nb_path] * n, [d for _, d, _ in jobs], [v for _, _, v in jobs], [root] * n)


def _run_submitit(executor, nb_path, jobs, root, bar) -> list[tuple[Point, str, Failure | None]]:
    from submitit.helpers import as_completed

    submitted = submit_points(executor, nb_path, jobs, root)
    if submitted:
        first = submitted[0].job_id.split("_")[0]
        print(f"[difstudy sweep] submitted {len(submitted)} job(s) ({first}...); logs in {executor.folder}", flush=True)
    which = {id(j): item for j, item in zip(submitted, jobs)}
    for job, (_, d, _) in zip(submitted, jobs):
        (d / "job.json").write_text(json.dumps(dict(job_id=job.job_id, stderr=str(job.paths.stderr))))
    done = []
    for job in as_completed(submitted, poll_frequency=1):
        p, d, _ = which[id(job)]
        try:
            state, error = job.result()
        except Exception as e:  # the job itself died: killed, timed out, node failure
            lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
            state, error = "failed", f"job {job.job_id} failed: " + "\n".join(lines[-3:])
        log = job.paths.stderr if state == "failed" else None
        done.append((p, state, _failure(p, d, error, log) if state == "failed" else None))
        bar.update(1)
    return done


def sweep(
    notebook: str | Path,
    grid: str | Path | dict,
    params: str | None = None,
    out: str | Path | None = None,
    metric: str | None = None,
    root: Path = ROOT,
    progress: bool = True,
    executor: str = "local",
    job: JobConfig | None = None,
) -> SweepReport:
    """Run every grid point not yet finished, collect the results; see the module docstring.

    ``executor``: ``local``, ``submitit-local`` or ``slurm``; ``job``: the jobs' resources
    (default: the grid file's ``slurm:`` section)."""
    from tqdm.auto import tqdm

    if executor not in EXECUTORS:
        raise DifstudyError(f"unknown executor {executor!r}; use one of {list(EXECUTORS)}")
    nb_path = resolve_notebook(notebook, root)
    check_sweepable(nb_path)
    job = job if job is not None else load_job_config(grid)
    grid = load_grid(grid)
    base = read_params(nb_path, params) if params else {}
    check_parameters(nb_path, grid, base)
    out = Path(out) if out is not None else root / "results" / "sweeps" / nb_path.stem
    points = grid_points(grid)
    todo = [p for p in points if not is_finished(out / "points" / p.id)]
    skipped = tuple(p.id for p in points if p not in todo)
    jobs = []
    for p in todo:
        d = (out / "points" / p.id).resolve()
        d.mkdir(parents=True, exist_ok=True)
        jobs.append((p, d, {**base, **p.values, "out_dir": str(d)}))
    bar = tqdm(
        total=len(points), initial=len(skipped), desc=f"sweep {nb_path.stem}", unit="point", disable=not progress
    )
    if executor == "local":
        done = _run_local(nb_path, jobs, root, bar)
    else:
        folder = (out / "jobs").resolve()
        done = _run_submitit(make_executor(executor, folder, job), nb_path.resolve(), jobs, root.resolve(), bar)
    bar.close()
    order = {p.id: i for i, p in enumerate(points)}
    done.sort(key=lambda r: order[r[0].id])
    ran = [p.id for p, state, _ in done if state == "ran"]
    skipped += tuple(p.id for p, state, _ in done if state == "skipped")  # finished by another job meanwhile
    failed = [f for _, _, f in done if f is not None]
    table = collect(out, points)
    figure = None
    if table is not None:
        figure = out / "summary.png"
        save_summary(pd.read_csv(table), list(grid), figure, metric, title=f"Sweep of {nb_path.stem}")
    rows = [dict(point=f.point, notebook=str(f.notebook), error=f.error, log=str(f.log or "")) for f in failed]
    fail_df = pd.DataFrame(rows, columns=["point", "notebook", "error", "log"])
    write_csv_atomic(fail_df, out / "failures.csv")
    return SweepReport(out, tuple(points), tuple(ran), skipped, tuple(failed), table, figure)


def collect(out: Path, points: list[Point]) -> Path | None:
    """``out/results.csv``: the finished points' rows with ``point`` and the grid's values as columns."""
    frames = []
    for p in points:
        d = out / "points" / p.id
        if not is_finished(d):
            continue
        df = pd.read_csv(d / "results.csv")
        for k, v in p.values.items():  # the grid value wins over a column of the same name
            df[k] = ", ".join(map(str, v)) if isinstance(v, (list, tuple)) else v
        df.insert(0, "point", p.id)
        frames.append(df)
    if not frames:
        return None
    return write_csv_atomic(pd.concat(frames, ignore_index=True), out / "results.csv")


def pick_metric(df: pd.DataFrame, keys: list[str], metric: str | None = None) -> str:
    """``metric`` if given, else ``value``, else the first numeric column that is not a grid key."""
    if metric is not None:
        if metric not in df.columns:
            raise DifstudyError(f"metric {metric!r} is not a column of the results; columns: {list(df.columns)}")
        return metric
    if "value" in df.columns:
        return "value"
    numeric = [c for c in df.select_dtypes("number").columns if c not in keys and c not in ("seed", "point")]
    if not numeric:
        raise DifstudyError(f"the results have no numeric column to plot; columns: {list(df.columns)}")
    return numeric[0]


def plot_sweep(df: pd.DataFrame, keys: list[str], metric: str, ax=None, title: str = "Sweep"):
    """Mean +- std of ``metric`` per grid point: the first varying key on x, one line per other combination."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(7, 4))
    varying = [k for k in keys if df[k].nunique() > 1] or keys[:1]
    x, rest = varying[0], varying[1:]
    stats = df.groupby([*rest, x], sort=False)[metric].agg(["mean", "std"]).reset_index()
    groups = stats.groupby(rest, sort=False) if rest else [((), stats)]
    for name, g in groups:
        name = name if isinstance(name, tuple) else (name,)
        label = ", ".join(f"{k}={v}" for k, v in zip(rest, name)) or metric
        ax.errorbar(g[x].astype(str), g["mean"], yerr=g["std"].fillna(0), marker="o", capsize=3, label=label)
    ax.set_xlabel(x)
    ax.set_ylabel(f"{metric} (mean +- std over rows)")
    ax.set_title(title)
    if rest:
        ax.legend(fontsize="small")
    return ax


def save_summary(df: pd.DataFrame, keys: list[str], path: Path, metric: str | None = None, title: str = "") -> Path:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    m = pick_metric(df, keys, metric)
    ax = plot_sweep(df, keys, m, title=f"{title}: {m} per grid point")
    ax.figure.tight_layout()
    try:
        return atomic_write(path, lambda f: ax.figure.savefig(f, format="png", dpi=100))
    finally:
        plt.close(ax.figure)


def _cli(a) -> None:
    job = load_job_config(a.grid).updated(partition=a.partition, time=a.time, gpus=a.gpus)
    report = sweep(
        a.notebook, a.grid, a.params, a.out, a.metric, progress=not a.no_progress, executor=a.executor, job=job
    )
    print(
        f"[difstudy sweep] {len(report.points)} points: {len(report.ran)} ran, {len(report.skipped)} skipped "
        f"(finished before), {len(report.failed)} failed"
    )
    if report.table:
        print(f"[difstudy sweep] results: {report.table}\n[difstudy sweep] figure: {report.figure}")
    if report.failed:
        lines = [
            f"  {f.point}:\n    " + f.error.replace("\n", "\n    ") + (f"\n    log: {f.log}" if f.log else "")
            for f in report.failed
        ]
        raise DifstudyError(f"{len(report.failed)} of {len(report.points)} grid points failed:\n" + "\n".join(lines))


def add_cli(sub) -> None:
    s = sub.add_parser("sweep", help="run a notebook over a parameter grid (papermill), resumable; one tidy table")
    s.add_argument("notebook", help="a study notebook's name (notebooks/<name>.ipynb) or a .ipynb path")
    s.add_argument("--grid", required=True, help="YAML mapping parameter -> list of values (cartesian product)")
    s.add_argument("--params", default=None, help="base parameters: ci, full or a YAML file (default: notebook's)")
    s.add_argument("--out", default=None, help="output folder (default: results/sweeps/<notebook>)")
    s.add_argument("--metric", default=None, help="results column for summary.png (default: value or first numeric)")
    s.add_argument("--no-progress", action="store_true", help="no progress bar")
    s.add_argument(
        "--executor",
        choices=list(EXECUTORS),
        default="local",
        help="local: here, one point after another; submitit-local: one local process per point; "
        "slurm: one Slurm job-array task per point (submitit)",
    )
    s.add_argument("--partition", default=None, help="Slurm partition (overrides the grid's slurm: section)")
    s.add_argument("--time", default=None, help="time limit per point: minutes or HH:MM:SS (default 60 min)")
    s.add_argument("--gpus", type=int, default=None, help="GPUs per point (Slurm; default 0)")
    s.set_defaults(fn=_cli)
