"""Micro-batching (app/vision/batcher.py) and the pipeline's use of it.

The batcher's own rules are tested on a plain function (doubling numbers), where batches can be steered exactly:
the test holds a turn at the batcher's `InferenceGate` (so that submissions queue up) or drives its clock. The
pipeline tests use the real networks and dev photos: concurrent callers' work must share network calls (counted
through the `on_batch` hook) and give exactly what unbatched calls give. Waits have generous timeouts only so that
a broken batcher fails instead of hanging; nothing asserts a duration.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from app.config import Settings
from app.errors import ImageTooSmall
from app.vision.batcher import BatcherClosed, BatchInfo, InferenceGate, MicroBatcher
from app.vision.decode import load_image
from app.vision.pipeline import Pipeline
from app.vision.types import Face, Image
from tests.vision.test_embed import synthetic_chips

TIMEOUT = 120.0  # seconds: only so that a broken batcher fails instead of hanging


def wait_until(condition: Callable[[], bool], what: str) -> None:
    done = threading.Event()
    for _ in range(int(TIMEOUT * 100)):
        if condition():
            return
        done.wait(0.01)
    pytest.fail(f"gave up waiting for {what}")


class Doubler:
    """A batched function on numbers that records every call; negative numbers make the call fail."""

    def __init__(self) -> None:
        self.calls: list[list[int]] = []
        self.wide: list[bool] = []

    def __call__(self, items: list[int], wide: bool = False) -> list[int]:
        self.calls.append(list(items))
        self.wide.append(wide)
        if any(i < 0 for i in items):
            raise ValueError(f"negative item in {items}")
        return [2 * i for i in items]


@contextmanager
def busy(gate: InferenceGate) -> Iterator[bool]:
    """Hold a turn at the gate (as a running network call would): the batchers sharing it queue meanwhile."""
    _, wide = gate.acquire(lambda: None)
    try:
        yield wide
    finally:
        gate.release(wide)


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def closing() -> Iterator[Callable[..., MicroBatcher[int, int]]]:
    made: list[MicroBatcher[int, int]] = []

    def make(run: Callable[[list[int], bool], Sequence[int]], **options: Any) -> MicroBatcher[int, int]:
        batcher: MicroBatcher[int, int] = MicroBatcher(run, **{"name": "test", **options})
        made.append(batcher)
        return batcher

    yield make
    for batcher in made:
        batcher.close(timeout=TIMEOUT)


def results(futures: list[Future[int]]) -> list[int | str]:
    out: list[int | str] = []
    for future in futures:
        error = future.exception(timeout=TIMEOUT)
        out.append(type(error).__name__ if error is not None else future.result())
    return out


class TestGathering:
    def test_items_queued_while_busy_share_one_call(self, closing: Any) -> None:
        run, gate = Doubler(), InferenceGate(1)
        batcher = closing(run, max_batch=8, max_wait_ms=0, gate=gate)
        with busy(gate):  # the "network" is busy: everything submitted now waits in the queue
            futures = [batcher.submit(i) for i in range(5)]
            wait_until(lambda: batcher.queued == 5, "5 queued items")
        assert results(futures) == [0, 2, 4, 6, 8]
        assert run.calls == [[0, 1, 2, 3, 4]]

    def test_max_batch_splits_in_order(self, closing: Any) -> None:
        run, gate = Doubler(), InferenceGate(1)
        batcher = closing(run, max_batch=4, max_wait_ms=0, gate=gate)
        with busy(gate):
            futures = [batcher.submit(i) for i in range(10)]
        assert results(futures) == [2 * i for i in range(10)]
        assert run.calls == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]

    def test_sizes_count_against_max_batch(self, closing: Any) -> None:
        """An item's size (e.g. its face chips) counts; one item larger than max_batch still runs, alone."""
        run, gate = Doubler(), InferenceGate(1)
        batcher = closing(run, max_batch=5, max_wait_ms=0, size=lambda i: i, gate=gate)
        with busy(gate):
            futures = [batcher.submit(i) for i in (2, 2, 3, 9, 1)]
        assert results(futures) == [4, 4, 6, 18, 2]
        assert run.calls == [[2, 2], [3], [9], [1]]

    def test_different_keys_never_share_a_call(self, closing: Any) -> None:
        run, gate = Doubler(), InferenceGate(1)
        batcher = closing(run, max_batch=8, max_wait_ms=0, key=lambda i: i % 2, gate=gate)
        with busy(gate):
            futures = [batcher.submit(i) for i in (1, 2, 3, 4, 5)]
        assert results(futures) == [2, 4, 6, 8, 10]
        assert run.calls == [[1, 3, 5], [2, 4]]

    def test_hook_sees_every_batch(self, closing: Any) -> None:
        seen: list[BatchInfo] = []
        gate = InferenceGate(1)
        batcher = closing(Doubler(), max_batch=3, max_wait_ms=0, size=lambda i: i, gate=gate,
                          on_batch=seen.append)  # fmt: skip
        with busy(gate):
            futures = [batcher.submit(1) for _ in range(4)]
        results(futures)
        assert seen == [BatchInfo("test", 3, 3, wide=False), BatchInfo("test", 1, 1, wide=True)]


class TestMaxWait:
    def test_a_lone_item_does_not_wait_for_a_full_batch(self, closing: Any) -> None:
        run = Doubler()
        batcher = closing(run, max_batch=64, max_wait_ms=1)
        assert results([batcher.submit(21)]) == [42]
        assert results([batcher.submit(5)]) == [10]
        assert run.calls == [[21], [5]]

    def test_an_item_waits_for_company_until_the_batch_is_full(self, closing: Any) -> None:
        """The clock never moves, so the oldest item's deadline never comes: only a full batch may run."""
        run = Doubler()
        batcher = closing(run, max_batch=3, max_wait_ms=60_000, clock=FakeClock())
        first = batcher.submit(1)
        wait_until(lambda: batcher.running, "the worker")
        assert not first.done()  # held for company (the deadline is a minute of a clock that stands still)
        rest = [batcher.submit(2), batcher.submit(3)]
        assert results([first, *rest]) == [2, 4, 6]
        assert run.calls == [[1, 2, 3]]

    def test_no_wait_when_no_companion_is_on_its_way(self, closing: Any) -> None:
        """With `companions` saying 0 (no photo being prepared) the item runs at once, though the clock stands
        still and the batch is far from full; while one is on its way, it waits for it."""
        run, on_its_way = Doubler(), [1]
        batcher = closing(run, max_batch=8, max_wait_ms=60_000, clock=FakeClock(), companions=lambda: on_its_way[0])
        first = batcher.submit(1)
        wait_until(lambda: batcher.running, "the worker")
        second = batcher.submit(2)  # wakes the worker, which still sees one on its way
        assert not first.done() and not second.done()  # held for company
        on_its_way[0] = 0
        third = batcher.submit(3)  # wakes it again: nothing else is coming, the partial batch runs
        assert results([first, second, third]) == [2, 4, 6]
        assert run.calls[0][:2] == [1, 2] and sum(run.calls, []) == [1, 2, 3]
        assert results([batcher.submit(4)]) == [8]  # alone, at once (the clock never reaches any deadline)
        assert run.calls[-1] == [4]

    def test_the_deadline_closes_a_partial_batch(self, closing: Any) -> None:
        """Items whose deadline has passed (here while they queued behind a running batch) run with max_batch
        unmet; the deadline counts from submission, not from when the worker first sees them."""
        clock = FakeClock()
        run, gate = Doubler(), InferenceGate(1)
        batcher = closing(run, max_batch=8, max_wait_ms=50, clock=clock, gate=gate)
        with busy(gate):
            futures = [batcher.submit(i) for i in (1, 2, 3)]
            clock.now = 1.0
        assert results(futures) == [2, 4, 6]
        assert run.calls == [[1, 2, 3]]


class TestGate:
    def test_a_call_alone_gets_the_wide_turn(self, closing: Any) -> None:
        run = Doubler()
        batcher = closing(run, max_batch=4, max_wait_ms=0, gate=InferenceGate(2))
        assert results([batcher.submit(1)]) == [2]
        assert run.wide == [True]

    def test_a_wide_call_runs_alone(self, closing: Any) -> None:
        run, gate = Doubler(), InferenceGate(2)
        batcher = closing(run, max_batch=1, max_wait_ms=0, workers=2, gate=gate)
        with busy(gate) as wide:
            assert wide  # nothing else ran or waited
            futures = [batcher.submit(1), batcher.submit(2)]
            wait_until(lambda: batcher.running, "the workers")
            assert not any(f.done() for f in futures)  # both wait for the wide call, though a slot is free
        assert results(futures) == [2, 4]

    def test_calls_under_load_run_narrow_side_by_side(self, closing: Any) -> None:
        together = threading.Barrier(2, timeout=TIMEOUT)  # passes only if two calls run at the same time
        wide: list[bool] = []

        def run(items: list[int], is_wide: bool) -> list[int]:
            wide.append(is_wide)
            together.wait()
            return [2 * i for i in items]

        gate = InferenceGate(2)
        batcher = closing(run, max_batch=1, max_wait_ms=0, workers=2, gate=gate)
        with busy(gate):
            futures = [batcher.submit(1), batcher.submit(2)]
        assert results(futures) == [2, 4]
        assert wide == [False, False]

    def test_slots_bound_the_calls_at_once(self, closing: Any) -> None:
        run, gate = Doubler(), InferenceGate(1, wide_when_idle=False)
        batcher = closing(run, max_batch=1, max_wait_ms=0, workers=3, gate=gate)
        with busy(gate) as wide:
            assert not wide
            futures = [batcher.submit(i) for i in range(3)]
            wait_until(lambda: batcher.running, "the workers")
            assert not any(f.done() for f in futures)  # the one slot is taken
        assert results(futures) == [0, 2, 4]
        assert run.wide == [False, False, False]


class TestErrors:
    def test_a_failing_item_fails_only_its_caller(self, closing: Any) -> None:
        run, gate = Doubler(), InferenceGate(1)
        batcher = closing(run, max_batch=8, max_wait_ms=0, gate=gate)
        with busy(gate):
            futures = [batcher.submit(i) for i in (1, -1, 2)]
        assert results(futures) == [2, "ValueError", 4]
        assert run.calls == [[1, -1, 2], [1], [-1], [2]]  # the batch failed, then each item alone

    def test_a_wrong_number_of_results_is_an_error_for_the_callers(self, closing: Any) -> None:
        batcher = closing(lambda items, wide: [], max_batch=4, max_wait_ms=0)
        assert results([batcher.submit(1)]) == ["RuntimeError"]

    def test_a_failed_batch_does_not_stop_the_worker(self, closing: Any) -> None:
        batcher = closing(Doubler(), max_batch=4, max_wait_ms=0)
        assert results([batcher.submit(-5)]) == ["ValueError"]
        assert results([batcher.submit(5)]) == [10]

    def test_a_cancelled_item_is_skipped(self, closing: Any) -> None:
        run, gate = Doubler(), InferenceGate(1)
        batcher = closing(run, max_batch=4, max_wait_ms=0, gate=gate)
        with busy(gate):
            futures = [batcher.submit(i) for i in (1, 2, 3)]
            assert futures[1].cancel()
        assert results([futures[0], futures[2]]) == [2, 6]
        assert run.calls == [[1, 3]]

    @pytest.mark.parametrize(
        "options",
        [{"max_batch": 0, "max_wait_ms": 0}, {"max_batch": 1, "max_wait_ms": -1}, {"max_batch": 1, "max_wait_ms": 0,
                                                                                "workers": 0}],
    )
    def test_bad_limits_are_refused(self, options: dict[str, Any]) -> None:
        with pytest.raises(ValueError):
            MicroBatcher(Doubler(), name="test", **options)


class TestShutdown:
    def test_close_runs_what_is_queued_then_stops(self) -> None:
        run, gate = Doubler(), InferenceGate(1)
        batcher: MicroBatcher[int, int] = MicroBatcher(run, name="test", max_batch=2, max_wait_ms=0, gate=gate)
        with busy(gate):
            futures = [batcher.submit(i) for i in range(5)]
            closer = threading.Thread(target=batcher.close)
            closer.start()
            wait_until(lambda: batcher.closed, "close() to begin")
            with pytest.raises(BatcherClosed):
                batcher.submit(9)
        closer.join(TIMEOUT)
        assert results(futures) == [0, 2, 4, 6, 8]
        assert not batcher.running

    def test_close_with_discard_fails_what_is_queued_instead_of_running_it(self) -> None:
        """At shutdown the queued items are cut requests' (already answered 503): running them only delayed the
        exit (40 cut /embed requests: 12.7 s, past compose's 15 s grace with the 8 s shutdown timeout)."""
        run, gate = Doubler(), InferenceGate(1)
        batcher: MicroBatcher[int, int] = MicroBatcher(run, name="test", max_batch=2, max_wait_ms=0, gate=gate)
        with busy(gate):
            futures = [batcher.submit(i) for i in range(5)]
            batcher.close(timeout=0.0, discard=True)
        batcher.close(timeout=TIMEOUT)
        for future in futures:
            with pytest.raises(BatcherClosed):
                future.result(TIMEOUT)
        assert run.calls == []
        assert not batcher.running

    def test_close_waits_out_a_long_max_wait(self) -> None:
        """A lone item held for company (a minute of a clock that stands still) runs at close, not never."""
        run = Doubler()
        batcher: MicroBatcher[int, int] = MicroBatcher(run, name="test", max_batch=8, max_wait_ms=60_000,
                                                       clock=FakeClock())  # fmt: skip
        future = batcher.submit(4)
        batcher.close(timeout=TIMEOUT)
        assert results([future]) == [8]
        assert not batcher.running

    def test_a_batcher_never_used_starts_no_thread_and_closes(self) -> None:
        batcher: MicroBatcher[int, int] = MicroBatcher(Doubler(), name="idle", max_batch=2, max_wait_ms=1)
        assert not batcher.running
        assert "facegate-idle-batcher" not in {t.name for t in threading.enumerate()}
        batcher.close()
        batcher.close()  # twice is fine
        with pytest.raises(BatcherClosed):
            batcher.submit(1)


# ------------------------------------------------------------------------------------- the real pipeline

PHOTOS = (  # small dev photos (upsampled once: cheap) of different people, one with two faces
    "alex_lacamoire/face_recognition__alex_lacamoire1.jpg",
    "bbt_amy/face-api__amy1.png",
    "bbt_bernadette/face-api__bernadette1.png",
    "bbt_howard/face-api__howard1.png",
    "bbt_leonard/face-api__leonard1.png",
    "bbt_penny/face-api__penny1.png",
)


def pipeline_for(models_dir: Path, **batching: Any) -> Pipeline:
    batching = {"workers": 2, **batching}  # the narrow sessions exist whatever the machine's core count
    settings = Settings(models_dir=models_dir, runtime={"providers": ["CPUExecutionProvider"]}, batching=batching)
    return Pipeline.from_settings(settings)


@pytest.fixture(scope="module")
def photos(dev_faces: Path) -> list[Image]:
    return [load_image(dev_faces / name, max_pixels=100_000_000) for name in PHOTOS]


@pytest.fixture(scope="module")
def unbatched(models_dir: Path) -> Iterator[Pipeline]:
    pipeline = pipeline_for(models_dir, enabled=False)
    yield pipeline
    pipeline.close()


@pytest.fixture(scope="module")
def reference(unbatched: Pipeline, photos: list[Image]) -> list[list[Face]]:
    return [unbatched.find_faces(p) for p in photos]


def assert_same_faces(got: list[Face], want: list[Face]) -> None:
    assert [(f.box, f.score) for f in got] == [(f.box, f.score) for f in want]
    for a, b in zip(got, want, strict=True):
        assert np.array_equal(a.landmarks, b.landmarks)
        assert a.quality == b.quality
        np.testing.assert_allclose(a.embedding, b.embedding, rtol=0, atol=1e-6)


class Recorder:
    """`Pipeline.on_batch`: records each network call; can hold the first embedder call until released."""

    def __init__(self, hold_first_embedding: bool = False) -> None:
        self.batches: list[BatchInfo] = []
        self.holding = threading.Event()
        self.release = threading.Event()
        self._hold = hold_first_embedding

    def __call__(self, info: BatchInfo) -> None:
        self.batches.append(info)
        if self._hold and info.name == "embedder":
            self._hold = False
            self.holding.set()
            assert self.release.wait(TIMEOUT)

    def of(self, name: str) -> list[BatchInfo]:
        return [b for b in self.batches if b.name == name]


@pytest.mark.model
class TestPipeline:
    def test_concurrent_embeddings_share_one_network_call(self, models_dir: Path) -> None:
        chips = [synthetic_chips(n, seed=n) for n in (1, 2, 1, 3, 1, 2, 1)]
        pipeline = pipeline_for(models_dir, max_batch=32, max_wait_ms=0)
        recorder = Recorder(hold_first_embedding=True)
        pipeline.on_batch = recorder
        try:
            with ThreadPoolExecutor(len(chips)) as pool:
                first = pool.submit(pipeline.embed, chips[0])
                assert recorder.holding.wait(TIMEOUT)  # the first call is running: the others must queue
                rest = [pool.submit(pipeline.embed, c) for c in chips[1:]]
                queue = pipeline._embed_queue
                assert queue is not None
                wait_until(lambda: queue.queued == len(chips) - 1, "the other callers to queue")
                recorder.release.set()
                got = [first.result(TIMEOUT)] + [f.result(TIMEOUT) for f in rest]
        finally:
            recorder.release.set()
            pipeline.close()
        # 7 callers, 11 chips, 2 network calls: the first alone, then the 6 that queued behind it together.
        assert [(b.items, b.size) for b in recorder.of("embedder")] == [(1, 1), (6, 10)]
        direct = pipeline.embedder  # the same session, called directly, one caller's chips at a time
        for mine, embedded in zip(chips, got, strict=True):
            assert embedded.shape == (len(mine), 128) and embedded.dtype == np.float32
            np.testing.assert_allclose(embedded, direct.embed(mine), rtol=0, atol=1e-6)

    def test_concurrent_photos_give_unbatched_results(
        self, models_dir: Path, photos: list[Image], reference: list[list[Face]]
    ) -> None:
        pipeline = pipeline_for(models_dir, max_batch=32, max_wait_ms=5)
        recorder = Recorder()
        pipeline.on_batch = recorder
        try:
            with ThreadPoolExecutor(len(photos)) as pool:
                got = list(pool.map(pipeline.find_faces, photos))
        finally:
            pipeline.close()
        for mine, want in zip(got, reference, strict=True):
            assert_same_faces(mine, want)
        faces = sum(len(r) for r in reference)
        # Every network call went through the batchers: each photo's detection, and every face's chip once.
        assert sum(b.items for b in recorder.of("detector")) == len(photos)
        assert sum(b.size for b in recorder.of("embedder")) == faces
        assert len(recorder.of("embedder")) <= len(photos)

    def test_many_photos_embed_together_with_per_photo_errors(
        self, unbatched: Pipeline, photos: list[Image], reference: list[list[Face]]
    ) -> None:
        tiny = np.zeros((2, 2, 3), np.uint8)  # too small for the detector
        got = unbatched.find_faces_many([photos[0], tiny, *photos[1:]])
        assert isinstance(got[1], ImageTooSmall)
        for mine, want in zip([got[0], *got[2:]], reference, strict=True):
            assert not isinstance(mine, Exception)
            assert_same_faces(mine, want)

    def test_a_bad_caller_gets_its_error_and_the_others_their_embeddings(self, models_dir: Path) -> None:
        pipeline = pipeline_for(models_dir, max_batch=32, max_wait_ms=0)
        recorder = Recorder(hold_first_embedding=True)
        pipeline.on_batch = recorder
        good = [synthetic_chips(2, seed=1), synthetic_chips(1, seed=2)]
        bad = synthetic_chips(1, seed=3).astype(np.float32)  # not uint8: the embedder refuses it
        try:
            with ThreadPoolExecutor(4) as pool:
                warm = pool.submit(pipeline.embed, synthetic_chips(1, seed=4))
                assert recorder.holding.wait(TIMEOUT)
                futures = [pool.submit(pipeline.embed, c) for c in (good[0], bad, good[1])]  # type: ignore[arg-type]
                queue = pipeline._embed_queue
                assert queue is not None
                wait_until(lambda: queue.queued == 3, "the three callers to queue")
                recorder.release.set()
                warm.result(TIMEOUT)
                with pytest.raises(ValueError, match="uint8"):
                    futures[1].result(TIMEOUT)
                for chips, future in ((good[0], futures[0]), (good[1], futures[2])):
                    np.testing.assert_allclose(future.result(TIMEOUT), pipeline.embedder.embed(chips), atol=1e-6)
        finally:
            recorder.release.set()
            pipeline.close()
        assert [(b.items, b.size) for b in recorder.of("embedder")] == [(1, 1), (3, 4), (1, 2), (1, 1), (1, 1)]

    def test_same_size_photos_are_stacked_in_one_detector_call(self, models_dir: Path, lfw_faces: Path) -> None:
        paths = sorted(lfw_faces.glob("*/*.jpg"))[:4]
        images = [load_image(p, max_pixels=100_000_000) for p in paths]
        assert len({i.shape for i in images}) == 1
        plain = pipeline_for(models_dir, enabled=False)
        want = [plain.find_faces(i) for i in images]
        pipeline = pipeline_for(models_dir, detector_max_batch=4)
        recorder = Recorder(hold_first_embedding=True)
        pipeline.on_batch = recorder
        try:
            with ThreadPoolExecutor(len(images) + 1) as pool:
                # Hold the inference threads' shared turn with an embedding, so that all four detections queue.
                held = pool.submit(pipeline.embed, synthetic_chips(1))
                assert recorder.holding.wait(TIMEOUT)
                futures = [pool.submit(pipeline.find_faces, i) for i in images]
                queue = pipeline.detector.queue
                assert queue is not None
                wait_until(lambda: queue.queued == len(images), "the four detections to queue")
                recorder.release.set()
                held.result(TIMEOUT)
                got = [f.result(TIMEOUT) for f in futures]
        finally:
            recorder.release.set()
            pipeline.close()
        assert [(b.items, b.size) for b in recorder.of("detector")] == [(4, 4)]
        for mine, theirs in zip(got, want, strict=True):
            assert_same_faces(mine, theirs)

    def test_disabled_batching_runs_on_the_callers_thread(
        self, unbatched: Pipeline, photos: list[Image], reference: list[list[Face]]
    ) -> None:
        seen: list[BatchInfo] = []
        unbatched.on_batch = seen.append
        names = {t.name for t in threading.enumerate()}
        with ThreadPoolExecutor(3) as pool:
            got = list(pool.map(unbatched.find_faces, photos[:3]))
        for mine, want in zip(got, reference[:3], strict=True):
            assert_same_faces(mine, want)
        assert seen == [] and not unbatched.batching
        assert not any(n.startswith("facegate-") for n in {t.name for t in threading.enumerate()} - names)
        unbatched.on_batch = None

    def test_one_inference_slot_per_core_the_process_may_use(
        self, models_dir: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        # pinned to 2 of 64 cores: 64 one-thread calls at once would share those 2
        monkeypatch.setattr(os, "cpu_count", lambda: 64)
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
        pipeline = pipeline_for(models_dir, workers=0)
        assert pipeline.detector.queue is not None and pipeline.detector.queue.workers == 2
        pipeline.close()

    def test_close_stops_the_inference_threads(self, models_dir: Path, photos: list[Image]) -> None:
        pipeline = pipeline_for(models_dir)
        pipeline.find_faces(photos[0])
        assert pipeline.detector.queue is not None and pipeline.detector.queue.running
        pipeline.close()
        assert not pipeline.detector.queue.running
        with pytest.raises(BatcherClosed):
            pipeline.find_faces(photos[0])
