"""The settings of `lorafleet bench fleet-sim` and `lorafleet bench ray-routing`, and the
simulator's figures (light: the CLI reads their defaults at start). Every figure the simulator
uses is named in FIGURES with where it comes from: measured on this project's machine
(BENCHMARKS.md), derived from measured ones, documented by Ray, read from Ray's source, or
assumed."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

from lorafleet.errors import LorafleetError

POLICIES = ("affinity", "round-robin", "pow2")
POPULARITIES = ("zipf", "uniform")
LAYOUTS = {"2x1": (2, 1), "1x2": (1, 2)}  # ray-routing: name -> (replicas, threads each)
ROUTINGS = ("affinity", "round_robin")  # ray-routing: serve.ray.start_fleet's routings
KINDS = ("measured", "derived", "documented", "ray-source", "assumed")


@dataclass(frozen=True)
class Figures:
    """The numbers behind the model, in seconds and bytes. A step of one replica's engine
    takes `step_base_s + step_per_row_s * rows + step_per_adapter_s * distinct adapters +
    prefill_per_token_s * prompt tokens prefilled in it` (the engine decodes its running rows
    and prefills the newly admitted ones in one forward)."""

    step_base_s: float = 0.072
    step_per_row_s: float = 0.0062
    step_per_adapter_s: float = 0.002
    prefill_per_token_s: float = 0.0035
    cold_load_s: float = 0.011
    adapter_bytes: float = 1.8e6
    replica_rss_bytes: float = 1.6e9
    store_bandwidth_Bps: float = 1.25e9
    store_latency_s: float = 0.005
    view_delay_s: float = 0.15
    control_loop_s: float = 0.1
    ingress_latency_s: float = 0.0015
    ingress_msgs_per_s: float = 3500.0
    controller_Bps: float = 100e6
    model_id_bytes: float = 48.0
    replica_info_bytes: float = 500.0

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, int | float) or not value >= 0:
                raise LorafleetError(f"figure {f.name} must be a number >= 0, got {value!r}")
        for name in ("step_base_s", "store_bandwidth_Bps", "ingress_msgs_per_s", "controller_Bps"):
            if getattr(self, name) <= 0:
                raise LorafleetError(f"figure {name} must be > 0")

    def with_overrides(self, pairs: tuple[str, ...]) -> Figures:
        """These figures with `NAME=VALUE` pairs applied (a bad pair: one-line error)."""
        known = {f.name for f in fields(self)}
        changes = {}
        for pair in pairs:
            name, sep, text = pair.partition("=")
            name = name.strip()
            if not sep or name not in known:
                names = ", ".join(sorted(known))
                raise LorafleetError(f"--figure {pair!r}: expected NAME=VALUE, NAME one of {names}")
            try:
                changes[name] = float(text)
            except ValueError:
                raise LorafleetError(f"--figure {pair!r}: {text!r} is not a number") from None
        return replace(self, **changes)


_BENCH = "BENCHMARKS.md"
_SERVE = f"{_BENCH}, 'Serving over HTTP' (issue 21), `default` float32, 1 torch thread"
# Field -> (kind, where it comes from). Kinds: measured here, derived from measured figures,
# documented by Ray, a constant of Ray Serve 2.60's source, or assumed (no measurement).
FIGURES: dict[str, tuple[str, str]] = {
    "step_base_s": (
        "derived",
        f"least-squares fit of TPOT p50 at 1/8/32/64 clients (0.070/0.144/0.284/0.471 s), {_SERVE}",
    ),
    "step_per_row_s": ("derived", "the same fit: the slope per running row"),
    "step_per_adapter_s": (
        "derived",
        f"{_BENCH}, 'Where the time goes': LoRA ops 31.9 ms of a 229 ms decode step with "
        "16 distinct rank-16 adapters (2 threads), ~2 ms per distinct adapter",
    ),
    "prefill_per_token_s": (
        "derived",
        f"TTFT p50 0.22 s at 1 client (32 prompt tokens) and 3.69 s at 32 (1,024), {_SERVE}",
    ),
    "cold_load_s": (
        "measured",
        f"{_BENCH}, 'A thousand adapters': cold load p50 9-11 ms (disk read + checks + "
        "staging of a 1.8 MB rank-8 q/v adapter)",
    ),
    "adapter_bytes": ("measured", f"{_BENCH}, 'A thousand adapters': ~1.8 MB per adapter file"),
    "replica_rss_bytes": (
        "measured",
        f"{_BENCH}, 'A thousand adapters': peak RSS 1.6-2.0 GB per engine process",
    ),
    "store_bandwidth_Bps": ("assumed", "a 10 Gb/s shared adapter store (NFS / object store)"),
    "store_latency_s": ("assumed", "first-byte latency of one adapter read from the store"),
    "view_delay_s": (
        "ray-source",
        "replicas push their model ids every 0.1 s (PUSH_MULTIPLEXED_MODEL_IDS_INTERVAL_S), the "
        "controller broadcasts in its 0.1 s loop (CONTROL_LOOP_INTERVAL_S): mean lag ~0.15 s",
    ),
    "control_loop_s": (
        "ray-source",
        "CONTROL_LOOP_INTERVAL_S = 0.1: at most one broadcast per loop",
    ),
    "ingress_latency_s": (
        "documented",
        "Ray Serve performance docs: latency overhead ~1-2 ms per request "
        "(`bench ray-routing` measures lorafleet's own ingress against `lorafleet serve`)",
    ),
    "ingress_msgs_per_s": (
        "assumed",
        "requests + streamed chunks one ingress process (lorafleet's HTTP app over a Ray "
        "handle) forwards per second: the order of Ray's documented proxy figure, 3-4k no-op "
        "queries/s on one 8-core node",
    ),
    "controller_Bps": (
        "assumed",
        "bytes/s the single-threaded controller actor can pickle and send in routing broadcasts",
    ),
    "model_id_bytes": ("assumed", "one adapter name in the broadcast (name + pickling)"),
    "replica_info_bytes": ("assumed", "the rest of one replica's entry in the broadcast"),
}


@dataclass
class FleetConfig:
    """One `bench fleet-sim` run: the workload, the fleet shapes and what to report."""

    adapters: int = 10_000
    replicas: tuple[int, ...] = (100,)
    slots: int = 32  # adapter slots per replica = Ray's max_num_models_per_replica
    max_batch: int = 32  # running rows per replica's engine
    max_batch_tokens: int = 2048  # prompt tokens prefilled per step, at most
    max_ongoing: int = 32  # Ray's max_ongoing_requests per replica
    rate: float = 120.0  # requests/s, Poisson
    popularity: tuple[str, ...] = POPULARITIES
    zipf_s: float = 1.0
    policies: tuple[str, ...] = POLICIES
    prompt_tokens: int = 32
    new_tokens: int = 48
    requests: int = 20_000
    warmup: float = 0.2  # share of the requests (the first ones) left out of the figures
    target_p99_s: float = 2.0
    find_replicas: bool = True
    max_replicas: int = 1000  # the search for replicas needed stops here
    figures: tuple[str, ...] = ()  # NAME=VALUE overrides of Figures
    seed: int = 0

    def __post_init__(self):
        self.replicas = tuple(self.replicas)
        self.popularity = tuple(self.popularity)
        self.policies = tuple(self.policies)
        self.figures = tuple(self.figures)
        for what in ("adapters", "slots", "max_batch", "max_ongoing", "prompt_tokens"):
            if getattr(self, what) < 1:
                raise LorafleetError(f"--{what.replace('_', '-')} must be >= 1")
        for what in ("new_tokens", "requests", "max_replicas"):
            if getattr(self, what) < 1:
                raise LorafleetError(f"--{what.replace('_', '-')} must be >= 1")
        if not self.replicas or min(self.replicas) < 1:
            raise LorafleetError("--replicas must be >= 1")
        if self.prompt_tokens > self.max_batch_tokens:
            raise LorafleetError("--prompt-tokens must fit --max-batch-tokens")
        if not self.rate > 0 or not self.target_p99_s > 0 or not self.zipf_s >= 0:
            raise LorafleetError("--rate and --target-p99-s must be > 0, --zipf-s >= 0")
        if not 0 <= self.warmup < 1:
            raise LorafleetError("--warmup must be in [0, 1)")
        _check_choices("--policy", self.policies, POLICIES)
        _check_choices("--popularity", self.popularity, POPULARITIES)
        self.model_figures()  # a bad --figure fails here, before any run

    def model_figures(self) -> Figures:
        return Figures().with_overrides(self.figures)


def _check_choices(flag: str, given: tuple[str, ...], allowed) -> None:
    bad = [v for v in given if v not in allowed]
    if bad or not given:
        raise LorafleetError(f"{flag} {bad[0] if bad else ''!r}: one of {', '.join(allowed)}")


@dataclass
class RoutingConfig:
    """One `bench ray-routing` run: what every variant of it shares; checked on creation."""

    base: str = "tiny"
    adapters: int = 64
    slots: int = 8  # per replica (Ray's max_num_models_per_replica)
    clients: int = 32  # streaming clients, closed loop
    per_client: int = 8  # requests per client
    prompt_tokens: int = 32
    new_tokens: int = 48
    rank: int = 8
    max_batch: int = 32  # running rows per engine
    popularity: tuple[str, ...] = POPULARITIES
    layouts: tuple[str, ...] = tuple(LAYOUTS)
    routings: tuple[str, ...] = ROUTINGS
    ingress: bool = True  # also `lorafleet serve` on the 1x2 layout (the Ray ingress's cost)
    tolerance: float = 0.05  # the pass rule's "not slower": tokens/s within this share
    cache_dir: str | None = None  # the random adapters (default runs/bench-adapters/...)
    seed: int = 0

    def __post_init__(self):
        self.popularity = tuple(self.popularity)
        self.layouts = tuple(self.layouts)
        self.routings = tuple(self.routings)
        for what in ("adapters", "slots", "clients", "per_client", "prompt_tokens"):
            if getattr(self, what) < 1:
                raise LorafleetError(f"--{what.replace('_', '-')} must be >= 1")
        for what in ("new_tokens", "rank", "max_batch"):
            if getattr(self, what) < 1:
                raise LorafleetError(f"--{what.replace('_', '-')} must be >= 1")
        if not 0 <= self.tolerance < 1:
            raise LorafleetError("--tolerance must be in [0, 1)")
        _check_choices("--popularity", self.popularity, POPULARITIES)
        _check_choices("--layout", self.layouts, LAYOUTS)
        _check_choices("--routing", self.routings, ROUTINGS)

    def settings(self) -> dict:
        """EngineSettings fields of every replica (and of `lorafleet serve`)."""
        return {
            "max_adapters": self.slots,
            "max_rank": self.rank,
            "max_batch_size": self.max_batch,
            "max_batch_tokens": max(2048, self.max_batch * self.prompt_tokens),
            "max_seq_len": self.prompt_tokens + self.new_tokens + 8,
        }
