"""Crash-safe writes: every result, checkpoint and saved model goes through here.

A file is written to a temporary file in its own directory, flushed and fsynced, then
renamed over the target with :func:`os.replace` (atomic on POSIX and Windows): a reader
sees the old file or the new one, never a half-written one. A directory of several files
(a Hugging Face checkpoint) is written to a temporary sibling directory and swapped in
(:func:`atomic_directory`). Loading errors raise :class:`CheckpointError`, which names
the file and what is wrong with it. A run owns its output folder through
:func:`folder_lock`: a second writer stops at once instead of mixing its files in.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import glob
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any


class CheckpointError(ValueError):
    """A saved model, checkpoint or result file that cannot be loaded as it is: missing,
    empty, truncated, not what it claims to be, or inconsistent with its config. The
    message names the file and what is wrong."""


def _temp_prefix(path: Path) -> str:
    """The name prefix of ``path``'s temporary files and folders: ``.NAME.PID-``, so that
    :func:`_remove_leftovers` can tell a live process's write in flight from the
    leftovers of a killed one."""
    return f".{path.name}.{os.getpid()}-"


def _pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this machine (signal 0 checks, sends nothing)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # it exists but belongs to another user (EPERM)
        return True
    return True


#: Seconds after which a temporary of a live pid is taken as a leftover all the same.
LEFTOVER_AGE = 6 * 3600


def _older(path: Path, seconds: float) -> bool:
    """Whether ``path`` (not followed if a link) was last modified over ``seconds`` ago."""
    try:
        return time.time() - path.lstat().st_mtime > seconds
    except OSError:
        return False


def _remove_leftovers(path: Path) -> None:
    """Delete the temporary files or folders a killed earlier write of ``path`` left.
    Those of a process still running (its pid is in the name: :func:`_temp_prefix`) are
    another write in flight and are left alone, unless they are older than
    :data:`LEFTOVER_AGE` seconds (no write takes that long: the pid was reused)."""
    for stale in path.parent.glob(f".{glob.escape(path.name)}.*"):
        if stale.suffix not in (".tmp", ".old"):
            continue
        tag = re.match(r"(\d+)-", stale.name[len(path.name) + 2 :])
        if tag is not None and _pid_alive(int(tag.group(1))) and not _older(stale, LEFTOVER_AGE):
            continue
        if stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                stale.unlink()


def _fsync_dir(directory: Path) -> None:
    # The rename itself lives in the directory entry: sync it too (POSIX only).
    if os.name != "posix":  # pragma: no cover - Windows has no directory fds
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", **kwargs) -> Iterator[IO]:
    """``open(path, mode)`` whose content appears at ``path`` only when the block ends
    without an exception (temporary file in the same directory, fsync, ``os.replace``).
    ``mode``: ``"w"`` or ``"wb"`` (plus open's other keywords, e.g. ``newline``). A
    ``path`` that is a symlink is written through: its target gets the content."""
    if mode not in ("w", "wb"):
        raise ValueError(f"mode must be 'w' or 'wb', got {mode!r}")
    path = Path(path)
    if path.is_symlink():  # written through, as atomic_directory does: the link stays
        path = path.resolve()
    _remove_leftovers(path)
    fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path), suffix=".tmp", dir=path.parent)
    try:
        if mode == "w":
            kwargs.setdefault("encoding", "utf-8")
        with os.fdopen(fd, mode, **kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def write_text(path: str | os.PathLike, text: str) -> None:
    """Atomically replace ``path`` with ``text`` (UTF-8)."""
    with atomic_open(path, "w") as f:
        f.write(text)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Atomically replace ``path`` with ``data``."""
    with atomic_open(path, "wb") as f:
        f.write(data)


def write_json(path: str | os.PathLike, obj: Any, *, indent: int | None = 2) -> None:
    """Atomically replace ``path`` with ``obj`` as JSON."""
    write_text(path, json.dumps(obj, indent=indent))


def write_jsonl(path: str | os.PathLike, rows: list[dict]) -> None:
    """Atomically replace ``path`` with one JSON object per line."""
    write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save(obj, path)``, atomically."""
    import torch

    with atomic_open(path, "wb") as f:
        torch.save(obj, f)


def save_figure(fig, path: str | os.PathLike, **kwargs) -> None:
    """``fig.savefig(path, **kwargs)``, atomically (the format from ``path``'s suffix)."""
    path = Path(path)
    kwargs.setdefault("format", path.suffix.lstrip(".") or "png")
    with atomic_open(path, "wb") as f:
        fig.savefig(f, **kwargs)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``);
    False where the system cannot."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    libc = ctypes.CDLL(name, use_errno=True)
    fn = getattr(libc, "renameat2", None)
    if fn is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    return fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory beside ``path``; when the block ends without an
    exception its files are fsynced and it replaces ``path`` (an atomic exchange where
    the system has one; otherwise two renames, with ``path`` absent in between, never
    half-written). On an exception ``path`` is left as it was. A ``path`` that is a
    symlink is written through: the folder it points to is replaced, the link stays."""
    path = Path(path)
    if path.is_symlink():
        # Swapping the link itself would turn it into a real folder and leave its target
        # stale; the folder it names is the one to replace.
        path = path.resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(path)
    tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(path), suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        for file in tmp.rglob("*"):
            if file.is_file():
                with open(file, "rb") as f:
                    os.fsync(f.fileno())
        _fsync_dir(tmp)
        if path.exists() and not path.is_dir():
            raise FileExistsError(f"{path} exists and is not a directory")
        if path.exists() and _exchange(tmp, path):
            # tmp now holds the old content.
            _fsync_dir(path.parent)
            shutil.rmtree(tmp, ignore_errors=True)
            return
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=_temp_prefix(path), suffix=".old", dir=path.parent))
            os.replace(path, old / "previous")
            os.replace(tmp, path)
            _fsync_dir(path.parent)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
            _fsync_dir(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def read_json(path: str | os.PathLike, what: str = "JSON file") -> Any:
    """``json.loads`` of ``path``; a missing, unreadable or malformed file raises
    :class:`CheckpointError` naming it."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CheckpointError(f"{path}: {what} is missing") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: cannot read the {what} ({exc})") from exc
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: the {what} is not valid JSON ({exc})") from exc


def torch_load(path: str | os.PathLike, what: str = "checkpoint", map_location=None) -> Any:
    """``torch.load(path, weights_only=True)``; a missing, empty, truncated or foreign
    file raises :class:`CheckpointError` naming it."""
    import pickle
    import zipfile

    import torch

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: {what} is missing")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: {what} is empty (an interrupted write?)")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except (
        EOFError,
        pickle.UnpicklingError,
        zipfile.BadZipFile,
        RuntimeError,
        OSError,
        ValueError,
        KeyError,
        TypeError,
        AttributeError,
    ) as exc:
        # torch's own message may advise weights_only=False: never do that for a file
        # that fails to load; it is damaged or not a linattn file.
        if isinstance(exc, pickle.UnpicklingError):
            why = "it holds objects other than tensors and plain containers"
        elif isinstance(exc, RuntimeError | zipfile.BadZipFile | EOFError):
            why = "truncated or damaged archive"
        else:
            why = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
        raise CheckpointError(
            f"{path}: not a readable {what} ({why}); it may be from an "
            "interrupted write or not a linattn file"
        ) from exc


class FolderInUseError(OSError):
    """Another process holds the output folder's lock (:func:`folder_lock`); the
    message names the folder and the holder's pid."""


#: The lock file of a folder a run owns (:func:`folder_lock`); it holds the owner's pid.
LOCK_NAME = ".lock"
# Folders this process holds: resolved path -> [lock file descriptor, depth].
_HELD: dict[str, list[int]] = {}


@contextlib.contextmanager
def folder_lock(path: str | os.PathLike) -> Iterator[Path]:
    """Own the folder ``path`` (created if missing) for the block's life: an exclusive
    ``fcntl.flock`` on ``path/.lock``, which holds this process's pid while it runs. A
    folder another process owns raises :class:`FolderInUseError` at once, naming it and
    the holder's pid. Re-entrant within one process; the lock goes when the process
    does, however it ends. Yields ``path``. Where ``fcntl`` is missing (Windows) the
    folder is not locked."""
    folder = Path(path)
    created = [p for p in (folder, *folder.parents) if not p.exists()]
    folder.mkdir(parents=True, exist_ok=True)
    key = str(folder.resolve())
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield folder
        return
    if key in _HELD:
        _HELD[key][1] += 1
        try:
            yield folder
        finally:
            _HELD[key][1] -= 1
        return
    lock = folder / LOCK_NAME
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError as exc:
        os.close(fd)
        try:
            holder = lock.read_text().strip() or "unknown"
        except OSError:
            holder = "unknown"
        raise FolderInUseError(
            f"{folder} is in use by another linattn run (pid {holder}; lock {lock}): "
            "wait for it to end, or write elsewhere"
        ) from exc
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        _HELD[key] = [fd, 1]
        yield folder
    finally:
        _HELD.pop(key, None)
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
        os.close(fd)  # releases the lock
        _remove_if_unused(folder, created)


def _remove_if_unused(folder: Path, created: list[Path]) -> None:
    """A command that stopped before writing anything leaves no trace: ``folder`` holding
    nothing but its lock file goes, with the parents the lock created (``created``,
    deepest first) that are empty now."""
    if not created or created[0] != folder:
        return
    try:
        if any(p.name != LOCK_NAME for p in folder.iterdir()):
            return
        (folder / LOCK_NAME).unlink(missing_ok=True)
    except OSError:
        return
    for p in created:
        try:
            p.rmdir()
        except OSError:  # not empty (another writer came in meanwhile) or gone
            return
