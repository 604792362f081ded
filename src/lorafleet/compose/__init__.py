"""Adapter composition: exact merges (pure functions over tensors) and merged export."""

from lorafleet.lazy import lazy_exports

# Each name is imported from its submodule on first use: importing the package loads no torch.
__getattr__, __dir__, __all__ = lazy_exports(
    __name__,
    {
        "DENSE_METHODS": ".merge",
        "FACTOR_METHODS": ".merge",
        "METHODS": ".merge",
        "Factors": ".deltas",
        "MergeError": ".deltas",
        "adapter_factors": ".deltas",
        "check_mergeable": ".deltas",
        "combine_dense": ".merge",
        "compact": ".deltas",
        "dense_deltas": ".deltas",
        "factors_to_adapter": ".merge",
        "merge_adapters": ".merge",
        "merge_factors": ".merge",
        "merged_deltas": ".merge",
        "svd_factors": ".deltas",
    },
)
