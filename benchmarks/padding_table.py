"""Padded tokens per epoch of GLUE train sets, plain shuffle vs length-grouped batches.

Dynamic padding pads each batch to its longest example; ``--group-by-length`` (transformers'
``LengthGroupedSampler``) draws batches of similar length. Training time per step follows the
padded token count, so the ratio estimates the saving. No model is run; seconds on one core.

    python benchmarks/padding_table.py [--glue ../shared/data/glue] [--batch-size 32]
"""

from __future__ import annotations

import argparse
import os

from factorlab.models import default_model_path, load_tokenizer
from factorlab.tasks import load_split
from factorlab.training import EncodedSplit, make_loader


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--glue", default=os.environ.get("GLUE_DIR", "../shared/data/glue"))
    p.add_argument("--tasks", nargs="+", default=["sst2", "mrpc", "stsb", "cola", "rte"])
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-seq-length", type=int, default=128)
    p.add_argument("--seed", type=int, default=42)
    args = p.parse_args()
    tokenizer = load_tokenizer(default_model_path())
    print("| task | examples | real tokens | padded, shuffled | padded, grouped | ratio |")
    print("|---|---|---|---|---|---|")
    for task in args.tasks:
        data = EncodedSplit(load_split(task, "train", args.glue), tokenizer, args.max_seq_length)
        real = sum(len(f["input_ids"]) for f in data.features)
        padded = []
        for grouped in (False, True):
            loader = make_loader(
                data, tokenizer, args.batch_size, True, args.seed, group_by_length=grouped
            )
            padded.append(sum(batch["input_ids"].numel() for batch in loader))
        print(
            f"| {task} | {len(data)} | {real:,} | {padded[0]:,} | {padded[1]:,} | "
            f"{padded[1] / padded[0]:.2f} |"
        )


if __name__ == "__main__":
    main()
