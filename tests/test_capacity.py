"""Capacity: a call waiting for its provider costs a socket, not a thread.

The real gateway with few worker threads (``server.threads`` 2 to 4) takes
a crowd of concurrent calls to the fake upstream's slow, dripping, hanging
and vanishing providers: each call is parked on the readiness queue while
its provider is silent, so every call is served at once and answered as the
README promises (usage rows, errors, client hang-ups), through a drain and
a config reload. Scale figures live in ``tests/bench.py --streams``.
"""

import json
import re
import selectors
import socket
import ssl
import subprocess
import sys
import threading
import time

import pytest

import llmgw
from conftest import (ANTHROPIC_KEY, CHAT, MESSAGES, RawClient, assert_json_error, base_config, body_for, json_request,
                      post, settled_rows, sse_events, wait_until)

SERVER = {"keepalive_timeout": 30, "header_timeout": 10, "upstream_timeout": 2, "drain_timeout": 10}
RATE_LIMITS = {"default": 1000000}
#: One attempt per call: these tests count parked calls and their rows (retries: test_routing.py).
ONE_ATTEMPT = {"retries": 0}


def ours(earlier):
    return sum(1 for t in threading.enumerate() if t.name == "llmgw-worker" and t not in earlier)


def whole_answer(data):
    """(status, body) once ``data`` holds a whole response (Content-Length or
    chunked), else None."""
    end = data.find(b"\r\n\r\n")
    if end < 0:
        return None
    head, rest = data[:end].decode("latin-1").lower(), data[end + 4:]
    status = int(head[9:12])
    if "transfer-encoding: chunked" in head:
        body = b""
        while True:
            size_end = rest.find(b"\r\n")
            if size_end < 0:
                return None
            size = int(rest[:size_end], 16)
            if len(rest) < size_end + 2 + size + 2:
                return None
            if size == 0:
                return status, body
            body, rest = body + rest[size_end + 2:size_end + 2 + size], rest[size_end + 4 + size:]
    length = int(head.split("content-length:")[1].split("\r\n")[0])
    return (status, rest[:length]) if len(rest) >= length else None


def crowd(gateway, requests, timeout=30.0, on_tick=None):
    """Send every request at once, each on its own connection, and read each
    whole answer; (status, body) per request, None where none came."""
    selector = selectors.DefaultSelector()
    answers, buffers = [None] * len(requests), {}
    for index, data in enumerate(requests):
        sock = socket.create_connection(("127.0.0.1", gateway.port), timeout=5)
        sock.sendall(data)
        sock.setblocking(False)
        selector.register(sock, selectors.EVENT_READ, index)
        buffers[sock] = b""
    deadline = time.monotonic() + timeout
    while buffers and time.monotonic() < deadline:
        for key, _ in selector.select(0.05):
            sock = key.fileobj
            try:
                data = sock.recv(65536)
            except OSError:
                data = b""
            buffers[sock] += data
            answer = whole_answer(buffers[sock])
            if answer is not None or not data:
                answers[key.data] = answer
                selector.unregister(sock)
                sock.close()
                del buffers[sock]
        if on_tick is not None:
            on_tick()
    for sock in buffers:
        sock.close()
    return answers


def stream_ended(body, path=CHAT):
    events = sse_events(body)
    return events[-1][1] == "[DONE]" if path == CHAT else events[-1][0] == "message_stop"


def test_hundreds_of_calls_wait_for_their_providers_on_four_threads(make_gateway, upstream):
    """240 concurrent calls on server.threads 4: streams paced 0.2 s an event
    (OpenAI and Anthropic), answers that take 0.5 s to begin, streams their
    provider cuts, and providers that never answer (504 after 2 s). More
    than a hundred are in flight at once on at most 4 worker threads; each
    gets its own answer, and every one is on the books with its outcome."""
    earlier = {t for t in threading.enumerate() if t.name == "llmgw-worker"}
    gw = make_gateway(server=dict(SERVER, threads=4), rate_limits=RATE_LIMITS, routing=ONE_ATTEMPT)
    key = gw.create_key()[1]
    kinds = ([(CHAT, "gpt-4o-mini-slowstream", True)] * 80 + [(MESSAGES, "claude-slowstream", True)] * 40
             + [(CHAT, "gpt-4o-mini-slow", False)] * 80 + [(CHAT, "gpt-4o-mini-dropstream", True)] * 20
             + [(CHAT, "gpt-4o-mini-hang", False)] * 20)
    requests = [json_request(path, key, body_for(path, model, **({"stream": True} if streamed else {})),
                             extra=[("anthropic-version", "2023-06-01")] if path == MESSAGES else [])
                for path, model, streamed in kinds]
    peak = {"threads": 0, "in_flight": 0}

    def sample():
        peak["threads"] = max(peak["threads"], ours(earlier))
        peak["in_flight"] = max(peak["in_flight"], gw.gateway.in_flight)
    answers = crowd(gw, requests, on_tick=sample)
    for (path, model, streamed), answer in zip(kinds, answers):
        assert answer is not None, model
        status, body = answer
        if model.endswith("hang"):
            assert status == 504, (model, answer)
        else:
            assert status == 200, (model, answer)
            if streamed:
                events = sse_events(body)
                assert stream_ended(body, path) or model.endswith("dropstream"), (model, events[-3:])
                assert not model.endswith("dropstream") or "upstream_truncated" in events[-1][1], events[-2:]
            else:
                assert json.loads(body)["usage"]["total_tokens"] > 0
    assert peak["in_flight"] > 100, "only %d calls were in flight at once" % peak["in_flight"]
    assert 1 <= peak["threads"] <= 4, "worker threads peaked at %d" % peak["threads"]
    rows = settled_rows(gw, len(kinds), timeout=10)
    outcomes = {}
    for row in rows:
        outcomes[row["status"]] = outcomes.get(row["status"], 0) + 1
    assert outcomes == {"ok": 200, "upstream_truncated": 20, "timeout": 20}, outcomes
    assert all(row["usage_source"] == "reported" for row in rows if row["status"] == "ok")
    assert gw.gateway.in_flight == 0


def test_clients_that_leave_parked_streams_stop_their_providers(make_gateway, upstream):
    """100 dripping streams (an event every 0.3 s, never ending) on two
    threads; every client reads its first event and leaves. At its next
    event each call finds its client gone, closes its provider connection
    and records client_disconnected; nothing stays open or in flight."""
    gw = make_gateway(server=dict(SERVER, threads=2), rate_limits=RATE_LIMITS, routing=ONE_ATTEMPT)
    key = gw.create_key()[1]
    clients = [RawClient(gw, timeout=10) for _ in range(100)]
    for client in clients:
        client.send(json_request(CHAT, key, body_for(CHAT, "gpt-4o-mini-drip", stream=True)))
    for client in clients:
        assert client.read_head(timeout=10)[0] == 200
        assert client.next_chunk(timeout=10)
    assert gw.gateway.in_flight == 100
    for client in clients:
        client.rst()
    assert wait_until(lambda: upstream.open_connections == 0, timeout=10), upstream.open_connections
    rows = settled_rows(gw, 100, timeout=10)
    assert {row["status"] for row in rows} == {"client_disconnected"}
    assert gw.gateway.in_flight == 0
    assert post(gw, CHAT, body_for(CHAT), key).status == 200


def start_parked_streams(gw, key, count):
    """``count`` paced streams, in flight (parked) when this returns."""
    clients = [RawClient(gw, timeout=15) for _ in range(count)]
    for client in clients:
        client.send(json_request(CHAT, key, body_for(CHAT, "gpt-4o-mini-slowstream", stream=True)))
    assert wait_until(lambda: gw.gateway.in_flight == count, timeout=10), gw.gateway.in_flight
    return clients


def assert_streams_finish(clients):
    for client in clients:
        response = client.read_response(timeout=15)
        client.close()
        assert response is not None and response.status == 200 and response.terminated, response
        assert stream_ended(response.body)


def test_a_drain_lets_parked_streams_finish(make_gateway, upstream):
    """SIGTERM's drain (server_close) while 60 streams are parked on two
    threads: every stream is relayed to its end, every row settled ok,
    and the drain returns once they have."""
    gw = make_gateway(server=dict(SERVER, threads=2), rate_limits=RATE_LIMITS, routing=ONE_ATTEMPT)
    key = gw.create_key()[1]
    clients = start_parked_streams(gw, key, 60)
    stopper = threading.Thread(target=gw.stop)
    stopper.start()
    assert_streams_finish(clients)
    stopper.join(15)
    assert not stopper.is_alive()
    rows = settled_rows(gw, 60)
    assert [row["status"] for row in rows] == ["ok"] * 60
    assert gw.gateway.in_flight == 0


def test_a_reload_leaves_parked_streams_running(make_gateway, upstream):
    """The reload SIGHUP runs, while 60 streams are parked on two threads:
    it replaces every provider (their settings changed) and closes the
    retired pools, and every parked stream still ends whole and on the
    books; calls after it use the new settings."""
    gw = make_gateway(server=dict(SERVER, threads=2), rate_limits=RATE_LIMITS, routing=ONE_ATTEMPT)
    key = gw.create_key()[1]
    clients = start_parked_streams(gw, key, 60)
    before = dict(gw.gateway.providers)
    document = base_config(upstream.url, server=dict(SERVER, threads=2, upstream_timeout=3), rate_limits=RATE_LIMITS,
                           routing=ONE_ATTEMPT)
    gw.gateway.reload(llmgw.parse_config(document))
    assert all(gw.gateway.providers[name] is not provider for name, provider in before.items())
    assert_streams_finish(clients)
    rows = settled_rows(gw, 60)
    assert [row["status"] for row in rows] == ["ok"] * 60
    assert gw.gateway.config.server.upstream_timeout == 3
    assert post(gw, CHAT, body_for(CHAT), key).status == 200


def tls_stream_provider(tmp_path, events=4, gap=0.2, halting=None, burst=None):
    """(base URL, CA file): a provider on TLS (a certificate for localhost
    made here) answering every request with a stream of ``events`` chat
    chunks ``gap`` seconds apart (each its own TLS record), usage, then
    [DONE]; before the usage it waits for the event ``burst``, if given
    (up to 10 s). ``halting``: every TLS
    record of an answer leaves in two halves ``gap`` seconds apart, so the
    reader holds part of a record while the provider stalls, except that
    after the first half of the first answer's first event the provider
    sets ``halting["stalled"]`` and waits for ``halting["resume"]``."""
    cert, key_file = str(tmp_path / "cert.pem"), str(tmp_path / "key.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost", "-keyout", key_file, "-out", cert],
                   check=True, capture_output=True)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key_file)
    listener = socket.create_server(("127.0.0.1", 0))
    chunk = b'data: {"choices":[{"index":0,"delta":{"content":"tls"}}]}\n\n'
    usage = b'data: {"choices":[],"usage":{"prompt_tokens":7,"completion_tokens":%d,"total_tokens":%d}}\n\n' % (
        events, 7 + events)

    def framed(payload):
        return b"%x\r\n%s\r\n" % (len(payload), payload)

    def answer(recv, send):
        data = b""
        while b"\r\n\r\n" not in data:
            data += recv()
        head, _, body = data.partition(b"\r\n\r\n")
        length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))
        while len(body) < length:
            body += recv()
        send(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n"
             b"Connection: close\r\n\r\n")
        for _ in range(events):
            time.sleep(gap)
            send(framed(chunk))
        if burst is not None:
            burst.wait(10)
        send(framed(usage) + framed(b"data: [DONE]\n\n") + b"0\r\n\r\n")

    def halting_tls(raw):
        """(recv, send) of TLS over ``raw`` through memory buffers, so that
        each record written can be sent in halves."""
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        tls = context.wrap_bio(incoming, outgoing, server_side=True)

        def flush(halves=False, stall=False):
            data = outgoing.read()
            if halves:
                raw.sendall(data[:len(data) // 2])
                if stall:
                    halting["stalled"].set()
                    halting["resume"].wait(30)
                else:
                    time.sleep(gap)
                data = data[len(data) // 2:]
            raw.sendall(data)

        def until_done(step):
            while True:
                try:
                    return step()
                except ssl.SSLWantReadError:
                    flush()
                    data = raw.recv(65536)
                    if not data:
                        raise ConnectionError("the gateway left")
                    incoming.write(data)
        until_done(tls.do_handshake)
        flush()

        sent = []

        def send(data):  # the answer's head, then its events
            tls.write(data)
            flush(halves=True, stall=len(sent) == 1 and not halting["stalled"].is_set())
            sent.append(data)
        return lambda: until_done(lambda: tls.read(65536)), send

    def serve(raw):
        with raw:
            try:
                if halting:
                    answer(*halting_tls(raw))
                else:
                    with context.wrap_socket(raw, server_side=True) as conn:
                        answer(lambda: conn.recv(65536), conn.sendall)
            except OSError:
                pass

    def accept():
        while True:
            conn, _ = listener.accept()
            threading.Thread(target=serve, args=(conn,), daemon=True).start()
    threading.Thread(target=accept, daemon=True).start()
    return "https://localhost:%d" % listener.getsockname()[1], cert


def tls_gateway(make_gateway, monkeypatch, provider, threads):
    """(gateway, virtual key): a gateway on ``threads`` workers whose
    provider ``tls`` (models tls-*) is ``provider`` (tls_stream_provider's
    URL and CA file, the CA trusted through SSL_CERT_FILE)."""
    url, ca_file = provider
    monkeypatch.setenv("SSL_CERT_FILE", ca_file)
    gw = make_gateway(server=dict(SERVER, threads=threads), rate_limits=RATE_LIMITS, routing=ONE_ATTEMPT,
                      providers={"tls": {"base_url": url, "api_key": "sk-tls", "models": ["tls-*"]}})
    return gw, gw.create_key()[1]


def test_streams_from_a_tls_provider_park_too(make_gateway, tmp_path, monkeypatch):
    """40 concurrent streams from a provider on TLS (verified against its
    own CA), an event every 0.2 s, on two threads: each call parks between
    events (TLS bytes already decrypted count as readable), and every
    stream arrives whole and metered."""
    gw, key = tls_gateway(make_gateway, monkeypatch, tls_stream_provider(tmp_path), threads=2)
    requests = [json_request(CHAT, key, body_for(CHAT, "tls-model", stream=True)) for _ in range(40)]
    peak = {"in_flight": 0}
    answers = crowd(gw, requests, on_tick=lambda: peak.update(in_flight=max(peak["in_flight"], gw.gateway.in_flight)))
    for answer in answers:
        assert answer is not None and answer[0] == 200, answer
        assert stream_ended(answer[1]) and sse_events(answer[1]).count((None, "{\"choices\":[{\"index\":0,\"delta\":"
                                                                               "{\"content\":\"tls\"}}]}")) == 4
    assert peak["in_flight"] > 20, peak
    rows = settled_rows(gw, 40)
    assert {(row["status"], row["output_tokens"]) for row in rows} == {("ok", 4)}


def test_a_burst_of_tls_records_is_relayed_before_the_provider_goes_on(make_gateway, tmp_path, monkeypatch):
    """A TLS provider sends four events as four records back to back, then
    waits until the client has all four before it ends its stream. After a
    read that took all there was, the gateway waits for its provider's
    socket to be readable before it reads again: no record, and no bytes
    decrypted but not yet read, may be left behind, or the client would
    wait for the provider and the provider for the client."""
    burst = threading.Event()
    gw, key = tls_gateway(make_gateway, monkeypatch, tls_stream_provider(tmp_path, gap=0, burst=burst), threads=2)
    client = RawClient(gw, timeout=15)
    client.send(json_request(CHAT, key, body_for(CHAT, "tls-model", stream=True)))
    assert client.read_head(timeout=10)[0] == 200
    relayed = b""
    while relayed.count(b'"content":"tls"') < 4:
        chunk = client.next_chunk(timeout=5)  # TimeoutError: an event was left unread
        assert chunk, relayed
        relayed += chunk
    burst.set()
    while chunk:
        chunk = client.next_chunk(timeout=5)
        relayed += chunk or b""
    assert chunk == b"" and relayed.endswith(b"data: [DONE]\n\n"), relayed[-200:]
    client.close()
    assert [(row["status"], row["output_tokens"]) for row in settled_rows(gw, 1)] == [("ok", 4)]


def test_a_provider_that_stalls_inside_a_chunk_holds_no_worker(make_gateway, upstream):
    """On one worker thread: a stream whose provider sends its first chunk's
    size without the line end and stalls, while 10 streams arrive with every
    chunk in three pieces 0.1 s apart (size; line end and half the event;
    the rest). Reads never wait for the rest of a line or event, so the
    stalled call parks: another call is answered meanwhile, the 10 end
    whole, and the stalled one too once its provider goes on. (A blocking
    read of the size line held the only worker until the idle timeout.)"""
    gw = make_gateway(server=dict(SERVER, threads=1), rate_limits=RATE_LIMITS, routing=ONE_ATTEMPT)
    key = gw.create_key()[1]
    stalled = RawClient(gw, timeout=15)
    stalled.send(json_request(CHAT, key, body_for(CHAT, "gpt-4o-mini-stall", stream=True)))
    assert wait_until(lambda: len(upstream.requests) == 1)
    requests = [json_request(CHAT, key, body_for(CHAT, "gpt-4o-mini-halting", stream=True)) for _ in range(10)]
    for answer in crowd(gw, requests, timeout=10):
        assert answer is not None and answer[0] == 200, answer
        assert stream_ended(answer[1]), sse_events(answer[1])[-2:]
    assert post(gw, CHAT, body_for(CHAT), key, timeout=5).status == 200
    upstream.resume.set()
    response = stalled.read_response(timeout=10)
    stalled.close()
    assert response.status == 200 and stream_ended(response.body), response
    rows = settled_rows(gw, 12)
    assert {row["status"] for row in rows} == {"ok"}
    assert all(row["usage_source"] == "reported" for row in rows)


def test_a_tls_provider_that_stalls_inside_a_record_holds_no_worker(make_gateway, upstream, tmp_path, monkeypatch):
    """On one worker thread: a stream from a TLS provider that sends half of
    its answer's first record and stalls, while 10 more arrive with every
    record in two halves 0.2 s apart. Half a record is read without
    blocking (SSLWantReadError parks the call), so another call is answered
    meanwhile, the 10 end whole, and the stalled one once it goes on. (A
    blocking TLS read held the only worker until the idle timeout.)"""
    halting = {"stalled": threading.Event(), "resume": threading.Event()}
    gw, key = tls_gateway(make_gateway, monkeypatch, tls_stream_provider(tmp_path, gap=0.2, halting=halting), threads=1)
    stalled = RawClient(gw, timeout=15)
    stalled.send(json_request(CHAT, key, body_for(CHAT, "tls-model", stream=True)))
    assert halting["stalled"].wait(10)
    requests = [json_request(CHAT, key, body_for(CHAT, "tls-model", stream=True)) for _ in range(10)]
    for answer in crowd(gw, requests, timeout=10):
        assert answer is not None and answer[0] == 200, answer
        assert stream_ended(answer[1]), sse_events(answer[1])[-2:]
    assert post(gw, CHAT, body_for(CHAT), key, timeout=5).status == 200
    halting["resume"].set()
    response = stalled.read_response(timeout=10)
    stalled.close()
    assert response.status == 200 and stream_ended(response.body), response
    rows = settled_rows(gw, 12)
    assert {(row["status"], row["output_tokens"]) for row in rows if row["provider"] == "tls"} == {("ok", 4)}


def silent_listener():
    """(listener, accepted sockets): a provider that accepts TCP connections
    and never answers the TLS ClientHello (an overloaded or half-dead
    host), or as well a proxy that never answers a CONNECT; closed by the
    caller."""
    listener = socket.create_server(("127.0.0.1", 0))
    accepted = []

    def accept():
        while True:
            try:
                accepted.append(listener.accept()[0])
            except OSError:
                return
    threading.Thread(target=accept, daemon=True).start()
    return listener, accepted


def test_connections_that_stall_opening_hold_no_worker(make_gateway, upstream):
    """On two worker threads: six calls whose provider connections never
    open (a TLS handshake the provider never answers, and a proxy that
    never answers the CONNECT) wait for them parked, so calls to another
    provider are answered while every one of the six still waits; then
    each gets its 504 upstream_timeout at upstream_connect_timeout, in its
    API's shape. (A blocking connect held both workers until the connect
    timeout: the other calls, and the rest of the six, waited for it.)"""
    listener, accepted = silent_listener()
    address = "127.0.0.1:%d" % listener.getsockname()[1]
    try:
        gw = make_gateway(server=dict(SERVER, threads=2, upstream_connect_timeout=3), rate_limits=RATE_LIMITS,
                          routing=ONE_ATTEMPT, providers={
                              "silent": {"base_url": "https://" + address, "api_key": "sk-silent",
                                         "models": ["silent-*"]},
                              "silent-claude": {"base_url": "https://" + address, "api_key": ANTHROPIC_KEY,
                                                "format": "anthropic", "models": ["claude-silent-*"]},
                              "tunnelled": {"base_url": "https://localhost:9", "proxy": "http://" + address,
                                            "api_key": "sk-tunnelled", "models": ["tunnelled-*"]}})
        key = gw.create_key()[1]
        waiting = []
        for path, model in ((CHAT, "silent-model"), (MESSAGES, "claude-silent-model"), (CHAT, "tunnelled-model")) * 2:
            client = RawClient(gw, timeout=15)
            client.send(json_request(path, key, body_for(path, model)))
            waiting.append((path, client))
        assert wait_until(lambda: len(accepted) == 6, timeout=10), "%d connects seen" % len(accepted)
        for path in (CHAT, MESSAGES, CHAT):
            assert post(gw, path, body_for(path, "claude-3-5-haiku" if path == MESSAGES else "gpt-4o-mini"), key,
                        timeout=10).status == 200
        for _, client in waiting:  # none of the six has been answered (or closed) yet
            client.sock.setblocking(False)
            with pytest.raises(BlockingIOError):
                client.sock.recv(1, socket.MSG_PEEK)
            client.sock.settimeout(15)
        for path, client in waiting:
            response = client.read_response(timeout=15)
            client.close()
            payload = assert_json_error(response, 504, "anthropic" if path == MESSAGES else "openai")
            assert (payload["error"]["type"] if path == MESSAGES else payload["error"]["code"]) == (
                "timeout_error" if path == MESSAGES else "upstream_timeout"), payload
        rows = settled_rows(gw, 9)
        assert sorted(row["status"] for row in rows) == ["ok"] * 3 + ["timeout"] * 6, [row["status"] for row in rows]
    finally:
        listener.close()
        for sock in accepted:
            sock.close()


def test_a_retry_backoff_holds_no_worker(make_gateway, upstream):
    """server.threads 1: a call whose provider answers 500 waits its
    backoff (about 1.5 s) before the retry as a timer, parked, so the only
    worker serves another call meanwhile (before the retry is sent); the
    first still gets its retry and the provider's 500."""
    gw = make_gateway(server=dict(SERVER, threads=1), rate_limits=RATE_LIMITS,
                      routing={"backoff_initial": 2, "backoff_max": 2})
    key = gw.create_key()[1]
    failing = RawClient(gw, timeout=10)
    failing.send(json_request(CHAT, key, body_for(CHAT, "gpt-4o-fail500")))
    assert wait_until(lambda: len(upstream.requests) == 1)
    assert post(gw, CHAT, body_for(CHAT), key, timeout=5).status == 200
    assert len(upstream.requests) == 2, "the other call waited for the backoff"  # the retry not sent yet
    response = failing.read_response(timeout=10)
    failing.close()
    assert response.status == 500 and response.header("x-llmgw-attempts") == "2", response
    assert len(upstream.requests) == 3


def test_deadlines_fire_when_due_not_at_a_sweep(make_gateway, upstream, monkeypatch):
    """Every deadline sits in the timer heap and fires as it passes: with the
    accept loop's sweep held back to once a minute, a retry's 0.3 s backoff
    ends, a silent provider's call gets its 504 at upstream_timeout (1 s),
    an idle keep-alive connection is closed at keepalive_timeout (0.5 s)
    and a half-sent head gets its 408 at header_timeout (0.5 s), each long
    before any sweep."""
    monkeypatch.setattr(llmgw.WorkerPool, "sweep_interval", 60.0)
    gw = make_gateway(server=dict(SERVER, threads=2, upstream_timeout=1, keepalive_timeout=0.5, header_timeout=0.5),
                      rate_limits=RATE_LIMITS, routing={"retries": 1, "backoff_initial": 0.3, "backoff_max": 0.3})
    key = gw.create_key()[1]
    assert post(gw, CHAT, body_for(CHAT), key).status == 200  # the first sweep is behind us
    retried = RawClient(gw, timeout=10)
    retried.send(json_request(CHAT, key, body_for(CHAT, "gpt-4o-fail500")))
    silent = RawClient(gw, timeout=10)
    silent.send(json_request(CHAT, key, body_for(CHAT, "gpt-4o-mini-hang")))
    idle = RawClient(gw, timeout=10)
    half = RawClient(gw, timeout=10)
    half.send(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")
    response = retried.read_response(timeout=10)
    assert response.status == 500 and response.header("x-llmgw-attempts") == "2", response
    assert silent.read_response(timeout=10).status == 504
    assert idle.wait_eof(timeout=10)
    assert half.read_response(timeout=10).status == 408
    for client in (retried, silent, idle, half):
        client.close()
    assert sorted(row["status"] for row in settled_rows(gw, 5)) == ["ok", "timeout", "timeout", "upstream_error",
                                                                    "upstream_error"]  # both calls retried once


def test_closed_connections_leave_no_deadline_in_the_timer_heap(make_gateway, upstream):
    """A connection's deadline goes with it: 200 calls, each on a connection
    of its own that the client then closes, leave the readiness queue's timer
    heap about as small as the connections still open (a closed one's entry
    held its Connection until keepalive_timeout, and each arm rebuilt a heap
    that could drop none of them). Found in review of 0dd8930's first form."""
    gw = make_gateway(server=SERVER, rate_limits=RATE_LIMITS, routing=ONE_ATTEMPT)
    key = gw.create_key()[1]
    queue = gw.server.workers.ready
    for _ in range(200):
        assert post(gw, CHAT, body_for(CHAT), key).status == 200  # http.client: a connection per call, closed
    assert wait_until(lambda: gw.server.connections.count == 0)
    assert post(gw, CHAT, body_for(CHAT), key).status == 200  # one more arm: the heap is compacted if it can be
    assert wait_until(lambda: len(queue._timers) <= 2 * len(queue._watched) + 65), len(queue._timers)


def test_a_provider_connection_given_back_is_not_read_again_by_its_stream(make_gateway, upstream):
    """300 streams at once on 32 threads, the interpreter switching threads
    at every chance (as a loaded machine does now and then): each stream's
    provider connection goes back to the pool as the stream ends, and calls
    still waiting take it at once. Every stream ends whole and every row is
    settled. (A stream read its connection's response again after giving
    it back, to settle its row: a call that had taken the connection
    meanwhile had cleared it, so the stream died before its last event and
    its row stayed pending: 8 of 10,000 streams under load. Here the
    provider reports no usage, so the row's estimate reads the 500-message
    prompt in that gap, and 3 to 17 of the 300 streams broke on the old code.)"""
    gw = make_gateway(server=dict(SERVER, threads=32, max_connections_per_address=1000), rate_limits=RATE_LIMITS,
                      routing=ONE_ATTEMPT)
    key = gw.create_key()[1]
    body = body_for(CHAT, "gpt-4o-mini-nousage", stream=True, messages=[{"role": "user", "content": "hi"}] * 500)
    requests = [json_request(CHAT, key, body) for _ in range(300)]
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        answers = crowd(gw, requests, timeout=60)
    finally:
        sys.setswitchinterval(interval)
    broken = [answer for answer in answers if answer is None or answer[0] != 200 or not stream_ended(answer[1])]
    assert broken == [], "%d of 300 streams broken, e.g. %r" % (len(broken), broken[:1])
    rows = settled_rows(gw, 300, timeout=10)
    assert {row["status"] for row in rows} == {"ok"}
    assert gw.gateway.in_flight == 0
