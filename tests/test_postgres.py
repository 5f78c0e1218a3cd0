"""The PostgreSQL backend as several hosts use it: gateway processes on one
database (each stands for a host), started together, killed with -9, one
revoking a key the others serve; migrations and a newer schema. The rest of
the storage behaviour runs on both backends in the modules marked
``both_backends`` (test_budgets, test_books, ...). Skipped, saying why,
where no PostgreSQL cluster can start.
"""

import json
import os
import shutil
import subprocess
import threading
import time

import pytest

import llmgw
from conftest import (ADMIN_TOKEN, CHAT, GatewayProcess, RawClient, admin, answer, assert_json_error, base_config,
                      body_for, chat_body, json_request, ledger, post, query, run_cli, wait_until)

pytestmark = pytest.mark.usefixtures("clean_environment")

PRICING = {"default": {"input": 1000, "output": 1000}}


@pytest.fixture
def database(postgres_databases):
    url = postgres_databases.lease()
    yield url
    postgres_databases.give_back(url)


#: How long a request to a gateway process may take (conftest's answer() allows 2 s): a process's
#: first request opens its pooled connection, and took longer at load 60 with the suite's four
#: test processes running.
PROCESS_TIMEOUT = 10


@pytest.fixture
def instances(tmp_path, upstream, database):
    """``start(n)``: n gateway processes (``python llmgw.py``) on ``database``,
    each as another host would run it; all stopped at the end."""
    started = []
    config = tmp_path / "config.yaml"
    document = base_config(upstream.url, database={"url": database}, pricing=PRICING,
                           server={"host": "127.0.0.1", "port": 0}, logging={"level": "INFO"})
    config.write_text(json.dumps(document))  # JSON is YAML
    env = {"CONFIG_PATH": str(config), "DB_PATH": str(tmp_path / "unused.db"), "LLMGW_ADMIN_TOKEN": ADMIN_TOKEN}

    def start(count):
        processes = [GatewayProcess(tmp_path, env, entry="llmgw", name="host%d" % (len(started) + i)).spawn()
                     for i in range(count)]
        started.extend(processes)
        return [process.wait_ready(30) for process in processes]
    yield start
    for process in started:
        process.cleanup()
    assert not (tmp_path / "unused.db").exists(), "a PostgreSQL gateway opened the SQLite file"


def test_three_instances_admit_exactly_what_the_budget_allows(make_gateway, upstream, instances, database):
    """50 concurrent requests over three processes, a budget that admits 10
    worst cases: exactly 10 reach the provider, the rest are refused 429.
    The provider holds the admitted calls until the others were refused, so
    no settlement frees budget during the burst."""
    here = make_gateway(database={"url": database}, pricing=PRICING)  # creates the keys
    hosts = instances(3)
    body = chat_body(model="gpt-4o-mini-held", max_tokens=100)
    _, probe_key = here.create_key(max_budget=100)
    upstream.release()
    assert answer(hosts[0], CHAT, body, probe_key, timeout=PROCESS_TIMEOUT).status == 200
    reservation = here.rows()[0]["reserved_nanousd"]
    assert reservation > 0
    budget = 10 * reservation + reservation // 2
    record, key = here.create_key(max_budget=budget / 1e9)
    assert query(here, "SELECT max_budget_nanousd FROM virtual_keys WHERE id = ?", (record["id"],)) == [(budget,)]
    upstream.reset()
    replies = []

    def one(index):
        replies.append(post(hosts[index % 3], CHAT, body, key, timeout=30))
    threads = [threading.Thread(target=one, args=(index,)) for index in range(50)]
    for thread in threads:
        thread.start()
    wait_until(lambda: len(replies) >= 40 or len(upstream.requests) > 10, timeout=30)
    upstream.release()
    for thread in threads:
        thread.join(30)
    statuses = sorted(reply.status for reply in replies)
    assert statuses == [200] * 10 + [429] * 40, statuses
    assert len(upstream.requests) == 10
    for reply in replies:
        if reply.status == 429:
            assert_json_error(reply, 429, code="budget_exceeded")
    rows = [row for row in here.rows() if row["virtual_key_id"] == record["id"]]
    assert len(rows) == 10 and {row["status"] for row in rows} == {"ok"}
    assert ledger(here, record["id"]) == (sum(row["cost_nanousd"] for row in rows), 0)


def test_kill9_mid_stream_is_recovered_once_by_a_live_instance(make_gateway, upstream, instances, database,
                                                                monkeypatch):
    """An instance killed (-9) while it streams, registered as on another
    host (so only its heartbeat tells): while the heartbeat is fresh no
    sweep touches its row; once it lapsed, a live instance's sweep marks the
    row interrupted and charges the reservation, once; the other instances'
    calls are all on the books, none twice."""
    monkeypatch.setattr(llmgw.Gateway, "janitor_interval", 0.2)
    hosts = instances(3)
    survivor = make_gateway(database={"url": database}, pricing=PRICING)
    record, key = survivor.create_key(max_budget=5)
    for host in hosts[1:]:
        assert answer(host, CHAT, chat_body(max_tokens=50), key, timeout=PROCESS_TIMEOUT).status == 200
    victim = hosts[0]
    client = RawClient(victim, timeout=10)
    client.send(json_request(CHAT, key, chat_body(model="gpt-4o-mini-slowstream-events50", stream=True,
                                                   max_tokens=50)))
    status, _ = client.read_head(10)
    assert status == 200
    assert client.next_chunk(10), "no first event"
    pending = [row for row in survivor.rows() if row["status"] == "pending"]
    assert len(pending) == 1, pending
    query(survivor, "UPDATE gateway_processes SET host = 'another-host' WHERE owner = ?", (pending[0]["owner"],))
    victim.kill9()
    assert survivor.store.recover_interrupted(survivor.gateway.owner, time.time()) == 0  # heartbeat still fresh
    assert [row["status"] for row in survivor.rows() if row["id"] == pending[0]["id"]] == ["pending"]
    query(survivor, "UPDATE gateway_processes SET heartbeat_at = heartbeat_at - 31 WHERE owner = ?",
          (pending[0]["owner"],))  # 30 s of silence: the heartbeat lapsed
    rows = survivor.wait_for_rows(lambda rows: all(row["status"] != "pending" for row in rows), timeout=10)
    [interrupted] = [row for row in rows if row["id"] == pending[0]["id"]]
    assert (interrupted["status"], interrupted["cost_nanousd"], interrupted["reserved_nanousd"]) == (
        "interrupted", pending[0]["reserved_nanousd"], 0)
    assert len(rows) == 3 and len({row["request_id"] for row in rows}) == 3
    # Another sweep (and the other instances' own, at their start) changes nothing.
    survivor.store.recover_interrupted(survivor.gateway.owner, time.time())
    assert survivor.rows() == rows
    assert ledger(survivor, record["id"]) == (sum(row["cost_nanousd"] for row in rows), 0)
    client.sock.close()


def test_a_revoke_through_one_instance_holds_on_the_others_from_the_next_request(instances, upstream, make_gateway,
                                                                                  database):
    hosts = instances(3)
    here = make_gateway(database={"url": database})
    record, key = here.create_key()
    for host in hosts:  # every instance has the key cached
        assert answer(host, CHAT, body_for(CHAT), key, timeout=PROCESS_TIMEOUT).status == 200
    revoked = admin(hosts[0], "DELETE", "/admin/virtual-keys/" + record["id"])
    assert revoked.status == 200, revoked
    for host in hosts[1:] + hosts[:1]:
        assert_json_error(answer(host, CHAT, body_for(CHAT), key, timeout=PROCESS_TIMEOUT), 401)
    assert len(upstream.requests) == 3


def test_parallel_slots_are_shared_and_a_dead_instances_slots_return(instances, upstream, make_gateway, database):
    """max_parallel 1 over two instances: while one holds the slot the
    other refuses (once it has synced, a quarter second); when the holder
    is killed, its lease lapses (KeyLimits.heartbeat) and the slot returns."""
    first, second = instances(2)
    here = make_gateway(database={"url": database})
    record, key = here.create_key(max_parallel=1)
    held = threading.Thread(target=lambda: _ignore(post, first, CHAT, body_for(CHAT, model="gpt-4o-mini-held"), key,
                                                   timeout=30))
    held.start()
    assert upstream.wait_for_requests(1, timeout=10)

    def refused():
        reply = post(second, CHAT, body_for(CHAT), key)
        return reply if reply.status == 429 else None
    reply = wait_until(refused, timeout=5, interval=0.1)
    assert reply is not None, "the other instance never counted the slot in use"
    assert "in flight" in reply.json()["error"]["message"]
    first.kill9()
    upstream.release()
    started = time.monotonic()
    assert wait_until(lambda: post(second, CHAT, body_for(CHAT), key).status == 200, timeout=15, interval=0.2)
    assert time.monotonic() - started < llmgw.KeyLimits.heartbeat + 5
    held.join(5)


def _ignore(function, *args, **kwargs):
    try:
        function(*args, **kwargs)
    except OSError:
        pass


# ---- migrations ------------------------------------------------------------------------

def test_instances_starting_together_migrate_once(postgres_databases):
    url = postgres_databases.cluster.create_database("m")
    database = llmgw.parse_config({"database": {"url": url}}).database
    stores, errors = [], []

    def open_one():
        try:
            stores.append(llmgw.PostgresStore(database))
        except Exception as exc:  # reported below
            errors.append(exc)
    threads = [threading.Thread(target=open_one) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == [] and len(stores) == 4
    assert query(url, "SELECT value FROM settings WHERE name = 'schema_version'") == [(str(llmgw.SCHEMA_VERSION),)]
    stores[0].create_key("works", {})
    for store in stores:
        store.close()


def test_a_schema_8_database_migrates_its_calls_that_cost_nothing_apart(postgres_databases):
    """Schema 9's step on PostgreSQL: it failed there (an integer measure
    as a WHERE condition), and grouped rows by hour with PostgreSQL's
    rounding CAST, which put a row of 59.7 s past the hour in the next."""
    url = postgres_databases.cluster.create_database("v8")
    database = llmgw.parse_config({"database": {"url": url}}).database
    store = llmgw.PostgresStore(database)
    key_id = store.create_key("old", {})[0]["id"]
    hour = int(time.time()) // 3600 * 3600 - 7200
    result = dict.fromkeys(llmgw.USAGE_RESULT_COLUMNS, 0)
    result.update(status="ok", http_status=200, usage_source="none", response_id=None, finished_at=hour + 3599.8)
    for number, endpoint in enumerate(("/v1/messages/count_tokens", "/v1/messages")):
        row_id, _ = store.begin_usage("r%d" % number, "o", key_id, "anthropic", endpoint, "claude-haiku-4-5", False,
                                      hour + 3599.7)
        store.finish_usage(row_id, result)
    store.close()
    conn = postgres_databases.cluster.connect(url.rsplit("/", 1)[1])  # back to schema 8: no other_calls
    cursor = conn.cursor()
    for table in ("usage_weeks", "usage_days", "usage_hours", "usage_totals"):
        cursor.execute("UPDATE %s SET requests = requests + other_calls" % table)
        cursor.execute("ALTER TABLE %s DROP COLUMN other_calls" % table)
    cursor.execute("ALTER TABLE usage DROP COLUMN response_id")
    cursor.execute("ALTER TABLE virtual_keys DROP COLUMN budget_admission")
    cursor.execute("UPDATE settings SET value = '8' WHERE name = 'schema_version'")
    conn.commit()
    conn.close()
    llmgw.PostgresStore(database).close()
    assert query(url, "SELECT value FROM settings WHERE name = 'schema_version'") == [(str(llmgw.SCHEMA_VERSION),)]
    for table, column in (("usage_hours", "hour"), ("usage_days", "day"), ("usage_weeks", "week")):
        assert [tuple(row) for row in query(url, "SELECT requests, other_calls FROM %s" % table)] == [(1, 1)], table
    assert sorted(tuple(row) for row in query(url, "SELECT requests, other_calls FROM usage_totals")) == [(1, 1)]


def test_a_newer_schema_is_refused_with_a_clear_message(postgres_databases, tmp_path):
    url = postgres_databases.lease()
    try:
        query(url, "UPDATE settings SET value = ? WHERE name = 'schema_version'", (str(llmgw.SCHEMA_VERSION + 1),))
        database = llmgw.parse_config({"database": {"url": url}}).database
        with pytest.raises(llmgw.StorageError, match="newer llmgw .schema version %d; this llmgw knows %d.: upgrade"
                                                     % (llmgw.SCHEMA_VERSION + 1, llmgw.SCHEMA_VERSION)):
            llmgw.PostgresStore(database)
    finally:
        query(url, "UPDATE settings SET value = ? WHERE name = 'schema_version'", (str(llmgw.SCHEMA_VERSION),))
        postgres_databases.give_back(url)


def test_a_password_in_the_url_is_refused_and_pg8000_is_named_when_missing(monkeypatch):
    with pytest.raises(llmgw.ConfigError, match="keep it out of config.yaml"):
        llmgw.parse_config({"database": {"url": "postgresql://llmgw:secret@db/llmgw"}})
    with pytest.raises(llmgw.ConfigError, match=r"\$\{ENV_VAR\}"):
        llmgw.parse_config({"database": {"url": "postgresql://llmgw@db/llmgw", "password": "literal"}})
    monkeypatch.setitem(__import__("sys").modules, "pg8000", None)  # an import of it fails
    config = llmgw.parse_config({"database": {"url": "postgresql://llmgw@127.0.0.1:1/llmgw"}})
    with pytest.raises(llmgw.ConfigError, match="needs pg8000: pip install pg8000"):
        llmgw.open_store(config.database)


def test_the_cli_and_doctor_work_on_postgresql(tmp_path, database):
    (tmp_path / "config.yaml").write_text(json.dumps({"database": {"url": database}}))
    env = {"CONFIG_PATH": str(tmp_path / "config.yaml"), "DB_PATH": str(tmp_path / "unused.db")}
    os.chmod(tmp_path / "config.yaml", 0o600)
    init = run_cli(["init"], tmp_path, env, check=True)
    assert "Database ready at %s." % database in init.stdout
    created = json.loads(run_cli(["keys", "create", "cli", "--budget", "2", "--output", "json"], tmp_path, env,
                                 check=True).stdout)
    listed = json.loads(run_cli(["keys", "list", "--output", "json"], tmp_path, env, check=True).stdout)
    assert [key["id"] for key in listed] == [created["id"]]
    doctor = run_cli(["doctor"], tmp_path, env)
    assert "ok      database  %s: reachable" % database in doctor.stdout, doctor.stdout
    assert "ok      schema    version %d, current" % llmgw.SCHEMA_VERSION in doctor.stdout, doctor.stdout
    backup = run_cli(["backup", str(tmp_path / "copy.db")], tmp_path, env)
    assert backup.returncode == 1 and "pg_dump" in backup.stderr
    assert not (tmp_path / "unused.db").exists()


def test_migrate_db_copies_sqlite_into_postgresql_verified_by_totals(make_gateway, upstream, tmp_path, database):
    """A SQLite database with keys, budgets, usage, prices and audit, copied
    by ``cli.py migrate-db``: the totals agree, and a gateway on PostgreSQL
    goes on from there (the key works, its spend continues, rows keep ids)."""
    pricing = {"default": {"input": 1000, "output": 1000}}
    old = make_gateway(database={}, pricing=pricing, db_name="old.db")  # SQLite, whatever the test's backend
    assert old.database_url is None
    record, key = old.create_key(max_budget=5)
    for text in ("one", "two", "three"):
        assert answer(old, CHAT, chat_body(text=text), key).status == 200
    old.store.import_prices({"acme-9": {"input": 1, "output": 2}}, "pack")
    old.store.topup(record["id"], 10 ** 9, time.time())
    spent_before = ledger(old, record["id"])
    rows_before = old.rows()
    old.stop()
    query(old.db_path, "DELETE FROM gateway_processes")  # stopped: its registration is gone
    result = run_cli(["migrate-db", "--from", "sqlite:///" + old.db_path, "--to", database], tmp_path, {})
    assert result.returncode == 0, result.stderr
    assert "the totals agree" in result.stdout
    assert "usage rows                3" in result.stdout or "usage rows" in result.stdout
    new = make_gateway(database={"url": database}, pricing=pricing)
    assert ledger(new, record["id"]) == spent_before
    assert [(r["id"], r["request_id"], r["cost_nanousd"]) for r in new.rows()] == [
        (r["id"], r["request_id"], r["cost_nanousd"]) for r in rows_before]
    assert answer(new, CHAT, chat_body(text="four"), key).status == 200
    rows = new.rows()
    assert rows[-1]["id"] == rows_before[-1]["id"] + 1
    assert ledger(new, record["id"])[0] == spent_before[0] + rows[-1]["cost_nanousd"]
    assert new.store.imported_prices()["acme-9"][1] == "pack"
    assert [entry["action"] for entry in new.store.audit_log()][:2] == ["key_topped_up", "prices_imported"]
    # Into a database that is no longer empty: refused, nothing changed.
    again = run_cli(["migrate-db", "--from", "sqlite:///" + old.db_path, "--to", database], tmp_path, {})
    assert again.returncode == 1 and "already holds keys or usage" in again.stderr
    assert len(new.rows()) == 4


def test_an_unreachable_database_at_start_is_one_line_naming_it(tmp_path):
    pytest.importorskip("pg8000", reason="pg8000 is not installed")
    (tmp_path / "config.yaml").write_text(json.dumps({"database": {"url": "postgresql://llmgw@127.0.0.1:9/none"}}))
    env = {"CONFIG_PATH": str(tmp_path / "config.yaml"), "DB_PATH": str(tmp_path / "unused.db")}
    for args in (["keys", "list"], ["serve", "--port", "0"]):
        result = run_cli(args, tmp_path, env, timeout=60)
        assert result.returncode == 1, result
        lines = result.stderr.strip().splitlines()
        assert lines[-1].startswith("error: cannot connect to database postgresql://llmgw@127.0.0.1:9/none: "), lines


# ---- the connection pool -----------------------------------------------------------------

#: The gateway's connections to the test's database (not this query's).
GATEWAY_CONNECTIONS = ("SELECT wait_event_type FROM pg_stat_activity WHERE datname = current_database() "
                       "AND application_name = 'llmgw' AND pid != pg_backend_pid()")


def test_a_full_pool_bounds_connections_and_the_wait_for_one(make_gateway, postgres_databases, database):
    """pool_size 2: once PostgreSQL holds both connections (two requests
    wait at the usage table, locked by another session), four more requests
    open no third: each waits pool_timeout for one and gets a 503 in the
    API's shape while the lock is still held; the two at the lock finish
    once it goes."""
    gateway = make_gateway(database={"url": database, "pool_size": 2, "pool_timeout": 0.5})
    _, key = gateway.create_key()
    assert answer(gateway, CHAT, body_for(CHAT), key).status == 200
    locker = postgres_databases.cluster.connect(database.rsplit("/", 1)[1])
    locker.cursor().execute("BEGIN")
    locker.cursor().execute("LOCK TABLE usage IN ACCESS EXCLUSIVE MODE")
    replies, seen = [], []

    def one():
        replies.append(post(gateway, CHAT, body_for(CHAT), key, timeout=30))

    def connections():
        seen.append(sorted(row[0] or "" for row in query(database, GATEWAY_CONNECTIONS)))
        return seen[-1]

    def four_refused():
        connections()
        return len(replies) >= 4
    threads = [threading.Thread(target=one) for _ in range(6)]
    try:
        for thread in threads[:2]:
            thread.start()
        assert wait_until(lambda: connections() == ["Lock", "Lock"], timeout=20), seen
        for thread in threads[2:]:
            thread.start()
        assert wait_until(four_refused, timeout=20), (replies, seen)
        assert max(len(sample) for sample in seen) == 2, seen
        assert connections() == ["Lock", "Lock"] and len(replies) == 4, (replies, seen)  # the lock still holds
        for reply in replies:
            body = assert_json_error(reply, 503, code="storage_unavailable")
            assert "connections are all busy" in body["error"]["message"]
    finally:
        locker.cursor().execute("ROLLBACK")
        locker.close()
    for thread in threads:
        thread.join(30)
    assert sorted(reply.status for reply in replies) == [200, 200, 503, 503, 503, 503]
    assert len(query(database, GATEWAY_CONNECTIONS)) <= 2


# ---- TLS: sslmode ------------------------------------------------------------------------

def _self_signed(directory, name):
    """A self-signed certificate for 127.0.0.1 made by openssl: (certificate, key) paths."""
    certificate, key = directory / (name + ".crt"), directory / (name + ".key")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                    "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(certificate)], check=True, capture_output=True, timeout=60)
    return str(certificate), str(key)


@pytest.fixture
def tls_certificate(postgres_databases, tmp_path):
    """The session's cluster offers TLS for this test, with a self-signed
    certificate for 127.0.0.1 (the path returned: the CA to trust)."""
    if shutil.which("openssl") is None:
        pytest.skip("no openssl command to make a certificate with")
    certificate, key = _self_signed(tmp_path, "server")
    postgres_databases.cluster.serve_tls(certificate, key)
    yield certificate
    postgres_databases.cluster.serve_tls(None, None)


#: The TLS of a gateway's own connections to the test's database (not this query's).
GATEWAY_TLS = ("SELECT s.ssl FROM pg_stat_ssl s JOIN pg_stat_activity a ON a.pid = s.pid WHERE a.datname = "
               "current_database() AND a.application_name = 'llmgw' AND a.pid != pg_backend_pid()")


def test_sslmode_is_honoured_against_a_tls_server(tls_certificate, make_gateway, database, tmp_path):
    """require, prefer and no sslmode (prefer is libpq's default): the
    gateway's connections are encrypted where the server offers TLS;
    disable: they are not, though it offers it; verify-full trusts only the
    CA sslrootcert names, and checks the name; a refusal says why."""
    for sslmode, encrypted in (("?sslmode=require", True), ("?sslmode=prefer", True), ("", True),
                               ("?sslmode=disable", False)):
        gateway = make_gateway(database={"url": database + sslmode})
        _, key = gateway.create_key()
        assert answer(gateway, CHAT, body_for(CHAT), key).status == 200
        assert {row[0] for row in query(database, GATEWAY_TLS)} == {encrypted}, sslmode
        gateway.stop()
        assert wait_until(lambda: not query(database, GATEWAY_TLS), timeout=20)  # its connections closed
    own_ca = "?sslmode=verify-full&sslrootcert=" + tls_certificate
    assert query(database + own_ca, "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()") == [(True,)]
    other_ca, _ = _self_signed(tmp_path, "other")
    by_name = database.replace("@127.0.0.1:", "@localhost:")  # the certificate names 127.0.0.1 only
    for url, why in ((database + "?sslmode=verify-full&sslrootcert=" + other_ca, "self-signed certificate"),
                     (database + "?sslmode=verify-ca", "self-signed certificate"),  # the system's CAs
                     (by_name + own_ca, "mismatch")):
        with pytest.raises(llmgw.StorageError) as refused:
            llmgw.open_store(llmgw.parse_config({"database": {"url": url}}).database, {})
        assert refused.value.message.startswith("cannot connect to database %s: the server's TLS certificate is not "
                                                "trusted (" % url.split("?")[0])
        assert why in refused.value.message
    assert query(by_name + own_ca.replace("verify-full", "verify-ca"), "SELECT 1") == [(1,)]  # verify-ca: no name


def test_sslmode_settings_pg8000_cannot_honour_are_refused():
    for url, message in (("?sslmode=allow", "sslmode allow .* is not possible with pg8000"),
                         ("?sslmode=sure", "sslmode 'sure' is not one of disable, prefer, require"),
                         ("?sslmode=prefer&sslrootcert=ca.pem", "sslrootcert needs sslmode require"),
                         ("?connect_timeout=5", "unknown parameter 'connect_timeout'")):
        with pytest.raises(llmgw.ConfigError, match=message):
            llmgw.parse_config({"database": {"url": "postgresql://llmgw@db/llmgw" + url}})
    missing = llmgw.parse_config({"database": {"url": "postgresql://llmgw@db/llmgw?sslmode=require&sslrootcert=/no"}})
    with pytest.raises(llmgw.ConfigError, match="sslrootcert /no: No such file"):
        llmgw.postgres_connect_args(missing.database, {})
