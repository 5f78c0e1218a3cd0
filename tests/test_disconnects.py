"""Clients that vanish: resets and FINs during the request, the answer and
the stream (RELIABILITY.md 1.4). The call is still metered in full and the
provider connection released.

RELIABILITY ids are given in brackets in each test's docstring.
"""

import random
import select
import socket
import threading
import time

import pytest

from conftest import (CHAT, MESSAGES, ONE_ATTEMPT, RATE_LIMITS, SERVER, RawClient, assert_alive, body_for,
                      expected_tokens, json_request, other_threads, request_bytes, settled_rows, wait_idle, wait_until,
                      worker_threads)

#: Whatever a test did, its gateways end with no row pending, nothing reserved, nothing in flight.
pytestmark = pytest.mark.usefixtures("balanced_books")


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
    wait_idle(gw)  # every reset seen and its connection released
    assert [line for line in gwlog.lines() if not line.startswith(("DEBUG", "INFO"))] == []
    assert upstream.requests == [] and gw.rows() == []
    assert_alive(gw, key)


@pytest.mark.parametrize("declared,sent", [(1000, 500), (600000, 300000)], ids=["watcher-read", "worker-read"])
def test_fin_after_half_the_body(make_gateway, upstream, gwlog, declared, sent):
    """[D02] FIN after half the declared body (a small body the watcher
    reads, and one over 256 KiB a worker reads): the gateway notices the
    FIN and closes at once, long before body_timeout (60 s here); no
    upstream call, no row, nothing logged above INFO."""
    server = dict(SERVER, max_body_bytes=1024 * 1024, body_timeout=60)
    gw = make_gateway(server=server, rate_limits=RATE_LIMITS, routing=ONE_ATTEMPT)
    key = gw.create_key()[1]
    client = RawClient(gw)
    client.send(request_bytes("POST", CHAT, [("Authorization", "Bearer " + key), ("Content-Type", "application/json"),
                                             ("Content-Length", str(declared))], b"{" + b" " * (sent - 1)))
    client.sock.shutdown(socket.SHUT_WR)
    assert client.wait_eof(server["body_timeout"] / 4), "the gateway waited for body_timeout, not the FIN"
    client.close()
    assert client.received == b""  # nothing to answer: the request never arrived
    wait_idle(gw)
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
    wait_idle(gw)
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
    wait_idle(gw, 10.0)  # a request read just before its cut may still be being forwarded

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
