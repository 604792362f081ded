"""Building and running the server: engine + registry + app from settings; uvicorn in the
foreground (the CLI) or on a thread (tests, the demo), draining on SIGTERM."""

from __future__ import annotations

import contextlib
import logging
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
from lorafleet.serve.adapter_store import parse_size
from lorafleet.serve.api import precision
from lorafleet.serve.api.admin_routes import clean_stale_uploads
from lorafleet.serve.api.app import create_app
from lorafleet.serve.api.auth import AuthConfig
from lorafleet.serve.api.classify import Classifier
from lorafleet.serve.api.config import EngineSettings, ServerConfig
from lorafleet.serve.api.drain import CUT_FLUSH_S, Drain
from lorafleet.serve.api.injected import ImageEditor, ImageEditors, MoleModels
from lorafleet.serve.api.state import ServerState
from lorafleet.serve.engine import Engine
from lorafleet.serve.merged import MergeFn
from lorafleet.serve.registry import AdapterRegistry

log = logging.getLogger("uvicorn.error")  # where uvicorn logs its own start and shutdown


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
    image_editors: Callable[[Engine, AdapterRegistry], ImageEditors] | None = None,
) -> ServerState:
    """The in-process engine over `base` (a loaded Base), a registry over `adapters_dir` (the
    engine's one adapter source), and the app state.
    `classifier(engine, registry)` builds what answers `class_choices` (none: a 400);
    `merge` (lorafleet.compose.merge_adapters) serves ties / dare merges as the registry's
    merged tier, within `config.merge_cache_mb` (none: a 400);
    `moles(engine, registry)` (lorafleet.compose.mole_serve.MoleCatalog) serves MoLE dirs;
    `image_editor` (lorafleet.change.serving.ChangeEditor) serves /v1/images/edits;
    `image_editors(engine, registry)` (lorafleet.change.serving.ChangeCatalog) serves the LoC
    models of the adapters dir there by `model`.
    The factories add the kinds of directory entries they serve to the registry; then the
    directory is scanned once, every entry checked on its own (a failing one is listed as
    unavailable with its reason, never stopping the server).
    Upload temp dirs in `adapters_dir` that an earlier process left (killed mid-upload) are
    removed first; they were never served."""
    s = settings or EngineSettings()
    if adapters_dir is not None and Path(adapters_dir).is_dir():
        for path in clean_stale_uploads(Path(adapters_dir)):
            log.warning("removed %s: an upload that never completed", path)
    config = config or ServerConfig(model_name=base.name)
    engine = Engine(
        base,
        max_slots=s.max_adapters,
        max_rank=s.max_rank,
        max_batch_size=s.max_batch_size,
        max_batch_tokens=s.max_batch_tokens,
        max_seq_len=min(s.max_seq_len, _max_positions(base)),
        quantize=_quantize(base, s.quantize),
        schedule=s.schedule,
        prefix_cache_bytes=parse_size(s.prefix_cache_bytes),
    )
    registry = AdapterRegistry(
        engine,
        adapters_dir,
        cpu_cache_mb=s.cpu_cache_mb,
        cpu_cache_bytes=s.cpu_cache_bytes,
        merge=merge,
        merge_cache_mb=config.merge_cache_mb,
        hub_adapters=config.hub_adapters,
        scan=False,  # once the factories below added the kinds of entries they serve
    )
    made = {
        "classifier": classifier(engine, registry) if classifier is not None else None,
        "moles": moles(engine, registry) if moles is not None else None,
        "image_editors": image_editors(engine, registry) if image_editors is not None else None,
    }
    registry.rescan()
    clash = config.model_name in registry.names()
    if clash:
        raise LorafleetError(f"an adapter is named {config.model_name!r}, like the base model")
    return ServerState(
        backend=engine,
        registry=registry,
        auth=auth or AuthConfig.off(),
        config=config,
        image_editor=image_editor,
        **made,
    )


def _quantize(base, quantize: str) -> str:
    """`quantize`, with `auto` resolved for the loaded base's dtype and device."""
    parameter = next(base.model.parameters())
    dtype = str(parameter.dtype).removeprefix("torch.")
    return precision.resolve(dtype, quantize, parameter.device.type)[1]


def _max_positions(base) -> int:
    return int(getattr(base.model.config, "max_position_embeddings", 2048))


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


class ServerThread:
    """uvicorn serving `state` on a background thread (tests, the demo); `with` starts/stops.
    `drain()` does what a SIGTERM does to `lorafleet serve`; `stop()` stops at once."""

    def __init__(self, state: ServerState, host: str = "127.0.0.1", port: int | None = None):
        self.state, self.host = state, host
        self.port = port or free_port(host)
        app = create_app(state)
        config = uvicorn.Config(
            app,
            host=host,
            port=self.port,
            log_level="warning",
            timeout_graceful_shutdown=state.config.drain_timeout_s,
        )
        self.server = DrainingServer(config, app.state.drain)
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

    def drain(self) -> None:
        """Start a graceful drain (returns at once); the thread ends when it is done."""
        self.server.drain.request()

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=60)

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class DrainingServer(uvicorn.Server):
    """uvicorn's server, draining first. The first SIGTERM / SIGINT starts `drain` (the app's:
    new requests 503, in-flight ones finish up to the drain timeout, then the rest are cut),
    after which uvicorn's own shutdown runs (the listening socket closes, the engine stops); a
    second signal cuts what is in flight at once (as the timeout would), a third one stops
    without waiting for that, and another SIGINT then quits at once. A signal it shut
    down for is not raised again afterwards (uvicorn's own `capture_signals` re-raises it, so
    the process would die by the signal): a completed graceful stop is a clean exit (code 0)."""

    def __init__(self, config: uvicorn.Config, drain: Drain):
        super().__init__(config)
        self.drain = drain
        self._told = False  # the drain's start is logged once

    def handle_exit(self, sig: int, frame) -> None:
        # These only set fields: on_tick (the event loop) does the rest.
        if self.should_exit:
            super().handle_exit(sig, frame)
        elif not self.drain.active:
            self.drain.request()
        elif not self.drain.hurried:
            self.drain.hurry()
        else:
            super().handle_exit(sig, frame)

    async def on_tick(self, counter: int) -> bool:
        if self.drain.active and not self.should_exit:
            if not self._told:
                self._told = True
                log.info(
                    "Draining: new requests get 503; %d in flight get up to %g s",
                    self.drain.in_flight,
                    self.drain.state.config.drain_timeout_s,
                )
            cut_before = self.drain.cut_at
            if self.drain.tick():
                # Drained (or cut): what is left only has to close its connections.
                self.config.timeout_graceful_shutdown = CUT_FLUSH_S
                self.should_exit = True
            if cut_before is None and self.drain.cut_at is not None:
                log.warning("Drain timeout: ended %d stream(s) with an error event", self.drain.cut)
        return await super().on_tick(counter)

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
    """Run uvicorn in the foreground until SIGTERM / Ctrl-C, which drain the server
    (DrainingServer), then return (exit code 0)."""
    app = create_app(state)
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level="info",
        timeout_graceful_shutdown=state.config.drain_timeout_s,
    )
    DrainingServer(config, app.state.drain).run()
