"""`lorafleet demo --quick --no-serve` end to end (tiny base): adapters, table, chart, caching."""

from __future__ import annotations

import json

from lorafleet.adapters import read_adapter
from lorafleet.demo.plan import FULL, QUICK, plans

TASKS = ["sst2", "strategyqa", "clutrr"]


def test_demo_quick_trains_scores_and_reuses(run_cli, tiny_base_dir, tmp_path):
    out = tmp_path / "demo"
    code, stdout, err = run_cli(
        "demo", "--quick", "--no-serve", "--base", tiny_base_dir, "--out", out
    )
    assert code == 0, err
    results = json.loads((out / "results.json").read_text())
    assert list(results["tasks"]) == TASKS
    for task, row in results["tasks"].items():
        for side in ("base", "adapter"):
            assert 0.0 <= row[side]["value"] <= 1.0 and row[side]["rows"] == QUICK[task].eval_limit
        assert row["train_seconds"] > 0
        adapter = read_adapter(out / "adapters" / task)  # a PEFT adapter the server can load
        assert adapter.config["r"] == QUICK[task].rank
        assert any(t.abs().sum() > 0 for k, t in adapter.tensors.items() if "lora_B" in k)
    assert (out / "results.png").stat().st_size > 1000
    assert all(t in stdout for t in TASKS) and "adapter" in stdout
    assert "trained into" in err and not list((out / "adapters").glob(".train-*"))

    weights = out / "adapters" / "sst2" / "adapter_model.safetensors"
    stamp = weights.stat().st_mtime_ns
    code, stdout, err = run_cli(
        "demo", "--quick", "--no-serve", "--base", tiny_base_dir, "--out", out, "--task", "sst2"
    )
    assert code == 0 and "reused from" in err and "scoring" not in err  # adapter and figures
    assert weights.stat().st_mtime_ns == stamp and "cached" in stdout


def test_demo_retrain_and_bad_input(run_cli, tiny_base_dir, tmp_path):
    out = tmp_path / "d"
    args = ("demo", "--quick", "--no-serve", "--base", tiny_base_dir, "--out", out)
    assert run_cli(*args, "--task", "sst2")[0] == 0
    weights = out / "adapters" / "sst2" / "adapter_model.safetensors"
    stamp = weights.stat().st_mtime_ns
    code, _, err = run_cli(*args, "--task", "sst2", "--retrain")
    assert code == 0 and "trained into" in err and weights.stat().st_mtime_ns != stamp
    code, _, err = run_cli(*args, "--task", "nope")
    assert code == 2 and "unknown demo task 'nope'" in err and len(err.strip().splitlines()) == 1
    (tmp_path / "file").write_text("x")
    code, _, err = run_cli("demo", "--quick", "--no-serve", "--out", tmp_path / "file")
    assert code == 2 and "not a directory" in err


def test_full_plan_sizes_are_the_documented_ones():
    assert [p.task for p in plans(None, quick=False)] == TASKS
    assert all(p.steps >= 80 and p.eval_limit >= 50 for p in FULL.values())
