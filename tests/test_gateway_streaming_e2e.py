"""Bodies stream through the gateway both ways: memory stays flat, first bytes come early."""

from __future__ import annotations

import re
import subprocess

import pytest
import requests

from tests.conftest import _wait_stable, active_key, make_user, wait_for_key

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]

SIZE = 256 * 1024 * 1024
RSS_BUDGET = 32 * 1024 * 1024


@pytest.fixture
def key(stack, live):
    from django.db import transaction

    from gateway.config import config_bump
    from gateway.models import Api, Route

    with transaction.atomic():
        api = Api.objects.create(name="Big", slug="big", path_prefix="/big", upstream=live.upstream)
        Route.objects.create(api=api, name="all", path="/", max_body_bytes=0)  # no limit
        live.free.apis.add(api)
        config_bump(reason="big bodies")
    issued = active_key(make_user("dev@example.com"), live.free)
    wait_for_key(stack, issued.key)
    _wait_stable(
        stack,
        lambda: stack.get("/big/x", headers={"X-API-Key": issued.key}).status_code == 200,
        timeout=10,
        what="the /big API",
    )
    return issued.key


def _workers(stack) -> list[int]:
    master = stack.procs["gateway"].popen.pid
    out = subprocess.run(["pgrep", "-P", str(master)], capture_output=True, text=True, timeout=5)
    pids = [int(p) for p in out.stdout.split()]
    assert pids, "no gateway worker found"
    return pids


def _memory(pid: int, field: str) -> int:
    """VmRSS (now) or VmHWM (peak since start) of a process, in bytes."""
    with open(f"/proc/{pid}/status") as f:
        m = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M)
    return int(m.group(1)) * 1024


def test_256_mib_up_and_down_with_flat_gateway_memory(stack, live, key):
    pids = _workers(stack)
    before = {pid: _memory(pid, "VmRSS") for pid in pids}
    headers = {"X-API-Key": key}

    def upload():
        chunk = b"u" * (1 << 20)
        for _ in range(SIZE // len(chunk)):
            yield chunk

    up = requests.post(
        stack.gateway_url + "/big/upload", data=upload(), headers=headers, timeout=120
    )
    assert up.status_code == 200, up.text
    assert up.json()["body_size"] == SIZE

    received = 0
    with requests.get(
        stack.gateway_url + f"/big/bytes/{SIZE}", headers=headers, stream=True, timeout=120
    ) as down:
        assert down.status_code == 200
        assert down.headers["content-length"] == str(SIZE)
        for part in down.iter_content(1 << 20):
            received += len(part)
    assert received == SIZE

    for pid in pids:
        # The peak since start, against the resident size before: no body was held whole.
        growth = _memory(pid, "VmHWM") - before[pid]
        print(f"gateway worker {pid}: peak RSS grew by {growth / 2**20:.1f} MiB")
        assert growth < RSS_BUDGET, f"worker {pid} grew by {growth / 2**20:.1f} MiB"


def test_first_chunk_reaches_the_client_while_the_upstream_holds_the_rest(stack, live, key):
    with requests.get(
        stack.gateway_url + "/big/hold", headers={"X-API-Key": key}, stream=True, timeout=10
    ) as resp:
        assert resp.status_code == 200
        lines = resp.iter_lines()
        # The upstream sends the rest only after /_release: a gateway that buffered the
        # answer would never deliver this line (the read times out instead).
        assert next(lines) == b"first"
        requests.get(f"http://127.0.0.1:{stack.upstream_port}/_release", timeout=5)
        assert next(lines) == b"rest"
