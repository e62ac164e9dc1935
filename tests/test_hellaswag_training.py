"""HellaSwag in train.py: at every evaluation (metrics.jsonl, console, loss.png, model card) and with eval_only."""

import json
import random
import re

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from PIL import Image
from transformers import AutoTokenizer

from nanogpt_hf import NanoGPTForCausalLM
from nanogpt_hf.cli import train_main
from nanogpt_hf.evaluation import load_hellaswag, score_hellaswag
from test_training import metrics, scratch_model, tiny
from nanogpt_hf.training import train


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture
def hellaswag_file(tmp_path):
    """Twelve examples in the rowanz hellaswag_val.jsonl format (label an int), each with its own context and
    endings: a model's choices differ between examples."""
    words = ("the king stands in hall and speaks of war to his lords who sing a song then leave crown on table while "
             "queen eats bread with her sword").split()
    rng = random.Random(0)
    phrase = lambda n: " ".join(rng.choice(words) for _ in range(n))  # noqa: E731
    path = tmp_path / "hellaswag_val.jsonl"
    rows = [{"ind": i, "activity_label": "Speaking", "ctx_a": phrase(6).capitalize() + ".", "ctx_b": phrase(4),
             "ctx": "", "split": "val", "split_type": "indomain",
             "endings": [phrase(rng.randint(2, 6)) + "." for _ in range(4)], "label": i % 4, "source_id": f"x~{i}"}
            for i in range(12)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_hellaswag_at_every_evaluation(char_data, tmp_path, hellaswag_file):
    out = tmp_path / "run"
    s = tiny(char_data, out, max_iters=4, eval_interval=2, hellaswag=hellaswag_file, keep_states=0, dropout=0.5)
    assert train(s) == 0
    evals = metrics(out, "eval")
    assert [e["iter"] for e in evals] == [0, 2, 4]
    # each logged figure is the scorer's own on that step's model (the states hold them), in eval mode (dropout 0.5
    # in training mode would change them)
    AcceleratorState._reset_state(reset_partial_state=True)
    accelerator, tokenizer, examples = Accelerator(cpu=True), AutoTokenizer.from_pretrained(out), load_hellaswag(
        hellaswag_file)
    torch.manual_seed(s.seed)
    models = [scratch_model(s, len(tokenizer))] + [NanoGPTForCausalLM.from_pretrained(out / "state" / f"step-{i}")
                                                   for i in (2, 4)]
    for e, model in zip(evals, models, strict=True):
        assert {k: e[f"hellaswag_{k}"] for k in ("acc", "acc_norm", "examples")} == score_hellaswag(
            model, tokenizer, examples, accelerator), e["iter"]
    assert Image.open(out / "loss.png").size[0] > Image.open(out / "loss.png").size[1] * 2  # a second panel
    card = (out / "README.md").read_text()
    assert "model-index:" in card and "Rowan/hellaswag" in card and "acc_norm" in card


def test_eval_only_prints_the_hellaswag_line(char_data, tmp_path, hellaswag_file, capsys):
    assert train(tiny(char_data, tmp_path / "run", max_iters=2, eval_interval=2)) == 0
    AcceleratorState._reset_state(reset_partial_state=True)
    capsys.readouterr()
    assert train_main([f"--dataset={char_data}", f"--init_from={tmp_path / 'run'}", "--eval_only=true",
                       f"--hellaswag={hellaswag_file}", "--hellaswag_limit=5", "--eval_iters=2", "--block_size=32",
                       "--device=cpu", "--dtype=float32", f"--out_dir={tmp_path / 'eval'}"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^hellaswag: acc=\d\.\d{4} acc_norm=\d\.\d{4} examples=5$", out, re.M), out
    assert not (tmp_path / "eval").exists()


def test_a_missing_hellaswag_file_is_one_line(char_data, tmp_path, capsys):
    assert train_main([f"--dataset={char_data}", f"--out_dir={tmp_path / 'run'}", "--max_iters=2",
                       f"--hellaswag={tmp_path / 'nope.jsonl'}", "--device=cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "nope.jsonl" in err, err
