"""Issue 6: schemathesis generates requests from facegate's own OpenAPI document, valid and invalid, for every
operation, against the real app (real models, a real SQLite gallery). Whatever it sends: never a 5xx, and every
response (errors included) matches the schema the operation documents.

Bounded and reproducible: a fixed number of examples per operation, derandomized (the same inputs on every run), no
shrinking of failures, no example database. Most generated photos are random bytes refused at decoding, so the real
models are rarely reached and the module stays well under a minute.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from app.main import create_app
from tests.api.conftest import api_settings, running
from tests.conftest import MODELS_DIR

pytestmark = pytest.mark.model

MAX_EXAMPLES = 25  # per operation and generation mode
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


def _operations() -> list[Any]:
    """(operation label, generation mode) for every operation of the document (the app builds it without opening
    anything): valid data for all, invalid data for those that take any input."""
    document = create_app(api_settings(MODELS_DIR, "sqlite://")).openapi()
    params = []
    for path, item in sorted(document["paths"].items()):
        for method, operation in sorted(item.items()):
            label = f"{method.upper()} {path}"
            params.append(pytest.param(label, GenerationMode.POSITIVE, id=f"{label}-valid"))
            if operation.get("parameters") or operation.get("requestBody"):
                params.append(pytest.param(label, GenerationMode.NEGATIVE, id=f"{label}-invalid"))
    return params


@pytest.fixture(scope="module")
def fuzzed(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[TestClient, Any]]:
    """A real app (models loaded, a fresh SQLite gallery) with its test client, and its own schema, which
    schemathesis calls in-process. The app's lifespan is run by the test client, once: schemathesis' pytest plugin
    would stop and restart it around every test."""
    db = tmp_path_factory.mktemp("fuzz") / "gallery.db"
    with running(api_settings(models_dir, f"sqlite:///{db}")) as client:
        app = client.app

        async def served(scope: Any, receive: Any, send: Any) -> None:
            if scope["type"] == "lifespan":  # refused before any message: schemathesis then runs no lifespan
                raise RuntimeError("the lifespan is run by the test client")
            await app(scope, receive, send)

        yield client, schemathesis.openapi.from_asgi("/openapi.json", served)


@pytest.fixture(scope="module")
def api_schema(fuzzed: tuple[TestClient, Any]) -> Any:
    return fuzzed[1]


@pytest.mark.parametrize(("label", "mode"), _operations())
def test_no_server_error_and_responses_match_the_schema(api_schema: Any, label: str, mode: GenerationMode) -> None:
    # (schemathesis' own pytest plugin, `schemathesis.pytest.from_fixture`, does not run under pytest 9: the
    # strategy is driven with hypothesis directly.)
    operation = api_schema.find_operation_by_label(label)
    assert operation is not None, label

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(
        max_examples=MAX_EXAMPLES,
        derandomize=True,
        database=None,
        deadline=None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    def run(case: Any) -> None:
        case.call_and_validate(checks=CHECKS)

    run()


def test_real_photos_get_responses_that_match_the_schema(fuzzed: Any, photo: Any) -> None:
    """Generated photos are refused at decoding, so the 2xx answers of the photo endpoints are checked here with real
    faces: every answer of an enrol -> verify -> identify -> cluster -> edit -> delete round is validated against the
    schema its operation documents."""
    client, api_schema = fuzzed
    colin = photo("colin_powell/krasserm__Colin_Powell_0001.jpg")
    colin2 = photo("colin_powell/krasserm__Colin_Powell_0002.jpg")
    amy = photo("bbt_amy/face-api__amy1.png")

    def call(label: str, path: str, expected: int, **kwargs: Any) -> Any:
        method, template = label.split(" ", 1)
        response = client.request(method, path, **kwargs)
        assert response.status_code == expected, response.text
        api_schema[template][method].validate_response(response)
        return response.json()

    enrolled = call("POST /enroll", "/enroll", 201, files={"image": colin}, data={"name": "Colin"})
    one = f"/identities/{enrolled['identity_id']}"
    added = call("POST /identities/{identity_id}/faces", f"{one}/faces", 201, files={"image": colin2})
    call("POST /verify", "/verify", 200, files={"image": colin2}, data={"identity_id": enrolled["identity_id"]})
    call("POST /verify", "/verify", 200, files={"image_a": colin, "image_b": amy})
    call("POST /identify", "/identify", 200, files={"image": colin2}, data={"top_k": "3"})
    call("POST /cluster", "/cluster", 200, files=[("images", colin), ("images", colin2), ("images", amy)])
    call("GET /identities", "/identities", 200, params={"limit": 10})
    call("PATCH /identities/{identity_id}", one, 200, json={"name": "Colin P.", "metadata": {"a": 1}})
    call("GET /identities/{identity_id}", one, 200)
    pairs = {"source": "pairs", "same": [0.1, 0.2], "different": [0.7, 0.9], "target_far": 0.5}
    call("POST /calibrate", "/calibrate", 200, json=pairs)
    call("GET /calibration", "/calibration", 200)
    call("DELETE /identities/{identity_id}/faces/{face_id}", f"{one}/faces/{added['face_id']}", 200)
    call("DELETE /identities/{identity_id}", one, 200)
