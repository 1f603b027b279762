"""Dynamic batching: concurrent requests whose images resize to the same shape run as one forward pass.

Requests are queued (bounded in number and in bytes of decoded image: a full queue is back-pressure,
``QueueFullError``); one worker thread takes the oldest request and waits at most ``max_wait_ms``
from its arrival for up to ``max_batch - 1`` more of the same resized shape, then runs them through ``detector.predict`` together.  Images of one
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


class QueueMemoryError(QueueFullError):
    """Queueing the image would pass ``max_queue_bytes`` of decoded images: retry later (HTTP 503)."""


AUTO = "auto"
# Pillow holds an RGB pixel in 4 bytes (RGBX), a 1-byte mode's in 1; decoded uploads are RGB
_PIXEL_BYTES = {"1": 1, "L": 1, "P": 1, "I;16": 2}
RGB_PIXEL_BYTES = 4

# --max-batch auto, per device kind.  On a CPU one image already keeps every core busy: a batch of 8
# cost the same as 8 single images (892 vs 896 ms, tiny model, the 2-core development machine), so
# batching raised throughput only ~1.15x at 16 clients (0.60x when the machine was shared) while
# every request of a batch waits for the whole batch and, at low load, --max-wait-ms for company.
# An accelerator runs one image with most of its units idle: batching is where its throughput
# comes from, and 8 keeps a batch's extra latency and activation memory moderate (not measured
# here: no GPU on the development machine).
AUTO_MAX_BATCH = {"cpu": 1, "accelerator": 8}


def image_nbytes(image: Image.Image) -> int:
    """Memory a decoded PIL image holds (its pixel buffer)."""
    return image.width * image.height * _PIXEL_BYTES.get(image.mode, 4)


def parse_max_batch(value: int | str) -> int | None:
    """``--max-batch``: an integer, or ``auto`` (None: chosen per device by ``resolve_max_batch``).

    Raises:
        ValueError: neither (the message names the option).
    """
    if isinstance(value, str) and value.strip().lower() == AUTO:
        return None
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"--max-batch must be 'auto' or a whole number >= 1, got '{value}'") from None
    if number < 1:
        raise ValueError(f"--max-batch must be >= 1, got {number}")
    return number


def resolve_max_batch(value: int | str, device: Any, fixed_batch: int | None = None) -> tuple[int, str]:
    """The images per forward pass for ``--max-batch value`` on ``device`` (a ``torch.device`` or its
    name, e.g. ``cpu``, ``cuda:1``) and why: an explicit number wins; ``auto`` is the batch of a
    model exported with a fixed one (``fixed_batch``: it runs that many images a pass anyway, padding
    the batch with copies), else 1 on a CPU and 8 on an accelerator (see ``AUTO_MAX_BATCH``).

    Raises:
        ValueError: ``value`` is neither a number >= 1 nor ``auto``.
    """
    number = parse_max_batch(value)
    if number is not None:
        return number, "--max-batch"
    if fixed_batch is not None:
        return fixed_batch, f"auto: the model was exported for batches of {fixed_batch}"
    kind = str(getattr(device, "type", device)).split(":")[0].lower()
    if kind == "cpu":
        return AUTO_MAX_BATCH["cpu"], ("auto on a CPU: a batch costs about as much as its images one by one, "
                                       "so batching would only add waiting")
    return AUTO_MAX_BATCH["accelerator"], f"auto on {kind}: batches fill an accelerator that one image leaves idle"


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
    nbytes: int = 0  # the decoded image's memory, counted against max_queue_bytes while it waits


class DynamicBatcher:
    """Runs ``detector.predict`` over batches of queued images in one worker thread.

    Args:
        detector: anything with ``predict(images, threshold, batch_size)``, ``size`` and ``max_size``
            (``Detector``, ``OnnxDetector``, ``OpenVinoDetector``).
        max_batch: images per forward pass at most (1 turns batching off).
        max_wait_ms: how long the oldest request may wait for others to join its batch.
        max_queue: requests waiting at most; ``submit`` raises ``QueueFullError`` beyond.
        max_queue_bytes: decoded image bytes waiting at most (None: no bound); ``submit`` raises
            ``QueueMemoryError`` beyond, except into an empty queue (one image is bounded by the
            upload limits, and refusing it there would refuse it forever).
        on_batch: called with each forward pass's batch size (metrics).
    """

    def __init__(self, detector: Any, *, max_batch: int = 8, max_wait_ms: float = 10.0, max_queue: int = 64,
                 max_queue_bytes: int | None = None, on_batch: Callable[[int], None] | None = None) -> None:
        if max_batch < 1 or max_queue < 1 or max_wait_ms < 0 or (max_queue_bytes is not None and max_queue_bytes < 1):
            raise ValueError(f"need max_batch >= 1, max_queue >= 1, max_wait_ms >= 0, max_queue_bytes >= 1; got "
                             f"{max_batch}, {max_queue}, {max_wait_ms}, {max_queue_bytes}")
        self.detector = detector
        self.max_batch, self.max_wait, self.max_queue = max_batch, max_wait_ms / 1000.0, max_queue
        self.max_queue_bytes = max_queue_bytes
        self.on_batch = on_batch
        self._pending: deque[_Item] = deque()
        self._queued_bytes = 0
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None

    @property
    def depth(self) -> int:
        """Requests waiting (not counting the batch being run)."""
        return len(self._pending)

    @property
    def queued_bytes(self) -> int:
        """Bytes of decoded images waiting (not counting the batch being run)."""
        return self._queued_bytes

    def check_room(self, nbytes: int) -> None:
        """Whether an image of ``nbytes`` decoded would be queued now: a check before decoding one
        (``submit`` decides).

        Raises:
            QueueMemoryError: it would take the queue past ``max_queue_bytes``.
        """
        with self._cond:
            self._check_room(nbytes)

    def _check_room(self, nbytes: int) -> None:
        if self.max_queue_bytes is None or not self._pending or self._queued_bytes + nbytes <= self.max_queue_bytes:
            return
        raise QueueMemoryError(f"the queued images hold {self._queued_bytes / 2**20:.1f} MB; this one "
                               f"({nbytes / 2**20:.1f} MB decoded) would pass the limit of "
                               f"{self.max_queue_bytes / 2**20:g} MB (--max-queue-mb)")

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
            QueueMemoryError: queueing it would pass ``max_queue_bytes``.
            StoppedError: the batcher is not running.
        """
        h, w = image.height, image.width
        item = _Item(image, eval_size(h, w, self.detector.size, self.detector.max_size),
                     concurrent.futures.Future(), time.monotonic(), image_nbytes(image))
        with self._cond:
            if self._stopping or self._thread is None:
                raise StoppedError("the service is shutting down")
            if len(self._pending) >= self.max_queue:
                raise QueueFullError(f"{len(self._pending)} requests are queued already (--max-queue)")
            self._check_room(item.nbytes)
            self._pending.append(item)
            self._queued_bytes += item.nbytes
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
            self._queued_bytes -= sum(item.nbytes for item in batch)
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
        single = _Item(item.image, item.shape, retry, item.arrived, item.nbytes)
        self._run([single])
        try:
            item.future.set_result(retry.result())
        except Exception as e:  # noqa: BLE001  (whatever the model raised goes to the waiting request)
            item.future.set_exception(e)
