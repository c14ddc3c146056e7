"""Sweeps (planning, validation, caching, resuming) and reports (tables, plots)."""

import json
import re
import shutil

import pytest
import yaml

from factorlab.bench import sweep as sweep_mod
from factorlab.bench.report import (
    README_MARKERS,
    collect_benches,
    collect_results,
    comparison_table,
    is_failed_run,
    method_label,
    reconstruction_error_curve,
    results_table,
    runs_table,
)
from factorlab.bench.sweep import (
    lane_runs,
    load_sweep,
    parse_lane,
    parse_sweep,
    plan_sweep,
    run_sweep,
    select_runs,
)
from factorlab.cli import main
from factorlab.errors import ConfigError
from factorlab.runs import RESULTS_FILE, execute

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
    # an entry's own tasks: it runs on those only, and the other runs keep their folders
    extra = {**spec.source, "methods": [*spec.source["methods"]]}
    extra["methods"].append({"name": "monarch", "tasks": ["sst2"], "param_ratios": [0.25]})
    more = plan_sweep(parse_sweep(extra), tmp_path)
    added = [r for r in more if r.name not in set(names)]
    assert [(r.task, r.method.name, r.param_ratio, r.seed) for r in added] == [
        ("sst2", "monarch", 0.25, 1),
        ("sst2", "monarch", 0.25, 2),
    ]
    assert len(more) == len(runs) + 2


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
        (
            {
                "tasks": ["rte"],
                "methods": [{"name": "low-rank", "tasks": ["cola"]}],
                "param_ratios": [0.5],
            },
            r"tasks \['cola'\] are not among the tasks \['rte'\]",
        ),
        (
            {"methods": [{"name": "low-rank", "tasks": "rte"}], "param_ratios": [0.5]},
            "tasks must be a non-empty list",
        ),
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


def test_recipes_start_and_distill_plan(tmp_path):
    spec = parse_sweep(
        {
            "tasks": ["rte", "mrpc"],
            "methods": [
                {"name": "act-svd", "start": "dense", "distill": {"alpha": 0.9}},
                "dense",  # listed after: planned first all the same
                {"name": "low-rank", "distill": True},
            ],
            "param_ratios": [0.5],
            "training": {"epochs": 3, "learning_rate": 1e-4},
            "recipes": {"mrpc": {"epochs": 5, "learning_rate": "5e-5"}},
        }
    )
    runs = plan_sweep(spec, tmp_path / "a")
    by_task = {t: [r for r in runs if r.task == t] for t in ("rte", "mrpc")}
    for task, (dense, act, lr) in by_task.items():
        assert dense.method.name == "dense" and dense.after is None
        assert act.after == dense.name and lr.after == dense.name
        assert act.config.model == dense.config.output  # compresses the fine-tuned model
        assert act.config.distillation.teacher == dense.config.output
        assert act.config.distillation.alpha == 0.9
        assert lr.config.model is None and lr.config.distillation.teacher == dense.config.output
        assert re.fullmatch(rf"{task}-act-svd-from-dense-kd-0\.5-s42-[0-9a-f]{{8}}", act.name)
        assert act.label == f"{task} act-svd from-dense kd alpha=0.9 0.5 seed 42"
    assert [r.config.training.epochs for r in by_task["mrpc"]] == [5, 5, 5]
    assert by_task["mrpc"][0].config.training.learning_rate == 5e-5
    assert [r.config.training.epochs for r in by_task["rte"]] == [3, 3, 3]
    # names depend on what runs compute, not on the sweep folder
    assert [r.name for r in plan_sweep(spec, tmp_path / "b")] == [r.name for r in runs]


@pytest.mark.parametrize(
    "data, match",
    [
        ({"methods": [{"name": "low-rank", "start": "dense"}]}, "add dense"),
        ({"methods": ["dense", {"name": "low-rank", "distill": {"alpha": 1}}]}, "needs a task"),
        ({"tasks": ["rte"], "methods": [{"name": "low-rank", "start": "fine-tuned"}]}, "start"),
        ({"tasks": ["rte"], "methods": ["dense", {"name": "low-rank", "distill": {"T": 2}}]},
         r"distill: unknown key"),
        ({"tasks": ["rte"], "methods": [{"name": "dense", "start": "dense"}]}, "no options"),
        ({"tasks": ["rte"], "methods": ["dense"], "recipes": {"sst2": {"epochs": 1}}},
         "not among the tasks"),
        ({"tasks": ["rte"], "methods": ["dense"], "recipes": {"rte": {"epoch": 1}}},
         r"recipes.rte: unknown key"),
        ({"tasks": ["rte"], "methods": ["dense"], "recipes": {"rte": {"seed": 1}}}, "seeds"),
    ],
)  # fmt: skip
def test_recipe_and_dependency_errors(data, match):
    data = {"param_ratios": [0.5], **data}
    with pytest.raises(ConfigError, match=match):
        parse_sweep(data)


def test_bad_distillation_values_are_refused_when_planning():
    with pytest.raises(ConfigError, match="distill alpha"):
        plan_sweep(
            parse_sweep({"tasks": ["rte"], "param_ratios": [0.5], "methods": [
                "dense", {"name": "low-rank", "distill": {"alpha": 2}}]}), "out"
        )  # fmt: skip


def test_runs_from_the_dense_run_wait_for_it_and_stay_cached(
    tmp_path, tiny_model_dir, tiny_glue_dir
):
    path = write_sweep(
        tmp_path,
        tiny_model_dir,
        tiny_glue_dir,
        methods=["dense", {"name": "low-rank", "start": "dense", "distill": {"alpha": 0.9}}],
        param_ratios=[0.5],
        recipes={"rte": {"epochs": 2}},
    )
    out = tmp_path / "out"
    summary = run_sweep(path, out)
    dense_name, student_name = summary.executed
    student = json.loads((out / student_name / RESULTS_FILE).read_text())
    assert student["config"]["model"] == str(out / dense_name)
    assert student["config"]["distillation"]["teacher"] == str(out / dense_name)
    assert student["config"]["training"]["epochs"] == 2
    assert student["train"]["distillation"]["alpha"] == 0.9
    dense = json.loads((out / dense_name / RESULTS_FILE).read_text())
    assert student["parameters"]["model_before"] == dense["parameters"]["model_after"]
    manifest = json.loads((out / "sweep.json").read_text())
    assert [r["after"] for r in manifest["runs"]] == [None, dense_name]

    # a run whose dense run is neither done nor selected is refused before anything runs
    with pytest.raises(ConfigError, match="needs its dense run"):
        run_sweep(path, tmp_path / "fresh", methods=["low-rank"])
    # moved elsewhere, both runs are still cached
    moved = tmp_path / "moved"
    out.rename(moved)
    again = CountingExecute()
    summary = run_sweep(path, moved, execute_fn=again)
    assert again.calls == [] and summary.skipped == [dense_name, student_name]


def test_a_record_resumes_a_sweep_whose_run_folders_are_gone(
    tmp_path, tiny_model_dir, tiny_glue_dir, capsys, monkeypatch
):
    path = write_sweep(
        tmp_path,
        tiny_model_dir,
        tiny_glue_dir,
        methods=["dense", {"name": "low-rank", "start": "dense"}],
    )
    out, record = tmp_path / "out", tmp_path / "record"
    first = CountingExecute()
    summary = run_sweep(path, out, execute_fn=first, record=record)
    dense, half, quarter = summary.executed
    for name in summary.executed:  # the record holds the results, not the checkpoints
        assert [p.name for p in (record / name).iterdir()] == [RESULTS_FILE]
        assert (record / name / RESULTS_FILE).read_text() == (out / name / RESULTS_FILE).read_text()
    labels = [method_label(r) for r in collect_results(record)]  # `factorlab report RECORD`
    assert labels == ["dense", "low-rank from dense", "low-rank from dense"]

    shutil.rmtree(out)  # a machine that lost its run folders: nothing runs again
    again = CountingExecute()
    summary = run_sweep(path, out, execute_fn=again, record=record)
    assert again.calls == [] and summary.skipped == [dense, half, quarter]
    assert summary.results[half] == json.loads((record / half / RESULTS_FILE).read_text())
    assert "skipped (recorded in" in capsys.readouterr().out
    assert [method_label(r) for r in collect_results(record)] == labels
    monkeypatch.setattr(sweep_mod, "execute", again)  # the same through the CLI
    assert main(["sweep", str(path), "--output", str(out), "--record", str(record)]) == 0
    assert again.calls == [] and f"factorlab report {record}" in capsys.readouterr().out

    # a compressed run still to do needs its dense checkpoint: --methods dense rebuilds it
    shutil.rmtree(record / quarter)
    with pytest.raises(ConfigError, match="needs its dense run"):
        run_sweep(path, out, execute_fn=again, record=record, methods=["low-rank"])
    third = CountingExecute()
    summary = run_sweep(path, out, execute_fn=third, record=record, methods=["dense"])
    assert summary.executed == [dense]
    assert "reproduces its record" in capsys.readouterr().out  # CPU runs are deterministic
    summary = run_sweep(path, out, execute_fn=third, record=record, methods=["low-rank"])
    assert summary.executed == [quarter] and summary.skipped == [half]

    # a rerun that differs is logged, and the record keeps the results its dependents used
    shutil.rmtree(out)
    shutil.rmtree(record / quarter)
    recorded = json.loads((record / dense / RESULTS_FILE).read_text())
    recorded["metrics"]["accuracy"] += 0.5
    (record / dense / RESULTS_FILE).write_text(json.dumps(recorded))
    summary = run_sweep(path, out, execute_fn=CountingExecute(), record=record)
    assert summary.executed == [dense, quarter]
    assert "differs from its record" in capsys.readouterr().out
    assert json.loads((record / dense / RESULTS_FILE).read_text()) == recorded

    # runs already in their folders fill a new record without running again
    summary = run_sweep(path, out, execute_fn=CountingExecute(), record=tmp_path / "new")
    assert summary.executed == [half] and summary.skipped == [dense, quarter]
    assert sorted(p.name for p in (tmp_path / "new").iterdir()) == sorted([dense, half, quarter])
    (tmp_path / "file").write_text("")
    for bad, match in ((tmp_path / "file", "is a file"), (out / "rec", "hold one another")):
        with pytest.raises(ConfigError, match=match):
            run_sweep(path, out, execute_fn=CountingExecute(), record=bad)
    assert not (out / "rec").exists()


def test_lanes_split_task_and_seed_groups(tmp_path, tiny_model_dir, tiny_glue_dir):
    spec = parse_sweep(
        {
            "tasks": ["rte", "mrpc"],
            "methods": ["dense", {"name": "low-rank", "start": "dense"}, "monarch"],
            "param_ratios": [0.5],
            "seeds": [1, 2],
        }
    )
    runs = plan_sweep(spec, tmp_path)
    lanes = [lane_runs(runs, (i, 3)) for i in range(3)]
    assert sorted(r.name for lane in lanes for r in lane) == sorted(r.name for r in runs)
    for lane in lanes:  # every dependent run is in its dense run's lane
        names = {r.name for r in lane}
        assert all(r.after is None or r.after in names for r in lane)
    assert [len(lane) for lane in lanes] == [6, 3, 3]  # 4 groups of 3 runs over 3 lanes
    assert parse_lane("1/3") == (1, 3)
    for bad in ("3/3", "-1/2", "1", "a/b"):
        with pytest.raises(ConfigError, match="--lane must be I/N"):
            parse_lane(bad)
    path = write_sweep(tmp_path, tiny_model_dir, tiny_glue_dir)
    assert main(["sweep", str(path), "--output", str(tmp_path / "o"), "--lane", "2/2"]) == 2
    # a lane runs its own runs only and records the whole sweep
    fake = CountingExecute()
    summary = run_sweep(path, tmp_path / "o", execute_fn=fake, lane=(1, 2))
    assert fake.calls == [] and summary.executed == []  # one group (rte, 42): lane 0 has it
    assert len(json.loads((tmp_path / "o" / "sweep.json").read_text())["runs"]) == 3
    # only the dense baselines
    summary = run_sweep(path, tmp_path / "o", methods=["dense"])
    assert len(summary.executed) == 1 and summary.executed[0].startswith("rte-dense-s42-")
    with pytest.raises(ConfigError, match="not in the sweep"):
        run_sweep(path, tmp_path / "o", methods=["monarch"])
    # a smaller grid: tasks, ratios and seeds select runs; dense runs stay for the others
    small = select_runs(runs, tasks=["mrpc"], param_ratios=[0.5], seeds=[2])
    assert [(r.task, r.method.name, r.seed) for r in small] == [
        ("mrpc", m, 2) for m in ("dense", "low-rank", "monarch")
    ]
    assert select_runs(runs, methods=["dense"], seeds=[1]) == [runs[0], runs[6]]
    for bad, match in (
        ({"tasks": ["sst2"]}, r"--tasks \['sst2'\]: not in the sweep"),
        ({"param_ratios": [1.0]}, r"--param-ratios \[1.0\]: not in the sweep, whose .* \[0.5\]"),
        ({"seeds": [3]}, r"--seeds \[3\]"),
    ):
        with pytest.raises(ConfigError, match=match):
            select_runs(runs, **bad)
    fake = CountingExecute()
    with pytest.raises(ConfigError, match="--seeds"):
        run_sweep(path, tmp_path / "o", execute_fn=fake, seeds=[7])
    assert fake.calls == []
    assert main(["sweep", str(path), "--output", str(tmp_path / "o"), "--param-ratios", "0.9"]) == 2
    # runs go seed by seed: a sweep cut short has compared every method on the first seed
    order = []

    def record(run, progress=True, log=print):
        order.append(run.config.output.rsplit("/", 1)[-1].rsplit("-", 1)[0])
        run.lock.release()
        return {}

    two_seeds = write_sweep(tmp_path, tiny_model_dir, tiny_glue_dir, seeds=[1, 2])
    run_sweep(two_seeds, tmp_path / "order", execute_fn=record)
    assert order == [
        f"rte-{m}-s{seed}" for seed in (1, 2) for m in ("dense", "low-rank-0.5", "low-rank-0.25")
    ]


def test_bench_only_times_the_checkpoints_a_smaller_grid_left(
    tmp_path, tiny_model_dir, tiny_glue_dir
):
    bench = {"batch_sizes": [1], "seq_len": 16, "threads": 1, "runs": 3}
    path = write_sweep(tmp_path, tiny_model_dir, tiny_glue_dir, bench=bench)
    out, record = tmp_path / "out", tmp_path / "record"
    lane = run_sweep(load_sweep(path), out, record=record, param_ratios=[0.5])
    assert len(lane.executed) == 2 and lane.benched == []  # a subset leaves the bench out
    fake = CountingExecute()
    summary = run_sweep(load_sweep(path), out, execute_fn=fake, record=record, bench_only=True)
    assert fake.calls == [] and summary.executed == []  # nothing trained, not even 0.25
    assert sorted(summary.benched) == sorted(lane.executed)  # dense and low-rank 0.5
    for name in summary.benched:
        assert json.loads((record / name / "bench.json").read_text())["settings"] == bench
    again = run_sweep(load_sweep(path), out, record=record, bench_only=True)
    assert again.benched == []  # kept benchmarks are not timed again
    (tmp_path / "nb").mkdir()
    no_bench = write_sweep(tmp_path / "nb", tiny_model_dir, tiny_glue_dir)
    with pytest.raises(ConfigError, match="--bench-only needs a 'bench' section"):
        run_sweep(load_sweep(no_bench), out, bench_only=True)
    assert main(["sweep", str(no_bench), "--output", str(out), "--bench-only"]) == 2


def test_report_tables_and_plots(tmp_path, tiny_model_dir, tiny_glue_dir, capsys, monkeypatch):
    monkeypatch.delenv("GLUE_DIR", raising=False)  # failed runs are counted only with --data-dir
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
    record = tmp_path / "record"
    run_sweep(load_sweep(path), out, record=record)  # the record takes the benchmarks too
    benched = summary.benched[1]
    assert (record / benched / "bench.json").read_text() == (
        out / benched / "bench.json"
    ).read_text()
    bare = run_sweep(load_sweep(path), tmp_path / "bare", record=record)
    assert bare.executed == [] and bare.benched == []  # nothing to run or benchmark again
    assert collect_benches(record, collect_results(record))  # the report finds its latency

    assert main(["report", str(out)]) == 0
    printed = capsys.readouterr().out
    report = (out / "report" / "report.md").read_text()
    results_part = report.split("## Results")[1].split("## ")[0]
    rows = [line for line in results_part.splitlines() if line.startswith("| rte |")]
    assert len(rows) == 2
    dense_row, lr_row = rows
    assert "| dense | 1 |" in dense_row and "| 2 |" in dense_row  # 2 seeds
    assert "| low-rank | 0.5 |" in lr_row and "accuracy" in lr_row and " ± " in lr_row
    assert re.search(r"b1 \d+\.\d\d \|$", lr_row)  # latency ratio column from bench.json
    assert "## Latency against dense" in report and lr_row.split("|")[2] in printed
    for png in ("metric_rte.png", "latency.png", "reconstruction_error.png"):
        assert (out / "report" / png).read_bytes()[:8] == PNG, png
        assert f"({png})" in report
    assert "Failed runs are not counted: pass --data-dir" in report
    runs = [line for line in report.split("## Runs")[1].splitlines() if line.startswith("| rte")]
    assert len(runs) == 4 and all(re.search(r"-s[12]-[0-9a-f]{8} \| 0\.1", r) for r in runs)
    other = tmp_path / "elsewhere"
    assert main(["report", str(out), "--output", str(other), "--data-dir", str(tiny_glue_dir)]) == 0
    counted = (other / "report.md").read_text()
    assert "constant predictors: rte " in counted and "| failed |" in counted
    assert re.search(r"\| rte \| dense \| 1 \| .* \| 2 \| [012]/2 \|", counted)
    assert main(["report", str(tmp_path / "missing")]) == 2

    readme = tmp_path / "README.md"
    kept = "# Title\n\nText above.\n"
    begin, end = README_MARKERS
    readme.write_text(f"{kept}{begin}\nstale table\n{end}\nText below.\n")
    assert main(["report", str(out), "--output", str(other), "--readme", str(readme)]) == 0
    updated = readme.read_text()
    assert updated.startswith(f"{kept}{begin}\n| method | param_ratio |")
    assert "stale table" not in updated and updated.endswith(f"{end}\nText below.\n")
    assert "| low-rank | 0.5 |" in updated and f"(From `{out}`, 4 runs.)" in updated
    assert main(["report", str(out), "--output", str(other), "--readme", str(readme)]) == 0
    assert readme.read_text() == updated  # regenerating changes nothing
    unmarked = tmp_path / "unmarked.md"
    unmarked.write_text("no markers\n")
    fresh = tmp_path / "fresh"
    assert main(["report", str(out), "--output", str(fresh), "--readme", str(unmarked)]) == 2
    assert unmarked.read_text() == "no markers\n" and not fresh.exists()  # refused before work
    assert "needs '<!-- sweep-report:start -->' once" in capsys.readouterr().err


def test_report_groups_seeds_and_tells_training_variants_apart():
    def result(method, seed, lr, acc):
        training = {"learning_rate": lr, "epochs": 3, "seed": seed}
        return {
            "method": method,
            "task": "sst2",
            "param_ratio": 1.0 if method == "dense" else 0.5,
            "metrics": {"accuracy": acc},
            "main_metric": "accuracy",
            "parameters": {"targeted_after": 1, "model_after": 2, "model_before": 4},
            "timings": {"train": 10.0},
            "config": {"method_options": {}, "training": training},
        }

    table = results_table(
        [
            result("dense", 42, 1e-4, 0.86),
            result("dense", 43, 1e-4, 0.88),
            result("low-rank", 42, 1e-4, 0.80),
            result("low-rank", 42, 5e-5, 0.82),
        ]
    )
    rows = [line for line in table.splitlines() if line.startswith("| sst2 |")]
    assert len(rows) == 3, table
    assert "| dense | 1 | accuracy 87.00 ± 1.41 | 2 |" in rows[0]
    assert "| low-rank learning_rate=0.0001 | 0.5 | accuracy 80.00 | 1 |" in table
    assert "| low-rank learning_rate=5e-05 | 0.5 | accuracy 82.00 | 1 |" in table


def test_report_counts_failed_runs_and_bytes_kept():
    def result(method, seed, acc, bytes_after=None):
        parameters = {"targeted_after": 1, "model_after": 2, "model_before": 4}
        if bytes_after is not None:
            parameters |= {"targeted_bytes_before": 400, "targeted_bytes_after": bytes_after}
        return {
            "method": method,
            "task": "rte",
            "param_ratio": 1.0 if method == "dense" else 0.25,
            "seed": seed,
            "metrics": {"accuracy": acc},
            "main_metric": "accuracy",
            "parameters": parameters,
            "timings": {},
            "versions": {"factorlab": "9.9", "torch": "2.13.0", "transformers": "5.0"},
            "config": {"training": {"seed": seed}},
            "path": f"/runs/rte-{method}-s{seed}-0123abcd",
        }

    results = [
        result("dense", 1, 0.60),
        result("dense", 2, 0.535),  # above 0.52 + 0.01: not failed
        result("low-rank", 1, 0.53, bytes_after=100),  # not above 0.52 + 0.01: failed
        result("low-rank", 2, 0.47, bytes_after=100),
    ]
    baselines = {"rte": 0.52}
    assert [is_failed_run(r, baselines) for r in results] == [False, False, True, True]
    assert is_failed_run(results[0], {}) is None
    table = results_table(results, baselines=baselines)
    assert "| rte | dense | 1 | accuracy 56.75 ± 4.60 | 2 | 0/2 | 1 | 2 | 0.500 | 1.000 |" in table
    assert (
        "| rte | low-rank | 0.25 | accuracy 50.00 ± 4.24 | 2 | 2/2 | 1 | 2 | 0.500 | 0.250 |"
        in table
    )
    assert "| failed |" not in results_table(results)  # no baselines: no column
    pivot = comparison_table(results, baselines=baselines)
    assert "| 50.00 ± 4.24 (2/2 failed) |" in pivot and "| 56.75 ± 4.60 |" in pivot
    runs = runs_table(results, baselines)
    assert (
        "| rte | low-rank | 0.25 | 2 | accuracy 47.00 (failed) | rte-low-rank-s2-0123abcd |" in runs
    )
    assert runs.splitlines()[2].startswith("| rte | dense | 1 | 1 | accuracy 60.00 |")
    assert runs.endswith("| 9.9 / 2.13.0 / 5.0 |")


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
