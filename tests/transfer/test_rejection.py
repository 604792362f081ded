"""Trans-LoRA's rejection loop without models: it stops at K accepted, never draws past the cap,
stops when the source runs dry, and records what it judged."""

from __future__ import annotations

import pytest

from lorafleet.transfer.discriminator import held_out_accuracy, split_held
from lorafleet.transfer.rejection import RejectionConfig, next_chunk, rejection_sample
from lorafleet.transfer.task import TransferError


class Source:
    """Candidates "c0", "c1", ... on demand; counts what was drawn and each request's size."""

    def __init__(self, limit: int | None = None):
        self.drawn, self.requests, self.limit = 0, [], limit

    def __call__(self, n: int) -> list[str]:
        self.requests.append(n)
        if self.limit is not None:
            n = max(0, min(n, self.limit - self.drawn))
        out = [f"c{self.drawn + i}" for i in range(n)]
        self.drawn += n
        return out


def every(k: int):
    """P(real) 0.9 for every k-th candidate (c0, ck, c2k, ...), else 0.1."""
    return lambda texts: [0.9 if int(t[1:]) % k == 0 else 0.1 for t in texts]


def test_stops_once_k_have_passed():
    source = Source()
    result = rejection_sample(source, every(4), RejectionConfig(k=5, max_generated=1000, chunk=4))
    assert result.kept == ["c0", "c4", "c8", "c12", "c16"]
    assert result.needed == 17  # c16 is the 17th candidate
    # It drew what the accept rate seen so far asks for, not the whole cap.
    assert 17 <= result.generated == source.drawn < 60
    assert not result.cap_hit and result.message() is None
    assert [c["input"] for c in result.candidates] == [f"c{i}" for i in range(result.generated)]
    assert result.passed == sum(c["accepted"] for c in result.candidates)
    assert result.accept_rate == pytest.approx(result.passed / result.generated)
    summary = result.summary()
    assert summary["kept"] == 5 and summary["requested"] == 5 and summary["cap_hit"] is False


def test_never_draws_past_the_cap():
    source = Source()
    cfg = RejectionConfig(k=10, max_generated=25, chunk=4)
    result = rejection_sample(source, every(5), cfg)
    assert source.drawn == result.generated == 25  # exactly the cap, no request beyond it
    assert all(n <= 25 for n in source.requests)
    assert result.kept == ["c0", "c5", "c10", "c15", "c20"]
    assert result.cap_hit and result.needed == 25
    assert "generation cap (25 candidates) was hit with 5 of 10" in result.message()


def test_a_discriminator_that_rejects_everything_still_terminates():
    source = Source()
    result = rejection_sample(source, lambda t: [0.0] * len(t), RejectionConfig(3, 40))
    assert result.kept == [] and result.generated == 40 and result.cap_hit


def test_a_dry_source_stops_the_loop():
    source = Source(limit=7)
    result = rejection_sample(source, every(100), RejectionConfig(k=3, max_generated=50))
    assert result.generated == 7 and result.kept == ["c0"]
    assert result.exhausted and not result.cap_hit
    assert "stopped producing new candidates" in result.message()


def test_threshold_is_inclusive():
    result = rejection_sample(
        Source(), lambda t: [0.5] * len(t), RejectionConfig(k=2, max_generated=10, threshold=0.5)
    )
    assert result.kept == ["c0", "c1"]


def test_chunk_size_follows_the_accept_rate():
    cfg = RejectionConfig(k=20, max_generated=100, chunk=8)
    assert next_chunk(cfg, kept=0, passed=0, generated=0) == 40  # 1/2 before any judged
    assert next_chunk(cfg, kept=18, passed=18, generated=18) == 8  # at least `chunk`
    assert next_chunk(cfg, kept=1, passed=1, generated=98) == 2  # within the cap


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"k": 0, "max_generated": 5}, "must be >= 1"),
        ({"k": 5, "max_generated": 4}, "--max-candidates"),
        ({"k": 5, "max_generated": 9, "threshold": 1.5}, "--threshold"),
    ],
)
def test_bad_settings_are_refused(kw, message):
    with pytest.raises(TransferError, match=message):
        RejectionConfig(**kw)


def test_split_held_sets_aside_disjoint_inputs_of_each_class():
    real = [f"r{i}" for i in range(160)]
    synth = [f"s{i}" for i in range(160)]
    (train_real, train_synth), (held_real, held_synth) = split_held(real, synth, 32, seed=3)
    assert len(train_real) == len(train_synth) == 128 and len(held_real) == len(held_synth) == 32
    assert not set(train_real) & set(held_real) and not set(train_synth) & set(held_synth)
    assert set(train_real) | set(held_real) == set(real)


def test_held_out_accuracy_uses_the_filters_rule():
    acc = held_out_accuracy([0.9, 0.5, 0.2], [0.1, 0.6])
    assert acc["held_out_real_accuracy"] == pytest.approx(2 / 3)  # 0.5 passes (>= threshold)
    assert acc["held_out_synthetic_accuracy"] == 0.5
    assert acc["held_out_accuracy"] == pytest.approx(3 / 5) and acc["held_out_examples"] == 5
