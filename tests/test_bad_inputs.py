"""Bad inputs and faults found by trying factorlab as a new user would: each gives exit code 2
and a message naming the problem and the fix, writes nothing, loses nothing, prints no
traceback. Concurrency and kill-during-save run real processes."""

from __future__ import annotations

import json
import os
import re
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from factorlab.checkpoint import load
from factorlab.cli import main
from factorlab.errors import CheckpointError, ConfigError
from factorlab.methods import METHODS, LowRankConfig, factorize_, factorized_modules
from tests.tiny import tiny_bert

REPO = Path(__file__).resolve().parents[1]
FAST = ["--max-steps", "2", "--batch-size", "8", "--max-seq-length", "32", "--no-progress"]

pytestmark = pytest.mark.usefixtures("one_thread")


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.err + captured.out


def assert_refused(code: int, message: str, pattern: str) -> None:
    assert code == 2, message
    assert "factorlab: error: " in message and "Traceback" not in message, message
    assert re.search(pattern, " ".join(message.split())), message


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_model_dir, tiny_glue_dir) -> Path:
    """A finished factorized run on the tiny model (RTE)."""
    out = tmp_path_factory.mktemp("runs") / "run"
    argv = ["compress", "--model", str(tiny_model_dir), "--task", "rte"]
    assert main([*argv, "--data-dir", str(tiny_glue_dir), *FAST, "--output", str(out)]) == 0
    return out


def compress_argv(model, glue, out, *extra) -> list[str]:
    argv = ["compress", "--model", str(model), "--task", "rte", "--data-dir", str(glue)]
    return [*argv, *FAST, "--output", str(out), *extra]


CASES = {
    # a silently dense model must never be reported as compressed
    "nblocks above the smaller side": (
        ["--method", "monarch", "--nblocks", "33"],
        r"nblocks 33 exceeds the smaller side.*nblocks <= 32",
    ),
    "sequence longer than the positions": (
        ["--max-seq-length", "100000"],
        r"--max-seq-length 100000 is longer than the model takes \(128 tokens",
    ),
    "negative seed": (["--seed", "-1"], r"seed must be an integer in \[0, 2\*\*32\)"),
    "batch not divisible by accumulation": (
        ["--gradient-accumulation-steps", "3"],
        r"batch_size 8 .* not divisible by 1 process\(es\) x 3 accumulation",
    ),
}


@pytest.mark.parametrize("case", CASES)
def test_bad_compress_options(case, tmp_path, tiny_model_dir, tiny_glue_dir, capsys):
    extra, pattern = CASES[case]
    code, message = run_cli(
        compress_argv(tiny_model_dir, tiny_glue_dir, tmp_path / "out", *extra), capsys
    )
    assert_refused(code, message, pattern)
    assert not any(tmp_path.iterdir()), list(tmp_path.iterdir())


def test_a_plan_that_factorizes_nothing_is_an_error(monkeypatch):
    method = METHODS["low-rank"]
    import dataclasses

    monkeypatch.setitem(
        METHODS, "low-rank", dataclasses.replace(method, plan=lambda m, n, b, c: None)
    )
    model = tiny_bert()
    with pytest.raises(ConfigError, match="would factorize none of the 12"):
        factorize_(model, LowRankConfig(param_ratio=0.5))
    assert not factorized_modules(model)


def test_a_failing_last_projection_leaves_the_model_untouched(monkeypatch):
    method = METHODS["low-rank"]
    import dataclasses

    calls = []

    def build(weight, bias, rank, config, stats):
        calls.append(rank)
        if len(calls) == 12:
            raise RuntimeError("projection failed")
        return method.build(weight, bias, rank, config, stats)

    monkeypatch.setitem(METHODS, "low-rank", dataclasses.replace(method, build=build))
    model = tiny_bert()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RuntimeError, match="projection failed"):
        factorize_(model, LowRankConfig(param_ratio=0.5))
    assert len(calls) == 12 and not factorized_modules(model)
    after = model.state_dict()
    assert before.keys() == after.keys()
    for key in before:
        torch.testing.assert_close(after[key], before[key], rtol=0, atol=0)


def test_output_locations_that_cannot_be_written(
    tmp_path, tiny_model_dir, tiny_glue_dir, monkeypatch, capsys
):
    (tmp_path / "a-file").write_text("mine")
    cases = [
        (tmp_path / "a-file" / "run", [], r"a-file is a file, not a folder"),
        (Path("/proc/factorlab-run"), [], r"(cannot write|Choose another place)"),
    ]
    for out, extra, pattern in cases:
        code, message = run_cli(compress_argv(tiny_model_dir, tiny_glue_dir, out, *extra), capsys)
        assert_refused(code, message, pattern)
    assert (tmp_path / "a-file").read_text() == "mine"
    monkeypatch.chdir(tmp_path)
    code, message = run_cli(
        compress_argv(tiny_model_dir, tiny_glue_dir, ".", "--overwrite"), capsys
    )
    assert_refused(code, message, r"is the current folder or contains it")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]


def test_overwrite_replaces_only_factorlab_runs(
    tmp_path, tiny_model_dir, tiny_glue_dir, run_dir, capsys
):
    plain = tmp_path / "notes.txt"
    plain.write_text("mine")
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "keep.csv").write_text("1,2")
    for out in (plain, folder):
        code, message = run_cli(
            compress_argv(tiny_model_dir, tiny_glue_dir, out, "--overwrite"), capsys
        )
        assert_refused(code, message, r"factorlab replaces only its own run folders")
    assert plain.read_text() == "mine" and (folder / "keep.csv").read_text() == "1,2"


def test_weights_keep_the_mode_of_the_rest_of_the_run(run_dir):
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in run_dir.iterdir() if p.is_file()}
    assert modes["factorized.safetensors"] == modes["results.json"] == modes["config.json"]


def test_truncated_weights_give_a_clear_error(tmp_path, run_dir, tiny_glue_dir, capsys):
    import shutil

    damaged = tmp_path / "damaged"
    shutil.copytree(run_dir, damaged)
    weights = damaged / "factorized.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    for argv in (
        ["info", str(damaged)],
        ["evaluate", str(damaged), "--task", "rte", "--data-dir", str(tiny_glue_dir)],
    ):
        code, message = run_cli(argv, capsys)
        assert_refused(code, message, r"not a readable safetensors file.*cut short")
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        load(damaged)


SPEC_FIELDS = ["schema_version", "factorlab_version", "architecture", "modules", "method"]
WRONG_VALUES = [12345, "text", [], None, {"kind": "low_rank"}]


def test_every_damaged_spec_field_is_refused(tmp_path, run_dir, capsys):
    """Fuzz factorlab.json: every field removed or given a wrong type, plus unknown names."""
    import shutil

    spec = json.loads((run_dir / "factorlab.json").read_text())
    layer_name = next(iter(spec["modules"]))
    variants: list[tuple[str, dict]] = []
    for key in SPEC_FIELDS:
        if key != "method":
            variants.append((f"no {key}", {k: v for k, v in spec.items() if k != key}))
        for value in WRONG_VALUES:
            if (key, value) in (("method", None), ("factorlab_version", "text")):
                continue  # valid: a dense checkpoint's method; any version string
            variants.append((f"{key}={value!r}", {**spec, key: value}))
    variants.append(("unknown method", {**spec, "method": {"method": "super-svd"}}))
    variants.append(("unknown architecture", {**spec, "architecture": "NotAModel"}))
    variants.append(("list architecture", {**spec, "architecture": ["BertModel"]}))
    for key in ("kind", "in_features", "out_features", "bias", "rank"):
        for value in (None, "x", -3):
            layer = {**spec["modules"][layer_name], key: value}
            variants.append(
                (
                    f"layer {key}={value!r}",
                    {**spec, "modules": {**spec["modules"], layer_name: layer}},
                )
            )
    variants.append(("spec is a list", [spec]))
    for label, variant in variants:
        damaged = tmp_path / "damaged"
        shutil.rmtree(damaged, ignore_errors=True)
        shutil.copytree(run_dir, damaged)
        (damaged / "factorlab.json").write_text(json.dumps(variant))
        with pytest.raises(CheckpointError):
            load(damaged)
        code, message = run_cli(["info", str(damaged)], capsys)
        assert code == 2 and "Traceback" not in message, (label, message)
        assert message.startswith("factorlab: error: "), (label, message)


def test_model_folder_without_weights(tmp_path, tiny_model_dir, capsys):
    folder = tmp_path / "no-weights"
    folder.mkdir()
    (folder / "config.json").write_text((tiny_model_dir / "config.json").read_text())
    code, message = run_cli(
        ["compress", "--model", str(folder), "--output", str(tmp_path / "o")], capsys
    )
    assert_refused(code, message, r"has config.json but no weights: expected one of model.safe")
    assert "neither a local folder nor a Hub id" not in message


def test_bench_sequence_lengths(tmp_path, run_dir, capsys):
    for seq_len in ("0", "1000"):
        code, message = run_cli(["bench", str(run_dir), "--seq-len", seq_len], capsys)
        assert_refused(
            code, message, rf"--seq-len must be between 1 and the model's 128.*{seq_len}"
        )


def test_evaluate_a_model_without_a_task_head(tiny_model_dir, tiny_glue_dir, capsys):
    argv = ["evaluate", str(tiny_model_dir), "--task", "rte", "--data-dir", str(tiny_glue_dir)]
    code, message = run_cli(argv, capsys)
    assert_refused(code, message, r"no task head to evaluate\. Fine-tune it first: factorlab")
    assert "--model" not in message.split("finetune")[0]


def test_help_describes_every_argument(capsys):
    for command in ("evaluate", "info", "compress"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert "checkpoint" in text or command == "compress"
        if command == "evaluate":
            assert "GLUE task" in text and "examples per batch, default 128" in text
        if command == "compress":
            assert "in (0, 1], default 0.5" in text and "default 4" in text
            assert "AdamW weight decay" in text and "examples per evaluation batch" in text


def test_summary_names_the_next_commands(tmp_path, tiny_model_dir, tiny_glue_dir, capsys):
    out = tmp_path / "run"
    code, message = run_cli(compress_argv(tiny_model_dir, tiny_glue_dir, out), capsys)
    assert code == 0
    assert f"factorlab evaluate {out} --task rte" in message
    assert f"factorlab bench {out}" in message and f"factorlab info {out}" in message


def _compress_process(model, glue, out, steps: int, code=None, extra=()):
    command = [sys.executable, "-m", "factorlab"] if code is None else [sys.executable, "-c", code]
    argv = ["compress", "--model", str(model), "--task", "rte", "--data-dir", str(glue)]
    argv += ["--max-steps", str(steps), "--batch-size", "8", "--max-seq-length", "32"]
    argv += ["--no-progress", "--output", str(out), *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [*command, *argv],
        env=env,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for(condition, process, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, process.communicate()[1][-2000:]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def test_two_runs_to_one_output_at_once(tmp_path, tiny_model_dir, tiny_glue_dir, capsys):
    """The second run is refused while the first holds the output's lock; the first finishes.

    The first run (a real process) pauses after writing its weights, still holding the lock and
    its folder still partial, until the test releases it, so the overlap does not depend on how
    fast the machine trains. The second run is this process."""
    out = tmp_path / "run"
    release = tmp_path / "release"
    first = _compress_process(
        tiny_model_dir, tiny_glue_dir, out, steps=2, code=PAUSED_SAVE % str(release)
    )
    partials = lambda: [p for p in tmp_path.iterdir() if p.name.startswith(".run.partial-")]  # noqa: E731
    _wait_for(lambda: any((p / "factorized.safetensors").exists() for p in partials()), first)
    code, message = run_cli(compress_argv(tiny_model_dir, tiny_glue_dir, out), capsys)
    assert_refused(code, message, "another factorlab run is writing")
    assert first.poll() is None, "the first run should still hold the lock"
    release.touch()
    stdout, err = first.communicate(timeout=300)
    assert first.returncode == 0, err[-2000:]
    assert "saved to" in stdout and json.loads((out / "results.json").read_text())["train"]


PAUSED_SAVE = """
import os, sys, time
import factorlab.checkpoint as checkpoint
original = checkpoint.fix_mode
def paused(path):
    original(path)
    print("WRITTEN", flush=True)
    deadline = time.monotonic() + 600
    while not os.path.exists(%r) and time.monotonic() < deadline:
        time.sleep(0.05)
checkpoint.fix_mode = paused
from factorlab.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_run_killed_during_save_loses_nothing(tmp_path, tiny_model_dir, tiny_glue_dir, capsys):
    """SIGKILL after the weights are written but before the rename: the previous run at the
    output is intact, and the next run clears the leftover partial folder. The killed run is a
    real process, paused until it is killed; the runs before and after it are this process."""
    out = tmp_path / "run"
    assert run_cli(compress_argv(tiny_model_dir, tiny_glue_dir, out), capsys)[0] == 0
    previous = (out / "results.json").read_text()
    never = tmp_path / "never-released"
    killed = _compress_process(
        tiny_model_dir, tiny_glue_dir, out, steps=3, code=PAUSED_SAVE % str(never),
        extra=["--overwrite"],
    )  # fmt: skip
    partials = lambda: [p for p in tmp_path.iterdir() if p.name.startswith(".run.partial-")]  # noqa: E731
    _wait_for(lambda: any((p / "factorized.safetensors").exists() for p in partials()), killed)
    killed.send_signal(signal.SIGKILL)
    killed.wait(timeout=60)
    assert partials(), "the killed run should have left its partial folder"
    assert (out / "results.json").read_text() == previous  # the old run is untouched
    assert load(out) is not None
    again = compress_argv(tiny_model_dir, tiny_glue_dir, out, "--max-steps", "3", "--overwrite")
    code, message = run_cli(again, capsys)
    assert code == 0, message
    assert not partials(), "stale partial folders are removed under the lock"
    assert json.loads((out / "results.json").read_text())["train"]["steps"] == 3
