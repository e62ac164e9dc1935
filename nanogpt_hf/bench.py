"""bench.py: honest throughput, MFU, framework overhead and generation speed, on whatever device runs it.

Three modes (`python bench.py --mode=...`, or `accelerate launch bench.py ...` for several processes):
- train: forward + backward + AdamW step through training.train_step (the step training uses) under an Accelerator,
  on fixed random batches or windows of a prepared dataset (--data DIR). Warm-up steps, then timed steps. Prints
  ms/iter, tokens/s per process and in total, MFU against hardware.peak_flops (a table of GPU peaks; on CPU a
  measured matmul peak, where nanoGPT assumes an A100 everywhere), and peak memory. --profile=DIR writes a
  torch.profiler trace of a few more steps (open it with TensorBoard or chrome://tracing / Perfetto).
- overhead: the same model, weights and batches stepped by our accelerate train_step and by a plain PyTorch loop
  (autocast + backward + clip + AdamW, nanoGPT's train.py step), interleaved in repeats so that machine noise hits
  both alike. Prints the medians and their ratio (the target: within 5%).
- generate: greedy tokens/s of generating N tokens with the KV cache (sampling.generate_ids, what sample.py runs)
  against full recomputation the way nanoGPT samples (a full forward over the cropped context for every token), on
  the same model from the same prompt; the tokens must be identical. Beyond block_size both condition on the same
  sliding window (sampling.py's policy: the context is cropped to 3/4 block_size when it overflows); nanoGPT's own
  window is always full (block_size), so its per-token cost is, if anything, higher than the reference loop's here:
  the printed speed-up is conservative. Both run the same model in the same dtype (sample.py's: the model cast to it).
  In bf16 the full recompute gains more from fast matmuls than one-token decoding does, so the speed-up is smaller
  than in float32 (nanoGPT itself samples in float32 on CPU).

Defaults follow the device: on a GPU nanoGPT's bench (GPT-2 124M: 12 layers, 12 heads, 768 wide, block 1024, batch
12, vocab 50304, bf16, compile); on CPU a model that steps in well under a second (the shakespeare_char shape at
batch 8, no compile). Generate mode defaults to the shakespeare_char model (6/6/384, block 256, vocab 65), 500
tokens, or --init_from a checkpoint.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import os
import resource
import statistics
import time
from typing import Literal

import torch

from . import hardware
from .errors import UserError
from .settings import parse_command, setting

# (n_layer, n_head, n_embd, block_size, batch_size, vocab_size)
GPU_DEFAULTS = dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, batch_size=12, vocab_size=50304)
CPU_DEFAULTS = dict(n_layer=6, n_head=6, n_embd=384, block_size=256, batch_size=8, vocab_size=65)
GENERATE_DEFAULTS = dict(n_layer=6, n_head=6, n_embd=384, block_size=256, batch_size=1, vocab_size=65)


@dataclasses.dataclass
class BenchSettings:
    mode: Literal["train", "overhead", "generate"] = setting("train", "train | overhead | generate")
    n_layer: int | None = setting(None, "layers (default: 12 on GPU, 6 on CPU and for generate)")
    n_head: int | None = setting(None, "attention heads (default: 12 on GPU, 6 on CPU)")
    n_embd: int | None = setting(None, "width (default: 768 on GPU, 384 on CPU)")
    block_size: int | None = setting(None, "context length (default: 1024 on GPU, 256 on CPU)")
    vocab_size: int | None = setting(None, "vocabulary (default: 50304 on GPU, 65 on CPU; from --data if given)")
    batch_size: int | None = setting(None, "sequences per micro-batch (default: 12 on GPU, 8 on CPU)")
    gradient_accumulation_steps: int = setting(1, "micro-batches per optimizer step and process")
    bias: bool = setting(False, "biases in Linear and LayerNorm (nanoGPT's bench uses none)")
    dropout: float = setting(0.0, "dropout probability")
    data: str = setting("", "a prepared dataset folder (prepare.py) for real batches; empty: fixed random tokens",
                        path=True)
    init_from: str = setting("", "generate mode: a checkpoint folder (or gpt2...) instead of a random model", path=True)
    dtype: str = setting("auto", "auto, bfloat16, float16 or float32 (auto: bf16 where supported, else fp32)")
    compile: bool | None = setting(None, "train/overhead: torch.compile the model (default: on for CUDA where Triton "
                                         "works, off on CPU)")
    device: str = setting("auto", "auto, cpu or cuda")
    warmup: int | None = setting(None, "untimed steps first (default: 10 on GPU, 2 on CPU)")
    iters: int | None = setting(None, "timed steps (default: 20 on GPU, 5 on CPU); per side and repeat in overhead")
    repeats: int = setting(4, "overhead mode: repeats * iters steps of each loop, interleaved one by one")
    max_new_tokens: int = setting(500, "generate mode: tokens to generate")
    profile: str = setting("", "train mode: write a torch.profiler trace of a few extra steps into this folder")
    seed: int = setting(1337, "seed for the weights and the data")
    threads: int = setting(0, "CPU threads for torch (0 = torch's default); 1 is steadier on a busy machine")


# ---- set-up ------------------------------------------------------------------------------------------------------


def resolve(s: BenchSettings, device_type: str) -> BenchSettings:
    """Fill every unset (None) setting from the defaults for this device and mode."""
    defaults = GENERATE_DEFAULTS if s.mode == "generate" else GPU_DEFAULTS if device_type == "cuda" else CPU_DEFAULTS
    gpu = device_type == "cuda"
    filled = {k: v for k, v in defaults.items() if getattr(s, k) is None}
    device_defaults = dict(compile=hardware.compile_by_default(device_type), warmup=10 if gpu else 2,
                           iters=20 if gpu else 5)
    filled.update({k: v for k, v in device_defaults.items() if getattr(s, k) is None})
    s = dataclasses.replace(s, **filled)
    for name in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size", "batch_size", "gradient_accumulation_steps",
                 "iters", "repeats", "max_new_tokens"):
        if getattr(s, name) < 1:
            raise UserError(f"setting '{name}' must be at least 1, got {getattr(s, name)}")
    if s.warmup < 0:
        raise UserError(f"setting 'warmup' must be >= 0, got {s.warmup}")
    if s.profile:  # before the benchmark runs: torch's trace writer crashes the process on a bad folder
        try:
            os.makedirs(s.profile, exist_ok=True)
        except OSError as exc:
            raise UserError(f"cannot use --profile={s.profile}: {exc.strerror}; give a folder to write into") from None
    return s


def build_model(s: BenchSettings):
    from .configuration_nanogpt import NanoGPTConfig
    from .modeling_nanogpt import NanoGPTForCausalLM

    try:
        config = NanoGPTConfig(n_layer=s.n_layer, n_head=s.n_head, n_embd=s.n_embd, block_size=s.block_size,
                               vocab_size=s.vocab_size, bias=s.bias, dropout=s.dropout,
                               bos_token_id=None, eos_token_id=None)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    torch.manual_seed(s.seed)
    return NanoGPTForCausalLM(config)


def make_batches(s: BenchSettings, n: int, device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """n micro-batches (x, y), made up front so that timing measures the model step, not data loading. Random
    tokens by default (the speed of a step does not depend on the values); windows of --data when given."""
    if s.data:
        from .data import check_compatible, open_dataset, sample_batch

        data = open_dataset(s.data)
        check_compatible(data.meta, s.vocab_size, s.block_size)
        stream = data.stream("train")
        batches = [sample_batch(stream, seed=s.seed, step=i, index=0, batch_size=s.batch_size,
                                block_size=s.block_size) for i in range(n)]
    else:
        g = torch.Generator().manual_seed(s.seed)
        batches = []
        for _ in range(n):
            w = torch.randint(s.vocab_size, (s.batch_size, s.block_size + 1), generator=g)
            batches.append((w[:, :-1].contiguous(), w[:, 1:].contiguous()))
    return [(x.to(device, non_blocking=True), y.to(device, non_blocking=True)) for x, y in batches]


def data_vocab_size(s: BenchSettings) -> BenchSettings:
    """With --data and no --vocab_size, size the model for the dataset's vocabulary (nanoGPT pads GPT-2's to 50304)."""
    if not s.data or s.vocab_size is not None:
        return s
    from .data import open_dataset

    vocab = open_dataset(s.data).vocab_size
    return dataclasses.replace(s, vocab_size=50304 if vocab == 50257 else vocab)


def dtype_name(precision: str) -> str:
    return str(hardware.torch_dtype(precision)).removeprefix("torch.")


def time_step(step, i: int, device: torch.device) -> tuple[float, float]:
    """(milliseconds, loss) of step(i), timed until the loss is on the host."""
    synchronize(device)
    t0 = time.perf_counter()
    loss = step(i).item()
    return (time.perf_counter() - t0) * 1000, loss


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB (CUDA max allocated)"
    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB (process max RSS)"


def make_accelerator(device_type: str, precision: str):
    from accelerate import Accelerator

    if device_type == "cpu":
        hardware.keep_freed_memory()  # as train.py does
    return Accelerator(cpu=device_type == "cpu", mixed_precision=precision, dynamo_backend="no")  # as train.py


def build_training_model(s: BenchSettings, device_type: str, precision: str):
    model = build_model(s)
    model.set_attn_implementation(hardware.training_attention(device_type, precision))  # as train.py does
    return model.train()


def prepare_for_training(s: BenchSettings, accelerator, device_type: str, precision: str):
    """Model and optimizer exactly as training sets them up: nanoGPT's AdamW groups, compiled after prepare."""
    from .training import prepare_model

    model = build_training_model(s, device_type, precision)
    optimizer = model.configure_optimizers(0.1, 6e-4, (0.9, 0.95), device_type)
    model_p, optimizer = prepare_model(accelerator, model, optimizer)
    return model, torch.compile(model_p) if s.compile else model_p, optimizer


# ---- train mode --------------------------------------------------------------------------------------------------


def run_train(s: BenchSettings, device_type: str, precision: str) -> dict:
    from .training import end_training, train_step

    accelerator = make_accelerator(device_type, precision)
    log = accelerator.print
    raw, model, optimizer = prepare_for_training(s, accelerator, device_type, precision)
    device = accelerator.device
    accum = s.gradient_accumulation_steps
    batches = make_batches(s, accum * 4, device)  # a few distinct batches, cycled
    step_batches = [batches[i * accum:(i + 1) * accum] for i in range(4)]

    def step(i):
        return train_step(accelerator, model, optimizer, step_batches[i % 4], lr=6e-4, grad_clip=1.0)

    log(f"train bench: {raw.get_num_params() / 1e6:.2f}M parameters, {s.n_layer} layers, {s.n_head} heads, "
        f"{s.n_embd} wide, block {s.block_size}, batch {s.batch_size} x {accum} micro-batches, "
        f"{accelerator.num_processes} process(es) on {device}, mixed precision {precision}, compile {s.compile}, "
        f"data {s.data or 'random tokens'}")
    peak = hardware.peak_flops(device, precision)  # measured on CPU: do it before timing, not during
    for i in range(s.warmup):
        step(i).item()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    # one sync per step (nanoGPT's loss.item() at log_interval=1): the median of the steps resists machine noise
    times, losses = zip(*(time_step(step, i, device) for i in range(s.iters)))
    dt, loss = statistics.median(times) / 1000, losses[-1]
    tokens = s.batch_size * s.block_size * accum
    world = accelerator.num_processes
    mfu = raw.estimate_mfu(s.batch_size * accum, dt, peak, s.block_size) if peak else None
    result = dict(ms_per_iter=dt * 1000, tokens_per_s=tokens / dt, tokens_per_s_total=tokens * world / dt,
                  mfu=mfu, peak_flops=peak, loss=loss)
    peak_txt = f"{peak / 1e12:.2f} TFLOP/s" if peak else "unknown"
    log(f"{dt * 1000:.1f} ms/iter (median of {s.iters}) | {tokens / dt:,.0f} tokens/s per process, "
        f"{tokens * world / dt:,.0f} in total "
        f"| MFU {f'{mfu * 100:.1f}%' if mfu is not None else 'n/a'} of {peak_txt} ({device.type} {precision} peak) "
        f"| peak memory {peak_memory(device)} | loss {loss:.3f}")
    if mfu is not None and mfu > 1:
        # on CPU the peak is measured at start-up: another busy process then makes it too low
        log("warning: MFU above 100%: the peak measurement was disturbed (a busy machine?); rerun on a quiet one")
    if s.profile:
        profile_steps(s.profile, step, device)
        log(f"profiler trace written to {s.profile}/ (tensorboard --logdir {s.profile}, or open the .json in Perfetto)")
    end_training(accelerator)  # under accelerate launch: close the process group, or exiting can abort
    return result


def profile_steps(folder: str, step, device: torch.device) -> None:
    """A torch.profiler trace of 1 warm-up + 3 recorded steps, after the timing so it does not disturb it."""
    from torch.profiler import ProfilerActivity, profile, schedule, tensorboard_trace_handler

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities, schedule=schedule(wait=0, warmup=1, active=3),
                 on_trace_ready=tensorboard_trace_handler(folder), record_shapes=True, acc_events=True) as prof:
        for i in range(4):
            step(i).item()
            prof.step()


# ---- overhead mode -----------------------------------------------------------------------------------------------


def plain_step(model, optimizer, micro_batches, lr: float, grad_clip: float, autocast, scaler) -> torch.Tensor:
    """nanoGPT's train.py step in plain PyTorch: the baseline our accelerate train_step is measured against."""
    n = len(micro_batches)
    for group in optimizer.param_groups:
        group["lr"] = lr
    total = torch.zeros((), device=micro_batches[0][0].device)
    for i, (x, y) in enumerate(micro_batches):
        no_sync = model.no_sync() if (hasattr(model, "no_sync") and i < n - 1) else contextlib.nullcontext()
        with no_sync, autocast():
            loss = model(input_ids=x, shift_labels=y, use_cache=False).loss / n
        scaler.scale(loss).backward()
        total += loss.detach()
    if grad_clip > 0.0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return total


def plain_setup(raw_model, s: BenchSettings, accelerator, device_type: str, precision: str):
    """A copy of the same weights, set up the way nanoGPT's train.py does it (DDP only with several processes)."""
    model = copy.deepcopy(raw_model).to(accelerator.device)
    optimizer = model.configure_optimizers(0.1, 6e-4, (0.9, 0.95), device_type)
    if accelerator.num_processes > 1:
        from torch.nn.parallel import DistributedDataParallel

        ids = [accelerator.device.index] if accelerator.device.type == "cuda" else None
        model = DistributedDataParallel(model, device_ids=ids)
    if s.compile:
        model = torch.compile(model)
    dtype = hardware.torch_dtype(precision)
    autocast = lambda: torch.autocast(device_type, dtype=dtype, enabled=precision != "no")  # noqa: E731
    scaler = torch.amp.GradScaler(device_type, enabled=precision == "fp16")
    return model, optimizer, autocast, scaler


def run_overhead(s: BenchSettings, device_type: str, precision: str) -> dict:
    from .training import end_training, prepare_model, train_step

    accelerator = make_accelerator(device_type, precision)
    log = accelerator.print
    # the plain copy is taken before prepare(): the same initial weights, the same optimizer settings
    raw = build_training_model(s, device_type, precision)
    plain_model, plain_opt, autocast, scaler = plain_setup(raw, s, accelerator, device_type, precision)
    optimizer = raw.configure_optimizers(0.1, 6e-4, (0.9, 0.95), device_type)
    model, optimizer = prepare_model(accelerator, raw, optimizer)
    if s.compile:  # as train.py: compiled after prepare
        model = torch.compile(model)
    device = accelerator.device
    accum = s.gradient_accumulation_steps
    batches = make_batches(s, accum * 4, device)
    step_batches = [batches[i * accum:(i + 1) * accum] for i in range(4)]

    loops = {
        "accelerate": lambda i: train_step(accelerator, model, optimizer, step_batches[i % 4], 6e-4, 1.0),
        "plain": lambda i: plain_step(plain_model, plain_opt, step_batches[i % 4], 6e-4, 1.0, autocast, scaler),
    }
    # the first step of each starts from the same weights on the same batch: the losses must agree
    first = {name: loop(0).item() for name, loop in loops.items()}
    for name, loop in loops.items():
        for i in range(1, s.warmup):
            loop(i).item()
    # step by step, alternating who goes first: machine noise (other processes, clock changes) then hits both
    # loops alike, where blocks of steps would hand one side a quiet period and the other a busy one
    times = {name: [] for name in loops}
    for r in range(s.repeats * s.iters):
        for name in (list(loops) if r % 2 == 0 else list(reversed(loops))):
            times[name].append(time_step(loops[name], r, device)[0])
    med = {name: statistics.median(t) for name, t in times.items()}
    ratio = med["accelerate"] / med["plain"]
    log(f"overhead bench: {raw.get_num_params() / 1e6:.2f}M parameters, block {s.block_size}, batch {s.batch_size} "
        f"x {accum}, {accelerator.num_processes} process(es) on {device}, mixed precision {precision}, "
        f"compile {s.compile}, {s.repeats * s.iters} interleaved steps each")
    log(f"first-step loss: accelerate {first['accelerate']:.6f}, plain {first['plain']:.6f}")
    for name in loops:
        q = statistics.quantiles(times[name], n=4) if len(times[name]) > 1 else times[name] * 3
        log(f"{name:>10}: median {med[name]:.1f} ms/iter (quartiles {q[0]:.1f} .. {q[2]:.1f})")
    log(f"ratio accelerate / plain: {ratio:.3f} ({(ratio - 1) * 100:+.1f}%; target within 5%)")
    end_training(accelerator)
    return dict(ms_accelerate=med["accelerate"], ms_plain=med["plain"], ratio=ratio, first_loss=first)


# ---- generate mode -----------------------------------------------------------------------------------------------


@torch.inference_mode()
def generate_full_recompute(model, idx: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
    """nanoGPT's GPT.generate, greedy: a full forward over the (cropped) context for every new token, no cache.

    The context is cropped with sampling.generate_ids's window (see the module docstring), so that both produce the
    same tokens past block_size too. Returns the new tokens (B, max_new_tokens).
    """
    from .sampling import block_size_of, window_keep

    block_size = block_size_of(model)
    start, prompt_len = 0, idx.shape[1]
    for _ in range(max_new_tokens):
        if idx.shape[1] - start > block_size:  # the context no longer fits: slide the window, as generate_ids does
            start = idx.shape[1] - window_keep(block_size)
        logits = model(idx[:, start:], use_cache=False, logits_to_keep=1).logits[:, -1, :]
        idx_next = torch.argmax(logits, dim=-1, keepdim=True)
        idx = torch.cat((idx, idx_next), dim=1)
    return idx[:, prompt_len:]


def generate_cached(model, idx: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
    """What sample.py --greedy runs: model.generate with the KV cache (sliding window past block_size)."""
    from .sampling import generate_ids

    return generate_ids(model, idx, None, max_new_tokens, do_sample=False, eos_token_id=[], pad_token_id=0)


def load_generate_model(s: BenchSettings, device: torch.device, precision: str):
    if s.init_from:
        from .sampling import load_model_and_tokenizer

        model, _ = load_model_and_tokenizer(s.init_from, "")
    else:
        model = build_model(s)
    return model.to(device=device, dtype=hardware.torch_dtype(precision)).eval()


def timed(fn, device):
    synchronize(device)
    t0 = time.perf_counter()
    out = fn()
    synchronize(device)
    return out, time.perf_counter() - t0


def run_generate(s: BenchSettings, device_type: str, precision: str) -> dict:
    device = torch.device(device_type)
    model = load_generate_model(s, device, precision)
    prompt = torch.zeros((1, 1), dtype=torch.long, device=device)  # one token, like sample.py's "\n" start
    n = s.max_new_tokens
    from torch.nn.attention import sdpa_kernel

    from .modeling_nanogpt import NanoGPTForCausalLM

    # both on the attention backends our generate uses (see there): the full recompute also changes length at every
    # token, and a stock GPT-2 (--init_from=gpt2) has no such generate of its own
    with sdpa_kernel(NanoGPTForCausalLM.GENERATION_SDPA_BACKENDS):
        # warm-up both paths (allocator, kernels, generate's set-up)
        generate_cached(model, prompt, min(8, n))
        generate_full_recompute(model, prompt, min(8, n))
        cached, t_cached = timed(lambda: generate_cached(model, prompt, n), device)
        full, t_full = timed(lambda: generate_full_recompute(model, prompt, n), device)
    same = torch.equal(cached, full)
    first_diff = None if same else int((cached != full).nonzero()[0, 1])
    speedup = t_full / t_cached
    from .sampling import block_size_of

    cfg = model.config  # generic names: --init_from may be a stock GPT-2 checkpoint
    n_params = getattr(model, "get_num_params", model.num_parameters)()  # nanoGPT counts without wpe
    print(f"generate bench: {n_params / 1e6:.2f}M parameters ({cfg.num_hidden_layers} layers, "
          f"{cfg.hidden_size} wide, block {block_size_of(model)}, vocab {cfg.vocab_size}) on {device}, "
          f"{dtype_name(precision)}, greedy, {n} new tokens from a 1-token prompt")
    print(f"KV cache (model.generate): {n / t_cached:,.1f} tokens/s ({t_cached:.2f} s)")
    print(f"full recompute (nanoGPT):  {n / t_full:,.1f} tokens/s ({t_full:.2f} s)")
    print(f"speed-up: {speedup:.1f}x | same tokens: "
          f"{'yes' if same else f'NO (first difference at new token {first_diff})'}")
    if not same:
        # the cache must be exact; a difference is our bug (or a near-tie in a low-precision dtype)
        raise AssertionError(f"KV-cache and full-recompute generation differ at new token {first_diff} "
                             f"(dtype {precision}); rerun with --dtype=float32 to tell a near-tie from a bug")
    return dict(tokens_per_s_cached=n / t_cached, tokens_per_s_full=n / t_full, speedup=speedup, same=same)


# ---- the command -------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    s, _ = parse_command(BenchSettings, argv, prog="bench.py",
                         description="Benchmark training throughput and MFU, accelerate's overhead, or KV-cache "
                                     "generation speed.")
    device_type = hardware.resolve_device_type(s.device)
    if s.threads > 0:
        # a process setting, but this is the whole process: bench is a command, not a library call
        torch.set_num_threads(s.threads)
    precision = hardware.resolve_mixed_precision(s.dtype, device_type)
    s = resolve(data_vocab_size(s), device_type)
    run = {"train": run_train, "overhead": run_overhead, "generate": run_generate}[s.mode]
    run(s, device_type, precision)
    return 0


__all__ = ["BenchSettings", "generate_full_recompute", "main", "plain_step", "run_generate", "run_overhead",
           "run_train"]
