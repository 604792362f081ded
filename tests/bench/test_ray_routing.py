"""`lorafleet bench ray-routing` without Ray: the pass rule holds and fails where it must, the
requests are the same for every run of a draw, the variants are the ones the issue names,
/metrics' load counters are read, and bad settings are one-line errors (exit 2)."""

from __future__ import annotations

import pytest

from lorafleet.bench.fleet_config import RoutingConfig
from lorafleet.bench.ray_routing import plan, slot_loads, variants, verdict
from lorafleet.errors import LorafleetError


def _row(pop: str, routing: str, loads: float, tps: float, layout: str = "2x1") -> dict:
    return {
        "popularity": pop,
        "layout": layout,
        "routing": routing,
        "loads_per_1000": loads,
        "tokens_per_s": tps,
    }


def test_the_pass_rule_needs_fewer_loads_and_no_slowdown():
    good = [_row("zipf", "affinity", 50, 97), _row("zipf", "round_robin", 300, 100)]
    assert verdict(good)["passed"]
    assert verdict(good)["checks"]["zipf"]["tokens_per_s_ratio"] == pytest.approx(0.97)
    slower = [_row("zipf", "affinity", 50, 94), _row("zipf", "round_robin", 300, 100)]
    assert not verdict(slower)["passed"]
    assert verdict(slower, tolerance=0.1)["passed"]
    more_loads = [_row("zipf", "affinity", 300, 120), _row("zipf", "round_robin", 300, 100)]
    assert not verdict(more_loads)["passed"]
    # Every draw must pass; a missing or failed run fails its draw; 1x2 rows do not count.
    two = good + [_row("uniform", "affinity", 400, 100), _row("uniform", "round_robin", 390, 99)]
    assert not verdict(two)["passed"] and verdict(two)["checks"]["zipf"]["ok"]
    failed = [good[0], {**good[1], "error": "boom"}]
    assert not verdict(failed)["passed"]
    assert not verdict([_row("zipf", "affinity", 1, 100, layout="1x2"), good[1]])["passed"]


def test_every_run_of_a_draw_gets_the_same_requests():
    cfg = RoutingConfig(clients=4, per_client=3, adapters=16)
    names = [f"t{i:04d}" for i in range(16)]
    prompts = [[1, 2], [3, 4]]
    zipf = plan(cfg, names, prompts, "zipf", 0)
    assert zipf == plan(cfg, names, prompts, "zipf", 0)
    assert len(zipf) == 12 and {n for n, _ in zipf} <= set(names)
    assert zipf != plan(cfg, names, prompts, "uniform", 0)


def test_the_variants_are_routings_on_two_replicas_then_one_replica_then_serve():
    got = variants(("2x1", "1x2"), ("affinity", "round_robin"), True)
    assert [label for label, _, _ in got] == [
        "ray 2x1 affinity",
        "ray 2x1 round_robin",
        "ray 1x2 affinity",
        "serve 1x2",
    ]
    assert variants(("2x1",), ("round_robin",), False) == [
        ("ray 2x1 round_robin", "2x1", "round_robin")
    ]


def test_slot_loads_sums_the_registry_counters(monkeypatch):
    import httpx

    text = "\n".join(
        [
            "# HELP lorafleet_adapter_cache_misses_total Requests whose adapter was not resident.",
            "lorafleet_adapter_cache_misses_total 7.0",
            "lorafleet_adapter_cache_misses_created 1.7e9",
            "lorafleet_adapter_cache_cpu_hits_total 5.0",
            "lorafleet_adapter_cache_hits_total 100.0",
            'lorafleet_replica_adapter_loads_total{replica="a",pid="1"} 12.0',
        ]
    )

    class Reply:
        pass

    reply = Reply()
    reply.text = text
    monkeypatch.setattr(httpx, "get", lambda url, timeout: reply)
    assert slot_loads("http://x") == 12


def test_bad_settings_are_one_line_errors(run_cli):
    with pytest.raises(LorafleetError, match="--layout '3x1'"):
        RoutingConfig(layouts=("3x1",))
    with pytest.raises(LorafleetError, match="--routing"):
        RoutingConfig(routings=("random",))
    code, _, err = run_cli("bench", "ray-routing", "--popularity", "pareto")
    assert code == 2 and "--popularity 'pareto'" in err and "Traceback" not in err
