"""The portal's usage pages: per key and per API, ranges, quotas, CSV; only one's own calls."""

from __future__ import annotations

import csv
import io
import time
import uuid

import pytest

from analytics.ingest import ingest_batch
from tests.conftest import PASSWORD, active_key, make_user

pytestmark = pytest.mark.django_db


def _event(key: int, api: int, status: int = 200, ms: float = 3.0, ago: float = 0.0) -> dict:
    return {
        "id": uuid.uuid4().hex,
        "t": time.time() - ago,
        "api": api,
        "route": None,
        "route_path": "/",
        "consumer": None,
        "key": key,
        "org": None,
        "method": "GET",
        "status": status,
        "ms": ms,
        "up_ms": None,
        "in": 0,
        "out": 10,
        "err": "",
    }


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
        [_event(mine.pk, demo) for _ in range(4)]
        + [_event(mine.pk, demo, status=500)]
        + [_event(second.pk, demo) for _ in range(2)]
        + [_event(second.pk, demo, ago=2 * 86400)]
        + [_event(theirs.pk, demo) for _ in range(7)]
    )
    assert client.login(username="dev@example.com", password=PASSWORD)
    return mine, theirs, second


def test_usage_merges_ones_keys_over_ranges(client, traffic):
    mine, theirs, second = traffic
    page = client.get("/usage/")
    assert page.status_code == 200
    assert page.context["range"] == "24h" and page.context["usage"]["total"] == 7
    assert page.context["usage"]["series"]["5xx"][-1] == 1
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
