"""What every route needs: the engine loop, registry, auth, metrics and the server settings."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import Request

from lorafleet.errors import LorafleetError
from lorafleet.serve.api.auth import AuthConfig, Principal, valid_name
from lorafleet.serve.api.bridge import EngineLoop
from lorafleet.serve.api.classify import Classifier
from lorafleet.serve.api.errors import APIError, model_not_found
from lorafleet.serve.api.metrics import Metrics


@dataclass
class ServerConfig:
    """Server settings; checked on creation."""

    model_name: str  # the id the base model is served under (`model` = this means no adapter)
    max_waiting: int = 256  # queued requests beyond which new ones get 429
    default_max_tokens: int = 256  # chat requests that give no max_tokens
    shutdown_grace_s: float = 10.0
    max_upload_mb: float = 512.0
    retry_after_s: int = 1
    max_mixture: int = 8  # adapters one request may mix (`adapters`, `mix:`, merged_adapters)
    merge_cache_mb: float = 256.0  # ties / dare merges kept as virtual adapters (LRU by bytes)
    max_n: int = 8  # choices one OpenAI request may ask for (`n`)
    engine_threads: int | None = None  # torch threads of the engine thread (None = torch's)

    def __post_init__(self):
        if not isinstance(self.model_name, str) or not self.model_name.strip():
            raise LorafleetError("the served model name must be a non-empty string")
        for what, value in (
            ("max_waiting", self.max_waiting),
            ("default_max_tokens", self.default_max_tokens),
            ("max_mixture", self.max_mixture),
            ("max_n", self.max_n),
        ):
            if not isinstance(value, int) or value < 1:
                raise LorafleetError(f"{what} must be an integer >= 1, got {value!r}")
        if self.engine_threads is not None and (
            not isinstance(self.engine_threads, int) or self.engine_threads < 1
        ):
            raise LorafleetError(f"engine_threads must be >= 1, got {self.engine_threads!r}")
        if not self.merge_cache_mb >= 0:
            raise LorafleetError(f"merge_cache_mb must be >= 0, got {self.merge_cache_mb!r}")
        if self.shutdown_grace_s < 0 or self.max_upload_mb <= 0:
            raise LorafleetError("shutdown grace must be >= 0 and the upload limit > 0")


@dataclass
class ServerState:
    engine: object
    registry: object | None
    auth: AuthConfig
    config: ServerConfig
    classifier: Classifier | None = None  # class_choices' probabilities (the CLI's Laplace one)
    merged: object | None = None  # ties / dare merges as virtual adapters (a MergeCache)
    moles: object | None = None  # MoLE dirs served by name (compose.mole_serve.MoleCatalog)
    image_editor: object | None = None  # POST /v1/images/edits (image_edits.ImageEditor)
    loop: EngineLoop = field(init=False)
    metrics: Metrics = field(init=False)
    closing: bool = False
    created: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self):
        self.loop = EngineLoop(self.engine, self.config.max_waiting, self.config.engine_threads)
        self.metrics = Metrics(self.engine, self.registry, self.merged)

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def adapters_dir(self) -> Path | None:
        return getattr(self.registry, "adapters_dir", None)

    def adapter_names(self) -> list[str]:
        moles = self.moles.names() if self.moles is not None else []
        if self.registry is not None:
            return [n for n in self.registry.names() if n != self.config.model_name] + moles
        return sorted(self.engine.loaded_adapters()) + moles

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
        elif not self.engine.adapter_ready(model):
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
