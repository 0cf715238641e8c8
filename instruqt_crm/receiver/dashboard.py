"""The RQ dashboard at /rq, reading our queues with JSON, never with pickle.

rq-dashboard 0.9 reads jobs with RQ's default serializer, pickle, on some routes whatever
serializer it is given: a job hash written into Redis would run code in the web process
when an operator opens, deletes or requeues it. Those routes are served by the views here,
which read with JSON (and requeue all failed jobs by POST only). Its other routes use the
serializer set in ``mount_dashboard`` or read no job; tests/test_untrusted_redis.py calls
every route with a booby-trapped job and worker in Redis. The login and same-origin checks
in front of it are ``pages``'.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import redis
from flask import (
    Flask,
    Response,
    current_app,
    jsonify,
    make_response,
    render_template,
    request,
    url_for,
)
from redis.connection import SSLConnection
from rq.exceptions import InvalidJobOperation, NoSuchJobError
from rq.job import Job, requeue_job
from rq.registry import (
    BaseRegistry,
    CanceledJobRegistry,
    DeferredJobRegistry,
    FailedJobRegistry,
    FinishedJobRegistry,
    ScheduledJobRegistry,
    StartedJobRegistry,
)
from rq.serializers import JSONSerializer
from rq.worker import Worker

from instruqt_crm.engine.queueing import queue
from instruqt_crm.keys import text

NOT_JSON = "(not JSON: not read)"


def shown_url(conn: redis.Redis) -> str:
    """Where ``conn`` goes, as the dashboard shows it (never with the password)."""
    kwargs = conn.connection_pool.connection_kwargs
    db = kwargs.get("db", 0)
    if kwargs.get("path"):
        return f"unix://{kwargs['path']}?db={db}"
    scheme = (
        "rediss" if issubclass(conn.connection_pool.connection_class, SSLConnection) else "redis"
    )
    return f"{scheme}://{kwargs.get('host', '127.0.0.1')}:{kwargs.get('port', 6379)}/{db}"


def _conn() -> redis.Redis:
    conn: redis.Redis = current_app.extensions["instruqt_crm"]["redis"]
    return conn


def _answer(status_code: int = 200, **fields: Any) -> Response:
    response = jsonify(**fields)
    response.status_code = status_code
    response.headers["Cache-Control"] = "no-store"
    return response


def _delete_job(job_id: str, registry: BaseRegistry | None = None) -> str:
    if current_app.config.get("RQ_DASHBOARD_DISABLE_DELETE"):
        return "DISABLED"
    try:
        Job.fetch(job_id, connection=_conn(), serializer=JSONSerializer).delete()
    except NoSuchJobError:
        if registry is not None:
            registry.remove(job_id)
        return "ERROR"
    return "OK"


def _requeue(job_id: str) -> bool:
    try:
        requeue_job(job_id, connection=_conn(), serializer=JSONSerializer)
    except (NoSuchJobError, InvalidJobOperation):
        return False
    return True


def dashboard_job_view(instance_number: int, job_id: str) -> Response:
    """A job's page (its details come from job_info, which reads with JSON)."""
    from rq_dashboard import web

    if not Job.exists(job_id, _conn()):
        return _answer(404, status="not found", reason="no such job")
    response = make_response(
        render_template(
            "rq_dashboard/job.html",
            current_instance=instance_number,
            instance_list=web.escape_format_instance_list(
                current_app.config.get("RQ_DASHBOARD_REDIS_URL")
            ),
            id=job_id,
            rq_url_prefix=url_for("rq_dashboard.queues_overview"),
            rq_dashboard_version=web.rq_dashboard_version,
            rq_version=web.rq_version,
            deprecation_options_usage=current_app.config.get("DEPRECATED_OPTIONS", False),
            enable_delete=not current_app.config.get("RQ_DASHBOARD_DISABLE_DELETE"),
        )
    )
    response.headers["Cache-Control"] = "no-store"
    return response


def dashboard_job_info(instance_number: int, job_id: str) -> Response:
    """A job's details, read with JSON: a meta or result that is not JSON shows as such
    (rq-dashboard's own view failed on them)."""
    from rq_dashboard import web

    try:
        job = Job.fetch(job_id, connection=_conn(), serializer=JSONSerializer)
    except NoSuchJobError:
        return _answer(404, status="not found", reason="no such job")
    try:
        latest = job.latest_result()
        result = latest.return_value if latest is not None else None
    except Exception:  # a result entry that is not JSON
        latest, result = None, NOT_JSON
    encoder = current_app.config.get("RQ_DASHBOARD_JSON_ENCODER", json.JSONEncoder)
    fields: dict[str, Any] = {
        "id": job.id,
        "created_at": web.serialize_date(job.created_at),
        "enqueued_at": web.serialize_date(job.enqueued_at),
        "started_at": web.serialize_date(job.started_at),
        "ended_at": web.serialize_date(job.ended_at),
        "origin": job.origin,
        "status": job.get_status(),
        "result": result,
        "exc_info": latest.exc_string if latest is not None else None,
        "description": web.format_job_description(job),
        "metadata": json.dumps(job.meta, cls=encoder, default=lambda _: NOT_JSON),
    }
    dependencies = [text(raw).split(":")[-1].strip() for raw in job.dependency_ids]
    if dependencies:
        fields["depends_on"] = dependencies
        fields["depends_on_status"] = [
            "active" if Job.exists(dep, _conn()) else "expired" for dep in dependencies
        ]
    return _answer(**fields)


def dashboard_delete_job(job_id: str) -> Response:
    """Delete one job."""
    return _answer(status=_delete_job(job_id))


def dashboard_requeue_job(job_id: str) -> Response:
    """Requeue one failed job."""
    return _answer(status="OK" if _requeue(job_id) else "ERROR")


def dashboard_requeue_all(queue_name: str) -> Response:
    """Requeue every failed job of a queue: by POST only (rq-dashboard also took a GET)."""
    if request.method != "POST":
        response = _answer(405, status="method not allowed", reason="requeue all by POST")
        response.headers["Allow"] = "POST"
        return response
    registry = FailedJobRegistry(queue_name, connection=_conn(), serializer=JSONSerializer)
    job_ids = registry.get_job_ids(cleanup=False)
    return _answer(status="OK", count=sum(_requeue(job_id) for job_id in job_ids))


REGISTRIES: dict[str, type[BaseRegistry]] = {
    "failed": FailedJobRegistry,
    "deferred": DeferredJobRegistry,
    "started": StartedJobRegistry,
    "finished": FinishedJobRegistry,
    "canceled": CanceledJobRegistry,
    "scheduled": ScheduledJobRegistry,
}


def dashboard_empty_queue(queue_name: str, registry_name: str) -> Response:
    """Delete every job of a queue, or of one of its registries."""
    if current_app.config.get("RQ_DASHBOARD_DISABLE_DELETE"):
        return _answer(status="DISABLED")
    if registry_name == "queued":
        queue(queue_name, _conn()).empty()
    elif registry_name in REGISTRIES:
        registry = REGISTRIES[registry_name](
            queue_name, connection=_conn(), serializer=JSONSerializer
        )
        for job_id in registry.get_job_ids(cleanup=False):
            _delete_job(job_id, registry)
    return _answer(status="OK")


def dashboard_list_workers(instance_number: int) -> Response:
    """The workers, with the job each is running read with JSON."""
    from rq_dashboard import web

    workers = [
        {
            "name": worker.name,
            "pid": worker.pid,
            "queues": [q.name for q in worker.queues],
            "state": str(worker.get_state()),
            "current_job": web.serialize_current_job(worker.get_current_job()),
            "last_heartbeat": worker.last_heartbeat,
            "birth_date": worker.birth_date,
            "successful_job_count": worker.successful_job_count,
            "failed_job_count": worker.failed_job_count,
            "total_working_time": worker.total_working_time,
            "version": getattr(worker, "version", ""),
            "python_version": getattr(worker, "python_version", ""),
        }
        for worker in Worker.all(connection=_conn(), serializer=JSONSerializer)
    ]
    workers.sort(key=lambda w: (w["state"], w["queues"], w["name"]))
    return _answer(workers=workers)


DASHBOARD_VIEWS: dict[str, Callable[..., Response]] = {
    "rq_dashboard.job_view": dashboard_job_view,
    "rq_dashboard.job_info": dashboard_job_info,
    "rq_dashboard.delete_job_view": dashboard_delete_job,
    "rq_dashboard.requeue_job_view": dashboard_requeue_job,
    "rq_dashboard.requeue_all": dashboard_requeue_all,
    "rq_dashboard.empty_queue": dashboard_empty_queue,
    "rq_dashboard.list_workers": dashboard_list_workers,
}


def mount_dashboard(app: Flask, conn: redis.Redis) -> None:
    """Register rq-dashboard at /rq, reading our queues with the JSON serializer, its
    job-reading routes served by our views (``DASHBOARD_VIEWS``)."""
    import rq_dashboard
    from rq_dashboard.web import config as dashboard_config

    app.config.from_object(rq_dashboard.default_settings)
    app.config["RQ_DASHBOARD_REDIS_URL"] = (shown_url(conn),)  # shown on its pages only
    dashboard_config.serializer = JSONSerializer
    app.redis_conn = conn  # type: ignore[attr-defined]  # where rq-dashboard looks for it
    app.register_blueprint(rq_dashboard.blueprint, url_prefix="/rq")
    for endpoint, view in DASHBOARD_VIEWS.items():
        if endpoint not in app.view_functions:  # renamed by a new rq-dashboard: check them all
            raise RuntimeError(f"rq-dashboard has no {endpoint} route to replace")
        app.view_functions[endpoint] = view

    def use_the_apps_connection() -> Response | None:
        """In place of rq-dashboard's own hook, which builds a client from the URL on every
        request: its pages use the app's connection (its TLS settings, its pool), never a
        client a concurrent request could catch half set up. One Redis: instance 0 only."""
        if (request.view_args or {}).get("instance_number", 0) != 0:
            response = jsonify(status="not found", reason="one Redis instance: /rq/0/...")
            response.status_code = 404
            return response
        app.redis_conn = conn  # type: ignore[attr-defined]
        return None

    app.before_request_funcs[rq_dashboard.blueprint.name] = [use_the_apps_connection]
