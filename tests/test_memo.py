"""ingest's memo (brainmri.intake.memo): a rerun decodes and judges only what is new, and writes the manifest a run
without the memo writes."""

import hashlib
import shutil

import numpy as np
import pytest
from factory import brain, encode, write_dataset
from PIL import Image
from test_grouping import RULES, _set
from test_ingest import project

from brainmri.intake import workers
from brainmri.intake.duplicates import fingerprint
from brainmri.intake.grouping import candidates, group_ids
from brainmri.intake.memo import PairMemo
from brainmri.intake.memo import folder as memo_folder
from brainmri.intake.phantoms import phantom
from tasks.ingest import ingest


def _pairs(found) -> set:
    return {tuple(sorted(map(int, x))) for x in found}


def _cut_set(seed: int) -> list[Image.Image]:
    """Phantom scans and crops of them cut deep into the head on one or two sides: images the crop rule trims (its
    queries grouped by the sides where they look cut), which `_set`'s milder copies do not reach."""
    rng = np.random.default_rng(seed)
    images = []
    for k in range(12):
        scan = Image.fromarray(np.pad(phantom(rng, bool(k % 2), 160, 150), 24)).convert("RGB")
        w, h = scan.size
        boxes = [(0, int(0.35 * h), w, h), (int(0.3 * w), 0, w, h), (int(0.3 * w), int(0.3 * h), w, h), (0, 0, int(0.7 * w), int(0.75 * h))]
        images += [scan, scan.crop(boxes[k % 4])]
    return images


@pytest.mark.parametrize("images", ["copies 5", "copies 8", "cut 4"])
def test_the_screen_of_new_images_finds_every_candidate_with_a_new_image(images):
    """candidates(new=mask) is exactly the full screen's pairs that have a new image, whichever images are new."""
    kind, seed = images.split()
    made = _set(10, int(seed)) if kind == "copies" else _cut_set(int(seed))
    prints = [fingerprint(img, f"k{i}", 8) for i, img in enumerate(made)]
    assert kind == "copies" or sum(p.cuts.any() for p in prints) >= 10  # the crop rule's grouped queries are reached
    full = _pairs(candidates(prints, RULES[0], RULES[2]))
    rng = np.random.default_rng(int(seed))
    for share in (0.1, 0.5, 0.9):
        new = rng.random(len(prints)) < share
        got = _pairs(candidates(prints, RULES[0], RULES[2], new))
        assert got == {(i, j) for i, j in full if new[i] or new[j]}, share
    assert len(full) > 20  # enough pairs that a lost one would show


def test_groups_through_the_memo_are_the_groups_without_it(tmp_path):
    """Old images judged once, then a set with new ones, some dropped, and copies: the same groups as one full run."""
    images = _set(12, seed=5)
    prints = [fingerprint(img, f"k{i}", 8) for i, img in enumerate(images)]
    memo = PairMemo(tmp_path / "memo", *RULES)
    old = prints[:15]  # _set puts each copy after its scan: the 8th scan here, its copy among the new ones
    keys = [p.sha256 for p in old]
    assert group_ids(keys, old, *RULES, memo=memo) == group_ids(keys, old, *RULES)
    now = prints[2:] + prints[5:7]  # two old ones gone, every new one in, two files twice
    keys = [p.sha256 for p in now]
    with_memo = group_ids(keys, now, *RULES, memo=memo)
    assert with_memo == group_ids(keys, now, *RULES)
    was_old = {p.sha256 for p in old}
    spans = {g for g in with_memo if {k in was_old for k, h in zip(keys, with_memo, strict=True) if h == g} == {True, False}}
    assert spans  # a new image joined an old one's group: found by the screen of new images alone


def _count_decodes(monkeypatch) -> list:
    calls = []
    real = workers.decode_bytes

    def counted(data, **kw):
        calls.append(len(data))
        return real(data, **kw)

    monkeypatch.setattr(workers, "decode_bytes", counted)
    return calls


def test_a_rerun_decodes_only_new_files_and_writes_the_same_outputs(tmp_path, monkeypatch):
    p = project(tmp_path)
    ds = write_dataset(p.resolve("data/raw/ds"), n=4)
    calls = _count_decodes(monkeypatch)
    ingest(p)
    assert len(calls) == 8
    scan = Image.fromarray(brain(11, tumor=True)).convert("RGB")
    (ds / "yes" / "new.png").write_bytes(encode(np.asarray(scan), "PNG"))
    (ds / "yes" / "new cropped.png").write_bytes(encode(np.asarray(scan.crop((0, 20, scan.width, scan.height))), "PNG"))
    shutil.copy(next((ds / "no").iterdir()), ds / "no" / "a copy.jpg")
    calls.clear()
    ingest(p)
    assert len(calls) == 2  # the copy's bytes were seen before
    outputs = {f: p.path(f).read_bytes() for f in ("ingest_manifest",)}
    images = {f.name: f.read_bytes() for f in p.path("ingest_images").iterdir()}
    shutil.rmtree(p.path("ingest_cache"))
    calls.clear()
    ingest(p)
    assert len(calls) == 10  # eleven files, two with the same bytes: the second is the first's entry
    assert {f: p.path(f).read_bytes() for f in outputs} == outputs
    assert {f.name: f.read_bytes() for f in p.path("ingest_images").iterdir()} == images


def test_a_tampered_entry_is_recomputed_not_used(tmp_path, monkeypatch):
    p = project(tmp_path)
    write_dataset(p.resolve("data/raw/ds"), n=3)
    ingest(p)
    manifest = p.path("ingest_manifest").read_bytes()
    entries = sorted(p.path("ingest_cache").rglob("*.npz"))
    assert len(entries) == 7  # six files and the pairs
    for e in entries:
        e.write_bytes(e.read_bytes()[:-9] + b"tampered!")
    calls = _count_decodes(monkeypatch)
    ingest(p)
    assert len(calls) == 6 and p.path("ingest_manifest").read_bytes() == manifest


def test_changed_params_do_not_reuse_the_memo(tmp_path, monkeypatch):
    """max_side shapes every normalized PNG: a rerun under another value decodes everything again."""
    p = project(tmp_path)
    write_dataset(p.resolve("data/raw/ds"), n=3)
    ingest(p)
    calls = _count_decodes(monkeypatch)
    q = project(tmp_path, max_side=96)
    ingest(q)
    assert len(calls) == 6
    assert {Image.open(f).size[0] <= 96 for f in q.path("ingest_images").iterdir()} == {True}


def test_the_memo_keeps_only_what_the_last_run_used(tmp_path):
    """A params change leaves the old folder stale: it goes, and so do the entries of files no longer in the set."""
    p = project(tmp_path)
    ds = write_dataset(p.resolve("data/raw/ds"), n=3)
    ingest(p)
    q = project(tmp_path, max_side=96)
    gone = next((ds / "yes").iterdir())
    gone.unlink()
    mine = q.path("ingest_cache") / "my notes"  # not a name the memo makes: never removed
    mine.mkdir()
    (mine / "keep.txt").write_text("mine")
    sha = hashlib.sha256(next((ds / "no").iterdir()).read_bytes()).hexdigest()  # a file that stays
    stale = memo_folder(q) / sha[:2] / f".{sha}-0123456789abcdef.npz.x1y2.tmp.npz"  # a killed worker's, in q's folder
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"")
    ingest(q)
    folders = [f for f in q.path("ingest_cache").iterdir() if f != mine]
    assert len(folders) == 1 and len(list(folders[0].rglob("*.npz"))) == 5 + 1  # five files and the pairs
    assert (mine / "keep.txt").read_text() == "mine" and not stale.exists()


def test_a_foreign_entry_that_matches_its_hash_is_not_trusted(tmp_path, monkeypatch):
    """An entry whose name matches its bytes but whose content is not an entry (a zip, wrong fields, a row that
    would rename a file's class) is decoded again, never used and never a crash."""
    import hashlib
    import io

    p = project(tmp_path)
    write_dataset(p.resolve("data/raw/ds"), n=3)
    ingest(p)
    manifest = p.path("ingest_manifest").read_bytes()
    entries = sorted(p.path("ingest_cache").rglob("*.npz"))
    zipped = io.BytesIO()
    with __import__("zipfile").ZipFile(zipped, "w") as z:
        z.writestr("meta.npy", b"not an array")
    for k, e in enumerate(entries):
        data = zipped.getvalue() if k % 2 else b"PK\x03\x04" + bytes(40)
        e.unlink()
        e.with_name(f"{e.name.rsplit('-', 1)[0]}-{hashlib.sha256(data).hexdigest()[:16]}.npz").write_bytes(data)
    calls = _count_decodes(monkeypatch)
    ingest(p)
    assert len(calls) == 6 and p.path("ingest_manifest").read_bytes() == manifest


def test_a_memo_that_cannot_be_written_never_stops_ingest(tmp_path, monkeypatch, caplog):
    """A file where the memo's folder goes, and a disk that fills while entries are written: ingest writes the same
    manifest as with a working memo, says the memo is off or was not written, and the next run decodes again."""
    import errno

    from brainmri.intake import memo

    p = project(tmp_path)
    write_dataset(p.resolve("data/raw/ds"), n=3)
    ingest(p)
    manifest = p.path("ingest_manifest").read_bytes()
    shutil.rmtree(p.path("ingest_cache"))
    p.path("ingest_cache").write_text("not a folder")
    caplog.set_level("WARNING", logger="brainmri")
    ingest(p)
    assert p.path("ingest_manifest").read_bytes() == manifest and "memo off for this run" in caplog.text
    p.path("ingest_cache").unlink()

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(memo, "write_verified", full)
    caplog.clear()
    ingest(p)
    assert p.path("ingest_manifest").read_bytes() == manifest and "the memo's pairs were not written" in caplog.text
    monkeypatch.undo()
    calls = _count_decodes(monkeypatch)
    ingest(p)
    assert len(calls) == 6 and p.path("ingest_manifest").read_bytes() == manifest  # nothing half-written was trusted
