"""Trans-LoRA: kit, synthetic data through the engine, discriminator filter, distillation."""

from lorafleet.lazy import lazy_exports

# Each name is imported from its submodule on first use: importing the package loads no torch.
__getattr__, __dir__, __all__ = lazy_exports(
    __name__,
    {
        "Kit": ".kit",
        "PrepareConfig": ".config",
        "RunConfig": ".config",
        "TaskFormat": ".task",
        "TransferError": ".task",
        "TransferRun": ".run",
        "RejectionConfig": ".rejection",
        "prepare": ".prepare",
        "rejection_sample": ".rejection",
        "read_kit": ".kit",
        "run_transfer": ".run",
    },
)
