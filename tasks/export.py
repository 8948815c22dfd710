"""export stage: the trained Keras model to ONNX (fp32, checked for parity) and to a statically quantized int8 model."""

from __future__ import annotations

import gc
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process

from brainmri.config import Params
from brainmri.core.errors import BrainMRIError
from brainmri.core.files import atomic_dir, write_json, write_metrics
from brainmri.core.progress import log, summary
from brainmri.deploy.onnxrt import INPUT, probabilities, session
from brainmri.intake.parts import Part, split_part
from brainmri.intake.preprocess import load_batch
from brainmri.stats.metrics import point

PROTOBUF_IMPL = "PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION"


class ExportError(BrainMRIError):
    """The exported model does not reproduce the Keras model."""


def to_onnx(model, size: int, opset: int) -> onnx.ModelProto:
    """Convert a Keras 3 functional model with tf2onnx, one named input with a dynamic batch dimension."""
    import tensorflow as tf
    import tf2onnx

    spec = (tf.TensorSpec((None, size, size, 3), tf.float32, name=INPUT),)
    proto, _ = tf2onnx.convert.from_keras(model, input_signature=spec, opset=opset)
    return canonical_names(proto)


def _convert_to_file(model_path: str, size: int, opset: int, out: str, images: str, probs: str) -> None:
    """In the worker: the Keras model's ONNX conversion to `out`, then its probabilities on `images` (.npy) to `probs`.

    In that order, and 4 images a call: TensorFlow's allocator keeps what a prediction took, and the conversion then
    came on top of it. Measured on vgg19-noaug at 224 px (real set, AMD EPYC): the worker peaked at 2.68 GiB
    predicting 16 at a time first, 2.27 GiB predicting 4 at a time first, 2.08 GiB converting first."""
    # tf2onnx deep-copies the whole graph, weights included, before each of its ~24 optimizer passes, so that a pass
    # that fails can be skipped; off, the conversion takes 35% less time and a fraction of the memory, and a failing pass
    # fails the export (the parity check would catch a wrong graph either way)
    os.environ["TF2ONNX_CATCH_ERRORS"] = "FALSE"
    from brainmri.learn.models import load_model

    model = load_model(model_path)
    onnx.save(to_onnx(model, size, opset), out)
    gc.collect()  # tf2onnx's graphs are garbage now: their memory goes back before the prediction allocates
    np.save(probs, np.asarray(model.predict(np.load(images), batch_size=4, verbose=0), dtype=np.float64).reshape(-1))


def convert(model_path: Path, size: int, opset: int, x: np.ndarray) -> tuple[onnx.ModelProto, np.ndarray]:
    """The ONNX model and the Keras model's probabilities on `x`, both from a spawned worker process: this one
    never imports TensorFlow, and the GiBs tf2onnx takes go back to the OS before parity and calibration."""
    import multiprocessing
    from unittest import mock

    with tempfile.TemporaryDirectory() as folder:
        out, images, probs = Path(folder) / "model.onnx", Path(folder) / "x.npy", Path(folder) / "p.npy"
        np.save(images, x)
        args = (str(model_path), size, opset, str(out), str(images), str(probs))
        proc = multiprocessing.get_context("spawn").Process(target=_convert_to_file, args=args)
        # The worker runs protobuf's pure-Python implementation: with the default (upb), every one of tf2onnx's ~24
        # optimizer passes rewrites each weight tensor into the graph's arena, which frees nothing until the end, so
        # memory grew by the weights' size per pass. Measured on ResNet50V2 at 224 px: peak 4.31 -> 2.33 GiB, 16.9 ->
        # 19.8 s, and the converted file is byte-identical. The variable is read when the child first imports protobuf.
        with mock.patch.dict(os.environ, {PROTOBUF_IMPL: "python"}):  # the child's environment only; restored after
            proc.start()
        proc.join()
        if proc.exitcode != 0 or not out.is_file():
            raise ExportError(f"{model_path}: the conversion to ONNX failed in its worker process (exit code {proc.exitcode}); see above")
        return onnx.load(out), np.load(probs)


def canonical_names(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Rename nodes and inner tensors by position: tf2onnx numbers them from counters that differ run to run,
    and identical models should give identical files (DVC then sees nothing changed downstream)."""
    g = proto.graph
    keep = {v.name for v in [*g.input, *g.output]}
    names: dict[str, str] = {}

    def rename(name: str) -> str:
        if not name or name in keep:
            return name
        return names.setdefault(name, f"t{len(names)}")

    for i, node in enumerate(g.node):  # names in order of first use: the node order is stable, the rest is not
        node.name = f"{node.op_type}_{i}"
        node.input[:] = [rename(n) for n in node.input]
        node.output[:] = [rename(n) for n in node.output]
    for init in g.initializer:
        init.name = rename(init.name)
    for info in g.value_info:
        info.name = rename(info.name)
    for v in [*g.input, *g.output, *g.value_info]:  # the dynamic batch dimension, numbered by tf2onnx too
        for dim in v.type.tensor_type.shape.dim:
            if dim.dim_param:
                dim.dim_param = "batch"
    order = {new: k for k, new in enumerate(names.values())}
    for field in (g.initializer, g.value_info):
        items = sorted(field, key=lambda x: order.get(x.name, -1))
        copies = [type(x)() for x in items]
        for c, x in zip(copies, items, strict=True):
            c.CopyFrom(x)
        del field[:]
        field.extend(copies)
    return proto


CALIBRATION = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile, "entropy": CalibrationMethod.Entropy}


class Calibration(CalibrationDataReader):
    """Feeds training images to ONNX Runtime's static quantization calibrator, one batch at a time.

    With `CalibStridedMinMax` (see `quantize`) the calibrator asks for one batch per `set_range` and folds its
    activations into the running histograms before the next: without it, it holds every batch's activations of
    every layer at once (about 120 MB an image for VGG19 at 224 px)."""

    def __init__(self, paths, size: int, batch: int = 4):
        self.paths, self.size, self.batch = list(paths), size, batch
        self.pos, self.end = 0, len(self.paths)

    def __len__(self) -> int:  # in batches: the unit of set_range
        return -(-len(self.paths) // self.batch)

    def set_range(self, start_index: int, end_index: int) -> None:
        self.pos, self.end = start_index * self.batch, min(len(self.paths), end_index * self.batch)

    def get_next(self):
        if self.pos >= self.end:
            return None
        chunk = self.paths[self.pos : min(self.pos + self.batch, self.end)]
        self.pos += self.batch
        return {INPUT: load_batch(chunk, self.size)}


GLOBAL_POOLING = ("GlobalAveragePool", "GlobalMaxPool", "ReduceMean", "ReduceMax")


def head_nodes(graph: onnx.GraphProto) -> list[str]:
    """Names of the nodes after the backbone's final global pooling: the head, which stays float.

    The last pooling node in topological order, not the first: bases with squeeze-and-excitation blocks
    (EfficientNet, for one) pool inside the base too.
    """
    start = [n for n in graph.node if n.op_type in GLOBAL_POOLING][-1:]
    if not start:
        raise ExportError(f"no global pooling node ({', '.join(GLOBAL_POOLING)}) in the exported graph: cannot tell the head from the base")
    reached, names = set(start[0].output), []
    for n in graph.node:  # ONNX nodes are in topological order
        if any(i in reached for i in n.input):
            reached.update(n.output)
            names.append(n.name)
    return names


def quantize(
    fp32_path, int8_path, calibration_paths, size: int, method: str, reduce_range: bool, ranges: Path | None = None, prep=None
) -> None:
    """Static int8 quantization (QDQ, per-channel weights) of the base, calibrated on `calibration_paths`.

    Relu, MaxPool, Add and Mul are quantized with the convolutions, so that tensors stay int8 from one
    convolution to the next: a float op between two needs a dequantize-requantize pair (measured on 2 AVX2
    cores: VGG16 1.81x over fp32 with Relu float, 1.96x without; ResNet50V2, whose pre-activation batch
    norms are Mul and Add, 1.45x with them float, 1.68-1.78x without).

    The head (everything after the global pooling) stays float: it is a negligible share of the FLOPs, and
    its standardisation of pooled features magnifies int8 error (measured: a 21-point accuracy loss for
    ResNet50V2 when its Mul and Add were quantized too). `reduce_range` keeps weights to 7 bits so that the
    u8 x s8 pair sums of CPUs without VNNI cannot saturate.

    `ranges` is ONNX Runtime's calibration cache (a JSON file of every activation's range): calibration runs and
    writes it when the file is absent, and is skipped when it is there. Activation ranges do not depend on
    `reduce_range` (a weight setting), so the candidates of one calibration method share one calibration.
    `prep` likewise keeps ONNX Runtime's pre-processed fp32 model (shape inference, graph optimisation) for the next
    candidate: made when absent, reused when there; without it, made beside `int8_path` and removed after.
    """
    keep = prep is not None
    prep = prep or int8_path.with_name("prep.onnx")
    if not prep.is_file():
        quant_pre_process(str(fp32_path), str(prep), skip_symbolic_shape=True)
    quantize_static(
        str(prep),
        str(int8_path),
        Calibration(calibration_paths, size),
        quant_format=QuantFormat.QDQ,
        op_types_to_quantize=["Conv", "Relu", "MaxPool", "Add", "Mul"],
        nodes_to_exclude=head_nodes(onnx.load(prep).graph),
        per_channel=True,
        reduce_range=reduce_range,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        calibrate_method=CALIBRATION[method],
        extra_options={"CalibStridedMinMax": 1},  # one batch at a time into the histograms (Calibration's docstring)
        calibration_cache_path=ranges,
    )
    if not keep:
        prep.unlink()


def quantize_best(p: Params, name: str, fp32, int8, calib: list, size: int, threshold: float) -> dict:
    """Quantize with every combination of export.calibration_method and export.reduce_range (lists are candidates)
    and keep the one whose int8 probabilities stay closest to fp32's on the validation images (mean absolute change;
    ties go to the earlier candidate). Chosen on val, never test: the test figures come after, for the chosen file
    only. The CPU is recorded because ONNX Runtime's int8 kernels, and so the choice, depend on its instructions."""
    import itertools

    from brainmri.config import candidates
    from brainmri.core.machine import cpu_flags

    val = split_part(p, "val")
    x_val = load_batch(val.paths, size)
    p32 = probabilities(session(fp32), x_val)
    m32 = point(val.y, p32, threshold)
    combos = list(itertools.product(candidates(p.export.calibration_method), candidates(p.export.reduce_range)))
    scores = []
    with tempfile.TemporaryDirectory() as shared:  # one pre-processing, and one calibration per method, for every candidate
        for i, (method, reduce_range) in enumerate(combos):
            target = int8 if len(combos) == 1 else int8.with_name(f"candidate{i}.onnx")
            log.info(
                "export %s: quantizing to int8 (%s, reduce_range %s), calibrated on %d training images",
                name,
                method,
                reduce_range,
                len(calib),
            )
            quantize(fp32, target, calib, size, method, reduce_range, Path(shared) / f"{method}.json", Path(shared) / "prep.onnx")
            p8 = probabilities(session(target), x_val)
            m8 = point(val.y, p8, threshold)
            scores.append(
                {
                    "calibration_method": method,
                    "reduce_range": reduce_range,
                    "val_mean_abs_prob_change": round(float(np.mean(np.abs(p8 - p32))) if len(x_val) else 0.0, 5),
                    "val_accuracy_change_points": round(100 * (m8["accuracy"] - m32["accuracy"]), 2),
                    "val_auc_change": round(m8["auc"] - m32["auc"], 4),
                }
            )
    best = min(range(len(combos)), key=lambda i: (scores[i]["val_mean_abs_prob_change"], i))
    if len(combos) > 1:
        for i in range(len(combos)):
            path = int8.with_name(f"candidate{i}.onnx")
            if i == best:
                path.replace(int8)
            else:
                path.unlink()
    # in the file itself: predict warns when 8-bit weights meet a CPU without VNNI, where u8 x s8 products saturate
    proto = onnx.load(int8)
    props = {p.key: p.value for p in proto.metadata_props}
    props.update(int8_reduce_range=str(combos[best][1]), int8_chosen_on_cpu_flags=",".join(cpu_flags()))
    onnx.helper.set_model_props(proto, props)
    onnx.save(proto, int8)
    return {
        "protocol": f"every candidate quantized and scored on the {len(val.y)} validation images; test never read for the choice",
        "criterion": "smallest mean |p_int8 - p_fp32| on val; ties go to the earlier candidate",
        "cpu_flags": cpu_flags(),
        "candidates": scores,
        "chosen": {k: scores[best][k] for k in ("calibration_method", "reduce_range")},
    }


def calibration_sample(part: Part, n: int, seed: int) -> list[int]:
    """Indices (ascending) of a seeded, class-stratified sample of `n` images of `part`: every one when n >= len(part).

    Taking the first n in source-path order would calibrate on one class only ('no/' sorts first). scikit-learn's
    stratified split keeps each class's share to within one image of the part's.
    """
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(part.y))
    if n >= len(idx):
        return idx.tolist()
    stratify = part.y if len(np.unique(part.y)) > 1 and n >= 2 else None
    chosen, _ = train_test_split(idx, train_size=n, stratify=stratify, random_state=seed)
    return sorted(int(i) for i in chosen)


def export(p: Params, name: str) -> dict:
    """Run the stage for model `name`: write model.onnx, model.int8.onnx and export.json; fail on lost parity."""
    p.model(name)  # an unknown name stops here, before any work
    start = time.monotonic()
    trained = json.loads(p.model_file("models", name, "train_metrics").read_text())
    size = p.backbones[p.models[name].backbone].input_size
    test = split_part(p, "test")
    test_paths, y = test.paths, test.y
    train = split_part(p, "train")
    x = load_batch(test_paths, size)
    proto, p_keras = convert(p.model_file("models", name, "model"), size, p.export.opset, x)
    meta = {
        "model": name,
        "input_size": size,
        "max_side": p.ingest.max_side,
        "max_pixels": p.ingest.max_pixels,
        "crop_to_content": p.ingest.crop_to_content,  # predict crops as ingest did
        "threshold": trained["threshold"],
        "positive_class": p.ingest.positive_class,
        "negative_class": p.ingest.negative_class,
        "weights": trained["weights"]["description"],
    }
    onnx.helper.set_model_props(proto, {k: str(v) for k, v in meta.items()})
    folder = p.model_file("export", name, "onnx").parent
    with atomic_dir(folder) as tmp:
        fp32 = tmp / p.paths.files.onnx
        onnx.save(proto, fp32)
        p_onnx = probabilities(session(fp32), x)
        diff = float(np.max(np.abs(p_keras - p_onnx))) if len(x) else 0.0
        t = trained["threshold"]
        same_labels = bool(np.array_equal(p_keras >= t, p_onnx >= t))
        if diff > p.export.parity_tolerance or not same_labels:
            raise ExportError(
                f"{name}: ONNX output differs from Keras on the test images: max |p_keras - p_onnx| = {diff:.2e} "
                f"(export.parity_tolerance {p.export.parity_tolerance:.0e}), labels identical: {same_labels}; "
                "nothing was written"
            )
        int8 = tmp / p.paths.files.onnx_int8
        chosen = calibration_sample(train, p.export.calibration_images, p.seed)
        calib = [train.paths[i] for i in chosen]
        calib_classes = train.frame["label"].iloc[chosen].value_counts()
        selection = quantize_best(p, name, fp32, int8, calib, size, t)
        p_int8 = probabilities(session(int8), x)
        m32, m8 = point(y, p_onnx, t), point(y, p_int8, t)
        out = {
            "model": name,
            "opset": p.export.opset,
            "input": INPUT,
            "input_size": size,
            "metadata": meta,
            "parity": {
                "n_images": int(len(x)),
                "max_abs_diff": diff,
                "tolerance": p.export.parity_tolerance,
                "labels_identical": same_labels,
            },
            "int8": {
                "settings": selection["chosen"],
                "selection": selection,
                "calibration_images": len(calib),
                "calibration_classes": {c: int(calib_classes.get(c, 0)) for c in p.ingest.classes},  # seeded, class-stratified
                "accuracy_fp32": round(m32["accuracy"], 4),
                "accuracy_int8": round(m8["accuracy"], 4),
                "accuracy_change_points": round(100 * (m8["accuracy"] - m32["accuracy"]), 2),
                "auc_fp32": round(m32["auc"], 4),
                "auc_int8": round(m8["auc"], 4),
                "auc_change": round(m8["auc"] - m32["auc"], 4),
                "max_abs_prob_change": round(float(np.max(np.abs(p_int8 - p_onnx))) if len(x) else 0.0, 4),
            },
            "size_bytes": {"fp32": fp32.stat().st_size, "int8": int8.stat().st_size},
        }
        write_json(tmp / p.paths.files.export_metrics, out)
        scores = {
            "parity_max_abs_diff": diff,
            **{f"int8_{k}": out["int8"][k] for k in ("accuracy_change_points", "auc_change", "max_abs_prob_change")},
        }
        write_metrics(tmp / p.paths.files.scores, scores)
    i8 = out["int8"]
    summary(
        f"export {name} ({time.monotonic() - start:.0f} s)",
        f"parity max |diff| {diff:.1e} on {len(x)} test images; int8 accuracy change "
        f"{i8['accuracy_change_points']:+.1f} points, AUC change {i8['auc_change']:+.3f}",
    )
    return out
