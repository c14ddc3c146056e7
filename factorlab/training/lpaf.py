"""The LPAF schedule: fine-tune with pruning, factorize the pruned weights, fine-tune with mixed
ranks [R23, METHODS.md §7].

Phases over one step budget ``N = TrainingConfig.num_steps(len(dataset))``, the same as the
direct "factorize, then fine-tune" run::

    1. prune      round(prune_fraction N) steps: fine-tune the dense model with the pruning
                  callback (``factorlab.training.pruning``) on the targeted layers, sparsity
                  from 0 to the target on the cubic schedule; the masks are then baked in;
    2. factorize  ranks from the pruned matrices' spectra (``allocation="global"`` by default),
                  factors by the truncated SVD of each pruned matrix, or with
                  ``em_iterations > 0`` the sparsity-aware SVD fitting its kept entries;
    3. recover    the remaining steps: fine-tune the factorized model, each layer running its
                  sparse pruned weight with probability q (``factorlab.training.mixed_rank``);
                  then only plain ``LowRankLinear`` layers remain.

Each phase builds a fresh optimizer and warm-up/decay schedule (as the staged schedule does) and
continues the data stream of the one before, so the batches are those of one run of ``N`` steps.
The objective (task loss, optionally with distillation) and the run's callbacks serve both
training phases.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from torch import nn

from factorlab.errors import ConfigError
from factorlab.methods import FactorizationConfig, factorize_
from factorlab.targets import select_targets
from factorlab.training.finetune import TrainResult, train
from factorlab.training.mixed_rank import MixedRank, attach_mixed_rank, detach_mixed_rank
from factorlab.training.pruning import MovementPruning, rank_statistics
from factorlab.training.schedules import ScheduleResult, TrainingJob


@dataclass
class LPAFSchedule:
    """Prune, factorize, recover (module docstring). ``rank_probes``: sparsities at which the
    pruning phase records every pruned matrix's rank statistics (``rank_statistics``), in
    ``results.json`` under ``train.state.pruning.rank_probes`` with those of the final masks
    (the rank study of METHODS.md §7); those above the target sparsity are never reached."""

    rank_probes: tuple[float, ...] = (0.25, 0.5, 0.75, 0.9)
    name: ClassVar[str] = "lpaf"

    def check(self, factorization: FactorizationConfig | None, has_task: bool) -> None:
        """Refuse what cannot run, before any work.

        Raises:
            ConfigError: no task (pruning learns on one), or a config that is not LPAF's.
        """
        from factorlab.methods.lpaf import LPAFConfig

        if not isinstance(factorization, LPAFConfig):
            raise ConfigError("the LPAF schedule runs the lpaf method only")
        if not has_task:
            raise ConfigError(
                "LPAF prunes while fine-tuning on a task, then fine-tunes the factorized model: "
                "give --task (for a projection without training use --method low-rank)"
            )

    def run(
        self,
        model: nn.Module,
        factorization: FactorizationConfig | None,
        job: TrainingJob | None,
        calibrate: Callable[..., dict[str, Any]] | None = None,
    ) -> ScheduleResult:
        """Run the three phases on ``model`` (changed in place); see the module docstring."""
        self.check(factorization, job is not None)
        assert job is not None
        config = factorization
        total = job.config.num_steps(len(job.dataset))
        prune_steps = round(config.prune_fraction * total)
        recover_steps = total - prune_steps
        if prune_steps < 1 or recover_steps < 1:
            raise ConfigError(
                f"{total} training steps cannot be split into pruning ({config.prune_fraction:g} "
                "of them) and fine-tuning; train for more steps"
            )
        say = job.log or (lambda _line: None)
        accelerator = job.accelerator
        targets = select_targets(model, config.target_modules, config.exclude_modules)
        modules = {t.name: t.module for t in targets}
        probes = tuple(p for p in self.rank_probes if p <= config.target_sparsity + 1e-9)
        pruning = MovementPruning(
            modules, config.pruning_config(probes), start_step=0, num_steps=prune_steps
        )
        pruning.attach()

        def fine_tune(steps: int, skip: int, label: str, callbacks: list[Any]) -> TrainResult:
            return train(
                model,
                job.dataset,
                job.tokenizer,
                job.config,
                num_steps=steps,
                accelerator=accelerator,
                progress=job.progress,
                description=label,
                skip_steps=skip,
                objective=job.objective,
                callbacks=[*callbacks, *job.callbacks],
            )

        pruned = fine_tune(prune_steps, 0, "prune", [pruning])
        model = accelerator.unwrap_model(model)
        masks = pruning.finalize()
        pruning_state = dict(pruned.state.get("pruning", {}))
        pruning_state["rank_probes"] = pruning.probes
        pruning_state["final_ranks"] = {
            name: rank_statistics(module.weight) for name, module in modules.items()
        }
        say(
            f"prune: {prune_steps} steps ({config.pruning}), sparsity "
            f"{pruning_state.get('sparsity', 0):.3f}, loss {pruned.final_loss:.4f}"
        )

        timings: dict[str, float] = {}
        start = time.perf_counter()
        report = factorize_(model, config, masks)
        timings["factorize"] = time.perf_counter() - start
        factorized = {m.name for m in report.modules if m.rank is not None}
        how = (
            f"sparsity-aware SVD (at most {config.em_iterations} EM steps)"
            if config.em_iterations
            else "truncated SVD"
        )
        say(f"factorize: {len(factorized)} pruned matrices, {how}, {timings['factorize']:.1f} s")

        callbacks: list[Any] = []
        if config.mixed_rank_q > 0:
            sparse = {name: modules[name].weight for name in factorized}
            layers = attach_mixed_rank(model, sparse)
            callbacks.append(
                MixedRank(
                    layers,
                    config.mixed_rank_q,
                    config.mixed_rank_anneal,
                    job.config.seed,
                    start_step=prune_steps,
                    num_steps=recover_steps,
                )
            )
        recovered = fine_tune(recover_steps, prune_steps, "recover", callbacks)
        model = accelerator.unwrap_model(model)
        detach_mixed_rank(model)
        say(f"recover: {recover_steps} steps, loss {recovered.final_loss:.4f}")

        phases = [
            {
                "phase": name,
                "steps": part.steps,
                "seconds": part.seconds,
                "final_loss": part.final_loss,
                "optimizer": part.optimizer,
            }
            for name, part in (("prune", pruned), ("recover", recovered))
        ]
        result = TrainResult(
            steps=total,
            seconds=pruned.seconds + recovered.seconds,
            losses=pruned.losses + recovered.losses,
            examples=pruned.examples + recovered.examples,
            num_processes=recovered.num_processes,
            loss_parts=recovered.loss_parts,
            optimizer=recovered.optimizer,
            state={**pruned.state, **recovered.state, "pruning": pruning_state},
            phases=phases,
        )
        return ScheduleResult(model, report, result, timings)
