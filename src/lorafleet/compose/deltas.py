"""An adapter's weight deltas s * B @ A per module, as factors or dense, and exact re-factoring.

Every key, rank, alpha and scale question goes to `adapters.lora_keys`. A module's delta is kept
as a factor pair (B [d_out, k], A [k, d_in], scale folded into B) in float64; `compact` turns a
pair into the fewest factors that hold the same product (exact up to float64 rounding), or into
the best rank-k approximation (Eckart-Young) with its Frobenius error.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lorafleet.adapters.format import Adapter
from lorafleet.adapters.lora_keys import LoraKeyError, lora_pairs, module_scale
from lorafleet.adapters.methods import find_method
from lorafleet.errors import LorafleetError

# Singular values below this fraction of the largest are rounding noise of an exact product.
RANK_TOL = 1e-10


class MergeError(LorafleetError):
    """Adapters that cannot be merged exactly; the message says which and why (one line)."""


@dataclass
class Factors:
    """One module's delta as B @ A (scale already folded into B), float64."""

    B: torch.Tensor  # [d_out, k]
    A: torch.Tensor  # [k, d_in]

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.B.shape[0]), int(self.A.shape[1])

    def dense(self) -> torch.Tensor:
        return self.B @ self.A


def _where(adapter: Adapter) -> str:
    return str(adapter.path) if adapter.path is not None else "adapter"


def check_mergeable(adapter: Adapter) -> None:
    """Refuse, in one line, an adapter whose delta is not s * B @ A over linear layers."""
    where = _where(adapter)
    config = adapter.config
    method = find_method(config)
    if method is None or not method.factored:
        title = method.title if method else adapter.method
        delta = f": their delta is {method.delta}" if method else ""
        raise MergeError(
            f"{where}: {title} (peft_type {adapter.peft_type}) adapters cannot be merged{delta}, "
            "not s * B @ A (refused rather than merged wrongly)"
        )
    if config.get("lora_bias"):
        raise MergeError(f"{where}: adapters with a LoRA bias (lora_bias) cannot be merged")
    if config.get("fan_in_fan_out"):
        raise MergeError(f"{where}: fan_in_fan_out (Conv1D) adapters cannot be merged")
    try:
        lora_pairs(adapter.tensors, strict=True)
    except LoraKeyError as exc:
        raise MergeError(
            f"{where}: {exc}: only LoRA A/B weights of linear layers can be merged "
            "(embeddings, biases and modules_to_save are refused)"
        ) from exc


def adapter_factors(adapter: Adapter) -> dict[str, Factors]:
    """{module: Factors(s * B, A)} for every module of a mergeable adapter (float64)."""
    check_mergeable(adapter)
    out = {}
    for module, (a, b) in lora_pairs(adapter.tensors).items():
        scale = module_scale(adapter.config, module)
        out[module] = Factors(B=scale * b.detach().to(torch.float64), A=a.detach().double())
    return out


def dense_deltas(adapter: Adapter) -> dict[str, torch.Tensor]:
    """{module: s * B @ A} [d_out, d_in] in float64: the adapter's exact weight deltas."""
    return {m: f.dense() for m, f in adapter_factors(adapter).items()}


def _balanced(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, k: int) -> Factors:
    root = s[:k].sqrt()
    return Factors(B=u[:, :k] * root, A=root[:, None] * vh[:k])


def _zero(shape: tuple[int, int]) -> Factors:
    d_out, d_in = shape
    return Factors(B=torch.zeros(d_out, 1, dtype=torch.float64), A=torch.zeros(1, d_in).double())


def compact(f: Factors, rank: int | None = None) -> tuple[Factors, float, float]:
    """(factors, error, norm): the same product B @ A with the fewest factors (`rank` None), or
    its best rank-`rank` approximation; `error` is ||BA - B'A'||_F (the optimal truncation error,
    i.e. the norm of the dropped singular values) and `norm` is ||BA||_F. Works in the small
    k x k core (QR of B and of A^T), never on the dense [d_out, d_in] matrix."""
    qb, rb = torch.linalg.qr(f.B)  # B = Qb Rb
    qa, ra = torch.linalg.qr(f.A.T)  # A = Ra^T Qa^T
    u, s, vh = torch.linalg.svd(rb @ ra.T)
    return _split(qb @ u, s, vh @ qa.T, f.shape, rank)


def svd_factors(dense: torch.Tensor, rank: int | None = None) -> tuple[Factors, float, float]:
    """`compact` for a dense delta (ties / DARE results): best rank-`rank` factors and error."""
    u, s, vh = torch.linalg.svd(dense.to(torch.float64), full_matrices=False)
    return _split(u, s, vh, tuple(dense.shape), rank)


def _split(u, s, vh, shape, rank: int | None) -> tuple[Factors, float, float]:
    norm = float(s.norm())
    exact = int((s > s[0] * RANK_TOL).sum()) if s.numel() and s[0] > 0 else 0
    k = exact if rank is None else min(rank, exact)
    error = float(s[k:].norm()) if k < s.numel() else 0.0
    if k == 0:
        return _zero(shape), norm, norm
    return _balanced(u, s, vh, k), error, norm


def relative_error(errors: list[float], norms: list[float]) -> float:
    """sqrt(sum err^2 / sum norm^2) over modules: the whole merge's relative Frobenius error."""
    den = sum(n * n for n in norms)
    num = sum(e * e for e in errors)
    return math.sqrt(num / den) if den > 0 else math.sqrt(num)
