"""Route matching, compiled once per snapshot.

Routes are keyed by their full path prefix. A request path is matched by looking up its own
prefixes at segment boundaries, longest first (`/a/b/c`, `/a/b`, `/a`, `/`), so the cost grows
with the depth of the path, not with the number of routes. At one prefix, a route that names
the request's method wins over one that accepts any method.
"""

from __future__ import annotations

import posixpath
import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gateway.dataplane.snapshot import RouteEntry

_SLASHES = re.compile(r"/{2,}")


def normalize_path(path: str) -> str | None:
    """Collapse duplicate slashes and resolve dot segments; None if the path is unusable."""
    if not path.startswith("/") or "\x00" in path:
        return None
    trailing = path.endswith("/") and path != "/"
    path = posixpath.normpath(_SLASHES.sub("/", path))
    if path.startswith("//"):  # normpath keeps a POSIX "//" root
        path = path[1:]
    if trailing and path != "/":
        path += "/"
    return path


class MethodNotAllowed:
    """A path matched, but no route there accepts the method."""

    __slots__ = ("allowed",)

    def __init__(self, allowed: frozenset[str]) -> None:
        self.allowed = allowed


class Router:
    def __init__(self, routes: list[RouteEntry]) -> None:
        table: dict[str, list[RouteEntry]] = {}
        for route in routes:
            table.setdefault(route.prefix, []).append(route)
        for entries in table.values():
            # Method-specific routes first; ties broken by id for determinism.
            entries.sort(key=lambda r: (not r.methods, r.id))
        self._table = table

    def __len__(self) -> int:
        return sum(len(v) for v in self._table.values())

    def match(self, method: str, path: str) -> RouteEntry | MethodNotAllowed | None:
        table = self._table
        allowed: set[str] = set()
        candidate = path.rstrip("/") or "/"
        while True:
            entries = table.get(candidate)
            if entries:
                for route in entries:
                    if not route.methods or method in route.methods:
                        return route
                    allowed |= route.methods
            if candidate == "/":
                break
            cut = candidate.rfind("/")
            candidate = candidate[:cut] or "/"
        return MethodNotAllowed(frozenset(allowed)) if allowed else None
