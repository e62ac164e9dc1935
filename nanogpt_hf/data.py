"""Prepare a corpus into Arrow token datasets, and sample nanoGPT training windows from them.

Preparing (`python prepare.py [SOURCE] --tokenizer gpt2|char --out DIR`, or `prepare(PrepareSettings(...))`):

    corpus --load--> documents (one text column) --datasets.map(num_proc)--> ids per document --split--> DIR/

    SOURCE is "shakespeare" (the embedded Project Gutenberg corpus, works offline), a local file, folder or glob
    (.txt, .jsonl/.json, .parquet; a folder means every such file under it, in sorted order, skipping hidden files
    and folders, the output folder and prepared datasets), or a Hub dataset id (through datasets.load_dataset,
    optionally streaming).
    - .txt files: one document per file (nanoGPT's shakespeare treats its one file the same way); with
      --txt_documents=paragraph every blank-line-separated paragraph is a document (txt_paragraphs: GPT-2 drops the
      line breaks around it, char keeps them all, so its stream is the text as is). Text is read as UTF-8 with
      universal newlines ("\\r\\n" -> "\\n"), like Python's open() in nanoGPT's prepare.py.
    - GPT-2 BPE: tiktoken encode_ordinary per document (a literal "<|endoftext|>" in the text is ordinary text),
      then 50256 appended, as nanoGPT does. Character level: the vocabulary is sorted(set(corpus)), ids as in
      nanoGPT's shakespeare_char; documents are concatenated with nothing in between (there is no separator token).
    - Ids are stored as uint16 when the vocabulary fits (GPT-2 does), else uint32, a large_list (int64 offsets) per
      document.
    - Validation split (--val_split): "tail" keeps the last --val_fraction (default 0.1) of the token stream for
      val, cutting one document in two if needed (nanoGPT's shakespeare recipes); "random" holds out --val_fraction
      (default 0.0005) of the documents chosen with --seed 2357 before tokenizing, exactly nanoGPT's OpenWebText split;
      "auto" (default) uses random for corpora of at least --random_split_min_documents documents (100,000),
      tail below that. Streaming always uses a random split (a stream has no tail to measure).

    DIR holds dataset_dict.json, train/ and val/ (DatasetDict.save_to_disk, column "ids"), the tokenizer
    (save_pretrained: AutoTokenizer.from_pretrained(DIR) works) and meta.json (tokenizer kind, vocab_size, dtype,
    documents and tokens per split, source, fingerprint). Everything is written into a hidden temporary sibling and
    renamed into place at the end: an interrupted run leaves no folder that looks complete and never damages the
    previous one. A rerun whose input files and settings are unchanged (same fingerprint) returns at once.

Loading and sampling:

    TokenStream(DIR, "train") memory-maps the split and presents it as one concatenated token stream with no copy:
    one zero-copy numpy view per Arrow chunk plus cumulative offsets; a window that crosses chunks is glued from its
    pieces. sample_batch(stream, seed=, step=, index=, ...) is a pure function of its arguments (nanoGPT's random
    windows, x = w[:-1], y = w[1:]), so resuming needs no sampler state and any number of processes agree.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import hashlib
import itertools
import json
import logging
import lzma
import os
import shutil
import time
import zlib
from dataclasses import dataclass
from typing import Iterator, Literal

import numpy as np

from .errors import UserError
from .settings import parse_command, setting

META_FILE = "meta.json"
META_FORMAT = "nanogpt_hf.prepared"
META_VERSION = 1
EMBEDDED = "shakespeare"
EMBEDDED_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "shakespeare.jsonl.xz")
SPLITS = ("train", "val")
FILE_BUILDERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
MAP_BATCH = 1000  # documents per map batch (also the rows per Arrow record batch that save_to_disk writes)


@dataclass
class PrepareSettings:
    source: str = setting(
        EMBEDDED, "'shakespeare' (the embedded corpus), a .txt/.jsonl/.json/.parquet file, folder or glob, or a Hub id",
        path=True,
    )
    tokenizer: Literal["gpt2", "char"] = setting(
        "gpt2", "gpt2 (tiktoken BPE, EOT 50256 after each document) or char (vocabulary = the corpus's characters)"
    )
    out: str = setting("", "output folder; empty: data/<source name> (+ '_char' for the char tokenizer)", path=True)
    text_column: str = setting("text", "column holding the text (.jsonl/.json/.parquet and Hub datasets)")
    split: str = setting("train", "split of a Hub dataset to read (local files are one split)")
    subset: str = setting("", "configuration (subset) name of a Hub dataset, e.g. wikitext-103-raw-v1")
    txt_documents: Literal["file", "paragraph"] = setting(
        "file", ".txt files: one document per file, or one per blank-line-separated paragraph"
    )
    val_split: Literal["auto", "tail", "random"] = setting(
        "auto", "tail: last val_fraction of the tokens; random: val_fraction of the documents; auto: by corpus size"
    )
    val_fraction: float | None = setting(
        None, "fraction held out for val; none: 0.1 for tail, 0.0005 for random (nanoGPT's)"
    )
    random_split_min_documents: int = setting(
        100_000, "auto: corpora with at least this many documents get the random split, smaller ones the tail"
    )
    seed: int = setting(2357, "seed of the random split (nanoGPT's)")
    num_proc: int = setting(0, "tokenizing processes; 0: one per core (at most 8) above 32 MB of text, else 1")
    streaming: bool = setting(False, "read the source as a stream (corpora larger than the disk); random split")
    force: bool = setting(False, "prepare again even when the output is up to date")


# ----------------------------------------------------------------------------------------------------------------
# Reading the corpus


def _innermost(exc: BaseException) -> BaseException:
    """The innermost cause of an exception: datasets wraps the useful one in generic ones."""
    while exc.__cause__ is not None or (exc.__context__ is not None and not exc.__suppress_context__):
        exc = exc.__cause__ or exc.__context__
    return exc


def _reason(exc: BaseException) -> str:
    """The innermost cause of an exception, on one line."""
    exc = _innermost(exc)
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".strip(": ")


def _is_pattern(source: str) -> bool:
    return any(c in source for c in "*?[")


def _looks_like_path(source: str) -> bool:
    # Hub ids are 'name' or 'owner/name'; anything else that resembles a path is treated as one
    return (
        source.startswith((".", "/", "~"))
        or source.endswith(("/", os.sep))
        or source.count("/") > 1
        or os.sep != "/" and os.sep in source
        or os.path.splitext(source)[1].lower() in FILE_BUILDERS
        or _is_pattern(source)
    )


def _is_prepared(folder: str) -> bool:
    """Whether prepare.py wrote this folder (any version): its .json files are output, not corpus."""
    try:
        with open(os.path.join(folder, META_FILE), encoding="utf-8") as fh:
            return json.load(fh).get("format") == META_FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def _walk_corpus(folder: str, out: str | None) -> list[str]:
    """Files under `folder`, skipping hidden files and folders (.git, our temporary folders), the output folder and
    any prepared dataset: an output written inside the source must not be read back as corpus on the next run."""
    out = os.path.realpath(out) if out else None
    files = []
    for root, dirs, names in os.walk(folder):
        dirs[:] = [
            d for d in dirs
            if not d.startswith(".")
            and os.path.realpath(os.path.join(root, d)) != out
            and not _is_prepared(os.path.join(root, d))
        ]
        files += [os.path.join(root, f) for f in names if not f.startswith(".")]
    return sorted(files)


def _in_output(file: str, out: str | None) -> bool:
    """Whether a file matched by a glob lies in the output folder or in any prepared dataset (see _walk_corpus)."""
    folder = os.path.dirname(os.path.realpath(file))
    out = os.path.realpath(out) if out else None
    while True:
        if folder == out or _is_prepared(folder):
            return True
        parent = os.path.dirname(folder)
        if parent == folder:
            return False
        folder = parent


def local_files(source: str, out: str | None = None) -> list[str] | None:
    """The corpus files a local source names (sorted), None when it is not local, UserError when it is missing.

    out: the output folder, never read as corpus when it lies inside a source folder."""
    path = os.path.expanduser(source)
    if _is_pattern(path):
        files = sorted(f for f in glob.glob(path, recursive=True) if os.path.isfile(f) and not _in_output(f, out))
        what = f"files match '{source}'"
    elif os.path.isdir(path):
        if _is_prepared(path):
            raise UserError(f"'{source}' is a prepared dataset, not a corpus; train on it with --dataset={source}")
        files = [f for f in _walk_corpus(path, out) if os.path.splitext(f)[1].lower() in FILE_BUILDERS]
        what = f"files in folder '{source}'"
    elif os.path.isfile(path):
        files = [path]
        what = f"'{source}'"
    elif _looks_like_path(source):
        raise UserError(f"source '{source}' does not exist")
    else:
        return None
    if not files:
        raise UserError(f"no {what} (looked for {', '.join(FILE_BUILDERS)}); the corpus is empty")
    unsupported = [f for f in files if os.path.splitext(f)[1].lower() not in FILE_BUILDERS]
    if unsupported:
        raise UserError(f"cannot read '{unsupported[0]}': supported files are {', '.join(FILE_BUILDERS)}")
    return files


def source_name(source: str) -> str:
    """A folder name for the default output: data/<this>."""
    if source == EMBEDDED:
        return EMBEDDED
    if _is_pattern(source):
        source = source.split("*")[0].split("?")[0].split("[")[0] or "corpus"
    name = os.path.basename(os.path.abspath(os.path.expanduser(source)))  # abspath: '.' and '..' get a real name
    if os.path.exists(os.path.expanduser(source)) and os.path.isfile(os.path.expanduser(source)):
        name = os.path.splitext(name)[0]
    elif not _looks_like_path(source) and not os.path.exists(source):
        name = source.replace("/", "_")  # a Hub id
    return name or "corpus"


def load_embedded():
    """The shipped Shakespeare corpus: 42 Project Gutenberg works, columns title, source, text."""
    import datasets

    with lzma.open(EMBEDDED_PATH, "rt", encoding="utf-8") as fh:
        rows = [json.loads(line) for line in fh if line.strip()]
    return datasets.Dataset.from_list(rows)


def _paragraphs(lines: Iterator[str]) -> Iterator[str]:
    """Join lines into paragraphs, each with the blank lines that follow it: one ends where a line follows a blank."""
    paragraph: list[str] = []
    for line in lines:
        if line != "\n" and paragraph and paragraph[-1] == "\n":
            yield "".join(paragraph)
            paragraph = []
        paragraph.append(line)
    if paragraph:
        yield "".join(paragraph)


def txt_paragraphs(files: list[str], keep_breaks: bool) -> Iterator[dict]:
    """The blank-line-separated paragraphs of .txt files as documents, read a line at a time (files of any size).

    keep_breaks (the char tokenizer, which has no separator token): each paragraph keeps its line breaks and the
    blank lines after it, so the documents concatenate to the text as is, as in nanoGPT's char prep. Otherwise
    (GPT-2: the EOT separates documents) line breaks at either end are dropped. Text is UTF-8 with universal
    newlines, like open() in nanoGPT's prepare.py.
    """
    for path in files:
        with open(path, encoding="utf-8") as fh:
            for text in _paragraphs(fh):
                text = text if keep_breaks else text.strip("\n")
                if text:
                    yield {"text": text}


def load_paragraphs(files: list[str], keep_breaks: bool, path: str, streaming: bool):
    """txt_paragraphs as a Dataset written to the Arrow file `path` or, streaming, as an IterableDataset."""
    import datasets
    import pyarrow as pa
    from datasets.arrow_writer import ArrowWriter

    features = datasets.Features({"text": datasets.Value("string")})
    if streaming:
        return datasets.IterableDataset.from_generator(
            txt_paragraphs, features=features, gen_kwargs={"files": files, "keep_breaks": keep_breaks}
        )
    os.makedirs(os.path.dirname(path), exist_ok=True)
    documents = txt_paragraphs(files, keep_breaks)
    with ArrowWriter(features=features, path=path) as writer:  # in batches: 7x faster than Dataset.from_generator
        while batch := [d["text"] for d in itertools.islice(documents, MAP_BATCH)]:
            writer.write_table(pa.table({"text": batch}))
        writer.finalize()
    return datasets.Dataset.from_file(path)


@contextlib.contextmanager
def _quiet_datasets():
    """datasets' parsers log the traceback of a bad file before raising it: we report it on one line instead."""
    logger = logging.getLogger("datasets")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def whole_txt_files(files: list[str] | None, cfg: PrepareSettings) -> bool:
    """Whether .txt files are read one document per file (--txt_documents=paragraph reads any size)."""
    txt = any(FILE_BUILDERS[os.path.splitext(f)[1].lower()] == "text" for f in files or [])
    return txt and cfg.txt_documents == "file"


def read_error(what: str, exc: Exception, whole_txt: bool) -> UserError:
    """A corpus that cannot be read, on one line: which and why, and the fix when we know it."""
    import pyarrow as pa

    if isinstance(_innermost(exc), pa.ArrowCapacityError):  # one Arrow string holds at most 2 GiB
        fix = "split it into smaller files" + (" or use --txt_documents=paragraph" if whole_txt else "")
        return UserError(f"could not read {what}: it holds a document over 2 GiB, more than Arrow can; {fix}")
    text = str(_innermost(exc))
    if "column names don't match" in text:  # datasets' CastError: "Couldn't cast\n<a file's columns>\nto\n..."
        lines = text.splitlines()
        found = [line.split(":")[0] for line in lines[1:lines.index("to")]] if "to" in lines else []
        return UserError(f"could not read {what}: its files do not all have the same columns (one has: "
                         f"{', '.join(found) or '?'}); give them the same columns, or prepare them separately")
    return UserError(f"could not read {what}: {_reason(exc)}")


def load_local(files: list[str], cfg: PrepareSettings, cache_dir: str, streaming: bool = False):
    """Files -> one Dataset, in sorted file order; runs of files of one format are read by one datasets builder
    (.txt paragraphs by txt_paragraphs)."""
    import datasets

    parts = []
    for builder, group in itertools.groupby(files, key=lambda f: FILE_BUILDERS[os.path.splitext(f)[1].lower()]):
        group = list(group)
        if builder == "json" and all(os.path.getsize(f) == 0 for f in group):  # datasets says only StopIteration
            raise UserError(f"the corpus file {group[0]} is empty")
        kwargs = {"sample_by": "document"} if builder == "text" else {}  # .txt: one document per file
        try:
            with _quiet_datasets():
                if builder == "text" and cfg.txt_documents == "paragraph":
                    path = os.path.join(cache_dir, f"paragraphs-{len(parts)}.arrow")
                    ds = load_paragraphs(group, cfg.tokenizer == "char", path, streaming)
                else:
                    ds = datasets.load_dataset(
                        builder, data_files=group, split="train", cache_dir=cache_dir, streaming=streaming, **kwargs
                    )
        except Exception as exc:  # a user's file that does not parse: say which and why, no traceback
            others = " (or another of its group)" if len(group) > 1 else ""
            raise read_error(f"{group[0]}{others}", exc, whole_txt_files(group, cfg)) from None
        parts.append(ds)
    if len(parts) == 1:
        return parts[0]
    columns = [set(p.column_names or []) for p in parts]
    common = set.intersection(*columns) if all(columns) else set()
    if cfg.text_column not in common:
        raise UserError(f"files of different formats must all have the text column '{cfg.text_column}'")
    parts = [p.select_columns([cfg.text_column]) for p in parts]
    if len({str(p.features[cfg.text_column]) for p in parts if p.features}) > 1:
        # e.g. pandas writes large_string text to parquet, the json and text builders string: concatenate refuses
        parts = [p.cast_column(cfg.text_column, datasets.Value("large_string")) for p in parts]
    return datasets.concatenate_datasets(parts)


def load_hub(cfg: PrepareSettings):
    import datasets

    try:
        return datasets.load_dataset(cfg.source, cfg.subset or None, split=cfg.split, streaming=cfg.streaming)
    except Exception as exc:
        offline = " (offline: HF_HUB_OFFLINE is set)" if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "") else ""
        raise UserError(
            f"'{cfg.source}' is not a local path and could not be loaded as a Hub dataset{offline}: {_reason(exc)}"
        ) from None


def missing_column(column: str, columns) -> UserError:
    return UserError(f"text column '{column}' does not exist; available columns: {', '.join(columns) or 'none'}")


def text_column_of(ds, cfg: PrepareSettings) -> None:
    """Check the text column exists and holds strings; name the available columns when it does not."""
    columns = list(ds.column_names or [])
    if cfg.text_column not in columns:
        raise missing_column(cfg.text_column, columns)
    feature = ds.features[cfg.text_column] if ds.features else None
    dtype = getattr(feature, "dtype", None)
    if feature is not None and dtype not in ("string", "large_string"):
        what = dtype or type(feature).__name__
        raise UserError(f"column '{cfg.text_column}' holds {what}, not text; pick another --text_column")


# ----------------------------------------------------------------------------------------------------------------
# Tokenizing (runs inside datasets.map, possibly in worker processes: module-level functions, arguments pickled)


def _texts(batch, column: str) -> list[str]:
    return [t or "" for t in batch.column(column).to_pylist()]  # a missing text is an empty document


def list_offsets(lengths: list[int]) -> np.ndarray:
    """Arrow list offsets, int64: a map batch of long documents may hold more than 2**31 tokens, where int32
    offsets would wrap without an error."""
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return offsets


def _list_table(lengths: list[int], values):
    """One row of ids per document, as large_list (int64 offsets)."""
    import pyarrow as pa

    return pa.table({"ids": pa.LargeListArray.from_arrays(list_offsets(lengths), values)})


def tokenize_gpt2(batch, column: str, dtype: str, num_threads: int):
    """Arrow batch of texts -> Arrow batch of ids: encode_ordinary + EOT, like nanoGPT's process()."""
    from .tokenization import GPT2_EOT, gpt2_encoding

    docs = gpt2_encoding().encode_ordinary_batch(_texts(batch, column), num_threads=num_threads)
    for ids in docs:
        ids.append(GPT2_EOT)
    lengths = [len(ids) for ids in docs]
    values = np.fromiter(itertools.chain.from_iterable(docs), dtype=dtype, count=sum(lengths))
    return _list_table(lengths, values)


def tokenize_chars(batch, column: str, dtype: str, lut: np.ndarray):
    """Arrow batch of texts -> ids via a code point -> id table (every character of the corpus is in it)."""
    texts = _texts(batch, column)
    codepoints = np.frombuffer("".join(texts).encode("utf-32-le"), dtype=np.uint32)
    return _list_table([len(t) for t in texts], lut[codepoints].astype(dtype))


def corpus_chars(ds, column: str) -> list[str]:
    """sorted(set(corpus)), one pass over the text."""
    from tqdm.auto import tqdm

    chars: set[str] = set()
    batches = ds.with_format("arrow").iter(batch_size=MAP_BATCH)
    for batch in tqdm(batches, desc="Collecting characters", total=-(-ds.num_rows // MAP_BATCH)):
        chars.update("".join(_texts(batch, column)))
    return sorted(chars)


def char_lut(chars: list[str]) -> np.ndarray:
    lut = np.zeros(ord(max(chars)) + 1, dtype=np.uint32)
    lut[[ord(c) for c in chars]] = np.arange(len(chars), dtype=np.uint32)
    return lut


def ids_dtype(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


def ids_features(dtype: str):
    import datasets

    return datasets.Features({"ids": datasets.LargeList(datasets.Value(dtype))})  # int64 offsets, see _list_table


def row_lengths(ds) -> np.ndarray:
    """Tokens per document from the Arrow list offsets: no ids are read."""
    chunks = ds.data.column("ids").chunks
    lengths = [np.diff(c.offsets.to_numpy()) for c in chunks]
    return np.concatenate(lengths) if lengths else np.zeros(0, dtype=np.int64)


# ----------------------------------------------------------------------------------------------------------------
# Splitting


def tail_split(ds, fraction: float):
    """Last `fraction` of the token stream -> val; the document holding the cut is split in two (nanoGPT's 90/10)."""
    import datasets
    import pyarrow.compute as pc

    lengths = row_lengths(ds)
    ends = np.cumsum(lengths)  # (docs,) token offset where each document ends
    total = int(ends[-1])
    cut = total - max(1, int(round(total * fraction)))  # first val token
    k = int(np.searchsorted(ends, cut, side="right"))  # the document holding token `cut`
    head = cut - (int(ends[k - 1]) if k else 0)  # its tokens that stay in train
    # its ids as an Arrow view of the mapped file: a Python list of a one-file corpus would take 40 bytes a token
    row = pc.list_flatten(ds.data.column("ids").slice(k, 1)).combine_chunks()

    def one_document(ids):
        return datasets.Dataset(_list_table([len(ids)], ids))

    train_parts = [ds.select(range(k))] if k else []
    val_parts = [one_document(row[head:])]
    if head:
        train_parts.append(one_document(row[:head]))
    if k + 1 < len(ds):
        val_parts.append(ds.select(range(k + 1, len(ds))))
    if not train_parts:
        raise UserError(f"the corpus is too small to hold out a val split ({total} tokens)")
    return datasets.concatenate_datasets(train_parts), datasets.concatenate_datasets(val_parts)


def split_rule(cfg: PrepareSettings, documents: int | None) -> tuple[str, float]:
    rule = cfg.val_split
    if cfg.streaming:
        rule = "random"
    elif rule == "auto":
        rule = "random" if documents is not None and documents >= cfg.random_split_min_documents else "tail"
    fraction = cfg.val_fraction if cfg.val_fraction is not None else (0.1 if rule == "tail" else 0.0005)
    if not 0 < fraction < 1:
        raise UserError(f"val_fraction must be between 0 and 1 (exclusive); got {fraction}")
    return rule, fraction


# ----------------------------------------------------------------------------------------------------------------
# Fingerprint, meta.json, atomic output


def _sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def input_fingerprint(cfg: PrepareSettings, files: list[str] | None, dataset_fingerprint: str | None = None) -> str:
    """Hash of what the output depends on: the settings that change tokens, and the input's identity.

    Local files are identified by path, size and modification time (as make does), so the check is instant even
    for a large corpus; the embedded corpus by its hash; a Hub dataset by the fingerprint datasets gives it.
    """
    relevant = dataclasses.asdict(cfg)
    for key in ("out", "num_proc", "force"):
        relevant.pop(key)
    if files is None and cfg.source == EMBEDDED:
        identity = ["embedded", _sha256_file(EMBEDDED_PATH)]
    elif files is not None:
        identity = [[os.path.abspath(f), os.stat(f).st_size, os.stat(f).st_mtime_ns] for f in files]
    else:
        identity = ["hub", dataset_fingerprint]
    # the code that reads the input, where it changed what it produces: outputs of the old code are prepared again
    if cfg.txt_documents == "paragraph":
        identity.append("paragraphs-v2")  # v1 (datasets' reader) dropped the blank lines between char paragraphs
    payload = json.dumps([META_FORMAT, META_VERSION, relevant, identity], sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def read_meta(path: str) -> dict:
    """meta.json of a prepared folder; UserError when the folder is missing or not (completely) prepared."""
    meta_path = os.path.join(path, META_FILE)
    if os.path.exists(path) and not os.path.isfile(meta_path):  # a corpus file or folder (prepare writes atomically)
        stem = os.path.splitext(os.path.basename(os.path.normpath(path)))[0]
        out = f"data/{stem}"
        if os.path.realpath(path).startswith(os.path.realpath(out)):  # prepare never writes over its input
            out += "_prepared"
        raise UserError(f"'{path}' is not a prepared dataset (no {META_FILE}); prepare it first: python prepare.py "
                        f"{path} --out={out}, then use {out}")
    if not os.path.isdir(path):
        raise UserError(f"dataset folder '{path}' does not exist; run prepare.py to create it")
    try:
        with open(meta_path, encoding="utf-8") as fh:
            meta = json.load(fh)
    except (OSError, ValueError) as exc:
        raise UserError(f"{meta_path} cannot be read ({exc}); prepare the dataset again with --force") from None
    if meta.get("format") != META_FORMAT or meta.get("version") != META_VERSION:
        raise UserError(f"'{path}' was prepared by an incompatible version; prepare it again with --force")
    return meta


def _up_to_date(out: str, fingerprint: str) -> bool:
    try:
        meta = read_meta(out)
    except UserError:
        return False
    return meta.get("fingerprint") == fingerprint and all(os.path.isdir(os.path.join(out, s)) for s in SPLITS)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale_work(out: str) -> None:
    """Delete temporary siblings left by runs that were killed (their process is gone)."""
    parent, base = os.path.split(os.path.abspath(out))
    for path in glob.glob(os.path.join(parent, f".{glob.escape(base)}.*-*")):
        pid = path.rsplit("-", 1)[-1]
        if pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)


def _check_out(out: str) -> None:
    """Refuse to replace a folder that is not ours: --out=. must never wipe a project."""
    if os.path.isfile(out):
        raise UserError(f"output '{out}' is a file; choose a folder with --out")
    if os.path.isdir(out) and os.listdir(out) and not os.path.isfile(os.path.join(out, META_FILE)):
        raise UserError(f"output folder '{out}' exists and is not a prepared dataset; choose another --out or empty it")


def _install(tmp_out: str, out: str) -> None:
    """Move the finished folder into place; the old one is moved aside first and deleted only after."""
    parent, base = os.path.split(os.path.abspath(out))
    old = os.path.join(parent, f".{base}.old-{os.getpid()}")
    if os.path.exists(out):
        os.rename(out, old)
    os.rename(tmp_out, out)
    shutil.rmtree(old, ignore_errors=True)


def _du(path: str) -> int:
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)


def _human(n: float, unit: str = "B") -> str:
    for prefix in ("", "K", "M", "G", "T"):
        if abs(n) < 1000 or prefix == "T":
            return f"{n:.1f} {prefix}{unit}" if prefix else f"{n:.0f} {unit}"
        n /= 1000
    return str(n)


# ----------------------------------------------------------------------------------------------------------------
# prepare()


def default_out(cfg: PrepareSettings) -> str:
    return cfg.out or os.path.join("data", source_name(cfg.source) + ("_char" if cfg.tokenizer == "char" else ""))


def _num_proc(cfg: PrepareSettings, ds) -> int:
    if cfg.num_proc < 0:
        raise UserError(f"num_proc must be 0 (auto) or positive; got {cfg.num_proc}")
    if cfg.num_proc:
        return max(1, min(cfg.num_proc, ds.num_rows))
    big = ds.data.nbytes > 32 * 2**20  # below this, starting processes costs more than it saves
    return max(1, min(os.cpu_count() or 1, 8, ds.num_rows)) if big else 1


def _tokenizer_for(cfg: PrepareSettings, chars: list[str] | None):
    from .tokenization import char_tokenizer_from_stoi, gpt2_tokenizer

    if cfg.tokenizer == "gpt2":
        return gpt2_tokenizer()
    return char_tokenizer_from_stoi({c: i for i, c in enumerate(chars)})


def _map_kwargs(cfg: PrepareSettings, chars: list[str] | None, num_proc: int) -> tuple:
    """(function, fn_kwargs, vocab_size, dtype) of the tokenizing map."""
    if cfg.tokenizer == "gpt2":
        from .tokenization import GPT2_VOCAB_SIZE

        dtype = ids_dtype(GPT2_VOCAB_SIZE)
        threads = max(1, (os.cpu_count() or 1) // num_proc)  # tiktoken releases the GIL: use the spare cores
        fn_kwargs = {"column": cfg.text_column, "dtype": dtype, "num_threads": threads}
        return tokenize_gpt2, fn_kwargs, GPT2_VOCAB_SIZE, dtype
    dtype = ids_dtype(len(chars))
    return tokenize_chars, {"column": cfg.text_column, "dtype": dtype, "lut": char_lut(chars)}, len(chars), dtype


def _tokenize(ds, cfg, fn, fn_kwargs, features, num_proc, cache_dir, name, fingerprint):
    return ds.with_format("arrow").map(
        fn,
        fn_kwargs=fn_kwargs,
        batched=True,
        batch_size=MAP_BATCH,
        num_proc=num_proc if num_proc > 1 else None,
        remove_columns=ds.column_names,
        features=features,
        cache_file_name=os.path.join(cache_dir, f"tokens-{name}.arrow"),
        new_fingerprint=f"{fingerprint}-{name}",
        desc=f"Tokenizing {name} ({cfg.tokenizer}, num_proc={num_proc})",
    ).with_format(None)


def _check_not_empty(cfg: PrepareSettings, parts) -> None:
    eots = sum(d.num_rows for d in parts) if cfg.tokenizer == "gpt2" else 0
    if sum(int(row_lengths(d).sum()) for d in parts) <= eots:  # nothing but the appended EOTs
        raise UserError(f"the corpus '{cfg.source}' is empty (its documents hold no text)")


def _prepare_in_memory(cfg, files, work, fingerprint_fn):
    """Load, tokenize and split a (memory-mapped) Dataset. Returns (DatasetDict, vocab info, fingerprint)."""
    import datasets

    cache_dir = os.path.join(work, "cache")
    if files is not None:
        ds = load_local(files, cfg, cache_dir)
    elif cfg.source == EMBEDDED:
        ds = load_embedded()
    else:
        ds = load_hub(cfg)
    text_column_of(ds, cfg)
    fingerprint = fingerprint_fn(ds)
    if ds.num_rows == 0:
        raise UserError(f"the corpus '{cfg.source}' holds no documents")
    ds = ds.select_columns([cfg.text_column])
    chars = corpus_chars(ds, cfg.text_column) if cfg.tokenizer == "char" else None
    if chars == []:
        raise UserError(f"the corpus '{cfg.source}' is empty (its documents hold no text)")
    num_proc = _num_proc(cfg, ds)
    fn, fn_kwargs, vocab_size, dtype = _map_kwargs(cfg, chars, num_proc)
    features = ids_features(dtype)
    rule, fraction = split_rule(cfg, ds.num_rows)

    def tokenize(d, name):
        return _tokenize(d, cfg, fn, fn_kwargs, features, num_proc, cache_dir, name, fingerprint)

    if rule == "random":
        # nanoGPT splits the documents first (test_size, seed 2357, shuffled), then tokenizes each split
        try:
            parts = ds.train_test_split(test_size=fraction, seed=cfg.seed, shuffle=True)
        except ValueError as exc:
            msg = f"cannot hold out {fraction} of {ds.num_rows} documents ({exc}); use --val_split=tail"
            raise UserError(msg) from None
        splits = {"train": parts["train"].flatten_indices(), "val": parts["test"].flatten_indices()}
        splits = {k: tokenize(v, k) for k, v in splits.items()}
    else:
        tokens = tokenize(ds, "all")
        _check_not_empty(cfg, [tokens])
        train, val = tail_split(tokens, fraction)
        splits = {"train": train, "val": val}
    _check_not_empty(cfg, list(splits.values()))
    return datasets.DatasetDict(splits), chars, vocab_size, dtype, (rule, fraction), fingerprint


def _prepare_streaming(cfg, files, work):
    """Stream documents, tokenize batch by batch, write train with an ArrowWriter; val (small) is kept in memory."""
    import datasets
    from datasets.arrow_writer import ArrowWriter
    from tqdm.auto import tqdm

    cache_dir = os.path.join(work, "cache")
    os.makedirs(cache_dir, exist_ok=True)
    if files is not None:
        stream = load_local(files, cfg, cache_dir, streaming=True)
    elif cfg.source == EMBEDDED:
        stream = load_embedded().to_iterable_dataset()
    else:
        stream = load_hub(cfg)
    if cfg.text_column not in (stream.column_names or [cfg.text_column]):
        raise missing_column(cfg.text_column, stream.column_names)

    def batches():
        import pyarrow as pa

        it = iter(stream)
        while True:
            try:
                with _quiet_datasets():
                    batch = list(itertools.islice(it, MAP_BATCH))  # reading is lazy: a bad file fails only here
            except Exception as exc:
                raise read_error(cfg.source, exc, whole_txt_files(files, cfg)) from None
            if not batch:
                return
            if cfg.text_column not in batch[0]:  # a stream may not know its columns before the first row
                raise missing_column(cfg.text_column, batch[0])
            value = next((row[cfg.text_column] for row in batch if row[cfg.text_column] is not None), "")
            if not isinstance(value, str):  # nor their types
                raise UserError(f"column '{cfg.text_column}' holds {type(value).__name__}, not text; "
                                "pick another --text_column")
            yield pa.table({cfg.text_column: [row[cfg.text_column] for row in batch]})

    chars = None
    if cfg.tokenizer == "char":  # the vocabulary needs a first pass over the stream
        found: set[str] = set()
        for batch in tqdm(batches(), desc="Collecting characters (stream)"):
            found.update("".join(_texts(batch, cfg.text_column)))
        chars = sorted(found)
        if not chars:
            raise UserError(f"the corpus '{cfg.source}' is empty (its documents hold no text)")
    fn, fn_kwargs, vocab_size, dtype = _map_kwargs(cfg, chars, 1)
    features = ids_features(dtype)
    _, fraction = split_rule(cfg, None)
    rng = np.random.default_rng(cfg.seed)  # one uniform per document in stream order: the same split every run
    train_path = os.path.join(cache_dir, "train.arrow")
    val_rows = []
    with ArrowWriter(features=features, path=train_path) as writer:
        for batch in tqdm(batches(), desc=f"Tokenizing stream ({cfg.tokenizer})", unit="batch"):
            table = fn(batch, **fn_kwargs)
            is_val = rng.random(table.num_rows) < fraction
            val_rows += [table.slice(i, 1) for i in np.flatnonzero(is_val)]
            writer.write_table(table.filter(~is_val).cast(features.arrow_schema))
        writer.finalize()
    train = datasets.Dataset.from_file(train_path)
    documents = train.num_rows + len(val_rows)
    if documents == 0:
        raise UserError(f"the corpus '{cfg.source}' holds no documents")
    import pyarrow as pa

    if val_rows:
        val = datasets.Dataset(pa.concat_tables(val_rows).cast(features.arrow_schema))
    else:  # a tiny stream: hold out its last document rather than nothing
        train, val = train.select(range(train.num_rows - 1)), train.select([train.num_rows - 1])
    if train.num_rows == 0:
        raise UserError(
            f"the stream '{cfg.source}' holds {documents} document(s), too few for a train and a val split; "
            "prepare it without --streaming (the tail split cuts a document in two)"
        )
    _check_not_empty(cfg, [train, val])
    return datasets.DatasetDict({"train": train, "val": val}), chars, vocab_size, dtype, ("random", fraction)


def prepare(cfg: PrepareSettings) -> str:
    """Prepare `cfg.source` into `cfg.out` (or the default folder) unless it is up to date; returns the folder."""
    out = default_out(cfg)
    if cfg.tokenizer not in ("gpt2", "char"):
        raise UserError(f"tokenizer must be gpt2 or char; got {cfg.tokenizer!r}")
    split_rule(cfg, None)  # validate val_fraction before any work
    files = None if cfg.source == EMBEDDED else local_files(cfg.source, out)
    if cfg.source == EMBEDDED and os.path.exists(EMBEDDED):  # the name stays the corpus train.py's default uses
        print(f"'{EMBEDDED}' is the embedded corpus; for the local '{EMBEDDED}', pass ./{EMBEDDED}")
    target = os.path.realpath(out)  # a symlinked out: the folder it points to is replaced, the link stays
    inside = [f for f in files or [] if os.path.realpath(f).startswith(target + os.sep)]
    if inside:  # the new dataset replaces the whole folder: the input would be deleted with the old one
        raise UserError(f"output folder '{out}' holds the input '{inside[0]}'; choose another --out")
    _check_out(out)
    hub = files is None and cfg.source != EMBEDDED
    if not hub:
        fingerprint = input_fingerprint(cfg, files)
        if not cfg.force and _up_to_date(out, fingerprint):
            print(f"{out} is up to date (fingerprint {fingerprint}); nothing to do (--force prepares it again)")
            return out
    _remove_stale_work(target)
    parent, base = os.path.split(target)
    work = os.path.join(parent, f".{base}.tmp-{os.getpid()}")
    shutil.rmtree(work, ignore_errors=True)
    try:
        os.makedirs(work)
    except OSError as exc:  # a file where a folder of the path should be, no permission, a read-only disk
        blocker = parent
        while blocker and not os.path.exists(blocker):
            blocker = os.path.dirname(blocker)
        what = f"'{blocker}' is a file" if os.path.isfile(blocker) else exc.strerror
        raise UserError(f"cannot create the output folder '{out}': {what}; choose another --out") from None
    t0 = time.time()
    try:
        if cfg.streaming:
            dd, chars, vocab_size, dtype, rule = _prepare_streaming(cfg, files, work)
            fingerprint = input_fingerprint(cfg, files, "stream-" + hashlib.sha256(cfg.source.encode()).hexdigest())
        else:
            def fp_fn(ds):  # a Hub dataset is known by the fingerprint datasets gives it once loaded
                return input_fingerprint(cfg, files, getattr(ds, "_fingerprint", None)) if hub else fingerprint

            dd, chars, vocab_size, dtype, rule, fingerprint = _prepare_in_memory(cfg, files, work, fp_fn)
            if hub and not cfg.force and _up_to_date(out, fingerprint):
                print(f"{out} is up to date (fingerprint {fingerprint}); nothing to do (--force prepares it again)")
                return out
        tmp_out = os.path.join(work, "out")
        dd.save_to_disk(tmp_out)
        _tokenizer_for(cfg, chars).save_pretrained(tmp_out)
        stats = {name: {"documents": ds.num_rows, "tokens": int(row_lengths(ds).sum())} for name, ds in dd.items()}
        meta = {
            "format": META_FORMAT,
            "version": META_VERSION,
            "tokenizer": cfg.tokenizer,
            "vocab_size": vocab_size,
            "dtype": dtype,
            "eot_token": 50256 if cfg.tokenizer == "gpt2" else None,
            "splits": stats,
            "val_split": {"rule": rule[0], "fraction": rule[1], "seed": cfg.seed},
            "source": cfg.source,
            "fingerprint": fingerprint,
            "settings": dataclasses.asdict(cfg),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "seconds": round(time.time() - t0, 3),
        }
        with open(os.path.join(tmp_out, META_FILE), "w", encoding="utf-8") as fh:  # written last: marks completion
            json.dump(meta, fh, indent=2)
        del dd  # release memory maps of the work files before deleting them
        _install(tmp_out, target)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    _summary(out, meta, time.time() - t0)
    return out


def _summary(out: str, meta: dict, seconds: float) -> None:
    total = sum(s["tokens"] for s in meta["splits"].values())
    rule = meta["val_split"]
    print(f"prepared {meta['source']} -> {out} ({meta['tokenizer']}, vocab {meta['vocab_size']}, {meta['dtype']})")
    for name, s in meta["splits"].items():  # the tail split's cut document is counted in both: no total of documents
        print(f"  {name:5s} {s['documents']:>12,} documents {s['tokens']:>15,} tokens")
    print(
        f"  {total:,} tokens in {seconds:.1f} s ({_human(total / max(seconds, 1e-9), 'tokens/s')}); "
        f"val: {rule['rule']} {rule['fraction']}; {_human(_du(out))} on disk"
    )


def main(argv: list[str] | None = None) -> int:
    cfg, _ = parse_command(
        PrepareSettings,
        argv,
        prog="prepare.py",
        description="Tokenize a corpus into train/val Arrow datasets (plus tokenizer and meta.json) for training.",
        positional="source",
        epilog="examples:\n"
        "  python prepare.py --tokenizer=char                    # embedded Shakespeare -> data/shakespeare_char\n"
        "  python prepare.py my_texts/ --out=data/mine           # every .txt/.jsonl/.json/.parquet under my_texts/\n"
        "  python prepare.py Skylion007/openwebtext --num_proc=8  # a Hub dataset (needs the network)",
    )
    prepare(cfg)
    return 0


# ----------------------------------------------------------------------------------------------------------------
# Loading: a split as one token stream, zero-copy


class TokenStream:
    """One split of a prepared dataset as a single concatenated token stream, memory-mapped, never copied whole.

    Arrow stores the split as many record batches (chunks); each chunk's ids are a zero-copy numpy view into the
    mapped file. offsets[i] is the stream position where chunk i starts; searchsorted finds a window's chunk.
    """

    def __init__(self, path: str, split: str = "train"):
        import datasets

        self.meta = read_meta(path)
        if split not in self.meta["splits"]:
            raise UserError(f"'{path}' has no split '{split}'; it has {', '.join(self.meta['splits'])}")
        self.path, self.split = path, split
        self._dataset = datasets.load_from_disk(os.path.join(path, split))  # keeps the memory maps alive
        self.chunks = [c.flatten().to_numpy(zero_copy_only=True) for c in self._dataset.data.column("ids").chunks]
        self.chunks = [c for c in self.chunks if len(c)]
        lengths = np.array([len(c) for c in self.chunks], dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(lengths)])  # (chunks + 1,)
        self.salt = zlib.crc32(split.encode())  # train and val draw different windows from the same seed

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def window(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start + length) of the stream: a view when inside one chunk, else a small copy."""
        if start < 0 or start + length > len(self):
            raise IndexError(f"window [{start}, {start + length}) outside the {len(self)}-token stream")
        i = int(np.searchsorted(self.offsets, start, side="right")) - 1
        lo = start - int(self.offsets[i])
        if lo + length <= len(self.chunks[i]):
            return self.chunks[i][lo : lo + length]
        pieces = []
        while length > 0:
            piece = self.chunks[i][lo : lo + length]
            pieces.append(piece)
            length -= len(piece)
            i, lo = i + 1, 0
        return np.concatenate(pieces)

    def windows(self, starts: np.ndarray, length: int) -> np.ndarray:
        """(len(starts), length) int64 array of the windows at `starts`."""
        out = np.empty((len(starts), length), dtype=np.int64)
        for row, start in enumerate(starts):
            out[row] = self.window(int(start), length)
        return out


@dataclass
class PreparedData:
    """A validated prepared folder: meta, streams per split, its tokenizer."""

    path: str
    meta: dict

    @property
    def vocab_size(self) -> int:
        return int(self.meta["vocab_size"])

    @property
    def tokenizer_kind(self) -> str:
        return self.meta["tokenizer"]

    def stream(self, split: str) -> TokenStream:
        return TokenStream(self.path, split)

    def tokenizer(self):
        from .tokenization import load_tokenizer

        return load_tokenizer(self.path)


def open_dataset(path: str, tokenizer_kind: str | None = None) -> PreparedData:
    """Open a prepared folder; UserError if it is missing, incomplete, or prepared with another tokenizer."""
    meta = read_meta(path)
    missing = [s for s in SPLITS if not os.path.isdir(os.path.join(path, s))]
    if missing:
        raise UserError(f"'{path}' lacks the {missing[0]} split; prepare it again with --force")
    if tokenizer_kind is not None and meta["tokenizer"] != tokenizer_kind:
        raise UserError(
            f"'{path}' was prepared with the {meta['tokenizer']} tokenizer but {tokenizer_kind} is expected; "
            f"prepare it with --tokenizer={tokenizer_kind} or choose another dataset"
        )
    return PreparedData(path, meta)


def check_compatible(meta, model_vocab_size: int, block_size: int, tokenizer_kind: str | None = None,
                     vocab_fix: str = "set --vocab_size={needed} or more") -> None:
    """Training-start checks: the model can embed every id, each split holds one window, the tokenizer matches.
    vocab_fix: what the caller's user can do about a dataset vocabulary too large for the model."""
    meta = meta.meta if isinstance(meta, (PreparedData, TokenStream)) else meta
    where = meta.get("source", "the dataset")
    if tokenizer_kind is not None and meta["tokenizer"] != tokenizer_kind:
        raise UserError(
            f"the dataset ({where}) was prepared with the {meta['tokenizer']} tokenizer; the model uses {tokenizer_kind}"
        )
    if meta["vocab_size"] > model_vocab_size:
        raise UserError(
            f"the dataset's vocabulary ({meta['vocab_size']} tokens) is larger than the model's vocab_size "
            f"({model_vocab_size}); {vocab_fix.format(needed=meta['vocab_size'])}"
        )
    for name, split in meta["splits"].items():
        if split["tokens"] < block_size + 1:
            raise UserError(
                f"the {name} split has {split['tokens']} tokens, fewer than block_size + 1 = {block_size + 1}; "
                "use a smaller block_size or more data"
            )


# ----------------------------------------------------------------------------------------------------------------
# Batches: pure functions of their arguments

_TRAIN, _EVAL = 0, 1  # keep training and evaluation draws in separate random streams


def _check_fits(stream: TokenStream, block_size: int) -> None:
    if len(stream) < block_size + 1:
        n = len(stream)
        raise UserError(f"the {stream.split} split has {n} tokens, fewer than block_size + 1 = {block_size + 1}")


def _xy(stream: TokenStream, rng: np.random.Generator, batch_size: int, block_size: int):
    import torch

    _check_fits(stream, block_size)
    starts = rng.integers(0, len(stream) - block_size, size=batch_size)  # nanoGPT: randint(len(data) - block_size)
    w = stream.windows(starts, block_size + 1)  # (B, T+1)
    return torch.from_numpy(w[:, :-1].copy()), torch.from_numpy(w[:, 1:].copy())  # (B, T), (B, T) int64


def sample_batch(stream: TokenStream, *, seed: int, step: int, index: int, batch_size: int, block_size: int):
    """Random training windows for micro-batch `index` of optimizer step `step`: the same arguments, the same batch.

    The training loop passes the GLOBAL micro-batch index (rank r at accumulation micro-step j of G/W: j*W + r), so
    one process accumulating G micro-batches sees exactly the batches of W processes doing G/W each.
    """
    rng = np.random.default_rng([seed, stream.salt, _TRAIN, step, index])
    return _xy(stream, rng, batch_size, block_size)


def eval_batch(stream: TokenStream, *, seed: int, k: int, batch_size: int, block_size: int):
    """Evaluation batch k: the same windows at every evaluation, so losses are comparable across steps."""
    rng = np.random.default_rng([seed, stream.salt, _EVAL, k])
    return _xy(stream, rng, batch_size, block_size)


def sequential_windows(stream: TokenStream, block_size: int, batch_size: int) -> Iterator[tuple]:
    """Non-overlapping windows over the whole split, in order: every token after the first is a target exactly once.

    Window i holds tokens [i*T, i*T + T]; consecutive windows share one token (the last target is the next input).
    The last batch may be smaller; a tail shorter than a window is not evaluated.
    """
    import torch

    _check_fits(stream, block_size)
    n = (len(stream) - 1) // block_size
    for first in range(0, n, batch_size):
        starts = np.arange(first, min(first + batch_size, n), dtype=np.int64) * block_size
        w = stream.windows(starts, block_size + 1)  # (b, T+1)
        yield torch.from_numpy(w[:, :-1].copy()), torch.from_numpy(w[:, 1:].copy())

