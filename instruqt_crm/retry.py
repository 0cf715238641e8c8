"""The one retry policy: tenacity over ``RetryableError``, honouring wait hints.

Usage::

    result = retrying(attempts=4, label=f"instruqt user={user_id}")(call, arg)

    for attempt in retrying():
        with attempt:
            do_something()

Rules:

- only ``RetryableError`` (and so ``RateLimited``) is retried; anything else propagates at once;
- without a hint the wait is exponential with jitter (0.5 s, 1 s, 2 s, ... plus up to 1 s,
  capped at ``max_wait``);
- an error carrying ``wait`` is retried after exactly that many seconds, if the hint is at most
  ``max_hint``; a longer hint (a DAILY quota, a long pause) is re-raised immediately so that the
  caller can park the work instead of sleeping through it inside one call;
- after ``attempts`` attempts the last error is re-raised as is (``reraise=True``).
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable

import tenacity

from instruqt_crm.errors import RetryableError

log = logging.getLogger(__name__)

DEFAULT_ATTEMPTS = 5
DEFAULT_MAX_WAIT = 30.0
DEFAULT_MAX_HINT = 60.0
INITIAL_WAIT = 0.5
JITTER = 1.0


def hint_of(exc: BaseException | None) -> float | None:
    """The wait hint (seconds) an error carries, or None."""
    if not isinstance(exc, RetryableError) or exc.wait is None:
        return None
    return max(0.0, float(exc.wait))


class _RetryRetryable(tenacity.retry_base):
    """Retry a RetryableError unless its wait hint is longer than ``max_hint``."""

    def __init__(self, max_hint: float) -> None:
        self.max_hint = max_hint

    def __call__(self, retry_state: tenacity.RetryCallState) -> bool:
        outcome = retry_state.outcome
        if outcome is None or not outcome.failed:
            return False
        exc = outcome.exception()
        if not isinstance(exc, RetryableError):
            return False
        hint = hint_of(exc)
        return hint is None or hint <= self.max_hint


class _WaitHintOrBackoff(tenacity.wait.wait_base):
    """Wait exactly the error's hint if it has one, else exponential backoff with jitter."""

    def __init__(self, max_wait: float) -> None:
        self.max_wait = max_wait

    def __call__(self, retry_state: tenacity.RetryCallState) -> float:
        outcome = retry_state.outcome
        hint = hint_of(outcome.exception() if outcome is not None else None)
        if hint is not None:
            return hint
        exponent = min(retry_state.attempt_number - 1, 30)
        backoff = INITIAL_WAIT * 2**exponent + random.uniform(0, JITTER)
        return max(0.0, min(self.max_wait, backoff))


def _log_before_sleep(label: str | None) -> Callable[[tenacity.RetryCallState], None]:
    """A before_sleep hook that logs the failed attempt at WARNING."""

    def before_sleep(retry_state: tenacity.RetryCallState) -> None:
        outcome = retry_state.outcome
        exc = outcome.exception() if outcome is not None else None
        what = label or getattr(retry_state.fn, "__qualname__", None) or "call"
        wait = retry_state.next_action.sleep if retry_state.next_action else 0.0
        log.warning(
            "retrying %s after attempt %d failed (%s: %s); sleeping %.2fs",
            what,
            retry_state.attempt_number,
            type(exc).__name__,
            getattr(exc, "reason", exc),
            wait,
        )

    return before_sleep


def retrying(
    attempts: int = DEFAULT_ATTEMPTS,
    max_wait: float = DEFAULT_MAX_WAIT,
    sleep: Callable[[float], None] = time.sleep,
    max_hint: float = DEFAULT_MAX_HINT,
    label: str | None = None,
) -> tenacity.Retrying:
    """A fresh tenacity policy that retries RetryableError (see the module docstring)."""
    if attempts < 1:
        raise ValueError("attempts must be >= 1")
    return tenacity.Retrying(
        sleep=sleep,
        stop=tenacity.stop_after_attempt(attempts),
        wait=_WaitHintOrBackoff(max_wait),
        retry=_RetryRetryable(max_hint),
        before_sleep=_log_before_sleep(label),
        reraise=True,
    )
