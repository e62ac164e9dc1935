"""Our model's training step against nanoGPT's model.py (re-implemented in tests/nanogpt_reference.py).

Three steps on the same shapes and batch, interleaved so that machine noise hits all alike:
- nanoGPT model.py: nanoGPT's CPU step (fp32, sdpa, foreach AdamW, clipping);
- nanogpt_hf, same step: our model in exactly that step (the cost of the HF wrapper);
- nanogpt_hf, train.py on this CPU: what train.py does here with --dtype=auto (bf16 autocast where the CPU has bf16,
  then eager attention; fused AdamW). glibc's page-fault fix (hardware.keep_freed_memory) is left out: it would
  speed up every contender in this one process; benchmarks/bench_wall_time.py measures whole runs with it.
    python benchmarks/bench_vs_nanogpt.py [n_layer n_head n_embd block batch]   (default: the laptop recipe)
"""

import copy
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from nanogpt_reference import RefGPT  # noqa: E402

from nanogpt_hf import NanoGPTConfig, NanoGPTForCausalLM, hardware  # noqa: E402
from nanogpt_hf.training import configure_optimizer  # noqa: E402


def main():
    if {"-h", "--help"} & set(sys.argv[1:]) or not all(a.isdigit() for a in sys.argv[1:]):
        print(__doc__)
        return
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

    precision = hardware.resolve_mixed_precision("auto", "cpu")
    tuned = copy.deepcopy(ours)
    tuned.set_attn_implementation(hardware.training_attention("cpu", precision))

    def loss_tuned():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            return tuned(input_ids=x, shift_labels=y, use_cache=False).loss

    contenders = (("nanoGPT model.py", ref, loss_ref, torch.optim.AdamW(ref.parameters(), lr=1e-3)),
                  ("nanogpt_hf, same step", ours, loss_ours, torch.optim.AdamW(ours.parameters(), lr=1e-3)),
                  (f"nanogpt_hf, train.py on this CPU ({precision})", tuned, loss_tuned,
                   configure_optimizer(tuned, 0.0, 1e-3, (0.9, 0.999), "cpu")))
    steps = {}
    for name, model, loss_fn, opt in contenders:
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
    base = medians["nanoGPT model.py"]
    for name, ms in medians.items():
        print(f"{name:42s} {ms:8.2f} ms/step (median of 100)   speed-up {base / ms:.2f}x")

if __name__ == "__main__":
    main()
