"""Patient-level groups (issue 31): a subjects table keeps each subject's images, and their duplicates, in one split and
one CV fold; a subject filed under two classes is named and refused (or kept); without a table nothing changes; a
hostile table is one clear sentence."""

import logging
import shutil

import numpy as np
import pandas as pd
import pytest
from factory import make_project, write_dataset

from brainmri.config import load_params
from brainmri.core.errors import ConfigError, DataError
from brainmri.intake import subjects as subjects_module
from brainmri.intake.parts import SPLITS, split_part
from brainmri.learn import crossval
from tasks.ingest import ingest
from tasks.split import split

# the manifest's columns before subjects existed: without a table, ingest writes exactly these
COLUMNS = (
    "image_id source_path label image sha256 format extension_ok extension mode width height file_bytes exif exif_rotated "
    "norm_width norm_height note outlier_score outlier_feature outlier group conflict"
).split()


SIZE = (96, 112)  # phantoms this large: the duplicate detector joins none of them by chance (64 x 72 ones it sometimes does)


def project(tmp_path, table: str | None = None, **ingest_over):
    """A project over `n` phantoms per class; `table` (CSV text) is written to subjects/table.csv and named."""
    over = {"source": "data/raw/ds", "min_images_per_class": 2, **ingest_over}
    if table is not None:
        over["subjects"] = "subjects/table.csv"
    root = make_project(tmp_path / "proj", {"ingest": over, "train": {"cv_folds": 5}})
    if table is not None:
        (root / "subjects" / "table.csv").write_text(table, encoding="utf-8")
    return load_params(root / "params.yaml")


def table_of(rows: dict[str, str]) -> str:
    return "source_path,subject\n" + "".join(f"{path},{subject}\n" for path, subject in rows.items())


def three_per_subject(n: int) -> dict[str, str]:
    """write_dataset's images, three consecutive ones per subject, one class per subject."""
    return {f"{c}/{c} {i}.jpg": f"{c.upper()}{i // 3}" for c in ("no", "yes") for i in range(n)}


def subject_of_each(p) -> pd.DataFrame:
    return pd.read_csv(p.path("ingest_manifest"), keep_default_na=False).set_index("source_path")


def test_a_subject_stays_in_one_split_and_one_cv_fold_with_its_duplicates(tmp_path, monkeypatch, caplog):
    rows = three_per_subject(30)
    p = project(tmp_path, table_of({**rows, "yes/ghost.jpg": "YES99"}))
    ds = write_dataset(p.resolve("data/raw/ds"), n=30, seed=3, size=SIZE)
    shutil.copy(ds / "yes" / "yes 0.jpg", ds / "yes" / "copy of yes 0.jpg")  # a duplicate, filed without a subject
    shutil.copy(ds / "yes" / "yes 4.jpg", ds / "yes" / "yes 9.jpg")  # a duplicate that joins subjects YES1 and YES3
    with caplog.at_level(logging.WARNING, logger="brainmri"):
        report = ingest(p)
    assert report["subjects"]["n_subjects"] == 20 and report["subjects"]["n_images_without_subject"] == 1
    assert report["subjects"]["n_unmatched"] == 1 and report["subjects"]["unmatched"] == ["yes/ghost.jpg"]
    assert [r.getMessage() for r in caplog.records if "name no ingested image" in r.getMessage()][0].count("\n") == 0
    m = subject_of_each(p)
    assert m.loc["yes/copy of yes 0.jpg", "group"] == m.loc["yes/yes 0.jpg", "group"]  # duplicate and subject: one component
    assert m.loc["yes/yes 3.jpg", "group"] == m.loc["yes/yes 9.jpg", "group"]  # YES1 and YES3 joined through the copy
    assert m[m["subject"] != ""].groupby("subject")["group"].nunique().max() == 1
    assert report["duplicates"]["n_duplicate_groups"] == 2  # the duplicates section counts duplicates, not subjects

    split(p)
    s = pd.read_csv(p.path("split_manifest"), keep_default_na=False).join(m["subject"], on="source_path")
    assert s.groupby("subject")["split"].nunique().max() == 1 and s.groupby("group")["split"].nunique().max() == 1
    assert s.loc[s["subject"].isin(["YES1", "YES3"]), "split"].nunique() == 1

    # CV: the folds train makes (crossval.cv_folds) over train+val, their heads left unbuilt (no TensorFlow here)
    monkeypatch.setattr(crossval, "_fold_job", lambda *a, **k: None)
    tr, va = split_part(p, "train"), split_part(p, "val")  # train+val in train's order (brainmri/learn/transfer.py's TrainVal)
    cv = pd.concat([tr.frame, va.frame], ignore_index=True).join(m["subject"], on="source_path")
    y, groups = np.concatenate([tr.y, va.y]), cv["group"].to_numpy()
    bb = p.backbones[p.models[next(iter(p.models))].backbone]
    folds = crossval.cv_folds(p, next(iter(p.models)), np.zeros((len(cv), 1)), y, groups, {}, bb=bb)
    fold = np.full(len(cv), -1)
    for f in folds:
        fold[f.test] = f.k
    assert len(folds) == 5 and (fold >= 0).all()
    assert cv.assign(fold=fold).groupby("subject")["fold"].nunique().max() == 1


def mixed_table() -> str:
    rows = three_per_subject(12)  # four subjects a class: with NO0 refused, 'no' still has a subject for each split
    rows["yes/yes 8.jpg"] = "NO0"  # subject NO0: three images under 'no' and one under 'yes'
    return table_of(rows)


@pytest.mark.parametrize("keep", [False, True])
def test_a_subject_filed_under_two_classes_is_named_and_refused_unless_kept(tmp_path, caplog, keep):
    p = project(tmp_path, mixed_table(), keep_mixed_subjects=keep)
    write_dataset(p.resolve("data/raw/ds"), n=12, seed=5, size=SIZE)
    with caplog.at_level(logging.WARNING, logger="brainmri"):
        report = ingest(p)
    mixed = report["subjects"]["mixed"]
    assert mixed == [
        {"subject": "NO0", "labels": ["no", "yes"], "members": ["no/no 0.jpg", "no/no 1.jpg", "no/no 2.jpg", "yes/yes 8.jpg"], "kept": keep}
    ]
    warned = [r.getMessage() for r in caplog.records if "more than one class" in r.getMessage()]
    assert len(warned) == 1 and "'NO0' (no/yes)" in warned[0] and ("kept" in warned[0]) == keep
    m = subject_of_each(p)
    members = mixed[0]["members"]
    assert m.loc[members, "mixed_subject"].astype(str).eq("True").all()
    assert m.loc[members, "conflict"].astype(str).eq(str(not keep)).all()
    assert m["conflict"].astype(str).eq("True").sum() == (0 if keep else 4)
    assert report["subjects"]["n_images_refused"] == (0 if keep else 4) and report["duplicates"]["conflicts"] == []
    out = split(p)
    assert out["excluded_conflicts"] == ([] if keep else members)
    s = pd.read_csv(p.path("split_manifest"), keep_default_na=False).set_index("source_path")
    assert (s.loc[members, "split"].nunique() == 1) if keep else not set(members) & set(s.index)


def test_without_a_table_the_manifest_and_report_are_as_before(tmp_path):
    """No table writes the manifest's old columns and no 'subjects' key; a table naming each image its own subject
    changes no group: the manifest less the three subject columns is byte for byte the same."""
    plain = project(tmp_path / "a")
    ds = write_dataset(plain.resolve("data/raw/ds"), n=6, seed=7, size=SIZE)
    shutil.copy(ds / "no" / "no 1.jpg", ds / "no" / "again.jpg")  # one duplicate group, so groups are not all singletons
    report = ingest(plain)
    before = pd.read_csv(plain.path("ingest_manifest"), keep_default_na=False)
    assert list(before.columns) == COLUMNS and "subjects" not in report
    own = table_of({sp: f"S{i}" for i, sp in enumerate(before["source_path"])})
    joined = project(tmp_path / "b", own)
    shutil.copytree(ds, joined.resolve("data/raw/ds"))
    told = ingest(joined)
    after = pd.read_csv(joined.path("ingest_manifest"), keep_default_na=False)
    assert list(after.columns) == [*COLUMNS, "subject", "duplicate_group", "mixed_subject"]
    assert after[COLUMNS].to_csv(index=False) == before.to_csv(index=False)
    assert {k: v for k, v in told.items() if k not in ("elapsed_s", "subjects")} == {k: v for k, v in report.items() if k != "elapsed_s"}


HEADER = "source_path,subject\n"


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        (None, "subjects table not found (ingest.subjects in params.yaml)"),
        ("", "the subjects table is empty; it needs a header row"),
        ("path,patient\nyes/yes 0.jpg,P1\n", "header lacks the column 'source_path' (columns: 'path', 'patient')"),
        ("source_path,subject,subject\nyes/yes 0.jpg,P1,P2\n", "header repeats the column 'subject'"),
        (HEADER + "yes/yes 0.jpg,P1\nno/no 0.jpg,P2\nyes/yes 0.jpg,P3\n", "line 4: 'yes/yes 0.jpg' is listed with two subjects, 'P1'"),
        (HEADER + "yes/yes 0.jpg,  \n", "line 2: empty subject id for 'yes/yes 0.jpg'"),
        (HEADER + "yes/yes 0.jpg,P\u00a01\n", "holds a control or invisible character (U+00A0)"),
        (HEADER + ",P1\n", "line 2: empty source_path"),
        (HEADER + "yes/yes 0.jpg\n", "line 2: 1 fields, too few"),
        (HEADER + "yes/yes 0.jpg,P" + "1" * 300 + "\n", "a subject id of 301 characters"),
        (HEADER + 'yes/yes 0.jpg,"P\x1b[31m"\n', "holds a control or invisible character (U+001B)"),
        (HEADER.encode() + b"yes/yes 0.jpg,Patient \xe9\n", "not UTF-8 text (byte 0xe9 at offset 42)"),
        (HEADER + "yes/yes 0.jpg," + "x" * 200_000 + "\n", "line 2: not readable as CSV (field larger than field limit"),
        ("huge", "bytes; at most 32000000 are read"),
        ("folder", "is not a regular file"),
        ("rows", "has over 3 rows"),
        (HEADER + "\n , \n", "the subjects table has a header but no rows"),
        ("blank", "has over 6 lines"),
    ],
)
def test_a_hostile_table_is_one_sentence_naming_the_file(tmp_path, monkeypatch, content, needle):
    p = project(tmp_path, "")
    table = p.resolve("subjects/table.csv")
    if content is None:
        table.unlink()
    elif content == "huge":
        with open(table, "wb") as f:
            f.truncate(subjects_module.MAX_TABLE_BYTES + 1)  # sparse: no 32 MB written
    elif content == "folder":
        table.unlink()
        table.mkdir()
    elif content == "rows":
        monkeypatch.setattr(subjects_module, "MAX_ROWS", 3)
        table.write_text(table_of(three_per_subject(2)))
    elif content == "blank":  # blank lines count toward a bound too
        monkeypatch.setattr(subjects_module, "MAX_ROWS", 3)
        table.write_text(HEADER + "\n" * 10 + "yes/yes 0.jpg,P1\n")
    else:
        table.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(DataError) as exc:
        ingest(p)  # the table is read first: no dataset is needed to refuse it
    assert needle in str(exc.value) and str(table) in str(exc.value) and "\n" not in str(exc.value)


@pytest.mark.parametrize(
    ("over", "needle"),
    [
        ({"ingest": {"subjects": "data/raw/table.csv"}}, "ingest.subjects 'data/raw/table.csv' is outside the subjects inbox subjects/"),
        ({"ingest": {"subjects": "subjects/../params.yaml"}}, "is outside the subjects inbox"),
        ({"ingest": {"subjects": "subjects/"}}, "ingest.subjects 'subjects/' names no file; name a CSV table in subjects/"),
        ({"ingest": {"subjects": "  "}}, "ingest.subjects '  ' names no file"),
        ({"ingest": {"subjects": "subjects/a\x00.csv"}}, "ingest.subjects holds a control character"),
        ({"paths": {"subjects_inbox": ""}}, "paths.subjects_inbox must name a folder"),
        ({"paths": {"report": "subjects"}}, "paths.report 'subjects' overlaps paths.subjects_inbox"),
        ({"paths": {"subjects_inbox": "data/ingest"}}, "overlaps paths.subjects_inbox"),
    ],
)
def test_a_bad_subjects_path_names_the_key(tmp_path, over, needle):
    make_project(tmp_path, over)
    with pytest.raises(ConfigError) as exc:
        load_params(tmp_path / "params.yaml")
    assert needle in str(exc.value)


def test_dvc_tracks_the_subjects_inbox_with_or_without_a_table(tmp_path):
    """DVC refuses an empty dep path, so ingest depends on the inbox: it resolves with ingest.subjects '' and set."""
    from dvc.repo import Repo

    for table in ("", "subjects/t.csv"):
        root = make_project(tmp_path / (table or "none"), {"ingest": {"subjects": table}}, code=True)
        Repo.init(root, no_scm=True)
        stage = Repo(root).stage.collect("dvc.yaml:ingest")[0]
        deps = {str(d.def_path) for d in stage.deps}
        assert "subjects" in deps and "data/raw/brain_tumor_dataset" in deps
        assert stage.params[0].params  # the stage tracks params; the two subjects keys among them
        assert {"ingest.subjects", "ingest.keep_mixed_subjects"} <= set(next(d for d in stage.deps if hasattr(d, "params")).params)


def test_a_table_naming_no_image_is_refused_and_a_path_is_matched_as_written_first(tmp_path):
    """A table none of whose rows names an ingested image (a Windows export's backslashes) is refused like a table
    of no rows, naming the file, and nothing is published; a path is matched as written before it is matched
    without its surrounding spaces, so 'no 0.jpg ' and 'no 0.jpg' stay two images, and 'path ,subject' finds its."""
    p = project(tmp_path, table_of({f"{c}\\{c} {i}.jpg": f"S{i}" for c in ("no", "yes") for i in range(3)}))
    ds = write_dataset(p.resolve("data/raw/ds"), n=4, seed=7, size=SIZE)
    with pytest.raises(DataError) as exc:
        ingest(p)
    message, table = str(exc.value), p.resolve("subjects/table.csv")
    assert "none of the subjects table's 6 rows names an ingested image" in message and str(table) in message
    assert not p.path("ingest_manifest").exists() and not p.path("ingest_images").exists()
    shutil.copy(ds / "no" / "no 1.jpg", ds / "no" / "no 0.jpg ")  # a file whose name ends in a space
    table.write_text(HEADER + "no/no 0.jpg ,P1\nno/no 2.jpg ,P2\n")
    ingest(p)
    m = subject_of_each(p)
    assert (m.loc["no/no 0.jpg ", "subject"], m.loc["no/no 0.jpg", "subject"], m.loc["no/no 2.jpg", "subject"]) == ("P1", "", "P2")
    table.write_text(HEADER + "no/no 0.jpg ,P1\nno/no 2.jpg ,P2\nno/no 2.jpg,P3\n")  # one image, two subjects: refused
    with pytest.raises(DataError, match=r"'no/no 2.jpg ' and another row name the image 'no/no 2.jpg' with two subjects, 'P3' and 'P2'"):
        ingest(p)


def test_a_class_in_too_few_subjects_to_fill_every_split_is_refused_naming_it(tmp_path):
    """Two subjects a class cannot fill train, val and test (a subject goes whole to one split): split stops naming
    the class, the empty split and the subject counts, and writes nothing; a third subject each and it splits."""
    rows = {f"{c}/{c} {i}.jpg": f"{c.upper()}{i % 2}" for c in ("no", "yes") for i in range(8)}
    p = project(tmp_path, table_of(rows))
    ds = write_dataset(p.resolve("data/raw/ds"), n=9, seed=5, size=SIZE)
    (ds / "yes" / "yes 8.jpg").unlink()
    (ds / "no" / "no 8.jpg").unlink()
    ingest(p)
    with pytest.raises(DataError) as exc:
        split(p)
    assert "'no' has no image in test: its 2 groups are fewer than the three splits; 'yes' has no image in test" in str(exc.value)
    assert not p.path("split_manifest").exists() and not p.path("split_ledger").exists()
    write_dataset(p.resolve("data/raw/ds"), n=9, seed=5, size=SIZE)  # the ninth image of each class: a third subject
    p.resolve("subjects/table.csv").write_text(table_of({**rows, "no/no 8.jpg": "NO2", "yes/yes 8.jpg": "YES2"}))
    ingest(p)
    report = split(p)
    assert all(report["counts"][s][c] > 0 for s in SPLITS for c in ("no", "yes")), report["counts"]


def test_a_class_emptied_by_a_mixed_subject_says_so_and_not_quarantine(tmp_path):
    """Every 'no' image in one subject that also has a 'yes' image: the class is emptied by the refusal, and the
    error says what was dropped, without pointing at quarantine reasons that do not exist."""
    rows = {f"no/no {i}.jpg": "P0" for i in range(4)} | {"yes/yes 0.jpg": "P0"}
    p = project(tmp_path, table_of(rows))
    write_dataset(p.resolve("data/raw/ds"), n=4, seed=5, size=SIZE)
    with pytest.raises(DataError) as exc:
        ingest(p)
    message = str(exc.value)
    assert "once 5 images in duplicate groups or subjects with conflicting labels are dropped" in message
    assert "{'no': 0}" in message and "quarantine" not in message
