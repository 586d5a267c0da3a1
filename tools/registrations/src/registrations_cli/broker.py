"""The broker, from the operator's side: one blocking connection on the command's one thread.
Browsing a queue is `cycle.Cycle`."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pika
import pika.exceptions
from pika.adapters.blocking_connection import BlockingConnection

from regbridge.brokers import Rotation

from .errors import CliError
from .settings import CliSettings


@contextmanager
def connect(settings: CliSettings) -> Iterator[BlockingConnection]:
    """A connection to the broker, or a one-line error saying why there is none."""
    where = settings.broker_shown
    # One round of the nodes, in the order the services would try them.
    nodes = Rotation(settings.rabbitmq_urls, settings.rabbitmq_url_order)
    try:
        params = [pika.URLParameters(nodes.next()) for _ in settings.rabbitmq_urls]
    except Exception:
        raise CliError("RABBITMQ_URL is not a valid amqp URL (value not shown: it may hold credentials)") from None
    for one in params:  # a node that does not answer gives way to the next one soon
        one.connection_attempts = 1
        one.socket_timeout = 5
        one.blocked_connection_timeout = 30
    try:
        connection = pika.BlockingConnection(params)
    except pika.exceptions.ProbableAuthenticationError:
        raise CliError(f"the broker at {where} refused the credentials") from None
    except pika.exceptions.ProbableAccessDeniedError:
        raise CliError(f"the broker at {where} refused access (does the vhost exist, and may this user use it?)") \
            from None
    except (pika.exceptions.AMQPError, OSError, socket.gaierror) as exc:
        raise CliError(f"cannot connect to the broker at {where} ({_describe(exc)})") from None
    try:
        yield connection
    finally:
        with suppress(Exception):
            connection.close()


def _describe(exc: BaseException) -> str:
    """The root cause in a few words: pika wraps it (`AMQPConnectionError` with an empty text)."""
    cause: object = exc
    while isinstance(cause, pika.exceptions.AMQPConnectionError) and cause.args:
        cause = cause.args[0]
    inner = getattr(cause, "exception", None)  # pika's connector errors carry the socket error
    if isinstance(inner, BaseException):
        cause = inner
    if isinstance(cause, OSError) and cause.strerror:
        return cause.strerror
    text = str(cause).strip() if isinstance(cause, BaseException | str) else ""
    return (text or type(cause).__name__).splitlines()[0][:200]


@dataclass(frozen=True)
class QueueInfo:
    name: str
    ready: int  # ready messages; those a consumer holds unacked are not counted
    consumers: int


def queue_info(connection: BlockingConnection, name: str) -> QueueInfo | None:
    """A passive declare on a channel of its own (a missing queue closes the channel): None when
    the queue does not exist."""
    channel = connection.channel()
    try:
        ok = channel.queue_declare(name, passive=True)
    except pika.exceptions.ChannelClosedByBroker as exc:
        if exc.reply_code == 404:
            return None
        raise
    method = ok.method
    with suppress(Exception):
        channel.close()
    return QueueInfo(name, int(method.message_count), int(method.consumer_count))


def require_queue(connection: BlockingConnection, name: str, settings: CliSettings) -> QueueInfo:
    info = queue_info(connection, name)
    if info is None:
        raise CliError(f"queue {name!r} does not exist on the broker at {settings.broker_shown}; the services "
                       "declare it when they start (start the submitter once), or check the *_QUEUE variables")
    return info


def properties_view(properties: pika.BasicProperties) -> dict[str, Any]:
    """The AMQP properties a message carries, as JSON-friendly values (unset ones left out)."""
    view: dict[str, Any] = {}
    for name in ("content_type", "content_encoding", "delivery_mode", "priority", "correlation_id", "reply_to",
                 "expiration", "message_id", "timestamp", "type", "user_id", "app_id", "headers"):
        value = getattr(properties, name, None)
        if value is None:
            continue
        if name == "timestamp" and isinstance(value, int):
            value = datetime.fromtimestamp(value, UTC).isoformat()
        view[name] = _plain(value)
    return view


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if isinstance(value, datetime):
        return value.isoformat()
    if value is None or isinstance(value, str | int | float | bool):
        return value
    return str(value)
