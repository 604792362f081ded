"""Training options: epochs, bf16, gradient checkpointing, packing, and bad values via the CLI."""

from __future__ import annotations

import json

import pytest
from conftest import train_args

from lorafleet.train import TrainConfig, Trainer


def _first_losses(out, n=2):
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if r["split"] == "train"][:n]


def _cfg(base, data, out, **kw):
    return TrainConfig(
        base=str(base),
        data=str(data),
        out=out,
        batch_size=4,
        rank=4,
        alpha=8,
        chat=False,
        lr=5e-3,
        **kw,
    )


def test_epochs_set_the_number_of_steps(tiny_base_dir, arithmetic_file, tmp_path):
    result = Trainer(_cfg(tiny_base_dir, arithmetic_file, tmp_path / "r", epochs=1.0)).run()
    assert result["total_steps"] == 4  # 16 examples / global batch 4


def test_gradient_checkpointing_gives_the_same_losses(tiny_base_dir, arithmetic_file, tmp_path):
    plain = tmp_path / "plain"
    Trainer(_cfg(tiny_base_dir, arithmetic_file, plain, steps=2)).run()
    ckpt = tmp_path / "ckpt"
    Trainer(_cfg(tiny_base_dir, arithmetic_file, ckpt, steps=2, gradient_checkpointing=True)).run()
    assert _first_losses(ckpt) == pytest.approx(_first_losses(plain), abs=1e-5)


def test_bf16_autocast_trains_close_to_fp32(tiny_base_dir, arithmetic_file, tmp_path):
    fp32 = tmp_path / "fp32"
    Trainer(_cfg(tiny_base_dir, arithmetic_file, fp32, steps=1)).run()
    bf16 = tmp_path / "bf16"
    Trainer(_cfg(tiny_base_dir, arithmetic_file, bf16, steps=1, dtype="bf16")).run()
    assert _first_losses(bf16, 1)[0] == pytest.approx(_first_losses(fp32, 1)[0], rel=0.02)


def test_packing_trains(tiny_base_dir, arithmetic_file, tmp_path):
    out = tmp_path / "packed"
    result = Trainer(
        _cfg(tiny_base_dir, arithmetic_file, out, steps=2, packing=True, max_length=32)
    ).run()
    assert result["steps"] == 2 and (out / "adapter_model.safetensors").exists()


@pytest.mark.parametrize(
    "extra, words",
    [
        (["--steps", "3", "--epochs", "1"], ["not both"]),
        (["--method", "lokr"], ["unknown --method 'lokr'"]),
        (["--dtype", "fp16"], ["--dtype"]),
        (["--lr", "0"], ["--lr must be positive"]),
        (["--warmup", "1.5"], ["--warmup"]),
    ],
)
def test_bad_options_are_one_line_errors(
    run_cli, tiny_base_dir, arithmetic_file, tmp_path, extra, words
):
    code, _, err = run_cli(*train_args(tiny_base_dir, arithmetic_file, tmp_path / "r", *extra))
    assert code == 2 and len(err.strip().splitlines()) == 1
    for word in words:
        assert word in err


def test_bad_data_file_names_file_and_line(run_cli, tiny_base_dir, tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "c"}\n')
    code, _, err = run_cli(*train_args(tiny_base_dir, data, tmp_path / "r", "--steps", "1"))
    assert code == 2 and "bad.jsonl:2" in err and "completion" in err


def test_resume_without_checkpoint_is_refused(run_cli, tiny_base_dir, arithmetic_file, tmp_path):
    code, _, err = run_cli(*train_args(tiny_base_dir, arithmetic_file, tmp_path / "r", "--resume"))
    assert code == 2 and "no checkpoint" in err
