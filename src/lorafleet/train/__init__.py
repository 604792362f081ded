"""Fine-tuning: a composable trainer (builders, a pluggable step, in-memory data), checkpoints."""

from lorafleet.lazy import lazy_exports

# Each name is imported from its submodule on first use: the CLI reads TrainConfig without torch.
__getattr__, __dir__, __all__ = lazy_exports(
    __name__,
    {
        "DataConfig": ".config",
        "OptimizerConfig": ".config",
        "ScheduleConfig": ".config",
        "TrainConfig": ".config",
        "InMemoryExamples": ".builders",
        "ParamGroup": ".builders",
        "build_data": ".builders",
        "build_model": ".builders",
        "build_optimizer": ".builders",
        "build_scheduler": ".builders",
        "example_set": ".builders",
        "train_only": ".builders",
        "latest_checkpoint": ".checkpoint",
        "load_checkpoint": ".checkpoint",
        "Distributed": ".distributed",
        "Trainer": ".loop",
        "Batch": ".step",
        "Batches": ".step",
        "LanguageModelStep": ".step",
        "StepOutput": ".step",
        "StepResult": ".step",
        "StepRunner": ".step",
        "TrainStep": ".step",
        "trainer_for": ".trainers",
    },
)
