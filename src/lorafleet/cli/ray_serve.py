"""`lorafleet serve --ray`: the same HTTP API, its requests served by replicas on Ray Serve."""

from __future__ import annotations

import os

import typer

from lorafleet.errors import LorafleetError


def check_ray_flags(ray: bool, address: str | None, replicas: int | None, **unsupported) -> None:
    """One-line errors for Ray flags without --ray, and --ray with what it does not serve
    (`unsupported`: option name -> the value given, None / False when not given)."""
    if not ray:
        if address is not None or replicas is not None:
            raise LorafleetError("--address and --replicas need --ray")
        return
    given = [name for name, value in unsupported.items() if value not in (None, False)]
    if given:
        raise LorafleetError(f"--ray does not serve {', '.join(given)} (use lorafleet serve alone)")


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
) -> int:
    """Deploy the replicas (lorafleet.serve.ray.start_fleet), serve the HTTP API here in the
    foreground until SIGTERM / Ctrl-C (which drain it), then remove the deployment."""
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
    )
    try:
        names = fleet.state.adapter_names()
        typer.echo(
            f"lorafleet: serving {config.model_name} + {len(names)} adapter(s) from "
            f"{replicas} Ray replica(s), routed by adapter, on http://{host}:{port}  "
            f"(playground: http://{host}:{port}/)",
            err=True,
        )
        serve_forever(fleet.state, host, port)
    finally:
        fleet.close()
    return 0
