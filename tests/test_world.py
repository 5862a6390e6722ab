"""The miniature world: renderer, world data, the world teacher, and every `rglcd world` command on tiny sizes."""

import json

import numpy as np
import pytest
import torch

from rglcd.world.render import COLOURS, POSITION_PHRASES, SHAPES, render, rerender, scenes

from .test_cli import run_main


def test_renderer_is_deterministic_by_seed():
    first, second, other = scenes(5, 40), scenes(5, 40), scenes(6, 40)
    assert first == second and first != other
    assert all(render(a).tobytes() == render(b).tobytes() for a, b in zip(first, second, strict=True))


def test_captions_name_every_attribute():
    for scene in scenes(11, 300):
        caption = scene.caption
        for shape in scene.objects:
            assert shape.colour in caption and shape.shape in caption
        if len(scene.objects) == 1:
            (shape,) = scene.objects
            assert shape.size in caption
            assert any(phrase in caption for phrase in POSITION_PHRASES[shape.position])
        else:
            left, right = scene.objects
            assert caption.index(left.colour) < caption.index(right.colour)  # the left shape is named first
        assert " a orange" not in f" {caption}"


def test_scenes_cover_the_attribute_space_and_render_antialiased():
    drawn = scenes(3, 2000)
    assert {shape.colour for scene in drawn for shape in scene.objects} == set(COLOURS)
    assert {shape.shape for scene in drawn for shape in scene.objects} == set(SHAPES)
    assert 0.2 < np.mean([len(scene.objects) == 2 for scene in drawn]) < 0.4
    image = np.asarray(render(drawn[0]))
    assert image.shape == (32, 32, 3)
    colours_present = len(np.unique(image.reshape(-1, 3), axis=0))
    assert colours_present > 3  # background, fill, and blended edge pixels


def test_the_shape_is_drawn_where_the_caption_says():
    for scene in scenes(21, 200):
        if len(scene.objects) != 1 or scene.objects[0].position not in ("left", "right"):
            continue
        image = np.asarray(render(scene)).astype(float)
        background = image[0, 0] if scene.objects[0].position == "right" else image[0, -1]
        changed = np.abs(image - background).sum(axis=2) > 30
        columns = np.nonzero(changed.any(axis=0))[0]
        centre = columns.mean()
        assert (centre < 16) == (scene.objects[0].position == "left")


def test_rerender_keeps_the_prompt():
    scene = scenes(1, 1)[0]
    again = rerender(scene, 99)
    assert again.caption == scene.caption and again.objects == scene.objects


def world(*args):
    """``rglcd world ARGS`` in this process (the CLI's entry point; the README test runs commands in new ones)."""
    return run_main("world", *args)


def test_world_data_command_writes_readable_shards(tmp_path):
    from rglcd.data import TrainStream

    world("data", "--out", tmp_path, "--samples", "30", "--eval-prompts", "5")
    assert sorted(p.name for p in tmp_path.glob("*.tar")) == ["world-000000.tar"]
    prompts = [json.loads(line) for line in (tmp_path / "eval_prompts.jsonl").read_text().splitlines()]
    assert len(prompts) == 5 and all(prompt["objects"] and prompt["caption"] for prompt in prompts)
    batch = next(iter(TrainStream(str(tmp_path), resolution=32, batch_size=30)))
    assert batch["pixel_values"].shape == (30, 3, 32, 32)
    assert sorted(batch["captions"]) == sorted(scene.caption for scene in scenes(0, 30))


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_world_teacher_command_saves_a_loadable_sd_pipeline(tmp_path, prediction_type):
    from diffusers import StableDiffusionPipeline

    from rglcd.models import load_teacher

    out = tmp_path / "teacher"
    world("teacher", "--out", out, "--samples", "64", "--vae-steps", "2", "--unet-steps", "2",
          "--prediction-type", prediction_type)  # fmt: skip
    teacher = load_teacher(out)
    assert teacher.schedule.prediction_type == prediction_type
    assert len(teacher.tokenizer) == 49408  # the full CLIP BPE vocabulary
    assert teacher.vae.config.scaling_factor != 0.18215  # measured on the world's latents
    assert isinstance(StableDiffusionPipeline.from_pretrained(out), StableDiffusionPipeline)
    assert json.loads((out / "recipe.json").read_text())["unet_steps"] == 2


def test_world_rewards_and_judge_commands(tmp_path):
    from rglcd.rewards import build_reward
    from rglcd.world.judge import Judge

    world("rewards", "--out", tmp_path, "--samples", "64", "--steps", "2")
    world("judge", "--out", tmp_path / "judge", "--samples", "64", "--steps", "2")
    for name in ("clip", "aesthetic"):
        reward = build_reward(f"world-{name}", weights=tmp_path / name)
        assert reward(torch.rand(2, 3, 32, 32), ["a red circle", "x"]).shape == (2,)
    assert Judge.load(tmp_path / "judge").feature_dim > 0
