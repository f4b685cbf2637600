"""Load-balancing algorithms, the circuit breaker and the retry budget, in one worker."""

from __future__ import annotations

from collections import Counter

import pytest

from gateway.dataplane import balancer as balancer_module
from gateway.dataplane.balancer import Balancer, TargetRegistry, TargetState
from gateway.dataplane.context import RequestContext


def targets(*weights: int) -> tuple[TargetState, ...]:
    return tuple(
        TargetState("10.0.0.1", 8000 + i, f"http://10.0.0.1:{8000 + i}", w)
        for i, w in enumerate(weights)
    )


def ctx(headers=(), client_ip: str = "192.0.2.1") -> RequestContext:
    return RequestContext(
        scope={"headers": list(headers)},
        receive=None,
        send=None,
        request_id="r",
        method="GET",
        path="/",
        client_ip=client_ip,
    )


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch) -> Clock:
    c = Clock()
    monkeypatch.setattr(balancer_module.time, "monotonic", c)
    return c


def test_round_robin_rotates_and_follows_weights_smoothly():
    ts = targets(100, 100)
    b = Balancer(ts)
    assert [b.pick(ctx(), []).port for _ in range(4)] == [8000, 8001, 8000, 8001]
    ts = targets(500, 100, 100)
    b = Balancer(ts)
    order = [b.pick(ctx(), []).port - 8000 for _ in range(7)]
    assert order == [0, 0, 1, 0, 2, 0, 0]  # nginx's smooth weighted sequence, no burst
    assert Counter(b.pick(ctx(), []).port for _ in range(700)) == {8000: 500, 8001: 100, 8002: 100}


def test_least_connections_prefers_the_least_busy_per_weight():
    ts = targets(100, 100, 200)
    b = Balancer(ts, algorithm="least_connections")
    ts[0].active, ts[1].active, ts[2].active = 3, 1, 3
    assert b.pick(ctx(), []) is ts[1]
    ts[1].active = 5
    assert b.pick(ctx(), []) is ts[2]  # 3 per 200 weight is less than 3 per 100


def test_consistent_hash_is_sticky_and_moves_few_keys_when_a_target_goes():
    ts = targets(100, 100, 100, 100)
    b = Balancer(ts, algorithm="consistent_hash", hash_on="header", hash_header="X-User")
    users = [f"user-{i}".encode() for i in range(400)]
    first = {u: b.pick(ctx([(b"x-user", u)]), []) for u in users}
    assert all(b.pick(ctx([(b"x-user", u)]), []) is first[u] for u in users)  # sticky
    assert len(set(first.values())) == 4
    ts[2].healthy = False
    moved = sum(b.pick(ctx([(b"x-user", u)]), []) is not first[u] for u in users)
    on_gone = sum(t is ts[2] for t in first.values())
    assert moved == on_gone  # only the removed target's users move


def test_consistent_hash_on_client_ip_without_the_header():
    ts = targets(100, 100, 100)
    b = Balancer(ts, algorithm="consistent_hash", hash_on="header", hash_header="X-User")
    a = b.pick(ctx(client_ip="198.51.100.7"), [])
    assert all(b.pick(ctx(client_ip="198.51.100.7"), []) is a for _ in range(10))


def test_a_retry_goes_to_another_target_when_there_is_one():
    ts = targets(100, 100, 100)
    b = Balancer(ts)
    first = b.pick(ctx(), [])
    second = b.pick(ctx(), [first])
    third = b.pick(ctx(), [first, second])
    assert len({first, second, third}) == 3
    assert b.pick(ctx(), [first, second, third]) is not None  # all tried: any usable one


def test_circuit_opens_after_consecutive_failures_then_lets_one_trial_through(clock):
    (t,) = targets(100)
    b = Balancer((t,), eject_after=3, eject_seconds=10)
    for _ in range(2):
        assert b.pick(ctx(), []) is t
        b.failed(t)
    b.succeeded(t)  # a success resets the count
    for _ in range(3):
        b.pick(ctx(), [])
        b.failed(t)
    assert t.circuit == "open"
    assert b.pick(ctx(), []) is None
    clock.now += 10
    trial = b.pick(ctx(), [])
    assert trial is t and t.circuit == "half-open"
    assert b.pick(ctx(), []) is None  # only one trial at a time
    b.failed(t)  # the trial failed: open again for a full cool-down
    assert b.pick(ctx(), []) is None
    clock.now += 10
    assert b.pick(ctx(), []) is t
    b.succeeded(t)
    assert t.circuit == "closed"
    assert b.pick(ctx(), []) is t and b.pick(ctx(), []) is t


def test_an_abandoned_trial_frees_the_slot(clock):
    (t,) = targets(100)
    b = Balancer((t,), eject_after=1, eject_seconds=1)
    b.pick(ctx(), [])
    b.failed(t)
    clock.now += 1
    assert b.pick(ctx(), []) is t
    b.abandoned(t)
    assert b.pick(ctx(), []) is t


def test_unhealthy_targets_are_skipped_and_none_left_means_none():
    ts = targets(100, 100)
    b = Balancer(ts)
    ts[0].healthy = False
    assert {b.pick(ctx(), []).port for _ in range(4)} == {8001}
    ts[1].healthy = False
    assert b.pick(ctx(), []) is None


def test_retry_budget_allows_three_then_a_share_of_requests_in_flight():
    b = Balancer(targets(100), retry_budget=0.2)
    b.in_flight, b.retries_in_flight = 5, 2
    assert b.may_retry()
    b.retries_in_flight = 3
    assert not b.may_retry()
    b.in_flight = 100
    assert b.may_retry()  # 3 < 20
    b.retries_in_flight = 20
    assert not b.may_retry()


def test_target_state_survives_a_new_snapshot_and_is_forgotten_when_removed():
    registry = TargetRegistry()
    registry.begin_build()
    a = registry.target(1, "http", "10.0.0.1", 80, 100)
    registry.target(1, "http", "10.0.0.2", 80, 100)
    registry.end_build()
    a.open_until = 5.0
    registry.begin_build()
    again = registry.target(1, "http", "10.0.0.1", 80, 300)
    registry.end_build()
    assert again is a and a.open_until == 5.0 and a.weight == 300
    registry.begin_build()
    fresh = registry.target(1, "http", "10.0.0.2", 80, 100)
    registry.end_build()
    registry.begin_build()
    assert registry.target(1, "http", "10.0.0.1", 80, 100) is not a  # it was dropped
    assert fresh.base_url == "http://10.0.0.2:80"
    assert registry.target(2, "https", "::1", 443, 1).base_url == "https://[::1]:443"


@pytest.mark.parametrize("algorithm", ["round_robin", "least_connections", "consistent_hash"])
def test_weight_zero_takes_no_new_traffic_in_every_algorithm(algorithm):
    """Kong's semantics: a target of weight 0 is drained, whatever the algorithm."""
    ts = targets(100, 0, 50)
    b = Balancer(ts, algorithm=algorithm, hash_on="client_ip")
    seen = Counter(b.pick(ctx(client_ip=f"10.1.{i // 256}.{i % 256}"), []) for i in range(600))
    assert seen[ts[1]] == 0
    assert seen[ts[0]] and seen[ts[2]]
    # Not a retry's fallback either.
    assert b.pick(ctx(), [ts[0], ts[2]]) in (ts[0], ts[2])
    # Only weight 0 left (the others out): no target at all, the proxy answers 503.
    ts[0].healthy = ts[2].healthy = False
    assert b.pick(ctx(), []) is None
    zero = targets(0, 0)
    assert Balancer(zero, algorithm=algorithm).pick(ctx(), []) is None
    (alone,) = targets(0)
    assert Balancer((alone,), algorithm=algorithm).pick(ctx(), []) is None


def test_a_retry_falls_back_to_a_tried_target_when_none_other_is_left():
    (t,) = targets(100)
    b = Balancer((t,))
    assert b.pick(ctx(), [t]) is t
    a, c = targets(100, 100)
    b = Balancer((a, c))
    assert b.pick(ctx(), [a]) is c  # an untried one first
    assert b.pick(ctx(), [a, c]) in (a, c)


def test_the_retry_budget_survives_a_new_snapshot():
    """Balancers are rebuilt with every snapshot; the counters of requests and retries in
    flight must not restart at 0 (requests in flight still decrement them later)."""
    registry = TargetRegistry()
    registry.begin_build()
    old = Balancer((registry.target(1, "http", "10.0.0.1", 80, 100),), retry_budget=0)
    registry.end_build()
    old.budget.in_flight, old.budget.retries_in_flight = 10, 3
    assert not old.may_retry()
    registry.begin_build()
    new = Balancer((registry.target(1, "http", "10.0.0.1", 80, 100),), retry_budget=0)
    other = Balancer((registry.target(2, "http", "10.0.0.1", 80, 100),), retry_budget=0)
    registry.end_build()
    assert new.budget is old.budget and not new.may_retry()
    assert other.budget is not old.budget and other.may_retry()
    old.budget.retries_in_flight -= 1  # a retry of the old snapshot ends
    assert new.may_retry()
    registry.begin_build()  # upstream 1 removed: its budget goes with it
    registry.target(2, "http", "10.0.0.1", 80, 100)
    registry.end_build()
    assert registry.budget(1) is not old.budget


def test_a_budget_of_zero_still_allows_envoys_minimum_of_three_retries():
    b = Balancer(targets(100), retry_budget=0)
    b.in_flight = 1000
    b.retries_in_flight = 2
    assert b.may_retry()
    b.retries_in_flight = 3
    assert not b.may_retry()


def test_tls_contexts_are_kept_while_used_and_dropped_when_their_files_are_replaced():
    registry = TargetRegistry()
    old_key = (False, "", "", "", (None, None, None))
    new_key = (False, "", "", "", (None, None, (1, 2, 3)))
    registry.begin_build()
    old = registry.ssl(old_key)
    registry.end_build()
    registry.begin_build()
    assert registry.ssl(old_key) is old  # built once per setting
    registry.ssl(new_key)
    registry.end_build()
    registry.begin_build()
    registry.ssl(new_key)
    registry.end_build()
    assert old_key not in registry._ssl and new_key in registry._ssl
