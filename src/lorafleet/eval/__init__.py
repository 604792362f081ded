"""Evaluation: exact match / contains for generation, log-likelihood accuracy, perplexity."""

from lorafleet.lazy import lazy_exports

# Each name is imported from its submodule on first use: the CLI reads EvalConfig without torch.
__getattr__, __dir__, __all__ = lazy_exports(
    __name__,
    {
        "METRICS": ".config",
        "EvalConfig": ".config",
        "evaluate": ".evaluate",
        "accuracy": ".metrics",
        "contains": ".metrics",
        "exact_match": ".metrics",
        "extract_answer": ".metrics",
        "label_token_loss": ".metrics",
        "perplexity": ".metrics",
    },
)
