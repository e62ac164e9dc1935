"""Run records: metrics.jsonl (one JSON object per log or eval event), the loss-curve PNG, and perplexity."""

from __future__ import annotations

import json
import math
import os

from .common import atomic_output


def read_metrics(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.endswith("\n")]  # a line cut short by a kill is skipped


class MetricsLog:
    """Appends events to metrics.jsonl. A run resumed from step N first drops the events after N (from the run that
    was interrupted), so the file reads as one uninterrupted run."""

    def __init__(self, path: str, resume_step: int | None = None):
        self.path = path
        resumed = resume_step and os.path.exists(path)
        kept = [e for e in read_metrics(path) if e["iter"] <= resume_step] if resumed else []
        with atomic_output(path) as tmp, open(tmp, "w", encoding="utf-8") as fh:
            fh.writelines(json.dumps(e) + "\n" for e in kept)

    def write(self, event: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(event) + "\n")


def plot_losses(metrics_path: str, png_path: str) -> None:
    """Train (per logged step) and train/val (per evaluation; a mixture's: each source's val too) losses against the
    step; beside them the gradient's norm (clipped steps marked) and, with eval_tasks, the core score and each task's
    accuracy centered on chance."""
    from matplotlib.figure import Figure  # not pyplot: no figure registry, no backend switch in a notebook's process

    events = read_metrics(metrics_path)
    evals = [e for e in events if e["type"] == "eval"]
    normed = [e for e in events if e["type"] == "train" and "grad_norm" in e]  # a panel
    scored = [e for e in evals if "core" in e]  # the harness's tasks: a panel
    panels = 1 + bool(normed) + bool(scored)
    fig = Figure(figsize=(7 * panels, 4), dpi=100)
    axes = fig.subplots(1, panels, squeeze=False)[0]
    ax = axes[0]
    ax.plot([e["iter"] for e in events if e["type"] == "train"], [e["loss"] for e in events if e["type"] == "train"],
            color="tab:blue", alpha=0.35, lw=1, label="train (step)")
    for key, color in (("train_loss", "tab:blue"), ("val_loss", "tab:orange")):
        ax.plot([e["iter"] for e in evals], [e[key] for e in evals], "o-", color=color, ms=3,
                label=f"{key.split('_')[0]} (eval)")
    sources = dict.fromkeys(k for e in evals for k in e if k.startswith("val_loss/"))  # a mixture's
    for i, key in enumerate(sources):
        shown = [e for e in evals if key in e]
        ax.plot([e["iter"] for e in shown], [e[key] for e in shown], "--", color=f"C{i + 2}", label=f"val: {key[9:]}")
    ax.set(xlabel="step", ylabel="loss (nats/token)")
    if normed:
        clipped = [e for e in normed if e.get("clipped")]
        axes[1].plot([e["iter"] for e in normed], [e["grad_norm"] for e in normed], lw=1, label="before clipping")
        axes[1].plot([e["iter"] for e in clipped], [e["grad_norm"] for e in clipped], "rx", ms=4, label="clipped")
        axes[1].set(xlabel="step", ylabel="gradient norm", yscale="log")
    if scored:  # the core score, and a line per task (a task evaluated at some evaluations only: those points)
        for key in ["core", *dict.fromkeys(k for e in scored for k in e if k.endswith("_centered"))]:
            steps, values = zip(*[(e["iter"], e[key]) for e in scored if key in e])
            axes[-1].plot(steps, values, "o-", ms=3, lw=2.5 if key == "core" else 1,
                          label=key.removesuffix("_centered"))
        axes[-1].set(xlabel="step", ylabel="accuracy centered on chance")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
    width = 7 * panels  # inches; fixed margins (tight_layout took a third of the drawing time)
    fig.subplots_adjust(left=0.65 / width, right=1 - 0.15 / width, bottom=0.12, top=0.96, wspace=0.15)
    with atomic_output(png_path) as tmp:
        fig.savefig(tmp, format="png")


def perplexity(losses: list[float], num_tokens: list[int]) -> float:
    """exp of the token-weighted mean loss (nats per token); inf past exp's range (a diverging run), NaN stays NaN."""
    loss = sum(l * n for l, n in zip(losses, num_tokens)) / sum(num_tokens)
    try:
        return math.exp(loss)
    except OverflowError:
        return math.inf
