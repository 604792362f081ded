"""`lorafleet bench quality | precision`: reduced-precision serving's quality and speed."""

from __future__ import annotations

from pathlib import Path

import typer

from lorafleet.cli.bench_cmds import bench_app
from lorafleet.cli.options import BaseDefaultOpt

SettingOpt = typer.Option(
    [],
    "--setting",
    "-s",
    help="bfloat16, int8, int4 or DTYPE+QUANT (e.g. bfloat16+int8); repeatable (default: all). "
    "bench precision also takes SETTING+unfused: the engine without fused q/k/v and gate/up.",
)


@bench_app.command("quality")
def bench_quality(
    base: str = BaseDefaultOpt,
    setting: list[str] = SettingOpt,
    context: int = typer.Option(
        512, "--context", min=4, help="Tokens per chunk; the second half of each is scored."
    ),
    tokens: int = typer.Option(
        50_000, "--tokens", min=1, help="Scored tokens of held-out text, at least."
    ),
    piece_tokens: int = typer.Option(
        20_000,
        "--piece-tokens",
        min=1,
        help="Scored tokens per llama-perplexity piece (its log-prob file: ~100 KB a token).",
    ),
    task_rows: int = typer.Option(
        400, "--task-rows", min=1, help="Validation rows of each choice task (sst2, strategyqa)."
    ),
    prompts: int = typer.Option(
        32, "--prompts", min=0, help="Greedy-agreement prompts (information only; 0: none)."
    ),
    prompt_tokens: int = typer.Option(64, "--prompt-tokens", min=1),
    new_tokens: int = typer.Option(64, "--new-tokens", min=1),
    peers: bool = typer.Option(
        True,
        "--peers/--no-peers",
        help="llama.cpp's rows (Q4_1, Q8_0, BF16 vs its F32), from `make bench-peers`; the "
        "rule needs the Q8_0 row.",
    ),
    only_peers: bool = typer.Option(
        False,
        "--only-peers",
        help="Only llama.cpp's pass (and the rule): lorafleet's rows from the --json file of an "
        "earlier --no-peers run on the same text.",
    ),
    rule_only: bool = typer.Option(
        False,
        "--rule-only",
        help="Run nothing: apply the rule again to the --json file's figures with the current "
        "--speeds (e.g. after a new `bench precision`).",
    ),
    limit: list[str] = typer.Option(
        [],
        "--limit",
        help="SETTING=K: score that setting on the first K pieces only (and that share of the "
        "task rows), compared with llama.cpp on the same pieces; repeatable.",
    ),
    threads: int = typer.Option(
        0, "--threads", min=0, help="Threads for torch and llama-perplexity (0: torch's)."
    ),
    boot: int = typer.Option(1000, "--boot", min=0, help="Bootstrap resamples of chunks."),
    speeds: Path = typer.Option(
        Path("bench/results/precision.json"),
        "--speeds",
        help="`bench precision` JSON whose single-stream and all-base ratios rank the settings.",
    ),
    json_out: Path = typer.Option(Path("bench/results/quality.json"), "--json"),
):
    """Each dtype / quantisation against float32 as llama-perplexity measures quality: mean and
    p99 KL divergence of the next-token distribution, same top-1 and perplexity ratio over
    --tokens held-out tokens (validation rows of the built-in tasks), with bootstrap intervals;
    llama.cpp's Q4_1 / Q8_0 / BF16 on the same text; choice-task accuracy with McNemar's test;
    greedy agreement (information only). Then the pre-written rule picks the default setting.

    Examples:

        OMP_NUM_THREADS=1 lorafleet bench quality --base default --threads 1

        lorafleet bench quality --no-peers --tokens 5000 --task-rows 50 --prompts 4
    """
    from lorafleet.bench.quality import SETTINGS, parse_limits, parse_setting, run

    chosen = tuple(parse_setting(s) for s in setting) or SETTINGS
    run(
        base=base,
        settings=chosen,
        limits=parse_limits(limit),
        only_peers=only_peers,
        rule_only=rule_only,
        context=context,
        tokens=tokens,
        piece_tokens=piece_tokens,
        task_rows=task_rows,
        prompts=prompts,
        prompt_tokens=prompt_tokens,
        new_tokens=new_tokens,
        peers=peers,
        threads=threads or None,
        boot=boot,
        speeds=speeds,
        json_out=json_out,
    )


@bench_app.command("precision")
def bench_precision(
    base: str = BaseDefaultOpt,
    setting: list[str] = SettingOpt,
    requests: int = typer.Option(32, "--requests", min=1),
    adapters: int = typer.Option(16, "--adapters", "-k", min=1, help="Request i: adapter i % k."),
    prompt_tokens: int = typer.Option(100, "--prompt-tokens", min=1),
    new_tokens: int = typer.Option(64, "--new-tokens", min=1, help="Per request (EOS ignored)."),
    rank: int = typer.Option(16, "--rank", "-r", min=1),
    reps: int = typer.Option(2, "--reps", min=1, help="Alternating rounds; best of."),
    json_out: Path = typer.Option(Path("bench/results/precision.json"), "--json"),
):
    """Engine tokens/s in float32, bfloat16, int8 and int4 side by side, in one process
    (alternating rounds): --requests over --adapters adapters, all on the base, single stream.

    Examples:

        lorafleet bench precision --base default

        lorafleet bench precision --requests 8 --adapters 4 --new-tokens 16 --reps 1

        lorafleet bench precision --setting float32+unfused     # fused GEMMs vs not
    """
    from lorafleet.bench.precision import DEFAULT_SETTINGS, run

    run(
        base=base,
        settings=tuple(setting) or DEFAULT_SETTINGS,
        requests=requests,
        adapters=adapters,
        prompt_tokens=prompt_tokens,
        new_tokens=new_tokens,
        rank=rank,
        reps=reps,
        json_out=json_out,
    )
