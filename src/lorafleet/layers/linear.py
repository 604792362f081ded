"""The multi-adapter linear layer and the batch context its layers share (the op: multilora.py)."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

from lorafleet import kernels
from lorafleet.adapters.methods import SlotEntry
from lorafleet.layers.mixture import MixturePlan, RowMixture, add_mixture_, expand, plan_mixtures
from lorafleet.layers.multilora import SlotPlan, add_lora_gathered_, add_lora_segmented_, plan_rows


class MultiLoRAContext:
    """The batch's row -> slot map and row mixtures, shared by every MultiLoRALinear of a model.

    The engine calls `set_slots` before each forward with one slot per row ([*lead] matching
    x's leading dims, e.g. [batch, seq]) or one per sequence ([batch]; expanded over the
    sequence), and optionally the rows that mix several slots (`RowMixture`: their rows index
    the same rows or sequences; give such rows slot 0 in the map). The plans are built once
    per forward and reused by every layer; replace the map with `set_slots` rather than
    editing the tensor in place. Not thread-safe."""

    def __init__(self, path: str | None = None):
        self.path = path  # force "segmented" / "gathered" (benchmarks, tests); None = choose
        self._slots: Tensor | None = None
        self._mixtures: tuple[RowMixture, ...] = ()
        self._plans: dict[tuple, tuple[SlotPlan | None, MixturePlan | None]] = {}
        # False while no row uses an adapter (no map, no mixtures): every layer is its base
        self.active = False

    @property
    def row_slots(self) -> Tensor | None:
        return self._slots

    @property
    def row_mixtures(self) -> tuple[RowMixture, ...]:
        return self._mixtures

    def set_slots(self, slots, mixtures: Iterable[RowMixture] = ()) -> None:
        """Set the slot map (tensor or list of ints, or None for no single-adapter rows) and
        the row mixtures."""
        self._plans = {}
        if slots is not None and not isinstance(slots, Tensor):  # a host list: a host tensor
            slots = torch.tensor(list(slots), dtype=torch.long, device="cpu")
        self._slots = None if slots is None else slots.long()  # moved per device in _build
        self._mixtures = tuple(mixtures or ())
        self.active = self._slots is not None or bool(self._mixtures)

    def clear(self) -> None:
        self.set_slots(None)

    def plan(self, lead: torch.Size, device: torch.device) -> SlotPlan | None:
        """The plan for an input with leading dims `lead`, or None when no map is set."""
        return self._both(lead, device)[0]

    def mixture_plan(self, lead: torch.Size, device: torch.device) -> MixturePlan | None:
        """The mixture rows' plan for an input with leading dims `lead`, or None without any."""
        return self._both(lead, device)[1]

    def _both(self, lead: torch.Size, device) -> tuple[SlotPlan | None, MixturePlan | None]:
        key = (tuple(lead), device)
        if key not in self._plans:
            self._plans[key] = self._build(lead, device)
        return self._plans[key]

    def _build(self, lead: torch.Size, device) -> tuple[SlotPlan | None, MixturePlan | None]:
        n_rows, per_unit, plan, mix = lead.numel(), 1, None, None
        if self._slots is not None:
            slots = self._slots.to(device)
            if slots.numel() != n_rows:
                if len(lead) < 2 or slots.numel() != lead[0]:
                    raise ValueError(
                        f"row_slots has {slots.numel()} entries; the input has leading dims "
                        f"{tuple(lead)} ({n_rows} rows, or one slot per sequence)"
                    )
                per_unit = n_rows // lead[0]
                slots = slots.reshape(-1).repeat_interleave(per_unit)  # [B] -> [B*S]
            plan = plan_rows(slots, self.path)
        if self._mixtures:
            entries = expand(self._mixtures, n_rows // per_unit, per_unit, device)
            mix = plan_mixtures(entries, self.path)
        return plan, mix


class MultiLoRALinear(nn.Module):
    """An nn.Linear (shared and frozen, not copied) plus stacked adapter slots; see module doc.

    Buffers: `lora_A` [S, r_max, d_in]; `lora_B` [S, d_out, r_max], a transposed view of the
    contiguous `lora_Bt` [S, r_max, d_out] holding scale[s] * B_s (the scale is folded in at
    load, so the hot path skips a multiply); `scale` [S] records the folded factors. DoRA slots
    also have a ratio [d_out] in `ratios`, Bat slots a dense delta [d_out, d_in] in `dense`
    (slot -> tensor; each method's module in adapters/methods/ says what it holds)."""

    def __init__(
        self,
        base_layer: nn.Linear,
        context: MultiLoRAContext,
        max_slots: int,
        max_rank: int,
        name: str = "",
    ):
        super().__init__()
        self.base_layer = base_layer
        self.context = context
        self.name = name  # the module's name in its model (what a mixture gate is told)
        w = base_layer.weight
        slots = max_slots + 1  # slot 0 = no adapter
        d_out, d_in = w.shape
        kw = {"dtype": w.dtype, "device": w.device}
        # Not persistent: the model's state_dict keeps only the base weights.
        self.register_buffer("lora_A", torch.zeros(slots, max_rank, d_in, **kw), persistent=False)
        self.register_buffer("lora_Bt", torch.zeros(slots, max_rank, d_out, **kw), persistent=False)
        self.register_buffer("scale", torch.zeros(slots, **kw), persistent=False)
        self.ranks = [0] * slots  # each slot's true rank in this layer (0 = not adapted)
        self.rank = 0  # the largest resident rank: what the gathered path computes with
        self.ratios: dict[int, Tensor] = {}  # DoRA: m / ||W + s B A||_row per slot, [d_out]
        self.dense: dict[int, Tensor] = {}  # Bat: W' - W per slot, [d_out, d_in]

    @property
    def lora_B(self) -> Tensor:
        return self.lora_Bt.transpose(1, 2)  # [S, d_out, r_max], a view

    @torch.no_grad()
    def set_slot(self, slot: int, A: Tensor, B: Tensor, scale: float) -> None:
        """Copy one adapter's A: (r, d_in), B: (d_out, r) into `slot` (no new buffers)."""
        r = A.shape[0]
        self.lora_A[slot, :r].copy_(A)
        self.lora_A[slot, r:].zero_()
        bt = self.lora_Bt[slot, :r]  # [r, d_out]
        bt.copy_(B.T)
        bt.mul_(scale)
        self.lora_Bt[slot, r:].zero_()
        self.scale[slot] = scale
        self.ranks[slot] = r
        self.rank = max(self.ranks)

    @torch.no_grad()
    def load_entry(self, slot: int, entry: SlotEntry) -> None:
        """Put one adapter's SlotEntry (LoRA part, DoRA ratio, Bat delta) into `slot`."""
        self.clear_slot(slot)
        w = self.lora_A  # the base's dtype and device (a quantised base's weight is not read)
        if entry.A is not None:
            self.set_slot(slot, entry.A, entry.B, entry.scale)
        if entry.ratio is not None:
            self.ratios[slot] = entry.ratio.to(w)
        if entry.dense is not None:
            self.dense[slot] = entry.dense.to(w)

    @torch.no_grad()
    def clear_slot(self, slot: int) -> None:
        self.ratios.pop(slot, None)
        self.dense.pop(slot, None)
        self.lora_A[slot].zero_()
        self.lora_Bt[slot].zero_()
        self.scale[slot] = 0.0
        self.ranks[slot] = 0
        self.rank = max(self.ranks)

    def forward(self, x: Tensor) -> Tensor:
        return self.add_adapters(x, base_product(self.base_layer, x))

    def add_adapters(self, x: Tensor, y: Tensor) -> Tensor:
        """y (the base product of x, [..., d_out]; may be a column block of a wider tensor)
        plus this layer's adapter terms for the context's rows, added in place; returns y."""
        if not self.context.active or (self.rank == 0 and not self.dense):
            return y  # no row uses an adapter, or none is resident here: the base layer
        plan = self.context.plan(x.shape[:-1], x.device)
        mix = self.context.mixture_plan(x.shape[:-1], x.device)
        if (plan is None or plan.path == "none") and mix is None:
            return y  # exactly the base layer
        x2 = x.reshape(-1, x.shape[-1])  # [..., d_in] -> [T, d_in]
        y2 = y.view(-1, y.shape[-1])  # [..., d_out] -> [T, d_out], shares y's memory
        if plan is not None and plan.path != "none":
            self._check_slot(plan.segments[-1][0])  # segments are sorted by slot
            if plan.path == "segmented":
                add_lora_segmented_(y2, x2, self.lora_A, self.lora_B, None, plan, self.ranks)
            elif self.rank:
                add_lora_gathered_(y2, x2, self.lora_A, self.lora_B, None, plan, self.rank)
            if self.ratios or self.dense:
                self._per_row_methods(y2, x2, plan)
        if mix is not None:
            self._check_slot(mix.entries.top)
            if self.ratios or self.dense:
                self._check_mixable(mix)
            add_mixture_(y2, x2, self.lora_A, self.lora_Bt, self.ranks, mix, self.name)
        return y

    def _per_row_methods(self, y2: Tensor, x2: Tensor, plan: SlotPlan) -> None:
        """Bat rows: y += x dW^T. DoRA rows (their LoRA term already added): y = r * (y - b) + b."""
        bias = self.base_layer.bias
        for slot, start, end in plan.segments:
            if slot not in self.dense and slot not in self.ratios:
                continue
            rows = slice(start, end) if plan.rows is None else plan.rows[start:end]
            if slot in self.dense:
                y2[rows] += x2[rows] @ self.dense[slot].T  # [n, d_in] @ [d_in, d_out]
            if slot in self.ratios:
                out = y2[rows] if bias is None else y2[rows] - bias
                out = out * self.ratios[slot]  # [n, d_out] * [d_out]
                y2[rows] = out if bias is None else out + bias

    def _check_mixable(self, mix: MixturePlan) -> None:
        slots = set(mix.entries.slots.tolist())
        slots.update(s for _, _, direct in mix.entries.direct for s in direct)
        bad = sorted(slots & (set(self.ratios) | set(self.dense)))
        if bad:
            raise ValueError(f"slot {bad[0]} holds a DoRA or Bat adapter, which cannot be mixed")

    def _check_slot(self, top: int) -> None:
        if top >= len(self.ranks):
            raise ValueError(f"slot {top} is out of range: this layer has 0..{len(self.ranks) - 1}")

    def extra_repr(self) -> str:
        slots, r, _ = self.lora_A.shape
        return f"slots={slots - 1}, max_rank={r}"


def base_product(module: nn.Module, x: Tensor) -> Tensor:
    """module(x); a plain nn.Linear's product through `kernels.linear` (the decode GEMV for a
    few rows, torch's F.linear otherwise)."""
    if type(module) is nn.Linear:
        return kernels.linear(x, module.weight, module.bias)
    return module(x)
