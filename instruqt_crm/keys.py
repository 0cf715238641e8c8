"""Every Redis key the service uses, named in one place, and ``text()`` for Redis replies.

All keys start with ``instruqt_crm:``; RQ's own keys (``rq:...``) are RQ's. Emails and ids
from events go into keys through ``part`` (escaped, or hashed when long). Grouped by the
stage that writes them:

::

    receiver   inbox (stream), seen:<sha256 of svix-id> (dedupe mark), pending:<job> (one queued)
    identity   identity:<user id> (email cache), parked:<user id> (+ :meta), parked_users (zset)
    ledger     contact:<key> (+ :events), dirty (zset); play:<participant id>, plays:dirty (zset)
    flush      flush:lock, flush:last_success
    journal    stats (hash), metrics:<name> (hashes), failures (zset), failure:<id>,
               failure_counts, trace:<email>, trace_user:<user id>
    CRM        budget:{<name>} (+ :pause), salesforce:token, dryrun:records
"""

from __future__ import annotations

import hashlib
from urllib.parse import quote

PREFIX = "instruqt_crm:"
MAX_PART = 200  # a longer email or id is hashed into the key
# Kept as they are: letters, digits and what an email's local part may hold, but ``%`` (the
# escape), ``*`` and ``?`` (SCAN patterns); ``:`` (our separator) and the rest are escaped.
KEY_SAFE = "@.+-_~!#$&'=^`{|}/"


def part(value: str) -> str:
    """An email or id as a key part: anything not in KEY_SAFE escaped (so ``u1:meta`` cannot
    name ``u1``'s meta key), hashed when longer than MAX_PART."""
    escaped = quote(value, safe=KEY_SAFE, errors="surrogatepass")
    if len(escaped) <= MAX_PART:
        return escaped
    return "sha256-" + hashlib.sha256(value.encode("utf-8", "surrogatepass")).hexdigest()


def text(value: object) -> str:
    """A Redis reply (bytes or str) as text."""
    return value.decode() if isinstance(value, bytes) else str(value)


# --- receiver and inbox ---------------------------------------------------------------------
INBOX = f"{PREFIX}inbox"  # stream of accepted events, taken by worker jobs


def seen(message_id: str) -> str:
    """The mark remembering that a delivery (svix-id) was accepted."""
    return f"{PREFIX}seen:{hashlib.sha256(message_id.encode()).hexdigest()}"


def pending_job(func: str) -> str:
    """The mark saying one job of ``func`` is queued or scheduled."""
    return f"{PREFIX}pending:{func}"


# --- identity ------------------------------------------------------------------------------
PARKED_USERS = f"{PREFIX}parked_users"  # zset: user id -> when its next lookup is due


def identity(user_id: str) -> str:
    """A learner's cached email (or the "no email" mark)."""
    return f"{PREFIX}identity:{part(user_id)}"


def parked(user_id: str) -> str:
    """A learner's events waiting for an email (hash: event id -> body)."""
    return f"{PREFIX}parked:{part(user_id)}"


def parked_meta(user_id: str) -> str:
    """When a learner started waiting and how many lookups failed (hash)."""
    return f"{parked(user_id)}:meta"


# --- ledger ---------------------------------------------------------------------------------
DIRTY_CONTACTS = f"{PREFIX}dirty"  # zset: contact key -> when it first changed unsent
DIRTY_PLAYS = f"{PREFIX}plays:dirty"  # zset: participant id -> when it first changed unsent


def contact(key: str) -> str:
    """One contact's merged cells, values last sent, email, user id and version (hash)."""
    return f"{PREFIX}contact:{part(key)}"


def contact_events(key: str) -> str:
    """The ids of the events merged into one contact (set)."""
    return f"{PREFIX}contact:{part(key)}:events"


def play(participant: str) -> str:
    """One play's merged cells, values last sent, learner and version (hash)."""
    return f"{PREFIX}play:{part(participant)}"


# --- flush ----------------------------------------------------------------------------------
FLUSH_LOCK = f"{PREFIX}flush:lock"
LAST_FLUSH = f"{PREFIX}flush:last_success"

# --- journal --------------------------------------------------------------------------------
STATS = f"{PREFIX}stats"  # hash: events:<outcome>[:<type>], identity:<source>
FAILURES = f"{PREFIX}failures"  # zset: failure id -> when recorded
FAILURE_COUNTS = f"{PREFIX}failure_counts"  # hash: category -> failures ever recorded


def metric(name: str) -> str:
    """One metric's hash (counter fields by label values, or histogram buckets)."""
    return f"{PREFIX}metrics:{name}"


def failure(failure_id: str) -> str:
    """One recorded failure (hash)."""
    return f"{PREFIX}failure:{failure_id}"


def trail(email: str) -> str:
    """A learner's activity trail (list, newest first)."""
    return f"{PREFIX}trace:{part(email.lower())}"


def trail_user(user_id: str) -> str:
    """The email a learner's trail is kept under, by Instruqt user id."""
    return f"{PREFIX}trace_user:{part(user_id)}"


# --- CRM ------------------------------------------------------------------------------------
SALESFORCE_TOKEN = f"{PREFIX}salesforce:token"
DRY_RUN_RECORDS = f"{PREFIX}dryrun:records"


def budget(name: str) -> str:
    """A request budget's window (zset); the hash tag keeps its keys in one cluster slot."""
    return f"{PREFIX}budget:{{{name}}}"


def budget_pause(name: str) -> str:
    """A request budget's pause (hash: until, reason, policy)."""
    return f"{budget(name)}:pause"
