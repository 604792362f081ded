"""What the Ray ingress and replicas exchange, as plain data: the fleet's settings, one
request's payload, the multiplexed model id a request routes by, and stats summed over
replicas. No Ray import: the CLI and the tests read these without Ray."""

from __future__ import annotations

from dataclasses import dataclass, field

from lorafleet.errors import LorafleetError
from lorafleet.serve.api.config import EngineSettings
from lorafleet.serve.backend import AdapterSpec
from lorafleet.serve.placement import Spread
from lorafleet.serve.sequence import SamplingParams, resolve_adapter

ROUTINGS = ("affinity", "round_robin")
# What --ray cannot serve on a cluster: hub adapters without a directory every node reads.
HUB_NEEDS_SHARED_DIR = (
    "--hub-adapters on a Ray cluster (--address) needs --adapters DIR, a directory every "
    "node reads at the same path: hub adapters are copied there for the replicas (ask for "
    "them by `model`: org/name[@revision])"
)
# Engine stats summed over replicas (the rest of a replica's stats are its own).
SUMMED = ("waiting", "running", "kv_free_slots", "adapters_loaded", "adapter_slots", "steps")
SUMMED_TOO = ("generated_tokens", "kv_used_slots", "adapters_in_use")
# The registries' counters, summed over replicas for /metrics (tier_stats.COUNTERS).
REGISTRY_COUNTERS = ("hits", "cpu_hits", "misses", "loads", "evictions_cpu", "evictions_slot")


@dataclass
class FleetSpec:
    """How every replica builds its engine: the base (a `--base` spec, loaded by each replica
    itself), the shared adapters directory (the same path on every node), the engine's sizes
    and device (`settings.max_adapters` is also Ray's max_num_models_per_replica), torch
    threads and Ray resources per replica; checked on creation."""

    base: str
    adapters_dir: str | None = None
    replicas: int = 1
    threads: int = 1
    dtype: str = "auto"  # each replica resolves auto for its own CPU (api/precision.py)
    routing: str = "affinity"  # affinity: multiplexed model id = adapter; round_robin: none
    model_name: str = "base"
    settings: EngineSettings = field(default_factory=EngineSettings)
    # Ray resources per replica (serve/placement.replica_resources: CPUs = threads, a GPU
    # where the device is CUDA, or auto on a cluster with GPUs); set once Ray is up.
    resources: dict = field(default_factory=dict)
    # How replicas spread over the cluster's nodes (max_replicas_per_node).
    spread: Spread = field(default_factory=Spread)

    def __post_init__(self):
        for what, value in (("replicas", self.replicas), ("threads", self.threads)):
            if not isinstance(value, int) or value < 1:
                raise LorafleetError(f"{what} must be an integer >= 1, got {value!r}")
        if self.routing not in ROUTINGS:
            raise LorafleetError(f"routing must be one of {', '.join(ROUTINGS)}: {self.routing!r}")


@dataclass
class RayRequest:
    """One request as a replica gets it: what `ServingBackend.add_request` takes, plus where
    the ingress's registry reads each adapter it names (an adapter added or uploaded through
    admin under a name that is not its directory's is found by every replica this way)."""

    prompt: list[int] | str
    adapter: AdapterSpec
    params: SamplingParams
    tenant: str | None = None
    paths: dict[str, str] = field(default_factory=dict)  # adapter name -> its directory


@dataclass(frozen=True)
class MoleRef:
    """A MoLE as the ingress sends it: the gate of the request's Mixture names the MoLE and
    the experts `mask` drops; the replica runs its own gates for it (on its device, one gate
    object per mask, so its batch coalesces the rows), from the shared directory."""

    name: str
    mask: tuple[str, ...] = ()


def adapter_names(spec: AdapterSpec) -> tuple[str, ...]:
    """Every adapter a request's spec uses (none for the base)."""
    label, mixture = resolve_adapter(spec)
    if mixture is not None:
        return tuple(mixture.names)
    return (label,) if label else ()


def route_id(spec: AdapterSpec) -> str:
    """The multiplexed model id a request routes by ("" for none: the base, which every
    replica holds): the adapter's name; a gated mixture with a name (a MoLE) by that name; any
    other mixture by its heaviest part (largest |weight|, the first of equals), so it runs where
    that adapter is resident and costs at most its lighter parts' loads."""
    label, mixture = resolve_adapter(spec)
    if mixture is None:
        return label or ""
    if mixture.gate is not None and mixture.name:
        return mixture.name
    heaviest = max(mixture.entries, key=lambda entry: abs(entry[1]))  # max keeps the first
    return heaviest[0]


def sum_stats(rows: list[dict]) -> dict:
    """Engine stats of the whole fleet from one row per live replica (its `stats()` plus
    "registry": its registry's counters): counts summed, peak_running the largest; "replicas"
    keeps the rows and "registry" the summed counters (what /metrics shows)."""
    total = {key: sum(int(row.get(key) or 0) for row in rows) for key in SUMMED + SUMMED_TOO}
    total["peak_running"] = max((int(row.get("peak_running") or 0) for row in rows), default=0)
    total["registry"] = {
        key: sum(int(row.get("registry", {}).get(key) or 0) for row in rows)
        for key in REGISTRY_COUNTERS
    }
    total["replicas"] = rows
    return total
