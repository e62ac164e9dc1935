"""HellaSwag as lm-evaluation-harness computes it: preprocessing, batched scoring against a direct computation, the
same counts over 1 and 2 processes, one-line errors. Tiny models and files the tests write; no Hub."""

import json
import os
import subprocess
import sys

import pytest
import torch
from accelerate import Accelerator
from conftest import cpu_processes_env, free_port

from nanogpt_hf import cli
from nanogpt_hf.configuration_nanogpt import NanoGPTConfig
from nanogpt_hf.evaluation import choice_logprobs, encode_pairs, load_hellaswag, score_hellaswag
from nanogpt_hf.modeling_nanogpt import NanoGPTForCausalLM
from nanogpt_hf.tokenization import char_tokenizer, gpt2_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHARS = "\n !',.:;?abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"  # no digits, no brackets: dropped

DOCS = [  # rowanz/Hub rows exercising each preprocessing rule, and contexts longer than a 64-token block
    {"ind": 4, "activity_label": "Removing ice from car", "ctx_a": "Then, the man writes over the snow covering the "
     "window of a car, and a woman wearing winter clothes smiles.", "ctx_b": "then", "label": 3,
     "endings": [", the man adds wax to the windshield and cuts it.", ", a person board a ski lift, while two men "
                 "supporting the head of the person wearing winter clothes snow as the we girls sled.",
                 ", the man puts on a christmas coat, knitted with netting.", ", the man continues removing the snow "
                 "on his car."]},
    {"ind": 24, "activity_label": "Home and Garden", "ctx_a": "[header] How to grow tomatoes [title] Pick a sunny "
     "spot.  [step] Tomatoes need 8 hours of light.", "ctx_b": "", "label": "0",
     "endings": ["[substeps] Water them  daily.", "Plant them in a cave [title] forever.", " Buy a dog. ",
                 "Sing to them [step] loudly."]},
    {"ind": 7, "activity_label": "Baking cookies", "ctx_a": "A woman mixes flour.", "ctx_b": "SHE adds Eggs.",
     "label": "2", "endings": ["She bakes them.", "The oven explodes.", "They eat it all.", "Café time 42."]},
    {"ind": 9, "activity_label": "Running", "ctx_a": "A man runs.", "ctx_b": "he stops", "label": 1,
     "endings": ["now.", "and rests for a while.", "x", "because the road ends at a wide river."]},
    {"ind": 11, "activity_label": "Chess", "ctx_a": "Two people play chess.", "ctx_b": "one wins", "label": 0,
     "endings": ["quickly.", "slowly and carefully.", "the game.", "nothing."]},
]


def write_rows(path, docs=DOCS):
    if str(path).endswith(".parquet"):
        import datasets

        datasets.Dataset.from_list([dict(d, label=str(d["label"])) for d in docs]).to_parquet(str(path))
    else:
        path.write_text("".join(json.dumps(d) + "\n" for d in docs))
    return str(path)


def tiny_model(vocab_size, block_size, seed=0, **switches):
    torch.manual_seed(seed)
    config = NanoGPTConfig(vocab_size=vocab_size, block_size=block_size, n_layer=2, n_head=2, n_embd=32, **switches)
    return NanoGPTForCausalLM(config).eval()


def test_preprocessing_is_the_harness(tmp_path):
    examples = load_hellaswag(write_rows(tmp_path / "val.jsonl"))
    # one pass of "  " -> " " leaves two of three spaces; an ending's removed "[substeps]" leaves its space
    assert examples[1] == {"query": "Home and Garden: How to grow tomatoes. Pick a sunny spot.  Tomatoes need 8 "
                                    "hours of light.", "label": 0,
                           "choices": [" Water them daily.", "Plant them in a cave. forever.", "Buy a dog.",
                                       "Sing to them loudly."]}
    assert examples[0]["query"].endswith("a woman wearing winter clothes smiles. Then")  # ctx_b capitalized
    assert examples[2]["query"] == "Baking cookies: A woman mixes flour. She adds eggs."  # str.capitalize
    assert [ex["label"] for ex in examples] == [3, 0, 2, 1, 0]  # int (rowanz) and str (Hub) labels
    assert len(load_hellaswag(str(tmp_path / "val.jsonl"), limit=2)) == 2


@pytest.mark.parametrize("name", ["val.json", "val.parquet"])
def test_other_formats_and_string_labels(tmp_path, name):
    assert [ex["label"] for ex in load_hellaswag(write_rows(tmp_path / name))] == [3, 0, 2, 1, 0]


def test_context_spaces_move_to_the_continuation():
    tok = gpt2_tokenizer()
    (ids, n), = encode_pairs(tok, ["Hello there  "], ["world"])  # as the harness: "Hello there" + "  world"
    context = tok("Hello there")["input_ids"]
    assert ids == context + tok("Hello there  world")["input_ids"][len(context):] and n == len(ids) - len(context)


def direct_scores(model, tokenizer, example, block_size):
    """The harness's definition, one ending at a time, no padding: encode context + continuation, the
    continuation's tokens are those past the encoded context; the model reads the last block_size + 1 tokens but
    the last; sum the continuation's log-probabilities."""
    scores = []
    for choice in example["choices"]:
        context = tokenizer.encode(example["query"], add_special_tokens=False)
        whole = tokenizer.encode(example["query"] + " " + choice, add_special_tokens=False)
        continuation = whole[len(context):]
        ids = (context + continuation)[-(block_size + 1):]
        logprobs = model(torch.tensor([ids[:-1]])).logits[0].log_softmax(-1)  # (T, V)
        targets = torch.tensor(ids[1:])
        picked = logprobs[torch.arange(len(targets)), targets][-len(continuation):]
        scores.append(picked.sum().item())
    return scores


MODERN = dict(position_embedding="rotary", norm="rmsnorm", norm_after_embedding=True, qk_norm=True, n_kv_head=1,
              activation_function="relu2", tie_word_embeddings=False, final_logit_softcapping=15.0)


@pytest.mark.parametrize("kind", ["gpt2", "char", "char-modern"])
@torch.no_grad()
def test_batched_scores_equal_the_direct_computation(tmp_path, kind):
    tok, vocab, block = (gpt2_tokenizer(), 50304, 24) if kind == "gpt2" else (char_tokenizer(CHARS), len(CHARS), 64)
    model = tiny_model(vocab, block, **(MODERN if kind == "char-modern" else {}))
    examples = load_hellaswag(write_rows(tmp_path / "val.jsonl"))
    direct = torch.tensor([direct_scores(model, tok, ex, block) for ex in examples])
    batched = choice_logprobs(model, tok, examples, block)
    assert torch.allclose(batched, direct, atol=1e-4)
    labels = torch.tensor([ex["label"] for ex in examples])
    lengths = torch.tensor([[len(c) for c in ex["choices"]] for ex in examples])
    model.train()
    result = score_hellaswag(model, tok, examples, Accelerator(cpu=True), batch_size=2)
    assert model.training  # its mode restored
    assert result == {"acc": pytest.approx((direct.argmax(-1) == labels).float().mean().item()),
                      "acc_norm": pytest.approx(((direct / lengths).argmax(-1) == labels).float().mean().item()),
                      "examples": 5}


SCRIPT = """
import json, sys
from accelerate import Accelerator
from test_evaluation import CHARS, tiny_model
from nanogpt_hf.evaluation import load_hellaswag, score_hellaswag
from nanogpt_hf.tokenization import char_tokenizer
accelerator = Accelerator(cpu=True)
model = accelerator.prepare(tiny_model(len(CHARS), 64))
result = score_hellaswag(model, char_tokenizer(CHARS), load_hellaswag(sys.argv[1]), accelerator, batch_size=2)
if accelerator.is_main_process:
    print(json.dumps(result))
"""


def test_two_processes_give_the_counts_of_one(tmp_path):
    """5 examples over 2 ranks, 2 per forward: rank 1 runs a second, uncounted forward to match rank 0's two."""
    data = write_rows(tmp_path / "val.jsonl")
    script = tmp_path / "score.py"
    script.write_text(SCRIPT)
    env = cpu_processes_env(PYTHONPATH=os.pathsep.join([os.path.join(ROOT, "tests"), ROOT]))
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--main_process_port", str(free_port()), "--num_machines", "1", "--mixed_precision", "no",
              "--dynamo_backend", "no"]
    two = subprocess.run(launch + [str(script), data], env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    one = score_hellaswag(tiny_model(len(CHARS), 64), char_tokenizer(CHARS), load_hellaswag(data),
                          Accelerator(cpu=True), batch_size=2)
    assert json.loads(two.stdout.strip().splitlines()[-1]) == one and one["examples"] == 5


def load_main(argv):
    load_hellaswag(argv[0])


@pytest.mark.parametrize("name, word", [
    ("missing.jsonl", "missing.jsonl"), ("fields.jsonl", "ctx_a"), ("val.txt", ".jsonl"),
    ("empty.jsonl", "{tmp}/empty.jsonl is empty"),  # was a 25-line StopIteration traceback
    ("cut.jsonl", "{tmp}/cut.jsonl, line 5: Unterminated string"),  # pyarrow: 'row 0' or 'row 4'
    ("label.jsonl", "HellaSwag '{tmp}/label.jsonl', example 3: 4 endings and label 7;"),  # was scored: acc 0.0
    ("endings.parquet", "HellaSwag '{tmp}/endings.parquet', example 2: 3 endings and label '0';")])
def test_bad_files_are_one_line_errors(tmp_path, capsys, name, word):
    (tmp_path / "fields.jsonl").write_text('{"ind": 1, "ctx": "x"}\n')
    (tmp_path / "val.txt").write_text("x\n")
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "cut.jsonl").write_text("".join(json.dumps(d) + "\n" for d in DOCS)[:-20])
    write_rows(tmp_path / "label.jsonl", DOCS[:2] + [dict(DOCS[2], label=7)])
    write_rows(tmp_path / "endings.parquet", [DOCS[0], dict(DOCS[1], endings=DOCS[1]["endings"][:3])])
    assert cli.run(load_main, [str(tmp_path / name)]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]  # progress bars aside
    assert len(errors) == 1 and word.format(tmp=tmp_path) in errors[0] and "Traceback" not in err, err
