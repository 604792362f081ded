"""The official `openai` client against the server: models, chat, completions, streaming, errors."""

from __future__ import annotations

import concurrent.futures as cf

import openai
import pytest
from conftest import PUBLIC


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


MESSAGES = [{"role": "user", "content": "Tell me about cats."}]


def test_models_lists_base_and_adapters_with_parent(client):
    models = client.models.list().data
    ids = [m.id for m in models]
    assert ids[0] == "tiny"
    assert set(PUBLIC) <= set(ids) and "acme-secret" in ids  # auth off: all are public
    for m in models[1:]:
        assert m.parent == "tiny" and m.object == "model"
    assert client.models.retrieve("alpha").id == "alpha"


def test_chat_non_streamed_and_streamed_agree(client):
    kw = {"model": "alpha", "messages": MESSAGES, "max_tokens": 12, "temperature": 0}
    full = client.chat.completions.create(**kw)
    text = full.choices[0].message.content
    assert full.choices[0].message.role == "assistant"
    assert full.choices[0].finish_reason in ("stop", "length")
    assert full.usage.completion_tokens >= 1
    assert full.usage.total_tokens == full.usage.prompt_tokens + full.usage.completion_tokens
    chunks = list(
        client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True})
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    reasons = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    assert reasons == [full.choices[0].finish_reason]  # exactly one final finish_reason
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == text
    assert (
        chunks[-1].choices == []
        and chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    )


def test_completions_streamed_equals_non_streamed(client):
    kw = {"model": "beta", "prompt": "Once upon a time", "max_tokens": 10, "temperature": 0}
    full = client.completions.create(**kw)
    assert full.usage.completion_tokens == 10 or full.choices[0].finish_reason == "stop"
    chunks = list(client.completions.create(**kw, stream=True))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == full.choices[0].text


def test_adapter_changes_the_answer_and_base_name_means_no_adapter(client):
    kw = {"prompt": [1, 2, 3, 4, 5], "max_tokens": 8, "temperature": 0}
    texts = {m: client.completions.create(model=m, **kw).choices[0].text for m in ["tiny", *PUBLIC]}
    assert len(set(texts.values())) == len(texts)  # base and 3 adapters: 4 different answers


def test_concurrent_burst_equals_single_requests(client):
    prompts = ["Hi there", "Two plus two is", "Question: what is blue?", "Once"]
    jobs = [(m, p) for m in ["tiny", *PUBLIC] for p in prompts]

    def ask(job):
        m, p = job
        r = client.completions.create(model=m, prompt=p, max_tokens=8, temperature=0)
        return r.choices[0].text

    with cf.ThreadPoolExecutor(16) as pool:
        burst = list(pool.map(ask, jobs))
    alone = [ask(job) for job in jobs]
    assert burst == alone
    per_prompt = {p: {burst[i] for i, (m, q) in enumerate(jobs) if q == p} for p in prompts}
    assert all(len(v) > 1 for v in per_prompt.values())  # adapters differ inside the burst


def test_errors_raise_the_right_client_exceptions(client, server):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="nope", messages=MESSAGES)
    assert e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="tiny", prompt="x", max_tokens=-1)
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt="x", max_tokens=10**7)
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt="word " * 400, max_tokens=4)
    assert e.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny", messages=[])


def test_seeded_sampling_is_reproducible(client):
    kw = {"model": "gamma", "prompt": "Hello", "max_tokens": 8, "temperature": 1.0, "seed": 7}
    a = client.completions.create(**kw).choices[0].text
    assert a == client.completions.create(**kw).choices[0].text


def test_stop_string_ends_the_text(client):
    kw = {"model": "alpha", "prompt": "Hi", "max_tokens": 12, "temperature": 0}
    text = client.completions.create(**kw).choices[0].text
    cut = text.strip()[:3]
    if not cut:
        pytest.fail(f"the greedy text is empty: {text!r}")
    stopped = client.completions.create(**kw, stop=[cut]).choices[0]
    assert cut not in stopped.text and stopped.finish_reason == "stop"
