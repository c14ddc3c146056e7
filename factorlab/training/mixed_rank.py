"""Mixed-rank fine-tuning: low-rank layers that sometimes run their sparse full-rank weight [R23].

LPAF (Ren & Zhu 2023; METHODS.md §7) fine-tunes the factorized model with each factorized layer
computing, at every step, with its pruned full-rank weight with probability ``q`` instead of its
low-rank factors, ``q`` annealed from 0.5 to 0 over the first half of training: the rest of the
network keeps seeing the better full-rank outputs while the factors recover. The paper's text was
not available; our choices (options of ``LPAFConfig``):

* the sparse weight is frozen (a buffer): only the factors, the shared bias and the rest of the
  model train, so the optimizer state does not grow;
* one independent draw per layer and step, from a generator seeded by ``(seed, step)``, so every
  process draws the same paths without communicating;
* ``q`` decays linearly from ``q0`` at the first step to 0 at ``anneal`` of the phase;
* on a sparse step the factors still enter the graph with weight 0, so every process's backward
  reaches the same parameters (``DistributedDataParallel`` requires it); their gradient is 0 and
  AdamW keeps moving them by momentum.

``attach_mixed_rank`` wraps the layers, ``MixedRank`` drives the draws, ``detach_mixed_rank``
puts the plain ``LowRankLinear`` layers back (checkpoints, load and bench never see the wrapper).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from factorlab.errors import ConfigError
from factorlab.layers.low_rank import LowRankLinear
from factorlab.training.callbacks import Callback, TrainContext


class MixedRankLinear(nn.Module):
    """A ``LowRankLinear`` plus its frozen sparse full-rank weight ``(out, in)``.

    ``use_sparse`` (set by ``MixedRank`` before each step) makes a training forward compute
    ``x W_sparse^T + b``; in eval mode, or with ``use_sparse`` false, it is the low-rank layer.
    """

    def __init__(self, low_rank: LowRankLinear, sparse_weight: torch.Tensor):
        super().__init__()
        expected = (low_rank.out_features, low_rank.in_features)
        if tuple(sparse_weight.shape) != expected:
            raise ValueError(
                f"sparse weight of shape {tuple(sparse_weight.shape)} does not fit the low-rank "
                f"layer's {expected}"
            )
        self.low_rank = low_rank
        self.register_buffer("sparse_weight", sparse_weight.detach().clone(), persistent=False)
        self.use_sparse = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and self.use_sparse):
            return self.low_rank(x)
        layer = self.low_rank
        # zero-weighted factors keep them in the graph on every process (see module docstring)
        unused = (layer.A.sum() + layer.B.sum()) * 0.0
        return F.linear(x, self.sparse_weight, layer.bias) + unused


def attach_mixed_rank(
    model: nn.Module, sparse_weights: dict[str, torch.Tensor]
) -> dict[str, MixedRankLinear]:
    """Wrap each ``LowRankLinear`` named in ``sparse_weights`` with its sparse weight, in place.

    Raises:
        ConfigError: a named module is not a ``LowRankLinear``.
    """
    wrapped = {}
    for name, weight in sparse_weights.items():
        layer = model.get_submodule(name)
        if not isinstance(layer, LowRankLinear):
            raise ConfigError(
                f"mixed-rank fine-tuning wraps LowRankLinear layers; {name} is a "
                f"{type(layer).__name__}"
            )
        mixed = MixedRankLinear(layer, weight.to(device=layer.A.device, dtype=layer.A.dtype))
        mixed.train(layer.training)
        model.set_submodule(name, mixed)
        wrapped[name] = mixed
    return wrapped


def detach_mixed_rank(model: nn.Module) -> int:
    """Replace every ``MixedRankLinear`` in ``model`` by its ``LowRankLinear``; returns how many."""
    names = [n for n, m in model.named_modules() if isinstance(m, MixedRankLinear)]
    for name in names:
        model.set_submodule(name, model.get_submodule(name).low_rank)
    return len(names)


def sparse_path_probability(local_step: int, num_steps: int, q0: float, anneal: float) -> float:
    """``q`` at ``local_step`` steps into the phase: ``q0`` falling linearly to 0 at
    ``anneal * num_steps`` steps, 0 after."""
    end = anneal * num_steps
    if end <= 0:
        return 0.0
    return max(0.0, q0 * (1.0 - local_step / end))


class MixedRank(Callback):
    """Draws, before every step, which ``MixedRankLinear`` layers run their sparse weight.

    Args:
        layers: the wrapped layers, in a fixed order (the draw of layer ``i`` is the ``i``-th
            uniform of the step's generator).
        q0: the initial probability of the sparse path, in [0, 1].
        anneal: fraction of the phase over which ``q`` falls to 0, in (0, 1].
        seed: the run's seed; the generator of step ``t`` is seeded with ``(seed, t)``.
        start_step / num_steps: the phase's first run step and its length.

    ``state["mixed_rank"]`` records ``q0``, ``anneal``, the phase's steps, the fraction of
    layer-steps that used the sparse path, and on how many processes the draws were checked to
    be identical (a checksum gathered at the end; a difference raises ``RuntimeError``).
    """

    def __init__(
        self,
        layers: dict[str, MixedRankLinear],
        q0: float,
        anneal: float,
        seed: int,
        start_step: int,
        num_steps: int,
    ):
        if not 0 <= q0 <= 1 or not 0 < anneal <= 1:
            raise ConfigError(
                f"mixed-rank q0 must be in [0, 1] and anneal in (0, 1], got {q0}, {anneal}"
            )
        self.layers = list(layers.values())
        self.q0, self.anneal, self.seed = q0, anneal, seed
        self.start_step, self.num_steps = start_step, num_steps
        self.sparse_uses = 0
        self.layer_steps = 0
        self.checksum = 0

    def draw(self, step: int) -> list[bool]:
        """Which layers use the sparse path at run step ``step`` (the same on every process)."""
        q = sparse_path_probability(step - self.start_step, self.num_steps, self.q0, self.anneal)
        if q == 0:
            return [False] * len(self.layers)
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        return (torch.rand(len(self.layers), generator=generator) < q).tolist()

    def on_step_begin(self, ctx: TrainContext) -> None:
        choice = self.draw(ctx.step)
        for layer, sparse in zip(self.layers, choice, strict=True):
            layer.use_sparse = sparse
        self.sparse_uses += sum(choice)
        self.layer_steps += len(choice)
        self.checksum += sum(i + 1 for i, sparse in enumerate(choice) if sparse) * ctx.step

    def on_train_end(self, ctx: TrainContext) -> None:
        for layer in self.layers:
            layer.use_sparse = False
        # the draws must have been the same on every process: compare a checksum of them
        local = torch.tensor([self.checksum], dtype=torch.float64, device=ctx.accelerator.device)
        checksums = ctx.accelerator.gather(local)
        if not bool((checksums == local).all()):
            raise RuntimeError(f"mixed-rank draws differ across processes: {checksums.tolist()}")
        ctx.state["mixed_rank"] = {
            "q0": self.q0,
            "anneal": self.anneal,
            "steps": self.num_steps,
            "sparse_fraction": self.sparse_uses / max(self.layer_steps, 1),
            "processes_agreed": int(checksums.numel()),
        }
