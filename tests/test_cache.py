"""`rglcd cache` and the cached stream: the files, their equality with the encoders, the stream contract, checks."""

import itertools
import json
import shutil
import tarfile
from types import SimpleNamespace

import pytest
import torch
import webdataset as wds
from safetensors.torch import load as load_tensors

from rglcd.cli import main
from rglcd.data import (
    CachedStream,
    DataError,
    TrainStream,
    check_cache,
    is_cache,
    teacher_fingerprint,
    write_cache,
    write_shards,
)
from rglcd.experiments.demo import colour_samples
from rglcd.models import encode_prompts, load_teacher
from rglcd.tiny import save_tiny_pipeline

SAMPLES, PER_SHARD, RESOLUTION = 20, 4, 32  # the tiny VAE has scale factor 4: latents [4, 8, 8]
LATENT_PARAMETERS_SHAPE, PROMPT_EMBEDS_SHAPE = (8, 8, 8), (16, 32)  # [2C, h, w]; [L, D] of the tiny text encoder


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny teacher, 20 captioned images in 5 shards of 4, and their float32 cache with the same shard layout."""
    root = tmp_path_factory.mktemp("cache")
    teacher = save_tiny_pipeline(root / "teacher", seed=0)
    samples = ((image, f"{caption} {i}") for i, (image, caption) in enumerate(colour_samples(SAMPLES, 40, seed=0)))
    write_shards(samples, root / "data", samples_per_shard=PER_SHARD)
    cache = write_cache(
        teacher, root / "data", root / "cache", resolution=RESOLUTION, batch_size=4, samples_per_shard=PER_SHARD,
        progress=False,
    )  # fmt: skip
    return SimpleNamespace(teacher=teacher, source=root / "data", cache=cache, model=load_teacher(teacher))


def stored(cache):
    """The cache's per-sample tensors and captions, read from its tars directly, in order."""
    tensors, captions = [], []
    for name in json.loads((cache / "cache_info.json").read_text())["shards"]:
        with tarfile.open(cache / name) as tar:
            for member in tar.getmembers():
                data = tar.extractfile(member).read()
                if member.name.endswith(".safetensors"):
                    tensors.append(load_tensors(data))
                else:
                    captions.append(data.decode())
    return tensors, captions


def take(stream, n):
    return list(itertools.islice(iter(stream), n))


def captions_of(batches):
    return [caption for batch in batches for caption in batch["captions"]]


@torch.no_grad()
def encoded(model, batches):
    """What the trainer computes from image batches: VAE posterior parameters and caption embeddings."""
    parameters = torch.cat([model.vae.encode(batch["pixel_values"]).latent_dist.parameters for batch in batches])
    embeds = torch.cat([encode_prompts(model.tokenizer, model.text_encoder, batch["captions"]) for batch in batches])
    return parameters, embeds


def test_cli_writes_shards_info_and_uncond(setup, tmp_path, capsys):
    out = tmp_path / "cli-cache"
    main([
        "cache", "--teacher", str(setup.teacher), "--data", str(setup.source), "--out", str(out),
        "--resolution", str(RESOLUTION), "--samples", "10", "--batch-size", "3", "--samples-per-shard", "4",
        "--device", "cpu",
    ])  # fmt: skip
    assert "cached 10 samples in 3 shards" in capsys.readouterr().out
    assert sorted(path.name for path in out.iterdir()) == [
        "cache-000000.tar", "cache-000001.tar", "cache-000002.tar", "cache_info.json", "uncond.safetensors",
    ]  # fmt: skip
    assert not out.with_name("cli-cache.partial").exists()
    with tarfile.open(out / "cache-000002.tar") as tar:
        assert tar.getnames() == ["000000008.safetensors", "000000008.txt", "000000009.safetensors", "000000009.txt"]
    info = json.loads((out / "cache_info.json").read_text())
    assert info["samples"] == 10 and info["shards"] == ["cache-000000.tar", "cache-000001.tar", "cache-000002.tar"]
    assert info["teacher"] == str(setup.teacher) and info["resolution"] == RESOLUTION and info["dtype"] == "float32"
    assert info["latent_shape"] == [4, 8, 8] and info["prompt_embeds_shape"] == list(PROMPT_EMBEDS_SHAPE)
    assert info["scaling_factor"] == setup.model.vae.config.scaling_factor
    assert info["fingerprint"] == teacher_fingerprint(setup.model)
    assert is_cache(out) and not is_cache(setup.source) and not is_cache(tmp_path / "nowhere")
    assert stored(out)[1] == stored(setup.cache)[1][:10]  # --samples: the first 10 in source order

    with pytest.raises(SystemExit) as exit_info:  # the output exists
        main(["cache", "--teacher", str(setup.teacher), "--data", str(setup.source), "--out", str(out),
              "--resolution", "32", "--device", "cpu"])  # fmt: skip
    assert exit_info.value.code == 2 and "already exists" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["cache", "--teacher", str(setup.teacher), "--data", str(tmp_path / "nowhere"), "--out",
              str(tmp_path / "other"), "--resolution", "32", "--device", "cpu"])  # fmt: skip
    assert "does not exist" in capsys.readouterr().err and not (tmp_path / "other").exists()


def test_a_failed_write_leaves_no_cache(setup, tmp_path):
    bad = tmp_path / "bad"
    with wds.TarWriter(str(tmp_path / "bad.tar")) as writer:
        writer.write({"__key__": "0", "png": b"not an image", "txt": "a caption"})
    with pytest.raises(DataError, match="no usable sample"):
        write_cache(setup.teacher, tmp_path / "bad.tar", bad, resolution=RESOLUTION, progress=False)
    assert not bad.exists() and not bad.with_name("bad.partial").exists()


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_cached_tensors_are_the_encoders_output(setup, tmp_path, dtype):
    """float32: bit-identical to the VAE and text encoder on the same batches; float16: those values rounded."""
    cache = setup.cache
    if dtype == "float16":
        cache = write_cache(
            setup.teacher, setup.source, tmp_path / "half", resolution=RESOLUTION, batch_size=4, dtype=dtype,
            samples_per_shard=PER_SHARD, progress=False,
        )  # fmt: skip
    # The writer's batches: 4 at a time in source order (VAE rounding depends on the batch's composition).
    image_batches = take(TrainStream(setup.source, resolution=RESOLUTION, batch_size=4), SAMPLES // 4)
    parameters, embeds = encoded(setup.model, image_batches)
    tensors, captions = stored(cache)
    assert captions == captions_of(image_batches) == [f"{c} {i}" for i, (_, c) in enumerate(colour_samples(20, 40, 0))]
    rounded = torch.float16 if dtype == "float16" else torch.float32
    assert all(sample["latent_parameters"].dtype == rounded for sample in tensors)
    assert torch.equal(torch.stack([sample["latent_parameters"] for sample in tensors]), parameters.to(rounded))
    assert torch.equal(torch.stack([sample["prompt_embeds"] for sample in tensors]), embeds.to(rounded))
    with torch.no_grad():
        uncond = encode_prompts(setup.model.tokenizer, setup.model.text_encoder, [""])[0]
    (batch,) = take(CachedStream(cache, batch_size=SAMPLES), 1)
    assert batch["latent_parameters"].dtype == batch["prompt_embeds"].dtype == torch.float32
    assert torch.equal(batch["latent_parameters"], parameters.to(rounded).float())
    assert torch.equal(CachedStream(cache, batch_size=1).uncond_embeds, uncond)  # always float32


@pytest.mark.parametrize(
    ("options", "batches"),
    [
        ({}, 12),  # source order, three epochs
        ({"seed": 3, "shuffle_buffer": 6, "caption_dropout": 0.3}, 12),
        ({"seed": 5, "shuffle_buffer": 3, "rank": 1, "world_size": 2}, 6),  # 5 shards: split by shard
        ({"seed": 5, "shuffle_buffer": 2, "rank": 4, "world_size": 6, "caption_dropout": 0.5}, 5),  # by sample
    ],
)
def test_cached_stream_gives_train_streams_samples(setup, options, batches):
    """Same shard layout and arguments: the same samples in the same order, split and dropout as TrainStream."""
    from_images = take(TrainStream(setup.source, resolution=RESOLUTION, batch_size=2, **options), batches)
    cached_stream = CachedStream(setup.cache, batch_size=2, **options)
    from_cache = take(cached_stream, batches)
    assert captions_of(from_cache) == captions_of(from_images)
    assert len(set(captions_of(from_cache))) > 2
    assert cached_stream.state_dict()["epoch"] >= 1 and cached_stream.stats.seen > 0
    parameters, embeds = encoded(setup.model, from_images)  # "" embeds the empty prompt
    batch = from_cache[0]
    assert batch.keys() == {"latent_parameters", "prompt_embeds", "captions"}
    assert batch["latent_parameters"].shape == (2, *LATENT_PARAMETERS_SHAPE)
    assert batch["prompt_embeds"].shape == (2, *PROMPT_EMBEDS_SHAPE)
    # Not bit-identical: these batches group other images than the writer's did (float32 rounding, ~1e-6).
    torch.testing.assert_close(torch.cat([b["latent_parameters"] for b in from_cache]), parameters)
    torch.testing.assert_close(torch.cat([b["prompt_embeds"] for b in from_cache]), embeds)


def test_resume_mid_epoch_gives_the_same_next_batches(setup):
    options = {"batch_size": 3, "seed": 7, "shuffle_buffer": 5, "caption_dropout": 0.3}
    reference = CachedStream(setup.cache, **options)
    batches, states = [], [reference.state_dict()]
    for batch in itertools.islice(iter(reference), 10):  # 30 samples: the epoch of 20 ends inside batch 7
        batches.append(batch)
        states.append(json.loads(json.dumps(reference.state_dict())))
    assert states[4]["epoch"] == 0 < states[7]["epoch"]

    for k in (1, 4, 6, 7):
        interrupted = CachedStream(setup.cache, **options)
        consumed = take(interrupted, k)
        assert interrupted.state_dict() == states[k]
        resumed = CachedStream(setup.cache, **options)
        resumed.load_state_dict(json.loads(json.dumps(interrupted.state_dict())))
        rest = take(resumed, 10 - k)
        assert captions_of(consumed + rest) == captions_of(batches)
        for a, b in zip(consumed + rest, batches, strict=True):
            assert torch.equal(a["latent_parameters"], b["latent_parameters"])
            assert torch.equal(a["prompt_embeds"], b["prompt_embeds"])
        assert resumed.stats == reference.stats
    assert captions_of(take(CachedStream(setup.cache, **options), 1)) != captions_of(batches[4:5])
    with pytest.raises(ValueError, match="same sample order"):
        CachedStream(setup.cache, **{**options, "seed": 8}).load_state_dict(states[4])


def test_caption_dropout_uses_the_uncond_embedding(setup):
    (kept,) = take(CachedStream(setup.cache, batch_size=SAMPLES, seed=1), 1)
    stream = CachedStream(setup.cache, batch_size=SAMPLES, seed=1, caption_dropout=0.5)
    (batch,) = take(stream, 1)
    dropped = [caption == "" for caption in batch["captions"]]
    assert 0 < sum(dropped) < SAMPLES
    with torch.no_grad():
        uncond = encode_prompts(setup.model.tokenizer, setup.model.text_encoder, [""])[0]
    for i, is_dropped in enumerate(dropped):
        if is_dropped:
            assert torch.equal(batch["prompt_embeds"][i], uncond)
        else:
            assert batch["captions"][i] == kept["captions"][i]
            assert torch.equal(batch["prompt_embeds"][i], kept["prompt_embeds"][i])
            assert not torch.equal(batch["prompt_embeds"][i], uncond)
    assert torch.equal(batch["latent_parameters"], kept["latent_parameters"])  # dropout leaves the images alone


def test_a_cache_of_another_teacher_or_resolution_is_rejected(setup, teacher_dirs):
    fingerprint = teacher_fingerprint(setup.model)
    assert check_cache(setup.cache, fingerprint, RESOLUTION)["samples"] == SAMPLES
    # The fingerprint is of the encoders, not the path: an identical teacher saved elsewhere fits.
    assert teacher_fingerprint(load_teacher(teacher_dirs["epsilon"])) == fingerprint
    # Same configs, other weights (another seed): both encoders differ.
    other = teacher_fingerprint(load_teacher(teacher_dirs["v_prediction"]))
    with pytest.raises(DataError) as error:
        check_cache(setup.cache, other, RESOLUTION)
    message = str(error.value)
    for words in (str(setup.cache), str(setup.teacher), "vae and text encoder differ", "rglcd cache --teacher"):
        assert words in message
    with pytest.raises(DataError, match="whose text encoder differ"):
        check_cache(setup.cache, {**fingerprint, "text_encoder": other["text_encoder"]}, RESOLUTION)
    with pytest.raises(DataError, match="it holds 32 px images, this run trains at 64 px"):
        check_cache(setup.cache, fingerprint, 64)
    with pytest.raises(DataError, match="centre crops without flips"):
        check_cache(setup.cache, fingerprint, RESOLUTION, random_flip=True)


def rewrite_sample(shard, index, tensors_bytes):
    """Rewrite ``shard`` with the ``index``-th sample's tensors member replaced."""
    with tarfile.open(shard) as tar:
        members = [(member.name, tar.extractfile(member).read()) for member in tar.getmembers()]
    samples = {}
    for name, data in members:
        key, extension = name.split(".", 1)
        samples.setdefault(key, {"__key__": key})[extension] = data
    with wds.TarWriter(str(shard)) as writer:
        for position, sample in enumerate(samples.values()):
            writer.write({**sample, "safetensors": tensors_bytes} if position == index else sample)


@pytest.mark.parametrize(
    ("kind", "words"),
    [
        ("no-folder", "is not an rglcd cache: it has no cache_info.json"),
        ("image-shards", "is not an rglcd cache: it has no cache_info.json"),
        ("interrupted", "its write was interrupted"),
        ("damaged-info", "cache_info.json is damaged"),
        ("info-without-keys", "it lacks fingerprint, shards"),
        ("missing-shard", "is incomplete: 1 of its files are missing (cache-000003.tar)"),
        ("missing-uncond", "is incomplete: 1 of its files are missing (uncond.safetensors)"),
        ("damaged-uncond", "uncond.safetensors is damaged"),
        ("truncated-shards", "gave no usable sample in a whole pass"),
    ],
)
def test_a_missing_or_damaged_cache_is_a_clear_data_error(setup, tmp_path, kind, words):
    cache = tmp_path / "cache"
    if kind == "image-shards":
        cache = setup.source
    elif kind != "no-folder":
        shutil.copytree(setup.cache, cache)
    info_file = cache / "cache_info.json"
    if kind == "interrupted":
        cache.rename(tmp_path / "cache.partial")
        (tmp_path / "cache.partial" / "cache_info.json").unlink()
    elif kind == "damaged-info":
        info_file.write_text('{"format": "rglcd-cache", ')
    elif kind == "info-without-keys":
        info = json.loads(info_file.read_text())
        del info["fingerprint"], info["shards"]
        info_file.write_text(json.dumps(info))
    elif kind == "missing-shard":
        (cache / "cache-000003.tar").unlink()
    elif kind == "missing-uncond":
        (cache / "uncond.safetensors").unlink()
    elif kind == "damaged-uncond":
        (cache / "uncond.safetensors").write_bytes(b"\x00" * 12)
    elif kind == "truncated-shards":
        for shard in cache.glob("*.tar"):
            shard.write_bytes(shard.read_bytes()[:700])  # inside the first sample's tensors
    with pytest.raises(DataError) as error:
        next(iter(CachedStream(cache, batch_size=2)))
    assert words in str(error.value) and str(cache) in str(error.value)
    if kind == "truncated-shards":
        assert "truncated tar member" in str(error.value) and "make it again with `rglcd cache`" in str(error.value)
    elif kind not in ("image-shards", "damaged-uncond"):  # check_cache checks the same files, not their bytes
        with pytest.raises(DataError, match="cache"):
            check_cache(cache, teacher_fingerprint(setup.model), RESOLUTION)


def test_a_damaged_sample_is_skipped_and_counted(setup, tmp_path):
    cache = shutil.copytree(setup.cache, tmp_path / "cache")
    rewrite_sample(cache / "cache-000001.tar", 2, b"not safetensors")  # sample 6
    stream = CachedStream(cache, batch_size=SAMPLES - 1)
    (batch,) = take(stream, 1)
    assert batch["captions"] == [c for i, c in enumerate(stored(setup.cache)[1]) if i != 6]
    assert stream.stats.reasons == {"undecodable tensors": 1} and stream.stats.seen == SAMPLES


def test_the_default_encoder_batch_shrinks_with_the_resolution():
    """32 images of 512 px per call hold a 4 GiB float32 activation (128 channels) in the VAE encoder; 32 of 1024 px
    would hold 16 GiB: the default keeps the 4 GiB."""
    from rglcd.data.cache import default_cache_batch

    assert [default_cache_batch(size) for size in (32, 512, 768, 1024, 4096)] == [32, 32, 14, 8, 1]
