"""What every ``linattn`` command shares: the parser class and help format, argument
types, the ``--out`` check, ``--config`` reading, and the error handling of
:func:`run_command` (one line on stderr, exit code 2 or 1; ``--debug`` shows the
traceback)."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.metadata
import json
import os
import re
import sys
import tempfile
import typing
from collections.abc import Callable
from pathlib import Path


class UsageError(Exception):
    """A command line that cannot run, found before any work starts (exit code 2)."""

    def __init__(self, message: str, prog: str | None = None) -> None:
        super().__init__(message)
        self.prog = prog


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's help ends with its default; options whose help already states it
    (computed defaults, flags that take their default from elsewhere) and on/off flags
    are left as written."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default in (None, False) or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """Usage errors raise :class:`UsageError` (one line, printed by :func:`run_command`)
    instead of printing the whole usage."""

    def error(self, message: str) -> typing.NoReturn:
        raise UsageError(message, prog=self.prog)


@dataclasses.dataclass(frozen=True)
class Command:
    """One ``linattn NAME`` subcommand: ``configure(parser)`` adds its arguments to its
    own parser, ``run(args) -> int`` does the work and returns the exit code (raising
    :class:`UsageError` for a command line that cannot run, before any work, and
    :class:`CommandFailed` for work that failed, both in one line)."""

    name: str
    help: str
    description: str
    configure: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]
    #: the flags that set sizes: an out-of-memory error names them as what to lower.
    sizes: tuple[str, ...] = ()


class CommandFailed(Exception):
    """Work that failed after it started, for a reason the message says in full (exit
    code 1, one line, no traceback to show): e.g. benchmark cases that failed."""


def version() -> str:
    try:
        return importlib.metadata.version("linattn")
    except importlib.metadata.PackageNotFoundError:  # running from a source tree
        from .. import __version__

        return __version__


def check_out(path: str | os.PathLike, flag: str = "--out") -> Path:
    """Refuse an output folder that cannot be written before any work starts: create it,
    write a temporary file in it, and remove again the folders this check created (the
    command creates them when it writes)."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise UsageError(f"{flag} {path} is a file; give a folder")
    created = []
    missing = p.absolute()
    while not missing.exists() and missing != missing.parent:
        created.append(missing)
        missing = missing.parent
    try:
        p.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=p, prefix=".linattn-write-check-"):
            pass
    except OSError as exc:
        raise UsageError(f"{flag} {path}: cannot write there ({exc.strerror or exc})") from exc
    finally:
        for folder in created:  # deepest first
            try:
                folder.rmdir()
            except OSError:
                break
    return p


def add_overwrite_flag(parser: argparse.ArgumentParser, what: str) -> None:
    """``--overwrite``: replace ``what`` in ``--out`` (refused otherwise:
    :func:`refuse_replacing`)."""
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help=f"replace {what} already in --out (without it, such an --out is refused)",
    )


def refuse_replacing(
    out: str | os.PathLike, names: typing.Iterable[str], what: str, remedy: str
) -> None:
    """Refuse an ``--out`` that holds any of ``names`` (results of an earlier run that
    this command would replace), in one line naming them and ``remedy`` (what to give
    instead: ``--overwrite``, ``--resume``, another ``--out``)."""
    held = [name for name in names if (Path(out) / name).exists()]
    if held:
        raise UsageError(f"--out {out} already holds {what} ({', '.join(held)}); {remedy}")


@contextlib.contextmanager
def own_out(path: str | os.PathLike) -> typing.Iterator[Path]:
    """Own the output folder for the command's life (:func:`linattn._io.folder_lock`):
    a second command writing there stops at once with one line naming the folder and
    the holder's pid (exit 1). Under torchrun only rank 0, which writes, owns it. A
    folder the lock created is removed again (with the parents it created) when the
    command stops before writing in it."""
    from .._io import folder_lock

    folder = Path(path)
    if os.environ.get("RANK", "0") != "0":
        yield folder
        return
    with folder_lock(folder):
        yield folder


def read_json(path: str, flag: str = "--config") -> dict:
    try:
        text = Path(path).read_text()
    except FileNotFoundError as exc:
        raise UsageError(f"{flag} {path}: no such file") from exc
    except OSError as exc:
        raise UsageError(f"{flag} {path}: cannot read it ({exc.strerror or exc})") from exc
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(f"{flag} {path}: not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise UsageError(
            f"{flag} {path}: expected a JSON object of settings, got {type(data).__name__}"
        )
    return data


def int_at_least(low: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    parse.__name__ = f"integer >= {low}"
    return parse


positive = int_at_least(1)
non_negative = int_at_least(0)


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def add_size_flags(parser: argparse.ArgumentParser, full: str) -> None:
    """The ``--quick`` (the default) / ``--full`` pair; ``full``: what --full runs."""
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="small sizes (the default)")
    size.add_argument("--full", action="store_true", help=full)


def preset(args: argparse.Namespace) -> str:
    """``"full"`` or ``"quick"``, from :func:`add_size_flags`' flags."""
    return "full" if args.full else "quick"


def memory_bytes() -> int:
    """The memory a run may use at most: this machine's RAM, or a CUDA device's memory
    where that is larger."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # pragma: no cover - not POSIX
        total = 0
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        total = max(total, torch.cuda.get_device_properties(0).total_memory)
    return total


def format_bytes(n: float) -> str:
    """``n`` bytes in binary units: ``"512 B"``, ``"3.6 TB"``."""
    units = ("B", "KB", "MB", "GB", "TB", "PB")
    i = 0
    while n >= 1024 and i < len(units) - 1:
        n, i = n / 1024, i + 1
    return f"{n:.0f} B" if i == 0 else f"{n:.1f} {units[i]}"


def check_fits(nbytes: float, what: str) -> None:
    """Refuse (:class:`UsageError`) sizes whose single tensor ``what`` alone needs more
    than :func:`memory_bytes`: cheap, before any allocation; sizes that pass may still
    run out of memory (then :func:`run_command` says so in one line)."""
    limit = memory_bytes()
    if limit and nbytes > limit:
        raise UsageError(
            f"{what} would take {format_bytes(nbytes)}, more than this machine's "
            f"{format_bytes(limit)} of memory"
        )


def allocation_failure(text: str) -> str | None:
    """What a failed allocation's message says it asked for (``"an allocation of 3.6
    TB"``; ``"an allocation"`` where it does not say), or None where ``text`` is not
    about running out of memory."""
    if not any(s in text for s in ("can't allocate memory", "MemoryError")) and (
        "out of memory" not in text.lower()
    ):
        return None
    cpu = re.search(r"allocate (\d+) bytes", text)
    if cpu:
        return f"an allocation of {format_bytes(int(cpu.group(1)))}"
    cuda = re.search(r"[Tt]ried to allocate ([\d.]+ [KMGTP]?i?B)", text)
    return f"an allocation of {cuda.group(1)}" if cuda else "an allocation"


def out_of_memory(exc: BaseException) -> str | None:
    """:func:`allocation_failure` of an exception (``MemoryError``, torch's
    out-of-memory errors), or None where ``exc`` is not one."""
    torch = sys.modules.get("torch")
    oom = getattr(torch, "OutOfMemoryError", ()) if torch is not None else ()
    what = allocation_failure(str(exc))
    if what is None and (isinstance(exc, MemoryError) or (oom and isinstance(exc, oom))):
        return "an allocation"
    return what


# Errors a user can act on: one line, no traceback (unless --debug). MissingDataError
# and FileNotFoundError are OSErrors; checkpoint errors are ValueErrors.
USER_ERRORS = (ValueError, TypeError, OSError, ImportError)


def debug_requested(argv: list[str]) -> bool:
    return "--debug" in argv or os.environ.get("LINATTN_DEBUG", "") not in ("", "0")


@dataclasses.dataclass
class Context:
    """What :func:`run_command` names in its messages: the program (``linattn`` or
    ``linattn COMMAND``) and the command's size flags, once the command is known."""

    prog: str = "linattn"
    sizes: tuple[str, ...] = ()


def run_command(work: Callable[[], int], *, debug: bool, context: Context) -> int:
    """``work()``'s exit code; a :class:`UsageError` prints one line and gives 2; a
    user error (:data:`USER_ERRORS`), a :class:`CommandFailed` or running out of memory
    one line and 1; Ctrl-C 130; ``debug`` re-raises instead."""
    try:
        return work()
    except UsageError as exc:
        if debug:
            raise
        print(f"{exc.prog or context.prog}: error: {exc}", file=sys.stderr)
        return 2
    except CommandFailed as exc:
        if debug:
            raise
        print(f"{context.prog}: error: {exc}", file=sys.stderr)
        return 1
    except USER_ERRORS as exc:
        if debug:
            raise
        print(f"{context.prog}: error: {exc} (--debug shows the traceback)", file=sys.stderr)
        return 1
    except (MemoryError, RuntimeError) as exc:
        what = out_of_memory(exc)
        if debug or what is None:
            raise
        lower = f"; lower {', '.join(context.sizes)}" if context.sizes else ""
        print(
            f"{context.prog}: error: out of memory: {what} failed (this machine has "
            f"{format_bytes(memory_bytes())}){lower} (--debug shows the traceback)",
            file=sys.stderr,
        )
        return 1
    except KeyboardInterrupt:
        print(f"{context.prog}: interrupted", file=sys.stderr)
        return 130
