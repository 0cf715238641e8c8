"""Trying it out: `dev` runs everything locally, `send-example` posts a signed event."""

from __future__ import annotations

import json
import os
import re
import time
import uuid
from datetime import UTC, datetime
from typing import Any

import click
import requests
from svix.webhooks import Webhook

from instruqt_crm.config import Settings
from instruqt_crm.engine.queueing import connect
from instruqt_crm.mapping.errors import suggest
from instruqt_crm.ops.examples import example_event, example_types
from instruqt_crm.receiver import create_app

from .common import DEFAULT_URL, LOCAL_REDIS, settings_or_exit, webhook_secret_or_exit
from .devstack import (
    DEV_DIR,
    SECRET_FILE,
    DevError,
    DevStack,
    Stopped,
    dev_secret,
    running_dev,
    stop_signals,
)

EXAMPLE_EMAIL = "ada@example.com"


@click.command(short_help="Run receiver + worker + embedded Redis locally.")
@click.option("--port", default=8000, show_default=True, help="Port for the local receiver.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to bind.")
def dev(port: int, host: str) -> None:
    """Run receiver + worker + embedded Redis locally (CRM: dry run unless credentials are set).

    The worker restarts with the mapping when its file changes and passes the check.
    Ctrl-C, SIGTERM or SIGHUP stop every process it started.
    """
    env = dict(os.environ)
    origin = "from INSTRUQT_WEBHOOK_SECRET"
    if not env.get("INSTRUQT_WEBHOOK_SECRET"):
        try:
            env["INSTRUQT_WEBHOOK_SECRET"] = dev_secret()
        except DevError as exc:
            raise click.ClickException(str(exc)) from None
        origin = f"local test secret, kept in {DEV_DIR / SECRET_FILE}"
    os.environ.update(env)
    settings_or_exit()  # a bad setting stops `dev` before it starts anything
    stack = DevStack(env, click.echo)
    webhook_url = f"http://{host}:{port}/webhooks/instruqt"
    try:
        with stop_signals():
            try:
                os.environ["REDIS_URL"] = stack.redis_url(LOCAL_REDIS)
                settings = settings_or_exit()
                app = create_app(settings)
                stack.start_worker()
                stack.watch_mapping(settings.mapping_path, connect(settings))
                stack.remember(webhook_url)
                _banner(webhook_url, env["INSTRUQT_WEBHOOK_SECRET"], origin, settings)
                app.run(host=host, port=port, threaded=True, use_reloader=False)
            finally:
                stack.stop()
    except Stopped as exc:
        click.echo(f"dev: stopped by {exc}", err=True)


def _banner(webhook_url: str, secret: str, origin: str, settings: Settings) -> None:
    """What `dev` serves, and a line to paste into a second shell."""
    click.echo(f"Webhook URL:    {webhook_url}")
    click.echo(f"Signing secret: {secret}  ({origin})")
    click.echo(f"Redis:          {settings.redis_url}")
    click.echo(f"Mapping:        {settings.mapping_path} (reloaded when the file changes)")
    click.echo(
        f"Try:            INSTRUQT_WEBHOOK_SECRET={secret} instruqt-crm "
        f"send-example track.started --email {EXAMPLE_EMAIL} --url {webhook_url}"
    )


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


class EventType(click.Choice):
    """A known event type; a misspelt one is refused with the closest match."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if value in self.choices:
            return value
        self.fail(
            f"unknown event type {value!r}{suggest(value, self.choices)}; "
            "the known types are listed by: instruqt-crm send-example --help",
            param,
            ctx,
        )


_OS_ERROR = re.compile(r"\[Errno -?\d+\] ([^'\")\]]+)")


def unreachable_message(url: str, exc: requests.RequestException) -> str:
    """One line: why ``url`` could not be reached, whether `dev` runs here, and --url."""
    if isinstance(exc, requests.Timeout):
        why = "no answer within 15 s"
    elif isinstance(exc, requests.ConnectionError):
        found = _OS_ERROR.search(str(exc))
        why = found.group(1).strip().lower() if found else "the connection failed"
    else:
        why = str(exc).splitlines()[0] or type(exc).__name__
    running = running_dev()
    if running is None:
        hint = (
            "instruqt-crm dev is not running here: start it in another shell, "
            "or pass your receiver's webhook URL with --url"
        )
    elif running == url:
        hint = "instruqt-crm dev serves this URL but does not answer: look at its output"
    else:
        hint = f"instruqt-crm dev is running at {running}: pass --url {running}"
    return f"cannot reach {url}: {why}. {hint}"


@click.command("send-example", short_help="Sign and POST a realistic test event.")
@click.argument("event_type", required=False, type=EventType(example_types()))
@click.option("--all", "send_all", is_flag=True, help="Send one event of every known type.")
@click.option("--url", default=DEFAULT_URL, show_default=True, help="The receiver's webhook URL.")
@click.option("--user-id", default="gOGhYjyoPJhINJFOugIgiL4pdzu2", show_default=True)
@click.option(
    "--email", default=None, help="Put this email in the event's custom parameters (any type)."
)
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
            raise click.ClickException(unreachable_message(url, exc)) from None
        click.echo(f"{kind}: {response.status_code} {response.text.strip()}")
        failed += response.status_code >= 300
        time.sleep(0.01)
    if failed:
        raise click.ClickException(f"{failed} event(s) not accepted")
