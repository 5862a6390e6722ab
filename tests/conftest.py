import os

# No run-time downloads: a hub id that is not cached must fail at once, not retry for a minute.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def teacher_dirs(tmp_path_factory):
    """Tiny SD-layout teachers saved with save_pretrained, one per prediction type."""
    from rglcd.tiny import save_tiny_pipeline

    root = tmp_path_factory.mktemp("teachers")
    return {
        kind: save_tiny_pipeline(root / kind, prediction_type=kind, seed=i)
        for i, kind in enumerate(("epsilon", "v_prediction"))
    }


@pytest.fixture(scope="session")
def epsilon_teacher_dir(teacher_dirs):
    return teacher_dirs["epsilon"]
