"""The report's opening data summary (brainmri/report/data_summary.py) on small manifests written by hand."""

import pandas as pd

from brainmri.report.data_summary import data_summary
from brainmri.report.html import html_element
from brainmri.report.markdown import markdown_page

# (source_path, label, split, duplicate group, subject): three classes, for a summary written for N of them.
# glioma: 6 train, 2 val, 2 test; one duplicate group of 3 (g1) in train, and one of 2 (g2) in test.
# meningioma: 5 train, 5 val, 1 test; no duplicates. pituitary: 4 train, 3 val, 3 test; one group of 2 (p1) in val.
ROWS = [
    *[(f"glioma/{i:03d}.jpg", "glioma", "train", "g1" if i < 3 else f"gt{i}", f"{i // 2:03d}") for i in range(6)],
    *[(f"glioma/v{i}.jpg", "glioma", "val", f"gv{i}", "010") for i in range(2)],
    *[(f"glioma/t{i}.jpg", "glioma", "test", "g2", "NA") for i in range(2)],
    *[(f"meningioma/{i}.jpg", "meningioma", s, f"m{i}", f"m{i}") for i, s in enumerate(["train"] * 5 + ["val"] * 5 + ["test"])],
    *[(f"pituitary/{i}.jpg", "pituitary", s, f"q{i}", "") for i, s in enumerate(["train"] * 4 + ["val"] * 3 + ["test"] * 3)],
]
ROWS = [(*r[:3], "p1", r[4]) if r[0] in ("pituitary/4.jpg", "pituitary/5.jpg") else r for r in ROWS]
CLASSES = ["glioma", "meningioma", "pituitary"]


def write_manifests(folder, subjects: bool):
    """The split manifest and the ingest manifest as split and ingest write them; with `subjects`, ingest's `group`
    widens to subjects and `duplicate_group` keeps the duplicate group (brainmri/intake/subjects.py)."""
    rows = pd.DataFrame(ROWS, columns=["source_path", "label", "split", "duplicate", "subject"])
    rows["image_id"] = [f"{i:03d}" for i in range(len(rows))]
    rows["image"] = rows["image_id"] + ".png"
    ingest = rows[["source_path", "label", "image_id", "image"]].assign(group=rows["duplicate"], conflict=False)
    if subjects:
        ingest = ingest.assign(subject=rows["subject"], duplicate_group=rows["duplicate"], group="widened")
    conflict = pd.DataFrame([{"source_path": "glioma/x.jpg", "label": "glioma", "image_id": "999", "image": "999.png", "group": "c"}])
    ingest = pd.concat([ingest, conflict.assign(conflict=True)], ignore_index=True)  # never split: not counted
    if subjects:
        ingest.loc[ingest.index[-1], ["subject", "duplicate_group"]] = ["x", "c"]
    split = rows.assign(group=ingest["group"][: len(rows)])[["source_path", "label", "group", "split", "image_id", "image"]]
    split.to_csv(folder / "split.csv", index=False)
    ingest.to_csv(folder / "ingest.csv", index=False)
    return folder / "split.csv", folder / "ingest.csv"


def summary_of(tmp_path, subjects=True, minimum=2):
    return data_summary(*write_manifests(tmp_path, subjects), CLASSES, minimum)


def text_lines(md: list) -> list:
    return [x for x in md if isinstance(x, str)]


def test_the_class_table_counts_images_per_split_and_duplicate_groups_per_class(tmp_path):
    table = next(x for x in summary_of(tmp_path) if isinstance(x, pd.DataFrame))
    assert list(table.columns) == ["Class", "train", "val", "test", "Total", "Duplicate groups", "Images in them"]
    assert table.values.tolist() == [
        ["glioma", 6, 2, 2, 10, 2, 5],
        ["meningioma", 5, 5, 1, 11, 0, 0],
        ["pituitary", 4, 3, 3, 10, 1, 2],
        ["All classes", 15, 10, 6, 31, 3, 7],
    ]


def test_duplicate_groups_are_the_same_without_a_subjects_table(tmp_path):
    """Without a table ingest's `group` is the duplicate group; with one it is `duplicate_group` (`group` then joins
    a subject's images too: here every image, which the duplicate counts must not follow)."""
    tables = []
    for subjects in (True, False):
        (tmp_path / str(subjects)).mkdir()
        tables += [x for x in summary_of(tmp_path / str(subjects), subjects) if isinstance(x, pd.DataFrame)]
    assert tables[0].equals(tables[1])


def test_subjects_per_split_with_a_subject_column(tmp_path):
    """Ids are read as text: '000'..'002' are three subjects, '010' and 'NA' one each; an image the table does not
    list ('' in pituitary) counts as its own subject."""
    line = next(x for x in summary_of(tmp_path) if isinstance(x, str) and x.startswith("Subjects"))
    # train: 000, 001, 002, m0..m4, four pituitary images without an id; val: 010, m5..m9, three; test: NA, m10, three
    assert "per split: train 12, val 9, test 5; 10 images the table does not list count as a subject each." in line


def test_without_a_subjects_table_the_summary_says_so_in_one_line(tmp_path):
    md = text_lines(summary_of(tmp_path, subjects=False))
    assert not any(x.startswith("Subjects") for x in md)
    assert "No subjects table (ingest.subjects): the splits keep duplicate groups together, not patients." in md


def test_a_class_under_the_minimum_in_a_split_is_named_with_the_split(tmp_path):
    md = summary_of(tmp_path, minimum=3)
    warning = [x for x in md if isinstance(x, str) and x.startswith("**Too few images.**")]
    assert warning == [
        "**Too few images.** Fewer than 3 images (ingest.min_images_per_class) of: `glioma` in val (2), test (2); `meningioma` in test (1)."
    ]
    assert html_element(warning[0], tmp_path).startswith('<p class="warning"><strong>Too few images.</strong>')
    assert not any(isinstance(x, str) and x.startswith("**Too few") for x in summary_of(tmp_path, minimum=1))


def test_the_summary_renders_as_markdown(tmp_path):
    page = markdown_page(summary_of(tmp_path, minimum=3))
    assert page.startswith("## The data\n") and "| Class | train | val | test | Total | Duplicate groups | Images in them |" in page
    assert "| All classes | 15 | 10 | 6 | 31 | 3 | 7 |" in page
