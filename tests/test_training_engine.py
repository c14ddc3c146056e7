"""The training engine: callbacks, parameter groups, the loss component with distillation,
gradient accumulation, one meaning of batch_size, and multi-process runs on CPU."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from accelerate import Accelerator

from factorlab.cli import main
from factorlab.errors import ConfigError
from factorlab.methods import LowRankConfig, factorize_
from factorlab.runs import RunConfig, prepare_run
from factorlab.training import (
    Callback,
    DistillationConfig,
    Objective,
    TrainingConfig,
    make_optimizer,
    micro_batch_size,
    train,
)
from factorlab.training.losses import hidden_loss, kd_loss
from tests.tiny import tiny_bert

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")


def bert(tokenizer, dropout: float = 0.1):
    model = tiny_bert(vocab_size=tokenizer.vocab_size)
    if dropout == 0:
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
    return model


class Recorder(Callback):
    """Records every hook call, the gradients before the step and the learning rate."""

    def __init__(self):
        self.calls: list[str] = []
        self.had_grads: list[bool] = []

    def on_train_begin(self, ctx):
        self.calls.append("begin")

    def on_step_begin(self, ctx):
        self.calls.append("step_begin")

    def loss_terms(self, ctx):
        assert ctx.batch is not None and "labels" in ctx.batch and ctx.outputs is not None
        self.calls.append("loss")
        return None

    def on_before_optimizer_step(self, ctx):
        self.calls.append("before_step")
        self.had_grads.append(ctx.model.classifier.weight.grad is not None)
        ctx.state.setdefault("lr", []).append(ctx.optimizer.param_groups[0]["lr"])

    def on_step_end(self, ctx):
        self.calls.append("step_end")
        ctx.state["last_step"] = ctx.step

    def on_train_end(self, ctx):
        self.calls.append("end")
        ctx.state["lr_after"] = ctx.optimizer.param_groups[0]["lr"]


def test_callbacks_are_called_in_order_with_gradients_and_state(tokenizer, rte_train):
    recorder = Recorder()
    config = TrainingConfig(
        batch_size=8, max_steps=3, gradient_accumulation_steps=2, warmup_ratio=0.0
    )
    result = train(
        bert(tokenizer), rte_train, tokenizer, config, progress=False, callbacks=[recorder]
    )
    step = ["step_begin", "loss", "loss", "before_step", "step_end"]
    assert recorder.calls == ["begin", *step * 3, "end"]
    assert recorder.had_grads == [True, True, True]
    assert result.steps == 3 and result.examples == 24 and result.num_processes == 1
    assert result.state["last_step"] == 3
    # linear decay from the peak to 0 at the last step, one schedule step per optimizer step
    torch.testing.assert_close(result.state["lr"], [1e-4, 1e-4 * 2 / 3, 1e-4 / 3])
    assert result.state["lr_after"] == 0.0


class ScaleGroup(Callback):
    """Puts the classifier in a group of its own (10x learning rate, no decay) and adds an L2
    penalty on it to the loss."""

    def __init__(self, penalty: float):
        self.penalty = penalty

    def parameter_groups(self, model):
        return [{"name": "head", "params": list(model.classifier.parameters()), "lr": 1e-3}]

    def loss_terms(self, ctx):
        return self.penalty * ctx.model.classifier.weight.pow(2).sum()


def test_callback_parameter_groups_and_loss_terms(tokenizer, rte_train):
    config = TrainingConfig(batch_size=8, max_steps=2, warmup_ratio=0.0)
    result = train(
        bert(tokenizer), rte_train, tokenizer, config, progress=False, callbacks=[ScaleGroup(0.0)]
    )
    groups = {g["name"]: g for g in result.optimizer}
    assert groups["head"] == {"name": "head", "lr": 1e-3, "weight_decay": 0.0, "tensors": 2}
    assert sum(g["tensors"] for g in result.optimizer) == len(list(bert(tokenizer).parameters()))
    # the extra loss term reaches the gradients: a large penalty shrinks the head
    norms = []
    for penalty in (0.0, 10.0):
        model = bert(tokenizer, dropout=0)
        train(model, rte_train, tokenizer, config, progress=False, callbacks=[ScaleGroup(penalty)])
        norms.append(model.classifier.weight.norm().item())
    assert norms[1] < 0.99 * norms[0]


def test_a_parameter_in_two_callback_groups_is_refused(tokenizer):
    model = bert(tokenizer)
    head = list(model.classifier.parameters())
    with pytest.raises(ConfigError, match="two callback parameter groups"):
        make_optimizer(
            model,
            TrainingConfig(),
            [{"name": "a", "params": head}, {"name": "b", "params": head[:1]}],
        )


def test_factor_matrices_have_their_own_weight_decay(tokenizer):
    model = bert(tokenizer)
    factorize_(model, LowRankConfig(param_ratio=0.5))
    groups = {
        g["name"]: g
        for g in make_optimizer(model, TrainingConfig(factor_weight_decay=0.0)).param_groups
    }
    assert groups["factors"]["weight_decay"] == 0.0 and groups["decay"]["weight_decay"] == 0.01
    assert len(groups["factors"]["params"]) == 2 * 12  # A and B of 6 matrices x 2 blocks
    same = {g["name"]: g for g in make_optimizer(model, TrainingConfig()).param_groups}
    assert same["factors"]["weight_decay"] == 0.01  # default: like every other weight
    with pytest.raises(ConfigError, match="factor_weight_decay"):
        TrainingConfig(factor_weight_decay=-1)


def test_gradient_accumulation_equals_one_large_batch(tokenizer, rte_train):
    """Without dropout, 2 micro-batches of 4 give the update of one batch of 8 (same examples)."""
    states = []
    for accum in (1, 2):
        model = bert(tokenizer, dropout=0)
        config = TrainingConfig(batch_size=8, max_steps=2, gradient_accumulation_steps=accum)
        result = train(model, rte_train, tokenizer, config, progress=False)
        assert result.steps == 2 and result.examples == 16
        states.append(model.state_dict())
    for key in states[0]:
        torch.testing.assert_close(states[1][key], states[0][key], atol=2e-6, rtol=1e-4)


def test_batch_size_must_split_over_processes_and_accumulation():
    assert micro_batch_size(TrainingConfig(batch_size=32, gradient_accumulation_steps=4), 2) == 4
    with pytest.raises(ConfigError, match="multiple of 6"):
        micro_batch_size(TrainingConfig(batch_size=32, gradient_accumulation_steps=3), 2)
    with pytest.raises(ConfigError, match="gradient_accumulation_steps"):
        TrainingConfig(gradient_accumulation_steps=0)


def test_kd_loss_is_the_scaled_kl_divergence():
    student, teacher = torch.randn(4, 3), torch.randn(4, 3)
    t = 2.0
    p_t = F.softmax(teacher / t, -1)
    expected = (p_t * (p_t.log() - F.log_softmax(student / t, -1))).sum(-1).mean() * t * t
    torch.testing.assert_close(kd_loss(student, teacher, t, regression=False), expected)
    assert kd_loss(teacher, teacher, t, regression=False).abs() < 1e-6
    torch.testing.assert_close(
        kd_loss(student[:, :1], teacher[:, :1], t, regression=True),
        F.mse_loss(student[:, :1], teacher[:, :1]),
    )
    hidden = (torch.zeros(2, 3), torch.ones(2, 3), 2 * torch.ones(2, 3))
    zeros = tuple(torch.zeros(2, 3) for _ in hidden)
    torch.testing.assert_close(hidden_loss(hidden, zeros), torch.tensor(2.5))  # (1 + 4) / 2


def test_objective_mixes_task_and_distillation(tokenizer, rte_train):
    student = bert(tokenizer, dropout=0).train()
    teacher = copy.deepcopy(student)
    batch = next(
        iter(torch.utils.data.DataLoader(rte_train, batch_size=4, collate_fn=_collate(tokenizer)))
    )
    plain = Objective(regression=False)
    task, _, parts = plain(student, batch)
    assert set(parts) == {"task"}
    torch.testing.assert_close(task, student(**batch).loss)
    config = DistillationConfig(teacher="unused", alpha=0.25, hidden_weight=1.0)
    loss, _, parts = Objective(False, config, teacher)(student, batch)
    assert set(parts) == {"task", "kd", "hidden"}
    assert parts["kd"].abs() < 1e-6 and parts["hidden"].abs() < 1e-10  # teacher == student
    torch.testing.assert_close(loss, 0.75 * task, atol=1e-6, rtol=1e-5)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    with pytest.raises(ConfigError, match="teacher"):
        Objective(False, config)


def _collate(tokenizer):
    from transformers import DataCollatorWithPadding

    return DataCollatorWithPadding(tokenizer, return_tensors="pt")


def _fast(model, glue) -> list[str]:
    return [
        "--model",
        str(model),
        "--data-dir",
        str(glue),
        "--max-steps",
        "4",
        "--batch-size",
        "8",
        "--max-seq-length",
        "32",
        "--no-progress",
    ]


@pytest.fixture(scope="module")
def sst2_teacher(tmp_path_factory, tiny_model_dir, tiny_glue_dir) -> Path:
    out = tmp_path_factory.mktemp("teacher") / "sst2-dense"
    assert (
        main(
            [
                "finetune",
                "--task",
                "sst2",
                *_fast(tiny_model_dir, tiny_glue_dir),
                "--output",
                str(out),
            ]
        )
        == 0
    )
    return out


def test_cli_distillation_run_records_the_recipe(
    tmp_path, tiny_model_dir, tiny_glue_dir, sst2_teacher
):
    out = tmp_path / "student"
    argv = [
        "compress",
        "--task",
        "sst2",
        *_fast(tiny_model_dir, tiny_glue_dir),
        "--output",
        str(out),
    ]
    assert main([*argv, "--teacher", str(sst2_teacher), "--distill-alpha", "0.7"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["train"]["distillation"] == {
        "teacher": str(sst2_teacher),
        "alpha": 0.7,
        "temperature": 2.0,
        "hidden_weight": 0.0,
    }
    assert results["config"]["distillation"]["alpha"] == 0.7
    assert set(results["train"]["loss_parts"]) == {"task", "kd"}
    assert results["train"]["examples_per_step"] == 8 and results["train"]["num_processes"] == 1
    assert {g["name"] for g in results["train"]["optimizer"]} == {"decay", "no_decay", "factors"}
    # without a teacher the config holds no distillation entry (earlier runs' hashes still match)
    plain = tmp_path / "plain"
    assert main([*argv[:-1], str(plain)]) == 0
    assert "distillation" not in json.loads((plain / "results.json").read_text())["config"]


def test_bad_teachers_are_refused_before_any_work(
    tmp_path, tiny_model_dir, tiny_glue_dir, sst2_teacher, capsys
):
    fast = _fast(tiny_model_dir, tiny_glue_dir)
    cases = [
        (["--task", "sst2", "--teacher", str(tiny_model_dir)], "no sequence-classification head"),
        (["--task", "sst2", "--teacher", str(tmp_path / "nowhere")], "does not exist"),
        (["--task", "sst2", "--distill-alpha", "0.5"], "need --teacher"),
        (["--task", "sst2", "--teacher", str(sst2_teacher), "--distill-alpha", "2"], "alpha"),
        (["--task", "stsb", "--teacher", str(sst2_teacher)], None),  # no STS-B in the tiny data
    ]
    for extra, message in cases:
        out = tmp_path / "out"
        assert main(["compress", *fast, *extra, "--output", str(out)]) == 2, extra
        err = capsys.readouterr().err
        assert message is None or message in err, err
        assert not out.exists()
    config = RunConfig(
        output=str(tmp_path / "x"),
        model=str(tiny_model_dir),
        task=None,
        distillation=DistillationConfig(teacher=str(sst2_teacher)),
    )
    with pytest.raises(ConfigError, match="needs? --task|give --task"):
        prepare_run(config)


def test_teacher_of_another_task_is_refused(tmp_path, tiny_model_dir, tiny_glue_dir, sst2_teacher):
    from transformers import AutoConfig

    from factorlab.training import check_teacher

    teacher = AutoConfig.from_pretrained(sst2_teacher)
    student = AutoConfig.from_pretrained(tiny_model_dir)
    with pytest.raises(ConfigError, match="3 labels|has 2 labels"):
        check_teacher(teacher, student, DistillationConfig(teacher="t"), num_labels=3)
    deeper = copy.deepcopy(student)
    deeper.num_hidden_layers = 4
    with pytest.raises(ConfigError, match="depth and width"):
        check_teacher(teacher, deeper, DistillationConfig(teacher="t", hidden_weight=1.0), 2)
    check_teacher(teacher, deeper, DistillationConfig(teacher="t"), 2)  # logits only: fine


def _launch(nproc: int, model: Path, glue: Path, out: Path) -> dict:
    """Run tests/distributed_worker.py: in this process for one, under torchrun for more."""
    if nproc == 1:
        from tests.distributed_worker import main as worker

        threads = torch.get_num_threads()
        try:
            worker(str(model), str(glue), str(out))
        finally:
            torch.set_num_threads(threads)
        return json.loads(out.read_text())
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    script = str(REPO / "tests" / "distributed_worker.py")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc)]
    done = subprocess.run(
        [*command, "--standalone", script, str(model), str(glue), str(out)],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(out.read_text())


def test_two_processes_train_like_one(tmp_path, tiny_model_dir, tiny_glue_dir):
    """Same optimizer steps, examples per step and learning-rate curve (ending at 0) on 2 CPU
    processes (gloo) as on one; evaluation gathers every dev example exactly once."""
    one = _launch(1, tiny_model_dir, tiny_glue_dir, tmp_path / "one.json")
    two = _launch(2, tiny_model_dir, tiny_glue_dir, tmp_path / "two.json")
    assert one["num_processes"] == 1 and two["num_processes"] == 2
    assert one["steps"] == two["steps"] == 8  # 32 examples / 8 per step x 2 epochs
    assert one["examples"] == two["examples"] == 64
    torch.testing.assert_close(two["lr"], one["lr"])
    assert one["lr"][0] == 1e-3 and one["lr_after"] == two["lr_after"] == 0.0
    assert one["predictions"] == two["predictions"] == one["dev_examples"] == 16


def test_cli_on_two_processes_writes_one_results_file(tmp_path, tiny_model_dir, tiny_glue_dir):
    out = tmp_path / "run"
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--standalone",
        "-m",
        "factorlab",
        "compress",
        "--task",
        "rte",
        *_fast(tiny_model_dir, tiny_glue_dir),
        "--output",
        str(out),
    ]
    done = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["train"]["num_processes"] == 2
    assert results["train"]["steps"] == 4 and results["train"]["examples"] == 32
    assert done.stdout.count("saved to") == 1
    assert not [p for p in out.parent.iterdir() if ".partial-" in p.name]  # no stray partials


def test_one_accelerator_trains_twice_with_fresh_schedules(tokenizer, rte_train):
    """The same accelerator trains twice (as the staged phases do), each with its own schedule."""
    accelerator = Accelerator()
    model = bert(tokenizer)
    config = TrainingConfig(batch_size=8, max_steps=2, warmup_ratio=0.0)
    for _ in range(2):
        recorder = Recorder()
        result = train(
            model,
            rte_train,
            tokenizer,
            config,
            accelerator=accelerator,
            progress=False,
            callbacks=[recorder],
        )
        assert result.state["lr"] == [1e-4, 5e-5] and result.state["lr_after"] == 0.0


def test_report_labels_distilled_and_fine_tuned_starts(tmp_path, tiny_model_dir):
    from factorlab.bench.report import method_label

    start = tmp_path / "sst2-dense"
    start.mkdir()
    (start / "results.json").write_text("{}")
    base = {"method": "low-rank", "config": {"method_options": {"param_ratio": 0.5}}}
    assert method_label(base) == "low-rank"
    plain_start = {**base, "config": {**base["config"], "model": str(tiny_model_dir)}}
    assert method_label(plain_start) == "low-rank"  # a plain model folder is no run to name
    kd = {"distillation": {"teacher": "t", "alpha": 0.5, "temperature": 2.0, "hidden_weight": 1.0}}
    config = {**base["config"], **kd, "model": str(start)}
    assert method_label({**base, "config": config}) == "low-rank kd hidden=1 from sst2-dense"
    config = {**config, "model": "embedded:all-MiniLM-L6-v2"}
    config["distillation"] = {**config["distillation"], "hidden_weight": 0.0}
    assert method_label({**base, "config": config}) == "low-rank kd"
    config["distillation"] = {**config["distillation"], "alpha": 0.9, "temperature": 1.0}
    assert method_label({**base, "config": config}) == "low-rank kd alpha=0.9 T=1"
    # from a dense run: one label whatever the dense run's folder (its seed)
    for seed in (42, 43):
        folder = tmp_path / f"sst2-dense-s{seed}"
        folder.mkdir()
        (folder / "results.json").write_text('{"method": "dense"}')
        start = {**base, "config": {**base["config"], "model": str(folder)}}
        assert method_label(start) == "low-rank from dense"


def test_length_grouped_batches_pad_less_and_keep_every_example(tokenizer, glue_dir):
    from factorlab.tasks import load_split
    from factorlab.training import EncodedSplit, make_loader

    split = load_split("sst2", "dev", glue_dir)  # 872 real sentences, 5-55 tokens
    dataset = EncodedSplit(split, tokenizer, 128)

    def epoch(loader):
        batches = list(loader)
        ids = sorted(i for b in batches for i in b["input_ids"].flatten().tolist())
        return sum(b["input_ids"].numel() for b in batches), ids, batches

    plain_tokens, plain_ids, _ = epoch(make_loader(dataset, tokenizer, 32, shuffle=True, seed=1))
    grouped = make_loader(dataset, tokenizer, 32, shuffle=True, seed=1, group_by_length=True)
    tokens, ids, first = epoch(grouped)
    assert tokens < 0.7 * plain_tokens  # padded tokens per epoch (0.62 measured)
    real = sum(len(f["input_ids"]) for f in dataset.features)
    assert real <= tokens
    assert ids.count(tokenizer.pad_token_id) < plain_ids.count(tokenizer.pad_token_id)
    labels = sorted(int(v) for b in first for v in b["labels"])
    assert labels == sorted(dataset.labels)  # every example once per epoch
    _, _, second = epoch(grouped)  # the next epoch: another order
    assert not torch.equal(first[0]["input_ids"], second[0]["input_ids"])
    again = make_loader(dataset, tokenizer, 32, shuffle=True, seed=1, group_by_length=True)
    _, _, repeat = epoch(again)  # seeded: the same order
    assert all(
        torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(first, repeat, strict=True)
    )


def test_cli_group_by_length_is_recorded_and_left_out_at_its_default(
    tmp_path, tiny_model_dir, tiny_glue_dir
):
    grouped = tmp_path / "grouped"
    argv = ["finetune", "--task", "sst2", *_fast(tiny_model_dir, tiny_glue_dir)]
    assert main([*argv, "--group-by-length", "--output", str(grouped)]) == 0
    config = json.loads((grouped / "results.json").read_text())["config"]
    assert config["training"]["group_by_length"] is True
    plain = RunConfig(output="x", training=TrainingConfig())
    assert "group_by_length" not in plain.to_dict()["training"]  # earlier runs' hashes hold
