"""Structured logs: one JSON object per line, with the event's fields, and no secrets.

The bridge's own loggers log at `LOG_LEVEL`; every other library at `LOG_LEVEL_THIRD_PARTY`
(WARNING by default) or above. Libraries narrate what they carry at DEBUG and INFO: pymongo's
command logging writes command bodies (user documents), urllib3 request lines, pika every frame.
The cap is set on the root logger, so a library not named here is capped too.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
from datetime import UTC, datetime
from types import TracebackType

from regbridge.redact import Secrets

# Fields a log call may add with `extra=`; anything else in the record is pika's or logging's.
FIELDS = ("event", "user_id", "request_id", "stage", "outcome", "queue", "delay_s", "attempt", "reason")
# The bridge's own loggers (module names, and the services' `logging.getLogger(<service>)`).
OWN = ("regbridge", "registrations_cli", "submitter", "poller")
# Named as well as capped through the root: a library that set a level of its own on import
# is held to the cap all the same.
THIRD_PARTY = ("pymongo", "urllib3", "pika", "uvicorn", "fastapi", "asyncio")


class JsonFormatter(logging.Formatter):
    def __init__(self, service: str, secrets: Secrets | None = None) -> None:
        super().__init__()
        self._service = service
        self._secrets = secrets or Secrets()

    def format(self, record: logging.LogRecord) -> str:
        mask = self._secrets.mask
        entry: dict[str, object] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "service": self._service,
            "logger": record.name,
            "msg": mask(record.getMessage()),
        }
        for name in FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                entry[name] = mask(value) if isinstance(value, str) else value
        if record.exc_info:
            entry["exc"] = mask(self.formatException(record.exc_info))
        return json.dumps(entry, default=str)


def setup(service: str, level: str, *, third_party: str = "WARNING", secrets: Secrets | None = None) -> None:
    """Log JSON lines to stderr: the bridge's loggers at `level`, every other at `third_party`,
    never below `level`; `secrets` are masked in every line."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(service, secrets))
    own = logging.getLevelName(level)
    others = max(own, logging.getLevelName(third_party))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(others)
    for name in THIRD_PARTY:
        logging.getLogger(name).setLevel(others)
    for name in OWN:
        logging.getLogger(name).setLevel(own)
    # An exception nothing caught would otherwise be printed raw, past the formatter's masks (a
    # library's error about a URL may quote it).
    sys.excepthook = _log_uncaught
    threading.excepthook = lambda args: _log_uncaught(args.exc_type, args.exc_value, args.exc_traceback)


def _log_uncaught(exc_type: type[BaseException], exc: BaseException | None, tb: TracebackType | None) -> None:
    if exc is None or issubclass(exc_type, SystemExit):
        return
    logging.getLogger("regbridge.uncaught").critical("uncaught %s", exc_type.__name__, exc_info=(exc_type, exc, tb),
                                                     extra={"event": "uncaught"})
