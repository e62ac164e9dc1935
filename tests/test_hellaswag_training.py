"""HellaSwag in train.py: at every evaluation (metrics.jsonl, console, loss.png, model card) and with eval_only."""

import json
import re

import pytest
from accelerate.state import AcceleratorState
from PIL import Image

from nanogpt_hf.cli import train_main
from test_training import metrics, tiny
from nanogpt_hf.training import train


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture
def hellaswag_file(tmp_path):
    """Six examples in the rowanz hellaswag_val.jsonl format (label an int)."""
    path = tmp_path / "hellaswag_val.jsonl"
    rows = [{"ind": i, "activity_label": "Speaking", "ctx_a": "The king stands in the hall.",
             "ctx_b": "he turns to the lords and", "ctx": "", "split": "val", "split_type": "indomain",
             "endings": ["speaks of war.", "eats the crown.", "sings a song to them.", "leaves the hall."],
             "label": i % 4, "source_id": f"x~{i}"} for i in range(6)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_hellaswag_at_every_evaluation(char_data, tmp_path, hellaswag_file):
    out = tmp_path / "run"
    assert train(tiny(char_data, out, max_iters=4, eval_interval=2, hellaswag=hellaswag_file)) == 0
    evals = metrics(out, "eval")
    assert [e["iter"] for e in evals] == [0, 2, 4]
    for e in evals:
        assert 0 <= e["hellaswag_acc"] <= 1 and 0 <= e["hellaswag_acc_norm"] <= 1 and e["hellaswag_examples"] == 6
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
