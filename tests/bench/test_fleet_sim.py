"""`lorafleet bench fleet-sim`'s model: small deterministic fleets where the answer is known
(one adapter loads at most once per replica under affinity; round-robin with one slot loads
more; Little's law; the store and controller figures follow their formulas), and its input
checks. No Ray, no torch."""

from __future__ import annotations

import json

import pytest

from lorafleet.bench.fleet_config import Figures, FleetConfig
from lorafleet.bench.fleet_sim import (
    Shape,
    capacity_rps,
    controller_limit,
    replicas_for_target,
    simulate,
    workload,
)
from lorafleet.errors import LorafleetError

FIG = Figures()


def test_one_adapter_loads_at_most_once_per_replica_under_affinity():
    arrivals = workload(1, 2000, 5.0, "uniform", 1.0, seed=3)
    out = simulate(Shape(replicas=4, slots=1, new_tokens=16), FIG, "affinity", arrivals, warmup=0)
    assert 1 <= out["adapter_loads"] <= 4
    assert out["requests_measured"] == 2000
    assert out["copies_per_held_adapter"] == out["adapters_held"] <= 4


def test_light_load_affinity_keeps_each_adapter_on_one_replica():
    # Far under capacity the holder always has room: with the router's view up to date, one
    # load per adapter and one copy each (a lagging view may load an adapter twice).
    arrivals = workload(8, 1500, 2.0, "uniform", 1.0, seed=1)
    fresh = Figures(view_delay_s=0.0)
    out = simulate(Shape(replicas=4, slots=4), fresh, "affinity", arrivals, warmup=0.0)
    assert out["adapter_loads"] == 8
    assert out["copies_per_held_adapter"] == 1.0


def test_round_robin_with_one_slot_loads_more_than_affinity():
    # Short requests at a low rate: a replica is mostly idle when the next one comes, so
    # round-robin (and pow2) reload whenever it brings another adapter than the last one.
    arrivals = workload(4, 1500, 1.0, "uniform", 1.0, seed=2)
    shape = Shape(replicas=4, slots=1, new_tokens=8)
    rr = simulate(shape, FIG, "round-robin", arrivals, warmup=0.0)
    aff = simulate(shape, FIG, "affinity", arrivals, warmup=0.0)
    pow2 = simulate(shape, FIG, "pow2", arrivals, warmup=0.0)
    assert aff["adapter_loads"] <= 8  # each of 4 adapters settles on one replica, give or take
    assert rr["adapter_loads"] > 10 * aff["adapter_loads"]
    assert pow2["adapter_loads"] > 10 * aff["adapter_loads"]
    assert rr["loads_per_1000"] == pytest.approx(1000 * rr["adapter_loads"] / 1500)


def test_littles_law_and_token_count_hold():
    arrivals = workload(50, 6000, 6.0, "zipf", 1.0, seed=5)
    shape = Shape(replicas=4, slots=8, new_tokens=16)
    out = simulate(shape, FIG, "affinity", arrivals, warmup=0.1)
    assert out["littles_L"] == pytest.approx(out["littles_lambda_W"], rel=0.05)
    assert out["arrival_rate"] == pytest.approx(6.0, rel=0.05)
    # In steady state the tokens out match the requests in.
    assert out["tokens_per_s"] == pytest.approx(6.0 * 16, rel=0.05)


def test_the_same_seed_gives_the_same_figures_and_ttft_is_at_least_one_step():
    arrivals = workload(20, 800, 4.0, "zipf", 1.2, seed=9)
    a = simulate(Shape(replicas=3, slots=4), FIG, "affinity", arrivals, seed=4)
    b = simulate(Shape(replicas=3, slots=4), FIG, "affinity", arrivals, seed=4)
    assert a == b
    one_step = FIG.step_base_s + FIG.step_per_row_s + FIG.step_per_adapter_s
    assert a["ttft_p50"] >= one_step + 32 * FIG.prefill_per_token_s


def test_a_slow_store_is_the_bottleneck_it_reports():
    # 500 adapters drawn uniformly over 4 x 32 slots: most requests need a load.
    arrivals = workload(500, 1500, 4.0, "uniform", 1.0, seed=6)
    shape = Shape(replicas=4, slots=32)
    fast = simulate(shape, FIG, "round-robin", arrivals)
    slow_fig = FIG.with_overrides(("store_bandwidth_Bps=1e7",))  # 10 MB/s: 0.18 s per load
    slow = simulate(shape, slow_fig, "round-robin", arrivals)
    assert fast["loads_per_1000"] > 500
    assert slow["store_utilisation"] == pytest.approx(
        slow["loads_per_s"] * FIG.adapter_bytes / 1e7, rel=1e-9
    )
    assert slow["store_utilisation"] > 0.5 > 0.01 > fast["store_utilisation"]
    # Most requests wait for their adapter's transfer, so the median pays it at least.
    assert slow["ttft_p50"] > fast["ttft_p50"] + 0.15


def test_controller_and_ingress_figures_follow_their_formulas():
    shape = Shape(replicas=100, slots=32)
    per_replica = 32 * FIG.model_id_bytes + FIG.replica_info_bytes

    def broadcast_Bps(n: int, tps: float) -> float:
        ingresses = max(1, -(-n * tps // FIG.ingress_msgs_per_s))
        return 10 * ingresses * n * per_replica

    for tps in (100.0, 2000.0):
        limit = controller_limit(shape, FIG, tps)
        assert broadcast_Bps(limit, tps) <= FIG.controller_Bps < broadcast_Bps(limit + 1, tps)
    assert controller_limit(shape, FIG, 2000.0) < controller_limit(shape, FIG, 100.0)
    arrivals = workload(100, 600, 6.0, "uniform", 1.0, seed=0)
    out = simulate(Shape(replicas=3, slots=4), FIG, "pow2", arrivals)
    assert out["ingress_msgs_per_s"] == pytest.approx(out["arrival_rate"] + out["tokens_per_s"])
    assert out["ingresses_needed"] == 1
    expected = out["controller_broadcasts_per_s"] * 1 * 3 * (4 * 48 + 500)
    assert out["controller_Bps"] == pytest.approx(expected)
    assert 0 < out["controller_broadcasts_per_s"] <= 1 / FIG.control_loop_s


def test_replicas_for_target_finds_the_fewest():
    shape = Shape(replicas=1, slots=8, new_tokens=8)
    arrivals = workload(20, 1500, 12.0, "zipf", 1.0, seed=2)
    found = replicas_for_target(shape, FIG, "affinity", arrivals, 1.0, 0.2, 64)
    n = found["replicas"]
    assert n is not None and found["ttft_p99"] <= 1.0
    if n - 1 in found["tried"]:
        assert found["tried"][n - 1] > 1.0
    assert capacity_rps(shape, FIG, 1) * n >= 12.0  # at least the capacity bound
    none = replicas_for_target(shape, FIG, "affinity", arrivals, 1e-3, 0.2, 4)
    assert none["replicas"] is None


def test_bad_settings_are_one_line_errors():
    with pytest.raises(LorafleetError, match="--policy 'random'"):
        FleetConfig(policies=("random",))
    with pytest.raises(LorafleetError, match="NAME=VALUE"):
        FleetConfig(figures=("nope=1",))
    with pytest.raises(LorafleetError, match="not a number"):
        FleetConfig(figures=("cold_load_s=fast",))
    with pytest.raises(LorafleetError, match="must be > 0"):
        FleetConfig(figures=("store_bandwidth_Bps=0",))
    with pytest.raises(LorafleetError, match="--replicas"):
        FleetConfig(replicas=(0,))


def test_the_command_prints_tables_and_writes_json(run_cli, tmp_path):
    out = tmp_path / "fleet.json"
    code, stdout, _ = run_cli(
        *("bench", "fleet-sim", "--adapters", "200", "--replicas", "4", "--rate", "4"),
        *("--requests", "400", "--policy", "affinity", "--policy", "round-robin"),
        *("--popularity", "zipf", "--max-replicas", "16", "--figure", "cold_load_s=0.02"),
        *("--json", out),
    )
    assert code == 0, stdout
    figures = json.loads(out.read_text())
    assert {r["policy"] for r in figures["runs"]} == {"affinity", "round-robin"}
    assert figures["figures"]["cold_load_s"]["value"] == 0.02
    assert figures["figures"]["cold_load_s"]["kind"] == "given"
    assert figures["figures"]["adapter_bytes"]["kind"] == "measured"
    assert len(figures["replicas_needed"]) == 2
    assert "replicas needed for TTFT p99" in stdout and "[measured]" in stdout
