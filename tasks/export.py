"""export stage: the trained Keras model to ONNX (fp32, checked for parity) and to a statically quantized int8 model.

A binary model's ONNX output is (batch, 1), P(positive class), with its threshold and two class names in the metadata;
an N-class model's is (batch, K), one probability per class, with the class names (`classes`, a JSON list) in the
metadata and no threshold: its label is the arg-max class, and parity and the int8 check hold for every class."""

from __future__ import annotations

import json
import time

import onnx

from brainmri.config import Params
from brainmri.core.files import atomic_dir, write_json, write_metrics
from brainmri.core.progress import summary
from brainmri.deploy.onnxrt import INPUT, probabilities, session
from brainmri.export.convert import convert
from brainmri.export.int8_choice import quantize_best
from brainmri.export.quantize import int8_calibration_sample
from brainmri.export.record import (
    check_parity,
    check_parity_classes,
    int8_record,
    metadata_props,
    onnx_metadata,
    onnx_metadata_classes,
)
from brainmri.intake.parts import split_part
from brainmri.intake.preprocess import load_batch


def export(p: Params, name: str) -> dict:
    """Run the stage for model `name`: write model.onnx, model.int8.onnx and export.json; fail on lost parity."""
    p.model(name)  # an unknown name stops here, before any work
    start = time.monotonic()
    trained = json.loads(p.model_file("models", name, "train_metrics").read_text())
    size = p.backbones[p.models[name].backbone].input_size
    val = split_part(p, "val")  # parity and the int8 change on val: test stays unread until evaluate
    train = split_part(p, "train")
    x = load_batch(val.paths, size)

    proto, p_keras = convert(p.model_file("models", name, "model"), size, p.export.opset, x, p.path("onnx_cache"))
    meta = (onnx_metadata if p.ingest.binary else onnx_metadata_classes)(p, name, size, trained)
    onnx.helper.set_model_props(proto, metadata_props(meta))
    t = trained["threshold"] if p.ingest.binary else None  # N classes: no threshold, the label is the arg-max class
    with atomic_dir(p.model_file("export", name, "onnx").parent) as tmp:
        fp32 = tmp / p.paths.files.onnx
        onnx.save(proto, fp32)
        p_onnx = probabilities(session(fp32), x)
        if p.ingest.binary:
            parity = check_parity(name, p_keras, p_onnx, t, p.export.parity_tolerance)
        else:
            parity = check_parity_classes(name, p_keras, p_onnx, list(p.ingest.label_names), p.export.parity_tolerance)
        int8 = tmp / p.paths.files.onnx_int8
        chosen = int8_calibration_sample(train, p.export.int8_calibration_images, p.seed)
        int8_images = [train.paths[i] for i in chosen]
        counts = train.frame["label"].iloc[chosen].value_counts()
        # the chosen int8 file's probabilities on val come back with the choice: each candidate was scored on them
        selection, p_int8 = quantize_best(p, name, fp32, int8, int8_images, size, t, x, p_onnx)
        classes = {c: int(counts.get(c, 0)) for c in p.ingest.classes}
        out = {
            "model": name,
            "opset": p.export.opset,
            "input": INPUT,
            "input_size": size,
            "metadata": meta,
            "parity": parity,
            "int8": int8_record(val.y, p_onnx, p_int8, t, selection, len(int8_images), classes),
            "size_bytes": {"fp32": fp32.stat().st_size, "int8": int8.stat().st_size},
        }
        write_json(tmp / p.paths.files.export_metrics, out)
        i8 = out["int8"]
        changes = {f"int8_{k}": i8[k] for k in ("accuracy_change_points", "auc_change", "max_abs_prob_change")}
        write_metrics(tmp / p.paths.files.scores, {"parity_max_abs_diff": parity["max_abs_diff"], **changes})
    summary(
        f"export {name} ({time.monotonic() - start:.0f} s)",
        f"parity max |diff| {parity['max_abs_diff']:.1e} on {len(x)} val images; int8 accuracy change "
        f"{i8['accuracy_change_points']:+.1f} points, AUC change {i8['auc_change']:+.3f}",
    )
    return out
