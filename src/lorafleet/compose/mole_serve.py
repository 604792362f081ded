"""A MoLE directory served by the engine: its experts resident together, its gates per row."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from safetensors.torch import load_file

from lorafleet.compose.mole import (
    GATES_FILE,
    MoleError,
    is_mole_dir,
    mole_experts,
    read_mole_config,
)
from lorafleet.layers.mole import MoleGates, gates_from_tensors
from lorafleet.serve.backend import ServingBackend
from lorafleet.serve.registry import AdapterRegistry
from lorafleet.serve.sequence import Mixture


@dataclass
class ServedMole:
    """A MoLE loaded into an engine: `adapters` are the engine's names for its experts (in
    the gates' order); `mixture(mask)` is what a request passes as its adapter."""

    name: str
    experts: list[str]
    adapters: list[str]
    gates: MoleGates
    _gates: dict = field(default_factory=dict, repr=False)  # mask -> its MaskedGates

    def mixture(self, mask: Sequence[str] = ()) -> Mixture:
        unknown = [m for m in mask if m not in self.experts]
        if unknown:
            raise MoleError(
                f"mask {unknown[0]}: not an expert of {self.name} ({', '.join(self.experts)})"
            )
        dropped = tuple(sorted({self.experts.index(m) for m in mask}))
        if dropped not in self._gates:  # one gate object per mask: the batch coalesces them
            try:
                self._gates[dropped] = self.gates.masked(dropped)
            except ValueError as exc:
                raise MoleError(f"{self.name}: {exc}") from exc
        gate = self._gates[dropped]
        return Mixture(tuple((a, 1.0) for a in self.adapters), gate=gate, name=self.name)

    def describe(self) -> dict:
        return {
            "id": self.name,
            "experts": list(self.experts),
            "variant": self.gates.variant,
            "temperature": self.gates.temperature,
        }


def read_gates(path: str | Path) -> MoleGates:
    """The gates of the MoLE directory `path` (no model needed)."""
    config = read_mole_config(path)
    saved = load_file(str(Path(path) / GATES_FILE))
    tensors = {k.removesuffix(".gate"): v for k, v in saved.items()}
    try:
        gates = gates_from_tensors(tensors, config["variant"], float(config["temperature"]))
    except (ValueError, KeyError) as exc:
        raise MoleError(f"{path}: {GATES_FILE}: {exc}") from exc
    if gates.n_experts != len(config["experts"]):
        raise MoleError(
            f"{path}: {GATES_FILE} gates {gates.n_experts} experts, the config "
            f"lists {len(config['experts'])}"
        )
    return gates


def serve_mole(backend: ServingBackend, name: str, path: str | Path) -> ServedMole:
    """Load the MoLE directory `path` into `backend` under `name` (each expert checked, then
    resident as NAME/EXPERT); returns what requests use."""
    experts = mole_experts(path, backend.base_fingerprint)
    gates = read_gates(path).to(backend.device)
    adapters = []
    for e in experts:
        adapters.append(f"{name}/{e.name}")
        backend.load_adapter(adapters[-1], e.adapter)
    return ServedMole(name, [e.name for e in experts], adapters, gates)


class MoleCatalog:
    """The MoLE directories inside a server's adapters directory, served by name: each
    expert is registered with the registry as MOLE.EXPERT (loaded on demand, resident
    together while a request runs), the gates are read once. `spec(name, mask)` is the
    engine adapter spec of a request. Every MoLE is checked at startup (one line if bad)."""

    def __init__(self, backend: ServingBackend, registry: AdapterRegistry):
        self.moles: dict[str, ServedMole] = {}
        root = registry.adapters_dir
        if root is None:
            return
        for path in sorted(p for p in Path(root).iterdir() if is_mole_dir(p)):
            self.moles[path.name] = self._register(backend, registry, path)

    @staticmethod
    def _register(backend: ServingBackend, registry: AdapterRegistry, path: Path) -> ServedMole:
        experts = mole_experts(path, backend.base_fingerprint)
        gates = read_gates(path).to(backend.device)
        names = []
        for e in experts:
            names.append(f"{path.name}.{e.name}")
            registry.add(names[-1], e.path)
        return ServedMole(path.name, [e.name for e in experts], names, gates)

    def __contains__(self, name: str) -> bool:
        return name in self.moles

    def names(self) -> list[str]:
        return sorted(self.moles)

    def spec(self, name: str, mask: Sequence[str] = ()) -> Mixture:
        return self.moles[name].mixture(mask)

    def experts(self, name: str) -> list[str]:
        return list(self.moles[name].experts)
