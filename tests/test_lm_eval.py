"""lm-evaluation-harness on our checkpoints (in the test extra; the `eval` extra for users): the README's `lm_eval`
command on a GPT-2 BPE checkpoint and the Python API on a character-level one, with tasks on local files (no Hub).
The harness's figures must equal a direct computation of the same log-likelihoods with the model, and our own
scorer's (nanogpt_hf.evaluation, what train.py's eval_tasks run) must equal the harness's, on its own task configs."""

import glob
import json
import math
import os
import sys

import pytest
import torch

import lm_eval
from accelerate import Accelerator
from conftest import InBackground
from harness_tasks import CONFIGS, write_tasks

from nanogpt_hf import NanoGPTConfig, NanoGPTForCausalLM
from nanogpt_hf.evaluation import Tasks, load_tasks, score_tasks
from nanogpt_hf.tokenization import GPT2_EOT, char_tokenizer, gpt2_tokenizer

TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\n"  # one window: shorter than block_size
CHOICES = [{"query": "All:", "choices": ["Speak, speak.", "Nay, we are resolved."], "label": 0},
           {"query": "First Citizen:", "choices": ["You are all resolved.", "Speak."], "label": 1}]
TASKS = {  # a multiple-choice task (loglikelihood requests) and a perplexity task (loglikelihood_rolling requests)
    "tiny_choice": {"output_type": "multiple_choice", "doc_to_text": "{{query}}", "doc_to_choice": "{{choices}}",
                    "doc_to_target": "{{label}}", "metric_list": [{"metric": "acc"}]},
    "tiny_text": {"output_type": "loglikelihood_rolling", "doc_to_text": "", "doc_to_target": "{{text}}",
                  "metric_list": [{"metric": "bits_per_byte"}]},
}
BLOCK = 64


def save_tiny(folder: str, tokenizer, **config) -> NanoGPTForCausalLM:
    torch.manual_seed(0)
    model = NanoGPTForCausalLM(NanoGPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=BLOCK, **config)).eval()
    model.save_pretrained(folder)  # with the model code: loads with trust_remote_code and without this package
    tokenizer.save_pretrained(folder)
    return model


def write_tiny_tasks(folder) -> str:
    """The two tasks' data (.jsonl) and YAML configs in `folder`, read by datasets' json builder: no download."""
    rows = {"tiny_choice": CHOICES, "tiny_text": [{"text": TEXT}]}
    for name, config in TASKS.items():
        data = os.path.join(folder, f"{name}.jsonl")
        with open(data, "w") as fh:
            fh.writelines(json.dumps(row) + "\n" for row in rows[name])
        config = {"task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": data}},
                  "test_split": "test", **config}
        with open(os.path.join(folder, f"{name}.yaml"), "w") as fh:
            json.dump(config, fh)  # JSON is YAML
    return str(folder)


@torch.no_grad()
def loglikelihood(model, context: list[int], continuation: list[int]) -> float:
    """Summed log-probability of `continuation` after `context`, in one forward."""
    logp = model(torch.tensor([context + continuation[:-1]])).logits[0].log_softmax(-1)  # (T, vocab)
    rows = torch.arange(len(context) - 1, len(context) - 1 + len(continuation))
    return logp[rows, torch.tensor(continuation)].sum().item()


def expected(model, tokenizer, prefix: int) -> dict:
    """The harness's definitions computed directly: each choice scored as " " + choice, its tokens those past the
    encoded context; the text's tokens scored after the one prefix token."""
    scores = []  # (examples, choices)
    for row in CHOICES:
        context = tokenizer.encode(row["query"])
        scores.append([loglikelihood(model, context, tokenizer.encode(row["query"] + " " + c)[len(context):])
                       for c in row["choices"]])
    return {"choices": scores, "text": loglikelihood(model, [prefix], tokenizer.encode(TEXT))}


def check(results: dict, want: dict) -> None:
    """acc: the best-scoring choice is the label; bits_per_byte: -log-likelihood / UTF-8 bytes / ln 2."""
    best = [max(range(len(scores)), key=scores.__getitem__) for scores in want["choices"]]
    acc = sum(b == row["label"] for b, row in zip(best, CHOICES)) / len(CHOICES)
    assert results["tiny_choice"]["acc,none"] == pytest.approx(acc)
    assert results["tiny_text"]["bits_per_byte,none"] == pytest.approx(
        -want["text"] / len(TEXT.encode()) / math.log(2), rel=1e-4)


@pytest.mark.slow
def test_lm_eval_command_on_a_gpt2_bpe_checkpoint(tmp_path):
    """One `lm_eval` run over the two tiny tasks and the harness's hellaswag, arc_easy, winogrande (partial scoring)
    and lambada_openai (greedy acc, perplexity) on local documents; our scorer on the same tasks gives its figures."""
    tokenizer = gpt2_tokenizer(model_max_length=BLOCK)
    model = save_tiny(str(tmp_path / "ckpt"), tokenizer, vocab_size=50304)
    with torch.no_grad():  # " king" the model's favourite: the first lambada document is predicted greedily
        model.transformer.ln_f.bias += 300 * model.transformer.wte.weight[tokenizer.encode(" king")[0]]
    model.save_pretrained(tmp_path / "ckpt")
    os.makedirs(tmp_path / "harness")
    tasks = Tasks(load_tasks(",".join(write_tasks(tmp_path / "harness"))))
    cmd = [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args",
           f"pretrained={tmp_path / 'ckpt'},trust_remote_code=True", "--tasks", ",".join([*TASKS, *CONFIGS]),
           "--include_path", write_tiny_tasks(tmp_path), "--device", "cpu", "--batch_size", "4",
           "--output_path", str(tmp_path / "results"), "--log_samples"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    with InBackground(cmd, timeout=600, cwd=tmp_path, env=env) as lm_eval_run:  # meanwhile, our figures here
        ours = score_tasks(model, tokenizer, tasks, Accelerator(cpu=True))
        want = expected(model, tokenizer, prefix=GPT2_EOT)  # bos = eos = <|endoftext|>
    run = lm_eval_run.result
    assert run.returncode == 0, run.stderr[-3000:]
    (path,) = glob.glob(str(tmp_path / "results" / "**" / "results_*.json"), recursive=True)
    with open(path) as fh:
        theirs = json.load(fh)["results"]
    check(theirs, want)
    for name in CONFIGS:  # every figure, and every request's log-likelihood and is_greedy
        assert {f"{k},none": v for k, v in ours["results"][name].items() if k != "examples"} == pytest.approx(
            {k: v for k, v in theirs[name].items() if k.endswith(",none") and "stderr" not in k}, rel=1e-6), name
        assert ours["results"][name]["examples"] == theirs[name]["sample_len"] == len(CONFIGS[name][2])
        (samples,) = glob.glob(str(tmp_path / "results" / "**" / f"samples_{name}_*.jsonl"), recursive=True)
        with open(samples) as fh:
            logged = sorted(map(json.loads, fh), key=lambda sample: sample["doc_id"])
        flat = [x for inst in tasks.tasks[name].instances for x in (inst.resps[0][0], float(inst.resps[0][1]))]
        assert [x for sample in logged for ll, greedy in sample["filtered_resps"]  # logged as text
                for x in (float(ll), float(greedy == "True"))] \
            == pytest.approx(flat, rel=1e-6), name
    assert ours["results"]["lambada_openai"]["acc"] == pytest.approx(1 / 3)  # is_greedy, true once


def test_lm_eval_on_a_char_checkpoint_with_a_prefix_token(tmp_path):
    """A char vocabulary has no end-of-text token: prefix_token_id=0 (the id of "\\n", the first of the sorted
    characters) gives the harness its prefix without changing any id; loglikelihood tasks then work."""
    tokenizer = char_tokenizer(TEXT + "".join(c for row in CHOICES for c in [row["query"], *row["choices"]]))
    assert tokenizer.convert_ids_to_tokens(0) == "\n"
    model = save_tiny(str(tmp_path / "ckpt"), tokenizer, vocab_size=len(tokenizer), bos_token_id=None,
                      eos_token_id=None)
    out = lm_eval.simple_evaluate(
        model="hf", model_args=f"pretrained={tmp_path / 'ckpt'},trust_remote_code=True,prefix_token_id=0",
        tasks=list(TASKS), device="cpu", batch_size=4,
        task_manager=lm_eval.tasks.TaskManager(include_path=write_tiny_tasks(tmp_path), include_defaults=False))
    want = expected(model, tokenizer, prefix=0)
    check(out["results"], want)
    samples = sorted(out["samples"]["tiny_choice"], key=lambda sample: sample["doc_id"])
    assert [ll for sample in samples for ll, _ in sample["filtered_resps"]] == pytest.approx(
        [ll for scores in want["choices"] for ll in scores], rel=1e-4)
