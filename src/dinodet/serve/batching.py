"""Dynamic batching: concurrent requests whose images resize to the same shape run as one forward pass.

Requests are queued (bounded: a full queue is back-pressure, ``QueueFullError``); one worker thread
takes the oldest request and waits at most ``max_wait_ms`` from its arrival for up to ``max_batch - 1``
more of the same resized shape, then runs them through ``detector.predict`` together.  Images of one
shape need no padding, so a batch gives the detections each image gets alone (the model sees the
same pixels; see ``Detector.predict``).  The model runs only in that thread, so the event loop that
serves HTTP never blocks on it, and one model is never entered from two threads at once.
"""
from __future__ import annotations

import concurrent.futures
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from PIL import Image

from ..data.transforms import eval_size
from ..errors import first_line

log = logging.getLogger(__name__)


class QueueFullError(RuntimeError):
    """The queue holds ``max_queue`` requests already: the caller should retry later (HTTP 503)."""


class StoppedError(RuntimeError):
    """The batcher is stopping or stopped and takes no new requests (HTTP 503)."""


@dataclass(frozen=True)
class BatchResult:
    """One request's prediction (at threshold 0: the caller thresholds) and how it was made."""

    prediction: Any  # dinodet Prediction
    batch_size: int  # images in the forward pass this one ran in
    queue_ms: float  # from submit to the start of its forward pass
    inference_ms: float  # the whole batch's predict call (preprocessing, model, post-processing)


@dataclass
class _Item:
    image: Image.Image
    shape: tuple[int, int]  # (h, w) after the detector's resize: what must match to batch
    future: concurrent.futures.Future[BatchResult]
    arrived: float  # time.monotonic()


class DynamicBatcher:
    """Runs ``detector.predict`` over batches of queued images in one worker thread.

    Args:
        detector: anything with ``predict(images, threshold, batch_size)``, ``size`` and ``max_size``
            (``Detector``, ``OnnxDetector``, ``OpenVinoDetector``).
        max_batch: images per forward pass at most (1 turns batching off).
        max_wait_ms: how long the oldest request may wait for others to join its batch.
        max_queue: requests waiting at most; ``submit`` raises ``QueueFullError`` beyond.
        on_batch: called with each forward pass's batch size (metrics).
    """

    def __init__(self, detector: Any, *, max_batch: int = 8, max_wait_ms: float = 10.0, max_queue: int = 64,
                 on_batch: Callable[[int], None] | None = None) -> None:
        if max_batch < 1 or max_queue < 1 or max_wait_ms < 0:
            raise ValueError(f"need max_batch >= 1, max_queue >= 1, max_wait_ms >= 0; got {max_batch}, {max_queue}, "
                             f"{max_wait_ms}")
        self.detector = detector
        self.max_batch, self.max_wait, self.max_queue = max_batch, max_wait_ms / 1000.0, max_queue
        self.on_batch = on_batch
        self._pending: deque[_Item] = deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None

    @property
    def depth(self) -> int:
        """Requests waiting (not counting the batch being run)."""
        return len(self._pending)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopping

    def start(self) -> None:
        with self._cond:
            if self._thread is not None:
                return
            self._stopping = False
            self._thread = threading.Thread(target=self._work, name="dinodet-batcher", daemon=True)
            self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Take no new requests, finish the queued ones, end the worker thread."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def submit(self, image: Image.Image) -> concurrent.futures.Future[BatchResult]:
        """Queue one RGB image; the future gives its ``BatchResult`` or the error its batch raised.

        Raises:
            QueueFullError: ``max_queue`` requests are waiting already.
            StoppedError: the batcher is not running.
        """
        h, w = image.height, image.width
        item = _Item(image, eval_size(h, w, self.detector.size, self.detector.max_size),
                     concurrent.futures.Future(), time.monotonic())
        with self._cond:
            if self._stopping or self._thread is None:
                raise StoppedError("the service is shutting down")
            if len(self._pending) >= self.max_queue:
                raise QueueFullError(f"{len(self._pending)} requests are queued already (--max-queue)")
            self._pending.append(item)
            self._cond.notify_all()
        return item.future

    def _work(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            self._run(batch)

    def _next_batch(self) -> list[_Item] | None:
        """The oldest request and up to max_batch - 1 of the same shape, after waiting for them at
        most max_wait from the oldest one's arrival; None once stopping with nothing left."""
        with self._cond:
            while not self._pending:
                if self._stopping:
                    return None
                self._cond.wait()
            first = self._pending[0]
            deadline = first.arrived + self.max_wait
            while not self._stopping and self._count(first.shape) < self.max_batch:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            batch: list[_Item] = []
            kept: deque[_Item] = deque()
            for item in self._pending:
                if len(batch) < self.max_batch and item.shape == first.shape:
                    batch.append(item)
                else:
                    kept.append(item)
            self._pending = kept
        # a request whose client went away (its future was cancelled) is dropped here
        return [item for item in batch if item.future.set_running_or_notify_cancel()]

    def _count(self, shape: tuple[int, int]) -> int:
        return sum(1 for item in self._pending if item.shape == shape)

    def _run(self, batch: list[_Item]) -> None:
        if not batch:
            return
        start = time.monotonic()
        try:
            preds = self.detector.predict([item.image for item in batch], threshold=0.0, batch_size=len(batch))
        except Exception as e:  # noqa: BLE001  (any failure: e.g. out of memory) retried one by one, so one image cannot fail others
            if len(batch) > 1:
                log.warning("a batch of %d failed (%s); retrying its images one by one", len(batch), first_line(e))
                for item in batch:
                    self._run_alone(item)
                return
            batch[0].future.set_exception(e)
            return
        if self.on_batch is not None:
            self.on_batch(len(batch))
        took = (time.monotonic() - start) * 1000.0
        for item, pred in zip(batch, preds):
            item.future.set_result(BatchResult(pred, len(batch), (start - item.arrived) * 1000.0, took))

    def _run_alone(self, item: _Item) -> None:
        retry: concurrent.futures.Future[BatchResult] = concurrent.futures.Future()
        retry.set_running_or_notify_cancel()
        single = _Item(item.image, item.shape, retry, item.arrived)
        self._run([single])
        try:
            item.future.set_result(retry.result())
        except Exception as e:  # noqa: BLE001  (whatever the model raised goes to the waiting request)
            item.future.set_exception(e)
