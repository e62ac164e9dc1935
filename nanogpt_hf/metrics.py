"""Run records: metrics.jsonl (one JSON object per log or eval event), the loss-curve PNG, and perplexity."""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os


class MetricsLog:
    """Appends events to out_dir/metrics.jsonl. On resume from step N, events after N (from the run that was
    interrupted) are dropped first, so the file reads as one uninterrupted run."""

    def __init__(self, path: str, resume_step: int | None = None):
        self.path = path
        if resume_step is None:
            open(path, "w").close()
        elif os.path.exists(path):
            kept = [e for e in read_metrics(path) if e.get("iter", 0) <= resume_step]
            _write_atomic(path, "".join(json.dumps(e) + "\n" for e in kept))

    def write(self, event: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(event) + "\n")


def read_metrics(path: str) -> list[dict]:
    events = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            try:
                events.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut short by a kill
                pass
    return events


def _replace_atomic(path: str, write, suffix: str = "") -> None:
    """write(tmp) then rename over path; a failed write (disk full) leaves neither a partial file nor a stray tmp."""
    tmp = f"{path}.tmp-{os.getpid()}{suffix}"
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def _write_atomic(path: str, text: str) -> None:
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)

    _replace_atomic(path, write)


def plot_losses(metrics_path: str, png_path: str) -> None:
    """Train (per logged step) and train/val (per evaluation) losses against the step, written atomically."""
    import matplotlib

    matplotlib.use("Agg")  # no display; safe in any process
    import matplotlib.pyplot as plt

    events = read_metrics(metrics_path)
    train = [(e["iter"], e["loss"]) for e in events if e.get("type") == "train"]
    evals = [e for e in events if e.get("type") == "eval"]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        ax.plot(*zip(*train), color="tab:blue", alpha=0.35, lw=1, label="train (step)")
    if evals:
        ax.plot([e["iter"] for e in evals], [e["train_loss"] for e in evals], "o-", color="tab:blue", ms=3,
                label="train (eval)")
        ax.plot([e["iter"] for e in evals], [e["val_loss"] for e in evals], "o-", color="tab:orange", ms=3,
                label="val (eval)")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    try:
        _replace_atomic(png_path, fig.savefig, suffix=".png")  # the suffix tells matplotlib the format
    finally:
        plt.close(fig)


@functools.cache
def perplexity_metric():
    """The perplexity metric shipped in the package, loaded by path (loading a metric by name needs the Hub)."""
    import evaluate

    return evaluate.load(os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "perplexity"))


def perplexity(losses: list[float], num_tokens: list[int]) -> float:
    if not all(math.isfinite(l) for l in losses):
        return math.nan
    return perplexity_metric().compute(losses=losses, num_tokens=num_tokens)["perplexity"]
