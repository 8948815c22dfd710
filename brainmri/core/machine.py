"""This machine's CPU: its model name and the instruction sets that int8 and bf16 speed hang on (Linux /proc/cpuinfo)."""

from __future__ import annotations

import platform

CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "avx512_bf16", "amx_bf16")  # what int8 and bf16 speed hang on
INT8_FLAGS = CPU_FLAGS[:5]  # the integer dot-product instructions (and the vector widths they come with)


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
