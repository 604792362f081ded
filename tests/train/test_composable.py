"""The trainer's public seams: a custom step (its own parameter groups, an extra logged loss),
in-memory examples, resume with a custom step, per-group learning rates."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from lorafleet.data import Example
from lorafleet.errors import LorafleetError
from lorafleet.train import (
    ParamGroup,
    StepOutput,
    TrainConfig,
    Trainer,
    example_set,
    latest_checkpoint,
    train_only,
)

RESUME_ATOL = 1e-6
FINAL_NORM = "model.norm.weight"  # a base weight outside the adapter: only the checkpoint has it


def _config(base, data, out, **kw):
    defaults = dict(batch_size=4, lr=5e-3, rank=4, alpha=8, chat=False, save_every=2, steps=6)
    return TrainConfig(base=str(base), data=str(data), out=out, **{**defaults, **kw})


def _train_rows(out):
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["split"] == "train"]


def _chosen(name: str) -> bool:
    return (".layers.0." in name and "lora_B" in name) or name.endswith(FINAL_NORM)


class SubsetStep:
    """Trains only layer 0's lora_B and the final norm, with an extra loss pulling the norm's
    mean towards 2 (weighted by the micro-batch's share, logged as "aux")."""

    def __init__(self):
        self.initial: dict[str, torch.Tensor] = {}

    def param_groups(self, model):
        self.initial = {n: p.detach().clone() for n, p in model.named_parameters()}
        return [ParamGroup("subset", [p for n, p in model.named_parameters() if _chosen(n)])]

    def loss(self, model, batch):
        lm = model(**batch.inputs, num_items_in_batch=batch.num_items).loss
        norm = next(p for n, p in model.named_parameters() if n.endswith(FINAL_NORM))
        aux = (norm.mean() - 2.0) ** 2
        return StepOutput(lm + batch.share * aux, {"aux": aux})


def test_custom_step_trains_only_its_parameters_and_logs_its_extra_loss(
    tiny_base_dir, arithmetic_file, tmp_path
):
    step = SubsetStep()
    trainer = Trainer(_config(tiny_base_dir, arithmetic_file, tmp_path / "subset"), step=step)
    trainer.run()
    changed = {
        n for n, p in trainer.model.named_parameters() if not torch.equal(p, step.initial[n])
    }
    chosen = {n for n in step.initial if _chosen(n)}
    assert len(chosen) > 2 and changed == chosen  # every chosen one moved, nothing else did

    rows = _train_rows(tmp_path / "subset")
    norm0 = next(v for n, v in step.initial.items() if n.endswith(FINAL_NORM))
    first_aux = float((norm0.mean() - 2.0) ** 2)
    assert rows[0]["aux"] == pytest.approx(first_aux, rel=1e-5)
    assert rows[-1]["aux"] < rows[0]["aux"]  # the extra loss is being trained down

    # The logged loss is the language-model loss plus the extra term (same first batch).
    plain = tmp_path / "plain"
    Trainer(_config(tiny_base_dir, arithmetic_file, plain, steps=1)).run()
    lm_first = _train_rows(plain)[0]["loss"]
    assert rows[0]["loss"] == pytest.approx(lm_first + first_aux, abs=1e-5)


def _adapter(out):
    return load_file(str(out / "adapter_model.safetensors"))


def test_in_memory_examples_train_the_same_adapter_as_the_file(
    tiny_base_dir, arithmetic_file, tmp_path
):
    rows = [json.loads(line) for line in arithmetic_file.read_text().splitlines()]
    from_file = tmp_path / "file"
    Trainer(_config(tiny_base_dir, arithmetic_file, from_file, steps=4)).run()
    from_rows = tmp_path / "rows"
    Trainer(_config(tiny_base_dir, "sums", from_rows, steps=4), examples=rows).run()
    objects = [Example(prompt=r["prompt"], target=r["completion"]) for r in rows]
    from_objects = tmp_path / "objects"
    Trainer(_config(tiny_base_dir, "sums", from_objects, steps=4), examples=objects).run()

    expected = _adapter(from_file)
    for out in (from_rows, from_objects):
        got = _adapter(out)
        assert got.keys() == expected.keys()
        for key in expected:
            assert torch.equal(got[key], expected[key]), key
    assert json.loads((from_rows / "train_config.json").read_text())["data"] == "sums"


def test_resume_equals_uninterrupted_with_a_custom_step(tiny_base_dir, arithmetic_file, tmp_path):
    # Dropout puts the RNG into what must be restored; the final norm is trained but lives
    # outside the adapter, so only the checkpoint's trainable state can bring it back.
    straight = tmp_path / "straight"
    whole = Trainer(
        _config(tiny_base_dir, arithmetic_file, straight, dropout=0.1), step=SubsetStep()
    )
    whole.run()

    split = tmp_path / "split"
    first = Trainer(_config(tiny_base_dir, arithmetic_file, split, dropout=0.1), step=SubsetStep())
    first.on_step = lambda step, loss: first.request_stop() if step == 3 else None
    assert first.run()["interrupted"]
    assert latest_checkpoint(split).name == "step-0000003"
    resumed = Trainer(
        _config(tiny_base_dir, arithmetic_file, split, dropout=0.1, resume=True), step=SubsetStep()
    )
    resumed.run()

    a, b = _train_rows(split), _train_rows(straight)
    assert len(a) == len(b) == 6
    for key in ("loss", "aux"):
        got, want = torch.tensor([r[key] for r in a]), torch.tensor([r[key] for r in b])
        torch.testing.assert_close(got, want, atol=RESUME_ATOL, rtol=0)
    mine, theirs = dict(resumed.model.named_parameters()), dict(whole.model.named_parameters())
    for name in (n for n in mine if _chosen(n)):
        torch.testing.assert_close(mine[name], theirs[name], atol=RESUME_ATOL, rtol=0)


class TwoRatesStep:
    """Layer 0's lora_B at one learning rate, layer 1's at ten times it."""

    def param_groups(self, model):
        def b_of(layer):
            return [
                p for n, p in model.named_parameters() if f".layers.{layer}." in n and "lora_B" in n
            ]

        return [ParamGroup("slow", b_of(0), lr=1e-3), ParamGroup("fast", b_of(1), lr=1e-2)]

    def loss(self, model, batch):
        return model(**batch.inputs, num_items_in_batch=batch.num_items).loss


def test_two_parameter_groups_reach_the_optimizer_with_their_rates(
    tiny_base_dir, arithmetic_file, tmp_path
):
    out = tmp_path / "rates"
    trainer = Trainer(
        _config(tiny_base_dir, arithmetic_file, out, steps=2, warmup=0.0, max_grad_norm=0.0),
        step=TwoRatesStep(),
    )
    before, after = {}, {}

    def snapshot(step, loss):
        if step == 1:
            after.update({n: p.detach().clone() for n, p in trainer.model.named_parameters()})

    trainer.on_step = snapshot
    trainer.setup = _wrap_setup(trainer, before)
    trainer.run()
    groups = trainer.optimizer.param_groups
    assert [(g["name"], g["initial_lr"]) for g in groups] == [("slow", 1e-3), ("fast", 1e-2)]
    # Adam's first update moves each weight with a non-zero gradient by about its group's lr.
    for layer, lr in ((0, 1e-3), (1, 1e-2)):
        moved = max(
            float((after[n] - before[n]).abs().max())
            for n in before
            if f".layers.{layer}." in n and "lora_B" in n
        )
        assert moved == pytest.approx(lr, rel=1e-3)
    row = _train_rows(out)[0]  # after step 1 of 2 the cosine factor is 0.5
    assert row["lr_slow"] == pytest.approx(5e-4) and row["lr_fast"] == pytest.approx(5e-3)
    frozen = [n for n, p in trainer.model.named_parameters() if "lora_A" in n]
    assert frozen and all(torch.equal(after[n], before[n]) for n in frozen)


def _wrap_setup(trainer, before):
    setup = trainer.setup

    def wrapped():
        setup()
        before.update({n: p.detach().clone() for n, p in trainer.model.named_parameters()})

    return wrapped


def test_in_memory_rows_report_bad_rows_by_index(tokenizer):
    rows = [{"prompt": "a", "completion": "b"}, {"prompt": "c"}]
    with pytest.raises(LorafleetError, match=r"^synthetic\[1\]: missing field \"completion\""):
        example_set(rows, tokenizer, name="synthetic", chat=False)
    with pytest.raises(LorafleetError, match="all Example objects or all dict rows"):
        example_set([rows[0], Example("p", "t")], tokenizer, name="mixed")
    with pytest.raises(LorafleetError, match="no examples"):
        example_set([], tokenizer, name="empty")
    loaded = example_set(rows[:1], tokenizer, name="synthetic", chat=False)
    assert loaded.examples == [Example("a", "b", source="synthetic[0]")]


def test_parameter_groups_are_checked(tiny_model):
    weights = list(tiny_model.parameters())
    with pytest.raises(LorafleetError, match="has no parameters"):
        ParamGroup("empty", [])
    with pytest.raises(LorafleetError, match="lr must be positive"):
        ParamGroup("bad", weights[:1], lr=0.0)
    with pytest.raises(LorafleetError, match="both group 'a' and 'b'"):
        train_only(tiny_model, [ParamGroup("a", weights[:2]), ParamGroup("b", weights[1:3])])
    train_only(tiny_model, [ParamGroup("a", weights[:2])])
    assert [p.requires_grad for p in weights[:3]] == [True, True, False]


def test_a_step_without_the_protocol_is_refused(tiny_base_dir, arithmetic_file, tmp_path):
    with pytest.raises(LorafleetError, match="param_groups"):
        Trainer(_config(tiny_base_dir, arithmetic_file, tmp_path / "x"), step=object())
