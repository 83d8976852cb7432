"""A Retry-After from the API server (or whatever sits in front of it) is bounded (RELIABILITY O3).

A handler's retry delay comes from it: `Retry-After: 0` or a negative value must not spin the
handler, `Retry-After: 86400` (or an HTTP date next year) must not park it for a day, and a value
that is not a number nor a date falls back to the handler's own default.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import pytest
from kubetune.operator.client import RETRY_AFTER_BOUNDS, ApiError, backoff_seconds, retry_after_seconds

NOW = datetime(2025, 3, 1, 12, 0, 0, tzinfo=UTC)
LOW, HIGH = RETRY_AFTER_BOUNDS


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, None),
        ("5", 5.0),
        (" 2.5 ", 2.5),
        ("0", LOW),
        ("-30", LOW),
        ("86400", HIGH),
        ("1e308", HIGH),
        ("inf", HIGH),
        ("-inf", LOW),
        ("nan", None),
        ("NaN", None),
        ("soon", None),
        ("", None),
        (format_datetime(NOW + timedelta(seconds=20), usegmt=True), 20.0),
        (format_datetime(NOW + timedelta(days=365), usegmt=True), HIGH),
        (format_datetime(NOW - timedelta(hours=1), usegmt=True), LOW),
        ("Sat, 01 Mar 2025 12:00:30", 30.0),  # no zone: read as UTC
        ("Mon, 99 Foo 2025 99:99:99 GMT", None),
    ],
)
def test_retry_after_is_parsed_and_clamped(value: str | None, expected: float | None) -> None:
    assert retry_after_seconds(value, NOW) == expected


@pytest.mark.parametrize(
    ("retry_after", "delay"),
    [
        (None, 1.0),  # no Retry-After: the handler's own backoff (first retry)
        (7.0, 7.0),
        (0.0, LOW),
        (1e9, HIGH),
        (float("nan"), 1.0),
        (float("-inf"), LOW),
    ],
)
def test_retry_delay_is_bounded(retry_after: float | None, delay: float) -> None:
    assert backoff_seconds(ApiError(429, "", retry_after), 0) == delay
