"""Output safety: atomic file and directory writes (an interrupted run never leaves a
half-written result), one lock per output folder (two runs never write the same folder), and
the checks that refuse an output location before any work."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from factorlab.errors import ConfigError, DataError, OutputExistsError

PARTIAL = ".partial-"
OLD = ".old-"


def _default_mode(directory: bool) -> int:
    """The mode ``open``/``mkdir`` would give under the process umask (``tempfile`` uses 0o600 /
    0o700, which would hide results from the other users of a shared run folder)."""
    umask = os.umask(0)
    os.umask(umask)
    return (0o777 if directory else 0o666) & ~umask


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file beside it and ``os.replace``: a reader
    sees the old file or the new one, never a part."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, _default_mode(directory=False))
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def marked_block(text: str, markers: tuple[str, str], where: str) -> tuple[int, int]:
    """The span of ``text`` between a start marker and an end marker (e.g. ``("<!-- x:start
    -->", "<!-- x:end -->")`` in a README): the offsets just after the first and at the second.

    Raises:
        ConfigError: ``text`` (the file ``where``) lacks a marker, holds one twice, or has the
            end marker first.
    """
    start, end = markers
    found = text.count(start), text.count(end)
    if found != (1, 1) or text.index(end) < text.index(start):
        raise ConfigError(
            f"{where} needs {start!r} once and then {end!r} once (found {found[0]} and "
            f"{found[1]}): put the two markers where the generated text goes"
        )
    return text.index(start) + len(start), text.index(end)


def write_marked_block(path: str | os.PathLike, markers: tuple[str, str], block: str) -> None:
    """Replace what lies between ``markers`` in the file ``path`` with ``block`` on lines of its
    own, atomically (``write_text_atomic``); the rest of the file is kept byte for byte.

    Raises:
        DataError: ``path`` does not exist.
        ConfigError: its markers are missing or out of order (``marked_block``).
    """
    if not Path(path).is_file():
        raise DataError(f"{path} does not exist: give the file that holds the markers {markers}")
    text = Path(path).read_text()
    start, end = marked_block(text, markers, str(path))
    write_text_atomic(path, f"{text[:start]}\n{block.strip()}\n{text[end:]}")


def write_json_atomic(path: str | os.PathLike, data: Any) -> None:
    """Write ``data`` as indented JSON to ``path`` atomically (``write_text_atomic``)."""
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh temporary directory beside ``path``; on success it replaces ``path``.

    If the body raises, the temporary directory is removed and ``path`` is untouched. An existing
    ``path`` is moved aside first and deleted only after the new one is in place.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}{PARTIAL}", dir=path.parent))
    os.chmod(tmp, _default_mode(directory=True))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if path.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{path.name}{OLD}", dir=path.parent))
        os.replace(path, old / "d")
    os.replace(tmp, path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def fix_mode(path: str | os.PathLike) -> None:
    """Give a file written by a library through ``mkstemp`` (mode 0600) the umask's mode."""
    os.chmod(path, _default_mode(directory=False))


def check_output_location(path: str | os.PathLike, what: str = "--output") -> Path:
    """Refuse a path that cannot become an output folder, before any work; writes nothing.

    Raises:
        OutputExistsError: ``path`` is the current folder or one above it (replacing it would
            pull the folder out from under the run), a parent is a file, or the nearest existing
            parent is not a writable folder.
    """
    path = Path(path).expanduser()
    resolved = path.resolve()
    cwd = Path.cwd().resolve()
    if resolved == cwd or resolved in cwd.parents:
        raise OutputExistsError(
            f"{what} {path} is the current folder or contains it; a run replaces its output "
            "folder as a whole. Give a new folder, e.g. runs/NAME."
        )
    parent = resolved.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise OutputExistsError(
            f"{what} {path}: {parent} is a file, not a folder. Choose another location."
        )
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputExistsError(f"{what} {path}: cannot write in {parent}. Choose another place.")
    return path


class OutputLock:
    """An exclusive, non-blocking lock on one output folder (``filelock``), held while a run
    writes it: a lock file ``.NAME.lock`` beside the folder.

    On acquiring, leftovers of killed runs (``.NAME.partial-*`` and ``.NAME.old-*`` folders
    beside it) are removed: while the lock is held no other run can be writing them.

    Raises:
        OutputExistsError: another process holds the lock (another run is writing there), or the
            lock file cannot be created (the location is not writable).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.lock_file = self.path.parent / f".{self.path.name}.lock"
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            os.close(os.open(self.lock_file, os.O_WRONLY | os.O_CREAT, 0o666))  # writable here?
            self._lock = FileLock(self.lock_file, timeout=0)
            self._lock.acquire()
        except Timeout:
            raise OutputExistsError(
                f"another factorlab run is writing {self.path} (it holds {self.lock_file}); "
                "wait for it to finish or choose another output"
            ) from None
        except OSError as exc:
            raise OutputExistsError(
                f"cannot write the output {self.path}: {exc.strerror or exc}. Choose another place."
            ) from exc
        for stale in self.path.parent.glob(f".{self.path.name}.*"):
            rest = stale.name[len(self.path.name) + 1 :]
            if stale.is_dir() and rest.startswith((PARTIAL, OLD)):
                shutil.rmtree(stale, ignore_errors=True)

    def release(self) -> None:
        """Release the lock (the lock file stays; filelock reuses it)."""
        self._lock.release()

    def __enter__(self) -> OutputLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
