#!/usr/bin/env python3
"""llmgw benchmark: the gateway against a fast fake upstream, and that upstream called directly.

Run it from the repository root (standard library only; not collected by pytest):

    python tests/bench.py              # full run, under three minutes
    python tests/bench.py --quick      # smoke run, about 30 seconds
    python tests/bench.py --duration 10 --loadgen python --requests 50000
    python tests/bench.py --workers 2   # two gateway processes sharing the port (SO_REUSEPORT)
    python tests/bench.py --streams 1000,10000                  # concurrent 10 s streams
    python tests/bench.py --streams 10000 --non-streamed        # concurrent calls waiting 10 s

``--streams N[,N...]`` is a capacity run instead of the throughput run: per level, N calls start
evenly over ``--ramp`` (2) seconds from an asyncio client (``_calls`` mode, one process on the load
core), each a stream of ``--call-events`` (40) events paced over ``--call-seconds`` (10) by the
fake upstream, the role chunk in one write with the first token and the others
``--call-seconds / --call-events`` apart (or, with ``--non-streamed``, a completion the upstream
answers after that long), against the upstream directly, the gateway (default config;
``--gateway-setting threads=4096`` changes one) and the naive proxy, one after the other. Per
target and level it reports calls completed and failed (with reasons), first-event p50/p99/max
(the whole answer when not streamed), whole-call p99, and for the gateway and the naive proxy
their peak RSS and threads (sampled every 50 ms) and CPU per relayed event (per call when not
streamed); a failed call says why (``HTTP 503 gateway_full``: the gateway refused it as full).
Every process asks for a file-descriptor limit of 4N + 1024; where the hard limit cannot be
raised (no CAP_SYS_RESOURCE, root or not: containers, sandboxed VMs) it gets the hard limit, and
the run prints the limit the gateway got and how many calls that leaves it room for at once: a
call holds two descriptors in the gateway (client and provider), one in the direct client and
one in the upstream, so a hard limit of 20,000 holds 10,000 direct calls but not 10,000 calls
through one gateway process (``--workers 2``: the limit is per process).
    python tests/bench.py --baseline ../main   # also the gateway of another tree: before vs after
    python tests/bench.py --streams 10000 --baseline ../main   # the same for concurrent streams

    python tests/bench.py --postgresql          # also the gateway on a throwaway PostgreSQL cluster
    python tests/bench.py --postgresql postgresql://llmgw@db/bench   # ... or on that (empty) database

``--postgresql [URL]`` adds the gateway on PostgreSQL (``database.url``; pg8000 needed) beside the
one on SQLite: started from this tree in the same way, on the same core, measured at the same
levels and streams in the same run, right after it. Without a URL it starts a throwaway cluster
(tests/pg_cluster.py: initdb in a temporary directory, on the load core, stopped at the end).
It also times the read a PostgreSQL gateway makes before every request (the ``generation``
row: ``PostgresStore.data_version``) from this script on the gateway's core, back to back and
2 ms apart (the backend asleep in between, as between a request's statements), and reports
them and the client CPU a read takes against the gateway's own per-request figures.

``--baseline DIR`` adds a before/after section: the gateway of DIR (before) and of this tree
(after), on the same core, measured back to back at each level and for the streams in
``--rounds`` (6) rounds, the one measured first alternating from round to round; it reports
each one's median and range over the rounds and the median of the rounds' paired after/before
ratios, with the load average at its start and end.

What it starts (and always stops, even on Ctrl-C or error; each in its own process group):

* a fake OpenAI upstream (this file, ``_upstream`` mode: one asyncio process, HTTP/1.1
  keep-alive). ``POST /v1/chat/completions`` answers a small JSON completion with ``usage``;
  with ``"stream": true`` it answers a chunked SSE stream of ``--stream-events`` (50) data-only
  chunks, one write each, then a usage chunk when ``stream_options.include_usage`` is true,
  then ``data: [DONE]``;
* the gateway, ``python llmgw.py``, with CONFIG_PATH/DB_PATH in a temporary directory, the
  openai provider pointed at the upstream, the provider key in OPENAI_API_KEY, logging at
  WARNING, and one virtual key made with ``python cli.py keys create bench --rpm 100000000``;
* the naive reference proxy (this file, ``_naive`` mode), issue 6's yardstick: a
  ThreadingHTTPServer that forwards over one keep-alive connection per thread and inserts one
  SQLite row per request, with no key check, limits or durability rule; it runs on the
  gateway's core and is measured at the same levels, to show what CPython on this machine
  allows at all;
* the load generator: ``wrk`` when installed (a Lua script sets the POST body and headers and
  prints exact counts and percentiles), else a built-in Python one (this file, ``_loadgen``
  mode: closed-loop keep-alive raw sockets driven by ``selectors``, pre-built request bytes,
  minimal response parsing). The output says which one ran.

Pinning (when the machine has two or more CPUs): the gateway on core 0; the upstream, the load
generator and this script on core 1. The direct rows therefore measure the upstream sharing
one core with the load generator.

The numbers:

* ``req/s``       completed requests per second over ``--duration`` seconds of closed-loop load
                  at 1, 16 and 64 keep-alive connections (non-streamed chat completions);
* ``p50``/``p99`` latency percentiles of those requests (wrk's, or exact from all samples);
* ``errors``      error responses (wrk counts statuses >= 400, the Python generator any
                  non-2xx) plus socket errors (connect/read/write/timeout); any non-zero value
                  is listed under "Problems";
* ``CPU/req``     the gateway's user+system CPU time (``/proc/<pid>/stat``) during the level,
                  divided by the requests completed;
* ``overhead p50 @1``   gateway p50 minus direct p50 at one connection: what a sequential
                  client pays for the gateway;
* stream ``first event`` / ``total``   median over ``--stream-runs`` sequential requests (one
                  keep-alive connection) of the time from sending the request to receiving the
                  first ``data:`` event, and to the end of the chunked body;
* memory: the gateway's VmRSS (``/proc/<pid>/status``) idle right after start, peak sampled
                  every 20 ms during the 64-connection run, after the load levels, and after
                  ``--requests`` (100,000) further requests; "growth" is the last minus the
                  after-levels value (both have already seen 64 connections), i.e. a leak check.
* usage rows: rows the gateway wrote to its database, by status, against the requests sent.
* with ``--postgresql``: ``overhead p50``/``p99`` at each level, each gateway's p50/p99 minus the
                  direct one's at the same level, for SQLite and PostgreSQL side by side.

Exit code 0 when the run completed (problems are listed, not fatal); 1 when the run could not
complete (setup failure, gateway died); 130 on Ctrl-C or SIGTERM. Linux only (/proc, affinity).
"""

import argparse
import json
import os
import platform
import re
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
MODEL = "gpt-4o-mini"
PROVIDER_KEY = "sk-bench-0123456789abcdef0123456789abcdef"
CHAT_BODY = json.dumps({"model": MODEL, "max_tokens": 16,
                        "messages": [{"role": "user", "content": "Say hi"}]},
                       separators=(",", ":")).encode()
STREAM_BODY = json.dumps({"model": MODEL, "max_tokens": 64, "stream": True,
                          "stream_options": {"include_usage": True},
                          "messages": [{"role": "user", "content": "Count to fifty"}]},
                         separators=(",", ":")).encode()
PATH = "/v1/chat/completions"


def build_request(port, key, body):
    return (b"POST %s HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nAuthorization: Bearer %s\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
            % (PATH.encode(), port, key.encode(), len(body), body))


# ==== HTTP response parsing (shared by the load generator and the stream client) ==========

def parse_response(buf):
    """A complete HTTP/1.1 response at the start of ``buf``, or None if more bytes are needed.

    Returns (bytes consumed, status, body, keep_alive). Content-Length and chunked bodies; a
    response with neither is not supported (the caller treats it as read-until-close)."""
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        return None
    status = int(buf[9:12])
    head = buf[:end].lower()
    keep_alive = b"connection: close" not in head
    start = end + 4
    i = head.find(b"\r\ncontent-length:")
    if i >= 0:
        j = head.find(b"\r\n", i + 2)
        length = int(head[i + 17:j if j >= 0 else len(head)])
        if len(buf) < start + length:
            return None
        return start + length, status, buf[start:start + length], keep_alive
    if b"transfer-encoding: chunked" in head:
        body, pos = [], start
        while True:
            line_end = buf.find(b"\r\n", pos)
            if line_end < 0:
                return None
            size = int(buf[pos:line_end].split(b";")[0], 16)
            if size == 0:
                if buf.find(b"\r\n\r\n", line_end) != line_end:  # no trailers expected
                    return None
                return line_end + 4, status, b"".join(body), keep_alive
            if len(buf) < line_end + 2 + size + 2:
                return None
            body.append(buf[line_end + 2:line_end + 2 + size])
            pos = line_end + 2 + size + 2
    if status in (204, 304) or 100 <= status < 200:
        return start, status, b"", keep_alive
    return None


# ==== The fake upstream (``_upstream`` mode) ================================================

def upstream_main(events, gap_ms, reply_delay_ms=0.0):
    """Serve the fake OpenAI API on 127.0.0.1 (ephemeral port, printed on stdout). Streams
    pace their events ``gap_ms`` apart; non-streamed answers wait ``reply_delay_ms``."""
    import asyncio  # here, so the naive proxy's process does not carry it
    completion = json.dumps({
        "id": "chatcmpl-bench", "object": "chat.completion", "created": 1700000000, "model": MODEL,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hi there! How can I help?"},
                     "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 12, "completion_tokens": 8, "total_tokens": 20}},
        separators=(",", ":")).encode()
    reply = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
             % (len(completion), completion))
    reply_close = reply.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n", 1)
    not_found = b"HTTP/1.1 404 Not Found\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"
    stream_head = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
                   b"Transfer-Encoding: chunked\r\n\r\n")

    def chunk(payload):
        return b"%x\r\n%s\r\n" % (len(payload), payload)

    def event(obj):
        return chunk(b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n")

    base = {"id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 1700000000, "model": MODEL}
    stream_chunks = []
    for n in range(events):
        delta = {"role": "assistant", "content": ""} if n == 0 else {"content": "%d " % n}
        stream_chunks.append(event(dict(base, choices=[{"index": 0, "delta": delta,
                                                        "finish_reason": "stop" if n == events - 1 else None}])))
    usage_chunk = event(dict(base, choices=[], usage={"prompt_tokens": 12, "completion_tokens": events,
                                                      "total_tokens": 12 + events}))
    done_chunk = chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n"
    stream_re = re.compile(rb'"stream"\s*:\s*true')
    usage_re = re.compile(rb'"include_usage"\s*:\s*true')

    class Upstream(asyncio.Protocol):
        def connection_made(self, transport):
            self.transport = transport
            self.buf = b""
            self.busy = False  # a paced stream is being written; later requests wait

        def data_received(self, data):
            self.buf = self.buf + data if self.buf else data
            self.process()

        def process(self):
            buf = self.buf
            while not self.busy:
                end = buf.find(b"\r\n\r\n")
                if end < 0:
                    break
                head = buf[:end].lower()
                i = head.find(b"\r\ncontent-length:")
                length = 0
                if i >= 0:
                    j = head.find(b"\r\n", i + 2)
                    length = int(head[i + 17:j if j >= 0 else len(head)])
                if len(buf) < end + 4 + length:
                    break
                body = buf[end + 4:end + 4 + length]
                buf = buf[end + 4 + length:]
                close = b"\r\nconnection: close" in head
                if not head.startswith(b"post /v1/chat/completions "):
                    self.transport.write(not_found)
                elif stream_re.search(body):
                    self.stream(bool(usage_re.search(body)), close)
                    if self.busy:
                        break
                elif reply_delay_ms > 0:
                    self.busy = True
                    self.buf = buf
                    asyncio.get_running_loop().call_later(reply_delay_ms / 1000.0, self.delayed, close)
                    return
                else:
                    self.transport.write(reply_close if close else reply)
                if close:
                    self.transport.close()
                    buf = b""
                    break
            self.buf = buf

        def delayed(self, close):
            self.busy = False
            if self.transport.is_closing():
                return
            self.transport.write(reply_close if close else reply)
            if close:
                self.transport.close()
            else:
                self.process()

        def stream(self, with_usage, close):
            tail = ([usage_chunk] if with_usage else []) + [done_chunk]
            write = self.transport.write
            if gap_ms <= 0:
                write(stream_head)
                for piece in stream_chunks:
                    write(piece)
                for piece in tail:
                    write(piece)
                return
            self.busy = True
            # The role chunk rides with the first token, as a provider sends it: the gateway holds
            # a stream's preamble until its first output (its commit point), so a role chunk one
            # gap ahead of any output would time the pacing here, not the gateway.
            pieces = [stream_head + stream_chunks[0] + stream_chunks[1]] + stream_chunks[2:]
            pieces[-1] += b"".join(tail)  # the end rides with the last event
            loop = asyncio.get_running_loop()

            def step(index=0):
                if self.transport.is_closing():
                    return
                write(pieces[index])
                if index + 1 < len(pieces):
                    loop.call_later(gap_ms / 1000.0, step, index + 1)
                else:
                    self.busy = False
                    if close:
                        self.transport.close()
                    else:
                        self.process()
            step()

        def connection_lost(self, exc):
            self.buf = b""

    async def run():
        server = await asyncio.get_running_loop().create_server(Upstream, "127.0.0.1", 0, backlog=4096,
                                                              reuse_address=True)
        print(server.sockets[0].getsockname()[1], flush=True)
        await asyncio.Event().wait()

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        asyncio.run(run())
    except (KeyboardInterrupt, SystemExit):
        pass


# ==== The naive reference proxy (``_naive`` mode) ===========================================

def naive_main(upstream_port, db_path):
    """Issue 6's reference row: a naive standard-library proxy (ThreadingHTTPServer, one
    keep-alive upstream connection per thread, one SQLite insert per request, no key check,
    no limits, no durability rule). It shows what CPython on this machine allows at all."""
    import http.client
    import http.server
    import threading
    local = threading.local()
    db = sqlite3.connect(db_path, isolation_level=None, check_same_thread=False)
    db.execute("PRAGMA journal_mode = WAL")
    db.execute("PRAGMA synchronous = NORMAL")
    db.execute("CREATE TABLE usage (id INTEGER PRIMARY KEY, at REAL, prompt INTEGER, completion INTEGER)")
    db_lock = threading.Lock()

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True

        def do_POST(self):
            body = self.rfile.read(int(self.headers["Content-Length"]))
            if getattr(local, "upstream", None) is None:
                local.upstream = http.client.HTTPConnection("127.0.0.1", upstream_port)
            local.upstream.request("POST", self.path, body, {"Content-Type": "application/json",
                                                             "Authorization": "Bearer " + PROVIDER_KEY})
            answer = local.upstream.getresponse()
            if answer.getheader("Content-Type", "").startswith("text/event-stream"):
                self.relay(answer)
                return
            data = answer.read()
            self.record(json.loads(data).get("usage", {}))
            self.send_response(answer.status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def relay(self, answer):
            """A stream, relayed piece by piece as it arrives (chunked), then one row."""
            self.send_response(answer.status)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            usage = {}
            while True:
                data = answer.read1(65536)
                if not data:
                    break
                for line in data.split(b"\n") if b'"usage"' in data else ():
                    if line.startswith(b"data: {") and b'"usage"' in line:
                        usage = json.loads(line[6:]).get("usage") or usage
                self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            self.wfile.write(b"0\r\n\r\n")
            self.record(usage)

        def record(self, usage):
            with db_lock:
                db.execute("INSERT INTO usage (at, prompt, completion) VALUES (?, ?, ?)",
                           (time.time(), usage.get("prompt_tokens"), usage.get("completion_tokens")))

        def log_message(self, *args):
            pass

    class Server(http.server.ThreadingHTTPServer):
        request_queue_size = 1024

        def handle_error(self, request, client_address):
            pass  # clients closing at a level's end

    server = Server(("127.0.0.1", 0), Handler)
    print(server.server_address[1], flush=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        server.serve_forever()
    except (KeyboardInterrupt, SystemExit):
        pass


# ==== The built-in load generator (``_loadgen`` mode) =======================================

def loadgen_main(port, connections, duration, request_hex):
    """Closed loop over ``connections`` keep-alive sockets for ``duration`` seconds; JSON out."""
    import selectors
    request = bytes.fromhex(request_hex)
    sel = selectors.DefaultSelector()
    latencies, statuses = [], {}
    errors = {"connect": 0, "read": 0, "write": 0, "timeout": 0}
    state = {}

    def open_conn():
        try:
            sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        except OSError:
            errors["connect"] += 1
            return None
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setblocking(False)
        sel.register(sock, selectors.EVENT_READ)
        return sock

    def send(sock):
        try:
            sock.sendall(request)  # small: fits the socket buffer, never blocks in practice
        except OSError:
            errors["write"] += 1
            return False
        state[sock] = [b"", time.perf_counter()]
        return True

    def replace(sock):
        sel.unregister(sock)
        state.pop(sock, None)
        sock.close()
        new = open_conn()
        if new is not None and time.perf_counter() < deadline:
            send(new)

    start = time.perf_counter()
    deadline = start + duration
    for _ in range(connections):
        sock = open_conn()
        if sock is not None:
            send(sock)
    perf = time.perf_counter
    while state:
        now = perf()
        if now >= deadline:
            break
        ready = sel.select(timeout=min(1.0, deadline - now))
        if not ready:
            continue
        for key, _ in ready:
            sock = key.fileobj
            try:
                data = sock.recv(262144)
            except BlockingIOError:
                continue
            except OSError:
                errors["read"] += 1
                replace(sock)
                continue
            if not data:
                errors["read"] += 1
                replace(sock)
                continue
            entry = state[sock]
            entry[0] += data
            parsed = parse_response(entry[0])
            if parsed is None:
                continue
            done = perf()
            latencies.append(done - entry[1])
            statuses[parsed[1]] = statuses.get(parsed[1], 0) + 1
            if not parsed[3]:
                replace(sock)
            elif done < deadline:
                send(sock)
    elapsed = perf() - start
    # requests still in flight at the deadline are not counted (as wrk does)
    errors["timeout"] += sum(1 for entry in state.values() if perf() - entry[1] > 10)
    for sock in list(state):
        sock.close()
    latencies.sort()
    json.dump({"requests": len(latencies), "elapsed": elapsed, "statuses": statuses, "errors": errors,
               "latencies_us": [int(x * 1e6) for x in latencies]}, sys.stdout)


# ==== The concurrent-calls client (``_calls`` mode) ===========================================

def calls_client_main(port, count, ramp, timeout, request_hex):
    """Open ``count`` connections spread evenly over ``ramp`` seconds, each sending one request
    and reading its whole answer (asyncio, one process); JSON out: per call, whether it
    completed, the time to its first SSE event (or to the whole answer when not streamed), to
    its end, and why it failed."""
    import asyncio
    request = bytes.fromhex(request_hex)
    streamed = b'"stream":true' in request
    perf = time.perf_counter
    firsts, totals, failures = [], [], {}

    def fail(reason):
        failures[reason] = failures.get(reason, 0) + 1

    class Call(asyncio.Protocol):
        def __init__(self, done):
            self.done, self.buf, self.first, self.over = done, b"", None, False
            self.head_end = -1

        def connection_made(self, transport):
            self.transport = transport
            self.t0 = perf()
            transport.write(request)
            self.timer = asyncio.get_running_loop().call_later(timeout, self.finish, "timeout")

        def data_received(self, data):
            self.buf += data
            if self.head_end < 0:
                self.head_end = self.buf.find(b"\r\n\r\n")
                if self.head_end < 0:
                    return
            if self.first is None and self.buf.find(b"data:", self.head_end) >= 0:
                self.first = perf() - self.t0
            if b"transfer-encoding: chunked" in self.buf[:self.head_end].lower() and \
                    not self.buf.endswith(b"\r\n0\r\n\r\n"):
                return
            parsed = parse_response(self.buf)
            if parsed is not None:
                self.check(parsed[1], parsed[2])

        def check(self, status, body):
            if status != 200:
                try:
                    code = json.loads(body)["error"]["code"]
                except (ValueError, KeyError, TypeError):
                    code = None
                self.finish("HTTP %d" % status + (" %s" % code if code else ""))
            elif streamed and not body.rstrip().endswith(b"data: [DONE]"):
                self.finish("stream without [DONE]")
            elif not streamed and b'"usage"' not in body:
                self.finish("answer without usage")
            else:
                total = perf() - self.t0
                firsts.append(self.first if streamed else total)
                totals.append(total)
                self.finish(None)

        def finish(self, reason):
            if self.over:
                return
            self.over = True
            self.timer.cancel()
            if reason is not None:
                fail(reason)
            self.transport.close()
            self.done.set_result(None)

        def connection_lost(self, exc):
            self.finish("closed before the end" if self.buf else "closed without an answer")

    async def one(delay):
        await asyncio.sleep(delay)
        done = asyncio.get_running_loop().create_future()
        try:
            await asyncio.get_running_loop().create_connection(lambda: Call(done), "127.0.0.1", port)
        except OSError as exc:
            fail("connect: %s" % (exc.strerror or type(exc).__name__))
            return
        await done

    async def run():
        await asyncio.gather(*(one(ramp * index / count) for index in range(count)))

    started = perf()
    asyncio.run(run())
    firsts.sort()
    totals.sort()
    json.dump({"completed": len(totals), "failures": failures, "elapsed": perf() - started,
               "first_ms": [x * 1000 for x in firsts], "total_ms": [x * 1000 for x in totals]}, sys.stdout)


# ==== Process management =====================================================================

class Processes:
    """Every process we start, each in its own session/process group; all killed on exit."""

    def __init__(self):
        self.procs = []

    def start(self, args, cpu=None, nofile=None, **kwargs):
        def preexec():
            if cpu is not None:
                os.sched_setaffinity(0, {cpu})
            if nofile is not None:  # a higher hard limit needs root; otherwise the soft one rises to it
                import resource
                hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
                try:
                    resource.setrlimit(resource.RLIMIT_NOFILE, (max(nofile, hard), max(nofile, hard)))
                except (ValueError, OSError):
                    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        proc = subprocess.Popen(args, start_new_session=True, preexec_fn=preexec, **kwargs)
        self.procs.append(proc)
        return proc

    def stop(self, proc, timeout=5):
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait()
        else:  # the leader exited; its group may still hold children
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        if proc in self.procs:
            self.procs.remove(proc)

    def stop_all(self):
        for proc in reversed(list(self.procs)):
            self.stop(proc)


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port, proc, timeout=15):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("process exited with code %s before listening" % proc.returncode)
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.02)
    raise RuntimeError("nothing listening on port %d after %ss" % (port, timeout))


def group_pids(leader):
    """The processes of ``leader``'s process group: the gateway, or its
    supervisor and worker processes with ``--workers``."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open("/proc/%s/stat" % entry) as f:
                    if int(f.read().rsplit(")", 1)[1].split()[2]) == leader:  # field 5: pgrp
                        pids.append(int(entry))
            except (OSError, ValueError, IndexError):
                pass
    return pids or [leader]


def group_status(leader, field):
    """A /proc/<pid>/status count summed over ``leader``'s process group."""
    total = 0
    for pid in group_pids(leader):
        try:
            with open("/proc/%d/status" % pid) as f:
                total += next((int(line.split()[1]) for line in f if line.startswith(field + ":")), 0)
        except OSError:
            pass
    return total


def rss_kb(leader):
    """Resident memory of the gateway's whole process group, in KiB."""
    return group_status(leader, "VmRSS")


CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(leader):
    """User + system CPU time of the gateway's whole process group."""
    total = 0
    for pid in group_pids(leader):
        try:
            with open("/proc/%d/stat" % pid) as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15)
        except OSError:
            pass
    return total / CLK_TCK


def open_file_limit(pid):
    """The open-file limit (soft) process ``pid`` runs with."""
    with open("/proc/%d/limits" % pid) as f:
        return next(int(line.split()[3]) for line in f if line.startswith("Max open files"))


def room_for_calls(leader, workers):
    """(the gateway's open-file limit, how many calls it can hold at once by that limit): a call
    holds two descriptors in one process (its client's and its provider's), beside those open now
    (database, log, listening socket, ...). With ``workers``, per worker process, summed."""
    pids = group_pids(leader)
    if workers > 1:
        pids = [pid for pid in pids if pid != leader] or pids  # the supervisor serves no call
    limit, room = None, 0
    for pid in pids:
        try:
            pid_limit, open_now = open_file_limit(pid), len(os.listdir("/proc/%d/fd" % pid))
        except OSError:
            continue
        limit = pid_limit if limit is None else min(limit, pid_limit)
        room += (pid_limit - open_now) // 2
    return limit, room


def start_gateway(procs, workdir, up_port, cpu, workers, server=None, nofile=None, root=ROOT, database_url=None):
    """The gateway of tree ``root`` (``python llmgw.py``, or ``cli.py serve --workers N``) with a
    fresh config and database in ``workdir`` (or the PostgreSQL database ``database_url``) and one
    virtual key; returns (process, port, key, database path)."""
    gw_port = free_port()
    config_path = os.path.join(workdir, "config.yaml")
    db_path = os.path.join(workdir, "gateway.db")
    config = {"server": dict(server or {}, host="127.0.0.1", port=gw_port),
              "providers": {"openai": {"base_url": "http://127.0.0.1:%d" % up_port}},
              "logging": {"level": "WARNING", "file": os.path.join(workdir, "gateway.log")}}
    if database_url is not None:
        config["database"] = {"url": database_url}
    with open(config_path, "w") as f:
        json.dump(config, f, indent=2)  # JSON is YAML
    os.chmod(config_path, 0o600)
    env = dict(os.environ, CONFIG_PATH=config_path, DB_PATH=db_path, OPENAI_API_KEY=PROVIDER_KEY)
    env.pop("LLMGW_ADMIN_TOKEN", None)
    for command in (["init"], ["keys", "create", "bench", "--rpm", "100000000", "--output", "json"]):
        created = subprocess.run([sys.executable, os.path.join(root, "cli.py")] + command,
                                 env=env, cwd=workdir, capture_output=True, text=True, timeout=60)
        if created.returncode != 0:
            raise RuntimeError("cli.py %s failed: %s%s" % (command[0], created.stdout, created.stderr))
    vkey = json.loads(created.stdout)["key"]
    command = ([os.path.join(root, "llmgw.py")] if workers == 1 else
               [os.path.join(root, "cli.py"), "serve", "--workers", str(workers)])
    with open(os.path.join(workdir, "gateway.stderr"), "wb") as gw_stderr:
        gw = procs.start([sys.executable] + command, cpu=cpu, nofile=nofile, env=env, cwd=workdir,
                         stdout=gw_stderr, stderr=subprocess.STDOUT)
    wait_for_port(gw_port, gw)
    return gw, gw_port, vkey, db_path


def start_upstream(procs, cpu, events, gap_ms, reply_delay_ms=0.0, nofile=None):
    """The fake upstream (``_upstream`` mode); returns its port after a sanity request."""
    up = procs.start([sys.executable, os.path.abspath(__file__), "_upstream", str(events), str(gap_ms),
                      str(reply_delay_ms)], cpu=cpu, nofile=nofile, stdout=subprocess.PIPE)
    line = up.stdout.readline()
    if not line.strip():
        raise RuntimeError("the fake upstream did not start")
    return int(line)


def start_naive(procs, cpu, up_port, workdir, nofile=None):
    """The naive reference proxy (``_naive`` mode); returns (process, port)."""
    naive = procs.start([sys.executable, os.path.abspath(__file__), "_naive", str(up_port),
                         os.path.join(workdir, "naive.db")], cpu=cpu, nofile=nofile, stdout=subprocess.PIPE)
    line = naive.stdout.readline()
    if not line.strip():
        raise RuntimeError("the naive reference proxy did not start")
    return naive, int(line)


# ==== Load runs =============================================================================

WRK_LUA = r"""
wrk.method = "POST"
wrk.body = %s
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer %s"
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "BENCHJSON {\"requests\":%%d,\"elapsed_us\":%%d,\"non2xx\":%%d,\"connect\":%%d,\"read\":%%d,\"write\":%%d,\"timeout\":%%d,\"p50\":%%d,\"p99\":%%d,\"max\":%%d}\n",
    summary.requests, summary.duration, e.status, e.connect, e.read, e.write, e.timeout,
    latency:percentile(50), latency:percentile(99), latency.max))
end
"""


class LoadGen:
    """Runs one closed-loop level against a port and returns a result dict."""

    def __init__(self, kind, procs, cpu, workdir):
        self.kind, self.procs, self.cpu, self.workdir = kind, procs, cpu, workdir

    def run(self, port, key, connections, duration, on_tick=None):
        if self.kind == "wrk":
            return self._wrk(port, key, connections, duration, on_tick)
        return self._python(port, key, connections, duration, on_tick)

    def _start_and_wait(self, args, duration, on_tick):
        """Run a load generator to completion (output to files: a full pipe would block it)."""
        out_path, err_path = (os.path.join(self.workdir, "loadgen." + name) for name in ("out", "err"))
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            proc = self.procs.start(args, cpu=self.cpu, stdout=out, stderr=err)
        deadline = time.monotonic() + duration + 30
        while proc.poll() is None:
            if on_tick:
                on_tick()
            time.sleep(0.02)
            if time.monotonic() > deadline:
                self.procs.stop(proc)
                raise RuntimeError("load generator hung")
        self.procs.stop(proc)
        with open(out_path, "rb") as out, open(err_path, "rb") as err:
            return proc.returncode, out.read(), err.read()

    def _wrk(self, port, key, connections, duration, on_tick):
        script = os.path.join(self.workdir, "bench-%d.lua" % port)
        with open(script, "w") as f:
            f.write(WRK_LUA % (json.dumps(CHAT_BODY.decode()), key))
        duration = max(1, int(round(duration)))  # wrk takes whole seconds only
        threads = 1 if self.cpu is not None else max(1, min(connections, (os.cpu_count() or 2) // 2))
        _, out, err = self._start_and_wait(
            ["wrk", "-t%d" % threads, "-c%d" % connections, "-d%ds" % duration, "--timeout", "10s",
             "-s", script, "http://127.0.0.1:%d%s" % (port, PATH)], duration, on_tick)
        match = re.search(rb"BENCHJSON (\{.*\})", out)
        if not match:
            raise RuntimeError("wrk failed: %s %s" % (out.decode(errors="replace"), err.decode(errors="replace")))
        r = json.loads(match.group(1))
        elapsed = r["elapsed_us"] / 1e6
        errors = {"non-2xx": r["non2xx"], "connect": r["connect"], "read": r["read"],
                  "write": r["write"], "timeout": r["timeout"]}
        return {"requests": r["requests"], "rps": r["requests"] / elapsed if elapsed else 0.0,
                "p50_ms": r["p50"] / 1000.0, "p99_ms": r["p99"] / 1000.0, "max_ms": r["max"] / 1000.0,
                "errors": errors}

    def _python(self, port, key, connections, duration, on_tick):
        request = build_request(port, key, CHAT_BODY)
        code, out, err = self._start_and_wait(
            [sys.executable, os.path.abspath(__file__), "_loadgen", str(port), str(connections),
             str(duration), request.hex()], duration, on_tick)
        if code != 0 or not out:
            raise RuntimeError("python load generator failed: %s" % err.decode(errors="replace"))
        r = json.loads(out)
        lat = r["latencies_us"]
        non2xx = sum(n for status, n in r["statuses"].items() if not 200 <= int(status) < 300)
        errors = dict({"non-2xx": non2xx}, **r["errors"])

        def pct(p):
            return lat[min(len(lat) - 1, int(len(lat) * p / 100.0))] / 1000.0 if lat else float("nan")
        return {"requests": r["requests"], "rps": r["requests"] / r["elapsed"] if r["elapsed"] else 0.0,
                "p50_ms": pct(50), "p99_ms": pct(99), "max_ms": lat[-1] / 1000.0 if lat else float("nan"),
                "errors": errors, "statuses": r["statuses"]}


def stream_runs(port, key, runs):
    """Sequential streamed completions on one keep-alive connection: medians and checks."""
    request = build_request(port, key, STREAM_BODY)
    firsts, totals, problems = [], [], []
    sock = None
    for _ in range(runs):
        if sock is None:
            sock = socket.create_connection(("127.0.0.1", port), timeout=10)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        buf, first = b"", None
        t0 = time.perf_counter()
        sock.sendall(request)
        parsed = None
        while parsed is None:
            data = sock.recv(262144)
            if not data:
                break
            buf += data
            if first is None:
                head_end = buf.find(b"\r\n\r\n")
                if head_end >= 0 and buf.find(b"data:", head_end) >= 0:
                    first = time.perf_counter() - t0
            parsed = parse_response(buf)
        total = time.perf_counter() - t0
        if parsed is None:
            problems.append("stream: connection closed before the end of the response")
            sock.close()
            sock = None
            continue
        status, body, keep_alive = parsed[1], parsed[2], parsed[3]
        if status != 200:
            problems.append("stream: HTTP %d: %s" % (status, body[:200]))
        else:
            data_lines = [line for line in body.split(b"\n") if line.startswith(b"data:")]
            if not data_lines or data_lines[-1].strip() != b"data: [DONE]":
                problems.append("stream: no final data: [DONE]")
            if not any(b'"usage"' in line and b'"choices":[]' in line.replace(b" ", b"") for line in data_lines):
                problems.append("stream: no usage chunk")
            firsts.append(first if first is not None else total)
            totals.append(total)
        if not keep_alive:
            sock.close()
            sock = None
    if sock is not None:
        sock.close()
    return {"first_ms": statistics.median(firsts) * 1000 if firsts else float("nan"),
            "total_ms": statistics.median(totals) * 1000 if totals else float("nan"),
            "runs": len(totals), "problems": sorted(set(problems))}


def one_request(port, key, body, timeout=10):
    """A single request on a fresh connection: (status, body)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(build_request(port, key, body))
        buf = b""
        while True:
            data = sock.recv(65536)
            if not data:
                raise RuntimeError("connection closed mid-response: %r" % buf[:200])
            buf += data
            parsed = parse_response(buf)
            if parsed:
                return parsed[1], parsed[2]


# ==== PostgreSQL (``--postgresql``) =========================================================

#: ``--postgresql`` without a URL: start a throwaway cluster.
THROWAWAY = "throwaway"


def start_cluster():
    """A throwaway PostgreSQL cluster (tests/pg_cluster.py), or RuntimeError saying why none can start."""
    import pg_cluster
    reason = pg_cluster.unavailable()
    if reason is not None:
        raise RuntimeError("--postgresql: %s" % reason)
    return pg_cluster.Cluster().start()


def pg8000_version():
    try:
        import pg8000
    except ImportError:
        return "not installed"
    return pg8000.__version__


def generation_reads(url, count, cpu):
    """The read a PostgreSQL gateway makes before every request (``PostgresStore.data_version``:
    the ``generation`` row), ``count`` times from this process on core ``cpu`` (the gateway's),
    after one that opens the pooled connection and prepares the statement: back to back, then a
    quarter as many 2 ms apart, so that the PostgreSQL backend sleeps between reads as it does
    between a request's statements (waking it is part of the cost). Returns the medians and the
    back-to-back p99 in ms, the client CPU per read in ms, and the usage rows by status."""
    sys.path.insert(0, ROOT)
    import llmgw
    store = llmgw.PostgresStore(llmgw.parse_config({"database": {"url": url}}).database)
    before = os.sched_getaffinity(0)
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})
    try:
        store.data_version()
        times, paced = [], []
        cpu0 = time.process_time()
        for _ in range(count):
            t0 = time.perf_counter()
            store.data_version()
            times.append(time.perf_counter() - t0)
        cpu_ms = (time.process_time() - cpu0) * 1000 / count
        for _ in range(count // 4):
            time.sleep(0.002)
            t0 = time.perf_counter()
            store.data_version()
            paced.append(time.perf_counter() - t0)
        by_status = dict(store._read("SELECT status, COUNT(*) FROM usage GROUP BY 1"))
    finally:
        os.sched_setaffinity(0, before)
        store.close()
    times.sort()
    return {"median_ms": statistics.median(times) * 1000, "p99_ms": times[int(len(times) * 0.99)] * 1000,
            "paced_ms": statistics.median(paced) * 1000, "cpu_ms": cpu_ms, "count": count, "by_status": by_status}


def print_postgresql(levels, results, reads):
    """SQLite and PostgreSQL side by side (overhead: each gateway's percentile minus the direct
    one's at the same level), then what the per-request generation read costs."""
    print("The gateway on SQLite and on PostgreSQL (same run, level by level; overhead = gateway minus "
          "direct at the same level)")
    header = "| %5s | %12s | %16s | %9s | %26s | %30s | %17s | %21s |" % (
        "conns", "SQLite req/s", "PostgreSQL req/s", "PG/SQLite", "SQLite overhead p50/p99 ms",
        "PostgreSQL overhead p50/p99 ms", "SQLite CPU ms/req", "PostgreSQL CPU ms/req")
    print(header)
    print("|" + "|".join("-" * len(cell) for cell in header.split("|")[1:-1]) + "|")
    for conns in levels:
        direct, lite, pg = (results[target][conns] for target in ("direct", "gateway", "gw-pg"))
        print("| %5d | %12.0f | %16.0f | %8.0f%% | %26s | %30s | %17.3f | %21.3f |" % (
            conns, lite["rps"], pg["rps"], 100.0 * pg["rps"] / lite["rps"] if lite["rps"] else float("nan"),
            "%s / %s" % (fmt_ms(lite["p50_ms"] - direct["p50_ms"]), fmt_ms(lite["p99_ms"] - direct["p99_ms"])),
            "%s / %s" % (fmt_ms(pg["p50_ms"] - direct["p50_ms"]), fmt_ms(pg["p99_ms"] - direct["p99_ms"])),
            lite["cpu_ms_per_req"], pg["cpu_ms_per_req"]))
    one = results["gw-pg"][levels[0]]
    print("Generation read before each request on PostgreSQL (from this script on the gateway's core): "
          "back to back median %.3f ms, p99 %.3f ms (%d reads), client CPU %.3f ms per read; one every 2 ms "
          "(the backend asleep in between) median %.3f ms (%d reads)"
          % (reads["median_ms"], reads["p99_ms"], reads["count"], reads["cpu_ms"], reads["paced_ms"],
             reads["count"] // 4))
    print("  against the PostgreSQL gateway at %d connection(s): %.1f%% of its p50 (%.3f ms; back to back %.1f%%), "
          "%.1f%% of its CPU per request (%.3f ms)"
          % (levels[0], 100.0 * reads["paced_ms"] / one["p50_ms"], one["p50_ms"],
             100.0 * reads["median_ms"] / one["p50_ms"], 100.0 * reads["cpu_ms"] / one["cpu_ms_per_req"],
             one["cpu_ms_per_req"]))
    print("PostgreSQL gateway usage rows by status: %s" % reads["by_status"])


# ==== Before vs after (``--baseline``) =======================================================

def load_average():
    return " ".join(open("/proc/loadavg").read().split()[:3])


def compare_rounds(args, levels, loadgen, gateways, problems):
    """``--rounds`` rounds of the same measurements on the gateway of this tree (``after``) and of
    the baseline tree (``before``), both pinned to the same core: at each connection level and for
    the streams, the two are measured back to back, the one that goes first alternating from round
    to round, so that neither gains from its position (a warmer cache, a quieter moment, the
    upstream just started). Returns the samples, per gateway and level, and the requests sent to
    ``after``."""
    samples = {name: {"stream": []} for name in gateways}
    for name, (_, port, key) in gateways.items():  # warm-up: pools, caches, threads
        loadgen.run(port, key, 16, 1.0)
        stream_runs(port, key, 3)
    sent = 0
    loads = [load_average()]
    print("  before vs after: %d rounds, load average %s" % (args.rounds, loads[0]), flush=True)
    for round_number in range(args.rounds):
        order = ("before", "after") if round_number % 2 == 0 else ("after", "before")
        for conns in levels:
            for name in order:
                server, port, key = gateways[name]
                if server.poll() is not None:
                    raise RuntimeError("the %s gateway exited with code %s" % (name, server.returncode))
                cpu0 = cpu_seconds(server.pid)
                r = loadgen.run(port, key, conns, args.duration)
                r["cpu_ms_per_req"] = ((cpu_seconds(server.pid) - cpu0) * 1000 / r["requests"]
                                       if r["requests"] else float("nan"))
                samples[name].setdefault(conns, []).append(r)
                sent += r["requests"] if name == "after" else 0
                bad = {k: v for k, v in r["errors"].items() if v}
                if bad:
                    problems.append("%s round %d at %d connections: %s" % (name, round_number + 1, conns, bad))
        for name in order:
            _, port, key = gateways[name]
            streamed = stream_runs(port, key, args.stream_runs)
            samples[name]["stream"].append(streamed)
            sent += args.stream_runs if name == "after" else 0
            problems.extend("%s %s" % (name, p) for p in streamed["problems"])
        print("  round %d (%s first) done, load average %s" % (round_number + 1, order[0], load_average()),
              flush=True)
    loads.append(load_average())
    return {"samples": samples, "after_requests": sent, "loads": loads}


def spread(values, fmt="%.3f"):
    """Median and range of ``values``: ``median (min-max)``."""
    values = [v for v in values if v == v]
    if not values:
        return "-"
    return ("%s (%s-%s)" % (fmt, fmt, fmt)) % (statistics.median(values), min(values), max(values))


def paired_ratios(before, after):
    """after/before for each round's pair, as percentages (the pair was measured back to back)."""
    return [100.0 * a / b for b, a in zip(before, after) if b and a == a and b == b]


def print_comparison(args, levels, comparison):
    """The before/after table: medians with their range over the rounds, and the median of the
    rounds' paired after/before ratios (the figure to read: load drifts between rounds, far
    less within a pair)."""
    before, after = comparison["samples"]["before"], comparison["samples"]["after"]
    print("Before (--baseline %s) vs after (this tree): %d alternating rounds of %.1f s per level; "
          "median (min-max); load average %s at the start, %s at the end"
          % (args.baseline, args.rounds, args.duration, comparison["loads"][0], comparison["loads"][1]))
    header = "| %-6s | %5s | %-23s | %-23s | %-26s |" % ("", "conns", "req/s", "p50 ms", "CPU ms/req")
    print(header)
    print("|" + "|".join("-" * len(cell) for cell in header.split("|")[1:-1]) + "|")
    for conns in levels:
        for name, runs in (("before", before[conns]), ("after", after[conns])):
            print("| %-6s | %5d | %-23s | %-23s | %-26s |" % (
                name, conns, spread([r["rps"] for r in runs], "%.0f"), spread([r["p50_ms"] for r in runs]),
                spread([r["cpu_ms_per_req"] for r in runs])))
    print("After/before, median of the paired rounds (min-max):")
    for conns in levels:
        print("  %3d conns: req/s %s %%, CPU per request %s %%" % (
            conns, spread(paired_ratios([r["rps"] for r in before[conns]], [r["rps"] for r in after[conns]]), "%.1f"),
            spread(paired_ratios([r["cpu_ms_per_req"] for r in before[conns]],
                                 [r["cpu_ms_per_req"] for r in after[conns]]), "%.1f")))
    for field, label in (("first_ms", "first event"), ("total_ms", "total")):
        b, a = [s[field] for s in before["stream"]], [s[field] for s in after["stream"]]
        print("  stream %-11s before %s ms, after %s ms, after/before %s %%"
              % (label, spread(b), spread(a), spread(paired_ratios(b, a), "%.1f")))


# ==== Main ==================================================================================

def machine_info():
    model = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return "%d CPUs (%s), Python %s, %s" % (os.cpu_count() or 0, model, platform.python_version(),
                                           platform.platform())


def fmt_ms(value):
    if value != value:  # NaN
        return "-"
    return "%.3f" % value if value < 10 else "%.1f" % value


def run_calls(procs, cpu, port, key, body, count, ramp, timeout, server=None):
    """One level of concurrent calls through the ``_calls`` client, sampling ``server``'s memory
    and threads every 50 ms; returns the client's counts and percentiles, peak RSS and threads,
    and the server's CPU seconds during the level."""
    request = build_request(port, key, body)
    out_path = os.path.join(tempfile.gettempdir(), "llmgw-calls-%d.json" % os.getpid())
    peak_rss = peak_threads = 0
    cpu0 = cpu_seconds(server.pid) if server is not None else 0.0
    with open(out_path, "wb") as out:
        client = procs.start([sys.executable, os.path.abspath(__file__), "_calls", str(port), str(count),
                              str(ramp), str(timeout), request.hex()], cpu=cpu, nofile=count + 1024, stdout=out)
    deadline = time.monotonic() + ramp + timeout + 60
    while client.poll() is None:
        if server is not None:
            peak_rss = max(peak_rss, rss_kb(server.pid))
            peak_threads = max(peak_threads, group_status(server.pid, "Threads"))
        time.sleep(0.05)
        if time.monotonic() > deadline:
            procs.stop(client)
            raise RuntimeError("the calls client hung")
    cpu_used = cpu_seconds(server.pid) - cpu0 if server is not None else float("nan")
    procs.stop(client)
    with open(out_path, "rb") as f:
        r = json.loads(f.read() or b"{}")
    os.unlink(out_path)
    if "completed" not in r:
        raise RuntimeError("the calls client failed")

    def pct(values, p):
        return values[min(len(values) - 1, int(len(values) * p / 100.0))] if values else float("nan")
    return {"completed": r["completed"], "failed": count - r["completed"], "failures": r["failures"],
            "first_p50": pct(r["first_ms"], 50), "first_p99": pct(r["first_ms"], 99),
            "first_max": r["first_ms"][-1] if r["first_ms"] else float("nan"),
            "total_p99": pct(r["total_ms"], 99), "rss_mb": peak_rss / 1024.0, "threads": peak_threads,
            "cpu_s": cpu_used}


def calls_main(args, levels, gw_cpu, load_cpu, pinning, procs, workdir):
    """``--streams N[,N...]``: concurrent long calls against the upstream directly, the gateway and
    the naive proxy, level by level, one target at a time."""
    streamed = not args.non_streamed
    events = args.call_events
    gap_ms = args.call_seconds * 1000.0 / events if streamed else 0.0
    delay_ms = 0.0 if streamed else args.call_seconds * 1000.0
    body = STREAM_BODY if streamed else CHAT_BODY
    nofile = 4 * max(levels) + 1024
    # Every client shares 127.0.0.1: the per-address share is lifted, as behind a reverse proxy.
    settings = {"max_connections_per_address": 16384}
    for setting in args.gateway_setting:
        name, _, value = setting.partition("=")
        settings[name] = int(value) if value.isdigit() else value
    timeout = args.call_seconds * 6 + 30
    print("llmgw benchmark: concurrent %s" % ("streams of %d events over %.0f s" % (events, args.call_seconds)
                                             if streamed else "non-streamed calls answered after %.0f s"
                                             % args.call_seconds))
    print("machine:   %s" % machine_info())
    print("pinning:   %s" % pinning)
    print("load:      %s (load average before the run)" % load_average())
    print("gateway:   default config, %s" % (", ".join("%s=%s" % kv for kv in settings.items())))
    print("client:    asyncio, one process, calls started evenly over %.1f s, %.0f s timeout" % (args.ramp, timeout))
    print(flush=True)
    rows = []
    up_port = start_upstream(procs, load_cpu, events, gap_ms, delay_ms, nofile=nofile)
    gw, gw_port, vkey, db_path = start_gateway(procs, workdir, up_port, gw_cpu, args.workers, settings,
                                               nofile=nofile)
    naive, naive_port = start_naive(procs, gw_cpu, up_port, workdir, nofile=nofile)
    # Asked for, not promised: without CAP_SYS_RESOURCE (a container, a VM's sandbox) no process may
    # go past the hard limit, root or not. The gateway holds two descriptors a call, the direct
    # client and the upstream one each, so a limit of 2N descriptors stops the gateway alone short
    # of N calls at once: the calls past its room get an honest 503 gateway_full, direct ones none.
    limit, room = room_for_calls(gw.pid, args.workers)
    print("files:     asked %d open files a process, got %d%s; the gateway has room for %d calls at once "
          "(two descriptors a call)" % (nofile, limit, " (the hard limit)" if limit < nofile else "", room))
    for count in levels:
        if count > room:
            # A refused call holds its client's descriptor until it has its answer: while the gateway
            # accepts ahead of its calls, each descriptor short refuses one call, not half of one.
            print("           %d calls: %d to %d of them get 503 gateway_full (raise the hard limit, or "
                  "--workers 2: the limit is per process)" % (count, count - room, 2 * (count - room)))
    print(flush=True)
    targets = [("direct", up_port, PROVIDER_KEY, None), ("gateway", gw_port, vkey, gw),
               ("naive", naive_port, "-", naive)]
    if args.baseline:  # the gateway of another tree (before a change), same core and settings
        baseline_dir = os.path.join(workdir, "baseline")
        os.mkdir(baseline_dir)
        base, base_port, base_vkey, _ = start_gateway(procs, baseline_dir, up_port, gw_cpu, args.workers, settings,
                                                      nofile=nofile, root=os.path.abspath(args.baseline))
        targets.insert(1, ("baseline", base_port, base_vkey, base))
    for count in levels:
        for name, port, key, server in targets:
            if server is not None and server.poll() is not None:
                raise RuntimeError("the %s exited with code %s" % (name, server.returncode))
            r = run_calls(procs, load_cpu, port, key, body, count, args.ramp, timeout, server)
            r["cpu_us"] = r["cpu_s"] * 1e6 / (r["completed"] * (events if streamed else 1) or 1)
            rows.append((name, count, r))
            print("  %-7s %6d calls: %6d completed, %5d failed %s" % (
                name, count, r["completed"], r["failed"], r["failures"] or ""), flush=True)
            time.sleep(2)  # let the closed connections go
    with sqlite3.connect("file:%s?mode=ro" % db_path, uri=True, timeout=10) as conn:
        by_status = dict(conn.execute("SELECT status, COUNT(*) FROM usage GROUP BY 1").fetchall())
    print()
    print("| target | calls | completed | failed | first p50 ms | first p99 ms | first max ms | whole p99 s "
          "| peak RSS MB | peak threads | CPU/%s µs |" % ("event" if streamed else "call"))
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, count, r in rows:
        server = name != "direct"
        print("| %s | %d | %d | %d | %s | %s | %s | %.1f | %s | %s | %s |" % (
            name, count, r["completed"], r["failed"], fmt_ms(r["first_p50"]), fmt_ms(r["first_p99"]),
            fmt_ms(r["first_max"]), r["total_p99"] / 1000.0, "%.0f" % r["rss_mb"] if server else "-",
            r["threads"] if server else "-", "%.0f" % r["cpu_us"] if server else "-"))
    print()
    print("Gateway usage rows by status: %s" % by_status)
    failures = {"%s %d" % (name, count): r["failures"] for name, count, r in rows if r["failures"]}
    print("Failures: %s" % (failures or "none"))
    print("load:      %s (load average after the run)" % load_average())
    return 0


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=float, default=5.0,
                        help="seconds per load level (5; wrk rounds to whole seconds)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 1 s levels, 20 stream runs, 10,000 requests for the memory check")
    parser.add_argument("--connections", default="1,16,64", help="keep-alive connection levels (1,16,64)")
    parser.add_argument("--requests", type=int, default=100000,
                        help="requests sent after the levels for the memory-growth check (100000)")
    parser.add_argument("--memory-budget", type=float, default=110.0,
                        help="seconds the memory run may take at most (110), to bound the total runtime")
    parser.add_argument("--stream-runs", type=int, default=50, help="sequential streams measured (50)")
    parser.add_argument("--stream-events", type=int, default=50, help="events per stream (50)")
    parser.add_argument("--stream-gap-ms", type=float, default=0.0,
                        help="pause between upstream stream events (0: written back to back; "
                             "asyncio timers round up to about 1 ms)")
    parser.add_argument("--loadgen", choices=("auto", "wrk", "python"), default="auto")
    parser.add_argument("--no-pin", action="store_true", help="do not pin processes to cores")
    parser.add_argument("--baseline", metavar="DIR",
                        help="also measure the gateway of another tree (its llmgw.py and cli.py, e.g. a "
                             "checkout of main), on the same core in the same run, in --rounds rounds whose "
                             "order alternates: before vs after")
    parser.add_argument("--rounds", type=int, default=6,
                        help="with --baseline: alternating rounds (6; even, so each gateway goes first "
                             "equally often)")
    parser.add_argument("--postgresql", nargs="?", const=THROWAWAY, metavar="URL",
                        help="also the gateway on PostgreSQL (pg8000 needed), same levels and streams in the same "
                             "run: on a throwaway cluster (tests/pg_cluster.py), or on the empty database at URL")
    parser.add_argument("--workers", type=int, default=1,
                        help="gateway processes (cli.py serve --workers N); with more than one, the gateway "
                             "may run on every core")
    parser.add_argument("--streams", metavar="N[,N...]",
                        help="instead of the runs above: N concurrent calls per level, each lasting "
                             "--call-seconds at the provider, against the upstream directly, the gateway "
                             "(default config) and the naive proxy in one run")
    parser.add_argument("--non-streamed", action="store_true",
                        help="with --streams: non-streamed calls whose provider answers after --call-seconds")
    parser.add_argument("--call-seconds", type=float, default=10.0, help="with --streams: length of a call (10)")
    parser.add_argument("--call-events", type=int, default=40, help="with --streams: events per stream (40)")
    parser.add_argument("--ramp", type=float, default=2.0, help="with --streams: seconds over which calls start (2)")
    parser.add_argument("--gateway-setting", action="append", default=[], metavar="NAME=VALUE",
                        help="with --streams: a server setting for the gateway (repeatable), e.g. threads=4096")
    args = parser.parse_args()
    if args.quick:
        args.duration = min(args.duration, 1.0)
        args.stream_runs = min(args.stream_runs, 20)
        args.requests = min(args.requests, 10000)
        args.memory_budget = min(args.memory_budget, 15.0)
    levels = [int(c) for c in args.connections.split(",")]

    ncpu = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    pin = not args.no_pin and hasattr(os, "sched_setaffinity") and ncpu >= 2
    if pin:
        cpus = sorted(os.sched_getaffinity(0))
        gw_cpu, load_cpu = cpus[0], cpus[1]
        os.sched_setaffinity(0, {load_cpu})  # this script (stream client, sampling) too
        pinning = "gateway on core %d; upstream, load generator and this script on core %d" % (gw_cpu, load_cpu)
        if args.workers > 1:
            gw_cpu = None
            pinning = "%d gateway processes on all cores; upstream, load generator and this script on core %d" % (
                args.workers, load_cpu)
    else:
        gw_cpu = load_cpu = None
        pinning = "none (%s)" % ("--no-pin" if args.no_pin else "fewer than 2 CPUs or no sched_setaffinity")
    kind = args.loadgen
    if kind == "auto":
        kind = "wrk" if shutil.which("wrk") else "python"
    elif kind == "wrk" and not shutil.which("wrk"):
        parser.error("wrk is not installed")
    if not args.streams:
        print("llmgw benchmark")
        print("machine:   %s" % machine_info())
        print("pinning:   %s" % pinning)
        print("load gen:  %s" % ("wrk (%s), 1 thread, Lua script for body and headers" % shutil.which("wrk")
                                 if kind == "wrk" else "built-in Python (selectors, raw keep-alive sockets, 1 process)"))
        print("upstream:  built-in asyncio fake OpenAI (this file); nginx %s"
              % ("found but not used: it cannot stream SSE on its own" if shutil.which("nginx") else "not installed"))
        print("settings:  %.1f s per level, connections %s, %d stream runs of %d events, %d requests for memory"
              % (args.duration, levels, args.stream_runs, args.stream_events, args.requests))
        if args.postgresql:
            print("postgres:  the gateway also on %s, pg8000 %s" % (
                "a throwaway cluster (tests/pg_cluster.py) on the load core" if args.postgresql == THROWAWAY
                else args.postgresql, pg8000_version()))
        print("load:      %s (load average before the run)" % load_average())
        print(flush=True)

    procs = Processes()
    cluster = None
    workdir = tempfile.mkdtemp(prefix="llmgw-bench-")
    problems = []
    started = time.monotonic()

    def on_sigterm(signum, frame):
        raise KeyboardInterrupt()
    previous_sigterm = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        if args.streams:
            return calls_main(args, [int(n) for n in args.streams.split(",")], gw_cpu, load_cpu, pinning, procs,
                              workdir)
        # -- upstream ------------------------------------------------------------------------
        up_port = start_upstream(procs, load_cpu, args.stream_events, args.stream_gap_ms)
        status, body = one_request(up_port, PROVIDER_KEY, CHAT_BODY)
        if status != 200 or json.loads(body)["usage"]["total_tokens"] != 20:
            raise RuntimeError("fake upstream sanity request: HTTP %d %r" % (status, body[:300]))

        loadgen = LoadGen(kind, procs, load_cpu, workdir)

        # -- gateway ---------------------------------------------------------------------------
        gw, gw_port, vkey, db_path = start_gateway(procs, workdir, up_port, gw_cpu, args.workers)
        if args.baseline:  # the same gateway from another tree (e.g. main before a change), same core
            baseline_dir = os.path.join(workdir, "baseline")
            os.mkdir(baseline_dir)
            base, base_port, base_vkey, _ = start_gateway(procs, baseline_dir, up_port, gw_cpu, args.workers,
                                                          root=os.path.abspath(args.baseline))
        if args.postgresql:  # the same gateway on PostgreSQL, same core
            pg_url = args.postgresql
            if pg_url == THROWAWAY:
                cluster = start_cluster()
                pg_url = cluster.create_database("bench")
            pg_dir = os.path.join(workdir, "postgresql")
            os.mkdir(pg_dir)
            pg, pg_port, pg_vkey, _ = start_gateway(procs, pg_dir, up_port, gw_cpu, args.workers, database_url=pg_url)
            status, body = one_request(pg_port, pg_vkey, CHAT_BODY)
            if status != 200:
                raise RuntimeError("PostgreSQL gateway sanity request: HTTP %d %r" % (status, body[:300]))
        rss_idle = rss_kb(gw.pid)
        gw_sent = 0  # requests sent to the gateway, for the usage-row check

        status, body = one_request(gw_port, vkey, CHAT_BODY)
        gw_sent += 1
        if status != 200 or json.loads(body).get("usage", {}).get("total_tokens") != 20:
            raise RuntimeError("gateway sanity request: HTTP %d %r" % (status, body[:300]))
        status, _ = one_request(gw_port, "llmgw-not-a-key", CHAT_BODY)
        gw_sent += 1
        if status != 401:
            problems.append("gateway answered %d to an unknown virtual key (expected 401)" % status)

        # -- non-streamed levels ---------------------------------------------------------------
        warm = 1.0
        results = {"direct": {}, "gateway": {}, "gw-pg": {}, "naive": {}}
        peak = {"rss": 0}

        def track_peak():
            peak["rss"] = max(peak["rss"], rss_kb(gw.pid))
        # -- the naive reference proxy, on the gateway's core ------------------------------------
        naive, naive_port = start_naive(procs, gw_cpu, up_port, workdir)
        time.sleep(0.3)
        naive_rss_idle = rss_kb(naive.pid)

        servers = {"gateway": gw, "naive": naive}
        targets = [("direct", up_port, PROVIDER_KEY), ("gateway", gw_port, vkey), ("naive", naive_port, "-")]
        if args.postgresql:
            servers["gw-pg"] = pg
            targets.insert(2, ("gw-pg", pg_port, pg_vkey))
        for target, port, key in targets:
            r = loadgen.run(port, key, 16, warm)  # warm-up: pools, caches, threads
            if target == "gateway":
                gw_sent += r["requests"]
        for conns in levels:  # level by level, so that load drifting apart hits every target alike
            for target, port, key in targets:
                server = servers.get(target)
                on_tick = None
                if server is not None:
                    if server.poll() is not None:
                        raise RuntimeError("the %s exited with code %s" % (target, server.returncode))
                    cpu0 = cpu_seconds(server.pid)
                    if target == "gateway" and conns == max(levels):
                        on_tick = track_peak
                r = loadgen.run(port, key, conns, args.duration, on_tick)
                if server is not None:
                    r["cpu_ms_per_req"] = ((cpu_seconds(server.pid) - cpu0) * 1000 / r["requests"]
                                           if r["requests"] else float("nan"))
                if target == "gateway":
                    gw_sent += r["requests"]
                results[target][conns] = r
                bad = {k: v for k, v in r["errors"].items() if v}
                if bad:
                    problems.append("%s at %d connections: %s (of %d requests)" % (target, conns, bad, r["requests"]))
                print("  %-7s %3d conns: %8.0f req/s  p50 %s ms  p99 %s ms%s" % (
                    target, conns, r["rps"], fmt_ms(r["p50_ms"]), fmt_ms(r["p99_ms"]),
                    "  errors %s" % bad if bad else ""), flush=True)

        # -- before vs after: the baseline and the gateway in alternating rounds -------------------
        if args.baseline:
            comparison = compare_rounds(args, levels, loadgen, {"after": (gw, gw_port, vkey),
                                                               "before": (base, base_port, base_vkey)}, problems)
            gw_sent += comparison["after_requests"]
            procs.stop(base)

        # -- streams ---------------------------------------------------------------------------
        streams = {}
        for target, port, key in [t for t in targets if t[0] != "naive"]:
            stream_runs(port, key, 3)  # warm-up
            streams[target] = stream_runs(port, key, args.stream_runs)
            if target == "gateway":
                gw_sent += 3 + args.stream_runs
            for p in streams[target]["problems"]:
                problems.append("%s %s" % (target, p))
        print("  streams measured", flush=True)
        if args.postgresql:
            reads = generation_reads(pg_url, 2000, gw_cpu)
            procs.stop(pg)
            if any(status != "ok" for status in reads["by_status"]):
                problems.append("PostgreSQL gateway usage rows not all ok: %s" % reads["by_status"])

        # -- memory growth ---------------------------------------------------------------------
        time.sleep(0.5)
        rss_after_levels = rss_kb(gw.pid)
        rate = max(results["gateway"].get(16, results["gateway"][levels[-1]])["rps"], 50.0)
        sent, mem_errors, cpu0, t0 = 0, {}, cpu_seconds(gw.pid), time.monotonic()
        while sent < args.requests:
            if gw.poll() is not None:
                raise RuntimeError("the gateway exited with code %s" % gw.returncode)
            left = args.memory_budget - (time.monotonic() - t0)
            if left < 1:
                problems.append("memory run stopped by --memory-budget after %d of %d requests"
                                % (sent, args.requests))
                break
            chunk = min(max((args.requests - sent) / rate * 1.05, 1.0), 60.0, left)
            r = loadgen.run(gw_port, vkey, 16, chunk)
            sent += r["requests"]
            for k, v in r["errors"].items():
                mem_errors[k] = mem_errors.get(k, 0) + v
            if r["requests"] == 0:
                break
        mem_seconds = time.monotonic() - t0
        mem_cpu = (cpu_seconds(gw.pid) - cpu0) * 1000 / sent if sent else float("nan")
        gw_sent += sent
        if any(mem_errors.values()):
            problems.append("memory run (%d requests): %s" % (sent, {k: v for k, v in mem_errors.items() if v}))
        time.sleep(0.5)
        rss_final = rss_kb(gw.pid)
        print("  memory run: %d requests in %.1f s" % (sent, mem_seconds), flush=True)

        # -- usage rows ------------------------------------------------------------------------
        time.sleep(0.3)
        conn = sqlite3.connect("file:%s?mode=ro" % db_path, uri=True, timeout=10)
        try:
            by_status = dict(conn.execute("SELECT status || ' ' || COALESCE(http_status, '-'), COUNT(*) "
                                          "FROM usage GROUP BY 1 ORDER BY 2 DESC").fetchall())
            tokens = conn.execute("SELECT COUNT(*), SUM(input_tokens), SUM(output_tokens) FROM usage "
                                  "WHERE streamed = 0 AND http_status = 200").fetchone()
        finally:
            conn.close()
        if gw.poll() is not None:
            problems.append("the gateway exited with code %s during the run" % gw.returncode)
        gw_cpu_total = cpu_seconds(gw.pid) if gw.poll() is None else float("nan")
        procs.stop(gw)
        with open(os.path.join(workdir, "gateway.stderr"), "rb") as f:
            gw_output = f.read().decode(errors="replace").strip()
        log_path = os.path.join(workdir, "gateway.log")
        log_lines = open(log_path, errors="replace").read().strip().splitlines() if os.path.exists(log_path) else []
        serious = [line for line in log_lines if " ERROR " in line or " CRITICAL " in line]
        if serious:
            problems.append("gateway log: %d ERROR line(s), e.g. %s" % (len(serious), serious[0]))
        if gw_output:
            problems.append("gateway stderr: %s" % gw_output[-500:])

        # -- report ----------------------------------------------------------------------------
        print()
        print("Non-streamed chat completions (closed loop, keep-alive, %.1f s per level)" % args.duration)
        header = "| %-8s | %5s | %9s | %9s | %9s | %10s | %7s |" % (
            "target", "conns", "req/s", "p50 ms", "p99 ms", "CPU ms/req", "errors")
        print(header)
        print("|" + "|".join("-" * (len(cell)) for cell in header.split("|")[1:-1]) + "|")
        for target in ("gateway", "gw-pg", "naive", "direct") if args.postgresql else ("gateway", "naive", "direct"):
            for conns in levels:
                r = results[target][conns]
                cpu = "%.3f" % r["cpu_ms_per_req"] if "cpu_ms_per_req" in r else "-"
                print("| %-8s | %5d | %9.0f | %9s | %9s | %10s | %7d |" % (
                    target, conns, r["rps"], fmt_ms(r["p50_ms"]), fmt_ms(r["p99_ms"]), cpu,
                    sum(r["errors"].values())))
        print()
        g1, n1, d1 = (results[target][levels[0]] for target in ("gateway", "naive", "direct"))
        print("Overhead p50 at %d connection(s): %.3f ms (gateway %.3f - direct %.3f); naive proxy %.3f ms"
              % (levels[0], g1["p50_ms"] - d1["p50_ms"], g1["p50_ms"], d1["p50_ms"], n1["p50_ms"] - d1["p50_ms"]))
        top = max(levels)
        for other in ("direct", "naive"):
            print("Throughput ratio gateway/%s: %s" % (other, ", ".join(
                "%d conns %.1f%%" % (c, 100.0 * results["gateway"][c]["rps"] / results[other][c]["rps"])
                for c in levels if results[other][c]["rps"])))
        print()
        print("Stream of %d events (median of %d sequential runs, one keep-alive connection)"
              % (args.stream_events, args.stream_runs))
        print("| %-8s | %14s | %10s |" % ("target", "first event ms", "total ms"))
        print("|----------|----------------|------------|")
        for target in [t[0] for t in targets if t[0] != "naive"]:
            s = streams[target]
            print("| %-8s | %14s | %10s |" % (target, fmt_ms(s["first_ms"]), fmt_ms(s["total_ms"])))
        print("Stream overhead: first event %+.3f ms, total %+.3f ms"
              % (streams["gateway"]["first_ms"] - streams["direct"]["first_ms"],
                 streams["gateway"]["total_ms"] - streams["direct"]["total_ms"]))
        print()
        if args.postgresql:
            print_postgresql(levels, results, reads)
            print()
        if args.baseline:
            print_comparison(args, levels, comparison)
            print()
        print("Gateway memory (VmRSS)")
        print("| %-46s | %8s |" % ("when", "MB"))
        print("|" + "-" * 48 + "|" + "-" * 10 + "|")
        for label, kb in (("idle, after start", rss_idle),
                          ("peak during the %d-connection run" % top, peak["rss"]),
                          ("after the load levels and streams", rss_after_levels),
                          ("after %d more requests" % sent, rss_final)):
            print("| %-46s | %8.1f |" % (label, kb / 1024.0))
        print("Growth over the last %d requests: %+.1f MB (%+.2f KB per 1,000 requests)"
              % (sent, (rss_final - rss_after_levels) / 1024.0,
                 (rss_final - rss_after_levels) / (sent / 1000.0) if sent else 0.0))
        print("Memory run: %.0f req/s at 16 connections, gateway CPU %.3f ms/request"
              % (sent / mem_seconds if mem_seconds else 0, mem_cpu))
        print("The naive reference proxy idled at %.1f MB." % (naive_rss_idle / 1024.0))
        print()
        print("Usage rows in the gateway database: %d (requests sent to the gateway: about %d; load generators"
              " do not count requests in flight at a level's end)" % (sum(by_status.values()), gw_sent))
        print("  by status: %s" % ", ".join("%s: %d" % kv for kv in by_status.items()))
        print("  non-streamed 200 rows: %d, input tokens %s, output tokens %s (12 and 8 each expected)"
              % (tokens[0], tokens[1], tokens[2]))
        if tokens[0] and (tokens[1] != 12 * tokens[0] or tokens[2] != 8 * tokens[0]):
            problems.append("usage rows do not carry 12 input / 8 output tokens each")
        if sum(by_status.values()) < gw_sent - 2 * 64 * (2 * len(levels) + 4):
            problems.append("fewer usage rows (%d) than requests answered (~%d)" % (sum(by_status.values()), gw_sent))
        print("Gateway CPU total: %.1f s; bench wall time %.0f s" % (gw_cpu_total, time.monotonic() - started))
        print("load:      %s (load average after the run)" % load_average())
        print()
        if problems:
            print("Problems:")
            for p in problems:
                print("  - %s" % p)
        else:
            print("Problems: none (no non-2xx responses, no socket errors, no gateway errors logged)")
        return 0
    except KeyboardInterrupt:
        print("\ninterrupted; stopping everything", file=sys.stderr)
        return 130
    except Exception as exc:
        print("\nbenchmark failed: %s: %s" % (type(exc).__name__, exc), file=sys.stderr)
        for name in ("gateway.stderr", "gateway.log"):
            path = os.path.join(workdir, name)
            if os.path.exists(path):
                tail = open(path, errors="replace").read()[-2000:]
                if tail.strip():
                    print("--- %s (tail)\n%s" % (name, tail), file=sys.stderr)
        return 1
    finally:
        procs.stop_all()
        if cluster is not None:
            cluster.stop()
        signal.signal(signal.SIGTERM, previous_sigterm)
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_upstream":
        upstream_main(int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4]) if len(sys.argv) > 4 else 0.0)
    elif len(sys.argv) > 1 and sys.argv[1] == "_loadgen":
        loadgen_main(int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]), sys.argv[5])
    elif len(sys.argv) > 1 and sys.argv[1] == "_calls":
        calls_client_main(int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]), float(sys.argv[5]), sys.argv[6])
    elif len(sys.argv) > 1 and sys.argv[1] == "_naive":
        naive_main(int(sys.argv[2]), sys.argv[3])
    else:
        sys.exit(main())
