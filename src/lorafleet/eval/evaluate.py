"""Evaluate a model on an ExampleSet: its task metric plus target-token loss and perplexity."""

from __future__ import annotations

from contextlib import nullcontext

from lorafleet.data import ExampleSet, encode_all
from lorafleet.errors import LorafleetError
from lorafleet.eval.config import EvalConfig
from lorafleet.eval.metrics import accuracy, contains, exact_match, label_token_loss, perplexity
from lorafleet.eval.scoring import choice_logprobs, generate_greedy, token_loss


def _progress_bar(total: int, desc: str, enabled: bool):
    if not enabled:
        return nullcontext(None)
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, leave=False, unit="ex")


def evaluate(
    model,
    tokenizer,
    examples: ExampleSet,
    *,
    metrics: tuple[str, ...] | None = EvalConfig.metrics,
    batch_size: int = EvalConfig.batch_size,
    max_new_tokens: int = EvalConfig.max_new_tokens,
    max_length: int = EvalConfig.max_length,
    show_progress: bool = False,
    return_predictions: bool = False,
) -> dict:
    """Returns {"examples", metric: value, "loss", "perplexity", ["predictions"]}; the default
    metric is the data set's own (accuracy for choice tasks, exact match for generation).
    With accuracy also "label_loss": the mean -log p(right choice | prompt) (metrics.py's
    label_token_loss), while "loss" averages every target token (label + end of turn).
    The settings are EvalConfig's fields (and checked by it)."""
    metrics = tuple(metrics or (examples.metric, "perplexity"))
    EvalConfig(metrics, batch_size, max_new_tokens, max_length)
    rows = examples.examples
    result: dict = {"examples": len(rows)}
    was_training = model.training
    model.eval()
    try:
        if "accuracy" in metrics:
            if any(not ex.choices for ex in rows):
                raise LorafleetError(f"{examples.name}: accuracy needs examples with choices")
            total = sum(len(ex.choices) for ex in rows)
            with _progress_bar(total, "scoring choices", show_progress) as bar:
                scores = choice_logprobs(
                    model,
                    tokenizer,
                    rows,
                    batch_size=batch_size,
                    max_length=max_length,
                    progress=bar.update if bar else None,
                )
            predicted = scores.argmax(dim=1).tolist()
            labels = [ex.label for ex in rows]
            result["accuracy"] = accuracy(predicted, labels)
            result["label_loss"] = label_token_loss(scores.tolist(), labels)
            if return_predictions:
                result["predictions"] = [
                    ex.choices[p] for ex, p in zip(rows, predicted, strict=True)
                ]
        if "exact_match" in metrics or "contains" in metrics:
            with _progress_bar(len(rows), "generating", show_progress) as bar:
                texts = generate_greedy(
                    model,
                    tokenizer,
                    [ex.prompt for ex in rows],
                    max_new_tokens=max_new_tokens,
                    batch_size=batch_size,
                    progress=bar.update if bar else None,
                )
            refs = [ex.target for ex in rows]
            for name, fn in (("exact_match", exact_match), ("contains", contains)):
                if name in metrics:
                    result[name] = fn(texts, refs, examples.answer_marker)
            if return_predictions:
                result["predictions"] = texts
        if "perplexity" in metrics:
            encoded, _ = encode_all(rows, tokenizer, max_length)
            loss, tokens = token_loss(
                model, encoded, pad_token_id=tokenizer.pad_token_id, batch_size=batch_size
            )
            result.update(loss=loss, perplexity=perplexity(loss), target_tokens=tokens)
    finally:
        model.train(was_training)
    return result
