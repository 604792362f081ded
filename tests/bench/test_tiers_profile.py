"""The tiered-registry benchmark's pieces (popularity draws, the adapter set written once) and the
step profile's labels (a split that adds up; nothing left installed afterwards). No timings."""

from __future__ import annotations

import json
from collections import Counter

import torch
import torch.nn.functional as F

from lorafleet.bench import profile, stream, thousand


def test_draws_uniform_and_zipf():
    uniform = Counter(thousand.draw("uniform", 100, 5000))
    zipf = Counter(thousand.draw("zipf", 100, 5000))
    assert set(uniform) <= set(range(100)) and set(zipf) <= set(range(100))
    assert max(uniform.values()) / 5000 < 0.03  # about 1/100 each
    # Zipf(1.0): the top adapter draws 1/H_100 = 0.19 of the requests, the top ten 0.53.
    top = [n / 5000 for _, n in zipf.most_common()]
    assert 0.15 < top[0] < 0.24 and 0.45 < sum(top[:10]) < 0.6
    assert thousand.draw("zipf", 100, 50) == thousand.draw("zipf", 100, 50)  # seeded
    assert thousand.draw("fixed", 4, 6) == [0, 1, 2, 3, 0, 1]


def test_adapters_are_written_once(tiny_base_dir, tmp_path, monkeypatch):
    out = thousand.ensure_adapters(str(tiny_base_dir), 3, 2, tmp_path)
    names = sorted(p.name for p in out.iterdir() if p.is_dir())
    assert names == ["t0000", "t0001", "t0002"]
    config = json.loads((out / "t0001" / "adapter_config.json").read_text())
    assert config["r"] == 2 and sorted(config["target_modules"]) == ["q_proj", "v_proj"]
    before = (out / "t0001" / "adapter_model.safetensors").stat().st_mtime_ns

    def no_load(*args, **kwargs):
        raise AssertionError("the adapters were written again")

    monkeypatch.setattr("lorafleet.models.load_base", no_load)
    thousand.ensure_adapters(str(tiny_base_dir), 2, 2, tmp_path)  # fewer, same set: reused
    assert (out / "t0001" / "adapter_model.safetensors").stat().st_mtime_ns == before


def test_profile_labels_add_up_and_come_off(tiny_base_dir):
    cfg = {
        "base": str(tiny_base_dir),
        "requests": 4,
        "adapters": 2,
        "rank": 4,
        "prompt_tokens": 8,
        "new_tokens": 4,
    }
    engine, reqs = profile._workload(cfg)
    sdpa, runner = F.scaled_dot_product_attention, engine.runner
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with profile.labelled(engine), torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        assert "attend" in vars(runner) and F.scaled_dot_product_attention is not sdpa
        steps = profile._steps(engine, reqs, True)
    assert len(steps) == 4  # one prefill step, then three decode steps
    # Off again: serving runs the plain methods and torch's own function.
    assert F.scaled_dot_product_attention is sdpa
    assert not {"attend", "write_kv"} & set(vars(runner))
    assert not any("forward" in vars(m) for m in engine.base.model.modules())
    events = prof.events()
    for kind, attention in (
        ("step:prefill", "prefill_attention"),
        ("step:decode", "decode_attention"),
    ):
        split = profile.split(events, kind)
        assert split[attention] > 0 and split["base_matmul"] > 0 and split["lora"] > 0
        assert split["sampling"] > 0 and split["python_overhead"] > 0
        parts = (
            "attention",
            "kv_write",
            "base_matmul",
            "lora",
            "sampling",
            "other_ops",
            "python_overhead",
        )
        assert abs(sum(split[p] for p in parts) - split["step"]) < 0.02 * split["step"]
    assert profile.split(events, "step:decode")["prefill_attention"] == 0
    moved = profile.decode_bytes(engine, rows=4, context=10, distinct=2)
    assert moved["weights"] > 0 and moved["kv"] > 0 and moved["adapters"] > 0
    assert moved["total"] == moved["weights"] + moved["kv"] + moved["adapters"]


def test_stream_probe_reports_each_kernel():
    figures = stream.measure(mb=4, reps=1, threads=1)
    assert set(figures) == {"copy", "scale", "add", "triad"}
    assert all(v > 0 for v in figures.values())


def test_a_tiered_run_serves_every_request(tiny_base_dir, tmp_path):
    out = thousand.ensure_adapters(str(tiny_base_dir), 6, 2, tmp_path)
    cfg = {
        "base": str(tiny_base_dir),
        "slots": 2,
        "batch": 2,
        "requests": 6,
        "rank": 2,
        "prompt_tokens": 8,
        "new_tokens": 3,
        "dir": str(out),
        "cpu_cache": "1MB",
        "loaders": 1,
        "popularity": "uniform",
        "adapters": 6,
    }
    r = thousand._variant(cfg)
    assert r["tokens"] == 6 * 3 and r["distinct"] == len(set(thousand.draw("uniform", 6, 6)))
    # Cold start: every distinct adapter is read from disk once at least, and its load timed.
    assert r["misses"] >= r["distinct"] > 2 and r["cold_load_p50_ms"] > 0
    assert r["evictions_slot"] >= r["distinct"] - 2  # two slots for more adapters


def test_profile_honours_setting(run_cli, tiny_base_dir, monkeypatch):
    seen = []
    monkeypatch.setattr(profile, "run", lambda **kw: seen.append(kw))
    base = ["bench", "engine", "--profile", "--base", str(tiny_base_dir), "--requests", "1"]
    for given, want in (([], "float32"), (["-s", "bfloat16+int8"], "bfloat16+int8")):
        code, _, err = run_cli(*base, "--adapters", "1", *given)
        assert code == 0, err
        assert seen[-1]["setting"] == want and seen[-1]["requests"] == 1
    code, _, err = run_cli(*base, "-s", "int4")
    assert code == 0 and seen[-1]["setting"] == "float32+int4"
    code, _, err = run_cli(*base, "-s", "bfloat16", "-s", "int8")
    assert code == 2 and "--profile takes one --setting" in err and len(seen) == 3
    code, _, err = run_cli(*base, "-s", "float16")
    assert code == 2 and "unknown dtype" in err
    # the workload is built in that setting: a bfloat16 engine for "bfloat16"
    cfg = {"base": str(tiny_base_dir), "requests": 1, "adapters": 0, "rank": 4}
    engine, _ = profile._workload({**cfg, "prompt_tokens": 8, "new_tokens": 2, "setting": "bf16"})
    assert next(engine.base.model.parameters()).dtype == torch.bfloat16
