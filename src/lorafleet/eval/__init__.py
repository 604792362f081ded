"""Evaluation: exact match / contains for generation, log-likelihood accuracy, perplexity."""

from lorafleet.eval.evaluate import METRICS, evaluate
from lorafleet.eval.metrics import accuracy, contains, exact_match, extract_answer, perplexity

__all__ = [
    "METRICS",
    "accuracy",
    "contains",
    "evaluate",
    "exact_match",
    "extract_answer",
    "perplexity",
]
