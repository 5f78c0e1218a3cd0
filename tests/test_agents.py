"""Coding agents (issue 13): what Claude Code, Codex and the like call
besides the metered endpoints, and how the gateway answers it.

Every test runs the real gateway against tests/fake_upstream.py over
sockets and reads the usage rows back from the database file.
"""

import concurrent.futures
import json
import os
import shutil
import sqlite3

import pytest

from conftest import (ADMIN_TOKEN, ANTHROPIC_KEY, CHAT, COUNT_TOKENS, MESSAGES, MODELS, OPENAI_KEY, RESPONSES,
                      RawClient, admin, assert_json_error, assert_still_serving, body_for, call, json_request, post,
                      query, request_bytes, settled_rows, sse_events)
from test_operations import SCHEMAS, make_fixture

import llmgw

pytestmark = pytest.mark.usefixtures("balanced_books")

#: What Codex sends first (RFC 6455 section 4.1), the key included.
WEBSOCKET_HEADERS = {"Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Version": "13",
                     "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="}


# ---- the Responses API over WebSocket ------------------------------------------

@pytest.mark.parametrize("upgrade", ["websocket", "WebSocket", "h2c, websocket"])
def test_a_websocket_upgrade_is_answered_426_at_once(gateway, vkey, upstream, upgrade):
    """Codex falls back to HTTP on a 426; a 404 or 405 made it try seven
    times (6.5 s per session)."""
    response = call(gateway, "GET", RESPONSES, key=vkey, headers=dict(WEBSOCKET_HEADERS, Upgrade=upgrade))
    assert_json_error(response, 426, "openai", code="websocket_not_supported", error_type="invalid_request_error")
    assert response.header("upgrade") == "HTTP/1.1"
    assert upstream.requests == [] and gateway.rows() == []
    assert_still_serving(gateway, vkey, upstream)


def test_the_426_leaves_the_connection_serving(gateway, vkey, upstream):
    client = RawClient(gateway)
    try:
        client.send(request_bytes("GET", RESPONSES, [("Authorization", "Bearer " + vkey)]
                                  + list(WEBSOCKET_HEADERS.items())))
        assert client.read_response().status == 426
        client.send(json_request(RESPONSES, vkey, body_for(RESPONSES)))
        assert client.read_response().status == 200
    finally:
        client.close()


def test_only_a_websocket_handshake_is_refused(gateway, vkey, upstream):
    assert_json_error(call(gateway, "GET", RESPONSES, key=vkey), 405, "openai")
    assert_json_error(call(gateway, "GET", CHAT, key=vkey, headers={"Upgrade": "h2c"}), 405, "openai")
    without_connection = dict(WEBSOCKET_HEADERS, Connection="keep-alive")
    assert_json_error(call(gateway, "GET", RESPONSES, key=vkey, headers=without_connection), 405, "openai")
    assert upstream.requests == []
    # On a POST an Upgrade is ignored, as HTTP allows (test_framing's hop-by-hop headers).
    assert post(gateway, RESPONSES, body_for(RESPONSES), vkey, headers=WEBSOCKET_HEADERS).status == 200


# ---- calls that cost nothing: outside RPM, counted apart -------------------------

def test_count_tokens_bursts_do_not_count_against_rpm(gateway, upstream):
    """Claude Code's /context sends 14 count_tokens at once; on a 10 rpm
    key they took 76 s when each counted as a request."""
    key = gateway.create_key("claude code", rpm=2)[1]
    body = {"model": "claude-haiku-4-5", "messages": [{"role": "user", "content": "what fills my context?"}]}
    with concurrent.futures.ThreadPoolExecutor(14) as pool:
        replies = list(pool.map(lambda _: post(gateway, COUNT_TOKENS, body, key), range(14)))
    assert [reply.status for reply in replies] == [200] * 14
    for path in (MODELS, MODELS + "/gpt-4o-mini"):
        assert call(gateway, "GET", path, key=key).status == 200
    assert post(gateway, "/v1/responses/input_tokens", {"input": "hi"}, key).status == 200
    assert post(gateway, "/v1/moderations", {"input": "hi"}, key).status == 200
    # The key's two billable requests a minute are all still there.
    assert post(gateway, MESSAGES, body_for(MESSAGES, "claude-haiku-4-5"), key).status == 200
    assert post(gateway, CHAT, body_for(CHAT), key).status == 200
    assert_json_error(post(gateway, CHAT, body_for(CHAT), key), 429, "openai", code="rate_limit_exceeded")
    assert len(upstream.requests) == 20


def test_stats_count_other_calls_apart_from_requests(make_gateway, upstream, cli_main, tmp_path, db):
    gateway = make_gateway(environ={"LLMGW_ADMIN_TOKEN": ADMIN_TOKEN})
    db.write_config(tmp_path / "config.yaml")  # the CLI's, naming the gateway's database
    record, key = gateway.create_key("agents")
    for path in (CHAT, RESPONSES, MESSAGES):
        assert post(gateway, path, body_for(path, "claude-haiku-4-5" if path == MESSAGES else "gpt-4o-mini"),
                    key).status == 200
    for _ in range(3):
        assert post(gateway, COUNT_TOKENS, body_for(COUNT_TOKENS, "claude-haiku-4-5"), key).status == 200
    for path in (MODELS, MODELS + "/gpt-4o"):
        assert call(gateway, "GET", path, key=key).status == 200
    assert post(gateway, "/v1/moderations", {"input": "hi"}, key).status == 200
    rows = settled_rows(gateway, 9)
    assert sorted(row["endpoint"] for row in rows) == sorted(
        [CHAT, RESPONSES, MESSAGES] + [COUNT_TOKENS] * 3 + [MODELS, "/v1/models/{model}", "/v1/moderations"])
    expected = {"requests": 3, "other_calls": 6, "attempts": 9, "errors": 0}

    stats = admin(gateway, "GET", "/admin/usage-stats").json()
    assert [{name: row[name] for name in expected} for row in stats] == [expected]
    by_model = admin(gateway, "GET", "/admin/usage-stats?by=model").json()
    assert sum(row["other_calls"] for row in by_model) == 6
    assert sum(row["requests"] for row in by_model) == 3
    csv_lines = admin(gateway, "GET", "/admin/usage-stats?format=csv").body.decode().splitlines()
    header = csv_lines[0].split(",")
    values = dict(zip(header, csv_lines[1].split(",")))
    assert (values["requests"], values["other_calls"]) == ("3", "6")

    assert json.loads(cli_main("stats", "--output", "json", check=True).stdout)[0]["other_calls"] == 6
    csv_out = cli_main("stats", "--output", "csv", check=True).stdout.splitlines()
    assert dict(zip(csv_out[0].split(","), csv_out[1].split(",")))["other_calls"] == "6"
    table = cli_main("stats", check=True).stdout.splitlines()
    assert "OTHER CALLS" in table[0]
    assert table[1].split()[:4] == [record["id"], "agents", "3", "6"]  # KEY ID, PROJECT, REQUESTS, OTHER CALLS


# ---- endpoints agents call besides the metered ones ------------------------------

def test_model_retrieval_answers_in_the_shape_asked_for(make_gateway, upstream):
    gateway = make_gateway(models={"fast": ["openai/gpt-4o-mini", "anthropic/claude-haiku-4-5"]})
    key = gateway.create_key()[1]
    reply = call(gateway, "GET", MODELS + "/gpt-4o", key=key)
    assert reply.status == 200 and reply.json()["id"] == "gpt-4o" and reply.json()["object"] == "model"
    assert (upstream.requests[-1]["path"], upstream.requests[-1]["headers"]["authorization"]) == (
        MODELS + "/gpt-4o", "Bearer " + OPENAI_KEY)
    for path in (MODELS + "/openai/gpt-4o-mini", MODELS + "/openai%2Fgpt-4o-mini"):  # the SDKs send %2F
        reply = call(gateway, "GET", path, key=key)  # a provider prefix is stripped
        assert reply.status == 200 and upstream.requests[-1]["path"] == MODELS + "/gpt-4o-mini"
    reply = call(gateway, "GET", MODELS + "/claude-haiku-4-5", key=key, headers={"anthropic-version": "2023-06-01"})
    assert reply.status == 200 and reply.json()["type"] == "model" and reply.json()["id"] == "claude-haiku-4-5"
    assert upstream.requests[-1]["headers"]["x-api-key"] == ANTHROPIC_KEY
    forwarded = len(upstream.requests)
    # An alias is answered by the gateway, in either shape.
    assert call(gateway, "GET", MODELS + "/fast", key=key).json() == {
        "id": "fast", "object": "model", "created": 0, "owned_by": "llmgw"}
    assert call(gateway, "GET", MODELS + "/fast", key=key, headers={"anthropic-version": "2023-06-01"}).json() == {
        "type": "model", "id": "fast", "display_name": "fast", "created_at": "1970-01-01T00:00:00Z"}
    assert len(upstream.requests) == forwarded
    rows = settled_rows(gateway, 4)
    assert [(row["endpoint"], row["model"], row["request_tokens"], row["cost_nanousd"]) for row in rows] == [
        ("/v1/models/{model}", "gpt-4o", 0, 0)] + [("/v1/models/{model}", "openai/gpt-4o-mini", 0, 0)] * 2 + [
        ("/v1/models/{model}", "claude-haiku-4-5", 0, 0)]


def test_model_retrieval_keeps_to_the_key_allowlist(gateway, upstream):
    key = gateway.create_key(models=["gpt-4o-mini"])[1]
    assert call(gateway, "GET", MODELS + "/gpt-4o-mini", key=key).status == 200
    assert_json_error(call(gateway, "GET", MODELS + "/gpt-4o", key=key), 403, "openai", code="model_not_allowed")
    assert len(upstream.requests) == 1


@pytest.mark.parametrize("path", [MODELS + "/", MODELS + "/..", MODELS + "/a/..", MODELS + "/a%2F..",
                                  MODELS + "/a/b/c/d/e", MODELS + "/a%20b",
                                  RESPONSES + "/", RESPONSES + "/resp_1/", RESPONSES + "/resp_1/items",
                                  RESPONSES + "/resp.1"])
def test_malformed_ids_are_unknown_paths(gateway, vkey, upstream, path):
    assert_json_error(call(gateway, "GET", path, key=vkey), 404, "openai", code="not_found")
    assert upstream.requests == []


RETRIEVALS = [("GET", "", "response"), ("GET", "/input_items", "list"), ("POST", "/cancel", "response"),
              ("DELETE", "", "response.deleted")]


def test_response_retrievals_go_to_the_deployment_that_made_it(make_gateway, upstream):
    """Responses live with the provider key (deployment) that made them:
    a retrieval sent with another key would find nothing."""
    gateway = make_gateway(providers={"openai": {"base_url": upstream.url, "api_key": OPENAI_KEY,
                                                 "api_keys": ["${KEY_B}"]}},
                           routing={"affinity": "none"}, environ={"KEY_B": "sk-b-0123456789abcdef"})
    key = gateway.create_key()[1]
    made = {}
    for number in range(8):
        body = body_for(RESPONSES, stream=number % 2 == 1)
        reply = post(gateway, RESPONSES, body, key)
        assert reply.status == 200
        response_id = (reply.json()["id"] if number % 2 == 0 else
                       json.loads(dict(sse_events(reply.body))["response.created"])["response"]["id"])
        made[response_id] = upstream.requests[-1]["headers"]["authorization"]
    assert len(set(made.values())) == 2, "both deployments made responses"
    for response_id, authorization in made.items():
        for method, suffix, kind in RETRIEVALS:
            reply = call(gateway, method, "%s/%s%s" % (RESPONSES, response_id, suffix), key=key)
            assert reply.status == 200 and reply.json()["object"] == kind, reply
            sent = upstream.requests[-1]
            assert (sent["method"], sent["path"]) == (method, "%s/%s%s" % (RESPONSES, response_id, suffix))
            assert sent["headers"]["authorization"] == authorization
    rows = settled_rows(gateway, 8 + 8 * len(RETRIEVALS))
    created = {row["response_id"]: row for row in rows if row["endpoint"] == RESPONSES}
    assert set(created) == set(made)
    for row in rows:
        if row["endpoint"] != RESPONSES:
            assert row["endpoint"].startswith("/v1/responses/{response_id}")
            assert (row["request_tokens"], row["response_tokens"], row["cost_nanousd"]) == (0, 0, 0)
    assert sum(row["response_id"] is not None for row in rows) == 8


def test_a_response_of_another_key_or_gateway_is_not_found(gateway, upstream):
    maker, other = gateway.create_key("maker")[1], gateway.create_key("other")[1]
    response_id = post(gateway, RESPONSES, body_for(RESPONSES), maker).json()["id"]
    for target in ("%s/%s" % (RESPONSES, response_id), "%s/resp_never_made" % RESPONSES):
        for method, suffix, _ in RETRIEVALS:
            reply = call(gateway, method, target + suffix, key=other if response_id in target else maker)
            assert_json_error(reply, 404, "openai", code="response_not_found")
            assert vkey_free(reply)
    assert len(upstream.requests) == 1


def vkey_free(reply):
    return b"llmgw-" not in reply.body


def test_input_tokens_and_moderations_are_forwarded_free(make_gateway, upstream):
    gateway = make_gateway()
    record, key = gateway.create_key(max_budget=0.000001)
    reply = post(gateway, "/v1/responses/input_tokens", {"model": "gpt-4o", "input": "how long is this?"}, key)
    assert reply.status == 200 and reply.json()["object"] == "response.input_tokens"
    reply = post(gateway, "/v1/moderations", {"input": "is this fine?"}, key)  # no model: the default provider
    assert reply.status == 200 and reply.json()["results"][0]["flagged"] is False
    assert [request["path"] for request in upstream.requests] == ["/v1/responses/input_tokens", "/v1/moderations"]
    rows = settled_rows(gateway, 2)
    assert [(row["endpoint"], row["model"], row["request_tokens"], row["cost_nanousd"], row["reserved_nanousd"])
            for row in rows] == [("/v1/responses/input_tokens", "gpt-4o", 0, 0, 0), ("/v1/moderations", None, 0, 0, 0)]


@pytest.mark.sqlite_only("migrates a schema 8 fixture, a SQLite file (tests/schemas)")
def test_schema_9_moves_the_free_calls_out_of_requests(tmp_path, make_gateway):
    """Before schema 9 a count_tokens call counted among a rollup's
    requests; migrated, it is an other call, as if rolled up today."""
    fixture = next(name for name in os.listdir(SCHEMAS) if name.startswith("v8-"))
    path = str(tmp_path / "gateway.db")
    shutil.copy(os.path.join(SCHEMAS, fixture), path)
    conn = sqlite3.connect(path)
    with conn:
        started = conn.execute("SELECT started_at FROM usage WHERE request_id = 'req-fixture-1'").fetchone()[0]
        conn.execute("INSERT INTO usage (request_id, virtual_key_id, provider, endpoint, model, streamed, status,"
                     " started_at, finished_at) VALUES ('req-count', ?, 'openai', ?, 'gpt-4o-mini', 0, 'ok', ?, ?)",
                     (make_fixture.KEY_ID, COUNT_TOKENS, started + 0.5, started + 0.6))
        for table in ("usage_weeks", "usage_days", "usage_hours", "usage_totals"):  # as schema 8 rolled it up
            assert conn.execute("UPDATE %s SET requests = requests + 1, attempts = attempts + 1 WHERE model = "
                                "'gpt-4o-mini'" % table).rowcount == 1
    conn.close()
    gateway = make_gateway()  # opening migrates
    rolled = {table: query(path, "SELECT model, requests, other_calls, attempts FROM %s ORDER BY model" % table)
              for table in ("usage_weeks", "usage_days", "usage_hours", "usage_totals")}
    assert set(map(tuple, rolled.values())) == {(("claude-haiku-4-5", 1, 0, 1), ("gpt-4o-mini", 1, 1, 2))}
    [stats] = llmgw.usage_stats(gateway.store)
    assert (stats["requests"], stats["other_calls"], stats["attempts"]) == (2, 1, 3)
    # Opening again changes nothing (the step ran once).
    gateway.stop()
    make_gateway()
    assert query(path, "SELECT requests, other_calls FROM usage_totals WHERE model = 'gpt-4o-mini'") == [(1, 1)]


def test_the_free_endpoints_are_the_routes_that_meter_nothing():
    """Usage rows of NON_BILLABLE_ENDPOINTS count as other_calls: the same
    endpoints as the routes without a usage parser (key info has no rows)."""
    free = {template for template, route in llmgw.ROUTES.items()
            if route.usage_parser is None and route is not llmgw.KEY_INFO_ROUTE}
    assert free == set(llmgw.NON_BILLABLE_ENDPOINTS)
