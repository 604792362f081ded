"""BiLoRA training: P diag(lambda) Q per linear, P and Q on D1 (lower level), lambda on D2.

The training data is split once into D1 / D2 (`bilevel_split` of it in D1; seeded, so the same
seed gives the same split). After `warm_start` joint steps (P, Q and lambda together on D1
batches; 0 by default), optimizer steps alternate: the first is an upper-level step (lambda on a
D2 batch, P and Q held constant), the next a lower-level step (P and Q on a D1 batch plus
`ortho_weight` x the orthogonality regulariser, lambda held constant), and so on. Variants:

- `first` (the default): the upper step uses grad_lambda L2(P, Q, lambda), the first-order
  approximation. It costs one forward/backward per step, like LoRA, and the spec marks the
  paper's exact hypergradient as uncertain, so the cheap variant is the default.
- `second`: the one-step unrolled hypergradient (DARTS): with V = {P, Q},
  V' = V - xi grad_V L1(V, lambda), the upper step uses
  grad_lambda L2(V', lambda) - xi [grad_lambda L1(V+, lambda) - grad_lambda L1(V-, lambda)] / 2e,
  V+- = V +- e grad_V' L2(V', lambda), e = 0.01 / ||grad_V' L2||, xi = the run's --lr.
  About four forward/backward passes per upper step.
- `joint`: the control without bi-level optimisation: every P, Q and lambda on all the data
  with the regulariser, each step.

Lambda is real-valued (the first of the paper's three ablated forms; softmax and approximately
binary are not built) and starts at 0, P and Q orthonormal, so the delta starts at exactly 0.
Lambda has its own learning rate (`lambda_lr`, 5e-2 by default, in every variant): Adam moves
each coordinate by about its lr per step whatever the gradient's size, and with P, Q orthonormal
||delta W||_2 = max|lambda|, so at the run's lr (1e-3) delta W could grow by only ~1e-3 per upper
step, while a LoRA's s B A (d_out x r entries of B, each moving by lr) grows by ~0.05 per step on
SmolLM2's width (bench/bilora_experiment.py --toy: max ||delta W||_2 after 32 steps 1.55 for
LoRA, 0.009 first-order and 0.019 joint with lambda at lr 1e-3, 0.19 / 0.48 at 2e-2). P and Q
get a gradient from the first lower step on (lambda has moved by then): it is lambda's step
size, not a missing gradient, that held the bi-level variants at the base model.

Saved as plain PEFT LoRA (A = Q, B = P diag(lambda), alpha = r so the scale is exactly 1); the
lorafleet metadata says it was trained with BiLoRA, and how.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from lorafleet.adapters import peft_key
from lorafleet.adapters.methods import get_method, with_trainer
from lorafleet.errors import LorafleetError
from lorafleet.layers.bilora import (
    SV_ATTR,
    add_pseudo_svd,
    constant_values,
    constant_vectors,
    fold,
    orthogonality,
    pseudo_svd_layers,
    values,
    vectors,
)

# BiLoRA's settings live in the light bilora_config (the CLI reads them); kept importable here.
from lorafleet.train.bilora_config import TRAINER_KIND, BiLoRAConfig
from lorafleet.train.bilora_config import bilora_options as bilora_options
from lorafleet.train.builders import ParamGroup, build_model
from lorafleet.train.config import TrainConfig
from lorafleet.train.loop import Trainer
from lorafleet.train.step import Batch, Batches, StepOutput

FD_RADIUS = 0.01  # DARTS' finite-difference step, divided by ||grad_V' L2||


def split_indices(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """D1 and D2 as sorted indices into n examples: a seeded permutation, D1 its first
    round(fraction n) (each side keeps at least one)."""
    if n < 2:
        raise LorafleetError(
            f"BiLoRA splits the data into D1 and D2: it needs >= 2 examples, got {n}"
        )
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 7919)).tolist()
    n1 = min(n - 1, max(1, round(fraction * n)))
    return sorted(perm[:n1]), sorted(perm[n1:])


JOINT, UPPER, LOWER = "joint", "upper", "lower"


def phase(step: int, warm_start: int = 0) -> str:
    """What optimizer step `step` (0-based) updates: the first `warm_start` steps are joint (P, Q
    and lambda on D1), then upper (lambda on D2) and lower (P and Q on D1) alternate, upper
    first."""
    if step < warm_start:
        return JOINT
    return UPPER if (step - warm_start) % 2 == 0 else LOWER


def is_upper(step: int, warm_start: int = 0) -> bool:
    """Whether step `step` is an upper-level step (lambda on a D2 batch)."""
    return phase(step, warm_start) == UPPER


@dataclass
class BilevelBatch(Batch):
    """An upper-level micro-batch (from D2) and, for `second`, its paired D1 micro-batch."""

    lower: Batch | None = None


class BilevelBatches(Batches):
    """D1 batches on lower and warm-start steps, D2 batches on upper steps (each a pure function
    of seed and step, as for every run). len() and global_size describe D1."""

    def __init__(self, d1, d2, *, pair: bool, warm_start: int = 0, **kw):
        super().__init__(d1, **kw)
        self.upper = Batches(d2, **{**kw, "seed": kw.get("seed", 0) + 1})
        self.pair = pair
        self.warm_start = warm_start

    def for_step(self, step: int):
        if not is_upper(step, self.warm_start):
            yield from super().for_step(step)
            return
        lowers = super().for_step(step) if self.pair else None
        for b in self.upper.for_step(step):
            lower = next(lowers, None) if lowers is not None else None
            yield BilevelBatch(b.inputs, b.num_items, b.share, b.step, lower)


def lm_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    return model(**batch.inputs, num_items_in_batch=batch.num_items).loss


class BiLoRAStep:
    """The TrainStep of every BiLoRA variant (see the module doc); logs `ortho` and `upper`."""

    def __init__(self, config: BiLoRAConfig, xi: float):
        self.config, self.xi = config, xi

    def param_groups(self, model: nn.Module) -> list[ParamGroup]:
        """P and Q at the run's lr; lambda at `lambda_lr` (see the module doc)."""
        layers = pseudo_svd_layers(model)
        return [
            ParamGroup("vectors", vectors(layers)),
            ParamGroup("values", values(layers), lr=self.config.lambda_lr),
        ]

    def loss(self, model: nn.Module, batch: Batch) -> StepOutput:
        layers = pseudo_svd_layers(model)
        gamma = self.config.ortho_weight
        step_phase = phase(batch.step, self.config.warm_start)
        if self.config.bilevel == "joint" or step_phase == JOINT:
            reg = orthogonality(layers)
            loss = lm_loss(model, batch) + batch.share * gamma * reg
            return StepOutput(loss, {"ortho": reg, "upper": 0.0})
        if step_phase == LOWER:
            reg = orthogonality(layers)
            with constant_values(layers):
                loss = lm_loss(model, batch) + batch.share * gamma * reg
            return StepOutput(loss, {"ortho": reg, "upper": 0.0})
        with torch.no_grad():
            reg = orthogonality(layers)
        if self.config.bilevel == "first" or getattr(batch, "lower", None) is None:
            with constant_vectors(layers):
                loss = lm_loss(model, batch)
            return StepOutput(loss, {"ortho": reg, "upper": 1.0})
        return StepOutput(self._unrolled(model, layers, batch), {"ortho": reg, "upper": 1.0})

    def _unrolled(self, model, layers, batch: BilevelBatch) -> torch.Tensor:
        """A loss whose value is L2(V') and whose gradient is the one-step hypergradient on
        lambda (nothing on P, Q)."""
        V, lam, xi = vectors(layers), values(layers), self.xi
        saved = [v.detach().clone() for v in V]
        lower_obj = lm_loss(model, batch.lower) + batch.lower.share * self.config.ortho_weight * (
            orthogonality(layers)
        )
        g1 = torch.autograd.grad(lower_obj, V)
        with torch.no_grad():
            for v, g in zip(V, g1, strict=True):
                v.sub_(xi * g)  # V' = V - xi grad_V L1
        upper = lm_loss(model, batch)
        grads = torch.autograd.grad(upper, lam + V)
        g_lam, g_v = grads[: len(lam)], grads[len(lam) :]
        eps = FD_RADIUS / max(float(torch.sqrt(sum((g**2).sum() for g in g_v))), 1e-12)
        plus = self._lower_lambda_grad(model, batch.lower, V, saved, g_v, eps)
        minus = self._lower_lambda_grad(model, batch.lower, V, saved, g_v, -eps)
        with torch.no_grad():
            for v, s in zip(V, saved, strict=True):
                v.copy_(s)
        hyper = [g - xi * (p - m) / (2 * eps) for g, p, m in zip(g_lam, plus, minus, strict=True)]
        surrogate = sum((p * h.detach()).sum() for p, h in zip(lam, hyper, strict=True))
        return surrogate - surrogate.detach() + upper.detach()

    @staticmethod
    def _lower_lambda_grad(model, lower: Batch, V, saved, direction, eps):
        """grad_lambda L1 at V = saved + eps * direction."""
        with torch.no_grad():
            for v, s, d in zip(V, saved, direction, strict=True):
                v.copy_(s + eps * d)
        layers = pseudo_svd_layers(model)
        with constant_vectors(layers):
            return torch.autograd.grad(lm_loss(model, lower), values(layers))


def build_bilora_model(base_model: nn.Module, cfg: TrainConfig) -> nn.Module:
    """A LoRA model with scale 1 whose layers are P diag(lambda) Q (layers/bilora.py)."""
    model = build_model(base_model, cfg)
    add_pseudo_svd(model, seed=cfg.seed)
    return model


class BiLoRATrainer(Trainer):
    """The trainer with BiLoRA's step, model, D1/D2 batches and folded adapter."""

    def __init__(self, cfg: TrainConfig, **kw):
        if get_method(cfg.method).trainer != TRAINER_KIND:
            names = " | ".join(with_trainer(TRAINER_KIND))
            raise LorafleetError(f"BiLoRATrainer trains --method {names}, not {cfg.method}")
        if cfg.gradient_checkpointing:
            raise LorafleetError(f"--method {cfg.method} does not support --gradient-checkpointing")
        self.bilora = BiLoRAConfig.of(cfg)
        step = BiLoRAStep(self.bilora, xi=cfg.lr)
        super().__init__(cfg, step=step, model_builder=build_bilora_model, **kw)
        self.split_sizes: tuple[int, int] | None = None

    def setup(self) -> None:
        super().setup()
        if self.bilora.bilevel == "joint":
            return
        d1, d2 = split_indices(len(self.train), self.bilora.bilevel_split, self.cfg.seed)
        self.split_sizes = (len(d1), len(d2))
        self.batches = BilevelBatches(
            [self.train[i] for i in d1],
            [self.train[i] for i in d2],
            pair=self.bilora.bilevel == "second",
            warm_start=self.bilora.warm_start,
            batch_size=self.cfg.batch_size,
            grad_accum=self.cfg.grad_accum,
            seed=self.cfg.seed,
            pad_token_id=self.base.tokenizer.pad_token_id,
            dist=self.dist,
        )
        self.runner.batches = self.batches
        self.collate = self.batches.collate

    def _adapter(self, meta: dict | None = None):
        adapter = super()._adapter(meta)
        # PEFT's state dict picks lambda up too; the saved adapter is plain LoRA without it.
        adapter.tensors = {k: v for k, v in adapter.tensors.items() if f".{SV_ATTR}." not in k}
        for module, (A, B) in fold(pseudo_svd_layers(self.model)).items():
            if peft_key(module, "B") not in adapter.tensors:
                raise LorafleetError(f"{module}: no LoRA weights to fold lambda into")
            adapter.tensors[peft_key(module, "A")] = A.cpu()
            adapter.tensors[peft_key(module, "B")] = B.cpu()
        adapter.meta["method"] = self.cfg.method
        adapter.meta["bilora"] = {
            **asdict(self.bilora),
            "split_sizes": self.split_sizes,
            "upper_steps": f"{self.bilora.warm_start}, {self.bilora.warm_start} + 2, ...",
            "saved_as": "lora: A = Q, B = P diag(lambda), alpha = r",
        }
        return adapter
