"""``rglcd train``: the loop (:mod:`.loop`), its builders (:mod:`.build`), checkpoints and reports."""

from .build import check_engine
from .checkpoints import checkpoints, resolve_resume
from .errors import TrainingError
from .loop import distil, train

__all__ = ["TrainingError", "check_engine", "checkpoints", "distil", "resolve_resume", "train"]
