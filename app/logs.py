"""Logging set-up of `facegate serve`: text or JSON lines on stderr (settings `log.format`, `log.level`).

`uvicorn_log_config()` is a `logging.config.dictConfig` dictionary handed to uvicorn, which applies it in every
worker process. uvicorn's own access log is switched off by `facegate serve`: it prints the raw path and the client
address; app/api/access_log.py writes one line per request instead (route template, status, latency, decision, key
prefix).

What goes in a log line: never an embedding, image bytes, an API key or a person's name (see README, Security and
privacy). Structured fields ride on a record as `extra={"fields": {...}}`; the JSON formatter puts them at the top
level, the text formatter after the message.
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from typing import Any

from app.config import LogFormat, LogSettings

FIELDS_ATTRIBUTE = "fields"
# Set on an exception once it is logged with its traceback and incident id (app/api/errors.py): uvicorn's own
# "Exception in ASGI application" record of the same exception, re-raised by Starlette, is then dropped.
LOGGED_ATTRIBUTE = "facegate_incident"


class AlreadyLogged(logging.Filter):
    """Drops a record whose exception was already logged (with its incident id) under LOGGED_ATTRIBUTE."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        return getattr(error, LOGGED_ATTRIBUTE, None) is None


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts (UTC, ISO 8601), level, logger, message, the record's fields, and the
    exception's traceback (server side only; responses never carry one)."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        fields = getattr(record, FIELDS_ATTRIBUTE, None)
        if isinstance(fields, dict):
            line.update({k: v for k, v in fields.items() if k not in line})
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """`time level logger: message key=value ...`."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        fields = getattr(record, FIELDS_ATTRIBUTE, None)
        if not isinstance(fields, dict) or not fields:
            return text
        head, newline, tail = text.partition("\n")  # key=values stay on the first line, before any traceback
        pairs = " ".join(f"{k}={v}" for k, v in fields.items() if v is not None)
        return f"{head} {pairs}{newline}{tail}"


def uvicorn_log_config(settings: LogSettings) -> dict[str, Any]:
    """Every logger (ours, uvicorn's) through one stderr handler in the chosen format."""
    formatter = JsonFormatter if settings.format is LogFormat.json else TextFormatter
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"facegate": {"()": f"{formatter.__module__}.{formatter.__qualname__}"}},
        "filters": {"logged_once": {"()": f"{AlreadyLogged.__module__}.{AlreadyLogged.__qualname__}"}},
        "handlers": {
            "stderr": {
                "class": "logging.StreamHandler",
                "formatter": "facegate",
                "filters": ["logged_once"],
                "stream": "ext://sys.stderr",
            }
        },
        "root": {"handlers": ["stderr"], "level": settings.level},
        "loggers": {
            # uvicorn's loggers propagate to the root handler instead of their own (plain-text) ones.
            **{
                name: {"handlers": [], "propagate": True, "level": settings.level}
                for name in ("uvicorn", "uvicorn.error", "uvicorn.access")
            },
            # Pillow logs every EXIF tag of a decoded photo (camera owner, GPS position, ...) at DEBUG.
            "PIL": {"level": "INFO"},
            # numba traces every kernel it compiles at DEBUG (~1,500 lines per worker at start: app/vision/pyramid.py).
            "numba": {"level": "INFO"},
            # alembic lists its 7 autogenerate plugins at INFO when imported: in each worker of --workers N, after
            # this configuration (the single process imports it before, unlogged).
            "alembic.runtime.plugins": {"level": "WARNING"},
        },
    }
