"""Load a base model and tokenizer; GGUF files are de-quantised once and cached as safetensors."""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from lorafleet.errors import LorafleetError
from lorafleet.models.cache import MARKER, converted_dir, quiet_transformers
from lorafleet.models.device import DEVICES, resolve_device
from lorafleet.models.fingerprint import fingerprint
from lorafleet.models.sources import BaseSource, embedded_gguf_path, resolve_base
from lorafleet.models.tiny_bases import build_tiny_base
from lorafleet.paths import cache_dir

# The dtypes a base can be loaded (and served) in: weights, adapter slots and KV cache.
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """A DTYPES name (also fp32 / bf16) or torch dtype -> torch.dtype, else a one-line error."""
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    name = {"fp32": "float32", "bf16": "bfloat16"}.get(str(dtype).lower(), str(dtype).lower())
    if name not in DTYPES:
        raise LorafleetError(f"unknown dtype {dtype!r}: use {' or '.join(DTYPES)}")
    return DTYPES[name]


@dataclass
class Base:
    """A loaded base model with what adapters need to know about it."""

    name: str
    model: PreTrainedModel
    tokenizer: object
    fingerprint: str
    source: BaseSource
    from_cache: bool
    load_seconds: float


def _gguf_file(source: BaseSource) -> Path:
    if source.embedded is not None:
        return embedded_gguf_path(source.embedded, cache_dir() / "gguf")
    return Path(source.location)


def _convert_gguf(source: BaseSource, target: Path) -> None:
    """De-quantise a GGUF file with transformers and save it (model + tokenizer) atomically."""
    gguf = _gguf_file(source)
    print(
        f"lorafleet: converting {gguf.name} to safetensors (first use only) -> {target}",
        file=sys.stderr,
    )
    with quiet_transformers(show_progress=True):
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # The de-quantised weights are plain tensors; drop the GGUF quantizer so they can be saved.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        with quiet_transformers(show_progress=False):
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
        (tmp / MARKER).write_text(json.dumps({"source": str(gguf), "name": source.name}))
        if target.exists():  # a stale or half-written copy from an older run
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


@torch.no_grad()
def cast_parameters(model: torch.nn.Module, dtype: str | torch.dtype) -> torch.nn.Module:
    """Cast `model`'s floating parameters to `dtype` in place; buffers (RoPE's inv_freq) keep
    theirs, as transformers' from_pretrained(dtype=...) leaves them."""
    dtype = parse_dtype(dtype)
    for param in model.parameters():
        if param.is_floating_point() and param.dtype != dtype:
            param.data = param.data.to(dtype)
    return model


def _from_dir(path: str | Path, dtype: torch.dtype, show_progress: bool = False):
    with quiet_transformers(show_progress=show_progress):
        tokenizer = AutoTokenizer.from_pretrained(str(path))
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
    return model, tokenizer


def load_base(
    name: str,
    *,
    dtype: str | torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> Base:
    """Load an embedded model (`default`, `gemma-270m`, `qwen2.5-coder-0.5b`), a tiny random
    one (`tiny`, `tiny-qwen3`, ...: models/sources.TINY), a model dir, a .gguf file or a hub id,
    in eval mode, with every weight in `dtype` (float32 or bfloat16; a name or a torch dtype),
    on `device`: a `--device` name (auto | cpu | cuda: models/device.py; cuda without a GPU is
    a one-line error before anything loads) or any torch device."""
    start = time.perf_counter()
    dtype = parse_dtype(dtype)
    if isinstance(device, str) and device.strip().lower() in DEVICES:
        device = resolve_device(device)
    source = resolve_base(name)
    from_cache = False
    try:
        if source.kind in ("embedded", "gguf"):
            target = converted_dir(source)
            from_cache = (target / MARKER).is_file()
            if not from_cache:
                _convert_gguf(source, target)
            model, tokenizer = _from_dir(target, dtype)
        elif source.kind == "tiny":
            model, tokenizer = build_tiny_base(source.location)
            cast_parameters(model, dtype)
        elif source.kind == "dir":
            model, tokenizer = _from_dir(source.location, dtype)
        else:
            model, tokenizer = _from_dir(source.location, dtype, show_progress=True)
    except LorafleetError:
        raise
    except (OSError, ValueError, KeyError) as exc:
        where = "the hub (are you online?)" if source.kind == "hub" else source.location
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
        raise LorafleetError(f"could not load base '{name}' from {where}: {first}") from exc
    model.to(device).eval()
    if getattr(tokenizer, "pad_token_id", None) is None:
        tokenizer.pad_token = tokenizer.eos_token
    return Base(
        name=name,
        model=model,
        tokenizer=tokenizer,
        fingerprint=fingerprint(model),
        source=source,
        from_cache=from_cache,
        load_seconds=time.perf_counter() - start,
    )
