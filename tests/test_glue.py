"""Tests of factorlab.tasks: GLUE task specs, TSV reading, metrics (METHODS.md section 9)."""

from __future__ import annotations

import math
import sys
import types
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from factorlab.errors import ConfigError, DataError, FactorlabError
from factorlab.tasks import (
    GLUE_TASKS,
    GlueFormatError,
    GlueSplit,
    baseline_score,
    check_task_available,
    compute_metrics,
    get_task,
    load_split,
    resolve_data_dir,
)

# --------------------------------------------------------------------------------------------
# Tiny files in the exact format of the standard GLUE release, one per task and labelled split.
# Each entry: (file text, expected texts, expected labels). Sentences carry `"` and `'` (also a
# leading, unbalanced `"` as in real MRPC/SST-2 rows), which must come through unchanged.
# --------------------------------------------------------------------------------------------

Q1 = 'He said " the witness " , it \'s over .'
Q2 = "\" The foodservice pie business doesn 't fit ."
Q3 = "it 's a charming journey . "  # trailing space kept, as in real SST-2

MNLI_TRAIN_HEADER = (
    "index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse\t"
    "sentence1_parse\tsentence2_parse\tsentence1\tsentence2\tlabel1\tgold_label\n"
)
MNLI_DEV_HEADER = (
    "index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse\t"
    "sentence1_parse\tsentence2_parse\tsentence1\tsentence2\tlabel1\tlabel2\tlabel3\tlabel4\t"
    "label5\tgold_label\n"
)


def _mnli_row(i: int, s1: str, s2: str, gold: str, n_annot: int) -> str:
    parse = "( ( x ) )"
    labels = "\t".join([gold] * n_annot)
    fields = [str(i), f"{i}1", f"{i}1e", "fiction", parse, parse, "(ROOT x)", "(ROOT y)", s1, s2]
    return "\t".join(fields) + f"\t{labels}\t{gold}\n"


FIXTURES: dict[str, dict[str, tuple[str, list[tuple[str, ...]], list]]] = {
    "cola": {
        "train": (
            "gj04\t1\t\tOur friends won't buy this analysis.\n"
            'gj04\t0\t*\tThe "more we study verbs .\n'
            "r-67\t1\t\tShe's it 's fine.\n",
            [
                ("Our friends won't buy this analysis.",),
                ('The "more we study verbs .',),
                ("She's it 's fine.",),
            ],
            [1, 0, 1],
        ),
        "dev": (
            "gj04\t0\t*\tThey drank the pub .\ngj04\t1\t\tThe sailors rode the breeze.\n",
            [("They drank the pub .",), ("The sailors rode the breeze.",)],
            [0, 1],
        ),
    },
    "sst2": {
        "train": (
            f"sentence\tlabel\n{Q3}\t1\n{Q2}\t0\n",
            [(Q3,), (Q2,)],
            [1, 0],
        ),
        "dev": (f"sentence\tlabel\n{Q1}\t0\n", [(Q1,)], [0]),
    },
    "mrpc": {
        "train": (
            "\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String\n"
            f"1\t702876\t702977\t{Q1}\t{Q2}\n"
            "0\t2108705\t2108831\tYucaipa owned Dominick 's .\tYucaipa bought Dominick 's .\n",
            [(Q1, Q2), ("Yucaipa owned Dominick 's .", "Yucaipa bought Dominick 's .")],
            [1, 0],
        ),
        "dev": (
            f"\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String\n0\t1\t2\t{Q2}\t{Q1}\n",
            [(Q2, Q1)],
            [0],
        ),
    },
    "stsb": {
        "train": (
            "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
            "0\tmain-captions\tMSRvid\t2012test\t0001\tnone\tnone\tA plane is taking off.\t"
            f"{Q1}\t5.000\n"
            f"1\tmain-news\theadlines\t2013\t0004\tnone\tnone\t{Q2}\tA man's flute.\t0.250\n",
            [("A plane is taking off.", Q1), (Q2, "A man's flute.")],
            [5.0, 0.25],
        ),
        "dev": (
            "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
            "0\tmain-captions\tMSRvid\t2012test\t0000\tnone\tnone\tA man.\tA man wearing.\t3.800\n",
            [("A man.", "A man wearing.")],
            [3.8],
        ),
    },
    "qqp": {
        "train": (
            "id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate\n"
            f'0\t1\t2\tWhat\'s the "best" way?\t{Q1}\t0\n'
            "1\t3\t4\tHow do I learn?\tHow can I learn?\t1\n",
            [('What\'s the "best" way?', Q1), ("How do I learn?", "How can I learn?")],
            [0, 1],
        ),
        "dev": (
            "id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate\n5\t9\t10\tWhy?\tWhy not?\t1\n",
            [("Why?", "Why not?")],
            [1],
        ),
    },
    "mnli": {
        "train": (
            MNLI_TRAIN_HEADER
            + _mnli_row(0, Q1, "He said nothing.", "contradiction", 1)
            + _mnli_row(1, "Product and geography.", Q2, "neutral", 1)
            + _mnli_row(2, "A cat sat.", "An animal sat.", "entailment", 1),
            [
                (Q1, "He said nothing."),
                ("Product and geography.", Q2),
                ("A cat sat.", "An animal sat."),
            ],
            [2, 1, 0],
        ),
        "dev_matched": (
            MNLI_DEV_HEADER + _mnli_row(0, "It 's sunny.", "It rains.", "contradiction", 5),
            [("It 's sunny.", "It rains.")],
            [2],
        ),
        "dev_mismatched": (
            MNLI_DEV_HEADER
            + _mnli_row(0, "Letters came.", Q1, "entailment", 5)
            + _mnli_row(1, "A b.", "C d.", "neutral", 5),
            [("Letters came.", Q1), ("A b.", "C d.")],
            [0, 1],
        ),
    },
    "qnli": {
        "train": (
            "index\tquestion\tsentence\tlabel\n"
            f"0\tWhat came into force?\t{Q1}\tentailment\n"
            f"1\tWho's there?\t{Q2}\tnot_entailment\n",
            [("What came into force?", Q1), ("Who's there?", Q2)],
            [0, 1],
        ),
        "dev": (
            'index\tquestion\tsentence\tlabel\n0\tWhen?\tAt "noon".\tnot_entailment\n',
            [("When?", 'At "noon".')],
            [1],
        ),
    },
    "rte": {
        "train": (
            "index\tsentence1\tsentence2\tlabel\n"
            f"0\tNo Weapons Found in Iraq Yet.\t{Q2}\tnot_entailment\n"
            f"1\t{Q1}\tThe witness spoke.\tentailment\n",
            [("No Weapons Found in Iraq Yet.", Q2), (Q1, "The witness spoke.")],
            [1, 0],
        ),
        "dev": (
            "index\tsentence1\tsentence2\tlabel\n0\tDana Reeve's widow.\tReeve had an accident.\t"
            "not_entailment\n1\tA.\tB.\tentailment\n",
            [("Dana Reeve's widow.", "Reeve had an accident."), ("A.", "B.")],
            [1, 0],
        ),
    },
    "wnli": {
        "train": (
            "index\tsentence1\tsentence2\tlabel\n"
            f"0\tI stuck a pin through a carrot.\t{Q1}\t1\n"
            "1\tJohn couldn't see the stage.\tJohn is short.\t0\n",
            [
                ("I stuck a pin through a carrot.", Q1),
                ("John couldn't see the stage.", "John is short."),
            ],
            [1, 0],
        ),
        "dev": (
            'index\tsentence1\tsentence2\tlabel\n0\tThe drain is "clogged".\tThe hair.\t0\n',
            [('The drain is "clogged".', "The hair.")],
            [0],
        ),
    },
}


def write_split(root: Path, task: str, split: str, text: str | None = None) -> Path:
    """Write one fixture file (or ``text``) to ``root/<folder>/<split>.tsv``; return its path."""
    spec = get_task(task)
    folder = root / spec.folder
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{split}.tsv"
    content = FIXTURES[task][split][0] if text is None else text
    path.write_bytes(content.encode("utf-8"))
    return path


def write_task(root: Path, task: str) -> None:
    for split in FIXTURES[task]:
        write_split(root, task, split)


@pytest.fixture(autouse=True)
def _no_glue_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests control GLUE_DIR themselves."""
    monkeypatch.delenv("GLUE_DIR", raising=False)


# ------------------------------------------------------------------------------ task specs


def test_nine_tasks_with_canonical_label_order() -> None:
    assert set(GLUE_TASKS) == {"cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte", "wnli"}
    assert GLUE_TASKS["mnli"].label_names == ("entailment", "neutral", "contradiction")
    assert GLUE_TASKS["rte"].label_names == ("entailment", "not_entailment")
    assert GLUE_TASKS["qnli"].label_names == ("entailment", "not_entailment")
    assert GLUE_TASKS["wnli"].label_names == ("not_entailment", "entailment")
    assert GLUE_TASKS["cola"].label_names == ("unacceptable", "acceptable")
    assert GLUE_TASKS["sst2"].label_names == ("negative", "positive")
    assert GLUE_TASKS["mrpc"].label_names == ("not_equivalent", "equivalent")
    assert GLUE_TASKS["qqp"].label_names == ("not_duplicate", "duplicate")
    stsb = GLUE_TASKS["stsb"]
    assert stsb.is_regression and stsb.num_labels == 1 and stsb.label_names is None
    assert GLUE_TASKS["mnli"].num_labels == 3 and not GLUE_TASKS["mnli"].is_regression
    assert GLUE_TASKS["mnli"].eval_splits == ("dev_matched", "dev_mismatched")
    assert {t.main_metric for t in GLUE_TASKS.values()} == {
        "accuracy",
        "matthews_correlation",
        "pearson",
    }
    assert GLUE_TASKS["cola"].main_metric == "matthews_correlation"
    assert GLUE_TASKS["stsb"].main_metric == "pearson"
    assert GLUE_TASKS["mrpc"].main_metric == "accuracy"


@pytest.mark.parametrize(
    ("alias", "name"),
    [
        ("SST-2", "sst2"),
        ("sst-2", "sst2"),
        ("SST2", "sst2"),
        ("STS-B", "stsb"),
        ("sts-b", "stsb"),
        ("CoLA", "cola"),
        ("MNLI", "mnli"),
        ("wnli", "wnli"),
        (" qqp ", "qqp"),
    ],
)
def test_get_task_aliases(alias: str, name: str) -> None:
    assert get_task(alias) is GLUE_TASKS[name]
    assert get_task(GLUE_TASKS[name]) is GLUE_TASKS[name]


@pytest.mark.parametrize("bad", ["sst", "mnli-mm", "squad", ""])
def test_get_task_unknown_lists_known(bad: str) -> None:
    with pytest.raises(ValueError, match="unknown GLUE task") as info:
        get_task(bad)
    assert isinstance(info.value, ConfigError)
    for name in GLUE_TASKS:
        assert name in str(info.value)


# --------------------------------------------------------------------------------- reading


@pytest.mark.parametrize(
    ("task", "split"), [(t, s) for t, splits in FIXTURES.items() for s in splits]
)
def test_every_task_parses_exact_format(tmp_path: Path, task: str, split: str) -> None:
    write_task(tmp_path, task)
    data = load_split(task, split, tmp_path)
    _, texts, labels = FIXTURES[task][split]
    assert isinstance(data, GlueSplit)
    assert data.task is GLUE_TASKS[task]
    assert data.split == split
    assert data.texts == texts
    assert data.labels == labels
    assert len(data) == len(texts)
    assert data.source == str(tmp_path / GLUE_TASKS[task].folder / f"{split}.tsv")
    assert data.n_malformed == 0
    label_type = float if task == "stsb" else int
    assert all(type(x) is label_type for x in data.labels)
    assert all(type(s) is str for t in data.texts for s in t)


def test_fixtures_cover_every_task_and_split() -> None:
    for name, spec in GLUE_TASKS.items():
        assert set(FIXTURES[name]) == {"train", *spec.eval_splits}


def test_mrpc_bom_is_stripped(tmp_path: Path) -> None:
    path = write_split(tmp_path, "mrpc", "train")
    assert path.read_bytes().startswith(b"\xef\xbb\xbfQuality")
    assert load_split("MRPC", "train", tmp_path).labels == [1, 0]


def test_validation_alias_and_str_path(tmp_path: Path) -> None:
    write_task(tmp_path, "rte")
    write_task(tmp_path, "mnli")
    assert load_split("rte", "validation", str(tmp_path)).split == "dev"
    assert load_split("mnli", "validation", tmp_path).split == "dev_matched"
    assert load_split("mnli", "validation_mismatched", tmp_path).labels == [0, 1]


def test_glue_dir_env_is_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_task(tmp_path, "sst2")
    monkeypatch.setenv("GLUE_DIR", str(tmp_path))
    assert resolve_data_dir(None) == tmp_path
    assert load_split("sst2", "dev").labels == [0]


def test_resolve_data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_data_dir(None) is None
    assert resolve_data_dir(tmp_path) == tmp_path
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_data_dir(tmp_path / "nope")
    monkeypatch.setenv("GLUE_DIR", str(tmp_path / "gone"))
    with pytest.raises(FileNotFoundError, match="GLUE_DIR"):
        resolve_data_dir(None)


def test_unknown_split(tmp_path: Path) -> None:
    write_task(tmp_path, "sst2")
    with pytest.raises(ValueError, match=r"unknown split 'test'.*train, dev"):
        load_split("sst2", "test", tmp_path)
    with pytest.raises(ValueError, match="dev_matched, dev_mismatched"):
        load_split("mnli", "dev", tmp_path)


def test_missing_task_folder_lists_present_folders(tmp_path: Path) -> None:
    write_task(tmp_path, "sst2")
    write_task(tmp_path, "cola")
    (tmp_path / "not_a_task").mkdir()
    with pytest.raises(FileNotFoundError) as info:
        load_split("mnli", "train", tmp_path)
    msg = str(info.value)
    assert isinstance(info.value, DataError)
    assert str(tmp_path / "MNLI" / "train.tsv") in msg
    assert "Task folders present" in msg and "CoLA, SST-2" in msg
    assert "not_a_task" not in msg


def test_missing_task_folder_in_empty_dir(tmp_path: Path) -> None:
    (tmp_path / "glue_data").mkdir()
    with pytest.raises(FileNotFoundError, match=r"present .*: none\. Did you mean .*glue_data"):
        load_split("rte", "dev", tmp_path)


def test_missing_split_file(tmp_path: Path) -> None:
    write_split(tmp_path, "qnli", "dev")
    with pytest.raises(FileNotFoundError) as info:
        load_split("qnli", "train", tmp_path)
    msg = str(info.value)
    assert str(tmp_path / "QNLI" / "train.tsv") in msg
    assert "Files present" in msg and "dev.tsv" in msg


def test_bad_header(tmp_path: Path) -> None:
    path = write_split(
        tmp_path, "rte", "dev", "index\tpremise\thypothesis\tlabel\n0\ta\tb\tentailment\n"
    )
    with pytest.raises(ValueError) as info:
        load_split("rte", "dev", tmp_path)
    msg = str(info.value)
    assert isinstance(info.value, GlueFormatError) and isinstance(info.value, FactorlabError)
    assert str(path) in msg
    assert "'sentence1'" in msg and "'sentence2'" in msg  # expected
    assert "'premise'" in msg and "'hypothesis'" in msg  # found


def test_empty_file(tmp_path: Path) -> None:
    write_split(tmp_path, "sst2", "dev", "")
    with pytest.raises(ValueError, match="empty"):
        load_split("sst2", "dev", tmp_path)


@pytest.mark.parametrize(
    ("task", "split", "text", "line", "value"),
    [
        ("sst2", "dev", "sentence\tlabel\ngood .\t1\nbad .\t2\n", 3, "'2'"),
        ("rte", "dev", "index\tsentence1\tsentence2\tlabel\n0\ta\tb\tneutral\n", 2, "'neutral'"),
        ("cola", "dev", "gj04\t1\t\tok .\ngj04\t*\t\tbad .\n", 2, "'*'"),
        ("mnli", "dev_matched", MNLI_DEV_HEADER + _mnli_row(0, "a", "b", "-", 5), 2, "'-'"),
        (
            "stsb",
            "dev",
            "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
            "0\tg\tf\ty\to\tn\tn\ta\tb\t7.5\n",
            2,
            "'7.5'",
        ),
    ],
)
def test_bad_label(tmp_path: Path, task: str, split: str, text: str, line: int, value: str) -> None:
    path = write_split(tmp_path, task, split, text)
    with pytest.raises(ValueError) as info:
        load_split(task, split, tmp_path)
    msg = str(info.value)
    assert str(path) in msg and f"line {line}" in msg and value in msg


def test_wrong_column_count_is_an_error(tmp_path: Path) -> None:
    write_split(tmp_path, "rte", "dev", "index\tsentence1\tsentence2\tlabel\n0\ta\tentailment\n")
    with pytest.raises(ValueError, match="line 2: expected 4 tab-separated columns"):
        load_split("rte", "dev", tmp_path)
    # CoLA with a header-style first row: column count 2 instead of 4.
    write_split(tmp_path, "cola", "dev", "index\tsentence\n0\tok .\n")
    with pytest.raises(ValueError, match="no header row"):
        load_split("cola", "dev", tmp_path)


QQP_HEADER = "id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate\n"


def test_qqp_skips_few_malformed_rows(tmp_path: Path) -> None:
    rows = [f"{i}\t{2 * i}\t{2 * i + 1}\tq{i}?\tp{i}?\t{i % 2}\n" for i in range(199)]
    rows.insert(50, "999\t1\t2\tbroken question without the rest\n")
    write_split(tmp_path, "qqp", "train", QQP_HEADER + "".join(rows))
    with pytest.warns(UserWarning, match="skipped 1 malformed row"):
        data = load_split("qqp", "train", tmp_path)
    assert len(data) == 199 and data.n_malformed == 1
    assert data.texts[50] == ("q50?", "p50?")
    assert data.labels[:3] == [0, 1, 0]


def test_qqp_too_many_malformed_rows(tmp_path: Path) -> None:
    rows = [f"{i}\t1\t2\tq?\tp?\t0\n" for i in range(98)] + ["x\ty\n", "1\t2\t3\t4\t5\t6\t7\n"]
    write_split(tmp_path, "qqp", "dev", QQP_HEADER + "".join(rows))
    with pytest.raises(ValueError, match=r"2 of 100 data rows \(2\.00%\)"):
        load_split("qqp", "dev", tmp_path)


def test_check_task_available(tmp_path: Path) -> None:
    write_task(tmp_path, "mnli")
    check_task_available("mnli", tmp_path)
    check_task_available("mnli", tmp_path, splits=("dev_mismatched",))
    (tmp_path / "MNLI" / "dev_matched.tsv").unlink()
    with pytest.raises(FileNotFoundError, match=r"dev_matched.tsv"):
        check_task_available("mnli", tmp_path)
    check_task_available("mnli", tmp_path, splits=("train",))
    with pytest.raises(FileNotFoundError, match=r"Task folders present .*: MNLI"):
        check_task_available("sst2", tmp_path)
    with pytest.raises(ValueError, match="unknown GLUE task"):
        check_task_available("nope", tmp_path)


def test_no_data_dir_and_no_datasets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    for call in (lambda: load_split("sst2", "train"), lambda: check_task_available("sst2", None)):
        with pytest.raises(FileNotFoundError) as info:
            call()
        msg = str(info.value)
        assert "--data-dir" in msg and "GLUE_DIR" in msg and "SST-2/train.tsv" in msg
        assert "datasets" in msg


class _FakeHubSplit:
    def __init__(self, columns: dict[str, list]) -> None:
        self._columns = columns
        self.column_names = list(columns)

    def __getitem__(self, key: str) -> list:
        return self._columns[key]


def test_hub_fallback_maps_columns(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple] = []

    def load_dataset(path: str, name: str, split: str) -> _FakeHubSplit:
        calls.append((path, name, split))
        if name == "mnli":
            return _FakeHubSplit(
                {
                    "premise": ["p0", "p1"],
                    "hypothesis": ["h0", "h1"],
                    "label": [2, 0],
                    "idx": [0, 1],
                }
            )
        return _FakeHubSplit({"sentence1": ["a"], "sentence2": ["b"], "label": [3.25], "idx": [0]})

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    check_task_available("mnli", None)  # no network, nothing to check
    data = load_split("mnli", "dev_mismatched")
    assert calls[-1] == ("nyu-mll/glue", "mnli", "validation_mismatched")
    assert data.texts == [("p0", "h0"), ("p1", "h1")] and data.labels == [2, 0]
    assert data.source == "hub:nyu-mll/glue" and data.split == "dev_mismatched"
    stsb = load_split("STS-B", "validation")
    assert calls[-1] == ("nyu-mll/glue", "stsb", "validation")
    assert stsb.texts == [("a", "b")] and stsb.labels == [3.25]


def test_hub_failure_says_how_to_avoid_the_hub(monkeypatch: pytest.MonkeyPatch) -> None:
    def load_dataset(*args: object, **kwargs: object) -> None:
        raise ConnectionError("offline")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    with pytest.raises(FileNotFoundError, match=r"ConnectionError: offline.*GLUE_DIR"):
        load_split("rte", "train")


# ---------------------------------------------------------------------------------- subset


def _toy_split(n: int = 10) -> GlueSplit:
    return GlueSplit(
        task=GLUE_TASKS["sst2"],
        split="train",
        texts=[(f"s{i}",) for i in range(n)],
        labels=[i % 2 for i in range(n)],
        source="mem",
    )


def test_subset_count_fraction_determinism() -> None:
    data = _toy_split(10)
    a = data.subset(4, seed=0)
    assert len(a) == 4 and a.task is data.task and a.split == "train" and a.source == "mem"
    idx = [int(t[0][1:]) for t in a.texts]
    assert idx == sorted(idx) and len(set(idx)) == 4  # original order, no repeats
    assert a.labels == [i % 2 for i in idx]  # texts and labels stay paired
    assert data.subset(4, seed=0).texts == a.texts  # deterministic
    seeds = {tuple(data.subset(4, seed=s).texts) for s in range(5)}
    assert len(seeds) > 1  # the seed matters
    assert len(data.subset(0.3, seed=1)) == 3
    assert len(data.subset(0.01, seed=1)) == 1  # at least one example
    assert data.subset(1.0, seed=1).texts == data.texts
    assert data.subset(np.int64(2), seed=3).texts == data.subset(2, seed=3).texts
    assert len(data) == 10  # original untouched


@pytest.mark.parametrize(
    ("arg", "exc"),
    [
        (0, ValueError),
        (-1, ValueError),
        (11, ValueError),
        (0.0, ValueError),
        (1.5, ValueError),
        (-0.5, ValueError),
        (float("nan"), ValueError),
        (True, TypeError),
        ("3", TypeError),
        (None, TypeError),
    ],
)
def test_subset_validation(arg: object, exc: type[Exception]) -> None:
    with pytest.raises(exc):
        _toy_split(10).subset(arg, seed=0)  # type: ignore[arg-type]


def test_subset_bad_seed_and_empty_split() -> None:
    with pytest.raises(TypeError, match="seed"):
        _toy_split().subset(2, seed=1.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="empty"):
        _toy_split(0).subset(1, seed=0)


def test_glue_split_length_mismatch() -> None:
    with pytest.raises(ValueError, match="2 texts but 1 labels"):
        GlueSplit(GLUE_TASKS["sst2"], "train", [("a",), ("b",)], [0], "mem")


# --------------------------------------------------------------------------------- metrics


def test_mcc_by_hand() -> None:
    gold = [1, 1, 1, 0, 0, 0, 1, 0]
    pred = [1, 1, 0, 0, 0, 1, 1, 0]
    # TP=3, TN=3, FP=1, FN=1: (3*3 - 1*1) / sqrt(4*4*4*4) = 8/16
    out = compute_metrics("cola", pred, gold)
    assert out == {"matthews_correlation": pytest.approx(0.5)}
    assert type(out["matthews_correlation"]) is float


def test_accuracy_f1_by_hand() -> None:
    gold = [1, 1, 1, 0, 0]
    pred = [1, 0, 1, 1, 0]
    # TP=2, FP=1, FN=1: precision = recall = 2/3, F1 = 2/3; accuracy 3/5
    for task in ("mrpc", "qqp"):
        out = compute_metrics(task, np.array(pred), np.array(gold))
        assert set(out) == {"accuracy", "f1"}
        assert out["accuracy"] == pytest.approx(0.6) and out["f1"] == pytest.approx(2 / 3)
        assert all(type(v) is float for v in out.values())
    assert compute_metrics("rte", pred, gold) == {"accuracy": pytest.approx(0.6)}
    assert compute_metrics("mnli", [0, 1, 2, 2], [0, 2, 2, 1]) == {"accuracy": 0.5}
    assert compute_metrics("sst2", [0.0, 1.0], [0, 1]) == {"accuracy": 1.0}  # integral floats


def test_pearson_spearman_by_hand() -> None:
    # x = [1,2,3], y = [1,3,2]: deviations [-1,0,1], [-1,1,0]: r = 1/2; ranks equal values
    out = compute_metrics("stsb", [1.0, 2.0, 3.0], [1.0, 3.0, 2.0])
    assert out["pearson"] == pytest.approx(0.5) and out["spearman"] == pytest.approx(0.5)
    assert out["combined"] == pytest.approx(0.5)
    # y = x^2 on 1..4: Pearson 25 / sqrt(5 * 129), Spearman 1 (monotone)
    out = compute_metrics("stsb", [1, 2, 3, 4], [1, 4, 9, 16])
    assert out["pearson"] == pytest.approx(25 / math.sqrt(5 * 129))
    assert out["spearman"] == pytest.approx(1.0)
    assert out["combined"] == pytest.approx((25 / math.sqrt(645) + 1) / 2)
    assert all(type(v) is float for v in out.values())


def test_constant_predictions_do_not_crash() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        stsb = compute_metrics("stsb", [2.5, 2.5, 2.5], [1.0, 4.0, 3.0])
        assert stsb == {"pearson": 0.0, "spearman": 0.0, "combined": 0.0}
        assert compute_metrics("stsb", [1.0, 2.0], [3.0, 3.0])["pearson"] == 0.0
        assert compute_metrics("cola", [1, 1, 1, 1], [0, 1, 1, 0]) == {"matthews_correlation": 0.0}
        mrpc = compute_metrics("mrpc", [0, 0, 0, 0], [1, 0, 0, 1])
        assert mrpc == {"accuracy": 0.5, "f1": 0.0}
        assert compute_metrics("mrpc", [1, 1, 1, 1], [1, 0, 0, 1])["f1"] == pytest.approx(2 / 3)


def test_metrics_accept_torch_tensors() -> None:
    torch = pytest.importorskip("torch")
    out = compute_metrics("sst2", torch.tensor([1, 0, 1]), torch.tensor([1, 1, 1]))
    assert out["accuracy"] == pytest.approx(2 / 3)


@pytest.mark.parametrize(
    ("task", "pred", "gold", "match"),
    [
        ("sst2", [0, 1], [0, 1, 1], "2 predictions but 3 labels"),
        ("sst2", [], [], "empty"),
        ("stsb", [], [], "empty"),
        ("stsb", [1.0], [2.0], "at least 2"),
        ("sst2", [[0.1, 0.9], [0.8, 0.2]], [1, 0], "logits"),
        ("sst2", [0, 2], [0, 1], r"0\.\.1"),
        ("mnli", [0, -1], [0, 1], r"0\.\.2"),
        ("rte", [0.5, 1.0], [0, 1], "non-integer"),
        ("rte", ["a", "b"], [0, 1], "integer class ids"),
        ("stsb", [1.0, float("nan")], [1.0, 2.0], "NaN"),
    ],
)
def test_metric_errors(task: str, pred: list, gold: list, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        compute_metrics(task, pred, gold)


def test_baseline_score() -> None:
    # MRPC: train majority 1, eval [1,0,1,1]: accuracy 3/4
    assert baseline_score("mrpc", [1, 1, 0], [1, 0, 1, 1]) == pytest.approx(0.75)
    # Tie in train goes to the smaller class id (0)
    assert baseline_score("sst2", [0, 1], [0, 0, 1]) == pytest.approx(2 / 3)
    assert baseline_score("mnli", [2, 2, 1], [2, 0, 1, 2]) == pytest.approx(0.5)
    assert baseline_score("cola", [1, 1, 0], [1, 0, 1]) == 0.0
    assert baseline_score("stsb", [1.0, 2.0, 4.0], [0.5, 3.0, 5.0]) == 0.0
    with pytest.raises(ValueError, match="empty"):
        baseline_score("sst2", [], [0, 1])


# ------------------------------------------------------------------------------- real data

REAL_COUNTS = {
    ("sst2", "train"): 67_349,
    ("sst2", "dev"): 872,
    ("mrpc", "train"): 3_668,
    ("mrpc", "dev"): 408,
    ("rte", "train"): 2_490,
    ("rte", "dev"): 277,
    ("cola", "train"): 8_551,
    ("cola", "dev"): 1_043,
    ("stsb", "train"): 5_749,
    ("stsb", "dev"): 1_500,
    ("qnli", "dev"): 5_463,
    ("wnli", "train"): 635,
    ("wnli", "dev"): 71,
}


@pytest.mark.slow
@pytest.mark.parametrize(("task", "split"), list(REAL_COUNTS))
def test_real_row_counts(glue_dir: Path, task: str, split: str) -> None:
    data = load_split(task, split, glue_dir)
    assert len(data) == REAL_COUNTS[(task, split)]
    assert data.n_malformed == 0
    assert all(len(t) == len(GLUE_TASKS[task].text_fields) for t in data.texts)
    assert all(s for t in data.texts for s in t)  # no empty texts


@pytest.mark.slow
def test_real_dev_label_counts(glue_dir: Path) -> None:
    names = {t: GLUE_TASKS[t].label_names for t in ("sst2", "mrpc", "rte", "cola", "wnli")}

    def counts(task: str) -> dict[str, int]:
        labels = load_split(task, "dev", glue_dir).labels
        return {names[task][k]: v for k, v in Counter(labels).items()}

    assert counts("sst2") == {"positive": 444, "negative": 428}
    assert counts("mrpc") == {"equivalent": 279, "not_equivalent": 129}
    assert counts("rte") == {"entailment": 146, "not_entailment": 131}
    assert counts("cola") == {"acceptable": 721, "unacceptable": 322}
    assert counts("wnli") == {"not_entailment": 40, "entailment": 31}


@pytest.mark.slow
def test_real_quotes_and_scores(glue_dir: Path) -> None:
    mrpc = load_split("mrpc", "dev", glue_dir)
    # Real MRPC dev row 1: the second sentence starts with an unbalanced double quote.
    assert mrpc.texts[0][1].startswith('" The foodservice pie business')
    assert mrpc.labels[0] == 1
    stsb = load_split("stsb", "dev", glue_dir)
    assert stsb.texts[0] == (
        "A man with a hard hat is dancing.",
        "A man wearing a hard hat is dancing.",
    )
    assert stsb.labels[:2] == [5.0, 4.75]
    assert min(stsb.labels) >= 0.0 and max(stsb.labels) <= 5.0


@pytest.mark.slow
def test_real_baselines(glue_dir: Path) -> None:
    train = load_split("mrpc", "train", glue_dir).labels
    dev = load_split("mrpc", "dev", glue_dir).labels
    assert baseline_score("mrpc", train, dev) == pytest.approx(279 / 408)
    assert compute_metrics("mrpc", dev, dev) == {"accuracy": 1.0, "f1": 1.0}
    sst = load_split("sst2", "train", glue_dir).subset(0.1, seed=0)
    assert len(sst) == 6_735
