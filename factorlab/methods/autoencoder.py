"""Autoencoder-based offline compression [K23, METHODS.md §6]: weight rows decoded from latents.

Banaei et al., "Revisiting Offline Compression: Going Beyond Factorization-based Methods for
Transformer Language Models", EACL 2023. The method fits one autoencoder per group of matrices
(``build_group``) and replaces every matrix by a ``DecodedLinear`` holding its rows' latent codes
and norms; the layers of a group share one ``RowDecoder``.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

import torch

from factorlab.errors import ConfigError
from factorlab.layers.decoded_rows import DecodedLinear, RowDecoder
from factorlab.methods.config import FactorizationConfig
from factorlab.methods.registry import (
    GroupMember,
    Method,
    ModuleBudget,
    Projected,
    register_method,
)
from factorlab.projections.autoencoder import (
    fit_autoencoder,
    latent_size,
    stored_parameters,
)

SHARING = ("stacked", "per-matrix")


@dataclass
class AutoencoderConfig(FactorizationConfig):
    """Autoencoder compression [Banaei et al., EACL 2023] of the targeted weight matrices.

    The rows of each weight matrix are the training examples of an autoencoder; afterwards each
    layer keeps its rows' latent codes (rows x d) and L2 norms, and a decoder (shared by its
    group) maps codes back to rows. ``param_ratio`` p gives the compression factor
    ``cr = 1 / p`` of each group (latents + norms + decoder <= p x the group's weights; biases stay
    dense and outside the budget); the latent size ``d`` is the integer part of the root of
    METHODS.md §6's quadratic. No calibration data is needed.

    Attributes:
        sharing: ``"stacked"``: the same matrix type of all blocks (e.g. every
            ``attention.self.query``) is fitted by one autoencoder and shares one decoder, each
            layer keeping its own latents ([K23]'s "modules together"); ``"per-matrix"``: one
            autoencoder and decoder per matrix.
        linear: one ``Linear`` as encoder and as decoder instead of the 3-layer networks.
        epochs: training epochs over the rows; default 30, [K23]'s 20 + 10. Fewer epochs fit
            worse (``benchmarks/offline_table.py --ae-epochs N`` prints the mean relative weight
            error and the fit time); lower it for quick checks.
        batch_size: rows per Adam step ([K23]: 16).
        learning_rate: Adam's initial rate ([K23]: 1e-3).
        lr_step / lr_gamma: the rate is multiplied by ``lr_gamma`` every ``lr_step`` epochs
            ([K23]: StepLR(10, 0.8)).
        holdout_fraction: fraction of each group's rows never trained on, whose reconstruction
            loss picks the best epoch; default 0: the loss on all rows picks it. [K23] picks by
            masked-LM perplexity; our choice is the reconstruction loss on all rows, because the
            rows to reconstruct are exactly the training rows (nothing must generalize beyond
            them): on MiniLM a 10% hold-out stopped training near epoch 10 and left a worse fit
            (mean relative error 1.07 against 0.85 after 30 epochs at p = 0.5).
        seed: seeds initialization, row order and the held-out draw.

    ``rank_pattern`` takes ratios as for every method; an int value is taken as the latent size
    ``d`` of the module's group (all members of a group must then agree).
    """

    method = "autoencoder"

    sharing: str = "stacked"
    linear: bool = False
    epochs: int = 30
    batch_size: int = 16
    learning_rate: float = 1e-3
    lr_step: int = 10
    lr_gamma: float = 0.8
    holdout_fraction: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.sharing not in SHARING:
            raise ConfigError(f"sharing must be one of {SHARING}, got {self.sharing!r}")
        for name in ("epochs", "batch_size", "lr_step"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be an int >= 1, got {value!r}")
        if not (self.learning_rate > 0 and 0 < self.lr_gamma <= 1):
            raise ConfigError("learning_rate must be > 0 and lr_gamma in (0, 1]")
        if not 0 <= self.holdout_fraction <= 0.5:
            raise ConfigError(f"holdout_fraction must be in [0, 0.5], got {self.holdout_fraction}")

    def staging_problem(self) -> str | None:
        if self.sharing != "stacked":
            return super().staging_problem()
        return (
            "sharing='stacked' fits one decoder over the same matrix of ALL blocks, which a "
            "staged schedule (a few blocks per stage) cannot keep; use sharing='per-matrix' "
            "(--option sharing=per-matrix) or drop --staged"
        )


def plan_autoencoder(m: int, n: int, budget: ModuleBudget, config: AutoencoderConfig) -> int | None:
    """The latent size this module would get alone (or its explicit ``rank_pattern`` size);
    ``None`` (dense) for a per-matrix autoencoder that cannot be smaller than the matrix. A
    stacked group's size is decided in ``build_group`` from the whole group's budget."""
    if budget.rank is not None:
        d = budget.rank
    else:
        d = latent_size(m, n, 1 / budget.param_ratio, config.linear)
    too_big = d < 1 or stored_parameters(m, n, d, config.linear) >= m * n
    if config.sharing == "per-matrix" and too_big:
        return None
    return max(d, 1)


def group_name(module_name: str) -> str:
    """``bert.encoder.layer.N.attention.self.query`` for every block's query matrix."""
    return re.sub(r"\.\d+\.", ".N.", module_name)


def decoder_name(names: list[str], n: int) -> str:
    """The checkpoint name of the decoder shared by modules ``names`` (rows of length ``n``):
    ``bert.encoder.layer.N.attention.self.query[0,1,2]`` lists the blocks, so decoders fitted
    separately for different blocks of the same type (e.g. stage by stage) never share a name."""
    if len(names) == 1:
        return names[0]
    indices = [".".join(re.findall(r"\.(\d+)\.", name)) for name in names]
    return f"{group_name(names[0])}[{','.join(indices)}]" + (f"[{n}]" if n else "")


def build_autoencoder_group(
    members: list[GroupMember], config: AutoencoderConfig
) -> dict[str, Projected]:
    """Fit one autoencoder per group and build the ``DecodedLinear`` layers.

    Groups: by matrix type over blocks (``group_name``) and row length (``"stacked"``), or one
    per module (``"per-matrix"``). A group's budget is the sum of its members' ``p m n``; a group
    whose budget admits no latent size ``d >= 1`` stays dense. Each layer's reported parameters
    are its latents, norms and bias plus its share of the decoder (divided evenly, the remainder
    to the first member), so the report's total equals the model's true count.

    Raises:
        ConfigError: explicit latent sizes (int ``rank_pattern``) that differ within a group.
    """
    groups: dict[tuple[str, int], list[GroupMember]] = {}
    for member in members:
        n = member.weight.shape[1]
        key = group_name(member.name) if config.sharing == "stacked" else member.name
        groups.setdefault((key, n), []).append(member)
    names = [key for key, _ in groups]
    results: dict[str, Projected] = {}
    for (key, n), group in groups.items():
        label = decoder_name([m.name for m in group], n if names.count(key) > 1 else 0)
        explicit = {m.budget.rank for m in group}
        if explicit != {None}:
            if len(explicit) != 1:
                raise ConfigError(
                    f"rank_pattern gives the members of autoencoder group {label} different "
                    f"latent sizes {sorted(explicit, key=str)}; they share one decoder"
                )
            d = explicit.pop()
        else:
            rows = sum(m.weight.shape[0] for m in group)
            budget = sum(m.budget.param_ratio * m.weight.shape[0] * n for m in group)
            d = latent_size(rows, n, rows * n / budget, config.linear)
        if d < 1:
            continue
        fit = fit_autoencoder(
            [m.weight for m in group],
            d,
            linear=config.linear,
            epochs=config.epochs,
            batch_size=config.batch_size,
            learning_rate=config.learning_rate,
            lr_step=config.lr_step,
            lr_gamma=config.lr_gamma,
            holdout_fraction=config.holdout_fraction,
            seed=config.seed,
            progress=None,
            description=f"autoencoder {label}",
        )
        decoder = RowDecoder.from_tensors(fit.decoder, config.linear)
        decoder_params = sum(p.numel() for p in decoder.parameters())
        share, remainder = divmod(decoder_params, len(group))
        for i, member in enumerate(group):
            layer = DecodedLinear.from_parts(
                decoder, fit.latents[i], fit.norms[i], member.bias, decoder_name=label
            )
            own = sum(
                p.numel() for name, p in layer.named_parameters() if not name.startswith("decoder.")
            )
            params = own + share + (remainder if i == 0 else 0)
            results[member.name] = Projected(layer, fit.rel_errors[i], rank=d, params=params)
    return results


def build_autoencoder(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    rank: int,
    config: AutoencoderConfig,
    stats: object,
) -> Projected:
    """One matrix alone (its own decoder): ``build_autoencoder_group`` with a group of one."""
    member = GroupMember("module", weight, bias, ModuleBudget(config.param_ratio, rank), rank)
    single = dataclasses.replace(config, sharing="per-matrix")
    return build_autoencoder_group([member], single)["module"]


AUTOENCODER = register_method(
    Method(
        "autoencoder",
        AutoencoderConfig,
        plan_autoencoder,
        build_autoencoder,
        build_group=build_autoencoder_group,
    )
)
