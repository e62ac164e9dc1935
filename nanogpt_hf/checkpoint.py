"""Checkpoints: the one loader, and a run's out_dir, saved so that a kill at any instant loses nothing.

    out_dir/                  the best (or latest) model: a save_pretrained folder, from_pretrained(out_dir) works
    out_dir/state/step-N/     accelerator.save_state (weights, optimizer, RNG of every process) + trainer_state.json,
                              config.json and the tokenizer (so a state is also a checkpoint); the newest `keep` kept

Every save goes through common.atomic_output: a state appears complete or not at all; model files move in weights last.
"""

from __future__ import annotations

import contextlib
import difflib
import json
import os
import re
import uuid

import torch
from accelerate.utils import broadcast_object_list, gather_object
from safetensors import SafetensorError

from .common import GPT2_NAMES, UserError, atomic_output, first_line, is_hub_id, remove

STATE_DIR = "state"
TRAINER_STATE = "trainer_state.json"
_STEP = re.compile(r"^step-(\d+)$")


def check_checkpoint(ref: str) -> None:
    """Refuse, naming the fix, a reference that can be neither a local checkpoint folder nor a Hub model."""
    if not os.path.exists(ref) and not is_hub_id(ref):
        raise UserError(f"checkpoint folder '{ref}' does not exist")
    guess = difflib.get_close_matches(ref, GPT2_NAMES + ("scratch", "resume"), n=1, cutoff=0.7)
    if not os.path.exists(ref) and guess and guess[0] != ref:  # a typo of a name we know beats the Hub's 404
        raise UserError(f"'{ref}' is not a folder or a known model (did you mean '{guess[0]}'?)")
    if os.path.isdir(ref) and not os.path.isfile(os.path.join(ref, "config.json")):
        inside = sorted(os.path.join(ref, d) for d in os.listdir(ref)
                        if os.path.isfile(os.path.join(ref, d, "config.json")))  # e.g. out/ of several runs
        fix = f"choose one inside it: {' or '.join(inside)}" if inside else "train one first, or name another folder"
        raise UserError(f"'{ref}' is not a checkpoint folder (no config.json); {fix}")


def load_pretrained(ref: str, dtype=torch.float32, **kwargs):
    """(model, tokenizer or None) from a checkpoint folder (ours, a stock GPT-2's, a resumable state), a Hub id or a
    GPT-2 name. GPT-2 checkpoints are converted to NanoGPTForCausalLM (same logits). kwargs go to from_pretrained."""
    from transformers import AutoTokenizer, PretrainedConfig

    from .gpt2 import from_gpt2
    from .modeling_nanogpt import NanoGPTForCausalLM
    from .tokenization import GPT2_VOCAB_SIZE, gpt2_tokenizer

    check_checkpoint(ref)
    try:
        model_type = PretrainedConfig.get_config_dict(ref)[0].get("model_type")
        if model_type == "gpt2":
            model = from_gpt2(ref, **kwargs)
        elif model_type == "nanogpt":
            model = NanoGPTForCausalLM.from_pretrained(ref, dtype=dtype, **kwargs)
    except Exception as exc:  # the library's own error, with which checkpoint it was loading
        exc.add_note(f"(loading '{ref}')")
        raise
    if model_type not in ("gpt2", "nanogpt"):
        raise UserError(f"'{ref}' holds a {model_type!r} model; GPT-2 and nanogpt_hf checkpoints are supported")
    tokenizer = None
    if ref in GPT2_NAMES and not os.path.isdir(ref):  # OpenAI's BPE ships with us, verified offline
        tokenizer = gpt2_tokenizer()
    elif not os.path.isdir(ref) or os.path.isfile(os.path.join(ref, "tokenizer_config.json")):
        tokenizer = AutoTokenizer.from_pretrained(ref)
    elif model_type == "gpt2" and model.config.vocab_size >= GPT2_VOCAB_SIZE:
        tokenizer = gpt2_tokenizer(model_max_length=model.config.block_size)
    return model, tokenizer


def check_shared_out_dir(accelerator, out_dir: str) -> None:
    """Every process must see one out_dir (on several machines, shared storage): a state holds each process's RNG
    file, and each process resumes from it. The main process writes a file there and every process looks for it."""
    if accelerator.num_processes == 1:
        return
    name = [f".shared-{uuid.uuid4().hex}"]
    if accelerator.is_main_process:
        os.makedirs(out_dir, exist_ok=True)
        open(os.path.join(out_dir, name[0]), "w").close()
    path = os.path.join(out_dir, broadcast_object_list(name)[0])  # sent once the file is there
    blind = [i for i, seen in enumerate(gather_object([os.path.exists(path)])) if not seen]
    if accelerator.is_main_process:
        remove(path)
    if blind:
        raise UserError(f"out_dir {out_dir} is not one folder for every process: process(es) {blind} cannot see "
                        "what the main process writes there; on several machines, put out_dir on storage they all "
                        "share (states hold every process's part, and a resume reads them)")


def read_trainer_state(path: str) -> dict:
    try:
        with open(os.path.join(path, TRAINER_STATE), encoding="utf-8") as fh:
            return json.load(fh)
    except (OSError, ValueError) as exc:
        raise damaged(path, exc) from None


def damaged(path: str, exc: Exception) -> UserError:
    """A resumable state that cannot be read, named with the state to fall back on."""
    older = [p for _, p in state_dirs(os.path.dirname(os.path.dirname(path))) if p != path]
    fix = f"if it is damaged, delete it to resume from {older[-1]}" if older else "no older state is left"
    return UserError(f"the state {path} cannot be loaded ({first_line(exc)}); {fix}")


def state_dirs(out_dir: str) -> list[tuple[int, str]]:
    """Complete resumable states in out_dir, oldest first, as (step, path)."""
    root = os.path.join(out_dir, STATE_DIR)
    names = os.listdir(root) if os.path.isdir(root) else []
    return sorted((int(m.group(1)), os.path.join(root, n)) for n in names if (m := _STEP.match(n)))


def latest_state(out_dir: str) -> str | None:
    states = state_dirs(out_dir)
    return states[-1][1] if states else None


@contextlib.contextmanager
def saving(what: str, path: str):
    """A save that fails (disk full, no permission: whichever library notices) is one line; atomic_output has left
    the previous checkpoint as it was."""
    try:
        yield
    except (OSError, RuntimeError, SafetensorError) as exc:  # what os, torch.save and safetensors raise
        raise UserError(f"could not save the {what} to {path} ({type(exc).__name__}: {first_line(exc)}); the "
                        "previous checkpoint is intact: free some disk space or fix the permissions, then resume "
                        "with --init_from=resume") from None


class Checkpointer:
    """Owns a run's out_dir: saves the model folder and resumable states, finds and loads the latest state."""

    def __init__(self, accelerator, out_dir: str, keep: int):
        self.accelerator, self.out_dir, self.keep = accelerator, out_dir, keep
        self.main = accelerator.is_main_process

    def save_model(self, model, tokenizer, card: dict) -> None:
        """The model folder (save_pretrained + tokenizer + loss.png + model card). Called on every process: under
        FSDP, gathering the full weights is a collective."""
        from .hub import write_model_card
        from .modeling_nanogpt import NanoGPTForCausalLM

        model = getattr(model, "_orig_mod", model)  # torch.compile's wrapper would prefix every key with _orig_mod.
        full = self.accelerator.get_state_dict(model)  # gathered under FSDP; the plain state dict otherwise
        raw = self.accelerator.unwrap_model(model)
        if not self.main:
            return
        for tied in NanoGPTForCausalLM._tied_weights_keys if raw.config.tie_word_embeddings else ():
            full.pop(tied, None)  # gathered tensors no longer share storage: a tied head is saved once
        if type(raw) is not NanoGPTForCausalLM:  # FSDP2's fully_shard swapped its class: save as ours
            with torch.device("meta"):
                ours = NanoGPTForCausalLM(raw.config)
            ours.generation_config, raw = raw.generation_config, ours
        with saving("model", self.out_dir), atomic_output(self.out_dir, merge=True) as tmp:
            raw.save_pretrained(tmp, state_dict=full)
            tokenizer.save_pretrained(tmp)
            plot = os.path.join(self.out_dir, "loss.png")
            if os.path.isfile(plot):
                with open(plot, "rb") as src, open(os.path.join(tmp, "loss.png"), "wb") as dst:
                    dst.write(src.read())  # the card shows it
            write_model_card(tmp, card)

    def save_state(self, trainer_state: dict, config, tokenizer) -> str:
        """accelerator.save_state into out_dir/state/step-N, atomically; every process writes its part."""
        final = os.path.join(self.out_dir, STATE_DIR, f"step-{trainer_state['step']}")
        output = atomic_output(final) if self.main else contextlib.nullcontext()  # the others learn its path below
        with saving("training state", final), output as tmp:
            if self.accelerator.num_processes > 1:
                tmp = broadcast_object_list([tmp])[0]
            self.accelerator.save_state(tmp)
            if self.main:
                config.to_json_file(os.path.join(tmp, "config.json"))
                tokenizer.save_pretrained(tmp)
                with open(os.path.join(tmp, TRAINER_STATE), "w", encoding="utf-8") as fh:
                    json.dump(trainer_state, fh, indent=1)
            self.accelerator.wait_for_everyone()
        if self.main:
            self.prune()
        return final

    def prune(self) -> None:
        """Keep the newest `keep` states (all with 0); anything else in state/ is a leftover of a killed save."""
        root = os.path.join(self.out_dir, STATE_DIR)
        states = [path for _, path in state_dirs(self.out_dir)]
        for path in states[:-self.keep] if self.keep > 0 else []:
            remove(path)
        for name in os.listdir(root) if os.path.isdir(root) else []:
            if name.startswith("."):
                remove(os.path.join(root, name))

    def load_state(self, path: str) -> None:
        """Weights, optimizer and RNG of every process; a damaged state is refused in one line naming it."""
        try:
            self.accelerator.load_state(path)
        except Exception as exc:  # a truncated or corrupt file, whichever library reads it
            raise damaged(path, exc) from None
