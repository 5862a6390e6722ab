"""Cached latents and text embeddings: encode a dataset once, then train without the VAE encoder and text encoder.

Writing: ``rglcd cache --teacher T --data SRC --out DIR --resolution R`` (or :func:`write_cache`) reads SRC once in
source order (centre crop, no flip, every usable sample once), encodes it with the teacher's VAE and text encoder,
and writes DIR atomically (``DIR.partial`` is renamed when complete)::

    DIR/cache_info.json        teacher, fingerprint, resolution, scaling_factor, latent_shape [C, h, w],
                               prompt_embeds_shape [L, D], pooled_prompt_embeds_shape [P] (SDXL; else null),
                               samples, dtype, shards, ...
    DIR/uncond.safetensors     {"prompt_embeds": float32 [L, D]} (and SDXL's "pooled_prompt_embeds" [P]): the
                               empty prompt's conditioning
    DIR/cache-000000.tar ...   webdataset shards; per sample {key}.safetensors holding
                               "latent_parameters" [2C, h, w] (the VAE posterior's mean and logvar, as
                               ``vae.encode(pixels).latent_dist.parameters``), "prompt_embeds" [L, D]
                               (``text_conditioning`` of the caption: SD's encoder, or SDXL's two concatenated)
                               and for SDXL "pooled_prompt_embeds" [P] (its second encoder's pooled projection),
                               in ``dtype`` (float32, or float16 to halve the size); and {key}.txt, the caption

Reading, e.g. in the trainer (the fingerprint is of the teacher as :func:`rglcd.models.load_teacher` returns it,
before any cast to half precision)::

    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
    from rglcd.data.cache import CachedStream, check_cache, is_cache, teacher_fingerprint

    if is_cache(source):
        check_cache(source, teacher_fingerprint(teacher), resolution, center_crop=..., random_flip=...)
        stream = CachedStream(source, batch_size=B, caption_dropout=p, seed=s, shuffle_buffer=n, rank=r,
                              world_size=w)
        uncond_embeds = stream.uncond_embeds.expand(B, -1, -1)  # [B, L, D]
    ...
    batch = next(batches)  # {"latent_parameters": [B, 2C, h, w], "prompt_embeds": [B, L, D], "captions": [B]}
    latents = DiagonalGaussianDistribution(batch["latent_parameters"]).sample(generator) * vae.config.scaling_factor
    cond_embeds = batch["prompt_embeds"]
    added = sdxl_added_cond(batch["pooled_prompt_embeds"], resolution)  # SDXL only: [B, P] and the size ids

:class:`CachedStream` is a :class:`~rglcd.data.TrainStream` over the cache's shards, with the same order,
seeding, rank split, exact resume and :attr:`stats`; its tensors are float32 whatever the dtype on disk.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import torch as safetensors_torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..files import atomic_folder, partial_folder
from ..models import Teacher, load_teacher, text_conditioning
from .sources import DataError, RawSample, Shard, TarShard, write_records
from .stream import SampleDraws, TrainStream, _Unusable, check_raw

INFO_FILE = "cache_info.json"
UNCOND_FILE = "uncond.safetensors"
SAMPLE_MEMBER = "safetensors"  # the tar member of a sample's tensors; the caption is the .txt member
SHARD_PREFIX = "cache"
POOLED = "pooled_prompt_embeds"  # SDXL's pooled text embedding, the UNet's added "text_embeds"
FORMAT = "rglcd-cache"
VERSION = 1
DTYPES = {"float32": torch.float32, "float16": torch.float16}
INFO_KEYS = (
    "teacher", "fingerprint", "resolution", "scaling_factor", "latent_shape", "prompt_embeds_shape", "samples",
    "dtype", "shards",
)  # fmt: skip
# Config entries (besides the "_"-prefixed ones) that say with what a model was saved, not how it computes.
_UNSTABLE_CONFIG_KEYS = {"transformers_version", "dtype", "torch_dtype"}


def default_cache_batch(resolution: int) -> int:
    """Images per encoder call: 32 up to 512 px, fewer above, so that a full-resolution float32 activation of the
    VAE encoder (128 channels) stays at 4 GiB, as 32 images at 512 px make it (1024 px: 8, not 32 and 16 GiB)."""
    return max(1, min(32, 32 * 512**2 // resolution**2))


def write_cache(
    teacher: str | os.PathLike[str],
    source: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    resolution: int,
    samples: int | None = None,
    batch_size: int | None = None,
    samples_per_shard: int = 1000,
    dtype: str = "float32",
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> Path:
    """Encode one pass over ``source`` (at most ``samples``) with ``teacher``'s encoders into the cache ``out``.

    The images are prepared as :class:`~rglcd.data.TrainStream` prepares them with ``center_crop`` and without
    flips or caption dropout, and encoded ``batch_size`` (default :func:`default_cache_batch`) at a time on
    ``device`` in float32; unusable samples are skipped. Raises :class:`DataError` if ``out`` exists or the source
    is unusable; an interrupted write leaves no ``out`` (only ``out.partial``, removed by the next attempt).
    Returns ``out``.
    """
    out = Path(out)
    batch_size = default_cache_batch(resolution) if batch_size is None else batch_size
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    for name, value in (("batch_size", batch_size), ("samples_per_shard", samples_per_shard), ("samples", samples)):
        if value is not None and value < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")
    if out.exists():
        raise DataError(f"{out} already exists; remove it or choose another output folder")
    stream = TrainStream(source, resolution=resolution, batch_size=1)  # source order, centre crop, no flip
    model = load_teacher(teacher)
    if resolution % model.vae_scale_factor:  # training would refuse the cache: data.resolution has the same rule
        raise DataError(
            f"resolution {resolution}: must be a multiple of the VAE's {model.vae_scale_factor} (pixels per latent)"
        )
    for encoder in model.encoders():  # the UNet is not needed
        encoder.to(device)
    with atomic_folder(out) as partial:
        partial.mkdir(parents=True)
        tally = _Tally()
        with tqdm(total=samples, desc="rglcd cache", unit="sample", disable=not progress) as bar:
            records = _encoded_records(
                model, _one_pass(stream, samples), batch_size, DTYPES[dtype], resolution, tally, bar
            )
            shards = write_records(records, partial, samples_per_shard, prefix=SHARD_PREFIX)
        with torch.no_grad():
            uncond = _conditioning_tensors(model, [""], resolution)  # {"prompt_embeds": [1, L, D], ...}
        safetensors_torch.save_file(
            {name: tensor[0].float().cpu().contiguous() for name, tensor in uncond.items()}, partial / UNCOND_FILE
        )
        channels_2c, *latent_size = tally.shapes["latent_parameters"]
        info = {
            "format": FORMAT,
            "version": VERSION,
            "teacher": os.fspath(teacher),
            "fingerprint": teacher_fingerprint(model),
            "resolution": resolution,
            "center_crop": True,
            "random_flip": False,
            "scaling_factor": model.vae.config.scaling_factor,
            "latent_shape": [channels_2c // 2, *latent_size],
            "prompt_embeds_shape": tally.shapes["prompt_embeds"],
            "pooled_prompt_embeds_shape": tally.shapes.get(POOLED),
            "samples": tally.samples,
            "dtype": dtype,
            "shards": [path.name for path in shards],
            "source": os.fspath(source),
        }
        (partial / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
    return out


@dataclass
class _Tally:
    """What :func:`_encoded_records` has written so far: the sample count and one sample's tensor shapes."""

    samples: int = 0
    shapes: dict[str, list[int]] = field(default_factory=dict)


def _one_pass(stream: TrainStream, limit: int | None) -> Iterator[tuple[Tensor, str]]:
    """(pixels [3, R, R], caption) of the usable samples of ``stream``'s first epoch, at most ``limit``."""
    for batch in itertools.islice(stream, limit):  # batches of one
        if stream.state_dict()["epoch"] > 0:  # the first sample of the second pass
            return
        yield batch["pixel_values"][0], batch["captions"][0]


def _conditioning_tensors(teacher: Teacher, prompts: list[str], resolution: int) -> dict[str, Tensor]:
    """What the cache keeps of the prompts' text conditioning: {"prompt_embeds": [B, L, D]} and, for SDXL,
    "pooled_prompt_embeds" [B, P] (the size conditioning is recomputed from the resolution when training)."""
    embeds, added = text_conditioning(teacher, prompts, resolution)
    return {"prompt_embeds": embeds} | ({POOLED: added["text_embeds"]} if added is not None else {})


def _encoded_records(
    teacher: Teacher,
    samples: Iterator[tuple[Tensor, str]],
    batch_size: int,
    dtype: torch.dtype,
    resolution: int,
    tally: _Tally,
    bar: tqdm,
) -> Iterator[dict[str, bytes | str]]:
    """The cache's tar records of ``samples``, encoded ``batch_size`` at a time."""
    device = next(teacher.vae.parameters()).device
    while chunk := list(itertools.islice(samples, batch_size)):
        pixels = torch.stack([image for image, _ in chunk]).to(device)  # [b, 3, R, R]
        captions = [caption for _, caption in chunk]
        with torch.no_grad():
            encoded = {
                "latent_parameters": teacher.vae.encode(pixels).latent_dist.parameters,  # [b, 2C, h, w]: mean, logvar
                **_conditioning_tensors(teacher, captions, resolution),
            }
        for index, caption in enumerate(captions):
            tensors = {  # compact copies: the rows of the batch may be strided views
                name: batch[index].to("cpu", dtype).clone(memory_format=torch.contiguous_format)
                for name, batch in encoded.items()
            }
            yield {SAMPLE_MEMBER: safetensors_torch.save(tensors), "txt": caption}
        tally.samples += len(chunk)
        tally.shapes = {name: list(tensor.shape) for name, tensor in tensors.items()}
        bar.update(len(chunk))


class CachedStream(TrainStream):
    """:class:`~rglcd.data.TrainStream`'s batches, order, seeding, rank split and resume, over a cache.

    Each batch is ``{"latent_parameters": float32 [B, 2C, h, w], "prompt_embeds": float32 [B, L, D],
    "captions": list of B str}``, and for SDXL ``"pooled_prompt_embeds": float32 [B, P]``. A sample's caption
    dropout is decided by the same draw as in TrainStream; a dropped sample gets the cached empty-prompt
    conditioning (:attr:`uncond_embeds`, :attr:`uncond_pooled`) and the caption "". With the
    same shard layout (e.g. a cache written with the source's ``samples_per_shard``) and a source without
    unusable samples, the captions come in exactly the order TrainStream gives for the same arguments.

    A missing or damaged ``cache_info.json``, ``uncond.safetensors`` or shard raises :class:`DataError` here; a
    damaged sample is skipped and counted in :attr:`stats`, like an undecodable image.
    """

    _sample_requirements = (
        "Each cached sample needs a .safetensors member with latent_parameters and prompt_embeds (and SDXL's "
        f"pooled_prompt_embeds) of the shapes in {INFO_FILE}, and a .txt caption: the cache is damaged, make it "
        "again with `rglcd cache`"
    )

    def __init__(self, cache: str | os.PathLike[str], **order: Any) -> None:
        """``order``: :class:`~rglcd.data.TrainStream`'s batch_size, caption_dropout, seed, shuffle_buffer, rank
        and world_size (the resolution is the cache's)."""
        self.info = read_cache_info(cache)
        channels, *latent_size = self.info["latent_shape"]
        self._shapes = {
            "latent_parameters": [2 * channels, *latent_size],
            "prompt_embeds": self.info["prompt_embeds_shape"],
        }
        if self.info.get("pooled_prompt_embeds_shape"):  # an SDXL teacher's
            self._shapes[POOLED] = self.info["pooled_prompt_embeds_shape"]
        self._uncond = _load_uncond(Path(cache), self._shapes)  # float32 {"prompt_embeds": [L, D], ...}
        super().__init__(cache, resolution=self.info["resolution"], **order)

    @property
    def uncond_embeds(self) -> Tensor:
        """The empty prompt's embedding [L, D]."""
        return self._uncond["prompt_embeds"]

    @property
    def uncond_pooled(self) -> Tensor | None:
        """The empty prompt's pooled embedding [P] (SDXL), else None."""
        return self._uncond.get(POOLED)

    def _open_shards(self) -> list[Shard]:
        return [
            TarShard(str(Path(self.source) / name), payload_extensions=(SAMPLE_MEMBER,)) for name in self.info["shards"]
        ]

    def _decode_sample(self, raw: RawSample, draws: SampleDraws) -> tuple[dict[str, Tensor], str]:
        check_raw(raw, "tensors")
        try:
            stored = safetensors_torch.load(raw.payload)
            tensors = {name: stored[name].float() for name in self._shapes}
        except Exception:
            raise _Unusable("undecodable tensors") from None
        if any(list(tensors[name].shape) != shape for name, shape in self._shapes.items()):
            raise _Unusable("wrong tensor shape")
        if draws.drop < self.caption_dropout:
            return {**tensors, **self._uncond}, ""
        return tensors, raw.caption


def is_cache(source: str | os.PathLike[str]) -> bool:
    """Whether ``source`` is a folder written by :func:`write_cache` (it holds ``cache_info.json``)."""
    return (Path(os.fspath(source)) / INFO_FILE).is_file()


def read_cache_info(cache: str | os.PathLike[str]) -> dict:
    """The cache's ``cache_info.json``, after checking that it and every file it names are there."""
    folder = Path(os.fspath(cache))
    info_file = folder / INFO_FILE
    if not info_file.is_file():
        interrupted = folder.name != "" and partial_folder(folder).exists()  # ('' and '.' have no name)
        raise DataError(
            f"{str(folder)!r} is not an rglcd cache: it has no {INFO_FILE}"
            + (" (its write was interrupted)" if interrupted else "")
            + f". Make one with `rglcd cache --teacher TEACHER --data SOURCE --out {folder} --resolution R`"
        )
    try:
        info = json.loads(info_file.read_text())
        missing_keys = [key for key in INFO_KEYS if key not in info]
        if info.get("format") != FORMAT or missing_keys:
            raise ValueError(
                f"not an {FORMAT} file" + (f", it lacks {', '.join(missing_keys)}" if missing_keys else "")
            )
    except (ValueError, AttributeError) as error:
        raise DataError(f"{info_file} is damaged ({error}); make the cache again with `rglcd cache`") from None
    missing = [name for name in (*info["shards"], UNCOND_FILE) if not (folder / name).is_file()]
    if missing:
        raise DataError(
            f"the cache {str(folder)!r} is incomplete: {len(missing)} of its files are missing "
            f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}); make it again with `rglcd cache`"
        )
    return info


def check_cache(
    source: str | os.PathLike[str],
    teacher_fingerprint: Mapping[str, str],
    resolution: int,
    *,
    center_crop: bool = True,
    random_flip: bool = False,
) -> dict:
    """Raise :class:`DataError` unless the cache at ``source`` fits a run with these settings; return its info.

    ``teacher_fingerprint`` is :func:`teacher_fingerprint` of the run's teacher: the cache fits any teacher whose
    VAE and text encoder (with tokenizer) are the ones it was made with, whatever its UNet. The cache holds
    centre crops without flips, so a run asking for random crops or flips does not fit.
    """
    info = read_cache_info(source)
    problems = []
    # vae, text_encoder and an SDXL teacher's text_encoder_2, in either fingerprint
    parts = [*teacher_fingerprint, *(part for part in info["fingerprint"] if part not in teacher_fingerprint)]
    differing = [part for part in parts if info["fingerprint"].get(part) != teacher_fingerprint.get(part)]
    if differing:
        names = " and ".join(part.replace("_", " ") for part in differing)
        problems.append(
            f"it was made with the teacher {info['teacher']!r}, whose {names} differ from this run's teacher's "
            f"(fingerprints {', '.join(info['fingerprint'].get(part, '-')[:12] for part in differing)} vs "
            f"{', '.join(teacher_fingerprint.get(part, '-')[:12] for part in differing)})"
        )
    if info["resolution"] != resolution:
        problems.append(f"it holds {info['resolution']} px images, this run trains at {resolution} px")
    if not center_crop or random_flip:
        problems.append("it holds centre crops without flips, this run asks for random crops or flips")
    if problems:
        raise DataError(
            f"the cache {os.fspath(source)!r} does not fit this run: {'; '.join(problems)}. Make a cache for this "
            "run with `rglcd cache --teacher TEACHER --data SOURCE --out DIR --resolution R`, or train from the "
            "images"
        )
    return info


def teacher_fingerprint(teacher: Teacher) -> dict[str, str]:
    """SHA-256 of what the cached tensors depend on: ``{"vae": ..., "text_encoder": ...}`` (and SDXL's
    ``"text_encoder_2"``).

    Each covers the module's config (without the entries naming where and with which library version it was
    saved) and every weight as float32, so a fine-tuned VAE with the original's config is told apart; a
    text encoder's also covers its tokenizer's vocabulary, special tokens and length. Hashing SD's encoders
    reads about 0.8 GB of weights. Take it of the teacher as ``load_teacher`` returns it (before a cast).
    """
    fingerprint = {"vae": _module_fingerprint(dict(teacher.vae.config), teacher.vae)}
    encoders = {"text_encoder": (teacher.text_encoder, teacher.tokenizer)}
    if teacher.is_sdxl:
        encoders["text_encoder_2"] = (teacher.text_encoder_2, teacher.tokenizer_2)
    for part, (encoder, tokenizer) in encoders.items():
        tokenizer_settings = {
            "vocab": sorted(tokenizer.get_vocab().items()),
            "special_tokens": tokenizer.special_tokens_map,
            "model_max_length": tokenizer.model_max_length,
        }
        fingerprint[part] = _module_fingerprint({**encoder.config.to_dict(), "tokenizer": tokenizer_settings}, encoder)
    return fingerprint


def _module_fingerprint(config: Mapping, module: nn.Module) -> str:
    digest = hashlib.sha256()
    settings = {
        key: value for key, value in config.items() if not key.startswith("_") and key not in _UNSTABLE_CONFIG_KEYS
    }
    digest.update(json.dumps(settings, sort_keys=True, default=str).encode())
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().to(device="cpu", dtype=torch.float32).contiguous().numpy())
    return digest.hexdigest()


def _load_uncond(folder: Path, shapes: dict[str, list[int]]) -> dict[str, Tensor]:
    """The empty prompt's cached conditioning, float32, checked against the samples' ``shapes``."""
    names = [name for name in shapes if name != "latent_parameters"]
    try:
        stored = safetensors_torch.load_file(folder / UNCOND_FILE)
        uncond = {name: stored[name].float() for name in names}
    except Exception as error:
        raise DataError(
            f"{folder / UNCOND_FILE} is damaged ({error}); make the cache again with `rglcd cache`"
        ) from None
    for name in names:
        if list(uncond[name].shape) != shapes[name]:
            raise DataError(
                f"{folder / UNCOND_FILE} holds a {name} of shape {list(uncond[name].shape)}, not the "
                f"{shapes[name]} of {INFO_FILE}; make the cache again with `rglcd cache`"
            )
    return uncond
