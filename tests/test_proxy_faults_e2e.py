"""The proxy stage under faults, through the real gateway process: a slow client, an
upstream that reads a POST and dies, hop-by-hop response fields, the route's total deadline,
retries on a single target, and weight 0.

Misbehaving upstreams are tests/fault_upstream.py (a raw HTTP/1.1 server in its own
process); the well-behaved one is the stack's demo upstream.
"""

from __future__ import annotations

import socket
import time
import uuid

import pytest
import requests

from tests.conftest import _wait_stable, active_key, make_user, wait_for_key
from tests.procs import BIN, Proc, child_env, free_port, port_open, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]

CLIENT_BODY_TIMEOUT = 2.0
STACK_ENV = {"GATEWAY_CLIENT_BODY_TIMEOUT": str(CLIENT_BODY_TIMEOUT)}


@pytest.fixture(scope="module")
def faulty(tmp_path_factory):
    """Two ports of the fault upstream (one process)."""
    var = tmp_path_factory.mktemp("faulty")
    ports = [free_port(), free_port()]
    proc = Proc(
        "fault-upstream",
        [str(BIN / "python"), "-m", "tests.fault_upstream", *map(str, ports)],
        env=child_env(),
        log_dir=var,
    )
    try:
        for p in ports:
            wait_until(lambda p=p: port_open(p), timeout=30, what=f"fault upstream {p}")
        yield ports
    finally:
        proc.stop()


def fault_log(port: int) -> dict[str, list[str]]:
    return requests.get(f"http://127.0.0.1:{port}/_log", timeout=5).json()


@pytest.fixture
def key(stack, live):
    issued = active_key(make_user("dev@example.com"), live.free)
    wait_for_key(stack, issued.key)
    return issued.key


def serve(stack, live, ports, *, route: dict | None = None, **upstream) -> None:
    """An /x API on a new upstream over `ports` ({port: weight} or a list)."""
    from django.db import transaction

    from gateway.config import config_bump
    from gateway.models import Api, Route, Target, Upstream

    weights = ports if isinstance(ports, dict) else dict.fromkeys(ports, 100)
    settings = {"connect_timeout": 2, "read_timeout": 5, "eject_after_failures": 0, **upstream}
    with transaction.atomic():
        up = Upstream.objects.create(name="faults", **settings)
        for port, weight in weights.items():
            Target.objects.create(upstream=up, host="127.0.0.1", port=port, weight=weight)
        api = Api.objects.create(name="X", slug="x", path_prefix="/x", upstream=up)
        Route.objects.create(api=api, name="all", path="/", **(route or {}))
        live.free.apis.add(api)
        config_bump(reason="test faults")
    _wait_stable(
        stack, lambda: stack.get("/x/probe").status_code != 404, timeout=10, what="the /x API"
    )


def assert_problem(resp: requests.Response, status: int, slug: str) -> None:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"] == "application/problem+json"
    doc = resp.json()
    assert doc["type"] == f"urn:apigw:problem:{slug}", doc
    assert doc["request_id"] == resp.headers["x-request-id"]


def raw_upload(port: int, key: str, parts: list[tuple[bytes, float]]) -> tuple[int, bytes]:
    """A chunked POST sent part by part (each followed by a pause); (status, raw answer)."""
    with socket.create_connection(("127.0.0.1", port), timeout=15) as s:
        s.sendall(
            b"POST /x/upload HTTP/1.1\r\nHost: gw\r\nX-API-Key: %b\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n" % key.encode()
        )
        for data, pause in parts:
            try:
                s.sendall(data)
            except OSError:
                break  # the gateway already answered and closed
            time.sleep(pause)
        answer = b""
        for _ in range(100):  # bounded: an answer is a few reads
            try:
                got = s.recv(65536)
            except OSError:
                break
            if not got:
                break
            answer += got
            head, sep, body = answer.partition(b"\r\n\r\n")
            if sep:
                length = [
                    int(line.split(b":", 1)[1])
                    for line in head.lower().split(b"\r\n")
                    if line.startswith(b"content-length:")
                ]
                if length and len(body) >= length[0]:
                    break
    return int(answer.split(b" ", 2)[1]), answer


def test_a_slow_uploading_client_neither_times_out_nor_ejects_a_healthy_target(stack, live, key):
    """The read timeout counts the upstream's silence only; a stalled client gets 408 after
    the client body timeout, and that is never held against the target."""
    serve(
        stack,
        live,
        [stack.upstream_port],
        read_timeout=0.5,
        eject_after_failures=2,
        eject_seconds=60,
    )
    # Slower than the read timeout between chunks, faster than the client body timeout.
    for _ in range(3):
        status, answer = raw_upload(
            stack.gateway_port, key, [(b"5\r\nhello\r\n", 1.2), (b"5\r\nworld\r\n0\r\n\r\n", 0)]
        )
        assert status == 200, answer
        assert b"helloworld" in answer  # the demo upstream echoes the body it got
    # Stalled: 408 from the gateway (a problem, with the request id), then the connection ends.
    for _ in range(3):
        status, answer = raw_upload(stack.gateway_port, key, [(b"5\r\nhello\r\n", 0)])
        assert status == 408, answer
        assert b"application/problem+json" in answer
        assert b"urn:apigw:problem:request-timeout" in answer and b'"request_id"' in answer
    # Six slow or stalled clients later, the target still serves (eject after 2 failures).
    for _ in range(4):
        resp = stack.get("/x/after", headers={"X-API-Key": key})
        assert resp.status_code == 200, resp.text


def test_a_post_read_by_an_upstream_that_then_closes_is_not_sent_again(stack, live, key, faulty):
    port = faulty[0]
    serve(stack, live, [port], route={"retries": 2})
    for _ in range(3):  # keep-alive connections to the target, idle in the gateway's pool
        assert stack.get("/x/warm", headers={"X-API-Key": key}).status_code == 200
    body = f"charge-{uuid.uuid4().hex}"
    resp = requests.post(
        stack.gateway_url + "/x/drop", data=body, headers={"X-API-Key": key}, timeout=10
    )
    assert_problem(resp, 502, "bad-gateway")
    assert fault_log(port).get("/drop", []).count(body) == 1


def test_fields_named_by_the_upstreams_connection_header_are_not_passed_on(
    stack, live, key, faulty
):
    serve(stack, live, [faulty[0]])
    resp = stack.get("/x/hop", headers={"X-API-Key": key})
    assert resp.status_code == 200 and resp.text == "ok"
    assert "x-hop-secret" not in resp.headers
    assert "keep-alive" not in resp.headers
    assert resp.headers["x-end-to-end"] == "kept"


def test_the_route_timeout_is_one_deadline_over_every_try(stack, live, key, faulty):
    # Both targets never answer; each try alone would last 5 s (read timeout), the route's
    # total is 1 s: one try, cut at the deadline, and no retry after it.
    serve(stack, live, faulty, read_timeout=5, route={"timeout": 1.0, "retries": 3})
    before = [len(fault_log(p).get("/silent", [])) for p in faulty]
    resp = requests.get(stack.gateway_url + "/x/silent", headers={"X-API-Key": key}, timeout=15)
    assert_problem(resp, 504, "gateway-timeout")
    after = [len(fault_log(p).get("/silent", [])) for p in faulty]
    assert sum(after) - sum(before) == 1, (before, after)


def test_the_route_deadline_is_never_held_against_a_target(stack, live, key):
    # The route's total (0.3 s) is the client's budget; the target's own read timeout (5 s)
    # is what judges it. Three deadlines in a row, eject after 2 failures: still in service.
    serve(
        stack,
        live,
        [stack.upstream_port],
        read_timeout=5,
        eject_after_failures=2,
        eject_seconds=60,
        route={"timeout": 0.3, "retries": 0},
    )
    for _ in range(3):
        resp = requests.get(
            stack.gateway_url + "/x/delay/1", headers={"X-API-Key": key}, timeout=15
        )
        assert_problem(resp, 504, "gateway-timeout")
    for _ in range(4):  # both workers
        assert stack.get("/x/anything", headers={"X-API-Key": key}).status_code == 200


def test_per_try_read_timeouts_eject_the_target(stack, live, key):
    # The target's own read timeout (0.3 s) judges it: after 2 in a row, its circuit opens
    # (per worker) and the answer is 503 until the cool-down ends.
    serve(
        stack,
        live,
        [stack.upstream_port],
        read_timeout=0.3,
        eject_after_failures=2,
        eject_seconds=60,
        route={"retries": 0},
    )
    seen = []
    for _ in range(12):  # two workers, two timeouts each at most before one ejects
        resp = requests.get(
            stack.gateway_url + "/x/delay/1", headers={"X-API-Key": key}, timeout=15
        )
        seen.append(resp.status_code)
        if resp.status_code == 503:
            assert_problem(resp, 503, "no-healthy-target")
            break
    assert seen[-1] == 503 and set(seen[:-1]) <= {504}, seen


class _Blackhole:
    """A listening socket with a full backlog: connecting to it hangs (SYNs are dropped)."""

    def __enter__(self) -> int:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(0)
        port = self.sock.getsockname()[1]
        self.fillers = []
        for _ in range(8):
            f = socket.socket()
            f.setblocking(False)
            f.connect_ex(("127.0.0.1", port))
            self.fillers.append(f)
        return port

    def __exit__(self, *exc) -> None:
        for f in self.fillers:
            f.close()
        self.sock.close()


def test_a_connect_timeout_answers_504_after_its_retries(stack, live, key):
    with _Blackhole() as a:
        # Per try: a connect timeout (retried on the same, only, target: nothing was sent).
        serve(stack, live, [a], connect_timeout=0.3, route={"retries": 2})
        started = time.monotonic()
        resp = requests.get(stack.gateway_url + "/x/c", headers={"X-API-Key": key}, timeout=15)
        assert_problem(resp, 504, "gateway-timeout")
        assert time.monotonic() - started < 5


def test_the_route_timeout_covers_connecting(stack, live, key):
    with _Blackhole() as a, _Blackhole() as b:
        # Connecting may take 5 s per try; the route's total of 1 s includes it.
        serve(stack, live, [a, b], connect_timeout=5, route={"timeout": 1.0, "retries": 2})
        started = time.monotonic()
        resp = requests.get(stack.gateway_url + "/x/c", headers={"X-API-Key": key}, timeout=15)
        assert_problem(resp, 504, "gateway-timeout")
        assert time.monotonic() - started < 4  # not 5 s or more per try


def test_an_upstream_with_one_target_retries_on_it(stack, live, key, faulty):
    serve(stack, live, [faulty[0]], route={"retries": 2})
    flaky = f"/x/flaky?key={uuid.uuid4().hex}&fail=2"
    resp = stack.get(flaky, headers={"X-API-Key": key})
    assert resp.status_code == 200 and resp.text == "ok"  # 503, 503, then 200: same target


def test_weight_zero_takes_no_traffic_and_only_weight_zero_is_503(stack, live, key, faulty):
    drained, kept = faulty
    serve(stack, live, {drained: 0, kept: 100})
    before = len(fault_log(drained).get("/w", []))
    for _ in range(6):
        assert stack.get("/x/w", headers={"X-API-Key": key}).status_code == 200
    assert len(fault_log(drained).get("/w", [])) == before

    from django.db import transaction

    from gateway.config import config_bump
    from gateway.models import Target

    with transaction.atomic():
        Target.objects.filter(port=kept).update(weight=0)
        config_bump(reason="drain all")
    _wait_stable(
        stack,
        lambda: stack.get("/x/w", headers={"X-API-Key": key}).status_code == 503,
        timeout=10,
        what="every worker to drain the last target",
    )
    assert_problem(stack.get("/x/w", headers={"X-API-Key": key}), 503, "no-healthy-target")


def test_a_stalled_body_read_by_the_validation_stage_is_408(stack, live, key):
    from django.db import transaction

    from gateway.config import config_bump
    from gateway.models import Policy
    from tests.test_validate_e2e import DOCUMENT

    with transaction.atomic():
        live.api.openapi = DOCUMENT
        live.api.save()
        Policy.objects.create(api=live.api, kind="validate", config={})
        config_bump(reason="validation")
    h = {"X-API-Key": key}
    wait_until(
        lambda: all(stack.get("/demo/orders/x", headers=h).status_code == 400 for _ in range(4)),
        timeout=10,
        what="the validation policy",
    )
    with socket.create_connection(("127.0.0.1", stack.gateway_port), timeout=15) as s:
        s.sendall(
            b"POST /demo/orders HTTP/1.1\r\nHost: gw\r\nX-API-Key: %b\r\n"
            b'Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{"items"' % key.encode()
        )
        answer = b""
        for _ in range(100):  # until the gateway answers and closes
            got = s.recv(65536)
            if not got:
                break
            answer += got
    assert answer.startswith(b"HTTP/1.1 408 "), answer[:300]
    assert b"urn:apigw:problem:request-timeout" in answer
    assert "Traceback" not in stack.procs["gateway"].output()
