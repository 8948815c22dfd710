"""Where the crop to the head may have gone wrong: each image's head box as a share of its view, smallest first.

Decodes every non-hidden file under a dataset folder (one sub-folder per class; ingest.exclude is not applied) with
ingest's limits, and finds the head's box as ingest's crop does (brainmri.intake.decode.head_box). It prints how many images found
no head (they are kept uncropped) and every image whose head box covers less than --share of its view: a panel
letter, a lesion or a frame line taken for the head leaves a small box. --sheet draws the smallest boxes over their
images for a look. Example:
    python benchmarks/crops.py ../shared/data/brain_tumor_dataset --sheet crops.png
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from brainmri.config import load_params
from brainmri.core.errors import BrainMRIError
from brainmri.intake.decode import decode_file, head_box

TILE = 200  # px per image on the contact sheet


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder", type=Path, help="a dataset folder with one sub-folder per class")
    ap.add_argument("--params", default="params.yaml", help="whose ingest settings to decode with (default: %(default)s)")
    ap.add_argument("--share", type=float, default=0.25, help="list head boxes below this share of the view (default: %(default)s)")
    ap.add_argument("--sheet", type=Path, help="write the smallest boxes, drawn over their images, to this PNG")
    ap.add_argument("--n", type=int, default=12, help="images on the sheet (default: %(default)s)")
    args = ap.parse_args()
    ing = load_params(args.params).ingest
    rows, none = [], []
    hidden = lambda f: any(x.startswith(".") for x in f.relative_to(args.folder).parts)  # noqa: E731 - as ingest skips them
    for path in sorted(f for f in args.folder.rglob("*") if f.is_file() and not hidden(f)):
        try:
            view = decode_file(path, max_pixels=ing.max_pixels, max_side=ing.max_side, max_bytes=ing.max_file_bytes).image
        except BrainMRIError as exc:
            print(f"{path}: not decoded: {exc}", file=sys.stderr)
            continue
        box = head_box(view)
        if box is None:
            none.append(path)
            continue
        rows.append(((box[2] - box[0]) * (box[3] - box[1]) / (view.width * view.height), path, box, view))
    rows.sort(key=lambda r: r[0])
    shares = np.array([r[0] for r in rows])
    print(f"{len(rows) + len(none)} images; no head found (kept uncropped): {len(none)}")
    for path in none:
        print(f"  {path.relative_to(args.folder)}")
    if len(shares):
        low, mid = np.percentile(shares, [5, 50])
        print(f"head box share of the view: min {shares.min():.3f}, 5th percentile {low:.3f}, median {mid:.3f}")
    small = [r for r in rows if r[0] < args.share]
    print(f"below {args.share}: {len(small)}")
    for share, path, box, _ in small:
        print(f"  {share:.3f}  {path.relative_to(args.folder)}  box {box}")
    if args.sheet and rows:
        sheet = Image.new("RGB", (TILE * min(args.n, len(rows)), TILE))
        for i, (_, _, box, view) in enumerate(rows[: args.n]):
            img = view.convert("RGB")
            ImageDraw.Draw(img).rectangle((box[0], box[1], box[2] - 1, box[3] - 1), outline=(0, 255, 0), width=2)
            img.thumbnail((TILE, TILE))
            sheet.paste(img, (TILE * i, 0))
        sheet.save(args.sheet)
        print(f"the {min(args.n, len(rows))} smallest boxes drawn in {args.sheet}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
