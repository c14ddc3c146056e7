"""Tokenized GLUE splits and data loaders with dynamic padding."""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset
from transformers import DataCollatorWithPadding

from factorlab.tasks import GlueSplit


class EncodedSplit(Dataset):
    """A tokenized ``GlueSplit``: one dict of token ids (unpadded) and ``labels`` per example.

    Labels are ``int`` class ids, or ``float`` scores for regression tasks (STS-B).
    """

    def __init__(self, split: GlueSplit, tokenizer: Any, max_seq_length: int):
        if max_seq_length < 8:
            raise ValueError(f"max_seq_length must be >= 8 tokens, got {max_seq_length}")
        columns = list(zip(*split.texts, strict=True))
        encoded = tokenizer(*columns, truncation=True, max_length=max_seq_length)
        keys = [k for k in ("input_ids", "token_type_ids", "attention_mask") if k in encoded]
        self.task = split.task
        self.labels = list(split.labels)
        self.features = [
            {k: encoded[k][i] for k in keys} | {"labels": label}
            for i, label in enumerate(split.labels)
        ]

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.features[index]


def make_loader(
    dataset: EncodedSplit,
    tokenizer: Any,
    batch_size: int,
    shuffle: bool,
    seed: int = 0,
    group_by_length: bool = False,
) -> DataLoader:
    """A loader that pads each batch to its longest example (dynamic padding).

    Shuffling uses its own ``torch.Generator`` seeded with ``seed``, so the order is reproducible;
    with ``group_by_length`` (needs ``shuffle``) the shuffled order is grouped into batches of
    similar length by transformers' ``LengthGroupedSampler`` (less padding, same examples).
    """
    collate = DataCollatorWithPadding(tokenizer, return_tensors="pt")
    regression = dataset.task.is_regression

    def collate_fn(features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = collate(features)
        batch["labels"] = batch["labels"].float() if regression else batch["labels"].long()
        return batch

    generator = torch.Generator().manual_seed(seed) if shuffle else None
    if group_by_length and shuffle:
        from transformers.trainer_pt_utils import LengthGroupedSampler

        lengths = [len(f["input_ids"]) for f in dataset.features]
        sampler = LengthGroupedSampler(batch_size, lengths=lengths, generator=generator)
        return DataLoader(dataset, batch_size=batch_size, sampler=sampler, collate_fn=collate_fn)
    return DataLoader(
        dataset, batch_size=batch_size, shuffle=shuffle, collate_fn=collate_fn, generator=generator
    )
