"""sample.py: generate text from a trained model, nanoGPT's options on top of transformers' model.generate.

What differs from nanoGPT's sample.py, and why:
- Generation runs through `model.generate` with a KV cache: each new token costs one position of compute instead of
  a full forward over the whole context (the speed-up is measured by `bench.py --mode=generate`).
- The same seed gives the same text: before each sample the torch RNG is seeded with a pure function of
  (seed, sample index), so sample 3 is the same whether 1 or 10 samples are drawn. `--batch` draws all samples in
  one batched (left-padded) generate call, seeded once with (seed, 0): also reproducible, but not the same text as
  one-by-one sampling (the random draws are interleaved differently).
- Sliding window. A model sees at most block_size tokens. A prompt longer than that keeps its last block_size tokens
  (with a note on stderr). When prompt + max_new_tokens exceeds block_size, generation goes on nanoGPT-style by
  conditioning on the most recent tokens only: we generate with the cache until a token has been predicted from a
  full block_size context, then crop the context to its last 3/4 * block_size tokens, re-prefill the cache with
  them, and continue. Every token is thus predicted from at least 3/4 * block_size (at most block_size) previous
  tokens; nanoGPT always uses exactly block_size but pays a full forward per token for it. With a context that fits
  (prompt + max_new_tokens - 1 <= block_size: the last token is never fed back), the tokens are exactly nanoGPT's.
- nanoGPT never stops at <|endoftext|>; neither do we unless --stop_at_eot.
- The model runs in the chosen dtype itself (bf16 weights, not fp32 weights under autocast as nanoGPT does on GPU;
  nanoGPT samples in fp32 on CPU): sampling needs no fp32 master copy, and one-token decoding is bound by memory
  traffic and per-op latency, which bf16 weights halve and autocast's per-call casts add to. dtype auto is
  hardware.py's choice, as for training: bf16 where the device has it (this CPU: AVX-512 BF16), else fp32.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys

import numpy as np
import torch

from . import hardware
from .errors import UserError, first_line
from .settings import parse_command, setting

GPT2_IDS = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")
# when the context is full, keep this fraction of block_size and re-prefill (see the module docstring)
KEEP_FRACTION = 0.75
MIN_TEMPERATURE = 1e-6


@dataclasses.dataclass
class SampleSettings:
    out_dir: str = setting("out", "checkpoint folder used by --init_from=resume", path=True)
    init_from: str = setting("resume", "resume (= out_dir), a checkpoint folder, a Hub id, or gpt2 / gpt2-medium / "
                                       "gpt2-large / gpt2-xl", path=True)
    start: str = setting("\n", "the prompt; FILE:path reads it from a file")
    num_samples: int = setting(10, "number of samples to draw")
    max_new_tokens: int = setting(500, "tokens generated per sample")
    temperature: float = setting(0.8, "1.0 = no change, < 1.0 = less random, > 1.0 = more random; at least 1e-6")
    top_k: int = setting(200, "keep only the top_k most likely tokens (0 = all)")
    top_p: float = setting(1.0, "nucleus sampling: keep the smallest set of tokens with this total probability")
    repetition_penalty: float = setting(1.0, "> 1.0 discourages repeating tokens already in the context")
    greedy: bool = setting(False, "always take the most likely token (temperature, top_k, top_p ignored)")
    batch: bool = setting(False, "draw all samples in one batched generate call (faster; different text)")
    stream: bool = setting(False, "print tokens as they are generated")
    stop_at_eot: bool = setting(False, "stop a sample at the end-of-text token (nanoGPT never stops)")
    seed: int = setting(1337, "random seed; the same seed gives the same samples")
    device: str = setting("auto", "auto (cuda if available, else cpu), cpu, cuda, cuda:1, ...")
    dtype: str = setting("auto", "auto, bfloat16, float16 or float32 (auto: bf16 where supported, else fp32)")
    compile: bool = setting(False, "compile the decoding step (static KV cache + torch.compile; slow to start)")


# ---- pure helpers ------------------------------------------------------------------------------------------------


def sample_seed(seed: int, index: int) -> int:
    """The RNG seed of sample `index`: a pure function of (seed, index); distinct seeds never share samples
    (seed + index would make seed 1337's second sample seed 1338's first)."""
    return int(np.random.SeedSequence([seed % 2**64, index]).generate_state(1, np.uint64)[0])


def read_prompt(start: str) -> str:
    """nanoGPT's --start: the text itself, or FILE:path for the contents of a file."""
    if not start.startswith("FILE:"):
        return start
    path = os.path.expanduser(start[len("FILE:"):])  # the shell does not expand FILE:~/...
    if not os.path.isfile(path):
        what = "is a folder, not a file" if os.path.isdir(path) else "does not exist"
        raise UserError(f"prompt file '{path}' (from --start=FILE:{path}) {what}")
    try:
        with open(path, encoding="utf-8") as fh:
            return fh.read()
    except UnicodeDecodeError:
        raise UserError(f"prompt file '{path}' is not UTF-8 text; convert it (e.g. iconv -t utf-8)") from None


def block_size_of(model) -> int:
    """The longest context the model accepts (block_size; n_positions for a stock GPT-2)."""
    return int(model.config.max_position_embeddings)


def window_keep(block_size: int) -> int:
    """How many recent tokens the sliding window keeps when the context overflows (see the module docstring).
    Even keep = block_size makes progress: a context of block_size tokens still predicts one more token."""
    return max(1, int(block_size * KEEP_FRACTION))


def generation_kwargs(tokenizer, temperature: float = 0.8, top_k: int = 200, top_p: float = 1.0,
                      repetition_penalty: float = 1.0, greedy: bool = False, stop_at_eot: bool = False) -> dict:
    """Arguments for model.generate. Every value is explicit: generate fills unset (None) ones from the model's
    generation_config and its own defaults (top_k=50!), which would silently change the sampling."""
    eot = tokenizer.eos_token_id if stop_at_eot else None
    # greedy takes the argmax: temperature/top_k/top_p do not apply (and generate warns when they are passed)
    sampling = {} if greedy else dict(temperature=temperature, top_k=top_k, top_p=top_p)  # top_k=0 disables top-k
    kwargs = dict(
        do_sample=not greedy,
        **sampling,
        repetition_penalty=repetition_penalty,
        # An empty list, not None: None would be replaced by the model's eos_token_id and stop at <|endoftext|>.
        eos_token_id=[eot] if eot is not None else [],
        # padding only matters for left-padded batches; any id works there because the attention mask hides it
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eot or 0),
    )
    return kwargs


def left_pad(rows: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """A left-padded (B, T) batch and its attention mask: generation continues every row at the right edge."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
            mask[i, width - len(r):] = 1
    return ids.to(device), mask.to(device)


@torch.inference_mode()
def generate_ids(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, max_new_tokens: int,
                 streamer=None, **gen_kwargs) -> torch.Tensor:
    """Generate max_new_tokens after input_ids (B, T) with the KV cache, sliding the window past block_size.

    Returns only the new tokens (B, max_new_tokens), fewer if every row stopped at end-of-text. Chunks: generate with
    the cache until the context holds block_size + 1 tokens (the last one predicted from a full block, as nanoGPT
    does; it is never fed to the model), then keep its last KEEP_FRACTION * block_size tokens, re-prefill, repeat
    (see the module docstring). The prompt must already fit in block_size.
    """
    block_size = block_size_of(model)
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    eos = gen_kwargs.get("eos_token_id") or []
    ids, mask = input_ids, attention_mask
    new_chunks = []
    done = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
    remaining = max_new_tokens
    while remaining > 0:
        if ids.shape[1] > block_size:  # the context no longer fits: slide the window
            keep = window_keep(block_size)
            ids, mask = ids[:, -keep:], mask[:, -keep:]
        # n new tokens take n - 1 forward positions after the prompt (the last token is not fed back), so a chunk
        # may grow the context to block_size + 1 tokens: nanoGPT crops only when the context exceeds block_size
        n = min(remaining, block_size + 1 - ids.shape[1])
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=0,
                             streamer=streamer, **gen_kwargs)
        new = out[:, ids.shape[1]:]
        new_chunks.append(new)
        remaining -= new.shape[1]
        if eos:
            done |= torch.isin(new, torch.tensor(eos, device=new.device)).any(dim=1)
            if bool(done.all()) or new.shape[1] < n:
                break
        ids = out
        mask = torch.cat([mask, torch.ones_like(new)], dim=1)
    return torch.cat(new_chunks, dim=1)


def crop_prompt(ids: list[int], block_size: int, warn=None) -> list[int]:
    """Keep the last block_size tokens of a too-long prompt, and say so (nanoGPT crops the same way)."""
    if len(ids) > block_size:
        if warn is not None:
            warn(f"note: the prompt has {len(ids)} tokens, more than block_size {block_size}; "
                 f"keeping its last {block_size}")
        ids = ids[-block_size:]
    return ids


def truncate_at_eot(ids: list[int], eos: list[int]) -> list[int]:
    for i, t in enumerate(ids):
        if t in eos:
            return ids[:i]
    return ids


def generate_text(model, tokenizer, prompt: str, max_new_tokens: int = 200, temperature: float = 0.8,
                  top_k: int = 200, seed: int | None = 1337, stop_at_eot: bool = False) -> str:
    """One sample of `prompt` + continuation, as text. Used by training to show a sample at the end of a run.

    Runs in the model's current dtype and device (wrap it in autocast to sample in mixed precision); puts the model
    in eval mode for the call and restores its training mode.
    """
    if seed is not None:
        torch.manual_seed(sample_seed(seed, 0))
    device = next(model.parameters()).device
    ids = tokenizer(prompt)["input_ids"] or _start_ids(tokenizer)
    ids = crop_prompt(ids, block_size_of(model))
    kwargs = generation_kwargs(tokenizer, temperature=temperature, top_k=top_k, stop_at_eot=stop_at_eot)
    was_training = model.training
    model.eval()
    try:
        new = generate_ids(model, torch.tensor([ids], device=device), None, max_new_tokens, **kwargs)
    finally:
        model.train(was_training)
    new_ids = truncate_at_eot(new[0].tolist(), kwargs["eos_token_id"])
    return prompt + tokenizer.decode(new_ids)


def _start_ids(tokenizer) -> list[int]:
    """What an empty prompt starts from: the beginning-of-text token, like GPT-2's unconditional samples."""
    if tokenizer.bos_token_id is None:
        raise UserError("the prompt is empty and this tokenizer has no beginning-of-text token; give --start=TEXT")
    return [tokenizer.bos_token_id]


# ---- loading -----------------------------------------------------------------------------------------------------


def load_model_and_tokenizer(init_from: str, out_dir: str):
    """(model, tokenizer) for --init_from: resume (out_dir), gpt2*, a checkpoint folder, or a Hub id."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from . import tokenization
    from .checkpoint import tokenizer_folder
    from .modeling_nanogpt import NanoGPTForCausalLM

    source = out_dir if init_from == "resume" else init_from
    if source in GPT2_IDS and not os.path.isdir(source):
        try:
            model = NanoGPTForCausalLM.from_gpt2(source)
        except OSError as exc:
            raise UserError(f"{exc} (offline? set --init_from to a local folder)") from None
        return model, tokenization.gpt2_tokenizer()
    if os.path.isdir(source):
        if not os.path.isfile(os.path.join(source, "config.json")):
            inside = sorted(os.path.join(source, d) for d in os.listdir(source)
                            if os.path.isfile(os.path.join(source, d, "config.json")))  # e.g. out/ of every run
            option = "--out_dir=" if init_from == "resume" else "--init_from="
            fix = f"choose one inside it: {option}{(' or ' + option).join(inside)}" if inside else \
                "train one or set --init_from"
            raise UserError(f"'{source}' is not a checkpoint folder (no config.json); {fix}")
        from safetensors import SafetensorError

        try:
            model = AutoModelForCausalLM.from_pretrained(source)
        except (OSError, ValueError, SafetensorError) as exc:  # SafetensorError: truncated or corrupt weights
            raise UserError(f"cannot load the checkpoint in '{source}': {first_line(exc)}") from None
        return model, tokenization.load_tokenizer(tokenizer_folder(source))
    if init_from == "resume" or source.startswith((".", "/", "~")) or source.count("/") > 1:
        raise UserError(f"checkpoint folder '{source}' does not exist; train a model first or set --init_from")
    try:  # a Hub id (owner/name)
        model = AutoModelForCausalLM.from_pretrained(source)
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot load '{source}': no such folder, and not reachable on the Hub "
                        f"({first_line(exc)})") from None
    return model, tokenizer


def is_char_tokenizer(tokenizer) -> bool:
    from . import tokenization

    try:
        return tokenization.tokenizer_kind(tokenizer) == "char"
    except UserError:
        return False


def encode_prompt(tokenizer, prompt: str, block_size: int, vocab_size: int) -> list[int]:
    """Prompt -> ids, with the user errors a prompt or vocabulary can cause caught here, not deep inside torch."""
    if len(tokenizer) == 0:
        raise UserError("the checkpoint's tokenizer has an empty vocabulary; re-save the checkpoint with its tokenizer")
    if len(tokenizer) > vocab_size:
        raise UserError(f"the tokenizer has {len(tokenizer)} tokens but the model only {vocab_size}: "
                        "they do not belong together")
    if is_char_tokenizer(tokenizer):
        from .tokenization import check_known_chars

        check_known_chars(tokenizer, prompt)
    ids = tokenizer(prompt)["input_ids"] if prompt else []
    return crop_prompt(ids or _start_ids(tokenizer), block_size, warn=lambda m: print(m, file=sys.stderr))


def check_settings(s: SampleSettings) -> None:
    # generate divides the logits by the temperature: below ~1e-6 they overflow to inf (NaN probabilities), and
    # NaN slips past every comparison
    if not s.greedy and not (math.isfinite(s.temperature) and s.temperature >= MIN_TEMPERATURE):
        raise UserError(f"temperature must be a number >= {MIN_TEMPERATURE:g} (got {s.temperature}); "
                        "for the most likely tokens use --greedy")
    if s.num_samples < 1 or s.max_new_tokens < 1:
        raise UserError("num_samples and max_new_tokens must be at least 1")
    if s.top_k < 0:
        raise UserError(f"top_k must be >= 0 (0 = no top-k), got {s.top_k}")
    if not 0.0 < s.top_p <= 1.0:
        raise UserError(f"top_p must be in (0, 1], got {s.top_p}")
    if not (math.isfinite(s.repetition_penalty) and s.repetition_penalty > 0):
        raise UserError(f"repetition_penalty must be > 0, got {s.repetition_penalty}")
    if s.stream and s.batch:
        raise UserError("--stream prints one sample at a time; drop --batch (or --stream)")


# ---- the command -------------------------------------------------------------------------------------------------


def _printing_streamer(tokenizer, skip_special_tokens: bool = False):
    """A TextStreamer for generate_ids, which calls generate once per window chunk, and each call ends the stream:
    ending a chunk only marks the next call's prompt as not to be printed, and keeps the tokens not yet printed (the
    bytes of a character split between chunks printed as two '\ufffd' where the whole text has the character);
    finish() flushes them. It never adds a newline of its own."""
    from transformers import TextStreamer

    class Printer(TextStreamer):
        def on_finalized_text(self, text: str, stream_end: bool = False):
            print(text, end="", flush=True)

        def end(self):
            self.next_tokens_are_prompt = True

        def finish(self):
            super().end()

    return Printer(tokenizer, skip_prompt=True, skip_special_tokens=skip_special_tokens)


def resolve_device(name: str) -> torch.device:
    try:
        device = torch.device(hardware.default_device() if name == "auto" else name)
    except RuntimeError:
        raise UserError(f"device '{name}' is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device={name} but no CUDA GPU is visible; use --device=cpu")
    if device.type not in ("cpu", "cuda", "mps", "xpu"):
        raise UserError(f"device '{name}' is not supported; use auto, cpu or cuda")
    return device


def compile_kwargs(device: torch.device) -> dict:
    """--compile: a static cache lets generate compile one decoding step and reuse it (transformers does the rest)."""
    from transformers import CompileConfig

    config = CompileConfig(fullgraph=False, mode="default" if device.type == "cpu" else "reduce-overhead")
    config._compile_all_devices = device.type != "cuda"  # transformers only auto-compiles on accelerators otherwise
    return dict(cache_implementation="static", compile_config=config)


def main(argv: list[str] | None = None) -> None:
    s, _ = parse_command(SampleSettings, argv, prog="sample.py",
                         description="Generate text from a trained nanogpt_hf model (nanoGPT's sample.py options).")
    check_settings(s)
    prompt = read_prompt(s.start)
    # a command's output is its samples (and errors on one line): no "Loading weights" progress bars
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    device = resolve_device(s.device)
    precision = hardware.resolve_mixed_precision(s.dtype, device.type)
    model, tokenizer = load_model_and_tokenizer(s.init_from, s.out_dir)
    # sampling needs no fp32 master weights: the model runs in the chosen dtype (see the module docstring)
    model.to(device=device, dtype=hardware.torch_dtype(precision)).eval()
    ids = encode_prompt(tokenizer, prompt, block_size_of(model), model.config.vocab_size)

    kwargs = generation_kwargs(tokenizer, s.temperature, s.top_k, s.top_p, s.repetition_penalty, s.greedy,
                               s.stop_at_eot)
    if s.stop_at_eot and not kwargs["eos_token_id"]:
        raise UserError("--stop_at_eot: this tokenizer has no end-of-text token (a character vocabulary has none)")
    if s.compile:
        kwargs.update(compile_kwargs(device))
    eos = kwargs["eos_token_id"]
    separator = "---------------"

    if s.batch:
        torch.manual_seed(sample_seed(s.seed, 0))
        input_ids, mask = left_pad([ids] * s.num_samples, kwargs["pad_token_id"], device)
        new = generate_ids(model, input_ids, mask, s.max_new_tokens, **kwargs)
        for row in new.tolist():
            print(prompt + tokenizer.decode(truncate_at_eot(row, eos)))
            print(separator)
        return

    for k in range(s.num_samples):
        torch.manual_seed(sample_seed(s.seed, k))
        input_ids = torch.tensor([ids], device=device)
        if s.stream:
            print(prompt, end="", flush=True)
            streamer = _printing_streamer(tokenizer, skip_special_tokens=s.stop_at_eot)
            generate_ids(model, input_ids, None, s.max_new_tokens, streamer=streamer, **kwargs)
            streamer.finish()
            print()
        else:
            new = generate_ids(model, input_ids, None, s.max_new_tokens, **kwargs)
            print(prompt + tokenizer.decode(truncate_at_eot(new[0].tolist(), eos)))
        print(separator)


__all__ = ["SampleSettings", "generate_text", "generate_ids", "main", "sample_seed"]
