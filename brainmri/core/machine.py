"""This machine's CPU: its model name and the instruction sets that int8 and bf16 speed hang on (Linux /proc/cpuinfo)."""

from __future__ import annotations

import os
import platform

THREADS = "BRAINMRI_THREADS"  # set by the flow for a stage that runs beside another (flows/scheduler.py stage_threads)
# The thread pools of the libraries a stage uses, each read from its environment variable when the library starts:
# TensorFlow's intra-op pool (XLA's CPU kernels and oneDNN run on it), OpenMP, and numpy's BLAS
THREAD_VARIABLES = ("TF_NUM_INTRAOP_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "avx512_bf16", "amx_bf16")  # what int8 and bf16 speed hang on
INT8_FLAGS = CPU_FLAGS[:5]  # the integer dot-product instructions (and the vector widths they come with)
BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # bf16 dot products in hardware: oneDNN (TensorFlow) and OpenVINO use them


def _cpuinfo_field(name: str) -> str | None:
    """The value of the first /proc/cpuinfo line that starts with `name`; None where there is none (or no such file)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith(name):
                    return line.split(":", 1)[1]
    except OSError:
        pass
    return None


def cpu_model() -> str:
    """The CPU's model name, as /proc/cpuinfo gives it; elsewhere what Python's platform module knows."""
    name = _cpuinfo_field("model name")
    return name.strip() if name is not None else platform.processor() or platform.machine()


def cpu_flags(wanted: tuple[str, ...] = CPU_FLAGS) -> list[str]:
    """Which of `wanted` this CPU has, in `wanted`'s order (Linux /proc/cpuinfo; empty elsewhere)."""
    flags = _cpuinfo_field("flags")
    have = set(flags.split()) if flags is not None else set()
    return [flag for flag in wanted if flag in have]


def bf16_capable() -> bool:
    """Whether this CPU has bf16 instructions; without them bf16 arithmetic is emulated (slower than fp32), and
    OpenVINO would quietly run fp32 under a bf16 name."""
    return any(f in cpu_flags() for f in BF16_FLAGS)


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def stage_threads() -> int:
    """The threads this stage may use: its share of the cores when the flow runs it beside another stage
    (BRAINMRI_THREADS); 0 when it has the machine to itself (each library's default: every core)."""
    try:
        return max(0, int(os.environ.get(THREADS, "0")))
    except ValueError:
        return 0


def stage_cores() -> int:
    """The cores this stage may keep busy: its share when the flow runs it beside another stage, else every usable one."""
    return max(1, stage_threads() or usable_cores())


def thread_env(threads: int) -> dict[str, str]:
    """The environment that holds a stage process to `threads` threads in every library it uses (nothing for 0)."""
    if threads <= 0:
        return {}
    return {THREADS: str(threads), "TF_NUM_INTEROP_THREADS": "1", **{v: str(threads) for v in THREAD_VARIABLES}}


def pool_tensorflow_memory() -> None:
    """Have TensorFlow keep freed CPU memory in its own pool (its BFC allocator) instead of handing every large tensor
    back to the OS; call before TensorFlow allocates, a variable the user set stays.

    By default TensorFlow's CPU tensors come from malloc, which maps each one over 32 MB afresh from the OS and zeroes its
    pages on first touch. The compiled head loop (brainmri.learn.headfit) makes and drops such tensors at every step
    (a group's stacked weights, Adam's moments and gradients): training 32 heads on 2048-d features spent more time
    in the kernel than in arithmetic (resnet50v2-aug's train stage: 668 s user, 1,084 s system CPU). Pooled, the same
    loop ran in half the wall time with bit-identical weights (docs/measurements.md)."""
    os.environ.setdefault("TF_CPU_ALLOCATOR_USE_BFC", "true")
