"""The admin traffic dashboard, CSV exports (admin and portal), all read from rollups."""

from __future__ import annotations

import csv
import io

import pytest
from django.urls import reverse

from analytics.ingest import ingest_batch
from tests.conftest import active_key, log_event

pytestmark = pytest.mark.django_db


def _csv(response) -> list[list[str]]:
    body = b"".join(response.streaming_content).decode()
    return list(csv.reader(io.StringIO(body)))


def test_dashboard_shows_totals_top_apis_and_keys(admin_client, developer, catalog):
    issued = active_key(developer, catalog.free)
    api = catalog.api.pk
    calls = [log_event(issued.api_key.pk, api) for _ in range(8)]
    ingest_batch([*calls, log_event(None, api, 502)])
    resp = admin_client.get(reverse("admin:analytics_dashboard"), {"range": "24h"})
    assert resp.status_code == 200
    assert resp.context["total"] == 9
    assert resp.context["top_apis"][0]["name"] == "Demo"
    assert resp.context["top_apis"][0]["error_rate"] == pytest.approx(1 / 9, abs=1e-3)
    assert resp.context["top_keys"][0]["count"] == 8
    assert issued.api_key.prefix in resp.content.decode()
    owners = resp.context["top_consumers"]
    assert [(r["name"], r["count"]) for r in owners] == [("dev@example.com", 8)]
    assert "Top consumers" in resp.content.decode()
    for name in ("7d", "30d", "bogus"):
        assert (
            admin_client.get(reverse("admin:analytics_dashboard"), {"range": name}).status_code
            == 200
        )


def test_dashboard_is_for_staff_only(client, developer):
    client.force_login(developer)
    assert client.get(reverse("admin:analytics_dashboard")).status_code == 302


def test_admin_export_streams_rollups_as_csv(admin_client, catalog):
    from datetime import UTC, datetime, timedelta

    ingest_batch([log_event(None, catalog.api.pk) for _ in range(3)])
    now = datetime.now(UTC)
    resp = admin_client.get(
        reverse("admin:analytics_export"),
        {
            "granularity": "h",
            "dimension": "api",
            "since": (now - timedelta(days=1)).strftime("%Y-%m-%d %H:%M"),
            "until": (now + timedelta(hours=1)).strftime("%Y-%m-%d %H:%M"),
        },
    )
    assert resp.status_code == 200
    assert resp["Content-Type"].startswith("text/csv")
    rows = _csv(resp)
    assert rows[0][:3] == ["bucket", "dimension", "id"]
    assert rows[1][1:6] == ["api", str(catalog.api.pk), str(catalog.api.pk), "2xx", "3"]


def test_admin_export_refuses_a_bad_range_with_form_errors(admin_client):
    resp = admin_client.get(
        reverse("admin:analytics_export"),
        {"granularity": "h", "dimension": "api", "since": "2026-02-01", "until": "2026-01-01"},
    )
    assert resp.status_code == 400
    assert b"must be after" in resp.content


def test_portal_csv_has_only_the_users_own_key(client, developer, stranger, catalog):
    mine = active_key(developer, catalog.free, name="mine")
    theirs = active_key(stranger, catalog.free, name="theirs")
    ingest_batch(
        [log_event(mine.api_key.pk, catalog.api.pk), log_event(theirs.api_key.pk, catalog.api.pk)]
    )
    client.force_login(developer)
    rows = _csv(client.get(reverse("portal:key_usage_csv", args=[mine.api_key.pk])))
    assert len(rows) == 2 and rows[1][2] == str(mine.api_key.pk)
    assert client.get(reverse("portal:key_usage_csv", args=[theirs.api_key.pk])).status_code == 404
