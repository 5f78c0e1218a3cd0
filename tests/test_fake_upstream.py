"""Checks of tests/fake_upstream.py itself, over plain http.client."""

import http.client
import json
import os
import socket
import sys
import time

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fake_upstream import FakeUpstream  # noqa: E402


@pytest.fixture
def fake():
    with FakeUpstream().start() as up:
        yield up


def post(up, path, body, headers=None, conn=None):
    """POST JSON; return (response, raw body). Reuses ``conn`` if given."""
    conn = conn or http.client.HTTPConnection("127.0.0.1", up.port, timeout=5)
    all_headers = {"Content-Type": "application/json"}
    all_headers.update(headers or {})
    conn.request("POST", path, json.dumps(body), all_headers)
    resp = conn.getresponse()
    return resp, resp.read()


def sse_events(raw):
    """[(event name or None, data string)] from an SSE body."""
    events = []
    for block in raw.decode("utf-8").replace("\r\n", "\n").split("\n\n"):
        name, data = None, []
        for line in block.split("\n"):
            if line.startswith("event: "):
                name = line[len("event: "):]
            elif line.startswith("data: "):
                data.append(line[len("data: "):])
        if data:
            events.append((name, "\n".join(data)))
    return events


def test_openai_nonstream_usage_and_request_id(fake):
    resp, raw = post(fake, "/v1/chat/completions",
                     {"model": "gpt-4o-cache-reasoning",
                      "messages": [{"role": "user", "content": "hi"}]},
                     {"Authorization": "Bearer sk-test-1234567890"})
    assert resp.status == 200
    assert resp.getheader("Content-Type") == "application/json"
    assert resp.getheader("Content-Length") == str(len(raw))
    assert resp.getheader("x-request-id") == "req_1"
    usage = json.loads(raw)["usage"]
    assert usage["total_tokens"] == \
        usage["prompt_tokens"] + usage["completion_tokens"]
    assert 0 < usage["prompt_tokens_details"]["cached_tokens"] < \
        usage["prompt_tokens"]
    assert 0 < usage["completion_tokens_details"]["reasoning_tokens"] <= \
        usage["completion_tokens"]
    assert fake.reported == [{
        "path": "/v1/chat/completions", "model": "gpt-4o-cache-reasoning",
        "stream": False, "usage": usage, "request_index": 0,
        "request_id": "req_1", "complete": True}]
    request = fake.requests[0]
    assert request["headers"]["authorization"] == "Bearer sk-test-1234567890"
    assert request["json"]["model"] == "gpt-4o-cache-reasoning"


@pytest.mark.parametrize("include_usage", [True, False])
def test_openai_stream_usage_chunk_only_when_asked(fake, include_usage):
    body = {"model": "gpt-4o-mini", "stream": True,
            "messages": [{"role": "user", "content": "hi"}]}
    if include_usage:
        body["stream_options"] = {"include_usage": True}
    resp, raw = post(fake, "/v1/chat/completions", body)
    assert resp.getheader("Transfer-Encoding") == "chunked"
    assert resp.getheader("Content-Type") == "text/event-stream"
    events = sse_events(raw)
    assert all(name is None for name, _ in events)
    assert events[-1][1] == "[DONE]"
    chunks = [json.loads(data) for _, data in events[:-1]]
    content = [c for c in chunks
               if c["choices"] and c["choices"][0]["delta"].get("content")]
    assert len(content) >= 3
    if include_usage:
        assert all(c["usage"] is None for c in chunks[:-1])
        assert chunks[-1]["choices"] == []
        assert fake.reported[0]["usage"] == chunks[-1]["usage"]
        assert fake.reported[0]["stream"] is True
    else:
        assert all("usage" not in c and c["choices"] for c in chunks)
        assert fake.reported == []


def test_anthropic_stream_cumdelta(fake):
    resp, raw = post(fake, "/v1/messages",
                     {"model": "claude-x-cache-cumdelta", "stream": True,
                      "max_tokens": 10,
                      "messages": [{"role": "user", "content": "hi"}]},
                     {"anthropic-version": "2023-06-01"})
    assert resp.getheader("request-id") == "req_1"
    events = sse_events(raw)
    for name, data in events:           # every frame is a named event
        assert json.loads(data)["type"] == name
    names = [name for name, _ in events]
    assert names[:3] == ["message_start", "content_block_start", "ping"]
    assert names[-1] == "message_stop"
    assert names.count("content_block_delta") >= 3
    start = json.loads(events[0][1])["message"]["usage"]
    deltas = [json.loads(d)["usage"] for n, d in events
              if n == "message_delta"]
    outputs = [d["output_tokens"] for d in deltas]
    assert len(deltas) == 3 and outputs == sorted(set(outputs))
    assert deltas[-1]["input_tokens"] != start["input_tokens"]
    expected = dict(start)
    for delta in deltas:
        expected.update(delta)
    usage = fake.reported[0]["usage"]
    assert usage == expected
    assert usage["cache_read_input_tokens"] > 0
    split = usage["cache_creation"]
    assert split["ephemeral_5m_input_tokens"] + \
        split["ephemeral_1h_input_tokens"] == \
        usage["cache_creation_input_tokens"] > 0


@pytest.mark.parametrize("path, shape", [
    ("/v1/chat/completions", "openai"), ("/v1/messages", "anthropic")])
def test_fail429_has_retry_after(fake, path, shape):
    resp, raw = post(fake, path, {"model": "m-fail429", "messages": []})
    assert resp.status == 429
    assert resp.getheader("retry-after") == "7"
    body = json.loads(raw)
    if shape == "openai":
        assert body["error"]["code"] == "rate_limit_exceeded"
    else:
        assert body["type"] == "error"
        assert body["error"]["type"] == "rate_limit_error"
    assert fake.reported == []


def test_dropstream_ends_without_terminator(fake):
    with pytest.raises(http.client.IncompleteRead) as info:
        post(fake, "/v1/chat/completions",
             {"model": "gpt-4o-dropstream", "stream": True,
              "stream_options": {"include_usage": True}, "messages": []})
    partial = info.value.partial
    assert b'"content":"Hello"' in partial
    assert b"[DONE]" not in partial and b'"usage":{' not in partial
    assert fake.reported == []


def test_keepalive_reuses_one_connection(fake):
    conn = http.client.HTTPConnection("127.0.0.1", fake.port, timeout=5)
    for _ in range(2):
        resp, _ = post(fake, "/v1/embeddings",
                       {"model": "text-embedding-3-small",
                        "input": ["a", "b"]}, conn=conn)
        assert resp.status == 200
    conn.close()
    assert fake.connections_opened == 1
    assert [r["connection_id"] for r in fake.requests] == [1, 1]


def test_stop_does_not_wait_for_a_hanging_request():
    up = FakeUpstream().start()
    sock = socket.create_connection(("127.0.0.1", up.port), timeout=5)
    body = b'{"model": "gpt-4o-hang"}'
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    assert up.wait_for_requests(1)
    began = time.monotonic()
    up.stop()
    assert time.monotonic() - began < 1.5
    assert sock.recv(100) == b""        # closed with no reply
    sock.close()
