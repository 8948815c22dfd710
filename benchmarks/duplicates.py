"""Duplicate detection against copies made the way real copies differ, on the real images.

Every real image gets one perturbed copy per kind (and one with three kinds at once): cropped 5-25% off one or two
sides, padded, rescaled 0.5-2x, a letter or a line of text burned into a corner or margin, re-encoded as JPEG at
quality 30-95, gamma 0.8-1.25, rotated by up to 3 degrees. Each copy goes through the same decoding boundary as
ingest (encoded bytes -> brainmri.intake.decode.decode_bytes) and ingest's fingerprint. Printed, in one run:

- recall: the share of copies the detector groups with their original, per kind and overall (target: 99%), grouped
  with every copy present (as ingest groups a folder) and alone (each copy joined directly to its original's group);
- false merges: pairs of real images in different groups before the copies were added that end up in one group
  after (a copy that bridges two different scans), and the pairs of the reviewed list's 'different scans' that merge.

    python benchmarks/duplicates.py [--data ../shared/data/brain_tumor_dataset] [--seed 0] [--index [--neighbours K]]
"""

from __future__ import annotations

import argparse
import io
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw, ImageOps

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from brainmri.config import load_params  # noqa: E402
from brainmri.core.machine import cpu_model  # noqa: E402
from brainmri.intake.decode import decode_bytes, decode_file  # noqa: E402
from brainmri.intake.duplicates import components, fingerprint, joined  # noqa: E402
from brainmri.intake.grouping import joined_pairs  # noqa: E402


def crop(img, rng):
    w, h = img.size
    sides = rng.choice(4, size=rng.integers(1, 3), replace=False)
    box = [0, 0, w, h]
    for s in sides:
        f = rng.uniform(0.05, 0.25)
        if s == 0:
            box[0] = int(w * f)
        elif s == 1:
            box[1] = int(h * f)
        elif s == 2:
            box[2] = int(w * (1 - f))
        else:
            box[3] = int(h * (1 - f))
    return img.crop(tuple(box))


def pad(img, rng):
    w, h = img.size
    border = tuple(int(v) for v in rng.uniform(0.05, 0.3, 4) * [w, h, w, h])
    return ImageOps.expand(img, border=border, fill=int(rng.choice([0, 0, 20, 40])))


def rescale(img, rng):
    f = float(np.exp(rng.uniform(np.log(0.5), np.log(2.0))))
    return img.resize((max(16, int(img.width * f)), max(16, int(img.height * f))), Image.Resampling.BILINEAR)


def text(img, rng):
    out = img.convert("RGB")
    draw = ImageDraw.Draw(out)
    w, h = out.size
    label = str(rng.choice(["A", "B", "R", "L", "W 1411 : L 705", "T2 FLAIR", "SE 3 IM 12", "04/2011"]))
    x = int(rng.choice([2, w - 8 * len(label) - 2, w // 3]))
    y = int(rng.choice([2, h - 14, h // 2]))
    draw.text((max(0, x), max(0, y)), label, fill=(255, 255, 255) if rng.random() < 0.7 else (200, 200, 200))
    return out


def jpeg(img, rng):
    buf = io.BytesIO()
    img.convert("RGB").save(buf, format="JPEG", quality=int(rng.integers(30, 96)))
    return Image.open(io.BytesIO(buf.getvalue()))


def gamma(img, rng):
    g = rng.uniform(0.8, 1.25)
    arr = np.asarray(img.convert("RGB"), np.float64) / 255.0
    return Image.fromarray(np.clip(255 * arr**g, 0, 255).astype(np.uint8))


def rotate(img, rng):
    return img.convert("RGB").rotate(rng.uniform(-3, 3), resample=Image.Resampling.BILINEAR, fillcolor=(0, 0, 0))


KINDS = {"crop": crop, "pad": pad, "rescale": rescale, "text": text, "jpeg": jpeg, "gamma": gamma, "rotate": rotate}


def parse_args() -> argparse.Namespace:
    """The command line: the data folder and the perturbations' seed."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "brain_tumor_dataset"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--index", action="store_true", help="group as ingest does (grouping.joined_pairs' screen), not every pair")
    ap.add_argument("--neighbours", type=int, default=0, help="with --index: the approximate screen with this many neighbours, at any size")
    return ap.parse_args()


def decode_originals(root: Path, files: list[str], max_bytes: int, limits: dict, hash_size: int) -> tuple[list, list]:
    """Each real image decoded as ingest decodes it, as (relative path, decoded image) pairs, and their fingerprints."""
    originals, prints = [], []
    for rel in files:
        dec = decode_file(root / rel, max_bytes=max_bytes, **limits)
        originals.append((rel, dec))
        prints.append(fingerprint(dec.uncropped, dec.sha256, hash_size))
    return originals, prints


def perturb(img, kind: str, rng):
    """A copy of `img` perturbed by one kind, or by three kinds drawn at once for "three at once"."""
    steps = list(rng.choice(list(KINDS), 3, replace=False)) if kind == "three at once" else [kind]
    out = img
    for s in steps:
        out = KINDS[s](out, rng)
    return out


def perturbed_copies(root: Path, originals: list, rng, limits: dict, hash_size: int) -> tuple[list, list]:
    """The fingerprints of every original's perturbed copies (one per kind, one with three at once), and each copy's
    (original's index, kind)."""
    copies, meta = [], []
    for i, (rel, _) in enumerate(originals):
        img = Image.open(root / rel)
        img.load()
        for kind in [*KINDS, "three at once"]:
            out = perturb(img, kind, rng)
            buf = io.BytesIO()
            out.convert("RGB").save(buf, format="PNG")  # lossless after the perturbation (a JPEG step's loss is already in)
            cd = decode_bytes(buf.getvalue(), **limits)
            copies.append(fingerprint(cd.uncropped, cd.sha256, hash_size))
            meta.append((i, kind))
    return copies, meta


def recall(meta: list, pairs: np.ndarray, base: list, groups: list) -> pd.DataFrame:
    """Per copy: its kind, whether it is grouped with its original ("found") and whether it joins it alone ("alone")."""
    n = len(base)
    real = {}  # each copy's real images joined to it directly
    for a, b in pairs:
        if (a < n) != (b < n):
            real.setdefault(max(a, b), set()).add(min(a, b))
    return pd.DataFrame(
        [
            # grouped: with every copy present, as ingest would group them (other copies of the scan may bridge);
            # alone: the copy joined directly to a member of its original's group, as if it were the only copy
            {"kind": k, "found": groups[n + j] == groups[i], "alone": any(base[r] == base[i] for r in real.get(n + j, ()))}
            for j, (i, k) in enumerate(meta)
        ]
    )


def merged_pairs(base: list, groups: list) -> int:
    """The number of pairs of real images in different groups before the copies were added that share one group after."""
    before = pd.Series(base)
    after = pd.Series(groups[: len(base)])
    merged = 0
    for members in after.groupby(after).groups.values():
        olds = before[list(members)].value_counts()
        if len(olds) > 1:  # groups that were apart and are now one
            sizes = olds.to_numpy()
            merged += int((sizes.sum() ** 2 - (sizes**2).sum()) // 2)
    return merged


def reviewed_merges(originals: list, groups: list) -> tuple[int, int]:
    """How many of the reviewed list's 'different scans' pairs end up in one group, and how many pairs it lists."""
    reviewed = pd.read_csv(REPO / "tests" / "data" / "reviewed_pairs.csv", comment="#", keep_default_na=False)
    index = {rel: k for k, (rel, _) in enumerate(originals)}
    diff = reviewed[reviewed["verdict"] == "different scans"]
    return sum(groups[index[a]] == groups[index[b]] for a, b in zip(diff["a"], diff["b"], strict=True)), len(diff)


def print_recall(found: pd.DataFrame) -> None:
    """Prints the recall, grouped and alone, per kind and overall."""
    table = found.groupby("kind", sort=False)[["found", "alone"]].agg(["mean", "sum", "count"])
    for kind, row in table.iterrows():
        g, a = row["found"], row["alone"]
        share = f"{100 * g['mean']:6.2f}% ({int(g['sum'])}/{int(g['count'])})"
        print(f"  recall {kind:14s} {share}  alone {100 * a['mean']:6.2f}% ({int(a['sum'])})")
    g, a = found["found"], found["alone"]
    print(f"  recall overall        {100 * g.mean():6.2f}% ({int(g.sum())}/{len(found)})  alone {100 * a.mean():6.2f}% ({int(a.sum())})")


def main() -> None:
    args = parse_args()
    p = load_params(REPO / "params.yaml")
    d, limits = p.dedupe, {"max_pixels": p.ingest.max_pixels, "max_side": p.ingest.max_side, "crop_to_content": p.ingest.crop_to_content}
    root = Path(args.data)
    files = sorted(str(f.relative_to(root)) for f in root.glob("*/*") if f.is_file())
    start = time.monotonic()
    originals, prints = decode_originals(root, files, p.ingest.max_file_bytes, limits, d.hash_size)
    copies, meta = perturbed_copies(root, originals, np.random.default_rng(args.seed), limits, d.hash_size)
    n = len(prints)
    all_prints = prints + copies
    rules = (d.max_distance, d.min_correlation, d.min_partial_correlation)
    started = time.monotonic()
    if args.index:
        pairs = joined_pairs(all_prints, *rules, args.neighbours)  # the screen's candidates, each judged once (as ingest groups)
    else:
        pairs = np.argwhere(np.triu(joined(all_prints, *rules), 1))  # each pair's verdict, every pair scored
    grouping_s = time.monotonic() - started
    base = components([x.sha256 for x in prints], [(a, b) for a, b in pairs if b < n])
    groups = components([x.sha256 for x in all_prints], pairs)
    found = recall(meta, pairs, base, groups)
    merged = merged_pairs(base, groups)
    reviewed_merged, n_different = reviewed_merges(originals, groups)
    print(f"CPU: {cpu_model()}; {n} real images, {len(copies)} perturbed copies, seed {args.seed}, {time.monotonic() - start:.0f} s")
    how = "screened candidates (--index)" if args.index else "every pair scored"
    how += f", approximate screen: {args.neighbours} neighbours" if args.index and args.neighbours else ""
    print(f"grouping: {how}, {grouping_s:.0f} s; {len(pairs)} pairs joined")
    print(
        f"dedupe: hash_size {d.hash_size}, max_distance {d.max_distance}, min_correlation {d.min_correlation}, "
        f"min_partial_correlation {d.min_partial_correlation}"
    )
    print(f"real set: {n} images in {len(set(base))} groups; recall grouped (all copies present) / alone (one copy at a time):")
    print_recall(found)
    print(f"false merges: {merged} pairs of real images from different groups joined by a copy; "
          f"{reviewed_merged} of {n_different} reviewed 'different scans' pairs merged")  # fmt: skip


if __name__ == "__main__":
    main()
