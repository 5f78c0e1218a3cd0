"""config.yaml: the shipped template, validation, provider keys, start-up.

Config is checked with ``llmgw.load_config`` on files under ``tmp_path`` and
``llmgw.parse_config`` on dicts; start-up with the ``make_gateway`` fixture
and one ``python cli.py serve`` subprocess per broken config.
"""

import os

import pytest

import llmgw
from conftest import ANTHROPIC_KEY, CHAT, OPENAI_KEY, ROOT, call, post, run_cli
from fake_upstream import FakeUpstream

SHIPPED_CONFIG = os.path.join(ROOT, "config.yaml")
DELETE = object()  # with_change(path, DELETE) removes the key


def chat(model):
    return {"model": model, "messages": [{"role": "user", "content": "hello"}]}


def valid_document():
    """A small valid config document; tests break one value at a time."""
    return {
        "server": {"host": "127.0.0.1", "port": 8080},
        "providers": {
            "openai": {"base_url": "https://api.openai.com"},
            "anthropic": {"base_url": "https://api.anthropic.com"},
        },
        "logging": {"level": "INFO"},
        "rate_limits": {"default": 100, "premium": 1000},
        "pricing": {"gpt-4o": {"input": 2.5, "output": 10}},
    }


def with_change(path, value):
    """valid_document() with the value at ``path`` (a tuple of keys) set, or deleted if DELETE."""
    document = valid_document()
    *parents, last = path
    node = document
    for name in parents:
        node = node.setdefault(name, {})
    if value is DELETE:
        del node[last]
    else:
        node[last] = value
    return document


def config_error(document):
    with pytest.raises(llmgw.ConfigError) as info:
        llmgw.parse_config(document)
    return info.value


def write(tmp_path, text, name="config.yaml"):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


# ---- the shipped config.yaml ------------------------------------------------

def test_shipped_config_is_the_template_byte_for_byte():
    with open(SHIPPED_CONFIG, "rb") as f:
        assert f.read() == llmgw.CONFIG_TEMPLATE.encode("utf-8")


def test_shipped_config_loads_with_documented_defaults():
    config = llmgw.load_config(SHIPPED_CONFIG)
    assert (config.server.host, config.server.port) == ("0.0.0.0", 8000)
    assert sorted(config.providers) == ["anthropic", "openai"]
    openai, anthropic = config.providers["openai"], config.providers["anthropic"]
    assert (openai.base_url, openai.format, openai.api_key, openai.models) == (
        "https://api.openai.com", "openai", None, ())
    assert (anthropic.base_url, anthropic.format, anthropic.api_key, anthropic.models) == (
        "https://api.anthropic.com", "anthropic", None, ())
    assert config.rate_limits == {"default": 100, "premium": 1000}
    assert (config.logging.level, config.logging.file) == ("INFO", None)
    assert config.pricing == {}
    assert config.path == SHIPPED_CONFIG


def test_shipped_config_has_no_api_key_value():
    lines = [line for line in llmgw.CONFIG_TEMPLATE.splitlines() if "api_key" in line.lower()]
    assert lines, "the template should show where an api_key would go"
    for line in lines:
        assert line.lstrip().startswith("#"), line
    for line in llmgw.CONFIG_TEMPLATE.splitlines():
        assert "sk-" not in line.split("#", 1)[0], line
    config = llmgw.load_config(SHIPPED_CONFIG)
    assert all(p.api_key is None for p in config.providers.values())


def test_empty_file_gives_defaults(tmp_path):
    config = llmgw.load_config(write(tmp_path, ""))
    assert (config.server.host, config.server.port) == ("0.0.0.0", 8000)
    assert {name: p.base_url for name, p in config.providers.items()} == {
        "openai": "https://api.openai.com", "anthropic": "https://api.anthropic.com"}
    assert config.providers["anthropic"].format == "anthropic"
    assert config.rate_limits == {"default": 100, "premium": 1000}


def test_yaml_values_are_typed(tmp_path):
    config = llmgw.load_config(write(tmp_path, """\
server: {host: 127.0.0.1, port: 9000, send_timeout: 5, max_body_bytes: 1024}
providers:
  local-llm:
    base_url: http://127.0.0.1:11434/
    format: openai
    models: ["llama-*", "qwen*"]
    api_key: ${LOCAL_KEY}
logging: {level: debug, file: gw.log}
rate_limits: {default: 10, gold: 20}
pricing:
  llama-3: {input: 0.1, output: 0.2, cached_input: null}
"""))
    assert config.server.port == 9000
    assert config.server.send_timeout == 5.0 and isinstance(config.server.send_timeout, float)
    assert config.server.max_body_bytes == 1024
    provider = config.providers["local-llm"]
    assert provider == llmgw.ProviderConfig("local-llm", "http://127.0.0.1:11434", "openai",
                                            "${LOCAL_KEY}", ("llama-*", "qwen*"))
    assert list(config.providers) == ["local-llm"]
    assert (config.logging.level, config.logging.file) == ("debug", "gw.log")
    assert config.rate_limits == {"default": 10, "premium": 1000, "gold": 20}
    assert config.pricing == {"llama-3": {"input": 0.1, "output": 0.2, "cached_input": None}}


# ---- validation ---------------------------------------------------------------

SECRET = "sk-SECRETVALUE-0123456789"

INVALID = [
    # (id, document, substrings the message must contain)
    ("unknown section", dict(valid_document(), proxies={}), ["proxies"]),
    ("config not a mapping", ["server"], ["config"]),
    ("server unknown key", with_change(("server", "hostname"), "x"), ["server", "hostname"]),
    ("server not a mapping", with_change(("server",), "0.0.0.0:8000"), ["server"]),
    ("port string", with_change(("server", "port"), "abc"), ["server.port"]),
    ("port bool", with_change(("server", "port"), True), ["server.port"]),
    ("port float", with_change(("server", "port"), 80.5), ["server.port"]),
    ("port too big", with_change(("server", "port"), 70000), ["server.port"]),
    ("port negative", with_change(("server", "port"), -1), ["server.port"]),
    ("host not a string", with_change(("server", "host"), 127), ["server.host"]),
    ("timeout zero", with_change(("server", "send_timeout"), 0), ["server.send_timeout"]),
    ("timeout nan", with_change(("server", "upstream_timeout"), float("nan")), ["server.upstream_timeout"]),
    ("max_connections negative", with_change(("server", "max_connections"), -5), ["server.max_connections"]),
    ("providers not a mapping", with_change(("providers",), ["openai"]), ["providers"]),
    ("provider not a mapping", with_change(("providers", "openai"), "https://api.openai.com"),
     ["providers.openai"]),
    ("provider unknown key", with_change(("providers", "openai", "url"), "https://x"), ["providers.openai", "url"]),
    ("provider name uppercase", with_change(("providers", "OpenAI"), {"base_url": "https://x.example"}),
     ["OpenAI"]),
    ("provider name with newline", with_change(("providers", "openai\n"), {"base_url": "https://x.example"}),
     ["providers"]),
    ("provider without base_url", with_change(("providers", "openai", "base_url"), DELETE),
     ["providers.openai.base_url"]),
    ("base_url empty", with_change(("providers", "openai", "base_url"), ""), ["providers.openai.base_url"]),
    ("base_url not a string", with_change(("providers", "openai", "base_url"), 42), ["providers.openai.base_url"]),
    ("base_url ftp", with_change(("providers", "openai", "base_url"), "ftp://api.openai.com"),
     ["providers.openai.base_url"]),
    ("base_url empty host label", with_change(("providers", "openai", "base_url"), "https://api..example"),
     ["providers.openai.base_url", "bad host"]),
    ("base_url no scheme", with_change(("providers", "openai", "base_url"), "api.openai.com"),
     ["providers.openai.base_url"]),
    ("base_url no host", with_change(("providers", "openai", "base_url"), "https:///v1"),
     ["providers.openai.base_url"]),
    ("base_url credentials", with_change(("providers", "openai", "base_url"), "https://user:pw@api.openai.com"),
     ["providers.openai.base_url"]),
    ("base_url query", with_change(("providers", "openai", "base_url"), "https://api.openai.com/v1?key=1"),
     ["providers.openai.base_url"]),
    ("base_url fragment", with_change(("providers", "openai", "base_url"), "https://api.openai.com/#x"),
     ["providers.openai.base_url"]),
    ("base_url bad port", with_change(("providers", "openai", "base_url"), "https://api.openai.com:99999"),
     ["providers.openai.base_url"]),
    ("bad format", with_change(("providers", "openai", "format"), "grpc"), ["providers.openai.format"]),
    ("format not a string", with_change(("providers", "openai", "format"), ["openai"]),
     ["providers.openai.format"]),
    ("models not a list", with_change(("providers", "anthropic", "models"), "claude-*"),
     ["providers.anthropic.models"]),
    ("models item not a string", with_change(("providers", "anthropic", "models"), ["claude-*", 3]),
     ["providers.anthropic.models"]),
    ("logging unknown key", with_change(("logging", "format"), "json"), ["logging", "format"]),
    ("logging level bad", with_change(("logging", "level"), "LOUD"), ["logging.level"]),
    ("logging level not a string", with_change(("logging", "level"), 10), ["logging.level"]),
    ("logging file not a string", with_change(("logging", "file"), ["a.log"]), ["logging.file"]),
    ("rate limit zero", with_change(("rate_limits", "default"), 0), ["rate_limits.default"]),
    ("rate limit string", with_change(("rate_limits", "premium"), "lots"), ["rate_limits.premium"]),
    ("rate limit bool", with_change(("rate_limits", "premium"), True), ["rate_limits.premium"]),
    ("pricing not a mapping", with_change(("pricing",), ["gpt-4o"]), ["pricing"]),
    ("pricing entry not a mapping", with_change(("pricing", "gpt-4o"), 2.5), ["pricing.gpt-4o"]),
    ("pricing unknown key", with_change(("pricing", "gpt-4o", "cached"), 1.25), ["pricing.gpt-4o", "cached"]),
    ("pricing missing output", with_change(("pricing", "gpt-4o", "output"), DELETE), ["pricing.gpt-4o.output"]),
    ("pricing missing input", with_change(("pricing", "gpt-4o", "input"), DELETE), ["pricing.gpt-4o.input"]),
    ("negative price", with_change(("pricing", "gpt-4o", "input"), -1), ["pricing.gpt-4o.input"]),
    ("negative cache price", with_change(("pricing", "gpt-4o", "cache_write_1h"), -0.5),
     ["pricing.gpt-4o.cache_write_1h"]),
    ("price string", with_change(("pricing", "gpt-4o", "output"), "10$"), ["pricing.gpt-4o.output"]),
    ("price bool", with_change(("pricing", "gpt-4o", "output"), True), ["pricing.gpt-4o.output"]),
    ("price nan", with_change(("pricing", "gpt-4o", "input"), float("nan")), ["pricing.gpt-4o.input"]),
    ("price infinite", with_change(("pricing", "gpt-4o", "output"), float("inf")), ["pricing.gpt-4o.output"]),
]


@pytest.mark.parametrize("document, expected", [case[1:] for case in INVALID], ids=[case[0] for case in INVALID])
def test_invalid_config_is_one_clear_line(document, expected):
    error = config_error(document)
    assert str(error) == error.message
    assert "\n" not in error.message and "\r" not in error.message, repr(error.message)
    for text in expected:
        assert text in error.message, (text, error.message)


def test_base_url_credentials_are_not_echoed():
    error = config_error(with_change(("providers", "openai", "base_url"), "https://user:pw-SECRET@api.openai.com"))
    assert "pw-SECRET" not in error.message


@pytest.mark.parametrize("bad_key", [
    SECRET + "\n", SECRET + " ", " " + SECRET, SECRET[:10] + " " + SECRET[10:], SECRET + "\r\n",
    SECRET + "\t", SECRET + "\x00", SECRET + "\x7f", "",
], ids=["trailing newline", "trailing space", "leading space", "inner space", "crlf", "tab", "nul", "del",
        "empty"])
def test_literal_api_key_with_whitespace_names_provider_not_key(bad_key):
    error = config_error(with_change(("providers", "openai", "api_key"), bad_key))
    assert "openai" in error.message
    assert "\n" not in error.message
    assert "SECRETVALUE" not in error.message and "0123456789" not in error.message


@pytest.mark.parametrize("bad_key", [1234567890123456, ["sk-SECRETVALUE-0123456789"],
                                     {"value": "sk-SECRETVALUE-0123456789"}], ids=["int", "list", "mapping"])
def test_api_key_of_wrong_type_is_not_echoed(bad_key):
    error = config_error(with_change(("providers", "openai", "api_key"), bad_key))
    assert "providers.openai.api_key" in error.message
    assert "SECRETVALUE" not in error.message and "1234567890123456" not in error.message, error.message


def test_yaml_block_scalar_key_slip_is_refused(tmp_path):
    # "api_key: |" keeps the trailing newline: the classic way a key grows a "\n".
    path = write(tmp_path, "providers:\n  openai:\n    base_url: https://api.openai.com\n"
                           "    api_key: |\n      %s\n" % SECRET)
    with pytest.raises(llmgw.ConfigError) as info:
        llmgw.load_config(path)
    assert "openai" in info.value.message and "SECRETVALUE" not in info.value.message


@pytest.mark.parametrize("text, expected", [
    ("server: {port: abc}\n", "server.port"),
    ("server: {port: true}\n", "server.port"),
    ("server: {port: 8000}\nserverr: {}\n", "serverr"),
    ("providers:\n  openai: {base_url: 'ftp://x'}\n", "providers.openai.base_url"),
    ("providers:\n  anthropic: {base_url: 'https://api.anthropic.com', format: claude}\n",
     "providers.anthropic.format"),
    ("providers:\n  anthropic: {base_url: 'https://api.anthropic.com', models: claude-*}\n",
     "providers.anthropic.models"),
    ("pricing:\n  my-model: {input: .nan, output: 1}\n", "pricing.my-model.input"),
    ("logging: {level: verbose}\n", "logging.level"),
], ids=["port abc", "port true", "unknown section", "bad scheme", "bad format", "models string", "nan price",
        "bad level"])
def test_invalid_yaml_values(tmp_path, text, expected):
    with pytest.raises(llmgw.ConfigError) as info:
        llmgw.load_config(write(tmp_path, text))
    assert expected in info.value.message
    assert "\n" not in info.value.message


@pytest.mark.parametrize("text", [
    "server: {port: 8000\n",
    "providers:\n  openai:\n    base_url: https://x\n   bad: indent\n",
    "server:\n\tport: 8000\n",
    "a: b: c\n",
], ids=["unclosed brace", "bad indent", "tab", "nested colon"])
def test_invalid_yaml(tmp_path, text):
    path = write(tmp_path, text)
    with pytest.raises(llmgw.ConfigError) as info:
        llmgw.load_config(path)
    assert path in info.value.message and "YAML" in info.value.message
    assert "\n" not in info.value.message


def test_non_utf8_file(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_bytes(b"server: {host: \xff\xfe}\n")
    with pytest.raises(llmgw.ConfigError) as info:
        llmgw.load_config(str(path))
    assert str(path) in info.value.message and "\n" not in info.value.message


def test_missing_file_points_to_init(tmp_path):
    path = str(tmp_path / "nowhere.yaml")
    with pytest.raises(llmgw.ConfigError) as info:
        llmgw.load_config(path)
    assert path in info.value.message and "cli.py init" in info.value.message


def test_config_path_from_environment(tmp_path):
    path = write(tmp_path, "server: {port: 8123}\n", name="custom.yaml")
    assert llmgw.config_path_from_env({"CONFIG_PATH": path}) == path
    assert llmgw.config_path_from_env({}) == "config.yaml"
    assert llmgw.load_config(llmgw.config_path_from_env({"CONFIG_PATH": path})).server.port == 8123


def test_config_is_frozen():
    config = llmgw.parse_config(valid_document())
    with pytest.raises(Exception):
        config.server.port = 1
    with pytest.raises(Exception):
        config.providers["openai"].base_url = "https://evil.example"


# ---- base_url ------------------------------------------------------------------

@pytest.mark.parametrize("url, expected", [
    ("https://api.mistral.ai", "https://api.mistral.ai"),
    ("https://api.mistral.ai/", "https://api.mistral.ai"),
    ("https://api.deepseek.com/v1///", "https://api.deepseek.com/v1"),
    ("http://127.0.0.1:11434/v1", "http://127.0.0.1:11434/v1"),
    ("https://[::1]:8443", "https://[::1]:8443"),
])
def test_edited_base_url_is_used(url, expected):
    document = with_change(("providers", "openai", "base_url"), url)
    config = llmgw.parse_config(document)
    assert config.providers["openai"].base_url == expected
    assert config.providers["anthropic"].base_url == "https://api.anthropic.com"


@pytest.mark.parametrize("url, host_field", [
    ("https://api.mistral.ai", "api.mistral.ai"),
    ("http://127.0.0.1:11434/v1", "127.0.0.1:11434"),
    ("https://[::1]:8443", "[::1]:8443"),
    ("https://[::1]:443", "[::1]"),
    ("http://bücher.example:80/v1", "xn--bcher-kva.example"),
])
def test_host_field_is_written_as_http_client_would(url, host_field):
    """The Host field sent upstream: default ports left out, IPv6 in
    brackets, international names in IDNA (ASCII) form."""
    pool = llmgw.UpstreamPool(llmgw.parse_config(with_change(("providers", "openai", "base_url"), url))
                              .providers["openai"].base_url, 1, 1)
    assert pool.host_field == host_field


def test_edited_base_url_takes_effect_end_to_end(make_gateway, upstream):
    with FakeUpstream().start() as other:
        gateway = make_gateway(providers={"openai": {"base_url": other.url + "/", "api_key": OPENAI_KEY}})
        key = gateway.create_key()[1]
        response = post(gateway, CHAT, chat("gpt-4o"), key=key)
        assert response.status == 200, response.body
        assert [r["path"] for r in other.requests] == [CHAT]
        assert other.requests[0]["headers"]["authorization"] == "Bearer " + OPENAI_KEY
        assert upstream.requests == []


def test_anthropic_format_defaults_by_name():
    config = llmgw.parse_config({"providers": {
        "anthropic": {"base_url": "https://api.anthropic.com"},
        "openai": {"base_url": "https://api.openai.com"},
        "mistral": {"base_url": "https://api.mistral.ai"},
        "claude-proxy": {"base_url": "https://proxy.example", "format": "anthropic"},
    }})
    assert {name: p.format for name, p in config.providers.items()} == {
        "anthropic": "anthropic", "openai": "openai", "mistral": "openai", "claude-proxy": "anthropic"}


# ---- provider key precedence -----------------------------------------------------

def provider(name="openai", api_key=None):
    entry = {"base_url": "https://api.example.com"}
    if api_key is not None:
        entry["api_key"] = api_key
    return llmgw.parse_config({"providers": {name: entry}}).providers[name]


CONFIG_KEY, REF_KEY, DB_KEY, ENV_KEY = "sk-config-1111", "sk-ref-2222", "sk-db-3333", "sk-env-4444"


@pytest.mark.parametrize("api_key, stored, environ, expected", [
    (CONFIG_KEY, {"openai": DB_KEY}, {"MY_REF": REF_KEY, "OPENAI_API_KEY": ENV_KEY}, (CONFIG_KEY, "config")),
    ("${MY_REF}", {"openai": DB_KEY}, {"MY_REF": REF_KEY, "OPENAI_API_KEY": ENV_KEY}, (REF_KEY, "config")),
    ("${MY_REF}", {"openai": DB_KEY}, {"OPENAI_API_KEY": ENV_KEY}, (DB_KEY, "database")),
    ("${MY_REF}", {"openai": DB_KEY}, {"MY_REF": "", "OPENAI_API_KEY": ENV_KEY}, (DB_KEY, "database")),
    ("${MY_REF}", {}, {"OPENAI_API_KEY": ENV_KEY}, (ENV_KEY, "environment")),
    (None, {"openai": DB_KEY}, {"OPENAI_API_KEY": ENV_KEY}, (DB_KEY, "database")),
    (None, {"anthropic": DB_KEY}, {"OPENAI_API_KEY": ENV_KEY}, (ENV_KEY, "environment")),
    (None, {}, {"OPENAI_API_KEY": ENV_KEY}, (ENV_KEY, "environment")),
    (None, {}, {"OPENAI_API_KEY": ""}, (None, None)),
    (None, {}, {"openai_api_key": ENV_KEY, "ANTHROPIC_API_KEY": ENV_KEY}, (None, None)),
    ("${MY_REF}", {}, {}, (None, None)),
], ids=["literal beats all", "env reference beats db", "unset reference falls to db",
        "empty reference falls to db", "unset reference falls to env", "db beats env", "other provider's db key",
        "env only", "empty env", "wrong env names", "nothing"])
def test_provider_key_precedence(api_key, stored, environ, expected):
    assert llmgw.resolve_provider_key(provider("openai", api_key), stored, environ) == expected


@pytest.mark.parametrize("name, variable", [
    ("my-provider", "MY_PROVIDER_API_KEY"),
    ("local_llm", "LOCAL_LLM_API_KEY"),
    ("a-b-c2", "A_B_C2_API_KEY"),
])
def test_provider_env_variable_name(name, variable):
    assert llmgw.resolve_provider_key(provider(name), {}, {variable: ENV_KEY}) == (ENV_KEY, "environment")
    assert llmgw.resolve_provider_key(provider(name), {}, {name.upper() + "_API_KEY": ENV_KEY}) == (
        (ENV_KEY, "environment") if "-" not in name else (None, None))


@pytest.mark.parametrize("api_key, stored, environ", [
    (None, {}, {"OPENAI_API_KEY": SECRET + "\n"}),
    (None, {}, {"OPENAI_API_KEY": SECRET + " x"}),
    (None, {"openai": SECRET + "\n"}, {"OPENAI_API_KEY": ENV_KEY}),
    (None, {"openai": " " + SECRET}, {}),
    ("${MY_REF}", {"openai": DB_KEY}, {"MY_REF": SECRET + "\r\n"}),
], ids=["env newline", "env space", "db newline beats valid env", "db leading space", "reference newline"])
def test_invalid_key_from_env_or_db_is_refused_without_echo(api_key, stored, environ):
    with pytest.raises(llmgw.ConfigError) as info:
        llmgw.resolve_provider_key(provider("openai", api_key), stored, environ)
    assert "openai" in info.value.message
    assert "SECRETVALUE" not in info.value.message and "0123456789" not in info.value.message
    assert "\n" not in info.value.message


def test_env_reference_is_not_checked_as_a_literal():
    assert provider("openai", "${OPENAI_KEY_REF}").api_key == "${OPENAI_KEY_REF}"
    # Not a reference (spaces): a literal with whitespace, refused at load time.
    with pytest.raises(llmgw.ConfigError):
        provider("openai", "${ NOT_A_REF }")


# ---- mask_secret ---------------------------------------------------------------

@pytest.mark.parametrize("length", list(range(0, 41)) + [64, 200])
def test_mask_secret_reveals_at_most_prefix3_and_last4(length):
    secret = "".join(chr(ord("A") + i % 26) + str(i % 10) for i in range(length))[:length]
    masked = llmgw.mask_secret(secret)
    if not secret:
        assert masked == ""
        return
    assert "..." in masked
    head, _, tail = masked.partition("...")
    assert len(head) <= 3 and len(tail) <= 4
    assert secret.startswith(head) and secret.endswith(tail)
    if length <= 8:
        assert masked == "...", masked
    elif length <= 12:
        assert head == "" and len(tail) <= 4, masked
    else:
        assert (head, tail) == (secret[:3], secret[-4:])


def test_mask_secret_examples():
    assert llmgw.mask_secret(OPENAI_KEY) == "sk-...cdef"
    assert llmgw.mask_secret(ANTHROPIC_KEY) == "sk-...cdef"
    assert llmgw.mask_secret(None) == ""


# ---- start-up ----------------------------------------------------------------------

def test_gateway_accepts_a_full_valid_config(make_gateway, upstream):
    gateway = make_gateway(
        environ={"LOCAL_LLM_API_KEY": "sk-local-5555"},
        server={"max_connections": 64, "max_body_bytes": 65536, "send_timeout": 5,
                "upstream_connect_timeout": 2, "upstream_timeout": 10, "request_deadline": 30},
        providers={"local-llm": {"base_url": upstream.url, "format": "openai", "models": ["llama-*"]}},
        logging={"level": "WARNING"},
        rate_limits={"default": 50, "gold": 5000},
        pricing={"llama-3": {"input": 0.1, "output": 0.2}, "gpt-4o": {"input": 1, "output": 2}},
    )
    assert call_ok(gateway, "/health")
    key = gateway.create_key(tier="gold")[1]
    for model, credential in (("gpt-4o", OPENAI_KEY), ("llama-3", "sk-local-5555")):
        response = post(gateway, CHAT, chat(model), key=key)
        assert response.status == 200, response.body
        assert upstream.requests[-1]["headers"]["authorization"] == "Bearer " + credential
    rows = gateway.wait_for_rows(lambda rows: len(rows) == 2 and all(r["status"] != "pending" for r in rows))
    assert [(r["provider"], r["status"], r["http_status"]) for r in rows] == [
        ("openai", "ok", 200), ("local-llm", "ok", 200)]


def call_ok(gateway, path):
    response = call(gateway, "GET", path)
    return response.status == 200 and response.json()["status"] == "ok"


@pytest.mark.parametrize("text, expected", [
    ("providers:\n  openai: {base_url: 'ftp://api.openai.com'}\n", "providers.openai.base_url"),
    ("providers:\n  openai: {base_url: 'https://api.openai.com', api_key: \"%s \"}\n" % OPENAI_KEY, "openai"),
    (None, "cli.py init"),
], ids=["bad base_url", "key with space", "missing file"])
def test_cli_serve_refuses_invalid_config(tmp_path, text, expected):
    config_path = tmp_path / "config.yaml"
    if text is not None:
        config_path.write_text(text, encoding="utf-8")
    env = {"CONFIG_PATH": str(config_path), "DB_PATH": str(tmp_path / "gateway.db")}
    result = run_cli(["serve", "--port", "0"], cwd=tmp_path, env=env, timeout=20)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    assert expected in lines[0]
    assert "CANARY" not in result.stderr + result.stdout
    assert "Traceback" not in result.stderr
