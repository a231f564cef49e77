"""Evaluation: generation, BLEU and perplexity."""

from alphatune.evaluate.generation import generate
from alphatune.evaluate.metrics import corpus_bleu
from alphatune.evaluate.perplexity import perplexity

__all__ = ["corpus_bleu", "generate", "perplexity"]
