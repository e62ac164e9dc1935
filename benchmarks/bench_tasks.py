"""Documents/s of our task scorer (nanogpt_hf.evaluation.score_tasks) against lm-evaluation-harness's own `hf` model
(HFLM, `lm_eval.evaluator.evaluate`) on the same checkpoint and the same documents, random weights (speed does not
depend on them). Needs lm_eval (pip install -e ".[eval]").

    python benchmarks/bench_tasks.py [--docs=64] [--models=laptop,gpt2] [--batch_sizes=32,64]

The task: a HellaSwag-like multiple-choice task (the shape of the harness's hellaswag after its process_docs: a query
of 20-100 words, four endings of 8-35 words, acc and acc_norm) over synthetic documents in a local .jsonl. Each
measure is end to end from loaded tasks: requests built, tokenized, scored, the harness's metrics. Ours: one batch
size (evaluation.ROWS requests per forward); the harness: each of --batch_sizes. Rounds alternate (ours, the
harness's...) --rounds times; medians. One process; float32 on the CPU. Models: the laptop model (4 layers, 4 heads,
128 wide, block 64, GPT-2's vocabulary: a character model's block is too short for the harness's assertion that a
continuation fits) and the GPT-2 124M shape (12 layers, 12 heads, 768 wide, block 1024).
"""

import argparse
import json
import os
import random
import statistics
import tempfile
import time

import torch
from accelerate import Accelerator

from nanogpt_hf.configuration_nanogpt import NanoGPTConfig
from nanogpt_hf.evaluation import Tasks, load_tasks, score_tasks
from nanogpt_hf.modeling_nanogpt import NanoGPTForCausalLM
from nanogpt_hf.tokenization import gpt2_tokenizer

MODELS = {"laptop": dict(n_layer=4, n_head=4, n_embd=128, block_size=64, bias=False, vocab_size=50304),
          "gpt2": dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50304)}
WORDS = ("the man woman then she he is a of and to in on with his her car snow water ball field runs jumps "
         "slowly quickly camera shows person wearing pieces plays begins continues talking kitchen".split())
TASK = {"task": "bench_choice", "dataset_path": "json", "test_split": "test", "output_type": "multiple_choice",
        "doc_to_text": "{{query}}", "doc_to_choice": "{{choices}}", "doc_to_target": "{{label}}",
        "metric_list": [{"metric": "acc"}, {"metric": "acc_norm"}]}


def sentence(rng: random.Random, low: int, high: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high))).capitalize() + "."


def synthetic_examples(n: int, seed: int = 0) -> list[dict]:
    """HellaSwag-like documents (its harness task's fields after process_docs): query, four choices, label."""
    rng = random.Random(seed)
    return [{"query": "Activity: " + sentence(rng, 20, 100), "choices": [sentence(rng, 8, 35) for _ in range(4)],
             "label": rng.randrange(4)} for _ in range(n)]


def write_task(folder: str, docs: int) -> str:
    data, path = os.path.join(folder, "bench_choice.jsonl"), os.path.join(folder, "bench_choice.yaml")
    with open(data, "w") as fh:
        fh.writelines(json.dumps(doc) + "\n" for doc in synthetic_examples(docs))
    with open(path, "w") as fh:
        json.dump({**TASK, "dataset_kwargs": {"data_files": {"test": data}}}, fh)
    return path


def save_model(name: str, folder: str) -> tuple:
    torch.manual_seed(0)
    model = NanoGPTForCausalLM(NanoGPTConfig(**MODELS[name], dropout=0.0)).eval()
    tokenizer = gpt2_tokenizer()
    tokenizer.model_max_length = model.config.block_size
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model, tokenizer


def ours(model, tokenizer, task_file: str, accelerator) -> tuple[float, dict]:
    tasks = Tasks(load_tasks(task_file))  # loaded (the data read), then timed from the requests on
    t0 = time.perf_counter()
    scores = score_tasks(model, tokenizer, tasks, accelerator)
    return time.perf_counter() - t0, scores["results"]["bench_choice"]


def harness(lm, task_file: str) -> tuple[float, dict]:
    from lm_eval.evaluator import evaluate
    from lm_eval.tasks import TaskManager

    task_dict = TaskManager(include_defaults=False).load([task_file])
    t0 = time.perf_counter()
    out = evaluate(lm, task_dict, bootstrap_iters=0, log_samples=False)
    return time.perf_counter() - t0, out["results"]["bench_choice"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--docs", type=int, default=64)
    parser.add_argument("--models", default="laptop,gpt2")
    parser.add_argument("--batch_sizes", default="32,64")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    from lm_eval.models.huggingface import HFLM

    accelerator = Accelerator(cpu=True)
    print(f"torch threads {torch.get_num_threads()}, {args.docs} documents (4 requests each)")
    with tempfile.TemporaryDirectory() as tmp:
        task_file = write_task(tmp, args.docs)
        for name in args.models.split(","):
            model, tokenizer = save_model(name, os.path.join(tmp, name))
            lms = {b: HFLM(pretrained=os.path.join(tmp, name), trust_remote_code=True, device="cpu", batch_size=b)
                   for b in map(int, args.batch_sizes.split(","))}
            times = {"ours": []} | {b: [] for b in lms}
            for _ in range(args.rounds):
                seconds, mine = ours(model, tokenizer, task_file, accelerator)
                times["ours"].append(seconds)
                for b, lm in lms.items():
                    seconds, theirs = harness(lm, task_file)
                    times[b].append(seconds)
                    assert abs(mine["acc"] - theirs["acc,none"]) < 1e-9, (mine, theirs)  # the same figures
            rates = {k: args.docs / statistics.median(v) for k, v in times.items()}
            best = max(v for k, v in rates.items() if k != "ours")
            harness_rates = ", ".join(f"batch {b} {rates[b]:6.1f}" for b in lms)
            print(f"{name:12s} ours {rates['ours']:7.1f} docs/s; harness {harness_rates} docs/s; ours / best harness "
                  f"{rates['ours'] / best:.2f}x", flush=True)


if __name__ == "__main__":
    main()
