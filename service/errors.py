"""Expected failures of the entry points, turned into one clear line (and an HTTP status for the API).

Anything listed here is the user's input or environment (a missing index, a bad image, a wrong key, refused
credentials): the command prints one line on stderr and exits non-zero; ``-v`` adds the traceback. Anything
else is a bug and keeps its traceback.
"""
from __future__ import annotations

import logging
import sys
import traceback
from typing import Callable

from pipeline.errors import ConfigError
from storage.datasets import DatasetError
from storage.images import ImageError
from storage.lease import LeaseHeld, LeaseLost
from storage.run import NotAnIndexError
from storage.snapshot import SnapshotError
from storage.uri import StorageError, redact

log = logging.getLogger("indexer")


class UserError(ValueError):
    """A request the service cannot answer as asked (unknown method, malformed box...); the message says why."""

    status = 400


class NotFound(UserError):
    """The thing asked for does not exist (an image id, an index)."""

    status = 404


EXIT_USAGE = 2      # bad input: config, arguments, query
EXIT_FAILURE = 1    # the job ran and failed (a stage, the storage)
EXIT_BUSY = 3       # another job holds the output's lease

EXPECTED: tuple[type[BaseException], ...] = (UserError, ConfigError, ImageError, NotAnIndexError, SnapshotError,
                                             StorageError, DatasetError, FileNotFoundError, PermissionError,
                                             LeaseHeld, LeaseLost)


def describe(exc: BaseException) -> str:
    """One line for an expected failure (credentials redacted)."""
    if isinstance(exc, ImageError):
        text = f"not a usable image ({exc.reason}): {exc.detail}"
    elif isinstance(exc, ConfigError):
        text = f"invalid configuration: {exc}"
    elif isinstance(exc, FileNotFoundError) and not isinstance(exc, NotAnIndexError):
        text = str(exc) if not exc.filename else f"no such file or object: {exc.filename}"
    else:
        text = str(exc)
    return redact(" ".join(text.split()))


def exit_code(exc: BaseException) -> int:
    if isinstance(exc, LeaseHeld):
        return EXIT_BUSY
    return EXIT_USAGE if isinstance(exc, (UserError, ConfigError, ImageError, NotAnIndexError,
                                          FileNotFoundError)) else EXIT_FAILURE


def run_cli(main: Callable[[], int], verbose: bool, prog: str) -> int:
    """Run an entry point's body: expected failures become ``<prog>: error: <one line>`` on stderr."""
    try:
        return main()
    except EXPECTED as exc:
        if verbose:
            traceback.print_exc()
        print(f"{prog}: error: {describe(exc)}", file=sys.stderr)
        return exit_code(exc)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130


__all__ = ["UserError", "NotFound", "EXPECTED", "describe", "exit_code", "run_cli", "EXIT_USAGE", "EXIT_FAILURE"]
