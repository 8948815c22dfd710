"""The runtimes a benchmark times on one model's files (a compiled Keras call, ONNX Runtime fp32 and int8, OpenVINO
fp32, int8 and bf16 where the CPU has it), and the record of the machine they ran on."""

from __future__ import annotations

import os
import platform
from collections.abc import Callable

import numpy as np

from brainmri.config import Params
from brainmri.core.machine import cpu_flags, cpu_model
from brainmri.core.progress import log
from brainmri.deploy.onnxrt import INPUT, session


def tensorflow_threads(threads: int):
    """Give TensorFlow `threads` intra-op threads and one inter-op thread; what it then uses, for the record."""
    import tensorflow as tf

    try:  # possible only before TensorFlow starts; `brainmri benchmark` (the DVC stage) is a fresh process
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(1)
    except RuntimeError:
        log.warning("benchmark: TensorFlow was already running in this process; its thread settings are left as they are")
    return tf.config.threading.get_intra_op_parallelism_threads() or "default (all cores)"


def runners(p: Params, name: str, model, threads: int) -> dict[str, Callable]:
    """Each runtime as a function from an image batch to the model's raw output, in the order they are timed."""
    import tensorflow as tf

    compiled = tf.function(lambda t: model(t, training=False), reduce_retracing=True)
    sessions = {k: session(p.model_file("export", name, f), threads) for k, f in (("fp32", "onnx"), ("int8", "onnx_int8"))}
    return {
        "keras_compiled": lambda x: compiled(tf.constant(x)).numpy(),
        "onnxruntime_fp32": lambda x: sessions["fp32"].run(None, {INPUT: x})[0],
        "onnxruntime_int8": lambda x: sessions["int8"].run(None, {INPUT: x})[0],
        **openvino_runtimes(p, name, threads),
    }


def openvino_runtimes(p: Params, name: str, threads: int) -> dict[str, Callable]:
    """OpenVINO on the same exported files: fp32 and int8 always, bf16 where the CPU has bf16 instructions."""
    from brainmri.core.machine import bf16_capable
    from brainmri.deploy.runtimes import runner

    fp32, int8 = p.model_file("export", name, "onnx"), p.model_file("export", name, "onnx_int8")
    out = {"openvino_fp32": runner(fp32, "openvino", threads), "openvino_int8": runner(int8, "openvino", threads)}
    if bf16_capable():
        out["openvino_bf16"] = runner(fp32, "openvino-bf16", threads)
    return out


def machine_record(threads: int, tf_threads) -> dict:
    """The CPU, the thread settings and the versions of everything timed."""
    import keras
    import onnxruntime
    import openvino
    import tensorflow as tf

    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "threads": threads,
        "tensorflow_intra_op_threads": tf_threads,
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "onnxruntime": onnxruntime.__version__,
        "openvino": openvino.__version__,
        "cpu_flags": cpu_flags(),  # int8 (VNNI, AMX) and bf16 instruction sets: what the int8 and bf16 rows hang on
        "numpy": np.__version__,
    }
