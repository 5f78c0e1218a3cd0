#!/usr/bin/env python3
"""llmgw: a self-hosted LLM API gateway in one file.

Teams point their OpenAI or Anthropic SDK at llmgw with a per-project *virtual
key*. llmgw checks the key, forwards the call to the provider with the real
provider key, relays the answer (streamed or not) and records exactly what the
project used and what it cost. It needs the Python standard library and PyYAML.

The request path, in one sentence: parse -> authenticate -> route -> check
the key's policy -> rate limit -> write a pending usage row (reserving the
worst-case cost against the key's budget) -> forward -> relay -> settle the
usage row (committed before the reply's last bytes leave) -> access log.

Sections, each calling only the ones above it (``grep -n '^# ====' llmgw.py``):

1. Constants and errors   -- defaults, the ``GatewayError`` tree.
2. Config                 -- ``load_config``: config.yaml, validated, frozen.
3. Storage                -- ``Store``: SQLite schema, keys, usage rows, stats.
4. Pricing and usage      -- ``Usage``, usage normalisation, ``PriceTable``.
5. Providers              -- ``Provider``: pooled upstream connections, waits as ``ProviderWait``.
6. Rate limiting          -- ``KeyLimits``: RPM, TPM, requests in flight, per key.
7. Routing                -- ``Router``: deployments (provider keys), plans, cooldowns.
8. Streams                -- per-API stream meters and error events.
9. Administration         -- one function per action, for the CLI and the admin API.
10. Gateway               -- ``Gateway.handle(request) -> Reply``: the product.
11. HTTP connections      -- one-shot readiness queue, worker pool, parked calls, ``Exchange``.
12. Server lifecycle      -- ``GatewayServer``, ``make_server``, ``serve``.

Copyright (c) 2026 the llmgw authors. MIT licence: see the LICENSE file; a
vendored copy of this file keeps this notice.
"""

import base64
import collections
import csv
import dataclasses
import datetime
import decimal
import email.utils
import errno
import fnmatch
import hashlib
import heapq
import hmac
import html
import http.client
import http.server
import io
import ipaddress
import itertools
import json
import logging
import math
import os
import random
import re
import secrets
import select
import shlex
import signal
import socket
import sqlite3
import ssl
import stat
import struct
import subprocess
import sys
import threading
import time
import urllib.parse
import zlib
from typing import Dict, Optional, Tuple

try:
    import yaml
except ImportError:  # pragma: no cover - only a vendored copy without PyYAML
    yaml = None

__version__ = "0.1.0"
#: The library's names: serving, and everything cli.py uses (tests check
#: that cli.py reaches for nothing else).
__all__ = [
    "Config", "ConfigError", "Gateway", "GatewayError", "GatewayServer",
    "PriceTable", "Usage", "load_config", "load_database_config", "make_server", "parse_config", "serve",
    # storage: the interface, its two backends, the one the config names, a copy between them
    "Store", "SQLiteStore", "PostgresStore", "open_store", "copy_database",
    # files, settings, secrets
    "ADMIN_TOKEN_ENV", "ADMIN_TOKEN_SETTING", "CONFIG_TEMPLATE", "METRICS_TOKEN_ENV", "check_installation",
    "check_number", "check_provider_key", "config_path_from_env", "db_path_from_env", "issue_admin_token",
    "issue_metrics_token", "mask_secret", "resolve_provider_key", "write_private_file",
    # deployments (several keys per provider)
    "DEFAULT_DEPLOYMENT", "DEPLOYMENT_NAME", "list_deployments",
    # administration (section 9)
    "create_virtual_key", "get_key", "update_key", "revoke_key", "rotate_key", "topup_key", "usage_stats",
    "request_log", "request_log_entry", "reprice_usage", "csv_text", "policy_from_text", "price_rows",
    "LOG_FILTERS", "LOG_PAGE_LIMIT", "BODY_LOG_BYTES",
    # input and output
    "iso_time", "number_in_text", "parse_duration", "parse_price_pack", "parse_time_bound",
]

# ==== 1. Constants and errors ===============================================

logger = logging.getLogger("llmgw")
access_logger = logging.getLogger("llmgw.access")
logger.addHandler(logging.NullHandler())

DEFAULT_CONFIG_PATH = "config.yaml"
DEFAULT_DB_PATH = "gateway.db"
ADMIN_TOKEN_ENV = "LLMGW_ADMIN_TOKEN"
METRICS_TOKEN_ENV = "LLMGW_METRICS_TOKEN"

#: Prefix of every virtual key secret, so secret scanners can spot leaked ones.
VIRTUAL_KEY_PREFIX = "llmgw-"
ADMIN_TOKEN_PREFIX = "llmgw-admin-"
METRICS_TOKEN_PREFIX = "llmgw-metrics-"
DEFAULT_ANTHROPIC_VERSION = "2023-06-01"

OPENAI = "openai"          # an API dialect: request, error and stream shapes
ANTHROPIC = "anthropic"
AZURE = "azure"            # a provider format: OpenAI's API at Azure OpenAI's URLs, keyed by api-key
#: Provider formats with Claude's Messages API on a cloud (model in the URL,
#: API version in the body, the cloud's own auth).
BEDROCK = "bedrock"
VERTEX = "vertex"
PROVIDER_FORMATS = (OPENAI, ANTHROPIC, AZURE, BEDROCK, VERTEX)

#: How an upstream attempt ended: a usage row's ``status``.
OUTCOME_PENDING = "pending"
OUTCOME_OK = "ok"
OUTCOME_UPSTREAM_ERROR = "upstream_error"          # the provider refused, failed or answered garbage
OUTCOME_TIMEOUT = "timeout"
OUTCOME_TRUNCATED = "upstream_truncated"           # a stream cut after the client saw output
OUTCOME_CLIENT_DISCONNECTED = "client_disconnected"
OUTCOME_INTERRUPTED = "interrupted"                # left pending by a process that died

#: Why an attempt was made: a usage row's ``attempt_kind``.
ATTEMPT_FIRST = "first"
ATTEMPT_RETRY = "retry"          # the same deployment again
ATTEMPT_FALLBACK = "fallback"    # another deployment or model

#: The deployment (provider key) a provider's single key is known by.
DEFAULT_DEPLOYMENT = "default"
#: Model names are short (fine-tuned ids run to about 70 characters); a
#: longer one would be copied into every log line and usage row it touches.
MAX_MODEL_CHARS = 256


class GatewayError(Exception):
    """An error the gateway answers with; status and code travel with it."""
    status = 500
    code = "internal_error"

    def __init__(self, message, code=None, headers=None, param=None):
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.headers = headers or []
        self.param = param  # the field of the client's input at fault, if one is


class BadRequestError(GatewayError):
    status, code = 400, "invalid_request"


class AuthenticationError(GatewayError):
    status, code = 401, "invalid_api_key"


class PermissionDeniedError(GatewayError):
    status, code = 403, "permission_denied"


class NotFoundError(GatewayError):
    status, code = 404, "not_found"


class MethodNotAllowedError(GatewayError):
    status, code = 405, "method_not_allowed"


class RequestTimeoutError(GatewayError):
    status, code = 408, "request_timeout"


class UpgradeRequiredError(GatewayError):
    status, code = 426, "websocket_not_supported"


class LengthRequiredError(GatewayError):
    status, code = 411, "length_required"


class PayloadTooLargeError(GatewayError):
    status, code = 413, "request_too_large"


class URITooLongError(GatewayError):
    status, code = 414, "uri_too_long"


class UnsupportedMediaTypeError(GatewayError):
    status, code = 415, "unsupported_media_type"


class RateLimitError(GatewayError):
    status, code = 429, "rate_limit_exceeded"


class BudgetExceededError(RateLimitError):
    """Over budget: retrying cannot help until the period resets, so the
    SDKs are told not to (they retry every other 429)."""
    code = "budget_exceeded"

    def __init__(self, message):
        super().__init__(message, headers=[("x-should-retry", "false")])


class HeaderTooLargeError(GatewayError):
    status, code = 431, "request_header_fields_too_large"


class UpstreamError(GatewayError):
    status, code = 502, "upstream_error"


class UpstreamCutError(UpstreamError):
    """The provider's stream broke: cut mid-event, cut short or oversized."""
    code = "upstream_truncated"


class ServiceUnavailableError(GatewayError):
    status, code = 503, "service_unavailable"


class UpstreamTimeoutError(GatewayError):
    status, code = 504, "upstream_timeout"


class HTTPVersionError(GatewayError):
    status, code = 505, "http_version_not_supported"


class ConfigError(GatewayError):
    """A bad config file or CLI input; raised at start-up and by the CLI."""


class ClientDisconnected(Exception):
    """The client went away before its answer was complete."""


#: The error "type" both APIs use for a status (Anthropic's list; OpenAI's
#: types are a subset of the same words).
ERROR_TYPES = {
    400: "invalid_request_error", 401: "authentication_error",
    403: "permission_error", 404: "not_found_error",
    405: "invalid_request_error", 408: "timeout_error",
    411: "invalid_request_error", 413: "request_too_large", 414: "invalid_request_error",
    415: "invalid_request_error", 426: "invalid_request_error", 429: "rate_limit_error",
    431: "invalid_request_error",
    502: "api_error", 503: "overloaded_error", 504: "timeout_error",
}


def error_body(exc, dialect):
    """The JSON error body for ``exc`` in the shape of the API called. On
    Anthropic paths a budget stop's code is its type: that API has no code."""
    error_type = ERROR_TYPES.get(exc.status, "api_error")
    if isinstance(exc, BudgetExceededError):
        error_type = exc.code if dialect == ANTHROPIC else error_type
    if dialect == ANTHROPIC:
        return {"type": "error", "error": {"type": error_type, "message": exc.message}}
    return {"error": {"message": exc.message, "type": error_type,
                      "param": exc.param, "code": exc.code}}


# ==== 2. Config =============================================================
#
# config.yaml holds settings only, never a secret written by a tool. A
# provider's key is looked up, in order, in: its ``api_key`` in config.yaml
# (a literal or ``${ENV_VAR}``), the database (``cli.py config set-key``), and
# the ``<NAME>_API_KEY`` environment variable.

CONFIG_TEMPLATE = """\
# llmgw configuration. Settings only: keep secrets out of this file.
# Provider keys: `python cli.py config set-key NAME KEY` (stored in the
# database), or the environment (OPENAI_API_KEY, ANTHROPIC_API_KEY, ...).
# Admin token: `python cli.py init` / `python cli.py admin-token`, or the
# LLMGW_ADMIN_TOKEN environment variable.
# Changes take effect when the gateway starts, or on SIGHUP (kill -HUP <pid>).

server:
  host: 0.0.0.0
  port: 8000
  # threads: 256                   # threads serving requests; a call waiting for its provider holds none
  # max_connections: 16384         # open client connections; beyond: 503 + Retry-After
  # max_in_flight: 10000           # calls at providers at once; beyond: 503 + Retry-After
  # queue_timeout: 5               # seconds a request may wait for a thread; then 503
  # max_memory_mb: 0               # resident memory of the process; beyond: new calls get 503 (0: no limit)
  # max_connections_per_address: 256  # open connections from one client address; beyond: 429
  # max_body_bytes: 10485760       # request body limit (10 MiB); beyond: 413
  # body_buffer_bytes: 268435456   # large bodies being received, in total (one key: a quarter); beyond: 503 / 429
  # max_header_bytes: 32768        # request line + headers; beyond: 431
  # max_header_fields: 100
  # max_request_line_bytes: 8192   # beyond: 414
  # header_timeout: 10             # seconds to send the request line and headers
  # body_timeout: 30               # seconds to send the body
  # keepalive_timeout: 30          # seconds an idle connection stays open
  # send_timeout: 30               # seconds a client may stall reading its answer
  # upstream_connect_timeout: 10   # seconds to connect to a provider
  # upstream_timeout: 600          # seconds for a provider's first byte
  # stream_idle_timeout: 300       # seconds between a provider's stream events
  # request_deadline: 3600         # seconds a whole proxied request may take
  # drain_timeout: 30              # seconds in-flight requests get at shutdown

providers:
  openai:
    base_url: https://api.openai.com
    # api_key: ${MY_OPENAI_KEY}    # optional; a literal or ${ENV_VAR}
    # api_keys: [${OPENAI_KEY_B}, {name: team-c, key: ${OPENAI_KEY_C}}]
                                   # more keys, each a deployment with its own cooldown
  anthropic:
    base_url: https://api.anthropic.com
    # models: ["claude-*"]         # also send OpenAI-format calls for these models
                                   # to Anthropic's OpenAI-compatible endpoint
  # An OpenAI-compatible provider needs only config (README: Provider recipes
  # for Gemini, OpenRouter, Groq, Together, DeepSeek, Mistral, Ollama, vLLM).
  # base_url is the one its docs give the OpenAI SDK, version path included:
  # gemini:
  #   base_url: https://generativelanguage.googleapis.com/v1beta/openai
  #   models: ["gemini-*"]                    # key: GEMINI_API_KEY or set-key
  # Claude on Amazon Bedrock (README: Claude on Amazon Bedrock):
  # bedrock:
  #   format: bedrock
  #   region: us-east-1              # else AWS_REGION
  #   models: ["claude-*"]
  #   model_ids: {claude-sonnet-4-5: us.anthropic.claude-sonnet-4-5-20250929-v1:0}
  #   # a Bedrock API key (set-key, AWS_BEARER_TOKEN_BEDROCK), else SigV4 with
  #   # AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN
  # Claude on Google Vertex AI (README: Claude on Google Vertex AI):
  # vertex:
  #   format: vertex
  #   project: my-project
  #   region: us-east5
  #   models: ["claude-*"]
  #   model_ids: {claude-sonnet-4-5: "claude-sonnet-4-5@20250929"}
  #   token_command: gcloud auth print-access-token   # else the GCE metadata server

database:                          # the file itself: DB_PATH (default gateway.db)
  synchronous: normal              # normal: commits survive a crash; full: also power loss
  # url: postgresql://llmgw@db.internal/llmgw   # PostgreSQL instead (pip install pg8000; see README)
  # password: ${LLMGW_DB_PASSWORD}             # or PGPASSWORD; never in the URL
  # pool_size: 10                              # PostgreSQL connections per process, at most
  # pool_timeout: 10                           # seconds a request waits for one, then 503

logging:
  level: INFO
  # file: llmgw.log
  # retention_days: 90             # prune request-log rows older than this; rollups stay
  # body_retention_days: 7        # prune bodies kept for keys with --log-bodies (64 KiB each way)

rate_limits:                       # requests per minute per virtual key, by tier
  default: 100
  premium: 1000

budgets:
  max_output_tokens: 32768         # worst-case output reserved for a budgeted call without max_tokens
  admission: strict                # strict: reserve the worst case, refuse a call it does not fit;
                                   # estimate: reserve body bytes/4 at the input price plus
                                   # min(max_tokens, typical_output_tokens) at the output price, admit
                                   # while any budget is left (spend may pass it: README, Budgets)
  typical_output_tokens: 4096      # estimate: output reserved per call, at most
                                   # (a key may differ: python cli.py keys update ID --admission estimate)

# alerts:                          # budget threshold alerts, POSTed as JSON
#   webhook_url: https://hooks.example.com/llmgw   # signed when LLMGW_ALERT_SECRET is set
#   thresholds: [50, 80, 100]      # percent of each budgeted key's period allowance, once per period

pricing: {}                        # USD per million tokens; overrides built-in prices
#  gpt-4o: {input: 2.5, output: 10, cached_input: 1.25, cache_write: 0}
#  my-long-model:                   # a prompt past above_tokens (input + cache reads + writes) is
#    input: 3                       # charged at long_context's prices: the whole request, or with
#    output: 15                     # charge: excess only the prompt tokens past the threshold
#    long_context: {above_tokens: 200000, charge: whole, input: 6, output: 22.5}
#  my-local-model: {input: 0, output: 0}
#  default: {input: 10, output: 30}   # any model without a price of its own

models: {}                         # aliases: a client names the alias, the gateway picks a target
#  fast: [openai/gpt-4o-mini, anthropic/claude-haiku-4-5]
#  smart: [{target: anthropic/claude-opus-4-5, weight: 3}, {target: openai/gpt-5}]

# routing:                         # retries and fallbacks before the client sees any output
#   retries: 1                     # more attempts on the same deployment after a retry_on failure
#   retry_on: [connect, timeout, 429, 500, 502, 503, 504, 529]
#   fallback_on: [401, 403]        # move to the next deployment at once (the key is cooled down)
#   backoff_initial: 0.5           # seconds before the first retry; doubles, with jitter
#   backoff_max: 10                # longest wait; a longer Retry-After moves on instead
#   deadline: 60                   # seconds after which no new attempt starts
#   first_byte_timeout: 30         # a stream's answer not begun by then is a timeout, while another
#                                  # attempt could still start (else server.upstream_timeout holds)
#   cooldown: 5                    # seconds a failing deployment is skipped; doubles on repeats
#   cooldown_max: 300
#   affinity: key                  # key: virtual key + session; session: only with a session; none
#   affinity_ttl: 3600
"""


@dataclasses.dataclass(frozen=True)
class ServerConfig:
    host: str = "0.0.0.0"
    port: int = 8000
    threads: int = 256                  # threads serving requests (parked calls hold none)
    max_connections: int = 16384
    max_connections_per_address: int = 256   # one client's share of max_connections
    max_in_flight: int = 10000          # proxied calls between their pending and settled rows
    queue_timeout: float = 5.0          # a whole request waiting for a worker
    max_memory_mb: int = 0              # resident memory beyond which new calls are refused; 0: no limit
    max_body_bytes: int = 10 * 1024 * 1024
    body_buffer_bytes: int = 256 * 1024 * 1024  # large bodies being received at once; one key: a quarter
    max_header_bytes: int = 32 * 1024
    max_header_fields: int = 100
    max_request_line_bytes: int = 8 * 1024
    header_timeout: float = 10.0        # request line and headers, from their first byte
    body_timeout: float = 30.0
    keepalive_timeout: float = 30.0     # an idle connection between requests
    send_timeout: float = 30.0          # a client that stops reading its answer
    upstream_connect_timeout: float = 10.0
    upstream_timeout: float = 600.0     # a provider's first byte
    stream_idle_timeout: float = 300.0  # between a provider's stream events
    request_deadline: float = 3600.0    # a whole proxied request
    drain_timeout: float = 30.0         # in-flight requests at shutdown


@dataclasses.dataclass(frozen=True)
class BudgetsConfig:
    #: Worst-case output for a budgeted call that sets no max_tokens.
    max_output_tokens: int = 32768
    #: What a budgeted call reserves (BUDGET_ADMISSIONS): ``strict``, its
    #: worst case, admitted only if that fits; ``estimate``, a typical cost,
    #: admitted while any budget is left.
    admission: str = "strict"
    #: ``estimate``: the output reserved, at most (less if max_tokens is less).
    typical_output_tokens: int = 4096


@dataclasses.dataclass(frozen=True)
class DatabaseConfig:
    synchronous: str = "normal"         # normal: survives a crash; full: also power loss (SQLite)
    url: Optional[str] = None           # postgresql://USER@HOST:PORT/DB[?sslmode=...]: PostgreSQL, not the file
    password: Optional[str] = None      # PostgreSQL's password: a ${ENV_VAR} reference (else PGPASSWORD)
    pool_size: int = 10                 # PostgreSQL connections per process, at most
    pool_timeout: float = 10.0          # seconds a request waits for one of them, then 503


@dataclasses.dataclass(frozen=True)
class LoggingConfig:
    level: str = "INFO"
    file: Optional[str] = None
    retention_days: Optional[int] = None  # raw usage rows older than this are pruned; rollups stay
    body_retention_days: int = 7          # kept bodies (keys with log_bodies) older than this are pruned


@dataclasses.dataclass(frozen=True)
class AlertsConfig:
    webhook_url: Optional[str] = None   # None: no alerts
    thresholds: Tuple[int, ...] = (50, 80, 100)  # percent of a key's budget period allowance
    timeout: float = 10.0               # seconds per delivery attempt
    attempts: int = 6                   # deliveries tried before one is given up
    retry_backoff: float = 2.0          # seconds before the first retry; doubled for each
    allow_link_local: bool = False


@dataclasses.dataclass(frozen=True)
class ProviderConfig:
    name: str
    base_url: Optional[str]             # None: the cloud's endpoint in ``region`` (bedrock, vertex)
    format: str = OPENAI                # PROVIDER_FORMATS
    api_key: Optional[str] = None
    models: Tuple[str, ...] = ()
    allow_link_local: bool = False      # 169.254.0.0/16, fe80::/10, cloud metadata
    api_keys: Tuple[Tuple[str, str], ...] = ()  # (deployment name, ${ENV} reference)
    api_version: Optional[str] = None   # Azure: the classic API's api-version; None: the v1 API
    azure_deployments: Dict[str, str] = dataclasses.field(default_factory=dict)  # Azure: model -> its deployment
    region: Optional[str] = None        # bedrock (else AWS_REGION) and vertex
    model_ids: Dict[str, str] = dataclasses.field(default_factory=dict)  # model name -> the cloud's id
    aws_access_key_id: Optional[str] = None      # bedrock SigV4: ${ENV} references (else the
    aws_secret_access_key: Optional[str] = None  # standard AWS_* variables)
    aws_session_token: Optional[str] = None
    project: Optional[str] = None       # vertex: the Google Cloud project
    token_command: Tuple[str, ...] = ()  # vertex: prints an access token (else the metadata server)
    token_timeout: float = 10.0         # vertex: seconds token_command or the metadata server may take
    proxy: Optional[str] = None         # http://host:port (or ${ENV}) to tunnel through; none: no proxy;
                                        # None: HTTPS_PROXY for https base URLs (NO_PROXY respected)
    ca_bundle: Optional[str] = None     # PEM file of the CAs that sign the provider's certificate
    client_cert: Optional[str] = None   # PEM certificate (and key) the gateway presents (mutual TLS)
    client_key: Optional[str] = None
    tls_verify: bool = True             # false: certificates unchecked (logged as a warning at every start)
    anthropic_betas: Optional[Tuple[str, ...]] = None  # anthropic-beta values sent; None: the format's default
    body_fields: Optional[Tuple[str, ...]] = None      # top-level body fields sent; None: the format's default


#: What may make the gateway try an attempt again: a provider's HTTP status,
#: or a connection that failed (``connect``) or went quiet (``timeout``).
RETRY_TRIGGER_WORDS = ("connect", "timeout")
AFFINITY_MODES = ("key", "session", "none")


@dataclasses.dataclass(frozen=True)
class RoutingConfig:
    retries: int = 1                    # more attempts on the same deployment
    retry_on: Tuple[object, ...] = ("connect", "timeout", 429, 500, 502, 503, 504, 529)
    fallback_on: Tuple[object, ...] = (401, 403)
    backoff_initial: float = 0.5
    backoff_max: float = 10.0
    deadline: float = 60.0              # no attempt starts later than this after the request came
    first_byte_timeout: float = 30.0    # a streamed attempt's wait for its answer to begin, if another may follow
    cooldown: float = 5.0
    cooldown_max: float = 300.0
    affinity: str = "key"
    affinity_ttl: float = 3600.0


@dataclasses.dataclass(frozen=True)
class AliasTarget:
    model: str                          # provider/model, or a model name routed as any other
    weight: int = 1


@dataclasses.dataclass(frozen=True)
class Config:
    server: ServerConfig = ServerConfig()
    providers: Dict[str, ProviderConfig] = dataclasses.field(default_factory=dict)
    database: DatabaseConfig = DatabaseConfig()
    budgets: BudgetsConfig = BudgetsConfig()
    logging: LoggingConfig = LoggingConfig()
    rate_limits: Dict[str, int] = dataclasses.field(
        default_factory=lambda: {"default": 100, "premium": 1000})
    pricing: Dict[str, dict] = dataclasses.field(default_factory=dict)
    alerts: AlertsConfig = AlertsConfig()
    routing: RoutingConfig = RoutingConfig()
    models: Dict[str, Tuple[AliasTarget, ...]] = dataclasses.field(default_factory=dict)
    path: Optional[str] = None


_SECTIONS = ("server", "providers", "database", "budgets", "logging", "rate_limits", "pricing", "alerts", "routing",
             "models")
_PROVIDER_KEYS = ("base_url", "api_key", "api_keys", "format", "models", "allow_link_local", "api_version",
                  "deployments", "anthropic_betas", "body_fields", "proxy", "ca_bundle", "client_cert", "client_key",
                  "tls_verify")
#: Azure OpenAI's keys: its classic API's version, and its deployments' names.
_AZURE_KEYS = ("api_version", "deployments")
_AZURE_API_VERSION = re.compile(r"\d{4}-\d{2}-\d{2}(-preview)?\Z")
_AZURE_DEPLOYMENT = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\Z")
#: ``proxy`` set to this: no proxy, whatever HTTPS_PROXY says.
NO_PROXY_SETTING = "none"
#: ``anthropic_betas`` / ``body_fields`` set to this: pass everything on.
ALLOW_ALL = "all"
#: The keys only a cloud format takes.
_CLOUD_KEYS = {BEDROCK: ("region", "model_ids", "aws_access_key_id", "aws_secret_access_key", "aws_session_token"),
               VERTEX: ("region", "model_ids", "project", "token_command", "token_timeout")}
_CLOUD_NAME = re.compile(r"[a-z0-9][a-z0-9-]{0,62}\Z")  # a region or project id
#: A deployment's (provider key's) name: shown in usage rows, headers and the CLI.
DEPLOYMENT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\Z")
PRICE_FIELDS = ("input", "output", "cached_input", "cache_write", "cache_write_1h")
#: A long-context tier: PRICE_FIELDS and these (``charge`` defaults to whole).
LONG_CONTEXT_FIELDS = ("above_tokens", "charge")
LONG_CONTEXT_CHARGES = ("whole", "excess")
BUDGET_ADMISSIONS = ("strict", "estimate")
_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
_ENV_REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}\Z")
_PROVIDER_NAME = re.compile(r"[a-z][a-z0-9_-]{0,31}\Z")
#: The largest requests or tokens per minute, or requests in flight, a limit may name.
MAX_RATE = 10 ** 12
#: The dearest price a token may have, in USD per million tokens ($1 a token):
#: with it, a billion tokens still cost less than SQLite's largest integer in nano-dollars.
MAX_PRICE_USD_PER_MTOK = 10 ** 6
#: (lowest, highest) of a server, budgets or rate-limit setting, by type: C
#: sizes, and timeouts that fit select's milliseconds and the OS's time_t.
_SETTING_RANGES = {int: (1, 2 ** 31 - 1), float: (0.001, 10 ** 6)}
#: Settings with a range of their own; a retention past 100 years would
#: reach before year 1.
_SETTING_RANGE_OF = {"server.port": (0, 65535), "database.pool_size": (1, 1000), "logging.retention_days": (1, 36600),
                     "logging.body_retention_days": (1, 36600), "routing.retries": (0, 10),
                     "server.max_memory_mb": (0, 1 << 24)}


def config_path_from_env(environ=os.environ):
    return environ.get("CONFIG_PATH") or DEFAULT_CONFIG_PATH


def db_path_from_env(environ=os.environ):
    return environ.get("DB_PATH") or DEFAULT_DB_PATH


def load_config(path=None):
    """Read and validate config.yaml. Raises ConfigError naming the problem."""
    path = path or config_path_from_env()
    return parse_config(_read_config_document(path), path)


def load_database_config(path=None):
    """Only config.yaml's ``database`` section (the defaults when there is
    no file): what the CLI needs to open the store, so a mistake elsewhere
    in the file never locks the operator out of the CLI."""
    path = path or config_path_from_env()
    if not os.path.exists(path):
        return DatabaseConfig()
    document = _read_config_document(path)
    return _parse_database(document.get("database") if isinstance(document, dict) else None)


def _read_config_document(path):
    if yaml is None:
        raise ConfigError("PyYAML is required to read %s: pip install -r requirements.txt" % path)
    try:
        with open(path, encoding="utf-8") as f:
            document = yaml.safe_load(f)
    except FileNotFoundError:
        raise ConfigError("config file %s not found (run: python cli.py init)" % path) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError("cannot read %s: %s" % (path, exc)) from None
    except yaml.YAMLError as exc:
        raise ConfigError("%s is not valid YAML: %s" % (path, str(exc).splitlines()[0])) from None
    except (ValueError, RecursionError) as exc:  # an integer of over 4300 digits; nesting too deep
        raise ConfigError("%s: a value PyYAML cannot read: %s" % (path, str(exc).splitlines()[0])) from None
    return document if document is not None else {}


def parse_config(document, path=None):
    """Build a Config from a parsed YAML document, validating every value."""
    _expect(document, dict, "config")
    for section in document:
        if section not in _SECTIONS:
            raise ConfigError("unknown section %s (known: %s)" % (shown(section), ", ".join(_SECTIONS)))
    server = _parse_dataclass(ServerConfig, document.get("server"), "server")
    check_text(server.host, "server.host", max_length=253, blank_ok=True)  # "" listens on every address
    if server.body_buffer_bytes < server.max_body_bytes:
        raise ConfigError("server.body_buffer_bytes: must be at least server.max_body_bytes")
    database = _parse_database(document.get("database"))
    budgets = _parse_budgets(document.get("budgets"))
    log = _parse_dataclass(LoggingConfig, document.get("logging"), "logging")
    if log.level.upper() not in _LOG_LEVELS:
        raise ConfigError("logging.level: %r is not one of %s" % (log.level, ", ".join(_LOG_LEVELS)))
    providers = _parse_providers(document.get("providers"))
    rate_limits = _parse_rate_limits(document.get("rate_limits"))
    alerts = _parse_alerts(document.get("alerts"))
    pricing = _parse_pricing(document.get("pricing"), "pricing")
    routing = _parse_routing(document.get("routing"))
    models = _parse_aliases(document.get("models"), providers)
    return Config(server=server, providers=providers, database=database, budgets=budgets, logging=log, alerts=alerts,
                  rate_limits=rate_limits, pricing=pricing, routing=routing, models=models, path=path)


def shown(value, limit=60):
    """``repr(value)`` cut to ``limit`` characters, for an error message
    (an integer too long for ``repr`` is described instead)."""
    try:
        text = repr(value)
    except ValueError:
        return "an integer of %d bits" % value.bit_length()
    return text if len(text) <= limit else text[:limit - 3] + "..."


def number_in_text(text):
    """The number ``text`` spells (an int, else a float), else ``text``
    itself: typed input for check_number, which names the field."""
    for convert in (int, float):
        try:
            return convert(text)
        except ValueError:  # also an integer of over 4300 digits
            pass
    return text


def check_number(value, name, low, high, integer=False, error=ConfigError):
    """``value`` if it is a number (an integer with ``integer``; never a
    bool) from ``low`` to ``high``; else ``error`` naming ``name`` and the
    range. The comparison is exact, so a huge integer cannot overflow a
    float, and NaN and the infinities fail it."""
    if (isinstance(value, bool) or not isinstance(value, int if integer else (int, float))
            or not low <= value <= high):
        raise error("%s: expected %s from %s to %s, got %s" % (
            name, "an integer" if integer else "a number", low, high, shown(value)), param=name)
    return value


def check_text(value, name, max_length=200, blank_ok=False, error=ConfigError):
    """``value`` if it is a string of at most ``max_length`` characters, not
    blank unless ``blank_ok``, without control characters or lone
    surrogates (which SQLite refuses)."""
    if (not isinstance(value, str) or not (blank_ok or value.strip()) or len(value) > max_length
            or any(ord(ch) < 0x20 or ord(ch) == 0x7F or 0xD800 <= ord(ch) <= 0xDFFF for ch in value)):
        raise error("%s: expected %stext of at most %d printable characters, got %s"
                    % (name, "" if blank_ok else "non-blank ", max_length, shown(value)), param=name)
    return value


def parse_thresholds(values, name, error=ConfigError):
    """Budget alert thresholds, percentages of a period's allowance from 1
    to 1000: a non-empty list, returned sorted without repeats."""
    if not isinstance(values, list) or not values:
        raise error("%s: expected a list of percentages from 1 to 1000, got %s" % (name, shown(values)), param=name)
    return tuple(sorted(set(check_number(value, name + "[]", 1, 1000, integer=True, error=error) for value in values)))


def _expect(value, kind, where):
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        names = {dict: "a mapping", list: "a list", str: "a string", bool: "true or false"}
        raise ConfigError("%s: expected %s, got %s" % (where, names.get(kind, kind.__name__), shown(value)))
    return value


#: libpq's sslmode values that pg8000 can honour. ``allow`` (plain text,
#: TLS only if the server insists) it cannot: pg8000 tries TLS first or
#: never, so ``allow`` is refused rather than quietly made ``prefer``.
_SSLMODES = ("disable", "prefer", "require", "verify-ca", "verify-full")
#: database.url's query parameters, as libpq names them.
_URL_PARAMETERS = ("sslmode", "sslrootcert")


def _url_parameters(url):
    """The query parameters of a split database.url, the last of each name."""
    return {name: values[-1] for name, values in urllib.parse.parse_qs(url.query).items()}


def _parse_database(section):
    database = _parse_dataclass(DatabaseConfig, section, "database")
    if database.synchronous not in ("normal", "full"):
        raise ConfigError("database.synchronous: %r is not normal or full" % database.synchronous)
    if database.url is not None:
        _check_postgres_url(database)
    return database


def _check_postgres_url(database):
    """``database.url`` must be a PostgreSQL URL without a password
    (config.yaml is tracked in git: the password comes from
    ``database.password: ${ENV}`` or PGPASSWORD)."""
    try:
        url = urllib.parse.urlsplit(database.url)
        url.port  # noqa: B018 - raises ValueError for a port out of range
    except ValueError as exc:
        raise ConfigError("database.url: not a URL: %s" % exc) from None
    if url.scheme not in ("postgresql", "postgres"):
        raise ConfigError("database.url: %s is not a postgresql:// URL (SQLite needs no url: DB_PATH names its file)"
                          % shown(url.scheme))
    if url.password is not None:
        raise ConfigError("database.url: holds a password; keep it out of config.yaml "
                          "(database.password: ${ENV_VAR}, or PGPASSWORD)")
    if database.password is not None and not _ENV_REFERENCE.match(database.password):
        raise ConfigError("database.password: expected a ${ENV_VAR} reference (secrets stay out of config.yaml)")
    parameters = _url_parameters(url)
    unknown = sorted(set(parameters) - set(_URL_PARAMETERS))
    if unknown:
        raise ConfigError("database.url: unknown parameter %s (known: %s)"
                          % (shown(unknown[0]), ", ".join(_URL_PARAMETERS)))
    sslmode = parameters.get("sslmode", "prefer")
    if sslmode == "allow":
        raise ConfigError("database.url: sslmode allow (plain text, TLS only if the server insists) is not possible "
                          "with pg8000: use prefer (TLS if the server offers it), require, verify-ca, verify-full "
                          "or disable")
    if sslmode not in _SSLMODES:
        raise ConfigError("database.url: sslmode %s is not one of %s" % (shown(sslmode), ", ".join(_SSLMODES)))
    if "sslrootcert" in parameters and sslmode not in ("require", "verify-ca", "verify-full"):
        raise ConfigError("database.url: sslrootcert needs sslmode require, verify-ca or verify-full (%s checks "
                          "no certificate)" % sslmode)


def _parse_dataclass(cls, section, where):
    """Fill ``cls`` from a mapping whose keys must be ``cls`` fields."""
    if section is None:
        return cls()
    _expect(section, dict, where)
    values = {}
    types = {f.name: f.type for f in dataclasses.fields(cls)}
    for key, value in section.items():
        if key not in types:
            raise ConfigError("%s: unknown key %r (known: %s)" % (where, key, ", ".join(types)))
        kind, name = types[key], "%s.%s" % (where, key)
        if kind in (Optional[str], Optional[int]):
            if value is None:
                values[key] = None
                continue
            kind = kind.__args__[0]
        if kind in (int, float):
            low, high = _SETTING_RANGE_OF.get(name, _SETTING_RANGES[kind])
            values[key] = kind(check_number(value, name, low, high, integer=kind is int))
        else:
            values[key] = _expect(value, kind, name)
    return cls(**values)


def _parse_providers(section):
    if section is None:
        section = {"openai": {"base_url": "https://api.openai.com"},
                   "anthropic": {"base_url": "https://api.anthropic.com"}}
    _expect(section, dict, "providers")
    providers = {}
    for name, entry in section.items():
        if not isinstance(name, str) or not _PROVIDER_NAME.match(name):
            raise ConfigError("providers: %r is not a provider name (lowercase letters, digits, - and _)" % (name,))
        where = "providers.%s" % name
        _expect(entry, dict, where)
        api_format = entry.get("format")
        if api_format is None:
            api_format = ANTHROPIC if name == "anthropic" else OPENAI
        if api_format not in PROVIDER_FORMATS:
            raise ConfigError("%s.format: %s is not one of %s"
                              % (where, shown(api_format), ", ".join(PROVIDER_FORMATS)))
        known = _PROVIDER_KEYS + _CLOUD_KEYS.get(api_format, ())
        for key in entry:
            if key not in known:
                raise ConfigError("%s: unknown key %r (known for format %s: %s)"
                                  % (where, key, api_format, ", ".join(known)))
        cloud = _parse_cloud(entry, api_format, where)
        if entry.get("base_url") is None and api_format in _CLOUD_KEYS:
            base_url = None  # the cloud's endpoint in the region
        elif not entry.get("base_url"):
            raise ConfigError("%s.base_url: missing" % where)
        else:
            base_url = _check_base_url(_expect(entry["base_url"], str, where + ".base_url"), where + ".base_url")
        api_key = entry.get("api_key")
        if api_key is not None:
            if not isinstance(api_key, str):  # never echo a key, even a mistyped one
                raise ConfigError("%s.api_key: expected a string (quote the key)" % where)
            if not _ENV_REFERENCE.match(api_key):
                check_provider_key(name, api_key)
        models = entry.get("models")
        models = tuple(_expect(glob, str, where + ".models[]")
                       for glob in ([] if models is None else _expect(models, list, where + ".models")))
        allow_link_local = _expect(entry.get("allow_link_local", False), bool, where + ".allow_link_local")
        host = urllib.parse.urlsplit(base_url).hostname if base_url else None
        if host and not allow_link_local and is_link_local(host):
            raise ConfigError("%s.base_url: %s is a link-local or cloud-metadata address; set "
                              "allow_link_local: true if that is really the provider" % (where, host))
        api_keys = _parse_api_keys(entry.get("api_keys"), where + ".api_keys")
        allowlists = {key: _parse_allowlist(entry[key], "%s.%s" % (where, key))
                      for key in ("anthropic_betas", "body_fields") if entry.get(key) is not None}
        providers[name] = ProviderConfig(name, base_url, api_format, api_key, models, allow_link_local, api_keys,
                                         *_parse_azure(entry, api_format, base_url, where), **cloud,
                                         **allowlists, **_parse_transport(entry, where))
    return providers


def _parse_azure(entry, api_format, base_url, where):
    """(api_version, deployments) of an Azure OpenAI provider: both go into
    its URLs, so both are checked to the letter; its base URL has Azure's
    path (a host alone would mean /v1, which Azure does not serve)."""
    if api_format != AZURE:
        for key in _AZURE_KEYS:
            if key in entry:
                raise ConfigError("%s.%s: only for format: azure" % (where, key))
        return None, {}
    if not urllib.parse.urlsplit(base_url).path:
        raise ConfigError("%s.base_url: give Azure's path too: https://RESOURCE.openai.azure.com/openai "
                          "(with api_version), or .../openai/v1 (the v1 API)" % where)
    api_version = entry.get("api_version")
    if api_version is not None and not (isinstance(api_version, str) and _AZURE_API_VERSION.match(api_version)):
        raise ConfigError("%s.api_version: %s is not an Azure API version such as \"2024-10-21\" (quote it)"
                          % (where, shown(api_version)))
    deployments = _expect({} if entry.get("deployments") is None else entry["deployments"], dict,
                          where + ".deployments")
    for model, deployment in deployments.items():
        if not isinstance(model, str) or not isinstance(deployment, str) or not _AZURE_DEPLOYMENT.match(deployment):
            raise ConfigError("%s.deployments: %s: %s is not a model name and a deployment name (letters, digits, "
                              ". _ -)" % (where, shown(model), shown(deployment)))
    return api_version, dict(deployments)


def _parse_transport(entry, where):
    """How a provider is reached: ``proxy`` (an http:// URL without
    credentials, a ${ENV} reference, or none), ``ca_bundle``,
    ``client_cert``, ``client_key`` (file paths) and ``tls_verify``."""
    transport = {}
    proxy = entry.get("proxy")
    if proxy is not None:
        _expect(proxy, str, where + ".proxy")
        if proxy != NO_PROXY_SETTING and not _ENV_REFERENCE.match(proxy):
            parts = urllib.parse.urlsplit(proxy)
            if parts.scheme != "http" or not parts.hostname or parts.username or parts.password:
                raise ConfigError("%s.proxy: expected http://host:port (credentials only through a ${ENV_VAR} "
                                  "reference), none, or a ${ENV_VAR} reference" % where)
        transport["proxy"] = proxy
    for key in ("ca_bundle", "client_cert", "client_key"):
        if entry.get(key) is not None:
            transport[key] = check_text(entry[key], "%s.%s" % (where, key), max_length=4096)
    if "client_key" in transport and "client_cert" not in transport:
        raise ConfigError("%s.client_key: needs client_cert" % where)
    if "tls_verify" in entry:
        transport["tls_verify"] = _expect(entry["tls_verify"], bool, where + ".tls_verify")
    return transport


def _parse_allowlist(value, where):
    """``anthropic_betas`` or ``body_fields``: a list of names, or ``all``
    (kept as ``(ALLOW_ALL,)``: nothing is dropped)."""
    if value == ALLOW_ALL:
        return (ALLOW_ALL,)
    names = _expect(value, list, where + " (a list of names, or all)")
    for name in names:
        check_text(name, where + "[]", max_length=MAX_MODEL_CHARS)
    return tuple(names)


def _parse_cloud(entry, api_format, where):
    """A cloud format's own keys (``_CLOUD_KEYS``), as ProviderConfig fields:
    credentials only as ``${ENV}`` references, model ids as a mapping."""
    cloud = {}
    for key in _CLOUD_KEYS.get(api_format, ()):
        value = entry.get(key)
        if value is None:
            continue
        if key in ("region", "project"):
            if not isinstance(value, str) or not _CLOUD_NAME.match(value):
                raise ConfigError("%s.%s: %s is not a region or project id (lowercase letters, digits, -)"
                                  % (where, key, shown(value)))
        elif key == "model_ids":
            for model, model_id in _expect(value, dict, where + ".model_ids").items():
                check_text(model, where + ".model_ids: a model name", max_length=MAX_MODEL_CHARS)
                check_text(model_id, "%s.model_ids.%s" % (where, model), max_length=MAX_MODEL_CHARS)
            value = dict(value)
        elif key == "token_command":
            words = shlex.split(value) if isinstance(value, str) else value
            if not isinstance(words, list) or not words or not all(isinstance(word, str) for word in words):
                raise ConfigError("%s.token_command: expected a command (text or a list of words)" % where)
            value = tuple(words)
        elif key == "token_timeout":
            value = float(check_number(value, where + ".token_timeout", 0.001, 600))
        elif not isinstance(value, str) or not _ENV_REFERENCE.match(value):  # never echo a credential
            raise ConfigError("%s.%s: expected a ${ENV_VAR} reference (credentials stay out of config.yaml)"
                              % (where, key))
        cloud[key] = value
    if api_format == VERTEX:
        for key in ("region", "project"):
            if key not in cloud:
                raise ConfigError("%s.%s: missing (Vertex AI needs its project and region)" % (where, key))
    if api_format == BEDROCK and ("aws_access_key_id" in cloud) != ("aws_secret_access_key" in cloud):
        raise ConfigError("%s: aws_access_key_id and aws_secret_access_key go together" % where)
    return cloud


def _parse_api_keys(section, where):
    """More keys for one provider, each a deployment: ``${ENV}`` references
    (named after the variable) or ``{name: NAME, key: ${ENV}}``. Literal
    keys are refused here: config.yaml is tracked in git."""
    keys = []
    for index, entry in enumerate(_expect(section or [], list, where)):
        item = "%s[%d]" % (where, index)
        if isinstance(entry, dict):
            unknown = set(entry) - {"name", "key"}
            if unknown:
                raise ConfigError("%s: unknown key %r (known: name, key)" % (item, sorted(unknown)[0]))
            name = _expect(entry.get("name"), str, item + ".name")
            reference = entry.get("key")
        else:
            name, reference = None, entry
        if not isinstance(reference, str) or not _ENV_REFERENCE.match(reference):
            raise ConfigError("%s: expected a ${ENV_VAR} reference (keys stay out of config.yaml)" % item)
        name = name or _ENV_REFERENCE.match(reference).group(1).lower()
        if not DEPLOYMENT_NAME.match(name) or name == DEFAULT_DEPLOYMENT or name in dict(keys):
            raise ConfigError("%s: %r is not a new deployment name (letters, digits, . _ -; not %r)"
                              % (item, name, DEFAULT_DEPLOYMENT))
        keys.append((name, reference))
    return tuple(keys)


def _parse_routing(section):
    if section is None:
        return RoutingConfig()
    _expect(section, dict, "routing")
    triggers = {name: _parse_triggers(section[name], "routing." + name)
                for name in ("retry_on", "fallback_on") if name in section}
    plain = {name: value for name, value in section.items() if name not in triggers}
    routing = dataclasses.replace(_parse_dataclass(RoutingConfig, plain, "routing"), **triggers)
    if routing.affinity not in AFFINITY_MODES:
        raise ConfigError("routing.affinity: %r is not one of %s" % (routing.affinity, ", ".join(AFFINITY_MODES)))
    return routing


def _parse_triggers(value, where):
    triggers = []
    for item in _expect(value, list, where):
        if item in RETRY_TRIGGER_WORDS or (isinstance(item, int) and not isinstance(item, bool)
                                           and 400 <= item <= 599):
            triggers.append(item)
        else:
            raise ConfigError("%s: %r is not an HTTP status 400-599, connect or timeout" % (where, item))
    return tuple(triggers)


def _parse_aliases(section, providers):
    """``models:``: alias -> targets, each ``provider/model`` (or a model
    name routed as any other) with an optional weight."""
    aliases = {}
    for alias, targets in _expect({} if section is None else section, dict, "models").items():
        where = "models.%s" % alias
        if not isinstance(alias, str) or not alias or "/" in alias:
            raise ConfigError("models: %r is not an alias name (no /)" % (alias,))
        entries = []
        for index, target in enumerate(_expect(targets, list, where)):
            item = "%s[%d]" % (where, index)
            weight = 1
            if isinstance(target, dict):
                unknown = set(target) - {"target", "weight"}
                if unknown:
                    raise ConfigError("%s: unknown key %r (known: target, weight)" % (item, sorted(unknown)[0]))
                weight = _expect(target.get("weight", 1), int, item + ".weight")
                target = target.get("target")
            model = _expect(target, str, item + ".target")
            prefix = model.split("/", 1)[0] if "/" in model else None
            if prefix is not None and prefix not in providers:
                raise ConfigError("%s: %r names no configured provider" % (item, model))
            if model in section or not 1 <= weight <= 1000:
                raise ConfigError("%s: a target is a model (not an alias) with a weight from 1 to 1000" % item)
            entries.append(AliasTarget(model, weight))
        if not entries:
            raise ConfigError("%s: an alias needs at least one target" % where)
        aliases[alias] = tuple(entries)
    return aliases


_METADATA_ADDRESSES = frozenset((ipaddress.ip_address("fd00:ec2::254"),))


def is_link_local(host):
    """True for a literal link-local or cloud-metadata address (where SSRF
    attacks send provider keys); host names are checked when resolved."""
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    address = getattr(address, "ipv4_mapped", None) or address
    return address.is_link_local or address in _METADATA_ADDRESSES


def _check_base_url(url, where):
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError("%s: %r is not an http(s) URL with a host" % (where, url))
    if parts.username or parts.password or parts.query or parts.fragment:
        raise ConfigError("%s: credentials, query and fragment are not allowed" % where)
    try:
        parts.port
        parts.hostname.encode("idna")  # the Host field is written as http.client would
    except ValueError:  # UnicodeError included
        raise ConfigError("%s: bad host or port in %r" % (where, url)) from None
    return url.rstrip("/")


def _parse_alerts(section):
    """The budget alerts' webhook: its URL is checked like a provider's."""
    if section is None:
        return AlertsConfig()
    _expect(section, dict, "alerts")
    fields = dict(section)
    thresholds = fields.pop("thresholds", None)
    alerts = _parse_dataclass(AlertsConfig, fields, "alerts")
    if thresholds is not None:
        alerts = dataclasses.replace(alerts, thresholds=parse_thresholds(thresholds, "alerts.thresholds"))
    if alerts.webhook_url is not None:
        url = _check_base_url(alerts.webhook_url, "alerts.webhook_url")
        host = urllib.parse.urlsplit(url).hostname
        if not alerts.allow_link_local and is_link_local(host):
            raise ConfigError("alerts.webhook_url: %s is a link-local or cloud-metadata address; set "
                              "allow_link_local: true if that is really the receiver" % host)
        alerts = dataclasses.replace(alerts, webhook_url=url)
    for name in ("timeout", "attempts", "retry_backoff"):
        if getattr(alerts, name) <= 0:
            raise ConfigError("alerts.%s: must be positive" % name)
    return alerts


def _parse_budgets(section):
    """The budgets section. A key's own admission is in its policy
    (``keys create --admission``), not here."""
    budgets = _parse_dataclass(BudgetsConfig, section, "budgets")
    if budgets.admission not in BUDGET_ADMISSIONS:
        raise ConfigError("budgets.admission: %s is not one of %s" % (shown(budgets.admission),
                                                                      ", ".join(BUDGET_ADMISSIONS)))
    return budgets


def _parse_rate_limits(section):
    limits = {"default": 100, "premium": 1000}
    if section is None:
        return limits
    _expect(section, dict, "rate_limits")
    for tier, rpm in section.items():
        _expect(tier, str, "rate_limits")
        limits[tier] = check_number(rpm, "rate_limits.%s" % tier, 1, MAX_RATE, integer=True)
    return limits


def _parse_pricing(section, where):
    """Validate per-model prices (USD per million tokens) into plain dicts."""
    if section is None:
        return {}
    _expect(section, dict, where)
    prices = {}
    for model, entry in section.items():
        _expect(model, str, where)
        prices[model] = _parse_price_entry(entry, "%s.%s" % (where, model), PRICE_FIELDS + ("long_context",))
        if entry.get("long_context") is not None:
            prices[model]["long_context"] = _parse_price_entry(
                entry["long_context"], "%s.%s.long_context" % (where, model), PRICE_FIELDS + LONG_CONTEXT_FIELDS)
    return prices


def _parse_price_entry(entry, where, known):
    """One model's prices, or its long-context tier's (``known`` keys)."""
    _expect(entry, dict, where)
    for field in entry:
        if field not in known:
            raise ConfigError("%s: unknown key %r (known: %s)" % (where, field, ", ".join(known)))
    for field in ("input", "output") + (("above_tokens",) if "above_tokens" in known else ()):
        if entry.get(field) is None:
            raise ConfigError("%s.%s: missing" % (where, field))
    for field in PRICE_FIELDS:
        if entry.get(field) is not None:
            check_number(entry[field], "%s.%s" % (where, field), 0, MAX_PRICE_USD_PER_MTOK)
    if "above_tokens" in entry:
        check_number(entry["above_tokens"], where + ".above_tokens", 1, MAX_RATE, integer=True)
    if entry.get("charge", "whole") not in LONG_CONTEXT_CHARGES:
        raise ConfigError("%s.charge: %s is not one of %s" % (where, shown(entry["charge"]),
                                                             ", ".join(LONG_CONTEXT_CHARGES)))
    return dict(entry)


def check_provider_key(provider, key):
    """Refuse a key that would corrupt a header (and leak in an error message)."""
    if not key or not all(0x21 <= ord(ch) <= 0x7E for ch in key):
        raise ConfigError("the API key for provider %s is empty or has characters other than printable "
                          "ASCII (whitespace, control or non-ASCII characters)" % provider)
    return key


def resolve_provider_key(provider, stored_keys, environ=os.environ):
    """Return (key, source) for ``provider``, source being config, database,
    environment or None. Precedence: config.yaml, database, environment;
    a Bedrock provider without an API key has AwsCredentials for a key."""
    if provider.api_key is not None:
        reference = _ENV_REFERENCE.match(provider.api_key)
        if not reference:
            return provider.api_key, "config"
        value = environ.get(reference.group(1))
        if value:
            return check_provider_key(provider.name, value), "config"
    if provider.name in stored_keys:
        return check_provider_key(provider.name, stored_keys[provider.name]), "database"
    for variable in ("%s_API_KEY" % provider.name.upper().replace("-", "_"),
                     BEDROCK_API_KEY_ENV if provider.format == BEDROCK else None):
        value = environ.get(variable) if variable else None
        if value:
            return check_provider_key(provider.name, value), "environment"
    if provider.format == BEDROCK:
        return resolve_aws_credentials(provider, environ)
    if provider.format == VERTEX:  # fetched and refreshed by the provider
        source = GoogleTokenSource("token_command" if provider.token_command else "metadata server")
        return source, source.where
    return None, None


#: Where the AWS tools look for a Bedrock API key (a bearer token).
BEDROCK_API_KEY_ENV = "AWS_BEARER_TOKEN_BEDROCK"


class AwsCredentials(collections.namedtuple("AwsCredentials", "access_key_id secret_access_key session_token")):
    """A Bedrock deployment's key when it has no API key: what SigV4 signs with."""
    __slots__ = ()

    def secrets(self):
        return [value for value in (self.secret_access_key, self.session_token) if value]


class GoogleTokenSource(collections.namedtuple("GoogleTokenSource", "where")):
    """A Vertex deployment's key when it has none of its own: the OAuth
    access tokens its provider fetches (``where``: token_command or the
    metadata server), never stored."""
    __slots__ = ()

    def secrets(self):
        return []


def resolve_aws_credentials(provider, environ=os.environ):
    """(AwsCredentials, source) for a Bedrock provider: its ``aws_*``
    references in config.yaml, else the standard AWS_ACCESS_KEY_ID,
    AWS_SECRET_ACCESS_KEY and AWS_SESSION_TOKEN; (None, None) if unset."""
    if provider.aws_access_key_id is not None:
        values = [environ.get(_ENV_REFERENCE.match(reference).group(1)) if reference else None
                  for reference in (provider.aws_access_key_id, provider.aws_secret_access_key,
                                    provider.aws_session_token)]
        source = "config"
    else:
        values = [environ.get(name) for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")]
        source = "environment"
    if not (values[0] and values[1]):
        return None, None
    return AwsCredentials(*(check_provider_key(provider.name, value) if value else None for value in values)), source


def resolve_deployment_keys(provider, stored_keys, named_keys, environ=os.environ):
    """Every key of ``provider``, each a deployment: (name, key, source)
    triples, its default key (``resolve_provider_key``) first, then the
    config's ``api_keys`` whose variables are set, then keys stored with
    ``config set-key --name`` (``named_keys``: (provider, name, key)
    rows). Also returns the ConfigErrors of unusable keys, which are left out."""
    keys, problems = [], []
    try:
        key, source = resolve_provider_key(provider, stored_keys, environ)
        if key:
            keys.append((DEFAULT_DEPLOYMENT, key, source))
    except ConfigError as exc:
        problems.append(exc)
    candidates = [(name, environ.get(_ENV_REFERENCE.match(reference).group(1)), "config")
                  for name, reference in provider.api_keys]
    candidates += [(name, key, "database") for owner, name, key in named_keys if owner == provider.name]
    for name, key, source in candidates:
        if key and name not in [known[0] for known in keys]:
            try:
                keys.append((name, check_provider_key("%s/%s" % (provider.name, name), key), source))
            except ConfigError as exc:
                problems.append(exc)
    return keys, problems


def mask_secret(secret):
    """``sk-...cdef``: enough to recognise a key, not to use it (AWS
    credentials by their access key id)."""
    if isinstance(secret, AwsCredentials):
        return "SigV4 " + mask_secret(secret.access_key_id)
    if isinstance(secret, GoogleTokenSource):
        return "(tokens from the %s)" % secret.where
    if not secret:
        return ""
    head = secret[:3] if len(secret) > 12 else ""
    return "%s...%s" % (head, secret[-4:] if len(secret) > 8 else "")


def write_private_file(path, text):
    """Create ``path`` readable by its owner only (0600) and write ``text``."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.chmod(path, 0o600)


# ==== 3. Storage ============================================================
#
# One SQLite file holds virtual keys (hashes only), provider keys set with the
# CLI, the admin token's hash, imported prices and usage rows. It is shared by
# the CLI and any number of gateway processes: WAL, a busy timeout, short
# write transactions begun IMMEDIATE. Every change to keys or settings bumps
# a ``generation`` counter, which running gateways watch to drop their caches.

SCHEMA = """
CREATE TABLE IF NOT EXISTS virtual_keys (
    id            TEXT PRIMARY KEY,
    key_hash      TEXT NOT NULL UNIQUE,
    key_hint      TEXT NOT NULL,
    project_name  TEXT NOT NULL,
    tier          TEXT NOT NULL,
    rpm           INTEGER,
    is_active     INTEGER NOT NULL DEFAULT 1,
    created_at    REAL NOT NULL,
    revoked_at    REAL,
    tpm           INTEGER,
    max_parallel  INTEGER,
    max_budget_nanousd INTEGER,
    budget_period TEXT NOT NULL DEFAULT 'monthly',
    expires_at    REAL,
    models        TEXT,
    metadata      TEXT,
    previous_key_hash TEXT,
    previous_key_expires_at REAL,
    log_bodies    INTEGER NOT NULL DEFAULT 0,
    alert_thresholds TEXT,
    budget_admission TEXT
);
CREATE INDEX IF NOT EXISTS keys_by_previous_hash ON virtual_keys (previous_key_hash);
CREATE TABLE IF NOT EXISTS key_spend (
    key_id        TEXT NOT NULL,
    period_start  REAL NOT NULL,
    spent_nanousd INTEGER NOT NULL DEFAULT 0,
    reserved_nanousd INTEGER NOT NULL DEFAULT 0,
    topup_nanousd INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (key_id, period_start)
);
CREATE TABLE IF NOT EXISTS key_activity (
    key_id        TEXT NOT NULL,
    owner         TEXT NOT NULL,
    "window"      INTEGER NOT NULL,
    requests      INTEGER NOT NULL,
    tokens        INTEGER NOT NULL,
    previous_requests INTEGER NOT NULL,
    previous_tokens INTEGER NOT NULL,
    in_flight     INTEGER NOT NULL,
    updated_at    REAL NOT NULL,
    PRIMARY KEY (key_id, owner)
);
CREATE TABLE IF NOT EXISTS provider_keys (
    provider      TEXT PRIMARY KEY,
    api_key       TEXT NOT NULL,
    updated_at    REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS deployment_keys (
    provider      TEXT NOT NULL,
    name          TEXT NOT NULL,
    api_key       TEXT NOT NULL,
    updated_at    REAL NOT NULL,
    PRIMARY KEY (provider, name)
);
CREATE TABLE IF NOT EXISTS deployment_cooldowns (
    deployment    TEXT PRIMARY KEY,
    until         REAL NOT NULL,
    failures      INTEGER NOT NULL,
    reason        TEXT NOT NULL,
    updated_at    REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS settings (
    name          TEXT PRIMARY KEY,
    value         TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS audit_log (
    id            INTEGER PRIMARY KEY,
    at            REAL NOT NULL,
    actor         TEXT NOT NULL,
    action        TEXT NOT NULL,
    target        TEXT,
    detail        TEXT
);
CREATE TABLE IF NOT EXISTS prices (
    model          TEXT PRIMARY KEY,
    input          TEXT NOT NULL,
    output         TEXT NOT NULL,
    cached_input   TEXT,
    cache_write    TEXT,
    cache_write_1h TEXT,
    source         TEXT NOT NULL,
    imported_at    REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS usage (
    id                    INTEGER PRIMARY KEY,
    request_id            TEXT NOT NULL UNIQUE,
    virtual_key_id        TEXT NOT NULL,
    provider              TEXT NOT NULL,
    endpoint              TEXT NOT NULL,
    model                 TEXT,
    streamed              INTEGER NOT NULL,
    status                TEXT NOT NULL,
    http_status           INTEGER,
    usage_source          TEXT NOT NULL DEFAULT 'none',
    request_tokens        INTEGER NOT NULL DEFAULT 0,
    response_tokens       INTEGER NOT NULL DEFAULT 0,
    input_tokens          INTEGER NOT NULL DEFAULT 0,
    cache_read_tokens     INTEGER NOT NULL DEFAULT 0,
    cache_write_tokens    INTEGER NOT NULL DEFAULT 0,
    cache_write_1h_tokens INTEGER NOT NULL DEFAULT 0,
    output_tokens         INTEGER NOT NULL DEFAULT 0,
    reasoning_tokens      INTEGER NOT NULL DEFAULT 0,
    cost_nanousd          INTEGER NOT NULL DEFAULT 0,
    priced                INTEGER NOT NULL DEFAULT 1,
    started_at            REAL NOT NULL,
    finished_at           REAL,
    latency_ms            REAL,
    owner                 TEXT,
    reserved_nanousd      INTEGER NOT NULL DEFAULT 0,
    budget_period_start   REAL,
    first_byte_ms         REAL,
    overhead_ms           REAL,
    logical_request_id    TEXT,
    attempt               INTEGER NOT NULL DEFAULT 1,
    attempt_kind          TEXT NOT NULL DEFAULT 'first',
    deployment            TEXT,
    response_id           TEXT
);
CREATE INDEX IF NOT EXISTS usage_by_time ON usage (started_at);
CREATE INDEX IF NOT EXISTS usage_by_key ON usage (virtual_key_id, started_at);
CREATE INDEX IF NOT EXISTS usage_pending ON usage (owner) WHERE status = 'pending';
CREATE TABLE IF NOT EXISTS budget_alerts (
    id            INTEGER PRIMARY KEY,
    key_id        TEXT NOT NULL,
    period_start  REAL NOT NULL,
    threshold     INTEGER NOT NULL,
    payload       TEXT NOT NULL,
    created_at    REAL NOT NULL,
    attempts      INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL,
    delivered_at  REAL,
    UNIQUE (key_id, period_start, threshold)
);
CREATE INDEX IF NOT EXISTS budget_alerts_due ON budget_alerts (next_attempt_at) WHERE next_attempt_at IS NOT NULL;
CREATE TABLE IF NOT EXISTS usage_bodies (
    usage_id      INTEGER PRIMARY KEY,
    started_at    REAL NOT NULL,
    request       BLOB NOT NULL,
    request_bytes INTEGER NOT NULL,
    response      BLOB,
    response_bytes INTEGER
);
CREATE INDEX IF NOT EXISTS usage_bodies_by_time ON usage_bodies (started_at);
CREATE INDEX IF NOT EXISTS usage_by_response ON usage (response_id) WHERE response_id IS NOT NULL;
CREATE TABLE IF NOT EXISTS gateway_processes (
    owner         TEXT PRIMARY KEY,
    host          TEXT NOT NULL,
    pid           INTEGER NOT NULL,
    started_at    REAL NOT NULL,
    heartbeat_at  REAL NOT NULL
);
"""

#: A key's limits and budget: the columns ``keys create/update`` may set.
POLICY_COLUMNS = ("tier", "rpm", "tpm", "max_parallel", "max_budget_nanousd", "budget_period", "expires_at",
                  "models", "metadata", "log_bodies", "alert_thresholds", "budget_admission")
KEY_COLUMNS = ("id", "project_name", "is_active", "created_at", "revoked_at", "key_hint") + POLICY_COLUMNS
_KEY_SELECT = ", ".join(KEY_COLUMNS)
INSERT_KEY = "INSERT INTO virtual_keys (key_hash, %s) VALUES (?, %s)" % (
    _KEY_SELECT, ", ".join("?" * len(KEY_COLUMNS)))
LOOKUP_KEY = """SELECT %s, previous_key_hash = ?1, previous_key_expires_at FROM virtual_keys
                WHERE key_hash = ?1 OR previous_key_hash = ?1""" % _KEY_SELECT
GET_KEY = "SELECT %s FROM virtual_keys WHERE id = ?" % _KEY_SELECT
LIST_KEYS = ("SELECT %s, (SELECT MAX(started_at) FROM usage WHERE virtual_key_id = virtual_keys.id) "
             "FROM virtual_keys ORDER BY created_at, id" % _KEY_SELECT)
ROTATE_KEY = """UPDATE virtual_keys SET previous_key_hash = key_hash, previous_key_expires_at = ?,
                                        key_hash = ?, key_hint = ? WHERE id = ? AND is_active = 1"""
KEY_BUDGET = "SELECT max_budget_nanousd, budget_period FROM virtual_keys WHERE id = ?"
GET_SPEND = "SELECT spent_nanousd, reserved_nanousd, topup_nanousd FROM key_spend WHERE key_id = ? AND period_start = ?"
ENSURE_SPEND = """INSERT INTO key_spend (key_id, period_start, spent_nanousd) VALUES (?, ?, ?)
                  ON CONFLICT (key_id, period_start) DO NOTHING"""
#: Admission: reserve ?1 only if the period's spend, reservations and ?1 fit
#: the allowance (the key's budget ?4 plus top-ups), or, for an estimate
#: (?5 = 1), if anything is left. One conditional update: two processes
#: cannot both admit on what they read before the other's reservation.
RESERVE_SPEND = """UPDATE key_spend SET reserved_nanousd = reserved_nanousd + ?1
                   WHERE key_id = ?2 AND period_start = ?3
                     AND spent_nanousd + reserved_nanousd < ?4 + topup_nanousd
                     AND (?5 = 1 OR spent_nanousd + reserved_nanousd + ?1 <= ?4 + topup_nanousd)"""
SETTLE_SPEND = """UPDATE key_spend SET reserved_nanousd = reserved_nanousd - ?, spent_nanousd = spent_nanousd + ?
                  WHERE key_id = ? AND period_start = ?"""
TOPUP_SPEND = "UPDATE key_spend SET topup_nanousd = topup_nanousd + ? WHERE key_id = ? AND period_start = ?"
#: What a key's settled rows cost from a budget period's start, read from the
#: daily rollups: periods start at midnight UTC, and pruned rows stay counted.
SETTLED_COST = """SELECT COALESCE(SUM(cost_nanousd), 0) FROM usage_days
                  WHERE virtual_key_id = ?1 AND day >= ?2"""
#: A row's reservation counts while it is pending; its cost once settled
#: (``%s``: how the backend names the pending rows' index, if it must).
_PERIOD_COST = """SELECT (%s) + (SELECT COALESCE(SUM(reserved_nanousd), 0) FROM usage%%s
                      WHERE virtual_key_id = ?1 AND started_at >= ?2 AND status = 'pending')""" % SETTLED_COST
RECOUNT_SPEND = """INSERT INTO key_spend (key_id, period_start, spent_nanousd) VALUES (?1, ?2, ?3)
                   ON CONFLICT (key_id, period_start) DO UPDATE SET spent_nanousd = ?3"""
PUBLISH_ACTIVITY = """INSERT INTO key_activity (key_id, owner, "window", requests, tokens, previous_requests,
                                                previous_tokens, in_flight, updated_at)
                      VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)
                      ON CONFLICT (key_id, owner) DO UPDATE SET "window" = excluded."window",
                          requests = excluded.requests, tokens = excluded.tokens,
                          previous_requests = excluded.previous_requests,
                          previous_tokens = excluded.previous_tokens, in_flight = excluded.in_flight,
                          updated_at = excluded.updated_at"""
OTHERS_ACTIVITY = """SELECT key_id, "window", requests, tokens, previous_requests, previous_tokens, in_flight,
                            updated_at
                     FROM key_activity WHERE owner != ? AND updated_at >= ?"""
FORGET_ACTIVITY = "DELETE FROM key_activity WHERE updated_at < ?"
REVOKE_KEY = "UPDATE virtual_keys SET is_active = 0, revoked_at = ? WHERE id = ? AND is_active = 1"
KEY_EXISTS = "SELECT 1 FROM virtual_keys WHERE id = ?"
UPSERT_PROVIDER_KEY = """INSERT INTO provider_keys (provider, api_key, updated_at) VALUES (?, ?, ?)
                         ON CONFLICT (provider) DO UPDATE SET api_key = excluded.api_key,
                                                              updated_at = excluded.updated_at"""
ALL_PROVIDER_KEYS = "SELECT provider, api_key FROM provider_keys"
UPSERT_DEPLOYMENT_KEY = """INSERT INTO deployment_keys (provider, name, api_key, updated_at) VALUES (?, ?, ?, ?)
                           ON CONFLICT (provider, name) DO UPDATE SET api_key = excluded.api_key,
                                                                      updated_at = excluded.updated_at"""
ALL_DEPLOYMENT_KEYS = "SELECT provider, name, api_key FROM deployment_keys ORDER BY provider, name"
GET_COOLDOWN = "SELECT failures, updated_at FROM deployment_cooldowns WHERE deployment = ?"
PUT_COOLDOWN = """INSERT INTO deployment_cooldowns (deployment, until, failures, reason, updated_at)
                  VALUES (?, ?, ?, ?, ?)
                  ON CONFLICT (deployment) DO UPDATE SET until = excluded.until, failures = excluded.failures,
                      reason = excluded.reason, updated_at = excluded.updated_at"""
CLEAR_COOLDOWN = "DELETE FROM deployment_cooldowns WHERE deployment = ?"
ALL_COOLDOWNS = "SELECT deployment, until, failures, reason FROM deployment_cooldowns"
INSERT_AUDIT = "INSERT INTO audit_log (at, actor, action, target, detail) VALUES (?, ?, ?, ?, ?)"
RECENT_AUDIT = "SELECT at, actor, action, target, detail FROM audit_log ORDER BY id DESC LIMIT ?"
GET_SETTING = "SELECT value FROM settings WHERE name = ?"
PUT_SETTING = """INSERT INTO settings (name, value) VALUES (?, ?)
                 ON CONFLICT (name) DO UPDATE SET value = excluded.value"""
BUMP_GENERATION = """INSERT INTO settings (name, value) VALUES ('generation', '1')
                     ON CONFLICT (name) DO UPDATE SET value = CAST(CAST(settings.value AS INTEGER) + 1 AS TEXT)"""
_INSERT_USAGE = """INSERT INTO usage (request_id, virtual_key_id, provider, endpoint, model, streamed,
                                     status, started_at, owner, reserved_nanousd, budget_period_start,
                                     logical_request_id, attempt, attempt_kind, deployment)
                  VALUES (?, ?, ?, ?, ?, ?, 'pending', ?, ?, ?, ?, ?, ?, ?, ?)"""
USAGE_RESULT_COLUMNS = (
    "status", "http_status", "usage_source", "request_tokens", "response_tokens", "input_tokens",
    "cache_read_tokens", "cache_write_tokens", "cache_write_1h_tokens", "output_tokens",
    "reasoning_tokens", "cost_nanousd", "priced", "finished_at", "latency_ms", "first_byte_ms", "overhead_ms",
    "response_id")
#: Who made a response (the Responses API's id): its key, provider,
#: deployment and model, kept as long as its usage row (%s: SQLite's index hint).
_RESPONSE_ORIGIN = """SELECT virtual_key_id, provider, deployment, model FROM usage%s
                      WHERE response_id = ? ORDER BY id DESC LIMIT 1"""
#: Only a pending row is settled: one already marked interrupted was charged.
FINISH_USAGE = "UPDATE usage SET %s WHERE id = ? AND status = 'pending'" % ", ".join(
    "%s = ?" % c for c in USAGE_RESULT_COLUMNS)
UPSERT_PRICE = """INSERT INTO prices (model, input, output, cached_input, cache_write, cache_write_1h, source,
                                         imported_at)
                  VALUES (?, ?, ?, ?, ?, ?, ?, ?)
                  ON CONFLICT (model) DO UPDATE SET input = excluded.input, output = excluded.output,
                      cached_input = excluded.cached_input, cache_write = excluded.cache_write,
                      cache_write_1h = excluded.cache_write_1h, source = excluded.source,
                      imported_at = excluded.imported_at"""
ALL_PRICES = "SELECT model, input, output, cached_input, cache_write, cache_write_1h, source FROM prices"
USAGE_COSTS = """SELECT u.id, u.model, u.input_tokens, u.cache_read_tokens, u.cache_write_tokens,
                        u.cache_write_1h_tokens, u.output_tokens, u.cost_nanousd
                 FROM usage u LEFT JOIN virtual_keys k ON k.id = u.virtual_key_id"""
SET_COST = "UPDATE usage SET cost_nanousd = ?, priced = ? WHERE id = ?"
REGISTER_PROCESS = """INSERT INTO gateway_processes (owner, host, pid, started_at, heartbeat_at)
                      VALUES (?, ?, ?, ?, ?)
                      ON CONFLICT (owner) DO UPDATE SET host = excluded.host, pid = excluded.pid,
                          started_at = excluded.started_at, heartbeat_at = excluded.heartbeat_at"""
HEARTBEAT = "UPDATE gateway_processes SET heartbeat_at = ? WHERE owner = ?"
RETIRE_PROCESS = "DELETE FROM gateway_processes WHERE owner = ?"
PENDING_OWNERS = """SELECT DISTINCT u.owner, p.host, p.pid, p.heartbeat_at FROM usage u
                    LEFT JOIN gateway_processes p ON p.owner = u.owner WHERE u.status = 'pending'"""
_ABANDONED_ROWS = """SELECT id, virtual_key_id, reserved_nanousd, budget_period_start FROM usage
                    WHERE status = 'pending' AND owner %s ?"""
#: A reservation left by a dead process is charged in full: the provider may
#: have done the work, and a budget must never be overshot. Only a row still
#: pending: its owner may have settled it since the sweep read it (PostgreSQL
#: reads committed rows; SQLite's sweep holds the only write lock).
INTERRUPT_ROW = """UPDATE usage SET status = 'interrupted', finished_at = ?, cost_nanousd = reserved_nanousd,
                          usage_source = CASE WHEN reserved_nanousd > 0 THEN 'estimated' ELSE 'none' END,
                          reserved_nanousd = 0
                   WHERE id = ? AND status = 'pending'"""

# Hourly rollups: one row per (hour, key, model, provider, status) summing
# ROLLUP_MEASURES over the usage rows it covers. A row is rolled up in the
# transaction that settles it (or marks it interrupted, or re-prices it), so
# stats, charts and exports read a few thousand rollups instead of millions
# of rows, and agree with the rows to the nano-dollar by construction: the
# same expressions sum the raw rows at a range's ragged ends.

#: The proxied endpoints that cost nothing, as usage rows record them (a
#: path with an id as its template): their calls are ``other_calls``, apart
#: from the billable ``requests``, and never count against a key's requests
#: or tokens per minute (Claude Code's /context sends 14 count_tokens at once).
NON_BILLABLE_ENDPOINTS = ("/v1/messages/count_tokens", "/v1/models", "/v1/models/{model}", "/v1/moderations",
                          "/v1/responses/input_tokens", "/v1/responses/{response_id}",
                          "/v1/responses/{response_id}/cancel", "/v1/responses/{response_id}/input_items")
#: 1 for a row of one of them, else 0: compared in turn, as a list after IN
#: (of more than two values) costs SQLite a temporary index built each time
#: a statement runs, which was a third of what settling a row cost.
_NON_BILLABLE = "CASE endpoint %s ELSE 0 END" % " ".join("WHEN '%s' THEN 1" % path for path in NON_BILLABLE_ENDPOINTS)


def _counted(condition):
    """1 where ``condition`` holds, else 0 (a comparison is an integer in
    SQLite, a boolean in PostgreSQL)."""
    return "CASE WHEN %s THEN 1 ELSE 0 END" % condition


#: What a rollup sums: (column, expression over one usage row).
ROLLUP_MEASURES = (
    ("requests", _counted("attempt = 1 AND %s = 0" % _NON_BILLABLE)),  # billable calls clients asked for
    ("other_calls", _counted("attempt = 1 AND %s = 1" % _NON_BILLABLE)),  # the calls that cost nothing
    ("attempts", "1"),                     # upstream calls, retries and fallbacks included
    ("retries", _counted("attempt_kind = 'retry'")),
    ("fallbacks", _counted("attempt_kind = 'fallback'")),
    ("errors", _counted("status NOT IN ('ok', 'pending')")),
    ("request_tokens", "request_tokens"),
    ("response_tokens", "response_tokens"),
    ("input_tokens", "input_tokens"),
    ("output_tokens", "output_tokens"),
    ("cache_read_tokens", "cache_read_tokens"),
    ("cache_write_tokens", "cache_write_tokens + cache_write_1h_tokens"),
    ("reasoning_tokens", "reasoning_tokens"),
    ("cost_nanousd", "cost_nanousd"),
    ("unpriced_requests", _counted("priced = 0 AND request_tokens + response_tokens > 0")),
    ("estimated_usage_requests", _counted("usage_source = 'estimated'")),
    ("estimated_usage_cost_nanousd", "CASE WHEN usage_source = 'estimated' THEN cost_nanousd ELSE 0 END"),
    ("latency_us", "CAST(ROUND(COALESCE(latency_ms, 0) * 1000) AS BIGINT)"),
)
_MEASURE_NAMES = ", ".join(m for m, _ in ROLLUP_MEASURES)
#: Measures added to rollup tables that already held rows: ALTER TABLE
#: needs their default, so the tables made whole declare it too.
_ATTEMPT_MEASURES = ("attempts", "retries", "fallbacks")
_ADDED_MEASURES = _ATTEMPT_MEASURES + ("other_calls",)
_MEASURE_COLUMNS = "".join("    %s INTEGER NOT NULL%s,\n" % (m, " DEFAULT 0" if m in _ADDED_MEASURES else "")
                           for m, _ in ROLLUP_MEASURES)
#: Rollups by time, coarsest first: (table, time column, seconds per unit).
#: Days start at midnight UTC, as budget periods do. Weeks (seven whole
#: days from the epoch's Thursday) only shorten long ranges: a range of
#: weeks reads a seventh of the rows its days would be.
ROLLUP_LEVELS = (("usage_weeks", "week", 7 * 86400), ("usage_days", "day", 86400), ("usage_hours", "hour", 3600))
_KEY_MODEL = (("virtual_key_id", "virtual_key_id"), ("model", "COALESCE(model, '')"), ("provider", "provider"))
#: Whole seconds of an epoch time, truncated: SQLite's CAST truncates,
#: PostgreSQL's rounds.
SQLITE_WHOLE_SECONDS = "CAST(%s AS INTEGER)"
POSTGRES_WHOLE_SECONDS = "CAST(FLOOR(%s) AS BIGINT)"


def _rollup_tables(whole_seconds):
    """Each rollup table and what it is kept per: (column, a usage row's
    value). By time, per key, model and provider (a row's unit of time
    reckoned in integers, so a row and its rollup never disagree); all-time
    totals also per status, for /metrics."""
    return tuple(
        (table, ((column, "%s / %d * %d" % (whole_seconds % "started_at", size, size)),) + _KEY_MODEL)
        for table, column, size in ROLLUP_LEVELS) + (("usage_totals", _KEY_MODEL + (("status", "status"),)),)


_ROLLUP_TABLES = _rollup_tables(SQLITE_WHOLE_SECONDS)
#: The rollup tables, created with SCHEMA.
ROLLUP_SCHEMA = "".join("""
CREATE TABLE IF NOT EXISTS %s (
%s%s    PRIMARY KEY (%s)
) WITHOUT ROWID;""" % (table, "".join("    %s %s NOT NULL,\n" % (name, "INTEGER" if name in ("week", "day", "hour") else "TEXT")
                                     for name, _ in dimensions),
                       _MEASURE_COLUMNS, ", ".join(name for name, _ in dimensions))
    for table, dimensions in _ROLLUP_TABLES) + """
CREATE INDEX IF NOT EXISTS usage_days_by_key ON usage_days (virtual_key_id, day);
"""


def _roll_up(table, dimensions, select):
    """An upsert adding the measures ``select`` yields to ``table``'s rows."""
    names = ", ".join(name for name, _ in dimensions)
    return "INSERT INTO %s (%s, %s) %s ON CONFLICT (%s) DO UPDATE SET %s" % (
        table, names, _MEASURE_NAMES, select, names,
        ", ".join("%s = %s.%s + excluded.%s" % (m, table, m, m) for m, _ in ROLLUP_MEASURES))


def _roll_up_row_statements(whole_seconds):
    """Add (?1 = 1) or take back (?1 = -1) one usage row (?2) to every rollup."""
    return tuple(_roll_up(table, dimensions, "SELECT %s, %s FROM usage WHERE id = ?2" % (
        ", ".join(expression for _, expression in dimensions),
        ", ".join("?1 * (%s)" % expression for _, expression in ROLLUP_MEASURES)))
        for table, dimensions in _rollup_tables(whole_seconds))


#: Roll up every settled row (a SQLite migration step).
ROLL_UP_ALL = tuple(_roll_up(table, dimensions, "SELECT %s, %s FROM usage WHERE status != 'pending' GROUP BY %s" % (
    ", ".join(expression for _, expression in dimensions),
    ", ".join("SUM(%s)" % expression for _, expression in ROLLUP_MEASURES),
    ", ".join(str(number) for number in range(1, len(dimensions) + 1))))
    for table, dimensions in _ROLLUP_TABLES)


def roll_up_weeks_from_days(measures):
    """Fill usage_weeks from usage_days (a migration step), summing the
    ``measures`` the days table has at that step (the others 0)."""
    return _roll_up(*_ROLLUP_TABLES[0], "SELECT day / %d * %d, virtual_key_id, model, provider, %s "
                    "FROM usage_days GROUP BY 1, 2, 3, 4" % (
                        ROLLUP_LEVELS[0][2], ROLLUP_LEVELS[0][2],
                        ", ".join("SUM(%s)" % m if m in measures else "0" for m, _ in ROLLUP_MEASURES)))


#: Tokens by kind, as /metrics names them: (kind, rollup measure).
TOKEN_KINDS = (("input", "input_tokens"), ("cache_read", "cache_read_tokens"), ("cache_write", "cache_write_tokens"),
               ("output", "output_tokens"), ("reasoning", "reasoning_tokens"))
#: The all-time totals summed over statuses, per key, model and provider:
#: the key's project, its calls as "status count ..." (the dialect's string
#: aggregate goes in %s), errors, TOKEN_KINDS and cost.
_USAGE_TOTALS = """SELECT t.virtual_key_id, MAX(k.project_name), NULLIF(t.model, ''), t.provider, %%s, %s
                   FROM usage_totals t LEFT JOIN virtual_keys k ON k.id = t.virtual_key_id
                   GROUP BY t.virtual_key_id, t.model, t.provider""" % ", ".join(
    "SUM(t.%s)" % measure for measure in ("errors",) + tuple(column for _, column in TOKEN_KINDS) + ("cost_nanousd",))

#: A usage row's routing columns (schema 5): the attempt it records.
ATTEMPT_COLUMNS = (
    "ALTER TABLE usage ADD COLUMN logical_request_id TEXT",
    "ALTER TABLE usage ADD COLUMN attempt INTEGER NOT NULL DEFAULT 1",
    "ALTER TABLE usage ADD COLUMN attempt_kind TEXT NOT NULL DEFAULT 'first'",
    "ALTER TABLE usage ADD COLUMN deployment TEXT",
)


def attempt_counts(table):
    """Schema 5's step for a rollup table: the attempt counts, and every
    request before routing counted as its one attempt."""
    return tuple("ALTER TABLE %s ADD COLUMN %s INTEGER NOT NULL DEFAULT 0" % (table, m) for m in _ATTEMPT_MEASURES) + (
        "UPDATE %s SET attempts = requests WHERE attempts = 0" % table,)  # 0 only where just added


def other_calls_apart(table, dimensions):
    """Schema 9's step for a rollup table: the calls that cost nothing,
    counted among its requests until then, moved to other_calls (only where
    that column was just added: a table step 3 made whole counted them
    apart already). Every settled row is rolled up, so each group updates
    a rollup row that exists. (In SQL both backends run: a measure is an
    integer, compared where a condition is needed; the columns updated are
    named with their table.)"""
    names = ", ".join(name for name, _ in dimensions)
    moved = {"requests": "-COUNT(*)", "other_calls": "COUNT(*)"}
    return ("ALTER TABLE %s ADD COLUMN other_calls INTEGER NOT NULL DEFAULT 0" % table,
            "INSERT INTO %s (%s, %s) SELECT %s, %s FROM usage WHERE status != 'pending' AND %s = 1 GROUP BY %s "
            "ON CONFLICT (%s) DO UPDATE SET requests = %s.requests + excluded.requests, "
            "other_calls = excluded.other_calls WHERE %s.other_calls = 0" % (
                table, names, _MEASURE_NAMES, ", ".join(expression for _, expression in dimensions),
                ", ".join(moved.get(name, "0") for name, _ in ROLLUP_MEASURES), dict(ROLLUP_MEASURES)["other_calls"],
                ", ".join(str(number) for number in range(1, len(dimensions) + 1)), names, table, table))


#: Forward-only schema changes, by ``PRAGMA user_version``: MIGRATIONS[n - 2]
#: takes a database from version n - 1 to n. A database opened at an older
#: version gets SCHEMA's missing tables (created whole), then each later
#: step, then SCHEMA's indexes. A step holds what CREATE ... IF NOT EXISTS
#: cannot do: ``ALTER TABLE t ADD COLUMN c`` (skipped where the column
#: exists, as in a table just created whole), an index dropped to be made
#: anew, a backfill. To change the schema, edit SCHEMA and append one step
#: (``()`` if only tables or indexes were added); tests/test_operations.py
#: migrates a fixture database of every earlier version (tests/schemas/).
#: PostgreSQL databases began at version 5, so steps from 6 on run on both
#: backends: write them in SQL both accept (PostgreSQL's column types come
#: from _postgres_ddl), and give a differing statement a SQLiteSQL and a
#: PostgresSQL spelling.
MIGRATIONS = (
    # 2: every schema stamped 1 (it grew five times before versions were
    # counted: prices, audit log, spend control, process owners), then the
    # request log's latencies and the rollups of the rows so far.
    ("ALTER TABLE virtual_keys ADD COLUMN tpm INTEGER",
     "ALTER TABLE virtual_keys ADD COLUMN max_parallel INTEGER",
     "ALTER TABLE virtual_keys ADD COLUMN max_budget_nanousd INTEGER",
     "ALTER TABLE virtual_keys ADD COLUMN budget_period TEXT NOT NULL DEFAULT 'monthly'",
     "ALTER TABLE virtual_keys ADD COLUMN expires_at REAL",
     "ALTER TABLE virtual_keys ADD COLUMN models TEXT",
     "ALTER TABLE virtual_keys ADD COLUMN metadata TEXT",
     "ALTER TABLE virtual_keys ADD COLUMN previous_key_hash TEXT",
     "ALTER TABLE virtual_keys ADD COLUMN previous_key_expires_at REAL",
     "ALTER TABLE usage ADD COLUMN reserved_nanousd INTEGER NOT NULL DEFAULT 0",
     "ALTER TABLE usage ADD COLUMN budget_period_start REAL",
     "ALTER TABLE usage ADD COLUMN owner TEXT",  # usage.owner_pid stays, unused
     "DROP INDEX IF EXISTS usage_pending",  # it was on owner_pid
     "ALTER TABLE usage ADD COLUMN first_byte_ms REAL",
     "ALTER TABLE usage ADD COLUMN overhead_ms REAL"),
    # 3: rollups by day and by hour (no longer per status: errors are a
    # measure) and all-time totals, from the rows; schema 2's usage_hourly
    # goes (it lived an hour on main: no database of it was pruned). Today's
    # roll-up reads the attempt columns: every old row is its request's one
    # attempt.
    ("DROP TABLE IF EXISTS usage_hourly",) + ATTEMPT_COLUMNS + ROLL_UP_ALL,
    # 4: the budget alerts' outbox (a new table).
    (),
    # 5: routing. Usage rows record their attempt; rollups count attempts,
    # retries and fallbacks (before it, every row was one request).
    ATTEMPT_COLUMNS + tuple(statement for table, _ in _ROLLUP_TABLES for statement in attempt_counts(table)),
    # 6: keys that log their bodies (kept in the new usage_bodies) and keys
    # with budget alert thresholds of their own.
    ("ALTER TABLE virtual_keys ADD COLUMN log_bodies INTEGER NOT NULL DEFAULT 0",
     "ALTER TABLE virtual_keys ADD COLUMN alert_thresholds TEXT"),
    # 7: no index on usage.logical_request_id: nothing looked rows up by it,
    # and every request paid for its entry (a page more in each commit).
    ("DROP INDEX IF EXISTS usage_by_logical_request",),
    # 8: rollups by week, summed from the days (rows may have been pruned;
    # step 3 may just have rolled rows up into the new table too).
    ("DELETE FROM usage_weeks", roll_up_weeks_from_days([m for m, _ in ROLLUP_MEASURES if m != "other_calls"])),
    # 9: coding agents. Rollups count the calls that cost nothing apart
    # (other_calls); a usage row keeps the id of the response it made (a
    # retrieval goes to the same deployment); a key may have its own
    # budget admission. The weeks are summed again from the days.
    ("ALTER TABLE usage ADD COLUMN response_id TEXT",
     "ALTER TABLE virtual_keys ADD COLUMN budget_admission TEXT")
    + tuple(statement for table, dimensions in _ROLLUP_TABLES[1:] for statement in other_calls_apart(table, dimensions))
    + ("ALTER TABLE usage_weeks ADD COLUMN other_calls INTEGER NOT NULL DEFAULT 0", "DELETE FROM usage_weeks",
       roll_up_weeks_from_days([m for m, _ in ROLLUP_MEASURES])),
)
SCHEMA_VERSION = len(MIGRATIONS) + 1
_ADD_COLUMN = re.compile(r"ALTER TABLE (\w+) ADD COLUMN (\w+)")

_EPOCH_DAY = datetime.date(1970, 1, 1)
#: How ``stats`` may group rows: name -> (key columns, SQL expressions).
STATS_GROUPS = {
    "key": (("virtual_key_id", "project_name"), ("u.virtual_key_id", "k.project_name")),
    "project": (("project_name",), ("k.project_name",)),
    "model": (("model",), ("u.model",)),
    "provider": (("provider",), ("u.provider",)),
    "day": (("day",), ("u.at / 86400",)),  # days since the epoch, shown as dates
}
#: What stats sum by below the grouping: (column of a rollup table, of the
#: usage rows). Rollups keep a missing model as ''.
STATS_DIMENSIONS = {"virtual_key_id": ("virtual_key_id", "virtual_key_id"), "model": ("NULLIF(model, '')", "model"),
                    "provider": ("provider", "provider")}
STATS_TOTAL_FIELDS = ("requests", "other_calls", "attempts", "retries", "fallbacks", "errors", "request_tokens",
                      "response_tokens", "cache_read_tokens", "cache_write_tokens", "reasoning_tokens", "cost_nanousd",
                      "unpriced_requests", "estimated_usage_requests", "estimated_usage_cost_nanousd")

#: The request log: usage rows with their key's project and labels.
LOG_COLUMNS = ("id", "request_id", "started_at", "virtual_key_id", "project_name", "metadata", "endpoint",
               "provider", "model", "streamed", "status", "http_status", "usage_source", "request_tokens",
               "response_tokens", "input_tokens", "cache_read_tokens", "cache_write_tokens",
               "cache_write_1h_tokens", "output_tokens", "reasoning_tokens", "cost_nanousd", "priced",
               "latency_ms", "first_byte_ms", "overhead_ms", "logical_request_id", "attempt", "attempt_kind",
               "deployment")
LOG_PAGE = "SELECT %s FROM usage u LEFT JOIN virtual_keys k ON k.id = u.virtual_key_id" % ", ".join(
    ("k." if name in ("project_name", "metadata") else "u.") + name for name in LOG_COLUMNS)
#: How the log may be filtered: name -> condition on one value.
LOG_FILTERS = {"key": "u.virtual_key_id = ?", "project": "k.project_name = ?", "provider": "u.provider = ?",
               "model": "u.model = ?", "status": "u.status = ?", "since": "u.started_at >= ?",
               "until": "u.started_at < ?"}
_LOG_CURSOR = re.compile(r"^([0-9]{1,12}(?:\.[0-9]{1,20})?):([0-9]{1,19})\Z")
#: A budget alert, once per key, period and threshold; due until delivered or given up.
QUEUE_ALERT = """INSERT INTO budget_alerts (key_id, period_start, threshold, payload, created_at, next_attempt_at)
                 VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (key_id, period_start, threshold) DO NOTHING"""
DUE_ALERTS = "SELECT id, payload, attempts FROM budget_alerts WHERE next_attempt_at <= ? ORDER BY id LIMIT 20"
LEASE_ALERT = "UPDATE budget_alerts SET next_attempt_at = ? WHERE id = ?"
ALERT_TRIED = """UPDATE budget_alerts SET attempts = attempts + 1, next_attempt_at = ?,
                                         delivered_at = ? WHERE id = ?"""
PRUNE_USAGE = """DELETE FROM usage WHERE id IN (SELECT id FROM usage WHERE started_at < ? AND status != 'pending'
                                                LIMIT ?)"""
#: The bodies of a key that logs them (``log_bodies``), beside their usage
#: row: the first BODY_LOG_BYTES of the request and of the answer, and
#: their whole sizes.
BODY_LOG_BYTES = 64 * 1024
INSERT_BODIES = """INSERT INTO usage_bodies (usage_id, started_at, request, request_bytes, response, response_bytes)
                   SELECT id, started_at, ?, ?, ?, ? FROM usage WHERE id = ?"""
GET_BODIES = "SELECT request, request_bytes, response, response_bytes FROM usage_bodies WHERE usage_id = ?"
PRUNE_BODIES = """DELETE FROM usage_bodies WHERE usage_id IN (SELECT usage_id FROM usage_bodies WHERE started_at < ?
                                                              LIMIT ?)"""


ADMIN_TOKEN_SETTING = "admin_token_hash"
METRICS_TOKEN_SETTING = "metrics_token_hash"
BUDGETED_KEYS = "SELECT %s FROM virtual_keys WHERE max_budget_nanousd IS NOT NULL AND is_active = 1" % _KEY_SELECT


#: The largest integer either database stores (SQLite's INTEGER, PostgreSQL's BIGINT).
LARGEST_INTEGER = 2 ** 63 - 1


class StorageError(ServiceUnavailableError):
    code = "storage_unavailable"


def hash_secret(secret):
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def iso_time(epoch):
    """Epoch seconds as ISO 8601 UTC (``2026-11-27T03:49:49Z``), or None."""
    if epoch is None:
        return None
    moment = datetime.datetime.fromtimestamp(epoch, datetime.timezone.utc)
    return "%04d-%02d-%02dT%02d:%02d:%02dZ" % (moment.year, moment.month, moment.day, moment.hour,
                                                moment.minute, moment.second)


def _pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # alive, owned by someone else
        return True
    return True


def _process_gone(host, pid, heartbeat_at, now, stale_after):
    """Whether a registered gateway process is dead: on this host, its pid
    is gone (or is ours: a restarted container reuses pid 1); anywhere, its
    heartbeat is older than ``stale_after`` seconds."""
    if heartbeat_at is None:
        return True  # never registered
    if host == socket.gethostname() and (pid == os.getpid() or not _pid_alive(pid)):
        return True
    return now - heartbeat_at > stale_after


class _Ticket:
    __slots__ = ("operation", "changes_state", "result", "error", "done")

    def __init__(self, operation, changes_state):
        self.operation, self.changes_state = operation, changes_state
        self.result, self.error, self.done = None, None, False


class _GroupCommit:
    """Run write operations on one connection, many per transaction.

    A thread queues its operation, then takes the leader lock. If another
    leader already committed the operation, it is done; otherwise it commits
    everything queued so far in one ``BEGIN IMMEDIATE`` transaction. Alone,
    a request pays one commit; under load, concurrent requests share one.
    Each operation runs inside a savepoint, so one failing operation does not
    undo its neighbours.

    ``state_changes`` counts committed operations that changed what running
    gateways cache (keys, provider keys, prices, the admin token).
    """

    def __init__(self, conn):
        self._conn = conn
        self._leader = threading.Lock()
        self._queue_lock = threading.Lock()
        self._queue = []
        self.state_changes = 0

    def read(self, query):
        """Run ``query(connection)`` between commits."""
        with self._leader:
            try:
                return query(self._conn)
            except sqlite3.Error as exc:
                raise StorageError("the gateway's database is unavailable: %s" % exc) from None

    def run(self, operation, changes_state=False):
        ticket = _Ticket(operation, changes_state)
        with self._queue_lock:
            self._queue.append(ticket)
        with self._leader:
            if not ticket.done:
                with self._queue_lock:
                    batch, self._queue = self._queue, []
                self._commit(batch)
        if ticket.error is not None:
            raise ticket.error
        return ticket.result

    def _commit(self, batch):
        conn = self._conn
        savepoints = len(batch) > 1  # an operation alone is its own transaction
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                for ticket in batch:
                    if savepoints:
                        conn.execute("SAVEPOINT operation")
                    try:
                        ticket.result = ticket.operation(conn)
                    except Exception as exc:  # handed to the thread that asked
                        conn.execute("ROLLBACK TO operation" if savepoints else "ROLLBACK")
                        if isinstance(exc, sqlite3.Error):
                            logger.error("database write failed: %s", exc)
                            exc = StorageError("the gateway's database is unavailable")
                        ticket.error = exc
                    if savepoints:
                        conn.execute("RELEASE operation")
                if conn.in_transaction:
                    conn.execute("COMMIT")
                    if any(ticket.changes_state and ticket.error is None for ticket in batch):
                        self.state_changes += 1
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            logger.error("database write failed: %s", exc)
            for ticket in batch:
                ticket.error = StorageError("the gateway's database is unavailable")
        finally:
            for ticket in batch:
                ticket.done = True


class Store:
    """The gateway's database: keys, settings, usage rows, stats. One
    interface, two backends: SQLiteStore (the default: one file) and
    PostgresStore (``database.url``). The algorithms are written once, here:
    each write is an operation on a connection, run in a transaction of its
    own (``_write``, through the backend's ``_commits``); each read is one
    statement (``_read``, and ``_read_apart`` for a long one that must not
    hold up the hot path). A backend supplies ``_commits``, the two reads,
    its migrations, ``data_version`` and ``close``; its connections carry
    the statements it spells its own way as ``conn.sql`` (SQLiteSQL,
    PostgresSQL), and so does the store."""

    sql = None
    busy_timeout_s = 10.0

    def _read(self, sql, params=()):
        raise NotImplementedError

    def _read_apart(self, sql, params=()):
        raise NotImplementedError

    def data_version(self):
        """A cheap 'anything new?' the gateway asks before each request:
        changes when cached state (keys, settings, prices) may have."""
        raise NotImplementedError

    def close(self):
        raise NotImplementedError

    def generation(self):
        rows = self._read(GET_SETTING, ("generation",))
        return int(rows[0][0]) if rows else 0

    def find_key(self, key_hash):
        """The VirtualKey whose secret (or, within a rotation's grace, whose
        previous secret) hashes to ``key_hash``; None if there is none."""
        rows = self._read(LOOKUP_KEY, (key_hash,))
        if not rows:
            return None
        row = rows[0]
        key = VirtualKey.from_row(row[:len(KEY_COLUMNS)])
        if row[-2]:  # matched the previous secret
            key = dataclasses.replace(key, previous_secret_until=row[-1])
        return key

    def provider_keys(self):
        """Each provider's key set with ``config set-key`` (no --name)."""
        return dict(self._read(ALL_PROVIDER_KEYS))

    def deployment_keys(self):
        """Named keys set with ``config set-key --name``: [(provider, name, key)]."""
        return self._read(ALL_DEPLOYMENT_KEYS)

    def cooldowns(self):
        """Deployments some process saw failing: [(deployment, until, failures, reason)]."""
        return self._read(ALL_COOLDOWNS)

    def get_setting(self, name):
        rows = self._read(GET_SETTING, (name,))
        return rows[0][0] if rows else None

    # -- administrative writes ------------------------------------------------

    def _write(self, operation, changes_state=False):
        return self._commits.run(operation, changes_state)

    def create_key(self, project_name, policy, actor="cli"):
        """Create a virtual key with ``policy`` (POLICY_COLUMNS values).
        Returns (record, secret); the secret is shown once."""
        secret = VIRTUAL_KEY_PREFIX + secrets.token_urlsafe(32)
        key_id = "vk_" + secrets.token_hex(6)
        columns = dict(DEFAULT_POLICY, **policy)
        values = {"id": key_id, "project_name": project_name, "is_active": 1, "created_at": time.time(),
                  "revoked_at": None, "key_hint": _key_hint(secret)}
        values.update((name, _column_value(name, columns[name])) for name in POLICY_COLUMNS)

        def insert(conn):
            conn.execute(INSERT_KEY, (hash_secret(secret),) + tuple(values[name] for name in KEY_COLUMNS))
            conn.execute(BUMP_GENERATION)
            _audit(conn, actor, "key_created", key_id, "project=%s tier=%s" % (project_name, columns["tier"]))
        self._write(insert, changes_state=True)
        return self.get_key(key_id), secret

    def update_key(self, key_id, policy, now, actor="cli"):
        """Change some of a key's POLICY_COLUMNS. Returns False for an unknown key.

        A budget set on a key that has been spending starts from what the
        key already spent in the current period, so it cannot be dodged.
        """
        if not policy:
            raise BadRequestError("nothing to change")
        assignments = ", ".join("%s = ?" % name for name in policy)
        values = tuple(_column_value(name, value) for name, value in policy.items())

        def update(conn):
            if conn.execute("UPDATE virtual_keys SET %s WHERE id = ?" % assignments, values + (key_id,)).rowcount == 0:
                return False
            budget, period = conn.execute(KEY_BUDGET, (key_id,)).fetchone()
            if budget is not None:
                start = budget_period_bounds(now, period)[0]
                if "max_budget_nanousd" in policy or "budget_period" in policy:
                    # Spend while the key had no budget (or another period) was not tracked: recount it.
                    conn.execute(RECOUNT_SPEND, (key_id, start, conn.execute(SETTLED_COST, (key_id, start)).fetchone()[0]))
                else:
                    _period_spend(conn, key_id, start)
            conn.execute(BUMP_GENERATION)
            _audit(conn, actor, "key_updated", key_id, ", ".join(sorted(policy)))
            return True
        return self._write(update, changes_state=True)

    def rotate_key(self, key_id, grace_seconds, now, actor="cli"):
        """Give a key a new secret; the old one works ``grace_seconds`` more.
        Returns the new secret, or None for an unknown or revoked key."""
        secret = VIRTUAL_KEY_PREFIX + secrets.token_urlsafe(32)

        def rotate(conn):
            if not conn.execute(ROTATE_KEY, (now + grace_seconds, hash_secret(secret), _key_hint(secret),
                                             key_id)).rowcount:
                return None
            conn.execute(BUMP_GENERATION)
            _audit(conn, actor, "key_rotated", key_id, "grace=%ds" % grace_seconds)
            return secret
        return self._write(rotate, changes_state=True)

    def topup(self, key_id, amount_nanousd, now, actor="cli"):
        """Add to the current period's allowance (for ``never``: the balance).
        Returns False for an unknown key or one without a budget."""
        def topup(conn):
            row = conn.execute(KEY_BUDGET, (key_id,)).fetchone()
            if row is None or row[0] is None:
                return False
            start = budget_period_bounds(now, row[1])[0]
            _period_spend(conn, key_id, start)
            conn.execute(TOPUP_SPEND, (amount_nanousd, key_id, start))
            _audit(conn, actor, "key_topped_up", key_id, "usd=%s" % nanousd_to_usd(amount_nanousd))
            return True
        return self._write(topup)

    def key_spend(self, key, now):
        """Spend of ``key`` (a VirtualKey) in its current budget period."""
        start, end = budget_period_bounds(now, key.budget_period)
        rows = self._read(GET_SPEND, (key.id, start))
        if rows:
            spent, reserved, topup = rows[0]
        else:
            spent, reserved, topup = self._read(self.sql.PERIOD_COST, (key.id, start))[0][0], 0, 0
        allowance = None if key.max_budget_nanousd is None else key.max_budget_nanousd + topup
        return {"period_start": start, "period_end": end, "spent_nanousd": spent, "reserved_nanousd": reserved,
                "topup_nanousd": topup, "allowance_nanousd": allowance}

    def get_key(self, key_id):
        key = self.find_key_by_id(key_id)
        return key.as_dict() if key is not None else None

    def find_key_by_id(self, key_id):
        rows = self._read(GET_KEY, (key_id,))
        return VirtualKey.from_row(rows[0]) if rows else None

    def list_keys(self):
        keys = []
        for row in self._read(LIST_KEYS):
            record = VirtualKey.from_row(row[:-1]).as_dict()
            record["last_used_at"] = iso_time(row[-1])
            keys.append(record)
        return keys

    def revoke_key(self, key_id, actor="cli"):
        """Revoke a key. Returns False if there is no such key; revoking twice is fine."""
        def revoke(conn):
            if conn.execute(KEY_EXISTS, (key_id,)).fetchone() is None:
                return False
            if conn.execute(REVOKE_KEY, (time.time(), key_id)).rowcount:
                conn.execute(BUMP_GENERATION)
                _audit(conn, actor, "key_revoked", key_id)
            return True
        return self._write(revoke, changes_state=True)

    def set_provider_key(self, provider, api_key, actor="cli", name=None):
        """Store a provider's key, or with ``name`` one more key (deployment)."""
        def upsert(conn):
            if name is None:
                conn.execute(UPSERT_PROVIDER_KEY, (provider, api_key, time.time()))
            else:
                conn.execute(UPSERT_DEPLOYMENT_KEY, (provider, name, api_key, time.time()))
            conn.execute(BUMP_GENERATION)
            _audit(conn, actor, "provider_key_set", provider if name is None else "%s/%s" % (provider, name))
        self._write(upsert, changes_state=True)

    def cool_down(self, deployment, now, base, maximum, at_least, reason):
        """Mark a deployment failing for every process: skipped for ``base``
        seconds doubled per failure since its last success, or ``at_least``
        (a Retry-After) if longer, never beyond ``maximum``. Returns (until,
        failures)."""
        def cool(conn):
            row = conn.execute(GET_COOLDOWN, (deployment,)).fetchone()
            failures = row[0] + 1 if row is not None and now - row[1] < maximum else 1
            until = now + min(max(base * 2 ** min(failures - 1, 20), at_least), maximum)
            conn.execute(PUT_COOLDOWN, (deployment, until, failures, reason, now))
            return until, failures
        return self._write(cool)

    def clear_cooldown(self, deployment):
        self._write(lambda conn: conn.execute(CLEAR_COOLDOWN, (deployment,)))

    def set_setting(self, name, value, actor="cli"):
        def put(conn):
            conn.execute(PUT_SETTING, (name, value))
            conn.execute(BUMP_GENERATION)
            _audit(conn, actor, "setting_changed", name)
        self._write(put, changes_state=True)

    def audit(self, actor, action, target=None, detail=None):
        """Record an administrative action that changed no table of its own."""
        self._write(lambda conn: _audit(conn, actor, action, target, detail))

    def audit_log(self, limit=100):
        """The most recent audit entries, newest first."""
        return [{"at": iso_time(at), "actor": actor, "action": action, "target": target, "detail": detail}
                for at, actor, action, target, detail in self._read(RECENT_AUDIT, (limit,))]

    def import_prices(self, prices, source, actor="cli"):
        """Store a price pack (model -> PRICE_FIELDS mapping) for every process."""
        now = time.time()

        def upsert(conn):
            for model, fields in prices.items():
                conn.execute(UPSERT_PRICE, (model,) + tuple(
                    None if fields.get(name) is None else str(fields[name]) for name in PRICE_FIELDS)
                    + (source, now))
            conn.execute(BUMP_GENERATION)
            _audit(conn, actor, "prices_imported", source, "%d models" % len(prices))
        self._write(upsert, changes_state=True)

    def imported_prices(self):
        """Prices imported with ``prices import``: model -> (fields, source)."""
        return {row[0]: (dict(zip(PRICE_FIELDS, row[1:6])), row[6]) for row in self._read(ALL_PRICES)}

    # -- usage rows -------------------------------------------------------------

    def begin_usage(self, request_id, owner, key_id, provider, endpoint, model, streamed, started_at,
                    reservation=None, estimated=False, logical_request_id=None, attempt=1,
                    attempt_kind=ATTEMPT_FIRST, deployment=None):
        """Write the pending row for an upstream attempt; returns (row id,
        budget period start or None).

        With ``reservation`` (nano-dollars, the call's worst-case cost) and a
        budget on the key, the same transaction checks what is left and
        reserves it, so concurrent requests in any number of processes can
        never spend past the budget. An ``estimated`` reservation (budgets
        admission ``estimate``) is not a bound: it is admitted while any
        budget is left. Raises BudgetExceededError.
        """
        def begin(conn):
            period_start = None
            if reservation is not None:
                period_start = _reserve(conn, key_id, reservation, started_at, estimated)
            values = (request_id, key_id, provider, endpoint, model, int(streamed), started_at, owner,
                      reservation if period_start is not None else 0, period_start,
                      logical_request_id or request_id, attempt, attempt_kind, deployment)
            return conn.execute(conn.sql.INSERT_USAGE, values).lastrowid, period_start
        return self._write(begin)

    def finish_usage(self, row_id, result, key_id=None, reserved=0, period_start=None, alert_thresholds=(),
                     bodies=None):
        """Settle a usage row (``result`` maps USAGE_RESULT_COLUMNS to values)
        and turn its budget reservation into the real cost; ``bodies`` (the
        INSERT_BODIES values: request, its size, response, its size) are
        kept beside it. Budget thresholds (percentages) the spend has now
        reached queue their alerts in the same transaction; returns how
        many it queued."""
        values = tuple(result[column] for column in USAGE_RESULT_COLUMNS) + (row_id,)

        def finish(conn):
            if not conn.execute(FINISH_USAGE, values).rowcount:
                return 0  # recovery got there first and charged the reservation
            _roll_up_row(conn, row_id, 1)
            if bodies is not None:
                conn.execute(INSERT_BODIES, tuple(bodies) + (row_id,))
            cost = result["cost_nanousd"]
            if period_start is not None:
                conn.execute(SETTLE_SPEND, (reserved, cost, key_id, period_start))
                if cost and alert_thresholds:
                    return _queue_alerts(conn, key_id, period_start, alert_thresholds, result["finished_at"])
            elif cost:
                _charge_new_budget(conn, key_id, cost, result["finished_at"])
            return 0
        return self._write(finish)

    def response_origin(self, response_id):
        """(key id, provider, deployment, model) of the usage row that made
        response ``response_id``, or None."""
        rows = self._read(self.sql.RESPONSE_ORIGIN, (response_id,))
        return rows[0] if rows else None

    def claim_alerts(self, now, lease):
        """Alerts due for delivery, as (id, payload, attempts so far), held
        for ``lease`` seconds so no other process sends them meanwhile."""
        def claim(conn):
            due = conn.execute(DUE_ALERTS, (now,)).fetchall()
            conn.executemany(LEASE_ALERT, [(now + lease, alert_id) for alert_id, _, _ in due])
            return due
        return self._write(claim)

    def alert_tried(self, alert_id, target, delivered, detail, retry_at=None):
        """Record a delivery attempt (and audit it): delivered, to retry at
        ``retry_at``, or given up (neither)."""
        now = time.time()
        action = "alert_delivered" if delivered else ("alert_retrying" if retry_at else "alert_abandoned")

        def tried(conn):
            conn.execute(ALERT_TRIED, (retry_at, now if delivered else None, alert_id))
            _audit(conn, "gateway", action, target, detail)
        self._write(tried)

    def publish_activity(self, owner, rows, now, forget_before):
        """This process's request counters (see KeyLimits), for the others."""
        def publish(conn):
            conn.executemany(PUBLISH_ACTIVITY, [row[:1] + (owner,) + row[1:] + (now,) for row in rows])
            conn.execute(FORGET_ACTIVITY, (forget_before,))
        self._write(publish)

    def others_activity(self, owner, since):
        return self._read(OTHERS_ACTIVITY, (owner, since))

    def register_process(self, owner, now):
        """Announce a gateway process; its heartbeat shows it is alive."""
        values = (owner, socket.gethostname(), os.getpid(), now, now)
        self._write(lambda conn: conn.execute(REGISTER_PROCESS, values))

    def heartbeat(self, owner, now):
        self._write(lambda conn: conn.execute(HEARTBEAT, (now, owner)))

    def retire_process(self, owner):
        self._write(lambda conn: conn.execute(RETIRE_PROCESS, (owner,)))

    def recover_interrupted(self, owner, now, stale_after=30.0):
        """Mark rows left pending by dead processes as ``interrupted``.

        Another process is dead if it runs on this host and its pid is gone
        (or is ours: a restarted container reuses pid 1), or if its heartbeat
        is older than ``stale_after`` seconds (any host, such as another
        container sharing the database).
        """
        def recover(conn):
            if not conn.try_lock(RECOVERY_LOCK):
                return 0  # another instance is sweeping
            count = 0
            for other, other_host, other_pid, heartbeat_at in conn.execute(PENDING_OWNERS).fetchall():
                if other == owner or not _process_gone(other_host, other_pid, heartbeat_at, now, stale_after):
                    continue
                for row_id, key_id, reserved, period_start in conn.execute(
                        conn.sql.ABANDONED_ROWS, (other,)).fetchall():
                    if not conn.execute(INTERRUPT_ROW, (time.time(), row_id)).rowcount:
                        continue
                    _roll_up_row(conn, row_id, 1)
                    if period_start is not None:
                        conn.execute(SETTLE_SPEND, (reserved, reserved, key_id, period_start))
                    count += 1
            return count
        return self._write(recover)

    def usage_costs(self, since=None, until=None, project=None):
        """(row id, model, raw token counts, cost) of settled usage rows, for
        re-pricing (an interrupted row's cost is its reservation, not a
        price). The counts are Usage's first five fields, in order."""
        where, params = _usage_filter(since, until, project, settled_only=True)
        return [(row[0], row[1], row[2:7], row[7]) for row in self._read_apart(USAGE_COSTS + where, params)]

    def set_costs(self, updates):
        """Write (cost_nanousd, priced, row id) triples in one transaction,
        moving each row's rollup with it."""
        def reprice(conn):
            for cost, priced, row_id in updates:
                _roll_up_row(conn, row_id, -1)
                conn.execute(SET_COST, (cost, priced, row_id))
                _roll_up_row(conn, row_id, 1)
        self._write(reprice)

    def usage_stats(self, group_by="key", since=None, until=None, project=None, step=None,
                    fields=STATS_TOTAL_FIELDS):
        """Per-group totals of usage rows, as dicts ready for JSON.

        ``since``/``until`` are epoch seconds (until exclusive); ``group_by`` is
        one of STATS_GROUPS. With ``step`` (seconds, a whole number of hours
        or of days), each group is also cut into periods of that length from
        the epoch, each row's ``at`` its period's start (a chart's points).
        Only ``fields`` (of STATS_TOTAL_FIELDS) are summed: a chart needs a
        few, and each costs a sum per rollup read.
        """
        label = group_by[len("label:"):] if group_by.startswith("label:") else None
        if label is not None and LABEL_NAME.match(label):
            # A validated name, so the JSON path is safe to write into the SQL.
            names, expressions = ("label",), (self.sql.LABEL % label,)
        elif group_by in STATS_GROUPS:
            names, expressions = STATS_GROUPS[group_by]
        else:
            raise BadRequestError("by: cannot group by %s (choose: %s, or label:NAME)"
                                  % (shown(group_by), ", ".join(STATS_GROUPS)), param="by")
        # Each source sums by no more than the grouping and the filter need
        # (key, model, provider; for a day or a step, periods from the epoch
        # that make up both): the join with the keys then meets hundreds of
        # rows, not every rollup, and the sorts key on little.
        dimensions = {group_by} & {"model", "provider"}
        if group_by not in ("model", "provider", "day") or project is not None:
            dimensions.add("virtual_key_id")
        periods = [length for length in (86400 if group_by == "day" else None, step) if length]
        bucket = math.gcd(*periods) if periods else None
        if step is not None:
            names = names + ("at",)
            expressions = expressions + ("u.at" if bucket == step else "u.at / %d * %d" % (step, step),)
        sources, params = _stats_sources(self.sql, since, until, dimensions, bucket, fields)
        where = ""
        if project is not None:
            where = " WHERE k.project_name = ?"
            params.append(project)
        sql = ("WITH u (virtual_key_id, model, provider, at, %s) AS (%s) "
               "SELECT %s, %s FROM u LEFT JOIN virtual_keys k ON k.id = u.virtual_key_id%s "
               "GROUP BY %s ORDER BY %s") % (
            ", ".join(fields), " UNION ALL ".join(sources), ", ".join(expressions),
            ", ".join("SUM(u.%s)" % name for name in fields), where, ", ".join(expressions),
            ", ".join(expression + " NULLS FIRST" for expression in expressions))  # as SQLite, unlike PostgreSQL
        result = []
        for row in self._read_apart(sql, params):
            entry = dict(zip(names, row[:len(names)]))
            if group_by == "day":
                entry["day"] = (_EPOCH_DAY + datetime.timedelta(days=entry["day"])).isoformat()
            entry.update(zip(fields, (value or 0 for value in row[len(names):])))
            for nanos, usd in (("cost_nanousd", "estimated_cost"), ("estimated_usage_cost_nanousd",
                                                                    "estimated_usage_cost")):
                if nanos in entry:
                    entry[usd] = nanousd_to_usd(entry.pop(nanos))
            result.append(entry)
        return result

    def usage_log(self, filters, cursor=None, limit=50):
        """One page of usage rows, newest first, as dicts ready for JSON,
        and the cursor of the next page (None after the last). ``filters``
        maps LOG_FILTERS names to values; times are epoch seconds."""
        clauses, params = [], []
        for name, value in filters.items():
            if value is not None:
                clauses.append(LOG_FILTERS[name])
                params.append(value)
        if cursor is not None:
            clauses.append("(u.started_at, u.id) < (?, ?)")
            params.extend(cursor)
        sql = "%s%s ORDER BY u.started_at DESC, u.id DESC LIMIT ?" % (
            LOG_PAGE, " WHERE " + " AND ".join(clauses) if clauses else "")
        rows = self._read_apart(sql, params + [limit + 1])
        entries = [log_entry(dict(zip(LOG_COLUMNS, row))) for row in rows[:limit]]
        next_cursor = None
        if len(rows) > limit:
            next_cursor = "%r:%d" % (rows[limit - 1][LOG_COLUMNS.index("started_at")],
                                     rows[limit - 1][LOG_COLUMNS.index("id")])
        return entries, next_cursor

    def usage_log_entry(self, row_id):
        """One usage row as the request log shows it, or None."""
        rows = self._read_apart(LOG_PAGE + " WHERE u.id = ?", (row_id,))
        return log_entry(dict(zip(LOG_COLUMNS, rows[0]))) if rows else None

    def usage_bodies(self, row_id):
        """The kept bodies of a usage row: (request, its size, response or
        None, its size), or None if none were kept."""
        rows = self._read_apart(GET_BODIES, (row_id,))
        return rows[0] if rows else None

    def usage_totals(self):
        """All-time totals of the settled rows per key, model and provider:
        (key id, project, model, provider, {status: calls}, errors, tokens
        of each TOKEN_KINDS, cost in nano-USD). Summed by the database, so
        /metrics formats a few hundred rows."""
        totals = []
        for row in self._read_apart(self.sql.USAGE_TOTALS):
            words = row[4].split(" ")
            totals.append(row[:4] + (dict(zip(words[::2], map(int, words[1::2]))),) + tuple(row[5:]))
        return totals

    def budgeted_keys(self):
        """Active keys with a budget, as VirtualKeys."""
        return [VirtualKey.from_row(row) for row in self._read(BUDGETED_KEYS)]

    def prune_usage(self, before, batch=2000, at_most=None):
        """Delete settled usage rows that started before ``before`` (rounded
        down to the hour, so every rollup left whole still has its rows or
        none of them), and their kept bodies; rollups are kept. Small
        transactions, so requests settling meanwhile wait milliseconds;
        ``at_most`` bounds one call (roughly, to a batch). Returns how many
        rows went."""
        cutoff = int(before) // 3600 * 3600
        deleted = self._prune(PRUNE_USAGE, cutoff, batch, at_most)
        self.prune_bodies(cutoff, batch, at_most)
        return deleted

    def prune_bodies(self, before, batch=2000, at_most=None):
        """Delete the kept bodies of requests that started before ``before``
        (their rows stay); as prune_usage. Returns how many went."""
        return self._prune(PRUNE_BODIES, before, batch, at_most)

    def _prune(self, statement, cutoff, batch, at_most):
        deleted = 0
        while at_most is None or deleted < at_most:
            count = self._write(lambda conn: conn.execute(statement, (cutoff, batch)).rowcount)
            deleted += count
            if count < batch:
                break
        return deleted


def _postgres_ddl(ddl):
    """SQLite's CREATE and ALTER statements (and migration steps) in
    PostgreSQL's types: integers of 64 bits (nano-dollars outgrow 32),
    doubles (REAL is 32 bits there), BYTEA for BLOB, identity row ids, a
    column added only where it is missing, and a row's whole seconds
    truncated as SQLite truncates them (PostgreSQL's CAST rounds)."""
    ddl = ddl.replace(SQLITE_WHOLE_SECONDS % "started_at", POSTGRES_WHOLE_SECONDS % "started_at")
    ddl = ddl.replace("INTEGER PRIMARY KEY", "BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY")
    ddl = re.sub(r"\bINTEGER\b", "BIGINT", re.sub(r"\bREAL\b", "DOUBLE PRECISION", ddl)).replace("BLOB", "BYTEA")
    return ddl.replace(" WITHOUT ROWID", "").replace("ADD COLUMN", "ADD COLUMN IF NOT EXISTS")


class SQLiteSQL:
    """The statements SQLite spells its own way (PostgresSQL has the same
    names); every other statement above is written once for both."""
    SCHEMA = SCHEMA + ROLLUP_SCHEMA
    PERIOD_COST = _PERIOD_COST % " INDEXED BY usage_pending"
    INDEXED_PENDING = " INDEXED BY usage_pending"
    RESPONSE_ORIGIN = _RESPONSE_ORIGIN % " INDEXED BY usage_by_response"
    USAGE_TOTALS = _USAGE_TOTALS % "group_concat(t.status || ' ' || t.attempts, ' ')"
    INSERT_USAGE = _INSERT_USAGE  # the row id is the cursor's lastrowid
    ABANDONED_ROWS = _ABANDONED_ROWS % "IS"
    WHOLE_SECONDS = SQLITE_WHOLE_SECONDS
    ROLL_UP_ROW = _roll_up_row_statements(SQLITE_WHOLE_SECONDS)
    #: A key's label by name (a validated LABEL_NAME).
    LABEL = "json_extract(k.metadata, '$.\"%s\"')"
    #: After rows were copied in with their ids: SQLite's next id is the largest plus one already.
    NEXT_ID = None

    @staticmethod
    def ddl(statement):
        return statement


class PostgresSQL:
    """The statements PostgreSQL spells its own way (see SQLiteSQL)."""
    SCHEMA = _postgres_ddl(SCHEMA + ROLLUP_SCHEMA)
    PERIOD_COST = _PERIOD_COST % ""
    INDEXED_PENDING = ""
    RESPONSE_ORIGIN = _RESPONSE_ORIGIN % ""
    USAGE_TOTALS = _USAGE_TOTALS % "string_agg(t.status || ' ' || t.attempts, ' ')"
    INSERT_USAGE = _INSERT_USAGE + " RETURNING id"
    ABANDONED_ROWS = _ABANDONED_ROWS % "IS NOT DISTINCT FROM"
    WHOLE_SECONDS = POSTGRES_WHOLE_SECONDS
    ROLL_UP_ROW = _roll_up_row_statements(POSTGRES_WHOLE_SECONDS)
    LABEL = "(k.metadata::jsonb ->> '%s')"
    NEXT_ID = "SELECT setval(pg_get_serial_sequence('%s', 'id'), COALESCE(MAX(id), 0) + 1, false) FROM %s"
    ddl = staticmethod(_postgres_ddl)
    #: The schema version: a settings row (SQLite keeps it in a pragma).
    SCHEMA_VERSION_OF = "SELECT value FROM settings WHERE name = 'schema_version'"
    COLUMNS_OF = ("SELECT column_name FROM information_schema.columns "
                  "WHERE table_name = ? AND table_schema = CURRENT_SCHEMA")
    #: Advisory locks (transaction-scoped): one migration at a time; one
    #: recovery sweep at a time across every instance.
    TAKE_LOCK = "SELECT pg_advisory_xact_lock(?)"
    TRY_LOCK = "SELECT pg_try_advisory_xact_lock(?)"


#: Advisory lock numbers (PostgreSQL), arbitrary but fixed.
MIGRATION_LOCK = 0x6C6C6D01
RECOVERY_LOCK = 0x6C6C6D02


def _bring_schema_up(conn, version):
    """From schema ``version`` (0: an empty database) to SCHEMA_VERSION
    inside the caller's transaction: the missing tables created whole, each
    later MIGRATIONS step, then the indexes."""
    statements = [statement for statement in conn.sql.SCHEMA.split(";") if statement.strip()]
    tables = [statement for statement in statements if "CREATE TABLE" in statement]
    for statement in tables:
        conn.execute(statement)
    for step in MIGRATIONS[version - 1:] if version else ():
        for statement in step:
            added = _ADD_COLUMN.match(statement)
            if added and added.group(2) in conn.columns(added.group(1)):
                continue
            conn.execute(conn.sql.ddl(statement))
    for statement in statements:
        if statement not in tables:
            conn.execute(statement)


def _newer_schema(where, version):
    return StorageError("database %s was written by a newer llmgw (schema version %d; this llmgw knows %d): "
                        "upgrade llmgw" % (where, version, SCHEMA_VERSION))


class _SQLiteConnection(sqlite3.Connection):
    """A sqlite3 connection that knows its backend's statements."""
    sql = SQLiteSQL

    def columns(self, table):
        return {row[1] for row in self.execute("PRAGMA table_info(%s)" % table)}

    def try_lock(self, number):
        """True: a write transaction (BEGIN IMMEDIATE) already excludes
        every other writer."""
        return True


class SQLiteStore(Store):
    """The database in one SQLite file (the default).

    Thread-safe. Writes go through one group-committed connection; hot-path
    reads use a second connection behind a lock, so a long stats query (on
    its own short-lived connection) never stalls a request.
    """

    sql = SQLiteSQL

    def __init__(self, path, synchronous="NORMAL"):
        self.path = str(path)
        self._synchronous = synchronous
        if not os.path.exists(self.path):
            # Create it private before SQLite does; -wal and -shm inherit the mode.
            os.close(os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600))
        self._writer = self._connect()
        self._migrate()
        self._reader = self._connect()
        self._read_lock = threading.Lock()
        self._commits = _GroupCommit(self._writer)

    def _connect(self):
        try:
            conn = sqlite3.connect(self.path, timeout=self.busy_timeout_s, isolation_level=None,
                                   check_same_thread=False, factory=_SQLiteConnection)
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = %s" % self._synchronous)
        except sqlite3.Error as exc:
            raise StorageError("cannot open database %s: %s" % (self.path, exc)) from None
        return conn

    def _migrate(self):
        """Bring the database to SCHEMA_VERSION (see MIGRATIONS), in one transaction."""
        conn = self._writer
        try:
            conn.execute("BEGIN IMMEDIATE")
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                conn.execute("ROLLBACK")
                raise _newer_schema(self.path, version)
            _bring_schema_up(conn, version)
            conn.execute("PRAGMA user_version = %d" % SCHEMA_VERSION)
            conn.execute("COMMIT")
            if 0 < version < SCHEMA_VERSION:
                logger.info("database %s migrated from schema version %d to %d", self.path, version,
                            SCHEMA_VERSION)
        except sqlite3.Error as exc:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise StorageError("cannot prepare database %s: %s" % (self.path, exc)) from None
        for suffix in ("", "-wal", "-shm"):
            try:
                os.chmod(self.path + suffix, 0o600)
            except OSError:
                pass

    def close(self):
        for conn in (self._reader, self._writer):
            conn.close()

    def _read(self, sql, params=()):
        try:
            with self._read_lock:
                return self._reader.execute(sql, params).fetchall()
        except sqlite3.Error as exc:
            raise StorageError("the gateway's database is unavailable: %s" % exc) from None

    def _read_apart(self, sql, params=()):
        """A long read (stats, re-pricing) on a connection of its own, so it
        never holds the hot path's reader."""
        conn = self._connect()
        try:
            return conn.execute(sql, params).fetchall()
        except sqlite3.Error as exc:
            raise StorageError("cannot read usage: %s" % exc) from None
        finally:
            conn.close()

    def data_version(self):
        """Changes whenever another connection (the CLI, another gateway
        process) commits, or this process commits a change to what gateways
        cache. Read on the writing connection, whose own usage rows do not
        move its ``PRAGMA data_version``; costs microseconds."""
        version = self._commits.read(lambda conn: conn.execute("PRAGMA data_version").fetchone()[0])
        return version, self._commits.state_changes

    # -- upkeep: backup and restore ------------------------------------------

    def backup(self, target):
        """Copy the database to ``target``, a new file created 0600, with
        SQLite's online backup API in one step: one read transaction, so the
        copy is consistent while gateways keep writing (in WAL mode a reader
        holds no writer back). The copy is one self-contained file."""
        try:
            os.close(os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        except OSError as exc:
            raise ConfigError("cannot create %s: %s" % (target, exc.strerror)) from None
        try:
            copy = sqlite3.connect(target, isolation_level=None)
            try:
                source = self._connect()
                try:
                    source.backup(copy)
                finally:
                    source.close()
                copy.execute("PRAGMA journal_mode = DELETE")
            finally:
                copy.close()
        except sqlite3.Error as exc:
            os.unlink(target)
            raise StorageError("backup to %s failed: %s" % (target, exc)) from None

    def restore(self, source_path, now, stale_after=30.0):
        """Replace the whole database with the backup at ``source_path``
        (through the backup API, so no stale WAL file can mix with it), then
        migrate it. Refused while a gateway process uses this database."""
        running = [row for row in self._read("SELECT host, pid, heartbeat_at FROM gateway_processes")
                   if not _process_gone(row[0], row[1], row[2], now, stale_after)]
        if running:
            raise ConfigError("%d gateway process(es) use %s (pid %s): stop them before restoring"
                              % (len(running), self.path, ", ".join(str(row[1]) for row in running)))
        try:
            source = sqlite3.connect("file:%s?mode=ro" % urllib.parse.quote(os.path.abspath(source_path)),
                                     uri=True)
        except sqlite3.Error as exc:
            raise ConfigError("cannot open backup %s: %s" % (source_path, exc)) from None
        try:
            if source.execute("PRAGMA quick_check").fetchone()[0] != "ok":
                raise ConfigError("backup %s fails its integrity check; nothing restored" % source_path)
            if source.execute("PRAGMA user_version").fetchone()[0] > SCHEMA_VERSION:
                raise ConfigError("backup %s was written by a newer llmgw; nothing restored" % source_path)
            self._commits.read(source.backup)
            self._migrate()
        except sqlite3.Error as exc:
            raise StorageError("restore from %s failed: %s" % (source_path, exc)) from None
        finally:
            source.close()


_PLACEHOLDER = re.compile(r"\?(\d*)")
#: Statements translated so far (a bounded cache: statements are built from
#: a few templates).
_POSTGRES_STATEMENTS = {}


def _postgres_statement(statement):
    """The one place placeholders are translated: SQLite's ``?N`` as
    PostgreSQL's ``$N``, and a bare ``?`` as the next number (as SQLite
    counts it); returns the statement and how many parameters it takes."""
    translated = _POSTGRES_STATEMENTS.get(statement)
    if translated is None:
        highest = [0]

        def placeholder(match):
            number = int(match.group(1)) if match.group(1) else highest[0] + 1
            highest[0] = max(highest[0], number)
            return "$%d" % number
        text = _PLACEHOLDER.sub(placeholder, statement)
        if len(_POSTGRES_STATEMENTS) > 4096:
            _POSTGRES_STATEMENTS.clear()
        translated = _POSTGRES_STATEMENTS[statement] = (text, highest[0])
    return translated


def _postgres_value(value):
    """A parameter as PostgreSQL infers its type from text: a flag as 0 or
    1, a whole float as an integer (so it also meets a BIGINT column)."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _from_postgres(value):
    """A SUM of BIGINTs arrives as a Decimal; the ledgers are integers."""
    if isinstance(value, decimal.Decimal):
        return int(value) if value == value.to_integral_value() else float(value)
    return value


class _PostgresCursor:
    """A statement's outcome, read at once: rows, column names, rowcount,
    and (for a statement ending RETURNING id) lastrowid."""

    def __init__(self, rowcount, rows, names):
        self.rowcount = rowcount
        self._rows = [tuple(_from_postgres(value) for value in row) for row in rows]
        self.names = names

    @property
    def lastrowid(self):
        return self._rows[0][0]

    def fetchone(self):
        return self._rows[0] if self._rows else None

    def fetchall(self):
        return self._rows

    def __iter__(self):
        return iter(self._rows)


class _PostgresConnection:
    """A pg8000 connection as the storage algorithms use a sqlite3 one:
    ``execute`` (SQLite's placeholders), ``executemany``, ``columns``,
    ``try_lock``. Autocommit, but for the transactions ``_PostgresPool``
    begins. A statement with parameters is prepared once per connection
    (up to ``prepared_at_most``), then costs one round trip (pg8000's
    unnamed statements cost three)."""
    sql = PostgresSQL
    prepared_at_most = 256

    def __init__(self, raw):
        self.raw = raw
        raw.autocommit = True
        self._prepared = {}
        from pg8000.converters import make_params
        self._make_params = make_params

    def execute(self, statement, params=()):
        text, count = _postgres_statement(statement)
        if not count:
            cursor = self.raw.cursor()
            cursor.execute(text)
            return _PostgresCursor(cursor.rowcount, cursor.fetchall() if cursor.description else (),
                                   [column[0] for column in cursor.description or ()])
        prepared = self._prepared.get(text)
        if prepared is None:
            prepared = self.raw.prepare_statement(text, ())
            if len(self._prepared) < self.prepared_at_most:
                self._prepared[text] = prepared
        name, columns, input_funcs = prepared
        values = self._make_params(self.raw.py_types, [_postgres_value(value) for value in params[:count]])
        context = self.raw.execute_named(name, values, columns, input_funcs, text)
        if text not in self._prepared:
            self.raw.close_prepared_statement(name)
        return _PostgresCursor(context.row_count, context.rows or (), [column["name"] for column in columns or ()])

    def executemany(self, statement, rows):
        for params in rows:
            self.execute(statement, params)

    def columns(self, table):
        return {row[0] for row in self.execute(PostgresSQL.COLUMNS_OF, (table,))}

    def try_lock(self, number):
        """Take advisory lock ``number`` until the transaction ends, unless
        another session holds it."""
        return bool(self.execute(PostgresSQL.TRY_LOCK, (number,)).fetchone()[0])

    def close(self):
        try:
            self.raw.close()
        except Exception:  # a broken connection may fail to say goodbye
            pass


#: SQLSTATEs of a transaction PostgreSQL aborted to let another through:
#: serialization failure, deadlock. Run again, it succeeds.
_RETRYABLE = ("40001", "40P01")


class _PostgresPool:
    """This process's connections to PostgreSQL: at most ``size``, opened
    when first needed and kept; a thread waits up to ``wait_s`` for a free
    one, then the request fails closed (503). ``run`` is a write: the
    operation in a transaction of its own (PostgreSQL's row locks make a
    shared transaction across processes deadlock-prone), run again if
    PostgreSQL aborted it for a deadlock; ``read`` runs in autocommit. A
    connection that failed is closed, not reused."""

    attempts = 3

    def __init__(self, connect, errors, size, wait_s):
        self._connect, self._errors, self._wait_s = connect, errors, wait_s
        self._slots = threading.BoundedSemaphore(size)
        self._idle = []
        self._lock = threading.Lock()

    def _take(self):
        if not self._slots.acquire(timeout=self._wait_s):
            raise StorageError("the gateway's database connections are all busy")
        try:
            with self._lock:
                if self._idle:
                    return self._idle.pop()
            return _PostgresConnection(self._connect())
        except BaseException as exc:
            self._slots.release()
            if isinstance(exc, self._errors):
                logger.error("cannot connect to the database: %s", exc)
                raise StorageError("the gateway's database is unavailable") from None
            raise

    def _give(self, conn, broken=False):
        if broken:
            conn.close()
        else:
            with self._lock:
                self._idle.append(conn)
        self._slots.release()

    def read(self, query):
        conn = self._take()
        try:
            result = query(conn)
        except self._errors as exc:
            self._give(conn, broken=True)
            raise StorageError("the gateway's database is unavailable: %s" % _postgres_message(exc)) from None
        except BaseException:
            self._give(conn, broken=True)
            raise
        self._give(conn)
        return result

    def run(self, operation, changes_state=False):
        for attempt in range(1, self.attempts + 1):
            conn = self._take()
            try:
                conn.execute("BEGIN")
                try:
                    result = operation(conn)
                except BaseException:
                    conn.execute("ROLLBACK")
                    raise
                conn.execute("COMMIT")
            except self._errors as exc:
                self._give(conn, broken=True)
                if _sqlstate(exc) in _RETRYABLE and attempt < self.attempts:
                    continue
                logger.error("database write failed: %s", _postgres_message(exc))
                raise StorageError("the gateway's database is unavailable: %s" % _postgres_message(exc)) from None
            except BaseException:
                self._give(conn)  # rolled back: a refusal (budget exceeded), not a broken connection
                raise
            self._give(conn)
            return result

    def close(self):
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()


def _sqlstate(exc):
    detail = exc.args[0] if exc.args else None
    return detail.get("C") if isinstance(detail, dict) else None


def _postgres_message(exc):
    """pg8000 reports a server error as a dict; its message is field M."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return ("the server's TLS certificate is not trusted (%s): sslrootcert names the CA that signed it"
                % exc.verify_message)
    cause = exc
    while cause is not None:  # a timed-out read surfaces as pg8000's later error on the dead socket
        if isinstance(cause, socket.timeout):
            return "no answer within %g s" % Store.busy_timeout_s
        cause = cause.__cause__ or cause.__context__
    detail = exc.args[0] if exc.args else None
    return detail.get("M", str(detail)) if isinstance(detail, dict) else str(exc)


def _import_pg8000():
    try:
        import pg8000.dbapi
    except ImportError:
        raise ConfigError("database.url names PostgreSQL, which needs pg8000: pip install pg8000") from None
    return pg8000.dbapi


def postgres_connect_args(database, environ):
    """pg8000's connect() arguments for ``database`` (a DatabaseConfig with
    a url): the password from its ``${ENV}`` reference or PGPASSWORD;
    ``sslmode`` as libpq reads it: disable (plain text), prefer (the
    default: TLS if the server offers it, unchecked), require (TLS),
    verify-ca (and the server's certificate checked against
    ``sslrootcert``, else the system's CAs), verify-full (and its name).
    As in libpq, require with an sslrootcert checks the certificate too."""
    url = urllib.parse.urlsplit(database.url)
    user = urllib.parse.unquote(url.username or "") or environ.get("PGUSER") or "postgres"
    args = {"user": user, "host": url.hostname or "localhost", "port": url.port or 5432,
            "database": urllib.parse.unquote(url.path.lstrip("/")) or user, "timeout": Store.busy_timeout_s,
            "application_name": "llmgw"}
    reference = _ENV_REFERENCE.match(database.password or "")
    password = environ.get(reference.group(1)) if reference else environ.get("PGPASSWORD")
    if password:
        args["password"] = password
    parameters = _url_parameters(url)
    sslmode, root_certificate = parameters.get("sslmode", "prefer"), parameters.get("sslrootcert")
    if sslmode == "disable":
        args["ssl_context"] = False  # pg8000's default (None) would take TLS where the server offers it
    elif sslmode != "prefer":  # prefer is pg8000's default: TLS when offered, plain text when not
        try:
            context = ssl.create_default_context(cafile=root_certificate)
        except OSError as exc:  # ssl.SSLError too
            raise ConfigError("database.url: sslrootcert %s: %s" % (root_certificate, exc.strerror or exc)) from None
        context.check_hostname = sslmode == "verify-full"
        if sslmode == "require" and root_certificate is None:
            context.verify_mode = ssl.CERT_NONE
        args["ssl_context"] = context
    return args


class PostgresStore(Store):
    """The database in PostgreSQL (``database.url``), shared by gateways on
    any number of hosts. Each process keeps a pool of at most
    ``database.pool_size`` connections (_PostgresPool); every write is its
    own transaction. Migrations run under an advisory lock; the schema
    version is the ``schema_version`` setting."""

    sql = PostgresSQL

    def __init__(self, database, environ=os.environ):
        dbapi = _import_pg8000()
        args = postgres_connect_args(database, environ)
        #: Where it is, for messages (never the password).
        self.path = "postgresql://%s@%s:%d/%s" % (args["user"], args["host"], args["port"], args["database"])
        try:  # once with the reason, for the operator starting it (a request's 503 never names the host)
            dbapi.connect(**args).close()
        except (dbapi.Error, OSError) as exc:
            raise StorageError("cannot connect to database %s: %s" % (self.path, _postgres_message(exc))) from None
        self._commits = _PostgresPool(lambda: dbapi.connect(**args), (dbapi.Error, OSError),
                                      database.pool_size, database.pool_timeout)
        self._migrate()

    def _migrate(self):
        """Bring the database to SCHEMA_VERSION in one transaction, one
        process at a time (an advisory lock: gateways starting together
        wait for the first one's migration, then find nothing to do)."""
        def migrate(conn):
            conn.execute(PostgresSQL.TAKE_LOCK, (MIGRATION_LOCK,))
            exists = conn.execute("SELECT to_regclass('settings') IS NOT NULL").fetchone()[0]
            rows = conn.execute(PostgresSQL.SCHEMA_VERSION_OF).fetchall() if exists else []
            version = int(rows[0][0]) if rows else 0
            if version > SCHEMA_VERSION:
                raise _newer_schema(self.path, version)
            if version < SCHEMA_VERSION:
                _bring_schema_up(conn, version)
                conn.execute(PUT_SETTING, ("schema_version", str(SCHEMA_VERSION)))
            return version
        version = self._commits.run(migrate)
        if 0 < version < SCHEMA_VERSION:
            logger.info("database %s migrated from schema version %d to %d", self.path, version, SCHEMA_VERSION)

    def close(self):
        self._commits.close()

    def _read(self, sql, params=()):
        return self._commits.read(lambda conn: conn.execute(sql, params).fetchall())

    #: A long read holds one pooled connection, not the others.
    _read_apart = _read

    def data_version(self):
        """The generation itself: one primary-key read per request, so a
        change committed through any instance holds on every other from its
        next request."""
        return self.generation(), 0

    def backup(self, target):
        raise ConfigError("the database is PostgreSQL (%s): back it up with pg_dump" % self.path)

    def restore(self, source_path, now, stale_after=30.0):
        raise ConfigError("the database is PostgreSQL (%s): restore it with pg_restore" % self.path)


def open_store(database, environ=os.environ, create=True):
    """The database a DatabaseConfig names: PostgreSQL at ``url``, else the
    SQLite file at DB_PATH (created only if ``create``)."""
    if database.url is not None:
        return PostgresStore(database, environ)
    path = db_path_from_env(environ)
    if not create and not os.path.exists(path):
        raise ConfigError("database %s not found (run: python cli.py init)" % path)
    return SQLiteStore(path, synchronous=database.synchronous.upper())


#: What ``migrate-db`` copies, in order; the rest (the process registry,
#: rate-limit counters, cooldowns) belongs to running processes and starts
#: afresh.
COPIED_TABLES = ("settings", "provider_keys", "deployment_keys", "prices", "virtual_keys", "key_spend", "audit_log",
                 "budget_alerts", "usage") + tuple(table for table, _ in _ROLLUP_TABLES)
#: Tables whose rows migrate-db moves in pages by id (they grow without bound).
_PAGED_TABLES = ("usage", "audit_log")
#: Rows a copy leaves where they are: the schema version is each database's own.
_COPY_WHERE = {"settings": " WHERE name != 'schema_version'"}
#: What a copy is verified by: (what, table, SQL expression), equal on both sides.
COPY_TOTALS = tuple(("%s rows" % table, table + _COPY_WHERE.get(table, ""), "COUNT(*)")
                    for table in COPIED_TABLES) + (
    ("usage cost (nano-USD)", "usage", "COALESCE(SUM(cost_nanousd), 0)"),
    ("usage tokens", "usage", "COALESCE(SUM(request_tokens + response_tokens), 0)"),
    ("spent (nano-USD)", "key_spend", "COALESCE(SUM(spent_nanousd), 0)"),
    ("reserved (nano-USD)", "key_spend", "COALESCE(SUM(reserved_nanousd), 0)"),
    ("top-ups (nano-USD)", "key_spend", "COALESCE(SUM(topup_nanousd), 0)"),
    ("all-time cost (nano-USD)", "usage_totals", "COALESCE(SUM(cost_nanousd), 0)"))
_COPY_PAGE = 500
#: Tables whose id is a row number the database hands out.
_NUMBERED_TABLES = tuple(re.findall(r"CREATE TABLE IF NOT EXISTS (\w+) \(\s*id\s+INTEGER PRIMARY KEY", SCHEMA))


def copy_database(source, target, now, stale_after=30.0):
    """Copy ``source``'s keys, usage, rollups, prices, settings and audit
    into ``target``, an empty database of the same schema (either backend),
    in one transaction of the target's; verified by COPY_TOTALS before it
    commits. Refused while a gateway uses the source. Returns [(what,
    total)]."""
    running = [row for row in source._read("SELECT host, pid, heartbeat_at FROM gateway_processes")
               if not _process_gone(row[0], row[1], row[2], now, stale_after)]
    if running:
        raise ConfigError("%d gateway process(es) use %s: stop them before copying it" % (len(running), source.path))
    expected = [source._read_apart("SELECT %s FROM %s" % (expression, table))[0][0]
                for _, table, expression in COPY_TOTALS]

    def copy(conn):
        if any(conn.execute("SELECT 1 FROM %s LIMIT 1" % table).fetchone() for table in ("virtual_keys", "usage")):
            raise ConfigError("%s already holds keys or usage: copy into an empty database" % target.path)
        conn.execute("DELETE FROM settings" + _COPY_WHERE["settings"])  # the target's own generation gives way
        for table in COPIED_TABLES:
            columns = sorted(source._commits.read(lambda source_conn: source_conn.columns(table)))
            insert = "INSERT INTO %s (%s) VALUES " % (table, ", ".join(columns))
            row_values = "(%s)" % ", ".join("?" * len(columns))
            for rows in _pages(source, table, columns):
                conn.execute(insert + ", ".join([row_values] * len(rows)), [value for row in rows for value in row])
            if conn.sql.NEXT_ID is not None and table in _NUMBERED_TABLES:
                conn.execute(conn.sql.NEXT_ID % (table, table))
        copied = [conn.execute("SELECT %s FROM %s" % (expression, table)).fetchone()[0]
                  for _, table, expression in COPY_TOTALS]
        differing = ["%s: %s here, %s copied" % (what, there, here) for (what, _, _), there, here
                     in zip(COPY_TOTALS, expected, copied) if there != here]
        if differing:
            raise StorageError("the copy does not add up, nothing kept: " + "; ".join(differing))
        conn.execute(BUMP_GENERATION)
    target._write(copy)
    return [(what, total) for (what, _, _), total in zip(COPY_TOTALS, expected)]


def _pages(store, table, columns):
    """A table's rows in pages of _COPY_PAGE (by id where it has one)."""
    select = "SELECT %s FROM %s%s" % (", ".join(columns), table, _COPY_WHERE.get(table, ""))
    if table not in _PAGED_TABLES:
        rows = store._read_apart(select)
        for start in range(0, len(rows), _COPY_PAGE):
            yield rows[start:start + _COPY_PAGE]
        return
    last = -1
    id_index = columns.index("id")
    while True:
        rows = store._read_apart(select + " WHERE id > ? ORDER BY id LIMIT %d" % _COPY_PAGE, (last,))
        if not rows:
            return
        yield rows
        last = rows[-1][id_index]


def _stats_sources(sql, since, until, dimensions, bucket=None, fields=STATS_TOTAL_FIELDS):
    """The SELECTs and parameters that cover [since, until) exactly, each
    summing ``fields`` (of STATS_TOTAL_FIELDS) by ``dimensions`` (the names of
    STATS_DIMENSIONS it needs) and, with ``bucket`` (seconds, whole hours
    or days), by periods of that length from the epoch (``at``, each
    period's start): rollups for the whole weeks, then days, then hours,
    inside it, settled rows for the ragged ends, and every pending row in
    it. All time, without a bucket, is the totals. A bucket reads only the
    rollups whose units it is made of (days go for 6-hour buckets, weeks
    for any bucket shorter than a week). Each SELECT sums its own rows, so
    what is summed again across them is a few hundred rows, not every
    rollup; a bucket of the level's own size is its time column itself."""
    rows = ("usage", sql.WHOLE_SECONDS % "started_at", 1)
    pending = (rows, sql.INDEXED_PENDING, [("status = 'pending'", None), ("started_at >= ?", since),
                                           ("started_at < ?", until)])
    if since is None and until is None and bucket is None:
        parts = [(("usage_totals", None, None), "", [])]
    else:
        parts = [(rows, "", [("status != 'pending'", None), ("started_at >= ?", lo), ("started_at < ?", hi)])
                 if level is None else (level, "", [("%s >= ?" % level[1], lo), ("%s < ?" % level[1], hi)])
                 for level, lo, hi in _cover(since, until, tuple(
                     level for level in ROLLUP_LEVELS if bucket is None or bucket % level[2] == 0))]
    sources, params = [], []
    for (table, at, size), hint, conditions in parts + [pending]:
        measures = dict(ROLLUP_MEASURES) if table == "usage" else {}
        columns = [STATS_DIMENSIONS[name][table == "usage"] if name in dimensions else "NULL"
                   for name in STATS_DIMENSIONS]
        columns.append("NULL" if bucket is None else at if size == bucket else "%s / %d * %d" % (at, bucket, bucket))
        grouped = [str(number) for number, column in enumerate(columns, 1) if column != "NULL"]
        clauses = [clause for clause, value in conditions if value is not None or "?" not in clause]
        sources.append("SELECT %s, %s FROM %s%s%s GROUP BY %s" % (
            ", ".join(columns), ", ".join("SUM(%s)" % measures.get(name, name) for name in fields), table, hint,
            " WHERE " + " AND ".join(clauses) if clauses else "", ", ".join(grouped)))
        params.extend(value for clause, value in conditions if value is not None)
    return sources, params


def _cover(since, until, levels):
    """Split [since, until) (None: unbounded) into (level, start, end) parts:
    the whole units of the coarsest level inside it, the ragged ends split
    the same way by the finer levels, and level None (the rows) for what
    is left."""
    if since is not None and until is not None and since >= until:
        return []
    if not levels:
        return [(None, since, until)]
    level, finer = levels[0], levels[1:]
    size = level[2]
    first = None if since is None else -(-math.ceil(since) // size) * size
    end = None if until is None else math.floor(until) // size * size
    if first is not None and end is not None and first >= end:
        return _cover(since, until, finer)
    return ([(level, first, end)] + (_cover(since, first, finer) if since is not None else [])
            + (_cover(end, until, finer) if until is not None else []))


def _usage_filter(since, until, project, settled_only=False):
    """A WHERE clause (and its parameters) over usage ``u`` joined with keys ``k``."""
    clauses = ["u.status NOT IN ('pending', 'interrupted')"] if settled_only else []
    params = []
    for clause, value in (("u.started_at >= ?", since), ("u.started_at < ?", until),
                          ("k.project_name = ?", project)):
        if value is not None:
            clauses.append(clause)
            params.append(value)
    return (" WHERE " + " AND ".join(clauses) if clauses else ""), params


def log_entry(row):
    """A usage row (LOG_COLUMNS) as the request log shows it: ISO time
    first, USD, labels as a mapping."""
    metadata = row.pop("metadata")
    entry = {"time": iso_time(row.pop("started_at"))}
    entry.update(row, labels=json.loads(metadata) if metadata else {}, streamed=bool(row["streamed"]),
                 priced=bool(row["priced"]), cost=nanousd_to_usd(row["cost_nanousd"]))
    del entry["cost_nanousd"]
    return entry


def parse_log_cursor(text):
    """A request log page's ``next_cursor`` back as (started_at, id)."""
    match = _LOG_CURSOR.match(text or "")
    if match is None or int(match.group(2)) >= 2 ** 63:  # past SQLite's largest row id
        raise BadRequestError("cursor: not a cursor this log returned", param="cursor")
    return float(match.group(1)), int(match.group(2))


def _queue_alerts(conn, key_id, period_start, thresholds, now):
    """Queue the budget alerts of ``thresholds`` (percentages) that the key's
    settled spend in the period has reached; each goes once per period.
    Returns how many were new."""
    budget, period = conn.execute(KEY_BUDGET, (key_id,)).fetchone()
    if budget is None:
        return 0
    spent, _, topup = conn.execute(GET_SPEND, (key_id, period_start)).fetchone()
    allowance = budget + topup
    queued = 0
    for threshold in (value for value in thresholds if spent * 100 >= value * allowance):
        project = conn.execute("SELECT project_name FROM virtual_keys WHERE id = ?", (key_id,)).fetchone()[0]
        payload = {"type": "budget.threshold",
                   "alert_id": "%s/%s/%d" % (key_id, iso_time(period_start), threshold),
                   "key_id": key_id, "project": project, "threshold_pct": threshold,
                   "used_pct": round(100.0 * spent / allowance, 2) if allowance else None,
                   "spent_usd": nanousd_to_usd(spent), "budget_usd": nanousd_to_usd(allowance),
                   "budget_period": period, "period_start": iso_time(period_start),
                   "period_end": iso_time(budget_period_bounds(period_start, period)[1]), "at": iso_time(now)}
        queued += conn.execute(QUEUE_ALERT, (key_id, period_start, threshold, json.dumps(payload), now, now)).rowcount
    return queued


def _roll_up_row(conn, row_id, sign):
    for statement in conn.sql.ROLL_UP_ROW:
        conn.execute(statement, (sign, row_id))


def _audit(conn, actor, action, target=None, detail=None):
    conn.execute(INSERT_AUDIT, (time.time(), actor, action, target, detail))


def issue_admin_token(store, actor="cli"):
    """Create a new admin token, retire the old one; returns the token (shown once)."""
    return _issue_token(store, ADMIN_TOKEN_SETTING, ADMIN_TOKEN_PREFIX, actor)


def issue_metrics_token(store, actor="cli"):
    """A token that reads /metrics and nothing else, for a scraper; retires
    the previous one. Returned once; only its hash is stored."""
    return _issue_token(store, METRICS_TOKEN_SETTING, METRICS_TOKEN_PREFIX, actor)


def _issue_token(store, setting, prefix, actor):
    token = prefix + secrets.token_urlsafe(32)
    store.set_setting(setting, hash_secret(token), actor)
    return token


BUDGET_PERIODS = ("daily", "weekly", "monthly", "never")
#: A metadata label's name; stats group by it inside a JSON path, so no quotes.
LABEL_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}\Z")
_PERIOD_NOUNS = {"daily": "day", "weekly": "week", "monthly": "month"}
DEFAULT_POLICY = {"tier": "default", "rpm": None, "tpm": None, "max_parallel": None, "max_budget_nanousd": None,
                  "budget_period": "monthly", "expires_at": None, "models": None, "metadata": None,
                  "log_bodies": False, "alert_thresholds": None,
                  "budget_admission": None}


def budget_period_bounds(now, period):
    """(start, end) of the calendar period (UTC) containing ``now``: days
    start at midnight, weeks on Monday, months on the 1st. ``never`` is one
    period from the epoch, with no end: a prepaid balance."""
    if period == "never":
        return 0.0, None
    day = datetime.datetime.fromtimestamp(now, datetime.timezone.utc).replace(
        hour=0, minute=0, second=0, microsecond=0)
    if period == "daily":
        start, length = day, datetime.timedelta(days=1)
    elif period == "weekly":
        start = day - datetime.timedelta(days=day.weekday())
        length = datetime.timedelta(days=7)
    else:
        start = day.replace(day=1)
        length = datetime.timedelta(days=32)
    try:
        end = start + length
    except OverflowError:  # the calendar (year 9999) ends before this period does
        return start.timestamp(), None
    return start.timestamp(), (end.replace(day=1) if period == "monthly" else end).timestamp()


def _reserve(conn, key_id, amount, now, estimated=False):
    """Reserve ``amount`` against the key's budget inside the caller's
    transaction; returns the period start, or None for a key without one.
    A worst case must fit in what is left; an ``estimated`` amount only
    needs something left. The check is the update's own condition
    (RESERVE_SPEND), so it holds against every concurrent admission."""
    budget, period = conn.execute(KEY_BUDGET, (key_id,)).fetchone()
    if budget is None:
        return None
    start, end = budget_period_bounds(now, period)
    _period_spend(conn, key_id, start)
    # A worst case past the largest integer a database stores fits no budget.
    if amount <= LARGEST_INTEGER and conn.execute(RESERVE_SPEND, (amount, key_id, start, budget,
                                                                   int(estimated))).rowcount:
        return start
    spent, reserved, topup = conn.execute(GET_SPEND, (key_id, start)).fetchone()
    when = "never resets (top it up)" if end is None else "resets at %s" % iso_time(end)
    raise BudgetExceededError(
        "Budget exceeded: USD %.6f of USD %.6f %s spent or reserved, this request may cost up to USD %.6f; "
        "the budget %s" % (nanousd_to_usd(spent + reserved), nanousd_to_usd(budget + topup),
                           "in total" if end is None else "this " + _PERIOD_NOUNS[period],
                           nanousd_to_usd(amount), when))


def _charge_new_budget(conn, key_id, cost, now):
    """A call that started before its key had a budget still counts
    against the budget the key has when it ends."""
    budget, period = conn.execute(KEY_BUDGET, (key_id,)).fetchone()
    if budget is not None:
        start = budget_period_bounds(now, period)[0]
        _period_spend(conn, key_id, start)
        conn.execute(SETTLE_SPEND, (0, cost, key_id, start))


def _period_spend(conn, key_id, start):
    """(spent, reserved, top-up) of a key's budget period, creating the
    period's row (from the usage rows already in it) on first use."""
    row = conn.execute(GET_SPEND, (key_id, start)).fetchone()
    if row is None:
        spent = conn.execute(conn.sql.PERIOD_COST, (key_id, start)).fetchone()[0]
        conn.execute(ENSURE_SPEND, (key_id, start, spent))
        row = (spent, 0, 0)
    return row


def _key_hint(secret):
    return VIRTUAL_KEY_PREFIX + "..." + secret[-4:]


def _column_value(name, value):
    """A policy value as stored: lists and labels as JSON text, flags as 0/1."""
    if name in ("models", "metadata", "alert_thresholds") and value is not None:
        return json.dumps(value, sort_keys=True)
    if name == "log_bodies":
        return int(value)
    return value


@dataclasses.dataclass(frozen=True)
class VirtualKey:
    """A virtual key as the request path sees it (never its secret)."""
    id: str
    project_name: str
    is_active: bool
    created_at: float
    revoked_at: Optional[float]
    key_hint: str
    tier: str
    rpm: Optional[int]
    tpm: Optional[int]
    max_parallel: Optional[int]
    max_budget_nanousd: Optional[int]
    budget_period: str
    expires_at: Optional[float]
    models: Optional[Tuple[str, ...]]
    metadata: Tuple[Tuple[str, str], ...]
    log_bodies: bool                            # its requests' bodies are kept (usage_bodies)
    alert_thresholds: Optional[Tuple[int, ...]]  # None: the config's alerts.thresholds
    budget_admission: Optional[str]             # BUDGET_ADMISSIONS; None: budgets.admission
    previous_secret_until: Optional[float] = None  # set when found by a rotated-out secret

    @classmethod
    def from_row(cls, row):
        values = dict(zip(KEY_COLUMNS, row))
        values["is_active"] = bool(values["is_active"])
        values["models"] = tuple(json.loads(values["models"])) if values["models"] else None
        values["metadata"] = tuple(sorted(json.loads(values["metadata"]).items())) if values["metadata"] else ()
        values["log_bodies"] = bool(values["log_bodies"])
        if values["alert_thresholds"] is not None:
            values["alert_thresholds"] = tuple(json.loads(values["alert_thresholds"]))
        return cls(**values)

    def valid_at(self, now):
        """Active, unexpired, and (for a rotated-out secret) within its grace."""
        return (self.is_active and (self.expires_at is None or now < self.expires_at)
                and (self.previous_secret_until is None or now < self.previous_secret_until))

    def as_dict(self):
        """The key's public fields, JSON-ready: times ISO 8601, money in USD."""
        return {"id": self.id, "project_name": self.project_name, "tier": self.tier, "rpm": self.rpm,
                "tpm": self.tpm, "max_parallel": self.max_parallel,
                "max_budget": None if self.max_budget_nanousd is None else nanousd_to_usd(self.max_budget_nanousd),
                "budget_period": self.budget_period, "expires_at": iso_time(self.expires_at),
                "models": list(self.models) if self.models is not None else None,
                "metadata": dict(self.metadata), "log_bodies": self.log_bodies,
                "alert_thresholds": None if self.alert_thresholds is None else list(self.alert_thresholds),
                "budget_admission": self.budget_admission, "is_active": self.is_active,
                "created_at": iso_time(self.created_at), "revoked_at": iso_time(self.revoked_at),
                "key_hint": self.key_hint}


def nanousd_to_usd(nanos):
    """Integer nano-dollars to a float for display (ledgers stay integer)."""
    return round((nanos or 0) / 1e9, 9)


# ==== 4. Pricing and usage ==================================================
#
# Usage is normalised the same way for every provider: request_tokens counts
# all input (uncached + cache reads + cache writes), response_tokens all output
# (reasoning included). The raw parts are kept so a price change can be
# re-applied. Money is integer nano-dollars (1e-9 USD): the cheapest listed
# token costs 5 of them, so nothing rounds away.

#: Where the built-in prices were read (the last field of each entry): the
#: providers' published list prices, standard tier, as carried in LiteLLM's
#: model_prices_and_context_window.json (PyPI litellm 1.110.2, the file in
#: its wheel, read 2026-12-03; the same values as shared/prices.json of
#: 2026-11-27 wherever both have the model); a model LiteLLM does not carry
#: yet from its provider's own model page; a retired model keeps its
#: historical list price from shared/prices.json. Refreshing: compare each
#: entry with the newer file and change its source with its numbers.
LITELLM = "built-in: LiteLLM 1.110.2 price map (provider list price), read 2026-12-03"
OPENAI_MODEL_PAGE = "built-in: developers.openai.com/api/docs/models (the model's own page), read 2026-12-03"
RETIRED = "built-in: shared/prices.json 2026-11-27 (retired model, historical list price)"
#: Built-in list prices, USD per million tokens, standard tier: model ->
#: (input, output, cached input / cache read, cache write 5m, cache write 1h, source).
BUILTIN_PRICES = {
    # openai
    "gpt-3.5-turbo":               ("0.5", "1.5", None, None, None, LITELLM),
    "gpt-4o":                      ("2.5", "10", "1.25", None, None, LITELLM),
    "gpt-4o-mini":                 ("0.15", "0.6", "0.075", None, None, LITELLM),
    "gpt-4.1":                     ("2", "8", "0.5", None, None, LITELLM),
    "gpt-4.1-mini":                ("0.4", "1.6", "0.1", None, None, LITELLM),
    "gpt-4.1-nano":                ("0.1", "0.4", "0.025", None, None, LITELLM),
    "o1":                          ("15", "60", "7.5", None, None, LITELLM),
    "o1-pro":                      ("150", "600", None, None, None, LITELLM),
    "o3":                          ("2", "8", "0.5", None, None, LITELLM),
    "o3-mini":                     ("1.1", "4.4", "0.55", None, None, LITELLM),
    "o3-pro":                      ("20", "80", None, None, None, LITELLM),
    "o4-mini":                     ("1.1", "4.4", "0.275", None, None, LITELLM),
    "gpt-5":                       ("1.25", "10", "0.125", None, None, LITELLM),
    "gpt-5-mini":                  ("0.25", "2", "0.025", None, None, LITELLM),
    "gpt-5-nano":                  ("0.05", "0.4", "0.005", None, None, LITELLM),
    "gpt-5-pro":                   ("15", "120", None, None, None, LITELLM),
    "gpt-5-codex":                 ("1.25", "10", "0.125", None, None, LITELLM),
    "gpt-5.1-codex":               ("1.25", "10", "0.125", None, None, LITELLM),
    "gpt-5.1":                     ("1.25", "10", "0.125", None, None, LITELLM),
    "gpt-5.2":                     ("1.75", "14", "0.175", None, None, LITELLM),
    "gpt-5.4":                     ("2.5", "15", "0.25", None, None, LITELLM),
    "gpt-5.4-mini":                ("0.75", "4.5", "0.075", None, None, LITELLM),
    "gpt-5.4-nano":                ("0.2", "1.25", "0.02", None, None, LITELLM),
    "gpt-5.5":                     ("5", "30", "0.5", None, None, LITELLM),
    "gpt-5.5-pro":                 ("30", "180", None, None, None, LITELLM),
    "gpt-5.6":                     ("4", "20", "0.4", "5", None, LITELLM),
    "gpt-6-sol":                   ("2", "10", "0.2", "2.5", None, LITELLM),
    "gpt-6-luna":                  ("0.1", "0.5", "0.01", "0.125", None, LITELLM),
    "gpt-6-astra":                 ("10", "50", "1", "12.5", None, LITELLM),
    "gpt-6.1-sol":                 ("2", "10", "0.1", "2.5", None, LITELLM),
    "gpt-6.1-terra":               ("1", "5", "0.05", "1.25", None, LITELLM),
    "gpt-6.2-sol":                 ("2", "10", "0.1", "2.5", None, OPENAI_MODEL_PAGE),
    "text-embedding-3-small":      ("0.02", "0", None, None, None, LITELLM),
    "text-embedding-3-large":      ("0.13", "0", None, None, None, LITELLM),
    "text-embedding-ada-002":      ("0.1", "0", None, None, None, LITELLM),
    # anthropic
    "claude-3-haiku-20240307":     ("0.25", "1.25", "0.03", "0.3", None, RETIRED),
    "claude-3-sonnet-20240229":    ("3", "15", None, None, None, RETIRED),
    "claude-3-opus-20240229":      ("15", "75", "1.5", "18.75", None, RETIRED),
    "claude-3-5-haiku-20241022":   ("0.8", "4", "0.08", "1", "1.6", RETIRED),
    "claude-3-5-sonnet-20241022":  ("3", "15", "0.3", "3.75", "6", RETIRED),
    "claude-3-7-sonnet-20250219":  ("3", "15", "0.3", "3.75", "6", RETIRED),
    "claude-sonnet-4-20250514":    ("3", "15", "0.3", "3.75", "6", RETIRED),
    "claude-opus-4-20250514":      ("15", "75", "1.5", "18.75", "30", RETIRED),
    "claude-opus-4-1-20250805":    ("15", "75", "1.5", "18.75", "30", RETIRED),
    "claude-sonnet-4-5":           ("3", "15", "0.3", "3.75", "6", LITELLM),
    "claude-haiku-4-5":            ("1", "5", "0.1", "1.25", "2", LITELLM),
    "claude-opus-4-5":             ("5", "25", "0.5", "6.25", "10", LITELLM),
    "claude-sonnet-4-6":           ("3", "15", "0.3", "3.75", "6", LITELLM),
    "claude-opus-4-6":             ("5", "25", "0.5", "6.25", "10", LITELLM),
    "claude-opus-4-7":             ("5", "25", "0.5", "6.25", "10", LITELLM),
    "claude-opus-4-8":             ("5", "25", "0.5", "6.25", "10", LITELLM),
    "claude-opus-5":               ("5", "25", "0.5", "6.25", "10", LITELLM),
    "claude-opus-5-5":             ("4", "20", "0.2", "5", "8", LITELLM),
    "claude-sonnet-5":             ("2", "10", "0.2", "2.5", "4", LITELLM),
    "claude-sonnet-5-5":           ("2", "10", "0.1", "2.5", "4", LITELLM),
    "claude-haiku-5-5":            ("0.1", "0.5", "0.01", "0.125", "0.2", LITELLM),
    "claude-fable-5-1":            ("10", "50", "0.25", "12.5", "20", LITELLM),
    # gemini
    "gemini-2.5-pro":              ("1.25", "10", "0.125", None, None, LITELLM),
    "gemini-2.5-flash":            ("0.3", "2.5", "0.03", None, None, LITELLM),
    "gemini-2.5-flash-lite":       ("0.1", "0.4", "0.01", None, None, LITELLM),
    "gemini-3.1-flash-lite":       ("0.25", "1.5", "0.025", None, None, LITELLM),
    "gemini-3.1-pro-preview":      ("2", "12", "0.2", None, None, LITELLM),
    "gemini-3.5-flash-lite":       ("0.3", "2.5", "0.03", None, None, LITELLM),
    "gemini-3.8-flash":            ("0.75", "3.75", "0.075", None, None, LITELLM),
    # mistral
    "mistral-large-latest":        ("0.5", "1.5", "0.05", None, None, LITELLM),
    "mistral-medium-latest":       ("1.5", "7.5", "0.15", None, None, LITELLM),
    "mistral-small-latest":        ("0.15", "0.6", "0.015", None, None, LITELLM),
    "codestral-latest":            ("0.3", "0.9", "0.03", None, None, LITELLM),
    "ministral-8b-latest":         ("0.15", "0.15", "0.015", None, None, LITELLM),
    "mistral-embed":               ("0.1", "0", None, None, None, LITELLM),
    # deepseek
    "deepseek-flash":              ("0.3", "1.2", "0.006", None, None, LITELLM),
    "deepseek-v4-pro":             ("1.32", "3.96", "0.044", None, None, LITELLM),
    "deepseek-chat":               ("0.28", "0.42", "0.028", None, None, LITELLM),
    "deepseek-reasoner":           ("0.28", "0.42", "0.028", None, None, LITELLM),
}

#: Long-context tiers (same sources): model -> (prompt tokens above which the
#: tier applies, what it charges at its prices, (input, output, cached
#: input, cache write 5m, cache write 1h)). The prompt is all input: uncached,
#: cache reads and cache writes. Every provider tier here charges the whole
#: request ("whole"); "excess" (only the prompt tokens past the threshold)
#: is for config.yaml.
BUILTIN_LONG_CONTEXT = {
    "gpt-5.4":                (272000, "whole", ("5", "22.5", "0.5", None, None)),
    "gpt-5.5":                (272000, "whole", ("10", "45", "1", None, None)),
    "gpt-5.5-pro":            (272000, "whole", ("60", "270", None, None, None)),
    "gpt-5.6":                (272000, "whole", ("8", "30", "0.8", "10", None)),
    "gpt-6-sol":              (272000, "whole", ("4", "15", "0.4", "5", None)),
    "gpt-6-luna":             (272000, "whole", ("0.2", "0.75", "0.02", "0.25", None)),
    "gpt-6-astra":            (272000, "whole", ("20", "75", "2", "25", None)),
    "gpt-6.1-sol":            (272000, "whole", ("4", "15", "0.2", "5", None)),
    "gpt-6.1-terra":          (272000, "whole", ("2", "7.5", "0.1", "2.5", None)),
    "gpt-6.2-sol":            (272000, "whole", ("4", "15", "0.2", "5", None)),
    "claude-haiku-5-5":       (100000, "whole", ("0.5", "2.5", "0.05", "0.625", "1")),
    "gemini-2.5-pro":         (200000, "whole", ("2.5", "15", "0.25", None, None)),
    "gemini-3.1-pro-preview": (200000, "whole", ("4", "18", "0.4", None, None)),
}


def builtin_price_fields(model):
    """A built-in entry as PRICE_FIELDS and ``long_context``, as config.yaml has them."""
    fields = dict(zip(PRICE_FIELDS, BUILTIN_PRICES[model]))
    if model in BUILTIN_LONG_CONTEXT:
        above_tokens, charge, prices = BUILTIN_LONG_CONTEXT[model]
        fields["long_context"] = dict(zip(PRICE_FIELDS, prices), above_tokens=above_tokens, charge=charge)
    return fields


@dataclasses.dataclass(frozen=True)
class Price:
    """One model's prices in USD per million tokens (Decimal, exact), and
    its long-context tier if it has one."""
    input: decimal.Decimal
    output: decimal.Decimal
    cached_input: Optional[decimal.Decimal] = None
    cache_write: Optional[decimal.Decimal] = None
    cache_write_1h: Optional[decimal.Decimal] = None
    source: str = ""
    long_context: Optional["LongContextTier"] = None

    @classmethod
    def from_fields(cls, fields, source):
        """Build from a mapping of PRICE_FIELDS names to numbers or None,
        and ``long_context`` (LONG_CONTEXT_FIELDS and PRICE_FIELDS) or None."""
        values = {name: None if fields.get(name) is None else decimal.Decimal(str(fields[name]))
                  for name in PRICE_FIELDS}
        tier = fields.get("long_context")
        if tier is not None:
            tier = LongContextTier(int(tier["above_tokens"]), tier.get("charge", "whole"),
                                   cls.from_fields(dict(tier, long_context=None), source))
        return cls(source=source, long_context=tier, **values)

    def as_dict(self):
        prices = {name: None if getattr(self, name) is None else float(getattr(self, name))
                  for name in PRICE_FIELDS}
        tier = self.long_context
        prices["long_context"] = None if tier is None else dict(
            {name: value for name, value in tier.price.as_dict().items() if name != "long_context"},
            above_tokens=tier.above_tokens, charge=tier.charge)
        return prices


@dataclasses.dataclass(frozen=True)
class LongContextTier:
    """Prices for a prompt (all input: uncached, cache reads and writes)
    longer than ``above_tokens``: ``whole`` charges the whole request at
    them, ``excess`` only the prompt tokens past the threshold."""
    above_tokens: int
    charge: str
    price: Price


_DATE_SUFFIX = re.compile(r"-(\d{4}-\d{2}-\d{2}|\d{8})$")


class PriceTable:
    """Model prices in force. Precedence: config.yaml ``pricing``, then price
    packs imported into the database (``cli.py prices import``), then built-in."""

    def __init__(self, prices):
        self._prices = dict(prices)

    @classmethod
    def build(cls, config_pricing=None, imported=None):
        prices = {model: Price.from_fields(builtin_price_fields(model), values[-1])
                  for model, values in BUILTIN_PRICES.items()}
        for model, (fields, source) in (imported or {}).items():
            prices[model] = Price.from_fields(fields, source)
        for model, fields in (config_pricing or {}).items():
            prices[model] = Price.from_fields(fields, "config.yaml")
        return cls(prices)

    def items(self):
        return sorted(self._prices.items())

    def lookup(self, model):
        """The price of ``model``, trying it bare of a provider prefix (the
        first segment: OpenRouter's and Together's names have a vendor's
        too, ``openrouter/anthropic/claude-sonnet-4.5``; then of every
        prefix) and of a date suffix (``gpt-4o-2024-08-06`` costs what
        ``gpt-4o`` costs)."""
        if not model:
            return None
        for candidate in (model, model.split("/", 1)[-1], model.rsplit("/", 1)[-1]):
            for name in (candidate, candidate.lower(), _DATE_SUFFIX.sub("", candidate.lower())):
                price = self._prices.get(name)
                if price is not None:
                    return price
        return self._prices.get("default")


#: Our price-pack format (shared/prices.json): per-million-token fields.
_PACK_FIELDS = {"input": "input_per_mtok", "output": "output_per_mtok",
                "cache_write": "cache_write_per_mtok", "cache_write_1h": "cache_write_1h_per_mtok"}
_PACK_CACHED_INPUT = ("cached_input_per_mtok", "cache_read_per_mtok")  # either name, the first preferred
#: LiteLLM's model_prices_and_context_window.json: per-token fields.
_LITELLM_FIELDS = {"input": "input_cost_per_token", "output": "output_cost_per_token",
                   "cached_input": "cache_read_input_token_cost",
                   "cache_write": "cache_creation_input_token_cost",
                   "cache_write_1h": "cache_creation_input_token_cost_above_1hr"}
_LITELLM_MODES = (None, "chat", "completion", "embedding", "responses")


def parse_price_pack(document):
    """Prices from a price pack, as model -> PRICE_FIELDS (USD per million).

    Two formats: ours (``{"models": {name: {"input_per_mtok": ...}}}``, as in
    shared/prices.json) and LiteLLM's flat map of per-token costs, whose
    provider-prefixed keys (``mistral/mistral-large``) also price the bare
    name when the pack has no entry of that name. Entries without an input
    price, or without an output price outside embeddings, are skipped:
    unknown is not zero. Raises ConfigError if the document is neither.
    """
    if not isinstance(document, dict):
        raise ConfigError("a price pack is a JSON object")
    prices = {}
    if isinstance(document.get("models"), dict):
        for model, entry in document["models"].items():
            where = "models.%s" % check_text(model, "price pack: a model name")
            _check_pack_prices(_expect(entry, dict, where), tuple(_PACK_FIELDS.values()) + _PACK_CACHED_INPUT,
                               where, MAX_PRICE_USD_PER_MTOK)
            fields = {name: entry.get(key) for name, key in _PACK_FIELDS.items()}
            fields["cached_input"] = entry.get(_PACK_CACHED_INPUT[0], entry.get(_PACK_CACHED_INPUT[1]))
            if _has_prices(fields):
                prices[model] = fields
        return prices
    million = decimal.Decimal(1000000)
    bare = {}
    for model, entry in document.items():
        if model == "sample_spec" or not isinstance(entry, dict) or entry.get("mode") not in _LITELLM_MODES:
            continue
        _check_pack_prices(entry, _LITELLM_FIELDS.values(), check_text(model, "price pack: a model name"),
                           MAX_PRICE_USD_PER_MTOK / million)
        fields = {name: entry.get(key) for name, key in _LITELLM_FIELDS.items()}
        if fields["output"] is None and entry.get("mode") == "embedding":
            fields["output"] = 0
        if not _has_prices(fields):
            continue
        # Per-token floats to per-million decimals, exactly: 2.5e-06 -> 2.5.
        prices[model] = {name: None if value is None else
                         format((decimal.Decimal(str(value)) * million).normalize(), "f")
                         for name, value in fields.items()}
        bare.setdefault(model.rsplit("/", 1)[-1], prices[model])
    for model, fields in bare.items():
        prices.setdefault(model, fields)
    return prices


def _check_pack_prices(entry, keys, where, high):
    """Each price a pack entry gives is a number from 0 to ``high`` (one
    bad number refuses the pack: it would be charged)."""
    for key in keys:
        if entry.get(key) is not None:
            check_number(entry[key], "price pack: %s.%s" % (where, key), 0, high)


def _has_prices(fields):
    """An entry without an input or output price is skipped: unknown is not zero."""
    return fields["input"] is not None and fields["output"] is not None


@dataclasses.dataclass
class Usage:
    """Token counts for one call, normalised across providers."""
    input_tokens: int = 0            # uncached input
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0      # 5-minute (or unspecified) cache writes
    cache_write_1h_tokens: int = 0
    output_tokens: int = 0           # reasoning included
    reasoning_tokens: int = 0        # informational: already inside output
    source: str = "none"             # reported | estimated | none

    @property
    def request_tokens(self):
        return self.input_tokens + self.cache_read_tokens + self.cache_write_tokens + self.cache_write_1h_tokens

    @property
    def response_tokens(self):
        return self.output_tokens


_MAX_COUNT = 10 ** 12  # more tokens than one call can use: garbage, like NaN


def _count(value):
    """A token count from a provider's JSON; garbage counts as 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= _MAX_COUNT:
        return 0
    return int(value)


def _details(usage, name):
    details = usage.get(name)
    return details if isinstance(details, dict) else {}


def _openai_family_usage(usage, input_name, output_name, cache_hit_fallback=None):
    """OpenAI's rule under either naming: the input count includes cached
    and cache-write tokens; the output count includes reasoning."""
    details = _details(usage, input_name + "_details")
    cached = _count(details.get("cached_tokens") or (cache_hit_fallback and usage.get(cache_hit_fallback)))
    written = _count(details.get("cache_write_tokens"))
    return Usage(input_tokens=max(_count(usage.get(input_name)) - cached - written, 0), cache_read_tokens=cached,
                 cache_write_tokens=written, output_tokens=_count(usage.get(output_name)),
                 reasoning_tokens=_count(_details(usage, output_name + "_details").get("reasoning_tokens")),
                 source="reported")


def openai_usage(usage):
    """Chat, completions and embeddings ``usage`` (DeepSeek may report cache
    hits only as ``prompt_cache_hit_tokens``)."""
    return _openai_family_usage(usage, "prompt_tokens", "completion_tokens", "prompt_cache_hit_tokens")


def responses_usage(usage):
    """Responses API ``usage``: the same rules under other names."""
    return _openai_family_usage(usage, "input_tokens", "output_tokens")


def anthropic_usage(usage):
    """Messages ``usage``: input_tokens excludes cache reads and writes; the
    1-hour share of cache writes is priced apart when reported."""
    written = _count(usage.get("cache_creation_input_tokens"))
    written_1h = min(_count(_details(usage, "cache_creation").get("ephemeral_1h_input_tokens")), written)
    return Usage(input_tokens=_count(usage.get("input_tokens")),
                 cache_read_tokens=_count(usage.get("cache_read_input_tokens")),
                 cache_write_tokens=written - written_1h, cache_write_1h_tokens=written_1h,
                 output_tokens=_count(usage.get("output_tokens")),
                 reasoning_tokens=_count(_details(usage, "output_tokens_details").get("thinking_tokens")),
                 source="reported")


def cost_nanousd(price, usage):
    """The cost of ``usage`` at ``price`` in integer nano-dollars (rounded
    once, half to even).

    A missing cache price falls back to the price the tokens would otherwise
    carry: cache reads and writes to input, 1-hour writes to 5-minute writes.
    A prompt longer than the price's long-context threshold is charged at
    the tier's prices: all of the request, or (``excess``) the prompt tokens
    past the threshold, taken in the prompt's order (the cached prefix read,
    then written, then uncached input).
    """
    tier = price.long_context
    if tier is None or usage.request_tokens <= tier.above_tokens:
        usd_per_mtok_tokens = _usd_per_mtok_tokens(price, usage)
    elif tier.charge == "whole":
        usd_per_mtok_tokens = _usd_per_mtok_tokens(tier.price, usage)
    else:
        below, above = dataclasses.replace(usage), Usage(output_tokens=0)
        room = tier.above_tokens
        for name in ("cache_read_tokens", "cache_write_tokens", "cache_write_1h_tokens", "input_tokens"):
            kept = min(getattr(usage, name), room)
            room -= kept
            setattr(below, name, kept)
            setattr(above, name, getattr(usage, name) - kept)
        usd_per_mtok_tokens = _usd_per_mtok_tokens(price, below) + _usd_per_mtok_tokens(tier.price, above)
    # USD per million tokens * tokens = micro-dollars; * 1000 = nano-dollars.
    return int((usd_per_mtok_tokens * 1000).to_integral_value(decimal.ROUND_HALF_EVEN))


def _usd_per_mtok_tokens(price, usage):
    """Tokens times their prices (USD per million tokens), not yet rounded."""
    cached = price.cached_input if price.cached_input is not None else price.input
    write = price.cache_write if price.cache_write is not None else price.input
    write_1h = price.cache_write_1h if price.cache_write_1h is not None else write
    return (usage.input_tokens * price.input + usage.cache_read_tokens * cached
            + usage.cache_write_tokens * write + usage.cache_write_1h_tokens * write_1h
            + usage.output_tokens * price.output)


def costliest_input(price):
    """``price`` with every input token at the costliest input price
    (uncached, cache read or write) and a long-context tier no cheaper than
    it: a bound for a prompt not yet split into those kinds."""
    def dearest(price):
        return max(value for value in (price.input, price.cached_input, price.cache_write, price.cache_write_1h)
                   if value is not None)
    tier = price.long_context
    if tier is not None:
        tier = dataclasses.replace(tier, price=Price(max(dearest(tier.price), dearest(price)),
                                                     max(tier.price.output, price.output)))
    return Price(dearest(price), price.output, long_context=tier)


def price_usage(price, usage):
    """(cost in nano-dollars, priced flag) of a usage row: with no price, a
    row that counted tokens costs 0 and is marked unpriced."""
    if price is None:
        return 0, int(not (usage.request_tokens or usage.response_tokens))
    return cost_nanousd(price, usage), 1


def estimate_tokens(characters):
    """The documented estimate when a provider reports nothing: 4 characters a token."""
    return (characters + 3) // 4


def text_characters(value):
    """Characters of text in a JSON value (all strings, at any depth). Walked
    without recursion: a provider's answer is not bounded in depth, and an
    estimate must never fail the call it accounts for."""
    characters, pending = 0, [value]
    while pending:
        value = pending.pop()
        if isinstance(value, str):
            characters += len(value)
        elif isinstance(value, dict):
            pending.extend(v for k, v in value.items() if k != "model")
        elif isinstance(value, list):
            pending.extend(value)
    return characters


# ==== 5. Providers ==========================================================
#
# A provider is a configured base URL, the API dialects it can serve and a
# pool of keep-alive connections to it: no request pays a TCP or TLS
# handshake when a connection is idle. Nothing but a configured base URL is
# ever contacted, and redirects are never followed.
#
# A call spends most of its life waiting for its provider: for the answer's
# first byte, for the next stream event. Those waits are generators: a
# provider socket is never read or written blocking; where a read or write
# would wait (nothing in the kernel, a TLS record not yet whole), the
# request path yields a ProviderWait and is resumed when the provider's
# socket is ready or its deadline passes (section 11 parks it on the
# kernel's readiness queue meanwhile), so a waiting call costs a socket and
# a little state, not a thread. The answer is decoded here from what
# arrived (head, chunks, events), never from a blocking file: a provider
# that sends part of a line, chunk, event or TLS record and stalls holds no
# worker either. Opening a connection (TCP connect, a proxy's CONNECT, the
# TLS handshake) waits the same way, up to ``upstream_connect_timeout``;
# only resolving the provider's name blocks, briefly (the pool spares most
# calls even that).

#: Azure OpenAI's classic API serves these under the model's deployment.
AZURE_DEPLOYMENT_PATHS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")
#: Request headers passed to a provider; everything else (credentials,
#: hop-by-hop headers, cookies, forwarding headers) stays behind.
FORWARDED_REQUEST_HEADERS = ("accept", "user-agent", "anthropic-beta", "openai-beta")
#: What coding agents send for prompt caching and attribution, passed to the
#: providers of the API the agent's own client speaks, as it would send them
#: there itself: Codex's session, originator and beta features to
#: OpenAI-format providers, Claude Code's session id (which Claude Code's
#: gateway docs give proxies to group a session's calls) to Anthropic-format ones.
AGENT_REQUEST_HEADERS = {OPENAI: ("session_id", "originator", "x-codex-beta-features"),
                         ANTHROPIC: ("x-claude-code-session-id",)}
#: The blank line that ends an SSE event, in any of the three line endings.
_EVENT_END = re.compile(rb"\r\n\r\n|\n\n|\r\r")
MAX_EVENT_BYTES = 1024 * 1024
MAX_UPSTREAM_BODY_BYTES = 64 * 1024 * 1024
#: Response headers passed back to the client: request ids, retry advice
#: (the SDKs obey ``x-should-retry`` before the status), the model that
#: served (Codex reads ``openai-model``), timing. Never the provider's
#: cookies or organization and project ids: they are the operator's.
FORWARDED_RESPONSE_HEADERS = ("x-request-id", "request-id", "retry-after", "retry-after-ms", "x-should-retry",
                              "openai-model", "openai-processing-ms")
FORWARDED_RESPONSE_PREFIXES = ("x-ratelimit-", "anthropic-ratelimit-")


class UpstreamPool:
    """A bounded LIFO pool of keep-alive connections to one base URL."""

    def __init__(self, base_url, connect_timeout, read_timeout, allow_link_local=False, max_idle=32, name="?",
                 tls=None, proxy=None):
        parts = urllib.parse.urlsplit(base_url)
        self.name = name
        self.allow_link_local = allow_link_local
        self.scheme, self.host = parts.scheme, parts.hostname
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.base_path = parts.path.rstrip("/")
        default_port = parts.port is None or self.port == (443 if parts.scheme == "https" else 80)
        host = "[%s]" % self.host if ":" in self.host else self.host.encode("idna").decode("ascii")
        #: The Host field of every request, as http.client would write it.
        self.host_field = host if default_port else "%s:%d" % (host, self.port)
        #: host:port, as a CONNECT request names it.
        self.authority = "%s:%d" % (host, self.port)
        self.connect_timeout, self.read_timeout = connect_timeout, read_timeout
        self._max_idle = max_idle
        self._idle = []
        self._lock = threading.Lock()
        self._tls = (tls or ssl.create_default_context()) if self.scheme == "https" else None
        #: (host, port, CONNECT header fields) of the proxy tunnelling every connection, or None.
        self.proxy = proxy

    #: Idle connections older than this are closed, not reused: providers
    #: and load balancers drop idle keep-alive connections after a while.
    max_idle_seconds = 20.0

    def acquire(self, fresh=False):
        """Return (connection, reused): an idle one, or a new one opened now.
        A generator: opening yields ProviderWaits (see ``_open``)."""
        now = time.monotonic()
        with self._lock:
            while self._idle and not fresh:
                conn, released_at = self._idle.pop()
                if now - released_at < self.max_idle_seconds and conn.untouched():
                    return conn, True
                conn.close()
        return (yield from self._open()), False

    def _open(self):
        """A new connection to the host, direct or through the proxy's
        tunnel, TLS verified: TCP connect, CONNECT and TLS handshake are
        non-blocking steps yielding ProviderWaits, all within
        ``connect_timeout`` (socket.timeout past it). Resolving the name
        (getaddrinfo) still blocks: the system's resolver has no
        non-blocking form, and its cache makes it quick after the first."""
        deadline = time.monotonic() + self.connect_timeout
        if self.proxy is None:
            conn = yield from self._reach(self.host, self.port, deadline, refuse_link_local=True)
        else:  # the proxy resolves the provider's name
            conn = yield from self._reach(self.proxy[0], self.proxy[1], deadline, refuse_link_local=False)
        try:
            if self.proxy is not None:
                yield from conn.tunnel(self.authority, self.proxy[2], deadline)
            if self._tls is not None:
                yield from conn.secure(self._tls, self.host, deadline)
        except BaseException:  # the call closed while waiting too
            conn.close()
            raise
        return conn

    def _reach(self, host, port, deadline, refuse_link_local):
        """A connection (TCP) to the first address of ``host`` that
        accepts, refusing link-local and metadata addresses when asked
        unless allowed."""
        error = None
        for family, kind, proto, _, address in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM):
            if refuse_link_local and not self.allow_link_local and is_link_local(address[0]):
                raise UpstreamError("The provider's address is link-local; the gateway refuses it",
                                    code="upstream_address_refused")
            conn = UpstreamConnection(socket.socket(family, kind, proto), self.name)
            try:
                conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                yield from conn.connect(address, deadline)
            except socket.timeout:
                conn.close()
                raise
            except OSError as exc:
                conn.close()
                error = exc
                continue
            except BaseException:
                conn.close()
                raise
            return conn
        raise error or OSError("no address for %s" % host)

    def release(self, conn):
        """Return a connection whose last response was read to the end (one
        with bytes beyond it, or closed by the provider, is closed)."""
        if conn.buffer or conn.ended:
            conn.close()
            return
        with self._lock:
            if len(self._idle) < self._max_idle:
                self._idle.append((conn, time.monotonic()))
                return
        conn.close()

    def close(self):
        with self._lock:
            idle, self._idle = self._idle, []
        for conn, _ in idle:
            conn.close()


def provider_region(config, environ=os.environ):
    """A cloud provider's region: its ``region``, else (Bedrock) the one in
    its base URL's host, else AWS_REGION or AWS_DEFAULT_REGION."""
    if config.region is not None or config.format != BEDROCK:
        return config.region
    host = urllib.parse.urlsplit(config.base_url).hostname if config.base_url else ""
    named = re.match(r"bedrock-runtime(?:-fips)?\.([a-z0-9-]+)\.amazonaws\.com\Z", host or "")
    region = named.group(1) if named else environ.get("AWS_REGION") or environ.get("AWS_DEFAULT_REGION")
    if not region or not _CLOUD_NAME.match(region):
        raise ConfigError("providers.%s.region: missing (set it, or AWS_REGION, or a base_url of "
                          "bedrock-runtime.REGION.amazonaws.com)" % config.name)
    return region


def provider_base_url(config, environ=os.environ):
    """Where a provider is: its ``base_url``, else its cloud's endpoint in its region."""
    if config.base_url is not None:
        return config.base_url
    region = provider_region(config, environ)
    if config.format == BEDROCK:
        return "https://bedrock-runtime.%s.amazonaws.com" % region
    if region == "global":
        return "https://aiplatform.googleapis.com"
    return "https://%s-aiplatform.googleapis.com" % region


def provider_pool(config, connect_timeout, read_timeout, environ=os.environ):
    """The UpstreamPool of a provider: its base URL, TLS context and proxy."""
    base_url = provider_base_url(config, environ)
    parts = urllib.parse.urlsplit(base_url)
    return UpstreamPool(base_url, connect_timeout, read_timeout, config.allow_link_local, name=config.name,
                        tls=provider_tls(config) if parts.scheme == "https" else None,
                        proxy=provider_proxy(config, parts.scheme, parts.hostname, environ))


def provider_tls(config):
    """The TLS context of a provider: the system's CAs or ``ca_bundle``'s,
    ``client_cert`` (mutual TLS), and verification unless ``tls_verify:
    false``, which is logged as a warning each time it takes effect."""
    where = "providers.%s" % config.name
    try:
        context = ssl.create_default_context(cafile=config.ca_bundle)
    except OSError as exc:  # ssl.SSLError included
        raise ConfigError("%s.ca_bundle: cannot load %s (%s)" % (where, config.ca_bundle, exc.strerror or exc)) \
            from None
    if config.client_cert is not None:
        try:
            context.load_cert_chain(config.client_cert, config.client_key)
        except OSError as exc:
            raise ConfigError("%s.client_cert: cannot load %s (%s)" % (where, config.client_cert,
                                                                       exc.strerror or exc)) from None
    if not config.tls_verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        logger.warning("provider %s: TLS certificates are NOT verified (tls_verify: false in config.yaml); "
                       "anyone on the path can read and change its calls and keys", config.name)
    return context


def provider_proxy(config, scheme, host, environ=os.environ):
    """(host, port, CONNECT header fields) of the HTTP proxy a provider is
    reached through, or None: its ``proxy`` (none: never), else for an
    https base URL HTTPS_PROXY (or https_proxy) unless NO_PROXY names the
    host. Proxy credentials (user:password@) give Proxy-Authorization."""
    where = "providers.%s.proxy" % config.name
    value = config.proxy
    if value == NO_PROXY_SETTING:
        return None
    if value is None:
        if scheme != "https" or _bypasses_proxy(host, environ):
            return None
        value, where = environ.get("HTTPS_PROXY") or environ.get("https_proxy"), "HTTPS_PROXY"
        if not value:
            return None
    reference = _ENV_REFERENCE.match(value)
    if reference:
        value = environ.get(reference.group(1))
        if not value:
            raise ConfigError("%s: %s is not set" % (where, reference.group(1)))
    parts = urllib.parse.urlsplit(value if "://" in value else "http://" + value)
    try:
        port = parts.port or 80
    except ValueError:
        port = None
    if parts.scheme != "http" or not parts.hostname or port is None:
        raise ConfigError("%s: the proxy must be http://[user:password@]host:port" % where)
    fields = ()
    if parts.username is not None:
        credentials = "%s:%s" % (urllib.parse.unquote(parts.username), urllib.parse.unquote(parts.password or ""))
        fields = (("Proxy-Authorization", "Basic " + base64.b64encode(credentials.encode()).decode()),)
    logger.info("provider %s connects through the proxy %s:%d", config.name, parts.hostname, port)
    return parts.hostname, port, fields


def _bypasses_proxy(host, environ):
    """Whether NO_PROXY (or no_proxy) names ``host``: ``*``, the host, or a
    domain it is in (``example.com`` and ``.example.com`` alike)."""
    for entry in (environ.get("NO_PROXY") or environ.get("no_proxy") or "").split(","):
        entry = entry.strip().lower().lstrip(".")
        entry = entry.split(":")[0] if entry.count(":") == 1 else entry  # host:port; an IPv6 address stays
        if entry and (entry == "*" or host == entry or host.endswith("." + entry)):
            return True
    return False


#: The anthropic-beta values each cloud takes when its provider sets no
#: ``anthropic_betas``; others are dropped. From LiteLLM's
#: anthropic_beta_headers_config.json (BerriAI/litellm, read 2026-12-03):
#: the betas it passes unchanged to Bedrock InvokeModel and Vertex AI.
#: Anthropic itself and OpenAI-format providers get every value.
DEFAULT_ANTHROPIC_BETAS = {
    BEDROCK: ("compact-2026-01-12", "computer-use-2025-01-24", "computer-use-2025-11-24", "context-1m-2025-08-07",
              "context-management-2025-06-27", "dangerous-tool-use-2026-09-03", "effort-2025-11-24",
              "fine-grained-tool-streaming-2025-05-14", "mid-conversation-output-config-2026-07-01",
              "mid-conversation-tool-changes-2026-07-01", "thinking-binding-controls-2026-08-01",
              "thinking-display-updates-2026-08-18", "tool-search-tool-2025-10-19"),
    VERTEX: ("compact-2026-01-12", "compact-2026-09-04", "computer-use-2025-01-24", "computer-use-2025-11-24",
             "context-1m-2025-08-07", "context-management-2025-06-27", "dangerous-tool-use-2026-09-03",
             "interleaved-thinking-2025-05-14", "per-turn-control-2026-07-01", "thinking-binding-controls-2026-08-01",
             "thinking-display-updates-2026-08-18", "tool-search-tool-2025-10-19", "web-search-2025-03-05"),
}
#: The top-level body fields Bedrock's InvokeModel takes for Claude when
#: its provider sets no ``body_fields`` (AWS's Claude Messages API
#: parameters, as LiteLLM's BedrockInvokeAnthropicMessagesRequest lists
#: them, read 2026-12-03); others ("Extra inputs are not permitted") are
#: dropped. No other format has a default list: everything goes.
DEFAULT_BODY_FIELDS = {
    BEDROCK: ("max_tokens", "messages", "system", "stop_sequences", "temperature", "top_p", "top_k", "tools",
              "tool_choice", "thinking", "metadata", "output_config", "context_management"),
}
#: Body fields the gateway itself handles, never dropped by an allowlist.
GATEWAY_BODY_FIELDS = ("model", "stream", "stream_options")


def _allowlist(configured, default):
    """The names a provider lets through (a frozenset), or None for all."""
    names = configured if configured is not None else default
    return None if names is None or names == (ALLOW_ALL,) else frozenset(names)


class Provider:
    """One configured upstream speaking the API of its dialect (OpenAI's,
    or Anthropic's): where to send, how to authenticate. The formats that
    carry Claude's API on a cloud are subclasses (CloudClaudeProvider):
    each says which calls it serves, writes its request (``prepare``) and
    reads its answer (``stream_type``, ``events``, ``client_body``) in its
    own way."""

    def __init__(self, config, server_config, environ=os.environ):
        self.name = config.name
        self.format = config.format
        #: The API it speaks natively (Azure's is OpenAI's; Bedrock's and Vertex's Anthropic's).
        self.dialect = ANTHROPIC if config.format in (ANTHROPIC, BEDROCK, VERTEX) else OPENAI
        self.models = config.models
        self.config = config
        self.region = provider_region(config, environ)
        self.allowed_betas = _allowlist(config.anthropic_betas, DEFAULT_ANTHROPIC_BETAS.get(config.format))
        self.allowed_fields = _allowlist(config.body_fields, DEFAULT_BODY_FIELDS.get(config.format))
        self.pool = provider_pool(config, server_config.upstream_connect_timeout, server_config.upstream_timeout,
                                  environ)

    def serves(self, dialect, path):
        """Anthropic-format providers serve both dialects (Anthropic has an
        OpenAI-compatible endpoint); OpenAI-format ones only OpenAI calls."""
        return dialect == OPENAI or self.format == ANTHROPIC

    def matches(self, model):
        return any(fnmatch.fnmatchcase(model, glob) for glob in self.models)

    def target(self, path, model):
        """The provider's request target for one of the gateway's ``/v1/...``
        paths. A base URL is the one the provider's own docs give its SDK:
        an OpenAI-format one carries the API's version (Gemini's
        ``/v1beta/openai``, Groq's ``/openai/v1``, Ollama's ``/v1``, Azure's
        ``/openai/v1``) and takes the place of ``/v1``; Anthropic's SDK adds
        ``/v1`` itself, so an Anthropic-format base is followed by the whole
        path. A host alone means ``/v1``, for either. Azure's classic API
        (an ``api_version``) has chat, completions and embeddings under
        the model's deployment, and every path versioned."""
        base = self.pool.base_path
        if not base or self.format == ANTHROPIC:
            return base + path
        if self.config.api_version is None:
            return base + path[len("/v1"):]
        if path in AZURE_DEPLOYMENT_PATHS:
            base += "/deployments/" + urllib.parse.quote(self.upstream_name(model), safe="")
        return "%s%s?api-version=%s" % (base, path[len("/v1"):], self.config.api_version)

    def upstream_name(self, model):
        """The model's name at the provider: on Azure, its deployment's."""
        return self.config.azure_deployments.get(model, model) if self.format == AZURE else model

    def credential(self, dialect, api_key):
        """The header line that carries the provider key."""
        if dialect == ANTHROPIC:
            return "x-api-key: " + api_key
        return ("api-key: " if self.format == AZURE else "Authorization: Bearer ") + api_key

    def prepare(self, method, path, model, dialect, credential, client_headers, route, raw, body, streamed):
        """One attempt's request for ``model`` as bytes, and whether the
        client must not see the usage chunk the gateway asked for."""
        data, hide_usage_chunk = upstream_body(route, raw, body, self.upstream_name(model), streamed,
                                               self.dropped_fields(body))
        return upstream_request(method, self.target(path, model), self.pool.host_field, dialect, self.dialect,
                                self.credential(dialect, credential), self.beta_headers(client_headers),
                                data if method != "GET" else None), hide_usage_chunk

    def kept_betas(self, client_headers):
        """The client's anthropic-beta values this provider takes: those on
        its allowlist (all, without one); the others are logged at DEBUG."""
        betas = [beta.strip() for beta in client_headers.get("anthropic-beta", "").split(",") if beta.strip()]
        if self.allowed_betas is None:
            return betas
        kept = [beta for beta in betas if beta in self.allowed_betas]
        if len(kept) < len(betas):
            logger.debug("provider %s does not take anthropic-beta %s: dropped", self.name,
                         ", ".join(beta for beta in betas if beta not in self.allowed_betas))
        return kept

    def beta_headers(self, client_headers):
        """The client's headers, anthropic-beta cut to the provider's allowlist."""
        if self.allowed_betas is None or "anthropic-beta" not in client_headers:
            return client_headers
        headers = dict(client_headers)
        headers["anthropic-beta"] = ",".join(self.kept_betas(client_headers))
        if not headers["anthropic-beta"]:
            del headers["anthropic-beta"]
        return headers

    def dropped_fields(self, body):
        """The client's body fields this provider does not take (logged at
        DEBUG); never those the gateway itself handles (model, stream)."""
        if self.allowed_fields is None or not body:
            return ()
        dropped = [name for name in body if name not in self.allowed_fields and name not in GATEWAY_BODY_FIELDS]
        if dropped:
            logger.debug("provider %s does not take body fields %s: dropped", self.name, shown(dropped, 200))
        return dropped

    def stream_type(self, response):
        """The content type a streamed answer is relayed with; None for an
        answer that is not a stream."""
        content_type = response.getheader("content-type", "")
        return content_type if content_type.startswith("text/event-stream") else None

    def events(self, upstream, deadline, idle_timeout):
        """A streamed answer's SSE events, as the client gets them (see
        UpstreamConnection.events)."""
        return upstream.events(deadline, idle_timeout)

    def client_body(self, status, body):
        """A whole answer's body, as the client gets it."""
        return body

    def credentials_refused(self):
        """The provider answered 401 or 403 to the deployment's credentials."""

    def send(self, method, request, head_timeout=None):
        """Send one request (bytes from ``prepare``) and read the response's
        head: a generator that yields ProviderWaits until the answer begins
        and returns its UpstreamConnection. Raises UpstreamTimeoutError (no
        answer within ``head_timeout``, by default ``server.upstream_timeout``),
        UpstreamError ``upstream_unavailable`` (no connection, or it broke)
        or ``upstream_bad_response`` (a head the gateway refuses), or
        ServiceUnavailableError when no file descriptor is left.

        A pooled connection the provider has closed in the meantime fails
        before any response byte; only then is the request sent once more,
        on a new connection, so a call is never billed twice.
        """
        head_timeout = head_timeout or self.pool.read_timeout
        for fresh in (False, True):
            conn, reused = None, False
            try:
                conn, reused = yield from self.pool.acquire(fresh)
                yield from conn.exchange(request, method, time.monotonic() + head_timeout)
                return conn
            except BaseException as exc:  # timeouts and TLS errors too; the call closed while waiting
                if conn is not None:
                    conn.close()
                if not isinstance(exc, (OSError, http.client.HTTPException)):
                    raise
                if isinstance(exc, socket.timeout):
                    raise UpstreamTimeoutError("provider %s did not answer in time" % self.name) from None
                if isinstance(exc, OSError) and exc.errno in (errno.EMFILE, errno.ENFILE):
                    raise ServiceUnavailableError("The gateway has no file descriptor to spare; retry shortly",
                                                  code="gateway_full", headers=[("retry-after", "1")]) from None
                if reused and not fresh and isinstance(exc, (ConnectionResetError, BrokenPipeError)):
                    continue
                if isinstance(exc, OSError):  # RemoteDisconnected too: closed without an answer
                    raise UpstreamError("provider %s is unreachable (%s)" % (self.name, type(exc).__name__),
                                        code="upstream_unavailable") from None
                raise UpstreamError("provider %s sent a malformed answer (%s)" % (self.name, type(exc).__name__),
                                    code="upstream_bad_response") from None


def upstream_body(route, raw, body, upstream_model, streamed, dropped=()):
    """The bytes to forward, and whether the client must not see the usage
    chunk the gateway asked for. The client's bytes go unchanged unless the
    model lost its provider prefix, the stream needs usage switched on or
    fields are ``dropped``."""
    if raw is None:
        return b"", False  # Content-Length: 0 (a GET is sent without)
    options = body.get("stream_options")
    asked_for_usage = isinstance(options, dict) and options.get("include_usage") is True
    needs_usage = streamed and route.injects_stream_usage and not asked_for_usage
    if upstream_model == body.get("model") and not needs_usage and not dropped:
        return raw, False
    changed = {name: value for name, value in body.items() if name not in dropped}
    changed["model"] = upstream_model
    if needs_usage:
        changed["stream_options"] = dict(options if isinstance(options, dict) else {}, include_usage=True)
    return json.dumps(changed, ensure_ascii=False, separators=(",", ":")).encode("utf-8"), needs_usage


def upstream_request(method, target, host_field, dialect, provider_dialect, credential, client_headers, body):
    """A provider request as bytes, sent in one write: the request line,
    our header fields with the real key (``credential``, its header line),
    the client's that this provider's API takes, and the body. Every value
    is printable (the gateway's head parser and key checks saw to that)."""
    lines = ["%s %s HTTP/1.1" % (method, target), "Host: " + host_field, "Accept-Encoding: identity",
             "Content-Type: application/json", credential]
    lines.extend("%s: %s" % (name, client_headers[name]) for name in FORWARDED_REQUEST_HEADERS
                 + AGENT_REQUEST_HEADERS[provider_dialect] if name in client_headers)
    if dialect == ANTHROPIC:
        lines.append("anthropic-version: " + client_headers.get("anthropic-version", DEFAULT_ANTHROPIC_VERSION))
    return request_bytes(lines, body)


def request_bytes(lines, body):
    """The request line and header ``lines``, Content-Length, and the body."""
    if body is not None:
        lines.append("Content-Length: %d" % len(body))
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    return head + body if body is not None else head


class ProviderWait:
    """What a call waits for: its provider's socket to be readable (or
    writable, ``writing``), or ``deadline`` (time.monotonic()) to pass,
    whichever comes first. Without a socket it is a timer (a backoff
    between attempts)."""
    __slots__ = ("sock", "deadline", "writing")

    def __init__(self, sock, deadline, writing=False):
        self.sock, self.deadline, self.writing = sock, deadline, writing


def wait_out(steps):
    """Run a generator that yields ProviderWaits to its end on this thread,
    blocking on each wait, and return its value: for the gateway's own
    calls outside the request path (alert webhooks, doctor's reach)."""
    try:
        wait = next(steps)
        while True:
            if wait.sock is not None:
                poller = select.poll()
                poller.register(wait.sock, select.POLLOUT if wait.writing else select.POLLIN)
                poller.poll(max(0.0, wait.deadline - time.monotonic()) * 1000)
            else:
                time.sleep(max(0.0, wait.deadline - time.monotonic()))
            wait = next(steps)
    except StopIteration as end:
        return end.value


#: Bounds on a provider's response head, as http.client sets them, and on
#: the interim (1xx) answers before it.
MAX_UPSTREAM_HEADER_LINE = 65536
MAX_UPSTREAM_HEADER_FIELDS = 100
MAX_INTERIM_ANSWERS = 10
#: A chunk's size line, extensions included, and a trailer line.
MAX_CHUNK_LINE = 4096
#: A chunk's size line in its plain form (no extension), as providers send it.
_PLAIN_CHUNK_SIZE = re.compile(rb"([0-9A-Fa-f]{1,8})\r\n")
_LINE_END_BYTES = re.compile(rb"\r?\n")
#: The most a TLS record carries: a read of less took all there was.
TLS_RECORD_BYTES = 16384


class UpstreamConnection:
    """A keep-alive connection to a provider: its socket, the bytes read
    from it and not yet used, and the response being read (closed
    together).

    Every read and write is non-blocking. Where one would wait (nothing in
    the kernel, a TLS record not yet whole: ``SSLWantReadError``, or TLS
    needing to write first: ``SSLWantWriteError``), the method yields a
    ProviderWait and tries again when resumed. Nothing is decoded before it
    is whole (the head once its blank line is in, a chunk's size once its
    line is in, an event once its blank line is in), so a provider that
    sends part of a head, chunk, event or TLS record and then stalls holds
    a socket and its bytes, never a worker.

    Here a transport failure becomes the gateway's own UpstreamTimeoutError
    or UpstreamCutError (``read_chunk``, under ``read_body`` and
    ``events``): nothing above this section catches socket or http.client
    exceptions.
    """
    __slots__ = ("sock", "buffer", "ended", "response", "provider_name", "drained", "read_wait")

    def __init__(self, sock, provider_name="?"):
        sock.setblocking(False)
        self.sock, self.buffer, self.ended, self.response = sock, bytearray(), False, None
        self.provider_name = provider_name
        self.drained = False  # the last read took all there was (see ``_receive``)
        self.read_wait = None

    def _waits_for(self, action, deadline, sending=False):
        """Try ``action`` (a receive, or a send) until it does not have to
        wait, yielding ProviderWaits meanwhile; returns its value. Raises
        socket.timeout once ``deadline`` has passed."""
        while True:
            try:
                return action()
            except ssl.SSLWantReadError:  # TLS needs the rest of a record, even to send
                writing = False
            except ssl.SSLWantWriteError:  # ... or to write first, even to receive
                writing = True
            except BlockingIOError:
                writing = sending
            if time.monotonic() >= deadline:
                raise socket.timeout()
            yield ProviderWait(self.sock, deadline, writing)

    def connect(self, address, deadline):
        """Connect the socket to ``address`` (TCP), yielding a ProviderWait
        (writable) while the handshake is under way. Raises OSError
        (socket.timeout once ``deadline`` has passed)."""
        def attempt():
            error = self.sock.connect_ex(address)
            if error == errno.EINPROGRESS:
                # A non-blocking connect always says "in progress", but with a provider on this host
                # (loopback, a sidecar) the handshake is done by the time it returns: asking again
                # costs one call to the kernel, where waiting costs a park and a wake-up.
                error = self.sock.connect_ex(address)
            if error in (errno.EINPROGRESS, errno.EALREADY, errno.EWOULDBLOCK):
                raise BlockingIOError(error, os.strerror(error))
            if error not in (0, errno.EISCONN):
                raise OSError(error, os.strerror(error))
        yield from self._waits_for(attempt, deadline, sending=True)

    def tunnel(self, authority, fields, deadline):
        """Ask the HTTP proxy this connection reaches for a tunnel to
        ``authority`` (host:port) with CONNECT and header ``fields``; the
        socket then leads to the provider. Raises OSError when the proxy
        refuses (407, 403, 502 ...) or breaks off."""
        lines = ["CONNECT %s HTTP/1.1" % authority, "Host: " + authority]
        lines.extend("%s: %s" % field for field in fields)
        try:
            response = yield from self.exchange(request_bytes(lines, None), "CONNECT", deadline)
        except http.client.HTTPException as exc:
            raise OSError("the proxy broke off the tunnel (%s)" % type(exc).__name__) from None
        self.response = None
        if response.status // 100 != 2 or self.buffer:
            raise OSError("the proxy refused the tunnel (HTTP %d)" % response.status)

    def secure(self, context, host, deadline):
        """Make the connection TLS (``context``, verifying ``host``): the
        handshake yields ProviderWaits while it waits for the provider.
        Raises OSError (ssl.SSLError, socket.timeout)."""
        self.sock = context.wrap_socket(self.sock, server_hostname=host, do_handshake_on_connect=False)
        yield from self._waits_for(self.sock.do_handshake, deadline)

    def _receive(self, deadline):
        """Read what the provider sent next into ``buffer``, or note the end
        of its side (``ended``), waiting for it up to ``deadline``.

        A read shorter than a TLS record's most (no decrypted bytes left
        inside TLS) took all there was: the next read waits for the socket
        to be readable before it tries, since trying would find nothing and
        cost an exception (on every event relayed). Bytes that arrived in
        the meantime make the wait end at once."""
        if self.drained:
            self.drained = False
            wait = self.read_wait  # one for every such wait: read by the pool as it parks, then done with
            if wait is None or wait.sock is not self.sock:
                wait = self.read_wait = ProviderWait(self.sock, deadline)
            wait.deadline = deadline
            yield wait
        data = yield from self._waits_for(lambda: self.sock.recv(65536), deadline)
        if data:
            self.buffer += data
            sock = self.sock
            self.drained = len(data) < TLS_RECORD_BYTES and not (
                isinstance(sock, ssl.SSLSocket) and sock.pending())
        else:
            self.ended = True

    def exchange(self, request, method, deadline):
        """Send a request and read its answer's head (interim answers
        skipped), waiting up to ``deadline``; returns the UpstreamResponse.
        Raises socket.timeout, OSError (ConnectionError when the provider
        closed the connection before any byte of an answer) or
        http.client.HTTPException (a head the gateway refuses)."""
        self.response = None
        data = memoryview(request)
        while data:
            sent = yield from self._waits_for(lambda: self.sock.send(data), deadline, sending=True)
            data = data[sent:]
        while True:
            response = UpstreamResponse.parse(self.buffer, method)
            if response is not None:
                self.response = response
                return response
            if self.ended:
                if self.buffer:
                    raise http.client.IncompleteRead(bytes(self.buffer[:100]))
                raise http.client.RemoteDisconnected("the provider closed the connection without an answer")
            yield from self._receive(deadline)

    def read_chunk(self, deadline):
        """The next bytes of the body (b"" at its end), yielding
        ProviderWaits until some arrive or ``deadline`` passes."""
        try:
            while True:
                data = self.response.decode(self.buffer, self.ended)
                if data is not None:
                    return data
                yield from self._receive(deadline)
        except socket.timeout:
            raise UpstreamTimeoutError("Provider %s stopped answering" % self.provider_name) from None
        except (OSError, http.client.HTTPException):
            raise UpstreamCutError("Provider %s broke off its answer" % self.provider_name) from None

    def read_body(self, deadline, read_timeout):
        """A non-streamed answer (a generator yielding ProviderWaits while
        the provider is silent), read by the chunk so that ``deadline``
        holds against a provider that drips: each read waits
        ``read_timeout`` at most, less when the deadline is nearer."""
        parts, size = [], 0
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise UpstreamTimeoutError("Provider %s stopped answering" % self.provider_name)
            data = yield from self.read_chunk(time.monotonic() + min(remaining, read_timeout))
            if not data:
                return b"".join(parts)
            parts.append(data)
            size += len(data)
            if size > MAX_UPSTREAM_BODY_BYTES:
                raise UpstreamError("The provider's answer is larger than %d bytes" % MAX_UPSTREAM_BODY_BYTES)

    def events(self, deadline, idle_timeout, split=None):
        """Yield complete SSE events (bytes, terminator included) as they
        arrive, and a ProviderWait whenever the next one has not. Raises
        UpstreamCutError if the stream ends inside an event or an event
        grows past MAX_EVENT_BYTES, UpstreamTimeoutError if it is quiet for
        ``idle_timeout`` or outlives ``deadline``. ``split(buffer)`` returns
        the events complete at the front of the bytes read and the rest
        (``split_sse``, or a decoder of another framing)."""
        split = split or split_sse
        buffer = b""
        while True:
            now = time.monotonic()
            if now > deadline:
                raise UpstreamTimeoutError("The provider's stream outlived the request deadline")
            data = yield from self.read_chunk(min(deadline, now + idle_timeout))
            if not data:
                if buffer.strip():
                    raise UpstreamCutError("The provider's stream was cut mid-event")
                return
            events, buffer = split(buffer + data)
            yield from events
            if len(buffer) > MAX_EVENT_BYTES:
                raise UpstreamCutError("The provider sent an oversized stream event")

    #: How long the end of a body is waited for after a stream's final event.
    FINISH_SECONDS = 0.05

    def finish_stream(self):
        """Read the rest of a response after its final event, so its
        connection can serve another request: a generator returning whether
        it can. The provider ends the body right after that event; one that
        lingers is not waited for (beyond FINISH_SECONDS, parked)."""
        response = self.response
        if response.will_close:
            return False
        deadline = time.monotonic() + self.FINISH_SECONDS
        try:
            while not response.complete:
                if response.decode(self.buffer, self.ended) is None:
                    yield from self._receive(deadline)
        except (OSError, http.client.HTTPException):  # socket.timeout too
            return False
        return not self.buffer  # nothing beyond the body

    def untouched(self):
        """Whether an idle connection is as it was left: nothing arrived on
        it since (an answer nobody asked for would be taken for the next
        request's) and the provider has not closed it."""
        try:
            self.sock.recv(1)  # returns only if something arrived: bytes, or the end
        except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
            return True
        except OSError:
            pass
        return False

    def close(self):
        self.sock.close()


def split_sse(buffer):
    """The SSE events complete at the front of ``buffer`` (each with its
    blank line), and the bytes after them. Without a CR in the bytes (the
    way providers send events), a blank line is found by ``find``: half
    the cost of the pattern of every line end, on every event relayed."""
    events, start = [], 0
    if buffer.find(b"\r") < 0:
        while True:
            end = buffer.find(b"\n\n", start)
            if end < 0:
                return events, buffer[start:]
            events.append(buffer[start:end + 2])
            start = end + 2
    while True:
        end = _EVENT_END.search(buffer, start)
        if end is None:
            return events, buffer[start:]
        events.append(buffer[start:end.end()])
        start = end.end()


class UpstreamResponse:
    """A provider's answer: its status and header fields, read by a lean
    parser (http.client's, through the email package, costs more than the
    rest of a proxied call), and the decoding of its body as it arrives:
    by Content-Length, chunked, or up to the end of the connection."""
    __slots__ = ("status", "reason", "fields", "field_map", "chunked", "length", "will_close", "complete",
                 "chunk_left", "in_trailer")

    @classmethod
    def parse(cls, buffer, method):
        """The answer whose head ``buffer`` holds whole (interim answers
        before it skipped), its head taken from ``buffer``; None while part
        of it has still to arrive. Raises http.client.HTTPException for a
        head the gateway refuses, UpstreamError for a malformed framing
        field."""
        start, interim = 0, 0
        while True:
            lines = _head_lines(buffer, start)
            if lines is None:
                return None
            status_line, fields, start = lines
            version, status, reason = _status_of(status_line)
            if status >= 200:
                break
            interim += 1  # interim answers (100 Continue, 103 Early Hints) come before the real one
            if status == http.client.SWITCHING_PROTOCOLS or interim > MAX_INTERIM_ANSWERS:
                raise http.client.HTTPException("the provider switched protocols or sent too many interim answers")
        del buffer[:start]
        return cls(version, status, reason, fields, method)

    def __init__(self, version, status, reason, fields, method):
        self.status, self.reason, self.fields = status, reason, fields
        self.field_map = field_map = {}
        for name, value in fields:
            # The fields the gateway reads itself: whole lines, and framing ones once.
            if (name in ("content-length", "transfer-encoding") and name in field_map
                    or name in ("content-length", "transfer-encoding", "content-type")
                    and ("\n" in value or "\r" in value)):
                raise UpstreamError("The provider sent a malformed %s header" % name, code="upstream_bad_response")
            field_map.setdefault(name, value)
        self.chunked = field_map.get("transfer-encoding", "").lower() == "chunked"
        self.chunk_left, self.in_trailer = None, False  # None: a chunk's size line comes next
        connection = field_map.get("connection", "").lower()
        http_11 = version not in ("HTTP/1.0", "HTTP/0.9")
        self.will_close = "close" in connection if http_11 else "keep-alive" not in connection
        self.length = None
        length = field_map.get("content-length", "")
        if not self.chunked and length.isdigit() and length.isascii():
            self.length = int(length)
        if status in (204, 304) or method == "HEAD":
            self.chunked, self.length = False, 0
        if not self.chunked and self.length is None:
            self.will_close = True  # the body ends with the connection
        self.complete = self.length == 0

    def getheader(self, name, default=None):
        return self.field_map.get(name.lower(), default)

    def decode(self, buffer, ended):
        """The body bytes ``buffer`` holds, taken from it: b"" once the body
        is whole, None while the next have still to arrive. ``ended``: the
        provider closed its side, so nothing more will. Raises
        http.client.HTTPException for a body cut short or malformed."""
        if self.complete:
            return b""
        if not buffer and not ended:
            return None  # nothing to decode (a stream's every look after its last event)
        if not self.chunked:
            if buffer:
                size = len(buffer) if self.length is None else min(self.length, len(buffer))
                data = bytes(buffer[:size])
                del buffer[:size]  # cheap at the front of a bytearray
                if self.length is not None:
                    self.length -= size
                    self.complete = self.length == 0
                return data
            if not ended:
                return None
            if self.length is not None:
                raise http.client.IncompleteRead(b"")
            self.complete = True  # the body ended with the connection
            return b""
        parts, taken = [], 0  # every chunk that arrived, whole or in part, is taken at once
        while self.chunk_left is None and taken < len(buffer):  # whole chunks of the plain form, the usual case
            size_line = _PLAIN_CHUNK_SIZE.match(buffer, taken)
            if size_line is None:
                break
            start = size_line.end()
            end = start + int(size_line.group(1), 16)
            if end == start or buffer[end:end + 2] != b"\r\n":
                break  # the last chunk, or one not whole: read below, step by step
            parts.append(buffer[start:end])
            taken = end + 2
        del buffer[:taken]
        if parts and not buffer:
            return b"".join(parts)  # whole chunks and nothing after them: the usual read of a stream
        while True:
            if self.chunk_left:  # inside a chunk's data
                if not buffer:
                    break
                size = min(self.chunk_left, len(buffer))
                parts.append(bytes(buffer[:size]))
                del buffer[:size]
                self.chunk_left -= size
                continue
            line_end = buffer.find(b"\n")
            if line_end < 0:
                if len(buffer) > MAX_CHUNK_LINE:
                    raise http.client.HTTPException("a chunk line is too long")
                break
            line = bytes(buffer[:line_end]).rstrip(b"\r")
            del buffer[:line_end + 1]
            if self.in_trailer:
                if not line:
                    self.complete = True
                    break
            elif self.chunk_left == 0:  # the line end after a chunk's data
                if line:
                    raise http.client.HTTPException("a chunk longer than its size")
                self.chunk_left = None
            else:
                try:
                    self.chunk_left = int(line.split(b";", 1)[0].strip(b" \t"), 16)
                except ValueError:
                    raise http.client.HTTPException("a malformed chunk size") from None
                if self.chunk_left < 0:
                    raise http.client.HTTPException("a malformed chunk size")
                self.in_trailer = self.chunk_left == 0
        if ended and self.in_trailer and not self.complete:
            # Closed inside the trailer: the body is whole (http.client reads it so).
            self.complete = True
            del buffer[:]
        if parts:
            return b"".join(parts)
        if self.complete:
            return b""
        if ended:
            raise http.client.IncompleteRead(b"")
        return None


def _head_lines(buffer, start):
    """(status line, [(lower-cased name, value)], end) of the head at
    ``start`` in ``buffer``, or None while its blank line has not arrived.
    At most MAX_UPSTREAM_HEADER_FIELDS lines of MAX_UPSTREAM_HEADER_LINE
    bytes."""
    lines, position = [], start
    while True:
        end = _LINE_END_BYTES.search(buffer, position)
        if (end.start() if end else len(buffer)) - position > MAX_UPSTREAM_HEADER_LINE:
            raise http.client.LineTooLong("header line")
        if end is None:
            return None
        if end.start() == position and lines:
            return lines[0], _header_fields(lines[1:]), end.end()
        lines.append(bytes(buffer[position:end.start()]).decode("latin-1"))
        position = end.end()
        if len(lines) > MAX_UPSTREAM_HEADER_FIELDS + 1:
            raise http.client.HTTPException("got more than %d header lines" % MAX_UPSTREAM_HEADER_FIELDS)


def _header_fields(lines):
    """(lower-cased name, value) of each header line. A field continued on
    folded lines is marked with a line break instead, so it is never
    relayed (see response_headers)."""
    fields = []
    for text in lines:
        if text[0] in " \t":
            if not fields:
                raise http.client.HTTPException("malformed header line")
            name, value = fields[-1]
            fields[-1] = (name, value.rstrip("\n") + "\n")
            continue
        name, colon, value = text.partition(":")
        if not colon:
            raise http.client.HTTPException("malformed header line")
        fields.append((name.strip().lower(), value.strip()))
    return fields


def _status_of(line):
    """(version, status, reason) of a status line, as http.client reads it."""
    words = line.split(None, 2)
    if len(words) < 2 or not words[0].startswith("HTTP/") or not (words[1].isdigit() and words[1].isascii()) \
            or not 100 <= int(words[1]) <= 999:
        raise http.client.BadStatusLine(line)
    if words[0] != "HTTP/0.9" and not words[0].startswith("HTTP/1."):
        raise http.client.UnknownProtocol(words[0])
    return words[0], int(words[1]), words[2].strip() if len(words) > 2 else ""


def retry_after(fields):
    """Seconds a provider asked the client to wait (``retry-after-ms``, or
    ``retry-after`` in seconds), or None."""
    for name, scale in (("retry-after-ms", 0.001), ("retry-after", 1.0)):
        try:
            seconds = float(fields.get(name, "")) * scale
        except ValueError:
            continue  # absent, or an HTTP date: not worth parsing for a backoff
        if math.isfinite(seconds) and seconds >= 0:
            return seconds
    return None


def response_headers(upstream_response):
    """The provider's response headers a client may see."""
    kept = []
    for name, value in upstream_response.fields:
        if "\n" in value or "\r" in value:
            continue  # a folded value or a bare CR: relayed, it would forge headers
        if name in FORWARDED_RESPONSE_HEADERS or name.startswith(FORWARDED_RESPONSE_PREFIXES):
            kept.append((name, value))
    return kept


# Claude on the clouds. Clients call /v1/messages as ever; a Bedrock or
# Vertex provider sends the same Messages API body with the model moved to
# the URL (``model_ids`` maps a client's model name to the cloud's id) and
# the API version moved into the body, signed or authorised the cloud's way,
# and reads the answer back into Anthropic's shapes: the client cannot tell.

#: The Messages API version each cloud takes in the body, not a header.
BEDROCK_ANTHROPIC_VERSION = "bedrock-2023-05-31"
VERTEX_ANTHROPIC_VERSION = "vertex-2023-10-16"
#: Bedrock's stream framing (application/vnd.amazon.eventstream).
BEDROCK_STREAM_TYPE = "application/vnd.amazon.eventstream"
#: The Anthropic error type of a Bedrock exception (its ``:exception-type``).
BEDROCK_EXCEPTION_TYPES = {
    "throttlingException": "rate_limit_error", "serviceUnavailableException": "overloaded_error",
    "modelTimeoutException": "timeout_error", "validationException": "invalid_request_error",
    "accessDeniedException": "permission_error", "resourceNotFoundException": "not_found_error",
}


def _aws_quote(text, safe=""):
    """RFC 3986 percent-encoding as SigV4 wants it: all but A-Z a-z 0-9 - _ . ~ (and ``safe``)."""
    return urllib.parse.quote(text, safe="-_.~" + safe)


def sigv4_authorization(credentials, region, service, method, path, query, headers, payload_hash, amz_date):
    """The Authorization value of AWS Signature Version 4 (hmac, hashlib).

    ``path`` is the path as the signer sees it: it is percent-encoded once
    more here (every service but S3 signs the encoded path encoded again;
    AWS's test suite gives raw paths, so it encodes them once). ``headers``
    are the (name, value) pairs signed, host and x-amz-date among them;
    ``payload_hash`` the body's SHA-256 in hex; ``amz_date`` YYYYMMDDTHHMMSSZ.
    Checked against AWS's published test suite (tests/test_cloud_providers.py)."""
    fields = {}
    for name, value in headers:
        fields.setdefault(name.lower(), []).append(" ".join(value.split()))
    names = sorted(fields)
    pairs = sorted((_aws_quote(key), _aws_quote(value))
                   for key, value in urllib.parse.parse_qsl(query, keep_blank_values=True))
    canonical = "\n".join((method, _aws_quote(path, "/"), "&".join("%s=%s" % pair for pair in pairs),
                           "".join("%s:%s\n" % (name, ",".join(fields[name])) for name in names),
                           ";".join(names), payload_hash))
    day = amz_date[:8]
    scope = "%s/%s/%s/aws4_request" % (day, region, service)
    to_sign = "\n".join(("AWS4-HMAC-SHA256", amz_date, scope, hashlib.sha256(canonical.encode()).hexdigest()))
    key = ("AWS4" + credentials.secret_access_key).encode()
    for part in (day, region, service, "aws4_request"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    return "AWS4-HMAC-SHA256 Credential=%s/%s, SignedHeaders=%s, Signature=%s" % (
        credentials.access_key_id, scope, ";".join(names),
        hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest())


def decode_event_stream(buffer):
    """The AWS event-stream messages complete at the front of ``buffer``,
    as (headers, payload) pairs, and the bytes after them. A message is a
    prelude (total length, headers length, the CRC-32 of those 8 bytes),
    headers, a payload and the CRC-32 of all before it. A bad length or CRC
    raises UpstreamCutError, once the good messages before it are returned
    (it stays at the front of the rest)."""
    messages, start = [], 0
    while len(buffer) - start >= 12:
        total, headers_length, prelude_crc = struct.unpack_from(">III", buffer, start)
        bad = (zlib.crc32(buffer[start:start + 8]) != prelude_crc or total < 16 + headers_length
               or total > MAX_EVENT_BYTES)
        if not bad and len(buffer) - start < total:
            break
        message = buffer[start:start + total]
        if bad or zlib.crc32(message[:-4]) != struct.unpack_from(">I", message, total - 4)[0]:
            if messages:
                break
            raise UpstreamCutError("The provider sent a malformed event-stream message (length or checksum)")
        messages.append((_event_stream_headers(message[12:12 + headers_length]), message[12 + headers_length:-4]))
        start += total
    return messages, buffer[start:]


#: Sizes of the event-stream header value types with a fixed size: bool
#: true, bool false, byte, short, int, long, (6, 7: bytes and string, sized
#: by a 2-byte prefix), timestamp, uuid.
_EVENT_STREAM_VALUE_SIZES = {0: 0, 1: 0, 2: 1, 3: 2, 4: 4, 5: 8, 8: 8, 9: 16}


def _event_stream_headers(data):
    """An event-stream message's headers: name -> value, strings decoded
    (the only type Bedrock's framing headers use), others as bytes."""
    headers, index = {}, 0
    try:
        while index < len(data):
            name_length = data[index]
            name = data[index + 1:index + 1 + name_length].decode("utf-8")
            kind = data[index + 1 + name_length]
            index += 2 + name_length
            if kind in (6, 7):
                (size,), index = struct.unpack_from(">H", data, index), index + 2
            else:
                size = _EVENT_STREAM_VALUE_SIZES[kind]
            value = data[index:index + size]
            headers[name] = value.decode("utf-8") if kind == 7 else value
            index += size
    except (IndexError, KeyError, struct.error, UnicodeDecodeError):
        raise UpstreamCutError("The provider sent malformed event-stream headers") from None
    return headers


_EVENT_TYPE = re.compile(rb'"type"\s*:\s*"([A-Za-z_]+)"')


def anthropic_sse(data):
    """One Anthropic stream event as SSE bytes, from its JSON (bytes)."""
    if b"\n" in data or b"\r" in data:  # pretty-printed JSON would end the SSE data line
        data = json.dumps(_json_object(data) or {}, separators=(",", ":")).encode()
    kind = _EVENT_TYPE.search(data)
    return b"event: %s\ndata: %s\n\n" % (kind.group(1) if kind else b"message", data)


def split_bedrock_stream(buffer):
    """``split`` for Bedrock's event stream: its ``chunk`` events carry an
    Anthropic stream event, base64 in the payload's ``bytes``; exceptions
    become Anthropic ``error`` events. Returns SSE events and the rest."""
    messages, rest = decode_event_stream(buffer)
    events = []
    for headers, payload in messages:
        fields = _json_object(payload) or {}
        if headers.get(":message-type") == "event":
            if headers.get(":event-type") == "chunk":
                try:
                    events.append(anthropic_sse(base64.b64decode(fields.get("bytes") or "", validate=True)))
                except (ValueError, TypeError):
                    raise UpstreamCutError("The provider sent a chunk that is not base64") from None
            continue  # another kind of event: nothing for the client
        kind = headers.get(":exception-type") or headers.get(":error-code") or "error"
        message = fields.get("message") or fields.get("Message") or headers.get(":error-message") or kind
        events.append(anthropic_sse(json.dumps({"type": "error", "error": {
            "type": BEDROCK_EXCEPTION_TYPES.get(kind, "api_error"), "message": str(message)}}).encode()))
    return events, rest


class CloudClaudeProvider(Provider):
    """Claude's Messages API on a cloud; it serves /v1/messages alone."""
    body_version = None       # anthropic_version, in the body
    body_drops = ("model",)   # fields of the client's body the cloud refuses

    def serves(self, dialect, path):
        return dialect == ANTHROPIC and path == "/v1/messages"

    def upstream_name(self, model):
        """The cloud's id for a model name (``model_ids``)."""
        return self.config.model_ids.get(model, model)

    def model_path(self, model):
        """The cloud's id for a model name, as one segment of a URL path."""
        return urllib.parse.quote(self.upstream_name(model), safe="@")

    def cloud_body(self, body, extra=()):
        """The client's body without ``body_drops`` and the fields the
        provider does not take, with the API version."""
        dropped = self.dropped_fields(body)
        fields = {name: value for name, value in body.items() if name not in self.body_drops and name not in dropped}
        fields["anthropic_version"] = self.body_version
        fields.update(extra)
        return json.dumps(fields, ensure_ascii=False, separators=(",", ":")).encode("utf-8")

    def client_body(self, status, body):
        """A cloud's own error body (``{"message": ...}``) in Anthropic's shape."""
        if status < 400:
            return body
        error = _json_object(body) or {}
        if error.get("type") == "error":
            return body
        message = error.get("message") or error.get("Message") or _error_message(error.get("error"), None)
        return json.dumps({"type": "error", "error": {
            "type": ERROR_TYPES.get(status, "api_error"),
            "message": message if isinstance(message, str) else "The provider answered HTTP %d" % status}}).encode()


class BedrockProvider(CloudClaudeProvider):
    """Amazon Bedrock's bedrock-runtime: ``POST /model/{id}/invoke`` and
    ``/invoke-with-response-stream``, whose event stream is relayed as
    Anthropic's SSE. Anthropic betas go in the body (``anthropic_beta``).
    Authorised by a Bedrock API key (a bearer token), or signed with SigV4.
    Usage: the Anthropic usage in the answer (message_start and
    message_delta when streamed), which alone splits cache reads from 5m
    and 1h cache writes; ``amazon-bedrock-invocationMetrics`` on the last
    event only when the events carry none (MessagesStreamMeter)."""
    body_version = BEDROCK_ANTHROPIC_VERSION
    body_drops = ("model", "stream")
    signing_name = "bedrock"

    def prepare(self, method, path, model, dialect, credential, client_headers, route, raw, body, streamed):
        target = "%s/model/%s/%s" % (self.pool.base_path, self.model_path(model),
                                     "invoke-with-response-stream" if streamed else "invoke")
        betas = self.kept_betas(client_headers)
        data = self.cloud_body(body, {"anthropic_beta": betas} if betas else ())
        lines = ["POST %s HTTP/1.1" % target, "Host: " + self.pool.host_field, "Accept-Encoding: identity",
                 "Content-Type: application/json",
                 "Accept: " + (BEDROCK_STREAM_TYPE if streamed else "application/json")]
        if isinstance(credential, AwsCredentials):
            amz_date = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
            signed = [("content-type", "application/json"), ("host", self.pool.host_field), ("x-amz-date", amz_date)]
            if credential.session_token:
                signed.append(("x-amz-security-token", credential.session_token))
            lines += ["%s: %s" % field for field in signed[2:]]  # the x-amz-* fields, as signed
            lines.append("Authorization: " + sigv4_authorization(
                credential, self.region, self.signing_name, "POST", target, "", signed,
                hashlib.sha256(data).hexdigest(), amz_date))
        else:
            lines.append("Authorization: Bearer " + credential)
        return request_bytes(lines, data), False

    def stream_type(self, response):
        if response.getheader("content-type", "").startswith(BEDROCK_STREAM_TYPE):
            return "text/event-stream; charset=utf-8"
        return None

    def events(self, upstream, deadline, idle_timeout):
        return upstream.events(deadline, idle_timeout, split_bedrock_stream)


class AccessTokens:
    """Google OAuth access tokens for Vertex AI, from ``token_command``
    (``gcloud auth print-access-token``: a token, or JSON with
    ``access_token`` and ``expires_in``) or the GCE metadata server
    (GCE_METADATA_HOST moves it). Cached; fetched in the background once
    the token is within ``refresh_margin`` of its expiry, so calls keep
    using the current one meanwhile; only when none is valid (the first
    call, or after a refusal) does a call fetch, one for all, within
    ``timeout``. Tokens are never logged."""
    refresh_margin = 300.0      # s before expiry a new token is fetched
    command_lifetime = 3000.0   # s a command's bare token is trusted (gcloud's last an hour)
    metadata_path = "/computeMetadata/v1/instance/service-accounts/default/token"

    def __init__(self, name, command, timeout, environ=os.environ):
        self.name, self.command, self.timeout = name, command, timeout
        self.metadata_host = environ.get("GCE_METADATA_HOST") or "metadata.google.internal"
        self._token, self._expires = None, 0.0
        self._fetching = threading.Lock()

    def token(self):
        """A valid access token; raises UpstreamError if none can be had."""
        token, expires = self._token, self._expires
        now = time.monotonic()
        if token is not None and now < expires:
            if now >= expires - self.refresh_margin:
                self._refresh_in_background()
            return token
        with self._fetching:  # one call fetches; the others wait for it
            if self._token is None or time.monotonic() >= self._expires:
                self._fetch()
            return self._token

    def forget(self):
        """The provider refused the token: the next call fetches another."""
        self._token = None

    def _refresh_in_background(self):
        if self._fetching.acquire(blocking=False):
            threading.Thread(target=self._refresh, name="llmgw-token-" + self.name, daemon=True).start()

    def _refresh(self):
        try:
            self._fetch()
        except UpstreamError as exc:
            logger.warning("%s", exc.message)
        finally:
            self._fetching.release()

    def _fetch(self):
        """Fetch a token into the cache (the caller holds ``_fetching``)."""
        where = "token_command" if self.command else "the metadata server (%s)" % self.metadata_host
        try:
            answer = self._run_command() if self.command else self._ask_metadata_server()
        except subprocess.TimeoutExpired:
            failure = "no answer within %g s" % self.timeout
        except (OSError, http.client.HTTPException) as exc:
            failure = str(exc) or type(exc).__name__
        else:
            fields = _json_object(answer) if answer.startswith(b"{") else {"access_token": answer.decode("latin-1")}
            fields = fields or {}
            token, lifetime = fields.get("access_token"), fields.get("expires_in", self.command_lifetime)
            if (isinstance(token, str) and token and all(0x21 <= ord(ch) <= 0x7E for ch in token)
                    and isinstance(lifetime, (int, float)) and lifetime > 0):
                self._token, self._expires = token, time.monotonic() + lifetime
                return
            failure = "no usable token in its answer"
        raise UpstreamError("No Vertex AI access token for provider %s: %s: %s" % (self.name, where, failure),
                            code="upstream_auth_unavailable")

    def _run_command(self):
        done = subprocess.run(self.command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, timeout=self.timeout)
        if done.returncode != 0:
            raise OSError("it exited with status %d" % done.returncode)
        return done.stdout.strip()

    def _ask_metadata_server(self):
        connection = http.client.HTTPConnection(self.metadata_host, timeout=self.timeout)
        try:
            connection.request("GET", self.metadata_path, headers={"Metadata-Flavor": "Google"})
            response = connection.getresponse()
            answer = response.read(65536)
        finally:
            connection.close()
        if response.status != 200:
            raise OSError("it answered HTTP %d" % response.status)
        return answer


class VertexProvider(CloudClaudeProvider):
    """Google Vertex AI: ``POST /v1/projects/{project}/locations/{region}/
    publishers/anthropic/models/{model}:rawPredict`` (``:streamRawPredict``
    when streamed: Anthropic's own SSE), ``anthropic-beta`` as a header,
    an OAuth access token (AccessTokens, or a key of its own) as bearer."""
    body_version = VERTEX_ANTHROPIC_VERSION

    def __init__(self, config, server_config, environ=os.environ):
        super().__init__(config, server_config, environ)
        self.tokens = AccessTokens(config.name, config.token_command, config.token_timeout, environ)

    def prepare(self, method, path, model, dialect, credential, client_headers, route, raw, body, streamed):
        token = self.tokens.token() if isinstance(credential, GoogleTokenSource) else credential
        target = "%s/v1/projects/%s/locations/%s/publishers/anthropic/models/%s:%s" % (
            self.pool.base_path, self.config.project, self.region, self.model_path(model),
            "streamRawPredict" if streamed else "rawPredict")
        lines = ["POST %s HTTP/1.1" % target, "Host: " + self.pool.host_field, "Accept-Encoding: identity",
                 "Content-Type: application/json", "Authorization: Bearer " + token]
        betas = self.kept_betas(client_headers)
        if betas:
            lines.append("anthropic-beta: " + ",".join(betas))
        return request_bytes(lines, self.cloud_body(body)), False

    def credentials_refused(self):
        self.tokens.forget()


PROVIDER_CLASSES = {OPENAI: Provider, ANTHROPIC: Provider, AZURE: Provider, BEDROCK: BedrockProvider,
                    VERTEX: VertexProvider}


def make_provider(config, server_config, environ=os.environ):
    """The Provider for a provider's config, of the class its format needs."""
    return PROVIDER_CLASSES[config.format](config, server_config, environ)


# ==== 6. Rate limiting ======================================================
#
# Requests per minute, tokens per minute and requests in flight, per key,
# counted in memory on the request path and shared with the other gateway
# processes on the same database by a background thread every quarter
# second. Across processes the limits are therefore approximate: a burst
# may pass up to the other processes' last quarter second of traffic.
# Budgets are not approximate: they are enforced in the database (section 3).

class _KeyCounters:
    __slots__ = ("window", "requests", "tokens", "previous_requests", "previous_tokens", "in_flight", "dirty")

    def __init__(self, window):
        self.window = window
        self.requests = self.tokens = self.previous_requests = self.previous_tokens = self.in_flight = 0
        self.dirty = False

    def roll(self, window):
        """Move to minute ``window``: the current minute becomes the previous one."""
        if window != self.window:
            adjacent = window == self.window + 1
            self.previous_requests = self.requests if adjacent else 0
            self.previous_tokens = self.tokens if adjacent else 0
            self.requests = self.tokens = 0
            self.window = window


class KeyLimits:
    """RPM, TPM and parallel-request limits per key, over a sliding minute
    (the previous minute's count weighted by how much of it still overlaps).

    ``acquire`` on the way in (raises RateLimitError), ``release`` on the way
    out with the tokens the call used; ``sync`` exchanges counts with the
    other processes. The clock is injectable.
    """

    sync_interval = 0.25
    heartbeat = 5.0  # other processes' in-flight counts older than this are stale

    def __init__(self, store, owner, clock=time.time):
        self._store, self._clock = store, clock
        self._owner = owner
        self._counters = {}
        self._others = {}     # key id -> [(window, requests, tokens, previous requests, previous tokens,
                              #             in flight)] of the other processes
        self._lock = threading.Lock()
        self.syncs = 0  # finished syncs: one begun after a publication has read it

    def acquire(self, key_id, rpm, tpm, max_parallel, per_minute=True):
        """Count one request in flight, or raise RateLimitError. A call
        that costs nothing (``per_minute`` false) counts in flight only."""
        now = self._clock()
        window, into = divmod(now, 60.0)
        window = int(window)
        with self._lock:
            counters = self._counters.get(key_id)
            if counters is None:
                counters = self._counters[key_id] = _KeyCounters(window)
            counters.roll(window)
            requests, tokens, in_flight = self._totals(key_id, counters, window, into / 60.0)
            if per_minute and rpm is not None and requests + 1 > rpm:
                self._refuse("requests", rpm, "requests per minute", counters, into)
            if per_minute and tpm is not None and tokens >= tpm:
                self._refuse("tokens", tpm, "tokens per minute", counters, into)
            if max_parallel is not None and in_flight >= max_parallel:
                raise RateLimitError("Limit of %d requests in flight reached; retry when one finishes"
                                     % max_parallel, headers=[("retry-after", "1")])
            counters.requests += per_minute
            counters.in_flight += 1
            counters.dirty = True

    def release(self, key_id, tokens):
        with self._lock:
            counters = self._counters[key_id]
            counters.roll(int(self._clock() // 60))
            counters.in_flight -= 1
            counters.tokens += tokens
            counters.dirty = True

    def in_flight(self):
        """This process's requests in flight, per key that has had any."""
        with self._lock:
            return {key_id: counters.in_flight for key_id, counters in self._counters.items()}

    def _totals(self, key_id, counters, window, fraction):
        """Sliding-minute requests and tokens, and requests in flight, here and elsewhere."""
        requests, tokens = counters.requests, counters.tokens
        previous_requests, previous_tokens = counters.previous_requests, counters.previous_tokens
        in_flight = counters.in_flight
        for other_window, other_requests, other_tokens, other_previous_requests, other_previous_tokens, \
                other_in_flight in self._others.get(key_id, ()):
            if other_window == window:
                requests += other_requests
                tokens += other_tokens
                previous_requests += other_previous_requests
                previous_tokens += other_previous_tokens
            elif other_window == window - 1:
                previous_requests += other_requests
                previous_tokens += other_tokens
            in_flight += other_in_flight
        weight = 1.0 - fraction
        return requests + previous_requests * weight, tokens + previous_tokens * weight, in_flight

    def _refuse(self, unit, limit, what, counters, into):
        retry_after = max(1, math.ceil(60.0 - into))
        raise RateLimitError(
            "Rate limit of %d %s exceeded; retry in %d s" % (limit, what, retry_after),
            headers=[("retry-after", str(retry_after)), ("x-ratelimit-limit-%s" % unit, str(limit)),
                     ("x-ratelimit-remaining-%s" % unit, "0"), ("x-ratelimit-reset-%s" % unit, "%ds" % retry_after)])

    def sync(self):
        """Publish this process's changed counters; read everyone else's."""
        now = self._clock()
        with self._lock:
            rows = []
            for key_id, counters in self._counters.items():
                counters.roll(int(now // 60))
                if counters.dirty or counters.in_flight:
                    rows.append((key_id, counters.window, counters.requests, counters.tokens,
                                 counters.previous_requests, counters.previous_tokens, counters.in_flight))
                    counters.dirty = False
        if rows:
            self._store.publish_activity(self._owner, rows, now, now - 180)
        others = {}
        for row in self._store.others_activity(self._owner, now - 120):
            key_id, counts, in_flight, updated = row[0], row[1:6], row[6], row[7]
            others.setdefault(key_id, []).append(counts + (in_flight if now - updated < self.heartbeat else 0,))
        with self._lock:
            self._others = others
            self.syncs += 1


# ==== 7. Routing ============================================================
#
# Each key of a provider is a *deployment*. A request names a model or an
# alias (``models:`` in config.yaml); the Router turns its targets into an
# ordered plan of deployments to try: targets in weighted random order, within
# a provider the deployments with fewest calls in flight and most rate-limit
# headroom first, the one this session used last (affinity) before all, and
# deployments cooling down after a failure last. Cooldowns are written to
# the database when an attempt fails and read back by every process's
# background thread four times a second, so a failing key is skipped by all
# of them within a second.

#: Rate-limit headroom a provider reports: OpenAI's names, then Anthropic's.
_HEADROOM_FIELDS = (("x-ratelimit-remaining-requests", "x-ratelimit-remaining-tokens"),
                    ("anthropic-ratelimit-requests-remaining", "anthropic-ratelimit-tokens-remaining"))
MAX_AFFINITY_ENTRIES = 100000


class Deployment:
    """One key of one provider, and how it is doing in this process."""
    __slots__ = ("provider", "name", "api_key", "source", "id", "in_flight", "cooldown_until", "failures",
                 "reason", "headroom")

    def __init__(self, provider, name, api_key, source):
        self.provider, self.name, self.api_key, self.source = provider, name, api_key, source
        self.id = "%s/%s" % (provider.name, name)
        self.in_flight = self.failures = 0
        self.cooldown_until = 0.0
        self.reason = None
        self.headroom = (math.inf, math.inf)  # remaining requests, tokens; unknown is plenty

    def rank(self):
        return (self.in_flight, -self.headroom[0], -self.headroom[1])


def _remaining(fields, name):
    value = fields.get(name, "")
    return int(value) if value.isdigit() and len(value) < 16 else None


class Router:
    """Plans which deployments a request tries, in order, and keeps their
    health: calls in flight, reported headroom, shared cooldowns, affinity."""

    def __init__(self, store, routing, clock=time.time):
        self._store, self.routing, self._clock = store, routing, clock
        self._deployments = {}      # provider name -> [Deployment]
        self._problems = {}         # provider name -> ConfigError of an unusable key
        self._affinity = collections.OrderedDict()  # affinity key -> (deployment id, model, expires)
        self._lock = threading.Lock()
        self._random = random.Random()

    def set_keys(self, keys):
        """Install each provider's deployments: ``keys`` maps a Provider to
        ((name, key, source) triples, problems). A deployment that stays
        keeps its health and calls in flight."""
        current = {deployment.id: deployment for group in self._deployments.values() for deployment in group}
        deployments, problems = {}, {}
        for provider, (triples, errors) in keys.items():
            group = []
            for name, key, source in triples:
                deployment = current.get("%s/%s" % (provider.name, name))
                if deployment is None or deployment.provider is not provider:
                    deployment = Deployment(provider, name, key, source)
                deployment.api_key, deployment.source = key, source
                group.append(deployment)
            deployments[provider.name] = group
            if errors:
                problems[provider.name] = errors[0]
        with self._lock:
            self._deployments, self._problems = deployments, problems

    def deployments(self):
        return [deployment for group in self._deployments.values() for deployment in group]

    def problem(self, provider):
        """The ConfigError of the provider's unusable key, if one is."""
        return self._problems.get(provider.name)

    def plan(self, targets):
        """The (deployment, upstream model, recorded model) triples to try,
        in order, for ``targets``: (provider, upstream model, weight,
        recorded model). Deployments cooling down come last, soonest first."""
        if len(targets) == 1:
            provider, model, _, recorded = targets[0]
            group = self._deployments.get(provider.name, ())
            if len(group) < 2:  # one model on a provider with one key, the common case: nothing to order
                return [(deployment, model, recorded) for deployment in group]
        now = self._clock()
        ready, cooling = [], []
        for provider, model, _, recorded in self._weighted_order(targets):
            group = self._deployments.get(provider.name, ())
            if len(group) > 1:
                group = sorted(self._random.sample(group, len(group)), key=Deployment.rank)
            for deployment in group:
                (ready if deployment.cooldown_until <= now else cooling).append((deployment, model, recorded))
        cooling.sort(key=lambda entry: entry[0].cooldown_until)
        return ready + cooling

    def stick(self, plan, affinity_key):
        """``plan`` with the entry ``affinity_key`` was served by last first,
        unless that deployment is cooling down or the affinity expired."""
        sticky = self._affinity.get(affinity_key)
        now = self._clock()
        if sticky is not None and sticky[2] > now:
            for index, (deployment, model, _) in enumerate(plan):
                if (deployment.id, model) == sticky[:2] and deployment.cooldown_until <= now:
                    plan.insert(0, plan.pop(index))
                    break
        return plan

    def _weighted_order(self, targets):
        if len(targets) < 2:
            return targets
        remaining, order = list(targets), []
        while remaining:
            pick = self._random.uniform(0, sum(target[2] for target in remaining))
            for index, target in enumerate(remaining):
                pick -= target[2]
                if pick <= 0 or index == len(remaining) - 1:
                    order.append(remaining.pop(index))
                    break
        return order

    def started(self, deployment):
        with self._lock:
            deployment.in_flight += 1

    def finished(self, deployment):
        with self._lock:
            deployment.in_flight -= 1

    def succeeded(self, deployment, model, fields, affinity_key=None):
        """An attempt reached the client: note the headroom the provider
        reported (it ranks a provider's deployments, so only where there
        are several), end the deployment's cooldown, remember the affinity."""
        if len(self._deployments.get(deployment.provider.name, ())) > 1:
            for requests_field, tokens_field in _HEADROOM_FIELDS:
                requests = _remaining(fields, requests_field)
                tokens = _remaining(fields, tokens_field)
                if requests is not None or tokens is not None:
                    deployment.headroom = (math.inf if requests is None else requests,
                                           math.inf if tokens is None else tokens)
                    break
        if deployment.failures:
            deployment.failures, deployment.cooldown_until, deployment.reason = 0, 0.0, None
            try:
                self._store.clear_cooldown(deployment.id)
            except GatewayError as exc:
                logger.warning("could not clear the cooldown of %s: %s", deployment.id, exc.message)
        if affinity_key is not None:
            with self._lock:
                self._affinity[affinity_key] = (deployment.id, model, self._clock() + self.routing.affinity_ttl)
                self._affinity.move_to_end(affinity_key)
                if len(self._affinity) > MAX_AFFINITY_ENTRIES:
                    self._affinity.popitem(last=False)

    def failed(self, deployment, trigger, retry_after=None):
        """Cool a failing deployment down for every process. An overload
        (529) is API-wide, so no key is to blame; a refused key (401, 403)
        is set aside for the longest cooldown."""
        if trigger == 529:
            return
        routing = self.routing
        refused = trigger in (401, 403)
        at_least = routing.cooldown_max if refused else (retry_after or 0.0)
        reason = "HTTP %d" % trigger if isinstance(trigger, int) else trigger
        if refused:
            logger.warning("provider %s refused key %s with HTTP %d; it is set aside for %d s (check the key)",
                           deployment.provider.name, deployment.name, trigger, routing.cooldown_max)
        try:
            until, failures = self._store.cool_down(deployment.id, self._clock(), routing.cooldown,
                                                    routing.cooldown_max, at_least, reason)
        except GatewayError as exc:
            logger.warning("could not share the cooldown of %s: %s", deployment.id, exc.message)
            until, failures = self._clock() + min(max(routing.cooldown, at_least), routing.cooldown_max), 1
        deployment.cooldown_until, deployment.failures, deployment.reason = until, failures, reason

    def sync(self):
        """Take the cooldowns every process wrote (this one's included)."""
        shared = {row[0]: row[1:] for row in self._store.cooldowns()}
        for deployment in self.deployments():
            until, failures, reason = shared.get(deployment.id, (0.0, 0, None))
            deployment.cooldown_until, deployment.failures, deployment.reason = until, failures, reason

    def describe(self):
        """Every deployment, JSON-ready, never its key."""
        now = self._clock()
        return [describe_deployment(deployment.provider.name, deployment.name, deployment.api_key,
                                    deployment.source, deployment.cooldown_until, deployment.failures,
                                    deployment.reason, now, in_flight=deployment.in_flight)
                for deployment in self.deployments()]


def describe_deployment(provider, name, api_key, source, until, failures, reason, now, **extra):
    """One deployment as ``cli.py deployments`` and ``GET /admin/deployments`` show it."""
    cooling = until > now
    return dict({"deployment": "%s/%s" % (provider, name), "provider": provider, "name": name,
                 "key": mask_secret(api_key), "source": source, "state": "cooling" if cooling else "ok",
                 "cooldown_until": iso_time(until) if cooling else None,
                 "cooldown_seconds": round(until - now, 1) if cooling else 0,
                 "failures": failures if cooling else 0, "reason": reason if cooling else None}, **extra)


# ==== 8. Streams ============================================================
#
# Server-sent events are relayed as the provider's own bytes, event by event.
# A meter reads a copy of each event only as far as usage needs: most events
# are matched with a regular expression and never JSON-parsed.

_USAGE_OBJECT = re.compile(rb'"(?:usage|x_groq)"\s*:\s*\{')
#: A chat chunk worth parsing: one carrying usage or an error (one pass over each event).
_USAGE_OR_ERROR_OBJECT = re.compile(rb'"(?:usage|x_groq|error)"\s*:\s*\{')
#: Generated text in any API's stream events, counted for estimates (a
#: string's characters taken a run at a time, not one by one).
_TEXT_FIELD = re.compile(
    rb'"(?:content|text|delta|partial_json|thinking|arguments|refusal)"\s*:\s*"([^"\\]*(?:\\.[^"\\]*)*)"')


def sse_fields(event):
    """(event name or None, data) of one SSE event; data lines joined by \\n."""
    if event.startswith(b"data: "):  # the usual OpenAI event, one data line: no split
        end = event.find(b"\n")
        if end > 0 and event.find(b"\r", 0, end - 1) < 0 and not event[end:].strip():
            return None, event[6:end].rstrip(b"\r")
    name, data = None, []
    for line in event.splitlines():
        if line.startswith(b"data:"):
            data.append(line[6:] if line[5:6] == b" " else line[5:])
        elif line.startswith(b"event:"):
            name = line[6:].strip()
    return name, b"\n".join(data)


def _json_object(data):
    try:
        value = json.loads(data)
    except (ValueError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


def _error_message(error, default="The provider reported an error"):
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        return error["message"]
    return default


#: The HTTP status a provider's error type stands for: an error event
#: before any output is retried as that status would be.
ERROR_TYPE_STATUS = {"overloaded_error": 529, "rate_limit_error": 429, "rate_limit_exceeded": 429,
                     "server_error": 500, "api_error": 500, "timeout_error": 504}


def _error_status(error):
    kind = error.get("type") or error.get("code") if isinstance(error, dict) else None
    return ERROR_TYPE_STATUS.get(kind, 500) if isinstance(kind, str) else 500


class StreamMeter:
    """Follows one stream: usage, whether it finished, errors, text relayed.

    ``feed(event)`` returns False for an event the client must not see.
    ``finished`` turns true on the event that ends the stream (held back by
    the gateway until the usage row is committed); ``usage_final`` when the
    provider's usage is complete.
    """

    def __init__(self, hide_usage_chunk=False):
        self.hide_usage_chunk = hide_usage_chunk
        self.usage = None
        self.usage_final = False
        self.finished = False
        self.error = None
        self.error_status = None     # the HTTP status the error stands for
        self.text_bytes = 0
        self.response_id = None      # Responses: the id its error event must repeat

    def _set_error(self, error, default="The provider reported an error"):
        self.error = _error_message(error, default)
        self.error_status = _error_status(error)

    def _count_text(self, data):
        self.text_bytes += len(b"".join(_TEXT_FIELD.findall(data)))  # (one text field as a rule: no sum of lens)


class ChatStreamMeter(StreamMeter):
    """Chat and legacy completions: data-only frames ending in ``[DONE]``;
    usage rides the last chunk (``choices: []``) when include_usage is on."""

    def feed(self, event):
        _, data = sse_fields(event)
        if data == b"[DONE]":
            self.finished = True
            return True
        self._count_text(data)
        if _USAGE_OR_ERROR_OBJECT.search(data):
            chunk = _json_object(data)
            if chunk is not None:
                if chunk.get("error"):
                    self._set_error(chunk["error"])
                usage = chunk.get("usage")
                if not isinstance(usage, dict):  # Groq's older streams
                    usage = _details(_details(chunk, "x_groq"), "usage") or None
                if usage:
                    self.usage, self.usage_final = openai_usage(usage), True
                    if self.hide_usage_chunk and chunk.get("choices") == []:
                        return False
        return True


class ResponsesStreamMeter(StreamMeter):
    """Responses API: typed events; usage in the terminal response event."""
    TERMINAL = (b"response.completed", b"response.incomplete", b"response.failed")

    def feed(self, event):
        name, data = sse_fields(event)
        if name in self.TERMINAL or name == b"error" or (
                name is None and (_USAGE_OBJECT.search(data) or b'"error"' in data)):
            payload = _json_object(data) or {}
            kind = payload.get("type") if isinstance(payload.get("type"), str) else ""
            if kind.encode() in self.TERMINAL:
                self.finished = True
                response = _details(payload, "response")
                if isinstance(response.get("usage"), dict):
                    self.usage, self.usage_final = responses_usage(response["usage"]), True
                if kind == "response.failed":
                    self._set_error(response.get("error"), "The response failed")
            elif kind == "error":
                self._set_error(payload)
        elif name == b"response.created":
            response_id = _details(_json_object(data) or {}, "response").get("id")
            self.response_id = response_id if isinstance(response_id, str) else None
        elif name is None or name.endswith(b".delta"):  # *.done events repeat the text
            self._count_text(data)
        return True


#: Bedrock's ``amazon-bedrock-invocationMetrics`` (on its last stream
#: event) as Anthropic usage fields: read only when the events carry no
#: usage of their own, which is richer (it splits 5m and 1h cache writes).
BEDROCK_METRICS_USAGE = (("inputTokenCount", "input_tokens"), ("outputTokenCount", "output_tokens"),
                         ("cacheReadInputTokenCount", "cache_read_input_tokens"),
                         ("cacheWriteInputTokenCount", "cache_creation_input_tokens"))


class MessagesStreamMeter(StreamMeter):
    """Anthropic Messages: ``message_start`` seeds input and cache counts;
    every ``message_delta`` overrides the fields it carries (they are
    cumulative, output included); ``message_stop`` ends the stream (and
    on Bedrock carries its invocation metrics)."""

    def __init__(self, hide_usage_chunk=False):
        super().__init__(hide_usage_chunk)
        self._counts = {}

    def feed(self, event):
        name, data = sse_fields(event)
        if name == b"message_start":
            usage = _details(_details(_json_object(data) or {}, "message"), "usage")
            if usage:
                self._merge(usage)
        elif name == b"message_delta":
            usage = _details(_json_object(data) or {}, "usage")
            if usage:
                self._merge(usage)
                self.usage_final = True
        elif name == b"message_stop":
            self.finished = True
            if not self.usage_final and b"invocationMetrics" in data:
                metrics = _details(_json_object(data) or {}, "amazon-bedrock-invocationMetrics")
                counts = {ours: metrics[theirs] for theirs, ours in BEDROCK_METRICS_USAGE if theirs in metrics}
                if counts:
                    self._merge(counts)
                    self.usage_final = True
        elif name == b"error":
            self._set_error(_details(_json_object(data) or {}, "error"))
        else:
            self._count_text(data)
        return True

    def _merge(self, usage):
        self._counts.update(usage)
        self.usage = anthropic_usage(self._counts)


def stream_error_event(dialect, endpoint, message, code, response_id=None):
    """The event that ends a stream the provider broke off, in the format
    of the API called: Anthropic's ``error`` event, a failed Responses
    response, an OpenAI error chunk (and no ``[DONE]``)."""
    if dialect == ANTHROPIC:
        payload = {"type": "error", "error": {"type": "api_error", "message": message}}
        return b"event: error\ndata: " + json.dumps(payload).encode() + b"\n\n"
    if endpoint == "/v1/responses":
        payload = {"type": "response.failed", "response": {
            "id": response_id, "object": "response", "status": "failed", "output": [], "usage": None,
            "error": {"code": code, "message": message}}}
        return b"event: response.failed\ndata: " + json.dumps(payload).encode() + b"\n\n"
    payload = {"error": {"message": message, "type": "api_error", "param": None, "code": code}}
    return b"data: " + json.dumps(payload).encode() + b"\n\n"


# ==== 9. Administration =====================================================
#
# One function per administrative action, for the CLI (cli.py), the admin API
# (Gateway._admin) and a dashboard alike: each validates its input, acts
# through the Store (which audits it as ``actor``) and refuses with one
# GatewayError per failure (BadRequestError naming the field, NotFoundError),
# which the CLI prints as one line and the API answers as JSON.

#: 0001-01-01T00:00:00Z, the earliest moment ``iso_time`` can show.
_FIRST_MOMENT = datetime.datetime(1, 1, 1, tzinfo=datetime.timezone.utc).timestamp()


def parse_time_bound(text, end=False, name="time"):
    """``YYYY-MM-DD`` or an ISO 8601 time (UTC unless it says otherwise) as
    epoch seconds. With ``end``, a bare date means the end of that day
    (counted in seconds: the end of 9999-12-31 has no datetime)."""
    try:
        if not isinstance(text, str):
            raise ValueError(text)
        if len(text) == 10:
            day = datetime.datetime.strptime(text, "%Y-%m-%d").replace(tzinfo=datetime.timezone.utc)
            return day.timestamp() + (86400 if end else 0)
        moment = datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=datetime.timezone.utc)
        if moment.timestamp() < _FIRST_MOMENT:  # year 1 east of UTC: no datetime could show it
            raise ValueError(text)
    except ValueError:
        raise BadRequestError("%s: %s is not a date (YYYY-MM-DD) or ISO 8601 time, years 1 to 9999"
                              % (name, shown(text)), param=name) from None
    return moment.timestamp()


_DURATION = re.compile(r"^([0-9]{1,12})([smhdw])$")
_MAX_DURATION = 100 * 366 * 86400
_MAX_BUDGET_USD = 10 ** 9
#: An expiry from this moment on (UTC) is stored as none: calendar sums
#: beyond it leave year 9999, the last that datetime knows.
_NEVER_EXPIRES_FROM = datetime.datetime(9999, 1, 1, tzinfo=datetime.timezone.utc).timestamp()
_DURATION_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
#: The fields a key's policy is set with, from the CLI or the admin API.
POLICY_FIELDS = ("tier", "rpm", "tpm", "max_parallel", "max_budget", "budget_period", "expires_at", "expires_in",
                 "models", "metadata", "log_bodies", "alert_thresholds", "budget_admission")


def parse_duration(text, name="duration"):
    """``30d``, ``24h``, ``15m``, ``90s`` or ``2w`` as seconds."""
    match = _DURATION.match(text.strip()) if isinstance(text, str) else None
    if match is None:
        raise BadRequestError("%s: %s is not a duration like 30d, 24h, 15m or 90s" % (name, shown(text)),
                              param=name)
    seconds = int(match.group(1)) * _DURATION_SECONDS[match.group(2)]
    if seconds > _MAX_DURATION:
        raise BadRequestError("%s: %s is longer than 100 years" % (name, shown(text)), param=name)
    return seconds


def parse_usd(amount, name="amount"):
    """A non-negative amount of USD (a JSON number) as integer nano-dollars."""
    check_number(amount, name, 0, _MAX_BUDGET_USD, error=BadRequestError)
    return int((decimal.Decimal(str(amount)) * 1000000000).to_integral_value())


def parse_key_policy(fields, config, now):
    """Validate policy fields (POLICY_FIELDS, user-facing units) into the
    stored POLICY_COLUMNS. Only the fields given are returned; None clears."""
    unknown = set(fields) - set(POLICY_FIELDS)
    if unknown:
        raise BadRequestError("unknown field(s): %s" % ", ".join(sorted(unknown)))
    policy = {}
    # budget_admission may be cleared (None): the key then follows budgets.admission.
    for name, choices, clears in (("tier", tuple(config.rate_limits), False), ("budget_period", BUDGET_PERIODS, False),
                                  ("budget_admission", BUDGET_ADMISSIONS, True)):
        if name in fields:
            if not (isinstance(fields[name], str) and fields[name] in choices or clears and fields[name] is None):
                raise BadRequestError("%s: %s is not one of %s" % (name, shown(fields[name]), ", ".join(choices)),
                                      param=name)
            policy[name] = fields[name]
    for name in ("rpm", "tpm", "max_parallel"):
        if name in fields:
            policy[name] = None if fields[name] is None else check_number(
                fields[name], name, 1, MAX_RATE, integer=True, error=BadRequestError)
    if "max_budget" in fields:
        budget = fields["max_budget"]
        policy["max_budget_nanousd"] = None if budget is None else parse_usd(budget, "max_budget")
    if fields.get("expires_at") is not None and fields.get("expires_in") is not None:
        raise BadRequestError("give expires_at or expires_in, not both", param="expires_at")
    if fields.get("expires_in") is not None:
        policy["expires_at"] = now + parse_duration(fields["expires_in"], "expires_in")
    elif fields.get("expires_at") is not None:
        policy["expires_at"] = parse_time_bound(fields["expires_at"], name="expires_at")
    elif "expires_at" in fields or "expires_in" in fields:
        policy["expires_at"] = None
    if policy.get("expires_at") is not None and policy["expires_at"] >= _NEVER_EXPIRES_FROM:
        policy["expires_at"] = None  # so far out it means never
    if "models" in fields:
        models = fields["models"]
        if isinstance(models, str):
            models = [glob.strip() for glob in models.split(",") if glob.strip()]
        if models is not None and (not isinstance(models, list) or not models):
            raise BadRequestError("models: expected a non-empty list of model names or globs, got %s"
                                  % shown(fields["models"]), param="models")
        policy["models"] = models and [check_text(glob, "models[]", error=BadRequestError) for glob in models]
    if "metadata" in fields:
        metadata = {} if fields["metadata"] is None else fields["metadata"]
        if not isinstance(metadata, dict) or not all(isinstance(name, str) and LABEL_NAME.match(name)
                                                     for name in metadata):
            raise BadRequestError("metadata: expected a mapping of label names (letters, digits, _ . -) to text, "
                                  "got %s" % shown(fields["metadata"]), param="metadata")
        for name, value in metadata.items():
            check_text(value, "metadata.%s" % name, blank_ok=True, error=BadRequestError)
        policy["metadata"] = metadata or None
    if "log_bodies" in fields:
        if not isinstance(fields["log_bodies"], bool):
            raise BadRequestError("log_bodies: expected true or false, got %s" % shown(fields["log_bodies"]),
                                  param="log_bodies")
        policy["log_bodies"] = fields["log_bodies"]
    if "alert_thresholds" in fields:
        thresholds = fields["alert_thresholds"]
        if isinstance(thresholds, str):
            thresholds = [number_in_text(value.strip()) for value in thresholds.split(",")]
        policy["alert_thresholds"] = None if thresholds is None else list(
            parse_thresholds(thresholds, "alert_thresholds", BadRequestError))
    return policy


#: The policy fields that are numbers when typed as text.
_NUMERIC_POLICY_FIELDS = ("rpm", "tpm", "max_parallel", "max_budget")
#: How a form's checkbox (or a typed word) spells log_bodies.
_YES_OR_NO = {"on": True, "true": True, "yes": True, "off": False, "false": False, "no": False}


def _policy_value(name, text):
    if text == "none":
        return None
    if name in _NUMERIC_POLICY_FIELDS:
        return number_in_text(text)
    if name == "log_bodies" and isinstance(text, str):
        return _YES_OR_NO.get(text.lower(), text)
    return text


def policy_from_text(texts, labels=()):
    """Policy fields typed as text (CLI flags, dashboard forms) as
    parse_key_policy takes them: numbers as numbers, on/off as true/false,
    the word none clearing a field; ``labels`` are NAME=VALUE texts
    (["none"] clears them)."""
    fields = {name: _policy_value(name, text) for name, text in texts.items()}
    if list(labels) == ["none"]:
        fields["metadata"] = None
    elif labels:
        fields["metadata"] = {}
        for label in labels:
            name, equals, value = label.partition("=")
            if not equals:
                raise BadRequestError("label %s: write NAME=VALUE" % shown(label), param="metadata")
            fields["metadata"][name] = value
    return fields


def create_virtual_key(store, config, project_name, fields=None, actor="cli", now=None):
    """Validate and create a virtual key (CLI and admin API alike).
    Returns (record, secret)."""
    check_text(project_name, "project_name", error=BadRequestError)
    policy = parse_key_policy(fields or {}, config, time.time() if now is None else now)
    return store.create_key(project_name.strip(), policy, actor)


def get_key(store, key_id):
    """One key's public fields; NotFoundError for an unknown id."""
    record = store.get_key(key_id)
    if record is None:
        raise NotFoundError("No virtual key %s" % shown(key_id))
    return record


def update_key(store, config, key_id, fields, actor="cli", now=None):
    """Change some of a key's policy (POLICY_FIELDS); returns the key."""
    now = time.time() if now is None else now
    if not store.update_key(key_id, parse_key_policy(fields, config, now), now, actor):
        raise NotFoundError("No virtual key %s" % shown(key_id))
    return get_key(store, key_id)


def revoke_key(store, key_id, actor="cli"):
    """Revoke a key (again is fine); returns it, ``revoked`` true."""
    if not store.revoke_key(key_id, actor):
        raise NotFoundError("No virtual key %s" % shown(key_id))
    return dict(get_key(store, key_id), revoked=True)


def rotate_key(store, key_id, grace="0s", actor="cli", now=None):
    """Give an active key a new secret, the old one working for ``grace``
    (a duration such as 24h). Returns the key with its new secret (shown
    once) and until when the previous one works."""
    now = time.time() if now is None else now
    seconds = parse_duration(grace, "grace")
    secret = store.rotate_key(key_id, seconds, now, actor)
    if secret is None:
        raise NotFoundError("No active virtual key %s" % shown(key_id))
    return dict(get_key(store, key_id), key=secret, previous_key_valid_until=iso_time(now + seconds))


def topup_key(store, key_id, amount, actor="cli", now=None):
    """Add ``amount`` USD to a key's current budget period (for a ``never``
    budget: to its balance); returns the key."""
    nanos = parse_usd(amount)
    if not nanos:
        raise BadRequestError("amount: must be more than 0", param="amount")
    get_key(store, key_id)
    if not store.topup(key_id, nanos, time.time() if now is None else now, actor):
        raise BadRequestError("key %s has no budget to top up (set one with max_budget)" % shown(key_id))
    return get_key(store, key_id)


def usage_stats(store, group_by="key", since=None, until=None, project=None, now=None):
    """Store.usage_stats, plus each key's budget use in its current period
    (max_budget, budget_spent, budget_used_pct) when grouped by key."""
    rows = store.usage_stats(group_by, since, until, project)
    if group_by == "key":
        now = time.time() if now is None else now
        for row in rows:
            row.update(budget_use(store, store.find_key_by_id(row["virtual_key_id"]), now))
    return rows


def budget_use(store, key, now):
    """A key's (VirtualKey's) current budget period: max_budget (with its
    top-ups), budget_spent and budget_used_pct; all None without a budget."""
    if key is None or key.max_budget_nanousd is None:
        return {"max_budget": None, "budget_spent": None, "budget_used_pct": None}
    spend = store.key_spend(key, now)
    allowance = spend["allowance_nanousd"]
    return {"max_budget": nanousd_to_usd(allowance), "budget_spent": nanousd_to_usd(spend["spent_nanousd"]),
            "budget_used_pct": round(100.0 * spend["spent_nanousd"] / allowance, 2) if allowance else None}


def keys_with_budgets(store, now=None):
    """Every key's public fields and, as ``budget``, its budget_use."""
    now = time.time() if now is None else now
    return [dict(record, budget=budget_use(store, store.find_key_by_id(record["id"]), now))
            for record in store.list_keys()]


#: The most points a chart's series has (a custom range gets coarser steps).
MAX_SERIES_POINTS = 62


def usage_series(store, group_by, since, until, step, fields=STATS_TOTAL_FIELDS):
    """Stats over [since, until) cut every ``step`` seconds (whole hours or
    days; ``since`` on a step): [(start, rows)], each ``rows`` as
    Store.usage_stats groups and sums them. One query over the rollups that
    stats reads, so a chart and the stats never disagree."""
    if (until - since) / step > MAX_SERIES_POINTS:
        raise BadRequestError("a series has at most %d points" % MAX_SERIES_POINTS, param="step")
    points = {start: [] for start in range(int(since), int(until), int(step))}
    for row in store.usage_stats(group_by, since, until, step=step, fields=fields):
        points[row.pop("at")].append(row)
    return list(points.items())


LOG_PAGE_LIMIT = 1000


def request_log(store, options):
    """A page of the request log for the CLI and the admin API: ``options``
    are strings (LOG_FILTERS names, ``limit`` and ``cursor``), as typed.
    Returns {"data": [entries], "next_cursor": ...}."""
    unknown = set(options) - set(LOG_FILTERS) - {"limit", "cursor"}
    if unknown:
        raise BadRequestError("unknown log filter(s): %s (known: %s, limit, cursor)"
                              % (", ".join(sorted(unknown)), ", ".join(LOG_FILTERS)))
    filters = {name: options.get(name) for name in LOG_FILTERS}
    for name, end in (("since", False), ("until", True)):
        if filters[name] is not None:
            filters[name] = parse_time_bound(filters[name], end, name)
    limit = check_number(number_in_text(options.get("limit") or "50"), "limit", 1, LOG_PAGE_LIMIT, integer=True,
                         error=BadRequestError)
    cursor = options.get("cursor")
    entries, next_cursor = store.usage_log(filters, cursor and parse_log_cursor(cursor), limit)
    return {"data": entries, "next_cursor": next_cursor}


def request_log_entry(store, entry_id):
    """One request log entry by its id, with ``bodies``: what was kept of
    its request and answer if its key logs bodies (``log_bodies``), else
    None. Only this single-entry view shows bodies, never a list."""
    row_id = check_number(number_in_text(entry_id), "id", 1, 2 ** 63 - 1, integer=True, error=BadRequestError)
    entry = store.usage_log_entry(row_id)
    if entry is None:
        raise NotFoundError("No request log entry %s" % shown(entry_id))
    kept = store.usage_bodies(row_id)
    entry["bodies"] = None if kept is None else {
        "request": kept[0].decode("utf-8", "replace"), "request_bytes": kept[1],
        "response": None if kept[2] is None else kept[2].decode("utf-8", "replace"), "response_bytes": kept[3],
        "kept_bytes_each": BODY_LOG_BYTES}
    return entry


#: A spreadsheet runs a cell that starts with one of these as a formula.
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def csv_text(rows):
    """Rows of dicts (all with the same keys) as CSV with a header line.
    Mappings are written as JSON; text a spreadsheet would take for a
    formula (a model name is the client's to choose) is quoted with '."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    if rows:
        writer.writerow(list(rows[0]))
    for row in rows:
        cells = []
        for value in row.values():
            if isinstance(value, (dict, list)):
                value = json.dumps(value, sort_keys=True)
            if isinstance(value, str) and value.startswith(_FORMULA_START):
                value = "'" + value
            cells.append("" if value is None else value)
        writer.writerow(cells)
    return out.getvalue()


def list_deployments(config, store, environ=os.environ, now=None):
    """Every deployment (provider key) and its shared cooldown, as
    ``cli.py deployments`` shows them; keys masked."""
    now = time.time() if now is None else now
    stored, named = store.provider_keys(), store.deployment_keys()
    cooldowns = {row[0]: row[1:] for row in store.cooldowns()}
    rows = []
    for provider in config.providers.values():
        keys, problems = resolve_deployment_keys(provider, stored, named, environ)
        for name, key, source in keys:
            until, failures, reason = cooldowns.get("%s/%s" % (provider.name, name), (0.0, 0, None))
            rows.append(describe_deployment(provider.name, name, key, source, until, failures, reason, now))
        for problem in problems:
            rows.append({"deployment": provider.name, "provider": provider.name, "name": None, "key": None,
                         "source": None, "state": "invalid: %s" % problem.message})
    return rows


def price_rows(prices):
    """The price table (a PriceTable) as rows: model, USD per million tokens
    by kind, long-context tier and where each price came from."""
    return [dict(price.as_dict(), model=model, source=price.source) for model, price in prices.items()]


def reprice_usage(store, prices, since=None, until=None, project=None, apply=False):
    """Recompute stored costs from the raw counts with today's ``prices``.
    Returns old and new totals; ``apply`` writes the new costs."""
    totals = {"rows": 0, "changed_rows": 0, "old_cost": 0, "new_cost": 0}
    updates = []
    for row_id, model, counts, old_cost in store.usage_costs(since, until, project):
        new_cost, priced = price_usage(prices.lookup(model), Usage(*counts))
        totals["rows"] += 1
        totals["old_cost"] += old_cost
        totals["new_cost"] += new_cost
        if new_cost != old_cost:
            updates.append((new_cost, priced, row_id))
    totals["changed_rows"] = len(updates)
    if apply and updates:
        store.set_costs(updates)
    totals["old_cost"], totals["new_cost"] = nanousd_to_usd(totals["old_cost"]), nanousd_to_usd(totals["new_cost"])
    totals["applied"] = bool(apply)
    return totals


# -- the dashboard's pages (/ui) ---------------------------------------------
#
# Server-rendered HTML over the functions above: what a page shows is what
# the CLI and the admin API answer. Every value is escaped; no page holds a
# secret but a new key, once, on the page that made it. Charts are inline
# SVG with a <title> per bar for its tooltip. The CSS and the one script are
# served as files (UI_CSS, UI_JS below), so the Content-Security-Policy can
# forbid inline script and style; the script only asks before revoking and
# copies a new key.

#: The dashboard's ranges: name -> (span, step) in seconds. A week is drawn
#: by day: by the hour it reads 7 x 24 hourly rollups per key and model
#: (0.4 s at ten million rows, against 0.06 s by day).
UI_RANGES = {"24h": (86400, 3600), "7d": (7 * 86400, 86400), "30d": (30 * 86400, 86400)}
#: Steps a chart's range may be cut into, finest first, and their names.
UI_STEPS = {3600: "hour", 86400: "day", 7 * 86400: "week"}
#: What the overview sums: its charts, and its table of totals.
UI_CHART_FIELDS = ("requests", "cost_nanousd")
UI_TOTAL_FIELDS = ("requests", "errors", "request_tokens", "response_tokens", "cost_nanousd")
#: The groups a chart is drawn by: name -> (stats grouping, label of a stats row).
UI_CHART_GROUPS = {
    "project": ("project", lambda row: row["project_name"] or "(deleted key)"),
    "key": ("key", lambda row: "%s (%s)" % (row["virtual_key_id"], row["project_name"] or "deleted")),
    "model": ("model", lambda row: row["model"] or "(none)"),
}
#: Series drawn apart in a chart; the rest are summed as "other".
UI_CHART_SERIES = 6
#: The request log's columns in the dashboard: (entry field, heading).
UI_LOG_COLUMNS = (("time", "Time"), ("virtual_key_id", "Key"), ("project_name", "Project"), ("model", "Model"),
                  ("endpoint", "Endpoint"), ("status", "Status"), ("http_status", "HTTP"),
                  ("request_tokens", "In"), ("response_tokens", "Out"), ("cost", "Cost (USD)"),
                  ("latency_ms", "ms"))
_e = html.escape


def ui_range(options, now):
    """The overview's range from its query options: (name, since, until,
    step), ``since`` and ``until`` on whole steps so every point of a chart
    reads whole rollups."""
    name = options.get("range") or "24h"
    if name in UI_RANGES:
        span, step = UI_RANGES[name]
        until = -(-int(now) // step) * step
        return name, until - span, until, step
    if name != "custom":
        raise BadRequestError("range: %s is not one of 24h, 7d, 30d, custom" % shown(name), param="range")
    since = parse_time_bound(options.get("since") or "", name="since")
    until = parse_time_bound(options.get("until") or "", end=True, name="until")
    if until <= since:
        raise BadRequestError("until: must be after since", param="until")
    # Widened to whole steps, a range gains at most a step at either end.
    step = next((step for step in UI_STEPS if (until - since) / step <= MAX_SERIES_POINTS - 2), None)
    if step is None:
        raise BadRequestError("since: a custom range spans at most %d weeks" % (MAX_SERIES_POINTS - 2),
                              param="since")
    return name, int(since) // step * step, -(-int(until) // step) * step, step


def ui_chart_series(points, label, measure, order, limit=UI_CHART_SERIES):
    """[(label, [value per point])] of ``measure`` for the first ``limit`` - 1
    labels of ``order`` and, summed, all the others (so every chart of a
    page gives a group the same colour)."""
    drawn = order[:limit] if len(order) <= limit else order[:limit - 1]
    values = {name: [0] * len(points) for name in drawn + ["other"]}
    for index, (_, rows) in enumerate(points):
        for row in rows:
            name = label(row)
            values[name if name in values else "other"][index] += row[measure]
    return [(name, values[name]) for name in drawn] + ([("other", values["other"])] if len(order) > limit else [])


def format_usd(amount):
    return "$%s" % ("{:,.2f}".format(amount) if amount >= 100 else "{:.6f}".format(amount).rstrip("0").rstrip("."))


def _nice_ceiling(value):
    """The smallest 1, 2 or 5 times a power of ten from ``value`` up."""
    if value <= 0:
        return 1
    power = 10 ** math.floor(math.log10(value))
    return next(step * power for step in (1, 2, 5, 10) if step * power >= value)


def svg_bar_chart(title, starts, step, series, fmt):
    """Stacked bars per point in time as inline SVG: ``series`` is
    [(label, [value per start])], drawn bottom up in class s0, s1...; each
    bar's <title> names its group, time and value."""
    width, height, left, top, bottom = 760, 210, 70, 10, 24
    plot_width, plot_height = width - left - 10, height - top - bottom
    totals = [sum(values[index] for _, values in series) for index in range(len(starts))]
    scale = _nice_ceiling(max(totals, default=0))
    slot = plot_width / max(len(starts), 1)
    time_format = "%H:%M" if step < 86400 else "%b %d"
    out = ['<svg class="chart" viewBox="0 0 %d %d" role="img" aria-label="%s">' % (width, height, _e(title))]
    for tick in range(5):
        y = top + plot_height * (1 - tick / 4)
        out.append('<line class="grid" x1="%d" x2="%d" y1="%.1f" y2="%.1f"/><text class="axis" x="%d" y="%.1f" '
                   'text-anchor="end">%s</text>' % (left, width - 10, y, y, left - 6, y + 4,
                                                    _e(fmt(scale * tick / 4))))
    every = max(1, math.ceil(len(starts) / 8))
    for index, start in enumerate(starts):
        moment = datetime.datetime.fromtimestamp(start, datetime.timezone.utc)
        x, y = left + index * slot, top + plot_height
        for number, (label, values) in enumerate(series):
            if values[index] > 0:
                bar = plot_height * values[index] / scale
                y -= bar
                out.append('<rect class="s%d" x="%.1f" y="%.1f" width="%.1f" height="%.1f"><title>%s</title></rect>'
                           % (number, x + slot * 0.1, y, slot * 0.8, bar,
                              _e("%s, %s UTC: %s" % (label, moment.strftime("%Y-%m-%d %H:%M"), fmt(values[index])))))
        if index % every == 0:
            out.append('<text class="axis" x="%.1f" y="%d" text-anchor="middle">%s</text>'
                       % (x + slot / 2, height - 6, _e(moment.strftime(time_format))))
    out.append("</svg>")
    return "".join(out)


def ui_legend(series):
    return '<ul class="legend">%s</ul>' % "".join(
        '<li><span class="swatch s%d"></span>%s</li>' % (number, _e(label)) for number, (label, _) in enumerate(series))


def ui_text(value):
    """A value as escaped text; None as nothing."""
    return "" if value is None else _e(str(value))


def ui_table(rows, columns, cell=lambda name, row: ui_text(row.get(name))):
    """An HTML table of ``rows`` (dicts) with ``columns`` [(field, heading)]."""
    head = "".join("<th>%s</th>" % _e(heading) for _, heading in columns)
    body = "".join("<tr>%s</tr>" % "".join("<td>%s</td>" % cell(name, row) for name, _ in columns) for row in rows)
    return '<table><thead><tr>%s</tr></thead><tbody>%s</tbody></table>' % (head, body)


def ui_page(title, current, content, csrf=None, message=None, error=None):
    """A whole page: navigation (with a logout form) when signed in."""
    nav = ""
    if csrf is not None:
        links = "".join('<a href="/ui/%s"%s>%s</a>' % (page, ' aria-current="page"' if page == current else "", label)
                        for page, label in (("overview", "Overview"), ("keys", "Keys"), ("logs", "Logs"),
                                            ("prices", "Prices")))
        nav = ('<nav><strong>llmgw</strong>%s<form method="post" action="/ui/logout">%s'
               '<button type="submit">Log out</button></form></nav>' % (links, ui_csrf_field(csrf)))
    notices = "".join('<p class="%s" role="%s">%s</p>' % (kind, role, _e(text))
                      for kind, role, text in (("message", "status", message), ("error", "alert", error)) if text)
    return ('<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><meta name="viewport" '
            'content="width=device-width, initial-scale=1"><title>%s - llmgw</title>'
            '<link rel="stylesheet" href="/ui/app.css"><script src="/ui/app.js" defer></script></head>'
            '<body>%s<main><h1>%s</h1>%s%s</main></body></html>' % (_e(title), nav, _e(title), notices, content))


def ui_csrf_field(csrf):
    return '<input type="hidden" name="csrf" value="%s">' % _e(csrf)


def ui_login_html(login_csrf, error=None):
    content = ('<form method="post" action="/ui/login" class="login"><input type="hidden" name="login_csrf" '
               'value="%s"><label>Admin token <input type="password" name="token" autocomplete="current-password" '
               'required autofocus></label><button type="submit">Log in</button></form>' % _e(login_csrf))
    return ui_page("Log in", None, content, error=error)


def ui_overview_html(csrf, options, chosen, points, totals, error=None):
    """The overview: range and grouping, spend and requests charts, totals."""
    name, since, until, step = chosen
    by = options.get("by") or "project"
    ranges = "".join('<a class="range%s" href="/ui/overview?%s">%s</a>' % (
        " chosen" if choice == name else "", _e(urllib.parse.urlencode({"range": choice, "by": by})), choice)
        for choice in UI_RANGES)
    groups = "".join('<option value="%s"%s>%s</option>' % (group, " selected" if group == by else "", group)
                     for group in UI_CHART_GROUPS)
    form = ('<div class="ranges">%s</div><form method="get" action="/ui/overview" class="filters">'
            '<input type="hidden" name="range" value="custom"><label>From <input type="date" name="since" value="%s">'
            '</label><label>To <input type="date" name="until" value="%s"></label><label>By <select name="by">%s'
            '</select></label><button type="submit">Show</button></form>' % (
                ranges, _e(options.get("since") or iso_time(since)[:10]),
                _e(options.get("until") or iso_time(until - 1)[:10]), groups))
    if error:
        return ui_page("Overview", "overview", form, csrf, error=error)
    label = UI_CHART_GROUPS[by][1]
    starts = [start for start, _ in points]
    totals = sorted(totals, key=lambda row: (-row["estimated_cost"], -row["requests"]))
    order = [label(row) for row in totals]
    spend = ui_chart_series(points, label, "estimated_cost", order)
    requests = ui_chart_series(points, label, "requests", order)
    table_rows = [dict(row, group=label(row), estimated_cost=format_usd(row["estimated_cost"])) for row in totals]
    content = ('%s<p class="note">%s to %s UTC, one bar per %s, by %s.</p>'
               '<section><h2>Spend (USD)</h2>%s%s</section><section><h2>Requests</h2>%s%s</section>'
               '<section><h2>Totals</h2>%s</section>' % (
                   form, _e(iso_time(since)), _e(iso_time(until)), _e(UI_STEPS[step]), _e(by),
                   svg_bar_chart("Spend by %s" % by, starts, step, spend, format_usd), ui_legend(spend),
                   svg_bar_chart("Requests by %s" % by, starts, step, requests, lambda value: "%g" % value),
                   ui_legend(requests),
                   ui_table(table_rows, [("group", by.capitalize()), ("requests", "Requests"), ("errors", "Errors"),
                                         ("request_tokens", "Request tokens"), ("response_tokens", "Response tokens"),
                                         ("estimated_cost", "Cost")])))
    return ui_page("Overview", "overview", content, csrf)


def ui_keys_html(csrf, keys, config, new_key=None, message=None, error=None):
    """The keys: each with its budget bar, expiry and actions; the form
    that creates one; a key just made or rotated, shown this once."""
    def cell(name, key):
        if name == "budget":
            budget = key["budget"]
            if budget["max_budget"] is None:
                return "none"
            return '<progress max="%s" value="%s"></progress> %s of %s (%s)' % (
                budget["max_budget"], min(budget["budget_spent"], budget["max_budget"]),
                format_usd(budget["budget_spent"]), format_usd(budget["max_budget"]), _e(key["budget_period"]))
        if name == "limits":
            return _e(", ".join("%s %s" % (field, key[field]) for field in ("rpm", "tpm", "max_parallel")
                                if key[field] is not None) or "tier %s" % key["tier"])
        if name == "state":
            return "active" if key["is_active"] else "revoked"
        if name == "actions":
            if not key["is_active"]:
                return ""
            action = "/ui/keys/%s/" % urllib.parse.quote(key["id"])
            hidden = ui_csrf_field(csrf)
            return ('<form method="post" action="%stopup" class="inline">%s<input name="amount" size="6" '
                    'placeholder="USD" aria-label="Top-up amount"><button type="submit">Top up</button></form>'
                    '<form method="post" action="%srotate" class="inline">%s<input name="grace" size="4" value="0s" '
                    'aria-label="Grace"><button type="submit">Rotate</button></form>'
                    '<form method="post" action="%srevoke" class="inline" data-confirm="Revoke %s? Requests with it '
                    'are refused from now on.">%s<button type="submit" class="danger">Revoke</button></form>'
                    % (_e(action), hidden, _e(action), hidden, _e(action), _e(key["id"]), hidden))
        return ui_text(key.get(name))
    shown_once = ""
    if new_key is not None:
        shown_once = ('<div class="secret" role="status"><p>New key for <strong>%s</strong>. It is shown this once: '
                      'copy it now.</p><code id="new-key">%s</code> <button type="button" data-copy="new-key">Copy'
                      '</button></div>' % (_e(new_key["id"]), _e(new_key["key"])))
    tiers = "".join('<option>%s</option>' % _e(tier) for tier in config.rate_limits)
    periods = "".join('<option%s>%s</option>' % (" selected" if period == "monthly" else "", period)
                      for period in BUDGET_PERIODS)
    create = ('<details class="create"%s><summary>Create a key</summary><form method="post" action="/ui/keys" '
              'class="grid">%s<label>Project <input name="project_name" required></label><label>Tier <select '
              'name="tier">%s</select></label><label>Requests per minute <input name="rpm" inputmode="numeric">'
              '</label><label>Tokens per minute <input name="tpm" inputmode="numeric"></label><label>Parallel '
              'requests <input name="max_parallel" inputmode="numeric"></label><label>Budget (USD) <input '
              'name="max_budget" inputmode="decimal"></label><label>Budget period <select name="budget_period">%s'
              '</select></label><label>Expires in <input name="expires_in" placeholder="30d"></label><label>Models '
              '<input name="models" placeholder="gpt-4o*, claude-*"></label><label>Labels <input name="labels" '
              'placeholder="team=search, env=prod"></label><label>Alerts at (%% of budget) <input '
              'name="alert_thresholds" placeholder="50,80,100"></label><label class="check"><input type="checkbox" '
              'name="log_bodies"> Keep request bodies</label><button type="submit">Create</button></form></details>'
              % (" open" if error else "", ui_csrf_field(csrf), tiers, periods))
    columns = [("id", "ID"), ("project_name", "Project"), ("tier", "Tier"), ("limits", "Limits"),
               ("budget", "Budget this period"), ("expires_at", "Expires"), ("state", "State"),
               ("last_used_at", "Last used"), ("key_hint", "Key"), ("actions", "")]
    content = shown_once + create + (ui_table(keys, columns, cell) if keys else "<p>No keys yet.</p>")
    return ui_page("Keys", "keys", content, csrf, message, error)


def ui_logs_html(csrf, options, page, show=None, error=None):
    """The request log: filters, a page of entries (newest first), the
    entry asked for (``show``, its row id) in a detail panel."""
    fields = "".join('<label>%s <input name="%s" value="%s"%s></label>' % (
        name.capitalize(), name, _e(options.get(name) or ""),
        ' placeholder="YYYY-MM-DD or ISO time"' if name in ("since", "until") else "") for name in LOG_FILTERS)
    form = ('<form method="get" action="/ui/logs" class="filters">%s<button type="submit">Filter</button>'
            '<a href="/ui/logs">Clear</a></form>' % fields)
    if error:
        return ui_page("Logs", "logs", form, csrf, error=error)
    filters = {name: value for name, value in options.items() if name in LOG_FILTERS}

    def link(entry):
        return "/ui/logs?" + urllib.parse.urlencode(dict(filters, cursor=options.get("cursor") or "",
                                                         show=entry["id"]))

    def cell(name, entry):
        value = entry.get(name)
        if name == "time":
            return '<a href="%s">%s</a>' % (_e(link(entry)), _e(value))
        return ui_text(value)
    rows = [dict(entry, cost=format_usd(entry["cost"])) for entry in page["data"]]
    detail = next((entry for entry in rows if str(entry["id"]) == show), None)
    panel = ""
    if detail is not None:
        panel = '<aside class="detail" aria-label="Request detail"><h2>Request %s</h2><dl>%s</dl></aside>' % (
            _e(str(detail["request_id"])), "".join("<dt>%s</dt><dd>%s</dd>" % (
                _e(name), _e(json.dumps(value, sort_keys=True) if isinstance(value, (dict, list)) else str(value)))
                for name, value in detail.items()))
    more = ""
    if page["next_cursor"]:
        more = '<p><a href="/ui/logs?%s" rel="next">Older entries</a></p>' % _e(
            urllib.parse.urlencode(dict(filters, cursor=page["next_cursor"])))
    table = ui_table(rows, UI_LOG_COLUMNS, cell) if rows else "<p>No requests match.</p>"
    return ui_page("Logs", "logs", '%s<div class="logs"><div>%s%s</div>%s</div>' % (form, table, more, panel), csrf)


def ui_prices_html(csrf, rows):
    def cell(name, row):
        value = row.get(name)
        if name == "long_context" and value:
            return _e("above %d: %s %g/%g" % (value["above_tokens"], value["charge"], value["input"], value["output"]))
        return ui_text(value)
    content = ('<p class="note">USD per million tokens. Precedence: config.yaml, then imported packs, then built-in.'
               '</p>%s' % ui_table(rows, [("model", "Model"), ("input", "Input"), ("output", "Output"),
                                         ("cached_input", "Cached input"), ("cache_write", "Cache write"),
                                         ("cache_write_1h", "Cache write 1h"), ("long_context", "Long context"),
                                         ("source", "Source")], cell))
    return ui_page("Prices", "prices", content, csrf)


UI_CSS = """
:root { color-scheme: light; --ink: #1d2433; --muted: #5b6577; --line: #d8dde6; --accent: #2f5fb3; }
* { box-sizing: border-box; }
body { margin: 0; font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; color: var(--ink);
       background: #f6f7f9; }
nav { display: flex; gap: 18px; align-items: center; padding: 10px 24px; background: #1d2433; color: #fff; }
nav a { color: #c9d3e6; text-decoration: none; }
nav a[aria-current] { color: #fff; font-weight: 600; }
nav form { margin-left: auto; }
main { padding: 16px 24px 40px; max-width: 1280px; }
h1 { font-size: 22px; margin: 4px 0 14px; }
h2 { font-size: 16px; margin: 18px 0 8px; }
section, .create, .secret, .detail, .login { background: #fff; border: 1px solid var(--line); border-radius: 6px;
                                             padding: 12px 16px; margin-bottom: 14px; }
table { border-collapse: collapse; width: 100%; background: #fff; }
th, td { text-align: left; padding: 5px 8px; border-bottom: 1px solid var(--line); vertical-align: middle; }
th { font-weight: 600; color: var(--muted); font-size: 12px; text-transform: uppercase; }
button { font: inherit; padding: 3px 10px; border: 1px solid var(--accent); border-radius: 4px;
         background: var(--accent); color: #fff; cursor: pointer; }
button.danger { background: #b3261e; border-color: #b3261e; }
nav button { background: transparent; border-color: #8592ab; }
input, select { font: inherit; padding: 3px 6px; border: 1px solid var(--line); border-radius: 4px; }
label { display: inline-flex; flex-direction: column; gap: 2px; font-size: 12px; color: var(--muted); }
label.check { flex-direction: row; align-items: center; gap: 6px; }
form.inline { display: inline-flex; gap: 4px; margin: 2px 6px 2px 0; }
form.filters { display: flex; flex-wrap: wrap; gap: 10px; align-items: flex-end; margin-bottom: 12px; }
form.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(180px, 1fr)); gap: 10px;
            align-items: end; margin-top: 10px; }
form.login { display: flex; gap: 10px; align-items: flex-end; max-width: 520px; }
.ranges { display: flex; gap: 6px; margin-bottom: 8px; }
a.range { padding: 3px 12px; border: 1px solid var(--line); border-radius: 14px; background: #fff;
          color: var(--ink); text-decoration: none; }
a.range.chosen { background: var(--accent); color: #fff; border-color: var(--accent); }
.note { color: var(--muted); }
.message { background: #e6f4ea; border: 1px solid #a8d5b5; padding: 8px 12px; border-radius: 4px; }
.error { background: #fce8e6; border: 1px solid #f0b4ae; padding: 8px 12px; border-radius: 4px; }
.secret code { font-size: 15px; background: #fff8d6; padding: 4px 8px; border-radius: 4px; }
progress { width: 90px; vertical-align: middle; }
svg.chart { width: 100%; max-width: 900px; height: auto; }
svg .grid { stroke: #e3e7ee; }
svg .axis { fill: var(--muted); font-size: 11px; }
.legend { list-style: none; display: flex; flex-wrap: wrap; gap: 14px; padding: 0; margin: 6px 0 0; }
.swatch { display: inline-block; width: 10px; height: 10px; margin-right: 5px; border-radius: 2px; }
.s0 { fill: #4e79a7; background: #4e79a7; } .s1 { fill: #f28e2b; background: #f28e2b; }
.s2 { fill: #59a14f; background: #59a14f; } .s3 { fill: #e15759; background: #e15759; }
.s4 { fill: #76b7b2; background: #76b7b2; } .s5 { fill: #9c9c9c; background: #9c9c9c; }
.logs { display: grid; grid-template-columns: minmax(0, 1fr) auto; gap: 14px; align-items: start; }
.logs > div { overflow-x: auto; }
.detail { width: 340px; position: sticky; top: 10px; }
.detail dl { display: grid; grid-template-columns: auto 1fr; gap: 2px 10px; margin: 0; font-size: 12px; }
.detail dt { color: var(--muted); }
.detail dd { margin: 0; word-break: break-all; }
"""

#: The dashboard's one script: asks before a form marked data-confirm is
#: sent, and copies a new key to the clipboard.
UI_JS = """
"use strict";
document.addEventListener("submit", function (event) {
  var question = event.target.getAttribute("data-confirm");
  if (question && !window.confirm(question)) { event.preventDefault(); }
});
document.addEventListener("click", function (event) {
  var button = event.target.closest("[data-copy]");
  if (!button) { return; }
  var text = document.getElementById(button.getAttribute("data-copy")).textContent;
  navigator.clipboard.writeText(text).then(function () { button.textContent = "Copied"; });
});
"""


# ==== 10. Gateway ===========================================================
#
# The product as plain Python: ``Gateway.handle(request) -> Reply``, as a
# generator that yields a ProviderWait wherever the call waits for its
# provider (section 11 parks it there). The Exchange below turns bytes into
# a Request and a Reply back into bytes; every decision is made here.

@dataclasses.dataclass(frozen=True)
class Route:
    """A proxied endpoint and what the gateway knows about it."""
    methods: Tuple[str, ...]
    dialect: Optional[str]               # None: Anthropic if anthropic-version is sent
    usage_parser: Optional[object] = None  # None: nothing billable (NON_BILLABLE_ENDPOINTS)
    stream_meter: Optional[type] = None
    injects_stream_usage: bool = False   # ask OpenAI for usage on streams
    generates: bool = True               # produces output tokens (embeddings do not)
    names_model: bool = True             # a POST body must name its model (else: the default provider's)


#: The proxied endpoints; ``{model}`` and ``{response_id}`` stand for a path
#: segment (a model may carry its ``provider/`` prefix). A retrieval of a
#: response goes to the deployment that made it (``Store.response_origin``).
ROUTES = {
    "/v1/chat/completions": Route(("POST",), OPENAI, openai_usage, ChatStreamMeter, True),
    "/v1/completions": Route(("POST",), OPENAI, openai_usage, ChatStreamMeter, True),
    "/v1/embeddings": Route(("POST",), OPENAI, openai_usage, generates=False),
    "/v1/responses": Route(("POST",), OPENAI, responses_usage, ResponsesStreamMeter),
    "/v1/responses/input_tokens": Route(("POST",), OPENAI, names_model=False),
    "/v1/responses/{response_id}": Route(("GET", "DELETE"), OPENAI),
    "/v1/responses/{response_id}/cancel": Route(("POST",), OPENAI, names_model=False),
    "/v1/responses/{response_id}/input_items": Route(("GET",), OPENAI),
    "/v1/moderations": Route(("POST",), OPENAI, names_model=False),
    "/v1/messages": Route(("POST",), ANTHROPIC, anthropic_usage, MessagesStreamMeter),
    "/v1/messages/count_tokens": Route(("POST",), ANTHROPIC),
    "/v1/models": Route(("GET",), None),
    "/v1/models/{model}": Route(("GET",), None),
    "/v1/key/info": Route(("GET",), OPENAI),
}
#: A key asks about itself; answered by the gateway, never forwarded.
KEY_INFO_ROUTE = ROUTES["/v1/key/info"]
#: The provider's model list, with the configured aliases added.
MODELS_ROUTE = ROUTES["/v1/models"]
#: Makes responses: their ids are recorded, for retrievals.
RESPONSES_ROUTE = ROUTES["/v1/responses"]
#: What a path parameter may hold: a model id (``ft:...``, ``name@version``,
#: up to four segments: a ``provider/`` prefix, ``org/model``; no segment of
#: dots; the SDKs send ``/`` as ``%2F``) or a response id (``resp_...``).
_MODEL_SEGMENT = r"(?!\.\.?(?:/|%2[Ff]|\Z))[A-Za-z0-9._:@+-]{1,256}"
_PATH_PARAMETERS = {"model": r"%s(?:(?:/|%%2[Ff])%s){0,3}" % (_MODEL_SEGMENT, _MODEL_SEGMENT),
                    "response_id": r"[A-Za-z0-9_-]{1,256}"}


def _path_pattern(template):
    parts = re.split(r"\{(\w+)\}", template)  # text, parameter name, text, ...
    return re.compile("".join(re.escape(part) if index % 2 == 0 else "(?P<%s>%s)" % (part, _PATH_PARAMETERS[part])
                              for index, part in enumerate(parts)) + r"\Z")


_ROUTE_PATTERNS = tuple((_path_pattern(template), template) for template in ROUTES if "{" in template)


def find_route(path):
    """(template, Route, path parameters) of a proxied path, an exact path
    before a template; (None, None, {}) for any other path."""
    route = ROUTES.get(path)
    if route is not None:
        return path, route, {}
    for pattern, template in _ROUTE_PATTERNS:
        match = pattern.match(path)
        if match:
            return template, ROUTES[template], {name: urllib.parse.unquote(value)  # %2F, the only escape matched
                                                for name, value in match.groupdict().items()}
    return None, None, {}


#: Admin API bodies are small JSON objects.
ADMIN_BODY_BYTES = 64 * 1024
#: How many distinct unpriced models a process logs (one line each).
UNPRICED_MODELS_LOGGED = 100


class Request:
    """One client request, as the handler parsed it. The body is read only
    when the gateway asks, after the key is checked."""

    def __init__(self, method, path, headers, content_length, read_body, send_continue=None, query="",
                 admission=None):
        self.method = method
        self.path = path
        self.query = query                  # never forwarded
        self.headers = headers              # lower-cased name -> value
        self.content_length = content_length
        self._read_body = read_body
        self._send_continue = send_continue  # set when the client sent Expect: 100-continue
        self.admission = admission          # an Admission when checked before its body arrived
        self.body_consumed = not content_length
        self.log = {}                        # what the access log line reports
        self.received = time.monotonic()     # the gateway's overhead counts from here

    def read_body(self):
        if self._send_continue is not None:
            self._send_continue()
        body = self._read_body(self.content_length or 0)
        self.body_consumed = True
        return body


class Reply:
    """A response: a complete body, or a stream of events (``stream``)."""
    __slots__ = ("status", "headers", "body", "stream")

    def __init__(self, status, headers, body=b"", stream=None):
        self.status, self.headers, self.body, self.stream = status, headers, body, stream


def json_reply(status, payload, headers=()):
    return Reply(status, [("content-type", "application/json")] + list(headers),
                 json.dumps(payload).encode())


def csv_reply(text, headers=()):
    return Reply(200, [("content-type", "text/csv; charset=utf-8")] + list(headers), text.encode("utf-8"))


def error_reply(exc, dialect):
    return json_reply(exc.status, error_body(exc, dialect), exc.headers)


_JSON_CONTENT_TYPE = re.compile(r"^application/json\s*(;\s*charset\s*=\s*\"?utf-8\"?\s*)?$", re.I)


def _reject_duplicate_keys(pairs):
    result = dict(pairs)
    if len(result) != len(pairs):
        raise ValueError("duplicate key")
    return result


def _reject_constant(name):
    raise ValueError("%s is not JSON" % name)


#: Client bodies are strict JSON: no duplicate keys, no NaN or Infinity.
_STRICT_JSON = json.JSONDecoder(object_pairs_hook=_reject_duplicate_keys, parse_constant=_reject_constant)
#: How deep objects and arrays may nest in a client body (the top-level object
#: is depth 1). Real requests (tool schemas included) stay far below it;
#: deeper ones are refused before anything else reads them.
MAX_JSON_DEPTH = 128
#: A \uD800-\uDFFF escape: the only way a lone surrogate gets into a decoded body.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def nests_deeper_than(value, limit):
    """Whether objects and arrays in ``value`` nest deeper than ``limit``,
    looked at level by level (never recursively)."""
    level = [value]
    for _ in range(limit):
        level = [child for container in level
                 for child in (container.values() if isinstance(container, dict) else container)
                 if isinstance(child, (dict, list))]
        if not level:
            return False
    return True


def has_lone_surrogate(raw, value):
    """Whether a decoded body holds a lone UTF-16 surrogate (``"\\ud800"``),
    which no UTF-8 text, SQLite column or re-encoded body can carry. Only
    bodies that escape a surrogate at all are looked at closely."""
    if _SURROGATE_ESCAPE.search(raw) is None:
        return False
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def parse_json_body(request, max_bytes):
    """Read and parse a JSON object body. Raises a 4xx GatewayError."""
    if request.content_length is None:
        raise LengthRequiredError("A request body with a Content-Length header is required")
    if request.content_length > max_bytes:
        raise PayloadTooLargeError("The request body is larger than the gateway's limit of %d bytes" % max_bytes)
    if not _JSON_CONTENT_TYPE.match(request.headers.get("content-type", "")):
        raise UnsupportedMediaTypeError("Content-Type must be application/json")
    raw = request.read_body()
    try:
        body = _STRICT_JSON.decode(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise BadRequestError("The request body is not valid JSON (UTF-8, no duplicate keys)") from None
    if not isinstance(body, dict):
        raise BadRequestError("The request body must be a JSON object")
    if nests_deeper_than(body, MAX_JSON_DEPTH):
        raise BadRequestError("The request body nests objects and arrays deeper than %d levels" % MAX_JSON_DEPTH)
    if has_lone_surrogate(raw, body):
        raise BadRequestError("The request body holds a lone UTF-16 surrogate escape (\\ud800-\\udfff), "
                              "which is not text")
    return raw, body


# -- metrics ------------------------------------------------------------------
#
# /metrics speaks Prometheus' text format. Counters of requests, tokens and
# cost come from the books (usage_totals, so every process answers for all
# of them, and restarts lose nothing); latency histograms, refusals and
# gauges are this process's own. Labels are ids and names the operator
# chose: a key's id and project, a provider, a model the price table knows
# (any other model counts as "other"), so a client cannot mint series.

#: Histogram bounds in seconds, per latency.
LATENCY_BUCKETS = {
    "overhead": (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
    "first_byte": (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0),
    "total": (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0),
}
#: The metrics served: name -> (type, help).
METRICS = {
    "llmgw_requests_total": ("counter", "Requests forwarded to a provider (each attempt) and settled, by outcome "
                                        "(status)."),
    "llmgw_request_errors_total": ("counter", "Forwarded requests that ended non-2xx or broke off."),
    "llmgw_tokens_total": ("counter", "Tokens by kind: input (uncached), cache_read, cache_write, output, "
                                      "reasoning (part of output)."),
    "llmgw_cost_usd_total": ("counter", "Cost in USD, as recorded in the usage rows."),
    "llmgw_request_duration_seconds": ("histogram", "Total time of forwarded requests (this process)."),
    "llmgw_upstream_first_byte_seconds": ("histogram", "Request sent to the provider's answer head (this process)."),
    "llmgw_gateway_overhead_seconds": ("histogram", "Request received to request forwarded (this process)."),
    "llmgw_rate_limit_refusals_total": ("counter", "Requests refused by a key's limits or budget (this process)."),
    "llmgw_budget_spent_usd": ("gauge", "Spend in the current budget period, per key with a budget."),
    "llmgw_budget_limit_usd": ("gauge", "The current budget period's allowance (budget plus top-ups)."),
    "llmgw_streams_in_flight": ("gauge", "Streams being relayed (this process)."),
    "llmgw_connections_open": ("gauge", "Client connections open (this process)."),
    "llmgw_connections_max": ("gauge", "server.max_connections."),
    "llmgw_worker_threads": ("gauge", "Worker threads running (this process)."),
    "llmgw_workers_busy": ("gauge", "Worker threads serving a request (this process)."),
    "llmgw_calls_in_flight": ("gauge", "Calls between their pending and settled rows (this process)."),
    "llmgw_resident_memory_bytes": ("gauge", "Resident memory of this process (0 where /proc is missing)."),
    "llmgw_capacity_refusals_total": ("counter", "Requests answered 503 because the gateway was full: "
                                                 "connections, calls in flight, memory, file descriptors or "
                                                 "queue_timeout (this process)."),
}
_LATENCY_METRICS = {"total": "llmgw_request_duration_seconds", "first_byte": "llmgw_upstream_first_byte_seconds",
                    "overhead": "llmgw_gateway_overhead_seconds"}
#: How long a process reuses the samples it read from the database for
#: /metrics (metrics_books; the rest of the page is read for each scrape):
#: scrapes within it (several scrapers, or a metrics token in a loop) cost
#: one read between them, and no figure is older than this. A scraper every
#: 15 s reads afresh each time.
METRICS_BOOKS_SECONDS = 1
#: One label set's tokens, a sample per TOKEN_KINDS: formatted at once.
_TOKEN_SAMPLES = "\n".join('llmgw_tokens_total{%%s,kind="%s"} %%d' % kind for kind, _ in TOKEN_KINDS)


class ProcessMetrics:
    """What this process saw that the books do not hold: latency
    histograms per provider, refusals per key and code, streams relayed."""

    def __init__(self):
        self._lock = threading.Lock()
        self._latencies = {}    # (latency, provider) -> [count per bucket..., sum, count]
        self._refusals = {}     # (key id, error code) -> count
        self.streams = 0

    def observe(self, provider, latencies):
        """Record one settled call's latencies: LATENCY_BUCKETS name ->
        milliseconds, or None for a step not reached."""
        with self._lock:
            for name, milliseconds in latencies.items():
                if milliseconds is None:
                    continue
                seconds = milliseconds / 1000
                bounds = LATENCY_BUCKETS[name]
                counts = self._latencies.setdefault((name, provider), [0] * (len(bounds) + 2))
                for index, bound in enumerate(bounds):
                    if seconds <= bound:
                        counts[index] += 1
                counts[-2] += seconds
                counts[-1] += 1

    def refused(self, key_id, code):
        with self._lock:
            self._refusals[(key_id, code)] = self._refusals.get((key_id, code), 0) + 1

    def stream(self, change):
        with self._lock:
            self.streams += change

    def snapshot(self):
        with self._lock:
            return ({key: list(counts) for key, counts in self._latencies.items()}, dict(self._refusals),
                    self.streams)


def _label_value(value):
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(pairs):
    """``name="value",...`` for a sample's braces, values escaped."""
    return ",".join('%s="%s"' % (name, _label_value(value)) for name, value in pairs)


def _sample(name, labels, value):
    text = _labels(labels)
    return "%s%s %s" % (name, "{%s}" % text if text else "", repr(float(value)) if isinstance(value, float) else value)


def metrics_books(store, prices, now):
    """The samples /metrics reads from the database: the books' counters
    (from usage_totals) and budget gauges, {metric name: [sample lines]}."""
    known_models = {model for model, _ in prices.items()}
    samples = {name: [] for name in ("llmgw_requests_total", "llmgw_request_errors_total", "llmgw_tokens_total",
                                     "llmgw_cost_usd_total", "llmgw_budget_spent_usd", "llmgw_budget_limit_usd")}
    totals = {}
    for key_id, project, model, provider, calls, *counts in store.usage_totals():
        labels = (key_id, project or "", provider, model if model in known_models else "other")
        entry = totals.get(labels)
        if entry is None:
            totals[labels] = [calls] + counts
        else:  # models the price table does not know, counted as one
            for status, count in calls.items():
                entry[0][status] = entry[0].get(status, 0) + count
            entry[1:] = [total + count for total, count in zip(entry[1:], counts)]
    for labels, (calls, errors, *tokens, nanousd) in sorted(totals.items()):
        text = 'key_id="%s",project="%s",provider="%s",model="%s"' % tuple(map(_label_value, labels))
        samples["llmgw_requests_total"].extend('llmgw_requests_total{%s,status="%s"} %d' % (
            text, _label_value(status), count) for status, count in sorted(calls.items()))
        samples["llmgw_request_errors_total"].append("llmgw_request_errors_total{%s} %d" % (text, errors))
        samples["llmgw_tokens_total"].append(_TOKEN_SAMPLES % tuple(
            item for count in tokens for item in (text, count)))
        samples["llmgw_cost_usd_total"].append("llmgw_cost_usd_total{%s} %r" % (text, nanousd_to_usd(nanousd)))
    for key in store.budgeted_keys():
        spend = store.key_spend(key, now)
        labels = (("key_id", key.id), ("project", key.project_name))
        samples["llmgw_budget_spent_usd"].append(_sample("llmgw_budget_spent_usd", labels,
                                                         nanousd_to_usd(spend["spent_nanousd"])))
        samples["llmgw_budget_limit_usd"].append(_sample("llmgw_budget_limit_usd", labels,
                                                         nanousd_to_usd(spend["allowance_nanousd"])))
    return samples


def metrics_text(books, process, gauges):
    """The /metrics page: ``books`` (metrics_books' samples), this
    process's histograms, refusals and gauges."""
    samples = {name: [] for name in METRICS}
    samples.update(books)
    latencies, refusals, streams = process.snapshot()
    for (latency, provider), counts in sorted(latencies.items()):
        name = _LATENCY_METRICS[latency]
        labels = (("provider", provider),)
        for bound, count in zip(LATENCY_BUCKETS[latency] + ("+Inf",), counts[:-2] + [counts[-1]]):
            samples[name].append(_sample(name + "_bucket", labels + (("le", str(bound)),), count))
        samples[name].append(_sample(name + "_sum", labels, float(counts[-2])))
        samples[name].append(_sample(name + "_count", labels, counts[-1]))
    for (key_id, code), count in sorted(refusals.items()):
        samples["llmgw_rate_limit_refusals_total"].append(
            _sample("llmgw_rate_limit_refusals_total", (("key_id", key_id), ("reason", code)), count))
    samples["llmgw_streams_in_flight"].append(_sample("llmgw_streams_in_flight", (), streams))
    for name, value in gauges.items():
        samples[name].append(_sample(name, (), value))
    lines = []
    for name, (kind, help_text) in METRICS.items():
        if samples[name]:
            lines += ["# HELP %s %s" % (name, help_text), "# TYPE %s %s" % (name, kind)] + samples[name]
    return "\n".join(lines) + "\n"


# -- budget alerts --------------------------------------------------------------
#
# A settle that takes a key's spend past a threshold queues the alert in its
# own transaction (once per key, period and threshold, in any number of
# processes: budget_alerts is the outbox). A thread per process delivers due
# alerts to the webhook, so no request ever waits on it; a failed delivery
# is retried with backoff, and every attempt is in the audit log.

ALERT_SECRET_ENV = "LLMGW_ALERT_SECRET"


def alert_request(pool, payload, secret, now):
    """The webhook POST as bytes. With a secret, ``x-llmgw-signature``
    is ``sha256=`` HMAC-SHA256 of ``<x-llmgw-timestamp>.<body>``."""
    body = payload.encode("utf-8")
    timestamp = str(int(now))
    headers = ["POST %s HTTP/1.1" % (pool.base_path or "/"), "Host: %s" % pool.host_field,
               "User-Agent: llmgw/%s" % __version__, "Content-Type: application/json",
               "Content-Length: %d" % len(body), "Connection: close", "x-llmgw-event: budget.threshold",
               "x-llmgw-timestamp: %s" % timestamp]
    if secret:
        digest = hmac.new(secret.encode("utf-8"), timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()
        headers.append("x-llmgw-signature: sha256=%s" % digest)
    return ("\r\n".join(headers) + "\r\n\r\n").encode("latin-1") + body


class AlertSender:
    """Delivers due budget alerts to ``alerts.webhook_url`` from a thread."""

    def __init__(self, store, config, secret):
        self.store, self.config, self.secret = store, config, secret
        self.pool = UpstreamPool(config.webhook_url, config.timeout, config.timeout, config.allow_link_local)
        self._wake = threading.Event()
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="llmgw-alerts", daemon=True)
        self._thread.start()

    poll_interval = 1.0

    def wake(self):
        self._wake.set()

    def stop(self):
        self._stopped = True
        self._wake.set()
        self._thread.join(self.config.timeout + 1)

    def _run(self):
        while not self._stopped:
            self._wake.wait(self.poll_interval)
            self._wake.clear()
            try:
                for alert_id, payload, attempts in self.store.claim_alerts(time.time(), self.config.timeout * 2):
                    if self._stopped:
                        return
                    self._deliver(alert_id, payload, attempts + 1)
            except GatewayError as exc:
                logger.warning("budget alerts: %s", exc.message)

    def _deliver(self, alert_id, payload, attempt):
        target = json.loads(payload)["key_id"]
        try:
            conn, _ = wait_out(self.pool.acquire(fresh=True))
            try:
                status = wait_out(conn.exchange(alert_request(self.pool, payload, self.secret, time.time()), "POST",
                                                time.monotonic() + self.config.timeout)).status
            finally:
                conn.close()
            outcome = "HTTP %d" % status
            delivered = 200 <= status < 300
        except (OSError, http.client.HTTPException, UpstreamError) as exc:
            outcome, delivered = type(exc).__name__, False
        retry_at = None
        if not delivered and attempt < self.config.attempts:
            retry_at = time.time() + self.config.retry_backoff * 2 ** (attempt - 1)
        detail = "%s attempt %d: %s" % (json.loads(payload)["alert_id"], attempt, outcome)
        if not delivered:
            logger.warning("budget alert %s", detail)
        self.store.alert_tried(alert_id, target, delivered, detail, retry_at)


class ResidentMemory:
    """This process's resident memory (RSS), read from /proc/self/statm at
    most every ``interval`` seconds, so checking it on every call costs
    nothing worth counting. 0 where there is no /proc (BSD, macOS): there,
    ``server.max_memory_mb`` does not apply."""

    interval = 0.1
    _page_bytes = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096

    def __init__(self):
        self._read_at = -math.inf
        self._bytes = 0

    def bytes(self):
        now = time.monotonic()
        if now - self._read_at >= self.interval:
            self._read_at = now
            try:
                with open("/proc/self/statm", "rb") as statm:
                    self._bytes = int(statm.read().split()[1]) * self._page_bytes
            except (OSError, ValueError, IndexError):
                self._bytes = 0
        return self._bytes

    def megabytes(self):
        return self.bytes() / (1024 * 1024)


def _milliseconds(start, end):
    """Between two monotonic times, or None if either did not happen."""
    return None if start is None or end is None else round((end - start) * 1000, 3)


class Admission:
    """A proxied request let in before its body arrived (``Gateway.admit``):
    its key's request in flight, held while the body arrives. The call made
    of it takes the request over (``hand_over``); otherwise ``release``
    gives it back (refused, timed out, closed). Both are safe to repeat."""

    def __init__(self, limits, key_id, body_bytes):
        self._limits = limits
        self.key_id, self.body_bytes = key_id, body_bytes
        self._held = True
        self._lock = threading.Lock()

    def _give_up(self):
        with self._lock:
            held, self._held = self._held, False
        return held

    def hand_over(self, key_id):
        """True if this admission's request in flight is now the caller's."""
        return key_id == self.key_id and self._give_up()

    def release(self):
        if self._give_up():
            self._limits.release(self.key_id, 0)


class LogicalRequest:
    """What one client asked for, across the attempts made for it: one id
    (``x-llmgw-request-id``, every attempt's ``logical_request_id``), one
    place among the gateway's calls in flight and one slot of the key's
    rate limits, one deadline."""
    __slots__ = ("gateway", "request", "key", "route", "dialect", "raw", "body", "streamed", "endpoint",
                 "upstream_path", "id", "started", "deadline", "last_attempt_at", "affinity_key", "attempts", "tokens",
                 "_slot_held")

    def __init__(self, gateway, request, key, route, dialect, raw, body, streamed, endpoint, upstream_path):
        self.gateway, self.request, self.key = gateway, request, key
        self.route, self.dialect, self.raw, self.body, self.streamed = route, dialect, raw, body, streamed
        self.endpoint = endpoint              # the route's path (template), as usage rows record it
        self.upstream_path = upstream_path    # the path sent to the provider
        self.id = gateway.next_request_id()
        self.started = time.monotonic()
        self.deadline = self.started + gateway.config.server.request_deadline
        self.last_attempt_at = min(self.started + gateway.config.routing.deadline, self.deadline)
        self.affinity_key = None
        self.attempts = 0
        self.tokens = 0
        self._slot_held = False

    def hold_slot(self):
        """Take a place among the gateway's calls in flight, then count the
        request against the key's rate limits unless its admission did;
        either may refuse it (a refusal by the key's limits is counted in
        /metrics). ``release`` gives both back."""
        key, admission, gateway = self.key, self.request.admission, self.gateway
        gateway.enter_flight(self.request)
        try:
            if admission is None or not admission.hand_over(key.id):
                gateway.take_rate_slot(key, self.route)
        except BaseException:
            gateway.leave_flight()
            raise
        self._slot_held = True

    def release(self):
        """Give back the place and the slot, with the tokens every attempt used; once."""
        if self._slot_held:
            self._slot_held = False
            try:
                self.gateway.limits.release(self.key.id, self.tokens)
            finally:
                self.gateway.leave_flight()


class Attempt:
    """One upstream attempt of a logical request and its usage row.

    ``begin`` writes the pending row (reserving its worst-case cost against
    the key's budget); ``settle`` records what the provider reported, and
    ``fail`` an attempt that produced nothing the client saw. Settling
    twice is a no-op, so every path may settle on its way out.
    """
    __slots__ = ("logical", "gateway", "deployment", "provider", "upstream_model", "model", "kind", "number",
                 "request_id", "reservation", "row_id", "period_start", "response_id", "started", "sent", "first_byte",
                 "settled", "answer", "answer_bytes")

    def __init__(self, logical, deployment, upstream_model, model, kind):
        self.logical, self.gateway = logical, logical.gateway
        self.deployment, self.provider = deployment, deployment.provider
        self.upstream_model, self.model, self.kind = upstream_model, model, kind
        self.number = logical.attempts + 1
        self.request_id = logical.id if self.number == 1 else "%s.%d" % (logical.id, self.number)
        self.reservation = self.row_id = self.period_start = None
        self.response_id = None             # the Responses API's id of what this attempt made
        self.started = time.monotonic()
        self.sent = self.first_byte = None  # monotonic times: request forwarded, answer's head read
        self.settled = True  # until begun
        #: For a key that logs bodies, the first BODY_LOG_BYTES of the answer
        #: as the provider sent it, and its whole size; None for any other key.
        self.answer = bytearray() if logical.key.log_bodies else None
        self.answer_bytes = 0

    def begin(self, reservation):
        """Write the pending row; raises BudgetExceededError (then the
        attempt never happened) or StorageError."""
        logical, gateway = self.logical, self.gateway
        self.reservation = reservation
        self.row_id, self.period_start = gateway.store.begin_usage(
            self.request_id, gateway.owner, logical.key.id, self.provider.name, logical.endpoint, self.model,
            logical.streamed, gateway.clock(), reservation, gateway.budget_admission(logical.key) == "estimate",
            logical.id, self.number, self.kind, self.deployment.name)
        logical.attempts = self.number
        self.settled = False
        gateway.router.started(self.deployment)

    def keep_answer(self, data):
        """Keep what a key that logs bodies was answered (bounded)."""
        if self.answer is not None:
            self.answer += data[:BODY_LOG_BYTES - len(self.answer)]
            self.answer_bytes += len(data)

    def kept_events(self, events):
        """``events`` (a stream's), each kept as it passes (keep_answer)."""
        for event in events:
            if not isinstance(event, ProviderWait):
                self.keep_answer(event)
            yield event

    def _bodies(self):
        """INSERT_BODIES values for a key that logs bodies, else None."""
        if self.answer is None:
            return None
        request = self.logical.raw or b""  # a GET has none
        answered = self.answer_bytes or None
        return request[:BODY_LOG_BYTES], len(request), answered and bytes(self.answer), answered

    def headers(self):
        """What the reply says about routing: request id, attempts, who served."""
        return [("x-llmgw-request-id", self.logical.id), ("x-llmgw-attempts", str(self.number)),
                ("x-llmgw-served-by", "%s/%s" % (self.provider.name, self.upstream_model))]

    def settle(self, outcome, http_status, usage):
        """Price and record the outcome; committed when this returns. Never
        raises, and the deployment's call in flight ends whatever happens
        (the key's rate-limit slot and the gateway's place among calls in
        flight are the logical request's). A database
        failure is logged: the client's answer is already paid for, and the
        pending row marks the attempt."""
        if self.settled:
            return
        self.settled = True
        gateway, logical = self.gateway, self.logical
        try:
            counted = usage.request_tokens or usage.response_tokens
            cost, priced = price_usage(gateway.price_for(self.model) if counted else None, usage)
            result = {
                "status": outcome, "http_status": http_status, "usage_source": usage.source,
                "request_tokens": usage.request_tokens, "response_tokens": usage.response_tokens,
                "input_tokens": usage.input_tokens, "cache_read_tokens": usage.cache_read_tokens,
                "cache_write_tokens": usage.cache_write_tokens,
                "cache_write_1h_tokens": usage.cache_write_1h_tokens, "output_tokens": usage.output_tokens,
                "reasoning_tokens": usage.reasoning_tokens,
                "cost_nanousd": cost, "priced": priced, "finished_at": gateway.clock(), "response_id": self.response_id,
                "latency_ms": _milliseconds(self.started, time.monotonic()),
                "first_byte_ms": _milliseconds(self.sent, self.first_byte),
                "overhead_ms": _milliseconds(logical.request.received, self.sent),
            }
            logical.tokens += usage.request_tokens + usage.response_tokens
            logical.request.log.update(tokens="%d/%d" % (usage.request_tokens, usage.response_tokens),
                                       outcome=outcome, attempts=self.number)
            gateway.metrics.observe(self.provider.name, {
                "total": result["latency_ms"], "first_byte": result["first_byte_ms"],
                "overhead": result["overhead_ms"]})
            alerts = gateway.alerts
            thresholds = () if alerts is None else logical.key.alert_thresholds or alerts.config.thresholds
            if gateway.store.finish_usage(self.row_id, result, logical.key.id, self.reservation, self.period_start,
                                          thresholds, self._bodies()):
                alerts.wake()
        except Exception as exc:
            logger.error("usage row %s could not be settled (%s); it stays pending", self.request_id,
                         type(exc).__name__)
        finally:
            gateway.router.finished(self.deployment)

    def fail(self, outcome, http_status=None, reported=None):
        """Settle an attempt the client saw nothing of: it costs what the
        provider reported using (``reported``), never an estimate."""
        self.settle(outcome, http_status, reported or Usage())

    def estimate(self, usage, text_bytes):
        """Fill what the provider did not report with the documented estimate:
        prompt characters / 4 in, generated characters / 4 out."""
        estimated = dataclasses.replace(usage) if usage is not None else Usage()
        estimated.source = "estimated"
        if usage is None:
            estimated.input_tokens = estimate_tokens(text_characters(self.logical.body))
        estimated.output_tokens = max(estimated.output_tokens, estimate_tokens(text_bytes))
        return estimated


class Failure:
    """An attempt that failed before the client saw anything: what may
    make it worth another (``trigger``: a status, ``connect``, ``timeout``
    or None for never), how long the provider asked to wait, and what the
    client gets if no other attempt answers (a Reply, or an error)."""
    __slots__ = ("trigger", "retry_after", "reply", "error")

    def __init__(self, trigger, retry_after=None, reply=None, error=None):
        self.trigger, self.retry_after, self.reply, self.error = trigger, retry_after, reply, error

    def answer(self, attempt):
        if self.reply is not None:
            return self.reply
        self.error.headers = list(self.error.headers) + attempt.headers()[:2]
        raise self.error


def transport_trigger(exc):
    """The retry trigger of an upstream error: a connection that failed or
    broke (``connect``), one that went quiet (``timeout``), or None for an
    answer that another attempt would not change."""
    if isinstance(exc, UpstreamTimeoutError):
        return "timeout"
    if isinstance(exc, UpstreamCutError) or exc.code == "upstream_unavailable":
        return "connect"
    return None


#: Stream events held back before the commit point: a preamble longer
#: than this is committed to (relayed) even without model output.
MAX_PREAMBLE_BYTES = 64 * 1024


# -- the dashboard (/ui) --------------------------------------------------------
#
# A session is a cookie signed with a key derived from the admin token's
# hash: every gateway process sharing the database accepts it, a new admin
# token ends every session, and so does logging out (which records the
# moment in the settings: sessions issued before it are refused). The
# session's CSRF token is derived from it too, and every form that writes
# carries it. The login form has its own CSRF cookie.

UI_SESSION_COOKIE = "llmgw_ui"
UI_LOGIN_COOKIE = "llmgw_ui_login"
#: A session lasts this long (seconds) from the login.
UI_SESSION_SECONDS = 12 * 3600
#: Sessions issued before this moment (epoch milliseconds) are refused.
UI_SESSIONS_SINCE_SETTING = "ui_sessions_since"
#: On every dashboard answer: no script, style or frame but the gateway's own
#: files, no page cached, no referrer sent.
UI_HEADERS = (
    ("content-security-policy", "default-src 'none'; script-src 'self'; style-src 'self'; form-action 'self'; "
                                "frame-ancestors 'none'; base-uri 'none'"),
    ("x-content-type-options", "nosniff"), ("x-frame-options", "DENY"), ("referrer-policy", "no-referrer"),
    ("cache-control", "no-store"),
)
_UI_FILES = {"/ui/app.css": ("text/css; charset=utf-8", UI_CSS),
             "/ui/app.js": ("text/javascript; charset=utf-8", UI_JS)}
_UI_KEY_ACTION = re.compile(r"^/ui/keys/([^/]{1,100})/(revoke|rotate|topup)\Z")


def _cookie(request, name):
    for part in request.headers.get("cookie", "").split(";"):
        cookie_name, _, value = part.strip().partition("=")
        if cookie_name == name:
            return value
    return None


class Dashboard:
    """Answers /ui: pages and forms over the administration functions
    (section 9), as the signed-in admin ("dashboard" in the audit log)."""

    actor = "dashboard"

    def __init__(self, gateway):
        self.gateway = gateway

    def handle(self, request):
        try:
            return self._route(request)
        except GatewayError as exc:
            return self._html(exc.status, ui_page("Error", None, '<p><a href="/ui/overview">Back</a></p>',
                                                  error=exc.message))

    def _route(self, request):
        path = request.path
        if path in _UI_FILES:
            content_type, text = _UI_FILES[path]
            return Reply(200, [("content-type", content_type)] + list(UI_HEADERS), text.encode("utf-8"))
        signing_key = self._signing_key()
        if path == "/ui/login":
            return self._login(request, signing_key)
        nonce = self._session(request, signing_key)
        if request.method == "GET":
            if nonce is None:
                return self._redirect("/ui/login")
            if path in ("/ui", "/ui/"):
                return self._redirect("/ui/overview")
            page = {"/ui/overview": self._overview, "/ui/keys": self._keys, "/ui/logs": self._logs,
                    "/ui/prices": self._prices}.get(path)
            if page is None:
                raise NotFoundError("No dashboard page %s" % shown(path))
            options = {name: value for name, value in urllib.parse.parse_qsl(request.query) if value}
            return page(_csrf_token(signing_key, nonce), options)
        if request.method != "POST":
            raise MethodNotAllowedError("The dashboard takes GET and POST")
        if nonce is None:
            raise AuthenticationError("Log in to the dashboard first")
        form = self._form(request)
        csrf = _csrf_token(signing_key, nonce)
        if not _same(form.get("csrf", ""), csrf):
            raise PermissionDeniedError("The form's CSRF token is missing or stale: reload the page")
        if path == "/ui/logout":
            self.gateway.store.set_setting(UI_SESSIONS_SINCE_SETTING, "%d" % _milliseconds_now(self.gateway),
                                           self.actor)
            return self._redirect("/ui/login", [("set-cookie", _session_cookie("", 0))])
        if path == "/ui/keys":
            return self._create_key(csrf, form)
        action = _UI_KEY_ACTION.match(path)
        if action is None:
            raise NotFoundError("No dashboard action %s" % shown(path))
        return self._key_action(csrf, urllib.parse.unquote(action.group(1)), action.group(2), form)

    # -- sessions ---------------------------------------------------------------

    def _signing_key(self):
        admin_hash = self.gateway.admin_token_hash()
        if admin_hash is None:
            raise PermissionDeniedError("The dashboard is off. Turn it on with LLMGW_ADMIN_TOKEN in the "
                                        "environment, or run: python cli.py admin-token")
        return hmac.new(admin_hash.encode(), b"llmgw dashboard session", hashlib.sha256).digest()

    def _session(self, request, signing_key):
        """The session's nonce if its cookie (issued.nonce.signature, issued
        in epoch milliseconds) is signed, unexpired and issued after the last
        logout; else None."""
        issued, _, rest = (_cookie(request, UI_SESSION_COOKIE) or "").partition(".")
        nonce, _, signature = rest.partition(".")
        if not _same(signature, _sign(signing_key, "%s.%s" % (issued, nonce))):
            return None
        since = int(self.gateway.store.get_setting(UI_SESSIONS_SINCE_SETTING) or 0)
        if not since <= int(issued) <= _milliseconds_now(self.gateway) < int(issued) + UI_SESSION_SECONDS * 1000:
            return None
        return nonce

    def _login(self, request, signing_key):
        if request.method == "GET":
            login_csrf = secrets.token_urlsafe(24)
            return self._html(200, ui_login_html(login_csrf), [("set-cookie", _login_cookie(login_csrf))])
        if request.method != "POST":
            raise MethodNotAllowedError("/ui/login takes GET and POST")
        form = self._form(request)
        expected = _cookie(request, UI_LOGIN_COOKIE) or ""
        if not expected or not _same(form.get("login_csrf", ""), expected):
            raise PermissionDeniedError("The login form is stale: reload it")
        if not _same(hash_secret(form.get("token", "")), self.gateway.admin_token_hash()):
            login_csrf = secrets.token_urlsafe(24)
            return self._html(401, ui_login_html(login_csrf, "That is not the admin token."),
                              [("set-cookie", _login_cookie(login_csrf))])
        self.gateway.store.audit(self.actor, "dashboard_login")
        issued, nonce = "%d" % _milliseconds_now(self.gateway), secrets.token_urlsafe(18)
        session = "%s.%s.%s" % (issued, nonce, _sign(signing_key, "%s.%s" % (issued, nonce)))
        return self._redirect("/ui/overview", [("set-cookie", _session_cookie(session, UI_SESSION_SECONDS)),
                                               ("set-cookie", _login_cookie("", 0))])

    # -- pages ----------------------------------------------------------------

    def _overview(self, csrf, options):
        chosen = points = totals = error = None
        try:
            by = options.get("by") or "project"
            if by not in UI_CHART_GROUPS:
                raise BadRequestError("by: %s is not one of %s" % (shown(by), ", ".join(UI_CHART_GROUPS)))
            chosen = ui_range(options, self.gateway.clock())
            _, since, until, step = chosen
            group_by = UI_CHART_GROUPS[by][0]
            points = usage_series(self.gateway.store, group_by, since, until, step, UI_CHART_FIELDS)
            totals = self.gateway.store.usage_stats(group_by, since, until, fields=UI_TOTAL_FIELDS)
        except BadRequestError as exc:
            error, options = exc.message, {}
            chosen = ui_range(options, self.gateway.clock())
        return self._html(400 if error else 200, ui_overview_html(csrf, options, chosen, points, totals, error))

    def _keys(self, csrf, options, new_key=None, status=200, error=None):
        message = None
        if options.get("done") in ("revoked", "topped up"):
            message = "Key %s %s." % (options.get("id", ""), options["done"])
        keys = keys_with_budgets(self.gateway.store, self.gateway.clock())
        return self._html(status, ui_keys_html(csrf, keys, self.gateway.config, new_key, message, error))

    def _logs(self, csrf, options):
        show = options.pop("show", None)
        try:
            page = request_log(self.gateway.store, options)
        except BadRequestError as exc:
            return self._html(400, ui_logs_html(csrf, options, None, error=exc.message))
        return self._html(200, ui_logs_html(csrf, options, page, show))

    def _prices(self, csrf, options):
        return self._html(200, ui_prices_html(csrf, price_rows(self.gateway.prices)))

    # -- actions --------------------------------------------------------------

    def _create_key(self, csrf, form):
        texts = {name: form[name].strip() for name in POLICY_FIELDS if form.get(name, "").strip()}
        labels = [label.strip() for label in form.get("labels", "").split(",") if label.strip()]
        try:
            record, secret = create_virtual_key(self.gateway.store, self.gateway.config, form.get("project_name"),
                                                policy_from_text(texts, labels), self.actor, self.gateway.clock())
        except BadRequestError as exc:
            return self._keys(csrf, {}, status=exc.status, error=exc.message)
        logger.info("dashboard created virtual key %s", record["id"])
        return self._keys(csrf, {}, new_key=dict(record, key=secret), status=201)

    def _key_action(self, csrf, key_id, action, form):
        store, now = self.gateway.store, self.gateway.clock()
        try:
            if action == "revoke":
                revoke_key(store, key_id, self.actor)
                logger.info("dashboard revoked virtual key %s", key_id)
                return self._redirect("/ui/keys?" + urllib.parse.urlencode({"done": "revoked", "id": key_id}))
            if action == "topup":
                topup_key(store, key_id, number_in_text(form.get("amount", "").strip()), self.actor, now)
                return self._redirect("/ui/keys?" + urllib.parse.urlencode({"done": "topped up", "id": key_id}))
            record = rotate_key(store, key_id, form.get("grace", "").strip() or "0s", self.actor, now)
        except (BadRequestError, NotFoundError) as exc:
            return self._keys(csrf, {}, status=exc.status, error=exc.message)
        return self._keys(csrf, {}, new_key=record)

    # -- HTTP -------------------------------------------------------------------

    @staticmethod
    def _form(request):
        """A POSTed form (application/x-www-form-urlencoded) as {name: value}."""
        if request.content_length is None:
            raise LengthRequiredError("A form with a Content-Length header is required")
        if request.content_length > ADMIN_BODY_BYTES:
            raise PayloadTooLargeError("The form is larger than %d bytes" % ADMIN_BODY_BYTES)
        content_type = request.headers.get("content-type", "").partition(";")[0].strip().lower()
        if content_type != "application/x-www-form-urlencoded":
            raise UnsupportedMediaTypeError("Content-Type must be application/x-www-form-urlencoded")
        try:
            return dict(urllib.parse.parse_qsl(request.read_body().decode("utf-8"), keep_blank_values=True,
                                               max_num_fields=64))
        except (UnicodeDecodeError, ValueError):
            raise BadRequestError("The form is not URL-encoded UTF-8 of at most 64 fields") from None

    @staticmethod
    def _html(status, text, headers=()):
        return Reply(status, [("content-type", "text/html; charset=utf-8")] + list(UI_HEADERS) + list(headers),
                     text.encode("utf-8"))

    @staticmethod
    def _redirect(location, headers=()):
        return Reply(303, [("location", location)] + list(UI_HEADERS) + list(headers))


def _same(given, expected):
    """Constant-time equality of two texts (a client's may be any text)."""
    return hmac.compare_digest(given.encode("utf-8", "surrogatepass"), expected.encode("utf-8"))


def _milliseconds_now(gateway):
    return int(gateway.clock() * 1000)


def _sign(key, text):
    return hmac.new(key, text.encode(), hashlib.sha256).hexdigest()


def _csrf_token(signing_key, nonce):
    return _sign(signing_key, "csrf." + nonce)


def _session_cookie(value, max_age):
    return "%s=%s; Path=/ui; Max-Age=%d; HttpOnly; SameSite=Strict" % (UI_SESSION_COOKIE, value, max_age)


def _login_cookie(value, max_age=600):
    return "%s=%s; Path=/ui/login; Max-Age=%d; HttpOnly; SameSite=Strict" % (UI_LOGIN_COOKIE, value, max_age)


#: What admission ``estimate`` lets a budget's spend pass it by (key info).
ESTIMATE_OVERSHOOT = ("A call reserves its body's bytes/4 input tokens and at most %d output tokens, and is "
                      "admitted while any budget is left: spend may pass the budget by less than the real cost of "
                      "the last call admitted, plus, for each other call then in flight, its real cost beyond its "
                      "reservation; then calls are refused until the period resets or a top-up.")


class Gateway:
    """Authenticates, routes, limits, forwards and accounts for requests."""

    #: How often the background thread looks for usage rows abandoned by
    #: crashed processes (their budget reservations would block keys).
    janitor_interval = 60.0
    heartbeat_interval = 5.0
    #: Rows past ``logging.retention_days`` pruned per janitor run: a backlog
    #: goes over several minutes, never holding the writer for long.
    prune_per_run = 100000

    def __init__(self, config, store, environ=None, clock=time.time):
        self.config = config
        self.store = store
        self.clock = clock            # wall time; injectable for budget periods and limits
        self._environ = os.environ if environ is None else environ
        self.providers = {name: make_provider(p, config.server, self._environ) for name, p in config.providers.items()}
        self._request_prefix = secrets.token_hex(4)
        self._request_numbers = itertools.count(1)
        #: This process, in usage rows, rate-limit counters and the process registry.
        self.owner = "%s-%d-%s" % (socket.gethostname(), os.getpid(), self._request_prefix)
        self.limits = KeyLimits(store, self.owner, clock)
        self.router = Router(store, config.routing, clock)
        self.prices = None            # PriceTable, rebuilt when prices are imported
        self._lock = threading.Lock()
        self._refresh_lock = threading.Lock()
        self._data_version = None
        self._generation = None
        self._keys = {}               # secret hash -> key record, for active keys
        self._admin_token_hash = None
        self._metrics_token_hash = None
        self._secrets = []
        self.metrics = ProcessMetrics()
        self._metrics_lock = threading.Lock()
        self._metrics_books = (-math.inf, None)  # (read at, metrics_books' samples)
        #: The HTTP server's gauges (connections, workers); set by the server.
        self.server_gauges = dict
        self._unpriced_models = set()
        self.in_flight = 0            # calls between their pending and settled rows
        self.capacity_refusals = 0    # requests answered 503 because the gateway was full
        self.resident_memory = ResidentMemory()
        self.refresh()
        # Liveness is about real time, not the injectable clock of budgets.
        store.register_process(self.owner, time.time())
        recovered = store.recover_interrupted(self.owner, time.time())
        if recovered:
            logger.warning("%d usage row(s) left pending by a stopped gateway were marked interrupted", recovered)
        self._stopped = threading.Event()
        self._background = threading.Thread(target=self._maintain, name="llmgw-limits", daemon=True)
        self._background.start()
        self.alerts = self._alert_sender(config)
        self.dashboard = Dashboard(self)

    def _alert_sender(self, config):
        if config.alerts.webhook_url is None:
            return None
        return AlertSender(self.store, config.alerts, self._environ.get(ALERT_SECRET_ENV))

    def close(self):
        self._stopped.set()
        self._background.join(2)
        if self.alerts is not None:
            self.alerts.stop()
        for provider in self.providers.values():
            provider.pool.close()
        try:
            self.store.retire_process(self.owner)
        except GatewayError:
            pass

    def _maintain(self):
        """Share rate-limit counters with other processes; now and then,
        settle usage rows that crashed processes left pending."""
        next_janitor = time.monotonic() + self.janitor_interval
        next_heartbeat = time.monotonic() + self.heartbeat_interval
        while not self._stopped.wait(KeyLimits.sync_interval):
            try:
                self.limits.sync()
                self.router.sync()
                if time.monotonic() >= next_heartbeat:
                    next_heartbeat = time.monotonic() + self.heartbeat_interval
                    self.store.heartbeat(self.owner, time.time())
                if time.monotonic() >= next_janitor:
                    next_janitor = time.monotonic() + self.janitor_interval
                    self.store.recover_interrupted(self.owner, time.time())
                    retention = self.config.logging.retention_days
                    if retention is not None:
                        self.store.prune_usage(time.time() - retention * 86400, at_most=self.prune_per_run)
                    self.store.prune_bodies(time.time() - self.config.logging.body_retention_days * 86400,
                                            at_most=self.prune_per_run)
            except GatewayError as exc:
                logger.warning("background sync failed: %s", exc.message)

    def reload(self, config):
        """Apply a re-read config.yaml: providers, keys in it, prices, rate
        limits and timeouts. Providers whose settings did not change keep
        their pooled connections; requests in flight finish as they began."""
        providers = {}
        for name, provider_config in config.providers.items():
            current = self.providers.get(name)
            if current is not None and current.config == provider_config and config.server == self.config.server:
                providers[name] = current
            else:
                providers[name] = make_provider(provider_config, config.server, self._environ)
        for field in ("host", "port", "threads", "max_connections"):
            if getattr(config.server, field) != getattr(self.config.server, field):
                logger.warning("server.%s changed; it takes effect at the next start", field)
        retired = [p for name, p in self.providers.items() if providers.get(name) is not p]
        alerts, retired_alerts = self.alerts, None
        if config.alerts != self.config.alerts:
            alerts, retired_alerts = self._alert_sender(config), self.alerts
        with self._lock:
            self.config, self.providers, self.alerts = config, providers, alerts
            self.router.routing = config.routing
            self._data_version = self._generation = None  # re-read keys and prices
        self.refresh()
        if retired_alerts is not None:
            retired_alerts.stop()
        for provider in retired:
            provider.pool.close()

    def next_request_id(self):
        return "%s-%d" % (self._request_prefix, next(self._request_numbers))

    # -- state shared with the CLI and other processes -----------------------

    def refresh(self):
        """Drop cached keys and settings if anyone changed them.

        ``Store.data_version`` costs microseconds and moves on any commit by
        another process, or by this one that changed cached state; only then
        is the generation counter read, and only a new generation (a key,
        provider key or admin token changed) clears the caches. So a revoke,
        from any process, holds from the next request.
        """
        version = self.store.data_version()
        if version == self._data_version:
            return
        with self._refresh_lock:  # others wait here rather than use caches being replaced
            if version != self._data_version:
                self._reload_state()
                self._data_version = version

    def _reload_state(self):
        """Re-read keys, provider keys, the admin token and prices if their
        generation moved (usage rows alone do not move it)."""
        generation = self.store.generation()
        if generation == self._generation:
            return
        stored, named = self.store.provider_keys(), self.store.deployment_keys()
        keys = {provider: resolve_deployment_keys(provider.config, stored, named, self._environ)
                for provider in self.providers.values()}
        env_token = self._environ.get(ADMIN_TOKEN_ENV)
        admin_hash = hash_secret(env_token) if env_token else self.store.get_setting(ADMIN_TOKEN_SETTING)
        env_metrics_token = self._environ.get(METRICS_TOKEN_ENV)
        metrics_hash = (hash_secret(env_metrics_token) if env_metrics_token
                        else self.store.get_setting(METRICS_TOKEN_SETTING))
        prices = PriceTable.build(self.config.pricing, self.store.imported_prices())
        known = [secret for triples, _ in keys.values() for _, key, _ in triples
                 for secret in (key.secrets() if isinstance(key, tuple) else [key])]
        with self._lock:
            self._generation = generation
            self._keys = {}
            self._admin_token_hash = admin_hash
            self._metrics_token_hash = metrics_hash
            self._secrets = known + [token for token in (env_token, env_metrics_token) if token]
            self.prices = prices
        self.router.set_keys(keys)

    def authenticate(self, headers):
        """The VirtualKey for the request's credential, if active and not
        expired; otherwise AuthenticationError (the same for every reason)."""
        secret = client_credential(headers)
        digest = hash_secret(secret)
        key = self._keys.get(digest)
        if key is None:
            generation = self._generation
            key = self.store.find_key(digest)
            if key is None:
                raise AuthenticationError("Invalid, revoked or expired virtual key")
            with self._lock:
                if generation == self._generation:  # not stale: no refresh since the read
                    self._keys[digest] = key
        if not key.valid_at(self.clock()):
            raise AuthenticationError("Invalid, revoked or expired virtual key")
        return key

    def admin_token_hash(self):
        """The admin token's hash as it is now; None while admin is off."""
        self.refresh()
        return self._admin_token_hash

    def known_secrets(self):
        """The secrets this process holds in plain text (provider keys, an
        admin token from the environment), for redacting log lines; virtual
        keys and issued admin tokens are caught by their shape (``redact``)."""
        return self._secrets

    def price_for(self, model):
        """The price of ``model``; the first UNPRICED_MODELS_LOGGED models
        without one are logged once each (clients choose model names: the
        names remembered must not grow without bound)."""
        price = self.prices.lookup(model)
        if (price is None and model not in self._unpriced_models
                and len(self._unpriced_models) < UNPRICED_MODELS_LOGGED):
            self._unpriced_models.add(model)
            last = len(self._unpriced_models) == UNPRICED_MODELS_LOGGED
            logger.warning("model %s has no price; its usage is recorded at cost 0 (add it under "
                           "pricing: in config.yaml)%s", redact(model, self.known_secrets()),
                           "; further unpriced models are not logged until a restart" if last else "")
        return price

    # -- the request path --------------------------------------------------

    def handle(self, request):
        """Answer one request: a generator that yields a ProviderWait
        whenever the call waits for its provider, and returns the Reply.
        Never raises, except ClientDisconnected."""
        path = request.path
        if path == "/health":
            return json_reply(200, {"status": "ok", "version": __version__})
        if path == "/admin" or path.startswith("/admin/"):
            dialect = OPENAI
            handler = self._admin
        elif path == "/metrics":
            dialect = OPENAI
            handler = self._metrics
        elif path == "/ui" or path.startswith("/ui/"):
            dialect = OPENAI
            handler = self.dashboard.handle
        else:
            dialect = dialect_for(find_route(path)[1], request)
            handler = None  # the proxy, whose waits are passed on
        try:
            if handler is None:
                return (yield from self._proxy(request))
            return handler(request)
        except GatewayError as exc:
            return error_reply(exc, dialect)
        except ClientDisconnected:
            raise
        except Exception:
            logger.error("unexpected %s on %s %s", sys.exc_info()[0].__name__, request.method,
                         redact(path, self.known_secrets())[:200])
            logger.debug("traceback", exc_info=True)
            return error_reply(GatewayError("The gateway hit an internal error"), dialect)

    def _proxy(self, request):
        """The request path, step by step; each step raises a GatewayError
        to refuse. Nothing reaches a provider before its usage row exists.
        A generator: it yields while the provider is silent (section 5)."""
        endpoint, route, parameters = find_route(request.path)
        if route is None:
            raise unknown_path_error(request.path)
        refuse_websocket(request)
        if request.method not in route.methods:  # the template: a path with an id may hold anything pasted
            raise MethodNotAllowedError("%s does not accept %s" % (endpoint, request.method))
        dialect = dialect_for(route, request)
        self.refresh()
        key = self.authenticate(request.headers)
        request.log.update(key_id=key.id, project=key.project_name)
        if route is KEY_INFO_ROUTE:
            return json_reply(200, self.key_info(key))
        raw, body, model = read_request_body(route, request, self.config.server.max_body_bytes)
        upstream_path, plan = request.path, None
        if "response_id" in parameters:
            plan = [self.response_origin(key, parameters["response_id"])]
            provider, model = plan[0][0].provider, plan[0][2]
        else:
            model = parameters.get("model", model)
            if "model" in parameters and model in self.config.models:
                check_model_allowed(key, model, model)
                return json_reply(200, alias_model(model, dialect))
            targets = self._targets(dialect, request.path, model)
            provider = targets[0][0]
            check_model_allowed(key, model, model if model in self.config.models
                                else "%s/%s" % (provider.name, targets[0][1]))
            if "model" in parameters:
                upstream_path = "/v1/models/" + targets[0][1]
        request.log.update(provider=provider.name, model=model)
        check_passthrough_headers(request.headers)
        logical = LogicalRequest(self, request, key, route, dialect, raw, body, body.get("stream") is True,
                                 endpoint, upstream_path)
        plan = plan or self._plan(logical, targets)
        first_reservation = self._worst_case_cost(key, route, plan[0][2], raw, body)
        logical.hold_slot()
        try:
            reply = yield from self._forward(logical, plan, first_reservation)
        except BaseException as exc:
            logical.release()
            if route is MODELS_ROUTE and self.config.models and isinstance(exc, UpstreamError):
                return self._aliases_alone(dialect, targets[0][0], exc.status, exc.headers)
            raise
        if reply.stream is None:
            logical.release()  # a stream gives its slot back when it ends
        if route is MODELS_ROUTE and self.config.models:
            if reply.status != 200:
                return self._aliases_alone(dialect, targets[0][0], reply.status, reply.headers)
            reply.body = with_aliases(reply.body, dialect, self.config.models)
        return reply

    def _aliases_alone(self, dialect, provider, status, headers):
        """The model list when the provider's failed: the aliases, which the
        gateway knows without it (a client discovering models still finds
        them; their targets may be elsewhere)."""
        logger.warning("provider %s could not list its models (HTTP %d); the list holds the aliases alone",
                       provider.name, status)
        return Reply(200, [("content-type", "application/json")] + [
            header for header in headers if header[0].startswith("x-llmgw-")],
            with_aliases(None, dialect, self.config.models))

    def _targets(self, dialect, path, model):
        """(provider, upstream model, weight, recorded model) for each
        target of an alias, or the one a model name routes to. An alias's
        usage rows record the model that served."""
        aliases = self.config.models.get(model)
        if aliases is None:
            provider, upstream_model = self._route(dialect, path, model)
            return [(provider, upstream_model, 1, model)]
        targets = []
        for target in aliases:
            try:
                provider, upstream_model = self._route(dialect, path, target.model)
            except GatewayError:
                continue  # a target of another API (an OpenAI model on /v1/messages)
            targets.append((provider, upstream_model, target.weight, upstream_model))
        if not targets:
            raise NotFoundError("No target of model %s serves this API" % printable(model)[:100],
                                code="model_not_found")
        return targets

    def _plan(self, logical, targets):
        """The (deployment, upstream model, recorded model) triples to try.
        Refuses a request no deployment can serve (no usable key)."""
        request, routing = logical.request, self.config.routing
        plan = self.router.plan(targets)
        if len(plan) > 1 and routing.affinity != "none":  # affinity matters only where there is a choice
            session = next((request.headers[name] for name in SESSION_HEADERS if name in request.headers), None)
            metadata = logical.body.get("metadata")
            if session is None and logical.dialect == ANTHROPIC and isinstance(metadata, dict):
                session = metadata.get("user_id") if isinstance(metadata.get("user_id"), str) else None
            if session is not None or routing.affinity == "key":
                logical.affinity_key = (logical.key.id, logical.body.get("model"), session)
                plan = self.router.stick(plan, logical.affinity_key)
        if plan:
            return plan
        provider = targets[0][0]
        problem = self.router.problem(provider)
        if problem is not None:
            logger.error("%s", problem.message)
            raise ServiceUnavailableError("The gateway's key for provider %s is unusable" % provider.name,
                                          code="provider_key_invalid")
        raise ServiceUnavailableError(
            "No API key is configured for provider %s (python cli.py config set-key %s KEY)"
            % (provider.name, provider.name), code="provider_key_missing")

    def response_origin(self, key, response_id):
        """The (deployment, upstream model, model) that made response
        ``response_id`` for ``key`` (a retrieval, cancel or deletion goes
        there: no other deployment knows it); NotFoundError if this key made
        no such response through the gateway, or that deployment is gone."""
        origin = self.store.response_origin(response_id)
        if origin is None or origin[0] != key.id:  # the id is not repeated: a client may paste anything there
            raise NotFoundError("No response of that id was made with this key through the gateway",
                                code="response_not_found")
        _, provider_name, deployment_name, model = origin
        deployment = next((deployment for deployment in self.router.deployments()
                           if (deployment.provider.name, deployment.name) == (provider_name, deployment_name)), None)
        if deployment is None:
            raise NotFoundError("That response was made by %s/%s, which the gateway no longer has"
                                % (provider_name, deployment_name), code="response_not_found")
        return deployment, model, model

    def _forward(self, logical, plan, first_reservation):
        """Try the plan until an attempt answers the client: a failure on
        the ``retry_on`` list is tried again on the same deployment (up to
        ``routing.retries`` times, after a backoff), then on the next one;
        one on ``fallback_on`` moves on at once; any other failure is the
        answer. No attempt starts after ``routing.deadline``, and none
        starts once the client has seen output (see ``_open_stream``).
        A rate-limited or timed-out deployment is not tried again while
        another remains: the next key is not limited, and a second wait
        would use up the deadline."""
        routing = self.config.routing
        failure = attempt = None
        for index, (deployment, upstream_model, model) in enumerate(plan):
            last_deployment = index == len(plan) - 1
            for retry in range(routing.retries + 1):
                if attempt is not None and time.monotonic() > logical.last_attempt_at:
                    return failure.answer(attempt)
                kind = ATTEMPT_FIRST if attempt is None else ATTEMPT_RETRY if retry else ATTEMPT_FALLBACK
                previous, attempt = attempt, Attempt(logical, deployment, upstream_model, model, kind)
                try:
                    reservation = first_reservation if previous is None else self._worst_case_cost(
                        logical.key, logical.route, model, logical.raw, logical.body)
                    attempt.begin(reservation)
                except (BudgetExceededError, PermissionDeniedError) as exc:
                    if previous is None:
                        if isinstance(exc, BudgetExceededError):
                            self.metrics.refused(logical.key.id, exc.code)
                        raise
                    attempt = previous  # a fallback the budget cannot cover (or bound) is skipped
                    break
                head_timeout = (self._first_byte_timeout(logical, not last_deployment or retry < routing.retries)
                                if logical.streamed else None)
                result = yield from self._attempt(attempt, head_timeout)
                if isinstance(result, Reply):
                    return result
                failure = result
                if failure.trigger in routing.retry_on or failure.trigger in routing.fallback_on:
                    self.router.failed(deployment, failure.trigger, failure.retry_after)
                if failure.trigger not in routing.retry_on:
                    break
                if failure.trigger in (429, "timeout") and not last_deployment:
                    break
                wait = self._backoff(retry, failure.retry_after)
                if retry == routing.retries or wait is None or time.monotonic() + wait > logical.last_attempt_at:
                    break
                yield from self.wait_before_retry(wait)
            if failure.trigger not in routing.retry_on + routing.fallback_on:
                break
        return failure.answer(attempt)

    def _first_byte_timeout(self, logical, followed):
        """How long a streamed attempt waits for its answer to begin: if
        another attempt could follow it within ``routing.deadline``,
        ``routing.first_byte_timeout`` (a stalled provider is left in time
        for the next); else ``server.upstream_timeout`` (None). A
        non-streamed answer begins only when it is whole, so a long one
        is never taken for a stall."""
        routing = self.config.routing
        if (followed and "timeout" in routing.retry_on
                and time.monotonic() + routing.first_byte_timeout < logical.last_attempt_at):
            return min(routing.first_byte_timeout, self.config.server.upstream_timeout)
        return None

    def _backoff(self, retry, retry_after):
        """Seconds to wait before retry ``retry`` (from 0) on the same
        deployment: the provider's Retry-After, or exponential with jitter;
        None when that is longer than ``routing.backoff_max``."""
        routing = self.config.routing
        if retry_after is not None:
            return retry_after if retry_after <= routing.backoff_max else None
        return min(routing.backoff_initial * 2 ** retry, routing.backoff_max) * random.uniform(0.75, 1.0)

    def wait_before_retry(self, seconds):
        """The one place a request waits between attempts: no lock held, no
        write pending; a timer (a ProviderWait without a socket), so the
        call is parked meanwhile and holds no worker."""
        yield ProviderWait(None, time.monotonic() + seconds)

    def _attempt(self, attempt, head_timeout=None):
        """Send one attempt and read its answer up to the commit point
        (its head within ``head_timeout``, see ``Provider.send``).
        Returns the Reply to send, or a Failure. The attempt is settled on
        every way out."""
        logical = attempt.logical
        request, route = logical.request, logical.route
        provider = attempt.provider
        try:
            try:
                data, hide_usage_chunk = provider.prepare(
                    request.method, logical.upstream_path, attempt.upstream_model, logical.dialect, attempt.deployment.api_key,
                    request.headers, route, logical.raw, logical.body, logical.streamed)
                attempt.sent = time.monotonic()
                upstream = yield from provider.send(request.method, data, head_timeout)
                attempt.first_byte = time.monotonic()
            except GatewayError as exc:
                attempt.fail(OUTCOME_TIMEOUT if exc.status == 504 else OUTCOME_UPSTREAM_ERROR)
                if exc.code == "gateway_full":
                    self.count_refusal()
                return Failure(transport_trigger(exc), error=exc)
            response = upstream.response
            headers = response_headers(response) + attempt.headers()
            content_type = provider.stream_type(response)
            if route.stream_meter is not None and 200 <= response.status < 300 and content_type:
                return (yield from self._open_stream(attempt, upstream, route.stream_meter(hide_usage_chunk),
                                                     headers + [("content-type", content_type),
                                                                ("cache-control", "no-cache")]))
            return (yield from self._complete(attempt, upstream, headers))
        except BaseException:
            attempt.fail(OUTCOME_UPSTREAM_ERROR)  # whatever went wrong, the row does not stay pending
            raise

    def admit(self, request):
        """Check a proxied call before its body arrives (a large body, or
        one the client awaits leave to send): its key, the key's rate
        limits and what is left of its budget, and count it in flight, so
        that no body is waited for on behalf of a key that may not send it.
        Returns an Admission; None for other requests (nothing to check
        ahead). Raises GatewayError to refuse."""
        route = find_route(request.path)[1]
        if route is None or request.method != "POST" or request.method not in route.methods:
            return None
        self.refresh()
        key = self.authenticate(request.headers)
        if key.max_budget_nanousd is not None:
            spend = self.store.key_spend(key, self.clock())
            if spend["spent_nanousd"] + spend["reserved_nanousd"] >= spend["allowance_nanousd"]:
                self.metrics.refused(key.id, BudgetExceededError.code)
                raise BudgetExceededError("Budget exceeded: USD %.6f of USD %.6f spent or reserved" % (
                    nanousd_to_usd(spend["spent_nanousd"] + spend["reserved_nanousd"]),
                    nanousd_to_usd(spend["allowance_nanousd"])))
        self.take_rate_slot(key, route)
        return Admission(self.limits, key.id, request.content_length or 0)

    def take_rate_slot(self, key, route):
        """Count a call against the key's parallel calls and, unless it
        costs nothing (NON_BILLABLE_ENDPOINTS), its requests and tokens per
        minute; a refusal is counted in /metrics."""
        try:
            self.limits.acquire(key.id, self.requests_per_minute(key), key.tpm, key.max_parallel,
                                per_minute=route.usage_parser is not None)
        except RateLimitError as exc:
            self.metrics.refused(key.id, exc.code)
            raise

    def enter_flight(self, request):
        """Count a call in flight, or refuse it at once when
        ``server.max_in_flight`` are, or when the process's resident memory
        has reached ``server.max_memory_mb``: an honest 503, never a queue."""
        limits = self.config.server
        if limits.max_memory_mb and self.resident_memory.megabytes() >= limits.max_memory_mb:
            problem = "uses %d MB of memory, its limit" % limits.max_memory_mb
        else:
            with self._lock:
                admitted = self.in_flight < limits.max_in_flight
                if admitted:
                    self.in_flight += 1
            if admitted:
                return
            problem = "has %d calls in flight, its limit" % limits.max_in_flight
        self.count_refusal()
        request.log.update(outcome="gateway_full")
        raise ServiceUnavailableError("The gateway %s; retry shortly" % problem, code="gateway_full",
                                      headers=[("retry-after", "1")])

    def leave_flight(self):
        with self._lock:
            self.in_flight -= 1

    def count_refusal(self):
        """A request refused because the gateway is full (also by the server)."""
        with self._lock:
            self.capacity_refusals += 1

    def requests_per_minute(self, key):
        return key.rpm or self.config.rate_limits.get(key.tier, self.config.rate_limits["default"])

    def budget_admission(self, key):
        """How a budgeted call of ``key`` is admitted (BUDGET_ADMISSIONS):
        the key's own policy, else ``budgets.admission``."""
        return key.budget_admission or self.config.budgets.admission

    def _worst_case_cost(self, key, route, model, raw, body):
        """For a key with a budget: what this call reserves (nano-dollars)
        before it is forwarded. Admission ``strict``: an upper bound, input
        bounded by the body's size (no token is shorter than a byte) at the
        costliest input price, output by the request's own limit or, without
        one, ``budgets.max_output_tokens``. Admission ``estimate``: input at
        4 bytes a token at the input price, output at most
        ``budgets.typical_output_tokens``. Both times the choices asked for
        (``n``, ``best_of``), with the long-context tier the input reaches."""
        if key.max_budget_nanousd is None:
            return None
        if route.usage_parser is None:
            return 0  # nothing billable, but an exhausted budget still stops it
        price = self.prices.lookup(model)
        if price is None:
            raise PermissionDeniedError(
                "Model %s has no price, and this key has a budget: its spend could not be bounded. Price it in "
                "config.yaml: under pricing:, add the line   %s: {input: <USD per 1M input tokens>, output: "
                "<USD per 1M output tokens>}" % (printable(model)[:256], json.dumps(model[:256])),
                code="model_not_priced")
        # A count past _MAX_COUNT bounds nothing more; unclamped, a huge one
        # overflowed the float of the refusal's message.
        limit = next((min(body[name], _MAX_COUNT) for name in ("max_tokens", "max_completion_tokens",
                                                               "max_output_tokens")
                      if isinstance(body.get(name), int) and not isinstance(body.get(name), bool)
                      and body[name] > 0), None)
        choices = max([min(body[name], _MAX_COUNT) for name in ("n", "best_of") if isinstance(body.get(name), int)
                       and not isinstance(body.get(name), bool) and body[name] > 0] or [1])
        budgets = self.config.budgets
        if self.budget_admission(key) == "estimate":
            output_limit = min(limit or budgets.typical_output_tokens, budgets.typical_output_tokens)
            input_tokens = estimate_tokens(len(raw or b""))  # at the input price: no cache kinds yet
        else:
            output_limit = limit or budgets.max_output_tokens
            price, input_tokens = costliest_input(price), len(raw or b"")
        output_tokens = output_limit * choices if route.generates else 0
        return cost_nanousd(price, Usage(input_tokens=input_tokens, output_tokens=output_tokens))

    def key_info(self, key):
        """What a key may learn about itself: limits, spend, expiry."""
        spend = self.store.key_spend(key, self.clock())
        info = key.as_dict()
        del info["key_hint"]
        allowance = spend["allowance_nanousd"]
        info.update({
            "rpm": self.requests_per_minute(key),
            "period_start": iso_time(spend["period_start"]) if allowance is not None else None,
            "period_end": iso_time(spend["period_end"]) if allowance is not None else None,
            "spent": nanousd_to_usd(spend["spent_nanousd"]),
            "reserved": nanousd_to_usd(spend["reserved_nanousd"]),
            "budget": None if allowance is None else nanousd_to_usd(allowance),
            "remaining": None if allowance is None else nanousd_to_usd(
                max(allowance - spend["spent_nanousd"] - spend["reserved_nanousd"], 0)),
            "budget_admission": self.budget_admission(key),
            "budget_overshoot": None if allowance is None or self.budget_admission(key) == "strict" else (
                ESTIMATE_OVERSHOOT % self.config.budgets.typical_output_tokens),
        })
        return info

    def _route(self, dialect, path, model):
        """Pick the provider: a ``provider/`` prefix on the model (stripped),
        else a provider whose ``models`` globs match, else the default one."""
        if model and "/" in model:
            prefix, rest = model.split("/", 1)
            provider = self.providers.get(prefix)
            if provider is not None:
                if not provider.serves(dialect, path):
                    raise BadRequestError("Provider %s does not serve %s%s" % (
                        prefix, path, " in the Anthropic format" if dialect == ANTHROPIC else ""))
                return provider, rest
        if model:
            for provider in self.providers.values():
                if provider.serves(dialect, path) and provider.matches(model):
                    return provider, model
        default = self.providers.get(dialect)
        if default is None or not default.serves(dialect, path):
            default = next((p for p in self.providers.values() if p.dialect == dialect and p.serves(dialect, path)),
                           None)
        if default is None:
            raise NotFoundError("No provider is configured for model %s" % printable(model or "")[:100],
                                code="model_not_found")
        return default, model

    def _complete(self, attempt, upstream, headers):
        """Read a whole (non-streamed) answer and record it. Returns the
        Reply, or a Failure for an answer another attempt might better."""
        provider, response = attempt.provider, upstream.response
        status = response.status
        try:
            body = yield from upstream.read_body(attempt.logical.deadline, provider.pool.read_timeout)
        except GatewayError as exc:
            upstream.close()
            attempt.fail(OUTCOME_TIMEOUT if exc.status == 504 else OUTCOME_UPSTREAM_ERROR, status)
            return Failure(transport_trigger(exc), error=exc)
        if response.will_close:
            upstream.close()
        else:
            provider.pool.release(upstream)
        body = provider.client_body(status, body)
        if status in (401, 403):
            provider.credentials_refused()
            attempt.fail(OUTCOME_UPSTREAM_ERROR, status)
            logger.warning("provider %s rejected the gateway's credentials (key %s) with HTTP %d; check its API key",
                           provider.name, attempt.deployment.name, status)
            return Failure(status, error=UpstreamError(
                "The provider rejected the gateway's credentials; the operator has been told",
                code="upstream_auth_error"))
        if 300 <= status < 400:
            attempt.fail(OUTCOME_UPSTREAM_ERROR, status)
            return Failure(None, error=UpstreamError(
                "The provider answered with a redirect, which the gateway does not follow"))
        payload = _json_object(body)
        if payload is None:
            attempt.fail(OUTCOME_UPSTREAM_ERROR, status)
            return Failure(status if status >= 400 else None, error=UpstreamError(
                "The provider answered HTTP %d with a body that is not JSON" % status, code="upstream_bad_response"))
        ok = 200 <= status < 300
        if not ok:  # an error body may quote what the provider received
            for secret in self.known_secrets():
                body = body.replace(secret.encode(), b"[redacted]")
        attempt.keep_answer(body)
        usage = Usage()
        if attempt.logical.route.usage_parser is not None:
            if isinstance(payload.get("usage"), dict):
                usage = attempt.logical.route.usage_parser(payload["usage"])
            elif ok:
                generated = {k: payload.get(k) for k in ("choices", "content", "output")}
                usage = attempt.estimate(None, text_characters(generated))
        if ok and attempt.logical.route is RESPONSES_ROUTE and isinstance(payload.get("id"), str):
            attempt.response_id = payload["id"][:256]
        attempt.settle(OUTCOME_OK if ok else OUTCOME_UPSTREAM_ERROR, status, usage)
        reply = Reply(status, headers + [("content-type", response.getheader("content-type", "application/json"))],
                      body)
        if ok:
            self.router.succeeded(attempt.deployment, attempt.upstream_model, response.field_map,
                                  attempt.logical.affinity_key)
            return reply
        should_retry = response.getheader("x-should-retry", "").lower()
        trigger = status if should_retry != "false" else None
        if should_retry == "true" and trigger not in self.config.routing.retry_on:
            trigger = "connect"  # the provider says a retry will do: treated like a dropped connection
        return Failure(trigger, retry_after(response.field_map), reply=reply)

    def _open_stream(self, attempt, upstream, meter, headers):
        """Read a stream up to its commit point, the first event carrying
        model output (or its end): the preamble before it (OpenAI's role
        chunk, Responses' created/in_progress, Anthropic's message_start
        and pings) is held back, so a stream that fails before any output
        is a Failure the client never sees. Returns the Reply relaying the
        stream, or a Failure."""
        events = attempt.provider.events(upstream, attempt.logical.deadline, self.config.server.stream_idle_timeout)
        if attempt.answer is not None:
            events = attempt.kept_events(events)
        preamble, size, first = [], 0, None
        try:
            for event in events:
                if isinstance(event, ProviderWait):
                    yield event
                    continue
                relay = meter.feed(event)
                if meter.error is not None and not meter.text_bytes:
                    raise UpstreamError("The provider's stream failed before any output: %s" % meter.error)
                if meter.text_bytes or meter.finished or size > MAX_PREAMBLE_BYTES:
                    first = (event, relay)
                    break
                if relay:
                    preamble.append(event)
                    size += len(event)
            else:
                raise UpstreamCutError("The provider's stream ended before any output")
        except GatewayError as exc:
            upstream.close()
            status = upstream.response.status
            attempt.fail(OUTCOME_TIMEOUT if exc.status == 504 else OUTCOME_UPSTREAM_ERROR, status, meter.usage)
            trigger = meter.error_status if meter.error is not None else transport_trigger(exc)
            return Failure(trigger, error=exc)
        self.router.succeeded(attempt.deployment, attempt.upstream_model, upstream.response.field_map,
                              attempt.logical.affinity_key)
        return Reply(upstream.response.status, headers, stream=self._relay(attempt, upstream, meter, preamble, first,
                                                                             events))

    def _relay(self, attempt, upstream, meter, preamble, first, events):
        """Relay a committed stream event by event; never replayed. The
        event that ends it is held back until the usage row is settled, so
        a client that saw the end of its answer is always on the books. A
        stream the provider breaks off ends with the API's error event."""
        held = []
        outcome = OUTCOME_CLIENT_DISCONNECTED  # if the handler closes this generator
        reusable = False
        status = upstream.response.status  # read now: once given back, the connection is another call's
        self.metrics.stream(1)
        try:
            outcome = yield from self._forward_events(meter, preamble, first, events, held)
            reusable = outcome == OUTCOME_OK and (yield from upstream.finish_stream())
        finally:
            self.metrics.stream(-1)
            try:
                if reusable:
                    attempt.provider.pool.release(upstream)
                else:
                    upstream.close()  # also stops a provider still generating for a client that left
            finally:
                try:
                    usage = meter.usage if meter.usage_final else attempt.estimate(meter.usage, meter.text_bytes)
                    attempt.response_id = meter.response_id and meter.response_id[:256]
                    attempt.settle(outcome, status, usage)
                finally:
                    attempt.logical.release()
        if outcome == OUTCOME_CLIENT_DISCONNECTED:
            return
        yield from held
        if outcome in (OUTCOME_TRUNCATED, OUTCOME_TIMEOUT):
            message = ("The provider's stream timed out" if outcome == OUTCOME_TIMEOUT
                       else "The provider's stream stopped before it was complete")
            yield stream_error_event(attempt.logical.dialect, attempt.logical.request.path, message, outcome,
                                     meter.response_id)

    @staticmethod
    def _forward_events(meter, preamble, first, events, held):
        """Yield the preamble, the first output event and the provider's
        events after it, until the one that ends the stream (kept in
        ``held``); return how the stream ended."""
        try:
            yield from preamble
            event, relay = first
            while True:
                if meter.finished:
                    held.extend((event,) if relay else ())
                    return OUTCOME_UPSTREAM_ERROR if meter.error is not None else OUTCOME_OK
                if relay:
                    yield event
                event = next(events, None)
                while isinstance(event, ProviderWait):
                    yield event
                    event = next(events, None)
                if event is None:
                    break
                relay = meter.feed(event)
        except ClientDisconnected:
            return OUTCOME_CLIENT_DISCONNECTED
        except UpstreamTimeoutError:
            return OUTCOME_TIMEOUT
        except UpstreamError:
            return OUTCOME_TRUNCATED
        return OUTCOME_UPSTREAM_ERROR if meter.error is not None else OUTCOME_TRUNCATED

    # -- admin API -----------------------------------------------------------

    def _admin(self, request):
        self.refresh()
        if self._admin_token_hash is None:
            raise PermissionDeniedError(
                "The admin API is off. Turn it on with LLMGW_ADMIN_TOKEN in the environment, "
                "or run: python cli.py admin-token", code="admin_disabled")
        if not hmac.compare_digest(_bearer_hash(request), self._admin_token_hash):
            raise AuthenticationError("Admin routes need Authorization: Bearer <admin token>",
                                      code="invalid_admin_token")
        parts = request.path.split("/")[2:]  # after "", "admin"
        routes = {
            ("GET", "virtual-keys"): lambda: json_reply(200, {"data": self.store.list_keys()}),
            ("POST", "virtual-keys"): lambda: self._admin_create_key(request),
            ("GET", "virtual-keys", "*"): lambda: json_reply(200, get_key(self.store, parts[1])),
            ("PATCH", "virtual-keys", "*"): lambda: self._admin_update_key(request, parts[1]),
            ("DELETE", "virtual-keys", "*"): lambda: self._admin_revoke_key(parts[1]),
            ("POST", "virtual-keys", "*", "rotate"): lambda: self._admin_rotate_key(request, parts[1]),
            ("POST", "virtual-keys", "*", "topup"): lambda: self._admin_topup(request, parts[1]),
            ("GET", "usage-stats"): lambda: self._admin_usage_stats(request),
            ("GET", "logs"): lambda: self._admin_logs(request),
            ("GET", "logs", "*"): lambda: json_reply(200, request_log_entry(self.store, parts[1])),
            ("GET", "audit"): lambda: json_reply(200, {"data": self.store.audit_log(1000)}),
            ("GET", "deployments"): lambda: json_reply(200, {"data": self.router.describe()}),
        }
        shape = tuple("*" if index == 1 else part for index, part in enumerate(parts))
        route = routes.get((request.method,) + shape)
        if route is None:
            if any(known[1:] == shape for known in routes):
                raise MethodNotAllowedError("%s is not allowed on %s" % (request.method, request.path))
            raise NotFoundError("Unknown admin route")
        return route()

    def _metrics(self, request):
        """Prometheus' scrape: the metrics token or the admin token."""
        self.refresh()
        if request.method != "GET":
            raise MethodNotAllowedError("/metrics accepts GET only")
        accepted = [digest for digest in (self._metrics_token_hash, self._admin_token_hash) if digest]
        if not accepted:
            raise PermissionDeniedError(
                "/metrics is off. Turn it on with a metrics token (python cli.py metrics-token, or "
                "LLMGW_METRICS_TOKEN) or an admin token", code="metrics_disabled")
        presented = _bearer_hash(request)
        if not any([hmac.compare_digest(presented, digest) for digest in accepted]):
            raise AuthenticationError("/metrics needs Authorization: Bearer <metrics token or admin token>",
                                      code="invalid_metrics_token")
        with self._metrics_lock:  # scrapes at once wait for one read, not one read each
            read_at, books = self._metrics_books
            now = self.clock()
            if not 0 <= now - read_at < METRICS_BOOKS_SECONDS:  # a clock set back reads afresh too
                books = metrics_books(self.store, self.prices, now)
                self._metrics_books = now, books
        text = metrics_text(books, self.metrics, self.server_gauges())
        return Reply(200, [("content-type", "text/plain; version=0.0.4; charset=utf-8")], text.encode("utf-8"))

    def _admin_create_key(self, request):
        _, body = parse_json_body(request, ADMIN_BODY_BYTES)
        fields = {name: value for name, value in body.items() if name != "project_name"}
        record, secret = create_virtual_key(self.store, self.config, body.get("project_name"), fields,
                                            "admin-api", self.clock())
        logger.info("admin API created virtual key %s", record["id"])
        return json_reply(201, dict(record, key=secret))

    def _admin_update_key(self, request, key_id):
        _, body = parse_json_body(request, ADMIN_BODY_BYTES)
        return json_reply(200, update_key(self.store, self.config, key_id, body, "admin-api", self.clock()))

    def _admin_revoke_key(self, key_id):
        record = revoke_key(self.store, key_id, "admin-api")
        logger.info("admin API revoked virtual key %s", record["id"])
        return json_reply(200, record)

    def _admin_rotate_key(self, request, key_id):
        _, body = parse_json_body(request, ADMIN_BODY_BYTES)
        return json_reply(200, rotate_key(self.store, key_id, body.get("grace", "0s"), "admin-api", self.clock()))

    def _admin_topup(self, request, key_id):
        _, body = parse_json_body(request, ADMIN_BODY_BYTES)
        return json_reply(200, topup_key(self.store, key_id, body.get("amount"), "admin-api", self.clock()))

    def _admin_usage_stats(self, request):
        options, output = _query_options(request)
        rows = self.usage_stats(options.get("by", "key"), options.get("since"), options.get("until"),
                                options.get("project"))
        return csv_reply(csv_text(rows)) if output == "csv" else json_reply(200, rows)

    def _admin_logs(self, request):
        options, output = _query_options(request)
        page = request_log(self.store, options)
        if output == "csv":
            return csv_reply(csv_text(page["data"]), [("x-next-cursor", page["next_cursor"] or "")])
        return json_reply(200, page)

    def usage_stats(self, group_by="key", since=None, until=None, project=None):
        return usage_stats(self.store, group_by, since and parse_time_bound(since, name="since"),
                           until and parse_time_bound(until, end=True, name="until"), project, self.clock())


def _bearer_hash(request):
    """The hash of the request's ``Authorization: Bearer`` token, or ""."""
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return hash_secret(token) if scheme.lower() == "bearer" and token else ""


def _query_options(request):
    """An admin GET's query string as {name: last value}, and the output
    format asked for with ``format`` (json or csv)."""
    query = urllib.parse.parse_qs(request.query, strict_parsing=False)
    options = {name: values[-1] for name, values in query.items()}
    output = options.pop("format", "json")
    if output not in ("json", "csv"):
        raise BadRequestError("format: %s is not json or csv" % shown(output), param="format")
    return options, output


_HEADER_VALUE = re.compile(r"^[\x20-\x7e\t]*$")


def read_request_body(route, request, max_bytes):
    """(raw bytes, parsed body, model) of a proxied request; a POST must
    name its model where the route says so. GET and DELETE requests, and a
    POST without a body where no model is needed (a cancel), have none."""
    if request.method != "POST" or (not route.names_model and not request.content_length):
        return None, {}, None
    raw, body = parse_json_body(request, max_bytes)
    model = body.get("model")
    if model is None and not route.names_model:
        return raw, body, None
    if not isinstance(model, str) or not model:
        raise BadRequestError("The request body must name a model (\"model\": \"...\")")
    if len(model) > MAX_MODEL_CHARS:
        raise BadRequestError("The model name is longer than %d characters" % MAX_MODEL_CHARS)
    return raw, body, model


def check_model_allowed(key, model, qualified_model):
    """A key with a model allowlist may call only the models it matches,
    by name or as ``provider/model``."""
    if model is None or key.models is None:
        return
    if not any(fnmatch.fnmatchcase(name, glob) for glob in key.models for name in (model, qualified_model)):
        raise PermissionDeniedError("This key may not use model %s" % printable(model)[:100],
                                    code="model_not_allowed")


#: Where a request names its session, for affinity: ours, then the coding
#: agents' (Claude Code's, Codex's).
SESSION_HEADERS = ("x-llmgw-session", "x-claude-code-session-id", "session_id")
#: Client headers passed to providers that must be printable ASCII (the
#: head parser lets other bytes through in values nobody forwards).
CHECKED_PASSTHROUGH_HEADERS = ("anthropic-version", "anthropic-beta", "openai-beta") + tuple(
    name for names in AGENT_REQUEST_HEADERS.values() for name in names)


def check_passthrough_headers(headers):
    """The protocol and agent headers passed to a provider must be printable
    ASCII: they select API behaviour or name a session, and nothing else
    is a valid value."""
    for name in CHECKED_PASSTHROUGH_HEADERS:
        if name in headers and not _HEADER_VALUE.match(headers[name]):
            raise BadRequestError("Malformed %s header" % name)


def _tokens(headers, name):
    return {token.strip().lower() for token in headers.get(name, "").split(",")}


def refuse_websocket(request):
    """The gateway speaks HTTP only. Codex opens the Responses API as a
    WebSocket first (``GET /v1/responses``, ``Upgrade: websocket``,
    ``Connection: Upgrade``: RFC 6455's handshake): a 426 makes it use HTTP
    at once, where a 404 or 405 made it try seven times over 6.5 seconds
    (measured with Codex CLI 0.171; README, Codex). An Upgrade on any other
    request is ignored, as HTTP allows."""
    if (request.method == "GET" and "websocket" in _tokens(request.headers, "upgrade")
            and "upgrade" in _tokens(request.headers, "connection")):
        raise UpgradeRequiredError("The gateway does not serve WebSocket; call the same path over HTTP",
                                   headers=[("upgrade", "HTTP/1.1")])


def dialect_for(route, request):
    """The API whose shapes the client expects: Anthropic on /v1/messages*,
    and on /v1/models or a path the gateway does not serve when the client
    sends anthropic-version (only Anthropic's clients do)."""
    if route is not None and route.dialect is not None:
        return route.dialect
    if route is None and request.path.startswith("/v1/messages"):
        return ANTHROPIC
    return ANTHROPIC if "anthropic-version" in request.headers else OPENAI


def unknown_path_error(path):
    """The 404 for a path the gateway does not serve. A path that doubles
    /v1 comes from a base URL that ends in /v1 given to a client that adds
    /v1 itself (Anthropic's SDKs, Claude Code): the answer says so."""
    if path.startswith("/v1/v1/"):
        return NotFoundError(
            "Unknown path %s: /v1 is there twice, so the client's base URL ends in /v1 and the client adds "
            "/v1 itself. Give the gateway's address without /v1 to Anthropic's SDKs and Claude Code "
            "(ANTHROPIC_BASE_URL=http://HOST:PORT) and with /v1 once to OpenAI's (OPENAI_BASE_URL=http://HOST:PORT/v1)"
            % redact(path)[:200], code="base_url_doubles_v1")
    return NotFoundError("Unknown path: the gateway serves only the proxied API endpoints")


#: Where clients may put the virtual key: OpenAI and Anthropic 2.x SDKs send
#: Authorization: Bearer, Anthropic 1.x x-api-key, Azure-style clients api-key.
CREDENTIAL_HEADERS = ("authorization", "x-api-key", "api-key")


def client_credential(headers):
    """The virtual key from ``Authorization: Bearer``, ``x-api-key`` or
    ``api-key``; several of them must carry the same key."""
    found = []
    authorization = headers.get("authorization")
    if authorization is not None:
        scheme, _, value = authorization.partition(" ")
        if scheme.lower() != "bearer" or not value or value != value.strip():
            raise AuthenticationError("Send the virtual key as Authorization: Bearer <key> or x-api-key: <key>")
        found.append(value)
    found.extend(headers[name] for name in CREDENTIAL_HEADERS[1:] if name in headers)
    if not found or not found[0]:
        raise AuthenticationError("Missing virtual key: send Authorization: Bearer <key> or x-api-key: <key>",
                                  code="missing_api_key")
    secret = found[0]
    if any(not hmac.compare_digest(secret.encode(), other.encode()) for other in found[1:]):
        raise AuthenticationError("The credential headers carry different keys", code="ambiguous_credentials")
    if len(secret) > 512:
        raise AuthenticationError("Invalid, revoked or expired virtual key")
    return secret


def with_aliases(body, dialect, aliases):
    """A provider's model list (JSON bytes) with the aliases appended, in
    the list's own shape: OpenAI's, or Anthropic's (``has_more``, first
    and last ids), so SDKs and Claude Code's model discovery see them.
    A list that is not the last page, or not a list, is left alone; with
    no ``body`` (the provider's list failed), the aliases alone."""
    if body is None:
        body = (b'{"data": [], "has_more": false, "first_id": null, "last_id": null}' if dialect == ANTHROPIC
                else b'{"object": "list", "data": []}')
    listing = _json_object(body)
    if listing is None or not isinstance(listing.get("data"), list) or listing.get("has_more"):
        return body
    known = {entry.get("id") for entry in listing["data"] if isinstance(entry, dict)}
    for alias in aliases:
        if alias in known:
            continue
        listing["data"].append(alias_model(alias, dialect))
        if dialect == ANTHROPIC:
            listing["last_id"] = alias
            listing["first_id"] = listing.get("first_id") or alias
    return json.dumps(listing).encode()


def alias_model(alias, dialect):
    """An alias as a model object of the API called (``GET /v1/models/{id}``
    and the entries ``with_aliases`` adds)."""
    if dialect == ANTHROPIC:
        return {"type": "model", "id": alias, "display_name": alias, "created_at": "1970-01-01T00:00:00Z"}
    return {"id": alias, "object": "model", "created": 0, "owned_by": "llmgw"}


_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f-\x9f]")


_KEY_SHAPED = re.compile(r"llmgw-[A-Za-z0-9_\-]{16,}")


def redact(text, secrets=()):
    """``printable(text)`` with virtual keys, admin tokens and the given
    secrets (the provider keys) blanked out: for log lines that quote
    client input (paths, model names)."""
    text = _KEY_SHAPED.sub("llmgw-[redacted]", printable(text))
    for secret in secrets:
        if secret:
            text = text.replace(secret, "[redacted]")
    return text


def printable(text):
    """``text`` with control characters escaped, safe for one log line."""
    return _UNPRINTABLE.sub(lambda m: "\\x%02x" % ord(m.group()), str(text))


# ==== 11. HTTP connections ==================================================
#
# The only code that touches client sockets. http.server's defaults do not
# survive the edge of a network (a thread per connection without limit, no
# deadline on a slow client, lenient framing), so this section owns every
# client connection from accept to close, and section 12's GatewayServer
# only accepts them and hands them over (``WorkerPool.watch``). Its parts:
#
# * OpenConnections: the places of open connections (``max_connections``,
#   ``max_connections_per_address``); the accept loop takes one for each
#   connection or answers 503/429 at once, and whoever closes it frees it;
# * Connection: one client connection, its bytes and its request;
# * ReadinessQueue: the kernel's readiness queue (epoll or kqueue), where
#   every connection waits between requests, while still sending one, or,
#   parked, while its call waits for its provider (the provider's socket is
#   watched instead); and the timer heap of their deadlines;
# * WorkerPool: a bounded pool of worker threads taking ready connections
#   from the queue, a timekeeper thread acting on each deadline as it
#   passes, and the accept loop's sweep answering requests no worker took
#   within ``queue_timeout``;
# * Exchange: one request and its answer, as steps a worker runs.
#
# A connection's life: the worker woken for it reads without blocking and
# checks the request head strictly; a request whose head (and small body)
# has arrived it serves at once, then arms the connection again, so a slow
# or idle client costs a socket, never a worker, and a request passes from
# kernel to reply on one thread. An Exchange's steps are a generator: when
# its call waits for the provider (section 5) they yield a ProviderWait and
# the worker parks the connection and moves on. Whichever worker is woken
# when the provider's socket is ready resumes the steps where they stopped;
# at the deadline, the timekeeper hands the connection to a worker and the
# steps raise their timeout (or end their backoff: a wait without a socket
# is a timer alone). So a call waiting for its provider costs two sockets
# and its state, not a thread, and every guarantee of the request path
# holds unchanged: the steps are the same code, only run in pieces.
#
# Which thread may touch what:
#
# * A Connection's socket, ``buffer``, ``head``, ``admission``,
#   ``exchange``, ``idle``, ``deadline`` and ``queued_since``: its owner
#   alone, one thread at a time. The readiness queue owns an armed
#   (or parked) connection; ``take`` (a worker), ``take_due`` (the
#   timekeeper), ``take_ready`` (the sweep) and ``stop`` (the drain) hand it
#   to one thread, which owns it until it arms, parks, hands over or closes
#   it, and must not touch it after that.
# * ``armed``, ``timer``, ``parked_fd``, the heap, the fd map and the
#   hand-over list: the queue, under its lock.
# * The pool's thread, exchange and body counts: changed under the pool's
#   lock (``_retire`` glances at them without it before it takes it).
# * OpenConnections' counts: under its own lock (accept loop and owners).
# * An Exchange and the call it serves: the owner of its connection.

_HEAD_END = re.compile(rb"\r?\n\r?\n")
_REQUEST_LINE = re.compile(r"^([A-Za-z]{1,16}) ([^ \x00-\x1f\x7f]+) HTTP/([0-9])\.([0-9])$")
#: A head's line ends: CRLF, or LF alone (RFC 9112 2.2). Any other CR stays in
#: the line, where the checks refuse it.
_LINE_END = re.compile(r"\r?\n")
_HEADER_NAME = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
_BAD_HEADER_VALUE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
_CONTENT_LENGTH = re.compile(r"^[0-9]{1,15}$")
#: Headers that may appear once: a second copy is a smuggling attempt or a mistake.
_SINGLE_HEADERS = frozenset(("content-length", "authorization", "x-api-key", "api-key", "content-type", "host",
                             "anthropic-version", "transfer-encoding", "expect"))
#: Bodies up to this size arrive before the request is checked. Larger ones
#: (and any the client awaits leave to send) are checked first (key, limits:
#: ``Gateway.admit``), then arrive the same way. Either way a body's sender
#: never holds a worker while it sends.
INLINE_BODY_BYTES = 256 * 1024


class RequestHead:
    """The parsed request line and header fields of one request."""
    __slots__ = ("method", "target", "version", "headers", "content_length", "expects_continue", "keep_alive")

    def __init__(self, method, target, version, headers, content_length):
        self.method, self.target, self.version, self.headers = method, target, version, headers
        self.content_length = content_length
        self.expects_continue = version >= (1, 1) and headers.get("expect", "").lower() == "100-continue"
        connection = headers.get("connection", "").lower()
        self.keep_alive = "close" not in connection if version >= (1, 1) else "keep-alive" in connection


def parse_request_head(data, max_fields):
    """Parse a request line and header fields (bytes, without the blank
    line). Strict where leniency would let requests be smuggled: raises
    BadRequestError, LengthRequiredError or HeaderTooLargeError."""
    lines = _LINE_END.split(data.decode("latin-1"))
    match = _REQUEST_LINE.match(lines[0])
    if match is None:
        raise BadRequestError("Malformed request line")
    method, target, major, minor = match.groups()
    if (major, minor) not in (("1", "0"), ("1", "1")):
        raise HTTPVersionError("Only HTTP/1.0 and HTTP/1.1 are served")
    if not target.startswith("/"):
        raise BadRequestError("The request target must be a path")
    if len(lines) - 1 > max_fields:
        raise HeaderTooLargeError("More than %d header fields" % max_fields)
    headers = {}
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        if not colon or not _HEADER_NAME.match(name) or _BAD_HEADER_VALUE.search(value):
            raise BadRequestError("Malformed header field")  # obs-fold, "Name :", control bytes
        name = name.lower()
        if name in headers and name in _SINGLE_HEADERS:
            raise BadRequestError("Duplicate %s header" % name)
        headers[name] = value.strip(" \t")
    if "transfer-encoding" in headers:
        if "content-length" in headers:
            raise BadRequestError("Content-Length and Transfer-Encoding together are refused")
        raise LengthRequiredError("Chunked request bodies are not supported: send Content-Length")
    length = headers.get("content-length")
    if length is not None:
        if not _CONTENT_LENGTH.match(length):
            raise BadRequestError("Malformed Content-Length")
        length = int(length)
    return RequestHead(method, target, (int(major), int(minor)), headers, length)


def head_error(head, limits):
    """Why a request head, whole or still arriving, is refused (a
    GatewayError), or None: a request line too long or malformed, or a
    head too large."""
    line_end = head.find(b"\n")
    line = head if line_end < 0 else head[:line_end]
    if len(line) > limits.max_request_line_bytes:
        return URITooLongError("The request line is too long")
    if line_end >= 0 and not _REQUEST_LINE.match(line.removesuffix(b"\r").decode("latin-1")):
        return BadRequestError("Malformed request line")
    if len(head) > limits.max_header_bytes:
        return HeaderTooLargeError("The request head is too large")
    return None


def head_dialect(head):
    """The API a refused request head called, judged by its target alone
    (Anthropic on /v1/messages*, as ``dialect_for`` judges an unknown
    route), so a head refused before or while it is parsed is still
    answered in the shape its client reads."""
    words = head.split(b"\n", 1)[0].split(b" ")
    return ANTHROPIC if len(words) > 1 and words[1].startswith(b"/v1/messages") else OPENAI


class Connection:
    """A client connection: its socket, bytes read ahead, the request being
    assembled or served, and the deadline the timekeeper enforces while it
    waits (for its client's bytes, or, parked, for its provider's)."""
    __slots__ = ("sock", "fd", "address", "buffer", "head", "admission", "deadline", "idle", "armed",
                 "queued_since", "exchange", "parked_fd", "timer")

    def __init__(self, sock, address):
        self.sock, self.address = sock, address
        self.fd = sock.fileno()  # kept: a closed socket forgets it
        self.buffer = bytearray()  # grown in place: a body of many receives is not copied each time
        self.head = None        # RequestHead once the head is complete
        self.admission = None   # Admission of a request checked before its body arrived
        self.deadline = 0.0
        self.idle = True        # between requests: no byte of the next one yet
        self.armed = False      # waiting for bytes, owned by no worker
        self.queued_since = 0.0  # when first seen whole, waiting for a worker
        self.exchange = None    # the Exchange serving its request, while it lasts
        self.parked_fd = None   # the provider socket watched instead, while parked
        self.timer = None       # its deadline's entry in the queue's timer heap, while there

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass


class OpenConnections:
    """The places of open client connections: at most ``max_connections``
    in all and ``max_connections_per_address`` from one client address.
    ``admit`` takes a place for a connection being accepted (accept loop);
    ``release`` closes a connection and frees its place (its owner)."""

    def __init__(self):
        self._lock = threading.Lock()
        self.count = 0
        self._by_address = {}  # client address -> its open connections

    def admit(self, address, limits):
        """Take a place for a new connection from ``address``, or return
        the GatewayError that refuses it (503 when every place is taken,
        429 when its address holds its share)."""
        with self._lock:
            if self.count >= limits.max_connections:
                return ServiceUnavailableError("The gateway is at its connection limit; retry shortly",
                                               code="gateway_full", headers=[("retry-after", "1")])
            if self._by_address.get(address, 0) >= limits.max_connections_per_address:
                return RateLimitError("Too many open connections from your address; close some or retry "
                                      "shortly", code="too_many_connections", headers=[("retry-after", "1")])
            self.count += 1
            self._by_address[address] = self._by_address.get(address, 0) + 1
        return None

    def release(self, connection):
        """Close a connection and free its place (once)."""
        if connection.sock.fileno() < 0:
            return
        try:
            connection.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        connection.close()
        address = connection.address[0]
        with self._lock:
            self.count -= 1
            if self._by_address[address] > 1:
                self._by_address[address] -= 1
            else:
                del self._by_address[address]


class ReadinessQueue:
    """Connections waiting for bytes, watched by the kernel with one-shot
    registrations (epoll; kqueue on BSD and macOS): a readable connection
    wakes exactly one waiting worker, and is not watched again until that
    worker arms it anew. So no thread stands between the kernel and the
    workers, and a request costs one wake-up. A parked connection is
    watched through its provider's socket; one past its deadline is
    handed to a worker through the same queue."""

    def __init__(self):
        if hasattr(select, "epoll"):
            self._epoll = select.epoll()
            self._kqueue = None
        elif hasattr(select, "kqueue"):
            self._epoll = None
            self._kqueue = select.kqueue()
        else:
            raise ConfigError("serving needs epoll or kqueue (Linux, BSD or macOS)")
        self._lock = threading.Lock()
        self._watched = {}  # fd -> Connection: a client's fd, or its provider's while parked
        self.stopped = False
        # The deadlines of armed and parked connections: (deadline, sequence,
        # connection) in a heap, the earliest first. A connection's entry is
        # its ``timer``, and counts while the connection is armed. Armed anew
        # with a deadline no earlier than its entry's (a stream's idle
        # deadline, moved on by every event), it keeps that entry, which the
        # timekeeper moves on when it comes up; armed with an earlier one, it
        # gets a new entry, and the old is left behind, dropped when it comes
        # up (or when stale entries outnumber the others).
        self._timers = []
        self._timer_numbers = itertools.count()
        self._timer_changed = threading.Condition(self._lock)
        self._closed = False
        # A level-triggered wake-up that, once set, releases every waiting worker.
        self._stop_reader, self._stop_writer = socket.socketpair()
        self._control(self._stop_reader.fileno(), oneshot=False, new=True)
        # Connections handed to the next free worker; a byte in the pair while there are some.
        self._handed = []
        self._hand_reader, self._hand_writer = socket.socketpair()
        self._hand_reader.setblocking(False)
        self._hand_fd = self._hand_reader.fileno()
        self._control(self._hand_fd, new=True)

    def _control(self, fd, oneshot=True, new=False, writing=False):
        if self._epoll is not None:
            flags = (select.EPOLLOUT if writing else select.EPOLLIN) | (select.EPOLLONESHOT if oneshot else 0)
            (self._epoll.register if new else self._epoll.modify)(fd, flags)
        else:
            flags = select.KQ_EV_ADD | (select.KQ_EV_ONESHOT if oneshot else 0)
            kind = select.KQ_FILTER_WRITE if writing else select.KQ_FILTER_READ
            self._kqueue.control([select.kevent(fd, kind, flags)], 0)

    def _unwatch(self, fd):
        if self._epoll is not None:
            try:
                self._epoll.unregister(fd)
            except (OSError, ValueError):
                pass
            return
        for kind in (select.KQ_FILTER_READ, select.KQ_FILTER_WRITE):  # a fired one-shot event is gone already
            try:
                self._kqueue.control([select.kevent(fd, kind, select.KQ_EV_DELETE)], 0)
            except (OSError, ValueError):
                pass

    def add(self, connection):
        """Watch a new connection; False if it cannot be (the caller closes it)."""
        with self._lock:
            self._watched[connection.fd] = connection
        return self.arm(connection, new=True)

    def arm(self, connection, new=False):
        """Watch a connection again, after its owner read or answered it
        (its deadline set). False if it cannot be, because the gateway is
        stopping or the kernel refused: its owner closes it then."""
        with self._lock:  # so no one sees it armed but unwatched
            if self.stopped:
                return False
            try:
                self._control(connection.fd, new=new)
            except (OSError, ValueError):
                logger.warning("a connection could not be watched; it is closed")
                return False
            connection.armed = True
            self._set_timer(connection)
            return True

    def _set_timer(self, connection):
        """Put an armed connection's deadline in the heap (the lock held),
        waking the timekeeper when it is the new earliest; an entry of the
        connection's that comes up no later serves (see ``take_due``)."""
        if connection.timer is not None and connection.timer[0] <= connection.deadline:
            return
        entry = (connection.deadline, next(self._timer_numbers), connection)
        connection.timer = entry
        heapq.heappush(self._timers, entry)
        if self._timers[0] is entry:
            self._timer_changed.notify()
        if len(self._timers) > 2 * len(self._watched) + 64:
            self._timers = [e for e in self._timers if e[2].timer is e]
            heapq.heapify(self._timers)

    def park(self, connection, wait):
        """Watch a connection's call through its provider's socket until
        that is readable (or writable, as the wait says) or ``wait.deadline``
        passes; a wait without a
        socket is a timer alone. Also while stopping: the drain lets parked
        calls finish. False if the kernel refused."""
        with self._lock:
            if wait.sock is not None:
                fd = wait.sock.fileno()
                try:
                    try:
                        self._control(fd, writing=wait.writing)  # watched before: woken again
                    except FileNotFoundError:
                        self._control(fd, new=True, writing=wait.writing)
                except (OSError, ValueError):
                    logger.warning("a provider connection could not be watched; its call is ended")
                    return False
                self._watched[fd] = connection
                connection.parked_fd = fd
            connection.deadline, connection.armed = wait.deadline, True
            self._set_timer(connection)
            return True

    def unpark(self, connection):
        """Forget the provider socket of a parked connection its owner took
        (to resume its call, or to close it). The kernel keeps it on its list
        (a one-shot watch, spent or ignored once it is forgotten) until the
        socket closes, so the call's next wait costs one call to the kernel,
        not two."""
        if connection.parked_fd is not None:  # not already unparked as it was taken (``_own``)
            with self._lock:
                fd, connection.parked_fd = connection.parked_fd, None
                if self._watched.get(fd) is connection:
                    del self._watched[fd]

    def hand_over(self, connection):
        """Give a connection the timekeeper or the sweep owns to the next
        free worker."""
        with self._lock:
            self._handed.append(connection)
            if len(self._handed) == 1:
                self._hand_writer.send(b"\0")

    def forget(self, connection):
        """Stop watching a connection about to be closed by its owner."""
        self.unpark(connection)
        with self._lock:
            if self._watched.get(connection.fd) is connection:
                del self._watched[connection.fd]
            connection.timer = None  # its entry is stale now, for the heap's clean-up too
        self._unwatch(connection.fd)

    def take(self, timeout):
        """Wait for a readable connection and own it; None on timeout, or at
        once when stopping."""
        owned = self._own(self._poll(timeout, 1))
        return owned[0] if owned else None

    def take_ready(self, most=1024):
        """Own the connections readable now, without waiting (the sweep's
        look at requests no worker has taken)."""
        return self._own(self._poll(0, most))

    def _poll(self, timeout, most):
        """(fd, events) of the ready file descriptors (the events unread)."""
        if self._epoll is not None:
            return self._epoll.poll(timeout, most)
        return [(event.ident, 0) for event in self._kqueue.control(None, most, timeout)]

    def _own(self, ready):
        owned = []
        with self._lock:
            for fd, _ in ready:
                if fd == self._hand_fd:
                    if self._handed:
                        owned.append(self._handed.pop(0))
                    if not self._handed:
                        self._hand_reader.recv(16)
                    self._control(fd)
                    continue
                connection = self._watched.get(fd)
                # Not armed: the timekeeper or the sweep took it (a new connection may reuse its fd),
                # or it is the stop signal.
                if connection is not None and connection.armed:
                    connection.armed = False
                    if connection.parked_fd == fd:  # its provider answered: unparked here, under this lock
                        del self._watched[fd]
                        connection.parked_fd = None
                    owned.append(connection)
        return owned

    def take_due(self):
        """Wait until an armed (or parked) connection's deadline passes and
        own those past theirs, as ``take`` does; [] once closed. Run by the
        timekeeper alone, so a deadline (a stream's idle timeout, a retry's
        backoff) fires when it is due."""
        with self._lock:
            while not self._closed:
                now = time.monotonic()
                due = []
                while self._timers and self._timers[0][0] <= now:
                    entry = heapq.heappop(self._timers)
                    connection = entry[2]
                    if connection.timer is not entry:
                        continue  # left behind by an earlier deadline
                    connection.timer = None
                    if not connection.armed:
                        continue  # its owner gives it a deadline when it arms it again
                    if connection.deadline > now:
                        self._set_timer(connection)  # armed again since, with a later deadline
                        continue
                    connection.armed = False
                    due.append(connection)
                if due:
                    return due
                self._timer_changed.wait(self._timers[0][0] - now if self._timers else None)
            return []

    def stop(self):
        """Arm nothing more; hands over the armed connections that wait for
        their clients. Parked ones stay: their calls may finish."""
        with self._lock:
            self.stopped = True
            waiting = [c for c in self._watched.values() if c.armed and c.exchange is None]
            for connection in waiting:
                connection.armed = False
        return waiting

    def release_workers(self):
        """Wake every waiting worker for good (the drain is over)."""
        self._stop_writer.close()

    def close(self):
        with self._lock:
            self._closed = True
            self._timer_changed.notify()
        (self._epoll or self._kqueue).close()
        for sock in (self._stop_reader, self._hand_reader, self._hand_writer):
            sock.close()


class WorkerPool:
    """The threads that serve connections.

    A worker takes a readable connection, reads what arrived without
    blocking and checks the request head as it grows (sizes, deadlines,
    strict parsing). Until the head and a small body are in, the connection
    is armed again and the worker moves on, so a slow or idle client costs
    a socket, never a thread. A whole request is served at once, and the
    connection armed for the next one; a call that waits for its provider
    is parked meanwhile, and resumed by whichever worker is free when its
    provider answers (or its deadline passes).

    At most ``size`` threads: one more starts when the last waiting thread
    takes a request to serve. Threads beyond the most that were busy at
    once in the last minute or two (plus one waiting) retire, so a burst's
    threads do not outlive it. (Waiting threads are woken in turn, so "this
    thread sat idle" would never retire any under a light, steady load.)
    """

    #: How long a burst's peak keeps its threads alive.
    peak_window_seconds = 60.0
    sweep_interval = 0.25

    def __init__(self, gateway, connections, size):
        self.gateway, self.connections = gateway, connections
        self.ready = ReadinessQueue()
        self._size = size
        self._lock = threading.Lock()
        self._drained = threading.Condition(self._lock)
        self._threads = 0
        self._waiting = 0   # threads not serving a request
        self._busy = 0
        self._exchanges = 0       # requests being served, running or parked
        self._peak_busy = 0       # the most busy at once in this window
        self._last_peak = 0       # ... and in the previous one
        self._window_end = 0.0
        self._next_sweep = 0.0
        self._buffered = 0            # bytes of admitted bodies being received
        self._buffered_by_key = {}    # ... per key id
        with self._lock:
            self._start_thread()
        self._timekeeper = threading.Thread(target=self._keep_time, name="llmgw-timers", daemon=True)
        self._timekeeper.start()

    @property
    def limits(self):
        """The server settings in force (a SIGHUP reload replaces them)."""
        return self.gateway.config.server

    def _start_thread(self):
        """Start one more worker (the lock held)."""
        self._threads += 1
        self._waiting += 1
        try:
            threading.Thread(target=self._run, name="llmgw-worker", daemon=True).start()
        except RuntimeError:  # the system has no thread to spare: serve with those there are
            self._threads -= 1
            self._waiting -= 1
            logger.error("could not start a worker thread; %d serve", self._threads)

    def watch(self, connection):
        """Take a new connection from the accept loop."""
        connection.sock.setblocking(False)
        connection.deadline = time.monotonic() + self.limits.keepalive_timeout
        if not self.ready.add(connection):
            self._close(connection)

    def _run(self):
        while not (self.ready.stopped and not self._exchanges):
            connection = self.ready.take(1.0)
            if connection is not None:
                try:
                    if connection.exchange is not None:
                        self._resume(connection)
                    else:
                        self._receive(connection)
                except Exception as exc:  # a bug must cost one connection, not the server's capacity
                    logger.error("unexpected %s while serving a connection", type(exc).__name__)
                    logger.debug("traceback", exc_info=True)
                    self._close(connection)
            if self._retire():
                return
        with self._lock:
            self._waiting -= 1
            self._threads -= 1
            self._drained.notify_all()

    def _retire(self):
        """Whether this thread, now waiting, is one more than recent peaks
        needed (it then leaves the pool)."""
        now = time.monotonic()
        if now < self._window_end and (self._threads <= self._peak_busy + 1 or self._threads <= self._last_peak + 1):
            return False  # the usual answer, read without the lock (checked under it otherwise)
        with self._lock:
            if now >= self._window_end:
                self._last_peak, self._peak_busy = self._peak_busy, self._busy
                self._window_end = now + self.peak_window_seconds
            if self._threads > max(self._peak_busy, self._last_peak) + 1 and self._waiting > 1:
                self._waiting -= 1
                self._threads -= 1
                self._drained.notify_all()
                return True
            return False

    def _receive(self, connection):
        """Read what a readable connection sent, then serve every whole
        request it holds; arm it again for the rest, or close it."""
        connection.queued_since = 0.0
        try:
            data = connection.sock.recv(65536)
        except (BlockingIOError, InterruptedError):  # woken for a connection that has nothing yet
            self._arm(connection)
            return
        except OSError:
            data = b""
        if not data:
            self._close(connection)
            return
        if connection.idle:
            connection.idle = False
            connection.deadline = time.monotonic() + self.limits.header_timeout
        connection.buffer += data
        self._serve_requests(connection)

    def _serve_requests(self, connection):
        """Serve the whole requests a connection holds, one after another,
        then arm it for the next; a request whose call parks takes the
        connection with it (``_resume`` comes back here)."""
        while self._assemble(connection):
            connection.exchange = Exchange(connection, self)
            with self._lock:
                self._exchanges += 1
            if not self._advance(connection):
                return
        if connection.sock.fileno() >= 0:  # not refused
            self._arm(connection)

    def _resume(self, connection):
        """Go on with a parked call: its provider answered, or its deadline
        passed (the call then meets its timeout)."""
        self.ready.unpark(connection)
        if self._advance(connection):
            self._serve_requests(connection)

    def _arm(self, connection):
        if not self.ready.arm(connection):
            self._close(connection)

    def _assemble(self, connection):
        """True once the request is complete enough to serve; a request
        that cannot become one is answered and its connection closed."""
        limits = self.limits
        if connection.head is None:
            end = _HEAD_END.search(connection.buffer)
            head_bytes = connection.buffer if end is None else connection.buffer[:end.start()]
            error = head_error(head_bytes, limits)
            if error is not None:
                self._reject(connection, error, head_dialect(head_bytes))
                return False
            if end is None:
                return False  # refused as soon as it is wrong, served once it is whole
            del connection.buffer[:end.end()]
            try:
                connection.head = parse_request_head(head_bytes, limits.max_header_fields)
            except GatewayError as exc:
                self._reject(connection, exc, head_dialect(head_bytes))
                return False
            connection.deadline = time.monotonic() + limits.body_timeout
        head = connection.head
        wanted = head.content_length or 0
        if len(connection.buffer) >= wanted or wanted > limits.max_body_bytes:
            return True  # whole, or refused with a 413 without reading it
        if connection.admission is None and (head.expects_continue or wanted > INLINE_BODY_BYTES):
            return self._admit(connection)
        return False

    def _admit(self, connection):
        """Check a request before waiting for its large or awaited body
        (``Gateway.admit``), and make room for that body. True to serve it
        at once (not a proxied call); False while its body arrives, or once
        it was refused (its connection closed)."""
        head = connection.head
        request = Request(head.method, head.target.partition("?")[0], head.headers, head.content_length, None)
        try:
            admission = self.gateway.admit(request)
            if admission is None:
                return True
            try:
                self._make_room(admission)
            except GatewayError:
                admission.release()
                raise
        except GatewayError as exc:
            self._reject(connection, exc, dialect_for(find_route(request.path)[1], request))
            return False
        connection.admission = admission
        if head.expects_continue:
            head.expects_continue = False  # answered here, not again when served
            try:
                connection.sock.send(b"HTTP/1.1 100 Continue\r\n\r\n")
            except OSError:
                self._close(connection)
        return False

    def _make_room(self, admission):
        """Count an admitted body against ``body_buffer_bytes``, of which
        one key may fill a quarter (or hold one body, whatever its size)."""
        limit = self.limits.body_buffer_bytes
        with self._lock:
            held = self._buffered_by_key.get(admission.key_id, 0)
            if self._buffered + admission.body_bytes > limit:
                raise ServiceUnavailableError("The gateway is receiving too many large bodies; retry shortly",
                                              headers=[("retry-after", "1")])
            if held and held + admission.body_bytes > limit // 4:
                raise RateLimitError("This key is sending too many large bodies at once; retry when one is in",
                                     code="too_many_uploads", headers=[("retry-after", "1")])
            self._buffered += admission.body_bytes
            self._buffered_by_key[admission.key_id] = held + admission.body_bytes

    def release_admission(self, connection):
        """Give back what an admitted request held (its call, if one was
        made, took its request in flight over) and its body's room."""
        admission, connection.admission = connection.admission, None
        if admission is None:
            return
        admission.release()
        with self._lock:
            self._buffered -= admission.body_bytes
            held = self._buffered_by_key.pop(admission.key_id) - admission.body_bytes
            if held:
                self._buffered_by_key[admission.key_id] = held

    def _advance(self, connection):
        """Run a connection's exchange until its call parks (False) or the
        exchange ends: then True if the connection goes on to its next
        request, False if it was closed."""
        with self._lock:
            self._busy += 1
            self._waiting -= 1
            if self._busy > self._peak_busy:
                self._peak_busy = self._busy
            if self._waiting == 0 and self._threads < self._size:
                self._start_thread()  # someone must wait for the other connections
        exchange = connection.exchange
        try:
            wait = exchange.advance()
        except Exception as exc:
            logger.error("unexpected %s while serving a request", type(exc).__name__)
            logger.debug("traceback", exc_info=True)
            wait, exchange.close_connection = None, True
        finally:
            with self._lock:  # (the drain waits for threads, not for this: no notify)
                self._busy -= 1
                self._waiting += 1
        if wait is not None:
            if self.ready.park(connection, wait):
                return False
            exchange.abandon()
        connection.exchange = None
        self.release_admission(connection)
        self._end_exchange()
        if exchange.close_connection or self.ready.stopped:
            self._close(connection)
            return False
        connection.head = None
        if connection.sock.gettimeout() != 0.0:  # a write had to wait
            connection.sock.setblocking(False)
        connection.idle = not connection.buffer
        connection.deadline = time.monotonic() + (self.limits.keepalive_timeout if connection.idle
                                                  else self.limits.header_timeout)  # pipelined
        return True

    def _end_exchange(self):
        with self._lock:
            self._exchanges -= 1
            last = self.ready.stopped and not self._exchanges
        if last:
            self.ready.release_workers()

    def _reject(self, connection, error, dialect=OPENAI, outcome="refused"):
        """Answer a request no worker serves: the answer is small and the
        socket non-blocking, so a slow or broken client holds nothing."""
        try:
            connection.sock.send(closing_error_response(error, dialect))
            connection.sock.recv(INLINE_BODY_BYTES + 65536)  # unread input would turn the close into a reset
        except OSError:
            pass
        access_logger.info("- - %d outcome=%s", error.status, outcome)
        self._close(connection)

    def _close(self, connection):
        if connection.exchange is not None:  # a call never to be resumed: its row is settled now
            exchange, connection.exchange = connection.exchange, None
            exchange.abandon()
            self._end_exchange()
        self.release_admission(connection)
        self.ready.forget(connection)
        self.connections.release(connection)

    def _keep_time(self):
        """The timekeeper thread: each connection whose deadline passes, as
        it passes, is closed (quietly when idle between requests, with a
        408 when a request did not arrive in time) or, parked, handed to a
        worker, whose call then meets its timeout or ends its backoff."""
        while True:
            due = self.ready.take_due()
            if not due:
                return
            now = time.monotonic()
            for connection in due:
                self._judge_taken(connection, now)

    def sweep(self):
        """Run by the accept loop, so it goes on while every worker is busy:
        while no worker waits, answer requests that waited for one longer
        than ``queue_timeout`` with 503 + Retry-After."""
        now = time.monotonic()
        if now < self._next_sweep:
            return
        self._next_sweep = now + self.sweep_interval
        if not self._waiting:  # readable connections are waiting for a worker
            for connection in self.ready.take_ready():
                self._judge_taken(connection, now)

    def _judge_taken(self, connection, now):
        """Deal with a connection the timekeeper or the sweep took: a parked
        call goes to a worker, which resumes it; others are judged."""
        if connection.exchange is not None:
            self.ready.hand_over(connection)
            return
        try:
            self._judge(connection, now)
        except Exception as exc:  # the thread that judges must go on
            logger.error("unexpected %s judging a waiting connection", type(exc).__name__)
            logger.debug("traceback", exc_info=True)
            self._close(connection)

    def _judge(self, connection, now):
        """Arm a connection the timekeeper or the sweep took again, or
        answer and close it. A request is judged on what arrived: its clock
        starts when it is first seen waiting, and one that is whole waits
        for a worker up to ``queue_timeout``."""
        waiting = self._unread(connection)
        if waiting and connection.idle:
            connection.idle = False
            connection.deadline = now + self.limits.header_timeout
        if waiting and self._whole(connection, waiting):
            connection.queued_since = connection.queued_since or now
            if now - connection.queued_since >= self.limits.queue_timeout:
                self.gateway.count_refusal()
                self._reject(connection, ServiceUnavailableError(
                    "Every worker stayed busy for %g s; retry shortly" % self.limits.queue_timeout,
                    code="gateway_full", headers=[("retry-after", "1")]),
                    self._dialect(connection, waiting), "gateway_full")
                return
            connection.deadline = connection.queued_since + self.limits.queue_timeout
        elif connection.deadline <= now:
            if connection.idle:
                self._close(connection)
            else:
                self._reject(connection, RequestTimeoutError("The request did not arrive in time"))
            return
        self._arm(connection)

    #: How much of a waiting connection's input the sweep looks at.
    PEEK_BYTES = INLINE_BODY_BYTES + 65536

    def _unread(self, connection):
        """The bytes the kernel holds for a connection, left there."""
        try:
            return connection.sock.recv(self.PEEK_BYTES, socket.MSG_PEEK)
        except OSError:  # nothing waiting
            return b""

    def _whole(self, connection, waiting):
        """Whether buffered and unread bytes make a request a worker would
        serve, or a body arriving faster than the busy workers read it
        (more than a peek waiting: the client is not the slow one)."""
        data = connection.buffer + waiting
        if connection.head is None:
            return _HEAD_END.search(data) is not None
        return len(data) >= (connection.head.content_length or 0) or len(waiting) >= self.PEEK_BYTES

    def _dialect(self, connection, waiting):
        """The API a waiting request called, for its error's shape."""
        head = connection.head
        if head is None:
            data = connection.buffer + waiting
            end = _HEAD_END.search(data)
            try:
                head = parse_request_head(data[:end.start()], self.limits.max_header_fields)
            except GatewayError:
                return head_dialect(data)
        path = head.target.partition("?")[0]
        return dialect_for(find_route(path)[1], Request(head.method, path, head.headers, None, None))

    def in_flight(self):
        """Requests being served, running or parked."""
        with self._lock:
            return self._exchanges

    def counts(self):
        """(threads running, threads serving a request)."""
        with self._lock:
            return self._threads, self._busy

    def stop(self, drain_timeout):
        """Stop serving: requests being served, parked ones included, may
        finish (bounded by ``drain_timeout``, their deadlines kept meanwhile),
        then the workers leave. A request still waiting for a worker gets a
        503 to retry elsewhere; idle connections are closed. False if some
        request did not finish in time."""
        for connection in self.ready.stop():
            waiting = self._unread(connection)
            if waiting and self._whole(connection, waiting):
                self._reject(connection, ServiceUnavailableError("The gateway is restarting; retry",
                                                                 headers=[("retry-after", "1")]),
                             self._dialect(connection, waiting))
            else:
                self._close(connection)
        with self._lock:
            idle = not self._exchanges
        if idle:
            self.ready.release_workers()
        deadline = time.monotonic() + drain_timeout
        while True:
            with self._lock:
                remaining = deadline - time.monotonic()
                if not self._threads or remaining <= 0:
                    drained = not self._threads
                    break
                self._drained.wait(remaining)
        if drained:
            self.ready.close()
        return drained


class Exchange:
    """One request on a connection and its answer: Request in, Reply out,
    as steps a worker runs. ``advance`` runs them until the call waits for
    its provider (it returns that ProviderWait, and the pool parks the
    connection) or the answer is written (None). One write per response;
    chunked streams flushed per event."""

    def __init__(self, connection, pool):
        self.client = connection
        self.connection = connection.sock  # non-blocking until a write or a body read must wait
        self.pool, self.gateway = pool, pool.gateway
        head = connection.head
        # While draining, every answer closes its connection.
        self.close_connection = not head.keep_alive or pool.ready.stopped
        self.request_version = "HTTP/%d.%d" % head.version
        self.command = head.method
        self._steps = self._run()

    def advance(self):
        try:
            return next(self._steps)
        except StopIteration:
            return None

    def abandon(self):
        """End a call that will not be resumed: its relay settles its row."""
        self.close_connection = True
        self._steps.close()

    def _run(self):
        head = self.client.head
        started = time.monotonic()
        path, _, query = head.target.partition("?")
        send_continue = self._send_continue if head.expects_continue else None
        request = Request(head.method, path, head.headers, head.content_length, self._read_body,
                          send_continue, query, self.client.admission)
        try:
            reply = yield from self.gateway.handle(request)
        except ClientDisconnected:
            self.close_connection = True
            return
        finally:  # the body is in (its call, if any, holds the request in flight): its room is free
            self.pool.release_admission(self.client)
        if not request.body_consumed:
            self.close_connection = True  # unread body bytes would be taken for a request
        try:
            yield from self._send(reply)
        except OSError:
            self.close_connection = True
        self._log_access(request, reply, started)

    def _send_continue(self):
        self._write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def _read_body(self, length):
        state = self.client
        body = bytes(state.buffer[:length])
        del state.buffer[:length]
        if len(body) == length:
            return body
        parts = [body]
        received = len(body)
        deadline = time.monotonic() + self.gateway.config.server.body_timeout
        try:
            while received < length:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise socket.timeout()
                self.connection.settimeout(remaining)
                data = self.connection.recv(min(length - received, 1024 * 1024))
                if not data:
                    raise ClientDisconnected()
                parts.append(data)
                received += len(data)
        except socket.timeout:
            raise RequestTimeoutError("The request body did not arrive in time") from None
        except OSError:
            raise ClientDisconnected() from None
        finally:
            self.connection.setblocking(False)
        return b"".join(parts)

    def _write(self, data):
        """Send all of ``data``. While the kernel takes each write whole (the
        usual case) the socket stays non-blocking and nothing waits; a client
        that reads slowly is waited for, up to ``send_timeout``."""
        sock = self.connection
        if sock.gettimeout() == 0.0:
            try:
                sent = sock.send(data)
            except BlockingIOError:
                sent = 0
            if sent == len(data):
                return
            data = memoryview(data)[sent:]
            sock.settimeout(self.gateway.config.server.send_timeout)
        sock.sendall(data)

    def _send(self, reply):
        """Write ``reply``; a generator that passes on its stream's waits."""
        write = self._write
        if reply.stream is None:
            # One write: headers and body leave in the same segment.
            body = reply.body if self.command != "HEAD" else b""
            write(response_head(reply, "content-length: %d" % len(reply.body), self.close_connection) + body)
            return
        chunked = self.request_version == "HTTP/1.1"
        if not chunked:
            self.close_connection = True  # an HTTP/1.0 stream ends when the connection does
        stream = reply.stream
        # Events are written as soon as the stream has to wait for more: those
        # that arrived together leave in one write (the head with the first),
        # none waits for a later one, and at most RELAY_BATCH pile up.
        ready = [response_head(reply, "transfer-encoding: chunked" if chunked else None, self.close_connection)]
        try:
            for event in stream:
                if isinstance(event, ProviderWait) or len(ready) >= RELAY_BATCH:
                    if ready:
                        try:
                            write(b"".join(ready))
                        except OSError:
                            self.close_connection = True
                            try:
                                stream.throw(ClientDisconnected())
                            except (StopIteration, ClientDisconnected):
                                pass
                            return
                        ready.clear()
                    if isinstance(event, ProviderWait):
                        yield event
                        continue
                ready.append(b"%x\r\n%s\r\n" % (len(event), event) if chunked else event)
            ready.append(b"0\r\n\r\n" if chunked else b"")
            write(b"".join(ready))
        finally:
            stream.close()

    def _log_access(self, request, reply, started):
        if not access_logger.isEnabledFor(logging.INFO):
            return
        log = request.log if request is not None else {}
        secrets = self.gateway.known_secrets()
        access_logger.info(
            "%s %s %d key=%s project=%s provider=%s model=%s tokens=%s outcome=%s latency_ms=%.1f",
            self.command, redact(request.path if request is not None else "-", secrets)[:200], reply.status,
            log.get("key_id", "-"), printable(log.get("project", "-")), log.get("provider", "-"),
            redact(log.get("model") or "-", secrets)[:100], log.get("tokens", "-"), log.get("outcome", "-"),
            (time.monotonic() - started) * 1000)


#: The most stream events written together (see Exchange._send).
RELAY_BATCH = 64


def response_head(reply, framing, close):
    """The status line and header fields of ``reply``, as bytes. ``framing``
    is its Content-Length or Transfer-Encoding field; None when the body
    ends with the connection (HTTP/1.0)."""
    lines = ["HTTP/1.1 %d %s" % (reply.status, _reason(reply.status)), "server: llmgw/" + __version__]
    lines.extend("%s: %s" % header for header in reply.headers)
    if framing is not None:
        lines.append(framing)
    if close:
        lines.append("connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def closing_error_response(error, dialect=OPENAI):
    """A whole JSON error response that closes its connection, for answers
    written before a request reached the gateway (small enough for one send
    on a non-blocking socket)."""
    reply = error_reply(error, dialect)
    return response_head(reply, "content-length: %d" % len(reply.body), True) + reply.body


def _reason(status):
    try:
        return http.HTTPStatus(status).phrase
    except ValueError:
        return "Status %d" % status


# ==== 12. Server lifecycle ==================================================

class GatewayServer(http.server.ThreadingHTTPServer):
    """The listening socket and its accept loop: ThreadingHTTPServer (the
    product's server) binds, listens and runs ``serve_forever``; each
    connection it accepts is handed to section 11, which owns it from then
    on (``OpenConnections`` takes its place, ``WorkerPool.watch`` serves
    it). ThreadingHTTPServer's handler class and thread per request are not
    used: the pool's threads serve, and the loop's ``service_actions`` runs
    the pool's sweep.

    Beyond ``server.max_connections`` open connections, or when the process
    has no file descriptor left, a new one gets an immediate 503 with
    Retry-After; beyond ``max_connections_per_address`` from one client
    address, a 429 with Retry-After, so one client cannot take every place.
    ``server_close`` drains: in-flight requests and streams may finish
    within ``server.drain_timeout``.
    """

    request_queue_size = 4096  # the listen backlog; http.server's 5 drops bursts
    #: Connections taken from the backlog at one wake-up of the accept loop,
    #: at most: the sweep still runs between batches.
    accept_batch = 64

    def __init__(self, address, gateway, reuse_port=False):
        self.gateway = gateway
        self._reuse_port = reuse_port
        self.connections = OpenConnections()
        super().__init__(address, None, bind_and_activate=False)  # no handler class: the pool serves
        try:
            self.server_bind()
            self.server_activate()
        except BaseException:  # not server_close: there is nothing to drain yet
            self.socket.close()
            raise
        # Held so that a connection can still be accepted and refused when
        # every other descriptor is taken (else it would wait in the backlog).
        self._spare_fd = os.open(os.devnull, os.O_RDONLY)
        self._warned_fds_at = -math.inf
        self._accepted = 0  # connections accepted, counted by the accept loop
        self.workers = WorkerPool(gateway, self.connections, gateway.config.server.threads)
        gateway.server_gauges = self.gauges

    def server_bind(self):
        if self._reuse_port and hasattr(socket, "SO_REUSEPORT"):
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()

    def server_activate(self):
        super().server_activate()
        self.socket.setblocking(False)  # an accept finding the backlog empty ends a batch, never waits

    def _handle_request_noblock(self):
        """Take the connections waiting in the backlog when the listening
        socket is readable, up to ``accept_batch``: socketserver's step
        takes one, so a burst would cost a poll, a sweep and a wait for the
        interpreter lock per connection. Each is taken by that step (its
        error handling with it) until one finds nothing to accept."""
        for _ in range(self.accept_batch):
            accepted = self._accepted
            super()._handle_request_noblock()
            if self._accepted == accepted:
                return

    def get_request(self):
        try:
            request = self.socket.accept()
        except OSError as exc:
            if exc.errno in (errno.EMFILE, errno.ENFILE):
                self._refuse_without_fds()
            raise
        self._accepted += 1
        return request

    def _refuse_without_fds(self):
        """Out of file descriptors: accept one connection on the spare
        descriptor and refuse it, so clients learn at once, not by timeout."""
        if time.monotonic() - self._warned_fds_at > 60:
            self._warned_fds_at = time.monotonic()
            logger.warning("out of file descriptors: new connections get 503 (raise ulimit -n)")
        if self._spare_fd is not None:
            os.close(self._spare_fd)
            self._spare_fd = None
        try:
            request, _ = self.socket.accept()
        except OSError:
            pass
        else:
            self._refuse(request, ServiceUnavailableError("The gateway has no file descriptor to spare; retry shortly",
                                                          code="gateway_full", headers=[("retry-after", "1")]))
        try:
            self._spare_fd = os.open(os.devnull, os.O_RDONLY)
        except OSError:  # taken meanwhile: the next refusal tries again
            pass

    def process_request(self, request, client_address):
        try:
            request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:  # already reset by the client
            self.shutdown_request(request)
            return
        refusal = self.connections.admit(client_address[0], self.gateway.config.server)
        if refusal is not None:
            self._refuse(request, refusal)
            return
        self.workers.watch(Connection(request, client_address))

    def service_actions(self):
        self.workers.sweep()

    def gauges(self):
        """Connections and workers, for /metrics (METRICS names)."""
        threads, busy = self.workers.counts()
        return {"llmgw_connections_open": self.connections.count,
                "llmgw_connections_max": self.gateway.config.server.max_connections,
                "llmgw_worker_threads": threads, "llmgw_workers_busy": busy,
                "llmgw_calls_in_flight": self.gateway.in_flight,
                "llmgw_resident_memory_bytes": self.gateway.resident_memory.bytes(),
                "llmgw_capacity_refusals_total": self.gateway.capacity_refusals}

    def _refuse(self, request, error):
        if error.status == 503:
            self.gateway.count_refusal()
        try:
            request.setblocking(False)
            request.send(closing_error_response(error))
        except OSError:
            pass
        self.shutdown_request(request)

    def handle_error(self, request, client_address):
        exc = sys.exc_info()[1]
        logger.error("unexpected %s in the accept loop", type(exc).__name__)
        logger.debug("traceback", exc_info=True)

    def server_close(self):
        """Stop accepting, let in-flight requests finish (bounded), close."""
        super().server_close()
        if self._spare_fd is not None:
            os.close(self._spare_fd)
            self._spare_fd = None
        if not self.workers.stop(self.gateway.config.server.drain_timeout):
            logger.warning("%d request(s) still running after the drain timeout; their usage rows "
                           "will be marked interrupted at the next start", self.workers.in_flight())
        self.gateway.close()


def make_server(config, store=None, host=None, port=None, environ=None, reuse_port=False, clock=time.time):
    """A listening GatewayServer (not yet serving). Port 0 picks a free port;
    ``clock`` (wall time) is injectable for budget periods and limits."""
    if store is None:
        store = open_store(config.database, os.environ if environ is None else environ)
    gateway = Gateway(config, store, environ=environ, clock=clock)
    address = (host if host is not None else config.server.host,
               port if port is not None else config.server.port)
    try:
        return GatewayServer(address, gateway, reuse_port)
    except (OSError, OverflowError, ValueError) as exc:  # no such address, port taken, a NUL in the host
        gateway.close()
        raise ConfigError("cannot listen on %s port %s: %s" % (shown(address[0]), address[1], exc)) from None


def configure_logging(log_config):
    """Send llmgw's log lines to stderr or to ``logging.file`` (created 0600)."""
    if log_config.file:
        if not os.path.exists(log_config.file):
            os.close(os.open(log_config.file, os.O_WRONLY | os.O_CREAT, 0o600))
        handler = logging.FileHandler(log_config.file, encoding="utf-8")
    else:
        handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    logger.handlers[:] = [handler]
    logger.setLevel(log_config.level.upper())
    logger.propagate = False


def exposed_mode(path):
    """The permission bits of ``path`` if its group or others may use it, else None."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return None
    return stat.S_IMODE(mode) if mode & (stat.S_IRWXG | stat.S_IRWXO) else None


def warn_if_exposed(path):
    """Config and database should be private to their owner."""
    mode = exposed_mode(path)
    if mode is not None:
        logger.warning("%s is readable by other users (mode %o); run: chmod 600 %s", path, mode, path)


# ---- doctor: an installation's health, for ``cli.py doctor`` --------------

#: ``doctor --reach`` gives each provider host this long to connect and answer.
REACH_TIMEOUT = 5.0
#: The clock may differ this much from a provider's or the database's before doctor says so.
CLOCK_TOLERANCE = 60.0


def check_installation(config_path, db_path, environ=os.environ, reach=False, now=None):
    """Check config, file modes, the database (integrity, schema version),
    the clock and which providers have keys (never the keys); with
    ``reach``, connect to each configured provider host, sending no key.
    Returns findings (level, topic, text), level ok, warn or FAIL."""
    now = time.time() if now is None else now
    findings = []

    def note(level, topic, text):
        findings.append((level, topic, text))
    try:
        config = load_config(config_path)
        note("ok", "config", "%s is valid; providers: %s" % (config_path, ", ".join(config.providers) or "none"))
    except ConfigError as exc:
        config = None
        note("FAIL", "config", exc.message)
    files = [config_path] + [db_path + suffix for suffix in ("", "-wal", "-shm")]
    if config is not None and config.logging.file:
        files.append(config.logging.file)
    exposed = [(path, mode) for path, mode in ((path, exposed_mode(path)) for path in files) if mode is not None]
    for path, mode in exposed:
        note("FAIL", "files", "%s has mode %o: others may read it; run: chmod 600 %s" % (path, mode, path))
    if not exposed:
        note("ok", "files", "config, database and log files are private to their owner")
    if config is not None and config.database.url is not None:
        stored_keys = _check_postgres(config.database, environ, now, note)
    else:
        stored_keys = _check_database(db_path, now, note)
    if config is None:
        return findings
    for name, provider in config.providers.items():
        try:
            key, source = resolve_provider_key(provider, stored_keys, environ)
        except ConfigError as exc:
            note("FAIL", "keys", exc.message)
            continue
        if key:
            note("ok", "keys", "%s: a key from the %s" % (name, source))
        else:
            note("warn", "keys", "%s: no key; calls routed to it are refused" % name)
    for name, provider in config.providers.items() if reach else ():
        _check_reach(name, provider, now, note, environ)
    return findings


def _check_database(path, now, note):
    """Integrity, schema version and the clock against the newest usage
    row, read-only; returns the stored provider keys."""
    if not os.path.exists(path):
        note("FAIL", "database", "%s not found (run: python cli.py init)" % path)
        return {}
    try:
        conn = sqlite3.connect("file:%s?mode=ro" % urllib.parse.quote(os.path.abspath(path)), uri=True)
        try:
            integrity = conn.execute("PRAGMA quick_check").fetchone()[0]
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            newest = conn.execute("SELECT MAX(started_at) FROM usage").fetchone()[0]
            stored_keys = dict(conn.execute(ALL_PROVIDER_KEYS))
        finally:
            conn.close()
    except sqlite3.Error as exc:
        note("FAIL", "database", "cannot read %s: %s" % (path, exc))
        return {}
    note("ok" if integrity == "ok" else "FAIL", "database", "%s: quick_check %s" % (path, integrity))
    _check_schema_and_clock(version, newest, now, note)
    return stored_keys


def _check_postgres(database, environ, now, note):
    """The PostgreSQL database's schema version and the clock, read only;
    returns the stored provider keys."""
    try:
        conn = _PostgresConnection(_import_pg8000().connect(**postgres_connect_args(database, environ)))
    except ConfigError as exc:
        note("FAIL", "database", exc.message)
        return {}
    except Exception as exc:  # pg8000's errors, or the network's
        note("FAIL", "database", "cannot connect to %s: %s" % (database.url, _postgres_message(exc)))
        return {}
    try:
        rows = conn.execute(PostgresSQL.SCHEMA_VERSION_OF).fetchall()
        newest = conn.execute("SELECT MAX(started_at) FROM usage").fetchone()[0]
        stored_keys = dict(conn.execute(ALL_PROVIDER_KEYS).fetchall())
    except Exception as exc:
        note("FAIL", "database", "cannot read %s: %s (run: python cli.py init)" % (database.url, _postgres_message(exc)))
        return {}
    finally:
        conn.close()
    note("ok", "database", "%s: reachable" % database.url)
    _check_schema_and_clock(int(rows[0][0]) if rows else 0, newest, now, note)
    return stored_keys


def _check_schema_and_clock(version, newest, now, note):
    if version == SCHEMA_VERSION:
        note("ok", "schema", "version %d, current" % version)
    elif version > SCHEMA_VERSION:
        note("FAIL", "schema", "version %d is newer than this llmgw's %d: upgrade llmgw or restore a backup"
             % (version, SCHEMA_VERSION))
    else:
        note("warn", "schema", "version %d: the next gateway start migrates it to %d (back up first)"
             % (version, SCHEMA_VERSION))
    if newest is not None and newest > now + CLOCK_TOLERANCE:
        note("FAIL", "clock", "it reads %s, but usage was recorded at %s: the clock went back"
             % (iso_time(now), iso_time(newest)))
    else:
        note("ok", "clock", "%s, after the newest usage row" % iso_time(now))


def _check_reach(name, provider, now, note, environ=os.environ):
    """One HEAD request to the provider's base URL, without a key, bounded
    by REACH_TIMEOUT; its Date header checks the clock."""
    try:
        pool = provider_pool(provider, REACH_TIMEOUT, REACH_TIMEOUT, environ)
    except ConfigError as exc:  # a cloud provider without its region, a proxy or TLS file amiss
        note("FAIL", "reach", "%s: %s" % (name, exc.message))
        return
    started = time.monotonic()
    connection = None
    try:
        connection, _ = wait_out(pool.acquire(fresh=True))
        request = ("HEAD %s/ HTTP/1.1\r\nHost: %s\r\nUser-Agent: llmgw-doctor/%s\r\nConnection: close\r\n\r\n"
                   % (pool.base_path, pool.host_field, __version__)).encode("latin-1")
        response = wait_out(connection.exchange(request, "HEAD", started + REACH_TIMEOUT))
    except (OSError, http.client.HTTPException, GatewayError) as exc:
        note("FAIL", "reach", "%s: %s:%d unreachable: %s" % (name, pool.host, pool.port,
                                                            getattr(exc, "message", None) or exc))
        return
    finally:
        if connection is not None:
            connection.close()
    note("ok", "reach", "%s: %s:%d answered HTTP %d in %d ms" % (
        name, pool.host, pool.port, response.status, (time.monotonic() - started) * 1000))
    try:
        skew = now - email.utils.parsedate_to_datetime(response.getheader("date")).timestamp()
    except (TypeError, ValueError, IndexError):
        return
    if abs(skew) > CLOCK_TOLERANCE:
        note("FAIL", "clock", "%d s %s %s's clock" % (abs(skew), "ahead of" if skew > 0 else "behind", name))


def use_file_limit(server_config):
    """Raise this process's open-file limit to the most it may have: each
    call in flight holds two descriptors (client and provider), each other
    connection one. Warns when the limit cannot hold ``max_in_flight``."""
    try:
        import resource
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard == resource.RLIM_INFINITY:
            hard = 1 << 20
        if soft != resource.RLIM_INFINITY and soft < hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
    except (ImportError, ValueError, OSError):
        return
    needed = 2 * server_config.max_in_flight + 64
    if soft < needed:
        logger.warning("the open-file limit (%d) holds about %d calls in flight, fewer than server.max_in_flight "
                       "(%d); beyond it, calls get 503 (raise ulimit -n to %d)", soft, (soft - 64) // 2,
                       server_config.max_in_flight, needed)


def serve(config, host=None, port=None, processes=1):
    """Run the gateway until SIGTERM or SIGINT. With ``processes`` > 1, as
    that many processes sharing the port (SO_REUSEPORT) and the database,
    under a supervisor that passes signals on and replaces a crashed one."""
    configure_logging(config.logging)
    if processes > 1:
        _supervise(config, host, port, processes)
    else:
        _serve_process(config, host, port)


#: The signals a gateway process answers: stop (TERM, INT) and reload (HUP).
STOP_AND_RELOAD_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGINT", "SIGHUP")
                                if hasattr(signal, name))


def _supervise(config, host, port, processes):
    if not hasattr(socket, "SO_REUSEPORT") or not hasattr(os, "fork"):
        raise ConfigError("several worker processes need fork and SO_REUSEPORT (Linux, BSD, macOS)")
    if (port if port is not None else config.server.port) == 0:
        raise ConfigError("several worker processes need a fixed port")
    children = {}
    stopping = []

    def start_child():
        pid = os.fork()
        if pid == 0:
            for signum in STOP_AND_RELOAD_SIGNALS:
                signal.signal(signum, signal.SIG_DFL)
            code = 1
            try:
                _serve_process(config, host, port, reuse_port=True)
                code = 0
            except GatewayError as exc:
                logger.error("%s", exc.message)
            except BaseException:
                logger.error("gateway process failed: %s", sys.exc_info()[0].__name__)
                logger.debug("traceback", exc_info=True)
            finally:
                os._exit(code)
        children[pid] = time.monotonic()

    def forward(signum, frame):
        if signum != signal.SIGHUP:
            stopping.append(signum)
        for pid in list(children):
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass
    for signum in STOP_AND_RELOAD_SIGNALS:
        signal.signal(signum, forward)
    for _ in range(processes):
        start_child()
    logger.info("supervising %d gateway processes", processes)
    while children:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            break
        started = children.pop(pid, time.monotonic())
        if not stopping:
            logger.error("gateway process %d stopped unexpectedly (status %d); starting another", pid, status)
            if time.monotonic() - started < 1.0:
                time.sleep(1.0)  # a process that dies at once would otherwise spin
            start_child()
    logger.info("all gateway processes stopped")


def _serve_process(config, host, port, reuse_port=False):
    # The port accepts connections before the handlers below exist, so a
    # SIGTERM sent as soon as it opens would kill the process undrained:
    # hold the signals back until their handlers are installed.
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_BLOCK, STOP_AND_RELOAD_SIGNALS)
    server = make_server(config, host=host, port=port, reuse_port=reuse_port)
    use_file_limit(config.server)
    for path in (config.path, server.gateway.store.path):
        if path:
            warn_if_exposed(path)
    stop = threading.Event()

    def request_stop(signum, frame):
        if not stop.is_set():
            stop.set()
            logger.info("stopping: no new connections; draining requests in flight")
            threading.Thread(target=server.shutdown, daemon=True).start()

    def reload():
        try:
            new_config = load_config(config.path)
        except ConfigError as exc:
            logger.error("config reload refused, the running config stays: %s", exc.message)
            return
        configure_logging(new_config.logging)
        server.gateway.reload(new_config)
        server.gateway.store.audit("gateway", "config_reloaded", config.path)
        logger.info("config reloaded from %s", config.path)
    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    if hasattr(signal, "SIGHUP"):
        signal.signal(signal.SIGHUP, lambda signum, frame: threading.Thread(target=reload, daemon=True).start())
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_AND_RELOAD_SIGNALS)
    bound_host, bound_port = server.server_address[:2]
    logger.info("llmgw %s listening on http://%s:%d (providers: %s)", __version__, bound_host, bound_port,
                ", ".join(server.gateway.providers) or "none")
    try:
        server.serve_forever(poll_interval=WorkerPool.sweep_interval)
    finally:
        server.server_close()
        server.gateway.store.close()
        logger.info("llmgw stopped")


def main(argv=None):
    """``python llmgw.py``: serve with config.yaml (CONFIG_PATH) and gateway.db (DB_PATH)."""
    try:
        serve(load_config())
    except GatewayError as exc:
        print("error: %s" % exc.message, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
