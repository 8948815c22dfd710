"""A model file run in a worker process under a memory cap and a time limit, so that a hostile graph fails by name.

A few hundred bytes of ONNX can ask for gigabytes (ConstantOfShape, Expand, Tile, Range with a huge shape) or loop
2^62 times. Measured on 2 cores (AMD EPYC), in process: ONNX Runtime ran each 3 GB bomb to 3.0 GB RSS; OpenVINO was
still compiling (constant-folding) the ConstantOfShape bomb and a 2^62 Loop after 30 s, and its cancel() took 2 s to
stop an Expand whose size comes from the input, by then at 3.0 GB. ONNX Runtime's arena limit (max_mem) stopped its
allocation bombs and RunOptions.terminate stopped Loops whose body holds a node, but not a Loop with an empty body,
and neither runtime lets go of a kernel it is in, nor of Ctrl-C meanwhile. Only a process of its own bounds every
case: the worker runs under RLIMIT_DATA (every private writable mapping: heap, arenas, thread stacks) and is killed
when a call outlives its time, which leaves this process as it was. The worker is a fresh interpreter (not a fork: a
parent holding TensorFlow would hand it gigabytes of copy-on-write pages that count against its cap), in a session of
its own (a Ctrl-C at the terminal reaches only this process, which ends it), and it dies with its parent
(PR_SET_PDEATHSIG). It costs about 0.4 s to start, while this process no longer imports ONNX Runtime.

Messages are a JSON header and raw array bytes over the worker's stdin and stdout: nothing is unpickled.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import select
import signal
import struct
import subprocess
import sys
import time
import weakref
from pathlib import Path

import numpy as np

from brainmri.core.errors import BrainMRIError

MEMORY_BYTES = 1 << 30  # the worker's data segment: VGG19's convolutions peak at 0.74 GB RSS at batch 16 and 224 px
RESIDENT_BYTES = 384 << 20  # what a loaded model may keep between batches, while predict decodes the next images (a
# 40-megapixel RGBA scan takes 1.1 GB); anonymous memory only: VGG19 keeps 255 MB in ONNX Runtime, 275 MB in OpenVINO
LOAD_SECONDS = 300.0  # starting the worker, reading and compiling a file: VGG19 takes under 1 s in either runtime
RUN_SECONDS = 300.0  # one batch: VGG19's convolutions score 16 images at 224 px in 21 s on 2 busy cores
HEAD = struct.Struct("<II")  # header bytes, payload bytes
DTYPES = ("<f4", "<f8", "<f2", "<i8", "<i4", "<u1", "|u1", "|b1", "<i2", "<u2", "|i1")  # what an output may come back as


class ModelLimitError(BrainMRIError):
    """A model went past the memory cap or the time limit its worker runs under."""


class ModelRunError(BrainMRIError):
    """The runtime failed on a model (a bad reshape, an unsupported node, a wrong input): one sentence."""


def one_line(text, limit: int = 300) -> str:
    """A runtime's message as one printable line of at most `limit` characters, without the source locations and C++
    signatures both runtimes put in it (OpenVINO puts a line of them before the reason)."""
    lines = [s.strip() for s in str(text).splitlines()]
    line = " ".join(s for s in lines if s and not _LOCATION.fullmatch(s)) or "no message"
    for pattern in _NOISE:
        line = pattern.sub("", line)
    return "".join(c if c.isprintable() else "?" for c in line.strip())[:limit]


_LOCATION = re.compile(r"Exception from \S+:\d+:")
_NOISE = (
    re.compile(r"\[ONNXRuntimeError\] : \d+ : \w+ : "),
    re.compile(r"Check '.*?' failed at \S+:\d+:?\s*"),
    re.compile(r"/?\S+\.(cc|cpp|h):\d+:?\s*"),  # a source file and line
    re.compile(r"[\w:<>*&]+ [\w:<>]+::\w+\([^)]*\)\s*"),  # a C++ function's signature
)


# --- the wire: a JSON header and raw bytes ---------------------------------------------------------------------


def _write(fd: int, header: dict, payload: bytes | memoryview = b"") -> None:
    head = json.dumps(header).encode()
    data = memoryview(HEAD.pack(len(head), len(payload)) + head)
    for chunk in (data, memoryview(payload).cast("B")):
        while len(chunk):
            chunk = chunk[os.write(fd, chunk) :]


def _read_exact(fd: int, n: int, deadline: float | None) -> bytes | None:
    """`n` bytes from `fd`, or None at end of file; TimeoutError once `deadline` (time.monotonic) has passed."""
    parts, left = [], n
    while left:
        if deadline is not None:
            wait = deadline - time.monotonic()
            if wait <= 0 or not select.select([fd], [], [], wait)[0]:
                raise TimeoutError
        chunk = os.read(fd, min(left, 1 << 22))
        if not chunk:
            return None
        parts.append(chunk)
        left -= len(chunk)
    return b"".join(parts)


def _read(fd: int, deadline: float | None = None) -> tuple[dict, bytes] | None:
    head = _read_exact(fd, HEAD.size, deadline)
    if head is None:
        return None
    n_head, n_payload = HEAD.unpack(head)
    header, payload = _read_exact(fd, n_head, deadline), _read_exact(fd, n_payload, deadline)
    if header is None or payload is None:
        return None
    return json.loads(header), payload


def _array(header: dict, payload: bytes) -> np.ndarray:
    if header.get("dtype") not in DTYPES:
        raise ModelRunError(f"the model's output is of type {str(header.get('dtype'))[:20]}, not a number")
    return np.frombuffer(payload, dtype=header["dtype"]).reshape(header["shape"])


# --- the worker process ----------------------------------------------------------------------------------------


class _Served:
    """The worker's side: one model file, opened with ONNX Runtime (which reads its metadata) and run on `runtime`."""

    def __init__(self):
        self.sess = self.run_fn = None

    def open(self, req: dict) -> dict:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = int(req.get("threads", 0))
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.log_severity_level = 4  # fatal only: what failed comes back in the reply, not on a terminal
        self.sess = ort.InferenceSession(req["path"], opts, providers=["CPUExecutionProvider"])
        name = self.sess.get_inputs()[0].name if self.sess.get_inputs() else ""
        options = ort.RunOptions()
        # the arena hands its memory back after each batch: predict decodes the next images meanwhile, and the two
        # peaks must not add up (VGG19 at batch 16 holds 0.6 GB; a 40-megapixel RGBA scan takes 1.1 GB to decode)
        options.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
        self.run_fn = lambda x: self.sess.run(None, {name: x}, options)[0]

        def info(args):
            return [[a.name, a.type, [d if isinstance(d, int | str) else None for d in (a.shape or [])]] for a in args]

        meta = dict(self.sess.get_modelmeta().custom_metadata_map)
        return {"meta": meta, "inputs": info(self.sess.get_inputs()), "outputs": info(self.sess.get_outputs())}

    def compile(self, req: dict) -> dict:
        """Compile the same file with OpenVINO (`req` holds its configuration); ONNX Runtime's session is let go."""
        import openvino as ov

        compiled = ov.Core().compile_model(req["path"], "CPU", req["config"])
        request, out = compiled.create_infer_request(), compiled.output(0)
        self.sess = None
        self.run_fn = lambda x: np.asarray(request.infer({0: x})[out])
        return {}

    def run(self, header: dict, payload: bytes) -> tuple[dict, bytes]:
        x = np.frombuffer(payload, dtype=np.float32).reshape(header["shape"])
        out = self.run_fn(x)
        if not isinstance(out, np.ndarray) or out.dtype.str not in DTYPES:
            raise ValueError(f"the output is a {type(out).__name__} of {getattr(out, 'dtype', '?')}, not numbers")
        per_image = int(header.get("per_image", 1))  # an N-class model's: one probability per class
        if out.size != len(x) * per_image:  # checked here: a huge output never crosses to the caller
            expected = "one probability per image" if per_image == 1 else f"{per_image} class probabilities per image"
            raise ValueError(f"the model gives {out.size} values for {len(x)} images; expected {expected}")
        out = np.ascontiguousarray(out)
        return {"dtype": out.dtype.str, "shape": list(out.shape)}, out.tobytes()


def _die_with_parent(parent: int) -> None:
    """Linux: the kernel kills this worker when its parent exits, however it exits."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the parent was gone before prctl
        os._exit(0)


def _resident() -> int:
    """This process's resident memory less its file-backed pages (the runtimes' libraries: OpenVINO's alone are ~0.3
    GB, and the kernel can drop them), in bytes; Linux, 0 elsewhere."""
    try:
        with open("/proc/self/statm") as f:
            fields = f.read().split()
        return (int(fields[1]) - int(fields[2])) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def _serve(memory: int, parent: int) -> None:
    """The worker's loop: one request, one reply, until its input closes."""
    import resource

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when this worker stops
    _die_with_parent(parent)
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # an abort past the cap leaves no core file behind
    resource.setrlimit(resource.RLIMIT_DATA, (memory, memory))
    wire_in, wire_out = os.dup(0), os.dup(1)
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1):  # a runtime that prints cannot garble the replies
        os.dup2(devnull, fd)
    served = _Served()
    while (msg := _read(wire_in)) is not None:
        header, payload = msg
        reply, data = {}, b""
        try:
            if header["op"] == "run":
                reply, data = served.run(header, payload)
            else:
                reply = getattr(served, header["op"])(header)
        except MemoryError:
            reply = {"error": "memory", "message": "a memory allocation failed"}
        except Exception as exc:  # noqa: BLE001 - the runtimes raise their own types; the caller gets one sentence
            full = str(exc).lower()
            kind = "memory" if any(s in full for s in ("bad_alloc", "allocate", "out of memory")) else "error"
            reply = {"error": kind, "message": one_line(exc)}
        reply["resident"] = _resident()
        _write(wire_out, reply, data)


# --- the caller's side ------------------------------------------------------------------------------------------


def _kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        with contextlib.suppress(OSError):
            proc.kill()
    with contextlib.suppress(Exception):
        proc.wait(timeout=10)
    for f in (proc.stdin, proc.stdout):
        with contextlib.suppress(OSError):
            f.close()


class Worker:
    """One model file in a worker process: `open` (ONNX Runtime reads it: metadata, inputs, outputs), optionally
    `compile` (OpenVINO), then `run` per batch. Each call is bounded by `load_seconds` or `run_seconds` and the
    worker by `memory` bytes; past them, or when the runtime fails, one BrainMRIError naming the model."""

    def __init__(self, path: str | Path, memory: int | None = None, load_seconds: float | None = None, run_seconds: float | None = None):
        self.path, self.memory = Path(path), memory or MEMORY_BYTES  # the module's values when called: tests lower them
        self.load_seconds, self.run_seconds = load_seconds or LOAD_SECONDS, run_seconds or RUN_SECONDS
        self.resident = 0  # the worker's resident bytes after its last reply
        root = str(Path(__file__).resolve().parents[2])  # the folder holding brainmri/: the worker imports this very code
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)}
        cmd = [sys.executable, "-m", "brainmri.deploy.sandbox", str(self.memory), str(os.getpid())]
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, start_new_session=True
        )
        self._finalizer = weakref.finalize(self, _kill, self.proc)

    def close(self) -> None:
        self._finalizer()

    def __enter__(self) -> Worker:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _call(self, header: dict, payload: bytes | memoryview, seconds: float, doing: str) -> tuple[dict, bytes]:
        deadline = time.monotonic() + seconds
        try:
            _write(self.proc.stdin.fileno(), header, payload)
            msg = _read(self.proc.stdout.fileno(), deadline)
        except TimeoutError:
            self.close()
            raise ModelLimitError(f"{self.path}: still {doing} after {seconds:g} s, the time limit; stopped") from None
        except (BrokenPipeError, ValueError):  # the worker is gone (ValueError: its pipe was closed here)
            msg = None
        if msg is None:
            self.close()
            raise ModelLimitError(f"{self.path}: {self._death(doing)}") from None
        reply, data = msg
        self.resident = int(reply.get("resident", 0))
        if "error" in reply:
            if reply["error"] == "memory":
                raise ModelLimitError(f"{self.path}: past the memory cap of {self.memory / 2**30:g} GiB {doing} ({reply['message']})")
            raise ModelRunError(f"{self.path}: the runtime failed {doing}: {reply['message']}")
        return reply, data

    def _death(self, doing: str) -> str:
        """Why the worker ended without a reply, as one sentence."""
        with contextlib.suppress(Exception):
            self.proc.wait(timeout=10)
        code = self.proc.returncode
        killed = code is not None and code < 0 and -code in signal.valid_signals()
        how = f"signal {signal.Signals(-code).name}" if killed else f"exit code {code}"
        cap = f"{self.memory / 2**30:g} GiB"
        return f"the runtime ended {doing} ({how}); a failed allocation under the memory cap of {cap} is the usual cause"

    def open(self, threads: int = 0) -> dict:
        """The file's metadata, inputs and outputs, read by ONNX Runtime in the worker."""
        try:
            return self._call({"op": "open", "path": str(self.path), "threads": threads}, b"", self.load_seconds, "loading it")[0]
        except ModelRunError as exc:
            raise ModelRunError(f"{self.path}: not a loadable ONNX model: {str(exc).split(': ', 2)[-1]}") from None

    def compile(self, config: dict) -> None:
        try:
            self._call({"op": "compile", "path": str(self.path), "config": config}, b"", self.load_seconds, "compiling it")
        except ModelRunError as exc:
            raise ModelRunError(f"{self.path}: OpenVINO cannot compile it: {str(exc).split(': ', 2)[-1]}") from None

    def check_resident(self) -> None:
        """ModelLimitError when the loaded model keeps more than RESIDENT_BYTES between batches."""
        if self.resident > RESIDENT_BYTES:
            held, cap = f"{self.resident / 2**20:.0f} MB", f"{RESIDENT_BYTES / 2**20:.0f} MB"
            raise ModelLimitError(f"{self.path}: keeps {held} once loaded, past the cap of {cap} on what a model holds between batches")

    def run(self, x: np.ndarray, per_image: int = 1) -> np.ndarray:
        """The model's raw output for a float32 batch: `per_image` values an image (an N-class model's: one per class)."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        doing = f"running a batch of {len(x)}"
        header = {"op": "run", "shape": list(x.shape), "per_image": per_image}
        reply, data = self._call(header, memoryview(x).cast("B"), self.run_seconds, doing)
        return _array(reply, data)


if __name__ == "__main__":
    _serve(int(sys.argv[1]), int(sys.argv[2]))
