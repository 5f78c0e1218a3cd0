"""The books under storage faults and odd timing, regression tests of the
review of llmgw.py (one test per finding, named after it):

* B4  a database that refuses writes (SQLite trigger) at settle and at begin;
      on PostgreSQL, a database that cannot be reached.
* B7  ``stats --reprice --apply`` on an ``interrupted`` row.
* B8  a budget set while a call is in flight.
* B9  a row marked ``interrupted`` while its owner still runs.

These tests build unbalanced states on purpose, so their gateways' books are
not checked after they stop.
"""

import json
import logging
import threading
import time
import urllib.parse

import pytest

import llmgw
from conftest import (ADMIN_TOKEN, CHAT, GatewayProcess, admin, answer, assert_json_error, base_config, body_for, call,
                      database_section, execute_sql, expected_columns, expected_cost, health_recovers, ledger,
                      paths_env, post, query, settled_rows, sse_events, wait_until)

pytestmark = pytest.mark.both_backends

# ---- B4: the database refuses writes -------------------------------------------------

@pytest.mark.sqlite_only("a SQLite trigger refuses the writes; test_b4_unreachable_postgresql_fails_closed")
def test_b4_failing_settle_still_answers_and_failing_begin_is_503_storage_unavailable(make_gateway, upstream,
                                                                                      caplog):
    caplog.set_level(logging.ERROR, logger="llmgw")
    gateway = make_gateway(server={"max_connections": 2})
    record, key = gateway.create_key(max_parallel=1)
    execute_sql(gateway.db_path, "CREATE TRIGGER refuse_settle BEFORE UPDATE ON usage "
                                 "BEGIN SELECT RAISE(ABORT, 'simulated I/O error'); END")

    # The provider answered: the client gets that answer, the failure is logged.
    whole = answer(gateway, CHAT, body_for(CHAT), key)
    assert whole.status == 200, whole
    assert whole.json()["usage"] == upstream.reported[-1]["usage"]
    for _ in range(2):
        streamed = answer(gateway, CHAT, body_for(CHAT, stream=True), key)
        assert streamed.status == 200, streamed
        assert sse_events(streamed.body)[-1] == (None, "[DONE]"), streamed.body[-200:]
    assert len(upstream.requests) == 3
    assert any(r.levelno >= logging.ERROR and r.name.startswith("llmgw") for r in caplog.records), \
        "the failed settlement was not logged"
    assert health_recovers(gateway), "connection slots leaked: /health is refused"

    # The pending row cannot be written: refused before anything reaches the provider.
    execute_sql(gateway.db_path, "DROP TRIGGER refuse_settle",
                "CREATE TRIGGER refuse_begin BEFORE INSERT ON usage "
                "BEGIN SELECT RAISE(ABORT, 'simulated I/O error'); END")
    refused = answer(gateway, CHAT, body_for(CHAT), key)
    assert_json_error(refused, 503, code="storage_unavailable")
    assert len(upstream.requests) == 3
    assert health_recovers(gateway), "connection slots leaked: /health is refused"

    # Storage back: the key (max_parallel=1) has no in-flight slot left over.
    execute_sql(gateway.db_path, "DROP TRIGGER refuse_begin")
    assert answer(gateway, CHAT, body_for(CHAT), key).status == 200


def test_b4_unreachable_postgresql_fails_closed(make_gateway, upstream, backend):
    """Every connection to the database cut, and no new one allowed: a
    request is refused 503 before anything reaches the provider, the
    server keeps serving, and it recovers once the database is back."""
    if backend != "postgresql":
        pytest.skip("PostgreSQL only (SQLite: the test above)")
    gateway = make_gateway()
    record, key = gateway.create_key(max_budget=5)
    assert answer(gateway, CHAT, body_for(CHAT), key).status == 200
    url = urllib.parse.urlsplit(gateway.database_url)
    database, admin_url = url.path.lstrip("/"), url._replace(path="/postgres").geturl()
    query(admin_url, "ALTER DATABASE %s ALLOW_CONNECTIONS false" % database)
    try:
        query(admin_url, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = ?", (database,))
        for path in (CHAT, CHAT):  # the first finds its pooled connection dead, the next cannot connect
            refused = answer(gateway, path, body_for(path), key)
            assert_json_error(refused, 503, code="storage_unavailable")
        assert len(upstream.requests) == 1
        assert health_recovers(gateway), "connection slots leaked: /health is refused"
    finally:
        query(admin_url, "ALTER DATABASE %s ALLOW_CONNECTIONS true" % database)
    assert answer(gateway, CHAT, body_for(CHAT), key).status == 200
    assert len(upstream.requests) == 2
    assert ledger(gateway, record["id"])[1] == 0


# ---- B7: re-pricing an interrupted row -----------------------------------------------

def test_b7_reprice_apply_leaves_an_interrupted_rows_charge_alone(tmp_path, make_gateway, upstream, cli_main,
                                                                  databases):
    pricing = {"default": {"input": 1, "output": 2}}
    url = databases(tmp_path / "gateway.db")
    (tmp_path / "config.yaml").write_text(json.dumps(base_config(upstream.url, pricing=pricing,
                                                                 **database_section(url))))
    cli_main("init", check=True)
    created = json.loads(cli_main("keys", "create", "interrupted", "--budget", "5", "--output", "json",
                                  check=True).stdout)
    child = GatewayProcess(tmp_path, paths_env(tmp_path))
    try:
        child.start()
        hanging = threading.Thread(target=lambda: _ignore_errors(
            post, child, CHAT, body_for(CHAT, model="gpt-4o-mini-hang", max_tokens=100), created["key"], timeout=5))
        hanging.start()
        assert wait_until(lambda: [r for r in query(url or tmp_path / "gateway.db", "SELECT status FROM usage")
                                   if r[0] == "pending"]), "no pending row"
        child.kill9()
        hanging.join(5)
    finally:
        child.cleanup()

    gateway = make_gateway(pricing=pricing)  # its start marks the dead process's row interrupted
    rows = gateway.wait_for_rows(lambda rows: rows and rows[0]["status"] == "interrupted", timeout=3)
    interrupted = rows[0]
    assert interrupted["status"] == "interrupted", interrupted
    charged = interrupted["cost_nanousd"]
    assert charged > 0, interrupted  # the reservation was charged
    spend_before = ledger(gateway, created["id"])
    assert spend_before == (charged, 0)

    cli_main("stats", "--reprice", "--apply", "--output", "json", check=True)
    after = gateway.rows()[0]
    assert (after["status"], after["cost_nanousd"]) == ("interrupted", charged), after
    assert ledger(gateway, created["id"]) == spend_before


def _ignore_errors(function, *args, **kwargs):
    try:
        function(*args, **kwargs)
    except OSError:
        pass


# ---- B8: a budget set while a call is in flight --------------------------------------

@pytest.mark.parametrize("how", ["admin-patch", "store-update"])
def test_b8_a_call_in_flight_when_a_budget_is_set_counts_towards_it(make_gateway, upstream, how):
    gateway = make_gateway(environ={"LLMGW_ADMIN_TOKEN": ADMIN_TOKEN},
                           pricing={"default": {"input": 1000, "output": 1000}})
    record, key = gateway.create_key()  # no budget yet
    results = []
    flight = threading.Thread(target=lambda: results.append(
        answer(gateway, CHAT, body_for(CHAT, model="gpt-4o-mini-held"), key, timeout=10)))
    flight.start()
    assert gateway.wait_for_rows(lambda rows: rows and rows[0]["status"] == "pending", timeout=2)
    if how == "admin-patch":
        patched = admin(gateway, "PATCH", "/admin/virtual-keys/" + record["id"], {"max_budget": 10})
        assert patched.status == 200, patched
    else:
        assert gateway.store.update_key(record["id"], {"max_budget_nanousd": 10 * 10 ** 9}, time.time())
    upstream.release()  # the call ends only after the budget was set
    flight.join(5)
    assert results and results[0].status == 200, results

    row, = settled_rows(gateway)
    cost = expected_cost(expected_columns(CHAT, upstream.reported[-1]["usage"]), 1000, 1000)
    assert (row["status"], row["cost_nanousd"]) == ("ok", cost), row
    assert ledger(gateway, record["id"]) == (cost, 0)
    info = call(gateway, "GET", "/v1/key/info", key=key).json()
    assert (info["spent"], info["reserved"]) == (llmgw.nanousd_to_usd(cost), 0), info


# ---- B9: a row interrupted while its owner still runs --------------------------------

def test_b9_a_row_interrupted_under_its_running_owner_is_not_settled_twice(make_gateway, upstream):
    gateway = make_gateway(pricing={"default": {"input": 1000, "output": 1000}})
    record, key = gateway.create_key(max_budget=5)
    results = []
    flight = threading.Thread(target=lambda: results.append(
        answer(gateway, CHAT, body_for(CHAT, model="gpt-4o-mini-held", max_tokens=10), key, timeout=10)))
    flight.start()
    rows = gateway.wait_for_rows(lambda rows: rows and rows[0]["status"] == "pending", timeout=2)
    assert rows and rows[0]["status"] == "pending", rows
    pending = rows[0]
    reserved = pending["reserved_nanousd"]
    assert reserved > 0
    # What recovery does to a row it believes abandoned (say another
    # container with the same pid): charge the reservation in full.
    marked = query(gateway, "UPDATE usage SET status = 'interrupted', finished_at = ?, "
                            "cost_nanousd = reserved_nanousd, usage_source = 'estimated', reserved_nanousd = 0 "
                            "WHERE id = ? AND status = 'pending' RETURNING id", (time.time(), pending["id"]))
    assert marked, "the held call finished before the test could interrupt its row"
    query(gateway, "UPDATE key_spend SET reserved_nanousd = reserved_nanousd - ?, spent_nanousd = spent_nanousd + ? "
                   "WHERE key_id = ? AND period_start = ?",
                   (reserved, reserved, record["id"], pending["budget_period_start"]))
    upstream.release()  # the provider answers only now: the owner settles after the interruption
    flight.join(5)
    assert results and results[0].status == 200, results

    row, = settled_rows(gateway)
    actual = expected_cost(expected_columns(CHAT, upstream.reported[-1]["usage"]), 1000, 1000)
    assert row["cost_nanousd"] in (reserved, actual), row
    spent, still_reserved = ledger(gateway, record["id"])
    assert still_reserved == 0 and spent >= 0, (spent, still_reserved)
    assert spent == row["cost_nanousd"], "charged %d for a row of cost %d" % (spent, row["cost_nanousd"])


# ---- settlement is idempotent --------------------------------------------------------

def test_a_replayed_settlement_changes_nothing(make_gateway, upstream):
    """Settling a row that is settled already (a retried commit, a second
    process) changes neither the row, its rollups nor the key's spend."""
    gateway = make_gateway(pricing={"default": {"input": 1000, "output": 1000}})
    record, key = gateway.create_key(max_budget=5)
    assert answer(gateway, CHAT, body_for(CHAT), key).status == 200
    row, = settled_rows(gateway)
    books = (gateway.rows(), ledger(gateway, record["id"]), gateway.store.usage_stats("key"))
    result = {column: row[column] for column in llmgw.USAGE_RESULT_COLUMNS}
    replayed = dict(result, cost_nanousd=row["cost_nanousd"] * 3, status="ok")
    assert gateway.store.finish_usage(row["id"], replayed, record["id"], row["reserved_nanousd"],
                                      row["budget_period_start"], alert_thresholds=(1,)) == 0
    assert (gateway.rows(), ledger(gateway, record["id"]), gateway.store.usage_stats("key")) == books
