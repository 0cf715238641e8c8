"""Every Redis key the service uses, named in one place, and ``text()`` for Redis replies.

All keys start with ``instruqt_crm:``; RQ's own keys (``rq:...``) are RQ's. Emails and ids
from events go into keys through ``part`` (escaped, or hashed when long). Grouped by the
stage that writes them:

::

    receiver   inbox (stream), seen:<72-bit hash of svix-id> (dedupe mark), pending:<job>
               (one queued)
    identity   identity:<user id> (email cache), parked:<user id> (+ :meta), parked_users (zset)
    ledger     learner:<key> (packed state), schema:<id>, contact:<key>:events, dirty (zset);
               play:<participant id>, plays:dirty (zset); contact:<key> (older versions' state)
    flush      flush:lock, flush:last_success
    journal    stats (hash), metrics:<name> (hashes), failure_counts, trace:<email> (found by
               user id through identity:<user id>); failures are RQ jobs (``rq:failed:...``)
    mapping    workers:mapping (hash), merged_under (hash)
    CRM        budget:{<name>} (+ :pause, :daily), salesforce:token, dryrun:records
"""

from __future__ import annotations

import base64
import hashlib
from urllib.parse import quote

PREFIX = "instruqt_crm:"
SEEN_HASH_BYTES = 9  # 72 bits; the collision odds: README, "Redis memory and eviction"
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
BACKFILL_INBOX = f"{PREFIX}inbox:backfill"  # events a backfill made: taken when INBOX is empty


def backfill(run: str, what: str = "checkpoint") -> str:
    """A backfill run's checkpoint (a hash), or one of its sets (``learners``, ``emailed``)."""
    return f"{PREFIX}backfill:{run}:{what}"


def seen(message_id: str) -> str:
    """The mark remembering a delivery (svix-id): its SHA-256 cut to 72 bits, base64url (12
    characters, so the whole key stays under 32 bytes, Redis's smallest key header)."""
    digest = hashlib.sha256(message_id.encode("utf-8", "surrogatepass")).digest()
    return f"{PREFIX}seen:{base64.urlsafe_b64encode(digest[:SEEN_HASH_BYTES]).decode()}"


def legacy_seen(message_id: str) -> str:
    """The dedupe mark as earlier versions named it (the full SHA-256 in hex), still honoured:
    a delivery such a version accepted stays a repeat after the upgrade."""
    digest = hashlib.sha256(message_id.encode("utf-8", "surrogatepass")).hexdigest()
    return f"{PREFIX}seen:{digest}"


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
HELD_CONTACTS = f"{PREFIX}dirty:backfill"  # zset: changed by a backfill, sent when it ends
BACKFILL_RUNNING = f"{PREFIX}backfill:running"  # zset: backfill run -> reading until (epoch s)
DIRTY_PLAYS = f"{PREFIX}plays:dirty"  # zset: participant id -> when it first changed unsent


def learner(key: str) -> str:
    """One learner's packed state: merged cells, unsent names, email, user id, version."""
    return f"{PREFIX}learner:{part(key)}"


def state_schema(schema: bytes) -> str:
    """The property names a packed learner state refers to by position (JSON list)."""
    return f"{PREFIX}schema:{schema.hex()}"


def contact(key: str) -> str:
    """One contact's state as versions before the packed state kept it (hash; read once)."""
    return f"{PREFIX}contact:{part(key)}"


def contact_events(key: str) -> str:
    """The ids of the events recently merged into one learner (set, with a TTL)."""
    return f"{PREFIX}contact:{part(key)}:events"


def play(participant: str) -> str:
    """One play's merged cells, values last sent, learner and version (hash)."""
    return f"{PREFIX}play:{part(participant)}"


# --- flush ----------------------------------------------------------------------------------
FLUSH_LOCK = f"{PREFIX}flush:lock"
LAST_FLUSH = f"{PREFIX}flush:last_success"

# --- journal --------------------------------------------------------------------------------
STATS = f"{PREFIX}stats"  # hash: events:<outcome>[:<type>], identity:<source>
# Where versions before the RQ failed registry kept failures (moved into it when read).
LEGACY_FAILURES = f"{PREFIX}failures"  # zset: failure id -> when recorded
FAILURE_COUNTS = f"{PREFIX}failure_counts"  # hash: category -> failures ever recorded


def metric(name: str) -> str:
    """One metric's hash (counter fields by label values, or histogram buckets)."""
    return f"{PREFIX}metrics:{name}"


def legacy_failure(failure_id: str) -> str:
    """One failure as versions before the RQ failed registry kept it (hash)."""
    return f"{PREFIX}failure:{failure_id}"


def trail(email: str) -> str:
    """A learner's activity trail (list, newest first)."""
    return f"{PREFIX}trace:{part(email.lower())}"


# --- mapping --------------------------------------------------------------------------------
WORKER_MAPPINGS = f"{PREFIX}workers:mapping"  # hash: worker name -> the mapping it runs (JSON)
MERGED_UNDER = f"{PREFIX}merged_under"  # hash: property -> policy and type it was merged under

# --- CRM ------------------------------------------------------------------------------------
SALESFORCE_TOKEN = f"{PREFIX}salesforce:token"
DRY_RUN_RECORDS = f"{PREFIX}dryrun:records"


def budget(name: str) -> str:
    """A request budget's window (zset); the hash tag keeps its keys in one cluster slot."""
    return f"{PREFIX}budget:{{{name}}}"


def budget_pause(name: str) -> str:
    """A request budget's pause (hash: until, reason, policy)."""
    return f"{budget(name)}:pause"


def daily_usage(name: str) -> str:
    """A CRM account's daily request use (hash: used, limit, resets_at, warning, ...)."""
    return f"{budget(name)}:daily"
