"""Inject MultiLoRALinear layers into a causal LM and load PEFT LoRA adapters into their slots."""

from __future__ import annotations

from contextlib import contextmanager

from torch import Tensor, nn

from lorafleet.adapters.format import Adapter
from lorafleet.adapters.lora_keys import LoraKeyError, lora_pairs, module_rank, module_scale
from lorafleet.errors import LorafleetError
from lorafleet.layers.linear import MultiLoRAContext, MultiLoRALinear
from lorafleet.linear_layers import block_linear_modules

# LoraConfig options that change the forward beyond base + scale * B A x (or add weights we
# have no place for); an adapter using any of them is refused rather than served wrong.
UNSUPPORTED = {
    "use_dora": "DoRA (use_dora)",
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

    def __init__(self, model: nn.Module, layers: dict[str, MultiLoRALinear],
                 context: MultiLoRAContext, max_slots: int, max_rank: int):  # fmt: skip
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

    def slot_weights(self, adapter: Adapter) -> dict[str, tuple[Tensor, Tensor, float]]:
        """module name -> (A, B, scale), after every check (nothing is copied before this)."""
        where, config = _label(adapter), adapter.config
        # An in-memory config (adapter_from_model) holds PEFT's PeftType enum, not its string.
        peft_type = str(getattr(config.get("peft_type"), "value", config.get("peft_type")))
        if peft_type.upper() != "LORA":
            raise MultiLoRAError(
                f"{where}: peft_type {peft_type} (MISS = Bone) cannot be served batched; only "
                "LoRA / rsLoRA adapters can (attach it through PEFT instead)"
            )
        for key, what in UNSUPPORTED.items():
            if config.get(key):
                raise MultiLoRAError(f"{where}: {what} is not supported by batched serving")
        try:
            pairs = lora_pairs(adapter.tensors)
        except LoraKeyError as exc:
            raise MultiLoRAError(f"{where}: {exc}") from exc
        if not pairs:
            raise MultiLoRAError(f"{where}: holds no LoRA weights")
        weights = {}
        for name, (A, B) in sorted(pairs.items()):
            layer = self.layers.get(name)
            if layer is None:
                raise MultiLoRAError(
                    f"{where}: targets {name}, which is not a multi-LoRA layer of this model "
                    f"({len(self.layers)} injected)"
                )
            r = module_rank(config, name)
            d_out, d_in = layer.base_layer.weight.shape
            if A.shape != (r, d_in) or B.shape != (d_out, r):
                raise MultiLoRAError(
                    f"{where}: {name} has A {tuple(A.shape)} and B {tuple(B.shape)}, "
                    f"expected ({r}, {d_in}) and ({d_out}, {r})"
                )
            if r > self.max_rank:
                raise MultiLoRAError(
                    f"{where}: rank {r} ({name}) is above this model's max_rank {self.max_rank}"
                )
            weights[name] = (A, B, module_scale(config, name))
        return weights

    def load_slot(self, slot: int, adapter: Adapter) -> None:
        """Copy a LoRA adapter's weights into `slot` of every layer (no new buffers); layers
        the adapter does not target get zeros. All checks run before anything is copied."""
        slot = self._check_slot(slot)
        weights = self.slot_weights(adapter)
        for name, layer in self.layers.items():
            if name in weights:
                layer.set_slot(slot, *weights[name])
            else:
                layer.clear_slot(slot)

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


def inject_multilora(model: nn.Module, targets: list[str] | None = None, max_slots: int = 8,
                     max_rank: int = 16) -> MultiLoRAModel:  # fmt: skip
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
