"""The settings of `lorafleet bench quality` (light: the CLI reads their defaults at start)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lorafleet.errors import LorafleetError


def parse_range(text: str) -> tuple[int, int | None]:
    """'A:B' -> (A, B), 'A:' -> (A, None), 'A' -> (A, A + 1), '' -> (0, None): piece indexes
    from 0, B excluded (as a Python slice). One-line error otherwise."""
    text = str(text).strip()
    if not text:
        return 0, None
    first, colon, last = text.partition(":")
    try:
        a = int(first) if first.strip() else 0
        b = (int(last) if last.strip() else None) if colon else a + 1
    except ValueError:
        raise LorafleetError(f"--pieces {text!r}: expected A:B (piece indexes from 0)") from None
    if a < 0 or (b is not None and b <= a):
        raise LorafleetError(f"--pieces {text!r}: expected 0 <= A < B")
    return a, b


@dataclass(frozen=True)
class QualityConfig:
    """What one `bench quality` call measures; checked on creation. The text spec (base,
    context, tokens, piece_tokens) names its checkpoints; `pieces` picks which of the text's
    pieces this call scores (the figures always combine every checkpointed piece)."""

    base: str = "default"
    settings: tuple[str, ...] = ()  # setting names (bfloat16, int8, bfloat16+int4...); (): all
    context: int = 512  # tokens per chunk; the second half of each is scored
    tokens: int = 50_000  # scored tokens of held-out text, at least
    piece_tokens: int = 20_000  # scored tokens per piece, at most
    task_rows: int = 400  # validation rows of each choice task
    prompts: int = 32  # greedy-agreement prompts (0: none)
    prompt_tokens: int = 64
    new_tokens: int = 64
    limits: tuple[str, ...] = ()  # SETTING=K: that setting only on pieces 0..K-1
    pieces: str = ""  # A:B, the piece indexes this call scores ('': all)
    tasks: bool = True  # run the task / greedy stage for settings not yet checkpointed
    boot: int = 1000  # bootstrap resamples of chunks
    threads: int = 0  # torch's and llama-perplexity's threads (0: torch's)
    checkpoints: Path | None = None  # None: <json file's stem>_pieces beside it
    import_summary: Path | None = None  # an earlier JSON without checkpoints (its pieces)

    def __post_init__(self):
        parse_range(self.pieces)
        if self.context < 4:
            raise LorafleetError("--context must be >= 4")
        for what in ("tokens", "piece_tokens", "task_rows", "prompt_tokens", "new_tokens"):
            if getattr(self, what) < 1:
                raise LorafleetError(f"--{what.replace('_', '-')} must be >= 1")
        for what in ("prompts", "boot", "threads"):
            if getattr(self, what) < 0:
                raise LorafleetError(f"--{what} must be >= 0")

    def piece_range(self, count: int) -> range:
        """The indexes of the text's `count` pieces this call scores."""
        a, b = parse_range(self.pieces)
        if a >= count:
            raise LorafleetError(f"--pieces {self.pieces}: the text has {count} pieces (0..)")
        return range(a, min(count, b if b is not None else count))

    def text_spec(self) -> dict:
        """What the checkpoints and an earlier run's figures are matched on."""
        return {
            "base": self.base,
            "context": self.context,
            "tokens": self.tokens,
            "piece_tokens": self.piece_tokens,
        }

    def checkpoint_folder(self, json_out: str | Path) -> Path:
        json_out = Path(json_out)
        return self.checkpoints or json_out.with_name(json_out.stem + "_pieces")
