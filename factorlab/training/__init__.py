"""The training engine on accelerate: the loop with callbacks, losses (task + distillation),
evaluation, and schedules (simultaneous, staged factorization).

Names load on first use, so ``factorlab.training.config`` (the recipes) imports without torch.
"""

from importlib import import_module
from typing import Any

_EXPORTS = {
    "Callback": "factorlab.training.callbacks",
    "CallbackList": "factorlab.training.callbacks",
    "DistillationConfig": "factorlab.training.config",
    "EncodedSplit": "factorlab.training.data",
    "LPAFSchedule": "factorlab.training.lpaf",
    "MixedRank": "factorlab.training.mixed_rank",
    "MovementPruning": "factorlab.training.pruning",
    "Objective": "factorlab.training.losses",
    "PruningConfig": "factorlab.training.pruning",
    "ScheduleResult": "factorlab.training.schedules",
    "Simultaneous": "factorlab.training.schedules",
    "StageInfo": "factorlab.training.staged",
    "StagedSchedule": "factorlab.training.staged",
    "StagedTrainResult": "factorlab.training.staged",
    "TrainContext": "factorlab.training.callbacks",
    "TrainResult": "factorlab.training.finetune",
    "TrainingConfig": "factorlab.training.config",
    "TrainingJob": "factorlab.training.schedules",
    "check_stageable": "factorlab.training.staged",
    "check_teacher": "factorlab.training.losses",
    "evaluate": "factorlab.training.finetune",
    "finetune_staged": "factorlab.training.staged",
    "make_loader": "factorlab.training.data",
    "make_optimizer": "factorlab.training.finetune",
    "micro_batch_size": "factorlab.training.finetune",
    "plan_stages": "factorlab.training.staged",
    "predict": "factorlab.training.finetune",
    "seed_everything": "factorlab.training.finetune",
    "split_steps": "factorlab.training.staged",
    "train": "factorlab.training.finetune",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'factorlab.training' has no attribute {name!r}")
    value = getattr(import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
