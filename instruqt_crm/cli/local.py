"""Trying it out: `dev` runs everything locally, `send-example` posts a signed event."""

from __future__ import annotations

import base64
import json
import os
import secrets
import signal
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime

import click
import requests
from svix.webhooks import Webhook

from instruqt_crm.engine.queueing import EmbeddedRedis
from instruqt_crm.ops.examples import example_event, example_types
from instruqt_crm.receiver import create_app

from .common import DEFAULT_URL, LOCAL_REDIS, settings_or_exit, webhook_secret_or_exit


@click.command(short_help="Run receiver + worker + embedded Redis locally.")
@click.option("--port", default=8000, show_default=True, help="Port for the local receiver.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to bind.")
def dev(port: int, host: str) -> None:
    """Run receiver + worker + embedded Redis locally (CRM: dry run unless credentials are set)."""
    env = dict(os.environ)
    if not env.get("INSTRUQT_WEBHOOK_SECRET"):
        env["INSTRUQT_WEBHOOK_SECRET"] = (
            "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()
        )
    embedded = None
    if not env.get("REDIS_URL"):
        embedded = EmbeddedRedis(LOCAL_REDIS)
        env["REDIS_URL"] = embedded.url
    os.environ.update(env)
    settings = settings_or_exit()
    app = create_app(settings)
    worker = subprocess.Popen([sys.executable, "-m", "instruqt_crm.engine.worker"], env=env)
    click.echo(f"Webhook URL:    http://{host}:{port}/webhooks/instruqt")
    click.echo(f"Signing secret: {env['INSTRUQT_WEBHOOK_SECRET']}  (local test secret)")
    click.echo(f"Redis:          {env['REDIS_URL']}")
    click.echo(
        f"Try:            INSTRUQT_WEBHOOK_SECRET={env['INSTRUQT_WEBHOOK_SECRET']} "
        f"instruqt-crm send-example track.started --url http://{host}:{port}/webhooks/instruqt"
    )
    try:
        app.run(host=host, port=port, threaded=True, use_reloader=False)
    finally:
        worker.send_signal(signal.SIGTERM)
        try:
            worker.wait(timeout=15)
        except subprocess.TimeoutExpired:
            worker.kill()
        if embedded is not None:
            embedded.stop()


def sign_body(secret: str, body: bytes, msg_id: str | None = None) -> dict[str, str]:
    """The headers Svix would send with ``body``."""
    msg_id = msg_id or f"msg_{uuid.uuid4().hex}"
    now = datetime.now(UTC)
    return {
        "svix-id": msg_id,
        "svix-timestamp": str(int(now.timestamp())),
        "svix-signature": Webhook(secret).sign(msg_id, now, body.decode()),
        "Content-Type": "application/json",
    }


@click.command("send-example", short_help="Sign and POST a realistic test event.")
@click.argument("event_type", required=False, type=click.Choice(example_types()))
@click.option("--all", "send_all", is_flag=True, help="Send one event of every known type.")
@click.option("--url", default=DEFAULT_URL, show_default=True, help="The receiver's webhook URL.")
@click.option("--user-id", default="gOGhYjyoPJhINJFOugIgiL4pdzu2", show_default=True)
@click.option("--email", default=None, help="Put this email in the event's custom parameters.")
def send_example(
    event_type: str | None, send_all: bool, url: str, user_id: str, email: str | None
) -> None:
    """Sign a realistic Instruqt event with INSTRUQT_WEBHOOK_SECRET and POST it."""
    if not event_type and not send_all:
        raise click.UsageError("give an EVENT_TYPE or --all")
    secret = webhook_secret_or_exit(settings_or_exit())
    failed = 0
    for kind in example_types() if send_all else (event_type or "",):
        body = json.dumps(example_event(kind, user_id=user_id, email=email)).encode()
        try:
            response = requests.post(url, data=body, headers=sign_body(secret, body), timeout=15)
        except requests.RequestException as exc:
            raise click.ClickException(f"could not reach {url}: {exc}") from None
        click.echo(f"{kind}: {response.status_code} {response.text.strip()}")
        failed += response.status_code >= 300
        time.sleep(0.01)
    if failed:
        raise click.ClickException(f"{failed} event(s) not accepted")
