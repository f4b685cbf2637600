"""A gateway node without its database: the on-disk config cache, start-up with nothing,
database errors apart from broken configurations, and key deltas during a slow rebuild.

The gateways here are processes of their own (never the stack's), pointed at a database the
test can take away without touching the shared server: on PostgreSQL through a TCP proxy in
this process that can be cut, on SQLite at a copy of the test database whose folder can be
moved away.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import sqlite3
import threading
import time
from pathlib import Path

import pytest
import requests

from tests.conftest import _database_url, active_key, make_user
from tests.procs import BIN, Proc, child_env, free_port, port_open, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]


# --- a database that can be taken away ---------------------------------------------------------
class TcpProxy:
    """Loopback TCP proxy to PostgreSQL; down() refuses and drops every connection."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.port = free_port()
        self._listener: socket.socket | None = None
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()

    def up(self) -> None:
        if self._listener is not None:
            return
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def down(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
            listener.close()
        with self._lock:
            conns, self._conns = self._conns, []
        for c in conns:
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)
            c.close()

    def _accept(self, listener: socket.socket) -> None:
        while True:  # ends when the listener is closed
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns += [client, server]
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):  # ends at EOF or when down() closes the socket
                dst.sendall(data)
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)


class CuttableDb:
    """The test database as a gateway of ours sees it; down() takes it away, up() brings it
    back (on SQLite, up() also copies in what the test changed meanwhile)."""

    def __init__(self, tmp: Path) -> None:
        from django.db import connection

        db = connection.settings_dict
        self.sqlite = db["ENGINE"].endswith("sqlite3")
        self.env = {"DATABASE_CONN_MAX_AGE": "0"}  # every config read opens the database
        if self.sqlite:
            self.folder = tmp / "db"
            self.away = tmp / "db-away"
            self.url = f"sqlite:///{self.folder / 'copy.sqlite3'}"
            self.source = Path(db["NAME"]).resolve()
        else:
            self.proxy = TcpProxy((db["HOST"] or "127.0.0.1", int(db["PORT"] or 5432)))
            self.url = re.sub(r"@[^/]+/", f"@127.0.0.1:{self.proxy.port}/", _database_url())

    def up(self) -> None:
        if not self.sqlite:
            self.proxy.up()
            return
        shutil.rmtree(self.away, ignore_errors=True)
        self.folder.mkdir(exist_ok=True)
        tmp = self.folder / "next.sqlite3"
        src, dst = sqlite3.connect(self.source), sqlite3.connect(tmp)
        try:
            src.backup(dst)  # a consistent copy, WAL included
        finally:
            src.close()
            dst.close()
        os.replace(tmp, self.folder / "copy.sqlite3")

    def down(self) -> None:
        if not self.sqlite:
            self.proxy.down()
            return
        shutil.rmtree(self.away, ignore_errors=True)
        self.folder.rename(self.away)  # "unable to open database file" from now on

    def close(self) -> None:
        if not self.sqlite:
            self.proxy.down()


@pytest.fixture
def cuttable_db(transactional_db, tmp_path):
    db = CuttableDb(tmp_path)
    try:
        yield db
    finally:
        db.close()


# --- a gateway of the test's own ---------------------------------------------------------------
class Gateway:
    def __init__(self, stack, var: Path, database_url: str, **env: str) -> None:
        from django.conf import settings

        self.port, self.ops_port = free_port(), free_port()
        self.var = var
        self.n_workers = 2 if settings.REDIS_URL else 1
        var.mkdir(parents=True, exist_ok=True)
        self.proc = Proc(
            f"gateway-{self.port}",
            [str(BIN / "gunicorn"), "-c", "gateway/dataplane/gunicorn_conf.py"],
            env=child_env(
                **{
                    **stack.env,
                    "VAR_DIR": str(var),
                    "DATABASE_URL": database_url,
                    "GATEWAY_BIND": f"127.0.0.1:{self.port}",
                    "GATEWAY_OPS_BIND": f"127.0.0.1:{self.ops_port}",
                    "GATEWAY_WORKERS": str(self.n_workers),
                    **env,
                }
            ),
            log_dir=var,
        )
        wait_until(lambda: port_open(self.port), timeout=30, what="our gateway to listen")

    def wait_started(self) -> None:
        """Until every worker has finished its start-up (a worker still starting takes no
        requests, so the public port cannot tell)."""
        wait_until(
            lambda: self.log().count("Application startup complete.") >= self.n_workers,
            timeout=30,
            what="every worker to start",
        )

    def get(self, path: str, key: str | None = None) -> requests.Response:
        headers = {"X-API-Key": key} if key else {}
        return requests.get(f"http://127.0.0.1:{self.port}{path}", headers=headers, timeout=5)

    def all_status(self, path: str, key: str | None, status: int, n: int = 4) -> bool:
        """Several requests (each worker is asked) all answered `status`."""
        return all(self.get(path, key).status_code == status for _ in range(n))

    def ready(self) -> requests.Response:
        return requests.get(f"http://127.0.0.1:{self.ops_port}/readyz", timeout=5)

    def metric(self, name: str) -> float:
        text = requests.get(f"http://127.0.0.1:{self.ops_port}/metrics", timeout=5).text
        values = [float(line.split()[-1]) for line in text.splitlines() if line.startswith(name)]
        return max(values) if values else 0.0

    def workers(self) -> list[int]:
        pid = self.proc.popen.pid
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        return [int(c) for c in children]

    def log(self) -> str:
        return self.proc.output()

    def stop(self) -> None:
        self.proc.stop()


@pytest.fixture
def gateways(stack):
    started: list[Gateway] = []

    def start(var: Path, database_url: str, **env: str) -> Gateway:
        gw = Gateway(stack, var, database_url, **env)
        started.append(gw)
        return gw

    try:
        yield start
    finally:
        for gw in started:
            gw.stop()


def _cache_files(var: Path) -> list[Path]:
    return list((var / "gateway").glob("config-cache-*.pickle"))


# --- 1. the on-disk cache ---------------------------------------------------------------------
def test_workers_restarted_while_the_database_is_down_serve_the_cached_config(
    live, cuttable_db, gateways, tmp_path
):
    from portal.keys import key_revoke

    db = cuttable_db
    issued = active_key(make_user("cache@example.com"), live.free)
    db.up()
    gw = gateways(tmp_path / "var", db.url, **db.env)
    wait_until(lambda: gw.all_status("/demo/x", issued.key, 200), timeout=15, what="serving")
    wait_until(lambda: _cache_files(gw.var), timeout=10, what="the config cache to be written")
    (cache,) = _cache_files(gw.var)
    assert cache.stat().st_mode & 0o777 == 0o600  # it holds key digests

    db.down()
    wait_until(
        lambda: gw.metric("gateway_config_db_errors_total") > 0,
        timeout=10,
        what="the gateway to notice the database is gone",
    )
    assert gw.all_status("/demo/x", issued.key, 200)  # the snapshot in memory serves
    assert gw.metric("gateway_snapshot_build_failures_total") == 0

    # kill -9 every worker: gunicorn starts new ones, which cannot read the database.
    old = gw.workers()
    assert old
    for pid in old:
        os.kill(pid, signal.SIGKILL)

    def replaced() -> bool:
        now = gw.workers()
        return len(now) == len(old) and not set(now) & set(old)

    wait_until(replaced, timeout=20, what="gunicorn to replace its workers")
    wait_until(lambda: gw.ready().json()["config_source"] == "cache", timeout=30, what="the cache")
    wait_until(lambda: gw.all_status("/demo/x", issued.key, 200), timeout=10, what="serving")
    assert gw.proc.alive(), gw.log()[-3000:]
    assert "SERVING THE CACHED CONFIGURATION" in gw.log()
    assert "Worker failed to boot" not in gw.log()
    assert gw.metric("gateway_config_from_cache") >= 1

    # Meanwhile the key is revoked; the database comes back: the cache gives way at once.
    key_revoke(issued.api_key)
    db.up()
    wait_until(
        lambda: gw.all_status("/demo/x", issued.key, 401),
        timeout=10,
        what="the revocation to reach the node once the database answers",
    )
    # Every worker, not just the one that answered /readyz or the requests above (accept()
    # need not spread them): the gauge is summed over the live workers.
    wait_until(
        lambda: gw.metric("gateway_config_from_cache") == 0,
        timeout=10,
        what="every worker to rebuild from the database",
    )
    assert gw.ready().json()["config_source"] == "database"
    assert gw.all_status("/demo/x", issued.key, 401)
    assert gw.proc.alive()


def test_a_node_without_database_or_cache_starts_answers_503_and_recovers(
    live, cuttable_db, gateways, tmp_path
):
    db = cuttable_db
    issued = active_key(make_user("nothing@example.com"), live.free)
    db.up()
    db.down()
    gw = gateways(tmp_path / "var", db.url, **db.env)
    resp = gw.get("/demo/x", issued.key)
    assert resp.status_code == 503
    assert resp.headers["content-type"] == "application/problem+json"
    assert "configuration" in resp.json()["detail"].lower()
    ready = gw.ready()
    assert ready.status_code == 503
    # Still up a while later: the worker did not exit (gunicorn would stop the node).
    time.sleep(1.5)
    assert gw.proc.alive()
    assert gw.get("/demo/x", issued.key).status_code == 503
    assert "Worker failed to boot" not in gw.log()

    db.up()
    wait_until(
        lambda: gw.all_status("/demo/x", issued.key, 200), timeout=15, what="the first config"
    )
    # /readyz answers from whichever worker accepts it: each gets there within a poll.
    wait_until(lambda: gw.ready().status_code == 200, timeout=10, what="/readyz")


# --- 2. a database error is not a broken configuration ----------------------------------------
def test_a_database_outage_during_a_rebuild_is_retried_at_the_poll_interval(
    live, cuttable_db, gateways, tmp_path
):
    from django.db import transaction

    from gateway.config import config_bump
    from gateway.models import Route

    db = cuttable_db
    issued = active_key(make_user("outage@example.com"), live.free)
    db.up()
    # Each rebuild sleeps 1.5 s after its reads: the database goes away under it.
    gw = gateways(tmp_path / "var", db.url, GATEWAY_SNAPSHOT_BUILD_DELAY="1.5", **db.env)
    gw.wait_started()
    wait_until(lambda: gw.all_status("/demo/x", issued.key, 200), timeout=20, what="serving")
    errors_before = gw.metric("gateway_config_db_errors_total")

    with transaction.atomic():
        Route.objects.create(api=live.api, name="late", path="/late", priority=5)
        config_bump(reason="a structural change")
    db.up()  # SQLite: the copy gets the change
    wait_until(lambda: gw.ready().json()["rebuilding"], timeout=5, what="a rebuild to start")
    db.down()
    wait_until(
        lambda: not gw.ready().json()["rebuilding"], timeout=10, what="the rebuild to give up"
    )
    assert gw.metric("gateway_config_db_errors_total") > errors_before
    assert gw.metric("gateway_snapshot_build_failures_total") == 0  # not a broken config
    assert gw.all_status("/demo/x", issued.key, 200)  # the last snapshot serves
    wait_until(
        lambda: gw.metric("gateway_config_check_age_seconds") > 1.0,
        timeout=5,
        what="the staleness gauge to grow",
    )

    builds = gw.log().count(" built in ")
    db.up()
    # Retried at the poll interval (not after RETRY_BROKEN_SECONDS = 30 s): one rebuild of
    # 1.5 s, plus margin.
    took = wait_until(
        lambda: gw.log().count(" built in ") > builds,
        timeout=8,
        what="the rebuild to succeed once the database is back",
    )
    assert gw.metric("gateway_config_check_age_seconds") < 2
    print(f"rebuilt {took:.1f} s after the database came back")
    assert gw.metric("gateway_snapshot_build_failures_total") == 0


# --- 3. key deltas during a rebuild -----------------------------------------------------------
def test_a_key_revoked_during_a_slow_rebuild_is_rejected_within_one_second(
    live, gateways, tmp_path
):
    from django.db import transaction

    from gateway.config import config_bump
    from gateway.models import Route
    from portal.keys import key_revoke

    issued = active_key(make_user("race@example.com"), live.free)
    # Every rebuild takes 3 s (it sleeps after its reads), as one of 100,000 keys on
    # PostgreSQL does; pointed at the test database itself.
    gw = gateways(tmp_path / "var", _database_url(), GATEWAY_SNAPSHOT_BUILD_DELAY="3")
    gw.wait_started()
    wait_until(lambda: gw.all_status("/demo/x", issued.key, 200), timeout=20, what="serving")

    with transaction.atomic():
        Route.objects.create(api=live.api, name="new", path="/new", priority=5)
        config_bump(reason="a structural change")
    wait_until(lambda: gw.ready().json()["rebuilding"], timeout=5, what="the rebuild to start")
    time.sleep(0.2)  # the rebuild has read its version: the revocation comes after it
    key_revoke(issued.api_key)
    revoked = time.monotonic()
    # Requirement: rejected within 1 s; 1 s of margin for a loaded machine.
    wait_until(
        lambda: gw.all_status("/demo/x", issued.key, 401),
        timeout=2.0,
        interval=0.02,
        what="the revoked key to be rejected while the rebuild runs",
    )
    took = time.monotonic() - revoked
    print(f"revoked key rejected after {took:.2f} s, during a 3 s rebuild")

    # The rebuilt snapshot (read before the revocation) catches up before it serves.
    wait_until(
        lambda: not gw.ready().json()["rebuilding"], timeout=10, what="the rebuild to finish"
    )
    assert gw.all_status("/demo/x", issued.key, 401, n=10)
    assert re.search(r"\(\+[1-9]\d* keys caught up\)", gw.log()), gw.log()[-3000:]


# --- the cache itself, in process -------------------------------------------------------------
def test_the_cache_round_trips_and_compiles_without_the_database(live, django_db_blocker, tmp_path):
    from gateway.dataplane.app import GatewayApp
    from gateway.dataplane.limiter import MemoryLimiter
    from gateway.dataplane.settings import load_settings
    from gateway.dataplane.snapshot import load_source, pickle_structure, read_cache, write_cache

    issued = active_key(make_user("roundtrip@example.com"), live.free)
    app = GatewayApp(load_settings())
    app.limiter = MemoryLimiter()
    source = load_source()
    built = app._compile(source)
    path = tmp_path / "cache" / "config-cache-x.pickle"
    args = {"epoch": source.epoch, "version": source.version, "source": source}
    assert write_cache(path, structure=pickle_structure(source), keys=source.keys.copy(), **args)
    # Another worker of the node at the same version: nothing to write.
    assert not write_cache(path, structure=[], keys={}, **args)
    # A worker still on older routes, with newer keys, never writes its routes over these.
    import dataclasses

    older = dataclasses.replace(source, version=source.version - 1)
    stale = {**args, "source": older, "version": source.version + 5}
    assert not write_cache(path, structure=[], keys={}, **stale)
    assert path.stat().st_mode & 0o777 == 0o600
    with django_db_blocker.block():  # any query now fails the test
        cached, stamp = read_cache(path)
        snap = app._compile(cached)
    assert stamp["version"] == source.version and stamp["epoch"] == source.epoch
    assert snap.keys == built.keys
    assert snap.keys[issued.api_key.key_id].limits == built.keys[issued.api_key.key_id].limits
    route, _ = snap.router.match("GET", "/demo/x")
    assert [s.name for s in route.stages] == [
        s.name for s in built.router.match("GET", "/demo/x")[0].stages
    ]


def test_a_cache_written_for_other_models_is_refused(live, tmp_path, monkeypatch):
    """A deploy that changes the models cannot unpickle an older cache into working rows:
    it is refused at once (the worker then waits for the database), not half-loaded."""
    from gateway.dataplane import snapshot
    from gateway.dataplane.snapshot import load_source, pickle_structure, read_cache, write_cache

    source = load_source()
    path = tmp_path / "config-cache-x.pickle"
    write_cache(
        path,
        epoch=source.epoch,
        version=source.version,
        source=source,
        structure=pickle_structure(source),
        keys=source.keys.copy(),
    )
    assert read_cache(path) is not None
    monkeypatch.setattr(snapshot, "models_fingerprint", lambda: "another-schema")
    with pytest.raises(ValueError, match="other models"):
        read_cache(path)
