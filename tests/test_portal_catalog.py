"""The portal's catalog: API pages, versions and their status, OpenAPI reference, Try it CORS."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from django.utils import timezone

from tests.conftest import make_catalog

pytestmark = pytest.mark.django_db

DOC = (
    "openapi: 3.0.3\n"
    "info: {title: Demo, version: '1', x-released: 2026-01-31}\n"
    "servers: [{url: 'http://upstream.internal:9000'}]\n"
    "paths:\n"
    "  /ping:\n"
    "    get:\n"
    "      responses: {'200': {description: ok}}\n"
)


@pytest.fixture
def versioned(settings):
    from gateway.models import ApiVersion

    settings.GATEWAY_PUBLIC_URL = "https://gw.example.com"
    catalog = make_catalog()
    api = catalog.api
    api.version_scheme = "path"
    api.openapi = DOC
    api.save()
    now = timezone.now()
    ApiVersion.objects.create(api=api, name="v1", sunset_at=now - timedelta(days=1))
    ApiVersion.objects.create(
        api=api,
        name="v2",
        deprecated_at=now - timedelta(days=1),
        sunset_at=datetime(2099, 1, 31, tzinfo=UTC),
        openapi=DOC.replace("/ping", "/pong"),
    )
    ApiVersion.objects.create(api=api, name="v3", is_default=True)
    return catalog


def test_an_api_page_shows_versions_status_base_urls_and_plans(client, versioned):
    page = client.get("/apis/demo/")
    assert page.status_code == 200
    html = page.content.decode()
    assert "https://gw.example.com/demo/v2" in html
    assert "Sunset " in html and "Deprecated" in html and "Current" in html
    assert "sunset 2099-01-31" in html
    assert "Free" in html and "Pro" in html and "(needs approval)" in html
    assert 'href="/apis/demo/v/v2/docs/"' in html
    assert 'href="/apis/demo/docs/"' in html
    # The catalog links to it; unpublished APIs are nowhere.
    assert 'href="/apis/demo/"' in client.get("/apis/").content.decode()
    versioned.api.is_published = False
    versioned.api.save()
    assert client.get("/apis/demo/").status_code == 404
    assert client.get("/apis/demo/openapi.json").status_code == 404


def test_the_reference_is_the_validation_document_pointed_at_the_gateway(client, versioned):
    doc = client.get("/apis/demo/openapi.json").json()
    assert doc["servers"] == [{"url": "https://gw.example.com/demo", "description": "The gateway"}]
    assert list(doc["paths"]) == ["/ping"]
    assert doc["info"]["x-released"] == "2026-01-31"  # a YAML date, served as JSON
    v2 = client.get("/apis/demo/v/v2/openapi.json").json()
    assert list(v2["paths"]) == ["/pong"]  # the version's own document
    assert v2["servers"][0]["url"] == "https://gw.example.com/demo/v2"
    v3 = client.get("/apis/demo/v/v3/openapi.json").json()
    assert list(v3["paths"]) == ["/ping"]  # none of its own: the API's
    assert client.get("/apis/demo/v/v9/openapi.json").status_code == 404


def test_the_reference_page_uses_local_swagger_ui_and_never_keeps_the_key(client, versioned):
    page = client.get("/apis/demo/v/v2/docs/")
    assert page.status_code == 200
    html = page.content.decode()
    assert "/static/vendor/swagger-ui/swagger-ui-bundle.js" in html
    assert "/static/vendor/swagger-ui/swagger-ui.css" in html
    assert "cdn" not in html.lower() and "unpkg" not in html
    assert 'data-spec-url="/apis/demo/v/v2/openapi.json"' in html
    assert "is deprecated and will be sunset on 2099-01-31" in html
    assert 'data-try-it=""' in html and 'id="try-key"' not in html  # not allowed here
    versioned.api.portal_try_it = True
    versioned.api.save()
    html = client.get("/apis/demo/v/v2/docs/").content.decode()
    assert 'data-try-it="1"' in html and 'id="try-key" type="password" autocomplete="off"' in html
    assert "never stores it" in html
    # No document, no reference.
    versioned.api.openapi = ""
    versioned.api.save()
    assert client.get("/apis/demo/docs/").status_code == 404
    assert client.get("/apis/demo/v/v2/docs/").status_code == 200


def test_try_it_admits_the_portals_origin_by_cors(settings):
    from gateway.dataplane.snapshot import portal_origin, portal_try_it_cors
    from gateway.dataplane.stages.cors import parse_cors
    from gateway.models import Api

    settings.PORTAL_URL = "https://Portal.example.com:443/"
    assert portal_origin() == "https://portal.example.com"
    settings.PORTAL_URL = "http://127.0.0.1:8000"
    api = Api(key_header="X-API-Key", version_scheme="header", version_header="API-Version")
    alone = portal_try_it_cors(api, None)
    assert alone.origins == ("http://127.0.0.1:8000",)
    assert set(alone.headers) == {"content-type", "authorization", "x-api-key", "api-version"}
    assert "x-request-id" in alone.expose_headers and not alone.credentials
    own = parse_cors({"origins": ["https://app.example"], "headers": ["X-Trace"]})
    merged = portal_try_it_cors(api, own)
    assert merged.origins == ("https://app.example", "http://127.0.0.1:8000")
    assert merged.headers[0] == "X-Trace" and "x-api-key" in merged.headers
    anyone = portal_try_it_cors(api, parse_cors({"origins": ["*"], "headers": ["*"]}))
    assert anyone.origins == ("*",) and anyone.headers == ("*",)
