"""Chat finetuning against pretraining on the same model: tokens/s (all, and the learned ones only) of train_step on
shakespeare_chat's rows against shakespeare's windows, and the padding waste of our batching on the demo set.

    python benchmarks/bench_sft.py            # the laptop-sized GPT-2-BPE model: 4 layers, 128 wide, block 256
    python benchmarks/bench_sft.py --quick    # fewer steps

Rows of whole conversations, packed while they fit (ours), against one conversation per right-padded row (the other
way the issue allows): the fraction of pad tokens in each. The two step kinds alternate (noise hits both); medians.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from nanogpt_hf.bench import BenchSettings, resolve, set_up, timed  # noqa: E402
from nanogpt_hf.data import PrepareSettings, open_dataset, prepare, sample_batch  # noqa: E402
from nanogpt_hf.hardware import resolve_device_type, resolve_mixed_precision  # noqa: E402


def padding(stream, block_size: int, rows: int) -> dict[str, float]:
    """Pad and learned fractions of `rows` packed rows, and the pad fraction of one conversation per row."""
    x, y = zip(*(sample_batch(stream, seed=0, step=i, index=0, batch_size=8, block_size=block_size)
                 for i in range(rows // 8)))
    lengths = np.minimum(np.diff(stream.starts)[stream.learnable(block_size)], block_size + 1) - 1  # inputs per row
    pad = int(stream.ids.meta["eot_token"])  # also each conversation's bos: only a row's tail is padding
    tails = [block_size - 1 - max(np.flatnonzero(row != pad)) for batch in x for row in batch.numpy()]
    packed_pad = float(np.mean(tails)) / block_size
    return {"packed_pad": packed_pad, "packed_learned": float(np.mean([(b != -100).float().mean() for b in y])),
            "one_per_row_pad": 1 - float(lengths.mean()) / block_size}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="10 timed steps of each kind instead of 40")
    ap.add_argument("--data_dir", default=None, help="where shakespeare and shakespeare_chat are prepared (a temp dir)")
    args = ap.parse_args()
    root = args.data_dir or tempfile.mkdtemp(prefix="bench_sft-")
    folders = {name: prepare(PrepareSettings(source=name, tokenizer="gpt2", out=os.path.join(root, name)))
               for name in ("shakespeare", "shakespeare_chat")}
    device_type = resolve_device_type("auto")
    s = BenchSettings(n_layer=4, n_head=4, n_embd=128, block_size=256, batch_size=8, vocab_size=50304, warmup=2)
    s = resolve(s, device_type)
    accelerator, _, step = set_up(s, device_type, resolve_mixed_precision("auto", device_type))
    streams = {name: open_dataset(folder).stream("train") for name, folder in folders.items()}
    times, learned = {name: [] for name in streams}, []
    for i in range(s.warmup + (10 if args.quick else 40)):
        for name in list(streams)[:: 1 if i % 2 else -1]:
            x, y = sample_batch(streams[name], seed=0, step=i, index=0, batch_size=s.batch_size,
                                block_size=s.block_size)
            _, seconds = timed(accelerator.device, step, [(x.to(accelerator.device), y.to(accelerator.device))],
                               [6e-4], 1.0)
            if i >= s.warmup:
                times[name].append(seconds)
                learned += [(y != -100).float().mean().item()] if name == "shakespeare_chat" else []
    tokens = s.batch_size * s.block_size
    tps = {name: tokens / statistics.median(t) for name, t in times.items()}
    pads = padding(streams["shakespeare_chat"], s.block_size, 800)
    print(f"RESULT pretraining {tps['shakespeare']:,.0f} tokens/s; SFT {tps['shakespeare_chat']:,.0f} tokens/s "
          f"(ratio {tps['shakespeare_chat'] / tps['shakespeare']:.2f}), of which learned "
          f"{tps['shakespeare_chat'] * statistics.mean(learned):,.0f} tokens/s ({statistics.mean(learned):.1%})")
    print(f"RESULT padding on shakespeare_chat, block {s.block_size}: packed rows (ours) {pads['packed_pad']:.1%} pad "
          f"tokens, {pads['packed_learned']:.1%} learned; one conversation per row {pads['one_per_row_pad']:.1%} pad")
    print(f"{dataclasses.asdict(s)['n_layer']} layers, device {accelerator.device}; medians of {len(learned)} steps")


if __name__ == "__main__":
    main()
