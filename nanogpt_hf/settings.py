"""Typed settings: one dataclass per command, YAML recipes, `--key=value` overrides, `--help`, typo hints.

Each field declares its default, help text and allowed range; `parse_command` applies the recipe(s) (YAML, or
nanoGPT's `name = value` config files, read and never run), then the command line, converting each value to the
field's type; `validate` checks the ranges. Mistakes are one-line UserErrors.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import operator
import os
import sys
import types
import typing
from typing import Any, Literal

import yaml

from .common import UserError
from .configuration_nanogpt import ARCHITECTURE, NanoGPTConfig, allows

SHIPPED_RECIPES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "recipes")
RECIPE_SUFFIXES = (".yaml", ".yml", ".py")  # .py: a nanoGPT config file
_TRUE, _FALSE = {"true", "1", "yes", "on"}, {"false", "0", "no", "off"}
_ARITHMETIC = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}


def setting(default: Any, help: str, path: bool = False, range: str | None = None) -> Any:
    """A field with its --help text. path: a file or folder, where a leading ~/ means the home folder (the shell
    leaves --out_dir=~/runs as typed). range: the values allowed, as an interval: "[1, inf)", "[0, 1)", "(0, 1)"."""
    return dataclasses.field(default=default, metadata={"help": help, "path": path, "range": range})


def validate(obj: Any) -> Any:
    """Check every setting against its declared range (types and choices are checked as values are converted)."""
    for f in dataclasses.fields(obj):
        value, interval = getattr(obj, f.name), f.metadata.get("range")
        if interval and value is not None and not allows(interval, value):
            raise UserError(f"setting '{f.name}' must be in {interval}, got {value!r} ({f.metadata['help']})")
    return obj


def convert(name: str, tp: Any, raw: Any) -> Any:
    """A command-line string or YAML value as the field type `tp` (X, X | None, Literal[...]), or UserError."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        if raw is None or str(raw).lower() in ("none", "null", ""):
            return None
        return convert(name, next(a for a in args if a is not type(None)), raw)
    if typing.get_origin(tp) is Literal:
        if str(raw) not in map(str, args):
            raise UserError(f"setting '{name}' must be one of {', '.join(map(str, args))}; got {raw!r}")
        return next(a for a in args if str(a) == str(raw))
    if tp is str:
        if isinstance(raw, dict) and raw and name == "dataset":  # a mixture as a YAML mapping of folder: weight
            return ",".join(f"{k}:{v}" for k, v in raw.items())
        if raw is None or isinstance(raw, (bool, dict, list)):  # YAML read an empty value as null, off as False
            raise UserError(f"setting '{name}' expects a string, got {raw}; in a YAML recipe, quote the value")
        return str(raw)
    text = str(raw).lower().replace("_", "")
    if tp is bool and (isinstance(raw, bool) or isinstance(raw, str) and text in _TRUE | _FALSE):
        return raw if isinstance(raw, bool) else text in _TRUE
    try:
        if tp is float and not isinstance(raw, bool):
            return float(text)
        if tp is int and not isinstance(raw, bool):
            value = float(text) if any(c in text for c in ".e") else int(text)
            if value == int(value):
                return int(value)
    except (ValueError, TypeError, OverflowError):
        pass
    kind = {bool: "true or false", int: "an integer", float: "a number"}[tp]
    raise UserError(f"setting '{name}' expects {kind}, got {raw!r}")


REPLACED = {"hellaswag": "eval_tasks=hellaswag (lm-evaluation-harness's task; a local file: a task YAML, see README)",
            "hellaswag_limit": "eval_tasks_limit"}  # settings that were replaced: their new form


def unknown_setting(name: str, known: list[str]) -> UserError:
    if name in REPLACED:
        return UserError(f"setting '{name}' was replaced: use --{REPLACED[name]}")
    # an abbreviation ('lr' for 'learning_rate') or a prefix beats edit distance ('lr' is close to 'min_lr')
    initials = {"".join(p[0] for p in k.split("_")): k for k in known}
    close = [initials[name]] if name in initials else [k for k in known if k.startswith(name)][:1]
    close = close or difflib.get_close_matches(name, known, n=1, cutoff=0.5)
    return UserError(f"unknown setting '{name}'{f' (did you mean {close[0]!r}?)' if close else ''}; --help lists "
                     "them all")


def apply(obj: Any, values: dict[str, Any]) -> Any:
    """A copy of dataclass `obj` with `values` converted and applied; unknown names raise UserError."""
    hints = typing.get_type_hints(type(obj))
    fields = {f.name: f for f in dataclasses.fields(obj)}
    changes = {}
    for key, raw in values.items():
        key = key.replace("-", "_")
        if key not in fields:
            raise unknown_setting(key, list(fields))
        value = convert(key, hints[key], raw)
        path = fields[key].metadata.get("path") and isinstance(value, str) and value.startswith("~/")
        changes[key] = os.path.expanduser(value) if path else value
    return dataclasses.replace(obj, **changes)


def py_literal(node: ast.expr) -> Any:
    """A number, string, boolean or None, or arithmetic on numbers (nanoGPT's `5 * 8`); anything else: ValueError."""
    if isinstance(node, ast.BinOp) and type(node.op) in _ARITHMETIC:
        left, right = py_literal(node.left), py_literal(node.right)
        if {type(left), type(right)} <= {int, float}:
            return _ARITHMETIC[type(node.op)](left, right)
    value = ast.literal_eval(node)  # constants and signed numbers (containers are refused below)
    if value is not None and type(value) not in (int, float, str, bool):
        raise ValueError(value)
    return value


def read_py_config(path: str, text: str) -> dict[str, Any]:
    """nanoGPT's config file (`name = value` lines, comments) without running it: a UserError names any other line."""
    try:
        body = ast.parse(text, filename=path).body
    except SyntaxError as exc:
        raise UserError(f"{path}, line {exc.lineno}: {exc.msg}") from None
    values = {}
    for node in body:
        try:
            if not (isinstance(node, ast.Assign) and [type(t) for t in node.targets] == [ast.Name]):
                raise ValueError(node)
            values[node.targets[0].id] = py_literal(node.value)
        except (ValueError, TypeError, ZeroDivisionError):
            raise UserError(f"{path}, line {node.lineno}: only `name = value` lines with literal values are read "
                            f"(the file is never run): {text.splitlines()[node.lineno - 1].strip()}") from None
    return values


def load_recipe(path: str) -> dict[str, Any]:
    """A recipe's settings; a shipped recipe is found by name from any folder ('shakespeare_char.yaml')."""
    shipped = os.path.join(SHIPPED_RECIPES, os.path.basename(path))
    if not os.path.isfile(path) and os.path.dirname(os.path.normpath(path)) in ("", "recipes"):
        path = shipped
    if not os.path.isfile(path):
        names = ", ".join(sorted(os.listdir(SHIPPED_RECIPES)))
        raise UserError(f"recipe '{os.path.basename(path)}' does not exist; the shipped ones: {names}")
    with open(path, encoding="utf-8") as fh:
        data = read_py_config(path, fh.read()) if path.endswith(".py") else yaml.safe_load(fh) or {}
    if not isinstance(data, dict):
        raise UserError(f"recipe '{path}' must be a mapping of setting: value")
    return data


def print_help(defaults: Any, prog: str, usage: str, description: str, epilog: str, recipes: list[str]) -> None:
    after = f" after {', '.join(map(os.path.basename, recipes))}" if recipes else ""
    lines = [f"usage: {prog} {usage}", "", description.strip(), "", f"settings (default{after}, meaning):"]
    hints = typing.get_type_hints(type(defaults))
    for f in dataclasses.fields(defaults):
        value, choices = getattr(defaults, f.name), typing.get_args(hints[f.name])
        allowed = f" (one of: {', '.join(map(str, choices))})" if typing.get_origin(hints[f.name]) is Literal else ""
        lines += [f"  --{f.name}={value!r}" if isinstance(value, str) else f"  --{f.name}={value}",
                  f"      {f.metadata['help']}{allowed}"]
    print("\n".join(lines + (["", epilog.strip()] if epilog else [])))


def split_argv(argv: list[str], cls: type, recipes: bool) -> tuple[list[str], list[str], dict[str, str]]:
    """(recipes, bare arguments, --key=value overrides); a bare --flag switches a boolean on."""
    hints = typing.get_type_hints(cls)
    recipe_paths, bare, overrides = [], [], {}
    args = iter(argv)
    for arg in args:
        if arg.startswith("--"):
            key, eq, value = arg[2:].partition("=")
            key = key.replace("-", "_")
            if key not in hints:
                raise unknown_setting(key, list(hints))
            if not eq:
                is_bool = bool in (hints[key], *typing.get_args(hints[key]))
                value = "true" if is_bool else next(args, None)
                if value is None:
                    raise UserError(f"setting '{key}' needs a value: --{key}=VALUE")
            overrides[key] = value
        elif recipes and arg.endswith(RECIPE_SUFFIXES):
            recipe_paths.append(arg)
        else:
            bare.append(arg)
    return recipe_paths, bare, overrides


def parse_command(cls: type, argv: list[str] | None, prog: str, description: str, positional: str | None = None,
                  recipes: bool = False, epilog: str = "", default_recipe: str | None = None) -> tuple[Any, dict]:
    """Parse `[RECIPE.yaml|.py ...] [POSITIONAL] [--key=value ...]` into a validated instance of `cls`.

    default_recipe gives the defaults when argv names no recipe. Returns (settings, explicit): explicit maps each
    setting given by a named recipe or on the command line to its final value (a resume keeps the others).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    recipe_paths, bare, overrides = split_argv([a for a in argv if a not in ("-h", "--help")], cls, recipes)
    base = recipe_paths or ([default_recipe] if default_recipe else [])
    obj, explicit = cls(), {}
    for path in base:
        values = load_recipe(path)
        obj = apply(obj, values)
        explicit.update(values if recipe_paths else {})
    if "-h" in argv or "--help" in argv:  # the defaults shown are the recipes' values
        usage = ("[RECIPE.yaml|.py ...] " if recipes else "") + (f"[{positional.upper()}] " if positional else "")
        print_help(obj, prog, usage + "[--key=value ...]", description, epilog, base)
        raise SystemExit(0)
    if bare and (positional is None or len(bare) > 1):
        raise UserError(f"unexpected argument '{bare[-1]}'; settings are --key=value (quote a glob: '*.txt')")
    if bare:
        overrides.setdefault(positional, bare[0])
    obj = apply(obj, overrides)
    explicit.update(overrides)
    return validate(obj), {k: getattr(obj, k) for k in (name.replace("-", "_") for name in explicit)}


def save_yaml(values: dict, path: str) -> None:
    from .common import atomic_output

    with atomic_output(path) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        yaml.safe_dump(values, fh, sort_keys=False)


@dataclasses.dataclass
class RunSettings:
    """Every setting of nanoGPT's train.py but the model's (same names and defaults: the GPT-2 124M run), plus ours."""

    # I/O
    out_dir: str = setting("out", "the run folder: the best (or latest) model as a save_pretrained folder, resumable "
                                  "states in state/, metrics.jsonl, loss.png, train_config.yaml", path=True)
    eval_interval: int = setting(2000, "evaluate train/val loss (and save) every this many steps", range="[1, inf)")
    log_interval: int = setting(1, "print a log line every this many steps", range="[1, inf)")
    eval_iters: int = setting(200, "batches per split for each evaluation (spread over all processes)",
                              range="[1, inf)")
    eval_only: bool = setting(False, "evaluate once and exit (works with every init_from)")
    eval_tasks: str = setting("", "lm-evaluation-harness tasks at every evaluation, zero-shot, scored by this model: "
                                  "task names (hellaswag,arc_easy,winogrande,lambada_openai...) or task YAML files, "
                                  "comma-separated; loglikelihood and multiple-choice tasks (pip install -e "
                                  "\".[eval]\"); empty: off", path=True)
    eval_tasks_limit: int = setting(0, "the first N documents of each task at each evaluation and with eval_only "
                                       "(0: all)", range="[0, inf)")
    eval_tasks_final_limit: int = setting(0, "the first N documents of each task at the evaluation after the last "
                                             "step (0: all)", range="[0, inf)")
    always_save_checkpoint: bool = setting(True, "save the model at every evaluation, not only when val loss improves")
    init_from: str = setting("scratch", "scratch | resume (continue out_dir) | gpt2, gpt2-medium, gpt2-large, gpt2-xl "
                                        "| any GPT-2 or nanogpt_hf checkpoint folder or Hub id (finetuning)", path=True)
    # trackers
    wandb_log: bool = setting(False, "log to Weights & Biases (same as --log_with=wandb)")
    wandb_project: str = setting("owt", "wandb project")
    wandb_run_name: str = setting("gpt2", "wandb run name")
    log_with: str = setting("", "trackers through accelerate: wandb, tensorboard (comma-separated); empty = none")
    # data
    dataset: str = setting("openwebtext", "a folder made by prepare.py, or a name under data_dir (the embedded "
                                          "corpora shakespeare_char and shakespeare are prepared on first use); a "
                                          "mixture: folders with weights, data/web:0.7,data/code:0.3 (or a YAML "
                                          "mapping), each row drawn from a source by weight", path=True)
    data_dir: str = setting("data", "where dataset names are looked up (and the embedded corpora prepared)", path=True)
    gradient_accumulation_steps: int = setting(40, "micro-batches per optimizer step over ALL processes (nanoGPT's "
                                                   "meaning); tokens per step = batch_size x "
                                                   "gradient_accumulation_steps x block_size", range="[1, inf)")
    batch_size: int = setting(12, "sequences per micro-batch", range="[1, inf)")
    total_batch_size: int | None = setting(None, "tokens per optimizer step (nanochat's); when set, "
                                                 "gradient_accumulation_steps is derived: total_batch_size / "
                                                 "(batch_size x block_size)", range="[1, inf)")
    # optimizer
    optimizer: Literal["adamw", "muon"] = setting("adamw", "adamw (nanoGPT) | muon: Muon for the blocks' matrices, "
                                                           "AdamW for the rest (nanochat)")
    learning_rate: float = setting(6e-4, "max learning rate (AdamW's)", range="[0, inf)")
    muon_lr: float = setting(0.02, "Muon's max learning rate: learning_rate's schedule, scaled", range="(0, inf)")
    muon_momentum: float = setting(0.95, "Muon's momentum (Nesterov)", range="[0, 1)")
    max_iters: int = setting(600000, "total optimizer steps", range="[0, inf)")
    weight_decay: float = setting(0.1, "weight decay of the 2-D weights, AdamW's and Muon's", range="[0, inf)")
    beta1: float = setting(0.9, "AdamW beta1", range="[0, 1)")
    beta2: float = setting(0.95, "AdamW beta2", range="[0, 1)")
    grad_clip: float = setting(1.0, "clip gradients at this norm; 0 disables", range="[0, inf)")
    # learning rate schedule
    lr_schedule: Literal["cosine", "wsd", "constant"] = setting(
        "cosine", "after the linear warmup: cosine (nanoGPT's) decay to min_lr | wsd: constant, then a linear warmdown "
                  "to min_lr over the last warmdown_frac of the steps (modded-nanogpt, nanochat) | constant")
    warmdown_frac: float = setting(0.4, "wsd: the fraction of lr_decay_iters spent in the warmdown", range="(0, 1]")
    decay_lr: bool = setting(True, "nanoGPT's switch: false is lr_schedule=constant")
    warmup_iters: int = setting(2000, "linear warmup steps", range="[0, inf)")
    lr_decay_iters: int | None = setting(None, "steps of cosine decay; none (the default): max_iters, so "
                                               "--max_iters=500 shortens the decay too", range="[0, inf)")
    min_lr: float = setting(6e-5, "learning rate after decay (nanoGPT: about learning_rate / 10)", range="[0, inf)")
    # system
    device: str = setting("auto", "auto (CUDA when present, else CPU) | cpu | cuda | cuda:N (one process)")
    backend: Literal["auto", "nccl", "gloo"] = setting("auto", "DDP backend with several processes (auto: nccl on "
                                                               "CUDA, gloo on CPU)")
    dtype: str = setting("auto", "auto (bf16 where the GPU or CPU supports it, fp16 with loss scaling on older GPUs, "
                                 "else float32) | bfloat16 | float16 | float32")
    compile: bool | None = setting(None, "torch.compile the model; default: on for CUDA where Triton works, off on CPU")
    threads: int = setting(0, "CPU threads for torch (0: torch's default, one per core); on a machine shared with "
                              "other jobs 1 can be much faster", range="[0, inf)")
    seed: int = setting(1337, "seed of initialisation, dropout and batches (batch = f(seed, step, index))")
    # checkpoints
    keep_states: int = setting(2, "resumable states kept in out_dir/state/ (the newest; 0 keeps all)", range="[0, inf)")
    sample_at_end: bool = setting(True, "print a short sample from the final model")
    # Hub
    push_to_hub: bool = setting(False, "upload checkpoints to the Hugging Face Hub")
    hub_model_id: str = setting("", "Hub repository, e.g. user/nanogpt-shakespeare (default: out_dir's name)")
    hub_private: bool = setting(False, "create the Hub repository as private")
    hub_strategy: Literal["end", "best", "every_save"] = setting("end", "when to upload: end | best | every_save")

    @property
    def rows_per_step(self) -> int:  # sequences per optimizer step, over all processes
        return self.batch_size * self.gradient_accumulation_steps

    @property
    def tokens_per_step(self) -> int:
        return self.rows_per_step * self.block_size


def model_settings(**defaults) -> list[tuple]:
    """NanoGPTConfig's declared fields as settings (name, type, field), at its defaults unless given: the model's
    architecture is declared once, in configuration_nanogpt.py."""
    fields = {f.name: f for f in dataclasses.fields(NanoGPTConfig)}
    out = []
    for name in ARCHITECTURE:
        allowed, tp = fields[name].metadata["allowed"], fields[name].type
        tp = Literal[allowed] if isinstance(allowed, tuple) else float if tp == float | int else tp
        default = defaults.get(name, fields[name].default)
        out.append((name, tp, setting(default, fields[name].metadata["help"], range=allowed if isinstance(allowed, str)
                                      else None)))
    return out


# train.py's settings: the run's, then the model's (nanoGPT's train.py: without biases)
TrainSettings = dataclasses.make_dataclass("TrainSettings", model_settings(bias=False), bases=(RunSettings,))
