"""Inject MultiLoRALinear layers into a causal LM and load PEFT adapters into their slots (each
adapter's method, in adapters/methods/, says how it is served: its SlotEntry per module)."""

from __future__ import annotations

from contextlib import contextmanager

from torch import nn

from lorafleet.adapters.format import Adapter
from lorafleet.adapters.lora_keys import LoraKeyError, module_parts, shared_tensors
from lorafleet.adapters.methods import (
    Dims,
    Method,
    MethodError,
    ModuleWeights,
    SlotEntry,
    find_method,
    peft_type_of,
    servable,
)
from lorafleet.adapters.methods.base import module_rank
from lorafleet.errors import LorafleetError
from lorafleet.layers.linear import MultiLoRAContext, MultiLoRALinear
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


def _listed(titles: tuple[str, ...]) -> str:
    """("LoRA", "DoRA", "Bone") -> "LoRA, DoRA and Bone"."""
    return ", ".join(titles[:-1]) + (" and " if len(titles) > 1 else "") + titles[-1]


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
        """module name -> what its layer holds for `adapter`, after every check: the adapter's
        method (adapters/methods/) builds each entry (DoRA's ratios and Bat's dense deltas are
        computed here); nothing is copied into the slots yet."""
        where, config = _label(adapter), adapter.config
        method = find_method(config)
        if method is None:
            raise MultiLoRAError(
                f"{where}: peft_type {peft_type_of(config) or None} cannot be served batched; "
                f"{_listed(servable())} adapters can"
            )
        if isinstance(method.serve, str):
            raise MultiLoRAError(
                f"{where}: {method.title} adapters cannot be served batched: {method.serve}"
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
        shared = shared_tensors(adapter.tensors)
        return {
            name: self._entry(where, method, config, name, parts[name], shared)
            for name in sorted(parts)
        }

    def _layer(self, where: str, name: str) -> MultiLoRALinear:
        layer = self.layers.get(name)
        if layer is None:
            raise MultiLoRAError(
                f"{where}: targets {name}, which is not a multi-LoRA layer of this model "
                f"({len(self.layers)} injected)"
            )
        return layer

    def _entry(
        self, where: str, method: Method, config: dict, name: str, part: dict, shared: dict
    ) -> SlotEntry:
        """One module's SlotEntry from `method.serve`, after checking its parts and shapes
        against what the method declares, and its LoRA part's rank against max_rank."""
        layer = self._layer(where, name)
        wanted = [p.name for p in method.parts]
        if set(part) != set(wanted):
            odd = sorted(set(wanted) - set(part)) or sorted(set(part) - set(wanted))
            raise MultiLoRAError(
                f"{where}: {name} has {', '.join(sorted(part))}; "
                f"{method.title} needs {', '.join(wanted)} ({odd[0]})"
            )
        base = layer.base_layer
        r = module_rank(config, name, method.default_r)
        dims = Dims(base.out_features, base.in_features, r, config)
        for p in method.parts:
            if tuple(part[p.name].shape) != p.shape(dims):
                raise MultiLoRAError(
                    f"{where}: {name} has {p.name} {tuple(part[p.name].shape)}, "
                    f"expected {p.shape(dims)}"
                )
        weights = ModuleWeights(name, config, part, shared, base.weight, r)
        try:
            entry = method.serve(weights)
        except MethodError as exc:
            raise MultiLoRAError(f"{where}: {name}: {exc}") from exc
        if entry.A is not None and entry.A.shape[0] > self.max_rank:
            raise MultiLoRAError(
                f"{where}: rank {entry.A.shape[0]} ({name}) is above this model's "
                f"max_rank {self.max_rank}"
            )
        return entry

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
