"""Mixtures per request over HTTP: `adapters`, `mix:` ids and LoRAX merged_adapters equal the
cat-merged adapter token for token; tenancy per part; limits answered 400 naming the field."""

from __future__ import annotations

import json

import httpx
import pytest
from conftest import KEYS, SETTINGS
from helpers import randomize_adapter
from peft import LoraConfig, get_peft_model
from serve_helpers import TARGETS, tiny_base

from lorafleet.adapters import adapter_from_model, write_adapter
from lorafleet.compose import merge_adapters
from lorafleet.models.tiny import tiny_llama
from lorafleet.serve.api import ServerConfig
from lorafleet.serve.api.server import ServerThread, build_state

W = (0.7, -0.4)
PROMPTS = ["Once upon a time", "Two plus two is", "The film was a delight"]


@pytest.fixture(scope="module")
def mix_server(tokenizer, tmp_path_factory):
    """A server over "one" (r=4, every linear), "two" (r=2, attention) and "cat": PEFT's cat
    merge of 0.7 one - 0.4 two (add_weighted_adapter), the exact weighted sum of the deltas."""
    config_one = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, task_type="CAUSAL_LM")
    config_two = LoraConfig(r=2, lora_alpha=6, target_modules=TARGETS[:4], task_type="CAUSAL_LM")
    model = get_peft_model(tiny_llama(0, vocab_size=len(tokenizer)), config_one, "one")
    model.add_adapter("two", config_two)
    randomize_adapter(model, seed=11, scale=0.2)
    model.add_weighted_adapter(["one", "two"], list(W), "cat", combination_type="cat")
    root = tmp_path_factory.mktemp("mix-adapters")
    made = {name: adapter_from_model(model, adapter_name=name) for name in ("one", "two", "cat")}
    parts = [made["one"], made["two"]]
    made["composed"] = merge_adapters(parts, list(W), "linear")  # lorafleet's own exact merge
    made["ties"] = merge_adapters(parts, list(W), "ties", density=0.5, majority_sign="total")
    for name, adapter in made.items():
        write_adapter(root / name, adapter)
    config = ServerConfig(model_name="tiny", max_mixture=3)
    state = build_state(tiny_base(tokenizer), root, None, SETTINGS, config, None, merge_adapters)
    srv = ServerThread(state).start()
    yield srv
    srv.stop()


def post(srv, path, key=None, **kw):
    headers = kw.pop("headers", {})
    if key:
        headers["Authorization"] = f"Bearer {key}"
    return httpx.post(srv.url + path, headers=headers, timeout=60, **kw)


def stream_ids(srv, parameters: dict, prompt: str) -> list[int]:
    """The token ids /generate_stream sends for `prompt` (greedy, 8 tokens, EOS ignored)."""
    body = {"inputs": prompt, "parameters": {"max_new_tokens": 8, **parameters}}
    with httpx.stream("POST", srv.url + "/generate_stream", json=body, timeout=60) as r:
        assert r.status_code == 200, r.read()
        events = [json.loads(line[5:]) for line in r.iter_lines() if line.startswith("data:")]
    return [e["token"]["id"] for e in events if e["token"]]


def completion(srv, model: str, prompt: str, **extra) -> str:
    body = {"model": model, "prompt": prompt, "max_tokens": 8, "temperature": 0, **extra}
    r = post(srv, "/v1/completions", json=body)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def test_linear_mixture_equals_the_cat_merged_adapter(mix_server):
    merged = {"ids": ["one", "two"], "weights": list(W)}
    for prompt in PROMPTS:
        want = stream_ids(mix_server, {"adapter_id": "cat"}, prompt)
        got = stream_ids(mix_server, {"merged_adapters": merged}, prompt)
        assert got == want and len(want) >= 1
        assert stream_ids(mix_server, {"adapter_id": "composed"}, prompt) == want
    alone = [stream_ids(mix_server, {"adapter_id": "one"}, p) for p in PROMPTS]
    cat = [stream_ids(mix_server, {"adapter_id": "cat"}, p) for p in PROMPTS]
    assert alone != cat  # the mixture is not just its first part (the test can fail)


def test_openai_adapters_field_and_mix_id(mix_server):
    parts = [{"name": "one", "weight": W[0]}, {"name": "two", "weight": W[1]}]
    for prompt in PROMPTS:
        want = completion(mix_server, "cat", prompt)
        assert completion(mix_server, f"mix:one*{W[0]}+two*{W[1]}", prompt) == want
        assert completion(mix_server, "tiny", prompt, adapters=parts) == want
        assert completion(mix_server, "one", prompt, adapters=parts) == want
    chat = {
        "model": "tiny",
        "adapters": parts,
        "max_tokens": 6,
        "temperature": 0,
        "messages": [{"role": "user", "content": "Hi"}],
    }
    reply = post(mix_server, "/v1/chat/completions", json=chat).json()
    assert reply["model"] == "tiny" and reply["choices"][0]["message"]["content"] is not None
    # one adapter at weight 1 is that adapter
    one = completion(mix_server, "one", PROMPTS[0])
    assert completion(mix_server, "mix:one", PROMPTS[0]) == one


def test_mixture_requests_are_labelled_in_metrics(mix_server):
    completion(mix_server, "mix:one*0.5+two*0.5", PROMPTS[0])
    text = httpx.get(mix_server.url + "/metrics", timeout=30).text
    assert 'adapter="mix:one+two"' in text


def test_every_part_is_checked_against_the_tenant(tokenizer, tenant_server):
    def ask(key, model, **extra):
        body = {"model": model, "prompt": "Hi", "max_tokens": 2, "temperature": 0, **extra}
        return post(tenant_server, "/v1/completions", key, json=body)

    acme, globex = KEYS["acme"], KEYS["globex"]
    assert ask(acme, "mix:alpha*0.5+acme-secret*0.5").status_code == 200
    hidden = ask(globex, "mix:alpha*0.5+acme-secret*0.5")
    missing = ask(globex, "mix:alpha*0.5+acme-secreT*0.5")
    assert hidden.status_code == missing.status_code == 404
    assert hidden.json()["error"]["code"] == "model_not_found"
    assert hidden.json()["error"]["message"].replace("acme-secret", "X") == missing.json()["error"][
        "message"
    ].replace("acme-secreT", "X")
    parts = [{"name": "alpha", "weight": 1.0}, {"name": "acme-secret", "weight": 0.5}]
    assert ask(globex, "tiny", adapters=parts).status_code == 404
    assert ask(acme, "tiny", adapters=parts).status_code == 200
    merged = {"ids": ["alpha", "acme-secret"]}
    body = {"inputs": "Hi", "parameters": {"merged_adapters": merged, "max_new_tokens": 2}}
    assert post(tenant_server, "/generate", globex, json=body).status_code == 404
    assert post(tenant_server, "/generate", acme, json=body).status_code == 200


def _error(r, status: int, param: str | None = None) -> str:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and "\n" not in error["message"]
    if param is not None:
        assert error["param"] == param, error
    return error["message"]


def test_bad_mixtures_are_400_naming_the_field(server):
    def ask(model, **extra):
        body = {"model": model, "prompt": "Hi", "max_tokens": 2, **extra}
        return post(server, "/v1/completions", json=body)

    nine = "+".join(f"a{i}*0.1" for i in range(9))
    assert "at most 8" in _error(ask(f"mix:{nine}"), 400, "model")
    assert "finite" in _error(ask("mix:alpha*nan+beta*0.5"), 400, "model")
    assert "finite" in _error(ask("mix:alpha*inf"), 400, "model")
    assert "not a number" in _error(ask("mix:alpha*x+beta"), 400, "model")
    _error(ask("mix:"), 400, "model")
    assert "twice" in _error(ask("mix:alpha*0.5+alpha*0.2"), 400, "model")
    assert "base model" in _error(ask("mix:tiny*0.5+alpha*0.5"), 400, "model")
    inf = json.dumps(
        {"model": "tiny", "prompt": "Hi", "adapters": [{"name": "alpha", "weight": float("inf")}]}
    )
    r = post(server, "/v1/completions", content=inf, headers={"Content-Type": "application/json"})
    _error(r, 400, "adapters.0.weight")
    parts = [{"name": "alpha", "weight": 0.5}, {"name": "beta", "weight": 0.5}]
    assert "listed adapters" in _error(ask("gamma", adapters=parts), 400, "model")
    _error(ask("mix:alpha+beta", adapters=parts), 400, "model")
    assert "calibrated" in _error(ask("mix:alpha+beta", class_choices=["a", "b"]), 400)
    many = [{"name": f"a{i}", "weight": 1.0} for i in range(9)]
    _error(ask("tiny", adapters=many), 400, "adapters")


def test_bad_merged_adapters_are_400(server):
    def gen(parameters):
        return post(server, "/generate", json={"inputs": "Hi", "parameters": parameters})

    p = "parameters.merged_adapters"
    two = {"ids": ["alpha", "beta"]}
    _error(gen({"merged_adapters": {**two, "weights": [0.5]}}), 400, f"{p}.weights")
    _error(gen({"merged_adapters": two, "adapter_id": "alpha"}), 400, "parameters.adapter_id")
    _error(gen({"merged_adapters": {**two, "merge_strategy": "slerp"}}), 400, f"{p}.merge_strategy")
    _error(gen({"merged_adapters": {**two, "density": 0}}), 400, f"{p}.density")
    _error(
        gen({"merged_adapters": {**two, "majority_sign_method": "x"}}),
        400,
        f"{p}.majority_sign_method",
    )
    _error(gen({"merged_adapters": {"ids": []}}), 400, f"{p}.ids")
    _error(gen({"merged_adapters": {"ids": ["alpha", "zzz"]}}), 404, "model")
    no_backend = gen({"merged_adapters": {**two, "merge_strategy": "ties"}})  # no merge= given
    assert "not available" in _error(no_backend, 400, f"{p}.merge_strategy")
    ok = gen({"merged_adapters": {**two, "weights": [0.5, 0.5]}, "max_new_tokens": 2})
    assert ok.status_code == 200 and ok.json()["details"]["generated_tokens"] >= 1


def test_ties_is_merged_once_and_served_as_a_virtual_adapter(mix_server):
    merged = {
        "ids": ["one", "two"],
        "weights": list(W),
        "merge_strategy": "ties",
        "density": 0.5,
        "majority_sign_method": "total",
    }
    cache = mix_server.state.registry.merged
    before = cache.stats()["merges"]
    for prompt in PROMPTS:
        want = stream_ids(mix_server, {"adapter_id": "ties"}, prompt)
        assert stream_ids(mix_server, {"merged_adapters": merged}, prompt) == want
    assert cache.stats()["merges"] == before + 1  # merged once, then served from the cache
    linear = stream_ids(
        mix_server, {"merged_adapters": {**merged, "merge_strategy": "linear"}}, PROMPTS[0]
    )
    assert linear != stream_ids(mix_server, {"merged_adapters": merged}, PROMPTS[0])
    text = httpx.get(mix_server.url + "/metrics", timeout=30).text
    assert "lorafleet_merged_adapter_cache_mb" in text and "lorafleet_merged_adapters 1" in text
    models = httpx.get(mix_server.url + "/v1/models", timeout=30).json()["data"]
    assert not any(m["id"].startswith("merged:") for m in models)  # virtual: never listed


def test_merge_cache_is_lru_by_bytes(mix_server):
    cache = mix_server.state.registry.merged
    cache.capacity = 1  # byte: only the newest merge stays
    try:
        for density in (0.3, 0.4):
            merged = {"ids": ["one", "two"], "merge_strategy": "dare_ties", "density": density}
            body = {"inputs": "Hi", "parameters": {"merged_adapters": merged, "max_new_tokens": 2}}
            assert post(mix_server, "/generate", json=body).status_code == 200
        stats = cache.stats()
        assert stats["adapters"] == 1 and stats["evictions"] >= 1
    finally:
        cache.capacity = 256 * 1024 * 1024


def test_mixture_limit_is_the_servers(mix_server):
    body = {"model": "mix:one+two+cat+composed", "prompt": "Hi", "max_tokens": 2}
    message = _error(post(mix_server, "/v1/completions", json=body), 400, "model")
    assert "at most 3" in message
