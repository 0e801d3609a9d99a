"""Receiving one update: a bounded pool of receive buffers, the header checked against the model before
anything is allocated, the bytes streamed into a buffer with their values checked as they land, and the
decoded diff checked by the aggregator. What comes out is an update that cannot fail to fold."""
from __future__ import annotations

import logging
import math
import queue
import re
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass

import torch

from common import codecs, tensors
from common.logs import safe
from common.messages import Encoding, UpdateHeader
from fl_server.aggregation import UpdateRejected, spec_mismatch
from fl_server.deadlines import DEADLINES, Deadlines, Timer
from fl_server.errors import InvalidUpdateError, UploadStalledError

log = logging.getLogger("fl_server.uploads")

UPLOAD_MEMORY = 64 << 20  # receive buffers' total, when max_uploads is automatic (0)
MAX_AUTO_UPLOADS = 256  # ...and at most this many: each upload being received holds a server thread
MAX_NUM_SAMPLES = 10**12  # a FedAvg weight beyond this is a lie that would drown every honest client

Check = Callable[[dict[str, torch.Tensor], int, float | None], None]  # the aggregator's check
UPLOAD_PROGRESS_TIMEOUT = 30.0  # seconds an admitted upload may send nothing (config: upload_progress_timeout)


METRIC_NAME = re.compile(r"[A-Za-z0-9_.:/-]+")  # a metric name's characters: safe in a log, a file, a plot
# Federated evaluation's fields (fl_client/round.py): loss and samples together, accuracy only with them
# (an autoencoder has none).
EVALUATION = ("eval_loss", "eval_samples", "eval_accuracy")


@dataclass(frozen=True)
class MetricLimits:
    """What the metrics sent with an update may be (the server's max_metrics, max_metric_name_length and
    max_metric_value settings). They are recorded in metrics.jsonl, every checkpoint and /status, round
    after round, so their size is bounded here, before the update is admitted."""

    max_metrics: int = 32
    max_name_length: int = 64
    max_value: float = 1e15  # the largest magnitude of a value


def check_metrics(metrics: Mapping[str, float], limits: MetricLimits) -> None:
    """InvalidUpdateError, naming the first problem, unless every metric fits the limits and the
    evaluation fields are complete and in range."""
    if len(metrics) > limits.max_metrics:
        raise InvalidUpdateError(f"an update may carry at most {limits.max_metrics} metrics, got {len(metrics)} "
                                 "(server setting max_metrics)")
    for name, value in metrics.items():
        if len(name) > limits.max_name_length or not METRIC_NAME.fullmatch(name):
            raise InvalidUpdateError(f"metric name '{safe(name)}' must be 1 to {limits.max_name_length} letters, "
                                     "digits or _ . : / - (server setting max_metric_name_length)")
        if not (isinstance(value, float | int) and math.isfinite(value) and abs(value) <= limits.max_value):
            raise InvalidUpdateError(f"metric {name} must be a finite number of magnitude at most "
                                     f"{limits.max_value:g}, got {value!r} (server setting max_metric_value)")
    present = [key for key in EVALUATION if key in metrics]
    if not present:
        return
    if "eval_loss" not in metrics or "eval_samples" not in metrics:
        raise InvalidUpdateError(f"federated evaluation's metrics come as eval_loss and eval_samples (and "
                                 f"eval_accuracy) together, got only {', '.join(present)}")
    samples = metrics["eval_samples"]
    if not (samples == int(samples) and 1 <= samples <= MAX_NUM_SAMPLES):
        raise InvalidUpdateError(f"eval_samples must be a whole number between 1 and {MAX_NUM_SAMPLES}, "
                                 f"got {samples!r}")
    if metrics["eval_loss"] < 0:
        raise InvalidUpdateError(f"eval_loss must be 0 or more, got {metrics['eval_loss']!r}")
    if "eval_accuracy" in metrics and not 0 <= metrics["eval_accuracy"] <= 1:
        raise InvalidUpdateError(f"eval_accuracy must be between 0 and 1, got {metrics['eval_accuracy']!r}")


@dataclass
class CheckedUpdate:
    """A received update that passed every check. It owns `buffer` (the diff's tensors may be views of
    it) until the receiver's `release` gives it back."""

    header: UpdateHeader
    diff: dict[str, torch.Tensor]
    buffer: bytearray
    waited: float  # seconds spent waiting for a receive buffer
    received: float  # seconds spent receiving the bytes
    checked: float  # seconds spent decoding and checking them


class UploadReceiver:
    metric_limits = MetricLimits()  # RoundState sets the server's

    def __init__(self, specs: list[tensors.TensorSpec], codec: codecs.Codec, check: Check, max_concurrent: int = 0,
                 clock: Callable[[], float] = time.perf_counter, progress_timeout: float = UPLOAD_PROGRESS_TIMEOUT,
                 deadlines: Deadlines = DEADLINES):
        self.clock = clock  # times the phases of an upload, for the log
        # An admitted upload holds a receive buffer (maybe the only one) and a server thread: one that sends
        # nothing for this long is ended, so that a stalled client cannot hold them until the round's end.
        self.progress_timeout = progress_timeout
        self.deadlines = deadlines
        self.specs = specs
        self.codec = codec
        self.check = check
        # What clients send: the model's tensors as the round's codec compresses them.
        self.wire_specs = codecs.wire_specs(specs, codec)
        self.upload_bytes = sum(spec.nbytes for spec in self.wire_specs)
        # Receive buffers, one model each, reused round after round. Their number bounds the uploads
        # being received at once, and so the server's memory, whatever the number of clients: other
        # uploads wait, sending nothing, until a buffer is free (see receive's `on_admitted`).
        # 0 = as many as fit in UPLOAD_MEMORY: one for a large model, many for a small one.
        if max_concurrent <= 0:
            max_concurrent = max(1, min(MAX_AUTO_UPLOADS, UPLOAD_MEMORY // max(1, self.upload_bytes)))
        self.max_concurrent = max_concurrent
        log.info("receiving up to %d upload(s) at once, %.1f MB of buffers each", max_concurrent,
                 self.upload_bytes / 1e6)
        self._buffers: queue.SimpleQueue[bytearray | None] = queue.SimpleQueue()
        for _ in range(max_concurrent):
            self._buffers.put(None)  # allocated on first use

    def check_header(self, header: UpdateHeader) -> None:
        """Compared against the model we hold before anything is allocated: a header claiming 100 GB is
        refused here, not after an attempt to allocate it; so is every value the client sent with it."""
        check_metrics(header.metrics, self.metric_limits)
        p = header.payload
        if p.encoding is not Encoding.DIFF:
            raise InvalidUpdateError(f"update must be encoded as DIFF, got {p.encoding.name}")
        if not 0 < header.num_samples <= MAX_NUM_SAMPLES:
            raise InvalidUpdateError(f"num_samples must be between 1 and {MAX_NUM_SAMPLES}, "
                                     f"got {header.num_samples}")
        if p.codec != str(self.codec):
            raise InvalidUpdateError(f"update is compressed with {p.codec!r}, this federation uses {str(self.codec)!r}")
        mismatch = spec_mismatch(p.specs, self.wire_specs)
        if mismatch:
            raise InvalidUpdateError(mismatch)
        if p.total_bytes != self.upload_bytes:
            raise InvalidUpdateError(f"update announces {p.total_bytes} bytes; the model's diff is {self.upload_bytes}")

    def receive(self, header: UpdateHeader, chunks: Iterable[bytes | memoryview],
                on_admitted: Callable[[], None] = lambda: None,
                interrupt: Callable[[str], None] = lambda why: None) -> CheckedUpdate:
        """Wait for a free receive buffer, call `on_admitted()` (the servicer tells the client there that
        it may send its data now), then receive and check the update. Raises InvalidUpdateError, with
        the buffer given back, for anything wrong with it. If no data arrives for `progress_timeout`
        seconds, `interrupt(why)` is called (on another thread: the servicer ends the call there, which
        unblocks the read) and UploadStalledError raised, with the buffer given back."""
        queued = self.clock()
        buffer = self._buffers.get()
        waited = self.clock() - queued
        stalled = f"no update data for {self.progress_timeout:g} s (upload_progress_timeout): the upload stalled"
        timer = None
        try:
            buffer = buffer or bytearray(header.payload.total_bytes)
            on_admitted()
            started = self.clock()
            timer = self.deadlines.arm(self.progress_timeout, lambda: interrupt(stalled))
            diff, largest = self._receive_into(buffer, header, self._watched(chunks, timer))
            if timer.cancel():
                raise UploadStalledError(stalled)
            received = self.clock()
            self.check(diff, header.num_samples, largest)
        except BaseException as e:
            self.release(buffer)  # None if the allocation failed: allocated next time
            if timer is not None and timer.cancel():  # the stream ended because the deadline ended the call
                raise UploadStalledError(stalled) from None
            if isinstance(e, tensors.PayloadError | codecs.CodecError | UpdateRejected):
                raise InvalidUpdateError(str(e)) from None
            raise
        return CheckedUpdate(header, diff, buffer, waited, received - started, self.clock() - received)

    def _watched(self, chunks: Iterable[bytes | memoryview], timer: Timer) -> Iterator[bytes | memoryview]:
        """`chunks`, each one moving the progress deadline on."""
        for chunk in chunks:
            timer.extend(self.progress_timeout)
            yield chunk

    def _receive_into(self, buffer: bytearray, header: UpdateHeader,
                      chunks: Iterable[bytes | memoryview]) -> tuple[dict[str, torch.Tensor], float | None]:
        """The decoded diff, and its largest magnitude when the values were checked as they landed."""
        # Uncompressed, the received tensors are the diff: the receiver checks the values for NaN and Inf,
        # and finds the largest magnitude, as each chunk lands, while later ones stream.
        receiver = tensors.PayloadReceiver(header.payload.specs, header.payload.checksum, buffer,
                                           check_values=self.codec.name == "none")
        received_chunks = 0
        for chunk in chunks:
            receiver.add(chunk)
            received_chunks += 1
        wire = receiver.finish()
        if received_chunks != header.payload.num_chunks:
            raise InvalidUpdateError(f"update announced {header.payload.num_chunks} chunks but sent "
                                     f"{received_chunks}")
        return codecs.decode(wire, self.specs, self.codec), receiver.largest

    def release(self, buffer: bytearray | None) -> None:
        self._buffers.put(buffer)
