"""CORS stage: config validation, origin matching, preflights and actual requests."""

from __future__ import annotations

import json

import pytest

from gateway.dataplane.context import RequestContext
from gateway.dataplane.stages.cors import CorsConfig, CorsConfigError, CorsStage, parse_cors

APP = "https://app.example.com"
PREFLIGHT_VARY = b"Origin, Access-Control-Request-Method, Access-Control-Request-Headers"


def request(method: str = "GET", **headers: str) -> RequestContext:
    """A request with `headers` given as keyword arguments (origin=..., access_control_...)."""
    raw = [(k.replace("_", "-").encode(), v.encode("latin-1")) for k, v in headers.items()]
    return RequestContext(
        scope={"headers": raw},
        receive=None,
        send=None,
        request_id="r1",
        method=method,
        path="/",
        client_ip="127.0.0.1",
    )


def preflight(origin: str, method: str = "PUT", headers: str | None = None) -> RequestContext:
    extra = {"access_control_request_headers": headers} if headers is not None else {}
    return request("OPTIONS", origin=origin, access_control_request_method=method, **extra)


def stage(**doc) -> CorsStage:
    doc.setdefault("origins", [APP])
    return CorsStage(parse_cors(doc))


def run(s: CorsStage, ctx: RequestContext):
    return s.on_request(ctx)  # decides from memory: an answer, not an awaitable


def allows(s: CorsStage, origin: str) -> bool:
    return s.allow_origin(origin.encode()) is not None


def as_dict(headers: list[tuple[bytes, bytes]]) -> dict[bytes, bytes]:
    assert len({k for k, _ in headers}) == len(headers), headers  # no header twice
    return dict(headers)


# --- parse_cors ---------------------------------------------------------------------------------


def test_a_full_config_is_parsed_with_defaults_for_what_is_missing():
    config = parse_cors({"origins": [APP]})
    assert config == CorsConfig(origins=(APP,))
    assert config.methods == ("GET", "HEAD", "POST")
    assert config.max_age == 600 and not config.credentials
    full = parse_cors(
        {
            "origins": [APP, "https://*.example.org", "null"],
            "methods": ["GET", "PUT"],
            "headers": ["Content-Type", "X-Trace"],
            "expose_headers": ["X-Total"],
            "credentials": True,
            "max_age": 86400,
        }
    )
    assert full.headers == ("Content-Type", "X-Trace") and full.credentials


@pytest.mark.parametrize(
    ("doc", "field"),
    [
        (["https://a.example"], "cors"),
        ("origins", "cors"),
        ({"origins": [APP], "allow_origins": [APP]}, "allow_origins"),
        ({}, "origins"),
        ({"origins": []}, "origins"),
        ({"origins": APP}, "origins"),  # a string, not a list
        ({"origins": [APP, 42]}, "origins[1]"),
        ({"origins": [APP, APP + "/"]}, "origins[1]"),  # trailing slash
        ({"origins": [APP + "/api"]}, "origins[0]"),  # a path
        ({"origins": ["app.example.com"]}, "origins[0]"),  # no scheme
        ({"origins": ["https://user@app.example.com"]}, "origins[0]"),
        ({"origins": [APP + "?q=1"]}, "origins[0]"),
        ({"origins": ["https://app example.com"]}, "origins[0]"),
        ({"origins": ["https://app.example.com."]}, "origins[0]"),
        ({"origins": ["https://-bad.example.com"]}, "origins[0]"),
        ({"origins": [APP + ":0"]}, "origins[0]"),
        ({"origins": [APP + ":65536"]}, "origins[0]"),
        ({"origins": [APP + ":080"]}, "origins[0]"),
        ({"origins": [APP + ":"]}, "origins[0]"),
        ({"origins": ["http://999.1.1.1"]}, "origins[0]"),
        ({"origins": ["http://[::g]"]}, "origins[0]"),
        ({"origins": ["https://*"]}, "origins[0]"),
        ({"origins": ["https://*.com"]}, "origins[0]"),  # a whole top-level domain
        ({"origins": ["https://*example.com"]}, "origins[0]"),
        ({"origins": ["https://a.*.example.com"]}, "origins[0]"),
        ({"origins": ["https://*.*.example.com"]}, "origins[0]"),
        ({"origins": ["*.example.com"]}, "origins[0]"),
        ({"origins": ["https://*.0.0.1"]}, "origins[0]"),
        ({"origins": ["*://app.example.com"]}, "origins[0]"),
        ({"origins": [APP], "methods": []}, "methods"),
        ({"origins": [APP], "methods": "GET"}, "methods"),
        ({"origins": [APP], "methods": ["GET", "BAD METHOD"]}, "methods[1]"),
        ({"origins": [APP], "methods": ["GET", "*"]}, "methods[1]"),
        ({"origins": [APP], "methods": [""]}, "methods[0]"),
        ({"origins": [APP], "headers": ["x-ok", "x bad"]}, "headers[1]"),
        ({"origins": [APP], "headers": ["x:colon"]}, "headers[0]"),
        ({"origins": [APP], "headers": [None]}, "headers[0]"),
        ({"origins": [APP], "expose_headers": ["ok", "bad\n"]}, "expose_headers[1]"),
        ({"origins": [APP], "credentials": "true"}, "credentials"),
        ({"origins": [APP], "credentials": 1}, "credentials"),
        ({"origins": [APP], "max_age": -1}, "max_age"),
        ({"origins": [APP], "max_age": 86401}, "max_age"),
        ({"origins": [APP], "max_age": "600"}, "max_age"),
        ({"origins": [APP], "max_age": 1.5}, "max_age"),
        ({"origins": [APP], "max_age": True}, "max_age"),
    ],
)
def test_a_bad_config_is_refused_naming_its_field(doc, field):
    with pytest.raises(CorsConfigError) as caught:
        parse_cors(doc)
    assert caught.value.field == field
    assert str(caught.value).startswith(f"{field}: ")
    assert isinstance(caught.value, ValueError)  # what models.parse_policy expects


@pytest.mark.parametrize(
    ("doc", "field"),
    [
        ({"origins": ["*"], "credentials": True}, "origins[0]"),
        ({"origins": [APP, "*"], "credentials": True}, "origins[1]"),
        ({"origins": [APP], "headers": ["x-a", "*"], "credentials": True}, "headers[1]"),
        ({"origins": [APP], "expose_headers": ["*"], "credentials": True}, "expose_headers[0]"),
    ],
)
def test_a_wildcard_with_credentials_is_refused(doc, field):
    with pytest.raises(CorsConfigError, match="credentials") as caught:
        parse_cors(doc)
    assert caught.value.field == field


def test_wildcards_without_credentials_are_accepted():
    config = parse_cors({"origins": ["*"], "headers": ["*"], "expose_headers": ["*"]})
    assert config.origins == ("*",)


def test_a_config_built_directly_is_validated_too():
    with pytest.raises(CorsConfigError, match=r"^origins\[0\]: "):
        CorsConfig(origins=("*",), credentials=True)
    with pytest.raises(CorsConfigError, match=r"^origins\[0\]: "):
        CorsConfig(origins=("https://x.example/",))


# --- origin matching ----------------------------------------------------------------------------


def test_exact_origins_match_case_insensitively_on_scheme_and_host_and_exactly_on_port():
    s = stage(origins=["https://App.Example.com", "http://localhost:8080"])
    assert allows(s, "https://app.example.com")
    assert allows(s, "HTTPS://APP.EXAMPLE.COM")
    assert allows(s, "http://localhost:8080")
    assert not allows(s, "http://app.example.com")  # another scheme
    assert not allows(s, "https://app.example.com:8443")
    assert not allows(s, "http://localhost")
    assert not allows(s, "http://localhost:80800")
    assert not allows(s, "https://app.example.com.evil.net")
    assert not allows(s, "")


def test_a_default_port_in_the_config_matches_the_origin_browsers_send():
    s = stage(origins=["https://app.example.com:443", "http://[0:0::1]:80"])
    assert allows(s, "https://app.example.com")
    assert allows(s, "http://[::1]")


def test_a_pattern_matches_exactly_one_label_under_its_domain():
    s = stage(origins=["https://*.example.com"])
    assert allows(s, "https://x.example.com")
    assert allows(s, "https://A-1.Example.COM")
    assert not allows(s, "https://example.com")
    assert not allows(s, "https://.example.com")
    assert not allows(s, "https://evil-example.com")
    assert not allows(s, "https://evilexample.com")
    assert not allows(s, "https://x.example.com.evil.net")
    assert not allows(s, "https://a.b.example.com")  # one label, like a TLS wildcard
    assert not allows(s, "http://x.example.com")
    assert not allows(s, "https://x.example.com:8443")
    assert not allows(s, "https://x.example.com/")
    assert not allows(s, "https://x.example.com\n")
    assert not allows(s, "https://x.exampleXcom")  # the dot is literal


def test_a_pattern_with_a_port_matches_only_that_port():
    s = stage(origins=["https://*.example.com:8443", "https://*.example.org"])
    assert allows(s, "https://x.example.com:8443")
    assert not allows(s, "https://x.example.com")
    assert allows(s, "https://y.example.org")


def test_the_null_origin_matches_only_when_listed():
    assert not allows(stage(origins=["*"]), "null")
    assert not allows(stage(origins=["https://*.example.com"]), "null")
    assert not allows(stage(origins=[APP]), "null")
    listed = stage(origins=[APP, "null"])
    assert listed.allow_origin(b"null") == b"null"
    assert allows(listed, APP)
    assert stage(origins=["*", "null"]).allow_origin(b"null") == b"null"


def test_origin_star_allows_any_origin_with_a_literal_star():
    s = stage(origins=["*"])
    assert s.allow_origin(b"https://anything.test:1234") == b"*"


# --- actual requests ----------------------------------------------------------------------------


def test_without_an_origin_nothing_is_added():
    s = stage(credentials=True, expose_headers=["x-total"])
    for method in ("GET", "OPTIONS"):
        ctx = request(method, access_control_request_method="PUT")
        assert run(s, ctx) is None
        assert ctx.response_headers == []


def test_an_allowed_origin_gets_the_cors_headers_on_its_response():
    s = stage(credentials=True, expose_headers=["X-Total", "X-Page"])
    ctx = request("POST", origin=APP)
    assert run(s, ctx) is None
    assert as_dict(ctx.response_headers) == {
        b"access-control-allow-origin": APP.encode(),
        b"access-control-allow-credentials": b"true",
        b"access-control-expose-headers": b"X-Total, X-Page",
        b"vary": b"Origin",
    }


def test_the_origin_is_echoed_as_the_browser_sent_it():
    s = stage(origins=["https://*.example.com"])
    ctx = request(origin="https://Tenant.example.com")
    run(s, ctx)
    assert as_dict(ctx.response_headers)[b"access-control-allow-origin"] == (
        b"https://Tenant.example.com"
    )


def test_a_minimal_config_adds_only_allow_origin_and_vary():
    ctx = request(origin=APP)
    run(stage(), ctx)
    assert ctx.response_headers == [
        (b"access-control-allow-origin", APP.encode()),
        (b"vary", b"Origin"),
    ]


def test_origin_star_answers_star_without_vary():
    s = stage(origins=["*"], expose_headers=["x-total"])
    ctx = request(origin="https://anywhere.test")
    run(s, ctx)
    assert as_dict(ctx.response_headers) == {
        b"access-control-allow-origin": b"*",
        b"access-control-expose-headers": b"x-total",
    }


def test_a_disallowed_origin_proceeds_with_only_vary():
    s = stage(credentials=True, expose_headers=["x-total"])
    for origin in ("https://evil.test", "null"):
        ctx = request("DELETE", origin=origin)
        assert run(s, ctx) is None
        assert ctx.response_headers == [(b"vary", b"Origin")]
    ctx = request(origin="null")
    run(stage(origins=["*"]), ctx)
    assert ctx.response_headers == [(b"vary", b"Origin")]


def test_an_options_request_without_a_requested_method_is_an_actual_request():
    ctx = request("OPTIONS", origin=APP)
    assert run(stage(), ctx) is None
    assert as_dict(ctx.response_headers)[b"access-control-allow-origin"] == APP.encode()


def test_cors_headers_add_to_what_other_stages_added():
    ctx = request(origin=APP)
    ctx.response_headers.append((b"x-ratelimit-limit", b"10"))
    run(stage(), ctx)
    assert ctx.response_headers[0] == (b"x-ratelimit-limit", b"10")
    assert len(ctx.response_headers) == 3


def test_requests_do_not_share_or_change_the_stages_header_lists():
    s = stage(headers=["*"], expose_headers=["x-total"])
    first = run(s, preflight(APP, "POST", "x-a"))
    first.headers.append((b"x-mutated", b"1"))
    ctx = request(origin=APP)
    run(s, ctx)
    ctx.response_headers.append((b"x-mutated", b"1"))
    again = run(s, preflight(APP, "POST", "x-b"))
    assert b"x-mutated" not in as_dict(again.headers)
    assert again.status == 204
    assert as_dict(again.headers)[b"access-control-allow-headers"] == b"x-b"
    later = request(origin=APP)
    run(s, later)
    assert b"x-mutated" not in as_dict(later.response_headers)


# --- preflights ---------------------------------------------------------------------------------


def test_an_allowed_preflight_is_answered_204_with_the_grant():
    s = stage(
        methods=["GET", "put", "DELETE"],
        headers=["Content-Type", "X-Trace"],
        expose_headers=["x-total"],  # for actual responses only
        credentials=True,
        max_age=120,
    )
    ctx = preflight(APP, "PUT", "x-trace, content-type")
    response = run(s, ctx)
    assert response.status == 204
    assert response.body == b""
    assert as_dict(response.headers) == {
        b"access-control-allow-origin": APP.encode(),
        b"access-control-allow-credentials": b"true",
        b"access-control-allow-methods": b"GET, PUT, DELETE",
        b"access-control-allow-headers": b"content-type, x-trace",
        b"access-control-max-age": b"120",
        b"vary": PREFLIGHT_VARY,
    }
    assert ctx.response_headers == []


def test_requested_headers_are_matched_case_insensitively_ignoring_blanks():
    s = stage(methods=["PUT"], headers=["X-Trace", "content-type"])
    response = run(s, preflight(APP, "PUT", " Content-Type ,X-TRACE,, "))
    assert response.status == 204


def test_a_preflight_without_requested_headers_needs_no_header_list():
    response = run(stage(methods=["PUT"]), preflight(APP, "PUT"))
    assert response.status == 204
    headers = as_dict(response.headers)
    assert b"access-control-allow-headers" not in headers
    assert b"access-control-allow-credentials" not in headers
    assert headers[b"access-control-max-age"] == b"600"


def test_header_star_echoes_the_requested_headers():
    s = stage(methods=["PUT"], headers=["*"])
    response = run(s, preflight(APP, "PUT", "Authorization, X-Anything"))
    assert response.status == 204
    # Echoed, not "*": a literal "*" would not cover Authorization.
    assert as_dict(response.headers)[b"access-control-allow-headers"] == (
        b"authorization, x-anything"
    )
    bare = run(s, preflight(APP, "PUT"))
    assert b"access-control-allow-headers" not in as_dict(bare.headers)


def test_header_star_does_not_echo_what_is_not_a_header_name():
    s = stage(methods=["PUT"], headers=["*"])
    response = run(s, preflight(APP, "PUT", "x-ok, bad name"))
    assert response.status == 403


def test_origin_star_answers_a_preflight_with_star():
    response = run(stage(origins=["*"], methods=["PATCH"]), preflight("https://a.test", "PATCH"))
    assert response.status == 204
    assert as_dict(response.headers)[b"access-control-allow-origin"] == b"*"


def refused(response, what: str) -> dict:
    assert response.status == 403
    headers = as_dict(response.headers)
    assert headers[b"content-type"] == b"application/problem+json"
    assert not [k for k in headers if k.startswith(b"access-control-allow-")]
    doc = json.loads(response.body)
    assert doc["type"] == "urn:apigw:problem:forbidden"
    assert doc["request_id"] == "r1"
    assert what in doc["detail"]
    return doc


def test_a_preflight_from_a_disallowed_origin_is_refused():
    s = stage(methods=["PUT"], credentials=True)
    ctx = preflight("https://evil.test", "PUT")
    doc = refused(run(s, ctx), "Origin")
    assert "https://evil.test" in doc["detail"]
    assert ctx.error_kind == "cors_denied"
    refused(run(stage(origins=["*"], methods=["PUT"]), preflight("null", "PUT")), "Origin")


def test_a_preflight_for_a_disallowed_method_is_refused():
    s = stage(methods=["GET", "PUT"])
    doc = refused(run(s, preflight(APP, "DELETE")), "Method")
    assert "DELETE" in doc["detail"]
    # Methods are case-sensitive: a browser sends "patch" as written, and would then
    # compare it exactly with Access-Control-Allow-Methods.
    refused(run(stage(methods=["PATCH"]), preflight(APP, "patch")), "Method")
    refused(run(s, preflight(APP, "")), "Method")


def test_a_preflight_for_a_disallowed_header_is_refused():
    s = stage(methods=["PUT"], headers=["content-type"])
    doc = refused(run(s, preflight(APP, "PUT", "content-type, x-secret")), "Header")
    assert "x-secret" in doc["detail"]
    refused(run(stage(methods=["PUT"]), preflight(APP, "PUT", "content-type")), "Header")


def test_a_refused_preflight_adds_nothing_to_the_context():
    ctx = preflight("https://evil.test")
    run(stage(methods=["PUT"]), ctx)
    assert ctx.response_headers == []


def test_a_long_origin_is_cut_short_in_the_detail():
    doc = refused(run(stage(), preflight("https://" + "a" * 500 + ".test")), "Origin")
    assert len(doc["detail"]) < 200
