"""Bodies kept for keys that opt in (``log_bodies``, ``--log-bodies``): the
request and the answer, each cut at BODY_LOG_BYTES, shown only in a single
log entry (``GET /admin/logs/{id}``, ``cli.py logs --id N --bodies``), never
in a list or an export, pruned after ``logging.body_retention_days``; no
header, virtual key or provider key is ever stored with them.
"""

import json

import pytest

from conftest import (ADMIN_TOKEN, ANTHROPIC_KEY, CHAT, MESSAGES, OPENAI_KEY, admin, base_config, call, post, query,
                      stored_bytes, wait_idle, wait_until)

import llmgw

pytestmark = pytest.mark.usefixtures("clean_environment")

ADMIN_ENV = {"LLMGW_ADMIN_TOKEN": ADMIN_TOKEN}


def chat(text, stream=False):
    return {"model": "gpt-4o-mini", "stream": stream, "messages": [{"role": "user", "content": text}]}


def entry(gateway, row_id):
    reply = admin(gateway, "GET", "/admin/logs/%d" % row_id)
    assert reply.status == 200, reply.body
    return reply.json()


def row_id_of(gateway, reply):
    rows = [row for row in gateway.rows() if row["request_id"] == reply.header("x-llmgw-request-id")]
    assert len(rows) == 1, rows
    return rows[0]["id"]


def test_bodies_are_kept_for_opted_in_keys_and_shown_only_one_entry_at_a_time(make_gateway):
    gateway = make_gateway(environ=ADMIN_ENV)
    created = admin(gateway, "POST", "/admin/virtual-keys", {"project_name": "kept", "log_bodies": True})
    assert created.status == 201 and created.json()["log_bodies"] is True, created.body
    logged_key, logged_id = created.json()["key"], created.json()["id"]
    plain_record, plain_key = gateway.create_key("plain")
    assert plain_record["log_bodies"] is False

    kept = post(gateway, CHAT, chat("KEPT-request-canary"), key=logged_key,
                headers={"X-Header-Canary": "HDR-CANARY-0042"})
    other = post(gateway, CHAT, chat("UNKEPT-request-canary"), key=plain_key)
    streamed = call(gateway, "POST", MESSAGES, {"model": "claude-haiku-4-5", "max_tokens": 16, "stream": True,
                                                "messages": [{"role": "user", "content": "KEPT-stream-canary"}]},
                    key=logged_key)
    assert kept.status == other.status == streamed.status == 200
    wait_idle(gateway)

    detail = entry(gateway, row_id_of(gateway, kept))
    assert detail["virtual_key_id"] == logged_id and detail["status"] == "ok"
    bodies = detail["bodies"]
    assert json.loads(bodies["request"]) == chat("KEPT-request-canary")
    assert bodies["request_bytes"] == len(bodies["request"].encode())
    assert json.loads(bodies["response"]) == kept.json()
    assert bodies["response_bytes"] == len(kept.body) and bodies["kept_bytes_each"] == llmgw.BODY_LOG_BYTES
    stream_bodies = entry(gateway, row_id_of(gateway, streamed))["bodies"]
    assert "KEPT-stream-canary" in stream_bodies["request"]
    assert stream_bodies["response"].startswith("event: message_start") and "message_stop" in stream_bodies["response"]
    assert stream_bodies["response_bytes"] == len(stream_bodies["response"].encode())
    assert entry(gateway, row_id_of(gateway, other))["bodies"] is None

    # Lists and exports never carry bodies.
    for path in ("/admin/logs", "/admin/logs?format=csv", "/admin/logs?key=" + logged_id):
        listing = admin(gateway, "GET", path)
        assert listing.status == 200 and b"canary" not in listing.body.lower(), listing.body
    # Nothing of a key that does not opt in, no header, no virtual key, no provider key is stored.
    stored = stored_bytes(gateway)
    assert b"KEPT-request-canary" in stored  # the check below can see a body
    for secret in (b"UNKEPT-request-canary", b"HDR-CANARY-0042", b"X-Header-Canary", logged_key.encode(),
                   plain_key.encode(), OPENAI_KEY.encode(), ANTHROPIC_KEY.encode(), ADMIN_TOKEN.encode()):
        assert secret not in stored, secret


def test_kept_bodies_are_bounded_and_their_sizes_stated(make_gateway):
    gateway = make_gateway(environ=ADMIN_ENV)
    record, key = gateway.create_key("big", log_bodies=True)
    text = "x" * (2 * llmgw.BODY_LOG_BYTES)
    reply = post(gateway, CHAT, chat(text), key=key)
    assert reply.status == 200
    bodies = entry(gateway, row_id_of(gateway, reply))["bodies"]
    assert len(bodies["request"].encode()) == llmgw.BODY_LOG_BYTES
    assert bodies["request_bytes"] == len(json.dumps(chat(text)).encode()) > llmgw.BODY_LOG_BYTES


@pytest.mark.parametrize("path,status", [("/admin/logs/0", 400), ("/admin/logs/x", 400),
                                         ("/admin/logs/%d" % 2 ** 63, 400), ("/admin/logs/99", 404)])
def test_a_missing_or_bad_entry_id_is_refused(make_gateway, path, status):
    gateway = make_gateway(environ=ADMIN_ENV)
    reply = admin(gateway, "GET", path)
    assert reply.status == status, reply.body
    assert reply.json()["error"]["message"]


def test_log_bodies_must_be_true_or_false(make_gateway):
    gateway = make_gateway(environ=ADMIN_ENV)
    for value in ("yes", 1, None):
        reply = admin(gateway, "POST", "/admin/virtual-keys", {"project_name": "p", "log_bodies": value})
        assert reply.status == 400 and reply.json()["error"]["param"] == "log_bodies", reply.body


def kept_bodies(gateway):
    return [row[0] for row in query(gateway, "SELECT usage_id FROM usage_bodies ORDER BY usage_id")]


def age(gateway, row_id, days, table):
    """A row (``usage``) or its bodies (``usage_bodies``) as if written ``days`` ago."""
    query(gateway, "UPDATE %s SET started_at = started_at - ? WHERE %s = ?"
          % (table, "id" if table == "usage" else "usage_id"), (days * 86400, row_id))


def test_the_gateway_prunes_bodies_past_their_retention(make_gateway, monkeypatch):
    monkeypatch.setattr(llmgw.Gateway, "janitor_interval", 0.05)
    gateway = make_gateway(environ=ADMIN_ENV, logging={"body_retention_days": 2})
    record, key = gateway.create_key("kept", log_bodies=True)
    ids = [row_id_of(gateway, post(gateway, CHAT, chat("body %d" % n), key=key)) for n in range(3)]
    wait_idle(gateway)
    assert kept_bodies(gateway) == ids
    age(gateway, ids[0], 3, "usage_bodies")
    age(gateway, ids[1], 1, "usage_bodies")
    assert wait_until(lambda: kept_bodies(gateway) == ids[1:]), kept_bodies(gateway)
    assert entry(gateway, ids[0])["bodies"] is None and entry(gateway, ids[0])["status"] == "ok"  # the row stays


def test_pruning_rows_prunes_their_bodies(make_gateway, cli_main, tmp_path):
    """Rows pruned (``cli.py prune``, logging.retention_days) take their
    bodies along, however long the bodies' own retention."""
    gateway = make_gateway(environ=ADMIN_ENV, logging={"body_retention_days": 30})
    record, key = gateway.create_key("kept", log_bodies=True)
    ids = [row_id_of(gateway, post(gateway, CHAT, chat("body %d" % n), key=key)) for n in range(2)]
    wait_idle(gateway)
    for table in ("usage", "usage_bodies"):
        age(gateway, ids[0], 10, table)
    gateway.database.write_config(tmp_path / "config.yaml", base_config("http://127.0.0.1:9"))
    assert cli_main("prune", "--older-than", "5d", check=True).stdout.startswith("Pruned 1 ")
    assert kept_bodies(gateway) == ids[1:]


def test_cli_sets_log_bodies_and_shows_bodies_only_with_id_and_bodies(make_gateway, cli_main, tmp_path):
    gateway = make_gateway(environ=ADMIN_ENV)
    gateway.database.write_config(tmp_path / "config.yaml", base_config("http://127.0.0.1:9"))
    created = json.loads(cli_main("keys", "create", "kept", "--log-bodies", "--output", "json", check=True).stdout)
    assert created["log_bodies"] is True
    reply = post(gateway, CHAT, chat("CLI-canary"), key=created["key"])
    assert reply.status == 200
    row_id = row_id_of(gateway, reply)
    wait_idle(gateway)
    for args in (["logs"], ["logs", "--output", "json"], ["logs", "--output", "csv"], ["logs", "--id", row_id],
                 ["logs", "--id", row_id, "--output", "json"]):
        shown = cli_main(*args, check=True)
        assert "CLI-canary" not in shown.stdout and str(row_id) in shown.stdout, (args, shown.stdout)
    detail = json.loads(cli_main("logs", "--id", row_id, "--bodies", "--output", "json", check=True).stdout)
    assert detail["bodies"] == entry(gateway, row_id)["bodies"] and "CLI-canary" in detail["bodies"]["request"]
    table = cli_main("logs", "--id", row_id, "--bodies", check=True).stdout
    assert "CLI-canary" in table and "request body: %d bytes" % detail["bodies"]["request_bytes"] in table
    refused = cli_main("logs", "--bodies")
    assert refused.returncode == 1 and "--id" in refused.stderr
    updated = json.loads(cli_main("keys", "update", created["id"], "--no-log-bodies", check=True).stdout)
    assert updated["log_bodies"] is False
    later = post(gateway, CHAT, chat("after"), key=created["key"])
    assert later.status == 200 and entry(gateway, row_id_of(gateway, later))["bodies"] is None
