"""ONNX Runtime sessions for exported models; needs no TensorFlow (used by export, benchmark and predict)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

from brainmri.core.errors import BrainMRIError

INPUT = "image"  # the exported graph's input: (batch, size, size, 3) float32 raw RGB 0-255


def session(path: str | Path, threads: int = 0) -> ort.InferenceSession:
    """A CPU session; `threads` sets intra-op threads (0: ONNX Runtime's default), inter-op is 1."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.log_severity_level = 3
    try:
        return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # ONNX Runtime raises its own Fail/InvalidProtobuf types
        raise BrainMRIError(f"{path}: not a loadable ONNX model: {str(exc).splitlines()[0][:200]}") from None


def metadata(sess: ort.InferenceSession) -> dict[str, str]:
    return dict(sess.get_modelmeta().custom_metadata_map)


def probabilities(sess: ort.InferenceSession, x: np.ndarray, batch: int = 16) -> np.ndarray:
    name = sess.get_inputs()[0].name
    out = [sess.run(None, {name: x[i : i + batch]})[0] for i in range(0, len(x), batch)]
    return np.concatenate(out).reshape(-1).astype(np.float64) if out else np.zeros(0)
