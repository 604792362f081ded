"""Trans-LoRA: kit, synthetic data through the engine, discriminator filter, distillation."""

from lorafleet.transfer.kit import Kit, read_kit
from lorafleet.transfer.prepare import PrepareConfig, prepare
from lorafleet.transfer.run import RunConfig, TransferRun, run_transfer
from lorafleet.transfer.task import TaskFormat, TransferError

__all__ = [
    "Kit",
    "PrepareConfig",
    "RunConfig",
    "TaskFormat",
    "TransferError",
    "TransferRun",
    "prepare",
    "read_kit",
    "run_transfer",
]
