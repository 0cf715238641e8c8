"""The Redis client a web process keeps for the deliveries it answers.

One connection per process (and thread), kept: it skips the pool's check-out, check-in and
stale-data poll on every delivery, a third of the enqueue's cost in the receiver. Taken at
the first delivery, not at start, so the app starts while Redis is down.

Its budget is tighter than the other clients': Svix waits 15 s for an answer, and gunicorn
replaces a web process whose request runs past the Procfile's ``--timeout`` (15 s), so a
Redis that does not answer must be told to the sender (503, retried by Svix) well before.
Two tries of ``REPLY_SECONDS`` each (a PING first on a connection idle for 30 s, with one
retry of its own), ``CONNECT_SECONDS`` to connect: about 9 s at worst.
"""

from __future__ import annotations

import os
import threading

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

REPLY_SECONDS = 2.0  # a healthy Redis answers a delivery's script in about a millisecond
CONNECT_SECONDS = 1.0
TRIES = 2


def delivery_client(conn: redis.Redis) -> redis.Redis:
    """A client on its own kept connection to ``conn``'s Redis (URL, TLS, health checks
    alike), within the delivery budget."""
    pool = conn.connection_pool
    options = {
        **pool.connection_kwargs,
        "socket_timeout": REPLY_SECONDS,
        "socket_connect_timeout": CONNECT_SECONDS,
        "retry": Retry(ExponentialBackoff(cap=0.25, base=0.05), TRIES - 1),
    }
    own = type(pool)(connection_class=pool.connection_class, **options)
    return redis.Redis(connection_pool=own, single_connection_client=True)


class DeliveryConnection(threading.local):
    """Per thread (and process), the delivery client (``delivery_client``), made on first use
    and made again in a forked child."""

    def __init__(self, conn: redis.Redis) -> None:
        self.conn = conn
        self.kept: tuple[int, redis.Redis] | None = None  # (pid, client): a fork takes anew

    def client(self) -> redis.Redis:
        """This thread's client (a connection error reaches the caller, as any command's)."""
        pid = os.getpid()
        if self.kept is None or self.kept[0] != pid:
            self.kept = (pid, delivery_client(self.conn))
        return self.kept[1]
