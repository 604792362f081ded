"""The engine's model runners, one per architecture family, and the table that picks one."""

from torch import nn

from lorafleet.errors import LorafleetError
from lorafleet.serve.runners.base import ModelRunner, StepInputs, rotate_half
from lorafleet.serve.runners.gemma3 import Gemma3Runner
from lorafleet.serve.runners.llama import LlamaRunner
from lorafleet.serve.runners.mistral import MinistralRunner, MistralRunner
from lorafleet.serve.runners.phi3 import Phi3Runner
from lorafleet.serve.runners.qwen2 import Qwen2Runner
from lorafleet.serve.runners.qwen3 import Qwen3Runner

# transformers' config.model_type -> the runner. Families whose blocks differ from their
# runner's only in modules it calls as the model's own (norms, MLP) share it.
RUNNERS: dict[str, type[ModelRunner]] = {
    "llama": LlamaRunner,
    "gemma3_text": Gemma3Runner,
    "qwen2": Qwen2Runner,
    "qwen3": Qwen3Runner,
    "mistral": MistralRunner,
    "ministral": MinistralRunner,
    "phi3": Phi3Runner,
    "starcoder2": MistralRunner,  # LayerNorms and a c_fc / c_proj MLP, called as modules
    "arcee": LlamaRunner,  # a ReLU^2 up / down MLP, called as a module
}


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
    "MinistralRunner",
    "MistralRunner",
    "ModelRunner",
    "Phi3Runner",
    "Qwen2Runner",
    "Qwen3Runner",
    "StepInputs",
    "rotate_half",
    "runner_class",
]
