"""Dynamic batching: the windows of concurrent requests share model calls on one worker thread.

Each request is cut into windows exactly as the CLI cuts a file (`Transcriber.prepare`) and its
windows join one FIFO queue. The worker thread owns the model: it takes the oldest waiting window
and every other waiting window that can share its call (same num_beams and max_new_tokens;
prompts and tasks may differ per row), up to `max_batch`, as soon as there are `max_batch` of
them or the oldest has waited `batch_window` seconds, and runs them with
`Transcriber.run_windows`, the function the CLI's stream uses. While a call runs, new windows
queue up, so under load every call after the first is full without waiting.

Results go back to each request's event loop: per-step tokens (greedy, one-window requests that
stream), each finished batch's windows, and the assembled Transcription when a request's last
window is done. A request admitted to the queue counts against `max_queue` until it finishes or
its client goes away; a cancelled request's waiting windows are dropped at once (windows already
in a running call finish and are discarded).
"""

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from fms_speech._compat import compiled_graph_count
from fms_speech.audio import SAMPLE_RATE
from fms_speech.distributed import DistributedError
from fms_speech.prompts import chat_text
from fms_speech.serve.metrics import ServerMetrics
from fms_speech.transcribe import TranscribeOptions, Transcriber, Transcription, assemble

log = logging.getLogger("fms_speech.serve")


class QueueFull(Exception):
    """The server already holds --max-queue requests."""


@dataclass(eq=False)
class Job:
    """One request on its way through the model; events and results arrive on `loop`."""

    entry: object  # the Transcriber.prepare result: its windows, options and Transcription
    loop: asyncio.AbstractEventLoop
    done: asyncio.Future  # the assembled Transcription (its `error` set if the model failed)
    events: asyncio.Queue | None = None  # streaming: ("tokens", ids) and ("windows", count)
    stream_tokens: bool = False  # post each greedy step's token (one-window requests)
    cancelled: bool = False  # its client went away
    finished: bool = False  # its last window ran
    windows_done: int = 0
    submitted: float = field(default_factory=time.perf_counter)

    @property
    def key(self) -> tuple[int, int]:
        """What windows must share to run in one call."""
        options = self.entry.options
        return options.num_beams, options.max_new_tokens


@dataclass(eq=False)
class _Queued:
    job: Job
    window: object
    since: float


class Batcher:
    def __init__(
        self,
        transcriber: Transcriber,
        metrics: ServerMetrics,
        *,
        max_batch: int,
        batch_window_seconds: float,
        max_queue: int,
        warm_up_options: TranscribeOptions,
        on_fatal: Callable[[str], None],
        idle_seconds: float | None = None,
    ):
        self.transcriber = transcriber
        self.metrics = metrics
        self.max_batch = max_batch
        self.batch_window = batch_window_seconds
        self.max_queue = max_queue
        self.warm_up_options = warm_up_options
        self.on_fatal = on_fatal
        self.idle_seconds = idle_seconds  # how often an idle worker calls heartbeat (None: never)
        self.ready = threading.Event()
        self._condition = threading.Condition()
        self._waiting: list[_Queued] = []
        self._in_flight = 0
        self._stopping = False
        self._thread = threading.Thread(target=self._work, name="fms-speech-model", daemon=True)

    # ---- the event loop's side

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._condition:
            self._stopping = True
            self._condition.notify_all()

    def full(self) -> bool:
        with self._condition:
            if self._in_flight >= self.max_queue:
                self.metrics.rejected.inc()
                return True
            return False

    def submit(self, job: Job) -> None:
        """Queue a job's windows; QueueFull at once if --max-queue requests are in flight."""
        with self._condition:
            if self._in_flight >= self.max_queue:
                self.metrics.rejected.inc()
                raise QueueFull
            self._in_flight += 1
            now = time.perf_counter()
            self._waiting += [_Queued(job, window, now) for window in job.entry.windows]
            self._update_gauges()
            self._condition.notify_all()

    def cancel(self, job: Job) -> None:
        """The client went away: drop its waiting windows and free its place in the queue."""
        with self._condition:
            if job.cancelled or job.finished:
                return
            job.cancelled = True
            kept = [item for item in self._waiting if item.job is not job]
            self.metrics.dropped_windows.inc(len(self._waiting) - len(kept))
            self._waiting = kept
            self._in_flight -= 1
            self._update_gauges()

    def _update_gauges(self) -> None:
        self.metrics.queued_windows.set(len(self._waiting))
        self.metrics.requests_in_flight.set(self._in_flight)

    # ---- the worker thread

    def _work(self) -> None:
        failed = "the warm-up failed"  # a model that cannot run a dummy batch cannot serve
        try:
            self._warm_up()
            failed = "the model worker stopped"
            self._serve_batches()
        except DistributedError as error:  # the ranks are out of step: the server stops
            self.on_fatal(str(error))
            return
        except Exception as error:
            self.on_fatal(f"{failed}: {str(error).splitlines()[0]}")
        self.transcriber.close()  # tensor parallel: the other ranks' follow() returns

    def _warm_up(self) -> None:
        started = time.perf_counter()
        warm_up(self.transcriber, self.warm_up_options)
        self.metrics.compiled_graphs.set(compiled_graph_count())
        log.info(
            "warm-up done in %.1f s (%d compiled graphs); ready",
            time.perf_counter() - started,
            compiled_graph_count(),
        )
        self.ready.set()

    def _serve_batches(self) -> None:
        while (batch := self._next_batch()) is not None:
            if not batch:  # idle for a while: tensor-parallel ranks wait for a sign of life
                self.transcriber.heartbeat()
                continue
            try:
                self._run(batch)
            except DistributedError:
                for job in dict.fromkeys(item.job for item in batch):
                    self._fail(job, "transcription failed: the tensor-parallel ranks stopped")
                raise
            except Exception as error:  # a bug must fail these requests, not the worker
                log.exception("a model call failed")
                for job in dict.fromkeys(item.job for item in batch):
                    self._fail(job, f"transcription failed: {str(error).splitlines()[0]}")
            self.metrics.compiled_graphs.set(compiled_graph_count())

    def join(self, timeout: float | None = None) -> None:
        """Wait for the worker to finish (after `stop`): it releases the other ranks last."""
        self._thread.join(timeout)

    def _next_batch(self) -> list[_Queued] | None:
        """The oldest window and up to max_batch - 1 others that can share its call."""
        with self._condition:
            while not self._stopping:
                if not self._waiting:
                    if not self._condition.wait(timeout=self.idle_seconds):
                        return []  # nothing came within idle_seconds
                    continue
                oldest = self._waiting[0]
                same = [item for item in self._waiting if item.job.key == oldest.job.key]
                wait = oldest.since + self.batch_window - time.perf_counter()
                if len(same) >= self.max_batch or wait <= 0:
                    batch = same[: self.max_batch]
                    taken = set(map(id, batch))
                    self._waiting = [item for item in self._waiting if id(item) not in taken]
                    self._update_gauges()
                    return batch
                self._condition.wait(timeout=wait)
            return None

    def _run(self, batch: list[_Queued]) -> None:
        started = time.perf_counter()
        streaming = [item for item in batch if item.job.stream_tokens]
        on_tokens = self._token_poster(batch) if streaming else None
        finished = self.transcriber.run_windows([item.window for item in batch], on_tokens)
        self.metrics.batch_windows.observe(len(batch))
        self.metrics.batch_seconds.observe(time.perf_counter() - started)
        finished_ids = set(map(id, finished))
        for job in dict.fromkeys(item.job for item in batch):  # each job once, in order
            job.windows_done += sum(item.job is job for item in batch)
            if job.events is not None:
                _post(job, job.events.put_nowait, ("windows", job.windows_done))
            if id(job.entry) in finished_ids:
                self._finish(job, assemble(job.entry))

    def _token_poster(self, batch: list[_Queued]):
        rows = [(row, item.job) for row, item in enumerate(batch) if item.job.stream_tokens]

        def on_tokens(tokens: list[int]) -> None:
            for row, job in rows:
                _post(job, job.events.put_nowait, ("tokens", tokens[row]))

        return on_tokens

    def _fail(self, job: Job, message: str) -> None:
        with self._condition:  # its windows still waiting will not run
            self._waiting = [item for item in self._waiting if item.job is not job]
        job.entry.result.error = message
        self._finish(job, job.entry.result)

    def _finish(self, job: Job, result: Transcription) -> None:
        with self._condition:
            if job.cancelled or job.finished:
                return
            job.finished = True
            self._in_flight -= 1
            self._update_gauges()
        if job.events is not None:
            _post(job, job.events.put_nowait, ("done", result))
        _post(job, _resolve, job.done, result)


def _resolve(future: asyncio.Future, value) -> None:
    if not future.done():  # a cancelled request's future may be gone
        future.set_result(value)


def _post(job: Job, function, *args) -> None:
    """Run function(*args) on the job's event loop (the worker thread must not touch it)."""
    if job.cancelled:
        return
    with contextlib.suppress(RuntimeError):  # the loop closed: the server is shutting down
        job.loop.call_soon_threadsafe(function, *args)


@torch.inference_mode()  # as Transcriber runs the model: the same compiled graphs
def warm_up(transcriber: Transcriber, options: TranscribeOptions) -> None:
    """Run a dummy batch of one window, then one of two: prefill and a decode step each.

    With --compile this builds every graph a request can need before the first one arrives
    (fms_speech.compile: dynamo specialises a batch of one, the next batch size gets the dynamic
    graph; beams decode a batch of two or more even for one window). The dummy audio is noise of a
    few seconds (no size is 1 but the batch); eos is disabled (-1) so a decode step runs even if
    the model would answer nothing.
    """
    generator = torch.Generator().manual_seed(0)
    for seconds in ([3.0], [5.0, 2.0]):
        waveforms = [
            0.01 * torch.randn(int(s * SAMPLE_RATE), generator=generator).to(transcriber.device)
            for s in seconds
        ]
        if transcriber.ctc is not None:  # one forward, no prompt and no decode steps
            transcriber.ctc.run(
                transcriber.runner, waveforms, transcriber.device, transcriber.dtype
            )
            continue
        template = chat_text(transcriber.tokenizer, options.instruction())  # (no CTC template)
        inputs = transcriber.generation_batch(
            waveforms, [template] * len(waveforms), num_beams=1, max_new_tokens=2, eos_token_id=-1
        )
        # through the Transcriber: under tensor parallelism every rank runs the warm-up too
        transcriber.run_generation(inputs)
