"""Typed errors.

Every problem a user can cause (bad input, missing key, unwritable folder, a 401) is raised as a
`ReidPromptError` subclass with a message that is already one readable line; the CLI edge prints
`error: <message>` and exits non-zero, never a traceback. Per-image problems are `ImageError` and never
stop a run: the image is recorded in errors.csv with `reason`.
"""

from __future__ import annotations

# Exit codes a script can use (README, `run --help`). One table, read by the CLI edge.
EXIT_DONE = 0  # everything asked for is done
EXIT_SOME_FAILED = 1  # the run finished but some items failed (they are in errors.csv)
EXIT_BAD_INPUT = 2  # bad input or usage, a locked folder, refused changes: nothing was sent
EXIT_SERVER_STOPPED = 3  # the server or API stopped the run: key, quota, unknown model, unreachable
EXIT_BUDGET = 4  # stopped by --max-cost
EXIT_INTERRUPTED = 130  # Ctrl-C, SIGTERM

EXIT_MEANINGS = {
    EXIT_DONE: "done",
    EXIT_SOME_FAILED: "some items failed (see errors.csv)",
    EXIT_BAD_INPUT: "bad input, nothing sent",
    EXIT_SERVER_STOPPED: "the server stopped the run",
    EXIT_BUDGET: "budget reached",
    EXIT_INTERRUPTED: "interrupted",
}


def exit_code_for(state: str, failed: int, fatal: bool, held: int = 0) -> int:
    """The exit code of a run that got going: from how it ended and what is left undone.

    `held`: answers that could not be written to the folder's CSV files and went to a pending file
    instead (merged on the next start): the run did not finish what it was asked, so not 0.
    """
    if fatal or state == "failed":
        return EXIT_SERVER_STOPPED
    if state == "interrupted":
        return EXIT_INTERRUPTED
    if state == "budget":
        return EXIT_BUDGET
    if failed or held:
        return EXIT_SOME_FAILED
    return EXIT_DONE


class ReidPromptError(Exception):
    """A problem reported to the user as one line at the CLI edge (exit code `exit_code`)."""

    exit_code: int = 2


class InputError(ReidPromptError):
    """Bad input: a dataset root, index, prompt file or option the user gave."""


class IndexFormatError(InputError):
    """The index file cannot be parsed, has duplicate IDs, or points outside the image root."""


class PromptError(InputError):
    """A prompt file is missing, unreadable or empty."""


class ConfigError(ReidPromptError):
    """The environment is not fit to run: no API key, unwritable output folder, bad option combination."""


class OutputError(ReidPromptError):
    """An output file exists but cannot be used (wrong columns, unreadable)."""


class FatalAPIError(ReidPromptError):
    """The API said something that makes every further request pointless (401, 403, unknown model).

    Raised from the worker pool; the run stops, the writer flushes what is done, the CLI prints one line.
    """

    exit_code = 3


class ServerUnreachableError(FatalAPIError):
    """The server could not be reached at all (refused, host not found, TLS): before its first answer, or
    for longer than --outage-timeout. Exit 3, like any stop by the server."""


class ImageError(Exception):
    """One image cannot be sent. `reason` is a short code written to errors.csv."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def first_line(exc: BaseException) -> str:
    """An exception's message cut to its first line (its type's name if it says nothing): what a warning or
    a one-line error quotes of a library's multi-line message."""
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
