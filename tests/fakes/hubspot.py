"""A fake HubSpot CRM v3 server (contacts + contact properties) for tests and benchmarks.

It is a real HTTP server on 127.0.0.1 (standard library only), because
`hubspot-api-client` speaks urllib3 and cannot be intercepted by `responses`. Point the
real SDK at it with `HubSpot(access_token=fake.token, host=fake.url)`.

    with FakeHubSpot(requests_per_window=10, window_seconds=0.5) as fake:
        client = HubSpot(access_token=fake.token, host=fake.url)
        ...
        assert fake.contacts["a@x.com"]["firstname"] == "Ada"

Or as its own process (first stdout line is the URL; control endpoints under /_fake/):

    python -m tests.fakes.hubspot --port 0 --rate 100 --window 10 --latency 0.05 --token T

What it enforces, in this order, on every API request (as HubSpot's CRM API docs describe):

1. Bearer token: missing/unknown -> 401 INVALID_AUTHENTICATION (not rate counted).
2. Injected faults (`inject_errors`, `set_error_rate`): 5xx / 423 / anything, HubSpot-style
   JSON (or a raw text body if given). They count as requests in the window.
3. Daily limit -> 429 policyName DAILY; rolling window per token: more than
   `requests_per_window` in the last `window_seconds` -> 429 TEN_SECONDLY_ROLLING.
4. Scopes -> 403 MISSING_SCOPES with errors[].context.requiredGranularScopes.
5. The endpoint itself: validation (400), conflicts (409), not found (404).
Every authenticated answer carries X-HubSpot-RateLimit-Max / -Remaining /
-Interval-Milliseconds; -Daily / -Daily-Remaining only with `daily_headers=True` (HubSpot
documents them for the retired API keys and says OAuth calls carry none).
Latency (`set_latency`) is added to every API answer, after it has been computed.

The daily limit (`daily_limit`; None: the API add-on's 1,000,000) counts every admitted
request of the account, whatever its token, and resets at midnight in the account's time
zone (`time_zone`, US Eastern by default), not UTC's. `GET
/account-info/v3/api-usage/daily/private-apps` reports the same counter and that midnight as
`resetsAt` (HubSpot's shape: `{"results": [{name, usageLimit, currentUsage, collectedAt,
fetchStatus, resetsAt}]}`); it still answers once the limit is spent (HubSpot does not say
whether it does; the adapter falls back when it does not, and `inject_errors` makes it fail).

Design choice -- rejected requests and the window: HubSpot documents the limits as a
number of requests allowed per rolling 10 s (and per day), with X-HubSpot-RateLimit-Remaining
being "requests still allowed", and says that a client over the limit "will get HTTP 429
responses until the limit resets"; it does not say that 429s extend the lockout. So by
default a 429 does NOT consume the window or the daily budget: capacity returns as old
admitted requests age out. `count_429_in_window=True` (CLI `--count-429-in-window`) makes
429s count too, for a harsher test of backoff. Either way every 429 is recorded, and
`summary()["max_in_window"]` reports the peak of all requests *sent* in any window.

For deterministic limiter tests, pass `clock=` (a monotonic-seconds callable) and call
`fake.handle(method, path, "Bearer <token>", body_bytes)` directly, without a server.
`wall_clock=` (a UTC-datetime callable) stamps contacts' createdate / lastmodifieddate, and
`sleep=` is what the server calls to add latency: tests can fake both.

Other choices (details HubSpot's docs leave open, chosen to be strict):
- A batch with any input keyed by email fails whole (400, or 409 if a unique value is held
  by another contact); batches keyed by a hasUniqueValue property or hs_object_id return
  207 with `errors` for the failed inputs and write the others.
- Unknown property names, an unusable idProperty, duplicate ids, >100 or 0 inputs fail the
  whole batch with 400.
- datetime values: ISO 8601 *with* a zone, a bare date, or epoch ms; stored as
  `YYYY-MM-DDTHH:MM:SS.mmmZ`. date values must be midnight UTC; stored `YYYY-MM-DD`.
- An `email` in properties that differs from the email id is rejected (400).
- Only the contacts object type is served (`contacts`, `contact`, `0-1`).
- Batch upsert answers as `hubspot_contacts` describes: results in no particular order,
  207 errors naming inputs by `objectWriteTraceId` only; `errors_without_ids` and
  `lose_inputs` make the rare answers (an error naming nothing, an input in neither list).
"""

from __future__ import annotations

import argparse
import json
import random
import re
import signal
import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit
from zoneinfo import ZoneInfo

from tests.fakes.hubspot_contacts import ContactStore
from tests.fakes.hubspot_limits import RequestRecord, RollingWindow, summarize
from tests.fakes.hubspot_model import (
    ApiError,
    correlation_id,
    error_body,
    iso_ms,
    new_group,
    new_property,
    now_iso,
    standard_groups,
    standard_properties,
    utc_now,
    validation_error,
)

__all__ = ["DEFAULT_SCOPES", "FakeHubSpot", "RequestRecord", "main"]

DEFAULT_SCOPES = (
    "crm.objects.contacts.write",
    "crm.objects.contacts.read",
    "crm.schemas.contacts.write",
    "crm.schemas.contacts.read",
)
CONTACT_TYPES = ("contacts", "contact", "0-1")
USAGE_PATH = "/account-info/v3/api-usage/daily/private-apps"
ADD_ON_DAILY_LIMIT = 1_000_000  # the API add-on's daily limit: the default when none is set
PORTAL_ID = "1234567"
APP_ID = "7654321"
Response = tuple[int, Any, dict[str, str]]
Handler = Callable[[re.Match[str], dict[str, list[str]], Any], tuple[int, Any]]


@dataclass(frozen=True)
class _Route:
    method: str
    pattern: re.Pattern[str]
    scope: str
    handler: str  # name of a FakeHubSpot method


def _route(method: str, path: str, scope: str, handler: str) -> _Route:
    regex = re.sub(r"\{(\w+)\}", r"(?P<\1>[^/]+)", path)
    return _Route(method, re.compile(f"^{regex}/?$"), scope, handler)


_OBJ, _SCHEMA = "crm.objects.contacts", "crm.schemas.contacts"
ROUTES = (
    _route("GET", "/crm/v3/properties/{ot}/groups", f"{_SCHEMA}.read", "_list_groups"),
    _route("POST", "/crm/v3/properties/{ot}/groups", f"{_SCHEMA}.write", "_create_group"),
    _route("GET", "/crm/v3/properties/{ot}/groups/{name}", f"{_SCHEMA}.read", "_get_group"),
    _route(
        "POST",
        "/crm/v3/properties/{ot}/batch/create",
        f"{_SCHEMA}.write",
        "_batch_create_properties",
    ),
    _route("GET", "/crm/v3/properties/{ot}", f"{_SCHEMA}.read", "_list_properties"),
    _route("POST", "/crm/v3/properties/{ot}", f"{_SCHEMA}.write", "_create_property"),
    _route("GET", "/crm/v3/properties/{ot}/{name}", f"{_SCHEMA}.read", "_get_property"),
    _route("POST", "/crm/v3/objects/{ot}/batch/upsert", f"{_OBJ}.write", "_batch_upsert"),
    _route("POST", "/crm/v3/objects/{ot}/batch/read", f"{_OBJ}.read", "_batch_read"),
    _route("GET", "/crm/v3/objects/{ot}", f"{_OBJ}.read", "_list_contacts"),
    _route("GET", "/crm/v3/objects/{ot}/{id}", f"{_OBJ}.read", "_get_contact"),
    _route("GET", USAGE_PATH, "", "_daily_usage"),  # HubSpot names no scope for it
)


class FakeHubSpot:
    """In-process fake HubSpot: start(), point the SDK at `url`, inspect state, stop()."""

    def __init__(
        self,
        token: str = "test-token",
        requests_per_window: int = 100,
        window_seconds: float = 10.0,
        latency: float = 0.0,
        daily_limit: int | None = None,
        scopes: Iterable[str] = DEFAULT_SCOPES,
        count_429_in_window: bool = False,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], datetime] = utc_now,
        sleep: Callable[[float], None] = time.sleep,
        time_zone: str = "America/New_York",
        daily_headers: bool = False,
    ) -> None:
        self.token = token
        self.zone = ZoneInfo(time_zone)  # the account's: its day ends at midnight there
        self.daily_headers = daily_headers
        self.clock = clock  # monotonic seconds; tests may swap in a fake clock
        self.wall_clock = wall_clock  # UTC datetimes for contact stamps
        self.sleep = sleep  # adds the latency to each answer
        self.count_429_in_window = count_429_in_window
        self._initial = (requests_per_window, window_seconds, latency, daily_limit)
        self._tokens: dict[str, frozenset[str]] = {token: frozenset(scopes)}
        self._lock = threading.RLock()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self.reset()

    # ------------------------------------------------------------ lifecycle

    def start(self, host: str = "127.0.0.1", port: int = 0) -> FakeHubSpot:
        """Serve in a daemon thread on host:port (0 = any free port)."""
        server = _Server((host, port), _Handler)
        server.fake = self
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, args=(0.05,), name="fake-hubspot", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the socket."""
        if self._server is not None:
            self._server.closed = True
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> FakeHubSpot:
        return self.start() if self._server is None else self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        """`http://127.0.0.1:PORT`, to pass as the SDK's `host=`."""
        if self._server is None:
            raise RuntimeError("FakeHubSpot is not started")
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    # ------------------------------------------------------------ state and knobs

    def reset(self) -> None:
        """Back to construction time: seeded schema, no contacts, no requests, no faults."""
        rate, window, latency, daily = self._initial
        with self._lock:
            self.properties: dict[str, dict[str, Any]] = standard_properties()
            self.groups: dict[str, dict[str, Any]] = standard_groups()
            self.store = ContactStore(self.properties, self.wall_clock)
            self.requests: list[RequestRecord] = []
            self.requests_per_window, self.window_seconds = rate, window
            self.latency, self.daily_limit = latency, daily
            self._windows: dict[str, RollingWindow] = {}
            self._daily_used = 0  # the account's requests today
            self._day_ends: datetime | None = None
            self._faults: deque[tuple[int, Any] | None] = deque()  # None: answer as usual
            self._error_rate, self._error_status = 0.0, 500
            self._rng = random.Random()

    def add_token(self, token: str, scopes: Iterable[str] = DEFAULT_SCOPES) -> None:
        """Accept another private-app token (with its own scopes and rate window)."""
        with self._lock:
            self._tokens[token] = frozenset(scopes)

    def inject_errors(self, status: int, count: int = 1, body: Any = None, after: int = 0) -> None:
        """The next `count` authenticated API requests (once `after` more were answered as
        usual) answer `status` (body: dict, str or None)."""
        with self._lock:
            self._faults.extend([None] * after + [(status, body)] * count)

    def set_error_rate(self, rate: float, status: int = 500, seed: int | None = None) -> None:
        """A random fraction `rate` of authenticated API requests answer `status`."""
        with self._lock:
            self._error_rate, self._error_status = rate, status
            self._rng = random.Random(seed)

    def set_latency(self, seconds: float) -> None:
        """Delay every API answer by `seconds`."""
        with self._lock:
            self.latency = seconds

    def set_rate_limit(self, requests_per_window: int, window_seconds: float = 10.0) -> None:
        """Change the rolling-window limit (requests already in the window keep counting)."""
        with self._lock:
            self.requests_per_window, self.window_seconds = requests_per_window, window_seconds
            for window in self._windows.values():
                window.limit, window.seconds = requests_per_window, window_seconds

    def set_daily_limit(self, limit: int | None) -> None:
        """Change the daily limit (None: the API add-on's); usage so far is kept."""
        with self._lock:
            self.daily_limit = limit

    @property
    def day_limit(self) -> int:
        """The daily limit in force."""
        return self.daily_limit if self.daily_limit is not None else ADD_ON_DAILY_LIMIT

    def daily_resets_at(self) -> datetime:
        """When the account's day ends (its next midnight in `time_zone`), in UTC."""
        with self._lock:
            return self._roll_day()

    @property
    def daily_used(self) -> int:
        """The account's requests counted today."""
        with self._lock:
            self._roll_day()
            return self._daily_used

    @property
    def echo_trace_ids(self) -> bool:
        """Whether batch upsert results carry their input's `objectWriteTraceId`."""
        return self.store.echo_trace_ids

    @echo_trace_ids.setter
    def echo_trace_ids(self, value: bool) -> None:
        with self._lock:
            self.store.echo_trace_ids = value

    def errors_without_ids(self, count: int = 1) -> None:
        """The next `count` errors of 207 answers name no input (`context: {}`)."""
        with self._lock:
            self.store.errors_without_ids = count

    def lose_inputs(self, id_value: str, times: int = 1) -> None:
        """The next `times` batch upserts leave the input with this id out of their answer
        (in neither `results` nor `errors`) and do not write it."""
        with self._lock:
            self.store.lost[id_value] = times

    @property
    def contacts(self) -> dict[str, dict[str, str]]:
        """A snapshot of contacts keyed by lower-cased email (or record id), values as stored."""
        with self._lock:
            return self.store.snapshot()

    @property
    def rate_limited_requests(self) -> list[RequestRecord]:
        """The requests answered 429."""
        return [r for r in list(self.requests) if r.status == 429]

    @property
    def count_429(self) -> int:
        """How many requests were answered 429."""
        return len(self.rate_limited_requests)

    def summary(self) -> dict[str, Any]:
        """Counts (total, by status, 429s, peak requests in any window) as `/_fake/requests`."""
        with self._lock:
            result = summarize(list(self.requests), self.window_seconds, self.requests_per_window)
            result["contacts"] = len(self.store.records)
            return result

    # ------------------------------------------------------------ request pipeline

    def handle(
        self, method: str, target: str, authorization: str | None, raw: bytes
    ) -> tuple[Response, float]:
        """Answer one API request: (status, body, headers) and the latency to add."""
        arrival = self.clock()
        url = urlsplit(target)
        body = _parse_json(raw)
        with self._lock:
            policy: str | None = None
            try:
                status, payload, headers, policy = self._admit_and_route(
                    arrival, method, url.path, url.query, authorization, body
                )
            except Exception as exc:  # a bug in the fake: answer 500 and say why
                traceback.print_exc(file=sys.stderr)
                status, headers = 500, {}
                payload = error_body(f"fake HubSpot crashed: {exc!r}", "INTERNAL_ERROR")
            inputs = body.get("inputs") if isinstance(body, dict) else None
            self.requests.append(
                RequestRecord(
                    method,
                    url.path,
                    status,
                    arrival,
                    body if body is not _INVALID else None,
                    len(inputs) if isinstance(inputs, list) else 0,
                    url.query,
                    policy,
                    payload,
                )
            )
            return (status, payload, headers), self.latency

    def _admit_and_route(
        self, now: float, method: str, path: str, query: str, authorization: str | None, body: Any
    ) -> tuple[int, Any, dict[str, str], str | None]:
        token = _bearer(authorization)
        if token not in self._tokens:
            message = (
                "Authentication credentials not found. This API supports OAuth 2.0 "
                "authentication and you can find more details at "
                "https://developers.hubspot.com/docs/methods/auth/oauth-overview"
            )
            return 401, error_body(message, "INVALID_AUTHENTICATION"), {}, None
        window = self._windows.setdefault(
            token, RollingWindow(self.requests_per_window, self.window_seconds)
        )
        self._roll_day()
        fault = self._take_fault()
        if fault is not None:
            self._count(token, window, now)
            status, payload = fault
            return status, payload, self._rate_headers(token, window, now), None
        limited = self._limit_policy(window, now, path)
        if limited is not None:
            if self.count_429_in_window:
                self._count(token, window, now)
            return 429, _rate_limit_body(limited), self._rate_headers(token, window, now), limited
        self._count(token, window, now)
        headers = self._rate_headers(token, window, now)
        try:
            status, payload = self._route(token, method, path, query, body)
        except ApiError as exc:
            headers.update(exc.headers)
            return exc.status, exc.body, headers, None
        return status, payload, headers, None

    def _take_fault(self) -> tuple[int, Any] | None:
        if self._faults:
            fault = self._faults.popleft()
            if fault is None:
                return None
            status, body = fault
        elif self._error_rate and self._rng.random() < self._error_rate:
            status, body = self._error_status, None
        else:
            return None
        return status, body if body is not None else _fault_body(status)

    def _limit_policy(self, window: RollingWindow, now: float, path: str) -> str | None:
        spent = self._daily_used >= self.day_limit and path.rstrip("/") != USAGE_PATH
        if spent:
            return "DAILY"
        if window.full(now):
            return "TEN_SECONDLY_ROLLING"
        return None

    def _count(self, token: str, window: RollingWindow, now: float) -> None:
        window.hit(now)
        self._daily_used += 1

    def _roll_day(self) -> datetime:
        """The end of the account's day (UTC); the daily count starts again once it passes."""
        moment = self.wall_clock()
        if self._day_ends is None or moment >= self._day_ends:
            if self._day_ends is not None:
                self._daily_used = 0
            local = moment.astimezone(self.zone)
            midnight = datetime.combine(local.date() + timedelta(days=1), datetime.min.time())
            self._day_ends = midnight.replace(tzinfo=self.zone).astimezone(UTC)
        return self._day_ends

    def _rate_headers(self, token: str, window: RollingWindow, now: float) -> dict[str, str]:
        headers = {
            "X-HubSpot-RateLimit-Max": str(window.limit),
            "X-HubSpot-RateLimit-Remaining": str(window.remaining(now)),
            "X-HubSpot-RateLimit-Interval-Milliseconds": str(int(window.seconds * 1000)),
        }
        if self.daily_headers:
            headers["X-HubSpot-RateLimit-Daily"] = str(self.day_limit)
            left = max(0, self.day_limit - self._daily_used)
            headers["X-HubSpot-RateLimit-Daily-Remaining"] = str(left)
        return headers

    def _route(self, token: str, method: str, path: str, query: str, body: Any) -> tuple[int, Any]:
        matches = [(r, m) for r in ROUTES if (m := r.pattern.match(path))]
        chosen = next(((r, m) for r, m in matches if r.method == method), None)
        if chosen is None:
            if matches:
                raise ApiError(
                    405, error_body(f"Method {method} not allowed on {path}", "METHOD_NOT_ALLOWED")
                )
            raise ApiError(404, error_body(f"No API route for {method} {path}", "OBJECT_NOT_FOUND"))
        route, match = chosen
        if route.scope and route.scope not in self._tokens[token]:
            raise ApiError(403, _missing_scope_body(route.scope))
        if "ot" in match.groupdict() and match.group("ot") not in CONTACT_TYPES:
            raise validation_error(f"Unable to infer object type from: {match.group('ot')}")
        if method == "POST" and body is _INVALID:
            raise validation_error("Invalid input JSON: the body is not valid JSON")
        handler: Handler = getattr(self, route.handler)
        return handler(match, parse_qs(query), body)

    # ------------------------------------------------------------ endpoints

    def _list_properties(
        self, match: re.Match[str], query: dict[str, list[str]], body: Any
    ) -> tuple[int, Any]:
        return 200, {"results": [dict(d) for d in self.properties.values()]}

    def _get_property(
        self, match: re.Match[str], query: dict[str, list[str]], body: Any
    ) -> tuple[int, Any]:
        name = unquote(match.group("name"))
        if name not in self.properties:
            raise ApiError(
                404,
                error_body(
                    f"Unable to find property {name} for object type 0-1", "OBJECT_NOT_FOUND"
                ),
            )
        return 200, self.properties[name]

    def _create_property(
        self, match: re.Match[str], query: dict[str, list[str]], body: Any
    ) -> tuple[int, Any]:
        definition = new_property(body, self.properties, self.groups)
        self.properties[definition["name"]] = definition
        return 201, definition

    def _batch_create_properties(
        self, match: re.Match[str], query: dict[str, list[str]], body: Any
    ) -> tuple[int, Any]:
        started = now_iso()
        if not isinstance(body, dict) or not isinstance(body.get("inputs"), list):
            raise validation_error("Invalid input JSON: expected an object with an inputs list")
        results: list[dict[str, Any]] = []
        errors: list[dict[str, Any]] = []
        for item in body["inputs"]:
            try:
                definition = new_property(item, self.properties, self.groups)
            except ApiError as exc:
                detail = exc.body if isinstance(exc.body, dict) else {"message": str(exc.body)}
                errors.append(
                    {
                        "status": "error",
                        "category": detail.get("category", "ERROR"),
                        "message": detail.get("message", ""),
                        "errors": [],
                        "context": {
                            "name": [str(item.get("name"))] if isinstance(item, dict) else []
                        },
                        "links": {},
                    }
                )
                continue
            self.properties[definition["name"]] = definition
            results.append(definition)
        response: dict[str, Any] = {
            "status": "COMPLETE",
            "results": results,
            "startedAt": started,
            "completedAt": now_iso(),
        }
        if errors:
            response.update(errors=errors, numErrors=len(errors))
            return 207, response
        return 201, response

    def _list_groups(
        self, match: re.Match[str], query: dict[str, list[str]], body: Any
    ) -> tuple[int, Any]:
        return 200, {"results": [dict(g) for g in self.groups.values()]}

    def _get_group(
        self, match: re.Match[str], query: dict[str, list[str]], body: Any
    ) -> tuple[int, Any]:
        name = unquote(match.group("name"))
        if name not in self.groups:
            raise ApiError(
                404, error_body(f"Unable to find property group {name}", "OBJECT_NOT_FOUND")
            )
        return 200, self.groups[name]

    def _create_group(
        self, match: re.Match[str], query: dict[str, list[str]], body: Any
    ) -> tuple[int, Any]:
        group = new_group(body, self.groups)
        self.groups[group["name"]] = group
        return 201, group

    def _batch_upsert(
        self, match: re.Match[str], query: dict[str, list[str]], body: Any
    ) -> tuple[int, Any]:
        return self.store.batch_upsert(body)

    def _batch_read(
        self, match: re.Match[str], query: dict[str, list[str]], body: Any
    ) -> tuple[int, Any]:
        return self.store.batch_read(body)

    def _daily_usage(
        self, match: re.Match[str], query: dict[str, list[str]], body: Any
    ) -> tuple[int, Any]:
        usage = {
            "name": "private-apps-api-calls-daily",
            "usageLimit": self.day_limit,
            "currentUsage": self._daily_used,
            "collectedAt": iso_ms(self.wall_clock()),
            "fetchStatus": "SUCCESS",
            "resetsAt": self._roll_day().strftime("%Y-%m-%dT%H:%M:%SZ"),
        }
        return 200, {"results": [usage]}

    def _get_contact(
        self, match: re.Match[str], query: dict[str, list[str]], body: Any
    ) -> tuple[int, Any]:
        id_property = query["idProperty"][0] if query.get("idProperty") else None
        return 200, self.store.get(unquote(match.group("id")), id_property, _names(query))

    def _list_contacts(
        self, match: re.Match[str], query: dict[str, list[str]], body: Any
    ) -> tuple[int, Any]:
        try:
            limit = int((query.get("limit") or ["10"])[0])
        except ValueError as exc:
            raise validation_error("limit must be an integer") from exc
        if not 1 <= limit <= 100:
            raise validation_error("limit must be between 1 and 100")
        after = query["after"][0] if query.get("after") else None
        if after is not None and not after.isdigit():
            raise validation_error(f"Invalid paging cursor: {after}")
        return 200, self.store.page(limit, after, _names(query))

    # ------------------------------------------------------------ control endpoints

    def control(self, method: str, target: str, raw: bytes) -> tuple[int, Any]:
        """Answer a `/_fake/...` request (no auth, not rate limited, not recorded)."""
        url = urlsplit(target)
        body = _parse_json(raw)
        body = body if isinstance(body, dict) else {}
        action = (method, url.path.rstrip("/"))
        try:
            if action == ("GET", "/_fake/contacts"):
                return 200, {"contacts": self.contacts}
            if action == ("GET", "/_fake/properties"):
                with self._lock:
                    return 200, {"properties": dict(self.properties), "groups": dict(self.groups)}
            if action == ("GET", "/_fake/requests"):
                result = self.summary()
                if parse_qs(url.query).get("full"):
                    result["requests"] = [r.as_dict() for r in list(self.requests)]
                return 200, result
            if action == ("POST", "/_fake/errors"):
                return self._control_errors(body)
            if action == ("POST", "/_fake/latency"):
                self.set_latency(float(body["seconds"]))
            elif action == ("POST", "/_fake/rate_limit"):
                self.set_rate_limit(
                    int(body["requests_per_window"]),
                    float(body.get("window_seconds", self.window_seconds)),
                )
                if "daily_limit" in body:
                    self.set_daily_limit(body["daily_limit"])
            elif action == ("POST", "/_fake/reset"):
                self.reset()
            else:
                return 404, {"error": f"unknown control endpoint {method} {url.path}"}
        except (KeyError, TypeError, ValueError) as exc:
            return 400, {"error": f"bad control request: {exc!r}"}
        return 200, {"ok": True}

    def _control_errors(self, body: dict[str, Any]) -> tuple[int, Any]:
        if "rate" in body:
            self.set_error_rate(float(body["rate"]), int(body.get("status", 500)), body.get("seed"))
        else:
            self.inject_errors(
                int(body["status"]),
                int(body.get("count", 1)),
                body.get("body"),
                int(body.get("after", 0)),
            )
        return 200, {"ok": True}


# ---------------------------------------------------------------- helpers

_INVALID = object()


def _parse_json(raw: bytes) -> Any:
    """Parsed JSON, None for an empty body, _INVALID when it does not parse."""
    if not raw:
        return None
    try:
        return json.loads(raw)
    except ValueError:
        return _INVALID


def _bearer(authorization: str | None) -> str | None:
    if authorization and authorization.lower().startswith("bearer "):
        return authorization[7:].strip()
    return None


def _names(query: dict[str, list[str]]) -> list[str]:
    """`properties=a,b&properties=c` -> [a, b, c]."""
    return [n for value in query.get("properties", []) for n in value.split(",") if n]


def _rate_limit_body(policy: str) -> dict[str, Any]:
    limit = "daily" if policy == "DAILY" else policy.lower()
    return {
        "status": "error",
        "message": f"You have reached your {limit} limit.",
        "errorType": "RATE_LIMIT",
        "correlationId": correlation_id(),
        "policyName": policy,
        "groupName": f"publicapi:private-app:{APP_ID}:{PORTAL_ID}",
    }


def _fault_body(status: int) -> dict[str, Any]:
    if status == 429:
        return _rate_limit_body("TEN_SECONDLY_ROLLING")
    if status == 423:
        return error_body(
            "The resource is locked. Please wait at least 2 seconds and retry.", "LOCKED"
        )
    phrase = HTTPStatus(status).phrase if status in HTTPStatus._value2member_map_ else "Error"
    category = "INTERNAL_ERROR" if status >= 500 else "VALIDATION_ERROR"
    return error_body(f"{phrase} (injected by the fake)", category)


def _missing_scope_body(scope: str) -> dict[str, Any]:
    return error_body(
        "This app hasn't been granted all required scopes to make this call. Read more "
        "about required scopes here: https://developers.hubspot.com/scopes.",
        "MISSING_SCOPES",
        errors=[
            {
                "message": "One or more of the following scopes are required.",
                "context": {"requiredGranularScopes": [scope]},
            }
        ],
        links={"scopes": "https://developers.hubspot.com/scopes"},
    )


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    closed = False  # set by stop(): lingering keep-alive connections get dropped
    fake: FakeHubSpot


class _Handler(BaseHTTPRequestHandler):
    """HTTP/1.1 keep-alive handler; quiet (no per-request logging)."""

    protocol_version = "HTTP/1.1"
    server: _Server
    timeout = 30

    def log_message(self, format: str, *args: Any) -> None:
        """Stay quiet."""

    def _serve(self) -> None:
        if self.server.closed:
            self.close_connection = True
            return
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        fake = self.server.fake
        if urlsplit(self.path).path.startswith("/_fake/"):
            status, payload = fake.control(self.command, self.path, raw)
            self._send(status, payload, {})
            return
        (status, payload, headers), delay = fake.handle(
            self.command, self.path, self.headers.get("Authorization"), raw
        )
        if delay > 0:
            fake.sleep(delay)
        self._send(status, payload, headers)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _serve

    def _send(self, status: int, payload: Any, headers: dict[str, str]) -> None:
        if isinstance(payload, str):
            data, ctype = payload.encode(), "text/html; charset=utf-8"
        else:
            data, ctype = json.dumps(payload).encode(), "application/json;charset=utf-8"
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("X-HubSpot-Correlation-Id", correlation_id())
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)


# ---------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> int:
    """Run the fake as a process until SIGTERM/SIGINT; print its URL first."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--rate", type=int, default=100, help="requests per window")
    parser.add_argument("--window", type=float, default=10.0, help="window seconds")
    parser.add_argument("--latency", type=float, default=0.0, help="seconds per API answer")
    parser.add_argument("--daily", type=int, default=None, help="daily request limit")
    parser.add_argument("--time-zone", default="America/New_York", help="the account's zone")
    parser.add_argument("--daily-headers", action="store_true", help="send -Daily headers")
    parser.add_argument("--token", default="test-token")
    parser.add_argument("--error-rate", type=float, default=0.0)
    parser.add_argument("--error-status", type=int, default=500)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--count-429-in-window", action="store_true")
    args = parser.parse_args(argv)
    fake = FakeHubSpot(
        token=args.token,
        requests_per_window=args.rate,
        window_seconds=args.window,
        latency=args.latency,
        daily_limit=args.daily,
        count_429_in_window=args.count_429_in_window,
        time_zone=args.time_zone,
        daily_headers=args.daily_headers,
    )
    if args.error_rate:
        fake.set_error_rate(args.error_rate, args.error_status, args.seed)
    stopping = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stopping.set())
    fake.start(args.host, args.port)
    print(fake.url, flush=True)
    while not stopping.wait(0.5):
        pass
    fake.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
