"""llama.cpp's own quality figures: `llama-perplexity --kl-divergence-base` (a reference
model's log-probs to a .kld file) then `--kl-divergence` (another model against that file);
its printed summary parsed, and several pieces of text combined into one figure.

A .kld file costs about n_vocab * 2 bytes per scored token (~100 KB for a 49k vocabulary), so
`bench quality` runs the text in pieces and deletes each file after use; `combine` merges the
pieces' printed figures (see its doc for what is exact and what is not)."""

from __future__ import annotations

import math
import re
import struct
from pathlib import Path

import numpy as np

from lorafleet.errors import LorafleetError

# The percentiles llama-perplexity prints (fraction -> its label), then min / max.
PERCENTILES = {
    0.001: "0.1%",
    0.01: "1.0%",
    0.05: "5.0%",
    0.10: "10.0%",
    0.50: "Median",
    0.90: "90.0%",
    0.95: "95.0%",
    0.99: "99.0%",
    0.999: "99.9%",
}
_PM = r"\s*(?:±|\+/-)\s*"
_NUM = r"([-+]?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?|nan|inf)"
_LINES = {
    "kl_mean": rf"^Mean\s+KLD:\s*{_NUM}{_PM}{_NUM}",
    "ppl_q": rf"^Mean PPL\(Q\)\s*:\s*{_NUM}{_PM}{_NUM}",
    "ppl_base": rf"^Mean PPL\(base\)\s*:\s*{_NUM}{_PM}{_NUM}",
    "ln_ppl_ratio": rf"^Mean ln\(PPL\(Q\)/PPL\(base\)\)\s*:\s*{_NUM}{_PM}{_NUM}",
    "ppl_ratio": rf"^Mean PPL\(Q\)/PPL\(base\)\s*:\s*{_NUM}{_PM}{_NUM}",
    "same_top_pct": rf"^Same top p:\s*{_NUM}{_PM}{_NUM}\s*%",
}
_CHUNKS = re.compile(r"computing over (\d+) chunks, n_ctx=(\d+)")


def scored_per_chunk(n_ctx: int) -> int:
    """Tokens llama-perplexity scores per chunk: positions n_ctx/2 .. n_ctx-2 predict the next
    token, so n_ctx - 1 - n_ctx // 2 (255 of 512)."""
    return n_ctx - 1 - n_ctx // 2


def kld_file_bytes(n_ctx: int, chunks: int, n_vocab: int) -> int:
    """Size of a --kl-divergence-base file: header, the tokens, then per scored token a row of
    2 * ((n_vocab + 1) // 2) + 4 uint16 (two floats of scale and offset, then the log-probs)."""
    nv = 2 * ((n_vocab + 1) // 2) + 4
    return 20 + 4 * n_ctx * chunks + 2 * nv * scored_per_chunk(n_ctx) * chunks


def parse_kld_output(text: str) -> dict:
    """The summary `llama-perplexity --kl-divergence` prints (stdout and stderr together):
    {"chunks", "n_ctx", "tokens" (scored), "kl_mean", "kl_mean_se" (its ±: one standard error),
    "kl_p99", "kl_max", "kl_min", "kl_percentiles" {fraction: value}, "same_top1" (a
    fraction), "same_top1_se", "ppl_q", "ppl_base", "ln_ppl_ratio", "ln_ppl_ratio_se",
    "ppl_ratio", "ppl_ratio_se"}. One-line error when the summary is missing (e.g. under 100
    scored tokens, where llama-perplexity prints none)."""
    out: dict = {}
    match = _CHUNKS.search(text)
    if match:
        out["chunks"], out["n_ctx"] = int(match[1]), int(match[2])
        out["tokens"] = out["chunks"] * scored_per_chunk(out["n_ctx"])
    for line in text.splitlines():
        line = line.strip()
        for key, pattern in _LINES.items():
            m = re.match(pattern, line)
            if m:
                out[key], out[f"{key}_se"] = float(m[1]), float(m[2])
        m = re.match(rf"^(Maximum|Minimum|Median|\d+\.\d+%)\s+KLD:\s*{_NUM}", line)
        if m:
            label, value = m[1], float(m[2])
            if label == "Maximum":
                out["kl_max"] = value
            elif label == "Minimum":
                out["kl_min"] = value
            else:
                frac = next(f for f, lab in PERCENTILES.items() if lab == label)
                out.setdefault("kl_percentiles", {})[frac] = value
    missing = [k for k in ("tokens", "kl_mean", "same_top_pct", "ppl_ratio") if k not in out]
    if missing or 0.99 not in out.get("kl_percentiles", {}):
        raise LorafleetError(
            f"llama-perplexity printed no KL summary (missing {', '.join(missing) or '99% KLD'})"
        )
    out["kl_p99"] = out["kl_percentiles"][0.99]
    out["same_top1"] = out.pop("same_top_pct") / 100.0
    out["same_top1_se"] = out.pop("same_top_pct_se") / 100.0
    return out


def _quantile_points(piece: dict) -> tuple[np.ndarray, np.ndarray]:
    """A piece's KL distribution as (values, tail depth -ln(1 - F)) at its printed min,
    percentiles and max (the max at F = 1 - 1/(2n)); increasing in both."""
    pts = sorted((float(f), v) for f, v in piece["kl_percentiles"].items())  # JSON: str keys
    top = 1.0 - 0.5 / max(2, int(piece["tokens"]))
    fracs = np.asarray([0.0, *(f for f, _ in pts), max(top, pts[-1][0])], dtype=float)
    vals = [piece.get("kl_min", pts[0][1]), *(v for _, v in pts), piece.get("kl_max", pts[-1][1])]
    vals = np.maximum.accumulate(np.asarray(vals, dtype=float))  # printed rounding: keep monotone
    return vals, -np.log1p(-fracs)


def mixture_quantile(pieces: list[dict], q: float) -> float:
    """The q-quantile of all pieces' KL values together. Each piece's distribution is known at
    its printed percentiles (0.1 .. 99.9 %, min, max); between them its tail depth -ln(1 - F)
    is taken as linear in the value (exact for an exponential tail, which KL's upper tail is
    close to). The pieces are weighted by their token counts: solves
    sum_i n_i F_i(x) = q * sum_i n_i by bisection. Exact when the pieces agree."""
    curves = [_quantile_points(p) for p in pieces]
    weights = np.asarray([p["tokens"] for p in pieces], dtype=float)

    def cdf(x: float) -> float:
        total = 0.0
        for w, (v, depth) in zip(weights, curves, strict=True):
            f = 0.0 if x < v[0] else 1.0 if x >= v[-1] else -np.expm1(-np.interp(x, v, depth))
            total += w * f
        return total / weights.sum()

    lo = min(v[0] for v, _ in curves)
    hi = max(v[-1] for v, _ in curves)
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if cdf(mid) < q else (lo, mid)
    return 0.5 * (lo + hi)


def combine(pieces: list[dict]) -> dict:
    """One figure from pieces' parse_kld_output results, weighted by scored tokens n_i.

    Exact (up to the printed digits): mean KL and its ± (each piece's sum and sum of squares
    are recovered from its mean m_i and ± s_i: sum_i = n_i m_i, sum2_i = n_i (s_i^2 (n_i - 1) +
    m_i^2); the ± is then sqrt(var / (N - 1)) as llama-perplexity computes it); same-top-1
    (counts p_i n_i); ln PPL ratio and each ln PPL (token-weighted means). The ln ratio's ± is
    sqrt(sum n_i^2 s_i^2) / N (pieces independent). p99 and the other percentiles:
    mixture_quantile. Max: the pieces' max."""
    if not pieces:
        raise LorafleetError("no llama-perplexity pieces to combine")
    n = np.asarray([p["tokens"] for p in pieces], dtype=float)
    total = n.sum()

    def weighted(key: str) -> float:
        return float(sum(w * p[key] for w, p in zip(n, pieces, strict=True)) / total)

    m = np.asarray([p["kl_mean"] for p in pieces])
    s = np.asarray([p["kl_mean_se"] for p in pieces])
    sums, sums2 = n * m, n * (s**2 * (n - 1) + m**2)
    mean = float(sums.sum() / total)
    var = max(0.0, float(sums2.sum() / total - mean**2))
    ln_ratio = weighted("ln_ppl_ratio")
    ln_se = float(
        math.sqrt(sum((w * p["ln_ppl_ratio_se"]) ** 2 for w, p in zip(n, pieces, strict=True)))
    )
    ln_se /= total
    same = weighted("same_top1")
    out = {
        "pieces": len(pieces),
        "chunks": int(sum(p["chunks"] for p in pieces)),
        "tokens": int(total),
        "kl_mean": mean,
        "kl_mean_se": math.sqrt(var / (total - 1)) if total > 1 else 0.0,
        "kl_p99": mixture_quantile(pieces, 0.99),
        "kl_max": float(max(p.get("kl_max", p["kl_p99"]) for p in pieces)),
        "same_top1": same,
        "same_top1_se": math.sqrt(same * (1 - same) / (total - 1)) if total > 1 else 0.0,
        "ln_ppl_ratio": ln_ratio,
        "ln_ppl_ratio_se": ln_se,
        "ppl_ratio": math.exp(ln_ratio),
        "ppl_ratio_se": math.exp(ln_ratio) * ln_se,
        "ppl_q": math.exp(weighted_log(pieces, n, "ppl_q")),
        "ppl_base": math.exp(weighted_log(pieces, n, "ppl_base")),
    }
    return out


def weighted_log(pieces: list[dict], n: np.ndarray, key: str) -> float:
    """Token-weighted mean of ln(piece[key]) (a perplexity is exp of a mean NLL)."""
    return float(sum(w * math.log(p[key]) for w, p in zip(n, pieces, strict=True)) / n.sum())


# -- running it ------------------------------------------------------------------------------


def base_command(
    binary: Path, model: Path, text: Path, kld: Path, n_ctx: int, chunks: int, threads: int
) -> list[str]:
    """The reference pass: `chunks` chunks of `n_ctx` tokens of `text`, log-probs to `kld`."""
    return [
        str(binary),
        "-m",
        str(model),
        "-f",
        str(text),
        "-c",
        str(n_ctx),
        "--chunks",
        str(chunks),
        "-t",
        str(threads),
        "-tb",
        str(threads),
        "--kl-divergence-base",
        str(kld),
    ]


def kld_command(binary: Path, model: Path, kld: Path, n_ctx: int, threads: int) -> list[str]:
    """Another model against the reference's log-probs in `kld` (the tokens come from it)."""
    return [
        str(binary),
        "-m",
        str(model),
        "-c",
        str(n_ctx),
        "-t",
        str(threads),
        "-tb",
        str(threads),
        "--kl-divergence-base",
        str(kld),
        "--kl-divergence",
    ]


def read_kld_tokens(path: Path) -> tuple[int, int, list[int]]:
    """(n_ctx, n_vocab, token ids) from a --kl-divergence-base file's header: "_logits_",
    uint32 n_ctx, int32 n_vocab, int32 n_chunk, then n_ctx * n_chunk int32 token ids."""
    with open(path, "rb") as f:
        if f.read(8) != b"_logits_":
            raise LorafleetError(f"{path}: not a llama-perplexity log-prob file")
        n_ctx, n_vocab, n_chunk = struct.unpack("<Iii", f.read(12))
        ids = np.frombuffer(f.read(4 * n_ctx * n_chunk), dtype="<i4")
    return n_ctx, n_vocab, ids.tolist()
