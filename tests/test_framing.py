"""Malformed HTTP and framing, request smuggling, oversized headers and bodies,
bad JSON bodies and content types, header injection and hop-by-hop headers,
unlisted paths (RELIABILITY.md 1.1, 1.2, 1.5, 1.6, 1.9, 1.11).

The real gateway (``make_gateway``, small timeouts) is driven over raw
sockets, so every byte of the request and of the answer is the test's to
choose and to see. Every test ends with ``assert_alive`` (conftest.py): a
normal request, answered correctly and in time, with its usage row.
RELIABILITY ids are given in brackets in each test's docstring.
"""

import json
import random
import re
import time

import pytest

import llmgw
from conftest import (ANTHROPIC_KEY, CHAT, CREDENTIAL_HEADERS, MESSAGES, MODELS, OPENAI_KEY, RATE_LIMITS, SERVER,
                      RawClient, assert_alive, assert_json_error, body_for, chat_body, dialect_of, exchange,
                      expected_tokens, json_request, post, request_bytes)

#: Whatever a test did, its gateways end with no row pending, nothing reserved, nothing in flight.
pytestmark = pytest.mark.usefixtures("balanced_books")


def assert_closed_after_error(client, response, status, **kwargs):
    """An error answer with connection: close, then EOF and nothing else."""
    assert_json_error(response, status, close=True, **kwargs)
    assert client.wait_eof(2.0), "the gateway kept the connection open after a framing error"
    assert client.buffer == b"", "bytes after the error response: %r" % client.buffer
    assert status_lines(client.received) == 1, client.received


def status_lines(data):
    return len(re.findall(rb"HTTP/1\.[01] \d{3} ", data))


# ==== 1.1 Malformed HTTP and framing ==========================================

#: (id, request bytes, status); ``{key}`` becomes the test's virtual key. Each
#: is refused before routing: OpenAI-shaped JSON, connection: close, the fake
#: upstream never called.
MALFORMED = [
    ("H02-long-line", b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414),
    ("H02-long-query", b"POST /v1/chat/completions?" + b"q" * 9000 + b" HTTP/1.1\r\nHost: x\r\n"
     b"Authorization: Bearer {key}\r\nContent-Length: 2\r\n\r\n{}", 414),
    ("H03-101-fields", b"GET /v1/models HTTP/1.1\r\n" + b"".join(b"X-F%d: v\r\n" % i for i in range(101))
     + b"\r\n", 431),
    ("H03-70KiB-line", b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (70 * 1024) + b"\r\n\r\n", 431),
    ("H03-40KiB-total", b"GET /v1/models HTTP/1.1\r\nHost: x\r\n"
     + b"".join(b"X-F%d: %s\r\n" % (i, b"b" * 1024) for i in range(40)) + b"\r\n", 431),
    ("H04-http09", b"GET /v1/models\r\n\r\n", 400),
    ("H04-http09-no-blank", b"GET /v1/models\r\n", 400),
    ("H05-http2", b"GET /v1/models HTTP/2.0\r\nHost: x\r\n\r\n", 505),
    ("H05-http12", b"GET /v1/models HTTP/1.2\r\nHost: x\r\n\r\n", 505),
    ("H05-1.1x", b"GET /v1/models HTTP/1.1x\r\nHost: x\r\n\r\n", 400),
    ("H05-01.1", b"GET /v1/models HTTP/01.1\r\nHost: x\r\n\r\n", 400),
    ("H05-lower-http", b"GET /v1/models http/1.1\r\nHost: x\r\n\r\n", 400),
    ("H05-http3", b"GET /v1/models HTTP/3\r\nHost: x\r\n\r\n", 400),
    ("H12-absolute-form", b"POST http://169.254.169.254/v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
     b"Authorization: Bearer {key}\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}", 400),
    ("H12-absolute-get", b"GET http://127.0.0.1/v1/models HTTP/1.1\r\nHost: x\r\n"
     b"Authorization: Bearer {key}\r\n\r\n", 400),
    ("H12-asterisk", b"OPTIONS * HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    ("H14-connect", b"CONNECT 169.254.169.254:80 HTTP/1.1\r\nHost: 169.254.169.254:80\r\n\r\n", 400),
    ("H14-nul-method", b"GET\x00 /v1/models HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    ("H16-space-before-colon", b"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization : Bearer {key}\r\n\r\n", 400),
    ("H16-empty-name", b"GET /v1/models HTTP/1.1\r\nHost: x\r\n: nameless\r\n\r\n", 400),
    ("H16-non-ascii-name", b"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuth\xc3\xa9: x\r\n\r\n", 400),
    ("H16-no-colon", b"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization Bearer {key}\r\n\r\n", 400),
    ("X01-obs-fold", b"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\nX-Foo: a\r\n b\r\n\r\n",
     400),
    ("X01-obs-fold-tab", b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Foo: a\r\n\tb: c\r\n"
     b"Authorization: Bearer {key}\r\n\r\n", 400),
    ("X01-folded-credential", b"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer\r\n {key}\r\n\r\n", 400),
    ("X02-bare-cr", b"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n"
     b"anthropic-version: 2023-06-01\rX-Injected: 1\r\n\r\n", 400),
    ("X02-nul", b"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\nanthropic-beta: a\x00b\r\n\r\n",
     400),
    ("X02-del", b"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\nopenai-beta: a\x7fb\r\n\r\n",
     400),
    ("dup-authorization", b"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n"
     b"Authorization: Bearer other\r\n\r\n", 400),
    ("dup-host", b"GET /v1/models HTTP/1.1\r\nHost: x\r\nHost: evil\r\nAuthorization: Bearer {key}\r\n\r\n", 400),
]


@pytest.mark.parametrize("data,status", [case[1:] for case in MALFORMED], ids=[case[0] for case in MALFORMED])
def test_malformed_requests_are_refused_and_closed(shared, data, status):
    """[H02 H03 H04 H05 H12 H14 H16 X01 X02] Refused before routing with a
    JSON error and connection: close; never forwarded."""
    gw, key, upstream = shared.gw, shared.key, shared.upstream
    response, client = exchange(gw, data.replace(b"{key}", key.encode()))
    try:
        assert_closed_after_error(client, response, status)
    finally:
        client.close()
    assert upstream.requests == []
    assert_alive(gw, key)


@pytest.mark.parametrize("seed", [1, 2, 3, 4, 5, 6])
def test_random_bytes_are_refused(shared, seed):
    """[H01] Random bytes (and a TLS ClientHello) on the HTTP port: a JSON
    400 at the first line end, or 408 at the header deadline if no line
    ever ends; always closed."""
    gw, key, upstream = shared.gw, shared.key, shared.upstream
    rng = random.Random(seed)
    if seed == 6:  # a TLS 1.2 ClientHello's first bytes: no newline
        data = bytes.fromhex("16030100a5010000a10303") + bytes(rng.randrange(256) for _ in range(160))
        data = data.replace(b"\n", b"\x00")
    else:
        data = bytes(rng.randrange(256) for _ in range(512))
    expected = 400 if b"\n" in data else 408
    started = time.monotonic()
    response, client = exchange(gw, data)
    try:
        assert_closed_after_error(client, response, expected)
    finally:
        client.close()
    if expected == 400:
        assert time.monotonic() - started < 0.5
    assert upstream.requests == []
    assert_alive(gw, key)


SMUGGLED_BODY = b'{"model":"gpt-4o-mini-smuggled","messages":[],"padding":1}'
SMUGGLED = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(SMUGGLED_BODY), SMUGGLED_BODY))
ADMIN_SMUGGLED = b"GET /admin/virtual-keys HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n\r\n"
FRAMING = [
    ("H06-CL-TE", [("Content-Length", "6"), ("Transfer-Encoding", "chunked")], b"0\r\n\r\n" + SMUGGLED, 400),
    ("H06-TE-CL", [("Transfer-Encoding", "chunked"), ("Content-Length", "6")], b"0\r\n\r\n" + SMUGGLED, 400),
    ("H06-CL-TE-identity", [("Content-Length", "4"), ("Transfer-Encoding", "identity")], b"{}\r\n" + SMUGGLED,
     400),
    ("H08-dup-CL-5-40", [("Content-Length", "5"), ("Content-Length", "40")], b'{"a":1}' + b" " * 33 + SMUGGLED,
     400),
    ("H08-dup-CL-admin", [("Content-Length", "2"), ("Content-Length", "80")], b"{}" + ADMIN_SMUGGLED, 400),
    ("H08-dup-CL-equal", [("Content-Length", "2"), ("Content-Length", "2")], b"{}" + SMUGGLED, 400),
    ("H08-CL-list", [("Content-Length", "2, 2")], b"{}" + SMUGGLED, 400),
    ("H07-chunked", [("Transfer-Encoding", "chunked")], b"2\r\n{}\r\n0\r\n\r\n" + SMUGGLED, 411),
    ("H07-chunked-identity", [("Transfer-Encoding", "chunked, identity")], b"2\r\n{}\r\n0\r\n\r\n", 411),
    ("H07-space-chunked", [("Transfer-Encoding", " chunked")], b"2\r\n{}\r\n0\r\n\r\n", 411),
    ("H07-xchunked", [("Transfer-Encoding", "xchunked")], b"2\r\n{}\r\n0\r\n\r\n", 411),
    ("H07-tab-chunked", [("Transfer-Encoding", "\tchunked")], b"2\r\n{}\r\n0\r\n\r\n", 411),
    ("H07-gzip", [("Transfer-Encoding", "gzip")], b"", 411),
    ("H07-upper", [("TRANSFER-ENCODING", "CHUNKED")], b"2\r\n{}\r\n0\r\n\r\n", 411),
    ("H07-te-space-colon", [("Transfer-Encoding ", "chunked")], b"2\r\n{}\r\n0\r\n\r\n", 400),
    ("H09-plus", [("Content-Length", "+2")], b"{}" + SMUGGLED, 400),
    ("H09-minus", [("Content-Length", "-1")], b"{}" + SMUGGLED, 400),
    ("H09-hex", [("Content-Length", "0x2")], b"{}" + SMUGGLED, 400),
    ("H09-underscore", [("Content-Length", "1_0")], b"{}" + b" " * 8 + SMUGGLED, 400),
    ("H09-decimal", [("Content-Length", "2.0")], b"{}" + SMUGGLED, 400),
    ("H09-exponent", [("Content-Length", "2e0")], b"{}" + SMUGGLED, 400),
    ("H09-20-digits", [("Content-Length", "1" * 20)], b"{}", 400),
    ("H09-empty", [("Content-Length", "")], b"{}" + SMUGGLED, 400),
    ("H09-inner-space", [("Content-Length", "2 2")], b"{}" + SMUGGLED, 400),
]


@pytest.mark.parametrize("headers,body,status", [case[1:] for case in FRAMING], ids=[case[0] for case in FRAMING])
def test_ambiguous_body_framing_is_refused(shared, headers, body, status):
    """[H06 H07 H08 H09] CL+TE, TE alone (411), several or malformed
    Content-Lengths: refused with connection: close, exactly one response
    on the socket, nothing (smuggled or not) reaches the fake or the admin
    API."""
    gw, key, upstream = shared.gw, shared.key, shared.upstream
    data = request_bytes("POST", CHAT, [("Authorization", "Bearer " + key), ("Content-Type", "application/json")]
                         + headers, body.replace(b"{key}", key.encode()))
    client = RawClient(gw)
    client.send(data)
    responses = client.read_all(timeout=3.0)
    client.close()
    assert len(responses) == 1, responses
    assert status_lines(client.received) == 1
    assert_json_error(responses[0], status, close=True)
    assert upstream.requests == []
    assert shared.new_rows() == []
    assert_alive(gw, key)


def test_content_length_with_leading_whitespace_is_the_number(shared):
    """[H09] ``Content-Length:  5`` : optional whitespace around a field
    value is not part of it (RFC 9110 5.5), so this is CL 5, as nginx reads
    it. Decided: accepted, and exactly that many bytes are the body."""
    gw, key, upstream = shared.gw, shared.key, shared.upstream
    body = json.dumps(chat_body()).encode()
    data = request_bytes("POST", CHAT, [("Authorization", "Bearer " + key), ("Content-Type", "application/json"),
                                        ("Content-Length", "  %d\t" % len(body))], body)
    response, client = exchange(gw, data)
    client.close()
    assert response.status == 200, response
    assert upstream.requests[0]["body"] == body
    assert_alive(gw, key)


def test_post_without_content_length_is_411(shared):
    """[H10] A POST without Content-Length: 411 in the route's shape."""
    gw, key, upstream = shared.gw, shared.key, shared.upstream
    for path in (CHAT, MESSAGES):
        data = request_bytes("POST", path, [("Authorization", "Bearer " + key),
                                            ("Content-Type", "application/json")])
        response, client = exchange(gw, data)
        client.close()
        assert_json_error(response, 411, dialect_of(path))
    assert upstream.requests == []
    assert shared.new_rows() == []
    assert_alive(gw, key)


def test_pipelined_requests_are_answered_in_order(gw, upstream):
    """[H17] Two requests in one write, with different keys and models:
    answered in order, each row on its own key."""
    record_a, key_a = gw.create_key("project a")
    record_b, key_b = gw.create_key("project b")
    data = json_request(CHAT, key_a, chat_body("gpt-4o-mini", "first")) + \
        json_request(CHAT, key_b, chat_body("gpt-4o", "second"))
    client = RawClient(gw)
    client.send(data)
    first, second = client.read_response(), client.read_response()
    client.close()
    assert (first.status, second.status) == (200, 200)
    assert (first.json()["model"], second.json()["model"]) == ("gpt-4o-mini", "gpt-4o")
    assert [r["json"]["messages"][0]["content"] for r in upstream.requests] == ["first", "second"]
    rows = {row["request_id"]: row for row in gw.rows()}
    assert rows[first.header("x-llmgw-request-id")]["virtual_key_id"] == record_a["id"]
    assert rows[second.header("x-llmgw-request-id")]["virtual_key_id"] == record_b["id"]
    assert_alive(gw, key_a)


@pytest.mark.parametrize("trailing,second_status,forwarded", [
    (b"hello world\r\n\r\n", 400, 1),
    (b"POST /v1/files HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\nContent-Type: application/json\r\n"
     b"Content-Length: 2\r\n\r\n{}", 404, 1),
    (ADMIN_SMUGGLED, (401, 403), 1),  # 403 while the admin API is off, 401 (not the admin token) once on
    (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
     b"Content-Length: %d\r\n\r\n%s" % (len(SMUGGLED_BODY), SMUGGLED_BODY), 401, 1),
    (SMUGGLED, 200, 2),
], ids=["garbage", "files-route", "admin", "no-key", "valid-request"])
def test_bytes_after_the_declared_body_are_a_new_request(shared, trailing, second_status, forwarded):
    """[H11] CL shorter than what was sent: exactly CL bytes are the body;
    the rest is parsed as the next request on its own merits: a valid one
    is served (plain pipelining), anything else never reaches the fake."""
    gw, key, upstream = shared.gw, shared.key, shared.upstream
    body = json.dumps(chat_body()).encode()
    data = json_request(CHAT, key, body) + trailing.replace(b"{key}", key.encode())
    client = RawClient(gw)
    client.send(data)
    first, second = client.read_response(), client.read_response()
    client.close()
    assert first.status == 200, first
    assert upstream.requests[0]["body"] == body
    if second_status == 200:
        assert second.status == 200 and second.json()["model"] == "gpt-4o-mini-smuggled"
    elif isinstance(second_status, tuple):
        assert second.status in second_status, second
        assert_json_error(second, second.status)
    else:
        assert_json_error(second, second_status, close=second_status == 400)
    assert len(upstream.requests) == forwarded
    assert_alive(gw, key)


@pytest.mark.parametrize("target,status", [
    ("//evil/v1/chat/completions", 404),
    ("//127.0.0.1:1/v1/chat/completions", 404),
    ("/http://169.254.169.254/v1/chat/completions", 404),
    ("/v1/chat/completions@169.254.169.254", 404),
])
def test_path_shaped_like_an_authority_never_leaves(shared, sinkhole, target, status):
    """[H12] Targets that look like another host: 404, nothing forwarded."""
    gw, key, upstream = shared.gw, shared.key, shared.upstream
    target = target.replace("127.0.0.1:1", "127.0.0.1:%d" % sinkhole.port)
    response, client = exchange(gw, json_request(target, key, chat_body()))
    client.close()
    assert_json_error(response, status)
    assert upstream.requests == [] and sinkhole.connections() == 0
    assert_alive(gw, key)


def test_expect_continue_with_a_bad_key_gets_401_and_no_continue(gw, key, upstream):
    """[H13] Expect: 100-continue, bad key, 50 MB declared: 401 at once, no
    100 Continue, no body read, connection closed."""
    for path in (CHAT, MESSAGES):
        client = RawClient(gw)
        started = time.monotonic()
        client.send(request_bytes("POST", path, [("Authorization", "Bearer llmgw-not-a-key"),
                                                 ("Content-Type", "application/json"), ("Expect", "100-continue"),
                                                 ("Content-Length", str(50 * 1024 * 1024))]))
        response = client.read_response(timeout=3)
        assert time.monotonic() - started < 0.5
        assert_json_error(response, 401, dialect_of(path), close=True)
        assert client.wait_eof(2)
        assert b"100 Continue" not in client.received
        client.close()
    assert upstream.requests == []
    assert_alive(gw, key)


def test_expect_continue_with_a_good_key(gw, key, upstream):
    """[H13] The good path: 100 Continue only after the key is checked; then
    the body; and a 50 MB declaration with a good key is 413 without 100."""
    body = json.dumps(chat_body()).encode()
    client = RawClient(gw)
    client.send(request_bytes("POST", CHAT, [("Authorization", "Bearer " + key), ("Content-Type", "application/json"),
                                             ("Expect", "100-continue"), ("Content-Length", str(len(body)))]))
    interim = client.read_response()
    assert interim.status == 100
    client.send(body)
    assert client.read_response().status == 200
    client.close()
    assert upstream.requests[0]["body"] == body
    client = RawClient(gw)
    client.send(request_bytes("POST", CHAT, [("Authorization", "Bearer " + key), ("Content-Type", "application/json"),
                                             ("Expect", "100-continue"), ("Content-Length", str(50 * 1024 * 1024))]))
    assert_json_error(client.read_response(timeout=2), 413, close=True)
    assert b"100 Continue" not in client.received
    client.close()
    assert_alive(gw, key)


@pytest.mark.parametrize("method,path,status", [
    ("TRACE", CHAT, 405),
    ("PROPFIND", MODELS, 405),
    ("PATCH", CHAT, 405),
    ("PUT", MESSAGES, 405),
    ("BREW", CHAT, 405),
    ("GET", CHAT, 405),
    ("DELETE", "/v1/models/gpt-4o", 405),  # GET only (a fine-tuned model is not deleted through llmgw)
    ("DELETE", "/v1/models", 405),
    ("post", CHAT, 405),
])
def test_unknown_methods_are_refused(shared, method, path, status):
    """[H14 H05] Methods a route does not take: JSON 404/405 in the route's
    shape; the fake is never called. Methods are case-sensitive (RFC 9110
    9.1): ``post`` is not POST."""
    gw, key, upstream = shared.gw, shared.key, shared.upstream
    data = request_bytes(method, path, [("Authorization", "Bearer " + key), ("Content-Type", "application/json"),
                                        ("Content-Length", "2")], b"{}")
    response, client = exchange(gw, data)
    client.close()
    assert_json_error(response, status, dialect_of(path))
    assert upstream.requests == []
    assert_alive(gw, key)


# ==== 1.2 Oversized headers and bodies ======================================

@pytest.mark.parametrize("path", [CHAT, MESSAGES])
def test_oversized_body_is_413_before_it_is_sent(gw, key, upstream, path):
    """[L01] Honest Content-Length one byte over max_body_bytes: 413 at once,
    while the client has sent only the head; connection closed."""
    client = RawClient(gw)
    started = time.monotonic()
    client.send(request_bytes("POST", path, [("Authorization", "Bearer " + key), ("Content-Type", "application/json"),
                                             ("Content-Length", str(SERVER["max_body_bytes"] + 1))]))
    response = client.read_response(timeout=3)
    elapsed = time.monotonic() - started
    client.close()
    assert_json_error(response, 413, dialect_of(path), close=True)
    assert elapsed < 0.5, "413 took %.2f s: the gateway waited for the body" % elapsed
    assert upstream.requests == [] and gw.rows() == []
    assert_alive(gw, key)


@pytest.mark.parametrize("length", [str(2 ** 31), "9" * 15])
def test_huge_declared_body_is_413_immediately(shared, length):
    """[L02] CL 2 GiB (or 15 nines), nothing sent: 413 immediately."""
    gw, key, upstream = shared.gw, shared.key, shared.upstream
    client = RawClient(gw)
    started = time.monotonic()
    client.send(request_bytes("POST", CHAT, [("Authorization", "Bearer " + key),
                                             ("Content-Type", "application/json"), ("Content-Length", length)]))
    response = client.read_response(timeout=3)
    assert time.monotonic() - started < 0.5
    assert_json_error(response, 413, close=True)
    assert client.wait_eof(2)
    client.close()
    assert upstream.requests == []
    assert_alive(gw, key)


def test_64k_authorization_is_refused_fast(gw, key, upstream):
    """[L03] A 64 KiB Authorization value: 401 or 431, fast, closed."""
    started = time.monotonic()
    response, client = exchange(gw, request_bytes("GET", MODELS, [("Authorization", "Bearer " + "k" * 65536)]))
    elapsed = time.monotonic() - started
    client.close()
    assert response is not None, "no answer (connection reset before the error was read)"
    assert response.status in (401, 431), response
    assert_json_error(response, response.status)
    assert elapsed < 0.5
    assert upstream.requests == []
    assert_alive(gw, key)


# ==== 1.5 / 1.6 Bad JSON bodies and content types ==============================

DEEP = b"[" * 60000
BAD_BODIES = [
    ("J01-truncated", b'{"model":'),
    ("J01-empty-object-truncated", b"{"),
    ("J02-array", b'[{"model": "gpt-4o-mini"}]'),
    ("J02-string", b'"gpt-4o-mini"'),
    ("J02-number", b"42"),
    ("J02-null", b"null"),
    ("J03-deep-nesting", DEEP),
    ("J03-deep-in-object", b'{"model": "gpt-4o-mini", "x": ' + b"[" * 30000 + b"]" * 30000 + b"}"),
    ("J04-5000-digits", b'{"model": "gpt-4o-mini", "messages": [], "max_tokens": ' + b"9" * 5000 + b"}"),
    ("J05-duplicate-keys", b'{"model": "gpt-4o-mini", "model": "gpt-4o", "messages": []}'),
    ("J06-utf16", json.dumps(chat_body()).encode("utf-16")),
    ("J06-utf16-no-bom", json.dumps(chat_body()).encode("utf-16-le")),
    ("J06-utf32", json.dumps(chat_body()).encode("utf-32")),
    ("J06-utf8-bom", b"\xef\xbb\xbf" + json.dumps(chat_body()).encode()),
    ("J06-invalid-utf8", b'{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "\xff\xfe"}]}'),
    ("J06-overlong-utf8", b'{"model": "gpt-4o-mini\xc0\xae", "messages": []}'),
    ("J07-nan", b'{"model": "gpt-4o-mini", "messages": [], "temperature": NaN}'),
    ("J07-infinity", b'{"model": "gpt-4o-mini", "messages": [], "temperature": Infinity}'),
    ("J07-minus-infinity", b'{"model": "gpt-4o-mini", "messages": [], "temperature": -Infinity}'),
    ("J08-no-model", b'{"messages": []}'),
    ("J08-null-model", b'{"model": null, "messages": []}'),
    ("J08-number-model", b'{"model": 123, "messages": []}'),
    ("J08-list-model", b'{"model": [], "messages": []}'),
    ("J08-empty-model", b'{"model": "", "messages": []}'),
    ("J08-object-model", b'{"model": {"name": "gpt-4o"}, "messages": []}'),
    ("J10-empty-body", b""),
    ("trailing-garbage", json.dumps(chat_body()).encode() + b" x"),
    ("two-documents", json.dumps(chat_body()).encode() + json.dumps(chat_body()).encode()),
]


@pytest.mark.parametrize("path", [CHAT, MESSAGES])
@pytest.mark.parametrize("raw", [case[1] for case in BAD_BODIES], ids=[case[0] for case in BAD_BODIES])
def test_bad_json_bodies_are_400(shared, raw, path):
    """[J01-J08 J10] 400 JSON in the route's shape (never a 500, never a
    dead worker); the fake never sees the body; no row."""
    gw, key, upstream = shared.gw, shared.key, shared.upstream
    response, client = exchange(gw, json_request(path, key, raw))
    client.close()
    assert_json_error(response, 400, dialect_of(path), error_type="invalid_request_error")
    assert upstream.requests == [] and shared.new_rows() == []
    assert_alive(gw, key)


@pytest.mark.parametrize("value", ["true", 1, "yes", [True], {"on": True}])
def test_non_boolean_stream_flag(shared, value):
    """[J09] ``stream: "true"`` and friends: no crash. The body goes on
    unchanged, the provider decides (the fake, like OpenAI, streams only on
    ``true``); the answer's framing follows the provider's Content-Type and
    the row has its tokens."""
    gw, key, upstream = shared.gw, shared.key, shared.upstream
    raw = json.dumps(chat_body(stream=value)).encode()
    response = post(gw, CHAT, None, key, raw_body=raw)
    assert response.status == 200
    assert response.header("content-type") == "application/json"
    assert upstream.requests[0]["body"] == raw
    row, = shared.new_rows()
    assert (row["status"], row["streamed"], row["usage_source"]) == ("ok", 0, "reported")
    assert (row["request_tokens"], row["response_tokens"]) == expected_tokens(CHAT, upstream.reported[0]["usage"])
    assert_alive(gw, key)


@pytest.mark.parametrize("content_type", [
    None, "text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x",
    "application/json; charset=utf-16", "application/jsonx", "text/json", "application/json-patch+json",
    "application/json, text/plain",
])
def test_non_json_content_types_are_415(shared, content_type):
    """[C01 C03] A JSON endpoint with another content type: 415, on the
    proxy and on the admin API (no cross-site form POST)."""
    gw, key, upstream = shared.gw, shared.key, shared.upstream
    for path in (CHAT, MESSAGES):
        response, client = exchange(gw, json_request(path, key, chat_body(), content_type=content_type))
        client.close()
        assert_json_error(response, 415, dialect_of(path))
    assert upstream.requests == []
    admin = llmgw.issue_admin_token(gw.store)
    response, client = exchange(gw, request_bytes("POST", "/admin/virtual-keys", [
        ("Authorization", "Bearer " + admin), ("Content-Length", "26")]
        + ([("Content-Type", content_type)] if content_type else []), b'{"project_name": "forged"}'))
    client.close()
    assert_json_error(response, 415)
    assert "forged" not in [k["project_name"] for k in gw.store.list_keys()]
    assert_alive(gw, key)


@pytest.mark.parametrize("content_type", ["application/json; charset=utf-8", "Application/JSON",
                                          'application/json;charset="UTF-8"', "application/json ; charset=utf-8"])
def test_json_content_type_variants_are_accepted(shared, content_type):
    """[C02] Parameters and case variants of application/json are JSON."""
    gw, key, upstream = shared.gw, shared.key, shared.upstream
    response, client = exchange(gw, json_request(CHAT, key, chat_body(), content_type=content_type))
    client.close()
    assert response.status == 200, response
    assert len(upstream.requests) == 1
    assert_alive(gw, key)


# ==== 1.9 Header injection, hop-by-hop =========================================

@pytest.mark.parametrize("path,name,value", [
    (MESSAGES, "anthropic-version", "2023-06-01\xe9".encode("utf-8")),
    (MESSAGES, "anthropic-beta", b"tools-2024\x85"),
    (MESSAGES, "anthropic-beta", b"\xff\xfe"),
    (CHAT, "openai-beta", "assistants=v2 \u2028".encode("utf-8")),
    (CHAT, "openai-beta", b"\xa0"),
])
def test_non_ascii_passthrough_headers_are_400(shared, path, name, value):
    """[X02] A passed-through header with non-ASCII bytes: 400 in the
    route's shape; the fake never called. (CR, NUL and DEL are refused at
    the framing level: MALFORMED X02-*.)"""
    gw, key, upstream = shared.gw, shared.key, shared.upstream
    data = json_request(path, key, body_for(path), extra=[(name, value)])
    response, client = exchange(gw, data)
    client.close()
    assert_json_error(response, 400, dialect_of(path))
    assert upstream.requests == [] and shared.new_rows() == []
    assert_alive(gw, key)


HOP_BY_HOP = [
    ("Connection", "keep-alive, x-api-key, authorization, x-junk"),
    ("Keep-Alive", "timeout=5, max=1000"),
    ("TE", "trailers, deflate"),
    ("Trailer", "X-Checksum"),
    ("Upgrade", "h2c, websocket"),
    ("HTTP2-Settings", "AAMAAABkAAQAoAAAAAIAAAAA"),
    ("Proxy-Authorization", "Bearer {key}"),
    ("Proxy-Connection", "keep-alive"),
    ("Cookie", "session={key}"),
    ("X-Forwarded-For", "169.254.169.254"),
    ("X-Forwarded-Host", "evil.example"),
    ("X-Forwarded-Proto", "https"),
    ("Forwarded", "for=1.2.3.4;host=evil.example;proto=https"),
    ("X-Real-IP", "10.0.0.1"),
    ("Via", "1.1 evil"),
    ("api-key", "{key}"),
    ("X-Fake-Fault", "leak401"),
    ("Origin", "http://evil.example"),
]


@pytest.mark.parametrize("path", [CHAT, MESSAGES, MODELS])
def test_hop_by_hop_credentials_and_forwarding_headers_stay_behind(shared, path):
    """[X04 X05 X06] The fake receives exactly one credential header (the
    configured provider key), Host = the configured host, and none of the
    client's hop-by-hop, proxy, cookie or forwarding headers."""
    gw, key, upstream = shared.gw, shared.key, shared.upstream
    headers = [("Host", "evil.example:80"), ("Authorization", "Bearer " + key), ("x-api-key", key)]
    headers += [(name, value.format(key=key)) for name, value in HOP_BY_HOP]
    if path == MODELS:
        data = request_bytes("GET", path, headers, host=False)
    else:
        raw = json.dumps(body_for(path)).encode()
        data = request_bytes("POST", path, headers + [("Content-Type", "application/json"),
                                                      ("Content-Length", str(len(raw)))], raw, host=False)
    response, client = exchange(gw, data)
    client.close()
    assert response.status == 200, response
    assert "upgrade" not in response.headers and "set-cookie" not in response.headers
    received, = upstream.requests
    names = [name.lower() for name, _ in received["header_list"]]
    credentials = [(name, value) for name, value in received["header_list"] if name.lower() in CREDENTIAL_HEADERS]
    if path == MESSAGES:
        assert credentials == [("x-api-key", ANTHROPIC_KEY)]
    else:
        assert credentials == [("Authorization", "Bearer " + OPENAI_KEY)]
    assert names.count("host") == 1 and received["headers"]["host"] == "127.0.0.1:%d" % upstream.port
    allowed = {"host", "accept-encoding", "content-type", "content-length", "authorization", "x-api-key",
               "anthropic-version", "user-agent", "accept"}
    assert set(names) <= allowed, set(names) - allowed
    assert len(names) == len(set(names))
    blob = json.dumps(received["header_list"]) + received["path"]
    assert key not in blob
    assert_alive(gw, key)


# ==== 1.11 Paths ======================================================================

PATHS = ["/v1/files", "/v1/batches", "/v1/fine_tuning/jobs", "/v1/assistants", "/v1/organization/users",
         "/v1/messages/batches", "/v1/chat/completions/../files", "/v1/chat/completions/..%2ffiles",
         "/v1/%2e%2e/v1/files", "/v1/chat/completions%2f", "/v1/chat%2fcompletions", "/v1/%252e%252e/files",
         "/v1/chat/completions\\..\\files", "/v1/chat/completions%5c", "/v1/chat/completions;x",
         "/v1/chat/completions%00", "/v1/chat/completions/%c0%ae%c0%ae/files", "//v1/chat/completions",
         "/v1/chat/completions/", "/v1//chat/completions", "/V1/Chat/Completions", "/v1/CHAT/completions",
         "/v1/../admin/virtual-keys", "/v1/chat/completions%0d%0aX-Injected:%201", "/./v1/chat/completions",
         "/v1/messages/", "/v1/messages/count_tokens/..", "/v1/models/../../admin/audit"]


@pytest.mark.parametrize("target", PATHS)
def test_unlisted_paths_are_404(shared, target):
    """[P01 P02 P03 P04 X03] Only exact listed paths are proxied: anything
    else is 404 JSON (Anthropic shape under /v1/messages), the fake never
    called, the admin API never reached."""
    gw, key, upstream = shared.gw, shared.key, shared.upstream
    admin = llmgw.issue_admin_token(gw.store)
    for token in (key, admin):
        method = "GET" if "models" in target or "admin" in target else "POST"
        data = json_request(target, token, chat_body(), method=method)
        response, client = exchange(gw, data)
        client.close()
        assert_json_error(response, 404, dialect_of(target), error_type="not_found_error")
    assert upstream.requests == []
    assert_alive(gw, key)


def test_query_string_is_dropped(shared):
    """[P03] ``?x=1`` on a listed path: served, the query not forwarded."""
    gw, key, upstream = shared.gw, shared.key, shared.upstream
    response, client = exchange(gw, json_request(CHAT + "?x=1&api-version=2024", key, chat_body()))
    client.close()
    assert response.status == 200
    assert upstream.requests[0]["path"] == CHAT
    assert_alive(gw, key)


def test_admin_path_traversal_from_admin_prefix(make_gateway, upstream):
    """[P04] ``/admin/../v1/chat/completions`` stays in the admin API (404
    with a valid admin token; 401 without); it never reaches the proxy."""
    admin = "adm-CANARY-hostile-admin-token-0123"
    gw = make_gateway(server=dict(SERVER), rate_limits=RATE_LIMITS, environ={"LLMGW_ADMIN_TOKEN": admin})
    key = gw.create_key()[1]
    for token, status in ((admin, 404), (key, 401)):
        response, client = exchange(gw, json_request("/admin/../v1/chat/completions", token, chat_body()))
        client.close()
        assert_json_error(response, status)
    assert upstream.requests == []
    assert_alive(gw, key)


# ---- HEAD /health --------------------------------------------------------------------

def test_head_health_sends_no_body_and_the_next_pipelined_request_is_answered(gateway):
    client = RawClient(gateway, timeout=3)
    client.send(request_bytes("HEAD", "/health") + request_bytes("GET", "/health"))
    status, headers = client.read_head()
    assert status == 200, headers
    assert client.buffer == b"" or client.buffer.startswith(b"HTTP/1.1 "), \
        "body bytes after a HEAD response: %r" % client.buffer[:100]
    following = client.read_response()
    assert following is not None and following.status == 200, following
    assert following.json()["status"] == "ok"
    client.close()

    # A HEAD the gateway refuses is still bodiless.
    client = RawClient(gateway, timeout=3)
    client.send(request_bytes("HEAD", "/v1/chat/completions") + request_bytes("GET", "/health"))
    status, headers = client.read_head()
    assert status >= 400, headers
    assert client.buffer == b"" or client.buffer.startswith(b"HTTP/1.1 "), \
        "body bytes after a HEAD response: %r" % client.buffer[:100]
    following = client.read_response()
    if dict((name.lower(), value) for name, value in headers).get("connection") == "close":
        assert following is None, following
    else:
        assert following is not None and following.status == 200, following
    client.close()
