"""MoLE on a model: frozen experts in multi-LoRA slots + trained gates; its artifact directory."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from safetensors.torch import load_file, save_file
from torch import nn

from lorafleet.adapters import (
    Adapter,
    AdapterError,
    check_adapter,
    content_digest,
    read_adapter,
)
from lorafleet.adapters.lora_keys import module_parts
from lorafleet.compose.mole_find import Digests, find_experts
from lorafleet.errors import LorafleetError
from lorafleet.fsutil import atomic_write, atomic_write_json
from lorafleet.layers import MultiLoRAError, MultiLoRAModel, RowMixture, inject_multilora
from lorafleet.layers.mole import DEFAULT_VARIANT, MoleGates, canonical_variant

MOLE_CONFIG = "mole_config.json"
GATES_FILE = "gates.safetensors"
FORMAT = "lorafleet-mole"


class MoleError(LorafleetError):
    """A MoLE directory, expert or mask that cannot be used (one line)."""


@dataclass
class Expert:
    name: str
    path: Path
    adapter: Adapter


def is_mole_dir(path: str | Path) -> bool:
    return (Path(path) / MOLE_CONFIG).is_file()


def read_experts(specs: Sequence[tuple[str, str | Path]]) -> list[Expert]:
    """NAME=DIR pairs as Experts (names unique, each a readable adapter)."""
    names = [n for n, _ in specs]
    if not specs:
        raise MoleError("a MoLE needs at least one --expert NAME=DIR")
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup is not None:
        raise MoleError(f"expert name {dup!r} is given twice")
    experts = []
    for name, path in specs:
        try:
            experts.append(Expert(name, Path(path), read_adapter(path)))
        except AdapterError as exc:
            raise MoleError(f"expert {name}: {exc}") from exc
    return experts


def parse_expert(spec: str) -> tuple[str, str]:
    name, sep, path = spec.partition("=")
    if not sep or not name or not path:
        raise MoleError(f"--expert takes NAME=DIR, got {spec!r}")
    return name, path


class MoleModel:
    """A causal LM mixing its experts through per-layer gates on every forward.

    `model` is the transformers model (its target linears now MultiLoRALinear, the gates its
    `mole_gates` submodule); a forward pre-hook gives every row the gated mixture of slots
    1..K, so `model(...)`, `model.generate(...)` and `evaluate(model, ...)` all run MoLE."""

    def __init__(
        self, model: nn.Module, handle: MultiLoRAModel, gates: MoleGates, names: list[str]
    ):
        self.model, self.handle, self.gates, self.names = model, handle, gates, names
        self.slots = tuple(range(1, len(names) + 1))
        self._hook = model.register_forward_pre_hook(self._set_rows, with_kwargs=True)

    def _set_rows(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            ids = kwargs["inputs_embeds"][..., 0]
        rows = range(ids.numel())  # every token of every sequence: [B*S] rows
        self.handle.context.set_slots(None, [RowMixture(rows, self.slots, gate=self.gates)])

    def mask(self, names: Sequence[str]) -> None:
        """Drop these experts at inference and renormalise the rest (no retraining)."""
        unknown = [n for n in names if n not in self.names]
        if unknown:
            raise MoleError(
                f"--mask {unknown[0]}: not an expert of this MoLE ({', '.join(self.names)})"
            )
        try:
            self.gates.set_mask(self.names.index(n) for n in names)
        except ValueError as exc:
            raise MoleError(str(exc)) from exc


def _max_rank(experts: Sequence[Expert]) -> tuple[int, list[str]]:
    rank, targets = 1, set()
    for e in experts:
        for name, part in module_parts(e.adapter.tensors).items():
            targets.add(name)
            if "A" in part:
                rank = max(rank, int(part["A"].shape[0]))
    return rank, sorted(targets)


def attach_mole(
    model: nn.Module,
    experts: Sequence[Expert],
    gates: MoleGates | None = None,
    *,
    variant: str = DEFAULT_VARIANT,
    temperature: float = 1.0,
) -> MoleModel:
    """Put the experts into slots 1..K of `model` (in place) and gate them (per block or per
    layer: see MoleGates); new gates (variant, temperature) unless `gates` is given. The base
    and experts stay frozen."""
    try:
        variant = canonical_variant(variant)
    except ValueError as exc:
        raise MoleError(str(exc)) from exc
    for p in model.parameters():
        p.requires_grad_(False)
    rank, targets = _max_rank(experts)
    try:
        handle = inject_multilora(model, targets, max_slots=len(experts), max_rank=rank)
        for slot, e in enumerate(experts, start=1):
            handle.load_slot(slot, e.adapter)
            if not handle.mixable(slot):
                raise MoleError(f"expert {e.name}: a DoRA or Bat adapter cannot be a MoLE expert")
    except MultiLoRAError as exc:
        raise MoleError(str(exc)) from exc
    if gates is None:
        layers = {
            n: (m.base_layer.in_features, m.base_layer.out_features)
            for n, m in handle.layers.items()
        }
        gates = MoleGates(layers, len(experts), variant=variant, temperature=temperature)
    gates.to(next(model.parameters()).device)
    model.mole_gates = gates  # a submodule: its parameters are the model's trainable ones
    return MoleModel(model, handle, gates, [e.name for e in experts])


# --- the artifact ------------------------------------------------------------------------------
def save_mole(
    out: Path,
    mole: MoleModel,
    experts: Sequence[Expert],
    base_fingerprint: str,
    extra: dict | None = None,
) -> Path:
    """Write OUT/gates.safetensors and OUT/mole_config.json (experts by relative path + hash)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    gates = mole.gates
    tensors = gates.export()
    atomic_write(out / GATES_FILE, lambda tmp: save_file(tensors, tmp))
    config = {
        "format": FORMAT,
        "version": 2 if gates.variant == "block" else 1,
        "variant": gates.variant,
        "temperature": gates.temperature,  # the initial one for block gates (learnt: the file)
        **({"blocks": gates.blocks} if gates.variant == "block" else {}),
        "base_fingerprint": base_fingerprint,
        "experts": [
            {
                "name": e.name,
                "path": os.path.relpath(e.path.resolve(), out.resolve()),
                "sha256": content_digest(e.path),
            }
            for e in experts
        ],
        **(extra or {}),
    }
    atomic_write_json(out / MOLE_CONFIG, config)
    return out


def read_mole_config(path: str | Path) -> dict:
    import json

    file = Path(path) / MOLE_CONFIG
    if not file.is_file():
        raise MoleError(f"{path}: not a MoLE directory (no {MOLE_CONFIG})")
    try:
        config = json.loads(file.read_text())
    except ValueError as exc:
        raise MoleError(f"{file}: not valid JSON ({exc})") from exc
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise MoleError(f"{file}: not a lorafleet MoLE config")
    experts = config.get("experts")
    fields = ("name", "path", "sha256")
    if not isinstance(experts, list) or not experts:
        raise MoleError(f"{file}: lists no experts")
    for i, item in enumerate(experts):
        if not isinstance(item, dict) or not all(isinstance(item.get(k), str) for k in fields):
            raise MoleError(f"{file}: expert {i} needs string fields {', '.join(fields)}")
    return config


def mole_experts(
    path: str | Path,
    base_fingerprint: str | None = None,
    pool: Sequence[Path] | None = None,
    digests: Digests | None = None,
) -> list[Expert]:
    """The MoLE's experts, each checked: found by its content hash (among its bundled copies,
    its recorded path and the adapters of `pool`, by default those beside the MoLE: see
    mole_find.find_expert), and trained on our base."""
    config, root = read_mole_config(path), Path(path)
    theirs = config.get("base_fingerprint")
    if base_fingerprint and theirs and theirs != base_fingerprint:
        raise MoleError(
            f"{path}: gates trained on another base (fingerprint {theirs}, "
            f"this base is {base_fingerprint})"
        )
    try:
        found = find_experts(root, config, pool, digests)
    except LorafleetError as exc:
        raise MoleError(f"{path}: {exc}") from exc
    experts = []
    for item, where in zip(config["experts"], found, strict=True):
        name = item["name"]
        expert = read_experts([(name, where)])[0]
        fp = expert.adapter.meta.get("base_fingerprint")
        if base_fingerprint and fp and fp != base_fingerprint:
            raise MoleError(f"{path}: expert {name} was trained on another base ({fp})")
        experts.append(expert)
    return experts


def load_mole(
    path: str | Path,
    model: nn.Module,
    base_fingerprint: str | None = None,
    mask: Sequence[str] = (),
) -> MoleModel:
    """Attach the MoLE directory `path` to `model` (in place), every expert checked."""
    config = read_mole_config(path)
    experts = mole_experts(path, base_fingerprint)
    for e in experts:
        try:
            check_adapter(e.adapter, model, base_fingerprint=base_fingerprint, max_rank=10**6)
        except AdapterError as exc:
            raise MoleError(f"{path}: expert {e.name}: {exc}") from exc
    mole = attach_mole(
        model, experts, variant=config["variant"], temperature=float(config["temperature"])
    )
    saved = load_file(str(Path(path) / GATES_FILE))
    gates = mole.gates
    if gates.variant == "block" and config.get("blocks") not in (None, gates.blocks):
        raise MoleError(f"{path}: its gates' blocks do not match this model's blocks")
    try:
        gates.load_tensors(saved)
    except ValueError as exc:
        raise MoleError(f"{path}: {GATES_FILE}: {exc}") from exc
    gates.eval()
    mole.mask(list(mask))
    return mole


def load_mole_base(base: str, path: str | Path, mask: Sequence[str] = ()):
    """(loaded base, MoleModel): load the base `base` and attach the MoLE directory `path`."""
    from lorafleet.models import load_base

    loaded = load_base(base)
    return loaded, load_mole(path, loaded.model, loaded.fingerprint, mask)
