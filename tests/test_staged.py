"""Staged factorization (METHODS.md §4): stage planning, progressive projection, fresh optimizers
over the current parameters, the same step budget and batches as the simultaneous schedule."""

import dataclasses
import json

import pytest
import torch
from accelerate import Accelerator

from factorlab.cli import main
from factorlab.errors import ConfigError
from factorlab.methods import METHODS, LowRankConfig, factorized_modules, get_method, make_config
from factorlab.runs import RunConfig, execute, prepare_run
from factorlab.targets import group_by_block, select_targets
from factorlab.training import (
    StagedSchedule,
    TrainingConfig,
    finetune_staged,
    plan_stages,
    split_steps,
    train,
)
from factorlab.training import finetune as finetune_module
from tests.tiny import tiny_bert, tiny_gpt2

pytestmark = pytest.mark.usefixtures("one_thread")

MATRICES = [
    "attention.self.query",
    "attention.self.key",
    "attention.self.value",
    "attention.output.dense",
    "intermediate.dense",
    "output.dense",
]


def block(i: int) -> list[str]:
    return [f"bert.encoder.layer.{i}.{m}" for m in MATRICES]


def bert4(tokenizer):
    return tiny_bert(vocab_size=tokenizer.vocab_size, num_layers=4)


FAST = TrainingConfig(batch_size=8, max_seq_length=32, max_steps=6, learning_rate=1e-3)

SCHEDULES = {
    "top-down": (StagedSchedule(), [block(3), block(2), block(1), block(0)]),
    "bottom-up": (StagedSchedule(order="bottom-up"), [block(0), block(1), block(2), block(3)]),
    "2 blocks top-down": (
        StagedSchedule(blocks_per_stage=2),
        [block(3) + block(2), block(1) + block(0)],
    ),
    "3 blocks bottom-up": (
        StagedSchedule(order="bottom-up", blocks_per_stage=3),
        [block(0) + block(1) + block(2), block(3)],
    ),
    "custom groups": (
        StagedSchedule(groups=[r".*\.(query|key|value)", ["output.dense", "intermediate.dense"]]),
        [
            [
                f"bert.encoder.layer.{i}.attention.self.{m}"
                for i in range(4)
                for m in ("query", "key", "value")
            ],
            [
                n
                for i in range(4)
                for n in (
                    f"bert.encoder.layer.{i}.attention.output.dense",
                    f"bert.encoder.layer.{i}.intermediate.dense",
                    f"bert.encoder.layer.{i}.output.dense",
                )
            ],
        ],
    ),
}


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_plan_stages(tokenizer, name):
    schedule, expected = SCHEDULES[name]
    assert plan_stages(bert4(tokenizer), LowRankConfig(param_ratio=0.5), schedule) == expected


def test_group_by_block_any_architecture():
    gpt2 = tiny_gpt2()
    names = [t.name for t in select_targets(gpt2)] + ["lm_head"]
    groups = group_by_block(gpt2, list(reversed(names)))
    assert [g[0].rsplit(".", 2)[0] for g in groups[:2]] == ["transformer.h.0", "transformer.h.1"]
    assert groups[0] == [n for n in names if n.startswith("transformer.h.0.")]
    assert groups[-1] == ["lm_head"]  # outside the repeated blocks: a group of its own
    with pytest.raises(Exception, match="not modules"):
        group_by_block(gpt2, ["transformer.h.9.attn"])


def test_plan_stages_rejects_bad_groups(tokenizer):
    model = bert4(tokenizer)
    config = LowRankConfig(param_ratio=0.5)
    overlapping = StagedSchedule(groups=[r".*\.(query|key)", r".*\.key|.*dense|.*value"])
    with pytest.raises(ConfigError, match="in several groups"):
        plan_stages(model, config, overlapping)
    with pytest.raises(ConfigError, match="targeted but in no group"):
        plan_stages(model, config, StagedSchedule(groups=[["query"]]))
    with pytest.raises(ConfigError, match="not targeted"):
        plan_stages(
            model,
            LowRankConfig(target_modules=["query"]),
            StagedSchedule(groups=[["key", "query"]]),
        )
    for bad in (
        dict(order="sideways"),
        dict(blocks_per_stage=0),
        dict(groups=[[]]),
        dict(groups=[["q"]], blocks_per_stage=2),
    ):
        with pytest.raises(ConfigError):
            StagedSchedule(**bad)


def test_split_steps():
    assert split_steps(10, 4) == [2, 2, 2, 2, 2]
    assert split_steps(13, 2) == [4, 4, 5]
    assert sum(split_steps(1001, 6)) == 1001
    with pytest.raises(ConfigError, match="at least 7 steps"):
        split_steps(6, 6)


@pytest.mark.parametrize("name", ["top-down", "bottom-up", "2 blocks top-down", "custom groups"])
def test_finetune_staged_projects_stage_by_stage(tokenizer, rte_train, name):
    schedule, stages = SCHEDULES[name]
    model = bert4(tokenizer)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    seen = []

    def on_phase_end(info, current):
        factorized = set(factorized_modules(current))
        trainable = sorted(n for n, p in current.named_parameters() if p.requires_grad)
        seen.append((info.index, factorized, info.optimizer_params == trainable, info.steps))
        # the optimizer holds the factors of every projected module, no stale dense weight
        assert all(f"{m}.A" in info.optimizer_params for m in factorized)
        assert not any(f"{m}.weight" in info.optimizer_params for m in factorized)

    result, report = finetune_staged(
        model,
        LowRankConfig(param_ratio=0.5),
        schedule,
        rte_train,
        tokenizer,
        FAST,
        accelerator=Accelerator(),
        progress=False,
        on_phase_end=on_phase_end,
    )
    n = len(stages)
    assert [s[0] for s in seen] == list(range(1, n + 2))
    for k, (_, factorized, optimizer_ok, _) in enumerate(seen[:n], start=1):
        assert factorized == {m for stage in stages[:k] for m in stage}, f"after stage {k}"
        assert optimizer_ok, f"stage {k}: optimizer != current trainable parameters"
    assert seen[-1][1] == set(factorized_modules(model)) == {m for s in stages for m in s}
    assert seen[-1][2]
    assert [s[3] for s in seen] == split_steps(6, n) and result.steps == 6
    assert [s.modules for s in result.stages] == [*stages, []]
    assert [m.name for m in report.modules] == [t for i in range(4) for t in block(i)]
    assert report.config["target_modules"] is None and 0.4 < report.kept_ratio <= 0.5
    # later stages project the fine-tuned weights: the classifier moved before the last stage
    assert not torch.equal(before["classifier.weight"], model.classifier.weight)
    assert len(result.losses) >= n + 1 and all(loss == loss for loss in result.losses)


def test_staged_sees_the_same_batches_as_one_long_run(tokenizer, rte_train):
    def batches(run):
        model = bert4(tokenizer)
        ids = []
        model.register_forward_pre_hook(
            lambda _m, _a, kw: ids.append(kw["input_ids"][:, :4].tolist()), with_kwargs=True
        )
        run(model)
        return ids

    # 32 examples, batch 8: 6 steps cross an epoch boundary; 4 stages + final = 1 step each + 2
    config = TrainingConfig(batch_size=8, max_seq_length=32, epochs=1.5, learning_rate=1e-3)
    simultaneous = batches(lambda m: train(m, rte_train, tokenizer, config, progress=False))
    staged = batches(
        lambda m: finetune_staged(
            m, LowRankConfig(), StagedSchedule(), rte_train, tokenizer, config, progress=False
        )
    )
    assert len(simultaneous) == config.num_steps(len(rte_train)) == 6
    assert staged == simultaneous


def test_too_few_steps_fail_before_touching_the_model(tokenizer, rte_train):
    model = bert4(tokenizer)
    config = TrainingConfig(batch_size=8, max_seq_length=32, max_steps=4)
    with pytest.raises(ConfigError, match="at least 5 steps"):
        finetune_staged(model, LowRankConfig(), StagedSchedule(), rte_train, tokenizer, config)
    assert not factorized_modules(model)


def test_infeasible_budget_of_a_late_stage_fails_before_training(tokenizer, rte_train, monkeypatch):
    method = METHODS["low-rank"]

    def plan(m, n, budget, config):  # the bottom block (last stage top-down) is infeasible
        if budget.rank == 99:
            raise ConfigError("rank 99 is infeasible")
        return method.plan(m, n, budget, config)

    monkeypatch.setitem(METHODS, "low-rank", dataclasses.replace(method, plan=plan))
    model = bert4(tokenizer)
    config = LowRankConfig(rank_pattern={r"layer\.0\.output": 99})
    with pytest.raises(ConfigError, match="infeasible"):
        finetune_staged(model, config, StagedSchedule(), rte_train, tokenizer, FAST)
    assert not factorized_modules(model)


def count_optimizer_steps(monkeypatch) -> list[int]:
    """Counts every real optimizer step taken by ``train`` (through ``make_optimizer``)."""
    counter = [0]
    make = finetune_module.make_optimizer

    def counting(*args, **kwargs):
        optimizer = make(*args, **kwargs)
        optimizer.register_step_post_hook(lambda *_: counter.__setitem__(0, counter[0] + 1))
        return optimizer

    monkeypatch.setattr(finetune_module, "make_optimizer", counting)
    return counter


def test_staged_and_simultaneous_runs_take_the_same_steps(
    tmp_path, tiny_model_dir, tiny_glue_dir, monkeypatch
):
    counter = count_optimizer_steps(monkeypatch)
    training = TrainingConfig(batch_size=8, max_seq_length=32, epochs=2, seed=3)
    results, steps = {}, {}
    for name, staged in (("simultaneous", None), ("staged", StagedSchedule())):
        counter[0] = 0
        config = RunConfig(
            output=str(tmp_path / name),
            model=str(tiny_model_dir),
            task="rte",
            data_dir=str(tiny_glue_dir),
            method_options={"param_ratio": 0.25},
            training=training,
            staged=staged,
        )
        results[name] = execute(prepare_run(config), progress=False, log=lambda _: None)
        steps[name] = counter[0]
    assert steps["simultaneous"] == steps["staged"] == 8  # 32 examples / 8 x 2 epochs
    assert results["staged"]["train"]["steps"] == results["simultaneous"]["train"]["steps"] == 8
    staged = json.loads((tmp_path / "staged" / "results.json").read_text())
    assert staged["schedule"] == "staged" and results["simultaneous"]["schedule"] == "simultaneous"
    assert staged["config"]["staged"] == {
        "order": "top-down",
        "blocks_per_stage": 1,
        "groups": None,
    }
    assert "staged" not in results["simultaneous"]["config"]
    phases = staged["train"]["stages"]
    assert [p["stage"] for p in phases] == [1, 2, "final"] and [p["steps"] for p in phases] == [
        2,
        2,
        4,
    ]
    assert phases[0]["modules"][0].startswith("bert.encoder.layer.1.")  # top block first
    assert all(p["train_seconds"] > 0 for p in phases) and phases[0]["factorize_seconds"] > 0
    for key in ("targeted_before", "targeted_after", "model_after"):
        assert staged["parameters"][key] == results["simultaneous"]["parameters"][key]
    assert [m["rank"] for m in staged["factorization"]["modules"]] == [
        m["rank"] for m in results["simultaneous"]["factorization"]["modules"]
    ]


def test_staged_needs_a_task_and_a_method(tmp_path):
    for config in (
        RunConfig(output=str(tmp_path / "a"), staged=StagedSchedule()),
        RunConfig(output=str(tmp_path / "b"), task="rte", method=None, staged=StagedSchedule()),
    ):
        with pytest.raises(ConfigError, match="needs a task"):
            prepare_run(config)


def test_cli_compress_staged(tmp_path, tiny_model_dir, tiny_glue_dir, capsys):
    argv = [
        "compress",
        "--model",
        str(tiny_model_dir),
        "--task",
        "rte",
        "--data-dir",
        str(tiny_glue_dir),
    ]
    fast = ["--epochs", "1", "--batch-size", "8", "--max-seq-length", "32", "--no-progress"]
    out = tmp_path / "run"
    assert main([*argv, *fast, "--output", str(out), "--staged", "--stage-order", "bottom-up"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["schedule"] == "staged" and results["config"]["staged"]["order"] == "bottom-up"
    assert results["train"]["stages"][0]["modules"][0].startswith("bert.encoder.layer.0.")
    assert "staged" in capsys.readouterr().out
    # the staged checkpoint loads back (factorized modules rebuilt from the spec) with its metric
    assert main(["evaluate", str(out), "--task", "rte", "--data-dir", str(tiny_glue_dir)]) == 0
    assert json.loads(capsys.readouterr().out)["metrics"] == pytest.approx(results["metrics"])
    assert main([*argv, *fast, "--output", str(tmp_path / "x"), "--blocks-per-stage", "2"]) == 2
    assert "need --staged" in capsys.readouterr().err


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_registered_method_can_be_staged(tokenizer, rte_train, method):
    # a decoder shared over all blocks cannot be fitted stage by stage (refused, tested below)
    options = {"sharing": "per-matrix", "epochs": 2} if method == "autoencoder" else {}
    if method == "dsformer":  # its straight-through schedule trains all blocks jointly
        options = {"stf": False}
    config = make_config(method, param_ratio=0.5, **options)
    schedule = StagedSchedule(blocks_per_stage=2)
    training = TrainingConfig(batch_size=8, max_seq_length=32, max_steps=3, learning_rate=1e-3)
    model = bert4(tokenizer)
    if method == "lpaf":  # it runs its own schedule: prune, factorize, recover
        with pytest.raises(ConfigError, match="own schedule"):
            finetune_staged(model, config, schedule, rte_train, tokenizer, training)
        assert not factorized_modules(model)
        return
    if get_method(method).needs_calibration:
        with pytest.raises(ConfigError, match="calibrat"):
            finetune_staged(model, config, schedule, rte_train, tokenizer, training)
        assert not factorized_modules(model)
        return
    result, report = finetune_staged(
        model, config, schedule, rte_train, tokenizer, training, progress=False
    )
    assert [s.steps for s in result.stages] == [1, 1, 1]
    assert [m.name for m in report.modules] == [t for i in range(4) for t in block(i)]
    projected = {m.name for m in report.modules if m.rank is not None}
    assert projected and set(factorized_modules(model)) == projected


def test_staged_calibration_methods_recalibrate_each_stage(
    tmp_path, tiny_model_dir, tiny_glue_dir, monkeypatch
):
    """act-svd staged: before each stage, Gram statistics of exactly that stage's modules are
    collected on the current (fine-tuned, partly factorized) model."""
    import factorlab.calibration as calibration

    collected: list[tuple[list[str], int]] = []
    real = calibration.collect_statistics

    def spy(model, batches, targets=None, **kwargs):
        factorized = sum(1 for _ in factorized_modules(model))
        collected.append(([getattr(t, "name", t) for t in targets], factorized))
        return real(model, batches, targets, **kwargs)

    monkeypatch.setattr(calibration, "collect_statistics", spy)
    config = RunConfig(
        output=str(tmp_path / "run"),
        model=str(tiny_model_dir),
        task="rte",
        data_dir=str(tiny_glue_dir),
        method="act-svd",
        method_options={"param_ratio": 0.5},
        training=TrainingConfig(batch_size=8, max_seq_length=32, epochs=2),
        staged=StagedSchedule(),
    )
    results = execute(prepare_run(config), progress=False, log=lambda _: None)
    stages = results["train"]["stages"]
    assert [names for names, _ in collected] == [s["modules"] for s in stages if s["modules"]]
    assert [factorized for _, factorized in collected] == [0, len(stages[0]["modules"])]
    assert results["calibration"]["task"] == "rte" and results["schedule"] == "staged"
    assert results["factorization"]["method"] == "act-svd"
    assert len(results["factorization"]["modules"]) == sum(len(s["modules"]) for s in stages)


def test_staged_autoencoder_needs_per_matrix_sharing(tmp_path, tiny_model_dir, tiny_glue_dir):
    def config(sharing: str) -> RunConfig:
        return RunConfig(
            output=str(tmp_path / sharing),
            model=str(tiny_model_dir),
            task="rte",
            data_dir=str(tiny_glue_dir),
            method="autoencoder",
            method_options={"param_ratio": 0.5, "sharing": sharing},
            staged=StagedSchedule(),
        )

    with pytest.raises(ConfigError, match="sharing='per-matrix'"):
        prepare_run(config("stacked"))
    assert not (tmp_path / "stacked").exists()
    assert prepare_run(config("per-matrix")).factorization.sharing == "per-matrix"
