"""`lorafleet serve`'s default precision `auto`: the picks are what the quality rule picks from
the committed figures, per kind of CPU, and serve resolves them where the model loads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lorafleet import cpu
from lorafleet.bench import quality
from lorafleet.serve.api import precision
from lorafleet.serve.api.config import SERVE_DTYPE, SERVE_QUANTIZE, EngineSettings

RESULTS = Path(__file__).parents[3] / "bench" / "results"
BF16_FLAGS = "fpu sse2 avx2 avx512f avx512bw avx512_bf16"
AVX2_FLAGS = "fpu sse2 avx2 fma"


@pytest.mark.parametrize("kind", list(precision.PICKS))
def test_each_pick_is_the_rules_verdict_on_the_committed_figures(kind):
    """DEFAULT_RULE on bench/results/quality.json (KL, accuracy, llama.cpp Q8_0) with that kind
    of CPU's `bench precision` speeds picks PICKS[kind], over all settings and per dtype."""
    figures = json.loads((RESULTS / "quality.json").read_text())
    speed = quality.read_speeds(RESULTS / precision.SPEEDS[kind])
    assert "bfloat16+none" in speed and "float32+int4" in speed
    settings = [row["setting"] for row in figures["rows"]]
    for among, (dtype, quantize) in precision.PICKS[kind].items():
        allowed = (
            None if among == precision.AUTO else [s for s in settings if s.split("+")[0] == among]
        )
        verdict = quality.rule_verdict(figures, speed, allowed)
        assert verdict["default"] == f"{dtype}+{quantize}", (kind, among, verdict["reasons"])


def test_the_kinds_differ_where_the_rule_does():
    """The point of a per-CPU default: the two kinds' speeds make the rule pick differently."""
    picks = {kind: picks[precision.AUTO] for kind, picks in precision.PICKS.items()}
    assert picks[precision.NATIVE_BFLOAT16] == ("bfloat16", "none")
    assert picks[precision.NO_NATIVE_BFLOAT16] == ("float32", "int4")


def test_serve_defaults_to_auto():
    assert SERVE_DTYPE == SERVE_QUANTIZE == EngineSettings().quantize == precision.AUTO


@pytest.mark.parametrize(
    "flags, dtype, quantize, device, expected",
    [
        (BF16_FLAGS, "auto", "auto", "cpu", ("bfloat16", "none")),
        (AVX2_FLAGS, "auto", "auto", "cpu", ("float32", "int4")),
        ("fpu avx2 amx_bf16 amx_tile", "auto", "auto", "cpu", ("bfloat16", "none")),
        (BF16_FLAGS, "float32", "auto", "cpu", ("float32", "int4")),  # that dtype's pick
        (AVX2_FLAGS, "bfloat16", "auto", "cpu", ("bfloat16", "none")),
        (BF16_FLAGS, "auto", "int8", "cpu", ("bfloat16", "int8")),  # given: kept
        (AVX2_FLAGS, "float32", "none", "cpu", ("float32", "none")),
        (BF16_FLAGS, "auto", "auto", "cuda", ("float32", "none")),  # GPU: exact float32
        (BF16_FLAGS, "bfloat16", "auto", "cuda", ("bfloat16", "none")),
        (AVX2_FLAGS, "float16", "auto", "cpu", ("float16", "none")),  # load_base names it
    ],
)
def test_resolve(flags, dtype, quantize, device, expected):
    assert precision.resolve(dtype, quantize, device, flags=flags) == expected


def test_native_bfloat16_reads_the_flags_as_words():
    assert cpu.native_bfloat16("avx512_bf16")
    assert not cpu.native_bfloat16("avx512_bf16x avx512f")
    assert not cpu.native_bfloat16("")


@pytest.mark.parametrize(
    "native, dtype, quantised", [(True, "torch.bfloat16", False), (False, "torch.float32", True)]
)
def test_serve_with_no_flags_runs_the_pick_for_its_cpu(
    run_cli, tiny_base_dir, monkeypatch, native, dtype, quantised
):
    import lorafleet.serve.api.server as server_module

    started = []
    monkeypatch.setattr(server_module, "serve_forever", lambda state, *a: started.append(state))
    # Not cpu_flags: the kernels' build key reads it, and a new key would rebuild them.
    monkeypatch.setattr(cpu, "native_bfloat16", lambda flags=None: native)
    code, _, err = run_cli("serve", "--base", tiny_base_dir, "--device", "cpu")
    assert code == 0, err
    engine = started[0].backend
    assert str(engine.runner.dtype) == dtype
    assert (engine.quantization["quantized"] > 0) == quantised
    name = "bfloat16" if not quantised else "float32 + int4"
    assert f"in {name} (auto: the quality rule's pick on a " in err


def test_serve_refuses_a_bad_quantize_in_one_line(run_cli, tiny_base_dir):
    code, _, err = run_cli("serve", "--base", tiny_base_dir, "--quantize", "int3")
    assert code == 2 and "int3" in err and "Traceback" not in err
