"""MoLE's paper gate (one per transformer block, learnable temperature), its balancing loss on a
hand case, task-balanced training (batches and loss by hand), and old MoLE dirs still loading."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
from compose_helpers import make_adapter, tiny
from safetensors.torch import load_file

from lorafleet.adapters import write_adapter
from lorafleet.compose.mole import MoleError, attach_mole, load_mole, read_experts, save_mole
from lorafleet.compose.mole_balance import row_losses as mole_row_losses
from lorafleet.compose.mole_balance import task_balanced, task_slots
from lorafleet.compose.mole_serve import read_gates
from lorafleet.compose.mole_train import MoleStep
from lorafleet.layers.mole import MoleGates, balance_loss, block_of, group_blocks
from lorafleet.train import Batch, OptimizerConfig, build_optimizer, train_only

LAYERS = [f"model.layers.{b}.{m}" for b in (0, 1) for m in ("self_attn.q_proj", "mlp.down_proj")]


@pytest.fixture(scope="module")
def experts(tokenizer, tmp_path_factory):
    root = tmp_path_factory.mktemp("block-experts")
    specs = []
    for i, lora in enumerate([dict(r=4, lora_alpha=8), dict(r=2, lora_alpha=4)]):
        write_adapter(root / f"e{i}", make_adapter(tokenizer, seed=80 + i, **lora))
        specs.append((f"e{i}", str(root / f"e{i}")))
    return specs


def test_blocks_shapes_and_one_weight_per_block():
    assert block_of("model.layers.3.self_attn.q_proj") == "model.layers.3"
    assert block_of("lm_head") == "lm_head"
    assert group_blocks(LAYERS) == {
        "model.layers.0": LAYERS[:2],
        "model.layers.1": LAYERS[2:],
    }
    dims = {n: (8, 6) if "q_proj" in n else (16, 8) for n in LAYERS}
    gates = MoleGates(dims, 3, variant="block", temperature=0.5)
    assert gates.units == ["model.layers.0", "model.layers.1"]
    # W over the anchor's (q_proj's) K x d_out expert outputs; one learnable tau per block.
    assert tuple(gates.weight["model__layers__0"].shape) == (3, 3 * 6)
    assert tuple(gates.log_temperature["model__layers__0"].shape) == (1,)
    assert gates.temperatures()["model.layers.1"] == pytest.approx(0.5)
    x, deltas = torch.randn(5, 8), torch.randn(5, 3, 6)
    w = gates("model.layers.0.self_attn.q_proj", x, (1, 2, 3), deltas)
    assert w.shape == (5, 3) and torch.allclose(w.sum(-1), torch.ones(5))
    # The block's later layer reuses the anchor's weights, whatever its own inputs.
    later = gates(
        "model.layers.0.mlp.down_proj", torch.randn(5, 16), (1, 2, 3), torch.randn(5, 3, 8)
    )
    assert torch.equal(later, w)
    with pytest.raises(ValueError, match="must run before"):
        gates("model.layers.1.mlp.down_proj", torch.randn(5, 16), (1, 2, 3), torch.randn(5, 3, 8))
    with pytest.raises(ValueError, match="gate variant"):
        MoleGates(dims, 3, variant="sideways")


def test_balance_loss_hand_case():
    # q = mean over rows = (0.5, 0.25, 0.25) (sums to 1): -sum log q = log 2 + 2 log 4 = 5 log 2.
    w = torch.tensor([[0.5, 0.5, 0.0], [0.5, 0.0, 0.5]], dtype=torch.float64)
    assert float(balance_loss([w])) == pytest.approx(5 * math.log(2))
    # Two gates: the mean of their losses (uniform: 3 log 3).
    u = torch.full((4, 3), 1 / 3, dtype=torch.float64)
    assert float(balance_loss([w, u])) == pytest.approx((5 * math.log(2) + 3 * math.log(3)) / 2)


def test_block_gate_differs_from_per_linear_and_tau_learns(tokenizer, experts, input_ids):
    block = attach_mole(tiny(tokenizer), read_experts(experts), variant="block")
    linear = attach_mole(tiny(tokenizer), read_experts(experts), variant="linear")
    assert len(block.gates.units) == 2 and len(linear.gates.units) == 6  # 2 blocks x {q,v,down}
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for u in block.gates.units:  # the same W at the anchors: only the gating unit differs
            W = 3.0 * torch.randn(block.gates.weight[u.replace(".", "__")].shape, generator=gen)
            block.gates.weight[u.replace(".", "__")].copy_(W)
            linear.gates.weight[f"{u}.self_attn.q_proj".replace(".", "__")].copy_(W)
    seen = {}

    def spy(gates, tag):
        def fn(layer, x, slots, deltas=None):
            w = gates.weights(layer, x, deltas, gates.keep, gates.cache)
            seen[(tag, layer.rsplit(".", 1)[-1])] = w.detach().clone()
            return w

        return fn

    for mole, tag in ((block, "block"), (linear, "linear")):
        mole.gates.eval()
        mole.gates.forward = spy(mole.gates, tag)
        with torch.no_grad():
            seen[(tag, "logits")] = mole.model(input_ids=input_ids).logits
    # Per block: q_proj, v_proj and down_proj of block 1 get the same weights; per linear not.
    assert torch.equal(seen[("block", "q_proj")], seen[("block", "down_proj")])
    assert not torch.allclose(seen[("linear", "q_proj")], seen[("linear", "down_proj")])
    assert (seen[("block", "logits")] - seen[("linear", "logits")]).abs().max() > 1e-3

    # The learnable temperature gets a gradient from the task loss and moves under AdamW.
    mole = attach_mole(tiny(tokenizer), read_experts(experts), variant="block")
    step = MoleStep(balance_weight=0.5)
    groups = step.param_groups(mole.model)
    train_only(mole.model, groups)
    opt = build_optimizer(groups, OptimizerConfig(lr=0.05))
    mole.model.train()
    inputs = {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "labels": input_ids,
        "task_ids": torch.zeros(1, dtype=torch.long),
    }
    for i in range(3):
        out = step.loss(mole.model, Batch(inputs, num_items=1, share=1.0, step=i))
        out.loss.backward()
        grads = [p.grad for p in mole.gates.log_temperature.values()]
        assert all(g is not None and float(g.abs().max()) > 0 for g in grads)
        opt.step()
        opt.zero_grad()
    assert all(abs(t - 1.0) > 1e-3 for t in mole.gates.temperatures().values())
    assert {"balance", "task_loss", "task0", "tau"} <= set(out.logs)


def test_row_losses_and_task_balancing_by_hand():
    # Two rows over a 4-token vocabulary; logits chosen so each target's loss is known.
    V, ln = 4, math.log
    labels = torch.tensor([[-100, 1, 2, -100], [-100, -100, 3, 0]])
    full = torch.zeros(2, 4, V)  # uniform: loss ln 4
    full[0, 1, 2] = ln(3.0) + 0.0  # p(2) = 3/6 at row 0, pos 1 -> loss ln 2
    full[1, 2, 0] = ln(7.0)  # p(0) = 7/10 at row 1, pos 2 -> loss ln(10/7)

    class Fake(torch.nn.Module):
        def forward(self, input_ids, attention_mask, logits_to_keep):
            assert logits_to_keep.dtype == torch.bool
            return SimpleNamespace(logits=full[logits_to_keep][None])

    inputs = {"input_ids": torch.zeros(2, 4, dtype=torch.long), "labels": labels}
    inputs["attention_mask"] = torch.ones(2, 4, dtype=torch.long)
    got = mole_row_losses(Fake(), inputs)
    # row 0 predicts 1 (pos 0: ln 4) and 2 (pos 1: ln 2); row 1 predicts 3 (pos 1: ln 4) and
    # 0 (pos 2: ln 10/7).
    want = torch.tensor([(ln(4) + ln(2)) / 2, (ln(4) + ln(10 / 7)) / 2])
    torch.testing.assert_close(got, want)

    # Task 0 has 3 rows (one long-answer row would dominate a token mean), task 1 one row:
    # mean(mean(1, 2, 3), 10) = 6, not the row mean 4.
    rows = torch.tensor([1.0, 2.0, 3.0, 10.0])
    loss, per_task = task_balanced(rows, torch.tensor([0, 0, 0, 1]))
    assert float(loss) == pytest.approx(6.0)
    assert {k: float(v) for k, v in per_task.items()} == {0: 2.0, 1: 10.0}
    assert float(task_balanced(rows, None)[0]) == pytest.approx(4.0)


def test_task_batches_one_micro_batch_per_task(tokenizer):
    from lorafleet.compose.mole_balance import TASK_KEY, TaskBatches
    from lorafleet.data.encode import Encoded

    short = [Encoded([1, 2, 3], [-100, 2, 3]) for _ in range(4)]
    long = [Encoded(list(range(1, 21)), [-100] * 10 + list(range(11, 21))) for _ in range(2)]
    batches = list(TaskBatches([short, long], batch_size=4, pad_token_id=0).for_step(0))
    assert [b.inputs[TASK_KEY].tolist() for b in batches] == [[0, 0], [1, 1]]
    # Each task padded to its own rows only; the shares make the step a mean over tasks.
    assert [b.inputs["input_ids"].shape[1] for b in batches] == [3, 20]
    assert [b.share for b in batches] == [0.5, 0.5]


def test_task_slots_are_even_and_cover_every_row():
    counts = [5, 2, 9]
    for step in range(6):
        picks = task_slots(counts, 12, step, seed=3)
        assert [sum(t == k for t, _ in picks) for k in range(3)] == [4, 4, 4]
        assert picks == task_slots(counts, 12, step, seed=3)  # a pure function of the step
    # Task 2 (9 rows) gets 4 draws a step: 9 consecutive draws are one pass, every row once.
    draws = [i for step in range(6) for t, i in task_slots(counts, 12, step, 3) if t == 2]
    assert sorted(draws[:9]) == list(range(9))
    with pytest.raises(ValueError, match="at least one"):
        task_slots([3, 0], 4, 0, 0)


def test_block_round_trip_and_old_outputs_dirs_still_load(tokenizer, experts, input_ids, tmp_path):
    mole = attach_mole(tiny(tokenizer), read_experts(experts), variant="block", temperature=0.7)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in mole.gates.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    mole.gates.eval()
    out = save_mole(tmp_path / "block", mole, read_experts(experts), None)
    config = json.loads((out / "mole_config.json").read_text())
    assert config["variant"] == "block" and set(config["blocks"]) == set(mole.gates.units)
    saved = load_file(str(out / "gates.safetensors"))
    assert {k.rsplit(".", 1)[1] for k in saved} == {"gate", "log_temperature"}
    with torch.no_grad():
        want = mole.model(input_ids=input_ids).logits
        got = load_mole(out, tiny(tokenizer)).model(input_ids=input_ids).logits
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    assert read_gates(out).temperatures() == pytest.approx(mole.gates.temperatures())

    # A MoLE dir written before the block gate ("outputs" = today's linear) loads as linear.
    old = attach_mole(tiny(tokenizer), read_experts(experts), variant="linear")
    old_dir = save_mole(tmp_path / "old", old, read_experts(experts), None)
    cfg = json.loads((old_dir / "mole_config.json").read_text())
    (old_dir / "mole_config.json").write_text(json.dumps({**cfg, "variant": "outputs"}))
    assert load_mole(old_dir, tiny(tokenizer)).gates.variant == "linear"
    assert read_gates(old_dir).variant == "linear"
    # Gates of another kind than the config says: one line naming the file.
    (old_dir / "mole_config.json").write_text(json.dumps({**cfg, "variant": "block"}))
    with pytest.raises(MoleError, match="gates.safetensors"):
        load_mole(old_dir, tiny(tokenizer))
    (old_dir / "mole_config.json").write_text(json.dumps({**cfg, "variant": "sideways"}))
    with pytest.raises(MoleError, match="gate variant must be one of block, linear, input"):
        load_mole(old_dir, tiny(tokenizer))
