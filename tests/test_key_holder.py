"""Attacks by a holder of a valid virtual key on the proxy path (issue 17).

A key holder may send any body the gateway accepts, as slowly as the
deadlines allow, from as many connections as it likes. None of that may
leave the books wrong (a usage row pending, a request counted in flight, a
budget reservation held: every gateway here is checked once stopped), answer
500, leak a secret into the log, or take the gateway away from other tenants.
The real gateway runs against tests/fake_upstream.py, driven over real sockets.
"""

import json
import select
import time

import pytest

import llmgw
from conftest import (ADMIN_TOKEN, CHAT, COMPLETIONS, MESSAGES, RATE_LIMITS, RESPONSES, SERVER, RawClient, admin,
                      assert_alive, assert_json_error, body_for, chat_body, dialect_of, exchange, json_request, post,
                      request_bytes, scripted_reply, settled_rows, wait_until, worker_threads)
from fake_upstream import ScriptedUpstream

pytestmark = pytest.mark.usefixtures("balanced_books")


def nested(depth):
    """A JSON array nested ``depth`` levels deep, as text."""
    return "[" * depth + "]" * depth


def raw_body(path, stream=False, **fields):
    """A request body as bytes, each of ``fields`` spliced in as raw JSON text."""
    text = json.dumps(body_for(path, stream=stream))[:-1]
    return (text + "".join(', "%s": %s' % item for item in fields.items()) + "}").encode()


# ---- 1. nesting: bounded where the body is parsed ---------------------------------

@pytest.mark.parametrize("path,stream", [(CHAT, True), (CHAT, False), (MESSAGES, True), (RESPONSES, False)])
@pytest.mark.parametrize("depth", [llmgw.MAX_JSON_DEPTH + 1, 500, 980])
def test_nesting_past_the_bound_is_400_and_never_forwarded(gw, key, upstream, path, stream, depth):
    """A body nested past MAX_JSON_DEPTH (the top-level object counts as
    one level) is a 400 in the API's shape: nothing is forwarded, no row
    is written. (It used to be forwarded, and its usage estimate then broke
    metering.)"""
    data = raw_body(path, stream, metadata_deep=nested(depth - 1))
    response, client = exchange(gw, json_request(path, key, data))
    client.close()
    assert_json_error(response, 400, dialect_of(path))
    assert "deeper than %d" % llmgw.MAX_JSON_DEPTH in json.dumps(response.json())
    assert upstream.requests == [] and gw.rows() == []
    assert_alive(gw, key)


def test_nesting_at_the_bound_is_forwarded(gw, key, upstream):
    data = raw_body(CHAT, tools_deep=nested(llmgw.MAX_JSON_DEPTH - 1))
    response = post(gw, CHAT, None, key, raw_body=data)
    assert response.status == 200, response
    assert upstream.requests[0]["body"] == data


def test_deeply_nested_provider_answer_is_estimated_not_500(make_gateway, upstream):
    """A provider answer without usage is estimated from its text, however
    deep it nests: the client gets the provider's 200, the row is settled
    (it was a 500 after the provider had answered, the row upstream_error)."""
    answer = json.dumps({"id": "chatcmpl-deep", "object": "chat.completion", "created": 1, "model": "scripted-1",
                         "choices": [{"index": 0, "finish_reason": "stop", "message": {
                             "role": "assistant", "content": "abcd", "deep": "DEEP"}}]})
    answer = answer.replace('"DEEP"', nested(600).replace("[]", '["efgh"]')).encode()
    scripted = ScriptedUpstream([scripted_reply("HTTP/1.1 200 OK", [
        ("Content-Type", "application/json"), ("Content-Length", str(len(answer)))], answer)])
    try:
        gw = make_gateway(server=dict(SERVER), rate_limits=RATE_LIMITS, providers={
            "scripted": {"base_url": scripted.url, "api_key": "sk-CANARY-SCRIPTED-0123456789abcdef",
                         "models": ["scripted-*"]}})
        key = gw.create_key()[1]
        response = post(gw, CHAT, chat_body("scripted-1"), key)
        assert response.status == 200, response
        assert response.body == answer
        row, = settled_rows(gw)
        assert (row["status"], row["http_status"], row["usage_source"]) == ("ok", 200, "estimated"), row
        assert row["response_tokens"] == 6  # "assistant", "stop", "abcd", "efgh": 21 characters
    finally:
        scripted.close()


# ---- 3. lone surrogates: 400, never 500 -------------------------------------------

LONE_SURROGATE = b'"say \\ud800 now"'


@pytest.mark.parametrize("path,stream,model", [
    (CHAT, True, "gpt-4o-mini"), (CHAT, False, "gpt-4o-mini"), (CHAT, False, "openai/gpt-4o-mini"),
    (COMPLETIONS, True, "gpt-4o-mini"), (RESPONSES, True, "gpt-4o-mini"), (MESSAGES, True, "claude-sonnet-4-5"),
])
def test_lone_surrogate_in_a_proxied_body_is_400(gw, key, upstream, path, stream, model):
    """A lone UTF-16 surrogate escape (``\\ud800``) anywhere in a body is a
    400 in the API's shape (streamed chat paths re-encode the body to ask
    for usage, which used to fail with a 500); nothing is forwarded."""
    data = raw_body(path, stream, user=LONE_SURROGATE.decode())
    data = data.replace(b'"model": "gpt-4o-mini"', b'"model": "%s"' % model.encode())
    response, client = exchange(gw, json_request(path, key, data))
    client.close()
    assert_json_error(response, 400, dialect_of(path))
    assert upstream.requests == [] and gw.rows() == []
    assert_alive(gw, key)


def test_lone_surrogate_in_the_model_name_is_400(gw, key, upstream):
    response = post(gw, CHAT, None, key, raw_body=b'{"model": "gpt-\\udc00", "messages": []}')
    assert_json_error(response, 400)
    assert upstream.requests == [] and gw.rows() == []


@pytest.mark.parametrize("text", [b'"smile \\ud83d\\ude00"', b'"a backslash then u: \\\\ud800"'])
def test_surrogate_pairs_and_escaped_backslashes_are_forwarded_unchanged(gw, key, upstream, text):
    data = raw_body(CHAT, user=text.decode())
    response = post(gw, CHAT, None, key, raw_body=data)
    assert response.status == 200, response
    assert upstream.requests[0]["body"] == data


def test_lone_surrogate_in_an_admin_project_name_is_400(make_gateway, upstream):
    gw = make_gateway(environ={"LLMGW_ADMIN_TOKEN": ADMIN_TOKEN})
    response = admin(gw, "POST", "/admin/virtual-keys", raw_body=b'{"project_name": "team \\ud800"}')
    assert_json_error(response, 400)
    assert admin(gw, "GET", "/admin/virtual-keys").json()["data"] == []


# ---- 4. every secret the process knows is redacted --------------------------------

@pytest.mark.parametrize("variable,token", [("LLMGW_ADMIN_TOKEN", ADMIN_TOKEN),
                                            ("LLMGW_METRICS_TOKEN", "mtr-CANARY-metrics-token-0123456789")])
def test_tokens_from_the_environment_are_redacted_from_the_log(make_gateway, upstream, gwlog, capfd, variable,
                                                               token):
    """An admin or metrics token set in the environment (no ``llmgw-``
    prefix to spot it by) pasted into a path or a model name never reaches
    a log line."""
    gw = make_gateway(server=dict(SERVER), rate_limits=RATE_LIMITS, environ={variable: token})
    key = gw.create_key()[1]
    assert post(gw, "/v1/" + token, chat_body(), key).status == 404
    assert post(gw, CHAT, chat_body(token), key).status == 200  # unpriced: the warning quotes the model
    admin_on = variable == "LLMGW_ADMIN_TOKEN"
    assert admin(gw, "GET", "/admin/" + token).status == (404 if admin_on else 403)
    out, err = capfd.readouterr()
    for name, text in (("log", gwlog.text()), ("stdout", out), ("stderr", err)):
        assert token not in text, "the token is in the %s" % name
    assert "[redacted]" in gwlog.text()
    assert_alive(gw, key)


# ---- bare LF line endings: accepted (RFC 9112 section 2.2) -------------------------

def test_bare_lf_line_endings_are_accepted(gw, key, upstream):
    """A request whose head ends its lines with LF alone is served like one
    with CRLF (RFC 9112 2.2 lets a recipient accept it); a bare CR is still
    refused (tests/test_framing.py X02)."""
    data = request_bytes("POST", CHAT, [("Authorization", "Bearer " + key), ("Content-Type", "application/json"),
                                        ("Content-Length", str(len(json.dumps(chat_body()))))],
                         json.dumps(chat_body())).replace(b"\r\n", b"\n")
    response, client = exchange(gw, data)
    client.close()
    assert response.status == 200, response
    assert len(settled_rows(gw)) == 1


@pytest.mark.parametrize("data", [
    b"GET /v1/models HTTP/1.1\r\r\nHost: x\r\nAuthorization: Bearer {key}\r\n\r\n",
    b"GET /v1/models HTTP/1.1\r\nHost: x\r\r\nAuthorization: Bearer {key}\r\n\r\n",
    b"GET /v1/models\rX HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n\r\n",
    b"GET /v1/mo\x00dels HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n\r\n",
], ids=["cr-before-crlf-in-request-line", "cr-before-crlf-in-header", "cr-in-target", "nul-in-target"])
def test_a_bare_cr_before_a_line_end_or_in_the_target_is_refused(gw, key, upstream, data):
    """Only one CR may come before a line's LF: a bare CR anywhere else is
    refused, as the README says (a reader that ends lines at a bare CR
    would see "CR CR LF" as an empty line, the end of the head). The
    request target holds no control character either. (Every trailing
    CR used to be stripped, and the target took any byte but a space.)"""
    response, client = exchange(gw, data.replace(b"{key}", key.encode()))
    client.close()
    assert_json_error(response, 400, close=True)
    assert upstream.requests == []
    assert_alive(gw, key)


# ---- 5. a connection flood from one address leaves room for the others -------------

def answer_from(gw, key, source):
    """(status, seconds) of a chat request from client address ``source``."""
    started = time.monotonic()
    client = RawClient(gw, source=source)
    try:
        client.send(json_request(CHAT, key, chat_body()))
        response = client.read_response(timeout=5)
    finally:
        client.close()
    return response.status, time.monotonic() - started


def test_one_address_cannot_take_every_connection(make_gateway, upstream):
    """[S05 E01] 40 idle connections from one address against
    max_connections 16: that address holds its 8
    (max_connections_per_address), the rest get 429 too_many_connections at
    once; clients from other addresses are served meanwhile (they got 503
    until the flood timed out); once the flood leaves, its address is
    served again."""
    gw = make_gateway(server=dict(SERVER, max_connections=16, max_connections_per_address=8,
                                  keepalive_timeout=30, header_timeout=30), rate_limits=RATE_LIMITS)
    key = gw.create_key()[1]
    flood = [RawClient(gw, source="127.0.0.1") for _ in range(40)]
    answered = lambda: [c for c in flood if select.select([c.sock], [], [], 0)[0]]  # noqa: E731
    assert wait_until(lambda: len(answered()) == 32, 3.0), len(answered())
    for client in answered():
        response = client.read_response(timeout=1)
        assert_json_error(response, 429, code="too_many_connections", close=True)
        assert response.header("retry-after") == "1"
    for source in ("127.0.0.2", "127.0.0.3", "127.0.0.2"):
        status, seconds = answer_from(gw, key, source)
        assert status == 200 and seconds < 10, (status, seconds)  # not after the flood's header_timeout (30 s)
    assert len(upstream.requests) == 3
    for client in flood:
        client.close()
    assert wait_until(lambda: answer_from(gw, key, "127.0.0.1")[0] == 200, 3.0)


# ---- 2. large bodies: the key checked first, received without a worker -------------

def padded_body(path, size):
    """A valid request body for ``path`` of exactly ``size`` bytes."""
    text = json.dumps(body_for(path, pad=""))
    return text.replace('"pad": ""', '"pad": "%s"' % ("x" * (size - len(text)))).encode()


def start_upload(gw, key, size, path=CHAT, sent=100, expect=False):
    """A client that sent a request head declaring a ``size``-byte body and
    its first ``sent`` bytes; returns (client, the whole body)."""
    body = padded_body(path, size)
    headers = [("Authorization", "Bearer " + key), ("Content-Type", "application/json"),
               ("Content-Length", str(size))] + ([("Expect", "100-continue")] if expect else [])
    if path == MESSAGES:
        headers.append(("anthropic-version", "2023-06-01"))
    client = RawClient(gw)
    client.send(request_bytes("POST", path, headers) + body[:sent])
    return client, body


def holds_a_request(gw, record):
    """True while the key has a request in flight in this gateway."""
    return gw.gateway.limits.in_flight().get(record["id"], 0) > 0


def upload_whole(gw, key, size):
    """The status of a ``size``-byte upload sent at once; 503 if it was
    refused (the refusal may come as a reset while the body is sent)."""
    client, body = start_upload(gw, key, size)
    try:
        client.send(body[100:])
        response = client.read_response(timeout=5)
    except OSError:
        response = None
    finally:
        client.close()
    assert response is None or response.status in (200, 503), response
    return 503 if response is None else response.status


def answered(clients, timeout=0.0):
    """The clients the gateway has sent something to."""
    return [client for client in clients if select.select([client.sock], [], [], timeout)[0]]


UPLOAD_SERVER = dict(SERVER, threads=16, body_timeout=5, max_body_bytes=2 * 1024 * 1024)


def test_slow_uploads_from_a_limited_key_stall_no_one(make_gateway, upstream):
    """The issue's scenario: 64 slow 1 MiB uploads from one key limited to 5
    requests a minute and 1 in flight, against 16 worker threads. The key's
    limits are checked before any body is waited for: one upload is let in
    (and counts against max-parallel), 63 get 429 at once; no upload holds
    a worker, so another tenant is answered at once throughout. (Every
    upload used to hold a worker for body_timeout: the other tenant waited.)"""
    gw = make_gateway(server=UPLOAD_SERVER, rate_limits=RATE_LIMITS)
    limited = gw.create_key("limited", rpm=5, max_parallel=1)[1]
    other = gw.create_key("other tenant")[1]
    uploads = [start_upload(gw, limited, 1024 * 1024)[0] for _ in range(64)]
    assert wait_until(lambda: len(answered(uploads)) == 63, 3.0), len(answered(uploads))
    for client in answered(uploads):
        response = client.read_response(timeout=1)
        assert_json_error(response, 429, close=True)
    started = time.monotonic()
    for _ in range(5):
        assert post(gw, CHAT, chat_body(), other, timeout=5).status == 200
    assert time.monotonic() - started < UPLOAD_SERVER["body_timeout"], "the other tenant waited for the uploads"
    response = post(gw, CHAT, chat_body(), limited)
    assert response.status == 429 and "in flight" in response.json()["error"]["message"]
    assert worker_threads() <= 6  # admissions start no thread; 16 used to be busy receiving
    for client in uploads:
        client.close()
    assert len(upstream.requests) == 5


def test_large_bodies_arrive_without_holding_a_worker(make_gateway, upstream):
    """Two worker threads, eight keys each sending a 1 MiB body slowly: the
    bodies are received between readiness wake-ups, other requests are
    answered meanwhile, and each upload is served once whole, with its row."""
    gw = make_gateway(server=dict(UPLOAD_SERVER, threads=2), rate_limits=RATE_LIMITS)
    other = gw.create_key("other tenant")[1]
    uploads = [start_upload(gw, gw.create_key("uploader %d" % n)[1], 1024 * 1024) for n in range(8)]
    for sent in (300 * 1024, 700 * 1024):
        for client, body in uploads:
            client.send(body[100:sent] if sent == 300 * 1024 else body[300 * 1024:sent])
        started = time.monotonic()
        assert post(gw, CHAT, chat_body(), other, timeout=5).status == 200
        assert time.monotonic() - started < UPLOAD_SERVER["body_timeout"] / 2, "the other waited for an upload"
    assert answered([client for client, _ in uploads]) == []
    for client, body in uploads:
        client.send(body[700 * 1024:])
    for client, body in uploads:
        assert client.read_response(timeout=5).status == 200
        client.close()
    assert sum(len(request["body"]) == 1024 * 1024 for request in upstream.requests) == 8
    assert len(settled_rows(gw, 10)) == 10


@pytest.mark.parametrize("path", [CHAT, MESSAGES])
def test_a_large_upload_counts_against_max_parallel(make_gateway, upstream, path):
    """While one large body of a max-parallel-1 key arrives, the key's next
    request is refused at once, in the API's shape, even one that waits
    for 100 Continue (which it never gets); once the upload is served, the
    key is free again."""
    gw = make_gateway(server=UPLOAD_SERVER, rate_limits=RATE_LIMITS)
    record, key = gw.create_key(max_parallel=1)
    upload, body = start_upload(gw, key, 512 * 1024, path)
    assert wait_until(lambda: holds_a_request(gw, record))  # admitted: its body is arriving
    second, _ = start_upload(gw, key, 512 * 1024, path, sent=0, expect=True)
    assert_json_error(second.read_response(timeout=2), 429, dialect_of(path), close=True)
    assert b"100 Continue" not in second.received
    assert post(gw, path, body_for(path), key).status == 429
    upload.send(body[100:])
    assert upload.read_response(timeout=5).status == 200
    assert post(gw, path, body_for(path), key).status == 200


def test_an_upload_given_up_gives_its_place_back(make_gateway, upstream):
    """A large body that never arrives whole (408 at body_timeout) or whose
    client leaves gives back its request in flight."""
    gw = make_gateway(server=dict(UPLOAD_SERVER, body_timeout=1), rate_limits=RATE_LIMITS)
    record, key = gw.create_key(max_parallel=1)
    upload, _ = start_upload(gw, key, 512 * 1024)
    assert_json_error(upload.read_response(timeout=3), 408, close=True)
    upload, _ = start_upload(gw, key, 512 * 1024)
    assert wait_until(lambda: holds_a_request(gw, record))
    upload.rst()
    assert wait_until(lambda: post(gw, CHAT, chat_body(), key).status == 200, 3.0)
    assert upstream.requests and all(len(r["body"]) < 1000 for r in upstream.requests)


def test_large_bodies_being_received_are_bounded_in_total_and_per_key(make_gateway, upstream):
    """body_buffer_bytes 2 MiB: a key may hold one large body whatever its
    size, a second only within a quarter of the buffer (429
    too_many_uploads); all keys together within the buffer (503)."""
    gw = make_gateway(server=dict(UPLOAD_SERVER, max_body_bytes=1024 * 1024, body_buffer_bytes=2 * 1024 * 1024),
                      rate_limits=RATE_LIMITS)
    keys = [gw.create_key("uploader %d" % n)[1] for n in range(4)]
    first = [start_upload(gw, keys[n], 500 * 1024) for n in range(3)]  # 1.5 of 2 MiB
    again, _ = start_upload(gw, keys[0], 300 * 1024, sent=0)  # 0.8 of the key's 0.5 MiB
    assert_json_error(again.read_response(timeout=2), 429, code="too_many_uploads", close=True)
    full, _ = start_upload(gw, keys[3], 600 * 1024, sent=0)  # 2.1 of 2 MiB
    assert_json_error(full.read_response(timeout=2), 503, close=True)
    assert answered([client for client, _ in first]) == []
    client, body = first[0]
    client.send(body[100:])
    assert client.read_response(timeout=5).status == 200
    # The finished upload's room is given back just after its answer: a
    # client retrying a 503 (as Retry-After says) gets in once it is.
    assert wait_until(lambda: upload_whole(gw, keys[3], 600 * 1024) == 200, timeout=10)
    for client, _ in first[1:]:
        client.close()


def test_an_upload_from_a_key_without_budget_left_is_refused_before_its_body(make_gateway, upstream):
    gw = make_gateway(server=UPLOAD_SERVER, rate_limits=RATE_LIMITS)
    key = gw.create_key(max_budget=0)[1]
    client, _ = start_upload(gw, key, 512 * 1024, sent=0, expect=True)
    assert_json_error(client.read_response(timeout=2), 429, code="budget_exceeded", close=True)
    assert b"100 Continue" not in client.received and upstream.requests == []


# ---- 6. what a fuzzer leaves behind: nothing that grows with its requests ----------

def test_model_names_are_bounded(gw, key, upstream):
    """A model name longer than MAX_MODEL_CHARS is a 400 before anything is
    forwarded or recorded (it would be copied into log lines, usage rows and
    the gateway's memory)."""
    response = post(gw, CHAT, chat_body("m" * (llmgw.MAX_MODEL_CHARS + 1)), key)
    assert_json_error(response, 400)
    assert upstream.requests == [] and gw.rows() == []
    assert post(gw, CHAT, chat_body("m" * llmgw.MAX_MODEL_CHARS), key).status == 200


def test_unpriced_model_names_are_remembered_only_up_to_a_bound(gw, key, upstream, gwlog):
    """Each model without a price is logged once, but only the first
    UNPRICED_MODELS_LOGGED of them: the names remembered for that used to
    grow with every new name a client made up (found by fuzzing: the
    gateway's only memory that grew with the requests)."""
    for n in range(llmgw.UNPRICED_MODELS_LOGGED + 20):
        assert post(gw, CHAT, chat_body("made-up-%d" % n), key).status == 200
    warnings = [line for line in gwlog.lines() if "has no price" in line]
    assert len(warnings) == llmgw.UNPRICED_MODELS_LOGGED
    assert "further unpriced models are not logged" in warnings[-1]
    assert "made-up-0 " in warnings[0]


# ---- refused heads answer in the shape of the API called -------------------------

@pytest.mark.parametrize("path", [CHAT, MESSAGES])
@pytest.mark.parametrize("case,status", [("chunked", 411), ("folded", 400), ("huge-head", 431)])
def test_a_refused_request_head_answers_in_the_shape_of_its_path(gw, key, upstream, path, case, status):
    """Regression (found in review): a head refused before or while it was
    parsed was answered in OpenAI's shape even on /v1/messages, whose SDK
    reads Anthropic's. The target names the API, so the refusal uses it."""
    headers = [("Authorization", "Bearer " + key), ("Content-Type", "application/json")]
    if case == "chunked":
        headers.append(("Transfer-Encoding", "chunked"))
    elif case == "folded":
        headers.append(("X-Folded", "a\r\n b"))
    else:
        headers += [("X-Pad-%d" % n, "p" * 1000) for n in range(80)]
    data = request_bytes("POST", path, headers, b"2\r\n{}\r\n0\r\n\r\n" if case == "chunked" else b"")
    response, client = exchange(gw, data)
    client.close()
    assert_json_error(response, status, dialect_of(path), close=True)
    assert upstream.requests == [] and gw.rows() == []
    assert_alive(gw, key)
