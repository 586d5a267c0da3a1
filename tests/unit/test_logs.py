"""The services' log setup: the bridge's loggers at LOG_LEVEL, every library capped at
LOG_LEVEL_THIRD_PARTY, and the URL settings' passwords masked in every line."""

from __future__ import annotations

import json
import logging
import sys
import threading
from collections.abc import Iterator

import pytest

from regbridge import logs
from regbridge.redact import Secrets


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    names = logs.THIRD_PARTY + logs.OWN + ("pymongo.command", "some.library")
    saved = (root.handlers[:], root.level, {n: logging.getLogger(n).level for n in names})
    hooks = (sys.excepthook, threading.excepthook)
    yield
    sys.excepthook, threading.excepthook = hooks
    root.handlers[:], _, levels = saved
    root.setLevel(saved[1])
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)


def lines(err: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in err.splitlines() if line.strip()]


def emit_everywhere() -> None:
    for name in ("pymongo.command", "pymongo.connection", "urllib3.connectionpool", "pika.connection",
                 "uvicorn.error", "some.library", "regbridge.executor", "submitter", "poller.service"):
        logger = logging.getLogger(name)
        logger.debug("debug from %s", name)
        logger.info("info from %s", name)
        logger.warning("warning from %s", name)


def test_at_debug_libraries_say_only_warnings(capsys: pytest.CaptureFixture[str]) -> None:
    logs.setup("submitter", "DEBUG")
    emit_everywhere()
    seen = {(e["logger"], e["level"]) for e in lines(capsys.readouterr().err)}
    for own in ("regbridge.executor", "submitter", "poller.service"):
        assert {(own, "debug"), (own, "info"), (own, "warning")} <= seen
    for library in ("pymongo.command", "pymongo.connection", "urllib3.connectionpool", "pika.connection",
                    "uvicorn.error", "some.library"):
        assert (library, "warning") in seen
        assert (library, "debug") not in seen and (library, "info") not in seen, library


def test_a_setting_lets_the_libraries_speak(capsys: pytest.CaptureFixture[str]) -> None:
    logs.setup("poller", "DEBUG", third_party="DEBUG")
    emit_everywhere()
    seen = {(e["logger"], e["level"]) for e in lines(capsys.readouterr().err)}
    assert ("pymongo.command", "debug") in seen and ("some.library", "debug") in seen


def test_libraries_are_never_louder_than_log_level(capsys: pytest.CaptureFixture[str]) -> None:
    logs.setup("poller", "ERROR", third_party="DEBUG")
    emit_everywhere()
    assert lines(capsys.readouterr().err) == []


def test_known_passwords_are_masked_in_message_fields_and_tracebacks(capsys: pytest.CaptureFixture[str]) -> None:
    url = "amqp://bridge:Sp%20ace-Secret@rabbit:5672/%2F"
    logs.setup("submitter", "INFO", secrets=Secrets.of_urls([url]))
    log = logging.getLogger("regbridge.test")
    log.warning("login refused for password 'Sp ace-Secret'", extra={"reason": "bad Sp%20ace-Secret"})
    try:
        raise ValueError("Sp ace-Secret")
    except ValueError:
        log.exception("failed")
    err = capsys.readouterr().err
    assert "ace-Secret" not in err
    first, second = lines(err)
    assert first["msg"] == "login refused for password '***'" and first["reason"] == "bad ***"
    assert "ValueError: ***" in str(second["exc"])


def test_an_uncaught_exception_goes_through_the_masks(capsys: pytest.CaptureFixture[str]) -> None:
    logs.setup("poller", "INFO", secrets=Secrets.of_urls(["mongodb://m:Sp%20ace-Secret@db/"]))
    try:
        raise RuntimeError("cannot use mongodb://m:Sp ace-Secret@db/")
    except RuntimeError as exc:
        sys.excepthook(RuntimeError, exc, exc.__traceback__)
    thread = threading.Thread(target=lambda: (_ for _ in ()).throw(ValueError("Sp ace-Secret")))
    thread.start()
    thread.join()
    err = capsys.readouterr().err
    assert "ace-Secret" not in err
    entries = lines(err)
    assert [e["event"] for e in entries] == ["uncaught", "uncaught"]
    assert "RuntimeError: cannot use mongodb://***@db/" in str(entries[0]["exc"])
