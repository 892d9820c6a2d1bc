"""Devices and dtypes: what the plan and MFU know of each device, and the rules for picking device and dtype.

The peak table (dense BF16 FLOPS, memory) is torch-free, so the plan and the flow can read it; the
device and dtype rules import torch inside the functions that need it.

GPU peaks are the vendors' dense (no sparsity) BF16 tensor-core figures. The CPU entry is this
project's 2-core machine, measured by bench/pretrain.py: a 2048² bf16 matmul at 0.40 TFLOP/s on
2 threads. DESIGN.md §11 says AMX at ~1.8 TFLOP/s; the machine has AVX-512-BF16 and no AMX.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import socket
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from nanochat_core.errors import UserError

if TYPE_CHECKING:
    import torch


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


def node_devices() -> int:
    """GPUs this process may use, read without importing torch (the flow process never does):
    CUDA_VISIBLE_DEVICES when set (a pipeline pinned to 4 of 8 GPUs sees 4), else the GPUs the NVIDIA
    driver lists. 0 means a CPU node."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([d for d in visible.split(",") if d.strip() and d.strip() != "-1"])
    try:
        return len(os.listdir("/proc/driver/nvidia/gpus"))
    except OSError:
        return 0


def node_id() -> str:
    """This node's devices as one name: the host, and the GPUs it is pinned to when CUDA_VISIBLE_DEVICES
    says so. Stages holding the same name never run at once (the flow's device limit)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    host = socket.gethostname()
    return f"{host}:gpus={visible.replace(',', '+')}" if visible else host


def cpu_has_native_bf16() -> bool:
    """AVX-512-BF16 or AMX: the CPU computes bf16 matmuls natively (Linux: from /proc/cpuinfo)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_device_type(device_type: str) -> str:
    """`auto` -> cuda if visible, else cpu; an explicit device that is not there is a UserError."""
    import torch

    if device_type == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device_type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device-type cuda was asked for but no CUDA device is visible; pass --device-type cpu")
    if device_type == "mps" and not torch.backends.mps.is_available():
        raise UserError("--device-type mps was asked for but MPS is not available; pass --device-type cpu")
    return device_type


# --- training: fp32 weights, bf16 matmuls under autocast where the hardware does them natively ----


def training_dtype(dtype: str, device: "torch.device") -> "torch.dtype | None":
    """The compute dtype under autocast for training and evaluation; None means plain fp32.

    auto: bf16 on CUDA devices that support it and on CPUs with native bf16 matmuls. On this
    project's 2-core AVX-512-BF16 machine (no AMX), one `bench/pretrain.py` run: a d4-cpu step (B=8,
    interleaved) ran 5,586 tok/s in fp32, 6,792 in bf16 and 14,669 in bf16 with torch.compile, and
    100 steps ended at the same loss (4.270 vs 4.276) and val bpb (2.2288 vs 2.2279) as fp32;
    elsewhere on CPU (and on MPS), fp32.
    """
    import torch

    if dtype == "float32":
        return None
    if dtype == "bfloat16":
        return torch.bfloat16
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    if device.type == "cpu" and cpu_has_native_bf16():
        return torch.bfloat16
    return None


def autocast(dtype: str, device: "torch.device") -> Callable[[], contextlib.AbstractContextManager]:
    """A context-manager factory: autocast to `training_dtype` where it applies, else nothing."""
    import torch

    amp = training_dtype(dtype, device)
    return (lambda: torch.autocast(device.type, dtype=amp)) if amp else contextlib.nullcontext


def peak_flops(device: "torch.device", fallback: str) -> float:
    """bf16 peak of this device from the table (by CUDA name), else the plan's --gpu."""
    import torch

    if device.type == "cuda":
        name = torch.cuda.get_device_name(device).lower()
        for key in sorted(DEVICES, key=len, reverse=True):
            if key != "cpu" and key.replace("-", " ") in name:
                return DEVICES[key].peak_flops
    if device.type == "cpu":
        return DEVICES["cpu"].peak_flops
    return get_device(fallback).peak_flops


# --- serving: the weights themselves are cast, one replica per device ---------------------------


def serving_devices(device_type: str) -> "list[torch.device]":
    """Every device of the kind asked for: `nanochat serve` puts a replica on each GPU."""
    import torch

    device_type = resolve_device_type(device_type)
    if device_type == "cuda":
        return [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
    return [torch.device(device_type)]


def serving_dtype(dtype: str, device: "torch.device") -> "torch.dtype":
    """The dtype the served weights are cast to.

    Differs from training's rule on purpose: training keeps fp32 weights and autocasts the matmuls
    (the optimizer needs fp32 masters), while serving casts the weights once, so on CUDA bf16 halves
    the memory each decode step streams. On CPU serving stays fp32: pure-bf16 weights there
    (no fp32 accumulation outside the matmuls) were not measured here, so we keep the exact path.
    """
    import torch

    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, dtype)
