"""Federated fine-tuning of LoRA adapters: FedAvg, FedEx-LoRA and FFA-LoRA, in process and on
Flower (the Flower apps live in `lorafleet.fed.flower`, imported only when Flower is used)."""

from lorafleet.fed.aggregate import (
    AGGREGATIONS,
    ClientUpdate,
    Dropped,
    aggregate,
    aggregation_error,
    fedavg,
    fedex,
    ffa,
    validate_updates,
)
from lorafleet.fed.config import FedConfig
from lorafleet.fed.partition import SplitSpec, partition
from lorafleet.fed.residual import apply_residual, load_fed_model

__all__ = [
    "AGGREGATIONS",
    "ClientUpdate",
    "Dropped",
    "FedConfig",
    "SplitSpec",
    "aggregate",
    "aggregation_error",
    "apply_residual",
    "fedavg",
    "fedex",
    "ffa",
    "load_fed_model",
    "partition",
    "validate_updates",
]
