"""`lorafleet serve`: the engine behind an OpenAI-compatible HTTP API."""

from __future__ import annotations

import os
from pathlib import Path

import typer

from lorafleet.cli.app import app
from lorafleet.cli.options import (
    DEVICE_HELP,
    BaseOpt,
    PortOpt,
    from_field,
    options_from,
    with_options,
)
from lorafleet.serve.api import precision
from lorafleet.serve.api.config import SERVE_DTYPE, EngineSettings, ServerConfig
from lorafleet.serve.placement import Spread

# `lorafleet serve`: the engine's and registry's sizes (EngineSettings) ...
ENGINE_OPTIONS = options_from(
    EngineSettings,
    from_field(
        "quantize",
        help="auto | none | int8 | int4: weight-only base linears (adapters: --dtype); auto = "
        "the quality rule's pick for this CPU and --dtype (int4 with float32, none with "
        "bfloat16, none on a GPU).",
    ),
    from_field("max_adapters", min=1, help="Resident adapter slots."),
    from_field("max_rank", min=1),
    from_field("max_batch_size", min=1),
    from_field("max_batch_tokens", min=1),
    from_field("max_seq_len", min=2),
    from_field("cpu_cache_mb", min=0),
    from_field(
        "schedule",
        help="fair | fcfs: under contention, fair shares tokens evenly between tenants (API "
        "keys; adapters without --auth), a virtual token counter; fcfs serves in arrival order.",
    ),
    from_field(
        "cpu_cache_bytes",
        annotation=str | None,
        help="Byte budget of the CPU adapter tier, e.g. 512MB or 2GB (replaces --cpu-cache-mb); "
        "least recently used adapters leave it, never one a running request uses.",
    ),
    from_field("device", help=DEVICE_HELP),
    from_field(
        "prefix_cache_bytes",
        annotation=str,
        help="Byte budget of the prefix cache, e.g. 256MB or 1GB (0 = off): the KV of prompt "
        "prefixes is kept per adapter (name and content) and reused by later requests that "
        "start with the same tokens under the same adapter; least recently used out.",
    ),
)
# serve's own --dtype default: the precision `bench quality`'s rule picked (config.py).
ServeDtypeOpt = typer.Option(
    SERVE_DTYPE,
    "--dtype",
    help="auto | float32 | bfloat16: base weights, adapters and KV cache; "
    + precision.HELP
    + ". --dtype float32 --quantize none = exact float32.",
)
# ... and the HTTP server's limits (ServerConfig).
SERVER_OPTIONS = options_from(
    ServerConfig,
    from_field(
        "max_waiting", "--max-queue", name="max_queue", min=1, help="Waiting requests before 429."
    ),
    from_field(
        "drain_timeout_s",
        "--drain-timeout",
        "--shutdown-grace",
        name="drain_timeout",
        min=0,
        help="Seconds in-flight requests get after SIGTERM (new ones: 503 + Retry-After); "
        "streams still open then end with an SSE error event.",
    ),
    from_field("max_mixture", min=1, help="Adapters one request may mix (adapters / mix: ids)."),
    from_field("merge_cache_mb", min=0, help="Memory for ties / dare merges (LRU by bytes)."),
    from_field("max_n", min=1, help="Choices one OpenAI request may ask (n)."),
    from_field(
        "max_concurrent_per_key",
        min=1,
        help="Requests in flight per tenant (API key) that sets no max_concurrent in --auth; "
        "past it: 429 + Retry-After.",
    ),
    from_field(
        "tokens_per_minute_per_key",
        min=1,
        help="Prompt + max_tokens per minute per tenant that sets no tokens_per_minute in "
        "--auth; past it: 429 + Retry-After.",
    ),
    from_field(
        "hub_adapters",
        help="Adapters named org/name[@revision] (--adapters, `model`, adapter_id) are fetched "
        "from the Hugging Face hub on first use (config + safetensors only) and cached; "
        "a local adapter of that name wins.",
    ),
)

# `lorafleet serve --ray`: how the replicas spread over the Ray cluster's nodes (Spread).
SPREAD_OPTIONS = options_from(
    Spread,
    from_field(
        "max_replicas_per_node",
        min=1,
        help="With --ray: at most this many replicas on one Ray node (1: one per machine); "
        "default: Ray Serve's best-effort spreading.",
    ),
)


@app.command()
@with_options(engine=ENGINE_OPTIONS, server=SERVER_OPTIONS, spread=SPREAD_OPTIONS)
def serve(
    *,
    base: str = BaseOpt,
    dtype: str = ServeDtypeOpt,
    adapters: str | None = typer.Option(
        None,
        "--adapters",
        help="Directory of adapter directories (each served by its name); or, with "
        "--hub-adapters, a hub adapter org/name[@revision].",
    ),
    host: str = typer.Option("127.0.0.1", "--host", help="Bind address (loopback by default)."),
    port: int = PortOpt,
    auth: Path | None = typer.Option(
        None, "--auth", help="JSON/YAML: admin_keys and tenants (keys, private_adapters)."
    ),
    # These two set ServerConfig's model_name and engine_threads, with defaults of the CLI's
    # own: the --base given, and all CPU cores but one.
    model_name: str | None = typer.Option(
        None, "--model-name", help="The id the base is served under (default: --base)."
    ),
    threads: int | None = typer.Option(
        None,
        "--threads",
        min=1,
        help="torch threads for the forward passes (default: all CPU cores but one, which is "
        "left to HTTP; on 2 cores that serves 32 clients 1.5x faster, see BENCHMARKS.md).",
    ),
    engine: dict,
    server: dict,
    change: Path | None = typer.Option(
        None, "--change", help="A `lorafleet change train` dir: serves POST /v1/images/edits."
    ),
    change_loras: Path | None = typer.Option(
        None,
        "--change-loras",
        help="Folder of LoRAs saved by `change apply --save-lora` "
        "(requests name one as `lora`); needs --change.",
    ),
    ray: bool = typer.Option(
        False,
        "--ray",
        help="Serve from replicas on a Ray cluster (Ray Serve, routed by adapter; needs "
        "lorafleet[ray]); the same HTTP API here. --threads: per replica. MoLEs route by their "
        "name; ties/dare merges and hub adapters are made here once and written to --adapters "
        "(hidden .lorafleet-* folders) for the replicas; class_choices run on a replica; "
        "--change image edits run here, in the ingress.",
    ),
    address: str | None = typer.Option(
        None,
        "--address",
        help="With --ray: the cluster to join (auto: the `ray start` one on this machine; "
        "host:6379); default: start a local one.",
    ),
    replicas: int | None = typer.Option(
        None, "--replicas", min=1, help="With --ray: engine replicas (default 1)."
    ),
    spread: dict,
):
    """Serve the base model and every adapter in --adapters over HTTP.

    OpenAI-compatible (`/v1/models`, `/v1/completions`, `/v1/chat/completions`, streaming),
    LoRAX-style `/generate` and `/generate_stream`, admin routes, `/health`, `/metrics`, and a
    playground page at `/`. `model` names an adapter; the base's name means no adapter;
    `mix:a*0.7+b*0.3` (or an `adapters` list) mixes adapters per request. With `--change DIR`
    (a LoRA of Change model), `POST /v1/images/edits` edits an image the way a before/after
    pair shows (multipart PNGs `before`, `after`, `image`; the edited PNG back), and the
    playground gets an "Edit by example" tab.

    Examples:

        lorafleet serve --base default --adapters runs/adapters

        lorafleet serve --base default --adapters runs/adapters --auth auth.json --port 9000

        lorafleet serve --base default --adapters runs/adapters --dtype bfloat16 --quantize int8

        lorafleet serve --base default --adapters runs/many --max-adapters 32 --cpu-cache-bytes 2GB

        lorafleet serve --base default --hub-adapters --adapters my-org/sst2-lora@v1

        curl localhost:8000/v1/chat/completions -H 'Content-Type: application/json'
        -d '{"model": "sst2", "messages": [{"role": "user", "content": "Hi"}]}'

        curl localhost:8000/v1/completions -H 'Content-Type: application/json'
        -d '{"model": "mix:sst2*0.7+clutrr*0.3", "prompt": "Hi"}'

        curl localhost:8000/v1/completions -H 'Content-Type: application/json'
        -d '{"model": "sst2", "prompt": "Hi", "logprobs": 5, "n": 3, "seed": 1}'

        curl localhost:8000/v1/completions -H 'Content-Type: application/json'
        -d '{"model": "my-mole", "prompt": "Hi", "mask": ["clutrr"]}'

        lorafleet serve --base default --change runs/loc --change-loras runs/loc-loras

        lorafleet serve --ray --replicas 2 --base default --adapters /shared/adapters

        lorafleet serve --ray --address auto --replicas 4 --base default --adapters /shared/adapters

        lorafleet serve --ray --address auto --base default --adapters /shared/adapters
        --hub-adapters --change runs/loc

        curl localhost:8000/v1/images/edits -F before=@A.png -F after=@A2.png -F image=@B.png
        -o B2.png
    """
    from lorafleet.bayes.serving import laplace_classifier
    from lorafleet.change.serving import ChangeCatalog, ChangeEditor
    from lorafleet.cli.ray_serve import check_ray_flags, serve_on_ray
    from lorafleet.compose import merge_adapters
    from lorafleet.compose.mole_serve import MoleCatalog
    from lorafleet.errors import LorafleetError
    from lorafleet.layers import check_quantize, check_quantize_device
    from lorafleet.models import load_base, resolve_device
    from lorafleet.serve.adapter_store import parse_size
    from lorafleet.serve.api import AuthConfig
    from lorafleet.serve.api.server import build_state, serve_forever
    from lorafleet.serve.fair_share import admission_policy
    from lorafleet.serve.hub_source import add_hub_adapter, serve_source

    check_ray_flags(
        ray,
        address,
        replicas,
        spread["max_replicas_per_node"],
        hub_adapters=server["hub_adapters"],
        adapters=adapters,
    )
    if engine["cpu_cache_bytes"] is not None:
        parse_size(engine["cpu_cache_bytes"])  # a bad size: one line before the model loads
    parse_size(engine["prefix_cache_bytes"])
    # A local directory (it wins), or with --hub-adapters a hub id fetched now: one line if not.
    adapters_dir, hub_ref, hub_path = serve_source(adapters, server["hub_adapters"])
    auth_config = AuthConfig.load(auth) if auth is not None else AuthConfig.off()
    if change_loras is not None and change is None:
        raise LorafleetError("--change-loras needs --change DIR (the LoC model they belong to)")
    editor = ChangeEditor(change, change_loras) if change is not None else None
    if engine["quantize"] != precision.AUTO:
        check_quantize(engine["quantize"])
    admission_policy(engine["schedule"])  # a bad --schedule: one line before the model loads
    settings = ENGINE_OPTIONS.build(engine)
    config = SERVER_OPTIONS.build(
        server,
        model_name=model_name or base,
        engine_threads=threads or max(1, (os.cpu_count() or 2) - 1),
    )
    if ray:  # the replicas load the model, each on its own node's device
        return serve_on_ray(
            base=base,
            dtype=dtype,
            adapters_dir=adapters_dir,
            auth=auth_config,
            settings=settings,
            config=config,
            address=address,
            replicas=replicas,
            threads=threads,
            host=host,
            port=port,
            spread=SPREAD_OPTIONS.build(spread),
            features={
                "classifier": laplace_classifier,
                "merge": merge_adapters,
                "moles": MoleCatalog,
                "image_editor": editor,
                "image_editors": ChangeCatalog,
            },
            hub=(hub_ref, hub_path) if hub_ref is not None else None,
        )
    device = resolve_device(settings.device)  # cuda without a GPU: one line, exit 2
    chosen = precision.describe(dtype, settings.quantize, device.type)
    dtype, settings.quantize = precision.resolve(dtype, settings.quantize, device.type)
    check_quantize_device(settings.quantize, device)
    loaded = load_base(base, dtype=dtype, device=device)
    state = build_state(
        loaded,
        adapters_dir,
        auth_config,
        settings,
        config,
        laplace_classifier,
        merge_adapters,
        MoleCatalog,
        editor,
        ChangeCatalog,
    )
    if hub_ref is not None:  # read and validated against the base, as any adapter
        add_hub_adapter(state.registry, hub_ref, hub_path)
    names = state.adapter_names()
    typer.echo(
        f"lorafleet: serving {config.model_name} in {chosen} + {len(names)} adapter(s) "
        f"({', '.join(names[:8])}{', ...' if len(names) > 8 else ''}) on "
        f"http://{host}:{port}  (playground: http://{host}:{port}/)",
        err=True,
    )
    unavailable = state.registry.unavailable()
    if unavailable:  # each was logged with its reason; the server serves the others
        typer.echo(
            f"lorafleet: {len(unavailable)} entr{'y' if len(unavailable) == 1 else 'ies'} of "
            f"--adapters unavailable ({', '.join(e.name for e in unavailable[:8])}): listed "
            "with reasons at /admin/adapters and /metrics",
            err=True,
        )
    if editor is not None:
        typer.echo(
            f"lorafleet: image edits by example with LoC model {editor.name} at "
            f"http://{host}:{port}/v1/images/edits",
            err=True,
        )
    serve_forever(state, host, port)
    return 0
