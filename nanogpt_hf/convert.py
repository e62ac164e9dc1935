"""`nanogpt-hf`: convert checkpoints between nanoGPT, nanogpt_hf and stock GPT-2, and push them to the Hub.

Each OUT folder appears complete or not at all. It must be new or empty, or, with --force, a checkpoint that
nanogpt-hf wrote (config.json, and neither a training run's files nor the input)."""

import argparse
import math
import os
import pickle
import shutil
import zipfile

import torch

from . import gpt2
from .checkpoint import load_pretrained
from .common import GPT2_NAMES, UserError, atomic_output, is_hub_id
from .configuration_nanogpt import NanoGPTConfig
from .hub import push_checkpoint, write_model_card
from .modeling_nanogpt import NanoGPTForCausalLM
from .nanochat import to_nanochat
from .tokenization import GPT2_VOCAB_SIZE, char_tokenizer_from_stoi, gpt2_tokenizer

MODEL_ARGS = ("n_layer", "n_head", "n_embd", "block_size", "vocab_size")  # what every nanoGPT ckpt.pt has
RUN_FILES = ("state", "metrics.jsonl", "train_config.yaml")  # a training run's out_dir: --force must not wipe it


def check_output(out: str, force: bool, *inputs: str | None) -> None:
    """Refuse, before writing, an OUT that holds something, unless --force and it is a checkpoint we wrote."""
    if os.path.exists(out) and not (os.path.isdir(out) and not os.listdir(out)):
        if not force:
            raise UserError(f"'{out}' exists and is not an empty folder; choose a new OUT or pass --force")
        holds_input = any(f"{os.path.realpath(src)}/".startswith(f"{os.path.realpath(out)}/") for src in inputs if src)
        if holds_input or not os.path.isfile(os.path.join(out, "config.json")) or any(
                os.path.exists(os.path.join(out, name)) for name in RUN_FILES):
            raise UserError(f"--force only replaces a checkpoint that nanogpt-hf wrote (config.json; no state/, "
                            f"metrics.jsonl nor the input); '{out}' is not one: choose another OUT")


class PlainUnpickler(pickle.Unpickler):
    """meta.pkl is a dict of strings and ints: any class or function in it is refused (unpickling could run code)."""

    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"it refers to {module}.{name}; only plain dicts are accepted")


def load_nanogpt(path: str) -> dict:
    """nanoGPT's ckpt.pt, loaded safely: only tensors, dicts, numbers and strings (anything else could run code)."""
    if os.path.isfile(path) and not zipfile.is_zipfile(path):  # torch.save writes zip archives, truncated: not one
        raise UserError(f"'{path}' is not a PyTorch checkpoint (not a torch.save file, or truncated)")
    try:  # mmap: the optimizer state (2x the model) is never read
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError:
        raise UserError(f"'{path}' holds objects other than tensors, dicts, numbers and strings: it is not loaded, "
                        "since unpickling them could run code") from None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("model"), dict) or not set(MODEL_ARGS) <= set(
            ckpt.get("model_args") or ()):
        raise UserError(f"'{path}' is not a nanoGPT ckpt.pt (a dict with 'model' and 'model_args' holding "
                        f"{', '.join(MODEL_ARGS)})")
    return ckpt


def load_meta(path: str) -> dict[str, int]:
    """nanoGPT's meta.pkl ({'vocab_size', 'itos', 'stoi'}) -> stoi."""
    with open(path, "rb") as fh:
        try:
            meta = PlainUnpickler(fh).load()
        except (pickle.UnpicklingError, EOFError) as exc:
            raise UserError(f"'{path}' is not a nanoGPT meta.pkl: {exc}") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("stoi"), dict):
        raise UserError(f"'{path}' holds no character vocabulary ('stoi'); GPT-2 BPE models need no --meta")
    return meta["stoi"]


def find_meta(ckpt_path: str, dataset) -> str | None:
    """Where nanoGPT's sample.py finds meta.pkl: beside the checkpoint, or data/<dataset>/ (beside out_dir, or here)."""
    folder = os.path.dirname(os.path.abspath(ckpt_path))
    found = [os.path.join(folder, "meta.pkl")]
    if isinstance(dataset, str) and dataset:
        found += [os.path.join(folder, "..", "data", dataset, "meta.pkl"), os.path.join("data", dataset, "meta.pkl")]
    return next((os.path.normpath(path) for path in found if os.path.isfile(path)), None)


def nanogpt_model(ckpt: dict, char_vocab: bool) -> NanoGPTForCausalLM:
    """nanoGPT's weights in NanoGPTForCausalLM: compile prefix stripped, mask buffers dropped, exact GELU."""
    args, eot = ckpt["model_args"], None if char_vocab else GPT2_VOCAB_SIZE - 1  # <|endoftext|> is GPT-2 BPE's
    model = NanoGPTForCausalLM(NanoGPTConfig(
        **{k: args[k] for k in MODEL_ARGS}, bias=bool(args.get("bias", True)), dropout=float(args.get("dropout", 0.0)),
        activation_function="gelu", bos_token_id=eot, eos_token_id=eot))
    # torch.compile's wrapper names ('_orig_mod.'), and the causal mask nanoGPT registers without flash attention
    state = {k.removeprefix("_orig_mod."): v for k, v in ckpt["model"].items() if not k.endswith(".attn.bias")}
    expected = model.state_dict()
    shape = {k: tuple(v.shape) for k, v in state.items()}
    if wrong := sorted(k for k, v in expected.items() if shape.pop(k, None) != tuple(v.shape)) + sorted(shape):
        raise UserError(f"the checkpoint's weights do not match its model_args ({', '.join(wrong[:3])}...)")
    model.load_state_dict(state, strict=True)
    return model.eval()


def convert_nanogpt(ckpt: str, out: str, meta: str | None = None, force: bool = False) -> None:
    """nanoGPT's ckpt.pt (+ meta.pkl for a character model) -> model, tokenizer and model card."""
    ckpt_path, ckpt = ckpt, load_nanogpt(ckpt)
    config = ckpt.get("config") or {}  # train.py's settings
    meta = meta or find_meta(ckpt_path, config.get("dataset"))
    check_output(out, force, ckpt_path, meta)
    stoi = load_meta(meta) if meta else None
    model = nanogpt_model(ckpt, char_vocab=stoi is not None)
    vocab_size = model.config.vocab_size
    if stoi is not None and len(stoi) > vocab_size:
        raise UserError(f"'{meta}' has {len(stoi)} characters but the model's vocab_size is {vocab_size}")
    if stoi is None and vocab_size < GPT2_VOCAB_SIZE:
        raise UserError(f"vocab_size {vocab_size} is smaller than GPT-2's and no meta.pkl is beside the checkpoint "
                        "or in data/<dataset>/; pass --meta path/to/meta.pkl")
    tokenizer = char_tokenizer_from_stoi(stoi) if stoi else gpt2_tokenizer(model_max_length=model.config.block_size)
    steps = ckpt.get("iter_num")
    # tokens per step; nanoGPT's config holds the global gradient_accumulation_steps (before its DDP division)
    per_step = [config.get(k) for k in ("gradient_accumulation_steps", "batch_size", "block_size")]
    info = {"title": os.path.basename(os.path.abspath(out)), "recipe": "nanoGPT train.py", "steps": steps,
            "source": f"Converted from nanoGPT's `{os.path.basename(ckpt_path)}` with `nanogpt-hf convert-nanogpt`: "
                      "the same logits as nanoGPT's model.py.", "dataset": config.get("dataset"),
            "settings": {k: v for k, v in config.items() if isinstance(v, (int, float, str, bool))} or None,
            "tokens_seen": steps * math.prod(per_step) if all(isinstance(v, int) for v in [steps, *per_step]) else None,
            # the val loss of the evaluation that saved this checkpoint
            "val_loss": float(ckpt["best_val_loss"]) if ckpt.get("best_val_loss") is not None else None}
    with atomic_output(out) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        write_model_card(tmp, info)
    kind = f"character tokenizer from {meta}" if stoi else "GPT-2 BPE tokenizer"
    print(f"wrote {out}: nanoGPT model of {model.get_num_params() / 1e6:.2f}M parameters, {kind}")


def convert_checkpoint(source: str, out: str, force: bool, convert=None) -> None:
    """Any checkpoint that load_pretrained reads -> ours, or `convert(ours)` (a stock GPT2LMHeadModel, transformers'
    NanoChatForCausalLM), with its tokenizer and card."""
    check_output(out, force, source)
    model, tokenizer = load_pretrained(source)
    hub_id = source if is_hub_id(source) else None
    openai = hub_id is not None and hub_id.removeprefix("openai-community/") in GPT2_NAMES
    target = convert(model) if convert else model  # a switch the target cannot express is refused before writing
    with atomic_output(out) as tmp:
        target.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if os.path.isfile(os.path.join(source, "loss.png")):
            shutil.copyfile(os.path.join(source, "loss.png"), os.path.join(tmp, "loss.png"))
        write_model_card(tmp, {"title": os.path.basename(os.path.abspath(out)), "base_model": hub_id,
                               "license": "mit" if openai else None, "source": f"Converted from `{source}` by "
                               "nanogpt-hf: the same logits as the original."})
    print(f"wrote {out}: {type(target).__name__} from '{source}'"
          f"{'' if tokenizer else ', without a tokenizer (it had none)'}")


def export_gpt2(checkpoint: str, out: str, force: bool = False) -> None:
    convert_checkpoint(checkpoint, out, force, gpt2.to_gpt2)


def export_nanochat(checkpoint: str, out: str, force: bool = False) -> None:
    convert_checkpoint(checkpoint, out, force, to_nanochat)


def import_gpt2(id_or_dir: str, out: str, force: bool = False) -> None:
    convert_checkpoint(id_or_dir, out, force)


def push(out_dir: str, repo_id: str, private: bool, token: str | None, message: str | None) -> None:
    print(f"pushed {out_dir} to {push_checkpoint(out_dir, repo_id, private, token, message)}")


class Parser(argparse.ArgumentParser):
    def error(self, message):  # usage mistakes are one `error:` line too
        raise UserError(f"{self.prog}: {message}; see --help")


COMMANDS = [  # (function, help, positional arguments named as its parameters)
    (convert_nanogpt, "nanoGPT ckpt.pt -> nanogpt_hf (meta.pkl: beside CKPT or in data/<dataset>/)", ["ckpt", "out"]),
    (export_gpt2, "nanogpt_hf (or GPT-2) checkpoint -> stock GPT2LMHeadModel folder", ["checkpoint", "out"]),
    (export_nanochat, "nanogpt_hf checkpoint with nanochat's switches -> NanoChatForCausalLM", ["checkpoint", "out"]),
    (import_gpt2, "gpt2 ... gpt2-xl, or any GPT-2 folder or Hub id -> nanogpt_hf folder", ["id_or_dir", "out"]),
    (push, "upload a checkpoint folder's files (not state/) to the Hub, token from HF_TOKEN", ["out_dir", "repo_id"])]


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="nanogpt-hf", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for run, help, positional in COMMANDS:
        sub = commands.add_parser(run.__name__.replace("_", "-"), help=help, description=help)
        sub.set_defaults(run=run)
        for name in positional:
            sub.add_argument(name, metavar=name.upper())
        if run is not push:
            sub.add_argument("--force", action="store_true", help="replace OUT if it holds a converted checkpoint")
    commands.choices["convert-nanogpt"].add_argument("--meta", metavar="meta.pkl", help="nanoGPT's character vocab")
    commands.choices["push"].add_argument("--private", action="store_true", help="create the repo private if new")
    commands.choices["push"].add_argument("--token", help="a Hub token (default: HF_TOKEN or the cached login)")
    commands.choices["push"].add_argument("--message", help="the commit message")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = vars(build_parser().parse_args(argv))
    del args["command"]
    args.pop("run")(**args)
