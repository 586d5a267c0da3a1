"""Several brokers in `RABBITMQ_URL`: how the setting splits, how nodes are named and redacted,
and the order in which a client tries them."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from regbridge.amqp.link import existing_group_size
from regbridge.brokers import Order, Rotation, node_of, split_urls
from regbridge.redact import redact_url_value
from regbridge.settings import SettingsError, poller_settings

THREE = "amqp://u:p@r0:5672/%2F,amqp://u:p@r1:5673/%2F, amqps://u:p@r2/v"


def test_a_list_splits_at_each_comma_that_starts_a_url() -> None:
    assert split_urls(THREE) == ["amqp://u:p@r0:5672/%2F", "amqp://u:p@r1:5673/%2F", "amqps://u:p@r2/v"]
    assert split_urls("amqp://guest:guest@localhost:5672/%2F") == ["amqp://guest:guest@localhost:5672/%2F"]


def test_a_comma_inside_a_password_stays_in_its_url() -> None:
    assert split_urls("amqp://u:a,b@r0/%2F,amqp://u:a,b@r1/%2F") == ["amqp://u:a,b@r0/%2F", "amqp://u:a,b@r1/%2F"]


def test_a_node_is_named_by_host_and_port_never_by_its_credentials() -> None:
    assert node_of("amqp://u:p@r0:5673/%2F") == "r0:5673"
    assert node_of("amqps://u:p@r2/v") == "r2:5671"
    assert node_of("amqp://r3") == "r3:5672"
    assert node_of("amqp://us@er:p@ss/word@10.0.0.1:5672/%2F") == "10.0.0.1:5672"


def test_every_url_of_a_list_is_redacted_and_its_host_kept() -> None:
    shown = redact_url_value("amqp://u:Sp ace@r0:5672/%2F,amqp://u:p@ss@r1:5672/%2F")
    assert shown == "amqp://***@r0:5672/%2F,amqp://***@r1:5672/%2F"


def test_settings_take_a_list_and_name_a_bad_entry_without_echoing_it() -> None:
    settings = poller_settings({"RABBITMQ_URL": THREE, "RABBITMQ_URL_ORDER": "listed"})
    assert settings.rabbitmq_urls == split_urls(THREE)
    assert settings.rabbitmq_url_order is Order.LISTED
    assert settings.quorum_initial_group_size == 3
    assert "u:p" not in str(settings.safe_view())
    with pytest.raises(SettingsError) as raised:
        poller_settings({"RABBITMQ_URL": "amqp://u:secret@r0/%2F,http://u:secret@r1/"})
    assert "RABBITMQ_URL" in str(raised.value) and "secret" not in str(raised.value)
    with pytest.raises(SettingsError, match="RABBITMQ_URL_ORDER"):
        poller_settings({"RABBITMQ_URL_ORDER": "random"})


def test_listed_order_keeps_to_the_list_and_moves_on_after_a_loss() -> None:
    rotation = Rotation(["a", "b", "c"], Order.LISTED)
    assert [rotation.next() for _ in range(4)] == ["a", "b", "c", "a"]


def test_a_failed_try_moves_on_at_once_until_a_whole_round_failed() -> None:
    rotation = Rotation(["a", "b", "c"], Order.SHUFFLED, random.Random(1))
    tried = []
    while not rotation.round_failed:
        tried.append(rotation.next())
    assert sorted(tried) == ["a", "b", "c"]  # each node once before any backoff
    rotation.start_round()
    assert not rotation.round_failed


def test_a_single_broker_backs_off_after_each_failure() -> None:
    rotation = Rotation(["only"])
    assert rotation.next() == "only"
    assert rotation.round_failed


def test_the_node_just_lost_is_not_tried_first_and_replicas_spread() -> None:
    for seed in range(200):
        rotation = Rotation(["a", "b", "c"], Order.SHUFFLED, random.Random(seed))
        lost = rotation.next()
        rotation.start_round()  # it connected, then lost that connection
        for _ in range(7):  # whatever the round, the next try is never the node just tried
            following = rotation.next()
            assert following != lost
            lost = following
    firsts = Counter(Rotation(["a", "b", "c"]).next() for _ in range(600))
    assert set(firsts) == {"a", "b", "c"} and min(firsts.values()) > 120


def test_only_a_difference_in_group_size_is_adopted() -> None:
    assert existing_group_size("PRECONDITION_FAILED - inequivalent arg 'x-quorum-initial-group-size' for queue "
                               "'q' in vhost '/': received the value '3' of type 'signedint' but current is none") \
        == (True, None)
    assert existing_group_size("PRECONDITION_FAILED - inequivalent arg 'x-quorum-initial-group-size' for queue "
                               "'q' in vhost '/': received none but current is the value '5' of type 'signedint'") \
        == (True, 5)
    assert existing_group_size("PRECONDITION_FAILED - inequivalent arg 'x-quorum-initial-group-size' for queue "
                               "'q' in vhost 'v': received '3' but current is '5'") == (True, 5)
    assert existing_group_size("PRECONDITION_FAILED - inequivalent arg 'x-delivery-limit' for queue 'q' in vhost "
                               "'/': received none but current is the value '5' of type 'signedint'")[0] is False
