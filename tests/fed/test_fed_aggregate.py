"""Aggregation rules as pure functions: FedEx-LoRA is exact, FedAvg is not, FFA keeps A;
client validation drops bad updates with a logged reason; data partitions."""

from __future__ import annotations

import logging

import pytest
import torch
from peft import get_peft_model_state_dict, set_peft_model_state_dict

from lorafleet.adapters import MethodConfig, new_adapter
from lorafleet.errors import LorafleetError
from lorafleet.fed import (
    ClientUpdate,
    SplitSpec,
    aggregation_error,
    apply_residual,
    fedavg,
    fedex,
    ffa,
    partition,
    validate_updates,
)
from lorafleet.fed.aggregate import base_weight_name, lora_modules, lora_scale
from lorafleet.models.tiny import tiny_llama

EXACT_RTOL = 1e-6


def _client_tensors(reference: dict, seed: int, scale: float = 0.1) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return {k: v + scale * torch.randn(v.shape, generator=gen) for k, v in reference.items()}


@pytest.fixture
def lora_model():
    """A tiny Llama with a rank-4 LoRA on q_proj/v_proj (B = 0 at init, as in training)."""
    torch.manual_seed(0)
    model = tiny_llama(0, vocab_size=256)
    peft = new_adapter(model, MethodConfig("lora", 4, 8.0, ["q_proj", "v_proj"]))
    tensors = {k: v.detach().clone() for k, v in get_peft_model_state_dict(peft).items()}
    return peft, tensors


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def test_one_fedex_round_is_exact_and_fedavg_is_not(lora_model):
    peft, start = lora_model
    scale = 8.0 / 4
    clients = [_client_tensors(start, seed) for seed in (1, 2, 3)]
    weights = [10, 30, 20]  # examples per client
    ws = [w / 60 for w in weights]
    originals = {
        name: p.detach().clone()
        for name, p in peft.named_parameters()
        if name.endswith("base_layer.weight")
    }
    new, residual = fedex(clients, weights, scale)
    assert set(residual) == {base_weight_name(p) for p in lora_modules(start)}
    # Fold the residual into the real model's frozen weights, as the server does.
    apply_residual(peft, residual)
    set_peft_model_state_dict(peft, new)
    worst_fedex = 0.0
    num = den = 0.0  # FedAvg's distance from the ideal update, over all modules
    avg = fedavg(clients, weights)
    for prefix, (a_key, b_key) in lora_modules(start).items():
        peft_name = prefix + ".base_layer.weight"
        w0 = originals[peft_name]
        ideal_delta = sum(w * scale * c[b_key] @ c[a_key] for w, c in zip(ws, clients, strict=True))
        w_now = dict(peft.named_parameters())[peft_name].detach()
        effective = w_now + scale * new[b_key] @ new[a_key]  # W + residual + s B'A'
        worst_fedex = max(worst_fedex, _relative(effective, w0 + ideal_delta))
        fedavg_delta = scale * avg[b_key] @ avg[a_key]
        num += float((fedavg_delta - ideal_delta).double().pow(2).sum())
        den += float(ideal_delta.double().pow(2).sum())
    assert worst_fedex < EXACT_RTOL
    fedavg_error = (num / den) ** 0.5
    assert fedavg_error > 1e-2  # visibly inexact
    # The rules' own report: ~0 for FedEx, FedAvg's error nonzero (and the same figure).
    assert aggregation_error(clients, weights, new, residual, scale) < EXACT_RTOL
    reported = aggregation_error(clients, weights, avg, {}, scale)
    assert reported == pytest.approx(fedavg_error, rel=1e-4)
    print(f"FedAvg relative error of the global update after one round: {reported:.3g}")


def test_fedavg_is_the_weighted_mean_and_ffa_keeps_a(lora_model):
    _, start = lora_model
    clients = [_client_tensors(start, seed) for seed in (4, 5)]
    avg = fedavg(clients, [1, 3])
    key = next(iter(start))
    torch.testing.assert_close(avg[key], 0.25 * clients[0][key] + 0.75 * clients[1][key])
    frozen = [{k: (start[k] if ".lora_A." in k else v) for k, v in c.items()} for c in clients]
    out = ffa(frozen, [1, 3])
    for k in start:
        expected = start[k] if ".lora_A." in k else 0.25 * frozen[0][k] + 0.75 * frozen[1][k]
        torch.testing.assert_close(out[k], expected)
    # FFA is exact: with A shared, mean(B_i) A = mean(B_i A).
    assert aggregation_error(frozen, [1, 3], out, {}, 2.0) < EXACT_RTOL


def test_scale_follows_the_method():
    assert lora_scale({"r": 16, "lora_alpha": 32}) == 2.0
    assert lora_scale({"r": 16, "lora_alpha": 32, "use_rslora": True}) == 8.0
    with pytest.raises(LorafleetError, match="DoRA"):
        lora_scale({"r": 4, "lora_alpha": 8, "use_dora": True})


def test_validation_drops_bad_clients_and_logs_why(lora_model, caplog):
    _, start = lora_model
    a_key = next(k for k in start if ".lora_A." in k)
    good = [ClientUpdate(i, _client_tensors(start, 10 + i, 0.01), 5.0) for i in range(3)]
    wrong_shape = _client_tensors(start, 20, 0.01)
    wrong_shape[a_key] = torch.zeros(2, wrong_shape[a_key].shape[1])
    other_targets = {k: v for k, v in _client_tensors(start, 21, 0.01).items() if "v_proj" not in k}
    non_finite = _client_tensors(start, 22, 0.01)
    non_finite[a_key][0, 0] = float("nan")
    huge = _client_tensors(start, 23, 5.0)  # 500x the others' update norm
    bad = [
        ClientUpdate(10, wrong_shape, 5.0),
        ClientUpdate(11, other_targets, 5.0),
        ClientUpdate(12, non_finite, 5.0),
        ClientUpdate(13, huge, 5.0),
        ClientUpdate(14, _client_tensors(start, 24, 0.01), 0.0),
    ]
    with caplog.at_level(logging.WARNING, logger="lorafleet.fed"):
        kept, dropped = validate_updates(good + bad, start, norm_bound=10.0)
    assert [u.client for u in kept] == [0, 1, 2]
    reasons = {d.client: d.reason for d in dropped}
    assert set(reasons) == {10, 11, 12, 13, 14}
    assert "wrong shape" in reasons[10] and "other targets" in reasons[11]
    assert "non-finite" in reasons[12] and "norm" in reasons[13] and "weight" in reasons[14]
    for client in reasons:
        assert f"client {client} dropped" in caplog.text
    # With the norm check off the large update is kept; under FFA a moved A is dropped.
    kept, _ = validate_updates(good + [bad[3]], start, norm_bound=0)
    assert [u.client for u in kept] == [0, 1, 2, 13]
    kept, dropped = validate_updates(good, start, frozen_a=True)
    assert not kept and all("frozen A" in d.reason for d in dropped)


def test_partitions_are_disjoint_complete_and_seeded():
    labels = [i % 2 for i in range(200)]
    iid = partition(200, 4, SplitSpec.parse("iid"), seed=0)
    assert sorted(i for p in iid for i in p) == list(range(200))
    assert {len(p) for p in iid} == {50}
    skewed = partition(200, 4, SplitSpec.parse("dirichlet:0.1"), seed=0, keys=labels)
    assert sorted(i for p in skewed for i in p) == list(range(200))
    assert skewed == partition(200, 4, SplitSpec.parse("dirichlet:0.1"), seed=0, keys=labels)
    assert skewed != partition(200, 4, SplitSpec.parse("dirichlet:0.1"), seed=1, keys=labels)

    # A small alpha gives clients a dominant label; IID keeps them near half and half.
    def majority(part):
        ones = sum(labels[i] for i in part)
        return max(ones, len(part) - ones) / len(part)

    assert max(majority(p) for p in skewed) > 0.9
    assert max(majority(p) for p in iid) < 0.75
    for bad in ("dirichlet", "dirichlet:-1", "dirichlet:x", "halves"):
        with pytest.raises(LorafleetError):
            SplitSpec.parse(bad)
    with pytest.raises(LorafleetError, match="cannot be split"):
        partition(3, 4, SplitSpec.parse("iid"), seed=0)
