"""The Ray fleet's plain-data parts (no Ray needed): routing ids, fleet settings, summed stats,
the CLI's one-line errors for Ray flags, and the hint when Ray is missing."""

from __future__ import annotations

import builtins

import pytest

from lorafleet.errors import LorafleetError
from lorafleet.serve.backend import REPLICA_FAILED
from lorafleet.serve.ray import RAY_HINT, require_ray
from lorafleet.serve.ray.wire import FleetSpec, adapter_names, route_id, sum_stats
from lorafleet.serve.sequence import Mixture


def test_requests_route_by_adapter_and_mixtures_by_their_heaviest_part():
    assert route_id(None) == "" and adapter_names(None) == ()
    assert route_id("alpha") == "alpha" and adapter_names("alpha") == ("alpha",)
    mix = Mixture((("alpha", 0.3), ("beta", -0.7), ("gamma", 0.7)))
    assert route_id(mix) == "beta"  # |-0.7| is the largest; the first of equals
    assert route_id([("alpha", 0.5), ("beta", 0.5)]) == "alpha"
    assert adapter_names(mix) == ("alpha", "beta", "gamma")
    gated = Mixture((("alpha", 1.0), ("beta", 1.0)), gate=object(), name="my-mole")
    assert route_id(gated) == "my-mole"


def test_fleet_spec_checks_itself():
    assert FleetSpec("tiny", replicas=2).routing == "affinity"
    for bad in ({"replicas": 0}, {"threads": 0}, {"routing": "random"}):
        with pytest.raises(LorafleetError) as err:
            FleetSpec("tiny", **bad)
        assert "\n" not in str(err.value)


def test_stats_sum_over_replicas():
    rows = [
        {
            "replica": "a",
            "pid": 1,
            "waiting": 2,
            "running": 3,
            "peak_running": 5,
            "adapters_loaded": 2,
            "registry": {"misses": 4, "hits": 1},
        },
        {
            "replica": "b",
            "pid": 2,
            "waiting": 1,
            "running": 0,
            "peak_running": 7,
            "adapters_loaded": 1,
            "registry": {"misses": 1},
        },
    ]  # fmt-independent literal rows
    total = sum_stats(rows)
    assert (total["waiting"], total["running"], total["peak_running"]) == (3, 3, 7)
    assert total["adapters_loaded"] == 3 and total["registry"]["misses"] == 5
    assert total["replicas"] == rows
    empty = sum_stats([])
    assert empty["waiting"] == 0 and empty["replicas"] == []


def test_without_ray_the_hint_names_what_to_install(monkeypatch):
    real = builtins.__import__

    def no_ray(name, *args, **kwargs):
        if name == "ray" or name.startswith("ray."):
            raise ImportError("No module named 'ray'")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_ray)
    with pytest.raises(LorafleetError) as err:
        require_ray()
    assert str(err.value) == RAY_HINT and "lorafleet[ray]" in RAY_HINT


def test_ray_flags_without_ray_and_unsupported_options_are_one_line_errors():
    from lorafleet.cli.ray_serve import check_ray_flags

    check_ray_flags(False, None, None)
    check_ray_flags(True, "auto", 2, **{"--not-on-ray": None})
    with pytest.raises(LorafleetError, match="^--replicas needs --ray$"):
        check_ray_flags(False, None, 2)
    with pytest.raises(LorafleetError, match="^--address and --max-replicas-per-node need --ray$"):
        check_ray_flags(False, "auto", None, 1)
    # An option the fleet cannot serve (none today: --change and --hub-adapters now work).
    with pytest.raises(LorafleetError, match="^--ray does not serve --not-on-ray"):
        check_ray_flags(True, None, None, **{"--not-on-ray": "x"})


def test_a_replica_failure_is_a_503_in_openais_error_shape():
    from lorafleet.serve.api.bridge import Stream
    from lorafleet.serve.api.generation import failure

    stream = Stream(0, 1, None, None, error=f"{REPLICA_FAILED}: ActorDiedError: gone")
    err = failure(stream)
    assert err.status == 503 and err.code == "replica_failed"
