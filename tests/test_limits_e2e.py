"""Rate limits through the real gateway: the documented bound under concurrency, and the
limit store (Redis) killed and restarted under load."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from tests.conftest import active_key, make_user, set_rate_limit, wait_for_key
from tests.procs import BIN, Proc, child_env, free_port, port_open, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]


@pytest.fixture
def dev(transactional_db):
    return make_user("dev@example.com")


CLIENTS = 20
RUN_SECONDS = 3.2  # three one-second windows, and a bit


def _hammer(url: str, headers: dict, *, seconds: float) -> list[tuple[float, float, int]]:
    """CLIENTS threads sending back to back for `seconds`: (sent, answered, status) each."""
    deadline = time.monotonic() + seconds
    results: list[tuple[float, float, int]] = []
    lock = threading.Lock()

    def client() -> None:
        mine = []
        with requests.Session() as s:
            for _ in range(100_000):  # bounded; the deadline ends it long before
                if time.monotonic() >= deadline:
                    break
                sent = time.monotonic()
                status = s.get(url, headers=headers, timeout=10).status_code
                mine.append((sent, time.monotonic(), status))
        with lock:
            results.extend(mine)

    with ThreadPoolExecutor(max_workers=CLIENTS) as pool:
        for f in [pool.submit(client) for _ in range(CLIENTS)]:
            f.result()
    return sorted(results)


def test_admitted_requests_stay_within_limit_plus_burst_in_any_window(stack, live, dev):
    """L = 60/second with burst B = 10, two gateway workers sharing Redis (one process on
    the embedded store), 20 clients for three windows. Each request's decision happened
    between its send and its answer, so the test counts conservatively: a request is
    certainly inside a window only if both ends are; possibly inside if either is.
    Certainly-inside counts never exceed L + B; possibly-inside counts reach 0.95 L in every
    full window (demand is many times L throughout)."""
    limit, burst = 60, 10
    set_rate_limit(plan=live.free, limit=limit, window="second", burst=burst)
    issued = active_key(dev, live.free, name="bound")
    from portal.keys import key_issue

    probe = key_issue(issued.api_key.subscription, name="probe")  # warms up; own counter
    wait_for_key(stack, probe.key)
    results = _hammer(stack.gateway_url + "/demo/x", {"X-API-Key": issued.key}, seconds=RUN_SECONDS)
    statuses = {status for _, _, status in results}
    assert statuses <= {200, 429}, statuses
    admitted = [(sent, done) for sent, done, status in results if status == 200]
    offered_per_second = len(results) / RUN_SECONDS
    print(f"{len(results)} requests ({offered_per_second:.0f}/s offered), {len(admitted)} admitted")
    assert offered_per_second > 3 * limit  # demand really exceeded the limit

    certainly = max(
        sum(1 for s, d in admitted if start <= s and d < start + 1.0) for start, _ in admitted
    )
    assert certainly <= limit + burst
    t0 = admitted[0][0]
    for k in (1, 2):  # the full windows after the first (which holds the burst)
        lo, hi = t0 + k, t0 + k + 1
        possibly = sum(1 for s, d in admitted if s < hi and d >= lo)
        assert possibly >= 0.95 * limit, (k, possibly)


# --- the limit store killed and restarted under load ---------------------------------------
def test_redis_killed_and_restarted_under_load_fails_open_or_closed_then_limits_resume(
    stack, live, dev, own_redis, tmp_path
):
    from django.db import transaction

    from gateway.config import config_bump
    from gateway.models import Api, Route

    with transaction.atomic():
        closed = Api.objects.create(
            name="Closed",
            slug="closed",
            path_prefix="/closed",
            upstream=live.upstream,
            limiter_failure="closed",
        )
        Route.objects.create(api=closed, name="all", path="/")
        live.free.apis.add(closed)
        config_bump(reason="fail-closed API")
    set_rate_limit(plan=live.free, limit=2, window="minute", burst=1)
    port, ops = free_port(), free_port()
    env = child_env(
        **{
            **stack.env,
            "REDIS_URL": f"redis://127.0.0.1:{own_redis.port}/0",
            "GATEWAY_WORKERS": "1",
            "GATEWAY_BIND": f"127.0.0.1:{port}",
            "GATEWAY_OPS_BIND": f"127.0.0.1:{ops}",
            "GATEWAY_REDIS_TIMEOUT": "0.25",
        }
    )
    node = Proc(
        "gateway-own-redis",
        [str(BIN / "gunicorn"), "-c", "gateway/dataplane/gunicorn_conf.py"],
        env=env,
        log_dir=tmp_path,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: port_open(port), timeout=30, what="the gateway")
        key = active_key(dev, live.free, name="limited").key
        spare = active_key(make_user("other@example.com"), live.free, name="spare").key

        def get(path: str, k: str = key) -> requests.Response:
            return requests.get(base + path, headers={"X-API-Key": k}, timeout=10)

        wait_until(lambda: get("/closed/x", spare).status_code == 200, timeout=10, what="keys")
        # With Redis up, the limit holds: two admitted, then 429.
        assert [get("/demo/x").status_code for _ in range(3)] == [200, 200, 429]

        # Background load on the spare key through everything that follows: never a 500.
        stop = threading.Event()
        seen: list[int] = []

        def load() -> None:
            with requests.Session() as s:
                for _ in range(10_000):
                    if stop.is_set():
                        break
                    seen.append(s.get(base + "/demo/y", headers={"X-API-Key": spare}).status_code)
                    time.sleep(0.01)

        loader = threading.Thread(target=load)
        loader.start()
        try:
            own_redis.kill()
            # Fail open: admitted (the limited key too, as nothing can be counted), and no
            # request waits much beyond the store's 0.25 s timeout.
            slowest = 0.0
            for _ in range(5):
                started = time.monotonic()
                assert get("/demo/x").status_code == 200
                slowest = max(slowest, time.monotonic() - started)
            print(f"fail-open answers while Redis is down: slowest {slowest:.3f} s")
            assert slowest < 2.0  # 0.25 s timeout; the rest is margin for a loaded machine
            refused = get("/closed/x")
            assert refused.status_code == 503
            assert refused.headers["content-type"] == "application/problem+json"
            assert refused.json()["type"] == "urn:apigw:problem:limiter-unavailable"
            assert int(refused.headers["retry-after"]) >= 1
            metrics = requests.get(f"http://127.0.0.1:{ops}/metrics", timeout=10).text
            errors = [
                float(line.split()[-1])
                for line in metrics.splitlines()
                if line.startswith("gateway_limiter_store_errors")
            ]
            assert errors and max(errors) > 0

            own_redis.start()
            restarted = time.monotonic()

            def limits_back() -> bool:
                # Counters were lost with the server: the limit admits two, then refuses.
                return [get("/demo/x").status_code for _ in range(3)][-1] == 429

            wait_until(limits_back, timeout=5 + 3, interval=0.1, what="limits to resume")
            print(f"limits enforced again {time.monotonic() - restarted:.2f} s after restart")
            wait_until(
                lambda: get("/closed/x", spare).status_code in (200, 429),
                timeout=5,
                what="the fail-closed API to answer again",
            )
        finally:
            stop.set()
            loader.join(timeout=30)
        assert seen and 500 not in seen and set(seen) <= {200, 429}, set(seen)
    finally:
        node.stop()


def test_route_limits_by_client_ip_and_per_route_overrides_of_a_plan(stack, live, dev):
    from django.db import transaction

    from gateway.config import config_bump
    from gateway.models import Route

    with transaction.atomic():
        public = Route.objects.create(api=live.api, name="public", path="/public", anonymous=True)
        search = Route.objects.create(api=live.api, name="search", path="/search")
        config_bump(reason="routes")
    # Anonymous: two per minute per client address (a burst of one over the even pace).
    set_rate_limit(route=public, scope="client_ip", limit=2, burst=1)
    # The plan's 1000/minute per key becomes 2/minute on /search for Free's keys.
    set_rate_limit(plan=live.free, route=search, limit=2, burst=1)
    issued = active_key(dev, live.free, name="override")
    from portal.keys import key_issue

    probe = key_issue(issued.api_key.subscription, name="probe")
    wait_for_key(stack, probe.key)

    def policy(path: str, **headers) -> str:
        return stack.get(path, headers=headers).headers.get("ratelimit-policy", "")

    wait_until(
        lambda: (
            "route-ip-minute" in policy("/demo/public/x")
            and '"key-minute";q=2' in policy("/demo/search", **{"X-API-Key": probe.key})
        ),
        timeout=10,
        what="the route limits",
    )
    key = {"X-API-Key": issued.key}
    assert [stack.get("/demo/search", headers=key).status_code for _ in range(3)] == [
        200,
        200,
        429,
    ]
    assert stack.get("/demo/other", headers=key).status_code == 200  # the plan's own rule
    # The anonymous route's counter is per client address; this test used some of it already
    # while waiting, so it is refusing now or after at most two more.
    codes = [stack.get("/demo/public/x").status_code for _ in range(3)]
    assert codes[-1] == 429
    refused = stack.get("/demo/public/x")
    assert "per client IP" in refused.json()["detail"]
