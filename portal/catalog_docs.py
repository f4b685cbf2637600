"""The catalog's API documents: which OpenAPI document a version has, and where it lives.

The document is the one the gateway's validation stage uses (`ApiVersion.openapi`, else
`Api.openapi`). The portal serves it as JSON with `servers` replaced by the gateway URL
that reaches that version, so Swagger UI's "Try it" calls the gateway, never the upstream.
"""

from __future__ import annotations

import json

import yaml
from django.conf import settings


class NoDocument(Exception):
    pass


def document_text(api, version=None) -> str:
    return (version.openapi if version is not None else "") or api.openapi


def version_base_url(api, version=None) -> str:
    """The gateway URL a client calls for `version` (None: the API's default)."""
    base = settings.GATEWAY_PUBLIC_URL.rstrip("/") + api.path_prefix.rstrip("/")
    if version is not None and api.version_scheme == "path":
        return f"{base}/{version.name}"
    return base


def document_for_portal(api, version=None) -> dict:
    text = document_text(api, version)
    if not text.strip():
        raise NoDocument()
    try:
        doc = json.loads(text) if text.lstrip().startswith("{") else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError):
        raise NoDocument() from None  # admin validates documents; an old one may not parse
    if not isinstance(doc, dict):
        raise NoDocument()
    doc = dict(doc)
    doc["servers"] = [{"url": version_base_url(api, version), "description": "The gateway"}]
    return doc
