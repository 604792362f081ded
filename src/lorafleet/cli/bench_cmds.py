"""`lorafleet bench ...`: benchmarks that print a table and write JSON."""

from __future__ import annotations

from pathlib import Path

import typer

from lorafleet.bench.fleet_config import FleetConfig, RoutingConfig
from lorafleet.bench.peers_config import PeerTableConfig
from lorafleet.bench.prefix_cache import PrefixBenchConfig
from lorafleet.bench.soak_config import SoakConfig
from lorafleet.cli.app import app
from lorafleet.cli.options import (
    BaseDefaultOpt,
    DtypeOpt,
    FieldOption,
    field_default,
    from_field,
    options_from,
    with_options,
)
from lorafleet.models.sources import TINY

bench_app = typer.Typer(
    help="Benchmarks (not tests): each prints a table and writes its figures as JSON.",
    no_args_is_help=True,
)
app.add_typer(bench_app, name="bench")


@bench_app.command("load")
def bench_load(
    models: list[str] = typer.Option(["default"], "--model", "-m", help="Repeat for several."),
    json_out: Path = typer.Option(Path("bench/results/load.json"), "--json"),
):
    """Cold (GGUF de-quantising) vs warm (cached) load time of base models.

    Example:

        lorafleet bench load --model default --model gemma-270m
    """
    from lorafleet.bench.load import run

    run(models, json_out)


@bench_app.command("train")
def bench_train(
    base: str = BaseDefaultOpt,
    data: str = typer.Option("sst2", "--data", "-d"),
    batch_size: int = typer.Option(8, "--batch-size", min=1),
    steps: int = typer.Option(6, "--steps", min=1, help="Timed steps per round (after 2 warmup)."),
    rounds: int = typer.Option(2, "--rounds", min=1, help="Alternating rounds per variant."),
    no_chat: bool = typer.Option(True, "--no-chat/--chat"),
    method: list[str] = typer.Option(
        [],
        "--method",
        help="Time each method's step next to LoRA's (repeatable): lora, rslora, "
        "dora, bone, bat, bilora, bilora-second, bilora-joint.",
    ),
    rank: int = typer.Option(16, "--rank", "-r", min=1, help="With --method: every method's rank."),
    json_out: Path | None = typer.Option(
        None, "--json", help="Default bench/results/train_step[_methods].json."
    ),
):
    """Training step time of lorafleet vs a plain PEFT + transformers loop, and peak memory;
    with --method, lorafleet's step per adapter method next to LoRA's (same rank and batches).

    Examples:

        lorafleet bench train --base default --data sst2 --batch-size 8

        lorafleet bench train --base default --method dora --method bone --method bilora
    """
    import tempfile

    from lorafleet.bench.train_step import run

    name = "train_step_methods.json" if method else "train_step.json"
    json_out = json_out or Path("bench/results") / name
    with tempfile.TemporaryDirectory() as scratch:
        run(
            base,
            data,
            batch_size,
            steps,
            rounds,
            not no_chat,
            json_out,
            scratch,
            methods=method or None,
            rank=rank,
        )


@bench_app.command("rslora")
def bench_rslora(
    base: str = BaseDefaultOpt,
    data: str = typer.Option("gsm8k", "--data", "-d"),
    ranks: list[int] = typer.Option([4, 16, 64, 256], "--rank", "-r", help="Repeatable."),
    alpha: float = typer.Option(16.0, "--alpha"),
    steps: int = typer.Option(30, "--steps", min=1),
    lr: float = typer.Option(5e-4, "--lr"),
    batch_size: int = typer.Option(4, "--batch-size", min=1),
    max_length: int = typer.Option(128, "--max-length", min=8),
    train_limit: int = typer.Option(2000, "--train-limit", min=1),
    eval_limit: int = typer.Option(40, "--eval-limit", min=1),
    no_chat: bool = typer.Option(True, "--no-chat/--chat"),
    out_dir: Path = typer.Option(Path("runs/rslora"), "--out"),
    json_out: Path = typer.Option(Path("bench/results/rslora.json"), "--json"),
):
    """rsLoRA reproduction: ranks x {alpha/r, alpha/sqrt(r)} on the same data and steps.

    Example:

        lorafleet bench rslora --base default --data gsm8k --steps 30
    """
    from lorafleet.bench.rslora import run

    run(
        base,
        data,
        ranks,
        alpha,
        steps,
        lr,
        batch_size,
        max_length,
        train_limit,
        eval_limit,
        not no_chat,
        out_dir,
        json_out,
    )


@bench_app.command("multilora")
def bench_multilora(
    base: str = BaseDefaultOpt,
    rank: int = typer.Option(16, "--rank", "-r", min=1),
    adapters: list[int] = typer.Option([1, 4, 16, 64], "--adapters", "-k", help="Repeatable."),
    layers: int = typer.Option(
        4, "--layers", min=1, help="Decoder layers whose linears are timed."
    ),
    repeats: int = typer.Option(5, "--repeats", min=1),
    threads: int | None = typer.Option(None, "--threads", help="torch threads (default: torch's)."),
    method: list[str] = typer.Option(
        ["dora", "bone", "bat", "mixed"],
        "--method",
        help="Per-method rows next to LoRA's (repeatable): dora, bone, bat, mixed; --no-methods "
        "for LoRA rows only.",
    ),
    no_methods: bool = typer.Option(False, "--no-methods", help="LoRA rows only."),
    json_out: Path = typer.Option(Path("bench/results/multilora.json"), "--json"),
):
    """The batched multi-adapter op vs the base layer and PEFT's mixed batch (decode, prefill),
    and DoRA / Bone / Bat rows (and a batch mixing all four methods) next to LoRA rows.

    Examples:

        lorafleet bench multilora --base default --adapters 1 --adapters 16

        lorafleet bench multilora --base default --adapters 4 --method dora --method bat
    """
    from lorafleet.bench.multilora import run

    run(
        base=base,
        ranks=rank,
        adapters=adapters,
        json_out=json_out,
        repeats=repeats,
        layers=layers,
        threads=threads,
        methods=() if no_methods else tuple(method),
    )


@bench_app.command("families")
def bench_families(
    bases: list[str] = typer.Option(
        list(TINY),
        "--base",
        "-b",
        help="Repeat for several (default: every family's tiny base).",
    ),
    requests: int = typer.Option(32, "--requests", min=1),
    adapters: int = typer.Option(16, "--adapters", "-k", min=1, help="Request i uses i % k."),
    prompt_tokens: int = typer.Option(100, "--prompt-tokens", min=1),
    new_tokens: int = typer.Option(64, "--new-tokens", min=1, help="Per request (EOS ignored)."),
    rank: int = typer.Option(16, "--rank", "-r", min=1),
    quick: bool = typer.Option(False, "--quick", help="8 requests, 4 adapters, 32+16 tokens."),
    json_out: Path = typer.Option(Path("bench/results/families.json"), "--json"),
):
    """The engine on each model family's tiny base, one row per family: tok/s with K adapters,
    on the base alone, mixing two adapters per request, and vs PEFT one request at a time
    (bench engine's engine and sequential_peft variants, each in its own process).

    Examples:

        lorafleet bench families --requests 32 --adapters 16

        lorafleet bench families -b tiny-qwen3 -b tiny-phi3 --quick
    """
    from lorafleet.bench.families import run

    run(bases, requests, adapters, prompt_tokens, new_tokens, rank, json_out, quick)


# The llama.cpp peer tables (`bench engine --peers`, `bench serve --peers`): repetitions and
# threads; their workload is bench engine's own options / PeerTableConfig's defaults.
PEER_OPTIONS = options_from(
    PeerTableConfig,
    from_field(
        "reps",
        "--peer-reps",
        name="peer_reps",
        min=1,
        help="With --peers: interleaved repetitions (median and min over them).",
    ),
    from_field(
        "threads",
        "--peer-threads",
        name="peer_threads",
        min=1,
        help="With --peers: threads of every system (default: engine table every core; HTTP "
        "table serve's own default, all cores but one).",
    ),
)


@bench_app.command("engine")
@with_options(peer=PEER_OPTIONS)
def bench_engine(
    *,
    base: str = BaseDefaultOpt,
    requests: int = typer.Option(32, "--requests", min=1),
    adapters: int = typer.Option(
        16, "--adapters", "-k", min=1, help="Request i uses adapter i % k."
    ),
    prompt_tokens: int = typer.Option(100, "--prompt-tokens", min=1),
    new_tokens: int = typer.Option(
        64, "--new-tokens", min=1, help="Generated per request (EOS ignored)."
    ),
    rank: int = typer.Option(16, "--rank", "-r", min=1),
    quick: bool = typer.Option(False, "--quick", help="8 requests, 4 adapters, 32+16 tokens."),
    json_out: Path = typer.Option(Path("bench/results/engine.json"), "--json"),
    peers: bool = typer.Option(
        False,
        "--peers",
        "--only-peers",
        help="Instead: the engine vs llama-batched-bench at matched precision (needs `make "
        "bench-peers`).",
    ),
    peers_dir: Path | None = typer.Option(None, "--peers-dir", help="Default: build/peers."),
    peers_json: Path = typer.Option(Path("bench/results/peers.json"), "--peers-json"),
    setting: list[str] = typer.Option(
        [],
        "--setting",
        "-s",
        help="With --peers: only the pairs of these lorafleet settings (float32, bfloat16, "
        "bfloat16+int8, or serve's default for the Q4_1 pair); repeatable. Default: every pair. "
        "With --profile: the one setting profiled (float32, bfloat16, bfloat16+int8, "
        "float32+int4, ...; default float32).",
    ),
    slots: int = typer.Option(
        32,
        "--slots",
        min=1,
        help="Resident adapter slots; --adapters above it runs the tiered "
        "registry over adapters written to --adapter-cache (rank --rank on q_proj, v_proj).",
    ),
    popularity: list[str] = typer.Option(
        ["uniform", "zipf"],
        "--popularity",
        help="With --adapters > --slots: uniform or zipf "
        "(1.0) draws of each request's adapter; repeatable.",
    ),
    adapter_cache: Path | None = typer.Option(
        None,
        "--adapter-cache",
        help="Where the tiered run's adapters are written once and "
        "reused (default runs/bench-adapters/BASE-rRANK-qv).",
    ),
    cpu_cache: str = typer.Option(
        "512MB", "--cpu-cache", help="The tiered run's CPU-tier byte budget (e.g. 512MB, 2GB)."
    ),
    profile: bool = typer.Option(
        False,
        "--profile",
        help="Instead: split a prefill and a decode step into attention, "
        "base matmuls, LoRA ops, sampling, other ops and Python; the decode roofline.",
    ),
    peer: dict,
):
    """Engine throughput (many adapters at once) vs PEFT one request at a time, and vs batching
    on the base alone (the engine, transformers' static batch and its generate_batch).

    With --peers, instead the in-process peer table: the engine against llama-batched-bench
    (--requests sequences of --prompt-tokens prefilled together, then --new-tokens each; and
    one alone; flash attention on, one batch for every prompt) at matched precision: float32
    vs F32, bfloat16 vs BF16, bfloat16+int8 vs Q8_0 (GGUFs by llama.cpp's convert_hf_to_gguf.py
    from the same weights) and serve's default setting vs the shipped Q4_1. Interleaved,
    --peer-reps times: generated tok/s (prefill included) median [min-max], prefill and decode
    apart, load average per run, the ratios against the targets, memory, bytes per token.

    Examples:

        lorafleet bench engine --base default --requests 32 --adapters 16

        lorafleet bench engine --peers

        lorafleet bench engine --peers --setting bfloat16 --peer-reps 5

        lorafleet bench engine --adapters 1000 --slots 32 --rank 8 --requests 256 --popularity
        uniform --popularity zipf --cpu-cache 512MB --prompt-tokens 64 --new-tokens 32

        lorafleet bench engine --profile --requests 32 --adapters 16 --new-tokens 16

        lorafleet bench engine --profile --requests 1 --adapters 0 --setting bfloat16+int8
    """
    from lorafleet.bench.engine import run

    if peers:
        _engine_peers(
            PEER_OPTIONS.build(
                peer,
                requests=8 if quick else requests,
                adapters=4 if quick else adapters,
                prompt_tokens=32 if quick else prompt_tokens,
                new_tokens=16 if quick else new_tokens,
                rank=rank,
            ),
            base,
            setting,
            peers_dir,
            peers_json,
        )
        return
    if profile or adapters > slots:
        _engine_variants(
            base,
            requests,
            adapters,
            prompt_tokens,
            new_tokens,
            rank,
            slots,
            popularity,
            adapter_cache,
            cpu_cache,
            profile,
            setting,
        )
        return

    run(
        base=base,
        requests=requests,
        adapters=adapters,
        prompt_tokens=prompt_tokens,
        new_tokens=new_tokens,
        rank=rank,
        json_out=json_out,
        quick=quick,
    )


def _engine_peers(cfg, base, settings, peers_dir, peers_json) -> None:
    """bench engine --peers: the pairs of `settings` (all when empty), checked up front."""
    from lorafleet.bench import peers as peer_bench
    from lorafleet.bench import peers_inproc
    from lorafleet.bench.peer_tools import require
    from lorafleet.errors import LorafleetError

    require(peers_dir, tools=("batched_bench", "convert"))  # before anything loads
    pairs = peer_bench.matched_pairs(peer_bench.serve_default_setting())
    wanted = {peer_bench.setting_name(text) for text in settings}  # a bad one: one line now
    chosen = [p for p in pairs if not wanted or peer_bench.setting_name(p.setting) in wanted]
    if not chosen:
        names = sorted({peer_bench.setting_name(p.setting) for p in pairs})
        raise LorafleetError(f"--setting: no pair for {sorted(wanted)}; pairs: {names}")
    peers_inproc.run(
        cfg,
        peer_bench.serve_default_setting(),
        base,
        peers_dir,
        json_out=peers_json,
        pairs=chosen,
    )


def _engine_variants(
    base,
    requests,
    adapters,
    prompt_tokens,
    new_tokens,
    rank,
    slots,
    popularity,
    adapter_cache,
    cpu_cache,
    profile,
    settings=(),
) -> None:
    """bench engine --profile (in the one --setting given, float32 by default), or the tiered
    run (--adapters above --slots)."""
    from lorafleet.errors import LorafleetError

    if profile:
        from lorafleet.bench.profile import run as run_profile
        from lorafleet.bench.settings import parse_setting

        if len(settings) > 1:
            raise LorafleetError(f"--profile takes one --setting, not {len(settings)}")
        setting = "+".join(parse_setting(settings[0])) if settings else "float32"
        run_profile(
            base=base,
            requests=requests,
            adapters=adapters,
            rank=rank,
            prompt_tokens=prompt_tokens,
            new_tokens=new_tokens,
            setting=setting,
        )
        return
    from lorafleet.bench.thousand import POPULARITIES
    from lorafleet.bench.thousand import run as run_tiered

    bad = sorted(set(popularity) - set(POPULARITIES))
    if bad:
        raise LorafleetError(f"--popularity {bad[0]}: use {' or '.join(POPULARITIES)}")
    run_tiered(
        base=base,
        adapters=adapters,
        slots=slots,
        requests=requests,
        popularity=tuple(dict.fromkeys(popularity)),
        prompt_tokens=prompt_tokens,
        new_tokens=new_tokens,
        rank=rank,
        cache_dir=adapter_cache,
        cpu_cache=cpu_cache,
    )


@bench_app.command("stream")
def bench_stream(
    mb: int = typer.Option(256, "--mb", min=1, help="MiB per array (far above the caches)."),
    reps: int = typer.Option(5, "--reps", min=1, help="Best of."),
    threads: list[int] = typer.Option(
        [], "--threads", min=1, help="Thread counts (repeatable; default 1 and torch's)."
    ),
    json_out: Path = typer.Option(Path("bench/results/stream.json"), "--json"),
):
    """STREAM-like memory bandwidth: copy, scale, add, triad over float32 arrays (GB/s), the
    ceiling a memory-bound decode step is read against (see bench engine --profile).

    Example:

        lorafleet bench stream --mb 256 --threads 1 --threads 2
    """
    from lorafleet.bench.stream import run

    run(mb=mb, reps=reps, threads=tuple(threads), json_out=json_out)


@bench_app.command("serve")
@with_options(peer=PEER_OPTIONS)
def bench_serve(
    *,
    base: str = BaseDefaultOpt,
    clients: list[int] = typer.Option(
        [1, 8, 32, 64], "--clients", "-n", min=1, help="Concurrent streaming clients; repeatable."
    ),
    adapters: int = typer.Option(4, "--adapters", "-k", min=1, help="Client i uses adapter i % k."),
    base_share: bool = typer.Option(False, "--base-share", help="Some clients use the base too."),
    base_only: bool = typer.Option(False, "--base-only", help="Every client uses the base."),
    adapters_dir: Path | None = typer.Option(
        None, "--adapters-dir", help="Serve these adapters (e.g. runs/demo/adapters), not random."
    ),
    prompt_tokens: int = typer.Option(32, "--prompt-tokens", min=1),
    new_tokens: int = typer.Option(48, "--new-tokens", min=1, help="Per request (EOS ignored)."),
    rank: int = typer.Option(16, "--rank", "-r", min=1),
    temperature: float = typer.Option(0.0, "--temperature", min=0.0, help="0 = greedy; seeded."),
    max_batch_size: int = typer.Option(64, "--max-batch-size", min=1),
    reps: int = typer.Option(2, "--reps", min=1, help="Alternating runs per N; the best is kept."),
    threads: int | None = typer.Option(
        None, "--threads", min=1, help="torch threads, both sides (default: serve's, cores - 1)."
    ),
    json_out: Path = typer.Option(Path("bench/results/serve.json"), "--json"),
    peers: bool = typer.Option(
        False,
        "--peers",
        help="Instead: lorafleet serve vs a tuned llama-server behind the same HTTP client "
        "(needs `make bench-peers`).",
    ),
    peers_dir: Path | None = typer.Option(None, "--peers-dir", help="Default: build/peers."),
    peers_json: Path = typer.Option(Path("bench/results/serve-peers.json"), "--peers-json"),
    peer: dict,
):
    """Concurrent streaming HTTP clients vs the engine in-process on the same requests:
    total tokens/s, TTFT and time per output token (p50/p99), /health latency under load.

    With --peers, instead the HTTP peer table: `lorafleet serve` (its default setting) and
    llama-server (the GGUF of the same bytes, the adapters as GGUF LoRA of the same
    precision), both behind the same streaming client; llama-server's flags picked by a short
    pre-run of the candidates (-b 512 -ub 512 -fa on, top-k greedy, --poll 0, -kvu, threads);
    then 32 requests over 16 adapters, all on the base and a single stream (100 prompt + 64
    new tokens; --rank), interleaved --peer-reps times: median [min-max], load per run, the
    ratio against the >= 2x target.

    Examples:

        lorafleet bench serve --base default --clients 1 --clients 32 --adapters 4

        lorafleet bench serve --peers
    """
    from lorafleet.bench.serve import run

    if peers:
        from lorafleet.bench import peers_http
        from lorafleet.bench.peer_tools import require

        require(peers_dir, tools=("server", "convert"))  # before anything loads
        cfg = PEER_OPTIONS.build(peer, rank=rank)
        from lorafleet.bench.peers import serve_default_setting

        peers_http.run(cfg, serve_default_setting(), base, peers_dir, json_out=peers_json)
        return
    run(
        base=base,
        clients=tuple(clients),
        adapters=adapters,
        base_share=base_share,
        base_only=base_only,
        adapters_dir=adapters_dir,
        prompt_tokens=prompt_tokens,
        new_tokens=new_tokens,
        rank=rank,
        temperature=temperature,
        max_batch_size=max_batch_size,
        reps=reps,
        threads=threads,
        json_out=json_out,
    )


@bench_app.command("fairness")
def bench_fairness(
    base: str = BaseDefaultOpt,
    a_requests: int = typer.Option(
        64, "--a-requests", min=1, help="Tenant A's flood: streaming requests sent at once."
    ),
    a_tokens: int = typer.Option(64, "--a-tokens", min=1, help="Tokens per A request."),
    b_requests: int = typer.Option(
        10, "--b-requests", min=1, help="Tenant B's requests, while A's flood lasts (at most)."
    ),
    b_every: float = typer.Option(1.0, "--b-every", min=0.01, help="Seconds between B's."),
    b_tokens: int = typer.Option(32, "--b-tokens", min=1, help="Tokens per B request."),
    idle_requests: int = typer.Option(
        5, "--idle-requests", min=1, help="B's requests on the idle server (its idle TTFT)."
    ),
    reps: int = typer.Option(3, "--reps", min=1, help="Rounds of fcfs then fair; medians."),
    max_batch_size: int = typer.Option(16, "--max-batch-size", min=1, help="Both servers'."),
    threads: int | None = typer.Option(
        None, "--threads", min=1, help="The servers' torch threads (default: serve's)."
    ),
    json_out: Path = typer.Option(Path("bench/results/fairness.json"), "--json"),
):
    """Fair share under a flood: tenant A sends --a-requests streams at once, tenant B one every
    --b-every seconds while the flood lasts; B's TTFT p50/p99 and the total tok/s under
    `serve --schedule fcfs` and `--schedule fair` (both servers up, rounds interleaved, medians),
    beside B's TTFT on the idle server. Pass: fair keeps B's TTFT p50 within 2x idle and the
    total tok/s within 5 % of fcfs.

    Examples:

        lorafleet bench fairness --base default

        lorafleet bench fairness --a-requests 16 --a-tokens 16 --b-requests 3 --reps 1
    """
    from lorafleet.bench.fairness import run

    run(
        base=base,
        a_requests=a_requests,
        a_tokens=a_tokens,
        b_requests=b_requests,
        b_every=b_every,
        b_tokens=b_tokens,
        idle_requests=idle_requests,
        reps=reps,
        max_batch_size=max_batch_size,
        threads=threads,
        json_out=json_out,
    )


@bench_app.command("merged")
def bench_merged(
    base: str = BaseDefaultOpt,
    rank: int = typer.Option(16, "--rank", "-r", min=1),
    batch: int = typer.Option(8, "--batch", min=1, help="Requests in the batch."),
    prompt_tokens: int = typer.Option(128, "--prompt-tokens", min=1),
    new_tokens: int = typer.Option(32, "--new-tokens", min=1, help="Decoded (EOS ignored)."),
    reps: int = typer.Option(3, "--reps", min=1, help="Alternating runs; best of."),
    json_out: Path = typer.Option(Path("bench/results/merged.json"), "--json"),
):
    """One adapter merged into the base (`merge --into-base`) vs attached unmerged through PEFT:
    prefill and decode tokens/s (A Note on LoRA's merged-vs-unmerged trade-off).

    Example:

        lorafleet bench merged --base default --rank 16 --batch 8
    """
    from lorafleet.bench.merged import run

    run(
        base=base,
        rank=rank,
        batch=batch,
        prompt_tokens=prompt_tokens,
        new_tokens=new_tokens,
        reps=reps,
        json_out=json_out,
    )


@bench_app.command("merges")
def bench_merges(
    base: str = BaseDefaultOpt,
    adapters_dir: Path = typer.Option(
        Path("runs/demo/adapters"), "--adapters-dir", help="sst2/, strategyqa/, clutrr/ adapters."
    ),
    density: float = typer.Option(0.5, "--density", help="ties / dare_ties density."),
    seed: int = typer.Option(0, "--seed", help="DARE's drop seed."),
    quick: bool = typer.Option(False, "--quick", help="The demo's --quick eval sizes."),
    json_out: Path = typer.Option(Path("bench/results/merges.json"), "--json"),
):
    """Each demo task adapter alone vs the linear, TIES and DARE-TIES merges of all three,
    scored on every task (table, JSON and chart): the baseline MoLE must beat.

    Example:

        lorafleet bench merges --base default --adapters-dir runs/demo/adapters
    """
    from lorafleet.bench.merges import run

    run(
        base=base,
        adapters_dir=adapters_dir,
        density=density,
        seed=seed,
        quick=quick,
        json_out=json_out,
    )


@bench_app.command("grammar")
def bench_grammar(
    engine: list[str] = typer.Option(
        ["xgrammar", "llguidance", "outlines-core"],
        "--engine",
        "-e",
        help="Grammar engines to time (repeatable); one not installed is reported as missing.",
    ),
    rounds: int = typer.Option(5, "--rounds", min=1, help="Passes over every document."),
    json_out: Path = typer.Option(Path("bench/results/grammar_engines.json"), "--json"),
):
    """Grammar engines on the `default` model's tokenizer: tokenizer setup, compile time per
    JSON schema, and the per-step cost of the next-token mask while a valid document is decoded
    (medians; engines interleaved). What picked lorafleet's structured-output engine.

    Example:

        lorafleet bench grammar --rounds 5
    """
    from lorafleet.bench.grammar_engines import run

    run(engine, rounds, json_out)


@bench_app.command("structured")
def bench_structured(
    base: str = BaseDefaultOpt,
    requests: int = typer.Option(32, "--requests", min=2),
    adapters: int = typer.Option(4, "--adapters", "-k", min=0, help="Row i uses adapter i % k."),
    prompt_tokens: int = typer.Option(64, "--prompt-tokens", min=1),
    new_tokens: int = typer.Option(64, "--new-tokens", min=1, help="Generated per row."),
    reps: int = typer.Option(5, "--reps", min=1, help="Interleaved runs of each; medians."),
    threads: int | None = typer.Option(None, "--threads", help="torch threads (default: torch's)."),
    json_out: Path = typer.Option(Path("bench/results/structured.json"), "--json"),
):
    """Structured output's cost in the batch: `requests` rows unconstrained vs the same rows with
    every other one constrained to a JSON schema (same prompts, adapters and lengths), decode
    throughput, interleaved, medians. Target: at most 15 % below the unconstrained run.

    Example:

        lorafleet bench structured --base default --requests 32 --reps 5
    """
    from lorafleet.bench.grammar_throughput import run

    run(base, requests, adapters, prompt_tokens, new_tokens, reps, threads, json_out)


SOAK_OPTIONS = options_from(
    SoakConfig,
    from_field("minutes", min=0.01, help="How long the load runs."),
    from_field("window_s", min=1, help="Report window (seconds): counts, p99, RSS per window."),
    from_field(
        "base",
        "--base",
        "-b",
        help="tiny (a tiny random Llama, SmolLM2's tokenizer) or any base `serve` takes.",
    ),
    from_field("url", help="Soak a running server instead (no uploads then)."),
    from_field("api_key", help="With --url: the key requests send."),
    from_field("admin_key", help="With --url: the key /metrics takes when auth is on."),
    from_field("adapters", min=2, help="Random adapters served."),
    from_field("slots", min=1, help="Adapter slots of the server (fewer: evictions)."),
    from_field("rank", min=1),
    from_field("concurrency", min=1, help="Client workers, each one request after another."),
    from_field("max_tokens", min=1, help="Tokens a request asks for, at most."),
    from_field("threads", min=1, help="The started server's torch threads."),
    from_field("sample_s", min=0.1, help="Seconds between /metrics samples."),
    from_field("max_rss_growth", min=0, help="Pass: RSS growth after the first window below this."),
    from_field("idle_timeout_s", min=0, help="Pass: the server idle again within this (seconds)."),
    from_field("seed"),
)


@bench_app.command("soak")
@with_options(soak=SOAK_OPTIONS)
def bench_soak(
    *,
    soak: dict,
    json_out: Path | None = typer.Option(
        Path("bench/results/soak.json"), "--json", help="Where the figures go."
    ),
):
    """A mixed load against a server for --minutes, then a pass rule (exit 1 when it fails).

    Streamed and plain completions and chats, streams the client drops mid-way, two-adapter
    mixtures, admin uploads (each asked once, then deleted), bad requests (each must get a
    4xx), over more adapters than --slots (evictions all along). Reports per --window-s: requests
    by class (2xx, 4xx, 5xx, client errors, cancels), p50 / p99 latency, p99 TTFT, the server's
    RSS. Passes with no 5xx, no client error, no unexpected status, RSS at the end of the last
    window within --max-rss-growth of the RSS after the first (warm-up) window, and the server
    idle again after the load (no request, KV slot, pinned adapter slot or load left), and,
    for a server it started, exit code 0 on SIGTERM.

    Examples:

        lorafleet bench soak --minutes 30 --base tiny --slots 2 --adapters 6

        lorafleet bench soak --minutes 2 --window-s 30 --concurrency 3 --json /tmp/soak.json

        lorafleet bench soak --url http://127.0.0.1:8000 --minutes 10 --window-s 60
    """
    from lorafleet.bench.soak import run

    if not run(SOAK_OPTIONS.build(soak), json_out)["passed"]:
        raise typer.Exit(1)


def _listed(field: str, flag: str, kind: type, **typer_kw) -> FieldOption:
    """A repeatable option for a config's tuple field (`flag` once per value)."""
    return from_field(
        field, flag, name=field, annotation=list[kind], to_cli=list, to_config=tuple, **typer_kw
    )


FLEET_OPTIONS = options_from(
    FleetConfig,
    from_field("adapters", min=1, help="Adapters the requests are drawn over."),
    _listed("replicas", "--replicas", int, min=1, help="Replicas; repeat for several fleets."),
    from_field("slots", min=1, help="Adapter slots per replica (max_num_models_per_replica)."),
    from_field("max_batch", min=1, help="Running rows per replica's engine."),
    from_field("max_batch_tokens", min=1, help="Prompt tokens prefilled per step, at most."),
    from_field("max_ongoing", min=1, help="Ray's max_ongoing_requests per replica."),
    from_field("rate", min=0.001, help="Requests per second (Poisson arrivals)."),
    _listed("popularity", "--popularity", str, help="zipf | uniform; repeatable."),
    from_field("zipf_s", min=0, help="Zipf exponent: adapter k drawn with weight 1/k^s."),
    _listed("policies", "--policy", str, help="affinity | round-robin | pow2; repeatable."),
    from_field("prompt_tokens", min=1),
    from_field("new_tokens", min=1),
    from_field("requests", min=1, help="Requests simulated per run."),
    from_field("warmup", min=0, max=0.99, help="Share of the first requests left out."),
    from_field("target_p99_s", help="TTFT p99 target for the replicas-needed search."),
    from_field("find_replicas", "--find-replicas/--no-find-replicas"),
    from_field("max_replicas", min=1, help="The replicas-needed search stops here."),
    _listed("figures", "--figure", str, help="NAME=VALUE: replace a model figure; repeatable."),
    from_field("seed"),
)


@bench_app.command("fleet-sim")
@with_options(fleet=FLEET_OPTIONS)
def bench_fleet_sim(
    *,
    fleet: dict,
    json_out: Path | None = typer.Option(
        Path("bench/results/fleet_sim.json"), "--json", help="Where the figures go."
    ),
):
    """Simulate routing N adapters over R replicas (K slots each) on Ray Serve: affinity
    (Ray's multiplexed routing), round-robin and power-of-two without affinity, Poisson
    arrivals, Zipf or uniform adapters. Per run: TTFT p50/p99, tokens/s, adapter loads per
    1,000 requests, and the load on the shared adapter store, the ingress processes and the
    Ray controller; then the replicas each policy needs for --target-p99-s. The replicas' figures
    are measured ones (BENCHMARKS.md), the rest documented or assumed; the output lists each
    with its kind (replace any with --figure NAME=VALUE). See docs/scaling.md.

    Examples:

        lorafleet bench fleet-sim --adapters 10000 --replicas 100 --rate 120

        lorafleet bench fleet-sim --replicas 50 --replicas 100 --no-find-replicas \\
            --figure store_bandwidth_Bps=1.25e8 --figure adapter_bytes=8e7
    """
    from lorafleet.bench.fleet_sim import run

    run(FLEET_OPTIONS.build(fleet), json_out)


ROUTING_OPTIONS = options_from(
    RoutingConfig,
    from_field(
        "base", "--base", "-b", help="tiny (a tiny random Llama) or any base `serve` takes."
    ),
    from_field("adapters", min=1, help="Random rank --rank q/v adapters the requests use."),
    from_field("slots", min=1, help="Adapter slots per replica (max_num_models_per_replica)."),
    from_field(
        "clients", min=1, help="Streaming clients, each sending its next request when done."
    ),
    from_field("per_client", min=1, help="Requests per client."),
    from_field("prompt_tokens", min=1),
    from_field("new_tokens", min=1, help="Per request (EOS ignored)."),
    from_field("rank", min=1),
    from_field("max_batch", min=1, help="Running rows per engine."),
    _listed("popularity", "--popularity", str, help="zipf | uniform; repeatable."),
    _listed("layouts", "--layout", str, help="2x1 (replicas x threads) | 1x2; repeatable."),
    _listed("routings", "--routing", str, help="affinity | round_robin; repeatable."),
    from_field("ingress", "--ingress/--no-ingress", help="Also `lorafleet serve` on 1x2."),
    from_field("tolerance", min=0, max=0.99, help="Pass: affinity tokens/s within this share."),
    from_field("cache_dir", help="Where the random adapters are written once and reused."),
    from_field("seed"),
)


@bench_app.command("ray-routing")
@with_options(routing=ROUTING_OPTIONS)
def bench_ray_routing(
    *,
    routing: dict,
    json_out: Path = typer.Option(Path("bench/results/ray_routing.json"), "--json"),
):
    """Ray Serve's routing by adapter (affinity) against adapter-blind routing (round_robin:
    Ray's power of two choices) over the same replicas, on 2 replicas x 1 thread and 1
    replica x 2 threads, Zipf and uniform adapter draws, closed-loop streaming clients; and
    the Ray ingress against `lorafleet serve` for one replica. Each run starts a fresh fleet
    (a local Ray cluster) in its own process. Per run: tokens/s, TTFT p50/p99, adapter loads
    per 1,000 requests. Pass rule (printed first; exit 1 when it fails): on 2x1, affinity
    loads fewer adapters and its tokens/s is within --tolerance of round_robin's or better.
    Needs lorafleet[ray].

    Examples:

        lorafleet bench ray-routing --base tiny

        lorafleet bench ray-routing --base default --per-client 4

        lorafleet bench ray-routing --per-client 1 --popularity zipf --layout 2x1 --no-ingress
    """
    from lorafleet.bench.ray_routing import run

    if not run(ROUTING_OPTIONS.build(routing), json_out)["passed"]:
        raise typer.Exit(1)


PREFIX_OPTIONS = options_from(
    PrefixBenchConfig,
    from_field(
        "base", "--base", "-b", help="default (SmolLM2-135M), tiny, or any base serve takes."
    ),
    from_field("clients", min=1, help="Closed-loop clients, client i on adapter i % --adapters."),
    from_field("adapters", min=1, help="Random LoRA adapters (rank --rank)."),
    from_field("system_tokens", min=1, help="The shared system prompt's tokens."),
    from_field("user_tokens", min=1, help="Each request's own tokens after it."),
    from_field("new_tokens", min=1, help="Generated per request (greedy, EOS ignored)."),
    from_field("rounds", min=1, help="Requests per client, one after another."),
    from_field("reps", min=1, help="Repetitions (settings interleaved); medians reported."),
    from_field("rank", min=1),
    from_field("max_batch_tokens", min=1, help="Prompt tokens prefilled per step, at most."),
    from_field("prefix_cache_bytes", min=1, help="The cache's budget when on (bytes)."),
    from_field(
        "threads", min=1, help="torch threads of the engine thread (default: serve's, cores - 1)."
    ),
    from_field("workload", help="shared | distinct | both."),
)


@bench_app.command("prefix-cache")
@with_options(prefix=PREFIX_OPTIONS)
def bench_prefix_cache(
    *,
    prefix: dict,
    dtype: str = DtypeOpt,
    quick: bool = typer.Option(
        False,
        "--quick",
        help="A smoke run: 4 clients, 2 adapters, 2 rounds, 1 repetition, short prompts.",
    ),
    json_out: Path = typer.Option(Path("bench/results/prefix_cache.json"), "--json"),
):
    """Adapter-aware prefix caching on vs off, in-process (one engine per setting, started as a
    server's): --clients closed-loop clients over --adapters adapters, each sending --rounds
    requests; workload "shared" (one --system-tokens system prompt + --user-tokens each) and
    "distinct" (same lengths, nothing shared). Per run: TTFT p50 and generated tokens/s; each
    repetition starts with an empty cache, settings alternate (ABBA), load average per run;
    medians and mins over --reps. Pass rule (issue 33, printed with the table): shared TTFT
    p50 >= 4x lower with the cache; distinct tokens/s with the cache >= 0.95x without.

    Examples:

        lorafleet bench prefix-cache

        lorafleet bench prefix-cache --quick --base tiny

        lorafleet bench prefix-cache --workload shared --clients 16 --rounds 2 --dtype bfloat16
    """
    from lorafleet.bench.prefix_cache import run
    from lorafleet.serve.api import precision
    from lorafleet.serve.api.config import EngineSettings

    # serve's quantisation for this --dtype (its `auto`: the rule's pick for the dtype)
    _, quantize = precision.resolve(dtype, field_default(EngineSettings, "quantize"))
    more = {"dtype": dtype, "quantize": quantize}
    if quick:
        more |= {"clients": 4, "adapters": 2, "rounds": 2, "reps": 1, "new_tokens": 4}
        more |= {"system_tokens": 48, "user_tokens": 8}
    run(PREFIX_OPTIONS.build(prefix, **more), json_out)
