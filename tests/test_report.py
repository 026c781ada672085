"""The README's measured numbers come from runs (`difstudy report`), and a hand edit is caught."""

import json

import pandas as pd
import pytest

from difstudy import report
from difstudy.bench.config import ratio_rows
from difstudy.errors import DifstudyError


def test_readme_blocks_agree_with_the_committed_report():
    text = (report.ROOT / report.README).read_text()
    assert {m.group("name") for m in report.BLOCK.finditer(text)} == set(report.SECTIONS)
    assert report.check_readme() == [], "run `difstudy report --update` (or restore the README's generated blocks)"


def _study(tmp_path, rows, notebooks=("a", "b")):
    (tmp_path / "run.json").write_text(
        json.dumps(dict(run_id="R2", params="ci", commit="abc1234", started="2026-01-02T00:00:00",
                        notebooks=list(notebooks), cpus=2))
    )  # fmt: skip
    cols = ["notebook", "params", "seconds", "status", "finished", "run_id"]
    pd.DataFrame(rows, columns=cols).to_csv(tmp_path / "times.csv", index=False)


def test_study_counts_only_the_recorded_run(tmp_path):
    _study(
        tmp_path,
        [
            ("a", "ci", 120.0, "ok", "2026-01-02T00:02:00", "R2"),
            ("b", "full", 999.0, "ok", "2026-01-01T00:00:00", "R1"),  # an older run, other params
            ("b", "ci", 30.0, "ok", "2026-01-02T00:02:30", "R2"),
            ("(book build)", "ci", 18.0, "ok", "2026-01-02T00:03:00", "R2"),
        ],
    )
    s = report.study_section(tmp_path)
    assert s["seconds"] == {"a": 120.0, "b": 30.0, "(book build)": 18.0}
    assert s["total_minutes"] == 2.8 and s["rows_left_out"] == 1 and s["commit"] == "abc1234"
    text = report.render("study", {"study": s})
    assert "**2.8 min**" in text and "a 2.0" in text and "2 more steps under a minute" in text


@pytest.mark.parametrize(
    "rows, why",
    [
        ([("a", "ci", 1.0, "ok", "x", "R2"), ("(book build)", "ci", 1.0, "ok", "x", "R2")], "no time for ['b']"),
        (
            [
                ("a", "ci", 1, "ok", "x", "R2"),
                ("b", "ci", 1, "ok", "x", "R2"),
                ("(book build)", "ci", 1, "failed", "x", "R2"),
            ],
            "failed: ['(book build)']",
        ),
    ],
)
def test_an_incomplete_study_run_is_refused(tmp_path, rows, why):
    _study(tmp_path, rows)
    with pytest.raises(DifstudyError, match="incomplete") as e:
        report.study_section(tmp_path)
    assert why in str(e.value)


def test_tests_section_refuses_a_selection_or_failures(tmp_path):
    path = tmp_path / "tests.json"
    good = dict(passed=10, failed=0, error=0, skipped=1, xfailed=1, xpassed=0, seconds=600.0, slow=3,
                commit="abc", cpus=2, selection="")  # fmt: skip
    path.write_text(json.dumps(good))
    assert "10 passed, 1 skipped, 1 xfailed in **10.0 min**" in report.render(
        "tests", {"tests": report.tests_section(tmp_path)}
    )
    path.write_text(json.dumps(good | dict(selection="-m 'not slow'")))
    with pytest.raises(DifstudyError, match="selection"):
        report.tests_section(tmp_path)
    path.write_text(json.dumps(good | dict(failed=2)))
    with pytest.raises(DifstudyError, match="2 failed"):
        report.tests_section(tmp_path)


def test_bench_section_reads_the_ratio_rows(tmp_path):
    rows = pd.DataFrame(ratio_rows(dict(overhead=1.01, batching=1.2), (64, 512)))
    rows["commit"], rows["cpus"], rows["load_at_start"], rows["total_s"], rows["cfg_quick"] = (
        "abc",
        2,
        0.1,
        61.0,
        "True",
    )
    (tmp_path / "bench").mkdir()
    rows.to_csv(tmp_path / "bench" / "bench.csv", index=False)
    sec = report.bench_section(tmp_path)
    assert [r["case"] for r in sec["ratios"]] == ["overhead", "batching"]
    table = report.render("bench", {"bench": sec})
    assert "`difstudy bench --quick` at commit `abc`" in table
    assert "| 1.01 | <= 1.05 | PASS |" in table and "| 1.20 | >= 1.30 | FAIL |" in table


def test_update_keeps_what_cannot_be_read_and_a_hand_edit_is_caught(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("x\n<!-- report:tests -->\nold\n<!-- /report:tests -->\ny\n")
    measured = report.update_measured(tmp_path, {"tests": {"kept": True}}, log=lambda m: None)
    assert measured == {"tests": {"kept": True}}  # nothing in tmp_path: every section is kept as it was
    good = dict(passed=3, skipped=0, seconds=60.0, commit="abc", cpus=2, slow=1)
    readme.write_text(report.render_readme(readme.read_text(), {"tests": good}))
    assert report.check_readme(readme, {"tests": good}) == []
    assert readme.read_text().startswith("x\n<!-- report:tests -->\nMeasured at commit `abc`")
    readme.write_text(readme.read_text().replace("3 passed", "300 passed"))
    assert report.check_readme(readme, {"tests": good}) == ["tests"]


def test_a_corrupt_report_file_names_the_fix(tmp_path):
    (tmp_path / "m.json").write_text("{not json")
    with pytest.raises(DifstudyError, match="git checkout"):
        report.read_measured(tmp_path / "m.json")


def test_run_times_keeps_the_carried_rows_of_the_previous_run():
    from difstudy.report import run_times

    times = pd.DataFrame(
        [("a", "ci", 1.0, "ok", "t", "R2"), ("performance", "ci", 2.0, "ok", "t", "R1"),
         ("(book build)", "full", 3.0, "ok", "t", "R0"), ("b", "ci", 4.0, "ok", "t", "R1")],
        columns=["notebook", "params", "seconds", "status", "finished", "run_id"],
    )  # fmt: skip
    run = dict(run_id="R2", params="ci", started="s")
    assert run_times(times, run)["notebook"].tolist() == ["a"]
    carried = run_times(times, run, carried=("performance", "(book build)"))
    assert carried["notebook"].tolist() == ["a", "performance"]  # the full-params build is not this study's


def test_gpu_section_reads_the_cuda_bench_and_names_the_device(tmp_path):
    rows = pd.DataFrame(ratio_rows(dict(overhead=1.24, batching=4.2), (64, 512)))
    meta = dict(commit="abc", cpus=16, load_at_start=1.5, total_s=119.0, cfg_quick="True")
    rows = rows.assign(**meta, cfg_device="cuda", cfg_dtype="fp16", device_name="NVIDIA H200")
    (tmp_path / "bench").mkdir()
    with pytest.raises(DifstudyError, match="--device cuda --quick"):
        report.gpu_section(tmp_path)
    rows.to_csv(tmp_path / "bench" / "bench-cuda.csv", index=False)
    table = report.render("gpu", {"gpu": report.gpu_section(tmp_path)})
    assert "`difstudy bench --device cuda --quick` at commit `abc` (NVIDIA H200, fp16, 16 host cores" in table
    assert "| 1.24 | <= 1.05 | FAIL |" in table and "| 4.20 | >= 1.30 | PASS |" in table
