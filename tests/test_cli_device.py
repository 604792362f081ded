"""`--device auto|cpu|cuda` on serve, train, eval and generate: cuda without a GPU and unknown
names are one line and exit 2 before any model loads; cpu and auto load on the CPU here."""

from __future__ import annotations

import pytest
import torch

import lorafleet.models


@pytest.fixture(autouse=True)
def no_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.fixture
def loads(monkeypatch) -> list:
    """The devices load_base is called with (it still loads)."""
    calls, real = [], lorafleet.models.load_base

    def spy(*args, **kw):
        calls.append(kw.get("device"))
        return real(*args, **kw)

    monkeypatch.setattr(lorafleet.models, "load_base", spy)
    return calls


COMMANDS = {
    "serve": ["serve", "--base", "tiny"],
    "train": ["train", "--base", "tiny", "--data", "sst2", "--steps", "1"],
    "eval": ["eval", "--base", "tiny", "--data", "sst2", "--limit", "2"],
    "generate": ["generate", "--base", "tiny", "--prompt", "Hi", "--max-tokens", "2"],
}


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_cuda_without_a_gpu_exits_2_in_one_line(run_cli, loads, tmp_path, command):
    args = COMMANDS[command] + (["--out", tmp_path / "run"] if command == "train" else [])
    code, _, err = run_cli(*args, "--device", "cuda")
    assert code == 2
    assert err.strip().count("\n") == 0
    assert "--device cuda: torch sees no CUDA GPU here" in err
    assert loads == []  # refused before the model loads
    code, _, err = run_cli(*args, "--device", "gpu")
    assert code == 2 and "unknown device 'gpu'" in err


@pytest.mark.parametrize("device", ["cpu", "auto"])
def test_generate_runs_on_the_cpu(run_cli, loads, device):
    code, out, err = run_cli(*COMMANDS["generate"], "--device", device)
    assert code == 0, err
    assert [torch.device(d).type for d in loads] == ["cpu"]


def test_quantize_on_cuda_is_refused_before_loading(run_cli, loads, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU "seen", never used
    code, _, err = run_cli(*COMMANDS["serve"], "--device", "cuda", "--quantize", "int8")
    assert code == 2 and "--quantize int8 runs on torch's CPU kernels only" in err
    assert loads == []
