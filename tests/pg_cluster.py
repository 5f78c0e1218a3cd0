"""A throwaway PostgreSQL cluster for tests and benchmarks (standard library
and pg8000 only): initdb in a temporary directory, ``pg_ctl start`` on a
free port of 127.0.0.1, a fresh database per ``create_database()``, and
``stop()`` removes it all. As root (initdb refuses root) the cluster runs as
``nobody`` through runuser. No binaries or no pg8000: ``unavailable()`` says
why, and callers skip.
"""

import glob
import importlib.util
import itertools
import os
import shutil
import socket
import subprocess
import tempfile
import time

#: Debian's layout first (/usr/lib/postgresql/15/bin), then PATH; LLMGW_PG_BIN overrides.
SEARCH = ("/usr/lib/postgresql/*/bin",)
USER = "llmgw"


def find_bin_dir():
    explicit = os.environ.get("LLMGW_PG_BIN")
    if explicit:
        return explicit if os.path.exists(os.path.join(explicit, "initdb")) else None
    for pattern in SEARCH:
        found = sorted(glob.glob(pattern), key=lambda path: [int(part) if part.isdigit() else 0
                                                             for part in path.split("/")])
        for directory in reversed(found):
            if os.path.exists(os.path.join(directory, "initdb")):
                return directory
    initdb = shutil.which("initdb")
    return os.path.dirname(initdb) if initdb else None


def unavailable():
    """Why no cluster can be started here, or None."""
    if importlib.util.find_spec("pg8000") is None:
        return "pg8000 is not installed (pip install pg8000)"
    if find_bin_dir() is None:
        return ("no PostgreSQL binaries (initdb, pg_ctl) in /usr/lib/postgresql/*/bin, on PATH "
                "or in LLMGW_PG_BIN")
    if os.geteuid() == 0 and shutil.which("runuser") is None:
        return "running as root without runuser (initdb refuses root)"
    return None


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Cluster:
    """One running PostgreSQL server; ``max_connections`` as asked."""

    def __init__(self, max_connections=300):
        self.bin_dir = find_bin_dir()
        self.root = tempfile.mkdtemp(prefix="llmgw-pg-")
        self.data = os.path.join(self.root, "data")
        self.max_connections = max_connections
        self.port = None
        self._names = itertools.count(1)
        if os.geteuid() == 0:
            os.chmod(self.root, 0o755)
            shutil.chown(self.root, "nobody", "nogroup")

    def _run(self, tool, *args):
        argv = [os.path.join(self.bin_dir, tool)] + list(args)
        if os.geteuid() == 0:
            argv = ["runuser", "-u", "nobody", "--"] + argv
        result = subprocess.run(argv, cwd=self.root, capture_output=True, text=True, timeout=120)
        if result.returncode != 0:
            raise RuntimeError("%s failed: %s%s" % (tool, result.stdout, result.stderr))
        return result

    def start(self):
        self._run("initdb", "-D", self.data, "-U", USER, "-A", "trust", "-E", "UTF8", "--no-sync")
        for attempt in range(5):  # a free port may be taken before the server binds it
            self.port = _free_port()
            options = ("-p %d -k %s -c listen_addresses=127.0.0.1 -c max_connections=%d -c fsync=off "
                       "-c synchronous_commit=off -c full_page_writes=off"
                       % (self.port, self.root, self.max_connections))
            try:
                self._run("pg_ctl", "-D", self.data, "-l", os.path.join(self.root, "server.log"), "-o", options,
                          "-w", "-t", "60", "start")
                return self
            except RuntimeError:
                if attempt == 4:
                    raise
        return self

    def url(self, database):
        return "postgresql://%s@127.0.0.1:%d/%s" % (USER, self.port, database)

    def connect(self, database="postgres"):
        import pg8000.dbapi
        # ssl_context False: plain text, not pg8000's TLS attempt (a tenth of a second of CPU to build a
        # context); connections that test TLS are the gateway's own (tests/test_postgres.py).
        conn = pg8000.dbapi.connect(user=USER, host="127.0.0.1", port=self.port, database=database, ssl_context=False)
        conn.autocommit = True
        return conn

    def create_database(self, prefix="t"):
        """A new empty database; returns its URL."""
        name = "%s%d" % (prefix, next(self._names))
        conn = self.connect()
        try:
            conn.cursor().execute("CREATE DATABASE %s" % name)
        finally:
            conn.close()
        return self.url(name)

    def serve_tls(self, certificate, key):
        """Offer TLS from now on with ``certificate`` and ``key`` (PEM files,
        copied into the cluster's directory: the server reads them as its own
        user, the key private to it); ``serve_tls(None, None)`` stops offering
        it. New connections see the change once ``SHOW ssl`` does."""
        settings = {"ssl": "off"}
        if certificate is not None:
            for source, name in ((certificate, "server.crt"), (key, "server.key")):
                target = os.path.join(self.root, name)
                shutil.copyfile(source, target)
                os.chmod(target, 0o600)
                if os.geteuid() == 0:
                    shutil.chown(target, "nobody", "nogroup")
            settings = {"ssl_cert_file": os.path.join(self.root, "server.crt"),
                        "ssl_key_file": os.path.join(self.root, "server.key"), "ssl": "on"}
        conn = self.connect()
        try:
            cursor = conn.cursor()
            for name, value in settings.items():
                cursor.execute("ALTER SYSTEM SET %s = '%s'" % (name, value))
            cursor.execute("SELECT pg_reload_conf()")
        finally:
            conn.close()
        deadline = time.monotonic() + 30
        while self._setting("ssl") != settings["ssl"]:  # the postmaster reloads asynchronously
            if time.monotonic() > deadline:
                raise RuntimeError("the server did not take ssl = %s (see %s/server.log)"
                                   % (settings["ssl"], self.root))
            time.sleep(0.05)

    def _setting(self, name):
        conn = self.connect()
        try:
            cursor = conn.cursor()
            cursor.execute("SHOW %s" % name)
            return cursor.fetchone()[0]
        finally:
            conn.close()

    def stop(self):
        if self.port is not None:
            try:
                self._run("pg_ctl", "-D", self.data, "-m", "immediate", "-w", "stop")
            except RuntimeError:
                pass
            self.port = None
        shutil.rmtree(self.root, ignore_errors=True)
