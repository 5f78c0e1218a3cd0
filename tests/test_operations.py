"""Operations: backup and restore, ``cli.py doctor``, schema migrations from
every earlier schema (fixture databases in tests/schemas/), packaging.

Backups are taken by ``python cli.py backup`` as a child process while the
real gateway serves a steady load; the copies are read back with sqlite3.
"""

import json
import os
import shutil
import sqlite3
import stat
import sys
import threading

import pytest

from conftest import CHAT, body_for, paths_env, post, run_cli, settled_rows, wait_until

import llmgw

pytestmark = pytest.mark.usefixtures("clean_environment")


def cli_run(tmp_path, *args, env=None):
    return run_cli([str(arg) for arg in args], tmp_path, dict(paths_env(tmp_path), **(env or {})))


def query(path, sql, params=()):
    conn = sqlite3.connect(str(path))
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


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


def test_backup_refuses_an_existing_file_and_restore_a_broken_one(tmp_path, cli_main):
    llmgw.Store(str(tmp_path / "gateway.db")).close()
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


@pytest.mark.parametrize("fixture", FIXTURES)
def test_a_database_of_every_earlier_schema_migrates_to_todays(tmp_path, make_gateway, fixture):
    shutil.copy(os.path.join(SCHEMAS, fixture), str(tmp_path / "gateway.db"))
    gateway = make_gateway()  # opening migrates
    assert query(gateway.db_path, "PRAGMA user_version") == [(llmgw.SCHEMA_VERSION,)]
    fresh = str(tmp_path / "fresh.db")
    llmgw.Store(fresh).close()
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


def test_a_newer_schema_is_refused_and_left_alone(tmp_path):
    path = str(tmp_path / "gateway.db")
    llmgw.Store(path).close()
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA user_version = %d" % (llmgw.SCHEMA_VERSION + 1))
    conn.close()
    with pytest.raises(llmgw.StorageError, match="newer llmgw"):
        llmgw.Store(path)
    assert query(path, "PRAGMA user_version") == [(llmgw.SCHEMA_VERSION + 1,)]
