"""Load balancing, health checks, circuit breaking, retries and TLS through the real gateway.

Three more echo upstreams run beside the stack's own; each is told apart by the Host header
it received (the target's host:port, as the gateway sends it). `/_mode?status=503` makes one
answer 503 to everything, `/healthz` included.
"""

from __future__ import annotations

import subprocess
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from tests.conftest import _wait_stable, active_key, make_user, wait_for_key
from tests.procs import BIN, Proc, child_env, free_port, port_open, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]


def _uvicorn(port: int, *extra: str) -> list[str]:
    return [
        str(BIN / "uvicorn"),
        "gateway.demo_upstream:app",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--no-access-log",
        *extra,
    ]


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    """Three echo upstreams: their ports."""
    var = tmp_path_factory.mktemp("pool")
    ports = [free_port() for _ in range(3)]
    procs = [Proc(f"pool-{p}", _uvicorn(p), env=child_env(), log_dir=var) for p in ports]
    try:
        for p in ports:
            wait_until(lambda p=p: port_open(p), timeout=30, what=f"upstream {p}")
        yield ports
    finally:
        for proc in procs:
            proc.stop()


@pytest.fixture
def reset_pool(pool):
    yield pool
    for p in pool:
        requests.get(f"http://127.0.0.1:{p}/_mode?status=0", timeout=5)


@pytest.fixture
def key(stack, live):
    issued = active_key(make_user("dev@example.com"), live.free)
    wait_for_key(stack, issued.key)
    return issued.key


def serve(stack, live, ports, *, probe: str = "/lb/x", route: dict | None = None, **upstream):
    """An /lb API on a new upstream over `ports` ({port: weight} or a list)."""
    from django.db import transaction

    from gateway.config import config_bump
    from gateway.models import Api, Route, Target, Upstream

    weights = ports if isinstance(ports, dict) else dict.fromkeys(ports, 100)
    with transaction.atomic():
        up = Upstream.objects.create(name="pool", connect_timeout=1, read_timeout=5, **upstream)
        for port, weight in weights.items():
            Target.objects.create(upstream=up, host="127.0.0.1", port=port, weight=weight)
        api = Api.objects.create(name="LB", slug="lb", path_prefix="/lb", upstream=up)
        Route.objects.create(api=api, name="all", path="/", **(route or {}))
        live.free.apis.add(api)
        config_bump(reason="test pool")
    _wait_stable(stack, lambda: stack.get(probe).status_code != 404, timeout=10, what="the /lb API")


def hit(stack, key: str, path: str = "/lb/anything", method: str = "GET") -> tuple[int, int]:
    """(status, the port of the target that answered, or 0)."""
    resp = requests.request(
        method, stack.gateway_url + path, headers={"X-API-Key": key}, timeout=10
    )
    port = 0
    if resp.headers.get("content-type") == "application/json" and "headers" in resp.text:
        port = int(resp.json()["headers"]["Host"].rsplit(":", 1)[1])
    return resp.status_code, port


def test_round_robin_spreads_by_weight(stack, live, key, pool):
    a, b, c = pool
    serve(stack, live, {a: 100, b: 100, c: 200})
    counts = Counter(hit(stack, key)[1] for _ in range(80))
    # Exact per worker (smooth weighted round robin); two workers share requests unevenly.
    assert abs(counts[c] - 40) <= 4, counts
    assert abs(counts[a] - 20) <= 4 and abs(counts[b] - 20) <= 4, counts


def test_consistent_hash_keeps_a_client_on_one_target(stack, live, key, pool):
    serve(stack, live, pool, algorithm="consistent_hash", hash_on="header", hash_header="X-User")
    seen: dict[str, set[int]] = {}
    for user in ("ann", "bob", "cyd", "dan", "eve", "fay", "gus", "hal"):
        for _ in range(4):
            resp = stack.get("/lb/x", headers={"X-API-Key": key, "X-User": user})
            seen.setdefault(user, set()).add(int(resp.json()["headers"]["Host"].split(":")[1]))
    assert all(len(ports) == 1 for ports in seen.values()), seen  # every worker agrees
    assert len(set().union(*seen.values())) >= 2, seen


def test_a_dead_target_is_retried_elsewhere_then_ejected(stack, live, key, pool):
    dead = free_port()
    a = pool[0]
    serve(stack, live, [a, dead], eject_after_failures=2, eject_seconds=30)
    results = [hit(stack, key, method=m) for m in ("GET", "POST") * 10]
    # Connection refused: nothing was sent, so even a POST is safely retried on the other.
    assert all(r == (200, a) for r in results), results
    text = stack.ops("/metrics").text
    assert _sample(text, "gateway_upstream_retries_total", api="lb") >= 1
    assert _sample(text, "gateway_upstream_target_usable", target=f"127.0.0.1:{dead}") == 0
    assert _sample(text, "gateway_upstream_target_usable", target=f"127.0.0.1:{a}") == 1
    assert _sample(text, "gateway_upstream_target_circuit_open", target=f"127.0.0.1:{dead}") >= 1


def _sample(text: str, name: str, **labels: str) -> float:
    """The value of the first sample of `name` whose labels include `labels`."""
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no sample {name} {labels} in:\n{text[:3000]}")


def test_circuit_opens_then_a_trial_closes_it(stack, live, key, reset_pool):
    a = reset_pool[0]
    serve(stack, live, [a], eject_after_failures=3, eject_seconds=1)
    requests.get(f"http://127.0.0.1:{a}/_mode?status=503", timeout=5)
    statuses = []
    for _ in range(30):  # 3 failures per gateway worker open its circuit
        resp = stack.get("/lb/x", headers={"X-API-Key": key})
        statuses.append(resp.status_code)
        if resp.headers["content-type"] == "application/problem+json":
            assert resp.json()["type"] == "urn:apigw:problem:no-healthy-target"
            break
    else:
        pytest.fail(f"the circuit never opened: {statuses}")
    assert set(statuses[:-1]) == {503}  # the upstream's own 503s passed through until then
    requests.get(f"http://127.0.0.1:{a}/_mode?status=0", timeout=5)
    # After the cool-down one trial goes through; its success closes the circuit (in every
    # worker: each keeps its own).
    _wait_stable(
        stack,
        lambda: all(stack.get("/lb/x", headers={"X-API-Key": key}).ok for _ in range(4)),
        timeout=8,
        what="the half-open trials to close the circuits",
    )


def test_active_health_checks_take_a_target_out_and_bring_it_back(stack, live, key, reset_pool):
    a, b, _ = reset_pool
    serve(
        stack,
        live,
        [a, b],
        health_path="/healthz",
        health_interval=0.2,
        health_timeout=1,
        healthy_threshold=2,
        unhealthy_threshold=2,
        eject_after_failures=0,
        route={"retries": 0},
    )
    requests.get(f"http://127.0.0.1:{b}/_mode?status=503", timeout=5)
    _wait_stable(
        stack,
        lambda: all(hit(stack, key) == (200, a) for _ in range(4)),
        timeout=10,
        what="every worker to stop sending to the unhealthy target",
    )
    requests.get(f"http://127.0.0.1:{b}/_mode?status=0", timeout=5)
    wait_until(
        lambda: b in {hit(stack, key)[1] for _ in range(6)},
        timeout=10,
        interval=0.2,
        what="the recovered target to get traffic again",
    )


def test_idempotent_requests_are_retried_on_503_and_posts_are_not(stack, live, key, reset_pool):
    a, b, _ = reset_pool
    serve(stack, live, [a, b], eject_after_failures=0, route={"retries": 1})
    requests.get(f"http://127.0.0.1:{b}/_mode?status=503", timeout=5)
    gets = [hit(stack, key) for _ in range(10)]
    assert all(r == (200, a) for r in gets), gets
    posts = [hit(stack, key, method="POST")[0] for _ in range(10)]
    assert 503 in posts and 200 in posts, posts  # the 503 passes through untouched


def test_an_upstream_503_to_a_streamed_body_passes_through_untouched(stack, live, key, reset_pool):
    a, b, _ = reset_pool
    serve(stack, live, [a, b], eject_after_failures=0, route={"retries": 1})
    for port in (a, b):
        requests.get(f"http://127.0.0.1:{port}/_mode?status=503", timeout=5)

    def body():
        for _ in range(4):
            yield b"x" * 65536

    resp = requests.put(
        stack.gateway_url + "/lb/up", data=body(), headers={"X-API-Key": key}, timeout=10
    )
    assert resp.status_code == 503
    assert resp.headers["content-type"] == "application/json"  # the upstream's, not ours
    assert resp.json() == {"mode": 503}


def test_a_long_trial_answer_does_not_hold_the_circuit_half_open(stack, live, key, reset_pool):
    a = reset_pool[0]
    serve(stack, live, [a], eject_after_failures=1, eject_seconds=2, route={"retries": 0})
    requests.get(f"http://127.0.0.1:{a}/_mode?status=503", timeout=5)

    def refused() -> bool:
        resp = stack.get("/lb/x", headers={"X-API-Key": key})
        return resp.headers["content-type"] == "application/problem+json"

    wait_until(lambda: all(refused() for _ in range(4)), timeout=10, what="the circuits to open")
    requests.get(f"http://127.0.0.1:{a}/_mode?status=0", timeout=5)
    time.sleep(2.1)  # the cool-down: the next request is the trial
    with requests.get(
        stack.gateway_url + "/lb/hold", headers={"X-API-Key": key}, stream=True, timeout=10
    ) as trial:
        lines = trial.iter_lines()
        assert next(lines) == b"first"
        # The trial's head was good: the circuit is closed while its body still streams.
        wait_until(
            lambda: stack.get("/lb/x", headers={"X-API-Key": key}).status_code == 200,
            timeout=5,
            what="requests beside a long trial to be served",
        )
        requests.get(f"http://127.0.0.1:{a}/_release", timeout=5)
        assert next(lines) == b"rest"


@pytest.mark.parametrize("budget", [0.0, 1.0])
def test_the_retry_budget_bounds_retries_when_every_request_fails_at_once(
    stack, live, key, reset_pool, budget
):
    """30 GETs in flight, then their target answers all of them 503 at once (an outage):
    with a budget of 0 only Envoy's minimum of 3 retries per worker may be in flight, and the
    other requests get the upstream's 503 untouched instead of multiplying the load; a budget
    of 1.0 lets every one retry (twice, the route's count)."""
    (port,) = reset_pool[:1]
    serve(
        stack,
        live,
        [port],
        eject_after_failures=0,
        retry_budget=budget,
        route={"retries": 2},
    )
    stats = f"http://127.0.0.1:{port}/_stats"
    # Each try takes 1 s: the 30 requests, sent at once, are all in flight before any fails.
    requests.get(f"http://127.0.0.1:{port}/_mode?status=503&delay=1", timeout=5)
    before = requests.get(stats, timeout=5).json()["answered"]
    with ThreadPoolExecutor(max_workers=30) as ex:
        got = list(ex.map(lambda _: stack.get("/lb/x", headers={"X-API-Key": key}), range(30)))
    tries = requests.get(stats, timeout=5).json()["answered"] - before
    assert {r.status_code for r in got} == {503}
    # Each answer is the upstream's own (passed through), or, after a retry, the gateway's
    # problem naming the upstream's status: never a 500, never "no target".
    assert all(r.json().get("mode") == 503 or "503" in r.json().get("detail", "") for r in got)
    workers = int(stack.env["GATEWAY_WORKERS"])
    if budget == 0.0:
        assert 30 < tries <= 30 + 2 * 3 * workers, tries
    else:
        assert tries == 90, tries


def test_no_enabled_target_is_503(stack, live, key):
    serve(stack, live, [])
    resp = stack.get("/lb/x", headers={"X-API-Key": key})
    assert resp.status_code == 503
    assert resp.json()["type"] == "urn:apigw:problem:no-healthy-target"


# --- https upstreams -------------------------------------------------------------------------
def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def tls_upstream(tmp_path_factory):
    """An echo upstream over TLS with a certificate for `upstream.test` only (not for the
    127.0.0.1 it listens on) from a throwaway CA, requiring a client certificate from the same
    CA: (port, cert dir)."""
    d = tmp_path_factory.mktemp("tls")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=Test CA",
             "-keyout", "ca.key", "-out", "ca.pem", cwd=d)  # fmt: skip
    for name, san in (("server", "DNS:upstream.test"), ("client", "DNS:gateway")):
        (d / f"{name}.ext").write_text(f"subjectAltName={san}\n")
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}",
                 "-keyout", f"{name}.key", "-out", f"{name}.csr", cwd=d)  # fmt: skip
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                 "-CAcreateserial", "-days", "2", "-extfile", f"{name}.ext",
                 "-out", f"{name}.pem", cwd=d)  # fmt: skip
    port = free_port()
    proc = Proc(
        "tls-upstream",
        _uvicorn(
            port,
            "--ssl-keyfile",
            str(d / "server.key"),
            "--ssl-certfile",
            str(d / "server.pem"),
            "--ssl-ca-certs",
            str(d / "ca.pem"),
            "--ssl-cert-reqs",
            "2",
        ),  # fmt: skip
        env=child_env(),
        log_dir=d,
    )
    try:
        wait_until(lambda: port_open(port), timeout=30, what="the TLS upstream")
        yield port, d
    finally:
        proc.stop()


def test_https_upstream_with_verification_sni_and_a_client_certificate(
    stack, live, key, tls_upstream
):
    port, d = tls_upstream
    serve(
        stack,
        live,
        [port],
        scheme="https",
        tls_ca_file=str(d / "ca.pem"),
        tls_server_name="upstream.test",
        tls_client_cert=str(d / "client.pem"),
        tls_client_key=str(d / "client.key"),
    )
    got = stack.get("/lb/anything", headers={"X-API-Key": key})
    assert got.status_code == 200, got.text
    assert got.json()["path"] == "/anything"


@pytest.mark.parametrize(
    "wrong",
    ["untrusted CA", "certificate name", "no client certificate"],
)
def test_https_upstream_that_fails_verification_is_502(stack, live, key, tls_upstream, wrong):
    port, d = tls_upstream
    tls = {
        "tls_ca_file": str(d / "ca.pem"),
        "tls_server_name": "upstream.test",
        "tls_client_cert": str(d / "client.pem"),
        "tls_client_key": str(d / "client.key"),
    }
    if wrong == "untrusted CA":
        tls["tls_ca_file"] = ""  # the system's CAs do not know ours
    elif wrong == "certificate name":
        tls["tls_server_name"] = ""  # 127.0.0.1 is not in the certificate
    else:
        tls["tls_client_cert"] = tls["tls_client_key"] = ""
    serve(stack, live, [port], scheme="https", eject_after_failures=0, **tls)
    resp = stack.get("/lb/anything", headers={"X-API-Key": key})
    assert resp.status_code == 502, resp.text
    assert resp.json()["type"] == "urn:apigw:problem:bad-gateway"


def test_a_renewed_client_certificate_is_loaded_without_a_config_change(
    stack, live, key, tls_upstream, tmp_path
):
    """The gateway holds a client certificate from a CA the upstream does not trust (it
    answers 502); the files are then renewed in place, the key first: the gateway loads them
    with no config change, also after it saw the key and the old certificate not match."""
    port, d = tls_upstream
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj",
             "/CN=stranger", "-keyout", "old.key", "-out", "old.pem", cwd=tmp_path)  # fmt: skip
    live_dir = tmp_path / "live"
    live_dir.mkdir()
    cert, cert_key = live_dir / "client.pem", live_dir / "client.key"
    cert.write_bytes((tmp_path / "old.pem").read_bytes())
    cert_key.write_bytes((tmp_path / "old.key").read_bytes())
    serve(
        stack,
        live,
        [port],
        scheme="https",
        eject_after_failures=0,
        tls_ca_file=str(d / "ca.pem"),
        tls_server_name="upstream.test",
        tls_client_cert=str(cert),
        tls_client_key=str(cert_key),
    )
    assert stack.get("/lb/anything", headers={"X-API-Key": key}).status_code == 502

    def renew(target: Path, source: Path) -> None:  # as certbot and cert-manager do: rename
        tmp = target.with_suffix(".new")
        tmp.write_bytes(source.read_bytes())
        tmp.replace(target)

    renew(cert_key, d / "client.key")
    # A check (every 5 s) sees a key that does not match the certificate: the files that
    # loaded last keep serving (the snapshot is not refused for it).
    wait_until(
        lambda: "TLS files cannot be loaded" in stack.procs["gateway"].output(),
        timeout=15,
        what="the half-done renewal to be noticed",
    )
    assert "keeping the last good ones" in stack.procs["gateway"].output()
    assert stack.get("/lb/anything", headers={"X-API-Key": key}).status_code == 502
    renew(cert, d / "client.pem")
    # Well before the 30 s after which a failed build is retried anyway.
    _wait_stable(
        stack,
        lambda: stack.get("/lb/anything", headers={"X-API-Key": key}).status_code == 200,
        timeout=15,
        what="the renewed client certificate",
    )


def test_least_connections_keeps_new_requests_off_a_slow_target(stack, live, key, reset_pool):
    slow, fast = reset_pool[0], reset_pool[1]
    serve(stack, live, [slow, fast], algorithm="least_connections")
    requests.get(f"http://127.0.0.1:{slow}/_mode?delay=0.3", timeout=5)

    def client(_: int) -> list[int]:
        return [hit(stack, key)[1] for _ in range(10)]

    with ThreadPoolExecutor(6) as pool_:
        ports = Counter(p for ports in pool_.map(client, range(6)) for p in ports)
    # Round robin would send half (30) to the slow target; least connections sends it a new
    # request only when it has no more in flight than the fast one.
    assert sum(ports.values()) == 60 and set(ports) <= {slow, fast}, ports
    assert ports[slow] <= 15, ports


def test_consistent_hash_on_the_consumer_keeps_each_consumer_on_one_target(stack, live, pool):
    serve(stack, live, pool, algorithm="consistent_hash", hash_on="consumer")
    keys = [active_key(make_user(f"c{i}@example.com"), live.free).key for i in range(8)]
    for k in keys:
        wait_for_key(stack, k)
    seen = {k: {hit(stack, k)[1] for _ in range(4)} for k in keys}
    assert all(len(ports) == 1 for ports in seen.values()), seen  # every worker agrees
    assert len(set().union(*seen.values())) >= 2, seen  # consumers spread over targets


def test_consistent_hash_on_the_client_address(stack, live, key, pool):
    serve(stack, live, pool, algorithm="consistent_hash", hash_on="client_ip")
    # Every request comes from 127.0.0.1: one target, whichever worker answers.
    assert len({hit(stack, key)[1] for _ in range(12)}) == 1
