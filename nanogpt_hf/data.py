"""Prepare a corpus into Arrow token datasets, and sample nanoGPT training windows from them.

    python prepare.py [SOURCE] --tokenizer=gpt2|char|bpe|DIR --out=DIR
    corpus --load_dataset--> documents --map(num_proc)--> ids per document --train/val split--> DIR/

GPT-2: tiktoken encode_ordinary per document, then EOT 50256 (nanoGPT's openwebtext); char: ids into
sorted(set(corpus)) (shakespeare_char); bpe: a byte-level BPE trained on the corpus, then its ids and <|endoftext|>;
DIR: the tokenizer of a prepared dataset, model folder or Hub id, and its eos token. Conversations (a `messages`
column): the ids of the tokenizer's chat template (ours added where it has none) and the mask of the tokens to learn.
val: the corpus's own validation (else test) split where it has one, else the last 10% of the tokens (shakespeare),
or from 100k documents on 0.0005 of the documents, seed 2357 (openwebtext); conversations are held out whole, at
random (a tenth of them below 100k)."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import glob
import hashlib
import itertools
import json
import logging
import lzma
import math
import os
import re
import sys
import time
import zlib
from typing import Iterator, Literal

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from datasets.arrow_writer import ArrowWriter
from datasets.exceptions import DatasetsError
from datasets.data_files import _get_data_files_patterns, sanitize_patterns
from datasets.utils.metadata import MetadataConfigs
from fsspec.utils import glob_translate
from huggingface_hub import DatasetCard
from tqdm.auto import tqdm

from .chat import CHAT_COLUMN, contents, encode_conversations, is_conversational, shakespeare_conversations
from .common import UserError, atomic_output, first_line, is_hub_id, remove
from .settings import parse_command, setting, validate
from .tokenization import (GPT2_EOT, char_tokenizer_from_stoi, gpt2_encoding, gpt2_tokenizer,
                           load_tokenizer, tokenizer_kind, train_bpe, with_chat_template)

META_FILE, META_FORMAT, META_VERSION = "meta.json", "nanogpt_hf.prepared", 1
EMBEDDED, EMBEDDED_CHAT = "shakespeare", "shakespeare_chat"  # the shipped plays, and conversations made of them
EMBEDDED_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "shakespeare.jsonl.xz")
FILE_BUILDERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
TEXT = ("string", "large_string")  # Arrow's text types
WILDCARD = re.compile(r"[*?\[]")
PACK_TRIES = 8  # conversations drawn that do not fit in what is left of a training row before it is padded
MAP_BATCH = 1000  # documents per map batch (and rows per Arrow record batch that save_to_disk writes)
logging.getLogger("datasets.packaged_modules").setLevel(logging.ERROR + 1)  # a bad file's log: naming_bad_files says it


@dataclasses.dataclass
class PrepareSettings:
    source: str = setting(EMBEDDED, "'shakespeare' (the embedded corpus) or 'shakespeare_chat' (conversations made of "
                          "it), a .txt/.jsonl/.json/.parquet file, folder or glob, or a Hub id; a `messages` column of "
                          "{role, content} turns makes it conversational (chat finetuning)", path=True)
    tokenizer: str = setting(  # a name, or where a tokenizer.json is: not one of fixed choices
        "gpt2", "gpt2 (tiktoken BPE, EOT 50256 after each document) | char (vocabulary = the corpus's characters) | "
        "bpe (a byte-level BPE trained on the corpus, <|endoftext|> after each document) | a prepared dataset, model "
        "folder or Hub id whose tokenizer encodes this corpus too (one vocabulary for several corpora)", path=True)
    vocab_size: int = setting(32768, "bpe: tokens in the vocabulary, with its 256 bytes and 10 special tokens "
                              "(<|endoftext|> and nanochat's chat tokens); nanochat's 2**15", range="[266, inf)")
    split_pattern: Literal["gpt4", "gpt2"] = setting(
        "gpt4", "bpe: the regex splitting text into words before merging: gpt4 (nanochat's GPT-4 style: numbers in "
        "groups of 1-2, line breaks apart) or gpt2 (GPT-2's)")
    tokenizer_sample: int = setting(
        250_000_000, "bpe: train on the first this many characters of the (train) documents, so time and memory stay "
        "bounded on a stream or a large corpus (nanochat's speedrun: 2e9)", range="[1, inf)")
    out: str = setting("", "output folder; empty: data/<source name> (+ _char, _bpe or _<--tokenizer's folder name>)",
                       path=True)
    text_column: str = setting("text", "column holding the text (.jsonl/.json/.parquet and Hub datasets)")
    split: str = setting("", "the one split to prepare (val by val_split); empty: the source's own train and "
                         "validation (else test) splits where it has them (a Hub dataset: all its splits are read)")
    subset: str = setting("", "configuration of a Hub dataset (e.g. wikitext-103-raw-v1) or of a folder's README.md")
    txt_documents: Literal["file", "paragraph"] = setting(
        "file", ".txt files: one document per file, or one per blank-line-separated paragraph")
    val_split: Literal["auto", "tail", "random"] = setting(
        "auto", "tail: last val_fraction of the tokens; random: val_fraction of the documents; auto: by corpus size")
    val_fraction: float | None = setting(None, "held out for val; none: 0.1 (tail), 0.0005 (random)", range="(0, 1)")
    random_split_min_documents: int = setting(
        100_000, "auto: the random split from this many documents on, the tail below", range="[1, inf)")
    seed: int = setting(2357, "seed of the random split (nanoGPT's)")
    num_proc: int = setting(
        0, "tokenizing processes; 0: one per core (at most 8) above 32 MB of text, else 1", range="[0, inf)")
    streaming: bool = setting(False, "read the source as a stream (corpora larger than the disk); random split")
    force: bool = setting(False, "prepare again even when the output is up to date")


def _builder(path: str) -> str | None:  # the datasets builder that reads a corpus file (.xz too), else None
    return FILE_BUILDERS.get(os.path.splitext(path.removesuffix(".xz"))[1].lower())


def prepared_meta(folder: str) -> dict | None:  # meta.json of a prepared folder (output, never corpus), else None
    try:
        with open(os.path.join(folder, META_FILE), encoding="utf-8") as fh:
            return meta if (meta := json.load(fh)).get("format") == META_FORMAT else None
    except (OSError, ValueError, AttributeError):  # AttributeError: JSON that is not an object
        return None


def saved(folder: str) -> bool:  # a datasets save_to_disk folder (Dataset or DatasetDict; prepared ones too)?
    return any(os.path.isfile(os.path.join(folder, f)) for f in ("state.json", "dataset_dict.json"))


def _skipped(file: str, root: str, out: str) -> bool:  # below root, in the output or a saved (prepared) dataset?
    folder = os.path.dirname(file)
    while len(folder) > len(root) and os.path.realpath(folder) != out and not saved(folder):
        folder = os.path.dirname(folder)
    return len(folder) > len(root)


def corpus_files(source: str, out: str) -> list[str] | None:
    """The corpus files SOURCE names, sorted (hidden ones skipped, as ls does); None for a Hub id."""
    path, folder = os.path.expanduser(source), os.path.isdir(os.path.expanduser(source))
    if prepared_meta(path):
        raise UserError(f"'{source}' is a prepared dataset, not a corpus; train on it with --dataset={source}")
    if folder or os.path.isfile(path):
        path = os.path.join(glob.escape(path), "**", "*") if folder else glob.escape(path)
    elif not WILDCARD.search(path):
        if is_hub_id(source):
            return None
        raise UserError(f"source '{source}' does not exist")
    root = os.path.dirname(WILDCARD.split(path)[0])  # the folder before the first wildcard
    files = sorted(f for f in glob.glob(path, recursive=True) if os.path.isfile(f)
                   and not _skipped(f, root, os.path.realpath(out)) and (_builder(f) or not folder))
    if not files:
        raise UserError(f"no corpus files ({', '.join(FILE_BUILDERS)}) in '{source}'")
    if unknown := [f for f in files if not _builder(f)]:
        raise UserError(f"cannot read '{unknown[0]}': supported files are {', '.join(FILE_BUILDERS)}")
    return files


def paragraphs(files: list[str], keep_breaks: bool) -> Iterator[dict]:
    """Blank-line-separated paragraphs of .txt files, a line at a time (UTF-8, universal newlines, as nanoGPT's open()).
    keep_breaks (char: no separator token) keeps every line break, so the documents concatenate to the text as is."""
    for path in files:
        with open(path, encoding="utf-8") as fh:
            lines: list[str] = []
            for line in itertools.chain(fh, [""]):  # "": the end of the file
                if not line or (line != "\n" and lines and lines[-1] == "\n"):
                    text = "".join(lines) if keep_breaks else "".join(lines).strip("\n")
                    if text:
                        yield {"text": text}
                    lines = []
                lines.append(line)


def _matching(pattern: str, root: str, files: list[str]) -> list[str]:  # datasets' pattern resolver, over our files
    return [f for f in files if re.match(glob_translate(os.path.join(glob.escape(root), pattern)), f)]


def split_files(cfg: PrepareSettings, source: str, files: list[str]) -> dict[str, list[str]]:
    """A folder's files by split as datasets infers them: its README.md configs (--subset picks one), else split names
    in file or folder names (train.jsonl, validation/...) when there is a train split; else one split, train."""
    readme = os.path.join(source, "README.md")
    configs = MetadataConfigs.from_dataset_card_data(DatasetCard.load(readme).data) if os.path.isfile(readme) else {}
    name = cfg.subset or (configs.get_default_config_name() if configs else None)
    if (cfg.subset or configs) and name not in configs:
        raise UserError(f"'{cfg.source}' has no subset '{name}' (README.md configs: {', '.join(configs) or 'none'})")
    config, files = configs.get(name, {}), [os.path.abspath(f) for f in files]
    if not os.path.isdir(source):  # a file or a glob: one split
        return {"train": files}
    root = os.path.join(os.path.abspath(source), config.get("data_dir", ""))
    resolve = functools.partial(_matching, root=root, files=files)
    patterns = sanitize_patterns(config["data_files"]) if "data_files" in config else _get_data_files_patterns(resolve)
    patterns = patterns if "train" in patterns or "data_files" in config else {"train": ["**"]}
    return {str(k): found for k, v in patterns.items() if (found := sorted({f for p in v for f in resolve(p)}))}


def load_corpus(cfg: PrepareSettings, files: list[str] | None, cache_dir: str) -> dict:
    """{name: text column as a Dataset (an IterableDataset when streaming)}: the corpus's own train and val (its
    validation, else test) splits, or the one split for val_split to split (--split, or the only one it has)."""
    source = EMBEDDED_PATH if cfg.source in (EMBEDDED, EMBEDDED_CHAT) else os.path.expanduser(cfg.source)
    if cfg.source == EMBEDDED_CHAT:
        splits = datasets.Dataset.from_generator(shakespeare_conversations, gen_kwargs={"path": source},
                                                 cache_dir=cache_dir)
    elif files is None:  # a Hub dataset: the given split, else all its splits
        splits = datasets.load_dataset(cfg.source, cfg.subset or None, split=cfg.split or None, streaming=cfg.streaming)
    else:  # files, a folder with its own splits, a save_to_disk folder (split_files refuses a --subset it lacks)
        groups = split_files(cfg, source, files)
        splits = datasets.load_from_disk(source) if saved(source) else {
            k: load_files(cfg, group, cache_dir) for k, group in groups.items()}
    if not isinstance(splits, dict):
        splits = {cfg.split or "train": splits}
    val = next((k for k in ("validation", "val", "test") if k in splits), None)
    if not cfg.split and val and "train" in splits:  # the corpus's own split
        if cfg.val_split != "auto" or cfg.val_fraction:  # settings that split one split: never ignored silently
            raise UserError(f"'{cfg.source}' has its own {val} split; to split its train split instead, add "
                            "--split=train")
        names = ["train", val]
    else:
        names = [cfg.split or (next(iter(splits)) if len(splits) == 1 else "")]
    if names[0] not in splits:
        missing = f"no split {names[0]!r}; " if names[0] else ""
        raise UserError(f"choose a split of '{cfg.source}' with --split ({missing}its splits: {', '.join(splits)})")
    features = splits[names[0]].features or {}  # (a stream's columns may be unknown: {})
    columns = {k: getattr(f, "dtype", "") in TEXT for k, f in features.items()}
    chat = is_conversational(features, cfg.text_column)
    if not chat and (problem := _no_column(cfg.text_column, cfg.source, columns)):
        raise UserError(problem)
    return {k: splits[k].select_columns([CHAT_COLUMN if chat else cfg.text_column]) for k in names}


def load_files(cfg: PrepareSettings, files: list[str], cache_dir: str):
    """Corpus files as one Dataset (an IterableDataset when streaming), in sorted order."""
    parts = []
    for builder, group in itertools.groupby(files, key=_builder):  # a run of files of one format: one builder
        group = list(group)
        if builder == "text" and cfg.txt_documents == "paragraph":
            kind, kw = (datasets.IterableDataset, {}) if cfg.streaming else (datasets.Dataset, {"cache_dir": cache_dir})
            parts.append(kind.from_generator(paragraphs, features=datasets.Features({"text": datasets.Value("string")}),
                                             gen_kwargs={"files": group, "keep_breaks": cfg.tokenizer == "char"}, **kw))
        else:  # .txt: one document per file
            kw = {"sample_by": "document"} if builder == "text" else {}
            parts.append(datasets.load_dataset(builder, data_files=group, split="train", cache_dir=cache_dir,
                                               streaming=cfg.streaming, **kw))
    column = CHAT_COLUMN if all(is_conversational(p.features, cfg.text_column) for p in parts) else cfg.text_column
    parts = [p.select_columns([column]) for p in parts]
    if len(parts) > 1 and column != CHAT_COLUMN:  # pandas writes parquet text as large_string, the json and text
        parts = [p.cast_column(column, datasets.Value("large_string")) for p in parts]  # builders string
    return datasets.concatenate_datasets(parts)


def file_problem(path: str, column: str | None) -> str | None:
    """The first problem that the plain reader (json.loads per line or json.load, pyarrow.parquet, UTF-8) finds in a
    corpus file, 'FILE, line N: cause; fix', or the `column` it lacks; None when it reads (or holds no rows)."""
    kind = _builder(path)
    columns, n, line = {"text": True} if kind == "text" else {}, 0, b""  # {column: holds text}
    try:
        if kind == "parquet":
            parquet = pq.ParquetFile(path)
            columns = {f.name: str(f.type) in TEXT for f in parquet.schema_arrow}
            any(False for _ in parquet.iter_batches())  # reads every page
        else:
            with (lzma.open if path.endswith(".xz") else open)(path, "rb") as fh:
                document = kind == "json" and fh.peek(1).lstrip()[:1] == b"["  # a JSON list, else an object a line
                for n, line in enumerate([fh.read()] if document else fh, 1):
                    if (text := line.decode("utf-8").rstrip()) and kind == "json":
                        rows = json.loads(text)
                        columns |= {k: isinstance(v, str) for r in (rows if document else [rows]) for k, v in r.items()}
    except (ValueError, AttributeError) as exc:  # AttributeError: a row that is not a JSON object
        decoding = isinstance(exc, json.JSONDecodeError)
        n += exc.lineno - 1 if decoding else line.count(b"\n", 0, getattr(exc, "start", 0))
        cause = f"{exc.msg} (column {exc.colno})" if decoding else "not a JSON object" if isinstance(
            exc, AttributeError) else first_line(exc).rstrip(".")
        fix = "save it as UTF-8" if isinstance(exc, UnicodeError) else f"fix or remove that {'line' if n else 'file'}"
        return f"{path}{f', line {n}' if n else ''}: {cause}; {fix}"
    return _no_column(column, path, columns)


def _no_column(column: str | None, where: str, columns: dict[str, bool]) -> str | None:
    """The missing `column` named, with the fix, for {column: holds text} (empty: not known), else None."""
    if column is None or column in columns or CHAT_COLUMN in columns or not columns:  # (or conversations)
        return None
    fix = next((f"; pass --text_column={k}" for k, is_text in columns.items() if is_text), "")
    return f"column '{column}' not in {where} (its columns: {', '.join(columns)}){fix}"


@contextlib.contextmanager
def naming_bad_files(files: list[str], column: str | None = None):
    """Reading `files` through datasets: a failure is raised as UserError naming the first bad file and line, which
    the plain readers find (datasets' own error names neither, its log a row counted from 0)."""
    try:
        yield
    except (ValueError, StopIteration, DatasetsError) as exc:  # StopIteration: datasets' json builder, empty files
        problem = next(filter(None, (file_problem(f, column) for f in files)), None)
        if problem is None and files and all(os.path.getsize(f) == 0 for f in files):
            problem = f"{files[0]} is empty"
        if problem:
            raise UserError(problem) from exc
        raise


def _texts(batch, column: str) -> list[str]:  # the functions datasets.map runs (maybe in workers) are module-level
    """An Arrow batch's documents (a missing text is an empty document; conversations: their messages' contents);
    UserError when they are not text."""
    array = batch.column(column)
    if column == CHAT_COLUMN:
        return contents(array)
    if str(array.type) not in (*TEXT, "null"):
        raise UserError(f"column '{column}' holds {array.type}, not text; pick another --text_column")
    return [t or "" for t in array.to_pylist()]


def list_table(lengths: list[int], values):  # a row of ids per document; int64 offsets: a batch may hold 2**31
    return pa.table({"ids": pa.LargeListArray.from_arrays(np.cumsum([0, *lengths], dtype=np.int64), values)})


@functools.lru_cache(maxsize=2)
def _backend(tokenizer_json: str):  # parsed once per process (datasets' map workers are sent the JSON text)
    from tokenizers import Tokenizer

    backend = Tokenizer.from_str(tokenizer_json)
    backend.encode_special_tokens = True  # a literal "<|endoftext|>" in a document is text, as in encode_ordinary
    return backend


def tokenize_batch(batch, column: str, dtype: str, lut: np.ndarray | None = None, num_threads: int = 1,
                   tokenizer: str | None = None, eot: int | None = GPT2_EOT, chat_tokenizer=None, features=None):
    """Arrow batch of texts -> ids: encode_ordinary + EOT (nanoGPT's process()), or by `lut` (code point -> id), or
    by a tokenizer.json's text (Rust threads) + its `eot`; conversations -> ids and mask, by the chat template."""
    if chat_tokenizer is not None:
        return encode_conversations(batch, column, dtype, chat_tokenizer, features)
    texts = _texts(batch, column)
    if lut is not None:
        codepoints = np.frombuffer("".join(texts).encode("utf-32-le"), dtype=np.uint32)
        return list_table([len(t) for t in texts], lut[codepoints].astype(dtype))
    if tokenizer is None:
        docs = gpt2_encoding().encode_ordinary_batch(texts, num_threads=num_threads)
    else:
        docs = [e.ids for e in _backend(tokenizer).encode_batch_fast(texts, add_special_tokens=False)]
    for ids in docs if eot is not None else ():
        ids.append(eot)  # after each document
    lengths = [len(ids) for ids in docs]
    return list_table(lengths, np.fromiter(itertools.chain.from_iterable(docs), dtype=dtype, count=sum(lengths)))


def text_sample(ds, column: str, chars: int) -> Iterator[list[str]]:
    """The first `chars` characters of the documents of `ds`, a batch of documents at a time (the last one cut)."""
    for batch in ds.with_format("arrow").iter(batch_size=MAP_BATCH):
        texts = []
        for text in _texts(batch, column):
            texts.append(text[:chars])
            if (chars := chars - len(texts[-1])) == 0:
                break
        yield texts
        if chars == 0:
            return


def bpe_text(cfg: PrepareSettings, parts: list) -> Iterator[list[str]]:
    """What a BPE is trained on: the first tokenizer_sample characters of the train documents. A corpus of one split
    is held out from as split_dataset will (a stream's val, drawn at random later, is not)."""
    ds, chars = parts[0], cfg.tokenizer_sample
    if len(parts) == 1 and not cfg.streaming:
        rule, fraction = val_rule(cfg, len(ds))
        if rule == "random":  # the same documents as split_dataset's
            ds = ds.train_test_split(test_size=fraction, seed=cfg.seed, shuffle=True)["train"]
        else:  # the last `fraction` of the tokens: about as much of the characters
            total = pc.sum(pc.utf8_length(ds.data.column(cfg.text_column))).as_py() or 0
            chars = min(chars, int(total * (1 - fraction)))
    return text_sample(ds, cfg.text_column, chars)


def reused_tokenizer(name: str):
    """--tokenizer=DIR: the tokenizer of a prepared dataset or model folder (its tokenizer.json), or of a Hub id."""
    if os.path.isdir(name):
        return load_tokenizer(name)
    if not is_hub_id(name):
        raise UserError(f"--tokenizer={name}: not gpt2, char or bpe, nor a folder holding a tokenizer.json, nor a Hub "
                        "id; pass one of those")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(name)


def tokenizing(cfg: PrepareSettings, parts) -> tuple:
    """(the transformers tokenizer, tokenize_batch's kwargs); conversations: the tokenizer with its chat template."""
    tokenizer, kwargs = text_tokenizing(cfg, parts)
    if cfg.text_column != CHAT_COLUMN:
        return tokenizer, kwargs
    tokenizer = with_chat_template(tokenizer, f"--tokenizer={cfg.tokenizer}")
    tokenizer.model_max_length = sys.maxsize  # conversations are cut to the block when training, not here
    return tokenizer, {"column": CHAT_COLUMN, "dtype": "uint16" if len(tokenizer) <= 1 << 16 else "uint32",
                       "chat_tokenizer": tokenizer, "features": next(iter(parts)).features}


def text_tokenizing(cfg: PrepareSettings, parts) -> tuple:
    """tokenizing() for text; char: one pass over the text for its vocabulary; bpe: one over the first
    tokenizer_sample characters of the train documents to train it."""
    if cfg.tokenizer == "char":
        return char_tokenizing(cfg, parts)
    if cfg.tokenizer == "bpe":
        tokenizer = train_bpe(bpe_text(cfg, list(parts)), cfg.vocab_size, cfg.split_pattern)
    else:
        tokenizer = gpt2_tokenizer() if cfg.tokenizer == "gpt2" else reused_tokenizer(cfg.tokenizer)
    if (kind := tokenizer_kind(tokenizer)) == "char":  # a reused character vocabulary
        return char_tokenizing(cfg, parts, tokenizer.get_vocab())
    if kind == "gpt2":  # tiktoken: GPT-2's ids, faster
        return tokenizer, {"column": cfg.text_column, "dtype": "uint16", "num_threads": os.cpu_count() or 1}
    if tokenizer.eos_token_id is None:  # documents would run together, and generation would never stop
        raise UserError(f"--tokenizer={cfg.tokenizer} has no end-of-text (eos) token to end each document with; use "
                        "a tokenizer that has one (gpt2, bpe, or a causal language model's)")
    return tokenizer, {"column": cfg.text_column, "dtype": "uint16" if len(tokenizer) <= 1 << 16 else "uint32",
                       "tokenizer": tokenizer.backend_tokenizer.to_str(), "eot": tokenizer.eos_token_id}


def char_tokenizing(cfg: PrepareSettings, parts, stoi: dict[str, int] | None = None) -> tuple:
    """tokenizing() for char: the vocabulary is the corpus's characters (or `stoi`, a reused one that must hold them
    all), encoded by a code point -> id table."""
    chars: set[str] = set()
    batches = itertools.chain.from_iterable(d.with_format("arrow").iter(batch_size=MAP_BATCH) for d in parts)
    for batch in tqdm(batches, desc="Collecting characters", unit="batch", disable=None):
        chars.update("".join(_texts(batch, cfg.text_column)))
    if not chars:
        raise UserError(f"the corpus '{cfg.source}' is empty (its documents hold no text)")
    chars |= {"\n"} if cfg.text_column == CHAT_COLUMN else set()  # the chat template's, before a system message
    if stoi is not None and (unknown := chars - stoi.keys()):
        raise UserError(f"character {min(unknown)!r} of the corpus is not in the vocabulary of {cfg.tokenizer}; "
                        "prepare with --tokenizer=char (or with a vocabulary that holds it)")
    stoi = stoi or {c: i for i, c in enumerate(sorted(chars))}
    lut = np.zeros(ord(max(stoi)) + 1, dtype=np.uint32)  # code point -> id (index in sorted(set(corpus)))
    lut[[ord(c) for c in stoi]] = np.fromiter(stoi.values(), dtype=np.uint32, count=len(stoi))
    dtype = "uint16" if len(stoi) <= 1 << 16 else "uint32"
    return char_tokenizer_from_stoi(stoi), {"column": cfg.text_column, "dtype": dtype, "lut": lut}


def ids_features(dtype: str, chat: bool = False):  # int64 offsets, see list_table; conversations: the mask to learn
    mask = {"mask": datasets.LargeList(datasets.Value("uint8"))} if chat else {}
    return datasets.Features({"ids": datasets.LargeList(datasets.Value(dtype)), **mask})


def tokenize(ds, cfg: PrepareSettings, kwargs: dict, name: str, cache_dir: str):
    """Dataset of texts -> Dataset of ids, in num_proc processes (0: one per core, at most 8, above 32 MB of text)."""
    auto = min(os.cpu_count() or 1, 8) if ds.data.nbytes > 32 * 2**20 and "tokenizer" not in kwargs else 1  # Rust
    num_proc = max(1, min(cfg.num_proc or auto, ds.num_rows))
    if "num_threads" in kwargs:  # tiktoken releases the GIL: its threads use the cores the processes leave
        kwargs = {**kwargs, "num_threads": max(1, (os.cpu_count() or 1) // num_proc)}
    return ds.with_format("arrow").map(
        tokenize_batch, fn_kwargs=kwargs, batched=True, batch_size=MAP_BATCH, remove_columns=ds.column_names,
        num_proc=num_proc if num_proc > 1 else None,
        features=ids_features(kwargs["dtype"], cfg.text_column == CHAT_COLUMN),
        cache_file_name=os.path.join(cache_dir, f"tokens-{name}.arrow"),
        desc=f"Tokenizing {name} ({cfg.tokenizer}, num_proc={num_proc})").with_format(None)


def row_lengths(ds) -> np.ndarray:  # tokens per document, from the Arrow list offsets (no ids are read)
    return pc.list_value_length(ds.data.column("ids")).to_numpy()


def tail_split(ds, fraction: float) -> tuple:
    """The last `fraction` of the token stream -> val, the document holding the cut split in two (nanoGPT's 90/10)."""
    ends = np.cumsum(row_lengths(ds))  # (documents,) stream position where each one ends
    total = int(ends[-1]) if len(ends) else 0
    cut = min(total - 1, int(total * (1 - fraction)))  # the first val token: nanoGPT's int(n * 0.9)
    if cut <= 0:
        raise UserError(f"the corpus is empty or too small to hold out a val split ({total} tokens)")
    k = int(np.searchsorted(ends, cut, side="right"))  # the document holding it
    head = cut - (int(ends[k - 1]) if k else 0)  # its tokens that stay in train
    row = pc.list_flatten(ds.data.column("ids").slice(k, 1)).combine_chunks()  # Arrow, not a list: 40 B a token
    train = [datasets.Dataset(ds.data.slice(0, k))] + [datasets.Dataset(list_table([head], row[:head]))] * (head > 0)
    val = [datasets.Dataset(list_table([len(row) - head], row[head:])), datasets.Dataset(ds.data.slice(k + 1))]
    return datasets.concatenate_datasets(train), datasets.concatenate_datasets(val)


def val_rule(cfg: PrepareSettings, documents: int) -> tuple[str, float]:
    """How val is held out of a corpus of one split, and how much: tail (of the tokens) or random (documents).
    Conversations are held out whole, a tenth of them below random_split_min_documents."""
    many, chat = documents >= cfg.random_split_min_documents, cfg.text_column == CHAT_COLUMN
    rule = ("random" if many or chat else "tail") if cfg.val_split == "auto" else cfg.val_split
    if chat and rule == "tail":
        raise UserError("conversations are held out whole, at random: drop --val_split=tail")
    few_conversations = chat and not many
    return rule, cfg.val_fraction or (0.1 if rule == "tail" or few_conversations else 0.0005)


def split_dataset(cfg: PrepareSettings, ds, kwargs: dict, cache_dir: str) -> tuple:
    """Tokenize and split a memory-mapped corpus -> ({split: Dataset of ids}, the val split's rule)."""
    rule, fraction = val_rule(cfg, len(ds))
    if rule == "tail":
        splits = tail_split(tokenize(ds, cfg, kwargs, "all", cache_dir), fraction)
    else:  # nanoGPT's: split the documents (shuffled, seed 2357), then tokenize each split
        parts = ds.train_test_split(test_size=fraction, seed=cfg.seed, shuffle=True)
        splits = [tokenize(parts[k].flatten_indices(), cfg, kwargs, k, cache_dir) for k in ("train", "test")]
    return dict(zip(("train", "val"), splits)), {"rule": rule, "fraction": fraction, "seed": cfg.seed}


def split_stream(cfg: PrepareSettings, stream, kwargs: dict, cache_dir: str, name="train", fraction=None) -> tuple:
    """Tokenize a stream into an Arrow file; each document goes to val (in memory) with probability `fraction`
    (default: val_fraction, else nanoGPT's 0.0005; 0: a corpus's own split)."""
    if cfg.val_split == "tail" and fraction is None:  # a stream is read once: its last tokens come too late
        raise UserError("--streaming splits documents at random; drop --val_split=tail (or --streaming)")
    features = ids_features(kwargs["dtype"], cfg.text_column == CHAT_COLUMN)
    path = os.path.join(cache_dir, f"stream-{name}.arrow")
    fraction = cfg.val_fraction or 0.0005 if fraction is None else fraction
    rng, val = np.random.default_rng(cfg.seed), [features.arrow_schema.empty_table()]
    with ArrowWriter(features=features, path=path) as writer:
        batches = stream.with_format("arrow").iter(batch_size=MAP_BATCH)
        for batch in tqdm(batches, desc=f"Tokenizing stream ({cfg.tokenizer})", unit="batch", disable=None):
            table = tokenize_batch(batch, **kwargs).cast(features.arrow_schema)
            is_val = rng.random(table.num_rows) < fraction
            val.append(table.filter(is_val))
            writer.write_table(table.filter(~is_val))
        writer.finalize()
    train, val = datasets.Dataset.from_file(path), datasets.Dataset(pa.concat_tables(val))
    if val.num_rows == 0 and train.num_rows and fraction:  # a tiny stream: hold out its last document, not nothing
        train, val = train.select(range(train.num_rows - 1)), train.select([train.num_rows - 1])
    if train.num_rows == 0:
        raise UserError(f"the stream '{cfg.source}' holds {val.num_rows} document(s), too few for a train and a val "
                        "split; prepare it without --streaming (the tail split cuts a document in two)")
    return {"train": train, "val": val}, {"rule": "random", "fraction": fraction, "seed": cfg.seed}


def whole_stream_file(ds) -> str | None:
    """The Arrow file split_stream wrote, when `ds` is all of it (not a slice or a selection of its rows)."""
    files = [f["filename"] for f in ds.cache_files]
    if ds._indices is not None or len(files) != 1 or not os.path.basename(files[0]).startswith("stream-"):
        return None
    return files[0] if len(ds) == datasets.Dataset.from_file(files[0]).num_rows else None


def save_splits(splits: dict, folder: str) -> None:
    """DatasetDict.save_to_disk, except that a stream's split, written whole by split_stream, is moved into place:
    copying it through a memory map made the peak RSS of --streaming grow with the corpus."""
    streamed = {k: path for k, d in splits.items() if (path := whole_stream_file(d))}
    datasets.DatasetDict({k: d.select([0]) if k in streamed else d for k, d in splits.items()}).save_to_disk(folder)
    for k, path in streamed.items():  # the metadata save_to_disk wrote (for one row) now names the whole file
        os.replace(path, os.path.join(folder, k, "data-00000-of-00001.arrow"))


def default_out(cfg: PrepareSettings) -> str:
    """data/<name> (+ _char, _bpe or _<--tokenizer's folder name>): a file's stem, a folder's or a glob's folder name,
    a Hub id with _ for /."""
    path = os.path.expanduser(WILDCARD.split(cfg.source)[0]) or "corpus"
    name = cfg.source.replace("/", "_") if is_hub_id(cfg.source) else os.path.basename(os.path.abspath(path))
    name = os.path.splitext(name)[0] if os.path.isfile(path) else name  # abspath above: '.' gets the folder's name
    reused = "_" + os.path.basename(os.path.normpath(cfg.tokenizer))
    suffix = {"gpt2": "", "char": "_char", "bpe": "_bpe"}.get(cfg.tokenizer, reused)
    return cfg.out or os.path.join("data", name + suffix)


def prepare(cfg: PrepareSettings) -> str:
    """Prepare `cfg.source` into `cfg.out` (or the default folder) unless it is up to date; returns the folder."""
    out = default_out(validate(cfg))
    embedded = cfg.source in (EMBEDDED, EMBEDDED_CHAT)
    if embedded and os.path.exists(cfg.source):  # the name stays the corpus train.py's default uses
        print(f"'{cfg.source}' is an embedded corpus; for the local '{cfg.source}', pass ./{cfg.source}")
    files = [EMBEDDED_PATH] if embedded else corpus_files(cfg.source, out)
    inside = [f for f in files or [] if os.path.realpath(f).startswith(os.path.realpath(out) + os.sep)]
    if inside:  # the new dataset replaces the whole folder: the input would be deleted with the old one
        raise UserError(f"output folder '{out}' holds the input '{inside[0]}'; choose another --out")
    if os.path.exists(out) and not prepared_meta(out) and (not os.path.isdir(out) or os.listdir(out)):  # --out=.
        raise UserError(f"output '{out}' exists and is not a prepared dataset; choose another --out or empty it")
    # up to date: the same token settings and files (path, size, mtime, as make); a Hub dataset is prepared again
    settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("out", "num_proc", "force")}
    used = os.path.join(cfg.tokenizer, "tokenizer.json")  # --tokenizer=DIR: an input too
    inputs = [[os.path.abspath(f), os.stat(f).st_size, os.stat(f).st_mtime_ns]
              for f in (files or []) + [used] * os.path.isfile(used)]
    key = files and hashlib.sha256(json.dumps([META_VERSION, settings, inputs]).encode()).hexdigest()[:16]
    if key and not cfg.force and (prepared_meta(out) or {}).get("fingerprint") == key:
        print(f"{out} is up to date; nothing to do (--force prepares it again)")
        return out
    t0 = time.time()
    readable = [] if files is None or saved(os.path.expanduser(cfg.source)) else files  # by the plain readers
    with atomic_output(out) as tmp, naming_bad_files(readable, cfg.text_column):
        cache = os.path.join(tmp, "cache")  # datasets' work files, deleted before the folder is renamed into place
        os.makedirs(cache)
        parts = load_corpus(cfg, files, cache)  # one split, or the corpus's own train and val splits
        if is_conversational(next(iter(parts.values())).features):  # rendered by a chat template
            cfg = dataclasses.replace(cfg, text_column=CHAT_COLUMN)
        tokenizer, kwargs = tokenizing(cfg, parts.values())  # char: a first pass over the corpus for the vocabulary
        if len(parts) == 2:  # the corpus's own train and val splits
            splits = [split_stream(cfg, d, kwargs, cache, k, 0)[0]["train"] if cfg.streaming
                      else tokenize(d, cfg, kwargs, k, cache) for k, d in parts.items()]
            splits, rule = dict(zip(("train", "val"), splits)), {"rule": "own", "split": list(parts)[1]}
        else:
            splits, rule = (split_stream if cfg.streaming else split_dataset)(cfg, *parts.values(), kwargs, cache)
        save_splits(splits, tmp)
        remove(cache)
        tokenizer.save_pretrained(tmp)
        stats = {k: {"documents": d.num_rows, "tokens": int(row_lengths(d).sum())} for k, d in splits.items()}
        chat = cfg.text_column == CHAT_COLUMN
        for k, d in splits.items() if chat else ():  # conversations: the tokens to learn
            stats[k]["learned"] = int(pc.sum(pc.list_flatten(d.data.column("mask"))).as_py() or 0)
        meta = {"format": META_FORMAT, "version": META_VERSION, "tokenizer": tokenizer_kind(tokenizer), "splits": stats,
                "vocab_size": len(tokenizer), "dtype": splits["train"].features["ids"].feature.dtype,
                "source": cfg.source, "hub_id": None if files else cfg.source, "fingerprint": key, "val_split": rule,
                "eot_token": tokenizer.eos_token_id, "chat": chat,
                "settings": dataclasses.asdict(cfg),
                "seconds": round(time.time() - t0, 3)}
        with open(os.path.join(tmp, META_FILE), "w", encoding="utf-8") as fh:
            json.dump(meta, fh, indent=2)
    counts = "; ".join(f"{k}: {s['documents']:,} {'conversations' if chat else 'documents'}, {s['tokens']:,} tokens"
                       + (f" ({s['learned']:,} to learn)" if chat else "") for k, s in stats.items())
    print(f"prepared {cfg.source} -> {out} in {meta['seconds']:.1f} s ({cfg.tokenizer}, vocab {len(tokenizer)}); "
          + counts + (f"; val: the corpus's own {rule['split']} split" if rule["rule"] == "own" else ""))
    return out


def main(argv: list[str] | None = None) -> None:
    cfg, _ = parse_command(
        PrepareSettings, argv, prog="prepare.py", positional="source",
        description="Tokenize a corpus into train/val Arrow datasets (plus tokenizer and meta.json) for training.",
        epilog="examples:\n"
        "  python prepare.py --tokenizer=char                    # embedded Shakespeare -> data/shakespeare_char\n"
        "  python prepare.py my_texts/ --out=data/mine           # every .txt/.jsonl/.json/.parquet under my_texts/\n"
        "  python prepare.py my_texts/ --tokenizer=bpe --vocab_size=8192  # train a BPE on it -> data/my_texts_bpe\n"
        "  python prepare.py more/ --tokenizer=data/my_texts_bpe  # encode another corpus with that vocabulary\n"
        "  python prepare.py Skylion007/openwebtext --num_proc=8  # a Hub dataset (needs the network)")
    prepare(cfg)


def read_meta(path: str) -> dict:
    """meta.json of a prepared folder; UserError naming the fix when the folder is missing or holds a corpus."""
    if not os.path.isfile(os.path.join(path, META_FILE)):  # missing, or a corpus (prepare writes atomically)
        out, exists = "data/" + os.path.splitext(os.path.basename(os.path.normpath(path)))[0], os.path.exists(path)
        what = "is not a prepared dataset (no meta.json)" if exists else "does not exist"
        raise UserError(f"'{path}' {what}; prepare it first: python prepare.py {path if exists else 'SOURCE'} "
                        f"--out={out}, then use {out}")
    if (meta := prepared_meta(path)) is None or meta.get("version") != META_VERSION:
        raise UserError(f"{os.path.join(path, META_FILE)} is damaged or of another version; prepare it again")
    return meta


class TokenStream:
    """A split as one memory-mapped token stream: each Arrow record batch's ids are a zero-copy numpy view (chunk)."""

    def __init__(self, path: str, split: str = "train", column: str = "ids"):
        self.meta, self.path, self.split = read_meta(path), path, split
        self._dataset = datasets.load_from_disk(os.path.join(path, split))  # keeps the memory maps alive
        chunks = [c.flatten().to_numpy(zero_copy_only=True) for c in self._dataset.data.column(column).chunks]
        self.chunks = [c for c in chunks if len(c)]
        self.offsets = np.cumsum([0] + [len(c) for c in self.chunks])  # (chunks + 1,): where each chunk starts
        self.salt = zlib.crc32(split.encode())  # train and val draw different windows from the same seed

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def window(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start + length) of the stream: a view inside one chunk, else a small copy."""
        i = int(np.searchsorted(self.offsets, start, side="right")) - 1
        lo, pieces = start - int(self.offsets[i]), []
        while length > 0:
            pieces.append(self.chunks[i][lo : lo + length])
            length -= len(pieces[-1])
            i, lo = i + 1, 0
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)

    def sample_row(self, rng, block_size: int) -> tuple[np.ndarray, np.ndarray]:
        """x, y (T,): a random window (nanoGPT's get_batch), y the next token of each x."""
        w = self.window(int(rng.integers(0, _room(self, block_size))), block_size + 1)
        return w[:-1], w[1:]


class Conversations:
    """A conversational split: ids and the mask of the tokens to learn, per conversation. A training row is whole
    conversations drawn at random, packed while they fit (the first one cut to the row; PACK_TRIES draws that do not
    fit end it), targets -100 where nothing is learned; as in pretraining (and nanochat's SFT), attention runs across
    the conversations of a row, each starting with its bos."""

    def __init__(self, path: str, split: str = "train"):
        self.ids, self.mask = TokenStream(path, split), TokenStream(path, split, "mask")
        self.split, self.salt, self.pad = split, self.ids.salt, int(self.ids.meta["eot_token"] or 0)
        self.starts = np.cumsum([0, *row_lengths(self.ids._dataset)])  # (conversations + 1,)
        learned = np.concatenate([np.flatnonzero(c) + o for c, o in zip(self.mask.chunks, self.mask.offsets)]
                                 + [[np.iinfo(np.int64).max]])  # positions to learn in the stream, then a sentinel
        self.first = learned[np.searchsorted(learned, self.starts[:-1])] - self.starts[:-1]  # (conversations,)
        self._learnable = (None, None)  # (block_size, the conversations with a token to learn within a row)

    def __len__(self) -> int:
        return len(self.starts) - 1

    def learnable(self, block_size: int) -> np.ndarray:
        """The conversations with a token to learn within a row of block_size + 1 (a target at 1..block_size)."""
        if self._learnable[0] != block_size:
            ok = (self.first >= 1) & (self.first <= block_size) & (self.first < np.diff(self.starts))
            self._learnable = (block_size, np.flatnonzero(ok))
        if not len(self._learnable[1]):
            raise UserError(f"no conversation of the {self.split} split of {self.ids.path} has an assistant's token "
                            f"within block_size + 1 = {block_size + 1} tokens: use a larger block_size")
        return self._learnable[1]

    def sample_row(self, rng, block_size: int) -> tuple[np.ndarray, np.ndarray]:
        """x, y (T,): conversations drawn while they fit (PACK_TRIES misses end the row), then right-padded."""
        row = np.full((2, block_size + 1), [[self.pad], [-100]], dtype=np.int64)  # (ids, targets), right-padded
        n, misses, pick = 0, 0, self.learnable(block_size)
        while n <= block_size and misses < PACK_TRIES:
            k = int(pick[rng.integers(0, len(pick))])
            start, length = int(self.starts[k]), int(self.starts[k + 1] - self.starts[k])
            if n and n + length > block_size + 1:
                misses += 1
                continue
            length = min(length, block_size + 1 - n)
            row[0, n : n + length] = self.ids.window(start, length)
            row[1, n : n + length] = np.where(self.mask.window(start, length) > 0, row[0, n : n + length], -100)
            n += length
        return row[0, :-1], row[1, 1:]


class PreparedData:
    """A prepared folder (open_dataset(path)): its meta, a stream per split, its tokenizer."""

    def __init__(self, path: str):
        self.path, self.meta = path, read_meta(path)
        self.vocab_size, self.tokenizer_kind = int(self.meta["vocab_size"]), self.meta["tokenizer"]

    @property
    def model_vocab_size(self) -> int:  # a BPE's padded to a multiple of 64 (nanoGPT's 50257 -> 50304), char's as is
        return self.vocab_size if self.tokenizer_kind == "char" else -(-self.vocab_size // 64) * 64

    def stream(self, split: str) -> TokenStream | Conversations:
        return (Conversations if self.meta.get("chat") else TokenStream)(self.path, split)

    def tokenizer(self):
        return load_tokenizer(self.path)


open_dataset = PreparedData


def check_compatible(meta: dict, model_vocab_size: int, block_size: int,
                     vocab_fix: str = "set --vocab_size={needed} or more") -> None:
    """Training-start checks: the model embeds every id (else vocab_fix says what to do), each split holds a window."""
    if meta["vocab_size"] > model_vocab_size:
        raise UserError(f"the dataset's vocabulary ({meta['vocab_size']} tokens) is larger than the model's "
                        f"vocab_size ({model_vocab_size}); {vocab_fix.format(needed=meta['vocab_size'])}")
    for name, split in meta["splits"].items() if not meta.get("chat") else ():  # conversations: padded rows
        if split["tokens"] < block_size + 1:
            raise UserError(f"the {name} split has {split['tokens']} tokens, fewer than block_size + 1 = "
                            f"{block_size + 1}; use a smaller block_size or more data")


def parse_mixture(text: str) -> dict[str, float]:
    """'data/web:0.7,data/code:0.3' -> {folder: weight}; a folder without a weight weighs 1 (weights are relative)."""
    mixture = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        path, _, weight = part.rpartition(":")
        try:
            path, weight = (path, float(weight)) if path else (part, 1.0)
        except ValueError:  # a colon inside a folder's name
            path, weight = part, 1.0
        if not 0 < weight < math.inf:
            raise UserError(f"dataset: the weight of '{path}' must be a positive number, got {weight}")
        mixture[os.path.expanduser(path)] = mixture.get(os.path.expanduser(path), 0.0) + weight
    names = [os.path.basename(os.path.normpath(p)) for p in mixture]
    if len(set(names)) < len(names) or not names:  # each source's losses and tokens are reported by its name
        raise UserError(f"dataset '{text}': name each source once, in folders with different names")
    return mixture


class Mixture:
    """One split of one or several prepared folders: each row of a batch comes from a source drawn by weight, a pure
    function of (seed, step, micro-batch, row), so that any number of processes, and a resumed run, draw the same."""

    def __init__(self, streams: list[TokenStream], weights: list[float] = (1.0,), names: list[str] = ("",)):
        self.streams, self.names, self.salt = list(streams), list(names), streams[0].salt
        self.weights = np.asarray(weights, dtype=np.float64) / sum(weights)  # (sources,)
        self.cdf = np.append(np.cumsum(self.weights)[:-1], 1.0)  # (sources,), ending at exactly 1

    def draw(self, seed: int, step: int, index: int, batch_size: int, rng=None) -> np.ndarray:
        """(batch_size,) the source of each row of micro-batch `index` of step `step` (one source: all 0)."""
        if len(self.streams) == 1:
            return np.zeros(batch_size, dtype=np.int64)
        rng = rng or np.random.default_rng([seed, self.salt, 0, step, index])
        return np.searchsorted(self.cdf, rng.random(batch_size), side="right")

    def tokens(self, seed: int, step: int, micro_batches: int, batch_size: int, block_size: int) -> dict[str, int]:
        """Tokens per source in the micro-batches 0..micro_batches-1 of a step."""
        sources = [self.draw(seed, step, i, batch_size) for i in range(micro_batches)]
        counts = np.bincount(np.concatenate(sources), minlength=len(self.streams)) * block_size
        return dict(zip(self.names, counts.tolist()))


def _xy(rows: list[tuple[np.ndarray, np.ndarray]]):
    """x, y (B, T) int64 tensors from the rows' (x, y): one copy of each, straight into int64."""
    x, y = np.empty((2, len(rows), len(rows[0][0])), dtype=np.int64)
    for i, (row_x, row_y) in enumerate(rows):
        x[i], y[i] = row_x, row_y
    return torch.from_numpy(x), torch.from_numpy(y)  # (B, T), (B, T)


def _room(stream: TokenStream, block_size: int) -> int:  # how many windows the stream holds
    if len(stream) < block_size + 1:
        raise UserError(f"the {stream.split} split has {len(stream)} tokens, fewer than block_size + 1")
    return len(stream) - block_size


def sample_batch(data: TokenStream | Mixture, *, seed: int, step: int, index: int, batch_size: int, block_size: int):
    """Random windows for micro-batch `index` of optimizer step `step` (index counts over all processes): the batch of
    (seed, step, index) is the same whichever process draws it, so any process count sees the same data."""
    mix = data if isinstance(data, Mixture) else Mixture([data])
    rng = np.random.default_rng([seed, mix.salt, 0, step, index])  # 0: training, 1: evaluation draws
    sources = mix.draw(seed, step, index, batch_size, rng)  # (B,), then each row from its source
    return _xy([mix.streams[k].sample_row(rng, block_size) for k in sources])


def eval_batch(stream: TokenStream | Conversations, *, seed: int, k: int, batch_size: int, block_size: int):
    """Evaluation batch k: the same rows at every evaluation, so losses are comparable across steps."""
    rng = np.random.default_rng([seed, stream.salt, 1, k])
    return _xy([stream.sample_row(rng, block_size) for _ in range(batch_size)])


def sequential_windows(stream: TokenStream, block_size: int, batch_size: int) -> Iterator[tuple]:
    """Windows [i*T, i*T + T] over the whole split, in order: every token after the first is a target once."""
    n = (len(stream) - 1) // block_size
    _room(stream, block_size)  # a split shorter than one window is refused
    for first in range(0, n, batch_size):
        starts = np.arange(first, min(first + batch_size, n)) * block_size
        yield _xy([(w[:-1], w[1:]) for w in (stream.window(int(i), block_size + 1) for i in starts)])
