"""Ingest throughput: events/s through analytics.ingest.ingest_batch (raw insert + rollups).

Events are generated in time order (5,000/s of traffic, 200 keys, 10 APIs, 30 routes), as
gateways ship them; a batch's rollup rows then grow with distinct keys, not with events.

Runs on the server DATABASE_URL names, in a database of its own (bench/benchdb.py; default:
SQLite in a temporary VAR_DIR), in one process, in batches of 1,000 events as the gateway
ships them (a Redis stream ingest takes up to 10 entries of 1,000 per transaction). Usage:
    .venv/bin/python bench/ingest.py [--events 50000]
"""

from __future__ import annotations

import argparse
import random
import sys
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=50_000)
    parser.add_argument("--batch", type=int, default=1_000)
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from benchdb import setup_django

    vendor = setup_django("ingest")
    from analytics.ingest import ingest_batch
    from analytics.models import RequestEvent, Rollup

    RequestEvent.objects.all().delete()  # the bench database's own leftovers
    Rollup.objects.all().delete()
    rng = random.Random(7)
    now = time.time()
    run = uuid.uuid4().hex[:8]
    events = [
        {
            "id": f"bench-{run}-{i}",
            # In time order, as gateways ship them: N events at 5,000/s.
            "t": now - (args.events - i) / 5000,
            "api": rng.randint(1, 10),
            "route": rng.randint(1, 30),
            "route_path": "/",
            "consumer": rng.randint(1, 100),
            "key": rng.randint(1, 200),
            "org": rng.choice([None, 1, 2, 3]),
            "method": "GET",
            "status": rng.choice([200] * 18 + [404, 503]),
            "ms": rng.expovariate(1 / 20),
            "up_ms": 1.0,
            "in": 0,
            "out": 512,
            "err": "",
        }
        for i in range(args.events)
    ]
    started = time.perf_counter()
    stored = 0
    for i in range(0, len(events), args.batch):
        stored += ingest_batch(events[i : i + args.batch])
    took = time.perf_counter() - started
    again = time.perf_counter()
    repeated = ingest_batch(events[: args.batch])  # a redelivered batch: nothing new
    redelivery = time.perf_counter() - again
    print(
        f"| {vendor} | {args.events:,} | {args.batch:,} | {stored / took:,.0f} | "
        f"{Rollup.objects.count():,} | {redelivery * 1000:.0f} ms ({repeated} new) |"
    )


if __name__ == "__main__":
    main()
