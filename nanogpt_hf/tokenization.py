"""Tokenizers, offline: GPT-2 BPE (tiktoken, and a transformers tokenizer with the same ids) and characters.

GPT-2: the r50k ranks ship in assets/ (sha256-checked); data is prepared with tiktoken's encode_ordinary, as nanoGPT
(only the EOT after each document is 50256); gpt2_tokenizer() maps a literal "<|endoftext|>" to 50256, as HF's gpt2.
Characters: nanoGPT's shakespeare_char ids (index in sorted(set(text))), so a meta.pkl's stoi maps 1:1.
Trained: a byte-level BPE on your corpus (nanochat's HF tokenizers recipe), ids 0..9 its special tokens.
Chat: nanochat's turn tokens (GPT-2's in the padding from 50257, a trained BPE's reserved ones, a char vocabulary's
appended) and CHAT_TEMPLATE, whose {% generation %} block lets transformers mark the assistant's tokens."""

import functools
import os
import re

import tiktoken
from tiktoken.load import load_tiktoken_bpe
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import AutoTokenizer, GPT2Tokenizer, PreTrainedTokenizerFast
from transformers.convert_slow_tokenizer import TikTokenConverter

from .common import UserError

ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")
GPT2_RANKS_PATH = os.path.join(ASSETS, "gpt2.tiktoken")
GPT2_RANKS_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"  # tiktoken's r50k_base
GPT2_PAT_STR = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
GPT2_EOT = 50256
GPT2_EOT_TEXT = "<|endoftext|>"
GPT2_VOCAB_SIZE = 50257
SPLIT_PATTERNS = {  # the regex that cuts text into words before BPE: GPT-2's, or nanochat's GPT-4 style (cl100k with
    "gpt2": GPT2_PAT_STR,  # digits in groups of 1-2, line breaks kept apart from words)
    "gpt4": r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]"""
            r"""|\s+(?!\S)|\s+""",
}
CHAT_TOKENS = ("<|bos|>", "<|user_start|>", "<|user_end|>", "<|assistant_start|>", "<|assistant_end|>",  # nanochat's,
               "<|python_start|>", "<|python_end|>", "<|output_start|>", "<|output_end|>")  # for chat finetuning
CHAT_TEMPLATE = (  # nanochat's rendering: bos, then turns; a system message opens the next user turn
    "{%- set ns = namespace(system='') -%}{{- bos_token or '' -}}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}{%- set ns.system = ns.system + message['content'] + '\n\n' -%}"
    "{%- elif message['role'] == 'user' -%}"
    "{{- '<|user_start|>' + ns.system + message['content'] + '<|user_end|>' -}}{%- set ns.system = '' -%}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{- '<|assistant_start|>' -}}{% generation %}{{- message['content'] + '<|assistant_end|>' -}}{% endgeneration %}"
    "{%- else -%}{{- raise_exception('a message has the role ' + message['role'] + '; use system, user or "
    "assistant') -}}{%- endif -%}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|assistant_start|>' -}}{%- endif -%}")
END_OF_TURN = "<|assistant_end|>"


@functools.cache
def gpt2_encoding() -> tiktoken.Encoding:
    """tiktoken's "gpt2" encoding from the shipped ranks (hash-checked). "Hello world" -> [15496, 995]."""
    ranks = load_tiktoken_bpe(GPT2_RANKS_PATH, expected_hash=GPT2_RANKS_SHA256)
    return tiktoken.Encoding(name="gpt2", pat_str=GPT2_PAT_STR, mergeable_ranks=ranks,
                             special_tokens={GPT2_EOT_TEXT: GPT2_EOT}, explicit_n_vocab=GPT2_VOCAB_SIZE)


@functools.cache
def _gpt2_vocab_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    gpt2_encoding()  # checks the rank file's hash first
    vocab, merges = TikTokenConverter().extract_vocab_merges_from_model(GPT2_RANKS_PATH)
    return {**vocab, GPT2_EOT_TEXT: GPT2_EOT}, merges


def gpt2_tokenizer(model_max_length: int = 1024) -> PreTrainedTokenizerFast:
    """A transformers GPT2Tokenizer with ids identical to tiktoken's; bos = eos = unk = <|endoftext|>, no pad."""
    vocab, merges = _gpt2_vocab_merges()
    # clean_up_tokenization_spaces=False: decode gives the text back, not "fixed" spaces before punctuation
    return GPT2Tokenizer(vocab=dict(vocab), merges=list(merges), model_max_length=model_max_length,
                         clean_up_tokenization_spaces=False)


def char_tokenizer_from_stoi(stoi: dict[str, int]) -> PreTrainedTokenizerFast:
    """A character tokenizer with the given char -> id map (e.g. a nanoGPT meta.pkl's stoi); ids must be 0..n-1."""
    if not stoi or any(len(c) != 1 for c in stoi) or sorted(stoi.values()) != list(range(len(stoi))):
        raise UserError("a character vocabulary maps single characters to the ids 0..n-1 (as nanoGPT's meta.pkl)")
    backend = Tokenizer(models.WordLevel(vocab=dict(stoi), unk_token=None))
    known = "".join(f"\\x{{{ord(c):x}}}" for c in stoi)  # escaped, so ']', '^', '\\' or '-' cannot break the class
    backend.normalizer = normalizers.Replace(Regex(f"[^{known}]"), "")  # drop unknown characters
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # one token per character
    backend.decoder = decoders.Fuse()  # join the characters with nothing in between
    return PreTrainedTokenizerFast(tokenizer_object=backend, clean_up_tokenization_spaces=False)


def char_tokenizer(text: str) -> PreTrainedTokenizerFast:  # over sorted(set(text)): nanoGPT's shakespeare_char ids
    return char_tokenizer_from_stoi({c: i for i, c in enumerate(sorted(set(text)))})


def train_bpe(texts, vocab_size: int, split_pattern: str = "gpt4") -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on `texts` (an iterator of strings or lists of them): the 256 bytes are tokens, so any
    text encodes and decodes back byte for byte; <|endoftext|> (id 0, bos = eos) and CHAT_TOKENS come first."""
    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token=None, fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence([  # the split regex, then bytes as printable characters
        pre_tokenizers.Split(Regex(SPLIT_PATTERNS[split_pattern]), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainer=trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=0, show_progress=False, special_tokens=[GPT2_EOT_TEXT, *CHAT_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=GPT2_EOT_TEXT, eos_token=GPT2_EOT_TEXT,
                                   clean_up_tokenization_spaces=False)


def with_chat_template(tok, name: str = "the tokenizer"):
    """`tok` with nanochat's turn tokens (those it lacks appended) and CHAT_TEMPLATE; a template of its own is kept
    when it marks the assistant's turns with {% generation %}, and refused when it does not."""
    if tok.chat_template:  # its own
        if not re.search(r"{%-?\s*generation\s*-?%}", tok.chat_template):
            raise UserError(f"the chat template of {name} has no {{% generation %}} block, so the assistant's tokens "
                            "to learn cannot be found; use a tokenizer without a template (ours is added) or add it")
        return tok
    tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in CHAT_TOKENS if t not in tok.get_vocab()],
                   special_tokens=True)
    tok.bos_token = tok.bos_token or CHAT_TOKENS[0]  # a char vocabulary has none: each conversation starts with one
    tok.chat_template = CHAT_TEMPLATE
    return tok


def same_vocabulary(a, b) -> bool:  # the same token -> id map: the same ids mean the same text
    return a.get_vocab() == b.get_vocab()


def extends(a, b) -> bool:  # a holds b's tokens at b's ids, and maybe more after them (chat tokens)
    vocab = a.get_vocab()
    return all(vocab.get(token) == i for token, i in b.get_vocab().items())


def is_char_tokenizer(tok) -> bool:  # a WordLevel vocabulary of characters
    return isinstance(getattr(getattr(tok, "backend_tokenizer", None), "model", None), models.WordLevel)


def unknown_char(tokenizer: PreTrainedTokenizerFast, text: str) -> str | None:
    """The first character of `text` that a character tokenizer would drop, named; None if there is none."""
    if not is_char_tokenizer(tokenizer):  # other tokenizers encode any text
        return None
    vocab = tokenizer.get_vocab()
    return next((f"character {c!r} (U+{ord(c):04X}, position {i}) is not in the model's character vocabulary; it "
                 "would be dropped" for i, c in enumerate(text) if c not in vocab), None)


def check_known_chars(tokenizer: PreTrainedTokenizerFast, text: str) -> None:
    """Raise UserError naming the first character of `text` that a character tokenizer does not know."""
    if problem := unknown_char(tokenizer, text):
        raise UserError(f"{problem}: remove it from the prompt")


def tokenizer_kind(tok) -> str:
    """"char" (a WordLevel vocabulary of characters), "gpt2" (50257 tokens, <|endoftext|> = 50256), else the model
    of its tokenizer.json in lower case ("bpe" for a trained one, "unigram", "wordpiece")."""
    if is_char_tokenizer(tok):
        return "char"
    sizes = (GPT2_VOCAB_SIZE, GPT2_VOCAB_SIZE + len(CHAT_TOKENS))  # with its chat tokens too
    if len(tok) in sizes and tok.convert_tokens_to_ids(GPT2_EOT_TEXT) == GPT2_EOT:
        return "gpt2"
    if (model := getattr(getattr(tok, "backend_tokenizer", None), "model", None)) is None:
        raise UserError(f"tokenizer {type(tok).__name__} has no tokenizer.json (a slow tokenizer); use a fast one")
    return type(model).__name__.lower()


def load_tokenizer(path: str) -> PreTrainedTokenizerFast:  # of a local folder saved with save_pretrained
    if not os.path.isfile(os.path.join(path, "tokenizer.json")):
        raise UserError(f"'{path}' holds no tokenizer.json: pass a folder saved with save_pretrained")
    return AutoTokenizer.from_pretrained(path)
