"""Autoencoder compression of weight rows [K23, METHODS.md §6]: fitting, sizes, the decoder math.

Banaei et al., "Revisiting Offline Compression: Going Beyond Factorization-based Methods for
Transformer Language Models", EACL 2023; details from the public code
(github.com/MohammadrezaBanaei/auto-encoder-based-transformer-compression: ``main.py``,
``models/{encoder,decoder}.py``, ``utils/ae_train.py``, ``configs/config.yaml``).

The training examples are the rows of weight matrices (one row = one output neuron, length n). An
autoencoder is fitted on them; afterwards only its decoder, the latent code of every row and every
row's original L2 norm are kept, and a row is recovered as ``dec(z)`` rescaled to its norm.
Several matrices of the same type (e.g. the query matrices of all layers) can be stacked and
share one decoder.

Architecture (``x`` = latent size ``d``): encoder ``n -> 8x -> 4x -> d`` with LeakyReLU after
every layer (the last included, as in the code), decoder ``d -> 2x -> 4x -> n`` with LeakyReLU
between layers and Tanh at the end; the linear variant is one ``Linear`` each way (no activation).
Loss ``0.9091 * mean(1 - cos(w_hat, w)) + 0.0909 * sqrt(mean((w_hat - w)^2))`` on norm-rescaled
rows; Adam, StepLR. This module is plain tensor math: the networks are lists of
``(weight, bias)`` tensors, no ``nn.Module``.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

COS_WEIGHT = 0.9091
RMSE_WEIGHT = 0.0909
ENCODER_HIDDEN = (8, 4)
"""Encoder hidden widths in multiples of the latent size (``enc_layer_sizes`` in [K23]'s config)."""
DECODER_HIDDEN = (2, 4)
"""Decoder hidden widths in multiples of the latent size (``dec_layer_sizes``)."""

Layers = list[tuple[torch.Tensor, torch.Tensor]]
"""A network as ``[(weight (out, in), bias (out,)), ...]``, applied in order."""


def latent_size(rows: int, n: int, cr: float, linear: bool = False) -> int:
    """Latent size ``d`` for compressing ``rows`` rows of length ``n`` by the factor ``cr``.

    ``cr`` is dense / compressed parameters (``1 / param_ratio``). Non-linear decoder: the integer
    part of the positive root of METHODS.md §6's quadratic
    ``10 x^2 + (rows + 11 + 4 n) x + (n + rows - rows n / cr) = 0``. (The exact count of the
    stored values is ``10 x^2 + (rows + 6 + 4 n) x + n + rows``, see ``stored_parameters``; the
    quadratic's ``11`` makes it a little conservative, so the result never exceeds the budget.)
    Linear decoder (``[K23]``'s code for it): ``int((rows n / cr - n - rows) / (rows + n))``, the
    exact count ``d (rows + n) + n + rows``. Returns 0 when no ``d >= 1`` fits the budget.

    Raises:
        ValueError: ``rows`` or ``n`` below 1, or ``cr`` not > 0.
    """
    if rows < 1 or n < 1:
        raise ValueError(f"rows and n must be >= 1, got {rows}, {n}")
    if not cr > 0:
        raise ValueError(f"cr must be > 0, got {cr}")
    budget = rows * n / cr
    if linear:
        return max(0, math.floor((budget - n - rows) / (rows + n) + 1e-9))
    a, b, c = 10.0, rows + 11.0 + 4.0 * n, n + rows - budget
    disc = b * b - 4 * a * c
    x = (-b + math.sqrt(disc)) / (2 * a) if disc >= 0 else 0.0
    return max(0, math.floor(x + 1e-9))


def decoder_sizes(d: int, n: int, linear: bool = False) -> list[int]:
    """Widths of the decoder from latent to row: ``[d, 2d, 4d, n]`` or ``[d, n]`` (linear)."""
    return [d, n] if linear else [d, *(k * d for k in DECODER_HIDDEN), n]


def encoder_sizes(d: int, n: int, linear: bool = False) -> list[int]:
    """Widths of the encoder from row to latent: ``[n, 8d, 4d, d]`` or ``[n, d]`` (linear)."""
    return [n, d] if linear else [n, *(k * d for k in ENCODER_HIDDEN), d]


def network_parameters(sizes: Sequence[int]) -> int:
    """Weights and biases of a chain of ``Linear`` layers with the given widths."""
    return sum(a * b + b for a, b in itertools.pairwise(sizes))


def stored_parameters(rows: int, n: int, d: int, linear: bool = False) -> int:
    """Values stored for ``rows`` rows: latents ``rows * d`` + norms ``rows`` + the decoder.

    Non-linear: ``10 d^2 + (rows + 6 + 4 n) d + n + rows``; linear: ``d (rows + n) + n + rows``.
    """
    return rows * d + rows + network_parameters(decoder_sizes(d, n, linear))


def decode_rows(
    latents: torch.Tensor, layers: Layers, linear: bool, norms: torch.Tensor | None = None
) -> torch.Tensor:
    """Rows ``(rows, n)`` from latents ``(rows, d)`` through the decoder ``layers``.

    LeakyReLU (slope 0.01) between layers and Tanh after the last, unless ``linear``. With
    ``norms`` (rows,), every decoded row is rescaled to its norm (a zero row stays zero).
    """
    h = latents
    for i, (w, b) in enumerate(layers):
        h = F.linear(h, w, b)
        if not linear and i < len(layers) - 1:
            h = F.leaky_relu(h)
    if not linear:
        h = torch.tanh(h)
    if norms is not None:
        h = h * (norms / h.norm(dim=-1).clamp_min(1e-12)).unsqueeze(-1)
    return h


def encode_rows(rows: torch.Tensor, layers: Layers, linear: bool) -> torch.Tensor:
    """Latents ``(rows, d)``: LeakyReLU after every layer (the last included) unless ``linear``."""
    h = rows
    for w, b in layers:
        h = F.linear(h, w, b)
        if not linear:
            h = F.leaky_relu(h)
    return h


def reconstruction_loss(w_hat: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``0.9091 * mean(1 - cos) + 0.0909 * sqrt(mean((w_hat - w)^2))`` [K23's config]."""
    cos = F.cosine_similarity(w_hat, w, dim=-1, eps=1e-6)
    return COS_WEIGHT * (1 - cos).mean() + RMSE_WEIGHT * (w_hat - w).square().mean().sqrt()


def _init_network(sizes: Sequence[int], generator: torch.Generator, device: torch.device) -> Layers:
    """``nn.Linear``'s default initialization, U(-1/sqrt(fan_in), 1/sqrt(fan_in)), in float32."""
    layers = []
    for fan_in, fan_out in itertools.pairwise(sizes):
        bound = 1 / math.sqrt(fan_in)
        w = (torch.rand(fan_out, fan_in, generator=generator) * 2 - 1) * bound
        b = (torch.rand(fan_out, generator=generator) * 2 - 1) * bound
        layers.append((w.to(device).requires_grad_(), b.to(device).requires_grad_()))
    return layers


@dataclass
class AutoencoderFit:
    """The result of ``fit_autoencoder`` for one group of matrices.

    Attributes:
        decoder: the decoder as ``[(weight, bias), ...]`` (widths ``decoder_sizes(d, n)``).
        latents: per matrix, its rows' latent codes ``(rows_i, d)``.
        norms: per matrix, its rows' original L2 norms ``(rows_i,)``.
        latent_size: ``d``.
        linear: whether the decoder is the linear variant.
        rel_errors: per matrix, ``||W - W_hat||_F / ||W||_F`` of the kept reconstruction.
        best_epoch: the epoch (1-based) whose networks were kept.
        scores: the selection score after every epoch (lower is better).
        selection: what the score measured (``"all rows"`` or ``"held-out rows"``).
    """

    decoder: Layers
    latents: list[torch.Tensor]
    norms: list[torch.Tensor]
    latent_size: int
    linear: bool
    rel_errors: list[float]
    best_epoch: int
    scores: list[float] = field(default_factory=list)
    selection: str = "all rows"


def fit_autoencoder(
    matrices: Sequence[torch.Tensor],
    latent_size: int,
    linear: bool = False,
    epochs: int = 30,
    batch_size: int = 16,
    learning_rate: float = 1e-3,
    lr_step: int = 10,
    lr_gamma: float = 0.8,
    holdout_fraction: float = 0.0,
    seed: int = 0,
    progress: bool | None = False,
    description: str = "autoencoder",
) -> AutoencoderFit:
    """Fit one autoencoder on the stacked rows of ``matrices`` (each ``(rows_i, n)``).

    Training [K23]: rows shuffled every epoch (seeded), mini-batches of ``batch_size`` rows, Adam
    with ``learning_rate``, the rate multiplied by ``lr_gamma`` every ``lr_step`` epochs, the loss
    of ``reconstruction_loss`` on norm-rescaled decoded rows. After every epoch the networks are
    scored and the best epoch's are kept. [K23] scores by masked-LM perplexity; our choice is the
    same reconstruction loss on all rows (``holdout_fraction = 0``, the default), or on that
    fraction of the rows, drawn at random (seeded) and never trained on. The kept encoder then
    encodes every row (held-out ones included) to its latent code.

    Runs in float32 on the matrices' device with its own generator: the same inputs and seed give
    the same result. ``progress``: a bar per epoch; ``None`` shows it only on a terminal.
    Gradients are enabled inside even if the caller disabled them.

    Raises:
        ValueError: no matrix, matrices of different widths, ``latent_size`` < 1, ``epochs`` < 1,
            ``batch_size`` < 1, or ``holdout_fraction`` outside [0, 0.5].
    """
    if not matrices:
        raise ValueError("fit_autoencoder needs at least one matrix")
    widths = {m.shape[1] for m in matrices}
    if len(widths) != 1 or any(m.ndim != 2 for m in matrices):
        raise ValueError(f"matrices must be 2-D with one row length, got widths {sorted(widths)}")
    if latent_size < 1 or epochs < 1 or batch_size < 1:
        raise ValueError(
            f"latent_size, epochs and batch_size must be >= 1, got {latent_size}, {epochs}, "
            f"{batch_size}"
        )
    if not 0 <= holdout_fraction <= 0.5:
        raise ValueError(f"holdout_fraction must be in [0, 0.5], got {holdout_fraction}")
    n = widths.pop()
    device = matrices[0].device
    rows = torch.cat([m.detach().float().to(device) for m in matrices])
    total = rows.shape[0]
    generator = torch.Generator().manual_seed(seed)
    d = latent_size
    encoder = _init_network(encoder_sizes(d, n, linear), generator, device)
    decoder = _init_network(decoder_sizes(d, n, linear), generator, device)
    params = [t for layer in (*encoder, *decoder) for t in layer]
    # Thousands of tiny steps, dominated by optimizer overhead: the fused kernel does one pass over
    # the parameters instead of several ops per tensor; same update rule.
    optimizer = torch.optim.Adam(params, lr=learning_rate, fused=True)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=lr_step, gamma=lr_gamma)

    order = torch.randperm(total, generator=generator)
    n_held = round(holdout_fraction * total) if holdout_fraction > 0 else 0
    n_held = min(n_held, total - 1)
    held, train_idx = order[:n_held].to(device), order[n_held:].to(device)
    score_idx = held if n_held > 0 else torch.arange(total, device=device)
    norms_all = rows.norm(dim=1)

    def reconstruct(idx: torch.Tensor | None = None) -> torch.Tensor:
        x = rows if idx is None else rows[idx]
        nrm = norms_all if idx is None else norms_all[idx]
        return decode_rows(encode_rows(x, encoder, linear), decoder, linear, nrm)

    best: tuple[float, int, Layers, Layers] | None = None
    scores: list[float] = []
    bar = tqdm(range(epochs), desc=description, disable=None if progress is None else not progress)
    with torch.enable_grad():
        for epoch in bar:
            perm = train_idx[torch.randperm(len(train_idx), generator=generator).to(device)]
            for start in range(0, len(perm), batch_size):
                idx = perm[start : start + batch_size]
                loss = reconstruction_loss(reconstruct(idx), rows[idx])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            scheduler.step()
            with torch.no_grad():
                score = reconstruction_loss(reconstruct(score_idx), rows[score_idx]).item()
            scores.append(score)
            bar.set_postfix(score=f"{score:.4f}")
            if best is None or score < best[0]:
                best = (score, epoch + 1, _snapshot(encoder), _snapshot(decoder))
    assert best is not None
    _, best_epoch, best_encoder, best_decoder = best
    with torch.no_grad():
        latents = encode_rows(rows, best_encoder, linear)
        decoded = decode_rows(latents, best_decoder, linear, norms_all)
    splits = [m.shape[0] for m in matrices]
    rel_errors = []
    for w, w_hat in zip(rows.split(splits), decoded.split(splits), strict=True):
        norm = w.double().norm().item()
        rel_errors.append((w - w_hat).double().norm().item() / norm if norm > 0 else 0.0)
    return AutoencoderFit(
        decoder=best_decoder,
        latents=[z.clone() for z in latents.split(splits)],
        norms=[v.clone() for v in norms_all.split(splits)],
        latent_size=d,
        linear=linear,
        rel_errors=rel_errors,
        best_epoch=best_epoch,
        scores=scores,
        selection="held-out rows" if n_held > 0 else "all rows",
    )


def _snapshot(layers: Layers) -> Layers:
    return [(w.detach().clone(), b.detach().clone()) for w, b in layers]
