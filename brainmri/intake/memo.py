"""ingest's memo (paths.ingest_cache): what ingest computed for a file, and for a set of files, reused when they come
again.

Scheduled retraining adds a few images to thousands, and ingest decoded and fingerprinted every image again and
screened every pair (10,000 real-like images: 243 s, docs/measurements.md). Two kinds of entry, content-addressed and
verified when read (`core.files.write_verified`: a tampered or truncated entry is recomputed, never used), in a
folder keyed by everything that decides them (`folder`):

- per file, by its bytes' sha256 (`FileMemo`): the normalized PNG's bytes, the manifest fields the file decides, its
  duplicate fingerprint and its outlier features;
- per dedupe params (`PairMemo`): the distinct files judged last time, the pairs joined among them and, when the
  screen was approximate (`dedupe.neighbours`), the pairs it screened. A verdict is a function of the pair, so those
  are exactly the pairs a full run joins among them; only the pairs not screened before are screened and judged.

A memo, not a DVC output: emptying it costs time, never a different manifest (tests/test_memo.py).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np

from brainmri.core.files import read_verified, write_verified
from brainmri.intake.duplicates import Fingerprint
from brainmri.intake.grouping import index_points
from brainmri.intake.manifest import FILE_FIELDS

CODE = Path(__file__).parent  # every intake module's source is in the key: any change there recomputes
PRINT_FIELDS = ("phash", "thumb", "views", "cuts", "turned", "points")
POINTS_SHAPE = (3, 81, 36)  # `grouping.index_points` of one image
MEMO_NAME, SHARD_NAME = re.compile(r"[0-9a-f]{16}"), re.compile(r"[0-9a-f]{2}")  # what `prune` may remove
log = logging.getLogger("brainmri")


def folder(p) -> Path:
    """The memo's folder for this code, these libraries and the params that shape a file's record."""
    from importlib.metadata import version

    h = hashlib.sha256()
    for source in sorted(CODE.glob("*.py")):
        h.update(source.name.encode() + source.read_bytes())
    i = p.ingest
    libraries = [version(name) for name in ("pillow", "numpy", "scipy", "imagehash")]  # decode, fingerprints, hashes
    h.update(json.dumps([libraries, i.max_pixels, i.max_side, i.crop_to_content]).encode())
    h.update(json.dumps(p.dedupe.hash_size).encode())
    return p.path("ingest_cache") / h.hexdigest()[:16]


def usable(where: Path) -> Path | None:
    """`where` when the memo can be written there, else None with a warning: the memo saves time and must never
    stop ingest (a file in the folder's place, a read-only or full disk). Each entry's read and write is guarded
    too: a disk that fills during the run leaves that entry out, to be computed next time."""
    try:
        where.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=where, prefix=".probe-"):
            pass
        return where
    except OSError as exc:
        log.warning("ingest: memo off for this run, %s cannot be written (%s): every file is decoded and every pair judged", where, exc)
        return None


class FileMemo:
    """One entry per file: (PNG bytes, manifest fields, fingerprint, outlier features)."""

    def __init__(self, where: Path):
        self.where = where

    def _shard(self, sha: str) -> Path:
        """Entries in 256 folders by their first two hex digits: an entry is found by listing its folder
        (`read_verified`), and one folder of 10,000 entries made each lookup list all of them (73 s for 10,000)."""
        return self.where / sha[:2]

    def recall(self, sha: str) -> tuple[bytes, dict, Fingerprint, dict] | None:
        shard = self._shard(sha)
        try:
            data = read_verified(shard, sha, ".npz", "decoding the file again") if shard.is_dir() else None
        except OSError:  # unreadable (permissions, a disk error): decode the file again
            return None
        if data is None:
            return None
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as z:
                meta = json.loads(z["meta"].tobytes())
                arrays = {k: z[k] for k in PRINT_FIELDS}
                png = z["png"].tobytes()
            fields, look = meta["fields"], meta["look"]
            if set(fields) != set(FILE_FIELDS) or fields["sha256"] != sha or not all(isinstance(v, float) for v in look.values()):
                return None
            if arrays["points"].shape != POINTS_SHAPE or arrays["points"].dtype != np.float16:
                return None
            return png, fields, Fingerprint(sha, **arrays), look
        except Exception:  # not what `keep` writes, though its name matched its bytes (a zip, a JSON of other keys): decode again
            return None

    def keep(self, png: bytes, fields: dict, fp: Fingerprint, look: dict) -> None:
        meta = json.dumps({"fields": fields, "look": {k: float(v) for k, v in look.items()}}).encode()
        buf = io.BytesIO()
        arrays = {k: getattr(fp, k) for k in PRINT_FIELDS}
        if arrays["points"] is None:  # an entry always carries them: `recall` refuses one without
            arrays["points"] = index_points([fp])[0]
        np.savez(buf, png=np.frombuffer(png, np.uint8), meta=np.frombuffer(meta, np.uint8), **arrays)
        try:
            self._shard(fp.sha256).mkdir(parents=True, exist_ok=True)
            write_verified(self._shard(fp.sha256), fp.sha256, ".npz", buf.getvalue())
        except OSError:  # a full disk mid-run: this file is decoded again next time (`usable` warned of the rest)
            pass


class PairMemo:
    """The distinct files judged by the last run under these dedupe params, the pairs joined among them and, after an
    approximate screen, the pairs it screened."""

    def __init__(self, where: Path, max_distance: int, min_correlation: float, min_partial: float | None):
        rules = json.dumps([max_distance, min_correlation, min_partial]).encode()
        self.where, self.key = where, "pairs-" + hashlib.sha256(rules).hexdigest()[:16]

    def recall(self, shas: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """(known: which of `shas` were judged before, the joined pairs among them, the pairs screened among them,
        all as positions in `shas`; None for the last: every pair, as the exact screen does)."""
        nothing = np.zeros(len(shas), bool), np.zeros((0, 2), np.int64), None
        try:
            data = read_verified(self.where, self.key, ".npz", "judging every pair again") if self.where.is_dir() else None
        except OSError:  # unreadable: judge every pair again
            return nothing
        if data is None:
            return nothing
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as z:
                before, pairs = z["shas"].astype(str), z["pairs"].astype(np.int64).reshape(-1, 2)
                screened = z["screened"].astype(np.int64).reshape(-1, 2) if bool(z["approximate"]) else None
        except Exception:  # not what `keep` writes, though its name matched its bytes: judge every pair again
            return nothing
        ends = np.concatenate([pairs.ravel(), screened.ravel() if screened is not None else np.zeros(0, np.int64)])
        if len(ends) and not (0 <= ends.min() and ends.max() < len(before)):
            return nothing
        position = {s: k for k, s in enumerate(shas)}
        now = np.array([position.get(s, -1) for s in before], np.int64)  # each earlier file's position now, -1 if gone

        def here(x: np.ndarray) -> np.ndarray:  # the pairs of files still here, at their positions now
            return now[x[(now[x] >= 0).all(1)]].reshape(-1, 2) if len(x) else x

        return np.isin(np.arange(len(shas)), now[now >= 0]), here(pairs), None if screened is None else here(screened)

    def keep(self, shas: list[str], pairs: np.ndarray, screened: np.ndarray | None = None) -> None:
        """Replace the entry with this run's files, joined pairs and, for an approximate screen, the pairs it
        screened (positions in `shas`)."""
        buf = io.BytesIO()
        near = np.zeros((0, 2), np.int64) if screened is None else np.asarray(screened, np.int64).reshape(-1, 2)
        np.savez(
            buf,
            shas=np.array(shas, dtype="S64"),
            pairs=np.asarray(pairs, np.int64).reshape(-1, 2),
            approximate=np.array(screened is not None),
            screened=near,
        )
        try:
            self.where.mkdir(parents=True, exist_ok=True)
            write_verified(self.where, self.key, ".npz", buf.getvalue())  # the new entry first: a kill here loses nothing
            kept = f"{self.key}-{hashlib.sha256(buf.getvalue()).hexdigest()[:16]}.npz"
            for old in self.where.glob(f"{self.key}-*.npz"):
                if old.name != kept:
                    old.unlink(missing_ok=True)
        except OSError as exc:  # the groups are found; only the next run's time is at stake
            log.warning("ingest: the memo's pairs were not written to %s (%s): the next run judges every pair again", self.where, exc)


def prune(where: Path, kept: set[str], pairs: PairMemo) -> None:
    """After a run: only this memo folder stays (code, library or params changes leave the others stale), and in it
    only the entries of the files this run kept and this run's pairs; temporary files of killed workers go too.
    Without it the memo grew by a full copy of the set's PNGs at every code or params change. Runs after the stage's
    outputs are written: a failure here is a warning."""
    try:
        _prune(where, kept, pairs)
    except OSError as exc:
        log.warning("ingest: the memo in %s was not pruned (%s); the outputs are written", where, exc)


def _prune(where: Path, kept: set[str], pairs: PairMemo) -> None:
    for other in where.parent.iterdir() if where.parent.is_dir() else ():  # only names the memo makes: 16 hex digits
        if other.is_dir() and other != where and MEMO_NAME.fullmatch(other.name):
            shutil.rmtree(other, ignore_errors=True)
    for entry in where.iterdir() if where.is_dir() else ():
        if entry.is_dir() and SHARD_NAME.fullmatch(entry.name):
            for item in entry.iterdir():
                if item.is_file() and item.name[:64] not in kept:  # a gone file's entry, a killed writer's temporary file
                    item.unlink(missing_ok=True)
        elif entry.is_file() and entry.name.startswith("pairs-") and not entry.name.startswith(pairs.key + "-"):
            entry.unlink(missing_ok=True)
