"""Request and response validation against an API's OpenAPI document (no database)."""

from __future__ import annotations

import copy
import json
import timeit

import pytest

from gateway.dataplane.openapi import (
    MAX_PROBLEMS,
    OpenApiError,
    Problem,
    compile_openapi,
    load_openapi_text,
)

ORDERS_YAML = """
openapi: 3.0.3
info: {title: Orders, version: "1.0"}
paths:
  /orders:
    get:
      operationId: listOrders
      parameters:
        - $ref: '#/components/parameters/Tenant'
        - {name: limit, in: query, schema: {type: integer, minimum: 1, maximum: 100}}
        - {name: status, in: query, schema: {$ref: '#/components/schemas/Status'}}
        - {name: tag, in: query, schema: {type: array, items: {type: string}, maxItems: 3}}
        - name: ids
          in: query
          explode: false
          schema: {type: array, items: {type: integer}}
        - {name: urgent, in: query, schema: {type: boolean}}
        - {name: session, in: cookie, schema: {type: string, minLength: 8}}
      responses:
        200:
          description: the orders
          content:
            application/json:
              schema:
                type: object
                required: [orders]
                properties:
                  orders: {type: array, items: {$ref: '#/components/schemas/Order'}}
        default: {$ref: '#/components/responses/Error'}
    post:
      operationId: createOrder
      parameters: [{$ref: '#/components/parameters/Tenant'}]
      requestBody:
        required: true
        content:
          application/json:
            schema: {$ref: '#/components/schemas/NewOrder'}
          text/csv: {}
      responses:
        201:
          description: created
          content:
            application/json:
              schema: {$ref: '#/components/schemas/Order'}
        4XX: {$ref: '#/components/responses/Error'}
  /orders/mine:
    get:
      operationId: myOrders
      responses: {200: {description: mine}}
  /orders/{id}:
    parameters:
      - {name: id, in: path, required: true, schema: {type: integer, minimum: 1}}
    get:
      operationId: getOrder
      parameters: [{$ref: '#/components/parameters/Tenant'}]
      responses:
        200:
          description: one order
          content:
            application/json:
              schema: {$ref: '#/components/schemas/Order'}
        204: {description: nothing}
    put:
      operationId: replaceOrder
      requestBody:
        content:
          application/json:
            schema: {$ref: '#/components/schemas/Order'}
      responses:
        200:
          description: replaced
          content:
            application/json:
              schema: {$ref: '#/components/schemas/Order'}
    delete:
      operationId: deleteOrder
      responses: {204: {description: deleted}}
  /files/{name}.{ext}:
    get:
      parameters:
        - {name: name, in: path, required: true, schema: {type: string}}
        - {name: ext, in: path, required: true, schema: {type: string, enum: [pdf, csv]}}
      responses: {200: {description: a file}}
  /categories:
    post:
      requestBody:
        content:
          application/json:
            schema: {$ref: '#/components/schemas/Category'}
      responses: {201: {description: created}}
components:
  parameters:
    Tenant:
      name: X-Tenant
      in: header
      required: true
      schema: {type: string, pattern: '^[a-z0-9-]{2,32}$'}
  schemas:
    Status: {type: string, enum: [pending, paid, shipped]}
    Line:
      type: object
      required: [sku, qty]
      additionalProperties: false
      properties:
        sku: {type: string, minLength: 1}
        qty: {type: integer, minimum: 1, exclusiveMaximum: true, maximum: 1000}
        options: {type: array, items: {type: string}}
    Coupon:
      type: object
      required: [code]
      properties: {code: {type: string}}
    NewOrder:
      type: object
      required: [customer, items]
      properties:
        customer: {type: string}
        note: {type: string, nullable: true, maxLength: 200}
        priority: {type: integer, nullable: true, enum: [1, 2, 3]}
        coupon:
          nullable: true
          allOf: [{$ref: '#/components/schemas/Coupon'}]
        placed: {type: string, example: 2024-06-01}
        items:
          type: array
          minItems: 1
          items: {$ref: '#/components/schemas/Line'}
    Order:
      allOf:
        - $ref: '#/components/schemas/NewOrder'
        - type: object
          required: [id, status, secret]
          properties:
            id: {type: integer, readOnly: true}
            status: {$ref: '#/components/schemas/Status'}
            secret: {type: string, writeOnly: true}
    Category:
      type: object
      required: [name]
      properties:
        name: {type: string}
        children: {type: array, items: {$ref: '#/components/schemas/Category'}}
  responses:
    Error:
      description: a problem
      content:
        application/problem+json:
          schema:
            type: object
            required: [title]
            properties: {title: {type: string}}
"""

TENANT = [(b"x-tenant", b"acme")]
JSON = b"application/json"
GOOD_ORDER = {"customer": "c-1", "items": [{"sku": "A", "qty": 2}, {"sku": "B", "qty": 1}]}


@pytest.fixture(scope="module")
def orders_doc() -> dict:
    return load_openapi_text(ORDERS_YAML)


@pytest.fixture(scope="module")
def orders(orders_doc):
    return compile_openapi(orders_doc)


def check(validator, method, path, *, query=(), headers=TENANT, content_type=None, body=None):
    """match + validate, as the gateway does it."""
    found = validator.match(method, path)
    assert found is not None, f"{method} {path} did not match"
    operation, params = found
    if body is not None and not isinstance(body, bytes):
        body = json.dumps(body).encode()
        content_type = content_type or JSON
    return operation.validate(
        path_params=params,
        query=list(query),
        headers=list(headers),
        content_type=content_type,
        body=body,
    )


def pointers(problems: list[Problem]) -> list[str]:
    return [p.pointer for p in problems]


# --- matching ------------------------------------------------------------------------------


def test_concrete_path_wins_over_templated(orders):
    operation, params = orders.match("GET", "/orders/mine")
    assert operation.operation_id == "myOrders"
    assert params == {}


def test_templated_path_gives_the_raw_parameter_values(orders):
    operation, params = orders.match("GET", "/orders/42")
    assert (operation.method, operation.path_template) == ("GET", "/orders/{id}")
    assert operation.operation_id == "getOrder"
    assert params == {"id": "42"}


def test_concrete_path_without_the_method_falls_back_to_the_template(orders):
    operation, params = orders.match("DELETE", "/orders/mine")
    assert operation.operation_id == "deleteOrder"
    assert params == {"id": "mine"}


def test_a_segment_with_several_parameters_matches(orders):
    operation, params = orders.match("GET", "/files/report.2024.pdf")
    assert operation.path_template == "/files/{name}.{ext}"
    assert params == {"name": "report", "ext": "2024.pdf"}


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/nope"),
        ("GET", "/orders/42/lines"),
        ("GET", "/orders/"),
        ("PATCH", "/orders/42"),
        ("DELETE", "/orders"),
        ("GET", "orders"),
        ("GET", "/" + "a/" * 1000),
    ],
)
def test_unknown_path_or_method_is_none(orders, method, path):
    assert orders.match(method, path) is None


def test_method_is_case_insensitive(orders):
    assert orders.match("get", "/orders")[0].operation_id == "listOrders"


# --- parameters ----------------------------------------------------------------------------


def test_valid_get_has_no_problems(orders):
    query = [("limit", "10"), ("status", "paid"), ("tag", "a"), ("tag", "b"), ("ids", "1,2,3")]
    assert check(orders, "GET", "/orders", query=query) == []
    assert check(orders, "GET", "/orders/7") == []


def test_path_parameter_is_coerced_and_checked(orders):
    assert check(orders, "GET", "/orders/abc") == [
        Problem("/path/id", "expected integer, got string")
    ]
    assert check(orders, "GET", "/orders/0") == [Problem("/path/id", "must be >= 1")]


def test_path_parameter_enum(orders):
    assert check(orders, "GET", "/files/x.exe") == [
        Problem("/path/ext", 'must be one of "pdf", "csv"')
    ]


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("abc", "expected integer, got string"),
        ("1.5", "expected integer, got string"),
        ("", "expected integer, got string"),
        ("0", "must be >= 1"),
        ("101", "must be <= 100"),
    ],
)
def test_query_integer_is_coerced_and_checked(orders, value, message):
    assert check(orders, "GET", "/orders", query=[("limit", value)]) == [
        Problem("/query/limit", message)
    ]


def test_query_enum_from_a_ref(orders):
    problems = check(orders, "GET", "/orders", query=[("status", "lost")])
    assert problems == [Problem("/query/status", 'must be one of "pending", "paid", "shipped"')]


def test_query_boolean(orders):
    assert check(orders, "GET", "/orders", query=[("urgent", "true")]) == []
    assert check(orders, "GET", "/orders", query=[("urgent", "yes")]) == [
        Problem("/query/urgent", "expected boolean, got string")
    ]


def test_query_array_repeated_and_comma_separated(orders):
    too_many = [("tag", t) for t in "abcd"]
    assert check(orders, "GET", "/orders", query=too_many) == [
        Problem("/query/tag", "must have at most 3 items")
    ]
    assert check(orders, "GET", "/orders", query=[("ids", "1,x,3")]) == [
        Problem("/query/ids/1", "expected integer, got string")
    ]


def test_a_single_valued_query_parameter_given_twice_is_a_problem(orders):
    query = [("limit", "1"), ("limit", "1000")]
    assert check(orders, "GET", "/orders", query=query) == [
        Problem("/query/limit", "given more than once")
    ]


def test_unknown_query_parameters_are_allowed(orders):
    assert check(orders, "GET", "/orders", query=[("utm_source", "x"), ("limit", "5")]) == []


def test_required_header_missing_and_invalid(orders):
    assert check(orders, "GET", "/orders", headers=[]) == [
        Problem("/header/x-tenant", "missing required parameter")
    ]
    problems = check(orders, "GET", "/orders", headers=[(b"X-Tenant", b"Not Valid!")])
    assert pointers(problems) == ["/header/x-tenant"]
    assert problems[0].message.startswith("must match ^[a-z0-9-]")


def test_cookie_parameter(orders):
    cookie = [*TENANT, (b"cookie", b"theme=dark; session=short")]
    assert check(orders, "GET", "/orders", headers=cookie) == [
        Problem("/cookie/session", "must be at least 8 characters long")
    ]


def test_problems_of_every_parameter_are_reported_together(orders):
    query = [("limit", "0"), ("status", "lost")]
    problems = check(orders, "GET", "/orders", query=query, headers=[])
    assert pointers(problems) == ["/query/limit", "/query/status", "/header/x-tenant"]


STYLES_DOC = {
    "openapi": "3.1.0",
    "info": {"title": "styles", "version": "1"},
    "paths": {
        "/search/{ids}": {
            "get": {
                "parameters": [
                    {
                        "name": "ids",
                        "in": "path",
                        "required": True,
                        "schema": {"type": "array", "items": {"type": "integer"}},
                    },
                    {
                        "name": "filter",
                        "in": "query",
                        "style": "deepObject",
                        "schema": {
                            "type": "object",
                            "properties": {"min": {"type": "integer"}, "tag": {"type": "string"}},
                            "additionalProperties": False,
                        },
                    },
                    {
                        "name": "sort",
                        "in": "query",
                        "style": "pipeDelimited",
                        "explode": False,
                        "schema": {"type": "array", "items": {"enum": ["date", "price"]}},
                    },
                    {
                        "name": "where",
                        "in": "query",
                        "content": {
                            "application/json": {
                                "schema": {"type": "object", "required": ["field"]}
                            }
                        },
                    },
                    {
                        "name": "X-Scores",
                        "in": "header",
                        "schema": {"type": "array", "items": {"type": "number"}},
                    },
                    {"name": "Authorization", "in": "header", "required": True},
                ],
                "responses": {"200": {"description": "ok"}},
            }
        },
        "/label/{v}": {
            "get": {
                "parameters": [
                    {"name": "v", "in": "path", "style": "label", "schema": {"type": "integer"}}
                ],
                "responses": {"200": {"description": "ok"}},
            }
        },
    },
}


def test_other_parameter_styles():
    styles = compile_openapi(STYLES_DOC)
    good = [
        ("filter[min]", "3"),
        ("filter[tag]", "x"),
        ("sort", "date|price"),
        ("where", '{"field": "a"}'),
    ]
    headers = [(b"x-scores", b"1.5, 2"), (b"x-scores", b"3")]
    assert check(styles, "GET", "/search/1,2", query=good, headers=headers) == []
    bad = [
        ("filter[min]", "many"),
        ("filter[colour]", "red"),
        ("sort", "date|name"),
        ("where", "{not json"),
    ]
    headers = [(b"x-scores", b"1.5, high")]
    assert check(styles, "GET", "/search/1,x", query=bad, headers=headers) == [
        Problem("/path/ids/1", "expected integer, got string"),
        Problem("/query/filter/min", "expected integer, got string"),
        Problem("/query/filter/colour", "unexpected property"),
        Problem("/query/sort/1", 'must be one of "date", "price"'),
        Problem("/query/where", "not valid JSON"),
        Problem("/header/x-scores/1", "expected number, got string"),
    ]
    where = [("where", "{}")]
    assert check(styles, "GET", "/search/1", query=where, headers=[]) == [
        Problem("/query/where/field", "missing required property")
    ]
    assert check(styles, "GET", "/label/.5", headers=[]) == []
    assert check(styles, "GET", "/label/5", headers=[]) == [
        Problem("/path/v", "malformed label value")
    ]


# --- request bodies ------------------------------------------------------------------------


def test_valid_post_has_no_problems(orders):
    operation, _ = orders.match("POST", "/orders")
    assert operation.needs_body
    assert check(orders, "POST", "/orders", body=GOOD_ORDER) == []


def test_body_problems_point_into_the_body(orders):
    body = {
        "customer": 7,
        "items": [{"sku": "A", "qty": 0, "colour": "red"}, {"qty": 1000}],
    }
    assert check(orders, "POST", "/orders", body=body) == [
        Problem("/body/customer", "expected string, got integer"),
        Problem("/body/items/0/colour", "unexpected property"),
        Problem("/body/items/0/qty", "must be >= 1"),
        Problem("/body/items/1/sku", "missing required property"),
        Problem("/body/items/1/qty", "must be < 1000"),  # 3.0's boolean exclusiveMaximum
    ]


def test_missing_required_properties_point_at_them(orders):
    assert check(orders, "POST", "/orders", body={}) == [
        Problem("/body/customer", "missing required property"),
        Problem("/body/items", "missing required property"),
    ]
    assert check(orders, "POST", "/orders", body=[]) == [
        Problem("/body", "expected object, got array")
    ]


@pytest.mark.parametrize("body", [b"{", b"{'a': 1}", b"NaN", b"\xff\xfe", b'{"a": Infinity}'])
def test_a_body_that_is_not_json(orders, body):
    assert check(orders, "POST", "/orders", content_type=JSON, body=body) == [
        Problem("/body", "not valid JSON")
    ]


def test_a_content_type_not_in_the_document(orders):
    body = json.dumps(GOOD_ORDER).encode()
    problems = check(orders, "POST", "/orders", content_type=b"application/xml", body=body)
    assert problems == [
        Problem(
            "/header/content-type",
            "content type 'application/xml' not allowed; expected application/json, text/csv",
        )
    ]
    problems = check(orders, "POST", "/orders", content_type=None, body=body)
    assert pointers(problems) == ["/header/content-type"]
    assert problems[0].message.startswith("content type missing")


def test_media_type_parameters_and_case_are_ignored(orders):
    body = json.dumps(GOOD_ORDER).encode()
    ct = b"Application/JSON; charset=utf-8"
    assert check(orders, "POST", "/orders", content_type=ct, body=body) == []


def test_a_listed_non_json_media_type_is_not_validated(orders):
    assert check(orders, "POST", "/orders", content_type=b"text/csv", body=b"\x00 not json") == []


def test_a_missing_required_body(orders):
    for body in (None, b""):
        assert check(orders, "POST", "/orders", content_type=JSON, body=body) == [
            Problem("/body", "request body is required")
        ]


def test_an_optional_body_may_be_left_out(orders):
    assert check(orders, "PUT", "/orders/3", headers=[]) == []


def test_an_unread_body_is_known_to_be_there_by_its_headers(orders):
    """With body=None (not buffered), Content-Length / Transfer-Encoding tell a body came."""
    operation, params = orders.match("POST", "/orders")
    sent = [*TENANT, (b"content-length", b"12")]
    args = {"path_params": params, "query": [], "content_type": b"text/csv", "body": None}
    assert operation.validate(headers=sent, **args) == []
    chunked = [*TENANT, (b"transfer-encoding", b"chunked")]
    assert operation.validate(headers=chunked, **args) == []
    empty = [*TENANT, (b"content-length", b"0")]
    assert operation.validate(headers=empty, **args) == [
        Problem("/body", "request body is required")
    ]


def test_operations_without_a_json_body_do_not_need_the_body(orders):
    assert not orders.match("GET", "/orders")[0].needs_body
    assert not orders.match("DELETE", "/orders/1")[0].needs_body


def test_nullable_in_3_0(orders):
    body = {**GOOD_ORDER, "note": None, "priority": None, "coupon": None}
    assert check(orders, "POST", "/orders", body=body) == []
    body = {**GOOD_ORDER, "priority": 4, "coupon": {}}
    assert check(orders, "POST", "/orders", body=body) == [
        Problem("/body/priority", "must be one of 1, 2, 3, null"),
        Problem("/body/coupon/code", "missing required property"),
    ]
    assert check(orders, "POST", "/orders", body={**GOOD_ORDER, "customer": None}) == [
        Problem("/body/customer", "expected string, got null")
    ]


def test_read_only_is_not_required_in_a_request_nor_write_only_in_a_response(orders):
    order = {**GOOD_ORDER, "status": "paid", "secret": "s3cret"}
    assert check(orders, "PUT", "/orders/3", headers=[], body=order) == []
    operation, _ = orders.match("PUT", "/orders/3")
    response = {**GOOD_ORDER, "status": "paid"}
    assert operation.validate_response(status=200, content_type=JSON, body=b"{}") != []
    assert operation.validate_response(
        status=200, content_type=JSON, body=json.dumps(response).encode()
    ) == [Problem("/body/id", "missing required property")]


def test_recursive_schema_validates_every_level(orders):
    tree = {"name": "a", "children": [{"name": "b", "children": [{"children": []}]}]}
    assert check(orders, "POST", "/categories", body=tree) == [
        Problem("/body/children/0/children/0/name", "missing required property")
    ]


@pytest.mark.parametrize("depth", [300, 5000])
def test_recursion_deeper_than_python_allows_is_a_problem_not_a_crash(orders, depth):
    body = b'{"name": "x", "children": [' * depth + b'{"name": "y"}' + b"]}" * depth
    problems = check(orders, "POST", "/categories", content_type=JSON, body=body)
    assert problems == [Problem("/body", "nested too deeply")]


def test_problems_are_capped(orders):
    body = {"customer": "c", "items": [{"sku": "", "qty": "x"} for _ in range(50)]}
    problems = check(orders, "POST", "/orders", body=body)
    assert len(problems) == MAX_PROBLEMS
    assert problems[0] == Problem("/body/items/0/sku", "must be at least 1 characters long")


def test_messages_never_echo_huge_values(orders):
    huge = "x" * 100_000
    body = {"customer": [huge], "items": [{"sku": "A", "qty": huge}], huge: 1}
    problems = check(orders, "POST", "/orders", body=body, query=[("limit", huge)])
    assert problems
    assert all(len(p.message) < 200 for p in problems)
    problems = check(orders, "POST", "/orders", content_type=huge.encode(), body=b"{}")
    assert len(problems[0].message) < 200


# --- OpenAPI 3.1 ---------------------------------------------------------------------------


def doc_31(schema: dict, **components) -> dict:
    return {
        "openapi": "3.1.0",
        "info": {"title": "t", "version": "1"},
        "paths": {
            "/things": {
                "post": {
                    "requestBody": {"content": {"application/json": {"schema": schema}}},
                    "responses": {"204": {"description": "ok"}},
                }
            }
        },
        "components": {"schemas": components},
    }


def test_3_1_type_arrays_with_null():
    schema = {
        "type": "object",
        "properties": {"note": {"type": ["string", "null"]}, "n": {"type": "integer"}},
    }
    validator = compile_openapi(doc_31(schema))
    assert check(validator, "POST", "/things", headers=[], body={"note": None}) == []
    assert check(validator, "POST", "/things", headers=[], body={"note": 1, "n": None}) == [
        Problem("/body/note", "expected string or null, got integer"),
        Problem("/body/n", "expected integer, got null"),
    ]


def test_3_1_ref_siblings_apply_and_2020_12_keywords_work():
    schema = {"$ref": "#/components/schemas/Tag", "maxLength": 3}
    tag = {"type": "string", "minLength": 2}
    validator = compile_openapi(doc_31(schema, Tag=tag))
    assert check(validator, "POST", "/things", headers=[], body="ab") == []
    assert check(validator, "POST", "/things", headers=[], body="a") == [
        Problem("/body", "must be at least 2 characters long")
    ]
    assert check(validator, "POST", "/things", headers=[], body="abcd") == [
        Problem("/body", "must be at most 3 characters long")
    ]
    tuple_schema = {"type": "array", "prefixItems": [{"type": "integer"}], "items": False}
    validator = compile_openapi(doc_31(tuple_schema))
    assert check(validator, "POST", "/things", headers=[], body=[1]) == []
    assert pointers(check(validator, "POST", "/things", headers=[], body=[1, 2])) == ["/body"]


def test_3_1_mutually_recursive_schemas():
    a = {"type": "object", "properties": {"b": {"$ref": "#/components/schemas/B"}}}
    b = {"type": "object", "properties": {"a": {"$ref": "#/components/schemas/A"}}}
    schema = {"$ref": "#/components/schemas/A"}
    validator = compile_openapi(doc_31(schema, A=a, B=b))
    assert check(validator, "POST", "/things", headers=[], body={"b": {"a": {"b": {}}}}) == []
    assert check(validator, "POST", "/things", headers=[], body={"b": {"a": {"b": 1}}}) == [
        Problem("/body/b/a/b", "expected object, got integer")
    ]


def test_3_1_a_nested_id_does_not_change_what_recursion_refers_to():
    node = {
        "$id": "https://example.com/node",
        "type": "object",
        "properties": {"next": {"$ref": "#/components/schemas/Node"}, "v": {"type": "integer"}},
    }
    validator = compile_openapi(doc_31({"$ref": "#/components/schemas/Node"}, Node=node))
    assert check(validator, "POST", "/things", headers=[], body={"next": {"v": "x"}}) == [
        Problem("/body/next/v", "expected integer, got string")
    ]


# --- responses -----------------------------------------------------------------------------


def test_response_validation(orders):
    get, _ = orders.match("GET", "/orders/1")
    order = {**GOOD_ORDER, "id": 1, "status": "paid"}
    ok = json.dumps(order).encode()
    assert get.validate_response(status=200, content_type=JSON, body=ok) == []
    bad = json.dumps({**order, "status": "lost"}).encode()
    assert pointers(get.validate_response(status=200, content_type=JSON, body=bad)) == [
        "/body/status"
    ]
    assert get.validate_response(status=200, content_type=JSON, body=b"<html>") == [
        Problem("/body", "not valid JSON")
    ]
    assert pointers(get.validate_response(status=200, content_type=b"text/html", body=ok)) == [
        "/header/content-type"
    ]


def test_response_status_ranges_and_default(orders):
    post, _ = orders.match("POST", "/orders")
    problem_json = b"application/problem+json"
    assert post.validate_response(status=422, content_type=problem_json, body=b"{}") == [
        Problem("/body/title", "missing required property")
    ]
    listing, _ = orders.match("GET", "/orders")
    assert listing.validate_response(status=503, content_type=problem_json, body=b"{}") == [
        Problem("/body/title", "missing required property")
    ]
    assert listing.validate_response(status=200, content_type=JSON, body=b'{"orders": []}') == []


def test_nothing_to_check_in_a_response(orders):
    get, _ = orders.match("GET", "/orders/1")
    assert get.validate_response(status=204, content_type=None, body=b"x") == []
    assert get.validate_response(status=500, content_type=JSON, body=b"{") == []  # undocumented
    assert get.validate_response(status=200, content_type=JSON, body=None) == []
    post, _ = orders.match("POST", "/orders")
    assert post.validate_response(status=500, content_type=JSON, body=b"{") == []


# --- compile errors ------------------------------------------------------------------------


def broken(orders_doc, edit) -> dict:
    doc = copy.deepcopy(orders_doc)
    edit(doc)
    return doc


def _set(path, value):
    def edit(doc):
        node = doc
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value

    return edit


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (_set(["openapi"], "2.0"), "openapi: unsupported version '2.0'"),
        (_set(["openapi"], "3.2.0"), "openapi: unsupported version '3.2.0'"),
        (_set(["openapi"], 3.0), "openapi: unsupported version '3.0'"),
        (lambda doc: doc.pop("openapi"), "openapi: missing"),
        (_set(["paths"], []), "paths: must be an object"),
        (lambda doc: doc.pop("paths"), "paths: must be an object"),
        (_set(["paths", "orders"], {}), "paths.orders: a path must start with '/'"),
        (_set(["paths", "/a/{b"], {}), "paths./a/{b: malformed template segment '{b'"),
        (
            _set(["paths", "/orders/{orderId}"], {}),
            "paths./orders/{orderId}: the same path as '/orders/{id}'",
        ),
        (
            _set(["paths", "/orders", "get", "parameters", 0], {"$ref": "#/nope/Tenant"}),
            "paths./orders.get.parameters[0]: unresolvable $ref '#/nope/Tenant'",
        ),
        (
            _set(["paths", "/orders", "get", "parameters", 2, "schema"], {"$ref": "other.yaml"}),
            "paths./orders.get.parameters[2].schema: only local $refs ('#/...') are supported",
        ),
        (
            _set(["components", "schemas", "Line", "properties", "qty", "type"], "int"),
            "components.schemas.Line.properties.qty.type: invalid schema: 'int' is not valid",
        ),
        (
            _set(["components", "schemas", "Line", "properties", "sku", "pattern"], "("),
            "components.schemas.Line.properties.sku.pattern: invalid schema: '(' is not a 'regex'",
        ),
        (
            _set(["paths", "/orders", "get", "parameters", 1, "schema", "minimum"], "one"),
            "paths./orders.get.parameters[1].schema.minimum: invalid schema:",
        ),
        (
            _set(["paths", "/orders/{id}", "parameters"], []),
            "paths./orders/{id}.get: path parameter 'id' is not defined in parameters",
        ),
        (
            _set(
                ["paths", "/orders", "get", "parameters", 1],
                {"name": "limit", "in": "path", "required": True},
            ),
            "paths./orders.get.parameters[1]: path parameter 'limit' is not in the path template",
        ),
        (
            _set(["paths", "/orders", "get", "parameters", 1, "style"], "matrix"),
            "paths./orders.get.parameters[1].style: 'matrix' is not allowed in query",
        ),
        (
            _set(["paths", "/orders", "get", "parameters", 1, "in"], "body"),
            "paths./orders.get.parameters[1]: 'in' must be one of",
        ),
        (
            _set(["components", "schemas", "Status"], {"$ref": "#/components/schemas/Status"}),
            "components.schemas.Status: circular $ref that never descends into the value",
        ),
        (
            _set(
                ["components", "parameters", "Tenant"], {"$ref": "#/components/parameters/Tenant"}
            ),
            "components.parameters.Tenant: circular $ref",
        ),
        (
            _set(["paths", "/orders", "get", "responses"], []),
            "paths./orders.get.responses: must be an object",
        ),
    ],
)
def test_compile_errors_say_where(orders_doc, edit, message):
    with pytest.raises(OpenApiError) as raised:
        compile_openapi(broken(orders_doc, edit))
    assert str(raised.value).startswith(message), str(raised.value)


def test_a_document_that_is_not_an_object():
    with pytest.raises(OpenApiError, match="^document: must be an object"):
        compile_openapi(["openapi"])


def test_a_3_1_document_may_have_no_paths():
    assert compile_openapi({"openapi": "3.1.0", "info": {}}).match("GET", "/") is None


def test_the_sample_document_compiles_as_json_too(orders_doc):
    text = json.dumps(orders_doc)
    assert len(compile_openapi(load_openapi_text(text)).operations) == 8


# --- loading -------------------------------------------------------------------------------


def test_yaml_loading_keeps_dates_as_strings(orders_doc):
    assert orders_doc["openapi"] == "3.0.3"
    example = orders_doc["components"]["schemas"]["NewOrder"]["properties"]["placed"]["example"]
    assert example == "2024-06-01"


def test_a_yaml_syntax_error_names_the_line():
    text = "openapi: 3.0.3\npaths:\n  /a:\n    get: [unclosed\n  /b: {}\n"
    with pytest.raises(OpenApiError, match=r"^line \d+: "):
        load_openapi_text(text)


def test_a_yaml_flow_mapping_is_not_mistaken_for_json():
    assert load_openapi_text("{openapi: 3.1.0, paths: {}}") == {"openapi": "3.1.0", "paths": {}}


def test_a_json_syntax_error_names_the_line():
    with pytest.raises(OpenApiError, match=r"^line 3: "):
        load_openapi_text('{\n  "openapi": "3.1.0",\n  "paths": {,}\n}')


@pytest.mark.parametrize("text", ["- a\n- b\n", "just text", ""])
def test_a_document_that_is_not_a_mapping(text):
    with pytest.raises(OpenApiError, match="^document: must be an object"):
        load_openapi_text(text)


# --- cost ----------------------------------------------------------------------------------


def test_cost_of_match_and_validate(orders, capsys):
    """Measured, not asserted: the per-request cost on the hot path."""
    query = [("limit", "10"), ("status", "paid"), ("tag", "a"), ("tag", "b")]
    body = json.dumps(
        {
            "customer": "c-1",
            "note": None,
            "items": [{"sku": f"S{i}", "qty": i + 1, "options": ["gift"]} for i in range(5)],
        }
    ).encode()

    def typical_get_one():
        operation, params = orders.match("GET", "/orders/42")
        assert not operation.validate(
            path_params=params, query=[], headers=TENANT, content_type=None, body=None
        )

    def typical_get_list():
        operation, params = orders.match("GET", "/orders")
        assert not operation.validate(
            path_params=params, query=query, headers=TENANT, content_type=None, body=None
        )

    def typical_post():
        operation, params = orders.match("POST", "/orders")
        assert not operation.validate(
            path_params=params, query=[], headers=TENANT, content_type=JSON, body=body
        )

    results = {}
    cases = (
        ("GET /orders/{id} (path id, header)", typical_get_one),
        ("GET /orders (header, 4 query values)", typical_get_list),
        ("POST /orders (header, 5-line JSON body)", typical_post),
    )
    for name, fn in cases:
        runs = 2000
        best = min(timeit.repeat(fn, number=runs, repeat=5)) / runs
        results[name] = best * 1e6
    with capsys.disabled():
        for name, micros in results.items():
            print(f"\nopenapi match+validate {name}: {micros:.1f} µs")
