"""The training stream: endless, deterministic, exactly resumable batches of (image, caption)."""

from __future__ import annotations

import itertools
import logging
import os
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import NamedTuple, TypeVar

import numpy as np
import torch
from PIL import Image

from .images import load_rgb, to_training_tensor
from .sources import DataError, RawSample, Shard, open_source

T = TypeVar("T")
logger = logging.getLogger(__name__)

# What a random stream is for; it is one of the numbers the stream is seeded from.
_SHARD_ORDER, _BUFFER_SHUFFLE, _SAMPLE = 0, 1, 2


def _rng(seed: int, epoch: int, purpose: int, rank: int = 0, index: int = 0) -> np.random.Generator:
    # Always five numbers: SeedSequence reads [a, b] and [a, b, 0] as the same seed.
    return np.random.default_rng([seed, epoch, purpose, rank, index])


@dataclass
class DataStats:
    """Counts over the samples read so far (restored with the stream's state)."""

    seen: int = 0  # samples read from the source, usable or not
    skipped: int = 0  # samples dropped
    reasons: dict[str, int] = field(default_factory=dict)  # why they were dropped, e.g. {"missing caption": 1}

    def drop(self, reason: str) -> None:
        self.skipped += 1
        self.reasons[reason] = self.reasons.get(reason, 0) + 1


class _Unusable(Exception):
    """A sample that is skipped; the message is the reason counted in :class:`DataStats`."""


class SampleDraws(NamedTuple):
    """A sample's own random numbers in [0, 1), drawn from its (seed, epoch, rank, index) generator."""

    flip: float  # < 0.5: mirror (with random_flip)
    drop: float  # < caption_dropout: drop the caption
    crop_x: float  # the crop's offsets as fractions of the slack (without center_crop)
    crop_y: float


class TrainStream:
    """An infinite, deterministic, resumable stream of training batches.

    Each batch is ``{"pixel_values": float32 [B, 3, R, R] in [-1, 1], "captions": list of B str}``.

    ``source`` is a webdataset ``.tar``; a brace pattern (``/data/shard-{000000..000009}.tar``); a ``pipe:CMD``
    url; a directory (its ``*.tar`` shards, sorted, or else a folder of images listed in ``captions.jsonl``,
    lines ``{"file": ..., "caption" or "text": ...}``, or ``captions.csv`` with columns file,caption). A tar
    sample's image is its ``jpg``/``jpeg``/``png``/``webp`` member, its caption the ``txt`` or ``caption``
    member or the "caption"/"text" field of its ``json``. A missing or empty source raises :class:`DataError`
    here; one that gives no usable sample in a whole pass raises it during iteration.

    Unusable samples (undecodable image, missing or blank caption, truncated or corrupt tar) are skipped and
    counted with their reason in :attr:`stats`; a tar that breaks off counts as one skipped sample, since the
    number of samples lost with it is unknown. Long captions pass unchanged (the tokenizer truncates).

    Order and randomness. An epoch is one pass over this rank's data. With ``shuffle_buffer > 0`` the shard
    order is permuted from (seed, epoch) and samples go through a shuffle buffer seeded from (seed, epoch,
    rank); with 0 the order is the source's. Each sample's crop offsets, flip and caption dropout are drawn
    from its own generator seeded with (seed, epoch, rank, index), where index is its position in the epoch's
    order. Nothing reads global RNG state, so equal arguments give equal batches.

    Resuming. The state is (epoch, samples consumed in the epoch, stats). A resumed stream replays the epoch's
    order up to that count: it reads the same shards and redraws the same shuffle numbers, but decodes no
    image and counts nothing, then continues exactly where the saved stream was, because everything random
    about a sample depends only on its (epoch, index). The replay costs reading that part of the epoch. The
    state is per rank and independent of ``batch_size``.

    Ranks. With at least ``world_size`` shards, rank r takes shards r, r + world_size, ...; otherwise every
    rank reads all samples and keeps those at positions i with ``i % world_size == rank``. Either way the
    ranks' samples in an epoch are disjoint and together are the whole source.

    Samples are read and decoded in the calling process (no DataLoader workers), which keeps the order, and
    so the resume, simple. Use one iterator at a time: a new ``iter(stream)`` continues from the current state.

    Subclasses reuse the order, seeding, rank split and resume for other samples by overriding
    :meth:`_open_shards` (where the samples are) and :meth:`_decode_sample` (what one becomes).
    """

    # The end of the error for a source that gives no usable sample: what a usable sample needs.
    _sample_requirements = (
        "Each sample needs an image (jpg, jpeg, png or webp) and a non-empty caption (a .txt or .caption member, "
        'or a .json with "caption" or "text")'
    )

    def __init__(
        self,
        source: str | os.PathLike[str],
        *,
        resolution: int,
        batch_size: int,
        center_crop: bool = True,
        random_flip: bool = False,
        caption_dropout: float = 0.0,
        seed: int = 0,
        shuffle_buffer: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        for name, value, low in (
            ("resolution", resolution, 1),
            ("batch_size", batch_size, 1),
            ("seed", seed, 0),
            ("shuffle_buffer", shuffle_buffer, 0),
            ("world_size", world_size, 1),
        ):
            if value < low:
                raise ValueError(f"{name} must be at least {low}, got {value}")
        if not 0.0 <= caption_dropout <= 1.0:
            raise ValueError(f"caption_dropout must be in [0, 1], got {caption_dropout}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        self.source = os.fspath(source)
        self.resolution = resolution
        self.batch_size = batch_size
        self.center_crop = center_crop
        self.random_flip = random_flip
        self.caption_dropout = caption_dropout
        self.seed = seed
        self.shuffle_buffer = shuffle_buffer
        self.rank = rank
        self.world_size = world_size
        self.stats = DataStats()

        shards = self._open_shards()
        self._split_by_shard = len(shards) >= world_size
        self._shards = shards[rank::world_size] if self._split_by_shard else shards
        self._epoch = 0
        self._consumed = 0  # samples of the current epoch's order taken so far, usable or not
        self._replaying = False

    def __iter__(self) -> Iterator[dict]:
        samples: list[dict[str, torch.Tensor]] = []
        captions: list[str] = []
        for tensors, caption in self._samples():
            samples.append(tensors)
            captions.append(caption)
            if len(captions) == self.batch_size:
                batch = {name: torch.stack([sample[name] for sample in samples]) for name in samples[0]}
                yield {**batch, "captions": captions}
                samples, captions = [], []

    def state_dict(self) -> dict:
        """The position (epoch, samples consumed in it) and the stats, JSON-serialisable."""
        return {
            "epoch": self._epoch,
            "samples_consumed_in_epoch": self._consumed,
            "order": self._order_arguments(),
            "stats": asdict(self.stats),
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue where the stream that saved ``state`` was; it must have had the same data and arguments."""
        if state["order"] != self._order_arguments():
            raise ValueError(
                f"the data state was saved by a stream with {state['order']}, but this one has "
                f"{self._order_arguments()}; it would not continue the same sample order"
            )
        self._epoch = int(state["epoch"])
        self._consumed = int(state["samples_consumed_in_epoch"])
        stats = state["stats"]
        self.stats = DataStats(int(stats["seen"]), int(stats["skipped"]), dict(stats["reasons"]))

    def _order_arguments(self) -> dict[str, int]:
        """The arguments that decide which sample comes at which (epoch, index)."""
        return {
            "seed": self.seed,
            "shuffle_buffer": self.shuffle_buffer,
            "rank": self.rank,
            "world_size": self.world_size,
        }

    def _samples(self) -> Iterator[tuple[dict[str, torch.Tensor], str]]:
        while True:
            epoch, resume_at = self._epoch, self._consumed
            order = self._epoch_order(epoch)
            self._replaying = True  # the saved stream has already counted these samples and shard errors
            try:
                for _ in itertools.islice(order, resume_at):
                    pass
            finally:
                self._replaying = False
            usable = 0
            for index, raw in enumerate(order, start=resume_at):
                self._consumed = index + 1
                sample = self._prepare(raw, epoch, index)
                if sample is not None:
                    usable += 1
                    yield sample
            if resume_at == 0 and usable == 0:
                raise self._no_usable_sample()
            self._epoch, self._consumed = epoch + 1, 0

    def _epoch_order(self, epoch: int) -> Iterator[RawSample]:
        shards = list(self._shards)
        if self.shuffle_buffer > 0:
            # Not seeded by rank: with a sample-level split all ranks must see the same order.
            _rng(self.seed, epoch, _SHARD_ORDER).shuffle(shards)
        samples: Iterator[RawSample] = itertools.chain.from_iterable(
            shard.samples(self._shard_error) for shard in shards
        )
        if not self._split_by_shard:
            samples = itertools.islice(samples, self.rank, None, self.world_size)
        if self.shuffle_buffer > 0:
            samples = _buffer_shuffle(samples, self.shuffle_buffer, _rng(self.seed, epoch, _BUFFER_SHUFFLE, self.rank))
        return samples

    def _shard_error(self, reason: str, details: str) -> None:
        if not self._replaying:
            logger.warning("skipping the rest of a shard (%s): %s", reason, details)
            self.stats.seen += 1
            self.stats.drop(reason)

    def _open_shards(self) -> list[Shard]:
        """All shards of the source, in order (before the rank split)."""
        return open_source(self.source)

    def _prepare(self, raw: RawSample, epoch: int, index: int) -> tuple[dict[str, torch.Tensor], str] | None:
        self.stats.seen += 1
        # Always the same four draws, so that e.g. turning flips on does not change which captions are dropped.
        draws = SampleDraws(*_rng(self.seed, epoch, _SAMPLE, self.rank, index).random(4))
        try:
            return self._decode_sample(raw, draws)
        except _Unusable as unusable:
            logger.debug("skipping %s: %s", raw.key, unusable)
            self.stats.drop(str(unusable))
            return None

    def _decode_sample(self, raw: RawSample, draws: SampleDraws) -> tuple[dict[str, torch.Tensor], str]:
        """The sample's batch tensors by name, and its caption; :class:`_Unusable` if it is skipped."""
        image, caption = _decode(raw)
        pixels = to_training_tensor(
            image,
            self.resolution,
            crop_at=None if self.center_crop else (draws.crop_x, draws.crop_y),
            flip=self.random_flip and draws.flip < 0.5,
        )
        return {"pixel_values": pixels}, "" if draws.drop < self.caption_dropout else caption

    def _no_usable_sample(self) -> DataError:
        reasons = ", ".join(f"{count} {reason}" for reason, count in sorted(self.stats.reasons.items()))
        ranks = f" for rank {self.rank} of {self.world_size}" if self.world_size > 1 else ""
        return DataError(
            f"{self.source!r} gave no usable sample in a whole pass{ranks} ({self.stats.seen} read so far, "
            f"dropped: {reasons or 'none'}). {self._sample_requirements}"
            + (", and every rank needs at least one sample" if self.world_size > 1 else "")
        )


def check_raw(raw: RawSample, payload: str) -> None:
    """:class:`_Unusable` for a sample that could not be read or lacks its ``payload`` (e.g. "image") or caption."""
    if raw.problem is not None:
        raise _Unusable(raw.problem)
    if raw.payload is None:
        raise _Unusable(f"missing {payload}")
    if raw.caption is None:
        raise _Unusable("missing caption")


def _decode(raw: RawSample) -> tuple[Image.Image, str]:
    """The sample's RGB image and caption, or :class:`_Unusable` with the reason it is skipped."""
    check_raw(raw, "image")
    if not raw.caption.strip():
        raise _Unusable("empty caption")
    try:
        return load_rgb(raw.payload), raw.caption
    except FileNotFoundError:
        raise _Unusable("missing image") from None
    except Exception:
        raise _Unusable("undecodable image") from None


def _buffer_shuffle(items: Iterable[T], size: int, rng: np.random.Generator) -> Iterator[T]:
    """Shuffle through a buffer of ``size`` items.

    Each new item takes the place of a random buffered one, which is yielded. Reads lazily, so how many items
    have been read depends only on how many have been yielded (which the resume relies on).
    """
    buffer: list[T] = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        slot = int(rng.integers(size))
        buffer[slot], item = item, buffer[slot]
        yield item
    rng.shuffle(buffer)
    yield from buffer
