"""The miniature world as an rglcd plugin (entry point ``rglcd.plugins: world``): its rewards, prompt set, judge metric
and judge-feature FID, registered through the registries any plugin uses (:mod:`rglcd.plugins`)."""

from __future__ import annotations

import functools

import torch

from ..eval_command import FID_FEATURES, EvalError, MetricRequest, register_metric
from ..evaluate import Scorers
from ..fid import FeatureExtractor, FrechetDistance
from ..prompts import Prompt, PromptSetError, register_prompt_set
from . import rewards  # noqa: F401  (registers world-clip and world-aesthetic)
from .data import eval_scenes, reference_images
from .judge import ATTRIBUTES, Judge, train_judge
from .paths import world_asset
from .render import Scene

WORLD_PROMPTS = 64  # the default number of held-out scenes
WORLD_LCM_GUIDANCE = 6.0  # the world students' training range is w ∈ [2, 8]; 6.0 is w = 5


@register_prompt_set(
    "world", metrics=("world-clip", "judge", "fid", "hf_ratio"), lcm_guidance=WORLD_LCM_GUIDANCE,
    fid_features="world-judge",
)  # fmt: skip
def world_prompts(count: str) -> list[Prompt]:
    """``world`` / ``world:N``: the first N (default 64) held-out scenes; the record is the scene, for the judge, and
    the group is "one shape" or "two shapes"."""
    if count and not (count.isdigit() and int(count) > 0):
        raise PromptSetError(f"world:N needs a positive number of prompts, not {count!r}")
    scenes = eval_scenes(int(count) if count else WORLD_PROMPTS)
    return [
        Prompt(scene.caption, group="one shape" if len(scene.objects) == 1 else "two shapes", record=scene)
        for scene in scenes
    ]


@functools.cache
def world_judge(device: torch.device) -> Judge:
    """The judge on ``device`` (eval's: the images it reads arrive there), for the judge metric and the
    judge-feature FID."""
    return Judge.load(world_asset("judge", train_judge)).to(device)


def _scenes(request: MetricRequest, needs: str) -> list[Scene]:
    scenes = [prompt.record for prompt in request.prompts]
    if not all(isinstance(scene, Scene) for scene in scenes):
        raise EvalError(f"{needs} needs the world prompts (--prompts world)")
    return scenes


@register_metric(
    "judge", "the miniature's judge: fraction of the prompt's attributes found, and whether all are (world prompts)"
)
def _judge_accuracy(scorers: Scorers, request: MetricRequest) -> None:
    _scenes(request, "the judge metric")
    judge = world_judge(request.device)
    scorers.per_image["judge_accuracy"] = lambda images, texts, records: judge.attribute_scores(images, records)
    scorers.per_image["judge_exact"] = lambda images, texts, records: judge.attribute_checks(images, records)["exact"]


@register_metric(
    "judge-attributes", "the judge's accuracy per attribute: colour, shape, size, position; left, right of two shapes"
)
def _judge_attributes(scorers: Scorers, request: MetricRequest) -> None:
    _scenes(request, "the judge-attributes metric")
    judge = world_judge(request.device)
    for name in ATTRIBUTES:  # NaN where a prompt has no such attribute: averaged over the prompts that have it
        scorers.per_image[f"judge_{name}"] = lambda images, texts, records, name=name: judge.attribute_checks(
            images, records
        )[name]


@FID_FEATURES.register("world-judge")
def _judge_features(request: MetricRequest) -> FrechetDistance:
    """The judge's features of fresh renders of the prompts' scenes."""
    size = request.settings.fid_size
    if size is not None and size % 2:  # the judge reads pixels in 2×2 blocks
        raise EvalError(f"--fid-size {size}: the world judge's features need an even size")
    references = reference_images(_scenes(request, "--fid-features world-judge"))
    judge, batch_size = world_judge(request.device), request.settings.batch_size
    batches = (references[i : i + batch_size] for i in range(0, len(references), batch_size))
    extractor = FeatureExtractor(judge.features, judge.feature_dim)
    return FrechetDistance(extractor, batches, size=request.settings.fid_size, device=request.device)
