"""What a new user meets in the first hour of train.py: tokenizer length, memory, the schedule, saving and finishing
lines, an earlier run in the same out_dir, logs that are not a terminal, threads."""

import os
import subprocess
import sys

import pytest
import torch
from accelerate.state import AcceleratorState
from transformers import AutoTokenizer

from warm import warm_popen, warm_run
from nanogpt_hf.cli import train_main
from nanogpt_hf.common import UserError
from nanogpt_hf.training import get_lr, train
from test_training import ROOT, metrics, tiny


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def test_the_saved_tokenizer_takes_the_models_block_size(char_data, tmp_path):
    # it kept 1e30 (characters) or 1024 (BPE): tok(text, truncation=True) gave sequences the model refuses
    assert train(tiny(char_data, tmp_path, max_iters=2, eval_interval=2)) == 0
    for folder in (tmp_path, tmp_path / "state" / "step-2"):
        tok = AutoTokenizer.from_pretrained(folder)
        assert tok.model_max_length == 32 and len(tok("to be " * 50, truncation=True)["input_ids"]) == 32


def test_settings_whose_memory_cannot_fit_are_one_line(char_data, tmp_path, capsys):
    # a raw "RuntimeError: can't allocate ... bytes" traceback before
    args = [f"--dataset={char_data}", f"--out_dir={tmp_path / 'out'}", "--block_size=100000000000", "--max_iters=1",
            "--device=cpu", "--compile=false"]
    assert train_main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "block_size" in err, err
    assert not (tmp_path / "out").exists()


def test_lr_decay_follows_max_iters_unless_given(char_data, tmp_path):
    from nanogpt_hf.settings import TrainSettings, parse_command
    from nanogpt_hf.training import DEFAULT_RECIPE

    s, _ = parse_command(TrainSettings, ["--max_iters=500"], "t", "", recipes=True, default_recipe=DEFAULT_RECIPE)
    assert s.max_iters == 500 and s.lr_decay_iters is None  # the demo's 2000 no longer holds a shortened run
    s = tiny(char_data, tmp_path, max_iters=8, eval_interval=8, lr_decay_iters=None)
    assert train(s) == 0
    lrs = [e["lr"] for e in metrics(tmp_path, "train")]
    assert lrs == [get_lr(it, s.learning_rate, s.min_lr, s.warmup_iters, 8) for it in range(8)]


def test_saving_says_so_and_a_run_ends_with_a_one_line_summary(char_data, tmp_path, capsys):
    assert train(tiny(char_data, tmp_path, max_iters=4, eval_interval=2, always_save_checkpoint=False)) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert f"saved the model to {tmp_path}" in lines
    best = min((e for e in metrics(tmp_path, "eval") if e["iter"] > 0), key=lambda e: e["val_loss"])
    assert lines[-1].startswith(f"done: best val loss {best['val_loss']:.4f} at step {best['iter']}; 4 steps in ")
    assert lines[-1].endswith(f"the model is in {tmp_path}, its loss curve in {tmp_path / 'loss.png'}")


def test_a_new_run_over_a_finished_run_is_refused_and_keeps_its_model(char_data, tmp_path):
    # it replaced the finished run's model while saying only that its states were removed
    assert train(tiny(char_data, tmp_path, max_iters=2, eval_interval=2)) == 0
    AcceleratorState._reset_state(reset_partial_state=True)
    before = (tmp_path / "model.safetensors").read_bytes()
    with pytest.raises(UserError, match="holds the resumable states of an earlier run: continue it with "
                                        "--init_from=resume, or start the new run in another --out_dir"):
        train(tiny(char_data, tmp_path, max_iters=2, eval_interval=2, learning_rate=0.1))
    assert (tmp_path / "model.safetensors").read_bytes() == before


@pytest.mark.slow
def test_a_log_file_gets_log_lines_not_progress_bar_redraws(char_data, tmp_path):
    env, run = dict(os.environ, HF_HUB_OFFLINE="1"), tmp_path / "run"
    (tmp_path / "corpus.jsonl").write_text('{"text": "To be, or not to be: that is the question."}\n' * 200)
    prepare = [os.path.join(ROOT, "prepare.py"), str(tmp_path / "corpus.jsonl")]
    commands = [[*prepare, f"--out={tmp_path / 'data'}"], [  # datasets', ours (char: 2 passes), transformers'
        *prepare, f"--out={tmp_path / 'data_char'}", "--tokenizer=char", "--streaming"], [
        "-m", "nanogpt_hf.cli", "export-gpt2", str(run), str(tmp_path / "gpt2")]]
    preparing = [warm_popen([sys.executable, *command], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
                 for command in commands[:2]]  # beside the training run: independent of it
    res = warm_run([sys.executable, os.path.join(ROOT, "train.py"), f"--dataset={char_data}",
                    f"--out_dir={run}", "--max_iters=40", "--eval_interval=40", "--log_interval=10",
                    "--eval_iters=2", "--n_layer=1", "--n_embd=32", "--n_head=2", "--block_size=32",
                    "--device=cpu", "--sample_at_end=false"],
                   capture_output=True, text=True, env=env)
    outputs = [p.communicate(timeout=300) for p in preparing]
    assert res.returncode == 0, res.stderr[-2000:]
    assert "it/s" not in res.stderr and "training:" not in res.stderr, res.stderr[-2000:]  # text=True: no \r left
    assert [line.split(":")[0] for line in res.stdout.splitlines() if line.startswith("iter")] == [
        "iter 10", "iter 20", "iter 30", "iter 40"]
    results = [subprocess.CompletedProcess(p.args, p.returncode, *out) for p, out in zip(preparing, outputs)]
    results.append(warm_run([sys.executable, *commands[2]], capture_output=True, env=env))  # the run's model
    for res in results:
        assert res.returncode == 0 and b"\r" not in res.stderr and b"/s]" not in res.stderr, res.stderr[-2000:]


def test_threads_setting(char_data, tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # the suite runs on one thread (conftest): from two, the setting has to change it
    try:
        assert train(tiny(char_data, tmp_path, max_iters=1, eval_interval=1, threads=1)) == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
