"""Starting a lorafleet fleet on Ray: the replicas' deployment, and the ingress (lorafleet's
HTTP app over a RayBackend) in this process."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from lorafleet.errors import LorafleetError
from lorafleet.serve.api.auth import AuthConfig
from lorafleet.serve.api.config import SERVE_QUANTIZE, EngineSettings, ServerConfig
from lorafleet.serve.ray.wire import FleetSpec

log = logging.getLogger(__name__)
APP_NAME = "lorafleet"


class RayFleet:
    """A running fleet: `state` (the ingress's ServerState over `backend`, a RayBackend),
    `url` once `start_http` ran, `replica_stats()`; `close()` (or `with`) stops the HTTP
    server, deletes the Serve application and shuts Ray down if this fleet started it."""

    def __init__(self, state, backend, started_ray: bool, app_name: str):
        self.state, self.backend = state, backend
        self.started_ray, self.app_name = started_ray, app_name
        self.server = None  # a ServerThread, from start_http

    @property
    def url(self) -> str:
        if self.server is None:
            raise LorafleetError("the fleet's HTTP server is not started (start_http)")
        return self.server.url

    def start_http(self, host: str = "127.0.0.1", port: int | None = None) -> RayFleet:
        """Serve the HTTP API on a background thread (tests, benchmarks)."""
        from lorafleet.serve.api.server import ServerThread

        self.server = ServerThread(self.state, host, port).start()
        return self

    def replica_stats(self, fresh: bool = True) -> list[dict]:
        """One row per live replica: its engine stats plus replica, pid, requests,
        adapter_loads (adapters put in its slots), disk_loads, routed_loads (Ray's
        multiplexed loads), resident (adapter names); `fresh`: read the board now."""
        if fresh:
            self.backend.refresh_stats()
        return self.backend.replica_stats()

    def close(self) -> None:
        from ray import serve

        if self.server is not None:
            self.server.stop()
            self.server = None
        else:
            self.backend.stop(grace_s=0)
        if self.state.registry is not None:
            self.state.registry.close()
        try:
            serve.delete(self.app_name)
        except Exception as exc:  # the cluster already gone
            log.warning("deleting the Serve application failed: %s", exc)
        if self.started_ray:
            import ray

            serve.shutdown()
            ray.shutdown()

    def __enter__(self) -> RayFleet:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def connect(address: str | None, spec: FleetSpec) -> bool:
    """Join the Ray cluster at `address` ("auto": the one `ray start` runs here), or start a
    local one (address None) with CPUs for every replica; True when this call started Ray."""
    import ray

    if ray.is_initialized():
        return False
    quiet = {"include_dashboard": False, "logging_level": logging.WARNING}
    if address is None:
        cpus = max(os.cpu_count() or 1, spec.replicas * spec.threads)
        ray.init(num_cpus=cpus, **quiet)
    else:
        ray.init(address=address, **quiet)
    return True


def added_path(registry, name: str) -> Path | None:
    """Where `name` lives when it is not the adapters directory's entry of that name (added
    through admin from another folder): what replicas are told with each request."""
    path = registry.path_of(name)
    root = registry.adapters_dir
    if path is None or (root is not None and path == Path(root) / name):
        return None
    return path


def start_fleet(
    base: str,
    adapters_dir: str | Path | None = None,
    *,
    replicas: int = 1,
    threads: int = 1,
    routing: str = "affinity",
    settings: EngineSettings | None = None,
    config: ServerConfig | None = None,
    auth: AuthConfig | None = None,
    address: str | None = None,
    dtype: str = "float32",
    retries: int = 3,
    app_name: str = APP_NAME,
) -> RayFleet:
    """Deploy `replicas` lorafleet replicas of `base` on Ray (a local cluster started now when
    `address` is None, else the cluster there) and build the ingress's state over them
    (`start_http` serves it; the CLI serves it in the foreground). Blocks until every replica
    has loaded its model. `routing`: "affinity" (Ray Serve's multiplexing by adapter) or
    "round_robin" (no model id: Ray's adapter-blind balancing). A bad setting: one-line
    LorafleetError before Ray starts."""
    import ray
    from ray import serve

    from lorafleet.layers import check_quantize_device
    from lorafleet.serve.api.state import ServerState
    from lorafleet.serve.placement import replica_device, replica_resources
    from lorafleet.serve.ray.backend import RayBackend
    from lorafleet.serve.ray.replica import Board, replica_deployment
    from lorafleet.serve.registry import AdapterRegistry

    config = config or ServerConfig(model_name=base)
    root = str(Path(adapters_dir).resolve()) if adapters_dir is not None else None
    if root is not None and not Path(root).is_dir():
        raise LorafleetError(f"adapters directory not found: {adapters_dir}")
    spec = FleetSpec(
        base,
        root,
        replicas,
        threads,
        dtype,
        routing,
        config.model_name,
        settings or EngineSettings(),
    )
    started = connect(address, spec)
    try:
        gpus = ray.cluster_resources().get("GPU", 0)  # the cluster decides "auto"
        spec.resources = replica_resources(spec.settings.device, threads, cluster_gpus=gpus)
        device = replica_device(spec.resources)
        if device != "cpu" and spec.settings.quantize == SERVE_QUANTIZE:
            spec.settings.quantize = "none"  # the default's int8 / int4 kernels are the CPU's
        check_quantize_device(spec.settings.quantize, device)
        serve.start(proxy_location="Disabled")
        board = Board.remote()
        app = replica_deployment(spec).bind(spec, board)
        handle = serve.run(app, name=app_name, route_prefix=None)
        info = handle.describe.remote().result(timeout_s=600)
        backend = RayBackend(
            handle, lambda: ray.get(board.live.remote(), timeout=30), info, routing, retries
        )
        registry = AdapterRegistry(backend, root, max_rank=info["max_rank"])
        backend.path_of = lambda name: added_path(registry, name)
        state = ServerState(
            backend=backend, registry=registry, auth=auth or AuthConfig.off(), config=config
        )
    except BaseException:
        if started:
            serve.shutdown()
            ray.shutdown()
        raise
    return RayFleet(state, backend, started, app_name)
