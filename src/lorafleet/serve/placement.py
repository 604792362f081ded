"""Where a Ray Serve replica runs: the resources it asks Ray for, from `--device` and its threads
(light: no torch, no ray; the Ray deployment passes the dict as `ray_actor_options`), and how
replicas spread over the cluster's nodes (Spread, `--max-replicas-per-node`)."""

from __future__ import annotations

from dataclasses import dataclass

from lorafleet.errors import LorafleetError
from lorafleet.models.device import check_device


@dataclass(frozen=True)
class Spread:
    """How a fleet's replicas spread over the Ray cluster's nodes: at most
    `max_replicas_per_node` replicas on one node (None: Ray Serve's own spreading, best effort;
    1: each replica on a machine of its own). Checked on creation."""

    max_replicas_per_node: int | None = None

    def __post_init__(self):
        n = self.max_replicas_per_node
        if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n < 1):
            raise LorafleetError(f"max_replicas_per_node must be an integer >= 1, got {n!r}")

    def ray_options(self) -> dict[str, int]:
        """The Ray Serve deployment options that enforce it ({} when unset)."""
        if self.max_replicas_per_node is None:
            return {}
        return {"max_replicas_per_node": self.max_replicas_per_node}

    def check_room(self, replicas: int, nodes: int) -> None:
        """A one-line LorafleetError when `nodes` live Ray nodes cannot hold `replicas` at
        max_replicas_per_node each (Ray Serve would wait for more nodes without a word)."""
        n = self.max_replicas_per_node
        if n is not None and nodes * n < replicas:
            raise LorafleetError(
                f"--max-replicas-per-node {n}: the Ray cluster has {nodes} node(s), room for "
                f"{nodes * n} of {replicas} replicas; join more machines "
                "(ray start --address=HEAD:6379) or lower --replicas"
            )


def replica_resources(
    device: str,
    threads: int = 1,
    *,
    cluster_gpus: float | None = None,
    gpus_per_replica: float = 1.0,
) -> dict[str, float]:
    """The Ray resources of one engine replica: {"num_cpus": threads} on the CPU, plus
    {"num_gpus": gpus_per_replica} on a GPU.

    `device` is a `--device` name: cuda asks for a GPU; cpu never does; auto asks for one
    when the cluster has any (`cluster_gpus`, e.g. `ray.cluster_resources().get("GPU", 0)`,
    which the caller reads: a driver on a CPU-only head may lead GPU workers), and, when that
    is not given, when torch sees a GPU here. cuda on a cluster known to hold no GPU is a
    one-line LorafleetError (Ray would wait for one forever). `threads` (>= 1) are the torch
    threads of the replica's forward passes, its CPUs either way (a GPU replica still steps
    and tokenises on a CPU). `gpus_per_replica` in (0, 1] lets replicas share a GPU (0.5: two
    per GPU; each then holds its own copy of the base)."""
    device = check_device(device)
    if not isinstance(threads, int) or isinstance(threads, bool) or threads < 1:
        raise LorafleetError(f"threads per replica must be an integer >= 1, got {threads!r}")
    if not 0 < gpus_per_replica <= 1:
        raise LorafleetError(f"gpus_per_replica must be in (0, 1], got {gpus_per_replica!r}")
    if device == "auto":
        if cluster_gpus is None:
            from lorafleet.models.device import cuda_available

            wants_gpu = cuda_available()
        else:
            wants_gpu = cluster_gpus > 0
    else:
        wants_gpu = device == "cuda"
    if device == "cuda" and cluster_gpus is not None and cluster_gpus <= 0:
        raise LorafleetError(
            "--device cuda: the Ray cluster has no GPU (ray.cluster_resources() lists none); "
            "use --device cpu or auto, or join GPU machines with `ray start --address=...`"
        )
    resources: dict[str, float] = {"num_cpus": threads}
    if wants_gpu:
        resources["num_gpus"] = gpus_per_replica
    return resources


def replica_device(resources: dict[str, float]) -> str:
    """The `--device` a replica placed with `resources` (replica_resources) loads its base on:
    "cuda" when it was given a GPU (Ray then sets its CUDA_VISIBLE_DEVICES), else "cpu" (never
    "auto": a CPU replica on a GPU machine must not take a GPU that Ray gave another)."""
    return "cuda" if resources.get("num_gpus", 0) > 0 else "cpu"
