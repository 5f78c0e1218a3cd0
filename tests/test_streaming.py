"""Streaming: metering of every streamed endpoint, include_usage handling,
event relay as produced, broken and errored upstream streams, client
hang-ups, and byte-exact relay of awkwardly split events.

The real gateway runs against tests/fake_upstream.py; usage rows are read
back from the database file. Some tests read the gateway's chunked answer
off a raw socket to see when each event arrives and how the body ends.
"""

import json
import time

import pytest

from conftest import (CHAT, COMPLETIONS, MESSAGES, RESPONSES, RawClient, assert_still_serving, expected_columns,
                      json_request, normalise_ids, post, settled_rows, sse_events, tokens_of)

STREAM_PATHS = (CHAT, COMPLETIONS, RESPONSES, MESSAGES)


# ---- helpers ---------------------------------------------------------------

def stream_body(path, model, **extra):
    if path == CHAT:
        body = {"model": model, "messages": [{"role": "user", "content": "tell me a story"}]}
    elif path == COMPLETIONS:
        body = {"model": model, "prompt": "tell me a story"}
    elif path == RESPONSES:
        body = {"model": model, "input": "tell me a story"}
    elif path == MESSAGES:
        body = {"model": model, "max_tokens": 64, "messages": [{"role": "user", "content": "tell me a story"}]}
    else:
        raise AssertionError(path)
    body["stream"] = True
    body.update(extra)
    return body


class RawStream(RawClient):
    """One request on a raw socket; the chunked answer read chunk by chunk,
    each chunk stamped with the time it arrived."""

    def __init__(self, gw, path, body, key, headers=None, timeout=10.0):
        super().__init__(gw, timeout)
        self.timeout = timeout
        self.sent_at = time.monotonic()
        self.send(json_request(path, key, body, extra=list((headers or {}).items())))
        head = self.read_head(timeout)
        assert head is not None, "the connection closed before the response head"
        self.status, header_list = head
        self.headers = {name.lower(): value for name, value in header_list}
        assert self.headers.get("transfer-encoding") == "chunked", self.headers

    def timed_chunk(self):
        """(arrival time, bytes) of the next chunk; b"" for the terminator,
        None if the connection closed first."""
        data = self.next_chunk(self.timeout)
        return time.monotonic(), data

    def read_all(self):
        """All chunks up to the terminator: ([(time, bytes)], terminated)."""
        chunks = []
        while True:
            arrived, data = self.timed_chunk()
            if data is None:
                return chunks, False
            if not data:
                return chunks, True
            chunks.append((arrived, data))


# ---- every streamed endpoint is metered ------------------------------------

STREAM_CASES = [
    (CHAT, "gpt-4o-mini"),
    (CHAT, "gpt-4o-cache-reasoning"),
    (COMPLETIONS, "gpt-3.5-turbo-instruct-cache-reasoning"),
    (RESPONSES, "o3-cache-reasoning"),
    (RESPONSES, "gpt-4o-mini"),
    (MESSAGES, "claude-sonnet-4-5"),
    (MESSAGES, "claude-sonnet-4-5-cache"),
]


def test_stream_usage_rows_equal_reported(gateway, vkey, upstream):
    for index, (path, model) in enumerate(STREAM_CASES):
        check_stream_usage_row(gateway, vkey, upstream, path, model, index)


def check_stream_usage_row(gateway, vkey, upstream, path, model, index):
    response = post(gateway, path, stream_body(path, model), vkey)
    assert response.status == 200
    assert response.header("content-type") == "text/event-stream"
    assert len(upstream.reported) == index + 1
    reported = upstream.reported[index]
    assert reported["stream"] is True and reported["complete"] is True
    row = gateway.rows()[index]
    assert tokens_of(row) == expected_columns(path, reported["usage"])
    assert row["request_tokens"] > 0 and row["response_tokens"] > 0
    assert (row["status"], row["http_status"], row["usage_source"], row["streamed"]) == ("ok", 200, "reported", 1)
    assert (row["endpoint"], row["model"]) == (path, model)
    if "cache" in model:
        assert row["cache_read_tokens"] > 0
        if path == MESSAGES:
            assert row["cache_write_tokens"] > 0 and row["cache_write_1h_tokens"] > 0
    if "reasoning" in model:
        assert row["reasoning_tokens"] > 0


def test_stream_cost_is_computed(gateway, vkey, upstream):
    post(gateway, CHAT, stream_body(CHAT, "gpt-4o"), vkey)
    row, = gateway.rows()
    usage = upstream.reported[0]["usage"]
    # gpt-4o: 2.5 USD/Mtok in (1.25 cached), 10 USD/Mtok out; no cache token here.
    assert row["cost_nanousd"] == usage["prompt_tokens"] * 2500 + usage["completion_tokens"] * 10000
    assert row["cost_nanousd"] > 0


# ---- OpenAI include_usage --------------------------------------------------

@pytest.mark.parametrize("path", [CHAT, COMPLETIONS])
def test_include_usage_injected_and_usage_chunk_hidden(gateway, vkey, upstream, path):
    for asked in ("absent", False, True):
        upstream.reset()
        check_include_usage(gateway, vkey, upstream, path, asked)
    assert len(gateway.rows()) == 3


def check_include_usage(gateway, vkey, upstream, path, asked):
    extra = {} if asked == "absent" else {"stream_options": {"include_usage": asked}}
    body = stream_body(path, "gpt-4o-cache", **extra)
    response = post(gateway, path, body, vkey)
    assert response.status == 200
    forwarded = upstream.requests[0]["json"]
    assert forwarded["stream_options"]["include_usage"] is True
    assert {k: v for k, v in forwarded.items() if k != "stream_options"} == \
        {k: v for k, v in body.items() if k != "stream_options"}
    events = sse_events(response.body)
    assert events[-1] == (None, "[DONE]")
    chunks = [json.loads(data) for _, data in events[:-1]]
    usage_chunks = [c for c in chunks if c.get("choices") == []]
    reported = upstream.reported[0]["usage"]
    if asked is True:
        assert upstream.requests[0]["body"] == json.dumps(body).encode()  # sent unchanged
        assert len(usage_chunks) == 1
        assert usage_chunks[0]["usage"] == reported
        assert all(c["usage"] is None for c in chunks if c.get("choices") != [])
    else:
        assert usage_chunks == []
        assert all(c.get("usage") is None for c in chunks)
        assert b'"prompt_tokens"' not in response.body
    assert len(chunks) >= 6
    row = gateway.rows()[-1]
    assert tokens_of(row) == expected_columns(path, reported)
    assert row["usage_source"] == "reported"


# ---- Anthropic event names and cumulative deltas ---------------------------

def test_anthropic_event_lines_preserved(gateway, vkey, upstream):
    response = post(gateway, MESSAGES, stream_body(MESSAGES, "claude-haiku-4-5-cache"), vkey)
    blocks = [b for b in response.body.decode().split("\n\n") if b.strip()]
    names = []
    for block in blocks:
        first, second = block.split("\n")
        assert first.startswith("event: ") and second.startswith("data: "), block
        name = first[len("event: "):]
        assert json.loads(second[len("data: "):])["type"] == name
        names.append(name)
    assert names[:3] == ["message_start", "content_block_start", "ping"]
    assert names[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    row, = gateway.rows()
    usage = upstream.reported[0]["usage"]
    assert row["cache_read_tokens"] == usage["cache_read_input_tokens"] > 0
    assert row["cache_write_tokens"] + row["cache_write_1h_tokens"] == usage["cache_creation_input_tokens"]
    assert row["cache_write_1h_tokens"] == usage["cache_creation"]["ephemeral_1h_input_tokens"] > 0


def test_anthropic_cumulative_deltas_are_not_summed(gateway, vkey, upstream):
    response = post(gateway, MESSAGES, stream_body(MESSAGES, "claude-sonnet-4-5-cache-cumdelta"), vkey)
    assert response.status == 200
    deltas = [json.loads(data) for name, data in sse_events(response.body) if name == "message_delta"]
    assert len(deltas) == 3
    start = json.loads(sse_events(response.body)[0][1])["message"]["usage"]
    final = upstream.reported[0]["usage"]
    assert start["input_tokens"] != final["input_tokens"]  # the last delta revised it
    row, = gateway.rows()
    assert tokens_of(row) == expected_columns(MESSAGES, final)
    assert row["output_tokens"] == final["output_tokens"] == deltas[-1]["usage"]["output_tokens"]
    assert row["input_tokens"] == final["input_tokens"]
    assert row["cache_read_tokens"] == final["cache_read_input_tokens"]
    assert (row["usage_source"], row["status"]) == ("reported", "ok")


# ---- Responses -------------------------------------------------------------

@pytest.mark.parametrize("variant,terminal", [("", "response.completed"), ("-incomplete", "response.incomplete")])
def test_responses_usage_from_terminal_event(gateway, vkey, upstream, variant, terminal):
    response = post(gateway, RESPONSES, stream_body(RESPONSES, "gpt-4o-cache" + variant), vkey)
    events = sse_events(response.body)
    assert events[-1][0] == terminal
    assert all(name is not None for name, _ in events)
    final = json.loads(events[-1][1])["response"]["usage"]
    assert final == upstream.reported[0]["usage"]
    row, = gateway.rows()
    assert tokens_of(row) == expected_columns(RESPONSES, final)
    assert (row["usage_source"], row["streamed"]) == ("reported", 1)
    assert row["status"] == "ok"


# ---- events are relayed as produced ----------------------------------------

@pytest.mark.parametrize("path", [CHAT, MESSAGES])
def test_events_arrive_as_produced(gateway, vkey, upstream, path):
    # slowstream: 0.2 s between upstream events; events1 keeps the stream short.
    stream = RawStream(gateway, path, stream_body(path, "gpt-4o-slowstream-events1"), vkey)
    try:
        assert stream.status == 200
        chunks, terminated = stream.read_all()
    finally:
        stream.close()
    assert terminated
    ended = chunks[-1][0]
    first = chunks[0][0]
    assert ended - stream.sent_at >= 0.6          # 4+ gaps of 0.2 s upstream
    body = b"".join(data for _, data in chunks)
    events = sse_events(body)
    assert events[0][0] in (None, "message_start")
    # The preamble (role chunk; message_start, content_block_start, ping) is
    # held back until the first content event, and leaves with it.
    preamble = 1 if path == CHAT else 3
    assert first - stream.sent_at < 0.2 * preamble + 0.3, "first content event held back"
    assert all(arrived - first < 0.1 for arrived, _ in chunks[:preamble + 1])
    # Each event after it left when it was produced: arrivals are spread out.
    # Events buffered to the end would arrive together (gaps near 0); a gap
    # of a quarter of the provider's 0.2 s tells them apart, while a machine
    # under load that delays one event (shortening the gap after it) does not.
    gaps = [b[0] - a[0] for a, b in zip(chunks[preamble:], chunks[preamble + 1:])]
    assert sum(1 for gap in gaps if gap >= 0.05) >= (2 if path == CHAT else 3), gaps


# ---- broken upstream streams -----------------------------------------------

@pytest.mark.parametrize("path", STREAM_PATHS)
def test_broken_upstream_stream(gateway, vkey, upstream, path):
    for fault in ("dropstream", "cutmidevent"):
        upstream.reset()
        check_broken_stream(gateway, vkey, upstream, path, fault)


def check_broken_stream(gateway, vkey, upstream, path, fault):
    stream = RawStream(gateway, path, stream_body(path, "gpt-4o-cache-" + fault), vkey)
    try:
        chunks, terminated = stream.read_all()
    finally:
        stream.close()
    assert stream.status == 200
    assert terminated, "the client's chunked stream must end cleanly"
    body = b"".join(data for _, data in chunks)
    events = sse_events(body)
    name, data = events[-1]
    payload = json.loads(data)
    if path == MESSAGES:
        assert name == "error"
        assert payload["type"] == "error" and isinstance(payload["error"]["message"], str)
    elif path == RESPONSES:
        assert name == "response.failed"
        assert payload["type"] == "response.failed" and payload["response"]["status"] == "failed"
        assert isinstance(payload["response"]["error"]["message"], str)
    else:
        assert name is None
        assert isinstance(payload["error"], dict) and isinstance(payload["error"]["message"], str)
        assert (None, "[DONE]") not in events
    # The half event of cutmidevent is not relayed: every event parses.
    for _, event_data in events:
        if event_data != "[DONE]":
            json.loads(event_data)
    row = [r for r in settled_rows(gateway) if r["model"] == "gpt-4o-cache-" + fault][0]
    assert (row["status"], row["usage_source"], row["streamed"]) == ("upstream_truncated", "estimated", 1)
    assert row["request_tokens"] > 0 and row["response_tokens"] > 0
    if path == MESSAGES:
        started = upstream.reported[0]["usage"]  # message_start's usage
        assert upstream.reported[0]["complete"] is False
        assert row["input_tokens"] == started["input_tokens"]
        assert row["cache_read_tokens"] == started["cache_read_input_tokens"]
        assert row["request_tokens"] == (started["input_tokens"] + started["cache_read_input_tokens"]
                                         + started["cache_creation_input_tokens"])
    assert_still_serving(gateway, vkey, upstream)


def test_stream_without_usage_is_estimated(gateway, vkey, upstream):
    for index, path in enumerate(STREAM_PATHS):
        check_nousage(gateway, vkey, upstream, path, index)


def check_nousage(gateway, vkey, upstream, path, index):
    response = post(gateway, path, stream_body(path, "gpt-4o-nousage"), vkey)
    assert response.status == 200
    assert upstream.reported == []
    row = gateway.rows()[index]
    assert row["endpoint"] == path
    assert (row["status"], row["usage_source"], row["http_status"]) == ("ok", "estimated", 200)
    assert row["request_tokens"] > 0 and row["response_tokens"] > 0
    assert row["input_tokens"] == row["request_tokens"]


def test_midstream_error_event_is_forwarded(gateway, vkey, upstream):
    for path in STREAM_PATHS:
        check_errevent(gateway, vkey, upstream, path)


def check_errevent(gateway, vkey, upstream, path):
    response = post(gateway, path, stream_body(path, "gpt-4o-errevent"), vkey)
    assert response.status == 200
    events = sse_events(response.body)
    if path == MESSAGES:
        assert ("error", json.dumps({"type": "error", "error": {"type": "overloaded_error",
                                                               "message": "Overloaded"}},
                                    separators=(",", ":"))) in events
    elif path == RESPONSES:
        assert any(name == "error" and "errevent" in data for name, data in events)
    else:
        assert any(name is None and data.startswith("{\"error\"") and "errevent" in data for name, data in events)
    # The provider's error is the one error the client sees.
    errors = [e for e in events if e[0] == "error" or (e[0] is None and e[1].startswith("{\"error\""))]
    assert len(errors) == 1, events
    row = [r for r in settled_rows(gateway) if r["model"] == "gpt-4o-errevent" and r["endpoint"] == path][0]
    assert (row["status"], row["streamed"], row["http_status"]) == ("upstream_error", 1, 200)
    assert row["usage_source"] == "estimated"
    assert_still_serving(gateway, vkey, upstream)


# ---- client hang-up ---------------------------------------------------------

@pytest.mark.parametrize("path", [CHAT, MESSAGES])
def test_client_disconnect_mid_stream(gateway, vkey, upstream, path):
    stream = RawStream(gateway, path, stream_body(path, "gpt-4o-drip"), vkey)
    assert stream.status == 200
    assert stream.next_chunk(stream.timeout) is not None
    assert upstream.open_connections == 1
    stream.rst()
    row, = settled_rows(gateway)
    assert (row["status"], row["usage_source"], row["streamed"]) == ("client_disconnected", "estimated", 1)
    assert row["request_tokens"] > 0
    deadline = time.monotonic() + 3
    while upstream.open_connections and time.monotonic() < deadline:
        time.sleep(0.02)
    assert upstream.open_connections == 0, "the upstream stream was left running"
    assert_still_serving(gateway, vkey, upstream)


# ---- awkward framing is relayed byte for byte -------------------------------

@pytest.mark.parametrize("path", STREAM_PATHS)
def test_split_events_relayed_byte_identical(gateway, vkey, upstream, path):
    for framing in ("bytewise", "crlf", "bytewise-crlf"):
        upstream.reset()
        check_split_events(gateway, vkey, upstream, path, framing)


def check_split_events(gateway, vkey, upstream, path, framing):
    extra = {"stream_options": {"include_usage": True}} if path in (CHAT, COMPLETIONS) else {}
    raw = json.dumps(stream_body(path, "gpt-4o-cache-" + framing, **extra)).encode()
    direct = post(upstream.url, path, None, raw_body=raw)
    assert direct.status == 200
    response = post(gateway, path, None, vkey, raw_body=raw)
    assert response.status == 200
    assert upstream.requests[1]["body"] == raw
    assert normalise_ids(response.body) == normalise_ids(direct.body)
    if "crlf" in framing:
        assert b"\r\n\r\n" in response.body
    row = gateway.rows()[-1]
    assert row["model"] == "gpt-4o-cache-" + framing
    assert tokens_of(row) == expected_columns(path, upstream.reported[1]["usage"])
    assert upstream.reported[1]["usage"] == upstream.reported[0]["usage"]
    assert (row["status"], row["usage_source"]) == ("ok", "reported")


# ---- request ids on streams --------------------------------------------------

def test_request_id_passed_on_streams(gateway, vkey, upstream):
    for index, path in enumerate(STREAM_PATHS):
        response = post(gateway, path, stream_body(path, "gpt-4o-mini"), vkey)
        header = "request-id" if path == MESSAGES else "x-request-id"
        assert response.header(header) == upstream.requests[index]["request_id"] == "req_%d" % (index + 1)
        assert response.header("x-llmgw-request-id") == gateway.rows()[index]["request_id"]
