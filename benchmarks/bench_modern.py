"""GPT-2 + AdamW against nanochat's architecture (+ AdamW, + Muon) on the laptop recipe: validation loss against steps
and against training time, two seeds each, one plot.

    python benchmarks/bench_modern.py [--seeds=1337,1338] [--max_iters=N] [--eval_interval=100] [--threads=0]

Runs train.py as whole processes, interleaved (seed by seed, the three configurations in turn), on the shipped
tiny Shakespeare (characters):
- gpt2+adamw:   recipes/shakespeare_char_cpu.yaml (4 layers, 128 wide, block 64, batch 12, 2000 steps);
- modern+adamw: recipes/shakespeare_char_modern.yaml --optimizer=adamw (the same size, nanochat's switches, 600 steps);
- modern+muon:  recipes/shakespeare_char_modern.yaml (Muon for the blocks' matrices).
Each recipe runs its own max_iters unless --max_iters is given.
Training time is the sum of each step's ms_per_iter in metrics.jsonl (evaluations left out). Prints each run's final
val loss and time, then, per configuration, the median time to reach the GPT-2 recipe's median final val loss and its
ratio to the GPT-2 recipe's time (the target: <= 0.6). Writes the plot to benchmarks/modern_vs_gpt2.png.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = {"gpt2+adamw": ["shakespeare_char_cpu.yaml"],
           "modern+adamw": ["shakespeare_char_modern.yaml", "--optimizer=adamw"],
           "modern+muon": ["shakespeare_char_modern.yaml"]}


def run(name: str, seed: int, args, folder: str) -> dict:
    """One training run; returns its curve: [(step, seconds of training so far, val loss)]."""
    out = os.path.join(folder, f"{name}-{seed}")
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), *CONFIGS[name], f"--out_dir={out}", f"--seed={seed}",
           *([f"--max_iters={args.max_iters}"] if args.max_iters else []), f"--eval_interval={args.eval_interval}",
           "--eval_iters=50",
           "--log_interval=1", "--sample_at_end=false", f"--threads={args.threads}", f"--data_dir={folder}/data"]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, cwd=ROOT)
    with open(os.path.join(out, "metrics.jsonl")) as fh:
        events = [json.loads(line) for line in fh]
    seconds, curve = {0: 0.0}, []
    for e in events:
        if e["type"] == "train":
            seconds[e["iter"]] = seconds[e["iter"] - 1] + e["ms_per_iter"] / 1000
        else:
            curve.append((e["iter"], seconds[e["iter"]], e["val_loss"]))
    print(f"{name:>13} seed {seed}: final val loss {curve[-1][2]:.4f} after {curve[-1][1]:.1f} s of training",
          flush=True)
    return curve


def time_to_reach(curve, loss: float) -> float | None:
    """Training seconds at the first evaluation at or below `loss` (None: never)."""
    return next((t for _, t, v in curve if v <= loss), None)


def plot(curves: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for (name, seed), curve in curves.items():
        color = f"C{list(CONFIGS).index(name)}"
        style = "-" if seed == min(s for _, s in curves) else "--"
        steps, seconds, losses = zip(*curve[1:])  # step 0 (ln(vocab)) would squash the scale
        axes[0].plot(steps, losses, style, color=color, label=f"{name} (seed {seed})")
        axes[1].plot(seconds, losses, style, color=color, label=f"{name} (seed {seed})")
    axes[0].set(xlabel="step", ylabel="validation loss", title="against steps")
    axes[1].set(xlabel="training seconds (evaluations left out)", title="against time")
    axes[0].legend()
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="1337,1338")
    parser.add_argument("--max_iters", type=int, default=None, help="default: each recipe's")
    parser.add_argument("--eval_interval", type=int, default=100)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--plot", default=os.path.join(ROOT, "benchmarks", "modern_vs_gpt2.png"))
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    curves = {}
    with tempfile.TemporaryDirectory() as folder:
        for seed in seeds:
            for name in CONFIGS:
                curves[name, seed] = run(name, seed, args, folder)
    target = statistics.median(curves["gpt2+adamw", s][-1][2] for s in seeds)
    base_time = statistics.median(curves["gpt2+adamw", s][-1][1] for s in seeds)
    print(f"\nGPT-2 recipe: median final val loss {target:.4f} in {base_time:.1f} s of training")
    for name in CONFIGS:
        times = [time_to_reach(curves[name, s], target) for s in seeds]
        final = statistics.median(curves[name, s][-1][2] for s in seeds)
        reached = [t for t in times if t is not None]
        when = (f"reaches it in {statistics.median(reached):.1f} s (median of {len(reached)}), "
                f"{statistics.median(reached) / base_time:.2f}x" if reached else "never reaches it")
        print(f"{name:>13}: median final val loss {final:.4f}; {when}")
    plot(curves, args.plot)
    print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
