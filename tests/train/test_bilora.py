"""BiLoRA: P diag(lambda) Q, the bi-level steps (first / second order, joint control), the D1/D2
split, resume, and the adapter saved as plain LoRA that PEFT loads with the same logits."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import train_args
from helpers import logits
from peft import PeftModel
from safetensors import safe_open
from torch.func import functional_call

from lorafleet.adapters import MethodConfig, new_adapter
from lorafleet.errors import LorafleetError
from lorafleet.layers.bilora import add_pseudo_svd, orthogonality
from lorafleet.models import load_base
from lorafleet.train import TrainConfig, Trainer
from lorafleet.train.bilora import (
    BilevelBatch,
    BiLoRAConfig,
    BiLoRAStep,
    BiLoRATrainer,
    bilora_options,
    phase,
    split_indices,
)

ATOL = 1e-5


def _config(base, data, out, **kw):
    defaults = dict(
        batch_size=4,
        lr=2e-2,
        rank=4,
        chat=False,
        save_every=2,
        steps=6,
        method="bilora",
        warmup=0.0,
    )
    return TrainConfig(base=str(base), data=str(data), out=out, **{**defaults, **kw})


def _bilora_model(tokenizer_len, seed=0):
    from lorafleet.models.tiny import tiny_llama

    model = new_adapter(tiny_llama(0, vocab_size=tokenizer_len), MethodConfig("bilora", rank=4))
    return model, add_pseudo_svd(model, seed=seed)


def test_pseudo_svd_starts_at_the_base_and_computes_p_lambda_q(tokenizer, input_ids):
    from lorafleet.models.tiny import tiny_llama

    base = logits(tiny_llama(0, vocab_size=len(tokenizer)), input_ids)
    model, layers = _bilora_model(len(tokenizer))
    assert model.peft_config["default"].lora_alpha == 4  # alpha = r: scale exactly 1
    assert torch.equal(logits(model, input_ids), base)  # lambda = 0: exactly the base
    assert float(orthogonality(layers).detach()) < 1e-9  # P, Q start orthonormal
    part = layers["model.layers.0.mlp.down_proj"]
    with torch.no_grad():
        part.lam.copy_(torch.tensor([0.5, -1.0, 2.0, 0.25]))
    x = torch.randn(3, part.Q.shape[1])
    W = part.layer.base_layer.weight
    want = x @ (W + part.P @ torch.diag(part.lam) @ part.Q).T
    torch.testing.assert_close(part.layer(x), want.detach(), atol=ATOL, rtol=0)


def test_split_is_seeded_stable_and_disjoint():
    d1, d2 = split_indices(50, 0.8, seed=3)
    assert (len(d1), len(d2)) == (40, 10) and not set(d1) & set(d2)
    assert sorted(d1 + d2) == list(range(50))
    assert split_indices(50, 0.8, seed=3) == (d1, d2)
    assert split_indices(50, 0.8, seed=4) != (d1, d2)
    assert [len(x) for x in split_indices(2, 0.99, 0)] == [1, 1]


def test_options_are_checked():
    assert bilora_options("bilora") == {
        "bilevel": "first",
        "bilevel_split": 0.8,
        "ortho_weight": 0.1,
        "lambda_lr": 0.05,
        "warm_start": 0,
    }
    assert bilora_options("bilora", lambda_lr=0.1, warm_start=3)["lambda_lr"] == 0.1
    assert bilora_options("lora") == {}
    with pytest.raises(LorafleetError, match="^--bilevel-split applies to --method bilora only"):
        bilora_options("lora", bilevel_split=0.5)
    with pytest.raises(LorafleetError, match="--bilevel must be one of first, second, joint"):
        bilora_options("bilora", bilevel="third")
    with pytest.raises(LorafleetError, match=r"--bilevel-split must be in \(0, 1\)"):
        bilora_options("bilora", bilevel_split=1.0)
    with pytest.raises(LorafleetError, match="--lambda-lr must be > 0, got 0"):
        bilora_options("bilora", lambda_lr=0)
    with pytest.raises(LorafleetError, match="--warm-start must be >= 0, got -1"):
        bilora_options("bilora", warm_start=-1)
    with pytest.raises(LorafleetError, match="--warm-start applies to --bilevel first | second"):
        bilora_options("bilora", bilevel="joint", warm_start=2)
    with pytest.raises(LorafleetError, match="^--lambda-lr applies to --method bilora only"):
        bilora_options("lora", lambda_lr=0.1)


def test_phase_is_joint_for_the_warm_start_then_upper_first():
    assert [phase(s) for s in range(4)] == ["upper", "lower", "upper", "lower"]
    assert [phase(s, warm_start=3) for s in range(6)] == ["joint"] * 3 + [
        "upper",
        "lower",
        "upper",
    ]


def _snapshots(trainer):
    """{step: {parameter name: value}} after every optimizer step (and 0: after setup)."""
    seen = {}
    setup = trainer.setup

    def wrapped():
        setup()
        seen[0] = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}

    trainer.setup = wrapped
    trainer.on_step = lambda step, loss: seen.__setitem__(
        step, {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    )
    return seen


def _moved(before, after, marker):
    return [n for n in before if marker in n and not torch.equal(before[n], after[n])]


def test_first_order_alternates_levels_and_saves_plain_lora_peft_loads(
    tiny_base_dir, arithmetic_file, tmp_path
):
    out = tmp_path / "bilora"
    cfg = _config(tiny_base_dir, arithmetic_file, out, steps=4, extra={"ortho_weight": 1.0})
    trainer = BiLoRATrainer(cfg)
    seen = _snapshots(trainer)
    trainer.run()
    assert trainer.split_sizes == (13, 3)  # 16 rows, 0.8 in D1
    for step in range(1, 5):  # step k is optimizer step k-1: even ones update lambda only
        before, after = seen[step - 1], seen[step]
        values, vectors = _moved(before, after, "pseudo_sv"), _moved(before, after, "lora_")
        if (step - 1) % 2 == 0:
            assert len(values) == 14 and not vectors, step
        else:
            assert len(vectors) == 28 and not values, step
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["upper"] for r in rows if r["split"] == "train"] == [1.0, 0.0] * 2

    # The saved adapter is plain LoRA (scale 1) and PEFT gives the trained module's logits.
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["lora_alpha"] == config["r"] == 4
    with safe_open(str(out / "adapter_model.safetensors"), framework="pt") as f:
        meta = json.loads(f.metadata()["lorafleet"])
        assert not any("pseudo_sv" in k for k in f.keys())  # noqa: SIM118
    assert meta["method"] == "bilora" and meta["bilora"]["bilevel"] == "first"
    assert meta["bilora"]["split_sizes"] == [13, 3]
    ids = trainer.collate([trainer.train[0]])["input_ids"]
    trained = logits(trainer.model.eval(), ids)
    assert (trained - logits(load_base(str(tiny_base_dir)).model, ids)).abs().max() > 1e-3
    theirs = PeftModel.from_pretrained(load_base(str(tiny_base_dir)).model, out).eval()
    torch.testing.assert_close(logits(theirs, ids), trained, atol=ATOL, rtol=0)


def test_lambda_has_its_own_learning_rate(tiny_base_dir, arithmetic_file, tmp_path):
    """Adam's first step moves every coordinate by its group's lr (times sign(grad)): step 0
    (upper) moves each lambda by lambda_lr, step 1 (lower) P and Q by at most the run's lr."""
    cfg = _config(
        tiny_base_dir, arithmetic_file, tmp_path / "lr", lr=1e-3, steps=2, extra={"lambda_lr": 0.05}
    )
    trainer = BiLoRATrainer(cfg)
    seen = _snapshots(trainer)
    trainer.run()
    groups = {g["name"]: g for g in trainer.optimizer.param_groups}
    assert groups["values"]["initial_lr"] == 0.05 and groups["vectors"]["initial_lr"] == 1e-3
    lam = torch.cat([(seen[1][n] - seen[0][n]).flatten() for n in seen[0] if "pseudo_sv" in n])
    assert lam.numel() == 14 * 4
    torch.testing.assert_close(lam.abs(), torch.full_like(lam, 0.05), rtol=1e-3, atol=0)
    vec = torch.cat([(seen[2][n] - seen[1][n]).flatten() for n in seen[0] if "lora_" in n])
    assert 0.5e-3 < float(vec.abs().max()) <= 1.001e-3


def test_warm_start_trains_everything_on_d1_then_alternates(
    tiny_base_dir, arithmetic_file, tmp_path
):
    out = tmp_path / "warm"
    cfg = _config(tiny_base_dir, arithmetic_file, out, steps=5, extra={"warm_start": 2})
    trainer = BiLoRATrainer(cfg)
    seen = _snapshots(trainer)
    trainer.run()
    moved = [
        (len(_moved(seen[k - 1], seen[k], "pseudo_sv")), len(_moved(seen[k - 1], seen[k], "lora_")))
        for k in range(1, 6)
    ]
    # steps 0, 1 joint (lambda moves at step 0, P and Q once lambda is no longer 0),
    # then upper (lambda), lower (P, Q), upper
    assert moved[0][0] == 14 and moved[1] == (14, 28)
    assert moved[2:] == [(14, 0), (0, 28), (14, 0)]
    kinds = [type(next(trainer.batches.for_step(k))) for k in range(5)]
    assert [k is BilevelBatch for k in kinds] == [False, False, True, False, True]  # D1, D2
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["upper"] for r in rows if r["split"] == "train"] == [0.0, 0.0, 1.0, 0.0, 1.0]


def _max_delta_norm(model) -> float:
    """max over adapted linears of ||delta W||_2 (s B A for LoRA, P diag(lambda) Q for BiLoRA)."""
    from peft.tuners.lora import LoraLayer

    from lorafleet.layers.bilora import pseudo_svd_layers

    with torch.no_grad():
        parts = pseudo_svd_layers(model)
        if parts:
            deltas = [p.delta() for p in parts.values()]
        else:
            deltas = [
                m.get_delta_weight("default") for m in model.modules() if isinstance(m, LoraLayer)
            ]
        return max(float(torch.linalg.matrix_norm(d, ord=2)) for d in deltas)


def test_default_bilora_moves_the_weights_about_as_far_as_lora(
    tiny_base_dir, arithmetic_file, tmp_path
):
    """At the run's lr (1e-3) and the default lambda_lr, first-order BiLoRA's delta W grows to
    the same order as a LoRA's in the same steps; with lambda at the run's lr (the old
    behaviour) it stays over 10x smaller."""
    kw = dict(lr=1e-3, steps=12, warmup=0.0)
    lora = Trainer(
        _config(tiny_base_dir, arithmetic_file, tmp_path / "l", method="lora", alpha=8, **kw)
    )
    lora.run()
    bilora = BiLoRATrainer(_config(tiny_base_dir, arithmetic_file, tmp_path / "b", **kw))
    bilora.run()
    old = BiLoRATrainer(
        _config(tiny_base_dir, arithmetic_file, tmp_path / "o", extra={"lambda_lr": 1e-3}, **kw)
    )
    old.run()
    ref = _max_delta_norm(lora.model)
    assert 0.3 < _max_delta_norm(bilora.model) / ref < 3
    assert _max_delta_norm(old.model) / ref < 0.1


def test_joint_control_updates_everything_every_step(tiny_base_dir, arithmetic_file, tmp_path):
    trainer = BiLoRATrainer(
        _config(
            tiny_base_dir, arithmetic_file, tmp_path / "joint", steps=2, extra={"bilevel": "joint"}
        )
    )
    seen = _snapshots(trainer)
    trainer.run()
    assert trainer.split_sizes is None
    assert len(_moved(seen[1], seen[2], "pseudo_sv")) == 14
    assert len(_moved(seen[1], seen[2], "lora_")) == 28


def test_resume_equals_uninterrupted(tiny_base_dir, arithmetic_file, tmp_path):
    kw = dict(dropout=0.1, steps=4, extra={"bilevel": "first"})
    whole = BiLoRATrainer(_config(tiny_base_dir, arithmetic_file, tmp_path / "a", **kw))
    whole.run()
    first = BiLoRATrainer(_config(tiny_base_dir, arithmetic_file, tmp_path / "b", **kw))
    first.on_step = lambda step, loss: first.request_stop() if step == 2 else None
    assert first.run()["interrupted"]
    resumed = BiLoRATrainer(
        _config(tiny_base_dir, arithmetic_file, tmp_path / "b", resume=True, **kw)
    )
    resumed.run()
    mine, theirs = dict(resumed.model.named_parameters()), dict(whole.model.named_parameters())
    trained = [n for n in mine if "pseudo_sv" in n or "lora_" in n]
    assert len(trained) == 42
    for name in trained:
        torch.testing.assert_close(mine[name], theirs[name], atol=1e-6, rtol=0, msg=name)


def test_second_order_hypergradient_matches_exact_autograd(
    tiny_base_dir, arithmetic_file, tmp_path
):
    """The finite-difference hypergradient equals d/dlambda L2(V - xi grad_V L1(V, lambda),
    lambda) computed exactly by double backward."""
    trainer = BiLoRATrainer(
        _config(
            tiny_base_dir,
            arithmetic_file,
            tmp_path / "h",
            extra={"bilevel": "second", "ortho_weight": 0.5},
        )
    )
    trainer.setup()
    model, xi = trainer.model, 0.5
    model.base_model.model.set_attn_implementation("eager")  # SDPA on CPU has no double backward
    layers = {n: p for n, p in model.named_parameters() if "pseudo_sv" in n or "lora_" in n}
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # away from lambda = 0, where the second-order term vanishes
        for p in layers.values():
            p.add_(0.3 * torch.randn(p.shape, generator=gen))
    upper = next(trainer.batches.for_step(0))
    assert upper.lower is not None
    assert not torch.equal(upper.inputs["input_ids"], upper.lower.inputs["input_ids"])

    step = BiLoRAStep(BiLoRAConfig("second", ortho_weight=0.5), xi=xi)
    step.loss(model, upper).loss.backward()
    got = {n: p.grad.clone() for n, p in layers.items() if "pseudo_sv" in n}
    assert all(p.grad is None for n, p in layers.items() if "lora_" in n)  # lambda only

    lam_names = list(got)
    v_names = [n for n in layers if "lora_" in n]
    params = {n: layers[n] for n in lam_names + v_names}
    from lorafleet.layers.bilora import pseudo_svd_layers

    def l1(p):
        kwargs = {**upper.lower.inputs, "num_items_in_batch": upper.lower.num_items}
        return functional_call(model, p, args=(), kwargs=kwargs).loss

    lam = {n: params[n] for n in lam_names}
    V = {n: params[n] for n in v_names}
    lower = l1({**lam, **V}) + upper.lower.share * 0.5 * orthogonality(pseudo_svd_layers(model))
    g_v = torch.autograd.grad(lower, list(V.values()), create_graph=True)
    V2 = {n: v - xi * g for (n, v), g in zip(V.items(), g_v, strict=True)}
    out = functional_call(
        model,
        {**lam, **V2},
        args=(),
        kwargs={**upper.inputs, "num_items_in_batch": upper.num_items},
    )
    exact = torch.autograd.grad(out.loss, list(lam.values()))
    for name, want in zip(lam_names, exact, strict=True):
        torch.testing.assert_close(got[name], want, atol=2e-4, rtol=2e-2, msg=name)


def test_cli_trains_bilora_second_order_and_refuses_stray_options(
    tiny_base_dir, arithmetic_file, tmp_path, run_cli
):
    out = tmp_path / "cli"
    args = train_args(tiny_base_dir, arithmetic_file, out, "--method", "bilora", "--steps", "3")
    code, stdout, _ = run_cli(
        *args,
        "--bilevel",
        "second",
        "--bilevel-split",
        "0.75",
        "--lambda-lr",
        "0.02",
        "--warm-start",
        "1",
    )
    assert code == 0 and "adapter written" in stdout
    saved = json.loads((out / "train_config.json").read_text())["extra"]
    assert saved == {
        "bilevel": "second",
        "bilevel_split": 0.75,
        "ortho_weight": 0.1,
        "lambda_lr": 0.02,
        "warm_start": 1,
    }
    code, _, err = run_cli(
        *train_args(tiny_base_dir, arithmetic_file, tmp_path / "x"), "--bilevel", "first"
    )
    assert code == 2 and err.strip().splitlines() == [
        "lorafleet: error: --bilevel applies to --method bilora only"
    ]
