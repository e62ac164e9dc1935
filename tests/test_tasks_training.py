"""lm-evaluation-harness tasks in train.py: at every evaluation (metrics.jsonl, console, loss.png, model card), the
final evaluation's own limit, eval_only's lines, the core score's definition, one-line errors."""

import re

import pytest
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from harness_tasks import ARC, write_tasks
from PIL import Image
from transformers import AutoTokenizer

from nanogpt_hf import NanoGPTForCausalLM
from nanogpt_hf.cli import train_main
from nanogpt_hf.evaluation import Tasks, load_tasks, score_tasks
from test_training import metrics, tiny
from nanogpt_hf.training import train

NAMES = ["hellaswag", "arc_easy", "winogrande", "lambada_openai"]


def chance(name: str, docs: int) -> float:
    """1 / the choices, averaged over the documents: 4 endings; ARC's 4, 3, 5, 4...; 2 options; lambada: none."""
    arc = sum(1 / len(d["choices"]["text"]) for d in ARC[:docs]) / docs
    return {"hellaswag": 0.25, "arc_easy": arc, "winogrande": 0.5, "lambada_openai": 0.0}[name]


pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


@pytest.fixture
def task_files(tmp_path):
    return ",".join(write_tasks(tmp_path))


def test_tasks_at_every_evaluation(char_data, tmp_path, task_files):
    out = tmp_path / "run"
    s = tiny(char_data, out, max_iters=4, eval_interval=2, eval_tasks=task_files, eval_tasks_limit=2,
             eval_tasks_final_limit=3, keep_states=0, dropout=0.5)
    assert train(s) == 0
    evals = metrics(out, "eval")
    assert [e["iter"] for e in evals] == [0, 2, 4]
    # eval_tasks_limit documents of each task, eval_tasks_final_limit after the last step (lambada has 3 in all)
    assert [[e[f"{name}_examples"] for name in NAMES] for e in evals] == [[2, 2, 2, 2], [2, 2, 2, 2], [3, 3, 3, 3]]
    for e in evals:  # core is its definition: the mean over tasks of (acc_norm or acc - chance) / (1 - chance)
        p = {n: chance(n, e[f"{n}_examples"]) for n in NAMES}
        centered = [(e.get(f"{n}_acc_norm", e[f"{n}_acc"]) - p[n]) / (1 - p[n]) for n in NAMES]
        assert e["core"] == pytest.approx(sum(centered) / 4) and e["tasks_seconds"] > 0
        assert [e[f"{n}_centered"] for n in NAMES] == pytest.approx(centered)
        assert e["lambada_openai_perplexity"] > 1
    # the last figures are the scorer's own on the saved model, in eval mode (dropout 0.5 would change them)
    AcceleratorState._reset_state(reset_partial_state=True)
    model, tokenizer = NanoGPTForCausalLM.from_pretrained(out), AutoTokenizer.from_pretrained(out)
    again = score_tasks(model, tokenizer, Tasks(load_tasks(task_files)), Accelerator(cpu=True), limit=3)
    assert {k: v for k, v in evals[-1].items() if k.startswith(tuple(NAMES)) or k == "core"} == pytest.approx(
        {**{f"{n}_{k}": v for n, r in again["results"].items() for k, v in r.items()},
         **{f"{n}_centered": v for n, v in again["centered"].items()}, "core": again["core"]})
    assert Image.open(out / "loss.png").size[0] > Image.open(out / "loss.png").size[1] * 2  # a second panel
    card = (out / "README.md").read_text()
    assert "model-index:" in card and "name: hellaswag" in card and "type: core" in card and "acc_norm" in card


def test_eval_only_prints_a_line_per_task(char_data, tmp_path, task_files, capsys):
    assert train(tiny(char_data, tmp_path / "run", max_iters=2, eval_interval=2)) == 0
    AcceleratorState._reset_state(reset_partial_state=True)
    capsys.readouterr()
    assert train_main([f"--dataset={char_data}", f"--init_from={tmp_path / 'run'}", "--eval_only=true",
                       f"--eval_tasks={task_files}", "--eval_tasks_limit=2", "--eval_iters=2", "--block_size=32",
                       "--device=cpu", "--dtype=float32", f"--out_dir={tmp_path / 'eval'}"]) == 0
    out = capsys.readouterr().out
    for line in [r"hellaswag: acc=\d\.\d{4} acc_norm=\d\.\d{4}", r"arc_easy: acc=\d\.\d{4} acc_norm=\d\.\d{4}",
                 r"winogrande: acc=\d\.\d{4}", r"lambada_openai: perplexity=\d+\.\d{4} acc=\d\.\d{4}"]:
        assert re.search(f"^{line} examples=2$", out, re.M), out
    assert re.search(r"^core: -?\d\.\d{4} \(4 tasks, \d+\.\d s\)$", out, re.M), out
    assert not (tmp_path / "eval").exists()


@pytest.mark.parametrize("flag, word", [("--hellaswag=Rowan/hellaswag", "use --eval_tasks=hellaswag"),
                                        ("--hellaswag_limit=5", "use --eval_tasks_limit")])
def test_the_hellaswag_settings_name_their_new_form(char_data, tmp_path, capsys, flag, word):
    assert train_main([f"--dataset={char_data}", f"--out_dir={tmp_path / 'run'}", flag, "--device=cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: setting ") and err.count("\n") == 1 and word in err, err


def test_a_missing_task_file_is_one_line(char_data, tmp_path, capsys):
    assert train_main([f"--dataset={char_data}", f"--out_dir={tmp_path / 'run'}", "--max_iters=2",
                       f"--eval_tasks={tmp_path / 'nope.yaml'}", "--device=cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "nope.yaml" in err, err
