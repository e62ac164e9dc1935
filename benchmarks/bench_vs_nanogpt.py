"""Our model's training step against nanoGPT's model.py (re-implemented in tests/nanogpt_reference.py).

Same shapes, same AdamW step and gradient clipping, the two steps interleaved so that machine noise hits both.
    python benchmarks/bench_vs_nanogpt.py [n_layer n_head n_embd block batch]   (default: the laptop recipe)
"""

import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from nanogpt_reference import RefGPT  # noqa: E402

from nanogpt_hf import NanoGPTConfig, NanoGPTForCausalLM  # noqa: E402


def main():
    n_layer, n_head, n_embd, block, batch = (int(a) for a in (sys.argv[1:] or [4, 4, 128, 64, 12]))
    vocab = 65
    args = dict(n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=block, bias=False, vocab_size=vocab,
                dropout=0.0)
    ref = RefGPT(args).train()
    ours = NanoGPTForCausalLM(NanoGPTConfig(**args, bos_token_id=None, eos_token_id=None)).train()
    x = torch.randint(0, vocab, (batch, block))
    y = torch.randint(0, vocab, (batch, block))

    def loss_ref():
        return torch.nn.functional.cross_entropy(ref(x).view(-1, vocab), y.view(-1))

    def loss_ours():
        return ours(input_ids=x, shift_labels=y, use_cache=False).loss

    steps = {}
    for name, model, loss_fn in (("nanoGPT model.py", ref, loss_ref), ("nanogpt_hf", ours, loss_ours)):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

        def step(model=model, loss_fn=loss_fn, opt=opt):
            loss_fn().backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)

        for _ in range(5):
            step()
        steps[name] = (step, [])
    for _ in range(100):
        for step, times in steps.values():
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
    medians = {name: statistics.median(times) * 1000 for name, (_, times) in steps.items()}
    for name, ms in medians.items():
        print(f"{name:18s} {ms:8.2f} ms/step (median of 100)")
    print(f"ratio nanogpt_hf / nanoGPT: {medians['nanogpt_hf'] / medians['nanoGPT model.py']:.3f}")


if __name__ == "__main__":
    main()
