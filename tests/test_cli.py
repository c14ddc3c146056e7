import json

import pytest
import torch
from torch.testing import assert_close

from factorlab.checkpoint import load
from factorlab.cli import main

FAST = ["--epochs", "1", "--batch-size", "8", "--max-seq-length", "32", "--no-progress"]


def compress(tmp_path, model, glue, out="run", *extra):
    argv = ["compress", "--model", str(model), "--task", "rte", "--data-dir", str(glue)]
    return main([*argv, *FAST, "--output", str(tmp_path / out), *extra])


def test_compress_finetune_evaluate_info(tmp_path, tiny_model_dir, tiny_glue_dir, capsys):
    assert compress(tmp_path, tiny_model_dir, tiny_glue_dir, "run", "--param-ratio", "0.25") == 0
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert (
        results["method"] == "low-rank"
        and results["param_ratio"] == 0.25
        and results["task"] == "rte"
    )
    p = results["parameters"]
    assert p["targeted_after"] < 0.3 * p["targeted_before"]
    assert p["model_before"] - p["model_after"] == p["targeted_before"] - p["targeted_after"]
    assert set(results["metrics"]) == {"accuracy"} and 0 <= results["metrics"]["accuracy"] <= 1
    assert {"load", "factorize", "train", "evaluate"} <= set(results["timings"])
    assert {"factorlab", "torch", "transformers"} <= set(results["versions"])
    assert results["config"]["training"]["seed"] == 42 and results["train"]["steps"] == 4
    capsys.readouterr()

    assert (
        main(["evaluate", str(tmp_path / "run"), "--task", "rte", "--data-dir", str(tiny_glue_dir)])
        == 0
    )
    evaluated = json.loads(capsys.readouterr().out)
    assert evaluated["metrics"] == pytest.approx(results["metrics"])

    assert main(["info", str(tmp_path / "run")]) == 0
    info = capsys.readouterr().out
    assert "low_rank" in info and "bert.encoder.layer.1.output.dense" in info
    assert f"{p['targeted_after']:,}" in info


def test_runs_are_deterministic_for_a_seed(tmp_path, tiny_model_dir, tiny_glue_dir):
    for out in ("a", "b"):
        assert (
            main(
                [
                    "finetune",
                    "--model",
                    str(tiny_model_dir),
                    "--task",
                    "sst2",
                    "--data-dir",
                    str(tiny_glue_dir),
                    *FAST,
                    "--output",
                    str(tmp_path / out),
                ]
            )
            == 0
        )
    a, b = load(tmp_path / "a"), load(tmp_path / "b")
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert_close(x, y, rtol=0, atol=0, msg=name)
    ra, rb = (json.loads((tmp_path / o / "results.json").read_text()) for o in ("a", "b"))
    assert ra["metrics"] == rb["metrics"] and ra["train"]["losses"] == rb["train"]["losses"]
    assert (
        ra["method"] == "dense"
        and ra["parameters"]["targeted_before"] == ra["parameters"]["targeted_after"]
    )


def test_compress_without_task_saves_a_base_model(tmp_path, tiny_model_dir):
    assert (
        main(["compress", "--model", str(tiny_model_dir), "--output", str(tmp_path / "base")]) == 0
    )
    model = load(tmp_path / "base")
    assert type(model).__name__ == "BertModel"
    out = model(input_ids=torch.tensor([[101, 2000, 102]])).last_hidden_state
    assert out.shape == (1, 3, 32) and torch.isfinite(out).all()


def test_output_dir_rules(tmp_path, tiny_model_dir, tiny_glue_dir, capsys):
    assert compress(tmp_path, tiny_model_dir, tiny_glue_dir) == 0
    first = (tmp_path / "run" / "results.json").read_text()
    # the same run may be redone in place; a different one is refused and nothing changes
    assert compress(tmp_path, tiny_model_dir, tiny_glue_dir) == 0
    capsys.readouterr()
    assert compress(tmp_path, tiny_model_dir, tiny_glue_dir, "run", "--param-ratio", "0.3") == 2
    assert "already holds a different run" in capsys.readouterr().err
    assert json.loads((tmp_path / "run" / "results.json").read_text())["param_ratio"] == 0.5
    assert (
        compress(
            tmp_path, tiny_model_dir, tiny_glue_dir, "run", "--param-ratio", "0.3", "--overwrite"
        )
        == 0
    )
    assert json.loads((tmp_path / "run" / "results.json").read_text())["param_ratio"] == 0.3
    assert first != (tmp_path / "run" / "results.json").read_text()
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    assert compress(tmp_path, tiny_model_dir, tiny_glue_dir, "other") == 2
    assert "not a factorlab run" in capsys.readouterr().err
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"


BAD_INPUTS = {
    "ratio zero": (["--param-ratio", "0"], r"param_ratio must be in \(0, 1\]"),
    "ratio above one": (["--param-ratio", "1.5"], r"param_ratio must be in \(0, 1\]"),
    "unknown method": (["--method", "magic"], "unknown method 'magic'"),
    "unknown task": (["--task", "squad"], "unknown GLUE task"),
    "missing model": (["--model", "./no/such/model"], "does not exist"),
    "option of another method": (["--nblocks", "4"], "does not take option"),
    "bad training value": (["--epochs", "0"], "epochs must be > 0"),
    "option without a value": (["--option", "epochs"], "--option takes KEY=VALUE"),
    "option set twice": (["--option", "param_ratio=0.3"], "param_ratio is already set"),
    "option the method lacks": (["--option", "eps=0.1"], r"does not take option\(s\) \['eps'\]"),
    "option of a bad value": (
        ["--method", "autoencoder", "--option", "epochs=0"],
        "epochs must be an int >= 1, got 0",
    ),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_exits_2_before_writing(case, tmp_path, tiny_model_dir, tiny_glue_dir, capsys):
    extra, message = BAD_INPUTS[case]
    argv = [
        "compress",
        "--model",
        str(tiny_model_dir),
        "--task",
        "rte",
        "--data-dir",
        str(tiny_glue_dir),
        *FAST,
        "--output",
        str(tmp_path / "out"),
        *extra,
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("factorlab: error: ") and "Traceback" not in err
    assert __import__("re").search(message, err), err
    assert not (tmp_path / "out").exists()


def test_model_folder_that_is_not_a_model(tmp_path, tiny_glue_dir, capsys):
    (tmp_path / "empty").mkdir()
    assert (
        main(["compress", "--model", str(tmp_path / "empty"), "--output", str(tmp_path / "o")]) == 2
    )
    assert "is not a model" in capsys.readouterr().err and not (tmp_path / "o").exists()


def test_data_dir_without_the_task(tmp_path, tiny_model_dir, tiny_glue_dir, capsys):
    argv = [
        "compress",
        "--model",
        str(tiny_model_dir),
        "--task",
        "mrpc",
        "--data-dir",
        str(tiny_glue_dir),
        "--output",
        str(tmp_path / "o"),
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "MRPC" in err and "RTE" in err and not (tmp_path / "o").exists()


def test_evaluate_rejects_a_damaged_checkpoint(tmp_path, tiny_model_dir, tiny_glue_dir, capsys):
    assert compress(tmp_path, tiny_model_dir, tiny_glue_dir) == 0
    spec_path = tmp_path / "run" / "factorlab.json"
    spec = json.loads(spec_path.read_text())
    next(iter(spec["modules"].values()))["rank"] += 1
    spec_path.write_text(json.dumps(spec))
    capsys.readouterr()
    assert (
        main(["evaluate", str(tmp_path / "run"), "--task", "rte", "--data-dir", str(tiny_glue_dir)])
        == 2
    )
    assert "does not match its spec" in capsys.readouterr().err
    assert main(["info", str(tmp_path / "nothing")]) == 2
    assert "not a factorlab checkpoint" in capsys.readouterr().err


def test_python_dash_m_entry_point():
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-m", "factorlab", "--help"], capture_output=True, text=True
    )
    assert done.returncode == 0 and "compress" in done.stdout


def test_option_reaches_the_method_config(tmp_path, tiny_model_dir):
    argv = ["compress", "--model", str(tiny_model_dir), "--method", "autoencoder"]
    argv += ["--option", "epochs=2", "--option", "sharing=per-matrix", "--option", "linear=true"]
    assert main([*argv, "--no-progress", "--output", str(tmp_path / "ae")]) == 0
    options = json.loads((tmp_path / "ae" / "results.json").read_text())["config"]
    assert options["method_options"] == {
        "param_ratio": 0.5,
        "epochs": 2,
        "sharing": "per-matrix",
        "linear": True,
    }


def test_the_cli_starts_without_torch():
    """`factorlab --help` and argument errors must answer at once: parsing imports neither
    torch nor transformers (they load in the command that runs)."""
    import subprocess
    import sys

    code = (
        "import sys; from factorlab.cli import build_parser; build_parser(); "
        "heavy = sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'transformers', "
        "'accelerate', 'numpy'}); print(heavy); sys.exit(1 if heavy else 0)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_method_names_match_the_registry():
    from factorlab.methods import METHOD_NAMES, METHODS

    assert sorted(METHOD_NAMES) == sorted(METHODS)
