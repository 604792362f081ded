"""Bone (block affine; PEFT's MissConfig, default init): a block shared across input chunks.

On disk: `base_model.model.<module>.miss_block` [r, d_out] (MiSS-mini, init_weights "mini":
[r, mini_r], repeated d_out / mini_r times). In eval mode y = W x + b + (sum_j x_(j)) @ block,
x_(j) the r-sized chunks of x (zero-padded at the end). Served: that is LoRA with
B = block^T and A = [I_r ... I_r] (A[k, j] = 1 where j % r == k), scale 1: it takes a LoRA slot
of rank r.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from lorafleet.adapters.methods.base import (
    Dims,
    Method,
    MethodError,
    ModuleWeights,
    Part,
    PeftOptions,
    SlotEntry,
)

if TYPE_CHECKING:  # type names only: the registry stays light (torch, PEFT imported on use)
    from peft import MissConfig
    from torch import Tensor

PEFT_TYPE = "MISS"
DEFAULT_R = 64  # MissConfig's


def _block_shape(d: Dims) -> tuple[int, ...]:
    if d.config.get("init_weights") == "mini":
        return (d.r, int(d.config.get("mini_r", 1)))
    return (d.r, d.d_out)


BLOCK = Part("miss_block", "miss_block", _block_shape)


def miss_config(options: PeftOptions, init_weights: bool | str) -> MissConfig:
    """PEFT's MissConfig for `options` with MiSS's `init_weights` (True: Bone; "bat": Bat)."""
    from peft import MissConfig

    return MissConfig(
        r=options.rank,
        target_modules=list(options.targets),
        miss_dropout=options.dropout,
        init_weights=init_weights,
        task_type="CAUSAL_LM",
    )


def bone_A(r: int, d_in: int, like: Tensor) -> Tensor:
    """Bone's fixed A = [I_r ... I_r] (last block cut at d_in): A[k, j] = 1 where j % r == k."""
    import torch

    cols = torch.arange(d_in, device=like.device) % r  # [d_in]
    return (cols[None, :] == torch.arange(r, device=like.device)[:, None]).to(like.dtype)


def serve_bone(weights: ModuleWeights) -> SlotEntry:
    """A LoRA slot with A = [I_r ... I_r], B = block^T, scale 1 (MiSS-mini: block repeated)."""
    block, r, W = weights.parts[BLOCK.name], weights.r, weights.weight
    d_out, d_in = W.shape
    if weights.config.get("init_weights") == "mini":
        mini_r = block.shape[1]
        if d_out % mini_r:
            raise MethodError(f"a MiSS-mini block of width {mini_r} does not tile d_out {d_out}")
        block = block.repeat(1, d_out // mini_r)
    if r > d_in:
        raise MethodError(f"a {d_out}x{d_in} weight needs a MiSS block rank r <= {d_in}, got {r}")
    return SlotEntry(bone_A(r, d_in, W), block.T, 1.0)


def _recognises(config: Mapping) -> bool:
    return config.get("init_weights", True) != "bat"


def _label(config: Mapping) -> str:
    init = config.get("init_weights", True)
    return init if isinstance(init, str) else "bone"


METHOD = Method(
    name="bone",
    help="block affine (PEFT MiSS): one r x d_out block shared by the r-sized input chunks",
    title="Bone",
    peft_type=PEFT_TYPE,
    parts=(BLOCK,),
    peft_config=lambda options: miss_config(options, True),
    serve=serve_bone,
    delta="the block summed over input chunks (stored as a MiSS block, not as B @ A)",
    recognises=_recognises,
    default_r=DEFAULT_R,
    label=_label,
)
