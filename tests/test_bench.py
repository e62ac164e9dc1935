"""bench.py: each mode runs in seconds on a tiny model and prints its figures."""

import glob
import os
import re
import sys

import pytest
import torch

from nanogpt_hf import NanoGPTConfig, NanoGPTForCausalLM
from nanogpt_hf.cli import bench_main
from nanogpt_hf.tokenization import char_tokenizer
from conftest import cpu_processes_env, free_port
from warm import warm_run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--n_layer=1", "--n_head=2", "--n_embd=32", "--block_size=32", "--vocab_size=65", "--batch_size=2",
        "--device=cpu"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """See test_sampling.one_thread: tiny models on a busy 2-core machine run far steadier on one thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """accelerate keeps one AcceleratorState per process; each bench run here is a new 'process'."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def bench(capsys, *argv):
    rc = bench_main(list(argv))
    out, err = capsys.readouterr()
    assert rc == 0, err
    return out


def number(pattern: str, text: str) -> float:
    m = re.search(pattern, text)
    assert m, f"{pattern!r} not in:\n{text}"
    return float(m.group(1).replace(",", ""))


def test_train_mode_prints_its_figures(capsys, tmp_path):
    out = bench(capsys, "--mode=train", *TINY, "--warmup=1", "--iters=3", "--dtype=float32",
                f"--profile={tmp_path / 'trace'}")
    assert number(r"([\d.]+) ms/iter", out) > 0
    per_process = number(r"([\d,]+) tokens/s per process", out)
    assert number(r"([\d,]+) in total", out) == per_process  # one process
    assert 0 < number(r"MFU ([\d.]+)%", out) < 100
    assert number(r"peak memory ([\d.]+) GiB", out) > 0
    assert glob.glob(str(tmp_path / "trace" / "*.json")), "no profiler trace written"


def test_profile_into_a_file_is_a_clear_error(capsys, tmp_path):
    (tmp_path / "afile").write_text("x")  # torch's trace writer would crash the process after the benchmark
    assert bench_main(["--mode=train", *TINY, f"--profile={tmp_path / 'afile'}"]) == 2
    assert "afile" in capsys.readouterr().err


@pytest.mark.parametrize("mode", ["train", "generate"])
def test_modern_architecture_counts_its_own_parameters_and_keeps_the_cache_exact(capsys, mode):
    out = bench(capsys, f"--mode={mode}", *TINY, "--modern", "--warmup=1", "--iters=2", "--max_new_tokens=40",
                "--dtype=float32")
    from nanogpt_hf.bench import BenchSettings, build_model, resolve
    from nanogpt_hf.settings import parse_command

    model = build_model(resolve(parse_command(BenchSettings, [f"--mode={mode}", *TINY, "--modern"], "", "")[0], "cpu"))
    assert model.config.position_embedding == "rotary" and not model.config.tie_word_embeddings
    assert f"{model.get_num_params() / 1e6:.2f}M parameters" in out  # the head counted, no position table
    assert (0 < number(r"MFU ([\d.]+)%", out) < 100) if mode == "train" else "same tokens: yes" in out


def test_train_mode_with_accumulation_and_bf16(capsys):
    out = bench(capsys, "--mode=train", *TINY, "--warmup=0", "--iters=2", "--gradient_accumulation_steps=2",
                "--dtype=bfloat16")
    assert "batch 2 x 2 micro-batches" in out and "mixed precision bf16" in out
    assert number(r"([\d,]+) tokens/s per process", out) > 0


def test_overhead_mode_same_start_and_a_ratio(capsys):
    out = bench(capsys, "--mode=overhead", *TINY, "--warmup=1", "--iters=2", "--repeats=2", "--dtype=float32")
    accel = number(r"first-step loss: accelerate ([\d.]+)", out)
    plain = number(r"plain ([\d.]+)\n", out)
    assert accel == pytest.approx(plain, abs=1e-5)  # same weights, same batch: the two steps agree
    assert number(r"ratio accelerate / plain: ([\d.]+)", out) > 0
    assert "median" in out


def test_generate_mode_same_tokens_past_the_window(capsys):
    out = bench(capsys, "--mode=generate", *TINY, "--max_new_tokens=80", "--dtype=float32")  # > block_size 32
    assert number(r"KV cache \(model.generate\): ([\d,.]+) tokens/s", out) > 0
    assert number(r"full recompute \(nanoGPT\): +([\d,.]+) tokens/s", out) > 0
    assert number(r"speed-up: ([\d.]+)x", out) > 0
    assert "same tokens: yes" in out


def test_generate_mode_from_a_checkpoint(capsys, tmp_path):
    tok = char_tokenizer("abc\n")
    torch.manual_seed(0)
    model = NanoGPTForCausalLM(NanoGPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=16, vocab_size=len(tok),
                                             bos_token_id=None, eos_token_id=None))
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    out = bench(capsys, "--mode=generate", f"--init_from={tmp_path}", "--max_new_tokens=20", "--dtype=float32",
                "--device=cpu")
    assert "block 16, vocab 4" in out and "same tokens: yes" in out


def test_train_mode_on_a_prepared_dataset(capsys, tmp_path):
    from nanogpt_hf.data import PrepareSettings, prepare

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("To be, or not to be, that is the question.\n" * 40, encoding="utf-8")
    out_dir = prepare(PrepareSettings(source=str(corpus), tokenizer="char", out=str(tmp_path / "data")))
    out = bench(capsys, "--mode=train", "--n_layer=1", "--n_head=2", "--n_embd=32", "--block_size=32",
                "--batch_size=2", "--device=cpu", "--warmup=0", "--iters=2", f"--data={out_dir}")
    assert f"data {out_dir}" in out
    assert number(r"([\d.]+) ms/iter", out) > 0


def test_bad_settings_are_one_line_errors(capsys):
    for argv, word in [(["--mode=fast"], "mode"), (["--n_layer=0"], "n_layer"), (["--device=tpu"], "device"),
                       (["--n_embd=33", "--n_head=2", "--mode=generate"], "n_embd"), (["--dtype=float16"], "float16")]:
        rc = bench_main([*argv, "--device=cpu"] if "--device=tpu" not in argv else argv)
        err = capsys.readouterr().err
        assert rc == 2 and err.startswith("error: ") and word in err and "Traceback" not in err, err


@pytest.mark.slow
def test_two_processes_under_accelerate_launch():
    """`accelerate launch` with two CPU processes (the recipe from REFERENCE.md): totals are twice per process."""
    env = cpu_processes_env(HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--main_process_port", str(free_port()),
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "bench.py", "--mode=train",
           *TINY, "--warmup=1", "--iters=2", "--dtype=float32"]
    res = warm_run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "2 process(es)" in res.stdout
    per_process = number(r"([\d,]+) tokens/s per process", res.stdout)
    assert number(r"([\d,]+) in total", res.stdout) == pytest.approx(2 * per_process, rel=1e-3)


def test_matmul_floor_times_exactly_the_products_of_a_real_step(capsys, monkeypatch):
    """benchmarks/bench_cpu_matmul.py's list of products has the FLOPs torch counts in a real forward + backward
    (eager attention: every product is an mm or bmm), so its "matmul floor" is that of the real step."""
    from torch.utils.flop_counter import FlopCounterMode

    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        import bench_cpu_matmul
    finally:
        sys.path.pop(0)
    shape = (2, 3, 48, 16, 5, 101)  # n_layer n_head n_embd block batch vocab
    n_layer, n_head, n_embd, block, batch, vocab = shape
    model = NanoGPTForCausalLM(NanoGPTConfig(n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=block,
                                             vocab_size=vocab, bos_token_id=None, eos_token_id=None))
    model.set_attn_implementation("eager")
    x = torch.randint(0, vocab, (batch, block))
    with FlopCounterMode(display=False) as counter:
        model(input_ids=x, shift_labels=x, use_cache=False).loss.backward()
    listed = sum(count * 2 * m * k * n * (lead[0] if lead else 1)
                 for count, lead, m, k, n in bench_cpu_matmul.step_products(*shape))
    assert listed == counter.get_total_flops()

    monkeypatch.setattr(sys, "argv", ["bench_cpu_matmul.py", *map(str, shape)])
    monkeypatch.setattr(bench_cpu_matmul, "median_seconds", lambda fn, repeats=50: (fn(), 1e-3)[1])
    bench_cpu_matmul.main()
    out = capsys.readouterr().out
    assert f"the step's products: {listed / 1e9:.2f} GFLOP" in out and "bfloat16" in out


def test_mfu_is_palm_flops_over_the_peak():
    from nanogpt_hf.hardware import estimate_mfu, flops_per_token

    model = NanoGPTForCausalLM(NanoGPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=64, vocab_size=65))
    n = model.get_num_params()  # nanoGPT's count: without the position embeddings
    assert n == sum(p.numel() for p in model.parameters()) - 64 * 32
    assert flops_per_token(model.config, n, 64) == 6 * n + 12 * 2 * 2 * 16 * 64
    flops = flops_per_token(model.config, n, 64) * 64 * 10  # 10 sequences of 64 tokens
    assert estimate_mfu(model, 10, 64, 2.0, peak_flops=flops) == pytest.approx(0.5)
