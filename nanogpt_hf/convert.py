"""`nanogpt-hf`: convert checkpoints between nanoGPT, nanogpt_hf and stock GPT-2, and push them to the Hub.

    nanogpt-hf convert-nanogpt CKPT.pt OUT_DIR [--meta meta.pkl]   nanoGPT's ckpt.pt -> our save_pretrained folder
    nanogpt-hf export-gpt2 CHECKPOINT OUT_DIR                      ours -> a stock GPT2LMHeadModel folder
    nanogpt-hf import-gpt2 ID_OR_DIR OUT_DIR                       any GPT-2 checkpoint -> ours
    nanogpt-hf push OUT_DIR REPO_ID [--private]                    upload a checkpoint folder to the Hub

Every output folder is complete or absent: it is written to a hidden temporary sibling and renamed into place at
the end. An existing non-empty OUT_DIR is refused unless --force. Mistakes (missing or corrupt files, a file that is
not a checkpoint, an unreachable Hub id) are UserErrors: one line, exit status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pickle
import re
import shutil
import tempfile
import zipfile

import torch

from .checkpoint import STATE_DIR
from .configuration_nanogpt import NanoGPTConfig
from .errors import UserError, first_line
from .hub import push_checkpoint, write_model_card
from .modeling_nanogpt import NanoGPTForCausalLM
from .tokenization import GPT2_VOCAB_SIZE, char_tokenizer_from_stoi, gpt2_tokenizer

COMPILE_PREFIX = "_orig_mod."  # torch.compile wraps the model; nanoGPT saves the wrapper's state dict
MODEL_ARGS = ("n_layer", "n_head", "n_embd", "block_size", "vocab_size")
OPENAI_GPT2 = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl", "openai-community/gpt2", "openai-community/gpt2-medium",
               "openai-community/gpt2-large", "openai-community/gpt2-xl")


# ----------------------------------------------------------------------------------------------------------------
# Output folders: all or nothing


def check_output_dir(out_dir: str, force: bool = False) -> None:
    """Refuse early (before any work) to write over a file or a non-empty folder without --force."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise UserError(f"output '{out_dir}' exists and is a file; choose a folder path")
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        if not force:
            raise UserError(f"output folder '{out_dir}' is not empty; choose another or pass --force to replace it")
        if not os.path.isfile(os.path.join(out_dir, "config.json")):  # --force must not wipe an arbitrary folder
            raise UserError(f"output folder '{out_dir}' is not a checkpoint folder (no config.json); --force only "
                            "replaces checkpoints: choose another folder")
        run_files = [n for n in (STATE_DIR, "metrics.jsonl", "train_config.yaml")
                     if os.path.exists(os.path.join(out_dir, n))]
        if run_files:  # a train.py out_dir: its states and logs would go too
            raise UserError(f"output folder '{out_dir}' is a training run's out_dir (it holds {', '.join(run_files)}); "
                            "--force only replaces exported checkpoints: choose another folder")


@contextlib.contextmanager
def staged_output(out_dir: str, force: bool = False):
    """Yield a temporary sibling folder to write into; on success it replaces out_dir, on failure it vanishes."""
    check_output_dir(out_dir, force)
    out_dir = os.path.abspath(out_dir)
    parent, name = os.path.split(out_dir)
    try:
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=parent)  # same disk, so the final rename is atomic
    except OSError as exc:  # a file where a folder should be, no permission, a read-only disk
        raise UserError(f"cannot create OUT_DIR '{out_dir}': {exc.strerror} ({exc.filename}); "
                        "choose another folder") from None
    try:
        yield tmp
        old = None
        if os.path.isdir(out_dir):  # empty, or --force: move it aside, then swap
            old = tempfile.mkdtemp(prefix=f".{name}.old-", dir=parent)
            os.rename(out_dir, os.path.join(old, name))
        os.rename(tmp, out_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def refuse_input_inside_output(src: str | None, out_dir: str) -> None:
    """Replacing OUT_DIR (--force) must not delete the input: refuse an input that is OUT_DIR or inside it."""
    if src is None or not os.path.exists(src):
        return
    src, out = os.path.realpath(src), os.path.realpath(out_dir)
    if src == out or src.startswith(out + os.sep):
        raise UserError(f"OUT_DIR '{out_dir}' holds the input '{src}'; write to another folder")


# ----------------------------------------------------------------------------------------------------------------
# nanoGPT ckpt.pt -> nanogpt_hf


def load_nanogpt_checkpoint(path: str) -> dict:
    """torch.load a nanoGPT ckpt.pt safely (weights_only: tensors, dicts, numbers and strings only) and check it."""
    if not os.path.isfile(path):
        raise UserError(f"checkpoint '{path}' does not exist" if not os.path.exists(path)
                        else f"checkpoint '{path}' is not a file")
    if not zipfile.is_zipfile(path):  # torch.save has written zip archives since torch 1.6
        raise UserError(f"'{path}' is not a PyTorch checkpoint (not a torch.save file, or corrupt or truncated)")
    try:
        # weights_only: nanoGPT's ckpt.pt holds only tensors, dicts, numbers and strings, and unpickling anything
        # else could run code. mmap: the optimizer state in the file (2x the model) is never read into memory.
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
        raise UserError(
            f"'{path}' holds objects other than tensors, dicts, numbers and strings"
            f"{' (' + found.group(1) + ')' if found else ''}, so it is not loaded: unpickling them could run code"
        ) from None
    except Exception as exc:
        raise UserError(f"cannot read '{path}' as a PyTorch checkpoint (corrupt or truncated?): "
                        f"{first_line(exc)}") from None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("model"), dict) or not isinstance(
        ckpt.get("model_args"), dict
    ):
        keys = ", ".join(map(str, list(ckpt)[:6])) if isinstance(ckpt, dict) else type(ckpt).__name__
        raise UserError(f"'{path}' is not a nanoGPT checkpoint (expected 'model' and 'model_args', found {keys})")
    missing = [k for k in MODEL_ARGS if k not in ckpt["model_args"]]
    if missing:
        raise UserError(f"'{path}': model_args lacks {', '.join(missing)}; is it a nanoGPT ckpt.pt?")
    return ckpt


def _restricted_unpickle(fh):
    """meta.pkl is a plain dict of strings and ints: refuse any class or function (pickle can run code)."""

    class NoGlobals(pickle.Unpickler):
        def find_class(self, module, name):
            raise pickle.UnpicklingError(f"meta.pkl refers to {module}.{name}; only plain dicts are accepted")

    return NoGlobals(fh).load()


def load_meta(path: str) -> dict[str, int]:
    """A nanoGPT meta.pkl ({'vocab_size', 'itos', 'stoi'}) -> its stoi."""
    if not os.path.isfile(path):
        raise UserError(f"meta file '{path}' does not exist")
    try:
        with open(path, "rb") as fh:
            meta = _restricted_unpickle(fh)
    except Exception as exc:
        raise UserError(f"cannot read '{path}' as a nanoGPT meta.pkl: {first_line(exc)}") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("stoi"), dict):
        raise UserError(f"'{path}' is not a character vocabulary (no 'stoi' dict); GPT-2 BPE models need no --meta")
    return meta["stoi"]


def find_meta(ckpt_path: str, ckpt: dict) -> str | None:
    """Where nanoGPT's sample.py would find meta.pkl: beside the checkpoint, or data/<dataset>/meta.pkl (relative
    to the nanoGPT folder that holds out_dir, or to the current directory)."""
    ckpt_dir = os.path.dirname(os.path.abspath(ckpt_path))
    candidates = [os.path.join(ckpt_dir, "meta.pkl")]
    dataset = (ckpt.get("config") or {}).get("dataset")
    if isinstance(dataset, str) and dataset:
        candidates += [os.path.join(ckpt_dir, "..", "data", dataset, "meta.pkl"),
                       os.path.join("data", dataset, "meta.pkl")]
    return next((os.path.normpath(c) for c in candidates if os.path.isfile(c)), None)


def nanogpt_state_dict(ckpt: dict) -> dict[str, torch.Tensor]:
    """nanoGPT's state dict with our names: compile prefix stripped, causal-mask buffers dropped."""
    state = {}
    for key, value in ckpt["model"].items():
        key = key.removeprefix(COMPILE_PREFIX)
        if key.endswith(".attn.bias"):  # nanoGPT without flash attention registers its tril mask as a buffer
            continue
        state[key] = value
    if "lm_head.weight" not in state and "transformer.wte.weight" in state:
        state["lm_head.weight"] = state["transformer.wte.weight"]  # tied in nanoGPT
    return state


def nanogpt_model(ckpt: dict, char_vocab: bool) -> NanoGPTForCausalLM:
    """Build NanoGPTForCausalLM from a nanoGPT checkpoint: same weights, exact GELU (what nanoGPT trains with)."""
    args = ckpt["model_args"]
    eot = None if char_vocab else GPT2_VOCAB_SIZE - 1  # <|endoftext|> only exists in GPT-2 BPE
    try:
        config = NanoGPTConfig(
            n_layer=args["n_layer"], n_head=args["n_head"], n_embd=args["n_embd"], block_size=args["block_size"],
            vocab_size=args["vocab_size"], bias=bool(args.get("bias", True)), dropout=float(args.get("dropout", 0.0)),
            activation_function="gelu", bos_token_id=eot, eos_token_id=eot,
        )
    except ValueError as exc:
        raise UserError(f"the checkpoint's model_args are invalid: {first_line(exc)}") from None
    model = NanoGPTForCausalLM(config)
    state = nanogpt_state_dict(ckpt)
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        what = (f"missing {', '.join(missing[:3])}" if missing else "") + ("; " if missing and unexpected else "") + (
            f"unexpected {', '.join(unexpected[:3])}" if unexpected else "")
        raise UserError(f"the checkpoint's weights do not match its model_args ({what})")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        detail = next((line.strip() for line in str(exc).splitlines() if "size mismatch" in line), first_line(exc))
        raise UserError(f"the checkpoint's weights do not match its model_args: {detail}") from None
    model.eval()
    return model


def convert_nanogpt(ckpt_path: str, out_dir: str, meta_path: str | None = None, force: bool = False) -> str:
    """nanoGPT ckpt.pt (+ meta.pkl for character models) -> save_pretrained folder with tokenizer and model card."""
    check_output_dir(out_dir, force)
    ckpt = load_nanogpt_checkpoint(ckpt_path)
    meta_path = meta_path or find_meta(ckpt_path, ckpt)
    for src in (ckpt_path, meta_path):
        refuse_input_inside_output(src, out_dir)
    stoi = load_meta(meta_path) if meta_path else None
    model = nanogpt_model(ckpt, char_vocab=stoi is not None)
    vocab_size = model.config.vocab_size
    if stoi is not None:
        tokenizer = char_tokenizer_from_stoi(stoi)
        if len(stoi) > vocab_size:
            raise UserError(f"'{meta_path}' has {len(stoi)} characters but the model's vocab_size is {vocab_size}")
        tokenizer_note = f"character tokenizer from {meta_path} ({len(stoi)} characters)"
    else:
        if vocab_size < GPT2_VOCAB_SIZE:
            raise UserError(
                f"vocab_size {vocab_size} is smaller than GPT-2's {GPT2_VOCAB_SIZE} and no meta.pkl was found "
                "beside the checkpoint or in data/<dataset>/; pass --meta path/to/meta.pkl"
            )
        tokenizer = gpt2_tokenizer(model_max_length=model.config.block_size)
        tokenizer_note = "GPT-2 BPE tokenizer (no meta.pkl found)"

    config = ckpt.get("config") or {}
    iter_num = ckpt.get("iter_num")
    info = {
        "title": os.path.basename(os.path.abspath(out_dir)),
        "source": f"Converted from the nanoGPT checkpoint `{os.path.basename(ckpt_path)}` with "
                  "`nanogpt-hf convert-nanogpt`; it computes the same logits as nanoGPT's model.py (generate() also "
                  "stops at an end-of-text token, which nanoGPT's sampling never does).",
        "recipe": "nanoGPT train.py",
        "dataset": config.get("dataset"),
        "settings": {k: v for k, v in config.items() if isinstance(v, (int, float, str, bool))} or None,
    }
    if isinstance(iter_num, int):
        info["steps"] = iter_num
        # nanoGPT's config holds the global gradient_accumulation_steps (captured before the DDP division)
        per_step = [config.get(k) for k in ("gradient_accumulation_steps", "batch_size", "block_size")]
        if all(isinstance(v, int) for v in per_step):
            info["tokens_seen"] = iter_num * per_step[0] * per_step[1] * per_step[2]
    if ckpt.get("best_val_loss") is not None:
        # the val loss measured when this checkpoint was saved (nanoGPT saves on that evaluation)
        info["val_loss"] = float(ckpt["best_val_loss"])

    with staged_output(out_dir, force) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        write_model_card(tmp, info)
    a = model.config
    print(f"wrote {out_dir}: nanoGPT {a.n_layer} layers, {a.n_head} heads, {a.n_embd} wide, block {a.block_size}, "
          f"vocab {a.vocab_size}, {model.get_num_params() / 1e6:.2f}M params; {tokenizer_note}")
    return out_dir


# ----------------------------------------------------------------------------------------------------------------
# nanogpt_hf <-> stock GPT-2


def _load_our_checkpoint(path: str) -> NanoGPTForCausalLM:
    if not os.path.isdir(path):
        raise UserError(f"checkpoint folder '{path}' does not exist")
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        raise UserError(f"'{path}' is not a checkpoint folder (no config.json)")
    try:
        with open(config_path, encoding="utf-8") as fh:
            model_type = json.load(fh).get("model_type")
    except (OSError, ValueError, AttributeError) as exc:
        raise UserError(f"cannot read '{config_path}': {first_line(exc)}") from None
    if model_type != "nanogpt":
        raise UserError(f"'{path}' holds a {model_type!r} model, not a nanogpt_hf checkpoint (model_type nanogpt)")
    try:
        return NanoGPTForCausalLM.from_pretrained(path, dtype=torch.float32)
    except Exception as exc:
        raise UserError(f"cannot load the checkpoint in '{path}': {first_line(exc)}") from None


def _saved_tokenizer(path: str):
    """The tokenizer saved in a local folder, or None."""
    names = ("tokenizer.json", "tokenizer_config.json", "vocab.json")
    if not any(os.path.isfile(os.path.join(path, name)) for name in names):
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as exc:
        raise UserError(f"cannot load the tokenizer in '{path}': {first_line(exc)}") from None


def export_gpt2(checkpoint: str, out_dir: str, force: bool = False) -> str:
    """Our checkpoint -> a folder stock transformers loads as GPT2LMHeadModel (no custom code), with its tokenizer."""
    check_output_dir(out_dir, force)
    refuse_input_inside_output(checkpoint, out_dir)
    model = _load_our_checkpoint(checkpoint)
    tokenizer = _saved_tokenizer(checkpoint)
    with staged_output(out_dir, force) as tmp:
        model.save_gpt2(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if os.path.isfile(os.path.join(checkpoint, "loss.png")):
            shutil.copyfile(os.path.join(checkpoint, "loss.png"), os.path.join(tmp, "loss.png"))
        name = os.path.basename(os.path.abspath(checkpoint))
        write_model_card(tmp, {"title": os.path.basename(os.path.abspath(out_dir)),
                               "source": f"Exported from the nanogpt_hf checkpoint `{name}` with `nanogpt-hf "
                                         "export-gpt2`; same logits as the original."})
    note = "" if tokenizer is not None else f" (note: '{checkpoint}' has no tokenizer, so neither has the export)"
    print(f"wrote {out_dir}: GPT2LMHeadModel ({model.config.activation_function} activation){note}")
    return out_dir


def import_gpt2(id_or_dir: str, out_dir: str, force: bool = False) -> str:
    """Any GPT2LMHeadModel checkpoint (Hub id or folder) -> our format, with its tokenizer (GPT-2 BPE by default)."""
    check_output_dir(out_dir, force)
    refuse_input_inside_output(id_or_dir, out_dir)
    local = os.path.isdir(id_or_dir)
    if not local and (id_or_dir.startswith((".", "/", "~")) or id_or_dir.count("/") > 1):
        raise UserError(f"folder '{id_or_dir}' does not exist (and it is not a Hub id such as gpt2 or user/model)")
    if local and not os.path.isfile(os.path.join(id_or_dir, "config.json")):
        raise UserError(f"'{id_or_dir}' is not a GPT-2 checkpoint folder (no config.json)")
    try:
        model = NanoGPTForCausalLM.from_gpt2(id_or_dir)
    except OSError as exc:
        raise UserError(f"{first_line(exc)}") from None
    tokenizer = _saved_tokenizer(id_or_dir) if local else None
    if tokenizer is None and not local and id_or_dir not in OPENAI_GPT2:  # OpenAI's BPE is ours, verified offline
        from transformers import AutoTokenizer

        with contextlib.suppress(Exception):  # the Hub copy if there is one; GPT-2 BPE otherwise
            tokenizer = AutoTokenizer.from_pretrained(id_or_dir)
    if tokenizer is None and model.config.vocab_size >= GPT2_VOCAB_SIZE:
        tokenizer = gpt2_tokenizer(model_max_length=model.config.block_size)
    info = {"title": os.path.basename(os.path.abspath(out_dir)),
            "source": f"Imported from the GPT-2 checkpoint `{id_or_dir}` with `nanogpt-hf import-gpt2`; same logits "
                      "as transformers' GPT2LMHeadModel (GPT-2's activation kept)."}
    if not local:
        info["base_model"] = id_or_dir
        if id_or_dir in OPENAI_GPT2:
            info["license"] = "mit"
    with staged_output(out_dir, force) as tmp:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        write_model_card(tmp, info)
    note = "" if tokenizer is not None else "; no tokenizer found, none written"
    print(f"wrote {out_dir}: nanogpt_hf model from GPT-2 '{id_or_dir}' ({model.config.n_layer} layers){note}")
    return out_dir


# ----------------------------------------------------------------------------------------------------------------
# Command line


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # usage mistakes are UserErrors too: one line, exit 2
        raise UserError(f"{self.prog}: {message}; see --help")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="nanogpt-hf", description=__doc__.split("\n\nEvery")[0],
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("convert-nanogpt", help="nanoGPT ckpt.pt -> nanogpt_hf folder (model, tokenizer, card)",
                       description="Convert a nanoGPT ckpt.pt (compiled or not) into a save_pretrained folder. "
                       "Character models need nanoGPT's meta.pkl: it is looked for beside CKPT and in "
                       "data/<dataset>/; without one, the GPT-2 BPE tokenizer is used.")
    p.add_argument("ckpt", metavar="CKPT.pt")
    p.add_argument("out_dir", metavar="OUT_DIR")
    p.add_argument("--meta", metavar="meta.pkl", help="nanoGPT's character vocabulary (data/<dataset>/meta.pkl)")
    p.add_argument("--force", action="store_true", help="replace OUT_DIR if it holds a checkpoint")
    p.set_defaults(run=lambda a: convert_nanogpt(a.ckpt, a.out_dir, meta_path=a.meta, force=a.force))

    p = sub.add_parser("export-gpt2", help="nanogpt_hf checkpoint -> stock GPT2LMHeadModel folder",
                       description="Write a plain GPT2LMHeadModel folder (plus tokenizer) that transformers loads "
                       "with no custom code.")
    p.add_argument("checkpoint", metavar="CHECKPOINT")
    p.add_argument("out_dir", metavar="OUT_DIR")
    p.add_argument("--force", action="store_true", help="replace OUT_DIR if it holds a checkpoint")
    p.set_defaults(run=lambda a: export_gpt2(a.checkpoint, a.out_dir, force=a.force))

    p = sub.add_parser("import-gpt2", help="GPT-2 checkpoint (Hub id or folder) -> nanogpt_hf folder",
                       description="Import gpt2, gpt2-medium, gpt2-large, gpt2-xl or any GPT2LMHeadModel folder.")
    p.add_argument("source", metavar="ID_OR_DIR")
    p.add_argument("out_dir", metavar="OUT_DIR")
    p.add_argument("--force", action="store_true", help="replace OUT_DIR if it holds a checkpoint")
    p.set_defaults(run=lambda a: import_gpt2(a.source, a.out_dir, force=a.force))

    p = sub.add_parser("push", help="upload a checkpoint folder to the Hugging Face Hub",
                       description="Upload the files at the top of OUT_DIR (model, tokenizer, card, loss curve; not "
                       "state/) to REPO_ID, creating it if needed. The token comes from HF_TOKEN or `hf auth login`.")
    p.add_argument("folder", metavar="OUT_DIR")
    p.add_argument("repo_id", metavar="REPO_ID")
    p.add_argument("--private", action="store_true",
                   help="create the repo private (an existing repo keeps its setting)")
    p.add_argument("--token", default=None, help="a Hub token (default: HF_TOKEN or the cached login)")
    p.add_argument("--message", default=None, help="the commit message")
    p.set_defaults(run=_push_command)
    return parser


def _push_command(args) -> None:
    url = push_checkpoint(args.folder, args.repo_id, private=args.private, token=args.token,
                          commit_message=args.message)
    print(f"pushed {args.folder} to {url}")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        raise UserError("choose a command: convert-nanogpt, export-gpt2, import-gpt2 or push")
    args.run(args)
    return 0


__all__ = ["convert_nanogpt", "export_gpt2", "import_gpt2", "load_nanogpt_checkpoint", "main"]
