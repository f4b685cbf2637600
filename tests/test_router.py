"""Route matching: hosts, exact/prefix/template/regex paths, headers, versions, precedence."""

from __future__ import annotations

import pytest

from gateway import routing
from gateway.dataplane.router import MethodNotAllowed, Router, normalize_path
from gateway.dataplane.snapshot import RouteEntry, UpstreamEntry, VersionCondition

UP = UpstreamEntry(1, "up", (), 1.0, 1.0)


def route(
    rid: int,
    path: str,
    methods: str = "",
    *,
    kind: str = "prefix",
    hosts: str = "",
    headers: str = "",
    priority: int = 0,
    base: str = "",
    version: VersionCondition | None = None,
) -> RouteEntry:
    """A router entry as the snapshot compiles it; `base` is an API prefix for regex routes."""
    pattern = routing.compile_path(kind, path)
    base_segments = tuple(routing.split_path(base))
    return RouteEntry(
        id=rid,
        api_id=1,
        api_slug="a",
        path=path,
        methods=frozenset(m for m in methods.split(",") if m),
        key_header=b"x-api-key",
        key_header_label="X-API-Key",
        fail_closed=False,
        upstream=UP,
        kind=kind,
        segments=base_segments + pattern.segments,
        param_names=pattern.params if kind != "regex" else (),
        regex=pattern.regex,
        hosts=routing.parse_hosts(hosts),
        header_conditions=routing.parse_header_conditions(headers),
        priority=priority,
        version_condition=version,
    )


def match(router: Router, method: str, path: str, *, host: str = "", headers=(), query=b""):
    scope_headers = [(b"host", host.encode())] if host else []
    scope_headers += [(k.lower().encode(), v.encode()) for k, v in headers]
    return router.match(method, path, scope_headers, query)


def matched_id(router: Router, method: str, path: str, **kw) -> int | None:
    found = match(router, method, path, **kw)
    return found[0].id if isinstance(found, tuple) else None


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
        ("/public/..;/internal", None),  # Tomcat and Jetty would resolve it as ..
        ("/public/.;x/a", None),
        ("/a\\..\\b", None),  # IIS and some frameworks read a backslash as /
        ("/a/..x/b", "/a/..x/b"),  # not a dot segment
    ],
)
def test_normalize_path(raw, expected):
    assert normalize_path(raw) == expected


def test_longest_prefix_wins_at_segment_boundaries():
    router = Router([route(1, "/demo"), route(2, "/demo/orders"), route(3, "/")])
    assert matched_id(router, "GET", "/demo/orders/7") == 2
    assert matched_id(router, "GET", "/demo/ordersx") == 1  # not a segment boundary
    assert matched_id(router, "GET", "/demo") == 1
    assert matched_id(router, "GET", "/other") == 3


def test_no_match_without_a_root_route():
    router = Router([route(1, "/demo")])
    assert match(router, "GET", "/demox") is None
    assert match(router, "GET", "/") is None


def test_method_specific_route_wins_and_others_get_405():
    router = Router([route(1, "/demo", "POST"), route(2, "/demo/x", "GET")])
    assert matched_id(router, "POST", "/demo/x") == 1
    assert matched_id(router, "GET", "/demo/x") == 2
    result = match(router, "DELETE", "/demo/x")
    assert isinstance(result, MethodNotAllowed)
    assert result.allowed == {"GET", "HEAD", "POST"}  # GET brings HEAD


def test_exact_route_matches_only_its_path():
    router = Router([route(1, "/shop/cart", kind="exact"), route(2, "/shop")])
    assert matched_id(router, "GET", "/shop/cart") == 1
    assert matched_id(router, "GET", "/shop/cart/") == 1  # a trailing slash is not a segment
    assert matched_id(router, "GET", "/shop/cart/items") == 2


def test_templated_path_captures_parameters():
    router = Router([route(1, "/orders/{id}/items/{item}", kind="exact"), route(2, "/orders")])
    found, params = match(router, "GET", "/orders/42/items/a-b")
    assert found.id == 1
    assert params == {"id": "42", "item": "a-b"}
    assert matched_id(router, "GET", "/orders/42/items") == 2  # too short for the template


def test_literal_segment_beats_a_parameter_at_the_same_depth():
    router = Router([route(1, "/users/{id}", kind="exact"), route(2, "/users/me", kind="exact")])
    assert matched_id(router, "GET", "/users/me") == 2
    assert matched_id(router, "GET", "/users/7") == 1


def test_first_differing_segment_decides_between_templates():
    router = Router([route(1, "/{a}/b/{c}", kind="exact"), route(2, "/x/{b}/{c}", kind="exact")])
    assert matched_id(router, "GET", "/x/b/c") == 2  # literal "x" comes first


def test_exact_beats_regex_beats_prefix():
    router = Router(
        [
            route(1, "/shop", kind="prefix"),
            route(2, r"/items/(?P<sku>[0-9]+)", kind="regex", base="/shop"),
            route(3, "/shop/items/1", kind="exact"),
        ]
    )
    assert matched_id(router, "GET", "/shop/items/1") == 3
    found, params = match(router, "GET", "/shop/items/77")
    assert found.id == 2 and params == {"sku": "77"}
    assert matched_id(router, "GET", "/shop/items/abc") == 1


def test_regex_must_match_the_whole_rest_of_the_path():
    router = Router([route(1, r"/v[0-9]+", kind="regex", base="/api")])
    assert matched_id(router, "GET", "/api/v12") == 1
    assert match(router, "GET", "/api/v12/more") is None
    assert match(router, "GET", "/api/vx") is None


def test_regex_routes_follow_priority():
    router = Router(
        [
            route(1, r"/.*", kind="regex", priority=0),
            route(2, r"/a.*", kind="regex", priority=10),
        ]
    )
    assert matched_id(router, "GET", "/abc") == 2
    assert matched_id(router, "GET", "/xyz") == 1


def test_exact_host_then_wildcard_then_any_host():
    router = Router(
        [
            route(1, "/", hosts="api.example.com"),
            route(2, "/", hosts="*.example.com"),
            route(3, "/", hosts="*.eu.example.com"),
            route(4, "/"),
        ]
    )
    assert matched_id(router, "GET", "/x", host="api.example.com") == 1
    assert matched_id(router, "GET", "/x", host="API.Example.com:8443") == 1
    assert matched_id(router, "GET", "/x", host="shop.example.com") == 2
    assert matched_id(router, "GET", "/x", host="a.b.example.com") == 2
    assert matched_id(router, "GET", "/x", host="de.eu.example.com") == 3
    assert matched_id(router, "GET", "/x", host="example.com") == 4  # not a subdomain
    assert matched_id(router, "GET", "/x", host="other.org") == 4
    assert matched_id(router, "GET", "/x") == 4


def test_a_host_route_does_not_answer_other_hosts():
    router = Router([route(1, "/", hosts="api.example.com")])
    assert match(router, "GET", "/", host="evil.example") is None


def test_header_conditions_must_all_hold_and_make_a_route_more_specific():
    router = Router(
        [
            route(1, "/r"),
            route(2, "/r", headers="X-Tenant: blue, green\nX-Beta: *"),
        ]
    )
    assert matched_id(router, "GET", "/r", headers=[("X-Tenant", "blue"), ("X-Beta", "1")]) == 2
    assert matched_id(router, "GET", "/r", headers=[("X-Tenant", "green"), ("X-Beta", "")]) == 2
    assert matched_id(router, "GET", "/r", headers=[("X-Tenant", "red"), ("X-Beta", "1")]) == 1
    assert matched_id(router, "GET", "/r", headers=[("X-Tenant", "blue")]) == 1


def test_priority_breaks_ties_between_equally_specific_routes():
    router = Router([route(1, "/p", priority=1), route(2, "/p", priority=5)])
    assert matched_id(router, "GET", "/p") == 2
    router = Router([route(2, "/p"), route(1, "/p")])
    assert matched_id(router, "GET", "/p") == 1  # then the lower id


def test_header_version_condition_with_default():
    v1 = VersionCondition("header", "api-version", "v1", accepts_missing=True)
    v2 = VersionCondition("header", "api-version", "v2", accepts_missing=False)
    router = Router([route(1, "/api", version=v1), route(2, "/api", version=v2)])
    assert matched_id(router, "GET", "/api/x", headers=[("API-Version", "v2")]) == 2
    assert matched_id(router, "GET", "/api/x", headers=[("API-Version", "v1")]) == 1
    assert matched_id(router, "GET", "/api/x") == 1
    assert match(router, "GET", "/api/x", headers=[("API-Version", "v9")]) is None


def test_query_version_condition():
    v1 = VersionCondition("query", "version", "1", accepts_missing=True)
    v2 = VersionCondition("query", "version", "2", accepts_missing=False)
    router = Router([route(1, "/api", version=v1), route(2, "/api", version=v2)])
    assert matched_id(router, "GET", "/api/x", query=b"a=1&version=2") == 2
    assert matched_id(router, "GET", "/api/x", query=b"a=1") == 1


def test_matching_cost_does_not_depend_on_the_number_of_routes():
    routes = [route(i, f"/api{i}/v1") for i in range(10_000)]
    router = Router(routes)
    assert len(router) == 10_000
    assert matched_id(router, "GET", "/api9999/v1/x") == 9999


@pytest.mark.parametrize(
    ("kind", "path", "message"),
    [
        ("prefix", "orders", "Starts with"),
        ("prefix", "/orders/{id}/{id}", "twice"),
        ("prefix", "/orders/x{id}", "whole {name} segment"),
        ("exact", "/a b", "letters, digits"),
        ("regex", "/(unclosed", "Not a valid regular expression"),
        ("regex", "nope", "starts with '/'"),
    ],
)
def test_bad_paths_are_refused_with_a_reason(kind, path, message):
    with pytest.raises(routing.RouteConfigError) as err:
        routing.compile_path(kind, path)
    assert err.value.field == "path"
    assert message in err.value.message


def test_rewrite_may_only_use_captured_parameters():
    assert routing.compile_rewrite("/v1/o/{id}", ("id",)) == ("/v1/o/", ("id",))
    with pytest.raises(routing.RouteConfigError, match="not captured"):
        routing.compile_rewrite("/v1/{nope}", ("id",))


def test_header_conditions_are_validated():
    with pytest.raises(routing.RouteConfigError, match="line 2"):
        routing.parse_header_conditions("X-A: 1\nnot a condition")


def _both(routes):
    """The router as compiled (indexed where routes pile up) and one that only scans."""
    import gateway.dataplane.router as router_module

    indexed = Router(routes)
    saved = router_module.INDEX_FROM
    router_module.INDEX_FROM = 10**9
    try:
        scanning = Router(routes)
    finally:
        router_module.INDEX_FROM = saved
    return indexed, scanning


def test_many_regex_routes_are_indexed_by_their_literal_first_segment():
    routes = [route(0, "/api")]
    routes += [route(i, rf"/r{i}/(?P<n>\d+)", kind="regex", base="/api") for i in range(1, 300)]
    routes += [
        route(300, r"/(?P<any>[a-z]+)/list", kind="regex", base="/api"),  # no literal start
        route(301, r"^/r5$", kind="regex", base="/api"),
        route(302, r"/r7|/other", kind="regex", base="/api"),  # an alternation: never indexed
        route(303, r"/r8(?:/x)?", kind="regex", base="/api"),  # "r8(" is not a literal segment
    ]
    indexed, scanning = _both(routes)
    node = indexed._any.root.children["api"]
    assert node.regex_by_segment is not None
    assert [r.id for r in node.regex_any] == [300, 302, 303]
    for path in [
        "/api/r17/42",
        "/api/r299/1",
        "/api/r17/x",  # r17's regex fails: the prefix route
        "/api/zz/list",
        "/api/r5",
        "/api/other",
        "/api/r8",
        "/api/r8/x",
        "/api/r7/1",
        "/api",
        "/api/",
        "/api/r3/9/",
    ]:
        assert match(indexed, "GET", path) == match(scanning, "GET", path), path
    assert matched_id(indexed, "GET", "/api/r17/42") == 17
    assert match(indexed, "GET", "/api/r17/42")[1] == {"n": "42"}
    assert matched_id(indexed, "GET", "/api/zz/list") == 300
    assert matched_id(indexed, "GET", "/api/other") == 302
    assert matched_id(indexed, "GET", "/api/r8") == 303
    assert matched_id(indexed, "GET", "/api/r17/x") == 0


def test_many_routes_told_apart_by_a_header_value_are_indexed_by_it():
    routes = [route(i, "/t", headers=f"X-Tenant: t{i}") for i in range(200)]
    routes += [
        route(200, "/t", headers="X-Tenant: t3, shared"),
        route(201, "/t", "POST", headers="X-Tenant: *"),
        route(202, "/t", headers="X-Tenant: t5\nX-Plan: gold"),
        route(203, "/t"),
        route(204, "/t", "DELETE", headers="X-Tenant: t9"),
    ]
    indexed, scanning = _both(routes)
    cases = [
        ("GET", {}),
        ("GET", {"X-Tenant": "t7"}),
        ("GET", {"X-Tenant": " t150 "}),
        ("GET", {"X-Tenant": "shared"}),
        ("GET", {"X-Tenant": "t3"}),
        ("GET", {"X-Tenant": "nobody"}),
        ("POST", {"X-Tenant": "nobody"}),
        ("POST", {}),
        ("GET", {"X-Tenant": "t5", "X-Plan": "gold"}),
        ("GET", {"X-Tenant": "t5", "X-Plan": "tin"}),
        ("PUT", {"X-Tenant": "t9"}),
    ]
    for method, headers in cases:
        got = match(indexed, method, "/t/x", headers=list(headers.items()))
        want = match(scanning, method, "/t/x", headers=list(headers.items()))
        if isinstance(want, MethodNotAllowed):
            assert isinstance(got, MethodNotAllowed) and got.allowed == want.allowed
        else:
            assert got == want, (method, headers)
    assert matched_id(indexed, "GET", "/t/x", headers=[("X-Tenant", "t150")]) == 150
    assert matched_id(indexed, "GET", "/t/x", headers=[("X-Tenant", "shared")]) == 200
    assert (
        matched_id(indexed, "GET", "/t/x", headers=[("X-Tenant", "t5"), ("X-Plan", "gold")]) == 202
    )
    assert matched_id(indexed, "GET", "/t/x", headers=[("X-Tenant", "nobody")]) == 203
    assert matched_id(indexed, "POST", "/t/x", headers=[("X-Tenant", "nobody")]) == 201
    assert matched_id(indexed, "PUT", "/t/x", headers=[("X-Tenant", "t9")]) == 9


def test_indexed_and_scanning_routers_agree_on_random_tables():
    import random

    rng = random.Random(7)
    for _ in range(20):
        routes = []
        for i in range(rng.randrange(1, 60)):
            kind = rng.choice(["prefix", "exact", "regex"])
            headers = rng.choice(["", f"X-T: t{rng.randrange(6)}", "X-T: *", "X-T: t1, t2"])
            methods = rng.choice(["", "GET", "POST", "GET,PUT"])
            if kind == "regex":
                path = rng.choice([rf"/s{rng.randrange(5)}/(?P<v>\d+)", r"/(?P<w>\w+)", r"/s1$"])
                routes.append(
                    route(i, path, methods, kind=kind, base="/a", headers=headers, priority=i % 3)
                )
            else:
                path = rng.choice(["/a", "/a/s1", "/a/{x}", "/a/s2/{y}", "/b"])
                routes.append(route(i, path, methods, kind=kind, headers=headers, priority=i % 3))
        indexed, scanning = _both(routes)
        for _ in range(40):
            path = rng.choice(["/a", "/a/s1", "/a/s1/5", "/a/s3/7", "/a/zz", "/a/s2/q", "/b/c"])
            method = rng.choice(["GET", "POST", "PUT", "DELETE"])
            headers = rng.choice([[], [("X-T", f"t{rng.randrange(6)}")], [("X-T", "other")]])
            got = match(indexed, method, path, headers=headers)
            want = match(scanning, method, path, headers=headers)
            if isinstance(want, MethodNotAllowed):
                assert isinstance(got, MethodNotAllowed) and got.allowed == want.allowed
            else:
                assert got == want, (routes, method, path, headers)


def test_a_head_goes_to_a_head_route_else_to_the_get_route():
    r = Router(
        [
            route(1, "/x", "GET"),
            route(2, "/x", "HEAD", priority=-5),  # below the GET route, still HEAD's own
            route(3, "/y", "GET"),
            route(4, "/y", "POST"),
        ]
    )
    assert matched_id(r, "HEAD", "/x") == 2
    assert matched_id(r, "GET", "/x") == 1
    assert matched_id(r, "HEAD", "/y") == 3  # no HEAD route: the GET one answers
    refused = match(r, "DELETE", "/y")
    assert isinstance(refused, MethodNotAllowed)
    assert refused.allowed == frozenset({"GET", "HEAD", "POST"})
    assert match(r, "HEAD", "/nowhere") is None
