"""MoLE's gates (a MixtureGate): per transformer block (the paper) or per linear, over K experts."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn

# block (the paper): one gate per transformer block, on the experts' outputs, learnable tau;
# linear: one gate per adapted linear on the experts' outputs there, fixed tau (the paper's
# rejected finer-grained variant, this project's default before issue 29); input: one gate per
# linear on the layer input, fixed tau (the official code's gate input, per linear).
VARIANTS = ("block", "linear", "input")
DEFAULT_VARIANT = "block"
ALIASES = {"outputs": "linear"}  # MoLE directories written before the block gate existed
INIT_STD = 0.01  # the official code's gate init (near-uniform weights at the start)


def canonical_variant(variant: str) -> str:
    """The gate variant's current name (`outputs` -> `linear`); ValueError for an unknown one."""
    v = ALIASES.get(variant, variant)
    if v not in VARIANTS:
        raise ValueError(f"gate variant must be one of {', '.join(VARIANTS)}, got {variant!r}")
    return v


def gate_key(unit: str) -> str:
    """The gate's parameter name for module `unit` (ParameterDict keys cannot hold dots)."""
    return unit.replace(".", "__")


def block_of(layer: str) -> str:
    """The transformer block holding module `layer`: its name up to the first all-digit part
    (`model.layers.3.self_attn.q_proj` -> `model.layers.3`); a name without one is its own."""
    parts = layer.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[: i + 1])
    return layer


def group_blocks(layers: Iterable[str]) -> dict[str, list[str]]:
    """Block name -> its layers, both in the given (the model's execution) order."""
    blocks: dict[str, list[str]] = {}
    for name in layers:
        blocks.setdefault(block_of(name), []).append(name)
    return blocks


def gate_probs(logits: Tensor, temperature: float | Tensor, keep: Tensor | None = None) -> Tensor:
    """softmax(logits / temperature) over the last dim; with `keep` ([K] bool), the dropped
    experts get 0 and the rest are renormalised (= the softmax over the kept logits, computed
    as such: renormalising after the softmax gives 0/0 when the kept weights underflow)."""
    z = logits / temperature  # [n, K]
    if keep is not None:
        z = z.masked_fill(~keep.to(device=z.device, dtype=torch.bool), float("-inf"))
    return torch.softmax(z, dim=-1)


def balance_loss(weights: Iterable[Tensor], row_mask: Tensor | None = None) -> Tensor:
    """MoLE's balancing loss -log prod_i q_i = -sum_i log q_i, q_i the (normalised) mean gate
    weight of expert i over the rows `row_mask` selects ([n] 0/1), averaged over the gates'
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
    """MoLE's gates over K experts (hierarchical control: one gate per block or per layer).

    variant "block" (the paper): one gate per transformer block. Its features are the experts'
    outputs at the block's first adapted linear (its anchor, e.g. q_proj), per token:
    eps = L2norm(delta_1 (+) ... (+) delta_K) ([n, K*d_out]), g = softmax(W eps / tau) with
    W: [K, K*d_out] and tau = exp(log_tau) learnable (one per block); every linear of the
    block then uses the same g (computed once per forward, at the anchor, which runs first).
    variant "linear": one gate per adapted linear, the same features from that linear's own
    experts' outputs, fixed tau. variant "input": one gate per linear, g = softmax(W
    L2norm(x) / tau), W: [K, d_in], fixed tau. W has no bias and starts N(0, 0.01^2), so every
    gate starts near 1/K (MoLE starts as the average of its experts).

    `layers`: module name -> (d_in, d_out), in the model's execution order. `blocks`: block ->
    its layers (execution order; default: `group_blocks(layers)`). `keep` masks experts at
    inference. In training mode each gate's weights are kept in `recorded` for
    `balance_loss` (once per block for the block gate)."""

    def __init__(
        self,
        layers: Mapping[str, tuple[int, int]],
        n_experts: int,
        variant: str = DEFAULT_VARIANT,
        temperature: float = 1.0,
        blocks: Mapping[str, Sequence[str]] | None = None,
    ):
        super().__init__()
        variant = canonical_variant(variant)
        if n_experts < 1 or not temperature > 0:
            raise ValueError("a MoLE needs >= 1 expert and a temperature > 0")
        self.variant, self.temperature, self.n_experts = variant, float(temperature), n_experts
        self.layer_names = sorted(layers)
        if variant == "block":
            blocks = {b: list(ls) for b, ls in (blocks or group_blocks(layers)).items()}
            missing = [n for ls in blocks.values() for n in ls if n not in layers]
            if missing or not all(blocks.values()):
                raise ValueError(f"block gates name layers the model lacks: {missing[:3]}")
        else:
            blocks = {n: [n] for n in self.layer_names}
        self.blocks = blocks
        self.units = sorted(blocks)  # one gate each
        self.unit_of = {layer: unit for unit, ls in blocks.items() for layer in ls}
        self.anchor = {unit: ls[0] for unit, ls in blocks.items()}

        def width(unit: str) -> int:
            d_in, d_out = layers[self.anchor[unit]]
            return d_in if variant == "input" else n_experts * d_out

        self.weight = nn.ParameterDict(
            {
                gate_key(u): nn.Parameter(INIT_STD * torch.randn(n_experts, width(u)))
                for u in self.units
            }
        )
        self.log_temperature = nn.ParameterDict(
            {
                gate_key(u): nn.Parameter(torch.full((1,), math.log(temperature)))
                for u in (self.units if variant == "block" else ())
            }
        )
        self.keep: Tensor | None = None
        self.recorded: list[Tensor] = []
        self.cache: dict[str, Tensor] = {}

    @property
    def wants_deltas(self) -> bool:
        # Training goes through the direct (differentiable) mixture path for every variant.
        return self.variant != "input" or self.training

    def tau(self, unit: str) -> float | Tensor:
        """The gate's temperature: learnable ([1]) for block gates, else the fixed float."""
        if self.variant == "block":
            return self.log_temperature[gate_key(unit)].exp()
        return self.temperature

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

    def logits(self, unit: str, x: Tensor, deltas: Tensor | None) -> Tensor:
        """[n, K] logits of gate `unit` for rows x: [n, d_in] (deltas: [n, K, d_out])."""
        W = self.weight[gate_key(unit)]
        if self.variant == "input":
            feats = x  # [n, d_in]
        elif deltas is None:
            raise ValueError("a MoLE gate on the experts' outputs needs them")
        else:
            feats = deltas.reshape(deltas.shape[0], -1)  # [n, K*d_out]
        feats = nn.functional.normalize(feats.to(W.dtype), dim=-1)
        return feats @ W.T  # [n, K]

    def forward(
        self, layer: str, x: Tensor, slots: tuple[int, ...], deltas: Tensor | None = None
    ) -> Tensor:
        if len(slots) != self.n_experts:
            raise ValueError(f"{len(slots)} slots for a MoLE of {self.n_experts} experts")
        return self.weights(layer, x, deltas, self.keep, self.cache)

    def weights(
        self,
        layer: str,
        x: Tensor,
        deltas: Tensor | None,
        keep: Tensor | None = None,
        cache: dict[str, Tensor] | None = None,
    ) -> Tensor:
        """[n, K] weights for rows x (in x's dtype), experts outside `keep` dropped. A layer
        without a gate (no expert adapts it; another adapter made it run) gets zeros. A block
        gate computes at its anchor and stores the weights in `cache` (one per caller: the
        rows are the caller's); the block's later layers reuse them."""
        unit = self.unit_of.get(layer)
        if unit is None:
            return x.new_zeros(x.shape[0], self.n_experts)
        cache = self.cache if cache is None else cache
        if self.variant == "block" and layer != self.anchor[unit]:
            w = cache.get(unit)
            if w is None or w.shape[0] != x.shape[0]:
                raise ValueError(
                    f"the gate of block {unit} has no weights for these {x.shape[0]} rows: "
                    f"its first layer {self.anchor[unit]} must run before {layer}"
                )
            return w.to(x.dtype)
        keep = None if keep is None else keep.to(x.device)
        w = gate_probs(self.logits(unit, x, deltas), self.tau(unit), keep)
        if self.variant == "block":
            cache[unit] = w
        if self.training:
            self.recorded.append(w)
        return w.to(x.dtype)

    def take_recorded(self) -> list[Tensor]:
        """The weights recorded since the last call (and forget them)."""
        out, self.recorded = self.recorded, []
        return out

    def export(self) -> dict[str, Tensor]:
        """The tensors to save: `UNIT.gate` (W) and, for block gates, `UNIT.log_temperature`."""
        out = {f"{u}.gate": self.weight[gate_key(u)] for u in self.units}
        out.update(
            {
                f"{u}.log_temperature": self.log_temperature[gate_key(u)]
                for u in self.units
                if gate_key(u) in self.log_temperature
            }
        )
        return {k: v.detach().float().cpu().contiguous() for k, v in out.items()}

    def load_tensors(self, tensors: Mapping[str, Tensor]) -> None:
        """Copy saved tensors (as `export` names them) in; ValueError naming a mismatch."""
        mine = self.export()
        if set(tensors) != set(mine):
            extra = sorted(set(tensors) ^ set(mine))[:2]
            raise ValueError(f"the saved gates do not match this model's gates ({extra})")
        with torch.no_grad():
            for name, t in tensors.items():
                unit, _, kind = name.rpartition(".")
                p = (self.weight if kind == "gate" else self.log_temperature)[gate_key(unit)]
                if tuple(t.shape) != tuple(p.shape):
                    raise ValueError(
                        f"the gate {name} has shape {tuple(t.shape)}, expected {tuple(p.shape)}"
                    )
                p.copy_(t)

    def temperatures(self) -> dict[str, float]:
        """Each gate's current temperature."""
        return {u: float(torch.as_tensor(self.tau(u)).detach()) for u in self.units}


class MaskedGates:
    """MoleGates with a fixed expert mask: a MixtureGate of its own, so requests with
    different masks share one set of gates (each with its own block-weight cache)."""

    def __init__(self, gates: MoleGates, keep: Tensor | None):
        self.gates, self.keep = gates, keep
        self.cache: dict[str, Tensor] = {}

    @property
    def wants_deltas(self) -> bool:
        return self.gates.wants_deltas

    def __call__(
        self, layer: str, x: Tensor, slots: tuple[int, ...], deltas: Tensor | None = None
    ) -> Tensor:
        if len(slots) != self.gates.n_experts:
            raise ValueError(f"{len(slots)} slots for a MoLE of {self.gates.n_experts} experts")
        return self.gates.weights(layer, x, deltas, self.keep, self.cache)


def gates_from_tensors(
    tensors: Mapping[str, Tensor],
    variant: str,
    temperature: float,
    blocks: Mapping[str, Sequence[str]] | None = None,
) -> MoleGates:
    """MoleGates holding `tensors` (`UNIT.gate` W [K, width], block gates also
    `UNIT.log_temperature`) as saved, without a model; block gates need `blocks`."""
    variant = canonical_variant(variant)
    gates = {k.removesuffix(".gate"): t for k, t in tensors.items() if k.endswith(".gate")}
    K = {int(t.shape[0]) for t in gates.values()}
    if len(K) != 1:
        raise ValueError("the gates disagree on the number of experts")
    k = K.pop()
    if variant == "block":
        if not blocks or set(blocks) != set(gates):
            raise ValueError("block gates need the config's blocks, one per saved gate")
        # Only the anchor's d_out sizes a block gate; the other layers' sizes are not used.
        layers = {n: (0, int(gates[b].shape[1]) // k) for b, ls in blocks.items() for n in ls}
    else:
        div = 1 if variant == "input" else k
        layers = {n: (int(t.shape[1]), int(t.shape[1]) // div) for n, t in gates.items()}
    out = MoleGates(layers, k, variant=variant, temperature=temperature, blocks=blocks)
    out.load_tensors(tensors)
    return out.eval()
