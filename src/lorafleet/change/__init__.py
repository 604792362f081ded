"""LoRA of Change: a hypernetwork reads a before/after pair and emits a LoRA for a small editor."""
