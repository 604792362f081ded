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
    prompts: int = typer.Option(32, "--prompts", min=1),
    prompt_tokens: int = typer.Option(64, "--prompt-tokens", min=1),
    new_tokens: int = typer.Option(64, "--new-tokens", min=1),
    json_out: Path = typer.Option(Path("bench/results/quality.json"), "--json"),
):
    """Each dtype / quantisation against float32 on the same prompts: max and mean logit
    error and top-1 kept (teacher-forced), greedy agreement (shared prefix over --new-tokens),
    weight bytes, and whether the pass rule holds.

    Examples:

        lorafleet bench quality --base default

        lorafleet bench quality --base default --setting bfloat16+int8 --prompts 8
    """
    from lorafleet.bench.quality import SETTINGS, parse_setting, run

    chosen = tuple(parse_setting(s) for s in setting) or SETTINGS
    run(
        base=base,
        settings=chosen,
        prompts=prompts,
        prompt_tokens=prompt_tokens,
        new_tokens=new_tokens,
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
