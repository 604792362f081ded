"""The settings of the llama.cpp peer tables (light: the CLI reads their defaults at start)."""

from __future__ import annotations

from dataclasses import dataclass

from lorafleet.errors import LorafleetError

# The pass rules, written before measuring (issue 33): lorafleet / llama.cpp generated tokens
# per second of wall time (prefill included), the ratio of the two medians over the reps.
TARGETS = {
    # in-process, lorafleet's engine vs llama-batched-bench at matched precision (same bytes)
    "matched_parallel": 1.0,  # all requests on the base at once (32 parallel)
    "matched_single": 0.8,  # one request alone
    # lorafleet's default setting vs the shipped Q4_1 GGUF (the user's pick), single stream
    "default_vs_q4_1_single": 0.5,
    # over HTTP, both servers behind the same client: N requests over K adapters
    "http_adapters": 2.0,
}


@dataclass
class PeerTableConfig:
    """One peer table's workload and repetitions; checked on creation.

    `requests` prompts of `prompt_tokens` ids, `new_tokens` generated each (greedy, EOS
    ignored); `adapters` random rank-`rank` LoRAs (request i on adapter i % adapters where a
    workload uses them); `reps` interleaved repetitions (>= 5 for a reported figure); `threads`
    compute threads of every system (None: the table's own default, see its module)."""

    requests: int = 32
    adapters: int = 16
    prompt_tokens: int = 100
    new_tokens: int = 64
    rank: int = 16
    reps: int = 5
    threads: int | None = None

    def __post_init__(self):
        for what in ("requests", "adapters", "prompt_tokens", "new_tokens", "rank", "reps"):
            if getattr(self, what) < 1:
                raise LorafleetError(f"--{what.replace('_', '-')} must be >= 1")
        if self.new_tokens < 2:
            raise LorafleetError("--new-tokens must be >= 2 (prefill and decode are split)")
        if self.threads is not None and self.threads < 1:
            raise LorafleetError("--peer-threads must be >= 1")
