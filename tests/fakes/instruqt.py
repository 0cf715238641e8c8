"""A fake of Instruqt's GraphQL user lookup (standard library only), with a switchable outage.

It answers the one query the service sends (the team's details and the user's profile)::

    query ($userID: String!, $teamSlug: String!) { user(userID: $userID) { id
      details(teamSlug: $teamSlug) { email firstName lastName } profile { email display_name } } }

with ``{"data": {"user": {"id": ..., "details": {...} | null, "profile": {...}}}}`` for a
known user (``details`` only for users in ``details`` who claimed an invite of ``team``),
``{"data": {"user": null}}`` for an unknown one, a GraphQL error for a user in ``broken``,
401 without the right Bearer key, and 503 for everything while ``down`` is set.

    with FakeInstruqt(key="k", emails={"user1": "a@x.com"}) as fake:
        fake.down = True      # every request answers 503 until set back
        ... fake.url ...      # http://127.0.0.1:PORT/graphql
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class FakeInstruqt:
    """In-process fake Instruqt GraphQL endpoint: start(), point INSTRUQT_GRAPHQL_URL at url."""

    def __init__(
        self,
        key: str = "instruqt-test-key",
        emails: dict[str, str] | None = None,
        team: str = "acme",
        details: dict[str, dict[str, str]] | None = None,
    ):
        self.key = key
        self.emails: dict[str, str] = dict(emails or {})  # user id -> profile email
        self.team = team
        self.details: dict[str, dict[str, str]] = dict(details or {})  # user id -> details
        self.broken: set[str] = set()  # user ids whose lookup answers a GraphQL error
        self.down = False
        self.calls: list[tuple[str, int]] = []  # (user id, status answered)
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

    def answer(self, authorization: str | None, raw: bytes) -> tuple[int, dict[str, Any]]:
        """Status and JSON body for one POST."""
        try:
            request = json.loads(raw)
            user_id = str(request["variables"]["userID"])
            team = str(request["variables"]["teamSlug"])
            query = str(request["query"])
        except (ValueError, KeyError, TypeError):
            return 400, {"errors": [{"message": "malformed GraphQL request"}]}
        status, body = self._answer(authorization, user_id, team, query)
        with self._lock:
            self.calls.append((user_id, status))
        return status, body

    def _answer(
        self, authorization: str | None, user_id: str, team: str, query: str
    ) -> tuple[int, dict[str, Any]]:
        if self.down:
            return 503, {"errors": [{"message": "service unavailable"}]}
        if authorization != f"Bearer {self.key}":
            return 401, {"errors": [{"message": "unauthorized"}]}
        if "user(userID: $userID)" not in query or "details(teamSlug: $teamSlug)" not in query:
            return 400, {"errors": [{"message": "unexpected query"}]}
        if user_id in self.broken:
            error = {"message": f"resolver failed for {user_id}", "path": ["user"]}
            return 200, {"data": None, "errors": [error]}
        if user_id not in self.emails and user_id not in self.details:
            return 200, {"data": {"user": None}}
        profile = {"email": self.emails.get(user_id), "display_name": user_id}
        details = self.details.get(user_id) if team == self.team else None
        return 200, {"data": {"user": {"id": user_id, "details": details, "profile": profile}}}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet."""

    def do_POST(self) -> None:
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        fake: FakeInstruqt = self.server.fake  # type: ignore[attr-defined]
        status, body = fake.answer(self.headers.get("Authorization"), raw)
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
