"""The web process's gunicorn worker (``receiver/web_worker.py``), run from the Procfile:
kept-alive connections, pipelined requests, idle connections, headers that stop arriving."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from samples.signing import SECRET, signed, track_event
from tests.processes import answer_of, procfile_web, start_web, wait_for
from tests.redis_process import free_port

pytestmark = pytest.mark.slow
WEBHOOK = "/webhooks/instruqt"


class Web:
    """The Procfile's web command on a free port, against the tests' Redis."""

    def __init__(self, redis_url: str, log: Path, processes: int) -> None:
        self.port = free_port()
        env = {"INSTRUQT_WEBHOOK_SECRET": SECRET, "REDIS_URL": redis_url}
        self.process = start_web(self.port, env, log, processes)
        wait_for(self.answers, 30, "gunicorn to answer /healthz")

    def answers(self) -> bool:
        try:
            return requests.get(f"http://127.0.0.1:{self.port}/healthz", timeout=2).ok
        except requests.RequestException:
            return False

    def stop(self) -> None:
        os.killpg(self.process.pid, signal.SIGTERM)
        self.process.wait(timeout=30)


@pytest.fixture
def one_process(redis_url: str, tmp_path: Path) -> Iterator[Web]:
    """One web process: whatever holds it holds every delivery."""
    web = Web(redis_url, tmp_path / "web.log", processes=1)
    yield web
    web.stop()


def raw_request(msg_id: str) -> bytes:
    """A signed delivery as the bytes of one HTTP/1.1 request."""
    body, headers = signed(track_event(user_id=f"u-{msg_id}"), msg_id=msg_id)
    head = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
    return (
        f"POST {WEBHOOK} HTTP/1.1\r\nHost: localhost\r\nContent-Length: {len(body)}\r\n{head}\r\n"
    ).encode() + body


def test_the_procfile_runs_the_keep_alive_worker() -> None:
    command = procfile_web(8000)
    assert command[command.index("--worker-class") + 1] == (
        "instruqt_crm.receiver.web_worker.KeepAliveWorker"
    )


def test_one_connection_carries_every_delivery(one_process: Web) -> None:
    client = http.client.HTTPConnection("127.0.0.1", one_process.port, timeout=10)
    client.connect()
    kept = client.sock
    for number in range(20):
        body, headers = signed(track_event(user_id=f"u{number}"), msg_id=f"kept{number}")
        client.request("POST", WEBHOOK, body=body, headers=headers)
        answer = client.getresponse()
        assert (answer.status, json.loads(answer.read())["id"]) == (202, f"kept{number}")
        assert answer.getheader("Connection", "").lower() != "close"
    assert client.sock is kept  # never reconnected
    client.close()


def test_pipelined_requests_are_each_answered_in_order(one_process: Web) -> None:
    with socket.create_connection(("127.0.0.1", one_process.port), timeout=10) as client:
        client.sendall(b"".join(raw_request(f"piped{number}") for number in range(3)))
        answers = [answer_of(client) for _ in range(3)]
    assert [head.split(b" ")[1] for head, _ in answers] == [b"202"] * 3
    assert [json.loads(body)["id"] for _, body in answers] == ["piped0", "piped1", "piped2"]


def test_an_idle_connection_holds_nothing(one_process: Web) -> None:
    # gunicorn's gthread worker gives a new connection a thread that waits up to 5 s for its
    # first bytes; here it waits in the poller, so a delivery on another connection is
    # answered meanwhile (well within those 5 s), then the idle one is served when it speaks
    with socket.create_connection(("127.0.0.1", one_process.port), timeout=10) as idle:
        body, headers = signed(track_event(user_id="u-busy"), msg_id="while-idle")
        answer = requests.post(
            f"http://127.0.0.1:{one_process.port}{WEBHOOK}", data=body, headers=headers, timeout=4
        )
        assert answer.status_code == 202
        idle.sendall(raw_request("idle-then-spoke"))
        head, body = answer_of(idle)
    assert head.startswith(b"HTTP/1.1 202"), head
    assert json.loads(body)["id"] == "idle-then-spoke"


def test_headers_that_stop_arriving_hold_the_process_until_gunicorn_replaces_it(
    one_process: Web,
) -> None:
    # the request holds the process's loop, so its heartbeat stops and gunicorn's arbiter
    # replaces it after the Procfile's --timeout (15 s); a gthread pool thread stuck so was
    # never freed
    command = procfile_web(one_process.port)
    timeout = int(command[command.index("--timeout") + 1])
    with socket.create_connection(("127.0.0.1", one_process.port), timeout=60) as stalled:
        stalled.sendall(b"POST /webhooks/instruqt HTTP/1.1\r\nHost: localhost\r\n")
        body, headers = signed(track_event(user_id="u-after"), msg_id="after-stall")
        answer = requests.post(
            f"http://127.0.0.1:{one_process.port}{WEBHOOK}",
            data=body,
            headers=headers,
            timeout=timeout + 30,
        )
        assert answer.status_code == 202
        assert stalled.recv(4096) == b""  # the replaced process took the stalled request along
