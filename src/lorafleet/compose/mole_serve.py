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
from lorafleet.compose.mole_find import Digests
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
    try:
        gates = gates_from_tensors(
            saved, config["variant"], float(config["temperature"]), config.get("blocks")
        )
    except (ValueError, KeyError, TypeError) as exc:
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
    """The MoLE directories inside a server's adapters directory, served by name: one kind of
    the registry's directory entries (serve.entries.EntryKind), checked on its own at start
    and whenever its files or its experts' change. Each expert is found by its content hash
    among the adapters the registry sees (or bundled in the MoLE dir; see mole_find), and
    registered with the registry as MOLE.EXPERT (loaded on demand, resident together while a
    request runs); the gates are read once per check. A MoLE that fails its check (an expert
    missing or changed, bad gates, another base) is the registry's unavailable entry, with
    its one-line reason; the others serve. `spec(name, mask)` is a request's engine spec."""

    kind = "mole"
    label = "MoLE"
    usage = ""
    pool = True  # its experts are found among the other adapters

    def __init__(self, backend: ServingBackend, registry: AdapterRegistry):
        self.backend, self.registry = backend, registry
        self.moles: dict[str, ServedMole] = {}
        self.digests = Digests()  # each adapter hashed once while its files stay the same
        registry.add_kind(self)

    def claims(self, path: Path) -> bool:
        return is_mole_dir(path)

    def check(self, name: str, path: Path) -> list[Path]:
        pool = self.registry.adapter_paths()
        experts = mole_experts(path, self.backend.base_fingerprint, pool, self.digests)
        gates = read_gates(path).to(self.backend.device)
        names = []
        for e in experts:
            names.append(f"{name}.{e.name}")
            self._register(names[-1], e.path)
        self.moles[name] = ServedMole(name, [e.name for e in experts], names, gates)
        return [e.path for e in experts]

    def drop(self, name: str) -> None:
        self.moles.pop(name, None)

    def _register(self, name: str, path: Path) -> None:
        # An expert found elsewhere than at the last check: its registered path changes.
        current = self.registry.path_of(name)
        if current is not None and current.resolve() != path.resolve():
            self.registry.remove(name)
        self.registry.add(name, path)

    def __contains__(self, name: str) -> bool:
        return name in self.moles

    def names(self) -> list[str]:
        return sorted(self.moles)

    def spec(self, name: str, mask: Sequence[str] = ()) -> Mixture:
        return self.moles[name].mixture(mask)

    def experts(self, name: str) -> list[str]:
        return list(self.moles[name].experts)
