"""What drf-spectacular cannot see in the views: problem answers, ETags and conditional headers.

A postprocessing hook (SPECTACULAR_SETTINGS["POSTPROCESSING_HOOKS"]) adds to every operation
the problem+json answers the exception handler can give, `If-Match` on writes to an object,
`If-None-Match` and 304 on reads of one, and the `ETag` header on object answers. Clients
generated from the schema then know every status they can meet, and schemathesis can hold
the API to it.
"""

from __future__ import annotations

PROBLEM_REF = {"$ref": "#/components/schemas/Problem"}

PROBLEM_SCHEMA = {
    "type": "object",
    "description": "An RFC 9457 problem document.",
    "properties": {
        "type": {"type": "string", "example": "urn:apigw:problem:validation-failed"},
        "title": {"type": "string"},
        "status": {"type": "integer"},
        "detail": {"type": "string"},
        "errors": {
            "type": "array",
            "description": "One entry per invalid field, located by a JSON pointer.",
            "items": {
                "type": "object",
                "properties": {
                    "pointer": {"type": "string", "example": "/name"},
                    "message": {"type": "string"},
                },
                "required": ["pointer", "message"],
            },
        },
    },
    "required": ["type", "title", "status", "detail"],
}

_DESCRIPTIONS = {
    "400": "Invalid input (the problem's `errors` locate each field).",
    "401": "No valid API token.",
    "403": "The token may not do this (scope, staff, model permission or ownership).",
    "404": "No such object, or not yours.",
    "406": "The Accept header asks for nothing this resource can answer.",
    "409": "Conflicts with the current state (in use, a taken unique value, a bad transition).",
    "412": "If-Match did not match the object's current ETag.",
    "415": "The body's Content-Type is not one this operation reads.",
    "429": "Too many requests; see Retry-After.",
}
_WRITES = {"post", "put", "patch", "delete"}
_ETAG_HEADER = {"ETag": {"schema": {"type": "string"}, "description": "The object's version."}}


def _problem(code: str) -> dict:
    return {
        "description": _DESCRIPTIONS[code],
        "content": {"application/problem+json": {"schema": PROBLEM_REF}},
    }


def _header_parameter(name: str, description: str) -> dict:
    return {
        "in": "header",
        "name": name,
        "required": False,
        "schema": {"type": "string"},
        "description": description,
    }


def add_problems_and_etags(result, generator, request, public):
    """The hook: edits the generated document in place and returns it."""
    result.setdefault("components", {}).setdefault("schemas", {})["Problem"] = PROBLEM_SCHEMA
    for path, operations in result.get("paths", {}).items():
        on_object = path.rstrip("/").endswith("}")
        for method, operation in operations.items():
            if method not in _WRITES | {"get", "head"}:
                continue
            responses = operation.setdefault("responses", {})
            codes = ["400", "401", "403", "404", "406", "429"]
            if method in _WRITES:
                codes += ["409", "415"]
            if on_object and method in {"put", "patch", "delete"}:
                codes.append("412")
                operation.setdefault("parameters", []).append(
                    _header_parameter("If-Match", "Write only if the ETag is one of these.")
                )
            if on_object and method == "get":
                operation.setdefault("parameters", []).append(
                    _header_parameter("If-None-Match", "Answer 304 if the ETag is one of these.")
                )
                responses.setdefault(
                    "304", {"description": "Not modified.", "headers": _ETAG_HEADER}
                )
            for code in codes:
                responses.setdefault(code, _problem(code))
            for code in ("200", "201"):
                answer = responses.get(code)
                if answer and "content" in answer and (on_object or code == "201"):
                    answer.setdefault("headers", {}).update(_ETAG_HEADER)
    return result
