"""The adapter's whole life on each new family's tiny base, as a user runs it: `lorafleet train`
(two steps), `eval`, `merge --into-base`, and one completion served over HTTP."""

from __future__ import annotations

import json

import httpx
import pytest
import torch

from lorafleet.adapters import attach, read_adapter
from lorafleet.models import load_base
from lorafleet.serve.api import AuthConfig, ServerConfig
from lorafleet.serve.api.server import EngineSettings, ServerThread, build_state

PROMPT = "the film was a delight from start to finish ."


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: a tiny model's forward is many small ops (see tests/serve)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("base", ["tiny-qwen2", "tiny-qwen3", "tiny-mistral", "tiny-phi3"])
def test_train_eval_merge_serve(run_cli, base, tmp_path):
    adapters = tmp_path / "adapters"
    code, out, err = run_cli(
        "train",
        "--base",
        base,
        "--data",
        "sst2",
        "--out",
        adapters / "sst2",
        "--steps",
        "2",
        "--batch-size",
        "4",
        "--rank",
        "4",
        "--alpha",
        "8",
        "--lr",
        "5e-3",
        "--train-limit",
        "16",
        "--eval-limit",
        "4",
    )
    assert code == 0, err
    adapter = read_adapter(adapters / "sst2")
    family = load_base(base).model
    # Every block linear is a target (Phi-3: its fused qkv_proj and gate_up_proj).
    linears = {
        n.rsplit(".", 1)[-1] for n, m in family.named_modules() if type(m).__name__ == "Linear"
    }
    assert set(adapter.config["target_modules"]) == linears - {"lm_head"}
    assert adapter.meta["base_fingerprint"] == load_base(base).fingerprint

    code, out, err = run_cli(
        "eval",
        "--base",
        base,
        "-a",
        adapters / "sst2",
        "--data",
        "sst2",
        "--limit",
        "4",
        "--json",
        tmp_path / "eval.json",
    )
    assert code == 0, err
    scores = json.loads((tmp_path / "eval.json").read_text())
    assert scores["examples"] == 4 and 0.0 <= scores["accuracy"] <= 1.0

    code, out, err = run_cli(
        "merge", "--base", base, "-a", adapters / "sst2", "--into-base", "--out", tmp_path / "m"
    )
    assert code == 0, err
    merged = load_base(str(tmp_path / "m"))
    loaded = load_base(base)
    ids = torch.tensor([loaded.tokenizer(PROMPT)["input_ids"]])
    with torch.no_grad():
        want = attach(loaded.model, adapter)(input_ids=ids).logits
        torch.testing.assert_close(merged.model(input_ids=ids).logits, want, atol=1e-4, rtol=0)

    settings = EngineSettings(
        quantize="none",
        max_adapters=1,
        max_rank=8,
        max_batch_size=2,
        max_batch_tokens=128,
        max_seq_len=64,
    )
    state = build_state(
        load_base(base), adapters, AuthConfig.off(), settings, ServerConfig(model_name=base)
    )
    with ServerThread(state) as server:
        body = {"model": "sst2", "prompt": PROMPT, "max_tokens": 3, "temperature": 0}
        reply = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60)
    assert reply.status_code == 200, reply.text
    assert reply.json()["model"] == "sst2"
    assert reply.json()["usage"]["completion_tokens"] >= 1
