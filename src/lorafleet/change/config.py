"""ChangeConfig: the sizes and training settings of one LoC model (no torch, so the CLI reads its
defaults without importing it)."""

from __future__ import annotations

from dataclasses import dataclass, fields

from lorafleet.errors import LorafleetError

EDITORS = ("residual", "plain")
QUERIES = ("flip", "flip-all", "pair")
REVERSE_SCOPES = ("invertible", "all")


@dataclass
class ChangeConfig:
    """Sizes and training settings of one LoC model.

    editor: "residual" (G(x) = x + f(x), f's last conv zero after its pre-training, so G alone
    is exactly the identity) or "plain" (G(x) = f(x), the issue-18 form, trained to copy).
    query: the image the LoRA is trained on for a pair <A, A'>: "flip" (the paper's flipped pair:
    query flip(A), target flip(A')) for edits that commute with a horizontal flip and A, A'
    themselves for those that do not (shift, rot90); "flip-all" flips every pair (the paper's
    form; for shift and rot90 the target is then the mirrored edit); "pair" never flips.
    exchange: probability of training on <A', A> instead of <A, A'> (the paper's random
    exchange: the LoRA then encodes the reverse edit, query A', target A).
    reverse_scope: which pairs get LoRA Reverse and the exchange: "invertible" (only edits
    that can be undone, see edits.INVERTIBLE) or "all" (the paper's form, every pair).
    """

    seed: int = 0
    image_size: int = 32
    width: int = 12
    rank: int = 4
    dim: int = 64
    depth: int = 2
    editor_steps: int = 500
    steps: int = 2000
    batch: int = 16
    editor_lr: float = 3e-3
    lr: float = 5e-4
    editor: str = "residual"
    query: str = "flip"
    exchange: float = 0.5
    reverse: bool = True
    reverse_scope: str = "invertible"
    quad_weight: float = 0.0
    checkpoint_every: int = 100
    edit_types: str = ""  # comma-separated seen types to train on; empty: all of them

    def __post_init__(self):
        for name, value, allowed in (
            ("editor", self.editor, EDITORS),
            ("query", self.query, QUERIES),
            ("reverse_scope", self.reverse_scope, REVERSE_SCOPES),
        ):
            if value not in allowed:
                raise LorafleetError(f"{name} {value!r}: one of {', '.join(allowed)}")
        if not 0.0 <= self.exchange <= 1.0:
            raise LorafleetError(f"exchange {self.exchange}: a probability in [0, 1]")
        if self.image_size % 8 or self.image_size < 8:
            raise LorafleetError(f"image_size {self.image_size}: a multiple of 8")
        small = [
            f.name
            for f in fields(self)
            if f.name in ("width", "rank", "dim", "depth", "steps", "batch", "checkpoint_every")
            and getattr(self, f.name) < 1
        ]
        if small or self.editor_steps < 0 or self.quad_weight < 0:
            raise LorafleetError(
                f"{(small or ['editor_steps / quad_weight'])[0]}: must be >= 1 (steps, sizes) "
                "or >= 0 (editor_steps, quad_weight)"
            )

    @classmethod
    def from_dict(cls, d: dict) -> ChangeConfig:
        """The config saved in a model directory; one written before the residual editor (no
        "editor" key) was a plain editor, trained on unflipped pairs without exchange."""
        known = {f.name for f in fields(cls)}
        d = {k: v for k, v in d.items() if k in known}
        if "editor" not in d:
            d = {"editor": "plain", "query": "pair", "exchange": 0.0, "reverse_scope": "all", **d}
        return cls(**d)
