"""Laplace-LoRA: KFAC Laplace posteriors over LoRA weights, calibrated predictives, metrics."""

from lorafleet.bayes.calibrate import calibrate, evaluate_bayes
from lorafleet.bayes.capture import ClassItem, class_item, class_items, lora_layers
from lorafleet.bayes.factors import Factor, FactorAccumulator
from lorafleet.bayes.fit import KfacFactors, LaplaceConfig, ModuleFactors, fit_kfac
from lorafleet.bayes.io import load_factors, save_factors
from lorafleet.bayes.metrics import brier, calibration_report, ece, nll, reliability_diagram
from lorafleet.bayes.predictive import (
    glm_predictive,
    laplace_class_probs,
    map_predictive,
    sampled_predictive,
)
from lorafleet.bayes.prior import evidence, posterior, tune_prior

__all__ = [
    "ClassItem",
    "Factor",
    "FactorAccumulator",
    "KfacFactors",
    "LaplaceConfig",
    "ModuleFactors",
    "brier",
    "calibrate",
    "calibration_report",
    "class_item",
    "class_items",
    "ece",
    "evaluate_bayes",
    "evidence",
    "fit_kfac",
    "glm_predictive",
    "laplace_class_probs",
    "load_factors",
    "lora_layers",
    "map_predictive",
    "nll",
    "posterior",
    "reliability_diagram",
    "sampled_predictive",
    "save_factors",
    "tune_prior",
]
