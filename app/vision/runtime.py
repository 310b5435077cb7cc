"""ONNX Runtime sessions: provider choice, options and threads decided in one place.

ONNX Runtime silently falls back to CPU when CUDA cannot load; facegate reads back the providers a
session actually applied, logs them, and refuses to start when a GPU is required but not in use.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import Any

import onnxruntime as ort

from app.config import Provider, RuntimeSettings
from app.errors import ModelUnavailable

log = logging.getLogger(__name__)

_dlls_lock = threading.Lock()
_dlls_preloaded = False


def _preload_cuda_dlls() -> None:
    """Load CUDA/cuDNN from NVIDIA's pip packages when present (onnxruntime-gpu >= 1.21); harmless without a GPU."""
    global _dlls_preloaded
    with _dlls_lock:
        if _dlls_preloaded:
            return
        _dlls_preloaded = True
        preload = getattr(ort, "preload_dlls", None)
        if preload is None:
            return
        try:
            preload()
        except Exception as exc:  # no CUDA libraries installed: the CPU provider still works
            log.debug("onnxruntime.preload_dlls() failed: %s", exc)


# Device nodes of an NVIDIA driver (Linux; /dev/dxg: WSL 2). Without any, CUDA cannot run.
_NVIDIA_DEVICES = ("/dev/nvidiactl", "/dev/nvidia0", "/dev/dxg", "/proc/driver/nvidia")


def nvidia_device_present() -> bool:
    """Whether an NVIDIA GPU driver is visible to this process (a container needs the device reservation)."""
    return any(Path(p).exists() for p in _NVIDIA_DEVICES)


def usable_cores() -> int:
    """The cores this process may run on: its CPU affinity (taskset, a container's cpuset), not every core of the
    machine, which `os.cpu_count()` counts. "One per core" settings (batching workers, serve's share per worker)
    sized from the machine put several calls on each allowed core, each slowing the others."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):  # no affinity API (macOS, Windows)
        return os.cpu_count() or 1


def requested_providers(settings: RuntimeSettings) -> list[tuple[str, dict[str, Any]]]:
    """The preferred providers that this ONNX Runtime build offers and this machine can run, in preference order,
    with their options."""
    gpu = nvidia_device_present()
    if Provider.CUDA in settings.providers and gpu:
        _preload_cuda_dlls()
    available = set(ort.get_available_providers())
    chosen: list[tuple[str, dict[str, Any]]] = []
    for provider in settings.providers:
        if provider.value not in available:
            log.info("ONNX Runtime provider %s is not available in this build; skipped", provider.value)
            continue
        if provider is Provider.CUDA and not gpu:
            # Asking ONNX Runtime anyway only prints CUDA library errors before it falls back to CPU.
            log.info("no NVIDIA GPU device found (%s): %s skipped", ", ".join(_NVIDIA_DEVICES), provider.value)
            continue
        options: dict[str, Any] = {}
        if provider is Provider.CUDA:
            options = {"use_tf32": "1" if settings.cuda_tf32 else "0", "cudnn_conv_algo_search": "HEURISTIC"}
        chosen.append((provider.value, options))
    if not any(name == Provider.CPU.value for name, _ in chosen):
        chosen.append((Provider.CPU.value, {}))  # always keep a last resort; reported if it is the one used
    return chosen


def open_session(path: Path, settings: RuntimeSettings, *, require_gpu: bool = False) -> ort.InferenceSession:
    """Open one ONNX model with the configured providers and threads; raise if a required GPU is not in use."""
    if not path.is_file():
        raise ModelUnavailable(f"model file {path.name} is missing: run `make models`")  # no path: it goes to API clients
    options = ort.SessionOptions()
    options.intra_op_num_threads = settings.intra_op_threads
    options.inter_op_num_threads = settings.inter_op_threads
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # ONNX Runtime's pool threads busy-wait between operators (good: a batch-1 embedding takes 1.3 ms spinning,
    # 1.8 ms without) and, by default, for a while after each run. The detector's and the embedder's sessions (and
    # numpy, and the request threads) share the cores, so a run's leftover spinning took the cores the next
    # session needed: on 2 cores detector + embedder took 45 ms back to back, 23 ms with the spinning stopped as
    # each run returns.
    options.add_session_config_entry("session.force_spinning_stop", "1")
    providers = requested_providers(settings)
    session = ort.InferenceSession(
        str(path),
        sess_options=options,
        providers=[name for name, _ in providers],
        provider_options=[opts for _, opts in providers],
    )
    applied = session.get_providers()
    log.info("%s: ONNX Runtime providers in use %s (asked for %s)", path.name, applied, [n for n, _ in providers])
    if require_gpu and applied[0] != Provider.CUDA.value:
        device = "" if nvidia_device_present() else " No NVIDIA GPU device is visible to this process."
        raise ModelUnavailable(
            "FACEGATE_REQUIRE_GPU is set but the CUDA provider is not usable "
            f"(in use: {applied}; available in this build: {ort.get_available_providers()}).{device} "
            "Check the NVIDIA driver (and a container's GPU reservation) and that onnxruntime-gpu's CUDA 13 / "
            "cuDNN 9 libraries are installed."
        )
    return session


def active_provider(session: ort.InferenceSession) -> str:
    """The provider that runs the session's nodes first (CUDA when the GPU path is live)."""
    return str(session.get_providers()[0])


class LazySession:
    """One ONNX model opened on first use (or by `load()` at start), once, under a lock."""

    def __init__(self, path: Path, settings: RuntimeSettings, *, require_gpu: bool = False) -> None:
        self.path = path
        self._settings = settings
        self._require_gpu = require_gpu
        self._session: ort.InferenceSession | None = None
        self._lock = threading.Lock()
        # Whether the last attempt to open it failed: with the models opened on first use, /readyz said ready while
        # every photo was answered 503 model_unavailable.
        self.failed = False

    @property
    def loaded(self) -> bool:
        return self._session is not None

    def load(self) -> ort.InferenceSession:
        session = self._session
        if session is None:
            with self._lock:
                if self._session is None:
                    try:
                        self._session = open_session(self.path, self._settings, require_gpu=self._require_gpu)
                    except BaseException as error:
                        # Logged once per streak: with the models opened on first use, every photo retries.
                        if isinstance(error, Exception) and not self.failed:
                            log.error("opening %s failed (tried again on the next photo): %s", self.path.name, error)
                        self.failed = True
                        raise
                    self.failed = False
                session = self._session
        return session

    @property
    def provider(self) -> str | None:
        return active_provider(self._session) if self._session is not None else None
