"""Training on a tiny model: it learns, resumes exactly, survives signals and SIGKILL, and
runs data-parallel with the same result as one process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import train_args
from safetensors.torch import load_file

from lorafleet.adapters import read_adapter
from lorafleet.train import TrainConfig, Trainer, latest_checkpoint, load_checkpoint

RESUME_ATOL = 1e-6  # same ops on the same data in the same process layout: equal to float noise
DDP_ATOL = 1e-5  # gradients summed in another order across 2 processes


def _config(base, data, out, **kw):
    defaults = dict(batch_size=4, lr=5e-3, rank=4, alpha=8, chat=False, save_every=2, steps=8)
    return TrainConfig(base=str(base), data=str(data), out=out, **{**defaults, **kw})


def _losses(out):
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if r["split"] == "train"]


def _adapter_tensors(path):
    return load_file(str(path / "adapter_model.safetensors"))


def _assert_same_adapter(a, b, atol):
    ta, tb = _adapter_tensors(a), _adapter_tensors(b)
    assert ta.keys() == tb.keys()
    for k in ta:
        torch.testing.assert_close(ta[k], tb[k], atol=atol, rtol=0)


def test_training_lowers_the_loss_and_writes_the_run(tiny_base_dir, arithmetic_file, tmp_path):
    out = tmp_path / "run"
    cfg = _config(tiny_base_dir, arithmetic_file, out, steps=30, save_every=10)
    result = Trainer(cfg).run()
    losses = _losses(out)
    assert len(losses) == 30 and not result["interrupted"]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 1.5  # nats per target token
    adapter = read_adapter(out)
    assert adapter.rank == 4 and adapter.meta["train"]["steps"] == 30
    assert (out / "loss.png").stat().st_size > 1000
    assert latest_checkpoint(out).name == "step-0000030"
    assert len(list((out / "checkpoints").glob("step-*"))) == 2  # keep_checkpoints


def test_a_lora_run_records_its_initial_weights_for_the_centred_prior(
    tiny_base_dir, arithmetic_file, tmp_path
):
    """lora_init.safetensors holds the adapter as PEFT initialised it: B zero, A the seeded
    random draw (the same for the same seed), which training then moves."""
    inits = []
    for name in ("a", "b"):
        out = tmp_path / name
        Trainer(_config(tiny_base_dir, arithmetic_file, out, steps=3, save_every=10)).run()
        init, trained = load_file(str(out / "lora_init.safetensors")), _adapter_tensors(out)
        assert init.keys() == trained.keys()
        for k, t in init.items():
            if "lora_B" in k:
                assert not t.any()
            else:
                assert t.abs().sum() > 0 and not torch.equal(t, trained[k])
        inits.append(init)
    for k in inits[0]:
        torch.testing.assert_close(inits[0][k], inits[1][k], atol=0, rtol=0)


def test_interrupted_and_resumed_run_matches_an_uninterrupted_one(
    tiny_base_dir, arithmetic_file, tmp_path
):
    # Dropout makes the RNG state part of what a resume must restore.
    straight = tmp_path / "straight"
    Trainer(_config(tiny_base_dir, arithmetic_file, straight, dropout=0.1)).run()

    split = tmp_path / "split"
    trainer = Trainer(_config(tiny_base_dir, arithmetic_file, split, dropout=0.1))
    trainer.on_step = lambda step, loss: trainer.request_stop() if step == 3 else None
    first = trainer.run()
    assert first["interrupted"] and first["steps"] == 3
    assert latest_checkpoint(split).name == "step-0000003"
    Trainer(_config(tiny_base_dir, arithmetic_file, split, dropout=0.1, resume=True)).run()

    assert len(_losses(split)) == 8
    torch.testing.assert_close(
        torch.tensor(_losses(split)), torch.tensor(_losses(straight)), atol=RESUME_ATOL, rtol=0
    )
    _assert_same_adapter(split, straight, RESUME_ATOL)


def test_new_run_into_a_dir_with_checkpoints_is_refused(
    run_cli, tiny_base_dir, arithmetic_file, tmp_path
):
    out = tmp_path / "run"
    assert run_cli(*train_args(tiny_base_dir, arithmetic_file, out, "--steps", "2"))[0] == 0
    code, _, err = run_cli(*train_args(tiny_base_dir, arithmetic_file, out, "--steps", "2"))
    assert code == 2 and "--resume" in err


def _spawn_train(base, data, out, *extra):
    cmd = [sys.executable, "-m", "lorafleet.cli", *train_args(base, data, out, *extra)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_steps(out, n, proc, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        metrics = out / "metrics.jsonl"
        if metrics.exists() and len(metrics.read_text().splitlines()) >= n:
            return
        if proc.poll() is not None:
            pytest.fail(f"training ended early: {proc.stderr.read()[-2000:]}")
        time.sleep(0.05)
    pytest.fail("training made no progress")


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tiny_base_dir, arithmetic_file, tmp_path):
    out = tmp_path / "run"
    proc = _spawn_train(
        tiny_base_dir, arithmetic_file, out, "--steps", "5000", "--save-every", "1000"
    )
    _wait_for_steps(out, 3, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "--resume" in err and "Traceback" not in err
    done = len(_losses(out))
    assert latest_checkpoint(out).name == f"step-{done:07d}"  # nothing trained was lost


def test_sigkill_loses_at_most_the_steps_since_the_last_checkpoint(
    tiny_base_dir, arithmetic_file, tmp_path
):
    out = tmp_path / "killed"
    proc = _spawn_train(tiny_base_dir, arithmetic_file, out, "--steps", "40", "--save-every", "2")
    _wait_for_steps(out, 7, proc)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=30)
    logged = len(_losses(out))
    ckpt = latest_checkpoint(out)
    adapter, state = load_checkpoint(ckpt)  # complete and readable, never half-written
    assert logged - 2 <= state["step"] <= logged and state["step"] % 2 == 0
    assert adapter.rank == 4

    # Resuming finishes the run exactly as an uninterrupted one would.
    Trainer(_config(tiny_base_dir, arithmetic_file, out, steps=40, resume=True)).run()
    straight = tmp_path / "straight"
    Trainer(_config(tiny_base_dir, arithmetic_file, straight, steps=40)).run()
    _assert_same_adapter(out, straight, RESUME_ATOL)


def test_two_process_data_parallel_equals_one_process(tiny_base_dir, arithmetic_file, tmp_path):
    single = tmp_path / "single"
    Trainer(_config(tiny_base_dir, arithmetic_file, single, steps=4, batch_size=4)).run()
    ddp = tmp_path / "ddp"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "lorafleet.cli",
        *train_args(tiny_base_dir, arithmetic_file, ddp, "--steps", "4"),
        "--batch-size",
        "2",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _assert_same_adapter(ddp, single, DDP_ATOL)
    assert len(_losses(ddp)) == 4
