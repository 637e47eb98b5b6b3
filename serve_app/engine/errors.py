"""Engine error types: recoverable request errors versus fatal engine failures."""

from __future__ import annotations


class EngineError(Exception):
    """Base class for every error the engine raises."""


class InvalidRequestError(EngineError, ValueError):
    """A request the engine cannot accept; the engine itself stays healthy.

    ``param`` names the offending field so the HTTP layer can report it.
    """

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class EngineOverloadedError(EngineError):
    """The waiting queue is full; the request was refused at once and may be retried."""


class EngineDeadError(EngineError):
    """The engine loop has failed; the replica must be replaced."""
