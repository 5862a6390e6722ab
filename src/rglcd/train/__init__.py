"""``rglcd train``: the loop (:mod:`.loop`), its builders (:mod:`.build`), checkpoints and reports."""

from .build import check_engine
from .checkpoints import checkpoints, resolve_resume
from .errors import TrainingError
from .loop import run_training, train

__all__ = ["TrainingError", "check_engine", "checkpoints", "resolve_resume", "run_training", "train"]
