"""Multiply-accumulate (MAC) counts of a model's forward pass, computed analytically from shapes.

One MAC is one multiplication and one addition (``FLOPs ~ 2 MACs``). Counted:

- every ``nn.Linear`` and GPT-2 ``Conv1D``: ``in_features * out_features`` per input row;
- every factorized layer: its ``macs_per_token()`` per input row (``FactorizedLinear``; e.g.
  ``rank * (in + out)`` for ``LowRankLinear``);
- the attention matmuls of each self-attention layer, from the model config: the scores
  ``Q K^T`` and the context ``P V``, each ``seq_len^2 * num_heads * head_dim`` per sequence
  (full ``L x L``, also for causal models, as the usual kernels compute them).

Not counted (they are not matmuls): embeddings, layer norms, softmax, activations, bias adds,
residual adds. The number of rows each linear layer sees is taken from one real forward pass with
forward hooks (so poolers and heads that see one row per sequence are counted right); everything
is linear in the batch size, which is used to scale a batch-1 pass.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from factorlab.layers.base import FactorizedLinear


@dataclass
class MacCount:
    """MACs of one forward pass (a batch of ``batch_size`` sequences of ``seq_len`` tokens).

    Attributes:
        batch_size: sequences in the batch.
        seq_len: tokens per sequence.
        linear: MACs of all linear and factorized layers.
        attention: MACs of the attention score and context matmuls (0 when the config does not
            say how many layers and heads the model has; see ``attention_counted``).
        factorized: MACs of the factorized layers alone.
        factorized_dense: MACs the dense layers they replaced would cost (same rows).
        per_module: ``{module name: MACs}`` for every linear and factorized layer.
        attention_counted: whether the attention matmuls could be counted from the config.
    """

    batch_size: int
    seq_len: int
    linear: int
    attention: int
    factorized: int
    factorized_dense: int
    per_module: dict[str, int] = field(default_factory=dict)
    attention_counted: bool = True

    @property
    def total(self) -> int:
        """All counted MACs: linear layers plus attention matmuls."""
        return self.linear + self.attention

    @property
    def dense_total(self) -> int:
        """MACs of the same model with every factorized layer dense again."""
        return self.total - self.factorized + self.factorized_dense

    @property
    def factorized_ratio(self) -> float:
        """MACs of the factorized layers over those of the dense layers they replace (1.0 when
        nothing is factorized): the ideal per-layer latency ratio."""
        return self.factorized / self.factorized_dense if self.factorized_dense else 1.0

    def to_dict(self, per_module: bool = False) -> dict[str, Any]:
        """JSON form, with ``total``, ``dense_total``, ``ratio`` (total / dense_total) and
        ``factorized_ratio``; ``per_module`` only when asked (it is long)."""
        d = asdict(self)
        if not per_module:
            d.pop("per_module")
        d.update(
            total=self.total,
            dense_total=self.dense_total,
            ratio=self.total / self.dense_total if self.dense_total else 1.0,
            factorized_ratio=self.factorized_ratio,
        )
        return d


def module_macs_per_token(module: nn.Module) -> tuple[int, int] | None:
    """``(MACs, dense-equivalent MACs)`` per input row of a linear-like module, else ``None``.

    ``nn.Linear`` and ``Conv1D`` cost ``in * out`` (both numbers equal); a ``FactorizedLinear``
    costs its ``macs_per_token()`` against ``dense_macs_per_token()``.
    """
    if isinstance(module, FactorizedLinear):
        return module.macs_per_token(), module.dense_macs_per_token()
    if isinstance(module, nn.Linear):
        macs = module.in_features * module.out_features
        return macs, macs
    if isinstance(module, Conv1D):
        macs = module.weight.shape[0] * module.weight.shape[1]
        return macs, macs
    return None


def _config_value(config: Any, *names: str) -> int | None:
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def attention_macs(config: Any, batch_size: int, seq_len: int) -> int | None:
    """MACs of the attention matmuls (``Q K^T`` and ``P V``) of a transformer.

    ``2 * layers * batch * seq_len^2 * heads * head_dim``, with ``layers``, ``heads`` and
    ``head_dim`` (default ``hidden / heads``) read from a Hugging Face config (BERT, RoBERTa,
    DistilBERT, GPT-2 and Llama naming). Grouped-query attention costs the same (each query head
    still multiplies a full ``L x L`` score matrix). Returns ``None`` when the config lacks them.
    """
    layers = _config_value(config, "num_hidden_layers", "n_layer", "n_layers", "num_layers")
    heads = _config_value(config, "num_attention_heads", "n_head", "n_heads")
    hidden = _config_value(config, "hidden_size", "n_embd", "dim", "d_model")
    if layers is None or heads is None:
        return None
    head_dim = _config_value(config, "head_dim")
    if head_dim is None:
        if hidden is None:
            return None
        head_dim = hidden // heads
    return 2 * layers * batch_size * seq_len * seq_len * heads * head_dim


def random_input_ids(
    config: Any, batch_size: int, seq_len: int, seed: int = 0, device: str | torch.device = "cpu"
) -> torch.Tensor:
    """Random token ids ``(batch_size, seq_len)`` (int64), uniform over the vocabulary except its
    first 1000 entries (often special and unused tokens) when the vocabulary is large enough."""
    vocab = _config_value(config, "vocab_size") or 1000
    low = 1000 if vocab > 2000 else 0
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(low, vocab, (batch_size, seq_len), generator=generator).to(device)


@torch.inference_mode()
def count_macs(model: nn.Module, batch_size: int = 1, seq_len: int = 128) -> MacCount:
    """Count the MACs of one forward pass of ``model`` on ``batch_size`` x ``seq_len`` tokens.

    Runs one forward pass on a single random sequence with forward hooks on every linear-like
    module (counting ``rows * macs_per_token``, see the module docstring) and scales by
    ``batch_size``; adds ``attention_macs`` from ``model.config``.

    Args:
        model: a Hugging Face model (it needs ``config`` and accepts ``input_ids``), dense or
            factorized; left in its current mode and device.
        batch_size: sequences per batch, >= 1.
        seq_len: tokens per sequence, >= 1.

    Returns:
        A ``MacCount``.

    Raises:
        ValueError: ``batch_size`` or ``seq_len`` < 1.
    """
    if batch_size < 1 or seq_len < 1:
        raise ValueError(f"batch_size and seq_len must be >= 1, got {batch_size}, {seq_len}")
    per_module: dict[str, int] = {}
    factorized = [0, 0]
    handles = []

    def hook_for(name: str, macs: int, dense: int, is_factorized: bool) -> Any:
        def hook(module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
            x = inputs[0]
            rows = x.numel() // x.shape[-1] * batch_size
            per_module[name] = per_module.get(name, 0) + rows * macs
            if is_factorized:
                factorized[0] += rows * macs
                factorized[1] += rows * dense

        return hook

    skip: tuple[str, ...] = ()
    for name, module in model.named_modules():
        if skip and name.startswith(skip):
            continue  # inside a factorized layer: its own count covers it
        counted = module_macs_per_token(module)
        if counted is None:
            continue
        is_factorized = isinstance(module, FactorizedLinear)
        if is_factorized:
            skip = (*skip, name + ".")
        handles.append(module.register_forward_hook(hook_for(name, *counted, is_factorized)))
    try:
        device = next(model.parameters()).device
        model(input_ids=random_input_ids(model.config, 1, seq_len, device=device))
    finally:
        for handle in handles:
            handle.remove()
    attention = attention_macs(model.config, batch_size, seq_len)
    return MacCount(
        batch_size=batch_size,
        seq_len=seq_len,
        linear=sum(per_module.values()),
        attention=attention or 0,
        factorized=factorized[0],
        factorized_dense=factorized[1],
        per_module=per_module,
        attention_counted=attention is not None,
    )
