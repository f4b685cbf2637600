"""In a real headless Chromium: sign up, verify, subscribe, create a key, call the gateway,
watch the usage chart fill up from the Celery rollups, revoke the key.

The portal runs in-process (pytest-django's `live_server`, so `mail.outbox` holds the
verification email); the gateway, upstream, Celery worker and beat are the real `stack`.
"""

from __future__ import annotations

import os
import re
import shutil
import time

import pytest
import requests

from tests.conftest import ARTIFACTS, wait_for_key
from tests.procs import wait_until

pytestmark = [pytest.mark.browser, pytest.mark.e2e, pytest.mark.django_db(transaction=True)]

CHROMIUM = shutil.which("chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]
EMAIL = "browser-dev@example.com"
STRONG_PASSWORD = "Tangerine-Lighthouse-Orbit-97"
KEY_RE = re.compile(r"^gw_[0-9a-f]{12}_[A-Za-z0-9_-]{32}$")
CONFIRM_RE = re.compile(r"https?://\S+/accounts/confirm-email/[^\s/]+/")


def _shot(page, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"browser-{name}.png"), full_page=True)


# In CI a missing browser is a failure (`.ci/run` installs it), never a skip.
@pytest.mark.skipif(
    CHROMIUM is None and os.environ.get("CI") != "true", reason="chromium is not installed"
)
def test_signup_to_usage_chart_to_revocation(live_server, stack, live, mailoutbox):
    from playwright.sync_api import expect, sync_playwright

    started = time.monotonic()
    problems: list[str] = []  # console errors and uncaught page errors, on every page

    # No ORM calls from here on: Playwright's sync API runs an event loop in this thread,
    # and the live server (its own thread) does all the database work.
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            context = browser.new_context(viewport={"width": 1280, "height": 900})
            context.set_default_timeout(10_000)
            page = context.new_page()
            page.on(
                "console",
                lambda msg: (
                    problems.append(f"console {msg.type} on {page.url}: {msg.text}")
                    if msg.type == "error"
                    else None
                ),
            )
            page.on("pageerror", lambda exc: problems.append(f"pageerror on {page.url}: {exc}"))
            page.on(
                "response",
                lambda resp: (
                    problems.append(f"HTTP {resp.status} for {resp.url}")
                    if resp.status >= 400
                    else None
                ),
            )
            dialogs: list[str] = []

            def accept(dialog) -> None:
                dialogs.append(dialog.message)
                dialog.accept()

            page.on("dialog", accept)

            # 1. Home -> Sign up -> register.
            page.goto(live_server.url + "/")
            expect(page.get_by_role("heading", name="Build on our APIs")).to_be_visible()
            page.locator("header nav").get_by_role("link", name="Sign up").click()
            expect(page).to_have_url(re.compile(r"/accounts/signup/$"))
            page.fill("input[name=email]", EMAIL)
            page.fill("input[name=password1]", STRONG_PASSWORD)
            page.fill("input[name=password2]", STRONG_PASSWORD)
            _shot(page, "signup")
            page.get_by_role("button", name="Sign Up").click()

            # 2. Not usable before verification.
            expect(
                page.get_by_text("We have sent an email to you for verification")
            ).to_be_visible()
            expect(page.locator("header nav").get_by_role("link", name="Sign in")).to_be_visible()
            page.goto(live_server.url + "/dashboard/")
            expect(page).to_have_url(re.compile(r"/accounts/login/\?next=/dashboard/$"))

            assert len(mailoutbox) == 1, [m.subject for m in mailoutbox]
            assert mailoutbox[0].to == [EMAIL]
            match = CONFIRM_RE.search(mailoutbox[0].body)
            assert match, mailoutbox[0].body
            page.goto(match.group(0))
            expect(page.get_by_role("heading", name="Confirm Email Address")).to_be_visible()
            page.get_by_role("button", name="Confirm").click()
            page.wait_for_load_state()
            if "/accounts/login/" in page.url:  # not logged in on confirmation: sign in
                page.fill("input[name=login]", EMAIL)
                page.fill("input[name=password]", STRONG_PASSWORD)
                page.get_by_role("button", name="Sign In").click()
            expect(page).to_have_url(re.compile(r"/dashboard/$"))
            expect(page.get_by_role("button", name=f"Sign out ({EMAIL})")).to_be_visible()

            # 3. Subscribe to Free, create a key, see it exactly once.
            page.locator("header nav").get_by_role("link", name="Plans").click()
            page.locator("button[data-plan=free]").click()
            expect(page).to_have_url(re.compile(r"/dashboard/$"))
            expect(page.locator(".messages")).to_contain_text("You are subscribed to Free")
            form = page.locator("form#key-create")
            form.locator("input[name=name]").fill("browser-key")
            expect(form.locator("select[name=subscription] option")).to_have_text(["Free"])
            form.get_by_role("button", name="Create key").click()
            expect(page.get_by_role("heading", name="Your new API key")).to_be_visible()
            key = page.locator("#new-key").inner_text().strip()
            assert KEY_RE.match(key), key
            _shot(page, "key-created")
            # gw_<key_id>_<secret>; the secret is urlsafe base64 and may itself contain "_".
            prefix, secret = key[:15], key[16:]

            page.get_by_role("link", name="Back to the dashboard").click()
            expect(page).to_have_url(re.compile(r"/dashboard/$"))
            row = page.locator("table.keys tbody tr", has_text="browser-key")
            expect(row).to_have_count(1)
            expect(row.locator("code")).to_have_text(prefix + "…")
            expect(row.locator(".badge")).to_have_text("active")
            html = page.content()
            assert key not in html
            assert secret not in html  # not even the secret part

            # 4. Call the gateway with the key.
            wait_for_key(stack, key)
            for i in range(5):
                resp = requests.get(
                    stack.gateway_url + f"/demo/anything?n={i}",
                    headers={"X-API-Key": key},
                    timeout=10,
                )
                assert resp.status_code == 200, resp.text

            # 5. Usage page: gateway log -> Celery ingest -> rollup -> chart.
            row.get_by_role("link", name="Usage").click()
            expect(
                page.get_by_role("heading", name=re.compile("Usage of .browser-key."))
            ).to_be_visible()
            # Events arrive in batches: wait until at least our 5 calls are counted (the
            # wait_for_key probes count as well, so the total can be higher).
            try:
                page.wait_for_function(
                    "Number(document.getElementById('usage-total').textContent) >= 5",
                    timeout=30_000,
                    polling=250,
                )
            except Exception as exc:
                _shot(page, "usage-chart-timeout")
                raise AssertionError(f"usage never showed up: {exc}\n{stack.logs()}") from exc
            total = int(page.locator("#usage-total").inner_text())
            assert total >= 5, total
            expect(page.locator("#usage-empty")).to_be_hidden()
            chart = page.evaluate(
                """() => {
                    const c = window.usageChart;
                    if (!c) return null;
                    const sum = (label) => (c.data.datasets.find((d) => d.label === label)
                        || {data: []}).data.reduce((a, b) => a + b, 0);
                    return {
                        type: c.config.type,
                        width: c.canvas.width,
                        height: c.canvas.height,
                        labels: c.data.labels.length,
                        ok: sum("2xx"),
                    };
                }"""
            )
            assert chart is not None, "window.usageChart is not defined: Chart.js did not run"
            assert chart["type"] == "bar"
            assert chart["width"] > 0 and chart["height"] > 0, chart
            assert chart["labels"] == 60, chart
            assert chart["ok"] >= 5, chart
            _shot(page, "usage-chart")

            # 6. Revoke from the dashboard (JS confirm), the gateway answers 401 within 3 s.
            page.locator("header nav").get_by_role("link", name="Dashboard").click()
            row.get_by_role("button", name="Revoke").click()
            expect(page.locator(".messages")).to_contain_text(f"Key {prefix}… is revoked.")
            assert dialogs == ["Revoke this key? Calls with it will fail within seconds."]
            expect(row.locator(".badge")).to_have_text("revoked")
            expect(row.get_by_role("button", name="Revoke")).to_have_count(0)
            took = wait_until(
                lambda: (
                    requests.get(
                        stack.gateway_url + "/demo/anything", headers={"X-API-Key": key}, timeout=2
                    ).status_code
                    == 401
                ),
                timeout=3.0,
                interval=0.05,
                what="the revoked key to be rejected by the gateway",
            )
            _shot(page, "dashboard-after-revoke")
            context.close()
        finally:
            browser.close()

    assert not problems, "\n".join(problems)
    print(
        f"\nbrowser test: usage total {total}, revoked key rejected after {took:.2f} s, "
        f"{time.monotonic() - started:.1f} s in all"
    )


@pytest.mark.skipif(
    CHROMIUM is None and os.environ.get("CI") != "true", reason="chromium is not installed"
)
def test_try_it_calls_the_gateway_from_the_api_reference(live_server, stack, live, settings):
    """Catalog → API page → reference (Swagger UI, local) → Try it with a pasted key: the
    browser calls the real gateway cross-origin (its CORS admits the portal) and shows 200."""
    from django.db import transaction
    from playwright.sync_api import expect, sync_playwright

    from gateway.config import config_bump
    from gateway.management.commands.seeddemo import DEMO_OPENAPI
    from tests.conftest import active_key, make_user

    api = live.api
    api.openapi, api.portal_try_it, api.description = DEMO_OPENAPI, True, "Echoes requests."
    with transaction.atomic():
        api.save()
        config_bump(reason="try it")
    key = active_key(make_user("try@example.com"), live.free).key
    wait_for_key(stack, key)
    settings.GATEWAY_PUBLIC_URL = stack.gateway_url  # the live server runs in this process
    problems: list[str] = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_context(viewport={"width": 1280, "height": 900}).new_page()
            page.set_default_timeout(10_000)
            page.on("pageerror", lambda exc: problems.append(f"pageerror: {exc}"))
            page.on(
                "console",
                lambda msg: problems.append(msg.text) if msg.type == "error" else None,
            )
            page.goto(live_server.url + "/apis/")
            page.get_by_role("link", name="Demo").click()
            expect(page.get_by_role("heading", name="Demo", exact=True)).to_be_visible()
            _shot(page, "api-detail")
            page.get_by_role("link", name="Reference and Try it").click()
            expect(page.locator(".swagger-ui .info .title")).to_contain_text("Demo echo API")
            page.fill("#try-key", key)
            page.locator(".opblock-get .opblock-summary").first.click()
            page.get_by_role("button", name="Try it out").click()
            page.locator(".opblock-get input[placeholder=path]").fill("from-the-portal")
            page.get_by_role("button", name="Execute").click()
            status = page.locator(".opblock-get .live-responses-table tbody .response-col_status")
            try:
                expect(status.first).to_have_text("200", timeout=15_000)
            except AssertionError:
                _shot(page, "api-try-it-failed")
                raise
            body = page.locator(".opblock-get .live-responses-table .highlight-code").first
            expect(body).to_contain_text("/anything/from-the-portal")
            _shot(page, "api-try-it")
            stored = page.evaluate("() => JSON.stringify({...localStorage, ...sessionStorage})")
            assert key not in stored  # typed, used, never kept
        finally:
            browser.close()
    assert not problems, "\n".join(problems)


@pytest.mark.skipif(
    CHROMIUM is None and os.environ.get("CI") != "true", reason="chromium is not installed"
)
def test_partner_invites_a_member_whose_calls_show_on_the_organization_chart(
    live_server, stack, live, mailoutbox
):
    """Owner creates an organization and subscribes it; invites a member by email; the
    member accepts the link, makes a key, calls the gateway; the organization's chart and
    its by-member table show those calls."""
    from playwright.sync_api import expect, sync_playwright

    from tests.conftest import PASSWORD, make_user

    make_user("owner@partner.test")
    make_user("member@partner.test")
    problems: list[str] = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            context = browser.new_context(viewport={"width": 1280, "height": 900})
            context.set_default_timeout(10_000)
            page = context.new_page()
            page.on("pageerror", lambda exc: problems.append(f"pageerror: {exc}"))
            page.on("dialog", lambda dialog: dialog.accept())

            def sign_in(email: str) -> None:
                page.goto(live_server.url + "/accounts/login/")
                page.fill("input[name=login]", email)
                page.fill("input[name=password]", PASSWORD)
                page.get_by_role("button", name="Sign In").click()
                expect(page).to_have_url(re.compile(r"/dashboard/$"))

            sign_in("owner@partner.test")
            page.locator("header nav").get_by_role("link", name="Organizations").click()
            page.fill("#org-name", "Partner Co")
            page.get_by_role("button", name="Create").click()
            expect(page.get_by_role("heading", name="Partner Co")).to_be_visible()
            page.select_option("#org-plan", "free")
            page.locator("#org-subscribe").get_by_role("button", name="Subscribe").click()
            expect(page.locator(".messages")).to_contain_text("Partner Co is subscribed to Free")
            page.fill("#invite-email", "member@partner.test")
            page.get_by_role("button", name="Send invitation").click()
            expect(page.locator(".messages")).to_contain_text("An invitation is on its way")
            _shot(page, "org-owner")
            link = re.search(r"https?://\S+/orgs/join/\S+/", mailoutbox[-1].body).group(0)
            page.locator("header nav").get_by_role("button", name=re.compile("Sign out")).click()

            sign_in("member@partner.test")
            page.goto(live_server.url + link[link.index("/orgs/join/") :])
            expect(page.get_by_text("join Partner Co as member")).to_be_visible()
            page.get_by_role("button", name="Accept and join").click()
            expect(page.locator(".messages")).to_contain_text("You are a member of Partner Co")
            form = page.locator("#org-key-create")
            form.locator("input[name=name]").fill("member-key")
            form.get_by_role("button", name="Create key").click()
            key = page.locator("#new-key").inner_text().strip()
            assert KEY_RE.match(key), key
            wait_for_key(stack, key)
            for i in range(4):
                resp = requests.get(
                    stack.gateway_url + f"/demo/anything?n={i}",
                    headers={"X-API-Key": key},
                    timeout=10,
                )
                assert resp.status_code == 200, resp.text
            page.goto(live_server.url + "/orgs/partner-co/?range=60m")
            page.wait_for_function(
                "Number(document.getElementById('usage-total').textContent) >= 4",
                timeout=30_000,
                polling=250,
            )
            page.reload()
            row = page.locator("table.by-member tbody tr", has_text="member@partner.test")
            expect(row).to_have_count(1)
            assert int(row.locator("td").nth(1).inner_text()) >= 4
            members = page.evaluate(
                """() => {
                    const c = (window.breakdownCharts || {})["member-chart"];
                    return c ? {labels: c.data.labels, values: c.data.datasets[0].data} : null;
                }"""
            )
            assert members and members["labels"] == ["member@partner.test"], members
            assert members["values"][0] >= 4, members
            _shot(page, "org-usage")
        finally:
            browser.close()
    assert not problems, "\n".join(problems)


# Pages a visitor and a signed-in developer reach; each is shot at desktop and phone width.
TOUR_PUBLIC = [
    "/",
    "/apis/",
    "/apis/demo/",
    "/apis/demo/docs/",
    "/plans/",
    "/accounts/login/",
    "/accounts/signup/",
    "/accounts/password/reset/",
]
TOUR_SIGNED_IN = [
    "/dashboard/",
    "/usage/",
    "/keys/{key}/usage/",
    "/orgs/",
    "/orgs/tour-co/",
    "/orgs/join/not-a-real-token/",
    "/accounts/email/",
    "/accounts/password/change/",
    "/accounts/2fa/",
]
A11Y_CHECK = """() => {
    const problems = [];
    for (const el of document.querySelectorAll("input, select, textarea")) {
        if (["hidden", "submit", "button"].includes(el.type) || el.disabled) continue;
        if (el.closest("#swagger-ui")) continue;  // Swagger UI's own widgets
        const named = el.labels.length || el.getAttribute("aria-label")
            || el.getAttribute("aria-labelledby") || el.getAttribute("title");
        if (!named) problems.push(`unlabelled ${el.tagName} ${el.name || el.id}`);
    }
    for (const img of document.querySelectorAll("img:not([alt])")) {
        problems.push(`img without alt ${img.src.slice(0, 60)}`);
    }
    const wide = document.documentElement.scrollWidth - window.innerWidth;
    if (wide > 1) problems.push(`page ${wide}px wider than the window`);
    if (!document.querySelector("h1")) problems.push("no h1");
    return problems;
}"""


@pytest.mark.skipif(
    CHROMIUM is None and os.environ.get("CI") != "true", reason="chromium is not installed"
)
@pytest.mark.skipif(
    bool(os.environ.get("DATABASE_URL")),
    reason="pages look the same on PostgreSQL: the embedded pass shoots them",
)
def test_every_page_at_desktop_and_phone_width(live_server, catalog):
    """Every portal page: shot at 1280 and 390 px wide, no console error, no page wider than
    the window, every form field labelled, images with alt text."""
    from playwright.sync_api import sync_playwright

    from gateway.management.commands.seeddemo import DEMO_OPENAPI
    from portal.orgs import org_create
    from tests.conftest import PASSWORD, active_key, make_user

    catalog.api.openapi = DEMO_OPENAPI
    catalog.api.save()
    user = make_user("tour@example.com")
    key = active_key(user, catalog.free).api_key
    org_create(user, name="Tour Co")
    problems: list[str] = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            for width, height, tag in ((1280, 900, "desktop"), (390, 844, "phone")):
                context = browser.new_context(viewport={"width": width, "height": height})
                context.set_default_timeout(10_000)
                page = context.new_page()
                page.on(
                    "console",
                    lambda m, tag=tag: (
                        problems.append(f"{tag} console: {m.text}") if m.type == "error" else None
                    ),
                )
                signed_in = False
                for path in TOUR_PUBLIC + TOUR_SIGNED_IN:
                    if path in TOUR_SIGNED_IN and not signed_in:
                        page.goto(live_server.url + "/accounts/login/")
                        page.fill("input[name=login]", "tour@example.com")
                        page.fill("input[name=password]", PASSWORD)
                        page.get_by_role("button", name="Sign In").click()
                        page.wait_for_url(re.compile(r"/dashboard/$"))
                        signed_in = True
                    url = path.format(key=key.pk)
                    resp = page.goto(live_server.url + url)
                    if resp.status >= 400:
                        problems.append(f"{tag} {url}: HTTP {resp.status}")
                    page.wait_for_load_state("networkidle")
                    if "/docs/" in url:
                        page.locator(".swagger-ui .info").wait_for()
                    for problem in page.evaluate(A11Y_CHECK):
                        problems.append(f"{tag} {url}: {problem}")
                    name = url.strip("/").replace("/", "_") or "home"
                    _shot(page, f"tour-{tag}-{name}")
                context.close()
        finally:
            browser.close()
    assert not problems, "\n".join(problems)
