import io
import json
import os
import tarfile
import zipfile

import numpy as np
import pandas as pd
import pytest
from factory import REPO, SHARED_DATA, brain, cmyk_jpeg, encode, make_project, png16, rgba_png, truncated_jpeg, write_dataset

from brainmri.config import load_params
from brainmri.core.errors import DataError
from tasks.ingest import ingest


def project(tmp_path, source="data/raw/ds", **ingest_over):
    root = make_project(tmp_path / "proj", {"ingest": {"source": str(source), "min_images_per_class": 2, **ingest_over}})
    return load_params(root / "params.yaml")


def test_messy_folder_is_ingested_with_reasons(tmp_path):
    p = project(tmp_path)
    ds = write_dataset(p.resolve("data/raw/ds"), n=3)
    arr = brain(7, tumor=True)
    (ds / "yes" / "zero bytes.jpg").write_bytes(b"")
    (ds / "yes" / "half.jpg").write_bytes(truncated_jpeg(arr))
    (ds / "yes" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (ds / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (ds / "yes" / "really png.jpg").write_bytes(encode(arr, "PNG"))
    (ds / "yes" / "sixteen bit.png").write_bytes(png16(arr))
    (ds / "no" / "cmyk scan.jpg").write_bytes(cmyk_jpeg(brain(8)))
    (ds / "no" / "alpha.png").write_bytes(rgba_png(brain(9)))

    report = ingest(p)

    assert report["n_files"] == 12 and report["n_ingested"] == 10
    reasons = {q["source_path"]: q["reason"] for q in report["quarantined"]}
    assert set(reasons) == {"yes/zero bytes.jpg", "yes/half.jpg"}
    assert "empty file" in reasons["yes/zero bytes.jpg"] and "truncated" in reasons["yes/half.jpg"]
    assert {s["source_path"] for s in report["skipped"]} == {".DS_Store", "yes/.DS_Store"}
    assert report["extension_mismatch"] == ["yes/really png.jpg"]
    m = pd.read_csv(p.path("ingest_manifest"), keep_default_na=False)
    row = m.set_index("source_path").loc
    assert row["yes/really png.jpg", "format"] == "PNG"
    assert row["yes/sixteen bit.png", "mode"].startswith("I")
    assert row["no/cmyk scan.jpg", "mode"] == "CMYK" and row["no/alpha.png", "mode"] == "RGBA"
    for col in ("source_path", "label", "sha256", "width", "height", "mode", "format", "group", "conflict"):
        assert col in m.columns
    assert all((p.path("ingest_images") / name).is_file() for name in m["image"])
    saved = json.loads(p.path("ingest_report").read_text())
    assert saved["n_ingested"] == 10 and saved["quarantined"][0].keys() == {"source_path", "reason"}


@pytest.mark.parametrize(
    ("layout", "message"),
    [
        ({"maybe/a.jpg": "img"}, "unknown class folder 'maybe'"),
        ({"yes/deeper/a.jpg": "img"}, "nested folder 'yes/deeper'"),
        ({"notes.txt": b"hello"}, "'notes.txt'"),
        ({"no/.hidden": b"x"}, "class folder 'no' in"),
    ],
)
def test_layout_errors_stop_with_a_clear_message(tmp_path, layout, message):
    p = project(tmp_path)
    ds = write_dataset(p.resolve("data/raw/ds"), n=3)
    if "no/.hidden" in layout:
        for f in (ds / "no").iterdir():
            f.unlink()
    for rel, content in layout.items():
        (ds / rel).parent.mkdir(parents=True, exist_ok=True)
        (ds / rel).write_bytes(encode(brain(1), "JPEG") if content == "img" else content)
    with pytest.raises(DataError, match=message):
        ingest(p)


def test_missing_class_missing_source_and_too_few_images(tmp_path):
    p = project(tmp_path)
    with pytest.raises(DataError, match="dataset not found at .* ingest.source"):
        ingest(p)
    ds = write_dataset(p.resolve("data/raw/ds"), n=3, classes=("yes",))
    with pytest.raises(DataError, match="class folder 'no' is missing"):
        ingest(p)
    (ds / "no").mkdir()
    (ds / "no" / "only.jpg").write_bytes(encode(brain(1), "JPEG"))
    (ds / "no" / "broken.jpg").write_bytes(b"")
    with pytest.raises(DataError, match=r"too few usable images .*'no': 1"):
        ingest(p)


def test_failed_run_keeps_previous_outputs(tmp_path):
    p = project(tmp_path)
    ds = write_dataset(p.resolve("data/raw/ds"), n=3)
    ingest(p)
    before = p.path("ingest_manifest").read_bytes()
    n_images = len(list(p.path("ingest_images").iterdir()))
    (ds / "intruder").mkdir()
    with pytest.raises(DataError):
        ingest(p)
    assert p.path("ingest_manifest").read_bytes() == before
    assert len(list(p.path("ingest_images").iterdir())) == n_images
    assert not [f for f in p.path("ingest_images").parent.iterdir() if f.name.startswith(".")]  # no temp leftovers


def test_duplicates_are_grouped_and_label_conflicts_flagged(tmp_path):
    p = project(tmp_path)
    ds = write_dataset(p.resolve("data/raw/ds"), n=4, size=(120, 110))
    original = (ds / "yes" / "yes 0.jpg").read_bytes()
    (ds / "yes" / "exact copy.jpg").write_bytes(original)
    arr = brain(101, tumor=True, size=(120, 110))  # the pixels of "yes 1"
    crop = arr[4:-3, 3:-4]
    from PIL import Image

    resized = Image.fromarray(crop).resize((150, 160))
    (ds / "yes" / "resized crop.png").write_bytes(encode(resized, "PNG"))
    (ds / "no" / "mislabelled.jpg").write_bytes((ds / "yes" / "yes 2.jpg").read_bytes())
    ingest(p)
    m = pd.read_csv(p.path("ingest_manifest"), keep_default_na=False).set_index("source_path")
    assert m.loc["yes/exact copy.jpg", "group"] == m.loc["yes/yes 0.jpg", "group"]
    assert m.loc["yes/resized crop.png", "group"] == m.loc["yes/yes 1.jpg", "group"]
    assert m.loc["no/mislabelled.jpg", "group"] == m.loc["yes/yes 2.jpg", "group"]
    assert m["conflict"].sum() == 2 and m.loc["no/mislabelled.jpg", "conflict"]
    others = m.drop(["yes/exact copy.jpg", "yes/yes 0.jpg", "yes/resized crop.png", "yes/yes 1.jpg", "no/mislabelled.jpg", "yes/yes 2.jpg"])
    assert others["group"].is_unique  # distinct phantoms are not merged


def _zip(path, members: dict):
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)


def _tar(path, members: list):
    with tarfile.open(path, "w:gz") as tf:
        for info, data in members:
            tf.addfile(info, io.BytesIO(data) if data is not None else None)


def _tarinfo(name, data=b"", **kw):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    for k, v in kw.items():
        setattr(info, k, v)
    return info


def _dataset_members(prefix=""):
    return {
        f"{prefix}{c}/{c} {i}.jpg": encode(brain(i + 10 * (c == "yes"), tumor=c == "yes"), "JPEG") for c in ("no", "yes") for i in range(3)
    }


@pytest.mark.parametrize("kind", ["zip", "tar.gz"])
def test_archive_with_single_top_folder_is_unwrapped(tmp_path, kind):
    p = project(tmp_path, source=f"data/raw/ds.{kind}")
    archive = p.resolve(f"data/raw/ds.{kind}")
    archive.parent.mkdir(parents=True)
    members = _dataset_members("brain_tumor_dataset/")
    if kind == "zip":
        _zip(archive, members)
    else:
        _tar(archive, [(_tarinfo(n, d), d) for n, d in members.items()])
    report = ingest(p)
    assert report["n_ingested"] == 6
    m = pd.read_csv(p.path("ingest_manifest"))
    assert sorted(m["source_path"])[0] == "no/no 0.jpg"
    assert [f.name for f in p.path("ingest_manifest").parent.iterdir() if f.name.startswith(".extract")] == []


HOSTILE = {
    "zip-slip": ("zip", {"../../escaped.jpg": b"x"}, "climbs out of the archive"),
    "absolute": ("zip", {"/tmp/abs.jpg": b"x"}, "absolute path"),
    "tar-slip": ("tar", [(_tarinfo("no/../../escaped.jpg", b"x"), b"x")], "climbs out"),
    "symlink": ("tar", [(_tarinfo("no/link.jpg", type=tarfile.SYMTYPE, linkname="/etc/passwd"), None)], "is a link to '/etc/passwd'"),
    "hardlink": ("tar", [(_tarinfo("no/hard.jpg", type=tarfile.LNKTYPE, linkname="../../outside"), None)], "is a link"),
    "device": ("tar", [(_tarinfo("no/dev", type=tarfile.CHRTYPE), None)], "not a regular file"),
    "bad-utf8": ("tar", [(_tarinfo("no/caf\udce9.jpg", b"x"), b"x")], "not valid UTF-8"),
    "too-many": ("zip", {f"no/{i}.jpg": b"x" for i in range(30)}, "more than 20 members"),
    "too-big": ("zip", {"no/big.jpg": b"\0" * 5000}, "more than 4000 bytes"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_archives_are_refused_and_write_nothing_outside(tmp_path, case):
    kind, members, message = HOSTILE[case]
    p = project(tmp_path, source="data/raw/evil." + ("zip" if kind == "zip" else "tar.gz"), archive_max_members=20, archive_max_bytes=4000)
    archive = p.resolve(p.ingest.source)
    archive.parent.mkdir(parents=True)
    (_zip if kind == "zip" else _tar)(archive, members)
    before = sorted(str(f) for f in tmp_path.rglob("*"))
    with pytest.raises(DataError, match=message) as exc:
        ingest(p)
    assert "evil." in str(exc.value)  # names the archive
    after = sorted(str(f) for f in tmp_path.rglob("*"))
    assert [f for f in after if f not in before and ".extract-" not in f and "/data/ingest" not in f] == []
    assert not any(".extract-" in f for f in after)
    assert not (tmp_path / "escaped.jpg").exists() and not (tmp_path.parent / "escaped.jpg").exists()


def test_symlinks_and_undecodable_names_in_a_folder_are_quarantined(tmp_path):
    p = project(tmp_path)
    ds = write_dataset(p.resolve("data/raw/ds"), n=3)
    secret = tmp_path / "secret.jpg"
    secret.write_bytes(encode(brain(50), "JPEG"))
    os.symlink(secret, ds / "no" / "link.jpg")
    (ds / "no" / os.fsdecode(b"caf\xe9.jpg")).write_bytes(encode(brain(51), "JPEG"))
    report = ingest(p)
    reasons = {q["source_path"]: q["reason"] for q in report["quarantined"]}
    assert "symbolic link" in reasons["no/link.jpg"]
    assert "not valid UTF-8" in reasons["no/caf\\xe9.jpg"]
    assert report["n_ingested"] == 6


def test_a_class_folder_that_is_a_link_is_named_as_one(tmp_path):
    p = project(tmp_path)
    ds = write_dataset(p.resolve("data/raw/ds"), n=3)
    os.rename(ds / "yes", tmp_path / "yes-elsewhere")
    os.symlink(tmp_path / "yes-elsewhere", ds / "yes")
    with pytest.raises(DataError, match="'yes' in .* is a symbolic link; class folders must be real folders"):
        ingest(p)


def test_real_dataset_ingests_all_253(real_ingest):
    _, report, _ = real_ingest
    assert report["n_files"] == 253 and report["n_ingested"] == 253 and report["quarantined"] == []
    assert report["per_class"] == {"no": 98, "yes": 155}
    assert report["duplicates"]["n_exact_duplicate_files"] > 0  # the set really holds byte-identical copies
    assert report["duplicates"]["n_duplicate_groups"] > report["duplicates"]["n_exact_duplicate_files"] // 2
    assert len(report["extension_mismatch"]) == 6  # PNGs named .jpg


def test_real_scans_saved_twice_with_margin_marks_share_a_group(real_ingest):
    """Two scans each saved twice, one copy with burned-in window/level text or an edge stripe: they straddled
    train and test while the crop kept those marks (84 images in 35 groups then)."""
    p, report, _ = real_ingest
    m = pd.read_csv(p.path("ingest_manifest"), keep_default_na=False).set_index("source_path")
    for a, b in [("yes/Y195.JPG", "yes/Y26.jpg"), ("yes/Y112.JPG", "yes/Y146.JPG")]:
        assert m.loc[a, "group"] == m.loc[b, "group"], (a, b)
    d = report["duplicates"]
    assert (d["n_images_in_duplicate_groups"], d["n_duplicate_groups"], d["conflicts"]) == (92, 38, [])


def test_content_crop_finds_the_head_and_ignores_margin_text_and_edge_stripes():
    from PIL import Image, ImageDraw

    from brainmri.intake.duplicates import content_crop, fingerprint
    from brainmri.intake.grouping import group_ids

    head = np.pad(brain(7, tumor=True, size=(120, 110)), 30)  # on a black margin
    plain = Image.fromarray(head)
    marked = Image.fromarray(np.maximum(head[10:, 6:], 25))  # another crop, on gray (25) film
    draw = ImageDraw.Draw(marked)
    draw.text((2, 2), "A", fill=255)  # a panel letter
    draw.text((2, marked.height - 12), "W 1411 : L 705", fill=230)  # window/level numbers
    draw.rectangle((marked.width - 4, 0, marked.width - 1, marked.height - 1), fill=240)  # a white stripe at the edge
    a, b = content_crop(plain), content_crop(marked)
    assert abs(a.width - b.width) <= 2 and abs(a.height - b.height) <= 2 and a.width < 120  # the head's box, not the marks'
    other = Image.fromarray(np.pad(brain(8, tumor=True, size=(120, 110)), 30))
    prints = [fingerprint(img, str(i), 8) for i, img in enumerate([plain, marked, other])]
    g = group_ids(["a", "b", "c"], prints, max_distance=10, min_correlation=0.95)
    assert g[0] == g[1] != g[2]


@pytest.mark.parametrize("seed", range(8))
def test_content_crop_sees_past_a_thin_bright_frame_along_the_edges(seed):
    """12 real scans carry a thin white line along three or four edges. The background level came from the outermost
    pixels, so the line set it (127-237), and the crop took a panel letter, the tumour of a dim scan, or nothing."""
    from PIL import Image, ImageDraw

    from brainmri.intake.decode import content_crop

    rng = np.random.default_rng(seed)
    head = np.pad(brain(seed, tumor=True, size=(120, 110)), 30).astype(np.float64)
    if seed % 2:  # a dim scan (as FLAIR often is) with one bright lesion: the lesion alone clears a frame-set threshold
        head *= 0.4
        yy, xx = np.mgrid[: head.shape[0], : head.shape[1]]
        head[(yy - 80) ** 2 + (xx - 70) ** 2 < 15**2] = 230
    plain = Image.fromarray(head.astype(np.uint8))
    framed = np.array(plain)
    width, level = int(rng.integers(1, 3)), int(rng.integers(120, 256))
    sides = [slice(None)] * 4
    edges = [(slice(0, width), sides[0]), (slice(-width, None), sides[1]), (sides[2], slice(0, width)), (sides[3], slice(-width, None))]
    for k in rng.permutation(4)[: 3 + seed % 2]:  # three or four sides
        framed[edges[k]] = level
    marked = Image.fromarray(framed)
    if seed % 4 < 2:
        ImageDraw.Draw(marked).text((framed.shape[1] - 12, framed.shape[0] - 14), "B", fill=255)  # a panel letter
    a, b = content_crop(plain), content_crop(marked)
    assert a.width > 50 and a.height > 60, a.size  # the head (66-84 x 86-106 px), not the lesion (31 x 31)
    assert abs(a.width - b.width) <= 2 and abs(a.height - b.height) <= 2, (a.size, b.size)  # and the same head when framed


@pytest.mark.parametrize("film", [True, False])
def test_content_crop_finds_a_scan_pasted_on_white(film):
    """3 real scans lie on a white page or slide, on their own black film or with none around the head: every pixel was
    below a threshold set by the white, and nothing was cropped."""
    from PIL import Image

    from brainmri.intake.decode import content_crop

    head = np.pad(brain(3, tumor=True, size=(120, 110)), 30)
    a = content_crop(Image.fromarray(head))
    page = np.full((head.shape[0] + 90, head.shape[1] + 70), 255, np.uint8)
    page[20 : 20 + head.shape[0], 50 : 50 + head.shape[1]] = head if film else np.where(head > 24, head, 255)
    b = content_crop(Image.fromarray(page))
    slack = 2 if film else 12  # with no film, the head's bright rim merges with the white and the box ends inside it
    assert abs(a.width - b.width) <= slack and abs(a.height - b.height) <= slack, (a.size, b.size)


def assert_each_copy_joins_only_its_original(originals: list, copies: list) -> None:
    """copies[k] is a copy of originals[k] (all different scans) that the whole-view rule misses: the full detector
    joins each copy to its own original and no other."""
    from brainmri.intake.duplicates import fingerprint, joined

    d = load_params(REPO / "params.yaml").dedupe
    prints = [fingerprint(img, str(i), d.hash_size) for i, img in enumerate([*originals, *copies])]
    whole = joined(prints, d.max_distance, d.min_correlation)
    same = joined(prints, d.max_distance, d.min_correlation, d.min_partial_correlation)
    n = len(originals)
    assert not any(whole[k, n + k] for k in range(n))  # the whole-view rule alone misses every one of them
    assert np.array_equal(same[:n, n:], np.eye(n, dtype=bool)), same[:n, n:]  # each joins its own original, no other


def test_copies_cropped_into_the_head_join_their_original_and_no_other_scan():
    """A real scan cut 10-25% into the head on one or two sides, then padded or rescaled: the whole-view measures no
    longer agree, the partial rule (one image a trimmed part of the other) joins it to its original only."""
    from PIL import Image, ImageOps

    names = ["yes/Y1.jpg", "yes/Y20.jpg", "no/no 10.jpg", "no/N1.JPG"]
    originals = [Image.open(SHARED_DATA / n).convert("RGB") for n in names]
    copies = []
    for k, img in enumerate(originals):
        w, h = img.size
        box = [(0, 0.2, 1, 1), (0, 0, 0.8, 0.85), (0.25, 0, 1, 1), (0.1, 0, 1, 0.8)][k]  # shares of width and height
        cut = img.crop((int(box[0] * w), int(box[1] * h), int(box[2] * w), int(box[3] * h)))
        copies.append(ImageOps.expand(cut, 20, fill=(30, 30, 30)) if k % 2 else cut.resize((cut.width // 2, cut.height // 2)))
    assert_each_copy_joins_only_its_original(originals, copies)


def test_copies_turned_or_nicked_join_their_original_and_smooth_heads_stay_apart():
    """A real scan turned by 2-3 degrees, or cut a few percent into the head where no straight edge shows: the
    whole-view hash moves too far, the close rule (a small trim or turn, inside and out) joins each copy to its own
    original only. Smooth phantoms, whose outlines correlate at about 0.98 once cropped to the head, stay apart."""
    from PIL import Image

    from brainmri.intake.duplicates import fingerprint, joined
    from brainmri.intake.phantoms import phantom

    d = load_params(REPO / "params.yaml").dedupe
    names = ["yes/Y27.jpg", "no/No22.jpg", "yes/Y17.jpg", "yes/Y3.jpg"]  # four different scans
    originals = [Image.open(SHARED_DATA / n).convert("RGB") for n in names]
    turned = [img.rotate(a, resample=Image.Resampling.BILINEAR, fillcolor=(0, 0, 0)) for img, a in zip(originals[:2], (-3, 3), strict=True)]
    nicked = [img.crop((0, 0, int(img.width * (1 - f)), img.height)) for img, f in zip(originals[2:], (0.08, 0.12), strict=True)]
    copies = [*turned, *nicked]  # off the right side: 8 and 12% of the image
    assert_each_copy_joins_only_its_original(originals, copies)
    rng = np.random.default_rng(3)
    smooth = [Image.fromarray(phantom(rng, bool(i % 2), 224, 224)) for i in range(40)]
    for i in range(40):  # and small ones, JPEG-coded, as the test fixtures' phantoms (64-96 px)
        buf = io.BytesIO()
        Image.fromarray(phantom(rng, bool(i % 2), int(rng.integers(64, 97)), int(rng.integers(64, 97)))).save(
            buf, format="JPEG", quality=90
        )
        smooth.append(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
    prints = [fingerprint(img, f"p{i}", d.hash_size) for i, img in enumerate(smooth)]
    apart = joined(prints, d.max_distance, d.min_correlation, d.min_partial_correlation)
    assert not np.triu(apart, 1).any(), np.argwhere(np.triu(apart, 1))


def test_the_detector_reproduces_every_verdict_of_the_reviewed_pair_list(real_ingest):
    """tests/data/reviewed_pairs.csv: every pair the detector joined on the real set and the 40 closest it kept apart,
    each marked by eye. Two images share a group exactly when their verdict is 'same scan'."""
    p, *_ = real_ingest
    group = pd.read_csv(p.path("ingest_manifest"), keep_default_na=False).set_index("source_path")["group"]
    pairs = pd.read_csv(REPO / "tests" / "data" / "reviewed_pairs.csv", comment="#", keep_default_na=False)
    assert len(pairs) == 118 and (pairs["verdict"] == "same scan").sum() == 78
    assert set(pairs["verdict"]) == {"same scan", "different scans"}
    same = [group[a] == group[b] for a, b in zip(pairs["a"], pairs["b"], strict=True)]
    wrong = pairs[np.array(same) != (pairs["verdict"] == "same scan").to_numpy()]
    assert wrong.empty, wrong
