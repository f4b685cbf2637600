"""The portal's usage pages: per key and per API, ranges, quotas, CSV; only one's own calls."""

from __future__ import annotations

import csv
import io

import pytest

from analytics.ingest import ingest_batch
from tests.conftest import PASSWORD, active_key, log_event, make_user

pytestmark = pytest.mark.django_db


@pytest.fixture
def traffic(client, catalog):
    """The developer's first key (5 calls, one a 500), their second key (3 calls, one of
    them 2 days ago), and a stranger's key (7 calls) that must never show."""
    dev = make_user("dev@example.com")
    mine = active_key(dev, catalog.free, name="first").api_key
    from portal.keys import key_issue

    second = key_issue(mine.subscription, name="second").api_key
    theirs = active_key(make_user("other@example.com"), catalog.free).api_key
    demo = catalog.api.pk
    ingest_batch(
        [log_event(mine.pk, demo) for _ in range(4)]
        + [log_event(mine.pk, demo, status=500)]
        + [log_event(second.pk, demo) for _ in range(2)]
        + [log_event(second.pk, demo, ago=2 * 86400)]
        + [log_event(theirs.pk, demo) for _ in range(7)]
    )
    assert client.login(username="dev@example.com", password=PASSWORD)
    return mine, theirs, second


def test_usage_merges_ones_keys_over_ranges(client, traffic):
    mine, theirs, second = traffic
    page = client.get("/usage/")
    assert page.status_code == 200
    assert page.context["range"] == "24h" and page.context["usage"]["total"] == 7
    # In the latest hour, or the one before if the hour turned since the events were stamped.
    assert sum(page.context["usage"]["series"]["5xx"][-2:]) == 1
    assert [(k.pk, k.requests) for k in page.context["keys"]] == [(mine.pk, 5), (second.pk, 2)]
    assert page.context["quotas"][0][1].limit == 10_000
    html = page.content.decode()
    assert theirs.prefix not in html and f"/keys/{mine.pk}/usage/?range=24h" in html
    week = client.get("/usage.json", {"range": "7d"}).json()
    assert week["total"] == 8 and len(week["labels"]) == 168
    month = client.get("/usage/", {"range": "30d"})
    assert month.context["usage"]["total"] == 8 and len(month.context["usage"]["labels"]) == 30
    assert [k.requests for k in month.context["keys"]] == [5, 3]
    hour = client.get("/usage.json", {"range": "60m"}).json()
    assert hour["total"] == 7 and len(hour["labels"]) == 60
    assert client.get("/usage.json", {"range": "bogus"}).json()["total"] == 7  # the default


def test_usage_csv_holds_only_ones_own_rows(client, traffic):
    mine, theirs, second = traffic
    resp = client.get("/usage.csv", {"range": "7d"})
    rows = list(csv.reader(io.StringIO(b"".join(resp.streaming_content).decode())))[1:]
    assert {r[2] for r in rows} == {str(mine.pk), str(second.pk)}
    assert sum(int(r[5]) for r in rows) == 8


def test_a_keys_usage_has_ranges_and_strangers_get_404(client, traffic):
    mine, theirs, second = traffic
    page = client.get(f"/keys/{mine.pk}/usage/")
    assert page.context["range"] == "60m" and page.context["usage"]["total"] == 5
    html = page.content.decode()
    assert 'href="?range=30d"' in html and 'aria-current="page"' in html
    assert f"/keys/{mine.pk}/usage.json?range=60m" in html
    data = client.get(f"/keys/{second.pk}/usage.json", {"range": "30d"}).json()
    assert data["total"] == 3 and data["quota"]["limit"] == 10_000
    assert client.get(f"/keys/{second.pk}/usage.json", {"range": "24h"}).json()["total"] == 2
    assert client.get(f"/keys/{theirs.pk}/usage/").status_code == 404
    assert client.get(f"/keys/{theirs.pk}/usage.json").status_code == 404
    assert client.get(f"/keys/{theirs.pk}/usage.csv").status_code == 404


def test_empty_states_say_what_to_do(client, catalog):
    make_user("new@example.com")
    assert client.login(username="new@example.com", password=PASSWORD)
    html = client.get("/usage/").content.decode()
    assert "No keys yet" in html and 'href="/plans/"' in html


def test_usage_per_api_comes_from_key_by_api_rollups(client, traffic, catalog):
    from gateway.models import Api

    mine, theirs, second = traffic
    orders = Api.objects.create(
        name="Orders", slug="orders", path_prefix="/orders", upstream=catalog.upstream
    )
    catalog.free.apis.add(orders)
    ingest_batch(
        [log_event(mine.pk, orders.pk) for _ in range(3)]
        + [log_event(theirs.pk, orders.pk) for _ in range(5)]  # not ours
    )
    page = client.get("/usage/")
    assert page.context["usage"]["total"] == 10
    assert [(a.slug, a.requests) for a in page.context["apis"]] == [("demo", 7), ("orders", 3)]
    # Key x API rows are hourly and daily: a per-API chart starts at 24 hours.
    only = client.get("/usage/", {"api": "orders", "range": "60m"})
    assert only.context["usage"]["total"] == 3 and only.context["range"] == "24h"
    html = only.content.decode()
    assert 'href="?range=7d&amp;api=orders"' in html
    assert "/usage.json?range=24h&amp;api=orders" in html
    assert 'href="?range=60m&amp;api=orders"' not in html
    assert client.get("/usage.json", {"api": "orders", "range": "60m"}).json()["total"] == 3
    assert client.get("/usage.json", {"api": "demo"}).json()["total"] == 7
    assert client.get("/usage/", {"api": "nope"}).status_code == 404
    rows = list(
        csv.reader(
            io.StringIO(
                b"".join(client.get("/usage.csv", {"api": "orders"}).streaming_content).decode()
            )
        )
    )[1:]
    assert {r[1] for r in rows} == {"kapi"} and {r[3] for r in rows} == {str(orders.pk)}
    assert sum(int(r[5]) for r in rows) == 3
    key_page = client.get(f"/keys/{mine.pk}/usage/", {"range": "24h"})
    assert [(a.slug, a.requests) for a in key_page.context["apis"]] == [("demo", 5), ("orders", 3)]


def test_key_by_api_rollups_match_between_ingest_and_rebuild():
    """The Python aggregation and (on PostgreSQL) the SQL one encode key × API alike."""
    from analytics.models import Rollup, key_api_id

    assert key_api_id(3, 7) == (3 << 20) | 7
    assert key_api_id(3, 1 << 20) is None and key_api_id(0, 7) is None
    ingest_batch([log_event(3, 7) for _ in range(2)])
    rows = Rollup.objects.filter(dimension="kapi", granularity="h")
    assert [(r.dim_id, r.api_id, r.count) for r in rows] == [((3 << 20) | 7, 7, 2)]
    assert not Rollup.objects.filter(dimension="kapi", granularity="m").exists()  # none: cost


def test_exports_are_throttled_with_a_page_that_says_when_to_retry(
    client, traffic, pinned_ratelimit_window
):
    for _ in range(60):
        assert client.get("/usage.csv").status_code == 200
    resp = client.get("/usage.csv")
    assert resp.status_code == 429 and resp["Retry-After"] == "60"
    assert "try again in 60 seconds" in resp.content.decode()
