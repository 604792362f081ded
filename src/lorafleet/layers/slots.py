"""Inject MultiLoRALinear layers into a causal LM and load PEFT adapters into their slots
(LoRA, rsLoRA, DoRA, Bone and Bat: how each is served is in layers/served.py)."""

from __future__ import annotations

from contextlib import contextmanager

from torch import nn

from lorafleet.adapters.format import Adapter
from lorafleet.adapters.lora_keys import LoraKeyError, module_parts, module_rank, module_scale
from lorafleet.errors import LorafleetError
from lorafleet.layers.linear import MultiLoRAContext, MultiLoRALinear
from lorafleet.layers.served import SlotEntry, bat_delta, bone_A, dora_ratio
from lorafleet.linear_layers import block_linear_modules

# LoraConfig options that change the forward beyond base + scale * B A x (or add weights we
# have no place for); an adapter using any of them is refused rather than served wrong.
UNSUPPORTED = {
    "lora_bias": "a LoRA bias (lora_bias)",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens)",
    "use_qalora": "QA-LoRA (use_qalora)",
    "use_bdlora": "block-diagonal LoRA (use_bdlora)",
    "arrow_config": "Arrow routing (arrow_config)",
    "layer_replication": "layer_replication",
    "target_parameters": "target_parameters",
    "modules_to_save": "modules_to_save (full copies of base layers)",
    "trainable_token_indices": "trainable_token_indices",
}


class MultiLoRAError(LorafleetError):
    """An adapter or slot the batched multi-adapter layers cannot take (one line)."""


def _label(adapter: Adapter) -> str:
    return str(adapter.path) if adapter.path is not None else "adapter"


class MultiLoRAModel:
    """A causal LM whose target linears are MultiLoRALinear layers sharing one context.

    Slots 1..max_slots hold adapters, slot 0 is "no adapter". Set the batch's slots (and row
    mixtures) with `with handle.slots(...)` (or `handle.context.set_slots`) before calling
    `handle.model(...)`."""

    def __init__(
        self,
        model: nn.Module,
        layers: dict[str, MultiLoRALinear],
        context: MultiLoRAContext,
        max_slots: int,
        max_rank: int,
    ):
        self.model = model
        self.layers = layers
        self.context = context
        self.max_slots = max_slots
        self.max_rank = max_rank

    @contextmanager
    def slots(self, slots, mixtures=()):
        """Within the block, rows use `slots` (see MultiLoRAContext.set_slots) and `mixtures`."""
        self.context.set_slots(slots, mixtures)
        try:
            yield self.model
        finally:
            self.context.clear()

    def _check_slot(self, slot) -> int:
        if isinstance(slot, bool) or not isinstance(slot, int) or not 1 <= slot <= self.max_slots:
            raise MultiLoRAError(f"slot {slot!r} is out of range: use 1..{self.max_slots}")
        return slot

    def slot_weights(self, adapter: Adapter) -> dict[str, SlotEntry]:
        """module name -> what its layer holds for `adapter` (layers/served.py), after every
        check; DoRA's ratios and Bat's dense deltas are computed here, nothing is copied."""
        where, config = _label(adapter), adapter.config
        # An in-memory config (adapter_from_model) holds PEFT's PeftType enum, not its string.
        peft_type = str(getattr(config.get("peft_type"), "value", config.get("peft_type")))
        if peft_type.upper() not in ("LORA", "MISS"):
            raise MultiLoRAError(
                f"{where}: peft_type {peft_type} cannot be served batched; "
                "LoRA, rsLoRA, DoRA and MiSS (Bone, Bat) adapters can"
            )
        for key, what in UNSUPPORTED.items():
            if config.get(key):
                raise MultiLoRAError(f"{where}: {what} is not supported by batched serving")
        try:
            parts = module_parts(adapter.tensors)
        except LoraKeyError as exc:
            raise MultiLoRAError(f"{where}: {exc}") from exc
        if not parts:
            raise MultiLoRAError(f"{where}: holds no adapter weights")
        entry = self._miss_entry if peft_type.upper() == "MISS" else self._lora_entry
        return {name: entry(where, config, name, parts[name]) for name in sorted(parts)}

    def _layer(self, where: str, name: str) -> MultiLoRALinear:
        layer = self.layers.get(name)
        if layer is None:
            raise MultiLoRAError(
                f"{where}: targets {name}, which is not a multi-LoRA layer of this model "
                f"({len(self.layers)} injected)"
            )
        return layer

    def _check_rank(self, where: str, name: str, r: int) -> None:
        if r > self.max_rank:
            raise MultiLoRAError(
                f"{where}: rank {r} ({name}) is above this model's max_rank {self.max_rank}"
            )

    def _lora_entry(self, where: str, config: dict, name: str, part: dict) -> SlotEntry:
        """LoRA / rsLoRA, and DoRA (its magnitude turned into the per-row ratio)."""
        layer = self._layer(where, name)
        dora = bool(config.get("use_dora"))
        wanted = {"A", "B", "lora_magnitude_vector"} if dora else {"A", "B"}
        if set(part) != wanted:
            missing = sorted(wanted - set(part)) or sorted(set(part) - wanted)
            raise MultiLoRAError(
                f"{where}: {name} has {', '.join(sorted(part))}; "
                f"{'DoRA' if dora else 'LoRA'} needs {', '.join(sorted(wanted))}"
                f" ({missing[0]})"
            )
        A, B, r = part["A"], part["B"], module_rank(config, name)
        d_out, d_in = layer.base_layer.out_features, layer.base_layer.in_features
        if A.shape != (r, d_in) or B.shape != (d_out, r):
            raise MultiLoRAError(
                f"{where}: {name} has A {tuple(A.shape)} and B {tuple(B.shape)}, "
                f"expected ({r}, {d_in}) and ({d_out}, {r})"
            )
        self._check_rank(where, name, r)
        scale = module_scale(config, name)
        if not dora:
            return SlotEntry(A, B, scale)
        m = part["lora_magnitude_vector"]
        if m.shape != (d_out,):
            raise MultiLoRAError(
                f"{where}: {name} has magnitude {tuple(m.shape)}, expected ({d_out},)"
            )
        W = layer.base_layer.weight  # dequantised when the base linear is quantised
        A, B = A.to(W), B.to(W)
        return SlotEntry(A, B, scale, ratio=dora_ratio(W, A, B, scale, m.to(W)))

    def _miss_entry(self, where: str, config: dict, name: str, part: dict) -> SlotEntry:
        """Bone (LoRA with A = [I_r ... I_r]), MiSS-mini (Bone with a repeated block), Bat."""
        layer = self._layer(where, name)
        if set(part) != {"miss_block"}:
            raise MultiLoRAError(
                f"{where}: {name} has {', '.join(sorted(part))}; MiSS needs miss_block"
            )
        block, r, init = part["miss_block"], int(config.get("r", 64)), config.get("init_weights")
        W = layer.base_layer.weight
        d_out, d_in = W.shape
        if init == "bat":
            if block.shape != (d_out // r, r, r) or d_out % r or d_in % r:
                raise MultiLoRAError(
                    f"{where}: {name} has a Bat block {tuple(block.shape)}; "
                    f"a {d_out}x{d_in} weight needs ({d_out // r}, {r}, {r})"
                )
            return SlotEntry(None, None, 1.0, dense=bat_delta(W, block.to(W)))
        if init == "mini":
            mini_r = int(config.get("mini_r", 1))
            if block.shape == (r, mini_r) and d_out % mini_r == 0:
                block = block.repeat(1, d_out // mini_r)
        if block.shape != (r, d_out) or r > d_in:
            raise MultiLoRAError(
                f"{where}: {name} has a MiSS block {tuple(block.shape)}; a "
                f"{d_out}x{d_in} weight needs ({r}, {d_out}) with r <= {d_in}"
            )
        self._check_rank(where, name, r)
        return SlotEntry(bone_A(r, d_in, W), block.T, 1.0)

    def load_slot(self, slot: int, adapter: Adapter) -> None:
        """Copy an adapter's weights into `slot` of every layer (LoRA parts into the existing
        buffers); layers the adapter does not target get zeros. All checks run first."""
        slot = self._check_slot(slot)
        weights = self.slot_weights(adapter)
        for name, layer in self.layers.items():
            if name in weights:
                layer.load_entry(slot, weights[name])
            else:
                layer.clear_slot(slot)

    def mixable(self, slot: int) -> bool:
        """False when `slot` holds a DoRA or Bat adapter (served per row, not in mixtures)."""
        return not any(
            slot in layer.ratios or slot in layer.dense for layer in self.layers.values()
        )

    def clear_slot(self, slot: int) -> None:
        slot = self._check_slot(slot)
        for layer in self.layers.values():
            layer.clear_slot(slot)

    def remove(self) -> nn.Module:
        """Put the original linears back and return the model (the slots are dropped)."""
        for name, layer in self.layers.items():
            _set_submodule(self.model, name, layer.base_layer)
        self.layers = {}
        return self.model


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def _matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)


def inject_multilora(
    model: nn.Module, targets: list[str] | None = None, max_slots: int = 8, max_rank: int = 16
) -> MultiLoRAModel:
    """Replace the target linears of `model` in place by MultiLoRALinear layers.

    `targets`: module names or suffixes (q_proj, ...), as PEFT's target_modules list; None =
    every linear of the blocks (not the output head). Buffers hold `max_slots + 1` slots of
    rank `max_rank`, allocated once here."""
    if max_slots < 1 or max_rank < 1:
        raise MultiLoRAError(f"max_slots and max_rank must be >= 1, got {max_slots}, {max_rank}")
    if any(isinstance(m, MultiLoRALinear) for m in model.modules()):
        raise MultiLoRAError("the model already has multi-LoRA layers; inject once")
    candidates = block_linear_modules(model)
    if targets is not None:
        wanted = [str(t) for t in targets]
        candidates = {n: m for n, m in candidates.items() if any(_matches(n, t) for t in wanted)}
        unmatched = [t for t in wanted if not any(_matches(n, t) for n in candidates)]
        if unmatched:
            raise MultiLoRAError(f"targets the model lacks: {', '.join(sorted(unmatched))}")
    if not candidates:
        raise MultiLoRAError("the model has no linear layers to inject into")
    context = MultiLoRAContext()
    layers = {}
    for name, linear in candidates.items():
        linear.requires_grad_(False)  # shared and frozen
        layers[name] = MultiLoRALinear(linear, context, max_slots, max_rank, name)
        _set_submodule(model, name, layers[name])
    return MultiLoRAModel(model, layers, context, max_slots, max_rank)
