"""The web process's gunicorn worker: gthread's keep-alive loop, each request answered on the
loop's own thread (the Procfile's ``--worker-class``).

Platform routers keep their connections to a dyno alive (Heroku's Router 2.0 closes them
after 90 s idle), and gunicorn's sync workers close every connection after one request, so
each delivery would pay a new TCP connection. gunicorn's gthread worker keeps connections,
but hands every request to a thread pool and the connection back to its loop: two thread
wake-ups, a pipe write and read and more system calls per request, about a fifth of a
delivery's CPU (bench/README.md). With one request at a time per process, as here, the pool
buys nothing, so this worker answers the request where its loop found it.

What changes against gthread: a new connection waits in the loop's poller until its first
bytes arrive (gthread waits for them on a pool thread), so an idle connection holds nothing;
the heartbeat gunicorn's arbiter watches is renewed before each request, and a request that
holds the loop past ``--timeout`` (headers or a body sent a byte at a time; a body that
stops is answered 408 after ``BODY_READ_SECONDS``, a Redis that does not answer 503 within
the delivery client's budget) gets the worker replaced, as a sync worker would be, where a
stuck pool thread was never freed. A stopping worker closes connections that never sent a
byte with the kept-alive ones. HTTP/2, which serves a connection for its whole life on one
thread, is refused.
"""

from __future__ import annotations

import errno
import selectors
import socket
import time
from concurrent import futures
from functools import partial
from typing import Any

from gunicorn.workers.gthread import TConn, ThreadWorker

HEARTBEAT_SECONDS = 1.0  # renewed at most this often between requests (a file's mtime)


class KeepAliveWorker(ThreadWorker):
    """gunicorn's gthread worker without its thread pool: one request at a time, kept-alive
    connections waiting in the poller between requests."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self._answering = False
        self._beat_at = 0.0

    @classmethod
    def check_config(cls, cfg: Any, log: Any) -> None:
        """Refuse HTTP/2: it would hold the loop for a connection's whole life."""
        if "h2" in cfg.http_protocols:
            raise RuntimeError(f"{cls.__name__} serves HTTP/1.1: drop h2 from --http-protocols")
        super().check_config(cfg, log)

    def _cap_keepalive(self, deadline: float) -> None:
        """On the way out, connections that never sent a byte close with the kept-alive ones
        (both queues stay sorted by timeout)."""
        super()._cap_keepalive(deadline)
        for conn in self.pending_conns:
            conn.timeout = min(conn.timeout, deadline)

    def accept(self, listener: socket.socket) -> None:
        """Take a new connection and let it wait in the poller for its first bytes."""
        try:
            client, address = listener.accept()
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.ECONNABORTED, errno.EWOULDBLOCK):
                raise
            return
        self.nr_conns += 1
        conn = TConn(self.cfg, client, address, listener.getsockname())
        conn.timeout = time.monotonic() + self.cfg.keepalive
        self.pending_conns.append(conn)
        self.poller.register(
            client, selectors.EVENT_READ, partial(self.on_pending_socket_readable, conn)
        )

    def enqueue_req(self, conn: TConn) -> None:
        """Answer the request waiting on ``conn`` now, then keep or close the connection as
        gthread does. A request pipelined behind it is answered at the loop's next turn,
        not by recursion."""
        if self._answering:
            self.method_queue.defer(self.enqueue_req, conn)
            return
        self._heartbeat()
        self._answering = True
        try:
            answered: futures.Future[object] = futures.Future()
            answered.set_result(self.handle(conn))  # handle() answers errors itself
            self.finish_request(conn, answered)
        finally:
            self._answering = False

    def _heartbeat(self) -> None:
        """Tell the arbiter this worker is alive (the loop does so once per turn, but the
        requests one turn found ready may together take longer than ``--timeout``)."""
        now = time.monotonic()
        if now - self._beat_at >= HEARTBEAT_SECONDS:
            self._beat_at = now
            self.notify()
