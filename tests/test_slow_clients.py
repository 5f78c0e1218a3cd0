"""Slow and idle clients, deadlines, workers and the connection cap
(RELIABILITY.md 1.3), and a reload of the server timeouts.

The real gateway (``make_gateway``, small timeouts) is driven over raw
sockets. RELIABILITY ids are given in brackets in each test's docstring.
"""

import os
import select
import socket
import threading
import time

import pytest

import llmgw
from conftest import (CHAT, MESSAGES, ONE_ATTEMPT, RATE_LIMITS, SCRIPTED_KEY, SERVER, RawClient, assert_alive,
                      assert_json_error, base_config, body_for, call, chat_body, dialect_of, json_request, post,
                      request_bytes, settled_rows, wait_idle, wait_until)
from fake_upstream import ScriptedUpstream

#: Whatever a test did, its gateways end with no row pending, nothing reserved, nothing in flight.
pytestmark = pytest.mark.usefixtures("balanced_books")


# ==== 1.3 Slow clients ========================================================

def test_slowloris_does_not_delay_or_grow_threads(gw, key, upstream):
    """[S01] 200 sockets each holding a partial head (and 5 trickling a
    byte every 0.2 s): a normal request meanwhile takes < 1 s; every slow
    socket is closed (408 JSON or EOF) after header_timeout; the gateway's
    thread count stays within a small constant of its baseline."""
    assert_alive(gw, key)  # warm: one worker exists
    baseline = threading.active_count()
    slack = 8
    slow, sent_at = [], []
    for index in range(200):
        client = RawClient(gw)
        client.send(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + key.encode())
        slow.append(client)
        sent_at.append(time.monotonic())
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
    closed_at = []  # after each socket's first bytes, which start its header_timeout
    for client, sent in zip(slow, sent_at):
        response = client.read_response(timeout=3.0)
        closed_at.append(time.monotonic() - sent)
        if response is not None:
            assert_json_error(response, 408, close=True)
        assert client.wait_eof(1.0)
        peak = max(peak, threading.active_count())
        client.close()
    assert min(closed_at) >= SERVER["header_timeout"] - 0.1, "closed before header_timeout"
    assert max(closed_at) < SERVER["header_timeout"] + 1.5
    wait_idle(gw)  # every slow socket released
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

    def busy():
        return gw.server.gauges()["llmgw_workers_busy"]
    assert wait_until(lambda: busy() == 0)  # the probe's worker is done
    hanging = small_window_client(gw, timeout=busy_seconds + 5)
    hanging.sendall(json_request(CHAT, key, chat_body("scripted-1", stream=True)))
    # The stream is being written to it (not parked waiting for its provider).
    assert wait_until(lambda: select.select([hanging], [], [], 0)[0] and busy() == 1)
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
    header timeouts together (but not server.queue_timeout): a whole
    request that arrived meanwhile is served once the worker is free, never
    dropped as idle or timed out."""
    # The worker is busy relaying the stream until the kernel's buffers are
    # full, then send_timeout (3 s) more: 5 s in all under a loaded machine,
    # which met the default queue_timeout (5 s, its own test is below).
    gw, _, key, hanging = with_the_only_worker_busy(make_gateway, busy_seconds=3, queue_timeout=60)
    waiting = RawClient(gw, timeout=60)
    waiting.send(json_request(CHAT, key, chat_body()))
    response = waiting.read_response(timeout=60)
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
    assert upstream.wait_for_requests(2)  # counted in flight before they are sent: under load, well before
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


def resident_mb():
    """This (the gateway's) process's resident memory, in MB."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / (1024 * 1024)


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="resident memory is read from /proc")
@pytest.mark.parametrize("path", [CHAT, MESSAGES])
def test_calls_beyond_max_memory_get_503_at_once(make_gateway, upstream, path):
    """[capacity] server.max_memory_mb 40 MB above the resident memory of
    the process (the gateway serves in this one): a call goes through; while
    the process holds 80 MB more, a new call is refused at once with 503 +
    Retry-After in its API's shape, counted, and never reaches the provider
    nor the books; once that memory is freed, calls go through again."""
    limit = int(resident_mb()) + 40
    gw = make_gateway(server=dict(SERVER, max_memory_mb=limit), rate_limits=RATE_LIMITS, routing=ONE_ATTEMPT)
    key = gw.create_key()[1]
    assert post(gw, path, body_for(path), key).status == 200
    ballast = b"\x01" * (80 * 1024 * 1024)
    assert wait_until(lambda: gw.gateway.resident_memory.megabytes() >= limit)
    sent_upstream = len(upstream.requests)
    response = post(gw, path, body_for(path), key, timeout=5)
    payload = assert_json_error(response, 503, dialect=dialect_of(path))
    assert response.header("retry-after") == "1"
    assert dialect_of(path) == "anthropic" or payload["error"]["code"] == "gateway_full"
    assert "memory" in payload["error"]["message"]
    assert gw.gateway.capacity_refusals == 1
    assert len(upstream.requests) == sent_upstream
    del ballast
    assert wait_until(lambda: gw.gateway.resident_memory.megabytes() < limit)
    assert post(gw, path, body_for(path), key).status == 200
    assert [row["status"] for row in settled_rows(gw, 2)] == ["ok", "ok"]


def test_a_request_waiting_for_a_worker_at_shutdown_gets_503(make_gateway, upstream):
    """[pool, SIGTERM drain] The only worker is busy when the gateway stops:
    the request it serves ends within the drain, and a whole request that
    was still waiting for a worker is answered 503 with Retry-After (to
    retry elsewhere), never dropped without an answer."""
    # The drain outlasts the busy worker: its writes fill the kernel's buffers, then wait send_timeout.
    gw, _, key, hanging = with_the_only_worker_busy(make_gateway, busy_seconds=1, drain_timeout=5)
    waiting = RawClient(gw, timeout=5)
    waiting.send(json_request(CHAT, key, chat_body()))
    assert wait_until(lambda: gw.server.gauges()["llmgw_connections_open"] == 2)  # accepted, its request unread
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
    # Reading 5 MB through a 4 KiB window took 17 s on a loaded machine: the
    # whole request's deadline (SERVER's 5 s) is not what this test is about.
    gw, scripted, events = big_stream_gateway(make_gateway, send_timeout=5, request_deadline=300)
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
