"""Where a model runs (`--device`): `auto` (CUDA when torch sees a GPU, else the CPU), `cpu` or
`cuda`. Light: checking a name imports no torch, so the CLI and the configs can use it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from lorafleet.errors import LorafleetError

if TYPE_CHECKING:
    import torch

DEVICES = ("auto", "cpu", "cuda")
DEVICE_HELP = "auto | cpu | cuda: where the model runs (auto: a CUDA GPU when torch sees one)."


def check_device(name: str) -> str:
    """`name` as one of DEVICES (any case), or a one-line LorafleetError naming it."""
    value = str(name).strip().lower()
    if value not in DEVICES:
        raise LorafleetError(f"unknown device {name!r}: use {' | '.join(DEVICES)}")
    return value


def cuda_available() -> bool:
    """Whether torch sees a usable CUDA GPU (the one question `auto` asks)."""
    import torch

    return torch.cuda.is_available()


def resolve_device(name: str) -> torch.device:
    """The torch device for `name`: auto -> cuda when `cuda_available()`, else cpu; cuda
    without a GPU -> a one-line LorafleetError (the CLI's exit 2); cpu -> cpu."""
    import torch

    value = check_device(name)
    if value == "auto":
        value = "cuda" if cuda_available() else "cpu"
    elif value == "cuda" and not cuda_available():
        built = torch.version.cuda
        how = f"torch {torch.__version__} " + (
            f"built for CUDA {built}" if built else "built without CUDA"
        )
        raise LorafleetError(
            f"--device cuda: torch sees no CUDA GPU here ({how}); use --device cpu or auto"
        )
    return torch.device(value)


@dataclass(frozen=True)
class DeviceConfig:
    """The device of a command that loads a model and has no config of its own to hold it
    (`lorafleet eval`, `generate`); `serve` and `train` keep theirs in EngineSettings /
    TrainConfig."""

    device: str = "auto"

    def __post_init__(self):
        object.__setattr__(self, "device", check_device(self.device))
