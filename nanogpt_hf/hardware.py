"""What the machine has, decided in one place: device, mixed precision, compile, peak FLOP/s.

CUDA: bf16 where the GPU supports it, else fp16 with loss scaling; compile on where Triton can build kernels. CPU:
bf16 autocast where the CPU has native bf16 instructions (AVX-512 BF16 / AMX), else fp32. Never fp16 on CPU: without
hardware support it is unusably slow.
"""

from __future__ import annotations

import ctypes
import functools
import os
import sys
import time

import torch

from .errors import UserError

# Dense bf16 tensor-core peaks (FLOP/s), by substring of torch.cuda.get_device_name().
GPU_PEAK_BF16 = {
    "H100 PCIe": 756e12,  # before "H100": the first key found in the device name wins
    "H100 NVL": 835e12,
    "H200 NVL": 835e12,
    "H200": 989e12,
    "H100": 989e12,  # SXM
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


def resolve_device_type(setting: str) -> str:
    """A training/bench device setting (auto | cpu | cuda) -> "cpu" or "cuda"; accelerate places the processes."""
    name = default_device() if setting == "auto" else setting
    if name not in ("cpu", "cuda"):
        raise UserError(f"device must be auto, cpu or cuda; got {setting!r}")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("device=cuda but no CUDA GPU is visible; use --device=cpu")
    # accelerate's barrier names the GPU of each process's local rank, CPU processes too: with fewer GPUs than
    # processes, the first checkpoint of a run crashed with 'invalid device ordinal' (seen on a 1-GPU machine)
    processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if name == "cpu" and processes > 1 and 0 < torch.cuda.device_count() < processes:
        raise UserError(f"{processes} CPU processes on a machine with {torch.cuda.device_count()} GPU(s): accelerate "
                        f"would address a GPU per process; hide the GPUs: CUDA_VISIBLE_DEVICES= accelerate launch ...")
    return name


def compile_by_default(device_type: str) -> bool:
    """torch.compile unless told otherwise: on CUDA where inductor can build its kernels (Triton installed, a GPU of
    compute capability 7.0 or more; else the first compiled call fails: native Windows, P100, GTX 10xx); not on a CPU,
    where compiling costs ~20 s and gains little (see README)."""
    if device_type != "cuda":
        return False
    try:
        from torch.utils._triton import has_triton  # checks Triton and the GPU's capability
    except ImportError:
        return True
    return has_triton()


def resolve_mixed_precision(requested: str, device_type: str) -> str:
    """Map a dtype setting ('auto', 'bf16'/'bfloat16', 'fp16'/'float16', 'fp32'/'float32'/'no') to accelerate's
    mixed_precision value ('bf16', 'fp16' or 'no')."""
    aliases = {"bfloat16": "bf16", "bf16": "bf16", "float16": "fp16", "fp16": "fp16", "float32": "no", "fp32": "no",
               "no": "no", "auto": "auto"}
    if requested not in aliases:
        raise UserError(f"dtype '{requested}' is not one of auto, bfloat16, float16, float32")
    choice = aliases[requested]
    if device_type == "cuda":
        if choice == "auto":
            # without including_emulation=False, a pre-Ampere GPU (V100, T4) counts as bf16: emulated, and slow
            return "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16"
        return choice
    if choice == "fp16":
        raise UserError("dtype float16 is not supported on CPU (unusably slow); use bfloat16 or float32")
    if choice == "auto":
        return "bf16" if cpu_has_bf16() else "no"
    return choice


def training_attention(device_type: str, mixed_precision: str) -> str:
    """The attention implementation that trains fastest. sdpa (fused kernels) everywhere but on a CPU under bf16:
    there torch's flash-attention backward is ~3.7x slower than in fp32 and eats the whole bf16 gain, while plain
    matmul + softmax attention in bf16 is the fastest way (4-layer 128-wide step at batch 12 x 64 on a 2-core
    AVX-512 BF16 EPYC: fp32 sdpa 1.00x, bf16 sdpa 1.10x, bf16 eager 1.63x; bf16 eager also won at blocks of 256, 512
    and 1024 with 64-wide heads, at the cost of holding the (T, T) attention weights for backward)."""
    return "eager" if device_type == "cpu" and mixed_precision == "bf16" else "sdpa"


@functools.cache
def keep_freed_memory() -> bool:
    """Make glibc keep freed tensor memory in the process instead of handing it back to the OS at once.

    By default glibc serves every block above a threshold (128 KB, adapting up to 32 MB) with a fresh mmap and
    unmaps it on free, and trims the heap top: a CPU training step then faults its activations back in page by page,
    ~2,900 minor page faults per step for the laptop recipe, a quarter of its time. With the thresholds raised
    (the MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_ / MALLOC_TOP_PAD_ settings, applied with mallopt because
    the environment is read only at process start), a step has ~2 page faults. Linux with glibc only; a no-op
    elsewhere. Returns whether it applied."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
        return all([libc.mallopt(M_MMAP_THRESHOLD, 32 << 20),  # 32 MB: the largest every glibc accepts
                    libc.mallopt(M_TRIM_THRESHOLD, 256 << 20),
                    libc.mallopt(M_TOP_PAD, 64 << 20)])
    except (OSError, AttributeError):  # not glibc (musl, ...)
        return False


def torch_dtype(mixed_precision: str) -> torch.dtype:
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "no": torch.float32}[mixed_precision]


@functools.cache
def measured_cpu_peak_flops(dtype: torch.dtype = torch.float32, n: int = 1024, repeats: int = 10) -> float:
    """The CPU's practical peak in `dtype` (FLOP/s): one thread's best square matmul, times torch's threads.

    One thread, because a matmul on every thread at once measures whatever else the machine runs too: on a shared
    2-core machine it came out at one core's worth in about one run of three (MFU then read 74% instead of 37%),
    while one thread's figure times two matched the best two-thread runs (bf16 ~420 GFLOP/s, fp32 ~186). Its own
    random generator: measuring must not move the global RNG (exact resume depends on it)."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g).to(dtype)
    b = torch.randn(n, n, generator=g).to(dtype)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.mm(a, b)  # warm-up
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            torch.mm(a, b)
            best = min(best, time.perf_counter() - t0)
    finally:
        torch.set_num_threads(threads)
    return threads * 2 * n**3 / best


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
