"""Federated fine-tuning of LoRA adapters: FedAvg, FedEx-LoRA and FFA-LoRA, in process and on
Flower (the Flower apps live in `lorafleet.fed.flower`, imported only when Flower is used)."""

from lorafleet.lazy import lazy_exports

# Each name is imported from its submodule on first use: the CLI reads FedConfig without torch.
__getattr__, __dir__, __all__ = lazy_exports(
    __name__,
    {
        "AGGREGATIONS": ".config",
        "FedConfig": ".config",
        "SplitSpec": ".config",
        "ClientUpdate": ".aggregate",
        "Dropped": ".aggregate",
        "aggregate": ".aggregate",
        "aggregation_error": ".aggregate",
        "fedavg": ".aggregate",
        "fedex": ".aggregate",
        "ffa": ".aggregate",
        "validate_updates": ".aggregate",
        "partition": ".partition",
        "apply_residual": ".residual",
        "load_fed_model": ".residual",
    },
)
