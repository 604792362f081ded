"""Procedural image edits with parameters; some types and parameter ranges are held out (unseen)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

LUMA = torch.tensor([0.299, 0.587, 0.114])
TINTS = {
    "red": (1.0, 0.2, 0.1),
    "green": (0.2, 0.9, 0.2),
    "blue": (0.1, 0.3, 1.0),
    "orange": (1.0, 0.6, 0.0),
    "purple": (0.6, 0.1, 0.9),
}


@dataclass(frozen=True)
class Edit:
    """One edit: a type name and its parameters (one or two steps when composed)."""

    name: str
    params: dict = field(default_factory=dict)
    then: Edit | None = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        y = OPS[self.name](x, **self.params).clamp(0, 1)
        return self.then(y) if self.then is not None else y

    def label(self) -> str:
        args = ",".join(
            f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in self.params.items()
        )
        text = f"{self.name}({args})" if args else self.name
        return f"{text}+{self.then.label()}" if self.then is not None else text


def _luma(x):
    return (x * LUMA.view(1, 3, 1, 1).to(x)).sum(1, keepdim=True)


def _hue(x, deg):
    c, s = math.cos(math.radians(deg)), math.sin(math.radians(deg))
    k = 1.0 / 3.0
    r3 = math.sqrt(k)
    m = torch.tensor(
        [
            [c + (1 - c) * k, k * (1 - c) - r3 * s, k * (1 - c) + r3 * s],
            [k * (1 - c) + r3 * s, c + k * (1 - c), k * (1 - c) - r3 * s],
            [k * (1 - c) - r3 * s, k * (1 - c) + r3 * s, c + k * (1 - c)],
        ]
    ).to(x)
    return torch.einsum("ij,njhw->nihw", m, x)


def _tint(x, color, strength):
    col = torch.tensor(TINTS[color]).view(1, 3, 1, 1).to(x)
    return x * (1 - strength) + strength * col * _luma(x).clamp(0.2, 1) * 1.5


def _gauss(x, sigma):
    radius = max(1, int(math.ceil(2.5 * sigma)))
    t = torch.arange(-radius, radius + 1, dtype=x.dtype)
    k = torch.exp(-(t**2) / (2 * sigma**2))
    k = (k / k.sum()).to(x)
    c = x.shape[1]
    x = F.pad(x, (radius, radius, radius, radius), mode="reflect")
    x = F.conv2d(x, k.view(1, 1, 1, -1).repeat(c, 1, 1, 1), groups=c)
    return F.conv2d(x, k.view(1, 1, -1, 1).repeat(c, 1, 1, 1), groups=c)


def _filter3(x, kernel, bias=0.0):
    k = torch.tensor(kernel, dtype=x.dtype).view(1, 1, 3, 3)
    return F.conv2d(F.pad(_luma(x), (1, 1, 1, 1), mode="reflect"), k) + bias


def _edges(x):
    gx = _filter3(x, [[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]])
    gy = _filter3(x, [[-1, -2, -1], [0, 0, 0], [1, 2, 1]])
    return (gx**2 + gy**2).sqrt().expand(-1, 3, -1, -1)


SEPIA = torch.tensor([[0.393, 0.769, 0.189], [0.349, 0.686, 0.168], [0.272, 0.534, 0.131]])
EMBOSS = [[-2, -1, 0], [-1, 1, 1], [0, 1, 2]]


def _pixelate(x, block):
    small = F.avg_pool2d(x, block)
    return F.interpolate(small, scale_factor=block, mode="nearest")


OPS = {
    "hue": _hue,
    "tint": _tint,
    "saturation": lambda x, factor: _luma(x) + factor * (x - _luma(x)),
    "invert": lambda x: 1 - x,
    "grayscale": lambda x: _luma(x).expand(-1, 3, -1, -1),
    "brightness": lambda x, delta: x + delta,
    "contrast": lambda x, factor: 0.5 + factor * (x - 0.5),
    "gamma": lambda x, g: x.clamp_min(1e-6) ** g,
    "posterize": lambda x, levels: torch.round(x * (levels - 1)) / (levels - 1),
    "sepia": lambda x, amount: (
        (1 - amount) * x + amount * torch.einsum("ij,njhw->nihw", SEPIA.to(x), x)
    ),
    "flip_h": lambda x: x.flip(-1),
    "flip_v": lambda x: x.flip(-2),
    "rot90": lambda x, k: torch.rot90(x, k, dims=(-2, -1)),
    "shift": lambda x, dx, dy: torch.roll(x, (dy, dx), dims=(-2, -1)),
    "blur": _gauss,
    "sharpen": lambda x, amount: x + amount * (x - _gauss(x, 1.0)),
    "edges": _edges,
    "emboss": lambda x: _filter3(x, [[-2, -1, 0], [-1, 1, 1], [0, 1, 2]], 0.0).expand(
        -1, 3, -1, -1
    ),
    "pixelate": _pixelate,
}
GROUPS = {
    "colour": ("hue", "tint", "saturation", "invert", "grayscale", "sepia"),
    "tone": ("brightness", "contrast", "gamma", "posterize"),
    "geometry": ("flip_h", "flip_v", "rot90", "shift"),
    "filter": ("blur", "sharpen", "edges", "emboss", "pixelate"),
}
# The families results are reported by. A convolutional LoRA on the editor can express the
# first two: pointwise colour/tone maps and local, translation-equivariant filters within its
# receptive field. It cannot express flips or rotations (a convolution commutes with
# translation, a flip does not); a shift is local but torch.roll wraps around the border.
FAMILIES = {
    "colour/tone": GROUPS["colour"] + GROUPS["tone"],
    "filter": GROUPS["filter"],
    "geometry": GROUPS["geometry"],
}
EXPRESSIBLE = ("colour/tone", "filter")
# Edit types never shown in training: at least one per family.
UNSEEN_TYPES = ("posterize", "sepia", "flip_v", "emboss")
SEEN_TYPES = tuple(n for n in OPS if n not in UNSEEN_TYPES)

# Types whose edit can be undone (up to clipping at 0 and 1 and, for saturation, a factor above
# SATURATION_MIN): the <A, A'> exchange and LoRA Reverse (not on INVOLUTIONS) train on these
# only (reverse_scope "invertible"). Not invertible: grayscale, posterize, edges and emboss
# (many inputs give one output), blur (it removes high frequencies), pixelate (it averages
# blocks), and a saturation factor near 0 (near grayscale). Sharpen is invertible:
# x + a (x - blur(x)) has a gain in [1, 1 + a] at every frequency.
INVERTIBLE = frozenset(
    {"hue", "tint", "saturation", "invert", "sepia", "brightness", "contrast", "gamma"}
    | {"flip_h", "flip_v", "rot90", "shift", "sharpen"}
)
SATURATION_MIN = 0.2
# Involutions are their own inverse: LoRA Reverse would ask the negated LoRA to do what the LoRA
# does, which contradicts the forward loss to first order in the LoRA (-H gives x - delta where
# H gives x + delta). They get the exchange (a no-op for them) but not Reverse.
INVOLUTIONS = frozenset({"invert", "flip_h", "flip_v"})
# Types that commute with a horizontal flip (pointwise maps, symmetric filters, flips), so the
# flipped pair <flip(A), flip(A')> shows the same edit. Not: rot90 (flip . rot90 = rot270 .
# flip), shift (dx becomes -dx) and emboss (an asymmetric kernel).
FLIP_EQUIVARIANT = frozenset(OPS) - {"rot90", "shift", "emboss"}


def family(name: str) -> str:
    """The reporting family of edit type `name`."""
    return next(f for f, types in FAMILIES.items() if name in types)


def steps(edit: Edit):
    """The single edits of `edit`, in order."""
    while edit is not None:
        yield edit
        edit = edit.then


def invertible(edit: Edit) -> bool:
    """Whether every step of `edit` can be undone (see INVERTIBLE)."""
    return all(
        e.name in INVERTIBLE and (e.name != "saturation" or e.params["factor"] >= SATURATION_MIN)
        for e in steps(edit)
    )


def reverse_applies(edit: Edit) -> bool:
    """Whether LoRA Reverse trains on `edit`: invertible, and not a single involution."""
    return invertible(edit) and not (edit.then is None and edit.name in INVOLUTIONS)


def commutes_with_flip(edit: Edit) -> bool:
    """Whether edit(flip_h(x)) == flip_h(edit(x)) for every step (see FLIP_EQUIVARIANT)."""
    return all(e.name in FLIP_EQUIVARIANT for e in steps(edit))
