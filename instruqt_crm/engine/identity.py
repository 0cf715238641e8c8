"""Who is the learner? ``user_id`` → email: event parameters, then a Redis cache, then Instruqt.

Events whose learner has no known email yet are *parked* (kept per user, retried on a
backoff) and released the moment any event or lookup reveals the email.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from typing import Any, Protocol

import redis
from redis.client import Pipeline

from instruqt_crm import keys
from instruqt_crm.errors import PermanentError, RetryableError
from instruqt_crm.events import Event
from instruqt_crm.journal import counters
from instruqt_crm.keys import text
from instruqt_crm.mapping import Identity

log = logging.getLogger(__name__)
CACHE_TTL = 90 * 24 * 3600
NEGATIVE_TTL = 15 * 60
LOOKUP_SECONDS = 20.0  # Instruqt lookups one batch may spend (see IdentityResolver)
BACKOFF = (60, 300, 900, 3600, 3 * 3600, 6 * 3600, 12 * 3600, 24 * 3600)
_NO_EMAIL = "-"


class EmailLookup(Protocol):
    """Something that can find a user's email (the Instruqt API client)."""

    def lookup_email(self, user_id: str) -> str | None:
        """The user's email, or None if Instruqt has none."""
        ...


def email_in(params: dict[str, Any], keys: list[str]) -> str | None:
    """The first plausible email among the named custom parameters, lower-cased."""
    for name in keys:
        value = params.get(name)
        if isinstance(value, str) and "@" in value.strip():
            return value.strip().lower()
    return None


def remember(conn: redis.Redis | Pipeline, user_id: str, email: str | None) -> None:
    """Cache an answer: an email for long, "no email" briefly."""
    if email:
        conn.set(keys.identity(user_id), email, ex=CACHE_TTL)
    else:
        conn.set(keys.identity(user_id), _NO_EMAIL, ex=NEGATIVE_TTL)


def cached_email(conn: redis.Redis, user_id: str) -> str | None:
    """The user's cached email, if one is known."""
    value = conn.get(keys.identity(user_id))
    return None if value is None or text(value) == _NO_EMAIL else text(value)


@dataclass(frozen=True)
class Resolution:
    """The email found (or None) and where it came from."""

    email: str | None
    source: str  # params | cache | lookup | negative-cache | none | lookup-failed | lookup-deferred


class IdentityResolver:
    """Resolve learners' emails in the configured order, counting hits and misses."""

    def __init__(
        self,
        conn: redis.Redis,
        identity: Identity,
        lookup: EmailLookup | None,
        writes: redis.Redis | Pipeline | None = None,
    ) -> None:
        self.conn = conn
        self.identity = identity
        self.lookup = lookup if identity.lookup else None
        self.writes = conn if writes is None else writes  # a pipeline defers cache writes
        self.known: dict[str, str] = {}  # emails learnt by this resolver, not yet sent
        # A batch stops asking Instruqt once a lookup failed or LOOKUP_SECONDS went by: its
        # other unknown learners wait (parked, retried later), the batch stays short.
        self.lookups_until = time.monotonic() + LOOKUP_SECONDS

    def learn(self, user_id: str, email: str) -> None:
        """Cache a user's email (once per resolver)."""
        if self.known.get(user_id) != email:
            remember(self.writes, user_id, email)
            self.known[user_id] = email

    def resolve(self, event: Event) -> Resolution:
        """Find the email for the event's learner."""
        email = email_in(event.params, self.identity.email_params)
        if email:
            if event.user_id:
                self.learn(event.user_id, email)
            return self._count(Resolution(email, "params"))
        if not event.user_id:
            return self._count(Resolution(None, "none"))
        return self.resolve_user(event.user_id)

    def cached(self, user_id: str) -> str | None:
        """The user's email if this resolver or the cache knows it (no lookup, not counted)."""
        return self.known.get(user_id) or cached_email(self.conn, user_id)

    def resolve_user(self, user_id: str) -> Resolution:
        """Cache first, then the Instruqt API."""
        if user_id in self.known:
            return self._count(Resolution(self.known[user_id], "cache"))
        cached = self.conn.get(keys.identity(user_id))
        if cached is not None:
            value = text(cached)
            found = (
                Resolution(None, "negative-cache")
                if value == _NO_EMAIL
                else Resolution(value, "cache")
            )
            return self._count(found)
        if self.lookup is None:
            return self._count(Resolution(None, "none"))
        if time.monotonic() >= self.lookups_until:
            return self._count(Resolution(None, "lookup-deferred"))
        try:
            email = self.lookup.lookup_email(user_id)
        except (RetryableError, PermanentError) as exc:
            log.warning("email lookup for user %s failed: %s", user_id, exc.reason)
            self.lookups_until = 0.0
            return self._count(Resolution(None, "lookup-failed"))
        if email:
            self.learn(user_id, email)
        else:
            remember(self.writes, user_id, None)
        return self._count(Resolution(email, "lookup"))

    def _count(self, found: Resolution) -> Resolution:
        counters.count_identity(self.writes, found.source)
        return found


def park(conn: redis.Redis, event: Event) -> None:
    """Keep an event until its learner's email is known (first retry after a minute)."""
    if not event.user_id:
        raise ValueError("only events with a user id can wait for an email")
    key = keys.parked(event.user_id)
    now = time.time()
    with conn.pipeline(transaction=True) as pipe:
        pipe.hset(key, event.id, json.dumps(event.body))
        pipe.hsetnx(keys.parked_meta(event.user_id), "since", str(now))
        pipe.zadd(keys.PARKED_USERS, {event.user_id: now + BACKOFF[0]}, nx=True)
        pipe.execute()
    log.info("event %s (%s) waits for the email of user %s", event.id, event.type, event.user_id)


# Forget some of a user's parked events; the user stops waiting once none is left (events
# parked meanwhile by another worker stay, with the user's place in the retry schedule).
_UNPARK = """
for i = 2, #ARGV do redis.call('HDEL', KEYS[1], ARGV[i]) end
if redis.call('HLEN', KEYS[1]) == 0 then
  redis.call('DEL', KEYS[2])
  redis.call('ZREM', KEYS[3], ARGV[1])
end
return 1
"""


def unpark(conn: redis.Redis, user_id: str, event_ids: list[str]) -> None:
    """Forget parked events once they were merged (or failed): read first, forget after."""
    if event_ids:
        script = conn.register_script(_UNPARK)
        names = [keys.parked(user_id), keys.parked_meta(user_id), keys.PARKED_USERS]
        script(keys=names, args=[user_id, *event_ids])


def parked_events(conn: redis.Redis, user_id: str) -> list[tuple[str, dict[str, Any]]]:
    """One learner's waiting events (id, body), sorted by id, without releasing them."""
    stored = conn.hgetall(keys.parked(user_id))
    return sorted((text(event_id), json.loads(body)) for event_id, body in stored.items())


def parked_event_count(conn: redis.Redis, user_ids: list[str]) -> int:
    """How many events wait for these learners' emails."""
    with conn.pipeline(transaction=False) as pipe:
        for user_id in user_ids:
            pipe.hlen(keys.parked(user_id))
        return sum(int(n) for n in pipe.execute())


def due(conn: redis.Redis, now: float | None = None, limit: int = 100) -> list[str]:
    """Users whose parked events are due for another lookup."""
    moment = time.time() if now is None else now
    found = conn.zrangebyscore(keys.PARKED_USERS, "-inf", moment, start=0, num=limit)
    return [text(user_id) for user_id in found]


def next_due(conn: redis.Redis) -> float | None:
    """When the next parked user is due, if any are parked."""
    first = conn.zrange(keys.PARKED_USERS, 0, 0, withscores=True)
    return float(first[0][1]) if first else None


def parked_since(conn: redis.Redis, user_id: str) -> float | None:
    """When the user's first event was parked."""
    since = conn.hget(keys.parked_meta(user_id), "since")
    return float(since) if since is not None else None


def postpone(conn: redis.Redis, user_id: str, now: float | None = None) -> float:
    """Schedule the user's next lookup on the backoff; returns when."""
    moment = time.time() if now is None else now
    attempt = int(conn.hincrby(keys.parked_meta(user_id), "attempts", 1))
    when = moment + BACKOFF[min(attempt, len(BACKOFF) - 1)]
    conn.zadd(keys.PARKED_USERS, {user_id: when})
    return when


def waiting_among(conn: redis.Redis, user_ids: set[str]) -> set[str]:
    """Which of these users have events waiting for an email (one round trip)."""
    ordered = sorted(user_ids)
    if not ordered:
        return set()
    with conn.pipeline(transaction=False) as pipe:
        for user_id in ordered:
            pipe.zscore(keys.PARKED_USERS, user_id)
        scores = pipe.execute()
    return {user_id for user_id, score in zip(ordered, scores, strict=True) if score is not None}


def parked_count(conn: redis.Redis) -> int:
    """How many learners have events waiting for an email."""
    return int(conn.zcard(keys.PARKED_USERS))
