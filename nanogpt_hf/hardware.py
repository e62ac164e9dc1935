"""What the machine has, decided in one place: device, mixed precision, attention, compile, peak FLOP/s and MFU."""

import ctypes
import functools
import os
import re
import timeit

import torch.utils._triton  # binds torch too

from .common import UserError

# dense bf16 tensor-core peaks (FLOP/s); the first key found in torch.cuda.get_device_name() wins
GPU_PEAK_BF16 = {"H100 PCIe": 756e12, "H100 NVL": 835e12, "H200 NVL": 835e12, "H200": 989e12, "H100": 989e12,
                 "A100": 312e12, "L40S": 362e12, "A10G": 70e12, "RTX 4090": 165e12, "RTX 3090": 71e12}


@functools.cache
def cpu_has_bf16() -> bool:  # x86 AVX-512 BF16 or AMX, Arm bf16 (Linux; elsewhere: no)
    flags = open("/proc/cpuinfo", encoding="utf-8").read() if os.path.exists("/proc/cpuinfo") else ""
    return any(f in flags for f in (" avx512_bf16", " amx_bf16", " bf16"))


def resolve_device_type(setting: str) -> str:  # auto | cpu | cuda | cuda:N -> "cpu" or "cuda"
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", setting):
        raise UserError(f"device must be auto, cpu, cuda or cuda:N; got {setting!r}")
    name = ("cuda" if torch.cuda.is_available() else "cpu") if setting == "auto" else setting.split(":")[0]
    processes, gpus = int(os.environ.get("LOCAL_WORLD_SIZE", "1")), torch.cuda.device_count()
    if name == "cuda" and int(setting.partition(":")[2] or 0) >= gpus:  # no GPU, or none with that index
        raise UserError(f"device={setting} but {gpus} CUDA GPU(s) are visible; use --device=cpu (or a lower index)")
    if ":" in setting and int(os.environ.get("WORLD_SIZE", "1")) > 1:  # accelerate gives each process its own GPU
        raise UserError(f"device={setting} names one GPU for several processes; use --device=cuda (accelerate "
                        "launch --gpu_ids chooses them)")
    if name == "cpu" and 0 < gpus < processes:  # accelerate's barrier addresses each local rank's GPU: a crash
        raise UserError(f"{processes} CPU processes on a machine with {gpus} GPU(s): accelerate would address a GPU "
                        f"per process; hide the GPUs: CUDA_VISIBLE_DEVICES= accelerate launch ...")
    return name


def compile_by_default(device_type: str) -> bool:
    return device_type == "cuda" and torch.utils._triton.has_triton()  # a CPU gains little for ~20 s of compiling


def resolve_mixed_precision(requested: str, device_type: str) -> str:
    """dtype -> accelerate's bf16, fp16 or no: auto is bf16 where the device has it, else fp16 on CUDA, fp32 on CPU."""
    choice = {"bfloat16": "bf16", "float16": "fp16", "float32": "no", "fp32": "no"}.get(requested, requested)
    if choice not in ("auto", "bf16", "fp16", "no"):
        raise UserError(f"dtype '{requested}' is not one of auto, bfloat16, float16, float32")
    if device_type == "cpu" and choice == "fp16":
        raise UserError("dtype float16 is not supported on CPU (unusably slow); use bfloat16 or float32")
    if choice != "auto":
        return choice
    if device_type == "cuda":  # including_emulation=False: a V100 or T4 only emulates bf16, slowly
        return "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16"
    return "bf16" if cpu_has_bf16() else "no"


def training_attention(device_type: str, mixed_precision: str) -> str:
    # on a CPU under bf16 sdpa's backward is ~3.7x slower than in fp32; eager bf16 attention is fastest there (1.63x)
    return "eager" if device_type == "cpu" and mixed_precision == "bf16" else "sdpa"


@functools.cache
def keep_freed_memory() -> bool:
    """Keep freed memory: glibc's unmapping made a CPU step fault its activations back in (a quarter of its time)."""
    libc = ctypes.CDLL(None) if os.name == "posix" else None
    options = ((-3, 32 << 20), (-1, 256 << 20), (-2, 64 << 20))  # M_MMAP_THRESHOLD, M_TRIM_THRESHOLD, M_TOP_PAD
    return hasattr(libc, "mallopt") and all([libc.mallopt(option, value) for option, value in options])


def torch_dtype(mixed_precision: str) -> torch.dtype:
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "no": torch.float32}[mixed_precision]


@functools.cache
def measured_cpu_peak_flops(dtype: torch.dtype = torch.float32, n: int = 512, repeats: int = 10) -> float:
    """One thread's best matmul times the threads (all at once measure the machine's load too); its own generator.
    n=512: in ~0.05 s at every run's start, 0-15% above n=1024's figure, which took ~0.5 s in float32."""
    a, b = torch.randn(2, n, n, generator=torch.Generator().manual_seed(0)).to(dtype)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    best = min(timeit.repeat(functools.partial(torch.mm, a, b), number=1, repeat=repeats + 1))  # 1st: a warm-up
    torch.set_num_threads(threads)
    return threads * 2 * n**3 / best


def peak_flops(device: torch.device | str, mixed_precision: str = "bf16") -> float | None:
    """Peak FLOP/s for MFU: the table for known GPUs in bf16/fp16 (fp32 depends on TF32), measured on CPU, else None."""
    device = torch.device(device)
    if device.type == "cpu":
        return measured_cpu_peak_flops(torch.bfloat16 if mixed_precision == "bf16" else torch.float32)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    return next((p for k, p in GPU_PEAK_BF16.items() if k in name and mixed_precision in ("bf16", "fp16")), None)


def flops_per_token(config, n_params: int, seq_len: int) -> float:  # forward + backward, PaLM appendix B
    return 6 * n_params + 12 * config.n_layer * config.n_head * (config.n_embd // config.n_head) * seq_len


def estimate_mfu(model, sequences_per_iter: int, seq_len: int, dt: float, peak_flops: float) -> float:
    # model FLOPs utilisation: sequences_per_iter sequences of seq_len tokens took dt seconds
    tokens = seq_len * sequences_per_iter
    return flops_per_token(model.config, model.get_num_params(), seq_len) * tokens / dt / peak_flops
