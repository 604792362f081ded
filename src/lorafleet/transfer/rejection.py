"""Rejection sampling as in Trans-LoRA: generate candidates until K pass the discriminator.

Pure: the candidate source and the discriminator are callables, so the loop is tested without
models. It always terminates: at K accepted, at `max_generated` candidates (the cap), or when the
source stops producing new candidates (`max_stalls` empty draws in a row).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from lorafleet.transfer.task import TransferError

# propose(n): up to n new candidates; score(texts): P(real) per text, in order.
Propose = Callable[[int], Sequence[str]]
Score = Callable[[Sequence[str]], Sequence[float]]


@dataclass(frozen=True)
class RejectionConfig:
    """K candidates to accept, at most `max_generated` generated in all, a candidate accepted
    when P(real) >= `threshold`; candidates drawn in chunks of at least `chunk`."""

    k: int
    max_generated: int
    threshold: float = 0.5
    chunk: int = 8
    max_stalls: int = 3

    def __post_init__(self) -> None:
        if self.k < 1:
            raise TransferError(f"the number of rows to accept must be >= 1, got {self.k}")
        if self.max_generated < self.k:
            raise TransferError(
                f"--max-candidates ({self.max_generated}) must be >= the rows to accept "
                f"(--synthetic {self.k})"
            )
        if not 0 <= self.threshold <= 1:
            raise TransferError(f"--threshold must be in [0, 1], got {self.threshold}")
        if self.chunk < 1 or self.max_stalls < 1:
            raise TransferError("chunk and max_stalls must be >= 1")


@dataclass
class RejectionResult:
    """Every candidate judged, in generation order ({"input", "p_real", "accepted"}), and the
    first K accepted. `accepted` is True for every candidate that passed, also past the K-th
    (a chunk is judged whole); `kept` holds only the first K of them."""

    k: int
    max_generated: int
    candidates: list[dict] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    exhausted: bool = False  # the source stopped producing new candidates
    last_kept_at: int = 0  # candidates generated up to and including the last kept one

    @property
    def generated(self) -> int:
        return len(self.candidates)

    @property
    def passed(self) -> int:
        return sum(c["accepted"] for c in self.candidates)

    @property
    def accept_rate(self) -> float:
        return self.passed / self.generated if self.candidates else 0.0

    @property
    def cap_hit(self) -> bool:
        return len(self.kept) < self.k and self.generated >= self.max_generated

    @property
    def needed(self) -> int:
        """Candidates it took to accept the kept ones (all generated, when fewer than K)."""
        return self.last_kept_at if len(self.kept) >= self.k else self.generated

    def summary(self) -> dict:
        return {
            "requested": self.k,
            "kept": len(self.kept),
            "generated": self.generated,
            "passed": self.passed,
            "accept_rate": round(self.accept_rate, 4),
            "needed": self.needed,
            "max_generated": self.max_generated,
            "cap_hit": self.cap_hit,
            "exhausted": self.exhausted,
        }

    def message(self) -> str | None:
        """A one-line note when fewer than K passed (None when K did)."""
        if len(self.kept) >= self.k:
            return None
        why = (
            f"the generation cap ({self.max_generated} candidates) was hit"
            if self.cap_hit
            else "the generator stopped producing new candidates"
        )
        return (
            f"{why} with {len(self.kept)} of {self.k} candidates accepted "
            f"(accept rate {self.accept_rate:.2f}); the filtered rows are {len(self.kept)}"
        )


def next_chunk(cfg: RejectionConfig, kept: int, passed: int, generated: int) -> int:
    """How many candidates to draw next: enough to reach K at the accept rate seen so far
    (Laplace-smoothed, so 1/2 before any is judged), at least `chunk`, within the cap."""
    rate = (passed + 1) / (generated + 2)
    want = max(cfg.chunk, math.ceil((cfg.k - kept) / rate))
    return min(want, cfg.max_generated - generated)


def rejection_sample(propose: Propose, score: Score, cfg: RejectionConfig) -> RejectionResult:
    """Draw candidates from `propose` and judge them with `score` until K are accepted, the cap
    `cfg.max_generated` is reached, or `propose` gives nothing new `cfg.max_stalls` times."""
    result = RejectionResult(cfg.k, cfg.max_generated)
    stalls = 0
    while len(result.kept) < cfg.k and result.generated < cfg.max_generated:
        want = next_chunk(cfg, len(result.kept), result.passed, result.generated)
        batch = list(propose(want))[:want]
        if not batch:
            stalls += 1
            if stalls >= cfg.max_stalls:
                result.exhausted = True
                break
            continue
        stalls = 0
        p_real = list(score(batch))
        if len(p_real) != len(batch):
            raise TransferError(f"the discriminator scored {len(p_real)} of {len(batch)} inputs")
        for text, p in zip(batch, p_real, strict=True):
            ok = float(p) >= cfg.threshold
            result.candidates.append({"input": text, "p_real": float(p), "accepted": ok})
            if ok and len(result.kept) < cfg.k:
                result.kept.append(text)
                result.last_kept_at = result.generated
    return result
