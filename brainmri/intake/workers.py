"""ingest's per-image work (decode, normalized PNG, duplicate fingerprint, outlier features) in worker processes.

Each image's work depends on that image alone, so it runs in a process pool (concurrent.futures) when a set is large
enough to pay for starting the workers; results come back in the files' order, so the manifest, the quarantine list
and every group are what one process makes. Workers are spawned, not forked: a flow may hold TensorFlow's threads.
A spawned worker imports the main module again, so a script that runs the stage itself needs the usual
`if __name__ == "__main__":` guard (the brainmri command, pytest and Prefect have theirs).
"""

from __future__ import annotations

import hashlib
import io
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from multiprocessing import get_context
from pathlib import Path

from brainmri.config import Params
from brainmri.core import machine
from brainmri.core.errors import ImageError
from brainmri.core.progress import progress
from brainmri.intake.decode import decode_bytes, head_box, read_capped, save_png
from brainmri.intake.duplicates import fingerprint
from brainmri.intake.grouping import index_points
from brainmri.intake.manifest import file_fields, manifest_row
from brainmri.intake.memo import FileMemo
from brainmri.intake.outliers import features
from brainmri.intake.sources import SourceFile, image_id

MIN_PARALLEL = 200  # fewer images than this run in the stage's own process: starting a worker (imports) takes ~2 s
MAX_WORKERS = 8  # each holds one image's arrays (~100 MB at the 40 MP cap); more cores than this add little to ingest
CHUNK = 8  # images handed to a worker at a time: fewer round trips, and a slow image holds back at most 7 others


def workers() -> int:
    """Processes for the per-image work: the cores this process may use (its share when the flow runs it beside another
    stage), at most MAX_WORKERS."""
    return min(MAX_WORKERS, machine.stage_cores())


def one(f: SourceFile, p: Params, out: Path, memo: Path | None = None) -> tuple[SourceFile, str | None, tuple | None]:
    """Decode one file and write its PNG: (file, None, (manifest row, fingerprint, features)), or (file, reason, None)
    when it does not decode under ingest's limits. With a `memo` folder (`memo.FileMemo`), a file seen before is
    not decoded again: its PNG and record come from there."""
    i, iid, kept = p.ingest, image_id(f.source_path), FileMemo(memo) if memo is not None else None
    try:
        data = read_capped(f.path, i.max_file_bytes)
        if kept is not None and (hit := kept.recall(hashlib.sha256(data).hexdigest())) is not None:
            png, fields, fp, look = hit
            (out / f"{iid}.png").write_bytes(png)
            return f, None, (manifest_row(f, fields, iid), fp, look)
        dec = decode_bytes(data, max_pixels=i.max_pixels, max_side=i.max_side, crop_to_content=i.crop_to_content)
    except ImageError as exc:
        return f, str(exc), None
    encoded = io.BytesIO()
    save_png(dec.image, encoded)  # encoded once, for the stage's folder and the memo
    (out / f"{iid}.png").write_bytes(encoded.getvalue())
    gray = dec.uncropped.convert("L")
    box = dec.head if i.crop_to_content else head_box(gray)  # the head found once for the crop, print and features
    crop = gray if box is None else gray.crop(box)
    look = features(dec.uncropped, crop)  # label-independent appearance, for the outlier screen
    fields, fp = file_fields(dec), fingerprint(dec.uncropped, dec.sha256, p.dedupe.hash_size, crop)
    fp = replace(fp, points=index_points([fp])[0])  # here, on the pool's cores and kept in the memo, not in the screen
    if kept is not None:
        kept.keep(encoded.getvalue(), fields, fp, look)
    return f, None, (manifest_row(f, fields, iid), fp, look)


def _limit_threads() -> None:
    """A worker's BLAS runs one thread: the pool already keeps every core busy."""
    from threadpoolctl import threadpool_limits

    threadpool_limits(1)


def ingested(p: Params, files: list[SourceFile], quarantined: list[dict], out: Path, desc: str, memo: Path | None = None):
    """(row, fingerprint, features) per file that decodes, in the files' order; the others go to `quarantined`."""
    n = workers() if len(files) >= MIN_PARALLEL else 1
    if n == 1:
        results = (one(f, p, out, memo) for f in files)
        yield from _collect(progress(results, desc, total=len(files)), quarantined)
        return
    with ProcessPoolExecutor(n, mp_context=get_context("spawn"), initializer=_limit_threads) as pool:
        try:
            results = pool.map(one, files, [p] * len(files), [out] * len(files), [memo] * len(files), chunksize=CHUNK)
            yield from _collect(progress(results, desc, total=len(files)), quarantined)
        finally:
            pool.shutdown(cancel_futures=True)


def _collect(results, quarantined: list[dict]):
    for f, reason, done in results:
        if reason is not None:
            quarantined.append({"source_path": f.source_path, "reason": reason})
        else:
            yield done
