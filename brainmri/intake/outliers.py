"""Label-independent appearance features of a normalized image, and a robust z-score that flags the odd ones out.

Ingest scores every image against the rest of its set so that a person can review the ones that do not look like a
brain MRI (the real tumour class holds an abdominal CT). The features are simple shape, intensity and texture
statistics of the head region (the same content crop duplicate detection uses): no network and no download.
Each image's local outlier factor (scikit-learn) in the space of the features' robust z-scores is its oddness;
the robust z-score of that oddness across the set is the outlier score that ingest.outlier_z thresholds.
The feature set was chosen while looking at the one known non-brain image of the real set (yes/Y248.JPG, an
abdominal CT): it is a screen that sends images to a person, not a validated detector.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from PIL import Image
from scipy import stats
from sklearn.neighbors import LocalOutlierFactor

from brainmri.intake.decode import BACKGROUND, content_crop

SIDE = 64  # the content crop is resized to this square before the statistics: enough for shape and texture, cheap
NEIGHBOURS = 10  # LOF compares each image's density with that of its 10 nearest: small groups of alike images stay inliers
CLIP = 10.0  # feature z-scores are clipped here, so that one extreme statistic cannot outweigh all the others
_YY, _XX = np.mgrid[0:SIDE, 0:SIDE]
_Y, _X = (_YY - SIDE / 2 + 0.5) / (SIDE / 2), (_XX - SIDE / 2 + 0.5) / (SIDE / 2)  # -1..1 across the crop
_R = np.hypot(_Y, _X)


def features(img: Image.Image, crop: Image.Image | None = None) -> dict[str, float]:
    """Statistics of the head region that depend neither on the file's size or format nor on its label; `crop` is
    `content_crop(img.convert("L"))` when the caller has it already."""
    crop = content_crop(img.convert("L")) if crop is None else crop
    a = np.asarray(crop.resize((SIDE, SIDE), Image.Resampling.BILINEAR), dtype=np.float64) / 255.0
    fg = a > BACKGROUND / 255.0
    top = a >= np.percentile(a, 98)  # the brightest 2%: scalp fat on a head MRI's rim, bone inside a CT body section
    gy, gx = np.gradient(a)
    return {
        "aspect": float(np.log(crop.width / crop.height)),  # axial heads are taller than wide; a trunk section is wider
        "fill": float(fg.mean()),  # share of the box that is tissue: an ellipse fills about pi/4 of it
        "centre": float(a[_R < 0.2].mean()),  # mean level at the middle of the section
        "rim": float(a[(_R >= 0.8) & (_R < 1.0)].mean()),  # and near its edge (scalp on a head)
        "bright_y": float(_Y[top].mean()),  # where the brightest tissue sits, top (-1) to bottom (+1)
        "bright_r": float(_R[top].mean()),  # and how far from the middle
        "edges": float(np.hypot(gx, gy)[fg].mean()) if fg.any() else 0.0,  # texture: mean gradient inside the tissue
    }


def robust_z(frame: pd.DataFrame) -> pd.DataFrame:
    """Each column as (value - median) / MAD, the MAD scaled to a normal sd: outliers cannot hide themselves by
    inflating the spread, as they would with mean and sd. A column with no spread gets z = 0."""
    med = frame.median()
    mad = pd.Series(stats.median_abs_deviation(frame.to_numpy(), axis=0, scale="normal"), index=frame.columns)
    return ((frame - med) / mad.where(mad > 0)).fillna(0.0)


def score(frame: pd.DataFrame, threshold: float) -> pd.DataFrame:
    """Per image (the rows of `frame`, one column per feature): its outlier score, its most extreme feature, and
    whether the score is above `threshold`."""
    z = robust_z(frame).clip(-CLIP, CLIP)
    if len(frame) <= NEIGHBOURS:  # too few images to say what the rest look like
        return pd.DataFrame({"outlier_score": 0.0, "outlier_feature": "", "outlier": False}, index=frame.index)
    lof = -LocalOutlierFactor(n_neighbors=NEIGHBOURS).fit(z.to_numpy()).negative_outlier_factor_
    s = robust_z(pd.DataFrame({"lof": lof}, index=frame.index))["lof"]
    flagged = s > threshold
    return pd.DataFrame(
        {"outlier_score": s.round(2), "outlier_feature": z.abs().idxmax(axis=1).where(flagged, ""), "outlier": flagged}, index=frame.index
    )
