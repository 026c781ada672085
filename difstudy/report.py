"""The README's measured numbers, generated from runs: ``difstudy report``.

Three sources, each written by the command that measures it:

- ``results/times.csv`` and ``results/run.json``: :func:`difstudy.study.run` (README command A);
- ``results/tests.json``: the test command (README command B; ``tests/conftest.py`` writes it at
  the end of a pytest session over the whole suite);
- ``results/bench/bench.csv``: ``difstudy bench --quick --out results/bench/bench.csv``;
- ``results/bench/bench-cuda.csv``: ``difstudy bench --device cuda [--quick] --out results/bench/bench-cuda.csv``
  on a GPU machine (the README's GPU ratios, beside the CPU ones).

``difstudy report --update`` reads whichever of them exist into the committed
``report/measured.json`` (a section is replaced only by a newer, complete measurement: a study run
whose notebooks did not all finish, or a test session over a selection of tests, is refused with the
reason) and rewrites the README's generated blocks, which sit between
``<!-- report:NAME -->`` and ``<!-- /report:NAME -->``. ``difstudy report --check`` exits non-zero
when the README disagrees with ``report/measured.json``; a test runs the same check, so a number
edited by hand in a generated block fails the tests.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pandas as pd

from .errors import DifstudyError
from .fileio import write_text_atomic
from .study import ROOT

MEASURED = Path("report") / "measured.json"
README = Path("README.md")
SECTIONS = ("study", "tests", "bench", "gpu")
BLOCK = re.compile(r"(<!-- report:(?P<name>[a-z]+) -->\n)(?P<body>.*?)(<!-- /report:(?P=name) -->)", re.S)


# -- reading the runs' outputs -------------------------------------------------------------
def run_times(times: pd.DataFrame, run: dict, carried: tuple[str, ...] = ()) -> pd.DataFrame:
    """The rows of ``times`` that ``run`` (a :func:`read_run` record) wrote: by ``run_id``, or, in a
    ``times.csv`` of an older difstudy without that column, by the run's params and start. Rows of
    the ``carried`` notebooks at the run's params are kept whatever their run (the performance
    page runs before its own row and the book build's are written, so it shows the previous ones)."""
    if "run_id" in times.columns and times["run_id"].notna().any():
        mine = times["run_id"] == run["run_id"]
    else:
        mine = (times["params"] == run["params"]) & (times["finished"] >= run["started"])
    carried_rows = times["notebook"].isin(list(carried)) & (times["params"] == run["params"])
    return times[mine | carried_rows]


def study_section(results: str | os.PathLike) -> dict:
    """The latest study run in ``results`` (``times.csv`` rows of the run recorded in ``run.json``).

    Only that run's rows count (rows of other runs or other parameter sets are left out, and
    their number is kept as ``rows_left_out``). Raises when the run is incomplete: a notebook
    of the run failed or has no row, or the book build failed."""
    from .study import read_run, read_times

    results = Path(results)
    run = read_run(results / "run.json")
    if run is None:
        raise DifstudyError(f"no study run recorded in {results / 'run.json'}; run `bash scripts/study.sh` first")
    times = read_times(results / "times.csv")
    mine = run_times(times, run)
    expected = [*run["notebooks"], "(book build)"]
    missing = [n for n in expected if n not in set(mine["notebook"])]
    failed = mine[mine["status"] != "ok"]["notebook"].tolist()
    if missing or failed:
        raise DifstudyError(
            f"the study run {run['run_id']} in {results} is incomplete (no time for {missing}, failed: {failed}); "
            "run the whole study (`bash scripts/study.sh`) and update the report again"
        )
    mine = mine.set_index("notebook").loc[expected]
    return dict(
        run_id=run["run_id"],
        commit=run["commit"],
        params=run["params"],
        started=run["started"],
        cpus=run.get("cpus"),
        seconds={n: float(s) for n, s in mine["seconds"].items()},
        total_minutes=round(float(mine["seconds"].sum()) / 60, 1),
        rows_left_out=int(len(times) - len(mine)),
    )


def tests_section(results: str | os.PathLike) -> dict:
    """The last whole-suite test session (``results/tests.json``); refused when it had failures
    or ran a selection of the tests only."""
    path = Path(results) / "tests.json"
    if not path.exists():
        raise DifstudyError(f"no test session recorded at {path}; run `bash scripts/test.sh` first")
    rec = json.loads(path.read_text())
    if rec.get("selection"):
        raise DifstudyError(f"{path} records a selection of the tests ({rec['selection']}); run the whole suite")
    if rec.get("failed", 0) or rec.get("error", 0):
        raise DifstudyError(f"{path} records {rec.get('failed', 0)} failed and {rec.get('error', 0)} errors")
    return rec


def bench_section(results: str | os.PathLike, name: str = "bench.csv") -> dict:
    """The ratios of the last ``difstudy bench`` run (``results/bench/<name>``) with goals and status."""
    path = Path(results) / "bench" / name
    if not path.exists():
        how = "--device cuda --quick" if "cuda" in name else "--quick"
        raise DifstudyError(f"no benchmark at {path}; run `difstudy bench {how} --out {path}` on a quiet machine")
    df = pd.read_csv(path)
    ratios = df[df["section"] == "ratio"]
    if ratios.empty:
        raise DifstudyError(f"{path} has no ratio rows; it is not the output of `difstudy bench --out`")
    rows = [
        dict(case=r.case, what=r.what, value=round(float(r.value), 2), goal=str(r.goal), status=str(r.status))
        for r in ratios.itertuples()
    ]
    times = df[df["section"] == "time"] if "per_item_s" in df.columns else df.iloc[:0]
    per_item = {r.case: float(r.per_item_s) for r in times.itertuples() if pd.notna(r.per_item_s)}
    first = df.iloc[0]
    keys = ("commit", "cpus", "load_at_start", "total_s", "cfg_quick", "cfg_device", "cfg_dtype", "device_name")
    meta = {k: first[k] for k in keys if k in df.columns}
    meta = {k: (v.item() if hasattr(v, "item") else v) for k, v in meta.items()}
    return dict(ratios=rows, per_item_s=per_item, **meta)


def gpu_section(results: str | os.PathLike) -> dict:
    """The ratios of the last ``difstudy bench --device cuda`` run (``results/bench/bench-cuda.csv``)."""
    return bench_section(results, "bench-cuda.csv")


READERS = dict(study=study_section, tests=tests_section, bench=bench_section, gpu=gpu_section)


# -- the committed report and the README ---------------------------------------------------
def read_measured(path: str | os.PathLike | None = None) -> dict:
    path = Path(path) if path is not None else ROOT / MEASURED
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DifstudyError(f"{path} is not valid JSON ({e}); restore it with `git checkout {MEASURED}`") from e


def update_measured(results: str | os.PathLike, measured: dict, sections=SECTIONS, log=print) -> dict:
    """``measured`` with each of ``sections`` replaced by what ``results`` holds (sections that
    cannot be read are kept as they were, with the reason logged)."""
    out = dict(measured)
    for name in sections:
        try:
            out[name] = READERS[name](results)
            log(f"[difstudy report] {name}: updated from {results}")
        except DifstudyError as e:
            log(f"[difstudy report] {name}: kept as it was ({e})")
    return out


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f}"


def render(name: str, measured: dict) -> str:
    """The README block ``name`` (markdown) from ``measured``."""
    sec = measured.get(name)
    if not sec:
        return f"*Not measured yet: run the command, then `difstudy report --update` ({name}).*\n"
    if name == "study":
        per = sorted(((s, n) for n, s in sec["seconds"].items()), reverse=True)
        parts = ", ".join(f"{n} {_minutes(s)}" for s, n in per if s >= 60)
        rest = [n for s, n in per if s < 60]
        cores = f"{sec['cpus']} cores, " if sec.get("cpus") else ""
        return (
            f"Measured at commit `{sec['commit']}` ({sec['params']} parameters, run `{sec['run_id']}`, "
            f"{cores}setup excluded): the study took **{sec['total_minutes']} min**: "
            f"{parts} min, and {len(rest)} more steps under a minute each.\n"
        )
    if name == "tests":
        kinds = ", ".join(f"{sec[k]} {k}" for k in ("passed", "skipped", "xfailed", "xpassed") if sec.get(k))
        return (
            f"Measured at commit `{sec['commit']}` ({sec['cpus']} cores): the test command (setup excluded) "
            f'ran {kinds} in **{_minutes(sec["seconds"])} min**; `-m "not slow"` skips the '
            f"{sec.get('slow', 0)} tests marked slow.\n"
        )
    if name in ("bench", "gpu"):
        quick = " --quick" if str(sec.get("cfg_quick")) == "True" else ""
        where = f"{sec.get('cpus', '?')} cores"
        if name == "gpu":
            quick = f" --device {sec.get('cfg_device', 'cuda')}{quick}"
            gpu = sec.get("device_name") or "one GPU"
            where = f"{gpu}, {sec.get('cfg_dtype', '?')}, {sec.get('cpus', '?')} host cores"
        head = (
            f"`difstudy bench{quick}` at commit `{sec.get('commit', 'unknown')}` ({where}, "
            f"load average {sec.get('load_at_start', float('nan')):.2f} at start, {sec.get('total_s', 0):.0f} s)"
        )
        lines = [head + ":\n", "| ratio | value | goal | status |", "|---|---|---|---|"]
        lines += [f"| {r['what']} | {r['value']:.2f} | {r['goal']} | {r['status']} |" for r in sec["ratios"]]
        return "\n".join(lines) + "\n"
    raise DifstudyError(f"unknown report block {name!r}; the blocks are {list(SECTIONS)}")


def render_readme(text: str, measured: dict) -> str:
    """``text`` with every generated block rendered anew."""
    return BLOCK.sub(lambda m: m.group(1) + render(m.group("name"), measured) + m.group(4), text)


def check_readme(readme: str | os.PathLike | None = None, measured: dict | None = None) -> list[str]:
    """The generated blocks of the README that disagree with ``report/measured.json`` (empty: all agree)."""
    readme = Path(readme) if readme is not None else ROOT / README
    measured = read_measured() if measured is None else measured
    text = readme.read_text()
    found = {m.group("name"): m.group("body") for m in BLOCK.finditer(text)}
    return [name for name, body in found.items() if body != render(name, measured)]


def main(update: bool = False, check: bool = False, results: str = "results", root: Path = ROOT) -> int:
    path, readme = root / MEASURED, root / README
    measured = read_measured(path)
    if update:
        measured = update_measured(results, measured)
        write_text_atomic(path, json.dumps(measured, indent=2, sort_keys=True) + "\n")
        write_text_atomic(readme, render_readme(readme.read_text(), measured))
        print(f"[difstudy report] wrote {path} and the README's generated blocks")
    stale = check_readme(readme, measured)
    if stale:
        print(f"[difstudy report] the README's blocks {stale} disagree with {path}; run `difstudy report --update`")
        return 1 if check else 0
    if not update:
        for name in SECTIONS:
            print(render(name, measured))
    return 0


def _cli(a) -> None:
    import sys

    code = main(update=a.update, check=a.check, results=a.results)
    if code:
        sys.exit(code)


def add_cli(sub) -> None:
    p = sub.add_parser(
        "report",
        help="the README's measured numbers: print them, --update them from results/, --check the README",
        description=__doc__.split("\n\n")[0],
    )
    p.add_argument("--update", action="store_true", help=f"read the runs in --results into {MEASURED} and the README")
    p.add_argument("--check", action="store_true", help=f"exit 1 when the README disagrees with {MEASURED}")
    p.add_argument("--results", default="results", help="the folder the runs wrote (default: results)")
    p.set_defaults(fn=_cli)
