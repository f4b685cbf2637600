"""The benchmark's bookkeeping (bench/run.py): what it derives from the runs it made.

The bench itself is not run here (it needs nginx, wrk and idle cores; `make bench`), but the
numbers it reports are worked out by plain functions that a wrong index would silently
skew: added latency per round, and the gateway's own view read back from its log spool.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from gateway.dataplane.logship import EVENT_FIELDS, encode_batch

BENCH = Path(__file__).resolve().parent.parent / "bench"


def _load(name: str, filename: str):
    """A bench/ script as module `name`, with bench/ on sys.path as when it runs; undone after."""
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location(name, BENCH / filename)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # its dataclasses look their module up there
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(name, None)
        sys.modules.pop("run", None)  # scaling.py imports bench/run.py under that name
        sys.path.remove(str(BENCH))


@pytest.fixture(scope="module")
def bench_run():
    yield from _load("bench_run", "run.py")


def event(t: float, ms: float, up_ms: float | None) -> tuple:
    values = dict.fromkeys(EVENT_FIELDS)
    values.update(id="e", t=t, method="GET", status=200, ms=ms, up_ms=up_ms)
    return tuple(values[name] for name in EVENT_FIELDS)


def run(target: str, rnd: int, p50: float, p99: float, window=None) -> dict:
    f = {"target": target, "rate": 100.0, "round": rnd, "latency_ms": {"p50": p50, "p99": p99}}
    if window is not None:
        f["window"] = window
    return f


def test_inside_gateway_takes_each_runs_events_from_its_time_window(bench_run, tmp_path):
    spool = tmp_path / "spool"
    spool.mkdir()
    # Run A (t 100..110): 100 events, ms 1..100, upstream 0.5 ms each. Run B (t 200..210):
    # answered without an upstream (a cache hit), so its own time is all of it. Outside both
    # windows, an event that must not count.
    a = [event(100 + i * 0.1, float(i + 1), 0.5) for i in range(100)]
    b = [event(200 + i, 2.0, None) for i in range(10)]
    (spool / "0001-1-00000001.json").write_bytes(encode_batch(a[:60]))
    (spool / "0002-1-00000002.json").write_bytes(encode_batch(a[60:] + b + [event(150, 999, 1)]))
    (spool / ".0003-1-00000003.json.tmp").write_bytes(b"not finished")  # ignored, as by ingest
    fixed = [
        run("direct", 1, 0.1, 0.2, window=(100, 110)),
        run("gateway", 1, 1.0, 2.0, window=(100, 110)),
        run("gateway-cache-hit", 1, 1.0, 2.0, window=(200, 210)),
        run("gateway", 2, 1.0, 2.0),  # no window recorded: left alone
    ]
    bench_run.inside_gateway(bench_run.spool_events(spool), fixed)

    assert "gateway_ms" not in fixed[0] and "gateway_ms" not in fixed[3]
    a_view = fixed[1]["gateway_ms"]
    assert a_view["events"] == 100
    assert a_view["total"] == {"p50": 50.0, "p90": 90.0, "p99": 99.0}
    assert a_view["own"] == {"p50": 49.5, "p90": 89.5, "p99": 98.5}
    b_view = fixed[2]["gateway_ms"]
    assert b_view["events"] == 10
    assert b_view["own"] == b_view["total"] == {"p50": 2.0, "p90": 2.0, "p99": 2.0}


def test_fixed_medians_subtract_each_rounds_own_direct_run(bench_run):
    fixed = [
        run("direct", 1, 0.10, 0.20),
        run("direct", 2, 0.10, 1.20),  # a noisy baseline round
        run("direct", 3, 0.10, 0.20),
        run("gateway", 1, 0.30, 1.20),
        run("gateway", 2, 0.30, 2.20),
        run("gateway", 3, 0.30, 3.20),
    ]
    for f, inside in zip(fixed[3:], (0.4, 0.5, 0.9), strict=True):
        f["gateway_ms"] = {
            "events": 10,
            "total": {"p50": 0.1, "p90": 0.2, "p99": inside},
            "own": {"p50": 0.05, "p90": 0.1, "p99": inside / 2},
        }
    for f, cpu_s in zip(fixed, (0.1, 0.1, 0.1, 3.0, 2.0, 4.0), strict=True):
        f["completed"] = 10_000
        f["usage"] = {"wall_s": 6.0, "target_cpu_s": cpu_s}
    rows = {name: row for _, name, row in bench_run.fixed_medians(fixed)}

    gw = rows["gateway"]
    assert gw["added_p99"] == pytest.approx([1.0, 1.0, 3.0])
    assert gw["added_p99_median"] == pytest.approx(1.0)
    assert gw["added_p50_median"] == pytest.approx(0.2)
    assert gw["p99"] == pytest.approx(2.2)
    assert gw["inside_p99"] == pytest.approx(0.5)
    assert gw["own_p99"] == pytest.approx(0.25)
    assert rows["direct"]["added_p99"] == [] and rows["direct"]["inside_p99"] is None
    # CPU: the median round used 3.0 s of CPU in 6 s (50 % of a core), 300 µs per request.
    assert gw["cpu_pct"] == pytest.approx(50.0)
    assert gw["cpu_us_per_req"] == pytest.approx(300.0)


def test_percentile_is_nearest_rank(bench_run):
    values = [float(i) for i in range(1, 11)]
    assert bench_run.percentile(values, 50) == 5.0
    assert bench_run.percentile(values, 90) == 9.0
    assert bench_run.percentile(values, 99) == 10.0
    assert bench_run.percentile([], 50) is None


@pytest.fixture(scope="module")
def bench_scaling():
    yield from _load("bench_scaling", "scaling.py")


def test_scaling_charges_cpu_to_process_groups(bench_scaling):
    snapshot = {10: (10, 500), 11: (10, 250), 20: (20, 40), 30: (30, 7)}  # pid: (pgrp, jiffies)
    assert bench_scaling.group_cpu(snapshot, {"gateway": 10, "redis": 20}) == {
        "gateway": 750,
        "redis": 40,
    }


def test_scaling_compares_requests_per_gateway_cpu_second(bench_scaling):
    def run(layout, target, rnd, rps, cores):
        helpers = {"wrk": 0.1, "upstream": 0.1, "redis": 0.05}
        return bench_scaling.Run(layout, target, rnd, rps, 1.0, 2.0, 0, cores, helpers)

    runs = []
    for rnd, jitter in ((1, 1.0), (2, 1.1), (3, 0.9)):  # medians pick the middle round
        runs += [
            run("1 worker", "full", rnd, 9000 * jitter, 1.0),
            run("2 workers, 1 core", "full", rnd, 8100 * jitter, 1.0),
            run("2 workers", "full", rnd, 11250 * jitter, 1.4),
        ]
    report = bench_scaling.render(runs, _Args(), (0, 1), "test")
    row = next(line for line in report.splitlines() if line.startswith("| full | 1.25 |"))
    # 11,250 / 9,000 rps; (8,100 / 1.0) / 9,000 per CPU-second; (11,250 / 1.4) / 9,000.
    assert row == "| full | 1.25 | 0.90 | 0.89 |"
    assert "| full | 2 workers | 11,250 |" in report


class _Args:
    connections = 50
    duration = 8
    rounds = 3


def test_guest_halt_polling_is_set_for_the_run_and_restored_after_it(
    bench_run, tmp_path, monkeypatch
):
    knob = tmp_path / "guest_halt_poll_ns"
    knob.write_text("0\n")
    monkeypatch.setattr(bench_run, "HALT_POLL", knob)
    with pytest.raises(KeyboardInterrupt), bench_run.guest_halt_poll(200_000):
        assert knob.read_text() == "200000" and bench_run.halt_poll_ns() == "200000"
        raise KeyboardInterrupt
    assert knob.read_text() == "0"
    with bench_run.guest_halt_poll(None):  # default: the machine's setting is left alone
        assert knob.read_text() == "0"
    monkeypatch.setattr(bench_run, "HALT_POLL", tmp_path / "missing")
    assert bench_run.halt_poll_ns() == "n/a"
    with pytest.raises(bench_run.BenchError, match="needs root"), bench_run.guest_halt_poll(1):
        pass
