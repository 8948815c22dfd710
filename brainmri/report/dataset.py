"""The report's 'Dataset' and 'Data audit' sections: what ingest and split made of the files, every duplicate group
by eye, the shortcut audit's two AUCs, the images flagged for review and the exclusions (issue 14, items 2 and 4)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from brainmri.config import Params
from brainmri.core.files import read_manifest
from brainmri.report.plots import samples_figure, save, strips_figure

MAX_STRIPS = 80  # groups drawn as strips: 80 rows stay well under matplotlib's 2^16-pixel figure limit (reached near 340)


def dataset_section(p: Params, ingest: dict, split: dict, out: Path) -> list:
    """The counts from ingest's and split's reports, then the duplicate strips and the data audit (drawn into `out`)."""
    d = ingest["duplicates"]
    counts = split["counts"]
    return [
        "## Dataset",
        "",
        f"- {ingest['n_files']} files, {ingest['n_ingested']} ingested, {ingest['n_quarantined']} quarantined, "
        f"{ingest['n_skipped']} skipped.",
        f"- Per class: {', '.join(f'{k} {v}' for k, v in ingest['per_class'].items())}.",
        f"- {d['n_images_in_duplicate_groups']} images in {d['n_duplicate_groups']} duplicate groups "
        f"({d['n_exact_duplicate_files']} byte-identical copies); {len(d['conflicts'])} label conflicts excluded.",
        "- Split: "
        + "; ".join(f"{s} {sum(c.values())} ({', '.join(f'{k} {v}' for k, v in c.items())})" for s, c in counts.items())
        + f". Test images with a duplicate in train: {split['test_leak']:.0%} "
        f"(a naive random split: {split['naive_split_test_leak']:.0%}); each class within "
        f"{100 * split['max_fraction_deviation']:.1f} points of the split fractions.",
        f"- Split ledger: {split['ledger']['images_kept']} images kept the split they had, {split['ledger']['images_new']} "
        f"were placed anew, {split['ledger']['images_moved']} moved because a new image joined groups from different splits "
        "(never out of test).",
        *test_change_lines(split.get("test_changes")),
        "",
        *duplicate_strips(p, out),
        *data_audit_section(p, ingest, out),
    ]


def test_change_lines(changes: dict | None) -> list:
    """How the test set changed since the last run, image by image with why (data/split/test_history.json keeps
    every image ever placed in test)."""
    if not changes:
        return []
    head = f"- Test set since the last run: {changes['n_before']} -> {changes['n_now']} images"
    if not changes["added"] and not changes["removed"]:
        return [head + ", unchanged." if changes["n_before"] else head + " (the first split)."]
    lines = [head + f": {len(changes['added'])} added, {len(changes['removed'])} removed."]
    for kind, rows in (("added", changes["added"]), ("removed", changes["removed"])):
        lines += [f"  - {kind}: `{r['source_path']}`: {r['why']}" for r in rows[:20]]
        lines += [f"  - ... and {len(rows) - 20} more {kind} (data/split/report.json)"] if len(rows) > 20 else []
    return lines


def duplicate_strips(p: Params, out: Path) -> list:
    """Every duplicate group as a strip of its members' thumbnails, so a person can check the grouping by eye."""
    from PIL import Image

    m = read_manifest(p.path("ingest_manifest"))
    split = read_manifest(p.path("split_manifest")).set_index("source_path")["split"]
    sizes = m["group"].value_counts()
    groups = [g for g in sizes.index if sizes[g] > 1]
    if not groups:
        return ["No duplicate groups: every image is its own scan.", ""]
    strips = []
    ordered = sorted(groups, key=lambda g: m.loc[m["group"] == g, "source_path"].min())
    for g in ordered[:MAX_STRIPS]:
        members = []
        for row in m[m["group"] == g].sort_values("source_path").itertuples():
            with Image.open(p.path("ingest_images") / row.image) as img:
                img.thumbnail((96, 96))
                members.append((np.asarray(img.convert("L")), f"{row.source_path}\n{split.get(row.source_path, 'excluded')}"))
        strips.append((g, members))
    save(strips_figure(strips), out / "duplicates.png")
    rest = [f"- {g}: {', '.join(m.loc[m['group'] == g, 'source_path'].sort_values())}" for g in ordered[MAX_STRIPS:]]
    shown = f"the first {MAX_STRIPS} of {len(groups)} (the rest listed below)" if rest else f"all {len(groups)}"
    return [
        f"Duplicate groups, {shown}, one row each, with each member's file and split (a group never spans two):",
        "",
        "![Every duplicate group, one row each](duplicates.png)",
        "",
        *([*rest, ""] if rest else []),
    ]


def data_audit_section(p: Params, ingest: dict, out: Path) -> list:
    """Markdown lines of the data-audit section; draws the review grid of flagged images into `out`."""
    excluded = [f"- Excluded by ingest.exclude: {e['source_path']}: {e['reason']}" for e in ingest.get("excluded", [])]
    return [
        "## Data audit",
        "",
        "### Shortcuts: can the class be predicted without anatomy?",
        "",
        *shortcut_lines(p),
        *review_lines(p, ingest, out),
        *(excluded or ["- No file excluded (ingest.exclude is empty)."]),
        "",
    ]


def auc_text(r: dict) -> str:
    """One audit classifier's AUC and interval: 'value [low, high]' (the audit stage's summary line writes the same)."""
    a = r["auc"]
    return f"{a['value']:.3f} [{a['ci_low']:.3f}, {a['ci_high']:.3f}]"


def _framing_verdict(a: dict) -> str:
    """Whether the model inputs' framing still gives the class away, or might weakly, from the audit record `a`."""
    framing = a["framing"]
    if framing["shortcut"]:
        return "The framing of the model inputs still predicts the class: a model can score without looking at the tumour."
    return "The framing no longer gives the class away" + (
        f", though the interval still reaches {framing['auc']['ci_high']:.3f}: a weak framing signal is not ruled out."
        if framing["auc"]["ci_high"] > a["shortcut_auc"]
        else "."
    )


def shortcut_lines(p: Params) -> list:
    """The shortcut audit's two AUCs and verdicts, or a line saying it has not run."""
    path = p.path("audit") / p.paths.files.audit
    if not path.is_file():
        return [f"The shortcut audit has not run ({path} is missing): `brainmri audit`.", ""]
    a = json.loads(path.read_text())
    meta, framing = a["metadata"], a["framing"]
    verdict = lambda r: "**a shortcut**" if r["shortcut"] else "no shortcut by this rule"  # noqa: E731
    return [
        f"A random forest that sees no anatomy, scored by {a['folds']}-fold grouped, stratified cross-validation on "
        f"{a['n_images']} images; AUC {a['auc_kind']}. A shortcut remains when the whole interval lies above "
        f"{a['shortcut_auc']}.",
        "",
        f"- **File metadata** (original width, height, aspect, file size, format, mode, extension case, EXIF): AUC "
        f"{auc_text(meta)}, {verdict(meta)}. The classes were collected and saved differently, so any trace of that in "
        "the pixels is a route to the label that bypasses anatomy; hence the second audit, on the model inputs.",
        f"- **What the models see** (the {a['image_size']} px square after ingest's normalization"
        f"{', cropped to the head' if a['crop_to_content'] else ''}: padding, content extent, border level and spread): "
        f"AUC {auc_text(framing)}, {verdict(framing)}. "
        + _framing_verdict(a)
        + " Resolution and compression traces inside the image are not audited.",
        "",
    ]


def review_lines(p: Params, ingest: dict, out: Path) -> list:
    """The images ingest flagged as outliers, as a grid drawn into `out` (when there are any), and what to do about them."""
    flagged = ingest.get("outliers", [])
    md = [
        "### Images flagged for review",
        "",
        f"Ingest scores each image against the rest of the set on label-independent shape, intensity and texture statistics; "
        f"{len(flagged)} scored above the robust z-score {ingest.get('outlier_z')} (ingest.outlier_z). They were kept: a person "
        "decides, and confirmed bad files go into ingest.exclude with a reason.",
        "",
    ]
    if flagged:
        from PIL import Image

        grid = []
        for o in flagged:
            with Image.open(p.path("ingest_images") / o["image"]) as img:
                grid.append((np.asarray(img.convert("RGB")), f"{o['source_path']}\nscore {o['score']:.1f} ({o['feature']})", False))
        save(samples_figure(grid), out / "review.png")
        md += ["![Images flagged for review, with their outlier score and most extreme feature](review.png)", ""]
    return md
