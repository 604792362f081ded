"""Starting a lorafleet fleet on Ray: the replicas' deployment, and the ingress (lorafleet's
HTTP app over a RayBackend) in this process."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

from lorafleet.errors import LorafleetError
from lorafleet.serve.api.auth import AuthConfig
from lorafleet.serve.api.config import EngineSettings, ServerConfig
from lorafleet.serve.api.injected import ImageEditor
from lorafleet.serve.api.precision import AUTO
from lorafleet.serve.merged import MergeFn
from lorafleet.serve.placement import Spread
from lorafleet.serve.ray.wire import HUB_NEEDS_SHARED_DIR, FleetSpec, route_id

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
        """One row per live replica: its engine stats plus replica, pid, node (its Ray
        node's IP), requests, adapter_loads (adapters put in its slots), disk_loads,
        routed_loads (Ray's multiplexed loads), resident (adapter names); `fresh`: read the
        board now."""
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


def build_ingress(
    backend,
    handle,
    root: str | None,
    auth: AuthConfig,
    config: ServerConfig,
    *,
    classifier: Callable | None = None,
    merge: MergeFn | None = None,
    moles: Callable | None = None,
    image_editor: ImageEditor | None = None,
    image_editors: Callable | None = None,
):
    """The ingress's ServerState over `backend` (a RayBackend on the deployment `handle`):
    its registry over the shared directory `root` (the same entry checks as `lorafleet
    serve`'s: MoLEs, calibrations, LoC models), and where each feature runs:
    - MoLEs (`moles`): checked here too (listing, 400s, masks), run by the replicas from
      their own catalog, routed by the MoLE's name (ingress.RoutedMoles);
    - ties / dare merges (`merge`): merged here once per recipe, written to the shared
      directory and run by replicas as a plain adapter (ingress.SharedAdapters; none without
      a directory: a 400 as on a server without merges);
    - class_choices (`classifier`): whether an adapter is calibrated is checked here, its
      probabilities computed on a replica routed by the adapter (ingress.RoutedClassifier);
    - image edits (`image_editor`, `image_editors`): here, in the ingress (a small image
      model, not the LLM the replicas hold);
    - hub adapters (config.hub_adapters): fetched here, copied to the shared directory."""
    from lorafleet.serve.api.state import ServerState
    from lorafleet.serve.ray.ingress import RoutedClassifier, RoutedMoles, SharedAdapters
    from lorafleet.serve.registry import AdapterRegistry

    registry = AdapterRegistry(
        backend,
        root,
        max_rank=backend.max_rank,
        merge=merge if root is not None else None,
        merge_cache_mb=config.merge_cache_mb,
        hub_adapters=config.hub_adapters,
        scan=False,  # once the factories below added the kinds of entries they serve
    )
    shared = SharedAdapters(registry, added_path)
    backend.place = shared.place
    local = classifier(backend, registry) if classifier is not None else None
    catalog = moles(backend, registry) if moles is not None else None
    editors = image_editors(backend, registry) if image_editors is not None else None
    registry.rescan()
    if config.model_name in registry.names():
        raise LorafleetError(f"an adapter is named {config.model_name!r}, like the base model")

    def ask(adapter: str, prompt: str, choices: list[str]) -> dict:
        return classify_on_replica(backend, handle, shared, adapter, prompt, choices)

    return ServerState(
        backend=backend,
        registry=registry,
        auth=auth,
        config=config,
        classifier=RoutedClassifier(local, ask) if local is not None else None,
        moles=RoutedMoles(catalog) if catalog is not None else None,
        image_editor=image_editor,
        image_editors=editors,
    )


def classify_on_replica(backend, handle, shared, adapter, prompt, choices) -> dict:
    """class_choices' answer from a replica (routed by `adapter` under affinity routing),
    sent again to another when the replica dies (`backend.retries` times); a one-line
    LorafleetError naming the problem otherwise."""
    from lorafleet.serve.ray.backend import failure_text

    _, paths = shared.place(adapter)
    model_id = route_id(adapter) if backend.routing == "affinity" else ""
    for tries in range(backend.retries + 1):
        try:
            call = handle.options(multiplexed_model_id=model_id).classify
            out = call.remote(adapter, prompt, choices, paths).result(timeout_s=600)
            break
        except Exception as exc:
            if tries == backend.retries:
                raise LorafleetError(failure_text(exc)) from None
            time.sleep(0.5 * (tries + 1))  # time for Ray to see the replica gone
    if "error" in out:
        raise LorafleetError(out["error"])
    return out


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
    dtype: str = AUTO,
    retries: int = 3,
    app_name: str = APP_NAME,
    spread: Spread | None = None,
    classifier: Callable | None = None,
    merge: MergeFn | None = None,
    moles: Callable | None = None,
    image_editor: ImageEditor | None = None,
    image_editors: Callable | None = None,
) -> RayFleet:
    """Deploy `replicas` lorafleet replicas of `base` on Ray (a local cluster started now when
    `address` is None, else the cluster there) and build the ingress's state over them
    (`start_http` serves it; the CLI serves it in the foreground). Blocks until every replica
    has loaded its model. `routing`: "affinity" (Ray Serve's multiplexing by adapter) or
    "round_robin" (no model id: Ray's adapter-blind balancing). `spread`: how replicas spread
    over the nodes (placement.Spread; max_replicas_per_node=1: one per machine, and a cluster
    of too few nodes for that is a one-line LorafleetError). A bad setting: one-line
    LorafleetError before Ray starts.
    `classifier`, `merge`, `moles`, `image_editor`, `image_editors`: what build_state takes
    (the CLI's laplace_classifier, merge_adapters, MoleCatalog, ChangeEditor, ChangeCatalog);
    where each runs: build_ingress. With `config.hub_adapters` on a cluster (`address`
    given) the adapters directory must be shared (hub adapters are copied there): a
    one-line LorafleetError without one."""
    import ray
    from ray import serve

    from lorafleet.layers import check_quantize_device
    from lorafleet.serve.placement import replica_device, replica_resources
    from lorafleet.serve.ray.backend import RayBackend
    from lorafleet.serve.ray.replica import Board, ReplicaExtras, replica_deployment

    config = config or ServerConfig(model_name=base)
    root = str(Path(adapters_dir).resolve()) if adapters_dir is not None else None
    if root is not None and not Path(root).is_dir():
        raise LorafleetError(f"adapters directory not found: {adapters_dir}")
    if config.hub_adapters and root is None and address is not None:
        raise LorafleetError(HUB_NEEDS_SHARED_DIR)
    spec = FleetSpec(
        base,
        root,
        replicas,
        threads,
        dtype,
        routing,
        config.model_name,
        settings or EngineSettings(),
        spread=spread or Spread(),
    )
    started = connect(address, spec)
    try:
        spec.spread.check_room(replicas, sum(1 for node in ray.nodes() if node["Alive"]))
        gpus = ray.cluster_resources().get("GPU", 0)  # the cluster decides "auto"
        spec.resources = replica_resources(spec.settings.device, threads, cluster_gpus=gpus)
        device = replica_device(spec.resources)
        if spec.settings.quantize != AUTO:  # auto: each replica resolves it for its CPU
            check_quantize_device(spec.settings.quantize, device)
        serve.start(proxy_location="Disabled")
        board = Board.remote()
        extras = ReplicaExtras(moles=moles, classifier=classifier, hub_adapters=config.hub_adapters)
        app = replica_deployment(spec).bind(spec, board, extras)
        handle = serve.run(app, name=app_name, route_prefix=None)
        info = handle.describe.remote().result(timeout_s=600)
        backend = RayBackend(
            handle, lambda: ray.get(board.live.remote(), timeout=30), info, routing, retries
        )
        state = build_ingress(
            backend,
            handle,
            root,
            auth or AuthConfig.off(),
            config,
            classifier=classifier,
            merge=merge,
            moles=moles,
            image_editor=image_editor,
            image_editors=image_editors,
        )
    except BaseException:
        if started:
            serve.shutdown()
            ray.shutdown()
        raise
    return RayFleet(state, backend, started, app_name)
