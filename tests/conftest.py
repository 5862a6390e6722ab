import os
import random

# No run-time downloads: a hub id that is not cached must fail at once, not retry for a minute.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
# One thread per process, the rglcd processes tests start included: under `pytest -n 2` two workers share two cores,
# and a child using both cores beside the other worker slows both several times over (threads waiting on threads).
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import numpy
import pytest
import torch
from hypothesis import HealthCheck, settings

# The fuzz test's (tests/test_fuzz.py) profiles, registered before hypothesis reads --hypothesis-profile: "ci" by
# default (bounded and derandomised: the same examples every run), "thorough" for a longer local run.
settings.register_profile(
    "ci", max_examples=12, deadline=None, derandomize=True, database=None, print_blob=False,
    suppress_health_check=list(HealthCheck),
)  # fmt: skip
settings.register_profile(
    "thorough", max_examples=300, deadline=None, database=None, print_blob=False,
    suppress_health_check=list(HealthCheck),
)  # fmt: skip
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def same_random_state():
    """Every test starts from the same random state, whatever ran before it in its process (pytest-randomly shuffles
    the order, xdist the processes): a draw a test does not seed itself is still the same draw in every run."""
    random.seed(0)
    numpy.random.seed(0)
    torch.manual_seed(0)


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


@pytest.fixture(scope="session")
def tiny_world_cache(tmp_path_factory):
    """An RGLCD_CACHE with every world asset trained for two steps: real files, meaningless weights."""
    from rglcd.world.data import write_world_shards
    from rglcd.world.judge import train_judge
    from rglcd.world.rewards import train_world_aesthetic, train_world_clip
    from rglcd.world.teacher import TeacherRecipe, train_world_teacher

    cache = tmp_path_factory.mktemp("cache")
    world = cache / "world"
    write_world_shards(world / "data", 128)
    train_world_teacher(world / "teacher", TeacherRecipe(samples=64, vae_steps=2, unet_steps=2), progress=False)
    train_world_clip(world / "clip", samples=64, steps=2, progress=False)
    train_world_aesthetic(world / "aesthetic", samples=64, steps=2, progress=False)
    train_judge(world / "judge", samples=64, steps=2, progress=False)
    return cache
