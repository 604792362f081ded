"""Building and running the server: engine + registry + app from settings; uvicorn in the
foreground (the CLI) or on a thread (tests, the demo)."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from lorafleet.errors import LorafleetError
from lorafleet.serve.api.app import create_app
from lorafleet.serve.api.auth import AuthConfig
from lorafleet.serve.api.classify import Classifier
from lorafleet.serve.api.image_edits import ImageEditor
from lorafleet.serve.api.merge_cache import MergeCache, MergeFn
from lorafleet.serve.api.state import ServerConfig, ServerState


@dataclass
class EngineSettings:
    """Engine and registry sizes for `lorafleet serve`; checked by the engine itself."""

    max_adapters: int = 8  # resident adapter slots
    max_rank: int = 32
    max_batch_size: int = 16
    max_batch_tokens: int = 2048
    max_seq_len: int = 1024
    cpu_cache_mb: float = 512.0
    quantize: str = "none"  # weight-only int8 / int4 base linears (layers/quant.py)
    cpu_cache_bytes: int | str | None = None  # e.g. "2GB"; replaces cpu_cache_mb when set


def build_state(
    base,
    adapters_dir: str | Path | None,
    auth: AuthConfig | None = None,
    settings: EngineSettings | None = None,
    config: ServerConfig | None = None,
    classifier: Callable[..., Classifier] | None = None,
    merge: MergeFn | None = None,
    moles: Callable | None = None,
    image_editor: ImageEditor | None = None,
) -> ServerState:
    """Engine over `base` (a loaded Base), registry over `adapters_dir`, and the app state.
    `classifier(engine, registry)` builds what answers `class_choices` (none: a 400);
    `merge` (lorafleet.compose.merge_adapters) serves ties / dare merges (none: a 400);
    `moles(engine, registry)` (lorafleet.compose.mole_serve.MoleCatalog) serves MoLE dirs;
    `image_editor` (lorafleet.change.serving.ChangeEditor) serves /v1/images/edits."""
    from lorafleet.serve import AdapterRegistry, Engine

    s = settings or EngineSettings()
    engine = Engine(
        base,
        max_slots=s.max_adapters,
        max_rank=s.max_rank,
        max_batch_size=s.max_batch_size,
        max_batch_tokens=s.max_batch_tokens,
        max_seq_len=min(s.max_seq_len, _max_positions(base)),
        quantize=s.quantize,
    )
    registry = AdapterRegistry(
        engine, adapters_dir, cpu_cache_mb=s.cpu_cache_mb, cpu_cache_bytes=s.cpu_cache_bytes
    )
    config = config or ServerConfig(model_name=base.name)
    clash = config.model_name in registry.names()
    if clash:
        raise LorafleetError(f"an adapter is named {config.model_name!r}, like the base model")
    made = classifier(engine, registry) if classifier is not None else None
    merged = MergeCache(engine, registry, merge, config.merge_cache_mb) if merge else None
    catalog = moles(engine, registry) if moles is not None else None
    return ServerState(
        engine, registry, auth or AuthConfig.off(), config, made, merged, catalog, image_editor
    )


def _max_positions(base) -> int:
    return int(getattr(base.model.config, "max_position_embeddings", 2048))


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


class ServerThread:
    """uvicorn serving `state` on a background thread (tests, the demo); `with` starts/stops."""

    def __init__(self, state: ServerState, host: str = "127.0.0.1", port: int | None = None):
        import uvicorn

        self.state, self.host = state, host
        self.port = port or free_port(host)
        grace = state.config.shutdown_grace_s
        config = uvicorn.Config(
            create_app(state),
            host=host,
            port=self.port,
            log_level="warning",
            timeout_graceful_shutdown=grace,
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="lorafleet-http", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 30.0) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise LorafleetError(f"the server did not start on {self.url}")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=60)

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def serve_forever(state: ServerState, host: str, port: int) -> None:
    """Run uvicorn in the foreground; SIGTERM / Ctrl-C finish in-flight requests (up to the
    grace period), cancel the rest, and return (exit code 0)."""
    import uvicorn

    class GracefulServer(uvicorn.Server):
        # uvicorn re-raises a caught SIGTERM after its graceful shutdown, so the process would
        # die by the signal; a completed graceful stop is a clean exit here.
        def handle_exit(self, sig, frame) -> None:
            super().handle_exit(sig, frame)
            getattr(self, "_captured_signals", []).clear()

    config = uvicorn.Config(
        create_app(state),
        host=host,
        port=port,
        log_level="info",
        timeout_graceful_shutdown=state.config.shutdown_grace_s,
    )
    GracefulServer(config).run()
