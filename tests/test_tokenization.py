"""Tokenizers: GPT-2 BPE identical to tiktoken offline, character tokenizer round trips, both load with AutoTokenizer."""

import json
import lzma
import os
import random
import sys

import pytest

from warm import warm_run
from nanogpt_hf import tokenization
from nanogpt_hf.common import UserError
from nanogpt_hf.tokenization import (
    GPT2_EOT,
    char_tokenizer,
    char_tokenizer_from_stoi,
    check_known_chars,
    gpt2_encoding,
    gpt2_tokenizer,
    load_tokenizer,
    tokenizer_kind,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def shakespeare() -> str:
    with lzma.open(tokenization.ASSETS + "/shakespeare.jsonl.xz", "rt", encoding="utf-8") as fh:
        return "".join(json.loads(line)["text"] for line in fh)


@pytest.fixture(scope="module")
def gpt2():
    return gpt2_tokenizer()


def varied_text(n_pieces: int, seed: int = 0) -> str:
    """Unicode, emoji (with joiners), CJK, RTL, whitespace runs of every kind, digits, code, contractions."""
    rng = random.Random(seed)
    pieces = [
        "Hello", " world", "The", " quick", "brown", "'s", "'ll", "'VE", "'d", "don't", "I'm",
        "  ", "   ", "\n", "\n\n", "\n\n\n", "\t", "\t\t", " \n ", "   \n", "\r\n", "\r", "\u00a0", "\u3000", "\u2028", "\u200b",
        "0", "7", "42", "123", "4567890", "3.14159", "1,000,000", "0x1F", "2024-01-01",
        "日本語のテキスト", "中文字符", "한국어", "Ωμέγα", "Привет", "שלום", "مرحبا", "١٢٣", "naïve", "café", "ﬁ", "e\u0301",
        "😀", "👩\u200d👩\u200d👧", "🤖🤖", "🇫🇷", "\U0001f9ea",
        "def f(x):\n    return x ** 2  # square\n", "{'a': [1, 2], \"b\": None}", "if (a && b) { c++; }",
        "<div class=\"x\">", "&amp;", "https://example.com/a?b=c", "~/.bashrc", "$HOME", "\\n", "\x00", "\ufeff", "<|endo", "|>",
    ]
    return "".join(rng.choice(pieces) + " " * rng.randint(0, 3) for _ in range(n_pieces))


def test_gpt2_encoding_is_offline_r50k():
    enc = gpt2_encoding()
    assert enc.name == "gpt2" and enc.n_vocab == 50257 and enc.eot_token == GPT2_EOT
    assert enc.encode("Hello world") == [15496, 995]
    assert gpt2_encoding() is enc  # cached


def test_damaged_rank_file_fails_its_hash(tmp_path, monkeypatch):
    bad = tmp_path / "gpt2.tiktoken"
    data = open(tokenization.GPT2_RANKS_PATH, "rb").read()
    bad.write_bytes(data[:-10] + b"AAAAAAAAAA")
    monkeypatch.setattr(tokenization, "GPT2_RANKS_PATH", str(bad))
    tokenization.gpt2_encoding.cache_clear()
    try:
        with pytest.raises(ValueError, match="Hash mismatch"):
            tokenization.gpt2_encoding()
    finally:
        tokenization.gpt2_encoding.cache_clear()


def test_hf_tokenizer_ids_equal_tiktoken_on_1mb(gpt2, shakespeare):
    enc = gpt2_encoding()
    texts = [varied_text(1500, seed) for seed in range(100)] + [shakespeare[i : i + 20_000] for i in range(0, 400_000, 20_000)]
    assert sum(len(t.encode()) for t in texts) >= 1_000_000
    ours = gpt2(texts)["input_ids"]
    for text, ids in zip(texts, ours):
        assert ids == enc.encode(text, allowed_special="all")
        assert gpt2.decode(ids) == text


def test_endoftext_handling(gpt2):
    text = "a<|endoftext|>b"
    # data preparation (encode_ordinary): the literal text is ordinary text, never the EOT id
    assert GPT2_EOT not in gpt2_encoding().encode_ordinary(text)
    # the transformers tokenizer: the literal text is the EOT token, like HF's gpt2 and tiktoken allowed_special="all"
    assert gpt2(text)["input_ids"] == gpt2_encoding().encode(text, allowed_special="all")
    assert GPT2_EOT in gpt2(text)["input_ids"]
    assert gpt2.eos_token_id == gpt2.bos_token_id == gpt2.unk_token_id == GPT2_EOT
    assert len(gpt2) == 50257 and gpt2.model_max_length == 1024
    assert gpt2("Hello world")["input_ids"] == [15496, 995]  # no BOS added


def test_char_tokenizer_matches_nanogpt_and_round_trips(shakespeare):
    tok = char_tokenizer(shakespeare)
    chars = sorted(set(shakespeare))
    assert len(tok) == len(chars) == tok.vocab_size
    assert tok.eos_token is None and tok.pad_token is None and tok.all_special_ids == []
    sample = shakespeare[:200_000]
    ids = tok(sample)["input_ids"]
    assert ids == [chars.index(c) for c in sample]  # nanoGPT's stoi: index in sorted(set(text))
    assert tok.decode(ids) == sample
    for tricky in ["  two  spaces ,\n\n\nnew lines .", " ", "\n", "a\n \n b", "'quoted' ; colon :"]:
        assert tok.decode(tok(tricky)["input_ids"]) == tricky


def test_char_tokenizer_unknown_chars_are_dropped_and_checkable():
    tok = char_tokenizer("abc \n")
    assert tok("a\tb€c")["input_ids"] == tok("abc")["input_ids"]  # dropped, no new id
    assert max(tok("xyz a")["input_ids"]) < len(tok)
    check_known_chars(tok, "ab c\n")
    with pytest.raises(UserError, match=r"'€'.*U\+20AC"):
        check_known_chars(tok, "ab€c")


def test_char_tokenizer_special_characters_in_vocab():
    text = "]^\\-[a.*+?(){}|$"  # characters that mean something inside a regex class
    tok = char_tokenizer(text)
    assert tok.decode(tok(text)["input_ids"]) == text
    assert tok("xyz")["input_ids"] == []


def test_char_tokenizer_from_nanogpt_stoi():
    stoi = {"\n": 0, " ": 1, "a": 2, "b": 3}  # as in a nanoGPT meta.pkl
    tok = char_tokenizer_from_stoi(stoi)
    assert tok("ab a\n")["input_ids"] == [2, 3, 1, 2, 0]
    for bad in ({"a": 0, "b": 2}, {"ab": 0}, {}):
        with pytest.raises(UserError):
            char_tokenizer_from_stoi(bad)


def test_save_and_load_with_autotokenizer_without_our_code(tmp_path, gpt2, shakespeare):
    char = char_tokenizer(shakespeare)
    gpt2.save_pretrained(tmp_path / "gpt2")
    char.save_pretrained(tmp_path / "char")
    text = "ROMEO:\nBut soft, what light  through yonder window breaks?\n"
    script = (
        "import json, sys\nfrom transformers import AutoTokenizer\n"
        f"g = AutoTokenizer.from_pretrained({str(tmp_path / 'gpt2')!r}); c = AutoTokenizer.from_pretrained({str(tmp_path / 'char')!r})\n"
        f"t = {text!r} + '<|endoftext|>'\n"
        "print(json.dumps([g(t)['input_ids'], g.decode(g(t)['input_ids']), c(t)['input_ids'], c.decode(c(t)['input_ids']), len(c)]))\n"
        "assert 'nanogpt_hf' not in sys.modules\n"
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    res = warm_run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
    assert res.returncode == 0, res.stderr
    g_ids, g_text, c_ids, c_text, c_len = json.loads(res.stdout.strip().splitlines()[-1])
    t = text + "<|endoftext|>"
    assert g_ids == gpt2_encoding().encode(t, allowed_special="all") and g_text == t
    assert c_ids == char(t)["input_ids"] and c_text == text + "endoftext"  # '<' and '|' are not in the corpus
    assert c_len == len(char)
    # and in process: the kind survives the round trip
    assert tokenizer_kind(load_tokenizer(str(tmp_path / "gpt2"))) == "gpt2"
    assert tokenizer_kind(load_tokenizer(str(tmp_path / "char"))) == "char"


def test_load_tokenizer_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    for folder in (tmp_path / "missing", tmp_path / "empty"):
        with pytest.raises(UserError, match="no tokenizer"):
            load_tokenizer(str(folder))
