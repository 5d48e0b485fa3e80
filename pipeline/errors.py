"""Typed errors.

Every problem a user can cause (bad input, missing key, unwritable folder, a 401) is raised as a
`ReidPromptError` subclass with a message that is already one readable line; the CLI edge prints
`error: <message>` and exits non-zero, never a traceback. Per-image problems are `ImageError` and never
stop a run: the image is recorded in errors.csv with `reason`.
"""

from __future__ import annotations


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


class ImageError(Exception):
    """One image cannot be sent. `reason` is a short code written to errors.csv."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
