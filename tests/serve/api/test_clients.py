"""Real clients, unchanged, against a live server on the tiny model: the openai client with
logprobs / echo / n (values against transformers + PEFT), the LoRAX client, and lm-eval."""

from __future__ import annotations

import json
import math

import openai
import pytest
import torch

from lorafleet.adapters import attach, read_adapter
from lorafleet.models.tiny import tiny_llama

ATOL = 1e-4
PROMPT = "Question: is the film good? Answer:"


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def alpha_model(tokenizer, adapters_dir):
    """transformers + PEFT with the served `alpha` adapter."""
    return attach(tiny_llama(0, vocab_size=len(tokenizer)), read_adapter(adapters_dir / "alpha"))


@torch.no_grad()
def peft_logp(model, ids: list[int]) -> torch.Tensor:
    return torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), dim=-1)


def test_echo_scores_the_prompt_like_peft(client, tokenizer, alpha_model):
    """echo + max_tokens 0 + logprobs: the prompt's per-token logprobs (first null), what an
    evaluation harness sums for log-likelihood; top_logprobs hold the k best."""
    ids = tokenizer(PROMPT)["input_ids"]
    out = client.completions.create(model="alpha", prompt=ids, echo=True, max_tokens=0, logprobs=3)
    lp = out.choices[0].logprobs
    assert out.choices[0].text == tokenizer.decode(ids) and out.usage.completion_tokens == 0
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert len(lp.tokens) == len(ids) and lp.text_offset[0] == 0
    ref = peft_logp(alpha_model, ids)
    for i in range(1, len(ids)):
        assert abs(lp.token_logprobs[i] - float(ref[i - 1, ids[i]])) < ATOL
        best = torch.topk(ref[i - 1], 3).values.tolist()
        assert sorted(lp.top_logprobs[i].values(), reverse=True) == pytest.approx(best, abs=ATOL)


def test_generated_logprobs_streamed_and_not(client, tokenizer, alpha_model):
    """Greedy completion logprobs equal PEFT's at each generated position; a stream carries
    the same values in its chunks."""
    ids = tokenizer(PROMPT)["input_ids"]
    kw = {"model": "alpha", "prompt": PROMPT, "max_tokens": 5, "temperature": 0, "logprobs": 2}
    full = client.completions.create(**kw).choices[0]
    chunks = list(client.completions.create(**kw, stream=True))
    streamed = [lp for c in chunks for ch in c.choices if (lp := ch.logprobs)]
    assert [v for lp in streamed for v in lp.token_logprobs] == full.logprobs.token_logprobs
    gen_ids = tokenizer(PROMPT + full.text)["input_ids"][len(ids) :]
    n = len(full.logprobs.token_logprobs)
    ref = peft_logp(alpha_model, ids + gen_ids[:n])
    for j, value in enumerate(full.logprobs.token_logprobs):
        assert abs(value - float(ref[len(ids) - 1 + j].max())) < ATOL  # greedy: the top token


def test_chat_logprobs_and_n(client, tokenizer):
    """n choices, each seeded with seed + i: different, reproducible; chat logprobs shape."""
    kw = {
        "model": "alpha",
        "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": 6,
        "temperature": 1.0,
        "seed": 7,
        "n": 4,
        "logprobs": True,
        "top_logprobs": 2,
    }
    a, b = client.chat.completions.create(**kw), client.chat.completions.create(**kw)
    assert [c.index for c in a.choices] == [0, 1, 2, 3]
    texts = [c.message.content for c in a.choices]
    assert texts == [c.message.content for c in b.choices] and len(set(texts)) > 1
    entry = a.choices[0].logprobs.content[0]
    assert len(entry.top_logprobs) == 2 and entry.bytes == list(entry.token.encode())
    assert entry.logprob <= 0 and entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob
    one = client.chat.completions.create(**{**kw, "n": 1, "seed": 8})  # choice 1 = seed 8
    assert one.choices[0].message.content == texts[1]
    streamed = list(client.chat.completions.create(**kw, stream=True))
    got = {
        i: "".join(c.delta.content or "" for ch in streamed for c in ch.choices if c.index == i)
        for i in range(4)
    }
    assert [got[i] for i in range(4)] == texts
    with pytest.raises(openai.BadRequestError, match="at most 8"):
        client.chat.completions.create(**{**kw, "n": 9})
    with pytest.raises(openai.BadRequestError, match="max_tokens 0"):
        client.completions.create(model="alpha", prompt="Hi", max_tokens=0)


def test_lorax_client(server, client):
    """The official LoRAX client, with adapter_id, on /generate and /generate_stream."""
    from lorax import Client

    lorax = Client(server.url)
    out = lorax.generate(PROMPT, adapter_id="alpha", max_new_tokens=6)
    want = client.completions.create(model="alpha", prompt=PROMPT, max_tokens=6, temperature=0)
    assert out.generated_text == want.choices[0].text
    assert out.details.generated_tokens == want.usage.completion_tokens
    tokens = list(lorax.generate_stream(PROMPT, adapter_id="alpha", max_new_tokens=6))
    assert "".join(t.token.text for t in tokens) == out.generated_text
    assert tokens[-1].generated_text == out.generated_text


# -- lm-eval's local-completions model against lorafleet's own scoring ---------------------

WORDS = ["red", "blue", "green", "cat", "dog", "sun", "rain", "tea", "salt", "iron", "oak"]
MC_YAML = """task: lf_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{prompt}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
target_delimiter: ""
metric_list:
  - metric: acc
"""
GEN_YAML = """task: lf_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path}
test_split: test
output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{target}}}}"
generation_kwargs:
  until: []
  max_gen_toks: 6
  do_sample: false
  temperature: 0
process_results: !function lf_utils.process_results
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""
UTILS = """from lorafleet.eval.metrics import extract_answer


def process_results(doc, results):
    return {"exact_match": float(extract_answer(results[0], None) == doc["target"])}
"""


def mc_rows(n: int = 12):
    gen = torch.Generator().manual_seed(5)
    rows = []
    for i in range(n):
        k = 2 + i % 3
        picks = torch.randperm(len(WORDS), generator=gen)[: k + 1].tolist()
        choices = [f" {WORDS[p]}" for p in picks[1:]]
        rows.append(
            {
                "prompt": f"Item {i}: the {WORDS[picks[0]]} is",
                "choices": choices,
                "label": int(torch.randint(k, (1,), generator=gen)),
            }
        )
    return rows


def test_lm_eval_matches_lorafleet_eval(
    server, tmp_path, monkeypatch, tiny_base_dir, tokenizer, alpha_model
):
    """lm-eval (unchanged, local-completions) scores a log-likelihood task and a generation
    task through the server; both equal lorafleet.eval on the same adapter and rows."""
    lm_eval = pytest.importorskip("lm_eval")  # a test dependency: make install provides it
    from lorafleet.data import Example, ExampleSet
    from lorafleet.eval import evaluate
    from lorafleet.eval.metrics import extract_answer

    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(var, "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "ds-cache"))
    mc = mc_rows()
    mc_set = ExampleSet(
        [
            Example(r["prompt"], r["choices"][r["label"]], tuple(r["choices"]), r["label"])
            for r in mc
        ],
        "lf_mc",
        "accuracy",
    )
    ours_mc = evaluate(alpha_model, tokenizer, mc_set, metrics=("accuracy",))["accuracy"]
    prompts = [f"Say {w}:" for w in WORDS[:8]]
    gen_set = ExampleSet([Example(p, "") for p in prompts], "lf_gen", "exact_match")
    preds = evaluate(
        alpha_model,
        tokenizer,
        gen_set,
        metrics=("exact_match",),
        max_new_tokens=6,
        return_predictions=True,
    )["predictions"]
    # Half the targets are what the adapter says, half are not: exact match 0.5 when the
    # generations through lm-eval and the server equal lorafleet's own.
    targets = [
        extract_answer(p, None) if i % 2 == 0 else "no such answer" for i, p in enumerate(preds)
    ]
    gen_rows = [{"prompt": p, "target": t} for p, t in zip(prompts, targets, strict=True)]
    hits = [extract_answer(p, None) == t for p, t in zip(preds, targets, strict=True)]
    ours_gen = sum(hits) / len(hits)

    for name, rows, yaml in (("mc", mc, MC_YAML), ("gen", gen_rows, GEN_YAML)):
        data = tmp_path / f"{name}.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        (tmp_path / f"{name}.yaml").write_text(yaml.format(path=data))
    (tmp_path / "lf_utils.py").write_text(UTILS)
    from lm_eval.tasks import TaskManager

    results = lm_eval.simple_evaluate(
        model="local-completions",
        model_args=f"base_url={server.url}/v1/completions,model=alpha,tokenizer_backend="
        f"huggingface,tokenizer={tiny_base_dir},num_concurrent=1,max_retries=1",
        tasks=["lf_mc", "lf_gen"],
        task_manager=TaskManager(include_path=str(tmp_path), include_defaults=False),
        log_samples=True,
    )
    theirs_mc = results["results"]["lf_mc"]["acc,none"]
    theirs_gen = results["results"]["lf_gen"]["exact_match,none"]
    print(
        f"\nlm-eval lf_mc acc={theirs_mc:.4f} (lorafleet.eval {ours_mc:.4f}); "
        f"lf_gen exact_match={theirs_gen:.4f} (lorafleet.eval {ours_gen:.4f})"
    )
    assert theirs_mc == pytest.approx(ours_mc) and 0 < ours_mc < 1
    assert theirs_gen == pytest.approx(ours_gen) and ours_gen == 0.5
    # The per-choice log-likelihoods themselves agree, not only the argmax.
    from lorafleet.eval.scoring import choice_logprobs

    scores = choice_logprobs(alpha_model, tokenizer, mc_set.examples)
    for sample in results["samples"]["lf_mc"]:
        row = scores[sample["doc_id"]]
        got = [resp[0] for resp in sample["filtered_resps"]]
        assert got == pytest.approx(row[: len(got)].tolist(), abs=1e-3)
        assert all(math.isfinite(v) for v in got)
