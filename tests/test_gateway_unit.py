"""The data plane in process: snapshot compilation and quota counter persistence."""

from __future__ import annotations

import asyncio

import pytest

from gateway.dataplane.app import GatewayApp
from gateway.dataplane.limiter import MemoryLimiter
from gateway.dataplane.settings import load_settings
from gateway.dataplane.snapshot import compile_snapshot, load_config
from portal.keys import key_revoke
from portal.models import QuotaCounter
from tests.conftest import active_key, set_rate_limit

pytestmark = pytest.mark.django_db


def _app() -> GatewayApp:
    app = GatewayApp(load_settings())
    app.limiter = MemoryLimiter()
    return app


def test_snapshot_holds_routes_and_usable_keys_only(developer, catalog):
    live = active_key(developer, catalog.free, name="live")
    gone = active_key(developer, catalog.free, name="gone")
    key_revoke(gone.api_key)
    app = _app()
    apis, keys = load_config(1)
    snap = compile_snapshot(1, apis, keys, app._compile_route)
    assert set(snap.keys) == {live.api_key.key_id}
    entry = snap.keys[live.api_key.key_id]
    assert entry.plan_slug == "free"
    assert catalog.api.pk in entry.api_ids
    assert {r.kind for r in entry.limits} == {"rate", "quota"}
    route, _params = snap.router.match("GET", "/demo/anything")
    assert route.api_slug == "demo"
    assert [s.name for s in route.stages] == ["authenticate", "authorize", "limit"]


def test_embedded_quota_counters_are_saved_and_loaded_after_a_restart(developer, catalog):
    issued = active_key(developer, catalog.free)
    app = _app()
    apis, keys = load_config(1)
    rules = keys[issued.api_key.key_id].limits
    import time

    now = time.time()
    for _ in range(4):
        assert app.limiter.check_sync(rules, now).allowed
    app._save_counters()
    assert QuotaCounter.objects.get(subscription=issued.api_key.subscription).used == 4
    restarted = _app()
    restarted._load_counters()
    quota_rule = next(r for r in rules if r.kind == "quota")
    d = restarted.limiter.check_sync((quota_rule,), now)
    assert d.remaining == quota_rule.limit - 5


def test_app_answers_503_problem_before_any_configuration(db):
    app = GatewayApp(load_settings())
    sent: list[dict] = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(msg):
        sent.append(msg)

    scope = {"type": "http", "method": "GET", "path": "/x", "headers": [], "client": None}
    asyncio.run(app.handle_http(scope, receive, send))
    assert sent[0]["status"] == 503
    assert (b"content-type", b"application/problem+json") in sent[0]["headers"]


@pytest.mark.django_db(transaction=True)
def test_key_changes_apply_as_deltas_and_structural_changes_rebuild(catalog):

    from portal.keys import key_rotate
    from tests.conftest import make_user

    user = make_user("delta@example.com")
    first = active_key(user, catalog.free, name="first")
    app = _app()

    async def refresh() -> bool:
        return await app.refresh_snapshot()

    assert asyncio.run(refresh())
    built = app.snapshot
    assert set(built.keys) == {first.api_key.key_id}

    second = active_key(user, catalog.free, name="second")  # subscription exists: a key delta
    rotated = key_rotate(first.api_key)
    key_revoke(second.api_key)
    assert asyncio.run(refresh())
    snap = app.snapshot
    assert snap.router is built.router  # no rebuild: the keys changed in place
    assert snap.version > built.version
    assert set(snap.keys) == {first.api_key.key_id, rotated.api_key.key_id}
    assert snap.keys[first.api_key.key_id].expires_at is not None  # the overlap window

    set_rate_limit(plan=catalog.free, limit=7)  # a plan change: structural
    assert asyncio.run(refresh())
    assert app.snapshot.router is not built.router
    assert app.snapshot.keys[rotated.api_key.key_id].limits[0].limit == 7
    assert not asyncio.run(refresh())  # nothing moved since


@pytest.mark.django_db(transaction=True)
def test_a_snapshot_that_fails_to_compile_is_refused_and_the_last_one_serves(catalog):
    from django.db import transaction

    from gateway.config import config_bump
    from gateway.dataplane import metrics
    from gateway.models import Route

    app = _app()
    asyncio.run(app.refresh_snapshot())
    good = app.snapshot
    with transaction.atomic():
        # Saved behind the admin's back (no clean()): a regex that cannot compile.
        Route.objects.create(api=catalog.api, name="bad", match="regex", path="/(")
        config_bump(reason="bad route")
    before = metrics.SNAPSHOT_FAILURES._value.get()
    with pytest.raises(Exception, match="regular expression"):
        asyncio.run(app.refresh_snapshot())
    assert app.snapshot is good
    assert metrics.SNAPSHOT_FAILURES._value.get() == before + 1
    assert not asyncio.run(app.refresh_snapshot())  # not rebuilt again at every poll
    # Keys still change while the routes are stuck at the last good snapshot.
    from tests.conftest import make_user

    issued = active_key(make_user("late@example.com"), catalog.free)
    assert asyncio.run(app.refresh_snapshot())
    assert issued.api_key.key_id in app.snapshot.keys
    assert app.snapshot is good  # same routes, same (old) version
    key_revoke(issued.api_key)
    asyncio.run(app.refresh_snapshot())
    assert issued.api_key.key_id not in app.snapshot.keys


def test_ip_policy_deny_wins_and_mapped_addresses_count():
    from gateway.dataplane.stages.ip_policy import IpPolicyStage
    from gateway.routing import parse_networks

    stage = IpPolicyStage(
        allow=parse_networks("10.0.0.0/8, 2001:db8::/32"),
        deny=parse_networks("10.9.0.0/16"),
        api_slug="a",
    )
    assert stage.permits("10.1.2.3")
    assert stage.permits("::ffff:10.1.2.3")  # IPv4-mapped IPv6 is the IPv4 address
    assert stage.permits("2001:db8::1")
    assert not stage.permits("10.9.1.1")
    assert not stage.permits("192.0.2.1")
    assert not stage.permits("")  # no address at all
    assert IpPolicyStage(allow=(), deny=parse_networks("192.0.2.0/24"), api_slug="a").permits(
        "198.51.100.1"
    )


def test_client_address_behind_trusted_proxies_is_the_rightmost_untrusted_hop(db):
    import dataclasses
    import ipaddress

    from gateway.dataplane.networks import Networks

    app = GatewayApp(dataclasses.replace(load_settings(), trusted_proxies=("10.0.0.0/8",)))
    app._trusted_proxies = Networks(ipaddress.ip_network(n) for n in app.settings.trusted_proxies)
    chain = [(b"x-forwarded-for", b"6.6.6.6, 203.0.113.9, 10.0.0.2")]
    assert app._is_trusted("10.0.0.1") and not app._is_trusted("203.0.113.9")
    # 6.6.6.6 could be forged by the client; 203.0.113.9 is what our proxies saw.
    assert app._forwarded_client(chain) == "203.0.113.9"
    assert app._forwarded_client([(b"x-forwarded-for", b"10.0.0.3")]) == "10.0.0.3"
    assert app._forwarded_client([(b"x-forwarded-for", b"not-an-ip")]) == ""
    assert app._forwarded_client([]) == ""


def test_traceparent_validation():
    from gateway.dataplane.stages.proxy import valid_traceparent

    assert valid_traceparent(b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
    assert not valid_traceparent(b"00-00000000000000000000000000000000-00f067aa0ba902b7-01")
    assert not valid_traceparent(b"ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
    assert not valid_traceparent(b"00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01")
    assert valid_traceparent(b"01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra")


def test_query_credential_is_removed_from_the_upstream_query_string():
    from gateway.dataplane.stages.proxy import _without_param

    assert _without_param(b"a=1&api_key=gw_x&b=%20", "api_key") == b"a=1&b=%20"
    assert _without_param(b"api%5Fkey=gw_x&c", "api_key") == b"c"
    assert _without_param(b"api_keys=1", "api_key") == b"api_keys=1"


def test_targets_are_healthy_again_when_active_checks_are_turned_off():
    from gateway.dataplane.balancer import HealthChecker
    from gateway.dataplane.snapshot import UpstreamEntry
    from tests.test_balancer import targets

    ts = targets(100, 100)
    ts[0].healthy = False
    ts[0].probes_failed = 3
    checker = HealthChecker(lambda: None)
    checker.sync([UpstreamEntry(1, "up", ts, 1.0, 1.0)])  # health is None: no checks
    assert ts[0].healthy and ts[0].probes_failed == 0


def test_request_metrics_are_counted_locally_and_flushed_as_observe_would():
    from types import SimpleNamespace

    from gateway.dataplane.metrics import LATENCY, REQUESTS, MetricsStage

    def value(metric, suffix: str, **labels) -> float:
        for family in metric.collect():
            for s in family.samples:
                if s.name.endswith(suffix) and all(s.labels.get(k) == v for k, v in labels.items()):
                    return s.value
        return 0.0

    api = "metrics-unit"
    stage = MetricsStage()
    latencies = [0.0005, 0.001, 0.003, 0.003, 0.2, 45.0]  # 0.001 is in the 0.001 bucket
    for seconds in latencies:
        ctx = SimpleNamespace(
            route=SimpleNamespace(api_slug=api),
            status=200,
            elapsed=lambda s=seconds: s,
            error_kind="",
            retries=0,
        )
        stage.on_complete(ctx)
    stage.on_complete(
        SimpleNamespace(route=None, status=404, elapsed=lambda: 0.0, error_kind="", retries=0)
    )
    assert value(REQUESTS, "_total", api=api, status="2xx") == 0  # not before the flush
    stage.flush()
    assert value(REQUESTS, "_total", api=api, status="2xx") == 6
    assert value(REQUESTS, "_total", api="", status="4xx") >= 1
    assert value(LATENCY, "_sum", api=api) == pytest.approx(sum(latencies))
    assert value(LATENCY, "_count", api=api) == 6
    cumulative = {"0.001": 2, "0.005": 4, "0.1": 4, "0.25": 5, "30.0": 5, "+Inf": 6}
    for le, n in cumulative.items():
        assert value(LATENCY, "_bucket", api=api, le=le) == n, le
    stage.flush()  # nothing new: nothing added twice
    assert value(REQUESTS, "_total", api=api, status="2xx") == 6


def test_forwarded_for_nodes_and_ports():
    from gateway.dataplane.networks import forwarded_for, strip_port

    assert strip_port("203.0.113.9:5678") == "203.0.113.9"
    assert strip_port("[2001:db8::1]:443") == "2001:db8::1"
    assert strip_port("2001:db8::1") == "2001:db8::1"
    assert strip_port("203.0.113.9") == "203.0.113.9"
    assert forwarded_for('for=192.0.2.43, for="[2001:db8:cafe::17]:4711"') == [
        "192.0.2.43",
        "2001:db8:cafe::17",
    ]
    assert forwarded_for("proto=https;FOR=192.0.2.1;by=10.0.0.1") == ["192.0.2.1"]
    assert forwarded_for("proto=https, for=_hidden") == ["unknown", "_hidden"]


def test_client_address_from_a_forwarded_header_when_configured(db):
    import dataclasses
    import ipaddress

    from gateway.dataplane.networks import Networks

    settings = dataclasses.replace(
        load_settings(), trusted_proxies=("10.0.0.0/8",), real_ip_header="forwarded"
    )
    app = GatewayApp(settings)
    app._trusted_proxies = Networks(ipaddress.ip_network(n) for n in settings.trusted_proxies)
    app._real_ip_header = b"forwarded"
    fwd = [(b"forwarded", b"for=6.6.6.6, for=203.0.113.9;proto=https, for=10.0.0.2")]
    assert app._forwarded_client(fwd) == "203.0.113.9"
    assert app._forwarded_client([(b"x-forwarded-for", b"203.0.113.9")]) == ""
    assert app._forwarded_client([(b"forwarded", b"for=6.6.6.6, proto=https")]) == ""


def test_a_tls_file_change_asks_for_one_rebuild_per_change(tmp_path):
    """Each new state of an upstream's TLS files asks for a rebuild once; files that stay
    as they are (a renewal the last build could not load) are not rebuilt again and again."""
    from types import SimpleNamespace

    from gateway.dataplane.snapshot import file_stamp

    ca = tmp_path / "ca.pem"
    ca.write_text("one")
    loaded = (False, str(ca), "", "", (file_stamp(str(ca)), None, None))
    app = GatewayApp(load_settings())
    app.snapshot = SimpleNamespace(upstreams=(SimpleNamespace(name="up", ssl_key=loaded),))

    async def check() -> bool:
        app._stale = False
        return await app.check_tls_files()

    assert not asyncio.run(check())  # as loaded
    ca.write_text("two, renewed")
    assert asyncio.run(check()) and app._stale and app._tls_changed_at > 0
    assert not asyncio.run(check())  # the same files again: already asked
    ca.unlink()
    assert not asyncio.run(check())  # missing (mid-renewal): wait for it
    ca.write_text("three")
    assert asyncio.run(check())
