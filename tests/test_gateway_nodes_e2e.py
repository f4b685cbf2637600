"""Two gateway nodes (separate gunicorn processes) on one configuration."""

from __future__ import annotations

import time

import pytest
import requests
from django.urls import reverse

from tests.conftest import active_key, make_user, wait_for_key
from tests.procs import BIN, Proc, child_env, free_port, port_open, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]


@pytest.fixture(scope="module")
def second_node(stack, tmp_path_factory):
    """Another gateway process beside the stack's: its base URL."""
    port, ops = free_port(), free_port()
    env = child_env(
        **{**stack.env, "GATEWAY_BIND": f"127.0.0.1:{port}", "GATEWAY_OPS_BIND": f"127.0.0.1:{ops}"}
    )
    proc = Proc(
        "gateway-2",
        [str(BIN / "gunicorn"), "-c", "gateway/dataplane/gunicorn_conf.py"],
        env=env,
        log_dir=tmp_path_factory.mktemp("node2"),
    )
    try:
        wait_until(lambda: port_open(port), timeout=30, what="the second gateway")
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.stop()


def test_a_key_revoked_in_admin_is_rejected_by_every_node_within_one_second(
    stack, live, second_node, client
):
    from portal.models import ApiKey

    issued = active_key(make_user("dev@example.com"), live.free)
    nodes = [stack.gateway_url, second_node]
    wait_for_key(stack, issued.key)
    headers = {"X-API-Key": issued.key}
    wait_until(
        lambda: requests.get(second_node + "/demo/x", headers=headers, timeout=5).ok,
        timeout=10,
        what="the second node to know the key",
    )
    admin = make_user("admin@example.com")
    admin.is_staff = admin.is_superuser = True
    admin.save()
    client.force_login(admin)
    resp = client.post(
        reverse("admin:portal_apikey_changelist"),
        {"action": "revoke", "_selected_action": [issued.api_key.pk]},
    )
    assert resp.status_code == 302
    revoked = time.monotonic()
    assert ApiKey.objects.get(pk=issued.api_key.pk).revoked_at is not None

    def rejected_everywhere() -> bool:
        # Several requests per node, so that each of its workers is asked.
        return all(
            requests.get(node + "/demo/x", headers=headers, timeout=5).status_code == 401
            for node in nodes
            for _ in range(4)
        )

    # The deadline is 1 s; 1 s of margin for a loaded CI machine.
    wait_until(rejected_everywhere, timeout=2.0, interval=0.02, what="every node to reject")
    took = time.monotonic() - revoked
    print(f"revoked key rejected by both nodes after {took:.2f} s")
    assert all(
        requests.get(node + "/demo/x", headers=headers, timeout=5).status_code == 401
        for node in nodes
        for _ in range(10)
    )


def _build_failures(stack) -> float:
    text = requests.get(f"http://127.0.0.1:{stack.ops_port}/metrics", timeout=5).text
    values = [
        float(line.split()[-1])
        for line in text.splitlines()
        if line.startswith("gateway_snapshot_build_failures_total")
    ]
    return values[0] if values else 0.0


def test_a_node_keeps_serving_its_last_snapshot_when_a_new_one_fails_to_build(
    stack, live, second_node
):
    from django.db import transaction

    from gateway.config import config_bump
    from gateway.models import Route

    issued = active_key(make_user("dev2@example.com"), live.free)
    wait_for_key(stack, issued.key)
    before = _build_failures(stack)
    with transaction.atomic():
        # Saved behind the admin's back (which would refuse it): a regex that cannot compile.
        Route.objects.create(api=live.api, name="broken", match="regex", path="/(")
        config_bump(reason="a route that cannot compile")
    wait_until(
        lambda: _build_failures(stack) > before,
        timeout=10,
        what="the gateway to try (and refuse) the new snapshot",
    )
    for node in (stack.gateway_url, second_node):
        for _ in range(4):
            resp = requests.get(node + "/demo/x", headers={"X-API-Key": issued.key}, timeout=5)
            assert resp.status_code == 200, resp.text
