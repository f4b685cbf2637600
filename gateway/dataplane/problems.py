"""Gateway errors as RFC 9457 problem details, carrying the request id.

`type` is a URN naming the problem (documented in the README); `title` is stable per type,
`detail` explains this occurrence.
"""

from __future__ import annotations

import json

from gateway.dataplane.context import Headers, LocalResponse

# type slug -> (status, title)
PROBLEMS: dict[str, tuple[int, str]] = {
    "bad-request": (400, "Bad request"),
    "validation-failed": (400, "Request does not match the API description"),
    "missing-credential": (401, "Missing credential"),
    "invalid-credential": (401, "Invalid credential"),
    "forbidden": (403, "Forbidden"),
    "insufficient-scope": (403, "Insufficient scope"),
    "not-found": (404, "No route matches"),
    "method-not-allowed": (405, "Method not allowed"),
    "request-timeout": (408, "Request timeout"),
    "body-too-large": (413, "Request body too large"),
    "uri-too-long": (414, "URI too long"),
    "header-too-large": (431, "Request header fields too large"),
    "rate-limited": (429, "Rate limit exceeded"),
    "quota-exhausted": (429, "Quota exhausted"),
    "internal": (500, "Internal gateway error"),
    "not-implemented": (501, "Not implemented"),
    "bad-gateway": (502, "Upstream unreachable"),
    "not-ready": (503, "Gateway not ready"),
    "limiter-unavailable": (503, "Limits cannot be checked"),
    "no-healthy-target": (503, "No healthy upstream target"),
    "overloaded": (503, "Gateway overloaded"),
    "gateway-timeout": (504, "Upstream timed out"),
}

_CONTENT_TYPE = (b"content-type", b"application/problem+json")


def problem(
    slug: str,
    detail: str,
    *,
    request_id: str,
    headers: Headers | None = None,
    **extra: object,
) -> LocalResponse:
    """A problem+json response of type `slug` (a key of PROBLEMS)."""
    status, title = PROBLEMS[slug]
    doc = {
        "type": f"urn:apigw:problem:{slug}",
        "title": title,
        "status": status,
        "detail": detail,
        "request_id": request_id,
        **extra,
    }
    body = json.dumps(doc, separators=(",", ":")).encode()
    out = [_CONTENT_TYPE, (b"cache-control", b"no-store")]
    if headers:
        out.extend(headers)
    return LocalResponse(status=status, headers=out, body=body)
