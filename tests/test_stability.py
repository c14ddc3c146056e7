"""The stability study (METHODS.md §4): failed-run detector, summaries, cached and resumable runs,
stability.json and the PNG plot."""

import json
import math
from pathlib import Path

import pytest

import factorlab.stability as stability
from factorlab.cli import main
from factorlab.errors import ConfigError
from factorlab.stability import StabilityStudy, constant_baselines, is_failed, summarize
from factorlab.training import TrainingConfig

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
pytestmark = pytest.mark.usefixtures("one_thread")


def test_is_failed_with_hand_made_metrics():
    rte_majority = 146 / 277  # 0.5271: always "entailment" on the RTE dev set
    assert is_failed(rte_majority, rte_majority)  # a collapsed run
    assert is_failed(0.5300, rte_majority)  # better, but by less than one point
    assert is_failed(rte_majority + 0.01, rte_majority)  # exactly one point: "no better than"
    assert not is_failed(rte_majority + 0.0101, rte_majority)
    assert not is_failed(0.62, rte_majority)
    assert is_failed(0.40, rte_majority)  # worse than constant
    assert is_failed(math.nan, rte_majority)  # diverged
    assert not is_failed(0.80, 0.684) and is_failed(0.69, 0.684)  # MRPC majority 68.4%
    assert is_failed(0.55, 0.50, margin=0.05) and not is_failed(0.56, 0.50, margin=0.05)


def test_summarize_excludes_failed_runs():
    runs = [
        {"metric": 0.60, "failed": False},
        {"metric": 0.52, "failed": True},
        {"metric": 0.64, "failed": False},
        {"metric": 0.62, "failed": False},
    ]
    s = summarize(runs)
    assert (s["num_runs"], s["num_failed"], s["failed_fraction"]) == (4, 1, 0.25)
    assert s["mean"] == pytest.approx(0.62) and s["std"] == pytest.approx(0.02)  # sample std
    one = summarize([{"metric": 0.7, "failed": False}, {"metric": 0.5, "failed": True}])
    assert one["mean"] == 0.7 and one["std"] == 0.0
    none = summarize([{"metric": 0.5, "failed": True}])
    assert none["failed_fraction"] == 1.0 and none["mean"] is None and none["std"] is None


def test_constant_baselines_use_the_runs_training_examples(tiny_glue_dir):
    full = constant_baselines("rte", str(tiny_glue_dir), TrainingConfig())
    assert full["baseline"] == max(full["train_majority"], full["dev_majority"])
    assert full["dev_majority"] >= 0.5  # the best constant predictor on dev
    tiny = constant_baselines("rte", str(tiny_glue_dir), TrainingConfig(train_samples=1, seed=0))
    assert tiny["train_majority"] in (full["dev_majority"], 1 - full["dev_majority"])


def test_study_settings_are_checked(tmp_path):
    with pytest.raises(ConfigError, match="seeds"):
        StabilityStudy(output=str(tmp_path), task="rte", seeds=[1, 1])
    with pytest.raises(ConfigError, match="train_fraction"):
        TrainingConfig(train_fraction=1.5)
    with pytest.raises(ConfigError, match="exclude each other"):
        TrainingConfig(train_fraction=0.5, train_samples=10)
    study = StabilityStudy(output=str(tmp_path), task="rte", seeds=[0, 1])
    runs = study.run_configs()
    assert [(s, seed) for s, seed, _ in runs] == [
        ("simultaneous", 0),
        ("simultaneous", 1),
        ("staged", 0),
        ("staged", 1),
    ]
    assert len({c.output for _, _, c in runs}) == 4
    assert runs[2][2].staged is not None and runs[0][2].staged is None


def test_interrupted_study_resumes_without_redoing_runs(
    tmp_path, tiny_model_dir, tiny_glue_dir, monkeypatch, capsys
):
    out = tmp_path / "study"
    argv = [
        "stability",
        "--model",
        str(tiny_model_dir),
        "--task",
        "rte",
        "--data-dir",
        str(tiny_glue_dir),
        "--param-ratio",
        "0.25",
        "--seeds",
        "2",
        "--train-fraction",
        "0.75",  # 24 of 32 examples, batch 8: 3 steps = 2 stages + final, 1 step each
        "--epochs",
        "1",
        "--batch-size",
        "8",
        "--max-seq-length",
        "32",
        "--no-progress",
        "--output",
        str(out),
    ]
    calls = []
    real_execute = stability.execute

    def interrupted(run, **kwargs):
        calls.append(run.config.output)
        if len(calls) == 3:
            raise KeyboardInterrupt("interrupted at the 3rd run")
        return real_execute(run, **kwargs)

    monkeypatch.setattr(stability, "execute", interrupted)
    with pytest.raises(KeyboardInterrupt):
        main(argv)
    finished = calls[:2]
    assert all((Path(p) / "results.json").is_file() for p in finished)
    assert not (Path(calls[2]) / "results.json").exists()
    assert not (out / "stability.json").exists()
    killed = Path(calls[2]).parent / f".{Path(calls[2]).name}.partial-x1"  # as a kill -9 leaves
    killed.mkdir()

    calls.clear()
    monkeypatch.setattr(
        stability, "execute", lambda run, **kw: calls.append(run) or real_execute(run, **kw)
    )
    assert main(argv) == 0
    assert len(calls) == 2  # only the two runs that had not finished
    assert not {c.config.output for c in calls} & set(finished)
    assert not killed.exists()
    printed = capsys.readouterr().out
    assert "simultaneous" in printed and "staged" in printed and "stability.png" in printed

    summary = json.loads((out / "stability.json").read_text())
    assert summary["executed"] == 2 and summary["seeds"] == [0, 1]
    assert summary["training"]["train_fraction"] == 0.75
    assert summary["method_options"] == {"param_ratio": 0.25}
    for name in ("simultaneous", "staged"):
        s = summary["schedules"][name]
        assert s["num_runs"] == 2 and [r["seed"] for r in s["runs"]] == [0, 1]
        for r in s["runs"]:
            assert r["failed"] == is_failed(r["metric"], r["baseline"])
            assert r["train_examples"] == 24 and r["steps"] == 3
            results = json.loads((Path(r["path"]) / "results.json").read_text())
            assert results["schedule"] == name and results["seed"] == r["seed"]
            assert results["metrics"][results["main_metric"]] == r["metric"]
        assert s["num_failed"] == sum(r["failed"] for r in s["runs"])
    png = (out / "stability.png").read_bytes()
    assert png.startswith(PNG_SIGNATURE) and len(png) > 5000

    calls.clear()
    assert main(argv) == 0 and calls == []  # all cached now
    assert json.loads((out / "stability.json").read_text())["executed"] == 0
