"""Engine log-probabilities (generated and prompt tokens) against transformers + PEFT."""

from __future__ import annotations

import pytest
import torch
from serve_helpers import run_to_end

from lorafleet.adapters import attach
from lorafleet.errors import LorafleetError
from lorafleet.models.tiny import tiny_llama
from lorafleet.serve import SamplingParams

ATOL = 1e-4


@pytest.fixture(scope="module")
def peft_ref(tokenizer, adapters):
    """adapter name -> log_softmax of transformers + PEFT logits over a whole id sequence."""
    models = {}

    @torch.no_grad()
    def run(name, ids) -> torch.Tensor:
        if name not in models:
            models[name] = attach(tiny_llama(0, vocab_size=len(tokenizer)), adapters[name])
        logits = models[name](input_ids=torch.tensor([ids])).logits[0].float()  # [n, V]
        return torch.log_softmax(logits, dim=-1)

    return run


def check_logprob(entry, position_logp: torch.Tensor, token: int, k: int) -> None:
    assert entry.token_id == token
    assert abs(entry.logprob - float(position_logp[token])) < ATOL
    want = torch.topk(position_logp, k)
    assert [i for i, _ in entry.top] == want.indices.tolist()
    torch.testing.assert_close(
        torch.tensor([v for _, v in entry.top]), want.values, atol=ATOL, rtol=0
    )


def test_generated_and_prompt_logprobs_match_peft(make_engine, prompt_ids, peft_ref):
    """Greedy and sampled (tempered, top-k) requests, mixed with one that asks for nothing: the
    reported values are PEFT's raw log-softmax at every generated and prompt position."""
    engine = make_engine()
    asks = [
        ("lora4", prompt_ids[0], SamplingParams(max_tokens=6, logprobs=5, prompt_logprobs=3)),
        (
            "rslora8",
            prompt_ids[1],
            SamplingParams(max_tokens=6, temperature=0.7, top_k=20, seed=3, logprobs=2),
        ),
        ("attn2", prompt_ids[4], SamplingParams(max_tokens=4, prompt_logprobs=0)),
        ("lora4", prompt_ids[5], SamplingParams(max_tokens=5)),
    ]
    ids = [engine.add_request(p, name, params) for name, p, params in asks]
    out = run_to_end(engine)
    for rid, (name, prompt, params) in zip(ids, asks, strict=True):
        o = out[rid]
        logp = peft_ref(name, prompt + o.token_ids)  # [n + m, V]
        if params.logprobs is None:
            assert o.logprobs is None
        else:
            assert len(o.logprobs) == len(o.token_ids)
            for j, (entry, token) in enumerate(zip(o.logprobs, o.token_ids, strict=True)):
                check_logprob(entry, logp[len(prompt) - 1 + j], token, params.logprobs)
        if params.prompt_logprobs is None:
            assert o.prompt_logprobs is None
        else:
            assert o.prompt_logprobs[0] is None and len(o.prompt_logprobs) == len(prompt)
            for i in range(1, len(prompt)):
                check_logprob(o.prompt_logprobs[i], logp[i - 1], prompt[i], params.prompt_logprobs)


def test_logprobs_ride_on_token_events(make_engine, prompt_ids):
    """Each streamed token carries its own logprob; the first event carries the prompt's."""
    engine = make_engine()
    events = []
    params = SamplingParams(max_tokens=4, logprobs=1, prompt_logprobs=1)
    rid = engine.add_request(prompt_ids[3], "lora4", params, events.append)
    out = run_to_end(engine)[rid]
    tokens = [e for e in events if e.token_id is not None]
    assert [e.logprob for e in tokens] == out.logprobs
    assert [e.token_id for e in tokens] == out.token_ids
    assert events[0].prompt_logprobs == tuple(out.prompt_logprobs)
    assert all(e.prompt_logprobs is None for e in events[1:])


@pytest.mark.parametrize("bad", [-1, 21, 1.5, True])
def test_logprobs_bounds(bad):
    with pytest.raises(LorafleetError, match="logprobs must be an integer in 0..20"):
        SamplingParams(logprobs=bad)
    with pytest.raises(LorafleetError, match="prompt_logprobs"):
        SamplingParams(prompt_logprobs=bad)
