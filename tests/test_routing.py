"""Resilient routing: deployments (several keys per provider), aliases,
retries and fallbacks before the commit point, cooldowns shared through the
database, per-attempt usage rows (issue 10).

The harness is several fake providers (tests/fake_upstream.py), each
misbehaving in its own way through its ``faults`` or ``script``: one failing
with 500/529/connection reset, one answering 429 with Retry-After, one
stalling before the first byte, one cutting its stream after the preamble or
after content, one healthy. Aliases put a faulty one first with a heavy
weight; a test that needs the faulty one first repeats until it was (the
order is random by design).
"""

import json
import logging
import time

import pytest

from conftest import (ADMIN_TOKEN, CHAT, MESSAGES, MODELS, RESPONSES, OPENAI_KEY, admin, body_for, call, post,
                      execute_sql, query, settled_rows, sse_events, wait_until)
from fake_upstream import FakeUpstream

pytestmark = pytest.mark.usefixtures("clean_environment")

#: No affinity: the weights alone order the targets. With the default
#: (``key``), one request that happened to be weighted to the healthy target
#: (one in 1001) pinned every later request of the key to it, so
#: ``until_first_attempt_on`` could never reach the faulty one again.
ROUTING = {"backoff_initial": 0.05, "backoff_max": 2, "cooldown": 5, "cooldown_max": 60, "affinity": "none"}
FAULTY_FIRST = 1000  # the weight that puts a faulty target first (almost always)


@pytest.fixture
def fakes():
    """Named fake providers: ``broken``, ``limited``, ``stalling``,
    ``cutting`` and ``healthy`` (faults set by each test)."""
    started = {name: FakeUpstream().start() for name in ("broken", "limited", "stalling", "cutting", "healthy")}
    started["limited"].faults = "fail429"
    started["stalling"].faults = "hang"
    yield started
    for fake in started.values():
        fake.stop()


def providers_for(fakes, anthropic=False):
    """One provider per fake (named after it), OpenAI format unless asked."""
    providers = {}
    for name, fake in fakes.items():
        entry = {"base_url": fake.url, "api_key": "sk-%s-0123456789abcdef" % name}
        if anthropic:
            entry["format"] = "anthropic"
        providers[name] = entry
    return providers


def alias(first, then="healthy", model="gpt-4o-mini"):
    return [{"target": "%s/%s" % (first, model), "weight": FAULTY_FIRST}, {"target": "%s/%s" % (then, model)}]


@pytest.fixture
def routed(make_gateway, fakes):
    """A gateway over the fakes, with aliases ``via-<fake>`` (that fake
    first, ``healthy`` second), and a virtual key."""
    def start(routing=None, server=None, anthropic=False, **sections):
        models = {"via-%s" % name: alias(name, model="claude-haiku-4-5" if anthropic else "gpt-4o-mini")
                  for name in fakes if name != "healthy"}
        gateway = make_gateway(providers=providers_for(fakes, anthropic), models=models,
                               routing=dict(ROUTING, **(routing or {})),
                               server=dict({"host": "127.0.0.1", "port": 0, "drain_timeout": 2}, **(server or {})),
                               environ={"LLMGW_ADMIN_TOKEN": ADMIN_TOKEN}, **sections)
        gateway.key = gateway.create_key()[1]
        return gateway
    return start


def rows_of(gateway, logical_id):
    return [row for row in gateway.rows() if row["logical_request_id"] == logical_id]


def until_first_attempt_on(gateway, fakes, name, send, tries=8):
    """Send requests until one's first attempt went to fake ``name``;
    returns that response."""
    for _ in range(tries):
        before = len(fakes[name].requests)
        response = send()
        rows = rows_of(gateway, response.header("x-llmgw-request-id"))
        if rows and rows[0]["provider"] == name:
            return response
        assert len(fakes[name].requests) == before
        clear_cooldowns(gateway)
    pytest.fail("the faulty target never came first")


def clear_cooldowns(gateway):
    """Delete every shared cooldown, then wait until the gateway took that
    in (it reads them a few times a second: until then it still skips the
    deployments it saw failing)."""
    execute_sql(gateway, "DELETE FROM deployment_cooldowns")
    assert wait_until(lambda: all(entry["state"] == "ok" for entry in deployments(gateway).values()), 5.0)


def deployments(gateway):
    reply = admin(gateway, "GET", "/admin/deployments")
    assert reply.status == 200, reply
    return {entry["deployment"]: entry for entry in reply.json()["data"]}


# ---- retries and fallbacks, non-streamed -----------------------------------------------------

@pytest.mark.parametrize("fault,status", [("fail500", 500), ("fail529", 529), ("reset", None)])
def test_failing_target_is_retried_then_falls_back(routed, fakes, fault, status):
    """A 500, 529 or connection reset: the same deployment once more after a
    backoff, then the next target; the client sees only the answer, one
    usage row per attempt under one logical request id."""
    fakes["broken"].faults = fault
    gateway = routed()
    response = until_first_attempt_on(gateway, fakes, "broken",
                                      lambda: post(gateway, CHAT, body_for(CHAT, "via-broken"), gateway.key))
    assert response.status == 200
    assert response.header("x-llmgw-attempts") == "3"
    assert response.header("x-llmgw-served-by") == "healthy/gpt-4o-mini"
    rows = rows_of(gateway, response.header("x-llmgw-request-id"))
    assert [(r["attempt"], r["attempt_kind"], r["provider"], r["deployment"], r["status"], r["http_status"])
            for r in rows] == [(1, "first", "broken", "default", "upstream_error", status),
                               (2, "retry", "broken", "default", "upstream_error", status),
                               (3, "fallback", "healthy", "default", "ok", 200)]
    assert rows[0]["request_id"] == response.header("x-llmgw-request-id")
    # Failed attempts never reached a model: not charged. The served one is exact.
    assert [r["cost_nanousd"] for r in rows[:2]] == [0, 0] and [r["request_tokens"] for r in rows[:2]] == [0, 0]
    usage = fakes["healthy"].reported[-1]["usage"]
    assert (rows[2]["input_tokens"], rows[2]["output_tokens"]) == (usage["prompt_tokens"], usage["completion_tokens"])
    assert rows[2]["model"] == "gpt-4o-mini"
    state = deployments(gateway)["broken/default"]
    # An overload is API-wide: no key is cooled down for it.
    assert state["state"] == ("ok" if fault == "fail529" else "cooling")


def test_rate_limited_target_falls_back_at_once_and_cools_for_retry_after(routed, fakes):
    """A 429 with Retry-After 7: the next deployment at once (another key
    is not limited), and the limited one is skipped for at least 7 s."""
    gateway = routed()
    started = time.monotonic()
    response = until_first_attempt_on(gateway, fakes, "limited",
                                      lambda: post(gateway, CHAT, body_for(CHAT, "via-limited"), gateway.key))
    assert time.monotonic() - started < 5
    assert (response.status, response.header("x-llmgw-attempts")) == (200, "2")
    rows = rows_of(gateway, response.header("x-llmgw-request-id"))
    assert [(r["attempt_kind"], r["http_status"]) for r in rows] == [("first", 429), ("fallback", 200)]
    state = deployments(gateway)["limited/default"]
    assert state["state"] == "cooling" and 6 <= state["cooldown_seconds"] <= 7, state
    assert state["reason"] == "HTTP 429"
    # While it cools down, requests start on the healthy target.
    seen = len(fakes["limited"].requests)
    for _ in range(3):
        reply = post(gateway, CHAT, body_for(CHAT, "via-limited"), gateway.key)
        assert reply.header("x-llmgw-attempts") == "1"
    assert len(fakes["limited"].requests) == seen


def test_stalling_target_times_out_then_falls_back(routed, fakes):
    """A provider that never sends its first byte: upstream_timeout, then
    the healthy target at once (a second wait would use up the deadline);
    rows ``timeout``."""
    gateway = routed(server={"upstream_timeout": 0.5})
    response = until_first_attempt_on(gateway, fakes, "stalling",
                                      lambda: post(gateway, CHAT, body_for(CHAT, "via-stalling"), gateway.key))
    assert response.status == 200
    rows = rows_of(gateway, response.header("x-llmgw-request-id"))
    assert [(r["status"], r["attempt_kind"]) for r in rows] == [("timeout", "first"), ("ok", "fallback")]


@pytest.mark.parametrize("path", [CHAT, MESSAGES])
def test_stalled_stream_is_left_after_the_first_byte_timeout(routed, fakes, path):
    """A stream whose provider sends nothing: routing.first_byte_timeout,
    not server.upstream_timeout (far past routing.deadline here, as with
    the defaults), so the healthy target answers within the deadline."""
    anthropic = path == MESSAGES
    gateway = routed(server={"upstream_timeout": 30}, routing={"deadline": 10, "first_byte_timeout": 0.3},
                     anthropic=anthropic)
    model = "via-stalling"
    response = until_first_attempt_on(gateway, fakes, "stalling",
                                      lambda: post(gateway, path, body_for(path, model, stream=True), gateway.key))
    assert (response.status, response.header("x-llmgw-attempts")) == (200, "2")
    assert sse_events(response.body)
    rows = rows_of(gateway, response.header("x-llmgw-request-id"))
    assert [(r["status"], r["attempt_kind"], r["provider"]) for r in rows] == [
        ("timeout", "first", "stalling"), ("ok", "fallback", "healthy")]
    assert rows[0]["cost_nanousd"] == 0


def test_first_byte_timeout_spares_the_last_attempt_and_non_streamed_answers(routed, fakes):
    """The first-byte timeout cuts only a stream another attempt may
    follow: the last attempt waits server.upstream_timeout, and a
    non-streamed answer (its first byte comes when it is whole) is never
    taken for a stall."""
    gateway = routed(server={"upstream_timeout": 1.5}, routing={"first_byte_timeout": 0.2})
    started = time.monotonic()
    response = post(gateway, CHAT, body_for(CHAT, "stalling/gpt-4o-mini", stream=True), gateway.key)
    assert (response.status, response.header("x-llmgw-attempts")) == (504, "2")
    assert time.monotonic() - started >= 1.5  # the retry, the last attempt, waited the whole upstream_timeout
    fakes["healthy"].faults = "slow"  # 0.5 s before the status line
    response = post(gateway, CHAT, body_for(CHAT, "healthy/gpt-4o-mini"), gateway.key)
    assert (response.status, response.header("x-llmgw-attempts")) == (200, "1")


def test_refused_key_moves_on_without_retry_and_is_set_aside(routed, fakes, caplog):
    """A 401 from a provider: no retry of that key, the next target at once,
    the key cooled down for cooldown_max with a warning naming it."""
    fakes["broken"].faults = "leak401"
    gateway = routed()
    with caplog.at_level(logging.WARNING, logger="llmgw"):
        response = until_first_attempt_on(gateway, fakes, "broken",
                                          lambda: post(gateway, CHAT, body_for(CHAT, "via-broken"), gateway.key))
    assert (response.status, response.header("x-llmgw-attempts")) == (200, "2")
    assert deployments(gateway)["broken/default"]["cooldown_seconds"] > 50
    assert any("broken" in record.getMessage() and "401" in record.getMessage() for record in caplog.records)
    assert "sk-broken" not in caplog.text


def test_request_errors_never_fall_back(routed, fakes):
    """A 400 is the client's problem: one attempt, passed on as it came."""
    fakes["broken"].faults = "fail400"
    gateway = routed()
    response = until_first_attempt_on(gateway, fakes, "broken",
                                      lambda: post(gateway, CHAT, body_for(CHAT, "via-broken"), gateway.key))
    assert (response.status, response.header("x-llmgw-attempts")) == (400, "1")
    assert response.json()["error"]["type"] == "invalid_request_error"
    assert deployments(gateway)["broken/default"]["state"] == "ok"


def test_single_target_retries_once_then_answers(routed, fakes):
    """A plain model on one provider: a 500 then an answer is one retry
    (two rows); two 500s are passed on after the bounded retry."""
    gateway = routed()
    fakes["broken"].script = ["fail500", ""]
    response = post(gateway, CHAT, body_for(CHAT, "broken/gpt-4o-mini"), gateway.key)
    assert (response.status, response.header("x-llmgw-attempts")) == (200, "2")
    fakes["broken"].faults = "fail500"
    clear_cooldowns(gateway)
    response = post(gateway, CHAT, body_for(CHAT, "broken/gpt-4o-mini"), gateway.key)
    assert (response.status, response.header("x-llmgw-attempts")) == (500, "2")
    assert response.json()["error"]["type"] == "server_error"
    assert len(fakes["broken"].requests) == 4


def test_no_retry_when_configured_off(routed, fakes):
    fakes["broken"].faults = "fail500"
    gateway = routed(routing={"retries": 0, "retry_on": []})
    response = post(gateway, CHAT, body_for(CHAT, "broken/gpt-4o-mini"), gateway.key)
    assert (response.status, response.header("x-llmgw-attempts")) == (500, "1")
    assert len(fakes["broken"].requests) == 1


def test_no_attempt_starts_after_the_routing_deadline(routed, fakes):
    """routing.deadline bounds the whole request: a stall that uses it up
    is the answer (504), with no further attempt."""
    gateway = routed(server={"upstream_timeout": 0.6}, routing={"deadline": 0.3})
    response = post(gateway, CHAT, body_for(CHAT, "stalling/gpt-4o-mini"), gateway.key)
    assert (response.status, response.header("x-llmgw-attempts")) == (504, "1")
    assert len(fakes["stalling"].requests) == 1


# ---- streams: the commit point ---------------------------------------------------------------

@pytest.mark.parametrize("path", [CHAT, RESPONSES, MESSAGES])
def test_stream_cut_after_the_preamble_falls_back_invisibly(routed, fakes, path):
    """The preamble is held back until the first content event: a stream
    cut before it is retried elsewhere and the client sees one clean stream
    (one preamble, its terminator)."""
    fakes["cutting"].faults = "droppreamble"
    anthropic = path == MESSAGES
    gateway = routed(anthropic=anthropic)
    body = body_for(path, "via-cutting", stream=True)
    response = until_first_attempt_on(gateway, fakes, "cutting", lambda: post(gateway, path, body, gateway.key))
    assert response.status == 200
    events = sse_events(response.body)
    if path == CHAT:
        assert sum('"role"' in data for _, data in events) == 1 and events[-1] == (None, "[DONE]")
    elif path == RESPONSES:
        assert [name for name, _ in events].count("response.created") == 1
        assert events[-1][0] == "response.completed"
    else:
        assert [name for name, _ in events].count("message_start") == 1 and events[-1][0] == "message_stop"
    rows = rows_of(gateway, response.header("x-llmgw-request-id"))
    assert [(r["provider"], r["status"]) for r in rows] == [
        ("cutting", "upstream_error"), ("cutting", "upstream_error"), ("healthy", "ok")]
    # Anthropic's message_start reported the input it billed: that is charged, no estimate.
    if anthropic:
        started = fakes["cutting"].reported[0]["usage"]
        assert rows[0]["input_tokens"] == started["input_tokens"] and rows[0]["usage_source"] == "reported"
    else:
        assert rows[0]["request_tokens"] == 0 and rows[0]["cost_nanousd"] == 0


@pytest.mark.parametrize("path", [CHAT, RESPONSES, MESSAGES])
def test_stream_cut_after_content_is_never_replayed(routed, fakes, path):
    """After the first content event the client has seen output: a cut
    ends the stream with the API's error event, and nothing is retried."""
    fakes["cutting"].faults = "dropstream"
    gateway = routed(anthropic=path == MESSAGES)
    body = body_for(path, "via-cutting", stream=True)
    healthy_before = len(fakes["healthy"].requests)
    response = until_first_attempt_on(gateway, fakes, "cutting", lambda: post(gateway, path, body, gateway.key))
    assert response.status == 200 and response.header("x-llmgw-attempts") == "1"
    name, data = sse_events(response.body)[-1]
    payload = json.loads(data)
    if path == MESSAGES:
        assert name == "error" and payload["type"] == "error"
    elif path == RESPONSES:
        assert name == "response.failed" and payload["response"]["status"] == "failed"
        assert payload["response"]["id"].startswith("resp_")
    else:
        assert name is None and payload["error"]["code"] == "upstream_truncated"
        assert b"[DONE]" not in response.body
    assert len(fakes["healthy"].requests) == healthy_before
    row, = rows_of(gateway, response.header("x-llmgw-request-id"))
    assert row["status"] == "upstream_truncated"


def test_stream_error_event_before_output_is_retried(routed, fakes):
    """An Anthropic overloaded error event before any output is a 529:
    retried and then served elsewhere."""
    gateway = routed(anthropic=True)
    fakes["broken"].script = ["fail529"]
    body = body_for(MESSAGES, "broken/claude-haiku-4-5", stream=True)
    response = post(gateway, MESSAGES, body, gateway.key)
    assert (response.status, response.header("x-llmgw-attempts")) == (200, "2")
    assert [name for name, _ in sse_events(response.body)].count("message_start") == 1


# ---- deployments: several keys, cooldowns shared by processes --------------------------------

def test_config_api_keys_are_deployments_used_in_turn(make_gateway, upstream):
    """``api_keys`` adds deployments; with no affinity, requests spread over them."""
    gateway = make_gateway(providers={"openai": {"base_url": upstream.url, "api_key": OPENAI_KEY,
                                                 "api_keys": ["${KEY_B}", {"name": "team-c", "key": "${KEY_C}"}]}},
                           routing={"affinity": "none"},
                           environ={"KEY_B": "sk-b-0123456789abcdef", "KEY_C": "sk-c-0123456789abcdef",
                                    "LLMGW_ADMIN_TOKEN": ADMIN_TOKEN})
    key = gateway.create_key()[1]
    for _ in range(30):
        assert post(gateway, CHAT, body_for(CHAT), key).status == 200
    used = {request["headers"]["authorization"] for request in upstream.requests}
    assert used == {"Bearer " + OPENAI_KEY, "Bearer sk-b-0123456789abcdef", "Bearer sk-c-0123456789abcdef"}
    assert {row["deployment"] for row in gateway.rows()} == {"default", "key_b", "team-c"}
    listed = deployments(gateway)
    assert sorted(listed) == ["anthropic/default", "openai/default", "openai/key_b", "openai/team-c"]
    assert listed["openai/team-c"]["key"] == "sk-...cdef" and listed["openai/team-c"]["source"] == "config"
    assert "0123456789abcdef" not in json.dumps(listed)


def test_session_affinity_sticks_to_one_deployment(make_gateway, upstream):
    gateway = make_gateway(providers={"openai": {"base_url": upstream.url, "api_key": OPENAI_KEY,
                                                 "api_keys": ["${KEY_B}"]}},
                           environ={"KEY_B": "sk-b-0123456789abcdef"})
    key = gateway.create_key()[1]
    for _ in range(12):
        reply = post(gateway, CHAT, body_for(CHAT), key, headers={"x-llmgw-session": "conversation-1"})
        assert reply.status == 200
    assert len({request["headers"]["authorization"] for request in upstream.requests}) == 1


def test_cli_named_keys_and_deployments_listing(tmp_path, cli_main, upstream, db):
    """``config set-key PROVIDER KEY --name NAME`` stores one more key; ``deployments`` lists them masked."""
    db.write_config(tmp_path / "config.yaml", {"providers": {"openai": {"base_url": upstream.url}}})
    cli_main("init", check=True)
    cli_main("config", "set-key", "openai", "sk-first-0123456789aaaa", check=True)
    result = cli_main("config", "set-key", "openai", "sk-second-0123456789bbbb", "--name", "team-b", check=True)
    assert "0123456789bbbb" not in result.stdout
    assert cli_main("config", "set-key", "openai", "sk-x-0123456789", "--name", "bad name").returncode == 1
    listing = cli_main("deployments", "--output", "json", check=True)
    rows = json.loads(listing.stdout)
    assert [(r["deployment"], r["key"], r["source"], r["state"]) for r in rows] == [
        ("openai/default", "sk-...aaaa", "database", "ok"), ("openai/team-b", "sk-...bbbb", "database", "ok")]
    table = cli_main("deployments", check=True).stdout
    assert "openai/team-b" in table and "0123456789" not in table


def test_cooldowns_are_shared_by_two_gateway_processes(make_gateway, fakes):
    """A deployment that failed in one process is skipped by another
    within a second (both read the cooldowns from the database)."""
    fakes["broken"].faults = "fail500"
    models = {"pair": alias("broken")}
    sections = dict(providers=providers_for(fakes), models=models, routing=ROUTING,
                    environ={"LLMGW_ADMIN_TOKEN": ADMIN_TOKEN})
    first, second = make_gateway(**sections), make_gateway(**sections)
    assert first.db_path == second.db_path
    key = first.create_key()[1]
    until_first_attempt_on(first, fakes, "broken", lambda: post(first, CHAT, body_for(CHAT, "pair"), key))
    started = time.monotonic()
    assert wait_until(lambda: deployments(second)["broken/default"]["state"] == "cooling", 2.0)
    assert time.monotonic() - started < 1.0
    seen = len(fakes["broken"].requests)
    for _ in range(3):
        reply = post(second, CHAT, body_for(CHAT, "pair"), key)
        assert (reply.status, reply.header("x-llmgw-attempts")) == (200, "1")
    assert len(fakes["broken"].requests) == seen


# ---- aliases, models list, stats -------------------------------------------------------------

def test_alias_weights_spread_requests(routed, fakes):
    gateway = routed()
    fakes["broken"].faults = ""  # healthy too: weight 1000 against 1
    for _ in range(10):
        assert post(gateway, CHAT, body_for(CHAT, "via-broken"), gateway.key, headers={}).status == 200
    assert len(fakes["broken"].requests) >= 8


def test_aliases_are_listed_in_both_model_list_shapes(routed, fakes):
    gateway = routed()
    openai_list = call(gateway, "GET", MODELS, key=gateway.key).json()
    assert openai_list["object"] == "list"
    assert {"id": "via-broken", "object": "model", "created": 0, "owned_by": "llmgw"} in openai_list["data"]
    anthropic_list = call(gateway, "GET", MODELS, key=gateway.key, headers={"anthropic-version": "2023-06-01"}).json()
    ids = [entry["id"] for entry in anthropic_list["data"]]
    assert "via-cutting" in ids and anthropic_list["last_id"] == ids[-1] and anthropic_list["has_more"] is False
    assert all(entry["type"] == "model" for entry in anthropic_list["data"])


@pytest.mark.parametrize("fault", ["fail500", "reset"])
def test_aliases_are_listed_when_the_providers_list_fails(routed, upstream, fault, caplog):
    """A provider whose /v1/models fails (an error answer, or none) no
    longer hides the aliases: the list holds them alone, in either shape."""
    gateway = routed(routing={"retries": 0})
    upstream.faults = fault  # the provider named openai: it answers /v1/models
    with caplog.at_level(logging.WARNING, logger="llmgw"):
        response = call(gateway, "GET", MODELS, key=gateway.key)
    assert response.status == 200, response.body
    assert response.json() == {"object": "list", "data": [
        {"id": alias, "object": "model", "created": 0, "owned_by": "llmgw"}
        for alias in ("via-broken", "via-limited", "via-stalling", "via-cutting")]}
    assert response.header("x-llmgw-request-id")
    assert any("could not list its models" in record.getMessage() for record in caplog.records)
    anthropic_list = call(gateway, "GET", MODELS, key=gateway.key, headers={"anthropic-version": "2023-06-01"}).json()
    assert [entry["id"] for entry in anthropic_list["data"]] == ["via-broken", "via-limited", "via-stalling",
                                                                 "via-cutting"]
    assert (anthropic_list["first_id"], anthropic_list["last_id"], anthropic_list["has_more"]) == (
        "via-broken", "via-cutting", False)
    assert len(upstream.requests) == 2


def test_faulty_target_comes_first_after_a_request_served_elsewhere(routed, fakes):
    """The harness: a request the healthy target served (here because the
    faulty one was cooling down) neither pins the next ones to it nor lets
    the cleared cooldown linger (the flaky "never came first")."""
    fakes["broken"].faults = "fail500"
    gateway = routed()
    query(gateway, "INSERT INTO deployment_cooldowns (deployment, until, failures, reason, updated_at) "
                   "VALUES ('broken/default', ?, 1, 'HTTP 500', ?)", (time.time() + 60, time.time()))
    assert wait_until(lambda: deployments(gateway)["broken/default"]["state"] == "cooling", 5.0)
    response = post(gateway, CHAT, body_for(CHAT, "via-broken"), gateway.key)
    assert response.header("x-llmgw-served-by") == "healthy/gpt-4o-mini" and not fakes["broken"].requests
    until_first_attempt_on(gateway, fakes, "broken",
                           lambda: post(gateway, CHAT, body_for(CHAT, "via-broken"), gateway.key))


def test_stats_count_attempts_retries_and_fallbacks(routed, fakes):
    fakes["broken"].faults = "fail500"
    gateway = routed()
    until_first_attempt_on(gateway, fakes, "broken",
                           lambda: post(gateway, CHAT, body_for(CHAT, "via-broken"), gateway.key))
    settled_rows(gateway)
    totals = admin(gateway, "GET", "/admin/usage-stats?by=project").json()[0]
    rows = gateway.rows()
    assert totals["requests"] == len({r["logical_request_id"] for r in rows})
    assert totals["attempts"] == len(rows)
    assert totals["retries"] == sum(r["attempt_kind"] == "retry" for r in rows) >= 1
    assert totals["fallbacks"] == sum(r["attempt_kind"] == "fallback" for r in rows) >= 1


def test_budget_rechecks_a_costlier_fallback(make_gateway, fakes):
    """Each attempt reserves on its own: a fallback whose worst case the
    budget cannot cover is not sent; the client gets the first failure."""
    fakes["broken"].faults = "fail500"
    gateway = make_gateway(providers=providers_for(fakes), routing=dict(ROUTING, retries=0),
                           models={"pricey": [{"target": "broken/cheap", "weight": FAULTY_FIRST},
                                              {"target": "healthy/costly"}]},
                           pricing={"cheap": {"input": 0.01, "output": 0.01},
                                    "costly": {"input": 100000, "output": 100000}})
    _, key = gateway.create_key(max_budget=1.0)
    for _ in range(8):
        response = post(gateway, CHAT, body_for(CHAT, "pricey", max_tokens=10), key)
        if response.status == 500:
            break
    assert response.status == 500
    assert all(r["model"] == "cheap" for r in rows_of(gateway, response.header("x-llmgw-request-id")))


# ---- config ----------------------------------------------------------------------------------

def test_routing_config_bounds_and_clear_refusals():
    import llmgw
    base = {"providers": {"openai": {"base_url": "https://api.openai.com"}}}
    routing = llmgw.parse_config(dict(base, routing={"retries": 0, "retry_on": [429, "timeout"]})).routing
    assert (routing.retries, routing.retry_on, routing.fallback_on) == (0, (429, "timeout"), (401, 403))
    for section, named in ((dict(routing={"retries": 11}), "routing.retries"),
                           (dict(routing={"retry_on": [200]}), "routing.retry_on"),
                           (dict(routing={"affinity": "sticky"}), "routing.affinity"),
                           (dict(models=[]), "models"),
                           (dict(models={"fast": []}), "models.fast"),
                           (dict(models={"fast": ["nowhere/gpt-4o"]}), "models.fast[0]"),
                           (dict(models={"fast": [{"target": "openai/gpt-4o", "weight": 0}]}), "models.fast[0]"),
                           (dict(providers={"openai": {"base_url": "https://x", "api_keys": ["sk-literal-key"]}}),
                            "providers.openai.api_keys[0]")):
        with pytest.raises(llmgw.ConfigError) as info:
            llmgw.parse_config(dict(base, **section))
        assert info.value.message.startswith(named) and "sk-literal-key" not in info.value.message
