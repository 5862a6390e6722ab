"""Prompt-set readers: every local form on small hand-made files, the hub forms through a stand-in download, and the
errors (the hub is offline in tests, see conftest.py)."""

import json
import re
from pathlib import Path

import huggingface_hub
import pytest

from rglcd.prompts import SPEC_HELP, Prompt, PromptSetError, load_prompts
from rglcd.world.data import eval_scenes

STYLES = {
    "anime": ["a fox in a forest", "a girl with a red umbrella"],
    "concept-art": ["a ruined castle at dusk"],
    "paintings": ["a bowl of pears", "a harbour at night", "a portrait of an old man"],
    "photo": ['a sign that says "open"'],
}
PARTI = (
    "Prompt\tCategory\tChallenge\tNote\n"
    "bond\tAbstract\tBasic\tBiology-inspired concepts with multiple meanings\n"
    'A robot painted as graffiti on a brick wall. The words "Fly an airplane" are written on the wall.\t'
    "Outdoor Scenes\tComplex\t\n"
    '"quoted" start and a lone " quote\tArts\tWriting & Symbols\t\n'
    "a portrait of Anubis over the city of Mars. \tWorld Knowledge\tComplex\t\n"
    "peace\tAbstract\tBasic\t\n"
)


def _raises(message: str):
    """``pytest.raises`` for a PromptSetError whose message holds ``message`` literally."""
    return pytest.raises(PromptSetError, match=re.escape(message))


def _style_folder(root: Path) -> Path:
    root.mkdir()
    for style, texts in STYLES.items():
        (root / f"{style}.json").write_text(json.dumps(texts))
    return root


def _texts_groups(prompts):
    return [(prompt.text, prompt.group) for prompt in prompts]


HPSV2_EXPECTED = [
    ("a fox in a forest", "anime"),
    ("a girl with a red umbrella", "anime"),
    ("a ruined castle at dusk", "concept-art"),
    ("a bowl of pears", "paintings"),
    ("a harbour at night", "paintings"),
    ("a portrait of an old man", "paintings"),
    ('a sign that says "open"', "photo"),
]


def test_hpsv2_folder_style_by_style_in_file_order(tmp_path):
    prompts = load_prompts(f"hpsv2:{_style_folder(tmp_path / 'benchmark')}")
    assert _texts_groups(prompts) == HPSV2_EXPECTED
    assert all(prompt.reference is None and prompt.record is None for prompt in prompts)
    limited = load_prompts(f"hpsv2:{tmp_path / 'benchmark'}", limit=2)
    assert _texts_groups(limited) == [HPSV2_EXPECTED[i] for i in (0, 1, 2, 3, 4, 6)]


def test_hpsv2_from_the_hub_fetches_the_four_benchmark_files(tmp_path, monkeypatch):
    folder = _style_folder(tmp_path / "benchmark")
    calls = []

    def download(repo_id, filename, *, subfolder=None, repo_type=None):
        calls.append((repo_id, filename, subfolder, repo_type))
        return str(folder / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    assert _texts_groups(load_prompts("hpsv2")) == HPSV2_EXPECTED
    assert calls == [
        ("zhwang/HPDv2", "anime.json", "benchmark", "dataset"),
        ("zhwang/HPDv2", "concept-art.json", "benchmark", "dataset"),
        ("zhwang/HPDv2", "paintings.json", "benchmark", "dataset"),
        ("zhwang/HPDv2", "photo.json", "benchmark", "dataset"),
    ]


def test_parti_tsv_splits_on_tabs_only_and_groups_by_category(tmp_path):
    path = tmp_path / "PartiPrompts.tsv"
    path.write_text(PARTI)
    assert _texts_groups(load_prompts(f"parti:{path}")) == [
        ("bond", "Abstract"),
        (
            'A robot painted as graffiti on a brick wall. The words "Fly an airplane" are written on the wall.',
            "Outdoor Scenes",
        ),
        ('"quoted" start and a lone " quote', "Arts"),
        ("a portrait of Anubis over the city of Mars.", "World Knowledge"),
        ("peace", "Abstract"),
    ]
    assert [prompt.text for prompt in load_prompts(f"parti:{path}", limit=1)] == [
        "bond",
        'A robot painted as graffiti on a brick wall. The words "Fly an airplane" are written on the wall.',
        '"quoted" start and a lone " quote',
        "a portrait of Anubis over the city of Mars.",
    ]


def test_parti_from_the_hub_fetches_the_tsv(tmp_path, monkeypatch):
    path = tmp_path / "PartiPrompts.tsv"
    path.write_text(PARTI)
    calls = []

    def download(repo_id, filename, *, subfolder=None, repo_type=None):
        calls.append((repo_id, filename, subfolder, repo_type))
        return str(path)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    assert len(load_prompts("parti")) == 5
    assert calls == [("nateraw/parti-prompts", "PartiPrompts.tsv", None, "dataset")]


@pytest.mark.parametrize(
    ("spec", "repo", "files", "local"),
    [
        (
            "hpsv2",
            "zhwang/HPDv2",
            "benchmark/anime.json benchmark/concept-art.json benchmark/paintings.json benchmark/photo.json",
            "hpsv2:DIR/benchmark",
        ),
        ("parti", "nateraw/parti-prompts", "PartiPrompts.tsv", "parti:DIR/PartiPrompts.tsv"),
    ],
)
def test_hub_sets_offline_say_what_to_download_and_what_to_pass(spec, repo, files, local, tmp_path, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))  # an empty cache
    with pytest.raises(PromptSetError) as caught:
        load_prompts(spec)
    message = str(caught.value)
    assert f"hf download {repo} {files} --repo-type dataset --local-dir DIR" in message
    assert f"https://huggingface.co/datasets/{repo}" in message
    assert local in message


def _coco_file(path: Path) -> Path:
    path.write_text(
        json.dumps(
            {
                "images": [
                    {"id": 42, "file_name": "COCO_val2014_000000000042.jpg", "height": 480, "width": 640},
                    {"id": 7, "file_name": "COCO_val2014_000000000007.jpg", "height": 480, "width": 640},
                    {"id": 19, "file_name": "COCO_val2014_000000000019.jpg", "height": 480, "width": 640},
                ],
                "annotations": [
                    {"image_id": 19, "id": 1, "caption": "A man riding a wave on a surfboard.\n"},
                    {"image_id": 42, "id": 2, "caption": " Two dogs play in the snow."},
                    {"image_id": 7, "id": 3, "caption": "A plate of food with broccoli."},
                    {"image_id": 42, "id": 4, "caption": "Dogs running through snow."},
                    {"image_id": 19, "id": 5, "caption": "A surfer on a large wave."},
                    {"image_id": 7, "id": 6, "caption": "Broccoli and rice on a plate."},
                ],
            }
        )
    )
    return path


def test_coco_first_caption_of_each_image_by_id(tmp_path):
    captions = _coco_file(tmp_path / "captions_val2014.json")
    assert load_prompts(f"coco:{captions}") == [
        Prompt("A plate of food with broccoli."),
        Prompt("A man riding a wave on a surfboard."),
        Prompt("Two dogs play in the snow."),
    ]
    images = tmp_path / "val2014"
    images.mkdir()
    assert load_prompts(f"coco:{captions}:{images}", limit=2) == [
        Prompt("A plate of food with broccoli.", reference=images / "COCO_val2014_000000000007.jpg"),
        Prompt("A man riding a wave on a surfboard.", reference=images / "COCO_val2014_000000000019.jpg"),
    ]


def test_world_prompts_carry_their_scenes(tmp_path):
    prompts = load_prompts("world:5")
    assert _texts_groups(prompts) == [
        ("a small purple circle near the bottom", "one shape"),
        ("small red square on the right", "one shape"),
        ("large blue circle at the top", "one shape"),
        ("a purple circle next to an orange circle", "two shapes"),
        ("blue circle and orange triangle", "two shapes"),
    ]
    assert [prompt.record for prompt in prompts] == eval_scenes(5)
    assert [prompt.text for prompt in load_prompts("world:5", limit=1)] == [
        "a small purple circle near the bottom",
        "a purple circle next to an orange circle",
    ]
    assert len(load_prompts("world")) == 64


def test_text_file_skips_comments_and_blank_lines(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text(
        "# my prompts\na red apple\n\n   \n  # indented comment\n  a cat on a mat  \na dog # not a comment\n"
    )
    assert load_prompts(str(path)) == [Prompt("a red apple"), Prompt("a cat on a mat"), Prompt("a dog # not a comment")]
    assert load_prompts(str(path), limit=2) == [Prompt("a red apple"), Prompt("a cat on a mat")]


def test_jsonl_file_takes_prompt_or_caption(tmp_path):
    path = tmp_path / "eval_prompts.jsonl"
    path.write_text('{"prompt": "a red apple"}\n\n{"caption": "a blue square", "objects": []}\n')
    assert load_prompts(str(path)) == [Prompt("a red apple"), Prompt("a blue square")]


def test_unknown_spec_lists_the_forms(tmp_path):
    with pytest.raises(PromptSetError) as caught:
        load_prompts(str(tmp_path / "missing.txt"))
    assert "neither a known prompt set nor an existing file" in str(caught.value)
    assert SPEC_HELP in str(caught.value)
    for form in ("'hpsv2:DIR'", "'parti:FILE'", "'coco:CAPTIONS_JSON:IMAGES_DIR'", "'world:N'"):
        assert form in SPEC_HELP


@pytest.mark.parametrize(
    ("make", "spec", "message"),
    [
        (lambda d: None, "hpsv2:{d}/nowhere", "no folder {d}/nowhere"),
        (lambda d: (d / "anime.json").write_text("[]"), "hpsv2:{d}", "no file {d}/concept-art.json"),
        (lambda d: None, "parti:{d}/PartiPrompts.tsv", "no file {d}/PartiPrompts.tsv"),
        (lambda d: None, "coco:{d}/captions.json", "no file {d}/captions.json"),
        (lambda d: _coco_file(d / "c.json"), "coco:{d}/c.json:{d}/val2014", "no image folder {d}/val2014"),
        (lambda d: None, "coco", "coco needs a captions file"),
        (lambda d: None, "world:0", "world:N needs a positive number"),
        (lambda d: None, "world:many", "world:N needs a positive number"),
    ],
)
def test_missing_files_and_bad_arguments(make, spec, message, tmp_path):
    make(tmp_path)
    with _raises(message.format(d=tmp_path)):
        load_prompts(spec.format(d=tmp_path))


def test_malformed_files_name_the_file_and_line(tmp_path):
    folder = _style_folder(tmp_path / "benchmark")
    (folder / "paintings.json").write_text('[\n  "a bowl of pears",\n  oops\n]')
    with _raises(f"{folder}/paintings.json is not valid JSON (line 3"):
        load_prompts(f"hpsv2:{folder}")
    (folder / "paintings.json").write_text('{"prompts": ["a bowl of pears"]}')
    with _raises("expected a JSON list of prompt strings"):
        load_prompts(f"hpsv2:{folder}")

    tsv = tmp_path / "parti.tsv"
    tsv.write_text("Prompt\tCategory\tChallenge\tNote\nbond\tAbstract\tBasic\t\nno tabs here\n")
    with _raises(f"{tsv}, line 3: expected tab-separated fields"):
        load_prompts(f"parti:{tsv}")
    tsv.write_text("prompt,category\nbond,Abstract\n")
    with _raises(f"{tsv}, line 1: expected a PartiPrompts header"):
        load_prompts(f"parti:{tsv}")

    coco = tmp_path / "captions.json"
    coco.write_text(json.dumps({"images": [{"id": 1, "file_name": "a.jpg"}], "annotations": [{"image_id": 1}]}))
    with _raises(f"{coco} is not a COCO captions file"):
        load_prompts(f"coco:{coco}")

    jsonl = tmp_path / "prompts.jsonl"
    jsonl.write_text('{"prompt": "a red apple"}\n{"text": "a cat"}\n')
    with _raises(f'{jsonl}, line 2: expected an object with a "prompt"'):
        load_prompts(str(jsonl))
    jsonl.write_text('{"prompt": "a red apple"}\n{"prompt": \n')
    with _raises(f"{jsonl}, line 2: not valid JSON"):
        load_prompts(str(jsonl))


def test_empty_sets_and_bad_limits(tmp_path):
    text = tmp_path / "prompts.txt"
    text.write_text("# nothing yet\n\n")
    with _raises("holds no prompts"):
        load_prompts(str(text))
    coco = tmp_path / "captions.json"
    coco.write_text(json.dumps({"images": [], "annotations": []}))
    with _raises("holds no prompts"):
        load_prompts(f"coco:{coco}")
    text.write_text("a red apple\n")
    with _raises("at least 1, not 0"):
        load_prompts(str(text), limit=0)
