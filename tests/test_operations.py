"""Operations: backup and restore, ``cli.py doctor``, schema migrations from
every earlier schema (fixture databases in tests/schemas/), packaging.

Backups are taken by ``python cli.py backup`` as a child process while the
real gateway serves a steady load; the copies are read back with sqlite3.
"""

import email.utils
import json
import os
import re
import signal
import shutil
import socket
import sqlite3
import stat
import subprocess
import sys
import threading
import time

import pytest

try:
    import tomllib
except ImportError:  # Python before 3.11
    tomllib = None

from conftest import (ANTHROPIC_KEY, CHAT, OPENAI_KEY, ROOT, body_for, call, execute_sql, paths_env, post, query,
                      run_cli, settled_rows, wait_until)

import cli
import llmgw

pytestmark = pytest.mark.usefixtures("clean_environment")


def cli_run(tmp_path, *args, env=None):
    return run_cli([str(arg) for arg in args], tmp_path, dict(paths_env(tmp_path), **(env or {})))


def stats_of(tmp_path, db_path):
    """``cli.py stats --by key --output json`` on the database at ``db_path``."""
    result = cli_run(tmp_path, "stats", "--output", "json", env={"DB_PATH": str(db_path)})
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def assert_books_balance(db_path):
    """In one consistent copy, every key's spend equals the costs of its
    settled rows and its reservations equal those of its pending rows."""
    assert query(db_path, "PRAGMA quick_check") == [("ok",)]
    spend = query(db_path, "SELECT key_id, period_start, spent_nanousd, reserved_nanousd FROM key_spend")
    assert spend
    for key_id, period_start, spent, reserved in spend:
        [(settled, pending)] = query(db_path, """
            SELECT COALESCE(SUM(CASE WHEN status != 'pending' THEN cost_nanousd END), 0),
                   COALESCE(SUM(CASE WHEN status = 'pending' THEN reserved_nanousd END), 0)
            FROM usage WHERE virtual_key_id = ? AND budget_period_start = ?""", (key_id, period_start))
        assert (spent, reserved) == (settled, pending)


class Load:
    """Threads sending chat calls to a gateway until stopped."""

    def __init__(self, gateway, secret, threads=4):
        self.stopping = threading.Event()
        self.statuses = []
        self._threads = [threading.Thread(target=self._run, args=(gateway, secret)) for _ in range(threads)]
        for thread in self._threads:
            thread.start()

    def _run(self, gateway, secret):
        while not self.stopping.is_set():
            self.statuses.append(post(gateway, CHAT, body_for(CHAT), secret).status)

    def stop(self):
        self.stopping.set()
        for thread in self._threads:
            thread.join(30)


# ---- backup and restore ---------------------------------------------------------------

BACKUP_IS_SQLITES = "backup and restore are SQLite's (PostgreSQL: pg_dump and pg_restore)"


@pytest.mark.sqlite_only(BACKUP_IS_SQLITES)
def test_backup_under_load_is_consistent_private_and_restores_with_equal_totals(tmp_path, make_gateway):
    gateway = make_gateway()
    key, secret = gateway.create_key("alpha", rpm=100000, max_budget=1000000)
    load = Load(gateway, secret)
    try:
        assert wait_until(lambda: len(load.statuses) >= 20, timeout=30)
        backup = tmp_path / "under-load.db"
        result = cli_run(tmp_path, "backup", backup)
        assert result.returncode == 0, result.stderr
        assert wait_until(lambda: len(load.statuses) >= 40, timeout=30)  # the load went on
    finally:
        load.stop()
    assert set(load.statuses) == {200}
    live = settled_rows(gateway, len(load.statuses))
    assert stat.S_IMODE(os.stat(str(backup)).st_mode) == 0o600
    assert not os.path.exists(str(backup) + "-wal")  # one self-contained file
    assert_books_balance(backup)
    copied = query(backup, "SELECT id, request_id, status, cost_nanousd FROM usage WHERE status != 'pending'")
    assert 0 < len(copied) < len(live)
    live_by_id = {row["id"]: (row["id"], row["request_id"], row["status"], row["cost_nanousd"]) for row in live}
    assert all(live_by_id[row[0]] == row for row in copied)  # a snapshot of the live books

    # Restore refuses while a gateway uses the database; once it stopped,
    # the restored database's totals are the backup's.
    backup_stats = stats_of(tmp_path, backup)
    refused = cli_run(tmp_path, "restore", backup)
    assert refused.returncode == 1 and "stop them before restoring" in refused.stderr
    gateway.stop()
    result = cli_run(tmp_path, "restore", backup)
    assert result.returncode == 0, result.stderr
    assert stats_of(tmp_path, tmp_path / "gateway.db") == backup_stats
    assert query(tmp_path / "gateway.db", "SELECT COUNT(*) FROM usage") == query(backup, "SELECT COUNT(*) FROM usage")

    # ... and into a fresh place, where a gateway serves the restored key.
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    result = cli_run(tmp_path, "restore", backup, env={"DB_PATH": str(fresh / "gateway.db")})
    assert result.returncode == 0, result.stderr
    assert stats_of(tmp_path, fresh / "gateway.db") == backup_stats
    restored = make_gateway(db_name="fresh/gateway.db")
    assert post(restored, CHAT, body_for(CHAT), secret).status == 200


@pytest.mark.sqlite_only(BACKUP_IS_SQLITES)
def test_backup_refuses_an_existing_file_and_restore_a_broken_one(tmp_path, cli_main):
    llmgw.SQLiteStore(str(tmp_path / "gateway.db")).close()
    existing = tmp_path / "existing.db"
    existing.write_bytes(b"keep me")
    result = cli_main("backup", existing)
    assert result.returncode == 1 and "cannot create" in result.stderr
    assert existing.read_bytes() == b"keep me"
    result = cli_main("restore", existing)
    assert result.returncode == 1 and result.stderr.startswith("error: ")
    assert query(tmp_path / "gateway.db", "PRAGMA quick_check") == [("ok",)]
    result = cli_main("restore", tmp_path / "missing.db")
    assert result.returncode == 1 and "not found" in result.stderr


# ---- doctor ---------------------------------------------------------------------------

def doctor_install(tmp_path, upstream_url, db):
    """config.yaml with both providers at ``upstream_url`` and the database
    ``db`` (tmp_path's, on the test's backend) holding an OpenAI key (the
    canary); no Anthropic key anywhere."""
    config = db.write_config(tmp_path / "config.yaml", {"providers": {"openai": {"base_url": upstream_url},
                                                                      "anthropic": {"base_url": upstream_url}}})
    config.chmod(0o600)
    store = db.open_store()
    store.set_provider_key("openai", OPENAI_KEY)
    store.close()


def findings(result):
    """(result, check, detail) rows of doctor's table."""
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["RESULT", "CHECK", "DETAIL"], result.stdout
    return [tuple(line.split(None, 2)) for line in lines[1:]]


def test_doctor_reports_a_healthy_installation_and_reaches_providers_without_a_key(tmp_path, upstream, db):
    doctor_install(tmp_path, upstream.url, db)
    result = cli_run(tmp_path, "doctor", "--reach")
    assert result.returncode == 0, result.stdout + result.stderr
    rows = findings(result)
    assert {level for level, _, _ in rows} == {"ok", "warn"}, rows
    assert ("ok", "schema", "version %d, current" % llmgw.SCHEMA_VERSION) in rows
    assert ("ok", "keys", "openai: a key from the database") in rows
    assert ("warn", "keys", "anthropic: no key; calls routed to it are refused") in rows
    assert [check for level, check, _ in rows if level == "ok"].count("reach") == 2
    assert upstream.connections_opened == 2
    assert OPENAI_KEY not in result.stdout + result.stderr
    assert OPENAI_KEY[-4:] not in result.stdout  # not even masked


def test_doctor_reach_sends_no_key_and_checks_the_clock_against_the_providers(tmp_path, db):
    """A provider whose Date header is an hour behind; every byte doctor sent is kept."""
    listener = socket.create_server(("127.0.0.1", 0))
    received = []

    def answer():
        for _ in range(2):
            conn, _ = listener.accept()
            with conn:
                data = b""
                while b"\r\n\r\n" not in data:
                    data += conn.recv(4096)
                received.append(data)
                conn.sendall(b"HTTP/1.1 404 Not Found\r\nDate: %s\r\nContent-Length: 0\r\n\r\n"
                             % email.utils.formatdate(time.time() - 3600, usegmt=True).encode())
    thread = threading.Thread(target=answer, daemon=True)
    thread.start()
    doctor_install(tmp_path, "http://127.0.0.1:%d/api" % listener.getsockname()[1], db)
    result = cli_run(tmp_path, "doctor", "--reach", env={"ANTHROPIC_API_KEY": ANTHROPIC_KEY})
    thread.join(10)
    listener.close()
    assert result.returncode == 1
    rows = findings(result)
    assert [check for level, check, _ in rows if level == "ok"].count("reach") == 2, rows
    skews = [detail.split(" s ahead of ") for level, check, detail in rows if level == "FAIL" and check == "clock"]
    assert sorted(provider for _, provider in skews) == ["anthropic's clock", "openai's clock"], rows
    assert all(3595 <= int(seconds) <= 3615 for seconds, _ in skews), rows
    assert len(received) == 2
    for request in received:
        assert request.startswith(b"HEAD /api/ HTTP/1.1\r\n"), request
        assert OPENAI_KEY.encode() not in request and ANTHROPIC_KEY.encode() not in request
        assert b"authorization" not in request.lower() and b"x-api-key" not in request.lower()


def newer_schema(tmp_path, db):
    execute_sql(db, "PRAGMA user_version = %d" % (llmgw.SCHEMA_VERSION + 1) if db.database_url is None else
                "UPDATE settings SET value = '%d' WHERE name = 'schema_version'" % (llmgw.SCHEMA_VERSION + 1))


def usage_from_the_future(tmp_path, db):
    query(db, "INSERT INTO usage (request_id, virtual_key_id, provider, endpoint, streamed, status, started_at)"
              " VALUES ('r1', 'vk_x', 'openai', '/v1/chat/completions', 0, 'ok', ?)", (time.time() + 3600,))


def closed_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


GATEWAY_DB_FILE = pytest.mark.sqlite_only("damages the file gateway.db")


@pytest.mark.parametrize("damage, check, words", [
    pytest.param(lambda tmp_path, db: (tmp_path / "config.yaml").chmod(0o644), "files", "config.yaml has mode 644",
                 id="config-mode"),
    pytest.param(lambda tmp_path, db: (tmp_path / "gateway.db").chmod(0o640), "files", "gateway.db has mode 640",
                 id="database-mode", marks=GATEWAY_DB_FILE),
    pytest.param(lambda tmp_path, db: (tmp_path / "config.yaml").write_text("providers: [unclosed"), "config",
                 "not valid YAML", id="config-yaml"),
    pytest.param(lambda tmp_path, db: (tmp_path / "gateway.db").unlink(), "database", "not found",
                 id="no-database", marks=GATEWAY_DB_FILE),
    pytest.param(lambda tmp_path, db: (tmp_path / "gateway.db").write_bytes(b"x" * 4096), "database", "cannot read",
                 id="not-a-database", marks=GATEWAY_DB_FILE),
    pytest.param(newer_schema, "schema", "newer than this llmgw", id="newer-schema"),
    pytest.param(usage_from_the_future, "clock", "the clock went back", id="clock-back"),
])
def test_doctor_fails_on_each_problem(tmp_path, upstream, db, damage, check, words):
    doctor_install(tmp_path, upstream.url, db)
    damage(tmp_path, db)
    result = cli_run(tmp_path, "doctor")
    assert result.returncode == 1, result.stdout + result.stderr
    assert [detail for level, name, detail in findings(result) if level == "FAIL" and name == check
            and words in detail], result.stdout
    assert upstream.requests == []  # without --reach, no connection


def test_doctor_reach_is_bounded_and_names_an_unreachable_provider(tmp_path, upstream, db):
    doctor_install(tmp_path, "http://127.0.0.1:%d" % closed_port(), db)
    started = time.monotonic()
    result = cli_run(tmp_path, "doctor", "--reach")
    assert time.monotonic() - started < 2 * llmgw.REACH_TIMEOUT + 5
    assert result.returncode == 1
    failed = [detail for level, check, detail in findings(result) if level == "FAIL"]
    assert len(failed) == 2 and all("unreachable" in detail for detail in failed), result.stdout


# ---- schema migrations from every earlier version -------------------------------------

SCHEMAS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "schemas")
sys.path.insert(0, SCHEMAS)
import make_fixture  # noqa: E402


def schema_of(path):
    """Each table's columns (name -> type, not null, default, primary key)
    and each index's definition, whitespace folded."""
    tables = {name: {column[1]: column[2:] for column in query(path, "PRAGMA table_info(%s)" % name)}
              for (name,) in query(path, "SELECT name FROM sqlite_master WHERE type = 'table'")}
    indexes = {name: " ".join(sql.split()) for name, sql in
               query(path, "SELECT name, sql FROM sqlite_master WHERE type = 'index' AND sql IS NOT NULL")}
    return tables, indexes


FIXTURES = sorted(name for name in os.listdir(SCHEMAS) if name.endswith(".db"))


@pytest.mark.parametrize("version", range(1, llmgw.SCHEMA_VERSION))
def test_every_earlier_schema_version_has_a_fixture_database(version):
    assert any(name.startswith("v%d-" % version) for name in FIXTURES), (
        "no fixture database for schema version %d: run python tests/schemas/make_fixture.py REV %d "
        "with REV the last revision at that version" % (version, version))


@pytest.mark.sqlite_only("the fixture databases of tests/schemas are SQLite files")
@pytest.mark.parametrize("fixture", FIXTURES)
def test_a_database_of_every_earlier_schema_migrates_to_todays(tmp_path, make_gateway, fixture):
    shutil.copy(os.path.join(SCHEMAS, fixture), str(tmp_path / "gateway.db"))
    gateway = make_gateway()  # opening migrates
    assert query(gateway.db_path, "PRAGMA user_version") == [(llmgw.SCHEMA_VERSION,)]
    fresh = str(tmp_path / "fresh.db")
    llmgw.SQLiteStore(fresh).close()
    (migrated_tables, migrated_indexes), (fresh_tables, fresh_indexes) = schema_of(gateway.db_path), schema_of(fresh)
    assert migrated_indexes == fresh_indexes
    assert set(migrated_tables) == set(fresh_tables)
    for table, columns in fresh_tables.items():
        retired = {name: spec for name, spec in migrated_tables[table].items() if name not in columns}
        assert {name: migrated_tables[table].get(name) for name in columns} == columns, table
        # A column no longer used may stay (SQLite before 3.35 cannot drop one): nullable, no default.
        assert all(spec[1:] == (0, None, 0) for spec in retired.values()), (table, retired)

    # The old rows are all there; the old key works and its usage adds up.
    usage = query(gateway.db_path, "SELECT request_id, model, request_tokens, response_tokens, cost_nanousd "
                                   "FROM usage ORDER BY id")
    assert usage == [tuple(row) for row in make_fixture.USAGE_ROWS]
    assert gateway.store.provider_keys() == {"openai": "sk-fixture-123456"}
    reply = post(gateway, CHAT, body_for(CHAT), make_fixture.FIXTURE_SECRET)
    assert reply.status == 200, reply
    [stats] = llmgw.usage_stats(gateway.store)
    assert (stats["virtual_key_id"], stats["project_name"], stats["requests"]) == (
        make_fixture.KEY_ID, "fixture project", 3)


@pytest.mark.sqlite_only("PRAGMA user_version (PostgreSQL: test_postgres "
                         "test_a_newer_schema_is_refused_with_a_clear_message)")
def test_a_newer_schema_is_refused_and_left_alone(tmp_path):
    path = str(tmp_path / "gateway.db")
    llmgw.SQLiteStore(path).close()
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA user_version = %d" % (llmgw.SCHEMA_VERSION + 1))
    conn.close()
    with pytest.raises(llmgw.StorageError, match="newer llmgw"):
        llmgw.SQLiteStore(path)
    assert query(path, "PRAGMA user_version") == [(llmgw.SCHEMA_VERSION + 1,)]


# ---- packaging ------------------------------------------------------------------------

@pytest.mark.skipif(tomllib is None, reason="tomllib needs Python 3.11")
def test_pyproject_installs_the_two_files_as_they_are_with_both_commands():
    """The build itself (a wheel installed in a fresh venv) needs PyPI: it
    is a command in the README's Development section."""
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)
    assert project["tool"]["setuptools"]["py-modules"] == ["llmgw", "cli"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "llmgw.__version__"}
    assert project["project"]["scripts"] == {"llmgw": "llmgw:main", "llmgw-cli": "cli:main"}
    assert callable(llmgw.main) and callable(cli.main)
    with open(os.path.join(ROOT, "requirements.txt"), encoding="utf-8") as f:
        assert project["project"]["dependencies"] == [line.strip() for line in f if line.strip()]


def test_python_dash_m_llmgw_serves(tmp_path, upstream, db):
    db.write_config(tmp_path / "config.yaml", {
        "server": {"host": "127.0.0.1", "port": 0}, "providers": {"openai": {"base_url": upstream.url}}})
    db.open_store().close()
    log = tmp_path / "serve.log"
    with open(str(log), "wb") as out:
        process = subprocess.Popen([sys.executable, "-m", "llmgw"], cwd=str(tmp_path), stdout=out,
                                   stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONPATH=ROOT))
    try:
        assert wait_until(lambda: "listening on" in log.read_text(), timeout=15), log.read_text()
        port = int(re.search(r"listening on http://127\.0\.0\.1:(\d+)", log.read_text()).group(1))
        assert call("http://127.0.0.1:%d" % port, "GET", "/health").json()["version"] == llmgw.__version__
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(15) == 0, log.read_text()
