"""Sets of IP networks that answer "is this address in?" with a per-worker cache."""

from __future__ import annotations

import ipaddress

_CACHE_SIZE = 10_000  # addresses remembered; the cache is cleared when full


class Networks:
    """Membership of client addresses in configured networks (CIDRs), cached: a gateway
    sees the same few addresses over and over, parsing each costs microseconds."""

    __slots__ = ("networks", "_cache")

    def __init__(self, networks) -> None:
        self.networks = tuple(networks)
        self._cache: dict[str, bool | None] = {}

    def __bool__(self) -> bool:
        return bool(self.networks)

    def lookup(self, ip: str) -> bool | None:
        """True if `ip` is in one of the networks, False if not, None if it is not an IP
        address. An IPv4-mapped IPv6 address (::ffff:10.1.2.3) counts as its IPv4 one."""
        cache = self._cache
        found = cache.get(ip, _MISSING)
        if found is _MISSING:
            try:
                addr = ipaddress.ip_address(ip)
            except ValueError:
                found = None
            else:
                if addr.version == 6 and addr.ipv4_mapped is not None:
                    addr = addr.ipv4_mapped
                found = any(addr in net for net in self.networks)
            if len(cache) >= _CACHE_SIZE:
                cache.clear()
            cache[ip] = found
        return found


_MISSING = object()


def strip_port(node: str) -> str:
    """An address as a proxy may write it, without its port: `203.0.113.9:5678` and
    `[2001:db8::1]:443` give the address; a bare IPv6 address is left as it is."""
    if node.startswith("["):
        end = node.find("]")
        return node[1:end] if end > 0 else node
    if node.count(":") == 1:
        return node.split(":", 1)[0]
    return node


def forwarded_for(value: str) -> list[str]:
    """The `for=` nodes of a Forwarded header (RFC 7239 §4), in order, without quotes or
    ports. An element without one gives "unknown" (a hop that did not say). `unknown` and
    obfuscated identifiers (`_hidden`) are not addresses: a chain that reaches one falls back
    to the peer."""
    nodes = []
    for element in value.split(","):
        node = "unknown"
        for pair in element.split(";"):
            name, sep, val = pair.partition("=")
            if sep and name.strip().lower() == "for":
                node = strip_port(val.strip().strip('"'))
                break
        nodes.append(node)
    return nodes
