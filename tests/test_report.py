import json
import os
import re
import shutil

import numpy as np
import pandas as pd
import pytest
from PIL import Image


def test_report_has_every_model_table_plots_and_self_contained_html(small_run):
    p, trained, evaluated, result = small_run
    folder = p.path("report")
    md = (folder / "report.md").read_text()
    for name in p.models:
        assert f"| {name} |" in md
    assert "Test acc % [95% CI]" in md and "AUC [95% CI]" in md and "Sensitivity" in md and "Specificity" in md
    assert f"test split of {evaluated['vgg16-aug']['n_test']} images" in md
    assert "random initialisation" in md  # the weights used are stated
    chosen = md.split("### Settings, and how they were chosen", 1)[1].split("###", 1)[0]  # how each setting was chosen
    for name in p.models:
        t = trained[name]
        lr = "–" if t["settings"].get("dense") == 0 else t["settings"]["learning_rate"]  # a linear head has none
        assert f"| {name} | {t['settings']['feature_layer'] or 'whole base'} | {lr} |" in chosen
    assert "**Test**: nothing" in chosen and "Threshold set on" in chosen  # where each number was set
    look = md.split("### Where the models look", 1)[1].split("##", 1)[0]  # Grad-CAM's share inside the head, per model
    assert all(f"| {name} |" in look for name in p.models) and "(saliency.png)" in look
    for png in re.findall(r"\]\(([^)]+\.png)\)", md):
        assert (folder / png).stat().st_size > 2000
    html = (folder / "report.html").read_text()
    flagged = json.loads(p.path("ingest_report").read_text())["outliers"]  # the review grid is drawn when any image is flagged
    groups = pd.read_csv(p.path("ingest_manifest"))["group"].value_counts()
    assert (groups > 1).any() and "![Every duplicate group, one row each](duplicates.png)" in md  # phantoms hold copies
    assert html.count("data:image/png;base64,") == 8 + bool(flagged) and 'src="http' not in html and html.count("<table") == 8
    assert "## Calibrated probabilities" in md and "ECE before" in md  # every model's map, before and after
    for name in p.models:
        cal = trained[name]["calibration"]
        assert f"| {name} | platt (a = {cal['a']:.2f}, c = {cal['c']:+.2f}) |" in md and f"{cal['ece_after']:.3f}" in md
    assert "SYNTHETIC DATA" in md and "SYNTHETIC DATA" in html  # phantoms say so, from the dataset's own marker
    assert "![Test images with their predictions](samples.png)" in md and "(the reference model, best by pooled CV AUC)" in md
    assert "Lineage not recorded: no dvc.lock" in md  # run outside DVC here; tests/test_pipeline.py has the recorded case
    assert "CPU latency" in md and "ORT fp32 / compiled Keras" in md and "int8 / fp32" in md
    reused = json.loads(p.model_file("benchmark", "vgg16-aug", "benchmark").read_text())["timed"]["reused"]
    assert "| itself |" in md and (not reused or "| vgg16-noaug (same graphs) |" in md)  # a sibling's timings say so
    assert [r["Model"] for r in result["table"]] == list(p.models)
    assert "CV AUC, mean of folds ± sd" in md and "CV AUC, pooled out of fold" in md and "pooled out of fold' is one AUC" in md
    verdicts = {r["Model"]: r["Verdict"] for r in result["paired"]}
    from brainmri.report.results import reference_model

    cv_auc = {n: trained[n]["cv"]["model"]["auc"]["pooled_out_of_fold"] for n in p.models if trained[n].get("cv")}
    best = max(cv_auc, key=cv_auc.get)  # chosen by pooled CV AUC over train+val, never by val's few images
    assert reference_model(p, trained) == best
    assert list(verdicts) == list(p.models) and verdicts[best] == "reference"
    assert set(verdicts.values()) <= {"reference", "better", "worse", "no clear difference"} and "### Which differences are real" in md
    assert "were placed anew, 0 moved because" in md  # the split ledger's first run
    opening = md.split("## Results", 1)[0]  # the data summary comes before the results: classes per split, as counted
    counts = json.loads(p.path("split_report").read_text())["counts"]
    for c in p.ingest.classes:
        assert f"| {c} | {counts['train'][c]} | {counts['val'][c]} | {counts['test'][c]} |" in opening
    assert "No subjects table (ingest.subjects)" in opening
    audit = json.loads((p.path("audit") / p.paths.files.audit).read_text())
    assert f"AUC {audit['metadata']['auc']['value']:.3f} [" in md and f"AUC {audit['framing']['auc']['value']:.3f} [" in md
    assert "### Images flagged for review" in md and f"{len(flagged)} scored above the robust z-score" in md


def test_html_report_renders_in_headless_chromium(small_run, tmp_path):
    """The self-contained page opened in a real browser: its tables are there and every image decodes."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        if os.environ.get("BRAINMRI_REQUIRE_BROWSER"):
            pytest.fail("chromium is required here (apt-get install chromium)")
        pytest.skip("no chromium on this machine (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    p = small_run[0]
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto((p.path("report") / "report.html").as_uri())
        seen = page.evaluate(
            "() => ({tables: [...document.querySelectorAll('table')].map(t => t.rows.length),"
            " images: [...document.images].map(i => [i.complete, i.naturalWidth, i.alt]),"
            " headings: [...document.querySelectorAll('h2')].map(h => h.innerText),"
            " strong: document.querySelector('.warning strong')?.innerText})"
        )
        page.screenshot(path=tmp_path / "report.png", full_page=True)
        browser.close()
    n = len(p.models) + 1
    # the data (a row per class and the totals); results; settings; paired; saliency; ensemble (CV; val AUC, accuracy,
    # sensitivity and specificity at the threshold set on CV; test AUC and accuracy; two latency rows); calibration; latency
    assert seen["tables"] == [len(p.ingest.classes) + 2, n, n, n, n, 10, n, 2 * len(p.models) + 1]
    flagged = json.loads(p.path("ingest_report").read_text())["outliers"]
    assert len(seen["images"]) == 8 + bool(flagged) and all(done and width > 300 for done, width, _ in seen["images"])
    assert {"ROC curves", "Test images with their predictions"} <= {alt for *_, alt in seen["images"]}
    assert any(alt.startswith("Reliability diagrams") for *_, alt in seen["images"])
    sections = {"Results", "Data audit", "Sample test images", "Lineage", "Dataset", "Plots", "Calibrated probabilities", "Ensemble"}
    assert sections <= set(seen["headings"])
    assert seen["strong"] == "SYNTHETIC DATA."
    shot = np.asarray(Image.open(tmp_path / "report.png").convert("L"))
    assert shot.shape[0] > 2500 and shot.std() > 20  # a long page with content, not a blank one
