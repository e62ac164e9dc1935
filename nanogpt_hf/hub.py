"""A checkpoint folder's model card (README.md), and its upload to the Hugging Face Hub: in the background while
training runs (HubPusher: a failure prints one line and training goes on), or waited for (`nanogpt-hf push`)."""

import math
import os
import shutil
import sys
import tempfile
from concurrent.futures import wait
from pathlib import Path

import torch
import yaml
from huggingface_hub import EvalResult, HfApi, ModelCard, ModelCardData, RepoUrl
from huggingface_hub.utils import HFValidationError, validate_repo_id
from transformers import AutoConfig, AutoModelForCausalLM

from .common import UserError, first_line, is_hub_id, remove
from .configuration_nanogpt import ARCHITECTURE, NanoGPTConfig

PLACEHOLDER = "path/to/this/folder"  # what the card's snippets load until the folder has a Hub id
CARD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "model_card.md")  # a str.format template
HOW_TO_LOAD = {"gpt2": ("A stock GPT-2 (`GPT2LMHeadModel`): plain transformers loads it, no custom code needed.", ""),
               "nanochat": ("transformers' native NanoChat (`NanoChatForCausalLM`): no custom code needed.", ""),
               "nanogpt": ('With the `nanogpt_hf` package installed; without it, `AutoModelForCausalLM.from_pretrained('
                           '"{ref}", trust_remote_code=True)` runs the model code saved beside the weights.',
                           "import nanogpt_hf  # registers the nanogpt model type with the Auto classes\n")}


def write_model_card(folder: str, info: dict) -> None:
    """README.md for a folder holding config.json. info (all optional): repo_id, title, source (a sentence), recipe,
    dataset (datasets: their Hub ids), base_model, license, tags, settings, steps, tokens_seen, *_loss; loss.png."""
    config, ref = AutoConfig.from_pretrained(folder), info.get("repo_id") or PLACEHOLDER
    with torch.device("meta"):  # shapes only: no memory, no initialisation
        model = AutoModelForCausalLM.from_config(config)
    # as nanoGPT counts: without embedding tables, but a head tied to the token embeddings counts
    n_params = model.num_parameters(exclude_embeddings=True) + config.tie_word_embeddings * model.lm_head.weight.numel()
    data = ModelCardData(  # Hub ids only: a local path would publish the user's file system
        library_name="transformers", pipeline_tag="text-generation", license=info.get("license"),
        tags=list(dict.fromkeys(["nanogpt", "gpt2", "text-generation", *info.get("tags", [])])),
        datasets=info.get("datasets") or None,
        base_model=info.get("base_model") if is_hub_id(info.get("base_model")) else None,
        eval_results=task_results(info), model_name=(info.get("repo_id") or info.get("title") or "nanoGPT model")
        if info.get("tasks") else None)
    arch = {"model": config.architectures[0], "layers": config.num_hidden_layers, "heads": config.num_attention_heads,
            "width": config.hidden_size, "context": config.max_position_embeddings, "vocabulary": config.vocab_size,
            "biases": getattr(config, "bias", getattr(config, "attention_bias", True)),  # GPT-2's: always
            "activation": getattr(config, "activation_function", getattr(config, "hidden_act", None)),
            "parameters": f"{n_params:,} ({n_params / 1e6:.2f}M, " + ("without position embeddings; the token "
                          "embedding counted once, as the tied head)" if config.tie_word_embeddings else
                          "without embedding tables)")}
    if config.model_type == "nanogpt":  # the other declared fields that depart from GPT-2's defaults
        shown = ("block_size", "n_layer", "n_head", "n_embd", "dropout", "bias", "activation_function")
        arch["switches"] = ", ".join(f"{k}={getattr(config, k)}" for k in ARCHITECTURE
                                     if k not in shown and getattr(config, k) != getattr(NanoGPTConfig, k)) or "none"
    rows = [f"| {k.replace('_', ' ')} | {f'{v:,}' if isinstance(v, int) else v} |" for k, v in info.items()
            if k in ("recipe", "dataset", "base_model", "steps", "tokens_seen") and v is not None]
    training = [info.get("source") or "", *(["", "| | |", "|---|---|", *rows] if rows else [])]
    losses = [(k, info[f"{k}_loss"]) for k in ("train", "val", "best_val") if info.get(f"{k}_loss") is not None]
    if losses:  # mean next-token cross-entropy in nats; perplexity = exp(loss)
        training += ["", "| split | loss | perplexity |", "|---|---|---|"]
        training += [f"| {k.replace('_', ' ')} | {v:.4f} | {math.exp(min(v, 700)):.2f} |" for k, v in losses]
    if info.get("settings"):
        training += ["", "```yaml", yaml.safe_dump(info["settings"], sort_keys=False).rstrip(), "```"]
    if os.path.isfile(os.path.join(folder, "loss.png")):
        training += ["", "## Loss curve", "", "![training and validation loss](loss.png)"]
    how, register = HOW_TO_LOAD[config.model_type]
    prompt = "ROMEO:" if config.vocab_size < 50257 else "Hello, I'm a language model,"  # characters, or GPT-2 BPE
    chat = os.path.isfile(os.path.join(folder, "chat_template.jinja"))  # a chat model: messages in, the reply out
    card = Path(CARD).read_text(encoding="utf-8").format(
        prompt=[{"role": "user", "content": prompt}] if chat else prompt,
        output='[0]["generated_text"][-1]["content"]' if chat else '[0]["generated_text"]',
        metadata=data.to_yaml(), title=info.get("title") or info.get("repo_id") or "nanoGPT model",
        how=how.format(ref=ref), register=register, ref=ref,
        new_tokens=max(1, min(100, config.max_position_embeddings - len(prompt.encode()) - 4 * chat)),  # pipeline
        # does not slide; a chat prompt has 4 tokens more (bos, the turn's start and end, the reply's start)
        architecture="\n".join(f"| {k} | {v} |" for k, v in arch.items()), training="\n".join(training))
    ModelCard(card).save(os.path.join(folder, "README.md"))


def task_results(info: dict) -> list[EvalResult] | None:
    """The lm-evaluation-harness figures (evaluation.score_tasks) and the core score as model-index metadata (the Hub
    shows them beside the model); a task on local data is named by the task alone."""
    if not (scores := info.get("tasks")):
        return None
    out = [EvalResult(task_type="text-generation", dataset_type=path if is_hub_id(path) and "/" in path else name,
                      dataset_name=name, dataset_split=split, metric_type=k, metric_value=v)
           for name, (path, split) in scores["datasets"].items() for k, v in scores["results"][name].items()
           if k != "examples"]
    return out + [EvalResult(task_type="text-generation", dataset_type="core", dataset_name="core: " + ", ".join(
        scores["centered"]), metric_type="core", metric_value=scores["core"])]


def check_repo_id(repo_id: str, default_from: str = "") -> None:
    """Refuse at the start, not after a whole training run, an id that cannot name a Hub repository."""
    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:  # the id may come from out_dir's name: say which setting fixes it
        what = f"the Hub id taken from {default_from}" if default_from else "hub_model_id"
        raise UserError(f"{what} '{repo_id}' is invalid ({first_line(exc)}); set --hub_model_id=user/name") from None


def snapshot(folder: str) -> str:  # a hidden copy, beside the folder, of its top-level files for the Hub (not state/)
    names = [n for n in os.listdir(folder) if os.path.isfile(os.path.join(folder, n)) and not n.startswith(".")
             and n != "train_config.yaml"]  # the settings with their local paths: the card has them without
    copy = tempfile.mkdtemp(prefix=".hub-upload-", dir=os.path.dirname(os.path.abspath(folder)))
    for name in names:
        shutil.copyfile(os.path.join(folder, name), os.path.join(copy, name))
    return copy


def upload(api: HfApi, folder: str, repo_id: str, private: bool, message: str) -> RepoUrl:
    """Create the repo if needed, commit the folder's files, delete the folder. Returns the repo's URL."""
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True)  # url.repo_id: 'name' -> 'user/name'
        card = Path(folder, "README.md")
        if card.is_file():  # a card written before the repo was known names it now
            card.write_text(card.read_text().replace(f'"{PLACEHOLDER}"', f'"{url.repo_id}"'))
        api.upload_folder(repo_id=url.repo_id, folder_path=folder, commit_message=message)
        return url
    finally:
        remove(folder)


def push_checkpoint(folder: str, repo_id: str, private: bool = False, token: str | None = None,
                    commit_message: str | None = None) -> str:
    """Upload a checkpoint folder's top-level files and wait (nanogpt-hf push). Returns the repo's URL."""
    return str(upload(HfApi(token=token), snapshot(folder), repo_id, private, commit_message or "Upload checkpoint"))


class HubPusher:
    """Pushes out_dir in the background: once in finish() ("end"), at saves that improved the val loss ("best"), or
    at every save ("every_save"). An upload still queued when a newer push comes is skipped."""

    def __init__(self, repo_id: str, private: bool = False, strategy: str = "end"):
        self.api, self.repo_id, self.private, self.strategy = HfApi(), repo_id, private, strategy
        self.jobs, self.latest = [], None

    def on_save(self, folder: str, message: str, improved: bool = False) -> None:
        if self.strategy == "every_save" or (self.strategy == "best" and improved):
            self.push(folder, message)

    def finish(self, folder: str, message: str) -> None:
        if self.strategy == "end":
            self.push(folder, message)
        wait(self.jobs)

    def push(self, folder: str, message: str) -> None:
        try:
            self.latest = snapshot(folder)
            self.jobs.append(self.api.run_as_future(self.upload, folder, self.latest, message))
        except OSError as exc:  # the folder is gone, the disk is full: say so, never stop training
            self.report(folder, exc)

    def upload(self, folder: str, copy: str, message: str) -> None:
        if copy != self.latest:  # (on huggingface_hub's upload thread, one at a time, in order) superseded
            return remove(copy)
        try:
            url = upload(self.api, copy, self.repo_id, self.private, message)
            self.repo_id = url.repo_id
            print(f"hub: pushed {folder} to {url}", flush=True)
        except Exception as exc:  # whatever went wrong, training goes on
            self.report(folder, exc)

    def report(self, folder: str, exc: BaseException) -> None:
        print(f"hub: push of {folder} to {self.repo_id} failed ({type(exc).__name__}: {first_line(exc)}); the local "
              f"checkpoint is intact; retry with: nanogpt-hf push {folder} {self.repo_id}", file=sys.stderr, flush=True)
