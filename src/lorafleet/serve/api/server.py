"""Building and running the server: engine + registry + app from settings; uvicorn in the
foreground (the CLI) or on a thread (tests, the demo)."""

from __future__ import annotations

import contextlib
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import uvicorn
from uvicorn.server import HANDLED_SIGNALS

from lorafleet.errors import LorafleetError
from lorafleet.models import Base
from lorafleet.serve.api.app import create_app
from lorafleet.serve.api.auth import AuthConfig
from lorafleet.serve.api.classify import Classifier
from lorafleet.serve.api.config import EngineSettings, ServerConfig
from lorafleet.serve.api.injected import ImageEditor, MoleModels
from lorafleet.serve.api.state import ServerState
from lorafleet.serve.engine import Engine
from lorafleet.serve.merged import MergeFn
from lorafleet.serve.registry import AdapterRegistry


def build_state(
    base: Base,
    adapters_dir: str | Path | None,
    auth: AuthConfig | None = None,
    settings: EngineSettings | None = None,
    config: ServerConfig | None = None,
    classifier: Callable[[Engine, AdapterRegistry], Classifier] | None = None,
    merge: MergeFn | None = None,
    moles: Callable[[Engine, AdapterRegistry], MoleModels] | None = None,
    image_editor: ImageEditor | None = None,
) -> ServerState:
    """The in-process engine over `base` (a loaded Base), a registry over `adapters_dir` (the
    engine's one adapter source), and the app state.
    `classifier(engine, registry)` builds what answers `class_choices` (none: a 400);
    `merge` (lorafleet.compose.merge_adapters) serves ties / dare merges as the registry's
    merged tier, within `config.merge_cache_mb` (none: a 400);
    `moles(engine, registry)` (lorafleet.compose.mole_serve.MoleCatalog) serves MoLE dirs;
    `image_editor` (lorafleet.change.serving.ChangeEditor) serves /v1/images/edits."""
    s = settings or EngineSettings()
    config = config or ServerConfig(model_name=base.name)
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
        engine,
        adapters_dir,
        cpu_cache_mb=s.cpu_cache_mb,
        cpu_cache_bytes=s.cpu_cache_bytes,
        merge=merge,
        merge_cache_mb=config.merge_cache_mb,
    )
    clash = config.model_name in registry.names()
    if clash:
        raise LorafleetError(f"an adapter is named {config.model_name!r}, like the base model")
    return ServerState(
        backend=engine,
        registry=registry,
        auth=auth or AuthConfig.off(),
        config=config,
        classifier=classifier(engine, registry) if classifier is not None else None,
        moles=moles(engine, registry) if moles is not None else None,
        image_editor=image_editor,
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


class GracefulServer(uvicorn.Server):
    """uvicorn's server, except that a SIGTERM / SIGINT it shut down for gracefully is not
    raised again afterwards (uvicorn's own `capture_signals` re-raises it, so the process
    would die by the signal): a completed graceful stop is a clean exit (code 0)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield  # signals reach the main thread only
            return
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in HANDLED_SIGNALS}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def serve_forever(state: ServerState, host: str, port: int) -> None:
    """Run uvicorn in the foreground; SIGTERM / Ctrl-C finish in-flight requests (up to the
    grace period), cancel the rest, and return (exit code 0)."""
    config = uvicorn.Config(
        create_app(state),
        host=host,
        port=port,
        log_level="info",
        timeout_graceful_shutdown=state.config.shutdown_grace_s,
    )
    GracefulServer(config).run()
