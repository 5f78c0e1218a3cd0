"""How the gateway reaches its providers (issue 13): through an HTTPS proxy
(per provider ``proxy:``, or HTTPS_PROXY and NO_PROXY; a CONNECT tunnel
opened without blocking a worker), with a provider's own CA bundle and
client certificate, and with certificate checks off only when the config
says so, which is logged. Against a small CONNECT proxy and the fake
upstream on TLS (certificates made with the openssl command, as in
test_capacity).
"""

import logging
import ssl
import subprocess

import pytest

import llmgw
from conftest import CHAT, OPENAI_KEY, assert_json_error, body_for, expected_columns, post, settled_rows, \
    tokens_of
from fake_upstream import ConnectProxy, FakeUpstream

pytestmark = pytest.mark.usefixtures("clean_environment", "balanced_books")


def self_signed(directory, name, hostname):
    """(certificate, key) PEM files of a self-signed EC certificate for ``hostname``."""
    cert, key = str(directory / (name + ".pem")), str(directory / (name + "-key.pem"))
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                    "-days", "1", "-subj", "/CN=" + hostname, "-addext", "subjectAltName=DNS:" + hostname,
                    "-keyout", key, "-out", cert], check=True, capture_output=True)
    return cert, key


@pytest.fixture(scope="module")
def certificates(tmp_path_factory):
    directory = tmp_path_factory.mktemp("certs")
    return {"server": self_signed(directory, "server", "localhost"),
            "client": self_signed(directory, "client", "llmgw-client")}


def tls_upstream(certificates, client_certificate=False):
    """The fake upstream on TLS as localhost; with ``client_certificate``
    it refuses a client without the client certificate."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(*certificates["server"])
    if client_certificate:
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(certificates["client"][0])
    return FakeUpstream(tls=context).start()


@pytest.fixture
def proxy():
    proxy = ConnectProxy()
    yield proxy
    proxy.close()


def provider(url, **settings):
    return {"providers": {"openai": dict({"base_url": url, "api_key": OPENAI_KEY}, **settings)}}


def test_provider_proxy_tunnels_every_connection(make_gateway, upstream, proxy):
    gateway = make_gateway(**provider(upstream.url, proxy=proxy.url))
    key = gateway.create_key()[1]
    for stream in (False, True):
        response = post(gateway, CHAT, body_for(CHAT, stream=stream), key)
        assert response.status == 200, response.body
    assert proxy.tunnels == [("127.0.0.1:%d" % upstream.port, None)]  # one tunnel, kept alive for both calls
    assert upstream.connections_opened == 1
    rows = settled_rows(gateway, 2)
    assert tokens_of(rows[0]) == expected_columns(CHAT, upstream.reported[0]["usage"])


def test_https_proxy_from_the_environment_to_a_tls_provider(make_gateway, certificates, proxy, caplog):
    secure = tls_upstream(certificates)
    try:
        with caplog.at_level(logging.INFO, logger="llmgw"):
            gateway = make_gateway(environ={"HTTPS_PROXY": proxy.url},
                                   **provider(secure.url, ca_bundle=certificates["server"][0]))
        response = post(gateway, CHAT, body_for(CHAT), gateway.create_key()[1])
        assert response.status == 200, response.body
        assert proxy.tunnels == [("localhost:%d" % secure.port, None)]
        assert "provider openai connects through the proxy 127.0.0.1:%d" % int(proxy.url.rsplit(":", 1)[1]) \
            in caplog.text
    finally:
        secure.stop()


@pytest.mark.parametrize("no_proxy", ["localhost", ".localhost,example.com", "*"])
def test_no_proxy_goes_direct(make_gateway, certificates, proxy, no_proxy):
    secure = tls_upstream(certificates)
    try:
        gateway = make_gateway(environ={"HTTPS_PROXY": proxy.url, "NO_PROXY": no_proxy},
                               **provider(secure.url, ca_bundle=certificates["server"][0]))
        assert post(gateway, CHAT, body_for(CHAT), gateway.create_key()[1]).status == 200
        assert proxy.tunnels == []
    finally:
        secure.stop()


def test_proxy_credentials_from_a_reference(make_gateway, upstream):
    proxy = ConnectProxy(credentials="team:s3cret/pw")
    try:
        gateway = make_gateway(environ={"LLMGW_PROXY": "http://team:s3cret%2Fpw@" + proxy.url[7:]},
                               **provider(upstream.url, proxy="${LLMGW_PROXY}"))
        assert post(gateway, CHAT, body_for(CHAT), gateway.create_key()[1]).status == 200
        assert proxy.tunnels == [("127.0.0.1:%d" % upstream.port, "Basic dGVhbTpzM2NyZXQvcHc=")]
    finally:
        proxy.close()


def test_proxy_refusing_the_tunnel_answers_502(make_gateway, upstream):
    proxy = ConnectProxy(credentials="team:secret")
    try:
        gateway = make_gateway(routing={"retries": 0}, **provider(upstream.url, proxy=proxy.url))
        response = post(gateway, CHAT, body_for(CHAT), gateway.create_key()[1])
        assert_json_error(response, 502, code="upstream_unavailable")
        assert len(proxy.tunnels) == 1 and upstream.requests == []
        row, = settled_rows(gateway)
        assert (row["status"], row["request_tokens"]) == ("upstream_error", 0)
    finally:
        proxy.close()


def test_tls_provider_needs_its_ca_bundle(make_gateway, certificates):
    secure = tls_upstream(certificates)
    try:
        gateway = make_gateway(routing={"retries": 0}, **provider(secure.url))
        key = gateway.create_key()[1]
        assert_json_error(post(gateway, CHAT, body_for(CHAT), key), 502)  # not a system CA: refused
        gateway = make_gateway(db_name="second.db", **provider(secure.url, ca_bundle=certificates["server"][0]))
        assert post(gateway, CHAT, body_for(CHAT), gateway.create_key()[1]).status == 200
        assert len(secure.requests) == 1
    finally:
        secure.stop()


def test_client_certificate_for_mutual_tls(make_gateway, certificates):
    secure = tls_upstream(certificates, client_certificate=True)
    try:
        ca_bundle = certificates["server"][0]
        gateway = make_gateway(routing={"retries": 0}, **provider(secure.url, ca_bundle=ca_bundle))
        assert_json_error(post(gateway, CHAT, body_for(CHAT), gateway.create_key()[1]), 502)
        assert secure.requests == []
        cert, key_file = certificates["client"]
        gateway = make_gateway(db_name="second.db", **provider(secure.url, ca_bundle=ca_bundle, client_cert=cert,
                                                               client_key=key_file))
        assert post(gateway, CHAT, body_for(CHAT), gateway.create_key()[1]).status == 200
        assert len(secure.requests) == 1
    finally:
        secure.stop()


def test_tls_verify_off_only_when_said_and_logged(make_gateway, certificates, caplog):
    secure = tls_upstream(certificates)
    try:
        with caplog.at_level(logging.WARNING, logger="llmgw"):
            gateway = make_gateway(**provider(secure.url, tls_verify=False))
        assert "provider openai: TLS certificates are NOT verified (tls_verify: false in config.yaml)" in caplog.text
        assert post(gateway, CHAT, body_for(CHAT), gateway.create_key()[1]).status == 200
    finally:
        secure.stop()


@pytest.mark.parametrize("settings, message", [
    ({"proxy": "http://user:pw@proxy:3128"}, "credentials only through"),
    ({"proxy": "socks5://proxy:1080"}, "expected http://host:port"),
    ({"tls_verify": "no"}, "tls_verify: expected true or false"),
    ({"client_key": "/k.pem"}, "client_key: needs client_cert"),
])
def test_transport_config_mistakes_are_named(settings, message):
    with pytest.raises(llmgw.ConfigError) as caught:
        llmgw.parse_config(provider("https://api.openai.com", **settings))
    assert message in caught.value.message and "pw@" not in caught.value.message


def test_unreadable_tls_files_stop_the_start(tmp_path):
    config = llmgw.parse_config(provider("https://api.openai.com", ca_bundle=str(tmp_path / "missing.pem")))
    with pytest.raises(llmgw.ConfigError, match="providers.openai.ca_bundle: cannot load"):
        llmgw.make_provider(config.providers["openai"], config.server, {})
    config = llmgw.parse_config(provider("https://api.openai.com", proxy="${UNSET_PROXY}"))
    with pytest.raises(llmgw.ConfigError, match="UNSET_PROXY is not set"):
        llmgw.make_provider(config.providers["openai"], config.server, {})
