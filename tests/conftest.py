"""Shared fixtures: the usual actors, a demo catalog, and the real running stack."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import pytest
import requests

from tests.procs import BIN, Proc, child_env, free_port, port_open, wait_until

PASSWORD = "correct-horse-battery-staple-42"
# pytest-django's live server (the portal in browser tests) on a port known from the start,
# so that the gateway processes can be told the portal's origin (PORTAL_URL, for CORS).
os.environ.setdefault("DJANGO_LIVE_TEST_SERVER_ADDRESS", f"127.0.0.1:{free_port()}")
LIVE_PORTAL_URL = "http://" + os.environ["DJANGO_LIVE_TEST_SERVER_ADDRESS"]
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"


@pytest.fixture(autouse=True)
def _fresh_cache():
    """Throttle counters (django-ratelimit, allauth) must not leak between tests."""
    from django.core.cache import cache

    cache.clear()
    yield
    cache.clear()


@pytest.fixture
def pinned_ratelimit_window(monkeypatch):
    """django-ratelimit counts in fixed windows (ending at hour + crc32(key) % 3600): keep
    each window where it was first computed, so that a test's loop cannot straddle a window
    end and see its counter start over."""
    from django_ratelimit import core

    real = core._get_window
    pinned: dict = {}

    def window(value, period):
        if (value, period) not in pinned:
            pinned[value, period] = real(value, period)
        return pinned[value, period]

    monkeypatch.setattr(core, "_get_window", window)


def make_user(email: str, *, verified: bool = True, password: str = PASSWORD):
    from allauth.account.models import EmailAddress

    from portal.models import User

    user = User.objects.create_user(username=email, email=email, password=password)
    EmailAddress.objects.create(user=user, email=email, verified=verified, primary=True)
    return user


@pytest.fixture
def developer(db):
    """A developer with a verified email."""
    return make_user("dev@example.com")


@pytest.fixture
def stranger(db):
    """Another developer, who must never see the first one's keys."""
    return make_user("stranger@example.com")


def log_event(
    key: int | None,
    api: int = 1,
    status: int = 200,
    *,
    ms: float = 3.0,
    ago: float = 0.0,
    org: int | None = None,
) -> dict:
    """A gateway log event (DESIGN.md's schema) for `ingest_batch`: one call `ago` s ago."""
    import uuid

    return {
        "id": uuid.uuid4().hex,
        "t": time.time() - ago,
        "api": api,
        "route": None,
        "route_path": "/",
        "consumer": None,
        "key": key,
        "org": org,
        "method": "GET",
        "status": status,
        "ms": ms,
        "up_ms": None,
        "in": 0,
        "out": 10,
        "err": "",
    }


@dataclass
class Catalog:
    upstream: object
    api: object
    route: object
    free: object
    pro: object


def make_catalog(upstream_port: int = 9) -> Catalog:
    """An upstream on loopback, the /demo API routed to it, a free and a pro (approval) plan."""
    from django.db import transaction

    from gateway.config import config_bump
    from gateway.models import Api, Route, Target, Upstream
    from portal.models import Plan, RateLimit

    with transaction.atomic():
        upstream = Upstream.objects.create(name="echo", read_timeout=5, connect_timeout=2)
        Target.objects.create(upstream=upstream, host="127.0.0.1", port=upstream_port)
        api = Api.objects.create(name="Demo", slug="demo", path_prefix="/demo", upstream=upstream)
        route = Route.objects.create(api=api, name="all", path="/")
        free = Plan.objects.create(name="Free", slug="free", quota_limit=10_000)
        RateLimit.objects.create(plan=free, limit=1000, window="minute", burst=999)
        pro = Plan.objects.create(name="Pro", slug="pro", requires_approval=True)
        free.apis.add(api)
        pro.apis.add(api)
        config_bump(reason="test catalog")
    return Catalog(upstream, api, route, free, pro)


@pytest.fixture
def catalog(db) -> Catalog:
    return make_catalog()


def set_rate_limit(
    *,
    limit: int,
    window: str = "minute",
    burst: int | None = None,
    scope: str = "key",
    plan=None,
    route=None,
) -> None:
    """Put one rate limit in place of the rule of the same scope and window, with a config
    bump; `burst` defaults to limit - 1 (the whole window's worth at once)."""
    from django.db import transaction

    from gateway.config import config_bump
    from portal.models import RateLimit

    with transaction.atomic():
        RateLimit.objects.update_or_create(
            plan=plan,
            route=route,
            scope=scope,
            window=window,
            defaults={"limit": limit, "burst": limit - 1 if burst is None else burst},
        )
        config_bump(reason=f"rate limit {limit}/{window}")


def active_key(user, plan, *, name: str = "test"):
    """Subscribe `user` to `plan` (approving if needed) and issue a key; returns IssuedKey."""
    from portal.consumers import consumer_for_user
    from portal.keys import key_issue
    from portal.subscriptions import subscription_approve, subscription_create

    sub = subscription_create(consumer_for_user(user), plan=plan)
    if sub.status == "pending":
        sub = subscription_approve(sub)
    return key_issue(sub, name=name)


# --- the real stack: demo upstream, gateway under gunicorn, Celery worker and beat -----------
@dataclass
class Stack:
    gateway_url: str
    gateway_port: int
    upstream_port: int
    procs: dict[str, Proc]
    env: dict[str, str]
    ops_port: int

    def ops(self, path: str) -> requests.Response:
        return requests.get(f"http://127.0.0.1:{self.ops_port}{path}", timeout=10)

    def get(self, path: str, **kw) -> requests.Response:
        return requests.get(self.gateway_url + path, timeout=10, **kw)

    def logs(self) -> str:
        return "\n".join(f"--- {n}\n{p.output()[-3000:]}" for n, p in self.procs.items())

    def ingest_backlog(self) -> int:
        """Events shipped by the gateway that Celery has not finished ingesting."""
        from django.conf import settings

        if settings.REDIS_URL:
            import redis

            client = redis.Redis.from_url(settings.REDIS_URL)
            try:
                stream = settings.GATEWAY["LOG_STREAM"]
                if not client.exists(stream):
                    return 0
                groups = client.xinfo_groups(stream)
                pending = sum(g["pending"] for g in groups)
                return client.xlen(stream) + pending
            finally:
                client.close()
        return len(list((Path(self.env["VAR_DIR"]) / "spool").glob("[0-9]*.json")))

    def wait_ingest_idle(self, timeout: float = 30) -> None:
        """Wait until the log pipeline is drained, so that no ingest transaction is open when
        the test database is flushed (TRUNCATE against an open ingest could deadlock)."""
        _wait_stable(
            self,
            lambda: self.ingest_backlog() == 0,
            timeout=timeout,
            what="the log pipeline to drain",
        )


def _database_url() -> str:
    from django.db import connection

    db = connection.settings_dict
    if db["ENGINE"].endswith("sqlite3"):
        return f"sqlite:///{Path(db['NAME']).resolve()}"
    auth = quote(db["USER"] or "", safe="")
    if db["PASSWORD"]:
        auth += ":" + quote(db["PASSWORD"], safe="")
    return f"postgres://{auth}@{db['HOST'] or '127.0.0.1'}:{db['PORT'] or 5432}/{db['NAME']}"


@pytest.fixture(scope="module")
def stack(request, django_db_setup, django_db_blocker, tmp_path_factory):
    """The stack for one test module; a module's STACK_ENV dict adds to its environment."""
    from django.conf import settings

    if settings.REDIS_URL:
        import redis

        redis.Redis.from_url(settings.REDIS_URL).flushdb()
    var = tmp_path_factory.mktemp("stack-var")
    upstream_port, gateway_port, ops_port = free_port(), free_port(), free_port()
    env = child_env(
        DATABASE_URL=_database_url(),
        SECRET_KEY=settings.SECRET_KEY,
        API_KEY_HMAC_SECRET=settings.API_KEY_HMAC_SECRET,
        VAR_DIR=str(var),
        GATEWAY_BIND=f"127.0.0.1:{gateway_port}",
        GATEWAY_OPS_BIND=f"127.0.0.1:{ops_port}",
        GATEWAY_WORKERS="2" if settings.REDIS_URL else "1",
        GATEWAY_LOG_FLUSH_INTERVAL="0.2",
        ANALYTICS_INGEST_INTERVAL_SECONDS="0.5",  # tests drain the pipeline after each test
        GATEWAY_HEADER_TIMEOUT="2",  # short, so that the slowloris test is quick
        PORTAL_URL=LIVE_PORTAL_URL,
        **getattr(request.module, "STACK_ENV", {}),
    )
    procs: dict[str, Proc] = {}
    try:
        procs["upstream"] = Proc(
            "upstream",
            [
                str(BIN / "uvicorn"),
                "gateway.demo_upstream:app",
                "--host",
                "127.0.0.1",
                "--port",
                str(upstream_port),
                "--no-access-log",
            ],
            env=env,
            log_dir=var,
        )
        procs["gateway"] = Proc(
            "gateway",
            [str(BIN / "gunicorn"), "-c", "gateway/dataplane/gunicorn_conf.py"],
            env=env,
            log_dir=var,
        )
        procs["worker"] = Proc(
            "worker",
            [
                str(BIN / "celery"),
                "-A",
                "config",
                "worker",
                "--loglevel",
                "INFO",
                "--concurrency",
                "1",
                "--without-gossip",
                "--without-mingle",
            ],
            env=env,
            log_dir=var,
        )
        procs["beat"] = Proc(
            "beat",
            [str(BIN / "celery"), "-A", "config", "beat", "--loglevel", "INFO"],
            env=env,
            log_dir=var,
        )
        wait_until(lambda: port_open(upstream_port), timeout=30, what="the upstream")
        wait_until(lambda: port_open(gateway_port), timeout=30, what="the gateway")
        yield Stack(
            f"http://127.0.0.1:{gateway_port}", gateway_port, upstream_port, procs, env, ops_port
        )
    finally:
        # All asked to stop at once. Celery on the filesystem broker takes about 5 s to
        # leave after SIGTERM (it is idle by now: every `live` test drained the pipeline),
        # so it gets 1 s before SIGKILL; the others get their graceful stop.
        for proc in procs.values():
            proc.signal(signal.SIGTERM)
        for proc in reversed(procs.values()):
            proc.stop(timeout=1 if proc.name == "worker" else 10)
        ARTIFACTS.mkdir(exist_ok=True)
        for proc in procs.values():
            shutil.copy(proc.log_path, ARTIFACTS / f"stack-{proc.name}.log")


@pytest.fixture
def live(stack, transactional_db) -> Catalog:
    """The demo catalog pointing at the stack's upstream, loaded by every gateway worker;
    afterwards the log pipeline is drained before the database is flushed."""
    catalog = make_catalog(stack.upstream_port)
    wait_for_config(stack)
    yield catalog
    stack.wait_ingest_idle()


def wait_for_key(stack: Stack, key: str, *, timeout: float = 10) -> None:
    """Wait until every gateway worker's snapshot knows `key`."""
    _wait_stable(
        stack,
        lambda: stack.get("/demo/ping", headers={"X-API-Key": key}).status_code != 401,
        timeout=timeout,
        what="the gateway workers to load the new key",
    )


def wait_for_config(stack: Stack, *, timeout: float = 10) -> None:
    """Wait until every gateway worker serves the /demo API."""
    _wait_stable(
        stack,
        lambda: stack.get("/demo/ping").status_code != 404,
        timeout=timeout,
        what="the gateway workers to load the catalog",
    )


def _wait_stable(stack: Stack, ok, *, timeout: float, what: str) -> None:
    """Workers converge independently (pub/sub, else polling): after the first success, keep
    asking until 0.6 s (more than one poll interval) of consecutive successes.
    """
    state = {"since": None}

    def converged() -> bool:
        ok_now = ok()
        now = time.monotonic()
        if not ok_now:
            state["since"] = None
            return False
        state["since"] = state["since"] or now
        return now - state["since"] >= 0.6

    wait_until(converged, timeout=timeout, what=what)


@pytest.fixture
def own_redis(tmp_path):
    """A Redis server of this test's own (the shared one must not be killed): its port."""
    server = shutil.which("redis-server")
    if server is None:
        if os.environ.get("CI"):  # CI must run this test: a missing install is a failure
            pytest.fail("redis-server is not installed (.ci/run installs it)")
        pytest.skip("redis-server is not installed (.ci/run installs it)")
    port = free_port()
    argv = [server, "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no"]

    class Server:
        proc: subprocess.Popen | None = None

        def start(self) -> None:
            self.proc = subprocess.Popen(argv, cwd=tmp_path, stdout=subprocess.DEVNULL)
            wait_until(lambda: port_open(port), timeout=10, what="redis-server")

        def kill(self) -> None:
            assert self.proc is not None
            self.proc.kill()
            self.proc.wait(timeout=10)

    srv = Server()
    srv.start()
    srv.port = port
    try:
        yield srv
    finally:
        if srv.proc is not None and srv.proc.poll() is None:
            srv.kill()
