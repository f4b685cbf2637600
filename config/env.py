"""Strict readers for settings that come from the environment.

Every reader fails with ImproperlyConfigured naming the variable, so a bad value stops
start-up with a message the operator can act on.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from urllib.parse import parse_qs, unquote, urlsplit

from django.core.exceptions import ImproperlyConfigured

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def env_str(name: str, default: str = "") -> str:
    return os.environ.get(name, default)


def env_bool(name: str, default: bool = False) -> bool:
    raw = os.environ.get(name)
    if raw is None:
        return default
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ImproperlyConfigured(f"{name} must be a boolean (1/0, true/false), got {raw!r}")


def env_int(name: str, default: int, *, minimum: int | None = None) -> int:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ImproperlyConfigured(f"{name} must be an integer, got {raw!r}") from None
    if minimum is not None and value < minimum:
        raise ImproperlyConfigured(f"{name} must be at least {minimum}, got {value}")
    return value


def env_float(name: str, default: float, *, minimum: float | None = None) -> float:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ImproperlyConfigured(f"{name} must be a number, got {raw!r}") from None
    if value != value or (minimum is not None and value < minimum):  # NaN, or too small
        raise ImproperlyConfigured(f"{name} must be at least {minimum}, got {raw!r}")
    return value


def env_choice(name: str, default: str, choices: tuple[str, ...]) -> str:
    """One of `choices` (case-insensitive), or the default when unset or empty."""
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    value = raw.strip().lower()
    if value not in choices:
        raise ImproperlyConfigured(f"{name} must be one of {', '.join(choices)}, got {raw!r}")
    return value


def env_list(name: str, default: list[str]) -> list[str]:
    raw = os.environ.get(name)
    if raw is None:
        return default
    return [item.strip() for item in raw.split(",") if item.strip()]


def env_cidrs(name: str) -> tuple[str, ...]:
    """Comma-separated networks (10.0.0.0/8, ::1, 192.168.1.7): normalised CIDR strings."""
    import ipaddress

    out = []
    for item in env_list(name, []):
        try:
            out.append(str(ipaddress.ip_network(item, strict=False)))
        except ValueError:
            raise ImproperlyConfigured(
                f"{name} must be comma-separated IP networks (10.0.0.0/8), got {item!r}"
            ) from None
    return tuple(out)


@dataclass(frozen=True)
class DatabaseUrl:
    engine: str
    name: str
    user: str = ""
    password: str = ""
    host: str = ""
    port: str = ""
    options: dict[str, str] | None = None


def parse_database_url(name: str, raw: str) -> DatabaseUrl:
    """Parse `postgres://user:pass@host:port/db?sslmode=require` or `sqlite:///abs/path`."""
    parts = urlsplit(raw)
    scheme = parts.scheme.lower()
    if scheme in {"postgres", "postgresql", "pgsql"}:
        db = unquote(parts.path.lstrip("/"))
        if not db:
            raise ImproperlyConfigured(f"{name} must name a database: {_redact(raw)}")
        try:
            port = str(parts.port or "")
        except ValueError:
            raise ImproperlyConfigured(f"{name} has an invalid port: {_redact(raw)}") from None
        options = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        return DatabaseUrl(
            engine="django.db.backends.postgresql",
            name=db,
            user=unquote(parts.username or ""),
            password=unquote(parts.password or ""),
            host=parts.hostname or "",
            port=port,
            options=options,
        )
    if scheme == "sqlite":
        # sqlite:////abs/path.db is an absolute path, sqlite:///rel.db a relative one.
        path = unquote(parts.path)[1:]
        if not path or parts.netloc:
            raise ImproperlyConfigured(f"{name} must give a file path: sqlite:////abs/path.db")
        return DatabaseUrl(engine="django.db.backends.sqlite3", name=path)
    raise ImproperlyConfigured(
        f"{name} must start with postgres:// or sqlite://, got {_redact(raw)!r}"
    )


def check_url(name: str, raw: str, schemes: set[str]) -> str:
    """Return `raw` if its scheme is one of `schemes`; otherwise refuse to start."""
    scheme = urlsplit(raw).scheme.lower()
    if scheme not in schemes:
        allowed = ", ".join(sorted(f"{s}://" for s in schemes))
        raise ImproperlyConfigured(f"{name} must start with one of {allowed}; got {_redact(raw)!r}")
    return raw


def _redact(raw: str) -> str:
    """The URL with its password replaced, fit for an error message."""
    parts = urlsplit(raw)
    if parts.password:
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
        return parts._replace(netloc=netloc).geturl()
    return raw
