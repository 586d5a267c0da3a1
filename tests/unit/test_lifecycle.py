"""The pure life of a registration: the submit and poll policies, answer classification."""

from __future__ import annotations

import itertools
import json

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from regbridge.lifecycle import (
    POLL_OUTCOMES,
    SUBMIT_OUTCOMES,
    Accepted,
    Completed,
    Decision,
    Fail,
    HandOn,
    LegacyFailed,
    NotFound,
    Outcome,
    PollAfter,
    PollOutcome,
    PollPolicy,
    Processing,
    Register,
    Rejected,
    RetrySubmit,
    Stage,
    SubmitOutcome,
    SubmitPolicy,
    Transient,
    classify_poll,
    classify_submit,
    clean_text,
    may_record,
    parse_retry_after,
    valid_request_id,
)

FAST = settings(max_examples=200, deadline=None, derandomize=True, database=None)

OUTCOMES: list[Outcome] = [
    Accepted("AB583C-X"),
    Rejected("bad", 400),
    Transient("busy", 503),
    Processing(),
    Completed(),
    LegacyFailed("no"),
    NotFound("gone"),
]
DECISIONS: list[Decision] = [HandOn("AB583C-X"), RetrySubmit(1.0), PollAfter(2.0), Register(),
                             Fail(Stage.SUBMIT, "x")]

# ---- the moves the policies make --------------------------------------------------------------
# The state machine is the two policies: RECEIVED's moves are SubmitPolicy's, SUBMITTED's are
# PollPolicy's, and REGISTERED and FAILED have none. Whatever the budget or the age, each
# outcome leads only to these decisions.
SUBMIT_MOVES: dict[type, set[type]] = {Accepted: {HandOn}, Rejected: {Fail}, Transient: {RetrySubmit, Fail}}
POLL_MOVES: dict[type, set[type]] = {Processing: {PollAfter, Fail}, Transient: {PollAfter, Fail},
                                     Completed: {Register}, LegacyFailed: {Fail}, NotFound: {Fail}}


@pytest.mark.parametrize(("outcome", "attempt"),
                         list(itertools.product([o for o in OUTCOMES if type(o) in SUBMIT_MOVES], [1, 2, 5, 6, 9])))
def test_the_submit_policy_makes_only_its_moves(outcome: SubmitOutcome, attempt: int) -> None:
    decision = SubmitPolicy(6, 0.5, 30).decide(outcome, attempt=attempt, jitter=0.3)
    assert type(decision) in SUBMIT_MOVES[type(outcome)]
    assert not isinstance(decision, PollAfter | Register)


@pytest.mark.parametrize(("outcome", "age"), list(itertools.product(
    [o for o in OUTCOMES if type(o) in POLL_MOVES], [0, 10, 299, 300, 5000])))
def test_the_poll_policy_makes_only_its_moves(outcome: PollOutcome, age: float) -> None:
    decision = PollPolicy(10, 2, 300).decide(outcome, age_s=age)
    assert type(decision) in POLL_MOVES[type(outcome)]
    assert not isinstance(decision, HandOn | RetrySubmit)


def test_metric_labels_are_named_and_distinct() -> None:
    labels = [o.label for o in (*SUBMIT_OUTCOMES, *POLL_OUTCOMES)]
    assert sorted(set(labels)) == ["accepted", "completed", "legacyfailed", "notfound", "processing", "rejected",
                                   "transient"]


# ---- SubmitPolicy -----------------------------------------------------------------------------

SUBMIT = SubmitPolicy(max_attempts=5, backoff_base_s=0.5, backoff_max_s=4.0)


def test_accepted_hands_on() -> None:
    assert SUBMIT.decide(Accepted("AB583C-X"), attempt=1, jitter=0.3) == HandOn("AB583C-X")


@pytest.mark.parametrize("status", [400, 401, 403, 404, 409, 413, 422])
def test_a_4xx_is_permanent(status: int) -> None:
    decision = SUBMIT.decide(Rejected(f"no ({status})", status), attempt=1, jitter=0.0)
    assert decision == Fail(Stage.SUBMIT, f"no ({status})", status)


def test_a_rejection_fails_even_on_the_last_attempt() -> None:
    assert SUBMIT.decide(Rejected("no", 400), attempt=5, jitter=0.0) == Fail(Stage.SUBMIT, "no", 400)


@pytest.mark.parametrize(
    "outcome",
    [Transient("busy", 429), Transient("busy", 503), Transient("busy", 500), Transient("legacy API timed out"),
     Transient("legacy API unreachable: ConnectionError")],
)
def test_transient_answers_are_retried(outcome: Transient) -> None:
    decision = SUBMIT.decide(outcome, attempt=1, jitter=0.0)
    assert decision == RetrySubmit(0.25)


def test_backoff_grows_then_is_capped() -> None:
    ceilings = [SUBMIT.backoff(attempt, jitter=0.999999) for attempt in range(1, 8)]
    assert ceilings == pytest.approx([0.5, 1.0, 2.0, 4.0, 4.0, 4.0, 4.0], rel=1e-5)
    floors = [SUBMIT.backoff(attempt, jitter=0.0) for attempt in range(1, 8)]
    assert floors == [0.25, 0.5, 1.0, 2.0, 2.0, 2.0, 2.0]


@FAST
@given(st.integers(min_value=1, max_value=60), st.floats(min_value=0.0, max_value=1.0, exclude_max=True))
def test_backoff_is_jittered_within_half_to_full_ceiling(attempt: int, jitter: float) -> None:
    ceiling = min(4.0, 0.5 * 2 ** (attempt - 1))
    delay = SUBMIT.backoff(attempt, jitter)
    assert ceiling / 2 <= delay <= ceiling
    decision = SUBMIT.decide(Transient("busy", 503), attempt=min(attempt, 4), jitter=jitter)
    assert isinstance(decision, RetrySubmit)
    assert decision.delay_s <= 4.0


def test_jitter_spreads_the_delay() -> None:
    delays = {SUBMIT.backoff(3, jitter) for jitter in (0.0, 0.25, 0.5, 0.75)}
    assert delays == {1.0, 1.25, 1.5, 1.75}


@pytest.mark.parametrize(
    ("retry_after", "expected"),
    [(3.0, 3.0), (0.1, 0.25), (3.5, 3.5), (4.0, 4.0), (60.0, 4.0), (3600.0, 4.0)],
)
def test_retry_after_is_honoured_up_to_the_cap(retry_after: float, expected: float) -> None:
    decision = SUBMIT.decide(Transient("busy", 429, retry_after), attempt=1, jitter=0.0)
    assert decision == RetrySubmit(expected)


def test_budget_exhausted_gives_up() -> None:
    for attempt in range(1, 5):
        assert isinstance(SUBMIT.decide(Transient("busy", 503), attempt=attempt, jitter=0.5), RetrySubmit)
    decision = SUBMIT.decide(Transient("legacy API busy: HTTP 503", 503), attempt=5, jitter=0.5)
    assert decision == Fail(Stage.SUBMIT, "gave up after 5 attempts: legacy API busy: HTTP 503", 503)


def test_budget_exhausted_on_a_timeout_has_no_http_status() -> None:
    decision = SUBMIT.decide(Transient("legacy API timed out"), attempt=5, jitter=0.5)
    assert decision == Fail(Stage.SUBMIT, "gave up after 5 attempts: legacy API timed out", None)


def test_single_attempt_budget() -> None:
    policy = SubmitPolicy(max_attempts=1, backoff_base_s=1, backoff_max_s=1)
    assert isinstance(policy.decide(Transient("busy", 429), attempt=1, jitter=0.0), Fail)


# ---- PollPolicy -------------------------------------------------------------------------------

POLL = PollPolicy(first_delay_s=10.0, interval_s=2.0, deadline_s=300.0)


def test_tiers_are_the_distinct_positive_delays_sorted() -> None:
    assert POLL.tiers() == (2.0, 10.0)
    assert PollPolicy(0.0, 2.0, 300.0).tiers() == (2.0,)
    assert PollPolicy(2.0, 2.0, 300.0).tiers() == (2.0,)
    assert PollPolicy(0.25, 1.0, 5.0).tiers() == (0.25, 1.0)


@pytest.mark.parametrize(
    ("delay", "tier"),
    [(0.0, 2.0), (0.5, 2.0), (2.0, 2.0), (2.01, 10.0), (7.0, 10.0), (10.0, 10.0), (11.0, 10.0), (1e9, 10.0)],
)
def test_tier_for_is_the_shortest_tier_long_enough(delay: float, tier: float) -> None:
    assert POLL.tier_for(delay) == tier


@pytest.mark.parametrize(("age", "wait"), [(0.0, 10.0), (3.0, 10.0), (7.99, 10.0), (8.0, 2.0), (9.9, 2.0)])
def test_first_wait_before_the_first_delay(age: float, wait: float) -> None:
    assert POLL.first_wait(age_s=age) == wait


@pytest.mark.parametrize("age", [10.0, 10.5, 299.0, 400.0])
def test_first_wait_is_none_once_the_first_delay_passed(age: float) -> None:
    assert POLL.first_wait(age_s=age) is None


def test_first_wait_with_no_first_delay_polls_at_once() -> None:
    assert PollPolicy(0.0, 2.0, 300.0).first_wait(age_s=0.0) is None


def test_first_wait_with_the_submission_in_the_future_still_waits() -> None:
    # Clock skew between hosts: never a poll now, however odd the age.
    assert POLL.first_wait(age_s=-50.0) == 10.0


@FAST
@given(
    st.floats(min_value=0.001, max_value=1000.0),
    st.floats(min_value=0.001, max_value=1000.0),
    st.floats(min_value=0.0, max_value=1.0, exclude_max=True),
)
def test_first_wait_never_lets_a_poll_happen_before_the_first_delay(first: float, interval: float,
                                                                    fraction: float) -> None:
    policy = PollPolicy(first_delay_s=first, interval_s=interval, deadline_s=first + 300)
    age = first * fraction
    assume(age < first)
    wait = policy.first_wait(age_s=age)
    assert wait is not None
    assert wait >= first - age
    assert wait in policy.tiers()


@FAST
@given(st.floats(min_value=0.001, max_value=1000.0), st.floats(min_value=0.001, max_value=1000.0),
       st.floats(min_value=-1e6, max_value=1e6))
def test_first_wait_is_a_tier_or_none(first: float, interval: float, age: float) -> None:
    policy = PollPolicy(first_delay_s=first, interval_s=interval, deadline_s=first + 300)
    wait = policy.first_wait(age_s=age)
    if age >= first:
        assert wait is None
    else:
        assert wait in policy.tiers()


def test_completed_registers() -> None:
    assert POLL.decide(Completed(), age_s=15.0) == Register()
    # Completed wins even after the deadline: the registration did happen.
    assert POLL.decide(Completed(), age_s=1000.0) == Register()


def test_legacy_failed_fails_with_http_200() -> None:
    assert POLL.decide(LegacyFailed("cpf blocked"), age_s=15.0) == Fail(Stage.LEGACY, "cpf blocked", 200)


def test_not_found_fails_at_the_poll_stage() -> None:
    assert POLL.decide(NotFound("unknown id", 404), age_s=15.0) == Fail(Stage.POLL, "unknown id", 404)


@pytest.mark.parametrize("outcome", [Processing(), Transient("busy", 503), Transient("legacy API timed out")])
@pytest.mark.parametrize("age", [10.0, 12.0, 299.999])
def test_still_processing_before_the_deadline_polls_again_after_the_interval(outcome: PollOutcome,
                                                                             age: float) -> None:
    assert POLL.decide(outcome, age_s=age) == PollAfter(2.0)


def test_poll_after_is_always_a_tier() -> None:
    policy = PollPolicy(first_delay_s=0.25, interval_s=0.1, deadline_s=5.0)
    decision = policy.decide(Processing(), age_s=1.0)
    assert decision == PollAfter(0.1)
    assert decision.delay_s in policy.tiers()


@pytest.mark.parametrize("age", [300.0, 300.5, 10_000.0])
def test_processing_at_or_after_the_deadline_times_out(age: float) -> None:
    decision = POLL.decide(Processing(), age_s=age)
    assert decision == Fail(Stage.TIMEOUT, "no final status 300 s after submission (last poll: still processing)",
                            200)


def test_transient_after_the_deadline_times_out_with_the_last_observation() -> None:
    decision = POLL.decide(Transient("status endpoint busy: HTTP 503", 503), age_s=301.0)
    assert isinstance(decision, Fail)
    assert decision.stage is Stage.TIMEOUT
    assert "status endpoint busy: HTTP 503" in decision.reason
    assert decision.http_status == 503


def test_timeout_after_a_network_timeout_has_no_http_status() -> None:
    decision = POLL.decide(Transient("legacy API timed out"), age_s=301.0)
    assert decision == Fail(Stage.TIMEOUT, "no final status 300 s after submission (last poll: legacy API timed out)",
                            None)


def test_fractional_deadline_in_the_reason() -> None:
    decision = PollPolicy(0.25, 0.1, 2.5).decide(Processing(), age_s=3.0)
    assert isinstance(decision, Fail)
    assert decision.reason.startswith("no final status 2.5 s after submission")


# ---- classify_submit --------------------------------------------------------------------------


def test_submit_201_with_a_good_id() -> None:
    assert classify_submit(201, b'{"request_id": "AB583C-X"}') == Accepted("AB583C-X")


@pytest.mark.parametrize(
    "body",
    [
        b"{}",
        b'{"request_id": null}',
        b'{"request_id": ""}',
        b'{"request_id": 12345}',
        b'{"request_id": ["AB583C-X"]}',
        b'{"request_id": {"$gt": ""}}',
        b'{"request_id": "AB/583C"}',
        b'{"request_id": "../admin"}',
        b'{"request_id": ".."}',
        b'{"request_id": "."}',
        b'{"request_id": "AB 583C"}',
        b'{"request_id": " AB583C"}',
        b'{"request_id": "AB583C\\n"}',
        b'{"request_id": "AB?x=1"}',
        b'{"request_id": "AB%2F.."}',
    ],
)
def test_submit_201_without_a_usable_request_id_is_rejected(body: bytes) -> None:
    outcome = classify_submit(201, body)
    assert isinstance(outcome, Rejected)
    assert outcome.http_status == 201
    assert "request_id" in outcome.reason


@pytest.mark.parametrize("body", [b"", b"<html>created</html>", b'["AB583C-X"]', b'"AB583C-X"'])
def test_submit_201_without_a_json_object_is_rejected(body: bytes) -> None:
    outcome = classify_submit(201, body)
    assert isinstance(outcome, Rejected)
    assert outcome.http_status == 201
    assert "without a JSON object body" in outcome.reason


def test_submit_400_with_a_json_error() -> None:
    outcome = classify_submit(400, b'{"error": "cpf: must have 11 digits"}')
    assert outcome == Rejected("rejected by the legacy API: cpf: must have 11 digits", 400)


def test_submit_400_with_an_html_page() -> None:
    body = b"<html>\n  <body>Bad   Request</body>\n</html>"
    outcome = classify_submit(400, body)
    assert outcome == Rejected("rejected by the legacy API: <html> <body>Bad Request</body> </html>", 400)


def test_submit_400_with_a_huge_body_has_a_short_reason() -> None:
    outcome = classify_submit(400, b"x" * 100_000)
    assert isinstance(outcome, Rejected)
    assert len(outcome.reason) < 400


def test_submit_400_without_a_body() -> None:
    assert classify_submit(400, b"") == Rejected("rejected by the legacy API: no body", 400)


@pytest.mark.parametrize("status", [401, 403, 404, 405, 409, 413, 415, 422])
def test_submit_other_4xx_is_permanent(status: int) -> None:
    outcome = classify_submit(status, b'{"error": "nope"}')
    assert outcome == Rejected("rejected by the legacy API: nope", status)


@pytest.mark.parametrize("status", [429, 500, 502, 503, 504])
def test_submit_busy_without_retry_after(status: int) -> None:
    assert classify_submit(status, b"") == Transient(f"legacy API busy: HTTP {status}", status, None)


@pytest.mark.parametrize(
    ("header", "seconds"),
    [("7", 7.0), (" 7 ", 7.0), ("0", 0.0), ("1.5", 1.5), ("0.25", 0.25),
     ("Wed, 21 Oct 2015 07:28:00 GMT", None), ("-3", None), ("nan", None), ("inf", None), ("", None),
     ("soon", None)],
)
@pytest.mark.parametrize("status", [429, 503])
def test_submit_busy_with_retry_after(status: int, header: str, seconds: float | None) -> None:
    outcome = classify_submit(status, b"busy", header)
    assert outcome == Transient(f"legacy API busy: HTTP {status}", status, seconds)


@pytest.mark.parametrize("status", [100, 301, 302, 304])
def test_submit_unexpected_status_is_transient(status: int) -> None:
    outcome = classify_submit(status, b"")
    assert isinstance(outcome, Transient)
    assert outcome.http_status == status


def test_parse_retry_after_none() -> None:
    assert parse_retry_after(None) is None
    assert parse_retry_after("120") == 120.0


# ---- classify_poll ----------------------------------------------------------------------------


def test_poll_processing_and_completed() -> None:
    assert classify_poll(200, b'{"request_id": "A", "status": "processing"}') == Processing()
    assert classify_poll(200, b'{"request_id": "A", "status": "completed"}') == Completed()


def test_poll_failed_with_a_reason() -> None:
    body = b'{"request_id": "A", "status": "failed", "reason": "CPF   blocked\\nby the registry"}'
    assert classify_poll(200, body) == LegacyFailed("CPF blocked by the registry")


@pytest.mark.parametrize(
    "body",
    [b'{"request_id": "A", "status": "failed"}', b'{"request_id": "A", "status": "failed", "reason": ""}',
     b'{"request_id": "A", "status": "failed", "reason": 42}',
     b'{"request_id": "A", "status": "failed", "reason": null}'],
)
def test_poll_failed_without_a_reason(body: bytes) -> None:
    assert classify_poll(200, body) == LegacyFailed("the legacy system reported failure without a reason")


@pytest.mark.parametrize(
    "body",
    [b'{"request_id": "A", "status": "done"}', b'{"request_id": "A", "status": "COMPLETED"}',
     b'{"request_id": "A"}', b'{"request_id": "A", "status": ["completed"]}',
     b'{"request_id": "A", "status": {"$eq": "completed"}}'],
)
def test_poll_unknown_status_value_is_transient(body: bytes) -> None:
    outcome = classify_poll(200, body)
    assert isinstance(outcome, Transient)
    assert outcome.http_status == 200
    assert outcome.reason.startswith("unknown status value")


@pytest.mark.parametrize("body", [b"<html>ok</html>", b"", b"[1]", b"completed"])
def test_poll_200_unreadable_is_transient(body: bytes) -> None:
    outcome = classify_poll(200, body)
    assert isinstance(outcome, Transient)
    assert outcome.http_status == 200
    assert outcome.reason.startswith("unreadable status answer")


def test_poll_404_is_not_found() -> None:
    outcome = classify_poll(404, b'{"error": "unknown request id"}')
    assert outcome == NotFound("the status endpoint does not know this request id: unknown request id", 404)


@pytest.mark.parametrize("status", [400, 401, 403, 410])
def test_poll_other_4xx_is_final_at_the_poll_stage(status: int) -> None:
    outcome = classify_poll(status, b"")
    assert isinstance(outcome, NotFound)
    assert outcome.http_status == status
    assert POLL.decide(outcome, age_s=12.0) == Fail(Stage.POLL, outcome.reason, status)


@pytest.mark.parametrize(
    ("header", "seconds"), [(None, None), ("2", 2.0), ("0.5", 0.5), ("Fri, 31 Dec 1999 23:59:59 GMT", None)]
)
@pytest.mark.parametrize("status", [429, 500, 503])
def test_poll_busy_is_transient(status: int, header: str | None, seconds: float | None) -> None:
    assert classify_poll(status, b"", header) == Transient(f"status endpoint busy: HTTP {status}", status, seconds)


# ---- reasons from outside text: no control characters ------------------------------------------

# Every class of character that steers a terminal or the direction of text.
CONTROLS = ([chr(c) for c in range(0x20)] + ["\x7f"] + [chr(c) for c in range(0x80, 0xA0)]
            + ["\u061c", "\u200e", "\u200f"] + [chr(c) for c in range(0x202A, 0x202F)]
            + [chr(c) for c in range(0x2066, 0x206A)])
HOSTILE = "\x1b[2J\x1b]52;c;cHduZWQ=\x07 name\x9b31m \u202etxt.exe\u202c \u2066x\u2069 \x00\r\nnext"


def test_clean_text_strips_every_escape_class_and_keeps_the_words() -> None:
    assert clean_text(HOSTILE) == "[2J]52;c;cHduZWQ= name31m txt.exe x next"
    assert clean_text("line one\nline two\r\n\tindented\u2028sep") == "line one line two indented sep"
    words = "Maria da Silva: e-mail inválido (çãõ ü 日本 🙂)"
    assert clean_text(words) == words


@FAST
@given(st.text(alphabet=st.sampled_from(CONTROLS) | st.characters(), max_size=80))
def test_clean_text_leaves_no_control_character(text: str) -> None:
    cleaned = clean_text(text)
    assert not set(cleaned) & set(CONTROLS)
    assert clean_text(cleaned) == cleaned
    # Only control characters and whitespace go: every other character stays, in order.
    kept = [c for c in text if c not in CONTROLS and not c.isspace()]
    assert [c for c in cleaned if c != " "] == kept


@pytest.mark.parametrize(("outcome", "status"), [
    (classify_poll(200, json.dumps({"status": "failed", "reason": HOSTILE}).encode()), 200),
    (classify_poll(404, json.dumps({"error": HOSTILE}).encode()), 404),
    (classify_poll(200, HOSTILE.encode()), 200),
    (classify_submit(400, json.dumps({"error": HOSTILE}).encode()), 400),
    (classify_submit(400, HOSTILE.encode()), 400),
    (classify_submit(201, HOSTILE.encode()), 201),
    (classify_submit(201, json.dumps({"request_id": HOSTILE}).encode()), 201),
])
def test_a_classified_reason_has_no_control_character(outcome: Outcome, status: int) -> None:
    assert not isinstance(outcome, Accepted | Processing | Completed)
    assert not set(outcome.reason) & set(CONTROLS), outcome.reason
    assert "txt.exe" in outcome.reason or "\\u202e" in outcome.reason


def test_a_failure_a_policy_decides_has_no_control_character() -> None:
    """Whatever text an outcome carries (legacy_http builds some itself), the Fail is clean."""
    transient = Transient(HOSTILE, 503)
    decisions = [
        SubmitPolicy(1, 1.0, 1.0).decide(transient, attempt=1, jitter=0.0),
        SubmitPolicy(3, 1.0, 1.0).decide(Rejected(HOSTILE, 400), attempt=1, jitter=0.0),
        PollPolicy(1.0, 1.0, 5.0).decide(transient, age_s=10.0),
        PollPolicy(1.0, 1.0, 5.0).decide(LegacyFailed(HOSTILE), age_s=1.0),
        PollPolicy(1.0, 1.0, 5.0).decide(NotFound(HOSTILE), age_s=1.0),
    ]
    for decision in decisions:
        assert isinstance(decision, Fail)
        assert not set(decision.reason) & set(CONTROLS), decision.reason
        assert "txt.exe" in decision.reason


# ---- request ids ------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["AB583C-X", "a", "0", "_x", "req:1.2_3-4", "A" * 128])
def test_valid_request_ids(value: str) -> None:
    assert valid_request_id(value)


@pytest.mark.parametrize(
    "value",
    ["", ".", "..", "../x", "a/b", "/abs", "a b", " a", "a\n", "a\t", "A" * 129, "ä", "a%2F", "a?b", "a#b", "a\\b",
     None, 5, ["a"], {"a": 1}],
)
def test_invalid_request_ids(value: object) -> None:
    assert not valid_request_id(value)


@FAST
@given(st.text(max_size=140))
def test_a_valid_request_id_can_never_change_the_lookup_path(value: str) -> None:
    if valid_request_id(value):
        assert "/" not in value and "\\" not in value
        assert value not in (".", "..")
        assert not any(ch.isspace() for ch in value)
        assert value.isascii()
        assert 1 <= len(value) <= 128


# ---- may_record -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("current_status", "current_request_id", "request_id", "allowed"),
    [
        (None, None, "R1", True),  # a new user
        (None, None, None, True),
        ("submitted", "R1", "R1", True),  # submitted moves on
        ("submitted", "R1", "R2", True),
        ("submitted", "R1", None, True),
        ("registered", "R1", "R1", False),  # registered is never replaced
        ("registered", "R1", "R2", False),
        ("registered", "R1", None, False),
        ("registered", None, None, False),
        ("failed", "R1", "R1", False),  # the same attempt's failure is final
        ("failed", "R1", "R2", True),  # another attempt may move it on
        ("failed", None, "R2", True),
        ("failed", "R1", None, True),
        ("failed", None, None, True),
    ],
)
def test_may_record(current_status: str | None, current_request_id: str | None, request_id: str | None,
                    allowed: bool) -> None:
    assert may_record(current_status, current_request_id, request_id) is allowed
