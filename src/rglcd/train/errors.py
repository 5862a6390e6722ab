"""The training package's error."""

from ..errors import RglcdError


class TrainingError(RglcdError, RuntimeError):
    """The run cannot go on, or cannot start; the message says what to change. E.g. the loss kept being NaN: no
    checkpoint is written of that state, and the message names the last healthy one to resume from (or says there
    is none)."""
