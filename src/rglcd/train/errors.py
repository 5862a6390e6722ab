"""The training package's error."""


class TrainingError(RuntimeError):
    """The run cannot go on (e.g. the loss kept being NaN); a checkpoint was written first."""
