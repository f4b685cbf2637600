"""The response cache through the real gateway (in process, or Redis in the servers pass)."""

from __future__ import annotations

import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from tests.conftest import _wait_stable, active_key, make_user, wait_for_key
from tests.procs import wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]


@pytest.fixture
def cached(stack, live):
    """/demo caches for 60 s; a key to call it with."""
    from django.db import transaction

    from gateway.config import config_bump
    from gateway.models import Policy

    with transaction.atomic():
        Policy.objects.create(api=live.api, kind="cache", config={"ttl": 60, "statuses": [200]})
        config_bump(reason="cache")
    issued = active_key(make_user("dev@example.com"), live.free)
    wait_for_key(stack, issued.key)
    headers = {"X-API-Key": issued.key}
    wait_until(
        lambda: all(
            stack.get("/demo/warm", headers=headers).headers.get("x-cache") for _ in range(4)
        ),
        timeout=10,
        what="the cache policy",
    )
    return headers


def _calls(stack, target: str) -> int:
    stats = requests.get(f"http://127.0.0.1:{stack.upstream_port}/_stats", timeout=5).json()
    return stats["requests"].get(target, 0)


def test_a_second_get_is_a_hit_with_age_and_a_304_for_its_etag(stack, cached):
    path = f"/demo/item?id={uuid.uuid4().hex}"
    first = stack.get(path, headers=cached)
    assert first.status_code == 200 and first.headers["x-cache"] == "MISS"
    second = stack.get(path, headers=cached)
    assert second.headers["x-cache"] == "HIT"
    assert second.json() == first.json()  # the same answer, not asked again
    assert int(second.headers["age"]) >= 0
    assert _calls(stack, "/item?" + path.split("?", 1)[1]) == 1
    etag = second.headers["etag"]
    not_modified = stack.get(path, headers={**cached, "If-None-Match": etag})
    assert not_modified.status_code == 304
    assert not_modified.content == b""
    head = requests.head(stack.gateway_url + path, headers=cached, timeout=10)
    assert head.headers["x-cache"] == "HIT" and head.content == b""
    posted = requests.post(stack.gateway_url + path, headers=cached, timeout=10)
    assert posted.headers["x-cache"] == "BYPASS"


def test_entries_are_per_consumer(stack, live, cached):
    other = active_key(make_user("other@example.com"), live.free)
    wait_for_key(stack, other.key)
    path = f"/demo/me?id={uuid.uuid4().hex}"
    mine = stack.get(path, headers=cached)
    theirs = stack.get(path, headers={"X-API-Key": other.key})
    assert theirs.headers["x-cache"] == "MISS"
    assert mine.json()["headers"]["X-Consumer-Id"] != theirs.json()["headers"]["X-Consumer-Id"]


def test_concurrent_misses_make_one_upstream_call(stack, cached):
    """Single flight: 12 clients ask at once for an answer that takes 0.5 s upstream."""
    query = uuid.uuid4().hex
    path = f"/demo/delay/0.5?k={query}"
    with ThreadPoolExecutor(max_workers=12) as pool:
        answers = list(pool.map(lambda _: stack.get(path, headers=cached), range(12)))
    assert all(a.status_code == 200 for a in answers)
    assert _calls(stack, f"/delay/0.5?k={query}") == 1
    assert sorted(a.headers["x-cache"] for a in answers).count("MISS") == 1


def test_no_store_answers_are_not_kept_and_a_purge_empties_the_cache(stack, live, cached):
    from gateway.actions import cache_purge

    path = f"/demo/item?id={uuid.uuid4().hex}"
    stack.get(path, headers=cached)
    assert stack.get(path, headers=cached).headers["x-cache"] == "HIT"
    cache_purge(api=live.api)
    wait_until(
        lambda: all(stack.get(path, headers=cached).headers["x-cache"] == "MISS" for _ in range(1)),
        timeout=10,
        what="the purge to reach the gateway",
    )
    # The upstream's own refusal is respected (the demo's /status/200 sends none: use the
    # response transform to add one, as an upstream would).
    from django.db import transaction

    from gateway.config import config_bump
    from gateway.models import Policy

    with transaction.atomic():
        Policy.objects.create(
            api=live.api,
            kind="response_transform",
            config={"headers": {"set": {"Cache-Control": "no-store"}}},
        )
        config_bump(reason="no-store")

    def fresh() -> str:
        return f"/demo/item?id={uuid.uuid4().hex}"

    # Every worker (not just the first to rebuild its snapshot) must have the transform.
    _wait_stable(
        stack,
        lambda: stack.get(fresh(), headers=cached).headers.get("cache-control") == "no-store",
        timeout=10,
        what="the no-store answers",
    )
    path = fresh()
    assert stack.get(path, headers=cached).headers["x-cache"] == "MISS"
    assert stack.get(path, headers=cached).headers["x-cache"] == "MISS"  # not kept


def test_one_answer_is_purged_by_its_cache_key_from_admin(stack, cached, admin_client):
    from django.urls import reverse

    path = f"/demo/item?id={uuid.uuid4().hex}"
    first = stack.get(path, headers=cached)
    key = first.headers["x-cache-key"]
    assert stack.get(path, headers=cached).headers["x-cache"] == "HIT"
    other = f"/demo/item?id={uuid.uuid4().hex}"
    stack.get(other, headers=cached)
    resp = admin_client.post(reverse("admin:gateway_cachepurge_add"), {"cache_key": key})
    assert resp.status_code == 302, resp.content[:2000]
    wait_until(
        lambda: stack.get(path, headers=cached).headers["x-cache"] == "MISS",
        timeout=10,
        what="the purge of one key",
    )
    assert stack.get(other, headers=cached).headers["x-cache"] == "HIT"  # only that one
