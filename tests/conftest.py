"""Shared fixtures: a fake provider and the real gateway on ephemeral ports.

``gateway`` runs llmgw's own server (``llmgw.make_server``) in a thread,
pointed at ``upstream`` (tests/fake_upstream.py) for both providers, with a
database under ``tmp_path``. Tests talk to it over real sockets and read the
usage rows back from the database file; no gateway internals are mocked.
"""

import http.client
import json
import os
import socket
import sqlite3
import subprocess
import sys
import threading
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import llmgw  # noqa: E402
from fake_upstream import FakeUpstream  # noqa: E402

#: Canary provider keys: secrets tests grep every output for them.
OPENAI_KEY = "sk-CANARY-OAI-0123456789abcdef"
ANTHROPIC_KEY = "sk-ant-CANARY-0123456789abcdef"
ADMIN_TOKEN = "adm-CANARY-admin-token-0123456789"


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
    """The real gateway serving in a background thread."""

    def __init__(self, document, db_path, environ=None):
        self.config = llmgw.parse_config(document)
        self.store = llmgw.Store(db_path)
        self.db_path = str(db_path)
        self.server = llmgw.make_server(self.config, self.store, environ=environ or {})
        self.port = self.server.server_address[1]
        self.url = "http://127.0.0.1:%d" % self.port
        self._thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()

    @property
    def gateway(self):
        return self.server.gateway

    def stop(self):
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(5)
        self.store.close()

    def create_key(self, project="test project", tier="default", rpm=None, **policy):
        """A virtual key with policy fields as the admin API takes them."""
        fields = dict(policy, tier=tier)
        if rpm is not None:
            fields["rpm"] = rpm
        return llmgw.create_virtual_key(self.store, self.config, project, fields, now=self.gateway.clock())

    def rows(self):
        """Usage rows read from the database file, as another process would."""
        conn = sqlite3.connect(self.db_path)
        conn.row_factory = sqlite3.Row
        try:
            return [dict(row) for row in conn.execute("SELECT * FROM usage ORDER BY id")]
        finally:
            conn.close()

    def wait_for_rows(self, predicate=lambda rows: bool(rows), timeout=5.0):
        deadline = time.monotonic() + timeout
        while True:
            rows = self.rows()
            if predicate(rows) or time.monotonic() > deadline:
                return rows
            time.sleep(0.02)


@pytest.fixture
def make_gateway(tmp_path, upstream):
    """Start gateways with custom config sections: ``make_gateway(server={...})``."""
    started = []

    def start(environ=None, db_name="gateway.db", **sections):
        gateway = RunningGateway(base_config(upstream.url, **sections), tmp_path / db_name, environ)
        started.append(gateway)
        return gateway
    yield start
    for gateway in started:
        gateway.stop()


@pytest.fixture
def gateway(make_gateway):
    return make_gateway()


@pytest.fixture
def vkey(gateway):
    """A virtual key's secret on ``gateway``."""
    return gateway.create_key()[1]


class Response:
    def __init__(self, status, headers, body):
        self.status, self.headers, self.body = status, headers, body

    def json(self):
        return json.loads(self.body)

    def header(self, name):
        return self.headers.get(name.lower())


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


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_cli(args, cwd, env=None, timeout=30, check=False):
    """Run ``python cli.py ARGS`` as a subprocess in ``cwd``."""
    full_env = dict(os.environ, **(env or {}))
    result = subprocess.run([sys.executable, os.path.join(ROOT, "cli.py")] + list(args), cwd=str(cwd),
                            env=full_env, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError("cli %s failed: %s" % (args, result.stderr))
    return result


def wait_for_port(port, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.05)
    return False
