"""Prompt sets for ``rglcd eval``: the HPSv2 benchmark, PartiPrompts, COCO captions, a plugin's (the miniature
world's), or a file.

A prompt set is named by a spec string, ``NAME`` or ``NAME:ARGUMENT`` for a registered set (:data:`PROMPT_SETS`):

``hpsv2`` / ``hpsv2:DIR``
    The HPSv2 benchmark (Wu et al., 2023): 800 prompts in each of four styles, read from the files
    ``benchmark/{anime,concept-art,paintings,photo}.json`` of the hub dataset ``zhwang/HPDv2`` (each a JSON list of
    prompt strings), or from a local folder holding those four files, such as the ``~/.cache/hpsv2/datasets/benchmark``
    that the ``hpsv2`` package fills. Prompts come style by style in that order, each in file order; the group is
    the style. Source: github.com/tgxs002/HPSv2, ``hpsv2/utils.py`` (``hps_prompt_files``,
    ``download_benchmark_prompts``) and ``hpsv2/__init__.py`` (``benchmark_prompts``).
``parti`` / ``parti:FILE``
    PartiPrompts (Yu et al., 2022): ``PartiPrompts.tsv`` of the hub dataset ``nateraw/parti-prompts`` (a copy of
    github.com/google-research/parti), or a local copy. Tab-separated with the header ``Prompt Category Challenge
    Note``; fields are split on tabs only, since prompts hold unbalanced ``"``. The group is the category.
``coco:CAPTIONS_JSON`` / ``coco:CAPTIONS_JSON:IMAGES_DIR``
    A COCO captions file (``captions_val2014.json``, ``captions_val2017.json``: ``{"images": [{"id", "file_name",
    ...}], "annotations": [{"image_id", "caption", ...}]}``): one prompt per image, images by increasing id, each with
    its first caption in annotation order. With IMAGES_DIR, each prompt's reference is ``IMAGES_DIR/file_name`` (for
    FID); the images themselves are opened, and so checked, by whoever uses them.
``world`` / ``world:N``
    Registered by the miniature world's plugin (:mod:`rglcd.world.plugin`): its first N held-out scenes.
any other spec
    A text file with one prompt per line (blank lines and lines starting with ``#`` skipped), or a ``.jsonl`` file of
    objects with a ``"prompt"`` (or ``"caption"``) field, such as the ``eval_prompts.jsonl`` of ``rglcd world data``.

The hub files are downloaded once and then read from the hub cache; offline and uncached, the error says what to
download and which local form to pass instead.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import RglcdError
from .files import read_text
from .plugins import Registry

HPSV2_REPO = "zhwang/HPDv2"
HPSV2_STYLES = ("anime", "concept-art", "paintings", "photo")
PARTI_REPO = "nateraw/parti-prompts"
PARTI_FILE = "PartiPrompts.tsv"

SPEC_HELP = f"""prompt set: 'hpsv2' (HPSv2 benchmark, 4 styles x 800, from the hub dataset {HPSV2_REPO}) or 'hpsv2:DIR'
(a folder holding {", ".join(style + ".json" for style in HPSV2_STYLES)}); 'parti' (PartiPrompts, 1632 prompts, from
the hub dataset {PARTI_REPO}) or 'parti:FILE' (a local {PARTI_FILE}); 'coco:CAPTIONS_JSON' or
'coco:CAPTIONS_JSON:IMAGES_DIR' (a COCO captions file: the first caption of each image; the images are FID
references); 'world' or 'world:N' (the miniature world's first N held-out prompts, default 64); or the
path of a text file (one prompt per line, '#' comments) or of a .jsonl file with a "prompt" or "caption" field"""


@dataclass(frozen=True)
class Prompt:
    text: str
    group: str = ""  # HPSv2 style, Parti category, world scene kind; "" for ungrouped sets
    reference: Path | None = None  # a real image for FID (COCO)
    record: Any = None  # what a plugin's metrics read of the prompt (the miniature world's Scene, for its judge)


@dataclass(frozen=True)
class PromptSet:
    """A registered prompt set and how ``rglcd eval`` measures it unless told otherwise."""

    load: Callable[[str], list[Prompt]]  # the spec's ARGUMENT ("" without one) -> the prompts, in order
    metrics: tuple[str, ...] = ("hpsv2.1", "hf_ratio")  # the default metrics
    lcm_guidance: float | None = None  # the LCM guidance scale; None: diffusers' pipeline default
    fid_features: str = "inception"  # the FID feature extractor (a name in rglcd.eval_command.FID_FEATURES)


PROMPT_SETS: Registry[PromptSet] = Registry("prompt set")
FILE_SET = PromptSet(load=lambda path: _lines(Path(path).expanduser()))  # a text or .jsonl file's defaults


def register_prompt_set(name: str, **defaults) -> Callable[[Callable[[str], list[Prompt]]], Callable]:
    """Decorator of a loader ``(argument) -> prompts``: registers it as ``name`` with :class:`PromptSet`'s
    ``defaults`` (metrics, lcm_guidance, fid_features)."""

    def decorate(load: Callable[[str], list[Prompt]]) -> Callable[[str], list[Prompt]]:
        PROMPT_SETS.register(name)(PromptSet(load, **defaults))
        return load

    return decorate


def prompt_set(spec: str) -> PromptSet:
    """The registered set ``spec`` names (``NAME`` or ``NAME:ARGUMENT``), else a file's."""
    kind = spec.partition(":")[0]
    return PROMPT_SETS[kind] if kind in PROMPT_SETS else FILE_SET


class PromptSetError(RglcdError, ValueError):
    """A prompt set that cannot be read; the message says how to fix the spec or the file."""


def load_prompts(spec: str, limit: int | None = None) -> list[Prompt]:
    """The prompts named by ``spec`` (see the module docstring), at most ``limit`` per group, in order."""
    if limit is not None and limit < 1:
        raise PromptSetError(f"the prompt limit must be at least 1, not {limit}")
    kind, _, argument = spec.partition(":")
    if kind in PROMPT_SETS:
        prompts = PROMPT_SETS[kind].load(argument)
    elif Path(spec).expanduser().is_file():
        prompts = FILE_SET.load(spec)
    else:
        raise PromptSetError(f"{spec!r} is neither a known prompt set nor an existing file; {SPEC_HELP}")
    if not prompts:
        raise PromptSetError(f"the prompt set {spec!r} holds no prompts")
    if limit is None:
        return prompts
    taken: dict[str, int] = {}
    kept = []
    for prompt in prompts:
        if taken.get(prompt.group, 0) < limit:
            taken[prompt.group] = taken.get(prompt.group, 0) + 1
            kept.append(prompt)
    return kept


def _hub_file(repo: str, filename: str, files: str, local: str, subfolder: str | None = None) -> Path:
    """A file of a hub dataset, from the hub cache or downloaded into it; unavailable, the error says to download
    ``files`` (the set's files in the repo) and pass ``local`` (the spec reading them from the download)."""
    from huggingface_hub import hf_hub_download  # here: `rglcd eval --help` reads SPEC_HELP; keep it light

    try:
        return Path(hf_hub_download(repo, filename, subfolder=subfolder, repo_type="dataset"))
    except (OSError, ValueError) as error:  # offline and uncached, no network, unknown repo or file
        in_repo = f"{subfolder}/{filename}" if subfolder else filename
        raise PromptSetError(
            f"{in_repo} of the hub dataset {repo} is not available ({type(error).__name__}: {error}); download it "
            f"with `hf download {repo} {files} --repo-type dataset --local-dir DIR` (or from "
            f"https://huggingface.co/datasets/{repo}) and pass {local}"
        ) from error


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as error:
        raise PromptSetError(f"no file {path}") from error
    except json.JSONDecodeError as error:
        raise PromptSetError(f"{path} is not valid JSON (line {error.lineno}: {error.msg})") from error
    except UnicodeDecodeError as error:
        raise PromptSetError(f"{path}: not UTF-8 text ({error.reason} at byte {error.start})") from error


@register_prompt_set("hpsv2")
def _hpsv2(folder: str) -> list[Prompt]:
    if folder:
        root = Path(folder).expanduser()
        if not root.is_dir():
            raise PromptSetError(f"no folder {root}; hpsv2:DIR needs a folder holding the four HPSv2 style files")
        files = [root / f"{style}.json" for style in HPSV2_STYLES]
        for path in files:
            if not path.is_file():
                raise PromptSetError(
                    f"no file {path}; get it from benchmark/{path.name} of the hub dataset {HPSV2_REPO}"
                )
    else:
        every_style = " ".join(f"benchmark/{style}.json" for style in HPSV2_STYLES)
        files = [
            _hub_file(HPSV2_REPO, f"{style}.json", every_style, "hpsv2:DIR/benchmark", subfolder="benchmark")
            for style in HPSV2_STYLES
        ]
    prompts = []
    for style, path in zip(HPSV2_STYLES, files, strict=True):
        texts = _read_json(path)
        if not isinstance(texts, list) or not all(isinstance(text, str) for text in texts):
            raise PromptSetError(f"{path} is not an HPSv2 style file: expected a JSON list of prompt strings")
        prompts += [Prompt(text, group=style) for text in texts]
    return prompts


@register_prompt_set("parti")
def _parti_set(argument: str) -> list[Prompt]:
    return _parti(
        Path(argument or _hub_file(PARTI_REPO, PARTI_FILE, PARTI_FILE, f"parti:DIR/{PARTI_FILE}")).expanduser()
    )


def _parti(path: Path) -> list[Prompt]:
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except FileNotFoundError as error:
        raise PromptSetError(f"no file {path}; parti:FILE needs a local {PARTI_FILE}") from error
    except UnicodeDecodeError as error:
        raise PromptSetError(f"{path}: not UTF-8 text ({error.reason} at byte {error.start})") from error
    header = lines[0].split("\t") if lines else []
    if "Prompt" not in header or "Category" not in header:
        raise PromptSetError(f"{path}, line 1: expected a PartiPrompts header with Prompt and Category columns")
    text_column, group_column = header.index("Prompt"), header.index("Category")
    prompts = []
    for number, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) <= max(text_column, group_column) or not fields[text_column].strip():
            raise PromptSetError(f"{path}, line {number}: expected tab-separated fields under {header}, got {line!r}")
        prompts.append(Prompt(fields[text_column].strip(), group=fields[group_column].strip()))
    return prompts


@register_prompt_set("coco", metrics=("fid", "clipscore"))
def _coco_set(argument: str) -> list[Prompt]:
    return _coco(*argument.partition(":")[::2])


def _coco(captions: str, images: str) -> list[Prompt]:
    if not captions:
        raise PromptSetError("coco needs a captions file: coco:CAPTIONS_JSON or coco:CAPTIONS_JSON:IMAGES_DIR")
    path = Path(captions).expanduser()
    folder = Path(images).expanduser() if images else None
    if folder is not None and not folder.is_dir():
        raise PromptSetError(f"no image folder {folder} (coco:CAPTIONS_JSON:IMAGES_DIR)")
    data = _read_json(path)
    try:
        first_caption: dict[int, str] = {}
        for annotation in data["annotations"]:
            first_caption.setdefault(annotation["image_id"], annotation["caption"].strip())
        entries = sorted((image["id"], image["file_name"]) for image in data["images"])
    except (KeyError, TypeError, AttributeError) as error:
        raise PromptSetError(
            f"{path} is not a COCO captions file: expected {{'images': [{{'id', 'file_name'}}], "
            f"'annotations': [{{'image_id', 'caption'}}]}} ({type(error).__name__}: {error})"
        ) from error
    return [
        Prompt(first_caption[image_id], reference=folder / file_name if folder else None)
        for image_id, file_name in entries
        if image_id in first_caption
    ]


def _lines(path: Path) -> list[Prompt]:
    try:
        lines = read_text(path).splitlines()
    except ValueError as error:
        raise PromptSetError(str(error)) from None
    if path.suffix != ".jsonl":
        return [Prompt(line.strip()) for line in lines if line.strip() and not line.lstrip().startswith("#")]
    prompts = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as error:
            raise PromptSetError(f"{path}, line {number}: not valid JSON ({error.msg})") from error
        text = entry.get("prompt", entry.get("caption")) if isinstance(entry, dict) else None
        if not isinstance(text, str) or not text.strip():
            raise PromptSetError(f'{path}, line {number}: expected an object with a "prompt" or "caption" string')
        prompts.append(Prompt(text.strip()))
    return prompts
