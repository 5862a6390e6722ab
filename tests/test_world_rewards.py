import json
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torchvision import transforms

import rglcd.world.paths as world_paths
from rglcd.rewards import available_rewards, build_reward
from rglcd.world.render import COLOURS, POSITION_PHRASES, SHAPES, render, render_batch, scenes
from rglcd.world.rewards import (
    CLIP_MEAN,
    CLIP_STD,
    WorldAesthetic,
    WorldAestheticConfig,
    WorldClip,
    WorldClipConfig,
    colourfulness_target,
    evaluate_world_aesthetic,
    evaluate_world_clip,
    swap_attribute,
    train_world_aesthetic,
    train_world_clip,
    vividness_jitter,
)

# Small architectures keep the file fast; the code paths are those of the defaults.
TINY_CLIP = WorldClipConfig(vision_layers=1, text_layers=1)
TINY_AESTHETIC = WorldAestheticConfig(width=8, depth=2)
NAMES = {"world-clip": "clip", "world-aesthetic": "aesthetic"}


def untrained(name: str, seed: int = 0):
    """A frozen random model: frozen like a loaded one, as attention takes another (equal to 1e-8) path otherwise."""
    torch.manual_seed(seed)
    model = WorldClip(config=TINY_CLIP) if name == "world-clip" else WorldAesthetic(config=TINY_AESTHETIC)
    return model.freeze()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Untrained models saved to folders: {name: (model, folder)}."""
    root = tmp_path_factory.mktemp("world-rewards")
    return {name: (model := untrained(name), model.save(root / name)) for name in NAMES}


def batch(count: int = 3, resolution: int = 32) -> tuple[torch.Tensor, list[str]]:
    drawn = scenes(5, count)
    pixels = np.stack([np.asarray(render(scene, resolution)) for scene in drawn])
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255, [scene.caption for scene in drawn]


def test_world_rewards_are_registered():
    assert {"world-clip", "world-aesthetic"} <= set(available_rewards())


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("resolution", [32, 64])
def test_contract_shape_gradients_and_frozen_weights(saved, name, resolution):
    reward = build_reward(name, weights=saved[name][1])
    assert not any(parameter.requires_grad for parameter in reward.parameters())
    assert not reward.training
    images, prompts = batch(3, resolution)
    images.requires_grad_(True)
    scores = reward(images, prompts)
    assert scores.shape == (3,)
    scores.sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0 and torch.isfinite(images.grad).all()


@pytest.mark.parametrize("name", NAMES)
def test_save_load_round_trip_gives_identical_scores(saved, name):
    model, folder = saved[name]
    images, prompts = batch(4)
    loaded = build_reward(name, weights=folder)
    with torch.no_grad():
        assert torch.equal(loaded(images, prompts), model(images, prompts))
        assert not torch.equal(untrained(name, seed=1)(images, prompts), loaded(images, prompts))


@pytest.mark.parametrize("name", NAMES)
def test_default_weights_come_from_the_cache_then_the_package(saved, name, tmp_path, monkeypatch):
    monkeypatch.setenv("RGLCD_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(world_paths, "shipped_dir", lambda: tmp_path / "shipped")
    with pytest.raises(FileNotFoundError, match="rglcd world rewards") as missing:
        build_reward(name)
    assert str(tmp_path / "cache" / "world" / NAMES[name]) in str(missing.value)
    assert str(tmp_path / "shipped" / NAMES[name]) in str(missing.value)

    images, prompts = batch(2)
    model = saved[name][0]
    model.save(tmp_path / "shipped" / NAMES[name])
    with torch.no_grad():
        assert torch.equal(build_reward(name)(images, prompts), model(images, prompts))
        other = untrained(name, seed=1)
        other.save(tmp_path / "cache" / "world" / NAMES[name])
        assert torch.equal(build_reward(name)(images, prompts), other(images, prompts))


@pytest.mark.parametrize("name", NAMES)
def test_loading_errors_name_the_folder_and_the_fix(saved, name, tmp_path):
    with pytest.raises(FileNotFoundError, match="rglcd world rewards") as missing:
        build_reward(name, weights=tmp_path / "nowhere")
    assert str(tmp_path / "nowhere") in str(missing.value)

    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="rglcd world rewards") as empty:
        build_reward(name, weights=tmp_path / "empty")
    assert str(tmp_path / "empty") in str(empty.value)

    other = next(other for other in NAMES if other != name)
    with pytest.raises(ValueError, match=f"not '{name}'"):
        build_reward(name, weights=saved[other][1])

    folder = saved[name][0].save(tmp_path / "resized")
    record = json.loads((folder / "config.json").read_text())
    record["config"]["vision_width" if name == "world-clip" else "width"] = 32  # the weights no longer fit
    (folder / "config.json").write_text(json.dumps(record))
    with pytest.raises(ValueError, match="rglcd world rewards") as mismatch:
        build_reward(name, weights=folder)
    assert str(folder) in str(mismatch.value)


# PIL resizes in two 1-D passes and rounds to uint8 after each; torch keeps floats. Measured on renders: at most
# 0.98/255 apart, 0.05/255 on average. We allow 1.5/255 and 0.15/255, in [0, 1] pixel units (before normalising).
@pytest.mark.parametrize(("name", "normalise"), [("world-clip", True), ("world-aesthetic", False)])
def test_preprocessing_matches_pil_and_torchvision(saved, name, normalise):
    image = render(scenes(11, 1)[0], resolution=64)
    resize = transforms.Resize(32, interpolation=transforms.InterpolationMode.BICUBIC)
    normalisation = [transforms.Normalize(CLIP_MEAN, CLIP_STD)] if normalise else []
    expected = transforms.Compose([resize, transforms.ToTensor(), *normalisation])(image)
    ours = saved[name][0].preprocess(transforms.functional.to_tensor(image)[None])[0]
    assert ours.shape == expected.shape == (3, 32, 32)
    pixel_units = torch.tensor(CLIP_STD).view(3, 1, 1) if normalise else 1.0
    difference = ((ours - expected) * pixel_units).abs()
    assert difference.max() < 1.5 / 255 and difference.mean() < 0.15 / 255


def test_world_clip_score_is_the_cosine_of_open_clip_embeddings(saved):
    import open_clip

    model = saved["world-clip"][0]
    images, prompts = batch(4)
    mean, std = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        image_features = model.clip.encode_image((images - mean) / std)
        text_features = model.clip.encode_text(open_clip.tokenize(prompts, context_length=32))
        cosine = F.cosine_similarity(image_features, text_features, dim=-1)
        assert torch.allclose(model(images, prompts), cosine, atol=1e-6)
        assert torch.allclose(model.logits(images, prompts), model.clip.logit_scale.exp() * cosine, atol=1e-5)


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {key: value.clone() for key, value in model.state_dict().items()}


@pytest.mark.parametrize(
    ("train", "kwargs"),
    [
        (train_world_clip, {"samples": 64, "steps": 16, "batch_size": 32, "config": TINY_CLIP}),
        (train_world_aesthetic, {"samples": 64, "steps": 40, "batch_size": 32, "config": TINY_AESTHETIC}),
    ],
)
def test_short_training_is_deterministic_and_lowers_the_loss(train, kwargs, tmp_path):
    runs = [
        train(tmp_path / name, seed=seed, progress=False, **kwargs) for name, seed in (("a", 3), ("b", 3), ("c", 4))
    ]
    first, again, other = (weights(run) for run in runs)
    assert all(torch.equal(first[key], again[key]) for key in first)
    assert not all(torch.equal(first[key], other[key]) for key in first)
    assert not any(parameter.requires_grad for parameter in runs[0].parameters())

    record = json.loads((tmp_path / "a" / "config.json").read_text())
    curve = record["training"]["loss_curve"]
    assert len(curve) == kwargs["steps"]
    assert np.mean(curve[-3:]) < 0.8 * np.mean(curve[:3])
    reloaded = (WorldClip if train is train_world_clip else WorldAesthetic)(tmp_path / "a").freeze()
    assert all(torch.equal(value, first[key]) for key, value in reloaded.state_dict().items())


def test_swapped_captions_change_exactly_one_attribute():
    rng = random.Random(0)
    vocabulary = {*COLOURS, *SHAPES, "small", "large"}
    seen = set()
    for scene in scenes(21, 300):
        caption, attribute = swap_attribute(scene, rng)
        seen.add(attribute)
        before, after = scene.caption.split(), caption.split()
        assert caption != scene.caption
        assert " a orange" not in f" {caption}" and " an " not in f" {caption}".replace(" an orange", "")
        if attribute in ("colour", "shape", "size"):
            changed = [(a, b) for a, b in zip(before, after, strict=True) if a != b and {a, b} != {"a", "an"}]
            assert len(changed) == 1 and set(changed[0]) <= vocabulary
        elif len(scene.objects) == 2:  # the two objects trade places
            assert sorted(before) == sorted(after)
        else:
            (shape,) = scene.objects
            assert not any(phrase in caption for phrase in POSITION_PHRASES[shape.position])
            assert caption.endswith(tuple(phrase for phrases in POSITION_PHRASES.values() for phrase in phrases))
    assert seen == {"colour", "shape", "size", "position"}


def test_evaluations_report_their_figures(saved):
    clip = evaluate_world_clip(saved["world-clip"][0], count=24)
    assert 0 <= clip["swap_accuracy"] <= 1 and -1 <= clip["mismatched"] <= 1
    aesthetic = evaluate_world_aesthetic(saved["world-aesthetic"][0], count=24, ascent_images=2, ascent_steps=3)
    assert aesthetic["score_after"] > aesthetic["score_before"]  # ascent ascends even an untrained scorer
    assert -1 <= aesthetic["correlation"] <= 1 and 0 <= aesthetic["high_frequency"] <= 1
    assert render_batch(scenes(0, 2)).dtype == torch.uint8


def test_the_evaluation_figures_are_the_scores_they_summarise(saved):
    """Each held-out figure recomputed from the rewards' own scores (their forward, one pair at a time where the
    evaluation batches embeddings) on the same scenes, in float64: world-clip's swap accuracy overall and per
    attribute, top-1 retrieval, matched and mismatched means; world-aesthetic's Pearson r with the true
    colourfulness and its scores before the ascent."""
    clip, count, seed = saved["world-clip"][0], 24, 7
    figures = evaluate_world_clip(clip, count=count, seed=seed)
    drawn = scenes(seed, count)
    rng = random.Random(seed)
    swaps = [swap_attribute(scene, rng) for scene in drawn]
    images = render_batch(drawn).float() / 255
    with torch.no_grad():
        captions = [scene.caption for scene in drawn]
        rows = [clip(images[i : i + 1].expand(count, -1, -1, -1), captions) for i in range(count)]
        scores = torch.stack(rows).double().numpy()  # [image, caption]
        swapped = clip(images, [caption for caption, _ in swaps]).double().numpy()
    wins = scores.diagonal() > swapped
    same = np.array([[a.objects == b.objects for b in drawn] for a in drawn])
    assert figures["swap_accuracy"] == pytest.approx(wins.mean())
    for attribute in ("colour", "shape", "size", "position"):
        chosen = np.array([name == attribute for _, name in swaps])
        assert figures[f"swap_accuracy_{attribute}"] == pytest.approx(wins[chosen].mean())
    assert figures["retrieval_top1"] == pytest.approx(same[np.arange(count), scores.argmax(axis=1)].mean())
    assert figures["matched"] == pytest.approx(scores.diagonal().mean(), abs=1e-6)
    assert figures["mismatched"] == pytest.approx(scores[~same].mean(), abs=1e-6)

    aesthetic = saved["world-aesthetic"][0]
    figures = evaluate_world_aesthetic(aesthetic, count=count, seed=seed, ascent_images=3, ascent_steps=1)
    pixels = render_batch(scenes(seed, count))
    with torch.no_grad():
        jittered = vividness_jitter(pixels, torch.Generator().manual_seed(seed))
        score, truth = aesthetic(jittered).double().numpy(), colourfulness_target(jittered).double().numpy()
        start = pixels[:3].float() / 255
        before, true_before = aesthetic(start).double().mean().item(), colourfulness_target(start).mean().item()
    pearson = ((score - score.mean()) * (truth - truth.mean())).sum() / (
        np.sqrt(((score - score.mean()) ** 2).sum() * ((truth - truth.mean()) ** 2).sum())
    )
    assert figures["correlation"] == pytest.approx(pearson, abs=1e-5)
    assert figures["score_before"] == pytest.approx(before, abs=1e-6)
    assert figures["true_before"] == pytest.approx(true_before, abs=1e-6)
