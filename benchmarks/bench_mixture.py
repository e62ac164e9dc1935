"""Loader benchmark for mixtures: a 12 x 1024 batch from a 3-source mixture against one source, and memory over many
steps.

    python benchmarks/bench_mixture.py            # 3 splits of 100 M random GPT-2 ids (~0.6 GB of temporary disk)
    python benchmarks/bench_mixture.py --quick    # 3 splits of 10 M

The two loaders alternate batch by batch (noise hits both alike); medians. Target (issue 25): a mixture's batch within
10% of one source's, and anonymous memory flat while sampling.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_data import rss_anon_mb, write_big_split  # noqa: E402
from nanogpt_hf.data import Mixture, TokenStream, sample_batch  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="3 splits of 10 M tokens")
    ap.add_argument("--steps", type=int, default=5000, help="batches drawn by each loader")
    ap.add_argument("--tmp", default=None, help="where to generate (deleted afterwards)")
    args = ap.parse_args()
    tokens = 10_000_000 if args.quick else 100_000_000
    tmp = tempfile.mkdtemp(prefix="bench_mixture-", dir=args.tmp)
    try:
        paths = [os.path.join(tmp, name) for name in ("web", "code", "books")]
        for path in paths:
            write_big_split(path, tokens)
        one = TokenStream(paths[0])
        mix = Mixture([TokenStream(p) for p in paths], [0.6, 0.3, 0.1], ["web", "code", "books"])
        loaders, times = {"one source": one, "3-source mixture": mix}, {"one source": [], "3-source mixture": []}
        before = peak = rss_anon_mb()
        for step in range(args.steps):
            for name in list(loaders)[:: 1 if step % 2 else -1]:
                t0 = time.perf_counter()
                sample_batch(loaders[name], seed=0, step=step, index=step % 40, batch_size=12, block_size=1024)
                times[name].append(time.perf_counter() - t0)
            if step % 250 == 0:
                peak = max(peak, rss_anon_mb())
        med = {name: statistics.median(t) * 1e3 for name, t in times.items()}
        print(f"RESULT 12 x 1024 batch, median of {args.steps} (alternated): one source {med['one source']:.3f} ms, "
              f"3-source mixture {med['3-source mixture']:.3f} ms (ratio {med['3-source mixture'] / med['one source']:.2f}); "
              f"RssAnon growth over {2 * args.steps} batches: {max(peak, rss_anon_mb()) - before:.1f} MB")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
