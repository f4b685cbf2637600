"""What the bench scripts share: a free loopback port, the embedded-defaults environment, a
percentile."""

from __future__ import annotations

import math
import os
import socket

SERVER_VARIABLES = ("DATABASE_URL", "REDIS_URL", "CELERY_BROKER_URL")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def embedded_env(var_dir: str, **extra: str) -> dict[str, str]:
    """This environment without servers or GATEWAY_* settings: the embedded defaults, with
    local state in `var_dir`."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in SERVER_VARIABLES and not k.startswith("GATEWAY_")
    }
    env.update(VAR_DIR=var_dir, PYTHONUNBUFFERED="1", **extra)
    return env


def percentile(sorted_values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100) of an already sorted list."""
    if not sorted_values:
        return None
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]
