"""The engine's model runners, one per architecture family, and the table that picks one."""

from torch import nn

from lorafleet.errors import LorafleetError
from lorafleet.serve.runners.base import ModelRunner, StepInputs, rotate_half
from lorafleet.serve.runners.gemma3 import Gemma3Runner
from lorafleet.serve.runners.llama import LlamaRunner

RUNNERS: dict[str, type[ModelRunner]] = {"llama": LlamaRunner, "gemma3_text": Gemma3Runner}


def runner_class(model: nn.Module) -> type[ModelRunner]:
    """The runner for `model`'s architecture, or a one-line LorafleetError (before the engine
    changes the model)."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    cls = RUNNERS.get(model_type)
    if cls is None or not hasattr(getattr(model, "model", None), "layers"):
        supported = ", ".join(RUNNERS)
        raise LorafleetError(
            f"model type {model_type or type(model).__name__} is not supported by the engine "
            f"(supported: {supported})"
        )
    cls.check(model)
    return cls


__all__ = [
    "RUNNERS",
    "Gemma3Runner",
    "LlamaRunner",
    "ModelRunner",
    "StepInputs",
    "rotate_half",
    "runner_class",
]
