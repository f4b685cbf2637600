"""Snapshot and router costs at scale (part of `make bench`).

1. Build: a database with ROUTES routes (templated, over 100 APIs) and KEYS keys; the time to
   read it (load_config, the gateway's DB thread) and to compile it (compile_snapshot, on the
   event loop), and the memory the snapshot holds (tracemalloc).
2. Key delta: the time to reload one changed key (what a revocation costs a gateway).
3. Router: match time with 10 routes and with ROUTES routes, for a prefix, a templated and an
   unmatched path, and with 10 vs ROUTES regex routes of one API and routes at one path told
   apart by a header value (median of timeit repeats).
4. Latency during rebuilds: the real gateway (gunicorn, one worker) on that database, an
   open-loop client at a fixed rate, once undisturbed, once while the config is rebuilt
   every second (structural bumps), once while a key changes every 0.2 s (deltas).

Runs on SQLite in a temporary VAR_DIR (the embedded default). Prints markdown tables.
    .venv/bin/python bench/snapshot.py [--routes 10000] [--keys 100000] [--rate 500]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import timeit
import tracemalloc
import urllib.request
from pathlib import Path

from benchutil import SERVER_VARIABLES, embedded_env, free_port  # noqa: E402 - bench/ is on sys.path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def wait_http(url: str, headers: dict, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            req = urllib.request.Request(url, headers=headers)
            with urllib.request.urlopen(req, timeout=2) as resp:  # noqa: S310 - loopback
                if resp.status == 200:
                    return
        except Exception:  # noqa: S110 - not up yet
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} did not answer 200 within {timeout:.0f} s")


def populate(n_routes: int, n_keys: int, upstream_port: int) -> str:
    """Bulk-create the catalog and keys; returns one real key (for the latency runs)."""
    from django.contrib.auth.hashers import make_password
    from django.db import transaction

    from gateway.config import config_bump
    from gateway.models import Api, Route, Target, Upstream
    from portal.keys import key_digest, key_issue
    from portal.models import ApiKey, Consumer, Plan, RateLimit, Subscription, User

    n_apis = 100
    with transaction.atomic():
        up = Upstream.objects.create(name="bench")
        Target.objects.create(upstream=up, host="127.0.0.1", port=upstream_port)
        apis = Api.objects.bulk_create(
            Api(name=f"API {i}", slug=f"api{i}", path_prefix=f"/api{i}", upstream=up)
            for i in range(n_apis)
        )
        demo = Api.objects.create(name="Demo", slug="demo", path_prefix="/demo", upstream=up)
        Route.objects.create(api=demo, name="all", path="/")
        Route.objects.bulk_create(
            Route(
                api=apis[k % n_apis],
                name=f"r{k // n_apis}",
                path=f"/r{k // n_apis}/{{id}}",
                rewrite=f"/v1/r{k // n_apis}/{{id}}",
            )
            for k in range(n_routes - 1)
        )
        plan = Plan.objects.create(name="Bench", slug="bench")
        RateLimit.objects.create(plan=plan, limit=10**9, window="minute")
        plan.apis.add(demo, *apis)
        n_consumers = max(1, n_keys // 100)
        unusable = make_password(None)  # nobody signs in as these
        users = User.objects.bulk_create(
            User(username=f"u{i}@bench.test", email=f"u{i}@bench.test", password=unusable)
            for i in range(n_consumers)
        )
        consumers = Consumer.objects.bulk_create(Consumer(user=u) for u in users)
        subs = Subscription.objects.bulk_create(
            Subscription(consumer=c, plan=plan, status="active") for c in consumers
        )
        batch = []
        for i in range(n_keys - 1):
            kid = f"{i:012x}"
            batch.append(
                ApiKey(
                    subscription=subs[i % len(subs)],
                    name="k",
                    key_id=kid,
                    digest=key_digest(f"gw_{kid}_x"),
                )
            )
            if len(batch) == 5000:
                ApiKey.objects.bulk_create(batch)
                batch = []
        ApiKey.objects.bulk_create(batch)
        issued = key_issue(subs[0], name="bench")
        config_bump(reason="bench catalog")
    return issued.key


def measure_build() -> dict:
    from gateway.dataplane.app import GatewayApp
    from gateway.dataplane.limiter import MemoryLimiter
    from gateway.dataplane.settings import load_settings
    from gateway.dataplane.snapshot import compile_snapshot, load_config, load_keys

    app = GatewayApp(load_settings())
    app.limiter = MemoryLimiter()
    t0 = time.perf_counter()
    apis, keys = load_config(1)
    t1 = time.perf_counter()
    snap = compile_snapshot(1, apis, keys, app._compile_route)
    t2 = time.perf_counter()
    del apis, keys, snap
    # Memory in a second build (tracemalloc slows allocation: not in the timed one).
    tracemalloc.start()
    apis, keys = load_config(1)
    snap = compile_snapshot(1, apis, keys, app._compile_route)
    del apis
    held, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    some = next(iter(keys))
    deltas = []
    for _ in range(20):
        s = time.perf_counter()
        load_keys({some})
        deltas.append(time.perf_counter() - s)
    return {
        "routes": len(snap.router),
        "keys": len(snap.keys),
        "load_s": t1 - t0,
        "compile_s": t2 - t1,
        "held_mib": held / 2**20,
        "peak_mib": peak / 2**20,
        "delta_ms": statistics.median(deltas) * 1000,
        "snapshot": snap,
    }


def measure_router(big) -> list[tuple[str, float, float]]:
    from gateway import routing
    from gateway.dataplane.router import Router
    from gateway.dataplane.snapshot import RouteEntry, UpstreamEntry

    up = UpstreamEntry(1, "up", (), 1.0, 1.0)

    def entry(i: int, base: str, path: str, kind: str = "prefix", headers: str = "") -> RouteEntry:
        p = routing.compile_path(kind, path)
        return RouteEntry(
            id=i,
            api_id=1,
            api_slug="a",
            path=path,
            methods=frozenset(),
            key_header=b"x-api-key",
            key_header_label="X-API-Key",
            fail_closed=False,
            upstream=up,
            segments=tuple(routing.split_path(base)) + p.segments,
            param_names=p.params if kind != "regex" else (),
            kind=kind,
            regex=p.regex,
            header_conditions=routing.parse_header_conditions(headers),
        )

    small = Router(
        [entry(0, "/demo", "/")] + [entry(i, f"/api{i}", "/r0/{id}") for i in range(1, 10)]
    )
    headers = [(b"host", b"127.0.0.1"), (b"user-agent", b"wrk"), (b"x-api-key", b"gw_x")]
    paths = [
        ("prefix /demo/anything", "/demo/anything"),
        ("template /api7/r0/{id}/x", "/api7/r0/42/x"),
        ("no match /nowhere/x", "/nowhere/x"),
    ]
    out = []
    for label, path in paths:
        timings = []
        for router in (small, big):
            runs = timeit.repeat(
                lambda r=router, p=path: r.match("GET", p, headers, b""), number=20000, repeat=7
            )
            timings.append(statistics.median(runs) / 20000 * 1e6)
        out.append((label, timings[0], timings[1]))
    # Routes piled up at one place of the trie: regex routes of one API, and routes at one
    # path told apart by a header's value (indexed by first segment and by value).
    n = len(big)

    def regex_routes(count: int) -> Router:
        return Router(
            [entry(0, "/re", "/")]
            + [entry(i, "/re", rf"/r{i}/(?P<id>\d+)", "regex") for i in range(1, count)]
        )

    def tenant_routes(count: int) -> Router:
        return Router([entry(i, "/tn", "/", headers=f"X-Tenant: t{i}") for i in range(count)])

    piles = [
        ("regex /re/r7/42 (regex routes of one API)", regex_routes, "/re/r7/42", headers),
        (
            "header X-Tenant: t7 (routes at one path)",
            tenant_routes,
            "/tn/x",
            [*headers, (b"x-tenant", b"t7")],
        ),
    ]
    for label, build, path, hdrs in piles:
        timings = []
        for router in (build(10), build(n)):
            assert router.match("GET", path, hdrs, b"")[0].id == 7
            runs = timeit.repeat(
                lambda r=router, p=path, h=hdrs: r.match("GET", p, h, b""), number=20000, repeat=7
            )
            timings.append(statistics.median(runs) / 20000 * 1e6)
        out.append((label, timings[0], timings[1]))
    return out


def latency_runs(env: dict, key: str, rate: float, duration: float, tmp: Path) -> list[dict]:
    """The gateway under an open-loop rate: quiet, during rebuilds, during key deltas."""
    up_port, gw_port, ops_port = free_port(), free_port(), free_port()
    ops = f"http://127.0.0.1:{ops_port}/readyz"
    procs = []

    def start(name, cmd, extra=None):
        log = open(tmp / f"{name}.log", "wb")  # noqa: SIM115 - closed at the end
        p = subprocess.Popen(
            cmd,
            cwd=ROOT,
            env={**env, **(extra or {})},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        procs.append((p, log))
        return p

    results = []
    try:
        start(
            "upstream",
            [str(BIN / "uvicorn"), "gateway.demo_upstream:app", "--port", str(up_port)]
            + ["--no-access-log", "--log-level", "warning"],
        )
        _retarget(up_port)
        start(
            "gateway",
            [str(BIN / "gunicorn"), "-c", "gateway/dataplane/gunicorn_conf.py"],
            {
                "GATEWAY_BIND": f"127.0.0.1:{gw_port}",
                "GATEWAY_OPS_BIND": f"127.0.0.1:{ops_port}",
            },
        )
        url = f"http://127.0.0.1:{gw_port}/demo/anything"
        wait_http(url, {"X-API-Key": key})
        for label, disturb in (
            ("no config change", None),
            ("key delta every 0.2 s", "delta"),
            ("full rebuild every 2 s", "rebuild"),
        ):
            _wait_caught_up(ops)
            stop = threading.Event()
            bumps = [0]
            worker = None
            if disturb:
                worker = threading.Thread(target=_disturb, args=(disturb, stop, bumps))
                worker.start()
            try:
                out = subprocess.run(
                    [sys.executable, str(ROOT / "bench" / "openloop.py"), "--url", url]
                    + ["--rate", f"{rate:g}", "--duration", f"{duration:g}"]
                    + ["--header", f"X-API-Key: {key}"],
                    capture_output=True,
                    text=True,
                    timeout=duration + 120,
                    check=True,
                )
            finally:
                stop.set()
                if worker:
                    worker.join()
            res = json.loads(out.stdout)
            res["label"] = label
            res["bumps"] = bumps[0]
            results.append(res)
        log_text = (tmp / "gateway.log").read_text(errors="replace")
        builds = [
            line for line in log_text.splitlines() if "routes," in line and "built in" in line
        ]
        if builds:
            results.append({"last_build_line": builds[-1].strip()})
    finally:
        for p, log in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGTERM)
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(5)
            log.close()
    return results


def _wait_caught_up(ops: str, timeout: float = 300) -> None:
    """Until the gateway serves the current config version (earlier rebuilds are done)."""
    from gateway.config import config_current_version

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with urllib.request.urlopen(ops, timeout=5) as resp:  # noqa: S310 - loopback
            if json.load(resp)["config_version"] >= config_current_version():
                return
        time.sleep(0.2)
    raise RuntimeError("the gateway did not catch up with the config")


def _retarget(port: int) -> None:
    from django.db import transaction

    from gateway.config import config_bump
    from gateway.models import Target

    with transaction.atomic():
        Target.objects.update(port=port)
        config_bump(reason="bench upstream port")


def _disturb(kind: str, stop: threading.Event, bumps: list[int]) -> None:
    from django.db import close_old_connections, transaction

    from gateway.config import config_bump
    from portal.models import ApiKey

    close_old_connections()
    key = ApiKey.objects.order_by("pk").first()
    interval = 2.0 if kind == "rebuild" else 0.2
    while not stop.wait(interval):
        with transaction.atomic():
            if kind == "rebuild":
                config_bump(reason="bench: structural")
            else:
                ApiKey.objects.filter(pk=key.pk).update(name=f"k{bumps[0]}")
                config_bump(reason="bench: key", key_ids=[key.key_id])
        bumps[0] += 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--routes", type=int, default=10_000)
    parser.add_argument("--keys", type=int, default=100_000)
    parser.add_argument("--rate", type=float, default=500)
    parser.add_argument("--duration", type=float, default=10)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="apigw-snapshot-bench-"))
    env = embedded_env(str(tmp), LOG_LEVEL="INFO")
    os.environ.update(env)
    for k in SERVER_VARIABLES:
        os.environ.pop(k, None)
    sys.path.insert(0, str(ROOT))
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
    try:
        import django

        django.setup()
        from django.core.management import call_command

        call_command("migrate", verbosity=0)
        t = time.perf_counter()
        key = populate(args.routes, args.keys, 9)
        created = time.perf_counter() - t
        build = measure_build()
        router_rows = measure_router(build.pop("snapshot").router)
        runs = latency_runs(env, key, args.rate, args.duration, tmp)
        print(f"Snapshot of {build['routes']:,} routes and {build['keys']:,} keys (SQLite; ")
        print(f"catalog created in {created:.0f} s):\n")
        print("| read | compile | memory held | peak | one key delta |")
        print("| ---: | ---: | ---: | ---: | ---: |")
        print(
            f"| {build['load_s']:.2f} s | {build['compile_s']:.2f} s | "
            f"{build['held_mib']:.0f} MiB | {build['peak_mib']:.0f} MiB | "
            f"{build['delta_ms']:.1f} ms |\n"
        )
        print(f"Router match (µs, median of 7 × 20,000), 10 vs {build['routes']:,} routes:\n")
        print(f"| path | 10 routes | {build['routes']:,} routes | ratio |")
        print("| --- | ---: | ---: | ---: |")
        for label, small, big in router_rows:
            print(f"| {label} | {small:.2f} | {big:.2f} | {big / small:.2f} |")
        print(f"\nGateway latency at {args.rate:g} rps for {args.duration:g} s (open loop):\n")
        print("| during | changes | p50 | p99 | max | non-200 |")
        print("| --- | ---: | ---: | ---: | ---: | ---: |")
        for r in runs:
            if "label" not in r:
                print(f"\n{r['last_build_line']}")
                continue
            lat = r["latency_ms"]
            bad = sum(v for k, v in r["statuses"].items() if k != "200") + sum(r["errors"].values())
            print(
                f"| {r['label']} | {r['bumps']} | {lat['p50']:.2f} ms | {lat['p99']:.2f} ms | "
                f"{lat['max']:.1f} ms | {bad} |"
            )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
