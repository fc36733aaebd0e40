"""The ``coralfs`` command line: a git-like front end to :class:`coralfs.repository.Repository`.

Structure
---------
``main(argv)`` builds one argparse parser with a subcommand per command, opens the
repository (unless the command says it does not need one), runs the command and maps
errors to exit codes. The commands live in submodules listed in ``COMMAND_MODULES``.

Adding a command module (the only seam)
---------------------------------------
1. Create ``coralfs/cli/NAME.py`` with ``register(subparsers) -> None``. For each command::

       p = subparsers.add_parser("diff", parents=[common], help="...")   # common = cli.common_options()
       p.add_argument(...)
       p.set_defaults(func=cmd_diff)              # add needs_repo=False if no repository is opened

       def cmd_diff(args, repo) -> int: ...       # repo is a Repository, or None if needs_repo=False

   The command returns an exit code (0 on success). It raises a ``CoralError`` subclass for
   user-facing failures; ``main`` prints ``coralfs: error: <message>`` on stderr and exits
   with ``e.exit_code``. Do not print tracebacks or call ``sys.exit``.
2. Append ``"NAME"`` to ``COMMAND_MODULES`` below.

Helpers for command modules: ``common_options()`` (the ``-R``/``-q`` options every
subcommand accepts), ``progress(args)`` (progress display on a terminal, quiet otherwise),
``human_size``, ``short_id``, ``format_time``, ``parse_metrics``/``parse_meta`` (for repeated
``--metric k=v``/``--meta k=v``), ``worktree_paths``, ``print_json`` and ``out``/``info``
(stdout; ``info`` is silenced by ``-q``).

Global options: ``-R/--repo PATH`` (else ``$CORALFS_REPO``, else discovery from the current
directory), ``-q/--quiet``, ``--version``. Env ``CORALFS_DEBUG=1`` prints tracebacks for
unexpected errors.

Exit codes: 0 ok; 1 unexpected error; 2 usage error / not a repository / invalid name,
path or argument; other codes come from ``coralfs.errors`` (3 unknown revision or path,
4 ref exists, 5 nothing to commit, 6 would overwrite, 8 merge conflict, 9 corruption,
11 not a checkpoint, 12 no space left on device: also for an ``OSError`` ENOSPC/EDQUOT
from anywhere, ...); 130 interrupted.
"""

from __future__ import annotations

import argparse
import datetime
import errno
import importlib
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterable
from typing import Any

from coralfs import __version__
from coralfs.errors import CoralError, InvalidArgument, NoSpace

#: Submodules of ``coralfs.cli`` that define commands (each has ``register(subparsers)``).
#: Order is the order of commands in ``coralfs --help``.
COMMAND_MODULES: list[str] = ["basic", "refs", "inspect", "mount", "model", "maint"]

PROG = "coralfs"
SHORT = 12  # hex digits of an id shown to humans


# ------------------------------------------------------------------ output helpers
def out(text: str = "") -> None:
    """A line on stdout."""
    print(text, file=sys.stdout)


def info(args: argparse.Namespace, text: str) -> None:
    """A line on stdout, unless -q."""
    if not getattr(args, "quiet", False):
        print(text, file=sys.stdout)


def warn(text: str) -> None:
    """A warning line on stderr (never silenced: something was not done)."""
    print(f"{PROG}: warning: {text}", file=sys.stderr)


def print_json(value: Any) -> None:
    json.dump(value, sys.stdout, indent=2, sort_keys=True, ensure_ascii=False)
    sys.stdout.write("\n")


def short_id(oid: bytes | None) -> str:
    return oid.hex()[:SHORT] if oid else "-"


def human_size(n: float) -> str:
    """1536 -> '1.5 KiB' (binary units)."""
    if n < 1024:
        return f"{int(n)} B"
    for unit in ("KiB", "MiB", "GiB", "TiB", "PiB"):
        n /= 1024
        if n < 1024 or unit == "PiB":
            return f"{n:.1f} {unit}" if n < 100 else f"{n:.0f} {unit}"
    raise AssertionError("unreachable")


def format_time(t: float) -> str:
    """Local time, e.g. '2024-05-01 12:34:56 +0200'."""
    return datetime.datetime.fromtimestamp(t).astimezone().strftime("%Y-%m-%d %H:%M:%S %z")


def iso_time(t: float) -> str:
    return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).isoformat()


def format_metrics(metrics: dict[str, float]) -> str:
    return ", ".join(f"{k}={v:g}" for k, v in sorted(metrics.items()))


def _split_kv(item: str, option: str) -> tuple[str, str]:
    key, sep, value = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise InvalidArgument(f"{option} {item!r}: expected KEY=VALUE")
    return key, value


def parse_metrics(items: Iterable[str] | None) -> dict[str, float]:
    """Repeated ``--metric k=v`` -> {k: float}; a clear error if a value is not a finite number."""
    result: dict[str, float] = {}
    for item in items or ():
        key, value = _split_kv(item, "--metric")
        try:
            num = float(value)
        except ValueError:
            raise InvalidArgument(f"--metric {item!r}: {value.strip()!r} is not a number") from None
        if not math.isfinite(num):
            raise InvalidArgument(f"--metric {item!r}: value must be a finite number")
        if key in result:
            raise InvalidArgument(f"--metric {key!r} given more than once")
        result[key] = num
    return result


def parse_meta(items: Iterable[str] | None) -> dict[str, str]:
    """Repeated ``--meta k=v`` -> {k: v} (strings)."""
    result: dict[str, str] = {}
    for item in items or ():
        key, value = _split_kv(item, "--meta")
        if key in result:
            raise InvalidArgument(f"--meta {key!r} given more than once")
        result[key] = value
    return result


def worktree_paths(repo: Any, paths: Iterable[str]) -> list[str]:
    """Command-line paths -> absolute paths for ``Repository.add``/``rm``.

    Relative paths are relative to the current directory; when the current directory is
    outside the repository (``-R``/``CORALFS_REPO``), a relative path that does not exist
    there is taken relative to the repository root instead."""
    cwd = os.getcwd()
    root = os.path.abspath(repo.root)
    cwd_inside = os.path.commonpath([cwd, root]) == root
    result = []
    for p in paths:
        if "\x00" in p:
            raise InvalidArgument(f"invalid path (NUL): {p!r}")
        ap = os.path.abspath(p)
        if not os.path.isabs(p) and not cwd_inside and not os.path.lexists(ap):
            ap = os.path.join(root, p)
        result.append(ap)
    return result


# ------------------------------------------------------------------ progress
class _Progress:
    """``progress=`` callback for Repository.add/checkout: one updating line on stderr.

    Use as a context manager; on exit the line is cleared. Inactive (``None`` per file)
    unless stderr is a terminal and -q was not given."""

    INTERVAL = 0.1

    def __init__(self, active: bool, verb: str) -> None:
        self.active = active
        self.verb = verb
        self._shown = False
        self._last = 0.0

    def __call__(self, path: str) -> Callable[[int, int], None] | None:
        if not self.active:
            return None

        def update(done: int, total: int) -> None:
            now = time.monotonic()
            if done < total and now - self._last < self.INTERVAL:
                return
            self._last = now
            pct = 100 * done // total if total else 100
            name = path if len(path) <= 50 else "..." + path[-47:]
            line = f"{self.verb} {name}: {pct:3d}% ({human_size(done)} / {human_size(total)})"
            sys.stderr.write("\r\x1b[K" + line)
            sys.stderr.flush()
            self._shown = True

        return update

    def __enter__(self) -> _Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._shown:
            sys.stderr.write("\r\x1b[K")
            sys.stderr.flush()
            self._shown = False


def progress(args: argparse.Namespace, verb: str = "") -> _Progress:
    """A progress callback factory: active only on a terminal (stderr.isatty()) and without -q."""
    try:
        tty = sys.stderr.isatty()
    except (AttributeError, ValueError):
        tty = False
    return _Progress(tty and not getattr(args, "quiet", False), verb)


# ------------------------------------------------------------------ parser
def common_options() -> argparse.ArgumentParser:
    """Options accepted both before and after the subcommand (``parents=[common_options()]``)."""
    p = argparse.ArgumentParser(add_help=False)
    # SUPPRESS: a subcommand that does not see the option must not reset the global value
    p.add_argument("-R", "--repo", metavar="PATH", default=argparse.SUPPRESS,
                   help="repository to use (default: $CORALFS_REPO, else found from the current directory)")
    p.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS,
                   help="no progress or informational output")
    return p


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        sys.stderr.write(f"{PROG}: error: {message}\n")
        sys.exit(2)


class _SubParser(_Parser):
    """A subcommand parser: options and positionals may be intermixed
    (``coralfs tag v1 --metric acc=0.9 -m msg REV``), which plain argparse rejects for
    optional positionals that follow an option."""

    _intermixed = False

    def parse_known_args(self, args=None, namespace=None):  # type: ignore[override]
        if self._intermixed:  # the inner passes of parse_known_intermixed_args
            return super().parse_known_args(args, namespace)
        self._intermixed = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._intermixed = False


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="coralfs: git for model checkpoints.",
                     epilog="Revisions: HEAD, HEAD~2, HEAD^, branch or tag names, unique id prefixes; "
                            "files: REV:PATH.")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    parser.add_argument("-R", "--repo", metavar="PATH", default=None,
                        help="repository to use (default: $CORALFS_REPO, else found from the current directory)")
    parser.add_argument("-q", "--quiet", action="store_true", default=False,
                        help="no progress or informational output")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_SubParser)
    for name in COMMAND_MODULES:
        importlib.import_module(f"{__name__}.{name}").register(sub)
    return parser


# ------------------------------------------------------------------ main
def _error(message: str) -> None:
    message = " ".join(str(message).split("\n")).strip() or "error"
    sys.stderr.write(f"{PROG}: error: {message}\n")


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit code (the console script passes it to sys.exit)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version, usage errors
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    if getattr(args, "func", None) is None:
        parser.print_help(sys.stderr)
        return 2
    for stream in (sys.stdout, sys.stderr):  # a non-UTF-8 file name prints as its own bytes
        if hasattr(stream, "reconfigure"):
            try:
                stream.reconfigure(errors="surrogateescape")
            except (ValueError, OSError):
                pass
    repo = None
    try:
        if getattr(args, "needs_repo", True):
            from coralfs.repository import Repository

            repo = Repository(args.repo)
        rc = args.func(args, repo)
        sys.stdout.flush()
        return int(rc or 0)
    except CoralError as e:
        _error(str(e))
        return e.exit_code
    except KeyboardInterrupt:
        _error("interrupted")
        return 130
    except BrokenPipeError:  # e.g. `coralfs cat x | head`: the reader left, nothing to report
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        except (OSError, ValueError, AttributeError):
            pass
        return 141
    except Exception as e:
        if os.environ.get("CORALFS_DEBUG") == "1":
            import traceback

            traceback.print_exc()
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            where = f": {e.filename}" if e.filename else ""
            _error(f"{NoSpace.__doc__}{where} ({e.strerror})")
            return NoSpace.exit_code
        if isinstance(e, OSError) and e.strerror:
            _error(f"{e.strerror}: {e.filename}" if e.filename else e.strerror)
        else:
            _error(f"unexpected {type(e).__name__}: {e}" if str(e) else f"unexpected {type(e).__name__}")
        return 1
    finally:
        if repo is not None:
            try:
                repo.close()
            except Exception:
                pass


def run() -> None:
    """Entry point for ``python -m coralfs``."""
    sys.exit(main())
