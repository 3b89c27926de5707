"""The Celery worker: one task that hands a job id to this process's engine.

``pcq worker`` runs Celery's *threads* pool on purpose: the task only claims the job in the
database and returns, while the calls themselves live in the engine's event loop; a prefork
pool would build one engine (and one sweeper) per child for nothing.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

from celery import Celery
from celery.signals import setup_logging, worker_ready, worker_shutdown, worker_shutting_down

from pcq import logs
from pcq.db import make_engine, make_session_factory
from pcq.queue import RUN_JOB_TASK, Enqueuer, make_celery
from pcq.settings import Settings
from worker.engine import Engine
from worker.metrics import WorkerMetrics, serve

log = logging.getLogger(__name__)


def _redis_factory(settings: Settings) -> Any:
    if settings.redis_url:
        import redis.asyncio

        url = settings.redis_url
        # A blocking pool: thousands of calls ask the limiter at once, and they should queue
        # for one of a few dozen connections, not fail with "Too many connections".
        return lambda: redis.asyncio.Redis(
            connection_pool=redis.asyncio.BlockingConnectionPool.from_url(
                url, max_connections=32, timeout=None
            )
        )
    # Embedded mode has one worker process, so an in-process Redis is a faithful home
    # for the limiter's state: the very same Lua script runs on it.
    import fakeredis

    return lambda: fakeredis.FakeAsyncRedis()


class Runtime:
    """Everything one worker process builds at start and tears down at exit."""

    def __init__(self, settings: Settings, app: Celery) -> None:
        self.settings = settings
        # No pre-ping (a round trip at each checkout, 2 ms of an idle job's 40): the claims and
        # the writes retry a lost connection (Engine._retrying_db), and SQLAlchemy drops the
        # pool's stale connections at the first disconnect it sees after a restart.
        self.db_engine = make_engine(settings.database_url, pool_pre_ping=False)
        metrics = WorkerMetrics()
        self.engine = Engine(
            settings,
            make_session_factory(self.db_engine),
            Enqueuer(app, settings.queue_name),
            _redis_factory(settings),
            metrics,
        )
        self.engine.start()
        # PCQ_METRICS_PORT (0 = off); a port in use is logged and the worker runs on without.
        self.metrics_server = serve(metrics, settings.metrics_host, settings.metrics_port)

    def close(self) -> None:
        try:
            self.engine.stop()
            self.db_engine.dispose()
        finally:
            if self.metrics_server is not None:
                self.metrics_server.shutdown()
                self.metrics_server.server_close()  # the listening socket, too


def create_worker_app(settings: Settings) -> Celery:
    app = make_celery(settings)
    lock = threading.Lock()
    holder: dict[str, Runtime] = {}

    def runtime() -> Runtime:
        with lock:
            if "rt" not in holder:
                holder["rt"] = Runtime(settings, app)
            return holder["rt"]

    @app.task(name=RUN_JOB_TASK, ignore_result=True)
    def run_jobs(job_ids: list[str] | str) -> None:
        # Returns None on purpose: Celery logs return values, and nothing else belongs there.
        runtime().engine.submit([job_ids] if isinstance(job_ids, str) else list(job_ids))

    @setup_logging.connect(weak=False)
    def _keep_our_logging(**_: Any) -> None:
        """A receiver of this signal tells Celery to leave logging alone: it would otherwise
        replace the root logger's handler (pcq.logs.configure, at PCQ_LOG_LEVEL, which is also
        the --loglevel it is given) with its own text format, and send stdout to a logger."""

    @worker_ready.connect(weak=False)
    def _start(**_: Any) -> None:
        runtime()  # start the sweeper even if no message ever arrives

    @worker_shutting_down.connect(weak=False)
    def _stop_claiming(how: str = "", **_: Any) -> None:
        log.info("%s shutdown: claiming no more jobs", how or "a")
        rt = holder.get("rt")  # no lock: this runs in a signal handler
        if rt is not None:
            rt.engine.begin_shutdown()

    @worker_shutdown.connect(weak=False)
    def _stop(**_: Any) -> None:
        with lock:
            rt = holder.pop("rt", None)
        if rt is not None:
            rt.close()

    return app


def run_worker(settings: Settings, *, concurrency: int | None = None, loglevel: str = "INFO") -> None:
    app = create_worker_app(settings)
    argv = [
        "worker",
        "--pool=threads",
        f"--concurrency={concurrency or settings.worker_concurrency}",
        f"--loglevel={loglevel}",
        f"--queues={settings.queue_name}",
        "--without-gossip",
        "--without-mingle",
    ]
    if logs.current_format() == "json":
        # Every line must be an event. Celery writes its start-up banner (unless --quiet) and
        # "worker: Warm shutdown" as text straight to file descriptor 1; our lines go to
        # stderr, so stdout goes nowhere (the shutdown is logged by _stop_claiming instead).
        argv.insert(0, "--quiet")
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.close(devnull)
    if settings.embedded:
        # The SQLite broker has no fan-out, which remote control needs.
        app.conf.worker_enable_remote_control = False
    app.worker_main(argv)
