"""Where training samples come from: webdataset tar shards or a folder of captioned images.

A source is resolved once, up front, into a list of shards. Each shard reads its samples as
:class:`RawSample` (payload still encoded, caption already text) so that skipping samples is cheap.
"""

from __future__ import annotations

import codecs
import csv
import json
import os
import sys
import tarfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import webdataset as wds
from PIL import Image
from webdataset.shardlists import expand_urls
from webdataset.tariterators import base_plus_ext

from ..errors import RglcdError

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")  # tried in this order within a sample
CAPTION_FILES = ("captions.jsonl", "captions.csv")  # tried in this order within a folder
SOURCE_FORMS = (
    "a webdataset .tar, a brace pattern such as /data/shard-{000000..000009}.tar, a directory of .tar shards, "
    "a pipe:CMD url (CMD runs in a shell: only use sources you trust), or a folder of images with a "
    "captions.jsonl or captions.csv"
)

# tarfile's messages for an archive with no bytes or one that stops early; any other means damaged bytes.
_TAR_ERRORS = {
    "empty file": "empty shard",
    "unexpected end of data": "truncated tar member",
    "truncated header": "truncated tar member",
    "empty header": "truncated tar member",
}

OnError = Callable[[str, str], None]  # (reason, details) when a shard cannot be read, or read to its end


class DataError(RglcdError, ValueError):
    """The training data cannot be used at all (missing, empty, or without a single usable sample)."""


@dataclass(frozen=True)
class RawSample:
    """One sample as read: its encoded payload, its caption, or why it is unusable.

    The payload is the encoded image (bytes, or a file path), or for a tar read with other payload extensions
    (e.g. the latent cache's ``safetensors``) that member's bytes.
    """

    key: str
    payload: bytes | Path | None
    caption: str | None
    problem: str | None = None


class Shard(Protocol):
    def samples(self, on_error: OnError) -> Iterator[RawSample]: ...


class TarShard:
    """A webdataset tar read with webdataset's opener, so local paths, ``pipe:`` and remote urls all work.

    The members are grouped into samples here rather than by ``webdataset.tarfile_samples``, which on a cut
    archive reports one error twice and can pass on the half-read sample. Here a read error ends the shard,
    drops the sample being assembled and is reported once. A sample's payload is its first member with one of
    the ``payload_extensions``.
    """

    def __init__(self, url: str, payload_extensions: tuple[str, ...] = IMAGE_EXTENSIONS) -> None:
        self.url = url
        self.payload_extensions = payload_extensions

    def samples(self, on_error: OnError) -> Iterator[RawSample]:
        if self.url.startswith("pipe:"):  # a config from elsewhere can hold any command: say what runs
            print(f"rglcd: data.source runs the shell command: {self.url[len('pipe:') :]}", file=sys.stderr)
        try:
            stream = wds.gopen(self.url, "rb")
        except OSError as exn:
            on_error("unreadable shard", f"{self.url}: {exn}")
            return
        key, parts = None, {}
        try:
            with tarfile.open(fileobj=stream, mode="r|*") as tar:
                for member in tar:
                    member_key, extension = base_plus_ext(member.name)
                    if not member.isfile() or member_key is None:
                        continue
                    if member_key != key:  # the previous sample is complete: hand it on before reading further
                        if parts:
                            yield _from_parts(f"{self.url}:{key}", parts, self.payload_extensions)
                        key, parts = member_key, {}
                    parts[extension.lower()] = tar.extractfile(member).read()
                    tar.members = []  # a streaming TarFile keeps every header otherwise
                if parts:
                    yield _from_parts(f"{self.url}:{key}", parts, self.payload_extensions)
        except (tarfile.TarError, EOFError) as exn:
            on_error(_TAR_ERRORS.get(str(exn), "corrupt tar"), f"{self.url}: {exn!r}")
        except OSError as exn:  # an I/O error, or a pipe: command that failed
            on_error("unreadable shard", f"{self.url}: {exn}")
        finally:
            try:
                stream.close()
            except OSError:  # a pipe's exit status; the read above has already reported any damage
                pass


def _from_parts(key: str, parts: dict[str, bytes], payload_extensions: tuple[str, ...]) -> RawSample:
    payload = next((parts[ext] for ext in payload_extensions if ext in parts), None)
    try:
        caption = _caption_from_parts(parts)
    except ValueError:  # bad UTF-8 or bad JSON
        return RawSample(key, payload, None, problem="undecodable caption")
    return RawSample(key, payload, caption)


def _caption_from_parts(parts: dict[str, bytes]) -> str | None:
    """The caption of a CC12M-style sample: ``.txt``, else ``.caption``, else ``.json``'s "caption" or "text"."""
    for extension in ("txt", "caption"):
        if extension in parts:
            return parts[extension].decode("utf-8")
    if "json" in parts:
        return _caption_from_record(json.loads(parts["json"]))
    return None


def _caption_from_record(record: object) -> str | None:
    if not isinstance(record, dict):
        return None
    caption = record.get("caption", record.get("text"))
    return caption if isinstance(caption, str) else None


class CaptionedFolder:
    """A folder of images listed, with their captions, in ``captions.jsonl`` or ``captions.csv``: one entry per
    line (a csv caption cannot span lines). An entry that cannot be read (not UTF-8, malformed, a field over
    :data:`MAX_FIELD` characters, a path outside the folder) is skipped and counted by its reason."""

    def __init__(self, captions_file: Path) -> None:
        read = _read_captions_jsonl if captions_file.suffix == ".jsonl" else _read_captions_csv
        self.entries = read(captions_file)
        if not self.entries:
            raise DataError(
                f"{captions_file} lists no images: add one entry per image, e.g. "
                '{"file": "0001.jpg", "caption": "a red bicycle"} in captions.jsonl, or rows of file,caption in '
                "captions.csv"
            )

    def samples(self, on_error: OnError) -> Iterator[RawSample]:
        return iter(self.entries)


MAX_FIELD = 131_072  # characters in a captions file's field (the csv module's default limit)


def _numbered_lines(path: Path, first: int = 1) -> Iterator[tuple[str, str | None]]:
    """(key, line) for each non-blank line of ``path``; the line is None where it is not UTF-8. A leading byte-order
    mark (Windows editors write one) is not part of the first line."""
    for number, raw in enumerate(path.read_bytes().removeprefix(codecs.BOM_UTF8).splitlines(), start=first):
        if not raw.strip():
            continue
        try:
            yield f"{path.name}:{number}", raw.decode("utf-8")
        except UnicodeDecodeError:
            yield f"{path.name}:{number}", None


def _entry(path: Path, key: str, line: str | None, parse: Callable[[str], tuple[str, str | None]]) -> RawSample:
    """The sample a captions line lists, or why it is unusable. ``parse`` gives (file, caption) or raises
    ValueError with the reason."""
    if line is None:
        return RawSample(key, None, None, problem="captions line not UTF-8")
    if len(line) > MAX_FIELD:
        return RawSample(key, None, None, problem="oversize captions line")
    try:
        file, caption = parse(line)
    except ValueError as error:
        return RawSample(key, None, None, problem=str(error))
    image = (path.parent / file).resolve()
    if Path(file).is_absolute() or not image.is_relative_to(path.parent.resolve()):
        return RawSample(key, None, None, problem="image path outside the folder")
    return RawSample(key, path.parent / file, caption)


def _read_captions_jsonl(path: Path) -> list[RawSample]:
    def parse(line: str) -> tuple[str, str | None]:
        try:
            record = json.loads(line)
        except ValueError:
            raise ValueError("malformed captions line") from None
        file = record.get("file") if isinstance(record, dict) else None
        if not isinstance(file, str) or not file:
            raise ValueError("malformed captions line")
        return file, _caption_from_record(record)

    return [_entry(path, key, line, parse) for key, line in _numbered_lines(path)]


def _read_captions_csv(path: Path) -> list[RawSample]:
    lines = _numbered_lines(path)
    header = next(lines, (None, None))[1]
    columns = next(csv.reader([header or ""]), [])
    text_column = "caption" if "caption" in columns else "text"
    if header is None or "file" not in columns or text_column not in columns:
        raise DataError(f"{path} needs a header row with the columns file,caption; it has {sorted(columns)}")

    def parse(line: str) -> tuple[str, str | None]:
        try:
            (row,) = csv.reader([line], strict=True)  # strict: an unclosed quote is an error, not a longer field
        except csv.Error:
            raise ValueError("malformed captions row") from None
        if len(row) != len(columns):
            raise ValueError("captions row with another number of columns than the header")
        record = dict(zip(columns, row, strict=True))
        if not record["file"]:
            raise ValueError("malformed captions row")
        return record["file"], record[text_column]

    return [_entry(path, key, line, parse) for key, line in lines]


def open_source(source: str | os.PathLike[str]) -> list[Shard]:
    """Resolve ``source`` into its shards, raising :class:`DataError` for a missing or empty one."""
    text = os.fspath(source)
    if text.startswith("pipe:") or "://" in text:
        return [TarShard(url) for url in expand_urls(text)]  # nothing to check until it is read
    path = Path(text)
    if path.is_dir():
        return _open_directory(path)
    if path.is_file():
        return [TarShard(text)]
    names = expand_urls(text)
    if len(names) == 1:
        raise DataError(f"training data {text!r} does not exist; pass {SOURCE_FORMS}")
    missing = [name for name in names if not Path(name).is_file()]
    if len(missing) == len(names):
        raise DataError(
            f"the pattern {text!r} matches no file (it expands to {len(names)} names, the first being "
            f"{names[0]!r}); check the directory and the shard numbers"
        )
    if missing:
        raise DataError(
            f"{len(missing)} of the {len(names)} shards of {text!r} are missing, e.g. {missing[0]!r}; fix the "
            "pattern, or pass the directory to train on the shards it holds"
        )
    return [TarShard(name) for name in names]


def _open_directory(path: Path) -> list[Shard]:
    tars = sorted(path.glob("*.tar"))
    if tars:
        return [TarShard(str(tar)) for tar in tars]
    for name in CAPTION_FILES:
        if (path / name).is_file():
            return [CaptionedFolder(path / name)]
    raise DataError(
        f"the directory {str(path)!r} holds no .tar shards and no {' or '.join(CAPTION_FILES)}; pass {SOURCE_FORMS}"
    )


def write_shards(
    samples: Iterable[tuple[Image.Image, str] | tuple[Image.Image, str, dict]],
    out_dir: str | os.PathLike[str],
    samples_per_shard: int = 1000,
    prefix: str = "shard",
) -> list[Path]:
    """Write (image, caption[, metadata]) samples as webdataset tars ``{prefix}-{index:06d}.tar``.

    Each sample becomes ``{key}.png`` and ``{key}.txt`` (and ``{key}.json`` with the metadata), keyed by its
    running number. Returns the shard paths in order; no samples, no shards.
    """
    records = (
        {"png": image, "txt": caption, **({"json": metadata[0]} if metadata else {})}
        for image, caption, *metadata in samples
    )
    return write_records(records, out_dir, samples_per_shard, prefix)


def write_records(
    records: Iterable[dict[str, object]],
    out_dir: str | os.PathLike[str],
    samples_per_shard: int = 1000,
    prefix: str = "shard",
) -> list[Path]:
    """Write samples, each a ``{extension: value}`` dict of its members, as tars ``{prefix}-{index:06d}.tar``.

    Members are named ``{key}.{extension}`` with the key the sample's running number (``000000042``); values
    are encoded by webdataset's ``TarWriter`` (bytes as they are, str as UTF-8, PIL images by extension, dicts
    as JSON). ``records`` is consumed lazily. Returns the shard paths in order; no records, no shards.
    """
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be at least 1, got {samples_per_shard}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    writer = handle = None
    try:
        for index, record in enumerate(records):
            if index % samples_per_shard == 0:
                if writer is not None:
                    writer.close()
                    handle.close()
                paths.append(out / f"{prefix}-{len(paths):06d}.tar")
                # A file we open: given a path, webdataset would run one that starts with "pipe:" as a shell command.
                handle = open(paths[-1], "wb")  # closed with the writer
                writer = wds.TarWriter(handle)
            writer.write({"__key__": f"{index:09d}", **record})
    finally:
        if writer is not None:
            writer.close()
            handle.close()
    return paths
