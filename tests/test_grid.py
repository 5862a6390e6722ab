import numpy as np
import pytest
from PIL import Image, ImageFont

from rglcd.grid import FONT_SIZE, GAP, MIN_TILE, ROW_LABEL_WIDTH, labelled_grid, steps_text, upscale_factor, wrap


def test_upscale_factor_is_the_whole_number_reaching_the_minimum():
    assert [upscale_factor(size) for size in (32, 33, 64, 100, 128, 512)] == [4, 4, 2, 2, 1, 1]


def test_steps_text_is_singular_for_one_step():
    assert [steps_text(n) for n in (1, 2, 50)] == ["1 step", "2 steps", "50 steps"]


def test_wrap_keeps_words_whole_and_lines_within_the_width():
    font = ImageFont.load_default(size=FONT_SIZE)
    text = "a small red circle on the left and a large blue square on the right"
    lines = wrap(text, font, 100)
    assert " ".join(lines) == text and len(lines) > 2
    assert all(font.getlength(line) <= 100 for line in lines)
    assert wrap("supercalifragilistic", font, 10) == ["supercalifragilistic"]  # too long: its own line, not cut
    assert wrap("model\n2 steps", font, 200) == ["model", "2 steps"]


def _dark(region: Image.Image) -> int:
    return int((np.asarray(region.convert("L")) < 128).sum())


def test_labelled_grid_upscales_nearest_and_labels_every_row_and_column():
    rng = np.random.default_rng(0)
    tiles = [[Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(3)] for _ in range(2)]
    headers = ["teacher\n50 steps", "LCM\n2 steps", "RG-LCM (world-clip)\n2 steps"]
    prompts = ["a small red circle on the left", "a large blue square on the right and a green triangle"]
    sheet = labelled_grid(tiles, headers, prompts)
    tile = 32 * upscale_factor(32)
    assert tile == MIN_TILE
    pitch = tile + GAP
    header = sheet.height - 2 * pitch + GAP
    assert sheet.width == ROW_LABEL_WIDTH + 3 * pitch - GAP and header > 2 * FONT_SIZE  # two header lines at least
    pixels = np.asarray(sheet)
    for r in range(2):
        for c in range(3):
            top, left = header + r * pitch, ROW_LABEL_WIDTH + c * pitch
            block = pixels[top : top + tile, left : left + tile]
            # Nearest-neighbour: every source pixel becomes a 4×4 block of exactly its value.
            assert np.array_equal(block, np.asarray(tiles[r][c]).repeat(4, axis=0).repeat(4, axis=1))
            column_header = sheet.crop((left, 0, left + tile, header))
            assert _dark(column_header) > 20  # text drawn over each column
        assert _dark(sheet.crop((0, header + r * pitch, ROW_LABEL_WIDTH, header + r * pitch + tile))) > 20
    assert _dark(sheet.crop((0, 0, ROW_LABEL_WIDTH, header))) == 0  # the corner stays blank
    large = [[Image.new("RGB", (256, 256), "red")]]
    assert labelled_grid(large, ["x"], ["y"]).size[0] == ROW_LABEL_WIDTH + 256  # large images are not scaled
    with pytest.raises(ValueError, match="row labels"):
        labelled_grid(tiles, headers, prompts[:1])
    with pytest.raises(ValueError, match="tile \\[0\\]\\[1\\]"):
        labelled_grid([[tiles[0][0], large[0][0]]], ["a", "b"], ["c"])
