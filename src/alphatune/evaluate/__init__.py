"""Evaluation: generation, BLEU and the E2E NLG metrics, bootstrap intervals, perplexity."""

from alphatune.evaluate.generation import generate
from alphatune.evaluate.metrics import (
    MetricUnavailableError,
    bootstrap_interval,
    corpus_bleu,
    e2e_bleu,
    e2e_metrics,
    e2e_nist,
)
from alphatune.evaluate.perplexity import perplexity

__all__ = [
    "MetricUnavailableError",
    "bootstrap_interval",
    "corpus_bleu",
    "e2e_bleu",
    "e2e_metrics",
    "e2e_nist",
    "generate",
    "perplexity",
]
