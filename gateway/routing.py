"""Route configuration: parsing and validation shared by the admin (clean) and the compiler.

Everything here runs when a route is saved or a snapshot is compiled, never per request: a
configuration that would fail to compile is refused in the admin with a message naming the
field.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from django.core.exceptions import ValidationError
from django.core.validators import RegexValidator

FIELD_NAME_RE = r"[!#$%&'*+.^_`|~0-9A-Za-z-]+"  # RFC 9110 token: a header name or a method
header_name_validator = RegexValidator(rf"^{FIELD_NAME_RE}$", "A header name (letters, digits, -).")
_HOST = re.compile(
    r"^(\*\.)?([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*$"
)
_SEGMENT = re.compile(r"^[A-Za-z0-9._~!$&'()*+,;=:@-]+$")
_PARAM = re.compile(r"^\{([A-Za-z_][A-Za-z0-9_]{0,63})\}$")
_REWRITE_PARAM = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]{0,63})\}")
_METHODS = re.compile(rf"^{FIELD_NAME_RE}$")


class RouteConfigError(ValueError):
    """A route setting that cannot be compiled; `field` names the model field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


def parse_hosts(text: str) -> tuple[str, ...]:
    """Host names from a comma-separated list, lower-cased, in order, without duplicates."""
    out: list[str] = []
    for part in text.split(","):
        host = part.strip().lower().rstrip(".")
        if host and host not in out:
            out.append(host)
    return tuple(out)


def validate_hosts(text: str) -> None:
    for host in parse_hosts(text):
        if not _HOST.match(host) or len(host) > 253:
            raise ValidationError(
                f"'{host}' is not a host name (a wildcard is only a leading '*.', as in "
                "*.example.com; no port)."
            )


def parse_networks(text: str) -> tuple:
    """CIDRs separated by commas, spaces or lines, as ip_network objects."""
    import ipaddress

    return tuple(
        ipaddress.ip_network(part, strict=False)
        for part in re.split(r"[\s,]+", text.strip())
        if part
    )


def validate_networks(text: str) -> None:
    try:
        parse_networks(text)
    except ValueError as exc:
        raise ValidationError(f"Not an IP network: {exc}.") from None


def validate_methods(text: str) -> None:
    for m in text.split(","):
        if m.strip() and not _METHODS.match(m.strip()):
            raise ValidationError(f"'{m.strip()}' is not an HTTP method.")


def parse_header_conditions(text: str) -> tuple[tuple[bytes, frozenset[bytes] | None], ...]:
    """`Name: v1, v2` lines as (lower-case name, accepted values); `Name: *` → (name, None)."""
    out = []
    for lineno, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        name, sep, values = line.partition(":")
        name = name.strip()
        if not sep or not re.fullmatch(FIELD_NAME_RE, name):
            raise RouteConfigError(
                "headers", f"line {lineno}: expected 'Name: value', got {line!r}."
            )
        values = values.strip()
        if not values:
            raise RouteConfigError("headers", f"line {lineno}: no value (use * for any).")
        accepted = (
            None
            if values == "*"
            else frozenset(v.strip().encode("latin-1") for v in values.split(",") if v.strip())
        )
        out.append((name.lower().encode("latin-1"), accepted))
    return tuple(out)


def validate_header_conditions(text: str) -> None:
    try:
        parse_header_conditions(text)
    except RouteConfigError as exc:
        raise ValidationError(exc.message) from None
    except UnicodeEncodeError:
        raise ValidationError("Header values must be Latin-1.") from None


@dataclass(frozen=True, slots=True)
class PathPattern:
    """A compiled route path.

    `segments` are literal strings or None for a `{param}` segment (prefix and exact);
    `params` names what the path captures, in order; `regex` is set for regex routes.
    """

    kind: str  # "prefix" | "exact" | "regex"
    segments: tuple[str | None, ...]
    params: tuple[str, ...]
    regex: re.Pattern | None = None


def split_path(path: str) -> list[str]:
    """'/a/b/' → ['a', 'b']; '/' → []."""
    return [s for s in path.split("/") if s]


def compile_path(kind: str, path: str) -> PathPattern:
    """Compile a route's path for match type `kind`; RouteConfigError if it is not valid."""
    if kind == "regex":
        if not path.startswith("/") and not path.startswith("^/"):
            raise RouteConfigError("path", "A regex path starts with '/' (or '^/').")
        try:
            regex = re.compile(path)
        except re.error as exc:
            raise RouteConfigError("path", f"Not a valid regular expression: {exc}.") from None
        return PathPattern("regex", (), tuple(regex.groupindex), regex)
    if kind not in ("prefix", "exact"):
        raise RouteConfigError("match", f"Unknown match type {kind!r}.")
    if not path.startswith("/"):
        raise RouteConfigError("path", "Starts with '/'.")
    segments: list[str | None] = []
    params: list[str] = []
    for seg in split_path(path):
        param = _PARAM.match(seg)
        if param:
            name = param.group(1)
            if name in params:
                raise RouteConfigError("path", f"Parameter {{{name}}} appears twice.")
            params.append(name)
            segments.append(None)
        elif _SEGMENT.match(seg) and "{" not in seg:
            segments.append(seg)
        else:
            raise RouteConfigError(
                "path",
                f"Segment {seg!r}: letters, digits and -._~!$&'()*+,;=:@ only, or a whole "
                "{name} segment.",
            )
    return PathPattern(kind, tuple(segments), tuple(params))


def compile_rewrite(template: str, params: tuple[str, ...]) -> tuple[str | tuple[str], ...]:
    """A rewrite template as parts: literal strings and (param name,) tuples."""
    if not template.startswith("/"):
        raise RouteConfigError("rewrite", "Starts with '/'.")
    parts: list[str | tuple[str]] = []
    pos = 0
    for m in _REWRITE_PARAM.finditer(template):
        if m.group(1) not in params:
            known = ", ".join("{" + p + "}" for p in params) or "none"
            raise RouteConfigError(
                "rewrite", f"{{{m.group(1)}}} is not captured by the path (captured: {known})."
            )
        if m.start() > pos:
            parts.append(template[pos : m.start()])
        parts.append((m.group(1),))
        pos = m.end()
    if pos < len(template):
        parts.append(template[pos:])
    if any(isinstance(p, str) and ("{" in p or "}" in p) for p in parts):
        raise RouteConfigError("rewrite", "Braces only around a parameter name: {name}.")
    return tuple(parts)
