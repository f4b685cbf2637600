"""The operations listener: Prometheus metrics over every worker, health and readiness."""

from __future__ import annotations

import re
import time

import pytest

from tests.conftest import active_key, make_user, wait_for_key
from tests.procs import wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]


def sample(text: str, name: str, **labels: str) -> float:
    """The value of one sample in a Prometheus text exposition (0 when absent)."""
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        m = re.match(r"^(\w+)(?:\{(.*)\})? (\S+)$", line)
        if not m or m.group(1) != name:
            continue
        got = ",".join(sorted((m.group(2) or "").split(","))) if m.group(2) else ""
        if got == want:
            return float(m.group(3))
    return 0.0


def settled(stack) -> str:
    """A scrape taken once the counters stopped moving: each worker adds its request counts
    every second (metrics.MetricsStage.flush), so requests made just before may still be on
    their way. Two scrapes 1.2 s apart that agree; bounded, for a loaded machine."""
    deadline = time.monotonic() + 15
    last = stack.ops("/metrics").text
    while True:
        time.sleep(1.2)
        text = stack.ops("/metrics").text
        counts = [ln for ln in text.splitlines() if ln.startswith("gateway_requests_total")]
        if counts == [ln for ln in last.splitlines() if ln.startswith("gateway_requests_total")]:
            return text
        assert time.monotonic() < deadline, "the request counters never settled"
        last = text


def test_health_and_readiness(stack, live):
    assert stack.ops("/healthz").json() == {"status": "ok"}
    ready = stack.ops("/readyz").json()
    assert ready["status"] == "ready"
    assert ready["routes"] == 1
    assert ready["config_version"] >= 1


def test_ops_paths_are_not_served_on_the_public_port(stack, live):
    for path in ("/metrics", "/healthz", "/readyz"):
        assert stack.get(path).status_code == 404


def test_metrics_count_requests_of_every_worker_by_api_and_status_class(stack, live):
    dev = make_user("metrics@example.com")
    issued = active_key(dev, live.free)
    wait_for_key(stack, issued.key)
    before = settled(stack)  # wait_for_key's own requests are counted before the baseline
    ok_before = sample(before, "gateway_requests_total", api="demo", status="2xx")
    denied_before = sample(before, "gateway_requests_total", api="demo", status="4xx")
    for _ in range(20):
        assert stack.get("/demo/m", headers={"X-API-Key": issued.key}).status_code == 200
    for _ in range(5):
        assert stack.get("/demo/m").status_code == 401

    def counted() -> bool:
        text = stack.ops("/metrics").text
        ok = sample(text, "gateway_requests_total", api="demo", status="2xx") - ok_before
        denied = sample(text, "gateway_requests_total", api="demo", status="4xx") - denied_before
        return ok == 20 and denied == 5

    # With Redis the stack runs two workers: the sums prove one scrape covers both.
    wait_until(counted, timeout=5, what="the request counters to add up")
    text = stack.ops("/metrics").text
    assert sample(text, "gateway_request_duration_seconds_count", api="demo") >= 25
    assert "gateway_config_version" in text
    assert "gateway_log_buffer_events" in text
    assert "gateway_log_events_dropped" in text
    assert issued.api_key.key_id not in text  # no per-key labels


def test_upstream_errors_are_counted(stack, live):
    from django.db import transaction

    from gateway.config import config_bump
    from gateway.models import Target, Upstream
    from tests.procs import free_port

    with transaction.atomic():
        Target.objects.filter(upstream=live.upstream).update(port=free_port())
        # Never eject: wait_for_key's probes would open the circuit (503 instead of 502).
        Upstream.objects.filter(pk=live.upstream.pk).update(eject_after_failures=0)
        config_bump(reason="closed port")
    dev = make_user("errors@example.com")
    issued = active_key(dev, live.free)
    wait_for_key(stack, issued.key)
    before = sample(
        settled(stack),
        "gateway_upstream_errors_total",
        api="demo",
        kind="upstream_error",
    )
    assert stack.get("/demo/x", headers={"X-API-Key": issued.key}).status_code == 502
    wait_until(
        lambda: (
            sample(
                stack.ops("/metrics").text,
                "gateway_upstream_errors_total",
                api="demo",
                kind="upstream_error",
            )
            == before + 1
        ),
        timeout=5,
        what="the upstream error to be counted",
    )
