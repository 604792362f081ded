"""lorafleet on Ray Serve: replicas of the engine routed by adapter (model multiplexing), the
same HTTP API at an ingress. Ray is imported only by the functions that need it."""

from __future__ import annotations

from lorafleet.errors import LorafleetError

RAY_HINT = (
    "--ray needs Ray Serve: pip install 'lorafleet[ray]' (or: pip install 'ray[serve]>=2.40')"
)


def require_ray() -> None:
    """A one-line LorafleetError saying what to install when Ray Serve is not importable."""
    try:
        import ray  # noqa: F401
        from ray import serve  # noqa: F401
    except ImportError as exc:
        raise LorafleetError(RAY_HINT) from exc


def start_fleet(*args, **kwargs):
    """See lorafleet.serve.ray.fleet.start_fleet (imports Ray)."""
    require_ray()
    from lorafleet.serve.ray.fleet import start_fleet as start

    return start(*args, **kwargs)


__all__ = ["RAY_HINT", "require_ray", "start_fleet"]
