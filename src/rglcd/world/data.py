"""World data on disk: webdataset shards of rendered scenes, and the held-out evaluation prompts."""

from __future__ import annotations

import json
from pathlib import Path

from torch import Tensor
from tqdm.auto import tqdm

from ..data import write_shards
from .paths import EVAL_SEED, TEACHER_SEED
from .render import Scene, render, render_batch, rerender, scenes


def write_world_shards(
    out: str | Path, samples: int, seed: int = TEACHER_SEED, samples_per_shard: int = 1000
) -> list[Path]:
    """``samples`` rendered scenes as shards of png + txt (caption) + json (attributes)."""
    drawn = scenes(seed, samples)
    records = ((render(scene), scene.caption, scene.attributes()) for scene in tqdm(drawn, desc="world data"))
    return write_shards(records, Path(out), samples_per_shard=samples_per_shard, prefix="world")


def eval_scenes(count: int = 128, seed: int = EVAL_SEED) -> list[Scene]:
    """Held-out prompts: drawn from their own seed (the attribute space is small, so combinations recur)."""
    return scenes(seed, count)


def reference_images(drawn: list[Scene], seed: int = EVAL_SEED) -> Tensor:
    """Fresh renders of the prompts' scenes (new background and jitter) as [N, 3, 32, 32] in [0, 1]: the real
    images the generated ones are compared with (the FID analog)."""
    return render_batch([rerender(scene, seed + i) for i, scene in enumerate(drawn)]).float() / 255


def write_prompt_list(path: str | Path, drawn: list[Scene]) -> Path:
    """One JSON object per line: the caption and the attributes the judge checks."""
    path = Path(path)
    path.write_text("".join(json.dumps(scene.attributes()) + "\n" for scene in drawn))
    return path
