"""What the machine computes natively, detected once and overridable for a whole run.

Machines of the same size differ (an AMD EPYC with AVX2 only, an Intel Xeon with
AVX512-BF16 and AMX), and ``train.autocast=auto`` follows the hardware. ``ALIGN_CPU_BF16=0|1``
forces the CPU answer for every process of a run, for identical numerics on every machine
and for tests that must not depend on the CPU that runs them.
"""

from __future__ import annotations

import os
import platform
from functools import cache
from typing import Any

from align import malloc
from align.errors import AlignError

CPU_BF16_ENV = "ALIGN_CPU_BF16"
# The CPU flags that decide how fast (and in what precision) a step runs.
FLAGS_THAT_MATTER = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")


def cpu_bf16_forced() -> bool | None:
    """The value of ``ALIGN_CPU_BF16`` (``None`` when unset)."""
    raw = os.environ.get(CPU_BF16_ENV, "").strip().lower()
    if raw in ("", "auto"):
        return None
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    raise AlignError(f"{CPU_BF16_ENV}={raw!r}: use 0 (no native bf16), 1 (native bf16) or unset (detect)")


def cpu_computes_bf16() -> bool:
    """Whether this CPU has native bf16 matmul (AVX512-BF16 or AMX); elsewhere it is emulated.
    ``ALIGN_CPU_BF16`` overrides the detection."""
    forced = cpu_bf16_forced()
    return _detected_cpu_bf16() if forced is None else forced


@cache
def _detected_cpu_bf16() -> bool:
    import torch

    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


@cache
def _cpuinfo() -> tuple[str, frozenset[str]]:
    """The CPU model name and flags (Linux /proc/cpuinfo; the platform's name elsewhere)."""
    model, flags = "", frozenset()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and not model:
                    model = value.strip()
                elif key.strip() == "flags" and not flags:
                    flags = frozenset(value.split())
    except OSError:
        pass
    return model or platform.processor() or platform.machine(), flags


def describe() -> dict[str, Any]:
    """The hardware facts a run records in artifact.json (figures are only comparable with them),
    with the C allocator the process runs on (``allocator``: jemalloc or glibc, see align.malloc)."""
    model, flags = _cpuinfo()
    info: dict[str, Any] = {
        "cpu": model,
        "cpu_flags": [f for f in FLAGS_THAT_MATTER if f in flags],
        "cpu_bf16_detected": _detected_cpu_bf16(),
        "cpu_bf16": cpu_computes_bf16(),
        "cpu_bf16_forced": cpu_bf16_forced(),
        "cpus": os.cpu_count(),
        "cuda": gpu_name(),
        "allocator": malloc.describe(),
    }
    return info


def gpu_name() -> str | None:
    """The first visible CUDA device's name; None without one."""
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


def gpu_peak_memory() -> dict[str, float]:
    """Peak CUDA memory of this process so far, in GB (``memory/gpu_peak_allocated_gb``: tensors;
    ``memory/gpu_peak_reserved_gb``: what torch's caching allocator held); {} without a GPU in use."""
    import sys

    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return {}
    return {
        "memory/gpu_peak_allocated_gb": round(torch.cuda.max_memory_allocated() / 1e9, 3),
        "memory/gpu_peak_reserved_gb": round(torch.cuda.max_memory_reserved() / 1e9, 3),
    }
