"""Perplexity from mean token losses: an `evaluate` metric that runs offline (load it by path:
evaluate.load(".../assets/perplexity")). evaluate's own "perplexity" loads a model from the Hub by id; training
already has the losses: the mean cross-entropy (nats per token) of each evaluated batch and its token count."""

import math

import datasets
import evaluate

_KWARGS_DESCRIPTION = """
Args:
    losses: mean cross-entropy (natural log) of each batch.
    num_tokens: tokens in each batch (weights of the mean; equal counts for equal weights).
Returns:
    perplexity: exp of the token-weighted mean loss; loss: the token-weighted mean loss.
"""


class Perplexity(evaluate.Metric):
    def _info(self):
        features = datasets.Features({"losses": datasets.Value("float64"), "num_tokens": datasets.Value("int64")})
        return evaluate.MetricInfo(description="Perplexity = exp(the token-weighted mean of per-batch mean losses).",
                                   citation="", inputs_description=_KWARGS_DESCRIPTION, features=features)

    def _compute(self, losses, num_tokens):
        loss = sum(l * n for l, n in zip(losses, num_tokens)) / sum(num_tokens)
        # a diverging run's finite loss can exceed exp's range (~709.78): its perplexity is infinite, not an error
        return {"perplexity": math.inf if loss >= 709.0 else math.exp(loss), "loss": loss}  # NaN stays NaN
