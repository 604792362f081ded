"""Aggregation rules for federated LoRA as pure functions over adapter tensors.

Every rule takes the clients' adapter tensors under PEFT's on-disk keys (adapters.lora_keys:
`base_model.model.<module>.lora_A.weight`, `...lora_B.weight`) and per-client weights (numbers
of examples; normalised here). Sums run in float64 so the exactness of FedEx-LoRA is not hidden
behind float32 rounding; results come back in the clients' dtype.

- `fedavg`: average A and B separately (inexact: mean(B_i A_i) != mean(B) mean(A)).
- `fedex`:  FedAvg's A', B' plus, per module, the residual s * (sum_i w_i B_i A_i - B'A'),
            which the server folds into the frozen base weight (FedEx-LoRA).
- `ffa`:    FFA-LoRA: A is frozen at a shared init, only B is averaged (exact by construction).

`validate_updates` runs first: clients with wrong keys or shapes, non-finite values, a bad
weight, a changed frozen A or an update norm far above the others' are dropped with a reason.
"""

from __future__ import annotations

import logging
import math
import statistics
from dataclasses import dataclass, field

import torch

from lorafleet.adapters.lora_keys import (
    PEFT_PREFIX,
    LoraKeyError,
    base_weight_name,
    lora_pairs,
    peft_key,
    split_key,
    uniform_scale,
)
from lorafleet.adapters.methods import find_method
from lorafleet.errors import LorafleetError
from lorafleet.fed.config import AGGREGATIONS

log = logging.getLogger("lorafleet.fed")

Tensors = dict[str, torch.Tensor]


@dataclass
class ClientUpdate:
    """One client's result of a round: its adapter tensors and its weight (examples)."""

    client: int
    tensors: Tensors
    weight: float
    metrics: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Dropped:
    """A client left out of a round, and why (shown to the user and kept in metrics.json)."""

    client: int
    reason: str


def lora_modules(tensors: Tensors) -> dict[str, tuple[str, str]]:
    """{module prefix (`base_model.model.<module>`): (A key, B key)} for every LoRA pair;
    anything else is an error."""
    try:
        pairs = lora_pairs(tensors)
    except LoraKeyError as exc:
        raise LorafleetError(
            f"{exc}: federated aggregation supports plain LoRA and rsLoRA adapters only"
        ) from exc
    return {PEFT_PREFIX + m: (peft_key(m, "A"), peft_key(m, "B")) for m in pairs}


def lora_scale(config: dict) -> float:
    """The LoRA scale s of an adapter config: alpha / r, or alpha / sqrt(r) for rsLoRA."""
    method = find_method(config)
    if method is None or not method.factored:
        what = method.title if method else f"peft_type {config.get('peft_type')}"
        raise LorafleetError(
            f"federated aggregation does not support {what}: it needs a plain s * B @ A delta"
        )
    try:
        return uniform_scale(config)
    except LoraKeyError as exc:
        raise LorafleetError(
            "federated aggregation needs one rank and alpha for every module"
        ) from exc


def normalise(weights: list[float]) -> list[float]:
    total = float(sum(weights))
    if not weights or not total > 0 or not math.isfinite(total):
        raise LorafleetError(f"client weights must be positive, got {weights}")
    return [float(w) / total for w in weights]


def _mean(tensors: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    acc = torch.zeros(tensors[0].shape, dtype=torch.float64)
    for t, w in zip(tensors, weights, strict=True):
        acc += w * t.detach().to(torch.float64)
    return acc


def fedavg(updates: list[Tensors], weights: list[float]) -> Tensors:
    """Weighted mean of every tensor (A and B averaged separately)."""
    ws = normalise(weights)
    return {k: _mean([u[k] for u in updates], ws).to(updates[0][k].dtype) for k in updates[0]}


def fedex(
    updates: list[Tensors], weights: list[float], scale: float
) -> tuple[Tensors, dict[str, torch.Tensor]]:
    """FedEx-LoRA: FedAvg's adapter and, per module (keyed by the base weight's name), the
    residual s * (sum_i w_i B_i A_i - B'A') [d_out x d_in] that makes the global model exact."""
    ws = normalise(weights)
    pairs = lora_modules(updates[0])
    new: Tensors = {}
    residuals: dict[str, torch.Tensor] = {}
    for prefix, (a_key, b_key) in pairs.items():
        a_avg = _mean([u[a_key] for u in updates], ws)  # [r, d_in]
        b_avg = _mean([u[b_key] for u in updates], ws)  # [d_out, r]
        exact = torch.zeros(b_avg.shape[0], a_avg.shape[1], dtype=torch.float64)
        for u, w in zip(updates, ws, strict=True):
            exact += w * (u[b_key].to(torch.float64) @ u[a_key].to(torch.float64))
        dtype = updates[0][a_key].dtype
        new[a_key], new[b_key] = a_avg.to(dtype), b_avg.to(dtype)
        # nn.Linear stores [out, in], the layout of B @ A: no transpose (unlike GPT-2's Conv1D).
        residuals[base_weight_name(prefix)] = (scale * (exact - b_avg @ a_avg)).to(dtype)
    return new, residuals


def ffa(updates: list[Tensors], weights: list[float]) -> Tensors:
    """FFA-LoRA: B is averaged; A stays the shared frozen init (the first client's copy, which
    validation has checked equals the global one)."""
    ws = normalise(weights)
    new: Tensors = {}
    for _, (a_key, b_key) in lora_modules(updates[0]).items():
        new[a_key] = updates[0][a_key].detach().clone()
        new[b_key] = _mean([u[b_key] for u in updates], ws).to(updates[0][b_key].dtype)
    return new


def aggregate(
    rule: str, updates: list[Tensors], weights: list[float], scale: float
) -> tuple[Tensors, dict[str, torch.Tensor]]:
    """Dispatch by name; returns (new adapter tensors, residuals (empty unless fedex))."""
    if rule == "fedex":
        return fedex(updates, weights, scale)
    if rule == "fedavg":
        return fedavg(updates, weights), {}
    if rule == "ffa":
        return ffa(updates, weights), {}
    raise LorafleetError(f"unknown aggregation {rule!r}: use {', '.join(AGGREGATIONS)}")


def effective_deltas(tensors: Tensors, scale: float) -> dict[str, torch.Tensor]:
    """s * B @ A per module (float64), keyed by the base weight name."""
    return {
        base_weight_name(prefix): scale * (tensors[b].to(torch.float64) @ tensors[a].double())
        for prefix, (a, b) in lora_modules(tensors).items()
    }


def aggregation_error(
    updates: list[Tensors],
    weights: list[float],
    new: Tensors,
    residuals: dict[str, torch.Tensor],
    scale: float,
) -> float:
    """Relative Frobenius distance between the global model's weight delta (residual + s B'A')
    and the ideal one, the weighted mean of the clients' deltas: 0 for an exact rule."""
    ws = normalise(weights)
    client_deltas = [effective_deltas(u, scale) for u in updates]
    got = effective_deltas(new, scale)
    num = den = 0.0
    for name, delta in got.items():
        ideal = sum(w * d[name] for w, d in zip(ws, client_deltas, strict=True))
        if name in residuals:
            delta = delta + residuals[name].to(torch.float64)
        num += float((delta - ideal).pow(2).sum())
        den += float(ideal.pow(2).sum())
    return math.sqrt(num / den) if den > 0 else math.sqrt(num)


def _shape_problem(tensors: Tensors, reference: Tensors) -> str | None:
    missing = sorted(set(reference) - set(tensors))
    extra = sorted(set(tensors) - set(reference))
    if missing or extra:
        which = f"lacks {missing[0]}" if missing else f"has unknown tensor {extra[0]}"
        return f"other targets than the global adapter ({which})"
    for key, ref in reference.items():
        t = tensors[key]
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != tuple(ref.shape):
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            return f"wrong shape for {key}: {shape}, expected {tuple(ref.shape)}"
    return None


def _is_a(key: str) -> bool:
    split = split_key(key)
    return split is not None and split[1] == "A"


def _delta_norm(tensors: Tensors, reference: Tensors) -> float:
    return math.sqrt(
        sum(
            float((tensors[k].double() - ref.double()).pow(2).sum()) for k, ref in reference.items()
        )
    )


def validate_updates(
    updates: list[ClientUpdate],
    reference: Tensors,
    *,
    norm_bound: float = 10.0,
    frozen_a: bool = False,
) -> tuple[list[ClientUpdate], list[Dropped]]:
    """Split updates into (kept, dropped). `reference` is the global adapter the clients
    started from. A client is dropped when its keys or shapes differ from the reference, a
    value is NaN/inf, its weight is not a positive number, it changed A under FFA
    (`frozen_a`), or its update norm ||theta_i - theta_global|| exceeds `norm_bound` times the
    median of the other clients' norms (0 turns the norm check off). Each drop is logged."""
    kept: list[ClientUpdate] = []
    dropped: list[Dropped] = []

    def drop(u: ClientUpdate, reason: str) -> None:
        dropped.append(Dropped(u.client, reason))
        log.warning("client %s dropped from the round: %s", u.client, reason)

    for u in updates:
        problem = _shape_problem(u.tensors, reference)
        if problem is None:
            bad = [k for k, t in u.tensors.items() if not bool(torch.isfinite(t).all())]
            if bad:
                problem = f"non-finite values in {bad[0]}"
        w = u.weight
        if problem is None and not (isinstance(w, (int, float)) and math.isfinite(w) and w > 0):
            problem = f"weight must be a positive number of examples, got {w!r}"
        if problem is None and frozen_a:
            moved = [
                k for k in reference if _is_a(k) and not torch.equal(u.tensors[k], reference[k])
            ]
            if moved:
                problem = f"changed the frozen A ({moved[0]}) under FFA-LoRA"
        if problem is None:
            kept.append(u)
        else:
            drop(u, problem)
    if norm_bound > 0 and len(kept) >= 2:
        norms = [_delta_norm(u.tensors, reference) for u in kept]
        outliers = set()
        for i, n in enumerate(norms):
            median = statistics.median(norms[:i] + norms[i + 1 :])  # the other clients'
            if median > 0 and n > norm_bound * median:
                outliers.add(i)
                drop(
                    kept[i],
                    f"update norm {n:.3g} is over {norm_bound:g}x the others' ({median:.3g})",
                )
        kept = [u for i, u in enumerate(kept) if i not in outliers]
    return kept, dropped
