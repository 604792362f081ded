"""The in-process simulation's failure handling: crashed or slow clients are skipped (the
round needs --min-clients), and a server stopped mid-run resumes to the same result."""

from __future__ import annotations

import json
import time

import pytest
import torch
from safetensors.torch import load_file

from lorafleet.fed import FedConfig, local
from lorafleet.fed.simulate import run_simulation

RESUME_ATOL = 1e-6  # same operations in the same order: equal up to float noise


def _config(base, reviews, out, **kw):
    train, val = reviews
    defaults = dict(
        clients=3,
        rounds=1,
        local_steps=2,
        batch_size=4,
        rank=4,
        alpha=8,
        lr=5e-3,
        max_length=64,
        eval_limit=8,
        chat=False,
    )
    return FedConfig(base=str(base), data=str(train), val=str(val), out=out, **{**defaults, **kw})


def _adapter(out):
    return load_file(str(out / "global" / "adapter" / "adapter_model.safetensors"))


def _rounds(out):
    return json.loads((out / "metrics.json").read_text())["rounds"]


def test_crashed_or_slow_clients_are_skipped_and_min_clients_decides(
    tiny_base_dir, reviews, tmp_path, monkeypatch
):
    # Round 1: client 1 crashes, 2 of 3 reply (>= --min-clients 2): aggregated without it.
    # Round 2: client 1 crashes and client 0 runs past --client-timeout: 1 < 2, round skipped.
    # The slow client moves the deadline clock instead of sleeping: the test does not depend
    # on how fast this machine trains the others.
    timeout, offset = 600.0, [0.0]
    monkeypatch.setattr(local, "clock", lambda: time.monotonic() + offset[0])

    def faults(round_, client):
        if client == 1:
            raise RuntimeError("disk full")
        if round_ == 2 and client == 0:
            offset[0] += timeout + 1  # this client "takes" longer than --client-timeout

    out = tmp_path / "faults"
    cfg = _config(tiny_base_dir, reviews, out, rounds=2, min_clients=2, client_timeout=timeout)
    run_simulation(cfg, before_client=faults, show_progress=False)
    _, first, second = _rounds(out)
    assert first["clients"] == [0, 2] and "skipped" not in first
    assert first["failed"] == [{"client": 1, "reason": "RuntimeError: disk full"}]
    assert set(first["weights"]) == {"0", "2"}
    assert sorted(f["client"] for f in second["failed"]) == [0, 1]
    assert any("timed out" in f["reason"] for f in second["failed"])
    assert "fewer than --min-clients 2" in second["skipped"]
    # The skipped round left the global model as it was, and that model was scored.
    assert second["loss"] == pytest.approx(first["loss"], rel=1e-6)
    saved = load_file(str(out / "state" / "round-1" / "adapter.safetensors"))
    for key, tensor in _adapter(out).items():
        assert torch.equal(tensor, saved[key])


def test_a_stopped_server_resumes_to_the_same_result(tiny_base_dir, reviews, tmp_path):
    straight = tmp_path / "straight"
    run_simulation(
        _config(tiny_base_dir, reviews, straight, rounds=2, clients=2), show_progress=False
    )

    def stop(round_, client):
        if round_ == 2 and client == 1:
            raise KeyboardInterrupt  # the server process dies mid-round

    split = tmp_path / "split"
    with pytest.raises(KeyboardInterrupt):
        run_simulation(
            _config(tiny_base_dir, reviews, split, rounds=2, clients=2),
            before_client=stop,
            show_progress=False,
        )
    assert [r["round"] for r in _rounds(split)] == [0, 1]
    result = run_simulation(
        _config(tiny_base_dir, reviews, split, rounds=2, clients=2, resume=True),
        show_progress=False,
    )
    assert [r["round"] for r in result["rounds"]] == [0, 1, 2]
    a, b = _adapter(split), _adapter(straight)
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=RESUME_ATOL, rtol=0)
    res_a = load_file(str(split / "global" / "residual.safetensors"))
    res_b = load_file(str(straight / "global" / "residual.safetensors"))
    assert res_a.keys() == res_b.keys() and res_a
    for key in res_a:
        torch.testing.assert_close(res_a[key], res_b[key], atol=RESUME_ATOL, rtol=0)
    assert _rounds(split)[-1]["loss"] == pytest.approx(_rounds(straight)[-1]["loss"], rel=1e-5)
