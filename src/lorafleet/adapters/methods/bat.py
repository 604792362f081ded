"""Bat (PEFT's MissConfig(init_weights="bat")): W' = W (I + b) + b per r x r block.

On disk: `base_model.model.<module>.miss_block` b [d_out / r, r, r]; every adapted linear's in
and out features must divide by r. W' = W + dW with dW's block (i, j) = W_ij b_i + b_i. Served:
dW depends on W, so it is precomputed dense at load and y += x dW^T for the row. Cost:
d_out x d_in per adapted linear per resident Bat adapter (a full copy of the adapted weights),
and one dense matmul per distinct Bat adapter in the batch per layer. A Bat slot cannot be part
of a mixture.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from lorafleet.adapters.methods import bone
from lorafleet.adapters.methods.base import (
    Method,
    MethodError,
    ModuleWeights,
    Part,
    SlotEntry,
)
from lorafleet.errors import LorafleetError

if TYPE_CHECKING:  # a type name only: the registry stays light (torch is imported on use)
    from torch import Tensor

INIT = "bat"
BLOCK = Part(bone.BLOCK.name, bone.BLOCK.suffix, lambda d: (d.d_out // d.r, d.r, d.r))


def bat_delta(W: Tensor, block: Tensor) -> Tensor:
    """Bat's dW: block (i, j) = W_ij b_i + b_i, as PEFT's MissLinear.get_delta_weight."""
    import torch

    with torch.no_grad():
        b = block.to(W.dtype)
        r = b.size(-1)
        # [in/r, out/r, r, r]
        Wb = W.reshape(W.size(0) // r, r, W.size(1) // r, r).permute(2, 0, 1, 3)
        return (Wb @ b + b).permute(1, 2, 0, 3).reshape(W.shape)  # [d_out, d_in]


def serve_bat(weights: ModuleWeights) -> SlotEntry:
    """No LoRA part: the dense delta dW [d_out, d_in], computed once here."""
    W, r = weights.weight, weights.r
    d_out, d_in = W.shape
    if d_out % r or d_in % r:
        raise MethodError(f"a {d_out}x{d_in} weight does not split into Bat's {r}x{r} blocks")
    return SlotEntry(None, None, 1.0, dense=bat_delta(W, weights.parts[BLOCK.name].to(W)))


def check_blocks(linears: Mapping[str, tuple[int, int]], r: int) -> None:
    """Bat splits each adapted weight into r x r blocks: in and out features must divide by r."""
    for name, (d_out, d_in) in linears.items():
        if d_in % r or d_out % r:
            raise LorafleetError(
                f"--method bat needs every adapted linear divisible into {r}x{r} blocks; "
                f"{name} is {d_out}x{d_in} (choose another --rank)"
            )


def _recognises(config: Mapping) -> bool:
    return config.get("init_weights") == INIT


METHOD = Method(
    name="bat",
    help="W (I + b) + b per r x r block (PEFT MiSS 'bat'), in and out divisible by r",
    title="Bat",
    peft_type=bone.PEFT_TYPE,
    parts=(BLOCK,),
    peft_config=lambda options: bone.miss_config(options, INIT),
    serve=serve_bat,
    delta="W_ij b_i + b_i per r x r block, which depends on the base weight",
    recognises=_recognises,
    default_r=bone.DEFAULT_R,
    check_targets=check_blocks,
)
