"""Proxying: paths, usage rows, routing, forwarded headers, client
credentials, errors, rate limits and upstream connection reuse.

Every test runs the real gateway against tests/fake_upstream.py over
sockets and reads the usage rows back from the database file.
"""

import json

import pytest

from conftest import (ANTHROPIC_KEY, CHAT, COMPLETIONS, COUNT_TOKENS, CREDENTIAL_HEADERS, EMBEDDINGS, MESSAGES, MODELS,
                      OPENAI_KEY, RESPONSES, TOKEN_COLUMNS, assert_json_error, assert_still_serving, body_for, call,
                      dialect_of, expected_columns, expected_cost, free_port, normalise_ids, post, scripted_reply,
                      tokens_of)

MISTRAL_KEY = "sk-CANARY-MISTRAL-0123456789abcdef"

ANTHROPIC_PATHS = (MESSAGES, COUNT_TOKENS)


# ---- helpers ---------------------------------------------------------------

def sent_headers(upstream, index=-1):
    return upstream.requests[index]["headers"]


# ---- paths -----------------------------------------------------------------

def test_post_paths_are_forwarded_to_the_same_path(gateway, vkey, upstream):
    paths = (CHAT, COMPLETIONS, EMBEDDINGS, RESPONSES, MESSAGES, COUNT_TOKENS)
    for index, path in enumerate(paths):
        response = post(gateway, path, body_for(path, "some-model"), vkey)
        assert response.status == 200, response.body
        assert len(upstream.requests) == index + 1
        forwarded = upstream.requests[index]
        assert (forwarded["method"], forwarded["path"]) == ("POST", path)
        assert forwarded["json"] == body_for(path, "some-model")
    assert [row["endpoint"] for row in gateway.rows()] == list(paths)


def test_models_goes_to_openai_without_anthropic_version(gateway, vkey, upstream):
    response = call(gateway, "GET", MODELS, key=vkey)
    assert response.status == 200, response.body
    payload = response.json()
    assert payload["object"] == "list"
    assert [m["id"] for m in payload["data"]] == ["gpt-4o-mini", "gpt-4o", "text-embedding-3-small"]
    forwarded = upstream.requests[0]
    assert (forwarded["method"], forwarded["path"]) == ("GET", MODELS)
    assert forwarded["headers"]["authorization"] == "Bearer " + OPENAI_KEY
    assert "anthropic-version" not in forwarded["headers"]
    assert response.header("x-request-id") == forwarded["request_id"]
    row, = gateway.rows()
    assert (row["provider"], row["endpoint"], row["status"], row["http_status"]) == ("openai", MODELS, "ok", 200)


def test_models_goes_to_anthropic_with_anthropic_version(gateway, vkey, upstream):
    response = call(gateway, "GET", MODELS, key=vkey, headers={"anthropic-version": "2023-06-01"})
    assert response.status == 200, response.body
    payload = response.json()
    assert payload["has_more"] is False
    assert [m["id"] for m in payload["data"]] == ["claude-sonnet-4-5", "claude-haiku-4-5"]
    assert all(m["type"] == "model" for m in payload["data"])
    forwarded = upstream.requests[0]
    assert forwarded["headers"]["x-api-key"] == ANTHROPIC_KEY
    assert forwarded["headers"]["anthropic-version"] == "2023-06-01"
    assert "authorization" not in forwarded["headers"]
    assert response.header("request-id") == forwarded["request_id"]
    row, = gateway.rows()
    assert (row["provider"], row["status"], row["http_status"]) == ("anthropic", "ok", 200)


UNKNOWN_PATHS = [
    ("POST", "/v1/files"),
    ("GET", "/v1/files"),
    ("POST", "/v1/chat/completions/../files"),
    ("POST", "/v1/chat/completion"),
    ("POST", "/v1/chat/completions/"),
    ("POST", "/v1//chat/completions"),
    ("POST", "/v1/chat%2Fcompletions"),
    ("POST", "/V1/chat/completions"),
    ("POST", "/chat/completions"),
    ("GET", "/adminx"),
    ("GET", "/admin-keys"),
    ("GET", "/v1/admin"),
    ("POST", "/v1/messages/batches"),
    ("GET", "/v1/messages/batches"),
    ("POST", "/v1/messages/"),
    ("POST", "/v1/messages/count_tokens/x"),
    ("POST", "/v1/messagesx"),
    ("GET", "/"),
]


@pytest.mark.parametrize("method,path", UNKNOWN_PATHS)
def test_unknown_paths_are_404_and_never_forwarded(gateway, vkey, upstream, method, path):
    body = body_for(CHAT, "gpt-4o-mini") if method == "POST" else None
    response = call(gateway, method, path, body, key=vkey)
    error = assert_json_error(response, 404, dialect_of(path), error_type="not_found_error")["error"]
    assert vkey not in response.body.decode()
    if dialect_of(path) == "openai":
        assert error["code"] == "not_found", path
    assert upstream.requests == []
    assert gateway.rows() == []
    assert_still_serving(gateway, vkey, upstream)


@pytest.mark.parametrize("method, path, dialect", [
    ("POST", "/v1/v1/messages", "anthropic"),           # ANTHROPIC_BASE_URL=http://gw/v1
    ("POST", "/v1/v1/messages/count_tokens", "anthropic"),
    ("POST", "/v1/v1/chat/completions", "openai"),      # OPENAI_BASE_URL=http://gw/v1/v1
    ("GET", "/v1/v1/models", "openai"),
])
def test_a_path_that_doubles_v1_gets_a_404_that_says_so(gateway, vkey, upstream, method, path, dialect):
    body = body_for(CHAT) if method == "POST" else None
    headers = {"anthropic-version": "2023-06-01"} if dialect == "anthropic" else {}  # as Anthropic's SDKs send
    response = call(gateway, method, path, body, key=vkey, headers=headers)
    error = assert_json_error(response, 404, dialect, error_type="not_found_error")["error"]
    assert "/v1 is there twice" in error["message"] and path in error["message"]
    assert "ANTHROPIC_BASE_URL=http://HOST:PORT)" in error["message"]
    if dialect == "openai":
        assert error["code"] == "base_url_doubles_v1"
    assert upstream.requests == []


@pytest.mark.parametrize("method, path", [("POST", "/v1/v1/messages"), ("GET", "/v1/files"),
                                          ("POST", "/v1/complete"), ("GET", "/"), ("POST", "/v1/v1/models")])
def test_unknown_paths_answer_in_anthropic_shape_to_anthropic_clients(gateway, vkey, upstream, method, path):
    """Only Anthropic's clients send anthropic-version: a 404 their SDK can read."""
    body = body_for(MESSAGES, "claude-sonnet-4-5") if method == "POST" else None
    response = call(gateway, method, path, body, key=vkey, headers={"anthropic-version": "2023-06-01"})
    assert_json_error(response, 404, "anthropic", error_type="not_found_error")
    without = call(gateway, method, path, body, key=vkey)
    assert_json_error(without, 404, dialect_of(path), error_type="not_found_error")
    assert upstream.requests == []


def test_unknown_path_is_404_even_without_a_key(gateway, vkey, upstream):
    response = post(gateway, "/v1/files", {"model": "x"})
    assert_json_error(response, 404, "openai", error_type="not_found_error")
    assert upstream.requests == []


# ---- usage rows, non-streamed ----------------------------------------------

USAGE_CASES = [
    (CHAT, "gpt-4o-mini"),
    (CHAT, "gpt-4o-cache-reasoning"),
    (COMPLETIONS, "gpt-3.5-turbo-instruct-cache"),
    (COMPLETIONS, "babbage-reasoning"),
    (EMBEDDINGS, "text-embedding-3-small"),
    (RESPONSES, "gpt-4o-mini"),
    (RESPONSES, "o3-cache-reasoning"),
    (MESSAGES, "claude-sonnet-4-5"),
    (MESSAGES, "claude-sonnet-4-5-cache"),
]


@pytest.mark.parametrize("path,model", USAGE_CASES)
def test_nonstreamed_usage_rows_equal_reported(gateway, vkey, upstream, path, model):
    response = post(gateway, path, body_for(path, model), vkey)
    assert response.status == 200, response.body
    assert len(upstream.reported) == 1
    reported = upstream.reported[0]
    assert response.json()["usage"] == reported["usage"]
    row = gateway.rows()[0]
    assert tokens_of(row) == expected_columns(path, reported["usage"])
    assert row["request_tokens"] > 0
    assert (row["status"], row["http_status"], row["usage_source"], row["streamed"]) == ("ok", 200, "reported", 0)
    assert (row["endpoint"], row["model"]) == (path, model)
    assert row["provider"] == ("anthropic" if path == MESSAGES else "openai")
    assert row["finished_at"] is not None and row["latency_ms"] >= 0
    if "cache" in model:
        assert row["cache_read_tokens"] > 0
        if path == MESSAGES:
            assert row["cache_write_tokens"] > 0 and row["cache_write_1h_tokens"] > 0
    if "reasoning" in model:
        assert row["reasoning_tokens"] > 0
    assert len(gateway.rows()) == 1


def test_builtin_price_gpt_4o(gateway, vkey, upstream):
    response = post(gateway, CHAT, body_for(CHAT, "gpt-4o"), vkey)
    assert response.status == 200
    row, = gateway.rows()
    columns = expected_columns(CHAT, upstream.reported[0]["usage"])
    assert row["cost_nanousd"] == expected_cost(columns, 2.5, 10, cached=1.25)
    # 2.5 USD/Mtok = 2500 nano-USD a token; 10 USD/Mtok = 10000.
    assert row["cost_nanousd"] == columns["request_tokens"] * 2500 + columns["response_tokens"] * 10000
    assert row["priced"] == 1


def test_cost_with_cached_input_openai(make_gateway, upstream):
    gw = make_gateway(pricing={"gpt-4o-cache": {"input": 2.5, "output": 10, "cached_input": 1.25}})
    key = gw.create_key()[1]
    response = post(gw, CHAT, body_for(CHAT, "gpt-4o-cache"), key)
    assert response.status == 200
    row, = gw.rows()
    columns = expected_columns(CHAT, upstream.reported[0]["usage"])
    assert columns["cache_read_tokens"] > 0
    expected = columns["input_tokens"] * 2500 + columns["cache_read_tokens"] * 1250 + columns["output_tokens"] * 10000
    assert row["cost_nanousd"] == expected == expected_cost(columns, 2.5, 10, cached=1.25)
    assert row["priced"] == 1


def test_cost_with_cache_reads_and_writes_anthropic(make_gateway, upstream):
    gw = make_gateway(pricing={"claude-x-cache": {"input": 3, "output": 15, "cached_input": 0.3,
                                                  "cache_write": 3.75, "cache_write_1h": 6}})
    key = gw.create_key()[1]
    response = post(gw, MESSAGES, body_for(MESSAGES, "claude-x-cache"), key)
    assert response.status == 200
    row, = gw.rows()
    columns = expected_columns(MESSAGES, upstream.reported[0]["usage"])
    expected = (columns["input_tokens"] * 3000 + columns["cache_read_tokens"] * 300
                + columns["cache_write_tokens"] * 3750 + columns["cache_write_1h_tokens"] * 6000
                + columns["output_tokens"] * 15000)
    assert row["cost_nanousd"] == expected
    assert tokens_of(row) == columns


def test_unpriced_model_is_recorded_at_cost_zero(gateway, vkey, upstream):
    post(gateway, CHAT, body_for(CHAT, "no-such-model-xyz"), vkey)
    row, = gateway.rows()
    assert row["request_tokens"] > 0
    assert (row["cost_nanousd"], row["priced"]) == (0, 0)


def test_count_tokens_row_has_no_tokens(gateway, vkey, upstream):
    response = post(gateway, COUNT_TOKENS, body_for(COUNT_TOKENS, "claude-sonnet-4-5"), vkey)
    assert response.status == 200
    assert set(response.json()) == {"input_tokens"}
    assert response.json()["input_tokens"] > 0
    row, = gateway.rows()
    assert tokens_of(row) == dict.fromkeys(TOKEN_COLUMNS, 0)
    assert (row["status"], row["http_status"], row["cost_nanousd"], row["endpoint"]) == \
        ("ok", 200, 0, COUNT_TOKENS)
    assert row["provider"] == "anthropic"


def test_models_rows_have_no_tokens(gateway, vkey, upstream):
    for headers in ({}, {"anthropic-version": "2023-06-01"}):
        assert call(gateway, "GET", MODELS, key=vkey, headers=headers).status == 200
    rows = gateway.rows()
    assert [row["provider"] for row in rows] == ["openai", "anthropic"]
    for row in rows:
        assert tokens_of(row) == dict.fromkeys(TOKEN_COLUMNS, 0)
        assert (row["status"], row["http_status"], row["cost_nanousd"], row["streamed"]) == ("ok", 200, 0, 0)
        assert row["endpoint"] == MODELS


def test_rows_are_attributed_to_the_key(gateway, upstream):
    record_a, key_a = gateway.create_key("project a")
    record_b, key_b = gateway.create_key("project b")
    post(gateway, CHAT, body_for(CHAT, "gpt-4o-mini"), key_a)
    post(gateway, MESSAGES, body_for(MESSAGES, "claude-haiku-4-5"), key_b)
    rows = gateway.rows()
    assert [r["virtual_key_id"] for r in rows] == [record_a["id"], record_b["id"]]
    assert len({r["request_id"] for r in rows}) == 2


# ---- routing ---------------------------------------------------------------

def test_provider_prefix_is_stripped(gateway, vkey, upstream):
    response = post(gateway, CHAT, body_for(CHAT, "openai/gpt-4o"), vkey)
    assert response.status == 200
    forwarded = upstream.requests[0]
    assert forwarded["json"] == body_for(CHAT, "gpt-4o")
    assert forwarded["headers"]["authorization"] == "Bearer " + OPENAI_KEY
    row, = gateway.rows()
    assert row["provider"] == "openai"
    assert tokens_of(row) == expected_columns(CHAT, upstream.reported[0]["usage"])


def test_anthropic_prefix_on_messages(gateway, vkey, upstream):
    response = post(gateway, MESSAGES, body_for(MESSAGES, "anthropic/claude-sonnet-4-5"), vkey)
    assert response.status == 200
    assert upstream.requests[0]["json"]["model"] == "claude-sonnet-4-5"
    assert upstream.requests[0]["headers"]["x-api-key"] == ANTHROPIC_KEY


def test_unknown_prefix_is_not_stripped(gateway, vkey, upstream):
    post(gateway, CHAT, body_for(CHAT, "meta-llama/llama-3"), vkey)
    assert upstream.requests[0]["json"]["model"] == "meta-llama/llama-3"
    assert upstream.requests[0]["headers"]["authorization"] == "Bearer " + OPENAI_KEY
    assert gateway.rows()[0]["provider"] == "openai"


def mistral_gateway(make_gateway, upstream):
    return make_gateway(providers={"mistral": {"base_url": upstream.url, "format": "openai",
                                               "models": ["mistral-*"], "api_key": MISTRAL_KEY}})


def test_models_glob_routes_to_provider(make_gateway, upstream):
    gw = mistral_gateway(make_gateway, upstream)
    key = gw.create_key()[1]
    response = post(gw, CHAT, body_for(CHAT, "mistral-large-latest"), key)
    assert response.status == 200, response.body
    forwarded = upstream.requests[0]
    assert forwarded["headers"]["authorization"] == "Bearer " + MISTRAL_KEY
    assert forwarded["json"]["model"] == "mistral-large-latest"
    row, = gw.rows()
    assert row["provider"] == "mistral"
    assert tokens_of(row) == expected_columns(CHAT, upstream.reported[0]["usage"])
    # A model matching no glob goes to the default provider.
    post(gw, CHAT, body_for(CHAT, "gpt-4o-mini"), key)
    assert upstream.requests[1]["headers"]["authorization"] == "Bearer " + OPENAI_KEY
    assert gw.rows()[1]["provider"] == "openai"


def test_prefix_names_a_configured_provider(make_gateway, upstream):
    gw = mistral_gateway(make_gateway, upstream)
    key = gw.create_key()[1]
    post(gw, EMBEDDINGS, body_for(EMBEDDINGS, "mistral/codestral-embed"), key)
    forwarded = upstream.requests[0]
    assert forwarded["json"]["model"] == "codestral-embed"
    assert forwarded["headers"]["authorization"] == "Bearer " + MISTRAL_KEY
    assert gw.rows()[0]["provider"] == "mistral"


def test_openai_format_provider_is_not_used_for_messages(make_gateway, upstream):
    gw = mistral_gateway(make_gateway, upstream)
    key = gw.create_key()[1]
    response = post(gw, MESSAGES, body_for(MESSAGES, "mistral-large-latest"), key)
    assert response.status == 200
    assert upstream.requests[0]["headers"]["x-api-key"] == ANTHROPIC_KEY
    assert gw.rows()[0]["provider"] == "anthropic"


def test_default_provider_is_openai(gateway, vkey, upstream):
    post(gateway, CHAT, body_for(CHAT, "claude-sonnet-4-5"), vkey)
    assert upstream.requests[0]["headers"]["authorization"] == "Bearer " + OPENAI_KEY
    assert gateway.rows()[0]["provider"] == "openai"


def test_messages_go_to_the_anthropic_provider(gateway, vkey, upstream):
    post(gateway, MESSAGES, body_for(MESSAGES, "gpt-4o"), vkey)
    assert upstream.requests[0]["headers"]["x-api-key"] == ANTHROPIC_KEY
    assert gateway.rows()[0]["provider"] == "anthropic"


# ---- forwarded headers -----------------------------------------------------

HOSTILE_HEADERS = {
    "Connection": "keep-alive, X-Hop-Secret",
    "X-Hop-Secret": "hop-by-hop-value",
    "Keep-Alive": "timeout=5",
    "Proxy-Authorization": "Basic cHJveHk6c2VjcmV0",
    "Cookie": "session=cookie-secret",
    "X-Forwarded-For": "203.0.113.7",
    "X-Forwarded-Host": "evil.example",
    "Forwarded": "for=203.0.113.7",
    "X-Real-IP": "203.0.113.7",
    "Host": "evil.example",
    "TE": "trailers",
}


def assert_one_credential(upstream, header, value, vkey):
    forwarded = upstream.requests[-1]
    names = [name.lower() for name, _ in forwarded["header_list"]]
    present = [name for name in names if name in CREDENTIAL_HEADERS]
    assert present == [header], forwarded["header_list"]
    assert forwarded["headers"][header] == value
    for name, val in forwarded["header_list"]:
        assert vkey not in val, name
    assert vkey.encode() not in forwarded["body"]


def credential_headers(kind, vkey):
    return {kind: vkey} if kind in ("x-api-key", "api-key") else {"Authorization": "Bearer " + vkey}


@pytest.mark.parametrize("path", [CHAT, COMPLETIONS, EMBEDDINGS, RESPONSES])
@pytest.mark.parametrize("kind", ["authorization", "x-api-key", "api-key"])
def test_openai_paths_get_the_real_key(gateway, vkey, upstream, path, kind):
    response = post(gateway, path, body_for(path, "gpt-4o-mini"), headers=credential_headers(kind, vkey))
    assert response.status == 200, response.body
    assert_one_credential(upstream, "authorization", "Bearer " + OPENAI_KEY, vkey)
    assert "anthropic-version" not in upstream.requests[-1]["headers"]
    assert len(upstream.requests) == 1


@pytest.mark.parametrize("path", ANTHROPIC_PATHS)
@pytest.mark.parametrize("kind", ["authorization", "x-api-key"])
def test_anthropic_paths_get_the_real_key(gateway, vkey, upstream, path, kind):
    response = post(gateway, path, body_for(path, "claude-haiku-4-5"), headers=credential_headers(kind, vkey))
    assert response.status == 200, response.body
    assert_one_credential(upstream, "x-api-key", ANTHROPIC_KEY, vkey)
    assert sent_headers(upstream)["anthropic-version"] == "2023-06-01"
    assert len(upstream.requests) == 1


@pytest.mark.parametrize("name", ["x-api-key", "Authorization"])
def test_models_accepts_both_credential_headers(gateway, vkey, upstream, name):
    value = vkey if name == "x-api-key" else "Bearer " + vkey
    for extra, header, secret in (({}, "authorization", "Bearer " + OPENAI_KEY),
                                  ({"anthropic-version": "2023-06-01"}, "x-api-key", ANTHROPIC_KEY)):
        response = call(gateway, "GET", MODELS, headers=dict(extra, **{name: value}))
        assert response.status == 200, response.body
        assert_one_credential(upstream, header, secret, vkey)


def test_anthropic_version_is_passed_through(gateway, vkey, upstream):
    post(gateway, MESSAGES, body_for(MESSAGES, "claude-haiku-4-5"), vkey,
         headers={"anthropic-version": "2024-10-22"})
    assert sent_headers(upstream)["anthropic-version"] == "2024-10-22"


def test_beta_headers_are_forwarded(gateway, vkey, upstream):
    post(gateway, MESSAGES, body_for(MESSAGES, "claude-haiku-4-5"), vkey,
         headers={"anthropic-beta": "prompt-caching-2024-07-31,files-api-2025-04-14"})
    assert sent_headers(upstream)["anthropic-beta"] == "prompt-caching-2024-07-31,files-api-2025-04-14"
    post(gateway, RESPONSES, body_for(RESPONSES, "gpt-4o-mini"), vkey, headers={"OpenAI-Beta": "assistants=v2"})
    assert sent_headers(upstream)["openai-beta"] == "assistants=v2"


#: What Codex and Claude Code send for caching and attribution.
CODEX_HEADERS = {"session_id": "0199a213-81c0-7800-8aa1-bbab2a035a53", "originator": "codex_cli_rs",
                 "x-codex-beta-features": "unified_exec,web_search"}
CLAUDE_CODE_HEADERS = {"X-Claude-Code-Session-Id": "4f1d2c3b-0a9e-4d8c-b7a6-5e4f3d2c1b0a"}


@pytest.mark.parametrize("path", [CHAT, RESPONSES, MESSAGES, COUNT_TOKENS])
def test_agent_headers_reach_the_providers_of_their_own_api(gateway, vkey, upstream, path):
    """Codex's go to OpenAI-format providers, Claude Code's to Anthropic-format
    ones: what each agent would send there itself, and nothing across."""
    response = post(gateway, path, body_for(path, "claude-haiku-4-5" if path in ANTHROPIC_PATHS else "gpt-4o-mini"),
                    vkey, headers=dict(CODEX_HEADERS, **CLAUDE_CODE_HEADERS))
    assert response.status == 200, response
    sent = sent_headers(upstream)
    if path in ANTHROPIC_PATHS:
        assert sent["x-claude-code-session-id"] == CLAUDE_CODE_HEADERS["X-Claude-Code-Session-Id"]
        assert not set(CODEX_HEADERS) & set(sent)
    else:
        assert {name: sent.get(name) for name in CODEX_HEADERS} == CODEX_HEADERS
        assert "x-claude-code-session-id" not in sent


def test_openai_calls_to_an_anthropic_provider_take_claude_codes_header_not_codexs(make_gateway, upstream):
    gateway = make_gateway(providers={"anthropic": {"base_url": upstream.url, "api_key": ANTHROPIC_KEY,
                                                    "models": ["claude-*"]}})
    vkey = gateway.create_key()[1]
    post(gateway, CHAT, body_for(CHAT, "claude-haiku-4-5"), vkey, headers=dict(CODEX_HEADERS, **CLAUDE_CODE_HEADERS))
    sent = sent_headers(upstream)
    assert sent["authorization"] == "Bearer " + ANTHROPIC_KEY or sent["x-api-key"] == ANTHROPIC_KEY
    assert "x-claude-code-session-id" in sent and not set(CODEX_HEADERS) & set(sent)


@pytest.mark.parametrize("path, header", [(MESSAGES, "X-Claude-Code-Session-Id"), (RESPONSES, "session_id")])
def test_an_agents_session_keeps_to_one_deployment(make_gateway, upstream, path, header):
    """With affinity by session, an agent's own session header is the
    session: its calls keep to one key (and its prompt cache)."""
    providers = {name: {"base_url": upstream.url, "api_key": "${KEY_A}", "api_keys": ["${KEY_B}"]}
                 for name in ("openai", "anthropic")}
    gateway = make_gateway(providers=providers, routing={"affinity": "session"},
                           environ={"KEY_A": "sk-a-0123456789abcdef", "KEY_B": "sk-b-0123456789abcdef"})
    vkey = gateway.create_key()[1]
    credential = "x-api-key" if path == MESSAGES else "authorization"
    used = {}
    for session in ("agent-session-1", None):
        upstream.reset()
        for _ in range(12):
            reply = post(gateway, path, body_for(path, "claude-haiku-4-5" if path == MESSAGES else "gpt-4o-mini"),
                         vkey, headers={header: session} if session else {})
            assert reply.status == 200, reply
        used[session] = {request["headers"][credential] for request in upstream.requests}
    assert len(used["agent-session-1"]) == 1 and len(used[None]) == 2


@pytest.mark.parametrize("name", ["session_id", "originator", "x-codex-beta-features", "x-claude-code-session-id"])
def test_agent_header_that_is_not_printable_ascii_is_400(gateway, vkey, upstream, name):
    path = MESSAGES if name == "x-claude-code-session-id" else CHAT
    response = post(gateway, path, body_for(path, "claude-haiku-4-5"), vkey, headers={name: "caf\xe9"})
    assert_json_error(response, 400, dialect_of(path))
    assert upstream.requests == []


#: A provider's answer with every kind of header: relayed (ids, retry advice,
#: model, timing, rate limits) and withheld (cookies, organization and
#: project ids, internals).
PROVIDER_HEADERS = [
    ("x-request-id", "req_abc123"), ("request-id", "req_011CXYZ"), ("openai-model", "gpt-4o-2024-08-06"),
    ("openai-processing-ms", "231"), ("x-should-retry", "false"), ("retry-after", "3"), ("retry-after-ms", "2500"),
    ("x-ratelimit-remaining-requests", "499"), ("x-ratelimit-reset-tokens", "6m0s"),
    ("anthropic-ratelimit-requests-remaining", "49"),
    ("anthropic-ratelimit-input-tokens-reset", "2026-12-03T15:00:00Z"),
    ("set-cookie", "__cf_bm=secret-cookie; path=/"), ("openai-organization", "org-operator-secret"),
    ("openai-project", "proj_operator"), ("anthropic-organization-id", "0a1b-operator"),
    ("x-envoy-upstream-service-time", "12"), ("cf-ray", "8f00-AMS"), ("server", "cloudflare"),
]
RELAYED = {"x-request-id", "request-id", "openai-model", "openai-processing-ms", "x-should-retry", "retry-after",
           "retry-after-ms", "x-ratelimit-remaining-requests", "x-ratelimit-reset-tokens",
           "anthropic-ratelimit-requests-remaining", "anthropic-ratelimit-input-tokens-reset"}


@pytest.mark.parametrize("status_line, stream", [("HTTP/1.1 200 OK", False), ("HTTP/1.1 200 OK", True),
                                                 ("HTTP/1.1 400 Bad Request", False)])
def test_clients_get_the_provider_headers_they_read_and_nothing_else(scripted_gateway, status_line, stream):
    if stream:
        body = b'data: {"choices":[{"index":0,"delta":{"content":"hi"}}]}\n\n' \
            b'data: {"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":1}}\n\ndata: [DONE]\n\n'
        content_type = "text/event-stream"
    else:
        body = json.dumps({"error": {"message": "no", "type": "invalid_request_error", "param": None, "code": None}}
                          if "400" in status_line else {"choices": [], "usage": {"prompt_tokens": 3,
                                                                                 "completion_tokens": 1}}).encode()
        content_type = "application/json"
    reply = scripted_reply(status_line, PROVIDER_HEADERS + [("content-type", content_type),
                                                            ("content-length", str(len(body)))], body)
    upstream, gateway = scripted_gateway([reply], routing={"retries": 0})
    vkey = gateway.create_key()[1]
    response = post(gateway, CHAT, body_for(CHAT, stream=stream), vkey)
    assert response.status == int(status_line.split()[1]), response
    relayed = {name for name, _ in PROVIDER_HEADERS if response.header(name) is not None and name != "server"}
    assert relayed == RELAYED
    assert all(response.header(name) == value for name, value in PROVIDER_HEADERS if name in RELAYED)
    assert response.header("server").startswith("llmgw/")
    assert b"operator" not in response.body and b"secret-cookie" not in response.body


def test_hop_by_hop_and_forwarding_headers_stay_behind(gateway, vkey, upstream):
    for path in (CHAT, MESSAGES):
        check_hop_by_hop(gateway, vkey, upstream, path)


def check_hop_by_hop(gateway, vkey, upstream, path):
    response = post(gateway, path, body_for(path, "gpt-4o-mini"), vkey, headers=HOSTILE_HEADERS)
    assert response.status == 200, response.body
    forwarded = upstream.requests[-1]
    headers = forwarded["headers"]
    for name in ("x-hop-secret", "keep-alive", "proxy-authorization", "cookie", "x-forwarded-for",
                 "x-forwarded-host", "forwarded", "x-real-ip", "te"):
        assert name not in headers, (name, forwarded["header_list"])
    assert headers["host"] == "127.0.0.1:%d" % upstream.port
    assert "x-hop-secret" not in headers.get("connection", "").lower()
    for secret in ("hop-by-hop-value", "cHJveHk6c2VjcmV0", "cookie-secret", "203.0.113.7", "evil.example"):
        assert all(secret not in value for _, value in forwarded["header_list"])
    assert_one_credential(upstream, "authorization" if path == CHAT else "x-api-key",
                          "Bearer " + OPENAI_KEY if path == CHAT else ANTHROPIC_KEY, vkey)


def test_client_gets_upstream_status_body_type_and_request_id(gateway, vkey, upstream):
    raw = json.dumps(body_for(CHAT, "gpt-4o-cache")).encode()
    direct = post(upstream.url, CHAT, None, raw_body=raw)
    response = post(gateway, CHAT, None, vkey, raw_body=raw)
    assert response.status == 200
    assert upstream.requests[1]["body"] == raw  # forwarded unchanged
    assert normalise_ids(response.body) == normalise_ids(direct.body)
    assert response.header("content-type") == "application/json"
    assert response.header("x-request-id") == upstream.requests[1]["request_id"] == "req_2"
    assert response.json()["id"] == "chatcmpl-fake2"
    assert response.header("x-llmgw-request-id") == gateway.rows()[0]["request_id"]


def test_anthropic_request_id_is_passed(gateway, vkey, upstream):
    response = post(gateway, MESSAGES, body_for(MESSAGES, "claude-haiku-4-5"), vkey)
    assert response.status == 200
    assert response.header("request-id") == upstream.requests[0]["request_id"]
    assert response.json()["id"] == "msg_fake1"
    assert response.json()["usage"] == upstream.reported[0]["usage"]


# ---- client credentials ----------------------------------------------------

ALL_PATHS = [(p, "POST") for p in (CHAT, COMPLETIONS, EMBEDDINGS, RESPONSES, MESSAGES, COUNT_TOKENS)] + \
    [(MODELS, "GET")]


def _send(gw, path, method, key=None, headers=None, query=""):
    body = body_for(path, "gpt-4o-mini") if method == "POST" else None
    return call(gw, method, path + query, body, key=key, headers=headers)


@pytest.mark.parametrize("path,method", ALL_PATHS)
def test_missing_key_is_401(gateway, vkey, upstream, path, method):
    response = _send(gateway, path, method)
    assert_json_error(response, 401, dialect_of(path), error_type="authentication_error")
    for headers in ({"Authorization": "Bearer "}, {"x-api-key": ""}):
        response = _send(gateway, path, method, headers=headers)
        assert_json_error(response, 401, dialect_of(path), error_type="authentication_error")
    assert upstream.requests == []
    assert gateway.rows() == []


@pytest.mark.parametrize("path,method", ALL_PATHS)
def test_key_in_query_string_is_not_accepted(gateway, vkey, upstream, path, method):
    for query in ("?api_key=" + vkey, "?key=" + vkey, "?x-api-key=" + vkey):
        response = _send(gateway, path, method, query=query)
        assert_json_error(response, 401, dialect_of(path), error_type="authentication_error")
        assert vkey not in response.body.decode()
    assert upstream.requests == []


@pytest.mark.parametrize("path,method", ALL_PATHS)
def test_unknown_key_is_401_and_not_echoed(gateway, vkey, upstream, path, method):
    bogus = "llmgw-NOT-A-REAL-KEY-zyxwvutsrq9876543210"
    for headers in ({"Authorization": "Bearer " + bogus}, {"x-api-key": bogus},
                    {"x-api-key": "llmgw-" + "A" * 600}):
        response = _send(gateway, path, method, headers=headers)
        assert_json_error(response, 401, dialect_of(path), error_type="authentication_error")
        assert bogus not in response.body.decode()
        assert "zyxwvutsrq" not in response.body.decode() and "AAAAAAAA" not in response.body.decode()
    assert upstream.requests == []


def test_different_keys_in_both_headers_is_401(gateway, vkey, upstream):
    other = gateway.create_key("other")[1]
    for path, method in ALL_PATHS:
        response = _send(gateway, path, method, headers={"Authorization": "Bearer " + vkey, "x-api-key": other})
        assert_json_error(response, 401, dialect_of(path), error_type="authentication_error")
        assert vkey not in response.body.decode() and other not in response.body.decode()
    assert upstream.requests == []
    # The same key in both headers is fine.
    response = _send(gateway, CHAT, "POST", headers={"Authorization": "Bearer " + vkey, "x-api-key": vkey})
    assert response.status == 200


def test_malformed_authorization_is_401(gateway, vkey, upstream):
    for authorization in ("Basic {k}", "Bearer", "Bearer  {k}", "{k}", "Token {k}"):
        response = _send(gateway, CHAT, "POST", headers={"Authorization": authorization.format(k=vkey)})
        assert_json_error(response, 401, "openai", error_type="authentication_error")
        assert vkey not in response.body.decode()
    assert upstream.requests == []


def test_revoked_key_is_401(gateway, upstream):
    record, secret = gateway.create_key("to revoke")
    for path, method in ALL_PATHS:
        assert _send(gateway, path, method, key=secret).status == 200  # cached now
    assert gateway.store.revoke_key(record["id"]) is True
    for path, method in ALL_PATHS:
        for headers in ({"Authorization": "Bearer " + secret}, {"x-api-key": secret}):
            response = _send(gateway, path, method, headers=headers)
            assert_json_error(response, 401, dialect_of(path), error_type="authentication_error")
            assert secret not in response.body.decode()
    assert len(upstream.requests) == len(ALL_PATHS)


# ---- request errors --------------------------------------------------------

BAD_BODIES = [b"not json", b"{\"model\": ", b"[1, 2]", b"\"gpt-4o\"", b"null", b"{}",
              b"{\"model\": 5}", b"{\"model\": \"\"}", b"{\"model\": null}", b"{\"messages\": []}", b""]


@pytest.mark.parametrize("path", [CHAT, COMPLETIONS, EMBEDDINGS, RESPONSES, MESSAGES, COUNT_TOKENS])
@pytest.mark.parametrize("raw", BAD_BODIES)
def test_bad_bodies_are_400(gateway, vkey, upstream, path, raw):
    response = post(gateway, path, None, vkey, raw_body=raw)
    assert_json_error(response, 400, dialect_of(path), error_type="invalid_request_error")
    assert vkey not in response.body.decode()
    assert upstream.requests == []
    assert gateway.rows() == []
    assert_still_serving(gateway, vkey, upstream)


def test_server_keeps_serving_after_request_errors(gateway, vkey, upstream):
    post(gateway, CHAT, None, vkey, raw_body=b"not json")
    post(gateway, MESSAGES, None, vkey, raw_body=b"[]")
    post(gateway, "/v1/files", {"model": "x"}, vkey)
    post(gateway, CHAT, {"model": "x"}, "llmgw-bogus")
    assert_still_serving(gateway, vkey, upstream)


# ---- upstream errors -------------------------------------------------------

def test_unreachable_upstream_is_502_and_recorded(make_gateway, upstream):
    dead = "http://127.0.0.1:%d" % free_port()
    gw = make_gateway(providers={"dead": {"base_url": dead, "format": "openai", "models": ["dead-*"],
                                          "api_key": "sk-dead-0123456789"}})
    key = gw.create_key()[1]
    response = post(gw, CHAT, body_for(CHAT, "dead-model"), key)
    assert_json_error(response, 502, "openai", error_type="api_error")
    assert response.header("x-llmgw-attempts") == "2"  # a refused connection is tried once more
    rows = gw.rows()
    assert [(row["status"], row["provider"], row["model"], row["attempt"]) for row in rows] == [
        ("upstream_error", "dead", "dead-model", 1), ("upstream_error", "dead", "dead-model", 2)]
    for row in rows:
        assert row["http_status"] is None
        assert tokens_of(row) == dict.fromkeys(TOKEN_COLUMNS, 0)
        assert row["cost_nanousd"] == 0
    assert upstream.requests == []
    assert_still_serving(gw, key, upstream)


def test_unreachable_anthropic_upstream_is_502_anthropic_shape(make_gateway, upstream):
    dead = "http://127.0.0.1:%d" % free_port()
    gw = make_gateway(providers={"anthropic": {"base_url": dead, "api_key": ANTHROPIC_KEY}})
    key = gw.create_key()[1]
    response = post(gw, MESSAGES, body_for(MESSAGES, "claude-haiku-4-5"), key)
    assert_json_error(response, 502, "anthropic", error_type="api_error")
    for row in gw.rows():
        assert (row["status"], row["provider"]) == ("upstream_error", "anthropic")
        assert tokens_of(row) == dict.fromkeys(TOKEN_COLUMNS, 0)
    assert_still_serving(gw, key, upstream)


@pytest.mark.parametrize("path", [CHAT, COMPLETIONS, EMBEDDINGS, RESPONSES, MESSAGES, COUNT_TOKENS])
@pytest.mark.parametrize("fault,status", [("fail400", 400), ("fail429", 429), ("fail500", 500), ("fail529", 529)])
def test_upstream_errors_are_passed_through(make_gateway, upstream, path, fault, status):
    """The provider's error, as it sent it, after the bounded retry (a 500
    or 529 is tried twice; a 400 once; a 429 whose Retry-After is longer
    than routing.backoff_max once)."""
    gateway = make_gateway(routing={"backoff_initial": 0.05, "backoff_max": 5})
    vkey = gateway.create_key()[1]
    model = "gpt-4o-" + fault
    raw = json.dumps(body_for(path, model)).encode()
    direct = post(upstream.url, path, None, raw_body=raw)
    response = post(gateway, path, None, vkey, raw_body=raw)
    assert response.status == status == direct.status
    assert response.header("content-type") == "application/json"
    attempts = 2 if status in (500, 529) else 1
    assert len(upstream.requests) == 1 + attempts == 1 + int(response.header("x-llmgw-attempts"))
    forwarded = upstream.requests[-1]
    assert forwarded["body"] == raw
    payload = response.json()
    expected = direct.json()
    if dialect_of(path) == "anthropic":
        expected["request_id"] = forwarded["request_id"]  # the fake quotes its request id
        assert response.header("request-id") == forwarded["request_id"]
    else:
        assert response.header("x-request-id") == forwarded["request_id"]
    assert payload == expected
    if fault == "fail429":
        assert response.header("retry-after") == "7"
    else:
        assert response.header("retry-after") is None
    row = gateway.rows()[-1]
    assert (row["status"], row["http_status"], row["endpoint"]) == ("upstream_error", status, path)
    assert tokens_of(row) == dict.fromkeys(TOKEN_COLUMNS, 0)
    assert row["cost_nanousd"] == 0
    assert_still_serving(gateway, vkey, upstream)


@pytest.mark.parametrize("path", [CHAT, EMBEDDINGS, RESPONSES, MESSAGES, COUNT_TOKENS])
def test_upstream_401_is_withheld(gateway, vkey, upstream, path):
    response = post(gateway, path, body_for(path, "gpt-4o-leak401"), vkey)
    assert_json_error(response, 502, dialect_of(path), error_type="api_error")
    if dialect_of(path) == "openai":
        assert response.json()["error"]["code"] == "upstream_auth_error"
    text = response.body.decode()
    real = ANTHROPIC_KEY if dialect_of(path) == "anthropic" else OPENAI_KEY
    for fragment in (real, real[:8], "Incorrect API key", vkey):
        assert fragment not in text
    assert len(upstream.requests) == 1
    row = gateway.rows()[-1]
    assert (row["status"], row["http_status"], row["endpoint"]) == ("upstream_error", 401, path)
    assert tokens_of(row) == dict.fromkeys(TOKEN_COLUMNS, 0)
    assert_still_serving(gateway, vkey, upstream)


def test_upstream_401_code_on_anthropic_path_is_not_leaked(gateway, vkey, upstream):
    response = post(gateway, MESSAGES, body_for(MESSAGES, "claude-leak401"), vkey)
    assert response.status == 502
    assert "CANARY" not in response.body.decode()


@pytest.mark.parametrize("path", [CHAT, MESSAGES])
@pytest.mark.parametrize("fault,upstream_status", [("badjson", 200), ("html502", 502)])
def test_upstream_non_json_is_502(gateway, vkey, upstream, path, fault, upstream_status):
    response = post(gateway, path, body_for(path, "gpt-4o-" + fault), vkey)
    error = assert_json_error(response, 502, dialect_of(path), error_type="api_error")["error"]
    if dialect_of(path) == "openai":
        assert error["code"] == "upstream_bad_response"
    assert b"<html" not in response.body.lower() and b"doctype" not in response.body.lower()
    row = [r for r in gateway.rows() if r["model"] == "gpt-4o-" + fault and r["endpoint"] == path][-1]
    assert (row["status"], row["http_status"]) == ("upstream_error", upstream_status)
    assert tokens_of(row) == dict.fromkeys(TOKEN_COLUMNS, 0)
    assert_still_serving(gateway, vkey, upstream)


@pytest.mark.parametrize("path", [CHAT, MESSAGES])
def test_upstream_redirect_is_502_and_not_followed(gateway, vkey, upstream, path):
    response = post(gateway, path, body_for(path, "gpt-4o-redirect"), vkey)
    assert_json_error(response, 502, dialect_of(path), error_type="api_error")
    assert response.header("location") is None
    assert b"169.254" not in response.body
    assert len(upstream.requests) == 1
    row = gateway.rows()[-1]
    assert (row["status"], row["http_status"]) == ("upstream_error", 302)
    assert tokens_of(row) == dict.fromkeys(TOKEN_COLUMNS, 0)
    assert_still_serving(gateway, vkey, upstream)


def test_unknown_client_headers_are_not_forwarded(gateway, vkey, upstream):
    # The fake would answer 500 if it saw x-fake-fault: only known headers go.
    response = call(gateway, "GET", MODELS, key=vkey, headers={"x-fake-fault": "fail500"})
    assert response.status == 200
    assert "x-fake-fault" not in upstream.requests[0]["headers"]


# ---- rate limits -----------------------------------------------------------

def test_key_rpm_limit_openai_shape(gateway, upstream):
    record, key = gateway.create_key("limited", rpm=2)
    for _ in range(2):
        assert post(gateway, CHAT, body_for(CHAT, "gpt-4o-mini"), key).status == 200
    response = post(gateway, CHAT, body_for(CHAT, "gpt-4o-mini"), key)
    assert_json_error(response, 429, "openai", error_type="rate_limit_error", code="rate_limit_exceeded")
    retry_after = int(response.header("retry-after"))
    assert 1 <= retry_after <= 60
    assert len(upstream.requests) == 2
    assert len(gateway.rows()) == 2
    # Another key is not affected.
    other = gateway.create_key("other")[1]
    assert post(gateway, CHAT, body_for(CHAT, "gpt-4o-mini"), other).status == 200


def test_key_rpm_limit_anthropic_shape(gateway, upstream):
    record, key = gateway.create_key("limited", rpm=2)
    for _ in range(2):
        assert post(gateway, MESSAGES, body_for(MESSAGES, "claude-haiku-4-5"), key).status == 200
    response = post(gateway, MESSAGES, body_for(MESSAGES, "claude-haiku-4-5"), key)
    assert_json_error(response, 429, "anthropic", error_type="rate_limit_error")
    assert 1 <= int(response.header("retry-after")) <= 60
    assert len(upstream.requests) == 2


def test_rpm_limit_counts_billable_calls_across_paths(gateway, upstream):
    key = gateway.create_key("limited", rpm=2)[1]
    assert post(gateway, CHAT, body_for(CHAT, "gpt-4o-mini"), key).status == 200
    assert post(gateway, MESSAGES, body_for(MESSAGES, "claude-haiku-4-5"), key).status == 200
    # Calls that cost nothing neither count nor are refused (test_agents).
    assert call(gateway, "GET", MODELS, key=key).status == 200
    assert post(gateway, COUNT_TOKENS, body_for(COUNT_TOKENS, "claude-haiku-4-5"), key).status == 200
    response = post(gateway, RESPONSES, body_for(RESPONSES, "gpt-4o-mini"), key)
    assert_json_error(response, 429, "openai", error_type="rate_limit_error")
    assert len(upstream.requests) == 4


def test_tier_limits_from_config(make_gateway, upstream):
    gw = make_gateway(rate_limits={"default": 1, "premium": 3})
    default_key = gw.create_key("default tier")[1]
    premium_key = gw.create_key("premium tier", tier="premium")[1]
    assert post(gw, CHAT, body_for(CHAT, "gpt-4o-mini"), default_key).status == 200
    response = post(gw, CHAT, body_for(CHAT, "gpt-4o-mini"), default_key)
    assert_json_error(response, 429, "openai", error_type="rate_limit_error")
    assert response.header("retry-after") is not None
    for _ in range(3):
        assert post(gw, CHAT, body_for(CHAT, "gpt-4o-mini"), premium_key).status == 200
    assert post(gw, CHAT, body_for(CHAT, "gpt-4o-mini"), premium_key).status == 429
    assert len(upstream.requests) == 4


def test_key_rpm_overrides_tier(make_gateway, upstream):
    gw = make_gateway(rate_limits={"default": 1})
    key = gw.create_key("own rpm", rpm=3)[1]
    statuses = [post(gw, CHAT, body_for(CHAT, "gpt-4o-mini"), key).status for _ in range(4)]
    assert statuses == [200, 200, 200, 429]


# ---- upstream connections --------------------------------------------------

def test_upstream_connection_is_reused(gateway, vkey, upstream):
    for path in (CHAT, EMBEDDINGS, COMPLETIONS, RESPONSES, CHAT):
        assert post(gateway, path, body_for(path, "gpt-4o-mini"), vkey).status == 200
    stream = dict(body_for(CHAT, "gpt-4o-mini"), stream=True)
    assert post(gateway, CHAT, stream, vkey).status == 200
    assert call(gateway, "GET", MODELS, key=vkey).status == 200
    assert post(gateway, CHAT, body_for(CHAT, "gpt-4o-fail500"), vkey).status == 500  # two attempts
    assert post(gateway, CHAT, body_for(CHAT, "gpt-4o-mini"), vkey).status == 200
    assert len(upstream.requests) == 10
    assert upstream.connections_opened == 1
    assert {r["connection_id"] for r in upstream.requests} == {1}


def test_anthropic_connection_is_reused(gateway, vkey, upstream):
    for path in (MESSAGES, COUNT_TOKENS, MESSAGES):
        assert post(gateway, path, body_for(path, "claude-haiku-4-5"), vkey).status == 200
    assert upstream.connections_opened == 1
