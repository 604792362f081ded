"""Batched scoring with a causal LM: choice log-likelihoods, greedy generation, token loss."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from lorafleet.data import Collator, Encoded, Example, bos_to_add


def _token_ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _prompt_ids(tokenizer, text: str, bos: int | None) -> list[int]:
    """Prompt tokens exactly as training saw them (`bos` = bos_to_add(tokenizer), computed
    once per call site: it tokenises a probe string)."""
    ids = _token_ids(tokenizer, text)
    return [bos, *ids] if bos is not None and ids[:1] != [bos] else ids


@torch.inference_mode()
def choice_logprobs(
    model,
    tokenizer,
    examples: Sequence[Example],
    *,
    batch_size: int = 16,
    max_length: int = 1024,
    progress: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """Sum of log p(choice tokens | prompt) for every (example, choice): [N, max_choices],
    -inf where an example has fewer choices. Prompts longer than max_length lose tokens on
    the left, as in training."""
    bos = bos_to_add(tokenizer)
    pairs: list[tuple[int, int, list[int], int]] = []  # (example, choice, ids, n_choice_tokens)
    for i, ex in enumerate(examples):
        prompt = _prompt_ids(tokenizer, ex.prompt, bos)
        for c, choice in enumerate(ex.choices or ()):
            target = _token_ids(tokenizer, choice)
            ids = (prompt + target)[-max_length:]
            pairs.append((i, c, ids, min(len(target), len(ids) - 1)))
    width = max((len(ex.choices or ()) for ex in examples), default=0)
    scores = torch.full((len(examples), width), float("-inf"))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    # Longest first: similar lengths share a batch, so little compute goes to padding.
    order = sorted(range(len(pairs)), key=lambda k: -len(pairs[k][2]))
    for start in range(0, len(order), batch_size):
        chunk = [pairs[k] for k in order[start : start + batch_size]]
        longest = max(len(p[2]) for p in chunk)
        ids = torch.full((len(chunk), longest), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, (_, _, seq, _) in enumerate(chunk):
            ids[row, : len(seq)] = torch.tensor(seq)
            mask[row, : len(seq)] = 1
        logits = model(input_ids=ids.to(model.device), attention_mask=mask.to(model.device)).logits
        logp = F.log_softmax(logits.float(), dim=-1)  # [B, T, V], on the model's device
        # Each row's choice tokens are gathered where the logits are; only the B sums come
        # back to the CPU (not the [B, T, V] log-probs: gigabytes per batch on a GPU).
        where = logp.device
        sums = torch.stack(
            [
                # positions len - n - 1 .. len - 2 predict the last n tokens
                logp[
                    row,
                    torch.arange(len(seq) - n - 1, len(seq) - 1, device=where),
                    torch.tensor(seq[-n:], device=where),
                ].sum()
                for row, (_, _, seq, n) in enumerate(chunk)
            ]
        ).cpu()  # [B]
        for (i, c, _, _), total in zip(chunk, sums, strict=True):
            scores[i, c] = total
        if progress:
            progress(len(chunk))
    return scores


@torch.inference_mode()
def generate_greedy(
    model,
    tokenizer,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 32,
    batch_size: int = 16,
    progress: Callable[[int], None] | None = None,
) -> list[str]:
    """Greedy continuations of each prompt (left-padded batches), special tokens removed."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    bos = bos_to_add(tokenizer)
    encoded = [_prompt_ids(tokenizer, p, bos) for p in prompts]
    out: list[str] = [""] * len(prompts)
    order = sorted(range(len(prompts)), key=lambda k: -len(encoded[k]))
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        longest = max(len(encoded[k]) for k in chunk)
        ids = torch.full((len(chunk), longest), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, k in enumerate(chunk):
            seq = encoded[k]
            ids[row, longest - len(seq) :] = torch.tensor(seq)
            mask[row, longest - len(seq) :] = 1
        generated = model.generate(
            input_ids=ids.to(model.device),
            attention_mask=mask.to(model.device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad,
        )
        for row, k in enumerate(chunk):
            out[k] = tokenizer.decode(generated[row, longest:], skip_special_tokens=True)
        if progress:
            progress(len(chunk))
    return out


@torch.inference_mode()
def token_loss(
    model, encoded: Sequence[Encoded], *, pad_token_id: int, batch_size: int = 16
) -> tuple[float, int]:
    """Mean NLL per target token over `encoded` (labels -100 are ignored), and the token count."""
    collate = Collator(pad_token_id)
    total, count = 0.0, 0
    for start in range(0, len(encoded), batch_size):
        batch = collate(list(encoded[start : start + batch_size]))
        batch = {k: v.to(model.device) for k, v in batch.items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        labels = batch["labels"][:, 1:]  # [B, T-1]: token t+1 is predicted at position t
        nll = F.cross_entropy(
            logits[:, :-1].float().reshape(-1, logits.shape[-1]),  # [B*(T-1), V]
            labels.reshape(-1),
            ignore_index=-100,
            reduction="sum",
        )
        total += float(nll)
        count += int((labels != -100).sum())
    return (total / count if count else float("nan")), count
