"""The GPU workflow cannot run here: it parses, and every command it calls exists."""

import argparse
import re
from pathlib import Path

import yaml

from difstudy.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
WORKFLOW = ROOT / ".github" / "workflows" / "gpu-study.yml"


def subcommands() -> set[str]:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return set(action.choices)


def run_commands(text: str) -> list[str]:
    wf = yaml.safe_load(text)
    return [s["run"] for job in wf["jobs"].values() for s in job.get("steps", []) if "run" in s]


def missing(commands: list[str]) -> list[str]:
    """Repository files and difstudy subcommands named by the commands that do not exist."""
    subs = subcommands()
    bad = []
    for cmd in commands:
        for path in re.findall(r"(?<![\w./-])((?:\./)?(?:scripts|\.ci|notebooks|book|tests)/[\w./-]+)", cmd):
            if not (ROOT / path).exists():
                bad.append(path)
        for sub in re.findall(r"(?:^|[\s/])difstudy\s+([a-z][\w-]*)", cmd):
            if sub not in subs:
                bad.append(f"difstudy {sub}")
    return bad


def test_gpu_workflow_parses_and_publishes_the_book():
    wf = yaml.safe_load(WORKFLOW.read_text())
    study = wf["jobs"]["study"]
    assert study["runs-on"] == ["self-hosted", "gpu"]
    uses = [s.get("uses", "") for job in wf["jobs"].values() for s in job["steps"]]
    assert any(u.startswith("actions/upload-pages-artifact@") for u in uses)
    assert any(u.startswith("actions/deploy-pages@") for u in uses)
    assert wf["permissions"]["pages"] == "write" and wf["permissions"]["id-token"] == "write"
    runs = run_commands(WORKFLOW.read_text())
    assert "PARAMS=full bash scripts/study.sh" in runs
    # the rehearsal runs first: a broken full run stops before any GPU hour is spent (issue 23)
    rehearse = next(i for i, r in enumerate(runs) if "difstudy run --params full --rehearse" in r)
    assert rehearse < runs.index("PARAMS=full bash scripts/study.sh")
    assert "check-book" in runs[rehearse] and "_rehearsal" in runs[rehearse]
    assert any("difstudy check-book" in r for r in runs)


def test_every_command_of_the_workflow_exists():
    commands = run_commands(WORKFLOW.read_text())
    assert missing(commands) == []


def test_the_check_catches_a_missing_script_or_subcommand():
    assert missing(["bash scripts/nope.sh", ".venv/bin/difstudy publish", "difstudy run --params full"]) == [
        "scripts/nope.sh",
        "difstudy publish",
    ]


def test_ci_runs_tests_then_study_and_rehearsal_then_book_checks():
    text = (ROOT / ".ci" / "run").read_text()
    code = "\n".join(ln for ln in text.splitlines() if not ln.strip().startswith("#"))
    shortcut = code.index('if [ -n "${CI_REHEARSE:-}" ]')
    whole = code[code.index("else\n", shortcut) :]  # CI's own path (CI_REHEARSE unset)
    steps = ("bash scripts/study.sh", "difstudy run --params full --rehearse >", "difstudy check-book")
    order = [whole.index(s) for s in steps]
    assert code.index("bash scripts/test.sh") < code.index("bash scripts/study.sh") and order == sorted(order)
    assert missing([text]) == []


def test_ci_rehearses_every_page_and_checks_its_book():
    """CI runs the whole rehearsal (no page list: every notebook of the book) beside the study, one
    torch thread each, waits for both, fails when either fails, and then checks both books;
    CI_REHEARSE is only a local shortcut."""
    text = (ROOT / ".ci" / "run").read_text()
    lines = [ln.strip() for ln in text.splitlines() if not ln.strip().startswith("#")]
    one = "OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 "
    study = one + 'bash scripts/study.sh >"$logs/study.log" 2>&1 &'
    whole = one + '.venv/bin/difstudy run --params full --rehearse >"$logs/rehearsal.log" 2>&1 &'
    assert study in lines and whole in lines  # exactly these commands: every page, with its book
    waits = ['wait "$study_pid" || study_rc=$?', 'wait "$rehearsal_pid" || rehearsal_rc=$?']
    assert all(w in lines and lines.index(w) > lines.index(whole) for w in waits)
    fail = 'if [ "$study_rc" != 0 ] || [ "$rehearsal_rc" != 0 ]; then'
    assert fail in lines and lines[lines.index(fail) + 2] == "exit 1"
    check = 'DIFSTUDY_ROOT="$PWD/_rehearsal" .venv/bin/difstudy check-book'
    assert check in lines and lines.index(check) > lines.index(fail)
    assert ".venv/bin/difstudy check-book" in lines[lines.index(fail) :]  # the study's own book check
    assert "set -euo pipefail" in text  # a failing rehearsal or check fails CI
