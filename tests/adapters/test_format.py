"""Reading and writing PEFT adapter directories: round trips and crash safety."""

from __future__ import annotations

import pytest
import torch
from helpers import randomize_adapter

import lorafleet.adapters.format as fmt
from lorafleet.adapters import (
    AdapterError,
    MethodConfig,
    adapter_from_model,
    new_adapter,
    read_adapter,
    write_adapter,
)


@pytest.fixture
def adapter(tiny_model):
    model = new_adapter(tiny_model, MethodConfig(rank=4, alpha=8, targets=["q_proj", "v_proj"]))
    randomize_adapter(model)
    return adapter_from_model(model, base_fingerprint="llama-0000", extra_meta={"note": "x"})


def test_round_trip_keeps_tensors_config_and_meta(adapter, tmp_path):
    write_adapter(tmp_path / "a", adapter)
    back = read_adapter(tmp_path / "a")
    assert back.config["r"] == 4 and back.method == "lora" and back.targets == ["q_proj", "v_proj"]
    assert back.meta["base_fingerprint"] == "llama-0000" and back.meta["note"] == "x"
    assert back.tensors.keys() == adapter.tensors.keys()
    for k, t in adapter.tensors.items():
        assert torch.equal(back.tensors[k], t)
    assert (tmp_path / "a" / "README.md").is_file()


def test_crash_while_writing_weights_leaves_no_half_written_adapter(adapter, tmp_path, monkeypatch):
    target = tmp_path / "a"
    write_adapter(target, adapter)

    def explode(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(fmt, "save_file", explode)
    with pytest.raises(OSError):
        write_adapter(target, adapter)
    # No temp files left, the old weights are untouched, and no config pairs with new weights.
    assert sorted(p.name for p in target.iterdir()) == ["README.md", "adapter_model.safetensors"]
    with pytest.raises(AdapterError, match="adapter_config.json: missing"):
        read_adapter(target)


def test_refuses_to_write_non_finite_values(adapter, tmp_path):
    key = next(iter(adapter.tensors))
    adapter.tensors[key] = adapter.tensors[key].clone().fill_(float("nan"))
    with pytest.raises(AdapterError, match="non-finite"):
        write_adapter(tmp_path / "a", adapter)
    assert not (tmp_path / "a" / "adapter_config.json").exists()


def test_in_memory_adapter_looks_like_one_read_from_disk(adapter, tmp_path, tokenizer):
    from lorafleet.adapters import attach
    from lorafleet.models.tiny import tiny_llama

    assert adapter.peft_type == "LORA" and adapter.method == "lora"
    write_adapter(tmp_path / "a", adapter)
    assert read_adapter(tmp_path / "a").config == adapter.config
    attach(tiny_llama(0, vocab_size=len(tokenizer)), adapter)  # no round trip through files
