"""The request log and hourly rollups: stats answered from rollups equal the
usage rows to the nano-dollar, however the range cuts the hours; pruning,
migration, re-pricing and crash recovery keep them equal; the log pages by
cursor, filters, and exports CSV (CLI and admin API alike).

The oracle is the plain sum over usage rows that stats ran before rollups,
written out here in Python over the rows read back (either backend),
independently of llmgw's rollup SQL.
"""

import csv
import datetime
import io
import json
import sqlite3

import pytest

from conftest import ADMIN_TOKEN, CHAT, COUNT_TOKENS, MESSAGES, MODELS, admin, call, cli_env, execute_sql, post, query

import cli
import llmgw

pytestmark = pytest.mark.usefixtures("clean_environment")

HOUR = 3600
DAY = 86400
#: 2026-11-02T00:00:00Z, a Monday: the first request lands 10 minutes after.
T0 = 1793577600

#: The endpoints whose calls cost nothing: ``other_calls``, not ``requests``.
FREE_ENDPOINTS = ("/v1/messages/count_tokens", "/v1/models", "/v1/models/{model}", "/v1/moderations",
                  "/v1/responses/input_tokens", "/v1/responses/{response_id}", "/v1/responses/{response_id}/cancel",
                  "/v1/responses/{response_id}/input_items")
#: What each row adds to STATS_TOTAL_FIELDS (a missing number adds nothing, as SQL's SUM skips a NULL).
ORACLE_TOTALS = (
    lambda u: u["attempt"] == 1 and u["endpoint"] not in FREE_ENDPOINTS,
    lambda u: u["attempt"] == 1 and u["endpoint"] in FREE_ENDPOINTS,
    lambda u: 1, lambda u: u["attempt_kind"] == "retry", lambda u: u["attempt_kind"] == "fallback",
    lambda u: u["status"] not in ("ok", "pending"), lambda u: u["request_tokens"], lambda u: u["response_tokens"],
    lambda u: u["cache_read_tokens"],
    lambda u: None if u["cache_write_tokens"] is None else u["cache_write_tokens"] + u["cache_write_1h_tokens"],
    lambda u: u["reasoning_tokens"], lambda u: u["cost_nanousd"],
    lambda u: u["priced"] == 0 and (u["request_tokens"] or 0) + (u["response_tokens"] or 0) > 0,
    lambda u: u["usage_source"] == "estimated",
    lambda u: u["cost_nanousd"] if u["usage_source"] == "estimated" else 0)
ORACLE_GROUPS = {
    "key": lambda u: (u["virtual_key_id"], u["project_name"]), "project": lambda u: (u["project_name"],),
    "model": lambda u: (u["model"],), "provider": lambda u: (u["provider"],),
    "day": lambda u: (datetime.datetime.fromtimestamp(u["started_at"], datetime.timezone.utc).strftime("%Y-%m-%d"),),
    "label:team": lambda u: (json.loads(u["key_metadata"] or "{}").get("team"),),
}


def oracle_stats(target, group_by, since=None, until=None, project=None):
    """Stats summed in Python straight from the usage rows of ``target``'s
    database (either backend), as store.usage_stats shapes them."""
    groups = {}
    for u in query(target, "SELECT u.*, k.project_name, k.metadata AS key_metadata FROM usage u "
                           "LEFT JOIN virtual_keys k ON k.id = u.virtual_key_id"):
        u = u.as_dict()
        if ((since is not None and u["started_at"] < since) or (until is not None and u["started_at"] >= until)
                or (project is not None and u["project_name"] != project)):
            continue
        sums = groups.setdefault(ORACLE_GROUPS[group_by](u), [0] * len(ORACLE_TOTALS))
        for index, measure in enumerate(ORACLE_TOTALS):
            sums[index] += measure(u) or 0
    result = []
    for group, sums in groups.items():
        totals = dict(zip(llmgw.STATS_TOTAL_FIELDS, sums))
        totals["estimated_cost"] = llmgw.nanousd_to_usd(totals.pop("cost_nanousd"))
        totals["estimated_usage_cost"] = llmgw.nanousd_to_usd(totals.pop("estimated_usage_cost_nanousd"))
        result.append((group, totals))
    return sorted(result, key=repr)


def rollup_stats(store, group_by, since=None, until=None, project=None):
    return shaped_as_oracle(store.usage_stats(group_by, since, until, project), group_by)


def shaped_as_oracle(rows, group_by):
    names = {"key": ("virtual_key_id", "project_name"), "project": ("project_name",),
             "label:team": ("label",)}.get(group_by, (group_by,))
    return sorted(((tuple(row.pop(name) for name in names), row) for row in rows), key=repr)


class Clock:
    """The gateway's wall clock, moved by the test."""

    def __init__(self, now):
        self.now = now

    def __call__(self):
        return self.now


@pytest.fixture
def clock():
    return Clock(T0 + 600)


@pytest.fixture
def logged(make_gateway, clock):
    """Four hours of varied traffic from three keys in two projects: priced,
    unpriced, cached, estimated (no usage reported), failed and streamed
    calls; then one row left pending and one interrupted by a dead process."""
    return log_traffic(make_gateway, clock)


def log_traffic(make_gateway, clock, **sections):
    # One attempt per call: retrying the failing ones costs each fixture about 2.5 s of backoff
    # (80 s for the module); retried rows in rollups are counted in test_routing.
    gateway = make_gateway(clock=clock, environ={"LLMGW_ADMIN_TOKEN": ADMIN_TOKEN},
                           routing={"retries": 0}, **sections)
    search, search_key = gateway.create_key("search", metadata={"team": "blue"})
    ads, ads_key = gateway.create_key("ads", metadata={"team": "red"})
    ads2, ads2_key = gateway.create_key("ads")
    models = ["gpt-4o-mini", "gpt-4o-mini-cache-reasoning", "gpt-4o-mini-nousage", "gpt-4o-mini-fail500",
              "mystery-model"]
    minutes = [0, 7, 19, 33, 41, 52, 58]
    count = 0
    for hour in range(4):
        for index, minute in enumerate(minutes):
            clock.now = T0 + hour * HOUR + minute * 60 + 0.25 * index
            key = (search_key, ads_key, ads2_key)[(hour + index) % 3]
            if index == 3:
                body = {"model": "claude-haiku-4-5", "max_tokens": 16,
                        "messages": [{"role": "user", "content": "m%d" % count}]}
                reply = post(gateway, MESSAGES, body, key=key)
            else:
                body = {"model": models[(hour + index) % len(models)], "stream": index == 5,
                        "messages": [{"role": "user", "content": "c%d" % count}]}
                reply = post(gateway, CHAT, body, key=key)
            assert reply.status in (200, 500), reply
            count += 1
    for day in (1, 2):  # a few more calls on the next two days, for ranges that hold whole days
        for index in range(3):
            clock.now = T0 + day * DAY + index * 7 * HOUR + 321.5
            key = (search_key, ads_key, ads2_key)[index]
            assert post(gateway, CHAT, {"model": models[index], "messages": [{"role": "user", "content": "d%d" % count}]},
                        key=key).status == 200
            count += 1
        # Calls that cost nothing: other_calls, apart from requests.
        counted = {"model": "claude-haiku-4-5", "messages": [{"role": "user", "content": "n"}]}
        assert post(gateway, COUNT_TOKENS, counted, key=search_key).status == 200
        assert call(gateway, "GET", MODELS, key=ads_key).status == 200
        count += 2
    clock.now = T0 + 4 * HOUR + 60
    gateway.store.begin_usage("pending-1", gateway.gateway.owner, search["id"], "openai", CHAT, "gpt-4o-mini",
                              False, T0 + 2 * HOUR + 5)
    gateway.store.begin_usage("dead-1", "a-dead-process", ads["id"], "openai", CHAT, "gpt-4o-mini", False,
                              T0 + HOUR + 30)
    assert gateway.store.recover_interrupted(gateway.gateway.owner, T0 + 5 * HOUR) == 1
    statuses = {row["status"] for row in gateway.rows()}
    assert {"ok", "upstream_error", "pending", "interrupted"} <= statuses
    return {"gateway": gateway, "keys": (search, ads, ads2), "count": count + 2}


RANGES = [
    (None, None),
    (T0, T0 + 4 * HOUR),                        # whole hours
    (T0 + HOUR, T0 + 3 * HOUR),
    (T0 + 1000.5, T0 + 3 * HOUR + 1500.25),     # ragged at both ends
    (T0 + 1000.5, None),
    (None, T0 + 2 * HOUR + 700),
    (T0 + HOUR + 60, T0 + HOUR + 2000),         # inside one hour
    (T0 + 2 * HOUR + 5, T0 + 2 * HOUR + 6),     # just the pending row
    (T0 + 5 * HOUR, T0 + 6 * HOUR),             # nothing
    (T0, T0 + 2 * DAY),                         # whole days
    (T0 + 1000.5, T0 + 2 * DAY + 8 * HOUR + 100.75),  # a day, hours and rows on both sides
    (T0 + DAY - 1, T0 + 3 * DAY),
    (None, T0 + DAY + 7 * HOUR + 322),
]


def test_postgresql_stats_and_log_equal_sqlites(make_gateway, postgres_databases):
    """The same traffic through a gateway on each backend: every grouping
    over every range, charts by hour, day and week, the request log and the
    all-time totals agree (key ids and request ids aside, which are random,
    and latencies)."""
    backends = {}
    for name, database in (("sqlite", {}), ("postgresql", {"url": postgres_databases.lease()})):
        traffic = log_traffic(make_gateway, Clock(T0 + 600), database=database, db_name=name + ".db")
        names = {key["id"]: "key%d" % index for index, key in enumerate(traffic["keys"])}
        gateway = traffic["gateway"]

        def named(value):
            return names.get(value, value) if isinstance(value, str) else value
        stats = {(group, since, until): sorted(
            ({k: named(v) for k, v in row.items()} for row in gateway.store.usage_stats(group, since, until)),
            key=repr) for group in ("key", "project", "model", "provider", "day", "label:team")
            for since, until in RANGES}
        stats.update({(group, step): [(start, sorted(({k: named(v) for k, v in row.items()} for row in rows), key=repr))
                                      for start, rows in llmgw.usage_series(gateway.store, group, T0 // step * step,
                                                                            T0 // step * step + 4 * step, step)]
                      for group in ("key", "day") for step in (HOUR, DAY, 7 * DAY)})
        timing = ("request_id", "logical_request_id", "latency_ms", "first_byte_ms", "overhead_ms")
        log = [{k: named(v) for k, v in entry.items() if k not in timing}
               for entry in gateway.store.usage_log({}, limit=1000)[0]]
        totals = sorted(((named(row[0]),) + tuple(row[1:]) for row in gateway.store.usage_totals()), key=repr)
        backends[name] = (stats, log, totals)
    assert backends["postgresql"][0] == backends["sqlite"][0]
    assert backends["postgresql"][1] == backends["sqlite"][1]
    assert backends["postgresql"][2] == backends["sqlite"][2]


@pytest.mark.parametrize("group_by", sorted(ORACLE_GROUPS))
def test_stats_from_rollups_equal_the_rows(logged, group_by):
    gateway = logged["gateway"]
    for since, until in RANGES:
        expected = oracle_stats(gateway, group_by, since, until)
        assert rollup_stats(gateway.store, group_by, since, until) == expected, (since, until)
    for project in ("ads", "search", "nobody"):
        assert (rollup_stats(gateway.store, group_by, T0 + 1000.5, None, project)
                == oracle_stats(gateway, group_by, T0 + 1000.5, None, project))


@pytest.mark.parametrize("step", [HOUR, 6 * HOUR, DAY, 7 * DAY])
def test_chart_series_equal_the_rows_point_by_point(logged, step):
    """usage_series (the dashboard's charts) is one query over the rollups a
    step allows (hours for 6-hour steps, days too for days, weeks too for
    weeks); each point equals the plain sum over its rows, the pending row
    included; summing only the fields the dashboard shows gives the same."""
    gateway = logged["gateway"]
    since = T0 // step * step
    until = since + step * min(llmgw.MAX_SERIES_POINTS, -(-3 * DAY // step) + 1)
    for group_by in ("model", "key", "day"):
        series = llmgw.usage_series(gateway.store, group_by, since, until, step)
        assert [start for start, _ in series] == list(range(since, until, step))
        assert sum(len(rows) for _, rows in series) > 0
        kept = {"model", "virtual_key_id", "project_name", "day", "requests", "estimated_cost"}
        assert llmgw.usage_series(gateway.store, group_by, since, until, step, ("requests", "cost_nanousd")) == [
            (start, [{name: value for name, value in row.items() if name in kept} for row in rows])
            for start, rows in series]
        for start, rows in series:
            assert shaped_as_oracle(rows, group_by) == oracle_stats(gateway, group_by, start, start + step), (
                group_by, start)


def test_stats_over_weeks_equal_the_rows(make_gateway, clock):
    """Rows a day and a half apart for four weeks: a range of whole weeks
    reads the weekly rollups (days, hours and rows at its ends), and equals
    the rows in every grouping; grouped by day, it reads days instead."""
    gateway = make_gateway(clock=clock, routing={"retries": 0})
    keys = [gateway.create_key(project, metadata={"team": project})[1] for project in ("search", "ads")]
    for number in range(20):
        clock.now = T0 + number * 1.4 * DAY + number * 0.37 * HOUR
        body = {"model": ("gpt-4o-mini", "gpt-4o-mini-cache-reasoning")[number % 2],
                "messages": [{"role": "user", "content": "w%d" % number}]}
        assert post(gateway, CHAT, body, key=keys[number % 2]).status == 200
    week = 7 * DAY
    first_week = -(-T0 // week) * week
    ranges = [(first_week, first_week + 2 * week), (T0 + 1000.5, T0 + 26 * DAY + 5 * HOUR + 17.25),
              (first_week - 3 * HOUR - 5, first_week + 3 * week + DAY + 2 * HOUR + 9)]
    sql = gateway.store.sql
    sources = [llmgw._stats_sources(sql, since, until, {"model"})[0] for since, until in ranges]
    assert all(any("FROM usage_weeks" in source for source in part) for part in sources)
    assert not any("usage_weeks" in source for source in llmgw._stats_sources(sql, *ranges[0], {"model"}, DAY)[0])
    for group_by in sorted(ORACLE_GROUPS):
        for since, until in ranges:
            expected = oracle_stats(gateway, group_by, since, until)
            assert expected and rollup_stats(gateway.store, group_by, since, until) == expected, (group_by, since)


def test_rollups_are_written_when_rows_settle(logged):
    """Rollups exist for the settled rows only (stats did not just read rows)."""
    gateway = logged["gateway"]
    rolled = [query(gateway, "SELECT SUM(attempts), SUM(cost_nanousd), SUM(output_tokens), SUM(requests + other_calls) "
                             "FROM %s" % table)[0] for table in ("usage_hours", "usage_days", "usage_weeks", "usage_totals")]
    [settled] = query(gateway, "SELECT COUNT(*), SUM(cost_nanousd), SUM(output_tokens), "
                               "SUM(CASE WHEN attempt = 1 THEN 1 ELSE 0 END) FROM usage WHERE status != 'pending'")
    assert rolled == [settled] * 4
    assert settled[3] == logged["count"] - 1 and settled[1] > 0  # the fail500 calls were tried twice


def test_repricing_moves_the_rollups_with_the_rows(logged):
    gateway = logged["gateway"]
    prices = llmgw.PriceTable.build({"gpt-4o-mini": {"input": 7, "output": 11},
                                     "mystery-model": {"input": 1, "output": 2}})
    totals = llmgw.reprice_usage(gateway.store, prices, apply=True)
    assert totals["changed_rows"] > 0
    for group_by in ("model", "key"):
        for since, until in RANGES[:4]:
            assert rollup_stats(gateway.store, group_by, since, until) == oracle_stats(
                gateway, group_by, since, until)


@pytest.mark.sqlite_only("rewinds the SQLite file to schema 1 (PRAGMA user_version)")
def test_version_1_database_gains_rollups_equal_to_its_rows(logged, tmp_path):
    """A database from before rollups (schema 1) is migrated forward:
    new columns added, every settled row rolled up as its request's one
    attempt (tests/test_operations.py migrates a database of each earlier
    schema made by its own code)."""
    gateway = logged["gateway"]
    conn = sqlite3.connect(gateway.db_path)
    conn.executescript("DROP TABLE usage_hours; DROP TABLE usage_days; DROP TABLE usage_totals;"
                       "ALTER TABLE usage DROP COLUMN first_byte_ms; ALTER TABLE usage DROP COLUMN overhead_ms;"
                       + DROP_ATTEMPT_COLUMNS + "PRAGMA user_version = 1;")
    conn.close()
    store = llmgw.SQLiteStore(gateway.db_path)
    try:
        expected = {group: oracle_stats(gateway, group) for group in ("key", "day")}
        for group in ("key", "day"):
            assert rollup_stats(store, group) == expected[group]
        totals = store.usage_totals()
        # Each settled row one attempt (calls by status); the pending one not yet.
        assert (sum(sum(row[4].values()) for row in totals)
                == sum(row[1]["requests"] + row[1]["other_calls"] for row in expected["key"]) - 1)
        assert "first_byte_ms" in store.usage_log({})[0][0]
    finally:
        store.close()


#: What a usage table looked like before routing (schema 4 and older).
DROP_ATTEMPT_COLUMNS = ("ALTER TABLE usage DROP COLUMN logical_request_id;"
                        "ALTER TABLE usage DROP COLUMN attempt; ALTER TABLE usage DROP COLUMN attempt_kind;"
                        "ALTER TABLE usage DROP COLUMN deployment;")


@pytest.mark.sqlite_only("rewinds the SQLite file to schema 4 (PRAGMA user_version)")
def test_version_4_database_gains_attempt_columns_and_counts(logged, tmp_path):
    """A database from before routing (schema 4): its rows become first
    attempts, and its rollups and totals count each as one attempt."""
    gateway = logged["gateway"]
    conn = sqlite3.connect(gateway.db_path)
    script = "".join("UPDATE %s SET requests = attempts; ALTER TABLE %s DROP COLUMN attempts; ALTER TABLE %s DROP "
                     "COLUMN retries; ALTER TABLE %s DROP COLUMN fallbacks; ALTER TABLE %s DROP COLUMN other_calls;"
                     % ((table,) * 5)
                     for table in ("usage_hours", "usage_days", "usage_totals"))  # schema 4: a row was a request
    conn.executescript(script + DROP_ATTEMPT_COLUMNS + "PRAGMA user_version = 4;")
    conn.close()
    store = llmgw.SQLiteStore(gateway.db_path)
    try:
        for group in ("key", "day"):
            assert rollup_stats(store, group) == oracle_stats(gateway, group)
        for row in store.usage_stats("key"):
            assert (row["attempts"], row["retries"], row["fallbacks"]) == (row["requests"] + row["other_calls"], 0, 0)
        calls = sum(sum(row[4].values()) for row in store.usage_totals())  # settled: the pending row aside
        assert calls == sum(row["requests"] + row["other_calls"] for row in store.usage_stats("key")) - 1
        entry = store.usage_log({})[0][0]
        assert (entry["attempt"], entry["attempt_kind"], entry["logical_request_id"]) == (1, "first", None)
    finally:
        store.close()


def test_prune_keeps_rollups_and_budgets(make_gateway, clock, monkeypatch, capsys, tmp_path):
    gateway = make_gateway(clock=clock)
    record, key = gateway.create_key("p", max_budget=100, budget_period="never")
    for hour in range(3):
        clock.now = T0 + hour * HOUR + 900
        assert post(gateway, CHAT, {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x%d" % hour}]},
                    key=key).status == 200
    before = rollup_stats(gateway.store, "key")
    spend = gateway.store.key_spend(gateway.store.find_key_by_id(record["id"]), clock.now)["spent_nanousd"]
    assert spend > 0
    # Pruning before T0 + 1h30 drops only the first hour's row: the cut is rounded down to the hour.
    assert gateway.store.prune_usage(T0 + HOUR + 1800) == 1
    assert [row["started_at"] for row in gateway.rows()] == [T0 + HOUR + 900, T0 + 2 * HOUR + 900]
    assert rollup_stats(gateway.store, "key") == before
    assert rollup_stats(gateway.store, "key", T0, T0 + 3 * HOUR) == before
    # A budget recount (setting a budget again) still sees the pruned row's cost.
    gateway.store.update_key(record["id"], {"max_budget_nanousd": 100 * 10 ** 9}, clock.now)
    assert gateway.store.key_spend(gateway.store.find_key_by_id(record["id"]), clock.now)["spent_nanousd"] == spend
    # cli.py prune: --older-than, else logging.retention_days, else a clear error.
    for name, value in cli_env(gateway, tmp_path, {"logging": {"level": "INFO"}}).items():
        monkeypatch.setenv(name, value)
    assert cli.main(["prune", "--older-than", "1h"]) == 0
    assert "Pruned 2 request-log row(s)" in capsys.readouterr().out
    assert gateway.rows() == []
    assert rollup_stats(gateway.store, "key") == before
    assert cli.main(["prune"]) == 1  # the config names no retention_days
    assert "retention_days" in capsys.readouterr().err


@pytest.mark.parametrize("value, ok", [(30, True), (0, False), (-1, False), ("30", False), (1.5, False),
                                       (True, False), (None, True)])
def test_retention_days_config(value, ok):
    document = {"logging": {"retention_days": value}}
    if ok:
        assert llmgw.parse_config(document).logging.retention_days == value
    else:
        with pytest.raises(llmgw.ConfigError, match="retention_days"):
            llmgw.parse_config(document)


def test_the_gateway_prunes_past_retention(make_gateway, monkeypatch):
    """``logging.retention_days``: the janitor prunes; rollups stay."""
    monkeypatch.setattr(llmgw.Gateway, "janitor_interval", 0.05)
    gateway = make_gateway(logging={"retention_days": 1})
    key = gateway.create_key("p")[1]
    assert post(gateway, CHAT, {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x"}]},
                key=key).status == 200
    execute_sql(gateway, "UPDATE usage SET started_at = started_at - 3 * 86400",  # aged three days, as if written then
                "UPDATE usage_hours SET hour = hour - 3 * 86400", "UPDATE usage_days SET day = day - 3 * 86400")
    before = rollup_stats(gateway.store, "key")
    assert gateway.wait_for_rows(lambda rows: not rows) == []
    assert rollup_stats(gateway.store, "key") == before


# ---- the request log ----------------------------------------------------------------

def test_log_pages_by_cursor_newest_first(logged):
    gateway = logged["gateway"]
    seen, cursor = [], None
    while True:
        reply = admin(gateway, "GET", "/admin/logs?limit=4" + ("&cursor=" + cursor if cursor else ""))
        assert reply.status == 200
        page = reply.json()
        assert len(page["data"]) <= 4
        seen.extend(page["data"])
        cursor = page["next_cursor"]
        if cursor is None:
            break
    rows = gateway.rows()
    assert [entry["id"] for entry in seen] == [row["id"] for row in
                                                sorted(rows, key=lambda r: (r["started_at"], r["id"]), reverse=True)]
    assert len(seen) == len(rows) == logged["count"] + sum(row["attempt"] > 1 for row in rows)


def test_log_entries_carry_what_a_log_needs(logged):
    gateway = logged["gateway"]
    search = logged["keys"][0]
    page = admin(gateway, "GET", "/admin/logs?key=%s&status=ok&limit=1000" % search["id"]).json()
    assert page["data"] and page["next_cursor"] is None
    by_id = {row["id"]: row for row in gateway.rows()}
    for entry in page["data"]:
        row = by_id[entry["id"]]
        assert entry["virtual_key_id"] == search["id"] and entry["status"] == "ok"
        assert entry["project_name"] == "search" and entry["labels"] == {"team": "blue"}
        assert entry["time"] == llmgw.iso_time(row["started_at"])
        assert entry["cost"] == llmgw.nanousd_to_usd(row["cost_nanousd"])
        assert entry["endpoint"] in (CHAT, MESSAGES, COUNT_TOKENS) and entry["http_status"] == 200
        for field in ("model", "provider", "request_tokens", "response_tokens", "cache_read_tokens",
                      "output_tokens", "latency_ms"):
            assert entry[field] == row[field], field
        assert 0 <= entry["overhead_ms"] and 0 <= entry["first_byte_ms"] <= entry["latency_ms"]
    assert {entry["streamed"] for entry in page["data"]} <= {True, False}
    assert not any("body" in name or "messages" in name for name in page["data"][0])


@pytest.mark.parametrize("query", ["project=ads", "model=gpt-4o-mini", "status=upstream_error",
                                   "provider=anthropic", "since=%s" % llmgw.iso_time(T0 + HOUR + 1000),
                                   "until=%s&project=search" % llmgw.iso_time(T0 + 2 * HOUR)])
def test_log_filters_match_the_rows(logged, query, monkeypatch, capsys, tmp_path):
    gateway = logged["gateway"]
    reply = admin(gateway, "GET", "/admin/logs?limit=1000&" + query)
    assert reply.status == 200
    ids = [entry["id"] for entry in reply.json()["data"]]
    projects = {key["id"]: key["project_name"] for key in logged["keys"]}
    name, value = query.split("&")[0].split("=")
    expected = []
    for row in sorted(gateway.rows(), key=lambda r: (r["started_at"], r["id"]), reverse=True):
        if query.endswith("project=search") and projects[row["virtual_key_id"]] != "search":
            continue
        field = {"project": projects[row["virtual_key_id"]], "model": row["model"], "status": row["status"],
                 "provider": row["provider"]}
        if name in field and field[name] != value:
            continue
        if name == "since" and row["started_at"] < T0 + HOUR + 1000:
            continue
        if name == "until" and row["started_at"] >= T0 + 2 * HOUR:
            continue
        expected.append(row["id"])
    assert ids == expected and ids
    # The CLI gives the same page.
    for name, value in cli_env(gateway, tmp_path).items():
        monkeypatch.setenv(name, value)
    argv = []
    for part in query.split("&"):
        name, value = part.split("=")
        argv += ["--" + name, value]
    assert cli.main(["logs", "--limit", "1000", "--output", "json"] + argv) == 0
    assert json.loads(capsys.readouterr().out) == reply.json()


@pytest.mark.parametrize("query, fragment", [
    ("cursor=nonsense", "cursor"), ("cursor=1.5:x", "cursor"), ("limit=0", "limit"), ("limit=1001", "limit"),
    ("limit=ten", "limit"), ("since=yesterday", "yesterday"), ("colour=red", "colour"), ("format=xml", "format"),
])
def test_log_bad_queries(logged, query, fragment):
    reply = admin(logged["gateway"], "GET", "/admin/logs?" + query)
    assert reply.status == 400
    assert fragment in reply.json()["error"]["message"]


def test_log_needs_the_admin_token(logged):
    vkey_reply = admin(logged["gateway"], "GET", "/admin/logs", token="llmgw-not-an-admin-token")
    assert vkey_reply.status == 401


def test_log_csv_matches_json_and_defuses_formulas(logged, clock, monkeypatch, capsys, tmp_path):
    gateway = logged["gateway"]
    clock.now = T0 + 3 * DAY  # the newest row
    key = gateway.create_key("=HYPERLINK(\"http://evil\")")[1]
    assert post(gateway, CHAT, {"model": "=1+1", "messages": [{"role": "user", "content": "x"}]},
                key=key).status == 200
    data = admin(gateway, "GET", "/admin/logs?limit=1000").json()["data"]
    reply = admin(gateway, "GET", "/admin/logs?limit=1000&format=csv")
    assert reply.status == 200 and reply.header("content-type").startswith("text/csv")
    table = list(csv.DictReader(io.StringIO(reply.body.decode("utf-8"))))
    assert [int(row["id"]) for row in table] == [entry["id"] for entry in data]
    assert list(table[0]) == list(data[0])
    assert table[0]["model"] == "'=1+1" and table[0]["project_name"] == "'=HYPERLINK(\"http://evil\")"
    assert table[1]["cost"] == str(data[1]["cost"])
    for name, value in cli_env(gateway, tmp_path).items():
        monkeypatch.setenv(name, value)
    assert cli.main(["logs", "--limit", "1000", "--output", "csv"]) == 0
    assert capsys.readouterr().out.replace("\r\n", "\n") == reply.body.decode("utf-8").replace("\r\n", "\n")


def test_stats_csv_from_the_api_and_the_cli(logged, monkeypatch, capsys, tmp_path):
    gateway = logged["gateway"]
    rows = admin(gateway, "GET", "/admin/usage-stats?by=model").json()
    reply = admin(gateway, "GET", "/admin/usage-stats?by=model&format=csv")
    assert reply.status == 200 and reply.header("content-type").startswith("text/csv")
    table = list(csv.DictReader(io.StringIO(reply.body.decode("utf-8"))))
    assert [row["model"] for row in table] == [row["model"] or "" for row in rows]  # a model list names none
    assert [int(row["requests"]) for row in table] == [row["requests"] for row in rows]
    assert [int(row["other_calls"]) for row in table] == [row["other_calls"] for row in rows]
    assert [float(row["estimated_cost"]) for row in table] == [row["estimated_cost"] for row in rows]
    for name, value in cli_env(gateway, tmp_path).items():
        monkeypatch.setenv(name, value)
    assert cli.main(["stats", "--by", "model", "--output", "csv"]) == 0
    assert capsys.readouterr().out.replace("\r\n", "\n") == reply.body.decode("utf-8").replace("\r\n", "\n")


@pytest.mark.sqlite_only("SQLite's EXPLAIN QUERY PLAN")
def test_log_pages_read_an_index_in_order(tmp_path):
    """A filtered log page walks an index newest first and stops at the page's
    end: no sort of the matching rows (what makes it fast at 10M rows)."""
    llmgw.SQLiteStore(tmp_path / "plan.db").close()
    conn = sqlite3.connect(str(tmp_path / "plan.db"))
    try:
        for filters in ({}, {"key": "vk_1"}, {"key": "vk_1", "since": 1.0}, {"since": 1.0, "until": 2.0},
                        {"status": "ok", "model": "m"}):
            clauses = [llmgw.LOG_FILTERS[name] for name in filters] + ["(u.started_at, u.id) < (?, ?)"]
            sql = "EXPLAIN QUERY PLAN %s WHERE %s ORDER BY u.started_at DESC, u.id DESC LIMIT 5" % (
                llmgw.LOG_PAGE, " AND ".join(clauses))
            plan = " ".join(row[-1] for row in conn.execute(sql, list(filters.values()) + [1.0, 1]))
            assert "TEMP B-TREE" not in plan, (filters, plan)
            assert "USING INDEX" in plan or "USING COVERING INDEX" in plan, (filters, plan)
    finally:
        conn.close()
