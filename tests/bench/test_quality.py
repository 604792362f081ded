"""`bench quality` and `bench precision` on a tiny base; --dtype / --quantize through the CLI."""

from __future__ import annotations

import json

import pytest
import torch

from lorafleet.bench.quality import _agreement, parse_setting
from lorafleet.errors import LorafleetError


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_settings_and_agreement():
    assert parse_setting("bfloat16+int4") == ("bfloat16", "int4")
    assert parse_setting("int8") == ("float32", "int8")
    with pytest.raises(LorafleetError, match="unknown dtype"):
        parse_setting("float16")
    # shared prefix over n: 2/4 and 4/4 -> 0.75; one prompt of two identical
    assert _agreement([[1, 2, 3, 4], [5, 6, 7, 8]], [[1, 2, 0, 4], [5, 6, 7, 8]], 4) == (0.75, 0.5)


def test_bench_quality_on_a_tiny_base(run_cli, tiny_base_dir, tmp_path):
    out_file = tmp_path / "q.json"
    code, out, err = run_cli(
        "bench",
        "quality",
        "--base",
        tiny_base_dir,
        "--setting",
        "int8",
        "--setting",
        "bfloat16",
        "--prompts",
        "3",
        "--prompt-tokens",
        "8",
        "--new-tokens",
        "4",
        "--json",
        out_file,
    )
    assert code == 0, err
    rows = {r["setting"]: r for r in json.loads(out_file.read_text())["rows"]}
    assert set(rows) == {"reference", "float32+int8", "bfloat16+none"}
    ref = rows["reference"]
    assert ref["max_logit_error"] == 0 and ref["top1_kept"] == 1 and ref["greedy_agreement"] == 1
    assert 0 < rows["float32+int8"]["max_logit_error"] < 0.5
    assert rows["float32+int8"]["weight_mb"] < ref["weight_mb"]
    assert "pass rule" in out


def test_bench_precision_on_a_tiny_base(run_cli, tiny_base_dir, tmp_path):
    out_file = tmp_path / "p.json"
    code, _, err = run_cli(
        "bench",
        "precision",
        "--base",
        tiny_base_dir,
        "--setting",
        "int4",
        "--setting",
        "float32+unfused",
        "--requests",
        "2",
        "--adapters",
        "2",
        "--prompt-tokens",
        "8",
        "--new-tokens",
        "3",
        "--rank",
        "2",
        "--reps",
        "1",
        "--json",
        out_file,
    )
    assert code == 0, err
    rows = {r["setting"]: r for r in json.loads(out_file.read_text())["rows"]}
    assert set(rows) == {"float32+none", "float32+int4", "float32+none+unfused"}
    assert rows["float32+none+unfused"]["adapters_tok_s"] > 0
    assert rows["float32+none"]["adapters_vs_fp32"] == 1.0
    assert rows["float32+int4"]["single_stream_tok_s"] > 0


def test_generate_in_bfloat16_and_bad_options(run_cli, tiny_base_dir):
    code, _, err = run_cli(
        "generate", "--base", tiny_base_dir, "-p", "Hi", "--max-tokens", "3", "--dtype", "bfloat16"
    )
    assert code == 0, err
    code, _, err = run_cli("generate", "--base", tiny_base_dir, "-p", "Hi", "--dtype", "fp8")
    assert code == 2 and "unknown dtype 'fp8'" in err and len(err.strip().splitlines()) == 1
    code, _, err = run_cli("serve", "--base", tiny_base_dir, "--quantize", "int3")
    assert code == 2 and "unknown quantisation 'int3'" in err
