"""GET /metrics: Prometheus text format, read back with prometheus_client's
own parser (a test-only dependency, installed by .ci/run); counters equal to
the usage rows; bounded labels; who may scrape.
"""

import sqlite3
import threading

import pytest

# The README's plain `pip install -r requirements.txt pytest` has no parser:
# there these cases skip, saying why; .ci/run installs it and runs them.
text_string_to_metric_families = pytest.importorskip(
    "prometheus_client.parser", reason="prometheus_client (test-only) is not installed").text_string_to_metric_families

from conftest import ADMIN_TOKEN, CHAT, MESSAGES, admin, call, cli_env, post, wait_until

import cli
import llmgw

pytestmark = pytest.mark.usefixtures("clean_environment")

METRICS_TOKEN = "llmgw-metrics-CANARY-0123456789abcdef"


def scrape(gateway, token=METRICS_TOKEN):
    """The parsed /metrics page: {family name: family}, after checking the framing."""
    reply = call(gateway, "GET", "/metrics", key=token)
    assert reply.status == 200, reply
    assert reply.header("content-type") == "text/plain; version=0.0.4; charset=utf-8"
    text = reply.body.decode("utf-8")
    assert text.endswith("\n")
    return {family.name: family for family in text_string_to_metric_families(text)}


def samples(families, family, name=None):
    """{frozenset(labels): value} of one family's samples (named ``name``)."""
    return {frozenset(s.labels.items()): s.value for s in families[family].samples
            if s.name == (name or s.name)}


@pytest.fixture
def scraped(make_gateway):
    """A gateway with a metrics token, traffic from two keys (one budgeted)."""
    gateway = make_gateway(environ={"LLMGW_METRICS_TOKEN": METRICS_TOKEN, "LLMGW_ADMIN_TOKEN": ADMIN_TOKEN})
    alpha, alpha_key = gateway.create_key('al"pha\\', max_budget=50)
    beta, beta_key = gateway.create_key("beta")
    for index, (model, key) in enumerate([("gpt-4o-mini", alpha_key), ("gpt-4o-mini", alpha_key),
                                          ("gpt-4o-mini-fail500", beta_key), ("gpt-4o-mini-cache", beta_key)]):
        reply = post(gateway, CHAT, {"model": model, "stream": index == 1,
                                     "messages": [{"role": "user", "content": "a%d" % index}]}, key=key)
        assert reply.status == (500 if "fail500" in model else 200)
    assert post(gateway, MESSAGES, {"model": "claude-haiku-4-5", "max_tokens": 9,
                                    "messages": [{"role": "user", "content": "b"}]}, key=beta_key).status == 200
    return {"gateway": gateway, "alpha": alpha, "beta": beta}


def test_metrics_parse_and_equal_the_books(scraped):
    gateway = scraped["gateway"]
    families = scrape(gateway)
    assert families["llmgw_requests"].type == "counter"
    assert families["llmgw_request_duration_seconds"].type == "histogram"
    assert families["llmgw_budget_spent_usd"].type == "gauge"
    known = {model for model, _ in gateway.gateway.prices.items()}
    rows = [row for row in gateway.rows() if row["status"] != "pending"]
    projects = {scraped["alpha"]["id"]: scraped["alpha"]["project_name"],
                scraped["beta"]["id"]: "beta"}
    expected_requests, expected_cost, expected_output = {}, {}, {}
    for row in rows:
        base = (("key_id", row["virtual_key_id"]), ("project", projects[row["virtual_key_id"]]),
                ("provider", row["provider"]), ("model", row["model"] if row["model"] in known else "other"))
        key = frozenset(base + (("status", row["status"]),))
        expected_requests[key] = expected_requests.get(key, 0) + 1
        expected_cost[frozenset(base)] = expected_cost.get(frozenset(base), 0) + row["cost_nanousd"]
        output_key = frozenset(base + (("kind", "output"),))
        expected_output[output_key] = expected_output.get(output_key, 0) + row["output_tokens"]
    assert samples(families, "llmgw_requests") == expected_requests
    assert {labels: round(value * 1e9) for labels, value in samples(families, "llmgw_cost_usd").items()} == \
        expected_cost
    tokens = samples(families, "llmgw_tokens")
    assert {labels: value for labels, value in tokens.items() if ("kind", "output") in labels} == expected_output
    assert {dict(labels)["kind"] for labels in tokens} == {"input", "cache_read", "cache_write", "output",
                                                          "reasoning"}
    assert sum(samples(families, "llmgw_request_errors").values()) == 2  # the fail500 call and its retry
    # The project name with a quote and a backslash survived the label escaping.
    assert any(dict(labels)["project"] == 'al"pha\\' for labels in expected_requests)
    # Histograms: one observation per settled call (the fail500 call's retry too), cumulative buckets.
    counts = samples(families, "llmgw_request_duration_seconds", "llmgw_request_duration_seconds_count")
    assert counts == {frozenset({("provider", "openai")}): 5, frozenset({("provider", "anthropic")}): 1}
    buckets = [s for s in families["llmgw_upstream_first_byte_seconds"].samples
               if s.name.endswith("_bucket") and s.labels["provider"] == "openai"]
    assert [s.value for s in buckets] == sorted(s.value for s in buckets) and buckets[-1].labels["le"] == "+Inf"
    assert buckets[-1].value == 5
    # Budget gauges equal the key's spend.
    spend = gateway.store.key_spend(gateway.store.find_key_by_id(scraped["alpha"]["id"]), gateway.gateway.clock())
    assert samples(families, "llmgw_budget_spent_usd") == {
        frozenset({("key_id", scraped["alpha"]["id"]), ("project", 'al"pha\\')}):
            llmgw.nanousd_to_usd(spend["spent_nanousd"])}
    assert list(samples(families, "llmgw_budget_limit_usd").values()) == [50.0]
    # Gauges of this process.
    assert list(samples(families, "llmgw_streams_in_flight").values()) == [0]
    assert list(samples(families, "llmgw_connections_max").values()) == [llmgw.ServerConfig().max_connections]
    assert list(samples(families, "llmgw_calls_in_flight").values()) == [0]
    assert list(samples(families, "llmgw_capacity_refusals").values()) == [0]
    # The scrape itself (the worker of the call before it may still be finishing under load).
    assert wait_until(lambda: list(samples(scrape(gateway), "llmgw_workers_busy").values()) == [1])
    assert list(samples(families, "llmgw_worker_threads").values())[0] >= 1
    assert list(samples(families, "llmgw_connections_open").values())[0] >= 1
    # Every family is in the catalogue the README lists.
    assert {name for name in families} <= {name[:-len("_total")] if name.endswith("_total") else name
                                           for name in llmgw.METRICS}


def test_client_chosen_models_do_not_mint_series(scraped):
    gateway = scraped["gateway"]
    key = gateway.create_key("sprayer")[1]
    for index in range(25):
        post(gateway, CHAT, {"model": "made-up-%d" % index, "messages": [{"role": "user", "content": "x"}]}, key=key)
    models = {dict(labels)["model"] for labels in samples(scrape(gateway), "llmgw_requests")}
    assert models == {"gpt-4o-mini", "claude-haiku-4-5", "other"}


def test_refusals_are_counted_per_key_and_reason(make_gateway):
    gateway = make_gateway(environ={"LLMGW_METRICS_TOKEN": METRICS_TOKEN})
    limited, limited_key = gateway.create_key("limited", rpm=1)
    broke, broke_key = gateway.create_key("broke", max_budget=0.000001)
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x"}]}
    assert post(gateway, CHAT, body, key=limited_key).status == 200
    assert post(gateway, CHAT, body, key=limited_key).status == 429
    assert post(gateway, CHAT, body, key=broke_key).status == 429
    assert samples(scrape(gateway), "llmgw_rate_limit_refusals") == {
        frozenset({("key_id", limited["id"]), ("reason", "rate_limit_exceeded")}): 1,
        frozenset({("key_id", broke["id"]), ("reason", "budget_exceeded")}): 1}


def test_streams_in_flight(make_gateway):
    gateway = make_gateway(environ={"LLMGW_METRICS_TOKEN": METRICS_TOKEN})
    key = gateway.create_key()[1]
    done = threading.Event()

    def stream():
        post(gateway, CHAT, {"model": "gpt-4o-mini-slowstream", "stream": True,
                             "messages": [{"role": "user", "content": "x"}]}, key=key)
        done.set()
    worker = threading.Thread(target=stream)
    worker.start()
    wait_until(lambda: done.is_set() or list(samples(scrape(gateway), "llmgw_streams_in_flight").values()) == [1])
    assert not done.is_set(), "the stream ended before it was seen in flight"
    worker.join(10)
    assert list(samples(scrape(gateway), "llmgw_streams_in_flight").values()) == [0]


class Clock:
    """The gateway's wall clock, moved by the test."""

    def __init__(self, now):
        self.now = now

    def __call__(self):
        return self.now


def test_the_books_are_read_at_most_once_a_second(make_gateway):
    """Scrapes within METRICS_BOOKS_SECONDS of a read reuse the counters it
    read from the database (this process's histograms stay live); the first
    scrape after it, or after the clock was set back, reads them afresh."""
    clock = Clock(1793577600.0)
    gateway = make_gateway(environ={"LLMGW_METRICS_TOKEN": METRICS_TOKEN}, clock=clock)
    key = gateway.create_key()[1]

    def requests_and_observed():
        families = scrape(gateway)
        observed = samples(families, "llmgw_request_duration_seconds", "llmgw_request_duration_seconds_count")
        return sum(samples(families, "llmgw_requests").values()), sum(observed.values())
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x"}]}
    assert post(gateway, CHAT, body, key=key).status == 200
    assert requests_and_observed() == (1, 1)
    assert post(gateway, CHAT, body, key=key).status == 200
    clock.now += llmgw.METRICS_BOOKS_SECONDS - 0.001
    assert requests_and_observed() == (1, 2)
    clock.now += 0.001
    assert requests_and_observed() == (2, 2)
    assert post(gateway, CHAT, body, key=key).status == 200
    clock.now -= 60
    assert requests_and_observed() == (3, 3)


def test_who_may_scrape(make_gateway, tmp_path, monkeypatch, capsys):
    gateway = make_gateway()
    # No token of either kind: off, and says how to turn it on.
    reply = call(gateway, "GET", "/metrics", key="anything")
    assert reply.status == 403 and "metrics-token" in reply.json()["error"]["message"]
    for name, value in cli_env(gateway, tmp_path).items():
        monkeypatch.setenv(name, value)
    assert cli.main(["metrics-token"]) == 0
    token = capsys.readouterr().out.split("Metrics token: ")[1].split()[0]
    assert token.startswith("llmgw-metrics-")
    assert scrape(gateway, token)
    # A metrics token is no admin token, and wrong tokens, virtual keys and no token are refused.
    assert admin(gateway, "GET", "/admin/virtual-keys", token=token).status in (401, 403)
    vkey = gateway.create_key()[1]
    for credential in (None, "wrong", vkey, token + "x"):
        reply = call(gateway, "GET", "/metrics", key=credential)
        assert reply.status == 401 and reply.json()["error"]["code"] == "invalid_metrics_token"
    # The admin token also scrapes; POST is refused.
    admin_token = llmgw.issue_admin_token(gateway.store)
    assert scrape(gateway, admin_token)
    assert call(gateway, "POST", "/metrics", body={}, key=token).status == 405
    # A new metrics token retires the old one.
    assert cli.main(["metrics-token"]) == 0
    capsys.readouterr()
    assert call(gateway, "GET", "/metrics", key=token).status == 401


@pytest.mark.sqlite_only("rewinds the SQLite file to schema 2 (PRAGMA user_version)")
def test_version_2_database_gains_totals_equal_to_its_rows(scraped):
    gateway = scraped["gateway"]
    before = scrape(gateway)
    conn = sqlite3.connect(gateway.db_path)
    conn.executescript("DROP TABLE usage_days; DROP TABLE usage_hours; DROP TABLE usage_totals;"
                       "PRAGMA user_version = 2;")
    conn.close()
    store = llmgw.SQLiteStore(gateway.db_path)
    try:
        rows = store.usage_totals()
    finally:
        store.close()
    assert sum(sum(row[4].values()) for row in rows) == sum(samples(before, "llmgw_requests").values())
    assert sum(row[-1] for row in rows) == round(sum(samples(before, "llmgw_cost_usd").values()) * 1e9)
