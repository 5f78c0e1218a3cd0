"""A fake LLM provider (OpenAI + Anthropic) that misbehaves on request.

Standard library only. Tests point the gateway's provider ``base_url`` at it::

    with FakeUpstream().start() as up:
        ...                                   # base_url = up.url
        assert up.requests[0]["headers"]["authorization"] == "Bearer sk-real"
        assert row_tokens == up.reported[0]["usage"]

Wire formats follow PROTOCOLS.md (1.2-1.5 OpenAI, 2.3-2.5 Anthropic). Fault
tokens follow RELIABILITY.md section 1.12.

Routes
------
========================================  =====================================
``POST /v1/chat/completions``             OpenAI chat (JSON or SSE)
``POST /v1/completions``                  OpenAI legacy completions (JSON/SSE)
``POST /v1/embeddings``                   one embedding per input item;
                                          ``encoding_format: base64`` honoured
``POST /v1/responses``                    OpenAI Responses (JSON or SSE)
``POST /v1/messages``                     Anthropic Messages (JSON or SSE)
``POST /v1/messages/count_tokens``        ``{"input_tokens": N}`` (not metered)
``GET  /v1/models``, ``/v1/models/<id>``  Anthropic shape if the request has an
                                          ``anthropic-version`` header, else
                                          OpenAI shape
``POST /model/<id>/invoke``               Bedrock: Anthropic Messages, model in
``POST /model/<id>/invoke-with-response-  the URL; ``anthropic_version:
stream``                                  bedrock-2023-05-31`` required and
                                          ``model``/``stream`` refused in the
                                          body (400 ``{"message": ...}``); the
                                          stream in AWS event-stream framing
                                          (``chunk`` events, base64 ``bytes``;
                                          ``message_stop`` adds
                                          ``amazon-bedrock-invocationMetrics``);
                                          SigV4 checked against
                                          ``aws_credentials`` (403 if wrong)
``POST /v1/projects/<p>/locations/<r>/    Vertex AI: Anthropic Messages, model
publishers/anthropic/models/<model>:      in the URL; ``anthropic_version:
rawPredict`` (``:streamRawPredict``)      vertex-2023-10-16`` required,
                                          ``model`` refused; ``fail429``
                                          answers in Google's error shape
``GET|DELETE /v1/responses/resp_<x>``     the response (completed, no output),
``POST /v1/responses/resp_<x>/cancel``    its deletion, cancelled, its input
``GET  /v1/responses/resp_<x>/input_items`` items (an empty list); any id
``POST /v1/responses/input_tokens``       ``{"object": "response.input_tokens",
                                          "input_tokens": N}`` (not metered)
``POST /v1/moderations``                  one unflagged result per request
anything else                             404, OpenAI-shaped JSON error
========================================  =====================================

``FakeUpstream(root=...)`` serves the same routes under another root in
place of ``/v1``, as OpenAI-compatible providers do (``root="/v1beta/openai"``
answers ``POST /v1beta/openai/chat/completions``; ``/v1/...`` is then 404).
``FakeUpstream(root="/openai", azure=True)`` is Azure OpenAI's classic API:
chat, completions and embeddings only under
``/openai/deployments/<deployment>/...``, every route only with an
``api-version`` query parameter (else 404, as Azure answers); each recorded
request has ``deployment`` (None elsewhere).

Every response carries ``x-request-id: req_<n>`` (OpenAI) or
``request-id: req_<n>`` (Anthropic, and ``/v1/models`` with
``anthropic-version``); ``n`` counts requests since ``start()`` and is never
reset. Auth is not checked (tests read the recorded headers) except by
``leak401``. Non-streamed bodies carry ``Content-Length``; streams use
``Transfer-Encoding: chunked``, one chunk per SSE event, written immediately.

Usage numbers
-------------
Deterministic per request body (sha256 ``h``): ``prompt = 11 + h % 89``,
``completion = 5 + (h // 89) % 37``; other fields use further bits of ``h``.
OpenAI: ``prompt_tokens`` includes ``cached_tokens`` and ``completion_tokens``
includes ``reasoning_tokens``. Anthropic: ``input_tokens = prompt`` (cache
tokens are separate), ``output_tokens = completion``.

Behaviour tokens
----------------
Tokens come from the request's ``model`` (and from the model id in
``GET /v1/models/<id>``), from an ``x-fake-fault`` request header, which
works on any route, and from the fake itself: ``FakeUpstream(faults=...)``
(or the ``faults`` attribute) applies to every request, and each entry of
the ``script`` list to one request, in order (``up.script = ["fail500",
""]`` fails once, then answers). So several fakes make a harness of
providers that misbehave each in its own way. Both are split on every non-alphanumeric character and
matched as whole, case-insensitive segments: ``gpt-4o-cache-slow`` holds
``cache`` and ``slow``; ``x-fake-fault: fail500`` or ``gzip, crlf`` also work.
(Whole segments, so ``slowstream`` does not also trigger ``slow``.)

Usage shape
  ==============  ============================================================
  ``cache``       OpenAI ``cached_tokens`` in [1, prompt-1]; Anthropic nonzero
                  ``cache_creation_input_tokens`` / ``cache_read_input_tokens``
                  and a ``cache_creation`` 5m/1h split that sums to the former
  ``reasoning``   OpenAI ``reasoning_tokens`` in [1, completion]
  ``nodetails``   OpenAI: omit the ``*_tokens_details`` objects
  ``nousage``     no usage anywhere: no ``usage`` key in JSON bodies, no usage
                  chunk (even if asked), Anthropic ``message_start`` and
                  ``message_delta`` without ``usage``; nothing in ``reported``
  ``cumdelta``    Anthropic stream: three ``message_delta`` events with growing
                  cumulative ``output_tokens``; the last also revises
                  ``input_tokens`` and the cache fields versus message_start
  ``incomplete``  Responses: status ``incomplete`` (stream ends with
                  ``response.incomplete``, usage included)
  ``failed``      Responses: status ``failed``, ``usage`` null (stream ends
                  with ``response.failed``)
  ``events<N>``   N content deltas instead of the default 5 (``events50``)
  ``unicode``     non-ASCII text ("héllo wörld ✓ ..."); implied by bytewise
  ==============  ============================================================

Provider quirks (OpenAI chat and completions; PROTOCOLS.md section 4)
  =================  =========================================================
  ``everychunk``     Gemini (and vLLM's ``continuous_usage_stats``): when
                     usage is asked for, every chunk carries it, cumulative
                     (completion so far), the final counts on the
                     ``finish_reason`` chunk; no ``choices: []`` chunk
  ``usagelast``      Mistral: usage on the ``finish_reason`` chunk, asked for
                     or not; no ``choices: []`` chunk
  ``xgroq``          Groq's older streams: usage only in ``x_groq.usage`` of
                     the ``finish_reason`` chunk, asked for or not
  ``deepseekcache``  DeepSeek: usage has ``prompt_cache_hit_tokens`` (in
                     [1, prompt-1]) and ``prompt_cache_miss_tokens`` (the
                     rest), no ``prompt_tokens_details``
  ``orcost``         OpenRouter: usage adds ``cost``, ``is_byok`` and
                     ``cost_details``; a stream starts with the comment
                     ``: OPENROUTER PROCESSING``
  ``azurefilter``    Azure: ``prompt_filter_results`` in the body and, in a
                     stream, a first chunk with ``choices: []`` and no usage;
                     ``content_filter_results`` on each choice
  =================  =========================================================

Status faults (checked in this order; the body is shaped for the route)
  ==============  ============================================================
  ``redirect``    302, ``Location: http://169.254.169.254/latest/meta-data/``
  ``leak401``     401 whose message quotes the received credential as
                  ``Incorrect API key provided: <first 8>...<last 4>``
  ``fail400``     400 invalid_request_error
  ``fail429``     429 + ``retry-after: 7``
  ``fail500``     500 server_error / api_error
  ``fail503``     503 server_error / api_error
  ``fail529``     529 overloaded_error
  ``reset``       read the request, then TCP RST without a reply
  ``html502``     502 ``text/html`` page
  ``badjson``     200 ``text/html`` non-JSON body
  ==============  ============================================================

Timing
  ==============  ============================================================
  ``hang``        read the request, then send nothing until the client
                  disconnects, ``stop()`` or 60 s; then close without a reply
  ``slow``        sleep 0.5 s before the status line
  ``held``        wait before the status line until the test calls
                  ``release()`` (or ``stop()``, or 60 s)
  ``slowstream``  0.2 s between stream events
  ``halting``     stream: every chunk in three writes 0.1 s apart, cut
                  after its size (before the size line's CRLF) and halfway
                  through its data, so the reader holds part of a chunk line
                  and part of an event while the provider stalls
  ``stall``       stream: as halting, but only the first chunk pauses (after
                  its size), until the fake's ``resume`` event is set (or
                  ``stop()``, or 60 s); the rest follows at once
  ``drip``        stream: send the events before the first content delta,
                  then one content delta every 0.3 s (so the stream has
                  begun: the gateway holds back what comes before the first
                  content), never finishing; after 60 s or
                  ``stop()`` close without a terminator. Non-stream: headers
                  with Content-Length, then one body byte every 0.3 s.
  ==============  ============================================================

Broken streams (the cut is made right after the Nth content delta)
  ===============  ===========================================================
  ``droppreamble`` send the events before the first content delta, then
                   close the connection with no chunked terminator
  ``dropstream``   after the 2nd content delta close the connection with no
                   chunked terminator (so no usage chunk, no message_delta)
  ``cutmidevent``  as dropstream, plus the first half of the next event's bytes
  ``rst``          after the 1st content delta wait 0.1 s, then TCP RST
                   (SO_LINGER 0)
  ``errevent``     after the 1st content delta send a mid-stream error, then
                   end the body cleanly (chunked terminator). OpenAI chat and
                   completions: ``data: {"error": {...}}``; Responses:
                   ``event: error``; Anthropic: ``event: error`` with
                   ``overloaded_error`` (Bedrock: a
                   ``serviceUnavailableException`` exception message)
  ``badcrc``       Bedrock stream: the 2nd content event's message CRC is wrong
  ===============  ===========================================================

Framing
  ==============  ============================================================
  ``bighdr``      add a 72 KiB response header line (``x-fake-big``)
  ``crlf``        SSE lines end with ``\\r\\n`` instead of ``\\n``
  ``bytewise``    every byte of the stream body in its own chunked-encoding
                  chunk (split events, split UTF-8); text becomes non-ASCII
  ``gzip``        ``Content-Encoding: gzip`` if the request's Accept-Encoding
                  allows gzip, else plain; ``requests[i]["gzipped"]`` tells
  ``closedelim``  no Content-Length/chunking: ``Connection: close`` and the
                  body ends when the socket closes
  ==============  ============================================================

Recording
---------
``requests`` gets one dict per request *before* the reply is sent: ``method``,
``path`` (as sent, query included), ``headers`` (lower-cased names, last wins),
``header_list`` (as received), ``body`` (bytes), ``json`` (or None),
``connection_id``, plus ``request_id``, ``gzipped`` and ``deployment``.

``reported`` gets one dict per response that delivers usage, also appended
before the reply is written (the fake knows in advance what it will send, so
tests never race the handler thread): ``path``, ``model``, ``stream``,
``usage``, ``request_index`` (into ``requests``), plus ``request_id`` and
``complete``. ``usage`` is what a correct meter ends with: the body's
``usage`` object; for OpenAI streams the usage chunk (only present when the
client asked for ``include_usage``); for Responses streams
``response.usage`` of the terminal event; for Anthropic streams
``message_start.message.usage`` overridden field by field by each later
``message_delta.usage``. ``complete`` is False when the stream was cut or
errored (dropstream, cutmidevent, rst, errevent, drip): then ``usage`` holds
only what was sent before the cut (for Anthropic that is message_start's,
whose ``output_tokens`` of 1 is a placeholder), and OpenAI cut streams get
no entry at all.
"""

import base64
import calendar
import copy
import gzip
import hashlib
import hmac
import json
import re
import select
import socket
import struct
import sys
import threading
import time
import traceback
import zlib
from http.server import BaseHTTPRequestHandler
from http.server import ThreadingHTTPServer
from socketserver import TCPServer
from urllib.parse import quote, unquote, urlsplit

__all__ = ["FakeUpstream"]

# ==== Constants =============================================================

CREATED_AT = 1700000000          #: fixed ``created`` timestamp in bodies
SLOW_S = 0.5                     #: ``slow``: delay before the status line
SLOWSTREAM_S = 0.2               #: ``slowstream``: delay between events
HALTING_S = 0.1                  #: ``halting``: pause inside each chunk
DRIP_INTERVAL_S = 0.3            #: ``drip``: one event (or byte) this often
DRIP_MAX_S = 60.0                #: ``drip``: give up after this long
HANG_MAX_S = 60.0                #: ``hang``: give up after this long
POLL_S = 0.05                    #: how often hang/serve loops look at stop()
RST_DELAY_S = 0.1                #: ``rst``: let the client read, then reset
BIG_HEADER_BYTES = 72 * 1024     #: ``bighdr``: header value length
RETRY_AFTER_S = "7"              #: ``fail429``: retry-after value
REDIRECT_TARGET = "http://169.254.169.254/latest/meta-data/"
DEFAULT_EMBEDDING_DIMS = 8

ASCII_WORDS = ["Hello", " from", " the", " fake", " upstream."]
UNICODE_WORDS = ["héllo", " wörld", " ✓", " naïve", " café", " 日本"]

OPENAI_MODELS = ["gpt-4o-mini", "gpt-4o", "text-embedding-3-small"]
ANTHROPIC_MODELS = ["claude-sonnet-4-5", "claude-haiku-4-5"]

_ROUTES = {
    ("POST", "/v1/chat/completions"): "chat",
    ("POST", "/v1/completions"): "completions",
    ("POST", "/v1/embeddings"): "embeddings",
    ("POST", "/v1/responses"): "responses",
    ("POST", "/v1/messages"): "messages",
    ("POST", "/v1/messages/count_tokens"): "count_tokens",
    ("GET", "/v1/models"): "models",
    ("POST", "/v1/responses/input_tokens"): "input_tokens",
    ("POST", "/v1/moderations"): "moderations",
}
#: Claude on the clouds (the Messages API): Bedrock's bedrock-runtime and
#: Vertex AI's publisher model endpoints.
_BEDROCK_PATH = re.compile(r"/model/(?P<model>[^/]+)/(invoke|invoke-with-response-stream)\Z")
_VERTEX_PATH = re.compile(r"/v1/projects/[^/]+/locations/[^/]+/publishers/anthropic/models/"
                          r"(?P<model>[^/:]+):(rawPredict|streamRawPredict)\Z")
_CLOUD_VERSIONS = {"bedrock": "bedrock-2023-05-31", "vertex": "vertex-2023-10-16"}
#: A stored response's routes: (method, what follows its id) -> route.
_RESPONSE_PATH = re.compile(r"^/v1/responses/(resp_[A-Za-z0-9_]+)(/cancel|/input_items)?$")
_RESPONSE_ROUTES = {("GET", None): "response", ("DELETE", None): "response_delete",
                    ("POST", "/cancel"): "response_cancel", ("GET", "/input_items"): "input_items"}
_ANTHROPIC_ROUTES = {"messages", "count_tokens"}
#: Azure's classic API serves these under /deployments/<deployment>/ only.
_DEPLOYMENT_ROUTES = {"chat", "completions", "embeddings"}
_DEPLOYMENT_PATH = re.compile(r"^/deployments/([^/]+)(/.+)$")
_STREAM_ROUTES = {"chat", "completions", "responses", "messages"}

#: token -> (status, anthropic error type, openai error type, openai code,
#: message).  The order is the precedence among status faults.
_STATUS_FAULTS = {
    "fail400": (400, "invalid_request_error", "invalid_request_error", None,
                "Fake upstream rejected the request (fail400)."),
    "fail429": (429, "rate_limit_error", "requests", "rate_limit_exceeded",
                "Rate limit reached (fake upstream fail429). "
                "Please try again in 7s."),
    "fail500": (500, "api_error", "server_error", None,
                "The server had an error while processing your request "
                "(fake upstream fail500)."),
    "fail503": (503, "api_error", "server_error", None,
                "Service unavailable (fake upstream fail503)."),
    "fail529": (529, "overloaded_error", "server_error", "overloaded",
                "Overloaded"),
}

BEDROCK_STREAM_TYPE = "application/vnd.amazon.eventstream"
SIGNATURE_MISMATCH = ("The request signature we calculated does not match the "
                      "signature you provided. Check your AWS Secret Access Key "
                      "and signing method. Consult the service documentation "
                      "for details.")
HTML_502 = (b"<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n"
            b"<body>\r\n<center><h1>502 Bad Gateway</h1></center>\r\n"
            b"<hr><center>fake-upstream</center>\r\n</body>\r\n</html>\r\n")
HTML_NOT_JSON = (b"<!DOCTYPE html><html><head><title>Maintenance</title>"
                 b"</head><body><p>We'll be back {soon</p></body></html>\n")

_TOKEN_SPLIT = re.compile(r"[^a-z0-9]+")
_EVENTS_TOKEN = re.compile(r"^events(\d+)$")
#: What a vanished peer raises (BrokenPipe, ConnectionReset, timeouts...).
_CONNECTION_ERRORS = (OSError,)
#: Also tolerated while tearing a connection down (I/O on a closed file).
_TEARDOWN_ERRORS = (OSError, ValueError)


class _Aborted(Exception):
    """Raised after the handler tore the connection down on purpose."""


# ==== Helpers ===============================================================

def parse_tokens(*sources):
    """Return the behaviour tokens in ``sources`` as a frozenset.

    Each source is split on every non-alphanumeric character, lower-cased.
    """
    tokens = set()
    for source in sources:
        if source:
            tokens.update(t for t in _TOKEN_SPLIT.split(str(source).lower())
                          if t)
    return frozenset(tokens)


def accepts_gzip(accept_encoding):
    """True if an Accept-Encoding header value allows gzip (q > 0)."""
    allowed = None
    star = False
    for item in (accept_encoding or "").split(","):
        coding, _, params = item.strip().partition(";")
        coding = coding.strip().lower()
        q = 1.0
        match = re.search(r"q\s*=\s*([0-9.]+)", params)
        if match:
            try:
                q = float(match.group(1))
            except ValueError:
                q = 0.0
        if coding in ("gzip", "x-gzip"):
            allowed = q > 0
        elif coding == "*":
            star = q > 0
    return allowed if allowed is not None else star


def dumps(obj):
    """Compact JSON, UTF-8 passed through raw (so bytewise splits UTF-8)."""
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def sse_frame(data, event=None, crlf=False):
    """One SSE event as bytes: optional ``event:`` line, one ``data:`` line."""
    if not isinstance(data, str):
        data = dumps(data)
    text = (f"event: {event}\n" if event else "") + f"data: {data}\n\n"
    if crlf:
        text = text.replace("\n", "\r\n")
    return text.encode("utf-8")


def _mask_key(key):
    """``sk-abcdefgh...wxyz``: how OpenAI quotes a rejected key."""
    if len(key) <= 12:
        return key
    return f"{key[:8]}...{key[-4:]}"


# ==== Usage numbers =========================================================

class _Usage:
    """Deterministic token counts derived from a hash of the request body."""

    def __init__(self, body, tokens):
        h = int.from_bytes(hashlib.sha256(body).digest()[:8], "big")
        self.tokens = tokens
        self.prompt = 11 + h % 89
        self.completion = 5 + (h // 89) % 37
        cache = "cache" in tokens or "deepseekcache" in tokens
        self.cached = 1 + (h >> 16) % (self.prompt - 1) if cache else 0
        self.reasoning = (1 + (h >> 24) % self.completion
                          if "reasoning" in tokens else 0)
        self.cache_creation = 2 + (h >> 32) % 97 if cache else 0
        self.cache_5m = (1 + (h >> 40) % (self.cache_creation - 1)
                         if cache else 0)
        self.cache_1h = self.cache_creation - self.cache_5m
        self.cache_read = 1 + (h >> 48) % 151 if cache else 0

    @property
    def _details(self):
        return "nodetails" not in self.tokens

    def openai_completion(self):
        """CompletionUsage (chat + legacy completions), PROTOCOLS 1.2."""
        return self.openai_completion_so_far(self.completion)

    def openai_completion_so_far(self, completion):
        """CompletionUsage with ``completion`` output tokens (a cumulative
        count on an ``everychunk`` stream), in the provider's quirks."""
        usage = {"prompt_tokens": self.prompt,
                 "completion_tokens": completion,
                 "total_tokens": self.prompt + completion}
        if "deepseekcache" in self.tokens:
            usage["prompt_cache_hit_tokens"] = self.cached
            usage["prompt_cache_miss_tokens"] = self.prompt - self.cached
        elif self._details:
            usage["prompt_tokens_details"] = {"cached_tokens": self.cached}
        if self._details:
            usage["completion_tokens_details"] = {
                "reasoning_tokens": min(self.reasoning, completion)}
        if "orcost" in self.tokens:
            usage["cost"] = round((self.prompt + 4 * completion) * 1e-6, 9)
            usage["is_byok"] = False
            usage["cost_details"] = {
                "upstream_inference_cost": None,
                "upstream_inference_prompt_cost": round(self.prompt * 1e-6, 9),
                "upstream_inference_completions_cost":
                    round(4 * completion * 1e-6, 9)}
        return usage

    def openai_embeddings(self):
        """Embeddings usage: prompt and total only."""
        return {"prompt_tokens": self.prompt, "total_tokens": self.prompt}

    def openai_responses(self):
        """ResponseUsage, PROTOCOLS 1.3."""
        usage = {"input_tokens": self.prompt}
        if self._details:
            usage["input_tokens_details"] = {"cached_tokens": self.cached}
        usage["output_tokens"] = self.completion
        if self._details:
            usage["output_tokens_details"] = {
                "reasoning_tokens": self.reasoning}
        usage["total_tokens"] = self.prompt + self.completion
        return usage

    def anthropic(self):
        """Anthropic usage, PROTOCOLS 2.3 (input_tokens excludes cache)."""
        usage = {"input_tokens": self.prompt,
                 "cache_creation_input_tokens": self.cache_creation,
                 "cache_read_input_tokens": self.cache_read,
                 "output_tokens": self.completion}
        if "cache" in self.tokens:
            usage["cache_creation"] = {
                "ephemeral_5m_input_tokens": self.cache_5m,
                "ephemeral_1h_input_tokens": self.cache_1h}
        return usage


# ==== One request ===========================================================

class _Call:
    """Everything the handler derived from one request."""

    def __init__(self, method, raw_path, header_list, body, faults="",
                 root="/v1", azure=False):
        self.method = method
        self.raw_path = raw_path
        parts = urlsplit(raw_path)
        self.path = parts.path
        self.deployment = None
        api_path = self._api_path(root, azure and "api-version=" in
                                  "&" + parts.query, azure)
        self.header_list = header_list
        self.headers = {name.lower(): value for name, value in header_list}
        self.body = body
        try:
            self.json = json.loads(body) if body else None
        except ValueError:
            self.json = None
        data = self.json if isinstance(self.json, dict) else {}

        self.route = _ROUTES.get((method, api_path))
        self.model_id = None
        #: "bedrock" or "vertex" for Claude on a cloud: Messages API, model in the URL
        self.cloud = None
        cloud = _BEDROCK_PATH.match(self.path) or _VERTEX_PATH.match(self.path)
        if method == "POST" and cloud is not None:
            self.route, self.model_id = "messages", unquote(cloud.group("model"))
            self.cloud = "bedrock" if cloud.re is _BEDROCK_PATH else "vertex"
        if self.route is None and method == "GET" and \
                api_path.startswith("/v1/models/") and \
                len(api_path) > len("/v1/models/"):
            self.route = "model"
            self.model_id = api_path[len("/v1/models/"):]
        self.response_id = None
        stored = _RESPONSE_PATH.match(api_path) if self.route is None else None
        if stored and (method, stored.group(2)) in _RESPONSE_ROUTES:
            self.route = _RESPONSE_ROUTES[(method, stored.group(2))]
            self.response_id = stored.group(1)
        if azure and (self.deployment is None) == \
                (self.route in _DEPLOYMENT_ROUTES):
            self.route = None       # Azure: deployment routes and no others
        self.model = str(data.get("model") or self.model_id or "")
        self.tokens = parse_tokens(self.model,
                                   self.headers.get("x-fake-fault"), faults)

        if self.route in _ANTHROPIC_ROUTES:
            self.anthropic = True
        elif self.route in ("models", "model"):
            self.anthropic = "anthropic-version" in self.headers
        else:
            self.anthropic = False
        self.stream = self.route in _STREAM_ROUTES and \
            data.get("stream") is True
        if self.cloud == "bedrock":  # the path says; "stream" in the body is refused
            self.stream = self.path.endswith("/invoke-with-response-stream")
        #: SigV4 on a Bedrock request: "valid", "invalid", or None (not signed)
        self.aws_signature = None
        options = data.get("stream_options")
        self.include_usage = self.stream and isinstance(options, dict) and \
            options.get("include_usage") is True
        self.gzipped = "gzip" in self.tokens and \
            accepts_gzip(self.headers.get("accept-encoding"))
        self.usage = _Usage(body, self.tokens)
        self.pieces = self._text_pieces()
        self.text = "".join(self.pieces)
        self.seq = 0                # set by FakeUpstream._record
        self.request_id = ""
        self.request_index = -1

    def _api_path(self, root, versioned, azure):
        """The ``/v1/...`` path this request's path stands for under
        ``root`` (None outside it, or on Azure without ``api-version``);
        an Azure deployment path also sets ``deployment``."""
        if not self.path.startswith(root + "/") or (azure and not versioned):
            return None
        rest = self.path[len(root):]
        match = _DEPLOYMENT_PATH.match(rest) if azure else None
        if match:
            self.deployment, rest = match.group(1), match.group(2)
        return "/v1" + rest

    def has(self, token):
        """True if the behaviour token was given."""
        return token in self.tokens

    def _text_pieces(self):
        unicode = self.has("unicode") or self.has("bytewise")
        words = UNICODE_WORDS if unicode else ASCII_WORDS
        count = len(words)
        for token in self.tokens:
            match = _EVENTS_TOKEN.match(token)
            if match:
                count = max(1, min(int(match.group(1)), 10000))
        pieces = []
        for i in range(count):
            word = words[i % len(words)]
            if i and not word.startswith(" "):
                word = " " + word
            pieces.append(word)
        return pieces

    @property
    def request_id_header(self):
        if self.cloud == "bedrock":
            return "x-amzn-RequestId"
        return "request-id" if self.anthropic else "x-request-id"


# ==== Response bodies (non-streamed) ========================================

def _openai_error(message, err_type, code=None, param=None):
    return {"error": {"message": message, "type": err_type,
                      "param": param, "code": code}}


def _anthropic_error(call, err_type, message):
    return {"type": "error", "error": {"type": err_type, "message": message},
            "request_id": call.request_id}


def _error_body(call, anthropic_type, openai_type, openai_code, message):
    """An error body in the route's provider shape (Bedrock's is its own)."""
    if call.cloud == "bedrock":
        return {"message": message}
    if call.cloud == "vertex" and anthropic_type == "rate_limit_error":
        return {"error": {"code": 429, "message": message,  # Google's quota
                          "status": "RESOURCE_EXHAUSTED"}}
    if call.anthropic:
        return _anthropic_error(call, anthropic_type, message)
    return _openai_error(message, openai_type, openai_code)


_AZURE_FILTER_RESULTS = {
    name: {"filtered": False, "severity": "safe"}
    for name in ("hate", "self_harm", "sexual", "violence")}
_AZURE_PROMPT_FILTER = [{"prompt_index": 0,
                         "content_filter_results": _AZURE_FILTER_RESULTS}]


def _chat_body(call, usage):
    body = {"id": f"chatcmpl-fake{call.seq}", "object": "chat.completion",
            "created": CREATED_AT, "model": call.model,
            "choices": [{"index": 0,
                         "message": {"role": "assistant",
                                     "content": call.text, "refusal": None},
                         "logprobs": None, "finish_reason": "stop"}]}
    if call.has("azurefilter"):
        body["prompt_filter_results"] = _AZURE_PROMPT_FILTER
        body["choices"][0]["content_filter_results"] = _AZURE_FILTER_RESULTS
    if usage is not None:
        body["usage"] = usage
    return body


def _completions_body(call, usage):
    body = {"id": f"cmpl-fake{call.seq}", "object": "text_completion",
            "created": CREATED_AT, "model": call.model,
            "choices": [{"text": call.text, "index": 0, "logprobs": None,
                         "finish_reason": "stop"}]}
    if usage is not None:
        body["usage"] = usage
    return body


def _embedding_vector(call, index, dims):
    digest = hashlib.sha256(call.body + b"#%d" % index).digest()
    return [round((digest[i % 32] - 128) / 128.0, 6) for i in range(dims)]


def _embeddings_body(call, usage):
    data = call.json if isinstance(call.json, dict) else {}
    items = data.get("input")
    if isinstance(items, str) or not isinstance(items, list) or \
            (items and all(isinstance(x, int) for x in items)):
        count = 1                   # one string, or one token array
    else:
        count = max(1, len(items))
    dims = data.get("dimensions")
    dims = dims if isinstance(dims, int) and 0 < dims <= 4096 \
        else DEFAULT_EMBEDDING_DIMS
    as_base64 = data.get("encoding_format") == "base64"
    out = []
    for i in range(count):
        vector = _embedding_vector(call, i, dims)
        if as_base64:
            vector = base64.b64encode(
                struct.pack(f"<{dims}f", *vector)).decode("ascii")
        out.append({"object": "embedding", "index": i, "embedding": vector})
    body = {"object": "list", "data": out, "model": call.model}
    if usage is not None:
        body["usage"] = usage
    return body


def _responses_message(call, status):
    return {"id": f"msg_fake{call.seq}", "type": "message", "status": status,
            "role": "assistant",
            "content": [{"type": "output_text", "text": call.text,
                         "annotations": []}]
            if status != "in_progress" else []}


def _responses_object(call, status, output, usage=None, with_usage=True):
    body = {"id": f"resp_fake{call.seq}", "object": "response",
            "created_at": CREATED_AT, "status": status, "model": call.model,
            "output": output, "error": None, "incomplete_details": None}
    if status == "failed":
        body["error"] = {"code": "server_error",
                         "message": "The model failed (fake upstream)."}
    if status == "incomplete":
        body["incomplete_details"] = {"reason": "max_output_tokens"}
    if with_usage:
        body["usage"] = usage
    return body


def _responses_status(call):
    if call.has("failed"):
        return "failed"
    if call.has("incomplete"):
        return "incomplete"
    return "completed"


def _responses_body(call, usage):
    status = _responses_status(call)
    return _responses_object(call, status,
                             [_responses_message(call, "completed")],
                             usage, with_usage=not call.has("nousage"))


def _stored_response_body(call):
    """What the routes of a stored response answer, for any id."""
    if call.route == "response_delete":
        return {"id": call.response_id, "object": "response.deleted", "deleted": True}
    if call.route == "input_items":
        return {"object": "list", "data": [], "first_id": None, "last_id": None, "has_more": False}
    body = _responses_object(call, "cancelled" if call.route == "response_cancel" else "completed", [])
    body["id"] = call.response_id
    return body


def _messages_body(call, usage):
    body = {"id": f"msg_fake{call.seq}", "type": "message",
            "role": "assistant", "model": call.model,
            "content": [{"type": "text", "text": call.text}],
            "stop_reason": "end_turn", "stop_sequence": None}
    if usage is not None:
        body["usage"] = usage
    return body


def _model_entry(call, model_id):
    if call.anthropic:
        return {"type": "model", "id": model_id, "display_name": model_id,
                "created_at": "2025-01-01T00:00:00Z"}
    return {"id": model_id, "object": "model", "created": CREATED_AT,
            "owned_by": "fake-upstream"}


def _models_body(call):
    if call.anthropic:
        data = [_model_entry(call, m) for m in ANTHROPIC_MODELS]
        return {"data": data, "has_more": False,
                "first_id": data[0]["id"], "last_id": data[-1]["id"]}
    return {"object": "list",
            "data": [_model_entry(call, m) for m in OPENAI_MODELS]}


#: route -> (body builder, usage builder).  count_tokens and models carry no
#: usage and are handled separately.
_NONSTREAM = {
    "chat": (_chat_body, _Usage.openai_completion),
    "completions": (_completions_body, _Usage.openai_completion),
    "embeddings": (_embeddings_body, _Usage.openai_embeddings),
    "responses": (_responses_body, _Usage.openai_responses),
    "messages": (_messages_body, _Usage.anthropic),
}


# ==== Stream plans ==========================================================

class _Event:
    """One SSE event: its bytes and the usage it delivers, if any."""

    __slots__ = ("data", "content", "usage", "merge")

    def __init__(self, data, content=False, usage=None, merge=False):
        self.data = data            #: the frame bytes
        self.content = content      #: a text delta (cut points count these)
        self.usage = usage          #: usage object this event carries
        self.merge = merge          #: Anthropic: override field by field


class _Plan:
    """A complete stream, the drip event maker and the mid-stream error."""

    def __init__(self, events, drip, error):
        self.events = events        #: list of _Event, in order
        self.drip = drip            #: drip(i) -> bytes of a harmless event
        self.error = error          #: _Event for ``errevent``

    def after_content(self, n):
        """Index just past the n-th (1-based) content event."""
        seen = 0
        for index, event in enumerate(self.events):
            if event.content:
                seen += 1
                if seen == n:
                    return index + 1
        return len(self.events)

    def before_content(self):
        """Index of the first content event."""
        return self.after_content(1) - 1


def _openai_stream_plan(call):
    """Chat or legacy completions: data-only frames, PROTOCOLS 1.4."""
    crlf = call.has("crlf")
    chat = call.route == "chat"
    every_chunk = call.has("everychunk")
    on_last = call.has("usagelast") or call.has("xgroq")
    with_usage = (call.include_usage or on_last) and not call.has("nousage")
    # Where usage rides: its own choices: [] chunk, or the finish chunk.
    usage_chunk = with_usage and not (every_chunk or on_last)
    base = {"id": f"{'chatcmpl' if chat else 'cmpl'}-fake{call.seq}",
            "object": "chat.completion.chunk" if chat else "text_completion",
            "created": CREATED_AT, "model": call.model}

    def chunk(choice, usage=None, final=False):
        obj = dict(base, choices=[] if final else [choice])
        if call.has("xgroq"):
            if usage is not None:
                obj["x_groq"] = {"id": f"req_fake{call.seq}", "usage": usage}
        elif with_usage and (usage_chunk or usage is not None):
            obj["usage"] = usage
        return sse_frame(obj, crlf=crlf)

    def carried(produced, last=False):
        """The usage a chunk carries after ``produced`` content chunks."""
        if not with_usage or not (every_chunk or (on_last and last)):
            return None
        count = call.usage.completion
        if not last:
            count = count * produced // (len(call.pieces) + 1)
        return call.usage.openai_completion_so_far(count)

    def choice(text=None, role=False, finish=None):
        if chat:
            delta = {}
            if role:
                delta = {"role": "assistant", "content": ""}
            elif text is not None:
                delta = {"content": text}
            picked = {"index": 0, "delta": delta, "logprobs": None,
                      "finish_reason": finish}
        else:
            picked = {"text": text or "", "index": 0, "logprobs": None,
                      "finish_reason": finish}
        if call.has("azurefilter"):
            picked["content_filter_results"] = _AZURE_FILTER_RESULTS
        return picked

    def event(choice_, produced, content=False, last=False):
        usage = carried(produced, last)
        return _Event(chunk(choice_, usage), content=content, usage=usage)

    events = []
    if call.has("orcost"):
        events.append(_Event(b": OPENROUTER PROCESSING\n\n"))
    if call.has("azurefilter"):
        events.append(_Event(sse_frame(dict(
            base, id="", model="", object="", created=0, choices=[],
            prompt_filter_results=_AZURE_PROMPT_FILTER), crlf=crlf)))
    if chat:
        events.append(event(choice(role=True), 0))
    events += [event(choice(piece), n + 1, content=True)
               for n, piece in enumerate(call.pieces)]
    events.append(event(choice(finish="stop"), len(call.pieces), last=True))
    if usage_chunk:
        usage = call.usage.openai_completion()
        events.append(_Event(chunk(None, usage, final=True), usage=usage))
    events.append(_Event(sse_frame("[DONE]", crlf=crlf)))
    error = _Event(sse_frame(_openai_error(
        "The server had an error while processing your request "
        "(fake upstream errevent).", "server_error"), crlf=crlf))
    return _Plan(events, lambda i: chunk(choice(" drip")), error)


def _responses_stream_plan(call):
    """Responses API: ``event:`` + ``data:`` frames, PROTOCOLS 1.5."""
    crlf = call.has("crlf")
    events = []
    item_id = f"msg_fake{call.seq}"

    def frame(event_type, seq, **fields):
        return sse_frame(dict(type=event_type, sequence_number=seq, **fields),
                         event=event_type, crlf=crlf)

    def add(event_type, content=False, usage=None, **fields):
        events.append(_Event(frame(event_type, len(events), **fields),
                             content=content, usage=usage))

    text_at = dict(item_id=item_id, output_index=0, content_index=0)
    part = {"type": "output_text", "text": call.text, "annotations": []}
    add("response.created",
        response=_responses_object(call, "in_progress", []))
    add("response.in_progress",
        response=_responses_object(call, "in_progress", []))
    add("response.output_item.added", output_index=0,
        item=_responses_message(call, "in_progress"))
    add("response.content_part.added", **text_at,
        part=dict(part, text=""))
    for piece in call.pieces:
        add("response.output_text.delta", content=True, **text_at,
            delta=piece, logprobs=[])
    add("response.output_text.done", **text_at, text=call.text, logprobs=[])
    add("response.content_part.done", **text_at, part=part)
    add("response.output_item.done", output_index=0,
        item=_responses_message(call, "completed"))

    status = _responses_status(call)
    usage = None
    if status != "failed" and not call.has("nousage"):
        usage = call.usage.openai_responses()
    final = _responses_object(call, status,
                              [_responses_message(call, "completed")],
                              usage, with_usage=not call.has("nousage"))
    add(f"response.{status}", usage=usage, response=final)

    first = next(i for i, e in enumerate(events) if e.content)
    error = _Event(frame("error", first + 1, code="server_error",
                         message="The server had an error (fake upstream "
                                 "errevent).", param=None))

    def drip(i):
        return frame("response.output_text.delta", first + i, **text_at,
                     delta=" drip", logprobs=[])
    return _Plan(events, drip, error)


def _anthropic_stream_plan(call):
    """Anthropic Messages: named events, PROTOCOLS 2.4."""
    crlf = call.has("crlf")
    with_usage = not call.has("nousage")
    final = call.usage.anthropic()
    out = final["output_tokens"]

    start_usage = dict(final, output_tokens=1)
    if call.has("cumdelta"):
        # message_start holds preliminary input/cache counts; the last
        # message_delta revises them.
        start_usage["input_tokens"] = final["input_tokens"] - 3
        start_usage["cache_read_input_tokens"] = \
            final["cache_read_input_tokens"] // 2
        steps = [max(2, out // 3), 2 * out // 3]
        last = {key: final[key] for key in
                ("input_tokens", "cache_creation_input_tokens",
                 "cache_read_input_tokens", "cache_creation", "output_tokens")
                if key in final}
        delta_usages = [{"output_tokens": n} for n in steps] + [last]
    else:
        delta_usages = [{"output_tokens": out}]

    def frame(obj):
        return sse_frame(obj, event=obj["type"], crlf=crlf)

    message = {"id": f"msg_fake{call.seq}", "type": "message",
               "role": "assistant", "content": [], "model": call.model,
               "stop_reason": None, "stop_sequence": None}
    if with_usage:
        message["usage"] = start_usage
    events = [
        _Event(frame({"type": "message_start", "message": message}),
               usage=start_usage if with_usage else None, merge=True),
        _Event(frame({"type": "content_block_start", "index": 0,
                      "content_block": {"type": "text", "text": ""}})),
        _Event(frame({"type": "ping"})),
    ]
    events += [_Event(frame({"type": "content_block_delta", "index": 0,
                             "delta": {"type": "text_delta", "text": piece}}),
                      content=True)
               for piece in call.pieces]
    events.append(_Event(frame({"type": "content_block_stop", "index": 0})))
    for usage in delta_usages:
        obj = {"type": "message_delta",
               "delta": {"stop_reason": "end_turn", "stop_sequence": None}}
        if with_usage:
            obj["usage"] = usage
        events.append(_Event(frame(obj), usage=usage if with_usage else None,
                             merge=True))
    events.append(_Event(frame({"type": "message_stop"})))
    error = _Event(frame({"type": "error",
                          "error": {"type": "overloaded_error",
                                    "message": "Overloaded"}}))
    return _Plan(events, lambda i: frame({
        "type": "content_block_delta", "index": 0,
        "delta": {"type": "text_delta", "text": " drip"}}), error)


def event_stream_message(headers, payload):
    """One AWS event-stream message: prelude (total length, headers
    length, CRC-32 of both), string headers, payload, CRC-32 of it all."""
    encoded = b"".join(
        bytes([len(name)]) + name + b"\x07" + struct.pack(">H", len(value)) + value
        for name, value in ((n.encode(), v.encode()) for n, v in headers))
    prelude = struct.pack(">II", 16 + len(encoded) + len(payload), len(encoded))
    message = prelude + struct.pack(">I", zlib.crc32(prelude)) + encoded + payload
    return message + struct.pack(">I", zlib.crc32(message))


def _bedrock_chunk(call, sse):
    """An Anthropic SSE event as Bedrock sends it: a ``chunk`` event whose
    payload carries the event's JSON in base64 (``bytes``), or for the
    ``error`` event an exception. ``message_stop`` gains Bedrock's
    invocation metrics."""
    data = json.loads(re.search(rb"^data: ?(.*)$", sse, re.M).group(1))
    if data["type"] == "error":
        return event_stream_message(
            [(":exception-type", "serviceUnavailableException"),
             (":content-type", "application/json"), (":message-type", "exception")],
            dumps({"message": data["error"]["message"]}).encode())
    if data["type"] == "message_stop":
        metrics = {"inputTokenCount": call.usage.prompt,
                   "outputTokenCount": call.usage.completion,
                   "invocationLatency": 120, "firstByteLatency": 40}
        if call.has("cache"):
            metrics["cacheReadInputTokenCount"] = call.usage.cache_read
            metrics["cacheWriteInputTokenCount"] = call.usage.cache_creation
        data["amazon-bedrock-invocationMetrics"] = metrics
    payload = {"bytes": base64.b64encode(dumps(data).encode()).decode(),
               "p": "abcdefghijklmnopqrstuvwxyzABCDEF"[:1 + call.seq % 30]}
    return event_stream_message(
        [(":event-type", "chunk"), (":content-type", "application/json"),
         (":message-type", "event")], dumps(payload).encode())


def _bedrock_plan(call, plan):
    """An Anthropic stream plan in Bedrock's event-stream framing.
    ``badcrc`` spoils the checksum of the second content event."""
    events = [_Event(_bedrock_chunk(call, event.data), event.content,
                     event.usage, event.merge) for event in plan.events]
    if call.has("badcrc"):
        spoilt = events[plan.after_content(2) - 1]
        spoilt.data = spoilt.data[:-1] + bytes([spoilt.data[-1] ^ 1])
    error = _Event(_bedrock_chunk(call, plan.error.data))
    return _Plan(events, lambda i: _bedrock_chunk(call, plan.drip(i)), error)


_STREAM_PLANS = {
    "chat": _openai_stream_plan,
    "completions": _openai_stream_plan,
    "responses": _responses_stream_plan,
    "messages": _anthropic_stream_plan,
}


def _metered(events):
    """The usage a correct meter ends with after reading ``events``."""
    usage = None
    for event in events:
        if event.usage is None:
            continue
        if event.merge and usage is not None:
            usage = dict(usage, **copy.deepcopy(event.usage))
        else:
            usage = copy.deepcopy(event.usage)
    return usage


# ==== Body writer ===========================================================

class _BodyWriter:
    """Writes a streamed body: chunked or close-delimited, maybe gzipped,
    maybe one byte per write, maybe each chunk in pieces (``halt``: the
    pause between them)."""

    def __init__(self, wfile, chunked, gzipped, bytewise, halt=None):
        self._wfile = wfile
        self._chunked = chunked
        self._bytewise = bytewise
        self._halt = halt
        self._zip = zlib.compressobj(6, zlib.DEFLATED, 31) if gzipped \
            else None

    def write(self, data):
        """Send one event (or part of one) now."""
        if self._zip:
            data = self._zip.compress(data) + \
                self._zip.flush(zlib.Z_SYNC_FLUSH)
        self._raw(data)

    def end(self):
        """Finish the gzip member and send the chunked terminator."""
        if self._zip:
            self._raw(self._zip.flush())
        if self._chunked:
            self._wfile.write(b"0\r\n\r\n")

    def _raw(self, data):
        if not data:                # an empty chunk would end the body
            return
        parts = [data[i:i + 1] for i in range(len(data))] if self._bytewise \
            else [data]
        for part in parts:
            if self._chunked and self._halt is not None:
                half = len(part) // 2
                for index, piece in enumerate((b"%x" % len(part), b"\r\n" + part[:half], part[half:] + b"\r\n")):
                    if index:
                        self._halt()
                    self._wfile.write(piece)
                continue
            if self._chunked:
                part = b"%x\r\n%s\r\n" % (len(part), part)
            self._wfile.write(part)


# ==== HTTP handler ==========================================================

class _Handler(BaseHTTPRequestHandler):
    """One connection. ``do_*`` record the request, then ``_serve`` it."""

    protocol_version = "HTTP/1.1"
    server_version = "fake-upstream/1.0"

    def version_string(self):
        return self.server_version

    def setup(self):
        super().setup()
        self.fake = self.server.fake
        self.connection_id = self.fake._connection_opened(self.connection)
        try:
            # Small writes (bytewise, drip) must leave at once, not wait for
            # Nagle.
            self.connection.setsockopt(socket.IPPROTO_TCP,
                                       socket.TCP_NODELAY, 1)
        except OSError:
            pass

    def finish(self):
        try:
            super().finish()
        except _TEARDOWN_ERRORS:
            pass
        finally:
            self.fake._connection_closed(self.connection)

    def handle(self):
        try:
            super().handle()
        except _TEARDOWN_ERRORS:
            self.close_connection = True

    def log_message(self, format, *args):
        """Silence the per-request log lines."""

    def do_POST(self):
        self._headers_sent = False
        try:
            body = self._read_body()
            call = _Call(self.command, self.path, list(self.headers.items()),
                         body, self.fake._next_faults(), self.fake.root,
                         self.fake.azure)
            if call.cloud == "bedrock" and call.headers.get(
                    "authorization", "").startswith("AWS4-HMAC-SHA256 "):
                call.aws_signature = "valid" if _sigv4_valid(
                    call, self.fake.aws_credentials) else "invalid"
            self.fake._record(call, self.connection_id)
            self._serve(call)
        except _Aborted:
            self.close_connection = True
        except _CONNECTION_ERRORS:
            self.close_connection = True
        except Exception:
            traceback.print_exc(file=sys.stderr)
            self.close_connection = True
            if not self._headers_sent:
                self._send_plain(500, dumps(_openai_error(
                    "fake upstream bug", "server_error")).encode())

    do_GET = do_PUT = do_PATCH = do_DELETE = do_POST

    # ---- request ---------------------------------------------------------

    def _read_body(self):
        try:
            return self._read_body_bytes()
        except ValueError:          # bad chunk size or Content-Length
            self._send_plain(400, dumps(_openai_error(
                "Malformed request body framing (fake upstream).",
                "invalid_request_error")).encode())
            raise _Aborted

    def _read_body_bytes(self):
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            parts = []
            while True:
                line = self.rfile.readline(65537)
                size = int(line.split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline(65537) not in (b"\r\n", b"\n",
                                                             b""):
                        pass        # trailers
                    return b"".join(parts)
                parts.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    # ---- dispatch --------------------------------------------------------

    def _serve(self, call):
        if call.has("reset"):
            self._abort(rst=True)
        if call.has("hang"):
            self._hang()
            raise _Aborted
        if call.has("slow"):
            self._sleep(SLOW_S)
        if call.has("held"):
            self.fake.released.wait(HANG_MAX_S)
        if call.route is None:
            body = _openai_error(
                f"Unknown request URL: {call.method} {call.path}. "
                "(fake upstream)", "invalid_request_error", "unknown_url")
            return self._send_json(call, 404, body)
        if call.cloud is not None and self._refuse_cloud_call(call):
            return
        if self._send_fault(call):
            return
        if call.route in ("models", "model"):
            body = _models_body(call) if call.route == "models" \
                else _model_entry(call, call.model_id)
            return self._send_json(call, 200, body)
        if call.response_id is not None:
            return self._send_json(call, 200, _stored_response_body(call))
        if not isinstance(call.json, dict):
            body = _error_body(call, "invalid_request_error",
                               "invalid_request_error", None,
                               "We could not parse the JSON body of your "
                               "request. (fake upstream)")
            return self._send_json(call, 400, body)
        if call.route == "count_tokens":
            return self._send_json(call, 200,
                                   {"input_tokens": call.usage.prompt})
        if call.route == "input_tokens":
            return self._send_json(call, 200, {"object": "response.input_tokens",
                                               "input_tokens": call.usage.prompt})
        if call.route == "moderations":
            return self._send_json(call, 200, {
                "id": f"modr-fake{call.seq}", "model": call.model or "omni-moderation-latest",
                "results": [{"flagged": False, "categories": {}, "category_scores": {}}]})
        if call.stream:
            plan = _STREAM_PLANS[call.route](call)
            if call.cloud == "bedrock":
                plan = _bedrock_plan(call, plan)
            return self._send_stream(call, plan)
        build_body, build_usage = _NONSTREAM[call.route]
        usage = None if call.has("nousage") else build_usage(call.usage)
        if call.route == "responses" and call.has("failed"):
            usage = None
        body = build_body(call, usage)
        if usage is not None:
            self.fake._report(call, usage, complete=True)
        extra = []
        if call.cloud == "bedrock":
            extra = [("X-Amzn-Bedrock-Input-Token-Count", str(call.usage.prompt)),
                     ("X-Amzn-Bedrock-Output-Token-Count", str(call.usage.completion))]
        self._send_json(call, 200, body, extra)

    def _refuse_cloud_call(self, call):
        """Answer as the cloud would a call it refuses: a SigV4 signature
        that does not match (Bedrock: 403), a body with ``model`` (or on
        Bedrock ``stream``) or without the cloud's ``anthropic_version``
        (400). False if the call is fine."""
        bedrock = call.cloud == "bedrock"
        if call.aws_signature == "invalid":
            self._send_json(call, 403, {"message": SIGNATURE_MISMATCH},
                            [("x-amzn-ErrorType", "InvalidSignatureException")])
            return True
        data = call.json if isinstance(call.json, dict) else {}
        problems = ["extraneous key [%s] is not permitted" % key
                    for key in (("model", "stream") if bedrock else ("model",))
                    if key in data]
        version = _CLOUD_VERSIONS[call.cloud]
        if data.get("anthropic_version") != version:
            problems.append("anthropic_version: expected %s" % version)
        if not problems:
            return False
        message = "Malformed input request: %s, please reformat your input " \
            "and try again." % ", ".join(problems)
        self._send_json(call, 400, _error_body(
            call, "invalid_request_error", None, None, message),
            [("x-amzn-ErrorType", "ValidationException")] if bedrock else [])
        return True

    def _send_fault(self, call):
        """Send the reply for a status-fault token; False if there is none."""
        if call.has("redirect"):
            self._send(call, 302, b"<html><body>Found</body></html>",
                       "text/html", [("Location", REDIRECT_TARGET)])
            return True
        if call.has("leak401"):
            auth = call.headers.get("authorization", "")
            key = auth[7:].strip() if auth.lower().startswith("bearer ") \
                else call.headers.get("x-api-key") or \
                call.headers.get("api-key") or auth
            message = (f"Incorrect API key provided: {_mask_key(key)}. You "
                       "can find your API key at "
                       "https://platform.openai.com/account/api-keys.")
            body = _error_body(call, "authentication_error",
                               "invalid_request_error", "invalid_api_key",
                               message)
            self._send_json(call, 401, body)
            return True
        for token, (status, a_type, o_type, o_code, message) in \
                _STATUS_FAULTS.items():
            if call.has(token):
                extra = [("retry-after", RETRY_AFTER_S)] \
                    if token == "fail429" else []
                body = _error_body(call, a_type, o_type, o_code,
                                   message)
                self._send_json(call, status, body, extra)
                return True
        if call.has("html502"):
            self._send(call, 502, HTML_502, "text/html")
            return True
        if call.has("badjson"):
            self._send(call, 200, HTML_NOT_JSON, "text/html")
            return True
        return False

    # ---- writing ---------------------------------------------------------

    def _start(self, call, status, content_type, extra=(), length=None,
               chunked=False):
        """Status line and headers. ``length=None`` and not chunked means
        the body is delimited by closing the connection."""
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header(call.request_id_header, call.request_id)
        for name, value in extra:
            self.send_header(name, value)
        if call.gzipped:
            self.send_header("Content-Encoding", "gzip")
        if call.has("bighdr"):
            self.send_header("x-fake-big", "a" * BIG_HEADER_BYTES)
        if chunked:
            self.send_header("Transfer-Encoding", "chunked")
        elif length is not None:
            self.send_header("Content-Length", str(length))
        else:
            self.close_connection = True
        if self.close_connection:
            self.send_header("Connection", "close")
        self._headers_sent = True
        self.end_headers()

    def _send(self, call, status, body, content_type, extra=()):
        """A whole (non-streamed) reply, honouring gzip/closedelim/drip."""
        if call.gzipped:
            body = gzip.compress(body)
        length = None if call.has("closedelim") else len(body)
        self._start(call, status, content_type, extra, length=length)
        if not call.has("drip"):
            self.wfile.write(body)
        elif self._drip(lambda i: body[i:i + 1], limit=len(body)) < len(body):
            self._abort()

    def _send_json(self, call, status, body, extra=()):
        self._send(call, status, dumps(body).encode("utf-8"),
                   "application/json", extra)

    def _send_plain(self, status, body):
        """Last-resort reply that needs no _Call (for our own bugs)."""
        self._headers_sent = True
        self.close_connection = True
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(body)
        except _CONNECTION_ERRORS:
            pass

    def _send_stream(self, call, plan):
        """Send a stream plan, cut as the fault tokens say.

        The events to be sent are chosen first, so ``reported`` can be
        filled before the first byte goes out.
        """
        events = plan.events
        ending = "end"
        partial = b""
        if call.has("drip"):
            events, ending = events[:plan.before_content()], "drip"
        elif call.has("droppreamble"):
            events, ending = events[:plan.before_content()], "abort"
        elif call.has("dropstream") or call.has("cutmidevent"):
            cut = plan.after_content(2)
            if call.has("cutmidevent") and cut < len(events):
                partial = events[cut].data[:len(events[cut].data) // 2]
            events, ending = events[:cut], "abort"
        elif call.has("rst"):
            events, ending = events[:plan.after_content(1)], "rst"
        elif call.has("errevent"):
            events = events[:plan.after_content(1)] + [plan.error]
        usage = _metered(events)
        if usage is not None:
            self.fake._report(call, usage, complete=events is plan.events)

        closedelim = call.has("closedelim")
        self._start(call, 200, BEDROCK_STREAM_TYPE if call.cloud == "bedrock"
                    else "text/event-stream",
                    [("Cache-Control", "no-cache")], chunked=not closedelim)
        out = _BodyWriter(self.wfile, chunked=not closedelim,
                          gzipped=call.gzipped, bytewise=call.has("bytewise"),
                          halt=self._halt(call))
        gap = SLOWSTREAM_S if call.has("slowstream") else 0
        for index, event in enumerate(events):
            if gap and index:
                self._sleep(gap)
            out.write(event.data)
        if partial:
            out.write(partial)
        if ending == "drip":
            self._drip(lambda i: out.write(plan.drip(i)) or b"")
            self._abort()
        elif ending == "abort":
            self._abort()
        elif ending == "rst":
            self._sleep(RST_DELAY_S)
            self._abort(rst=True)
        out.end()

    # ---- timing and teardown ---------------------------------------------

    def _halt(self, call):
        """The pause between the pieces of a chunk (halting, stall), or None."""
        if call.has("halting"):
            return lambda: self._sleep(HALTING_S)
        if not call.has("stall"):
            return None
        stalled = []

        def until_resumed():
            deadline = time.monotonic() + HANG_MAX_S
            while not stalled and not self.fake.resume.wait(POLL_S):
                if self.fake._stopping.is_set() or time.monotonic() > deadline:
                    break
            stalled.append(True)
        return until_resumed

    def _sleep(self, seconds):
        """Sleep, but return at once when the fake is stopping."""
        self.fake._stopping.wait(seconds)

    def _drip(self, send, limit=None):
        """Call ``send(i)`` every DRIP_INTERVAL_S until stop/limit/timeout.

        ``send`` either writes itself or returns bytes to write. Returns how
        many calls were made; a failed write raises (the peer is gone).
        """
        deadline = time.monotonic() + DRIP_MAX_S
        i = 0
        while (limit is None or i < limit) and time.monotonic() < deadline:
            if self.fake._stopping.wait(DRIP_INTERVAL_S):
                break
            data = send(i)
            if data:
                self.wfile.write(data)
            i += 1
        return i

    def _hang(self):
        """Send nothing until the peer closes, stop() or HANG_MAX_S."""
        deadline = time.monotonic() + HANG_MAX_S
        sock = self.connection
        while time.monotonic() < deadline and not self.fake._stopping.is_set():
            try:
                readable, _, _ = select.select([sock], [], [], POLL_S)
                if readable and not sock.recv(1, socket.MSG_PEEK):
                    return          # orderly close by the client
            except _CONNECTION_ERRORS:
                return
            if readable:
                self._sleep(POLL_S)  # pipelined bytes: don't spin

    def _abort(self, rst=False):
        """Drop the connection now: FIN, or RST with SO_LINGER 0."""
        self.close_connection = True
        if rst:
            try:
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                           struct.pack("ii", 1, 0))
                # Closing rfile drops the last makefile() reference, so this
                # close() really closes the fd (no FIN from shutdown first).
                self.rfile.close()
                self.connection.close()
            except OSError:
                pass
        raise _Aborted


# ==== SigV4 (checked independently of the gateway's signer) =================

_SIGV4 = re.compile(r"AWS4-HMAC-SHA256 Credential=(?P<key>[^/]+)/(?P<day>\d{8})/"
                    r"(?P<region>[^/]+)/(?P<service>[^/]+)/aws4_request, "
                    r"SignedHeaders=(?P<signed>[a-z0-9;-]+), "
                    r"Signature=(?P<signature>[0-9a-f]{64})\Z")


def _sigv4_valid(call, credentials):
    """Whether the request's SigV4 signature is right for the secret of
    its access key id in ``credentials`` (access key id -> secret), signs
    host and x-amz-date, and is dated within five minutes of now."""
    match = _SIGV4.match(call.headers.get("authorization", ""))
    if match is None or match["key"] not in credentials:
        return False
    names = match["signed"].split(";")
    amz_date = call.headers.get("x-amz-date", "")
    try:
        skew = time.time() - calendar.timegm(time.strptime(
            amz_date, "%Y%m%dT%H%M%SZ"))
    except ValueError:
        return False
    if {"host", "x-amz-date"} - set(names) or abs(skew) > 300 or \
            amz_date[:8] != match["day"]:
        return False
    canonical = "\n".join([
        call.method, quote(urlsplit(call.raw_path).path, safe="/-_.~"), "",
        "".join("%s:%s\n" % (name, " ".join(call.headers.get(name, "").split()))
                for name in names),
        match["signed"], hashlib.sha256(call.body).hexdigest()])
    scope = "/".join([match["day"], match["region"], match["service"],
                      "aws4_request"])
    to_sign = "\n".join(["AWS4-HMAC-SHA256", amz_date, scope,
                         hashlib.sha256(canonical.encode()).hexdigest()])
    key = ("AWS4" + credentials[match["key"]]).encode()
    for part in scope.split("/"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    return hmac.compare_digest(
        hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest(),
        match["signature"])


# ==== Server ================================================================

#: The name of the fake's per-connection threads.
CONNECTION_THREAD_NAME = "fake-upstream-connection"


class _Server(ThreadingHTTPServer):
    """ThreadingHTTPServer that knows its FakeUpstream."""

    daemon_threads = True
    request_queue_size = 128
    allow_reuse_address = True

    def __init__(self, address, fake):
        self.fake = fake
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, _Handler)

    def process_request(self, request, client_address):
        """A thread per connection, as ThreadingMixIn does, but named, so
        tests can tell the fake's threads from the gateway's on any Python
        (before 3.10 the default name is only ``Thread-N``)."""
        threading.Thread(target=self.process_request_thread, args=(request, client_address),
                         name=CONNECTION_THREAD_NAME, daemon=True).start()

    def server_bind(self):
        # HTTPServer.server_bind calls getfqdn(), a DNS lookup we don't need.
        TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]

    def handle_error(self, request, client_address):
        if isinstance(sys.exc_info()[1], _TEARDOWN_ERRORS):
            return
        super().handle_error(request, client_address)


class FakeUpstream:
    """A fake OpenAI/Anthropic provider on 127.0.0.1:<ephemeral port>.

    ``start()`` returns self; ``stop()`` never hangs. Also a context manager:
    ``with FakeUpstream().start() as up: ...``.
    """

    def __init__(self, host="127.0.0.1", faults="", root="/v1", azure=False,
                 tls=None):
        self.host = host
        #: a server-side ssl.SSLContext: serve HTTPS (``url`` names localhost)
        self.tls = tls
        #: behaviour tokens applied to every request
        self.faults = faults
        #: where the API's routes live, in place of /v1; Azure's classic paths
        self.root, self.azure = root, azure
        #: behaviour tokens for the next requests, one entry each, consumed
        self.script = []
        self.port = 0
        self.url = ""
        #: one dict per request received, appended before the reply
        self.requests = []
        #: one dict per reply that delivered usage (see module docstring)
        self.reported = []
        #: Bedrock SigV4: access key id -> secret access key the fake
        #: checks signatures with (a signed request with another id fails)
        self.aws_credentials = {}
        #: TCP connections accepted so far (not cleared by reset())
        self.connections_opened = 0
        #: TCP connections currently open
        self.open_connections = 0
        #: set to let ``stall`` streams go on
        self.resume = threading.Event()
        self._cond = threading.Condition()
        self._stopping = threading.Event()
        #: ``held`` calls wait for this (release(); reset() clears it)
        self.released = threading.Event()
        self._sockets = set()
        self._seq = 0
        self._server = None
        self._thread = None

    def __repr__(self):
        return f"<FakeUpstream {self.url or 'stopped'}>"

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc_info):
        self.stop()

    def start(self):
        """Bind an ephemeral port and serve in a daemon thread."""
        if self._server is not None:
            return self
        self._stopping.clear()
        self._server = _Server((self.host, 0), self)
        self.port = self._server.server_address[1]
        host = f"[{self.host}]" if ":" in self.host else self.host
        self.url = f"http://{host}:{self.port}"
        if self.tls is not None:  # handshakes happen as connections are accepted
            self._server.socket = self.tls.wrap_socket(self._server.socket,
                                                       server_side=True)
            self.url = f"https://localhost:{self.port}"
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(POLL_S,),
            name=f"fake-upstream-{self.port}", daemon=True)
        self._thread.start()
        return self

    def stop(self):
        """Stop serving, close every open connection; bounded in time."""
        server, self._server = self._server, None
        if server is None:
            return
        self._stopping.set()        # wakes slow/hang/drip loops
        self.released.set()
        server.shutdown()
        server.server_close()
        with self._cond:
            sockets = list(self._sockets)
        for sock in sockets:        # wakes idle keep-alive handlers
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._thread.join(timeout=2)
        deadline = time.monotonic() + 2
        with self._cond:
            while self.open_connections and time.monotonic() < deadline:
                self._cond.wait(POLL_S)

    def reset(self):
        """Forget recorded requests and usage (counters are kept)."""
        with self._cond:
            self.requests.clear()
            self.reported.clear()
        self.released.clear()

    def release(self):
        """Let every ``held`` call answer, now and from now on."""
        self.released.set()

    def wait_for_requests(self, n, timeout=5.0):
        """Wait until at least ``n`` requests were recorded; True if so."""
        with self._cond:
            return self._cond.wait_for(lambda: len(self.requests) >= n,
                                       timeout)

    # ---- called from handler threads -------------------------------------

    def _next_faults(self):
        with self._cond:
            scripted = self.script.pop(0) if self.script else ""
        return "%s %s" % (self.faults, scripted)

    def _connection_opened(self, sock):
        with self._cond:
            self.connections_opened += 1
            self.open_connections += 1
            self._sockets.add(sock)
            return self.connections_opened

    def _connection_closed(self, sock):
        with self._cond:
            if sock in self._sockets:
                self._sockets.discard(sock)
                self.open_connections -= 1
            self._cond.notify_all()

    def _record(self, call, connection_id):
        with self._cond:
            self._seq += 1
            call.seq = self._seq
            call.request_id = f"req_{self._seq}"
            call.request_index = len(self.requests)
            self.requests.append({
                "method": call.method, "path": call.raw_path,
                "headers": dict(call.headers),
                "header_list": list(call.header_list),
                "body": call.body, "json": call.json,
                "connection_id": connection_id,
                "aws_signature": call.aws_signature,
                "request_id": call.request_id, "gzipped": call.gzipped,
                "deployment": call.deployment})
            self._cond.notify_all()

    def _report(self, call, usage, complete):
        with self._cond:
            self.reported.append({
                "path": call.path, "model": call.model, "stream": call.stream,
                "usage": copy.deepcopy(usage),
                "request_index": call.request_index,
                "request_id": call.request_id, "complete": complete})
            self._cond.notify_all()



# ==== Scripted upstream =====================================================

class ScriptedUpstream:
    """A provider whose answers the test writes byte for byte.

    ``script`` is either a callable, ``script(handler, body)``, run for
    every request (its body already read) to write raw bytes to
    ``handler.wfile``; or a list of ``(response, close)`` pairs answered in
    turn, ``response`` being bytes or a list of byte parts sent as separate
    segments, and ``close`` closing the connection after it (as does the
    last answer of the list). ``idle_timeout`` closes a keep-alive
    connection that stays idle that long, as providers and their load
    balancers do. ``requests`` records (client address, request head and
    body bytes) pairs; ``closed`` counts the connections it has closed."""

    def __init__(self, script, idle_timeout=None):
        upstream = self
        self.requests = []
        self.closed = 0
        self._lock = threading.Lock()
        if not callable(script):
            script = self._answer_in_turn(list(script))

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            timeout = idle_timeout

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                head = "".join("%s: %s\r\n" % header for header in self.headers.items())
                head = ("%s\r\n%s\r\n" % (self.requestline, head)).encode("latin-1")
                with upstream._lock:
                    upstream.requests.append((self.client_address, head + body))
                script(self, body)

            def log_message(self, *args):
                pass

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def shutdown_request(self, request):
                super().shutdown_request(request)
                with upstream._lock:
                    upstream.closed += 1

        self.server = Server(("127.0.0.1", 0), Handler)
        self.server.handle_error = lambda request, address: None  # the gateway may hang up on us
        self.url = "http://127.0.0.1:%d" % self.server.server_address[1]
        self._thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()

    @staticmethod
    def _answer_in_turn(responses):
        lock = threading.Lock()

        def script(handler, body):
            with lock:
                if not responses:
                    handler.close_connection = True
                    return
                response, close = responses.pop(0)
                last = not responses
            for index, part in enumerate(response if isinstance(response, list) else [response]):
                if index:
                    time.sleep(0.1)  # a separate segment, after the client read the first
                handler.wfile.write(part)
            handler.close_connection = close or last
        return script

    def close(self):
        self.server.shutdown()
        self.server.server_close()


# ==== CONNECT proxy =========================================================

class ConnectProxy:
    """An HTTP proxy that serves CONNECT tunnels only, as an HTTPS proxy
    does: ``tunnels`` records (target, Proxy-Authorization or None) of
    each CONNECT; with ``credentials`` ("user:password") a CONNECT without
    them is answered 407. Bytes are relayed both ways until either side
    closes."""

    def __init__(self, credentials=None):
        self.credentials = credentials
        self.tunnels = []
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.url = "http://127.0.0.1:%d" % self._listener.getsockname()[1]
        self._sockets = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            self._sockets.append(client)
            threading.Thread(target=self._tunnel, args=(client,), daemon=True).start()

    def _tunnel(self, client):
        head = b""
        while b"\r\n\r\n" not in head and len(head) < 65536:
            data = client.recv(4096)
            if not data:
                return client.close()
            head += data
        head, _, rest = head.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        method, target = lines[0].split(" ")[:2]
        fields = {name.strip().lower(): value.strip() for name, _, value in
                  (line.partition(":") for line in lines[1:])}
        authorization = fields.get("proxy-authorization")
        self.tunnels.append((target, authorization))
        expected = "Basic " + base64.b64encode(
            (self.credentials or "").encode()).decode()
        if method != "CONNECT" or (self.credentials and authorization != expected):
            client.sendall(b"HTTP/1.1 407 Proxy Authentication Required\r\n"
                           b"Proxy-Authenticate: Basic realm=\"fake\"\r\n"
                           b"Content-Length: 0\r\nConnection: close\r\n\r\n")
            return client.close()
        host, _, port = target.rpartition(":")
        try:
            upstream = socket.create_connection((host.strip("[]"), int(port)), 5)
        except OSError:
            client.sendall(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n")
            return client.close()
        self._sockets.append(upstream)
        client.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
        if rest:
            upstream.sendall(rest)
        peers = {client: upstream, upstream: client}
        try:
            while True:
                readable, _, _ = select.select(list(peers), [], [], 30)
                if not readable:
                    break
                for sock in readable:
                    data = sock.recv(65536)
                    if not data:
                        return
                    peers[sock].sendall(data)
        except OSError:
            pass
        finally:
            client.close()
            upstream.close()

    def close(self):
        self._listener.close()
        for sock in self._sockets:
            try:
                sock.close()
            except OSError:
                pass
