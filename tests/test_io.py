import json
import os
import stat

import pytest

from factorlab.errors import ConfigError, DataError
from factorlab.io import atomic_directory, marked_block, write_json_atomic, write_marked_block


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


def test_write_marked_block_replaces_only_between_the_markers(tmp_path):
    markers = ("<!-- t:start -->", "<!-- t:end -->")
    readme = tmp_path / "README.md"
    readme.write_text("head\n<!-- t:start -->\nold\n<!-- t:end -->\ntail\n")
    write_marked_block(readme, markers, "new\n")
    assert readme.read_text() == "head\n<!-- t:start -->\nnew\n<!-- t:end -->\ntail\n"
    for broken in ("<!-- t:end -->\n<!-- t:start -->\n", "<!-- t:start -->\n", "none\n"):
        readme.write_text(broken)
        with pytest.raises(ConfigError, match="needs '<!-- t:start -->' once"):
            write_marked_block(readme, markers, "new")
        assert readme.read_text() == broken
    with pytest.raises(DataError, match="does not exist"):
        write_marked_block(tmp_path / "missing.md", markers, "new")
    assert marked_block("a<!-- t:start -->b<!-- t:end -->", markers, "x") == (17, 18)
