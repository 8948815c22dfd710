"""ONNX Runtime sessions for exported models; needs no TensorFlow (used by export, benchmark and predict).

A session is made only after its file was vetted in a bounded worker, and each of its runs is under a deadline
(brainmri.deploy.watchdog); what it computes is ONNX Runtime's, unchanged."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

from brainmri.core.errors import BrainMRIError
from brainmri.core.machine import stage_threads
from brainmri.deploy import sandbox, watchdog

INPUT = "image"  # the exported graph's input: (batch, size, size, 3) float32 raw RGB 0-255


class Session:
    """An ONNX Runtime session whose runs are bounded in time; everything else is the session's own."""

    def __init__(self, sess: ort.InferenceSession, path: Path):
        self._sess, self._path = sess, path

    def __getattr__(self, name):
        return getattr(self._sess, name)

    def run(self, output_names, feed, run_options=None):
        options = run_options or ort.RunOptions()

        def stop():
            options.terminate = True

        try:
            with watchdog.deadline(watchdog.RUN_SECONDS, stop, str(self._path)):
                return self._sess.run(output_names, feed, options)
        except sandbox.ModelLimitError:
            raise
        except Exception as exc:  # ONNX Runtime raises its own Fail/InvalidArgument types
            if options.terminate:
                limit = f"{watchdog.RUN_SECONDS:g} s"
                raise sandbox.ModelLimitError(f"{self._path}: still running after {limit}, the time limit; stopped") from None
            raise sandbox.ModelRunError(f"{self._path}: ONNX Runtime failed running it: {sandbox.one_line(exc)}") from None


def session(path: str | Path, threads: int = 0) -> Session:
    """A CPU session; `threads` sets intra-op threads (0: the stage's share of the cores when the flow runs it beside
    another stage, else ONNX Runtime's default, every core), inter-op is 1."""
    threads = threads or stage_threads()
    watchdog.vet(path, "onnxruntime", threads)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.log_severity_level = 3
    try:
        return Session(ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"]), Path(path))
    except Exception as exc:  # ONNX Runtime raises its own Fail/InvalidProtobuf types
        raise BrainMRIError(f"{path}: not a loadable ONNX model: {str(exc).splitlines()[0][:200]}") from None


def metadata(sess: Session) -> dict[str, str]:
    return dict(sess.get_modelmeta().custom_metadata_map)


def probabilities(sess: Session, x: np.ndarray, batch: int = 16) -> np.ndarray:
    """The model's probabilities on `x`: shape (n,) for a binary model (its one output column, P(positive)), (n, K)
    for an N-class one (one column per class, in its metadata's `classes` order)."""
    name = sess.get_inputs()[0].name
    out = [sess.run(None, {name: x[i : i + batch]})[0] for i in range(0, len(x), batch)]
    if not out:
        k = sess.get_outputs()[0].shape[-1] if sess.get_outputs() and sess.get_outputs()[0].shape else 1
        return np.zeros((0, k)) if isinstance(k, int) and k > 1 else np.zeros(0)
    joined = np.concatenate(out)
    if joined.ndim == 2 and joined.shape[1] > 1:  # N classes
        return joined.astype(np.float64)
    return joined.reshape(-1).astype(np.float64)
