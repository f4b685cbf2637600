"""Route matching, compiled once per snapshot.

Precedence, most specific first (README, "Routing"):

1. Host: routes on the request's exact host, then on wildcard hosts (the longest suffix
   first: `*.eu.example.com` before `*.example.com`), then routes for any host.
2. Path, within one host group: an exact path; then regex routes (of the deepest API prefix
   first); then prefix paths, the deepest first. Between paths of equal depth, a literal
   segment beats a `{param}` at the first place where they differ.
3. At one path: routes with more header/version conditions first, then routes that name
   methods, then the higher `priority`, then the lower id (so the order is total).

The first route whose host, path, headers, version and method all hold wins. When some route
matched everything but the method, the answer is 405 with the methods that would have worked.

Cost: one dict lookup per path segment (a trie); it does not grow with the number of
routes. Where many routes share one place in the trie, they are indexed too (INDEX_FROM or
more): regex routes by the literal first segment their pattern starts with (`/orders/...`),
and routes told apart by a header's value (`X-Tenant: t1` ... `t1000`) by that value, so a
request tries only the routes that could match it, in the same order as without the index.
"""

from __future__ import annotations

import posixpath
import re
from typing import TYPE_CHECKING
from urllib.parse import parse_qsl

if TYPE_CHECKING:
    from gateway.dataplane.snapshot import RouteEntry

_SLASHES = re.compile(r"/{2,}")
_DOT_PARAMS = re.compile(r"/\.\.?;")
# What a version segment looks like (v2, v1.1, 2024-06-01): below a path-versioned API's
# prefix, an unknown one is a 404, not a path of the default version.
VERSION_LIKE = re.compile(r"^(v\d+([._]\d+)*|\d{4}-\d{2}-\d{2})$")


def normalize_path(path: str) -> str | None:
    """Collapse duplicate slashes and resolve dot segments; None if the path is unusable.

    Refused (None, a 400): a NUL, a backslash, or a dot segment with parameters (`..;`),
    which some upstream servers (Tomcat, Jetty, IIS) resolve as `..` or `/` after we matched.
    """
    if not path.startswith("/") or "\x00" in path or "\\" in path:
        return None
    if "//" not in path and "/." not in path:
        return path  # nothing to normalise: the common case
    if _DOT_PARAMS.search(path):
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


INDEX_FROM = 8  # routes at one trie node from which they are indexed (below that, a scan)
_LITERAL = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-~")


def _literal_first_segment(route: RouteEntry) -> str | None:
    """The first path segment every match of a regex route has, when its pattern spells it
    out (`/orders/(?P<id>\\d+)` → "orders"); None when it does not (a class, a group, an
    alternation, a flag, an escape or a quantifier comes first)."""
    pattern = route.regex.pattern if route.regex is not None else ""
    if route.regex is None or route.regex.flags & re.IGNORECASE or "|" in pattern:
        return None
    if pattern.startswith("^"):
        pattern = pattern[1:]
    if not pattern.startswith("/"):
        return None
    end = 1
    while end < len(pattern) and pattern[end] in _LITERAL:
        end += 1
    rest = pattern[end:]
    if end == 1 or not (rest == "" or rest == "$" or rest.startswith("/")):
        return None
    return pattern[1:end]


class _HeaderIndex:
    """The routes at one trie node, by the value of the header most of them test: for a
    request, the routes that could match it, in their order (a subsequence of `routes`).
    Routes that do not test that header are in every list."""

    __slots__ = ("routes", "name", "by_value", "other", "absent")

    def __init__(self, routes: list[RouteEntry], name: bytes) -> None:
        self.routes = routes
        self.name = name
        tests = [dict(r.header_conditions).get(name, _NO_TEST) for r in routes]
        values = {v for a in tests if a is not _NO_TEST and a is not None for v in a}
        self.by_value = {
            value: [
                r
                for r, accepted in zip(routes, tests, strict=True)
                if accepted is _NO_TEST or accepted is None or value in accepted
            ]
            for value in values
        }
        # A value no route names: the routes that do not test it or accept any value.
        self.other = [r for r, a in zip(routes, tests, strict=True) if a is _NO_TEST or a is None]
        self.absent = [r for r, a in zip(routes, tests, strict=True) if a is _NO_TEST]

    def narrow(self, request: _Request) -> list[RouteEntry]:
        value = request.header(self.name)
        if value is None:
            return self.absent
        return self.by_value.get(value.strip(), self.other)


_NO_TEST = object()


def _header_index(routes: list[RouteEntry]) -> list[RouteEntry] | _HeaderIndex:
    """`routes` as they are, or indexed by a header value when many of them test one."""
    if len(routes) < INDEX_FROM:
        return routes
    counts: dict[bytes, int] = {}
    for route in routes:
        for name, accepted in route.header_conditions:
            if accepted is not None:
                counts[name] = counts.get(name, 0) + 1
    if not counts:
        return routes
    name = max(counts, key=lambda n: (counts[n], n))
    return _HeaderIndex(routes, name) if counts[name] >= INDEX_FROM else routes


class _Node:
    __slots__ = ("children", "param", "exact", "prefix", "regex", "regex_by_segment", "regex_any")

    def __init__(self) -> None:
        self.children: dict[str, _Node] = {}
        self.param: _Node | None = None
        self.exact: list[RouteEntry] | _HeaderIndex = []
        self.prefix: list[RouteEntry] | _HeaderIndex = []
        self.regex: list[RouteEntry] = []
        # Many regex routes here: first segment below this node -> the regex routes that can
        # match a path with it (in order); regex_any: those whose pattern has no literal one.
        self.regex_by_segment: dict[str, list[RouteEntry]] | None = None
        self.regex_any: list[RouteEntry] = []

    def index(self) -> None:
        """Sort the routes here into their order, then index them where there are many."""
        for entries in (self.exact, self.prefix, self.regex):
            entries.sort(key=_route_order)
        self.exact = _header_index(self.exact)
        self.prefix = _header_index(self.prefix)
        if len(self.regex) >= INDEX_FROM:
            firsts = [_literal_first_segment(r) for r in self.regex]
            self.regex_any = [r for r, f in zip(self.regex, firsts, strict=True) if f is None]
            self.regex_by_segment = {
                seg: [r for r, f in zip(self.regex, firsts, strict=True) if f in (seg, None)]
                for seg in {f for f in firsts if f is not None}
            }

    def regex_for(self, first: str) -> list[RouteEntry]:
        """The regex routes here that can match a path whose next segment is `first`."""
        if self.regex_by_segment is None:
            return self.regex
        return self.regex_by_segment.get(first, self.regex_any)


def _route_order(route: RouteEntry) -> tuple:
    conditions = len(route.header_conditions) + (route.version_condition is not None)
    return (-conditions, not route.methods, -route.priority, route.id)


class _PathTrie:
    """The routes of one host group, by path segments."""

    def __init__(self) -> None:
        self.root = _Node()

    def add(self, route: RouteEntry) -> None:
        node = self.root
        for seg in route.segments:
            if seg is None:
                node.param = node.param or _Node()
                node = node.param
            else:
                node = node.children.setdefault(seg, _Node())
        {"exact": node.exact, "prefix": node.prefix, "regex": node.regex}[route.kind].append(route)

    def freeze(self) -> None:
        stack = [self.root]
        while stack:
            node = stack.pop()
            node.index()
            stack.extend(node.children.values())
            if node.param is not None:
                stack.append(node.param)

    def candidates(self, segs: list[str]) -> tuple[list, list, list]:
        """(exact, regex, prefix) hits as (depth, routes, params) in precedence order."""
        n = len(segs)
        exact: list = []
        regex: list = []
        prefix: list = []
        # Depth-first, literal child before the {param} child: at equal depth, the earlier
        # hit is the more literal one. Params are the values taken by {param} segments.
        stack: list[tuple[_Node, int, tuple[str, ...]]] = [(self.root, 0, ())]
        while stack:
            node, depth, params = stack.pop()
            if node.prefix:
                prefix.append((depth, node.prefix, params))
            if node.regex:
                regex.append((depth, node, params))
            if depth == n:
                if node.exact:
                    exact.append((depth, node.exact, params))
                continue
            seg = segs[depth]
            if node.param is not None:
                stack.append((node.param, depth + 1, (*params, seg)))
            child = node.children.get(seg)
            if child is not None:
                stack.append((child, depth + 1, params))
        # Deeper first; sort is stable, so literal-first order holds within a depth.
        if len(regex) > 1:
            regex.sort(key=_deeper_first)
        if len(prefix) > 1:
            prefix.sort(key=_deeper_first)
        return exact, regex, prefix


def _deeper_first(hit: tuple) -> int:
    return -hit[0]


def _host_of(scope_headers) -> str:
    for k, v in scope_headers:
        if k == b"host":
            host = v.decode("latin-1").lower()
            if host.startswith("["):  # IPv6 literal: [::1]:8080
                return host.split("]", 1)[0] + "]"
            return host.rsplit(":", 1)[0].rstrip(".") if ":" in host else host.rstrip(".")
    return ""


class Router:
    def __init__(self, routes: list[RouteEntry]) -> None:
        self._exact_hosts: dict[str, _PathTrie] = {}
        self._wildcards: dict[str, _PathTrie] = {}  # ".example.com" -> routes of *.example.com
        self._any = _PathTrie()
        self._count = len(routes)
        for route in routes:
            if not route.hosts:
                self._any.add(route)
            for host in route.hosts:
                if host.startswith("*."):
                    self._wildcards.setdefault(host[1:], _PathTrie()).add(route)
                else:
                    self._exact_hosts.setdefault(host, _PathTrie()).add(route)
        for trie in (self._any, *self._exact_hosts.values(), *self._wildcards.values()):
            trie.freeze()
        self._by_host = bool(self._exact_hosts or self._wildcards)
        self._any_only = (self._any,)

    def __len__(self) -> int:
        return self._count

    def _tries(self, scope_headers) -> tuple[_PathTrie, ...] | list[_PathTrie]:
        """The host groups to search, most specific first."""
        if not self._by_host:
            return self._any_only
        host = _host_of(scope_headers)
        tries = []
        trie = self._exact_hosts.get(host)
        if trie is not None:
            tries.append(trie)
        if self._wildcards:
            dot = host.find(".")
            while dot != -1:
                trie = self._wildcards.get(host[dot:])
                if trie is not None:
                    tries.append(trie)
                dot = host.find(".", dot + 1)
        tries.append(self._any)
        return tries

    def match(
        self, method: str, path: str, scope_headers=(), query: bytes = b""
    ) -> tuple[RouteEntry, dict[str, str]] | MethodNotAllowed | None:
        """The route for a request and the parameters its path captured; a HEAD that no
        route takes goes to the route that would take it as a GET (RFC 9110 §9.3.2: a HEAD
        is a GET without the body, as nginx's limit_except has it), and a 405's Allow then
        names HEAD wherever it names GET."""
        found = self._match(method, path, scope_headers, query)
        if type(found) is tuple:
            return found
        if method == "HEAD":
            as_get = self._match("GET", path, scope_headers, query)
            if type(as_get) is tuple:
                return as_get
        if found is not None and "GET" in found.allowed and "HEAD" not in found.allowed:
            return MethodNotAllowed(found.allowed | {"HEAD"})
        return found

    def _match(
        self, method: str, path: str, scope_headers=(), query: bytes = b""
    ) -> tuple[RouteEntry, dict[str, str]] | MethodNotAllowed | None:
        """The route for a request and the parameters its path captured.

        `path` is normalised and percent-decoded; `scope_headers` are the ASGI header pairs
        (lower-case names); `query` is the raw query string. Returns (route, params),
        MethodNotAllowed, or None when nothing matches.
        Example: match("GET", "/shop/orders/7") → (<route /orders/{id}>, {"id": "7"}).
        """
        segs = [s for s in path.split("/") if s]
        allowed: set[str] = set()
        request = _Request(scope_headers, query, segs)  # parses nothing until asked
        for trie in self._tries(scope_headers):
            exact, regex, prefix = trie.candidates(segs)
            for _depth, routes, values in exact:
                found = _first(routes, method, request, allowed)
                if found is not None:
                    return found, _params(found, values)
            for depth, node, values in regex:
                rest = "/" + "/".join(segs[depth:])
                if path.endswith("/") and depth < len(segs):
                    rest += "/"
                for route in node.regex_for(segs[depth] if depth < len(segs) else ""):
                    m = route.regex.fullmatch(rest)
                    if m is not None and _first((route,), method, request, allowed):
                        params = _params(route, values)
                        params.update({k: v for k, v in m.groupdict().items() if v is not None})
                        return route, params
            for _depth, routes, values in prefix:
                found = _first(routes, method, request, allowed)
                if found is not None:
                    return found, _params(found, values)
        return MethodNotAllowed(frozenset(allowed)) if allowed else None


def _params(route: RouteEntry, values: tuple[str, ...]) -> dict[str, str]:
    return dict(zip(route.param_names, values, strict=False)) if values else {}


class _Request:
    """What conditions read: headers by name and the query, parsed only when asked."""

    __slots__ = ("headers", "query", "segments", "_query_params")

    def __init__(self, headers, query: bytes, segments: list[str]) -> None:
        self.headers = headers
        self.query = query
        self.segments = segments
        self._query_params: dict[str, str] | None = None

    def header(self, name: bytes) -> bytes | None:
        for k, v in self.headers:
            if k == name:
                return v
        return None

    def query_param(self, name: str) -> str | None:
        if self._query_params is None:
            self._query_params = dict(
                parse_qsl(self.query.decode("latin-1"), keep_blank_values=True)
            )
        return self._query_params.get(name)


def _first(routes, method: str, request: _Request, allowed: set[str]) -> RouteEntry | None:
    if type(routes) is _HeaderIndex:
        routes = routes.narrow(request)
    for route in routes:
        if route.unconditional:
            if not route.methods or method in route.methods:
                return route
            allowed |= route.methods
            continue
        for name, accepted in route.header_conditions:
            value = request.header(name)
            if value is None or (accepted is not None and value.strip() not in accepted):
                break
        else:
            vc = route.version_condition
            if vc is not None and not vc.holds(request):
                continue
            if not route.methods or method in route.methods:
                return route
            allowed |= route.methods
    return None
