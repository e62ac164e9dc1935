"""Tokenizers, offline: GPT-2 BPE (tiktoken + an identical transformers tokenizer) and a character tokenizer.

GPT-2 BPE
    The r50k rank file ships in nanogpt_hf/assets/gpt2.tiktoken and is checked against its published sha256 when it
    is loaded, so nothing is ever downloaded. Two views of the same vocabulary:
    - `gpt2_encoding()`: a tiktoken Encoding, ~5x faster, used to prepare data.
    - `gpt2_tokenizer()`: a transformers GPT2Tokenizer (the fast, `tokenizers`-backed class) with identical ids,
      saved beside checkpoints so that AutoTokenizer, pipeline() and the Hub work with no custom code.

    The text "<|endoftext|>" inside raw text is treated differently on purpose, each path following its origin:
    - data preparation uses `encode_ordinary`, as nanoGPT does: the literal text is split into ordinary tokens
      ("<|", "endoftext", "|>") and only the EOT *appended* after each document is 50256;
    - the transformers tokenizer maps the literal text to 50256, as HF's gpt2 tokenizer does, so that prompts can
      contain a document separator. This equals tiktoken's `encode(text, allowed_special="all")`.
    bos, eos and unk are all <|endoftext|>; there is no pad token (set one at batching time if needed).

Character level
    `char_tokenizer(text)` maps every distinct character of a corpus to its index in sorted(set(text)), exactly as
    nanoGPT's shakespeare_char prepare.py does, so a nanoGPT meta.pkl's `stoi` maps 1:1
    (`char_tokenizer_from_stoi`). It is a plain `tokenizers` pipeline (WordLevel over the characters, a pre-tokenizer
    that isolates every character, a Fuse decoder), so AutoTokenizer.from_pretrained(folder) loads it with no custom
    code, and decode(encode(text)) == text for any text made of known characters (spaces, runs of spaces and
    newlines included). There are no special tokens: len(tokenizer) == number of characters.

    Unknown characters (not in the corpus) are DROPPED by a normalizer, so encoding never invents an id the model
    has never seen; `check_known_chars(tokenizer, text)` raises a UserError naming the first unknown character, for
    callers (sample.py) that would rather refuse such a prompt than drop characters silently.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import os
from typing import Iterable

import tiktoken
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
from transformers import AutoTokenizer, GPT2Tokenizer, PreTrainedTokenizerFast
from transformers.convert_slow_tokenizer import bytes_to_unicode

from .errors import UserError, first_line

ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")
GPT2_RANKS_PATH = os.path.join(ASSETS, "gpt2.tiktoken")
GPT2_RANKS_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"  # tiktoken's r50k_base hash
GPT2_PAT_STR = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
GPT2_EOT = 50256
GPT2_EOT_TEXT = "<|endoftext|>"
GPT2_VOCAB_SIZE = 50257

# stored in tokenizer_config.json (init kwargs are saved there) so a saved folder says what it is
KIND_KEY = "nanogpt_tokenizer"


# ----------------------------------------------------------------------------------------------------------------
# GPT-2 BPE


@functools.cache
def gpt2_ranks() -> dict[bytes, int]:
    """The 50,256 mergeable ranks of GPT-2 (r50k), read from the shipped file and verified by sha256."""
    try:
        with open(GPT2_RANKS_PATH, "rb") as fh:
            raw = fh.read()
    except OSError as exc:
        raise UserError(f"the GPT-2 rank file is missing ({GPT2_RANKS_PATH}: {exc.strerror}); reinstall nanogpt-hf")
    digest = hashlib.sha256(raw).hexdigest()
    if digest != GPT2_RANKS_SHA256:
        raise UserError(
            f"the GPT-2 rank file {GPT2_RANKS_PATH} is damaged (sha256 {digest[:12]}..., expected "
            f"{GPT2_RANKS_SHA256[:12]}...); reinstall nanogpt-hf"
        )
    return {base64.b64decode(token): int(rank) for token, rank in (line.split() for line in raw.splitlines() if line)}


@functools.cache
def gpt2_encoding() -> tiktoken.Encoding:
    """tiktoken's "gpt2" encoding, built offline from the shipped ranks. "Hello world" -> [15496, 995]."""
    return tiktoken.Encoding(
        name="gpt2",
        pat_str=GPT2_PAT_STR,
        mergeable_ranks=gpt2_ranks(),
        special_tokens={GPT2_EOT_TEXT: GPT2_EOT},
        explicit_n_vocab=GPT2_VOCAB_SIZE,
    )


@functools.cache
def _gpt2_vocab_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The ranks as a byte-level BPE vocabulary and merge list (the same derivation as transformers' TikTokenConverter).

    Every split (left, right) of a token whose halves are both tokens is a merge, ranked by the rank of the merged
    token: BPE then merges exactly the adjacent pairs tiktoken would, in the same order (~0.5 s, cached).
    """
    ranks = gpt2_ranks()
    byte_to_char = bytes_to_unicode()

    def as_str(b: bytes) -> str:
        return "".join(byte_to_char[x] for x in b)

    vocab = {as_str(token): rank for token, rank in ranks.items()}
    vocab[GPT2_EOT_TEXT] = GPT2_EOT
    merges = []
    for token, rank in ranks.items():
        for i in range(1, len(token)):
            left, right = token[:i], token[i:]
            if left in ranks and right in ranks:
                merges.append((rank, ranks[left], ranks[right], left, right))
    merges.sort()
    return vocab, [(as_str(left), as_str(right)) for *_, left, right in merges]


def gpt2_tokenizer(model_max_length: int = 1024) -> PreTrainedTokenizerFast:
    """A transformers GPT-2 tokenizer with ids identical to tiktoken's encode(text, allowed_special="all")."""
    vocab, merges = _gpt2_vocab_merges()
    return GPT2Tokenizer(
        vocab=dict(vocab),
        merges=list(merges),
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,  # decode must give back the text, not "fix" spaces before punctuation
        **{KIND_KEY: "gpt2"},
    )


# ----------------------------------------------------------------------------------------------------------------
# Character level


def _char_class(chars: Iterable[str]) -> str:
    # \x{HHHH} escapes every character, so none of them (']', '^', '\\', '-') can break the regex class
    return "".join(f"\\x{{{ord(c):x}}}" for c in chars)


def char_tokenizer_from_stoi(stoi: dict[str, int]) -> PreTrainedTokenizerFast:
    """A character tokenizer with the given char -> id map (e.g. a nanoGPT meta.pkl's stoi); ids must be 0..n-1."""
    if not stoi:
        raise UserError("a character tokenizer needs at least one character")
    if any(len(c) != 1 for c in stoi):
        bad = next(c for c in stoi if len(c) != 1)
        raise UserError(f"character vocabulary entries must be single characters; got {bad!r}")
    if sorted(stoi.values()) != list(range(len(stoi))):
        raise UserError("character ids must be exactly 0..n-1 (as in nanoGPT's meta.pkl)")
    backend = Tokenizer(models.WordLevel(vocab=dict(stoi), unk_token=None))
    # drop characters outside the vocabulary (documented above): no unknown id the model never trained on
    backend.normalizer = normalizers.Replace(Regex(f"[^{_char_class(stoi)}]"), "")
    # one token per character (a code point), newlines included
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()  # join the characters with nothing in between
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        clean_up_tokenization_spaces=False,
        **{KIND_KEY: "char"},
    )


def char_tokenizer(text_or_chars: str | Iterable[str]) -> PreTrainedTokenizerFast:
    """A character tokenizer over sorted(set(text)): nanoGPT's shakespeare_char ids."""
    chars = sorted(set(text_or_chars if isinstance(text_or_chars, str) else "".join(text_or_chars)))
    if not chars:
        raise UserError("cannot build a character tokenizer from an empty corpus")
    return char_tokenizer_from_stoi({c: i for i, c in enumerate(chars)})


def check_known_chars(tokenizer: PreTrainedTokenizerFast, text: str) -> None:
    """Raise UserError naming the first character of `text` that a character tokenizer does not know."""
    vocab = tokenizer.get_vocab()
    for i, c in enumerate(text):
        if c not in vocab:
            raise UserError(
                f"character {c!r} (U+{ord(c):04X}, position {i}) is not in the model's character vocabulary; "
                "it would be dropped: remove it from the prompt"
            )


# ----------------------------------------------------------------------------------------------------------------
# Which tokenizer is this, and loading a saved one


def tokenizer_kind(tok) -> str:
    """"gpt2" or "char": from the saved marker, else inferred from the backend (WordLevel => char)."""
    kind = getattr(tok, "init_kwargs", {}).get(KIND_KEY)
    if kind in ("gpt2", "char"):
        return kind
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is not None and type(backend.model).__name__ == "WordLevel":
        return "char"
    if len(tok) == GPT2_VOCAB_SIZE and tok.convert_tokens_to_ids(GPT2_EOT_TEXT) == GPT2_EOT:
        return "gpt2"
    raise UserError(f"unknown tokenizer {type(tok).__name__} with {len(tok)} tokens; expected GPT-2 BPE or char")


def load_tokenizer(path: str) -> PreTrainedTokenizerFast:
    """AutoTokenizer.from_pretrained(path) for a local folder, with a clear error when there is none."""
    if not os.path.isdir(path):
        raise UserError(f"tokenizer folder '{path}' does not exist")
    if not any(os.path.isfile(os.path.join(path, f)) for f in ("tokenizer.json", "tokenizer_config.json")):
        raise UserError(f"'{path}' holds no tokenizer (tokenizer.json); was it saved with save_pretrained?")
    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as exc:  # damaged files: json, tokenizers and transformers each raise their own kind
        raise UserError(f"cannot load the tokenizer in '{path}': {first_line(exc)}; restore its tokenizer.json and "
                        "tokenizer_config.json (a prepared dataset holds a copy)") from None
