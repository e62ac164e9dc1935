"""What no CPU can show, checked on one GPU in a few minutes, in one table:

    python benchmarks/gpu_check.py

- the GPT-2 124M train step compiled (bench.py's train mode): ms/iter and MFU; the same for the modern 124M
  (shakespeare_char_modern.yaml's switches: rotary, RMSNorm, QK-norm, ReLU^2, soft-capped logits) under flash attention
- compiled and eager logits equal within bf16 tolerance, for both architectures
- task scoring (evaluation.loglikelihoods, the eval_tasks scorer, on synthetic HellaSwag-shaped requests) on the 124M
  shape: documents/s eager and compiled, and the same choices both ways
- a 2-process FSDP step on this machine's GPUs through accelerate launch (where accelerate allows it; else the reason)
- greedy generation in bf16 with the KV cache (bench.py's generate mode): tokens/s, and the same tokens as without it

The table (Markdown) goes to stdout, the checks' log to stderr. A failing check prints its error in its row and the
others still run; exit status 1 if any failed. Random weights throughout (speed does not depend on them): their
logits are near uniform, so in bf16 a near-tie may flip a document's choice or a greedy token; read such a row beside
the logits rows. On a machine without a CUDA GPU it refuses (exit 2)."""

import argparse
import contextlib
import dataclasses
import functools
import os
import re
import signal
import subprocess
import sys
import time

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState

from nanogpt_hf import bench, hardware
from nanogpt_hf.cli import run
from nanogpt_hf.common import UserError, first_line
from nanogpt_hf.evaluation import encode_pairs, loglikelihoods
from nanogpt_hf.tokenization import gpt2_tokenizer

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_tasks import synthetic_examples  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GPT2_124M = dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50304)
FSDP_SHAPE = dict(n_layer=2, n_head=4, n_embd=256, block_size=256)  # whether the step runs, not its speed


@dataclasses.dataclass(frozen=True)
class Plan:
    """What the checks run: the GPU's by default; TINY exercises every code path on a CPU in seconds (the tests)."""
    device: str = "cuda"
    shape: dict = dataclasses.field(default_factory=GPT2_124M.copy)
    batch_size: int = 12
    warmup: int = 5  # the first step compiles
    iters: int = 10
    dtype: str = "auto"  # bf16 where the GPU has it
    compile_backend: str = "inductor"  # torch.compile's; TINY: "eager" (dynamo's graph capture, no code generation)
    examples: int = 64
    new_tokens: int = 200
    fsdp_shape: dict = dataclasses.field(default_factory=FSDP_SHAPE.copy)


TINY = Plan(device="cpu", shape=dict(n_layer=1, n_head=2, n_embd=32, block_size=64, vocab_size=50304), batch_size=2,
            warmup=1, iters=2, dtype="float32", compile_backend="eager", examples=4, new_tokens=8,
            fsdp_shape=dict(n_layer=1, n_head=2, n_embd=32, block_size=32))


def precision(plan: Plan) -> str:  # accelerate's bf16, fp16 or no
    return hardware.resolve_mixed_precision(plan.dtype, plan.device)


def settings(plan: Plan, mode: str, modern: bool = False) -> bench.BenchSettings:
    s = bench.BenchSettings(mode=mode, **plan.shape, batch_size=plan.batch_size, modern=modern, dtype=plan.dtype,
                            compile=plan.compile_backend == "inductor", device=plan.device, warmup=plan.warmup,
                            iters=plan.iters, max_new_tokens=plan.new_tokens)
    return bench.resolve(s, plan.device)


def check_train(plan: Plan, modern: bool = False) -> tuple[str, str]:
    """bench.py's train mode: ms/iter and MFU."""
    s = settings(plan, "train", modern)
    dt, mfu = bench.run_train(s, plan.device, precision(plan))
    return "ok", (f"{dt * 1000:.1f} ms/iter, MFU {f'{mfu * 100:.1f}%' if mfu is not None else 'n/a'} "
                  f"(batch {s.batch_size} x {s.block_size}, {precision(plan)}, compile {s.compile})")


@torch.no_grad()
def check_compiled_logits(plan: Plan, modern: bool = False) -> tuple[str, str]:
    """The same random batch through the model eager and compiled, under autocast: logits equal within bf16's
    tolerance (torch.testing's relative 1.6e-2, of the largest logit)."""
    model = bench.build_model(settings(plan, "train", modern)).to(plan.device).eval()
    x = torch.randint(model.config.vocab_size, (4, model.config.block_size),
                      generator=torch.Generator().manual_seed(0)).to(plan.device)
    autocast = torch.autocast(plan.device, dtype=hardware.torch_dtype(precision(plan)), enabled=precision(plan) != "no")
    with autocast:
        eager = model(input_ids=x, use_cache=False).logits.float()
        compiled = torch.compile(model, backend=plan.compile_backend)(input_ids=x, use_cache=False).logits.float()
    diff, scale = (compiled - eager).abs().max().item(), eager.abs().max().item()
    same_argmax = (compiled.argmax(-1) == eager.argmax(-1)).float().mean().item()
    return ("ok" if diff <= 1.6e-2 * scale else "FAIL"), (
        f"largest difference {diff:.2e}, largest logit {scale:.2f}; argmax equal at {same_argmax:.1%} of positions")


def check_hellaswag(plan: Plan) -> tuple[str, str]:
    """The task scorer eager then compiled, each after a warm-up pass (compiling, its shapes): documents/s, choices."""
    accelerator = Accelerator(cpu=plan.device == "cpu", mixed_precision=precision(plan))
    model = bench.build_model(settings(plan, "train")).to(accelerator.device)
    examples, results = synthetic_examples(plan.examples), {}
    pairs = encode_pairs(gpt2_tokenizer(), [(ex["query"], " " + c) for ex in examples for c in ex["choices"]])
    for name, scored in (("eager", model), ("compiled", torch.compile(model, backend=plan.compile_backend))):
        loglikelihoods(scored, pairs, accelerator)
        scores, seconds = bench.timed(accelerator.device, loglikelihoods, scored, pairs, accelerator)
        results[name] = scores[:, 0].view(len(examples), -1).argmax(-1), seconds  # each document's choice
    (eager, t_eager), (compiled, t_compiled) = results["eager"], results["compiled"]
    same = (eager == compiled).float().mean().item()
    return ("ok" if same == 1.0 else "FAIL"), (
        f"{len(examples) / t_eager:,.1f} documents/s eager, {len(examples) / t_compiled:,.1f} compiled; the same "
        f"choice for {same:.1%} of {len(examples)} documents")


def fsdp_command(plan: Plan) -> tuple[list[str], dict]:
    """accelerate launch of bench.py's train mode with 2 processes: FSDP2 on GPUs; on a CPU (TINY) accelerate has
    no FSDP, so the launch is DDP's (tests/fsdp_on_cpu.py)."""
    import socket

    with socket.socket() as sock:  # a free port: another launch may hold accelerate's default
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    gpu = plan.device == "cuda"
    shape = [f"--{k}={v}" for k, v in plan.fsdp_shape.items()]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--num_machines", "1",
           "--main_process_port", str(port), "--mixed_precision", precision(plan), "--dynamo_backend", "no",
           *(["--use_fsdp", "--fsdp_version", "2"] if gpu else ["--multi_gpu"]), os.path.join(ROOT, "bench.py"),
           "--mode=train", *shape, "--batch_size=2", "--warmup=1", "--iters=2", "--compile=false",
           f"--dtype={plan.dtype}"]
    cpu_env = dict(ACCELERATE_USE_CPU="1", CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    return cmd, dict(os.environ, **({} if gpu else cpu_env))


def launch_error(stderr: str) -> str:
    """The first exception a worker printed (not the launcher's ChildFailedError reporting it), else the first line."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if re.match(r"(\[rank\d+\]: )?[\w.]+(Error|Exception): ", line)
              and "ChildFailed" not in line]
    return (errors or lines or ["no output"])[0]


def check_fsdp(plan: Plan, timeout: float = 240) -> tuple[str, str]:
    cmd, env = fsdp_command(plan)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # its own group: a hung collective is killed with its workers
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        return "FAIL", f"no answer in {timeout:.0f} s (a hung collective?)"
    step = next((line for line in out.splitlines() if "ms/iter" in line), "")
    if proc.returncode == 0 and step:
        kind = "FSDP2" if plan.device == "cuda" else "DDP (accelerate has no FSDP on CPU)"
        return "ok", f"{kind}, 2 processes: {step.split(' | ')[0]}"
    # one GPU: accelerate gives process i the GPU cuda:i; whether anything else works is what this row tells
    status = "skip" if plan.device == "cuda" and torch.cuda.device_count() < 2 else "FAIL"
    return status, f"exit {proc.returncode} on {torch.cuda.device_count()} GPU(s): {launch_error(err)[:300]}"


def check_generate(plan: Plan) -> tuple[str, str]:
    """bench.py's generate mode on the 124M shape: tokens/s with and without the KV cache, the same greedy tokens."""
    cached, full = bench.run_generate(settings(plan, "generate"), plan.device, precision(plan))
    return "ok", (f"{cached:,.1f} tokens/s with the KV cache, {full:,.1f} without ({cached / full:.1f}x), same "
                  f"{plan.new_tokens} tokens, {precision(plan)}")


CHECKS = {"GPT-2 124M train step": check_train, "modern 124M train step": functools.partial(check_train, modern=True),
          "compiled = eager logits, GPT-2": check_compiled_logits,
          "compiled = eager logits, modern": functools.partial(check_compiled_logits, modern=True),
          "task scoring on 124M, eager and compiled": check_hellaswag, "2-process FSDP step": check_fsdp,
          "generation with the KV cache": check_generate}


@dataclasses.dataclass
class Row:
    check: str
    status: str  # ok, FAIL or skip
    result: str
    seconds: float


def run_check(name: str, check, plan: Plan) -> Row:
    """A check's row; its exception becomes its row's error. Each starts afresh: dynamo's caches (whose recompile
    limit would silently fall back to eager), accelerate's process-wide state, the GPU's cached memory."""
    torch._dynamo.reset()
    AcceleratorState._reset_state(reset_partial_state=True)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    print(f"--- {name}", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    try:
        with contextlib.redirect_stdout(sys.stderr):  # bench.py's lines are the log; stdout has the table alone
            status, result = check(plan)
    except Exception as exc:  # the table is the report: the traceback would hide the other rows
        status, result = "FAIL", f"{type(exc).__name__}: {first_line(exc)}"
    return Row(name, status, result, time.perf_counter() - t0)


def escape(text: str) -> str:  # a '|' inside a Markdown table's cell
    return text.replace("|", "\\|")


def format_table(rows: list[Row], title: str) -> str:
    """A Markdown table (for benchmarks/RESULTS.md as it is), one row a check."""
    lines = [title, "", "| check | status | result | s |", "| --- | --- | --- | ---: |"]
    lines += [f"| {r.check} | {r.status} | {escape(r.result)} | {r.seconds:.0f} |" for r in rows]
    return "\n".join(lines)


def machine(plan: Plan) -> str:
    name = torch.cuda.get_device_name() if plan.device == "cuda" else "CPU (tiny shapes: the tests' run)"
    return f"{name}, torch {torch.__version__}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)  # every path on a CPU, for the tests
    args = parser.parse_args(argv)
    plan = TINY if args.tiny else Plan()
    if plan.device == "cuda" and not torch.cuda.is_available():
        raise UserError("no CUDA GPU is visible: benchmarks/gpu_check.py measures a GPU; on a CPU, python bench.py")
    t0 = time.perf_counter()
    rows = [run_check(name, check, plan) for name, check in CHECKS.items()]
    print(format_table(rows, f"gpu_check on {machine(plan)}: {time.perf_counter() - t0:.0f} s in all"))
    return 1 if any(r.status == "FAIL" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(run(main))
