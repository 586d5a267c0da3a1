"""`RECONCILE_GRACE_S`: the grace `failed reconcile` gives an entry whose record it did not find."""

from __future__ import annotations

from datetime import timedelta

import pytest
from registrations_cli.errors import USAGE, CliError
from registrations_cli.reconcile import GRACE_ENV, grace_of

from regbridge.failure_index import RECONCILE_GRACE


def test_unset_or_empty_is_the_default() -> None:
    assert grace_of({}) == grace_of({GRACE_ENV: " "}) == RECONCILE_GRACE


@pytest.mark.parametrize(("text", "seconds"), [("0", 0), ("30", 30), ("1.5", 1.5)])
def test_seconds(text: str, seconds: float) -> None:
    assert grace_of({GRACE_ENV: text}) == timedelta(seconds=seconds)


@pytest.mark.parametrize("text", ["-1", "2m", "nan", "inf"])
def test_anything_else_is_a_usage_error(text: str) -> None:
    with pytest.raises(CliError) as raised:
        grace_of({GRACE_ENV: text})
    assert raised.value.code == USAGE and GRACE_ENV in str(raised.value)
