"""MoLE: gate math (temperature softmax, masking, balancing-loss gradient), the MoLE forward against
a plain PyTorch + PEFT reference, gate-only training and resume, the artifact and its checks."""

from __future__ import annotations

import json
import math
import os
import signal

import pytest
import torch
from compose_helpers import make_adapter, tiny
from mole_helpers import reference_logits
from safetensors.torch import load_file

from lorafleet.adapters import attach, write_adapter
from lorafleet.compose.mole import MoleError, attach_mole, load_mole, read_experts
from lorafleet.compose.mole_train import MoleTrainConfig, train_mole
from lorafleet.layers.mole import balance_loss, gate_probs
from lorafleet.models import load_base

ATOL = 1e-4  # float32 op vs the float64 reference, logits of size ~10


def test_gate_probs_temperature_and_mask_renormalisation():
    logits = torch.tensor([[1.0, 2.0, 4.0], [0.5, -1.0, 0.0]], dtype=torch.float64)
    for tau in (0.5, 1.0, 3.0):
        e = torch.exp(logits / tau)
        torch.testing.assert_close(gate_probs(logits, tau), e / e.sum(-1, keepdim=True))
    keep = torch.tensor([True, False, True])
    got = gate_probs(logits, 2.0, keep)
    e = torch.exp(logits[:, [0, 2]] / 2.0)
    torch.testing.assert_close(got[:, [0, 2]], e / e.sum(-1, keepdim=True))  # softmax of the rest
    assert torch.all(got[:, 1] == 0)
    sharp, flat = gate_probs(logits, 0.1), gate_probs(logits, 100.0)
    assert sharp.max() > 0.99 and (flat - 1 / 3).abs().max() < 0.02


def test_balance_loss_value_and_gradient():
    torch.manual_seed(0)
    K = 3
    uniform = torch.full((5, K), 1 / K, dtype=torch.float64)
    assert float(balance_loss([uniform])) == pytest.approx(K * math.log(K))
    logits = torch.randn(2, 7, K, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([1, 1, 0, 1, 1, 1, 0], dtype=torch.float64)

    def f(z):
        return balance_loss([torch.softmax(z[0], -1), torch.softmax(z[1], -1)], mask)

    assert torch.autograd.gradcheck(f, (logits,))  # analytic vs finite differences
    # The closed form: with q_k = sum_j m_j w_jk / M and s = sum_k q_k, the loss
    # -sum_k log(q_k / s) has d/dw_jk = (m_j / M) (K / s - 1 / q_k).
    w = torch.softmax(logits[0].detach(), -1).requires_grad_(True)
    balance_loss([w], mask).backward()
    M = mask.sum()
    q = (w.detach() * mask[:, None]).sum(0) / M
    s = q.sum()
    expected = mask[:, None] / M * (-1 / q + K / s)[None, :]
    torch.testing.assert_close(w.grad, expected)


@pytest.fixture(scope="module")
def experts(tokenizer, tmp_path_factory, tiny_base_dir):
    """Three random LoRA experts on the tiny base (different targets and ranks), on disk."""
    fp = load_base(str(tiny_base_dir)).fingerprint
    root = tmp_path_factory.mktemp("experts")
    specs = []
    kinds = [
        dict(r=4, lora_alpha=8),
        dict(r=2, lora_alpha=4, target_modules=["q_proj", "o_proj"]),
        dict(r=8, lora_alpha=8, use_rslora=True),
    ]
    for i, lora in enumerate(kinds):
        adapter = make_adapter(tokenizer, seed=10 + i, **lora)
        adapter.meta = {"base_fingerprint": fp}
        write_adapter(root / f"e{i}", adapter)
        specs.append((f"e{i}", str(root / f"e{i}")))
    return specs


def _random_gates(mole, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in mole.gates.parameters():
            p.copy_(3.0 * torch.randn(p.shape, generator=gen))


@pytest.mark.parametrize("variant", ["block", "outputs", "input"])
def test_mole_forward_equals_the_reference_and_masking(tokenizer, experts, input_ids, variant):
    mole = attach_mole(tiny(tokenizer), read_experts(experts), variant=variant, temperature=0.7)
    _random_gates(mole, seed=1)
    mole.gates.eval()
    with torch.no_grad():
        got = mole.model(input_ids=input_ids).logits
    want = reference_logits(tokenizer, experts, mole.gates, input_ids)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    base = tiny(tokenizer)(input_ids=input_ids).logits
    assert (got - base).abs().max() > 1e-2  # the experts really change the output

    mole.mask(["e1"])
    with torch.no_grad():
        masked = mole.model(input_ids=input_ids).logits
    keep = torch.tensor([True, False, True])
    torch.testing.assert_close(
        masked, reference_logits(tokenizer, experts, mole.gates, input_ids, keep), atol=ATOL, rtol=0
    )
    # Masking all but one expert is exactly that expert alone.
    mole.mask(["e0", "e2"])
    with torch.no_grad():
        only = mole.model(input_ids=input_ids).logits
        alone = attach(tiny(tokenizer), read_experts(experts)[1].adapter)(input_ids=input_ids)
    torch.testing.assert_close(only, alone.logits, atol=ATOL, rtol=0)
    with pytest.raises(MoleError, match="drops every expert"):
        mole.mask(["e0", "e1", "e2"])
    with pytest.raises(MoleError, match="not an expert"):
        mole.mask(["nope"])


def _cfg(tiny_base_dir, experts, data, out, **kw):
    defaults = dict(steps=4, lr=5e-2, batch_size=4, save_every=2, chat=False, train_limit=8)
    return MoleTrainConfig(
        base=str(tiny_base_dir), experts=experts, data=data, out=out, **{**defaults, **kw}
    )


def test_only_the_gates_get_gradients(tokenizer, experts, input_ids):
    from lorafleet.compose.mole_train import MoleStep
    from lorafleet.train import Batch, train_only

    mole = attach_mole(tiny(tokenizer), read_experts(experts), variant="input")
    step = MoleStep(balance_weight=0.5)
    groups = step.param_groups(mole.model)
    train_only(mole.model, groups)
    trainable = {n for n, p in mole.model.named_parameters() if p.requires_grad}
    assert trainable == {f"mole_gates.weight.{k}" for k in mole.gates.weight}
    assert len(trainable) == 8  # a gate per adapted layer: {q,v,o,down}_proj x 2 layers
    mole.model.train()
    inputs = {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "labels": input_ids,
    }
    out = step.loss(mole.model, Batch(inputs, num_items=input_ids.numel() - 1, share=1.0, step=0))
    out.loss.backward()
    for n, p in mole.model.named_parameters():
        assert (p.grad is not None and p.grad.abs().max() > 0) == (n in trainable), n
    assert float(out.logs["balance"].detach()) >= 3 * math.log(3) - 1e-6


@pytest.fixture(scope="module")
def two_tasks(tmp_path_factory):
    """Two small prompt/completion files (sums and echoes), 8 rows each."""
    root = tmp_path_factory.mktemp("mole-data")
    sums = [
        {"prompt": f"{a} plus {b} is", "completion": f" {a + b}"}
        for a in range(4)
        for b in range(2)
    ]
    words = [
        {"prompt": f"say {w}:", "completion": f" {w}"}
        for w in ["red", "blue", "green", "gold", "gray", "pink", "teal", "navy"]
    ]
    files = []
    for name, rows in (("sums", sums), ("words", words)):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        files.append(str(root / f"{name}.jsonl"))
    return files


def _metrics(out):
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def test_training_moves_only_the_gates_and_resume_equals_uninterrupted(
    tiny_base_dir, experts, two_tasks, tmp_path
):
    data = [two_tasks[0], f"{two_tasks[1]}@2"]  # sampled 1 : 2
    out = tmp_path / "mole"
    summary = train_mole(_cfg(tiny_base_dir, experts, data, out, balance_weight=0.1))
    assert summary["data"] == {two_tasks[0]: 4, two_tasks[1]: 8}
    config = json.loads((out / "mole_config.json").read_text())
    assert [e["name"] for e in config["experts"]] == ["e0", "e1", "e2"]
    assert config["variant"] == "block" and config["temperature"] == 1.0  # the paper's gate
    assert config["train"]["loss"] == "task-balanced"
    rows = _metrics(out)
    assert len(rows) == 4 and all("balance" in r and "tau" in r for r in rows)

    base = load_base(str(tiny_base_dir))
    mole = load_mole(out, base.model, base.fingerprint)
    # Initialised N(0, 0.01^2) (max |w| ~0.04 over these sizes): every block's gate moved,
    # and so did its learnable temperature (initialised at 1).
    assert min(float(w.detach().abs().max()) for w in mole.gates.weight.values()) > 0.1
    assert len(mole.gates.units) == 2  # one gate per block of the 2-block tiny model
    assert all(abs(t - 1.0) > 1e-3 for t in mole.gates.temperatures().values())

    # Ctrl-C during step 2 stops after it with a checkpoint; resume: the same gates and losses
    # as the uninterrupted run.
    split = tmp_path / "split"

    def interrupt(step):
        if step == 2:
            os.kill(os.getpid(), signal.SIGINT)

    first = train_mole(
        _cfg(tiny_base_dir, experts, data, split, balance_weight=0.1), on_step=interrupt
    )
    assert first["interrupted"] and first["checkpoint"].endswith("step-0000002.pt")
    assert not (split / "gates.safetensors").exists()
    train_mole(_cfg(tiny_base_dir, experts, data, split, balance_weight=0.1, resume=True))
    torch.testing.assert_close(
        torch.tensor([r["loss"] for r in _metrics(split)]),
        torch.tensor([r["loss"] for r in rows]),
        atol=1e-6,
        rtol=0,
    )
    g1, g2 = load_file(str(out / "gates.safetensors")), load_file(str(split / "gates.safetensors"))
    assert g1.keys() == g2.keys()
    for k in g1:
        torch.testing.assert_close(g1[k], g2[k], atol=1e-6, rtol=0)


def test_artifact_round_trip_and_its_refusals(
    tokenizer, experts, input_ids, tmp_path, tiny_base_dir
):
    import shutil

    fp = load_base(str(tiny_base_dir)).fingerprint

    from lorafleet.compose.mole import save_mole

    root = tmp_path / "experts"
    copied = []
    for name, path in experts:
        shutil.copytree(path, root / name)
        copied.append((name, str(root / name)))
    mole = attach_mole(tiny(tokenizer), read_experts(copied), variant="input", temperature=2.0)
    _random_gates(mole, seed=3)
    mole.gates.eval()
    out = save_mole(tmp_path / "moles" / "mix", mole, read_experts(copied), fp)
    config = json.loads((out / "mole_config.json").read_text())
    assert config["experts"][0]["path"] == "../../experts/e0"  # relative: the tree can move
    assert config["variant"] == "input" and config["temperature"] == 2.0
    with torch.no_grad():
        want = mole.model(input_ids=input_ids).logits
        loaded = load_mole(out, tiny(tokenizer), fp)
        torch.testing.assert_close(loaded.model(input_ids=input_ids).logits, want, atol=0, rtol=0)

    with pytest.raises(MoleError, match="gates trained on another base"):
        load_mole(out, tiny(tokenizer), "another-fingerprint")
    weights = root / "e1" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes() + b" ")
    with pytest.raises(MoleError, match=r"expert e1 .* changed since the gates were trained"):
        load_mole(out, tiny(tokenizer), fp)
    shutil.rmtree(root / "e1")
    with pytest.raises(MoleError, match="expert e1 is missing"):
        load_mole(out, tiny(tokenizer), fp)
