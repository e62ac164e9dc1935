"""Zero-shot tasks of EleutherAI's lm-evaluation-harness during training. The harness defines everything about a task:
its documents, prompts, choices, targets, process_results and aggregation, so every figure is the harness's. Only the
log-likelihoods are ours: the (context, continuation) requests of all tasks, those sharing a context in one row (a
tree attention mask), rows sorted by length, right-padded into batches and split over the processes, logits at the
scored positions only; a context longer than block_size is cut from the left as the harness's `hf` model does.
lm_eval is imported only when tasks are set (the `eval` extra)."""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import time
from collections import defaultdict

import torch

from .common import UserError

SCORED = ("loglikelihood", "multiple_choice")  # the output types made of loglikelihood requests only
ROWS = 64  # rows per forward (a row: a context and its continuations)


def load_tasks(names: str) -> dict:
    """{name: the harness's Task} for comma-separated task names (a group or tag: its tasks) or task YAML files."""
    if importlib.util.find_spec("lm_eval") is None:
        raise UserError('eval_tasks needs lm-evaluation-harness: pip install -e ".[eval]"')
    from lm_eval.tasks import TaskManager

    specs = [os.path.expanduser(n.strip()) for n in names.split(",") if n.strip()]
    files = [n for n in specs if n.endswith((".yaml", ".yml"))]
    if missing := [n for n in files if not os.path.isfile(n)]:
        raise UserError(f"eval_tasks: no task file {missing[0]}")
    manager = TaskManager(include_defaults=len(files) < len(specs))  # its ~15,000 files indexed only if needed
    if unknown := [n for n in specs if n not in files and n not in manager.all_tasks]:
        raise UserError(f"eval_tasks: {unknown[0]} is no lm-evaluation-harness task, group or tag (`lm_eval ls tasks` "
                        "lists them) nor a task .yaml file")
    tasks = manager.load(specs)["tasks"]
    for name, task in tasks.items():
        task.set_fewshot_seed(1234)  # a task with few-shot examples draws them as the harness's evaluator does
        if task.OUTPUT_TYPE not in SCORED:
            raise UserError(f"eval_tasks: {name} is a {task.OUTPUT_TYPE} task, not scored during training: run lm_eval "
                            f"on the checkpoint (lm_eval --model hf --model_args pretrained=OUT_DIR,"
                            f"trust_remote_code=True --tasks {name})")
    return tasks


@dataclasses.dataclass
class Tasks:
    """The harness's tasks, their requests built (and tokenized) once for the documents that evaluations score."""

    tasks: dict  # {name: Task}
    limit: int | None = None  # the requests are those of each task's first `limit` documents (0: all)
    pairs: list | None = None  # (ids, continuation length) of every request, in task.instances order

    def build(self, tokenizer, limit: int) -> None:
        if limit != self.limit:
            for task in self.tasks.values():
                task.build_all_requests(limit=limit or None)
            args = [inst.args for task in self.tasks.values() for inst in task.instances]
            self.limit, self.pairs = limit, encode_pairs(tokenizer, args)

    def instances(self) -> list:
        return [inst for task in self.tasks.values() for inst in task.instances]


def encode_pairs(tokenizer, requests: list[tuple[str, str]]) -> list[tuple[list[int], int]]:
    """(context ids + continuation ids, number of continuation ids) per (context, continuation), as the harness's `hf`
    model tokenizes: a context's trailing spaces move to the continuation; the continuation's ids are those of
    context + continuation past the encoded context; an empty context is the prefix token (bos, else eos)."""
    contexts = [ctx.rstrip() for ctx, _ in requests]
    continuations = [ctx[len(ctx.rstrip()):] + cont for ctx, cont in requests]
    context_ids = tokenizer(contexts, add_special_tokens=False)["input_ids"]
    whole_ids = tokenizer([a + b for a, b in zip(contexts, continuations)], add_special_tokens=False)["input_ids"]
    prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if prefix is None and "" in (ctx for ctx, _ in requests):
        raise UserError("a task request has an empty context: the tokenizer needs an end-of-text token to score it")
    return [(ctx + whole[len(ctx):], len(whole) - len(ctx)) if req[0] else ([prefix] + whole, len(whole))
            for ctx, whole, req in zip(context_ids, whole_ids, requests)]


def pack(pairs: list[tuple[list[int], int]], block_size: int) -> list[list[int]]:
    """The forward rows, as lists of pair indices: pairs with the same context ids (a multiple-choice document's) share
    a row, the context once then each continuation, within block_size; a pair past block_size + 1 ids is alone."""
    groups = defaultdict(list)
    for i, (ids, n) in enumerate(pairs):
        groups[tuple(ids[:-n]) if len(ids) <= block_size + 1 else i].append(i)
    rows = []
    for members in groups.values():
        rows.append([])
        length = min(len(pairs[members[0]][0]) - 1, block_size) - pairs[members[0]][1] + 1  # the context's ids
        for i in members:
            if rows[-1] and length + pairs[i][1] - 1 > block_size:  # full: a new row, the context again
                rows.append([])
                length = len(pairs[i][0]) - pairs[i][1]
            rows[-1].append(i)
            length += pairs[i][1] - 1
    return rows


def row(pairs: list[tuple[list[int], int]], members: list[int], block_size: int) -> tuple[list, list, list, list]:
    """A row's ids, positions, segments (0: the context, s: continuation s, which sees the context and itself) and
    scored (position, next id, pair) triples. As the harness, a pair keeps its last block_size + 1 ids; the model
    reads all but the last (a continuation longer than block_size: its last block_size ids; the harness stops)."""
    ids, n = pairs[members[0]]
    ids = ids[-(block_size + 1):]
    context = ids[:len(ids) - min(n, block_size)]
    tokens, positions, segments, scored = list(context), list(range(len(context))), [0] * len(context), []
    for s, i in enumerate(members, 1):
        n = min(pairs[i][1], block_size)
        continuation = pairs[i][0][-n:]  # (n,): predicted from the context's last id, then from each other
        where = [len(context) - 1] + list(range(len(tokens), len(tokens) + n - 1))
        scored += [(p, t, i) for p, t in zip(where, continuation)]
        tokens, segments = tokens + continuation[:-1], segments + [s] * (n - 1)
        positions += range(len(context), len(context) + n - 1)
    return tokens, positions, segments, scored


def padded(sequences: list, fill: int, device) -> torch.Tensor:  # (R, T), right-padded with `fill`
    return torch.nn.utils.rnn.pad_sequence([torch.tensor(q) for q in sequences], batch_first=True,
                                           padding_value=fill).to(device)


def row_logprobs(model, rows: list[tuple], device, additive: bool) -> torch.Tensor:
    """(S, 3): (pair, log-probability of the next id, 1.0 if it is the model's most likely) at each scored position
    of `rows`, in one right-padded forward; lm_head runs at the scored positions only."""
    x, positions, segments = (padded([r[k] for r in rows], fill, device) for k, fill in ((0, 0), (1, 0), (2, -1)))
    mask = None  # one pair a row: causal attention, the padding last (the harness's forward)
    if int(segments.max()) > 1:  # a shared context: a tree, each continuation seeing the context and itself
        causal = torch.ones(x.shape[1], x.shape[1], dtype=torch.bool, device=device).tril()  # (T, T)
        seen = (segments.unsqueeze(1) == segments.unsqueeze(2)) | (segments.unsqueeze(1) == 0)  # (R, T, T)
        mask = (seen & causal).unsqueeze(1)  # (R, 1, T, T); eager attention adds it
        mask = torch.zeros(mask.shape, device=device).masked_fill(~mask, float("-inf")) if additive else mask
    b, p, targets, pair = torch.tensor([(b, *s) for b, r in enumerate(rows) for s in r[3]], device=device).T  # (S,)
    keep = torch.zeros(x.shape, dtype=torch.bool, device=device)
    keep[b, p] = True  # the U scored positions (a context's last serves each continuation)
    positions = None if mask is None else positions
    logits = model(input_ids=x, attention_mask=mask, position_ids=positions, use_cache=False,
                   logits_to_keep=keep).logits  # (U, V), row by row
    logp = logits.float().log_softmax(-1)  # (U, V) in float32
    index = keep.flatten().cumsum(0)[b * x.shape[1] + p] - 1  # (S,): each scored position's row of logp
    picked, greedy = logp[index, targets], logp.argmax(-1)[index] == targets
    return torch.stack([pair.to(picked.dtype), picked, greedy.to(picked.dtype)], 1)


@torch.no_grad()
def loglikelihoods(model, pairs: list[tuple[list[int], int]], accelerator, rows: int = ROWS) -> torch.Tensor:
    """(R, 2) for the pairs (context + continuation ids, continuation length), on every process: the continuation's
    summed log-probability, and 1.0 if each of its ids is the model's most likely (the harness's is_greedy). The rows
    (pack), sorted, rank r runs rows r, r+W, ... `rows` a forward; every rank runs the same number of
    forwards (FSDP needs it), a rank short of rows repeating one without keeping it."""
    rank, world = accelerator.process_index, accelerator.num_processes
    config = accelerator.unwrap_model(model).config
    block_size, additive = config.block_size, config._attn_implementation == "eager"  # sdpa: a boolean mask
    packed = [row(pairs, members, block_size) for members in pack(pairs, block_size)]
    packed.sort(key=lambda r: -len(r[0]))  # longest first: little padding
    mine = packed[rank::world]
    rounds = math.ceil(math.ceil(len(packed) / world) / rows)
    out = []
    was_training = model.training
    model.eval()
    with accelerator.autocast():
        for i in range(rounds):
            batch = mine[i * rows:(i + 1) * rows]
            scored = row_logprobs(model, batch or packed[:1], accelerator.device, additive)  # (S, 3)
            out.append(scored.double()[:len(scored) if batch else 0])
    model.train(was_training)
    out = accelerator.gather(accelerator.pad_across_processes(torch.cat(out), pad_index=-1))  # (W * S, 3)
    out = out[out[:, 0] >= 0].cpu()  # the scored positions of all ranks
    pair = out[:, 0].long()
    logprob = torch.zeros(len(pairs), dtype=torch.float64).index_add_(0, pair, out[:, 1])
    greedy = torch.ones(len(pairs), dtype=torch.float64).scatter_reduce_(0, pair, out[:, 2], "amin")
    return torch.stack([logprob, greedy], 1)


def task_metrics(task) -> tuple[dict, float]:
    """The harness's figures of a task whose requests hold their responses: its filters, process_results per document,
    its aggregation of each metric (mean if none). Also the chance accuracy (1 / choices, averaged over documents)."""
    from lm_eval.api.metrics import mean

    task.apply_filters()
    by_doc = defaultdict(list)
    for inst in task.instances:
        by_doc[inst.doc_id].append(inst)
    key = next(iter(task.instances[0].filtered_resps))  # the first filter ("none": the response as is)
    values = defaultdict(list)
    for doc_id, doc in task.doc_iterator(limit=len(by_doc)):
        insts = sorted(by_doc[doc_id], key=lambda inst: inst.idx)
        for metric, value in task.process_results(doc, [inst.filtered_resps[key] for inst in insts]).items():
            values[metric].append(value)
    aggregation = task.aggregation()
    figures = {k: aggregation.get(k, mean)(v) for k, v in values.items()}
    chance = mean([1 / len(insts) for insts in by_doc.values()]) if task.OUTPUT_TYPE == "multiple_choice" else 0.0
    return {**figures, "examples": len(by_doc)}, chance


def score_tasks(model, tokenizer, tasks: Tasks, accelerator, limit: int = 0) -> dict:
    """Each task's figures over its first `limit` documents (0: all), each task's accuracy centered on chance, the
    core score (their mean), the seconds it took and each task's dataset; the same on every process."""
    t0 = time.perf_counter()
    tasks.build(tokenizer, limit)
    instances = tasks.instances()
    scores = loglikelihoods(model, tasks.pairs, accelerator).tolist()  # (R, 2)
    for inst, (logprob, greedy) in zip(instances, scores, strict=True):
        inst.resps = [(logprob, greedy == 1.0)]
    results, centered = {}, {}
    for name, task in tasks.tasks.items():
        results[name], chance = task_metrics(task)
        acc = results[name].get("acc_norm", results[name].get("acc"))  # acc_norm where the harness reports it
        if acc is not None:
            centered[name] = (acc - chance) / (1 - chance)  # nanochat's and DCLM's CORE convention
    datasets = {name: [task.config.dataset_path, task.config.test_split or task.config.validation_split]
                for name, task in tasks.tasks.items()}
    return {"results": results, "centered": centered, "core": sum(centered.values()) / max(len(centered), 1),
            "seconds": time.perf_counter() - t0, "datasets": datasets}


def task_lines(scores: dict) -> list[str]:
    """One line per task, `NAME: METRIC=VALUE ... examples=N` (the harness's names), then the core score."""
    lines = [f"{name}: " + " ".join(f"{k}={v:.4f}" for k, v in r.items() if k != "examples") + f" examples="
             f"{r['examples']}" for name, r in scores["results"].items()]
    return lines + [f"core: {scores['core']:.4f} ({len(scores['centered'])} tasks, {scores['seconds']:.1f} s)"]


def task_events(scores: dict | None) -> dict:
    """The figures as metrics.jsonl and the trackers record them: TASK_METRIC, TASK_centered, core, tasks_seconds."""
    if not scores:
        return {}
    flat = {f"{name}_{k}": v for name, r in scores["results"].items() for k, v in r.items()}
    return {**flat, **{f"{name}_centered": v for name, v in scores["centered"].items()}, "core": scores["core"],
            "tasks_seconds": scores["seconds"]}
