"""Typed settings: dataclasses, YAML recipes and `--key=value` overrides, with helpful errors and `--help`.

Every command (train, sample, bench, prepare) describes its settings as one dataclass whose fields carry a help
text (`setting(default, "help")`). `parse_command` turns `[POSITIONAL|RECIPE.yaml] [--key=value | --key value ...]`
into an instance: YAML recipe first, then command-line overrides, every value checked against the field's type.
Mistakes raise UserError with one line naming the setting and the fix.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import sys
import types
import typing
from typing import Any, Literal

import yaml

from .errors import UserError


def setting(default: Any, help: str, path: bool = False) -> Any:
    """A dataclass field with a default and the help text shown by --help. path: a file or folder, where a leading
    ~/ means the home folder (the shell expands ~ only at the start of a word: --out_dir=~/runs arrives as typed)."""
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return dataclasses.field(default=default, metadata={"help": help, "path": path})


_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(str(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join("none" if a is type(None) else _type_name(a) for a in typing.get_args(tp))
    if tp is float:
        return "a number"
    if tp is int:
        return "an integer"
    if tp is bool:
        return "true or false"
    if tp is str:
        return "a string"
    return getattr(tp, "__name__", str(tp))


def convert_value(name: str, tp: Any, raw: Any) -> Any:
    """Convert `raw` (a command-line string or a YAML value) to the field type `tp`, or raise UserError."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if type(None) in args and (raw is None or (isinstance(raw, str) and raw.lower() in ("none", "null", ""))):
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return convert_value(name, arg, raw)
            except UserError:
                pass
        raise UserError(f"setting '{name}' expects {_type_name(tp)}, got {raw!r}")
    if origin is Literal:
        choices = typing.get_args(tp)
        for choice in choices:
            if raw == choice or (isinstance(raw, str) and raw == str(choice)):
                return choice
        raise UserError(f"setting '{name}' must be one of {', '.join(map(str, choices))}; got {raw!r}")
    try:
        if tp is bool:
            if isinstance(raw, bool):
                return raw
            if isinstance(raw, str) and raw.lower() in _TRUE | _FALSE:
                return raw.lower() in _TRUE
            raise ValueError
        if tp is int:
            if isinstance(raw, bool):
                raise ValueError
            if isinstance(raw, float):
                if raw != int(raw):
                    raise ValueError
                return int(raw)
            if isinstance(raw, str):
                raw = raw.replace("_", "")
                value = float(raw) if any(c in raw for c in ".eE") else int(raw)
                if value != int(value):
                    raise ValueError
                return int(value)
            return int(raw)
        if tp is float:
            if isinstance(raw, bool):
                raise ValueError
            return float(raw)  # an int for a float setting is fine (nanoGPT's configurator rejects it)
        if tp is str:
            # YAML reads an empty value as null and off/no/yes as booleans: str() would make them 'None' or 'False'
            if raw is None or isinstance(raw, bool):
                raise UserError(f"setting '{name}' expects a string, got {raw!r}; in a YAML recipe, quote the "
                                f"value (e.g. '{'' if raw is None else str(raw).lower()}') or remove the line")
            if isinstance(raw, (dict, list)):
                raise ValueError
            return str(raw)
        if origin is list:
            (item,) = typing.get_args(tp)
            if isinstance(raw, str):
                raw = [r for r in raw.split(",") if r]
            return [convert_value(name, item, r) for r in raw]
    except (TypeError, ValueError):
        raise UserError(f"setting '{name}' expects {_type_name(tp)}, got {raw!r}") from None
    return raw


def field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def unknown_setting(name: str, known: typing.Iterable[str]) -> UserError:
    known = list(known)
    # an abbreviation ('lr' for 'learning_rate') or a prefix beats edit distance ('lr' is close to 'min_lr')
    initials = {"".join(p[0] for p in k.split("_")): k for k in known}
    close = [initials[name]] if name in initials else [k for k in known if k.startswith(name)][:1]
    close = close or difflib.get_close_matches(name, known, n=1, cutoff=0.5)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return UserError(f"unknown setting '{name}'{hint}; --help lists them all")


def apply(obj: Any, values: dict[str, Any], source: str = "") -> Any:
    """Return a copy of dataclass `obj` with `values` converted and applied; unknown names raise UserError."""
    types_ = field_types(type(obj))
    paths = {f.name for f in dataclasses.fields(obj) if f.metadata.get("path")}
    changes = {}
    for name, raw in values.items():
        key = name.replace("-", "_")
        if key not in types_:
            err = unknown_setting(key, types_)
            raise UserError(f"{source}: {err}" if source else str(err))
        changes[key] = convert_value(key, types_[key], raw)
        if key in paths and isinstance(changes[key], str) and changes[key].startswith("~/"):
            changes[key] = os.path.expanduser(changes[key])
    return dataclasses.replace(obj, **changes)


SHIPPED_RECIPES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "recipes")


def find_recipe(path: str) -> str:
    """A recipe file, or a shipped one by name ('recipes/shakespeare_char.yaml' or 'shakespeare_char.yaml' from any
    folder: installed console scripts run where the recipes/ link of a clone is not)."""
    if os.path.isfile(path):
        return path
    shipped = os.path.join(SHIPPED_RECIPES, os.path.basename(path))
    if os.path.dirname(os.path.normpath(path)) in ("", "recipes") and os.path.isfile(shipped):
        return shipped
    shipped = ", ".join(sorted(os.listdir(SHIPPED_RECIPES)))
    raise UserError(f"recipe '{path}' does not exist; the shipped ones: {shipped}")


def load_recipe(path: str) -> dict[str, Any]:
    path = find_recipe(path)
    try:
        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh) or {}
    except yaml.YAMLError as exc:
        line = getattr(getattr(exc, "problem_mark", None), "line", None)
        where = f" (line {line + 1})" if line is not None else ""
        raise UserError(f"recipe '{path}' is not valid YAML{where}; fix the syntax") from None
    if not isinstance(data, dict):
        raise UserError(f"recipe '{path}' must be a mapping of setting: value")
    return data


def help_text(cls: type, prog: str, usage: str, description: str, epilog: str = "", defaults: Any = None,
              recipes: list[str] = ()) -> str:
    after = f" after {', '.join(recipes)}" if recipes else ""
    lines = [f"usage: {prog} {usage}", "", description.strip(), "", f"settings (default{after}, meaning):"]
    defaults = cls() if defaults is None else defaults
    for f in dataclasses.fields(cls):
        default = getattr(defaults, f.name)
        lines.append(f"  --{f.name}={default!r}" if isinstance(default, str) else f"  --{f.name}={default}")
        lines.append(f"      {f.metadata.get('help', '')}")
    if epilog:
        lines += ["", epilog.strip()]
    return "\n".join(lines)


def parse_command(
    cls: type,
    argv: list[str] | None,
    prog: str,
    description: str,
    positional: str | None = None,
    recipes: bool = False,
    epilog: str = "",
    default_recipe: str | None = None,
) -> tuple[Any, list[str]]:
    """Parse `argv` into an instance of `cls`.

    positional: the field that takes a bare argument (e.g. prepare's source); recipes: a bare `*.yaml` argument is a
    recipe whose values come before command-line overrides; default_recipe: the recipe whose values are the defaults
    when argv names none (--help then lists them). Returns (settings, explicit): explicit maps each setting given by a
    recipe or on the command line (not by default_recipe) to its final value (resume uses it to see what the user
    changed).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    types_ = field_types(cls)
    usage = ("[RECIPE.yaml ...] " if recipes else "") + (f"[{positional.upper()}] " if positional else "")
    usage += "[--key=value ...]"
    named = [a for a in argv if recipes and not a.startswith("-") and a.endswith((".yaml", ".yml"))]
    base_recipes = named or ([default_recipe] if default_recipe else [])
    if "-h" in argv or "--help" in argv:
        defaults = cls()
        for path in base_recipes:
            defaults = apply(defaults, load_recipe(path), source=path)
        print(help_text(cls, prog, usage, description, epilog, defaults, [os.path.basename(p) for p in base_recipes]))
        raise SystemExit(0)
    recipe_paths, bare, overrides = [], [], {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        if arg.startswith("--"):
            name, eq, value = arg[2:].partition("=")
            key = name.replace("-", "_")
            if key not in types_:
                raise unknown_setting(key, types_)
            if not eq:
                nxt = argv[i] if i < len(argv) else None
                is_bool = bool in (types_[key], *typing.get_args(types_[key]))
                if is_bool and (nxt is None or nxt.lower() not in _TRUE | _FALSE):
                    value = "true"  # a bare --flag switches a boolean on
                elif nxt is None or nxt.startswith("--"):
                    raise UserError(f"setting '{key}' needs a value: --{key}=VALUE")
                else:
                    value, i = nxt, i + 1
            overrides[key] = value
        elif recipes and arg.endswith((".yaml", ".yml")):
            recipe_paths.append(arg)
        else:
            bare.append(arg)
    if bare:
        if positional is None or len(bare) > 1:
            glob_hint = ""
            if positional and all(os.path.exists(a) for a in bare):  # most likely a glob the shell expanded
                exts = {os.path.splitext(a)[1] for a in bare}
                pattern = os.path.join(os.path.dirname(bare[0]) or ".", "*" + (exts.pop() if len(exts) == 1 else ""))
                glob_hint = f" (for a glob, quote it: '{pattern}')"
            raise UserError(f"unexpected argument '{bare[-1] if positional else bare[0]}'; settings are --key=value"
                            + glob_hint)
        overrides.setdefault(positional, bare[0])
    obj, explicit = cls(), {}
    if not recipe_paths and default_recipe:
        obj = apply(obj, load_recipe(default_recipe), source=default_recipe)
    for path in recipe_paths:
        values = load_recipe(path)
        obj = apply(obj, values, source=path)
        explicit.update(values)
    obj = apply(obj, overrides)
    explicit.update(overrides)
    return obj, {k: getattr(obj, k) for k in (name.replace("-", "_") for name in explicit)}


def to_dict(obj: Any) -> dict[str, Any]:
    return dataclasses.asdict(obj)


def save_yaml(obj: Any, path: str) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        yaml.safe_dump(to_dict(obj), fh, sort_keys=False)


@dataclasses.dataclass
class TrainSettings:
    """Every setting of nanoGPT's train.py (same names and defaults: the GPT-2 124M run on OpenWebText), plus ours."""

    # I/O
    out_dir: str = setting("out", "the run folder: the best (or latest) model as a save_pretrained folder, resumable "
                                  "states in state/, metrics.jsonl, loss.png, train_config.yaml", path=True)
    eval_interval: int = setting(2000, "evaluate train/val loss (and save) every this many steps")
    log_interval: int = setting(1, "print a log line every this many steps")
    eval_iters: int = setting(200, "batches per split for each evaluation (spread over all processes)")
    eval_only: bool = setting(False, "evaluate once and exit (works with every init_from)")
    always_save_checkpoint: bool = setting(True, "save the model at every evaluation, not only when val loss improves")
    init_from: str = setting("scratch", "scratch | resume (continue out_dir) | gpt2, gpt2-medium, gpt2-large, gpt2-xl "
                                        "| any GPT-2 or nanogpt_hf checkpoint folder or Hub id (finetuning)", path=True)
    # trackers
    wandb_log: bool = setting(False, "log to Weights & Biases (same as --log_with=wandb)")
    wandb_project: str = setting("owt", "wandb project")
    wandb_run_name: str = setting("gpt2", "wandb run name")
    log_with: str = setting("", "trackers through accelerate: wandb, tensorboard (comma-separated); empty = none")
    # data
    dataset: str = setting("openwebtext", "a folder made by prepare.py, or a name under data_dir; the embedded "
                                          "corpora shakespeare_char and shakespeare are prepared on first use",
                            path=True)
    data_dir: str = setting("data", "where dataset names are looked up (and the embedded corpora prepared)", path=True)
    gradient_accumulation_steps: int = setting(40, "micro-batches per optimizer step over ALL processes (nanoGPT's "
                                                   "meaning: each of N processes runs this/N); tokens per step = "
                                                   "batch_size x gradient_accumulation_steps x block_size")
    batch_size: int = setting(12, "sequences per micro-batch per process")
    block_size: int = setting(1024, "context length (a checkpoint with a longer one is cropped)")
    # model
    n_layer: int = setting(12, "transformer blocks")
    n_head: int = setting(12, "attention heads")
    n_embd: int = setting(768, "embedding width")
    dropout: float = setting(0.0, "dropout; 0 for pretraining, 0.1+ for finetuning")
    bias: bool = setting(False, "biases in Linear and LayerNorm layers")
    # optimizer
    learning_rate: float = setting(6e-4, "max learning rate")
    max_iters: int = setting(600000, "total optimizer steps")
    weight_decay: float = setting(0.1, "AdamW weight decay (2-D weights only)")
    beta1: float = setting(0.9, "AdamW beta1")
    beta2: float = setting(0.95, "AdamW beta2")
    grad_clip: float = setting(1.0, "clip gradients at this norm; 0 disables")
    # learning rate schedule
    decay_lr: bool = setting(True, "warmup then cosine decay; false keeps learning_rate constant")
    warmup_iters: int = setting(2000, "linear warmup steps")
    lr_decay_iters: int = setting(600000, "steps of cosine decay (nanoGPT: about max_iters)")
    min_lr: float = setting(6e-5, "learning rate after decay (nanoGPT: about learning_rate / 10)")
    # system
    device: str = setting("auto", "auto (CUDA when present, else CPU) | cpu | cuda; accelerate places processes")
    backend: Literal["auto", "nccl", "gloo"] = setting(
        "auto", "DDP backend, used when several processes are launched: auto (accelerate: nccl on CUDA, gloo on CPU) "
                "| nccl | gloo")
    dtype: str = setting("auto", "auto (bf16 where the GPU or CPU supports it, fp16 with loss scaling on older GPUs, "
                                 "else float32) | bfloat16 | float16 | float32")
    compile: bool | None = setting(None, "torch.compile the model; default: on for CUDA where Triton works, off on CPU")
    seed: int = setting(1337, "seed of initialisation, dropout and batches (batch = f(seed, step, index))")
    # checkpoints
    keep_states: int = setting(2, "resumable states kept in out_dir/state/ (the newest ones; 0 keeps them all)")
    sample_at_end: bool = setting(True, "print a short sample from the final model")
    # Hub
    push_to_hub: bool = setting(False, "upload checkpoints to the Hugging Face Hub")
    hub_model_id: str = setting("", "Hub repository, e.g. user/nanogpt-shakespeare (default: out_dir's name)")
    hub_private: bool = setting(False, "create the Hub repository as private")
    hub_strategy: Literal["end", "best", "every_save"] = setting("end", "when to upload: end | best | every_save")
