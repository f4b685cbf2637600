"""CORS: answer preflights and label actual responses, per the W3C/WHATWG Fetch standard.

The stage runs before authentication: a browser never sends credentials on a preflight. A
pattern `https://*.example.com` stands for exactly one DNS label (like a TLS wildcard), so
it matches neither the bare domain nor deeper names; `*` means any origin but `null`, which
matches only when listed. Origins are compared lower-cased (scheme and host) and exactly on
the port; config is validated when built (CorsConfig), so each request does set lookups only.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from gateway.dataplane.context import Headers, LocalResponse, RequestContext
from gateway.dataplane.pipeline import Stage
from gateway.dataplane.problems import problem

MAX_AGE_LIMIT = 86400  # a day: browsers cap it lower anyway (Chromium 2 h, Firefox 24 h)
DEFAULT_PORTS = {"http": "80", "https": "443"}  # browsers leave them out of Origin
KEYS = frozenset({"origins", "methods", "headers", "expose_headers", "credentials", "max_age"})

_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # RFC 9110 token: methods, header names
_TOKEN_BYTES = re.compile(rb"[!#$%&'*+.^_`|~0-9a-z-]+")  # the same, on lower-cased bytes
_ORIGIN = re.compile(
    r"(?P<scheme>[a-z][a-z0-9+.-]*)://"
    r"(?P<host>\[[0-9a-f:.]+\]|[^/:?#\[\]@]+)"
    r"(?::(?P<port>[0-9]+))?"
)
_LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
_HOSTNAME = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")

_ACAO = b"access-control-allow-origin"
_ACAC = (b"access-control-allow-credentials", b"true")
_VARY_ORIGIN = (b"vary", b"Origin")
_VARY_PREFLIGHT = (
    b"vary",
    b"Origin, Access-Control-Request-Method, Access-Control-Request-Headers",
)


class CorsConfigError(ValueError):
    """A configuration the stage cannot use; str() names the field, e.g. "origins[2]: ..."."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


@dataclass(frozen=True, slots=True)
class CorsConfig:
    """Who may call from a browser, and what the browser may send and read.

    `origins`: exact origins (`https://app.example.com`), one-label patterns
    (`https://*.example.com`), `*` (any origin but `null`) or `null`. `headers` and
    `expose_headers` may be `*` only without credentials. Methods are upper-cased and then
    compared exactly, as HTTP has them (a browser sends `patch` as it was written). Validated
    on construction, so a CorsConfig that exists is one the stage can use."""

    origins: tuple[str, ...]
    methods: tuple[str, ...] = ("GET", "HEAD", "POST")
    headers: tuple[str, ...] = ()
    expose_headers: tuple[str, ...] = ()
    credentials: bool = False
    max_age: int = 600

    def __post_init__(self) -> None:
        if not isinstance(self.credentials, bool):
            raise CorsConfigError("credentials", "must be true or false")
        if (
            not isinstance(self.max_age, int)
            or isinstance(self.max_age, bool)
            or not 0 <= self.max_age <= MAX_AGE_LIMIT
        ):
            raise CorsConfigError(
                "max_age", f"must be a whole number of seconds, 0..{MAX_AGE_LIMIT}"
            )
        _strings("origins", self.origins)
        if not self.origins:
            raise CorsConfigError("origins", 'name at least one origin (or "*")')
        for i, origin in enumerate(self.origins):
            kind, _ = _parse_origin(f"origins[{i}]", origin)
            if kind == "any" and self.credentials:
                raise CorsConfigError(
                    f"origins[{i}]",
                    '"*" cannot be used with credentials (the Fetch standard forbids it); '
                    "list the origins",
                )
        _strings("methods", self.methods)
        if not self.methods:
            raise CorsConfigError("methods", "name at least one method")
        for i, method in enumerate(self.methods):
            if method == "*":
                raise CorsConfigError(f"methods[{i}]", '"*" is not supported; list the methods')
            if not _TOKEN.fullmatch(method):
                raise CorsConfigError(f"methods[{i}]", f"{method!r} is not an HTTP method")
        for field in ("headers", "expose_headers"):
            values = getattr(self, field)
            _strings(field, values)
            for i, name in enumerate(values):
                if name == "*":
                    if self.credentials:
                        raise CorsConfigError(
                            f"{field}[{i}]",
                            '"*" cannot be used with credentials (the Fetch standard '
                            "forbids it); list the headers",
                        )
                elif not _TOKEN.fullmatch(name):
                    raise CorsConfigError(f"{field}[{i}]", f"{name!r} is not a header name")


def parse_cors(doc: object) -> CorsConfig:
    """Validate a CORS policy's JSON configuration into a CorsConfig.

    `doc` is a dict as stored in a JSONField, e.g. ``{"origins": ["https://*.example.com"],
    "methods": ["GET", "PUT"], "headers": ["content-type"], "credentials": true}``; missing
    keys take CorsConfig's defaults. Raises CorsConfigError naming the offending field."""
    if not isinstance(doc, dict):
        raise CorsConfigError("cors", "must be a JSON object")
    for key in doc:
        if key not in KEYS:
            raise CorsConfigError(str(key), f"unknown key (expected {', '.join(sorted(KEYS))})")
    if "origins" not in doc:
        raise CorsConfigError("origins", "is required")
    values: dict[str, object] = {}
    for key, value in doc.items():
        if key in ("origins", "methods", "headers", "expose_headers"):
            if not isinstance(value, list | tuple):
                raise CorsConfigError(key, "must be a list of strings")
            value = tuple(value)
        values[key] = value
    return CorsConfig(**values)  # type: ignore[arg-type]  # its __post_init__ checks the rest


class CorsStage(Stage):
    """Answers preflights (204, or 403 problem) and adds CORS headers to actual responses."""

    name = "cors"

    def __init__(self, config: CorsConfig) -> None:
        self.config = config
        exact: set[bytes] = set()
        patterns: list[str] = []
        self.any_origin = False
        for i, origin in enumerate(config.origins):
            kind, value = _parse_origin(f"origins[{i}]", origin)
            if kind == "any":
                self.any_origin = True
            elif kind == "pattern":
                patterns.append(value)
            else:
                exact.add(value.encode("ascii"))
        self.exact = frozenset(exact)
        self.pattern = re.compile("|".join(patterns).encode("ascii")) if patterns else None
        self.methods = frozenset(m.upper().encode("ascii") for m in config.methods)
        self.any_header = "*" in config.headers
        self.headers = frozenset(h.lower().encode("ascii") for h in config.headers if h != "*")

        tail: Headers = []
        if config.credentials:
            tail.append(_ACAC)
        # Preflight: everything after Access-Control-Allow-Origin except an echoed header list.
        self.preflight_tail: Headers = [
            *tail,
            (
                b"access-control-allow-methods",
                ", ".join(dict.fromkeys(m.upper() for m in config.methods)).encode("ascii"),
            ),
            (b"access-control-max-age", str(config.max_age).encode("ascii")),
            _VARY_PREFLIGHT,
        ]
        if self.headers and not self.any_header:
            listed = b", ".join(sorted(self.headers))
            self.preflight_tail.append((b"access-control-allow-headers", listed))
        if config.expose_headers:
            exposed = ", ".join(dict.fromkeys(config.expose_headers)).encode("ascii")
            tail.append((b"access-control-expose-headers", exposed))
        self.actual_tail: Headers = [*tail, _VARY_ORIGIN]
        # Origin "*" answers "*" (never with credentials): the same for every origin, no Vary.
        self.actual_any: Headers = [(_ACAO, b"*"), *tail]

    def allow_origin(self, origin: bytes) -> bytes | None:
        """The Access-Control-Allow-Origin value for `origin`, or None if it is not allowed."""
        key = origin.lower()
        if key in self.exact:
            return origin if key != b"null" else b"null"
        if key == b"null":  # sandboxed frames, file: pages: only when listed explicitly
            return None
        if self.any_origin:
            return b"*"
        if self.pattern is not None and self.pattern.fullmatch(key) is not None:
            return origin
        return None

    def on_request(self, ctx: RequestContext) -> LocalResponse | None:
        origin = ctx.header(b"origin")
        if origin is None:
            return None  # not a CORS request
        allowed = self.allow_origin(origin)
        if ctx.method == "OPTIONS":
            wanted = ctx.header(b"access-control-request-method")
            if wanted is not None:
                return self.preflight(ctx, origin, allowed, wanted.strip())
        if allowed is None:
            # The request proceeds; without Allow-Origin the browser keeps the answer from the
            # page. Vary: a cache must not hand this answer to an allowed origin.
            ctx.response_headers.append(_VARY_ORIGIN)
        elif allowed == b"*":
            ctx.response_headers.extend(self.actual_any)
        else:
            ctx.response_headers.append((_ACAO, allowed))
            ctx.response_headers.extend(self.actual_tail)
        return None

    def preflight(
        self, ctx: RequestContext, origin: bytes, allowed: bytes | None, method: bytes
    ) -> LocalResponse:
        """Answer a preflight: 204 with the grant, or 403 saying what is not allowed."""
        if allowed is None:
            return self.refuse(ctx, f"Origin {_show(origin)} may not call this API.")
        if method not in self.methods:
            return self.refuse(
                ctx, f"Method {_show(method)} is not allowed for cross-origin requests."
            )
        headers: Headers = [(_ACAO, allowed), *self.preflight_tail]
        requested = ctx.header(b"access-control-request-headers")
        if requested is not None:
            names = [n.strip() for n in requested.lower().split(b",")]
            names = [n for n in names if n]
            for name in names:
                if not (name in self.headers or (self.any_header and _TOKEN_BYTES.fullmatch(name))):
                    return self.refuse(
                        ctx, f"Header {_show(name)} is not allowed for cross-origin requests."
                    )
            if self.any_header and names:
                # Echoed, not "*": a literal "*" would not cover Authorization (Fetch).
                headers.append((b"access-control-allow-headers", b", ".join(names)))
        return LocalResponse(status=204, headers=headers, body=b"")

    def refuse(self, ctx: RequestContext, detail: str) -> LocalResponse:
        """A 403 problem without any Access-Control-Allow-* header."""
        ctx.error_kind = "cors_denied"
        return problem("forbidden", detail, request_id=ctx.request_id, headers=[_VARY_PREFLIGHT])


def _strings(field: str, values: object) -> None:
    """Refuse anything but a list or tuple of strings."""
    if not isinstance(values, list | tuple):
        raise CorsConfigError(field, "must be a list of strings")
    for i, value in enumerate(values):
        if not isinstance(value, str):
            raise CorsConfigError(f"{field}[{i}]", "must be a string")


def _parse_origin(field: str, text: str) -> tuple[str, str]:
    """Classify one configured origin: ("any", "*"), ("exact", normalised origin) or
    ("pattern", a regex source over the lower-cased Origin header)."""
    if text == "*":
        return "any", text
    if text.lower() == "null":
        return "exact", "null"
    m = _ORIGIN.fullmatch(text.lower())
    if m is None:
        raise CorsConfigError(
            field,
            f"{text!r} is not an origin: write scheme://host[:port], with no path and no "
            "trailing slash",
        )
    scheme, host, port = m["scheme"], m["host"], m["port"]
    if port is not None:
        if port.startswith("0") or not 1 <= int(port) <= 65535:
            raise CorsConfigError(field, f"{text!r}: the port must be 1..65535")
        if DEFAULT_PORTS.get(scheme) == port:
            port = None  # "https://a.example:443" is sent as "https://a.example"
    suffix = f":{port}" if port else ""
    if "*" in host:
        labels = host.split(".")
        rest = labels[1:]
        if (
            labels[0] != "*"
            or len(rest) < 2
            or not _HOSTNAME.fullmatch(".".join(rest))
            or rest[-1].isdigit()
        ):
            raise CorsConfigError(
                field,
                f"{text!r} is not a valid pattern: '*' must be the whole leftmost label, "
                "followed by at least two labels (https://*.example.com)",
            )
        source = re.escape(f"{scheme}://") + _LABEL + re.escape(f".{'.'.join(rest)}{suffix}")
        return "pattern", f"(?:{source})"
    if host.startswith("["):
        try:
            host = f"[{ipaddress.IPv6Address(host[1:-1]).compressed}]"  # as browsers write it
        except ValueError:
            raise CorsConfigError(field, f"{text!r}: {host} is not an IPv6 address") from None
    elif not _HOSTNAME.fullmatch(host) or (host.replace(".", "").isdigit() and not _is_ipv4(host)):
        raise CorsConfigError(field, f"{text!r}: {host!r} is not a host name")
    return "exact", f"{scheme}://{host}{suffix}"


def _is_ipv4(host: str) -> bool:
    try:
        ipaddress.IPv4Address(host)
    except ValueError:
        return False
    return True


def _show(value: bytes) -> str:
    """A client-sent value, quoted and cut short for a problem's detail."""
    text = value.decode("latin-1")
    return repr(text if len(text) <= 100 else text[:100] + "…")
