"""sample.py: generate text from a trained model, nanoGPT's options on top of transformers' model.generate.

Unlike nanoGPT: a KV cache; sample k is seeded by (seed, k) whatever --num_samples; past block_size the context is
cut to its last 3/4 and re-prefilled (nanoGPT's tokens while prompt + max_new_tokens - 1 <= block_size); the model
runs in the dtype itself, not autocast (decoding is memory-bound)."""

import dataclasses
import itertools
import os
import sys
from pathlib import Path

import numpy as np
import torch
from transformers import CompileConfig, TextStreamer
from transformers.utils import logging as hf_logging

from . import checkpoint, hardware
from .common import UserError
from .settings import SHIPPED_RECIPES, load_recipe, parse_command, setting
from .tokenization import check_known_chars, unknown_char

SEPARATOR = "---------------"
TRAINED = load_recipe(os.path.join(SHIPPED_RECIPES, "default.yaml"))["out_dir"]  # where `python train.py` saves


@dataclasses.dataclass
class SampleSettings:
    out_dir: str = setting(TRAINED, "checkpoint folder used by --init_from=resume (train.py's default)", path=True)
    init_from: str = setting("resume", "resume (out_dir), a checkpoint folder or Hub id, gpt2 ... gpt2-xl", path=True)
    start: str = setting("\n", "the prompt; FILE:path reads it from a file")
    num_samples: int = setting(10, "number of samples to draw", range="[1, inf)")
    max_new_tokens: int = setting(500, "tokens generated per sample", range="[1, inf)")
    # generate divides the logits by the temperature: below ~1e-6 they overflow (NaN probabilities)
    temperature: float = setting(0.8, "1.0 = no change, < 1.0 = less random, > 1.0 = more random; for the most "
                                      "likely tokens use --greedy", range="[1e-06, inf)")
    top_k: int = setting(200, "keep only the top_k most likely tokens (0 = all)", range="[0, inf)")
    top_p: float = setting(1.0, "nucleus sampling: the smallest token set with this total probability", range="(0, 1]")
    repetition_penalty: float = setting(1.0, "> 1.0 discourages repeating tokens in the context", range="(0, inf)")
    greedy: bool = setting(False, "always take the most likely token (temperature, top_k, top_p ignored)")
    batch: bool = setting(False, "draw all samples in one batched generate call (faster; different text)")
    stream: bool = setting(False, "print tokens as they are generated")
    stop_at_eot: bool = setting(False, "stop a sample at the end-of-text token (nanoGPT never stops)")
    seed: int = setting(1337, "random seed; the same seed gives the same samples")
    device: str = setting("auto", "auto (cuda if available, else cpu), cpu, cuda, cuda:1, ...")
    dtype: str = setting("auto", "auto, bfloat16, float16 or float32 (auto: bf16 where supported, else fp32)")
    compile: bool = setting(False, "compile the decoding step (static KV cache + torch.compile; slow to start)")
    chat: bool = setting(False, "chat in the terminal with a chat model: each line is your turn (--start the first), "
                                "the reply streams until its end of turn; /reset starts over, an empty line quits")


def sample_seed(seed: int, index: int) -> int:
    # distinct seeds never share samples (seed + index would make seed 1337's second sample seed 1338's first)
    return int(np.random.SeedSequence([seed % 2**64, index]).generate_state(1, np.uint64)[0])


def read_prompt(start: str) -> str:  # nanoGPT's --start: the text itself, or FILE:path for a file's contents
    path = os.path.expanduser(start.removeprefix("FILE:"))  # the shell leaves FILE:~/ as is
    return Path(path).read_text(encoding="utf-8") if start.startswith("FILE:") else start


def block_size_of(model) -> int:
    return int(model.config.max_position_embeddings)  # block_size; n_positions for a stock GPT-2


def window_keep(block_size: int) -> int:
    return max(1, int(block_size * 0.75))  # the recent tokens kept when the context overflows: 3/4 of a block


def left_pad(rows: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """A left-padded (B, T) batch and its attention mask: generation continues every row at the right edge."""
    width = max(len(r) for r in rows)
    ids = torch.tensor([[pad_id] * (width - len(r)) + r for r in rows], dtype=torch.long)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], dtype=torch.long)
    return ids.to(device), mask.to(device)


@torch.inference_mode()
def generate_ids(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, max_new_tokens: int,
                 streamer=None, **gen_kwargs) -> torch.Tensor:
    """max_new_tokens new tokens (B, N) after input_ids (B, T), with the KV cache, sliding the window past block_size;
    fewer if every row stopped at end-of-text. The prompt must fit in block_size."""
    block_size = block_size_of(model)
    if (gen_kwargs.get("top_k") or 0) >= model.config.vocab_size:  # keeps every token (nanoGPT's min(top_k, vocab))
        gen_kwargs["top_k"] = 0  # the same tokens without the top-k pass
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
    eos = torch.tensor(gen_kwargs.get("eos_token_id") or [], dtype=torch.long, device=input_ids.device)
    ids, chunks, remaining = input_ids, [], max_new_tokens
    done = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
    while remaining > 0:
        if ids.shape[1] > block_size:  # the context no longer fits: slide the window
            ids, mask = ids[:, -window_keep(block_size):], mask[:, -window_keep(block_size):]
        # n new tokens feed n - 1 positions back (the last is never fed): the context may grow to block_size + 1
        n = min(remaining, block_size + 1 - ids.shape[1])
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=0,
                             streamer=streamer, **gen_kwargs)
        new = out[:, ids.shape[1]:]  # (B, <= n)
        chunks.append(new)
        remaining -= new.shape[1]
        done |= torch.isin(new, eos).any(dim=1)
        if bool(done.all()) or new.shape[1] < n:  # every row stopped at end-of-text
            break
        ids, mask = out, torch.cat([mask, torch.ones_like(new)], dim=1)
    return torch.cat(chunks, dim=1)


def generation_kwargs(tokenizer, temperature: float = 0.8, top_k: int = 200, top_p: float = 1.0,
                      repetition_penalty: float = 1.0, greedy: bool = False, stop_at_eot: bool = False) -> dict:
    """Arguments for model.generate, all explicit (unset ones come from generation_config, or generate's top_k=50)."""
    eot = tokenizer.eos_token_id if stop_at_eot else None
    sampling = {} if greedy else dict(temperature=temperature, top_k=top_k, top_p=top_p)  # top_k=0: no top-k
    # eos: [], not None (the model's eos_token_id); pad only fills a left-padded batch, which the mask hides
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eot or 0)
    return dict(do_sample=not greedy, **sampling, repetition_penalty=repetition_penalty,
                eos_token_id=[] if eot is None else [eot], pad_token_id=pad)


def until_eot(ids: list[int], eos: list[int]) -> list[int]:
    return next((ids[:i] for i, t in enumerate(ids) if t in eos), ids)


def encode_prompt(tokenizer, prompt: str, block_size: int) -> list[int]:
    """The prompt's ids: unknown characters refused, an empty prompt as the beginning-of-text token (GPT-2's
    unconditional samples), a too-long one cropped to its last block_size tokens (as nanoGPT), with a note."""
    check_known_chars(tokenizer, prompt)
    ids = tokenizer(prompt)["input_ids"] if prompt else []
    if not ids and tokenizer.bos_token_id is None:
        raise UserError("the prompt is empty and this tokenizer has no beginning-of-text token; give --start=TEXT")
    ids = ids or [tokenizer.bos_token_id]
    if len(ids) > block_size:
        print(f"note: the prompt has {len(ids)} tokens, more than block_size {block_size}; keeping its last "
              f"{block_size}", file=sys.stderr)
    return ids[-block_size:]


def generate_text(model, tokenizer, prompt: str, max_new_tokens: int = 200, temperature: float = 0.8,
                  top_k: int = 200, seed: int = 1337, stop_at_eot: bool = False) -> str:
    """One sample of prompt + continuation, in the model's dtype and device (training's end-of-run sample)."""
    torch.manual_seed(sample_seed(seed, 0))
    ids = encode_prompt(tokenizer, prompt, block_size_of(model))
    kwargs = generation_kwargs(tokenizer, temperature=temperature, top_k=top_k, stop_at_eot=stop_at_eot)
    was_training = model.training
    model.eval()
    new = generate_ids(model, torch.tensor([ids], device=model.device), None, max_new_tokens, **kwargs)
    model.train(was_training)
    return prompt + tokenizer.decode(until_eot(new[0].tolist(), kwargs["eos_token_id"]))


class Printer(TextStreamer):
    """Prints tokens as they come; end() (once per generate call) keeps a split character; finish() flushes."""

    def on_finalized_text(self, text: str, stream_end: bool = False):
        print(text, end="", flush=True)

    def end(self):
        self.next_tokens_are_prompt = True

    def finish(self):
        super().end()


def chat_ids(tokenizer, messages: list[dict], room: int) -> list[int]:
    """The conversation rendered for the assistant's reply, its oldest turns dropped until it fits in `room` tokens
    (a single turn longer than that keeps its end)."""
    while True:
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
        if len(ids["input_ids"]) <= room or len(messages) <= 1:
            return ids["input_ids"][-room:]
        messages = messages[2:] if len(messages) > 2 else messages[1:]  # a user turn and the reply to it


def chat(model, tokenizer, s: SampleSettings, kwargs: dict, device) -> None:
    """--chat: a conversation in the terminal, the history kept within the block (with room for the reply)."""
    if not tokenizer.chat_template:
        raise UserError(f"{s.out_dir if s.init_from == 'resume' else s.init_from} has no chat template: finetune it "
                        "on conversations first (python train.py recipes/shakespeare_chat.yaml)")
    ends = model.generation_config.eos_token_id
    kwargs = {**kwargs, "eos_token_id": ends if isinstance(ends, list) else [ends]}  # the end of a turn (and eos)
    room = block_size_of(model) - min(s.max_new_tokens, block_size_of(model) // 2)
    messages, line = [], read_prompt(s.start).strip()
    print("chat: an empty line quits, /reset starts a new conversation", file=sys.stderr)
    for turn in itertools.count():
        if not (line := line or sys.stdin.readline().strip()):  # an empty line, or the end of the input
            return
        if line == "/reset":
            messages, line = [], ""
            print("(a new conversation)")
            continue
        if problem := unknown_char(tokenizer, line):  # a slip of the keyboard ends nothing: say so, read on
            print(f"{problem}: say it without it", file=sys.stderr)
            line = ""
            continue
        messages.append({"role": "user", "content": line})
        torch.manual_seed(sample_seed(s.seed, turn))
        streamer = Printer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        ids = torch.tensor([chat_ids(tokenizer, messages, room)], device=device)
        new = generate_ids(model, ids, None, s.max_new_tokens, streamer=streamer, **kwargs)
        streamer.finish()
        print(f"\n{SEPARATOR}", flush=True)
        reply = tokenizer.decode(until_eot(new[0].tolist(), kwargs["eos_token_id"]), skip_special_tokens=True)
        messages.append({"role": "assistant", "content": reply})
        line = ""


def compile_kwargs(device: torch.device) -> dict:  # --compile: a static cache, one compiled decoding step
    config = CompileConfig(fullgraph=False, mode="default" if device.type == "cpu" else "reduce-overhead")
    config._compile_all_devices = device.type != "cuda"  # else transformers compiles on accelerators only
    return dict(cache_implementation="static", compile_config=config)


def load(s: SampleSettings):  # (model in the chosen dtype on the chosen device, tokenizer, device)
    device_type = hardware.resolve_device_type(s.device)
    device = torch.device(device_type if s.device == "auto" else s.device)
    dtype = hardware.torch_dtype(hardware.resolve_mixed_precision(s.dtype, device_type))
    hf_logging.disable_progress_bar()  # the output is the samples: no "Loading weights" bars
    ref = s.out_dir if s.init_from == "resume" else s.init_from
    if s.init_from == "resume" and not os.path.isdir(ref):  # out_dir is a local folder, never a Hub id
        raise UserError(f"there is no checkpoint folder '{ref}'; train a model first, or set --out_dir/--init_from")
    model, tokenizer = checkpoint.load_pretrained(ref, dtype=dtype)
    if tokenizer is None:
        raise UserError(f"'{ref}' holds no tokenizer to encode the prompt; save one into it (save_pretrained)")
    return model.to(device=device, dtype=dtype).eval(), tokenizer, device


def main(argv: list[str] | None = None) -> None:
    s, _ = parse_command(SampleSettings, argv, prog="sample.py",
                         description="Generate text from a trained nanogpt_hf model (nanoGPT's sample.py options).")
    if s.stream and s.batch:
        raise UserError("--stream prints one sample at a time; drop --batch (or --stream)")
    prompt = read_prompt(s.start)
    model, tokenizer, device = load(s)
    kwargs = generation_kwargs(tokenizer, s.temperature, s.top_k, s.top_p, s.repetition_penalty, s.greedy,
                               s.stop_at_eot)
    if s.chat:
        return chat(model, tokenizer, s, kwargs | (compile_kwargs(device) if s.compile else {}), device)
    ids = encode_prompt(tokenizer, prompt, block_size_of(model))
    if s.stop_at_eot and not kwargs["eos_token_id"]:
        raise UserError("--stop_at_eot: this tokenizer has no end-of-text token (a character vocabulary has none)")
    kwargs.update(compile_kwargs(device) if s.compile else {})
    rows = s.num_samples if s.batch else 1  # per call: all samples at once, or one at a time
    for k in range(s.num_samples // rows):
        torch.manual_seed(sample_seed(s.seed, k))
        input_ids, mask = left_pad([ids] * rows, kwargs["pad_token_id"], device)
        if s.stream:
            print(prompt, end="", flush=True)
            streamer = Printer(tokenizer, skip_prompt=True, skip_special_tokens=s.stop_at_eot)
            generate_ids(model, input_ids, mask, s.max_new_tokens, streamer=streamer, **kwargs)
            streamer.finish()
            print(f"\n{SEPARATOR}")
        else:
            for row in generate_ids(model, input_ids, mask, s.max_new_tokens, **kwargs).tolist():
                print(prompt + tokenizer.decode(until_eot(row, kwargs["eos_token_id"])), SEPARATOR, sep="\n")
