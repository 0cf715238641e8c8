"""The web process's gunicorn worker (``receiver/web_worker.py``), run from the Procfile:
kept-alive connections, pipelined requests, idle connections, headers that stop arriving,
a slow or silent Redis, stopping."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import threading
import time
import types
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import requests

from instruqt_crm import keys
from instruqt_crm.receiver.web_worker import KeepAliveWorker
from samples.signing import SECRET, signed, track_event
from tests.processes import answer_of, answers, procfile_web, start_web, wait_for
from tests.redis_process import RedisProcess, free_port

pytestmark = pytest.mark.slow
WEBHOOK = "/webhooks/instruqt"


class Web:
    """The Procfile's web command on a free port, against the tests' Redis."""

    def __init__(self, redis_url: str, log: Path, processes: int) -> None:
        self.log = log
        self.port = free_port()
        env = {"INSTRUQT_WEBHOOK_SECRET": SECRET, "REDIS_URL": redis_url}
        self.process = start_web(self.port, env, log, processes)
        healthz = f"http://127.0.0.1:{self.port}/healthz"
        wait_for(lambda: answers(healthz), 30, "gunicorn to answer /healthz")

    def post(self, msg_id: str, timeout: float = 10) -> requests.Response:
        body, headers = signed(track_event(user_id=f"u-{msg_id}"), msg_id=msg_id)
        url = f"http://127.0.0.1:{self.port}{WEBHOOK}"
        return requests.post(url, data=body, headers=headers, timeout=timeout)

    def replaced_a_process(self) -> bool:
        return "WORKER TIMEOUT" in self.log.read_text(errors="replace")

    def stop(self, wait: float = 30) -> None:
        os.killpg(self.process.pid, signal.SIGTERM)
        self.process.wait(timeout=wait)


@pytest.fixture
def one_process(redis_url: str, tmp_path: Path) -> Iterator[Web]:
    """One web process: whatever holds it holds every delivery."""
    web = Web(redis_url, tmp_path / "web.log", processes=1)
    yield web
    if web.process.poll() is None:
        web.stop()


@pytest.fixture
def private_redis() -> Iterator[RedisProcess]:
    server = RedisProcess().start()
    yield server
    if server.process is not None:
        server.process.send_signal(signal.SIGCONT)
    server.stop()


@pytest.fixture
def on_private_redis(private_redis: RedisProcess, tmp_path: Path) -> Iterator[Web]:
    """One web process on a Redis the test can slow down or stop."""
    web = Web(private_redis.url, tmp_path / "web.log", processes=1)
    yield web
    if web.process.poll() is None:
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
    # never freed. A delivery the stuck process had already accepted is reset with it, and
    # sent again, as Svix does with a delivery that got no answer.
    command = procfile_web(one_process.port)
    deadline = time.monotonic() + int(command[command.index("--timeout") + 1]) + 30
    with socket.create_connection(("127.0.0.1", one_process.port), timeout=60) as stalled:
        stalled.sendall(b"POST /webhooks/instruqt HTTP/1.1\r\nHost: localhost\r\n")
        while True:
            try:
                answer = one_process.post("after-stall", timeout=deadline - time.monotonic())
                break
            except requests.ConnectionError:
                assert time.monotonic() < deadline, "no process answered after the stall"
        assert answer.status_code == 202
        assert stalled.recv(4096) == b""  # the replaced process took the stalled request along
    assert one_process.replaced_a_process()


def test_a_redis_that_stops_answering_is_answered_503_before_svix_gives_up(
    on_private_redis: Web, private_redis: RedisProcess
) -> None:
    # Svix waits 15 s for an answer, gunicorn replaces a process whose request passes
    # --timeout (15 s): the delivery client's budget answers well before either
    assert on_private_redis.post("before-stop").status_code == 202
    assert private_redis.process is not None
    private_redis.process.send_signal(signal.SIGSTOP)  # connections open, no reply ever
    try:
        answer = on_private_redis.post("while-stopped", timeout=14)
    finally:
        private_redis.process.send_signal(signal.SIGCONT)
    assert (answer.status_code, answer.json()["reason"]) == (503, "queue unavailable, retry later")
    # Svix's retry: kept now, or already (the script sent before the 503 ran on resuming)
    assert on_private_redis.post("while-stopped").status_code in (200, 202)
    kept = redis.Redis(port=private_redis.port).xrange(keys.INBOX)
    assert [fields[b"id"] for _, fields in kept] == [b"before-stop", b"while-stopped"]
    assert not on_private_redis.replaced_a_process()


def test_requests_ready_at_once_keep_the_heartbeat_going(
    on_private_redis: Web, private_redis: RedisProcess
) -> None:
    # 40 kept-alive connections, each with a request ready in the same turn of the loop,
    # and a Redis that answers each after up to 0.6 s: ~16 s in all, past --timeout
    clients = [
        http.client.HTTPConnection("127.0.0.1", on_private_redis.port, timeout=60)
        for _ in range(40)
    ]
    for client in clients:
        client.connect()
    busy = threading.Event()
    slow = redis.Redis(port=private_redis.port)
    spin = "local t = redis.call('TIME'); local stop_at = t[1] * 1e6 + t[2] + 600000; " + (
        "repeat t = redis.call('TIME') until t[1] * 1e6 + t[2] >= stop_at"
    )

    def keep_redis_busy() -> None:
        while not busy.is_set():
            slow.eval(spin, 0)

    spinner = threading.Thread(target=keep_redis_busy)
    spinner.start()
    try:
        for number, client in enumerate(clients):
            body, headers = signed(track_event(user_id=f"u{number}"), msg_id=f"burst{number}")
            client.request("POST", WEBHOOK, body=body, headers=headers)
        codes = [client.getresponse().status for client in clients]
    finally:
        busy.set()
        spinner.join()
        for client in clients:
            client.close()
    assert codes == [202] * 40
    assert not on_private_redis.replaced_a_process()


def test_a_stopping_worker_closes_connections_that_never_spoke(one_process: Web) -> None:
    # kept-alive connections get 2 s once the worker stops; one that never sent a byte
    # too, not the whole --graceful-timeout (10 s)
    with socket.create_connection(("127.0.0.1", one_process.port), timeout=30) as idle:
        assert one_process.post("before-stop").status_code == 202
        one_process.stop(wait=8)
        assert idle.recv(4096) == b""


def test_http2_is_refused() -> None:
    with pytest.raises(RuntimeError, match="serves HTTP"):
        KeepAliveWorker.check_config(types.SimpleNamespace(http_protocols=["h2", "h1"]), None)
