"""Micro-batching: work submitted by many request threads, run by a few inference threads in batches.

Why: on a small CPU, eight requests each calling ONNX Runtime at once make eight calls that each want every core
(intra-op threads); they slow each other down more than they overlap, and a network that runs at ~60 % efficiency
on 2 threads wastes a third of the machine. A `MicroBatcher` owns `workers` threads that gather the items waiting
in its queue into one call of `run` (up to `max_batch`, waiting at most `max_wait_ms` after the oldest item for
company) and hand each caller its own result through a `concurrent.futures.Future`.

An `InferenceGate` shared by the batchers of a pipeline decides who may call ONNX Runtime and how: at most `slots`
narrow calls (one thread each: one per core) at once, or — when the service is otherwise idle — one wide call that
gets the whole machine (every intra-op thread), so that a lone request is as fast as without batching.

Semantics, in order of importance:
- each caller gets exactly its own result, or its own exception: when a batched call raises, its items are run again
  one by one, so that only the item that fails gets the error and the others still get results;
- a lone item waits at most `max_wait_ms` (measured from when it was submitted, so time spent queued behind running
  batches counts) and never for a batch to fill, nor at all when `companions` says nothing else is on its way;
  items waiting when a worker becomes free are taken at once;
- items with different `key`s (e.g. detector inputs of different shapes) are never in one batch; order is kept;
- `close()` runs what is queued (`close(discard=True)` fails it instead), then stops the threads; `submit` after
  `close` raises `BatcherClosed`.

Worker threads start on the first `submit` (constructing a batcher does nothing) and are daemons, so a batcher that
is never closed does not keep the interpreter alive.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Generic, TypeVar

log = logging.getLogger(__name__)

In = TypeVar("In")
Out = TypeVar("Out")
Taken = TypeVar("Taken")


class BatcherClosed(RuntimeError):
    """`submit` on a batcher that has been closed."""


@dataclass(frozen=True, slots=True)
class BatchInfo:
    """What one call of `run` gets: passed to the `on_batch` hook just before the call (metrics, tests)."""

    name: str
    items: int  # callers served by this call
    size: int  # sum of the items' sizes (e.g. face chips)
    wide: bool = False  # run with every intra-op thread (the service was otherwise idle)


class InferenceGate:
    """Turns at ONNX Runtime for the batchers that share it.

    slots: how many narrow calls (one intra-op thread each) may run at once; one per core keeps every core busy
        without two calls fighting over one.
    wide_when_idle: give a call the wide session (all threads) when nothing else runs or waits, so that one request
        alone is not slowed down to one core. A wide call runs alone; the calls that arrive meanwhile wait for it.
    """

    def __init__(self, slots: int, *, wide_when_idle: bool = True) -> None:
        if slots < 1:
            raise ValueError(f"slots must be at least 1, got {slots}")
        self.slots = slots
        self.wide_when_idle = wide_when_idle
        self._cond = threading.Condition()
        self._narrow = 0
        self._wide = False
        self._waiting = 0
        self._queues: list[Callable[[], int]] = []

    def watch(self, queued: Callable[[], int]) -> None:
        """Count another batcher's queued items when judging whether the service is idle."""
        with self._cond:
            self._queues.append(queued)

    def acquire(self, take: Callable[[], Taken]) -> tuple[Taken, bool]:
        """Wait for a turn, then `take()` the batch (so that what queued meanwhile joins it); returns the batch and
        whether the turn is wide. Every acquire must be followed by `release(wide)`."""
        with self._cond:
            self._waiting += 1
            try:
                while self._wide or self._narrow >= self.slots:
                    self._cond.wait()
            finally:
                self._waiting -= 1
            taken = take()
            wide = (
                self.wide_when_idle
                and self._narrow == 0
                and self._waiting == 0
                and not any(queued() for queued in self._queues)
            )
            if wide:
                self._wide = True
            else:
                self._narrow += 1
            return taken, wide

    def release(self, wide: bool) -> None:
        with self._cond:
            if wide:
                self._wide = False
            else:
                self._narrow -= 1
            self._cond.notify_all()


@dataclass(slots=True)
class _Pending(Generic[In, Out]):
    item: In
    size: int
    key: Hashable
    submitted: float
    future: Future[Out] = field(default_factory=Future)


def _one(_: object) -> int:
    return 1


def _no_key(_: object) -> Hashable:
    return None


class MicroBatcher(Generic[In, Out]):
    """Gathers submitted items into calls of `run(items, wide) -> results` (one result per item, same order).

    run: the batched function; it must return a sequence as long as its argument. `wide` says whether the gate gave
        this call the whole machine (False without a gate).
    max_batch: most total `size` per call (the first item is always taken, even if larger on its own).
    max_wait_ms: how long the oldest item may wait for others before its batch runs anyway (0: take only what is
        already queued).
    workers: threads taking batches from the queue (calls of this batcher that may run at once, if the gate lets
        them).
    size: an item's weight against max_batch (default 1 per item; e.g. the number of face chips it carries).
    key: items with different keys never share a call (default: all compatible).
    gate: turns at the runtime, shared with other batchers (default: none, calls run as soon as a worker is free).
    on_batch: called on the worker thread with each batch's BatchInfo just before `run`.
    companions: how many items may still arrive soon (e.g. photos whose detection is under way on request threads);
        when it says 0 the oldest item waits for no company, since none can come within max_wait_ms. None: always
        wait up to max_wait_ms.
    """

    def __init__(
        self,
        run: Callable[[list[In], bool], Sequence[Out]],
        *,
        name: str,
        max_batch: int,
        max_wait_ms: float,
        workers: int = 1,
        size: Callable[[In], int] = _one,
        key: Callable[[In], Hashable] = _no_key,
        gate: InferenceGate | None = None,
        on_batch: Callable[[BatchInfo], None] | None = None,
        companions: Callable[[], int] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        if max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must be >= 0, got {max_wait_ms}")
        if workers < 1:
            raise ValueError(f"workers must be at least 1, got {workers}")
        self.name = name
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000.0
        self.workers = workers
        self.on_batch = on_batch
        self._run = run
        self._size = size
        self._key = key
        self._gate = gate
        self._companions = companions
        self._clock = clock
        self._pending: deque[_Pending[In, Out]] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._threads: list[threading.Thread] = []
        self._pid: int | None = None
        if gate is not None:
            gate.watch(lambda: len(self._pending))

    # ----------------------------------------------------------------------------------------------- callers

    def submit(self, item: In) -> Future[Out]:
        """Queue one item; its future gets run's result for it (or the exception its batch raised for it)."""
        pending: _Pending[In, Out] = _Pending(item, self._size(item), self._key(item), self._clock())
        with self._cond:
            if self._closed:
                raise BatcherClosed(f"the {self.name} batcher is closed")
            if self._pid != os.getpid():  # first use, or a forked child: the parent's threads do not exist here
                self._threads, self._pid = [], os.getpid()
            if not self._threads:
                for index in range(self.workers):
                    thread = threading.Thread(target=self._work, name=f"facegate-{self.name}-{index}", daemon=True)
                    thread.start()
                    self._threads.append(thread)
            self._pending.append(pending)
            self._cond.notify()
        return pending.future

    def __call__(self, item: In) -> Out:
        """Submit and wait (from a request thread; never from a worker thread, which could deadlock)."""
        if threading.current_thread() in self._threads:
            raise RuntimeError(f"the {self.name} batcher's own thread cannot wait on it")
        return self.submit(item).result()

    def close(self, timeout: float | None = None, *, discard: bool = False) -> None:
        """Refuse new items, run those already queued (or, with `discard`, fail them with BatcherClosed: their
        callers are gone, e.g. requests cut at shutdown), stop the workers (waiting at most `timeout` s for each)."""
        with self._cond:
            self._closed = True
            while discard and self._pending:
                pending = self._pending.popleft()
                if pending.future.set_running_or_notify_cancel():
                    pending.future.set_exception(BatcherClosed(f"the {self.name} batcher was closed"))
            self._cond.notify_all()
            threads = list(self._threads)
        for thread in threads:
            if thread is not threading.current_thread():
                thread.join(timeout)

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def queued(self) -> int:
        """Items submitted and not yet taken into a batch."""
        with self._cond:
            return len(self._pending)

    @property
    def running(self) -> bool:
        """Whether any worker thread is alive."""
        return any(thread.is_alive() for thread in self._threads)

    # ------------------------------------------------------------------------------------------ worker side

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._closed:
                    self._cond.wait()
                if not self._pending:
                    return  # closed and drained
                self._gather()
            # The batch is taken only once a turn is ours: what queued while others ran joins this call.
            if self._gate is None:
                with self._cond:
                    batch, wide = self._take(), False
                self._guarded(batch, wide)
                continue
            batch, wide = self._gate.acquire(self._locked_take)
            try:
                self._guarded(batch, wide)
            finally:
                self._gate.release(wide)

    def _gather(self) -> None:
        """Wait (lock held) until the oldest item's batch is full, its deadline has passed, or we are closing."""
        while self._pending and not self._closed:
            deadline = self._pending[0].submitted + self.max_wait
            _, full = self._select()
            remaining = deadline - self._clock()
            if full or remaining <= 0 or (self._companions is not None and self._companions() == 0):
                return
            self._cond.wait(remaining)

    def _select(self) -> tuple[list[int], bool]:
        """Indices of the next batch (the oldest item and the following ones with its key, up to max_batch), and
        whether it is full (nothing more could join)."""
        if not self._pending:
            return [], False
        first = self._pending[0]
        chosen, total = [0], first.size
        if total >= self.max_batch:
            return chosen, True
        for index in range(1, len(self._pending)):
            candidate = self._pending[index]
            if candidate.key != first.key:
                continue
            if total + candidate.size > self.max_batch:
                return chosen, True
            chosen.append(index)
            total += candidate.size
            if total >= self.max_batch:
                return chosen, True
        return chosen, False

    def _take(self) -> list[_Pending[In, Out]]:
        """Remove the next batch from the queue (lock held); empty when another worker took everything."""
        chosen, _ = self._select()
        batch = [self._pending[i] for i in chosen]
        for index in reversed(chosen):
            del self._pending[index]
        return batch

    def _locked_take(self) -> list[_Pending[In, Out]]:
        with self._cond:
            return self._take()

    def _guarded(self, batch: list[_Pending[In, Out]], wide: bool) -> None:
        try:
            self._execute(batch, wide)
        except BaseException as error:  # e.g. a hook raising SystemExit: no caller may wait forever
            for pending in batch:
                if not pending.future.done():
                    pending.future.set_exception(error)

    def _execute(self, batch: list[_Pending[In, Out]], wide: bool) -> None:
        live = [p for p in batch if p.future.set_running_or_notify_cancel()]
        if not live:
            return
        try:
            if self.on_batch is not None:
                self.on_batch(BatchInfo(self.name, len(live), sum(p.size for p in live), wide))
            results = self._run([p.item for p in live], wide)
            if len(results) != len(live):
                raise RuntimeError(f"{self.name}: run returned {len(results)} results for {len(live)} items")
        except Exception as error:
            if len(live) == 1:
                live[0].future.set_exception(error)
                return
            # Which item failed is unknown: run each alone, so that only its caller gets the error.
            log.debug("%s: a batch of %d failed (%s); running its items one by one", self.name, len(live), error)
            for pending in live:
                self._run_alone(pending, wide)
            return
        for pending, result in zip(live, results, strict=True):
            pending.future.set_result(result)

    def _run_alone(self, pending: _Pending[In, Out], wide: bool) -> None:
        try:
            if self.on_batch is not None:
                self.on_batch(BatchInfo(self.name, 1, pending.size, wide))
            (result,) = self._run([pending.item], wide)
        except Exception as error:
            pending.future.set_exception(error)
        else:
            pending.future.set_result(result)
