"""Static int8 quantization of an exported fp32 model with ONNX Runtime: the images it is calibrated on (a seeded,
class-stratified sample of the training split), the reader that feeds them, and the float head left out."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process

from brainmri.deploy.onnxrt import INPUT
from brainmri.export.convert import ExportError
from brainmri.intake.parts import Part
from brainmri.intake.preprocess import load_batch

INT8_CALIBRATION_METHODS = {
    "minmax": CalibrationMethod.MinMax,
    "percentile": CalibrationMethod.Percentile,
    "entropy": CalibrationMethod.Entropy,
}


class Int8CalibrationReader(CalibrationDataReader):
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


CALIBRATION_BATCH = 4  # images a calibration step feeds: the histograms grow by one batch's activations at a time

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
    fp32_path, int8_path, int8_calibration_paths, size: int, method: str, reduce_range: bool, ranges: Path | None = None, prep=None
) -> None:
    """Static int8 quantization (QDQ, per-channel weights) of the base, calibrated on `int8_calibration_paths`.

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
    prep = prepare(fp32_path, prep or int8_path.with_name("prep.onnx"))
    quantize_static(
        str(prep),
        str(int8_path),
        Int8CalibrationReader(int8_calibration_paths, size, CALIBRATION_BATCH),
        quant_format=QuantFormat.QDQ,
        op_types_to_quantize=["Conv", "Relu", "MaxPool", "Add", "Mul"],
        nodes_to_exclude=head_nodes(onnx.load(prep).graph),
        per_channel=True,
        reduce_range=reduce_range,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        calibrate_method=INT8_CALIBRATION_METHODS[method],
        extra_options={"CalibStridedMinMax": 1},  # one batch at a time into the histograms (Int8CalibrationReader's docstring)
        calibration_cache_path=ranges,
    )
    if not keep:
        prep.unlink()


def prepare(fp32_path, prep: Path) -> Path:
    """ONNX Runtime's pre-processed fp32 model (shape inference, graph optimisation) at `prep`, made when absent."""
    if not prep.is_file():
        quant_pre_process(str(fp32_path), str(prep), skip_symbolic_shape=True)
    return prep


def int8_calibration_sample(part: Part, n: int, seed: int) -> list[int]:
    """Indices (ascending) of a seeded, class-stratified sample of `n` images of `part`: every one when n >= len(part).

    Taking the first n in source-path order would calibrate on one class only ('no/' sorts first). scikit-learn's
    stratified split keeps each class's share to within one image of the part's.
    """
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(part.y))
    if n >= len(idx):
        return idx.tolist()
    classes = len(np.unique(part.y))
    stratify = part.y if classes > 1 and n >= classes else None  # a stratified sample needs an image of each class
    chosen, _ = train_test_split(idx, train_size=n, stratify=stratify, random_state=seed)
    return sorted(int(i) for i in chosen)
