"""int8 against fp32 ONNX Runtime latency on this CPU, in one run; needs only onnxruntime and numpy.

The int8 gain depends on the CPU's integer dot-product instructions (AVX-512 VNNI, AVX-VNNI, AMX), so it
differs from machine to machine: this prints which the CPU has next to the measured ratios. Example:
    python benchmarks/int8_speed.py data/export/vgg16-aug/model.onnx data/export/vgg16-aug/model.int8.onnx --threads 2
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import time

import numpy as np
import onnxruntime as ort


def cpu() -> tuple[str, list[str]]:
    text = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    name = re.search(r"model name\s*:\s*(.*)", text)
    flags = set(re.search(r"flags\s*:\s*(.*)", text).group(1).split()) if "flags" in text else set()
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8")
    return (name.group(1) if name else platform.processor()), [f for f in wanted if f in flags]


def median_ms(sess: ort.InferenceSession, x: np.ndarray, reps: int) -> float:
    feed = {sess.get_inputs()[0].name: x}
    for _ in range(3):
        sess.run(None, feed)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        sess.run(None, feed)
        times.append(time.perf_counter() - t)
    return 1000 * float(np.median(times))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("fp32")
    ap.add_argument("int8")
    ap.add_argument("--threads", type=int, nargs="+", default=[2])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--reps", type=int, default=15)
    args = ap.parse_args()
    name, flags = cpu()
    print(f"CPU: {name}; {os.cpu_count()} cores; int8 instructions: {', '.join(flags) or 'none found'}; onnxruntime {ort.__version__}")
    print(f"{'threads':>7} {'batch':>5} {'fp32 ms/img':>11} {'int8 ms/img':>11} {'int8 speed-up':>13}")
    for threads in args.threads:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
        sessions = [ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"]) for path in (args.fp32, args.int8)]
        size = sessions[0].get_inputs()[0].shape[1]
        for batch in args.batches:
            x = np.random.default_rng(0).uniform(0, 255, (batch, size, size, 3)).astype(np.float32)
            fp32, int8 = (median_ms(s, x, args.reps) / batch for s in sessions)
            print(f"{threads:>7} {batch:>5} {fp32:>11.1f} {int8:>11.1f} {fp32 / int8:>12.2f}x", flush=True)


if __name__ == "__main__":
    main()
