"""What an adapter method declares (a `Method`, one per module of adapters/methods/), the parts
and slot entry it is made of, and PEFT's per-module rank / alpha / scale rules they share.

Serving (the batched multi-adapter op, layers/): every method is served per row, in the same
batch as LoRA rows, exactly as PEFT computes it in eval mode (dropout off), with W the base
weight [d_out, d_in] and b its bias. A method turns one adapted module's tensors into a
`SlotEntry`: a LoRA part (A [r, d_in], B [d_out, r], scale s: y = W x + b + s B A x) that goes
through the shared slot buffers, and optionally a per-row ratio or dense delta applied to that
row's output after it (DoRA, Bat; each method module says how). A method that cannot be served
that way says why instead (`Method.serve` is then a string), and the server refuses it in one
line.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from lorafleet.errors import LorafleetError

# Type names only: the registry stays light, so the CLI lists the methods without torch or PEFT.
if TYPE_CHECKING:
    from peft import PeftConfig
    from torch import Tensor

# The trainer kind of a method trained through PEFT's own layers (`get_peft_model`) by the
# plain composable trainer; any other kind names a trainer in train/ (train.trainer_for).
PEFT_TRAINER = "peft"
# The kind of train/bilora.py's BiLoRATrainer (P diag(lambda) Q, bi-level): named here once,
# where both the methods that declare it and the trainer that runs it read it.
BILEVEL_TRAINER = "pseudo-svd-bilevel"
# LoraConfig's defaults, used when a config leaves r or lora_alpha out (as PEFT does).
DEFAULT_R = 8
DEFAULT_ALPHA = 8


class MethodError(LorafleetError):
    """A method asked for something it does not have, or weights it cannot take (one line)."""


@dataclass(frozen=True)
class Dims:
    """What a part's expected shape depends on: the adapted linear's d_out x d_in (already
    swapped for fan_in_fan_out), the module's rank r and the adapter's config."""

    d_out: int
    d_in: int
    r: int
    config: Mapping


@dataclass(frozen=True)
class Part:
    """One tensor of an adapted module, stored by PEFT as `base_model.model.<module>.<suffix>`.
    `name` is what lora_keys.split_key calls it; `shape(dims)` is the shape it must have."""

    name: str
    suffix: str
    shape: Callable[[Dims], tuple[int, ...]]


def always(config: Mapping) -> bool:
    """A predicate over configs that holds for every config."""
    return True


def never(config: Mapping) -> bool:
    """A predicate over configs that holds for none."""
    return False


@dataclass(frozen=True)
class SharedPart:
    """A tensor shared by every adapted module, stored once under the model-level `key` (no
    module in it). `shape(config, dims)` is its shape given the Dims of every adapted module;
    `required(config)` says whether the config means it to be saved."""

    key: str
    shape: Callable[[Mapping, Sequence[Dims]], tuple[int, ...]]
    required: Callable[[Mapping], bool] = always


@dataclass
class SlotEntry:
    """One adapter's weights for one layer of the batched op: the LoRA part (A, B, scale; None
    for a dense-only method such as Bat) and DoRA's ratio or Bat's dense delta when the method
    has one."""

    A: Tensor | None  # [r, d_in]
    B: Tensor | None  # [d_out, r]
    scale: float = 1.0
    ratio: Tensor | None = None  # DoRA: m / ||W + s B A||_row, [d_out]
    dense: Tensor | None = None  # Bat: W' - W, [d_out, d_in]


@dataclass(frozen=True)
class ModuleWeights:
    """What a method's `serve` gets for one adapted module: its parts by name (already checked
    against the method's parts and shapes), the adapter's shared tensors by key, the base
    linear's weight W [d_out, d_in] (dequantised when the base is quantised), the module's rank
    r and the adapter's config."""

    name: str
    config: Mapping
    parts: Mapping[str, Tensor]
    shared: Mapping[str, Tensor]
    weight: Tensor
    r: int


@dataclass(frozen=True)
class PeftOptions:
    """What the user chose for a new adapter (MethodConfig), as a method's `peft_config` gets
    it: rank, alpha, the target module names and dropout."""

    rank: int
    alpha: float
    targets: list[str]
    dropout: float


@dataclass(frozen=True)
class Method:
    """Everything lorafleet knows about one adapter method, declared in its own module.

    - `name`, `help`: the CLI's `--method` name and its one help line; `title` for messages.
    - `peft_type`, `recognises(config)`: a saved adapter_config.json of `peft_type` belongs to
      this method when `recognises` says so (the first registered match wins; a method saved
      in another method's form, such as BiLoRA as LoRA, recognises nothing).
    - `parts`, `shared`: its tensors per adapted module and model-wide, with expected shapes
      (adapters/validate.py and lora_keys' key splitting read them).
    - `peft_config(options)`: the PEFT config a new adapter of this method is built with.
    - `trainer`: PEFT_TRAINER (PEFT's layers through get_peft_model) or a trainer kind that
      train.trainer_for maps to a trainer class.
    - `serve(weights) -> SlotEntry`: its entry in the batched op for one module, or a string
      saying why it cannot be served batched.
    - `factored`: its saved delta is exactly s * B @ A under PEFT's lora_A / lora_B keys, which
      merging, federated averaging, Laplace-LoRA and GGUF conversion rely on; `delta` says in
      words what its delta is (for the refusals of those that are not).
    - `default_r`: r when a config leaves it out (the PEFT config class's default).
    - `check_targets(linears, r)`: raise a one-line error unless the targeted linears
      ({name: (d_out, d_in)}) can carry this method at rank r (None: any can).
    - `label(config)`: the name an adapter of this method is shown under (default `name`).
    """

    name: str
    help: str
    title: str
    peft_type: str
    parts: tuple[Part, ...]
    peft_config: Callable[[PeftOptions], PeftConfig]
    serve: Callable[[ModuleWeights], SlotEntry] | str
    delta: str
    recognises: Callable[[Mapping], bool] = never
    shared: tuple[SharedPart, ...] = ()
    trainer: str = PEFT_TRAINER
    factored: bool = False
    default_r: int = DEFAULT_R
    check_targets: Callable[[Mapping[str, tuple[int, int]], int], None] | None = None
    label: Callable[[Mapping], str] | None = None

    def shown_as(self, config: Mapping) -> str:
        """The name an adapter with `config` is shown under (Adapter.method)."""
        return self.label(config) if self.label is not None else self.name


def _pattern_value(config: Mapping, pattern: str, module: str):
    from peft.utils.other import get_pattern_key

    table = config.get(pattern) or {}
    key = get_pattern_key(list(table), module)
    return table.get(key)


def module_rank(config: Mapping, module: str, default: int = DEFAULT_R) -> int:
    """The rank of `module` (name without PEFT's prefix): rank_pattern's match, else r (else
    `default`, LoraConfig's when not given)."""
    r = _pattern_value(config, "rank_pattern", module)
    return int(config.get("r", default) if r is None else r)


def module_alpha(config: Mapping, module: str) -> float:
    """The alpha of `module` (name without PEFT's prefix): alpha_pattern's match, else
    lora_alpha."""
    alpha = _pattern_value(config, "alpha_pattern", module)
    return float(config.get("lora_alpha", DEFAULT_ALPHA) if alpha is None else alpha)


def scale_of(alpha: float, r: int, rslora: bool) -> float:
    """PEFT's scaling rule: alpha / sqrt(r) for rsLoRA, alpha / r otherwise."""
    return alpha / math.sqrt(r) if rslora else alpha / r


def lora_scale(config: Mapping, module: str) -> float:
    """The scale s of `module`'s delta s * B @ A under a LoraConfig, exactly as PEFT's
    LoraLayer.scaling holds it (`use_rslora` is a LoraConfig option: DoRA may use it too)."""
    rslora = bool(config.get("use_rslora"))
    return scale_of(module_alpha(config, module), module_rank(config, module), rslora)
