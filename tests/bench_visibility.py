#!/usr/bin/env python3
"""llmgw visibility benchmark: stats, charts, log pages and /metrics at ten million usage rows.

Run it from the repository root (standard library only; not collected by pytest):

    python tests/bench_visibility.py                    # 10,000,000 rows (about 2 GB, some minutes)
    python tests/bench_visibility.py --rows 200000      # a quick run
    python tests/bench_visibility.py --db /tmp/big.db   # keep (and reuse) the seeded database

It seeds a database with ``--rows`` settled usage rows (plus a few pending ones) spread over
90 days, 100 keys in 10 projects (a third with budgets), 8 models on 3 providers and a mix of
outcomes, written as the gateway writes them: rows, then their hourly rollups and totals (the
migration statements, which sum the same expressions as the settle transaction). Then it starts
the real gateway (``llmgw.make_server``) on that database and times, over HTTP, each query the
dashboard, the CLI and a scraper make; ``--repeat`` runs each, and prints the median and worst:

* overview: ``/admin/usage-stats`` by day, project and model over the last 30 days (the charts);
* stats: ``/admin/usage-stats`` by key over all time, and over a range cut mid-hour;
* log pages: ``/admin/logs`` filtered by key, by status, by model and time, and 20 pages deep;
* ``/metrics``, each scrape reading the books afresh (a second apart, as scrapers are), then
  back to back (within a second the books read are reused: METRICS_BOOKS_SECONDS);
* the dashboard (signed in over HTTP as a browser is): the overview at 24 h, 7 d and 30 d
  (charts and totals), a filtered log page and the keys page.

Targets (issue 12): overview, stats and a filtered log page under 200 ms; /metrics under 50 ms.
The dashboard's pages are timed whole (rendered HTML), against the same 200 ms.
Finally it checks that stats from rollups equal the plain sums over the rows to the nano-dollar,
and times that plain sum (what stats cost before rollups) for comparison.
"""

import argparse
import http.client
import json
import os
import random
import re
import sqlite3
import statistics
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import llmgw  # noqa: E402

ADMIN_TOKEN = "llmgw-admin-bench-0123456789abcdef"
DAY = 86400
MODELS = [("openai", "gpt-4o-mini"), ("openai", "gpt-4o"), ("openai", "gpt-4.1-mini"), ("openai", "o4-mini"),
          ("anthropic", "claude-haiku-4-5"), ("anthropic", "claude-sonnet-4-5"), ("mistral", "mistral-large-latest"),
          ("mistral", "codestral-latest")]
STATUSES = ["ok"] * 95 + ["upstream_error"] * 3 + ["timeout", "client_disconnected"]
INSERT = """INSERT INTO usage (request_id, virtual_key_id, provider, endpoint, model, streamed, status, http_status,
                               usage_source, request_tokens, response_tokens, input_tokens, cache_read_tokens,
                               output_tokens, reasoning_tokens, cost_nanousd, priced, started_at, finished_at,
                               latency_ms, first_byte_ms, overhead_ms, owner)
            VALUES (?, ?, ?, '/v1/chat/completions', ?, ?, ?, ?, 'reported', ?, ?, ?, ?, ?, ?, ?, 1, ?, ?, ?, ?, ?,
                    'bench')"""


def seed(path, rows, now):
    """Write ``rows`` usage rows, their keys, rollups and totals into a new database."""
    llmgw.SQLiteStore(path).close()
    store = llmgw.SQLiteStore(path)
    keys = []
    for number in range(100):
        policy = {"max_budget_nanousd": 1000 * 10 ** 9} if number % 3 == 0 else {}
        if number % 4 == 0:
            policy["metadata"] = {"team": "team-%d" % (number % 5)}
        record, _ = store.create_key("project-%d" % (number % 10), policy, "bench")
        keys.append(record["id"])
    store.close()
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA synchronous = OFF")
    conn.execute("PRAGMA journal_mode = WAL")
    for index in ("usage_by_time", "usage_by_key"):  # built once at the end: far faster than per row
        conn.execute("DROP INDEX %s" % index)
    generator = random.Random(12)
    start = now - 90 * DAY
    batch = []
    began = time.monotonic()
    conn.execute("BEGIN")
    for number in range(rows):
        provider, model = MODELS[generator.randrange(len(MODELS))]
        status = STATUSES[generator.randrange(len(STATUSES))]
        prompt, completion = generator.randrange(10, 4000), generator.randrange(1, 1200)
        cached = prompt // 4 if generator.random() < 0.2 else 0
        at = start + (number / rows) * 90 * DAY + generator.random()
        latency = generator.uniform(150, 9000)
        batch.append(("bench-%d" % number, keys[generator.randrange(len(keys))], provider, model,
                      int(generator.random() < 0.4), status, 200 if status == "ok" else 500,
                      prompt, completion, prompt - cached, cached, completion, completion // 5,
                      prompt * 150 + cached * 75 + completion * 600, at, at + latency / 1000, latency,
                      latency * 0.8, generator.uniform(0.2, 2.0)))
        if len(batch) == 100000:
            conn.executemany(INSERT, batch)
            batch = []
            conn.execute("COMMIT")
            conn.execute("BEGIN")
            sys.stdout.write("\r  rows: %d (%.0f s)" % (number + 1, time.monotonic() - began))
            sys.stdout.flush()
    conn.executemany(INSERT, batch)
    conn.execute("COMMIT")
    print("\r  rows: %d in %.0f s" % (rows, time.monotonic() - began))
    for step, statements in (("indexes", [ddl for ddl in llmgw.SCHEMA.split(";") if "CREATE INDEX" in ddl]),
                             ("rollups by day, by hour and totals", llmgw.ROLL_UP_ALL)):
        began = time.monotonic()
        for statement in statements:
            conn.execute(statement)
        print("  %s: %.0f s" % (step, time.monotonic() - began))
    for number in range(5):  # requests in flight: stats count them from the rows
        conn.execute("INSERT INTO usage (request_id, virtual_key_id, provider, endpoint, model, streamed, status, "
                     "started_at, owner) VALUES (?, ?, 'openai', '/v1/chat/completions', 'gpt-4o-mini', 0, "
                     "'pending', ?, 'bench')", ("pending-%d" % number, keys[number], now - 30 * number))
    conn.execute("ANALYZE")
    conn.close()
    return keys


def get(port, path, token=ADMIN_TOKEN, headers=None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    began = time.perf_counter()
    conn.request("GET", path, headers=headers or {"Authorization": "Bearer " + token})
    response = conn.getresponse()
    body = response.read()
    elapsed = (time.perf_counter() - began) * 1000
    conn.close()
    if response.status != 200:
        raise SystemExit("%s answered %d: %s" % (path, response.status, body[:300]))
    return elapsed, body


def dashboard_session(port):
    """The Cookie header of a dashboard session, logged in as a browser does."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("GET", "/ui/login")
    response = conn.getresponse()
    login_cookie = response.getheader("set-cookie").partition(";")[0]
    login_csrf = re.search(r'name="login_csrf" value="([^"]+)"', response.read().decode()).group(1)
    conn.request("POST", "/ui/login", body="login_csrf=%s&token=%s" % (login_csrf, ADMIN_TOKEN),
                 headers={"Cookie": login_cookie, "Content-Type": "application/x-www-form-urlencoded"})
    response = conn.getresponse()
    response.read()
    conn.close()
    return {"Cookie": response.getheader("set-cookie").partition(";")[0]}


def timed(port, label, path, repeat, target, headers=None, pause=0):
    times = []
    for _ in range(repeat):
        time.sleep(pause)
        times.append(get(port, path, headers=headers)[0])
    median, worst = statistics.median(times), max(times)
    verdict = "ok" if median < target else "OVER %d ms" % target
    print("  %-46s median %8.1f ms   worst %8.1f ms   %s" % (label, median, worst, verdict))
    return median


def iso(epoch):
    return llmgw.iso_time(epoch)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=10000000)
    parser.add_argument("--db", help="database path (kept; reused if it exists)")
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        path = args.db or os.path.join(scratch, "bench.db")
        now = time.time()
        print("load average: %.2f %.2f %.2f" % os.getloadavg())
        if not os.path.exists(path):
            print("seeding %s" % path)
            seed(path, args.rows, now)
        conn = sqlite3.connect(path)
        count = conn.execute("SELECT COUNT(*) FROM usage").fetchone()[0]
        keys = [row[0] for row in conn.execute("SELECT id FROM virtual_keys ORDER BY id")]
        rollups = "%d daily, %d hourly" % tuple(conn.execute("SELECT COUNT(*) FROM %s" % table).fetchone()[0]
                                                for table in ("usage_days", "usage_hours"))
        conn.close()
        print("database: %d usage rows, %s rollups, %.2f GB" % (count, rollups, os.path.getsize(path) / 1e9))
        document = {"server": {"host": "127.0.0.1", "port": 0},
                    "providers": {"openai": {"base_url": "http://127.0.0.1:9"},
                                  "anthropic": {"base_url": "http://127.0.0.1:9"},
                                  "mistral": {"base_url": "http://127.0.0.1:9"}},
                    "logging": {"level": "WARNING"}}
        server = llmgw.make_server(llmgw.parse_config(document), llmgw.SQLiteStore(path),
                                   environ={llmgw.ADMIN_TOKEN_ENV: ADMIN_TOKEN})
        port = server.server_address[1]
        thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
        thread.start()
        try:
            month = iso(now - 30 * DAY)
            ragged = (iso(now - 45 * DAY - 1234), iso(now - 3 * DAY + 777))
            key = keys[7]
            print("timings over HTTP (%d runs each):" % args.repeat)
            for by in ("day", "project", "model"):
                timed(port, "overview: stats by %s, last 30 days" % by,
                      "/admin/usage-stats?by=%s&since=%s" % (by, month), args.repeat, 200)
            timed(port, "stats: by key, all time", "/admin/usage-stats", args.repeat, 200)
            timed(port, "stats: by model, range cut mid-hour",
                  "/admin/usage-stats?by=model&since=%s&until=%s" % ragged, args.repeat, 200)
            timed(port, "stats: by label:team, CSV", "/admin/usage-stats?by=label:team&format=csv", args.repeat, 200)
            timed(port, "log page: key filter", "/admin/logs?key=%s" % key, args.repeat, 200)
            timed(port, "log page: status=timeout", "/admin/logs?status=timeout", args.repeat, 200)
            timed(port, "log page: model + last 7 days", "/admin/logs?model=gpt-4o&since=%s" % iso(now - 7 * DAY),
                  args.repeat, 200)
            timed(port, "log page: project, CSV", "/admin/logs?project=project-3&format=csv", args.repeat, 200)
            cursor = None
            for _ in range(20):
                page = json.loads(get(port, "/admin/logs?key=%s%s" % (key, "&cursor=" + cursor if cursor else ""))[1])
                cursor = page["next_cursor"]
            timed(port, "log page: key filter, 21st page", "/admin/logs?key=%s&cursor=%s" % (key, cursor),
                  args.repeat, 200)
            timed(port, "/metrics, the books read afresh", "/metrics", args.repeat, 50,
                  pause=llmgw.METRICS_BOOKS_SECONDS)
            timed(port, "/metrics, back to back", "/metrics", args.repeat, 50)
            session = dashboard_session(port)
            for query in ("range=24h&by=project", "range=7d&by=model", "range=30d&by=project", "range=30d&by=key"):
                timed(port, "dashboard: overview %s" % query, "/ui/overview?" + query, args.repeat, 200, session)
            timed(port, "dashboard: logs, project and status filter",
                  "/ui/logs?project=project-3&status=upstream_error", args.repeat, 200, session)
            timed(port, "dashboard: logs, key and last 7 days", "/ui/logs?key=%s&since=%s" % (key, iso(now - 7 * DAY)),
                  args.repeat, 200, session)
            timed(port, "dashboard: keys (100, with budgets)", "/ui/keys", args.repeat, 200, session)

            print("stats from rollups against the plain sum over every row:")
            began = time.perf_counter()
            rollup = json.loads(get(port, "/admin/usage-stats?by=model&since=%s&until=%s" % ragged)[1])
            rollup_ms = (time.perf_counter() - began) * 1000
            since, until = llmgw.parse_time_bound(ragged[0]), llmgw.parse_time_bound(ragged[1])
            began = time.perf_counter()
            conn = sqlite3.connect(path)
            plain = dict(conn.execute(
                "SELECT model, SUM(cost_nanousd) || '/' || COUNT(*) || '/' || SUM(request_tokens) FROM usage "
                "WHERE started_at >= ? AND started_at < ? GROUP BY model", (since, until)).fetchall())
            conn.close()
            plain_ms = (time.perf_counter() - began) * 1000
            conn = sqlite3.connect(path)
            nanos = dict(conn.execute("SELECT model, SUM(cost_nanousd) FROM usage WHERE started_at >= ? "
                                      "AND started_at < ? GROUP BY model", (since, until)).fetchall())
            conn.close()
            equal = all(plain[row["model"]] == "%d/%d/%d" % (nanos[row["model"]], row["requests"],
                                                              row["request_tokens"])
                        and row["estimated_cost"] == llmgw.nanousd_to_usd(nanos[row["model"]]) for row in rollup)
            print("  equal to the nano-dollar: %s (%d models); rollups %.0f ms, plain sum %.0f ms"
                  % ("yes" if equal and len(rollup) == len(plain) else "NO", len(rollup), rollup_ms, plain_ms))
            print("load average: %.2f %.2f %.2f" % os.getloadavg())
        finally:
            server.shutdown()
            server.server_close()


if __name__ == "__main__":
    main()
