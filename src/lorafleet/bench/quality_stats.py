"""The figures of `bench quality` as pure functions: next-token KL divergence, same-top-1 and
perplexity ratio against a reference, their intervals, the paired accuracy test, and the
pre-written rule that picks the default setting (DEFAULT_RULE)."""

from __future__ import annotations

import math
from collections.abc import Collection
from dataclasses import dataclass, field

import numpy as np

# Written before any figure of issue 33 was measured; `pick_default` applies it as written.
DEFAULT_RULE = (
    "A setting may be the default when its mean KL divergence is no worse than llama.cpp "
    "Q8_0's on the same text and its task accuracy is not significantly lower (paired test, "
    "p < 0.05) than float32's. Among the settings that may, the default is the fastest: the "
    "highest geometric mean of its single-stream and all-base (batched) tokens/s relative to "
    "float32 in bench/precision.py's figures (bench/results/precision.json). float32 (KL 0) "
    "always may, so it is the default when no faster setting qualifies."
)
ALPHA = 0.05  # the paired test's significance level in DEFAULT_RULE
REFERENCE = "float32+none"


def token_figures(ref_logits, logits, targets):
    """Per scored position, of a setting's next-token distribution Q against the reference P.

    ref_logits, logits: [T, V] (any float dtype; computed in float32); targets: [T] long, the
    token that follows each position. Returns four [T] tensors: KL(P || Q) in nats
    (sum_v P_v (log P_v - log Q_v), every vocabulary entry, as llama-perplexity's KLD),
    same top-1 (bool: argmax Q == argmax P), -log Q(target) and -log P(target)."""
    import torch

    lp = torch.log_softmax(ref_logits.float(), dim=-1)  # [T, V]
    lq = torch.log_softmax(logits.float(), dim=-1)  # [T, V]
    kl = (lp.exp() * (lp - lq)).sum(dim=-1).clamp_min(0.0)  # [T]; rounding can dip below 0
    same = lp.argmax(dim=-1) == lq.argmax(dim=-1)  # [T]
    at = targets.view(-1, 1)  # [T, 1]
    nll_q = -lq.gather(1, at).squeeze(1)  # [T]
    nll_p = -lp.gather(1, at).squeeze(1)  # [T]
    return kl, same, nll_q, nll_p


@dataclass
class Tally:
    """One setting's per-token figures, kept per chunk (for the bootstrap over chunks).
    Each list holds one float64 numpy array per chunk."""

    kl: list = field(default_factory=list)
    same: list = field(default_factory=list)
    nll: list = field(default_factory=list)  # -log Q(next token)
    nll_ref: list = field(default_factory=list)  # -log P(next token)

    def add(self, kl, same, nll, nll_ref) -> None:
        """Append one chunk's [T] tensors (token_figures' output)."""
        for store, values in zip(
            (self.kl, self.same, self.nll, self.nll_ref), (kl, same, nll, nll_ref), strict=True
        ):
            store.append(values.detach().double().cpu().numpy())

    @property
    def tokens(self) -> int:
        return int(sum(len(k) for k in self.kl))


def normal_interval(values: np.ndarray, z: float = 1.96) -> tuple[float, float]:
    """(mean, half-width): mean ± z standard errors over the values (llama-perplexity's ±
    is one standard error, sqrt(var / (n - 1)); this is that times z)."""
    n = len(values)
    if n < 2:
        return float(values.mean()) if n else 0.0, 0.0
    return float(values.mean()), z * float(values.std() / math.sqrt(n - 1))


def _stat(kind: str, kl, same, nll, nll_ref) -> float:
    if kind == "kl_mean":
        return float(kl.mean())
    if kind == "kl_p99":
        return float(np.percentile(kl, 99.0))  # linear interpolation, as llama-perplexity's
    if kind == "same_top1":
        return float(same.mean())
    if kind == "ppl_ratio":
        return float(math.exp(nll.mean() - nll_ref.mean()))
    raise ValueError(kind)


STATS = ("kl_mean", "kl_p99", "same_top1", "ppl_ratio")


def summarise(tally: Tally, boot: int = 1000, seed: int = 0) -> dict:
    """Each statistic of STATS over all tokens, with a 95 % percentile-bootstrap interval over
    chunks (chunks resampled with replacement, `boot` times: the tokens of a chunk share a
    context, so they are not independent); plus kl_mean's normal interval (± 1.96 SE over
    tokens, llama-perplexity's style) and the perplexities themselves."""
    parts = [tally.kl, tally.same, tally.nll, tally.nll_ref]
    whole = [np.concatenate(p) if p else np.zeros(0) for p in parts]
    out: dict = {"tokens": int(len(whole[0])), "chunks": len(tally.kl)}
    if not len(whole[0]):
        return out
    for kind in STATS:
        out[kind] = _stat(kind, *whole)
    out["kl_mean_pm"] = normal_interval(whole[0])[1]
    out["ppl"] = float(math.exp(whole[2].mean()))
    out["ppl_ref"] = float(math.exp(whole[3].mean()))
    rng = np.random.default_rng(seed)
    n = len(tally.kl)
    draws = {kind: [] for kind in STATS}
    for _ in range(boot if n > 1 else 0):
        pick = rng.integers(0, n, n)
        sample = [np.concatenate([p[i] for i in pick]) for p in parts]
        for kind in STATS:
            draws[kind].append(_stat(kind, *sample))
    for kind in STATS:
        if draws[kind]:
            lo, hi = np.percentile(draws[kind], [2.5, 97.5])
            out[f"{kind}_ci"] = (float(lo), float(hi))
    return out


def mcnemar_exact(ref_right: list[bool], got_right: list[bool]) -> dict:
    """McNemar's exact test on paired correctness (the same rows, reference vs setting):
    b = rows only the reference gets right, c = only the setting; two-sided p =
    min(1, 2 * P(X <= min(b, c))) for X ~ Binomial(b + c, 1/2)."""
    if len(ref_right) != len(got_right):
        raise ValueError("paired test: the two lists must cover the same rows")
    b = sum(1 for r, g in zip(ref_right, got_right, strict=True) if r and not g)
    c = sum(1 for r, g in zip(ref_right, got_right, strict=True) if g and not r)
    n = b + c
    tail = sum(math.comb(n, k) for k in range(min(b, c) + 1)) / 2**n if n else 1.0
    return {"only_reference": b, "only_setting": c, "p_value": min(1.0, 2.0 * tail)}


def significantly_lower(ref_right: list[bool], got_right: list[bool]) -> bool:
    """The setting's accuracy is below the reference's and McNemar's p < ALPHA."""
    test = mcnemar_exact(ref_right, got_right)
    return test["only_reference"] > test["only_setting"] and test["p_value"] < ALPHA


@dataclass(frozen=True)
class Verdict:
    """DEFAULT_RULE applied: the chosen setting and, per setting, why it may or may not be."""

    default: str
    reasons: dict[str, str]
    speed: dict[str, float]


def speed_score(row: dict) -> float:
    """A bench/precision.py row's speed: the geometric mean of its single-stream and all-base
    tokens/s relative to float32 (single_stream_vs_fp32, all_base_vs_fp32)."""
    return math.sqrt(float(row["single_stream_vs_fp32"]) * float(row["all_base_vs_fp32"]))


def pick_default(
    kl_mean: dict[str, float],
    accuracy_lower: dict[str, bool],
    q8_0_kl_mean: float | dict[str, float],
    speeds: dict[str, float],
    among: Collection[str] | None = None,
) -> Verdict:
    """DEFAULT_RULE: `kl_mean` and `accuracy_lower` per setting name (e.g. "bfloat16+int8";
    accuracy_lower = significantly_lower against float32), llama.cpp Q8_0's mean KL on the same
    text (one figure, or one per setting: Q8_0's over the text that setting was scored on),
    `speeds` per setting (speed_score). A setting without a speed figure cannot be ranked and
    is left out; float32 (REFERENCE) qualifies by definition. `among`: the settings the pick
    is made from (serve's --dtype given, --quantize auto: that dtype's settings); None = all.
    Raises ValueError when none of `among` qualifies."""
    allowed = {REFERENCE, *kl_mean} if among is None else set(among)
    reasons, qualified = {}, {}
    if REFERENCE in allowed:
        qualified[REFERENCE] = speeds.get(REFERENCE, 1.0)
    for name, kl in kl_mean.items():
        if name == REFERENCE or name not in allowed:
            continue
        q8 = q8_0_kl_mean[name] if isinstance(q8_0_kl_mean, dict) else q8_0_kl_mean
        if kl > q8:
            reasons[name] = f"mean KL {kl:.4g} > llama.cpp Q8_0's {q8:.4g}"
        elif accuracy_lower.get(name, True):
            reasons[name] = "task accuracy significantly lower than float32's (p < 0.05)"
        elif name not in speeds:
            reasons[name] = "qualifies, but has no speed figure to rank it"
        else:
            reasons[name] = f"qualifies (speed {speeds[name]:.2f}x float32)"
            qualified[name] = speeds[name]
    if REFERENCE in allowed:
        reasons[REFERENCE] = "the reference (KL 0): the fallback"
    if not qualified:
        raise ValueError(f"none of {sorted(among or ())} qualifies under the rule")
    best = max(qualified, key=lambda k: (qualified[k], k == REFERENCE))
    return Verdict(best, reasons, dict(qualified))


Z95 = 1.96


def _half_se(ci, log: bool = False) -> float:
    """A 95 % interval's standard error under a normal approximation: (hi - lo) / (2 * 1.96),
    of the logarithms when `log` (a ratio's interval)."""
    if not ci:
        return 0.0
    lo, hi = (math.log(c) for c in ci) if log else ci
    return (hi - lo) / (2 * Z95)


def scaled_mixture_p99(summary_p99: float, kl: np.ndarray, w_summary: float) -> float:
    """The 0.99-quantile of a token-weighted mixture of two halves when one half (weight
    `w_summary` of the tokens) is known only by its p99: that half's KL distribution is taken
    as the other half's (`kl`, per token) scaled so its p99 is `summary_p99` (exact when the
    halves agree up to scale). Solves w F_s(x) + (1 - w) F(x) = 0.99 by bisection, F the
    empirical CDF of `kl`, F_s(x) = F(x * p99(kl) / summary_p99)."""
    kl = np.sort(np.asarray(kl, dtype=float))
    scale = float(np.percentile(kl, 99.0)) / summary_p99 if summary_p99 > 0 else 1.0

    def cdf(x: float) -> float:
        def f(v: float) -> float:
            return np.searchsorted(kl, v, side="right") / len(kl)

        return w_summary * f(x * scale) + (1 - w_summary) * f(x)

    lo, hi = 0.0, max(float(kl[-1]), float(kl[-1]) / max(scale, 1e-12)) + 1e-12
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if cdf(mid) < 0.99 else (lo, mid)
    return 0.5 * (lo + hi)


def combine_with_summary(earlier: dict, new: dict, kl: np.ndarray) -> dict:
    """One setting's figures over two disjoint sets of pieces: `earlier`, a summary printed by
    an older run (summarise's fields, no per-token data) and `new`, summarise's output over
    the checkpointed pieces whose per-token KL values are `kl`. Weights w = tokens / all.

    Exact: tokens, chunks, kl_mean, same_top1 (token-weighted), ppl, ppl_ref and ppl_ratio
    (token-weighted means of the log-perplexities), kl_mean_pm (each half's sum of squares
    recovered from its mean and ±). Approximate: kl_p99 (scaled_mixture_p99), and every 95 %
    interval: each half's standard error read from its bootstrap interval as (hi - lo) /
    (2 * 1.96), combined as sqrt(sum w^2 se^2), then estimate ± 1.96 se (ppl_ratio's in logs;
    kl_p99's as though it were the weighted mean of the halves' p99s)."""
    halves = (earlier, new)
    n = np.asarray([h["tokens"] for h in halves], dtype=float)
    w = n / n.sum()
    out: dict = {"tokens": int(n.sum()), "chunks": int(sum(h.get("chunks", 0) for h in halves))}
    for key in ("kl_mean", "same_top1"):
        out[key] = float(sum(wi * h[key] for wi, h in zip(w, halves, strict=True)))
    for key in ("ppl", "ppl_ref"):
        out[key] = math.exp(sum(wi * math.log(h[key]) for wi, h in zip(w, halves, strict=True)))
    out["ppl_ratio"] = out["ppl"] / out["ppl_ref"]
    # ± over tokens: sd^2 = pm^2 (n - 1) / z^2; sum of squares = n (sd^2 + mean^2)
    sq = sum(
        ni * ((h.get("kl_mean_pm", 0.0) / Z95) ** 2 * (ni - 1) + h["kl_mean"] ** 2)
        for ni, h in zip(n, halves, strict=True)
    )
    var = max(0.0, sq / n.sum() - out["kl_mean"] ** 2)
    out["kl_mean_pm"] = Z95 * math.sqrt(var / (n.sum() - 1))
    out["kl_p99"] = scaled_mixture_p99(earlier["kl_p99"], kl, float(w[0]))
    for key in STATS:
        log = key == "ppl_ratio"
        se = math.sqrt(
            sum(
                (wi * _half_se(h.get(f"{key}_ci"), log)) ** 2
                for wi, h in zip(w, halves, strict=True)
            )
        )
        if not se:
            continue
        mid = math.log(out[key]) if log else out[key]
        lo, hi = mid - Z95 * se, mid + Z95 * se
        out[f"{key}_ci"] = (math.exp(lo), math.exp(hi)) if log else (lo, hi)
    out["interval"] = "normal approximation from both halves' intervals (see combine_with_summary)"
    return out
