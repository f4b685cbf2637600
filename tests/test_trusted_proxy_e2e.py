"""Behind a trusted proxy: which header names the client (GATEWAY_REAL_IP_HEADER), through
real gateway processes that trust loopback as their load balancer."""

from __future__ import annotations

import pytest
import requests

from tests.conftest import active_key, make_user, wait_for_key
from tests.procs import BIN, Proc, child_env, free_port, port_open, wait_until
from tests.test_gateway_access_e2e import api

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]


def _node(stack, tmp_path_factory, name: str, **env: str):
    port, ops = free_port(), free_port()
    proc = Proc(
        name,
        [str(BIN / "gunicorn"), "-c", "gateway/dataplane/gunicorn_conf.py"],
        env=child_env(
            **{
                **stack.env,
                "GATEWAY_BIND": f"127.0.0.1:{port}",
                "GATEWAY_OPS_BIND": f"127.0.0.1:{ops}",
                "GATEWAY_TRUSTED_PROXIES": "127.0.0.0/8, ::1",
                **env,
            }
        ),
        log_dir=tmp_path_factory.mktemp(name),
    )
    wait_until(lambda: port_open(port), timeout=30, what=name)
    return proc, f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def nodes(stack, tmp_path_factory):
    """{header name: base URL} of two gateways behind loopback "proxies", one reading
    X-Forwarded-For (the default), one Forwarded."""
    started = []
    try:
        for header in ("x-forwarded-for", "forwarded"):
            started.append(
                (header, *_node(stack, tmp_path_factory, header, GATEWAY_REAL_IP_HEADER=header))
            )
        yield {header: url for header, _, url in started}
    finally:
        for _, proc, _ in started:
            proc.stop()


def test_the_client_comes_from_the_configured_header_only(stack, live, nodes):
    issued = active_key(make_user("dev@example.com"), live.free)
    wait_for_key(stack, issued.key)
    api(stack, live, "denied", ip_deny="203.0.113.0/24")
    key = {"X-API-Key": issued.key}

    def get(node: str, **headers: str) -> requests.Response:
        return requests.get(nodes[node] + "/denied/anything", headers={**key, **headers}, timeout=5)

    for node in nodes:
        wait_until(lambda n=node: get(n).status_code == 200, timeout=10, what=f"{node} config")

    xff, fwd = "x-forwarded-for", "forwarded"
    # The header each node reads names the denied client: 403, naming it.
    cases = [
        (xff, {"X-Forwarded-For": "203.0.113.9"}),
        (xff, {"X-Forwarded-For": "203.0.113.9:5678"}),  # proxies that add the port
        (xff, {"X-Forwarded-For": "6.6.6.6, 203.0.113.9"}),  # rightmost untrusted hop
        (fwd, {"Forwarded": "for=203.0.113.9"}),
        (fwd, {"Forwarded": 'for="203.0.113.9:4711";proto=https'}),
        (fwd, {"Forwarded": 'for=6.6.6.6, For="203.0.113.9";by=10.0.0.1'}),
    ]
    for node, headers in cases:
        resp = get(node, **headers)
        assert resp.status_code == 403, (node, headers, resp.text)
        assert "203.0.113.9" in resp.json()["detail"]

    # The other header is whatever a client sent through its proxy: never believed.
    assert get(xff, Forwarded="for=203.0.113.9").status_code == 200
    assert get(fwd, **{"X-Forwarded-For": "203.0.113.9"}).status_code == 200
    # A forged address left of the one the proxy saw does not count.
    assert get(fwd, Forwarded="for=203.0.113.9, for=198.51.100.7").status_code == 200
    # A hop that does not say, or hides, who it forwarded for: the peer is the client.
    for value in ("for=unknown", "for=_hidden", "proto=https", "for="):
        resp = get(fwd, Forwarded=value)
        assert resp.status_code == 200, (value, resp.text)
    echo = get(fwd, Forwarded='for="[2001:db8::7]:80"').json()
    assert echo["headers"]["X-Forwarded-For"] == "127.0.0.1"


def test_forwarding_headers_behind_a_trusted_proxy(stack, live, nodes):
    issued = active_key(make_user("dev@example.com"), live.free)
    wait_for_key(stack, issued.key)
    url = nodes["x-forwarded-for"] + "/demo/anything"
    wait_until(
        lambda: requests.get(url, headers={"X-API-Key": issued.key}, timeout=5).ok,
        timeout=10,
        what="the node to know the key",
    )
    resp = requests.get(
        url,
        headers={
            "X-API-Key": issued.key,
            "X-Forwarded-For": "203.0.113.9",
            "X-Forwarded-Proto": "https",
            "X-Forwarded-Host": "pub.example",
            "Forwarded": 'for=203.0.113.9;proto=https;host="pub.example"',
            "Via": "1.1 edge",
        },
        timeout=5,
    )
    assert resp.status_code == 200, resp.text
    seen = {k.lower(): v for k, v in resp.json()["headers"].items()}
    # The client's view, as the trusted proxy told it, goes on in X-Forwarded-*...
    assert seen["x-forwarded-for"] == "203.0.113.9, 127.0.0.1"
    assert seen["x-forwarded-proto"] == "https"
    assert seen["x-forwarded-host"] == "pub.example"
    # ...while our Forwarded element describes our own hop: plain http, the Host we got.
    port = url.split(":")[2].split("/")[0]
    assert seen["forwarded"] == (
        f'for=203.0.113.9;proto=https;host="pub.example", '
        f'for=127.0.0.1;proto=http;host="127.0.0.1:{port}"'
    )
    assert seen["via"] == "1.1 edge, 1.1 apigw"
