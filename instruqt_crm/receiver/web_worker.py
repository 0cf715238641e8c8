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
a request that holds the loop (headers sent slowly: the body is bounded by
``BODY_READ_SECONDS``) stops the worker's heartbeat, and gunicorn's arbiter replaces the
worker after ``--timeout``, as it would a sync worker, where a stuck pool thread was never
freed.
"""

from __future__ import annotations

import errno
import selectors
import socket
import time
from concurrent import futures
from functools import partial

from gunicorn.workers.gthread import TConn, ThreadWorker


class KeepAliveWorker(ThreadWorker):
    """gunicorn's gthread worker without its thread pool: one request at a time, kept-alive
    connections waiting in the poller between requests."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self._answering = False

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
        self._answering = True
        try:
            answered: futures.Future[object] = futures.Future()
            answered.set_result(self.handle(conn))  # handle() answers errors itself
            self.finish_request(conn, answered)
        finally:
            self._answering = False
