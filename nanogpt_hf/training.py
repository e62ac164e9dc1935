"""The accelerate training loop: set up -> evaluate -> step -> log -> save. nanoGPT's train.py, with accelerate doing
the engineering (devices, DDP/FSDP, mixed precision, state saving) and without nanoGPT's known defects: exactly
max_iters steps, a final save, best_val_loss that only improves, eval_only on resume, and exact resume (the batches
are a function of (seed, step, row); the optimizer and every RNG are saved).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import importlib.util
import logging
import math
import os
import signal
import socket
import sys
import threading
import time

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, InitProcessGroupKwargs, set_seed
from tqdm.auto import tqdm

from .checkpoint import (Checkpointer, check_checkpoint, check_shared_out_dir, latest_state, load_pretrained,
                         read_trainer_state, state_dirs)
from .common import UserError, first_line, is_hub_id, own_work
from .configuration_nanogpt import ARCHITECTURE as DECLARED, NanoGPTConfig
from .data import Conversations, Mixture, check_compatible, eval_batch, open_dataset, parse_mixture, sample_batch
from .evaluation import Tasks, load_tasks, score_tasks, task_events, task_lines
from .hardware import (compile_by_default, estimate_mfu, keep_freed_memory, peak_flops, resolve_device_type,
                       resolve_mixed_precision, training_attention)
from .hub import HubPusher, check_repo_id
from .metrics import MetricsLog, perplexity, plot_losses
from .modeling_nanogpt import NanoGPTForCausalLM
from .settings import RECIPE_SUFFIXES, TrainSettings, parse_command, save_yaml
from .tokenization import CHAT_TEMPLATE, END_OF_TURN

DESCRIPTION = """Train a GPT (nanoGPT's train.py on accelerate). Settings: nanoGPT's defaults (its GPT-2 124M run), then
RECIPE.yaml files (or nanoGPT's config/*.py), then --key=value; with no recipe, default.yaml (the shakespeare_char_cpu
demo on the shipped corpus), whose values the defaults below show. Tokens per optimizer step = batch_size x
gradient_accumulation_steps x block_size, whatever the number of processes (each takes 1/N of the step's rows)."""
DEFAULT_RECIPE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "recipes", "default.yaml")
EMBEDDED_DATASETS = {"shakespeare_char": ("shakespeare", "char"), "shakespeare": ("shakespeare", "gpt2"),  # prepared
                     "shakespeare_chat": ("shakespeare_chat", "gpt2")}  # from the shipped corpus on first use
ARCHITECTURE = [k for k in DECLARED if k != "dropout"]  # the settings that shape the model: a resume keeps them


def get_lr(it: int, learning_rate: float, min_lr: float, warmup_iters: int, lr_decay_iters: int,
           decay_lr: bool = True, schedule: str = "cosine", warmdown_frac: float = 0.0) -> float:
    """Linear warmup, then nanoGPT's cosine decay to min_lr at lr_decay_iters (then min_lr); or wsd: constant, then a
    linear warmdown to min_lr over the last warmdown_frac of the lr_decay_iters steps; or constant."""
    if not decay_lr or schedule == "constant":
        return learning_rate
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    if it > lr_decay_iters:
        return min_lr
    if schedule == "wsd":
        warmdown = max(1, round(warmdown_frac * lr_decay_iters))
        if it < lr_decay_iters - warmdown:  # stable: a resume with a larger max_iters extends this part
            return learning_rate
        return min_lr + (learning_rate - min_lr) * (lr_decay_iters - it) / warmdown
    decay_ratio = (it - warmup_iters) / max(1, lr_decay_iters - warmup_iters)
    coeff = 0.5 * (1.0 + math.cos(math.pi * decay_ratio))  # 1 -> 0
    return min_lr + coeff * (learning_rate - min_lr)


def learning_rates(s: TrainSettings, step: int) -> list[float]:
    """Each optimizer's LR at a step: the schedule for AdamW, the same curve scaled to muon_lr for Muon."""
    decay_iters = s.lr_decay_iters if s.lr_decay_iters is not None else s.max_iters  # None: follow max_iters
    lr = get_lr(step, s.learning_rate, s.min_lr, s.warmup_iters, decay_iters, s.decay_lr, s.lr_schedule,
                s.warmdown_frac)
    return [lr, lr * s.muon_lr / s.learning_rate if s.learning_rate else 0.0] if s.optimizer == "muon" else [lr]


def configure_optimizers(model, s: TrainSettings, device_type: str) -> list[torch.optim.Optimizer]:
    """[AdamW] or, with optimizer=muon, [AdamW, Muon]: Muon takes the 2-D parameters of the blocks, AdamW the rest."""
    hidden = [p for p in model.transformer.h.parameters() if p.dim() == 2 and p.requires_grad]  # the blocks' matrices
    muon = hidden if s.optimizer == "muon" else []
    adamw = configure_optimizer(model, s.weight_decay, s.learning_rate, (s.beta1, s.beta2), device_type, skip=muon)
    return [adamw] + ([torch.optim.Muon(muon, s.muon_lr, s.weight_decay, s.muon_momentum)] if muon else [])


def configure_optimizer(model, weight_decay: float, learning_rate: float, betas: tuple[float, float],
                        device_type: str, skip=()) -> torch.optim.AdamW:
    """nanoGPT's AdamW: weight decay on 2-D tensors only (not biases, norms); fused: one kernel per tensor."""
    skip = {id(p) for p in skip}  # parameters another optimizer steps
    params = [p for p in model.parameters() if p.requires_grad and id(p) not in skip]  # tied weights appear once
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=device_type in ("cuda", "cpu"))


def prepare_model(accelerator, model, optimizers: list):
    """accelerator.prepare, without its mixed-precision forward wrapper: it copied the (B, T, vocab) logits to fp32
    (3.5-5% of a GPT-2 124M step on an H200). Every forward runs under accelerator.autocast() instead."""
    model, *optimizers = accelerator.prepare(model, *optimizers)
    inner = accelerator.unwrap_model(model)  # (DDP, FSDP1 unwrapped) what accelerate patched, if it did
    if inner.__dict__.pop("_original_forward", None) is not None:
        inner.__dict__.pop("forward", None)  # the class's forward again, its decorators kept
    return model, optimizers


def train_step(accelerator, model, optimizers: list, micro_batches, lrs: list[float],
               grad_clip: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step over this process's micro-batches (x, y), nanoGPT style: gradients synchronised on the last
    one only, clipped, each optimizer at its lr. The loss is the mean over the step's targets on all processes (y's
    -100s ignored: a conversation's unlearned tokens), so any split into micro-batches and processes gives the same
    step. Returns this process's share of the loss and the gradient's norm before clipping, without a sync."""
    micro_batches = list(micro_batches)
    n = len(micro_batches)
    for optimizer, lr in zip(optimizers, lrs, strict=True):
        for group in optimizer.param_groups:
            group["lr"] = lr  # set by hand: a prepared scheduler would step once per process
    targets = accelerator.reduce(sum((y != -100).sum() for _, y in micro_batches), reduction="sum")  # all processes'
    per_process = targets / accelerator.num_processes  # DDP averages the processes' gradients
    total = torch.zeros((), device=accelerator.device)
    for i, (x, y) in enumerate(micro_batches):
        with accelerator.no_sync(model) if i < n - 1 else contextlib.nullcontext(), accelerator.autocast():
            loss = model(input_ids=x, shift_labels=y, use_cache=False, num_items_in_batch=per_process).loss
        accelerator.backward(loss)
        total += loss.detach()
    grad_norm = accelerator.clip_grad_norm_(model.parameters(), grad_clip if grad_clip > 0.0 else math.inf)
    for optimizer in optimizers:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return total, grad_norm


def micro_batches(stream, s: TrainSettings, step: int, rank: int, world: int, device) -> list[tuple]:
    """This process's share of a step: the rows of micro-batches 0..G-1 (gradient_accumulation_steps, each a pure
    function of (seed, step, index)) cut into `world` equal slices: N processes see together what 1 process sees."""
    rows = s.rows_per_step // world  # rows per process
    b = math.gcd(rows, s.batch_size)  # micro-batch size: divides both, so no micro-batch straddles two
    out = []
    for row in range(rank * rows, (rank + 1) * rows, b):
        x, y = sample_batch(stream, seed=s.seed, step=step, index=row // s.batch_size, batch_size=s.batch_size,
                            block_size=s.block_size)
        lo = row % s.batch_size
        out.append((x[lo:lo + b].to(device, non_blocking=True), y[lo:lo + b].to(device, non_blocking=True)))
    return out


@torch.no_grad()
def estimate_loss(model, streams: dict[str, Mixture], s: TrainSettings, accelerator) -> dict[str, float]:
    """The mean loss of each split: of eval_iters fixed batches per source, their weighted mean over a mixture's
    sources (each source's loss too, as 'val/NAME')."""
    model.eval()
    out = {}
    for split, mix in streams.items():
        losses = [mean_loss(model, stream, s, accelerator) for stream in mix.streams]
        out[split] = float(np.dot(mix.weights, losses))
        if len(losses) > 1:
            out |= {f"{split}/{name}": loss for name, loss in zip(mix.names, losses)}
    model.train()
    return out


def mean_loss(model, stream, s: TrainSettings, accelerator) -> float:
    """Mean loss over eval_iters fixed batches, spread over all processes and gathered. Every process runs as many
    forwards (under FSDP a forward is a collective): the extra batches of the last round are left out."""
    world, rank = accelerator.num_processes, accelerator.process_index
    total = torch.zeros(2, device=accelerator.device)  # (sum of batch losses, batches)
    for i in range(math.ceil(s.eval_iters / world)):
        k = i * world + rank
        x, y = eval_batch(stream, seed=s.seed, k=min(k, s.eval_iters - 1), batch_size=s.batch_size,
                          block_size=s.block_size)
        with accelerator.autocast():
            x, y = x.to(accelerator.device), y.to(accelerator.device)
            loss = model(input_ids=x, shift_labels=y, use_cache=False).loss
        total += torch.stack([loss.float(), torch.ones_like(loss.float())]) * (k < s.eval_iters)
    total = accelerator.reduce(total, reduction="sum")
    return (total[0] / total[1]).item()


# ---- settings and set-up ----------------------------------------------------------------------------------------


def resume_settings(s: TrainSettings, explicit: dict, out_dir: str) -> tuple[TrainSettings, str, list[str]]:
    """A resumed run's settings: the saved ones, with what the user set explicitly. Architecture changes are refused;
    other changes (learning rate, max_iters, dataset...) are allowed and announced. Returns (settings, state, notes)."""
    state = latest_state(out_dir)
    if state is None:
        raise UserError(f"init_from=resume but {out_dir} holds no resumable state (state/step-N); start the run "
                        f"with --init_from=scratch")
    ts = read_trainer_state(state)
    saved = {k: v for k, v in ts["settings"].items() if k in TrainSettings.__dataclass_fields__}
    config = NanoGPTConfig.from_pretrained(state)  # the model's own architecture (a state may predate a setting)
    saved = TrainSettings(**{**saved, **{k: getattr(config, k) for k in ARCHITECTURE}})
    changed = {k: v for k, v in explicit.items() if k not in ("init_from", "out_dir") and getattr(saved, k) != v}
    for k in changed:
        if k in ARCHITECTURE or k == "optimizer":  # the model, or the optimizer states, would not load
            raise UserError(f"cannot resume with {k}={changed[k]!r}: the run in {out_dir} was trained with "
                            f"{k}={getattr(saved, k)!r}; start a new out_dir to change {k}")
    if "gradient_accumulation_steps" in changed and "total_batch_size" not in explicit:  # the one given now wins
        changed["total_batch_size"] = None
    notes = [f"resuming with {k} changed: {getattr(saved, k)!r} -> {v!r}" for k, v in changed.items()]
    s = dataclasses.replace(saved, **changed, init_from="resume", out_dir=out_dir)
    last = ts["step"] - 1  # the last step trained: its learning rate under the new settings tells a jump
    if last >= 0 and not math.isclose(learning_rates(saved, last)[0], learning_rates(s, last)[0], rel_tol=1e-9):
        extended = s.lr_schedule == "cosine" and {"max_iters", "lr_decay_iters"} & changed.keys()
        wsd = " (lr_schedule=wsd keeps it while a run is extended)" if extended else ""
        notes.append(f"the learning rate jumps with these settings: {learning_rates(saved, last)[0]:.2e} at step "
                     f"{last} -> {learning_rates(s, last + 1)[0]:.2e} at step {last + 1}{wsd}")
    return s, state, notes


def check_settings(s: TrainSettings) -> None:
    """A setting's own mistakes, before anything on disk is read: the model it describes, the device and dtype."""
    try:
        NanoGPTConfig(**{k: getattr(s, k) for k in DECLARED})
    except ValueError as exc:  # the config names the field: it is the setting's name
        raise UserError(f"settings: {str(exc).replace('NanoGPTConfig.', '')}") from None
    resolve_mixed_precision(s.dtype, resolve_device_type(s.device))
    parse_mixture(s.dataset)


def check_start(s: TrainSettings) -> None:
    """Refusals before any work. One rule keeps runs from overwriting each other: an out_dir holding resumable states
    is continued with --init_from=resume, or the new run goes to another out_dir."""
    if s.init_from not in ("scratch", "resume"):
        check_checkpoint(s.init_from)
    if s.push_to_hub:
        check_repo_id(s.hub_model_id or os.path.basename(os.path.normpath(s.out_dir)),
                      default_from="" if s.hub_model_id else "out_dir's name")
    if s.init_from != "resume" and not s.eval_only and state_dirs(s.out_dir):
        raise UserError(f"{s.out_dir} holds the resumable states of an earlier run: continue it with "
                        f"--init_from=resume, or start the new run in another --out_dir (or delete "
                        f"{os.path.join(s.out_dir, 'state')})")


def make_accelerator(s: TrainSettings) -> tuple[Accelerator, str]:
    device_type = resolve_device_type(s.device)
    if ":" in s.device:  # one process (see resolve_device_type): the current device is the one accelerate uses
        torch.cuda.set_device(s.device)
    if s.threads:  # on a machine shared with other jobs, fewer threads than cores can be much faster
        torch.set_num_threads(s.threads)
    if device_type == "cpu":
        keep_freed_memory()  # a quarter of a CPU step was page faults
    else:  # as nanoGPT: float32 matmuls on tensor cores
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    trackers = [t for t in s.log_with.split(",") if t]
    if s.wandb_log and "wandb" not in trackers:  # nanoGPT's switch
        trackers.append("wandb")
    for t in trackers:  # accelerate skips a tracker that is not installed, silently
        if t not in ("wandb", "tensorboard") or not importlib.util.find_spec(t):
            raise UserError(f"log_with: the tracker '{t}' is unknown or not installed: use wandb and/or tensorboard "
                            f"(pip install {t})")
    several = int(os.environ.get("WORLD_SIZE", "1")) > 1  # a backend given to one process looks for a group
    handlers = [InitProcessGroupKwargs(backend=s.backend)] if s.backend != "auto" and several else []
    # dynamo_backend "no": the compile setting alone decides (an `accelerate config` with dynamo compiled twice)
    accelerator = Accelerator(cpu=device_type == "cpu", log_with=trackers or None, project_dir=s.out_dir,
                              mixed_precision=resolve_mixed_precision(s.dtype, device_type),
                              kwargs_handlers=handlers, dynamo_backend="no")
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        raise UserError("DeepSpeed is not supported: its engine steps the optimizer and clips gradients itself; use "
                        "FSDP or DDP (accelerate config)")
    if s.optimizer == "muon" and accelerator.distributed_type == DistributedType.FSDP:
        raise UserError("optimizer=muon does not work under FSDP: a sharded matrix cannot be orthogonalised shard by "
                        "shard; use DDP, or --optimizer=adamw")
    if s.optimizer == "muon" and accelerator.mixed_precision == "fp16":  # the loss scaler would unscale Muon's twice
        raise UserError("optimizer=muon does not work with float16 loss scaling: use --dtype=bfloat16 or float32")
    return accelerator, device_type


def resolve_dataset(dataset: str, data_dir: str, accelerator) -> str:
    """The prepared folder for `dataset` (a path, or a name under data_dir); the embedded corpora are prepared on
    first use, by the main process."""
    path = dataset if os.path.exists(dataset) or os.sep in dataset else os.path.join(data_dir, dataset)
    embedded = EMBEDDED_DATASETS.get(os.path.basename(os.path.normpath(dataset)))
    with accelerator.main_process_first():
        if embedded and accelerator.is_main_process and not os.path.isfile(os.path.join(path, "meta.json")):
            from .data import PrepareSettings, prepare

            prepare(PrepareSettings(source=embedded[0], tokenizer=embedded[1], out=path))
    return path


def open_data(s: TrainSettings, accelerator) -> tuple[list, dict[str, Mixture]]:
    """The prepared folders of s.dataset (several for a mixture, of one tokenizer) and each split as a Mixture."""
    from .tokenization import same_vocabulary

    mixture = parse_mixture(s.dataset)
    sources = [open_dataset(resolve_dataset(path, s.data_dir, accelerator)) for path in mixture]
    for other in sources[1:]:
        if not same_vocabulary(sources[0].tokenizer(), other.tokenizer()):
            raise UserError(f"dataset: {sources[0].path} and {other.path} were prepared with different tokenizers "
                            f"(their ids mean other tokens): prepare {other.path} again with "
                            f"--tokenizer={sources[0].path}")
    names = [os.path.basename(os.path.normpath(path)) for path in mixture]
    return sources, {split: Mixture([d.stream(split) for d in sources], list(mixture.values()), names)
                     for split in ("train", "val")}


def derive_batch(s: TrainSettings, processes: int) -> TrainSettings:
    """gradient_accumulation_steps from total_batch_size when it is set; the step's rows must split over processes."""
    if s.total_batch_size:
        micro = s.batch_size * s.block_size  # tokens per micro-batch
        if s.total_batch_size % micro:
            raise UserError(f"total_batch_size {s.total_batch_size:,} is not a multiple of batch_size x block_size "
                            f"({s.batch_size} x {s.block_size} = {micro:,}): change one of them")
        s = dataclasses.replace(s, gradient_accumulation_steps=s.total_batch_size // micro)
    if s.rows_per_step % processes:
        raise UserError(f"batch_size x gradient_accumulation_steps ({s.rows_per_step}) must be divisible by the "
                        f"number of processes ({processes})")
    return s


def check_same_tokenizer(theirs, data, name: str, folder: str, appended: bool = False) -> None:
    """Finetuning and resuming: the dataset's ids must mean what the checkpoint's ids mean (the same vocabulary; when
    finetuning, `appended`, it may have tokens appended: a chat template's)."""
    from .tokenization import extends, same_vocabulary, tokenizer_kind

    same = extends if appended else same_vocabulary
    if theirs is None or same(data.tokenizer(), theirs):  # None: saved without its tokenizer, nothing to compare
        return
    kind = tokenizer_kind(theirs)
    fix = f"prepare the dataset with --tokenizer={'gpt2' if kind == 'gpt2' else folder}"
    if kind != data.tokenizer_kind:
        raise UserError(f"{name} uses the {kind} tokenizer but dataset {data.path} was prepared with "
                        f"{data.tokenizer_kind}: {fix}")
    raise UserError(f"{name} and dataset {data.path} have different {kind} vocabularies ({len(theirs)} and "
                    f"{data.vocab_size} tokens; the same ids would mean other text): {fix}")


def build_model(s: TrainSettings, state: str | None, data, explicit: dict, log) -> tuple[NanoGPTForCausalLM,
                                                                                        TrainSettings]:
    """The model for init_from: scratch (shaped by the settings and the dataset's vocabulary), resume (the state's
    config), or a checkpoint (finetuning or evaluating, at its own block size unless block_size is given: then
    cropped). The settings then describe the model built; an architecture setting given explicitly that a resumed or
    finetuned model does not have is refused, not ignored."""
    from transformers import AutoTokenizer

    if s.init_from == "scratch":
        eot = data.meta["eot_token"]
        return NanoGPTForCausalLM(NanoGPTConfig(
            **{k: getattr(s, k) for k in ARCHITECTURE}, vocab_size=data.model_vocab_size, dropout=s.dropout,
            bos_token_id=eot, eos_token_id=eot)), s
    if s.init_from == "resume":
        check_same_tokenizer(AutoTokenizer.from_pretrained(state), data, f"the run in {s.out_dir}", state)
        model = NanoGPTForCausalLM(NanoGPTConfig.from_pretrained(state, dropout=s.dropout))
    else:
        model, tokenizer = load_pretrained(s.init_from, dropout=s.dropout)
        check_same_tokenizer(tokenizer, data, f"init_from '{s.init_from}'", s.init_from, appended=True)
        if data.vocab_size > model.config.vocab_size:  # tokens appended to its vocabulary (a chat template's)
            log(f"{s.init_from}: the embeddings grow from {model.config.vocab_size} to {data.model_vocab_size} "
                "tokens, the new rows initialised as the model's own")
            model.resize_token_embeddings(data.model_vocab_size, mean_resizing=False)
        block_size = explicit.get("block_size", model.config.block_size)
        if block_size > model.config.block_size:
            raise UserError(f"block_size {block_size} is larger than the checkpoint's {model.config.block_size}: "
                            f"use --block_size={model.config.block_size} or less")
        if block_size < model.config.block_size:
            log(f"cropping {s.init_from} from block_size {model.config.block_size} to {block_size}")
            model.crop_block_size(block_size)
    k = next((k for k in ARCHITECTURE if k in explicit and explicit[k] != getattr(model.config, k)), None)
    if k:  # a setting the model cannot follow is refused, not ignored
        raise UserError(f"init_from={s.init_from}: its model has {k}={getattr(model.config, k)!r}, which this run "
                        f"keeps; to train with {k}={explicit[k]!r}, start a new run from scratch")
    return model, dataclasses.replace(s, **{k: getattr(model.config, k) for k in ARCHITECTURE})


# ---- the run ----------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Run:
    """What the loop works with, built once by setup(); only the counters below the line change."""

    s: TrainSettings
    accelerator: Accelerator
    model: torch.nn.Module  # prepared (DDP/FSDP) and maybe compiled: what steps and evaluations call
    raw: NanoGPTForCausalLM  # the model itself
    optimizers: list[torch.optim.Optimizer]  # [AdamW] or [AdamW, Muon]
    streams: dict
    tokenizer: object
    ckpt: Checkpointer
    record: dict  # what this run is on record: settings, recipes (a resume keeps its base model and recipe)
    card: dict
    metrics: MetricsLog | None = None
    pusher: HubPusher | None = None
    peak: float | None = None
    tasks: Tasks | None = None  # lm-evaluation-harness's tasks, loaded once
    # ----
    step: int = 0
    best_val_loss: float = math.inf
    best_step: int = 0
    tokens_seen: int = 0
    source_tokens: collections.Counter = dataclasses.field(default_factory=collections.Counter)  # of a mixture's
    evaluated: bool = False  # resumed from a state saved right after this step's evaluation: not done again
    first_step: int = 0
    last_log: int = 0
    t_log: float = 0.0
    paused: float = 0.0  # seconds of evaluating and saving since the last log line (ms/iter leaves them out)
    t_start: float = dataclasses.field(default_factory=time.perf_counter)
    mfu: float = -1.0


def setup(s: TrainSettings, explicit: dict, recipes: list[str]) -> Run:
    check_settings(s)
    notes, state = [], None
    if s.init_from == "resume":
        s, state, notes = resume_settings(s, explicit, s.out_dir)
    check_start(s)
    accelerator, device_type = make_accelerator(s)
    if not s.eval_only:
        check_shared_out_dir(accelerator, s.out_dir)
    for note in notes:
        accelerator.print(note)
    sources, streams = open_data(s, accelerator)
    data = sources[0]  # of a mixture: the first source (they share one tokenizer)
    set_seed(s.seed)  # the same initial weights on every process
    model, s = build_model(s, state, data, explicit, accelerator.print)
    s = derive_batch(s, accelerator.num_processes)
    for d in sources:
        check_compatible(d.meta, model.config.vocab_size, s.block_size,
                         vocab_fix="train on a dataset prepared with the model's tokenizer")
    generation_ends(model, data.tokenizer())
    model.set_attn_implementation(training_attention(device_type, accelerator.mixed_precision))  # not saved
    prepared, optimizers = prepare_model(accelerator, model, configure_optimizers(model.train(), s, device_type))
    compiled = s.compile if s.compile is not None else compile_by_default(device_type)
    # compiled after prepare: states hold the plain keys and resume with compile on or off
    record = dict(settings=dataclasses.asdict(s), recipes=recipes)
    tokenizer = data.tokenizer()
    tokenizer.model_max_length = s.block_size  # tok(text, truncation=True) then gives what the model accepts
    run = Run(s, accelerator, torch.compile(prepared) if compiled else prepared, model, optimizers,
              streams, tokenizer,
              Checkpointer(accelerator, s.out_dir, s.keep_states), record, {})
    if s.eval_tasks:  # before training, so that a bad name or file is refused at once; datasets downloaded once
        with accelerator.main_process_first():
            run.tasks = Tasks(load_tasks(s.eval_tasks))
            run.tasks.build(tokenizer, s.eval_tasks_limit)
    if state:
        resume(run, state, device_type)
    else:
        torch.manual_seed(s.seed + accelerator.process_index)  # dropout differs per process, as in nanoGPT
    accelerator.print(f"model: {model.get_num_params() / 1e6:.2f}M parameters; device {accelerator.device}, "
                      f"{accelerator.num_processes} process(es), mixed precision {accelerator.mixed_precision}, "
                      f"compile {compiled}\ndata: {describe(streams['train'], sources, s.block_size)} "
                      f"({data.tokenizer_kind}, vocab {data.vocab_size}); "
                      f"tokens per iteration: {s.tokens_per_step:,} = "
                      f"{s.batch_size} batch x {s.gradient_accumulation_steps} micro-batches x {s.block_size} block"
                      + (" (micro-batches from total_batch_size)" if s.total_batch_size else ""))
    if not s.eval_only:
        start_records(run, sources)
    return run


def describe(mix: Mixture, sources: list, block_size: int) -> str:
    """"data/web" or "data/web x0.70 + data/code x0.30"; conversations: how many, and how many are cut."""
    names = [d.path if len(sources) == 1 else f"{d.path} x{w:.2f}" for d, w in zip(sources, mix.weights)]
    for i, stream in enumerate(mix.streams):
        if isinstance(stream, Conversations):
            cut = int((np.diff(stream.starts) > block_size + 1).sum())
            names[i] += f" ({len(stream):,} conversations, {cut:,} longer than block_size + 1: cut)"
    return " + ".join(names)


def generation_ends(model, tokenizer) -> None:
    """Generation stops at eos, and at the end of an assistant's turn when the tokenizer has our chat template."""
    turn = [tokenizer.convert_tokens_to_ids(END_OF_TURN)] if tokenizer.chat_template == CHAT_TEMPLATE else []
    eos = [i for i in (model.config.eos_token_id, *turn) if i is not None]
    model.generation_config.bos_token_id = model.config.eos_token_id
    model.generation_config.eos_token_id = eos[0] if len(eos) == 1 else eos or None


def resume(run: Run, state: str, device_type: str) -> None:
    """Weights, optimizer, every RNG and the counters from a state; what the run is on record stays the original."""
    hyper = [[{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups] for opt in run.optimizers]
    run.ckpt.load_state(state)
    for opt, groups in zip(run.optimizers, hyper):  # the settings' weight decay, betas...: a resume may change them
        for group, values in zip(opt.param_groups, groups):
            group.update(values)
    ts = read_trainer_state(state)
    run.step = run.first_step = run.last_log = ts["step"]
    run.best_val_loss, run.tokens_seen, run.evaluated = ts["best_val_loss"], ts["tokens_seen"], ts["evaluated"]
    run.source_tokens.update(ts.get("source_tokens", {}))
    run.best_step = ts.get("best_step", run.step)  # states saved before best_step was recorded
    run.record = dict(settings={**run.record["settings"], "init_from": ts["settings"]["init_from"]},
                      recipes=ts["recipes"])
    log = run.accelerator.print
    log(f"resumed from {state} at step {run.step} (best val loss {run.best_val_loss:.4f})")
    if ts["settings"]["dataset"] != run.s.dataset and not run.s.eval_only:  # a new phase: val measures other data
        run.best_val_loss = math.inf
        log("the dataset changed: the best val loss starts again with this phase")
    if run.accelerator.is_main_process and not run.s.eval_only:
        run.ckpt.prune()  # a run killed between saving a state and pruning the old ones left one too many
    if run.step >= run.s.max_iters and not run.s.eval_only:
        log(f"nothing to train: the state is at step {run.step} and max_iters is {run.s.max_iters} (resume with a "
            f"larger --max_iters to train on)")
    if (ts["world_size"], ts["device_type"]) != (run.accelerator.num_processes, device_type):
        log(f"note: the state was saved by {ts['world_size']} {ts['device_type']} process(es): this run continues "
            "with the same batches, but dropout is drawn per process and device: not bit-exactly")


def start_records(run: Run, sources: list) -> None:
    """Trackers, train_config.yaml, metrics.jsonl, the model card's facts and the Hub pusher."""
    s, main = run.s, run.accelerator.is_main_process
    settings = run.record["settings"]
    if run.accelerator.log_with:
        try:
            run.accelerator.init_trackers(s.wandb_project, config=settings,
                                          init_kwargs={"wandb": {"name": s.wandb_run_name}})
        except Exception as exc:  # wandb not logged in, no network, ...: its own message names the fix
            raise UserError(f"cannot start the tracker: {first_line(exc)} (or: WANDB_MODE=offline)") from None
    if main:
        os.makedirs(s.out_dir, exist_ok=True)
        save_yaml(settings, os.path.join(s.out_dir, "train_config.yaml"))
        run.metrics = MetricsLog(os.path.join(s.out_dir, "metrics.jsonl"), resume_step=run.step or None)
        hub_id = s.hub_model_id or os.path.basename(os.path.normpath(s.out_dir))
        run.pusher = HubPusher(hub_id, private=s.hub_private, strategy=s.hub_strategy) if s.push_to_hub else None
    paths = {f.name for f in dataclasses.fields(TrainSettings) if f.metadata["path"]}
    card = {k: public(v) if k in paths else v for k, v in settings.items()}  # published: no local paths
    init_from, chat = card["init_from"], sources[0].meta.get("chat")  # a chat model's card says so
    run.card = {"settings": card, "dataset": ", ".join(public(d.meta.get("source")) for d in sources),
                "source": chat_source(init_from) if chat else None, "tags": ["chat"] if chat else [],
                "datasets": [d.meta["hub_id"] for d in sources if d.meta.get("hub_id")],
                "repo_id": s.hub_model_id or None, "recipe": ", ".join(run.record["recipes"]) or None,
                "base_model": init_from if init_from not in ("scratch", "resume") else None}
    run.peak = peak_flops(run.accelerator.device, run.accelerator.mixed_precision)
    run.t_log = time.perf_counter()


def chat_source(init_from: str) -> str:  # the model card's sentence on a chat model
    base = "trained from scratch" if init_from == "scratch" else f"finetuned from {init_from}"
    return f"A chat model, {base} on conversations: the loss on the assistant's turns only."


def public(value: str | None) -> str | None:
    """A local path (or a mixture's) as the model card publishes it: last names only (Hub ids, scratch or gpt2 as
    they are)."""
    if not value or is_hub_id(value):
        return value
    return ",".join(os.path.basename(os.path.normpath(part)) for part in value.split(","))


def report(run: Run, event: dict, line: str, progress) -> None:
    """One event to metrics.jsonl, the console and the trackers."""
    if run.metrics is not None:
        run.metrics.write(event)
        progress.write(line)
    if run.accelerator.log_with:
        run.accelerator.log({f"{event['type']}/{k}": v for k, v in event.items() if k not in ("type", "iter")},
                            step=event["iter"])


def evaluate(run: Run) -> dict:
    """What an evaluation measures: the mean loss of each split (nanoGPT's eval step), and the harness's tasks when
    set: eval_tasks_limit documents each, eval_tasks_final_limit after the last step."""
    s = run.s
    losses = estimate_loss(run.model, run.streams, s, run.accelerator)
    if not all(math.isfinite(v) for v in losses.values()):
        raise non_finite(losses["val"], run.step, s.out_dir)
    limit = s.eval_tasks_final_limit if run.step >= s.max_iters and not s.eval_only else s.eval_tasks_limit
    tasks = score_tasks(run.model, run.tokenizer, run.tasks, run.accelerator, limit) if run.tasks else None
    return {**losses, "tasks": tasks}


def eval_lines(m: dict) -> list[str]:
    """The losses (with their perplexity; a mixture's: weighted means, then each source's), then a line per task as the
    harness names its figures, and the core."""
    ppl = {k: perplexity([m[k]], [1]) for k in ("train", "val")}
    lines = [f"train loss {m['train']:.4f} (perplexity {ppl['train']:.2f}), val loss {m['val']:.4f} "
             f"(perplexity {ppl['val']:.2f})"]
    if sources := [k.partition("/")[2] for k in m if k.startswith("val/")]:
        lines.append("by source: " + ", ".join(f"{n} train {m['train/' + n]:.4f} val {m['val/' + n]:.4f}"
                                               for n in sources))
    return lines + (task_lines(m["tasks"]) if m["tasks"] else [])


def report_eval(run: Run, m: dict, progress) -> None:
    """An evaluation to metrics.jsonl, the console, the trackers and loss.png."""
    event = {"type": "eval", "iter": run.step, "train_loss": m["train"], "val_loss": m["val"],
             "train_ppl": perplexity([m["train"]], [1]), "val_ppl": perplexity([m["val"]], [1]),
             "tokens": run.tokens_seen, **task_events(m["tasks"])}
    by_source = {k.replace("/", "_loss/"): v for k, v in m.items() if "/" in k}  # val_loss/NAME
    if by_source:
        event |= by_source | {f"tokens/{name}": run.source_tokens[name] for name in run.streams["train"].names}
    report(run, event, f"step {run.step}: " + ", ".join(eval_lines(m)), progress)
    if run.metrics is not None:
        plot_losses(run.metrics.path, os.path.join(run.s.out_dir, "loss.png"))


def save(run: Run, m: dict, progress) -> None:
    """The model if it is the best so far (or at every evaluation, with always_save_checkpoint), pushed to the Hub as
    hub_strategy says, and a resumable state."""
    s, improved = run.s, m["val"] < run.best_val_loss
    if improved:  # best_val_loss only ever improves
        run.best_val_loss, run.best_step = m["val"], run.step
    if improved or s.always_save_checkpoint:
        run.card.update(steps=run.step, tokens_seen=run.tokens_seen, train_loss=m["train"], val_loss=m["val"],
                        best_val_loss=run.best_val_loss, tasks=m["tasks"])
        run.ckpt.save_model(run.model, run.tokenizer, run.card)
        if run.metrics is not None:  # nanoGPT says so too
            progress.write(f"saved the model to {s.out_dir}")
        if run.pusher:  # uploads in the background; a failure prints one line and training goes on
            run.pusher.on_save(s.out_dir, f"step {run.step}: val loss {m['val']:.4f}", improved)
    save_state(run, evaluated=True)


def save_state(run: Run, evaluated: bool) -> str:
    return run.ckpt.save_state({
        "step": run.step, "best_val_loss": run.best_val_loss, "best_step": run.best_step,
        "tokens_seen": run.tokens_seen, "source_tokens": dict(run.source_tokens), "evaluated": evaluated,
        **run.record, "world_size": run.accelerator.num_processes, "device_type": run.accelerator.device.type},
        run.raw.config, run.tokenizer)


def log_step(run: Run, loss: torch.Tensor, grad_norm: torch.Tensor, lrs: list[float], progress) -> None:
    """The log line: loss and the gradient's norm (the only per-log device sync), lr, time per step, tokens/s, MFU
    after 5 warm-up steps."""
    s, acc = run.s, run.accelerator
    loss, grad_norm = acc.reduce(loss, reduction="mean").item(), grad_norm.item()  # the norm: the same on every rank
    if not math.isfinite(loss):
        raise non_finite(loss, run.step, s.out_dir)
    now = time.perf_counter()
    dt = (now - run.t_log - run.paused) / (run.step - run.last_log)
    warm = run.last_log - run.first_step >= 5  # as nanoGPT: MFU leaves out the first steps (warm-up, compile)
    run.t_log, run.paused, run.last_log = now, 0.0, run.step
    clipped = 0 < s.grad_clip < grad_norm
    event = {"type": "train", "iter": run.step, "loss": loss, "grad_norm": grad_norm, "clipped": clipped,
             "lr": lrs[0], "ms_per_iter": dt * 1000, "tokens_per_s": s.tokens_per_step / dt}
    if len(lrs) > 1:  # Muon's, beside AdamW's
        event["muon_lr"] = lrs[1]
    if run.peak and warm:
        mfu = estimate_mfu(run.raw, s.rows_per_step // acc.num_processes, s.block_size, dt, run.peak)
        run.mfu = event["mfu"] = mfu if run.mfu < 0 else 0.9 * run.mfu + 0.1 * mfu
    mfu_text = f", mfu {run.mfu * 100:.2f}%" if run.mfu >= 0 else ""
    report(run, event, f"iter {run.step}: loss {loss:.4f}, norm {grad_norm:.2f}{' (clipped)' * clipped}, "
                       f"lr {lrs[0]:.2e}, time {dt * 1000:.2f}ms, {s.tokens_per_step / dt:,.0f} tok/s{mfu_text}",
           progress)
    progress.set_postfix(loss=f"{loss:.4f}")


def train(s: TrainSettings, explicit: dict | None = None, recipes: list[str] = ()) -> int:
    """Train (or evaluate once with eval_only). explicit: the settings the user gave (a resume keeps the rest)."""
    run = setup(s, explicit or {}, list(recipes))
    s, acc = run.s, run.accelerator
    if s.eval_only:
        with own_work():
            acc.print("eval: " + "\n".join(eval_lines(evaluate(run))))  # and a line per task
        end_training(acc)
        return 0
    exit_code = 0
    quiet = not acc.is_main_process or not sys.stderr.isatty()  # a log file gets the log lines, not bar redraws
    with own_work(), StopSignals(acc) as stop, tqdm(total=s.max_iters, initial=run.step, desc="training",
                                                    disable=quiet, dynamic_ncols=True) as progress:
        while True:
            # evaluate (and save) at every eval_interval and after the last step
            if (run.step % s.eval_interval == 0 or run.step == s.max_iters) and not run.evaluated:
                t0, measured = time.perf_counter(), evaluate(run)
                report_eval(run, measured, progress)
                if run.step > 0 or s.max_iters == 0:  # step 0 only reports the starting model
                    save(run, measured, progress)
                run.paused += time.perf_counter() - t0  # ms/iter leaves out evaluating and saving
            run.evaluated = False
            if run.step >= s.max_iters:
                break
            lrs = learning_rates(s, run.step)
            batches = micro_batches(run.streams["train"], s, run.step, acc.process_index, acc.num_processes,
                                    acc.device)
            loss, grad_norm = train_step(acc, run.model, run.optimizers, batches, lrs, s.grad_clip)
            run.source_tokens.update(run.streams["train"].tokens(s.seed, run.step, s.gradient_accumulation_steps,
                                                                 s.batch_size, s.block_size))
            run.step += 1
            run.tokens_seen += s.tokens_per_step
            progress.update(1)
            if run.step % s.log_interval == 0 or run.step == s.max_iters:
                log_step(run, loss, grad_norm, lrs, progress)
                if acc.check_trigger():  # SIGINT/SIGTERM on any process, agreed at log steps
                    exit_code = stop_and_save(run, stop)
                    break
    if run.pusher:
        run.pusher.finish(s.out_dir, f"end of training, step {run.step}")
    end_training(acc)
    if exit_code == 0 and acc.is_main_process and s.sample_at_end:
        print_sample(s.out_dir, device=acc.device.type)
    if exit_code == 0 and acc.is_main_process:
        summary(run)
    return exit_code


def summary(run: Run) -> None:
    """The run in one line: best val loss and its step, time, throughput, where the model and its curve are."""
    seconds = time.perf_counter() - run.t_start
    tokens = (run.step - run.first_step) * run.s.tokens_per_step
    print(f"done: best val loss {run.best_val_loss:.4f} at step {run.best_step}; {run.step - run.first_step} steps in "
          f"{seconds:.1f} s ({tokens / seconds:,.0f} tokens/s); the model is in {run.s.out_dir}, its loss curve in "
          f"{os.path.join(run.s.out_dir, 'loss.png')}")


class StopSignals:
    """SIGINT / SIGTERM set accelerate's trigger; the loop checks it at log steps, saves a state and exits. A second
    signal ends the process at once, wherever it is: inside one long torch call Python's handlers never run, so a
    thread of its own counts the signals as they arrive (Python's wakeup fd). What is on disk stays intact: every
    save is atomic."""

    def __init__(self, accelerator):
        self.accelerator, self.signal, self.previous = accelerator, None, {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self.previous[sig] = signal.signal(sig, self.handle)
        self.wakeup, writer = socket.socketpair()
        writer.setblocking(False)
        self.previous_fd = signal.set_wakeup_fd(writer.detach(), warn_on_full_buffer=False)
        self.watcher = threading.Thread(target=self.watch, daemon=True)
        self.watcher.start()
        return self

    def watch(self) -> None:
        """Each signal's number, as it arrives (on this thread; the main one may be busy): the second ends the run."""
        seen = 0
        while number := self.wakeup.recv(1):
            seen += number[0] in self.previous
            if seen == 2:
                print(f"\n{signal.Signals(number[0]).name} received again: stopping now", file=sys.stderr, flush=True)
                os._exit(128 + number[0])  # as the shell reports a process ended by that signal
        self.wakeup.close()

    def handle(self, signum, frame):
        self.signal = signum
        self.accelerator.set_trigger()
        print(f"\n{signal.Signals(signum).name} received: stopping at the next log step and saving a state (send it "
              "again to stop at once, without saving)", file=sys.stderr, flush=True)

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        os.close(signal.set_wakeup_fd(self.previous_fd))  # the watcher's recv then ends
        self.watcher.join()  # before the interpreter's shutdown, which a running thread can abort
        return False


def stop_and_save(run: Run, stop: StopSignals) -> int:
    """After a stop request: a resumable state at this step, how to resume, the exit code."""
    path = save_state(run, evaluated=False)
    world = run.accelerator.num_processes
    name = signal.Signals(stop.signal).name if stop.signal else "a signal"
    run.accelerator.print(f"\nstopped by {name} after step {run.step}; state saved in {path}. Resume with: python "
                          f"train.py --out_dir={run.s.out_dir} --init_from=resume"
                          + (f" (under accelerate launch, {world} processes)" if world > 1 else ""))
    return 130 if stop.signal == signal.SIGINT else 143


def non_finite(loss: float, step: int, out_dir: str) -> UserError:
    last = latest_state(out_dir)
    where = (f"the last good checkpoint ({os.path.relpath(last, out_dir)} in {out_dir}) is intact: resume from it with "
             "--init_from=resume and a lower --learning_rate" if last else "no checkpoint was saved yet: start again "
             "with a lower --learning_rate")
    return UserError(f"the loss became non-finite ({loss}) at step {step}; {where}")


def end_training(accelerator) -> None:
    """accelerator.end_training, without torch's gloo shutdown deadlock (pytorch/pytorch#75097): a barrier, then a
    pause without the GIL, lets the group's worker threads finish before its destructor joins them."""
    if accelerator.num_processes > 1:
        accelerator.wait_for_everyone()
        time.sleep(0.2)
    accelerator.end_training()


def print_sample(out_dir: str, max_new_tokens: int = 300, device: str = "cpu") -> None:
    """A short sample from the saved model, loaded back from disk: proof that the checkpoint works."""
    from .sampling import generate_text

    model, tokenizer = load_pretrained(out_dir)
    if tokenizer.chat_template:  # a chat model
        print(f"chat with it: python sample.py --out_dir={out_dir} --chat")
        return
    start = "\n" if tokenizer("\n")["input_ids"] else tokenizer.decode([0])  # a corpus without newlines
    text = generate_text(model.to(device), tokenizer, start, max_new_tokens=max_new_tokens, stop_at_eot=True)
    print(f"---------- sample from {out_dir} ----------{text}\n" + "-" * 40)


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    # no recipe: the demo's values are the defaults (not explicit settings: a resume keeps its saved ones)
    s, explicit = parse_command(TrainSettings, args, "train.py", DESCRIPTION, recipes=True,
                                default_recipe=DEFAULT_RECIPE)
    recipes = [os.path.basename(a) for a in args if a.endswith(RECIPE_SUFFIXES)]  # none: defaults and flags
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one bar (training) and its log lines, no "Writing model shards" per save
    logging.getLogger("accelerate.utils.other").setLevel(logging.ERROR)  # "removed shared tensor": re-tied on load
    try:
        return train(s, explicit, recipes)
    except (MemoryError, RuntimeError) as exc:  # torch's out-of-memory errors: a GPU's, or a CPU allocation's
        if not isinstance(exc, (MemoryError, torch.OutOfMemoryError)) and "can't allocate memory" not in str(exc):
            raise
        raise UserError(f"a micro-batch of batch_size {s.batch_size} x block_size {s.block_size} does not fit in "
                        f"memory: lower batch_size or block_size (raise gradient_accumulation_steps to keep the "
                        f"tokens per step); the last checkpoint in {s.out_dir} is intact") from None
