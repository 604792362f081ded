"""lorafleet: the whole life of LoRA adapters on one shared base model."""

__version__ = "0.1.0"
