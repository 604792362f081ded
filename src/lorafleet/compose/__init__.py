"""Adapter composition: exact merges (pure functions over tensors) and merged export."""

from lorafleet.compose.deltas import (
    Factors,
    MergeError,
    adapter_factors,
    check_mergeable,
    compact,
    dense_deltas,
    svd_factors,
)
from lorafleet.compose.merge import (
    DENSE_METHODS,
    FACTOR_METHODS,
    METHODS,
    combine_dense,
    factors_to_adapter,
    merge_adapters,
    merge_factors,
    merged_deltas,
)

__all__ = [
    "DENSE_METHODS",
    "FACTOR_METHODS",
    "METHODS",
    "Factors",
    "MergeError",
    "adapter_factors",
    "check_mergeable",
    "combine_dense",
    "compact",
    "dense_deltas",
    "factors_to_adapter",
    "merge_adapters",
    "merge_factors",
    "merged_deltas",
    "svd_factors",
]
