"""Laplace-LoRA class probabilities for the server (`class_choices`), injected by the CLI.

The engine's model carries MultiLoRA slots, but the Laplace predictive needs the adapter as a
PEFT module with gradients, so a private copy of the base (made on first use) serves these
requests, one calibrated adapter attached at a time. Implements serve.api's Classifier."""

from __future__ import annotations

import copy
import threading
from collections.abc import Callable
from pathlib import Path

from torch import nn

from lorafleet.adapters import attach, read_adapter
from lorafleet.bayes.io import FACTORS_NAME, INFO_NAME, load_factors
from lorafleet.bayes.predictive import laplace_class_probs
from lorafleet.errors import LorafleetError
from lorafleet.layers import MultiLoRALinear


def plain_copy(model: nn.Module, exclusive) -> nn.Module:
    """A deep copy of `model` with its MultiLoRA layers replaced by their base linears, taken
    while the context manager `exclusive` is held (so no slot is rewritten meanwhile)."""
    with exclusive:
        model = copy.deepcopy(model)
    for name, module in list(model.named_modules()):
        if isinstance(module, MultiLoRALinear):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, module.base_layer)
    return model.eval()


class LaplaceClassifier:
    """Calibrated adapters' class probabilities; thread-safe (one request at a time).

    `base_copy()` gives a plain copy of the base model (called once, on first use);
    `path_of(name)` the adapter's directory (None when unknown)."""

    def __init__(
        self, base_copy: Callable[[], nn.Module], tokenizer, path_of: Callable[[str], Path | None]
    ):
        self.base_copy, self.tokenizer, self.path_of = base_copy, tokenizer, path_of
        self._lock = threading.Lock()
        self._plain = None  # the base's copy, PEFT attached to it while in use
        self._attached: tuple[str, object, object] | None = None  # (name, peft model, factors)

    def problem(self, adapter: str) -> str | None:
        """None when `adapter` is calibrated (has laplace.json), else a one-line reason."""
        path = self.path_of(adapter)
        if path is None or not (path / INFO_NAME).is_file():
            return (
                f"adapter {adapter} is not calibrated (no {INFO_NAME}): run "
                "`lorafleet calibrate` on it to get class_probs"
            )
        return None

    def probs(self, adapter: str, prompt: str, choices: list[str]) -> dict:
        """{"labels", "probs", "method": "laplace", "prior_precision"} for one prompt; a
        one-line LorafleetError when the adapter or its factors cannot be used."""
        with self._lock:
            model, factors = self._model(adapter)
            probs = laplace_class_probs(model, self.tokenizer, factors, prompt, choices)
        return {
            "labels": list(choices),
            "probs": probs,
            "method": "laplace",
            "prior_precision": getattr(factors, "prior_precision", None),
        }

    def _model(self, name: str):
        """(PEFT model with `name` attached, its factors); the lock is held."""
        if self._attached is not None and self._attached[0] == name:
            return self._attached[1], self._attached[2]
        if self._attached is not None:
            self._plain = self._attached[1].unload()  # the plain copy back, for the next adapter
            self._attached = None
        problem = self.problem(name)
        if problem:
            raise LorafleetError(problem)
        path = self.path_of(name)
        if self._plain is None:
            self._plain = self.base_copy()
        factors = load_factors(path)
        peft_model = attach(self._plain, read_adapter(path))
        self._attached = (name, peft_model, factors)
        return peft_model, factors


class CalibrationKind:
    """Calibrated adapters (an adapter dir holding laplace.json or its factors) as one kind of
    a server's directory entries (serve.entries.EntryKind): its factors are read and checked
    against the adapter's weights when it appears or changes, so a broken or stale calibration
    makes that entry unavailable, with its reason, instead of failing its requests one by one."""

    kind = "calibrated"
    label = "calibrated adapter"
    usage = ""
    pool = False

    def claims(self, path: Path) -> bool:
        return (path / INFO_NAME).is_file() or (path / FACTORS_NAME).is_file()

    def check(self, name: str, path: Path) -> tuple:
        load_factors(path)  # one-line errors: missing, invalid, non-finite, stale
        return ()

    def drop(self, name: str) -> None:
        pass  # nothing held: the registry serves the adapter, the classifier reads on use


def laplace_classifier(engine, registry) -> LaplaceClassifier:
    """The classifier for a server's engine and adapter registry (`build_state(classifier=)`);
    calibrations in the registry's directory are checked as its entries (CalibrationKind)."""
    if registry is not None:
        registry.add_kind(CalibrationKind())
    return LaplaceClassifier(
        lambda: plain_copy(engine.base.model, engine.exclusive()),
        engine.tokenizer,
        registry.path_of if registry is not None else lambda name: None,
    )
