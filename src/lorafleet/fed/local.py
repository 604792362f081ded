"""A client's round: start from the global model, train S local steps, return the adapter.

The step is lorafleet.train's public `StepRunner` with the default `LanguageModelStep` (same
loss normalisation, clipping and data order as `lorafleet train`); only the optimizer is fresh
each round, as in the FedEx-LoRA reference, and under FFA-LoRA the A matrices are frozen.
"""

from __future__ import annotations

import time

import torch
from peft import PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from torch import nn

from lorafleet.adapters import MethodConfig, adapter_from_model, new_adapter
from lorafleet.adapters.methods import peft_config_from_dict
from lorafleet.data import Encoded
from lorafleet.errors import LorafleetError
from lorafleet.fed.aggregate import ClientUpdate, base_weight_name, lora_modules
from lorafleet.fed.config import FedConfig
from lorafleet.fed.residual import base_parameters
from lorafleet.train import (
    Batches,
    Distributed,
    LanguageModelStep,
    OptimizerConfig,
    ScheduleConfig,
    StepRunner,
    build_optimizer,
    build_scheduler,
)


class ClientTimeout(LorafleetError):
    """A client ran past its time budget for the round."""


def clock() -> float:
    """Seconds on the clock client deadlines are measured with (a function tests can move)."""
    return time.monotonic()


def local_seed(seed: int, round_: int, client: int) -> int:
    """The data-order seed of one client in one round (distinct per client and round)."""
    return seed * 1_000_003 + round_ * 1_009 + client


def initial_adapter(model: nn.Module, cfg: FedConfig) -> tuple[PeftModel, dict, dict]:
    """Wrap `model` with the run's fresh adapter (A drawn from the seed, B = 0); returns
    (PEFT model, adapter config dict, tensors under PEFT's on-disk keys)."""
    torch.manual_seed(cfg.seed)
    method = MethodConfig(cfg.method, cfg.rank, cfg.alpha, cfg.targets, 0.0)
    peft_model = new_adapter(model, method)
    adapter = adapter_from_model(peft_model)
    return peft_model, adapter.config, {k: v.detach().clone() for k, v in adapter.tensors.items()}


def trainable_model(model: nn.Module, adapter_config: dict) -> PeftModel:
    """Wrap `model` with an adapter of this config, ready to train (values set later)."""
    config = peft_config_from_dict(adapter_config)
    config.inference_mode = False
    return get_peft_model(model, config)


class BaseSnapshot:
    """The original weights of the adapted layers, so that W = W0 + accumulated residual is
    computed the same way in every process (the simulation, a SuperNode, the ServerApp)."""

    def __init__(self, model: nn.Module, tensors: dict):
        params = base_parameters(model)
        names = [base_weight_name(prefix) for prefix in lora_modules(tensors)]
        self.originals = {n: params[n].detach().clone() for n in names}

    @torch.no_grad()
    def set(self, model: nn.Module, residual: dict[str, torch.Tensor]) -> None:
        params = base_parameters(model)
        for name, original in self.originals.items():
            delta = residual.get(name)
            params[name].copy_(original if delta is None else original + delta.to(original.dtype))
        unknown = sorted(set(residual) - set(self.originals))
        if unknown:
            raise LorafleetError(f"residual for {unknown[0]}, which the adapter does not adapt")


def load_global(model: PeftModel, tensors: dict, *, freeze_a: bool) -> None:
    """Set the adapter to the global values and choose what trains (B always; A unless FFA)."""
    result = set_peft_model_state_dict(model, tensors)
    missing = [k for k in result.missing_keys if "lora_" in k]
    if missing:
        raise LorafleetError(f"global adapter lacks {missing[0]}")
    for name, p in model.named_parameters():
        if "lora_A" in name:
            p.requires_grad_(not freeze_a)
        elif "lora_B" in name:
            p.requires_grad_(True)


def local_train(
    model: PeftModel,
    data: list[Encoded],
    cfg: FedConfig,
    *,
    round_: int,
    client: int,
    pad_token_id: int,
    deadline: float | None = None,
) -> ClientUpdate:
    """Train `cfg.local_steps` steps on `data` from the model's current (global) state."""
    if not data:
        raise LorafleetError(f"client {client} has no training examples")
    lm_step = LanguageModelStep()  # trains what requires grad: B, and A unless FFA
    optimizer = build_optimizer(
        lm_step.param_groups(model), OptimizerConfig(cfg.lr, 0.0, cfg.max_grad_norm)
    )
    scheduler = build_scheduler(optimizer, ScheduleConfig(cfg.local_steps, cfg.warmup))
    batches = Batches(
        data,
        batch_size=cfg.batch_size,
        pad_token_id=pad_token_id,
        seed=local_seed(cfg.seed, round_, client),
        dist=Distributed(device=next(model.parameters()).device),
    )
    run_step = StepRunner(
        model, lm_step, batches, optimizer, scheduler, max_grad_norm=cfg.max_grad_norm
    )
    model.train()
    losses = []
    try:
        for step in range(cfg.local_steps):
            losses.append(run_step(step).loss)
            if deadline is not None and clock() > deadline:
                raise ClientTimeout(
                    f"client {client} timed out after step {step + 1}/{cfg.local_steps}"
                )
    finally:
        model.eval()
    tensors = {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}
    metrics = {"first_loss": losses[0], "last_loss": losses[-1], "examples": len(data)}
    return ClientUpdate(client=client, tensors=tensors, weight=float(len(data)), metrics=metrics)
