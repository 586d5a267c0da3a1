"""The broker, from the operator's side: one blocking connection on the command's one thread.

Browsing a queue without losing or reordering it (`Browse`): every message is taken with
`basic.get` and no ack, so it stays with this channel, unacknowledged, and the next get sees
the next message; each is seen once. When the browse ends, whatever was not acked is handed
back with one `basic.nack(requeue=True)` per message, in the order it was read.

Why read the whole queue, and why nack one by one, in order: a quorum queue does not put a
returned message back where it was. On RabbitMQ 3.10 (checked by `tests/integration/test_cli.py`),
a message handed back with `basic.nack` goes behind every message still in the queue, and the
messages of a channel that closes holding them come back, from ten on, in an order of their own.
So a browse reads until the queue is empty, then hands every message back itself, in the order
read: the queue ends up exactly as it was (and so it would on a broker that returns messages to
the head). If the command dies in the middle, the broker takes its messages back: none is lost,
but their order may change. A record the services add while a browse reads is read too and
keeps its place; one added in the instant between the last read and the hand-back lands ahead
of the records handed back.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pika
import pika.exceptions
from pika.adapters.blocking_connection import BlockingChannel, BlockingConnection

from .errors import CliError
from .settings import CliSettings


@contextmanager
def connect(settings: CliSettings) -> Iterator[BlockingConnection]:
    """A connection to the broker, or a one-line error saying why there is none."""
    where = settings.broker_shown
    try:
        params = pika.URLParameters(settings.rabbitmq_url)
    except Exception:
        raise CliError("RABBITMQ_URL is not a valid amqp URL (value not shown: it may hold credentials)") from None
    params.connection_attempts = 1
    params.socket_timeout = 5
    params.blocked_connection_timeout = 30
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


@dataclass(frozen=True)
class Held:
    """One message taken from a queue and not acknowledged (yet)."""

    position: int  # 1-based, in queue order at the time of the browse
    delivery_tag: int
    properties: pika.BasicProperties
    body: bytes


class Browse:
    """Every message of `queue`, held unacked on a channel of its own; on leaving, everything not
    acked goes back in the order it was read (see the module's docstring)."""

    def __init__(self, connection: BlockingConnection, queue: str) -> None:
        self._connection = connection
        self._queue = queue
        self._channel: BlockingChannel | None = None
        self._held: list[Held] = []
        self._acked: set[int] = set()

    def __enter__(self) -> Browse:
        self._channel = self._connection.channel()
        return self

    def read_all(self) -> list[Held]:
        """Take every message until the queue is empty (records that arrive meanwhile included)."""
        channel = self._require()
        while True:
            method, properties, body = channel.basic_get(self._queue, auto_ack=False)
            if method is None:
                return list(self._held)
            assert method.delivery_tag is not None and properties is not None
            self._held.append(Held(len(self._held) + 1, method.delivery_tag, properties, body or b""))

    def ack(self, held: Held) -> None:
        """Remove this message from the queue for good."""
        self._require().basic_ack(held.delivery_tag)
        self._acked.add(held.delivery_tag)

    def __exit__(self, *exc: object) -> None:
        channel = self._channel
        if channel is None or not channel.is_open:
            self._channel = None
            return  # the broker has them back already (in an order of its own: see above)
        try:
            # What arrived since the last read (a replay that failed again, say) is taken too,
            # so that it is handed back behind the records that were there before it.
            self.read_all()
            for held in self._held:
                if held.delivery_tag not in self._acked:
                    channel.basic_nack(held.delivery_tag, requeue=True)
            # close-ok comes after the broker has handled every nack and ack sent before it.
            channel.close()
        except pika.exceptions.AMQPError:
            pass  # the connection is gone: the broker takes them back itself; none is lost
        finally:
            self._channel = None

    def _require(self) -> BlockingChannel:
        if self._channel is None:
            raise RuntimeError("Browse used outside its `with` block")
        return self._channel


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
