"""Spend control (issue 5): budgets that hold under concurrency, RPM/TPM and
parallel limits shared across gateways, expiry, model allowlists, rotation
with grace, period resets, top-ups, /v1/key/info, budget stats, key policy
from the CLI and the admin API.

Real gateways (in-process servers, and one ``python llmgw.py`` child) on one
SQLite file, against the fake upstream. Time-dependent tests inject a wall
clock through ``make_gateway(clock=...)`` (``llmgw.make_server(clock=)``)
instead of sleeping. Money is checked to the nano-dollar: the worst-case
reservation is computed here from the bytes sent and the configured prices,
the real cost from what the fake reported.
"""

import datetime
import hashlib
import json
import re
import socket
import subprocess
import sys
import threading
import time

import pytest
import yaml

from conftest import (ADMIN_TOKEN, ANTHROPIC_KEY, OPENAI_KEY, GatewayProcess, admin, base_config, call, database_section,
                      post, query, reported_tokens, run_cli, wait_until)

import llmgw

UTC = datetime.timezone.utc
#: USD per million tokens. One input token of acme-1 costs 1e6 nano-USD.
IN, OUT = 1000, 3000
PRICES = {
    "acme-1": {"input": IN, "output": OUT},
    "acme-1-slow": {"input": IN, "output": OUT},
    "acme-1-held": {"input": IN, "output": OUT},
    # Output far dearer than input: a reply longer than max_tokens overshoots.
    "acme-2": {"input": 1, "output": 100000},
}
ANTHROPIC_HEADERS = {"anthropic-version": "2023-06-01"}
REVOKED = {"error": {"message": "Invalid, revoked or expired virtual key", "type": "authentication_error",
                     "param": None, "code": "invalid_api_key"}}
REVOKED_ANTHROPIC = {"type": "error", "error": {"type": "authentication_error",
                                                "message": "Invalid, revoked or expired virtual key"}}
INVALID_ONE_LINE = re.compile(r"\Aerror: [^\n]+\n\Z")

pytestmark = [pytest.mark.usefixtures("clean_environment"), pytest.mark.both_backends]


# ---- helpers ----------------------------------------------------------------

def at(text):
    """``2026-03-04T10:00:00Z`` as epoch seconds."""
    return datetime.datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC).timestamp()


class FakeClock:
    """An injectable wall clock: ``clock.now = ...`` moves time."""

    def __init__(self, now):
        self.now = float(now)

    def __call__(self):
        return self.now


def chat_raw(model="acme-1", max_tokens=100, text="hello", **extra):
    body = {"model": model, "messages": [{"role": "user", "content": text}]}
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    body.update(extra)
    return json.dumps(body).encode()


def send(target, raw, key, path="/v1/chat/completions", headers=None):
    return post(target, path, None, key=key, raw_body=raw, headers=headers)


def worst(raw, output_tokens, price_in=IN, price_out=OUT):
    """The documented worst case in nano-USD: body bytes as input tokens at
    the input price, the output limit at the output price."""
    return (len(raw) * price_in + output_tokens * price_out) * 1000


def real_cost(entry, price_in=IN, price_out=OUT):
    prompt, completion = reported_tokens(entry)
    return (prompt * price_in + completion * price_out) * 1000


def usd(nanos):
    return nanos / 1e9


def new_key(gateway, project="budget project", **policy):
    """(key id, secret); asserts a budget given in nano-USD is stored exactly."""
    budget = policy.pop("budget_nanousd", None)
    if budget is not None:
        policy["max_budget"] = usd(budget)
    record, secret = gateway.create_key(project, **policy)
    if budget is not None:
        assert column(gateway, record["id"], "max_budget_nanousd") == budget
    return record["id"], secret


def column(gateway, key_id, name):
    return query(gateway, "SELECT %s FROM virtual_keys WHERE id = ?" % name, (key_id,))[0][0]


def spend_rows(gateway, key_id):
    """key_spend rows: (period_start, spent, reserved, topup), oldest first."""
    return query(gateway, "SELECT period_start, spent_nanousd, reserved_nanousd, topup_nanousd FROM key_spend "
                          "WHERE key_id = ? ORDER BY period_start", (key_id,))


def concurrently(count, function):
    """Run function(i) for i in range(count) at once; results in order."""
    results = [None] * count
    errors = []
    barrier = threading.Barrier(count)

    def run(index):
        try:
            barrier.wait(10)
            results[index] = function(index)
        except Exception as exc:  # reported below, never swallowed
            errors.append(exc)
    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert not errors, errors
    return results


def key_info(gateway, secret, **kwargs):
    return call(gateway, "GET", "/v1/key/info", key=secret, **kwargs)


def wait_synced(*gateways):
    """Until each gateway finished a sync begun after this call: it read
    whatever the others had published by then."""
    for gateway in gateways:
        limits = gateway.gateway.limits
        done = limits.syncs + 2  # the one under way may have read before the publication
        assert wait_until(lambda: limits.syncs >= done, timeout=10), "no sync"


def wait_published(gateway, key_id, field, value, reader):
    """Wait until some gateway published ``field`` >= value for the key in
    key_activity (this minute's count plus the previous one's, as a minute
    may turn between the call and the publication), then until ``reader``
    read it."""
    assert wait_until(lambda: any(row[0] >= value for row in query(
        gateway, "SELECT {0} + previous_{0} FROM key_activity WHERE key_id = ?".format(field), (key_id,)))), \
        "never published"
    wait_synced(reader)


def assert_budget_refusal(reply, dialect="openai", resets=None):
    assert reply.status == 429, reply.body
    assert reply.header("x-should-retry") == "false"
    body = reply.json()
    if dialect == "anthropic":
        assert set(body) == {"type", "error"} and body["type"] == "error"
        assert set(body["error"]) == {"type", "message"}
        assert body["error"]["type"] == "budget_exceeded"
        message = body["error"]["message"]
    else:
        assert set(body) == {"error"}
        assert body["error"]["code"] == "budget_exceeded"
        assert body["error"]["type"] == "rate_limit_error"
        assert body["error"]["param"] is None
        message = body["error"]["message"]
    assert message.startswith("Budget exceeded: ")
    if resets is not None:
        assert message.endswith(resets), message


def assert_rate_refusal(reply, unit, limit):
    """429 in OpenAI's rate-limit style for ``unit`` (requests or tokens)."""
    assert reply.status == 429, reply.body
    assert reply.json()["error"]["code"] == "rate_limit_exceeded"
    assert reply.header("x-should-retry") is None  # worth retrying, unlike a budget stop
    retry_after = int(reply.header("retry-after"))
    assert 1 <= retry_after <= 60
    assert reply.header("x-ratelimit-limit-%s" % unit) == str(limit)
    assert reply.header("x-ratelimit-remaining-%s" % unit) == "0"
    assert reply.header("x-ratelimit-reset-%s" % unit) == "%ds" % retry_after


def write_cli_config(tmp_path, upstream, database_url=None, **sections):
    """config.yaml in tmp_path: the fake upstream, and the database at
    ``database_url`` (None: SQLite at DB_PATH)."""
    path = tmp_path / "config.yaml"
    path.write_text(json.dumps(base_config(upstream.url, **database_section(database_url), **sections)))  # JSON is YAML
    return path


@pytest.fixture
def cli_main(cli_main, tmp_path, upstream, databases):
    """The shared in-process ``cli.main(ARGS)`` with a config.yaml pricing
    PRICES next to gateway.db (on the test's backend); returns (exit code,
    stdout, stderr)."""
    write_cli_config(tmp_path, upstream, databases(tmp_path / "gateway.db"), pricing=PRICES)

    def run(*args):
        result = cli_main(*args)
        return result.returncode, result.stdout, result.stderr
    return run


# ---- budgets: the worst case, reserved and settled -----------------------------

ROUTE_CASES = {
    "chat max_tokens": ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                                                 "max_tokens": 100}, 100),
    "chat max_completion_tokens": ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                                                            "max_completion_tokens": 70}, 70),
    "chat without a limit": ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}, 50),
    "completions": ("/v1/completions", {"prompt": "hi", "max_tokens": 20}, 20),
    "embeddings": ("/v1/embeddings", {"input": "hi"}, 0),
    "responses": ("/v1/responses", {"input": "hi", "max_output_tokens": 30}, 30),
    "responses without a limit": ("/v1/responses", {"input": "hi"}, 50),
    "messages": ("/v1/messages", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 40}, 40),
    "chat stream": ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 90,
                                             "stream": True}, 90),
    "messages stream": ("/v1/messages", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 80,
                                         "stream": True}, 80),
}


@pytest.mark.parametrize("case", list(ROUTE_CASES))
def test_reservation_is_the_worst_case_and_settles_to_the_real_cost(make_gateway, upstream, case):
    path, fields, output_limit = ROUTE_CASES[case]
    gateway = make_gateway(pricing=PRICES, budgets={"max_output_tokens": 50})
    key_id, secret = new_key(gateway, budget_nanousd=10 ** 12)
    raw = json.dumps(dict(fields, model="acme-1")).encode()
    headers = ANTHROPIC_HEADERS if path.startswith("/v1/messages") else None
    reply = send(gateway, raw, secret, path, headers)
    assert reply.status == 200, reply.body
    [entry] = upstream.reported
    [row] = gateway.rows()
    assert row["status"] == "ok"
    assert row["reserved_nanousd"] == worst(raw, output_limit)
    assert (row["request_tokens"], row["response_tokens"]) == reported_tokens(entry)
    assert row["cost_nanousd"] == real_cost(entry)
    month_start = llmgw.budget_period_bounds(time.time(), "monthly")[0]
    assert row["budget_period_start"] == month_start
    assert spend_rows(gateway, key_id) == [(month_start, real_cost(entry), 0, 0)]


def test_count_tokens_reserves_nothing_but_an_exhausted_budget_stops_it(make_gateway, upstream):
    gateway = make_gateway(pricing=PRICES)
    raw = json.dumps({"model": "acme-1", "messages": [{"role": "user", "content": "hi"}]}).encode()
    key_id, secret = new_key(gateway, budget_nanousd=1000)
    reply = send(gateway, raw, secret, "/v1/messages/count_tokens", ANTHROPIC_HEADERS)
    assert reply.status == 200, reply.body
    assert [row["reserved_nanousd"] for row in gateway.rows()] == [0]
    spent_id, spent_secret = new_key(gateway, budget_nanousd=0)
    reply = send(gateway, raw, spent_secret, "/v1/messages/count_tokens", ANTHROPIC_HEADERS)
    assert_budget_refusal(reply, "anthropic")
    assert len(upstream.requests) == 1


@pytest.mark.parametrize("path, fields, completions", [
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "n": 3}, 3),
    ("/v1/completions", {"prompt": "hi", "n": 2, "best_of": 3}, 3),
])
def test_worst_case_covers_every_generated_choice(make_gateway, upstream, path, fields, completions):
    """``n`` choices (and legacy ``best_of`` candidates) are each up to
    max_tokens long and all billed: the bound must multiply."""
    gateway = make_gateway(pricing=PRICES)
    _, secret = new_key(gateway, budget_nanousd=10 ** 12)
    raw = json.dumps(dict(fields, model="acme-1", max_tokens=100)).encode()
    assert send(gateway, raw, secret, path).status == 200
    [row] = gateway.rows()
    assert row["reserved_nanousd"] >= worst(raw, completions * 100)


@pytest.mark.parametrize("above_tokens, tier_reached", [(-1, True), (0, False)], ids=["reached", "not reached"])
def test_worst_case_reaches_the_long_context_tier(make_gateway, upstream, above_tokens, tier_reached):
    """Body bytes bound the prompt: past the tier's threshold, the worst
    case is at the tier's costliest input price and its output price."""
    raw = chat_raw("acme-lc", max_tokens=100)
    tier = {"above_tokens": len(raw) + above_tokens, "input": 5, "output": 7, "cache_write": 9}
    gateway = make_gateway(pricing={"acme-lc": {"input": 1, "output": 2, "long_context": tier}})
    _, secret = new_key(gateway, budget_nanousd=10 ** 12)
    assert send(gateway, raw, secret).status == 200
    [row] = gateway.rows()
    assert row["reserved_nanousd"] == (worst(raw, 100, 9, 7) if tier_reached else worst(raw, 100, 1, 2))


def budget_burst(targets, gateway, upstream, count=50, admits=10):
    """``count`` concurrent calls spread over ``targets`` with a key whose
    budget admits ``admits`` worst cases (plus half of one). The provider
    holds every call it receives until the others were refused (or one too
    many reached it), so no settlement frees budget during the burst."""
    raw = chat_raw("acme-1-held", max_tokens=100)
    reservation = worst(raw, 100)
    budget = admits * reservation + reservation // 2
    key_id, secret = new_key(gateway, budget_nanousd=budget)
    upstream.reset()
    answered = []

    def one(i):
        reply = send(targets[i % len(targets)], raw, secret)
        answered.append(reply)
        return reply
    releaser = threading.Thread(target=lambda: (wait_until(
        lambda: len(answered) >= count - admits or len(upstream.requests) > admits, timeout=20), upstream.release()))
    releaser.start()
    replies = concurrently(count, one)
    releaser.join()
    ok = [reply for reply in replies if reply.status == 200]
    refused = [reply for reply in replies if reply.status != 200]
    assert len(ok) == admits, [reply.status for reply in replies]
    assert len(upstream.requests) == admits
    month_end = llmgw.iso_time(llmgw.budget_period_bounds(time.time(), "monthly")[1])
    for reply in refused:
        assert_budget_refusal(reply, resets="the budget resets at %s" % month_end)
    rows = gateway.rows()
    assert len(rows) == admits and {row["status"] for row in rows} == {"ok"}
    assert {row["reserved_nanousd"] for row in rows} == {reservation}
    costs = sorted(real_cost(entry) for entry in upstream.reported)
    assert sorted(row["cost_nanousd"] for row in rows) == costs
    [(_, spent, reserved, topup)] = spend_rows(gateway, key_id)
    assert (spent, reserved, topup) == (sum(costs), 0, 0)
    assert spent <= budget
    return key_id


def test_fifty_concurrent_requests_never_overshoot_the_budget(make_gateway, upstream):
    gateway = make_gateway(pricing=PRICES)
    budget_burst([gateway], gateway, upstream)


def test_budget_holds_across_two_gateways_on_one_database(make_gateway, upstream):
    first = make_gateway(pricing=PRICES)
    second = make_gateway(pricing=PRICES)
    assert first.store is not second.store and first.db_path == second.db_path
    budget_burst([first, second], first, upstream)


def start_child_gateway(tmp_path, upstream, database_url=None, **sections):
    """``python llmgw.py`` on the test's database (SQLite's gateway.db, or
    ``database_url``) and a config.yaml of its own (the provider keys are in
    it; clean_environment keeps the shell's out)."""
    document = base_config(upstream.url, **database_section(database_url), **sections)
    document["server"] = dict(document["server"], port=0)
    document["logging"] = {"level": "INFO"}  # the start-up line names the port
    config = tmp_path / "child-config.yaml"
    config.write_text(json.dumps(document))
    env = {"CONFIG_PATH": str(config), "DB_PATH": str(tmp_path / "gateway.db")}
    return GatewayProcess(tmp_path, env, entry="llmgw", name="child").start()


def test_budget_holds_across_two_gateway_processes(make_gateway, upstream, tmp_path):
    here = make_gateway(pricing=PRICES)
    child = start_child_gateway(tmp_path, upstream, here.database_url, pricing=PRICES)
    try:
        budget_burst([here, child], here, upstream)
    finally:
        code = child.terminate(10)
    assert code == 0, child.log()


def test_provider_reporting_more_than_the_bound_is_recorded_and_stops_the_key(make_gateway, upstream):
    """max_tokens 1, but the fake answers 5+ tokens: the truth is booked,
    the key is over budget and its next request is refused."""
    gateway = make_gateway(pricing=PRICES)
    raw = chat_raw("acme-2", max_tokens=1)
    reservation = worst(raw, 1, 1, 100000)
    key_id, secret = new_key(gateway, budget_nanousd=reservation)
    assert send(gateway, raw, secret).status == 200
    [entry] = upstream.reported
    cost = real_cost(entry, 1, 100000)
    assert cost > reservation
    [row] = gateway.rows()
    assert (row["reserved_nanousd"], row["cost_nanousd"]) == (reservation, cost)
    assert [spend[1:] for spend in spend_rows(gateway, key_id)] == [(cost, 0, 0)]
    assert_budget_refusal(send(gateway, raw, secret))
    info = key_info(gateway, secret).json()
    assert (info["spent"], info["remaining"]) == (usd(cost), 0.0)
    assert len(upstream.requests) == 1


def test_budgeted_key_refuses_an_unpriced_model(make_gateway, upstream):
    gateway = make_gateway()
    key_id, secret = new_key(gateway, budget_nanousd=10 ** 9)
    raw = chat_raw("acme-unpriced")
    reply = send(gateway, raw, secret)
    assert reply.status == 403
    error = reply.json()["error"]
    assert (error["type"], error["code"], error["param"]) == ("permission_error", "model_not_priced", None)
    # The message names the exact config line to add; filled in, it prices the model.
    line = '"acme-unpriced": {input: <USD per 1M input tokens>, output: <USD per 1M output tokens>}'
    assert error["message"] == ("Model acme-unpriced has no price, and this key has a budget: its spend could not "
                                "be bounded. Price it in config.yaml: under pricing:, add the line   " + line)
    filled = line.replace("<USD per 1M input tokens>", "1").replace("<USD per 1M output tokens>", "3")
    priced = llmgw.parse_config(yaml.safe_load("pricing:\n  " + filled))
    assert llmgw.PriceTable.build(priced.pricing).lookup("acme-unpriced").output == 3
    reply = send(gateway, raw, secret, "/v1/messages", ANTHROPIC_HEADERS)
    assert reply.status == 403
    assert reply.json()["type"] == "error" and reply.json()["error"]["type"] == "permission_error"
    assert upstream.requests == [] and gateway.rows() == []
    # Without a budget the same model passes, booked unpriced at cost 0.
    free_id, free_secret = new_key(gateway)
    assert send(gateway, raw, free_secret).status == 200
    [row] = gateway.rows()
    assert (row["virtual_key_id"], row["cost_nanousd"], row["priced"]) == (free_id, 0, 0)


def test_default_price_lets_a_budgeted_key_use_any_model(make_gateway, upstream):
    gateway = make_gateway(pricing={"default": {"input": 2, "output": 5}})
    key_id, secret = new_key(gateway, budget_nanousd=10 ** 9)
    raw = chat_raw("acme-unpriced", max_tokens=64)
    assert send(gateway, raw, secret).status == 200
    [entry] = upstream.reported
    [row] = gateway.rows()
    assert row["reserved_nanousd"] == worst(raw, 64, 2, 5)
    assert (row["cost_nanousd"], row["priced"]) == (real_cost(entry, 2, 5), 1)


def test_reservation_of_a_killed_process_is_settled_at_the_next_start(make_gateway, upstream, tmp_path):
    first = make_gateway(pricing=PRICES)
    raw = chat_raw()
    reservation = 3 * worst(raw, 100)
    budget = reservation + 2 * worst(raw, 100)
    key_id, secret = new_key(first, budget_nanousd=budget, budget_period="daily")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait(10)
    start = llmgw.budget_period_bounds(time.time(), "daily")[0]
    query(first, "INSERT INTO key_spend (key_id, period_start, spent_nanousd, reserved_nanousd) "
                 "VALUES (?, ?, 0, ?)", (key_id, start, reservation))
    query(first, "INSERT INTO gateway_processes (owner, host, pid, started_at, heartbeat_at) "
                 "VALUES ('killed-gateway', ?, ?, ?, ?)", (socket.gethostname(), dead.pid, time.time() - 5, time.time()))
    query(first, "INSERT INTO usage (request_id, virtual_key_id, provider, endpoint, model, streamed, status, "
                 "started_at, owner, reserved_nanousd, budget_period_start) "
                 "VALUES ('killed-1', ?, 'openai', '/v1/chat/completions', 'acme-1', 0, 'pending', ?, "
                 "'killed-gateway', ?, ?)", (key_id, time.time() - 1, reservation, start))
    assert key_info(first, secret).json()["reserved"] == usd(reservation)
    second = make_gateway(pricing=PRICES)  # make_server recovers rows of dead owners
    [row] = second.rows()
    assert (row["status"], row["cost_nanousd"], row["reserved_nanousd"], row["usage_source"]) == (
        "interrupted", reservation, 0, "estimated")
    assert row["finished_at"] is not None
    assert spend_rows(second, key_id) == [(start, reservation, 0, 0)]
    info = key_info(second, secret).json()
    assert (info["spent"], info["reserved"], info["remaining"]) == (
        usd(reservation), 0.0, usd(budget - reservation))
    assert send(second, raw, secret).status == 200


# ---- RPM, TPM, parallel --------------------------------------------------------

def test_rpm_is_shared_by_two_gateways_on_one_database(make_gateway, upstream):
    # Both gateways' clocks stand in the middle of a minute: one turning
    # mid-test moved the counts to previous_requests (seen failing).
    clock = FakeClock(time.time() // 60 * 60 + 30)
    first, second = make_gateway(clock=clock), make_gateway(clock=clock)
    key_id, secret = new_key(first, rpm=10)
    raw = chat_raw("gpt-4o-mini")
    assert [send(first, raw, secret).status for _ in range(5)] == [200] * 5
    wait_published(first, key_id, "requests", 5, second)
    assert [send(second, raw, secret).status for _ in range(5)] == [200] * 5
    assert_rate_refusal(send(second, raw, secret), "requests", 10)  # second knows all ten
    assert wait_until(lambda: sorted(row[0] for row in query(
        first, "SELECT requests FROM key_activity WHERE key_id = ?", (key_id,))) == [5, 5])
    wait_synced(first)
    assert_rate_refusal(send(first, raw, secret), "requests", 10)  # first learnt of second's
    assert len(upstream.requests) == 10


@pytest.mark.parametrize("stream", [False, True])
def test_tpm_counts_reported_tokens(make_gateway, upstream, stream):
    gateway = make_gateway()
    key_id, secret = new_key(gateway, tpm=10)
    raw = chat_raw("gpt-4o-mini", stream=stream)
    reply = send(gateway, raw, secret)
    assert reply.status == 200
    [entry] = upstream.reported
    assert sum(reported_tokens(entry)) > 10
    [row] = gateway.rows()
    assert (row["request_tokens"], row["response_tokens"]) == reported_tokens(entry)
    assert_rate_refusal(send(gateway, raw, secret), "tokens", 10)
    assert len(upstream.requests) == 1


def test_tpm_is_shared_by_two_gateways(make_gateway, upstream):
    clock = FakeClock(time.time() // 60 * 60 + 30)  # no minute turns mid-test
    first, second = make_gateway(clock=clock), make_gateway(clock=clock)
    key_id, secret = new_key(first, tpm=10)
    raw = chat_raw("gpt-4o-mini")
    assert send(first, raw, secret).status == 200
    wait_published(first, key_id, "tokens", sum(reported_tokens(upstream.reported[0])), second)
    assert_rate_refusal(send(second, raw, secret), "tokens", 10)
    assert len(upstream.requests) == 1


def test_max_parallel_limits_requests_in_flight(make_gateway, upstream):
    gateway = make_gateway()
    key_id, secret = new_key(gateway, max_parallel=2)
    raw = chat_raw("gpt-4o-slow")
    replies = []
    threads = [threading.Thread(target=lambda: replies.append(send(gateway, raw, secret))) for _ in range(2)]
    for thread in threads:
        thread.start()
    assert upstream.wait_for_requests(2)
    third = send(gateway, raw, secret)
    assert third.status == 429
    assert third.json()["error"]["code"] == "rate_limit_exceeded"
    assert third.json()["error"]["message"] == "Limit of 2 requests in flight reached; retry when one finishes"
    assert third.header("retry-after") == "1"
    for thread in threads:
        thread.join(10)
    assert [reply.status for reply in replies] == [200, 200]
    assert send(gateway, chat_raw("gpt-4o-mini"), secret).status == 200  # the slots came back
    assert len(upstream.requests) == 3


# ---- expiry ----------------------------------------------------------------------

def test_key_expires_at_the_boundary_like_a_revoked_key(make_gateway, upstream):
    clock = FakeClock(time.time())
    gateway = make_gateway(clock=clock)
    record, secret = llmgw.create_virtual_key(gateway.store, gateway.config, "expiring",
                                              {"expires_in": "1h"}, now=clock())
    assert record["expires_at"] == llmgw.iso_time(clock.now + 3600)
    at_record, at_secret = llmgw.create_virtual_key(gateway.store, gateway.config, "expiring at",
                                                    {"expires_at": llmgw.iso_time(clock.now + 7200)})
    raw = chat_raw("gpt-4o-mini")
    clock.now += 3599
    assert send(gateway, raw, secret).status == 200
    assert key_info(gateway, secret).status == 200
    clock.now += 1
    for reply in (send(gateway, raw, secret), key_info(gateway, secret)):
        assert (reply.status, reply.json()) == (401, REVOKED)
    reply = send(gateway, raw, secret, "/v1/messages", ANTHROPIC_HEADERS)
    assert (reply.status, reply.json()) == (401, REVOKED_ANTHROPIC)
    assert send(gateway, raw, at_secret).status == 200
    clock.now = llmgw.parse_time_bound(at_record["expires_at"])
    assert (send(gateway, raw, at_secret).status, send(gateway, raw, at_secret).json()) == (401, REVOKED)
    assert len(upstream.requests) == 2


def test_key_created_already_expired_is_refused_like_a_revoked_one(gateway, upstream):
    expired_id, expired = new_key(gateway, expires_at="2020-01-01T00:00:00Z")
    revoked_id, revoked = new_key(gateway)
    assert gateway.store.revoke_key(revoked_id)
    raw = chat_raw("gpt-4o-mini")
    for secret in (expired, revoked):
        reply = send(gateway, raw, secret)
        assert (reply.status, reply.json()) == (401, REVOKED)
        reply = send(gateway, raw, secret, "/v1/messages", ANTHROPIC_HEADERS)
        assert (reply.status, reply.json()) == (401, REVOKED_ANTHROPIC)
    assert upstream.requests == []


# ---- model allowlist ---------------------------------------------------------------

ALLOWLIST_ROUTES = [
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}, "gpt-4o-mini", "gpt-3.5-turbo"),
    ("/v1/completions", {"prompt": "hi"}, "gpt-4o-mini", "gpt-3.5-turbo"),
    ("/v1/embeddings", {"input": "hi"}, "gpt-4o-mini", "text-embedding-3-small"),
    ("/v1/responses", {"input": "hi"}, "gpt-4o", "o3"),
    ("/v1/messages", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 16},
     "claude-3-5-haiku-20241022", "claude-3-opus-20240229"),
    ("/v1/messages/count_tokens", {"messages": [{"role": "user", "content": "hi"}]},
     "claude-3-5-haiku-20241022", "claude-3-opus-20240229"),
]


@pytest.mark.parametrize("path, fields, allowed, refused", ALLOWLIST_ROUTES,
                         ids=[route[0] for route in ALLOWLIST_ROUTES])
def test_model_allowlist_on_every_route(gateway, upstream, path, fields, allowed, refused):
    key_id, secret = new_key(gateway, models=["gpt-4o*", "claude-3-5-haiku-*"])
    anthropic = path.startswith("/v1/messages")
    headers = dict(ANTHROPIC_HEADERS, **{"x-api-key": secret}) if anthropic else None
    key = None if anthropic else secret
    for stream in (False, True):
        body = dict(fields, model=refused)
        if stream and path != "/v1/embeddings" and path != "/v1/messages/count_tokens":
            body["stream"] = True
        reply = post(gateway, path, body, key=key, headers=headers)
        message = "This key may not use model %s" % refused
        if anthropic:
            assert (reply.status, reply.json()) == (403, {"type": "error", "error": {
                "type": "permission_error", "message": message}})
        else:
            assert (reply.status, reply.json()) == (403, {"error": {
                "message": message, "type": "permission_error", "param": None, "code": "model_not_allowed"}})
    assert upstream.requests == [] and gateway.rows() == []
    reply = post(gateway, path, dict(fields, model=allowed), key=key, headers=headers)
    assert reply.status == 200, reply.body
    assert [request["json"]["model"] for request in upstream.requests] == [allowed]


def test_model_allowlist_matches_the_provider_prefixed_form(gateway, upstream):
    _, openai_only = new_key(gateway, models=["openai/gpt-4o-mini"])
    _, claude_only = new_key(gateway, models=["anthropic/claude-*"])
    chat = {"messages": [{"role": "user", "content": "hi"}]}
    messages = dict(chat, max_tokens=16)
    assert post(gateway, "/v1/chat/completions", dict(chat, model="gpt-4o-mini"), openai_only).status == 200
    assert post(gateway, "/v1/chat/completions", dict(chat, model="openai/gpt-4o-mini"), openai_only).status == 200
    assert post(gateway, "/v1/chat/completions", dict(chat, model="gpt-4o"), openai_only).status == 403
    assert post(gateway, "/v1/messages", dict(messages, model="claude-sonnet-4-5"), claude_only,
                headers=ANTHROPIC_HEADERS).status == 200
    assert post(gateway, "/v1/messages", dict(messages, model="anthropic/claude-sonnet-4-5"), claude_only,
                headers=ANTHROPIC_HEADERS).status == 200
    # Not the other provider's route to a claude-named model, nor a lookalike prefix.
    assert post(gateway, "/v1/chat/completions", dict(chat, model="openai/claude-sonnet-4-5"),
                claude_only).status == 403
    assert post(gateway, "/v1/chat/completions", dict(chat, model="gpt-4o-mini"), claude_only).status == 403
    assert [request["json"]["model"] for request in upstream.requests] == [
        "gpt-4o-mini", "gpt-4o-mini", "claude-sonnet-4-5", "claude-sonnet-4-5"]


# ---- rotation ------------------------------------------------------------------------

def test_cli_rotate_with_grace(make_gateway, upstream, cli_main):
    clock = FakeClock(time.time())
    gateway = make_gateway(clock=clock, pricing=PRICES)
    key_id, old = new_key(gateway, budget_nanousd=10 ** 12)
    raw = chat_raw()
    assert send(gateway, raw, old).status == 200
    code, out, err = cli_main("keys", "rotate", key_id, "--grace", "1h")
    assert (code, err) == (0, "")
    match = re.search(r"^New key for %s \(shown once, store it now\): (llmgw-\S+)$" % key_id, out, re.M)
    assert match, out
    new = match.group(1)
    assert new != old
    assert re.search(r"^The previous key works until \d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ\.$", out, re.M)
    clock.now += 3500
    assert send(gateway, raw, new).status == 200
    assert send(gateway, raw, old).status == 200
    assert key_info(gateway, old).json()["id"] == key_id
    clock.now += 200
    assert (send(gateway, raw, old).status, key_info(gateway, old).status) == (401, 401)
    assert send(gateway, raw, new).status == 200
    rows = gateway.rows()
    assert len(rows) == 4 and {row["virtual_key_id"] for row in rows} == {key_id}
    info = key_info(gateway, new).json()
    assert info["spent"] == usd(sum(row["cost_nanousd"] for row in rows))  # the budget stayed with the id
    code, out, err = cli_main("keys", "list", "--output", "json")
    [listed] = json.loads(out)
    assert (listed["id"], listed["key_hint"]) == (key_id, "llmgw-..." + new[-4:])
    assert old not in out and new not in out


def test_cli_rotate_refuses_unknown_and_revoked_keys(gateway, cli_main):
    key_id, _ = new_key(gateway)
    assert gateway.store.revoke_key(key_id)
    for target in ("vk_000000000000", key_id):
        code, out, err = cli_main("keys", "rotate", target, "--grace", "1h")
        assert code == 1 and INVALID_ONE_LINE.match(err), err
    code, out, err = cli_main("keys", "rotate", key_id, "--grace", "forever")
    assert code == 1 and INVALID_ONE_LINE.match(err), err


def test_admin_rotate_with_grace(make_gateway, upstream):
    clock = FakeClock(at("2026-03-04T10:00:00Z"))
    gateway = make_gateway(clock=clock, environ={"LLMGW_ADMIN_TOKEN": ADMIN_TOKEN})
    key_id, old = new_key(gateway)
    raw = chat_raw("gpt-4o-mini")
    reply = admin(gateway, "POST", "/admin/virtual-keys/%s/rotate" % key_id, {"grace": "1h"})
    assert reply.status == 200, reply.body
    body = reply.json()
    new = body["key"]
    assert (body["id"], body["previous_key_valid_until"]) == (key_id, "2026-03-04T11:00:00Z")
    assert body["key_hint"] == "llmgw-..." + new[-4:] and new != old
    clock.now = at("2026-03-04T10:59:59Z")
    assert (send(gateway, raw, old).status, send(gateway, raw, new).status) == (200, 200)
    clock.now = at("2026-03-04T11:00:00Z")
    assert (send(gateway, raw, old).json(), send(gateway, raw, new).status) == (REVOKED, 200)
    # No grace: the old secret stops at once.
    reply = admin(gateway, "POST", "/admin/virtual-keys/%s/rotate" % key_id, {})
    newest = reply.json()["key"]
    assert reply.json()["previous_key_valid_until"] == "2026-03-04T11:00:00Z"
    assert (send(gateway, raw, new).status, send(gateway, raw, newest).status) == (401, 200)
    assert {row["virtual_key_id"] for row in gateway.rows()} == {key_id} and len(gateway.rows()) == 4
    assert admin(gateway, "POST", "/admin/virtual-keys/vk_000000000000/rotate", {}).status == 404
    reply = admin(gateway, "POST", "/admin/virtual-keys/%s/rotate" % key_id, {"grace": "forever"})
    assert (reply.status, reply.json()["error"]["code"]) == (400, "invalid_request")
    assert send(gateway, raw, newest).status == 200  # a refused rotation changed nothing


# ---- periods ---------------------------------------------------------------------------

@pytest.mark.parametrize("period, now, start, end", [
    ("daily", "2026-03-04T13:45:10Z", "2026-03-04T00:00:00Z", "2026-03-05T00:00:00Z"),
    ("daily", "2026-03-04T00:00:00Z", "2026-03-04T00:00:00Z", "2026-03-05T00:00:00Z"),
    ("daily", "2026-12-31T23:59:59Z", "2026-12-31T00:00:00Z", "2027-01-01T00:00:00Z"),
    ("weekly", "2026-03-04T13:45:10Z", "2026-03-02T00:00:00Z", "2026-03-09T00:00:00Z"),  # Wednesday
    ("weekly", "2026-03-08T23:59:59Z", "2026-03-02T00:00:00Z", "2026-03-09T00:00:00Z"),  # Sunday
    ("weekly", "2026-03-09T00:00:00Z", "2026-03-09T00:00:00Z", "2026-03-16T00:00:00Z"),  # Monday
    ("weekly", "2026-03-01T12:00:00Z", "2026-02-23T00:00:00Z", "2026-03-02T00:00:00Z"),  # across a month
    ("monthly", "2026-02-15T10:00:00Z", "2026-02-01T00:00:00Z", "2026-03-01T00:00:00Z"),
    ("monthly", "2026-01-31T23:59:59Z", "2026-01-01T00:00:00Z", "2026-02-01T00:00:00Z"),
    ("monthly", "2026-12-31T23:59:59Z", "2026-12-01T00:00:00Z", "2027-01-01T00:00:00Z"),
    ("monthly", "2028-02-29T12:00:00Z", "2028-02-01T00:00:00Z", "2028-03-01T00:00:00Z"),
    ("monthly", "2026-03-01T00:00:00Z", "2026-03-01T00:00:00Z", "2026-04-01T00:00:00Z"),
])
def test_budget_period_bounds(period, now, start, end):
    assert llmgw.budget_period_bounds(at(now), period) == (at(start), at(end))


def test_budget_period_never_is_one_period():
    assert llmgw.budget_period_bounds(at("2026-03-04T13:45:10Z"), "never") == (0.0, None)
    assert llmgw.budget_period_bounds(at("2099-03-04T13:45:10Z"), "never") == (0.0, None)


@pytest.mark.parametrize("period, first, last_moment, next_start", [
    ("daily", "2026-03-04T10:00:00Z", "2026-03-04T23:59:59Z", "2026-03-05T00:00:00Z"),
    ("weekly", "2026-03-04T10:00:00Z", "2026-03-08T23:59:59Z", "2026-03-09T00:00:00Z"),
    ("monthly", "2026-02-15T10:00:00Z", "2026-02-28T23:59:59Z", "2026-03-01T00:00:00Z"),
])
def test_budget_resets_at_the_period_boundary(make_gateway, upstream, period, first, last_moment, next_start):
    clock = FakeClock(at(first))
    gateway = make_gateway(clock=clock, pricing=PRICES)
    raw = chat_raw()
    reservation = worst(raw, 100)
    key_id, secret = new_key(gateway, budget_nanousd=reservation, budget_period=period)
    assert send(gateway, raw, secret).status == 200
    first_cost = real_cost(upstream.reported[0])
    clock.now = at(last_moment)
    assert_budget_refusal(send(gateway, raw, secret), resets="the budget resets at %s" % next_start)
    reply = send(gateway, raw, secret, "/v1/messages", ANTHROPIC_HEADERS)
    assert_budget_refusal(reply, "anthropic", resets="the budget resets at %s" % next_start)
    info = key_info(gateway, secret).json()
    assert (info["spent"], info["remaining"], info["period_end"]) == (
        usd(first_cost), usd(reservation - first_cost), next_start)
    clock.now = at(next_start)
    assert send(gateway, raw, secret).status == 200
    second_cost = real_cost(upstream.reported[1])
    assert spend_rows(gateway, key_id) == [
        (llmgw.budget_period_bounds(at(first), period)[0], first_cost, 0, 0), (at(next_start), second_cost, 0, 0)]
    info = key_info(gateway, secret).json()
    assert (info["period_start"], info["spent"], info["remaining"]) == (
        next_start, usd(second_cost), usd(reservation - second_cost))
    assert len(upstream.requests) == 2


def test_never_period_is_a_prepaid_balance_topped_up_by_the_admin_api(make_gateway, upstream):
    clock = FakeClock(at("2026-03-04T10:00:00Z"))
    gateway = make_gateway(clock=clock, pricing=PRICES, environ={"LLMGW_ADMIN_TOKEN": ADMIN_TOKEN})
    raw = chat_raw()
    reservation = worst(raw, 100)
    key_id, secret = new_key(gateway, budget_nanousd=reservation, budget_period="never")
    assert send(gateway, raw, secret).status == 200
    first_cost = real_cost(upstream.reported[0])
    clock.now = at("2027-06-01T00:00:00Z")  # no period ever ends
    assert_budget_refusal(send(gateway, raw, secret), resets="the budget never resets (top it up)")
    info = key_info(gateway, secret).json()
    assert (info["period_start"], info["period_end"], info["budget"]) == ("1970-01-01T00:00:00Z", None,
                                                                         usd(reservation))
    reply = admin(gateway, "POST", "/admin/virtual-keys/%s/topup" % key_id, {"amount": usd(reservation)})
    assert reply.status == 200, reply.body
    assert reply.json()["max_budget"] == usd(reservation)  # the key's budget; the top-up is on top
    assert send(gateway, raw, secret).status == 200
    second_cost = real_cost(upstream.reported[1])
    assert spend_rows(gateway, key_id) == [(0.0, first_cost + second_cost, 0, reservation)]
    info = key_info(gateway, secret).json()
    assert (info["budget"], info["spent"], info["remaining"]) == (
        usd(2 * reservation), usd(first_cost + second_cost), usd(2 * reservation - first_cost - second_cost))


def test_admin_topup_raises_only_the_current_period(make_gateway, upstream):
    clock = FakeClock(at("2026-03-04T10:00:00Z"))
    gateway = make_gateway(clock=clock, pricing=PRICES, environ={"LLMGW_ADMIN_TOKEN": ADMIN_TOKEN})
    raw = chat_raw()
    reservation = worst(raw, 100)
    key_id, secret = new_key(gateway, budget_nanousd=reservation, budget_period="daily")
    assert send(gateway, raw, secret).status == 200
    assert_budget_refusal(send(gateway, raw, secret))
    assert admin(gateway, "POST", "/admin/virtual-keys/%s/topup" % key_id, {"amount": usd(reservation)}).status == 200
    assert send(gateway, raw, secret).status == 200
    assert key_info(gateway, secret).json()["budget"] == usd(2 * reservation)
    clock.now = at("2026-03-05T00:00:00Z")
    info = key_info(gateway, secret).json()
    assert (info["budget"], info["spent"], info["remaining"]) == (usd(reservation), 0.0, usd(reservation))
    stats = admin(gateway, "GET", "/admin/usage-stats").json()
    assert [(row["max_budget"], row["budget_spent"]) for row in stats] == [(usd(reservation), 0.0)]


@pytest.mark.parametrize("body", [{}, {"amount": 0}, {"amount": -1}, {"amount": "5"}, {"amount": True},
                                  {"amount": None}])
def test_admin_topup_refuses_bad_amounts(make_gateway, body):
    gateway = make_gateway(environ={"LLMGW_ADMIN_TOKEN": ADMIN_TOKEN})
    key_id, _ = new_key(gateway, max_budget=1)
    reply = admin(gateway, "POST", "/admin/virtual-keys/%s/topup" % key_id, body)
    assert (reply.status, reply.json()["error"]["code"]) == (400, "invalid_request")
    assert spend_rows(gateway, key_id) == [] or spend_rows(gateway, key_id)[0][3] == 0


def test_admin_topup_needs_a_budgeted_key(make_gateway):
    """A key without a budget: 400 saying so; an unknown key: 404, as for
    every other action on a key (one error per failure)."""
    gateway = make_gateway(environ={"LLMGW_ADMIN_TOKEN": ADMIN_TOKEN})
    key_id, _ = new_key(gateway)
    for target, status, words in ((key_id, 400, "no budget"), ("vk_000000000000", 404, "No virtual key")):
        reply = admin(gateway, "POST", "/admin/virtual-keys/%s/topup" % target, {"amount": 5})
        assert reply.status == status, reply.body
        assert words in reply.json()["error"]["message"]


def test_cli_topup(make_gateway, upstream, cli_main):
    gateway = make_gateway(pricing=PRICES)
    raw = chat_raw()
    reservation = worst(raw, 100)
    key_id, secret = new_key(gateway, budget_nanousd=reservation, budget_period="daily")
    assert send(gateway, raw, secret).status == 200
    assert_budget_refusal(send(gateway, raw, secret))
    code, out, err = cli_main("keys", "topup", key_id, usd(reservation))
    assert (code, err) == (0, "") and key_id in out
    assert send(gateway, raw, secret).status == 200
    [(start, spent, reserved, topup)] = spend_rows(gateway, key_id)
    assert (start, reserved, topup) == (llmgw.budget_period_bounds(time.time(), "daily")[0], 0, reservation)
    unbudgeted_id, _ = new_key(gateway)
    for args in ((unbudgeted_id, "1"), ("vk_000000000000", "1"), (key_id, "0"), (key_id, "-1"), (key_id, "nan")):
        code, out, err = cli_main("keys", "topup", *args)
        assert code == 1 and INVALID_ONE_LINE.match(err), (args, err)
    assert spend_rows(gateway, key_id)[0][3] == reservation


def test_budget_added_later_counts_what_was_spent_meanwhile(make_gateway, upstream):
    """A budget removed and set again in the same period starts from all the
    period's spend, including what was spent while the key had none."""
    gateway = make_gateway(pricing=PRICES, environ={"LLMGW_ADMIN_TOKEN": ADMIN_TOKEN})
    raw = chat_raw()
    key_id, secret = new_key(gateway, budget_nanousd=100 * worst(raw, 100))
    assert send(gateway, raw, secret).status == 200
    assert admin(gateway, "PATCH", "/admin/virtual-keys/%s" % key_id, {"max_budget": None}).status == 200
    assert send(gateway, chat_raw(text="second"), secret).status == 200
    assert admin(gateway, "PATCH", "/admin/virtual-keys/%s" % key_id,
                 {"max_budget": usd(100 * worst(raw, 100))}).status == 200
    spent = sum(real_cost(entry) for entry in upstream.reported)
    assert key_info(gateway, secret).json()["spent"] == usd(spent)


def test_changing_the_period_keeps_spend_exact(make_gateway, upstream):
    """Spend is what was charged: a settled row's reservation is not spend."""
    clock = FakeClock(at("2026-03-04T10:00:00Z"))
    gateway = make_gateway(clock=clock, pricing=PRICES, environ={"LLMGW_ADMIN_TOKEN": ADMIN_TOKEN})
    raw = chat_raw()
    key_id, secret = new_key(gateway, budget_nanousd=100 * worst(raw, 100), budget_period="daily")
    assert send(gateway, raw, secret).status == 200
    cost = real_cost(upstream.reported[0])
    assert key_info(gateway, secret).json()["spent"] == usd(cost)
    assert admin(gateway, "PATCH", "/admin/virtual-keys/%s" % key_id, {"budget_period": "monthly"}).status == 200
    assert key_info(gateway, secret).json()["spent"] == usd(cost)


# ---- self-service key info -------------------------------------------------------------

def test_key_info_reports_own_limits_and_spend_only(make_gateway, upstream):
    gateway = make_gateway(pricing=PRICES, rate_limits={"default": 100, "premium": 1000})
    raw = chat_raw()
    budget = 10 * worst(raw, 100)
    key_id, secret = new_key(gateway, "alpha", budget_nanousd=budget, budget_period="daily", rpm=7, tpm=5000,
                             max_parallel=3, expires_in="30d", models=["acme-*", "gpt-4o*"],
                             metadata={"team": "search"})
    other_id, other = new_key(gateway, "beta", tier="premium")
    assert send(gateway, raw, secret).status == 200
    assert send(gateway, raw, other).status == 200
    cost = real_cost(upstream.reported[0])
    start, end = llmgw.budget_period_bounds(time.time(), "daily")
    record = gateway.store.get_key(key_id)
    expected = {"id": key_id, "project_name": "alpha", "tier": "default", "rpm": 7, "tpm": 5000, "max_parallel": 3,
                "max_budget": usd(budget), "budget_period": "daily", "expires_at": record["expires_at"],
                "models": ["acme-*", "gpt-4o*"], "metadata": {"team": "search"}, "log_bodies": False,
                "alert_thresholds": None, "is_active": True,
                "created_at": record["created_at"], "revoked_at": None, "period_start": llmgw.iso_time(start),
                "period_end": llmgw.iso_time(end), "spent": usd(cost), "reserved": 0.0, "budget": usd(budget),
                "remaining": usd(budget - cost), "budget_admission": "strict", "budget_overshoot": None}
    assert abs(llmgw.parse_time_bound(record["expires_at"]) - (time.time() + 30 * 86400)) < 5
    for headers in (None, {"x-api-key": secret}):
        reply = key_info(gateway, None if headers else secret, headers=headers)
        assert (reply.status, reply.json()) == (200, expected)
    # A query string cannot select another key.
    assert key_info(gateway, secret, headers=None).json()["id"] == key_id
    assert call(gateway, "GET", "/v1/key/info?id=%s&key_id=%s" % (other_id, other_id), key=secret).json() == expected
    other_info = key_info(gateway, other).json()
    assert (other_info["id"], other_info["rpm"], other_info["budget"], other_info["period_start"],
            other_info["remaining"]) == (other_id, 1000, None, None, None)
    text = (key_info(gateway, secret).body + key_info(gateway, other).body).decode()
    for secret_text in (secret, other, hashlib.sha256(secret.encode()).hexdigest(),
                        hashlib.sha256(other.encode()).hexdigest(), OPENAI_KEY, ANTHROPIC_KEY):
        assert secret_text not in text
    assert other_id not in key_info(gateway, secret).body.decode()
    assert "key_hash" not in text and "key_hint" not in text
    assert len(upstream.requests) == 2  # key info is never forwarded


def test_key_info_needs_a_valid_key(make_gateway, upstream):
    gateway = make_gateway(environ={"LLMGW_ADMIN_TOKEN": ADMIN_TOKEN})
    key_id, secret = new_key(gateway)
    assert key_info(gateway, None).status == 401
    assert key_info(gateway, ADMIN_TOKEN).status == 401
    assert key_info(gateway, secret + "x").status == 401
    assert call(gateway, "POST", "/v1/key/info", {}, key=secret).status == 405
    assert gateway.store.revoke_key(key_id)
    assert (key_info(gateway, secret).status, key_info(gateway, secret).json()) == (401, REVOKED)
    assert upstream.requests == [] and gateway.rows() == []


# ---- stats -------------------------------------------------------------------------------

def test_stats_by_label_and_budget_use_per_key(make_gateway, upstream, cli_main):
    gateway = make_gateway(pricing=PRICES, environ={"LLMGW_ADMIN_TOKEN": ADMIN_TOKEN})
    raw = chat_raw()
    budget = 20 * worst(raw, 100)
    search_id, search = new_key(gateway, "search", budget_nanousd=budget, metadata={"team": "search"})
    ads_id, ads = new_key(gateway, "ads", metadata={"team": "ads", "owner": "ana"})
    plain_id, plain = new_key(gateway, "plain")
    calls = [(search, "one"), (search, "two"), (ads, "three"), (plain, "four")]
    for secret, text in calls:
        assert send(gateway, chat_raw(text=text), secret).status == 200
    costs = [real_cost(entry) for entry in upstream.reported]
    tokens = [reported_tokens(entry) for entry in upstream.reported]

    def totals(indexes):
        return (len(indexes), sum(tokens[i][0] for i in indexes), sum(tokens[i][1] for i in indexes),
                usd(sum(costs[i] for i in indexes)))
    code, out, err = cli_main("stats", "--by", "label:team", "--output", "json")
    assert (code, err) == (0, "")
    by_label = json.loads(out)
    assert [(row["label"], row["requests"], row["request_tokens"], row["response_tokens"], row["estimated_cost"])
            for row in by_label] == [(None,) + totals([3]), ("ads",) + totals([2]), ("search",) + totals([0, 1])]
    reply = admin(gateway, "GET", "/admin/usage-stats?by=label:team")
    assert (reply.status, reply.json()) == (200, by_label)
    code, out, err = cli_main("stats", "--output", "json")
    by_key = {row["virtual_key_id"]: row for row in json.loads(out)}
    spent = costs[0] + costs[1]
    assert {key: (row["max_budget"], row["budget_spent"], row["budget_used_pct"]) for key, row in by_key.items()} == {
        search_id: (usd(budget), usd(spent), round(100.0 * spent / budget, 2)),
        ads_id: (None, None, None), plain_id: (None, None, None)}
    reply = admin(gateway, "GET", "/admin/usage-stats")
    assert {row["virtual_key_id"]: row for row in reply.json()} == by_key
    code, out, err = cli_main("stats")
    assert "BUDGET USED %" in out and str(round(100.0 * spent / budget, 2)) in out
    code, out, err = cli_main("stats", "--by", "label:team")
    assert code == 0 and "LABEL:TEAM" in out and "search" in out
    code, out, err = cli_main("stats", "--by", "label:bad name")
    assert code == 1 and INVALID_ONE_LINE.match(err), err
    reply = admin(gateway, "GET", "/admin/usage-stats?by=label:x%27%29--")
    assert reply.status == 400


# ---- key policy from the CLI and the admin API ------------------------------------------

def test_cli_create_and_update_with_every_policy_flag(make_gateway, upstream, tmp_path):
    gateway = make_gateway(pricing=PRICES)
    config = write_cli_config(tmp_path, upstream, gateway.database_url, pricing=PRICES)
    env = {"CONFIG_PATH": str(config), "DB_PATH": gateway.db_path}
    result = run_cli(
        ["keys", "create", "Alpha team", "--tier", "premium", "--rpm", "5", "--tpm", "1000", "--max-parallel", "3",
         "--budget", "2.5", "--budget-period", "weekly", "--expires-in", "30d", "--models", "gpt-4o*, claude-*",
         "--label", "team=search", "--label", "owner=ana", "--output", "json"], tmp_path, env)
    assert (result.returncode, result.stderr) == (0, "")
    created = json.loads(result.stdout)
    secret = created.pop("key")
    assert secret.startswith("llmgw-")
    expires = llmgw.parse_time_bound(created.pop("expires_at"))
    assert abs(expires - (time.time() + 30 * 86400)) < 10
    assert {name: created[name] for name in ("project_name", "tier", "rpm", "tpm", "max_parallel", "max_budget",
                                             "budget_period", "models", "metadata", "is_active")} == {
        "project_name": "Alpha team", "tier": "premium", "rpm": 5, "tpm": 1000, "max_parallel": 3,
        "max_budget": 2.5, "budget_period": "weekly", "models": ["gpt-4o*", "claude-*"],
        "metadata": {"team": "search", "owner": "ana"}, "is_active": True}
    key_id = created["id"]
    assert column(gateway, key_id, "max_budget_nanousd") == 2500000000
    # The running gateway enforces what the CLI stored.
    assert send(gateway, chat_raw("o3"), secret).status == 403
    assert send(gateway, chat_raw("gpt-4o-mini"), secret).status == 200
    info = key_info(gateway, secret).json()
    assert (info["rpm"], info["tpm"], info["max_parallel"], info["budget"]) == (5, 1000, 3, 2.5)


def test_cli_update_sets_and_clears(make_gateway, upstream, cli_main):
    gateway = make_gateway(pricing=PRICES)
    key_id, secret = new_key(gateway, rpm=5, tpm=1000, max_parallel=3, max_budget=2.5, expires_in="1h",
                             models=["gpt-4o*"], metadata={"team": "search"})
    code, out, err = cli_main("keys", "update", key_id, "--rpm", "none", "--tpm", "none", "--max-parallel", "none",
                              "--budget", "none", "--expires-in", "none", "--models", "none")
    assert (code, err) == (0, "")
    updated = json.loads(out)
    assert (updated["id"], updated["rpm"], updated["tpm"], updated["max_parallel"], updated["max_budget"],
            updated["expires_at"], updated["models"], updated["metadata"]) == (
        key_id, None, None, None, None, None, None, {"team": "search"})
    code, out, err = cli_main("keys", "update", key_id, "--budget", "7.25", "--budget-period", "never",
                              "--tier", "premium", "--expires-at", "2030-01-02T03:04:05Z", "--label", "team=ads",
                              "--models", "acme-*")
    assert (code, err) == (0, "")
    updated = json.loads(out)
    assert (updated["max_budget"], updated["budget_period"], updated["tier"], updated["expires_at"],
            updated["metadata"], updated["models"]) == (7.25, "never", "premium", "2030-01-02T03:04:05Z",
                                                        {"team": "ads"}, ["acme-*"])
    assert send(gateway, chat_raw("gpt-4o-mini"), secret).status == 403  # running gateways follow
    assert send(gateway, chat_raw("acme-1"), secret).status == 200
    assert key_info(gateway, secret).json()["budget"] == 7.25


def test_cli_update_label_none_clears_labels(make_gateway, cli_main):
    gateway = make_gateway()
    key_id, _ = new_key(gateway, metadata={"team": "search"})
    code, out, err = cli_main("keys", "update", key_id, "--label", "none")
    assert (code, err) == (0, "")
    assert json.loads(out)["metadata"] == {}


CLI_INVALID = [
    ["--rpm", "abc"], ["--rpm", "0"], ["--tpm", "-5"], ["--tpm", "1.5"], ["--max-parallel", "0"],
    ["--budget", "-1"], ["--budget", "nan"], ["--budget", "inf"], ["--budget", "ten"],
    ["--budget-period", "yearly"], ["--expires-in", "3x"], ["--expires-in=-1d"],
    ["--expires-at", "not-a-date"], ["--expires-in", "1h", "--expires-at", "2030-01-01"],
    ["--label", "bad"], ["--label", "bad name=x"], ["--models", ","], ["--tier", "gold"],
]


def test_cli_invalid_policy_is_a_one_line_error(make_gateway, cli_main):
    gateway = make_gateway()
    key_id, _ = new_key(gateway, rpm=5)
    for flags in CLI_INVALID:
        code, out, err = cli_main("keys", "create", "p", *flags)
        assert (code, out) == (1, "") and INVALID_ONE_LINE.match(err), (flags, err)
        code, out, err = cli_main("keys", "update", key_id, *flags)
        assert (code, out) == (1, "") and INVALID_ONE_LINE.match(err), (flags, err)
    assert [key["id"] for key in gateway.store.list_keys()] == [key_id]
    assert gateway.store.get_key(key_id)["rpm"] == 5


@pytest.mark.parametrize("flags", [["--budget", "1e12"], ["--rpm", str(2 ** 63)], ["--expires-in", "100000000d"],
                                   ["--expires-in", "9" * 400 + "d"]], ids=["budget", "rpm", "expiry", "huge expiry"])
def test_cli_out_of_range_policy_is_a_one_line_error(make_gateway, cli_main, flags):
    make_gateway()  # the database cli_main's commands use
    code, out, err = cli_main("keys", "create", "p", *flags)
    assert code == 1 and INVALID_ONE_LINE.match(err), err
    code, out, err = cli_main("keys", "list", "--output", "json")
    assert (code, json.loads(out)) == (0, [])


def test_admin_create_and_patch_every_policy_field(make_gateway, upstream):
    gateway = make_gateway(pricing=PRICES, environ={"LLMGW_ADMIN_TOKEN": ADMIN_TOKEN})
    reply = admin(gateway, "POST", "/admin/virtual-keys", {
        "project_name": "alpha", "tier": "premium", "rpm": 5, "tpm": 1000, "max_parallel": 3, "max_budget": 2.5,
        "budget_period": "weekly", "expires_at": "2030-01-02T03:04:05Z", "models": ["gpt-4o*", "claude-*"],
        "metadata": {"team": "search", "owner": "ana"}})
    assert reply.status == 201, reply.body
    created = reply.json()
    secret, key_id = created.pop("key"), created["id"]
    assert {name: created[name] for name in ("project_name", "tier", "rpm", "tpm", "max_parallel", "max_budget",
                                             "budget_period", "expires_at", "models", "metadata")} == {
        "project_name": "alpha", "tier": "premium", "rpm": 5, "tpm": 1000, "max_parallel": 3, "max_budget": 2.5,
        "budget_period": "weekly", "expires_at": "2030-01-02T03:04:05Z", "models": ["gpt-4o*", "claude-*"],
        "metadata": {"team": "search", "owner": "ana"}}
    assert admin(gateway, "GET", "/admin/virtual-keys/%s" % key_id).json() == created
    reply = admin(gateway, "PATCH", "/admin/virtual-keys/%s" % key_id, {
        "rpm": None, "tpm": None, "max_parallel": None, "max_budget": None, "expires_at": None, "models": None,
        "metadata": None, "budget_period": "daily"})
    assert reply.status == 200, reply.body
    cleared = reply.json()
    assert (cleared["rpm"], cleared["tpm"], cleared["max_parallel"], cleared["max_budget"], cleared["expires_at"],
            cleared["models"], cleared["metadata"], cleared["budget_period"], cleared["tier"]) == (
        None, None, None, None, None, None, {}, "daily", "premium")
    reply = admin(gateway, "PATCH", "/admin/virtual-keys/%s" % key_id, {"expires_in": "2h", "models": "acme-*"})
    assert reply.status == 200
    assert abs(llmgw.parse_time_bound(reply.json()["expires_at"]) - (time.time() + 7200)) < 5
    assert reply.json()["models"] == ["acme-*"]
    assert send(gateway, chat_raw("gpt-4o-mini"), secret).status == 403
    assert send(gateway, chat_raw("acme-1"), secret).status == 200
    assert admin(gateway, "PATCH", "/admin/virtual-keys/vk_000000000000", {"rpm": 5}).status == 404
    reply = admin(gateway, "PATCH", "/admin/virtual-keys/%s" % key_id, {})
    assert (reply.status, reply.json()["error"]["code"]) == (400, "invalid_request")


ADMIN_INVALID = [
    {"rpm": 0}, {"rpm": -1}, {"rpm": "5"}, {"rpm": True}, {"rpm": 1.5}, {"tpm": 0}, {"max_parallel": -2},
    {"max_budget": -1}, {"max_budget": "1"}, {"max_budget": True}, {"budget_period": "yearly"},
    {"budget_period": None}, {"expires_in": "forever"}, {"expires_in": 3600}, {"expires_at": 5},
    {"expires_at": "garbage"}, {"expires_in": "1h", "expires_at": "2030-01-01"}, {"models": []}, {"models": ""},
    {"models": [1]}, {"models": [""]}, {"models": {"gpt-4o": True}}, {"metadata": {"bad name!": "x"}},
    {"metadata": {"team": 5}}, {"metadata": "team=x"}, {"metadata": {"team": "x" * 201}}, {"tier": "gold"},
    {"colour": "blue"},
]


def test_admin_invalid_policy_is_400(make_gateway):
    gateway = make_gateway(environ={"LLMGW_ADMIN_TOKEN": ADMIN_TOKEN})
    key_id, _ = new_key(gateway, rpm=5)
    before = gateway.store.get_key(key_id)
    for fields in ADMIN_INVALID:
        for method, path, body in (("POST", "/admin/virtual-keys", dict(fields, project_name="p")),
                                   ("PATCH", "/admin/virtual-keys/%s" % key_id, fields)):
            reply = admin(gateway, method, path, body)
            assert reply.status == 400, (fields, method, reply.body)
            error = reply.json()["error"]
            assert (error["type"], error["code"]) == ("invalid_request_error", "invalid_request")
            # param names the field at fault (an unknown field has none of its own)
            field = None if "colour" in fields else "expires_at" if len(fields) == 2 else next(iter(fields))
            assert error["param"] is None if field is None else re.match(re.escape(field) + r"\b", error["param"]), (
                fields, error)
    assert [key["id"] for key in gateway.store.list_keys()] == [key_id]
    assert gateway.store.get_key(key_id) == before


@pytest.mark.parametrize("fields", [{"max_budget": 1e12}, {"rpm": 2 ** 63}, {"tpm": 10 ** 30},
                                    {"expires_in": "100000000d"}, {"expires_in": "9" * 400 + "d"},
                                    {"expires_at": "0001-01-01T00:00:00Z"}],
                         ids=["budget", "rpm", "tpm", "expiry", "huge expiry", "year 1"])
def test_admin_out_of_range_policy_is_400_and_leaves_keys_listable(make_gateway, fields):
    gateway = make_gateway(environ={"LLMGW_ADMIN_TOKEN": ADMIN_TOKEN})
    reply = admin(gateway, "POST", "/admin/virtual-keys", dict(fields, project_name="p"))
    listing = admin(gateway, "GET", "/admin/virtual-keys")
    assert listing.status == 200, listing.body
    if reply.status == 201:  # accepted: then it must round-trip as a valid time
        assert llmgw.parse_time_bound(reply.json()["expires_at"])
    else:
        assert (reply.status, reply.json()["error"]["code"]) == (400, "invalid_request")
        assert listing.json() == {"data": []}


# ---- budgets: estimate admission ---------------------------------------------------------

ESTIMATE = {"admission": "estimate", "typical_output_tokens": 30}


def estimate(raw, output_tokens, price_in=IN, price_out=OUT):
    """The documented estimate in nano-USD: body bytes / 4 (rounded up) as
    input tokens at the input price, the output reserved at the output price."""
    return (-(-len(raw) // 4) * price_in + output_tokens * price_out) * 1000


@pytest.mark.parametrize("fields, output_tokens", [
    ({"max_tokens": 100}, 30), ({"max_tokens": 20}, 20), ({}, 30), ({"max_tokens": 100, "n": 3}, 90),
    ({"max_completion_tokens": 10 ** 30}, 30),
], ids=["typical below max_tokens", "max_tokens below typical", "no max_tokens", "n choices", "huge limit"])
def test_estimate_reserves_bytes_over_four_and_typical_output(make_gateway, upstream, fields, output_tokens):
    gateway = make_gateway(pricing=PRICES, budgets=ESTIMATE)
    key_id, secret = new_key(gateway, budget_nanousd=10 ** 12)
    raw = json.dumps(dict({"model": "acme-1", "messages": [{"role": "user", "content": "hi" * 50}]},
                          **fields)).encode()
    assert send(gateway, raw, secret).status == 200
    [entry] = upstream.reported
    [row] = gateway.rows()
    assert row["reserved_nanousd"] == estimate(raw, output_tokens)
    assert row["cost_nanousd"] == real_cost(entry)
    assert spend_rows(gateway, key_id)[0][1:] == (real_cost(entry), 0, 0)


def test_estimate_admits_while_any_budget_is_left_then_stops(make_gateway, upstream):
    """A budget far below one call's worst case (strict refuses it) and
    its estimate: estimate admits the call while anything is left; the
    overshoot is that call's real cost beyond what was left; the next call
    is refused."""
    raw = chat_raw(max_tokens=100)
    budget = estimate(raw, 30) // 2
    strict = make_gateway(pricing=PRICES)
    _, strict_secret = new_key(strict, budget_nanousd=budget)
    assert_budget_refusal(send(strict, raw, strict_secret))
    gateway = make_gateway(pricing=PRICES, budgets=ESTIMATE, db_name="estimate.db")
    key_id, secret = new_key(gateway, budget_nanousd=budget)
    assert key_info(gateway, secret).json()["budget_admission"] == "estimate"
    assert send(gateway, raw, secret).status == 200
    [entry] = upstream.reported
    spent = real_cost(entry)
    assert spend_rows(gateway, key_id)[0][1:] == (spent, 0, 0)
    assert spent > budget  # admitted on what was left: the overshoot is this call's cost beyond it
    info = key_info(gateway, secret).json()
    assert (info["spent"], info["remaining"]) == (usd(spent), 0.0)
    assert_budget_refusal(send(gateway, raw, secret))
    assert len(upstream.requests) == 1


def test_estimate_admits_one_call_of_concurrent_ones_on_a_nearly_spent_budget(make_gateway, upstream):
    """One nano-dollar left and twenty calls at once: the first reservation
    (or, once settled, its cost) uses it up, whatever the timing, so the
    overshoot is one call's real cost."""
    gateway = make_gateway(pricing=PRICES, budgets=ESTIMATE)
    key_id, secret = new_key(gateway, budget_nanousd=1)
    raw = chat_raw("acme-1-slow", max_tokens=100)
    replies = concurrently(20, lambda i: send(gateway, raw, secret))
    assert sorted(reply.status for reply in replies) == [200] + [429] * 19
    for reply in replies:
        if reply.status != 200:
            assert_budget_refusal(reply)
    [entry] = upstream.reported
    assert spend_rows(gateway, key_id)[0][1:] == (real_cost(entry), 0, 0)


def test_admission_per_key_overrides_the_global_one(make_gateway, upstream, cli_main):
    """A key's admission is a policy field (``keys create/update --admission``,
    the admin API); without one the key follows ``budgets.admission``."""
    raw = chat_raw(max_tokens=100)
    budget = estimate(raw, 30) // 2
    gateway = make_gateway(pricing=PRICES, budgets={"typical_output_tokens": 30},
                           environ={"LLMGW_ADMIN_TOKEN": ADMIN_TOKEN})  # strict
    strict_id, strict_secret = new_key(gateway, budget_nanousd=budget)
    estimate_id, estimate_secret = new_key(gateway, budget_nanousd=budget, budget_admission="estimate")
    infos = [key_info(gateway, secret).json() for secret in (strict_secret, estimate_secret)]
    assert [(info["budget_admission"], info["budget_overshoot"]) for info in infos] == [
        ("strict", None), ("estimate", llmgw.ESTIMATE_OVERSHOOT % 30)]
    assert "at most 30 output tokens" in infos[1]["budget_overshoot"]
    assert gateway.store.get_key(estimate_id)["budget_admission"] == "estimate"
    assert_budget_refusal(send(gateway, raw, strict_secret))
    assert send(gateway, raw, estimate_secret).status == 200
    [row] = gateway.rows()
    assert (row["virtual_key_id"], row["reserved_nanousd"]) == (estimate_id, estimate(raw, 30))
    # The admin API sets it, and clears it (then the key follows the config).
    reply = admin(gateway, "PATCH", "/admin/virtual-keys/" + strict_id, {"budget_admission": "estimate"})
    assert reply.status == 200 and reply.json()["budget_admission"] == "estimate"
    assert key_info(gateway, strict_secret).json()["budget_admission"] == "estimate"
    assert admin(gateway, "PATCH", "/admin/virtual-keys/" + strict_id, {"budget_admission": None}).json()[
        "budget_admission"] is None
    assert key_info(gateway, strict_secret).json()["budget_admission"] == "strict"
    # So does the CLI; globally estimate, one key strict.
    gateway.stop()
    gateway = make_gateway(pricing=PRICES, budgets={"admission": "estimate"})
    code, out, _ = cli_main("keys", "update", strict_id, "--admission", "strict")
    assert (code, json.loads(out)["budget_admission"]) == (0, "strict")
    assert_budget_refusal(send(gateway, raw, strict_secret))
    assert key_info(gateway, strict_secret).json()["budget_admission"] == "strict"
    assert key_info(gateway, estimate_secret).json()["budget_admission"] == "estimate"
    assert cli_main("keys", "update", strict_id, "--admission", "none")[0] == 0
    assert key_info(gateway, strict_secret).json()["budget_admission"] == "estimate"
    code, out, _ = cli_main("keys", "create", "agent", "--budget", "5", "--admission", "estimate", "--output", "json")
    assert (code, json.loads(out)["budget_admission"]) == (0, "estimate")
    code, _, err = cli_main("keys", "update", strict_id, "--admission", "loose")
    assert code == 1 and "budget_admission: 'loose' is not one of strict, estimate" in err


@pytest.mark.parametrize("value", ["optimistic", "", 1, True, ["estimate"], "Estimate"])
def test_bad_key_admissions_are_refused(gateway, value):
    record, _ = gateway.create_key("k")
    with pytest.raises(llmgw.BadRequestError) as caught:
        llmgw.update_key(gateway.store, gateway.config, record["id"], {"budget_admission": value})
    assert str(caught.value).startswith("budget_admission: ") and "strict, estimate" in str(caught.value)
    assert gateway.store.get_key(record["id"])["budget_admission"] is None


@pytest.mark.parametrize("budgets, message", [
    ({"admission": "optimistic"}, "budgets.admission: 'optimistic' is not one of strict, estimate"),
    ({"admission_by_key": {"vk_1": "estimate"}}, "budgets: unknown key 'admission_by_key'"),  # a key policy now
    ({"typical_output_tokens": 0}, "budgets.typical_output_tokens: expected an integer from 1"),
])
def test_bad_admission_settings_are_named(budgets, message):
    with pytest.raises(llmgw.ConfigError) as caught:
        llmgw.parse_config({"budgets": budgets})
    assert str(caught.value).startswith(message), str(caught.value)
