"""`lorafleet bench families`: one engine run per tiny base, one row per family (the engine
runs themselves are stubbed: they are the engine bench's, measured by the coordinator)."""

from __future__ import annotations

import json

import lorafleet.bench.families as families


def test_one_row_per_family_and_each_runs_engine_and_peft_only(monkeypatch, tmp_path):
    calls = []

    def fake_engine(**kwargs):
        calls.append(kwargs)
        tps = {"tiny-qwen3": 300.0, "tiny-phi3": 200.0}[kwargs["base"]]
        return {
            "tokens_per_s": tps,
            "vs_sequential": 3.0,
            "vs_all_base": 0.5,
            "mix2_vs_single": 0.9,
            "parity_request0": True,
            "variants": {"engine_all_base": {"tokens_per_s": 2 * tps}},
            **{k: kwargs[k] for k in ("requests", "adapters", "rank", "prompt_tokens")},
            "new_tokens": kwargs["new_tokens"],
        }

    monkeypatch.setattr(families, "run_engine", fake_engine)
    out = families.run(["tiny-qwen3", "tiny-phi3"], requests=4, json_out=tmp_path / "fam.json")
    assert [c["variants_to_run"] for c in calls] == [("engine_pair", "sequential_peft")] * 2
    assert calls[1]["json_out"] == tmp_path / "fam-tiny-phi3.json"
    rows = json.loads((tmp_path / "fam.json").read_text())["rows"]
    assert rows == out["rows"]
    assert [(r["base"], r["family"], r["engine_tok_s"], r["all_base_tok_s"]) for r in rows] == [
        ("tiny-qwen3", "qwen3", 300.0, 600.0),
        ("tiny-phi3", "phi3", 200.0, 400.0),
    ]
    assert out["requests"] == 4
