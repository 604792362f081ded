"""FedEx-LoRA's residual: weight deltas keyed by the base model's own names, folded into W.

`DIR/global/residual.safetensors` maps e.g. `model.layers.0.self_attn.q_proj.weight` to the
delta to add to that weight (accumulated over rounds; empty for fedavg and ffa). The global
model is base + residual + adapter; `load_fed_model` builds it for `eval` and `generate`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from lorafleet.adapters.lora_keys import base_name, is_adapter_param
from lorafleet.errors import LorafleetError
from lorafleet.fsutil import atomic_write

RESIDUAL_FILE = "residual.safetensors"
META_KEY = "lorafleet"


def base_parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    """The base model's parameters under its own names, also inside a PEFT wrapper
    (`base_model.model.` and `.base_layer.` undone; adapter weights left out)."""
    out = {}
    for name, p in model.named_parameters():
        if not is_adapter_param(name):
            out[base_name(name)] = p
    return out


@torch.no_grad()
def apply_residual(
    model: nn.Module, residual: dict[str, torch.Tensor], where: str | Path = "residual"
) -> None:
    """W += delta for every entry, in place, in W's dtype and device."""
    params = base_parameters(model)
    for name, delta in residual.items():
        p = params.get(name)
        if p is None:
            raise LorafleetError(f"{where}: {name} is not a weight of this base model")
        if tuple(p.shape) != tuple(delta.shape):
            raise LorafleetError(
                f"{where}: {name} has shape {tuple(delta.shape)}, the base's is {tuple(p.shape)}"
            )
        p.add_(delta.to(device=p.device, dtype=p.dtype))


def add_residuals(
    total: dict[str, torch.Tensor], new: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Accumulate one round's residuals into the running total (a new dict)."""
    out = dict(total)
    for name, delta in new.items():
        out[name] = out[name] + delta if name in out else delta.clone()
    return out


def write_residual(path: Path, residual: dict[str, torch.Tensor], meta: dict) -> Path:
    """Atomically write a residual file (an empty one is valid: fedavg/ffa, or round 0)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in residual.items()}
    header = {META_KEY: json.dumps(meta, sort_keys=True)}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=header))
    return path


def read_residual(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, metadata) of a residual file; a bad file is a one-line error."""
    if not path.is_file():
        raise LorafleetError(f"{path}: missing (not a federated run directory?)")
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open API)
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise LorafleetError(f"{path}: not a valid safetensors file ({exc})") from exc
    for key, t in tensors.items():
        if not bool(torch.isfinite(t).all()):
            raise LorafleetError(f"{path}: tensor {key} has non-finite values")
    try:
        meta = json.loads(header.get(META_KEY, "{}"))
    except json.JSONDecodeError:
        meta = {}
    return tensors, meta if isinstance(meta, dict) else {}


def load_fed_model(
    base: str, fed_dir: Path, force: bool = False, max_rank: int = 256, *, adapter=None
):
    """(loaded base, adapter, model) for the global model of a federated run directory:
    the base with `global/residual.safetensors` added, then `global/adapter/` attached."""
    from lorafleet.adapters import load_adapter
    from lorafleet.models import load_base

    if adapter is not None:
        raise LorafleetError("give --adapter or --fed, not both (--fed brings its own adapter)")
    fed_dir = Path(fed_dir)
    if not (fed_dir / "global").is_dir():
        raise LorafleetError(f"{fed_dir}: no global/ directory (not a `lorafleet fed` output)")
    residual_path = fed_dir / "global" / RESIDUAL_FILE
    residual, meta = read_residual(residual_path)
    loaded = load_base(base)
    recorded = meta.get("base_fingerprint")
    if recorded and recorded != loaded.fingerprint and not force:
        raise LorafleetError(
            f"{residual_path}: made for base {recorded}, not {loaded.fingerprint} "
            "(--force to use it anyway)"
        )
    # The fingerprint was taken at load time, before the residual changes the weights, so
    # the adapter's own base check still compares against the original base.
    apply_residual(loaded.model, residual, residual_path)
    info, model = load_adapter(
        fed_dir / "global" / "adapter",
        loaded.model,
        base_fingerprint=loaded.fingerprint,
        max_rank=max_rank,
        force=force,
    )
    return loaded, info, model
