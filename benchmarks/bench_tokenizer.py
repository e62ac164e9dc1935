"""Tokenizer benchmark: our BPE trainer (HF tokenizers, prepare.py --tokenizer=bpe) against nanochat's rustbpe.

    python benchmarks/bench_tokenizer.py                       # all three parts below (~6 minutes on 2 cores)
    python benchmarks/bench_tokenizer.py --parts=shakespeare   # training on the shipped corpus, 3 runs each
    python benchmarks/bench_tokenizer.py --parts=breakdown     # where the time goes: counting alone, one thread
    python benchmarks/bench_tokenizer.py --parts=big           # training on ~100 MB of generated text, once each
    python benchmarks/bench_tokenizer.py --parts=encode        # prepare.py encoding, trained BPE against GPT-2

Each trainer runs in a subprocess of its own on the same documents (a .jsonl read a line at a time), at the same
number of merges (ours: vocab_size V = 256 bytes + merges + 10 special tokens; rustbpe: V - 10, it has no special
tokens) and the same split pattern (nanochat's GPT-4 style). Reported: training seconds, the process's peak RSS
(ru_maxrss) and the RSS before training, bytes per token on held-out documents (GPT-2's tiktoken as a third column),
then prepare.py's encoding speed with a trained tokenizer against the GPT-2 (tiktoken) path, one process each.
rustbpe (pip install rustbpe==0.1.0) is not a dependency: without it its column is skipped.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import lzma
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from nanogpt_hf.data import EMBEDDED_PATH  # noqa: E402
from nanogpt_hf.tokenization import SPLIT_PATTERNS, gpt2_encoding  # noqa: E402

SPECIALS = 10  # <|endoftext|> and nanochat's 9 chat tokens, in our vocabulary only
ODD = ["café", "naïve", "Zürich", "東京", "北京大学", "😀", "🦜", "—", "€", "Ωμέγα", "привет", "ñandú"]


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KB


def cpu_s() -> float:  # user + system CPU seconds of this process, all its threads
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def read_docs(path: str):
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            yield json.loads(line)["text"]


def batches(path: str, n: int = 1000):  # lists of documents, as prepare.py's text_sample gives them
    docs = []
    for doc in read_docs(path):
        docs.append(doc)
        if len(docs) == n:
            yield docs
            docs = []
    if docs:
        yield docs


def worker(args) -> None:
    """Train one tokenizer on args.train in this process; print seconds, RSS and bytes/token on args.heldout."""
    if args.worker == "ours":
        from nanogpt_hf.tokenization import train_bpe
    else:
        import rustbpe
    heldout = list(read_docs(args.heldout))
    before, t0, c0 = rss_mb(), time.perf_counter(), cpu_s()
    if args.worker == "ours":
        tok = train_bpe(batches(args.train), args.vocab_size, args.pattern)
        seconds, cpu, peak = time.perf_counter() - t0, cpu_s() - c0, rss_mb()
        tokens = sum(len(e.ids) for e in tok.backend_tokenizer.encode_batch_fast(heldout, add_special_tokens=False))
        vocab = len(tok)
        if args.save:
            tok.save_pretrained(args.save)  # a --tokenizer=DIR folder for the encoding benchmark
    else:
        tok = rustbpe.Tokenizer()
        tok.train_from_iterator(read_docs(args.train), args.vocab_size - SPECIALS, pattern=SPLIT_PATTERNS[args.pattern])
        seconds, cpu, peak = time.perf_counter() - t0, cpu_s() - c0, rss_mb()
        tokens = sum(len(ids) for ids in tok.batch_encode(heldout))
        vocab = tok.vocab_size
    nbytes = sum(len(d.encode("utf-8")) for d in heldout)
    print(json.dumps({"seconds": seconds, "cpu_s": cpu, "peak_mb": peak, "before_mb": before,
                      "bytes_per_token": nbytes / tokens,
                      "vocab": vocab}))


def run_worker(kind: str, train: str, heldout: str, vocab_size: int, pattern: str, save: str) -> dict:
    cmd = [sys.executable, __file__, f"--worker={kind}", f"--train={train}", f"--heldout={heldout}",
           f"--vocab_size={vocab_size}", f"--pattern={pattern}", f"--save={save}"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def write_jsonl(path: str, docs) -> int:
    size = 0
    with open(path, "w", encoding="utf-8") as fh:
        for doc in docs:
            fh.write(json.dumps({"text": doc}) + "\n")
            size += len(doc.encode("utf-8"))
    return size


def shakespeare(tmp: str) -> tuple[str, str]:
    """The shipped corpus: the first 90% of its documents to train on, the last 10% held out."""
    with lzma.open(EMBEDDED_PATH, "rt", encoding="utf-8") as fh:
        docs = [json.loads(line)["text"] for line in fh]
    k = int(len(docs) * 0.9)
    write_jsonl(os.path.join(tmp, "shakespeare_train.jsonl"), docs[:k])
    write_jsonl(os.path.join(tmp, "shakespeare_heldout.jsonl"), docs[k:])
    return os.path.join(tmp, "shakespeare_train.jsonl"), os.path.join(tmp, "shakespeare_heldout.jsonl")


def generated_docs(target_bytes: int, seed: int):
    """English-like documents: Shakespeare's words drawn by frequency, 8% of them spliced from two words (new words
    keep appearing, as on the web), 2% numbers, 0.5% non-ASCII words; lines of 12 words, documents of 200-2000."""
    with lzma.open(EMBEDDED_PATH, "rt", encoding="utf-8") as fh:
        words = " ".join(json.loads(line)["text"] for line in fh).split()
    rng, size = np.random.default_rng(seed), 0
    while size < target_bytes:
        n = int(rng.integers(200, 2000))
        picked = [words[i] for i in rng.integers(0, len(words), n)]
        kind, other, cut = rng.random(n), rng.integers(0, len(words), n), rng.integers(1, 5, n)
        for i in np.flatnonzero(kind < 0.105):
            spliced = picked[i][: cut[i]] + words[other[i]][1:]
            picked[i] = (str(int(rng.integers(0, 10 ** int(cut[i] + 1)))) if kind[i] < 0.02 else
                         ODD[int(other[i]) % len(ODD)] if kind[i] < 0.025 else spliced)
        doc = "\n".join(" ".join(picked[i : i + 12]) for i in range(0, n, 12))
        size += len(doc) + 1
        yield doc


def bench_training(name: str, train: str, heldout: str, vocab_size: int, pattern: str, repeats: int,
                   save: str = "") -> None:
    kinds = ["ours", "rustbpe"]
    if importlib.util.find_spec("rustbpe") is None:
        kinds = ["ours"]
        print("rustbpe is not installed (pip install rustbpe==0.1.0): its column is skipped")
    runs = {k: [] for k in kinds}
    for _ in range(repeats):  # interleaved, so a busy moment of the machine hits both
        for k in kinds:
            runs[k].append(run_worker(k, train, heldout, vocab_size, pattern, save))
    enc, docs = gpt2_encoding(), list(read_docs(heldout))
    gpt2 = sum(len(d.encode("utf-8")) for d in docs) / sum(map(len, enc.encode_ordinary_batch(docs)))
    mb = os.path.getsize(train) / 1e6
    print(f"\n{name}: train {mb:.1f} MB (.jsonl), held out {os.path.getsize(heldout) / 1e6:.2f} MB, "
          f"vocab_size {vocab_size} ({vocab_size - 256 - SPECIALS} merges), split pattern {pattern}, "
          f"{repeats} run(s) each, medians")
    print("| trainer | training s (wall) | CPU s | peak RSS MB | RSS before training MB | bytes/token (held out) "
          "| vocab |")
    print("|---|---|---|---|---|---|---|")
    for k, med in medians(runs).items():
        label = "ours (HF tokenizers, train_bpe)" if k == "ours" else "rustbpe 0.1.0 (nanochat)"
        print(f"| {label} | {med['seconds']:.2f} | {med['cpu_s']:.2f} | {med['peak_mb']:.0f} | "
              f"{med['before_mb']:.0f} | {med['bytes_per_token']:.4f} | {med['vocab']:.0f} |")
    print(f"| GPT-2 (tiktoken, 50257) | - | - | - | - | {gpt2:.4f} | 50257 |")
    if "rustbpe" in runs:
        wall, cpu, bpt = ([statistics.median(r[key] for r in runs[k]) for k in kinds]
                          for key in ("seconds", "cpu_s", "bytes_per_token"))
        print(f"ours / rustbpe: wall time {wall[0] / wall[1]:.2f}x, CPU time {cpu[0] / cpu[1]:.2f}x, bytes per "
              f"token {bpt[0] / bpt[1] - 1:+.2%}")


def medians(runs: dict[str, list[dict]]) -> dict[str, dict]:  # {name: {figure: median over the runs}}
    return {name: {key: statistics.median(r[key] for r in rs) for key in rs[0]} for name, rs in runs.items()}


def run_prepare(corpus: str, out: str, *flags: str) -> dict:
    """prepare.py in a subprocess: wall and CPU seconds (all its threads and workers), its own figure, tokens."""
    before, t0 = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
    subprocess.run([sys.executable, os.path.join(ROOT, "prepare.py"), corpus, f"--out={out}", "--force", *flags],
                   check=True, capture_output=True, env={**os.environ, "PYTHONPATH": ROOT})
    after, meta = resource.getrusage(resource.RUSAGE_CHILDREN), json.load(open(os.path.join(out, "meta.json")))
    return {"wall": time.perf_counter() - t0, "own": meta["seconds"], "tokens": sum(
        s["tokens"] for s in meta["splits"].values()), "cpu": after.ru_utime + after.ru_stime - before.ru_utime -
        before.ru_stime}


def encode_worker(args) -> None:
    """One thread each (TOKENIZERS_PARALLELISM=false): CPU seconds to encode args.train with tiktoken's GPT-2 and with
    the tokenizer in args.save, as prepare.py calls them (encode_ordinary_batch, encode_batch_fast), batches of 1000."""
    from nanogpt_hf.data import _backend

    enc, hf = gpt2_encoding(), _backend(open(os.path.join(args.save, "tokenizer.json")).read())
    docs = list(batches(args.train))
    result = {}
    for name, fn in (("gpt2", lambda b: enc.encode_ordinary_batch(b, num_threads=1)),
                     ("trained", lambda b: [e.ids for e in hf.encode_batch_fast(b, add_special_tokens=False)])):
        c0 = cpu_s()
        result[name] = sum(len(ids) for b in docs for ids in fn(b))
        result[name + "_cpu_s"] = cpu_s() - c0
    print(json.dumps(result))


def bench_encoding(tmp: str, corpus: str, repeats: int) -> None:
    """prepare.py --tokenizer=bpe once (train + encode), then, one process each (--num_proc=1), the GPT-2 path against
    the trained tokenizer's (--tokenizer=DIR), interleaved; then the encoders alone on one thread."""
    mb, tok = os.path.getsize(corpus) / 1e6, f"{tmp}/trained"
    r = run_prepare(corpus, tok, "--tokenizer=bpe", "--vocab_size=32768")
    print(f"\nprepare.py {mb:.0f} MB --tokenizer=bpe --vocab_size=32768 (trains on it, then encodes it): "
          f"{r['wall']:.1f} s wall, {r['cpu']:.1f} s CPU, prepare's own {r['own']:.1f} s")
    runs = {"gpt2": [], tok: []}
    for _ in range(repeats):
        for name in runs:
            runs[name].append(run_prepare(corpus, f"{tmp}/enc", f"--tokenizer={name}", "--num_proc=1"))
    print(f"prepare.py on {mb:.0f} MB, --num_proc=1, {repeats} runs each, medians:")
    print("| tokenizer | wall s | CPU s | prepare's own s | MB/s (own) | tokens |\n|---|---|---|---|---|---|")
    for name, med in medians(runs).items():
        label = "gpt2 (tiktoken)" if name == "gpt2" else "DIR (the 32768-token BPE trained above)"
        print(f"| {label} | {med['wall']:.1f} | {med['cpu']:.1f} | {med['own']:.1f} | {mb / med['own']:.2f} | "
              f"{med['tokens']:,.0f} |")
    cmd = [sys.executable, __file__, "--worker=encode", f"--train={corpus}", f"--save={tok}"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True,
                         env={**os.environ, "TOKENIZERS_PARALLELISM": "false"}).stdout
    e = json.loads(out.strip().splitlines()[-1])
    print(f"encoders alone, one thread: tiktoken GPT-2 {e['gpt2_cpu_s']:.1f} CPU s ({mb / e['gpt2_cpu_s']:.2f} MB/s), "
          f"trained BPE (HF tokenizers) {e['trained_cpu_s']:.1f} CPU s ({mb / e['trained_cpu_s']:.2f} MB/s)")


def breakdown_worker(args) -> None:
    """CPU seconds of counting alone (no merges) on args.train, one thread: HF tokenizers' trainer with less and less
    of our pre-tokenization, and rustbpe's."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers

    docs, result = list(read_docs(args.train)), {}
    split = lambda: pre_tokenizers.Split(Regex(SPLIT_PATTERNS[args.pattern]), behavior="isolated")  # noqa: E731
    for name, pre in (("whitespace split only", pre_tokenizers.WhitespaceSplit()), ("split regex", split()),
                      ("split regex + ByteLevel (ours)", pre_tokenizers.Sequence(
                          [split(), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]))):
        tok, c0 = Tokenizer(models.BPE()), cpu_s()
        tok.pre_tokenizer = pre
        tok.train_from_iterator([docs], trainer=trainers.BpeTrainer(
            vocab_size=256, show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
        result[f"HF tokenizers, {name}"] = cpu_s() - c0
    if importlib.util.find_spec("rustbpe"):
        import rustbpe

        c0 = cpu_s()
        rustbpe.Tokenizer().train_from_iterator(iter(docs), 256, pattern=SPLIT_PATTERNS[args.pattern])
        result["rustbpe (split regex, bytes)"] = cpu_s() - c0
    print(json.dumps(result))


def bench_breakdown(train: str, repeats: int) -> None:
    cmd = [sys.executable, __file__, "--worker=breakdown", f"--train={train}"]
    env = {**os.environ, "RAYON_NUM_THREADS": "1"}
    runs = [json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True, env=env).stdout.strip()
                       .splitlines()[-1]) for _ in range(repeats)]
    print(f"\ncounting only (no merges), {os.path.getsize(train) / 1e6:.1f} MB, one thread, CPU s, median of {repeats}:")
    for name in runs[0]:
        print(f"  {name}: {statistics.median(r[name] for r in runs):.2f}")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--parts", default="shakespeare,breakdown,big,encode", help="comma-separated: shakespeare, "
                   "breakdown, big, encode")
    p.add_argument("--worker", choices=["ours", "rustbpe", "encode", "breakdown"])
    p.add_argument("--train"), p.add_argument("--heldout")
    p.add_argument("--vocab_size", type=int, default=4096)
    p.add_argument("--pattern", default="gpt4")
    p.add_argument("--save", default="")
    p.add_argument("--big_mb", type=float, default=100)
    p.add_argument("--encode_mb", type=float, default=20)
    args = p.parse_args()
    if args.worker:
        return {"encode": encode_worker, "breakdown": breakdown_worker}.get(args.worker, worker)(args)
    print(f"CPU: {os.cpu_count()} cores; python {sys.version.split()[0]}")
    with tempfile.TemporaryDirectory() as tmp:
        if "shakespeare" in args.parts:
            bench_training("Shakespeare (shipped)", *shakespeare(tmp), 4096, "gpt4", repeats=3)
        if "breakdown" in args.parts:
            bench_breakdown(shakespeare(tmp)[0], repeats=3)
        if "big" in args.parts:
            big, heldout = os.path.join(tmp, "big.jsonl"), os.path.join(tmp, "big_heldout.jsonl")
            write_jsonl(big, generated_docs(args.big_mb * 1e6, seed=0))
            write_jsonl(heldout, generated_docs(1e6, seed=1))
            bench_training(f"generated ~{args.big_mb:.0f} MB", big, heldout, 32768, "gpt4", repeats=1)
        if "encode" in args.parts:
            write_jsonl(os.path.join(tmp, "enc.jsonl"), generated_docs(args.encode_mb * 1e6, seed=2))
            bench_encoding(tmp, os.path.join(tmp, "enc.jsonl"), repeats=3)


if __name__ == "__main__":
    main()
