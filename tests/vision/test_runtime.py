"""ONNX Runtime sessions (app/vision/runtime.py): the provider actually in use is the one reported, CUDA is only asked
for where a GPU can be, and FACEGATE_REQUIRE_GPU refuses to start without it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from app.config import Provider, RuntimeSettings, Settings
from app.errors import ModelUnavailable
from app.service import FaceService
from app.vision.runtime import LazySession, nvidia_device_present, open_session, requested_providers, usable_cores


def test_cuda_is_asked_for_only_where_an_nvidia_device_is() -> None:
    names = [name for name, _ in requested_providers(RuntimeSettings())]  # default: CUDA, then CPU
    if nvidia_device_present():
        assert names[0] == Provider.CUDA.value
    else:
        assert names == [Provider.CPU.value]  # no CUDA library errors printed on a CPU machine


def test_cpu_is_always_kept_as_the_last_resort() -> None:
    assert requested_providers(RuntimeSettings(providers=[Provider.CUDA]))[-1][0] == Provider.CPU.value


def test_the_session_reports_the_provider_it_runs_on(models_dir: Path) -> None:
    session = open_session(models_dir / "embedder.onnx", RuntimeSettings(providers=[Provider.CPU]))
    assert session.get_providers()[0] == Provider.CPU.value


def test_require_gpu_refuses_a_cpu_session_with_a_clear_message(models_dir: Path) -> None:
    with pytest.raises(ModelUnavailable, match="FACEGATE_REQUIRE_GPU is set but the CUDA provider is not usable"):
        open_session(models_dir / "detector.onnx", RuntimeSettings(providers=[Provider.CPU]), require_gpu=True)


@pytest.mark.skipif(nvidia_device_present(), reason="this machine has a GPU: start-up would succeed")
def test_the_service_does_not_start_without_a_gpu_when_one_is_required(settings: Settings) -> None:
    required = settings.model_copy(update={"require_gpu": True, "runtime": RuntimeSettings()})
    with pytest.raises(ModelUnavailable, match="No NVIDIA GPU device is visible"):
        FaceService.open(required, load_models=True)


def test_a_session_that_failed_to_open_says_so_until_it_opens(models_dir: Path, tmp_path: Path) -> None:
    path = tmp_path / "embedder.onnx"
    session = LazySession(path, RuntimeSettings(providers=[Provider.CPU]))
    assert not session.failed
    with pytest.raises(ModelUnavailable, match="is missing"):
        session.load()
    assert session.failed and not session.loaded
    shutil.copyfile(models_dir / "embedder.onnx", path)  # e.g. `make models` finished meanwhile
    session.load()
    assert session.loaded and not session.failed


def test_onnx_runtime_telemetry_is_off_and_leaves_no_files(tmp_path: Path) -> None:
    """onnxruntime >= 1.29 writes a device id and queued usage events under ~/.cache/Microsoft (for upload to
    Microsoft) as soon as it is imported, unless ORT_DISABLE_TELEMETRY is set first: importing the app sets it."""
    env = {k: v for k, v in os.environ.items() if k not in ("ORT_DISABLE_TELEMETRY", "XDG_CACHE_HOME")}
    env["HOME"] = str(tmp_path)
    script = "import os, app.vision.runtime, onnxruntime; print(os.environ['ORT_DISABLE_TELEMETRY'])"
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "1"
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []


def test_usable_cores_are_the_cores_the_process_may_run_on(monkeypatch: pytest.MonkeyPatch) -> None:
    # taskset or a container's cpuset: 2 of the machine's 64 cores
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {3, 7}, raising=False)
    assert usable_cores() == 2


def test_usable_cores_fall_back_to_the_machine_without_an_affinity_api(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "cpu_count", lambda: 6)
    monkeypatch.delattr(os, "sched_getaffinity", raising=False)
    assert usable_cores() == 6
