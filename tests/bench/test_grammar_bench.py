"""The structured-output benchmarks in their smallest form: they run, check what they claim
(every document's tokens allowed; every row the same length in both runs) and write JSON."""

from __future__ import annotations

import json

import torch

from lorafleet.bench import grammar_engines, grammar_throughput


def test_grammar_engine_bench_walks_every_schema(tmp_path, tokenizer):
    threads = torch.get_num_threads()
    try:
        out = grammar_engines.run(["xgrammar"], 1, tmp_path / "g.json", tokenizer)
    finally:
        torch.set_num_threads(threads)
    figures = out["engines"]["xgrammar"]
    assert set(figures["schemas"]) == {name for name, _, _ in grammar_engines.SCHEMAS}
    for entry in figures["schemas"].values():
        assert entry["steps"] > 5 and entry["mask_us_median"] > 0 and entry["compile_ms"] > 0
    assert json.loads((tmp_path / "g.json").read_text())["vocab"] == 49152


def test_structured_throughput_bench_runs_both_batches(tmp_path, tiny_base_dir):
    threads = torch.get_num_threads()
    try:
        out = grammar_throughput.run(str(tiny_base_dir), 4, 2, 8, 6, 1, 1, tmp_path / "s.json")
    finally:
        torch.set_num_threads(threads)
    assert [r["tokens"] for r in out["runs"]] == [4 * 6, 4 * 6]
    assert [r["constrained"] for r in out["runs"]] == [0, 2] and out["ratio"] > 0
    assert json.loads((tmp_path / "s.json").read_text())["requests"] == 4
