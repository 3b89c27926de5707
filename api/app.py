"""The FastAPI application: built by a factory, its resources made in the lifespan."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from types import FrameType
from typing import Any

from fastapi import FastAPI

from api import errors, metrics, openai_compat, openapi, request_ids
from api.deps import Resources
from api.events import StreamSlots
from api.routes import batches, citations, console, deliveries, health, jobs, webhooks
from api.routes import openai_compat as openai_routes
from api.service import Submitter
from api.tenant_limits import QueueCap, build_rate_limiter
from api.uploads import UploadSlots
from api.webhook_urls import WebhookUrlGuard
from pcq.db import make_engine, make_session_factory
from pcq.queue import DispatchWake, Enqueuer, make_celery
from pcq.settings import Settings, get_settings

# How long a request waits for a pooled database connection before it answers 503 with
# Retry-After (SQLAlchemy's default is 30 s): a saturated pool says so at once.
POOL_TIMEOUT_SECONDS = 3.0


def build_resources(settings: Settings) -> Resources:
    sqlite = settings.database_url.startswith("sqlite")
    db_engine = make_engine(
        settings.database_url, **({} if sqlite else {"pool_timeout": POOL_TIMEOUT_SECONDS})
    )
    sessions = make_session_factory(db_engine)
    redis_client: Any | None = None
    if settings.redis_url:
        import redis

        redis_client = redis.Redis.from_url(settings.redis_url, socket_timeout=2, socket_connect_timeout=2)
    return Resources(
        settings=settings,
        db_engine=db_engine,
        sessions=sessions,
        submitter=Submitter(
            sessions,
            DispatchWake(redis_client, settings.queue_name),
            max_batch_lines=settings.max_batch_lines,
            max_line_bytes=settings.max_request_bytes,
            queue_cap=QueueCap.from_settings(settings),
            # Sends a single job's message while the dispatcher says nothing waits (Redis only).
            direct=Enqueuer(make_celery(settings, publisher=True), settings.queue_name)
            if redis_client
            else None,
            uploads=UploadSlots(settings.max_uploads_per_tenant, settings.max_uploads),
            webhook_urls=WebhookUrlGuard(allow_private=settings.webhook_allow_private),
            prices=settings.prices,
        ),
        redis=redis_client,
        event_streams=StreamSlots(settings.sse_max_streams_per_tenant),
        rate_limiter=build_rate_limiter(settings, redis_client),
    )


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        res = build_resources(settings)
        app.state.resources = res
        app.state.metrics.fleet.start(res.sessions)
        try:
            yield
        finally:
            app.state.metrics.fleet.stop()
            res.db_engine.dispose()
            res.submitter.webhook_urls.close()
            if res.redis is not None:
                res.redis.close()

    app = FastAPI(
        title="pcq",
        summary="A durable job service for Parallel's Chat Completions API.",
        version="0.1.0",
        lifespan=lifespan,
    )
    errors.install(app)
    openapi.install(app)
    for module in (jobs, batches, citations, webhooks, deliveries, health, metrics, console, openai_routes):
        app.include_router(module.router)
    app.add_middleware(errors.RejectNul)
    app.add_middleware(
        errors.BodyLimit,
        default_limit=settings.max_request_bytes,
        batch_limit=settings.max_batch_bytes,
        upload_timeout=settings.upload_timeout_seconds,
    )
    openai_compat.install(app)  # outside BodyLimit: its 413 and 408 get OpenAI's shape under /openai
    # Outermost, so it counts what the middlewares above answer (413, 408, 422) too.
    app.state.metrics = metrics.ApiMetrics(
        metrics.FleetCollector(totals_interval=settings.metrics_totals_seconds)
    )
    app.add_middleware(metrics.HttpMetrics, metrics=app.state.metrics)
    request_ids.install(app)
    return app


def serve(app: FastAPI, *, host: str, port: int, log_level: str) -> None:
    """Run the app with uvicorn (``pcq api``). On SIGTERM or SIGINT uvicorn waits for open
    responses to finish; an event stream would hold it until its batch ends, so the streams are
    told first (``Resources.draining``) and end at their next poll: their clients reconnect,
    with Last-Event-ID, to another API process."""
    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            res: Resources | None = getattr(app.state, "resources", None)
            if res is not None:
                res.draining.set()
            super().handle_exit(sig, frame)

    # log_config=None: uvicorn's lines, access lines included, go to the root logger's handler
    # (pcq.logs.configure), in PCQ_LOG_FORMAT and with the request's id, not to its own.
    Server(uvicorn.Config(app, host=host, port=port, log_level=log_level, log_config=None)).run()
