"""A real Flower deployment on 127.0.0.1: one SuperLink and two SuperNodes (insecure mode, no
runtime dependency install), `lorafleet fed server` for one round, then a restarted server
with --resume for the second; the result equals the in-process simulation with the same seeds.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from fed_helpers import fed_options
from safetensors.torch import load_file

from lorafleet.fed import FedConfig
from lorafleet.fed.launch import flower_env, flower_tool
from lorafleet.fed.simulate import run_simulation

# Another process, other thread count: matmul sums may round differently, nothing more.
SAME_ATOL = 1e-5
SERVER_TIMEOUT_S = 300


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_port(port: int, proc: subprocess.Popen, log: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"process exited early:\n{log.read_text()[-3000:]}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise AssertionError(f"port {port} never opened:\n{log.read_text()[-3000:]}")


def _stop(procs: list[subprocess.Popen]) -> None:
    """SIGTERM each process group (SuperLink/SuperNode and the apps they spawned), then KILL."""
    for proc in procs:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + 10
    for proc in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _tensors(path: Path) -> dict:
    return load_file(str(path))


def test_flower_run_with_a_restart_equals_the_simulation(tiny_base_dir, reviews, tmp_path):
    train, val = reviews
    common = dict(
        clients=2,
        rounds=2,
        local_steps=2,
        batch_size=4,
        rank=4,
        alpha=8,
        lr=5e-3,
        max_length=64,
        eval_limit=8,
        chat=False,
        split="dirichlet:1.0",
        seed=3,
    )
    sim = tmp_path / "sim"
    run_simulation(
        FedConfig(base=str(tiny_base_dir), data=str(train), val=str(val), out=sim, **common),
        show_progress=False,
    )

    link_port = _free_port()
    env = {**flower_env(), "PYTHONUNBUFFERED": "1"}
    procs: list[subprocess.Popen] = []

    def start(name: str, cmd: list[str]) -> tuple[subprocess.Popen, Path]:
        log = tmp_path / f"{name}.log"
        home = tmp_path / f"flwr-{name}"  # each Flower process keeps its own FLWR_HOME
        proc = subprocess.Popen(
            cmd,
            stdout=log.open("w"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**env, "FLWR_HOME": str(home)},
        )
        procs.append(proc)
        return proc, log

    try:
        link, link_log = start(
            "superlink",
            [
                flower_tool("flower-superlink"),
                "--insecure",
                "--port",
                str(link_port),
                "--disable-runtime-dependency-installation",
            ],
        )
        _wait_for_port(link_port, link, link_log)
        for k in range(2):
            node_port = _free_port()
            node, node_log = start(
                f"supernode{k}",
                [
                    sys.executable,
                    "-m",
                    "lorafleet.cli",
                    "fed",
                    "client",
                    "--superlink",
                    f"127.0.0.1:{link_port}",
                    "--insecure",
                    "--partition",
                    str(k),
                    "--partitions",
                    "2",
                    "--port",
                    str(node_port),
                ],
            )
            _wait_for_port(node_port, node, node_log)

        out = tmp_path / "flower"
        options = fed_options(
            tiny_base_dir, train, val, out, rounds=1, split="dirichlet:1.0", seed=3
        )
        server = [
            sys.executable,
            "-m",
            "lorafleet.cli",
            "fed",
            "server",
            *options,
            "--superlink",
            f"127.0.0.1:{link_port}",
            "--insecure",
        ]
        first = subprocess.run(
            server, capture_output=True, text=True, env=env, timeout=SERVER_TIMEOUT_S
        )
        assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
        rounds = json.loads((out / "metrics.json").read_text())["rounds"]
        assert [r["round"] for r in rounds] == [0, 1]
        # The server process is gone; a new one continues after the saved round.
        resumed = [*server, "--resume"]
        resumed[resumed.index("--rounds") + 1] = "2"
        second = subprocess.run(
            resumed, capture_output=True, text=True, env=env, timeout=SERVER_TIMEOUT_S
        )
        assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    finally:
        _stop(procs)

    flower_rounds = json.loads((out / "metrics.json").read_text())["rounds"]
    sim_rounds = json.loads((sim / "metrics.json").read_text())["rounds"]
    assert [r["round"] for r in flower_rounds] == [0, 1, 2]
    assert [r.get("clients") for r in flower_rounds] == [r.get("clients") for r in sim_rounds]
    assert flower_rounds[-1]["clients"] == [0, 1]  # both SuperNodes took part
    for got, want in zip(flower_rounds, sim_rounds, strict=True):
        assert got["loss"] == pytest.approx(want["loss"], abs=1e-4)
    adapter = "global/adapter/adapter_model.safetensors"
    residual = "global/residual.safetensors"
    for name in (adapter, residual):
        got, want = _tensors(out / name), _tensors(sim / name)
        assert got.keys() == want.keys() and got
        for key in got:
            torch.testing.assert_close(got[key], want[key], atol=SAME_ATOL, rtol=0)
    # Not trivially equal: training moved the adapter away from its start.
    b = [t for k, t in _tensors(out / adapter).items() if "lora_B" in k]
    assert max(float(t.abs().max()) for t in b) > 1e-3
