"""`lorafleet serve`: the engine behind an OpenAI-compatible HTTP API."""

from __future__ import annotations

import os
from pathlib import Path

import typer

from lorafleet.cli.app import app
from lorafleet.cli.options import BaseOpt, DtypeOpt, PortOpt, QuantizeOpt


@app.command()
def serve(
    base: str = BaseOpt,
    dtype: str = DtypeOpt,
    quantize: str = QuantizeOpt,
    adapters: Path | None = typer.Option(
        None, "--adapters", help="Directory of adapter directories (each served by its name)."
    ),
    host: str = typer.Option("127.0.0.1", "--host", help="Bind address (loopback by default)."),
    port: int = PortOpt,
    auth: Path | None = typer.Option(
        None, "--auth", help="JSON/YAML: admin_keys and tenants (keys, private_adapters)."
    ),
    model_name: str | None = typer.Option(
        None, "--model-name", help="The id the base is served under (default: --base)."
    ),
    max_adapters: int = typer.Option(8, "--max-adapters", min=1, help="Resident adapter slots."),
    max_rank: int = typer.Option(32, "--max-rank", min=1),
    max_batch_size: int = typer.Option(16, "--max-batch-size", min=1),
    max_batch_tokens: int = typer.Option(2048, "--max-batch-tokens", min=1),
    max_seq_len: int = typer.Option(1024, "--max-seq-len", min=2),
    cpu_cache_mb: float = typer.Option(512.0, "--cpu-cache-mb", min=0),
    cpu_cache_bytes: str | None = typer.Option(
        None,
        "--cpu-cache-bytes",
        help="Byte budget of the CPU adapter tier, e.g. 512MB or 2GB (replaces --cpu-cache-mb); "
        "least recently used adapters leave it, never one a running request uses.",
    ),
    max_queue: int = typer.Option(256, "--max-queue", min=1, help="Waiting requests before 429."),
    shutdown_grace: float = typer.Option(10.0, "--shutdown-grace", min=0),
    max_mixture: int = typer.Option(
        8, "--max-mixture", min=1, help="Adapters one request may mix (adapters / mix: ids)."
    ),
    merge_cache_mb: float = typer.Option(
        256.0, "--merge-cache-mb", min=0, help="Memory for ties / dare merges (LRU by bytes)."
    ),
    max_n: int = typer.Option(8, "--max-n", min=1, help="Choices one OpenAI request may ask (n)."),
    threads: int | None = typer.Option(
        None,
        "--threads",
        min=1,
        help="torch threads for the forward passes (default: all CPU cores but one, which is "
        "left to HTTP; on 2 cores that serves 32 clients 1.5x faster, see BENCHMARKS.md).",
    ),
    change: Path | None = typer.Option(
        None, "--change", help="A `lorafleet change train` dir: serves POST /v1/images/edits."
    ),
    change_loras: Path | None = typer.Option(
        None,
        "--change-loras",
        help="Folder of LoRAs saved by `change apply --save-lora` "
        "(requests name one as `lora`); needs --change.",
    ),
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

        curl localhost:8000/v1/chat/completions -H 'Content-Type: application/json'
        -d '{"model": "sst2", "messages": [{"role": "user", "content": "Hi"}]}'

        curl localhost:8000/v1/completions -H 'Content-Type: application/json'
        -d '{"model": "mix:sst2*0.7+clutrr*0.3", "prompt": "Hi"}'

        curl localhost:8000/v1/completions -H 'Content-Type: application/json'
        -d '{"model": "sst2", "prompt": "Hi", "logprobs": 5, "n": 3, "seed": 1}'

        curl localhost:8000/v1/completions -H 'Content-Type: application/json'
        -d '{"model": "my-mole", "prompt": "Hi", "mask": ["clutrr"]}'

        lorafleet serve --base default --change runs/loc --change-loras runs/loc-loras

        curl localhost:8000/v1/images/edits -F before=@A.png -F after=@A2.png -F image=@B.png
        -o B2.png
    """
    from lorafleet.bayes.serving import laplace_classifier
    from lorafleet.change.serving import ChangeEditor
    from lorafleet.compose import merge_adapters
    from lorafleet.compose.mole_serve import MoleCatalog
    from lorafleet.errors import LorafleetError
    from lorafleet.layers import check_quantize
    from lorafleet.models import load_base
    from lorafleet.serve.adapter_store import parse_size
    from lorafleet.serve.api import AuthConfig, ServerConfig
    from lorafleet.serve.api.server import EngineSettings, build_state, serve_forever

    if cpu_cache_bytes is not None:
        parse_size(cpu_cache_bytes)  # a bad size is a one-line error before the model loads
    if adapters is not None and not adapters.is_dir():
        raise LorafleetError(f"--adapters {adapters}: no such directory")
    auth_config = AuthConfig.load(auth) if auth is not None else AuthConfig.off()
    if change_loras is not None and change is None:
        raise LorafleetError("--change-loras needs --change DIR (the LoC model they belong to)")
    editor = ChangeEditor(change, change_loras) if change is not None else None
    check_quantize(quantize)
    loaded = load_base(base, dtype=dtype)
    settings = EngineSettings(
        max_adapters=max_adapters,
        max_rank=max_rank,
        max_batch_size=max_batch_size,
        max_batch_tokens=max_batch_tokens,
        max_seq_len=max_seq_len,
        cpu_cache_mb=cpu_cache_mb,
        cpu_cache_bytes=cpu_cache_bytes,
        quantize=quantize,
    )
    config = ServerConfig(
        model_name=model_name or base,
        max_waiting=max_queue,
        shutdown_grace_s=shutdown_grace,
        max_mixture=max_mixture,
        merge_cache_mb=merge_cache_mb,
        max_n=max_n,
        engine_threads=threads or max(1, (os.cpu_count() or 2) - 1),
    )
    state = build_state(
        loaded,
        adapters,
        auth_config,
        settings,
        config,
        laplace_classifier,
        merge_adapters,
        MoleCatalog,
        editor,
    )
    names = state.adapter_names()
    typer.echo(
        f"lorafleet: serving {config.model_name} + {len(names)} adapter(s) "
        f"({', '.join(names[:8])}{', ...' if len(names) > 8 else ''}) on "
        f"http://{host}:{port}  (playground: http://{host}:{port}/)",
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
