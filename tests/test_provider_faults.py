"""Broken upstreams (RELIABILITY.md 1.12, 1.18): refused and hanging
providers, provider errors, non-JSON answers, broken and dripping streams,
odd response heads and framings, pooled connections the provider closed,
and a fault storm that must leak no thread or connection.

Faults come from tests/fake_upstream.py (tokens in the model name) and from
its ``ScriptedUpstream``, which answers with exact bytes. Tests named
``test_bN_...`` are the regression tests of review finding BN.
RELIABILITY ids are given in brackets in each test's docstring.
"""

import json
import random
import socket
import threading
import time

import pytest

import llmgw
from conftest import (ANTHROPIC_KEY, CHAT, COMPLETIONS, MESSAGES, ONE_ATTEMPT, OPENAI_KEY, RATE_LIMITS, RESPONSES,
                      SCRIPTED_KEY, SERVER, RawClient, answer, assert_alive, assert_json_error, body_for, chat_body,
                      dialect_of, exchange, expected_columns, expected_cost, expected_tokens, free_port,
                      health_recovers, json_request, ledger, normalise_ids, other_threads, post, scripted_reply,
                      settled_rows, sse_events, tokens_of, wait_idle, wait_until, worker_threads)
from fake_upstream import ScriptedUpstream

#: Whatever a test did, its gateways end with no row pending, nothing reserved, nothing in flight.
pytestmark = pytest.mark.usefixtures("balanced_books")


#: The default retries, with backoffs short enough for a test.
RETRYING = {"backoff_initial": 0.05, "backoff_max": 1}


# ==== 1.2 Oversized headers and bodies ======================================

def test_upstream_huge_header_is_502_and_recorded(gw, key, upstream):
    """[L04] The provider answers with a 72 KiB header line: 502 JSON, row
    upstream_error."""
    response = post(gw, CHAT, chat_body("gpt-4o-mini-bighdr"), key)
    assert response.status == 502
    payload = response.json()
    assert payload["error"]["type"] == "api_error" and payload["error"]["code"] == "upstream_bad_response"
    assert len(upstream.requests) == 1
    row, = settled_rows(gw, 1)
    assert (row["status"], row["http_status"], row["request_tokens"]) == ("upstream_error", None, 0)
    assert_alive(gw, key)


# ---- a provider that answers with exact bytes ----------------------------------

SCRIPTED_BODY = json.dumps({"id": "chatcmpl-s", "object": "chat.completion", "created": 1, "model": "scripted-1",
                            "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"},
                                         "finish_reason": "stop"}],
                            "usage": {"prompt_tokens": 17, "completion_tokens": 4, "total_tokens": 21}}).encode()


def start_scripted_gateway(make_gateway, responses):
    scripted = ScriptedUpstream(responses)
    gw = make_gateway(server=dict(SERVER), rate_limits=RATE_LIMITS, routing=ONE_ATTEMPT, providers={
        "scripted": {"base_url": scripted.url, "api_key": SCRIPTED_KEY, "models": ["scripted-*"]}})
    return gw, scripted


def test_upstream_response_headers_are_filtered(make_gateway, upstream):
    """[X07] Set-Cookie, Location, openai-organization, Connection,
    Access-Control-*, Server from the provider never reach the client;
    rate-limit and request-id headers do; framing is the gateway's own."""
    gw, scripted = start_scripted_gateway(make_gateway, [scripted_reply("HTTP/1.1 200 OK", [
        ("Content-Type", "application/json"), ("Content-Length", str(len(SCRIPTED_BODY))),
        ("Set-Cookie", "session=stolen; Path=/"), ("Location", "http://169.254.169.254/"),
        ("openai-organization", "org-secret"), ("Connection", "keep-alive, x-junk"), ("X-Junk", "1"),
        ("Access-Control-Allow-Origin", "*"), ("Server", "evil/1.0"), ("X-Request-Id", "req_scripted"),
        ("x-ratelimit-remaining-requests", "42"), ("Strict-Transport-Security", "max-age=0"),
        ("Alt-Svc", 'h3=":443"')], SCRIPTED_BODY)])
    try:
        key = gw.create_key()[1]
        response, client = exchange(gw, json_request(CHAT, key, chat_body("scripted-1")))
        client.close()
        assert response.status == 200 and response.body == SCRIPTED_BODY
        names = {name.lower() for name, _ in response.header_list}
        for name in ("set-cookie", "location", "openai-organization", "access-control-allow-origin",
                     "strict-transport-security", "alt-svc"):
            assert name not in names, response.header_list
        assert response.header("server").startswith("llmgw/")
        assert response.header("x-request-id") == "req_scripted"
        assert response.header("x-ratelimit-remaining-requests") == "42"
        assert response.header("content-length") == str(len(SCRIPTED_BODY))
        assert b"Bearer " + SCRIPTED_KEY.encode() in scripted.requests[0][1]
        row, = settled_rows(gw, 1)
        assert (row["status"], row["request_tokens"], row["response_tokens"]) == ("ok", 17, 4)
        assert_alive(gw, key)
    finally:
        scripted.close()


def test_upstream_duplicate_content_length_does_not_poison_the_pool(make_gateway, upstream):
    """[X07 H08, upstream side] The provider answers with two different
    Content-Lengths on a keep-alive connection: that answer is a 502, and
    the leftover bytes must not be read as the answer to the next client's
    request (the connection is not pooled)."""
    good = scripted_reply("HTTP/1.1 200 OK", [("Content-Type", "application/json"),
                                              ("Content-Length", str(len(SCRIPTED_BODY)))], SCRIPTED_BODY)
    split, _ = scripted_reply("HTTP/1.1 200 OK", [("Content-Type", "application/json"), ("Content-Length", "20"),
                                                  ("Content-Length", str(len(SCRIPTED_BODY)))], SCRIPTED_BODY)
    cut = split.index(b"\r\n\r\n") + 4 + 20
    gw, scripted = start_scripted_gateway(make_gateway, [([split[:cut], split[cut:]], False), good, good])
    try:
        key = gw.create_key()[1]
        first = post(gw, CHAT, chat_body("scripted-1"), key)
        assert first.status == 502, first.body
        second = post(gw, CHAT, chat_body("scripted-1"), key)
        assert second.status == 200 and second.body == SCRIPTED_BODY, (second.status, second.body)
        assert_alive(gw, key)
    finally:
        scripted.close()


JSON_HEADERS = [("Content-Type", "application/json"), ("Content-Length", str(len(SCRIPTED_BODY)))]


@pytest.mark.parametrize("status_line, headers, close", [
    ("HTTP/1.1 200 OK", JSON_HEADERS + [("X-Filler-%d" % n, "x") for n in range(100)], False),
    ("HTTP/1.1 200 OK", JSON_HEADERS + [("X-Big", "x" * 70000)], False),
    ("HTTP/1.1 200 OK", JSON_HEADERS + [("Transfer-Encoding", "chunked"), ("Transfer-Encoding", "chunked")], False),
    ("HTTP/2 200 OK", JSON_HEADERS, False),
    ("HTTP/1.1 2000 OK", JSON_HEADERS, False),
    ("HTTP/1.1 200 OK\r\nno colon in this line", JSON_HEADERS, False),
    ("HTTP/1.1 200 OK", [("Content-Type", "application/json"), ("Content-Length", "5000")], True),
    ("HTTP/1.1 200 OK\r\nX-Folded: a" + "\r\n b" * 3000, JSON_HEADERS, False),
    ("HTTP/1.1 200 OK\r\nContent-Length: %d\r\n 0" % len(SCRIPTED_BODY), [("Content-Type", "application/json")],
     False),
    ("HTTP/1.1 101 Switching Protocols", JSON_HEADERS, False),
    ("HTTP/1.1 103 Early Hints\r\n\r\n" * 11 + "HTTP/1.1 200 OK", JSON_HEADERS, False),
    ("HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n x: 1",
     [("Content-Length", str(len(SCRIPTED_BODY)))], False),
    ("HTTP/1.1 200 OK", [("Content-Type", "application/json\rSet-Cookie: a=b"),
                         ("Content-Length", str(len(SCRIPTED_BODY)))], False),
], ids=["101-fields", "70k-line", "two-transfer-encodings", "http2-status-line", "four-digit-status", "no-colon",
        "bogus-content-length", "3000-folded-lines", "folded-content-length", "101-switching", "11-interim-answers",
        "folded-content-type", "content-type-with-cr"])
def test_upstream_response_out_of_bounds_is_502(make_gateway, upstream, status_line, headers, close):
    """[X07] The provider's response head is read by the gateway's own
    parser, within http.client's bounds (100 lines, folded ones included;
    64 KiB a line): anything past them or malformed (a folded framing
    header, a protocol switch), or a body shorter than its declared length
    (then a close), is a 502 JSON, nothing half-relayed, and an
    upstream_error row."""
    gw, scripted = start_scripted_gateway(make_gateway, [scripted_reply(status_line, headers, SCRIPTED_BODY, close)])
    try:
        key = gw.create_key()[1]
        response, client = exchange(gw, json_request(CHAT, key, chat_body("scripted-1")))
        client.close()
        assert_json_error(response, 502)
        row, = settled_rows(gw, 1)
        assert row["status"] == "upstream_error"
        assert_alive(gw, key)
    finally:
        scripted.close()


def test_a_close_after_an_interim_answer_is_not_retried(make_gateway, upstream):
    """[X07, no double billing] On a reused connection the provider sends
    103 Early Hints, then closes: it has the request, so the gateway answers
    502 instead of sending it again on a new connection."""
    good = scripted_reply("HTTP/1.1 200 OK", JSON_HEADERS, SCRIPTED_BODY)
    gw, scripted = start_scripted_gateway(make_gateway, [good, (b"HTTP/1.1 103 Early Hints\r\n\r\n", True), good])
    try:
        key = gw.create_key()[1]
        assert post(gw, CHAT, chat_body("scripted-1"), key).status == 200
        second = post(gw, CHAT, chat_body("scripted-1"), key)
        assert_json_error(second, 502)
        assert len(scripted.requests) == 2, "the request was sent again"
    finally:
        scripted.close()


def test_upstream_response_head_oddities_are_read_like_http_client(make_gateway, upstream):
    """[X07] Interim answers (100 Continue, 103 Early Hints) before the
    answer are skipped; a value with a bare CR and a folded value are never
    relayed, while the answer itself still is."""
    continued = (b"HTTP/1.1 100 Continue\r\nX-Ignored: 1\r\n\r\n"
                 b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n")
    body = scripted_reply("HTTP/1.1 200 OK", JSON_HEADERS + [
        ("X-Request-Id", "req\rSet-Cookie: a=b"), ("x-ratelimit-limit-requests", "7"),
        ("x-ratelimit-remaining-requests", "6\r\n\tSet-Cookie: c=d")], SCRIPTED_BODY)[0]
    gw, scripted = start_scripted_gateway(make_gateway, [(continued + body, False)])
    try:
        key = gw.create_key()[1]
        response, client = exchange(gw, json_request(CHAT, key, chat_body("scripted-1")))
        client.close()
        assert response.status == 200 and response.body == SCRIPTED_BODY, response
        names = [name.lower() for name, _ in response.header_list]
        assert "set-cookie" not in names and "x-ignored" not in names and "link" not in names, response.header_list
        assert "x-request-id" not in names and "x-ratelimit-remaining-requests" not in names, response.header_list
        assert response.header("x-ratelimit-limit-requests") == "7"
        row, = settled_rows(gw, 1)
        assert (row["status"], row["request_tokens"], row["response_tokens"]) == ("ok", 17, 4)
    finally:
        scripted.close()


def test_a_chunked_answer_closed_inside_its_trailer_is_whole_as_http_client_read_it(scripted_gateway):
    """A provider that ends a chunked answer with its last chunk (``0``) and
    closes without the blank line after the trailer: http.client took the
    close for the end of the trailer, as the body is whole; the gateway's
    own reader called the answer cut short (502, and a retry sent the call
    to the provider again)."""
    reply = json.dumps({"id": "chatcmpl-1", "object": "chat.completion", "choices": [],
                        "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}}).encode()

    def script(handler, _):
        handler.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n"
                            b"\r\n%s0\r\n" % chunk(reply))
        handler.close_connection = True

    upstream, gateway = scripted_gateway(script, routing=RETRYING)
    record, key = gateway.create_key()
    response = answer(gateway, CHAT, body_for(CHAT), key)
    assert response.status == 200 and json.loads(response.body)["id"] == "chatcmpl-1", response
    assert len(upstream.requests) == 1
    row, = settled_rows(gateway)
    assert (row["status"], row["usage_source"]) == ("ok", "reported"), row


# ==== 1.12 Upstream faults =========================================================

def test_refused_upstream_is_502_fast(make_gateway, upstream):
    """[U01] Provider at a closed port: tried once more after a short
    backoff (nothing was sent), then 502 upstream_unavailable in < 1 s;
    rows upstream_error with no tokens, one per attempt; no retry storm."""
    dead = "http://127.0.0.1:%d" % free_port()
    gw = make_gateway(server=dict(SERVER), rate_limits=RATE_LIMITS, routing=RETRYING, providers={
        "dead": {"base_url": dead, "api_key": OPENAI_KEY, "models": ["dead-*"]},
        "deadanth": {"base_url": dead, "api_key": ANTHROPIC_KEY, "format": "anthropic", "models": ["deadanth-*"]}})
    key = gw.create_key()[1]
    for path, model in ((CHAT, "dead-model"), (MESSAGES, "deadanth-model")):
        started = time.monotonic()
        response = post(gw, path, body_for(path, model), key)
        assert time.monotonic() - started < 1.0
        payload = assert_json_error(response, 502, dialect_of(path))
        if path == CHAT:
            assert payload["error"]["code"] == "upstream_unavailable"
        assert response.header("x-llmgw-attempts") == "2"
    rows = settled_rows(gw, 4)
    assert [(r["status"], r["http_status"], r["request_tokens"], r["response_tokens"], r["attempt_kind"])
            for r in rows] == [("upstream_error", None, 0, 0, "first"), ("upstream_error", None, 0, 0, "retry")] * 2
    assert upstream.requests == []
    assert_alive(gw, key)


def test_hanging_upstream_is_504_after_upstream_timeout(gw, key, upstream):
    """[U03] No status line ever: 504 after upstream_timeout (OpenAI and
    Anthropic at once), rows ``timeout``, the provider connection closed,
    the workers free."""
    results = {}

    def run(path):
        started = time.monotonic()
        response = post(gw, path, body_for(path, "gpt-4o-mini-hang"), key, timeout=10)
        results[path] = (time.monotonic() - started, response)
    threads = [threading.Thread(target=run, args=(path,)) for path in (CHAT, MESSAGES)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    for path, (elapsed, response) in results.items():
        assert SERVER["upstream_timeout"] - 0.1 <= elapsed < SERVER["upstream_timeout"] + 1.0, elapsed
        assert_json_error(response, 504, dialect_of(path))
    rows = settled_rows(gw, 2)
    assert sorted((r["endpoint"], r["status"]) for r in rows) == [(CHAT, "timeout"), (MESSAGES, "timeout")]
    assert wait_until(lambda: upstream.open_connections == 0, 1.0)
    assert_alive(gw, key)


@pytest.mark.parametrize("path", [CHAT, MESSAGES])
@pytest.mark.parametrize("fault,status", [("fail500", 500), ("fail529", 529), ("fail400", 400)])
def test_provider_errors_pass_through_after_the_bounded_retry(make_gateway, upstream, path, fault, status):
    """[U04] The provider's 4xx/5xx: the status passed on, the provider's
    JSON error body. A 500 or 529 is tried once more (the provider did no
    billable work), a 400 never; rows upstream_error with that status, one
    per attempt."""
    gw = make_gateway(server=dict(SERVER), rate_limits=RATE_LIMITS, routing=RETRYING)
    key = gw.create_key()[1]
    attempts = 1 if status == 400 else 2
    response = post(gw, path, body_for(path, "gpt-4o-mini-" + fault), key)
    assert response.status == status
    payload = response.json()
    if path == MESSAGES:
        assert payload["type"] == "error"
        assert payload["error"]["type"] == {500: "api_error", 529: "overloaded_error", 400: "invalid_request_error"}[status]
    else:
        assert payload["error"]["type"] == {500: "server_error", 529: "server_error", 400: "invalid_request_error"}[status]
    wait_idle(gw)  # the call has ended: no attempt is still to come
    assert len(upstream.requests) == attempts == int(response.header("x-llmgw-attempts"))
    rows = settled_rows(gw, attempts)
    assert [(row["status"], row["http_status"]) for row in rows] == [("upstream_error", status)] * attempts
    assert_alive(gw, key)


@pytest.mark.parametrize("path", [CHAT, MESSAGES])
def test_rate_limited_upstream_keeps_retry_after(gw, key, upstream, path):
    """[U05] 429 with retry-after: both passed on; one attempt (with
    retries on, a Retry-After longer than routing.backoff_max is not
    waited for either: see test_routing.py)."""
    response = post(gw, path, body_for(path, "gpt-4o-mini-fail429"), key)
    assert response.status == 429 and response.header("retry-after") == "7"
    assert len(upstream.requests) == 1
    assert_alive(gw, key)


@pytest.mark.parametrize("path,provider,secret", [(CHAT, "openai", OPENAI_KEY), (MESSAGES, "anthropic", ANTHROPIC_KEY)])
def test_provider_auth_failure_is_withheld_and_logged(gw, key, upstream, gwlog, path, provider, secret):
    """[U06] The provider's 401 quotes part of our key: the client gets 502
    upstream_auth_error with a generic message, none of the provider's body;
    the log names the provider, without the key."""
    response = post(gw, path, body_for(path, "gpt-4o-mini-leak401"), key)
    payload = assert_json_error(response, 502, dialect_of(path))
    if path == CHAT:
        assert payload["error"]["code"] == "upstream_auth_error"
    masked = secret[:8] + "..." + secret[-4:]
    for fragment in (secret, masked, "Incorrect API key", secret[:8]):
        assert fragment.encode() not in response.body
    lines = [line for line in gwlog.lines() if provider in line and "401" in line]
    assert lines, gwlog.lines()
    assert secret not in gwlog.text() and masked not in gwlog.text()
    row, = settled_rows(gw, 1)
    assert (row["status"], row["http_status"]) == ("upstream_error", 401)
    assert_alive(gw, key)


@pytest.mark.parametrize("path", [CHAT, MESSAGES])
@pytest.mark.parametrize("fault,http_status", [("badjson", 200), ("html502", 502)])
def test_non_json_upstream_answers_are_502_json(gw, key, upstream, path, fault, http_status):
    """[U07 C04] A 200 with HTML, or a CDN's HTML 502: the client gets a
    502 JSON error (never the HTML), row upstream_error."""
    response = post(gw, path, body_for(path, "gpt-4o-mini-" + fault), key)
    payload = assert_json_error(response, 502, dialect_of(path))
    if path == CHAT:
        assert payload["error"]["code"] == "upstream_bad_response"
    assert b"<html" not in response.body.lower()
    row, = settled_rows(gw, 1)
    assert (row["status"], row["http_status"]) == ("upstream_error", http_status)
    assert_alive(gw, key)


@pytest.mark.parametrize("path", [CHAT, MESSAGES])
def test_missing_usage_is_estimated(gw, key, upstream, path):
    """[U08] 200 without usage: passed on; the row is marked estimated."""
    response = post(gw, path, body_for(path, "gpt-4o-mini-nousage"), key)
    assert response.status == 200 and "usage" not in response.json()
    row, = settled_rows(gw, 1)
    assert (row["status"], row["usage_source"]) == ("ok", "estimated")
    assert row["request_tokens"] > 0
    assert_alive(gw, key)


def read_stream(gw, path, model, key, **extra):
    client = RawClient(gw)
    started = time.monotonic()
    client.send(json_request(path, key, body_for(path, model, stream=True, **extra)))
    response = client.read_response(timeout=10)
    elapsed = time.monotonic() - started
    client.close()
    return response, elapsed


def assert_error_event_last(path, body):
    events = sse_events(body)
    name, data = events[-1]
    payload = json.loads(data)
    if path == MESSAGES:
        assert name == "error" and payload["type"] == "error", events
    else:
        assert name is None and isinstance(payload["error"]["message"], str), events
        assert (None, "[DONE]") not in events
    return payload


@pytest.mark.parametrize("path", [CHAT, MESSAGES])
@pytest.mark.parametrize("fault", ["dropstream", "cutmidevent", "rst"])
def test_broken_upstream_stream_ends_cleanly(gw, key, upstream, gwlog, path, fault):
    """[U09 U10] Stream cut by the provider (FIN without terminator, half
    an event, or RST): the client's chunked stream ends with its
    terminator after an error event; row upstream_truncated; no traceback."""
    response, _ = read_stream(gw, path, "gpt-4o-mini-" + fault, key)
    assert response.status == 200 and response.terminated
    assert_error_event_last(path, response.body)
    row, = settled_rows(gw, 1)
    assert (row["status"], row["streamed"]) == ("upstream_truncated", 1)
    assert "Traceback" not in gwlog.text()
    assert_alive(gw, key)


@pytest.mark.parametrize("path", [CHAT, MESSAGES])
def test_dripping_stream_is_stopped_by_the_request_deadline(make_gateway, upstream, path):
    """[U11] One event every 0.3 s forever (never idle long enough): the
    request deadline stops it; the client's stream ends cleanly with an
    error event; row timeout; the provider connection closed."""
    gw = make_gateway(server=dict(SERVER, request_deadline=1.5), rate_limits=RATE_LIMITS, routing=ONE_ATTEMPT)
    key = gw.create_key()[1]
    response, elapsed = read_stream(gw, path, "gpt-4o-mini-drip", key)
    assert 1.4 <= elapsed < 2.5, elapsed
    assert response.status == 200 and response.terminated
    assert_error_event_last(path, response.body)
    row, = settled_rows(gw, 1)
    assert (row["status"], row["streamed"]) == ("timeout", 1)
    assert wait_until(lambda: upstream.open_connections == 0, 1.5)
    assert_alive(gw, key)


def test_stalled_stream_is_stopped_by_the_idle_timeout(make_gateway, upstream):
    """[U11] Gaps of 0.3 s against stream_idle_timeout 0.2 s: the stream is
    stopped at the first gap, before its first content event, so nothing
    was relayed (the preamble is held back): a 504 JSON answer, row timeout."""
    gw = make_gateway(server=dict(SERVER, stream_idle_timeout=0.2), rate_limits=RATE_LIMITS, routing=ONE_ATTEMPT)
    key = gw.create_key()[1]
    response, elapsed = read_stream(gw, CHAT, "gpt-4o-mini-drip", key)
    assert elapsed < 1.0, elapsed
    assert_json_error(response, 504)
    row, = settled_rows(gw, 1)
    assert row["status"] == "timeout"
    assert_alive(gw, key)


def test_dripping_nonstreamed_body_is_stopped_by_the_request_deadline(make_gateway, upstream):
    """[U11] A non-streamed answer whose body arrives one byte every 0.3 s:
    each read is quick, so only the request deadline can stop it: 504 JSON
    soon after request_deadline, row timeout."""
    gw = make_gateway(server=dict(SERVER, request_deadline=1.5), rate_limits=RATE_LIMITS, routing=ONE_ATTEMPT)
    key = gw.create_key()[1]
    started = time.monotonic()
    try:
        response = post(gw, CHAT, chat_body("gpt-4o-mini-drip"), key, timeout=4)
    except socket.timeout:
        response = None
    elapsed = time.monotonic() - started
    assert response is not None, "no answer after %.1f s: request_deadline (1.5 s) not enforced on a " \
        "non-streamed body" % elapsed
    assert elapsed < 2.5
    assert response.status == 504
    row, = settled_rows(gw, 1)
    assert row["status"] == "timeout"
    assert_alive(gw, key)


@pytest.mark.parametrize("path", [CHAT, MESSAGES])
def test_awkward_sse_framing_is_relayed_byte_identical(gw, key, upstream, path):
    """[U14] CRLF line ends and one byte per chunk (split events and UTF-8):
    the client gets the provider's bytes unchanged; usage parsed."""
    extra = {"stream_options": {"include_usage": True}} if path == CHAT else {}
    raw = json.dumps(body_for(path, "gpt-4o-mini-bytewise-crlf", stream=True, **extra)).encode()
    direct = post(upstream.url, path, None, raw_body=raw)
    response = post(gw, path, None, key, raw_body=raw)
    assert response.status == 200
    assert normalise_ids(response.body) == normalise_ids(direct.body)
    assert b"\r\n\r\n" in response.body
    row, = settled_rows(gw, 1)
    assert (row["status"], row["usage_source"]) == ("ok", "reported")
    assert (row["request_tokens"], row["response_tokens"]) == expected_tokens(path, upstream.reported[1]["usage"])
    assert_alive(gw, key)


@pytest.mark.parametrize("path", [CHAT, MESSAGES])
def test_midstream_error_event(gw, key, upstream, path):
    """[U15] The provider's mid-stream error event is relayed as the one
    error; the stream ends cleanly; row upstream_error."""
    response, _ = read_stream(gw, path, "gpt-4o-mini-errevent", key)
    assert response.status == 200 and response.terminated
    payload = assert_error_event_last(path, response.body)
    assert "errevent" in json.dumps(payload) or path == MESSAGES
    row, = settled_rows(gw, 1)
    assert row["status"] == "upstream_error"
    assert_alive(gw, key)


@pytest.mark.parametrize("path,stream", [(CHAT, False), (CHAT, True), (MESSAGES, False), (MESSAGES, True)])
def test_gateway_asks_for_identity_encoding(gw, key, upstream, path, stream):
    """[U17] The gateway asks for ``Accept-Encoding: identity`` whatever the
    client accepts, so usage is readable; tokens equal what was reported."""
    extra = {"stream": True} if stream else {}
    response = post(gw, path, body_for(path, "gpt-4o-mini-gzip", **extra), key,
                    headers={"Accept-Encoding": "gzip, deflate"})
    assert response.status == 200 and response.header("content-encoding") is None
    received, = upstream.requests
    assert received["headers"]["accept-encoding"] == "identity" and received["gzipped"] is False
    row, = settled_rows(gw, 1)
    assert row["status"] == "ok"
    assert (row["request_tokens"], row["response_tokens"]) == expected_tokens(path, upstream.reported[0]["usage"])
    assert_alive(gw, key)


# ==== 1.18 Thread and connection leaks under a fault storm =======================

STORM_FAULTS = ["", "fail500", "fail429", "badjson", "html502", "leak401", "redirect", "bighdr", "nousage",
                "slow", "fail529", "gzip"]
STORM_STREAM_FAULTS = ["", "dropstream", "cutmidevent", "rst", "errevent", "bytewise"]


def test_fault_storm_leaks_no_threads_or_connections(gw, key, upstream):
    """[E05 E06] 100 mixed faulty requests at concurrency 10: all answered;
    afterwards no thread beyond the idle workers that concurrency needed,
    every other thread back to baseline, and the fake holds no more open
    connections than the gateway's idle pool (<= 10)."""
    assert_alive(gw, key)
    wait_idle(gw)
    baseline_others = other_threads()
    rng = random.Random(4)
    jobs = []
    for index in range(100):
        path = (CHAT, MESSAGES, RESPONSES, COMPLETIONS)[index % 4]
        if index % 3 == 0:
            jobs.append((path, "gpt-4o-mini-" + rng.choice(STORM_STREAM_FAULTS), True))
        else:
            jobs.append((path, "gpt-4o-mini-" + rng.choice(STORM_FAULTS), False))
    jobs = [(path, model.rstrip("-"), stream) for path, model, stream in jobs]
    statuses, errors = [], []
    lock = threading.Lock()

    def worker(mine):
        for path, model, stream in mine:
            try:
                extra = {"stream": True} if stream else {}
                response = post(gw, path, body_for(path, model, **extra), key, timeout=10)
                with lock:
                    statuses.append(response.status)
            except Exception as exc:
                errors.append(exc)
    threads = [threading.Thread(target=worker, args=(jobs[i::10],)) for i in range(10)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert errors == [] and len(statuses) == 100
    assert set(statuses) <= {200, 429, 500, 502, 529}, statuses
    # A worker still writing its reply (or its log line) when its client's
    # next request arrives cannot take it: at most two per client.
    assert worker_threads() <= 2 * 10, "worker threads after the storm: %d" % worker_threads()
    assert wait_until(lambda: other_threads() == baseline_others, 3.0), (other_threads(), baseline_others)
    assert wait_until(lambda: upstream.open_connections <= 10, 1.0), upstream.open_connections
    rows = settled_rows(gw, 101)
    assert len(rows) == 101 == len(upstream.requests)
    assert_alive(gw, key)


def chunk(data):
    return b"%x\r\n%s\r\n" % (len(data), data)


def raw_head(gateway, request, timeout=3.0):
    """The bytes of the response head ``request`` gets, exactly as sent."""
    sock = socket.create_connection(("127.0.0.1", gateway.port), timeout=timeout)
    try:
        sock.sendall(request)
        data = b""
        while b"\r\n\r\n" not in data:
            received = sock.recv(65536)
            assert received, "the connection closed before a whole response head: %r" % data
            data += received
        return data.split(b"\r\n\r\n", 1)[0]
    finally:
        sock.close()


# ---- B1: Connection: close framing ---------------------------------------------------

@pytest.mark.parametrize("path,model", [(CHAT, "gpt-4o-mini-closedelim"), (MESSAGES, "claude-haiku-4-5-closedelim")])
@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_b1_close_delimited_answers_are_relayed_metered_and_free_their_slot(make_gateway, upstream, path, model,
                                                                            stream):
    gateway = make_gateway(pricing={"default": {"input": 1, "output": 1}})
    record, key = gateway.create_key(max_budget=10, max_parallel=1)
    response = answer(gateway, path, body_for(path, model=model, stream=stream, max_tokens=10), key)
    assert response.status == 200, response
    reported = upstream.reported[-1]
    assert reported["complete"] and reported["stream"] == stream
    if stream:
        last = sse_events(response.body)[-1]
        if path == CHAT:
            assert last == (None, "[DONE]"), last
        else:
            assert last[0] == "message_stop", last
    else:
        assert response.json()["usage"] == reported["usage"]

    row, = settled_rows(gateway)
    columns = expected_columns(path, reported["usage"])
    assert (row["status"], row["usage_source"], row["http_status"]) == ("ok", "reported", 200), row
    assert tokens_of(row) == columns
    assert row["cost_nanousd"] == expected_cost(columns, 1, 1)
    assert ledger(gateway, record["id"]) == (row["cost_nanousd"], 0)
    # max_parallel=1: the call above must have given its in-flight slot back.
    follow_up = answer(gateway, CHAT, body_for(CHAT), key)
    assert follow_up.status == 200, follow_up


# ---- B3: a Responses stream event with "type": null ----------------------------------

def test_b3_a_null_event_type_ends_the_stream_and_frees_the_connection(scripted_gateway):
    body = b'event: response.completed\ndata: {"type": null, "response": {}}\n\n'

    def script(handler, _):
        handler.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                            b"Content-Length: %d\r\n\r\n%s" % (len(body), body))

    # The stream ends with no output and no terminal event the gateway
    # recognises: nothing was relayed (the preamble is held back), so the
    # client gets a 502 instead (not retried here: one request each).
    upstream, gateway = scripted_gateway(script, server={"max_connections": 3}, routing={"retries": 0})
    record, key = gateway.create_key()
    for attempt in range(4):  # one more than max_connections
        client = RawClient(gateway, timeout=2)
        client.send(json_request(RESPONSES, key, {"model": "gpt-4o-mini", "input": "x", "stream": True}))
        response = client.read_response(timeout=1.5)
        client.close()
        assert response is not None and response.status == 502, (attempt, response)
        assert response.terminated, "answer %d never ended: %r" % (attempt, response)
    assert len(upstream.requests) == 4
    rows = settled_rows(gateway, 4)
    assert [row["status"] for row in rows if row["status"] == "pending"] == []
    assert health_recovers(gateway), "connection slots leaked: /health is refused"


# ---- B5: pooled connections the provider closed while idle ---------------------------

def test_b5_connections_closed_by_the_provider_while_idle_are_not_reused(scripted_gateway):
    reply = json.dumps({"id": "chatcmpl-1", "object": "chat.completion", "choices": [],
                        "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}}).encode()

    def script(handler, _):
        time.sleep(0.2)  # the warm-up calls overlap: three pooled connections
        handler.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                            b"Content-Length: %d\r\n\r\n%s" % (len(reply), reply))

    upstream, gateway = scripted_gateway(script, idle_timeout=0.3)
    record, key = gateway.create_key()
    results = []
    warm = [threading.Thread(target=lambda: results.append(answer(gateway, CHAT, body_for(CHAT), key).status))
            for _ in range(3)]
    for thread in warm:
        thread.start()
    for thread in warm:
        thread.join(5)
    assert results == [200, 200, 200]
    assert len({address for address, _ in upstream.requests}) == 3, "warm-up did not use three connections"

    assert wait_until(lambda: upstream.closed == 3, timeout=5)  # idle for 0.3 s, each was closed
    response = answer(gateway, CHAT, body_for(CHAT), key)
    assert response.status == 200, response
    assert len(upstream.requests) == 4
    assert [row["status"] for row in settled_rows(gateway, 4)] == ["ok"] * 4


def test_an_answer_nobody_asked_for_on_an_idle_connection_is_not_taken_for_the_next(scripted_gateway):
    """A provider (or its load balancer) that writes on a pooled connection
    after its answer, say a 408 before it closes an idle one: the next call
    must not take those bytes for its answer (it got the stray 500, was
    recorded as a provider error and sent again)."""
    reply = json.dumps({"id": "chatcmpl-1", "object": "chat.completion", "choices": [],
                        "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}}).encode()

    def script(handler, _):
        handler.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                            b"Content-Length: %d\r\n\r\n%s" % (len(reply), reply))
        handler.wfile.flush()
        time.sleep(0.05)  # after the gateway pooled the connection
        handler.wfile.write(b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\n\r\n")
        handler.wfile.flush()
        strays.release()

    strays = threading.Semaphore(0)
    upstream, gateway = scripted_gateway(script, routing=RETRYING)
    record, key = gateway.create_key()
    for _ in range(3):
        response = answer(gateway, CHAT, body_for(CHAT), key)
        assert response.status == 200, response
        assert strays.acquire(timeout=5)  # the stray answer is on its way over loopback
    assert len(upstream.requests) == 3
    assert [(row["status"], row["http_status"]) for row in settled_rows(gateway, 3)] == [("ok", 200)] * 3


def test_b5_a_stream_framed_by_content_length_leaves_its_connection_pooled(scripted_gateway):
    """A provider may frame an SSE answer with Content-Length instead of
    chunks; once its last event is read, the connection serves the next call
    (http.client's read1 never marks such a body done at length 0)."""
    usage = {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}
    body = b"".join((b'data: {"id":"c1","choices":[{"index":0,"delta":{"content":"hi"}}]}\n\n',
                     b'data: {"id":"c1","choices":[],"usage":%s}\n\n' % json.dumps(usage).encode(),
                     b"data: [DONE]\n\n"))

    def script(handler, _):
        handler.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                            b"Content-Length: %d\r\n\r\n%s" % (len(body), body))

    upstream, gateway = scripted_gateway(script)
    record, key = gateway.create_key()
    for _ in range(2):
        response = answer(gateway, CHAT, body_for(CHAT, stream=True), key)
        assert response.status == 200 and sse_events(response.body)[-1] == (None, "[DONE]"), response
    assert len({address for address, _ in upstream.requests}) == 1, "the second call opened a new connection"
    assert [row["status"] for row in settled_rows(gateway, 2)] == ["ok"] * 2


# ---- B10: a provider that holds the connection after [DONE] --------------------------

def test_b10_the_stream_ends_at_done_even_if_the_provider_holds_the_connection(scripted_gateway):
    usage = {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}

    def script(handler, _):
        handler.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                            b"Transfer-Encoding: chunked\r\n\r\n")
        for event in (b'data: {"id":"c1","choices":[{"index":0,"delta":{"content":"hi"}}]}\n\n',
                      b'data: {"id":"c1","choices":[],"usage":%s}\n\n' % json.dumps(usage).encode(),
                      b"data: [DONE]\n\n"):
            handler.wfile.write(chunk(event))
        time.sleep(3)
        handler.wfile.write(b"0\r\n\r\n")

    upstream, gateway = scripted_gateway(script)
    record, key = gateway.create_key()
    client = RawClient(gateway, timeout=2)
    started = time.monotonic()
    client.send(json_request(CHAT, key, body_for(CHAT, stream=True)))
    response = client.read_response(timeout=1.0)
    elapsed = time.monotonic() - started
    client.close()
    assert response.status == 200 and response.terminated, response
    assert sse_events(response.body)[-1] == (None, "[DONE]"), response.body
    assert elapsed < 1.0, "the stream ended %.2f s after the request" % elapsed
    row, = settled_rows(gateway)
    assert (row["status"], row["usage_source"]) == ("ok", "reported"), row
    assert tokens_of(row) == expected_columns(CHAT, usage)


# ---- obs-fold in a provider's response headers ---------------------------------------

def test_obs_fold_in_a_provider_header_never_reaches_the_client_as_a_header(scripted_gateway):
    reply = json.dumps({"id": "chatcmpl-1", "object": "chat.completion", "choices": [],
                        "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}}).encode()

    def script(handler, _):
        handler.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                            b"X-Request-Id: abc\r\n Set-Cookie: evil=1\r\n"
                            b"Content-Length: %d\r\n\r\n%s" % (len(reply), reply))

    upstream, gateway = scripted_gateway(script)
    record, key = gateway.create_key()
    head = raw_head(gateway, json_request(CHAT, key, body_for(CHAT)))
    lines = head.split(b"\r\n")
    assert lines[0].startswith(b"HTTP/1.1 200 "), head
    assert b"\n" not in head.replace(b"\r\n", b"") and b"\r" not in head.replace(b"\r\n", b""), head
    for line in lines[1:]:
        assert not line[:1].isspace(), "continuation line sent to the client: %r" % head
        name = line.split(b":", 1)[0].strip().lower()
        assert name != b"set-cookie", "Set-Cookie injected: %r" % head
    row, = settled_rows(gateway)
    assert row["status"] == "ok", row


# ---- Responses stream estimates count the generated text once --------------------

def test_responses_stream_estimate_counts_text_once(gateway, vkey):
    """A Responses stream repeats its text in ``*.done`` events; an estimate
    made from everything relayed counted it about three times."""
    response = post(gateway, RESPONSES, {"model": "gpt-4o-mini-nousage", "input": "hi", "stream": True}, vkey)
    assert response.status == 200
    deltas = [json.loads(data)["delta"] for name, data in sse_events(response.body)
              if name == "response.output_text.delta"]
    assert deltas, "the fake streamed no text"
    [row] = gateway.wait_for_rows(lambda rows: rows and rows[-1]["status"] != "pending")
    assert row["usage_source"] == "estimated"
    assert row["output_tokens"] == llmgw.estimate_tokens(len("".join(deltas)))
