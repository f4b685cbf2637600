"""Declarative configuration: the gateway's whole configuration as one YAML document.

`manage.py gatewayconfig export | diff -f F | apply -f F | rollback N` (like Kong's decK).
The document holds upstreams (with their targets), APIs (with versions, JWT issuers,
policies and routes, and the routes' policies and rate limits) and plans (with their
rate limits and the APIs they include). Users, organizations, consumers, subscriptions and
keys are data, not configuration: they are never in it, and applying a file never touches
them (a plan that still has subscriptions cannot be removed by a file).

Objects are identified by natural keys, never database ids: an upstream by name, a target
by host and port, an API or plan by slug, a version by name, a route by name within its API,
a JWT issuer by issuer, a policy by kind, a rate limit by (plan), scope and window. Fields
equal to their default are left out of exports; a field left out of a file takes its
default.

Secrets (private JWK members in a static JWKS, policy values under names such as
`Authorization`, `api_key`, `token`, `password`) are exported as `${APIGW_SECRET_…}`
references. Any `${NAME}` (upper case) in a file is replaced, when the file is read, by the
environment variable NAME; `$${NAME}` is a literal `${NAME}`. Lower-case references
(`${consumer}`, `${claim.sub}`) are the transformations' own and are left alone.

Applying runs in one transaction: validated like admin validates (each model's full_clean,
and the policies of each route compiled together), then one config version bump. `diff` is
the same run rolled back. Every structural config version keeps the whole configuration it
made (`ConfigDocument`, deduplicated by hash), so `rollback N` applies version N's.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field

import yaml
from django.core.exceptions import NON_FIELD_ERRORS
from django.core.exceptions import ValidationError as DjangoValidationError
from django.db import models, transaction
from django.utils.dateparse import parse_datetime

FORMAT = "apigw/v1"
SECTIONS = ("upstreams", "apis", "plans")
_ENV_REF = re.compile(r"\$(\$?)\{([A-Z][A-Z0-9_]*)\}")
_ENV_LITERAL = re.compile(r"\$\{([A-Z][A-Z0-9_]*)\}")
_SECRET_NAME = re.compile(r"auth|token|secret|passw|api[-_]?key|cookie|credential", re.I)
_JWK_PRIVATE = frozenset({"k", "d", "p", "q", "dp", "dq", "qi", "oth"})
# Kept by the database, not configuration: cache generations move on purges.
_NOT_CONFIG = frozenset({"id", "cache_generation", "created_at"})


# --- errors ---------------------------------------------------------------------------------


@dataclass
class Problem:
    line: int | None
    where: str
    message: str


class ConfigFileError(Exception):
    """Everything wrong with a document, each problem with its line and field."""

    def __init__(self, filename: str, problems: list[Problem]):
        self.filename = filename
        self.problems = problems
        super().__init__(self.render())

    def render(self) -> str:
        out = []
        for p in self.problems:
            at = f"{self.filename}:{p.line}" if p.line else self.filename
            out.append(f"{at}: {p.where}: {p.message}" if p.where else f"{at}: {p.message}")
        return "\n".join(out)


# --- what the document holds ----------------------------------------------------------------


@dataclass
class Spec:
    """One kind of object: its model, natural key, references and children."""

    label: str
    model_path: str
    key: tuple[str, ...]
    parent: str = ""  # the foreign key to the enclosing object
    refs: dict[str, str] = field(default_factory=dict)  # field -> "upstream" | "version" | "plan"
    children: dict[str, Spec] = field(default_factory=dict)
    m2m: dict[str, str] = field(default_factory=dict)  # field -> "api"
    exclude: frozenset[str] = frozenset()
    scope: dict = field(default_factory=dict)  # filter on the parent's related manager

    @property
    def model(self) -> type[models.Model]:
        from django.apps import apps

        return apps.get_model(self.model_path)

    def plain_fields(self) -> list[models.Field]:
        """Concrete fields that are configuration values, in the model's order."""
        if "_plain" not in self.__dict__:
            skip = _NOT_CONFIG | self.exclude | set(self.refs) | {self.parent}
            self.__dict__["_plain"] = [
                f
                for f in self.model._meta.concrete_fields
                if f.name not in skip and not f.is_relation
            ]
        return self.__dict__["_plain"]

    def columns(self) -> list[str]:
        if "_columns" not in self.__dict__:
            names = [f.name for f in self.plain_fields()] + list(self.refs) + list(self.m2m)
            self.__dict__["_columns"] = [*self.key, *(n for n in names if n not in self.key)]
        return self.__dict__["_columns"]


TARGET = Spec("target", "gateway.Target", ("host", "port"), parent="upstream")
UPSTREAM = Spec("upstream", "gateway.Upstream", ("name",), children={"targets": TARGET})
VERSION = Spec(
    "version", "gateway.ApiVersion", ("name",), parent="api", refs={"upstream": "upstream"}
)
JWT_ISSUER = Spec("jwt issuer", "gateway.JwtIssuer", ("issuer",), parent="api")
API_POLICY = Spec("policy", "gateway.Policy", ("kind",), parent="api", exclude=frozenset({"route"}))
ROUTE_POLICY = Spec(
    "policy", "gateway.Policy", ("kind",), parent="route", exclude=frozenset({"api"})
)
ROUTE_LIMIT = Spec(
    "rate limit",
    "portal.RateLimit",
    ("plan", "scope", "window"),
    parent="route",
    refs={"plan": "plan"},
)
ROUTE = Spec(
    "route",
    "gateway.Route",
    ("name",),
    parent="api",
    refs={"version": "version", "upstream": "upstream"},
    children={"policies": ROUTE_POLICY, "rate_limits": ROUTE_LIMIT},
)
API = Spec(
    "api",
    "gateway.Api",
    ("slug",),
    refs={"upstream": "upstream"},
    children={
        "versions": VERSION,
        "jwt_issuers": JWT_ISSUER,
        "policies": API_POLICY,
        "routes": ROUTE,
    },
)
PLAN_LIMIT = Spec(
    "rate limit",
    "portal.RateLimit",
    ("scope", "window"),
    parent="plan",
    exclude=frozenset({"route"}),
    scope={"route": None},
)
PLAN = Spec(
    "plan", "portal.Plan", ("slug",), m2m={"apis": "api"}, children={"rate_limits": PLAN_LIMIT}
)
TOP = {"upstreams": UPSTREAM, "apis": API, "plans": PLAN}


# --- values ---------------------------------------------------------------------------------


def _to_doc(f: models.Field, value):
    """A model value as the document holds it."""
    if value is None:
        return None
    if isinstance(f, models.DateTimeField):
        return value.astimezone(dt.UTC).isoformat().replace("+00:00", "Z")
    if isinstance(f, models.FloatField):
        return float(value)
    return value


def _from_doc(f: models.Field, value) -> tuple[object, str | None]:
    """A document value for field `f`, type-checked: (value, error)."""
    if value is None:
        if f.null or isinstance(f, models.JSONField):
            return None, None
        return None, "may not be null"
    if isinstance(f, models.JSONField):
        return value, None
    if isinstance(f, models.BooleanField):
        return (value, None) if isinstance(value, bool) else (None, "must be true or false")
    if isinstance(f, models.IntegerField):  # PositiveIntegerField and friends included
        if isinstance(value, int) and not isinstance(value, bool):
            return value, None
        return None, "must be an integer"
    if isinstance(f, models.FloatField):
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value), None
        return None, "must be a number"
    if isinstance(f, models.DateTimeField):
        if isinstance(value, dt.datetime):
            parsed = value
        elif isinstance(value, str):
            parsed = parse_datetime(value)
        else:
            parsed = None
        if parsed is None:
            return None, "must be a date and time (2027-01-31T00:00:00Z)"
        if parsed.tzinfo is None:
            return None, "must name its time zone (…Z or …+02:00)"
        return _to_doc(f, parsed), None
    if isinstance(value, str):
        return value, None
    return None, "must be a string"


def _default(f: models.Field):
    return _to_doc(f, f.get_default()) if f.has_default() or f.null else _blank(f)


def _blank(f: models.Field):
    if isinstance(f, models.JSONField):
        return None
    if isinstance(f, models.CharField | models.TextField):
        return ""
    return None


def _sort_key(item: dict, spec: Spec) -> tuple:
    out = []
    for k in spec.key:
        v = item.get(k)
        out.append((0, "") if v is None else (1, f"{v:020d}") if isinstance(v, int) else (1, v))
    return tuple(out)


def _ident(item: dict, spec: Spec) -> str:
    parts = [str(item.get(k)) for k in spec.key if item.get(k) is not None]
    return ":".join(parts) or "-"


# --- reading the database -------------------------------------------------------------------


class Tree:
    """Every row the document holds, read with one query per table and grouped in Python
    (10 000 routes: Django's prefetching costs seconds; this well under one)."""

    def __init__(self):
        from gateway.models import Api, ApiVersion, JwtIssuer, Policy, Route, Target, Upstream
        from portal.models import Plan, RateLimit

        self.upstreams = list(Upstream.objects.order_by("name"))
        self.apis = list(Api.objects.order_by("slug"))
        self.plans = list(Plan.objects.order_by("slug"))
        self.names = {
            "upstream": {u.pk: u.name for u in self.upstreams},
            "plan": {p.pk: p.slug for p in self.plans},
            "api": {a.pk: a.slug for a in self.apis},
        }
        self.rows: dict[tuple[int, str], dict[int, list]] = {}
        self._group(TARGET, Target.objects.all())
        versions = list(ApiVersion.objects.all())
        self.names["version"] = {v.pk: v.name for v in versions}
        self._group(VERSION, versions)
        self._group(JWT_ISSUER, JwtIssuer.objects.all())
        policies = list(Policy.objects.all())
        self._group(API_POLICY, [p for p in policies if p.api_id is not None])
        self._group(ROUTE_POLICY, [p for p in policies if p.route_id is not None])
        self._group(ROUTE, Route.objects.all())
        limits = list(RateLimit.objects.all())
        self._group(ROUTE_LIMIT, [r for r in limits if r.route_id is not None])
        self._group(PLAN_LIMIT, [r for r in limits if r.route_id is None and r.plan_id])
        self.plan_apis: dict[int, list[str]] = {}
        for plan_id, api_id in Plan.apis.through.objects.values_list("plan_id", "api_id"):
            self.plan_apis.setdefault(plan_id, []).append(self.names["api"][api_id])

    def _group(self, spec: Spec, rows) -> None:
        out: dict[int, list] = {}
        attname = spec.parent + "_id"
        for row in rows:
            out.setdefault(getattr(row, attname), []).append(row)
        self.rows[id(spec)] = out

    def children(self, spec: Spec, parent) -> list:
        return self.rows[id(spec)].get(parent.pk, [])

    def canon(self, spec: Spec, obj) -> dict:
        """One object (and its children) in the canonical form."""
        out: dict = {}
        for f in spec.plain_fields():
            out[f.name] = _to_doc(f, getattr(obj, f.attname))
        for name, kind in spec.refs.items():
            pk = getattr(obj, name + "_id")
            out[name] = None if pk is None else self.names[kind][pk]
        for name in spec.m2m:
            out[name] = sorted(self.plan_apis.get(obj.pk, []))
        for section, child in spec.children.items():
            items = [self.canon(child, c) for c in self.children(child, obj)]
            out[section] = sorted(items, key=lambda i, c=child: _sort_key(i, c))
        return {k: out[k] for k in [*spec.columns(), *spec.children]}

    def document(self) -> dict:
        return {
            "format": FORMAT,
            "upstreams": [self.canon(UPSTREAM, u) for u in self.upstreams],
            "apis": [self.canon(API, a) for a in self.apis],
            "plans": [self.canon(PLAN, p) for p in self.plans],
        }


def current_document() -> dict:
    """The whole configuration as it is now, every field present (the canonical form)."""
    return Tree().document()


def canonical_json(document: dict) -> str:
    return json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


# --- secrets --------------------------------------------------------------------------------


def _secret_leaves(spec: Spec, column: str, value) -> Iterator[tuple[tuple, str]]:
    """(path inside the JSON value, a name hint) of each secret string in a JSON field."""
    if spec is JWT_ISSUER and column == "static_jwks" and isinstance(value, dict):
        for i, key in enumerate(value.get("keys") or []):
            if isinstance(key, dict):
                for member in sorted(key):
                    if member in _JWK_PRIVATE and isinstance(key[member], str):
                        yield ("keys", i, member), f"{key.get('kid') or i}_{member}"
    elif column == "config":

        def walk(node, path):
            if isinstance(node, dict):
                for k, v in node.items():
                    if isinstance(v, str) and _SECRET_NAME.search(str(k)):
                        yield (*path, k), str(k)
                    else:
                        yield from walk(v, (*path, k))
            elif isinstance(node, list):
                for i, v in enumerate(node):
                    yield from walk(v, (*path, i))

        yield from walk(value, ())


def _env_name(parts: list[str]) -> str:
    name = "_".join(re.sub(r"[^A-Za-z0-9]+", "_", p).strip("_").upper() for p in parts if p)
    return "APIGW_SECRET_" + re.sub(r"_+", "_", name)


def _set_in(node, path: tuple, value):
    for step in path[:-1]:
        node = node[step]
    node[path[-1]] = value


def _get_in(node, path: tuple):
    for step in path:
        node = node[step]
    return node


# --- writing a file -------------------------------------------------------------------------


def _escape(value):
    """Literal `${NAME}` in a value, written so that reading gives it back."""
    if isinstance(value, str):
        return _ENV_LITERAL.sub(lambda m: "$" + m.group(0), value)
    if isinstance(value, dict):
        return {k: _escape(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_escape(v) for v in value]
    return value


def to_file_document(document: dict, *, secrets: str = "references") -> tuple[dict, dict]:
    """The canonical document as a file holds it: defaults left out, values escaped, and
    (with secrets="references") secrets replaced by `${…}`. Returns (document, secrets):
    the environment variable names used and their values."""
    found: dict[str, str] = {}

    def shrink(spec: Spec, item: dict, names: list[str]) -> dict:
        out = {}
        by_name = {f.name: f for f in spec.plain_fields()}
        for column in spec.columns():
            value = item[column]
            f = by_name.get(column)
            if column not in spec.key:
                if f is not None and value == _default(f):
                    continue
                if f is None and value in (None, []):
                    continue
            value = _escape(value)
            if f is not None and isinstance(f, models.JSONField) and secrets == "references":
                leaves = list(_secret_leaves(spec, column, item[column]))
                if leaves:
                    value = json.loads(json.dumps(value))
                    for path, hint in leaves:
                        env = _env_name([*names, spec.label, hint])
                        while env in found and found[env] != _get_in(item[column], path):
                            env += "_2"
                        found[env] = _get_in(item[column], path)
                        _set_in(value, path, "${" + env + "}")
            out[column] = value
        for section, child in spec.children.items():
            rows = [shrink(child, c, [*names, _ident(c, child)]) for c in item[section]]
            if rows:
                out[section] = rows
        return out

    out: dict = {"format": FORMAT}
    for section, spec in TOP.items():
        out[section] = [shrink(spec, item, [_ident(item, spec)]) for item in document[section]]
    return out, found


class _Dumper(yaml.CSafeDumper if hasattr(yaml, "CSafeDumper") else yaml.SafeDumper):
    pass


def _str_presenter(dumper, data: str):
    style = "|" if "\n" in data else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", data, style=style)


_Dumper.add_representer(str, _str_presenter)

HEADER = (
    "# The gateway's configuration (manage.py gatewayconfig; README \"Declarative\n"
    '# configuration"). ${NAME}: the environment variable NAME, read when applied.\n'
)


def dump_yaml(document: dict) -> str:
    body = yaml.dump(document, Dumper=_Dumper, sort_keys=False, allow_unicode=True, width=100)
    return HEADER + body


def export_yaml(*, secrets: str = "references") -> tuple[str, dict]:
    doc, found = to_file_document(current_document(), secrets=secrets)
    return dump_yaml(doc), found


# --- reading a file -------------------------------------------------------------------------


class _Located:
    """Plain data built from a YAML node tree, with the line of every value and key."""

    def __init__(self):
        self.lines: dict[tuple, int] = {}
        self.problems: list[Problem] = []
        self._constructor = yaml.SafeLoader("")

    def build(self, node, path: tuple):
        self.lines.setdefault(path, node.start_mark.line + 1)
        if isinstance(node, yaml.MappingNode):
            self._constructor.flatten_mapping(node)
            out = {}
            for key_node, value_node in node.value:
                key = self._constructor.construct_object(key_node, deep=True)
                if not isinstance(key, str):
                    self.problems.append(
                        Problem(key_node.start_mark.line + 1, _where(path), "keys must be strings")
                    )
                    continue
                if key in out:
                    self.problems.append(
                        Problem(
                            key_node.start_mark.line + 1, _where(path), f"{key!r} appears twice"
                        )
                    )
                self.lines[(*path, key)] = key_node.start_mark.line + 1
                out[key] = self.build(value_node, (*path, key))
            return out
        if isinstance(node, yaml.SequenceNode):
            return [self.build(item, (*path, i)) for i, item in enumerate(node.value)]
        return self._constructor.construct_object(node, deep=True)


def _where(path: tuple) -> str:
    out = ""
    for step in path:
        out += f"[{step}]" if isinstance(step, int) else (f".{step}" if out else str(step))
    return out


@dataclass
class Desired:
    """A validated document: the canonical form, and where each value was written."""

    document: dict
    lines: dict[tuple, int]
    filename: str

    def line(self, path: tuple) -> int | None:
        while path:
            if path in self.lines:
                return self.lines[path]
            path = path[:-1]
        return None


def parse_yaml(text: str, filename: str = "<stdin>", *, environ=None) -> Desired:
    """Read and validate a document; ConfigFileError lists every problem found."""
    try:
        node = yaml.compose(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        message = getattr(exc, "problem", None) or str(exc)
        raise ConfigFileError(filename, [Problem(line, "", f"not YAML: {message}")]) from None
    located = _Located()
    data = {} if node is None else located.build(node, ())
    if located.problems:
        raise ConfigFileError(filename, located.problems)
    return validate(
        data, located.lines, filename, environ=os.environ if environ is None else environ
    )


def validate(data, lines: dict, filename: str, *, environ) -> Desired:
    problems: list[Problem] = []
    desired = Desired({}, lines, filename)

    def problem(path: tuple, message: str) -> None:
        problems.append(Problem(desired.line(path), _where(path), message))

    def substitute(value, path: tuple):
        if isinstance(value, str):

            def one(m):
                if m.group(1):
                    return "${" + m.group(2) + "}"
                if m.group(2) not in environ:
                    problem(path, f"environment variable {m.group(2)} is not set")
                    return ""
                return environ[m.group(2)]

            return _ENV_REF.sub(one, value)
        if isinstance(value, dict):
            return {k: substitute(v, (*path, k)) for k, v in value.items()}
        if isinstance(value, list):
            return [substitute(v, (*path, i)) for i, v in enumerate(value)]
        return value

    def read(spec: Spec, item, path: tuple) -> dict | None:
        if not isinstance(item, dict):
            problem(path, f"each {spec.label} must be a mapping")
            return None
        allowed = [*spec.columns(), *spec.children]
        for k in item:
            if k not in allowed:
                problem((*path, k), f"unknown field {k!r}; a {spec.label} has {', '.join(allowed)}")
        out: dict = {}
        for f in spec.plain_fields():
            if f.name in item:
                value, error = _from_doc(f, substitute(item[f.name], (*path, f.name)))
                if error:
                    problem((*path, f.name), error)
                out[f.name] = value
            elif f.name in spec.key:
                problem(path, f"{f.name} is required")
                out[f.name] = None
            else:
                out[f.name] = _default(f)
        for name in spec.refs:
            value = item.get(name)
            if value is not None and not isinstance(value, str):
                problem((*path, name), f"must be the {spec.refs[name]}'s name")
                value = None
            out[name] = value
        for name in spec.m2m:
            value = item.get(name, [])
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                problem((*path, name), "must be a list of slugs")
                value = []
            if len(set(value)) != len(value):
                problem((*path, name), "names an API twice")
            out[name] = sorted(set(value))
        for section, child in spec.children.items():
            rows = item.get(section, [])
            if not isinstance(rows, list):
                problem((*path, section), f"must be a list of {child.label}s")
                rows = []
            out[section] = read_list(child, rows, (*path, section))
        return {k: out[k] for k in [*spec.columns(), *spec.children]}

    def read_list(spec: Spec, rows: list, path: tuple) -> list[dict]:
        out, seen = [], {}
        for i, row in enumerate(rows):
            item = read(spec, row, (*path, i))
            if item is None:
                continue
            key = tuple(item.get(k) for k in spec.key)
            if key in seen:
                problem(
                    (*path, i),
                    f"a second {spec.label} {_ident(item, spec)!r} (the first is at line "
                    f"{desired.line((*path, seen[key]))}); names identify objects",
                )
                continue
            seen[key] = i
            item["_path"] = (*path, i)
            out.append(item)
        return sorted(out, key=lambda x: _sort_key(x, spec))

    if not isinstance(data, dict):
        raise ConfigFileError(filename, [Problem(1, "", "the document must be a mapping")])
    for k in data:
        if k not in ("format", *SECTIONS):
            problem((k,), f"unknown section {k!r}; a document has format, {', '.join(SECTIONS)}")
    if data.get("format") != FORMAT:
        problem(("format",), f"format must be {FORMAT!r}")
    document: dict = {"format": FORMAT}
    for section, spec in TOP.items():
        rows = data.get(section) or []
        if not isinstance(rows, list):
            problem((section,), f"must be a list of {spec.label}s")
            rows = []
        document[section] = read_list(spec, rows, (section,))

    # References resolve inside the document.
    upstreams = {u["name"] for u in document["upstreams"]}
    apis = {a["slug"] for a in document["apis"]}
    plans = {p["slug"] for p in document["plans"]}

    def check_ref(item: dict, name: str, names: set, what: str) -> None:
        value = item.get(name)
        if value is not None and value not in names:
            problem((*item["_path"], name), f"no {what} named {value!r} in this file")

    for api in document["apis"]:
        if api["upstream"] is None:
            problem(api["_path"], "upstream is required")
        check_ref(api, "upstream", upstreams, "upstream")
        versions = {v["name"] for v in api["versions"]}
        for v in api["versions"]:
            check_ref(v, "upstream", upstreams, "upstream")
        for route in api["routes"]:
            check_ref(route, "upstream", upstreams, "upstream")
            check_ref(route, "version", versions, f"version of API {api['slug']}")
            for limit in route["rate_limits"]:
                check_ref(limit, "plan", plans, "plan")
    for plan in document["plans"]:
        for slug in plan["apis"]:
            if slug not in apis:
                problem((*plan["_path"], "apis"), f"no API named {slug!r} in this file")
    if problems:
        raise ConfigFileError(filename, problems)
    desired.document = document
    return desired


# --- applying -------------------------------------------------------------------------------


@dataclass
class Change:
    op: str  # "+" added, "~" changed, "-" removed
    what: str  # "route demo/orders"
    fields: dict = field(default_factory=dict)  # name -> (old, new), for "~"

    def render(self) -> str:
        if self.op != "~":
            return f"{self.op} {self.what}"
        parts = [f"{name}: {_show(old)} → {_show(new)}" for name, (old, new) in self.fields.items()]
        return f"~ {self.what}: " + "; ".join(parts)


def _show(value) -> str:
    if isinstance(value, str) and "\n" in value:
        return f"<{len(value)} characters>"
    text = json.dumps(_masked(value), ensure_ascii=False, default=str)
    return text if len(text) <= 80 else text[:77] + "…"


def _masked(value):
    if isinstance(value, dict):
        return {
            k: "***"
            if isinstance(v, str) and (_SECRET_NAME.search(str(k)) or k in _JWK_PRIVATE)
            else _masked(v)
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [_masked(v) for v in value]
    return value


class _DryRun(Exception):
    pass


@dataclass
class Outcome:
    changes: list[Change]
    version: int | None = None


def apply(desired: Desired, *, actor=None, reason: str = "", dry_run: bool = False) -> Outcome:
    """Make the database hold exactly `desired`, in one transaction with one config bump.
    dry_run: compute and validate the same changes, then roll them back."""
    from gateway.config import config_bump

    run = _Run(desired)
    try:
        with transaction.atomic():
            run.execute()
            if run.problems:
                raise ConfigFileError(desired.filename, run.problems)
            if dry_run or not run.changes:
                raise _DryRun()
            counts = {op: sum(1 for c in run.changes if c.op == op) for op in "+~-"}
            summary = f"{counts['+']} added, {counts['~']} changed, {counts['-']} removed"
            version = config_bump(
                actor=actor, reason=f"{reason or 'gatewayconfig apply'}: {summary}"
            )
            return Outcome(run.changes, version)
    except _DryRun:
        return Outcome(run.changes)


class _Run:
    def __init__(self, desired: Desired):
        self.desired = desired
        self.changes: list[Change] = []
        self.problems: list[Problem] = []
        self.upstreams: dict[str, models.Model] = {}
        self.plans: dict[str, models.Model] = {}
        self.apis: dict[str, models.Model] = {}
        self.versions: dict[tuple[int, str], models.Model] = {}  # (api id, name)
        self.to_delete: list[tuple[models.Model, str]] = []

    def problem(self, path: tuple, message: str) -> None:
        self.problems.append(Problem(self.desired.line(path), _where(path), message))

    def execute(self) -> None:
        doc = self.desired.document
        tree = self.tree = Tree()
        self.sync_list(UPSTREAM, None, doc["upstreams"], tree.upstreams, "")
        self.sync_list(PLAN, None, doc["plans"], tree.plans, "")
        self.sync_list(API, None, doc["apis"], tree.apis, "")
        for plan in doc["plans"]:
            obj = self.plans.get(plan["slug"])
            if obj is None:
                continue
            wanted = [self.apis[s] for s in plan["apis"] if s in self.apis]
            before = sorted(self.tree.plan_apis.get(obj.pk, []))
            if before != plan["apis"]:
                obj.apis.set(wanted)
                if not any(c.what == f"plan {plan['slug']}" and c.op == "+" for c in self.changes):
                    self.changes.append(
                        Change("~", f"plan {plan['slug']}", {"apis": (before, plan["apis"])})
                    )
        if self.problems:
            return
        for obj, what in reversed(self.to_delete):
            try:
                obj.delete()
            except models.ProtectedError as exc:
                used = sorted({str(o) for o in list(exc.protected_objects)[:5]})
                self.problems.append(
                    Problem(
                        None,
                        what,
                        "is not in the file but cannot be removed: still used by "
                        + ", ".join(used),
                    )
                )
        if not self.problems:
            self.check_compiles()

    def sync_list(self, spec: Spec, parent, items: list[dict], existing_qs, prefix: str):
        existing = {}
        for obj in existing_qs:
            canon = self.tree.canon(spec, obj)
            key = tuple(canon[k] for k in spec.key)
            if key in existing:
                self.problems.append(
                    Problem(
                        None,
                        f"{spec.label} {prefix}{_ident(canon, spec)}",
                        f"two {spec.label}s in the database have this name; rename one first",
                    )
                )
            existing[key] = (obj, canon)
        if spec is VERSION:
            # One default per API: take it off the old one before another is saved.
            defaults = {i["name"] for i in items if i["is_default"]}
            for obj, _ in existing.values():
                if obj.is_default and obj.name not in defaults:
                    type(obj).objects.filter(pk=obj.pk).update(is_default=False)
                    obj.is_default = False
        for item in items:
            key = tuple(item[k] for k in spec.key)
            what = f"{spec.label} {prefix}{_ident(item, spec)}"
            found = existing.pop(key, None)
            self.sync_one(spec, parent, item, found, what, prefix)
        for obj, canon in existing.values():
            what = f"{spec.label} {prefix}{_ident(canon, spec)}"
            self.changes.append(Change("-", what))
            self.to_delete.append((obj, what))

    def resolve(self, kind: str, name, parent):
        if name is None:
            return None
        if kind == "upstream":
            return self.upstreams.get(name)
        if kind == "plan":
            return self.plans.get(name)
        if kind == "version":
            return self.versions.get((parent.pk, name))
        raise KeyError(kind)

    def sync_one(self, spec: Spec, parent, item: dict, found, what: str, prefix: str) -> None:
        path = item["_path"]
        plain = {c: item[c] for c in spec.columns() if c not in spec.m2m}
        if found is None:
            obj = spec.model()
            before = None
        else:
            obj, canon = found
            before = {c: canon[c] for c in plain}
        if before != plain:
            for f in spec.plain_fields():
                value = item[f.name]
                if isinstance(f, models.DateTimeField) and value is not None:
                    value = parse_datetime(value)
                setattr(obj, f.name, value)
            for name, kind in spec.refs.items():
                setattr(obj, name, self.resolve(kind, item[name], parent))
            if spec.parent:
                setattr(obj, spec.parent, parent)
            if spec is API_POLICY:
                obj.route = None
            if spec is ROUTE_POLICY:
                obj.api = None
            if spec is PLAN_LIMIT:
                obj.route = None
            try:
                obj.full_clean(exclude=[*spec.m2m, *_NOT_CONFIG])
            except DjangoValidationError as exc:
                self._report(path, exc)
                return
            obj.save()
            if before is None:
                self.changes.append(Change("+", what))
            else:
                diff = {c: (before[c], plain[c]) for c in plain if before[c] != plain[c]}
                self.changes.append(Change("~", what, diff))
        if spec is UPSTREAM:
            self.upstreams[item["name"]] = obj
        elif spec is PLAN:
            self.plans[item["slug"]] = obj
        elif spec is API:
            self.apis[item["slug"]] = obj
        elif spec is VERSION:
            self.versions[(parent.pk, item["name"])] = obj
        ident = _ident(item, spec)
        for section, child in spec.children.items():
            qs = self.tree.children(child, obj) if found is not None else []
            self.sync_list(child, obj, item[section], qs, f"{prefix}{ident}/")

    def _report(self, path: tuple, exc: DjangoValidationError) -> None:
        if hasattr(exc, "error_dict"):
            for name, errors in exc.error_dict.items():
                at = path if name == NON_FIELD_ERRORS else (*path, name)
                for e in errors:
                    for message in e.messages:
                        self.problem(at, message)
        else:
            for message in exc.messages:
                self.problem(path, message)

    def check_compiles(self) -> None:
        """What only the snapshot compiler sees: the policies of each route together."""
        from gateway import routing
        from gateway.dataplane.snapshot import compile_policy_rows
        from gateway.models import Policy, Route

        by_api: dict[int, list] = {}
        by_route: dict[int, list] = {}
        for p in Policy.objects.all():
            if p.api_id:
                by_api.setdefault(p.api_id, []).append(p)
            else:
                by_route.setdefault(p.route_id, []).append(p)
        if not by_api and not by_route:
            return
        paths = {
            (a["slug"], r["name"]): r["_path"]
            for a in self.desired.document["apis"]
            for r in a["routes"]
        }
        routes = Route.objects.filter(
            models.Q(api_id__in=list(by_api)) | models.Q(pk__in=list(by_route))
        ).select_related("api")
        for route in routes:
            try:
                compile_policy_rows(by_api.get(route.api_id, []), by_route.get(route.pk, []))
            except routing.RouteConfigError as exc:
                at = paths.get((route.api.slug, route.name), ())
                self.problem((*at, "policies"), str(exc))


# --- history --------------------------------------------------------------------------------


def record_document(config_version) -> None:
    """Keep the configuration a structural version made (deduplicated by content)."""
    from gateway.models import ConfigDocument

    text = canonical_json(current_document())
    digest = hashlib.sha256(text.encode()).hexdigest()
    doc, _ = ConfigDocument.objects.get_or_create(sha256=digest, defaults={"document": text})
    config_version.document = doc
    config_version.save(update_fields=["document"])


def document_at(version: int) -> tuple[int, dict]:
    """(the version whose document holds, the document) for config version `version`."""
    from gateway.models import ConfigVersion

    row = (
        ConfigVersion.objects.filter(version__lte=version, document__isnull=False)
        .select_related("document")
        .order_by("-version")
        .first()
    )
    if row is None:
        raise LookupError(f"no configuration is stored for version {version}")
    return row.version, json.loads(row.document.document)


def parse_document(document: dict, filename: str) -> Desired:
    """A stored canonical document, validated as a file is (its values are literal)."""
    return validate(_escape(document), {}, filename, environ={})


def duplicates(document: dict) -> list[str]:
    """Objects a file could not tell apart (two routes of one API with one name, …)."""
    out: list[str] = []

    def walk(spec: Spec, items: list[dict], prefix: str) -> None:
        seen = set()
        for item in items:
            key = tuple(item[k] for k in spec.key)
            if key in seen:
                out.append(f"{spec.label} {prefix}{_ident(item, spec)}")
            seen.add(key)
            for section, child in spec.children.items():
                walk(child, item[section], f"{prefix}{_ident(item, spec)}/")

    for section, spec in TOP.items():
        walk(spec, document[section], "")
    return out


def restore(version: int, *, actor=None, dry_run: bool = False) -> Outcome:
    """Apply config version `version`'s configuration again (admin, REST and the command).
    LookupError when nothing is stored for it; ConfigFileError when today's database
    refuses it (a plan it drops still has subscriptions, …)."""
    at, document = document_at(version)
    desired = parse_document(document, f"config version {at}")
    return apply(desired, actor=actor, reason=f"rollback to v{version}", dry_run=dry_run)
