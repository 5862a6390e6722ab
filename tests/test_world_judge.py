import json
from dataclasses import replace

import pytest
import torch

from rglcd.world.judge import (
    ATTRIBUTES,
    COLOUR_NAMES,
    CONFIG_FILE,
    HEADS,
    WEIGHTS_FILE,
    Judge,
    augment,
    judge_loss,
    judge_targets,
    pair_index,
    render_batch,
    train_judge,
)
from rglcd.world.paths import EVAL_SEED, shipped_dir
from rglcd.world.render import SHAPES, Scene, Shape, scenes

RED_CIRCLE = Shape("red", "circle", "large", "left")  # pair 0; size 1, position 0
BLUE_SQUARE = Shape("blue", "square", "medium", "left")  # pair 2·4 + 1 = 9
GREEN_DIAMOND = Shape("green", "diamond", "medium", "right")  # pair 1·4 + 3 = 7
ONE = Scene((RED_CIRCLE,), "a large red circle on the left", 0, ((0.0, 0.0),))
TWO = Scene((BLUE_SQUARE, GREEN_DIAMOND), "a blue square next to a green diamond", 0, ((0.0, 0.0),) * 2)


def trained_on_random_batch(judge: Judge) -> Judge:
    """Move the BatchNorm running statistics away from their defaults, so saving must carry them."""
    judge.train()
    with torch.no_grad():
        judge(torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(0)))
    return judge.eval()


def test_pair_index_follows_colour_then_shape_order():
    assert pair_index(RED_CIRCLE) == 0
    assert pair_index(BLUE_SQUARE) == 9
    assert pair_index(GREEN_DIAMOND) == 7
    assert pair_index(Shape("orange", "diamond", "small", "top")) == HEADS["pairs"] - 1


@pytest.mark.parametrize("feature_dim", [64, 32])
def test_head_and_feature_shapes(feature_dim):
    judge = Judge(feature_dim=feature_dim).eval()
    images = torch.rand(3, 3, 32, 32)
    logits = judge(images)
    assert {name: tuple(value.shape) for name, value in logits.items()} == {
        "pairs": (3, 24),
        "count": (3, 2),
        "size": (3, 2),
        "position": (3, 5),
    }
    assert judge.features(images).shape == (3, feature_dim)
    assert judge.feature_dim == feature_dim


def test_save_load_round_trip_gives_identical_outputs(tmp_path):
    torch.manual_seed(0)
    judge = trained_on_random_batch(Judge(feature_dim=32, widths=(16, 24)))
    judge.save(tmp_path / "judge", training={"note": "test"})
    loaded = Judge.load(tmp_path / "judge")
    assert not loaded.training
    assert loaded.config == {"feature_dim": 32, "widths": [16, 24]}
    assert json.loads((tmp_path / "judge" / CONFIG_FILE).read_text())["training"] == {"note": "test"}
    images = torch.rand(4, 3, 32, 32)
    for name, value in judge(images).items():
        assert torch.equal(loaded(images)[name], value), name
    assert torch.equal(loaded.features(images), judge.features(images))


def test_load_fails_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        Judge.load(tmp_path / "nowhere")
    folder = Judge().save(tmp_path / "judge")
    (folder / WEIGHTS_FILE).unlink()
    with pytest.raises(FileNotFoundError, match=f"judge.*{WEIGHTS_FILE}"):
        Judge.load(folder)

    Judge().save(folder)
    (folder / CONFIG_FILE).write_text("{not json")
    with pytest.raises(ValueError, match=CONFIG_FILE):
        Judge.load(folder)
    (folder / CONFIG_FILE).write_text(json.dumps({"widths": [32, 48]}))
    with pytest.raises(ValueError, match="feature_dim"):
        Judge.load(folder)
    (folder / CONFIG_FILE).write_text(json.dumps({"feature_dim": 64, "widths": [16, 48]}))  # weights are 32, 48
    with pytest.raises(ValueError, match="does not match"):
        Judge.load(folder)


def stub_logits(monkeypatch, judge: Judge, **rows: list[list[float]]) -> None:
    """Make ``judge`` return the given logits (one row per image), whatever the images."""
    logits = {name: torch.tensor(rows[name], dtype=torch.float32) for name in HEADS}
    monkeypatch.setattr(judge, "forward", lambda images: logits)


def one_hot(size: int, index: int, value: float = 5.0) -> list[float]:
    row = [-5.0] * size
    row[index] = value
    return row


def pairs_row(logits: dict[int, float]) -> list[float]:
    """Pair logits: the given ones, and -5 (absent) everywhere else."""
    return [logits.get(index, -5.0) for index in range(HEADS["pairs"])]


@pytest.mark.parametrize(
    "pairs,count,size,position,expected",
    [
        ({0: 5.0}, 0, 1, 0, 1.0),
        ({0: 5.0}, 0, 1, 3, 0.75),  # wrong position only
        ({0: 5.0}, 0, 0, 0, 0.75),  # wrong size only
        ({0: 5.0}, 1, 1, 0, 0.75),  # sees two objects
        ({5: 5.0}, 0, 1, 0, 0.75),  # wrong pair
        ({0: 5.0, 5: 6.0}, 0, 1, 0, 0.75),  # present but not the top pair
        ({0: -0.1}, 0, 1, 0, 0.75),  # top pair but sigmoid < 0.5
        ({5: 5.0}, 1, 0, 4, 0.0),
    ],
)
def test_attribute_scores_one_object(monkeypatch, pairs, count, size, position, expected):
    judge = Judge().eval()
    stub_logits(
        monkeypatch,
        judge,
        pairs=[pairs_row(pairs)],
        count=[one_hot(2, count)],
        size=[one_hot(2, size)],
        position=[one_hot(5, position)],
    )
    assert judge.attribute_scores(torch.zeros(1, 3, 32, 32), [ONE]).tolist() == [pytest.approx(expected)]


@pytest.mark.parametrize(
    "present,count,expected",
    [
        ((9, 7), 1, 1.0),
        ((9, 7, 0), 1, 1.0),  # an extra pair is not checked
        ((9,), 1, 2 / 3),  # the green diamond is missing
        ((9, 7), 0, 2 / 3),  # sees one object
        ((), 0, 0.0),
    ],
)
def test_attribute_scores_two_objects(monkeypatch, present, count, expected):
    judge = Judge().eval()
    rows = {"count": [one_hot(2, count)], "size": [one_hot(2, 0)], "position": [one_hot(5, 0)]}
    stub_logits(monkeypatch, judge, pairs=[pairs_row(dict.fromkeys(present, 5.0))], **rows)
    assert judge.attribute_scores(torch.zeros(1, 3, 32, 32), [TWO]).tolist() == [pytest.approx(expected)]


def test_attribute_scores_are_per_image(monkeypatch):
    judge = Judge().eval()
    stub_logits(
        monkeypatch,
        judge,
        pairs=[pairs_row({0: 5.0}), pairs_row({9: 5.0})],
        count=[one_hot(2, 0), one_hot(2, 1)],
        size=[one_hot(2, 1), one_hot(2, 0)],
        position=[one_hot(5, 2), one_hot(5, 0)],
    )
    scores = judge.attribute_scores(torch.zeros(2, 3, 32, 32), [ONE, TWO])
    assert scores.tolist() == [pytest.approx(0.75), pytest.approx(2 / 3)]
    with pytest.raises(ValueError, match="2 images but 1 scenes"):
        judge.attribute_scores(torch.zeros(2, 3, 32, 32), [ONE])


def test_targets_follow_the_scenes():
    targets = judge_targets([ONE, TWO])
    assert targets["pairs"].sum(1).tolist() == [1.0, 2.0]
    assert targets["pairs"][1, [9, 7]].tolist() == [1.0, 1.0]
    assert targets["count"].tolist() == [0, 1]
    assert targets["size"].tolist() == [1, -100]  # two-object scenes teach neither size nor position
    assert targets["position"].tolist() == [0, -100]


def test_augment_is_seeded_bounded_and_mild():
    images = render_batch(scenes(0, 16))
    first = augment(images, torch.Generator().manual_seed(1))
    assert torch.equal(first, augment(images, torch.Generator().manual_seed(1)))
    assert not torch.equal(first, augment(images, torch.Generator().manual_seed(2)))
    assert first.min() >= 0 and first.max() <= 1
    assert (first - images.float() / 255).abs().mean() < 0.15


def test_short_training_lowers_the_loss_and_is_deterministic(tmp_path):
    settings = {"samples": 256, "steps": 30, "batch_size": 32, "seed": 5, "progress": False}
    judge = train_judge(tmp_path / "a", **settings)
    again = train_judge(tmp_path / "b", **settings)
    assert not judge.training
    weights, weights_again = judge.state_dict(), again.state_dict()
    assert all(torch.equal(value, weights_again[name]) for name, value in weights.items())

    scene_list = scenes(5, 256)
    images, targets = render_batch(scene_list).float() / 255, judge_targets(scene_list)
    torch.manual_seed(5)
    untrained = Judge().eval()  # the same initial weights as the runs above
    with torch.no_grad():
        before, after = judge_loss(untrained(images), targets), judge_loss(judge(images), targets)
    assert after < 0.7 * before

    loaded = Judge.load(tmp_path / "a")
    assert torch.equal(loaded.features(images), judge.features(images))
    assert json.loads((tmp_path / "a" / CONFIG_FILE).read_text())["training"]["steps"] == 30


def test_attribute_checks_per_attribute_and_exact_match(monkeypatch):
    judge = Judge().eval()
    stub_logits(
        monkeypatch,
        judge,
        pairs=[pairs_row({1: 5.0}), pairs_row({0: 5.0}), pairs_row({9: 5.0})],  # a red square; a red circle; one pair
        count=[one_hot(2, 0), one_hot(2, 0), one_hot(2, 1)],
        size=[one_hot(2, 1), one_hot(2, 1), one_hot(2, 0)],
        position=[one_hot(5, 0), one_hot(5, 3), one_hot(5, 0)],
    )
    checks = judge.attribute_checks(torch.zeros(3, 3, 32, 32), [ONE, ONE, TWO])
    nan = float("nan")
    expected = {
        "colour": [1.0, 1.0, nan], "shape": [0.0, 1.0, nan], "size": [1.0, 1.0, nan], "position": [1.0, 0.0, nan],
        "left": [nan, nan, 1.0], "right": [nan, nan, 0.0], "exact": [0.0, 0.0, 0.0], "score": [0.75, 0.75, 2 / 3],
    }  # fmt: skip
    assert list(checks) == [*ATTRIBUTES, "exact", "score"]
    for name, values in expected.items():
        torch.testing.assert_close(checks[name], torch.tensor(values), equal_nan=True, msg=name)
    torch.testing.assert_close(judge.attribute_scores(torch.zeros(3, 3, 32, 32), [ONE, ONE, TWO]), checks["score"])


OPPOSITE = {"left": "right", "right": "left", "top": "bottom", "bottom": "top", "center": "left"}


def wrong(scene: Scene, attribute: str, index: int = 0) -> Scene:
    """The scene rendered with one attribute of object ``index`` changed (what the judge checks it against is the
    original scene): the next colour or shape, the opposite place, or for two shapes their places swapped."""
    objects = list(scene.objects)
    shape = objects[index]
    if attribute == "swap":
        objects = [replace(objects[0], position=objects[1].position), replace(objects[1], position=objects[0].position)]
    elif attribute == "colour":
        objects[index] = replace(shape, colour=COLOUR_NAMES[(COLOUR_NAMES.index(shape.colour) + 1) % len(COLOUR_NAMES)])
    elif attribute == "shape":
        objects[index] = replace(shape, shape=SHAPES[(SHAPES.index(shape.shape) + 1) % len(SHAPES)])
    else:
        objects[index] = replace(shape, position=OPPOSITE[shape.position])
    return replace(scene, objects=tuple(objects))


def test_the_shipped_judge_on_fresh_and_deliberately_wrong_renders():
    """Fresh renders: every attribute found almost always. A wrong colour, shape or place falls where it should."""
    judge = Judge.load(shipped_dir() / "judge").eval()
    drawn = scenes(EVAL_SEED + 1, 400)
    single = [scene for scene in drawn if len(scene.objects) == 1]
    pairs = [scene for scene in drawn if len(scene.objects) == 2 and scene.objects[0].colour != scene.objects[1].colour]

    def accuracy(rendered: list[Scene], checked: list[Scene]) -> dict[str, float]:
        images = render_batch(rendered).float() / 255
        checks = judge.attribute_checks(images, checked)
        return {name: float(values.nanmean()) for name, values in checks.items()}

    fresh = accuracy(single + pairs, single + pairs)
    assert min(fresh[name] for name in ATTRIBUTES) >= 0.9 and fresh["exact"] >= 0.85, fresh
    for attribute in ("colour", "shape", "position"):
        changed = accuracy([wrong(scene, attribute) for scene in single], single)
        assert changed[attribute] <= 0.15 and changed["exact"] <= 0.15, (attribute, changed)
        kept = [name for name in ("colour", "shape", "size", "position") if name != attribute]
        assert min(changed[name] for name in kept) >= 0.8, (attribute, changed)  # the others stay found
    left_wrong = accuracy([wrong(scene, "colour", index=0) for scene in pairs], pairs)  # objects[0] is on the left
    assert left_wrong["left"] <= 0.15 and left_wrong["right"] >= 0.85, left_wrong
    # Swapped places: both pairs are still there, and the judge does not locate two shapes (its known limit).
    swapped = accuracy([wrong(scene, "swap") for scene in pairs], pairs)
    assert swapped["left"] >= 0.85 and swapped["right"] >= 0.85, swapped


def test_the_judge_metrics_are_built_on_the_eval_device(tiny_world_cache, monkeypatch):
    """The judge (metric, attributes, judge-feature FID) sits where `rglcd eval --device` sends the images."""
    from rglcd.eval_command import FID_FEATURES, EvalSettings, MetricRequest, build_metrics
    from rglcd.prompts import load_prompts
    from rglcd.world import plugin

    monkeypatch.setenv("RGLCD_CACHE", str(tiny_world_cache))
    meta = torch.device("meta")
    assert {param.device for param in plugin.world_judge(meta).parameters()} == {meta}
    judged_on, real_judge = [], plugin.world_judge
    monkeypatch.setattr(plugin, "world_judge", lambda device: judged_on.append(device) or real_judge(device))
    monkeypatch.setattr(plugin, "FrechetDistance", lambda *args, **kwargs: judged_on.append(kwargs["device"]))
    prompts, settings = load_prompts("world:4"), EvalSettings(models=[], device="meta")
    build_metrics(["judge", "judge-attributes"], prompts, settings)
    FID_FEATURES["world-judge"](MetricRequest(prompts, settings, meta))
    assert judged_on == [meta, meta, meta, meta]
