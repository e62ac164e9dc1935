"""Perplexity from mean token losses: an `evaluate` metric that runs offline.

evaluate's own "perplexity" metric loads a model from the Hub by id; training already has the losses, so this one
takes the mean cross-entropy (nats per token) of each evaluated batch and its token count, and returns
exp(token-weighted mean loss). Load it by path: evaluate.load(".../assets/perplexity").
"""

import math

import datasets
import evaluate

_DESCRIPTION = "Perplexity = exp(mean negative log-likelihood per token), from per-batch mean losses."
_KWARGS_DESCRIPTION = """
Args:
    losses: mean cross-entropy (natural log) of each batch.
    num_tokens: tokens in each batch (weights of the mean; equal counts for equal weights).
Returns:
    perplexity: exp of the token-weighted mean loss.
    loss: the token-weighted mean loss.
"""


class Perplexity(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"losses": datasets.Value("float64"), "num_tokens": datasets.Value("int64")}),
        )

    def _compute(self, losses, num_tokens):
        total = sum(num_tokens)
        loss = sum(l * n for l, n in zip(losses, num_tokens)) / total
        # a diverging run's finite loss can exceed exp's range (~709.78): its perplexity is infinite, not an error
        return {"perplexity": math.inf if loss >= 709.0 else math.exp(loss), "loss": loss}  # NaN stays NaN
