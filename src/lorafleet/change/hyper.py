"""The hypernetwork H(A, A'): pair features -> transformer decoder -> rank-r LoRA per layer of G."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lorafleet.change.editor import Lora


class PairEncoder(nn.Module):
    """A shared small CNN: an image -> a grid of feature tokens [N, T, dim]."""

    def __init__(self, dim: int):
        super().__init__()
        self.convs = nn.ModuleList(
            [
                nn.Conv2d(3, 32, 3, stride=2, padding=1),
                nn.Conv2d(32, 64, 3, stride=2, padding=1),
                nn.Conv2d(64, dim, 3, stride=2, padding=1),
            ]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv in self.convs:
            x = F.silu(conv(x))
        return x.flatten(2).transpose(1, 2)


class HyperNet(nn.Module):
    """Emits {layer: (A, B)} for `shapes` ({layer: (in, out, kernel)}) from a before/after pair.

    The output heads' weights start at zero: A rows carry a fixed random bias (LoRA's usual A
    init) and B starts at exactly zero, so an untrained H emits a LoRA whose delta is zero.
    """

    def __init__(
        self,
        shapes: dict[str, tuple[int, int, int]],
        rank: int = 4,
        dim: int = 96,
        image_size: int = 32,
        depth: int = 2,
    ):
        super().__init__()
        self.shapes, self.rank = dict(shapes), rank
        self.encoder = PairEncoder(dim)
        tokens = (image_size // 8) ** 2
        self.pos = nn.Parameter(torch.randn(1, tokens, 2 * dim) * 0.02)
        self.fuse = nn.Linear(2 * dim, dim)
        self.queries = nn.Parameter(torch.randn(len(self.shapes), dim) * 0.02)
        layer = nn.TransformerDecoderLayer(dim, 4, 2 * dim, dropout=0.0, batch_first=True)
        self.decoder = nn.TransformerDecoder(layer, depth)
        self.head_a = nn.ModuleDict()
        self.head_b = nn.ModuleDict()
        for name, (cin, cout, k) in self.shapes.items():
            self.head_a[name] = nn.Linear(dim, rank * cin * k * k)
            self.head_b[name] = nn.Linear(dim, cout * rank)
        self.zero_init()

    def zero_init(self) -> None:
        """Zero the last layer: B = 0 exactly, A = a fixed Kaiming-uniform draw (no input)."""
        for name, (cin, _cout, k) in self.shapes.items():
            bound = 1.0 / math.sqrt(cin * k * k)
            nn.init.zeros_(self.head_a[name].weight)
            nn.init.uniform_(self.head_a[name].bias, -bound, bound)
            nn.init.zeros_(self.head_b[name].weight)
            nn.init.zeros_(self.head_b[name].bias)

    def forward(self, before: torch.Tensor, after: torch.Tensor) -> Lora:
        feats = torch.cat([self.encoder(before), self.encoder(after)], -1) + self.pos
        memory = self.fuse(feats)
        q = self.queries.unsqueeze(0).expand(before.shape[0], -1, -1)
        h = self.decoder(q, memory)
        out = {}
        for i, (name, (cin, cout, k)) in enumerate(self.shapes.items()):
            a = self.head_a[name](h[:, i]).view(-1, self.rank, cin, k, k)
            b = self.head_b[name](h[:, i]).view(-1, cout, self.rank)
            out[name] = (a, b)
        return out
