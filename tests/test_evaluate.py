import json

import pytest
import torch

from rglcd.evaluate import Contender, comparison_grid, evaluate, generate, load_contender, markdown_table
from rglcd.models import build_student, load_teacher
from rglcd.sampling import export_pipeline

CAPTIONS = ["a red picture", "a blue picture", "a green picture"]


@pytest.fixture(scope="module")
def contenders(teacher_dirs, tmp_path_factory):
    teacher = load_teacher(teacher_dirs["epsilon"])
    student = export_pipeline(tmp_path_factory.mktemp("lcm") / "student", build_student(teacher.unet), teacher)
    return [
        Contender("teacher", teacher_dirs["epsilon"], "teacher", (3,), 7.5),
        Contender("LCM", student, "lcm", (1, 2), 6.0),
    ]


def test_generation_is_seeded_per_prompt_and_resumes(contenders, tmp_path):
    lcm = contenders[1]
    parts = load_contender(lcm)
    images, ms = generate(lcm, parts, CAPTIONS, 2, tmp_path / "a", seed=4, batch_size=2)
    assert images.shape == (3, 3, 32, 32) and ms > 0
    alone, _ = generate(lcm, parts, CAPTIONS[1:2], 2, tmp_path / "b", seed=5, batch_size=1)
    assert torch.equal(alone[0], images[1])  # prompt 1 got seed 4 + 1 in a batch; alone, seed 5 + 0
    (tmp_path / "a" / "00001.png").unlink()
    written = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "a").glob("*.png")}
    again, ms_again = generate(lcm, parts, CAPTIONS, 2, tmp_path / "a", seed=4, batch_size=2)
    assert torch.equal(again, images) and ms_again > 0
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "a").glob("*.png") if p.name in written} == written
    _, ms_none = generate(lcm, parts, CAPTIONS, 2, tmp_path / "a", seed=4, batch_size=2)
    assert ms_none is None  # nothing left to generate


def test_evaluate_rows_table_and_grid(contenders, tmp_path):
    rows = evaluate(
        contenders,
        CAPTIONS,
        tmp_path,
        per_image_metrics={"brightness": lambda images, texts, records: images.mean(dim=(1, 2, 3))},
        set_metrics={"count": lambda images, texts, records: float(len(images))},
    )
    assert [(row["model"], row["steps"]) for row in rows] == [("teacher", 3), ("LCM", 1), ("LCM", 2)]
    for row in rows:
        assert 0 <= row["brightness"] <= 1 and row["count"] == 3.0 and row["ms_per_image"] > 0
        assert json.loads((tmp_path / "images" / f"{row['model']}-{row['steps']}" / "timing.json").read_text())
    table = markdown_table(rows, ["brightness", "ms_per_image"])
    assert table.splitlines()[0] == "| model | steps | brightness | ms_per_image |"
    assert len(table.splitlines()) == 2 + len(rows)
    grid = comparison_grid(rows, [0, 2], tmp_path / "grid.png")
    from PIL import Image

    assert Image.open(grid).size == (32 * len(rows), 32 * 2)
