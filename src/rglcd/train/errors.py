"""The training package's error."""

from ..errors import RglcdError


class TrainingError(RglcdError, RuntimeError):
    """The run cannot go on, or cannot start (e.g. the loss kept being NaN); the message says what to change."""
