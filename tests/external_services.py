"""Exit 0 if the PostgreSQL and Redis servers named on the command line answer, else 1."""

from __future__ import annotations

import sys


def main(database_url: str, redis_url: str) -> int:
    try:
        import psycopg
        import redis

        with psycopg.connect(
            database_url.replace("postgres://", "postgresql://", 1),
            connect_timeout=3,
            dbname="postgres",
        ):
            pass
        redis.Redis.from_url(redis_url, socket_connect_timeout=3).ping()
    except Exception as exc:
        print(f"not reachable: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
