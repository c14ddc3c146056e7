"""Every command of the README's "Using it" block runs as written (on the real MiniLM and GLUE
data), with only a training budget appended, from a folder laid out like the repository's."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from factorlab.bench.report import (
    README_MARKERS,
    collect_benches,
    collect_results,
    comparison_section,
    readme_section,
    task_baselines,
)
from factorlab.cli import main
from factorlab.io import marked_block

REPO = Path(__file__).resolve().parents[1]
BUDGET = {  # appended to the commands that train or time, so the test takes seconds
    "compress": ["--max-steps", "2", "--train-samples", "32", "--no-progress"],
    "finetune": ["--max-steps", "2", "--train-samples", "32", "--no-progress"],
    "bench": ["--runs", "2", "--warmup", "1", "--no-memory"],
}

pytestmark = pytest.mark.slow


def readme_commands() -> list[str]:
    text = (REPO / "README.md").read_text()
    section = text[text.index("## Using it") :]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [line.split("  #")[0].strip() for line in block.splitlines() if line.strip()]


def test_the_using_it_block_is_what_this_test_runs():
    commands = readme_commands()
    assert len(commands) >= 8 and all(c.startswith("factorlab ") for c in commands)
    assert not any("$" in c or "..." in c for c in commands), "commands must run as written"


def test_every_readme_command_runs_as_written(tmp_path, glue_dir, monkeypatch, capsys):
    work = tmp_path / "repo"
    work.mkdir()
    (tmp_path / "shared" / "data").mkdir(parents=True)
    (tmp_path / "shared" / "data" / "glue").symlink_to(glue_dir)
    (work / "benchmarks").symlink_to(REPO / "benchmarks")
    monkeypatch.chdir(work)
    for command in readme_commands():
        argv = shlex.split(command)[1:]
        trains = argv[0] in ("compress", "finetune") and "--task" in argv
        extra = BUDGET.get(argv[0], []) if trains or argv[0] == "bench" else []
        assert main([*argv, *extra]) == 0, command
        capsys.readouterr()
    assert (work / "runs" / "mrpc-lr-kd" / "results.json").is_file()
    assert (work / "runs" / "sweep" / "report" / "report.md").is_file()


def test_the_sweep_table_is_the_report_of_the_committed_records(glue_dir):
    """The README's generated block is what `factorlab report benchmarks/records/glue --data-dir
    ../shared/data/glue --readme README.md` writes from the committed records: no stale or
    hand-edited number."""
    root = "benchmarks/records/glue"
    results = collect_results(REPO / root)
    section = comparison_section(
        results, collect_benches(REPO / root, results), task_baselines(results, glue_dir)
    )
    start, end = marked_block((REPO / "README.md").read_text(), README_MARKERS, "README.md")
    text = (REPO / "README.md").read_text()[start:end]
    assert text == f"\n{readme_section(root, section, len(results))}\n"
