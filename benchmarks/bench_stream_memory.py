"""Memory of `prepare.py --streaming`: peak RSS of the whole process on generated corpora of growing size.

    python benchmarks/bench_stream_memory.py                  # ~100 MB and ~2 GB of text (needs ~5 GB free disk)
    python benchmarks/bench_stream_memory.py --sizes_mb=10,100

Each corpus is .jsonl documents of Shakespeare's words drawn by frequency (as bench_data.py's), written to a
temporary folder (--tmp) and prepared with `python prepare.py CORPUS --streaming --out=...` in a child process.
Reported per corpus: the child's peak RSS (getrusage; polled VmHWM agrees) and the peaks of its anonymous (heap)
and file-backed resident memory (RssAnon, RssFile: pages of memory-mapped files it has read), polled from /proc.
Flat memory: a peak that does not grow with the corpus (figures and findings: benchmarks/RESULTS.md).
"""

from __future__ import annotations

import argparse
import collections
import json
import lzma
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EMBEDDED_PATH = os.path.join(ROOT, "nanogpt_hf", "assets", "shakespeare.jsonl.xz")  # no import: see run_prepare


def write_corpus(path: str, target_bytes: int, seed: int = 0) -> int:
    """Write ~target_bytes of text as .jsonl documents of 200-2000 words, one at a time; returns the documents."""
    with lzma.open(EMBEDDED_PATH, "rt", encoding="utf-8") as fh:
        counts = collections.Counter(word for line in fh for word in json.loads(line)["text"].split())
    words = np.array(list(counts), dtype=object)  # the vocabulary, drawn by frequency; a small parent: see run_prepare
    cdf = np.cumsum(list(counts.values())) / counts.total()
    rng, size, docs = np.random.default_rng(seed), 0, 0
    with open(path, "w", encoding="utf-8") as fh:
        while size < target_bytes:
            picked = words[np.searchsorted(cdf, rng.random(int(rng.integers(200, 2000))), side="right")]
            doc = "\n".join(" ".join(picked[i : i + 12]) for i in range(0, len(picked), 12))
            fh.write(json.dumps({"text": doc}) + "\n")
            size, docs = size + len(doc) + 1, docs + 1
    return docs


PEAKS = ("VmHWM", "RssAnon", "RssFile")


def status_kb(pid: int) -> dict:
    """VmHWM (peak RSS), RssAnon and RssFile of a live process, in kB (empty once it has exited)."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            return {k: int(v.split()[0]) for k, v in (line.split(":", 1) for line in fh) if k in PEAKS}
    except (FileNotFoundError, ProcessLookupError):
        return {}


def run_prepare(corpus: str, out: str) -> dict:
    """Run prepare.py --streaming on `corpus`; its wall time, peak RSS and polled anonymous/file-backed peaks (MB)."""
    cmd = [sys.executable, os.path.join(ROOT, "prepare.py"), corpus, "--streaming", f"--out={out}"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1"}
    t0, peaks = time.time(), dict.fromkeys(PEAKS, 0)
    with open(out + ".log", "w+") as log:  # a file, not a pipe: a full pipe would stall the child
        child = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
        while not (done := os.wait4(child.pid, os.WNOHANG))[0]:
            for k, v in status_kb(child.pid).items():
                peaks[k] = max(peaks[k], v)
            time.sleep(0.05)
        log.seek(0)
        output = log.read()
    _, status, usage = done
    if os.waitstatus_to_exitcode(status):
        raise SystemExit(f"prepare.py failed:\n{output}")
    # ru_maxrss survives exec on Linux: with a vfork'ed child it counts the parent's peak too, hence the small parent
    return {"seconds": time.time() - t0, "peak_rss_mb": usage.ru_maxrss / 1024, "hwm_mb": peaks["VmHWM"] / 1024,
            "peak_anon_mb": peaks["RssAnon"] / 1024, "peak_file_mb": peaks["RssFile"] / 1024,
            "summary": output.strip().splitlines()[-1]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes_mb", default="100,2000", help="corpus sizes in MB of text, comma-separated")
    ap.add_argument("--tmp", default=None, help="where to generate (deleted afterwards)")
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="bench_stream-", dir=args.tmp)
    try:
        print("| corpus | documents | tokens | seconds | ru_maxrss | VmHWM | peak RssAnon | peak RssFile |")
        for mb in (float(s) for s in args.sizes_mb.split(",")):
            corpus = os.path.join(tmp, f"corpus_{mb:g}mb.jsonl")
            docs = write_corpus(corpus, int(mb * 1e6))
            r = run_prepare(corpus, os.path.join(tmp, f"out_{mb:g}mb"))
            tokens = sum(int(n.replace(",", "")) for n in re.findall(r"([\d,]+) tokens", r["summary"]))
            print(f"| {mb:g} MB | {docs:,} | {tokens:,} | {r['seconds']:.1f} | {r['peak_rss_mb']:.0f} MB | "
                  f"{r['hwm_mb']:.0f} MB | {r['peak_anon_mb']:.0f} MB | {r['peak_file_mb']:.0f} MB |", flush=True)
            shutil.rmtree(os.path.join(tmp, f"out_{mb:g}mb"))
            os.remove(corpus)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"this script's own peak RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")


if __name__ == "__main__":
    main()
