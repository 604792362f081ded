"""VeRA (PEFT's VeraConfig): frozen random projections shared by every layer, trained vectors.

On disk (save_projection true, PEFT's default and ours): once for the model,
`base_model.vera_A` [r, max_in] and `base_model.vera_B` [max_out, r] (max over the adapted
linears' in / out features; frozen, Kaiming-uniform from projection_prng_key); per adapted
module `base_model.model.<module>.vera_lambda_d` d [r] and `...vera_lambda_b` b [d_out], the
trained vectors (b starts at zero, so a new adapter is the base). PEFT's forward (eval, dropout
off): y = W x + bias + b * (B[:d_out] (d * (A[:, :d_in] x))), i.e. the delta is
diag(b) B[:d_out] diag(d) A[:, :d_in]. Served: a LoRA slot of rank r with
A' = d[:, None] * A[:, :d_in] [r, d_in], B' = b[:, None] * B[:d_out] [d_out, r] and scale 1.
Without saved projections (save_projection false) PEFT regenerates A and B from the model; the
batched op refuses such an adapter.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from lorafleet.adapters.methods.base import (
    Dims,
    Method,
    MethodError,
    ModuleWeights,
    Part,
    PeftOptions,
    SharedPart,
    SlotEntry,
    always,
)

if TYPE_CHECKING:  # a type name only: the registry stays light (PEFT is imported on use)
    from peft import VeraConfig

DEFAULT_R = 256  # VeraConfig's
LAMBDA_D = Part("vera_lambda_d", "vera_lambda_d", lambda d: (d.r,))
LAMBDA_B = Part("vera_lambda_b", "vera_lambda_b", lambda d: (d.d_out,))


def _saves_projection(config: Mapping) -> bool:
    return bool(config.get("save_projection", True))


def _rank(config: Mapping) -> int:
    return int(config.get("r", DEFAULT_R))


def _a_shape(config: Mapping, dims: Sequence[Dims]) -> tuple[int, ...]:
    return (_rank(config), max(d.d_in for d in dims))


def _b_shape(config: Mapping, dims: Sequence[Dims]) -> tuple[int, ...]:
    return (max(d.d_out for d in dims), _rank(config))


VERA_A = SharedPart("base_model.vera_A", _a_shape, _saves_projection)
VERA_B = SharedPart("base_model.vera_B", _b_shape, _saves_projection)


def _peft_config(options: PeftOptions) -> VeraConfig:
    from peft import VeraConfig

    return VeraConfig(
        r=options.rank,
        target_modules=list(options.targets),
        vera_dropout=options.dropout,
        save_projection=True,
        task_type="CAUSAL_LM",
    )


def serve_vera(weights: ModuleWeights) -> SlotEntry:
    """A LoRA slot: A' = d[:, None] * A[:, :d_in], B' = b[:, None] * B[:d_out], scale 1."""
    if VERA_A.key not in weights.shared or VERA_B.key not in weights.shared:
        raise MethodError(
            "VeRA without saved projections (save_projection false) cannot be served batched"
        )
    A, B = weights.shared[VERA_A.key], weights.shared[VERA_B.key]
    d_out, d_in = weights.weight.shape
    r = weights.r
    if A.shape[0] != r or B.shape[1] != r or A.shape[1] < d_in or B.shape[0] < d_out:
        raise MethodError(
            f"VeRA projections A {tuple(A.shape)} and B {tuple(B.shape)} do not cover a "
            f"{d_out}x{d_in} weight at rank {r}"
        )
    d, b = weights.parts[LAMBDA_D.name], weights.parts[LAMBDA_B.name]
    return SlotEntry(d[:, None] * A[:, :d_in], b[:, None] * B[:d_out, :], 1.0)


METHOD = Method(
    name="vera",
    help="frozen random A, B shared by all layers; trained vectors d [r], b [d_out] (VeRA)",
    title="VeRA",
    peft_type="VERA",
    parts=(LAMBDA_D, LAMBDA_B),
    shared=(VERA_A, VERA_B),
    peft_config=_peft_config,
    serve=serve_vera,
    delta="diag(b) B diag(d) A over frozen shared A, B (not stored as lora_A / lora_B)",
    recognises=always,
    default_r=DEFAULT_R,
)
