"""How many Redis connections a deployment holds: Heroku Redis mini allows 20.

    python -m bench.connections                 # --seconds 120 (default)

The Procfile's web (gunicorn, WEB_CONCURRENCY's default) and one ``python worker.py``, on a
TLS-only redis-server with a self-signed certificate and app.json's config vars (as the
Heroku button sets them up), with the dashboard open (its queue page polled every 2 s, as the
page itself does) and a signed event every second (``--clients N``: N clients posting as
fast as the receiver answers). Every 0.5 s the server's CLIENT LIST is read; the peak and
the clients at the peak (by the command they last ran) are printed.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import requests

from samples.signing import SECRET, signed, track_event
from tests.processes import Workers, start_web, wait_for
from tests.redis_process import TlsRedisProcess, free_port
from tests.test_redis_tls import LOGIN, app_json_defaults, basic

ROOT = Path(__file__).resolve().parent.parent


def ready(url: str) -> bool:
    """Whether the URL answers 200."""
    try:
        return requests.get(url, timeout=1).status_code == 200
    except requests.RequestException:
        return False


def post_events(base: str, number: int, stop: threading.Event, clients: int) -> None:
    """Post signed events until stopped: one a second with one client, else as fast as the
    receiver answers."""
    with requests.Session() as session:
        count = 0
        while not stop.is_set():
            user = f"u{number}-{count}"
            body, headers = signed(track_event(user, params={"email": f"{user}@x.io"}))
            session.post(f"{base}/webhooks/instruqt", data=body, headers=headers)
            count += 1
            if clients == 1:
                stop.wait(1.0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=120.0, help="how long to watch")
    parser.add_argument(
        "--clients", type=int, default=1, help="posting clients (1: one event a second)"
    )
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="bench-connections-"))
    server = TlsRedisProcess().start()
    env = {
        **app_json_defaults(),
        **LOGIN,
        "REDIS_URL": server.url,
        "INSTRUQT_WEBHOOK_SECRET": SECRET,
        "DRY_RUN_PATH": str(folder / "dry-run.jsonl"),
    }
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    web = start_web(port, env, folder / "web.log")
    peak, at_peak, samples = 0, Counter[str](), 0
    try:
        wait_for(lambda: ready(f"{base}/readyz"), 30, "gunicorn to be ready")
        with Workers(env, 1, folder), requests.Session() as dashboard:
            login = basic(LOGIN["RQ_DASHBOARD_USERNAME"], LOGIN["RQ_DASHBOARD_PASSWORD"])
            stop = threading.Event()
            posters = [
                threading.Thread(target=post_events, args=(base, n, stop, args.clients))
                for n in range(args.clients)
            ]
            for poster in posters:
                poster.start()
            watcher = server.client()
            start = time.monotonic()
            while time.monotonic() - start < args.seconds:
                dashboard.get(f"{base}/rq/0/data/queues.json", headers=login)  # every ~2 s
                for _ in range(4):
                    clients = [c for c in watcher.client_list() if c["cmd"] != "client|list"]
                    samples += 1
                    if len(clients) > peak:
                        peak, at_peak = len(clients), Counter(c["cmd"] for c in clients)
                    time.sleep(0.5)
            stop.set()
            for poster in posters:
                poster.join()
    finally:
        os.killpg(web.pid, signal.SIGTERM)
        web.wait(timeout=20)
        server.stop()
    print(
        f"== Redis connections: web (Procfile) + 1 worker + dashboard, {args.seconds:.0f} s, "
        f"{args.clients} posting client(s)"
    )
    print(f"  samples {samples}, peak {peak} (Heroku Redis mini allows 20)")
    print(
        "  at the peak, by last command: " + ", ".join(f"{k} {v}" for k, v in at_peak.most_common())
    )
    print(f"  logs in {folder}")
    return 0 if peak <= 20 else 1


if __name__ == "__main__":
    sys.exit(main())
