"""ASGI entry point of the data plane (see gunicorn_conf.py for how it is served)."""

import os

import django

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
django.setup()

from gateway.dataplane.app import GatewayApp  # noqa: E402

app = GatewayApp()
