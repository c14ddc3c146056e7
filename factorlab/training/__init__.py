"""Fine-tuning on accelerate, evaluation, and schedules (staged factorization)."""

from factorlab.training.data import EncodedSplit, make_loader
from factorlab.training.finetune import (
    TrainingConfig,
    TrainResult,
    evaluate,
    make_optimizer,
    predict,
    seed_everything,
    train,
)
from factorlab.training.staged import (
    StagedSchedule,
    StagedTrainResult,
    StageInfo,
    check_stageable,
    finetune_staged,
    plan_stages,
    split_steps,
)

__all__ = [
    "EncodedSplit",
    "StageInfo",
    "StagedSchedule",
    "StagedTrainResult",
    "TrainResult",
    "TrainingConfig",
    "check_stageable",
    "evaluate",
    "finetune_staged",
    "make_loader",
    "make_optimizer",
    "plan_stages",
    "predict",
    "seed_everything",
    "split_steps",
    "train",
]
