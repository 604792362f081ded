"""What Laplace-LoRA can be asked: the prior kinds, evidence forms and tuning methods, and the
configs of fitting (LaplaceConfig) and calibrating (CalibrateConfig); no torch here, so the CLI
reads their defaults without importing the model stack."""

from __future__ import annotations

from dataclasses import dataclass

from lorafleet.errors import LorafleetError

# The prior's kinds and the evidence's forms: their meaning is in prior.py's docstring.
PRIORS = ("zero", "init", "parts", "b-only", "b-layers")
EVIDENCE_FORMS = ("quadratic", "mode")
LABEL_MODES = ("exact", "sampled")
TUNE_METHODS = ("evidence", "val")


@dataclass
class LaplaceConfig:
    """How to fit the factors: low-rank threshold and rank, label mode, batching."""

    n_kfac: int = 10  # rank kept for factors larger than `threshold`
    threshold: int = 512  # factors with a dimension above this are low-rank + diagonal
    labels: str = "exact"  # exact | sampled
    batch_size: int = 8
    seed: int = 0  # for sampled labels

    def __post_init__(self):
        for name in ("n_kfac", "threshold", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise LorafleetError(f"{name} must be a positive whole number, got {value!r}")
        if self.labels not in LABEL_MODES:
            raise LorafleetError(
                f"labels must be one of {', '.join(LABEL_MODES)}, got {self.labels!r}"
            )


@dataclass(frozen=True)
class CalibrateConfig:
    """How `calibrate` tunes and reports, beside how it fits (LaplaceConfig): the prior
    precision by the evidence or by validation NLL (TUNE_METHODS), the prior's kind
    (PRIORS), the evidence's form (EVIDENCE_FORMS), tokens per example, and
    weight samples for the sampled predictive on the validation data (0: none)."""

    tune: str = "evidence"
    prior: str = "b-only"
    evidence: str = "mode"
    max_length: int = 512
    weight_samples: int = 0

    def __post_init__(self):
        choices = {"tune": TUNE_METHODS, "prior": PRIORS, "evidence": EVIDENCE_FORMS}
        for name, allowed in choices.items():
            value = getattr(self, name)
            if value not in allowed:
                raise LorafleetError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")
        if not self.max_length >= 1 or not self.weight_samples >= 0:
            raise LorafleetError(
                f"max_length must be >= 1 and weight_samples >= 0, got {self.max_length!r} "
                f"and {self.weight_samples!r}"
            )
