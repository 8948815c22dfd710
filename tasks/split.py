"""split stage: stratified train/val/test split that keeps every duplicate group inside one split."""

from __future__ import annotations

from brainmri.config import Params
from brainmri.core.files import read_manifest, write_csv, write_json
from brainmri.core.progress import summary
from brainmri.intake.parts import SPLITS
from brainmri.intake.splitting import (
    assign,
    check_every_split,
    check_splittable,
    how_test_changed,
    ledger_summary,
    read_ledger,
    read_test_history,
    split_report,
    updated_test_history,
)


def split(p: Params) -> dict:
    """Run the stage: write the split manifest, the ledger and the report; return the report."""
    manifest = read_manifest(p.path("ingest_manifest"))
    manifest = manifest.sort_values("source_path", kind="stable").reset_index(drop=True)
    usable = manifest[~manifest["conflict"].astype(bool)].copy()
    check_splittable(usable, p)
    fractions = {"train": p.split.train, "val": p.split.val, "test": p.split.test}
    ledger, reset = read_ledger(p.path("split_ledger"), p.seed, fractions)
    assigned, merges, new_groups = assign(usable, ledger, fractions, p.seed)
    usable["split"] = usable["group"].map(assigned)
    check_every_split(usable, p)
    per_group = usable.groupby("group")["split"].nunique()
    if (per_group > 1).any():  # cannot happen by construction; a guard against future edits
        raise AssertionError(f"duplicate groups straddle splits: {list(per_group[per_group > 1].index)}")
    for h, sp, s in zip(usable["sha256"], usable["source_path"], usable["split"], strict=True):
        ledger[h] = {"split": s, "source_path": sp}
    cols = ["source_path", "label", "group", "split", "image_id", "image"]
    write_csv(p.path("split_manifest"), usable[cols])
    write_json(p.path("split_ledger"), {"seed": p.seed, "fractions": fractions, "images": dict(sorted(ledger.items()))})
    history = read_test_history(p.path("split_test_history"))
    write_json(p.path("split_test_history"), updated_test_history(history, usable))
    report = split_report(p, manifest, usable, fractions)
    report["ledger"] = ledger_summary(usable, new_groups, merges, reset)
    report["test_changes"] = how_test_changed(history, manifest, usable, reset, merges)
    write_json(p.path("split_report"), report)
    counts = report["counts"]
    summary(
        "split",
        ", ".join(f"{s} {sum(counts[s].values())}" for s in SPLITS)
        + f"; test images leaking from train: 0 (a naive split leaks {report['naive_split_test_leak']:.0%}); "
        + f"{report['ledger']['images_kept']} kept their split, {report['ledger']['images_new']} placed, "
        + f"{report['ledger']['images_moved']} moved by {len(merges)} merges",
    )
    return report
