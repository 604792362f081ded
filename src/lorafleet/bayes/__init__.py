"""Laplace-LoRA: KFAC Laplace posteriors over LoRA weights, calibrated predictives, metrics."""

from lorafleet.lazy import lazy_exports

# Each name is imported from its submodule on first use: the CLI reads the configs without torch.
__getattr__, __dir__, __all__ = lazy_exports(
    __name__,
    {
        "CalibrateConfig": ".config",
        "LaplaceConfig": ".config",
        "calibrate": ".calibrate",
        "evaluate_bayes": ".calibrate",
        "ClassItem": ".capture",
        "class_item": ".capture",
        "class_items": ".capture",
        "lora_layers": ".capture",
        "Factor": ".factors",
        "FactorAccumulator": ".factors",
        "KfacFactors": ".fit",
        "ModuleFactors": ".fit",
        "fit_kfac": ".fit",
        "load_factors": ".io",
        "save_factors": ".io",
        "brier": ".metrics",
        "calibration_report": ".metrics",
        "ece": ".metrics",
        "nll": ".metrics",
        "reliability_diagram": ".metrics",
        "glm_predictive": ".predictive",
        "laplace_class_probs": ".predictive",
        "map_predictive": ".predictive",
        "sampled_predictive": ".predictive",
        "evidence": ".prior",
        "posterior": ".prior",
        "tune_prior": ".prior",
    },
)
