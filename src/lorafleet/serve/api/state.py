"""What every route needs: the serving backend, registry, auth, metrics and the server settings."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import Request

from lorafleet.adapters.hub import not_found_hint, parse_hub_ref
from lorafleet.serve.api.auth import AuthConfig, Principal, valid_name
from lorafleet.serve.api.bridge import RequestStreams
from lorafleet.serve.api.classify import Classifier
from lorafleet.serve.api.config import ServerConfig
from lorafleet.serve.api.errors import APIError, model_not_found
from lorafleet.serve.api.injected import ImageEditor, ImageEditors, MoleModels
from lorafleet.serve.api.limits import Limiter, Limits
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
    image_editors: ImageEditors | None = None  # LoC models of the adapters dir, by `model`
    streams: RequestStreams = field(init=False)
    metrics: Metrics = field(init=False)
    limits: Limiter = field(init=False)  # per-tenant limits (auth file, server defaults)
    closing: bool = False
    created: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self):
        self.streams = RequestStreams(self.backend, self.config.max_waiting)
        self.metrics = Metrics(self.backend, self.registry)
        c = self.config
        default = Limits(c.max_concurrent_per_key, c.tokens_per_minute_per_key)
        self.limits = Limiter(lambda t: self.auth.limits_for(t, default), c.retry_after_s)

    @property
    def tokenizer(self):
        return self.backend.tokenizer

    @property
    def adapters_dir(self) -> Path | None:
        return self.registry.adapters_dir if self.registry is not None else None

    def adapter_names(self) -> list[str]:
        """The adapters and MoLEs requests may name (the registry rescans its directory first,
        so a MoLE fixed or broken since is listed as it is now; blocking: the routes that
        list are plain `def`s, which FastAPI runs on its thread pool)."""
        if self.registry is not None:
            names = [n for n in self.registry.names() if n != self.config.model_name]
        else:
            names = sorted(self.backend.loaded_adapters())
        return names + (self.moles.names() if self.moles is not None else [])

    def listing(self) -> list[dict]:
        """The admin listing's rows {name, state, private_to, kind, reason}: every adapter and
        MoLE that serves (its tier, or "available"), then every other entry of the adapters
        directory: a LoC model ("available") and each one that failed its check
        ("unavailable", with its reason). Rescans the directory."""
        reg, owner = self.registry, self.auth.owner
        rows = []
        for name in self.adapter_names():  # rescans
            entry = reg.entry(name) if reg is not None else None
            is_mole = self.moles is not None and name in self.moles
            tier = reg.state(name) if reg is not None else "resident"
            rows.append(
                {
                    "name": name,
                    "state": tier or "available",
                    "private_to": owner.get(name),
                    "kind": entry.kind if entry else ("mole" if is_mole else "adapter"),
                    "reason": reg.reason(name) if reg is not None else None,
                }
            )
        listed = {row["name"] for row in rows}
        for entry in reg.entries.all() if reg is not None else ():
            if entry.name not in listed:
                rows.append(
                    {
                        "name": entry.name,
                        "state": "available" if entry.available else "unavailable",
                        "private_to": owner.get(entry.name),
                        "kind": entry.kind,
                        "reason": entry.reason,
                    }
                )
        return rows

    def check_entry(self, model: str, who: Principal, text: bool = True) -> None:
        """A 400 naming the problem when `model` names an entry of the adapters directory
        that failed its check (re-checked first if its files changed), or, for a `text`
        request, one that serves no text (a LoC model); another tenant's private entry is the
        usual 404. Nothing for any other name (plain adapters are checked as they load).
        Blocking (the re-check may load a MoLE or LoC model): call it from a worker thread,
        never on the event loop."""
        if self.registry is None or model == self.config.model_name or not valid_name(model):
            return
        self.registry.refresh(model)
        entry = self.registry.entry(model)
        if entry is None:
            return
        if not self.auth.can_use(who, model):
            raise model_not_found(model)
        if entry.reason is not None:
            raise APIError(400, entry.reason, code="model_unavailable", param="model")
        if text and entry.usage:
            raise APIError(400, f"{model} is {entry.usage}", code="wrong_model_kind", param="model")

    def resolve(self, model: str, who: Principal) -> str | None:
        """The adapter `model` names for this caller (None = the base), or a 404 (a 400 for
        an unavailable entry of the adapters directory: check_entry, blocking as it is)."""
        if model == self.config.model_name:
            return None
        self.check_entry(model, who)
        hub = self.registry is not None and self.registry.hub is not None
        hub_id = hub and parse_hub_ref(model) is not None  # fetched by the registry when asked
        if not (valid_name(model) or hub_id) or not self.auth.can_use(who, model):
            raise model_not_found(model, "" if hub else not_found_hint(model))
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
