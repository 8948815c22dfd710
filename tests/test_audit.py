"""The data audit (issue 14): shortcuts planted in phantoms are found, outliers flagged, exclusions recorded."""

import json

import numpy as np
import pandas as pd
import pytest
from factory import brain, encode, make_project
from PIL import Image

from brainmri.config import load_params
from brainmri.core.errors import DataError
from tasks.audit import audit
from tasks.ingest import ingest

N = 20  # phantoms per class: enough for 5 grouped folds, a few seconds to ingest and audit


def project(tmp_path, **ingest_over):
    over = {"ingest": {"source": "data/raw/ds", "min_images_per_class": 2, **ingest_over}, "audit": {"bootstrap": 300}}
    return load_params(make_project(tmp_path / "proj", over) / "params.yaml")


def exif_jpeg(arr: np.ndarray) -> bytes:
    exif = Image.Exif()
    exif[0x010F] = "ScannerCo"  # Make: any tag makes the file carry EXIF
    return encode(arr, "JPEG", quality=92, exif=exif.tobytes())


def write(p, cls: str, name: str, data: bytes) -> None:
    folder = p.resolve("data/raw/ds") / cls
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_bytes(data)


@pytest.mark.heavy  # the audit's grouped CV fits thousands of classifiers
def test_metadata_shortcut_in_phantoms_is_found_raw_and_absent_from_the_model_inputs(tmp_path):
    """Tumour phantoms saved as '.PNG', the others as EXIF-tagged '.jpg': the files give the class away, the pixels do not."""
    p = project(tmp_path)
    rng = np.random.default_rng(0)
    for i in range(N):
        for cls in ("no", "yes"):
            size = (int(rng.integers(96, 160)),) * 2  # same size distribution in both classes
            arr = brain(1000 * (cls == "yes") + i, tumor=cls == "yes", size=size)
            write(p, cls, *((f"{cls}{i}.PNG", encode(arr, "PNG")) if cls == "yes" else (f"{cls}{i}.jpg", exif_jpeg(arr))))
    ingest(p)
    m = pd.read_csv(p.path("ingest_manifest"), keep_default_na=False).set_index("source_path")
    assert m.loc["yes/yes0.PNG", "extension"] == ".PNG" and not m.loc["yes/yes0.PNG", "exif"].astype(bool)
    assert m.loc["no/no0.jpg", "exif"].astype(bool) and m.loc["no/no0.jpg", "file_bytes"] > 0

    record = audit(p)

    meta, framing = record["metadata"], record["framing"]
    assert meta["shortcut"] and meta["auc"]["ci_low"] > 0.6 and meta["auc"]["value"] > 0.95
    assert not framing["shortcut"] and framing["auc"]["ci_low"] <= 0.6
    scores = json.loads((p.path("audit") / p.paths.files.scores).read_text())
    assert scores["metadata_auc"] == meta["auc"]["value"] and scores["framing_auc_ci_low"] == framing["auc"]["ci_low"]
    usable = int((~m["conflict"].astype(bool)).sum())  # label conflicts are left out, as split leaves them out
    assert json.loads((p.path("audit") / p.paths.files.audit).read_text())["n_images"] == usable > 30


def _framed_phantoms(p) -> None:
    """Tumour phantoms in a wide black frame (as the real set's tumour scans are framed differently), the others tight."""
    for i in range(N):
        for cls in ("no", "yes"):
            arr = brain(1000 * (cls == "yes") + i, tumor=cls == "yes", size=(120, 110))
            if cls == "yes":
                arr = np.pad(arr, ((10, 10), (50, 50)))
            write(p, cls, f"{cls}{i}.jpg", encode(arr, "JPEG", quality=92))


@pytest.mark.heavy  # the audit's grouped CV fits thousands of classifiers
def test_a_framing_shortcut_reaches_the_model_inputs_unless_ingest_crops_to_the_head(tmp_path):
    p = project(tmp_path, crop_to_content=False)
    _framed_phantoms(p)
    ingest(p)
    assert audit(p)["framing"]["shortcut"]

    cropped = project(tmp_path, crop_to_content=True)
    ingest(cropped)
    framing = audit(cropped)["framing"]
    assert not framing["shortcut"] and framing["auc"]["ci_low"] <= 0.6


def test_exclude_drops_the_named_files_and_records_why(tmp_path):
    p = project(tmp_path, exclude=[{"path": "yes/yes1.jpg", "reason": "abdominal CT, not a head scan"}])
    for i in range(3):
        for cls in ("no", "yes"):
            write(p, cls, f"{cls}{i}.jpg", encode(brain(10 * i + (cls == "yes")), "JPEG"))
    report = ingest(p)
    assert report["excluded"] == [{"source_path": "yes/yes1.jpg", "reason": "abdominal CT, not a head scan"}]
    assert report["n_files"] == 6 and report["n_ingested"] == 5 and report["per_class"] == {"no": 3, "yes": 2}
    m = pd.read_csv(p.path("ingest_manifest"), keep_default_na=False)
    assert "yes/yes1.jpg" not in set(m["source_path"])

    wrong = project(tmp_path, exclude=[{"path": "yes/nope.jpg", "reason": "typo"}])
    before = p.path("ingest_manifest").read_bytes()
    with pytest.raises(DataError, match=r"ingest.exclude names \['yes/nope.jpg'\], not found"):
        ingest(wrong)
    assert p.path("ingest_manifest").read_bytes() == before  # nothing already produced is lost


def test_outlier_screen_flags_a_planted_non_brain_image(tmp_path):
    """A trunk-like section (wider than tall, bright bone inside, no scalp) among head phantoms is flagged and kept."""
    p = project(tmp_path)
    for i in range(N):
        for cls in ("no", "yes"):
            write(p, cls, f"{cls}{i}.jpg", encode(brain(1000 * (cls == "yes") + i, tumor=cls == "yes", size=(128, 112)), "JPEG"))
    yy, xx = np.mgrid[0:110, 0:160]
    trunk = np.where(((yy - 55) / 45) ** 2 + ((xx - 80) / 72) ** 2 <= 1, 110, 0).astype(np.uint8)
    trunk[((yy - 75) / 9) ** 2 + ((xx - 80) / 9) ** 2 <= 1] = 250  # a vertebra
    trunk[((yy - 45) / 25) ** 2 + ((xx - 50) / 20) ** 2 <= 1] = 140  # an organ
    write(p, "yes", "scan.jpg", encode(trunk, "JPEG"))

    report = ingest(p)

    assert [o["source_path"] for o in report["outliers"]][:1] == ["yes/scan.jpg"]
    assert len(report["outliers"]) <= 0.1 * report["n_ingested"]  # a screen a person can review, not half the set
    m = pd.read_csv(p.path("ingest_manifest"), keep_default_na=False).set_index("source_path")
    assert m.loc["yes/scan.jpg", "outlier"].astype(bool) and report["n_ingested"] == 2 * N + 1  # flagged, not dropped


def test_real_set_audit_and_flags(real_ingest):
    """On the real set: the files carry a shortcut, the cropped model inputs do not by the 0.6 rule; the CT is flagged."""
    p, report, _ = real_ingest
    assert "yes/Y248.JPG" in {o["source_path"] for o in report["outliers"]}  # the abdominal CT in the tumour class
    record = audit(p)
    assert record["metadata"]["shortcut"] and not record["framing"]["shortcut"]
