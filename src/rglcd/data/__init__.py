"""Training data: (image, caption) batches from webdataset shards or a folder of captioned images.

:class:`TrainStream` is the trainer's endless, deterministic, exactly resumable batch stream (its docstring
describes the sources, the order and the resume); :func:`write_shards` writes webdataset shards.
"""

from .sources import DataError, write_shards
from .stream import DataStats, TrainStream

__all__ = ["DataError", "DataStats", "TrainStream", "write_shards"]
