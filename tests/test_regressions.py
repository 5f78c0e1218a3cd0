"""Regression tests for the bugs found by the code review of llmgw.py.

One test (or one parametrised test) per finding; each asserts the correct
behaviour against the real gateway over sockets:

* B1  a provider answer framed by ``Connection: close`` (no Content-Length,
      no chunking), streamed or not, chat and messages.
* B2  a provider key with a non-ASCII character (config and database).
* B3  a Responses stream event whose ``"type"`` is null.
* B4  a database that refuses writes (SQLite trigger) at settle and at begin.
* B5  pooled upstream connections the provider closed while idle.
* B7  ``stats --reprice --apply`` on an ``interrupted`` row.
* B8  a budget set while a call is in flight.
* B9  a row marked ``interrupted`` while its owner still runs.
* B10 a provider that holds its connection open after ``data: [DONE]``.
* obs-fold continuation lines in a provider's response headers.
* a reload (SIGHUP) of the server timeouts.
* ``HEAD /health`` followed by a pipelined request.

Local helper: ``ScriptedUpstream``, a provider whose every answer is written
byte for byte by the test (``scripted_gateway`` starts one with a gateway in
front of it). Nothing in llmgw is mocked.
"""

import json
import logging
import socket
import sqlite3
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

import llmgw
from conftest import (ADMIN_TOKEN, CHAT, OPENAI_KEY, MESSAGES, RESPONSES, GatewayProcess, RawClient, RunningGateway,
                      admin, assert_json_error, base_config, body_for, call, expected_columns, expected_cost,
                      json_request, paths_env, post, request_bytes, settled_rows, sse_events, tokens_of,
                      wait_until)


# ---- helpers -------------------------------------------------------------------------

class ScriptedUpstream:
    """A provider whose answers the test writes itself: ``script(handler,
    body)`` runs for every request (its body already read) and writes raw
    bytes to ``handler.wfile``. ``idle_timeout`` closes a keep-alive
    connection that stays idle that long, as providers and their load
    balancers do. ``requests`` records (client address, body) pairs;
    ``closed`` counts the connections it has closed."""

    def __init__(self, script, idle_timeout=None):
        upstream = self
        self.requests = []
        self.closed = 0
        self._lock = threading.Lock()

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            timeout = idle_timeout

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                with upstream._lock:
                    upstream.requests.append((self.client_address, body))
                script(self, body)

            def log_message(self, *args):
                pass

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def shutdown_request(self, request):
                super().shutdown_request(request)
                with upstream._lock:
                    upstream.closed += 1

        self.server = Server(("127.0.0.1", 0), Handler)
        self.server.handle_error = lambda request, address: None  # the gateway may hang up on us
        self.url = "http://127.0.0.1:%d" % self.server.server_address[1]
        self._thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def scripted_gateway(tmp_path):
    """``start(script, idle_timeout=None, **sections)`` -> (ScriptedUpstream,
    RunningGateway pointed at it); both stopped at the end."""
    started = []

    def start(script, idle_timeout=None, **sections):
        upstream = ScriptedUpstream(script, idle_timeout)
        gateway = RunningGateway(base_config(upstream.url, **sections),
                                 tmp_path / ("scripted%d.db" % len(started)), {})
        started.append((upstream, gateway))
        return upstream, gateway
    yield start
    for upstream, gateway in started:
        gateway.stop()
        upstream.close()


def chunk(data):
    return b"%x\r\n%s\r\n" % (len(data), data)


def answer(target, path, body, key, timeout=2.0, **kwargs):
    """A whole response, or a test failure naming the request that got none."""
    try:
        return post(target, path, body, key=key, timeout=timeout, **kwargs)
    except OSError as exc:
        pytest.fail("no complete answer to %s %r within %.1f s: %s: %s"
                    % (path, body.get("model"), timeout, type(exc).__name__, exc))


def ledger(gateway, key_id):
    """(spent, reserved) nano-dollars of the key's budget period rows, summed."""
    conn = sqlite3.connect(gateway.db_path, timeout=10)
    try:
        return conn.execute("SELECT COALESCE(SUM(spent_nanousd), 0), COALESCE(SUM(reserved_nanousd), 0) "
                            "FROM key_spend WHERE key_id = ?", (key_id,)).fetchone()
    finally:
        conn.close()


def health_recovers(gateway, timeout=2.0):
    """/health answers 200 within ``timeout`` (a closed client connection
    may take the gateway a moment to notice); returns the last status."""
    def probe():
        try:
            return call(gateway, "GET", "/health", timeout=1).status == 200
        except OSError:
            return False
    return wait_until(probe, timeout)


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


def execute_sql(db_path, *statements):
    conn = sqlite3.connect(db_path, timeout=10)
    try:
        for statement in statements:
            conn.execute(statement)
        conn.commit()
    finally:
        conn.close()


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
        execute_sql(gateway.db_path, "INSERT INTO provider_keys (provider, api_key, updated_at) "
                                     "VALUES ('openai', '%s', 0)" % secret, llmgw.BUMP_GENERATION)
    record, key = gateway.create_key(max_parallel=2)
    for _ in range(3):  # more than max_parallel: no in-flight slot may leak
        response = answer(gateway, CHAT, body_for(CHAT), key)
        assert_json_error(response, 503, code="provider_key_invalid")
        assert b"CANARY" not in response.body and "\u2019".encode() not in response.body
    assert upstream.requests == []
    assert [row["status"] for row in gateway.rows() if row["status"] == "pending"] == []


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


# ---- B4: the database refuses writes -------------------------------------------------

def test_b4_failing_settle_still_answers_and_failing_begin_is_503_storage_unavailable(make_gateway, upstream,
                                                                                      caplog):
    caplog.set_level(logging.ERROR, logger="llmgw")
    gateway = make_gateway(server={"max_connections": 2})
    record, key = gateway.create_key(max_parallel=1)
    execute_sql(gateway.db_path, "CREATE TRIGGER refuse_settle BEFORE UPDATE ON usage "
                                 "BEGIN SELECT RAISE(ABORT, 'simulated I/O error'); END")

    # The provider answered: the client gets that answer, the failure is logged.
    whole = answer(gateway, CHAT, body_for(CHAT), key)
    assert whole.status == 200, whole
    assert whole.json()["usage"] == upstream.reported[-1]["usage"]
    for _ in range(2):
        streamed = answer(gateway, CHAT, body_for(CHAT, stream=True), key)
        assert streamed.status == 200, streamed
        assert sse_events(streamed.body)[-1] == (None, "[DONE]"), streamed.body[-200:]
    assert len(upstream.requests) == 3
    assert any(r.levelno >= logging.ERROR and r.name.startswith("llmgw") for r in caplog.records), \
        "the failed settlement was not logged"
    assert health_recovers(gateway), "connection slots leaked: /health is refused"

    # The pending row cannot be written: refused before anything reaches the provider.
    execute_sql(gateway.db_path, "DROP TRIGGER refuse_settle",
                "CREATE TRIGGER refuse_begin BEFORE INSERT ON usage "
                "BEGIN SELECT RAISE(ABORT, 'simulated I/O error'); END")
    refused = answer(gateway, CHAT, body_for(CHAT), key)
    assert_json_error(refused, 503, code="storage_unavailable")
    assert len(upstream.requests) == 3
    assert health_recovers(gateway), "connection slots leaked: /health is refused"

    # Storage back: the key (max_parallel=1) has no in-flight slot left over.
    execute_sql(gateway.db_path, "DROP TRIGGER refuse_begin")
    assert answer(gateway, CHAT, body_for(CHAT), key).status == 200


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


# ---- B7: re-pricing an interrupted row -----------------------------------------------

def test_b7_reprice_apply_leaves_an_interrupted_rows_charge_alone(tmp_path, make_gateway, upstream, cli_main):
    pricing = {"default": {"input": 1, "output": 2}}
    (tmp_path / "config.yaml").write_text(json.dumps(base_config(upstream.url, pricing=pricing)))
    cli_main("init", check=True)
    created = json.loads(cli_main("keys", "create", "interrupted", "--budget", "5", "--output", "json",
                                  check=True).stdout)
    child = GatewayProcess(tmp_path, paths_env(tmp_path))
    try:
        child.start()
        hanging = threading.Thread(target=lambda: _ignore_errors(
            post, child, CHAT, body_for(CHAT, model="gpt-4o-mini-hang", max_tokens=100), created["key"], timeout=5))
        hanging.start()
        assert wait_until(lambda: [r for r in _rows(tmp_path) if r["status"] == "pending"]), "no pending row"
        child.kill9()
        hanging.join(5)
    finally:
        child.cleanup()

    gateway = make_gateway(pricing=pricing)  # its start marks the dead process's row interrupted
    rows = gateway.wait_for_rows(lambda rows: rows and rows[0]["status"] == "interrupted", timeout=3)
    interrupted = rows[0]
    assert interrupted["status"] == "interrupted", interrupted
    charged = interrupted["cost_nanousd"]
    assert charged > 0, interrupted  # the reservation was charged
    spend_before = ledger(gateway, created["id"])
    assert spend_before == (charged, 0)

    cli_main("stats", "--reprice", "--apply", "--output", "json", check=True)
    after = gateway.rows()[0]
    assert (after["status"], after["cost_nanousd"]) == ("interrupted", charged), after
    assert ledger(gateway, created["id"]) == spend_before


def _ignore_errors(function, *args, **kwargs):
    try:
        function(*args, **kwargs)
    except OSError:
        pass


def _rows(tmp_path):
    conn = sqlite3.connect(str(tmp_path / "gateway.db"), timeout=10)
    conn.row_factory = sqlite3.Row
    try:
        return [dict(row) for row in conn.execute("SELECT * FROM usage ORDER BY id")]
    except sqlite3.OperationalError:  # no table yet
        return []
    finally:
        conn.close()


# ---- B8: a budget set while a call is in flight --------------------------------------

@pytest.mark.parametrize("how", ["admin-patch", "store-update"])
def test_b8_a_call_in_flight_when_a_budget_is_set_counts_towards_it(make_gateway, upstream, how):
    gateway = make_gateway(environ={"LLMGW_ADMIN_TOKEN": ADMIN_TOKEN},
                           pricing={"default": {"input": 1000, "output": 1000}})
    record, key = gateway.create_key()  # no budget yet
    results = []
    flight = threading.Thread(target=lambda: results.append(
        answer(gateway, CHAT, body_for(CHAT, model="gpt-4o-mini-slow"), key, timeout=5)))
    flight.start()
    assert gateway.wait_for_rows(lambda rows: rows and rows[0]["status"] == "pending", timeout=2)
    if how == "admin-patch":
        patched = admin(gateway, "PATCH", "/admin/virtual-keys/" + record["id"], {"max_budget": 10})
        assert patched.status == 200, patched
    else:
        assert gateway.store.update_key(record["id"], {"max_budget_nanousd": 10 * 10 ** 9}, time.time())
    flight.join(5)
    assert results and results[0].status == 200, results

    row, = settled_rows(gateway)
    cost = expected_cost(expected_columns(CHAT, upstream.reported[-1]["usage"]), 1000, 1000)
    assert (row["status"], row["cost_nanousd"]) == ("ok", cost), row
    assert ledger(gateway, record["id"]) == (cost, 0)
    info = call(gateway, "GET", "/v1/key/info", key=key).json()
    assert (info["spent"], info["reserved"]) == (llmgw.nanousd_to_usd(cost), 0), info


# ---- B9: a row interrupted while its owner still runs --------------------------------

def test_b9_a_row_interrupted_under_its_running_owner_is_not_settled_twice(make_gateway, upstream):
    gateway = make_gateway(pricing={"default": {"input": 1000, "output": 1000}})
    record, key = gateway.create_key(max_budget=5)
    results = []
    flight = threading.Thread(target=lambda: results.append(
        answer(gateway, CHAT, body_for(CHAT, model="gpt-4o-mini-slow", max_tokens=10), key, timeout=5)))
    flight.start()
    rows = gateway.wait_for_rows(lambda rows: rows and rows[0]["status"] == "pending", timeout=2)
    assert rows and rows[0]["status"] == "pending", rows
    pending = rows[0]
    reserved = pending["reserved_nanousd"]
    assert reserved > 0
    # What recovery does to a row it believes abandoned (say another
    # container with the same pid): charge the reservation in full.
    conn = sqlite3.connect(gateway.db_path, timeout=10, isolation_level=None)
    try:
        conn.execute("BEGIN IMMEDIATE")
        marked = conn.execute("UPDATE usage SET status = 'interrupted', finished_at = ?, "
                              "cost_nanousd = reserved_nanousd, usage_source = 'estimated', reserved_nanousd = 0 "
                              "WHERE id = ? AND status = 'pending'",
                              (time.time(), pending["id"])).rowcount
        conn.execute("UPDATE key_spend SET reserved_nanousd = reserved_nanousd - ?, spent_nanousd = spent_nanousd + ? "
                     "WHERE key_id = ? AND period_start = ?",
                     (reserved, reserved, record["id"], pending["budget_period_start"]))
        conn.execute("COMMIT")
    finally:
        conn.close()
    assert marked == 1, "the call finished before the test could interrupt its row"
    flight.join(5)
    assert results and results[0].status == 200, results

    row, = settled_rows(gateway)
    actual = expected_cost(expected_columns(CHAT, upstream.reported[-1]["usage"]), 1000, 1000)
    assert row["cost_nanousd"] in (reserved, actual), row
    spent, still_reserved = ledger(gateway, record["id"])
    assert still_reserved == 0 and spent >= 0, (spent, still_reserved)
    assert spent == row["cost_nanousd"], "charged %d for a row of cost %d" % (spent, row["cost_nanousd"])


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


# ---- SIGHUP-style reload of the server timeouts --------------------------------------

def test_reload_applies_a_new_header_timeout_to_the_connection_watcher(make_gateway, upstream):
    gateway = make_gateway(server={"header_timeout": 30, "keepalive_timeout": 30})
    gateway.gateway.reload(llmgw.parse_config(base_config(upstream.url, server={"header_timeout": 0.5,
                                                                                 "keepalive_timeout": 30})))
    client = RawClient(gateway, timeout=3)
    started = time.monotonic()
    client.send(b"GET /v1/mo")  # a request head that never completes
    try:
        response = client.read_response(timeout=2.0)
    except TimeoutError:
        pytest.fail("no 408 within 2 s: the reloaded header_timeout (0.5 s) was not applied")
    elapsed = time.monotonic() - started
    client.close()
    assert_json_error(response, 408, close=True)
    assert elapsed < 1.5, "408 after %.2f s" % elapsed


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
