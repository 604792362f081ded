"""`lorafleet bench prefix-cache`: its pass rule (pure), its config checks and the command."""

from __future__ import annotations

import json

import pytest

from lorafleet.bench.prefix_cache import PrefixBenchConfig, summarize
from lorafleet.errors import LorafleetError


def runs(shared_on: float, shared_off: float, distinct_on: float, distinct_off: float) -> list:
    out = []
    for rep in range(3):
        noise = 1 + 0.01 * rep
        for workload, setting, ttft, tok in (
            ("shared", "cache_on", shared_on * noise, 100.0),
            ("shared", "cache_off", shared_off * noise, 50.0),
            ("distinct", "cache_on", 1.0, distinct_on * noise),
            ("distinct", "cache_off", 1.0, distinct_off * noise),
        ):
            out.append(
                {
                    "rep": rep,
                    "workload": workload,
                    "setting": setting,
                    "ttft_p50_s": ttft,
                    "tok_s": tok,
                    "load_1m": 1.0,
                }
            )
    return out


def test_the_pass_rule_reads_medians_over_repetitions():
    met = summarize(runs(0.5, 2.5, 96.0, 100.0))
    assert met["shared_ttft_ratio"] == pytest.approx(5.0) and met["shared_ttft_met"]
    assert met["distinct_tok_s_ratio"] == pytest.approx(0.96) and met["distinct_tok_s_met"]
    assert met["rows"]["shared/cache_on"]["ttft_p50_min_s"] == pytest.approx(0.5)
    missed = summarize(runs(1.0, 3.0, 90.0, 100.0))
    assert not missed["shared_ttft_met"] and not missed["distinct_tok_s_met"]
    only_shared = summarize([r for r in runs(1, 5, 1, 1) if r["workload"] == "shared"])
    assert "distinct_tok_s_ratio" not in only_shared and only_shared["shared_ttft_met"]


def test_bad_sizes_are_refused_in_one_line():
    with pytest.raises(LorafleetError, match="workload"):
        PrefixBenchConfig(workload="all")
    with pytest.raises(LorafleetError, match="clients"):
        PrefixBenchConfig(clients=0)
    with pytest.raises(LorafleetError, match="max_batch_tokens"):
        PrefixBenchConfig(system_tokens=3000)


@pytest.mark.parametrize("dtype, quantize", [("bfloat16", "none"), ("float32", "int4")])
def test_the_command_runs_with_serves_quantisation_for_its_dtype(
    run_cli, tmp_path, dtype, quantize
):
    """serve's `auto` quantisation resolved for --dtype (the rule's pick for that dtype)."""
    out = tmp_path / "prefix.json"
    args = ("bench", "prefix-cache", "--quick", "--base", "tiny", "--dtype", dtype)
    code, _, err = run_cli(*args, "--workload", "shared", "--json", out)
    assert code == 0, err
    config = json.loads(out.read_text())["config"]
    assert (config["dtype"], config["quantize"]) == (dtype, quantize)
