"""Batched scoring equals one-at-a-time reference computations on a tiny model."""

from __future__ import annotations

import json

import torch
import torch.nn.functional as F

from lorafleet.data import Example, ExampleSet, encode_all
from lorafleet.eval import evaluate
from lorafleet.eval.scoring import choice_logprobs, generate_greedy, token_loss

EXAMPLES = [
    Example(
        prompt="Review: a joyless slog\nSentiment:",
        target=" negative",
        choices=(" negative", " positive"),
        label=0,
    ),
    Example(
        prompt="Review: warm , funny and wise\nSentiment:",
        target=" positive",
        choices=(" negative", " positive"),
        label=1,
    ),
    Example(prompt="Q: pick one\nA:", target=" b", choices=(" a", " b", " c"), label=1),
]


def _ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@torch.no_grad()
def test_choice_logprobs_match_a_brute_force_sum(tiny_model, tokenizer):
    got = choice_logprobs(tiny_model, tokenizer, EXAMPLES, batch_size=2)
    for i, ex in enumerate(EXAMPLES):
        for c, choice in enumerate(ex.choices):
            prompt, target = _ids(tokenizer, ex.prompt), _ids(tokenizer, choice)
            logp = F.log_softmax(tiny_model(torch.tensor([prompt + target])).logits[0], -1)
            expected = sum(logp[len(prompt) - 1 + k, t] for k, t in enumerate(target))
            torch.testing.assert_close(got[i, c], expected, atol=1e-4, rtol=0)
    assert got[0, 2] == float("-inf")  # two-choice rows are padded


def test_batched_greedy_generation_equals_one_at_a_time(tiny_model, tokenizer):
    prompts = [ex.prompt for ex in EXAMPLES]
    batched = generate_greedy(tiny_model, tokenizer, prompts, max_new_tokens=6, batch_size=3)
    for prompt, text in zip(prompts, batched, strict=True):
        ids = torch.tensor([_ids(tokenizer, prompt)])
        out = tiny_model.generate(input_ids=ids, max_new_tokens=6, do_sample=False, pad_token_id=2)
        assert text == tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


@torch.no_grad()
def test_token_loss_is_the_mean_nll_of_target_tokens(tiny_model, tokenizer):
    encoded, _ = encode_all(EXAMPLES, tokenizer, 64)
    loss, count = token_loss(tiny_model, encoded, pad_token_id=2, batch_size=2)
    total, n = 0.0, 0
    for e in encoded:
        logits = tiny_model(torch.tensor([e.input_ids])).logits[0]
        for pos in range(1, len(e.labels)):
            if e.labels[pos] != -100:
                total -= float(F.log_softmax(logits[pos - 1], -1)[e.labels[pos]])
                n += 1
    assert count == n
    assert abs(loss - total / n) < 1e-4


def test_evaluate_reports_the_task_metric(tiny_model, tokenizer):
    examples = ExampleSet(examples=EXAMPLES, name="toy", metric="accuracy")
    result = evaluate(tiny_model, tokenizer, examples, return_predictions=True)
    assert result["examples"] == 3 and 0.0 <= result["accuracy"] <= 1.0
    scores = choice_logprobs(tiny_model, tokenizer, EXAMPLES)  # the label tokens only
    want = -float(sum(scores[i, ex.label] for i, ex in enumerate(EXAMPLES))) / 3
    assert abs(result["label_loss"] - want) < 1e-5
    assert result["perplexity"] > 1 and len(result["predictions"]) == 3


def test_cli_eval_writes_json(run_cli, tiny_base_dir, tmp_path):
    out = tmp_path / "eval.json"
    code, stdout, err = run_cli(
        "eval", "--base", tiny_base_dir, "--data", "sst2", "--limit", "6", "--json", out
    )
    assert code == 0, err
    report = json.loads(out.read_text())
    assert report["examples"] == 6 and report["split"] == "validation"
    assert {"accuracy", "loss", "perplexity"} <= report.keys()
    assert "accuracy" in stdout


def test_cli_eval_unknown_metric_is_a_one_line_error(run_cli, tiny_base_dir):
    code, _, err = run_cli(
        "eval", "--base", tiny_base_dir, "--data", "sst2", "--limit", "2", "--metric", "bleu"
    )
    assert code == 2 and "unknown metric 'bleu'" in err
