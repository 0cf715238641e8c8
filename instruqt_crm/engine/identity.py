"""Who is the learner? ``user_id`` → email: Instruqt's answer first, then event parameters.

An email Instruqt gives (the one the learner gave the team, else their profile's) outranks
one in the event's custom parameters: invite-link parameters are typed by the learner, so a
parameter email is used only while Instruqt has none, and never replaces Instruqt's. Answers
are cached in Redis (``Learner``: the email, where it came from, the name Instruqt gave).

Events whose learner has no known email yet are *parked* (kept per user, retried on a
backoff) and released the moment any event or lookup reveals the email.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Any, Literal, Protocol

import redis
from redis.client import Pipeline

from instruqt_crm import keys, redis_scripts
from instruqt_crm.errors import Category, PermanentError, RetryableError
from instruqt_crm.events import Event, valid_email
from instruqt_crm.instruqt_api import Profile
from instruqt_crm.journal import counters, trail
from instruqt_crm.keys import text
from instruqt_crm.mapping import Identity

log = logging.getLogger(__name__)
CACHE_TTL = 90 * 24 * 3600  # an email Instruqt gave (or any, when no lookup is configured)
PARAMS_TTL = 24 * 3600  # a parameter email while Instruqt has none: Instruqt is asked again
UNCHECKED_TTL = 15 * 60  # a parameter email Instruqt could not be asked about yet
NEGATIVE_TTL = 15 * 60  # no email anywhere
LOOKUP_SECONDS = 20.0  # Instruqt lookups one batch may spend (see IdentityResolver)
BACKOFF = (60, 300, 900, 3600, 3 * 3600, 6 * 3600, 12 * 3600, 24 * 3600)
_NO_EMAIL = "-"


class LearnerLookup(Protocol):
    """Something that can find what Instruqt knows of a user (the Instruqt API client)."""

    def lookup_profile(self, user_id: str) -> Profile | None:
        """The user's email and name (None when Instruqt does not know the user)."""
        ...


@dataclass(frozen=True)
class Learner:
    """What is known of a learner: the email, where it came from, the name Instruqt gave."""

    email: str
    source: Literal["instruqt", "params"]
    first_name: str | None = None
    last_name: str | None = None
    checked: bool = True  # a parameter email: Instruqt was asked, and had none

    def encode(self) -> str:
        """As cached in Redis, short (it is kept per learner): ``[email, "i" | "p"]``, then
        ``checked`` as 0/1 and the names when there are any."""
        fields: list[Any] = [self.email, self.source[0]]
        extra = [int(self.checked), self.first_name, self.last_name]
        while extra and extra[-1] in (None, 1) and (len(extra) > 1 or extra[0] == 1):
            extra.pop()
        return json.dumps(fields + extra, separators=(",", ":"), ensure_ascii=False)

    @classmethod
    def decode(cls, value: str) -> Learner:
        """From the cache: the short form, the JSON object earlier versions cached, or a bare
        email (older still: an unchecked parameter email)."""
        if value.startswith("["):
            email, source, *extra = json.loads(value)
            checked, first, last = extra + [1, None, None][len(extra) :]
            full: Literal["instruqt", "params"] = "instruqt" if source == "i" else "params"
            return cls(email, full, first, last, bool(checked))
        if not value.startswith("{"):
            return cls(value, "params", checked=False)
        fields = json.loads(value)
        return cls(
            fields["email"],
            fields["source"],
            fields.get("first_name"),
            fields.get("last_name"),
            fields.get("checked", True),
        )


def invalid_email_in(params: dict[str, Any], keys: list[str]) -> str | None:
    """The first named custom parameter that looks meant as an email but is not a valid one
    (so a failure can say why the learner was not identified by it)."""
    for name in keys:
        value = params.get(name)
        if isinstance(value, str) and "@" in value and valid_email(value) is None:
            return value
    return None


def email_in(params: dict[str, Any], keys: list[str]) -> str | None:
    """The first valid email among the named custom parameters (checked and normalised; an
    invalid one counts as none)."""
    for name in keys:
        if (email := valid_email(params.get(name))) is not None:
            return email
    return None


# Cache a parameter email (or "no email") unless Instruqt's email is cached meanwhile: another
# worker's batch may have looked the learner up after this one read the cache.
_SET_UNLESS_INSTRUQTS = """
local current = redis.call('GET', KEYS[1])
if current and (string.find(current, '","i"', 1, true)
  or string.find(current, '"source":"instruqt"', 1, true)) then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
return 1
"""


def learner_of(profile: Profile) -> Learner | None:
    """The learner Instruqt's answer makes known (None when it holds no email)."""
    if profile.email is None:
        return None
    return Learner(profile.email, "instruqt", profile.first_name, profile.last_name)


def remember(
    writes: redis.Redis | Pipeline, user_id: str, learner: Learner | None, ttl: int
) -> None:
    """Cache what is known of a user for ``ttl`` s (None: that no email is known); only an
    email Instruqt gave replaces one Instruqt gave."""
    if learner is not None and learner.source == "instruqt":
        writes.set(keys.identity(user_id), learner.encode(), ex=ttl)
        return
    value = learner.encode() if learner is not None else _NO_EMAIL
    redis_scripts.run(writes, _SET_UNLESS_INSTRUQTS, [keys.identity(user_id)], [value, ttl])


def cached_learner(conn: redis.Redis, user_id: str) -> Learner | Literal["none"] | None:
    """The cached learner; ``"none"`` when the cache says no email is known; None if nothing."""
    return _decoded(conn.get(keys.identity(user_id)))


def _decoded(value: Any) -> Learner | Literal["none"] | None:
    """A cache value as a learner (``"none"``: no email is known; None: nothing cached)."""
    if value is None:
        return None
    if text(value) == _NO_EMAIL:
        return "none"
    try:
        learner = Learner.decode(text(value))
        email = valid_email(learner.email)
    except (ValueError, KeyError, TypeError, AttributeError):  # not written by this service
        return None
    # cached by a version that took any text with an @: invalid now, so look it up again
    return None if email is None else replace(learner, email=email)


def cached_email(conn: redis.Redis, user_id: str) -> str | None:
    """The user's cached email, if one is known."""
    found = cached_learner(conn, user_id)
    return found.email if isinstance(found, Learner) else None


def email_of(conn: redis.Redis, who: str) -> str | None:
    """The email for an email or an Instruqt user id (None when no email is known for it)."""
    who = who.strip()
    return who.lower() if "@" in who else cached_email(conn, who)


@dataclass(frozen=True)
class Resolution:
    """The email found (or None), where it came from, and the learner it belongs to."""

    email: str | None
    source: str  # params | cache | lookup | negative-cache | none | lookup-failed | lookup-deferred
    learner: Learner | None = None


class IdentityResolver:
    """Resolve learners' emails in trust order (Instruqt, then parameters), counting each."""

    def __init__(
        self,
        conn: redis.Redis,
        identity: Identity,
        lookup: LearnerLookup | None,
        writes: redis.Redis | Pipeline | None = None,
        user_ids: Iterable[str] = (),
    ) -> None:
        self.conn = conn
        self.identity = identity
        self.lookup = lookup if identity.lookup else None
        self.writes = conn if writes is None else writes  # a pipeline defers cache writes
        self.known: dict[str, Learner] = {}  # learners this resolver learnt, not yet sent
        self._compared: set[str] = set()  # users whose parameter email was checked already
        self._failed: set[str] = set()  # users whose lookup failed for them alone
        self._cache = self._read(sorted(set(user_ids)))  # the batch's users: one round trip
        # A batch stops asking Instruqt once the API failed (transport, 5xx, 429, the key) or
        # LOOKUP_SECONDS went by: its other unknown learners wait, the batch stays short.
        self.lookups_until = time.monotonic() + LOOKUP_SECONDS

    def learn(self, user_id: str, learner: Learner, ttl: int = CACHE_TTL) -> None:
        """Cache what is known of a user (once per resolver)."""
        if self.known.get(user_id) != learner:
            remember(self.writes, user_id, learner, ttl)
            self.known[user_id] = learner

    def resolve(self, event: Event) -> Resolution:
        """Find the email for the event's learner."""
        offered = email_in(event.params, self.identity.email_params)
        if not event.user_id:
            return self._count(Resolution(offered, "params" if offered else "none"))
        return self.resolve_user(event.user_id, offered)

    def cached(self, user_id: str) -> Learner | None:
        """What this resolver or the cache knows of the user (no lookup, not counted)."""
        known = self.known.get(user_id) or self._cached(user_id)
        return known if isinstance(known, Learner) else None

    def resolve_user(self, user_id: str, offered: str | None = None) -> Resolution:
        """The cache (an Instruqt email outranks ``offered``, the event's parameter email),
        then Instruqt, then ``offered``."""
        known = self.known.get(user_id) or self._cached(user_id)
        if isinstance(known, Learner):
            settled = known.source == "instruqt" or known.checked or self.lookup is None
            if settled and (known.source == "instruqt" or offered in (None, known.email)):
                self._compare(user_id, offered, known)
                return self._count(Resolution(known.email, "cache", known))
            offered = offered or known.email  # not checked yet: Instruqt is asked first
        if known == "none":  # Instruqt had none lately
            return self._offered(user_id, offered, PARAMS_TTL, "negative-cache")
        if self.lookup is None:
            return self._offered(user_id, offered, CACHE_TTL, "none", checked=False)
        if time.monotonic() >= self.lookups_until or user_id in self._failed:
            return self._offered(user_id, offered, UNCHECKED_TTL, "lookup-deferred", False)
        try:
            profile = self.lookup.lookup_profile(user_id)
        except (RetryableError, PermanentError) as exc:
            log.warning("email lookup for user %s failed: %s", user_id, exc.reason)
            if isinstance(exc, PermanentError) and exc.category == Category.INSTRUQT_API:
                self._failed.add(user_id)  # this one user: not again in this batch
            else:
                self.lookups_until = 0.0  # the API or the key: ask no more in this batch
            return self._offered(user_id, offered, UNCHECKED_TTL, "lookup-failed", False)
        learner = learner_of(profile) if profile is not None else None
        if learner is None:
            return self._offered(user_id, offered, PARAMS_TTL, "lookup")
        self.learn(user_id, learner)
        self._compare(user_id, offered, learner)
        return self._count(Resolution(learner.email, "lookup", learner))

    def _read(self, user_ids: list[str]) -> dict[str, Learner | Literal["none"] | None]:
        """What the cache holds for these users, in one round trip."""
        values = self.conn.mget([keys.identity(u) for u in user_ids]) if user_ids else []
        return {u: _decoded(v) for u, v in zip(user_ids, values, strict=True)}

    def _cached(self, user_id: str) -> Learner | Literal["none"] | None:
        """The cache's answer for a user (read with the batch, else now)."""
        if user_id in self._cache:
            return self._cache[user_id]
        return cached_learner(self.conn, user_id)

    def _offered(
        self, user_id: str, offered: str | None, ttl: int, source: str, checked: bool = True
    ) -> Resolution:
        """No email from Instruqt: the parameter email if there is one (cached ``ttl`` s;
        ``checked``: Instruqt said it has none), else none (and that is cached briefly)."""
        if offered is None:
            if source == "lookup":
                remember(self.writes, user_id, None, NEGATIVE_TTL)
            return self._count(Resolution(None, source))
        learner = Learner(offered, "params", checked=checked)
        self.learn(user_id, learner, ttl)
        return self._count(Resolution(offered, "params", learner))

    def _compare(self, user_id: str, offered: str | None, learner: Learner) -> None:
        """Count (once per batch) and trail a parameter email that is not Instruqt's."""
        if not offered or learner.source != "instruqt" or offered == learner.email:
            return
        if user_id in self._compared:
            return
        self._compared.add(user_id)
        counters.count_identity(self.writes, "params-mismatch")
        reason = f"the event's parameter email {offered} is not Instruqt's: Instruqt's is used"
        trail.note(self.writes, learner.email, "identity", reason=reason)
        log.warning("user %s: parameter email differs from Instruqt's; Instruqt's is used", user_id)

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


def unpark(conn: redis.Redis | Pipeline, user_id: str, event_ids: list[str]) -> None:
    """Forget parked events once they were merged (or failed): read first, forget after. On a
    pipeline, queued after what it already holds (the events' trail entries)."""
    if event_ids:
        names = [keys.parked(user_id), keys.parked_meta(user_id), keys.PARKED_USERS]
        redis_scripts.run(conn, _UNPARK, names, [user_id, *event_ids])


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


@dataclass(frozen=True)
class Waiting:
    """A learner whose events wait for an email: how many, since when, the next lookup."""

    user_id: str
    events: int
    since: float | None
    next_lookup: float
    lookups: int  # lookups made so far (the backoff step)


def waiting(conn: redis.Redis, limit: int = 50) -> list[Waiting]:
    """Up to ``limit`` waiting learners, the next due for a lookup first (one round trip)."""
    due: Any = conn.zrange(keys.PARKED_USERS, 0, limit - 1, withscores=True)
    users = [(text(user_id), float(score)) for user_id, score in due]
    with conn.pipeline(transaction=False) as pipe:
        for user_id, _ in users:
            pipe.hlen(keys.parked(user_id))
            pipe.hmget(keys.parked_meta(user_id), ["since", "attempts"])
        replies = pipe.execute()
    found = []
    for (user_id, next_lookup), events, (since, lookups) in zip(
        users, replies[::2], replies[1::2], strict=True
    ):
        found.append(
            Waiting(
                user_id,
                int(events),
                float(since) if since is not None else None,
                next_lookup,
                int(lookups or 0),
            )
        )
    return found
