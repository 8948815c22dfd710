"""CPU runtimes for an exported ONNX file: ONNX Runtime, and OpenVINO in fp32 or bf16. No TensorFlow.

Every runtime reads the same file (model.onnx, or the int8 QDQ model.int8.onnx) and returns the tumour
probability per image. OpenVINO is what Intel-CPU users reach for: it runs bf16 on AMX or AVX-512 BF16 cores
and int8 QDQ graphs with VNNI. `benchmark` times each one and checks each against ONNX Runtime fp32 on the
validation images; `predict --runtime` runs any of them.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from brainmri.core.errors import BrainMRIError
from brainmri.core.machine import BF16_FLAGS, bf16_capable
from brainmri.deploy import sandbox, watchdog
from brainmri.deploy.onnxrt import session

RUNTIMES = ("onnxruntime", "openvino", "openvino-bf16")  # openvino alone is fp32: its precision hint is set, never left to the CPU


def openvino_config(runtime: str, threads: int = 0) -> dict | None:
    """OpenVINO's configuration for `runtime` (None for ONNX Runtime); one sentence for an unknown runtime, or bf16 on a
    CPU without bf16 instructions."""
    if runtime not in RUNTIMES:
        raise BrainMRIError(f"unknown runtime {runtime!r}; choose one of {', '.join(RUNTIMES)}")
    if runtime == "onnxruntime":
        return None
    if runtime == "openvino-bf16" and not bf16_capable():
        raise BrainMRIError(f"{runtime}: this CPU has no bf16 instructions ({' or '.join(BF16_FLAGS)}); use openvino or onnxruntime")
    config = {"INFERENCE_PRECISION_HINT": "bf16" if runtime.endswith("bf16") else "f32", "PERFORMANCE_HINT": "LATENCY"}
    if threads:
        config["INFERENCE_NUM_THREADS"] = threads
    return config


def runner(path: str | Path, runtime: str, threads: int = 0) -> Callable[[np.ndarray], np.ndarray]:
    """A function from a float32 image batch (n, size, size, 3) to the model's raw output (n, 1) on `runtime`, in this
    process; the file vetted first and each call under a deadline (brainmri.deploy.watchdog)."""
    config = openvino_config(runtime, threads)
    if config is None:
        sess = session(path, threads)
        name = sess.get_inputs()[0].name
        return lambda x: sess.run(None, {name: x})[0]
    import openvino as ov

    watchdog.vet(path, runtime, threads, config)
    try:
        compiled = ov.Core().compile_model(str(path), "CPU", config)
    except Exception as exc:  # OpenVINO raises RuntimeError subclasses of its own
        raise BrainMRIError(f"{path}: OpenVINO cannot compile it: {sandbox.one_line(exc)}") from None
    request = compiled.create_infer_request()
    out = compiled.output(0)

    def run(x: np.ndarray) -> np.ndarray:
        try:
            with watchdog.deadline(watchdog.RUN_SECONDS, request.cancel, str(path)):
                return np.asarray(request.infer({0: x})[out]).copy()
        except BrainMRIError:
            raise
        except Exception as exc:  # noqa: BLE001 - OpenVINO's own exception types
            raise sandbox.ModelRunError(f"{path}: OpenVINO failed running it: {sandbox.one_line(exc)}") from None

    return run
