"""`lorafleet merge` end to end on the tiny base: adapter output, --into-base, bad input."""

from __future__ import annotations

import httpx
import pytest
import torch
from compose_helpers import exact_model, logits_of, make_adapter, merged_logits

from lorafleet.adapters import read_adapter, write_adapter
from lorafleet.models import load_base


@pytest.fixture(scope="module")
def adapter_dirs(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("merge-adapters")
    a = make_adapter(tokenizer, 11, r=4, lora_alpha=8, use_rslora=True)
    b = make_adapter(tokenizer, 12, r=2, lora_alpha=4, target_modules=["q_proj", "o_proj"])
    return write_adapter(root / "a", a), write_adapter(root / "b", b)


def test_merge_writes_an_exact_adapter(
    run_cli, tiny_base_dir, adapter_dirs, tokenizer, input_ids, tmp_path
):
    a, b = adapter_dirs
    code, out, err = run_cli(
        "merge",
        "--base",
        tiny_base_dir,
        "-a",
        f"x={a}:0.7",
        "-a",
        f"y={b}:-0.4",
        "--out",
        tmp_path / "m",
    )
    assert code == 0, err
    assert str(tmp_path / "m") in out
    merged = read_adapter(tmp_path / "m")
    assert merged.meta["merge"]["adapters"][1] == {"name": "y", "path": str(b), "weight": -0.4}
    exact = logits_of(
        exact_model(tokenizer, [read_adapter(a), read_adapter(b)], [0.7, -0.4]), input_ids
    )
    assert torch.allclose(merged_logits(tokenizer, merged, input_ids), exact, atol=1e-5, rtol=0)


def test_into_base_writes_a_model_dir_that_loads_and_serves(
    run_cli, tiny_base_dir, adapter_dirs, tokenizer, input_ids, tmp_path
):
    a, _ = adapter_dirs
    code, _, err = run_cli(
        "merge", "--base", tiny_base_dir, "-a", a, "--into-base", "--out", tmp_path / "model"
    )
    assert code == 0, err
    assert (tmp_path / "model" / "model.safetensors").is_file()
    loaded = load_base(str(tmp_path / "model"))  # a local transformers dir, as `serve --base` does
    expected = merged_logits(tokenizer, read_adapter(a), input_ids)
    assert torch.allclose(logits_of(loaded.model, input_ids), expected, atol=1e-5, rtol=0)

    from lorafleet.serve.api import AuthConfig, ServerConfig
    from lorafleet.serve.api.server import EngineSettings, ServerThread, build_state

    settings = EngineSettings(
        quantize="none",
        max_adapters=1,
        max_rank=8,
        max_batch_size=4,
        max_batch_tokens=128,
        max_seq_len=64,
    )
    state = build_state(loaded, None, AuthConfig.off(), settings, ServerConfig(model_name="m"))
    with ServerThread(state) as srv:
        body = {"model": "m", "prompt": "Hello", "max_tokens": 3, "temperature": 0}
        r = httpx.post(f"{srv.url}/v1/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] >= 1


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--method", "mean"], "unknown merge method"),
        (["--method", "ties", "--density", "0"], "--density"),
        (["--method", "ties", "--density", "1.5"], "--density"),
        (["-a", "nowhere/adapter"], "no such adapter directory"),
    ],
)
def test_bad_input_exits_2_with_one_line(
    run_cli, tiny_base_dir, adapter_dirs, tmp_path, args, needle
):
    code, _, err = run_cli(
        "merge", "--base", tiny_base_dir, "-a", adapter_dirs[0], *args, "--out", tmp_path / "m"
    )
    assert code == 2
    assert needle in err and len(err.strip().splitlines()) == 1, err


def test_adapter_of_another_base_exits_2(
    run_cli, other_base_dir, tiny_base_dir, adapter_dirs, tmp_path, tokenizer
):
    from lorafleet.models import fingerprint
    from lorafleet.models.tiny import tiny_llama

    adapter = read_adapter(adapter_dirs[0])
    adapter.meta["base_fingerprint"] = fingerprint(tiny_llama(1, vocab_size=len(tokenizer)))
    write_adapter(tmp_path / "other", adapter)
    code, _, err = run_cli(
        "merge",
        "--base",
        tiny_base_dir,
        "-a",
        tmp_path / "other",
        "-a",
        adapter_dirs[1],
        "--out",
        tmp_path / "m",
    )
    assert code == 2 and "another base" in err and len(err.strip().splitlines()) == 1, err
