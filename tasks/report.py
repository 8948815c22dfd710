"""report stage: one Markdown and one self-contained HTML report of every model, with its plots."""

from __future__ import annotations

import base64
import html
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd

from brainmri.config import Params
from brainmri.core.files import atomic_dir, write_text
from brainmri.core.progress import summary
from brainmri.report.plots import (
    confusion_figure,
    curves_figure,
    plt,
    reliability_figure,
    roc_figure,
    saliency_figure,
    samples_figure,
    save,
    strips_figure,
)
from brainmri.report.tables import TABLES
from brainmri.stats.metrics import fmt, paired_auc_differences

ORIGINAL = (
    "The original study reported VGG19 with augmentation best at 86% test accuracy and VGG16 with augmentation lowest at 0.4984 test BCE, "
)
ORIGINAL += (
    "selecting checkpoints on training accuracy, with no validation split and 1/255 scaling; the numbers below avoid those mistakes."
)


def _ci(m: dict, pct: bool = True) -> str:
    scale, spec = (100.0, ".1f") if pct else (1.0, ".3f")
    return f"{fmt(m['value'], spec, scale)} [{fmt(m['ci_low'], spec, scale)}, {fmt(m['ci_high'], spec, scale)}]"


def _cv(c: dict | None, who: str) -> str:
    return f"{c[who]['auc']['mean_of_folds']:.3f} ± {c[who]['auc']['sd_of_folds']:.3f}" if c else "n/a"


def _seed_sd(c: dict | None) -> str:
    spread = (c or {}).get("seed_spread") or {}
    if spread.get("sd") is None:
        return "n/a"
    return f"{spread['sd']:.3f} ({len(spread['seeds'])} seeds, {spread['range'][0]:.3f}-{spread['range'][1]:.3f})"


def results_table(p: Params) -> tuple[pd.DataFrame, dict, dict]:
    rows, trained, evaluated = [], {}, {}
    for name in p.models:
        t = json.loads(p.model_file("models", name, "train_metrics").read_text())
        e = json.loads(p.model_file("eval", name, "metrics").read_text())
        trained[name], evaluated[name] = t, e
        m = e["test"]
        rows.append(
            {
                "Model": name,
                "Weights": Path(t["weights"]["path"]).name if t["weights"]["kind"] == "file" else t["weights"]["kind"],
                "Train acc %": f"{100 * t['train']['accuracy']:.1f}",
                "Test acc % [95% CI]": _ci(m["accuracy"]),
                "Test BCE": fmt(m["bce"]["value"], ".4f"),
                "AUC [95% CI]": _ci(m["auc"], pct=False),
                "Sensitivity % [95% CI]": _ci(m["sensitivity"]),
                "Specificity % [95% CI]": _ci(m["specificity"]),
                "CV AUC, mean of folds ± sd": _cv(t["cv"], "model"),
                "CV AUC, pooled out of fold": fmt(t["cv"]["model"]["auc"]["pooled_out_of_fold"]) if t["cv"] else "n/a",
                "Seed sd of pooled CV AUC": _seed_sd(t["cv"]),
                "LogReg CV AUC, mean of folds ± sd": _cv(t["cv"], "baseline_logreg"),
            }
        )
    return pd.DataFrame(rows), trained, evaluated


def _md_table(frame: pd.DataFrame) -> str:
    head = "| " + " | ".join(frame.columns) + " |\n|" + "---|" * len(frame.columns) + "\n"
    return head + "".join("| " + " | ".join(str(v) for v in row) + " |\n" for row in frame.itertuples(index=False))


RUNTIMES = {
    "keras_predict": "Keras predict",
    "keras_compiled": "Keras compiled",
    "onnxruntime_fp32": "ORT fp32",
    "onnxruntime_int8": "ORT int8",
    "openvino_fp32": "OpenVINO fp32",
    "openvino_bf16": "OpenVINO bf16",
    "openvino_int8": "OpenVINO int8",
}


def latency_table(p: Params) -> tuple[pd.DataFrame | None, dict]:
    """Per model and batch size: ms per image for each runtime, the fair ratios, and int8's accuracy change."""
    rows, machine = [], {}
    for name in p.models:
        path, exp = p.model_file("benchmark", name, "benchmark"), p.model_file("export", name, "export_metrics")
        if not (path.is_file() and exp.is_file()):
            return None, {}
        b, e = json.loads(path.read_text()), json.loads(exp.read_text())
        machine = {
            **b["machine"],
            "peak": b["matmul_peak_gflops"],
            "int8_peak": b.get("int8_gemm_peak_gops", float("nan")),
            "tie_iqr": next(iter(b.get("ranking", {}).values()), {}).get("tie_iqr", float("nan")),
        }
        by = {(r["runtime"], r["batch"]): r for r in b["rows"]}
        for bs in b["settings"]["batch_sizes"]:
            r = b["ratios"][f"batch_{bs}"]
            rows.append(
                {
                    "Model": name,
                    "Batch": bs,
                    **{f"{v} ms": by[k, bs]["p50_ms"] if (k, bs) in by else float("nan") for k, v in RUNTIMES.items()},
                    "Fastest passing its val check": b.get("fastest_admissible", {}).get(f"batch_{bs}") or "n/a",
                    "ORT fp32 / compiled Keras": f"{r['onnxruntime_fp32_speedup_over_keras_compiled']:.2f}x",
                    "int8 / fp32": f"{r['int8_speedup_over_fp32']:.2f}x",
                    "fp32 % peak": f"{100 * by['onnxruntime_fp32', bs]['share_of_matmul_peak']:.0f}",
                    "int8 % peak": f"{100 * by['onnxruntime_int8', bs]['share_of_matmul_peak']:.0f}",
                    "Rankable": rankable(b.get("ranking", {}).get(f"batch_{bs}", {})),
                    "Timed by": "itself" if b.get("timed", {}).get("by", name) == name else f"{b['timed']['by']} (same graphs)",
                    "int8 Δ acc (pts)": f"{e['int8']['accuracy_change_points']:+.1f}",
                    "int8 Δ AUC": f"{e['int8']['auc_change']:+.3f}",
                }
            )
    return pd.DataFrame(rows), machine


def rankable(rank: dict) -> str:
    """The report's 'Rankable' cell for one batch size's ranking (tasks/benchmark.py's ranking)."""
    if not rank.get("rankable", True):
        return "no: spread too wide"
    ties = "; ".join(" = ".join(pair) for pair in rank.get("tied", []))
    return f"yes (tied: {ties})" if ties else "yes"


def latency_figure(table: pd.DataFrame):
    batches = sorted(table["Batch"].unique())
    fig, axes = plt.subplots(1, len(batches), figsize=(6 * len(batches), 4), squeeze=False)
    for ax, bs in zip(axes[0], batches, strict=True):
        t = table[table["Batch"] == bs]
        width = 0.8 / len(RUNTIMES)
        for i, label in enumerate(RUNTIMES.values()):
            ax.bar([j + i * width for j in range(len(t))], t[f"{label} ms"], width, label=label)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(t))], labels=list(t["Model"]), rotation=30, ha="right", fontsize=8)
        ax.set_ylabel("ms per image (median)")
        ax.set_title(f"batch {bs}")
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


SYNTHETIC = (
    "**SYNTHETIC DATA.** These results are on generated phantom images (`brainmri synthesize`), not patient scans: "
    "they show that the pipeline works end to end, not how well it detects tumours."
)


def best_on_validation(p: Params, trained: dict) -> str:
    """The model with the highest validation AUC: chosen without looking at test."""
    return max(p.models, key=lambda n: trained[n]["val"]["auc"] if trained[n]["val"]["auc"] is not None else -1)


def paired_table(p: Params, trained: dict) -> tuple[pd.DataFrame, str]:
    """Each model's test AUC minus that of the model best on validation, with a 95% group-bootstrap interval.

    Every model is scored on the same resamples of the same test images (whole duplicate groups drawn together),
    so the interval is that of the difference: one that excludes 0 marks a real difference, the rest are noise.
    """
    best = best_on_validation(p, trained)
    preds = {n: pd.read_csv(p.model_file("eval", n, "predictions"), keep_default_na=False).set_index("source_path") for n in p.models}
    ref = preds[best].sort_index()
    for n, frame in preds.items():
        if set(frame.index) != set(ref.index):
            raise ValueError(f"{p.model_file('eval', n, 'predictions')}: not the test images {best} was scored on; rerun evaluate")
    y = (ref["actual"] == p.ingest.positive_class).to_numpy(int)
    probs = {n: preds[n].loc[ref.index, "probability"].to_numpy(float) for n in p.models}
    diffs = paired_auc_differences(y, probs, best, ref["group"].to_numpy(), p.train.bootstrap, p.seed)
    rows = []
    for n, d in diffs.items():
        verdict = "reference" if n == best else "worse" if d["ci_high"] < 0 else "better" if d["ci_low"] > 0 else "no clear difference"
        rows.append(
            {
                "Model": n,
                f"Test AUC − {best}'s [95% CI]": f"{d['value']:+.3f} [{d['ci_low']:+.3f}, {d['ci_high']:+.3f}]",
                "Verdict": verdict,
            }
        )
    return pd.DataFrame(rows), best


def sample_grid(p: Params, evaluated: dict, trained: dict, per_kind: int = 6):
    """Test images of the model best on validation (never chosen on test): its most confident right and wrong calls."""
    from PIL import Image

    name = best_on_validation(p, trained)
    preds = pd.read_csv(p.model_file("eval", name, "predictions"), keep_default_na=False)
    images = pd.read_csv(p.path("split_manifest")).set_index("source_path")["image"]
    preds["confidence"] = (preds["probability"] - evaluated[name]["threshold"]).abs()
    preds = preds.sort_values("confidence", ascending=False)
    picked = pd.concat([preds[preds["correct"]].head(per_kind), preds[~preds["correct"]].head(per_kind)])
    samples, paths = [], []
    for r in picked.itertuples():
        paths.append(p.path("ingest_images") / images[r.source_path])
        with Image.open(paths[-1]) as img:
            arr = np.asarray(img.convert("RGB"))
        mark = "right" if r.correct else "WRONG"
        samples.append((arr, f"{mark}: said {r.predicted} (p={r.probability:.2f})\nactually {r.actual}", bool(r.correct)))
    n_right, n_wrong = int(picked["correct"].sum()), int((~picked["correct"]).sum())
    return name, samples, n_right, n_wrong, paths


def lineage_table(p: Params) -> pd.DataFrame | str:
    """Per model, where it came from (dvc.lock): its file's hash, the data manifest's, its key params and the git commit."""
    from brainmri.core.errors import BrainMRIError
    from brainmri.provenance.lineage import lineage, read_lock

    rows = []
    try:
        stages = read_lock(p.root)
    except BrainMRIError as exc:
        return f"Lineage not recorded: {exc}."
    for name in p.models:
        try:
            info = lineage(p.root, p.model_file("models", name, "model"), with_metrics=False, stages=stages)
        except BrainMRIError as exc:
            return f"Lineage not recorded: {exc}."
        chain = {e["stage"]: e for e in info["chain"]}
        manifest = next((o["md5"] for o in chain.get("ingest", {}).get("outs", []) if o["path"] == p.paths.ingest_manifest), None)
        raw = next((d["md5"] for d in chain.get("ingest", {}).get("deps", []) if d["path"] == str(p.ingest.source)), None)
        bb = chain[f"train@{name}"]["params"].get(f"backbones.{p.models[name].backbone}", {})
        git = info["git"]
        rows.append(
            {
                "Model": name,
                "model.keras md5": (info["current_md5"] or "")[:10] + ("" if info["matches_dvc_lock"] else " (not as recorded)"),
                "Stages": " ← ".join(chain),
                "Weights / lr / dense / dropout": " / ".join(str(bb.get(k)) for k in ("weights", "learning_rate", "dense", "dropout")),
                "Raw data md5": (raw or "n/a")[:10],
                "Manifest md5": (manifest or "n/a")[:10],
                "Git commit": (git["commit"] or "none")[:10] + (" (dirty)" if git.get("dirty") else ""),
            }
        )
    return pd.DataFrame(rows)


# ---- data audit (issue 14, items 2 and 4): the shortcut audit's two AUCs, the images flagged for review, the exclusions


def _auc_text(r: dict) -> str:
    a = r["auc"]
    return f"{a['value']:.3f} [{a['ci_low']:.3f}, {a['ci_high']:.3f}]"


MAX_STRIPS = 80  # groups drawn as strips: 80 rows stay well under matplotlib's 2^16-pixel figure limit (reached near 340)


def duplicate_strips(p: Params, out: Path) -> list:
    """Every duplicate group as a strip of its members' thumbnails, so a person can check the grouping by eye."""
    from PIL import Image

    m = pd.read_csv(p.path("ingest_manifest"), keep_default_na=False)
    split = pd.read_csv(p.path("split_manifest"), keep_default_na=False).set_index("source_path")["split"]
    sizes = m["group"].value_counts()
    groups = [g for g in sizes.index if sizes[g] > 1]
    if not groups:
        return ["No duplicate groups: every image is its own scan.", ""]
    strips = []
    ordered = sorted(groups, key=lambda g: m.loc[m["group"] == g, "source_path"].min())
    for g in ordered[:MAX_STRIPS]:
        members = []
        for row in m[m["group"] == g].sort_values("source_path").itertuples():
            with Image.open(p.path("ingest_images") / row.image) as img:
                img.thumbnail((96, 96))
                members.append((np.asarray(img.convert("L")), f"{row.source_path}\n{split.get(row.source_path, 'excluded')}"))
        strips.append((g, members))
    save(strips_figure(strips), out / "duplicates.png")
    rest = [f"- {g}: {', '.join(m.loc[m['group'] == g, 'source_path'].sort_values())}" for g in ordered[MAX_STRIPS:]]
    shown = f"the first {MAX_STRIPS} of {len(groups)} (the rest listed below)" if rest else f"all {len(groups)}"
    return [
        f"Duplicate groups, {shown}, one row each, with each member's file and split (a group never spans two):",
        "",
        "![Every duplicate group, one row each](duplicates.png)",
        "",
        *([*rest, ""] if rest else []),
    ]


def data_audit_section(p: Params, ingest: dict, out: Path) -> list:
    """Markdown lines of the data-audit section; draws the review grid of flagged images into `out`."""
    md = ["## Data audit", "", "### Shortcuts: can the class be predicted without anatomy?", ""]
    path = p.path("audit") / p.paths.files.audit
    if not path.is_file():
        md += [f"The shortcut audit has not run ({path} is missing): `brainmri audit`.", ""]
    else:
        a = json.loads(path.read_text())
        meta, framing = a["metadata"], a["framing"]
        verdict = lambda r: "**a shortcut**" if r["shortcut"] else "no shortcut by this rule"  # noqa: E731
        md += [
            f"A random forest that sees no anatomy, scored by {a['folds']}-fold grouped, stratified cross-validation on "
            f"{a['n_images']} images; AUC {a['auc_kind']}. A shortcut remains when the whole interval lies above "
            f"{a['shortcut_auc']}.",
            "",
            f"- **File metadata** (original width, height, aspect, file size, format, mode, extension case, EXIF): AUC "
            f"{_auc_text(meta)}, {verdict(meta)}. The classes were collected and saved differently, so any trace of that in "
            "the pixels is a route to the label that bypasses anatomy; hence the second audit, on the model inputs.",
            f"- **What the models see** (the {a['image_size']} px square after ingest's normalization"
            f"{', cropped to the head' if a['crop_to_content'] else ''}: padding, content extent, border level and spread): "
            f"AUC {_auc_text(framing)}, {verdict(framing)}. "
            + (
                "The framing of the model inputs still predicts the class: a model can score without looking at the tumour."
                if framing["shortcut"]
                else "The framing no longer gives the class away"
                + (
                    f", though the interval still reaches {framing['auc']['ci_high']:.3f}: a weak framing signal is not ruled out."
                    if framing["auc"]["ci_high"] > a["shortcut_auc"]
                    else "."
                )
            )
            + " Resolution and compression traces inside the image are not audited.",
            "",
        ]
    md += ["### Images flagged for review", ""]
    flagged = ingest.get("outliers", [])
    md.append(
        f"Ingest scores each image against the rest of the set on label-independent shape, intensity and texture statistics; "
        f"{len(flagged)} scored above the robust z-score {ingest.get('outlier_z')} (ingest.outlier_z). They were kept: a person "
        "decides, and confirmed bad files go into ingest.exclude with a reason."
    )
    md.append("")
    if flagged:
        from PIL import Image

        grid = []
        for o in flagged:
            with Image.open(p.path("ingest_images") / o["image"]) as img:
                grid.append((np.asarray(img.convert("RGB")), f"{o['source_path']}\nscore {o['score']:.1f} ({o['feature']})", False))
        save(samples_figure(grid), out / "review.png")
        md += ["![Images flagged for review, with their outlier score and most extreme feature](review.png)", ""]
    excluded = ingest.get("excluded", [])
    md += [f"- Excluded by ingest.exclude: {e['source_path']}: {e['reason']}" for e in excluded] or [
        "- No file excluded (ingest.exclude is empty)."
    ]
    md.append("")
    return md


def report(p: Params) -> dict:
    """Run the stage: write report.md, report.html and the plots; return the headline table as records."""
    table, trained, evaluated = results_table(p)
    paired, best_val = paired_table(p, trained)
    ingest = json.loads(p.path("ingest_report").read_text())
    split = json.loads(p.path("split_report").read_text())
    n_test = next(iter(evaluated.values()))["n_test"] if evaluated else 0
    neg, pos = p.ingest.negative_class, p.ingest.positive_class
    with atomic_dir(p.path("report")) as out:
        curves = {}
        for name in p.models:
            roc = pd.read_csv(p.model_file("eval", name, "roc"))
            curves[name] = (roc["fpr"], roc["tpr"], evaluated[name]["test"]["auc"]["value"])
        save(roc_figure(curves), out / "roc.png")
        save(curves_figure({n: pd.read_csv(p.model_file("models", n, "history")) for n in p.models}), out / "training_curves.png")
        cols = min(4, len(p.models))
        fig, axes = plt.subplots(-(-len(p.models) // cols), cols, figsize=(3.4 * cols, 3.0 * -(-len(p.models) // cols)), squeeze=False)
        for ax, name in zip(axes.ravel(), p.models, strict=False):
            c = json.loads(p.model_file("eval", name, "confusion").read_text())
            confusion_figure(pd.DataFrame(c["matrix"]).to_numpy(), (f"{neg}\n(no tumour)", f"{pos}\n(tumour)"), name, ax=ax)
        for ax in axes.ravel()[len(p.models) :]:
            ax.axis("off")
        fig.tight_layout()
        save(fig, out / "confusion_matrices.png")
        best, samples, n_right, n_wrong, sample_paths = sample_grid(p, evaluated, trained)
        saliency_md = saliency_section(p, best, samples, sample_paths, out)
        save(samples_figure(samples), out / "samples.png")
        lineage = lineage_table(p)
        weights_notes = sorted({f"- **{t['backbone']}**: {t['weights']['description']}" for t in trained.values()})
        d = ingest["duplicates"]
        counts = split["counts"]
        audit_md = data_audit_section(p, ingest, out)
        md = [
            "# Brain MRI tumour classification: results",
            "",
            f"Tumour class: `{pos}`; no-tumour class: `{neg}`. All metrics are on the held-out **test split of {n_test} images**, "
            f"where one image moves accuracy by {100 / max(1, n_test):.1f} points; intervals are 95% percentiles over "
            f"{p.train.bootstrap} bootstrap resamples of whole duplicate groups (a scan and its copies are drawn together). "
            "Every setting behind these numbers was fixed in params or chosen without the test split: head and feature "
            "settings and the threshold rule by cross-validation over train+val, each threshold on the validation split, "
            "the int8 settings on the validation images (table below).",
            "",
            ORIGINAL,
            "",
            *([SYNTHETIC, ""] if ingest.get("synthetic") else []),
            "## Results",
            "",
            table,
            "CV AUC: grouped, stratified "
            + (
                f"{p.train.cv_folds}-fold cross-validation over train+val on cached features. 'Mean of folds' averages each fold's "
                "AUC on its own held-out part (± their sd); 'pooled out of fold' is one AUC over every train+val image's "
                "out-of-fold prediction. Seed sd: the spread of the pooled figure over whole CV runs with other seeds (folds, "
                "initial weights, shuffles), the training luck to read beside the data's intervals. LogReg: a plain logistic "
                "regression on the same frozen features and folds, the bar a trained head should clear."
                if p.train.cv_folds
                else "cross-validation is off."
            ),
            "",
            *selection_section(p, trained),
            "### Which differences are real",
            "",
            f"Each model's test AUC minus that of {best_val}, the model best on validation (chosen without test), with a 95% "
            f"interval over the same {p.train.bootstrap} group-bootstrap resamples for every model. An interval that excludes 0 "
            "is a real difference; the rest are within the luck of a small test split.",
            "",
            paired,
            "",
            "### Weights used",
            "",
            *weights_notes,
            "",
            "## Dataset",
            "",
            f"- {ingest['n_files']} files, {ingest['n_ingested']} ingested, {ingest['n_quarantined']} quarantined, "
            f"{ingest['n_skipped']} skipped.",
            f"- Per class: {', '.join(f'{k} {v}' for k, v in ingest['per_class'].items())}.",
            f"- {d['n_images_in_duplicate_groups']} images in {d['n_duplicate_groups']} duplicate groups "
            f"({d['n_exact_duplicate_files']} byte-identical copies); {len(d['conflicts'])} label conflicts excluded.",
            "- Split: "
            + "; ".join(f"{s} {sum(c.values())} ({', '.join(f'{k} {v}' for k, v in c.items())})" for s, c in counts.items())
            + f". Test images with a duplicate in train: {split['test_leak']:.0%} "
            f"(a naive random split: {split['naive_split_test_leak']:.0%}); each class within "
            f"{100 * split['max_fraction_deviation']:.1f} points of the split fractions.",
            f"- Split ledger: {split['ledger']['images_kept']} images kept the split they had, {split['ledger']['images_new']} "
            f"were placed anew, {split['ledger']['images_moved']} moved because a new image joined groups from different splits.",
            "",
            *duplicate_strips(p, out),
            *audit_md,
            "## Sample test images",
            "",
            f"The test images {best} (the model best on validation) got most confidently right ({n_right} shown, green) and "
            f"wrong ({n_wrong} shown, red).",
            "",
            "![Test images with their predictions](samples.png)",
            "",
            *saliency_md,
            "## Lineage",
            "",
            "Where each model came from, as `dvc.lock` recorded it when this report was written; "
            "`brainmri lineage FILE` prints the whole chain with every hash, param and metric.",
            "",
            lineage,
            "",
            "## Plots",
            "",
            "![ROC curves](roc.png)",
            "",
            "![Confusion matrices (rows: actual, columns: predicted)](confusion_matrices.png)",
            "",
            "![Training curves (dotted: selected epoch)](training_curves.png)",
            "",
        ]
        md += external_section(p, evaluated)
        md += ensemble_section(p)
        md += calibration_section(p, trained, evaluated, out)
        latency, machine = latency_table(p)
        if latency is not None:
            save(latency_figure(latency), out / "latency.png")
            md += [
                "## CPU latency: Keras against ONNX Runtime, measured fairly",
                "",
                "The original study timed `model.evaluate` over the whole test set against `session.run` per batch, which is not "
                "the same work, and reported ONNX 7 to 17 times faster. Here every runtime gets the same preprocessed images at the "
                "same batch sizes, after warm-up, with thread counts set; times are medians of repeated calls, per image.",
                "",
                latency,
                f"Machine: {machine['cpu']}, {machine['cores']} cores, {machine['threads']} threads per runtime; TensorFlow "
                f"{machine['tensorflow']}, Keras {machine['keras']}, ONNX Runtime {machine['onnxruntime']}. ONNX Runtime's own GEMM "
                f"reaches {machine['peak']:.0f} GFLOP/s in float32 and {machine['int8_peak']:.0f} GOP/s in uint8 x int8 here; "
                "'% peak' is each ONNX Runtime row's rate as a share of the peak in its precision. The runtimes are timed in "
                "interleaved rounds; a batch size is 'rankable' when every two neighbours in speed are told apart by their "
                "interquartile ranges, or tied: quartiles that overlap while both are narrow (an IQR within "
                f"{machine['tie_iqr']:.0%} of the median)."
                + (
                    " A model whose graphs match a sibling's (aug and noaug of one backbone, cut at the same layer) shows the "
                    "sibling's timings ('Timed by'): one architecture is timed once, within benchmark.reuse_minutes "
                    f"({p.benchmark.reuse_minutes}) on the same machine and boot; each model's val check is its own."
                    if p.benchmark.reuse_minutes
                    else ""
                ),
                "",
                "![Latency per image by runtime and batch size](latency.png)",
                "",
            ]
        write_text(out / TABLES["results"], _md_table(table))
        write_text(out / TABLES["paired"], _md_table(paired))
        if latency is not None:
            write_text(out / TABLES["latency"], _md_table(latency))
        write_text(out / "report.md", "\n".join(_md_table(x) if isinstance(x, pd.DataFrame) else x for x in md))
        write_text(out / "report.html", _html(md, out))
    summary("report", f"{len(table)} models -> {p.path('report') / 'report.md'}")
    return {"table": table.to_dict(orient="records"), "paired": paired.to_dict(orient="records")}


def external_section(p: Params, evaluated: dict) -> list:
    """The external set's table beside the test figures, or a plain statement that there is none."""
    intake = json.loads(p.path("external_report").read_text())
    head = ["## External validation", ""]
    if not intake["configured"]:
        return [*head, f"No external set: `external.source` ({intake['source']}) holds nothing but hidden files. Put a labelled "
                "set there (both class folders, as for ingest) and `dvc repro` scores every exported model on it.", ""]  # fmt: skip
    rows = []
    for name in p.models:
        e = json.loads((p.path("external_eval") / name / p.paths.files.metrics).read_text())
        if not e.get("n_images"):
            continue
        m, t = e["external"], evaluated[name]["test"]
        rows.append(
            {
                "Model": name,
                "External AUC [95% CI]": _ci(m["auc"], pct=False),
                "External acc % [95% CI]": _ci(m["accuracy"]),
                "Test AUC": f"{t['auc']['value']:.3f}",
                "AUC change (external - test)": fmt(e["change_from_test"]["auc"], "+.3f"),  # n/a when a set has one class
                "Accuracy change (points)": fmt(e["change_from_test"]["accuracy"], "+.1f", 100.0),
            }
        )
    text = [
        *head,
        f"Every exported ONNX model (what `predict` runs) on the external set ({intake['source']}): {intake['n_files']} files, "
        f"{intake['n_quarantined']} quarantined by ingest's rules, {intake['n_duplicates_of_ingested']} left out because they "
        f"duplicate an ingested image (the same detector as ingest), **{intake['n_used']} scored** "
        f"({', '.join(f'{k} {v}' for k, v in intake['per_class'].items())}; {intake['n_groups']} duplicate groups), each model "
        "at its own threshold, with 95% group-bootstrap intervals.",
        "",
    ]
    if intake["synthetic"]:
        text += ["**SYNTHETIC external set**: these numbers check the mechanics only; they are not a generalisation result.", ""]
    return [*text, pd.DataFrame(rows), ""] if rows else [*text, "No external image was left to score.", ""]


def ensemble_section(p: Params) -> list:
    """The ensemble beside its best single member on CV (cross-fitted), test and the external set, and whether it is kept."""
    e = json.loads((p.path("ensemble") / p.paths.files.ensemble).read_text())
    head = ["## Ensemble", ""]
    if not e["configured"]:
        return [*head, "No ensemble: `ensemble.members` is empty.", ""]
    best, cv = e["best_single"], e["cv"]
    flip = " (each image also mirrored left to right, both scored and averaged)" if e["tta_flip"] else ""

    def diff(d: dict) -> str:
        return f"{fmt(d['value'], '+.3f')} [{fmt(d['ci_low'], '+.3f')}, {fmt(d['ci_high'], '+.3f')}]"

    rows = [
        {
            "": "CV AUC, cross-fitted (train+val; best single chosen per fold)",
            "Ensemble": f"{cv['ensemble_auc']:.3f}",
            "Best single member": f"{cv['best_single_auc']:.3f}",
            "Difference [95% CI]": diff(cv["auc_difference"]),
        }
    ]
    for key, label in (("test", "Test"), ("external", "External")):
        if key not in e:
            continue
        s = e[key]
        synthetic = ", SYNTHETIC" if s.get("synthetic") else ""
        rows.append(
            {
                "": f"{label} AUC ({s['n_images']} images{synthetic}; best single: {best})",
                "Ensemble": _ci(s["ensemble"]["auc"], pct=False),
                "Best single member": _ci(s["best_single"]["auc"], pct=False),
                "Difference [95% CI]": diff(s["best_single_auc_difference"]),
            }
        )
        rows.append(
            {
                "": f"{label} accuracy %",
                "Ensemble": _ci(s["ensemble"]["accuracy"]),
                "Best single member": _ci(s["best_single"]["accuracy"]),
                "Difference [95% CI]": "",
            }
        )
    lat = {(x["runtime"], x["batch"]): x["p50_ms"] for x in e["latency"]["rows"]}
    big = max(bs for _, bs in lat)
    rows += [
        {
            "": f"Latency, {rt.replace('_', ' ')} (ms/image, batch 1 / {big}; median)",
            "Ensemble": f"{lat[rt, 1]:.1f} / {lat[rt, big]:.1f}",
            "Best single member": "see the latency table",
            "Difference [95% CI]": "",
        }
        for rt in ("onnxruntime_fp32", "openvino_fp32")
    ]
    members = ", ".join(f"{m} {w:.2f}" for m, w in e["members"].items())
    return [
        *head,
        f"One ONNX graph composed of its members' exported graphs{flip}: the weighted mean of their calibrated probabilities "
        f"(weights {members}), at threshold {e['threshold']:.3f} (Youden's J on val). Members and weights were chosen by "
        f"{e['selection']['protocol']}. The CV row is cross-fitted: each fold's images are scored by an ensemble, and by a best "
        "single member, both chosen (and the members' calibration maps refitted) on the other folds, which removes the bias of "
        f"choosing the members and weights. It does not remove everything: {cv['limits']}. Differences are paired, over "
        "duplicate-group bootstrap resamples; on test and external the best single member is scored the same way as the "
        "ensemble, at its own threshold.",
        "",
        pd.DataFrame(rows),
        "",
        f"**{e['decision'][0].upper()}{e['decision'][1:]}.**",
        "",
    ]


def saliency_section(p: Params, best: str, samples: list, sample_paths: list, out: Path) -> list:
    """The saliency stage's Grad-CAM shares per model, flagged below saliency.min_head_share; and the best model's
    heatmaps over the sample images."""
    from brainmri.intake.preprocess import load_batch

    rows, overlays = [], []
    for name in p.models:
        r = json.loads(p.model_file("saliency", name, "saliency").read_text())
        mean, head = (float("nan") if r[k] is None else r[k] for k in ("mean_share_inside_head", "head_share_of_input"))  # JSON null
        flag = "LOOKS OUTSIDE THE HEAD" if mean < p.saliency.min_head_share else "NO HEATMAP" if not np.isfinite(mean) else ""
        rows.append(
            {
                "Model": name,
                "Heatmap inside the head": f"{mean:.2f}",
                "Head's share of the input": f"{head:.2f}",
                "Empty heatmaps": f"{r['empty_heatmaps']} of {r['n_images']}",
                "Flag": flag,
            }
        )
        if name == best:  # the sample images are test images: the saliency stage drew their heatmaps
            with np.load(p.model_file("saliency", name, "heatmaps")) as f:
                at = {image: i for i, image in enumerate(f["images"].tolist())}
                cams, heads = f["cams"].astype(np.float32), f["heads"]
            picked = list(zip(sample_paths[: p.saliency.images], samples, strict=False))
            x = load_batch([path for path, _ in picked], r["input_size"])
            for xi, (path, (_, title, correct)) in zip(x, picked, strict=True):
                i = at[Path(path).stem]  # every sample is a test image, with its heatmap: a missing one is a bug, so KeyError
                overlays.append((xi.astype(np.uint8), cams[i], heads[i], title, correct))
    if overlays:
        save(saliency_figure(overlays), out / "saliency.png")
    flagged = [r["Model"] for r in rows if r["Flag"]]
    return [
        "### Where the models look",
        "",
        "Grad-CAM heatmaps on each Keras model (the frozen base's last feature map, weighted by the gradient of the output "
        "logit; for a no-tumour call, the evidence against tumour), over the test images, and the share of each heatmap "
        "inside the head (the region ingest crops to, holes filled). A share below "
        f"{p.saliency.min_head_share} (`saliency.min_head_share`) is flagged: such a model looks mostly at margins, text, "
        "padding or borders. Compare each share with the head's share of the input, what attention spread evenly would give. "
        + (f"Flagged: {', '.join(flagged)}." if flagged else "No model is flagged."),
        "",
        pd.DataFrame(rows),
        "",
        *([f"![Grad-CAM heatmaps of {best} over the sample images; the head's outline in white](saliency.png)", ""] if overlays else []),
    ]


def selection_section(p: Params, trained: dict) -> list:
    """Which settings each model was trained and quantized with, and how they were chosen (never on test)."""
    rows = []
    for name in p.models:
        t = trained[name]
        settings, sel = t.get("settings") or {}, t.get("selection") or {}
        points = sel.get("points") or []
        chosen_auc = next((pt["cv_auc_pooled_out_of_fold"] for pt in points if all(pt[k] == v for k, v in settings.items())), None)
        export_file = p.model_file("export", name, "export_metrics")
        int8 = json.loads(export_file.read_text()).get("int8", {}) if export_file.is_file() else {}
        i8 = int8.get("settings") or {}
        rows.append(
            {
                "Model": name,
                "Feature layer": (settings.get("feature_layer") or "whole base") if settings else "",
                "Learning rate": settings.get("learning_rate", ""),
                "Dropout": settings.get("dropout", ""),
                "Epochs": settings.get("epochs", ""),
                "Threshold rule": t.get("threshold_rule", ""),
                "Grid points": len(points) or 1,
                "Chosen point's pooled CV AUC": f"{chosen_auc:.3f}" if chosen_auc is not None else "n/a",
                "int8 (chosen on val)": f"{i8.get('calibration_method', '')}, reduce_range {i8.get('reduce_range', '')}" if i8 else "n/a",
            }
        )
    return [
        "### Settings, and how they were chosen",
        "",
        "Lists in `params.yaml` are grids: every point is cross-validated on train+val only (grouped, stratified folds; "
        "each fold's head fitted as the final one) and the best pooled out-of-fold AUC wins; the threshold rule is chosen "
        "the same way, by pooled out-of-fold balanced accuracy with each fold's threshold set on its inner validation part. "
        "The final head trains on train; val sets its threshold and, with the CV predictions, its calibration. The int8 "
        "file is the candidate closest to fp32 on the validation images. The chosen point's CV AUC is the best of its "
        "grid, so it is biased upwards; the test figures above are not, because test played no part in any choice made "
        "here. Values given as single numbers in params were set by hand beforehand (some, such as 100 epochs without "
        "early stopping, after a cross-validation of an earlier protocol that included the test images).",
        "",
        pd.DataFrame(rows),
        "",
    ]


def calibration_section(p: Params, trained: dict, evaluated: dict, out: Path) -> list:
    """ECE before and after each model's calibration map, and its reliability diagram."""
    rows, tables = [], {}
    for name in p.models:
        cal = trained[name].get("calibration")
        if not cal:
            continue
        rows.append(
            {
                "Model": name,
                "Map": cal["method"]
                + {"temperature": f" (T = {1 / cal['a']:.2f})", "platt": f" (a = {cal['a']:.2f}, c = {cal['c']:+.2f})"}.get(
                    cal["method"], ""
                ),
                "Fitted on": cal["fitted_on"],
                "ECE before": f"{cal['ece_before']:.3f}",
                "ECE after": f"{cal['ece_after']:.3f}",
                "Log loss before -> after": f"{cal['bce_before']:.3f} -> {cal['bce_after']:.3f}",
                "Test ECE (after)": f"{evaluated[name].get('calibration', {}).get('ece_test', float('nan')):.3f}",
            }
        )
        tables[name] = (cal["reliability_before"], cal["reliability_after"], cal["fitted_on"])
    if not rows:
        return []
    save(reliability_figure(tables), out / "reliability.png")
    return [
        "## Calibrated probabilities",
        "",
        f"Each model's output is mapped by `train.calibration` ({p.train.calibration}), fitted on held-out predictions, never on "
        "test, and folded into its output layer, so the exported model and `predict` give the calibrated probability; the "
        "map is monotone, so ranking, AUC and labels do not change. ECE: expected calibration error over 10 equal-mass bins. "
        "'Before' and 'after' are on the predictions the map was fitted on (after is optimistic by the one or two "
        f"parameters fitted); the test figure is on {next(iter(evaluated.values()))['n_test']} images only.",
        "",
        pd.DataFrame(rows),
        "",
        "![Reliability diagrams before (red) and after (blue) calibration](reliability.png)",
        "",
    ]


def _html(md: list, folder) -> str:
    """A self-contained page: the same content, images inlined as data URIs."""
    body = []
    for line in md:
        if isinstance(line, pd.DataFrame):
            body.append(line.to_html(index=False, border=0, classes="results", escape=True))
        elif line.startswith("# "):
            body.append(f"<h1>{html.escape(line[2:])}</h1>")
        elif line.startswith("## "):
            body.append(f"<h2>{html.escape(line[3:])}</h2>")
        elif line.startswith("### "):
            body.append(f"<h3>{html.escape(line[4:])}</h3>")
        elif line.startswith("!["):
            alt, src = line[2:].split("](")
            data = base64.b64encode((folder / src.rstrip(")")).read_bytes()).decode()
            cap = html.escape(alt)
            body.append(f'<figure><img alt="{cap}" src="data:image/png;base64,{data}"><figcaption>{cap}</figcaption></figure>')
        elif line.startswith("- "):
            body.append(f"<li>{html.escape(line[2:]).replace('**', '')}</li>")
        elif line.strip() and not line.startswith("|"):
            text = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", html.escape(line))
            body.append(f'<p class="warning">{text}</p>' if line.startswith("**SYNTHETIC") else f"<p>{text}</p>")
    style = (
        "body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}"
        "table{border-collapse:collapse;font-size:13px}td,th{border-bottom:1px solid #ddd;padding:4px 8px;text-align:right}"
        ".warning{background:#fff4e5;border-left:6px solid #d97706;padding:.6em 1em}th{background:#f3f3f3}"
        "td:first-child,th:first-child{text-align:left}img{max-width:100%}figcaption{font-size:12px;color:#555}"
    )
    head = f"<meta charset='utf-8'><title>Brain MRI results</title><style>{style}</style>"
    return f"<!doctype html><html><head>{head}</head><body>{''.join(body)}</body></html>\n"
