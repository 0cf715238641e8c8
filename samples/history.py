"""Generate realistic Instruqt event histories and, independently, the CRM records they imply."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from typing import Any

from instruqt_crm.events import format_timestamp

TRACKS = ["intro-k8s", "terraform-101", "vault-basics", "consul-mesh", "nomad-jobs"]


def _stamp(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%f") + "54Z"  # Instruqt-style 8 digits


def learner_history(number: int, rng: random.Random, email_in_params: bool = True) -> list[dict]:
    """One learner's plays, in the shape Instruqt sends them: starts, challenge attempts
    (without ``track_slug``, as Instruqt's documented example), some completions (with
    ``duration``), maybe a review (``review_id``); about one play in twelve is a developer
    play (``is_developer_play``), which the CRM must never see."""
    user_id = f"user{number:05d}"
    email = f"learner{number:05d}@example.com"
    params = {"email": email} if email_in_params else {}
    clock = datetime(2026, 11, 1, tzinfo=UTC) + timedelta(minutes=rng.randrange(0, 20000))
    events: list[dict[str, Any]] = []
    for track in rng.sample(TRACKS, rng.randint(1, 3)):
        participant = f"p{number:05d}{track[:4]}"
        developer = rng.random() < 1 / 12
        base = {
            "user_id": user_id,
            "track_slug": track,
            "track_id": f"id-{track}",
            "participant_id": participant,
            "organization_id": "instruqt",
            "invite_id": None,
            "is_developer_play": developer,
            "custom_parameters": params,
        }
        clock += timedelta(seconds=rng.randint(1, 600), microseconds=rng.randint(0, 999999))
        started = clock
        events.append({**base, "type": "track.started", "timestamp": _stamp(clock)})
        for index in range(rng.randint(0, 3)):
            clock += timedelta(seconds=rng.randint(30, 900))
            events.append(
                {
                    **{k: v for k, v in base.items() if k != "track_slug"},
                    "type": "track.challenge_attempted",
                    "timestamp": _stamp(clock),
                    "challenge_id": f"ch{index}",
                    "challenge_index": index,
                    "completed": rng.random() < 0.7,
                }
            )
        if rng.random() < 0.5:
            clock += timedelta(seconds=rng.randint(30, 900))
            duration = int((clock - started).total_seconds())
            completed = {**base, "type": "track.completed", "duration": duration}
            events.append({**completed, "timestamp": _stamp(clock)})
            if not developer and rng.random() < 0.5:
                clock += timedelta(seconds=rng.randint(5, 120))
                events.append(
                    {
                        "type": "review.created",
                        "user_id": user_id,
                        "review_id": f"r{number}{track}",
                        "track_id": f"id-{track}",
                        "track_slug": track,
                        "organization_id": "instruqt",
                        "score": rng.randint(1, 5),
                        "content": "",
                        "timestamp": _stamp(clock),
                    }
                )
    return events


def history(learners: int, seed: int = 7, email_in_params: bool = True) -> list[dict]:
    """Every learner's events, in time order per learner."""
    rng = random.Random(seed)
    return [e for n in range(learners) for e in learner_history(n, rng, email_in_params)]


def _moment(event: dict) -> str:
    from instruqt_crm.events import parse_timestamp

    return format_timestamp(parse_timestamp(event["timestamp"]))


def expected_records(events: list[dict]) -> dict[str, dict[str, Any]]:
    """The default data model (see the README), computed directly from the events, not by
    the engine."""
    by_user: dict[str, list[dict]] = {}
    for event in events:
        if not event.get("is_developer_play"):
            by_user.setdefault(event["user_id"], []).append(event)
    records = {}
    for user_id, mine in by_user.items():
        email = f"learner{int(user_id[4:]):05d}@example.com"
        times = sorted(_moment(e) for e in mine)
        tracks = [e for e in mine if e["type"].startswith("track.")]
        started = sorted({e["track_slug"] for e in mine if e["type"] == "track.started"})
        completed = sorted({e["track_slug"] for e in mine if e["type"] == "track.completed"})
        challenges = {
            (e["track_id"], e["challenge_id"])
            for e in mine
            if e["type"] == "track.challenge_attempted" and e["completed"]
        }
        record: dict[str, Any] = {
            "email": email,
            "instruqt_user_id": user_id,
            "instruqt_first_activity_at": times[0],
            "instruqt_last_activity_at": times[-1],
        }
        named = [e for e in tracks if e.get("track_slug") or not e.get("challenge_id")]
        if named:  # challenge events (no slug) do not name it; some learners only claimed
            latest = max(named, key=lambda e: _moment(e))
            record["instruqt_last_track"] = latest.get("track_slug") or latest["track_id"]
        if started:
            record["instruqt_tracks_started"] = ";".join(started)
        if completed:
            record["instruqt_tracks_completed"] = ";".join(completed)
            record["instruqt_tracks_completed_count"] = len(completed)
        if challenges:
            record["instruqt_challenges_completed_count"] = len(challenges)
        reviews = [e for e in mine if e["type"] == "review.created"]
        if reviews:
            last = max(reviews, key=lambda e: _moment(e))
            record["instruqt_last_review_score"] = last["score"]
            record["instruqt_last_review_track"] = last["track_slug"]
        records[email] = record
    return records


def deliveries(events: list[dict], seed: int = 11) -> list[tuple[str, dict]]:
    """(svix id, body) pairs: shuffled, a third of them delivered two or three times."""
    rng = random.Random(seed)
    out = []
    for number, event in enumerate(events):
        copies = rng.choice([2, 3]) if rng.random() < 1 / 3 else 1
        out += [(f"msg_{number:06d}", event)] * copies
    rng.shuffle(out)
    return out


def expected_in_crm(records: dict[str, dict[str, Any]]) -> dict[str, dict[str, str]]:
    """Expected records formatted as HubSpot stores them."""
    from instruqt_crm.crm.hubspot import format_value

    return {
        email: {name: format_value(value) for name, value in record.items()}
        for email, record in records.items()
    }


def crm_records(contacts: dict[str, dict[str, str]]) -> dict[str, dict[str, str]]:
    """A fake CRM's contacts, restricted to the properties the mapping writes."""
    return {
        email: {k: v for k, v in props.items() if k.startswith("instruqt_") or k == "email"}
        for email, props in contacts.items()
    }
