"""Exact shortcuts for the models' own RMSNorm modules: the same result in fewer torch ops.

    norm = fast_norm(layer.input_layernorm)    # a callable; norm(x) == layer.input_layernorm(x)

transformers' Llama-style RMSNorm (LlamaRMSNorm and the classes copied from it: Qwen2/3,
Mistral, Phi-3, ...) computes, for x [..., d] and weight w [d]:

    w * (x.float() * rsqrt(mean(x.float()^2, -1) + eps)).to(x.dtype)

as eight tensor ops. `torch.nn.functional.rms_norm` computes the bracket as one fused op, with
the same reduction: for a float32 x and w the weight is fused in too (one op); otherwise the
float32 result is rounded to x's dtype first and then multiplied by w, as the module does (three
ops). Bit-identical to the module (tests/layers/test_norm.py); a module that is not recognised
(another norm, a changed forward) is returned as it is. Like the fused q/k/v projections
(layers/fused.py), the shortcut does not call the module, so its forward hooks do not run.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _llama_forward_code():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    return LlamaRMSNorm.forward.__code__


def is_llama_rms_norm(module: nn.Module) -> bool:
    """Whether `module` runs LlamaRMSNorm's forward (same bytecode and constants), with a
    `weight` [d] and a float `variance_epsilon`."""
    forward = getattr(type(module), "forward", None)
    code, ref = getattr(forward, "__code__", None), _llama_forward_code()
    same = code is not None and all(
        getattr(code, part) == getattr(ref, part) for part in ("co_code", "co_consts", "co_names")
    )
    if not same:
        return False
    weight = getattr(module, "weight", None)
    eps = getattr(module, "variance_epsilon", None)
    return isinstance(weight, Tensor) and weight.dim() == 1 and isinstance(eps, float)


def fast_norm(module: nn.Module) -> Callable[[Tensor], Tensor]:
    """A callable equal to `module` (x [..., d] -> [..., d]), in fewer ops when it is a
    Llama-style RMSNorm (module doc); otherwise the module itself."""
    if not is_llama_rms_norm(module):
        return module
    eps, shape = module.variance_epsilon, (module.weight.shape[0],)

    def norm(x: Tensor) -> Tensor:
        weight = module.weight  # read per call: a cast or reload replaces the parameter
        if x.dtype == torch.float32 and weight.dtype == torch.float32:
            return F.rms_norm(x, shape, weight, eps)
        return weight * F.rms_norm(x.float(), shape, eps=eps).to(x.dtype)

    return norm
