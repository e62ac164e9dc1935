"""What a careful user still hit (issue 24): settings checked before the disk, tracebacks kept for our own bugs, a
second signal that stops at once, a checkpoint evaluated at its own block size, a model card without local paths,
generate refused before it outgrows block_size."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from test_training import tiny

from warm import warm_popen
from nanogpt_hf.cli import train_main
from nanogpt_hf.training import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=32", "--batch_size=4", "--eval_iters=2",
        "--gradient_accumulation_steps=1", "--dtype=float32", "--device=cpu", "--sample_at_end=false"]


def error_lines(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.strip()]


def test_a_settings_mistake_is_named_before_the_out_dir_rule(char_data, tmp_path, capsys):
    assert train(tiny(char_data, tmp_path, max_iters=2, eval_interval=2)) == 0  # out_dir now holds states
    capsys.readouterr()
    for bad, named in ((["--n_embd=100", "--n_head=3"], "n_embd (100) must be divisible by n_head (3)"),
                       (["--dtype=float16"], "float16 is not supported on CPU"),
                       (["--norm=rms"], "norm")):
        rc = train_main([f"--dataset={char_data}", f"--out_dir={tmp_path}", *TINY, *bad])
        lines = error_lines(capsys)
        assert rc == 2 and len(lines) == 1 and named in lines[0] and "resumable states" not in lines[0], lines


def test_a_library_error_raised_by_our_own_code_keeps_its_traceback(char_data, tmp_path, monkeypatch, capsys):
    """A ValueError from a researcher's edit of the loop is a bug: its traceback, not one line."""
    from nanogpt_hf import training

    def broken_step(*args, **kwargs):
        raise ValueError("shapes do not match (a researcher's edit)")

    monkeypatch.setattr(training, "train_step", broken_step)
    with pytest.raises(ValueError, match="researcher"):
        train_main([f"--dataset={char_data}", f"--out_dir={tmp_path}", *TINY, "--max_iters=2"])
    # an input mistake found by a library is still one line, which says how to see its traceback
    (tmp_path / "broken.yaml").write_text("n_layer: [1,\n")
    assert train_main([str(tmp_path / "broken.yaml")]) == 2
    lines = error_lines(capsys)
    assert len(lines) == 1 and lines[0].startswith("error:") and "NANOGPT_DEBUG=1" in lines[0]


SLOW_STEP = """
import sys, torch
from nanogpt_hf import training
step = training.train_step

def slow_step(accelerator, model, *args, **kwargs):
    if training_step[0] == 2:  # step 3: one long torch call, in which Python's signal handlers cannot run
        print("slow step", flush=True)
        a = torch.ones(8192, 8192)
        for _ in range(50):
            a = a @ a / 8192
    training_step[0] += 1
    return step(accelerator, model, *args, **kwargs)

training_step = [0]
training.train_step = slow_step
from nanogpt_hf.cli import train_main
sys.exit(train_main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_a_second_signal_stops_inside_a_long_torch_call(char_data, tmp_path):
    out = tmp_path / "run"
    args = [f"--dataset={char_data}", f"--out_dir={out}", *TINY, "--max_iters=6", "--eval_interval=2"]
    proc = warm_popen([sys.executable, "-c", SLOW_STEP, *args], stdout=subprocess.PIPE,
                      stderr=subprocess.STDOUT, text=True, cwd=tmp_path)
    try:
        for line in proc.stdout:  # the step-2 state is saved before step 3 begins
            if line.startswith("slow step"):
                break
        time.sleep(1.0)
        proc.send_signal(signal.SIGINT)
        time.sleep(1.0)
        t0 = time.time()
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=10)  # the matmuls alone take minutes
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGINT and time.time() - t0 < 10
    # the newest state is intact: the run resumes from it and finishes
    assert train_main([f"--out_dir={out}", "--init_from=resume", "--max_iters=4"]) == 0


def test_eval_only_evaluates_a_checkpoint_at_its_own_block_size(char_data, tmp_path, capsys):
    assert train(tiny(char_data, tmp_path / "base", block_size=48, max_iters=2, eval_interval=2)) == 0
    capsys.readouterr()
    assert train_main([f"--dataset={char_data}", f"--init_from={tmp_path / 'base'}", "--eval_only",
                       "--eval_iters=2", "--dtype=float32", "--device=cpu"]) == 0
    out = capsys.readouterr().out
    assert "x 48 block" in out and "cropping" not in out
    assert train_main([f"--dataset={char_data}", f"--init_from={tmp_path / 'base'}", "--eval_only",
                       "--eval_iters=2", "--dtype=float32", "--device=cpu", "--block_size=16"]) == 0
    out = capsys.readouterr().out
    assert "x 16 block" in out and "from block_size 48 to 16" in out


def test_the_model_card_publishes_no_local_path_and_no_recipe_that_was_not_run(char_data, tmp_path):
    out = tmp_path / "runs" / "mine"
    assert train_main([f"--dataset={char_data}", f"--out_dir={out}", *TINY, "--max_iters=2",
                       "--eval_interval=2"]) == 0
    card = (out / "README.md").read_text()
    assert str(tmp_path) not in card and "default.yaml" not in card
    assert f"dataset: {os.path.basename(char_data)}" in card and "out_dir: mine" in card and "| dataset | play.txt |" in card
    # the parameter count says what it counts: the tied token embedding is in it
    from nanogpt_hf import NanoGPTForCausalLM

    model = NanoGPTForCausalLM.from_pretrained(out)
    assert f"{model.get_num_params():,} (" in card and "token embedding counted once" in card


def test_generate_is_refused_before_it_outgrows_block_size(tmp_path):
    from transformers import pipeline

    from nanogpt_hf import NanoGPTConfig, NanoGPTForCausalLM
    from nanogpt_hf.tokenization import char_tokenizer

    text = "To be, or not to be, that is the question."
    model = NanoGPTForCausalLM(NanoGPTConfig(vocab_size=64, block_size=16, n_layer=1, n_head=2, n_embd=16))
    model.save_pretrained(tmp_path)
    char_tokenizer(text).save_pretrained(tmp_path)
    generator = pipeline("text-generation", model=str(tmp_path))
    calls = []
    model_forward = generator.model.forward
    generator.model.forward = lambda *a, **k: calls.append(1) or model_forward(*a, **k)
    with pytest.raises(ValueError, match="outgrow the model's block_size 16: ask for at most 12 new tokens"):
        generator("To be", max_new_tokens=13, do_sample=False)
    assert calls == []  # refused before the first token
    assert len(generator("To be", max_new_tokens=12, do_sample=False)[0]["generated_text"]) == 5 + 12
    ids = torch.tensor([[1, 2, 3]])
    assert model.generate(ids, max_new_tokens=14, do_sample=False).shape == (1, 17)
