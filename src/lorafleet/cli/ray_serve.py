"""`lorafleet serve --ray`: the same HTTP API, its requests served by replicas on Ray Serve."""

from __future__ import annotations

import os
from pathlib import Path

import typer

from lorafleet.errors import LorafleetError
from lorafleet.serve.ray.wire import HUB_NEEDS_SHARED_DIR


def check_ray_flags(
    ray: bool,
    address: str | None,
    replicas: int | None,
    max_replicas_per_node: int | None = None,
    *,
    hub_adapters: bool = False,
    adapters: str | None = None,
    **unsupported,
) -> None:
    """One-line errors for Ray flags without --ray, and --ray with what it does not serve
    (`unsupported`: option name -> the value given, None / False when not given): on a
    cluster (`address`), `hub_adapters` needs `adapters` to be a (shared) directory."""
    if not ray:
        given = [
            flag
            for flag, value in (
                ("--address", address),
                ("--replicas", replicas),
                ("--max-replicas-per-node", max_replicas_per_node),
            )
            if value is not None
        ]
        if given:
            verb = "needs" if len(given) == 1 else "need"
            raise LorafleetError(f"{' and '.join(given)} {verb} --ray")
        return
    given = [name for name, value in unsupported.items() if value not in (None, False)]
    if given:
        raise LorafleetError(f"--ray does not serve {', '.join(given)} (use lorafleet serve alone)")
    shared = adapters is not None and Path(adapters).expanduser().is_dir()
    if hub_adapters and address is not None and not shared:
        raise LorafleetError(HUB_NEEDS_SHARED_DIR)


def serve_on_ray(
    *,
    base: str,
    dtype: str,
    adapters_dir,
    auth,
    settings,
    config,
    address: str | None,
    replicas: int | None,
    threads: int | None,
    host: str,
    port: int,
    spread=None,
    features: dict | None = None,
    hub: tuple | None = None,
) -> int:
    """Deploy the replicas (lorafleet.serve.ray.start_fleet), serve the HTTP API here in the
    foreground until SIGTERM / Ctrl-C (which drain it), then remove the deployment.
    `features`: start_fleet's classifier, merge, moles, image_editor, image_editors (what
    `serve` gives build_state); `hub`: (HubRef, snapshot path) of `--adapters org/name`."""
    from lorafleet.serve.api.server import serve_forever
    from lorafleet.serve.ray import require_ray

    require_ray()  # one line naming what to install, before anything loads
    from lorafleet.serve.ray.fleet import start_fleet

    replicas = replicas or 1
    # One machine: its cores shared by the replicas, one left to the ingress.
    threads = threads or max(1, ((os.cpu_count() or 2) - 1) // replicas)
    where = address or "a local Ray cluster"
    typer.echo(
        f"lorafleet: starting {replicas} replica(s) of {base} on {where} "
        f"({threads} thread(s), {settings.max_adapters} adapter slots each)",
        err=True,
    )
    fleet = start_fleet(
        base,
        adapters_dir,
        replicas=replicas,
        threads=threads,
        settings=settings,
        config=config,
        auth=auth,
        address=address,
        dtype=dtype,
        spread=spread,
        **(features or {}),
    )
    try:
        if hub is not None:  # read and validated against the base, as any adapter
            from lorafleet.serve.hub_source import add_hub_adapter

            add_hub_adapter(fleet.state.registry, *hub)
        names = fleet.state.adapter_names()
        typer.echo(
            f"lorafleet: serving {config.model_name} + {len(names)} adapter(s) from "
            f"{replicas} Ray replica(s), routed by adapter, on http://{host}:{port}  "
            f"(playground: http://{host}:{port}/)",
            err=True,
        )
        if fleet.state.image_editor is not None:
            typer.echo(
                f"lorafleet: image edits by example with LoC model "
                f"{fleet.state.image_editor.name}, run here (the ingress), at "
                f"http://{host}:{port}/v1/images/edits",
                err=True,
            )
        serve_forever(fleet.state, host, port)
    finally:
        fleet.close()
    return 0
