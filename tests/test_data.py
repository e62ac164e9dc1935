"""Data: prepare -> Arrow -> token stream gives tiktoken's ids exactly; windows are pure functions; errors are one line."""

import glob
import json
import os
import sys

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from warm import warm_run
from nanogpt_hf import data
from nanogpt_hf.cli import prepare_main
from nanogpt_hf.data import (
    PrepareSettings,
    TokenStream,
    check_compatible,
    eval_batch,
    open_dataset,
    prepare,
    sample_batch,
    sequential_windows,
)
from nanogpt_hf.common import UserError
from nanogpt_hf.tokenization import GPT2_EOT, gpt2_encoding, load_tokenizer, tokenizer_kind

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TXT_A = "First document.\nIt has two lines, digits 12345 and spaces   here.\n"
TXT_D = "Ünïcödé 日本語 😀\r\nwith a literal <|endoftext|> inside\n\n\nand blank lines"
JSONL = [{"text": "json one: {'a': 1}", "id": 1}, {"text": "json two\twith tab", "id": 2}]
PARQUET = ["parquet first  doc", "parquet second doc\n\n"]


def expected_documents() -> list[str]:
    # sorted file order: a.txt, b.jsonl, c.parquet, sub/d.txt; .txt read with universal newlines
    return [TXT_A] + [r["text"] for r in JSONL] + PARQUET + [TXT_D.replace("\r\n", "\n")]


def write_corpus(folder) -> str:
    os.makedirs(folder / "sub", exist_ok=True)
    (folder / "a.txt").write_text(TXT_A, encoding="utf-8")
    (folder / "b.jsonl").write_text("".join(json.dumps(r) + "\n" for r in JSONL), encoding="utf-8")
    pq.write_table(pa.table({"text": PARQUET, "n": [1, 2]}), folder / "c.parquet")
    (folder / "sub" / "d.txt").write_bytes(TXT_D.encode("utf-8"))
    (folder / "notes.md").write_text("ignored: not a corpus format")
    return str(folder)


def stream_tokens(path: str, split: str) -> list[int]:
    s = TokenStream(path, split)
    return s.window(0, len(s)).tolist()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def prepared(corpus, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("prep") / "small")
    return prepare(PrepareSettings(source=corpus, tokenizer="gpt2", out=out))


@pytest.fixture(scope="module")
def many_docs(tmp_path_factory):
    """2,500 short documents: several Arrow record batches (chunks) per split."""
    folder = tmp_path_factory.mktemp("many")
    rows = [{"text": f"doc {i}: " + "word " * (i % 7)} for i in range(2500)]
    (folder / "docs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = prepare(PrepareSettings(source=str(folder / "docs.jsonl"), tokenizer="gpt2", out=str(folder / "prep")))
    return out, [r["text"] for r in rows]


def run_cli(capsys, *argv):
    code = prepare_main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# --- prepare -> loader gives exactly tiktoken's ids ----------------------------------------------------------------


def test_prepare_gives_tiktoken_ids_of_each_document_then_eot(prepared):
    enc = gpt2_encoding()
    expected = []
    for doc in expected_documents():
        expected += enc.encode_ordinary(doc) + [GPT2_EOT]
    assert stream_tokens(prepared, "train") + stream_tokens(prepared, "val") == expected
    ds = open_dataset(prepared)
    meta = ds.meta
    assert ds.tokenizer_kind == "gpt2" and ds.vocab_size == 50257
    assert meta["splits"]["train"]["tokens"] + meta["splits"]["val"]["tokens"] == len(expected)
    assert meta["splits"]["val"]["tokens"] == len(expected) - int(len(expected) * 0.9)  # small corpus: the 10% tail
    assert meta["vocab_size"] == 50257 and meta["tokenizer"] == "gpt2"


def test_ids_are_uint16_on_disk(prepared):
    assert open_dataset(prepared).meta["dtype"] == "uint16"
    for arrow_file in glob.glob(os.path.join(prepared, "*", "*.arrow")):
        with pa.memory_map(arrow_file) as source:
            schema = pa.ipc.open_stream(source).schema
        assert schema.field("ids").type == pa.large_list(pa.uint16())  # int64 offsets
    assert TokenStream(prepared, "train").chunks[0].dtype == np.uint16


def test_id_rows_have_int64_offsets_and_read_back():
    import datasets

    # large_list: int64 offsets (a map batch may hold over 2**31 tokens, where int32 offsets wrapped without an error)
    table = data.list_table([2, 0, 3], np.arange(5, dtype=np.uint16))
    assert table.schema.field("ids").type == pa.large_list(pa.uint16())
    ds = datasets.Dataset(table.cast(data.ids_features("uint16").arrow_schema))
    assert ds["ids"] == [[0, 1], [], [2, 3, 4]]
    assert data.row_lengths(ds).tolist() == [2, 0, 3]


def test_tail_split_reads_no_python_lists(tmp_path, monkeypatch):
    """The document holding the cut (a one-file corpus: all of it) is sliced in Arrow, not turned into a list."""
    import datasets

    (tmp_path / "one.txt").write_text(TXT_A * 50)
    monkeypatch.setattr(datasets.Dataset, "__getitem__", lambda *a: pytest.fail("a row read as Python objects"))
    out = prepare(PrepareSettings(source=str(tmp_path / "one.txt"), out=str(tmp_path / "o")))
    monkeypatch.undo()
    expected = gpt2_encoding().encode_ordinary(TXT_A * 50) + [GPT2_EOT]
    assert stream_tokens(out, "train") + stream_tokens(out, "val") == expected
    assert len(stream_tokens(out, "val")) == len(expected) - int(len(expected) * 0.9)


@pytest.mark.parametrize("total, val", [(25, 3), (1_115_394, 111_540), (2, 1)])  # tiny Shakespeare: nanoGPT's counts
def test_tail_split_cuts_where_nanogpt_does(total, val):
    table = pa.table({"ids": pa.array([np.arange(total) % 65], pa.list_(pa.uint16()))})
    train, held_out = data.tail_split(datasets.Dataset(table), 0.1)  # nanoGPT: data[:int(n * 0.9)], the rest val
    assert data.row_lengths(held_out).sum() == val and data.row_lengths(train).sum() == total - val


def test_streaming_refuses_the_tail_split(tmp_path, capsys):
    (tmp_path / "a.txt").write_text(TXT_A)
    code, _, err = run_cli(capsys, str(tmp_path / "a.txt"), f"--out={tmp_path}/o", "--streaming", "--val_split=tail")
    assert code == 2 and err.strip().splitlines()[-1].startswith("error: --streaming splits documents at random"), err
    assert not (tmp_path / "o").exists()


def test_tokenizer_saved_beside_the_data(prepared):
    tok = load_tokenizer(prepared)
    assert tokenizer_kind(tok) == "gpt2" and len(tok) == 50257


def test_stream_is_zero_copy_and_crosses_chunks(many_docs):
    out, docs = many_docs
    enc = gpt2_encoding()
    expected = np.array([t for d in docs for t in enc.encode_ordinary(d) + [GPT2_EOT]])
    train, val = TokenStream(out, "train"), TokenStream(out, "val")
    assert len(train.chunks) > 1  # several record batches
    full = np.concatenate([train.window(0, len(train)), val.window(0, len(val))])
    np.testing.assert_array_equal(full, expected)
    # a window inside a chunk is a view of the memory-mapped file, not a copy
    inner = train.window(1, 5)
    assert np.shares_memory(inner, train.chunks[0])
    boundary = int(train.offsets[1])
    np.testing.assert_array_equal(train.window(boundary - 3, 7), expected[boundary - 3 : boundary + 4])


def test_random_split_is_nanogpts(many_docs, tmp_path):
    import datasets

    _, docs = many_docs
    src = tmp_path / "docs.jsonl"
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    out = prepare(PrepareSettings(source=str(src), out=str(tmp_path / "r"), val_split="random", val_fraction=0.01))
    parts = datasets.Dataset.from_dict({"text": docs}).train_test_split(test_size=0.01, seed=2357, shuffle=True)
    enc = gpt2_encoding()
    for split, name in (("train", "train"), ("val", "test")):
        expected = [t for d in parts[name]["text"] for t in enc.encode_ordinary(d) + [GPT2_EOT]]
        assert stream_tokens(out, split) == expected
    assert open_dataset(out).meta["splits"]["val"]["documents"] == 25


def test_char_prepare_round_trips_the_corpus(corpus, tmp_path):
    out = prepare(PrepareSettings(source=corpus, tokenizer="char", out=str(tmp_path / "c")))
    text = "".join(expected_documents())
    tok = load_tokenizer(out)
    assert tokenizer_kind(tok) == "char" and len(tok) == len(set(text))
    ids = stream_tokens(out, "train") + stream_tokens(out, "val")
    assert ids == [sorted(set(text)).index(c) for c in text]
    assert tok.decode(ids) == text
    ds = open_dataset(out)
    assert ds.tokenizer_kind == "char" and ds.vocab_size == len(set(text))


def test_txt_paragraph_documents(tmp_path):
    (tmp_path / "p.txt").write_text("one\ntwo\n\n\nthree\n\n\n\nfour\n")  # breaks around a paragraph are dropped
    out = prepare(PrepareSettings(source=str(tmp_path / "p.txt"), out=str(tmp_path / "o"), txt_documents="paragraph"))
    meta = open_dataset(out).meta
    assert meta["splits"]["train"]["documents"] + meta["splits"]["val"]["documents"] - 1 == 3  # one doc is cut by the tail
    enc = gpt2_encoding()
    expected = [t for d in ["one\ntwo", "three", "four"] for t in enc.encode_ordinary(d) + [GPT2_EOT]]
    assert stream_tokens(out, "train") + stream_tokens(out, "val") == expected


def test_char_paragraph_documents_keep_the_text_as_is(tmp_path):
    texts = ["A.\nB.\n\nC.\n\n\nD.\n", "\n\nE.\n\n\n\nF.\r\n\r\nG."]  # nanoGPT's char prep keeps every break
    for i, text in enumerate(texts):
        (tmp_path / f"{i}.txt").write_bytes(text.encode())
    text = "".join(texts).replace("\r\n", "\n")
    for streaming in (False, True):
        out = prepare(PrepareSettings(source=str(tmp_path / "*.txt"), out=str(tmp_path / f"o{streaming}"),
                                      tokenizer="char", txt_documents="paragraph", streaming=streaming))
        ids = stream_tokens(out, "train") + stream_tokens(out, "val")
        assert streaming or load_tokenizer(out).decode(ids) == text  # a stream's random split reorders documents
        assert sorted(ids) == sorted(sorted(set(text)).index(c) for c in text)
        assert open_dataset(out).meta["splits"]["train"]["documents"] > 1


def test_streaming_local_files(many_docs, tmp_path):
    _, docs = many_docs
    src = tmp_path / "docs.jsonl"
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    out = prepare(PrepareSettings(source=str(src), out=str(tmp_path / "s"), streaming=True, val_fraction=0.02))
    meta = open_dataset(out).meta
    assert meta["splits"]["train"]["documents"] + meta["splits"]["val"]["documents"] == len(docs)
    assert 10 < meta["splits"]["val"]["documents"] < 100
    enc = gpt2_encoding()
    assert len(stream_tokens(out, "train")) + len(stream_tokens(out, "val")) == sum(len(enc.encode_ordinary(d)) + 1 for d in docs)


@pytest.mark.parametrize("txt_documents", ["file", "paragraph"])
def test_streaming_read_errors_are_one_line(tmp_path, capsys, txt_documents):
    (tmp_path / "latin1.txt").write_bytes("café\n\nnaïve\n".encode("latin-1"))
    code, _, err = run_cli(capsys, str(tmp_path / "latin1.txt"), f"--out={tmp_path}/o", "--streaming=true",
                           f"--txt_documents={txt_documents}")
    assert code == 2 and "Traceback" not in err, err
    assert err.splitlines()[-1] == (f"error: {tmp_path / 'latin1.txt'}, line 1: 'utf-8' codec can't decode byte 0xe9 in "
                                    "position 3: invalid continuation byte; save it as UTF-8"), err
    assert sorted(os.listdir(tmp_path)) == ["latin1.txt"]


MALFORMED = {  # file -> (its bytes, the error line that names it); every reader's, and a folder's bad file
    "broken.jsonl": (b'{"text": "ok"}\n{not json\n', "broken.jsonl, line 2: Expecting property name enclosed in "
                     "double quotes (column 2); fix or remove that line"),
    "cut.jsonl": (b'{"text": "a line"}\n' * 85 + b'{"text": "cut he', "cut.jsonl, line 86: Unterminated string "
                  "starting at (column 10); fix or remove that line"),  # pyarrow says 'in row 0' or 'row 85'
    "list.json": (b'[\n {"text": "a"},\n {"text": \n]\n', "list.json, line 4: Expecting value (column 1)"),
    "not_object.jsonl": (b'{"text": "a"}\n["text"]\n', "not_object.jsonl, line 2: not a JSON object"),
    "latin1.txt": ("ok\ncafé\n".encode("latin-1"), "latin1.txt, line 2: 'utf-8' codec can't decode byte 0xe9 in "
                   "position 3: invalid continuation byte; save it as UTF-8"),
    "bad.parquet": (b"PAR1 not parquet", "bad.parquet: Parquet magic bytes not found in footer. Either the file is "
                    "corrupted or this is not a parquet file; fix or remove that file"),
    "folder/b.jsonl": (b'{"text": "ok"}\n{"text": "no comma" "x": 1}\n', "folder/b.jsonl, line 2: Expecting ',' "
                       "delimiter (column 21); fix or remove that line"),
}


@pytest.mark.parametrize("streaming", [False, True])
@pytest.mark.parametrize("name", MALFORMED)
def test_a_malformed_file_is_named_with_its_line(name, streaming, tmp_path, capsys):
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "a.jsonl").write_text('{"text": "a good file first"}\n')
    (tmp_path / name).write_bytes(MALFORMED[name][0])
    source = tmp_path / ("folder" if name.startswith("folder/") else name)
    code, _, err = run_cli(capsys, str(source), f"--out={tmp_path}/o", f"--streaming={streaming}")
    assert code == 2 and err.splitlines()[-1].startswith(f"error: {tmp_path / MALFORMED[name][1]}"), err
    assert "Traceback" not in err and "Failed to" not in err, err  # datasets' log of the file (a row from 0): gone


def test_a_missing_text_column_names_the_columns_and_the_fix(tmp_path, capsys):
    datasets.Dataset.from_dict({"content": ["a text"] * 3, "id": [1, 2, 3]}).save_to_disk(str(tmp_path / "saved"))
    code, _, err = run_cli(capsys, str(tmp_path / "saved"), f"--out={tmp_path}/o")
    assert code == 2 and err.splitlines()[-1] == (f"error: column 'text' not in {tmp_path / 'saved'} (its columns: "
                                                  "content, id); pass --text_column=content"), err


def test_streaming_refuses_an_empty_train_split(tmp_path, capsys):
    (tmp_path / "one.jsonl").write_text(json.dumps({"text": "a single document"}) + "\n")
    code, out, err = run_cli(capsys, str(tmp_path / "one.jsonl"), f"--out={tmp_path}/o", "--streaming=true")
    assert code == 2 and "prepared" not in out
    last = err.splitlines()[-1]
    assert last.startswith("error: ") and "1 document" in last and "without --streaming" in last, err


# --- windows ---------------------------------------------------------------------------------------------------------


def test_sample_batch_is_a_pure_function(many_docs):
    out, _ = many_docs
    train, val = TokenStream(out, "train"), TokenStream(out, "val")
    kw = dict(batch_size=4, block_size=16)
    x, y = sample_batch(train, seed=1, step=5, index=3, **kw)
    assert x.shape == y.shape == (4, 16) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])  # y is x shifted by one
    x2, y2 = sample_batch(TokenStream(out, "train"), seed=1, step=5, index=3, **kw)  # a fresh process would agree
    assert torch.equal(x, x2) and torch.equal(y, y2)
    others = [sample_batch(train, seed=1, step=5, index=4, **kw), sample_batch(train, seed=1, step=6, index=3, **kw),
              sample_batch(train, seed=2, step=5, index=3, **kw)]
    assert all(not torch.equal(x, o[0]) for o in others)
    # each row is a real window of the stream
    full = torch.from_numpy(train.window(0, len(train)).astype(np.int64))
    for row in x:
        starts = [i for i in range(len(full) - 16) if torch.equal(full[i : i + 16], row)]
        assert starts
    # train and val draw different windows from the same seed (positions differ even if the data were equal)
    rng_t = np.random.default_rng([1, train.salt, 0, 5, 3]).integers(0, 10**6, 4)
    rng_v = np.random.default_rng([1, val.salt, 0, 5, 3]).integers(0, 10**6, 4)
    assert not np.array_equal(rng_t, rng_v)


def test_accumulation_equals_data_parallel_batches(many_docs):
    """One process with G micro-batches sees the batches of W ranks with G/W each (index = j * W + r)."""
    out, _ = many_docs
    s = TokenStream(out, "train")
    G, W = 4, 2
    single = [sample_batch(s, seed=0, step=7, index=i, batch_size=2, block_size=8)[0] for i in range(G)]
    ranks = {(j * W + r): sample_batch(s, seed=0, step=7, index=j * W + r, batch_size=2, block_size=8)[0]
             for r in range(W) for j in range(G // W)}
    assert all(torch.equal(single[i], ranks[i]) for i in range(G))


def test_eval_batches_repeat_and_sequential_windows_cover(many_docs):
    out, _ = many_docs
    val = TokenStream(out, "val")
    a = eval_batch(val, seed=0, k=2, batch_size=3, block_size=8)
    b = eval_batch(val, seed=0, k=2, batch_size=3, block_size=8)
    c = eval_batch(val, seed=0, k=3, batch_size=3, block_size=8)
    assert torch.equal(a[0], b[0]) and not torch.equal(a[0], c[0])
    T = 8
    xs, ys = zip(*sequential_windows(val, block_size=T, batch_size=5))
    x, y = torch.cat(xs), torch.cat(ys)
    n = (len(val) - 1) // T
    assert x.shape == (n, T)
    full = torch.from_numpy(val.window(0, len(val)).astype(np.int64))
    assert torch.equal(y.flatten(), full[1 : n * T + 1])  # every target once, in order


# --- re-running and atomicity -----------------------------------------------------------------------------------------


def test_rerun_is_instant_and_says_so(corpus, tmp_path, capsys):
    out = str(tmp_path / "o")
    assert run_cli(capsys, corpus, f"--out={out}")[0] == 0
    mtime = os.path.getmtime(os.path.join(out, "meta.json"))
    code, stdout, _ = run_cli(capsys, corpus, f"--out={out}")
    assert code == 0 and "up to date" in stdout
    assert os.path.getmtime(os.path.join(out, "meta.json")) == mtime
    # changed input -> prepared again
    os.makedirs(tmp_path / "c2")
    write_corpus(tmp_path / "c2")
    (tmp_path / "c2" / "a.txt").write_text(TXT_A + "more\n")
    code, stdout, _ = run_cli(capsys, str(tmp_path / "c2"), f"--out={out}")
    assert code == 0 and "up to date" not in stdout and "prepared" in stdout


def test_failed_run_leaves_previous_folder_intact(prepared, corpus, monkeypatch, tmp_path):
    import shutil

    out = str(tmp_path / "copy")
    shutil.copytree(prepared, out)
    before = open(os.path.join(out, "meta.json")).read()

    def boom(*args, **kwargs):
        raise KeyboardInterrupt  # as if the user pressed ctrl-C after the data was written

    monkeypatch.setattr(data, "remove", boom)
    with pytest.raises(KeyboardInterrupt):
        prepare(PrepareSettings(source=corpus, out=out, force=True))
    with pytest.raises(KeyboardInterrupt):
        prepare(PrepareSettings(source=corpus, out=str(tmp_path / "fresh")))
    assert open(os.path.join(out, "meta.json")).read() == before
    assert stream_tokens(out, "train") == stream_tokens(prepared, "train")
    assert not os.path.exists(tmp_path / "fresh")
    assert sorted(os.listdir(tmp_path)) == ["copy"]  # no temporary folder left behind


def test_stale_temporary_folders_are_removed(corpus, tmp_path):
    stale = tmp_path / f".o.tmp-{2**22 + 1}"  # above Linux's pid_max: that process cannot exist
    stale.mkdir()
    (stale / "junk").write_text("x")
    prepare(PrepareSettings(source=corpus, out=str(tmp_path / "o")))
    assert not stale.exists()
    assert sorted(os.listdir(tmp_path)) == ["o"]


def test_an_input_inside_the_output_folder_is_refused_and_kept(corpus, tmp_path, capsys):
    # the new dataset replaces the output folder: a corpus file or folder inside it was deleted with the old one
    out = tmp_path / "mine"
    prepare(PrepareSettings(source=corpus, out=str(out)))
    (out / "notes.txt").write_text("my own notes " * 200)
    (out / "extra").mkdir()
    (out / "extra" / "more.txt").write_text("more notes " * 200)
    for source in (out / "notes.txt", out / "extra"):
        code, _, err = run_cli(capsys, str(source), f"--out={out}")
        assert code == 2 and f"output folder '{out}' holds the input" in err and "Traceback" not in err
    assert run_cli(capsys, str(out / "*.txt"), f"--out={out}")[0] == 2  # a glob skips the output folder: no files
    assert (out / "notes.txt").exists() and (out / "extra" / "more.txt").exists()


def test_output_inside_the_source_folder_is_not_read_back(tmp_path, capsys):
    corp = tmp_path / "corp"
    write_corpus(corp)
    (corp / ".hidden").mkdir()
    (corp / ".hidden" / "x.json").write_text("not a corpus")
    (corp / ".h.txt").write_text("hidden file")
    out = str(corp / "prepared")
    assert run_cli(capsys, str(corp), f"--out={out}")[0] == 0
    code, stdout, err = run_cli(capsys, str(corp), f"--out={out}")
    assert code == 0 and "up to date" in stdout, err
    # with the output elsewhere, the earlier one in the source folder is not read either; nor are hidden files
    other = prepare(PrepareSettings(source=str(corp), out=str(tmp_path / "other")))
    enc = gpt2_encoding()
    expected = [t for doc in expected_documents() for t in enc.encode_ordinary(doc) + [GPT2_EOT]]
    assert stream_tokens(other, "train") + stream_tokens(other, "val") == expected
    with pytest.raises(UserError, match="is a prepared dataset, not a corpus"):
        prepare(PrepareSettings(source=out, out=str(tmp_path / "again")))
    # a recursive glob over the source folder skips the prepared datasets (their .json files) too
    globbed = prepare(PrepareSettings(source=str(corp / "**" / "*.json*"), out=str(tmp_path / "globbed")))
    alone = prepare(PrepareSettings(source=str(corp / "b.jsonl"), out=str(tmp_path / "alone")))
    assert [stream_tokens(globbed, split) for split in ("train", "val")] == [
        stream_tokens(alone, split) for split in ("train", "val")]


def test_dot_source_gets_the_folders_name(tmp_path, monkeypatch):
    corp = tmp_path / "corp"
    write_corpus(corp)
    monkeypatch.chdir(corp)
    assert data.default_out(PrepareSettings(source=".", tokenizer="char")) == os.path.join("data", "corp_char")
    out = prepare(PrepareSettings(source=".", tokenizer="char"))
    assert out == os.path.join("data", "corp_char")
    text = "".join(expected_documents())
    assert load_tokenizer(out).decode(stream_tokens(out, "train") + stream_tokens(out, "val")) == text
    # the default output lies inside the source folder: a rerun is up to date, not a failure
    assert prepare(PrepareSettings(source=".", tokenizer="char")) == out


def test_symlinked_out_stays_a_link(corpus, tmp_path):
    (tmp_path / "disk").mkdir()
    os.symlink(tmp_path / "disk", tmp_path / "link")
    for force in (False, True):  # into the empty target, then over the prepared one
        prepare(PrepareSettings(source=corpus, out=str(tmp_path / "link"), force=force))
        assert os.path.islink(tmp_path / "link") and (tmp_path / "disk" / "meta.json").is_file()
    assert sorted(os.listdir(tmp_path)) == ["disk", "link"]
    assert stream_tokens(str(tmp_path / "link"), "train")


# --- bad input: one clear line, exit 2, nothing damaged ----------------------------------------------------------------


@pytest.mark.parametrize(
    "args, message",
    [
        (["{tmp}/missing.txt"], "does not exist"),
        (["{tmp}/missing_dir/"], "does not exist"),
        (["missing_dir/"], "does not exist"),  # a trailing slash: a local path, not a Hub id
        (["{tmp}/columns"], "column 'text' not in {tmp}/columns/b.jsonl (its columns: content); pass --text_column=content"),
        (["{tmp}/empty_dir"], "no corpus files"),
        (["{tmp}/empty.txt"], "empty"),
        (["{tmp}/empty.txt", "--tokenizer=char"], "empty"),
        (["{corpus}/b.jsonl", "--text_column=body"], "column 'body' not in {corpus}/b.jsonl (its columns: text, id); pass --text_column=text"),
        (["{corpus}/b.jsonl", "--text_column=body", "--streaming"], "column 'body' not in {corpus}/b.jsonl"),
        (["{corpus}/c.parquet", "--text_column=body"], "column 'body' not in {corpus}/c.parquet (its columns: text, n); pass --text_column=text"),
        (["{corpus}/b.jsonl", "--text_column=id"], "column 'id' holds int64, not text"),
        (["{corpus}/b.jsonl", "--text_column=id", "--streaming"], "column 'id' holds int64, not text"),
        (["{tmp}/bad.jsonl"], "{tmp}/bad.jsonl, line 2: Expecting property name enclosed in double quotes (column 2); fix or remove that line"),
        (["{tmp}/bad.jsonl", "--streaming"], "{tmp}/bad.jsonl, line 2: Expecting property name"),
        (["{tmp}/empty.jsonl"], "{tmp}/empty.jsonl is empty"),
        (["{tmp}/empty.jsonl", "--streaming"], "is empty"),
        (["{tmp}/bad.jsonl", "{tmp}/empty.jsonl"], "quote a glob"),
        (["--val_fraction=1.5"], "val_fraction"),
        (["--tokenizer=./no_such_folder"], "tokenizer"),
        (["--tokenizer=bpe", "--vocab_size=100"], "vocab_size"),
        (["--tokenzier=char"], "did you mean 'tokenizer'"),
        (["nobody/no-such-dataset"], "Hub"),
        (["{corpus}", "--out={tmp}/not_ours"], "not a prepared dataset"),
    ],
)
def test_bad_input_is_one_line_exit_2(args, message, corpus, tmp_path, capsys):
    (tmp_path / "empty_dir").mkdir()
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{not json\n')
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "not_ours").mkdir()
    (tmp_path / "not_ours" / "precious.txt").write_text("keep me")
    (tmp_path / "columns").mkdir()
    (tmp_path / "columns" / "a.jsonl").write_text('{"text": "one"}\n')
    (tmp_path / "columns" / "b.jsonl").write_text('{"content": "two"}\n')
    args = [a.format(tmp=tmp_path, corpus=corpus) for a in args]
    code, _, err = run_cli(capsys, *args, f"--out={tmp_path}/out" if not any(a.startswith("--out") for a in args) else "--force=false")
    assert code == 2
    lines = err.strip().splitlines()
    assert lines[-1].startswith("error: ") and message.format(tmp=tmp_path, corpus=corpus) in lines[-1], err
    assert "Traceback" not in err
    assert not os.path.exists(tmp_path / "out")
    assert (tmp_path / "not_ours" / "precious.txt").read_text() == "keep me"


def test_bad_input_does_not_touch_an_existing_prepared_folder(prepared, tmp_path, capsys):
    before = open(os.path.join(prepared, "meta.json")).read()
    code, _, err = run_cli(capsys, str(tmp_path / "missing.txt"), f"--out={prepared}")
    assert code == 2 and "does not exist" in err
    code, _, err = run_cli(capsys, os.path.join(os.path.dirname(prepared), "..", "nothing", "*.txt"), f"--out={prepared}")
    assert code == 2
    assert open(os.path.join(prepared, "meta.json")).read() == before


def test_cli_subprocess_prints_one_line_without_traceback(tmp_path):
    res = warm_run(
        [sys.executable, os.path.join(ROOT, "prepare.py"), str(tmp_path / "nope.txt")],
        capture_output=True, text=True, cwd=tmp_path, timeout=120,
        env=dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=ROOT),
    )
    assert res.returncode == 2
    assert res.stderr.strip() == f"error: source '{tmp_path / 'nope.txt'}' does not exist"


def test_an_out_below_a_file_is_one_clear_line(tmp_path, capsys):
    (tmp_path / "c.txt").write_text("hello world\n")
    (tmp_path / "afile").write_text("not a folder")
    code, _, err = run_cli(capsys, str(tmp_path / "c.txt"), "--tokenizer=char", f"--out={tmp_path / 'afile' / 'x'}")
    assert code == 2 and err.startswith("error: ") and "afile" in err and "Traceback" not in err, err
    assert (tmp_path / "afile").read_text() == "not a folder"


def test_a_folder_mixing_parquet_and_jsonl_is_one_corpus(tmp_path):
    # pandas writes parquet text as large_string, the json builder reads string: concatenating them failed
    src = tmp_path / "src"
    src.mkdir()
    pq.write_table(pa.table({"text": pa.array(["from parquet one", "from parquet two"], pa.large_string())}),
                   src / "a.parquet")
    (src / "b.jsonl").write_text('{"text": "from json"}\n')
    out = prepare(PrepareSettings(source=str(src), tokenizer="gpt2", out=str(tmp_path / "o"), val_split="tail"))
    enc = gpt2_encoding()
    expected = [t for d in ("from parquet one", "from parquet two", "from json") for t in enc.encode_ordinary(d) + [GPT2_EOT]]
    assert stream_tokens(out, "train") + stream_tokens(out, "val") == expected


def test_open_dataset_and_training_checks(prepared, corpus, tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        open_dataset(str(tmp_path / "nothing"))
    raw = os.path.join(corpus, "b.jsonl")  # a corpus given where a prepared dataset belongs
    with pytest.raises(UserError, match=f"not a prepared dataset .*python prepare.py {raw} --out=data/b, then use data/b"):
        open_dataset(raw)
    (tmp_path / "half").mkdir()
    with pytest.raises(UserError, match="not a prepared dataset"):
        open_dataset(str(tmp_path / "half"))
    (tmp_path / "half" / "meta.json").write_text("{not json")
    with pytest.raises(UserError, match="damaged"):
        open_dataset(str(tmp_path / "half"))
    ds = open_dataset(prepared)
    check_compatible(ds.meta, model_vocab_size=50304, block_size=4)
    with pytest.raises(UserError, match="larger than the model's vocab_size"):
        check_compatible(ds.meta, model_vocab_size=65, block_size=8)
    with pytest.raises(UserError, match="fewer than block_size"):
        check_compatible(ds.meta, model_vocab_size=50304, block_size=1024)
    with pytest.raises(UserError, match="fewer than block_size"):
        sample_batch(ds.stream("val"), seed=0, step=0, index=0, batch_size=1, block_size=10_000)


def test_embedded_corpus_default_out(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = prepare(PrepareSettings(tokenizer="char"))
    assert out == os.path.join("data", "shakespeare_char")
    meta = open_dataset(out).meta
    assert meta["vocab_size"] < 100 and meta["splits"]["train"]["tokens"] > 4_000_000 and meta["hub_id"] is None
    x, y = sample_batch(TokenStream(out, "train"), seed=0, step=0, index=0, batch_size=2, block_size=64)
    assert int(x.max()) < meta["vocab_size"]


def test_a_hub_dataset_is_recorded_as_one(tmp_path, monkeypatch):  # the model card names it (and only it)
    hub = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": [TXT_A] * 3})})
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **kw: hub)
    meta = open_dataset(prepare(PrepareSettings(source="someone/corpus", out=str(tmp_path / "o")))).meta
    assert meta["source"] == meta["hub_id"] == "someone/corpus"


def test_streaming_the_embedded_corpus(tmp_path):
    out = prepare(PrepareSettings(out=str(tmp_path / "s"), streaming=True))  # was sent to the Hub
    meta = open_dataset(out).meta
    assert meta["splits"]["train"]["documents"] + meta["splits"]["val"]["documents"] == 42


def test_the_name_shakespeare_is_the_embedded_corpus_even_beside_a_local_folder(tmp_path, monkeypatch, capsys):
    # train.py prepares its default dataset from this name: a folder of the user's must not change what it means
    (tmp_path / "shakespeare").mkdir()
    (tmp_path / "shakespeare" / "input.txt").write_text(TXT_A)
    monkeypatch.chdir(tmp_path)
    out = prepare(PrepareSettings(source="shakespeare", tokenizer="char"))
    assert open_dataset(out).meta["splits"]["train"]["tokens"] > 4_000_000
    assert "for the local 'shakespeare', pass ./shakespeare" in capsys.readouterr().out


# --- a corpus's own splits: save_to_disk folders, Hub-style folders ---------------------------------------------------


def gpt2_tokens(docs) -> list[int]:
    enc = gpt2_encoding()
    return [t for d in docs for t in enc.encode_ordinary(d) + [GPT2_EOT]]


TRAIN_DOCS, VAL_DOCS, TEST_DOCS = [f"train doc {i} " * 5 for i in range(20)], ["val doc one", "val doc two"], ["test"]


@pytest.mark.parametrize("splits", [("train",), ("train", "validation", "test"), ("train", "test")])
def test_a_saved_dataset_folder_is_read_with_load_from_disk(splits, tmp_path, capsys):
    docs = {"train": TRAIN_DOCS, "validation": VAL_DOCS, "test": TEST_DOCS}
    parts = {k: datasets.Dataset.from_dict({"text": docs[k], "n": list(range(len(docs[k])))}) for k in splits}
    saved = parts["train"] if len(splits) == 1 else datasets.DatasetDict(parts)
    saved.save_to_disk(str(tmp_path / "saved"))
    code, stdout, err = run_cli(capsys, str(tmp_path / "saved"), f"--out={tmp_path / 'out'}")
    assert code == 0, err
    out = str(tmp_path / "out")
    if len(splits) == 1:  # one corpus: the usual tail split
        assert stream_tokens(out, "train") + stream_tokens(out, "val") == gpt2_tokens(TRAIN_DOCS)
    else:  # its own val split: validation, else test
        assert stream_tokens(out, "train") == gpt2_tokens(TRAIN_DOCS)
        assert stream_tokens(out, "val") == gpt2_tokens(docs[splits[1]])
        assert f"val: the corpus's own {splits[1]} split" in stdout
    # a saved dataset below a corpus folder is not read as .json corpus files
    (tmp_path / "corp").mkdir()
    (tmp_path / "corp" / "a.txt").write_text(TXT_A)
    os.rename(tmp_path / "saved", tmp_path / "corp" / "saved")
    out = prepare(PrepareSettings(source=str(tmp_path / "corp"), out=str(tmp_path / "o2")))
    assert stream_tokens(out, "train") + stream_tokens(out, "val") == gpt2_tokens([TXT_A])


def write_split_files(folder, names=("train.jsonl", "validation.jsonl", "test.jsonl")):
    folder.mkdir(exist_ok=True)
    for name, docs in zip(names, (TRAIN_DOCS, VAL_DOCS, TEST_DOCS)):
        os.makedirs(os.path.dirname(folder / name), exist_ok=True)
        (folder / name).write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return folder


@pytest.mark.parametrize("streaming", [False, True])
@pytest.mark.parametrize("tokenizer", ["gpt2", "char"])
def test_a_folder_with_its_own_splits_keeps_them(tokenizer, streaming, tmp_path, capsys):
    src = write_split_files(tmp_path / "src")
    for out in (src / "prep", src / "prep2"):  # the second: the first output (train/, val/ folders) is not read
        code, stdout, err = run_cli(capsys, str(src), f"--out={out}", f"--tokenizer={tokenizer}",
                                    f"--streaming={streaming}")
        assert code == 0 and "val: the corpus's own validation split" in stdout, err
        for split, docs in (("train", TRAIN_DOCS), ("val", VAL_DOCS)):
            ids = stream_tokens(str(out), split)
            text = "".join(docs) if tokenizer == "char" else None
            assert load_tokenizer(str(out)).decode(ids) == text if text else ids == gpt2_tokens(docs)
        meta = open_dataset(str(out)).meta
        assert meta["val_split"]["rule"] == "own" and meta["val_split"]["split"] == "validation"
        assert meta["splits"]["val"]["documents"] == len(VAL_DOCS)
        assert meta["splits"]["train"]["documents"] == len(TRAIN_DOCS)


README_CONFIGS = """---
configs:
- config_name: default
  data_files:
  - split: train
    path: "part_a/*.jsonl"
  - split: validation
    path: "part_b/*.jsonl"
- config_name: swapped
  data_files:
  - split: train
    path: "part_b/*.jsonl"
  - split: test
    path: "part_a/*.jsonl"
---
# my corpus
"""


def test_readme_configs_and_split_settings_are_honoured(tmp_path, capsys):
    src = write_split_files(tmp_path / "src", ("part_a/x.jsonl", "part_b/y.jsonl"))
    (src / "README.md").write_text(README_CONFIGS)
    out = prepare(PrepareSettings(source=str(src), out=str(tmp_path / "o")))  # the default config
    assert (stream_tokens(out, "train"), stream_tokens(out, "val")) == (gpt2_tokens(TRAIN_DOCS), gpt2_tokens(VAL_DOCS))
    out = prepare(PrepareSettings(source=str(src), subset="swapped", out=str(tmp_path / "o")))  # val: its test split
    assert (stream_tokens(out, "train"), stream_tokens(out, "val")) == (gpt2_tokens(VAL_DOCS), gpt2_tokens(TRAIN_DOCS))
    # --split: that split alone, split by the usual rule
    out = prepare(PrepareSettings(source=str(src), split="train", out=str(tmp_path / "o")))
    assert open_dataset(out).meta["val_split"]["rule"] == "tail"
    assert stream_tokens(out, "train") + stream_tokens(out, "val") == gpt2_tokens(TRAIN_DOCS)
    # a folder whose file names name no train split is one corpus, as before
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "a.txt").write_text(TXT_A)
    (tmp_path / "plain" / "test_notes.txt").write_text(TXT_D)
    out = prepare(PrepareSettings(source=str(tmp_path / "plain"), out=str(tmp_path / "o")))
    assert stream_tokens(out, "train") + stream_tokens(out, "val") == gpt2_tokens([TXT_A, TXT_D.replace("\r\n", "\n")])
    # a split or subset the source does not have, or a val setting it would ignore: one line naming what it has
    for args, message in [([str(src), "--split=nope"], "no split 'nope'"), ([str(src), "--subset=nope"], "'nope'"),
                          ([str(tmp_path / "plain"), "--split=validation"], "its splits: train"),
                          ([str(tmp_path / "plain" / "a.txt"), "--subset=x"], "subset"),
                          ([str(src), "--val_fraction=0.2"], "has its own validation split")]:
        code, _, err = run_cli(capsys, *args, f"--out={tmp_path / 'bad'}")
        last = err.strip().splitlines()[-1]
        assert code == 2 and last.startswith("error: ") and message in last and "Traceback" not in err, (args, err)
