"""Devices the plan and MFU know: dense BF16 peak FLOPS and memory per device.

GPU peaks are the vendors' dense (no sparsity) BF16 tensor-core figures. The CPU entry is this
project's 2-core machine, measured by bench/pretrain.py: a 2048² bf16 matmul at 0.40 TFLOP/s on
2 threads. DESIGN.md §11 says AMX at ~1.8 TFLOP/s; the machine has AVX-512-BF16 and no AMX.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

from nanochat_core.errors import UserError


@dataclass(frozen=True)
class Device:
    name: str
    peak_flops: float  # dense bf16 FLOP/s
    memory_gb: float  # GiB usable by one process


DEVICES: dict[str, Device] = {
    d.name: d
    for d in [
        Device("h200", 989e12, 141),
        Device("h100", 989e12, 80),
        Device("h100-pcie", 756e12, 80),
        Device("a100", 312e12, 80),
        Device("a100-40gb", 312e12, 40),
        Device("l40s", 362e12, 48),
        Device("a10", 125e12, 24),
        Device("l4", 121e12, 24),
        Device("4090", 165e12, 24),
        Device("3090", 71e12, 24),
        Device("cpu", 0.40e12, 24),
    ]
}


def get_device(name: str) -> Device:
    key = name.lower().replace("nvidia", "").replace(" ", "").strip("-")
    if key not in DEVICES:
        raise UserError(f"unknown device {name!r} for --gpu; choose one of {', '.join(DEVICES)}")
    return DEVICES[key]


def keep_freed_memory() -> None:
    """Make glibc keep the memory a CPU training step frees, instead of handing it back to the OS.

    A step allocates and frees the same few-MB activations and loss chunks every micro-step. By
    default glibc serves blocks above an adaptive threshold with fresh mmaps and trims the top of
    the heap, so each micro-step page-faults its buffers in again: on d4-cpu (bench/pretrain.py's
    children, 30 steps) ~50,000 page faults a step, and steps 5–15% (B=8) to 20% (B=1) slower than
    with the settings below. No-op where the C library is not glibc.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # <malloc.h>
    mallopt(M_MMAP_THRESHOLD, 32 << 20)  # glibc's maximum on 64-bit: heap-serve every activation
    mallopt(M_TRIM_THRESHOLD, 1 << 30)  # keep up to 1 GiB of freed heap for the next step
