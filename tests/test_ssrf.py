"""Fixed upstreams (RELIABILITY.md 1.10): no request field, header, model
name or path changes where the gateway connects; redirects are not followed;
link-local providers are refused. ``sinkhole`` (conftest.py) is a bare
listening socket that must never see a connection.

RELIABILITY ids are given in brackets in each test's docstring.
"""


import pytest

import llmgw
from conftest import (ANTHROPIC_KEY, CHAT, COMPLETIONS, COUNT_TOKENS, EMBEDDINGS, MESSAGES, MODELS, ONE_ATTEMPT,
                      OPENAI_KEY, RATE_LIMITS, RESPONSES, SERVER, assert_alive, assert_json_error, body_for, chat_body,
                      exchange, json_request, post, request_bytes, settled_rows)

#: Whatever a test did, its gateways end with no row pending, nothing reserved, nothing in flight.
pytestmark = pytest.mark.usefixtures("balanced_books")


# ==== 1.10 SSRF ======================================================================

SSRF_FIELDS = ("api_base", "base_url", "url", "endpoint", "host", "proxy", "azure_endpoint")
SSRF_HEADERS = ("X-Base-URL", "X-Target-Url", "X-Upstream", "x-portkey-custom-host", "X-Original-URL",
                "X-Rewrite-URL", "X-Forwarded-Host", "X-Host", "X-Api-Base")


@pytest.mark.parametrize("path", [CHAT, COMPLETIONS, EMBEDDINGS, RESPONSES, MESSAGES, COUNT_TOKENS, MODELS])
def test_request_cannot_redirect_the_upstream(shared, sinkhole, path):
    """[R01 R02 R05] Body fields and headers naming another upstream, on
    every proxied route: the sinkhole sees no connection; the fake gets the
    call with the configured key."""
    gw, key, upstream = shared.gw, shared.key, shared.upstream
    sink = sinkhole.url + "/v1"
    headers = [(name, sink) for name in SSRF_HEADERS] + [("Authorization", "Bearer " + key)]
    if path == MODELS:
        data = request_bytes("GET", path, headers)
    else:
        body = body_for(path, **{name: sink for name in SSRF_FIELDS})
        body.update(api_key="sk-attacker", api_version="2099-01-01", custom_llm_provider="openai",
                    extra_headers={"Host": "127.0.0.1:%d" % sinkhole.port, "Authorization": "Bearer sk-attacker"},
                    extra_body={"url": sink}, extra_query={"host": sink})
        data = json_request(path, key, body, extra=headers[:-1])
    response, client = exchange(gw, data)
    client.close()
    assert response.status == 200, response
    assert sinkhole.connections() == 0
    received, = upstream.requests
    assert received["path"] == path
    assert received["headers"]["host"] == "127.0.0.1:%d" % upstream.port
    if path.startswith("/v1/messages"):
        assert received["headers"]["x-api-key"] == ANTHROPIC_KEY
    else:
        assert received["headers"]["authorization"] == "Bearer " + OPENAI_KEY
    assert not any(name.lower() in (h.lower() for h in SSRF_HEADERS) for name, _ in received["header_list"])
    assert_alive(gw, key)


@pytest.mark.parametrize("target", ["/chat/completions", "/v1/proxy/chat/completions", "/proxy/v1/chat/completions",
                                    "/openai/v1/chat/completions", "/v1/v1/chat/completions"])
def test_route_aliases_do_not_exist(shared, sinkhole, target):
    """[R05] Paths a peer would alias (and Portkey's unvalidated
    /v1/proxy/*): 404, nothing forwarded anywhere."""
    gw, key, upstream = shared.gw, shared.key, shared.upstream
    response, client = exchange(gw, json_request(target, key, dict(chat_body(), api_base=sinkhole.url)))
    client.close()
    assert_json_error(response, 404)
    assert upstream.requests == [] and sinkhole.connections() == 0
    assert_alive(gw, key)


@pytest.mark.parametrize("model", ["http://SINK/x", "openai/../../x", "gpt-4o@SINK", "unknown/x", "//SINK/x",
                                   "openai/http://SINK/", "anthropic/../openai/x", "SINK"])
def test_model_name_never_changes_the_host(shared, sinkhole, model):
    """[R03] Model names shaped like URLs or paths: the provider comes from
    config only; the call goes to the configured host and path."""
    gw, key, upstream = shared.gw, shared.key, shared.upstream
    model = model.replace("SINK", "127.0.0.1:%d" % sinkhole.port)
    response = post(gw, CHAT, chat_body(model), key)
    assert sinkhole.connections() == 0
    assert response.status == 200, response.body
    received, = upstream.requests
    assert received["path"] == CHAT and received["headers"]["host"] == "127.0.0.1:%d" % upstream.port
    provider_key = ANTHROPIC_KEY if model.startswith("anthropic/") else OPENAI_KEY
    assert received["headers"]["authorization"] == "Bearer " + provider_key
    assert_alive(gw, key)


@pytest.mark.parametrize("path", [CHAT, MESSAGES])
def test_upstream_redirect_is_502_and_not_followed(gw, key, upstream, path):
    """[R04] A 302 to the metadata address: 502 JSON, not followed (one
    request at the fake, no Location relayed), row upstream_error."""
    response = post(gw, path, body_for(path, "gpt-4o-mini-redirect"), key)
    assert response.status == 502 and response.header("location") is None
    assert response.json()["error"]["type"] == "api_error"
    assert len(upstream.requests) == 1
    row, = settled_rows(gw, 1)
    assert (row["status"], row["http_status"]) == ("upstream_error", 302)
    assert_alive(gw, key)


@pytest.mark.parametrize("base_url", ["http://169.254.169.254", "http://169.254.169.254:80/v1",
                                      "http://[fd00:ec2::254]", "http://[::ffff:169.254.169.254]",
                                      "http://[fe80::1%25eth0]", "https://169.254.0.1"])
def test_link_local_provider_is_refused_at_start(upstream, base_url):
    """[R06] A configured base_url on a link-local or metadata address is a
    ConfigError naming the provider, unless allow_link_local is set."""
    document = {"providers": {"metadata": {"base_url": base_url, "api_key": OPENAI_KEY}}}
    with pytest.raises(llmgw.ConfigError) as raised:
        llmgw.parse_config(document)
    assert "providers.metadata" in raised.value.message and OPENAI_KEY not in raised.value.message
    document["providers"]["metadata"]["allow_link_local"] = True
    assert llmgw.parse_config(document).providers["metadata"].allow_link_local is True


@pytest.mark.parametrize("base_url", ["https://user:pw@api.example.com", "https://api.example.com/#frag",
                                      "https://api.example.com/?x=1", "ftp://api.example.com", "file:///etc/passwd",
                                      "http://", "api.example.com"])
def test_provider_base_url_shape_is_checked(base_url):
    """[R06] Credentials, query, fragment or a non-http scheme in a
    base_url: ConfigError naming the provider."""
    with pytest.raises(llmgw.ConfigError) as raised:
        llmgw.parse_config({"providers": {"odd": {"base_url": base_url, "api_key": OPENAI_KEY}}})
    assert "providers.odd" in raised.value.message and "pw" not in raised.value.message


def test_provider_host_resolving_to_link_local_is_refused_at_connect(make_gateway, upstream, gwlog):
    """[R06] ``http://2852039166`` is 169.254.169.254 in decimal: not an
    address literal to the config check, but resolved to one at connect.
    502 upstream_address_refused, without trying to connect."""
    gw = make_gateway(server=dict(SERVER), rate_limits=RATE_LIMITS, routing=ONE_ATTEMPT, providers={
        "metadata": {"base_url": "http://2852039166", "api_key": OPENAI_KEY, "models": ["meta-*"]}})
    key = gw.create_key()[1]
    response = post(gw, CHAT, chat_body("meta-model"), key)
    assert response.status == 502
    assert response.json()["error"]["code"] == "upstream_address_refused"
    row, = settled_rows(gw, 1)
    assert row["status"] == "upstream_error"
    assert OPENAI_KEY not in gwlog.text()
    assert_alive(gw, key)
