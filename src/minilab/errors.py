"""User-facing errors.

Anything the user can fix (a bad config key, a missing file, a name with `..` in it) is raised
as a `MinilabError`; the CLI prints its message on one line and exits with its code, never a
traceback. Programming errors stay ordinary exceptions so they do show a traceback.
"""

from __future__ import annotations


class MinilabError(Exception):
    """An error the user can fix. `exit_code` is what the CLI exits with."""

    exit_code = 1

    def __init__(self, message: str, exit_code: int | None = None):
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class ConfigError(MinilabError):
    """A config file or override is wrong: unknown key, wrong type, impossible combination."""

    exit_code = 2

    def __init__(self, message: str, *, source: str | None = None, key: str | None = None):
        where = ": ".join(p for p in (source, f"key '{key}'" if key else None) if p)
        super().__init__(f"{where}: {message}" if where else message)
        self.source, self.key = source, key


class TokenizerMismatchError(MinilabError):
    """Data packed with one tokenizer handed to a stage using another (the blocking error)."""

    exit_code = 3
