"""Trains and evaluates a tiny BERT on tiny RTE data, on however many processes it is launched
with, and writes what the multi-process test compares (main process only) as JSON.

Usage (the test runs both)::

    python tests/distributed_worker.py MODEL_DIR GLUE_DIR OUT.json
    ACCELERATE_USE_CPU=true python -m torch.distributed.run --nproc_per_node 2 \\
        tests/distributed_worker.py MODEL_DIR GLUE_DIR OUT.json
"""

from __future__ import annotations

import json
import sys

import torch
from accelerate import Accelerator

from factorlab.models import load_model, load_tokenizer
from factorlab.tasks import get_task, load_split
from factorlab.training import Callback, EncodedSplit, TrainContext, TrainingConfig, predict, train


class RecordLearningRate(Callback):
    """The learning rate each optimizer step used, and after the last one."""

    def on_before_optimizer_step(self, ctx: TrainContext) -> None:
        ctx.state.setdefault("lr", []).append(ctx.optimizer.param_groups[0]["lr"])

    def on_train_end(self, ctx: TrainContext) -> None:
        ctx.state["lr_after"] = ctx.optimizer.param_groups[0]["lr"]


def main(model_dir: str, glue_dir: str, output: str) -> None:
    torch.set_num_threads(1)
    accelerator = Accelerator()
    task = get_task("rte")
    tokenizer = load_tokenizer(model_dir)
    torch.manual_seed(0)
    model = load_model(model_dir, num_labels=task.num_labels)
    train_data = EncodedSplit(load_split(task, "train", glue_dir), tokenizer, 32)
    dev_data = EncodedSplit(load_split(task, "dev", glue_dir), tokenizer, 32)
    # 32 examples, 8 per step = 4 steps per epoch; 2 epochs; no warm-up
    config = TrainingConfig(batch_size=8, epochs=2, warmup_ratio=0.0, learning_rate=1e-3)
    result = train(
        model,
        train_data,
        tokenizer,
        config,
        accelerator=accelerator,
        progress=False,
        callbacks=[RecordLearningRate()],
    )
    model = accelerator.unwrap_model(model)
    predictions = predict(model, dev_data, tokenizer, batch_size=5, accelerator=accelerator)
    if accelerator.is_main_process:
        record = {
            "num_processes": accelerator.num_processes,
            "steps": result.steps,
            "examples": result.examples,
            "lr": result.state["lr"],
            "lr_after": result.state["lr_after"],
            "predictions": len(predictions),
            "dev_examples": len(dev_data),
        }
        with open(output, "w") as f:
            json.dump(record, f)
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    main(*sys.argv[1:4])
