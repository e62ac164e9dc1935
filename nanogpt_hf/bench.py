"""bench.py: throughput and MFU, framework overhead, and generation speed, on whatever device runs it.

- train: nanoGPT's bench through train_step: ms/iter, tokens/s, MFU, peak memory (GPT-2 124M on GPU, else a CPU size).
- overhead: our accelerate train_step against a plain PyTorch step (nanoGPT's), from the same weights, interleaved.
- generate: greedy tokens/s with the KV cache (sample.py's) against nanoGPT's full recompute; the same tokens."""

import contextlib
import copy
import dataclasses
import functools
import os
import resource
import statistics
import time
from typing import Literal

import torch
from accelerate import Accelerator
from torch.nn.attention import sdpa_kernel
from torch.profiler import profile, schedule, supported_activities, tensorboard_trace_handler

from . import checkpoint, hardware
from .configuration_nanogpt import NanoGPTConfig
from .data import check_compatible, open_dataset, sample_batch
from .modeling_nanogpt import NanoGPTForCausalLM
from .sampling import block_size_of, generate_ids, window_keep
from .settings import load_recipe, parse_command, setting
from .training import configure_optimizer, end_training, prepare_model, train_step

GPU_DEFAULTS = dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, batch_size=12, vocab_size=50304)
CPU_DEFAULTS = dict(n_layer=6, n_head=6, n_embd=384, block_size=256, batch_size=8, vocab_size=65)
LR, GRAD_CLIP, WEIGHT_DECAY, BETAS = 6e-4, 1.0, 0.1, (0.9, 0.95)  # train.py's defaults
GREEDY = dict(do_sample=False, eos_token_id=[], pad_token_id=0)  # sample.py --greedy
ONE_UP = "[1, inf)"


@dataclasses.dataclass
class BenchSettings:
    mode: Literal["train", "overhead", "generate"] = setting("train", "train | overhead | generate")
    n_layer: int | None = setting(None, "layers (default: 12 on GPU, 6 on CPU and for generate)", range=ONE_UP)
    n_head: int | None = setting(None, "attention heads (default: 12 on GPU, 6 on CPU)", range=ONE_UP)
    n_embd: int | None = setting(None, "width (default: 768 on GPU, 384 on CPU)", range=ONE_UP)
    block_size: int | None = setting(None, "context length (default: 1024 on GPU, 256 on CPU)", range=ONE_UP)
    vocab_size: int | None = setting(None, "vocabulary (default: 50304 on GPU, 65 on CPU, or --data's)", range=ONE_UP)
    batch_size: int | None = setting(None, "sequences per micro-batch (default: 12 on GPU, 8 on CPU)", range=ONE_UP)
    gradient_accumulation_steps: int = setting(1, "micro-batches per optimizer step and process", range=ONE_UP)
    bias: bool = setting(False, "biases in Linear and LayerNorm (nanoGPT's bench uses none)")
    modern: bool = setting(False, "nanochat's architecture: shakespeare_char_modern.yaml's switches (with AdamW)")
    dropout: float = setting(0.0, "dropout probability", range="[0, 1)")
    data: str = setting("", "a prepared dataset (prepare.py) for real batches; empty: random tokens", path=True)
    init_from: str = setting("", "generate mode: a checkpoint folder (or gpt2...) instead of a random model", path=True)
    dtype: str = setting("auto", "auto, bfloat16, float16 or float32 (auto: bf16 where supported, else fp32)")
    compile: bool | None = setting(None, "train/overhead: torch.compile (default: on CUDA where Triton works)")
    device: Literal["auto", "cpu", "cuda"] = setting("auto", "auto, cpu or cuda")
    warmup: int | None = setting(None, "untimed steps first (default: 10 on GPU, 2 on CPU)", range="[0, inf)")
    iters: int | None = setting(None, "timed steps (default: 20 on GPU, 5 on CPU; overhead: per repeat)", range=ONE_UP)
    repeats: int = setting(4, "overhead mode: repeats * iters steps of each loop, interleaved", range=ONE_UP)
    max_new_tokens: int = setting(500, "generate mode: tokens to generate", range=ONE_UP)
    profile: str = setting("", "train mode: a folder for a torch.profiler trace of 4 more steps", path=True)
    seed: int = setting(1337, "seed for the weights and the data")
    threads: int = setting(0, "CPU threads for torch (0 = torch's default); 1 is steadier on a busy machine")


def resolve(s: BenchSettings, device_type: str) -> BenchSettings:  # unset (None) settings: the device's defaults
    if s.data and s.vocab_size is None:  # the dataset's vocabulary (a BPE's padded as nanoGPT pads 50257 to 50304)
        s = dataclasses.replace(s, vocab_size=open_dataset(s.data).model_vocab_size)
    gpu = device_type == "cuda"  # generate: the shakespeare_char model
    defaults = dict(GPU_DEFAULTS if gpu and s.mode != "generate" else CPU_DEFAULTS, warmup=10 if gpu else 2,
                    iters=20 if gpu else 5, compile=hardware.compile_by_default(device_type))
    return dataclasses.replace(s, **{k: v for k, v in defaults.items() if getattr(s, k) is None})


def build_model(s: BenchSettings) -> NanoGPTForCausalLM:
    torch.manual_seed(s.seed)
    shape = {k: getattr(s, k) for k in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size", "bias", "dropout")}
    modern = load_recipe("shakespeare_char_modern.yaml") if s.modern else {}  # its model switches, not its shape
    switches = {k: v for k, v in modern.items() if k in NanoGPTConfig.__annotations__ and k not in shape}
    return NanoGPTForCausalLM(NanoGPTConfig(**shape, **switches, bos_token_id=None, eos_token_id=None))


def make_batches(s: BenchSettings, device) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    """4 steps' micro-batches (x, y), made before timing: random tokens (speed does not depend on them) or --data's."""
    n = 4 * s.gradient_accumulation_steps
    if s.data:
        data = open_dataset(s.data)
        check_compatible(data.meta, s.vocab_size, s.block_size)
        batches = [sample_batch(data.stream("train"), seed=s.seed, step=i, index=0, batch_size=s.batch_size,
                                block_size=s.block_size) for i in range(n)]
    else:
        windows = torch.randint(s.vocab_size, (n, s.batch_size, s.block_size + 1),
                                generator=torch.Generator().manual_seed(s.seed))
        batches = zip(windows[..., :-1], windows[..., 1:])
    batches = [(x.contiguous().to(device), y.contiguous().to(device)) for x, y in batches]
    return [batches[i::4] for i in range(4)]


def timed(device: torch.device, fn, *args, **kwargs):  # (fn(...), seconds), the device's queued work included
    getattr(torch, device.type).synchronize(device)
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    getattr(torch, device.type).synchronize(device)
    return out, time.perf_counter() - t0


def set_up(s: BenchSettings, device_type: str, precision: str):
    """As train.py: (accelerator, model, step function (micro_batches, lrs, grad_clip) -> loss); prints the set-up."""
    if device_type == "cpu":
        hardware.keep_freed_memory()
    accelerator = Accelerator(cpu=device_type == "cpu", mixed_precision=precision, dynamo_backend="no")
    raw = build_model(s).train()
    raw.set_attn_implementation(hardware.training_attention(device_type, precision))
    adamw = configure_optimizer(raw, WEIGHT_DECAY, LR, BETAS, device_type)  # train.py's default optimizer
    model, optimizers = prepare_model(accelerator, raw, [adamw])
    model = torch.compile(model) if s.compile else model
    accelerator.print(
        f"{s.mode} bench: {raw.get_num_params() / 1e6:.2f}M parameters, {s.n_layer} layers, {s.n_head} heads, "
        f"{s.n_embd} wide, block {s.block_size}, batch {s.batch_size} x {s.gradient_accumulation_steps} micro-batches, "
        f"{accelerator.num_processes} process(es) on {accelerator.device}, mixed precision {precision}, compile "
        f"{s.compile}, data {s.data or 'random tokens'}")
    return accelerator, raw, functools.partial(train_step, accelerator, model, optimizers)


def run_train(s: BenchSettings, device_type: str, precision: str) -> tuple[float, float | None]:
    if s.profile:  # before the run: torch's trace writer kills the process on a folder it cannot write
        os.makedirs(s.profile, exist_ok=True)
    accelerator, raw, step = set_up(s, device_type, precision)
    device, accum, world = accelerator.device, s.gradient_accumulation_steps, accelerator.num_processes
    batches = make_batches(s, device)
    peak = hardware.peak_flops(device, precision)  # measured on CPU: before the timing, not during it
    for i in range(s.warmup):
        step(batches[i % 4], [LR], GRAD_CLIP)[0].item()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    # one sync per step (nanoGPT's loss.item() at log_interval=1); the median resists machine noise
    runs = [timed(device, step, batches[i % 4], [LR], GRAD_CLIP) for i in range(s.iters)]
    dt, loss, tokens = statistics.median(t for _, t in runs), runs[-1][0][0].item(), s.batch_size * s.block_size * accum
    mfu = hardware.estimate_mfu(raw, s.batch_size * accum, s.block_size, dt, peak) if peak else None
    memory = (f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB (CUDA max allocated)" if device.type ==
              "cuda" else f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB (process max RSS)")
    accelerator.print(
        f"{dt * 1000:.1f} ms/iter (median of {s.iters}) | {tokens / dt:,.0f} tokens/s per process, "
        f"{tokens * world / dt:,.0f} in total | MFU {f'{mfu * 100:.1f}%' if mfu is not None else 'n/a'} of "
        f"{f'{peak / 1e12:.2f} TFLOP/s' if peak else 'unknown'} ({device.type} {precision} peak"
        f"{'; disturbed: rerun on a quiet machine' if mfu and mfu > 1 else ''}) "  # busy: a CPU peak measured too low
        f"| peak memory {memory} | loss {loss:.3f}")
    if s.profile:  # 1 warm-up + 3 recorded steps, after the timing so that they do not disturb it
        with profile(activities=supported_activities(), schedule=schedule(wait=0, warmup=1, active=3),
                     on_trace_ready=tensorboard_trace_handler(s.profile), record_shapes=True, acc_events=True) as prof:
            for i in range(4):
                step(batches[i], [LR], GRAD_CLIP)[0].item()
                prof.step()
        accelerator.print(f"profiler trace written to {s.profile}/ (tensorboard --logdir {s.profile}, or Perfetto)")
    end_training(accelerator)  # under accelerate launch: close the process group, or exiting can abort
    return dt, mfu  # for benchmarks/gpu_check.py


def plain_step(model, optimizer, micro_batches, lrs: list[float], grad_clip, autocast, scaler) -> tuple:
    """nanoGPT's train.py step in plain PyTorch, AdamW at lrs[0]: the baseline our train_step is measured against.
    Returns (loss, gradient norm or None), as train_step."""
    for group in optimizer.param_groups:
        group["lr"] = lrs[0]
    total = torch.zeros((), device=micro_batches[0][0].device)
    for i, (x, y) in enumerate(micro_batches):
        sync = i == len(micro_batches) - 1 or not hasattr(model, "no_sync")  # DDP: on the last micro-batch only
        with contextlib.nullcontext() if sync else model.no_sync(), autocast:
            loss = model(input_ids=x, shift_labels=y, use_cache=False).loss / len(micro_batches)
        scaler.scale(loss).backward()
        total += loss.detach()
    norm = None
    if grad_clip > 0.0:
        scaler.unscale_(optimizer)
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return total, norm


def run_overhead(s: BenchSettings, device_type: str, precision: str) -> None:
    accelerator, raw, step = set_up(s, device_type, precision)
    device, world = accelerator.device, accelerator.num_processes
    # nanoGPT's set-up of the same initial weights (prepare moved them, changed none); DDP with several processes
    plain = copy.deepcopy(raw)
    plain_optimizer = configure_optimizer(plain, WEIGHT_DECAY, LR, BETAS, device.type)
    if world > 1:
        plain = torch.nn.parallel.DistributedDataParallel(plain, [device.index] if device.type == "cuda" else None)
    autocast = torch.autocast(device.type, dtype=hardware.torch_dtype(precision), enabled=precision != "no")
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    loops = {"accelerate": step, "plain": functools.partial(plain_step, torch.compile(plain) if s.compile else plain,
                                                            plain_optimizer, autocast=autocast, scaler=scaler)}
    batches, times, first = make_batches(s, device), {name: [] for name in loops}, {}
    # step by step, alternating who goes first: noise (other processes, clock changes) then hits both loops alike
    for r in range(-max(s.warmup, 1), s.repeats * s.iters):  # warm-up steps (r < 0) untimed
        for name in list(loops)[::1 if r % 2 == 0 else -1]:
            (loss, _), seconds = timed(device, loops[name], batches[r % 4], [LR], GRAD_CLIP)
            first.setdefault(name, loss.item())  # the same weights, the same batch: the losses must agree
            times[name] += [seconds * 1000] if r >= 0 else []
    med = {name: statistics.median(t) for name, t in times.items()}
    accelerator.print(f"{s.repeats * s.iters} interleaved steps each; first-step loss: accelerate "
                      f"{first['accelerate']:.6f}, plain {first['plain']:.6f}")
    for name, t in times.items():
        q = statistics.quantiles(t, n=4) if len(t) > 1 else t * 3
        accelerator.print(f"{name:>10}: median {med[name]:.1f} ms/iter (quartiles {q[0]:.1f} .. {q[2]:.1f})")
    ratio = med["accelerate"] / med["plain"]
    accelerator.print(f"ratio accelerate / plain: {ratio:.3f} ({(ratio - 1) * 100:+.1f}%; target within 5%)")
    end_training(accelerator)


@torch.inference_mode()
def generate_full_recompute(model, idx: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
    """nanoGPT's GPT.generate, greedy: a forward over the whole context for every new token, no cache, the context
    slid with generate_ids's window (so that both give the same tokens past block_size). (B, max_new_tokens)."""
    block_size, start, prompt_len = block_size_of(model), 0, idx.shape[1]
    for _ in range(max_new_tokens):
        if idx.shape[1] - start > block_size:  # the context no longer fits: slide the window
            start = idx.shape[1] - window_keep(block_size)
        logits = model(idx[:, start:], use_cache=False, logits_to_keep=1).logits[:, -1, :]  # (B, vocab)
        idx = torch.cat((idx, torch.argmax(logits, dim=-1, keepdim=True)), dim=1)
    return idx[:, prompt_len:]


def run_generate(s: BenchSettings, device_type: str, precision: str) -> tuple[float, float]:
    device, dtype, n = torch.device(device_type), hardware.torch_dtype(precision), s.max_new_tokens
    model = checkpoint.load_pretrained(s.init_from, dtype=dtype)[0] if s.init_from else build_model(s)
    model = model.to(device=device, dtype=dtype).eval()
    prompt = torch.zeros((1, 1), dtype=torch.long, device=device)  # one token, like sample.py's "\n"
    # both on the attention backends model.generate uses: the full recompute changes length at every token too
    with sdpa_kernel(NanoGPTForCausalLM.GENERATION_SDPA_BACKENDS):
        for k in (min(8, n), n):  # a warm-up, then the timed run
            cached, t_cached = timed(device, generate_ids, model, prompt, None, k, **GREEDY)
            full, t_full = timed(device, generate_full_recompute, model, prompt, k)
    cfg, diff = model.config, (cached != full).nonzero()  # (differences, 2)
    same = "yes" if len(diff) == 0 else f"NO (first difference at new token {int(diff[0, 1])})"
    print(f"generate bench: {model.get_num_params() / 1e6:.2f}M parameters ({cfg.n_layer} layers, {cfg.n_embd} "
          f"wide, block {block_size_of(model)}, vocab {cfg.vocab_size}) on {device}, {str(dtype)[6:]}, greedy, "
          f"{n} new tokens from a 1-token prompt")
    print(f"KV cache (model.generate): {n / t_cached:,.1f} tokens/s ({t_cached:.2f} s)")
    print(f"full recompute (nanoGPT):  {n / t_full:,.1f} tokens/s ({t_full:.2f} s)")
    print(f"speed-up: {t_full / t_cached:.1f}x | same tokens: {same}")
    if len(diff):  # the cache must be exact: our bug, or a near-tie in a low-precision dtype
        raise AssertionError("the KV cache changed the tokens; rerun with --dtype=float32: a near-tie, or a bug?")
    return n / t_cached, n / t_full  # tokens/s


def main(argv: list[str] | None = None) -> None:
    s, _ = parse_command(BenchSettings, argv, prog="bench.py", description="Benchmark training throughput and MFU, "
                         "accelerate's overhead, or KV-cache generation speed.")
    device_type = hardware.resolve_device_type(s.device)
    if s.threads > 0:  # a process setting, but bench is the whole process
        torch.set_num_threads(s.threads)
    precision = hardware.resolve_mixed_precision(s.dtype, device_type)
    s = resolve(s, device_type)
    {"train": run_train, "overhead": run_overhead, "generate": run_generate}[s.mode](s, device_type, precision)
