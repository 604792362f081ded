"""BiLoRA's pseudo-SVD delta P diag(lambda) Q on PEFT LoRA layers: init, regulariser, fold.

Each adapted linear of a PEFT LoRA model with scale exactly 1 (lora_alpha = r) becomes

    y = W x + P diag(lambda) Q x        P = lora_B.weight [d_out, r], Q = lora_A.weight [r, d_in]

with lambda: [r] held by a `PseudoSingularValues` module attached to the LoRA layer (its
parameter name has no "lora_", so PEFT's state dict leaves it out) and applied by a forward
pre-hook on lora_B that scales the rank-r hidden Q x. P starts with orthonormal columns, Q with
orthonormal rows and lambda at zero: the delta is exactly zero and so is the regulariser
`||P^T P - I||_F^2 + ||Q Q^T - I||_F^2` (AdaLoRA's form). `fold` gives the plain LoRA pair
(A = Q, B = P diag(lambda)) that PEFT serves with the same output.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
from peft.tuners.lora import LoraLayer
from torch import Tensor, nn

from lorafleet.adapters.lora_keys import strip_prefix
from lorafleet.errors import LorafleetError

SV_ATTR = "pseudo_sv"  # the attribute of a LoRA layer holding its lambda


class PseudoSingularValues(nn.Module):
    """lambda: [r] of one adapted linear, scaling the hidden Q x before P (see module doc)."""

    def __init__(self, r: int, like: Tensor):
        super().__init__()
        self.values = nn.Parameter(torch.zeros(r, dtype=like.dtype, device=like.device))
        self.detached = False  # True: lambda is used as a constant (no gradient reaches it)

    def scale_hidden(self, module: nn.Module, args: tuple) -> tuple:
        lam = self.values.detach() if self.detached else self.values
        return (args[0] * lam, *args[1:])  # [..., r] * [r]


@dataclass
class PLambdaQ:
    """One adapted linear's P, lambda and Q (views of the model's own parameters)."""

    layer: LoraLayer
    values: PseudoSingularValues
    adapter_name: str = "default"

    @property
    def P(self) -> nn.Parameter:  # [d_out, r]
        return self.layer.lora_B[self.adapter_name].weight

    @property
    def Q(self) -> nn.Parameter:  # [r, d_in]
        return self.layer.lora_A[self.adapter_name].weight

    @property
    def lam(self) -> nn.Parameter:  # [r]
        return self.values.values

    def delta(self) -> Tensor:
        """P diag(lambda) Q: [d_out, d_in]."""
        return (self.P * self.lam) @ self.Q


def _orthonormal(rows: int, cols: int, gen: torch.Generator) -> Tensor:
    """A [rows, cols] matrix with orthonormal columns (rows >= cols)."""
    q, r = torch.linalg.qr(torch.randn(rows, cols, generator=gen, dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r))).float()  # sign-fixed: a unique factor


def add_pseudo_svd(model: nn.Module, seed: int = 0, adapter_name: str = "default"):
    """Give every LoRA layer of `model` a lambda and re-initialise it as P diag(0) Q with P, Q
    orthonormal; returns {module name (no PEFT prefix): PLambdaQ}."""
    gen = torch.Generator().manual_seed(seed)
    found = {}
    for name, layer in model.named_modules():
        if not isinstance(layer, LoraLayer) or adapter_name not in layer.lora_A:
            continue
        if hasattr(layer, SV_ATTR):
            raise LorafleetError(f"{name} already has pseudo singular values")
        if layer.scaling[adapter_name] != 1.0 or layer.use_dora.get(adapter_name):
            raise LorafleetError(f"{name}: BiLoRA needs plain LoRA with scale 1 (lora_alpha = r)")
        A, B = layer.lora_A[adapter_name].weight, layer.lora_B[adapter_name].weight
        r, d_in = A.shape
        if r > min(d_in, B.shape[0]):
            limit = min(d_in, B.shape[0])
            raise LorafleetError(
                f"{name}: rank {r} > min(d_in, d_out) = {limit}: P and Q cannot be orthonormal"
            )
        with torch.no_grad():
            A.copy_(_orthonormal(d_in, r, gen).T)
            B.copy_(_orthonormal(B.shape[0], r, gen))
        values = PseudoSingularValues(r, A)
        layer.add_module(SV_ATTR, values)
        layer.lora_B[adapter_name].register_forward_pre_hook(values.scale_hidden)
        found[strip_prefix(name)] = PLambdaQ(layer, values, adapter_name)
    if not found:
        raise LorafleetError("the model has no LoRA layers to give pseudo singular values")
    return found


def pseudo_svd_layers(model: nn.Module) -> dict[str, PLambdaQ]:
    """The PLambdaQ of every LoRA layer `add_pseudo_svd` prepared, by module name."""
    return {
        strip_prefix(name): PLambdaQ(layer, getattr(layer, SV_ATTR))
        for name, layer in model.named_modules()
        if isinstance(layer, LoraLayer) and hasattr(layer, SV_ATTR)
    }


def orthogonality(layers: dict[str, PLambdaQ]) -> Tensor:
    """sum over layers of ||P^T P - I||_F^2 + ||Q Q^T - I||_F^2 (a scalar)."""
    total = None
    for part in layers.values():
        P, Q = part.P, part.Q
        eye = torch.eye(P.shape[1], dtype=P.dtype, device=P.device)
        term = ((P.T @ P - eye) ** 2).sum() + ((Q @ Q.T - eye) ** 2).sum()
        total = term if total is None else total + term
    return total


def vectors(layers: dict[str, PLambdaQ]) -> list[nn.Parameter]:
    """Every P and Q (the pseudo singular vectors: BiLoRA's lower level)."""
    return [p for part in layers.values() for p in (part.P, part.Q)]


def values(layers: dict[str, PLambdaQ]) -> list[nn.Parameter]:
    """Every lambda (the pseudo singular values: BiLoRA's upper level)."""
    return [part.lam for part in layers.values()]


@contextmanager
def constant_values(layers: dict[str, PLambdaQ]):
    """Within the block, forwards use lambda as a constant: no gradient reaches it."""
    for part in layers.values():
        part.values.detached = True
    try:
        yield
    finally:
        for part in layers.values():
            part.values.detached = False


@contextmanager
def constant_vectors(layers: dict[str, PLambdaQ]):
    """Within the block, forwards use P and Q as constants: no gradient reaches them."""
    params = vectors(layers)
    before = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(params, before, strict=True):
            p.requires_grad_(flag)


@torch.no_grad()
def fold(layers: dict[str, PLambdaQ]) -> dict[str, tuple[Tensor, Tensor]]:
    """{module: (A, B)} of the plain LoRA with the same delta: A = Q, B = P diag(lambda)."""
    return {
        name: (part.Q.detach().clone(), (part.P * part.lam).detach().clone())
        for name, part in layers.items()
    }
