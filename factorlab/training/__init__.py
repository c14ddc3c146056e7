"""Fine-tuning on accelerate, evaluation, and (later) schedules."""

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

__all__ = [
    "EncodedSplit",
    "TrainResult",
    "TrainingConfig",
    "evaluate",
    "make_loader",
    "make_optimizer",
    "predict",
    "seed_everything",
    "train",
]
