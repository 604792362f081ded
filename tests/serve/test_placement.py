"""What a Ray Serve replica asks Ray for, from `--device` (serve/placement.py; no Ray here)."""

from __future__ import annotations

import pytest
import torch

from lorafleet.errors import LorafleetError
from lorafleet.serve.placement import Spread, replica_device, replica_resources


def test_cpu_replicas_ask_for_their_threads_only():
    assert replica_resources("cpu", 2) == {"num_cpus": 2}
    assert replica_resources("cpu", 1, cluster_gpus=8) == {"num_cpus": 1}  # cpu never takes one
    assert replica_device({"num_cpus": 2}) == "cpu"


def test_cuda_replicas_ask_for_a_gpu():
    res = replica_resources("cuda", 1, cluster_gpus=2)
    assert res == {"num_cpus": 1, "num_gpus": 1.0}
    assert replica_device(res) == "cuda"
    assert replica_resources("cuda", 1, gpus_per_replica=0.5)["num_gpus"] == 0.5
    with pytest.raises(LorafleetError, match="the Ray cluster has no GPU"):
        replica_resources("cuda", 1, cluster_gpus=0)


def test_auto_follows_the_cluster_then_this_machine(monkeypatch):
    assert replica_resources("auto", 1, cluster_gpus=4) == {"num_cpus": 1, "num_gpus": 1.0}
    assert replica_resources("auto", 1, cluster_gpus=0) == {"num_cpus": 1}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert replica_resources("auto", 3) == {"num_cpus": 3}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert replica_resources("auto", 3) == {"num_cpus": 3, "num_gpus": 1.0}


@pytest.mark.parametrize(
    "args, message",
    [
        (("tpu", 1), "unknown device 'tpu'"),
        (("cpu", 0), "threads per replica must be an integer >= 1"),
        (("cuda", 1, 2.0), "gpus_per_replica must be in"),
    ],
)
def test_bad_input_is_one_line(args, message):
    device, threads, *gpus = args
    kw = {"gpus_per_replica": gpus[0]} if gpus else {}
    with pytest.raises(LorafleetError, match=message):
        replica_resources(device, threads, **kw)


def test_spread_caps_replicas_per_node_and_names_a_cluster_too_small():
    assert Spread().ray_options() == {}  # Ray Serve's own best-effort spreading
    assert Spread(1).ray_options() == {"max_replicas_per_node": 1}
    Spread(1).check_room(replicas=2, nodes=2)
    Spread().check_room(replicas=8, nodes=1)  # no cap: any cluster
    with pytest.raises(LorafleetError, match=r"has 1 node\(s\), room for 1 of 2 replicas"):
        Spread(1).check_room(replicas=2, nodes=1)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(LorafleetError, match="max_replicas_per_node must be an integer"):
            Spread(bad)
