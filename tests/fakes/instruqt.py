"""A fake of Instruqt's GraphQL API (standard library only): the user lookup, play reports,
a track's challenges and a track by slug, with a switchable outage, scripted failures, a rate
limit and a page limit.

It answers the queries the service sends (those of isovalent/instruqt-go)::

    user(userID: $userID) { id details(teamSlug: $teamSlug) { ... } profile { ... } }
    playReports(input: {teamSlug:, dateRangeFilter: {from:, to:}, trackIds:, ..., userIds:,
                        pagination: {skip:, take:}, playType:, customParameterFilters:,
                        ordering: {orderBy:, direction:}}) { items { ... } totalItems }
    challenges(trackID: $trackId, teamSlug: $teamSlug) { id slug index }
    track(trackSlug: $trackSlug, teamSlug: $teamSlug) { id slug }

A known user (in ``emails``, ``details`` or a play of ``plays``) answers
``{"id", "details": {...} | null, "profile": {"email", "display_name"}}`` (``details`` only
for users in ``details``, and only for ``team``); the play reports carry the same user object,
so both queries agree. An unknown user answers ``{"user": null}``, a user in ``broken`` a
GraphQL error. Play reports filter on ``startedAt`` (``from`` inclusive, ``to`` exclusive; an
item whose ``startedAt`` does not parse matches every range, so malformed items can be
served), ``trackIds``, ``userIds`` and ``playType`` (by ``mode``), are ordered by the requested
field and direction with ties by id, and ``totalItems`` counts the matches before paging; a
``take`` over ``max_take`` answers a GraphQL error. An unknown track, or another team, answers
null with a "not found" error. Requests it does not understand answer a 400 GraphQL error;
without the right Bearer key, 401. Before each answer it sleeps ``delay`` seconds; while
``down`` is set everything answers 503; ``fail_next`` statuses answer the next requests in
order (429 with ``Retry-After: 1``); over ``max_per_second`` it answers 429 with Retry-After.

    with FakeInstruqt(key="k", emails={"user1": "a@x.com"}) as fake:
        fake.plays.append(report_item("play1", "user1", "2024-05-01T10:00:00Z"))
        fake.down = True      # every request answers 503 until set back
        ... fake.url ...      # http://127.0.0.1:PORT/graphql
"""

from __future__ import annotations

import json
import math
import threading
import time
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from tests.fakes.hubspot_limits import RollingWindow

Answer = tuple[int, dict[str, Any], dict[str, str]]  # status, JSON body, extra headers

PLAY_TYPES = ("ALL", "NORMAL", "DEVELOPER")
ORDER_FIELDS = {"completion_percent": "completionPercent", "time_spent": "timeSpent"}
DIRECTIONS = ("Asc", "Desc")
REPORT_VARIABLES = (
    *("teamSlug", "from", "to", "trackIds", "trackInviteIds", "landingPageIds", "tags"),
    *("userIds", "skip", "take", "playType", "customParameterFilters", "orderBy"),
    "orderDirection",
)
UNFILTERED = ("trackInviteIds", "landingPageIds", "tags", "customParameterFilters")
KINDS = (  # a fragment of each query the fake answers, and its kind
    ("playReports(input: {teamSlug: $teamSlug", "reports"),
    ("challenges(trackID: $trackId, teamSlug: $teamSlug)", "challenge"),
    ("track(trackSlug: $trackSlug, teamSlug: $teamSlug)", "track"),
    ("user(userID: $userID)", "user"),
)


def report_item(
    play_id: str,
    user_id: str,
    started_at: datetime | str,
    track_id: str = "track-1",
    track_slug: str | None = "track-one",
    invite_id: str | None = None,
    completion_percent: float = 0.0,
    total_challenges: int = 4,
    completed_challenges: int = 0,
    time_spent: int = 0,
    stopped_reason: str | None = None,
    mode: str = "NORMAL",
    review: tuple[int | None, str | None] | None = None,
    custom_parameters: dict[str, str] | None = None,
) -> dict[str, Any]:
    """A play report item in Instruqt's shape (the fake fills in the user's details/profile)."""
    started = started_at if isinstance(started_at, str) else started_at.isoformat()
    return {
        "id": play_id,
        "track": {"id": track_id, "slug": track_slug},
        "trackInvite": {"id": invite_id} if invite_id else None,
        "user": {"id": user_id},
        "completionPercent": completion_percent,
        "totalChallenges": total_challenges,
        "completedChallenges": completed_challenges,
        "timeSpent": time_spent,
        "stoppedReason": stopped_reason,
        "mode": mode,
        "startedAt": started,
        "activity": [],
        "playReview": None
        if review is None
        else {"id": f"review-{play_id}", "score": review[0], "content": review[1]},
        "customParameters": [
            {"key": key, "value": value} for key, value in (custom_parameters or {}).items()
        ],
    }


class FakeInstruqt:
    """In-process fake Instruqt GraphQL endpoint: start(), point INSTRUQT_GRAPHQL_URL at url."""

    def __init__(
        self,
        key: str = "instruqt-test-key",
        emails: dict[str, str] | None = None,
        team: str = "acme",
        details: dict[str, dict[str, str]] | None = None,
        plays: list[dict[str, Any]] | None = None,
        challenges: dict[str, list[dict[str, Any]]] | None = None,
        tracks: dict[str, str] | None = None,
    ):
        self.key = key
        self.emails: dict[str, str] = dict(emails or {})  # user id -> profile email
        self.team = team
        self.details: dict[str, dict[str, str]] = dict(details or {})  # user id -> details
        self.plays: list[dict[str, Any]] = list(plays or [])  # report items (report_item)
        # track id -> its challenges, [{"id", "slug", "index"}], in any order
        self.challenges: dict[str, list[dict[str, Any]]] = dict(challenges or {})
        self.tracks: dict[str, str] = dict(tracks or {})  # track slug -> track id
        self.broken: set[str] = set()  # user ids whose lookup answers a GraphQL error
        self.down = False
        self.delay = 0.0  # seconds slept before each answer
        self.fail_next: list[int] = []  # statuses answered to the next requests, in order
        self.max_per_second: float | None = None  # answered requests per second, else 429
        self.max_take = 100
        self.calls: list[tuple[str, int]] = []  # user lookups: (user id, status answered)
        self.statuses: list[int] = []  # every status answered, in order
        self.reports_calls = self.challenge_calls = self.track_calls = self.user_calls = 0
        self.limited_calls = 0  # 429s answered for going over max_per_second
        self._window: RollingWindow | None = None
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """The GraphQL endpoint's URL."""
        if self._server is None:
            raise RuntimeError("FakeInstruqt is not started")
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}/graphql"

    def start(self) -> FakeInstruqt:
        """Serve in a daemon thread on a free port."""
        server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        server.daemon_threads = True
        server.fake = self  # type: ignore[attr-defined]
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the socket."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> FakeInstruqt:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def answer(self, authorization: str | None, raw: bytes) -> Answer:
        """Status, JSON body and extra headers for one POST."""
        if self.delay:
            time.sleep(self.delay)
        try:
            request = json.loads(raw)
            query, variables = str(request["query"]), request.get("variables") or {}
            if not isinstance(variables, dict):
                raise TypeError("variables is not an object")
        except (ValueError, KeyError, TypeError):
            return _refused("malformed GraphQL request")
        kind = next((kind for fragment, kind in KINDS if fragment in query), None)
        with self._lock:
            if kind is not None:
                setattr(self, f"{kind}_calls", getattr(self, f"{kind}_calls") + 1)
        status, body, headers = self._gate(authorization) or self._dispatch(kind, query, variables)
        with self._lock:
            self.statuses.append(status)
            if kind == "user":
                self.calls.append((str(variables.get("userID")), status))
        return status, body, headers

    def _gate(self, authorization: str | None) -> Answer | None:
        """The outage, scripted failures, the key and the rate limit, in that order."""
        if self.down:
            return 503, {"errors": [{"message": "service unavailable"}]}, {}
        with self._lock:
            scripted = self.fail_next.pop(0) if self.fail_next else None
        if scripted == 429:
            return 429, {"errors": [{"message": "too many requests"}]}, {"Retry-After": "1"}
        if scripted is not None:
            return scripted, {"errors": [{"message": f"scripted failure {scripted}"}]}, {}
        if authorization != f"Bearer {self.key}":
            return 401, {"errors": [{"message": "unauthorized"}]}, {}
        return self._rate_limit()

    def _rate_limit(self) -> Answer | None:
        """429 with Retry-After when answering would go over ``max_per_second``."""
        if self.max_per_second is None:
            return None
        limit = max(1, round(self.max_per_second))
        with self._lock:
            window = self._window
            if window is None or window.seconds != limit / self.max_per_second:
                window = self._window = RollingWindow(limit, limit / self.max_per_second)
            now = time.monotonic()
            if window.full(now):
                self.limited_calls += 1
                wait = str(max(1, math.ceil(window.seconds)))
                return 429, {"errors": [{"message": "rate limit exceeded"}]}, {"Retry-After": wait}
            window.hit(now)
        return None

    def _dispatch(self, kind: str | None, query: str, variables: dict[str, Any]) -> Answer:
        """The answer to an authorised query."""
        if kind == "user":
            if "details(teamSlug: $teamSlug)" not in query:
                return _refused("unexpected query")
            return self._user_answer(variables)
        if kind == "reports":
            return self._reports(variables)
        if kind == "challenge":
            return self._challenges(variables)
        if kind == "track":
            return self._track(variables)
        return _refused("unexpected query")

    def _user(self, user_id: str, team: str) -> dict[str, Any]:
        """The user object both the lookup and the play reports carry."""
        profile = {"email": self.emails.get(user_id), "display_name": user_id}
        details = self.details.get(user_id) if team == self.team else None
        return {"id": user_id, "details": details, "profile": profile}

    def _user_answer(self, variables: dict[str, Any]) -> Answer:
        if missing := _missing(variables, ("userID", "teamSlug")):
            return missing
        user_id, team = str(variables["userID"]), str(variables["teamSlug"])
        if user_id in self.broken:
            error = {"message": f"resolver failed for {user_id}", "path": ["user"]}
            return 200, {"data": None, "errors": [error]}, {}
        players = {_user_id(item) for item in self.plays}
        if user_id not in self.emails and user_id not in self.details and user_id not in players:
            return 200, {"data": {"user": None}}, {}
        return 200, {"data": {"user": self._user(user_id, team)}}, {}

    def _reports(self, variables: dict[str, Any]) -> Answer:
        if missing := _missing(variables, REPORT_VARIABLES):
            return missing
        v = variables
        if v["teamSlug"] != self.team:
            return _not_found("playReports", "team not found")
        try:
            since, until = _moment(v["from"]), _moment(v["to"])
        except (TypeError, ValueError):
            return _refused("from and to must be RFC 3339 times")
        if v["playType"] not in PLAY_TYPES or v["orderDirection"] not in DIRECTIONS:
            return _refused("invalid playType or orderDirection")
        if v["orderBy"] not in ORDER_FIELDS:
            return _refused(f"cannot order by {v['orderBy']!r}")
        if not all(isinstance(v[n], int) and v[n] >= 0 for n in ("skip", "take")):
            return _refused("skip and take must be non-negative integers")
        if filtered := [name for name in UNFILTERED if v[name]]:
            return _refused(f"the fake does not filter by {', '.join(filtered)}")
        if v["take"] > self.max_take:
            error = {"message": f"take must be at most {self.max_take}", "path": ["playReports"]}
            return 200, {"data": {"playReports": None}, "errors": [error]}, {}
        with self._lock:
            plays = list(self.plays)
        matches = [
            item
            for item in plays
            if _in_range(item, since, until)
            and (not v["trackIds"] or (item.get("track") or {}).get("id") in v["trackIds"])
            and (not v["userIds"] or _user_id(item) in v["userIds"])
            and v["playType"] in ("ALL", item.get("mode"))
        ]
        field, descending = ORDER_FIELDS[v["orderBy"]], v["orderDirection"] == "Desc"
        matches.sort(key=lambda item: str(item.get("id")))  # ties by id, kept by the stable sort
        matches.sort(key=lambda item: _sort_value(item.get(field)), reverse=descending)
        items = [self._filled(item) for item in matches[v["skip"] : v["skip"] + v["take"]]]
        return 200, {"data": {"playReports": {"items": items, "totalItems": len(matches)}}}, {}

    def _filled(self, item: dict[str, Any]) -> dict[str, Any]:
        """A copy of a report item with the user's details and profile filled in."""
        user_id = _user_id(item)
        return {**item, "user": self._user(user_id, self.team)} if user_id else dict(item)

    def _challenges(self, variables: dict[str, Any]) -> Answer:
        if missing := _missing(variables, ("trackId", "teamSlug")):
            return missing
        found = self.challenges.get(str(variables["trackId"]))
        if found is None or variables["teamSlug"] != self.team:
            return _not_found("challenges", "track not found")
        return 200, {"data": {"challenges": [dict(challenge) for challenge in found]}}, {}

    def _track(self, variables: dict[str, Any]) -> Answer:
        if missing := _missing(variables, ("trackSlug", "teamSlug")):
            return missing
        slug = str(variables["trackSlug"])
        if slug not in self.tracks or variables["teamSlug"] != self.team:
            return _not_found("track", "track not found")
        return 200, {"data": {"track": {"id": self.tracks[slug], "slug": slug}}}, {}


def _refused(message: str) -> Answer:
    """A 400 GraphQL error: a request the fake (or Instruqt) does not accept."""
    return 400, {"errors": [{"message": message}]}, {}


def _not_found(field: str, message: str) -> Answer:
    """A null answer with a "not found" error on ``field``."""
    return 200, {"data": {field: None}, "errors": [{"message": message, "path": [field]}]}, {}


def _missing(variables: dict[str, Any], names: tuple[str, ...]) -> Answer | None:
    """A 400 naming the first required variable that was not provided, or None."""
    for name in names:
        if variables.get(name) is None:
            return _refused(f'Variable "${name}" of required type was not provided.')
    return None


def _user_id(item: dict[str, Any]) -> str | None:
    """The user id of a report item, if it has one."""
    user = item.get("user")
    return str(user["id"]) if isinstance(user, dict) and user.get("id") else None


def _moment(value: Any) -> datetime:
    """A timezone-aware time from RFC 3339 text (TypeError/ValueError otherwise)."""
    moment = datetime.fromisoformat(value)
    if moment.tzinfo is None:
        raise ValueError("no time zone")
    return moment


def _in_range(item: dict[str, Any], since: datetime, until: datetime) -> bool:
    """Whether the item started in [since, until); an unparsable startedAt matches."""
    try:
        started = _moment(item.get("startedAt"))
    except (TypeError, ValueError):
        return True
    return since <= started < until


def _sort_value(value: Any) -> float:
    """A number to order by (anything that is not a number first)."""
    is_number = isinstance(value, int | float) and not isinstance(value, bool)
    return float(value) if is_number else -math.inf


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body leave at once: no 40 ms delayed-ACK stall

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet."""

    def do_POST(self) -> None:
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        fake: FakeInstruqt = self.server.fake  # type: ignore[attr-defined]
        status, body, headers = fake.answer(self.headers.get("Authorization"), raw)
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)
