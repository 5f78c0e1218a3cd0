"""Nothing lost: crashes, signals, several processes on one database.

The gateway runs as real child processes (``python cli.py serve`` or
``python llmgw.py``) with CONFIG_PATH / DB_PATH under ``tmp_path``, provider
keys in the environment and both providers pointed at the in-process fake
upstream, on the test's backend. Virtual keys are made with ``python cli.py
keys create``. Usage rows are read back from the database. Cases: RELIABILITY.md Z01, Z03, K02-K04,
A06, A10 and the "Nothing lost" section of the hardening issue.

Local helpers (not in conftest): ``Workdir`` (config + init + CLI for one
database; the ``workdir`` fixture makes them on the test's backend) and ``send`` (one request on a fresh connection, recording whether
the answer arrived in full). ``GatewayProcess`` (one child gateway),
``reported_tokens`` and ``wait_until`` come from conftest.
"""

import http.client
import json
import os
import select
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time

import pytest

from conftest import (ANTHROPIC_KEY, LLMGW_PY, OPENAI_KEY, GatewayDatabase, GatewayProcess, base_config, free_port,
                      query, reported_tokens, run_cli, wait_until)
from fake_upstream import FakeUpstream

import llmgw

NO_RATE_LIMIT = {"default": 1000000, "premium": 1000000}
FINAL_STATUSES = {"ok", "client_disconnected", "upstream_error", "upstream_truncated", "timeout", "interrupted"}


# ---- helpers ---------------------------------------------------------------

class Workdir:
    """config.yaml + the database ``db`` (a GatewayDatabase: gateway.db in
    the directory, or PostgreSQL) set up with ``cli.py init``."""

    def __init__(self, path, upstream_url, db, **sections):
        self.path = path
        path.mkdir(parents=True, exist_ok=True)
        self.database = db
        self.config_path = str(path / "config.yaml")
        self.db_path = db.db_path
        self.env = {"CONFIG_PATH": self.config_path, "DB_PATH": self.db_path,
                    "OPENAI_API_KEY": OPENAI_KEY, "ANTHROPIC_API_KEY": ANTHROPIC_KEY}
        sections.setdefault("rate_limits", NO_RATE_LIMIT)
        self.write_config(upstream_url, **sections)
        self.cli("init")

    def write_config(self, upstream_url, **sections):
        document = base_config(upstream_url, **sections)
        for provider in document["providers"].values():
            provider.pop("api_key", None)  # keys come from the environment unless a test sets one
        document["logging"] = dict(document["logging"], level="INFO")
        document = self.database.config(document)
        self.write_document(document)
        return document

    def write_document(self, document):
        with open(self.config_path, "w", encoding="utf-8") as f:
            f.write(json.dumps(document))  # JSON is YAML

    def cli(self, *args, check=True, timeout=30):
        return run_cli(list(args), self.path, env=self.env, check=check, timeout=timeout)

    def gateway(self, **options):
        """A GatewayProcess (not started) on this directory's config and database."""
        return GatewayProcess(self.path, self.env, **options)

    def create_key(self, name="durability"):
        created = json.loads(self.cli("keys", "create", name, "--output", "json").stdout)
        return created["id"], created["key"]

    def rows(self):
        return [row.as_dict() for row in query(self.database, "SELECT * FROM usage ORDER BY id")]

    def assert_file_intact(self):
        """SQLite's integrity check of gateway.db (PostgreSQL keeps no file of ours to check)."""
        if self.database.database_url is None:
            assert [row[0] for row in query(self.database, "PRAGMA integrity_check")] == ["ok"]


@pytest.fixture
def workdir(databases):
    """``workdir(path, upstream_url, **sections)``: a Workdir on the test's backend."""
    def make(path, upstream_url, **sections):
        return Workdir(path, upstream_url, GatewayDatabase(path / "gateway.db", databases(path / "gateway.db")),
                       **sections)
    return make


def chat_body(nonce, model="gpt-4o-mini", stream=False):
    body = {"model": model, "messages": [{"role": "user", "content": "durability %s" % nonce}]}
    if stream:
        body["stream"] = True
    return body


def messages_body(nonce, model="claude-haiku-4-5", stream=False):
    body = {"model": model, "max_tokens": 64, "messages": [{"role": "user", "content": "durability %s" % nonce}]}
    if stream:
        body["stream"] = True
    return body


def send(port, path, body, key, timeout=15.0, conn=None, on_head=None):
    """One request; returns a record of what the client received
    (``on_head()`` is called once its response head has arrived).

    ``complete``: the whole answer arrived (Content-Length body read, or a
    stream ended by [DONE] / message_stop and the chunked terminator).
    ``gw_id``: x-llmgw-request-id; ``up_id``: the provider's request id.
    """
    anthropic = path.startswith("/v1/messages")
    headers = {"Content-Type": "application/json"}
    if anthropic:
        headers.update({"x-api-key": key, "anthropic-version": "2023-06-01"})
    else:
        headers["Authorization"] = "Bearer " + key
    record = {"path": path, "stream": bool(body.get("stream")), "status": None, "complete": False,
              "gw_id": None, "up_id": None, "body": b"", "error": None, "sent_at": time.monotonic()}
    own = conn is None
    if own:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("POST", path, json.dumps(body).encode(), headers)
        response = conn.getresponse()
        record["status"] = response.status
        if on_head is not None:
            on_head()
        record["headers"] = {k.lower(): v for k, v in response.getheaders()}
        record["gw_id"] = response.getheader("x-llmgw-request-id")
        record["up_id"] = response.getheader("request-id" if anthropic else "x-request-id")
        payload = response.read()  # IncompleteRead if the body or the chunked framing was cut
        record["body"] = payload
        if record["stream"] and response.status == 200:
            ending = b"event: message_stop" if anthropic else b"data: [DONE]"
            record["complete"] = ending in payload
        else:
            record["complete"] = True
    except (OSError, http.client.HTTPException) as exc:
        record["error"] = "%s: %s" % (type(exc).__name__, exc)
    finally:
        record["done_at"] = time.monotonic()
        if own:
            conn.close()
    return record


def check_rows_match(records, rows, fake):
    """Every completed 200 answer has an ok row with the fake's tokens."""
    by_id = {row["request_id"]: row for row in rows}
    reported = {entry["request_id"]: entry for entry in fake.reported}
    for record in records:
        if not (record["complete"] and record["status"] == 200):
            continue
        assert record["gw_id"] in by_id, ("no usage row for a completed answer", record["gw_id"], record["path"])
        row = by_id[record["gw_id"]]
        assert row["status"] == "ok", (row, record["path"])
        assert row["http_status"] == 200
        assert record["up_id"] in reported, record
        entry = reported[record["up_id"]]
        assert entry["complete"] is True
        assert (row["request_tokens"], row["response_tokens"]) == reported_tokens(entry), (row, entry)
        assert row["usage_source"] == "reported"
        assert row["streamed"] == int(record["stream"])


def assert_error(record, status, code=None, anthropic=False):
    assert record["status"] == status, record
    assert record["headers"]["content-type"] == "application/json", record["headers"]
    body = json.loads(record["body"])
    if anthropic:
        assert set(body) == {"type", "error"} and body["type"] == "error", body
        assert set(body["error"]) == {"type", "message"}, body
    else:
        assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
        if code is not None:
            assert body["error"]["code"] == code, body
    return body


def start_pair(work, processes):
    """Gateway processes "a" and "b" on ``work``'s database, started together;
    returns them once both listen."""
    gateways = [work.gateway(name="a"), work.gateway(name="b")]
    processes.extend(gateways)
    for gateway in gateways:
        gateway.spawn()
    for gateway in gateways:
        gateway.wait_ready()
    return gateways


def join_all(threads, timeout):
    deadline = time.monotonic() + timeout
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    stuck = [t.name for t in threads if t.is_alive()]
    assert not stuck, "client threads still running: %s" % stuck


@pytest.fixture
def processes():
    """Every GatewayProcess a test starts is killed at the end, whatever happened."""
    started = []
    yield started
    for gateway in started:
        gateway.cleanup()


# ---- Z01: kill -9 under concurrent load --------------------------------------

#: (path, body factory): fast and slow (in flight at the kill), streamed or not.
LOAD_MIX = [
    ("/v1/chat/completions", lambda n: chat_body(n)),
    ("/v1/chat/completions", lambda n: chat_body(n, stream=True)),
    ("/v1/chat/completions", lambda n: chat_body(n, "gpt-4o-mini-slowstream-events2", stream=True)),
    ("/v1/messages", lambda n: messages_body(n)),
    ("/v1/messages", lambda n: messages_body(n, stream=True)),
    ("/v1/messages", lambda n: messages_body(n, "claude-haiku-4-5-slowstream-events2", stream=True)),
    ("/v1/chat/completions", lambda n: chat_body(n, "gpt-4o-mini-slow")),
]

FAST_MIX = [LOAD_MIX[i] for i in (0, 1, 3, 4)]


@pytest.mark.parametrize("kill_after", [0.7, 1.2, 1.9])
def test_kill9_under_load_loses_no_completed_answer(tmp_path, workdir, processes, kill_after):
    with FakeUpstream().start() as fake:
        work = workdir(tmp_path / "run", fake.url)
        _, key = work.create_key()
        gateway = work.gateway()
        processes.append(gateway)
        gateway.start()

        records, lock = [], threading.Lock()
        killed = threading.Event()

        def client(index):
            n = 0
            while not killed.is_set():
                path, make = LOAD_MIX[(index + n) % len(LOAD_MIX)]
                record = send(gateway.port, path, make("t%d-n%d" % (index, n)), key, timeout=10)
                n += 1
                with lock:
                    records.append(record)

        threads = [threading.Thread(target=client, args=(i,), name="client-%d" % i) for i in range(8)]
        for thread in threads:
            thread.start()
        try:
            time.sleep(kill_after)
            gateway.kill9()
        finally:
            killed.set()
            join_all(threads, 15)
        fake_requests = len(fake.requests)

        # Restart on the same database (reconciliation runs before it listens), then stop it.
        gateway.start()
        assert gateway.terminate() == 0, gateway.log()

        work.assert_file_intact()
        rows = work.rows()
        completed = [r for r in records if r["complete"]]
        assert completed, "no request completed before the kill: the test proves nothing"
        assert all(r["status"] == 200 for r in completed), [(r["status"], r["body"][:200]) for r in completed
                                                            if r["status"] != 200]
        assert [r for r in records if r["status"] is not None and r["status"] >= 500] == []
        check_rows_match(records, rows, fake)
        # A pending row is written before the provider is contacted: every call it saw is on the books.
        assert len(rows) >= fake_requests, (len(rows), fake_requests)
        assert len({row["request_id"] for row in rows}) == len(rows)
        statuses = [row["status"] for row in rows]
        assert "pending" not in statuses, statuses
        assert set(statuses) <= FINAL_STATUSES, set(statuses)
        # Slow streams were in flight at the kill: the restart marked them.
        assert statuses.count("interrupted") >= 1, statuses
        completed_ids = {r["gw_id"] for r in completed}
        assert not [row for row in rows if row["status"] == "interrupted" and row["request_id"] in completed_ids]
        assert "Traceback" not in gateway.log(), gateway.log()


# ---- K02/K03: two gateway processes and the CLI on one database -----------------

def test_two_processes_and_cli_share_one_database(tmp_path, workdir, upstream, processes):
    work = workdir(tmp_path, upstream.url)
    _, key = work.create_key()
    gateways = start_pair(work, processes)

    records, lock = [], threading.Lock()
    load_done = threading.Event()
    cli_results = []

    def client(index):
        for n in range(30):
            gateway = gateways[(index + n) % 2]
            path, make = FAST_MIX[(index + n) % len(FAST_MIX)]
            record = send(gateway.port, path, make("k%d-%d" % (index, n)), key)
            with lock:
                records.append(record)

    def cli_loop():
        n = 0
        while not load_done.is_set() or n < 3:
            created = work.cli("keys", "create", "throwaway-%d" % n, "--output", "json", check=False)
            cli_results.append(created)
            if created.returncode == 0:
                cli_results.append(work.cli("keys", "revoke", json.loads(created.stdout)["id"], check=False))
            n += 1
            time.sleep(0.1)

    threads = [threading.Thread(target=client, args=(i,), name="client-%d" % i) for i in range(6)]
    cli_thread = threading.Thread(target=cli_loop, name="cli-loop")
    cli_thread.start()
    for thread in threads:
        thread.start()
    try:
        join_all(threads, 60)
    finally:
        load_done.set()
        join_all([cli_thread], 30)

    assert all(g.alive() for g in gateways), [g.log() for g in gateways]
    assert len(records) == 180
    failures = [(r["status"], r["error"], r["body"][:200]) for r in records if r["status"] != 200 or not r["complete"]]
    assert failures == []
    for result in cli_results:
        assert result.returncode == 0, result.stderr
        assert "locked" not in result.stderr
    assert len(cli_results) >= 6

    fake_requests = len(upstream.requests)
    assert fake_requests == 180
    for gateway in gateways:
        assert gateway.terminate() == 0, gateway.log()
    for gateway in gateways:
        log = gateway.log()
        assert "database is locked" not in log and "locked" not in log, log
        assert "Traceback" not in log, log

    rows = work.rows()
    assert len(rows) == fake_requests
    assert len({row["request_id"] for row in rows}) == len(rows)
    assert {row["status"] for row in rows} == {"ok"}
    check_rows_match(records, rows, upstream)
    assert sum(row["request_tokens"] for row in rows) == sum(reported_tokens(e)[0] for e in upstream.reported)
    assert sum(row["response_tokens"] for row in rows) == sum(reported_tokens(e)[1] for e in upstream.reported)
    work.assert_file_intact()
    keys = json.loads(work.cli("keys", "list", "--output", "json").stdout)
    throwaways = [k for k in keys if k["project_name"].startswith("throwaway-")]
    assert throwaways and not any(k["is_active"] for k in throwaways)


# ---- A06: revocation reaches every process --------------------------------------

def test_cli_revocation_holds_in_every_gateway_process(tmp_path, workdir, upstream, processes):
    work = workdir(tmp_path, upstream.url)
    key_id, key = work.create_key()
    gateways = start_pair(work, processes)

    # Keep-alive connections opened (and the key cached) before the revocation.
    conns = [http.client.HTTPConnection("127.0.0.1", g.port, timeout=10) for g in gateways]
    try:
        for n, (gateway, conn) in enumerate(zip(gateways, conns)):
            for m in range(2):
                record = send(gateway.port, "/v1/chat/completions", chat_body("before-%d-%d" % (n, m)), key,
                              conn=conn)
                assert (record["status"], record["complete"]) == (200, True), record
        work.cli("keys", "revoke", key_id)
        revoked_at = time.monotonic()
        seen = len(upstream.requests)
        for n, (gateway, conn) in enumerate(zip(gateways, conns)):
            statuses = []
            while True:
                record = send(gateway.port, "/v1/chat/completions", chat_body("after-%d" % n), key, conn=conn)
                statuses.append(record["status"])
                if record["status"] == 401 or time.monotonic() - revoked_at > 1.0:
                    break
                time.sleep(0.05)
            # "running gateways refuse it from their next request"
            assert statuses == [401], (gateway.port, statuses)
            body = assert_error(record, 401, "invalid_api_key")
            assert key not in json.dumps(body)
            fresh = send(gateway.port, "/v1/messages", messages_body("after-fresh-%d" % n), key)
            assert_error(fresh, 401, anthropic=True)
        assert len(upstream.requests) == seen
    finally:
        for conn in conns:
            conn.close()
    assert all(g.alive() for g in gateways)
    for gateway in gateways:
        assert gateway.terminate() == 0, gateway.log()


# ---- Z03: SIGTERM drains -----------------------------------------------------------

def test_sigterm_as_soon_as_the_port_opens_still_stops_cleanly(tmp_path, workdir, upstream, processes):
    """Regression: the port accepted connections before the signal handlers
    were installed, so a SIGTERM sent the moment it opened killed the
    process undrained (exit -15; seen in test_kill9_under_load's restart)."""
    work = workdir(tmp_path, upstream.url)
    for attempt in range(5):
        # A port known before it opens (so not read from the log, which
        # comes after the handlers): the test must connect the moment it opens.
        gateway = work.gateway(name="early-%d" % attempt, port=free_port())
        processes.append(gateway)
        gateway.spawn()

        def port_open():
            assert gateway.alive(), gateway.log()
            try:
                socket.create_connection(("127.0.0.1", gateway.port), timeout=0.5).close()
                return True
            except OSError:
                return False
        assert wait_until(port_open, timeout=15, interval=0.001), gateway.log()
        assert gateway.terminate() == 0, gateway.log()
        assert "llmgw stopped" in gateway.log()


def test_sigterm_stops_accepting_and_drains_streams(tmp_path, workdir, upstream, processes):
    work = workdir(tmp_path, upstream.url, server={"host": "127.0.0.1", "port": 0, "drain_timeout": 15})
    _, key = work.create_key()
    gateway = work.gateway()
    processes.append(gateway)
    gateway.start()

    streams = [("/v1/chat/completions", chat_body("drain-%d" % n, "gpt-4o-mini-slowstream-events6", stream=True))
               for n in range(3)]
    streams += [("/v1/messages", messages_body("drain-%d" % n, "claude-haiku-4-5-slowstream-events4", stream=True))
                for n in range(2)]
    records = [None] * len(streams)
    heads = []

    def client(index):
        records[index] = send(gateway.port, streams[index][0], streams[index][1], key, timeout=20,
                              on_head=lambda: heads.append(index))

    threads = [threading.Thread(target=client, args=(i,), name="stream-%d" % i) for i in range(len(streams))]
    for thread in threads:
        thread.start()
    try:
        assert wait_until(lambda: len(heads) == len(streams), timeout=5), heads  # the streams are mid-flight
        gateway.process.send_signal(signal.SIGTERM)
        signalled = time.monotonic()

        def refused():
            try:
                with socket.create_connection(("127.0.0.1", gateway.port), timeout=0.5) as sock:
                    sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
                    return sock.recv(1) == b""  # accepted, then closed without an answer
            except OSError:  # refused or reset
                return True
        assert wait_until(refused, timeout=1.0, interval=0.05), "still accepting 1 s after SIGTERM"
        refused_after = time.monotonic() - signalled
        in_flight = sum(1 for r in records if r is None)
        assert in_flight >= 1, "the streams ended before the listener closed: nothing was drained"
    finally:
        join_all(threads, 20)
    code = gateway.process.wait(15)
    log = gateway.log()
    assert code == 0, log
    for record in records:
        assert record["error"] is None and record["status"] == 200 and record["complete"], record
    assert "stopping" in log and "Traceback" not in log, log
    rows = work.rows()
    assert len(rows) == len(streams) == len(upstream.requests)
    assert [row["status"] for row in rows] == ["ok"] * len(streams), rows
    check_rows_match(records, rows, upstream)
    assert refused_after <= 1.0


# ---- SIGHUP reload ------------------------------------------------------------------

def test_sighup_reloads_upstream_key_and_price_and_refuses_a_broken_file(tmp_path, workdir, upstream, processes):
    pricing = {"reload-model": {"input": 1, "output": 2}}
    work = workdir(tmp_path, upstream.url, server={"host": "127.0.0.1", "port": 0, "drain_timeout": 2},
                   pricing=pricing)
    _, key = work.create_key()
    gateway = work.gateway(entry="llmgw")
    processes.append(gateway)
    port = gateway.start().port

    def cost(row, price_in, price_out):
        return row["request_tokens"] * price_in * 1000 + row["response_tokens"] * price_out * 1000

    with FakeUpstream().start() as second:
        keepalive = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        try:
            first = send(port, "/v1/chat/completions", chat_body("r1", "reload-model"), key, conn=keepalive)
            assert (first["status"], first["complete"]) == (200, True), first
            assert len(upstream.requests) == 1 and not second.requests
            assert upstream.requests[0]["headers"]["authorization"] == "Bearer " + OPENAI_KEY

            new_key = "sk-RELOADED-0123456789abcdef"
            document = work.write_config(upstream.url, server={"host": "127.0.0.1", "port": 0, "drain_timeout": 2},
                                         pricing={"reload-model": {"input": 3, "output": 5}},
                                         rate_limits=NO_RATE_LIMIT)
            document["providers"]["openai"] = {"base_url": second.url, "api_key": new_key}
            work.write_document(document)
            gateway.process.send_signal(signal.SIGHUP)
            assert wait_until(lambda: "config reloaded" in gateway.log(), timeout=3), gateway.log()

            fresh = send(port, "/v1/chat/completions", chat_body("r2", "reload-model"), key)
            reused = send(port, "/v1/chat/completions", chat_body("r3", "reload-model"), key, conn=keepalive)
            for record in (fresh, reused):
                assert (record["status"], record["complete"], record["error"]) == (200, True, None), record
            assert len(upstream.requests) == 1 and len(second.requests) == 2
            assert [r["headers"]["authorization"] for r in second.requests] == ["Bearer " + new_key] * 2

            # A broken file: refused with a log line, the running config stays.
            with open(work.config_path, "w", encoding="utf-8") as f:
                f.write(json.dumps(dict(document, surprise={"x": 1})))
            gateway.process.send_signal(signal.SIGHUP)
            assert wait_until(lambda: "reload refused" in gateway.log(), timeout=3), gateway.log()
            after = send(port, "/v1/chat/completions", chat_body("r4", "reload-model"), key, conn=keepalive)
            assert (after["status"], after["complete"]) == (200, True), after
            assert len(upstream.requests) == 1 and len(second.requests) == 3
            assert second.requests[2]["headers"]["authorization"] == "Bearer " + new_key
        finally:
            keepalive.close()

        assert gateway.alive()
        assert gateway.terminate() == 0, gateway.log()
        log = gateway.log()
        error_lines = [line for line in log.splitlines() if " ERROR " in line]
        assert len(error_lines) == 1 and "surprise" in error_lines[0], log
        assert new_key not in log and OPENAI_KEY not in log

        rows = work.rows()
        assert [row["status"] for row in rows] == ["ok"] * 4
        by_id = {row["request_id"]: row for row in rows}
        row = by_id[first["gw_id"]]
        assert row["cost_nanousd"] == cost(row, 1, 2) and row["priced"] == 1
        assert (row["request_tokens"], row["response_tokens"]) == reported_tokens(upstream.reported[0])
        for record, entry in zip((fresh, reused, after), second.reported):
            row = by_id[record["gw_id"]]
            assert record["up_id"] == entry["request_id"]
            assert (row["request_tokens"], row["response_tokens"]) == reported_tokens(entry)
            assert row["cost_nanousd"] == cost(row, 3, 5), row

    audit = json.loads(work.cli("audit", "--output", "json").stdout)
    reloads = [entry for entry in audit if entry["action"] == "config_reloaded"]
    assert len(reloads) == 1, audit
    assert reloads[0]["actor"] == "gateway"


# ---- durability level -----------------------------------------------------------------

@pytest.mark.parametrize("level, pragma", [("normal", 1), ("full", 2)])
@pytest.mark.sqlite_only("database.synchronous is SQLite's PRAGMA synchronous")
def test_database_synchronous_setting_reaches_the_connections(tmp_path, upstream, level, pragma):
    config = llmgw.parse_config(base_config(upstream.url, database={"synchronous": level}))
    server = llmgw.make_server(config, port=0, host="127.0.0.1", environ={"DB_PATH": str(tmp_path / "gw.db")})
    try:
        store = server.gateway.store
        for conn in (store._writer, store._reader):  # read-only look at the live connections
            assert conn.execute("PRAGMA synchronous").fetchone()[0] == pragma
            assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        server.server_close()
        server.gateway.store.close()


@pytest.mark.sqlite_only("database.synchronous is SQLite's PRAGMA synchronous")
def test_synchronous_full_gateway_serves_and_records(tmp_path, workdir, upstream, processes):
    work = workdir(tmp_path, upstream.url, database={"synchronous": "full"})
    _, key = work.create_key()
    gateway = work.gateway()
    processes.append(gateway)
    gateway.start()
    records = [send(gateway.port, "/v1/chat/completions", chat_body("full-%d" % n, stream=bool(n % 2)), key)
               for n in range(4)]
    assert [(r["status"], r["complete"]) for r in records] == [(200, True)] * 4
    gateway.kill9()  # committed rows survive a crash in every mode
    rows = work.rows()
    assert [row["status"] for row in rows] == ["ok"] * 4
    check_rows_match(records, rows, upstream)
    work.assert_file_intact()


@pytest.mark.parametrize("value", ["off", "FULLY", 1])
def test_synchronous_setting_refuses_other_values(tmp_path, upstream, value):
    config_path = tmp_path / "config.yaml"
    config_path.write_text(json.dumps(base_config(upstream.url, database={"synchronous": value})))
    env = dict(os.environ, CONFIG_PATH=str(config_path), DB_PATH=str(tmp_path / "gateway.db"))
    result = subprocess.run([sys.executable, LLMGW_PY], cwd=str(tmp_path), env=env,
                            capture_output=True, text=True, timeout=30)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1, (result.returncode, result.stderr)
    assert len(lines) == 1 and lines[0].startswith("error: ") and "database.synchronous" in lines[0], result.stderr
    assert not os.path.exists(str(tmp_path / "gateway.db"))  # refused before anything was written


# ---- K04: lock contention never surfaces as a 500 ----------------------------------------

@pytest.mark.sqlite_only("SQLite's one writer lock, held by another connection (BEGIN IMMEDIATE)")
def test_writer_lock_held_elsewhere_delays_but_never_fails(tmp_path, workdir, upstream, processes):
    work = workdir(tmp_path, upstream.url)
    _, key = work.create_key()
    gateway = work.gateway()
    processes.append(gateway)
    gateway.start()

    in_flight = {}
    stream_thread = threading.Thread(target=lambda: in_flight.update(send(
        gateway.port, "/v1/chat/completions", chat_body("held", "gpt-4o-mini-slowstream-events3", stream=True),
        key)))
    stream_thread.start()
    holder = sqlite3.connect(work.db_path, timeout=5, isolation_level=None)
    records, threads = [], []
    try:
        assert upstream.wait_for_requests(1, timeout=5)
        holder.execute("BEGIN IMMEDIATE")
        held_at = time.monotonic()
        for n in range(6):
            path, make = LOAD_MIX[[0, 1, 3, 4, 0, 3][n]]
            thread = threading.Thread(target=lambda p=path, b=make("lock-%d" % n): records.append(
                send(gateway.port, p, b, key)))
            threads.append(thread)
            thread.start()
        time.sleep(1.0)
        # The pending row comes first: while it cannot be written, no provider is called.
        assert len(upstream.requests) == 1
        assert not records, records
        holder.execute("ROLLBACK")
        released_at = time.monotonic()
    finally:
        if holder.in_transaction:
            holder.execute("ROLLBACK")
        holder.close()
        join_all(threads + [stream_thread], 20)
    assert released_at - held_at >= 1.0
    assert in_flight["status"] == 200 and in_flight["complete"], in_flight
    assert sorted(r["status"] for r in records) == [200] * 6, [(r["status"], r["body"][:200]) for r in records]
    assert all(r["complete"] for r in records)
    assert gateway.terminate() == 0
    log = gateway.log()
    assert "locked" not in log and "Traceback" not in log, log
    rows = work.rows()
    assert len(rows) == 7 == len(upstream.requests)
    assert {row["status"] for row in rows} == {"ok"}
    check_rows_match(records + [in_flight], rows, upstream)


# ---- A10 / Z05: fail closed when the usage row cannot be written -----------------------

class QuickStore(llmgw.SQLiteStore):
    """The real Store with a short busy timeout, so a held lock outlasts it quickly."""
    busy_timeout_s = 0.3


@pytest.mark.sqlite_only("a SQLite write lock outlasting the busy timeout (PostgreSQL: test_books "
                         "test_b4_unreachable_postgresql_fails_closed)")
def test_unwritable_database_fails_closed_with_503(tmp_path, upstream):
    db_path = str(tmp_path / "gw.db")
    config = llmgw.parse_config(base_config(upstream.url, rate_limits=NO_RATE_LIMIT))
    store = QuickStore(db_path)
    server = llmgw.make_server(config, store, host="127.0.0.1", port=0, environ={})
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    port = server.server_address[1]
    holder = sqlite3.connect(db_path, timeout=5, isolation_level=None)
    try:
        _, key = llmgw.create_virtual_key(store, config, "fail closed")
        holder.execute("BEGIN IMMEDIATE")
        chat = send(port, "/v1/chat/completions", chat_body("closed"), key)
        body = assert_error(chat, 503, "storage_unavailable")
        assert body["error"]["type"] == "overloaded_error"
        streamed = send(port, "/v1/chat/completions", chat_body("closed-s", stream=True), key)
        assert_error(streamed, 503, "storage_unavailable")
        message = send(port, "/v1/messages", messages_body("closed"), key)
        body = assert_error(message, 503, anthropic=True)
        assert body["error"]["type"] == "overloaded_error"
        assert upstream.requests == []  # no provider was contacted
        holder.execute("ROLLBACK")
        healthy = send(port, "/v1/chat/completions", chat_body("open"), key)
        assert (healthy["status"], healthy["complete"]) == (200, True), healthy
    finally:
        if holder.in_transaction:
            holder.execute("ROLLBACK")
        holder.close()
        server.shutdown()
        server.server_close()
        thread.join(5)
        store.close()
    rows = sqlite3.connect(db_path).execute("SELECT status FROM usage").fetchall()
    assert rows == [("ok",)]
    assert len(upstream.requests) == 1


def test_out_of_file_descriptors_new_connections_get_503(tmp_path, workdir, upstream):
    """[capacity] A gateway process whose open-file limit is 64 warns at
    start that it holds fewer calls than server.max_in_flight. Connections
    past the limit are each answered 503 + Retry-After (JSON, gateway_full)
    at once, instead of waiting unanswered in the listen backlog; once they
    leave, it serves again."""
    import resource
    work = workdir(tmp_path, upstream.url)
    key = work.create_key()[1]
    gateway = work.gateway(preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))).start()
    clients = []
    try:
        assert "open-file limit (64)" in gateway.log()
        for _ in range(80):
            clients.append(socket.create_connection(("127.0.0.1", gateway.port), timeout=5))
        answered = set()
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and len(answered) < 10:
            readable, _, _ = select.select([c for c in clients if c not in answered], [], [], 0.5)
            answered.update(readable)
        assert len(answered) >= 10, "only %d connections were answered" % len(answered)
        for client in answered:
            head, _, body = client.recv(65536).partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 503 "), head
            assert b"\r\nretry-after: 1\r\n" in head.lower() + b"\r\n", head
            assert json.loads(body)["error"]["code"] == "gateway_full"
        for client in clients:
            client.close()
        clients = []

        assert wait_until(lambda: send(gateway.port, "/v1/chat/completions", chat_body("fds"), key)["status"] == 200,
                          timeout=10)
        assert "out of file descriptors" in gateway.stop()
    finally:
        for client in clients:
            client.close()
        gateway.cleanup()
