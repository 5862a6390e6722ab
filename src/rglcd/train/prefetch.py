"""The training data read ahead in a background thread while the step computes.

The thread reads and decodes the next batches (shard reading, PIL decoding, cropping: no torch compute, so it does not
compete with the step's intra-op threads; the VAE and text encoders stay in the training thread). Each batch comes
with the stream's state just after it, and that state, not the stream's own (which is ahead), is what a checkpoint
saves: a resume continues after the last batch trained on, exactly as without reading ahead.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass

from ..data import DataStats, TrainStream


@dataclass
class _Failed:
    error: BaseException


class Prefetch:
    """Wraps a :class:`~rglcd.data.TrainStream` (or cache stream): iterating yields its batches, up to ``depth`` of
    them read ahead by one background thread. ``state_dict`` / ``load_state_dict`` / ``stats`` are those of the
    batches taken so far. Close it (or use it as a context manager) to stop the thread."""

    def __init__(self, stream: TrainStream, depth: int = 2) -> None:
        self.stream = stream
        self._ready: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._taken_state = stream.state_dict()

    def state_dict(self) -> dict:
        return self._taken_state

    def load_state_dict(self, state: dict) -> None:
        if self._thread is not None:
            raise RuntimeError("a prefetching stream's state can only be loaded before it is iterated")
        self.stream.load_state_dict(state)
        self._taken_state = self.stream.state_dict()

    @property
    def stats(self) -> DataStats:
        stats = self._taken_state["stats"]
        return DataStats(stats["seen"], stats["skipped"], dict(stats["reasons"]))

    def __iter__(self) -> Iterator[dict]:
        if self._thread is None:
            self._thread = threading.Thread(target=self._read, name="rglcd-prefetch", daemon=True)
            self._thread.start()
        while True:
            item = self._ready.get()
            if isinstance(item, _Failed):  # the thread's error (e.g. a DataError), raised where the batch is taken
                raise item.error
            batch, self._taken_state = item
            yield batch

    def _read(self) -> None:
        try:
            for batch in self.stream:
                if not self._put((batch, self.stream.state_dict())):  # with the state just after this batch
                    return
        except BaseException as error:  # handed to the training thread, which raises it
            self._put(_Failed(error))

    def _put(self, item) -> bool:
        """Queue ``item`` unless the prefetcher is closed meanwhile; whether it was queued."""
        while not self._stop.is_set():
            try:
                self._ready.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)  # a daemon: a stalled `pipe:` read does not hold the exit

    def __enter__(self) -> Prefetch:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
