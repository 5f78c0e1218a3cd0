"""Coding agents (issue 13): what Claude Code, Codex and the like call
besides the metered endpoints, and how the gateway answers it.

Every test runs the real gateway against tests/fake_upstream.py over
sockets and reads the usage rows back from the database file.
"""

import pytest

from conftest import (CHAT, RESPONSES, RawClient, assert_json_error, assert_still_serving, body_for, call,
                      json_request, post, request_bytes)

pytestmark = pytest.mark.usefixtures("balanced_books")

#: What Codex sends first (RFC 6455 section 4.1), the key included.
WEBSOCKET_HEADERS = {"Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Version": "13",
                     "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="}


# ---- the Responses API over WebSocket ------------------------------------------

@pytest.mark.parametrize("upgrade", ["websocket", "WebSocket", "h2c, websocket"])
def test_a_websocket_upgrade_is_answered_426_at_once(gateway, vkey, upstream, upgrade):
    """Codex falls back to HTTP on a 426; a 404 or 405 made it try seven
    times (6.5 s per session)."""
    response = call(gateway, "GET", RESPONSES, key=vkey, headers=dict(WEBSOCKET_HEADERS, Upgrade=upgrade))
    assert_json_error(response, 426, "openai", code="websocket_not_supported", error_type="invalid_request_error")
    assert response.header("upgrade") == "HTTP/1.1"
    assert upstream.requests == [] and gateway.rows() == []
    assert_still_serving(gateway, vkey, upstream)


def test_the_426_leaves_the_connection_serving(gateway, vkey, upstream):
    client = RawClient(gateway)
    try:
        client.send(request_bytes("GET", RESPONSES, [("Authorization", "Bearer " + vkey)]
                                  + list(WEBSOCKET_HEADERS.items())))
        assert client.read_response().status == 426
        client.send(json_request(RESPONSES, vkey, body_for(RESPONSES)))
        assert client.read_response().status == 200
    finally:
        client.close()


def test_only_a_websocket_handshake_is_refused(gateway, vkey, upstream):
    assert_json_error(call(gateway, "GET", RESPONSES, key=vkey), 405, "openai")
    assert_json_error(call(gateway, "GET", CHAT, key=vkey, headers={"Upgrade": "h2c"}), 405, "openai")
    without_connection = dict(WEBSOCKET_HEADERS, Connection="keep-alive")
    assert_json_error(call(gateway, "GET", RESPONSES, key=vkey, headers=without_connection), 405, "openai")
    assert upstream.requests == []
    # On a POST an Upgrade is ignored, as HTTP allows (test_framing's hop-by-hop headers).
    assert post(gateway, RESPONSES, body_for(RESPONSES), vkey, headers=WEBSOCKET_HEADERS).status == 200
