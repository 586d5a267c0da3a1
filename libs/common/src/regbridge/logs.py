"""Structured logs: one JSON object per line, with the event's fields, and no secrets."""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime

from regbridge.redact import redact_url

# Fields a log call may add with `extra=`; anything else in the record is pika's or logging's.
FIELDS = ("event", "user_id", "request_id", "stage", "outcome", "queue", "delay_s", "attempt", "reason")


class JsonFormatter(logging.Formatter):
    def __init__(self, service: str) -> None:
        super().__init__()
        self._service = service

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "service": self._service,
            "logger": record.name,
            "msg": redact_url(record.getMessage()),
        }
        for name in FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                entry[name] = redact_url(value) if isinstance(value, str) else value
        if record.exc_info:
            entry["exc"] = redact_url(self.formatException(record.exc_info))
        return json.dumps(entry, default=str)


def setup(service: str, level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(service))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # pika narrates every frame at INFO; its warnings still come through.
    logging.getLogger("pika").setLevel(max(logging.WARNING, root.level))
    logging.getLogger("uvicorn.access").setLevel(logging.WARNING)
