"""The README documents every setting and every endpoint the app serves."""

from __future__ import annotations

import re

from app.config import REPO_ROOT, settings_reference
from app.main import create_app

README = (REPO_ROOT / "README.md").read_text()


def test_every_setting_is_documented() -> None:
    missing = [name for name, _, _ in settings_reference() if f"`{name}`" not in README]
    assert missing == []


def test_every_endpoint_has_a_curl_example() -> None:
    app = create_app()  # builds routes only: no I/O until the lifespan starts
    paths = set(app.openapi()["paths"])
    assert {"/enroll", "/verify", "/identify", "/identities", "/healthz", "/readyz"} <= paths
    examples = " ".join(line for line in README.splitlines() if line.lstrip().startswith("curl"))
    for path in paths:
        pattern = re.sub(r"\{[^}]+\}", "[^ /']+", path) + r"(?:[?' ]|$)"
        assert re.search(pattern, examples), f"no curl example for {path}"
