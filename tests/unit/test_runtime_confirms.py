"""The publisher-confirm tracker driven with a fake channel and hand-made confirm frames: no broker."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future
from types import SimpleNamespace
from typing import Any

import pytest
from pika.spec import Basic, BasicProperties

from regbridge.amqp import PublishError
from regbridge.amqp.confirms import PUBLISH_SEQ_HEADER, Confirms


class FakeChannel:
    def __init__(self) -> None:
        self.published: list[tuple[str, bytes, BasicProperties, bool]] = []
        self.on_return: Callable[..., None] | None = None
        self.on_confirm: Callable[[Any], None] | None = None
        self.refuse = False

    def add_on_return_callback(self, callback: Callable[..., None]) -> None:
        self.on_return = callback

    def confirm_delivery(self, *, ack_nack_callback: Callable[[Any], None], callback: Callable[[Any], None]) -> None:
        self.on_confirm = ack_nack_callback
        callback(None)

    def basic_publish(self, exchange: str, routing_key: str, body: bytes, properties: BasicProperties, *,
                      mandatory: bool) -> None:
        if self.refuse:
            raise RuntimeError("channel is closing")
        self.published.append((routing_key, body, properties, mandatory))

    def ack(self, seq: int, *, multiple: bool = False) -> None:
        assert self.on_confirm is not None
        self.on_confirm(SimpleNamespace(method=Basic.Ack(delivery_tag=seq, multiple=multiple)))

    def nack(self, seq: int, *, multiple: bool = False) -> None:
        assert self.on_confirm is not None
        self.on_confirm(SimpleNamespace(method=Basic.Nack(delivery_tag=seq, multiple=multiple)))

    def give_back(self, index: int) -> None:
        """The broker returns the `index`th published message as unroutable."""
        assert self.on_return is not None
        _key, body, properties, _mandatory = self.published[index]
        self.on_return(self, Basic.Return(reply_code=312, reply_text="NO_ROUTE"), properties, body)


class Tracked:
    def __init__(self) -> None:
        self.restarts = 0
        self.confirms = Confirms(on_unroutable=self._restart)
        self.channel = FakeChannel()
        self.attached: list[bool] = []
        self.confirms.attach(self.channel, lambda: self.attached.append(True))

    def _restart(self) -> None:
        self.restarts += 1

    def publish(self, n: int = 1) -> list[Future[None]]:
        futures: list[Future[None]] = []
        for i in range(n):
            future: Future[None] = Future()
            self.confirms.publish(self.channel, "q", f"m{i}".encode(), BasicProperties(headers={"keep": i}), future)
            futures.append(future)
        return futures


def error(future: Future[None]) -> str:
    exc = future.exception(timeout=0)
    assert isinstance(exc, PublishError)
    return str(exc)


def test_attach_enables_confirm_mode_then_continues() -> None:
    tracked = Tracked()
    assert tracked.attached == [True]
    assert not tracked.confirms.pending


def test_each_publish_is_mandatory_and_numbered_keeping_its_headers() -> None:
    tracked = Tracked()
    tracked.publish(2)
    assert [(p[0], p[3], p[2].headers) for p in tracked.channel.published] == [
        ("q", True, {"keep": 0, PUBLISH_SEQ_HEADER: 1}),
        ("q", True, {"keep": 1, PUBLISH_SEQ_HEADER: 2}),
    ]
    assert tracked.confirms.pending


def test_single_and_multiple_acks_settle_exactly_their_publishes() -> None:
    tracked = Tracked()
    futures = tracked.publish(4)
    tracked.channel.ack(2)
    assert [f.done() for f in futures] == [False, True, False, False]
    tracked.channel.ack(3, multiple=True)
    assert [f.done() for f in futures] == [True, True, True, False]
    assert all(f.exception(timeout=0) is None for f in futures[:3])
    tracked.channel.ack(4)
    assert not tracked.confirms.pending


def test_a_nack_fails_its_publishes_and_a_multiple_nack_all_up_to_it() -> None:
    tracked = Tracked()
    futures = tracked.publish(3)
    tracked.channel.nack(2, multiple=True)
    assert "nack" in error(futures[0]) and "nack" in error(futures[1])
    assert not futures[2].done()


def test_a_returned_message_fails_on_its_ack_and_restarts_the_link() -> None:
    tracked = Tracked()
    futures = tracked.publish(3)
    tracked.channel.give_back(1)
    tracked.channel.ack(3, multiple=True)
    assert futures[0].exception(timeout=0) is None and futures[2].exception(timeout=0) is None
    assert "unroutable" in error(futures[1])
    assert tracked.restarts == 1


def test_a_lost_channel_fails_what_is_open_and_the_next_channel_counts_from_one() -> None:
    tracked = Tracked()
    futures = tracked.publish(3)
    tracked.channel.ack(1)
    tracked.channel.give_back(2)
    tracked.confirms.fail_all("channel closed: gone")
    assert futures[0].exception(timeout=0) is None
    assert error(futures[1]) == error(futures[2]) == "unconfirmed when the channel closed: gone"
    assert not tracked.confirms.pending

    tracked.channel = FakeChannel()
    tracked.confirms.attach(tracked.channel, lambda: None)
    later = tracked.publish(3)
    assert tracked.channel.published[0][2].headers[PUBLISH_SEQ_HEADER] == 1
    tracked.channel.ack(3, multiple=True)  # the old channel's return of seq 3 is forgotten
    assert all(f.exception(timeout=0) is None for f in later)
    assert tracked.restarts == 0


def test_a_publish_the_channel_refuses_fails_at_once_and_is_not_tracked() -> None:
    tracked = Tracked()
    tracked.channel.refuse = True
    (future,) = tracked.publish()
    assert error(future).startswith("publish failed")
    assert not tracked.confirms.pending


@pytest.mark.parametrize("seq", [0, 7])
def test_a_confirm_of_nothing_open_is_ignored(seq: int) -> None:
    tracked = Tracked()
    (future,) = tracked.publish()
    tracked.channel.ack(seq)
    assert not future.done()


# ---- a confirm that never comes -------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_the_wait_of_the_oldest_open_confirm_is_known() -> None:
    clock = Clock()
    confirms = Confirms(on_unroutable=lambda: None, clock=clock)
    channel = FakeChannel()
    confirms.attach(channel, lambda: None)
    assert confirms.waiting_s() == 0.0
    for _ in range(2):
        confirms.publish(channel, "q", b"m", BasicProperties(), Future())
        clock.now += 5
    assert confirms.waiting_s() == 10.0
    channel.ack(1)
    assert confirms.waiting_s() == 5.0  # the second, published five seconds later
    confirms.fail_all("channel closed")
    assert confirms.waiting_s() == 0.0


def test_a_stalled_confirm_ends_the_connection_once_unless_an_alarm_explains_it() -> None:
    from regbridge.amqp import runtime as runtime_module
    from regbridge.amqp.runtime import AmqpRuntime

    rt = AmqpRuntime(url="amqp://guest:guest@127.0.0.1:1/%2F", queues=[], consume=[], workers=1, prefetch=1)
    clock = Clock()
    rt._confirms = Confirms(on_unroutable=lambda: None, clock=clock)
    channel = FakeChannel()
    rt._confirms.attach(channel, lambda: None)
    restarts: list[bool] = []
    rt._link.restart = lambda: restarts.append(True)  # type: ignore[method-assign]
    future: Future[None] = Future()
    rt._confirms.publish(channel, "registrations.failed", b"record", BasicProperties(), future)

    clock.now += runtime_module.CONFIRM_STALL_S - 1
    rt._watch_confirms()
    assert restarts == [] and not future.done()  # slow, not stalled
    rt._link.blocked = True
    clock.now += 60
    rt._watch_confirms()
    assert restarts == [] and not future.done()  # a broker alarm holds confirms back: wait for it
    rt._link.blocked = False
    rt._watch_confirms()
    assert restarts == [True] and "confirms stalled" in error(future)  # its delivery goes back
    rt._watch_confirms()
    assert restarts == [True]  # nothing open any more
