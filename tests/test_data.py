import io
import itertools
import json
import tarfile

import pytest
import torch
import webdataset as wds
from PIL import Image

from rglcd.data import DataError, DataStats, TrainStream, write_shards


def colour(i: int) -> tuple[int, int, int]:
    return (37 * i) % 256, (255 - 23 * i) % 256, (11 * i) % 256


def solid(i: int, size: tuple[int, int] = (40, 48)) -> Image.Image:
    return Image.new("RGB", size, colour(i))


def encoded(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


def write_tar(path, records: list[dict]):
    with wds.TarWriter(str(path)) as writer:
        for record in records:
            writer.write(record)
    return path


def good(i: int, caption: str | None = None) -> dict:
    return {"__key__": f"{i:04d}", "png": encoded(solid(i)), "txt": caption or f"caption {i}"}


def shards(tmp_path, n: int, per_shard: int, name: str = "shards"):
    write_shards(((solid(i), f"caption {i}") for i in range(n)), tmp_path / name, samples_per_shard=per_shard)
    return tmp_path / name


def captioned_folder(tmp_path, n: int, kind: str = "jsonl"):
    folder = tmp_path / kind
    folder.mkdir()
    for i in range(n):
        solid(i).save(folder / f"{i}.png")
    if kind == "jsonl":  # both caption keys
        lines = [json.dumps({"file": f"{i}.png", ("caption" if i % 2 else "text"): f"caption {i}"}) for i in range(n)]
        (folder / "captions.jsonl").write_text("\n".join(lines) + "\n")
    else:
        (folder / "captions.csv").write_text("file,caption\n" + "".join(f"{i}.png,caption {i}\n" for i in range(n)))
    return folder


def stream(source, **kwargs) -> TrainStream:
    return TrainStream(str(source), **{"resolution": 16, "batch_size": 1, **kwargs})


def take(train_stream: TrainStream, n: int) -> list[dict]:
    return list(itertools.islice(iter(train_stream), n))


def captions_of(batches: list[dict]) -> list[str]:
    return [caption for batch in batches for caption in batch["captions"]]


def expected_pixel(i: int) -> torch.Tensor:
    return torch.tensor(colour(i), dtype=torch.float32) / 127.5 - 1


def test_write_shards_names_members_and_metadata(tmp_path):
    samples = [(solid(i), f"caption {i}") for i in range(4)] + [(solid(4), "caption 4", {"caption": "x", "n": 4})]
    paths = write_shards(samples, tmp_path / "out", samples_per_shard=2, prefix="cc")
    assert [p.name for p in paths] == ["cc-000000.tar", "cc-000001.tar", "cc-000002.tar"]
    with tarfile.open(paths[0]) as tar:
        assert tar.getnames() == ["000000000.png", "000000000.txt", "000000001.png", "000000001.txt"]
        assert tar.extractfile("000000001.txt").read() == b"caption 1"
        assert Image.open(tar.extractfile("000000001.png")).getpixel((0, 0)) == colour(1)
    with tarfile.open(paths[2]) as tar:
        assert json.loads(tar.extractfile("000000004.json").read()) == {"caption": "x", "n": 4}
    assert write_shards([], tmp_path / "none") == []
    assert list((tmp_path / "none").iterdir()) == []


def test_a_folder_named_like_a_pipe_url_is_a_folder(tmp_path, monkeypatch):
    """`rglcd world data --out 'pipe:touch pwned'` writes shards there; it never runs a shell command."""
    monkeypatch.chdir(tmp_path)
    (path,) = write_shards([(solid(0), "caption 0")], "pipe:touch pwned")
    assert tarfile.is_tarfile(tmp_path / path) and not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("kind", ["tar", "pattern", "directory", "pipe", "jsonl", "csv"])
def test_reads_every_source_form_in_order_with_matching_images(tmp_path, kind):
    if kind in ("jsonl", "csv"):
        source = captioned_folder(tmp_path, 6, kind)
    else:
        folder = shards(tmp_path, 6, per_shard=6 if kind in ("tar", "pipe") else 2)
        source = {
            "tar": folder / "shard-000000.tar",
            "pattern": f"{folder}/shard-{{000000..000002}}.tar",
            "directory": folder,
            "pipe": f"pipe:cat {folder}/shard-000000.tar",
        }[kind]
    batches = take(stream(source, batch_size=2), 4)  # 8 samples: one epoch of 6, then the start of the next
    assert captions_of(batches) == [f"caption {i}" for i in [0, 1, 2, 3, 4, 5, 0, 1]]
    pixels = torch.cat([batch["pixel_values"] for batch in batches])
    for pixel, i in zip(pixels[:, :, 0, 0], [0, 1, 2, 3, 4, 5, 0, 1], strict=True):
        torch.testing.assert_close(pixel, expected_pixel(i), atol=1 / 255, rtol=0)


def test_cc12m_layout_keys(tmp_path):
    records = [
        {"__key__": "a", "jpg": encoded(solid(0), "JPEG"), "json": {"caption": "from json caption", "url": "u"}},
        {"__key__": "b", "jpeg": encoded(solid(1), "JPEG"), "txt": "from txt", "json": {"caption": "not this"}},
        {"__key__": "c", "webp": encoded(solid(2), "WEBP"), "caption": "from caption member"},
        {"__key__": "d", "png": encoded(solid(3)), "json": {"text": "from json text"}},
    ]
    source = write_tar(tmp_path / "cc.tar", records)
    assert captions_of(take(stream(source), 4)) == [
        "from json caption",
        "from txt",
        "from caption member",
        "from json text",
    ]


def test_batch_shape_range_and_dtype(tmp_path):
    images = [
        Image.new("RGB", (40, 48), "white"),
        Image.new("RGB", (48, 40), "black"),
        Image.new("L", (100, 30), 128),
        Image.new("RGBA", (20, 20), (255, 0, 0, 255)),
    ]
    source = write_tar(
        tmp_path / "mixed.tar",
        [{"__key__": f"{i}", "png": encoded(image), "txt": "x"} for i, image in enumerate(images)],
    )
    (batch,) = take(stream(source, resolution=24, batch_size=4, center_crop=False, random_flip=True), 1)
    pixels = batch["pixel_values"]
    assert pixels.shape == (4, 3, 24, 24) and pixels.dtype == torch.float32
    assert torch.all(pixels[0] == 1.0) and torch.all(pixels[1] == -1.0)  # 255 -> 1, 0 -> -1 exactly
    assert pixels.min() >= -1 and pixels.max() <= 1
    torch.testing.assert_close(pixels[3, :, 5, 5], torch.tensor([1.0, -1.0, -1.0]))  # RGBA -> RGB
    assert batch["captions"] == ["x"] * 4


def rows_image(size: tuple[int, int]) -> Image.Image:
    """Red encodes the row (4·y), green the column (4·x), so a crop's offset can be read off its pixels."""
    width, height = size
    image = Image.new("RGB", size)
    image.putdata([(4 * y, 4 * x, 0) for y in range(height) for x in range(width)])
    return image


def window(image: Image.Image, left: int, top: int, size: int) -> torch.Tensor:
    crop = torch.tensor(list(image.crop((left, top, left + size, top + size)).getdata()), dtype=torch.float32)
    return crop.reshape(size, size, 3).permute(2, 0, 1) / 127.5 - 1


def test_center_crop_is_the_middle_square(tmp_path):
    tall, wide = rows_image((40, 64)), rows_image((64, 40))
    source = write_tar(
        tmp_path / "crop.tar",
        [{"__key__": "t", "png": encoded(tall), "txt": "t"}, {"__key__": "w", "png": encoded(wide), "txt": "w"}],
    )
    (batch,) = take(stream(source, resolution=40, batch_size=2), 1)
    assert torch.equal(batch["pixel_values"][0], window(tall, 0, 12, 40))
    assert torch.equal(batch["pixel_values"][1], window(wide, 12, 0, 40))


def test_random_crop_offsets_vary_and_follow_the_seed(tmp_path):
    tall = rows_image((40, 44))  # 4 rows of slack: offsets 0..4
    source = write_tar(
        tmp_path / "crop.tar", [{"__key__": f"{i:02d}", "png": encoded(tall), "txt": "t"} for i in range(16)]
    )

    def offsets(seed: int) -> list[int]:
        (batch,) = take(stream(source, resolution=40, batch_size=16, center_crop=False, seed=seed), 1)
        tops = []
        for pixels in batch["pixel_values"]:
            top = round((pixels[0, 0, 0].item() + 1) * 127.5 / 4)
            assert torch.equal(pixels, window(tall, 0, top, 40))
            tops.append(top)
        return tops

    assert set(offsets(0)) == {0, 1, 2, 3, 4}
    assert offsets(0) == offsets(0)
    assert offsets(0) != offsets(1)


def test_flips_are_seeded_and_only_when_enabled(tmp_path):
    image = rows_image((40, 40))
    source = write_tar(
        tmp_path / "flip.tar", [{"__key__": f"{i:02d}", "png": encoded(image), "txt": "f"} for i in range(32)]
    )
    plain, mirrored = window(image, 0, 0, 40), window(image, 0, 0, 40).flip(-1)

    def flips(**kwargs) -> list[bool]:
        (batch,) = take(stream(source, resolution=40, batch_size=32, **kwargs), 1)
        assert all(torch.equal(p, plain) or torch.equal(p, mirrored) for p in batch["pixel_values"])
        return [torch.equal(p, mirrored) for p in batch["pixel_values"]]

    assert 8 <= sum(flips(random_flip=True)) <= 24
    assert flips(random_flip=True, seed=3) == flips(random_flip=True, seed=3)
    assert flips(random_flip=True, seed=3) != flips(random_flip=True, seed=4)
    assert not any(flips(random_flip=False))


def test_caption_dropout_rate_and_seed(tmp_path):
    tiny = encoded(Image.new("RGB", (8, 8), "gray"))
    source = write_tar(
        tmp_path / "drop.tar", [{"__key__": f"{i:03d}", "png": tiny, "txt": f"caption {i}"} for i in range(200)]
    )

    def captions(**kwargs) -> list[str]:
        return take(stream(source, resolution=8, batch_size=200, **kwargs), 1)[0]["captions"]

    dropped = captions(caption_dropout=0.3)
    assert 40 <= dropped.count("") <= 80
    assert all(c in ("", f"caption {i}") for i, c in enumerate(dropped))
    assert captions(caption_dropout=0.3) == dropped
    assert captions(caption_dropout=0.3, seed=1) != dropped
    assert captions() == [f"caption {i}" for i in range(200)]


def truncate_in_member(path, member_name: str) -> None:
    with tarfile.open(path) as tar:
        member = tar.getmember(member_name)
    data = path.read_bytes()
    path.write_bytes(data[: member.offset_data + member.size // 2])


def bad_data(tmp_path):
    """Six usable samples among an undecodable image, a blank caption, a missing caption and a cut tar."""
    folder = tmp_path / "bad"
    folder.mkdir()
    long_caption = "a very long caption " * 300
    write_tar(
        folder / "a.tar",
        [
            good(0),
            {"__key__": "0100", "png": b"\x89PNG this is not an image", "txt": "undecodable"},
            good(1),
            {"__key__": "0101", "png": encoded(solid(9)), "txt": " \n\t"},
            good(2),
            {"__key__": "0102", "png": encoded(solid(9))},
            good(3, long_caption),
        ],
    )
    write_tar(folder / "b.tar", [good(4), good(5), good(6), good(7)])
    truncate_in_member(folder / "b.tar", "0006.png")  # 6 is cut in half and 7 is lost with it
    usable = ["caption 0", "caption 1", "caption 2", long_caption, "caption 4", "caption 5"]
    return folder, usable


def test_bad_samples_are_skipped_and_counted(tmp_path):
    source, usable = bad_data(tmp_path)
    train_stream = stream(source)
    assert train_stream.stats == DataStats()
    captions = captions_of(take(train_stream, len(usable) + 1))  # the whole first pass and the next sample
    assert captions == [*usable, "caption 0"]
    assert train_stream.stats.reasons == {
        "undecodable image": 1,
        "empty caption": 1,
        "missing caption": 1,
        "truncated tar member": 1,
    }
    assert train_stream.stats.skipped == 4
    assert train_stream.stats.seen == len(usable) + 4 + 1


@pytest.mark.parametrize(
    "kind", ["missing-path", "pattern-matching-nothing", "pattern-with-missing-shards", "empty-dir", "empty-jsonl"]
)
def test_missing_or_empty_sources_raise_at_construction(tmp_path, kind):
    if kind == "missing-path":
        source, words = tmp_path / "nowhere", ["does not exist", "pass a webdataset .tar"]
    elif kind == "pattern-matching-nothing":
        source, words = f"{tmp_path}/shard-{{000..003}}.tar", ["matches no file"]
    elif kind == "pattern-with-missing-shards":
        write_tar(tmp_path / "s-0.tar", [good(0)])
        source, words = f"{tmp_path}/s-{{0..2}}.tar", ["2 of the 3 shards", "s-1.tar", "pass the directory"]
    elif kind == "empty-dir":
        source, words = tmp_path, ["holds no .tar shards and no captions.jsonl or captions.csv"]
    else:
        (tmp_path / "captions.jsonl").write_text("\n")
        source, words = tmp_path, ["captions.jsonl lists no images"]
    with pytest.raises(DataError) as error:
        stream(source)
    for word in [str(source), *words]:
        assert word in str(error.value)


@pytest.mark.parametrize(
    "kind", ["empty-tar", "not-a-tar", "all-bad-tar", "failing-pipe", "images-missing", "rank-without-data"]
)
def test_sources_without_a_usable_sample_raise_instead_of_looping(tmp_path, kind):
    kwargs = {}
    if kind == "empty-tar":
        source = tmp_path / "empty.tar"
        source.write_bytes(b"")
    elif kind == "not-a-tar":
        source = tmp_path / "random.tar"
        source.write_bytes(bytes(range(256)) * 8)
    elif kind == "all-bad-tar":
        source = write_tar(
            tmp_path / "bad.tar",
            [{"__key__": "a", "png": b"junk", "txt": "x"}, {"__key__": "b", "png": encoded(solid(0)), "txt": ""}],
        )
    elif kind == "failing-pipe":
        source = f"pipe:cat {tmp_path}/absent.tar 2>/dev/null"
    elif kind == "images-missing":
        source = tmp_path
        (tmp_path / "captions.jsonl").write_text(json.dumps({"file": "gone.png", "caption": "c"}) + "\n")
    else:
        source = write_tar(tmp_path / "one.tar", [good(0)])
        kwargs = {"rank": 1, "world_size": 2}
    with pytest.raises(DataError, match="no usable sample") as error:
        next(iter(stream(source, shuffle_buffer=4, **kwargs)))
    assert str(source) in str(error.value)
    if kind == "rank-without-data":
        assert "rank 1 of 2" in str(error.value)


def test_same_arguments_same_batches_other_seed_other_batches(tmp_path):
    source = shards(tmp_path, 10, per_shard=3)
    options = {"batch_size": 4, "center_crop": False, "random_flip": True, "caption_dropout": 0.2, "shuffle_buffer": 5}
    first, second = take(stream(source, **options), 5), take(stream(source, **options), 5)
    other = take(stream(source, seed=1, **options), 5)
    assert captions_of(first) == captions_of(second)
    assert all(torch.equal(a["pixel_values"], b["pixel_values"]) for a, b in zip(first, second, strict=True))
    assert captions_of(first) != captions_of(other)


def test_each_epoch_is_a_new_permutation(tmp_path):
    source = shards(tmp_path, 10, per_shard=10)  # one shard: the shuffle buffer alone must reshuffle
    captions = captions_of(take(stream(source, shuffle_buffer=8), 20))
    epoch_0, epoch_1 = captions[:10], captions[10:]
    everything = sorted(f"caption {i}" for i in range(10))
    assert sorted(epoch_0) == everything and sorted(epoch_1) == everything
    assert epoch_0 != epoch_1
    assert epoch_0 != [f"caption {i}" for i in range(10)]


@pytest.mark.parametrize("kind", ["bad-shards", "folder"])
def test_resume_continues_with_the_exact_next_batches(tmp_path, kind):
    if kind == "bad-shards":
        source, _ = bad_data(tmp_path)  # 6 usable samples of 10 read, and a tar error, per epoch
    else:
        source = captioned_folder(tmp_path, 7)
    options = {
        "resolution": 16,
        "batch_size": 3,
        "center_crop": False,
        "random_flip": True,
        "caption_dropout": 0.25,
        "shuffle_buffer": 4,
        "seed": 7,
    }
    reference = TrainStream(str(source), **options)
    batches, states = [], [reference.state_dict()]
    for batch in itertools.islice(iter(reference), 8):
        batches.append(batch)
        states.append(json.loads(json.dumps(reference.state_dict())))
    assert states[3]["epoch"] < states[7]["epoch"]  # batches 3..6 cross an epoch boundary

    for k in range(8):  # resume after every prefix, including at the end of an epoch
        interrupted = TrainStream(str(source), **options)
        consumed = take(interrupted, k)
        assert interrupted.state_dict() == states[k]
        resumed = TrainStream(str(source), **options)
        resumed.load_state_dict(json.loads(json.dumps(interrupted.state_dict())))
        rest = take(resumed, 8 - k)
        assert captions_of(consumed + rest) == captions_of(batches)
        pairs = zip([*consumed, *rest], batches, strict=True)
        assert all(torch.equal(a["pixel_values"], b["pixel_values"]) for a, b in pairs)
        assert resumed.stats == reference.stats
    # A fresh stream would start over, so the equality above is not trivial.
    assert captions_of(take(TrainStream(str(source), **options), 1)) != captions_of(batches[3:4])

    other_seed = TrainStream(str(source), **{**options, "seed": 8})
    with pytest.raises(ValueError, match="same sample order"):
        other_seed.load_state_dict(states[3])


@pytest.mark.parametrize(
    ("n_shards", "per_shard", "world_size"),
    [(4, 3, 2), (5, 2, 3), (1, 10, 3), (4, 2, 5)],  # by shard, by shard with uneven ranks, by sample twice
)
def test_ranks_get_disjoint_subsets_that_cover_the_data(tmp_path, n_shards, per_shard, world_size):
    source = shards(tmp_path, n_shards * per_shard, per_shard=per_shard)
    by_shard = n_shards >= world_size
    everything: list[str] = []
    for rank in range(world_size):
        expected = (
            per_shard * len(range(rank, n_shards, world_size))
            if by_shard
            else len(range(rank, n_shards * per_shard, world_size))
        )
        train_stream = stream(source, rank=rank, world_size=world_size, shuffle_buffer=3, seed=5)
        epoch = captions_of(take(train_stream, expected))
        assert train_stream.state_dict()["epoch"] == 0
        take(train_stream, 1)
        assert train_stream.state_dict()["epoch"] == 1  # so the rank's epoch had exactly `expected` samples
        everything += epoch
    assert sorted(everything) == sorted(f"caption {i}" for i in range(n_shards * per_shard))  # disjoint, covering


@pytest.mark.parametrize("kind", ["jsonl", "csv"])
def test_unreadable_caption_lines_are_skipped_and_counted_never_fatal(tmp_path, kind):
    """A field over the csv limit, a non-UTF-8 line, extra columns, an unclosed quote and paths outside the folder
    are each one skipped entry with its reason; the good entries around them all arrive, in order."""
    folder = captioned_folder(tmp_path, 3, kind)
    (tmp_path / "outside.png").write_bytes((folder / "0.png").read_bytes())
    captions = folder / f"captions.{kind}"
    good_lines = captions.read_bytes().splitlines(keepends=True)
    if kind == "jsonl":
        bad = [
            json.dumps({"file": "1.png", "caption": "x" * 200_000}).encode(),
            b'{"file": "2.png", "caption": "caf\xe9"}',
            json.dumps({"file": str(folder / "0.png"), "caption": "absolute"}).encode(),
            json.dumps({"file": "../outside.png", "caption": "parent"}).encode(),
        ]
        reasons = {"oversize captions line": 1, "captions line not UTF-8": 1, "image path outside the folder": 2}
    else:
        bad = [
            b"1.png," + b"x" * 200_000,
            b"2.png,caf\xe9",
            b"1.png,a caption,an extra column",
            b'2.png,"an unclosed quote',
            b"../outside.png,parent",
        ]
        reasons = {
            "oversize captions line": 1, "captions line not UTF-8": 1, "image path outside the folder": 1,
            "captions row with another number of columns than the header": 1, "malformed captions row": 1,
        }  # fmt: skip
    captions.write_bytes(b"".join([*good_lines[:2], *(line + b"\n" for line in bad), *good_lines[2:]]))
    train_stream = stream(folder)
    assert captions_of(take(train_stream, 3)) == ["caption 0", "caption 1", "caption 2"]
    assert train_stream.stats.reasons == reasons


def test_a_pipe_source_says_what_it_runs(tmp_path, capsys):
    folder = shards(tmp_path, 2, per_shard=2)
    command = f"cat {folder}/shard-000000.tar"
    assert captions_of(take(stream(f"pipe:{command}", batch_size=2), 1)) == ["caption 0", "caption 1"]
    assert f"rglcd: data.source runs the shell command: {command}" in capsys.readouterr().err
