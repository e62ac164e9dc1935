"""What the machine has, decided in one place: device, mixed precision, compile, peak FLOP/s.

CUDA: bf16 where the GPU supports it, else fp16 with loss scaling; compile on. CPU: bf16 autocast where the CPU
has native bf16 instructions (AVX-512 BF16 / AMX) and the model is wide enough to gain from it, else fp32. Never fp16 on
CPU: without hardware support it is unusably slow.
"""

from __future__ import annotations

import functools
import time

import torch

from .errors import UserError

# Dense bf16 tensor-core peaks (FLOP/s), by substring of torch.cuda.get_device_name().
GPU_PEAK_BF16 = {
    "H200": 989e12,
    "H100": 989e12,  # SXM; the PCIe card is lower (756e12)
    "A100": 312e12,
    "L40S": 362e12,
    "A10G": 70e12,
    "RTX 4090": 165e12,
    "RTX 3090": 71e12,
}


@functools.cache
def cpu_has_bf16() -> bool:
    """True when this CPU runs bf16 matmuls natively (x86 avx512_bf16 / amx_bf16, or Arm bf16)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            flags = fh.read()
    except OSError:
        return False
    return any(f in flags for f in (" avx512_bf16", " amx_bf16", " bf16"))


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


# Below this width bf16 autocast on a CPU costs more in casts than it saves in matmuls. Measured on a 2-core AVX-512
# BF16 EPYC, 4-layer step at batch 12 x 64: 128 wide bf16/fp32 = 1.11x slower, 256 wide 1.16x faster, 384 1.55x faster.
CPU_BF16_MIN_WIDTH = 256


def resolve_mixed_precision(requested: str, device_type: str, n_embd: int | None = None) -> str:
    """Map a dtype setting ('auto', 'bf16'/'bfloat16', 'fp16'/'float16', 'fp32'/'float32'/'no') to accelerate's
    mixed_precision value ('bf16', 'fp16' or 'no'). n_embd, when known, lets auto skip bf16 for models too narrow
    to gain from it on a CPU."""
    aliases = {"bfloat16": "bf16", "bf16": "bf16", "float16": "fp16", "fp16": "fp16", "float32": "no", "fp32": "no",
               "no": "no", "auto": "auto"}
    if requested not in aliases:
        raise UserError(f"dtype '{requested}' is not one of auto, bfloat16, float16, float32")
    choice = aliases[requested]
    if device_type == "cuda":
        if choice == "auto":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return choice
    if choice == "fp16":
        raise UserError("dtype float16 is not supported on CPU (unusably slow); use bfloat16 or float32")
    if choice == "auto":
        wide_enough = n_embd is None or n_embd >= CPU_BF16_MIN_WIDTH
        return "bf16" if cpu_has_bf16() and wide_enough else "no"
    return choice


def torch_dtype(mixed_precision: str) -> torch.dtype:
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "no": torch.float32}[mixed_precision]


@functools.cache
def measured_cpu_peak_flops(dtype: torch.dtype = torch.float32, n: int = 2048, repeats: int = 10) -> float:
    """The CPU's practical peak: the best of several large square matmuls in `dtype` (FLOP/s).

    Its own random generator: measuring must not move the global RNG (exact resume depends on it)."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g).to(dtype)
    b = torch.randn(n, n, generator=g).to(dtype)
    torch.mm(a, b)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def peak_flops(device: torch.device | str, mixed_precision: str = "bf16") -> float | None:
    """Peak FLOP/s for MFU: the table for known GPUs (bf16/fp16 tensor cores), a measurement on CPU, else None."""
    device = torch.device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, peak in GPU_PEAK_BF16.items():
            if key in name:
                # the table is for bf16/fp16 tensor cores; fp32 throughput depends on TF32 settings: unknown
                return peak if mixed_precision in ("bf16", "fp16") else None
        return None
    if device.type == "cpu":
        return measured_cpu_peak_flops(torch_dtype(mixed_precision) if mixed_precision == "bf16" else torch.float32)
    return None
