"""Sweeps (planning, validation, caching, resuming) and reports (tables, plots)."""

import json
import re

import pytest
import yaml

from factorlab.bench import sweep as sweep_mod
from factorlab.bench.report import collect_results, comparison_table, reconstruction_error_curve
from factorlab.bench.sweep import load_sweep, parse_sweep, plan_sweep, run_sweep
from factorlab.cli import main
from factorlab.errors import ConfigError
from factorlab.runs import execute

PNG = b"\x89PNG\r\n\x1a\n"
TRAINING = {"epochs": 1, "batch_size": 8, "max_seq_length": 32}


def write_sweep(tmp_path, model, glue, **overrides):
    data = {
        "model": str(model),
        "data_dir": str(glue),
        "tasks": ["rte"],
        "methods": ["dense", "low-rank"],
        "param_ratios": [0.5, 0.25],
        "seeds": [42],
        "training": TRAINING,
        **overrides,
    }
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


class CountingExecute:
    """``execute`` that records the runs it is called for and can fail on the n-th call."""

    def __init__(self, fail_on: int | None = None):
        self.calls: list[str] = []
        self.fail_on = fail_on

    def __call__(self, run, progress=True, log=print):
        self.calls.append(run.config.output)
        if self.fail_on is not None and len(self.calls) == self.fail_on:
            raise RuntimeError("killed")
        return execute(run, progress=False, log=log)


def test_plan_names_and_grid(tmp_path):
    spec = parse_sweep(
        {
            "tasks": ["rte", "sst2"],
            "methods": [
                "dense",
                "low-rank",
                {"name": "low-rank", "grid": {"rank_pattern": [{}, {"query": 4}]}},
            ],
            "param_ratios": [0.5, 0.25],
            "seeds": [1, 2],
        }
    )
    runs = plan_sweep(spec, tmp_path)
    # per task and seed: 1 dense + 2 ratios x (1 + 2 grid variants)
    assert len(runs) == 2 * 2 * (1 + 2 * 3)
    names = [r.name for r in runs]
    assert len(set(names)) == len(names)
    assert re.fullmatch(r"rte-low-rank-0\.5-s1-[0-9a-f]{8}", names[2]), names[:3]
    assert re.fullmatch(r"rte-dense-s1-[0-9a-f]{8}", names[0])
    dense = runs[0].config
    assert dense.method is None and dense.method_options == {} and dense.training.seed == 1
    lr = runs[2].config
    assert lr.method == "low-rank" and lr.method_options == {"param_ratio": 0.5}
    assert runs[2].label == "rte low-rank 0.5 seed 1"
    # the hash depends on the config only: planning twice gives the same folders
    assert [r.name for r in plan_sweep(spec, tmp_path)] == names


@pytest.mark.parametrize(
    "data, match",
    [
        ({"methods": ["dense"], "epochs": 3}, r"unknown key\(s\) \['epochs'\]"),
        ({"methods": ["dense"], "training": {"epoch": 3}}, r"training: unknown key"),
        ({"methods": ["dense"], "training": {"seed": 3}}, "seeds"),
        ({"methods": ["low-rank"]}, "needs param_ratios"),
        ({"methods": ["low-rank"], "param_ratios": [1.5]}, r"\(0, 1\]"),
        ({"methods": [{"name": "dense", "nblocks": 2}]}, "takes no options"),
        ({"methods": ["dense"], "bench": {"batch": 1}}, r"bench: unknown key"),
        ({"tasks": ["rte"]}, "methods is required"),
        ([1, 2], "mapping"),
    ],
)
def test_sweep_file_errors(data, match):
    with pytest.raises(ConfigError, match=match):
        parse_sweep(data)


def test_list_options_and_staged(tmp_path):
    spec = parse_sweep(
        {
            "tasks": ["rte"],
            "methods": [
                {"name": "low-rank", "target_modules": ["query", "value"]},
                {"name": "low-rank", "staged": True},
            ],
            "param_ratios": [0.5],
        }
    )
    runs = plan_sweep(spec, tmp_path)
    assert runs[0].config.method_options == {
        "param_ratio": 0.5,
        "target_modules": ["query", "value"],
    }
    assert runs[0].label == 'rte low-rank target_modules=["query","value"] 0.5 seed 42'
    assert runs[1].config.staged is not None and "staged" in runs[1].name
    assert runs[0].name != runs[1].name
    bad = parse_sweep({"methods": [{"name": "low-rank", "staged": {"ordr": "x"}}],
                       "param_ratios": [0.5]})  # fmt: skip
    with pytest.raises(ConfigError, match="staged"):
        plan_sweep(bad, tmp_path)


def test_yaml_numbers_and_training_types(tmp_path):
    # YAML 1.1 reads 5e-5 as a string; the sweep turns numeric strings into floats
    spec = parse_sweep(yaml.safe_load("methods: [low-rank]\nparam_ratios: [5e-1]\n"
                                      "training: {learning_rate: 5e-5}"))  # fmt: skip
    assert spec.training == {"learning_rate": 5e-5} and spec.methods[0].param_ratios == (0.5,)
    assert plan_sweep(spec, tmp_path)[0].config.training.learning_rate == 5e-5
    with pytest.raises(ConfigError, match="batch_size"):
        plan_sweep(parse_sweep({"methods": ["dense"], "training": {"batch_size": "x"}}), tmp_path)


def test_invalid_run_fails_before_anything_runs(tmp_path, tiny_model_dir, tiny_glue_dir):
    path = write_sweep(
        tmp_path,
        tiny_model_dir,
        tiny_glue_dir,
        methods=["dense", {"name": "low-rank", "nblock": 4}],
    )
    fake = CountingExecute()
    with pytest.raises(ConfigError, match="nblock"):
        run_sweep(path, tmp_path / "out", execute_fn=fake)
    assert fake.calls == []
    with pytest.raises(ConfigError, match="unknown task|task"):
        run_sweep(write_sweep(tmp_path, tiny_model_dir, tiny_glue_dir, tasks=["nope"]), tmp_path)
    # the CLI turns it into exit code 2
    assert main(["sweep", str(path), "--output", str(tmp_path / "out")]) == 2


def test_killed_sweep_resumes_without_redoing_runs(
    tmp_path, tiny_model_dir, tiny_glue_dir, monkeypatch, capsys
):
    path = write_sweep(tmp_path, tiny_model_dir, tiny_glue_dir)
    out = tmp_path / "out"
    first = CountingExecute(fail_on=2)
    with pytest.raises(RuntimeError, match="killed"):
        run_sweep(path, out, execute_fn=first)
    assert len(first.calls) == 2
    assert len(collect_results(out)) == 1  # the finished run is saved, the killed one is not

    second = CountingExecute()
    summary = run_sweep(path, out, execute_fn=second)
    assert second.calls == [*first.calls[1:], second.calls[-1]] and len(second.calls) == 2
    assert first.calls[0] not in second.calls  # not re-executed
    assert summary.skipped == [first.calls[0].rsplit("/", 1)[-1]]
    assert len(summary.executed) == 2 and len(collect_results(out)) == 3
    log = capsys.readouterr().out
    assert "[1/3] rte dense seed 42: skipped (cached)" in log
    assert re.search(r"\[3/3\] rte low-rank 0\.25 seed 42: done in \d+ s, accuracy 0\.\d{4}", log)

    # all cached now: nothing runs; through the CLI as well (with a patched execute)
    third = CountingExecute()
    monkeypatch.setattr(sweep_mod, "execute", third)
    assert main(["sweep", str(path), "--output", str(out)]) == 0
    assert third.calls == []
    manifest = json.loads((out / "sweep.json").read_text())
    assert len(manifest["runs"]) == 3

    # a config change makes a new run beside the old one
    changed = write_sweep(
        tmp_path,
        tiny_model_dir,
        tiny_glue_dir,
        methods=["low-rank"],
        param_ratios=[0.5],
        training={**TRAINING, "learning_rate": 5e-5},
    )
    fourth = CountingExecute()
    summary = run_sweep(changed, out, execute_fn=fourth)
    assert len(fourth.calls) == 1 and fourth.calls[0] not in first.calls + second.calls
    assert len(collect_results(out)) == 4


def test_report_tables_and_plots(tmp_path, tiny_model_dir, tiny_glue_dir, capsys):
    path = write_sweep(
        tmp_path, tiny_model_dir, tiny_glue_dir, seeds=[1, 2], param_ratios=[0.5],
        bench={"batch_sizes": [1], "seq_len": 16, "threads": 1, "runs": 3},
    )  # fmt: skip
    out = tmp_path / "out"
    summary = run_sweep(load_sweep(path), out)
    assert len(summary.executed) == 4 and len(summary.benched) == 2  # dense + low-rank 0.5
    bench = json.loads((out / summary.benched[1] / "bench.json").read_text())
    assert bench["factorized"] and bench["settings"]["runs"] == 3
    assert run_sweep(load_sweep(path), out).benched == []  # benchmarks are cached too

    assert main(["report", str(out)]) == 0
    printed = capsys.readouterr().out
    report = (out / "report" / "report.md").read_text()
    rows = [line for line in report.splitlines() if line.startswith("| rte |")]
    assert len(rows) == 2
    dense_row, lr_row = rows
    assert "| dense | 1 |" in dense_row and "| 2 |" in dense_row  # 2 seeds
    assert "| low-rank | 0.5 |" in lr_row and "accuracy" in lr_row and " ± " in lr_row
    assert re.search(r"b1 \d+\.\d\d \|$", lr_row)  # latency ratio column from bench.json
    assert "## Latency against dense" in report and lr_row.split("|")[2] in printed
    for png in ("metric_rte.png", "latency.png", "reconstruction_error.png"):
        assert (out / "report" / png).read_bytes()[:8] == PNG, png
        assert f"({png})" in report
    other = tmp_path / "elsewhere"
    assert main(["report", str(out), "--output", str(other)]) == 0
    assert (other / "report.md").is_file()
    assert main(["report", str(tmp_path / "missing")]) == 2


def test_reconstruction_error_curve():
    import torch

    W = torch.diag(torch.tensor([3.0, 2.0, 1.0, 0.0]))
    errors = reconstruction_error_curve(W)
    assert len(errors) == 5 and errors[0] == pytest.approx(1.0) and errors[-1] == 0.0
    assert errors[1] == pytest.approx((5 / 14) ** 0.5) and errors[3] == pytest.approx(0.0)


def _result(task, method, ratio, seed, value, kept=0.5):
    return {
        "task": task,
        "method": method,
        "param_ratio": ratio,
        "seed": seed,
        "main_metric": "accuracy",
        "metrics": {"accuracy": value, "f1": 0.0},
        "parameters": {"model_before": 100, "model_after": int(100 * kept)},
        "config": {"method_options": {"param_ratio": ratio, "nblocks": 4}}
        if method == "monarch"
        else {},
    }


def test_comparison_table_pivots_tasks_and_latency():
    results = [
        _result("rte", "dense", 1.0, 1, 0.50, kept=1.0),
        _result("sst2", "dense", 1.0, 1, 0.90, kept=1.0),
        _result("sst2", "low-rank", 0.5, 1, 0.80),
        _result("sst2", "low-rank", 0.5, 2, 0.70),
        _result("rte", "monarch", 0.5, 1, 0.55),
    ]
    batches = [{"batch_size": 1, "latency_ratio": 0.8}, {"batch_size": 32, "latency_ratio": 0.75}]
    bench = {"batches": batches}
    table = comparison_table(results, {("low-rank", 0.5): bench}).splitlines()
    assert table[0] == (
        "| method | param_ratio | model kept | rte accuracy | sst2 accuracy | latency x b1 "
        "| latency x b32 |"
    )
    assert table[2] == "| dense | 1 | 1.000 | 50.00 | 90.00 | 1 | 1 |"
    assert table[3] == "| low-rank | 0.5 | 0.500 | - | 75.00 ± 7.07 | 0.80 | 0.75 |"
    assert table[4] == "| monarch nblocks=4 | 0.5 | 0.500 | 55.00 | - | - | - |"
