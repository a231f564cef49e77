"""Evaluation: generation, BLEU and the E2E NLG metrics, bootstrap intervals, task scoring,
perplexity."""

from alphatune.evaluate.generation import generate
from alphatune.evaluate.metrics import (
    MetricUnavailableError,
    bleu_length_ratio,
    bootstrap_interval,
    corpus_bleu,
    e2e_bleu,
    e2e_metrics,
    e2e_nist,
    missing_entities,
    paired_bootstrap_difference,
)
from alphatune.evaluate.perplexity import perplexity
from alphatune.evaluate.scoring import (
    TaskScore,
    check_prompt_lengths,
    context_length,
    score_generation,
)

__all__ = [
    "MetricUnavailableError",
    "TaskScore",
    "bleu_length_ratio",
    "bootstrap_interval",
    "check_prompt_lengths",
    "context_length",
    "corpus_bleu",
    "e2e_bleu",
    "e2e_metrics",
    "e2e_nist",
    "generate",
    "missing_entities",
    "paired_bootstrap_difference",
    "perplexity",
    "score_generation",
]
