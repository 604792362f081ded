"""The settings of `lorafleet bench soak` (light: the CLI reads their defaults at start)."""

from __future__ import annotations

from dataclasses import dataclass

from lorafleet.errors import LorafleetError


@dataclass
class SoakConfig:
    """One soak run's settings; checked on creation."""

    minutes: float = 30.0
    window_s: float = 300.0
    base: str = "tiny"  # a tiny random Llama with SmolLM2's tokenizer; or any --base
    url: str | None = None  # a running server instead of one started here
    api_key: str | None = None  # with url: the key requests use (None: auth off)
    admin_key: str | None = None  # with url: the key /metrics takes when auth is on
    adapters: int = 6
    slots: int = 2
    rank: int = 8
    concurrency: int = 6
    max_tokens: int = 32
    threads: int = 1  # the started server's torch threads
    sample_s: float = 5.0
    max_rss_growth: float = 0.05
    idle_timeout_s: float = 30.0
    seed: int = 0

    def __post_init__(self):
        if not self.minutes > 0 or not self.window_s > 0 or not self.sample_s > 0:
            raise LorafleetError("--minutes, --window-s and --sample-s must be > 0")
        if self.minutes * 60 < 2 * self.window_s:
            raise LorafleetError(
                f"--minutes {self.minutes:g} is less than two windows of --window-s "
                f"{self.window_s:g}: RSS growth is measured from the end of the first window"
            )
        for what in ("adapters", "slots", "rank", "concurrency", "max_tokens", "threads"):
            if getattr(self, what) < 1:
                raise LorafleetError(f"--{what.replace('_', '-')} must be >= 1")
        if self.adapters < 2:
            raise LorafleetError("--adapters must be >= 2 (mixtures mix two)")
