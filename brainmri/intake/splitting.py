"""How the split stage splits: duplicate groups kept whole, stratified by class, and a ledger that keeps every image where
it was first placed as the data grows."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd

from brainmri.config import Params
from brainmri.core.errors import DataError
from brainmri.intake.parts import SPLITS


def _order_key(seed: int, group: str) -> str:
    return hashlib.sha256(f"{seed}:{group}".encode()).hexdigest()


def assign_groups(
    groups: pd.DataFrame, fractions: dict[str, float], seed: int, start: dict[str, dict[str, int]] | None = None
) -> dict[str, str]:
    """Map group id -> split. `groups` has one row per group: `group`, `label`, `size`.

    Per class, groups are visited largest first (ties in a seeded, content-derived order) and each goes to the
    split furthest below its target, so proportions match the targets while no group is ever divided.
    `start` counts the images per class (then split) already placed by the ledger: targets cover them too,
    so new groups fill whichever splits earlier data left short.
    """
    out: dict[str, str] = {}
    for label, g in groups.groupby("label", sort=True):
        g = g.assign(key=[_order_key(seed, x) for x in g["group"]]).sort_values(["size", "key"], ascending=[False, True])
        count = {s: (start or {}).get(label, {}).get(s, 0) for s in SPLITS}
        total = g["size"].sum() + sum(count.values())
        target = {s: fractions[s] * total for s in SPLITS}
        for group, size in zip(g["group"], g["size"], strict=True):
            best = max(SPLITS, key=lambda s: (target[s] - count[s]) / target[s])
            out[group] = best
            count[best] += size
    return out


# The ledger: every image ever assigned, keyed by the sha256 of its file bytes, with its split. A stateless rule
# (split = hash of a group's id) cannot keep a group put when a new copy joins it, since whichever member names
# the group may change, and on 253 images hashing alone leaves test's class shares ~8 points off target (binomial
# noise on 38 images); so the split stage remembers what it assigned. It is a DVC output kept between runs
# (persist), read back on the next run: known images keep their split, only groups with no known member are
# placed, and removed images stay listed, so one that returns goes back where it was. A changed seed or
# fractions is a deliberate re-split: the ledger is then started afresh, and the report says so.
def read_ledger(path: Path, seed: int, fractions: dict[str, float]) -> tuple[dict[str, dict], str | None]:
    """Earlier assignments {sha256: {split, source_path}}, and why none are used (None when they are)."""
    if not path.exists():
        return {}, "no ledger yet: first split"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        images = data["images"]
        if not all(isinstance(v, dict) and v.get("split") in SPLITS for v in images.values()):
            raise ValueError("an entry lacks a split train, val or test")
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise DataError(f"{path}: the split ledger is unreadable ({exc}); restore it (dvc checkout) or delete it to split afresh") from exc
    if data.get("seed") != seed or data.get("fractions") != fractions:
        return {}, f"seed or fractions changed (ledger: seed {data.get('seed')}, {data.get('fractions')}): split afresh"
    return images, None


def assign(
    usable: pd.DataFrame, ledger: dict[str, dict], fractions: dict[str, float], seed: int
) -> tuple[dict[str, str], list[dict], list[str]]:
    """Map group id -> split; list the merges (groups whose known members the ledger had in different splits) and the new groups.

    A group with known members keeps their split; a new image that bridges groups from different splits is the
    one case that moves images, and never out of test: a merged group holding an earlier test image stays in test
    (its train and val members move there); otherwise it goes where most of its known images are (ties: train).
    Models retrained on the new split are then scored on every image they were scored on before, and more.
    """
    out: dict[str, str] = {}
    merges = []
    for gid, m in usable.groupby("group", sort=True):
        known = m[m["sha256"].isin(ledger.keys())]
        if known.empty:
            continue
        was = known["sha256"].map(lambda h: ledger[h]["split"])
        votes = was.value_counts()
        out[gid] = "test" if "test" in votes else max(SPLITS, key=lambda s: (votes.get(s, 0), -SPLITS.index(s)))
        if len(votes) > 1:
            moved = known[was != out[gid]]
            pairs = zip(moved["source_path"], moved["sha256"], strict=True)
            merges.append({"group": gid, "split": out[gid], "moved": [{"source_path": sp, "from": ledger[h]["split"]} for sp, h in pairs]})
    placed = usable[usable["group"].isin(out.keys())]
    start = {c: placed.loc[placed["label"] == c, "group"].map(out).value_counts().to_dict() for c in placed["label"].unique()}
    new = usable[~usable["group"].isin(out.keys())]
    groups = new.groupby("group").agg(label=("label", "first"), size=("label", "size")).reset_index()
    out.update(assign_groups(groups, fractions, seed, start))
    return out, merges, sorted(groups["group"])


def ledger_summary(usable: pd.DataFrame, new_groups: list[str], merges: list[dict], reset: str | None) -> dict:
    """The split report's account of the ledger: kept, newly placed and moved images."""
    new = usable["group"].isin(new_groups)
    return {
        "reset": reset,
        "images_kept": int((~new).sum()),  # in a group with a member the ledger knew: its split was not chosen again
        "images_new": int(new.sum()),
        "groups_new": len(new_groups),
        "merges": merges,
        "images_moved": sum(len(m["moved"]) for m in merges),
    }


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


def split_report(p: Params, manifest: pd.DataFrame, usable: pd.DataFrame, fractions: dict[str, float]) -> dict:
    """split's report.json: counts and class shares per split, the leakage check against a naive split, dropped conflicts."""
    classes = p.ingest.classes
    counts = {s: {c: int(((usable["split"] == s) & (usable["label"] == c)).sum()) for c in classes} for s in SPLITS}
    overall = {c: float((usable["label"] == c).mean()) for c in classes}
    share = {s: {c: counts[s][c] / max(1, sum(counts[s].values())) for c in classes} for s in SPLITS}
    per_class = {c: {s: counts[s][c] / max(1, sum(counts[x][c] for x in SPLITS)) for s in SPLITS} for c in classes}
    excluded = manifest[manifest["conflict"].astype(bool)]
    return {
        "seed": p.seed,
        "fractions": fractions,
        "counts": counts,
        "groups": {s: int(usable.loc[usable["split"] == s, "group"].nunique()) for s in SPLITS},
        "class_share": {s: {c: round(v, 4) for c, v in share[s].items()} for s in SPLITS},
        "max_class_share_deviation": round(max(abs(share[s][c] - overall[c]) for s in SPLITS for c in classes), 4),
        "class_fraction_by_split": {c: {s: round(v, 4) for s, v in per_class[c].items()} for c in classes},
        "max_fraction_deviation": round(max(abs(per_class[c][s] - fractions[s]) for s in SPLITS for c in classes), 4),
        "test_leak": leaked_fraction(usable),
        "naive_split_test_leak": round(leaked_fraction(usable.assign(naive=naive_split(usable, fractions, p.seed)), "naive"), 4),
        "excluded_conflicts": sorted(excluded["source_path"]),
    }


def check_splittable(usable: pd.DataFrame, p: Params) -> None:
    """Stop before writing anything when a class has fewer usable images than ingest.min_images_per_class: with every
    image in a label conflict, split once wrote 0/0/0 with exit 0 and train crashed later."""
    counts = usable["label"].value_counts()
    short = {c: int(counts.get(c, 0)) for c in p.ingest.classes if counts.get(c, 0) < p.ingest.min_images_per_class}
    if short:
        raise DataError(
            f"{p.path('ingest_manifest')}: too few usable images to split: {short} once label conflicts are dropped "
            f"(ingest.min_images_per_class = {p.ingest.min_images_per_class}); run ingest again, or resolve the conflicts"
        )


def check_every_split(usable: pd.DataFrame, p: Params) -> None:
    """Stop before writing anything when a class has no image in train, val or test, which would then score (or fit)
    no image of it: a group (a subject's images, a duplicate group) goes whole to one split, so a class in fewer than
    three groups cannot fill them; with more, the split ledger kept its known groups where they were."""
    counts = usable.groupby(["label", "split"]).size()
    empty = {c: [s for s in SPLITS if counts.get((c, s), 0) == 0] for c in p.ingest.classes}
    if not any(empty.values()):
        return
    groups = usable.groupby("label")["group"].nunique()
    few, pinned = "its {} groups are fewer than the three splits", "the split ledger keeps its {} known groups elsewhere"
    why = [
        f"{c!r} has no image in {' or '.join(e)}: " + (few if (n := int(groups.get(c, 0))) < 3 else pinned).format(n)
        for c, e in empty.items()
        if e
    ]
    raise DataError(
        f"{p.path('ingest_manifest')}: {'; '.join(why)} (a group, a subject's images or a duplicate group, goes whole to one "
        f"split); add images of more subjects, or delete {p.path('split_ledger')} to split afresh"
    )


# The test history: the sha256 of every image ever placed in test, and the test set of the last run, kept between
# runs (a DVC output with persist) beside the ledger. The ledger starts afresh on a deliberate re-split; this does not,
# so whether an image was ever a test image stays auditable, and each run says how its test set changed.
def read_test_history(path: Path) -> dict:
    """{"ever": {sha256: source_path when first placed}, "last": [sha256 of the last run's test set]}; empty at first."""
    if not path.exists():
        return {"ever": {}, "last": []}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data.get("ever"), dict) or not isinstance(data.get("last"), list):
            raise ValueError("it needs 'ever' (a mapping) and 'last' (a list)")
    except (ValueError, AttributeError) as exc:
        raise DataError(f"{path}: the test history is unreadable ({exc}); restore it (dvc checkout)") from None
    return data


def how_test_changed(history: dict, manifest: pd.DataFrame, usable: pd.DataFrame, reset: str | None, merges: list[dict]) -> dict:
    """How this run's test set differs from the last run's, each image with why: the report's audit of test."""
    moved = {m["source_path"]: m["from"] for merge in merges for m in merge["moved"]}
    now = usable.loc[usable["split"] == "test"]
    before, current = set(history["last"]), set(now["sha256"])
    ingested = dict(zip(manifest["sha256"], manifest["conflict"].astype(bool), strict=True))
    removed = []
    for sha in sorted(before - current):
        why = (
            "re-split: " + reset
            if reset and sha in ingested and not ingested[sha]
            else (
                "in a duplicate group with conflicting labels"
                if ingested.get(sha)
                else "no longer ingested (removed, quarantined or excluded)"
            )
        )
        removed.append({"sha256": sha, "source_path": history["ever"].get(sha, ""), "why": why})
    added = [
        {"sha256": h, "source_path": sp, "why": _why_added(h, sp, history, moved)}
        for h, sp in zip(now["sha256"], now["source_path"], strict=True)
        if h not in before
    ]
    return {"n_before": len(before), "n_now": len(current), "added": added, "removed": removed}


def _why_added(sha: str, source_path: str, history: dict, moved: dict[str, str]) -> str:
    if source_path in moved:
        return f"moved from {moved[source_path]}: a new image joined its duplicate group to a test group"
    return "in test before, and back" if sha in history["ever"] else "new image, placed in test"


def updated_test_history(history: dict, usable: pd.DataFrame) -> dict:
    """The history with this run's test images added to "ever" (never removed) and set as "last"."""
    now = usable.loc[usable["split"] == "test"]
    ever = dict(history["ever"])
    for h, sp in zip(now["sha256"], now["source_path"], strict=True):
        ever.setdefault(h, sp)
    return {"ever": dict(sorted(ever.items())), "last": sorted(now["sha256"])}
