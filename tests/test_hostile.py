"""Hostile clients, misbehaving upstreams and secrets (RELIABILITY.md 1.1-1.13,
1.15-1.18).

The real gateway (``make_gateway``, small timeouts) is driven over raw
sockets, so every byte of the request and of the answer is the test's to
choose and to see. Faults on the provider side come from tests/fake_upstream.py
(tokens in the model name), from a closed port, from a bare listening socket
(the SSRF "sinkhole") and from ``ScriptedUpstream`` below, which answers with
exact bytes. Every test ends with ``assert_alive``: a normal request, answered
correctly and in time, with its usage row.

RELIABILITY ids are given in brackets in each test's docstring.
"""

import base64
import json
import logging
import os
import random
import re
import select
import socket
import stat
import threading
import time

import pytest

import llmgw
from conftest import (ANTHROPIC_KEY, CHAT, COMPLETIONS, COUNT_TOKENS, CREDENTIAL_HEADERS, EMBEDDINGS, MESSAGES, MODELS,
                      OPENAI_KEY, RESPONSES, RawClient, RunningGateway, assert_json_error, base_config, body_for, call,
                      dialect_of, expected_tokens, free_port, json_request, normalise_ids, post, request_bytes,
                      settled_rows, sse_events, wait_until)
from fake_upstream import CONNECTION_THREAD_NAME, FakeUpstream

#: Whatever a test did, its gateways end with no row pending, nothing reserved, nothing in flight.
pytestmark = pytest.mark.usefixtures("balanced_books")

#: The small timeouts and limits of the brief; the tests measure against them.
SERVER = {"header_timeout": 1, "body_timeout": 1, "keepalive_timeout": 1, "upstream_timeout": 2,
          "stream_idle_timeout": 1, "request_deadline": 5, "max_body_bytes": 65536}
#: Rate limits out of the way: several tests send hundreds of requests per key.
RATE_LIMITS = {"default": 1000000}
#: One attempt per request, as RELIABILITY.md measures them: the retries and
#: fallbacks of routing (on by default) are tested in test_routing.py and in
#: the tests below that use RETRYING.
ONE_ATTEMPT = {"retries": 0}
#: The default retries, with backoffs short enough for a test.
RETRYING = {"backoff_initial": 0.05, "backoff_max": 1}
ALIVE_TEXT = "Hello from the fake upstream."


# ---- fixtures ----------------------------------------------------------------

@pytest.fixture
def gw(make_gateway):
    return make_gateway(server=dict(SERVER), rate_limits=RATE_LIMITS, routing=ONE_ATTEMPT)


@pytest.fixture
def key(gw):
    return gw.create_key()[1]


class Shared:
    """One gateway and fake for the table-driven tests whose requests never
    change state that matters to the next one. ``upstream.requests`` is
    cleared per test; ``new_rows()`` are the usage rows since it started."""

    def __init__(self, gw, key, upstream):
        self.gw, self.key, self.upstream = gw, key, upstream
        self.rows_before = len(gw.rows())

    def new_rows(self):
        return self.gw.rows()[self.rows_before:]


@pytest.fixture(scope="module")
def shared_env(tmp_path_factory):
    fake = FakeUpstream().start()
    gw = RunningGateway(base_config(fake.url, server=dict(SERVER), rate_limits=RATE_LIMITS, routing=ONE_ATTEMPT),
                        tmp_path_factory.mktemp("shared") / "gateway.db")
    try:
        yield gw, gw.create_key("shared project")[1], fake
    finally:
        gw.stop()
        fake.stop()
    gw.assert_books_balanced()


@pytest.fixture
def shared(shared_env):
    gw, key, fake = shared_env
    fake.reset()
    return Shared(gw, key, fake)


class LogCapture(logging.Handler):
    """Every record of the ``llmgw`` loggers (access log included), at DEBUG,
    whatever propagation or levels other tests left behind."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records = []
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s %(message)s"))

    def emit(self, record):
        self.records.append(record)

    def lines(self):
        return [self.format(record) for record in self.records]

    def text(self):
        return "\n".join(self.lines())


@pytest.fixture
def gwlog():
    logger = logging.getLogger("llmgw")
    capture = LogCapture()
    old_level = logger.level
    logger.setLevel(logging.DEBUG)
    logger.addHandler(capture)
    try:
        yield capture
    finally:
        logger.removeHandler(capture)
        logger.setLevel(old_level)


# ---- requests and answers ------------------------------------------------------

def chat_body(model="gpt-4o-mini", text="hi there", **extra):
    return dict({"model": model, "messages": [{"role": "user", "content": text}]}, **extra)


def exchange(gateway, data, timeout=5.0):
    """Send ``data`` on a fresh connection; return (first response, client)."""
    client = RawClient(gateway, timeout)
    client.send(data)
    return client.read_response(timeout), client


def assert_closed_after_error(client, response, status, **kwargs):
    """An error answer with connection: close, then EOF and nothing else."""
    assert_json_error(response, status, close=True, **kwargs)
    assert client.wait_eof(2.0), "the gateway kept the connection open after a framing error"
    assert client.buffer == b"", "bytes after the error response: %r" % client.buffer
    assert status_lines(client.received) == 1, client.received


def status_lines(data):
    return len(re.findall(rb"HTTP/1\.[01] \d{3} ", data))


def assert_alive(gateway, key):
    """A normal request right now: answered correctly within 1 s, and on
    the books with the provider's tokens."""
    started = time.monotonic()
    response = post(gateway, CHAT, chat_body(text="are you still there?"), key, timeout=5)
    elapsed = time.monotonic() - started
    assert response.status == 200, response.body
    body = response.json()
    assert body["object"] == "chat.completion" and body["model"] == "gpt-4o-mini", body
    assert body["choices"][0]["message"]["content"] == ALIVE_TEXT, body
    request_id = response.header("x-llmgw-request-id")
    rows = [row for row in gateway.rows() if row["request_id"] == request_id]
    assert len(rows) == 1, rows
    row = rows[0]
    assert (row["status"], row["http_status"], row["usage_source"]) == ("ok", 200, "reported"), row
    assert (row["request_tokens"], row["response_tokens"]) == (
        body["usage"]["prompt_tokens"], body["usage"]["completion_tokens"]), row
    assert elapsed < 1.0, "the normal request took %.2f s" % elapsed


def worker_threads():
    return sum(1 for t in threading.enumerate() if t.name == "llmgw-worker")


def other_threads():
    """Threads that are neither gateway workers nor the fake upstream's
    per-connection handlers (which live as long as a pooled connection)."""
    return sorted(t.name for t in threading.enumerate()
                  if t.name not in ("llmgw-worker", CONNECTION_THREAD_NAME))


def upstream_peer_closed(upstream):
    """True once the gateway has closed every connection the fake holds
    (FIN or RST seen on the fake's side), which the fake itself only notices
    at its next write. Reads the fake's socket set; never writes to it."""
    with upstream._cond:
        sockets = list(upstream._sockets)
    for sock in sockets:
        try:
            if not select.select([sock], [], [], 0)[0]:
                return False
            if sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) != b"":
                return False
        except (OSError, ValueError):
            continue  # reset, or already closed by the fake
    return True


class Sinkhole:
    """A listening socket an SSRF would connect to; counts connections."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.setblocking(False)
        self.port = self.sock.getsockname()[1]
        self.url = "http://127.0.0.1:%d" % self.port

    def connections(self, wait=0.05):
        count = 0
        while select.select([self.sock], [], [], wait)[0]:
            connection, _ = self.sock.accept()
            connection.close()
            count += 1
            wait = 0
        return count

    def close(self):
        self.sock.close()


@pytest.fixture
def sinkhole():
    hole = Sinkhole()
    yield hole
    hole.close()


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
    ("DELETE", "/v1/models/gpt-4o", 404),
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


# ==== 1.3 Slow clients ========================================================

def test_slowloris_does_not_delay_or_grow_threads(gw, key, upstream):
    """[S01] 200 sockets each holding a partial head (and 5 trickling a
    byte every 0.2 s): a normal request meanwhile takes < 1 s; every slow
    socket is closed (408 JSON or EOF) after header_timeout; the gateway's
    thread count stays within a small constant of its baseline."""
    assert_alive(gw, key)  # warm: one worker exists
    baseline = threading.active_count()
    slack = 8
    slow = []
    for index in range(200):
        client = RawClient(gw)
        client.send(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + key.encode())
        slow.append(client)
    trickling = slow[:5]
    opened = time.monotonic()
    peak = threading.active_count()
    started = time.monotonic()
    response = post(gw, CHAT, chat_body(), key, timeout=5)
    assert response.status == 200
    assert time.monotonic() - started < 1.0
    while time.monotonic() - opened < 0.8:
        for client in trickling:
            try:
                client.send(b"x")
            except OSError:
                pass
        peak = max(peak, threading.active_count())
        time.sleep(0.2)
    closed_at = []
    for client in slow:
        response = client.read_response(timeout=3.0)
        closed_at.append(time.monotonic() - opened)
        if response is not None:
            assert_json_error(response, 408, close=True)
        assert client.wait_eof(1.0)
        peak = max(peak, threading.active_count())
        client.close()
    assert min(closed_at) >= SERVER["header_timeout"] - 0.1, "closed before header_timeout"
    assert max(closed_at) < SERVER["header_timeout"] + 1.5
    time.sleep(0.1)
    after = threading.active_count()
    assert peak <= baseline + slack and after <= baseline + slack, \
        "threads: baseline %d, peak %d, after %d" % (baseline, peak, after)
    assert_alive(gw, key)


@pytest.mark.parametrize("trickle", [False, True], ids=["stall", "trickle"])
def test_slow_body_is_408(gw, key, upstream, trickle):
    """[S02] CL 1000, 10 bytes, then a stall (or a byte every 0.2 s): 408
    after body_timeout, connection closed, nothing forwarded, no row."""
    client = RawClient(gw)
    client.send(request_bytes("POST", CHAT, [("Authorization", "Bearer " + key), ("Content-Type", "application/json"),
                                             ("Content-Length", "1000")], b'{"model": '))
    started = time.monotonic()
    if trickle:
        while time.monotonic() - started < SERVER["body_timeout"] + 0.2:
            try:
                client.send(b" ")
            except OSError:
                break
            time.sleep(0.2)
    response = client.read_response(timeout=3)
    elapsed = time.monotonic() - started
    assert_json_error(response, 408, close=True)
    assert client.wait_eof(1)
    client.close()
    assert SERVER["body_timeout"] - 0.1 <= elapsed < SERVER["body_timeout"] + 1.0, elapsed
    assert upstream.requests == [] and gw.rows() == []
    assert_alive(gw, key)


def test_idle_keepalive_is_closed(gw, key, upstream):
    """[S04] After one answered request, an idle keep-alive connection is
    closed after keepalive_timeout; so is one that never sends a byte."""
    client = RawClient(gw)
    client.send(json_request(CHAT, key, chat_body()))
    assert client.read_response().status == 200
    started = time.monotonic()
    silent = RawClient(gw)
    assert client.wait_eof(3) and silent.wait_eof(3)
    elapsed = time.monotonic() - started
    assert SERVER["keepalive_timeout"] - 0.1 <= elapsed < SERVER["keepalive_timeout"] + 1.0, elapsed
    assert silent.received == b""
    client.close()
    silent.close()
    assert_alive(gw, key)


def test_worker_threads_never_exceed_server_threads(make_gateway, upstream):
    """[pool] server.threads 3 and 8 concurrent slow calls: never more than 3
    worker threads; the other calls wait their turn and all succeed."""
    earlier = {t for t in threading.enumerate() if t.name == "llmgw-worker"}  # other gateways' stragglers
    gw = make_gateway(server=dict(SERVER, threads=3), rate_limits=RATE_LIMITS, routing=ONE_ATTEMPT)
    key = gw.create_key()[1]
    results, peak = [], 0

    def slow_call():
        results.append(post(gw, CHAT, chat_body("gpt-4o-mini-slow"), key, timeout=10).status)
    callers = [threading.Thread(target=slow_call) for _ in range(8)]
    for caller in callers:
        caller.start()
    while any(caller.is_alive() for caller in callers):
        peak = max(peak, sum(1 for t in threading.enumerate() if t.name == "llmgw-worker" and t not in earlier))
        time.sleep(0.02)
    assert results == [200] * 8
    assert 1 <= peak <= 3, "worker threads peaked at %d" % peak
    assert len(settled_rows(gw, 8)) == 8
    assert_alive(gw, key)


def test_a_bursts_threads_retire_after_it(make_gateway, upstream):
    """[pool] 12 clients that do not read their streams (each larger than
    the kernel's buffers) hold about 12 workers writing, for send_timeout;
    under the light load that follows, all but a couple retire once the
    burst's peak has left the window (1 s here; a minute by default).
    (Calls waiting for their provider hold no worker: they are parked.)"""
    earlier = {t for t in threading.enumerate() if t.name == "llmgw-worker"}
    gw, _, _ = big_stream_gateway(make_gateway, count=12, send_timeout=1)
    gw.server.workers.peak_window_seconds = 1.0
    key = gw.create_key()[1]

    def ours():
        return sum(1 for t in threading.enumerate() if t.name == "llmgw-worker" and t not in earlier)
    readers = [small_window_client(gw) for _ in range(12)]
    for reader in readers:
        reader.sendall(json_request(CHAT, key, chat_body("scripted-1", stream=True)))
    burst, started = 0, time.monotonic()
    while time.monotonic() - started < 3 and burst < 12:
        burst = max(burst, ours())
        time.sleep(0.02)
    assert burst >= 6, "the burst started only %d workers" % burst
    for reader in readers:
        assert_let_go(reader)
    started = time.monotonic()
    while time.monotonic() - started < 3.5 and ours() > 2:
        assert post(gw, CHAT, chat_body(), key).status == 200
        time.sleep(0.02)
    assert ours() <= 2, "%d workers still alive after the burst (%d at its peak)" % (ours(), burst)
    assert_alive(gw, key)


def with_the_only_worker_busy(make_gateway, busy_seconds, **settings):
    """(gateway, its server settings, key, client socket): server.threads
    1, the worker held writing a stream larger than the kernel's buffers to
    a client that reads none of it, until it lets the client go after
    ``busy_seconds`` (its send_timeout). (A call waiting for its provider
    would not hold the worker: it is parked.)"""
    server = dict(SERVER, threads=1, send_timeout=busy_seconds, **settings)
    gw, _, _ = big_stream_gateway(make_gateway, **server)
    key = gw.create_key()[1]
    assert_alive(gw, key)
    hanging = small_window_client(gw, timeout=busy_seconds + 5)
    hanging.sendall(json_request(CHAT, key, chat_body("scripted-1", stream=True)))
    assert wait_until(lambda: gw.gateway.in_flight == 1)
    time.sleep(0.3)  # its writes fill the kernel's buffers
    return gw, server, key, hanging


def assert_let_go(client):
    """The gateway gave up writing to a client that read nothing: after
    what the kernel holds, its connection ends."""
    try:
        while client.recv(1 << 20):
            pass
    except ConnectionResetError:
        pass
    client.close()


def test_deadlines_hold_while_every_worker_is_busy(make_gateway, upstream):
    """[pool, S01] The only worker waits on a client that does not read: a
    client that never finishes its head still gets its 408 (deadlines are
    swept by the accept loop, not by workers), its clock starting when the
    sweep first sees its bytes; the client that does not read is let go."""
    gw, server, key, hanging = with_the_only_worker_busy(make_gateway, busy_seconds=4)
    slow = RawClient(gw)
    started = time.monotonic()
    slow.send(b"GET /v1/models HTTP/1.1\r\n")
    response = slow.read_response(timeout=server["keepalive_timeout"] + server["header_timeout"] + 1.0)
    elapsed = time.monotonic() - started
    slow.close()
    assert_json_error(response, 408, close=True)
    assert elapsed < server["send_timeout"] - 0.5, "the 408 waited for the busy worker (%.2f s)" % elapsed
    assert_let_go(hanging)
    assert_alive(gw, key)


def test_a_whole_request_waits_for_a_busy_worker_past_every_deadline(make_gateway, upstream):
    """[pool] The only worker is busy for longer than the keep-alive and
    header timeouts together (but not server.queue_timeout, 5 s): a whole
    request that arrived meanwhile is served once the worker is free, never
    dropped as idle or timed out."""
    gw, _, key, hanging = with_the_only_worker_busy(make_gateway, busy_seconds=3)
    waiting = RawClient(gw, timeout=6)
    waiting.send(json_request(CHAT, key, chat_body()))
    response = waiting.read_response(timeout=6)
    waiting.close()
    assert response is not None and response.status == 200, response
    assert_let_go(hanging)
    assert_alive(gw, key)


@pytest.mark.parametrize("path", [CHAT, MESSAGES])
def test_a_request_waiting_longer_than_queue_timeout_gets_503(make_gateway, upstream, path):
    """[capacity] The only worker stays busy past server.queue_timeout: a
    whole request that waited that long is answered 503 with Retry-After in
    its API's shape (and counted), without waiting for the worker."""
    gw, _, key, hanging = with_the_only_worker_busy(make_gateway, busy_seconds=4, queue_timeout=1)
    waiting = RawClient(gw, timeout=5)
    started = time.monotonic()
    waiting.send(json_request(path, key, body_for(path)))
    response = waiting.read_response(timeout=5)
    elapsed = time.monotonic() - started
    waiting.close()
    payload = assert_json_error(response, 503, dialect=dialect_of(path), close=True)
    assert response.header("retry-after") == "1"
    assert dialect_of(path) == "anthropic" or payload["error"]["code"] == "gateway_full"
    assert 1.0 <= elapsed < 3.5, "answered after %.2f s (queue_timeout 1 s, worker busy 4 s)" % elapsed
    assert gw.gateway.capacity_refusals == 1
    assert_let_go(hanging)
    assert_alive(gw, key)


@pytest.mark.parametrize("path", [CHAT, MESSAGES])
def test_calls_beyond_max_in_flight_get_503_at_once(make_gateway, upstream, path):
    """[capacity] server.max_in_flight 2, both held by calls to a provider
    that never answers: a third call is refused at once with 503 +
    Retry-After in its API's shape, counted, and never reaches the provider
    nor the books; once the two end (504), calls go through again."""
    gw = make_gateway(server=dict(SERVER, max_in_flight=2, upstream_timeout=3), rate_limits=RATE_LIMITS,
                      routing=ONE_ATTEMPT)
    key = gw.create_key()[1]
    hanging = [RawClient(gw, timeout=6) for _ in range(2)]
    for client in hanging:
        client.send(json_request(CHAT, key, chat_body("gpt-4o-mini-hang")))
    wait_until(lambda: gw.gateway.in_flight == 2)
    sent_upstream = len(upstream.requests)
    started = time.monotonic()
    response = post(gw, path, body_for(path), key, timeout=5)
    assert time.monotonic() - started < 1.5
    payload = assert_json_error(response, 503, dialect=dialect_of(path))
    assert response.header("retry-after") == "1"
    assert dialect_of(path) == "anthropic" or payload["error"]["code"] == "gateway_full"
    assert gw.gateway.capacity_refusals == 1
    assert len(upstream.requests) == sent_upstream
    for client in hanging:
        assert_json_error(client.read_response(timeout=6), 504)
        client.close()
    assert [row["status"] for row in settled_rows(gw, 2)] == ["timeout", "timeout"]
    assert gw.gateway.in_flight == 0
    assert_alive(gw, key)


def test_a_request_waiting_for_a_worker_at_shutdown_gets_503(make_gateway, upstream):
    """[pool, SIGTERM drain] The only worker is busy when the gateway stops:
    the request it serves ends within the drain, and a whole request that
    was still waiting for a worker is answered 503 with Retry-After (to
    retry elsewhere), never dropped without an answer."""
    gw, _, key, hanging = with_the_only_worker_busy(make_gateway, busy_seconds=1)
    waiting = RawClient(gw, timeout=5)
    waiting.send(json_request(CHAT, key, chat_body()))
    time.sleep(0.2)
    gw.stop()
    response = waiting.read_response(timeout=5)
    waiting.close()
    assert_json_error(response, 503, close=True)
    assert response.header("retry-after") == "1"
    assert_let_go(hanging)


def dechunk(body):
    """The payload of a chunked body (ending with its last chunk)."""
    payload = b""
    while True:
        size_line, _, body = body.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            return payload
        payload, body = payload + body[:size], body[size + 2:]


def small_window_client(gateway, timeout=10.0):
    """A socket that advertises a 4 KiB receive window, so the gateway's
    writes stop fitting in the kernel's buffers as soon as it does not read."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(timeout)
    sock.connect(("127.0.0.1", gateway.port))
    return sock


def kernel_send_buffer_max():
    """The most a TCP socket may buffer for sending (Linux autotuning's
    ceiling), 4 MiB where it cannot be read."""
    try:
        with open("/proc/sys/net/ipv4/tcp_wmem") as f:
            return int(f.read().split()[2])
    except (OSError, ValueError, IndexError):
        return 4 * 1024 * 1024


def big_stream_gateway(make_gateway, count=1, **server):
    """(gateway, scripted upstream, events) for a provider that answers
    ``count`` requests with a stream of 1,000-character events, then
    [DONE]: more than the kernel can buffer on the gateway's side of a
    connection, so a client that does not read makes the gateway's writes
    wait."""
    event = (b'data: {"id":"c1","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":"%s"}}]}'
             b'\n\n' % (b"x" * 1000))
    events = [event] * (kernel_send_buffer_max() // 1000 + 1000) + [b"data: [DONE]\n\n"]
    stream = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
              + b"".join(b"%x\r\n%s\r\n" % (len(e), e) for e in events) + b"0\r\n\r\n")
    scripted = ScriptedUpstream([(stream, True)] * count)
    gw = make_gateway(server=dict(SERVER, **server), rate_limits=RATE_LIMITS, routing=ONE_ATTEMPT, providers={
        "scripted": {"base_url": scripted.url, "api_key": SCRIPTED_KEY, "models": ["scripted-*"]}})
    return gw, scripted, events


def test_slow_reader_gets_its_whole_stream(make_gateway, upstream):
    """[S03, reading slowly] A client that reads a 5 MB stream through a 4 KiB window,
    pausing first: the gateway's writes stop fitting in the kernel's
    buffers, and it waits for the reader (send_timeout per write) instead
    of failing; every byte arrives, in order."""
    gw, scripted, events = big_stream_gateway(make_gateway, send_timeout=5)
    try:
        key = gw.create_key()[1]
        sock = small_window_client(gw)
        sock.sendall(json_request(CHAT, key, chat_body("scripted-1", stream=True)))
        time.sleep(0.5)  # the gateway's writes back up meanwhile
        received = []
        while True:
            data = sock.recv(65536)
            assert data, "the gateway closed the stream after %d bytes" % sum(map(len, received))
            received.append(data)
            if data.endswith(b"0\r\n\r\n"):
                break
        sock.close()
        head, _, body = b"".join(received).partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 "), head
        assert dechunk(body) == b"".join(events)
        row, = settled_rows(gw, 1)
        assert row["status"] == "ok", row
        assert_alive(gw, key)
    finally:
        scripted.close()


def test_reader_that_never_reads_is_let_go_after_send_timeout(make_gateway, upstream):
    """[S03] A client asks for a 5 MB stream and reads nothing: once its
    window and the kernel's buffers are full, the gateway waits send_timeout,
    then closes the connection, records client_disconnected and frees the
    worker; other clients are served throughout."""
    gw, scripted, _ = big_stream_gateway(make_gateway, send_timeout=1)
    try:
        key = gw.create_key()[1]
        sock = small_window_client(gw)
        started = time.monotonic()
        sock.sendall(json_request(CHAT, key, chat_body("scripted-1", stream=True)))
        assert_alive(gw, key)
        row, = [r for r in settled_rows(gw, 2, timeout=10) if r["streamed"]]
        elapsed = time.monotonic() - started
        assert row["status"] == "client_disconnected", row
        assert row["usage_source"] == "estimated" and row["response_tokens"] > 0, row
        assert 1.0 <= elapsed < 8, "let go after %.2f s (send_timeout 1 s)" % elapsed
        sock.close()
        assert_alive(gw, key)
    finally:
        scripted.close()


def test_connection_cap_answers_503_then_recovers(make_gateway, upstream):
    """[S05 E01] max_connections 20 held by idle clients: the next ones get
    503 JSON with Retry-After at once (no worker thread); once the holders
    leave, new clients are served."""
    gw = make_gateway(server=dict(SERVER, max_connections=20, keepalive_timeout=30, header_timeout=30),
                      rate_limits=RATE_LIMITS, routing=ONE_ATTEMPT)
    key = gw.create_key()[1]
    assert_alive(gw, key)

    def open_connections():
        return gw.server.gauges()["llmgw_connections_open"]
    assert wait_until(lambda: open_connections() == 0)  # the probe's connection was released
    baseline = threading.active_count()
    holders = [RawClient(gw) for _ in range(20)]
    assert wait_until(lambda: open_connections() == 20)  # the cap counts only the holders
    holders[0].send(b"GET /v1/models HTTP/1.1\r\n")  # one of them mid-head
    time.sleep(0.1)
    for _ in range(5):
        started = time.monotonic()
        client = RawClient(gw)
        try:
            client.send(json_request(CHAT, key, chat_body()))
        except OSError:  # the 503 may close the socket before the request is written
            pass
        response = client.read_response(timeout=2)
        assert time.monotonic() - started < 0.5
        assert_json_error(response, 503, close=True)
        assert response.header("retry-after") == "1"
        assert client.wait_eof(1)
        client.close()
    assert threading.active_count() <= baseline + 1
    assert upstream.requests[1:] == []
    for client in holders:
        client.close()
    assert wait_until(lambda: call(gw, "GET", "/health").status == 200, 3.0)
    assert_alive(gw, key)


# ==== 1.4 Abrupt disconnects ================================================

def test_reset_during_headers(gw, key, upstream, gwlog):
    """[D01] RST in the middle of a head, 20 times: nothing logged above
    INFO, no row, the server serves."""
    for index in range(20):
        client = RawClient(gw)
        client.send(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bear")
        if index % 2:
            time.sleep(0.01)
        client.rst()
    time.sleep(0.3)
    assert [line for line in gwlog.lines() if not line.startswith(("DEBUG", "INFO"))] == []
    assert upstream.requests == [] and gw.rows() == []
    assert_alive(gw, key)


@pytest.mark.parametrize("declared,sent", [(1000, 500), (600000, 300000)], ids=["watcher-read", "worker-read"])
def test_fin_after_half_the_body(make_gateway, upstream, gwlog, declared, sent):
    """[D02] FIN after half the declared body (a small body the watcher
    reads, and one over 256 KiB a worker reads): no upstream call, no row,
    nothing logged above INFO."""
    gw = make_gateway(server=dict(SERVER, max_body_bytes=1024 * 1024), rate_limits=RATE_LIMITS, routing=ONE_ATTEMPT)
    key = gw.create_key()[1]
    client = RawClient(gw)
    client.send(request_bytes("POST", CHAT, [("Authorization", "Bearer " + key), ("Content-Type", "application/json"),
                                             ("Content-Length", str(declared))], b"{" + b" " * (sent - 1)))
    client.sock.shutdown(socket.SHUT_WR)
    assert client.wait_eof(3)
    client.close()
    assert client.received == b""  # nothing to answer: the request never arrived
    time.sleep(0.2)
    assert upstream.requests == [] and gw.rows() == []
    assert [line for line in gwlog.lines() if not line.startswith(("DEBUG", "INFO"))] == []
    assert_alive(gw, key)


@pytest.mark.parametrize("path", [CHAT, MESSAGES])
def test_client_gone_during_a_slow_nonstreamed_call_keeps_full_tokens(gw, key, upstream, path):
    """[D03] The client closes right after sending; the provider answers
    0.5 s later with usage. The row carries the provider's full tokens.
    Observed: status ``ok`` (the row is settled before the reply is
    written; the failed write is not recorded); ``client_disconnected``
    would be as right."""
    client = RawClient(gw)
    client.send(json_request(path, key, body_for(path, "claude-haiku-4-5-slow" if path == MESSAGES
                                                  else "gpt-4o-mini-slow")))
    assert upstream.wait_for_requests(1, 2)
    client.close()
    row, = settled_rows(gw, 1, timeout=3)
    reported, = upstream.reported
    assert row["status"] in ("ok", "client_disconnected"), row
    assert row["usage_source"] == "reported"
    assert (row["request_tokens"], row["response_tokens"]) == expected_tokens(path, reported["usage"])
    assert_alive(gw, key)


@pytest.mark.parametrize("path", [CHAT, MESSAGES])
def test_stream_reset_after_two_events_closes_the_upstream(gw, key, upstream, path):
    """[D04] RST after two events of a never-ending stream: the provider
    connection is closed within 1 s (no paying for an unread generation);
    row client_disconnected."""
    client = RawClient(gw)
    client.send(json_request(path, key, body_for(path, "gpt-4o-mini-drip", stream=True)))
    status, _ = client.read_head()
    assert status == 200
    assert client.next_chunk() and client.next_chunk()
    assert upstream.open_connections == 1 and not upstream_peer_closed(upstream)
    client.rst()
    cut = time.monotonic()
    assert wait_until(lambda: upstream_peer_closed(upstream), 2.0), "the upstream stream was left running"
    elapsed = time.monotonic() - cut
    assert elapsed < 1.0, "the provider connection outlived the client by %.2f s" % elapsed
    # The fake itself notices at its next write or two (0.3 s apart).
    assert wait_until(lambda: upstream.open_connections == 0, 2.0)
    row, = settled_rows(gw, 1)
    assert (row["status"], row["streamed"]) == ("client_disconnected", 1)
    assert_alive(gw, key)


def test_many_streams_cut_at_random_times(gw, key, upstream):
    """[D06] 50 concurrent streams cut (RST or FIN) at random times: one
    settled row per request the fake saw, none pending, no thread left
    behind but idle workers (at most two per concurrent client: one may
    still be finishing a reply when the next request arrives)."""
    assert_alive(gw, key)
    time.sleep(0.05)
    baseline_others = other_threads()
    upstream.reset()
    rows_before = len(gw.rows())
    rng = random.Random(6)
    plans = [(rng.uniform(0, 1.4), rng.random() < 0.5, (CHAT, MESSAGES)[i % 2]) for i in range(50)]
    errors = []

    def run(cut, reset, path):
        try:
            client = RawClient(gw)
            client.send(json_request(path, key, body_for(path, "gpt-4o-mini-slowstream", stream=True)))
            time.sleep(cut)
            if reset:
                client.rst()
            else:
                client.close()
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)
    threads = [threading.Thread(target=run, args=plan) for plan in plans]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert errors == []
    time.sleep(0.2)  # a request read just before its cut is still being forwarded

    def settled():
        rows = gw.rows()[rows_before:]
        return len(rows) == len(upstream.requests) and all(r["status"] != "pending" for r in rows)
    assert wait_until(settled, 6.0), (len(gw.rows()) - rows_before, len(upstream.requests))
    rows = gw.rows()[rows_before:]
    assert {r["status"] for r in rows} <= {"ok", "client_disconnected"}, rows
    assert sum(r["status"] == "client_disconnected" for r in rows) >= 1
    assert worker_threads() <= 2 * 50
    assert wait_until(lambda: other_threads() == baseline_others, 3.0), (other_threads(), baseline_others)
    assert wait_until(lambda: upstream.open_connections <= 32, 3.0)
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
            assert time.monotonic() - started < 0.5
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


# ---- a provider that answers with exact bytes ----------------------------------

class ScriptedUpstream:
    """Answers each request it reads with the next scripted response bytes;
    keeps the connection open unless the script says close."""

    def __init__(self, responses):
        self.responses = list(responses)
        self.requests = []
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        self.url = "http://127.0.0.1:%d" % self.port
        self._stop = False
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self):
        while not self._stop:
            try:
                connection, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(connection,), daemon=True).start()

    def _serve(self, connection):
        buffer = b""
        connection.settimeout(5)
        try:
            while self.responses:
                while b"\r\n\r\n" not in buffer:
                    data = connection.recv(65536)
                    if not data:
                        return
                    buffer += data
                head, _, buffer = buffer.partition(b"\r\n\r\n")
                length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))
                while len(buffer) < length:
                    buffer += connection.recv(65536)
                self.requests.append(head + b"\r\n\r\n" + buffer[:length])
                buffer = buffer[length:]
                response, close = self.responses.pop(0)
                for index, part in enumerate(response if isinstance(response, list) else [response]):
                    if index:
                        time.sleep(0.1)  # a separate segment, after the client read the first
                    connection.sendall(part)
                if close:
                    return
        except OSError:
            return
        finally:
            connection.close()

    def close(self):
        self._stop = True
        self.sock.close()


def scripted_reply(status_line, headers, body, close=False):
    lines = [status_line] + ["%s: %s" % header for header in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body, close


SCRIPTED_BODY = json.dumps({"id": "chatcmpl-s", "object": "chat.completion", "created": 1, "model": "scripted-1",
                            "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"},
                                         "finish_reason": "stop"}],
                            "usage": {"prompt_tokens": 17, "completion_tokens": 4, "total_tokens": 21}}).encode()
SCRIPTED_KEY = "sk-CANARY-SCRIPTED-0123456789abcdef"


def scripted_gateway(make_gateway, responses):
    scripted = ScriptedUpstream(responses)
    gw = make_gateway(server=dict(SERVER), rate_limits=RATE_LIMITS, routing=ONE_ATTEMPT, providers={
        "scripted": {"base_url": scripted.url, "api_key": SCRIPTED_KEY, "models": ["scripted-*"]}})
    return gw, scripted


def test_upstream_response_headers_are_filtered(make_gateway, upstream):
    """[X07] Set-Cookie, Location, openai-organization, Connection,
    Access-Control-*, Server from the provider never reach the client;
    rate-limit and request-id headers do; framing is the gateway's own."""
    gw, scripted = scripted_gateway(make_gateway, [scripted_reply("HTTP/1.1 200 OK", [
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
        assert b"Bearer " + SCRIPTED_KEY.encode() in scripted.requests[0]
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
    gw, scripted = scripted_gateway(make_gateway, [([split[:cut], split[cut:]], False), good, good])
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
    gw, scripted = scripted_gateway(make_gateway, [scripted_reply(status_line, headers, SCRIPTED_BODY, close)])
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
    gw, scripted = scripted_gateway(make_gateway, [good, (b"HTTP/1.1 103 Early Hints\r\n\r\n", True), good])
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
    gw, scripted = scripted_gateway(make_gateway, [(continued + body, False)])
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


# ==== 1.10 SSRF ======================================================================

SSRF_FIELDS = ("api_base", "base_url", "url", "endpoint", "host", "proxy", "azure_endpoint")
SSRF_HEADERS = ("X-Base-URL", "X-Target-Url", "X-Upstream", "x-portkey-custom-host", "X-Original-URL",
                "X-Rewrite-URL", "X-Forwarded-Host", "X-Host", "X-Api-Base")


@pytest.mark.parametrize("path", [CHAT, COMPLETIONS, EMBEDDINGS, RESPONSES, MESSAGES, COUNT_TOKENS, MODELS])
def test_request_cannot_redirect_the_upstream(shared, sinkhole, path):
    """[R01 R02 R05] Body fields and headers naming another upstream, on
    every proxied route: the sinkhole sees no connection; the fake gets the
    call with the configured key."""
    gw, key, upstream = shared.gw, shared.key, shared.upstream
    sink = sinkhole.url + "/v1"
    headers = [(name, sink) for name in SSRF_HEADERS] + [("Authorization", "Bearer " + key)]
    if path == MODELS:
        data = request_bytes("GET", path, headers)
    else:
        body = body_for(path, **{name: sink for name in SSRF_FIELDS})
        body.update(api_key="sk-attacker", api_version="2099-01-01", custom_llm_provider="openai",
                    extra_headers={"Host": "127.0.0.1:%d" % sinkhole.port, "Authorization": "Bearer sk-attacker"},
                    extra_body={"url": sink}, extra_query={"host": sink})
        data = json_request(path, key, body, extra=headers[:-1])
    response, client = exchange(gw, data)
    client.close()
    assert response.status == 200, response
    assert sinkhole.connections() == 0
    received, = upstream.requests
    assert received["path"] == path
    assert received["headers"]["host"] == "127.0.0.1:%d" % upstream.port
    if path.startswith("/v1/messages"):
        assert received["headers"]["x-api-key"] == ANTHROPIC_KEY
    else:
        assert received["headers"]["authorization"] == "Bearer " + OPENAI_KEY
    assert not any(name.lower() in (h.lower() for h in SSRF_HEADERS) for name, _ in received["header_list"])
    assert_alive(gw, key)


@pytest.mark.parametrize("target", ["/chat/completions", "/v1/proxy/chat/completions", "/proxy/v1/chat/completions",
                                    "/openai/v1/chat/completions", "/v1/v1/chat/completions"])
def test_route_aliases_do_not_exist(shared, sinkhole, target):
    """[R05] Paths a peer would alias (and Portkey's unvalidated
    /v1/proxy/*): 404, nothing forwarded anywhere."""
    gw, key, upstream = shared.gw, shared.key, shared.upstream
    response, client = exchange(gw, json_request(target, key, dict(chat_body(), api_base=sinkhole.url)))
    client.close()
    assert_json_error(response, 404)
    assert upstream.requests == [] and sinkhole.connections() == 0
    assert_alive(gw, key)


@pytest.mark.parametrize("model", ["http://SINK/x", "openai/../../x", "gpt-4o@SINK", "unknown/x", "//SINK/x",
                                   "openai/http://SINK/", "anthropic/../openai/x", "SINK"])
def test_model_name_never_changes_the_host(shared, sinkhole, model):
    """[R03] Model names shaped like URLs or paths: the provider comes from
    config only; the call goes to the configured host and path."""
    gw, key, upstream = shared.gw, shared.key, shared.upstream
    model = model.replace("SINK", "127.0.0.1:%d" % sinkhole.port)
    response = post(gw, CHAT, chat_body(model), key)
    assert sinkhole.connections() == 0
    assert response.status == 200, response.body
    received, = upstream.requests
    assert received["path"] == CHAT and received["headers"]["host"] == "127.0.0.1:%d" % upstream.port
    provider_key = ANTHROPIC_KEY if model.startswith("anthropic/") else OPENAI_KEY
    assert received["headers"]["authorization"] == "Bearer " + provider_key
    assert_alive(gw, key)


@pytest.mark.parametrize("path", [CHAT, MESSAGES])
def test_upstream_redirect_is_502_and_not_followed(gw, key, upstream, path):
    """[R04] A 302 to the metadata address: 502 JSON, not followed (one
    request at the fake, no Location relayed), row upstream_error."""
    started = time.monotonic()
    response = post(gw, path, body_for(path, "gpt-4o-mini-redirect"), key)
    assert time.monotonic() - started < 1.0
    assert response.status == 502 and response.header("location") is None
    assert response.json()["error"]["type"] == "api_error"
    assert len(upstream.requests) == 1
    row, = settled_rows(gw, 1)
    assert (row["status"], row["http_status"]) == ("upstream_error", 302)
    assert_alive(gw, key)


@pytest.mark.parametrize("base_url", ["http://169.254.169.254", "http://169.254.169.254:80/v1",
                                      "http://[fd00:ec2::254]", "http://[::ffff:169.254.169.254]",
                                      "http://[fe80::1%25eth0]", "https://169.254.0.1"])
def test_link_local_provider_is_refused_at_start(upstream, base_url):
    """[R06] A configured base_url on a link-local or metadata address is a
    ConfigError naming the provider, unless allow_link_local is set."""
    document = {"providers": {"metadata": {"base_url": base_url, "api_key": OPENAI_KEY}}}
    with pytest.raises(llmgw.ConfigError) as raised:
        llmgw.parse_config(document)
    assert "providers.metadata" in raised.value.message and OPENAI_KEY not in raised.value.message
    document["providers"]["metadata"]["allow_link_local"] = True
    assert llmgw.parse_config(document).providers["metadata"].allow_link_local is True


@pytest.mark.parametrize("base_url", ["https://user:pw@api.example.com", "https://api.example.com/#frag",
                                      "https://api.example.com/?x=1", "ftp://api.example.com", "file:///etc/passwd",
                                      "http://", "api.example.com"])
def test_provider_base_url_shape_is_checked(base_url):
    """[R06] Credentials, query, fragment or a non-http scheme in a
    base_url: ConfigError naming the provider."""
    with pytest.raises(llmgw.ConfigError) as raised:
        llmgw.parse_config({"providers": {"odd": {"base_url": base_url, "api_key": OPENAI_KEY}}})
    assert "providers.odd" in raised.value.message and "pw" not in raised.value.message


def test_provider_host_resolving_to_link_local_is_refused_at_connect(make_gateway, upstream, gwlog):
    """[R06] ``http://2852039166`` is 169.254.169.254 in decimal: not an
    address literal to the config check, but resolved to one at connect.
    502 upstream_address_refused at once, without trying to connect."""
    gw = make_gateway(server=dict(SERVER), rate_limits=RATE_LIMITS, routing=ONE_ATTEMPT, providers={
        "metadata": {"base_url": "http://2852039166", "api_key": OPENAI_KEY, "models": ["meta-*"]}})
    key = gw.create_key()[1]
    started = time.monotonic()
    response = post(gw, CHAT, chat_body("meta-model"), key)
    assert time.monotonic() - started < 0.5
    assert response.status == 502
    assert response.json()["error"]["code"] == "upstream_address_refused"
    row, = settled_rows(gw, 1)
    assert row["status"] == "upstream_error"
    assert OPENAI_KEY not in gwlog.text()
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
    time.sleep(0.1)
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
    time.sleep(0.05)
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
    """[T01 T03] A key pasted into the URL path (404) is neither echoed in
    the error body nor written to the access log."""
    outputs = []
    for target in ("%s/%s" % (CHAT, key), "/v1/%s" % OPENAI_KEY, "/%s" % ANTHROPIC_KEY,
                   "/v1/models/%s/x" % key):
        response, client = exchange(gw, json_request(target, key, chat_body()))
        client.close()
        assert_json_error(response, 404)
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


def test_database_files_are_private_and_hold_no_secret(gw, key, upstream):
    """[T05 T06] gateway.db, -wal and -shm are 0600; none of them holds a
    virtual key or a provider key in plain text (only the key's hash)."""
    admin = llmgw.issue_admin_token(gw.store)
    for model in ("gpt-4o-mini", "gpt-4o-mini-leak401"):
        post(gw, CHAT, chat_body(model, user=key), key)
    post(gw, MESSAGES, body_for(MESSAGES), key)
    assert_alive(gw, key)
    paths = [gw.db_path + suffix for suffix in ("", "-wal", "-shm")]
    for path in paths:
        assert os.path.exists(path), path
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600, (path, oct(os.stat(path).st_mode))
    data = b"".join(open(path, "rb").read() for path in paths)
    for secret in (key, admin, OPENAI_KEY, ANTHROPIC_KEY):
        assert secret.encode() not in data
    assert llmgw.hash_secret(key).encode() in data
