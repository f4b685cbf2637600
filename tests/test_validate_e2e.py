"""Request validation against an API's OpenAPI document, through the real gateway."""

from __future__ import annotations

import json

import pytest
import requests

from tests.conftest import active_key, make_user, wait_for_key
from tests.procs import wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]

DOCUMENT = """
openapi: 3.0.3
info: {title: Orders, version: "1"}
paths:
  /orders/{id}:
    get:
      parameters:
        - {name: id, in: path, required: true, schema: {type: integer, minimum: 1}}
        - {name: expand, in: query, schema: {type: string, enum: [items, customer]}}
      responses:
        "200":
          description: an order
          content:
            application/json:
              schema: {type: object, required: [id], properties: {id: {type: integer}}}
  /orders:
    post:
      requestBody:
        required: true
        content:
          application/json:
            schema: {$ref: "#/components/schemas/NewOrder"}
      responses: {"201": {description: created}}
components:
  schemas:
    NewOrder:
      type: object
      required: [items]
      properties:
        note: {type: string, nullable: true}
        items:
          type: array
          minItems: 1
          items:
            type: object
            required: [sku, qty]
            properties:
              sku: {type: string}
              qty: {type: integer, minimum: 1}
"""


@pytest.fixture
def validated(stack, live):
    from django.db import transaction

    from gateway.config import config_bump
    from gateway.models import Policy

    with transaction.atomic():
        live.api.openapi = DOCUMENT
        live.api.save()
        Policy.objects.create(api=live.api, kind="validate", config={"response": "report"})
        config_bump(reason="validation")
    issued = active_key(make_user("dev@example.com"), live.free)
    wait_for_key(stack, issued.key)
    headers = {"X-API-Key": issued.key}
    wait_until(
        lambda: all(
            stack.get("/demo/orders/x", headers=headers).status_code == 400 for _ in range(4)
        ),
        timeout=10,
        what="the validation policy",
    )
    return headers


def test_requests_that_match_the_document_pass_and_others_get_pointed_errors(stack, validated):
    assert stack.get("/demo/orders/7?expand=items", headers=validated).status_code == 200
    bad = stack.get("/demo/orders/0?expand=everything", headers=validated)
    assert bad.status_code == 400
    assert bad.headers["content-type"] == "application/problem+json"
    problem = bad.json()
    assert problem["type"] == "urn:apigw:problem:validation-failed"
    pointers = {e["pointer"] for e in problem["errors"]}
    assert pointers == {"/path/id", "/query/expand"}
    unknown = stack.get("/demo/customers", headers=validated)
    assert unknown.status_code == 400
    assert "not described" in unknown.json()["errors"][0]["message"]


def test_json_bodies_are_validated_and_still_reach_the_upstream_whole(stack, validated):
    url = stack.gateway_url + "/demo/orders"
    headers = {**validated, "Content-Type": "application/json"}
    good = {"note": None, "items": [{"sku": "book", "qty": 2}]}
    ok = requests.post(url, headers=headers, data=json.dumps(good), timeout=10)
    assert ok.status_code == 200
    assert json.loads(ok.json()["body"]) == good
    bad = {"items": [{"sku": "book", "qty": 0}, {"qty": 1}]}
    refused = requests.post(url, headers=headers, data=json.dumps(bad), timeout=10)
    assert refused.status_code == 400
    pointers = {e["pointer"] for e in refused.json()["errors"]}
    assert pointers == {"/body/items/0/qty", "/body/items/1/sku"}
    broken = requests.post(url, headers=headers, data="{not json", timeout=10)
    assert broken.status_code == 400
    assert broken.json()["errors"][0]["pointer"] == "/body"


def test_responses_are_checked_report_only(stack, validated):
    # The demo upstream's echo is not the document's order: reported, not refused.
    resp = stack.get("/demo/orders/7", headers=validated)
    assert resp.status_code == 200

    def counted() -> bool:
        metrics = stack.ops("/metrics").text
        return any(
            line.startswith("gateway_response_validation_failures_total{")
            and float(line.split()[-1]) > 0
            for line in metrics.splitlines()
        )

    wait_until(counted, timeout=10, what="the response check to be counted")


def test_a_bad_document_is_refused_in_admin(live):
    from django.core.exceptions import ValidationError

    live.api.openapi = "openapi: 2.0\npaths: {}"
    with pytest.raises(ValidationError) as err:
        live.api.full_clean()
    assert "openapi" in err.value.message_dict
