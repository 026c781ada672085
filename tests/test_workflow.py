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


def test_ci_runs_tests_then_study_then_book_check():
    text = (ROOT / ".ci" / "run").read_text()
    steps = (
        "bash scripts/test.sh",
        "bash scripts/study.sh",
        "difstudy check-book",
        "difstudy run --params full --rehearse",
    )
    order = [text.index(s) for s in steps]
    assert order == sorted(order)
    assert missing([text]) == []


def test_ci_rehearses_every_page_and_checks_its_book():
    """CI runs the whole rehearsal (no page list: every notebook of the book) and then checks the
    rehearsal's book; CI_REHEARSE is only a local shortcut."""
    text = (ROOT / ".ci" / "run").read_text()
    lines = [ln.strip() for ln in text.splitlines() if not ln.strip().startswith("#")]
    whole = ".venv/bin/difstudy run --params full --rehearse"
    assert whole in lines  # exactly this command: every page, with its book
    check = 'DIFSTUDY_ROOT="$PWD/_rehearsal" .venv/bin/difstudy check-book'
    assert check in lines and lines.index(check) > lines.index(whole)
    assert "set -euo pipefail" in text  # a failing rehearsal or check fails CI
