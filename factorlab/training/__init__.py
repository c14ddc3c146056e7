"""The training engine on accelerate: the loop with callbacks, losses (task + distillation),
evaluation, and schedules (simultaneous, staged factorization)."""

from factorlab.training.callbacks import Callback, CallbackList, TrainContext
from factorlab.training.data import EncodedSplit, make_loader
from factorlab.training.finetune import (
    TrainingConfig,
    TrainResult,
    evaluate,
    make_optimizer,
    micro_batch_size,
    predict,
    seed_everything,
    train,
)
from factorlab.training.losses import DistillationConfig, Objective, check_teacher
from factorlab.training.schedules import ScheduleResult, Simultaneous, TrainingJob
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
    "Callback",
    "CallbackList",
    "DistillationConfig",
    "EncodedSplit",
    "Objective",
    "ScheduleResult",
    "Simultaneous",
    "StageInfo",
    "StagedSchedule",
    "StagedTrainResult",
    "TrainContext",
    "TrainResult",
    "TrainingConfig",
    "TrainingJob",
    "check_stageable",
    "check_teacher",
    "evaluate",
    "finetune_staged",
    "make_loader",
    "make_optimizer",
    "micro_batch_size",
    "plan_stages",
    "predict",
    "seed_everything",
    "split_steps",
    "train",
]
