"""Rows over several adapter slots at once: fixed weights per request, or per-token gate weights."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Protocol

import torch
from torch import Tensor

from lorafleet.layers.multilora import (
    SlotPlan,
    add_lora_gathered_,
    add_lora_segmented_,
    plan_rows,
)


class MixtureGate(Protocol):
    """Per-token weights over a mixture's K candidate slots (MoLE's gates plug in here).

    Every MultiLoRALinear the mixture's rows pass calls the gate once per forward, in the
    model's execution order, with `layer`: that layer's module name (MoLE keys its gates on it:
    one per layer, or one per transformer block computed at the block's first layer and reused
    by the block's later layers in the same forward); `x`: [n, d_in] the rows'
    layer input; `slots`: the K candidate slots; `deltas`: [n, K, d_out], candidate k's delta
    s_k B_k A_k x per row, when the gate sets `wants_deltas` (else None, and nothing per
    candidate is materialised). It returns weights [n, K] (any float dtype; x's device)."""

    wants_deltas: bool

    def __call__(
        self, layer: str, x: Tensor, slots: tuple[int, ...], deltas: Tensor | None
    ) -> Tensor: ...


@dataclass(frozen=True)
class RowMixture:
    """Rows that use the K slots `slots` together, with fixed `weights` (one per slot, the same
    for every row) or a `gate` (weights per row and layer). `rows` index the flattened rows
    [T], or the sequences when the context's slot map has one entry per sequence."""

    rows: Sequence[int]
    slots: tuple[int, ...]
    weights: tuple[float, ...] | None = None
    gate: MixtureGate | None = None

    def __post_init__(self):
        if not self.slots or (self.weights is None) == (self.gate is None):
            raise ValueError("a row mixture needs one or more slots and either weights or a gate")
        if self.weights is not None and len(self.weights) != len(self.slots):
            raise ValueError(f"{len(self.weights)} weights for {len(self.slots)} mixture slots")
        if min(self.slots) < 0:
            raise ValueError(f"slot indices must be >= 0, got {min(self.slots)}")


@dataclass(frozen=True)
class Entries:
    """A batch's mixtures as (row, slot, weight) entries, one per row and candidate, mixture
    by mixture, candidate-major within a mixture ([K, n] order). Gates that want the
    candidates' deltas are kept apart in `direct` (computed per mixture, not as entries).

    rows, slots: [E] long; fixed: [E] float64 on the CPU (cast once per dtype by the plan),
    the fixed weights (0 where a gate decides);
    gated: (gate, rows [n], slots, first entry) per gated mixture; direct: (gate, rows, slots)."""

    rows: Tensor
    slots: Tensor
    fixed: Tensor
    gated: tuple[tuple[MixtureGate, Tensor, tuple[int, ...], int], ...]
    direct: tuple[tuple[MixtureGate, Tensor, tuple[int, ...]], ...]
    top: int  # the largest slot any entry or direct mixture uses


def coalesce(mixtures: Sequence[RowMixture]) -> list[RowMixture]:
    """Gated mixtures with the same gate object and slots as one mixture over all their rows
    (a gate's weights are per row, so this changes nothing but the number of gate calls: one
    per layer for all of a MoLE's requests rather than one per request)."""
    out, by_gate = [], {}
    for mix in mixtures:
        if mix.gate is None:
            out.append(mix)
            continue
        key = (id(mix.gate), tuple(mix.slots))
        if key in by_gate:
            first = out[by_gate[key]]
            out[by_gate[key]] = replace(first, rows=[*first.rows, *mix.rows])
        else:
            by_gate[key] = len(out)
            out.append(mix)
    return out


def expand(mixtures: Sequence[RowMixture], n_units: int, per_unit: int, device) -> Entries:
    """Entries for `mixtures` whose rows index `n_units` units of `per_unit` rows each (1 for a
    per-row map; the sequence length for a per-sequence map)."""
    mixtures = coalesce(mixtures)
    rows, slots, fixed, gated, direct, top, count = [], [], [], [], [], 0, 0
    offsets = torch.arange(per_unit, device=device)  # [per_unit]
    for mix in mixtures:
        units = torch.as_tensor(list(mix.rows), dtype=torch.long, device=device)  # [u]
        if units.numel() and (units.min() < 0 or units.max() >= n_units):
            raise ValueError(f"mixture rows must be in 0..{n_units - 1}, got {mix.rows}")
        mix_rows = (units[:, None] * per_unit + offsets[None, :]).reshape(-1)  # [u*per_unit]
        top = max(top, *mix.slots)
        if mix.gate is not None and getattr(mix.gate, "wants_deltas", False):
            direct.append((mix.gate, mix_rows, tuple(mix.slots)))
            continue
        n, k = mix_rows.numel(), len(mix.slots)
        if mix.gate is not None:
            gated.append((mix.gate, mix_rows, tuple(mix.slots), count))
        rows.append(mix_rows.repeat(k))  # [K*n], candidate-major
        slot_t = torch.tensor(mix.slots, dtype=torch.long, device=device)  # [K]
        slots.append(slot_t.repeat_interleave(n))  # [K*n]
        # [K], on the CPU: cast once per step to the rows' dtype and device (MixturePlan.fixed)
        w = torch.tensor(mix.weights or [0.0] * k, dtype=torch.float64, device="cpu")
        fixed.append(w.repeat_interleave(n))  # [K*n]
        count += k * n
    empty = torch.zeros(0, dtype=torch.long, device=device)
    return Entries(
        torch.cat(rows) if rows else empty,
        torch.cat(slots) if slots else empty,
        torch.cat(fixed) if fixed else torch.zeros(0, dtype=torch.float64, device="cpu"),
        tuple(gated),
        tuple(direct),
        top,
    )


def gate_weights(
    gate: MixtureGate, layer: str, x: Tensor, slots: tuple[int, ...], deltas: Tensor | None = None
) -> Tensor:
    """The gate's weights for rows x: [n, d_in], checked to be [n, K]."""
    w = gate(layer, x, slots, deltas)
    if tuple(w.shape) != (x.shape[0], len(slots)):
        raise ValueError(
            f"the mixture gate returned weights of shape {tuple(w.shape)} at {layer or 'a layer'}"
            f", expected ({x.shape[0]}, {len(slots)})"
        )
    return w


def add_direct_(
    y: Tensor, x: Tensor, A: Tensor, Bt: Tensor, ranks: list[int], entries: Entries, layer: str
) -> None:
    """y += sum_k w[:, k] * delta_k for mixtures whose gate reads the candidates' deltas.

    A: [S, r_max, d_in], Bt: [S, r_max, d_out] (scale folded in); deltas: [n, K, d_out]."""
    for gate, rows, slots in entries.direct:
        xr = x.index_select(0, rows)  # [n, d_in]
        deltas = torch.stack(
            [(xr @ A[s, : ranks[s]].T) @ Bt[s, : ranks[s]] for s in slots], dim=1
        )  # [n, K, d_out]
        w = gate_weights(gate, layer, xr, slots, deltas).to(deltas.dtype)  # [n, K]
        y.index_add_(0, rows, torch.bmm(w.unsqueeze(1), deltas).squeeze(1))  # [n, d_out]


@dataclass(frozen=True)
class MixturePlan:
    """A batch's mixture rows as (row, slot, weight) entries, planned as rows are: `plan`'s
    rows (segmented) or group sources (gathered) index x and y, and may repeat a row (one
    entry per candidate; the scatter-add sums them). `index`: [E] or [G*m], the entry at each
    plan position (`index_cpu`: the same on the CPU)."""

    entries: Entries
    plan: SlotPlan
    index: Tensor
    index_cpu: Tensor
    _cast: dict = field(default_factory=dict, repr=False)  # (dtype, device, ordered) -> weights

    def fixed(self, dtype, device, ordered: bool) -> Tensor:
        """The fixed weights at the plan's positions (`ordered`) or per entry, cast once."""
        key = (dtype, device, ordered)
        if key not in self._cast:
            w = self.entries.fixed
            w = w.index_select(0, self.index_cpu) if ordered else w
            self._cast[key] = w.to(device=device, dtype=dtype)
        return self._cast[key]

    def weights(self, x: Tensor, layer: str) -> Tensor:
        """This layer's weight at each plan position, in x's dtype: the fixed ones, with each
        gated mixture's [n, K] gate output laid out candidate-major in its entries."""
        if not self.entries.gated:
            return self.fixed(x.dtype, x.device, ordered=True)
        w = self.fixed(x.dtype, x.device, ordered=False).clone()  # [E]
        for gate, rows, slots, first in self.entries.gated:
            g = gate_weights(gate, layer, x.index_select(0, rows), slots)  # [n, K]
            w[first : first + g.numel()] = g.T.reshape(-1)  # [K, n] -> [K*n]
        return w.index_select(0, self.index)


def plan_mixtures(entries: Entries, path: str | None = None) -> MixturePlan:
    """Group the entries by slot (`plan_rows`) and point the plan at the entries' rows of x."""
    plan = plan_rows(entries.slots, path)
    n = entries.slots.numel()
    order = plan.rows if plan.rows is not None else torch.arange(n, device=entries.slots.device)
    rows = entries.rows.index_select(0, order)  # [E]: x's row for each grouped entry
    if plan.path == "gathered":
        lay = plan.groups
        index = lay.src  # [G*m] entries (padding: entry 0, masked)
        groups = replace(lay, src=entries.rows.index_select(0, index), identity=False)
        plan = replace(plan, rows=rows, groups=groups)
    else:
        plan, index = replace(plan, rows=rows), order
    return MixturePlan(entries, plan, index, index.cpu())


def add_mixture_(
    y: Tensor, x: Tensor, A: Tensor, Bt: Tensor, ranks: list[int], mix: MixturePlan, layer: str = ""
) -> Tensor:
    """y[i] += sum_k w_ik * (x[i] @ A[s_k].T) @ Bt[s_k] over the mixture rows, in place.

    y: [T, d_out], x: [T, d_in], A: [S, r_max, d_in], Bt: [S, r_max, d_out] (scale folded in;
    a MultiLoRALinear's buffers); `ranks[s]`: slot s's true rank; `layer`: told to gates."""
    plan, B = mix.plan, Bt.transpose(1, 2)  # B: [S, d_out, r_max], a view
    if plan.path != "none":
        w = mix.weights(x, layer)  # [E] or [G*m]
        if plan.path == "segmented":
            add_lora_segmented_(y, x, A, B, None, plan, ranks, w)
        else:
            add_lora_gathered_(y, x, A, B, None, plan, max(ranks), w)
    if mix.entries.direct:
        add_direct_(y, x, A, Bt, ranks, mix.entries, layer)
    return y
