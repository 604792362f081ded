"""`lorafleet bench quality | precision`: reduced-precision serving's quality and speed."""

from __future__ import annotations

from pathlib import Path

import typer

from lorafleet.bench.quality_config import QualityConfig
from lorafleet.cli.bench_cmds import bench_app
from lorafleet.cli.options import BaseDefaultOpt, BaseField, from_field, options_from, with_options

SettingOpt = typer.Option(
    [],
    "--setting",
    "-s",
    help="bfloat16, int8, int4 or DTYPE+QUANT (e.g. bfloat16+int8); repeatable (default: all). "
    "bench precision also takes SETTING+unfused: the engine without fused q/k/v and gate/up.",
)


QUALITY_OPTIONS = options_from(
    QualityConfig,
    BaseField,
    from_field(
        "settings",
        "--setting",
        "-s",
        annotation=list[str],
        to_cli=list,
        to_config=tuple,
        help="bfloat16, int8, int4 or DTYPE+QUANT (e.g. bfloat16+int8): the settings this call "
        "scores; repeatable (default: all). The figures cover every checkpointed setting.",
    ),
    from_field("context", min=4, help="Tokens per chunk; the second half of each is scored."),
    from_field("tokens", min=1, help="Scored tokens of held-out text, at least."),
    from_field(
        "piece_tokens",
        min=1,
        help="Scored tokens per piece (the unit of checkpoints and of llama-perplexity's "
        "log-prob file: ~100 KB a token).",
    ),
    from_field(
        "pieces",
        help="A:B: score only pieces A..B-1 (from 0; 'A' alone: that piece) in this call, e.g. "
        "one call per piece; every checkpointed piece is combined into the figures.",
    ),
    from_field("task_rows", min=1, help="Validation rows of each choice task (sst2, strategyqa)."),
    from_field(
        "tasks",
        "--tasks/--no-tasks",
        help="Run task accuracy and greedy agreement for settings not yet checkpointed (off: "
        "only the KL pass, e.g. in a one-piece call).",
    ),
    from_field("prompts", min=0, help="Greedy-agreement prompts (information only; 0: none)."),
    from_field("prompt_tokens", min=1),
    from_field("new_tokens", min=1),
    from_field(
        "limits",
        "--limit",
        name="limit",
        annotation=list[str],
        to_cli=list,
        to_config=tuple,
        help="SETTING=K: score that setting on pieces 0..K-1 only (and that share of the task "
        "rows), compared with llama.cpp on the same pieces; repeatable.",
    ),
    from_field("threads", min=0, help="Threads for torch and llama-perplexity (0: torch's)."),
    from_field("boot", min=0, help="Bootstrap resamples of chunks."),
    from_field(
        "checkpoints",
        help="Checkpoint folder (default: beside --json, <its stem>_pieces); one subfolder per "
        "text spec (base, context, tokens, piece tokens).",
    ),
    from_field(
        "import_summary",
        help="An earlier `bench quality` JSON without checkpoints whose pieces are this text's "
        "first pieces: its summaries stand in for them (combined by a normal approximation).",
    ),
)


@bench_app.command("quality")
@with_options(quality=QUALITY_OPTIONS)
def bench_quality(
    *,
    quality: dict,
    peers: bool = typer.Option(
        True,
        "--peers/--no-peers",
        help="llama.cpp's rows (Q4_1, Q8_0, BF16 vs its F32), from `make bench-peers`; the "
        "rule needs the Q8_0 row.",
    ),
    only_peers: bool = typer.Option(
        False, "--only-peers", help="Only llama.cpp's pass on the pieces (and the rule)."
    ),
    rule_only: bool = typer.Option(
        False,
        "--rule-only",
        help="Run nothing: apply the rule again to the --json file's figures with the current "
        "--speeds (e.g. after a new `bench precision`).",
    ),
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
    Each piece of text is checkpointed when scored and skipped when asked again, so a long run
    can be one call per piece (--pieces) and resumed.

    Examples:

        OMP_NUM_THREADS=1 lorafleet bench quality --base default --threads 1

        lorafleet bench quality --threads 1 --pieces 3 --no-tasks --no-peers   # one piece

        lorafleet bench quality --no-peers --tokens 5000 --task-rows 50 --prompts 4
    """
    from lorafleet.bench.quality import run

    run(
        QUALITY_OPTIONS.build(quality),
        peers=peers,
        only_peers=only_peers,
        rule_only=rule_only,
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
