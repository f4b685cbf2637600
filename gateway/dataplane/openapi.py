"""Request validation against an API's OpenAPI 3.0 / 3.1 document, compiled once per snapshot.

    validator = compile_openapi(load_openapi_text(text))    # once, when the snapshot is built
    found = validator.match("GET", "/orders/42")             # per request
    if found:
        operation, path_params = found                       # path_params == {"id": "42"}
        problems = operation.validate(path_params=path_params, query=[("limit", "10")],
                                      headers=[(b"x-tenant", b"acme")], content_type=None,
                                      body=None)             # [] when the request is valid

Compiled once: path templates into a segment trie, parameter tables, and one jsonschema
validator per schema (Draft202012Validator for 3.1, Draft4Validator for 3.0, format checking
off). Local `$ref`s are inlined at compile time, so no reference is looked up per request; a
recursive schema keeps its recursion as a `$ref` into a `$defs` table of the compiled schema.
3.0 schemas are translated once: `nullable: true` adds "null" to the allowed types (Draft 4
already reads the boolean `exclusiveMinimum`/`exclusiveMaximum` of 3.0). A property marked
`readOnly` is never required in a request, nor a `writeOnly` one in a response.

Not checked: formats, `discriminator` (its `oneOf` still is), response headers, security
(the auth stages do that). Only `#/...` references into the document itself resolve: nothing
is ever fetched.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

import yaml
from jsonschema import Draft4Validator, Draft202012Validator
from jsonschema.exceptions import ValidationError, best_match
from jsonschema.protocols import Validator

MAX_PROBLEMS = 20  # a client needs the first few problems, not a dump of a huge bad body

Loc = tuple[str | int, ...]  # where an object sits in the document: ("paths", "/orders", "get")

_VERSION = re.compile(r"3\.([01])\.\d+(-[0-9A-Za-z.]+)?")
_METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")
_STYLES = {
    "path": ("simple", "label", "matrix"),
    "query": ("form", "spaceDelimited", "pipeDelimited", "deepObject"),
    "header": ("simple",),
    "cookie": ("form",),
}
_DEFAULT_STYLE = {"path": "simple", "query": "form", "header": "simple", "cookie": "form"}
_DELIMITER = {"form": ",", "spaceDelimited": " ", "pipeDelimited": "|"}
# OpenAPI: header parameters with these names are ignored (HTTP itself describes them).
_IGNORED_HEADERS = frozenset({"accept", "content-type", "authorization"})
_TEMPLATE_PARAM = re.compile(r"\{([^{}]+)\}")
_INTEGER = re.compile(r"-?\d{1,300}")
_NUMBER = re.compile(r"-?(\d{1,300}(\.\d{0,300})?|\.\d{1,300})([eE][-+]?\d{1,4})?")

# Where the compiled schema's own `$defs` live; a fixed absolute id, so that no `$id` inside
# a user's schema can change what our recursion `$ref`s point to.
_SCHEMA_ID = "urn:apigw:openapi-schema"
# Keywords whose values are subschemas, and whether they apply to parts of the value (True)
# or to the value itself (False): a cycle of `$ref`s through the latter would never end.
_APPLICATORS = {
    "allOf": False,
    "anyOf": False,
    "oneOf": False,
    "not": False,
    "if": False,
    "then": False,
    "else": False,
    "dependentSchemas": False,
    "dependencies": False,
    "items": True,
    "prefixItems": True,
    "additionalItems": True,
    "contains": True,
    "properties": True,
    "patternProperties": True,
    "additionalProperties": True,
    "propertyNames": True,
    "unevaluatedItems": True,
    "unevaluatedProperties": True,
}
_BY_NAME = frozenset({"properties", "patternProperties", "dependentSchemas", "dependencies"})
# Dropped from compiled schemas: annotations, and `$ref` targets already inlined.
_DROPPED = frozenset(
    {
        "$schema",
        "$id",
        "$defs",
        "definitions",
        "$comment",
        "title",
        "description",
        "default",
        "example",
        "examples",
        "deprecated",
        "readOnly",
        "writeOnly",
        "nullable",
        "discriminator",
        "xml",
        "externalDocs",
        "contentSchema",
    }
)
_UNSUPPORTED = ("$dynamicRef", "$recursiveRef")
_NO_USES: frozenset = frozenset()

# One table of the messages a client sees; `{v}` is the schema's (shortened) value.
_MESSAGES = {
    "type": "expected {v}",
    "enum": "must be one of {v}",
    "const": "must be {v}",
    "minimum": "must be >= {v}",
    "maximum": "must be <= {v}",
    "exclusiveMinimum": "must be > {v}",
    "exclusiveMaximum": "must be < {v}",
    "multipleOf": "must be a multiple of {v}",
    "minLength": "must be at least {v} characters long",
    "maxLength": "must be at most {v} characters long",
    "pattern": "must match {v}",
    "minItems": "must have at least {v} items",
    "maxItems": "must have at most {v} items",
    "uniqueItems": "items must be unique",
    "contains": "no item matches",
    "minContains": "too few items match",
    "maxContains": "too many items match",
    "minProperties": "must have at least {v} properties",
    "maxProperties": "must have at most {v} properties",
    "required": "missing required property",
    "dependentRequired": "missing a dependent property",
    "dependencies": "missing a dependent property",
    "additionalProperties": "unexpected property",
    "unevaluatedProperties": "unexpected properties",
    "additionalItems": "too many items",
    "items": "too many items",
    "unevaluatedItems": "unexpected items",
    "propertyNames": "has an invalid property name",
    "anyOf": "matches none of the allowed schemas",
    "oneOf": "must match exactly one of the allowed schemas",
    "not": "matches a disallowed schema",
    None: "not allowed",  # a `false` schema
    # Not about a schema:
    "missing-parameter": "missing required parameter",
    "repeated-parameter": "given more than once",
    "malformed-parameter": "malformed {v} value",
    "missing-body": "request body is required",
    "not-json": "not valid JSON",
    "too-deep": "nested too deeply",
    "content-type": "{v}",
}


class OpenApiError(ValueError):
    """A document that cannot be used; the message says where.

    Example: "paths./orders/{id}.get.parameters[0].schema.type: invalid schema: ...".
    """


@dataclass(frozen=True, slots=True)
class Problem:
    """One thing wrong with a request (or response)."""

    pointer: str  # JSON pointer into the request: "/body/items/0/qty", "/query/limit", ...
    message: str


def load_openapi_text(text: str) -> dict:
    """Parse an OpenAPI document written as JSON or YAML; OpenApiError if it does not parse."""
    json_error: OpenApiError | None = None
    if text.lstrip().startswith("{"):
        try:
            doc = json.loads(text)
        except (ValueError, RecursionError) as error:
            line, detail = getattr(error, "lineno", None), getattr(error, "msg", str(error))
            json_error = OpenApiError(f"line {line}: {detail}" if line else detail)
        else:
            return _mapping(doc)
    try:
        doc = yaml.load(text, Loader=_YamlLoader)  # noqa: S506 (a safe loader, see below)
    except (yaml.YAMLError, RecursionError) as error:
        if json_error is not None:  # "{" and neither: the JSON error is the one to fix
            raise json_error from None
        mark = getattr(error, "problem_mark", None)
        detail = getattr(error, "problem", None) or str(error)
        raise OpenApiError(f"line {mark.line + 1}: {detail}" if mark else detail) from None
    return _mapping(doc)


def _mapping(doc: Any) -> dict:
    if not isinstance(doc, dict):
        raise OpenApiError("document: must be an object")
    return doc


class _YamlLoader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):
    """A safe loader that keeps dates as strings, as a JSON document would have them."""


_YamlLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


def compile_openapi(doc: dict) -> OpenApiValidator:
    """Compile an OpenAPI 3.0.x / 3.1.x document; OpenApiError says what is wrong and where."""
    if not isinstance(doc, dict):
        raise OpenApiError("document: must be an object")
    version = doc.get("openapi")
    if version is None:
        swagger = " (Swagger 2.0 is not supported)" if "swagger" in doc else ""
        raise OpenApiError(f"openapi: missing{swagger}")
    found = _VERSION.fullmatch(version) if isinstance(version, str) else None
    if found is None:
        raise OpenApiError(f"openapi: unsupported version {_short(str(version))!r} (3.0.x, 3.1.x)")
    compiler = _Compiler(doc, v31=found.group(1) == "1")
    return OpenApiValidator(compiler.operations(), version=version)


class Operation:
    """One method on one path of the document, ready to check requests and responses."""

    __slots__ = (
        "method",
        "path_template",
        "operation_id",
        "needs_body",
        "_path",
        "_query",
        "_headers",
        "_cookies",
        "_header_names",
        "_body",
        "_responses",
    )

    def __init__(
        self,
        *,
        method: str,
        path_template: str,
        operation_id: str | None,
        params: list[_Param],
        body: _Body | None,
        responses: dict[str, _Content | None],
    ) -> None:
        self.method = method
        self.path_template = path_template
        self.operation_id = operation_id
        self._path = tuple(p for p in params if p.location == "path")
        self._query = tuple(p for p in params if p.location == "query")
        self._headers = tuple(p for p in params if p.location == "header")
        self._cookies = tuple(p for p in params if p.location == "cookie")
        self._header_names = frozenset(p.name for p in self._headers) | (
            {"cookie"} if self._cookies else set()
        )
        self._body = body
        self._responses = responses
        # Whether validate() wants the body bytes: only a JSON schema reads them.
        self.needs_body = body is not None and body.content.has_schema

    def __repr__(self) -> str:
        return f"<Operation {self.method} {self.path_template}>"

    def validate(
        self,
        *,
        path_params: dict[str, str],
        query: list[tuple[str, str]],
        headers: list[tuple[bytes, bytes]],
        content_type: bytes | None,
        body: bytes | None,
    ) -> list[Problem]:
        """The request's problems (at most MAX_PROBLEMS), [] when it is valid.

        `path_params` come from match(); `query` is the decoded pairs in order; `headers` the
        ASGI header list; `body` the whole body, or None when it was not read (needs_body is
        false): whether a body was sent is then told by Content-Length / Transfer-Encoding.
        """
        problems: list[Problem] = []
        for param in self._path:
            value = path_params.get(param.name)
            param.check(None if value is None else [value], problems)
        if self._query:
            given: dict[str, list[str]] = {}
            for name, value in query:
                given.setdefault(name, []).append(value)
            for param in self._query:
                if param.style == "deepObject" or param.shape == "object":
                    param.check_object(given, problems)
                else:
                    param.check(given.get(param.name), problems)
        if self._header_names:
            wanted = self._header_names
            lines: dict[str, list[str]] = {}
            for raw_name, raw_value in headers:
                name = raw_name.decode("latin-1").lower()
                if name in wanted:
                    lines.setdefault(name, []).append(raw_value.decode("latin-1").strip())
            for param in self._headers:
                values = lines.get(param.name)
                param.check(None if values is None else [", ".join(values)], problems)
            if self._cookies:
                jar = _cookies(lines.get("cookie", ()))
                for param in self._cookies:
                    value = jar.get(param.name)
                    param.check(None if value is None else [value], problems)
        if self._body is not None and len(problems) < MAX_PROBLEMS:
            self._body.check(content_type, body, headers, problems)
        return problems

    def validate_response(
        self, *, status: int, content_type: bytes | None, body: bytes | None
    ) -> list[Problem]:
        """A response's problems against the document's responses; [] if nothing to check.

        The response is looked up as `status`, then its range ("2XX"), then "default".
        """
        responses = self._responses
        for key in (str(status), f"{status // 100}XX", "default"):
            if key in responses:
                content = responses[key]
                break
        else:
            return []
        if content is None or not body:
            return []
        problems: list[Problem] = []
        content.check(content_type, body, problems)
        return problems


class OpenApiValidator:
    """A compiled document: finds the operation for a request."""

    __slots__ = ("version", "operations", "_concrete", "_root", "_depth")

    def __init__(self, operations: list[Operation], *, version: str) -> None:
        self.version = version
        self.operations = tuple(operations)
        self._concrete: dict[str, dict[str, Operation]] = {}
        self._root = _Node()
        self._depth = 0
        for op in operations:
            segments = _template_segments(op.path_template)
            if all(kind == "literal" for kind, *_ in segments):
                self._concrete.setdefault(op.path_template, {})[op.method] = op
            node = self._root
            for segment in segments:
                node = node.child(segment)
            node.operations[op.method] = op
            self._depth = max(self._depth, len(segments))
        self._root.sort()

    def match(self, method: str, path: str) -> tuple[Operation, dict[str, str]] | None:
        """The operation for `method` on `path`, with the path parameters' raw values.

        `path` is as the document sees it (no API prefix, version or servers path), already
        percent-decoded. A concrete path wins over a templated one, and a literal segment over
        a `{param}`; only paths that have `method` are considered. None if there is none.

        Example: match("GET", "/orders/42") -> (<Operation GET /orders/{id}>, {"id": "42"})
        """
        method = method.upper()
        concrete = self._concrete.get(path)
        if concrete is not None and method in concrete:
            return concrete[method], {}
        if not path.startswith("/"):
            return None
        segments = path[1:].split("/")
        if len(segments) > self._depth:
            return None
        found = self._root.find(segments, 0, method)
        if found is None:
            return None
        op, values = found
        return op, dict(values)


# --- matching ------------------------------------------------------------------------------


class _Node:
    """One segment position of the path trie."""

    __slots__ = ("literal", "mixed", "params", "operations")

    def __init__(self) -> None:
        self.literal: dict[str, _Node] = {}
        self.mixed: dict[tuple[str, tuple[str, ...]], tuple[re.Pattern[str], tuple, _Node]] = {}
        self.params: dict[str, _Node] = {}
        self.operations: dict[str, Operation] = {}

    def child(self, segment: tuple) -> _Node:
        kind = segment[0]
        if kind == "literal":
            return self.literal.setdefault(segment[1], _Node())
        if kind == "param":
            return self.params.setdefault(segment[1], _Node())
        _, pattern, names = segment
        key = (pattern.pattern, names)
        if key not in self.mixed:
            self.mixed[key] = (pattern, names, _Node())
        return self.mixed[key][2]

    def sort(self) -> None:
        # Of segments like "{name}.json" and "{name}.{ext}", the one with more literal text is
        # the more specific.
        self.mixed = dict(
            sorted(self.mixed.items(), key=lambda item: -len(_TEMPLATE_PARAM.sub("", item[0][0])))
        )
        for child in (*self.literal.values(), *self.params.values()):
            child.sort()
        for *_, child in self.mixed.values():
            child.sort()

    def find(
        self, segments: list[str], i: int, method: str
    ) -> tuple[Operation, list[tuple[str, str]]] | None:
        if i == len(segments):
            op = self.operations.get(method)
            return None if op is None else (op, [])
        segment = segments[i]
        child = self.literal.get(segment)
        if child is not None and (found := child.find(segments, i + 1, method)):
            return found
        if not segment:
            return None  # a parameter never matches an empty segment
        for pattern, names, node in self.mixed.values():
            matched = pattern.fullmatch(segment)
            if matched and (found := node.find(segments, i + 1, method)):
                found[1].extend(zip(names, matched.groups(), strict=True))
                return found
        for name, node in self.params.items():
            if found := node.find(segments, i + 1, method):
                found[1].append((name, segment))
                return found
        return None


def _template_segments(template: str) -> list[tuple]:
    """Split "/orders/{id}/files/{name}.{ext}" into literal, param and mixed segments."""
    segments: list[tuple] = []
    for segment in template[1:].split("/"):
        pieces = _TEMPLATE_PARAM.split(segment)  # literal, name, literal, name, ..., literal
        if any("{" in p or "}" in p for p in pieces[::2]):
            raise ValueError(f"malformed template segment {_short(segment)!r}")
        if len(pieces) == 1:
            segments.append(("literal", segment))
        elif len(pieces) == 3 and not pieces[0] and not pieces[2]:
            segments.append(("param", pieces[1]))
        else:
            regex = "".join(
                re.escape(p) if i % 2 == 0 else "(.+?)" for i, p in enumerate(pieces) if p
            )
            segments.append(("mixed", re.compile(regex), tuple(pieces[1::2])))
    return segments


# --- parameters ----------------------------------------------------------------------------


class _Bad(Exception):
    """A parameter value that cannot be read; args[0] is a _MESSAGES key, args[1] its {v}."""


@dataclass(frozen=True, slots=True)
class _Param:
    name: str  # lower-cased for headers
    location: str
    pointer: str
    required: bool
    style: str
    explode: bool
    shape: str  # "scalar", "array", "object" or "json"
    types: frozenset[str] | None  # a scalar's types, an array's item types
    property_types: dict[str, frozenset[str] | None]
    validator: Validator | None

    def check(self, raw: list[str] | None, problems: list[Problem]) -> None:
        """Decode `raw` (the values given for this parameter, None if absent) and validate."""
        if len(problems) >= MAX_PROBLEMS:
            return
        if raw is None:
            if self.required:
                problems.append(Problem(self.pointer, _MESSAGES["missing-parameter"]))
            return
        try:
            value = self._decode(raw)
        except _Bad as bad:
            problems.append(Problem(self.pointer, _message(*bad.args)))
            return
        if self.validator is not None:
            _collect(self.validator, value, self.pointer, problems)

    def check_object(self, given: dict[str, list[str]], problems: list[Problem]) -> None:
        """An object in the query: `name[key]=v` (deepObject) or `key=v` (form, explode)."""
        if self.style == "deepObject":
            prefix = self.name + "["
            found = {
                name[len(prefix) : -1]: values
                for name, values in given.items()
                if name.startswith(prefix) and name.endswith("]")
            }
        elif self.explode:
            found = {name: given[name] for name in self.property_types if name in given}
        else:
            self.check(given.get(self.name), problems)
            return
        if not found:
            self.check(None, problems)
            return
        if len(problems) >= MAX_PROBLEMS:
            return
        value = {}
        for key, values in found.items():
            if len(values) > 1:
                problems.append(
                    Problem(f"{self.pointer}/{_escape(key)}", _MESSAGES["repeated-parameter"])
                )
                return
            value[key] = _coerce(values[0], self.property_types.get(key))
        if self.validator is not None:
            _collect(self.validator, value, self.pointer, problems)

    def _decode(self, raw: list[str]) -> Any:
        if self.shape == "array" and self.location == "query":
            if self.explode and self.style == "form":
                items = raw
            else:
                items = [item for value in raw for item in value.split(_DELIMITER[self.style])]
            return [_coerce(item, self.types) for item in items]
        if len(raw) > 1:
            raise _Bad("repeated-parameter", None)
        text = self._unprefixed(raw[0])
        if self.shape == "json":
            try:
                return json.loads(text, parse_constant=_no_constant)
            except (ValueError, RecursionError):
                raise _Bad("not-json", None) from None
        if self.shape == "scalar":
            return _coerce(text, self.types)
        separator = self._separator()
        items = text.split(separator) if text else []
        if self.location == "header":
            items = [item.strip() for item in items]
        if self.shape == "array":
            return [_coerce(item, self.types) for item in items]
        if self.explode:  # simple / label, exploded: k=v,k=v
            pairs = [item.partition("=") for item in items]
            if any(not sep for _, sep, _ in pairs):
                raise _Bad("malformed-parameter", "object")
            return {k: _coerce(v, self.property_types.get(k)) for k, _, v in pairs}
        if len(items) % 2:
            raise _Bad("malformed-parameter", "object")
        keys, values = items[::2], items[1::2]
        return {
            k: _coerce(v, self.property_types.get(k)) for k, v in zip(keys, values, strict=True)
        }

    def _unprefixed(self, text: str) -> str:
        if self.style == "label":
            if not text.startswith("."):
                raise _Bad("malformed-parameter", "label")
            return text[1:]
        if self.style == "matrix":
            prefix = f";{self.name}="
            if not text.startswith(prefix):
                if text == f";{self.name}":
                    return ""
                raise _Bad("malformed-parameter", "matrix")
            return text[len(prefix) :]
        return text

    def _separator(self) -> str:
        if self.explode and self.shape == "array":
            if self.style == "label":
                return "."
            if self.style == "matrix":
                return f";{self.name}="
        if self.location == "query":
            return _DELIMITER.get(self.style, ",")
        return ","


def _coerce(text: str, types: frozenset[str] | None) -> Any:
    """A parameter's text as the JSON value the schema expects, or the text if it is not one."""
    if types is None:
        return text
    if "integer" in types and _INTEGER.fullmatch(text):
        return int(text)
    if "number" in types and _NUMBER.fullmatch(text):
        if _INTEGER.fullmatch(text):
            return int(text)
        number = float(text)
        if number not in (float("inf"), float("-inf")):
            return number
    if "boolean" in types and text in ("true", "false"):
        return text == "true"
    if "null" in types and "string" not in types and text in ("", "null"):
        return None
    return text


def _cookies(lines: Iterable[str]) -> dict[str, str]:
    jar: dict[str, str] = {}
    for line in lines:
        for pair in line.split(";"):
            name, sep, value = pair.strip().partition("=")
            if sep:
                jar.setdefault(name, value)
    return jar


# --- bodies --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Content:
    """A `content` map: media type (or range) -> the validator of its JSON schema, or None."""

    exact: dict[str, Validator | None]
    ranges: dict[str, Validator | None]  # "application/*"
    anything: tuple[Validator | None] | None  # "*/*"
    listing: str  # for messages: "application/json, text/csv"

    @property
    def has_schema(self) -> bool:
        validators = (*self.exact.values(), *self.ranges.values(), *(self.anything or ()))
        return any(v is not None for v in validators)

    def check(self, content_type: bytes | None, body: bytes | None, problems: list) -> None:
        media = (
            content_type.split(b";", 1)[0].strip().lower().decode("latin-1") if content_type else ""
        )
        key = media or "application/octet-stream"  # RFC 9110: what a body without a type is
        if key in self.exact:
            validator = self.exact[key]
        elif (range_ := key.split("/", 1)[0] + "/*") in self.ranges:
            validator = self.ranges[range_]
        elif self.anything is not None:
            validator = self.anything[0]
        else:
            given = repr(_short(media, 40)) if media else "missing"
            detail = f"content type {given} not allowed; expected {self.listing}"
            problems.append(Problem("/header/content-type", _message("content-type", detail)))
            return
        if validator is None or body is None:
            return
        try:
            value = json.loads(body, parse_constant=_no_constant)
        except ValueError:
            problems.append(Problem("/body", _MESSAGES["not-json"]))
            return
        except RecursionError:
            problems.append(Problem("/body", _MESSAGES["too-deep"]))
            return
        _collect(validator, value, "/body", problems)


@dataclass(frozen=True, slots=True)
class _Body:
    required: bool
    content: _Content

    def check(
        self,
        content_type: bytes | None,
        body: bytes | None,
        headers: list[tuple[bytes, bytes]],
        problems: list[Problem],
    ) -> None:
        sent = bool(body) if body is not None else _body_announced(headers)
        if not sent:
            if self.required:
                problems.append(Problem("/body", _MESSAGES["missing-body"]))
            return
        self.content.check(content_type, body, problems)


def _body_announced(headers: list[tuple[bytes, bytes]]) -> bool:
    for name, value in headers:
        lowered = name.lower()
        if lowered == b"transfer-encoding":
            return True
        if lowered == b"content-length":
            return value.strip() not in (b"0", b"")
    return False


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


# --- problems ------------------------------------------------------------------------------


def _collect(validator: Validator, value: Any, base: str, problems: list[Problem]) -> None:
    """Append the problems of `value` under `base`, stopping at MAX_PROBLEMS."""
    try:
        for error in validator.iter_errors(value):
            for problem in _problems_of(error, base):
                if problem not in problems:  # one error per missing property lists them all
                    problems.append(problem)
                if len(problems) >= MAX_PROBLEMS:
                    return
    except RecursionError:
        problems.append(Problem(base, _MESSAGES["too-deep"]))


def _problems_of(error: ValidationError, base: str) -> Iterator[Problem]:
    if error.validator in ("anyOf", "oneOf") and error.context:
        error = best_match([error])  # the most relevant error of the closest alternative
    pointer = base + "".join(f"/{_escape(part)}" for part in error.absolute_path)
    keyword, value, instance = error.validator, error.validator_value, error.instance
    if keyword == "required" and isinstance(instance, dict):
        for name in value:
            if name not in instance:
                yield Problem(f"{pointer}/{_escape(name)}", _MESSAGES["required"])
        return
    if keyword == "additionalProperties" and value is False and isinstance(instance, dict):
        schema = error.schema if isinstance(error.schema, dict) else {}
        known = schema.get("properties", {})
        patterns = list(schema.get("patternProperties", {}))
        for name in instance:
            if name not in known and not any(re.search(p, name) for p in patterns):
                yield Problem(f"{pointer}/{_escape(name)}", _MESSAGES["additionalProperties"])
        return
    if keyword == "type":
        expected = value if isinstance(value, str) else " or ".join(map(str, value))
        yield Problem(pointer, f"expected {expected}, got {_json_type(instance)}")
        return
    if keyword in ("minimum", "maximum") and isinstance(error.schema, dict):
        exclusive = error.schema.get("exclusiveM" + keyword[1:]) is True  # Draft 4's boolean
        if exclusive:
            keyword = "exclusiveM" + keyword[1:]
    yield Problem(pointer, _message(keyword, value))


def _message(key: str | None, value: Any = None) -> str:
    template = _MESSAGES.get(key)
    if template is None:
        return f"fails {_short(str(key), 40)}"
    if "{v}" not in template:
        return template
    if key == "enum" and isinstance(value, list):
        shown = ", ".join(json.dumps(v, default=str) for v in value[:10])
        value = _short(shown + (", ..." if len(value) > 10 else ""), 120)
    elif key == "const":
        value = _short(json.dumps(value, default=str), 60)
    elif not isinstance(value, str):
        value = _short(str(value), 60)
    elif key != "content-type":
        value = _short(value, 80)
    return template.format(v=value)


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    return "array" if isinstance(value, list) else "object"


def _escape(part: str | int) -> str:
    return str(part).replace("~", "~0").replace("/", "~1")


def _short(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --- compiling -----------------------------------------------------------------------------


def _where(loc: Loc) -> str:
    """A location as messages show it: "paths./orders/{id}.get.parameters[0]"."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out = f"{out}.{part}" if out else str(part)
    return out or "document"


def _fail(loc: Loc, message: str) -> OpenApiError:
    return OpenApiError(f"{_where(loc)}: {message}")


def _is_json(media: str) -> bool:
    subtype = media.partition("/")[2]
    return subtype == "json" or subtype.endswith("+json")


def _types(node: Any) -> frozenset[str] | None:
    """The JSON types a compiled schema allows, as far as they show; None: not constrained."""
    if not isinstance(node, dict):
        return None
    kind = node.get("type")
    if isinstance(kind, str):
        return frozenset([kind])
    if isinstance(kind, list):
        return frozenset(k for k in kind if isinstance(k, str))
    for key in ("allOf",):
        for sub in node.get(key, ()):
            found = _types(sub)
            if found is not None:
                return found
    union: set[str] = set()
    alternatives = [*node.get("anyOf", ()), *node.get("oneOf", ())]
    for sub in alternatives:
        found = _types(sub)
        if found is None:
            return None
        union |= found
    if union:
        return frozenset(union)
    if isinstance(node.get("enum"), list):
        return frozenset(_json_type(v) for v in node["enum"]) | (
            {"number"} if any(isinstance(v, int | float) for v in node["enum"]) else set()
        )
    return None


class _Compiler:
    """Walks one document once; remembers what it compiled so that shared parts compile once."""

    def __init__(self, doc: dict, *, v31: bool) -> None:
        self.doc = doc
        self.v31 = v31
        self.cls = Draft202012Validator if v31 else Draft4Validator
        self.defs_key = "$defs" if v31 else "definitions"
        self.meta = self.cls(self.cls.META_SCHEMA, format_checker=self.cls.FORMAT_CHECKER)
        self.objects: dict[Loc, Any] = {}  # $ref targets by location
        self.checked: set[Loc] = set()
        self.edges: dict[Loc, list[tuple[Loc, bool]]] = {}
        self.recursive: dict[Loc, bool] = {}
        self.expanded: dict[tuple[Loc, str], tuple[Any, frozenset]] = {}
        self.def_names: dict[tuple[Loc, str], str] = {}
        self.def_bodies: dict[tuple[Loc, str], tuple[Any, frozenset]] = {}
        self.validators: dict[tuple[Loc, str], tuple[Validator, Any]] = {}

    # references

    def target(self, ref: str, loc: Loc) -> tuple[Any, Loc]:
        """What a local `$ref` points to, and where that is."""
        if not ref.startswith("#/"):
            raise _fail(loc, f"only local $refs ('#/...') are supported, got {_short(ref)!r}")
        node: Any = self.doc
        where: list[str | int] = []
        for raw in unquote(ref[2:]).split("/"):
            part = raw.replace("~1", "/").replace("~0", "~")
            if isinstance(node, dict) and part in node:
                node = node[part]
                where.append(part)
            elif isinstance(node, dict) and part.isdigit() and int(part) in node:  # YAML: 200:
                node = node[int(part)]
                where.append(part)
            elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
                node = node[int(part)]
                where.append(int(part))
            else:
                raise _fail(loc, f"unresolvable $ref {_short(ref)!r}")
        found = tuple(where)
        self.objects[found] = node
        return node, found

    def deref(self, obj: Any, loc: Loc) -> tuple[Any, Loc]:
        """Follow an object's `$ref` chain (parameters, bodies, responses, path items)."""
        seen = {loc}
        while isinstance(obj, dict) and isinstance(obj.get("$ref"), str):
            obj, next_loc = self.target(obj["$ref"], loc)
            if next_loc in seen:
                raise _fail(loc, "circular $ref")
            seen.add(next_loc)
            loc = next_loc
        return obj, loc

    # schemas

    def schema(self, raw: Any, loc: Loc, direction: str) -> tuple[Validator, Any]:
        """The validator of the schema at `loc` ("request" or "response"), and the schema."""
        key = (loc, direction)
        if key in self.validators:
            return self.validators[key]
        self.check(raw, loc)
        try:
            node, uses = self.expand(raw, loc, direction)
        except RecursionError:
            raise _fail(loc, "schema nested too deeply") from None
        root = node
        if uses:
            defs: dict[str, Any] = {}
            pending = list(uses)
            while pending:
                use = pending.pop()
                name = self.def_names[use]
                if name not in defs:
                    body, more = self.def_bodies[use]
                    defs[name] = body
                    pending.extend(more)
            root = {"$id" if self.v31 else "id": _SCHEMA_ID, self.defs_key: defs, "allOf": [node]}
        result = (self.cls(root), node)
        self.validators[key] = result
        return result

    def check(self, raw: Any, loc: Loc) -> None:
        if loc in self.checked:
            return
        self.checked.add(loc)
        if not isinstance(raw, dict | bool) or (isinstance(raw, bool) and not self.v31):
            raise _fail(loc, "invalid schema: must be an object")
        error = best_match(self.meta.iter_errors(raw))
        if error is not None:
            raise _fail((*loc, *error.path), f"invalid schema: {_short(error.message, 120)}")

    def expand(self, schema: Any, loc: Loc, direction: str) -> tuple[Any, frozenset]:
        """The schema with its `$ref`s inlined, translated for its validator class.

        Also returns the recursive `$ref` targets it still refers to (keys of def_bodies).
        """
        if not isinstance(schema, dict):
            return schema, _NO_USES
        ref = schema.get("$ref")
        if isinstance(ref, str):
            target, target_loc = self.target(ref, loc)
            node, uses = self.expand_target(target, target_loc, direction)
            if not self.v31:
                return node, uses  # 3.0: "properties added [to a Reference] SHALL be ignored"
            rest = {k: v for k, v in schema.items() if k != "$ref"}
            if not any(k not in _DROPPED and not k.startswith("x-") for k in rest):
                return node, uses
            extra, more = self.expand_keywords(rest, loc, direction)
            return {"allOf": [node, extra]}, uses | more
        return self.expand_keywords(schema, loc, direction)

    def expand_target(self, target: Any, loc: Loc, direction: str) -> tuple[Any, frozenset]:
        key = (loc, direction)
        if key in self.expanded:
            return self.expanded[key]
        self.check(target, loc)
        if self.is_recursive(loc):
            name = f"r{len(self.def_names)}"
            self.def_names[key] = name
            found = ({"$ref": f"{_SCHEMA_ID}#/{self.defs_key}/{name}"}, frozenset([key]))
            self.expanded[key] = found  # before the body, which refers back to it
            self.def_bodies[key] = self.expand(target, loc, direction)
            return found
        found = self.expand(target, loc, direction)
        self.expanded[key] = found
        return found

    def expand_keywords(self, schema: dict, loc: Loc, direction: str) -> tuple[Any, frozenset]:
        for keyword in _UNSUPPORTED:
            if keyword in schema:
                raise _fail((*loc, keyword), "not supported")
        out: dict[str, Any] = {}
        uses: set = set()

        def sub(value: Any, where: Loc) -> Any:
            node, more = self.expand(value, where, direction)
            uses.update(more)
            return node

        for keyword, value in schema.items():
            if keyword in _DROPPED or keyword.startswith("x-"):
                continue
            if keyword not in _APPLICATORS:
                out[keyword] = value
            elif keyword in _BY_NAME and isinstance(value, dict):
                out[keyword] = {
                    name: sub(s, (*loc, keyword, name)) if isinstance(s, dict | bool) else s
                    for name, s in value.items()
                }
            elif isinstance(value, list):
                out[keyword] = [sub(s, (*loc, keyword, i)) for i, s in enumerate(value)]
            else:
                out[keyword] = sub(value, (*loc, keyword))
        required, properties = out.get("required"), schema.get("properties")
        if isinstance(required, list) and isinstance(properties, dict):
            flag = "readOnly" if direction == "request" else "writeOnly"
            kept = [
                name
                for name in required
                if not self.flagged(properties.get(name), (*loc, "properties", name), flag)
            ]
            if len(kept) < len(required):
                out["required"] = kept
        if not self.v31 and schema.get("nullable") is True:
            out = _nullable(out)
        return out, frozenset(uses)

    def flagged(self, schema: Any, loc: Loc, flag: str) -> bool:
        """Whether a property's schema (through its `$ref`s) says readOnly / writeOnly."""
        for _ in range(20):
            if not isinstance(schema, dict):
                return False
            if schema.get(flag) is True:
                return True
            ref = schema.get("$ref")
            if not isinstance(ref, str):
                return False
            schema, loc = self.target(ref, loc)
        return False

    def is_recursive(self, loc: Loc) -> bool:
        """Whether the schema at `loc` refers back to itself; OpenApiError if without end."""
        if loc not in self.recursive:
            if self.reaches(loc, in_place_only=True):
                raise _fail(loc, "circular $ref that never descends into the value")
            self.recursive[loc] = self.reaches(loc, in_place_only=False)
        return self.recursive[loc]

    def reaches(self, start: Loc, *, in_place_only: bool) -> bool:
        seen: set[Loc] = set()
        todo = [start]
        while todo:
            loc = todo.pop()
            for target, in_place in self.refs_of(loc):
                if in_place_only and not in_place:
                    continue
                if target == start:
                    return True
                if target not in seen:
                    seen.add(target)
                    todo.append(target)
        return False

    def refs_of(self, loc: Loc) -> list[tuple[Loc, bool]]:
        """The `$ref`s applied by the schema at `loc`: (target, applies to the same value)."""
        if loc not in self.edges:
            found: list[tuple[Loc, bool]] = []
            self.collect_refs(self.objects[loc], loc, True, found)
            self.edges[loc] = found
        return self.edges[loc]

    def collect_refs(self, schema: Any, loc: Loc, in_place: bool, found: list) -> None:
        if not isinstance(schema, dict):
            return
        ref = schema.get("$ref")
        if isinstance(ref, str):
            found.append((self.target(ref, loc)[1], in_place))
            if not self.v31:
                return
        for keyword, value in schema.items():
            descends = _APPLICATORS.get(keyword)
            if descends is None:
                continue
            here = in_place and not descends
            if keyword in _BY_NAME and isinstance(value, dict):
                for name, s in value.items():
                    self.collect_refs(s, (*loc, keyword, name), here, found)
            elif isinstance(value, list):
                for i, s in enumerate(value):
                    self.collect_refs(s, (*loc, keyword, i), here, found)
            else:
                self.collect_refs(value, (*loc, keyword), here, found)

    # the document

    def operations(self) -> list[Operation]:
        paths = self.doc.get("paths")
        if paths is None and self.v31:
            paths = {}  # 3.1: a document may describe only webhooks or components
        if not isinstance(paths, dict):
            raise _fail(("paths",), "must be an object")
        operations: list[Operation] = []
        shapes: dict[str, str] = {}
        for template, raw_item in paths.items():
            loc: Loc = ("paths", str(template))
            if not isinstance(template, str) or not template.startswith("/"):
                raise _fail(loc, "a path must start with '/'")
            try:
                segments = _template_segments(template)
            except ValueError as error:
                raise _fail(loc, str(error)) from None
            names = [name for s in segments for name in _segment_names(s)]
            if len(set(names)) < len(names):
                raise _fail(loc, "a path parameter appears twice in the template")
            shape = _TEMPLATE_PARAM.sub("{}", template)
            if shape in shapes:
                raise _fail(loc, f"the same path as {shapes[shape]!r}")
            shapes[shape] = template
            item, item_loc = self.deref(raw_item, loc)
            if not isinstance(item, dict):
                raise _fail(item_loc, "must be an object")
            shared = self.parameters(item.get("parameters"), (*item_loc, "parameters"))
            for method in _METHODS:
                if method not in item:
                    continue
                op_loc = (*item_loc, method)
                op = self.operation(template, method, item[method], op_loc, shared, names)
                operations.append(op)
        return operations

    def operation(
        self,
        template: str,
        method: str,
        raw: Any,
        loc: Loc,
        shared: dict[tuple[str, str], tuple[Any, Loc]],
        template_names: list[str],
    ) -> Operation:
        if not isinstance(raw, dict):
            raise _fail(loc, "must be an object")
        declared = {**shared, **self.parameters(raw.get("parameters"), (*loc, "parameters"))}
        for (name, where), (_, param_loc) in declared.items():
            if where == "path" and name not in template_names:
                raise _fail(param_loc, f"path parameter {name!r} is not in the path template")
        for name in template_names:
            if (name, "path") not in declared:
                raise _fail(loc, f"path parameter {name!r} is not defined in parameters")
        params = [self.parameter(obj, param_loc) for obj, param_loc in declared.values()]
        params = [p for p in params if p is not None]
        body = None
        if "requestBody" in raw:
            body_obj, body_loc = self.deref(raw["requestBody"], (*loc, "requestBody"))
            if not isinstance(body_obj, dict):
                raise _fail(body_loc, "must be an object")
            content = self.content(body_obj.get("content"), (*body_loc, "content"), "request")
            body = _Body(required=body_obj.get("required") is True, content=content)
        responses: dict[str, _Content | None] = {}
        raw_responses = raw.get("responses", {})
        if not isinstance(raw_responses, dict):
            raise _fail((*loc, "responses"), "must be an object")
        for status, raw_response in raw_responses.items():
            code = str(status)
            code = code.upper() if len(code) == 3 else code  # "2xx" is "2XX"
            response, response_loc = self.deref(raw_response, (*loc, "responses", str(status)))
            if not isinstance(response, dict):
                raise _fail(response_loc, "must be an object")
            content = response.get("content")
            responses[code] = (
                self.content(content, (*response_loc, "content"), "response") if content else None
            )
        operation_id = raw.get("operationId")
        return Operation(
            method=method.upper(),
            path_template=template,
            operation_id=operation_id if isinstance(operation_id, str) else None,
            params=params,
            body=body,
            responses=responses,
        )

    def parameters(self, raw: Any, loc: Loc) -> dict[tuple[str, str], tuple[Any, Loc]]:
        """Resolved parameter objects by (name, in); a later one with the same key wins."""
        if raw is None:
            return {}
        if not isinstance(raw, list):
            raise _fail(loc, "must be an array")
        found: dict[tuple[str, str], tuple[Any, Loc]] = {}
        for i, item in enumerate(raw):
            obj, obj_loc = self.deref(item, (*loc, i))
            if not isinstance(obj, dict):
                raise _fail(obj_loc, "must be an object")
            name, where = obj.get("name"), obj.get("in")
            if not isinstance(name, str) or not name:
                raise _fail(obj_loc, "'name' must be a non-empty string")
            if where not in _STYLES:
                raise _fail(obj_loc, "'in' must be one of path, query, header, cookie")
            found[(name.lower() if where == "header" else name, where)] = (obj, obj_loc)
        return found

    def parameter(self, obj: dict, loc: Loc) -> _Param | None:
        name, where = obj["name"], obj["in"]
        if where == "header":
            name = name.lower()
            if name in _IGNORED_HEADERS:
                return None
        style = obj.get("style", _DEFAULT_STYLE[where])
        if style not in _STYLES[where]:
            raise _fail((*loc, "style"), f"{_short(str(style))!r} is not allowed in {where}")
        explode = obj.get("explode", style == "form")
        if not isinstance(explode, bool):
            raise _fail((*loc, "explode"), "must be a boolean")
        validator, node, shape = None, None, ""
        if "schema" in obj:
            validator, node = self.schema(obj["schema"], (*loc, "schema"), "request")
        elif isinstance(obj.get("content"), dict) and obj["content"]:
            media, entry = next(iter(obj["content"].items()))
            if not isinstance(entry, dict):
                raise _fail((*loc, "content", media), "must be an object")
            if "schema" in entry:
                schema_loc = (*loc, "content", media, "schema")
                validator, node = self.schema(entry["schema"], schema_loc, "request")
            if _is_json(str(media).lower()):
                shape = "json"
        types = _types(node)
        if not shape:
            if types and "array" in types and types <= {"array", "null"}:
                shape = "array"
            elif types and "object" in types and types <= {"object", "null"}:
                shape = "object"
            else:
                shape = "scalar"
        if style == "deepObject" and shape != "object":
            raise _fail((*loc, "style"), "deepObject needs an object schema")
        item_types = types
        property_types: dict[str, frozenset[str] | None] = {}
        if shape == "array":
            item_types = _types(node.get("items"))
        elif shape == "object" and isinstance(node.get("properties"), dict):
            property_types = {k: _types(v) for k, v in node["properties"].items()}
        return _Param(
            name=name,
            location=where,
            pointer=f"/{where}/{_escape(name)}",
            required=where == "path" or obj.get("required") is True,
            style=style,
            explode=explode,
            shape=shape,
            types=item_types,
            property_types=property_types,
            validator=validator,
        )

    def content(self, raw: Any, loc: Loc, direction: str) -> _Content:
        if not isinstance(raw, dict):
            raise _fail(loc, "must be an object")
        exact: dict[str, Validator | None] = {}
        ranges: dict[str, Validator | None] = {}
        anything: tuple[Validator | None] | None = None
        for media, entry in raw.items():
            media_loc = (*loc, str(media))
            if not isinstance(entry, dict):
                raise _fail(media_loc, "must be an object")
            key = str(media).split(";", 1)[0].strip().lower()
            validator = None
            if "schema" in entry and _is_json(key):
                validator = self.schema(entry["schema"], (*media_loc, "schema"), direction)[0]
            elif "schema" in entry:  # not applied to the body, but must still make sense
                self.schema(entry["schema"], (*media_loc, "schema"), direction)
            if key == "*/*":
                anything = (validator,)
            elif key.endswith("/*"):
                ranges[key] = validator
            else:
                exact[key] = validator
        listing = _short(", ".join(str(m) for m in raw), 120) or "no body"
        return _Content(exact=exact, ranges=ranges, anything=anything, listing=listing)


def _segment_names(segment: tuple) -> tuple[str, ...]:
    if segment[0] == "param":
        return (segment[1],)
    if segment[0] == "mixed":
        return segment[2]
    return ()


def _nullable(schema: dict) -> dict:
    """A 3.0 schema with `nullable: true` as Draft 4 reads it: null is also allowed."""
    combined = any(k in schema for k in ("allOf", "anyOf", "oneOf", "not"))
    kind = schema.get("type")
    if not combined and (isinstance(kind, str) or kind is None):
        out = dict(schema)
        if isinstance(kind, str):
            out["type"] = [kind, "null"]
        if isinstance(out.get("enum"), list) and None not in out["enum"]:
            out["enum"] = [*out["enum"], None]
        return out
    return {"anyOf": [{"type": "null"}, schema]}


@functools.lru_cache(maxsize=64)
def compiled_openapi(text: str) -> OpenApiValidator:
    """The validator of a document's text, compiled once per distinct text (snapshots are
    rebuilt often; documents rarely change)."""
    return compile_openapi(load_openapi_text(text))
