"""The settings of `lorafleet serve`: the HTTP server's (ServerConfig) and the engine's and
registry's sizes (EngineSettings); light (no fastapi, no torch), so the CLI reads their
defaults without importing the server."""

from __future__ import annotations

from dataclasses import dataclass

from lorafleet.errors import LorafleetError
from lorafleet.models.device import check_device
from lorafleet.serve.api.precision import AUTO


@dataclass
class ServerConfig:
    """Server settings; checked on creation."""

    model_name: str  # the id the base model is served under (`model` = this means no adapter)
    max_waiting: int = 256  # queued requests beyond which new ones get 429
    default_max_tokens: int = 256  # chat requests that give no max_tokens
    drain_timeout_s: float = 30.0  # SIGTERM: in-flight requests get this long, then are cut
    max_upload_mb: float = 512.0
    retry_after_s: int = 1
    max_mixture: int = 8  # adapters one request may mix (`adapters`, `mix:`, merged_adapters)
    merge_cache_mb: float = 256.0  # ties / dare merges kept as virtual adapters (LRU by bytes)
    max_n: int = 8  # choices one OpenAI request may ask for (`n`)
    engine_threads: int | None = None  # torch threads of the engine thread (None = torch's)
    # `model` / adapter_id `org/name[@rev]` fetched from the Hugging Face hub on first use
    # (off by default: it reaches the network); a local adapter of that name still wins.
    hub_adapters: bool = False
    # Limits of a tenant (an API key's, under --auth) that sets none of its own in the auth
    # file (serve/api/limits.py): requests in flight, and prompt + completion tokens per
    # minute. None: unlimited. Admin keys, and every caller when auth is off, are never limited.
    max_concurrent_per_key: int | None = None
    tokens_per_minute_per_key: int | None = None

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
        for what, value in (
            ("max_concurrent_per_key", self.max_concurrent_per_key),
            ("tokens_per_minute_per_key", self.tokens_per_minute_per_key),
        ):
            if value is not None and (not isinstance(value, int) or value < 1):
                raise LorafleetError(f"{what} must be an integer >= 1, got {value!r}")
        if not self.merge_cache_mb >= 0:
            raise LorafleetError(f"merge_cache_mb must be >= 0, got {self.merge_cache_mb!r}")
        if not self.drain_timeout_s >= 0 or self.max_upload_mb <= 0:
            raise LorafleetError("the drain timeout must be >= 0 and the upload limit > 0")


# `lorafleet serve`'s default precision: `auto`, resolved where the model loads by
# precision.resolve to the setting `bench quality`'s rule (bench/quality_stats.py DEFAULT_RULE,
# written before measuring) picked for this kind of CPU: bfloat16 where it is native, float32 +
# int4 elsewhere, exact float32 on a GPU. `--dtype float32 --quantize none` serves in exact
# float32 anywhere.
SERVE_DTYPE = AUTO
SERVE_QUANTIZE = AUTO


@dataclass
class EngineSettings:
    """Engine and registry sizes for `lorafleet serve`; checked by the engine itself."""

    max_adapters: int = 8  # resident adapter slots
    max_rank: int = 32
    max_batch_size: int = 16
    max_batch_tokens: int = 2048
    max_seq_len: int = 1024
    cpu_cache_mb: float = 512.0
    # weight-only int8 / int4 base linears (layers/quant.py); auto: precision.resolve's pick
    quantize: str = SERVE_QUANTIZE
    cpu_cache_bytes: int | str | None = None  # e.g. "2GB"; replaces cpu_cache_mb when set
    # Admission order under contention (serve/fair_share.py): "fair" shares tokens evenly
    # between tenants (adapters when auth is off); "fcfs" is first come, first served.
    schedule: str = "fair"
    # Where the model (and so every tensor of the engine) lives: auto | cpu | cuda
    # (models/device.py; auto = a CUDA GPU when torch sees one). Checked here, resolved when
    # the base loads; a Ray replica asks for a GPU when it resolves to cuda (serve/placement.py).
    device: str = "auto"
    # Prompt KV kept for reuse by later requests with the same prefix under the same adapter
    # (serve/prefix_cache.py), least recently used out past this size, e.g. "256MB"; 0 = off.
    prefix_cache_bytes: int | str = "256MB"

    def __post_init__(self):
        self.device = check_device(self.device)
