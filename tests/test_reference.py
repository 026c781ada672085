"""Reference rows: every number from the papers names its source and what it includes."""

import pandas as pd

from difstudy import gate
from difstudy.reference import ACTIVATIONS_PAPER, GATE_PAPER, REFERENCE_NUMBERS, reference_frame
from difstudy.tables import REFERENCE

# the study notes' table (../shared/STUDY.md), written out separately: (metric, value) pairs
NOTES = {
    ("SPair-71k PCK@0.1 img", 75.14), ("SPair-71k PCK@0.1 bbox", 66.73), ("SPair-71k PCK@0.1 img", 66.00),
    ("SPair-71k PCK@0.1 bbox", 59.16), ("SPair-71k PCK@0.1 img", 77.78), ("SPair-71k PCK@0.1 bbox", 69.83),
    ("ADE20K mIoU", 41.07), ("Cityscapes mIoU", 64.10), ("SPair-71k PCK@0.1 img", 81.72),
    ("SPair-71k PCK@0.1 bbox", 75.18), ("ADE20K mIoU", 43.45), ("Cityscapes mIoU", 74.47), ("Horse-21 mIoU", 62.7),
    ("SPair-71k PCK@0.1 img", 83.90), ("SPair-71k PCK@0.1 bbox", 76.86), ("ADE20K mIoU", 45.71),
    ("Cityscapes mIoU", 75.89), ("Horse-21 mIoU", 66.3), ("Horse-21 mIoU", 65.0), ("SPair-71k PCK@0.1 img", 76.60),
    ("SPair-71k PCK@0.1 bbox", 69.10), ("SPair-71k PCK@0.1 img", 73.96), ("SPair-71k PCK@0.1 bbox", 65.74),
    ("ADE20K mIoU", 40.51), ("Cityscapes mIoU", 64.20), ("Horse-21 mIoU", 67.2), ("CIFAR-10 accuracy", 93.62),
    ("CIFAR-10 accuracy", 94.55), ("CIFAR-10 accuracy", 95.21),
}  # fmt: skip


def test_every_reference_row_names_its_source_and_what_it_includes():
    for table in (REFERENCE, gate.reference_table(), reference_frame()):
        assert len(table) > 0
        for col in ("source", "includes"):
            assert table[col].map(lambda s: isinstance(s, str) and len(s.strip()) > 10).all(), col
        # a source names the paper, the task and the row
        assert table["source"].str.contains("et al. 20").all() and table["source"].str.contains("row").all()
    assert not REFERENCE.duplicated(["setting", "metric"]).any()


def test_reference_numbers_are_the_notes_numbers():
    assert sorted(zip(REFERENCE["metric"], REFERENCE["value"])) == sorted(NOTES)
    assert len(REFERENCE) == len(REFERENCE_NUMBERS) == len(NOTES)


def test_horse21_gate_row_says_it_includes_ddpm_features():
    for table in (REFERENCE, gate.reference_table()):
        row = table[(table["metric"] == "Horse-21 mIoU") & (table["value"] == 67.2)]
        assert len(row) == 1
        r = row.iloc[0]
        assert "SD1.5 + LSUN-horse DDPM" in r["setting"]
        assert "DDPM" in r["includes"] and "second set of weight assigners" in r["includes"]
        assert r["source"].startswith(GATE_PAPER) and r["spread"] == 1.1
    # no other GATE row claims DDPM features, and the settings that hold none do not say so
    others = REFERENCE[REFERENCE["setting"].str.startswith("GATE") & (REFERENCE["metric"] != "Horse-21 mIoU")]
    assert not others["setting"].str.contains("DDPM").any()


def test_gate_table_holds_the_gate_paper_only():
    table = gate.reference_table()
    assert table["source"].str.startswith(GATE_PAPER).all()
    assert set(table["metric"]) == {
        "SPair-71k PCK@0.1 img", "SPair-71k PCK@0.1 bbox", "ADE20K mIoU", "Cityscapes mIoU", "Horse-21 mIoU",
        "CIFAR-10 accuracy",
    }  # fmt: skip
    papers = REFERENCE["source"].map(lambda s: s.split(";")[0])
    assert (papers == ACTIVATIONS_PAPER).sum() == 18 and (papers == GATE_PAPER).sum() == len(table) == 10
    assert isinstance(table, pd.DataFrame) and list(table.columns) == list(REFERENCE.columns)
