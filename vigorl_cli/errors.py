"""User-facing exception types.

The library raises these and never exits; ``vigorl_cli.cli.main`` renders each as one red line with what to do next
(set ``VIGORL_DEBUG=1`` for the traceback). Per-sample problems are *not* exceptions: they are recorded as a
``failure_kind`` on the record they belong to, counted and reported.
"""

from __future__ import annotations


class VigorlError(Exception):
    """Base class: a problem the user can fix. ``hint`` says how."""

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.hint = hint


class RecipeError(VigorlError):
    """A recipe file or ``--set`` override is invalid (unknown key, wrong type, bad value)."""


class DataError(VigorlError):
    """A data file cannot be read at all (missing file, not JSON/JSONL, unknown format)."""


class ModelError(VigorlError):
    """A model or processor cannot be loaded."""


class EngineError(VigorlError):
    """A generation engine cannot be created or failed as a whole (not a per-sample failure)."""


class CheckpointError(VigorlError):
    """A checkpoint is missing, incomplete or inconsistent."""
