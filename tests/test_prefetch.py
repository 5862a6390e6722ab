"""The trainer's read-ahead: the same batches as the stream, the state of the batches taken (not of those read
ahead), the stream's errors raised where a batch is taken, and a thread that stops when closed."""

import itertools
import time

import pytest
import torch

from rglcd.data import DataError, TrainStream
from rglcd.train.prefetch import Prefetch

from .test_data import bad_data, shards, write_tar


def stream(source, **kwargs) -> TrainStream:
    return TrainStream(str(source), resolution=16, batch_size=2, shuffle_buffer=4, **kwargs)


def same(batches, expected) -> bool:
    return len(batches) == len(expected) and all(
        torch.equal(a["pixel_values"], b["pixel_values"]) and a["captions"] == b["captions"]
        for a, b in zip(batches, expected, strict=True)
    )


def test_the_same_batches_and_the_state_of_those_taken(tmp_path):
    source = shards(tmp_path, 12, per_shard=4)
    expected_stream = stream(source)
    expected = list(itertools.islice(iter(expected_stream), 5))  # crosses an epoch (6 batches per epoch)
    with Prefetch(stream(source), depth=3) as prefetch:
        batches = list(itertools.islice(iter(prefetch), 5))
        deadline = time.monotonic() + 60
        while prefetch.stream.state_dict() == expected_stream.state_dict() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert prefetch.stream.state_dict() != expected_stream.state_dict()  # the thread has read ahead ...
        assert prefetch.state_dict() == expected_stream.state_dict()  # ... but the state is that of the batches taken
        assert prefetch.stats == expected_stream.stats
    assert same(batches, expected)

    resumed_expected = list(itertools.islice(iter(expected_stream), 4))
    with Prefetch(stream(source)) as resumed:
        resumed.load_state_dict(prefetch.state_dict())
        assert same(list(itertools.islice(iter(resumed), 4)), resumed_expected)
        with pytest.raises(RuntimeError, match="before it is iterated"):
            resumed.load_state_dict(prefetch.state_dict())


def test_skipped_samples_are_counted_as_they_are_taken(tmp_path):
    source, usable = bad_data(tmp_path)
    for count in (len(usable), len(usable) + 1):  # the cut tar comes after the last usable sample, then a new epoch
        plain = TrainStream(str(source), resolution=16, batch_size=1)
        list(itertools.islice(iter(plain), count))
        with Prefetch(TrainStream(str(source), resolution=16, batch_size=1)) as prefetch:
            taken = list(itertools.islice(iter(prefetch), count))
            assert [batch["captions"][0] for batch in taken] == [*usable, "caption 0"][:count]
            assert prefetch.stats == plain.stats
        assert plain.stats.skipped == (3 if count == len(usable) else 4)


def test_the_streams_error_is_raised_where_the_batch_is_taken(tmp_path):
    source = write_tar(tmp_path / "bad.tar", [{"__key__": "a", "png": b"junk", "txt": "x"}])
    with Prefetch(stream(source)) as prefetch, pytest.raises(DataError, match="no usable sample"):
        next(iter(prefetch))


def test_closing_stops_the_thread(tmp_path):
    prefetch = Prefetch(stream(shards(tmp_path, 8, per_shard=4)), depth=1)
    next(iter(prefetch))  # the thread now waits to queue more
    prefetch.close()
    assert not prefetch._thread.is_alive()
