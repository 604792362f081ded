"""Class probabilities from the server (`class_choices` on /v1/completions) through a Classifier
the CLI injects (Laplace-LoRA's, bayes.serving): serve/ knows only this Protocol."""

from __future__ import annotations

from typing import Protocol

from lorafleet.errors import LorafleetError
from lorafleet.serve.api.errors import APIError


class Classifier(Protocol):
    """Calibrated adapters' class probabilities (e.g. bayes.serving.LaplaceClassifier)."""

    def problem(self, adapter: str) -> str | None:
        """None when `adapter` can give class probabilities, else a one-line reason (e.g. it
        is not calibrated)."""
        ...

    def probs(self, adapter: str, prompt: str, choices: list[str]) -> dict:
        """{"labels", "probs", "method", ...} for one prompt; thread-safe; blocking; a
        one-line LorafleetError when the adapter cannot be used."""
        ...


def class_probs(
    classifier: Classifier | None, adapter: str, prompt: str, choices: list[str]
) -> dict:
    """The classifier's answer for `adapter`, or a 400 APIError. Blocking: call it from a
    worker thread."""
    if classifier is None:
        raise APIError(
            400,
            "class_choices is not available on this server (it was started without a classifier)",
            code="invalid_request",
            param="class_choices",
        )
    problem = classifier.problem(adapter)
    if problem:
        raise not_calibrated(problem)
    try:
        return classifier.probs(adapter, prompt, choices)
    except LorafleetError as exc:
        raise APIError(400, str(exc), code="invalid_request", param="class_choices") from None


def not_calibrated(message: str) -> APIError:
    return APIError(400, message, code="not_calibrated", param="class_choices")
