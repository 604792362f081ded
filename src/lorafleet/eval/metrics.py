"""Task metrics as pure functions: answer extraction, exact match, accuracy, perplexity."""

from __future__ import annotations

import math
import re

_SPACE = re.compile(r"\s+")


def extract_answer(text: str, marker: str | None) -> str:
    """The text after the LAST `marker` (the whole text without one), normalised for comparison:
    stripped, lower-cased, inner whitespace collapsed, trailing full stop dropped."""
    if marker and marker in text:
        text = text.rsplit(marker, 1)[1]
    # Generation often runs on past the answer; the answer is its first line.
    text = text.strip().split("\n", 1)[0]
    return _SPACE.sub(" ", text).strip().rstrip(".").lower()


def exact_match(predictions: list[str], references: list[str], marker: str | None) -> float:
    if len(predictions) != len(references):
        raise ValueError("predictions and references differ in length")
    if not references:
        return float("nan")
    hits = sum(
        extract_answer(p, marker) == extract_answer(r, marker)
        for p, r in zip(predictions, references, strict=True)
    )
    return hits / len(references)


def contains(predictions: list[str], references: list[str], marker: str | None) -> float:
    """Share of predictions whose normalised text contains the reference answer."""
    if len(predictions) != len(references):
        raise ValueError("predictions and references differ in length")
    if not references:
        return float("nan")
    hits = sum(
        extract_answer(r, marker) in _SPACE.sub(" ", p).lower()
        for p, r in zip(predictions, references, strict=True)
    )
    return hits / len(references)


def accuracy(predicted: list[int], labels: list[int]) -> float:
    if len(predicted) != len(labels):
        raise ValueError("predicted and labels differ in length")
    if not labels:
        return float("nan")
    return sum(p == y for p, y in zip(predicted, labels, strict=True)) / len(labels)


def label_token_loss(choice_logprobs: list[list[float]], labels: list[int]) -> float:
    """Mean over rows of -log p(the right choice's tokens | prompt), full-vocabulary log-probs
    (rows of `choice_logprobs`: one summed log-prob per choice). For one-token labels (sst2's
    "positive" / "negative") this is the label token's cross-entropy alone, without the
    end-of-turn token that the teacher-forced `loss` also averages in."""
    if len(choice_logprobs) != len(labels):
        raise ValueError("choice_logprobs and labels differ in length")
    if not labels:
        return float("nan")
    return -sum(row[y] for row, y in zip(choice_logprobs, labels, strict=True)) / len(labels)


def perplexity(mean_token_nll: float) -> float:
    return math.exp(min(mean_token_nll, 50.0))  # capped: exp overflows past ~709
