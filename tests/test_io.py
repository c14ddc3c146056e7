import json
import os
import stat

import pytest

from factorlab.io import atomic_directory, write_json_atomic


def test_write_json_atomic_replaces_whole_file_with_umask_mode(tmp_path):
    path = tmp_path / "sub" / "results.json"
    write_json_atomic(path, {"a": 1})
    write_json_atomic(path, {"b": 2})
    assert json.loads(path.read_text()) == {"b": 2}
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask
    assert [p.name for p in path.parent.iterdir()] == ["results.json"]  # no temporaries left


def test_write_json_atomic_keeps_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "results.json"
    write_json_atomic(path, {"a": 1})
    with pytest.raises(TypeError):
        write_json_atomic(path, {"a": object()})  # not JSON-serializable, fails mid-write
    assert json.loads(path.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]


def test_atomic_directory_replaces_on_success_only(tmp_path):
    run = tmp_path / "run"
    with atomic_directory(run) as tmp:
        (tmp / "x.txt").write_text("first")
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(run.stat().st_mode) == 0o777 & ~umask
    with pytest.raises(RuntimeError), atomic_directory(run) as tmp:
        (tmp / "x.txt").write_text("second")
        raise RuntimeError("interrupted")
    assert (run / "x.txt").read_text() == "first"
    with atomic_directory(run) as tmp:
        (tmp / "y.txt").write_text("third")
    assert sorted(p.name for p in run.iterdir()) == ["y.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["run"]
