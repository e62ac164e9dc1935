"""Zero-shot tasks of EleutherAI's lm-evaluation-harness during training. The harness defines everything about a task:
its documents, prompts, choices, targets, process_results and aggregation, so every figure is the harness's. Only the
log-likelihoods are ours: the (context, continuation) requests of all tasks sorted by length, right-padded into
batches, split over the processes, a context longer than block_size cut from the left as the harness's `hf` model
does. lm_eval is imported only when tasks are set (the `eval` extra)."""

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
ROWS = 64  # requests per forward


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


def sequence_logprobs(model, pairs: list[tuple[list[int], int]], block_size: int, device) -> torch.Tensor:
    """(R, 2): each pair's summed continuation log-probability and 1.0 if every continuation id is the model's most
    likely (the harness's is_greedy), in one right-padded forward. As the harness, a sequence keeps its last
    block_size + 1 ids and the model reads all but the last (a continuation longer than block_size: its last block_size
    ids, where the harness stops); lm_head runs from the first continuation position on."""
    pairs = [(ids[-(block_size + 1):], n) for ids, n in pairs]
    seqs = torch.nn.utils.rnn.pad_sequence([torch.tensor(ids) for ids, _ in pairs], batch_first=True)  # (R, T + 1)
    x, y = seqs[:, :-1].to(device), seqs[:, 1:].to(device)  # inputs and their next ids (R, T)
    ends = torch.tensor([len(ids) - 1 for ids, _ in pairs], device=device).unsqueeze(1)  # (R, 1)
    starts = ends - torch.tensor([n for _, n in pairs], device=device).unsqueeze(1)
    pos = torch.arange(x.shape[1], device=device)  # (T,)
    kept = pos[int(starts.min().clamp(min=0)):]  # (T',) the positions whose logits are needed
    scored = (kept >= starts) & (kept < ends)  # the continuation's positions (R, T')
    logits = model(input_ids=x, attention_mask=(pos < ends).long(), use_cache=False, logits_to_keep=kept).logits
    logp = logits[scored].float().log_softmax(-1)  # (S, V) in float32, the scored positions only
    targets = y[:, kept][scored]  # (S,)
    picked, greedy = torch.zeros(scored.shape, device=device), torch.ones(scored.shape, device=device)
    picked[scored] = logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    greedy[scored] = (logp.argmax(-1) == targets).float()
    return torch.stack([picked.sum(-1), greedy.amin(-1)], 1)


@torch.no_grad()
def loglikelihoods(model, pairs: list[tuple[list[int], int]], accelerator, rows: int = ROWS) -> torch.Tensor:
    """(R, 2) sequence_logprobs of all pairs, on every process. Sorted longest first, then by continuation length
    (little padding, few logits), rank r scores
    the sorted pairs r, r+W, ...; every rank runs the same number of forwards (FSDP needs it), a rank short of pairs
    repeating one without keeping it."""
    rank, world = accelerator.process_index, accelerator.num_processes
    block_size = accelerator.unwrap_model(model).config.block_size
    order = sorted(range(len(pairs)), key=lambda i: (-min(len(pairs[i][0]), block_size + 1), -pairs[i][1]))
    mine = order[rank::world]
    rounds = math.ceil(math.ceil(len(pairs) / world) / rows)
    out = torch.zeros(rounds * rows, 3, dtype=torch.float64, device=accelerator.device)  # (index + 1 (0: none), 2)
    was_training = model.training
    model.eval()
    with accelerator.autocast():
        for i in range(rounds):
            batch = mine[i * rows:(i + 1) * rows]
            scores = sequence_logprobs(model, [pairs[j] for j in batch or order[:1]], block_size, accelerator.device)
            if batch:
                index = torch.tensor(batch, device=accelerator.device).unsqueeze(1) + 1.0
                out[i * rows:i * rows + len(batch)] = torch.cat([index, scores.double()], 1)
    model.train(was_training)
    out = accelerator.gather(out)  # (W * rounds * rows, 3)
    out = out[out[:, 0] > 0]
    result = torch.empty(len(pairs), 2, dtype=torch.float64)
    result[out[:, 0].long().cpu() - 1] = out[:, 1:].cpu()
    return result


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
    for inst, (logprob, greedy) in zip(instances, loglikelihoods(model, tasks.pairs, accelerator).tolist(), strict=True):
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
