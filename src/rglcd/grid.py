"""Image grids a person can read: small images upscaled nearest-neighbour, a header over each column and a
wrapped label beside each row. Pure PIL, no I/O (callers save the returned image)."""

from __future__ import annotations

import math
from collections.abc import Sequence

from PIL import Image, ImageDraw, ImageFont

MIN_TILE = 128  # a 32-pixel world image becomes 128 pixels: shapes and colours readable at a glance
FONT_SIZE = 13
PADDING = 4
ROW_LABEL_WIDTH = 176
GAP = 4  # white between tiles, so images with dark borders do not run together


def upscale_factor(tile_size: int, min_tile: int = MIN_TILE) -> int:
    """The whole-number factor that brings the tile's smaller side to at least ``min_tile`` (1 when it already is):
    whole numbers keep nearest-neighbour pixels square."""
    return max(1, math.ceil(min_tile / tile_size))


def steps_text(steps: int) -> str:
    """ "1 step", "4 steps": the label of a sampler's step count in grids, captions and tables."""
    return f"{steps} step{'s' * (steps != 1)}"


def _font() -> ImageFont.ImageFont:
    return ImageFont.load_default(size=FONT_SIZE)


def wrap(text: str, font: ImageFont.ImageFont, width: int) -> list[str]:
    """Greedy word wrap to ``width`` pixels; a word longer than the width gets its own line (it is not cut)."""
    lines: list[str] = []
    for paragraph in text.split("\n"):
        line = ""
        for word in paragraph.split():
            candidate = f"{line} {word}" if line else word
            if line and font.getlength(candidate) > width:
                lines.append(line)
                line = word
            else:
                line = candidate
        lines.append(line)
    return lines


def _clip(lines: list[str], count: int) -> list[str]:
    return lines if len(lines) <= count else [*lines[: count - 1], lines[count - 1] + " …"]


def labelled_grid(
    tiles: Sequence[Sequence[Image.Image]],
    column_labels: Sequence[str],
    row_labels: Sequence[str],
    min_tile: int = MIN_TILE,
) -> Image.Image:
    """``tiles[r][c]`` (all one size) on a white sheet: column headers on top, row labels on the left, every tile
    upscaled by ``upscale_factor`` with nearest-neighbour (no blur invented between pixels)."""
    if not tiles or not tiles[0]:
        raise ValueError("labelled_grid needs at least one tile")
    if len(column_labels) != len(tiles[0]) or len(row_labels) != len(tiles):
        raise ValueError(
            f"{len(tiles)}×{len(tiles[0])} tiles need as many row labels ({len(row_labels)}) and column labels "
            f"({len(column_labels)})"
        )
    width, height = tiles[0][0].size
    factor = upscale_factor(min(width, height), min_tile)
    tile_width, tile_height = width * factor, height * factor
    font = _font()
    line_height = FONT_SIZE + 3
    headers = [wrap(label, font, tile_width - 2 * PADDING) for label in column_labels]
    fitting = max(1, (tile_height - 2 * PADDING) // line_height)  # a row label stays beside its own row
    rows = [_clip(wrap(label, font, ROW_LABEL_WIDTH - 2 * PADDING), fitting) for label in row_labels]
    header_height = max(len(lines) for lines in headers) * line_height + 2 * PADDING
    label_width = ROW_LABEL_WIDTH if any(row_labels) else 0
    pitch_x, pitch_y = tile_width + GAP, tile_height + GAP
    size = (label_width + pitch_x * len(column_labels) - GAP, header_height + pitch_y * len(row_labels) - GAP)
    sheet = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(sheet)
    for c, lines in enumerate(headers):
        draw.multiline_text(
            (label_width + c * pitch_x + PADDING, PADDING), "\n".join(lines), fill="black", font=font, spacing=3
        )
    for r, (tile_row, lines) in enumerate(zip(tiles, rows, strict=True)):
        top = header_height + r * pitch_y
        draw.multiline_text((PADDING, top + PADDING), "\n".join(lines), fill="black", font=font, spacing=3)
        for c, tile in enumerate(tile_row):
            if tile.size != (width, height):
                raise ValueError(f"tile [{r}][{c}] is {tile.size}, the others {(width, height)}")
            sheet.paste(
                tile.convert("RGB").resize((tile_width, tile_height), Image.NEAREST),
                (label_width + c * pitch_x, top),
            )
    return sheet
