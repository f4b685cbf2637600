"""Route matching: longest prefix at segment boundaries, methods, normalised paths."""

from __future__ import annotations

import pytest

from gateway.dataplane.router import MethodNotAllowed, Router, normalize_path
from gateway.dataplane.snapshot import RouteEntry, UpstreamEntry

UP = UpstreamEntry(1, "up", (), 1.0, 1.0)


def route(rid: int, prefix: str, methods: str = "") -> RouteEntry:
    return RouteEntry(
        id=rid,
        api_id=1,
        api_slug="a",
        api_prefix="/a",
        prefix=prefix,
        path="/",
        methods=frozenset(m for m in methods.split(",") if m),
        strip_prefix=True,
        key_header=b"x-api-key",
        key_header_label="X-API-Key",
        fail_closed=False,
        upstream=UP,
    )


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("/a/b", "/a/b"),
        ("//a///b", "/a/b"),
        ("/a/./b/../c", "/a/c"),
        ("/a/b/", "/a/b/"),
        ("/../../etc/passwd", "/etc/passwd"),
        ("/", "/"),
        ("relative", None),
        ("/a\x00b", None),
    ],
)
def test_normalize_path(raw, expected):
    assert normalize_path(raw) == expected


def test_longest_prefix_wins_at_segment_boundaries():
    router = Router([route(1, "/demo"), route(2, "/demo/orders"), route(3, "/")])
    assert router.match("GET", "/demo/orders/7").id == 2
    assert router.match("GET", "/demo/ordersx").id == 1  # not a segment boundary
    assert router.match("GET", "/demo").id == 1
    assert router.match("GET", "/other").id == 3


def test_no_match_without_a_root_route():
    router = Router([route(1, "/demo")])
    assert router.match("GET", "/demox") is None
    assert router.match("GET", "/") is None


def test_method_specific_route_wins_and_others_get_405():
    router = Router([route(1, "/demo", "POST"), route(2, "/demo/x", "GET")])
    assert router.match("POST", "/demo/x").id == 1
    assert router.match("GET", "/demo/x").id == 2
    result = router.match("DELETE", "/demo/x")
    assert isinstance(result, MethodNotAllowed)
    assert result.allowed == {"GET", "POST"}


def test_matching_cost_does_not_depend_on_the_number_of_routes():
    routes = [route(i, f"/api{i}/v1") for i in range(10_000)]
    router = Router(routes)
    assert len(router) == 10_000
    assert router.match("GET", "/api9999/v1/x").id == 9999
