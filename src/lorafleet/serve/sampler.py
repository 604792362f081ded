"""Pick each sequence's next token (greedy or temperature/top-k/top-p, within its grammar's
token mask when it has one) and decide when it stops."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from lorafleet.serve.grammar import apply_masks, fill_masks
from lorafleet.serve.sequence import SamplingParams, Sequence, TokenLogprob

# How many of a row's most likely tokens top-p ranks first. The nucleus (the tokens whose mass
# reaches top_p) nearly always lies among them, and ranking them (torch.topk) costs a fraction
# of sorting the whole vocabulary (49,152 tokens for SmolLM2); when a row's nucleus does not fit,
# the whole vocabulary is sorted as before (`top_p_drop`).
TOP_P_CANDIDATES = 1024


def filter_logits(logits: Tensor, temperature: Tensor, top_k: Tensor, top_p: Tensor) -> Tensor:
    """Scale by temperature, then keep each row's top_k (0 = all), then its smallest set of
    tokens whose probability reaches top_p (1 = all); dropped tokens get -inf. The order is
    transformers' (temperature, top-k, top-p). Top-k and top-p cost nothing for rows that do
    not ask (top_k 0, top_p 1 on every row: no topk, no sort).

    logits: [n, V] float; temperature (> 0), top_p: [n] float; top_k: [n] long -> [n, V]."""
    x = logits / temperature[:, None]  # [n, V]
    vocab = x.shape[-1]
    k = torch.where(top_k > 0, top_k.clamp(max=vocab), torch.full_like(top_k, vocab))  # [n]
    if bool((k < vocab).any()):
        kth = torch.topk(x, int(k.max()), dim=-1).values  # [n, k_max], descending
        threshold = kth.gather(-1, (k - 1)[:, None])  # [n, 1]: each row's k-th largest value
        x = x.masked_fill(x < threshold, float("-inf"))
    if bool((top_p < 1).any()):
        x = x.masked_fill(top_p_drop(x, top_p), float("-inf"))
    return x


def top_p_drop(x: Tensor, top_p: Tensor, candidates: int = TOP_P_CANDIDATES) -> Tensor:
    """[n, V] bool: the tokens outside each row's nucleus, the smallest set of most likely
    tokens whose softmax(x) mass reaches top_p (the first token always stays): a token is
    dropped when the tokens ranked above it hold >= top_p.

    Ranks only the `candidates` most likely tokens when every row's candidates hold >= top_p:
    every token past them then has at least that much above it and is dropped, so the result
    is the full sort's (up to the float rounding of the softmax's sum, which is taken over the
    vocabulary in its own order rather than sorted; and the order among equal logits, which
    no sort fixes). Otherwise sorts the whole vocabulary. x: [n, V] float; top_p: [n]."""
    vocab = x.shape[-1]
    if candidates < vocab:
        values, order = torch.topk(x, candidates, dim=-1)  # [n, c], descending
        top = values[:, :1]  # [n, 1]: each row's largest logit (softmax's shift)
        total = (x - top).exp().sum(dim=-1, keepdim=True)  # [n, 1]: the whole row's mass
        probs = (values - top).exp() / total  # [n, c]: the candidates' softmax probabilities
        mass = probs.cumsum(dim=-1)  # [n, c]
        if bool((mass[:, -1] >= top_p).all()):
            drop_sorted = mass - probs >= top_p[:, None]  # [n, c]: mass ranked above >= top_p
            drop = torch.ones_like(x, dtype=torch.bool)  # every non-candidate is dropped
            return drop.scatter(-1, order, drop_sorted)  # [n, V]
    sorted_x, order = torch.sort(x, dim=-1, descending=True)  # [n, V]
    probs = sorted_x.softmax(dim=-1)
    before = probs.cumsum(dim=-1) - probs  # [n, V]: mass of the tokens ranked above
    # A token stays while the tokens above it hold less than top_p (the first always stays).
    drop_sorted = before >= top_p[:, None]
    return torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)  # back to vocab order


def constrained(
    logits: Tensor, seqs: list[Sequence], best: list[int], failed: dict[int, str] | None = None
) -> tuple[dict[int, int], Tensor | None]:
    """Apply the grammar rows' token masks: ({batch row: row of `masked`}, masked) where
    `masked` [m, V] float32 is a copy of those rows with their disallowed tokens at -inf
    (`logits` is unchanged), or ({}, None) when no row needs one. `best` is each row's argmax.

    Only rows with a grammar pay for masks, and a greedy one only when its best token is not
    allowed (else the masked argmax is that same token): its mask bits are read, not applied.
    A row whose grammar engine raises goes unmasked, with the error in failed[batch row]
    (fill_masks; without `failed` the error propagates)."""
    rows = [i for i, s in enumerate(seqs) if s.grammar is not None]
    if not rows:
        return {}, None
    broken: dict[int, str] | None = {} if failed is not None else None
    bitmask = fill_masks([seqs[i].grammar for i in rows], broken)  # [r, W] int32
    for j, reason in (broken or {}).items():
        failed[rows[j]] = reason
    top = torch.tensor([best[i] for i in rows], device=bitmask.device)  # [r], CPU as the masks
    words = bitmask.gather(1, (top // 32).clamp(max=bitmask.shape[1] - 1)[:, None])[:, 0]
    fits = ((words >> (top % 32)) & 1).bool() & (top < 32 * bitmask.shape[1])  # [r]
    need = [
        j
        for j, i in enumerate(rows)
        if not (seqs[i].params.greedy and fits[j]) and not (broken and j in broken)
    ]
    if not need:
        return {}, None
    picked = [rows[j] for j in need]
    masked = logits.index_select(0, torch.tensor(picked, device=logits.device)).float()
    apply_masks(masked, bitmask[need])  # [m, V]
    return {i: k for k, i in enumerate(picked)}, masked


def sample(
    logits: Tensor,
    seqs: list[Sequence],
    generator: torch.Generator | None,
    failed: dict[int, str] | None = None,
) -> list[int]:
    """One token per row of logits [B, V]: argmax for greedy sequences, else a draw from the
    filtered distribution with the sequence's own generator (seeded) or `generator`. A row
    with a grammar picks among the tokens its grammar allows; the other rows' tokens do not
    depend on it (their logits are not touched). With `failed`, a row whose grammar engine
    raises gets an unconstrained token and failed[row] the error (one line): the caller fails
    that row alone; without, the error propagates."""
    tokens = logits.argmax(dim=-1).tolist()  # [B]
    if all(s.params.greedy and s.grammar is None for s in seqs):
        return tokens  # greedy rows without a grammar: the argmax is all there is
    where, masked = constrained(logits, seqs, tokens, failed)
    if masked is not None:
        best = masked.argmax(dim=-1).tolist()
        for i, k in where.items():
            if seqs[i].params.greedy:
                tokens[i] = best[k]
    sampled = [i for i, s in enumerate(seqs) if not s.params.greedy]
    if not sampled:
        return tokens
    params = [seqs[i].params for i in sampled]
    device = logits.device
    # float32 whatever the model's dtype: half-precision logits / a small temperature overflow.
    x = logits[sampled].float()  # [n, V]
    for row, i in enumerate(sampled):
        if i in where:
            x[row] = masked[where[i]]
    x = filter_logits(
        x,
        torch.tensor([p.temperature for p in params], dtype=torch.float32, device=device),
        torch.tensor([p.top_k for p in params], dtype=torch.long, device=device),
        torch.tensor([p.top_p for p in params], dtype=torch.float32, device=device),
    )
    probs = x.softmax(dim=-1)  # [n, V]
    for row, i in enumerate(sampled):
        # One draw per sequence from its own generator: a seeded request gives the same tokens
        # whatever else shares its batch.
        gen = seqs[i].generator or generator
        tokens[i] = int(torch.multinomial(probs[row], 1, generator=gen))
    return tokens


def token_logprobs(logits: Tensor, ids: list[int], k: int) -> list[TokenLogprob]:
    """Each row's log-probability of ids[row] and its k most likely tokens, from the
    log-softmax of the raw logits (before temperature/top-k/top-p: OpenAI's and vLLM's
    figures). logits: [n, V] float32, len(ids) == n."""
    logp = torch.log_softmax(logits.float(), dim=-1)  # [n, V]
    chosen = logp.gather(-1, torch.tensor(ids, device=logp.device)[:, None])[:, 0].tolist()
    top_v, top_i = torch.topk(logp, k, dim=-1) if k else (logp[:, :0], logp[:, :0].long())
    top_v, top_i = top_v.tolist(), top_i.tolist()  # [n, k] each
    return [
        TokenLogprob(t, c, tuple(zip(i, v, strict=True)))
        for t, c, i, v in zip(ids, chosen, top_i, top_v, strict=True)
    ]


def sampled_logprobs(
    logits: Tensor, seqs: list[Sequence], tokens: list[int]
) -> list[TokenLogprob | None]:
    """The sampled token's TokenLogprob for the rows whose request asked (None for others):
    rows grouped by k, one log-softmax per group. logits [B, V], one row per sequence."""
    out: list[TokenLogprob | None] = [None] * len(seqs)
    by_k: dict[int, list[int]] = {}
    for i, seq in enumerate(seqs):
        if seq.params.logprobs is not None:
            by_k.setdefault(seq.params.logprobs, []).append(i)
    for k, rows in by_k.items():
        index = torch.tensor(rows, device=logits.device)
        found = token_logprobs(logits.index_select(0, index), [tokens[i] for i in rows], k)
        for i, value in zip(rows, found, strict=True):
            out[i] = value
    return out


def prompt_logprobs(logits: Tensor, prompt_ids: list[int], k: int) -> list[TokenLogprob | None]:
    """A prompt's per-token logprobs: None for the first token (nothing predicts it), then
    prompt_ids[i] under the logits of position i - 1. logits: [n - 1, V] for n prompt ids."""
    return [None, *token_logprobs(logits, prompt_ids[1:], k)]


def default_eos_ids(model, tokenizer) -> tuple[int, ...]:
    """The ids that end generation by default: the generation config's, as transformers uses."""
    for source in (getattr(model, "generation_config", None), model.config, tokenizer):
        eos = getattr(source, "eos_token_id", None)
        if eos is not None:
            return tuple(eos) if isinstance(eos, (list, tuple)) else (int(eos),)
    return ()


def stop_ids(params: SamplingParams, eos_ids: tuple[int, ...]) -> set[int]:
    """The ids that end a sequence: its own stop ids, plus EOS unless it ignores EOS."""
    return set(params.stop_token_ids) | (set() if params.ignore_eos else set(eos_ids))


def find_stop(text: str, stops: tuple[str, ...]) -> int | None:
    """Where the earliest stop string starts in `text`, or None."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else None


def holdback(text: str, stops: tuple[str, ...]) -> int:
    """How many characters at the end of `text` a stream must hold back: what could still turn
    into a stop string, and a trailing partial UTF-8 character (decoded as U+FFFD)."""
    keep = max((len(s) - 1 for s in stops), default=0)
    partial = len(text) - len(text.rstrip("\ufffd"))
    return min(len(text), max(keep, partial))


def advance(
    seq: Sequence,
    token: int,
    eos_ids: tuple[int, ...],
    decode: Callable[[list[int]], str],
    max_seq_len: int,
) -> str | None:
    """Append a sampled token to `seq`, update its text, and return why it ends ("stop" or
    "length") or None. A stop id stays in the token ids but not in the text; text from a stop
    string on is cut off. A sequence with a grammar stops when its document is complete (a
    stop id that completes it is left out of the text too); its grammar refusing the token
    raises GrammarError (the caller fails that sequence)."""
    seq.generated.append(token)
    reason, text_ids = None, seq.generated
    if seq.grammar is not None:
        if seq.grammar.advance(token):
            reason = "stop"
            if token in seq.grammar.stop_ids:
                text_ids = seq.generated[:-1]
    elif token in stop_ids(seq.params, eos_ids):
        reason, text_ids = "stop", seq.generated[:-1]
    # The whole generated text is decoded again: tokenizers that merge across token
    # boundaries (SentencePiece spaces, multi-byte characters) stay exact this way.
    text = decode(text_ids)
    cut = find_stop(text, seq.params.stop) if seq.params.stop and seq.grammar is None else None
    if cut is not None:
        reason, text = "stop", text[:cut]
    seq.text = text
    if reason is None and (
        len(seq.generated) >= seq.params.max_tokens or seq.num_tokens >= max_seq_len
    ):
        reason = "length"
    return reason
