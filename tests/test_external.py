"""External validation: an independent labelled set, read by ingest's rules, less its duplicates of ingested images,
scored by every exported ONNX model; with none configured, every stage and the report say so."""

import json
import shutil

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from brainmri.config import load_params
from brainmri.intake.phantoms import MARKER, generate
from tasks.ensemble import ensemble
from tasks.external import external
from tasks.ingest_external import ingest_external
from tasks.report import report


def test_no_external_set_is_recorded_and_reported_as_such(small_run):
    p, *_ = small_run
    intake = json.loads(p.path("external_report").read_text())
    assert intake["configured"] is False and intake["n_used"] == 0
    for name in p.models:
        m = json.loads((p.path("external_eval") / name / p.paths.files.metrics).read_text())
        assert m["n_images"] == 0 and "no external set" in m["note"]
        assert json.loads((p.path("external_eval") / name / p.paths.files.scores).read_text()) == {}
    md = (p.path("report") / "report.md").read_text()
    assert "## External validation" in md and "No external set" in md


def test_external_images_that_duplicate_ingested_ones_are_left_out_and_the_rest_scored(small_run, tmp_path):
    p, _, evaluated, _ = small_run
    ext = tmp_path / "external"
    generate(ext, {"yes": True, "no": False}, 8, 7, 64, 96, 0.0)  # other phantoms (another seed): the external set
    ingested = pd.read_csv(p.path("ingest_manifest"), keep_default_na=False)
    raw = p.resolve(p.ingest.source)
    exact, recropped = ingested["source_path"].iloc[0], ingested["source_path"].iloc[1]
    shutil.copy(raw / exact, ext / exact.split("/")[0] / "copied.png")  # the same bytes under another name
    with Image.open(raw / recropped) as img:  # the same scan re-cropped by 8% on one side and re-encoded
        w, h = img.size
        img.convert("RGB").crop((0, 0, int(w * 0.92), h)).save(ext / recropped.split("/")[0] / "recropped.jpg", quality=90)
    outs = ("external_images", "external_manifest", "external_report", "external_eval", "ensemble", "report")
    over = {"external": {"source": str(ext)}, "paths": {**{k: str(tmp_path / "out" / k) for k in outs}, "data_root": str(tmp_path / "out")}}
    q = load_params(p.root / "params.yaml", over)
    intake = ingest_external(q)
    assert intake["configured"] and intake["synthetic"] and (ext / MARKER).is_file()
    dups = {d["source_path"]: d["duplicate_of"] for d in intake["duplicates_of_ingested"]}
    assert dups == {f"{exact.split('/')[0]}/copied.png": exact, f"{recropped.split('/')[0]}/recropped.jpg": recropped}
    assert intake["n_used"] == 16 and intake["per_class"] == {"no": 8, "yes": 8}
    kept = pd.read_csv(q.path("external_manifest"), keep_default_na=False)
    assert sorted(x.name for x in q.path("external_images").iterdir()) == sorted(kept.loc[kept["used"], "image"])

    m = external(q, "vgg16-aug")
    auc = m["external"]["auc"]
    assert m["n_images"] == 16 and m["bootstrap_unit"] == "duplicate group" and "SYNTHETIC" in m["note"]
    assert auc["ci_low"] <= auc["value"] <= auc["ci_high"]
    assert m["change_from_test"]["auc"] == round(auc["value"] - evaluated["vgg16-aug"]["test"]["auc"]["value"], 4)
    preds = pd.read_csv(q.path("external_eval") / "vgg16-aug" / "predictions.csv")
    assert len(preds) == 16 and preds["probability"].between(0, 1).all()
    assert set(preds["predicted"]) <= {"yes", "no"} and np.isfinite(preds["probability"]).all()
    for name in p.models:
        if name != "vgg16-aug":
            external(q, name)
    ens = ensemble(q)["external"]  # the ensemble too, beside its best single member scored the same way
    assert ens["n_images"] == 16 and ens["synthetic"] and "ci_low" in ens["best_single_auc_difference"]
    report(q)
    text = (q.path("report") / "report.md").read_text()
    assert "## External validation" in text and "SYNTHETIC external set" in text and "16 scored" in text
    assert "| vgg16-aug |" in text.split("## External validation")[1].split("##")[0]
    assert "External AUC (16 images, SYNTHETIC;" in text.split("## Ensemble")[1].split("\n## ")[0]


def test_a_missing_external_source_is_one_clear_error(tmp_path):
    from factory import make_project

    from brainmri.core.errors import DataError

    p = load_params(make_project(tmp_path, {"external": {"source": "nowhere"}}) / "params.yaml")
    with pytest.raises(DataError, match=r"external set not found at .*nowhere \(external.source in params.yaml\)"):
        ingest_external(p)
    assert not p.path("external_report").exists()
