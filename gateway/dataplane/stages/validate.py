"""Validate: check requests against the API's OpenAPI document (and report on responses).

A `validate` policy (`{"unknown_operations": "reject", "response": "off",
"max_body_bytes": 1048576}`) on an API or route whose API (or API version) carries an
OpenAPI 3.0/3.1 document. The document is compiled once per snapshot (openapi.py); each
request's path as the document sees it (below the API prefix and version segment), its
path, query, header and cookie parameters and its JSON body are checked, and a request that
does not conform gets 400 `validation-failed` with an `errors` list of JSON pointers and
messages. A method and path the document does not describe is refused too, unless
`unknown_operations` is "allow". With `"response": "report"`, JSON answers are checked after
they have been sent: a mismatch is logged (at most once a second) and counted in
`gateway_response_validation_failures_total`; the client gets the answer as it was.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from urllib.parse import parse_qsl

from gateway.dataplane import metrics
from gateway.dataplane.context import LocalResponse, RequestContext
from gateway.dataplane.pipeline import Stage
from gateway.dataplane.problems import problem
from gateway.dataplane.stages.transform import is_json, read_body, replay_body

log = logging.getLogger("gateway.validate")


class ValidateConfigError(ValueError):
    """A configuration that cannot be used; the message starts with the field."""


@dataclass(frozen=True, slots=True)
class ValidateConfig:
    reject_unknown: bool = True
    report_responses: bool = False
    max_body: int = 1 << 20


def parse_validate(doc: object) -> ValidateConfig:
    """A `validate` policy's configuration, validated."""
    if not isinstance(doc, dict):
        raise ValidateConfigError("config: expected an object.")
    unknown = sorted(set(doc) - {"unknown_operations", "response", "max_body_bytes"})
    if unknown:
        raise ValidateConfigError(f"config: unknown {', '.join(unknown)}.")
    unknown_ops = doc.get("unknown_operations", "reject")
    if unknown_ops not in ("reject", "allow"):
        raise ValidateConfigError("unknown_operations: 'reject' or 'allow'.")
    response = doc.get("response", "off")
    if response not in ("off", "report"):
        raise ValidateConfigError("response: 'off' or 'report'.")
    size = doc.get("max_body_bytes", 1 << 20)
    if not isinstance(size, int) or isinstance(size, bool) or not 1 <= size <= 64 << 20:
        raise ValidateConfigError("max_body_bytes: a number of bytes, 1 to 64 MiB.")
    return ValidateConfig(unknown_ops == "reject", response == "report", size)


class ValidateStage(Stage):
    name = "validate"

    def __init__(
        self, config: ValidateConfig, *, validator, doc_prefix: str, api_slug: str
    ) -> None:
        self.config = config
        self.validator = validator
        self.doc_prefix = doc_prefix
        self.api_slug = api_slug
        self._warned = 0.0

    async def on_request(self, ctx: RequestContext) -> LocalResponse | None:
        path = ctx.path[len(self.doc_prefix) :] or "/"
        matched = self.validator.match(ctx.method, path)
        if matched is None:
            if not self.config.reject_unknown:
                return None
            return self._refuse(
                ctx, [{"pointer": "", "message": f"{ctx.method} {path} is not described."}]
            )
        operation, params = matched
        body = None
        if operation.needs_body and is_json(ctx.header(b"content-type")):
            body = await read_body(ctx, self.config.max_body)
            if isinstance(body, LocalResponse) or body is None:
                return body
            replay_body(ctx, body)
        query = parse_qsl(
            ctx.scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True
        )
        problems = operation.validate(
            path_params=params,
            query=query,
            headers=ctx.scope["headers"],
            content_type=ctx.header(b"content-type"),
            body=body,
        )
        if problems:
            return self._refuse(
                ctx, [{"pointer": p.pointer, "message": p.message} for p in problems]
            )
        if self.config.report_responses:
            ctx.observers = (*ctx.observers, ResponseCheck(self, operation))
        return None

    def _refuse(self, ctx: RequestContext, errors: list[dict]) -> LocalResponse:
        ctx.error_kind = "validation_failed"
        n = len(errors)
        return problem(
            "validation-failed",
            f"The request does not match the API's description ({n} problem{'s' * (n != 1)}).",
            request_id=ctx.request_id,
            errors=errors,
        )

    def report(self, operation, status: int, content_type: bytes | None, body: bytes) -> None:
        problems = operation.validate_response(status=status, content_type=content_type, body=body)
        if not problems:
            return
        metrics.RESPONSE_VALIDATION_FAILURES.labels(api=self.api_slug).inc()
        now = time.monotonic()
        if now - self._warned >= 1.0:
            self._warned = now
            first = problems[0]
            log.warning(
                "response of %s %s does not match the API's description: %s %s (%d problems)",
                self.api_slug,
                operation.path_template,
                first.pointer,
                first.message,
                len(problems),
            )


@dataclass(slots=True)
class ResponseCheck:
    """Collects a JSON answer (up to the cap) as it streams, then checks it."""

    stage: ValidateStage
    operation: object
    status: int = 0
    content_type: bytes | None = None
    chunks: list[bytes] = field(default_factory=list)
    size: int = 0
    active: bool = False

    def begin(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        self.status = status
        self.content_type = next((v for k, v in headers if k.lower() == b"content-type"), None)
        self.active = is_json(self.content_type)

    def feed(self, chunk: bytes) -> None:
        if self.active:
            self.size += len(chunk)
            if self.size > self.stage.config.max_body:
                self.active = False  # too large to check: skipped, not guessed
                self.chunks = []
            else:
                self.chunks.append(chunk)

    def finish(self, ok: bool) -> None:
        if ok and self.active:
            self.stage.report(self.operation, self.status, self.content_type, b"".join(self.chunks))
