"""Fuzz the receiver: whatever arrives, never a 5xx, never an enqueue without a valid signature."""

from __future__ import annotations

import io
import json

import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from instruqt_crm.config import Settings
from instruqt_crm.engine.queueing import QUEUE_NAME, queue
from instruqt_crm.receiver.app import create_app
from samples.signing import SECRET, signed

HEADER_NAMES = [
    "svix-id",
    "svix-timestamp",
    "svix-signature",
    "webhook-id",
    "webhook-timestamp",
    "webhook-signature",
]
header_values = st.one_of(
    st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=120),
    st.integers(-(10**30), 10**30).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(str),
    st.just("v1,") | st.just("v1,====") | st.just("v2,abc v1,@@"),
)
bodies = st.one_of(
    st.binary(max_size=2048),
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(max_size=50),
        lambda inner: (
            st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner, max_size=5)
        ),
        max_leaves=30,
    ).map(lambda v: json.dumps(v).encode()),
    st.integers(1, 5000).map(lambda depth: b"[" * depth + b"]" * depth),
    st.integers(1, 5000).map(lambda n: b'{"type": "' + b"x" * n * 10 + b'"}'),
)
content_types = st.sampled_from(
    [
        "application/json",
        "text/plain",
        "",
        "application/x-www-form-urlencoded",
        "application/json; charset=latin-1",
        "application/cloudevents+json",
        "multipart/form-data",
    ]
)


def build_app(redis_url: str, redis_conn: redis.Redis):
    settings = Settings.from_env(
        {"INSTRUQT_WEBHOOK_SECRET": SECRET, "REDIS_URL": redis_url, "MAX_BODY_BYTES": "16384"}
    )
    return create_app(settings, conn=redis_conn)


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    headers=st.dictionaries(st.sampled_from(HEADER_NAMES), header_values),
    body=bodies,
    content_type=content_types,
    chunked=st.booleans(),
)
def test_unsigned_garbage_is_refused_without_5xx(
    redis_url, redis_conn, headers, body, content_type, chunked
) -> None:
    client = build_app(redis_url, redis_conn).test_client()
    kwargs = (
        {"input_stream": io.BytesIO(body), "environ_overrides": {"wsgi.input_terminated": True}}
        if chunked
        else {"data": body}
    )
    response = client.post(
        "/webhooks/instruqt", headers={**headers, "Content-Type": content_type}, **kwargs
    )
    assert response.status_code < 500
    assert response.status_code in (401, 413, 415)
    assert queue(QUEUE_NAME, redis_conn).count == 0


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(body=bodies)
def test_signed_bodies_of_any_shape_never_5xx(redis_url, redis_conn, body) -> None:
    redis_conn.flushdb()
    client = build_app(redis_url, redis_conn).test_client()
    try:
        text = body.decode()
    except UnicodeDecodeError:
        return  # Svix signs text; a non-UTF-8 body can never carry a valid signature
    raw, headers = signed(text)
    response = client.post("/webhooks/instruqt", data=raw, headers=headers)
    assert response.status_code in (202, 400, 413)
    enqueued = queue(QUEUE_NAME, redis_conn).count
    assert enqueued == (1 if response.status_code == 202 else 0)
