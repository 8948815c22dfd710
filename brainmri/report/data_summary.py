"""The report's opening data summary (issue 31, item 4): the images of each class per split with the duplicate groups
among them, the subjects (patients) per split when a subjects table was given, and a warning naming each class that
has fewer than ingest.min_images_per_class images in a split. Written for any number of classes."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from brainmri.config import Params
from brainmri.intake.parts import SPLITS

ALL = "All classes"  # the totals row
TOO_FEW = "**Too few images.**"  # the warning's opening words; brainmri/report/html.py styles the line as a warning


def data_summary_section(p: Params) -> list:
    """The summary, from the split and ingest manifests params name."""
    return data_summary(p.path("split_manifest"), p.path("ingest_manifest"), p.ingest.classes, p.ingest.min_images_per_class)


def data_summary(split_manifest: Path, ingest_manifest: Path, classes: list[str], minimum: int) -> list:
    """Markdown lines and the class table: counts per split, subjects per split, the under-minimum warning."""
    images = split_images(split_manifest, ingest_manifest)
    names = [*classes, *sorted(set(images["label"]) - set(classes))]  # a label outside ingest.classes still shows
    counts = class_counts(images, names)
    return [
        "## The data",
        "",
        "Images of each class per split (what the models trained, were tuned and tested on; label conflicts left out), "
        "and the duplicate groups among them (groups of more than one image: a scan and its copies).",
        "",
        counts,
        subjects_line(images),
        "",
        *minimum_warning(counts, names, minimum),
    ]


def split_images(split_manifest: Path, ingest_manifest: Path) -> pd.DataFrame:
    """One row per split image: its label, split, duplicate group and, when ingest had a subjects table, subject.
    Read as text, so an id such as '017' or 'NA' stays what it is."""
    split = pd.read_csv(split_manifest, dtype=str, keep_default_na=False)
    ingest = pd.read_csv(ingest_manifest, dtype=str, keep_default_na=False)
    # with a subjects table `group` joins a subject's images too, and the duplicate group is kept as duplicate_group
    ingest["duplicate"] = ingest["duplicate_group"] if "duplicate_group" in ingest else ingest["group"]
    keep = ["source_path", "duplicate", *(["subject"] if "subject" in ingest else [])]
    return split[["source_path", "label", "split"]].merge(ingest[keep], on="source_path", how="left", validate="one_to_one")


def class_counts(images: pd.DataFrame, names: list[str]) -> pd.DataFrame:
    """Classes as rows: images per split and in all, duplicate groups and the images in them; a totals row last."""
    per_split = pd.crosstab(images["label"], images["split"]).reindex(index=names, columns=list(SPLITS), fill_value=0)
    per_split["Total"] = per_split.sum(axis=1)
    table = per_split.join(duplicate_counts(images, names))
    table.loc[ALL] = table.sum()
    return table.astype(int).rename_axis("Class").reset_index()


def duplicate_counts(images: pd.DataFrame, names: list[str]) -> pd.DataFrame:
    """Per class: the duplicate groups of more than one image, and the images in them."""
    sizes = images.groupby(["label", "duplicate"]).size()
    shared = sizes[sizes > 1].groupby(level="label")
    out = pd.DataFrame({"Duplicate groups": shared.size(), "Images in them": shared.sum()})
    return out.reindex(names, fill_value=0)


def subjects_line(images: pd.DataFrame) -> str:
    """The subjects per split (an image the table does not list counts as its own subject), or why there are none."""
    if "subject" not in images:
        return "No subjects table (ingest.subjects): the splits keep duplicate groups together, not patients."
    counts = ", ".join(f"{s} {n_subjects(images.loc[images['split'] == s, 'subject'])}" for s in SPLITS)
    unlisted = int((images["subject"] == "").sum())
    note = f"; {unlisted} images the table does not list count as a subject each" if unlisted else ""
    return f"Subjects (patients, from ingest.subjects) per split: {counts}{note}. A subject stays within one split."


def n_subjects(subjects: pd.Series) -> int:
    """How many subjects: the distinct ids, plus one for each image without one ('')."""
    listed = subjects[subjects != ""]
    return listed.nunique() + len(subjects) - len(listed)


def minimum_warning(counts: pd.DataFrame, names: list[str], minimum: int) -> list:
    """A warning naming each class with fewer than `minimum` images in a split, and where; nothing when none has."""
    rows = counts.set_index("Class").loc[names, list(SPLITS)]
    short = [
        f"`{name}` in " + ", ".join(f"{s} ({row[s]})" for s in SPLITS if row[s] < minimum)
        for name, row in rows.iterrows()
        if (row < minimum).any()
    ]
    if not short:
        return []
    return [f"{TOO_FEW} Fewer than {minimum} images (ingest.min_images_per_class) of: {'; '.join(short)}.", ""]
