"""Sliding-window perplexity of a causal language model on a text: the protocol SVD-LLM and ASVD
report on WikiText-2 (and Hugging Face documents as "perplexity of fixed-length models").

The text is tokenized once. Windows of ``seq_len`` tokens start every ``stride`` tokens; each
window is scored only on the tokens no earlier window scored. With ``stride < seq_len`` every
token after the first is predicted exactly once, with at least ``seq_len - stride`` tokens of
context (except in the first window). ``stride == seq_len`` gives non-overlapping windows (the
evaluation code of SVD-LLM): the first token of each window has no context and is not scored.
Perplexity is ``exp(total negative log-likelihood / scored tokens)``, nll in nats.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from factorlab.errors import ConfigError, DataError, FactorlabError


class NonFiniteLossError(FactorlabError, ArithmeticError):
    """A window's loss is NaN or infinite: the model (often a half-precision one) overflowed."""


@dataclass(frozen=True)
class PerplexityResult:
    """``perplexity`` = exp(``nll``); ``nll`` in nats per scored token; ``tokens`` scored;
    ``windows`` model calls."""

    perplexity: float
    nll: float
    tokens: int
    windows: int
    seq_len: int
    stride: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def read_text(path: str | os.PathLike) -> str:
    """The whole UTF-8 text of ``path``.

    Raises:
        DataError: the file is missing, not UTF-8, or empty.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"text file {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"text file {path} is not UTF-8 ({exc})") from exc
    if not text.strip():
        raise DataError(f"text file {path} is empty")
    return text


def check_windows(seq_len: int, stride: int, max_positions: int | None) -> None:
    """Raise ``ConfigError`` unless ``1 <= stride <= seq_len``, ``seq_len >= 2`` and
    ``seq_len`` fits the model's positions."""
    if seq_len < 2:
        raise ConfigError(f"--seq-len must be >= 2 tokens, got {seq_len}")
    if max_positions is not None and seq_len > max_positions:
        raise ConfigError(
            f"--seq-len {seq_len} exceeds the model's {max_positions} positions; pass "
            f"--seq-len {max_positions} or less"
        )
    if not 1 <= stride <= seq_len:
        raise ConfigError(f"--stride must be in [1, --seq-len = {seq_len}], got {stride}")


@torch.no_grad()
def sliding_window_perplexity(
    model: nn.Module,
    input_ids: torch.Tensor,
    seq_len: int = 512,
    stride: int = 256,
    progress: bool = False,
) -> PerplexityResult:
    """Perplexity of a causal LM on one token sequence, scored in sliding windows.

    Args:
        model: a causal LM (``model(input_ids=...).logits`` of shape ``(1, T, vocab)``); run
            in eval mode, on its own device.
        input_ids: the tokenized text, shape ``(L,)`` or ``(1, L)``, ``L >= 2``.
        seq_len: tokens per window (the model's context at most).
        stride: tokens between window starts, ``1 <= stride <= seq_len``; each window scores
            the tokens after the previous window's end (see the module docstring).
        progress: a bar over the windows.

    Returns:
        A ``PerplexityResult`` over the scored tokens (``L - 1`` when ``stride < seq_len``).

    Raises:
        ConfigError: bad ``seq_len`` / ``stride`` or fewer than 2 tokens.
        NonFiniteLossError: a window's loss is NaN or infinite (names the window's token span).
    """
    ids = input_ids.reshape(-1)
    length = ids.numel()
    check_windows(seq_len, stride, None)
    if length < 2:
        raise ConfigError(f"the text has {length} token(s); perplexity needs at least 2")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, scored, windows, begin, previous_end = 0.0, 0, 0, 0, 0
    bar = tqdm(total=length, desc="perplexity", unit="tok", disable=not progress)
    try:
        while previous_end < length:
            end = min(begin + seq_len, length)
            window = ids[begin:end].to(device)
            logits = model(input_ids=window[None]).logits[0, :-1]
            nll = F.cross_entropy(logits.float(), window[1:], reduction="none")
            new = nll[max(previous_end, begin + 1) - (begin + 1) :]  # not scored before
            loss = new.sum().item()
            if not math.isfinite(loss):
                raise NonFiniteLossError(
                    f"the loss of the window over tokens [{begin}, {end}) is {loss}; the model "
                    "overflows there (evaluate it in float32, or check the checkpoint)"
                )
            total += loss
            scored += new.numel()
            windows += 1
            bar.update(end - previous_end)
            previous_end, begin = end, begin + stride
    finally:
        bar.close()
        model.train(was_training)
    nll_mean = total / scored
    return PerplexityResult(math.exp(nll_mean), nll_mean, scored, windows, seq_len, stride)
