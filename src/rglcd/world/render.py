"""A deterministic procedural renderer of captioned RGB images: one or two shapes on a plain background.

One shape has a colour, a kind, a size and a position ("a large red circle on the left"); two shapes stand
left and right ("a blue square on the left and a yellow triangle on the right"). Shapes are drawn at 4× and
box-filtered down, so edges are anti-aliased. Everything is a function of an integer seed.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw

RESOLUTION = 32
SUPERSAMPLING = 4
COLOURS = {
    "red": (215, 40, 40),
    "green": (40, 165, 60),
    "blue": (40, 80, 215),
    "yellow": (235, 205, 35),
    "purple": (140, 55, 185),
    "orange": (240, 135, 30),
}
SHAPES = ("circle", "square", "triangle", "diamond")
SIZES = {"small": 4.5, "large": 8.0}  # radius in pixels at 32×32
POSITIONS = {"left": (8, 16), "right": (24, 16), "top": (16, 8), "bottom": (16, 24), "center": (16, 16)}
BACKGROUNDS = ((245, 245, 245), (215, 215, 215), (240, 232, 210))
PAIR_RADIUS = 6.0  # both shapes of a two-shape scene
POSITION_PHRASES = {
    "left": ("on the left", "at the left"),
    "right": ("on the right", "at the right"),
    "top": ("at the top", "near the top"),
    "bottom": ("at the bottom", "near the bottom"),
    "center": ("in the center", "in the middle"),
}
SINGLE_TEMPLATES = (
    "a {size} {colour} {shape} {where}",
    "{size} {colour} {shape} {where}",
    "a picture of a {size} {colour} {shape} {where}",
)
PAIR_TEMPLATES = (
    "a {colour0} {shape0} on the left and a {colour1} {shape1} on the right",
    "a {colour0} {shape0} next to a {colour1} {shape1}",
    "{colour0} {shape0} and {colour1} {shape1}",
)


def _with_articles(caption: str) -> str:
    """English articles: "a orange" -> "an orange"."""
    return caption.replace("a orange", "an orange").replace("A orange", "An orange")


@dataclass(frozen=True)
class Shape:
    colour: str
    shape: str
    size: str  # "small" / "large"; "medium" in two-shape scenes
    position: str  # POSITIONS key; "left"/"right" in two-shape scenes


@dataclass(frozen=True)
class Scene:
    objects: tuple[Shape, ...]
    caption: str
    background: int  # index into BACKGROUNDS
    jitter: tuple[tuple[float, float], ...]  # per-object centre offset in pixels

    def attributes(self) -> dict:
        """JSON-ready attributes (what the judge checks), without rendering details."""
        return {"objects": [asdict(shape) for shape in self.objects], "caption": self.caption}


def sample_scene(rng: random.Random, two_shape_probability: float = 0.3) -> Scene:
    """Draw a scene (attributes, caption wording, background, jitter) from ``rng``."""
    jitter = lambda: (rng.uniform(-1.5, 1.5), rng.uniform(-1.5, 1.5))
    if rng.random() < two_shape_probability:
        colours = rng.sample(list(COLOURS), 2)
        kinds = [rng.choice(SHAPES), rng.choice(SHAPES)]
        objects = tuple(Shape(colours[i], kinds[i], "medium", ("left", "right")[i]) for i in range(2))
        caption = rng.choice(PAIR_TEMPLATES).format(
            colour0=colours[0], shape0=kinds[0], colour1=colours[1], shape1=kinds[1]
        )
        offsets = (jitter(), jitter())
    else:
        shape = Shape(
            rng.choice(list(COLOURS)), rng.choice(SHAPES), rng.choice(list(SIZES)), rng.choice(list(POSITIONS))
        )
        where = rng.choice(POSITION_PHRASES[shape.position])
        caption = rng.choice(SINGLE_TEMPLATES).format(
            size=shape.size, colour=shape.colour, shape=shape.shape, where=where
        )
        objects, offsets = (shape,), (jitter(),)
    return Scene(objects, _with_articles(caption), rng.randrange(len(BACKGROUNDS)), offsets)


def _outline(
    kind: str, cx: float, cy: float, r: float
) -> list[tuple[float, float]] | tuple[float, float, float, float]:
    if kind in ("circle", "square"):
        return (cx - r, cy - r, cx + r, cy + r)
    if kind == "triangle":
        return [(cx, cy - r), (cx + r, cy + 0.8 * r), (cx - r, cy + 0.8 * r)]
    return [(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)]  # diamond


def render(scene: Scene, resolution: int = RESOLUTION) -> Image.Image:
    """The scene as an anti-aliased RGB image of ``resolution``² pixels."""
    scale = resolution / RESOLUTION * SUPERSAMPLING
    big = Image.new("RGB", (resolution * SUPERSAMPLING,) * 2, BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(big)
    pair = len(scene.objects) == 2
    for shape, (dx, dy) in zip(scene.objects, scene.jitter, strict=True):
        cx, cy = POSITIONS[shape.position]
        radius = PAIR_RADIUS if pair else SIZES[shape.size]
        outline = _outline(shape.shape, (cx + dx) * scale, (cy + dy) * scale, radius * scale)
        fill = COLOURS[shape.colour]
        if shape.shape == "circle":
            draw.ellipse(outline, fill=fill)
        elif shape.shape == "square":
            draw.rectangle(outline, fill=fill)
        else:
            draw.polygon(outline, fill=fill)
    return big.resize((resolution, resolution), Image.Resampling.BOX)


def scenes(seed: int, count: int, two_shape_probability: float = 0.3) -> list[Scene]:
    """``count`` scenes, deterministic in ``seed``."""
    rng = random.Random(seed)
    return [sample_scene(rng, two_shape_probability) for _ in range(count)]


def rerender(scene: Scene, seed: int) -> Scene:
    """The same prompt and objects with a new background and jitter: a fresh reference image for a prompt."""
    rng = random.Random(seed)
    jitter = tuple((rng.uniform(-1.5, 1.5), rng.uniform(-1.5, 1.5)) for _ in scene.objects)
    return Scene(scene.objects, scene.caption, rng.randrange(len(BACKGROUNDS)), jitter)


def render_batch(drawn: Sequence[Scene]) -> torch.Tensor:
    """The scenes rendered as uint8 [N, 3, 32, 32] (a quarter of the memory of floats)."""
    pixels = np.stack([np.asarray(render(scene)) for scene in drawn])
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous()
