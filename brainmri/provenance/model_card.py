"""The model card evaluate writes beside an exported model: what it is, how well it did, where it came from."""

from __future__ import annotations

from brainmri.config import Params
from brainmri.core.errors import BrainMRIError
from brainmri.deploy.onnxrt import INPUT
from brainmri.provenance.lineage import lineage, md5


def model_card(p: Params, name: str, trained: dict, exported: dict, evaluated: dict) -> dict:
    """What the exported model is, how well it did, and where it came from (the DVC chain back to the raw data)."""
    onnx_file = p.model_file("export", name, "onnx")
    try:
        chain = lineage(p.root, onnx_file, with_metrics=False)
    except BrainMRIError as exc:  # run outside DVC: say so instead of inventing a chain
        chain = {"note": str(exc)}
    files = {k: {"file": getattr(p.paths.files, k), "md5": md5(p.model_file("export", name, k))} for k in ("onnx", "onnx_int8")}
    return {
        "model": name,
        "task": task(p),
        "intended_use": "research and teaching; not a medical device, not for diagnosis",
        "backbone": trained["backbone"],
        "augmented_training": trained["augment"],
        "weights": trained["weights"],
        "feature_precision": trained.get("feature_precision", "fp32"),  # absent from train.json files older than the setting
        "input": {"name": INPUT, **{k: exported["metadata"][k] for k in ("input_size", "max_side")}},
        "threshold": trained["threshold"],  # None for N classes: the decision is the arg-max
        "files": files,
        "metrics": {
            "test": evaluated["test"],
            "n_test": evaluated["n_test"],
            "calibration": trained.get("calibration", {}).get("method"),
            "parity": exported["parity"],
            "int8": exported["int8"],
        },
        "lineage": chain,
        "libraries": library_versions(),
    }


def task(p: Params) -> str:
    """What the model tells apart, in words."""
    if p.ingest.binary:
        return f"brain MRI slice: tumour ({p.ingest.positive_class}) vs no tumour ({p.ingest.negative_class})"
    return f"brain MRI slice: one of {len(p.ingest.classes)} classes ({', '.join(p.ingest.label_names)}), by the most probable"


CARD_LIBRARIES = ("tensorflow-cpu", "tensorflow", "keras", "tf2onnx", "onnx", "onnxruntime", "numpy", "scikit-learn", "pillow", "dvc")


def library_versions() -> dict[str, str]:
    """The versions that built and exported the model (installed from requirements.lock; versions.yaml has all)."""
    from importlib import metadata

    out = {}
    for dist in CARD_LIBRARIES:
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return out
