"""Secrets stay secret (RELIABILITY.md 1.15): provider keys and virtual keys
never appear in logs, responses, the admin API or provider error bodies;
malformed provider keys are refused naming the provider only; database files
are private. Tests named ``test_bN_...`` are the regression tests of review
finding BN.
"""

import json
import os
import stat

import pytest

import llmgw
from conftest import (ANTHROPIC_KEY, CHAT, EMBEDDINGS, MESSAGES, MODELS, OPENAI_KEY, RATE_LIMITS, RESPONSES, SERVER,
                      RawClient, answer, assert_alive, assert_json_error, base_config, body_for, call, chat_body,
                      exchange, execute_sql, json_request, post, request_bytes, stored_bytes)

#: Whatever a test did, its gateways end with no row pending, nothing reserved, nothing in flight.
pytestmark = pytest.mark.usefixtures("balanced_books")


# ==== 1.15 Secrets ==================================================================

def gather_outputs(client_outputs, gwlog, capfd):
    out, err = capfd.readouterr()
    return {"log": gwlog.text(), "stdout": out, "stderr": err, "responses": b"\n".join(client_outputs)}


def assert_secrets_absent(outputs, secrets):
    for name, text in outputs.items():
        blob = text if isinstance(text, bytes) else text.encode("utf-8", "replace")
        for label, secret in secrets.items():
            assert secret.encode() not in blob, "%s found in %s" % (label, name)


def test_secrets_never_appear_in_logs_responses_or_admin_api(gw, key, upstream, gwlog, capfd):
    """[T01 T03 T04 Q02] Provider keys and the virtual key in every header
    and body position, plus faults (leak401, fail500, bad JSON, bad auth,
    broken streams, framing errors): no log line, response (headers and
    body), stdout/stderr or admin API answer contains a provider key, the
    virtual key or the admin token. A key created through the admin API
    appears in its creation response only."""
    admin = llmgw.issue_admin_token(gw.store)
    outputs = []

    def send(data):
        client = RawClient(gw)
        client.send(data)
        response = client.read_response(timeout=5)
        assert response is not None and b"internal_error" not in response.body, response
        client.close()
        outputs.append(client.received)

    everywhere = [("User-Agent", key), ("X-Custom", OPENAI_KEY), ("api_key", ANTHROPIC_KEY),
                  ("Cookie", "k=" + key), ("Proxy-Authorization", "Bearer " + OPENAI_KEY),
                  ("anthropic-beta", key), ("openai-beta", OPENAI_KEY), ("X-Forwarded-For", key)]
    body_secrets = {"api_key": OPENAI_KEY, "user": key, "metadata": {"user_id": ANTHROPIC_KEY},
                    "extra_headers": {"Authorization": "Bearer " + key}}
    query = "?api_key=%s&key=%s&token=%s" % (key, OPENAI_KEY, ANTHROPIC_KEY)
    for path in (CHAT, MESSAGES, RESPONSES, EMBEDDINGS):
        for model in ("gpt-4o-mini", "gpt-4o-mini-leak401", "gpt-4o-mini-fail500", "gpt-4o-mini-badjson"):
            send(json_request(path + query, key, body_for(path, model, **body_secrets), extra=everywhere))
        for stream_fault in ("", "-dropstream", "-rst"):
            if path in (CHAT, MESSAGES, RESPONSES):
                send(json_request(path, key, body_for(path, "gpt-4o-mini" + stream_fault, stream=True,
                                                      **body_secrets), extra=everywhere))
        # Bad auth with secrets as the credential
        for credential in (OPENAI_KEY, ANTHROPIC_KEY, key + "x", admin):
            send(json_request(path, credential, body_for(path), extra=[("x-api-key", credential)]))
        send(json_request(path, None, body_for(path), extra=[("x-api-key", key + "0")]))
        send(json_request(path, None, body_for(path), extra=[("Authorization", "Basic " + OPENAI_KEY)]))
        # Bad JSON carrying secrets
        send(json_request(path, key, b'{"model": "gpt-4o-mini", "api_key": "%s", "user": "%s"'
                          % (OPENAI_KEY.encode(), key.encode())))
        send(json_request(path, key, b'{"model": "%s", "model": "%s"}' % (key.encode(), OPENAI_KEY.encode())))
        # Framing errors carrying secrets in their heads
        send(request_bytes("POST", path, [("Authorization ", "Bearer " + key)]))
        send(request_bytes("POST", path, [("Authorization", "Bearer " + key), ("X-Key", OPENAI_KEY.encode() + b"\x00")]))
        send(request_bytes("POST", path, [("Authorization", "Bearer " + key), ("Content-Length", "1"),
                                          ("Content-Length", "2")]))
        send(request_bytes("POST", path, [("Authorization", "Bearer " + key), ("anthropic-version", b"\xe9" + key.encode())]
                           + [("Content-Type", "application/json"), ("Content-Length", "2")], b"{}"))
    send(request_bytes("GET", MODELS + query, [("Authorization", "Bearer " + key)] + everywhere))
    # The admin API: every read, with the admin token; and the wrong tokens.
    created = call(gw, "POST", "/admin/virtual-keys", {"project_name": "created via api"}, admin)
    assert created.status == 201
    new_key = created.json()["key"]
    admin_answers = []
    for method, target in (("GET", "/admin/virtual-keys"), ("GET", "/admin/virtual-keys/" + created.json()["id"]),
                           ("GET", "/admin/usage-stats"), ("GET", "/admin/usage-stats?by=model"),
                           ("GET", "/admin/audit"), ("DELETE", "/admin/virtual-keys/" + created.json()["id"]),
                           ("GET", "/admin/virtual-keys")):
        response = call(gw, method, target, key=admin)
        assert response.status == 200, (target, response.body)
        admin_answers.append(json.dumps(dict(response.headers)).encode() + response.body)
    for wrong in (key, OPENAI_KEY, admin + "x"):
        response = call(gw, "GET", "/admin/virtual-keys", key=wrong)
        assert response.status in (401, 403)
        admin_answers.append(json.dumps(dict(response.headers)).encode() + response.body)
    assert len(upstream.requests) > 20
    captured = gather_outputs(outputs + admin_answers, gwlog, capfd)
    assert len(gwlog.records) > 50
    assert_secrets_absent(captured, {
        "the OpenAI key": OPENAI_KEY, "the Anthropic key": ANTHROPIC_KEY, "the virtual key": key,
        "the admin token": admin, "the key created via the API": new_key,
        "the OpenAI key as the provider quoted it": OPENAI_KEY[:8] + "..." + OPENAI_KEY[-4:],
        "the Anthropic key as the provider quoted it": ANTHROPIC_KEY[:8] + "..." + ANTHROPIC_KEY[-4:],
        "the virtual key's hash": llmgw.hash_secret(key)})
    assert new_key.encode() in created.body  # shown once, at creation
    assert_alive(gw, key)


def test_secrets_in_the_path_are_not_echoed(gw, key, upstream, gwlog, capfd):
    """[T01 T03] A key pasted into the URL path (404; 405 where the path
    takes an id, which a POST does not: a retrieval's id, a model's) is
    neither echoed in the error body nor written to the access log."""
    outputs = []
    for target, status in (("%s/%s" % (CHAT, key), 404), ("/v1/%s" % OPENAI_KEY, 404), ("/%s" % ANTHROPIC_KEY, 404),
                           ("/v1/models/%s/x" % key, 405), ("/v1/models/%s" % OPENAI_KEY, 405),
                           ("/v1/responses/%s/input_items" % key, 405)):
        response, client = exchange(gw, json_request(target, key, chat_body()))
        client.close()
        assert_json_error(response, status)
        outputs.append(client.received)
    for data in (request_bytes("GET", "/v1/responses/%s" % key, [("Authorization", "Bearer " + key)]),
                 json_request("/v1/responses/%s/cancel" % OPENAI_KEY, key, {})):  # no such response
        response, client = exchange(gw, data)
        client.close()
        assert_json_error(response, 404, code="response_not_found")
        outputs.append(client.received)
    response, client = exchange(gw, request_bytes("GET", "/v1/models/%s" % key, [
        ("Authorization", "Bearer " + key), ("Upgrade", "websocket"), ("Connection", "Upgrade")]))
    client.close()
    assert_json_error(response, 426)
    outputs.append(client.received)
    assert_secrets_absent(gather_outputs(outputs, gwlog, capfd), {
        "the OpenAI key": OPENAI_KEY, "the Anthropic key": ANTHROPIC_KEY, "the virtual key": key})
    assert_alive(gw, key)


def test_secrets_in_the_model_field_are_not_logged(gw, key, upstream, gwlog, capfd):
    """[T01 T03] A key pasted as the ``model`` (an unpriced model, so the
    price warning fires too) is not written to the gateway's log lines.
    (The provider's own answer may echo it; that is the provider's.)"""
    for model in (key, OPENAI_KEY, "openai/" + ANTHROPIC_KEY):
        response = post(gw, CHAT, chat_body(model), key)
        assert response.status == 200
    out, err = capfd.readouterr()
    assert_secrets_absent({"log": gwlog.text(), "stderr": err, "stdout": out}, {
        "the OpenAI key": OPENAI_KEY, "the Anthropic key": ANTHROPIC_KEY, "the virtual key": key})
    assert_alive(gw, key)


@pytest.mark.parametrize("suffix", ["\n", " ", "\t", "\r\n", "\x00", "\x7f"])
def test_provider_key_with_whitespace_is_a_config_error_naming_the_provider(suffix):
    """[T02] A YAML slip leaves a newline (or space, control byte) on the
    key: ConfigError naming the provider, never quoting the key."""
    with pytest.raises(llmgw.ConfigError) as raised:
        llmgw.parse_config({"providers": {"openai": {"base_url": "https://api.openai.com",
                                                     "api_key": OPENAI_KEY + suffix}}})
    message = raised.value.message
    assert "openai" in message
    assert OPENAI_KEY not in message and OPENAI_KEY[-8:] not in message and OPENAI_KEY[:12] not in message


def test_provider_key_from_environment_with_newline_is_refused_at_use(make_gateway, upstream, gwlog):
    """[T02] The same slip in an ``${ENV}`` key: 503 provider_key_invalid,
    no provider contacted, the log names the provider only."""
    gw = make_gateway(server=dict(SERVER), rate_limits=RATE_LIMITS, environ={"SLIPPED": OPENAI_KEY + "\n"},
                      providers={"slipped": {"base_url": upstream.url, "api_key": "${SLIPPED}",
                                             "models": ["slip-*"]}})
    key = gw.create_key()[1]
    response = post(gw, CHAT, chat_body("slip-model"), key)
    assert response.status == 503 and response.json()["error"]["code"] == "provider_key_invalid"
    assert upstream.requests == []
    assert "slipped" in gwlog.text() and OPENAI_KEY not in gwlog.text()
    assert OPENAI_KEY.encode() not in response.body
    assert_alive(gw, key)


def calls_that_store_things(gw, key):
    """A few calls (one the provider refuses with a leaked key) and an admin token: rows that could hold a secret."""
    admin = llmgw.issue_admin_token(gw.store)
    for model in ("gpt-4o-mini", "gpt-4o-mini-leak401"):
        post(gw, CHAT, chat_body(model, user=key), key)
    post(gw, MESSAGES, body_for(MESSAGES), key)
    assert_alive(gw, key)
    return admin


@pytest.mark.sqlite_only("file modes of gateway.db, -wal and -shm")
def test_database_files_are_private(gw, key, upstream):
    """[T05] gateway.db, -wal and -shm are 0600."""
    calls_that_store_things(gw, key)
    for path in [gw.db_path + suffix for suffix in ("", "-wal", "-shm")]:
        assert os.path.exists(path), path
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600, (path, oct(os.stat(path).st_mode))


def test_the_database_holds_no_secret(gw, key, upstream):
    """[T06] Nothing the database keeps (the SQLite file with its WAL, or
    every PostgreSQL row) holds a virtual key, the admin token or a provider
    key in plain text (only the key's hash)."""
    admin = calls_that_store_things(gw, key)
    data = stored_bytes(gw)
    for secret in (key, admin, OPENAI_KEY, ANTHROPIC_KEY):
        assert secret.encode() not in data
    assert llmgw.hash_secret(key).encode() in data


# ---- B2: a provider key with a non-ASCII character -----------------------------------

@pytest.mark.parametrize("character", ["\u2019", "\u200b"], ids=["smart-quote", "zero-width-space"])
def test_b2_config_refuses_a_non_ascii_provider_key_naming_the_provider_only(character):
    document = base_config("http://127.0.0.1:9")
    secret = "sk-CANARY-pasted-0123456789" + character
    document["providers"]["openai"]["api_key"] = secret
    with pytest.raises(llmgw.ConfigError) as refused:
        llmgw.parse_config(document)
    message = refused.value.message
    assert "openai" in message, message
    assert "sk-CANARY" not in message and character not in message and "0123456789" not in message, message


def test_b2_a_stored_non_ascii_provider_key_answers_503_without_pending_rows(make_gateway, upstream):
    gateway = make_gateway(providers={"openai": {"base_url": upstream.url}})  # no key in config.yaml
    secret = "sk-CANARY-pasted-0123456789\u2019"
    try:
        gateway.store.set_provider_key("openai", secret)
    except llmgw.ConfigError:
        # Refusing it at write time is fine too; a database written by an
        # older version can still hold one, so store it as that would have.
        execute_sql(gateway, "INSERT INTO provider_keys (provider, api_key, updated_at) "
                                     "VALUES ('openai', '%s', 0)" % secret, llmgw.BUMP_GENERATION)
    record, key = gateway.create_key(max_parallel=2)
    for _ in range(3):  # more than max_parallel: no in-flight slot may leak
        response = answer(gateway, CHAT, body_for(CHAT), key)
        assert_json_error(response, 503, code="provider_key_invalid")
        assert b"CANARY" not in response.body and "\u2019".encode() not in response.body
    assert upstream.requests == []
    assert [row["status"] for row in gateway.rows() if row["status"] == "pending"] == []


# ---- a provider error body quoting the key never reaches the client ---------------

def test_provider_error_body_quoting_the_key_is_redacted(scripted_gateway):
    def answer(handler, body):
        payload = json.dumps({"error": {"message": "key %s is over quota" % OPENAI_KEY, "type": "server_error",
                                        "code": None, "param": None}}).encode()
        handler.wfile.write(b"HTTP/1.1 500 Internal Server Error\r\ncontent-type: application/json\r\n"
                            b"content-length: %d\r\n\r\n%s" % (len(payload), payload))
    upstream, gateway = scripted_gateway(answer)
    key = gateway.create_key()[1]
    response = post(gateway, CHAT, body_for(CHAT), key)
    assert response.status == 500
    assert OPENAI_KEY.encode() not in response.body
    assert response.json()["error"]["message"] == "key [redacted] is over quota"
