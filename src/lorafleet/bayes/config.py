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
# How the weights of a linear map shared over positions are approximated (Eschenhagen et al.,
# 2023): "expand" treats every prompt position as an example of its own (the official
# Laplace-LoRA code's backend), "reduce" averages the inputs and sums the output gradients first.
KFAC_KINDS = ("expand", "reduce")
# Which LoRA weights the posterior covers (the official code's `laplace_sub`): "all" of them, or
# "last_layer": only the LoRA on lm_head, whose B is cut to the rows of the answer tokens.
SUBSETS = ("all", "last_layer")
# How the evidence is maximised over log lam: "adam" as the official code (laplace-torch's
# `optimize_prior_precision(method="marglik")`: Adam, lr 0.1, from lam = 1), "grid" a grid over
# 1e-4..1e7 refined by golden section (the global optimum, also where Adam's steps cannot reach).
SEARCHES = ("adam", "grid")
# Training rows `calibrate` fits on unless told (the paper fits on the whole training set).
FIT_ROWS = 1000


@dataclass
class LaplaceConfig:
    """How to fit the factors: low-rank threshold and rank, label mode, batching."""

    n_kfac: int = 10  # rank kept for factors larger than `threshold`
    threshold: int = 512  # factors with a dimension above this are low-rank + diagonal
    labels: str = "exact"  # exact | sampled
    batch_size: int = 8
    seed: int = 0  # for sampled labels
    kfac: str = "expand"  # KFAC_KINDS
    subset: str = "all"  # SUBSETS

    def __post_init__(self):
        for name in ("n_kfac", "threshold", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise LorafleetError(f"{name} must be a positive whole number, got {value!r}")
        choices = {"labels": LABEL_MODES, "kfac": KFAC_KINDS, "subset": SUBSETS}
        for name, allowed in choices.items():
            value = getattr(self, name)
            if value not in allowed:
                raise LorafleetError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")


@dataclass(frozen=True)
class CalibrateConfig:
    """How `calibrate` tunes and reports, beside how it fits (LaplaceConfig): the prior
    precision by the evidence or by validation NLL (TUNE_METHODS), the prior's kind
    (PRIORS), the evidence's form (EVIDENCE_FORMS), tokens per example,
    weight samples for the sampled predictive on the validation data (0: none), and how the
    evidence is maximised (SEARCHES; `prior_steps` Adam steps)."""

    tune: str = "evidence"
    prior: str = "zero"
    evidence: str = "mode"
    max_length: int = 512
    weight_samples: int = 0
    search: str = "adam"
    prior_steps: int = 100

    def __post_init__(self):
        if isinstance(self.prior_steps, bool) or not isinstance(self.prior_steps, int):
            raise LorafleetError(f"prior_steps must be a whole number, got {self.prior_steps!r}")
        if self.prior_steps < 1:
            raise LorafleetError(f"prior_steps must be >= 1, got {self.prior_steps!r}")
        choices = {
            "tune": TUNE_METHODS,
            "prior": PRIORS,
            "evidence": EVIDENCE_FORMS,
            "search": SEARCHES,
        }
        for name, allowed in choices.items():
            value = getattr(self, name)
            if value not in allowed:
                raise LorafleetError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")
        if not self.max_length >= 1 or not self.weight_samples >= 0:
            raise LorafleetError(
                f"max_length must be >= 1 and weight_samples >= 0, got {self.max_length!r} "
                f"and {self.weight_samples!r}"
            )
