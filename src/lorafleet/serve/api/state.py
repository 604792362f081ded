"""What every route needs: the serving backend, registry, auth, metrics and the server settings."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import Request

from lorafleet.serve.api.auth import AuthConfig, Principal, valid_name
from lorafleet.serve.api.bridge import RequestStreams
from lorafleet.serve.api.classify import Classifier
from lorafleet.serve.api.config import ServerConfig
from lorafleet.serve.api.errors import APIError, model_not_found
from lorafleet.serve.api.injected import ImageEditor, MoleModels
from lorafleet.serve.api.metrics import Metrics
from lorafleet.serve.backend import ServingBackend
from lorafleet.serve.registry import AdapterRegistry


@dataclass
class ServerState:
    """A server's parts: routes reach the model only through `backend` (and the registry,
    which itself uses only the backend), so any ServingBackend serves the same API."""

    backend: ServingBackend
    registry: AdapterRegistry | None  # adapters by name (None: only what is resident)
    auth: AuthConfig
    config: ServerConfig
    classifier: Classifier | None = None  # class_choices' probabilities (the CLI's Laplace one)
    moles: MoleModels | None = None  # MoLE dirs served by name (compose.mole_serve.MoleCatalog)
    image_editor: ImageEditor | None = None  # POST /v1/images/edits (change.serving)
    streams: RequestStreams = field(init=False)
    metrics: Metrics = field(init=False)
    closing: bool = False
    created: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self):
        self.streams = RequestStreams(self.backend, self.config.max_waiting)
        self.metrics = Metrics(self.backend, self.registry)

    @property
    def tokenizer(self):
        return self.backend.tokenizer

    @property
    def adapters_dir(self) -> Path | None:
        return self.registry.adapters_dir if self.registry is not None else None

    def adapter_names(self) -> list[str]:
        moles = self.moles.names() if self.moles is not None else []
        if self.registry is not None:
            return [n for n in self.registry.names() if n != self.config.model_name] + moles
        return sorted(self.backend.loaded_adapters()) + moles

    def resolve(self, model: str, who: Principal) -> str | None:
        """The adapter `model` names for this caller (None = the base), or a 404."""
        if model == self.config.model_name:
            return None
        if not valid_name(model) or not self.auth.can_use(who, model):
            raise model_not_found(model)
        if self.moles is not None and model in self.moles:
            return model
        if self.registry is not None:
            if self.registry.state(model) is None:
                raise model_not_found(model)
        elif not self.backend.adapter_ready(model):
            raise model_not_found(model)
        return model


def state_of(request: Request) -> ServerState:
    return request.app.state.lorafleet


def principal(request: Request) -> Principal:
    """The caller from `Authorization: Bearer KEY` (401 when auth is on and the key is bad)."""
    state = state_of(request)
    header = request.headers.get("authorization", "")
    scheme, _, key = header.partition(" ")
    key = key.strip() if scheme.lower() == "bearer" else ""
    who = state.auth.identify(key or None)
    if who is None:
        message = "Incorrect API key provided." if key else "Missing API key (Bearer KEY)."
        raise APIError(401, message, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
    return who


def admin(request: Request) -> Principal:
    """An admin caller, or 401 (bad key) / 403 (not an admin, or auth is off)."""
    state = state_of(request)
    if not state.auth.enabled or not state.auth.admin_keys:
        raise APIError(
            403,
            "admin endpoints are off: start the server with --auth FILE that lists admin_keys",
            code="admin_disabled",
        )
    who = principal(request)
    if not who.admin:
        raise APIError(403, "this endpoint needs an admin key", code="not_admin")
    return who
