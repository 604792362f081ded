"""Serving: the batched multi-adapter engine (continuous batching, KV cache, sampling)."""

from lorafleet.lazy import lazy_exports

# Each name is imported from its submodule on first use: importing the package (or its light
# config modules) loads no torch.
__getattr__, __dir__, __all__ = lazy_exports(
    __name__,
    {
        "FINISH_REASONS": ".sequence",
        "RUNNERS": ".runners",
        "AdapterGate": ".scheduler",
        "AdapterRegistry": ".registry",
        "AdapterSource": ".slot_table",
        "Batch": ".scheduler",
        "Engine": ".engine",
        "KVCache": ".kv_cache",
        "LlamaRunner": ".runners",
        "ModelRunner": ".runners",
        "RequestOutput": ".sequence",
        "SamplingParams": ".sequence",
        "Scheduler": ".scheduler",
        "Sequence": ".sequence",
        "ServingBackend": ".backend",
        "SlotTable": ".slot_table",
        "Status": ".sequence",
        "TokenEvent": ".sequence",
        "runner_class": ".runners",
    },
)
