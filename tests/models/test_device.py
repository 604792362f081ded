"""`--device`: auto picks CUDA only when torch sees a GPU, cpu is the CPU, cuda without a GPU
is one line; the base loads where asked; training's processes take the same choice."""

from __future__ import annotations

import pytest
import torch

import lorafleet.models
from lorafleet.errors import LorafleetError
from lorafleet.models import DeviceConfig, check_device, load_base, resolve_device
from lorafleet.train.distributed import Distributed


@pytest.fixture
def no_gpu(monkeypatch):
    """torch sees no GPU (true here; forced, so the tests mean the same on a GPU machine)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def test_names_are_checked_without_torch():
    assert check_device(" CUDA ") == "cuda"
    assert DeviceConfig().device == "auto"
    with pytest.raises(LorafleetError, match=r"unknown device 'tpu': use auto \| cpu \| cuda"):
        DeviceConfig("tpu")


def test_cpu_and_auto_choose_the_cpu_without_a_gpu(no_gpu):
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cpu")
    assert load_base("tiny", device="auto").model.device.type == "cpu"
    assert Distributed.from_env("auto").device == torch.device("cpu")


def test_cuda_without_a_gpu_is_one_line(no_gpu):
    for call in (lambda: resolve_device("cuda"), lambda: Distributed.from_env("cuda")):
        with pytest.raises(LorafleetError) as caught:
            call()
        message = str(caught.value)
        assert "--device cuda: torch sees no CUDA GPU here" in message
        assert "\n" not in message


def test_auto_chooses_cuda_when_torch_sees_a_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")
    assert resolve_device("cpu") == torch.device("cpu")  # cpu stays cpu on a GPU machine


def test_load_base_takes_a_torch_device_or_a_name(monkeypatch):
    loaded = load_base("tiny", device=torch.device("cpu"))
    assert {p.device.type for p in loaded.model.parameters()} == {"cpu"}
    assert lorafleet.models.DEVICES == ("auto", "cpu", "cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(LorafleetError, match="--device cuda"):
        load_base("tiny", device="CUDA")  # a name is resolved (and refused) before loading
