"""Training data: (image, caption) batches from webdataset shards or a folder of captioned images.

:class:`TrainStream` is the trainer's endless, deterministic, exactly resumable batch stream (its docstring
describes the sources, the order and the resume); :func:`write_shards` writes webdataset shards.
:mod:`rglcd.data.cache` encodes a dataset once into latents and text embeddings (:func:`write_cache`) and streams
them back with the same contract (:class:`CachedStream`).
"""

from .cache import CachedStream, check_cache, is_cache, read_cache_info, teacher_fingerprint, write_cache
from .sources import DataError, write_shards
from .stream import DataStats, TrainStream

__all__ = [
    "CachedStream",
    "DataError",
    "DataStats",
    "TrainStream",
    "check_cache",
    "is_cache",
    "read_cache_info",
    "teacher_fingerprint",
    "write_cache",
    "write_shards",
]
