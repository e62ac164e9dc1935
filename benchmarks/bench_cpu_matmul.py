"""The matmul floor of a training step: every matrix product of one forward + backward, timed alone.

A training step cannot be faster than its matrix products. This times each product of one step of a GPT of the
given shape (forward, and the two products per product in backward) on its own, in fp32 and bf16, and prints their
sum next to the CPU's practical peak (hardware.measured_cpu_peak_flops, the one MFU divides by), so a measured step
time splits into "matmul floor" and "everything else" (elementwise ops, casts, the optimizer, Python and dispatch).
    python benchmarks/bench_cpu_matmul.py [n_layer n_head n_embd block batch vocab]   (default: the laptop recipe)
"""

import statistics
import sys
import time

import torch

from nanogpt_hf import hardware


def median_seconds(fn, repeats: int = 50) -> float:
    for _ in range(5):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def step_products(n_layer, n_head, n_embd, block, batch, vocab):
    """(count, batch dims, M, K, N) of every product in one step: forward A @ B, backward dA = dC @ B^T and
    dB = A^T @ dC, which have the same FLOPs but other shapes."""
    m, c, hd, bh = batch * block, n_embd, n_embd // n_head, batch * n_head
    linears = [(m, c, 3 * c), (m, c, c), (m, c, 4 * c), (m, 4 * c, c)]  # qkv, attention proj, mlp fc, mlp proj
    attention = [(block, hd, block), (block, block, hd)]  # q @ k^T, weights @ v, per (batch x head)
    products = []
    for lead, shapes, count in (((), linears, n_layer), ((bh,), attention, n_layer), ((), [(m, c, vocab)], 1)):
        for mm, k, n in shapes:
            products += [(count, lead, mm, k, n), (count, lead, mm, n, k), (count, lead, k, mm, n)]
    return products


def main():
    if {"-h", "--help"} & set(sys.argv[1:]) or not all(a.isdigit() for a in sys.argv[1:]):
        print(__doc__)
        return
    shape = [int(a) for a in sys.argv[1:]] or [4, 4, 128, 64, 12, 65]
    print(f"{torch.get_num_threads()} threads; step of n_layer {shape[0]}, n_head {shape[1]}, n_embd {shape[2]}, "
          f"block {shape[3]}, batch {shape[4]}, vocab {shape[5]}")
    for dtype in (torch.float32, torch.bfloat16):
        peak = hardware.measured_cpu_peak_flops(dtype)  # the peak train.py's MFU divides by
        flops = seconds = 0.0
        for count, lead, m, k, n in step_products(*shape):
            a, b = torch.randn(*lead, m, k).to(dtype), torch.randn(*lead, k, n).to(dtype)
            seconds += count * median_seconds(lambda: a @ b)
            flops += count * 2 * m * k * n * (lead[0] if lead else 1)
        print(f"{str(dtype):15s} peak (1-thread matmul x threads) {peak / 1e9:5.0f} GFLOP/s | the step's products: "
              f"{flops / 1e9:.2f} GFLOP in {seconds * 1000:.2f} ms = {flops / seconds / 1e9:.0f} GFLOP/s")


if __name__ == "__main__":
    main()
