"""layers/norm.py: the fast RMSNorm equals transformers' module bit for bit, or is the module."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm
from transformers.models.llama.modeling_llama import LlamaRMSNorm
from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm

from lorafleet.layers import fast_norm
from lorafleet.layers.norm import is_llama_rms_norm


@pytest.mark.parametrize("cls", [LlamaRMSNorm, Qwen3RMSNorm])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("width", [16, 64, 576])
def test_fast_norm_is_bit_identical(cls, dtype, width):
    g = torch.Generator().manual_seed(width)
    module = cls(width, eps=1e-5)
    with torch.no_grad():
        module.weight.copy_(1 + 0.3 * torch.randn(width, generator=g))
    module = module.to(dtype)
    fast = fast_norm(module)
    assert fast is not module  # recognised: the shortcut
    for rows in (1, 3, 33):
        x = (4 * torch.randn(rows, width, generator=g)).to(dtype)
        got, want = fast(x), module(x)
        assert got.dtype == want.dtype
        assert torch.equal(got, want)


def test_fast_norm_reads_the_current_weight():
    module = LlamaRMSNorm(8)
    fast = fast_norm(module)
    module.weight = nn.Parameter(torch.full((8,), 2.0))  # e.g. a cast replaces the parameter
    x = torch.randn(2, 8)
    assert torch.equal(fast(x), module(x))


@pytest.mark.parametrize("module", [Gemma3RMSNorm(8), nn.LayerNorm(8)])
def test_other_norms_are_returned_as_they_are(module):
    assert not is_llama_rms_norm(module)
    assert fast_norm(module) is module


def test_a_changed_forward_is_not_taken_for_llamas():
    class Shifted(LlamaRMSNorm):
        def forward(self, hidden_states):
            return super().forward(hidden_states) + 1

    module = Shifted(8)
    assert fast_norm(module) is module
