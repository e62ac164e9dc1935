"""Zero-shot HellaSwag exactly as EleutherAI's lm-evaluation-harness `hellaswag` task computes it: each of four
endings is scored as the continuation " " + ending by its summed log-likelihood (acc), and by that over its length in
characters (acc_norm). An example's endings share a forward with other examples'; processes split the examples."""

from __future__ import annotations

import math
import os
import re

import torch

from .common import UserError, is_hub_id

FIELDS = ("activity_label", "ctx_a", "ctx_b", "endings", "label")
BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}


def preprocess(text: str) -> str:
    """The harness's clean-up; the brackets are artifacts of the WikiHow part of HellaSwag."""
    return re.sub(r"\[.*?\]", "", text.strip().replace(" [title]", ". ")).replace("  ", " ")


def hellaswag_example(doc: dict) -> dict:
    """A dataset row as the harness's process_docs makes it: query, choices, label (str on the Hub, int in rowanz's)."""
    query = preprocess(doc["activity_label"] + ": " + doc["ctx_a"] + " " + doc["ctx_b"].capitalize())
    return {"query": query, "choices": [preprocess(e) for e in doc["endings"]], "label": int(doc["label"])}


def load_hellaswag(source: str, limit: int = 0) -> list[dict]:
    """`Rowan/hellaswag` (any Hub id: its validation split) or a local .jsonl/.json/.parquet file with its fields;
    the first `limit` examples (0: all), preprocessed. datasets caches both."""
    from datasets import load_dataset

    from .data import naming_bad_files

    if is_hub_id(source):
        data = load_dataset(source, split="validation")
    else:
        builder = BUILDERS.get(os.path.splitext(source)[1].lower())
        if builder is None:
            raise UserError(f"HellaSwag file '{source}': pass a .jsonl, .json or .parquet file, or Rowan/hellaswag")
        with naming_bad_files([os.path.expanduser(source)]):  # a bad line named, not datasets' traceback
            data = load_dataset(builder, data_files=os.path.expanduser(source), split="train")
    if missing := [f for f in FIELDS if f not in data.column_names]:
        raise UserError(f"HellaSwag file '{source}' lacks the fields {', '.join(missing)}: pass Rowan/hellaswag "
                        "or a file with its fields (rowanz's hellaswag_val.jsonl has them)")
    if limit:
        data = data.select(range(min(limit, len(data))))
    for i, doc in enumerate(data):  # a wrong label or ending count would be scored silently (acc 0)
        if len(doc["endings"]) != 4 or str(doc["label"]) not in ("0", "1", "2", "3"):
            raise UserError(f"HellaSwag '{source}', example {i + 1}: {len(doc['endings'])} endings and label "
                            f"{doc['label']!r}; each example needs 4 endings and a label 0-3")
    return [hellaswag_example(doc) for doc in data]


def encode_pairs(tokenizer, contexts: list[str], continuations: list[str]) -> list[tuple[list[int], int]]:
    """(context ids + continuation ids, number of continuation ids) per pair, as the harness tokenizes: a context's
    trailing spaces move to the continuation; the continuation's ids are those of context + continuation past the
    encoded context."""
    continuations = [ctx[len(ctx.rstrip()):] + cont for ctx, cont in zip(contexts, continuations)]
    contexts = [ctx.rstrip() for ctx in contexts]
    context_ids = tokenizer(contexts, add_special_tokens=False)["input_ids"]
    whole_ids = tokenizer([a + b for a, b in zip(contexts, continuations)], add_special_tokens=False)["input_ids"]
    return [(ctx + whole[len(ctx):], len(whole) - len(ctx)) for ctx, whole in zip(context_ids, whole_ids)]


def sequence_logprobs(model, pairs: list[tuple[list[int], int]], block_size: int, device) -> torch.Tensor:
    """(R,): the summed log-probability of each pair's continuation ids, all pairs in one right-padded forward. As
    the harness, a sequence keeps its last block_size + 1 ids, and the model reads all but the last."""
    pairs = [(ids[-(block_size + 1):], n) for ids, n in pairs]
    seqs = torch.nn.utils.rnn.pad_sequence([torch.tensor(ids) for ids, _ in pairs], batch_first=True)  # (R, T + 1)
    x, y = seqs[:, :-1].to(device), seqs[:, 1:].to(device)  # inputs and their next ids (R, T)
    ends = torch.tensor([len(ids) - 1 for ids, _ in pairs], device=device).unsqueeze(1)  # (R, 1)
    starts = ends - torch.tensor([n for _, n in pairs], device=device).unsqueeze(1)
    pos = torch.arange(x.shape[1], device=device)  # (T,)
    scored = (pos >= starts) & (pos < ends)  # the continuation's positions (R, T)
    logits = model(input_ids=x, attention_mask=(pos < ends).long(), use_cache=False).logits  # (R, T, V)
    picked = torch.zeros(scored.shape, device=device)  # log-softmax in float32 of the scored positions only
    picked[scored] = logits[scored].float().log_softmax(-1).gather(-1, y[scored].unsqueeze(-1)).squeeze(-1)
    return picked.sum(-1)


def choice_logprobs(model, tokenizer, examples: list[dict], block_size: int, device="cpu") -> torch.Tensor:
    """(N, 4): the summed log-likelihood of each example's endings, the examples' 4N rows in one forward."""
    contexts = [ex["query"] for ex in examples for _ in ex["choices"]]
    pairs = encode_pairs(tokenizer, contexts, [" " + c for ex in examples for c in ex["choices"]])
    return sequence_logprobs(model, pairs, block_size, device).view(len(examples), -1)


def count_correct(examples: list[dict], scores: torch.Tensor) -> torch.Tensor:
    """[correct by acc, correct by acc_norm, examples] for (N, 4) scores."""
    lengths = torch.tensor([[len(c) for c in ex["choices"]] for ex in examples], device=scores.device)
    labels = torch.tensor([ex["label"] for ex in examples], device=scores.device)
    acc, acc_norm = (scores.argmax(-1) == labels).sum(), ((scores / lengths).argmax(-1) == labels).sum()
    return torch.stack([acc, acc_norm, torch.tensor(len(examples), device=scores.device)]).float()


@torch.no_grad()
def score_hellaswag(model, tokenizer, examples: list[dict], accelerator, batch_size: int = 8) -> dict:
    """acc, acc_norm and the example count over `examples`: rank r scores examples r, r+W, ...; every rank runs the
    same number of forwards (FSDP needs it), a rank short of examples repeating one without counting it."""
    rank, world = accelerator.process_index, accelerator.num_processes
    mine = examples[rank::world]
    rounds = math.ceil(math.ceil(len(examples) / world) / batch_size)
    block_size = accelerator.unwrap_model(model).config.block_size
    was_training = model.training
    model.eval()
    counts = torch.zeros(3, device=accelerator.device)
    with accelerator.autocast():
        for i in range(rounds):
            batch = mine[i * batch_size:(i + 1) * batch_size]
            scores = choice_logprobs(model, tokenizer, batch or examples[:1], block_size, accelerator.device)
            if batch:
                counts += count_correct(batch, scores)
    model.train(was_training)
    acc, acc_norm, n = accelerator.reduce(counts, reduction="sum").tolist()
    return {"acc": acc / max(n, 1), "acc_norm": acc_norm / max(n, 1), "examples": int(n)}
