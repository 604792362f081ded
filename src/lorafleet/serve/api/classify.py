"""Laplace-LoRA class probabilities from the server (`class_choices` on /v1/completions).

The engine's model carries MultiLoRA slots, but the Laplace predictive needs the adapter as a
PEFT module with gradients, so a private copy of the base (made on first use) serves these
requests, one calibrated adapter attached at a time, off the event loop."""

from __future__ import annotations

import copy
import threading
from pathlib import Path

from lorafleet.errors import LorafleetError
from lorafleet.serve.api.errors import APIError

INFO_FILE = "laplace.json"


def _plain_copy(engine):
    """A deep copy of the engine's model with its MultiLoRA layers replaced by the base linears."""
    from lorafleet.layers import MultiLoRALinear

    with engine._lock:  # no slot is rewritten while the copy is taken
        model = copy.deepcopy(engine.base.model)
    for name, module in list(model.named_modules()):
        if isinstance(module, MultiLoRALinear):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, module.base_layer)
    return model.eval()


class Classifier:
    """Calibrated adapters' class probabilities; thread-safe (one request at a time)."""

    def __init__(self, engine, registry):
        self.engine, self.registry = engine, registry
        self._lock = threading.Lock()
        self._plain = None  # the base's copy, PEFT attached to it while in use
        self._attached: tuple[str, object, object] | None = None  # (name, peft model, factors)

    def adapter_dir(self, name: str) -> Path:
        path = self.registry._path_of(name) if self.registry is not None else None
        if path is None or not (path / INFO_FILE).is_file():
            raise APIError(400, f"adapter {name} is not calibrated (no {INFO_FILE}): run "
                           f"`lorafleet calibrate --adapter ... ` on it to get class_probs",
                           code="not_calibrated", param="class_choices")  # fmt: skip
        return path

    def _model(self, name: str, path: Path):
        from lorafleet.adapters import attach, read_adapter
        from lorafleet.bayes import load_factors

        if self._attached is not None and self._attached[0] == name:
            return self._attached[1], self._attached[2]
        if self._attached is not None:
            self._plain = self._attached[1].unload()  # the plain copy back, for the next adapter
            self._attached = None
        if self._plain is None:
            self._plain = _plain_copy(self.engine)
        factors = load_factors(path)
        peft_model = attach(self._plain, read_adapter(path))
        self._attached = (name, peft_model, factors)
        return peft_model, factors

    def probs(self, name: str, prompt: str, choices: list[str]) -> dict:
        """{"labels", "probs", "method": "laplace", "prior_precision"} for one prompt."""
        from lorafleet.bayes import laplace_class_probs

        path = self.adapter_dir(name)
        with self._lock:
            try:
                model, factors = self._model(name, path)
                probs = laplace_class_probs(model, self.engine.tokenizer, factors, prompt, choices)
            except LorafleetError as exc:
                raise APIError(
                    400, str(exc), code="invalid_request", param="class_choices"
                ) from None
        return {"labels": list(choices), "probs": probs, "method": "laplace",
                "prior_precision": getattr(factors, "prior_precision", None)}  # fmt: skip
