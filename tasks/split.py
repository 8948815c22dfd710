"""split stage: stratified train/val/test split that keeps every duplicate group inside one split."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from brainmri.config import Params
from brainmri.fsutil import write_csv, write_json
from brainmri.progress import summary

SPLITS = ("train", "val", "test")


@dataclass
class Part:
    """Rows of one split (or of the augment manifest), in a fixed order, with their image files and labels."""

    frame: pd.DataFrame
    paths: list[Path]
    y: np.ndarray  # 1 = tumour


def make_part(p: Params, frame: pd.DataFrame, folder: Path) -> Part:
    frame = frame.reset_index(drop=True)
    return Part(frame, [folder / n for n in frame["image"]], (frame["label"] == p.ingest.positive_class).to_numpy(int))


def split_part(p: Params, which: str) -> Part:
    """The `which` split (train, val or test) of the split manifest, sorted by source path."""
    split = pd.read_csv(p.path("split_manifest"), keep_default_na=False)
    return make_part(p, split[split["split"] == which].sort_values("source_path", kind="stable"), p.path("ingest_images"))


def _order_key(seed: int, group: str) -> str:
    return hashlib.sha256(f"{seed}:{group}".encode()).hexdigest()


def assign_groups(groups: pd.DataFrame, fractions: dict[str, float], seed: int) -> dict[str, str]:
    """Map group id -> split. `groups` has one row per group: `group`, `label`, `size`.

    Per class, groups are visited largest first (ties in a seeded, content-derived order) and each goes to the
    split furthest below its target, so proportions match the targets while no group is ever divided.
    """
    out: dict[str, str] = {}
    for _, g in groups.groupby("label", sort=True):
        g = g.assign(key=[_order_key(seed, x) for x in g["group"]]).sort_values(["size", "key"], ascending=[False, True])
        total = g["size"].sum()
        target = {s: fractions[s] * total for s in SPLITS}
        count = dict.fromkeys(SPLITS, 0)
        for group, size in zip(g["group"], g["size"], strict=True):
            best = max(SPLITS, key=lambda s: (target[s] - count[s]) / target[s])
            out[group] = best
            count[best] += size
    return out


def leaked_fraction(frame: pd.DataFrame, split_col: str = "split") -> float:
    """Share of test images whose duplicate group also has a member in train."""
    train_groups = set(frame.loc[frame[split_col] == "train", "group"])
    test = frame[frame[split_col] == "test"]
    return float(test["group"].isin(train_groups).mean()) if len(test) else 0.0


def naive_split(frame: pd.DataFrame, fractions: dict[str, float], seed: int) -> pd.Series:
    """What a plain stratified random split (ignoring duplicates) would do, for the report's comparison."""
    rng = np.random.default_rng(seed)
    out = pd.Series("train", index=frame.index)
    for _, idx in frame.groupby("label").groups.items():
        idx = rng.permutation(np.asarray(sorted(idx)))
        n_test, n_val = round(fractions["test"] * len(idx)), round(fractions["val"] * len(idx))
        out[idx[:n_test]] = "test"
        out[idx[n_test : n_test + n_val]] = "val"
    return out


def split(p: Params) -> dict:
    """Run the stage: write the split manifest and report; return the report."""
    manifest = pd.read_csv(p.path("ingest_manifest"), keep_default_na=False)
    manifest = manifest.sort_values("source_path", kind="stable").reset_index(drop=True)
    usable = manifest[~manifest["conflict"].astype(bool)].copy()
    fractions = {"train": p.split.train, "val": p.split.val, "test": p.split.test}
    groups = usable.groupby("group").agg(label=("label", "first"), size=("label", "size")).reset_index()
    usable["split"] = usable["group"].map(assign_groups(groups, fractions, p.seed))
    per_group = usable.groupby("group")["split"].nunique()
    if (per_group > 1).any():  # cannot happen by construction; a guard against future edits
        raise AssertionError(f"duplicate groups straddle splits: {list(per_group[per_group > 1].index)}")
    cols = ["source_path", "label", "group", "split", "image_id", "image"]
    write_csv(p.path("split_manifest"), usable[cols])
    report = _report(p, manifest, usable, fractions)
    write_json(p.path("split_report"), report)
    counts = report["counts"]
    summary(
        "split",
        ", ".join(f"{s} {sum(counts[s].values())}" for s in SPLITS)
        + f"; test images leaking from train: 0 (a naive split leaks {report['naive_split_test_leak']:.0%})",
    )
    return report


def _report(p: Params, manifest: pd.DataFrame, usable: pd.DataFrame, fractions: dict[str, float]) -> dict:
    classes = p.ingest.classes
    counts = {s: {c: int(((usable["split"] == s) & (usable["label"] == c)).sum()) for c in classes} for s in SPLITS}
    overall = {c: float((usable["label"] == c).mean()) for c in classes}
    share = {s: {c: counts[s][c] / max(1, sum(counts[s].values())) for c in classes} for s in SPLITS}
    excluded = manifest[manifest["conflict"].astype(bool)]
    return {
        "seed": p.seed,
        "fractions": fractions,
        "counts": counts,
        "groups": {s: int(usable.loc[usable["split"] == s, "group"].nunique()) for s in SPLITS},
        "class_share": {s: {c: round(v, 4) for c, v in share[s].items()} for s in SPLITS},
        "max_class_share_deviation": round(max(abs(share[s][c] - overall[c]) for s in SPLITS for c in classes), 4),
        "test_leak": leaked_fraction(usable),
        "naive_split_test_leak": round(leaked_fraction(usable.assign(naive=naive_split(usable, fractions, p.seed)), "naive"), 4),
        "excluded_conflicts": sorted(excluded["source_path"]),
    }
