"""MoLE's per-layer gates (a MixtureGate): softmax with temperature over K frozen experts."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import Tensor, nn

# The paper's gate reads the experts' outputs; the official code's reads the layer input.
VARIANTS = ("outputs", "input")
DEFAULT_VARIANT = "outputs"
INIT_STD = 0.01  # the official code's gate init (near-uniform weights at the start)


def gate_key(layer: str) -> str:
    """The gate's parameter name for module `layer` (ParameterDict keys cannot hold dots)."""
    return layer.replace(".", "__")


def gate_probs(logits: Tensor, temperature: float, keep: Tensor | None = None) -> Tensor:
    """softmax(logits / temperature) over the last dim; with `keep` ([K] bool), the dropped
    experts get 0 and the rest are renormalised (= the softmax over the kept logits)."""
    w = torch.softmax(logits / temperature, dim=-1)  # [n, K]
    if keep is None:
        return w
    w = w * keep.to(w.dtype)
    return w / w.sum(dim=-1, keepdim=True)


def balance_loss(weights: Iterable[Tensor], row_mask: Tensor | None = None) -> Tensor:
    """MoLE's balancing loss -log prod_i q_i = -sum_i log q_i, q_i the (normalised) mean gate
    weight of expert i over the rows `row_mask` selects ([n] 0/1), averaged over the layers'
    weights ([n, K] each). Minimal (K log K) when every expert gets 1/K on average."""
    losses = []
    for w in weights:
        m = torch.ones(w.shape[0], dtype=w.dtype, device=w.device) if row_mask is None else row_mask
        m = m.to(device=w.device, dtype=w.dtype)[:, None]  # [n, 1]
        q = (w * m).sum(0) / m.sum().clamp_min(1.0)  # [K]
        q = q / q.sum()
        losses.append(-torch.log(q).sum())
    if not losses:
        raise ValueError("no gate weights were recorded: run a forward first")
    return torch.stack(losses).mean()


class MoleGates(nn.Module):
    """One gate per adapted layer over K experts (MoLE's hierarchical control).

    variant "outputs" (the paper): eps = L2norm(flatten(delta_1 (+) ... (+) delta_K)) per row,
    g = softmax(W eps / tau), W: [K, K*d_out]. variant "input" (the official code):
    g = softmax(W L2norm(x) / tau), W: [K, d_in]. Both without bias, init N(0, 0.01^2), so
    every gate starts near 1/K (MoLE starts as the average of its experts).

    `layers`: module name -> (d_in, d_out). `keep` masks experts at inference. In training
    mode each call's weights are kept in `recorded` for `balance_loss`."""

    def __init__(
        self,
        layers: Mapping[str, tuple[int, int]],
        n_experts: int,
        variant: str = DEFAULT_VARIANT,
        temperature: float = 1.0,
    ):
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"gate variant must be one of {', '.join(VARIANTS)}, got {variant!r}")
        if n_experts < 1 or temperature <= 0:
            raise ValueError("a MoLE needs >= 1 expert and a temperature > 0")
        self.variant, self.temperature, self.n_experts = variant, float(temperature), n_experts
        self.layer_names = sorted(layers)
        width = {
            name: (d_in if variant == "input" else n_experts * d_out)
            for name, (d_in, d_out) in layers.items()
        }
        self.weight = nn.ParameterDict(
            {
                gate_key(n): nn.Parameter(INIT_STD * torch.randn(n_experts, width[n]))
                for n in self.layer_names
            }
        )
        self.keep: Tensor | None = None
        self.recorded: list[Tensor] = []

    @property
    def wants_deltas(self) -> bool:
        # Training goes through the direct (differentiable) mixture path for both variants.
        return self.variant == "outputs" or self.training

    def keep_mask(self, dropped: Iterable[int]) -> Tensor | None:
        """[K] bool: False for the dropped experts (indices); None when none is dropped."""
        dropped = set(dropped)
        if not dropped:
            return None
        if len(dropped) >= self.n_experts:
            raise ValueError("the mask drops every expert; keep at least one")
        param = next(self.parameters(), None)  # made where the gates are (no copy per step)
        where = param.device if param is not None else None
        return torch.tensor([i not in dropped for i in range(self.n_experts)], device=where)

    def set_mask(self, dropped: Iterable[int]) -> None:
        """Drop these experts (indices) at inference; the rest are renormalised."""
        self.keep = self.keep_mask(dropped)

    def masked(self, dropped: Iterable[int]) -> MaskedGates:
        """A MixtureGate over these gates with the experts `dropped` (one per request)."""
        return MaskedGates(self, self.keep_mask(dropped))

    def logits(self, layer: str, x: Tensor, deltas: Tensor | None) -> Tensor:
        """[n, K] gate logits for rows x: [n, d_in] (deltas: [n, K, d_out])."""
        key = gate_key(layer)
        if key not in self.weight:
            raise ValueError(f"no MoLE gate for layer {layer}")
        W = self.weight[key]
        if self.variant == "outputs":
            if deltas is None:
                raise ValueError("the outputs gate needs the experts' outputs")
            feats = deltas.reshape(deltas.shape[0], -1)  # [n, K*d_out]
        else:
            feats = x  # [n, d_in]
        feats = nn.functional.normalize(feats.to(W.dtype), dim=-1)
        return feats @ W.T  # [n, K]

    def forward(
        self, layer: str, x: Tensor, slots: tuple[int, ...], deltas: Tensor | None = None
    ) -> Tensor:
        if len(slots) != self.n_experts:
            raise ValueError(f"{len(slots)} slots for a MoLE of {self.n_experts} experts")
        return self.weights(layer, x, deltas, self.keep)

    def weights(
        self, layer: str, x: Tensor, deltas: Tensor | None, keep: Tensor | None = None
    ) -> Tensor:
        """[n, K] weights for rows x (in x's dtype), experts outside `keep` dropped. A layer
        without a gate (no expert adapts it; another adapter made it run) gets zeros."""
        if gate_key(layer) not in self.weight:
            return x.new_zeros(x.shape[0], self.n_experts)
        keep = None if keep is None else keep.to(x.device)
        w = gate_probs(self.logits(layer, x, deltas), self.temperature, keep)
        if self.training:
            self.recorded.append(w)
        return w.to(x.dtype)

    def take_recorded(self) -> list[Tensor]:
        """The weights recorded since the last call (and forget them)."""
        out, self.recorded = self.recorded, []
        return out


class MaskedGates:
    """MoleGates with a fixed expert mask: a MixtureGate of its own, so requests with
    different masks share one set of gates."""

    def __init__(self, gates: MoleGates, keep: Tensor | None):
        self.gates, self.keep = gates, keep

    @property
    def wants_deltas(self) -> bool:
        return self.gates.wants_deltas

    def __call__(
        self, layer: str, x: Tensor, slots: tuple[int, ...], deltas: Tensor | None = None
    ) -> Tensor:
        if len(slots) != self.gates.n_experts:
            raise ValueError(f"{len(slots)} slots for a MoLE of {self.gates.n_experts} experts")
        return self.gates.weights(layer, x, deltas, self.keep)


def gates_from_tensors(
    tensors: Mapping[str, Tensor], variant: str, temperature: float
) -> MoleGates:
    """MoleGates holding `tensors` (layer name -> W [K, width]) as saved, without a model."""
    K = {int(t.shape[0]) for t in tensors.values()}
    if len(K) != 1:
        raise ValueError("the gates disagree on the number of experts")
    k = K.pop()
    div = 1 if variant == "input" else k
    layers = {n: (int(t.shape[1]), int(t.shape[1]) // div) for n, t in tensors.items()}
    gates = MoleGates(layers, k, variant=variant, temperature=temperature)
    with torch.no_grad():
        for n, t in tensors.items():
            gates.weight[gate_key(n)].copy_(t)
    return gates.eval()
