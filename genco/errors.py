"""The errors genco raises on purpose: a user or client mistake, never a bug.

Everything here derives from ``GencoError``, so the CLI can turn exactly these into a one-line
message with exit status 2 and let anything else (a bug) surface as a traceback. Each class also
derives from ``ValueError``: they are bad values, and callers that caught ``ValueError`` keep
working.
"""

from __future__ import annotations

from typing import Any


class GencoError(Exception):
    """Base of every expected genco error."""


class ContractError(GencoError, ValueError):
    """An input file, column, row or catalog that breaks the data contract."""


class UnknownIdError(ContractError, KeyError):
    """An ad or element id that is not in the catalog."""

    def __str__(self) -> str:  # the message, not KeyError's quoted repr
        return str(self.args[0]) if self.args else ""


class ConfigError(GencoError, ValueError):
    """A bad option: a config field, a command-line flag or a call argument out of range."""


class BundleError(GencoError, ValueError):
    """A model directory that is missing, incomplete, tampered with or of another format."""


class CatalogMismatchError(GencoError, ValueError):
    """A model bound to a catalog whose components or feature columns it was not trained on."""


class StoreError(GencoError, ValueError):
    """A model store misuse: a bad version id, a missing version, nothing to roll back to."""


class RequestError(GencoError, ValueError):
    """A client mistake: the message names the field; ``status`` is the HTTP status to send."""

    def __init__(self, field: str, message: str, status: int = 400) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.status = status

    def to_dict(self) -> dict[str, Any]:
        return {"error": {"status": self.status, "field": self.field, "message": str(self)}}


class NotFoundError(GencoError, FileNotFoundError):
    """A file, object, directory or bucket that does not exist; the message names the path.

    A ``FileNotFoundError`` rather than a ``ValueError``: it is the same failure as a missing
    local file, and callers that catch ``FileNotFoundError`` keep working on every backend.
    """


class StepError(GencoError, RuntimeError):
    """A pipeline step that failed; the message names the step, the error that ended it and
    the run's log. ``cause_type`` is that error's class when known: the CLI shows a bug in a
    step (a cause that is not an expected error) with the step's own ``traceback``."""

    def __init__(
        self,
        step: str,
        message: str,
        log_path: str,
        cause_type: type[BaseException] | None = None,
        traceback: str = "",
    ) -> None:
        super().__init__(message)
        self.step = step
        self.log_path = log_path
        self.cause_type = cause_type
        self.traceback = traceback
