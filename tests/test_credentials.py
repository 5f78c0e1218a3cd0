"""Bad credentials and keys in the query string (RELIABILITY.md 1.7, 1.8):
every malformed, missing or misplaced key is a 401 in the shape of the API
called, without delay and without reaching the provider.

RELIABILITY ids are given in brackets in each test's docstring.
"""

import base64
import time

import pytest

import llmgw
from conftest import (ANTHROPIC_KEY, CHAT, MESSAGES, OPENAI_KEY, assert_alive, assert_json_error, chat_body, dialect_of,
                      exchange, json_request, post, request_bytes, wait_until)

#: Whatever a test did, its gateways end with no row pending, nothing reserved, nothing in flight.
pytestmark = pytest.mark.usefixtures("balanced_books")


# ==== 1.7 / 1.8 Authentication and keys in the query string =================

AUTH_CASES = [
    ("A02-bearer-empty", [("Authorization", "Bearer")]),
    ("A02-bearer-space", [("Authorization", "Bearer ")]),
    ("A02-two-spaces", [("Authorization", "Bearer  {key}")]),
    ("A02-basic", [("Authorization", "Basic {basic}")]),
    ("A02-token", [("Authorization", "Token {key}")]),
    ("A02-no-scheme", [("Authorization", "{key}")]),
    ("A02-bearer-tab", [("Authorization", "Bearer\t{key}")]),
    ("A02-trailing-junk", [("Authorization", "Bearer {key} x")]),
    ("A03-one-char-changed", [("Authorization", "Bearer {changed}")]),
    ("A03-prefix-only", [("Authorization", "Bearer llmgw-")]),
    ("A03-openai-provider-key", [("Authorization", "Bearer " + OPENAI_KEY)]),
    ("A03-anthropic-provider-key", [("x-api-key", ANTHROPIC_KEY)]),
    ("A03-hash-of-key", [("Authorization", "Bearer {hash}")]),
    ("A05-bearer-and-other-key", [("Authorization", "Bearer {key}"), ("x-api-key", "{other}")]),
    ("A05-bad-bearer-good-x-api-key", [("Authorization", "Bearer llmgw-wrong"), ("x-api-key", "{key}")]),
    ("A05-basic-and-x-api-key", [("Authorization", "Basic {basic}"), ("x-api-key", "{key}")]),
    ("X08-underscore", [("x_api_key", "{key}")]),
    ("api-key-and-x-api-key-differ", [("api-key", "{key}"), ("x-api-key", "llmgw-other")]),
    ("proxy-authorization", [("Proxy-Authorization", "Bearer {key}")]),
    ("cookie", [("Cookie", "api_key={key}")]),
]


@pytest.mark.parametrize("path", [CHAT, MESSAGES])
@pytest.mark.parametrize("headers", [case[1] for case in AUTH_CASES], ids=[case[0] for case in AUTH_CASES])
def test_bad_credentials_are_401(shared, headers, path):
    """[A02 A03 A05 X08] Only ``Authorization: Bearer <key>`` and
    ``x-api-key: <key>`` (one key) authenticate; the answer never echoes
    what was presented."""
    gw, key, upstream = shared.gw, shared.key, shared.upstream
    other = gw.create_key("other")[1]
    values = {"key": key, "other": other, "changed": key[:-1] + ("A" if key[-1] != "A" else "B"),
              "basic": base64.b64encode((key + ":").encode()).decode(), "hash": llmgw.hash_secret(key)}
    headers = [(name, value.format(**values)) for name, value in headers]
    response, client = exchange(gw, request_bytes("POST", path, headers + [
        ("Content-Type", "application/json"), ("Content-Length", "2")], b"{}"))
    client.close()
    assert_json_error(response, 401, dialect_of(path), error_type="authentication_error")
    for secret in (key, other, OPENAI_KEY, ANTHROPIC_KEY, values["changed"], values["hash"]):
        assert secret.encode() not in client.received
    assert upstream.requests == [] and shared.new_rows() == []
    assert_alive(gw, key)


def test_bearer_scheme_is_case_insensitive(shared):
    """[A02] ``bearer <key>`` and ``BEARER <key>`` are the documented form:
    auth schemes are case-insensitive (RFC 9110 11.1)."""
    gw, key, upstream = shared.gw, shared.key, shared.upstream
    for scheme in ("bearer", "BEARER"):
        response = post(gw, CHAT, chat_body(), headers={"Authorization": "%s %s" % (scheme, key)})
        assert response.status == 200
    assert len(upstream.requests) == 2
    assert_alive(gw, key)


def test_sql_injection_shaped_keys_are_401_without_delay(shared):
    """[A04] Injection payloads as keys: 401 each, quickly (a parameterised
    hash lookup; the ``sleep`` payloads would otherwise show)."""
    gw, key, upstream = shared.gw, shared.key, shared.upstream
    payloads = ["' OR '1'='1", "' OR 1=1--", "x' UNION SELECT id, key_hash FROM virtual_keys--",
                "%00", "' OR (SELECT sleep(5))--", "'; DROP TABLE usage; --", "llmgw-' OR ''='",
                "\\' OR 1=1 /*", "1; SELECT pg_sleep(5)", "' AND randomblob(500000000)--"]
    for payload in payloads:
        for header in ("Authorization", "x-api-key"):
            value = ("Bearer " + payload) if header == "Authorization" else payload
            started = time.monotonic()
            response = post(gw, CHAT, chat_body(), headers={header: value})
            assert time.monotonic() - started < 2.5  # the sleep payloads ask for 5 s
            assert response.status == 401
            assert payload.encode() not in response.body
    assert upstream.requests == [] and shared.new_rows() == []
    assert all(k["is_active"] for k in gw.store.list_keys())
    assert_alive(gw, key)


@pytest.mark.parametrize("name", ["api_key", "key", "access_token", "api-key", "token"])
def test_key_in_query_string_alone_is_401(shared, name):
    """[Q01] A valid key in the query string does not authenticate."""
    gw, key, upstream = shared.gw, shared.key, shared.upstream
    response, client = exchange(gw, json_request("%s?%s=%s" % (CHAT, name, key), None, chat_body()))
    client.close()
    assert_json_error(response, 401, error_type="authentication_error")
    assert key.encode() not in client.received
    assert upstream.requests == []
    assert_alive(gw, key)


def test_query_string_is_not_forwarded_or_logged(gw, key, upstream, gwlog):
    """[Q02 Q03] Valid header plus ``?api_key=<key>&key=<provider key>``:
    served; the fake's URL is the bare path; neither value is logged."""
    target = "%s?api_key=%s&key=%s&x=1" % (CHAT, key, OPENAI_KEY)
    response, client = exchange(gw, json_request(target, key, chat_body()))
    client.close()
    assert response.status == 200
    assert upstream.requests[0]["path"] == CHAT
    assert wait_until(lambda: "POST %s 200" % CHAT in gwlog.text(), 2.0)  # logged after the reply
    log = gwlog.text()
    assert key not in log and OPENAI_KEY not in log
    assert_alive(gw, key)
