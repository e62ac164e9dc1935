"""Data benchmark: prepare throughput vs plain tiktoken, loader latency, and memory while sampling 1B+ tokens.

    python benchmarks/bench_data.py            # ~100 MB corpus, 1.07 B-token split (needs ~2.5 GB free disk)
    python benchmarks/bench_data.py --quick    # ~10 MB corpus, 100 M-token split

Everything is generated into a temporary folder (--tmp, default the system's) and deleted at the end.
Targets (issue #3): prepare >= 70% of the tiktoken ceiling per process; a 12 x 1024 batch in <= 1 ms median;
anonymous memory growth <= 100 MB while sampling, whatever the split's size.
"""

from __future__ import annotations

import argparse
import json
import lzma
import os
import shutil
import statistics
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from nanogpt_hf.data import EMBEDDED_PATH, PrepareSettings, TokenStream, ids_features, prepare, sample_batch  # noqa: E402
from nanogpt_hf.tokenization import gpt2_encoding  # noqa: E402


def rss_anon_mb() -> float:
    """Resident anonymous memory (heap, not the page cache of memory-mapped files), from /proc/self/status."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def english_like_corpus(folder: str, target_bytes: int, seed: int = 0) -> list[str]:
    """Documents of Shakespeare's words drawn by their frequency, with lines and paragraphs; written as .jsonl."""
    with lzma.open(EMBEDDED_PATH, "rt", encoding="utf-8") as fh:
        words = np.array(" ".join(json.loads(line)["text"] for line in fh).split())
    rng = np.random.default_rng(seed)
    docs, size = [], 0
    while size < target_bytes:
        n = int(rng.integers(200, 2000))  # words per document: ~1-10 KB, like web pages
        picked = words[rng.integers(0, len(words), n)]
        lines = [" ".join(picked[i : i + 12]) for i in range(0, n, 12)]
        doc = "\n".join(lines)
        docs.append(doc)
        size += len(doc) + 1
    os.makedirs(folder, exist_ok=True)
    per_file = -(-len(docs) // 4)
    for f in range(4):
        with open(os.path.join(folder, f"part{f}.jsonl"), "w", encoding="utf-8") as fh:
            for doc in docs[f * per_file : (f + 1) * per_file]:
                fh.write(json.dumps({"text": doc}) + "\n")
    return docs


def bench_prepare(tmp: str, corpus_bytes: int) -> str:
    docs = english_like_corpus(os.path.join(tmp, "corpus"), corpus_bytes)
    mb = sum(len(d) for d in docs) / 1e6
    enc = gpt2_encoding()
    enc.encode_ordinary("warm up")
    results = {}
    for threads in (1, os.cpu_count() or 1):
        t0 = time.perf_counter()
        tokens = sum(len(ids) + 1 for ids in enc.encode_ordinary_batch(docs, num_threads=threads))
        results[threads] = tokens / (time.perf_counter() - t0)
    ceiling = results[1]
    print(f"corpus: {len(docs):,} documents, {mb:.1f} MB, {tokens:,} tokens (GPT-2 BPE + EOT)")
    print(f"ceiling: tiktoken encode_ordinary_batch, one process, 1 thread: {ceiling / 1e6:.2f} M tokens/s; "
          f"{os.cpu_count()} threads: {results[os.cpu_count() or 1] / 1e6:.2f} M tokens/s")
    del docs
    out = ""
    for num_proc in (1, 2):
        out = os.path.join(tmp, f"prep{num_proc}")
        t0 = time.perf_counter()
        prepare(PrepareSettings(source=os.path.join(tmp, "corpus"), out=out, num_proc=num_proc, force=True))
        rate = tokens / (time.perf_counter() - t0)
        print(f"RESULT prepare num_proc={num_proc}: {rate / 1e6:.2f} M tokens/s end to end (read, tokenize, split, save) "
              f"= {rate / num_proc / ceiling:.0%} of the 1-thread ceiling per process, "
              f"{rate / results[os.cpu_count() or 1]:.0%} of the all-threads ceiling")
    return out


def bench_loader(path: str, label: str, batches: int = 2000) -> None:
    before = rss_anon_mb()
    stream = TokenStream(path, "train")
    times, peak = [], before
    for step in range(batches):
        t0 = time.perf_counter()
        x, y = sample_batch(stream, seed=0, step=step, index=0, batch_size=12, block_size=1024)
        times.append(time.perf_counter() - t0)
        if step % 100 == 0:
            peak = max(peak, rss_anon_mb())
        del x, y
    peak = max(peak, rss_anon_mb())
    print(f"RESULT loader {label}: {len(stream):,} tokens in {len(stream.chunks):,} chunks; 12 x 1024 batch median "
          f"{statistics.median(times) * 1e3:.3f} ms (p99 {np.percentile(times, 99) * 1e3:.3f} ms); "
          f"RssAnon growth while sampling {batches} batches: {peak - before:.1f} MB")


def write_big_split(path: str, tokens: int, row_tokens: int = 1 << 20) -> None:
    """A prepared-looking folder whose train split holds `tokens` random GPT-2 ids, written straight to Arrow.

    A one-row dataset saved with save_to_disk gives the folder layout; its Arrow file is then replaced by one
    written record batch by record batch, so the generator never holds more than a few MB.
    """
    import datasets
    import pyarrow as pa

    features = ids_features("uint16")  # the storage prepare.py writes (large_list: int64 offsets)
    small = datasets.Dataset.from_dict({"ids": [[1, 2, 3]]}, features=features)
    datasets.DatasetDict({"train": small, "val": small}).save_to_disk(path)
    (arrow_file,) = [f for f in os.listdir(os.path.join(path, "train")) if f.endswith(".arrow")]
    rng = np.random.default_rng(0)
    rows = -(-tokens // row_tokens)
    with pa.OSFile(os.path.join(path, "train", arrow_file), "wb") as sink:
        with pa.ipc.new_stream(sink, features.arrow_schema) as writer:
            for _ in range(rows):
                values = pa.array(rng.integers(0, 50257, row_tokens, dtype=np.uint16))
                ids = pa.LargeListArray.from_arrays(np.array([0, row_tokens], dtype=np.int64), values)
                writer.write_batch(pa.record_batch([ids], schema=features.arrow_schema))
    meta = {"format": "nanogpt_hf.prepared", "version": 1, "tokenizer": "gpt2", "vocab_size": 50257, "dtype": "uint16",
            "splits": {"train": {"documents": rows, "tokens": rows * row_tokens}, "val": {"documents": 1, "tokens": 3}},
            "source": "benchmark", "fingerprint": "benchmark"}
    with open(os.path.join(path, "meta.json"), "w") as fh:
        json.dump(meta, fh)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="10 MB corpus, 100 M-token split")
    ap.add_argument("--corpus_mb", type=float, default=None, help="generated corpus size (default 100, quick 10)")
    ap.add_argument("--big_tokens", type=float, default=None, help="tokens in the memory test split (default 1.07e9, quick 1e8)")
    ap.add_argument("--tmp", default=None, help="where to generate (deleted afterwards)")
    args = ap.parse_args()
    corpus_mb = args.corpus_mb or (10 if args.quick else 100)
    big_tokens = int(args.big_tokens or (1e8 if args.quick else (1 << 30)))
    import datasets

    datasets.disable_progress_bars()
    tmp = tempfile.mkdtemp(prefix="bench_data-", dir=args.tmp)
    need = big_tokens * 2 + corpus_mb * 1e6 * 4  # uint16 split + corpus, map cache and two prepared copies
    free = shutil.disk_usage(tmp).free
    print(f"temporary folder {tmp}: {free / 1e9:.1f} GB free, needs ~{need / 1e9:.1f} GB")
    if free < need * 1.2:
        shutil.rmtree(tmp)
        sys.exit(f"not enough disk space in {tmp}: use --quick, --big_tokens or --tmp")
    try:
        prepared = bench_prepare(tmp, int(corpus_mb * 1e6))
        bench_loader(prepared, "prepared corpus")
        shutil.rmtree(os.path.join(tmp, "corpus"))
        big = os.path.join(tmp, "big")
        t0 = time.perf_counter()
        write_big_split(big, big_tokens)
        print(f"wrote a {big_tokens:,}-token split ({big_tokens * 2 / 1e9:.2f} GB) in {time.perf_counter() - t0:.1f} s")
        bench_loader(big, "big split", batches=5000)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
