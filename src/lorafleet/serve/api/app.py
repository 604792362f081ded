"""The FastAPI app: OpenAI-compatible, LoRAX-style and admin routes, health, metrics, playground."""

from __future__ import annotations

import asyncio
import contextlib
from importlib import resources

from fastapi import Depends, FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response

from lorafleet.serve.api import errors
from lorafleet.serve.api.admin_routes import router as admin_router
from lorafleet.serve.api.drain import Drain, Gate
from lorafleet.serve.api.encoding import BadBytesGuard
from lorafleet.serve.api.image_edits import router as image_router
from lorafleet.serve.api.lorax_routes import router as lorax_router
from lorafleet.serve.api.openai_routes import router as openai_router
from lorafleet.serve.api.state import ServerState, admin, state_of


def playground_html(name: str = "playground.html") -> str:
    return resources.files("lorafleet.serve.api").joinpath(f"web/{name}").read_text()


def create_app(state: ServerState) -> FastAPI:
    """An app serving `state`'s backend, which starts and stops with the app; its drain
    (`app.state.drain`, serve/api/drain.py) is what a server's SIGTERM starts."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        state.backend.start(state.config.engine_threads)
        try:
            yield
        finally:
            state.closing = True
            # Finish what is in flight (up to the drain timeout), cancel the rest.
            await asyncio.to_thread(state.backend.stop, state.config.drain_timeout_s)

    about = "One base model, many LoRA adapters: OpenAI-compatible serving."
    app = FastAPI(title="lorafleet", version="0.1", lifespan=lifespan, description=about)
    app.state.lorafleet = state
    drain = app.state.drain = Drain(state)
    state.metrics.in_flight.set_function(lambda: drain.in_flight)
    state.metrics.draining.set_function(lambda: float(drain.active or state.closing))
    app.add_middleware(BadBytesGuard)  # invalid UTF-8 / lone surrogates: 400, never a 500
    app.add_middleware(Gate, drain=drain)  # outermost: counts in-flight, refuses while draining
    errors.install(app)
    app.include_router(openai_router)
    app.include_router(lorax_router)
    app.include_router(admin_router)
    app.include_router(image_router)

    @app.get("/health")
    def health(request: Request):
        st = state_of(request)
        stats = st.backend.stats()
        draining = drain.active or st.closing
        body = {
            "status": "draining" if draining else "ok",
            "model": st.config.model_name,
            "waiting": stats["waiting"],
            "running": stats["running"],
            "resident_adapters": stats["adapters_loaded"],
            "in_flight": drain.in_flight,
        }
        return JSONResponse(body, status_code=503 if draining else 200)

    def metrics_guard(request: Request):
        # With auth on, metrics name private adapters: admins only.
        if state_of(request).auth.enabled:
            admin(request)

    @app.get("/metrics", dependencies=[Depends(metrics_guard)])
    def metrics(request: Request) -> Response:
        body = state_of(request).metrics.render()
        return Response(body, media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def playground() -> HTMLResponse:
        return HTMLResponse(playground_html())

    @app.get("/playground/edit.js", include_in_schema=False)
    def playground_edit_js() -> Response:  # the "Edit by example" tab
        return Response(playground_html("edit.js"), media_type="text/javascript; charset=utf-8")

    return app
