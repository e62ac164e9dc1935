"""Our scorer of lm-evaluation-harness requests: batched log-likelihoods and is_greedy against a direct computation,
the same figures over 1 and 2 processes, one-line errors. Tiny models, the harness's tasks over local files (no Hub);
tests/test_lm_eval.py checks the figures against the harness's own `hf` model."""

import json
import os
import sys

import pytest
import torch
from accelerate import Accelerator
from conftest import InBackground, cpu_processes_env, free_port
from harness_tasks import HELLASWAG, write_tasks

from nanogpt_hf import cli
from nanogpt_hf.configuration_nanogpt import NanoGPTConfig
from nanogpt_hf.evaluation import Tasks, encode_pairs, load_tasks, loglikelihoods, score_tasks
from nanogpt_hf.modeling_nanogpt import NanoGPTForCausalLM
from nanogpt_hf.tokenization import char_tokenizer, gpt2_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHARS = "\n !',.:;?abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"  # no digits, no brackets: dropped
MODERN = dict(position_embedding="rotary", norm="rmsnorm", norm_after_embedding=True, qk_norm=True, n_kv_head=1,
              activation_function="relu2", tie_word_embeddings=False, final_logit_softcapping=15.0)
# HellaSwag-shaped requests: contexts of several lengths (some past a 24-token block), endings as continuations
REQUESTS = [(doc["activity_label"] + ": " + doc["ctx_a"], " " + ending) for doc in HELLASWAG for ending in
            doc["endings"]] + [("Then ", "the man  stops."), ("", "An empty context.")]


def tiny_model(vocab_size, block_size, seed=0, **switches):
    torch.manual_seed(seed)
    config = NanoGPTConfig(vocab_size=vocab_size, block_size=block_size, n_layer=2, n_head=2, n_embd=32, **switches)
    return NanoGPTForCausalLM(config).eval()


def test_context_spaces_move_to_the_continuation():
    tok = gpt2_tokenizer()
    (ids, n), (empty, m) = encode_pairs(tok, [("Hello there  ", "world"), ("", "Hi")])  # the harness's "hf" model
    context = tok("Hello there")["input_ids"]
    assert ids == context + tok("Hello there  world")["input_ids"][len(context):] and n == len(ids) - len(context)
    assert empty == [tok.eos_token_id] + tok("Hi")["input_ids"] and m == len(empty) - 1  # the prefix token


@torch.no_grad()
def direct(model, ids, n, block_size):
    """The harness's definition, one request, no padding: keep the last block_size + 1 ids, read all but the last;
    sum the continuation's log-probabilities (of its last block_size ids, if longer: the harness refuses these);
    greedy if each continuation id is the argmax."""
    ids, n = ids[-(block_size + 1):], min(n, block_size)
    logp = model(torch.tensor([ids[:-1]])).logits[0, -n:].log_softmax(-1)  # (n, V)
    targets = torch.tensor(ids[-n:])
    return [logp[torch.arange(n), targets].sum().item(), float((logp.argmax(-1) == targets).all())]


@pytest.mark.parametrize("kind", ["gpt2", "char", "char-modern-eager"])
def test_batched_scores_equal_the_direct_computation(kind):
    """Requests sharing a context share a row (a tree mask: a boolean one for sdpa, an additive one for eager)."""
    tok, vocab, block = (gpt2_tokenizer(), 50304, 24) if kind == "gpt2" else (char_tokenizer(CHARS), len(CHARS), 64)
    model = tiny_model(vocab, block, **(MODERN if kind == "char-modern-eager" else {}))
    if kind == "char-modern-eager":  # train.py's attention for bf16 on a CPU
        model.set_attn_implementation("eager")
    requests = REQUESTS if kind == "gpt2" else REQUESTS[:-1]  # characters: no end-of-text token
    if kind == "char":  # a continuation the model predicts greedily: is_greedy 1.0
        ids = tok("The man")["input_ids"]
        for _ in range(3):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
        requests = requests + [("The man", tok.decode(ids[-3:]))]
    pairs = encode_pairs(tok, requests)
    want = torch.tensor([direct(model, ids, n, block) for ids, n in pairs], dtype=torch.float64)
    model.train()
    got = loglikelihoods(model, pairs, Accelerator(cpu=True), rows=3)  # several forwards, each padded
    assert model.training  # its mode restored
    assert torch.allclose(got, want, atol=1e-4) and torch.equal(got[:, 1], want[:, 1])
    assert kind != "char" or got[-1, 1] == 1.0


SCRIPT = """
import json, sys
from accelerate import Accelerator
from test_evaluation import tiny_model
from nanogpt_hf.evaluation import Tasks, load_tasks, score_tasks
from nanogpt_hf.tokenization import gpt2_tokenizer
accelerator = Accelerator(cpu=True)
model = accelerator.prepare(tiny_model(50304, 24))
scores = score_tasks(model, gpt2_tokenizer(), Tasks(load_tasks(sys.argv[1])), accelerator)
if accelerator.is_main_process:
    print(json.dumps(scores))
"""


def test_two_processes_give_the_figures_of_one(tmp_path):
    """The harness's four tasks (17 documents, 53 requests) over 2 ranks, 64 requests a forward: rank 1 has fewer."""
    tasks = ",".join(write_tasks(tmp_path))
    script = tmp_path / "score.py"
    script.write_text(SCRIPT)
    env = cpu_processes_env(PYTHONPATH=os.pathsep.join([os.path.join(ROOT, "tests"), ROOT]), HF_HUB_OFFLINE="1")
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--main_process_port", str(free_port()), "--num_machines", "1", "--mixed_precision", "no",
              "--dynamo_backend", "no"]
    with InBackground(launch + [str(script), tasks], timeout=300, env=env) as launched:  # meanwhile, one process here
        one = score_tasks(tiny_model(50304, 24), gpt2_tokenizer(), Tasks(load_tasks(tasks)), Accelerator(cpu=True))
    two = launched.result
    assert two.returncode == 0, two.stderr[-3000:]
    two = json.loads(two.stdout.strip().splitlines()[-1])
    assert two["results"].keys() == one["results"].keys() == {"hellaswag", "arc_easy", "winogrande", "lambada_openai"}
    for name, figures in one["results"].items():
        assert two["results"][name] == pytest.approx(figures, rel=1e-6), name
    assert two["core"] == pytest.approx(one["core"], rel=1e-6)
    assert [r["examples"] for r in one["results"].values()] == [5, 4, 3, 3]


def load_main(argv):
    load_tasks(argv[0])


@pytest.mark.parametrize("spec, word", [
    ("{tmp}/nope.yaml", "eval_tasks: no task file {tmp}/nope.yaml"),
    ("{tmp}/gen.yaml", "eval_tasks: gen is a generate_until task, not scored during training: run lm_eval on the "
                       "checkpoint (lm_eval --model hf")])
def test_bad_tasks_are_one_line_errors(tmp_path, capsys, spec, word):
    (tmp_path / "gen.yaml").write_text(json.dumps({
        "task": "gen", "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(tmp_path / "d.jsonl")}},
        "test_split": "test", "output_type": "generate_until", "doc_to_text": "{{q}}", "doc_to_target": "{{a}}"}))
    (tmp_path / "d.jsonl").write_text('{"q": "1+1=", "a": "2"}\n')
    assert cli.run(load_main, [spec.format(tmp=tmp_path)]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]  # progress bars aside
    assert len(errors) == 1 and word.format(tmp=tmp_path) in errors[0] and "Traceback" not in err, err


def test_without_lm_eval_the_error_names_the_install(monkeypatch, capsys):
    import importlib.util

    find_spec = importlib.util.find_spec
    missing = lambda name, *a: None if name == "lm_eval" else find_spec(name, *a)  # noqa: E731
    monkeypatch.setattr(importlib.util, "find_spec", missing)
    assert cli.run(load_main, ["hellaswag"]) == 2
    assert capsys.readouterr().err == 'error: eval_tasks needs lm-evaluation-harness: pip install -e ".[eval]"\n'
