"""Sharing a checkpoint folder: its model card (README.md) and pushing it to the Hugging Face Hub.

- `write_model_card(folder, info)` writes README.md into a save_pretrained folder: Hub metadata, how to load it, the
  architecture (read from the folder's config.json), the recipe, the training numbers and the loss curve.
- `HubPusher` is what training uses: uploads run on one background thread, in order, and never raise. A failed
  upload (no network, no token, no rights) prints one line; the local checkpoint is untouched and training goes on.
- `push_checkpoint` is the blocking version behind `nanogpt-hf push`, which raises UserError on failure.

Only huggingface_hub's own client is used (HfApi.create_repo + create_commit); the token comes from its usual
sources (HF_TOKEN, `hf auth login`) unless one is passed.
"""

from __future__ import annotations

import json
import math
import os
import shlex
import shutil
import sys
import tempfile
from concurrent.futures import Future

import yaml
from huggingface_hub import CommitOperationAdd, HfApi, ModelCard, ModelCardData

from .errors import UserError, first_line

STRATEGIES = ("end", "best", "every_save")
LOSS_PLOT = "loss.png"


# ----------------------------------------------------------------------------------------------------------------
# Model card


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return {}


def architecture(config: dict) -> dict:
    """Layers, heads, width, block size, vocabulary and bias of a config.json, ours ("nanogpt") or stock GPT-2."""
    if config.get("model_type") == "gpt2":  # an exported folder: GPT-2's names, always with biases
        return dict(n_layer=config["n_layer"], n_head=config["n_head"], n_embd=config["n_embd"],
                    block_size=config["n_positions"], vocab_size=config["vocab_size"], bias=True,
                    activation=config.get("activation_function", "gelu_new"))
    return dict(n_layer=config["n_layer"], n_head=config["n_head"], n_embd=config["n_embd"],
                block_size=config["block_size"], vocab_size=config["vocab_size"], bias=config.get("bias", True),
                activation=config.get("activation_function", "gelu"))


def count_parameters(arch: dict) -> int:
    """Parameters as nanoGPT counts them: without the position embeddings, the tied wte/lm_head counted once."""
    C, L, V, b = arch["n_embd"], arch["n_layer"], arch["vocab_size"], int(bool(arch["bias"]))
    per_layer = (
        2 * (C + b * C)  # ln_1, ln_2
        + 3 * C * C + b * 3 * C  # attn.c_attn
        + C * C + b * C  # attn.c_proj
        + 4 * C * C + b * 4 * C  # mlp.c_fc
        + 4 * C * C + b * C  # mlp.c_proj
    )
    return V * C + L * per_layer + (C + b * C)  # wte (= lm_head), blocks, ln_f


def _human(n: float) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(int(n))


def _fmt_loss(loss) -> str:
    return "—" if loss is None else f"{float(loss):.4f}"


def _fmt_ppl(loss) -> str:
    # perplexity = exp(mean cross-entropy per token); above ~700 it stops being informative but stays finite
    return "—" if loss is None else f"{math.exp(min(float(loss), 700.0)):.2f}"


def _tokenizer_description(folder: str, info: dict) -> str:
    if info.get("tokenizer"):
        return info["tokenizer"]
    kind = _read_json(os.path.join(folder, "tokenizer_config.json")).get("nanogpt_tokenizer")
    if kind == "gpt2":
        return "GPT-2 BPE (r50k, identical ids to tiktoken's `gpt2` encoding)"
    if kind == "char":
        return "character level (nanoGPT's sorted-character ids; unknown characters are dropped)"
    if os.path.isfile(os.path.join(folder, "tokenizer.json")):
        return "saved in this folder (tokenizer.json)"
    return "none saved in this folder"


def _snippet_max_new_tokens(prompt: str, block_size: int) -> int:
    """The snippet's max_new_tokens: pipeline() does not slide the window, so the prompt and the new tokens must fit
    in block_size. A prompt has at most one token per UTF-8 byte (characters and GPT-2 BPE alike)."""
    return max(1, min(100, block_size - len(prompt.encode("utf-8"))))


def _load_snippet(ref: str, prompt: str, block_size: int, first_line: str = "") -> str:
    """The Python lines that load the checkpoint and generate, optionally after an import line."""
    return f"""```python
{first_line}from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

model = AutoModelForCausalLM.from_pretrained("{ref}")
tokenizer = AutoTokenizer.from_pretrained("{ref}")
generator = pipeline("text-generation", model="{ref}")
print(generator({prompt!r}, max_new_tokens={_snippet_max_new_tokens(prompt, block_size)})[0]["generated_text"])
```
"""


def _loading_section(ref: str, model_type: str, prompt: str, block_size: int) -> str:
    if model_type == "gpt2":
        return f"""## How to load it

A stock GPT-2 (`GPT2LMHeadModel`) checkpoint: plain transformers loads it, no custom code needed.

{_load_snippet(ref, prompt, block_size)}"""
    register = "import nanogpt_hf  # registers NanoGPTConfig / NanoGPTForCausalLM with the Auto classes\n"
    return f"""## How to load it

With the `nanogpt_hf` package installed (`pip install -e .` in a clone of its repository), importing it registers
the `nanogpt` model type:

{_load_snippet(ref, prompt, block_size, register)}
Without it, the model code stored beside the weights (`modeling_nanogpt.py`, `configuration_nanogpt.py`) is used:

```python
from transformers import AutoModelForCausalLM, pipeline

model = AutoModelForCausalLM.from_pretrained("{ref}", trust_remote_code=True)
generator = pipeline("text-generation", model="{ref}", trust_remote_code=True)
```
"""


def _training_section(info: dict) -> str:
    lines = ["## Training", ""]
    if info.get("source"):
        lines += [info["source"], ""]
    rows = [
        ("recipe", info.get("recipe")),
        ("dataset", ", ".join(info["dataset"]) if isinstance(info.get("dataset"), list) else info.get("dataset")),
        ("base model", info.get("base_model")),
        ("optimizer steps", f"{info['steps']:,}" if info.get("steps") is not None else None),
        ("tokens seen", f"{info['tokens_seen']:,} ({_human(info['tokens_seen'])})"
         if info.get("tokens_seen") is not None else None),
    ]
    rows = [(k, v) for k, v in rows if v not in (None, "")]
    if rows:
        lines += ["| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows] + [""]
    if any(info.get(k) is not None for k in ("train_loss", "val_loss", "best_val_loss")):
        lines += ["| split | loss | perplexity |", "|---|---|---|"]
        for label, key in (("train", "train_loss"), ("val", "val_loss"), ("best val", "best_val_loss")):
            if info.get(key) is not None:
                lines.append(f"| {label} | {_fmt_loss(info[key])} | {_fmt_ppl(info[key])} |")
        lines += ["", "Loss is the mean next-token cross-entropy in nats; perplexity = exp(loss).", ""]
    if info.get("settings"):
        settings = yaml.safe_dump(info["settings"], sort_keys=False, allow_unicode=True).rstrip()
        lines += ["Settings:", "", "```yaml", settings, "```", ""]
    return "\n".join(lines)


def model_card(folder: str, info: dict | None = None) -> ModelCard:
    """The card for a checkpoint folder (see write_model_card for `info`)."""
    info = dict(info or {})
    config = _read_json(os.path.join(folder, "config.json"))
    if not config:
        raise UserError(f"'{folder}' has no readable config.json; write the model (save_pretrained) before its card")
    model_type = config.get("model_type", "nanogpt")
    arch = architecture(config)
    n_params = info.get("parameters") or count_parameters(arch)

    datasets = info.get("dataset")
    datasets = [datasets] if isinstance(datasets, str) else datasets
    # the card's metadata names Hub ids only: a local path would publish the user's file system (the Training
    # section still says where the data came from)
    datasets = [d for d in datasets or [] if is_hub_id(d)]
    base_model = info.get("base_model") if is_hub_id(info.get("base_model")) else None
    tags = ["nanogpt", "gpt2", "text-generation", "causal-lm"] + [t for t in info.get("tags", []) if t]
    card_data = ModelCardData(
        library_name="transformers",
        pipeline_tag="text-generation",
        tags=list(dict.fromkeys(tags)),  # de-duplicated, order kept
        datasets=datasets or None,
        license=info.get("license"),
        base_model=base_model,
    )

    ref = info.get("repo_id") or PLACEHOLDER_REF
    # not the folder's name: checkpoints are written into a temporary folder and renamed into place
    title = info.get("title") or info.get("repo_id") or f"nanoGPT {_human(n_params)}-parameter language model"
    tokenizer = _tokenizer_description(folder, info)
    prompt = info.get("prompt") or ("ROMEO:" if "character" in tokenizer else "Hello, I'm a language model,")
    model_class = "GPT2LMHeadModel" if model_type == "gpt2" else "NanoGPTForCausalLM"
    body = [
        f"# {title}",
        "",
        info.get("description")
        or "A GPT-2-style language model with the architecture of [nanoGPT](https://github.com/karpathy/nanoGPT), "
        "as a native transformers model (nanogpt_hf).",
        "",
        _loading_section(ref, model_type, prompt, arch["block_size"]),
        "## Architecture",
        "",
        "| | |",
        "|---|---|",
        f"| model | {model_class} (pre-LayerNorm GPT-2 blocks) |",
        f"| layers | {arch['n_layer']} |",
        f"| heads | {arch['n_head']} |",
        f"| width (n_embd) | {arch['n_embd']} |",
        f"| block size (context) | {arch['block_size']} |",
        f"| vocabulary | {arch['vocab_size']} |",
        f"| biases | {'yes' if arch['bias'] else 'no'} |",
        f"| activation | {arch['activation']} |",
        f"| parameters | {n_params:,} ({_human(n_params)}, without position embeddings) |",
        f"| tokenizer | {tokenizer} |",
        "",
        _training_section(info),
    ]
    if os.path.isfile(os.path.join(folder, LOSS_PLOT)):
        # relative link: the picture travels with the folder and renders on the Hub
        body += ["## Loss curve", "", f"![training and validation loss]({LOSS_PLOT})", ""]
    content = f"---\n{card_data.to_yaml()}\n---\n\n" + "\n".join(body).rstrip() + "\n"
    return ModelCard(content)


def write_model_card(folder: str, info: dict | None = None) -> str:
    """Write README.md (the Hub model card) into a checkpoint folder that already holds config.json.

    info (every key optional):
      repo_id       the Hub id, used in the loading snippets (else "path/to/this/folder") and as the title
      title, description, prompt   heading (default: repo_id, else "nanoGPT 10.65M-parameter language
                    model"), first paragraph, example prompt in the loading snippet
      dataset       str or list: the training data, shown and put in the card's `datasets` metadata
      license, base_model, tags (list, added to nanogpt/gpt2/...)
      source        one sentence on where the weights come from (e.g. "converted from nanoGPT's ckpt.pt")
      recipe        the recipe's name or path;  settings: dict of the resolved settings (shown as YAML)
      steps, tokens_seen          optimizer steps done and tokens trained on
      train_loss, val_loss, best_val_loss   final losses (nats); the card adds perplexity = exp(loss)
      parameters    override the count computed from config.json;  tokenizer: override its description
    A loss.png in the folder is shown (linked relatively). Returns the README path.
    """
    path = os.path.join(folder, "README.md")
    model_card(folder, info).save(path)
    return path


# ----------------------------------------------------------------------------------------------------------------
# Pushing


def files_to_upload(folder: str) -> list[str]:
    """The files at the top of a checkpoint folder: model, tokenizer, card, loss curve, metrics, settings.

    Sub-folders (out_dir/state/: optimizer and RNG states for resuming, large and private to the run) and hidden
    or temporary files are left out.
    """
    return sorted(
        name for name in os.listdir(folder)
        if os.path.isfile(os.path.join(folder, name)) and not name.startswith(".") and not name.endswith(".tmp")
    )


def check_repo_id(repo_id: str, default_from: str = "") -> None:
    """UserError unless repo_id can name a Hub repository: refused at start, not after a whole training run."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        what = f"the Hub repository id taken from {default_from}" if default_from else "hub_model_id"
        raise UserError(f"{what} '{repo_id}' is not valid ({first_line(exc).rstrip('.')}); set "
                        f"--hub_model_id=user/name") from None


def describe_hub_error(exc: BaseException, repo_id: str) -> str:
    """One line saying why a Hub call failed, with the fix when it is a usual one."""
    names = {cls.__name__ for cls in type(exc).__mro__}
    status = getattr(getattr(exc, "response", None), "status_code", None)
    if "OfflineModeIsEnabled" in names:
        return "offline mode is on (HF_HUB_OFFLINE=1); unset it to push"
    if "LocalTokenNotFoundError" in names or status == 401:
        return "not logged in or invalid token; run `hf auth login` or set HF_TOKEN"
    if status == 403:
        return f"the token has no write access to '{repo_id}'; use a write token or a repo you own"
    if status == 404:
        return f"repo '{repo_id}' not found (check the namespace)"
    if names & {"ConnectionError", "ConnectError", "TimeoutException", "TimeoutError", "NetworkError"}:
        return "cannot reach the Hub (no network?)"
    first = first_line(exc)
    return first if first == type(exc).__name__ else f"{type(exc).__name__}: {first}"


PLACEHOLDER_REF = "path/to/this/folder"  # the card's loading snippets before the folder has a Hub id


def resolve_repo_id(api: HfApi, repo_id: str) -> str:
    """'name' -> 'user/name': the Hub creates a repository named without a namespace under the token's user, and
    commits, links and the card's snippets need the full id."""
    return repo_id if "/" in repo_id else f"{api.whoami()['name']}/{repo_id}"


def is_hub_id(ref: str | None) -> bool:
    """'gpt2', 'user/name': a Hub id, not a local path ('/data/x', './x', 'C:\\x', an existing folder)."""
    if not ref or os.path.isabs(ref) or ref.startswith((".", "~")) or os.path.exists(ref):
        return False
    return ref.count("/") <= 1 and "\\" not in ref and ":" not in ref


def _commit_folder(api: HfApi, repo_id: str, folder: str, commit_message: str):
    def content(name):
        path = os.path.join(folder, name)
        if name == "README.md":  # a card written before the repo was known: its snippets name the repo instead
            with open(path, encoding="utf-8") as fh:
                text = fh.read()
            if PLACEHOLDER_REF in text:
                return text.replace(f'"{PLACEHOLDER_REF}"', f'"{repo_id}"').encode("utf-8")
        return path

    operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=content(name))
                  for name in files_to_upload(folder)]
    return api.create_commit(repo_id=repo_id, operations=operations, commit_message=commit_message,
                             repo_type="model")


def _check_checkpoint_folder(folder: str) -> None:
    if not os.path.isdir(folder):
        raise UserError(f"checkpoint folder '{folder}' does not exist")
    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise UserError(f"'{folder}' is not a checkpoint folder (no config.json)")


def push_checkpoint(folder: str, repo_id: str, private: bool = False, token: str | None = None,
                    commit_message: str | None = None) -> str:
    """Upload a checkpoint folder to the Hub and wait for it (nanogpt-hf push). Returns the repo URL.

    Creates the repo if needed (private only applies when it is created). Raises UserError on any failure.
    """
    _check_checkpoint_folder(folder)
    api = HfApi(token=token)
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        repo_id = url.repo_id  # with the namespace the Hub chose for a bare name
        _commit_folder(api, repo_id, folder, commit_message or f"Upload {os.path.basename(os.path.abspath(folder))}")
    except Exception as exc:  # any Hub/network problem becomes one line for the user
        raise UserError(f"push of '{folder}' to '{repo_id}' failed: {describe_hub_error(exc, repo_id)}") from None
    return str(url)


class HubPusher:
    """Pushes checkpoint folders during training without blocking it and without ever raising.

        pusher = HubPusher("me/my-model", private=False, strategy="best")
        ... after each (atomic) save of out_dir:  pusher.on_save(out_dir, f"step {step}", is_best=improved)
        ... at the end:                            pusher.finish(out_dir, f"end of training, step {step}")

    strategy: "end" pushes once in finish(); "best" pushes every save that improved the val loss; "every_save"
    pushes every save. push() is the unconditional version.

    Each push copies the folder's top-level files into a snapshot first (a fast local copy), then uploads the
    snapshot on huggingface_hub's single background thread (HfApi.run_as_future: in order, one at a time), so the
    next save can rewrite the folder while an upload is running. A push still waiting in the queue when a newer one
    arrives is dropped: only the newest state is worth uploading. Failures print one line and count in .failures.
    """

    def __init__(self, repo_id: str, private: bool = False, token: str | None = None, strategy: str = "end"):
        if strategy not in STRATEGIES:
            raise UserError(f"hub strategy must be one of {', '.join(STRATEGIES)}; got {strategy!r}")
        self.private = private
        self.strategy = strategy
        self.api = HfApi(token=token)
        try:
            self.repo_id = resolve_repo_id(self.api, repo_id)  # the full id, for the model card written meanwhile
        except Exception:  # offline or no token: the first push says so, training goes on
            self.repo_id = repo_id
        self.failures = 0
        self.pushed = 0
        self._repo_ready = False  # only touched on the upload thread
        self._jobs: list[tuple[Future, str]] = []  # (future, snapshot folder)

    # -- what training calls --

    def on_save(self, folder: str, commit_message: str, is_best: bool = False) -> Future | None:
        """Call after each checkpoint save; pushes according to the strategy."""
        if self.strategy == "every_save" or (self.strategy == "best" and is_best):
            return self.push(folder, commit_message)
        return None

    def finish(self, folder: str | None = None, commit_message: str = "End of training") -> bool:
        """End of training: push `folder` if the strategy is "end", then wait for all uploads. True if none failed."""
        if self.strategy == "end" and folder is not None:
            self.push(folder, commit_message)
        return self.wait()

    def push(self, folder: str, commit_message: str) -> Future | None:
        """Queue an upload of `folder` and return at once (a Future resolving to True/False), or None on failure."""
        self._drop_queued()
        try:
            snapshot = self._snapshot(folder)
        except Exception as exc:  # e.g. the folder vanished: say so, never stop training
            self._fail(folder, exc)
            return None
        future = self.api.run_as_future(self._upload, folder, snapshot, commit_message)
        self._jobs.append((future, snapshot))
        return future

    def wait(self) -> bool:
        """Block until queued uploads are done (call at the end of training). True if none failed."""
        running = [f for f, _ in self._jobs if not f.done()]
        if running:
            print(f"hub: waiting for {len(running)} upload(s) to {self.repo_id} to finish...", flush=True)
        for future, _ in self._jobs:
            if not future.cancelled():
                future.result()  # _upload never raises
        self._jobs = []
        return self.failures == 0

    # -- inside --

    def _snapshot(self, folder: str) -> str:
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"checkpoint folder '{folder}' does not exist")
        parent = os.path.dirname(os.path.abspath(folder))
        # beside the folder (same disk, not a small /tmp); the hidden name keeps it out of listings
        snapshot = tempfile.mkdtemp(prefix=".hub-upload-", dir=parent)
        try:
            for name in files_to_upload(folder):
                shutil.copyfile(os.path.join(folder, name), os.path.join(snapshot, name))
        except BaseException:
            shutil.rmtree(snapshot, ignore_errors=True)
            raise
        return snapshot

    def _drop_queued(self) -> None:
        keep = []
        for future, snapshot in self._jobs:
            if future.cancel():  # not started yet: superseded by the newer push
                shutil.rmtree(snapshot, ignore_errors=True)
            elif not future.done():
                keep.append((future, snapshot))
        self._jobs = keep

    def _upload(self, folder: str, snapshot: str, commit_message: str) -> bool:
        try:
            if not self._repo_ready:
                url = self.api.create_repo(self.repo_id, private=self.private, exist_ok=True, repo_type="model")
                self.repo_id = url.repo_id
                self._repo_ready = True
            _commit_folder(self.api, self.repo_id, snapshot, commit_message)
            self.pushed += 1
            print(f"hub: pushed {folder} to https://huggingface.co/{self.repo_id} ({commit_message})", flush=True)
            return True
        except Exception as exc:
            self._fail(folder, exc)
            return False
        finally:
            shutil.rmtree(snapshot, ignore_errors=True)

    def _fail(self, folder: str, exc: BaseException) -> None:
        self.failures += 1
        print(
            f"hub: push of {folder} to {self.repo_id} failed ({describe_hub_error(exc, self.repo_id)}); the local "
            f"checkpoint is intact, retry later with: nanogpt-hf push {shlex.quote(str(folder))} "
            f"{shlex.quote(self.repo_id)}",
            file=sys.stderr,
            flush=True,
        )


__all__ = ["HubPusher", "check_repo_id", "count_parameters", "files_to_upload", "model_card", "push_checkpoint",
           "write_model_card"]
