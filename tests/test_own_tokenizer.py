"""A tokenizer trained on your corpus (prepare.py --tokenizer=bpe) and reused for another (--tokenizer=DIR)."""

import json
import lzma
import os
import random
import sys

import datasets
import pytest
from accelerate.state import AcceleratorState
from transformers import AutoTokenizer

from warm import warm_run
from nanogpt_hf import NanoGPTForCausalLM
from nanogpt_hf.common import UserError
from nanogpt_hf.data import PrepareSettings, open_dataset, prepare
from nanogpt_hf.tokenization import CHAT_TOKENS, same_vocabulary, train_bpe
from nanogpt_hf.training import train
from harness_tasks import write_tasks
from test_training import metrics, tiny

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ODD_TEXTS = ["héllo wörld 🤗🦜 👨‍👩‍👧 世界你好 こんにちは 안녕 مرحبا",
             "\x00\x01\x07\x1b[31m\x7f\r\n\t\x0b\x0c", "  leading and trailing  \n\n\n",
             "<|endoftext|><|bos|> literal specials", "\ufeff\u200b\u00ad\U0010ffff"]


pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    """Two .jsonl corpora of Shakespeare's documents (A: the first 24 KB of 40 of them, B: others, with odd text)."""
    root = tmp_path_factory.mktemp("corpora")
    with lzma.open(os.path.join(ROOT, "nanogpt_hf", "assets", "shakespeare.jsonl.xz"), "rt") as fh:
        docs = [json.loads(line)["text"][:24_000] for line in fh]
    (root / "a.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in docs[:40]))
    (root / "b.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in docs[40:] + ODD_TEXTS))
    return root


@pytest.fixture(scope="module")
def bpe_data(corpora):
    return prepare(PrepareSettings(source=str(corpora / "a.jsonl"), tokenizer="bpe", vocab_size=400,
                                   out=str(corpora / "a_bpe")))


def random_utf8(rng: random.Random, n: int) -> str:  # any code point but the surrogates (not encodable as UTF-8)
    return "".join(chr(rng.choice([rng.randrange(0x20, 0x7f), rng.randrange(0, 0xd800),
                                   rng.randrange(0xe000, 0x110000)])) for _ in range(n))


@pytest.mark.parametrize("split_pattern", ["gpt4", "gpt2"])
def test_a_trained_tokenizer_round_trips_any_utf8(corpora, split_pattern):
    rng = random.Random(0)
    tok = train_bpe(iter([open(corpora / "a.jsonl").read()[:100_000]]), 512, split_pattern)
    assert len(tok) == 512 and tok.eos_token == "<|endoftext|>" and tok.convert_tokens_to_ids(list(CHAT_TOKENS)) == [
        *range(1, 10)]  # the chat tokens are reserved now: a model trained today is finetuned without resizing
    for text in ODD_TEXTS + [random_utf8(rng, 200) for _ in range(20)]:
        ids = tok(text)["input_ids"]
        assert tok.decode(ids) == text, repr(text)
    assert len(tok("the king and the queen")["input_ids"]) < len("the king and the queen") / 2  # it learnt merges
    digits = tok.convert_ids_to_tokens(tok(" 12345678")["input_ids"])
    assert max(map(len, digits)) <= (2 if split_pattern == "gpt4" else 9)  # gpt4: numbers split in 1-2 digits


def test_a_prepared_tokenizer_loads_in_a_fresh_process_without_our_package(bpe_data, corpora):
    meta = open_dataset(bpe_data).meta
    assert (meta["tokenizer"], meta["vocab_size"], meta["eot_token"]) == ("bpe", 400, 0)
    code = ("import sys, json; from transformers import AutoTokenizer; t = AutoTokenizer.from_pretrained(sys.argv[1]); "
            "texts = json.loads(sys.argv[2]); "
            "print(json.dumps([t.eos_token, t.eos_token_id, [t.decode(t(x)['input_ids']) for x in texts], "
            "'nanogpt_hf' in sys.modules]))")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = warm_run([sys.executable, "-c", code, bpe_data, json.dumps(ODD_TEXTS)], env=env, cwd=corpora,
                   capture_output=True, text=True, timeout=120, check=True).stdout
    assert json.loads(out) == ["<|endoftext|>", 0, ODD_TEXTS, False]


def test_tokenizer_dir_encodes_another_corpus_as_the_tokenizer_does(bpe_data, corpora):
    out = prepare(PrepareSettings(source=str(corpora / "b.jsonl"), tokenizer=bpe_data, out=str(corpora / "b")))
    tok, data = AutoTokenizer.from_pretrained(bpe_data), open_dataset(out)
    assert same_vocabulary(tok, data.tokenizer()) and data.meta["eot_token"] == tok.eos_token_id == 0
    docs = [json.loads(line)["text"] for line in open(corpora / "b.jsonl")]
    expected = [i for d in docs for i in tok(d, split_special_tokens=True)["input_ids"] + [0]]  # a literal
    got = [i for split in ("train", "val") for row in datasets.load_from_disk(os.path.join(out, split))["ids"]
           for i in row]  # "<|endoftext|>" in a document is text, as GPT-2's encode_ordinary; the tail split: in order
    assert got == expected and got.count(0) == len(docs)
    with pytest.raises(UserError, match="not gpt2, char or bpe"):
        prepare(PrepareSettings(source=str(corpora / "b.jsonl"), tokenizer=str(corpora / "nothing/here/x")))


def test_a_stream_trains_the_tokenizer_on_its_first_tokenizer_sample_characters(tmp_path):
    words = lambda w: "".join(json.dumps({"text": f"{w} " * 50}) + "\n" for _ in range(20))  # noqa: E731
    (tmp_path / "c.jsonl").write_text(words("early") + words("late"))  # 5000 characters of each
    out = prepare(PrepareSettings(source=str(tmp_path / "c.jsonl"), tokenizer="bpe", vocab_size=300, streaming=True,
                                  tokenizer_sample=4000, val_fraction=0.1))
    merged = {t for t in open_dataset(out).tokenizer().get_vocab() if len(t) > 1 and not t.startswith("<|")}
    assert "Ġearly" in merged and all(set(t) <= set("Ġearly") for t in merged)  # none of "late": after the sample
    assert out.endswith("c_bpe")
    # one split, held out from as the split will: the tail's text (val) and the random split's val documents unseen
    (tmp_path / "d.jsonl").write_text(words("early") * 9 + words("late"))  # "late": the last 10% of the text
    for rule, seen in (("tail", {"early"}), ("random", {"early", "late"})):
        out = prepare(PrepareSettings(source=str(tmp_path / "d.jsonl"), tokenizer="bpe", vocab_size=300,
                                      val_split=rule, val_fraction=0.1, out=str(tmp_path / rule)))
        merged = {t for t in open_dataset(out).tokenizer().get_vocab() if len(t) > 2 and not t.startswith("<|")}
        assert {w for w in ("early", "late") if f"Ġ{w}" in merged} == seen, (rule, merged)


def test_training_on_a_trained_tokenizer_samples_and_finetunes_only_on_its_vocabulary(
        bpe_data, corpora, tmp_path, capsys):
    hellaswag = next(f for f in write_tasks(tmp_path) if "hellaswag" in os.path.basename(f))  # the harness's task
    s = tiny(bpe_data, tmp_path / "base", max_iters=4, eval_interval=2, eval_tasks=hellaswag, sample_at_end=True)
    assert train(s) == 0
    model = NanoGPTForCausalLM.from_pretrained(tmp_path / "base")
    assert model.config.vocab_size == 448 and model.config.eos_token_id == 0  # 400 padded to a multiple of 64
    assert "sample from" in capsys.readouterr().out and "core" in metrics(tmp_path / "base", "eval")[-1]
    from nanogpt_hf.cli import sample_main

    assert sample_main([f"--init_from={tmp_path / 'base'}", "--max_new_tokens=5", "--num_samples=1",
                        "--stop_at_eot", "--start=ROMEO:"]) == 0
    assert capsys.readouterr().out.startswith("ROMEO:")
    # corpus B encoded with the model's own tokenizer: finetuning accepts it
    reused = prepare(PrepareSettings(source=str(corpora / "b.jsonl"), tokenizer=str(tmp_path / "base"),
                                     out=str(tmp_path / "b")))
    AcceleratorState._reset_state(reset_partial_state=True)
    assert train(tiny(reused, tmp_path / "ft", init_from=str(tmp_path / "base"), max_iters=1, eval_interval=1)) == 0
    # another vocabulary, of the same kind or another, is refused in one line naming the fix
    other = prepare(PrepareSettings(source=str(corpora / "b.jsonl"), tokenizer="bpe", vocab_size=400,
                                    out=str(tmp_path / "other")))
    gpt2 = prepare(PrepareSettings(source=str(corpora / "b.jsonl"), out=str(tmp_path / "gpt2")))
    for data, problem in ((other, "have different bpe vocabularies"), (gpt2, "uses the bpe tokenizer but dataset")):
        AcceleratorState._reset_state(reset_partial_state=True)
        with pytest.raises(UserError, match=f"{problem}.*: prepare the dataset with --tokenizer={tmp_path / 'base'}"):
            train(tiny(data, tmp_path / "ft2", init_from=str(tmp_path / "base")))


def test_a_reused_character_vocabulary_encodes_as_its_own_and_refuses_unknown_characters(char_data, tmp_path):
    (tmp_path / "known.txt").write_text("To be, or not to be: that is the question.\n" * 20)
    out = prepare(PrepareSettings(source=str(tmp_path / "known.txt"), tokenizer=char_data, out=str(tmp_path / "k")))
    tok, data = AutoTokenizer.from_pretrained(char_data), open_dataset(out)
    assert data.tokenizer_kind == "char" and same_vocabulary(tok, data.tokenizer())
    got = [i for split in ("train", "val") for row in datasets.load_from_disk(os.path.join(out, split))["ids"]
           for i in row]
    assert got == tok((tmp_path / "known.txt").read_text())["input_ids"]  # no separator: the text's characters
    (tmp_path / "odd.txt").write_text("the question is 🤗\n" * 20)
    with pytest.raises(UserError, match="'🤗' of the corpus is not in the vocabulary"):
        prepare(PrepareSettings(source=str(tmp_path / "odd.txt"), tokenizer=char_data, out=str(tmp_path / "o")))
