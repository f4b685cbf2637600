"""Seed the demo: an admin, the demo upstream, one API routed to it, two plans. Idempotent."""

from __future__ import annotations

import os
import secrets

from django.core.management.base import BaseCommand
from django.db import transaction

from gateway.config import config_bump
from gateway.models import Api, Route, Target, Upstream
from portal.models import Plan, RateLimit, User

DEMO_OPENAPI = """\
openapi: 3.0.3
info:
  title: Demo echo API
  version: "1"
  description: Answers with the request it received (method, path, query, headers, body).
paths:
  /anything/{path}:
    parameters:
      - {name: path, in: path, required: true, schema: {type: string}, example: hello}
    get:
      summary: Echo a GET
      parameters:
        - {name: greeting, in: query, required: false, schema: {type: string}}
      responses:
        "200": {description: The request as the upstream saw it, as JSON.}
    post:
      summary: Echo a JSON body
      requestBody:
        content:
          application/json:
            schema: {type: object, example: {"message": "hi"}}
      responses:
        "200": {description: The request as the upstream saw it, as JSON.}
"""


class Command(BaseCommand):
    help = __doc__

    def add_arguments(self, parser) -> None:
        parser.add_argument("--upstream-host", default="127.0.0.1")
        parser.add_argument(
            "--upstream-port", type=int, default=int(os.environ.get("DEMO_UPSTREAM_PORT", 9000))
        )

    def handle(self, *args, upstream_host: str, upstream_port: int, **opts) -> None:
        with transaction.atomic():
            created_password = self._admin()
            upstream, _ = Upstream.objects.get_or_create(
                name="demo-echo", defaults={"description": "Echoes every request as JSON"}
            )
            Target.objects.get_or_create(upstream=upstream, host=upstream_host, port=upstream_port)
            api, api_created = Api.objects.get_or_create(
                slug="demo",
                defaults={
                    "name": "Demo echo API",
                    "path_prefix": "/demo",
                    "upstream": upstream,
                    "description": "Answers every path with the request it received, as JSON.",
                    "openapi": DEMO_OPENAPI,
                    "portal_try_it": True,
                },
            )
            if api_created:
                Route.objects.create(api=api, name="all", path="/", strip_prefix=True)
            free, _ = Plan.objects.get_or_create(
                slug="free",
                defaults={
                    "name": "Free",
                    "description": "For trying things out.",
                    "quota_limit": 1000,
                    "quota_period": Plan.QuotaPeriod.DAY,
                },
            )
            pro, _ = Plan.objects.get_or_create(
                slug="pro",
                defaults={
                    "name": "Pro",
                    "description": "For production use; needs approval.",
                    "quota_limit": 1_000_000,
                    "quota_period": Plan.QuotaPeriod.MONTH,
                    "requires_approval": True,
                },
            )
            free.apis.add(api)
            pro.apis.add(api)
            for plan, per_second, burst in ((free, 1, 30), (pro, 10, 100)):
                RateLimit.objects.get_or_create(
                    plan=plan,
                    route=None,
                    scope=RateLimit.Scope.KEY,
                    window=RateLimit.Window.SECOND,
                    defaults={"limit": per_second, "burst": burst},
                )
            config_bump(reason="demo seeded")
        if created_password:
            self.stdout.write(
                self.style.WARNING(
                    f"Admin account created: admin / {created_password}  "
                    "(shown once; set ADMIN_PASSWORD to choose it)"
                )
            )
        else:
            self.stdout.write("Demo data present.")

    def _admin(self) -> str | None:
        """Create the admin on first run; return its password only if generated here."""
        if User.objects.filter(username="admin").exists():
            return None
        given = os.environ.get("ADMIN_PASSWORD")
        password = given or secrets.token_urlsafe(12)
        email = os.environ.get("ADMIN_EMAIL", "admin@example.com")
        user = User.objects.create_superuser("admin", email, password)
        from allauth.account.models import EmailAddress

        EmailAddress.objects.create(user=user, email=user.email, verified=True, primary=True)
        return None if given else password
