"""The admin API (/admin/*) and /health, over real sockets to the real gateway.

Admin routes authenticate with ``Authorization: Bearer <admin token>``: the
LLMGW_ADMIN_TOKEN environment variable, else the token whose hash
``cli.py init`` / ``cli.py admin-token`` stored in the database.
"""

import base64
import datetime
import hashlib
import json
import re

import pytest

from conftest import (ADMIN_TOKEN, ANTHROPIC_KEY, OPENAI_KEY, admin, call, cli_env, post, query, reported_tokens,
                      run_cli, two_projects_usage, wait_until)

import cli
import llmgw

CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
ADMIN_ROUTES = [
    ("GET", "/admin/virtual-keys", None),
    ("POST", "/admin/virtual-keys", {"project_name": "p"}),
    ("DELETE", "/admin/virtual-keys/vk_000000000000", None),
    ("GET", "/admin/usage-stats", None),
    ("GET", "/admin/usage-stats?by=project", None),
    ("GET", "/admin", None),
    ("GET", "/admin/no-such-route", None),
]
INVALID_ADMIN_TOKEN = {"error": {"message": "Admin routes need Authorization: Bearer <admin token>",
                                 "type": "authentication_error", "param": None, "code": "invalid_admin_token"}}

pytestmark = pytest.mark.usefixtures("clean_environment")


@pytest.fixture
def admin_gateway(make_gateway):
    """A gateway whose admin token comes from LLMGW_ADMIN_TOKEN."""
    return make_gateway(environ={"LLMGW_ADMIN_TOKEN": ADMIN_TOKEN})


# ---- /health -------------------------------------------------------------------

@pytest.mark.parametrize("environ", [{}, {"LLMGW_ADMIN_TOKEN": ADMIN_TOKEN}])
def test_health_needs_no_auth(make_gateway, environ):
    gateway = make_gateway(environ=environ)
    reply = call(gateway, "GET", "/health")
    assert reply.status == 200
    assert reply.header("content-type") == "application/json"
    assert reply.json() == {"status": "ok", "version": llmgw.__version__}


# ---- off unless a token is configured ----------------------------------------------

@pytest.mark.parametrize("token", [None, ADMIN_TOKEN, "llmgw-admin-guess"])
def test_admin_api_is_off_without_a_token(gateway, token):
    for method, path, body in ADMIN_ROUTES:
        reply = admin(gateway, method, path, body, token=token)
        assert reply.status == 403, (method, path)
        assert reply.header("content-type") == "application/json"
        error = reply.json()["error"]
        assert (error["type"], error["code"], error["param"]) == ("permission_error", "admin_disabled", None)
        assert "LLMGW_ADMIN_TOKEN" in error["message"]
        assert "python cli.py admin-token" in error["message"]
    assert gateway.store.list_keys() == []


# ---- authentication ------------------------------------------------------------------

BAD_CREDENTIALS = {
    "missing": {},
    "wrong token": {"Authorization": "Bearer llmgw-admin-wrong-0123456789"},
    "empty bearer": {"Authorization": "Bearer "},
    "basic with the token": {"Authorization": "Basic " + ADMIN_TOKEN},
    "basic base64": {"Authorization": "Basic " + base64.b64encode(("admin:" + ADMIN_TOKEN).encode()).decode()},
    "no scheme": {"Authorization": ADMIN_TOKEN},
    "token with a suffix": {"Authorization": "Bearer " + ADMIN_TOKEN + "x"},
    "token prefix": {"Authorization": "Bearer " + ADMIN_TOKEN[:-1]},
    "x-api-key": {"x-api-key": ADMIN_TOKEN},
}


@pytest.mark.parametrize("credential", sorted(BAD_CREDENTIALS))
def test_admin_rejects_bad_credentials(admin_gateway, credential):
    for method, path, body in ADMIN_ROUTES:
        reply = call(admin_gateway, method, path, body, headers=BAD_CREDENTIALS[credential])
        assert reply.status == 401, (method, path)
        assert reply.header("content-type") == "application/json"
        assert reply.json() == INVALID_ADMIN_TOKEN
    assert admin_gateway.store.list_keys() == []


def test_admin_token_in_query_string_is_refused(admin_gateway):
    for parameter in ("token", "admin_token", "access_token", "key", "api_key", "authorization"):
        for path in ("/admin/virtual-keys", "/admin/usage-stats"):
            reply = call(admin_gateway, "GET", "%s?%s=%s" % (path, parameter, ADMIN_TOKEN))
            assert (reply.status, reply.json()) == (401, INVALID_ADMIN_TOKEN), (parameter, path)
        reply = call(admin_gateway, "POST", "/admin/virtual-keys?%s=%s" % (parameter, ADMIN_TOKEN),
                     {"project_name": "p"})
        assert reply.status == 401
    assert admin_gateway.store.list_keys() == []


def test_virtual_key_is_not_an_admin_token(admin_gateway):
    record, secret = admin_gateway.create_key("not an admin")
    for headers in ({"Authorization": "Bearer " + secret}, {"x-api-key": secret}):
        reply = call(admin_gateway, "GET", "/admin/virtual-keys", headers=headers)
        assert (reply.status, reply.json()) == (401, INVALID_ADMIN_TOKEN)
        reply = call(admin_gateway, "DELETE", "/admin/virtual-keys/" + record["id"], headers=headers)
        assert (reply.status, reply.json()) == (401, INVALID_ADMIN_TOKEN)
    assert admin_gateway.store.get_key(record["id"])["is_active"] is True


def test_admin_token_is_not_a_virtual_key(admin_gateway, upstream):
    reply = post(admin_gateway, "/v1/chat/completions", CHAT, key=ADMIN_TOKEN)
    assert reply.status == 401
    assert upstream.requests == []


def test_bearer_scheme_is_case_insensitive(admin_gateway):
    reply = call(admin_gateway, "GET", "/admin/virtual-keys", headers={"Authorization": "bearer " + ADMIN_TOKEN})
    assert reply.status == 200


# ---- virtual keys ---------------------------------------------------------------------

def test_create_list_revoke_virtual_key(admin_gateway, upstream):
    reply = admin(admin_gateway, "POST", "/admin/virtual-keys", {"project_name": "Search", "tier": "premium"})
    assert reply.status == 201
    assert reply.header("content-type") == "application/json"
    created = reply.json()
    assert set(created) >= {"id", "key", "project_name", "created_at", "is_active", "tier"}
    assert (created["project_name"], created["tier"], created["is_active"]) == ("Search", "premium", True)
    assert re.match(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z$", created["created_at"])
    secret = created["key"]
    assert secret.startswith(llmgw.VIRTUAL_KEY_PREFIX) and len(secret) >= 40
    assert "key_hash" not in created

    # The key works at once, and the provider sees the gateway's key, not it.
    chat = post(admin_gateway, "/v1/chat/completions", CHAT, key=secret)
    assert chat.status == 200
    assert upstream.requests[-1]["headers"]["authorization"] == "Bearer " + OPENAI_KEY
    rows = admin_gateway.wait_for_rows()
    assert [(r["virtual_key_id"], r["status"]) for r in rows] == [(created["id"], "ok")]

    listing = admin(admin_gateway, "GET", "/admin/virtual-keys")
    assert listing.status == 200
    keys = listing.json()["data"]
    assert [(k["id"], k["project_name"], k["tier"], k["is_active"]) for k in keys] == [
        (created["id"], "Search", "premium", True)]
    assert keys[0]["last_used_at"] is not None
    for entry in keys:
        assert "key" not in entry and "key_hash" not in entry
    assert secret not in listing.body.decode()
    assert secret[len(llmgw.VIRTUAL_KEY_PREFIX):-4] not in listing.body.decode()
    assert hashlib.sha256(secret.encode()).hexdigest() not in listing.body.decode()

    revoked = admin(admin_gateway, "DELETE", "/admin/virtual-keys/" + created["id"])
    assert revoked.status == 200
    body = revoked.json()
    assert (body["id"], body["is_active"], body["revoked"]) == (created["id"], False, True)
    assert secret not in revoked.body.decode()
    requests_before = len(upstream.requests)
    denied = post(admin_gateway, "/v1/chat/completions", CHAT, key=secret)
    assert denied.status == 401
    assert denied.json()["error"]["type"] == "authentication_error"
    assert len(upstream.requests) == requests_before
    assert [k["is_active"] for k in admin(admin_gateway, "GET", "/admin/virtual-keys").json()["data"]] == [False]


def test_create_with_defaults_and_rpm(admin_gateway):
    created = admin(admin_gateway, "POST", "/admin/virtual-keys", {"project_name": "Plain"}).json()
    assert (created["tier"], created["rpm"]) == ("default", None)
    limited = admin(admin_gateway, "POST", "/admin/virtual-keys", {"project_name": "Slow", "rpm": 3})
    assert limited.status == 201
    assert limited.json()["rpm"] == 3


def test_revoke_unknown_id(admin_gateway):
    reply = admin(admin_gateway, "DELETE", "/admin/virtual-keys/vk_doesnotexist")
    assert reply.status == 404
    error = reply.json()["error"]
    assert (error["type"], error["code"]) == ("not_found_error", "not_found")


BAD_BODIES = {
    "not json": b"{project_name: x}",
    "json array": b'["project_name"]',
    "empty object": b"{}",
    "missing project_name": b'{"tier": "default"}',
    "null project_name": b'{"project_name": null}',
    "numeric project_name": b'{"project_name": 42}',
    "blank project_name": b'{"project_name": "   "}',
    "unknown tier": b'{"project_name": "p", "tier": "gold"}',
    "unknown field": b'{"project_name": "p", "is_admin": true}',
    "key supplied": b'{"project_name": "p", "key": "llmgw-chosen-by-client-0123456789"}',
    "zero rpm": b'{"project_name": "p", "rpm": 0}',
    "string rpm": b'{"project_name": "p", "rpm": "5"}',
    "bool rpm": b'{"project_name": "p", "rpm": true}',
    "duplicate keys": b'{"project_name": "p", "project_name": "q"}',
}


def test_create_rejects_bad_bodies(admin_gateway):
    for name, raw in sorted(BAD_BODIES.items()):
        reply = admin(admin_gateway, "POST", "/admin/virtual-keys", raw_body=raw)
        assert reply.status == 400, name
        error = reply.json()["error"]
        assert (error["type"], error["code"]) == ("invalid_request_error", "invalid_request"), name
    assert admin_gateway.store.list_keys() == []


def test_create_requires_json_content_type(admin_gateway):
    reply = admin(admin_gateway, "POST", "/admin/virtual-keys", raw_body=b'{"project_name": "p"}',
                  headers={"Content-Type": "text/plain"})
    assert reply.status == 415
    assert admin_gateway.store.list_keys() == []


def test_other_methods_and_routes(admin_gateway):
    for method, path, status in [
        ("PUT", "/admin/virtual-keys", 405),
        ("DELETE", "/admin/virtual-keys", 405),
        ("GET", "/admin/virtual-keys/vk_x", 404),
        ("PUT", "/admin/virtual-keys/vk_x", 405),
        ("GET", "/admin/virtual-keys/vk_x/rotate", 405),
        ("POST", "/admin/usage-stats", 405),
        ("GET", "/admin/nothing-here", 404),
        ("GET", "/admin/virtual-keys/a/b", 404),
    ]:
        reply = admin(admin_gateway, method, path)
        assert reply.status == status, (method, path)
        assert reply.json()["error"]["type"] == llmgw.ERROR_TYPES[status]


# ---- usage stats ---------------------------------------------------------------------------

@pytest.fixture
def usage(admin_gateway, upstream):
    """alpha: two OpenAI calls; beta: one Anthropic call; all through the gateway."""
    alpha, beta = two_projects_usage(admin_gateway)
    day = datetime.datetime.fromtimestamp(admin_gateway.rows()[0]["started_at"], datetime.timezone.utc).date()
    return {"alpha": alpha, "beta": beta, "tokens": [reported_tokens(e) for e in upstream.reported],
            "day": day.isoformat(), "before": (day - datetime.timedelta(days=1)).isoformat(),
            "after": (day + datetime.timedelta(days=1)).isoformat()}


def test_usage_stats_totals(admin_gateway, usage):
    (a1_in, a1_out), (a2_in, a2_out), (b_in, b_out) = usage["tokens"]
    reply = admin(admin_gateway, "GET", "/admin/usage-stats")
    assert reply.status == 200
    rows = {row["virtual_key_id"]: row for row in reply.json()}
    alpha, beta = rows[usage["alpha"]["id"]], rows[usage["beta"]["id"]]
    assert len(rows) == 2
    fields = ("project_name", "requests", "errors", "request_tokens", "response_tokens")
    assert tuple(alpha[f] for f in fields) == ("alpha", 2, 0, a1_in + a2_in, a1_out + a2_out)
    assert tuple(beta[f] for f in fields) == ("beta", 1, 0, b_in, b_out)
    # gpt-4o-mini 0.15/0.6, claude-haiku-4-5 1/5 USD per million tokens
    assert alpha["estimated_cost"] == round(((a1_in + a2_in) * 150 + (a1_out + a2_out) * 600) / 1e9, 9)
    assert beta["estimated_cost"] == round((b_in * 1000 + b_out * 5000) / 1e9, 9)


STATS_QUERIES = [
    ({}, []),
    ({"by": "project"}, ["--by", "project"]),
    ({"by": "model"}, ["--by", "model"]),
    ({"by": "provider"}, ["--by", "provider"]),
    ({"by": "day"}, ["--by", "day"]),
    ({"by": "key"}, ["--by", "key"]),
    ({"project": "beta"}, ["--project", "beta"]),
    ({"project": "nobody"}, ["--project", "nobody"]),
    ({"by": "model", "since": "DAY", "until": "DAY"}, ["--by", "model", "--since", "DAY", "--until", "DAY"]),
    ({"since": "AFTER"}, ["--since", "AFTER"]),
    ({"until": "BEFORE"}, ["--until", "BEFORE"]),
    ({"by": "project", "since": "BEFORE", "until": "AFTER", "project": "alpha"},
     ["--by", "project", "--since", "BEFORE", "--until", "AFTER", "--project", "alpha"]),
]


def test_usage_stats_match_the_cli(admin_gateway, usage, capsys, monkeypatch, tmp_path):
    dates = {"DAY": usage["day"], "BEFORE": usage["before"], "AFTER": usage["after"]}
    for name, value in cli_env(admin_gateway, tmp_path).items():
        monkeypatch.setenv(name, value)
    sizes = []
    for parameters, argv in STATS_QUERIES:
        parameters = {name: dates.get(value, value) for name, value in parameters.items()}
        argv = [dates.get(arg, arg) for arg in argv]
        path = "/admin/usage-stats" + ("?" + "&".join("%s=%s" % item for item in parameters.items())
                                       if parameters else "")
        reply = admin(admin_gateway, "GET", path)
        assert reply.status == 200, path
        assert cli.main(["stats", "--output", "json"] + argv) == 0
        assert reply.json() == json.loads(capsys.readouterr().out), path
        sizes.append(len(reply.json()))
    # key, project, model, provider, day, key, beta, nobody, one day, after, before, alpha in range
    assert sizes == [2, 2, 2, 2, 1, 2, 1, 0, 2, 0, 0, 1]


def test_usage_stats_match_the_cli_process(admin_gateway, usage, tmp_path):
    reply = admin(admin_gateway, "GET", "/admin/usage-stats")
    result = run_cli(["stats", "--output", "json"], tmp_path, cli_env(admin_gateway, tmp_path), check=True)
    assert reply.json() == json.loads(result.stdout)
    assert len(reply.json()) == 2


@pytest.mark.parametrize("query, fragment", [
    ("by=colour", "colour"),
    ("since=yesterday", "yesterday"),
    ("until=2026-13-45", "2026-13-45"),
])
def test_usage_stats_bad_query(admin_gateway, query, fragment):
    reply = admin(admin_gateway, "GET", "/admin/usage-stats?" + query)
    assert reply.status == 400
    error = reply.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert fragment in error["message"]


def test_usage_stats_empty(admin_gateway):
    reply = admin(admin_gateway, "GET", "/admin/usage-stats")
    assert (reply.status, reply.json()) == (200, [])


# ---- the admin token's life cycle ----------------------------------------------------------

def test_issued_token_works_and_rotation_retires_the_old_one(gateway, tmp_path):
    first = llmgw.issue_admin_token(gateway.store)
    assert admin(gateway, "GET", "/admin/virtual-keys", token=first).status == 200

    result = run_cli(["admin-token"], tmp_path, cli_env(gateway, tmp_path), check=True)
    second = re.findall(r"^Admin token: (\S+)$", result.stdout, re.M)
    assert len(second) == 1 and second[0] != first
    second = second[0]
    assert wait_until(lambda: admin(gateway, "GET", "/admin/virtual-keys", token=second).status == 200, timeout=1.0)
    reply = admin(gateway, "GET", "/admin/virtual-keys", token=first)
    assert (reply.status, reply.json()) == (401, INVALID_ADMIN_TOKEN)


def test_token_printed_by_init_turns_the_api_on(gateway, tmp_path):
    assert admin(gateway, "GET", "/admin/virtual-keys").status == 403
    result = run_cli(["init"], tmp_path, cli_env(gateway, tmp_path), check=True)
    token = re.findall(r"^Admin token: (\S+)$", result.stdout, re.M)[0]
    assert wait_until(lambda: admin(gateway, "GET", "/admin/virtual-keys", token=token).status == 200, timeout=1.0)


def test_environment_token_takes_precedence(admin_gateway):
    stored = llmgw.issue_admin_token(admin_gateway.store)
    reply = admin(admin_gateway, "GET", "/admin/virtual-keys", token=stored)
    assert (reply.status, reply.json()) == (401, INVALID_ADMIN_TOKEN)
    assert admin(admin_gateway, "GET", "/admin/virtual-keys").status == 200


# ---- nothing secret comes back ------------------------------------------------------------------

def test_no_admin_response_leaks_secrets(admin_gateway, upstream):
    admin_gateway.store.set_provider_key("openai", "sk-DB-CANARY-0123456789abcdef")
    bodies = []

    def record(reply):
        bodies.append(reply.body.decode("utf-8"))
        return reply

    created = record(admin(admin_gateway, "POST", "/admin/virtual-keys", {"project_name": "leaky"})).json()
    _, other_secret = admin_gateway.create_key("other")
    assert post(admin_gateway, "/v1/chat/completions", CHAT, key=created["key"]).status == 200
    assert post(admin_gateway, "/v1/messages", {"model": "claude-haiku-4-5", "max_tokens": 5,
                                                "messages": [{"role": "user", "content": "x"}]},
                key=other_secret).status == 200
    for method, path, body in [("GET", "/admin/virtual-keys", None),
                               ("GET", "/admin/usage-stats", None),
                               ("GET", "/admin/usage-stats?by=provider", None),
                               ("GET", "/admin/usage-stats?by=model", None),
                               ("POST", "/admin/virtual-keys", {"project_name": "p", "tier": "gold"}),
                               ("DELETE", "/admin/virtual-keys/" + created["id"], None),
                               ("DELETE", "/admin/virtual-keys/vk_missing", None),
                               ("GET", "/admin/virtual-keys", None),
                               ("GET", "/admin/elsewhere", None)]:
        record(admin(admin_gateway, method, path, body))
    record(call(admin_gateway, "GET", "/admin/virtual-keys", key="llmgw-admin-wrong"))

    hashes = [row[0] for row in query(admin_gateway, "SELECT key_hash FROM virtual_keys")]
    assert len(hashes) == 2
    secrets_ = [OPENAI_KEY, ANTHROPIC_KEY, "sk-DB-CANARY-0123456789abcdef", ADMIN_TOKEN, other_secret,
                hashlib.sha256(ADMIN_TOKEN.encode()).hexdigest()] + hashes
    everything = "\n".join(bodies)
    assert created["key"] in bodies[0]  # shown once, at creation
    for secret in secrets_:
        assert secret not in everything
    assert created["key"] not in "\n".join(bodies[1:])
