"""Prefix caching behind HTTP: `--prefix-cache-bytes` reaches the engine, a repeated prompt
hits and answers the same, /metrics shows it; a bad size is one line before the model loads."""

from __future__ import annotations

import httpx
from conftest import SETTINGS, start

from lorafleet.serve.api.server import EngineSettings

TEXT = (
    "You are a careful assistant. Answer in one short sentence, name your sources, and never "
    "guess when the question is about dates, numbers or people you do not know. Question:"
)


def metric(text: str, name: str) -> float:
    line = next(line for line in text.splitlines() if line.startswith(name + " "))
    return float(line.split()[-1])


def test_a_repeated_prompt_hits_and_answers_the_same(tokenizer, adapters_dir):
    settings = EngineSettings(**{**SETTINGS.__dict__, "prefix_cache_bytes": "4MB"})
    srv = start(tokenizer, adapters_dir, settings=settings)
    try:
        answers = []
        for suffix in (" who wrote it?", " who wrote it?", " when?"):
            body = {"model": "alpha", "prompt": TEXT + suffix, "max_tokens": 6, "logprobs": 1}
            body["temperature"] = 0
            r = httpx.post(srv.url + "/v1/completions", json=body, timeout=60)
            assert r.status_code == 200, r.text
            answers.append(r.json()["choices"][0])
        assert answers[0]["text"] == answers[1]["text"]
        first, second = (a["logprobs"]["token_logprobs"] for a in answers[:2])
        assert all(abs(x - y) < 1e-4 for x, y in zip(first, second, strict=True))
        metrics = httpx.get(srv.url + "/metrics").text
        assert metric(metrics, "lorafleet_prefix_cache_hits_total") == 2.0
        assert metric(metrics, "lorafleet_prefix_cache_hit_tokens_total") >= 32
        assert 0 < metric(metrics, "lorafleet_prefix_cache_bytes") <= 4 * 1024**2
    finally:
        srv.stop()


def test_a_bad_size_is_one_line(run_cli, tiny_base_dir):
    code, _, err = run_cli("serve", "--base", str(tiny_base_dir), "--prefix-cache-bytes", "lots")
    assert code == 2 and "cannot read 'lots' as a size" in err and "Traceback" not in err
