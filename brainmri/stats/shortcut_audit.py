"""The shortcut audit: can the class be predicted without anatomy?

Two plain classifiers, each scored by grouped, stratified cross-validation over every usable image:
- metadata: what the original files say about themselves (size, aspect, bytes, format, mode, extension case, EXIF);
- framing: what survives into the square the models see (ingest's normalization, then the padding to a square):
  the padded share of rows and columns, the extent of the content, and the level and spread of the border.
The AUC is pooled over every image's out-of-fold prediction, and its 95% interval comes from resampling whole
duplicate groups. A shortcut remains when that interval lies wholly above audit.shortcut_auc: a classifier that
never sees anatomy then tells the classes apart, and so could a network.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.compose import ColumnTransformer
from sklearn.ensemble import RandomForestClassifier
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedGroupKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import OneHotEncoder

from brainmri.config import Params
from brainmri.core.errors import DataError
from brainmri.intake.decode import BACKGROUND, load_rgb
from brainmri.intake.preprocess import square
from brainmri.stats import multiclass
from brainmri.stats.metrics import _auc, group_resamples

CATEGORICAL = ("format", "mode", "upper_case_extension", "exif")
BORDER = 1 / 16  # the outer ring of the square, 1/16 of its side wide, is the 'border' whose statistics are audited


def metadata_features(manifest: pd.DataFrame) -> pd.DataFrame:
    """The original files' own description: nothing here depends on what the image shows."""
    ext = manifest["extension"].astype(str)
    return pd.DataFrame(
        {
            "width": manifest["width"].astype(float),
            "height": manifest["height"].astype(float),
            "aspect": manifest["width"] / manifest["height"],
            "log_file_bytes": np.log(manifest["file_bytes"].astype(float)),
            "format": manifest["format"].astype(str),
            "mode": manifest["mode"].astype(str),
            "upper_case_extension": (ext != ext.str.lower()).astype(str),
            "exif": manifest["exif"].astype(str),
        }
    )


def framing_features(gray: np.ndarray) -> dict[str, float]:
    """Size, padding and border statistics of one model input (a square grayscale array), nothing inside the head."""
    n = gray.shape[0]
    dark = gray <= BACKGROUND
    ring = np.ones_like(dark)
    w = max(1, round(n * BORDER))
    ring[w:-w, w:-w] = False
    fg_rows, fg_cols = np.flatnonzero(~dark.all(axis=1)), np.flatnonzero(~dark.all(axis=0))
    return {
        "empty_rows": float(dark.all(axis=1).mean()),  # rows with no tissue: the padding above and below, and dark margins
        "empty_cols": float(dark.all(axis=0).mean()),
        "content_height": float(fg_rows[-1] - fg_rows[0] + 1) / n if len(fg_rows) else 0.0,
        "content_width": float(fg_cols[-1] - fg_cols[0] + 1) / n if len(fg_cols) else 0.0,
        "border_mean": float(gray[ring].mean()),
        "border_sd": float(gray[ring].std()),
        "border_dark": float(dark[ring].mean()),
    }


def image_features(p: Params, manifest: pd.DataFrame) -> pd.DataFrame:
    """Framing features of each normalized image as the models see it: padded to a square at audit.image_size."""
    rows = []
    for name in manifest["image"]:
        arr = square(load_rgb(p.path("ingest_images") / name), p.audit.image_size)
        rows.append(framing_features(arr.astype(np.float64).mean(axis=2)))
    return pd.DataFrame(rows, index=manifest.index)


def classifier(features: pd.DataFrame, seed: int):
    """A random forest: plain, needs no scaling, and finds thresholds and interactions (a square frame, one format)
    that a linear model would need hand-made terms for. Shallow and many-treed, so 250 images do not overfit it."""
    cats = [c for c in CATEGORICAL if c in features.columns]
    encode = ColumnTransformer([("cat", OneHotEncoder(handle_unknown="ignore"), cats)], remainder="passthrough")
    forest = RandomForestClassifier(n_estimators=200, max_depth=4, min_samples_leaf=3, random_state=seed, n_jobs=1)
    return make_pipeline(encode, forest)


def auc_interval(y: np.ndarray, prob: np.ndarray, groups: np.ndarray, n_boot: int, seed: int) -> dict:
    """AUC with a 95% percentile interval over resamples of whole duplicate groups (brainmri.stats.metrics' bootstrap and
    its numpy AUC: scikit-learn's input checks cost ~5 ms a call, most of the stage's time over 2 x 2000 resamples)."""
    draws = [_auc(y[i], prob[i]) for i in group_resamples(groups, len(y), n_boot, seed) if len(np.unique(y[i])) == 2]
    lo, hi = np.percentile(draws, [2.5, 97.5])
    return {"value": round(float(roc_auc_score(y, prob)), 4), "ci_low": round(float(lo), 4), "ci_high": round(float(hi), 4)}


def grouped_cv(features: pd.DataFrame, y: np.ndarray, groups: np.ndarray, p: Params) -> dict:
    """Pooled out-of-fold AUC with a 95% group-bootstrap interval, the per-fold AUCs, and the feature importances."""
    if not p.ingest.binary:
        oof, fold_aucs = _out_of_fold_classes(features, y, groups, p)
        auc = multiclass.with_intervals(y, oof, p.ingest.label_names, p.audit.bootstrap, p.seed, groups=groups)["overall"]["auc"]
        return _record(features, y, p, auc, fold_aucs)
    folds = StratifiedGroupKFold(n_splits=p.audit.folds, shuffle=True, random_state=p.seed)
    oof = np.full(len(y), np.nan)
    fold_aucs = []
    for train, test in folds.split(features, y, groups):
        model = classifier(features, p.seed).fit(features.iloc[train], y[train])
        oof[test] = model.predict_proba(features.iloc[test])[:, 1]
        if len(np.unique(y[test])) == 2:
            fold_aucs.append(roc_auc_score(y[test], oof[test]))
    auc = auc_interval(y, oof, groups, p.audit.bootstrap, p.seed)
    return _record(features, y, p, auc, fold_aucs)


def _out_of_fold_classes(features: pd.DataFrame, y: np.ndarray, groups: np.ndarray, p: Params) -> tuple[np.ndarray, list[float]]:
    """N classes: pooled out-of-fold probabilities (n, K) (a class a fold's training part lacks gets 0) and each fold's
    macro one-vs-rest AUC (over the classes its held-out part has)."""
    k = len(p.ingest.label_names)
    folds = StratifiedGroupKFold(n_splits=p.audit.folds, shuffle=True, random_state=p.seed)
    oof, fold_aucs = np.zeros((len(y), k)), []
    for train, test in folds.split(features, y, groups):
        model = classifier(features, p.seed).fit(features.iloc[train], y[train])
        oof[np.ix_(test, model.classes_)] = model.predict_proba(features.iloc[test])
        fold_aucs.append(multiclass.point(y[test], oof[test])[0]["auc"])
    return oof, fold_aucs


def _record(features: pd.DataFrame, y: np.ndarray, p: Params, auc: dict, fold_aucs: list[float]) -> dict:
    """The audit's record of one feature set: its AUC, the folds' spread, the importances of a forest fitted on all."""
    full = classifier(features, p.seed).fit(features, y)
    names = full[0].get_feature_names_out()
    importance = dict(zip((n.split("__", 1)[1] for n in names), full[-1].feature_importances_.round(4).tolist(), strict=True))
    return {
        "auc": auc,
        "auc_mean_of_folds": round(float(np.mean(fold_aucs)), 4),
        "auc_sd_of_folds": round(float(np.std(fold_aucs)), 4),
        "shortcut": bool(auc["ci_low"] > p.audit.shortcut_auc),
        "importance": dict(sorted(importance.items(), key=lambda kv: -kv[1])),
        "features": list(features.columns),
    }


def check_folds(per_class: np.ndarray, groups: np.ndarray, folds: int, manifest: Path) -> None:
    """DataError unless each class and the duplicate groups can fill `folds` grouped folds."""
    if per_class.min() < folds or len(np.unique(groups)) < folds:
        raise DataError(
            f"{manifest}: {per_class.tolist()} images per class in {len(np.unique(groups))} duplicate groups "
            f"cannot fill audit.folds = {folds} folds"
        )


def scores(meta: dict, framing: dict) -> dict:
    """The two AUCs with their intervals, flat (DVC metrics)."""
    out = {}
    for kind, r in (("metadata", meta), ("framing", framing)):
        out |= {f"{kind}_auc": r["auc"]["value"], f"{kind}_auc_ci_low": r["auc"]["ci_low"], f"{kind}_auc_ci_high": r["auc"]["ci_high"]}
    return out


def auc_text(r: dict) -> str:
    """One classifier's AUC and interval as text: 'value [low, high]'."""
    a = r["auc"]
    return f"{a['value']:.3f} [{a['ci_low']:.3f}, {a['ci_high']:.3f}]"
