"""Shared fixtures and helpers: a fake provider and the real gateway on ephemeral ports.

``gateway`` runs llmgw's own server (``llmgw.make_server``) in a thread,
pointed at ``upstream`` (tests/fake_upstream.py) for both providers, with a
database on the test's backend (a SQLite file under ``tmp_path``, or
PostgreSQL). Tests talk to it over real sockets and read the usage rows back
from the database (``query``, as another process would); no gateway
internals are mocked.

Sections below: secrets and routes; environment; the database backend; the in-process gateway;
HTTP clients (http.client and raw sockets); waiting; expected usage and cost
(computed here, independently of llmgw); common assertions; the CLI and
gateway child processes; shared scenarios.
"""

import decimal
import http.client
import itertools
import json
import logging
import os
import re
import select
import signal
import socket
import sqlite3
import struct
import subprocess
import sys
import threading
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import cli  # noqa: E402
import llmgw  # noqa: E402
import pg_cluster  # noqa: E402
from fake_upstream import CONNECTION_THREAD_NAME, FakeUpstream, ScriptedUpstream  # noqa: E402


# ---- secrets, routes, files ----------------------------------------------------------

#: Canary provider keys: secrets tests grep every output for them.
OPENAI_KEY = "sk-CANARY-OAI-0123456789abcdef"
ANTHROPIC_KEY = "sk-ant-CANARY-0123456789abcdef"
ADMIN_TOKEN = "adm-CANARY-admin-token-0123456789"

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
EMBEDDINGS = "/v1/embeddings"
RESPONSES = "/v1/responses"
MESSAGES = "/v1/messages"
COUNT_TOKENS = "/v1/messages/count_tokens"
MODELS = "/v1/models"

#: Request headers that carry a client credential.
CREDENTIAL_HEADERS = ("authorization", "x-api-key", "api-key", "proxy-authorization")
#: The token columns of a usage row.
TOKEN_COLUMNS = ("request_tokens", "response_tokens", "input_tokens", "cache_read_tokens",
                 "cache_write_tokens", "cache_write_1h_tokens", "output_tokens", "reasoning_tokens")

CLI_PY = os.path.join(ROOT, "cli.py")
LLMGW_PY = os.path.join(ROOT, "llmgw.py")


# ---- environment ---------------------------------------------------------------------

@pytest.fixture
def clean_environment(monkeypatch):
    """No provider key, admin token or path from the developer's shell leaks in.

    Modules opt in with ``pytestmark = pytest.mark.usefixtures("clean_environment")``."""
    for name in list(os.environ):
        if name.endswith("_API_KEY") or name in ("LLMGW_ADMIN_TOKEN", "CONFIG_PATH", "DB_PATH"):
            monkeypatch.delenv(name)


# ---- the database backend ------------------------------------------------------------
#
# Gateways store in SQLite (a file under tmp_path) unless the test runs on
# PostgreSQL. LLMGW_TEST_BACKEND picks the run:
#   unset       SQLite, and every test of a module marked ``both_backends``
#               once per backend (the ``backend`` parameter);
#   sqlite      SQLite only;
#   postgresql  PostgreSQL only, for every test that opens a database (its
#               fixtures include ``backend``, ``module_databases`` or
#               ``postgres_databases``); the rest never touch one and are
#               deselected (they ran in the sqlite pass, which leaves out
#               the PostgreSQL-only tests in turn);
#   both        every test that opens a database once per backend (the
#               ``backend`` parameter, or ``module_databases``' for the
#               module-scoped gateways), the rest once: what CI runs.
# Tests about the SQLite file itself are marked ``sqlite_only(reason)`` and
# skip on PostgreSQL. PostgreSQL is a throwaway cluster the session starts
# (tests/pg_cluster.py); where none can start, those cases skip saying why.

BACKENDS = ("sqlite", "postgresql")
CHOSEN_BACKEND = os.environ.get("LLMGW_TEST_BACKEND") or None
assert CHOSEN_BACKEND in BACKENDS + ("both", None), "LLMGW_TEST_BACKEND: sqlite, postgresql or both"
DEFAULT_BACKEND = CHOSEN_BACKEND if CHOSEN_BACKEND in BACKENDS else "sqlite"
#: Fixtures through which a test opens a database.
DATABASE_FIXTURES = {"backend", "module_databases", "postgres_databases"}


def pytest_generate_tests(metafunc):
    if CHOSEN_BACKEND == "both" or (CHOSEN_BACKEND is None and metafunc.definition.get_closest_marker("both_backends")):
        if "backend" in metafunc.fixturenames:
            metafunc.parametrize("backend", BACKENDS, indirect=True)
        elif "module_databases" in metafunc.fixturenames:
            metafunc.parametrize("module_databases", BACKENDS, indirect=True, scope="module")


def pytest_configure(config):
    config.addinivalue_line("markers", "both_backends: run each test on SQLite and on PostgreSQL")
    config.addinivalue_line("markers", "sqlite_only(reason): the test is about the SQLite file; skipped on PostgreSQL")
    config.addinivalue_line("markers", "xdist_group(name): in a parallel run (pytest-xdist), one worker runs the group")
    write_bytecode_for_children()


def write_bytecode_for_children():
    """Tests start Python a few hundred times (the CLI, gateway processes,
    the egress guard; xdist's workers), and each would compile llmgw.py's
    ten thousand lines again where PYTHONDONTWRITEBYTECODE is set: a third
    of a second of CPU each. The processes the suite starts write and reuse
    Python's usual bytecode cache (``__pycache__``, ignored by git)."""
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)


def item_backend(item):
    """The backend a collected test runs on: its ``backend`` parameter, else LLMGW_TEST_BACKEND."""
    params = getattr(getattr(item, "callspec", None), "params", {})
    return params.get("backend", params.get("module_databases", DEFAULT_BACKEND))


def pytest_collection_modifyitems(config, items):
    """A PostgreSQL run keeps the tests that open a database, a SQLite run
    leaves out those about PostgreSQL alone; tests about the SQLite file
    itself skip on PostgreSQL, saying why."""
    if CHOSEN_BACKEND in BACKENDS:
        def kept(item):
            fixtures = set(getattr(item, "fixturenames", ()))
            if CHOSEN_BACKEND == "postgresql":
                return bool(DATABASE_FIXTURES & fixtures)
            return "postgres_databases" not in fixtures
        config.hook.pytest_deselected(items=[item for item in items if not kept(item)])
        items[:] = [item for item in items if kept(item)]
    for item in items:
        marker = item.get_closest_marker("sqlite_only")
        if marker is not None and item_backend(item) == "postgresql":
            item.add_marker(pytest.mark.skip(
                reason="SQLite only: %s" % (marker.args[0] if marker.args else "about the SQLite file")))


class PostgresDatabases:
    """Databases of the session's cluster, reused: a test leases one per
    gateway database it names, and gives it back emptied."""

    def __init__(self, cluster):
        self.cluster = cluster
        self.free = []

    def lease(self):
        return self.free.pop() if self.free else self.cluster.create_database()

    def give_back(self, url):
        conn = self.cluster.connect(url.rsplit("/", 1)[1])
        try:
            cursor = conn.cursor()
            cursor.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
            tables = [row[0] for row in cursor.fetchall()]
            if tables:  # else nothing ever opened it: still empty
                # DELETE and restarting the sequences: a tenth of TRUNCATE's time (no foreign keys to mind)
                cursor.execute("SELECT sequencename FROM pg_sequences WHERE schemaname = 'public'")
                sequences = [row[0] for row in cursor.fetchall()]
                cursor.execute("BEGIN")
                for table in tables:
                    cursor.execute("DELETE FROM %s" % table)
                for sequence in sequences:
                    cursor.execute("ALTER SEQUENCE %s RESTART" % sequence)
                cursor.execute("INSERT INTO settings (name, value) VALUES ('schema_version', '%d')"
                               % llmgw.SCHEMA_VERSION)
                cursor.execute("COMMIT")
        finally:
            conn.close()
        self.free.append(url)


@pytest.fixture(scope="session")
def postgres_databases():
    reason = pg_cluster.unavailable()
    if reason is not None:
        pytest.skip("PostgreSQL backend not tested: %s" % reason)
    cluster = pg_cluster.Cluster().start()
    try:
        yield PostgresDatabases(cluster)
    finally:
        cluster.stop()


@pytest.fixture
def backend(request):
    """The test's storage backend: its parameter, else LLMGW_TEST_BACKEND."""
    return getattr(request, "param", DEFAULT_BACKEND)


class DatabaseLeases:
    """``url(db_path)``: the PostgreSQL database standing for ``db_path``
    (the same for the same path until ``give_back()``), or None on SQLite."""

    def __init__(self, request, backend):
        self.pool = None if backend == "sqlite" else request.getfixturevalue("postgres_databases")
        self.leased = {}

    def __call__(self, db_path):
        if self.pool is None:
            return None
        if str(db_path) not in self.leased:
            self.leased[str(db_path)] = self.pool.lease()
        return self.leased[str(db_path)]

    def give_back(self):
        for url in self.leased.values():
            self.pool.give_back(url)
        self.leased.clear()


@pytest.fixture
def databases(request, backend):
    """The test's databases on its backend (DatabaseLeases)."""
    leases = DatabaseLeases(request, backend)
    yield leases
    leases.give_back()


@pytest.fixture(scope="module")
def module_databases(request):
    """DatabaseLeases for module-scoped gateways, on the module's backend
    (its parameter, else LLMGW_TEST_BACKEND's)."""
    leases = DatabaseLeases(request, getattr(request, "param", DEFAULT_BACKEND))
    yield leases
    leases.give_back()


def database_section(url):
    """The config section naming ``url`` (None: none, SQLite). The test
    cluster serves no TLS, so a URL that says nothing of it gets
    ``sslmode=disable``: with the default (prefer), pg8000 builds a TLS
    context for each connection just to ask, a tenth of a second of CPU."""
    if url is None:
        return {}
    return {"database": {"url": url if "?" in url else url + "?sslmode=disable"}}


class GatewayDatabase:
    """A gateway database of the test, on its backend, for whatever opens it
    beside the in-process gateways (the CLI, gateway child processes, a
    direct read): the SQLite file ``db_path`` (DB_PATH; unused on
    PostgreSQL), or the PostgreSQL database ``database_url``.
    ``query(database, sql)`` reads it, as for a RunningGateway."""

    def __init__(self, db_path, database_url):
        self.db_path, self.database_url = str(db_path), database_url

    def config(self, document=None):
        """``document`` (a config.yaml dict) naming this database."""
        return dict(document or {}, **database_section(self.database_url))

    def write_config(self, path, document=None):
        """Write ``config(document)`` to ``path`` (JSON, which is YAML); returns ``path``."""
        with open(str(path), "w", encoding="utf-8") as f:
            json.dump(self.config(document), f)
        return path

    def open_store(self):
        """The store, as the CLI opens it (creating the SQLite file if missing)."""
        return llmgw.open_store(llmgw.parse_config(self.config()).database, {"DB_PATH": self.db_path})


@pytest.fixture
def db(tmp_path, databases):
    """tmp_path's gateway.db on the test's backend (GatewayDatabase): what
    ``make_gateway()``, ``paths_env(tmp_path)`` and ``cli_main`` name."""
    return GatewayDatabase(tmp_path / "gateway.db", databases(tmp_path / "gateway.db"))


def query(target, sql, params=()):
    """Rows (tuples that know their column names) of one statement (SQLite
    placeholders) on ``target``'s database (a RunningGateway, a
    postgresql:// URL or a SQLite file's path), on a connection of its own,
    as another process would open it."""
    url = target if str(target).startswith("postgresql://") else getattr(target, "database_url", None)
    if url is None:
        conn = sqlite3.connect(getattr(target, "db_path", target), timeout=10, isolation_level=None)
        try:
            cursor = conn.execute(sql, params)
            rows, names = cursor.fetchall(), [column[0] for column in cursor.description or ()]
        finally:
            conn.close()
    else:
        import pg8000.dbapi
        args = llmgw.postgres_connect_args(llmgw.parse_config(database_section(url)).database, {})
        conn = llmgw._PostgresConnection(pg8000.dbapi.connect(**args))
        try:
            cursor = conn.execute(sql, params)
            rows, names = cursor.fetchall(), cursor.names
        finally:
            conn.close()
    return [QueryRow(names, row) for row in rows]


def stored_bytes(target):
    """Everything ``target``'s database keeps, to search for a secret: every
    byte of the SQLite file with its WAL and shared memory, or the text of
    every row of every PostgreSQL table."""
    if getattr(target, "database_url", None) is None:
        data = b""
        for suffix in ("", "-wal", "-shm"):
            if os.path.exists(target.db_path + suffix):
                with open(target.db_path + suffix, "rb") as f:
                    data += f.read()
        return data
    tables = query(target, "SELECT tablename FROM pg_tables WHERE schemaname = 'public' ORDER BY tablename")
    return "\n".join(repr(query(target, "SELECT * FROM %s" % table)) for (table,) in tables).encode()


class QueryRow(tuple):
    """A row as a tuple that also knows its column names (``as_dict()``)."""

    def __new__(cls, names, values):
        row = super().__new__(cls, values)
        row.names = names
        return row

    def as_dict(self):
        return dict(zip(self.names, self))


# ---- the in-process gateway ----------------------------------------------------------

@pytest.fixture
def upstream():
    with FakeUpstream().start() as fake:
        yield fake


def base_config(upstream_url, **sections):
    """A config document pointing both providers at the fake upstream."""
    document = {
        "server": {"host": "127.0.0.1", "port": 0, "drain_timeout": 2},
        "providers": {
            "openai": {"base_url": upstream_url, "api_key": OPENAI_KEY},
            "anthropic": {"base_url": upstream_url, "api_key": ANTHROPIC_KEY},
        },
        "logging": {"level": "DEBUG"},
    }
    for name, value in sections.items():
        if isinstance(value, dict) and isinstance(document.get(name), dict):
            document[name] = dict(document[name], **value)
        else:
            document[name] = value
    return document


class RunningGateway:
    """The real gateway serving in a background thread; ``clock`` is its wall
    clock (``make_server(clock=)``), injectable for budget periods and limits."""

    def __init__(self, document, db_path, environ=None, clock=time.time):
        self.config = llmgw.parse_config(document)
        self.database_url = self.config.database.url  # None: SQLite at db_path
        self.store = llmgw.open_store(self.config.database, {"DB_PATH": str(db_path)})
        self.db_path = str(db_path)
        self.database = GatewayDatabase(db_path, self.database_url)  # for the CLI and child processes
        self.server = llmgw.make_server(self.config, self.store, environ=environ or {}, clock=clock)
        self.port = self.server.server_address[1]
        self.url = "http://127.0.0.1:%d" % self.port
        self._thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()

    @property
    def gateway(self):
        return self.server.gateway

    def stop(self):
        if not self._thread.is_alive():
            return  # stopped already (a test may stop a gateway before the fixture does)
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(5)
        self.store.close()

    def assert_books_balanced(self):
        """Once stopped: no usage row pending, no budget reserved, no request
        of any key counted in flight (whatever the requests did)."""
        pending = query(self, "SELECT request_id, endpoint, model FROM usage WHERE status = 'pending'")
        reserved = query(self, "SELECT COALESCE(SUM(reserved_nanousd), 0) FROM key_spend")[0][0]
        assert pending == [], "usage rows left pending: %r" % pending[:5]
        assert reserved == 0, "budget still reserved: %d nano-USD" % reserved
        in_flight = {key: count for key, count in self.gateway.limits.in_flight().items() if count}
        assert in_flight == {}, "requests still counted in flight: %r" % in_flight

    def create_key(self, project="test project", tier="default", rpm=None, **policy):
        """A virtual key with policy fields as the admin API takes them."""
        fields = dict(policy, tier=tier)
        if rpm is not None:
            fields["rpm"] = rpm
        return llmgw.create_virtual_key(self.store, self.config, project, fields, now=self.gateway.clock())

    def rows(self):
        """Usage rows read from the database, as another process would."""
        return [row.as_dict() for row in query(self, "SELECT * FROM usage ORDER BY id")]

    def wait_for_rows(self, predicate=lambda rows: bool(rows), timeout=5.0):
        deadline = time.monotonic() + timeout
        while True:
            rows = self.rows()
            if predicate(rows) or time.monotonic() > deadline:
                return rows
            time.sleep(0.02)


@pytest.fixture
def make_gateway(request, tmp_path, upstream, databases):
    """Start gateways with custom config sections: ``make_gateway(server={...})``;
    ``clock=`` injects a wall clock; on the test's backend, where gateways
    started with the same ``db_name`` share the database. A module that
    uses the ``balanced_books`` fixture has every gateway's books checked
    once it stopped."""
    started = []

    def start(environ=None, db_name="gateway.db", clock=time.time, **sections):
        sections = dict(database_section(databases(tmp_path / db_name)), **sections)
        gateway = RunningGateway(base_config(upstream.url, **sections), tmp_path / db_name, environ, clock)
        started.append(gateway)
        return gateway
    yield start
    for gateway in started:
        gateway.stop()
    if "balanced_books" in request.fixturenames:
        for gateway in started:
            gateway.assert_books_balanced()


@pytest.fixture
def balanced_books():
    """Marks a module whose gateways must end with balanced books (see
    RunningGateway.assert_books_balanced): ``pytestmark =
    pytest.mark.usefixtures("balanced_books")``."""


@pytest.fixture
def gateway(make_gateway):
    return make_gateway()


@pytest.fixture
def vkey(gateway):
    """A virtual key's secret on ``gateway``."""
    return gateway.create_key()[1]


# ---- HTTP client ---------------------------------------------------------------------

class Response:
    def __init__(self, status, headers, body):
        self.status, self.headers, self.body = status, headers, body

    def json(self):
        return json.loads(self.body)

    def header(self, name):
        return self.headers.get(name.lower())

    def __repr__(self):
        return "<Response %d %r %r>" % (self.status, self.headers, self.body[:300])


def call(url_or_gateway, method, path, body=None, key=None, headers=None, raw_body=None, timeout=10):
    """One HTTP request; body dicts are sent as JSON. Returns a Response."""
    url = getattr(url_or_gateway, "url", url_or_gateway)
    host, port = url.replace("http://", "").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    send_headers = {}
    if body is not None or raw_body is not None:
        send_headers["Content-Type"] = "application/json"
    if key is not None:
        send_headers["Authorization"] = "Bearer " + key
    send_headers.update(headers or {})
    data = raw_body if raw_body is not None else (json.dumps(body).encode() if body is not None else None)
    try:
        conn.request(method, path, body=data, headers=send_headers)
        response = conn.getresponse()
        payload = response.read()
        return Response(response.status, {k.lower(): v for k, v in response.getheaders()}, payload)
    finally:
        conn.close()


def post(target, path, body, key=None, **kwargs):
    return call(target, "POST", path, body, key, **kwargs)


def admin(gateway, method, path, body=None, token=ADMIN_TOKEN, **kwargs):
    """An admin API call authenticated with ``token`` (ADMIN_TOKEN by default)."""
    return call(gateway, method, path, body, key=token, **kwargs)


def body_for(path, model="gpt-4o-mini", **extra):
    """A minimal valid request body for a proxied POST route."""
    base = {
        CHAT: {"model": model, "messages": [{"role": "user", "content": "hi there"}]},
        COMPLETIONS: {"model": model, "prompt": "hi there"},
        EMBEDDINGS: {"model": model, "input": ["first", "second"]},
        RESPONSES: {"model": model, "input": "hi there"},
        MESSAGES: {"model": model, "max_tokens": 32, "messages": [{"role": "user", "content": "hi there"}]},
        COUNT_TOKENS: {"model": model, "messages": [{"role": "user", "content": "hi there"}]},
    }[path]
    return dict(base, **extra)


def sse_events(body):
    """Split an SSE body into (event name, data string) pairs."""
    events = []
    for block in body.decode("utf-8").replace("\r\n", "\n").split("\n\n"):
        if not block.strip():
            continue
        name, data = None, []
        for line in block.split("\n"):
            if line.startswith("event:"):
                name = line[6:].strip()
            elif line.startswith("data:"):
                data.append(line[5:].lstrip(" "))
        events.append((name, "\n".join(data)))
    return events


# ---- raw sockets: exact bytes out, every byte of the answer seen ---------------------

def _b(value):
    return value if isinstance(value, bytes) else str(value).encode("latin-1")


def request_bytes(method, target, headers=(), body=b"", version="HTTP/1.1", host=True):
    """Exact request bytes. Header values may be bytes (anything goes)."""
    lines = [b"%s %s %s" % (_b(method), _b(target), _b(version))]
    if host:
        lines.append(b"Host: 127.0.0.1")
    lines += [_b(name) + b": " + _b(value) for name, value in headers]
    return b"\r\n".join(lines) + b"\r\n\r\n" + _b(body)


def json_request(target, key, body, extra=(), method="POST", content_type="application/json"):
    """A well-formed JSON request (Content-Length honest) unless told otherwise."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = [("Authorization", "Bearer " + key)] if key else []
    if content_type is not None:
        headers.append(("Content-Type", content_type))
    headers.append(("Content-Length", str(len(data))))
    return request_bytes(method, target, headers + list(extra), data)


class RawResponse(Response):
    """A Response read off a raw socket: the header list as sent, and whether
    a chunked body ended with its 0-chunk."""

    def __init__(self, status, header_list, body, terminated=True):
        super().__init__(status, {name.lower(): value for name, value in header_list}, body)
        self.header_list = header_list
        self.terminated = terminated

    def __repr__(self):
        return "<RawResponse %d %r %r>" % (self.status, self.header_list, self.body[:300])


class RawClient:
    """One client socket: exact bytes out, responses parsed back in."""

    def __init__(self, gateway, timeout=5.0, source=None):
        """``source``: the client's own address (any of 127.0.0.0/8 on loopback)."""
        self.sock = socket.create_connection(("127.0.0.1", gateway.port), timeout=timeout,
                                             source_address=(source, 0) if source else None)
        self.buffer = b""
        self.received = b""  # every byte the gateway ever sent on this socket
        self.eof = False

    def send(self, data):
        self.sock.sendall(data)

    def _fill(self, deadline):
        if self.eof:
            return False
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("the gateway sent nothing in time; so far: %r" % self.buffer[:300])
        self.sock.settimeout(remaining)
        try:
            data = self.sock.recv(65536)
        except socket.timeout:
            raise TimeoutError("the gateway sent nothing in time; so far: %r" % self.buffer[:300]) from None
        except ConnectionResetError:
            data = b""
        if not data:
            self.eof = True
            return False
        self.buffer += data
        self.received += data
        return True

    def _until(self, marker, deadline):
        while marker not in self.buffer:
            if not self._fill(deadline):
                return None
        head, _, self.buffer = self.buffer.partition(marker)
        return head

    def _exactly(self, size, deadline):
        while len(self.buffer) < size:
            if not self._fill(deadline):
                return None
        data, self.buffer = self.buffer[:size], self.buffer[size:]
        return data

    def read_head(self, timeout=5.0):
        """(status, header list) of the next response, or None at EOF."""
        head = self._until(b"\r\n\r\n", time.monotonic() + timeout)
        if head is None:
            assert not self.buffer, "the connection closed inside a response head: %r" % self.buffer
            return None
        lines = head.decode("latin-1").split("\r\n")
        version, status = lines[0].split(" ", 2)[:2]
        assert version == "HTTP/1.1", lines[0]
        headers = []
        for line in lines[1:]:
            name, colon, value = line.partition(":")
            assert colon and name == name.strip(), "malformed response header %r" % line
            headers.append((name, value.strip()))
        return int(status), headers

    def next_chunk(self, timeout=5.0):
        """The next chunk of a chunked body: bytes, b"" for the terminator,
        None if the connection closed first."""
        deadline = time.monotonic() + timeout
        size_line = self._until(b"\r\n", deadline)
        if size_line is None:
            return None
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            assert self._until(b"\r\n", deadline) == b"", "trailers after the last chunk"
            return b""
        data = self._exactly(size + 2, deadline)
        if data is None:
            return None
        assert data[-2:] == b"\r\n", "chunk not followed by CRLF"
        return data[:-2]

    def read_response(self, timeout=5.0):
        """The next whole response, or None at EOF."""
        deadline = time.monotonic() + timeout
        head = self.read_head(timeout)
        if head is None:
            return None
        status, headers = head
        names = {name.lower(): value for name, value in headers}
        if 100 <= status < 200:
            return RawResponse(status, headers, b"")
        if "content-length" in names:
            assert "transfer-encoding" not in names, headers
            body = self._exactly(int(names["content-length"]), deadline)
            assert body is not None, "the connection closed inside a response body"
            return RawResponse(status, headers, body)
        assert names.get("transfer-encoding") == "chunked", "response without framing: %r" % headers
        parts = []
        while True:
            chunk = self.next_chunk(max(0.01, deadline - time.monotonic()))
            if chunk is None:
                return RawResponse(status, headers, b"".join(parts), terminated=False)
            if chunk == b"":
                return RawResponse(status, headers, b"".join(parts))
            parts.append(chunk)

    def read_all(self, timeout=5.0):
        """Every response until the gateway closes the connection."""
        deadline = time.monotonic() + timeout
        responses = []
        while True:
            response = self.read_response(max(0.01, deadline - time.monotonic()))
            if response is None:
                return responses
            responses.append(response)

    def wait_eof(self, timeout=3.0):
        """True once the gateway closed the connection (nothing more sent)."""
        deadline = time.monotonic() + timeout
        try:
            while self._fill(deadline):
                pass
        except TimeoutError:
            return False
        return True

    def rst(self):
        """Close with a TCP RST (SO_LINGER 0), as a killed client would."""
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()

    def close(self):
        self.sock.close()


# ---- waiting -------------------------------------------------------------------------

def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.05)
    return False


def wait_until(predicate, timeout=5.0, interval=0.02):
    """Poll ``predicate`` until it returns something true or ``timeout``
    seconds pass; returns its last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)


def wait_idle(gateway, timeout=5.0):
    """Wait until an in-process gateway holds no client connection and no
    call (its connections-open and calls-in-flight gauges): every exchange
    it was given has ended, its row settled and its log lines written, so
    what it has not done by now it will not do for those clients."""
    gauges = gateway.server.gauges
    assert wait_until(lambda: gauges()["llmgw_connections_open"] == gauges()["llmgw_calls_in_flight"] == 0,
                      timeout), gauges()


def settled_rows(gateway, count=1, timeout=5.0):
    """Usage rows once ``count`` of them exist and none is pending."""
    rows = gateway.wait_for_rows(
        lambda rows: len(rows) >= count and all(r["status"] != "pending" for r in rows), timeout)
    assert len(rows) >= count and all(r["status"] != "pending" for r in rows), rows
    return rows


# ---- expected usage and cost (computed here, independently of llmgw) -----------------

def expected_columns(path, usage):
    """A usage row's token columns for the provider's ``usage`` object of a call to ``path``."""
    zero = dict.fromkeys(TOKEN_COLUMNS, 0)
    if path in (CHAT, COMPLETIONS, EMBEDDINGS):
        prompt = usage["prompt_tokens"]
        cached = usage.get("prompt_tokens_details", {}).get("cached_tokens", 0)
        # Embeddings produce no output tokens; the other routes always report them.
        output = usage.get("completion_tokens", 0) if path == EMBEDDINGS else usage["completion_tokens"]
        reasoning = usage.get("completion_tokens_details", {}).get("reasoning_tokens", 0)
        return dict(zero, request_tokens=prompt, response_tokens=output, input_tokens=prompt - cached,
                    cache_read_tokens=cached, output_tokens=output, reasoning_tokens=reasoning)
    if path == RESPONSES:
        prompt = usage["input_tokens"]
        cached = usage.get("input_tokens_details", {}).get("cached_tokens", 0)
        output = usage["output_tokens"]
        reasoning = usage.get("output_tokens_details", {}).get("reasoning_tokens", 0)
        return dict(zero, request_tokens=prompt, response_tokens=output, input_tokens=prompt - cached,
                    cache_read_tokens=cached, output_tokens=output, reasoning_tokens=reasoning)
    if path == MESSAGES:
        written = usage.get("cache_creation_input_tokens", 0)
        written_1h = usage.get("cache_creation", {}).get("ephemeral_1h_input_tokens", 0)
        read = usage.get("cache_read_input_tokens", 0)
        return dict(zero, request_tokens=usage["input_tokens"] + read + written,
                    response_tokens=usage["output_tokens"], input_tokens=usage["input_tokens"],
                    cache_read_tokens=read, cache_write_tokens=written - written_1h,
                    cache_write_1h_tokens=written_1h, output_tokens=usage["output_tokens"])
    raise AssertionError(path)


def tokens_of(row):
    """A usage row's token columns, to compare with ``expected_columns``."""
    return {column: row[column] for column in TOKEN_COLUMNS}


def expected_tokens(path, usage):
    """(request_tokens, response_tokens) a row must hold for a reported usage."""
    columns = expected_columns(path, usage)
    return columns["request_tokens"], columns["response_tokens"]


def reported_tokens(entry):
    """(request tokens, response tokens) of one ``upstream.reported`` entry,
    exactly as the fake reported them."""
    return expected_tokens(entry["path"], entry["usage"])


def expected_cost(columns, input_price, output_price, cached=None, write=None, write_1h=None):
    """Nano-dollars for ``expected_columns`` at USD-per-million prices (cache
    prices default to the input price, 1 h writes to the write price)."""
    D = decimal.Decimal
    cached = input_price if cached is None else cached
    write = input_price if write is None else write
    write_1h = write if write_1h is None else write_1h
    usd_mtok = (columns["input_tokens"] * D(str(input_price)) + columns["cache_read_tokens"] * D(str(cached))
                + columns["cache_write_tokens"] * D(str(write))
                + columns["cache_write_1h_tokens"] * D(str(write_1h))
                + columns["output_tokens"] * D(str(output_price)))
    return int((usd_mtok * 1000).to_integral_value(decimal.ROUND_HALF_EVEN))


# ---- common assertions ---------------------------------------------------------------

def dialect_of(path):
    return "anthropic" if path.startswith("/v1/messages") else "openai"


def normalise_ids(raw):
    """The fake puts its request counter in ids (chatcmpl-fake3, msg_fake3)."""
    return re.sub(rb"(?<=[-_])fake\d+", b"fakeN", raw)


def assert_json_error(response, status, dialect="openai", code=None, error_type=None, close=False):
    """A gateway error: the exact status, a JSON body in the route's shape,
    and (for broken framing) ``connection: close``. Returns the whole body.
    ``response`` is a Response or a RawResponse."""
    assert response is not None, "no response"
    assert response.status == status, response
    assert response.header("content-type") == "application/json", response
    payload = json.loads(response.body)
    if dialect == "anthropic":
        assert set(payload) == {"type", "error"} and payload["type"] == "error", payload
        assert set(payload["error"]) == {"type", "message"}, payload
        error = payload["error"]
    else:
        assert set(payload) == {"error"}, payload
        assert set(payload["error"]) == {"message", "type", "param", "code"}, payload
        error = payload["error"]
        if code is not None:
            assert error["code"] == code, payload
    assert isinstance(error["message"], str) and error["message"], payload
    assert isinstance(error["type"], str) and error["type"], payload
    if error_type is not None:
        assert error["type"] == error_type, payload
    if close:
        assert response.header("connection") == "close", response
    return payload


def assert_still_serving(gateway, key, upstream):
    """A normal request still succeeds and is forwarded."""
    before = len(upstream.requests)
    response = post(gateway, CHAT, body_for(CHAT), key)
    assert response.status == 200, response.body
    assert len(upstream.requests) == before + 1


# ---- the CLI, in process and as a child; gateway child processes ---------------------

def paths_env(tmp_path, **extra):
    """CONFIG_PATH and DB_PATH for tmp_path's config.yaml and gateway.db, plus ``extra``."""
    env = {"CONFIG_PATH": str(tmp_path / "config.yaml"), "DB_PATH": str(tmp_path / "gateway.db")}
    env.update(extra)
    return env


def cli_env(target, directory, document=None, name="cli-config.yaml"):
    """CONFIG_PATH and DB_PATH for the CLI on ``target``'s database (a
    RunningGateway or a GatewayDatabase), on its backend: writes ``name`` in
    ``directory``, ``document`` (default: empty) naming that database."""
    path = os.path.join(str(directory), name)
    GatewayDatabase(target.db_path, target.database_url).write_config(path, document)
    return {"CONFIG_PATH": path, "DB_PATH": target.db_path}


def run_cli(args, cwd, env=None, timeout=30, check=False):
    """Run ``python cli.py ARGS`` as a subprocess in ``cwd``."""
    full_env = dict(os.environ, **(env or {}))
    result = subprocess.run([sys.executable, CLI_PY] + list(args), cwd=str(cwd),
                            env=full_env, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError("cli %s failed: %s" % (args, result.stderr))
    return result


@pytest.fixture
def cli_main(tmp_path, capsys, monkeypatch):
    """``cli.main(ARGS)`` in process, with tmp_path's config.yaml and gateway.db
    (``paths_env``) and ``env`` set; returns a CompletedProcess."""
    def run(*args, env=None, check=False):
        for name, value in dict(paths_env(tmp_path), **(env or {})).items():
            monkeypatch.setenv(name, value)
        capsys.readouterr()
        code = cli.main([str(arg) for arg in args])
        out, err = capsys.readouterr()
        if check and code != 0:
            raise AssertionError("cli %s failed: %s" % (args, err))
        return subprocess.CompletedProcess(args, code, out, err)
    return run


#: The gateway's start-up log line, which names the port it bound.
LISTENING = re.compile(r"listening on http://\S+:(\d+) \(")
_LOG_NUMBERS = itertools.count(1)


class GatewayProcess:
    """One gateway child process in ``cwd`` with ``env`` over os.environ:
    ``python cli.py serve --port N`` (entry "cli") or ``python llmgw.py``
    (entry "llmgw", port from its config). Its output goes to a log file in
    ``cwd``; ``start()`` returns once it listens. Without ``port`` it binds
    port 0 (the "llmgw" entry's config says 0) and ``port`` is read back
    from its log (INFO level) at each start: no free port to race for.
    ``preexec_fn`` runs in the child before it starts (to set resource limits)."""

    def __init__(self, cwd, env, port=None, entry="cli", name="gateway", preexec_fn=None):
        self.cwd = cwd
        self.env = env
        self.preexec_fn = preexec_fn
        self.fixed_port = port
        self.port = port
        self.entry = entry
        self.log_path = str(cwd / ("%s-%d.log" % (name, next(_LOG_NUMBERS))))
        self.process = None
        self.starts = 0

    @property
    def url(self):
        return "http://127.0.0.1:%d" % self.port

    def spawn(self):
        if self.entry == "cli":
            argv = [sys.executable, CLI_PY, "serve", "--port", str(self.fixed_port or 0)]
        else:
            argv = [sys.executable, LLMGW_PY]
        self.starts += 1
        with open(self.log_path, "ab") as log:
            log.write(b"---- start %d\n" % self.starts)
            log.flush()
            self.process = subprocess.Popen(argv, cwd=str(self.cwd), env=dict(os.environ, **self.env),
                                            stdout=log, stderr=subprocess.STDOUT, preexec_fn=self.preexec_fn)
        return self

    def wait_ready(self, timeout=15.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError("gateway exited with %s: %s" % (self.process.returncode, self.log()))
            if self.fixed_port is not None:
                if wait_for_port(self.port, timeout=0.2):
                    return self
                continue
            bound = LISTENING.findall(self.log().rpartition("---- start %d\n" % self.starts)[2])
            if bound:
                self.port = int(bound[0])
                return self
            time.sleep(0.02)
        raise AssertionError("gateway did not listen within %.0f s: %s" % (timeout, self.log()))

    def start(self):
        return self.spawn().wait_ready()

    def alive(self):
        return self.process is not None and self.process.poll() is None

    def kill9(self):
        """SIGKILL and reap (an unreaped zombie still looks alive to kill(pid, 0))."""
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)

    def terminate(self, timeout=15.0):
        """SIGTERM; returns the exit code (kills and fails after ``timeout``)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.cleanup()
            raise AssertionError("the gateway did not exit within %.0f s of SIGTERM: %s" % (timeout, self.log()))

    def stop(self, timeout=15.0):
        """SIGTERM and require a clean exit (status 0); returns the log."""
        code = self.terminate(timeout)
        log = self.log()
        assert code == 0, log
        return log

    def cleanup(self):
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)

    def log(self):
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as f:
                return f.read()
        except OSError:
            return ""


# ---- shared scenarios ----------------------------------------------------------------

def two_projects_usage(gateway):
    """Usage of two projects through ``gateway``: alpha makes two OpenAI chat
    calls, beta one Anthropic message. Returns the key records (alpha, beta)."""
    alpha, alpha_key = gateway.create_key("alpha")
    beta, beta_key = gateway.create_key("beta")
    for content in ("one", "two"):
        body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": content}]}
        assert post(gateway, CHAT, body, key=alpha_key).status == 200
    body = {"model": "claude-haiku-4-5", "max_tokens": 16, "messages": [{"role": "user", "content": "three"}]}
    assert post(gateway, MESSAGES, body, key=beta_key).status == 200
    return alpha, beta


# ---- hostile clients and providers: timeouts, live checks, sinkhole, scripted answers -------

#: The small timeouts and limits of the brief; the tests measure against them.
SERVER = {"header_timeout": 1, "body_timeout": 1, "keepalive_timeout": 1, "upstream_timeout": 2,
          "stream_idle_timeout": 1, "request_deadline": 5, "max_body_bytes": 65536}
#: Rate limits out of the way: several tests send hundreds of requests per key.
RATE_LIMITS = {"default": 1000000}
#: One attempt per request, as RELIABILITY.md measures them: the retries and
#: fallbacks of routing (on by default) are tested in test_routing.py and in
#: the tests that use RETRYING (test_provider_faults.py).
ONE_ATTEMPT = {"retries": 0}
ALIVE_TEXT = "Hello from the fake upstream."


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
def shared_env(tmp_path_factory, module_databases):
    fake = FakeUpstream().start()
    db_path = tmp_path_factory.mktemp("shared") / "gateway.db"
    gw = RunningGateway(base_config(fake.url, server=dict(SERVER), rate_limits=RATE_LIMITS, routing=ONE_ATTEMPT,
                                    **database_section(module_databases(db_path))), db_path)
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


def chat_body(model="gpt-4o-mini", text="hi there", **extra):
    return dict({"model": model, "messages": [{"role": "user", "content": text}]}, **extra)


def exchange(gateway, data, timeout=5.0):
    """Send ``data`` on a fresh connection; return (first response, client)."""
    client = RawClient(gateway, timeout)
    client.send(data)
    return client.read_response(timeout), client


def assert_alive(gateway, key):
    """A normal request right now: answered correctly, and on the books
    with the provider's tokens. (How fast is for tests/bench.py: a timed
    assertion here failed under load.)"""
    response = post(gateway, CHAT, chat_body(text="are you still there?"), key, timeout=10)
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


def worker_threads():
    return sum(1 for t in threading.enumerate() if t.name == "llmgw-worker")


def other_threads():
    """Threads that are neither gateway workers nor the fake upstream's
    per-connection handlers (which live as long as a pooled connection)."""
    return sorted(t.name for t in threading.enumerate()
                  if t.name not in ("llmgw-worker", CONNECTION_THREAD_NAME))


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


def scripted_reply(status_line, headers, body, close=False):
    lines = [status_line] + ["%s: %s" % header for header in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body, close


SCRIPTED_KEY = "sk-CANARY-SCRIPTED-0123456789abcdef"


@pytest.fixture
def scripted_gateway(tmp_path, databases):
    """``start(script, idle_timeout=None, **sections)`` -> (ScriptedUpstream,
    RunningGateway pointed at it, on the test's backend); both stopped at the end."""
    started = []

    def start(script, idle_timeout=None, **sections):
        upstream = ScriptedUpstream(script, idle_timeout)
        db_path = tmp_path / ("scripted%d.db" % len(started))
        gateway = RunningGateway(base_config(upstream.url, **database_section(databases(db_path)), **sections),
                                 db_path, {})
        started.append((upstream, gateway))
        return upstream, gateway
    yield start
    for upstream, gateway in started:
        gateway.stop()
        upstream.close()


def answer(target, path, body, key, timeout=2.0, **kwargs):
    """A whole response, or a test failure naming the request that got none."""
    try:
        return post(target, path, body, key=key, timeout=timeout, **kwargs)
    except OSError as exc:
        pytest.fail("no complete answer to %s %r within %.1f s: %s: %s"
                    % (path, body.get("model"), timeout, type(exc).__name__, exc))


def ledger(gateway, key_id):
    """(spent, reserved) nano-dollars of the key's budget period rows, summed."""
    return tuple(query(gateway, "SELECT COALESCE(SUM(spent_nanousd), 0), COALESCE(SUM(reserved_nanousd), 0) "
                                "FROM key_spend WHERE key_id = ?", (key_id,))[0])


def health_recovers(gateway, timeout=2.0):
    """/health answers 200 within ``timeout`` (a closed client connection
    may take the gateway a moment to notice); returns the last status."""
    def probe():
        try:
            return call(gateway, "GET", "/health", timeout=1).status == 200
        except OSError:
            return False
    return wait_until(probe, timeout)


def execute_sql(target, *statements):
    """Run ``statements`` on ``target``'s database (a gateway, or a SQLite file's path)."""
    for statement in statements:
        query(target, statement)
