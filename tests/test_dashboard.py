"""The dashboard at /ui: the session and CSRF rules over plain HTTP, then the
pages driven in a real headless Chromium (playwright's Python package pointed
at Debian's chromium; skipped, saying why, where either is missing).

One gateway and one browser serve the whole module; its usage is made by
real calls through the gateway to the fake upstream. Screenshots of every
page land in the test run's temporary folder (``dashboard-screenshots``).
"""

import http.client
import os
import re
import shutil
import time
import urllib.parse

import pytest

from conftest import (ADMIN_TOKEN, ANTHROPIC_KEY, OPENAI_KEY, RunningGateway, base_config, database_section,
                      two_projects_usage)

import llmgw
from fake_upstream import FakeUpstream

#: One worker runs the whole module when the suite runs in parallel (pytest-xdist
#: ``--dist loadgroup``): one browser, and the screenshots test runs last.
pytestmark = pytest.mark.xdist_group("dashboard")

CHROMIUM = os.environ.get("LLMGW_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


@pytest.fixture(scope="module")
def dash(tmp_path_factory, module_databases):
    """A gateway with an admin token and usage of two projects (alpha, beta)."""
    fake = FakeUpstream().start()
    db_path = tmp_path_factory.mktemp("dashboard") / "gateway.db"
    gateway = RunningGateway(base_config(fake.url, routing={"retries": 0}, **database_section(module_databases(db_path))),
                             db_path, environ={"LLMGW_ADMIN_TOKEN": ADMIN_TOKEN})
    try:
        gateway.alpha, gateway.beta = two_projects_usage(gateway)
        yield gateway
    finally:
        gateway.stop()
        fake.stop()


class Browserless:
    """A plain HTTP client that keeps the dashboard's cookies."""

    def __init__(self, gateway):
        self.port = gateway.port
        self.cookies = {}

    def request(self, method, path, form=None, headers=None):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        send = {"Cookie": "; ".join("%s=%s" % item for item in self.cookies.items())} if self.cookies else {}
        body = None
        if form is not None:
            body = urllib.parse.urlencode(form).encode()
            send["Content-Type"] = "application/x-www-form-urlencoded"
        send.update(headers or {})
        try:
            conn.request(method, path, body=body, headers=send)
            response = conn.getresponse()
            text = response.read().decode("utf-8")
            for name, value in response.getheaders():
                if name.lower() == "set-cookie":
                    cookie, _, attributes = value.partition(";")
                    cookie_name, _, cookie_value = cookie.partition("=")
                    if "Max-Age=0" in attributes:
                        self.cookies.pop(cookie_name, None)
                    else:
                        self.cookies[cookie_name] = cookie_value
            response.text = text
            return response
        finally:
            conn.close()

    def login(self, token=ADMIN_TOKEN):
        page = self.request("GET", "/ui/login")
        login_csrf = re.search(r'name="login_csrf" value="([^"]+)"', page.text).group(1)
        return self.request("POST", "/ui/login", {"login_csrf": login_csrf, "token": token})

    def csrf(self, path="/ui/keys"):
        return re.search(r'name="csrf" value="([^"]+)"', self.request("GET", path).text).group(1)


def key_is_active(gateway, key_id):
    return gateway.store.get_key(key_id)["is_active"]


# ---- plain HTTP: sessions, CSRF, headers --------------------------------------------

def test_pages_and_writes_need_a_session(dash):
    client = Browserless(dash)
    page = client.request("GET", "/ui/keys")
    assert page.status == 303 and page.getheader("location") == "/ui/login"
    assert dash.alpha["id"] not in page.text
    refused = client.request("POST", "/ui/keys/%s/revoke" % dash.alpha["id"], {"csrf": "x"})
    assert refused.status == 401
    assert key_is_active(dash, dash.alpha["id"])
    forged = Browserless(dash)
    forged.cookies["llmgw_ui"] = "%d.nonce.%s" % (dash.gateway.clock() * 1000, "0" * 64)
    assert forged.request("GET", "/ui/overview").status == 303


def test_writes_need_the_sessions_csrf_token(dash):
    record, _ = dash.create_key("csrf target")
    client = Browserless(dash)
    assert client.login().status == 303
    path = "/ui/keys/%s/revoke" % record["id"]
    assert client.request("POST", path, {}).status == 403
    assert client.request("POST", path, {"csrf": "0" * 64}).status == 403
    other = Browserless(dash)
    other.login()
    assert client.request("POST", path, {"csrf": other.csrf()}).status == 403  # another session's token
    assert key_is_active(dash, record["id"])
    done = client.request("POST", path, {"csrf": client.csrf()})
    assert done.status == 303 and not key_is_active(dash, record["id"])


def test_top_up_rotate_and_a_refused_create_go_through_the_administration_functions(dash):
    record, old_secret = dash.create_key("budgeted", max_budget=2)
    client = Browserless(dash)
    client.login()
    path = "/ui/keys/%s/" % record["id"]
    assert client.request("POST", path + "topup", {"csrf": client.csrf(), "amount": "3"}).status == 303
    assert "$5 (monthly)" in client.request("GET", "/ui/keys").text  # 2 + 3, the allowance of budget_use
    refused = client.request("POST", path + "topup", {"csrf": client.csrf(), "amount": "-1"})
    assert refused.status == 400 and "amount" in refused.text
    rotated = client.request("POST", path + "rotate", {"csrf": client.csrf(), "grace": "1h"})
    new_secret = re.search(r'<code id="new-key">([^<]+)</code>', rotated.text).group(1)
    assert rotated.status == 200 and new_secret != old_secret
    assert dash.store.find_key(llmgw.hash_secret(new_secret)).id == record["id"]
    assert new_secret not in client.request("GET", "/ui/keys").text
    keys_before = len(dash.store.list_keys())
    bad = client.request("POST", "/ui/keys", {"csrf": client.csrf(), "project_name": "x", "rpm": "many"})
    assert bad.status == 400 and "rpm" in bad.text and len(dash.store.list_keys()) == keys_before


def test_custom_ranges_pick_a_step_and_refuse_what_is_too_long(dash):
    client = Browserless(dash)
    client.login()
    for since, until, step in (("2026-11-01", "2026-11-02", "hour"), ("2026-10-01", "2026-11-29", "day"),
                               ("2025-11-01", "2026-12-01", "week")):
        page = client.request("GET", "/ui/overview?" + urllib.parse.urlencode(
            {"range": "custom", "since": since, "until": until, "by": "model"}))
        assert page.status == 200 and "one bar per %s, by model" % step in page.text, (since, until)
    page = client.request("GET", "/ui/overview?range=custom&since=2024-01-01&until=2026-12-01")
    assert page.status == 400 and "at most 60 weeks" in page.text and "<svg" not in page.text


def test_login_sets_a_strict_http_only_cookie_and_logout_ends_it(dash):
    client = Browserless(dash)
    page = client.request("GET", "/ui/login")
    login_csrf = re.search(r'name="login_csrf" value="([^"]+)"', page.text).group(1)
    assert client.request("POST", "/ui/login", {"login_csrf": "stale", "token": ADMIN_TOKEN}).status == 403
    wrong = client.request("POST", "/ui/login", {"login_csrf": login_csrf, "token": "adm-wrong"})
    assert wrong.status == 401 and "llmgw_ui" not in client.cookies
    response = client.login()
    cookie = [value for name, value in response.getheaders()
              if name.lower() == "set-cookie" and value.startswith("llmgw_ui=")][0]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie
    assert response.getheader("location") == "/ui/overview"
    session = client.cookies["llmgw_ui"]
    assert client.request("GET", "/ui/overview").status == 200
    assert client.request("POST", "/ui/logout", {"csrf": client.csrf()}).status == 303
    client.cookies["llmgw_ui"] = session  # a copy of the cookie kept from before
    assert client.request("GET", "/ui/overview").status == 303
    assert any(entry["action"] == "dashboard_login" for entry in dash.store.audit_log(50))


def test_pages_forbid_inline_script_and_show_no_secret(dash):
    client = Browserless(dash)
    client.login()
    for path in ("/ui/overview", "/ui/keys", "/ui/logs", "/ui/prices", "/ui/login"):
        page = client.request("GET", path)
        assert page.status == 200, path
        policy = page.getheader("content-security-policy")
        assert "script-src 'self'" in policy and "unsafe-inline" not in policy and "default-src 'none'" in policy
        assert page.getheader("cache-control") == "no-store"
        assert re.findall(r"<script(?![^>]*\bsrc=)", page.text) == [], path
        assert " style=" not in page.text and "<style" not in page.text, path
        for secret in (ADMIN_TOKEN, OPENAI_KEY, ANTHROPIC_KEY):
            assert secret not in page.text, path
    assert client.request("GET", "/ui/app.js").getheader("content-type").startswith("text/javascript")


def test_dashboard_is_off_without_an_admin_token(db):
    fake = FakeUpstream().start()
    gateway = RunningGateway(db.config(base_config(fake.url)), db.db_path)
    try:
        page = Browserless(gateway).request("GET", "/ui/overview")
        assert page.status == 403 and "admin-token" in page.text
    finally:
        gateway.stop()
        fake.stop()


# ---- in Chromium --------------------------------------------------------------------

@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright (pip install playwright) drives "
                                                                 "the browser tests")
    if not os.path.exists(CHROMIUM):
        pytest.skip("no Chromium at %s (apt-get install chromium, or set LLMGW_CHROMIUM)" % CHROMIUM)
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture(scope="module")
def screenshots(tmp_path_factory):
    return tmp_path_factory.mktemp("dashboard-screenshots")


@pytest.fixture
def page(browser, dash):
    context = browser.new_context(viewport={"width": 1280, "height": 860}, base_url=dash.url)
    context.set_default_timeout(10000)
    page = context.new_page()
    page.policy_violations = []
    page.on("console", lambda message: "Content Security Policy" in message.text
            and page.policy_violations.append(message.text))
    page.goto("/ui/overview")
    assert page.url.endswith("/ui/login")
    page.fill("input[name=token]", ADMIN_TOKEN)
    page.click("button:has-text('Log in')")
    page.wait_for_url("**/ui/overview")
    yield page
    context.close()
    assert page.policy_violations == []


def test_overview_charts_the_seeded_usage(page, dash, screenshots):
    charts = page.locator("svg.chart")
    assert charts.count() == 2
    assert page.locator("svg.chart").first.locator("rect").count() >= 2  # alpha's and beta's spend
    legend = page.locator(".legend").first.inner_text()
    assert "alpha" in legend and "beta" in legend
    titles = page.locator("svg.chart").nth(1).locator("rect title").all_text_contents()
    assert sum(int(title.rpartition(": ")[2]) for title in titles if title.startswith("alpha,")) == 2
    page.screenshot(path=str(screenshots / "overview.png"), full_page=True)
    page.click("a.range:has-text('30d')")
    page.wait_for_url("**range=30d**")
    assert page.locator("svg.chart").first.locator("rect").count() >= 2
    page.select_option("select[name=by]", "model")
    page.fill("input[name=since]", time.strftime("%Y-%m-%d", time.gmtime(time.time() - 20 * 86400)))
    page.click("button:has-text('Show')")
    page.wait_for_url("**range=custom**")
    assert "gpt-4o-mini" in page.locator(".legend").first.inner_text()


def test_create_a_key_then_revoke_it(page, dash, screenshots):
    page.click("nav a:has-text('Keys')")
    page.click("summary:has-text('Create a key')")
    page.fill("input[name=project_name]", "browser made")
    page.fill("input[name=max_budget]", "5")
    page.fill("input[name=expires_in]", "30d")
    page.fill("input[name=labels]", "team=ui")
    page.fill("input[name=alert_thresholds]", "50,90")
    page.check("input[name=log_bodies]")
    page.click("form.grid button:has-text('Create')")
    secret = page.locator("#new-key").inner_text()
    assert secret.startswith(llmgw.VIRTUAL_KEY_PREFIX)
    created = [key for key in dash.store.list_keys() if key["project_name"] == "browser made"]
    assert len(created) == 1 and created[0]["max_budget"] == 5 and created[0]["metadata"] == {"team": "ui"}
    assert created[0]["expires_at"] is not None
    assert created[0]["alert_thresholds"] == [50, 90] and created[0]["log_bodies"] is True
    page.screenshot(path=str(screenshots / "keys.png"), full_page=True)
    page.goto("/ui/keys")
    assert secret not in page.content()  # shown once
    row = page.locator("tr", has_text=created[0]["id"])
    assert row.locator("progress").count() == 1
    page.once("dialog", lambda dialog: dialog.accept())
    row.locator("button:has-text('Revoke')").click()
    page.wait_for_url("**done=revoked**")
    assert "revoked" in page.locator("tr", has_text=created[0]["id"]).inner_text()
    assert not key_is_active(dash, created[0]["id"])


def test_filter_the_log_and_open_an_entry(page, dash, screenshots):
    page.click("nav a:has-text('Logs')")
    assert page.locator("tbody tr").count() == 3
    page.fill("input[name=project]", "alpha")
    page.click("button:has-text('Filter')")
    page.wait_for_url("**project=alpha**")
    rows = page.locator("tbody tr")
    assert rows.count() == 2
    assert all("alpha" in text and "beta" not in text for text in rows.all_inner_texts())
    rows.first.locator("a").click()
    panel = page.locator("aside.detail")
    assert "gpt-4o-mini" in panel.inner_text() and "first_byte_ms" in panel.inner_text()
    page.screenshot(path=str(screenshots / "logs.png"), full_page=True)
    page.click("nav a:has-text('Prices')")
    assert "gpt-4o-mini" in page.locator("table").inner_text()
    page.screenshot(path=str(screenshots / "prices.png"))


def test_log_out(page, dash):
    page.click("nav button:has-text('Log out')")
    page.wait_for_url("**/ui/login")
    page.goto("/ui/keys")
    assert page.url.endswith("/ui/login")


def test_screenshots_are_kept(screenshots):
    """Run last: every page was photographed (README's images come from here)."""
    names = sorted(os.listdir(screenshots))
    if not names:
        pytest.skip("the browser tests did not run")
    assert names == ["keys.png", "logs.png", "overview.png", "prices.png"]
    target = os.environ.get("LLMGW_SCREENSHOTS_DIR")
    if target:
        for name in names:
            shutil.copy(screenshots / name, os.path.join(target, name))
