"""VeRA through the method registry: `lorafleet train --method vera` trains it through PEFT and
saves it in PEFT's format; PEFT and lorafleet load each other's VeRA adapters with equal logits;
validation knows its shared projections."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import logits
from peft import PeftModel, VeraConfig, get_peft_model, get_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lorafleet.adapters import (
    AdapterError,
    MethodConfig,
    adapter_from_model,
    load_adapter,
    new_adapter,
    read_adapter,
    write_adapter,
)
from lorafleet.models import fingerprint, load_base
from lorafleet.models.tiny import tiny_llama

ATOL = 1e-5
TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]
WEIGHTS = "adapter_model.safetensors"


def _fresh(tokenizer):
    return tiny_llama(0, vocab_size=len(tokenizer))


def randomize_vera(model, seed: int = 5, scale: float = 0.5) -> None:
    """Random trained vectors d and b (b starts at zero: the adapter would be the base)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "vera_lambda_" in name:
                p.copy_(scale * torch.randn(p.shape, generator=gen))


def test_peft_vera_adapter_loads_in_lorafleet_with_same_logits(tokenizer, input_ids, tmp_path):
    base_logits = logits(_fresh(tokenizer), input_ids)
    config = VeraConfig(r=8, target_modules=TARGETS, projection_prng_key=3, task_type="CAUSAL_LM")
    peft_model = get_peft_model(_fresh(tokenizer), config)
    randomize_vera(peft_model)
    peft_model.save_pretrained(tmp_path)  # PEFT's own writer
    reference = logits(PeftModel.from_pretrained(_fresh(tokenizer), tmp_path).eval(), input_ids)

    model = _fresh(tokenizer)
    adapter, ours = load_adapter(tmp_path, model, base_fingerprint=fingerprint(model))
    assert adapter.method == "vera" and adapter.peft_type == "VERA"
    assert (reference - base_logits).abs().max() > 1e-3, "adapter must change the logits"
    torch.testing.assert_close(logits(ours, input_ids), reference, atol=ATOL, rtol=0)


def test_lorafleet_vera_adapter_loads_in_peft_with_same_logits(tokenizer, input_ids, tmp_path):
    base = _fresh(tokenizer)
    ours = new_adapter(base, MethodConfig("vera", rank=8, targets=TARGETS))
    assert torch.equal(logits(ours.eval(), input_ids), logits(_fresh(tokenizer), input_ids))
    randomize_vera(ours)
    expected = logits(ours, input_ids)
    write_adapter(tmp_path, adapter_from_model(ours, base_fingerprint=fingerprint(base)))

    theirs = PeftModel.from_pretrained(_fresh(tokenizer), tmp_path).eval()
    torch.testing.assert_close(logits(theirs, input_ids), expected, atol=ATOL, rtol=0)
    # PEFT's keys and shapes, its shared projections once for the model: A [r, max_in] and
    # B [max_out, r] over the adapted linears (down_proj's in 128, up_proj's out 128).
    peft_keys = {k: tuple(v.shape) for k, v in get_peft_model_state_dict(theirs).items()}
    with safe_open(str(tmp_path / WEIGHTS), framework="pt") as f:
        assert {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()} == peft_keys  # noqa: SIM118
    assert peft_keys["base_model.vera_A"] == (8, 128)
    assert peft_keys["base_model.vera_B"] == (128, 8)
    assert peft_keys["base_model.model.model.layers.0.self_attn.v_proj.vera_lambda_b"] == (32,)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "VERA" and config["save_projection"] is True


def test_train_vera_from_the_cli_saves_what_peft_loads(run_cli, tiny_base_dir, tmp_path):
    data = tmp_path / "sums.jsonl"
    rows = [
        {"prompt": f"{a} plus {b} is", "completion": f" {a + b}"}
        for a in range(4)
        for b in range(4)
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    code, stdout, err = run_cli(
        "train",
        "--base",
        tiny_base_dir,
        "--data",
        data,
        "--out",
        out,
        "--method",
        "vera",
        "--rank",
        "8",
        "--steps",
        "3",
        "--batch-size",
        "4",
        "--lr",
        "5e-2",
        "--no-chat",
    )
    assert code == 0, err
    assert f"adapter written to {out}" in stdout
    adapter = read_adapter(out)
    assert adapter.method == "vera" and adapter.meta["method"] == "vera"
    assert not (out / "lora_init.safetensors").exists()  # only plain LoRA keeps its init
    lambda_b = [t for k, t in adapter.tensors.items() if k.endswith("vera_lambda_b")]
    assert lambda_b and all(t.abs().max() > 0 for t in lambda_b)  # trained away from zero

    ids = torch.tensor([[1, 42, 7, 99, 5, 17]])
    base_model = load_base(str(tiny_base_dir)).model
    _, ours = load_adapter(out, base_model)
    mine = logits(ours, ids)
    theirs = PeftModel.from_pretrained(load_base(str(tiny_base_dir)).model, out).eval()
    torch.testing.assert_close(logits(theirs, ids), mine, atol=ATOL, rtol=0)
    assert (mine - logits(load_base(str(tiny_base_dir)).model, ids)).abs().max() > 1e-4


@pytest.fixture
def vera_dir(tokenizer, tmp_path):
    model = new_adapter(_fresh(tokenizer), MethodConfig("vera", rank=8, targets=TARGETS))
    randomize_vera(model)
    return write_adapter(tmp_path / "vera", adapter_from_model(model))


def _edit(path, change) -> None:
    tensors = load_file(str(path / WEIGHTS))
    change(tensors)
    save_file(tensors, str(path / WEIGHTS))


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        (lambda t: t.pop("base_model.vera_A"), "VeRA tensor base_model.vera_A is missing"),
        (
            lambda t: t.__setitem__("base_model.vera_B", torch.zeros(64, 8)),
            "base_model.vera_B has shape (64, 8), expected (128, 8)",
        ),
        (
            lambda t: t.pop("base_model.model.model.layers.1.mlp.up_proj.vera_lambda_d"),
            "up_proj has only vera_lambda_b; VeRA needs vera_lambda_d, vera_lambda_b",
        ),
        (
            lambda t: t.__setitem__(
                "base_model.model.model.layers.0.self_attn.q_proj.vera_lambda_b", torch.zeros(32)
            ),
            "vera_lambda_b has shape (32,), expected (64,)",
        ),
    ],
)
def test_validation_checks_the_parts_and_shared_projections(tokenizer, vera_dir, change, needle):
    load_adapter(vera_dir, _fresh(tokenizer))  # the untouched adapter passes
    _edit(vera_dir, change)
    with pytest.raises(AdapterError) as err:
        load_adapter(vera_dir, _fresh(tokenizer))
    assert needle in str(err.value) and "\n" not in str(err.value)
