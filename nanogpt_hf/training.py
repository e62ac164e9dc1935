"""The accelerate training loop: set up -> step -> evaluate -> save.

nanoGPT's train.py, with accelerate doing the engineering (devices, DDP, mixed precision, state saving) and
without nanoGPT's known defects: exactly max_iters steps, a final save, best_val_loss that only improves,
eval_only on resume, exact resume (batches are a function of (seed, step, index); RNG and optimizer are saved).
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import errno
import importlib.util
import math
import os
import shutil
import signal
import sys
import time
from typing import Iterable

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, InitProcessGroupKwargs, set_seed
from safetensors import SafetensorError
from tqdm.auto import tqdm
from transformers import AutoConfig

from .checkpoint import (STATE_DIR, discard_states, latest_state, load_state, prune_states, read_trainer_state,
                         save_model_folder, save_state, state_dirs, tokenizer_folder)
from .configuration_nanogpt import NanoGPTConfig
from .data import check_compatible, eval_batch, open_dataset, sample_batch
from .errors import UserError, first_line
from .hardware import (compile_by_default, keep_freed_memory, peak_flops, resolve_device_type,
                       resolve_mixed_precision, training_attention)
from .hub import HubPusher, check_repo_id, write_model_card
from .metrics import MetricsLog, perplexity, plot_losses
from .modeling_nanogpt import NanoGPTForCausalLM
from .settings import TrainSettings, parse_command, save_yaml


def get_lr(it: int, learning_rate: float, min_lr: float, warmup_iters: int, lr_decay_iters: int,
           decay_lr: bool = True) -> float:
    """nanoGPT's schedule: linear warmup, cosine decay to min_lr at lr_decay_iters, then min_lr."""
    if not decay_lr:
        return learning_rate
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    if it > lr_decay_iters:
        return min_lr
    decay_ratio = (it - warmup_iters) / max(1, lr_decay_iters - warmup_iters)
    coeff = 0.5 * (1.0 + math.cos(math.pi * decay_ratio))  # 1 -> 0
    return min_lr + coeff * (learning_rate - min_lr)


def prepare_model(accelerator, model, optimizer):
    """accelerator.prepare, without the wrapper it puts around the model's forward for mixed precision: that wrapper
    also copies every output to float32, and the loss is already float32 inside the model, so the (B, T, vocab) logits
    copy was pure cost (2.5 GB written per GPT-2 124M micro-batch; on an H200 our step was 3.5% slower than a plain
    PyTorch one compiled, 5% eager). Every forward of training and evaluation runs under accelerator.autocast()."""
    model, optimizer = accelerator.prepare(model, optimizer)
    inner = accelerator.unwrap_model(model)  # (DDP, FSDP1 unwrapped) what accelerate patched, if it did
    if inner.__dict__.pop("_original_forward", None) is not None:
        # the class's forward again; accelerate's own unwrap (keep_fp32_wrapper=False) also peels the model's
        # decorators (can_return_tuple: return_dict=False then failed)
        inner.__dict__.pop("forward", None)
    return model, optimizer


def train_step(accelerator, model, optimizer, micro_batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
               lr: float, grad_clip: float) -> torch.Tensor:
    """One optimizer step over this process's micro-batches (x, y), nanoGPT style.

    The loss of each micro-batch is divided by their number, so the gradient is that of the mean over all of them
    (and, after DDP's all-reduce average, over all processes). Gradients are synchronised only on the last
    micro-batch. Returns the mean loss of this process's micro-batches, detached, without a device sync.
    """
    micro_batches = list(micro_batches)
    n = len(micro_batches)
    for group in optimizer.param_groups:
        group["lr"] = lr  # set by hand: a prepared scheduler would step once per process
    total = torch.zeros((), device=accelerator.device)
    for i, (x, y) in enumerate(micro_batches):
        sync = i == n - 1
        with accelerator.no_sync(model) if not sync else contextlib.nullcontext(), accelerator.autocast():
            loss = model(input_ids=x, shift_labels=y, use_cache=False).loss / n
        accelerator.backward(loss)
        total += loss.detach()
    if grad_clip > 0.0:
        accelerator.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return total



# ---- set up -----------------------------------------------------------------------------------------------------

EMBEDDED_DATASETS = {"shakespeare_char": "char", "shakespeare": "gpt2"}  # prepared from the shipped corpus on use
INIT_FROM_NAMES = ("scratch", "resume", "gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")
ARCHITECTURE = ("n_layer", "n_head", "n_embd", "block_size", "bias", "dataset")
DESCRIPTION = """Train a GPT (nanoGPT's train.py on accelerate). Settings come from nanoGPT's defaults (its GPT-2 124M
run), then RECIPE.yaml files, then --key=value overrides. With no recipe, default.yaml (the shakespeare_char_cpu
demo on the shipped corpus) is the recipe: the defaults below are its values.
Tokens per optimizer step = batch_size x gradient_accumulation_steps x block_size, whatever the number of
processes (each of N processes runs gradient_accumulation_steps / N micro-batches, as in nanoGPT)."""
DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG)
DEFAULT_RECIPE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "recipes", "default.yaml")


def dataset_path(dataset: str, data_dir: str) -> str:
    """A dataset setting as a path: itself where it exists or has a slash, else a name under data_dir."""
    return dataset if os.path.exists(dataset) or os.sep in dataset else os.path.join(data_dir, dataset)


def same_folder(a: str, b: str) -> bool:
    return os.path.realpath(a) == os.path.realpath(b)


def resolve_dataset(s: TrainSettings, accelerator) -> str:
    """The prepared folder for s.dataset; the embedded corpora are prepared on first use (by the main process)."""
    path = dataset_path(s.dataset, s.data_dir)
    name = os.path.basename(os.path.normpath(s.dataset))
    if not os.path.isfile(os.path.join(path, "meta.json")) and name in EMBEDDED_DATASETS:
        with accelerator.main_process_first():
            if accelerator.is_main_process:
                from .data import PrepareSettings, prepare

                prepare(PrepareSettings(source="shakespeare", tokenizer=EMBEDDED_DATASETS[name], out=path))
    if not os.path.exists(path):  # a corpus file or folder that is not prepared: open_dataset says what to do
        raise UserError(f"dataset '{s.dataset}' not found (looked for {path}); prepare it first: "
                        f"python prepare.py SOURCE --out {path}")
    return path


def load_init_model(s: TrainSettings) -> NanoGPTForCausalLM:
    """The model for init_from=scratch | gpt2* | a checkpoint folder or Hub id (resume is handled by the caller)."""
    if s.init_from == "scratch":
        raise AssertionError("scratch models are built from the dataset's vocabulary")
    try:
        config = AutoConfig.from_pretrained(s.init_from)
    except (OSError, ValueError) as exc:
        if not os.path.exists(s.init_from):
            guess = difflib.get_close_matches(s.init_from, INIT_FROM_NAMES, n=1, cutoff=0.7)
            if guess and guess[0] != s.init_from:  # a typo of a name we know beats the Hub's "not found"
                raise UserError(f"init_from '{s.init_from}' is not a folder or a Hub model (did you mean "
                                f"'{guess[0]}'?)") from None
            if s.init_from.startswith((os.sep, ".", "~")) or s.init_from.count("/") > 1:  # a path, not a Hub id
                raise UserError(f"cannot load init_from '{s.init_from}': no such folder") from None
        if os.path.isdir(s.init_from) and not os.path.isfile(os.path.join(s.init_from, "config.json")):
            raise UserError(f"cannot load init_from '{s.init_from}': the folder has no config.json (a checkpoint "
                            "folder is what save_pretrained or train.py's out_dir holds)") from None
        local = os.path.exists(s.init_from)
        offline = os.environ.get("HF_HUB_OFFLINE") and not local
        hint = " (is the Hub reachable? HF_HUB_OFFLINE=1 is set)" if offline else ""
        where = "" if local else "no such local folder, and as a Hub id: "
        raise UserError(f"cannot load init_from '{s.init_from}': {where}{first_line(exc)}{hint}") from None
    try:
        if config.model_type == "gpt2":
            return NanoGPTForCausalLM.from_gpt2(s.init_from, dropout=s.dropout)
        if config.model_type == "nanogpt":
            return NanoGPTForCausalLM.from_pretrained(s.init_from, dropout=s.dropout, dtype=torch.float32)
    except (OSError, ValueError, SafetensorError) as exc:  # missing, truncated or corrupt weights; bad dropout
        raise UserError(f"cannot load init_from '{s.init_from}': {first_line(exc)}") from None
    raise UserError(f"init_from '{s.init_from}' is a {config.model_type!r} model; GPT-2 and nanogpt_hf are supported")


def check_same_tokenizer(init_from: str, data, name: str | None = None) -> None:
    """Finetuning and resuming: the dataset's ids must mean what the checkpoint's ids mean (same tokenizer, same
    characters). name: how messages call the checkpoint (init_from '...' by default)."""
    from transformers import AutoTokenizer

    from .tokenization import tokenizer_kind

    try:
        theirs = AutoTokenizer.from_pretrained(tokenizer_folder(init_from))
        kind = tokenizer_kind(theirs)  # a folder without tokenizer files loads as an empty tokenizer: refused here
        chars = theirs.get_vocab() if kind == "char" else None
    except Exception:  # no usable tokenizer saved (or a damaged one): a GPT-2 checkpoint is taken as GPT-2 BPE
        if AutoConfig.from_pretrained(init_from).model_type != "gpt2":
            return
        kind, chars = "gpt2", None
    name = name or f"init_from '{init_from}'"
    if kind != data.tokenizer_kind:
        raise UserError(f"{name} uses the {kind} tokenizer but dataset {data.path} was prepared with "
                        f"{data.tokenizer_kind}: prepare it with --tokenizer={kind}")
    if chars is not None and chars != data.tokenizer().get_vocab():
        raise UserError(f"{name} and dataset {data.path} have different character vocabularies (the same ids would "
                        "mean other characters): train on a dataset prepared from the same characters")


def scratch_config(s: TrainSettings, vocab_size: int, kind: str) -> NanoGPTConfig:
    # GPT-2 BPE: nanoGPT's 50304 (50257 padded to a multiple of 64: faster matmuls); characters: exactly the corpus'
    if kind == "gpt2":
        vocab_size = max(vocab_size, 50304)
    eos = 50256 if kind == "gpt2" else None
    try:
        return NanoGPTConfig(block_size=s.block_size, vocab_size=vocab_size, n_layer=s.n_layer, n_head=s.n_head,
                             n_embd=s.n_embd, dropout=s.dropout, bias=s.bias, bos_token_id=eos, eos_token_id=eos)
    except ValueError as exc:  # e.g. n_embd not divisible by n_head
        raise UserError(f"impossible model shape: {first_line(exc)}") from None


def check_ranges(s: TrainSettings) -> None:
    """Values no run can use, refused before any work with the setting's name (not a traceback from torch)."""
    for name in ("batch_size", "block_size", "max_iters", "eval_iters", "eval_interval", "log_interval",
                 "gradient_accumulation_steps", "keep_states"):
        at_least = 0 if name in ("max_iters", "keep_states") else 1
        if getattr(s, name) < at_least:
            bound = ">= 0" if at_least == 0 else "positive"
            raise UserError(f"setting '{name}' must be {bound}, got {getattr(s, name)}")
    for name in ("learning_rate", "min_lr", "weight_decay", "grad_clip"):
        if not (math.isfinite(getattr(s, name)) and getattr(s, name) >= 0):
            raise UserError(f"setting '{name}' must be a finite number >= 0, got {getattr(s, name)}")
    for name in ("beta1", "beta2", "dropout"):
        if not 0.0 <= getattr(s, name) < 1.0:
            raise UserError(f"setting '{name}' must be in [0, 1), got {getattr(s, name)}")


def resume_settings(s: TrainSettings, explicit: dict, state_dir: str, log) -> TrainSettings:
    """Settings of a resumed run: the saved ones, with what the user set explicitly. Architecture changes are refused;
    optimisation changes (learning_rate, max_iters, eval_interval, ...) are allowed and announced."""
    saved = TrainSettings(**{k: v for k, v in read_trainer_state(state_dir)["settings"].items()
                             if k in {f.name for f in dataclasses.fields(TrainSettings)}})
    changed = {k: v for k, v in explicit.items() if k not in ("init_from", "out_dir") and getattr(saved, k) != v}
    if "dataset" in changed and same_folder(  # the same folder written another way ('data/x/', a full path, a name)
            dataset_path(changed["dataset"], changed.get("data_dir", saved.data_dir)),
            dataset_path(saved.dataset, saved.data_dir)):
        del changed["dataset"]
    bad = [k for k in changed if k in ARCHITECTURE]
    if bad:
        k = bad[0]
        raise UserError(f"cannot resume with {k}={changed[k]!r}: the run in {s.out_dir} was trained with "
                        f"{k}={getattr(saved, k)!r}; start a new out_dir to change the architecture")
    for k, v in changed.items():
        log(f"resuming with {k} changed: {getattr(saved, k)!r} -> {v!r}")
    return dataclasses.replace(saved, **changed, init_from="resume", out_dir=s.out_dir)


def refuse_to_replace_unfinished(out_dir: str) -> None:
    """A new run in out_dir discards the states there (they would outrank its own): refused while they belong to a run
    that has not reached its max_iters, so that relaunching a recipe without --init_from=resume (or a new run that
    fails at its first step) cannot lose an interrupted run. A finished run's states are replaced."""
    latest = latest_state(out_dir)
    if latest is None:
        return
    ts = read_trainer_state(latest)
    max_iters = ts.get("settings", {}).get("max_iters", 0)
    if ts["step"] < max_iters:
        raise UserError(f"{out_dir} holds an unfinished run (step {ts['step']} of {max_iters}): continue it with "
                        f"--init_from=resume, or start the new run in another --out_dir (or after deleting "
                        f"{os.path.join(out_dir, STATE_DIR)})")


def restart_settings(s: TrainSettings, explicit: dict, log) -> TrainSettings:
    """init_from=resume in an out_dir whose run was stopped before its first checkpoint (it wrote train_config.yaml,
    but no state yet): that run again from step 0, with its settings and what the user set explicitly."""
    from .settings import apply, load_recipe

    path = os.path.join(s.out_dir, "train_config.yaml")
    saved = apply(TrainSettings(), load_recipe(path), source=path) if os.path.isfile(path) else None
    if saved is None or saved.init_from == "resume":
        raise UserError(f"init_from=resume but {s.out_dir} holds no resumable state (state/step-N); "
                        "train with init_from=scratch first")
    if s.eval_only:  # restarting would evaluate a freshly initialised model
        fix = (f"evaluate its saved model with --init_from={s.out_dir}"
               if os.path.isfile(os.path.join(s.out_dir, "config.json")) else "it has no model to evaluate yet")
        raise UserError(f"eval_only with init_from=resume, but {s.out_dir} holds no resumable state (state/step-N); "
                        f"{fix}")
    log(f"{s.out_dir} holds no resumable state yet (its run stopped before the first checkpoint): "
        f"starting that run again from step 0")
    changed = {k: v for k, v in explicit.items() if k not in ("init_from", "out_dir")}
    return dataclasses.replace(saved, **changed, out_dir=s.out_dir)


# ---- evaluation -------------------------------------------------------------------------------------------------


@torch.no_grad()
def estimate_loss(model, streams: dict, s: TrainSettings, accelerator, stop: StopRequest | None = None
                  ) -> dict[str, float]:
    """Mean loss over eval_iters fixed random batches per split, spread over all processes and gathered.

    Every process runs as many forwards (under FSDP a forward is a collective): where eval_iters does not divide by
    the number of processes, some run one more batch and leave it out. A stop request (SIGINT/SIGTERM), agreed on by
    all processes, cuts the evaluation short so that a long one does not hold up the stop: the losses are then
    partial, and the caller discards them."""
    model.eval()
    out = {}
    world, rank = accelerator.num_processes, accelerator.process_index
    for split, stream in streams.items():
        total = torch.zeros(2, device=accelerator.device)  # (sum of batch losses, batches)
        for i in range(math.ceil(s.eval_iters / world)):
            if stop is not None and _stop_requested(stop, accelerator):
                break
            k = i * world + rank
            x, y = eval_batch(stream, seed=s.seed, k=min(k, s.eval_iters - 1), batch_size=s.batch_size,
                              block_size=s.block_size)
            with accelerator.autocast():
                loss = model(input_ids=x.to(accelerator.device), shift_labels=y.to(accelerator.device),
                             use_cache=False).loss
            if k < s.eval_iters:
                total[0] += loss.float()
                total[1] += 1
        total = accelerator.reduce(total, reduction="sum")
        out[split] = (total[0] / total[1]).item() if total[1] else math.nan
    model.train()
    return out


# ---- the loop ---------------------------------------------------------------------------------------------------


class StopRequest:
    """SIGINT / SIGTERM: finish the current step (or cut the evaluation short), save a resumable state, exit."""

    def __init__(self, announce: bool = True, processes: int = 1):
        self.signal = None
        self.announce = announce
        # several processes agree on stopping over this CPU group (made by every process, as new_group requires)
        self.group = torch.distributed.new_group(backend="gloo") if processes > 1 else None
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signal is not None:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.signal = signum
        if self.announce:  # at once: the step or save in progress may take a while
            print(f"\n{signal.Signals(signum).name} received: stopping after the current step and saving a state "
                  f"(send it again to stop at once, without saving)", file=sys.stderr, flush=True)

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False


def quiet_library_output() -> None:
    """The command shows one progress bar (training) and its log lines: no per-save "Writing model shards" bars, and
    no accelerate warning that the tied lm_head.weight is stored once (it is re-tied on load, by design)."""
    import logging

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    logging.getLogger("accelerate.utils.other").setLevel(logging.ERROR)


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    # no recipe: the demo's values are the defaults (not explicit settings: a resume keeps its saved ones)
    s, explicit = parse_command(TrainSettings, args, "train.py", DESCRIPTION, recipes=True,
                                default_recipe=DEFAULT_RECIPE)
    recipes = [os.path.basename(a) for a in args if a.endswith((".yaml", ".yml"))]
    if not recipes and s.init_from != "resume":  # a resume's settings are the saved ones, whatever recipe made them
        recipes = ["default.yaml"]
    quiet_library_output()
    try:
        return train(s, explicit, recipes)
    except OSError as exc:  # disk full or no permission while writing logs or plots (saves say it themselves)
        if exc.errno not in DISK_ERRNOS:
            raise
        where = f" ({exc.filename})" if exc.filename else ""
        raise UserError(f"{exc.strerror}{where}; the last checkpoint in {s.out_dir} is intact: free some space or "
                        f"fix the permissions, then resume with --init_from=resume") from None


def train(s: TrainSettings, explicit: dict | None = None, recipes: list[str] = ()) -> int:
    """Run training (or evaluation with eval_only). explicit: the settings the user gave (see resume_settings)."""
    explicit = explicit or {}
    # --- where we start from: a resumed run's settings are the saved ones (device, dtype, ... included)
    notes, state_dir = [], None
    if s.init_from == "resume":
        state_dir = latest_state(s.out_dir)
        if state_dir is None:
            s = restart_settings(s, explicit, notes.append)  # killed before its first checkpoint: start it again
        else:
            s = resume_settings(s, explicit, state_dir, notes.append)
    elif not s.eval_only:  # evaluating writes nothing
        refuse_to_replace_unfinished(s.out_dir)
    device_type = resolve_device_type(s.device)
    if device_type == "cpu":
        keep_freed_memory()  # a quarter of a CPU step was page faults
    else:  # as nanoGPT: float32 matmuls (--dtype=float32, and the fp32 parts of mixed precision) on tensor cores
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    mixed_precision = resolve_mixed_precision(s.dtype, device_type)
    trackers = [t for t in s.log_with.split(",") if t] + (["wandb"] if s.wandb_log and "wandb" not in s.log_with else [])
    for t in trackers:
        if t not in ("wandb", "tensorboard"):
            raise UserError(f"log_with: unknown tracker '{t}'; use wandb and/or tensorboard")
        modules = ("tensorboard", "tensorboardX") if t == "tensorboard" else (t,)
        if not any(importlib.util.find_spec(m) for m in modules):
            raise UserError(f"log_with: the {t} tracker is not installed (accelerate would skip it): pip install {t}")
    hub_id = s.hub_model_id or os.path.basename(os.path.normpath(s.out_dir))
    if s.push_to_hub:
        check_repo_id(hub_id, default_from="" if s.hub_model_id else "out_dir's name")
    # a backend given to a single process makes accelerate look for a process group that nobody started
    several = int(os.environ.get("WORLD_SIZE", "1")) > 1
    handlers = [InitProcessGroupKwargs(backend=s.backend)] if s.backend != "auto" and several else []
    # dynamo_backend "no": the compile setting decides; an `accelerate config` with dynamo on made prepare() compile
    # the model, and compiling it again here crashed (or compiled it under --compile=false)
    accelerator = Accelerator(cpu=device_type == "cpu", mixed_precision=mixed_precision, log_with=trackers or None,
                              project_dir=s.out_dir, kwargs_handlers=handlers, dynamo_backend="no")
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        raise UserError("DeepSpeed is not supported: its engine steps the optimizer and clips gradients itself, which "
                        "this loop does not hand over to it; use FSDP or DDP (accelerate config)")
    log = accelerator.print
    for note in notes:
        log(note)
    check_ranges(s)
    world = accelerator.num_processes
    if s.gradient_accumulation_steps % world:
        raise UserError(f"gradient_accumulation_steps ({s.gradient_accumulation_steps}) must be divisible by the "
                        f"number of processes ({world})")
    accum = s.gradient_accumulation_steps // world
    data_path = resolve_dataset(s, accelerator)
    data = open_dataset(data_path)
    streams = {split: data.stream(split) for split in ("train", "val")}

    set_seed(s.seed)  # the same initial weights on every process
    if s.init_from in ("scratch", "resume"):
        config = (NanoGPTConfig.from_pretrained(state_dir, dropout=s.dropout) if state_dir  # dropout may change
                  else scratch_config(s, data.vocab_size, data.tokenizer_kind))
        model = NanoGPTForCausalLM(config)
        if state_dir and os.path.isfile(os.path.join(state_dir, "tokenizer.json")):  # the dataset prepared again?
            # the state's own tokenizer: out_dir's may still be an earlier run's, until this run saves its model
            check_same_tokenizer(state_dir, data, name=f"the run in {s.out_dir}")
    else:
        model = load_init_model(s)
        check_same_tokenizer(s.init_from, data)
        if s.block_size < model.config.block_size:
            model.crop_block_size(s.block_size)
        elif s.block_size > model.config.block_size:
            raise UserError(f"block_size {s.block_size} is larger than the checkpoint's {model.config.block_size}: "
                            f"use --block_size={model.config.block_size} or less")
        # the settings saved with the run (train_config.yaml, model card, states) describe the model trained, not
        # the recipe's architecture, which finetuning ignores (as nanoGPT does)
        c = model.config
        s = dataclasses.replace(s, n_layer=c.n_layer, n_head=c.n_head, n_embd=c.n_embd, bias=c.bias)
    check_compatible(data.meta, model.config.vocab_size, s.block_size,
                     vocab_fix="train on a dataset prepared with the model's tokenizer")
    if data.tokenizer_kind == "gpt2" and model.config.vocab_size < 50257:
        raise UserError(f"the dataset uses GPT-2 BPE but the model has vocab_size {model.config.vocab_size}")
    tokenizer = data.tokenizer()
    # out_dir only now that the model and data are known good: a refused run leaves no empty folder behind
    try:
        if accelerator.is_main_process and not s.eval_only:  # evaluating writes nothing
            os.makedirs(s.out_dir, exist_ok=True)
            probe = os.path.join(s.out_dir, f".write-test-{os.getpid()}")
            open(probe, "w").close()
            os.remove(probe)
    except OSError as exc:
        what = "it is a file" if os.path.isfile(s.out_dir) else exc.strerror
        raise UserError(f"cannot write to out_dir {s.out_dir}: {what}; choose a writable --out_dir") from None
    model.generation_config.eos_token_id = model.config.eos_token_id
    model.generation_config.bos_token_id = model.config.bos_token_id
    model.set_attn_implementation(training_attention(device_type, mixed_precision))  # not saved with the model
    model.train()

    optimizer = model.configure_optimizers(s.weight_decay, s.learning_rate, (s.beta1, s.beta2), device_type)
    model, optimizer = prepare_model(accelerator, model, optimizer)
    prepared = model  # what the accelerator holds (DDP / FSDP wrapped), never the compiled wrapper
    compile_model = s.compile if s.compile is not None else compile_by_default(device_type)
    if compile_model:
        # compiled after prepare: the accelerator keeps the uncompiled model, so resumable states hold its plain keys
        # (no '_orig_mod.' prefix) and resume with compile on or off, on a GPU or a CPU; and DDP then compiled is
        # what lets dynamo split the graph at DDP's buckets, overlapping gradient all-reduce with backward
        model = torch.compile(model)
    raw_model = accelerator.unwrap_model(model, keep_torch_compile=False)

    iter_num, best_val_loss, tokens_seen, evaluated = 0, math.inf, 0, False
    if state_dir:
        load_state(accelerator, state_dir)  # weights, optimizer, RNG of every process
        if accelerator.is_main_process and not s.eval_only:  # evaluating changes nothing in out_dir
            prune_states(s.out_dir, s.keep_states)
        ts = read_trainer_state(state_dir)
        iter_num, best_val_loss, tokens_seen = ts["step"], ts["best_val_loss"], ts["tokens_seen"]
        evaluated = ts.get("evaluated", False)  # saved right after this step's evaluation: do not repeat it
        log(f"resumed from {state_dir} at step {iter_num} (best val loss {best_val_loss:.4f})")
        if iter_num >= s.max_iters and not s.eval_only:
            log(f"nothing to train: the state is at step {iter_num} and max_iters is {s.max_iters} "
                f"(resume with a larger --max_iters to train on)")
        saved_on = (ts.get("world_size", world), ts.get("device_type", device_type))
        if saved_on != (world, device_type):  # (accelerate skips another device's RNG state at INFO level)
            log(f"note: the state was saved by {saved_on[0]} {saved_on[1]} process(es), this run has {world} "
                f"{device_type}: it continues, with the same batches, but dropout is drawn per process and device: "
                f"not bit-exactly as the interrupted run would have")
    else:
        torch.manual_seed(s.seed + accelerator.process_index)  # dropout differs per process, as in nanoGPT

    tokens_per_iter = s.batch_size * s.gradient_accumulation_steps * s.block_size
    log(f"model: {raw_model.get_num_params() / 1e6:.2f}M parameters; device {accelerator.device}, "
        f"{world} process(es), mixed precision {mixed_precision}, compile {compile_model}")
    log(f"data: {data_path} ({data.tokenizer_kind}, vocab {data.vocab_size}, from {data.meta.get('source')}); "
        f"tokens per iteration: "
        f"{tokens_per_iter:,} = {s.batch_size} batch x {s.gradient_accumulation_steps} micro-batches "
        f"({accum} per process) x {s.block_size} block")

    if s.eval_only:
        losses = estimate_loss(model, streams, s, accelerator)
        ppl = {k: perplexity([v], [1]) for k, v in losses.items()}
        log(f"eval: train loss {losses['train']:.4f} (perplexity {ppl['train']:.2f}), "
            f"val loss {losses['val']:.4f} (perplexity {ppl['val']:.2f})")
        end_training(accelerator)
        return 0

    main = accelerator.is_main_process
    # what the records (train_config.yaml, states, model card, trackers) say this run is: a resume is the run it
    # continues, started from its base model and recipe (init_from=resume there lost both after the first resume)
    record, saved_recipes = s, list(recipes)
    if state_dir:
        record = dataclasses.replace(s, init_from=ts["settings"].get("init_from", "resume"))
        saved_recipes = list(recipes) or ts.get("recipes", [])
    if trackers:  # before anything in out_dir changes: a run refused here leaves the previous one resumable
        try:
            accelerator.init_trackers(s.wandb_project, config=dataclasses.asdict(record),
                                      init_kwargs={"wandb": {"name": s.wandb_run_name}})
        except Exception as exc:  # wandb not logged in, no network, ...: its own message names the fix
            hint = " (or log offline: WANDB_MODE=offline)" if "wandb" in trackers else ""
            raise UserError(f"cannot start the {', '.join(trackers)} tracker: {first_line(exc)}{hint}") from None
    if main:
        if not state_dir and state_dirs(s.out_dir):  # a new run in an old out_dir: its states would outrank ours
            log(f"a new run in {s.out_dir}: removing the finished previous run's resumable states")
            discard_states(s.out_dir)
        save_yaml(record, os.path.join(s.out_dir, "train_config.yaml"))
    metrics = MetricsLog(os.path.join(s.out_dir, "metrics.jsonl"), resume_step=iter_num if state_dir else None) \
        if main else None
    peak = peak_flops(accelerator.device, mixed_precision)
    card = {"settings": dataclasses.asdict(record), "dataset": data.meta.get("source"),
            "repo_id": s.hub_model_id or None, "recipe": ", ".join(saved_recipes) or None,
            "base_model": record.init_from if record.init_from not in ("scratch", "resume") else None}

    pusher = HubPusher(hub_id, private=s.hub_private, strategy=s.hub_strategy) if s.push_to_hub and main else None

    sharded = accelerator.distributed_type == DistributedType.FSDP

    def save_model(losses: dict):
        """Write the model folder. Called on every process: under FSDP gathering the full weights is a collective."""
        full = accelerator.get_state_dict(prepared) if sharded else None
        if full:  # gathered tensors no longer share storage: drop the tied copies, as save_pretrained does
            for tied in NanoGPTForCausalLM._tied_weights_keys:
                full.pop(tied, None)
        if not main:
            return
        if pusher:
            card["repo_id"] = pusher.repo_id  # with its namespace once the Hub has answered
        card.update(steps=iter_num, tokens_seen=tokens_seen, train_loss=losses["train"], val_loss=losses["val"],
                    best_val_loss=best_val_loss)

        def write(tmp):
            model_to_save = raw_model
            if type(raw_model) is not NanoGPTForCausalLM:  # FSDP2's fully_shard swapped its class: save as ours
                with torch.device("meta"):
                    model_to_save = NanoGPTForCausalLM(raw_model.config)
                model_to_save.generation_config = raw_model.generation_config
            model_to_save.save_pretrained(tmp, state_dict=full)
            tokenizer.save_pretrained(tmp)
            if os.path.isfile(os.path.join(s.out_dir, "loss.png")):
                shutil.copy(os.path.join(s.out_dir, "loss.png"), tmp)  # the card shows it
            write_model_card(tmp, card)

        save_model_folder(write, s.out_dir)

    def write_state_files(tmp):  # a state is also a checkpoint that sample.py and finetuning can load
        raw_model.config.to_json_file(os.path.join(tmp, "config.json"))
        tokenizer.save_pretrained(tmp)

    def save_resumable(evaluated: bool):
        save_state(accelerator, s.out_dir, iter_num, {
            "step": iter_num, "best_val_loss": best_val_loss, "tokens_seen": tokens_seen, "evaluated": evaluated,
            "settings": dataclasses.asdict(record), "recipes": saved_recipes, "world_size": world,
            "device_type": device_type},
            keep=s.keep_states,
            write=write_state_files)

    def stop_and_save(stop: StopRequest, loss) -> int:
        """After a stop request: save a resumable state at iter_num, say how to resume; the exit code."""
        if loss is not None:
            last = loss if isinstance(loss, float) else accelerator.reduce(loss, reduction="mean").item()
            if not math.isfinite(last):  # never save a diverged state (the loss is checked at log steps only)
                raise non_finite(last, iter_num, s.out_dir)
        save_resumable(evaluated=False)
        name = signal.Signals(stop.signal).name if stop.signal else "a signal"
        log(f"\nstopped by {name} after step {iter_num}; state saved in {latest_state(s.out_dir)}. "
            f"Resume with: python train.py --out_dir={s.out_dir} --init_from=resume"
            + (f" (under accelerate launch, {world} processes)" if world > 1 else ""))
        return 130 if stop.signal == signal.SIGINT else 143

    progress = tqdm(total=s.max_iters, initial=iter_num, desc="training", disable=not main, dynamic_ncols=True)
    t0, last_log_iter, running_mfu = time.perf_counter(), iter_num, -1.0
    timed = 0.0  # seconds of training steps since the last log line, before t0 (evaluations are left out)
    first_iter = iter_num
    exit_code = 0
    loss = None  # the last step's loss
    # closing the bar first puts an error message on a line of its own
    with StopRequest(announce=main, processes=world) as stop, progress:
        while True:
            # evaluate and save at every eval_interval and after the last step (nanoGPT skips the final save)
            if (iter_num % s.eval_interval == 0 or iter_num == s.max_iters) and not (state_dir and evaluated):
                timed += time.perf_counter() - t0
                losses = estimate_loss(model, streams, s, accelerator, stop)
                if _stop_requested(stop, accelerator):  # the evaluation was cut short: not reported, not saved
                    exit_code = stop_and_save(stop, loss)
                    break
                if not all(math.isfinite(v) for v in losses.values()):
                    raise non_finite(losses["val"], iter_num, s.out_dir)
                ppl = {k: perplexity([v], [1]) for k, v in losses.items()}
                progress.write(f"step {iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}, "
                               f"val perplexity {ppl['val']:.2f}") if main else None
                event = {"type": "eval", "iter": iter_num, "train_loss": losses["train"], "val_loss": losses["val"],
                         "train_ppl": ppl["train"], "val_ppl": ppl["val"], "tokens": tokens_seen}
                if main:
                    metrics.write(event)
                    plot_losses(metrics.path, os.path.join(s.out_dir, "loss.png"))
                if trackers:
                    accelerator.log({f"eval/{k}": v for k, v in event.items() if k not in ("type", "iter")},
                                    step=iter_num)
                # the untrained (or just loaded) model of step 0 is reported, not a candidate: the first evaluation
                # after training always saves, even where finetuning never beats the starting point
                if iter_num > 0 or iter_num == s.max_iters:
                    improved = losses["val"] < best_val_loss
                    best_val_loss = min(best_val_loss, losses["val"])  # only ever improves
                    if improved or s.always_save_checkpoint:
                        save_model(losses)
                        if pusher:  # uploads in the background; a failure prints one line and training goes on
                            pusher.on_save(s.out_dir, f"step {iter_num}: val loss {losses['val']:.4f}", improved)
                    save_resumable(evaluated=True)
                t0 = time.perf_counter()  # ms/iter measures training steps, not evaluation and saving
            if iter_num >= s.max_iters:
                break

            lr = get_lr(iter_num, s.learning_rate, s.min_lr, s.warmup_iters, s.lr_decay_iters, s.decay_lr)
            rank = accelerator.process_index
            batches = [sample_batch(streams["train"], seed=s.seed, step=iter_num, index=j * world + rank,
                                    batch_size=s.batch_size, block_size=s.block_size) for j in range(accum)]
            batches = [(x.to(accelerator.device, non_blocking=True), y.to(accelerator.device, non_blocking=True))
                       for x, y in batches]
            loss = train_step(accelerator, model, optimizer, batches, lr, s.grad_clip)
            iter_num += 1
            tokens_seen += tokens_per_iter
            progress.update(1)

            if iter_num % s.log_interval == 0 or iter_num == s.max_iters:
                loss = accelerator.reduce(loss, reduction="mean").item()  # the only per-log device sync
                if not math.isfinite(loss):
                    raise non_finite(loss, iter_num, s.out_dir)
                dt = (timed + time.perf_counter() - t0) / (iter_num - last_log_iter)
                warm = last_log_iter - first_iter >= 5  # as nanoGPT: MFU leaves out the first steps (warm-up, compile)
                t0, timed, last_log_iter = time.perf_counter(), 0.0, iter_num
                event = {"type": "train", "iter": iter_num, "loss": loss, "lr": lr, "ms_per_iter": dt * 1000,
                         "tokens_per_s": tokens_per_iter / dt}
                if peak and warm:
                    mfu = raw_model.estimate_mfu(s.batch_size * accum, dt, peak, seq_len=s.block_size)
                    running_mfu = mfu if running_mfu < 0 else 0.9 * running_mfu + 0.1 * mfu
                    event["mfu"] = running_mfu
                if main:
                    metrics.write(event)
                    mfu_text = f", mfu {running_mfu * 100:.2f}%" if running_mfu >= 0 else ""
                    progress.write(f"iter {iter_num}: loss {loss:.4f}, lr {lr:.2e}, time {dt * 1000:.2f}ms, "
                                   f"{tokens_per_iter / dt:,.0f} tok/s{mfu_text}")
                    progress.set_postfix(loss=f"{loss:.4f}")
                if trackers:
                    accelerator.log({f"train/{k}": v for k, v in event.items() if k not in ("type", "iter")},
                                    step=iter_num)

            evaluated = False  # only the first loop pass may skip the evaluation done before the state was saved
            if _stop_requested(stop, accelerator):
                exit_code = stop_and_save(stop, loss)
                break
    if pusher:
        pusher.finish(s.out_dir, f"end of training, step {iter_num}")
    end_training(accelerator)
    if exit_code == 0 and main and s.sample_at_end:
        print_sample(s.out_dir, device=device_type)
    return exit_code


def non_finite(loss: float, step: int, out_dir: str) -> UserError:
    last = latest_state(out_dir)
    where = (f"the last good checkpoint ({os.path.relpath(last, out_dir)} in {out_dir}) is intact: resume from it with "
             "--init_from=resume and a lower --learning_rate" if last else "no checkpoint was saved yet: start again "
             "with a lower --learning_rate")
    return UserError(f"the loss became non-finite ({loss}) at step {step}; {where}")


def end_training(accelerator) -> None:
    """accelerator.end_training (trackers, then the process group), without torch's gloo shutdown deadlock: the
    group's destructor holds the GIL while joining its worker threads, and a worker still releasing the tensors of
    the last collective needs the GIL (pytorch/pytorch#75097, #56297); seen here as 2-process CPU runs that hang
    after their final save. A barrier, then a pause without the GIL, lets the workers finish first. Every command
    that makes an Accelerator ends with this: a process that exits with its group still open can abort ("terminate
    called without an active exception", seen in bench.py under accelerate launch)."""
    if accelerator.num_processes > 1:
        accelerator.wait_for_everyone()
        time.sleep(0.2)
    accelerator.end_training()


def _stop_requested(stop: StopRequest, accelerator) -> bool:
    if accelerator.num_processes == 1:
        return stop.signal is not None
    # every process must stop after the same step, whichever received the signal. Asked at every step, so the flag
    # travels between CPUs (gloo): through a GPU collective, reading it would wait for the GPU at every step
    flag = torch.tensor([0.0 if stop.signal is None else 1.0])
    torch.distributed.all_reduce(flag, group=stop.group)
    return bool(flag.item())


def print_sample(out_dir: str, max_new_tokens: int = 300, device: str = "cpu") -> None:
    """A short sample from the saved model, loaded back from disk: proof that the checkpoint works."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .sampling import generate_text

    model = AutoModelForCausalLM.from_pretrained(out_dir).to(device)  # the training device: gpt2-xl is slow on a CPU
    tokenizer = AutoTokenizer.from_pretrained(out_dir)
    start = "\n" if tokenizer("\n")["input_ids"] else tokenizer.decode([0])  # a corpus without newlines
    text = generate_text(model, tokenizer, start, max_new_tokens=max_new_tokens, stop_at_eot=True)
    print(f"---------- sample from {out_dir} ----------{text}\n" + "-" * 40)
