"""The retry policy: what is retried, how long it waits, what is re-raised."""

from __future__ import annotations

import logging

import pytest

from instruqt_crm.errors import PermanentError, RateLimited, RetryableError
from instruqt_crm.retry import retrying


class Flaky:
    """A callable that raises the given errors in turn, then returns "ok"."""

    def __init__(self, *errors: Exception) -> None:
        self.errors = list(errors)
        self.calls = 0

    def __call__(self) -> str:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return "ok"


@pytest.fixture
def sleeps() -> list[float]:
    return []


def test_retryable_then_success(sleeps):
    fn = Flaky(RetryableError("boom"), RetryableError("boom again"))
    assert retrying(sleep=sleeps.append)(fn) == "ok"
    assert fn.calls == 3
    assert len(sleeps) == 2


def test_backoff_grows_and_is_capped(sleeps):
    fn = Flaky(*[RetryableError("x") for _ in range(6)])
    assert retrying(attempts=7, max_wait=3.0, sleep=sleeps.append)(fn) == "ok"
    assert len(sleeps) == 6
    assert 0.5 <= sleeps[0] <= 1.5  # initial 0.5 s plus up to 1 s jitter
    assert all(0 <= s <= 3.0 for s in sleeps)
    assert sleeps[-1] == 3.0  # 0.5 * 2**5 = 16 s, capped


def test_permanent_error_is_never_retried(sleeps):
    fn = Flaky(PermanentError("bad property", category="validation"))
    with pytest.raises(PermanentError, match="bad property"):
        retrying(sleep=sleeps.append)(fn)
    assert fn.calls == 1
    assert sleeps == []


def test_other_exceptions_are_not_retried(sleeps):
    fn = Flaky(KeyError("bug"))
    with pytest.raises(KeyError):
        retrying(sleep=sleeps.append)(fn)
    assert fn.calls == 1


def test_wait_hint_is_honoured_exactly(sleeps):
    fn = Flaky(RateLimited("429", wait=7.5, policy="SECONDLY"), RetryableError("423", 2))
    assert retrying(sleep=sleeps.append)(fn) == "ok"
    assert sleeps == [7.5, 2.0]


def test_hint_above_max_wait_but_below_max_hint_is_honoured(sleeps):
    fn = Flaky(RateLimited("429", wait=45.0))
    assert retrying(max_wait=5.0, max_hint=60.0, sleep=sleeps.append)(fn) == "ok"
    assert sleeps == [45.0]


def test_exhausting_attempts_reraises_the_original_error(sleeps):
    errors = [RetryableError(f"try {i}") for i in range(3)]
    fn = Flaky(*errors)
    with pytest.raises(RetryableError) as info:
        retrying(attempts=3, sleep=sleeps.append)(fn)
    assert info.value is errors[-1]
    assert fn.calls == 3
    assert len(sleeps) == 2


def test_long_hint_is_reraised_at_once(sleeps):
    daily = RateLimited("daily quota", wait=6 * 3600, policy="DAILY")
    fn = Flaky(daily)
    with pytest.raises(RateLimited) as info:
        retrying(sleep=sleeps.append)(fn)
    assert info.value is daily
    assert fn.calls == 1
    assert sleeps == []


def test_long_hint_after_short_retries(sleeps):
    fn = Flaky(RetryableError("503"), RateLimited("daily", wait=3600.0, policy="DAILY"))
    with pytest.raises(RateLimited, match="daily"):
        retrying(sleep=sleeps.append)(fn)
    assert fn.calls == 2
    assert len(sleeps) == 1


def test_iterator_form(sleeps):
    fn = Flaky(RetryableError("once"))
    for attempt in retrying(sleep=sleeps.append):
        with attempt:
            result = fn()
    assert result == "ok"
    assert fn.calls == 2


def test_each_retry_is_logged_at_warning(sleeps, caplog):
    fn = Flaky(RetryableError("flaky upstream"), RetryableError("flaky upstream"))
    with caplog.at_level(logging.WARNING, logger="instruqt_crm.retry"):
        retrying(sleep=sleeps.append, label="hubspot upsert batch=b1")(fn)
    records = [r for r in caplog.records if r.name == "instruqt_crm.retry"]
    assert len(records) == 2
    assert all(r.levelno == logging.WARNING for r in records)
    assert "hubspot upsert batch=b1" in records[0].getMessage()
    assert "flaky upstream" in records[0].getMessage()
    assert records[0].args  # %-style, formatted lazily


def test_attempts_must_be_positive():
    with pytest.raises(ValueError):
        retrying(attempts=0)
