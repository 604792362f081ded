"""Random edits: seen types with training parameter ranges, unseen types and ranges for tests."""

from __future__ import annotations

import torch

from lorafleet.change.edits import SEEN_TYPES, TINTS, UNSEEN_TYPES, Edit, family
from lorafleet.errors import LorafleetError


def _u(g, lo, hi):
    return lo + (hi - lo) * float(torch.rand((), generator=g))


def _signed(g, lo, hi):
    return _u(g, lo, hi) * (1 if float(torch.rand((), generator=g)) < 0.5 else -1)


def _pick(g, options):
    return options[int(torch.randint(len(options), (), generator=g))]


# name -> (seen parameters, unseen parameters or None): parameter ranges never overlap.
RANGES = {
    "hue": (lambda g: {"deg": _signed(g, 20, 100)}, lambda g: {"deg": _signed(g, 140, 180)}),
    "tint": (
        lambda g: {"color": _pick(g, list(TINTS)), "strength": _u(g, 0.15, 0.35)},
        lambda g: {"color": _pick(g, list(TINTS)), "strength": _u(g, 0.45, 0.6)},
    ),
    "saturation": (lambda g: {"factor": _u(g, 0.0, 0.6)}, lambda g: {"factor": _u(g, 1.6, 2.2)}),
    "invert": (lambda g: {}, None),
    "grayscale": (lambda g: {}, None),
    "brightness": (
        lambda g: {"delta": _signed(g, 0.1, 0.25)},
        lambda g: {"delta": _signed(g, 0.3, 0.4)},
    ),
    "contrast": (
        lambda g: {"factor": _pick(g, [_u(g, 0.4, 0.7), _u(g, 1.3, 1.7)])},
        lambda g: {"factor": _u(g, 1.9, 2.4)},
    ),
    "gamma": (
        lambda g: {"g": _pick(g, [_u(g, 0.5, 0.8), _u(g, 1.3, 2.0)])},
        lambda g: {"g": _u(g, 2.4, 3.0)},
    ),
    "posterize": (None, lambda g: {"levels": _pick(g, [3, 4, 5])}),
    "sepia": (None, lambda g: {"amount": _u(g, 0.6, 1.0)}),
    "flip_h": (lambda g: {}, None),
    "flip_v": (None, lambda g: {}),
    "rot90": (lambda g: {"k": 1}, lambda g: {"k": 3}),
    "shift": (
        lambda g: {"dx": int(_signed(g, 2, 5.99)), "dy": int(_signed(g, 2, 5.99))},
        lambda g: {"dx": int(_signed(g, 6, 8.99)), "dy": int(_signed(g, 6, 8.99))},
    ),
    "blur": (lambda g: {"sigma": _u(g, 0.8, 1.5)}, lambda g: {"sigma": _u(g, 2.0, 2.5)}),
    "sharpen": (lambda g: {"amount": _u(g, 0.5, 1.5)}, lambda g: {"amount": _u(g, 2.0, 3.0)}),
    "edges": (lambda g: {}, None),
    "emboss": (None, lambda g: {}),
    "pixelate": (lambda g: {"block": _pick(g, [2, 4])}, lambda g: {"block": 8}),
}
# The exchange trains on inverse edits too, whose parameters reach these types' held-out ranges
# (saturation 1/0.6 = 1.7, contrast 1/0.4 = 2.5, rot90 k=1 undone is k=3): not reported unseen.
COVERED_BY_EXCHANGE = ("saturation", "contrast", "rot90")
UNSEEN_RANGE_TYPES = tuple(
    n for n in SEEN_TYPES if RANGES[n][1] is not None and n not in COVERED_BY_EXCHANGE
)
CONDITIONS = ("seen", "unseen type", "unseen range")
COMPOSE_P = 0.2  # share of training edits that are compositions of two seen edits


def seen_edit(g: torch.Generator, name: str | None = None) -> Edit:
    """A training edit: a seen type (uniform unless `name`) with a seen parameter."""
    name = name or _pick(g, list(SEEN_TYPES))
    if RANGES[name][0] is None:
        raise LorafleetError(f"edit {name!r} is held out of training")
    return Edit(name, RANGES[name][0](g))


def train_edit(g: torch.Generator, types: tuple[str, ...] = SEEN_TYPES) -> Edit:
    """A seen edit, or (with probability COMPOSE_P) two seen edits one after the other."""
    first = seen_edit(g, _pick(g, list(types)))
    if float(torch.rand((), generator=g)) >= COMPOSE_P:
        return first
    second = seen_edit(g, _pick(g, list(types)))
    return Edit(first.name, first.params, then=second)


def unseen_edit(g: torch.Generator, name: str) -> Edit:
    """A held-out edit: an unseen type, or a seen type with a parameter out of its range."""
    unseen = RANGES[name][1]
    if unseen is None:
        raise LorafleetError(f"edit {name!r} has no held-out parameter range")
    return Edit(name, unseen(g))


def eval_edits(g: torch.Generator) -> list[tuple[str, str, Edit]]:
    """One edit per evaluated edit type and condition: (family, condition, edit); conditions:
    "seen" (a training type and range), "unseen type" (a type held out of training),
    "unseen range" (a training type, a parameter outside its training range)."""
    out = [(family(n), "seen", seen_edit(g, n)) for n in SEEN_TYPES]
    out += [(family(n), "unseen type", unseen_edit(g, n)) for n in UNSEEN_TYPES]
    out += [(family(n), "unseen range", unseen_edit(g, n)) for n in UNSEEN_RANGE_TYPES]
    return out
