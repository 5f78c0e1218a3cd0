"""Bad input on the management side: the admin API, cli.py, config.yaml, price packs.

Every wrong value gets a clear answer naming its field and the allowed
range: a 400 JSON error on /admin/ (``param`` names the field), or one line
``error: ...`` and exit status 1 from the CLI. Never a 500 or a traceback,
the gateway keeps serving, and nothing is written.

The first half is a seeded, bounded randomized test (the standard library's
``random``, a few seconds): arbitrary JSON values of every type for each
admin route's fields, each CLI flag, each config key and each price-pack
field. A validity rule per field, written here from the documented limits,
keeps the values that must be refused. The second half holds one regression
test per case the fuzzing found.
"""

import dataclasses
import datetime
import decimal
import json
import random
import re
import string
import urllib.parse

import pytest
import yaml

from conftest import (ADMIN_TOKEN, CHAT, admin, assert_still_serving, base_config, body_for, call, paths_env, post,
                      query, run_cli)

import llmgw

pytestmark = pytest.mark.usefixtures("clean_environment")

SEED = 16
TRIES = 40          # random values drawn per admin field and config key (the valid ones are dropped)
CLI_TRIES = 6       # ... per CLI flag and price-pack field: each is a whole command
CLI_CONFIG_TRIES = 3  # refused config values also run through config.yaml and the CLI, per key
DAY = 86400


# ---- arbitrary JSON values ---------------------------------------------------------------

class Raw:
    """A number JSON text can spell but ``json.dumps`` cannot: 1e999, NaN."""

    def __init__(self, text, value):
        self.text, self.value = text, value

    def __repr__(self):
        return self.text


INFINITY, NEG_INFINITY, NAN = Raw("1e999", float("inf")), Raw("-1e999", float("-inf")), Raw("NaN", float("nan"))
NUMBERS = [0, 1, -1, 2, 7, 100, 0.5, -0.0, 1e-320, 1.5, -2.5, 1e308, -1e308, 65535, 65536, 2 ** 31 - 1, 2 ** 31,
           10 ** 6 + 1, 10 ** 9 + 1, 10 ** 12 + 1, 2 ** 63, 2 ** 64, -2 ** 63 - 1, 10 ** 400, -10 ** 400, 10 ** 4000,
           INFINITY, NEG_INFINITY, NAN]
TEXTS = ["", " ", "none", "null", "true", "0", "-1", "1.5", "1e999", "NaN", "-Infinity", "9" * 400, "1_0",
         "10000-01-01", "0000-01-01", "2026-13-01", "2026-02-30", "2026-01-01T24:00", "9999-12-31T23:59:59-05:00",
         "yesterday", "30", "30x", "-5d", "1000000000000w", "99999999999d", "5 d", "default ", "DAILY",
         "monthly\n", "gpt-4o\x00", "\ud800", "x" * 201, "label:", "label:bad name!", "a=b", "${HOME}", "ftp://x",
         "http://", "\u202e", "\u00e9", "\U0001f642"]
ALPHABET = string.ascii_letters + string.digits + " -_:.+,=/TZ" + "\x00\x1f\x7f\u00e9\u2028\ud800\U0001f642"


def random_text(rng):
    return "".join(rng.choice(ALPHABET) for _ in range(rng.randrange(12)))


def random_value(rng, depth=0):
    """A JSON value of a random type: null, bool, number, text, list or object."""
    kind = rng.randrange(8 if depth < 2 else 6)
    if kind == 0:
        return None
    if kind == 1:
        return rng.random() < 0.5
    if kind == 2:
        return rng.choice(NUMBERS)
    if kind == 3:
        return rng.randint(-10 ** 6, 10 ** 6) if rng.random() < 0.5 else rng.uniform(-1e6, 1e6)
    if kind == 4:
        return rng.choice(TEXTS)
    if kind == 5:
        return random_text(rng)
    if kind == 6:
        return [random_value(rng, depth + 1) for _ in range(rng.randrange(4))]
    return {random_text(rng): random_value(rng, depth + 1) for _ in range(rng.randrange(4))}


def to_json(value):
    """JSON text of ``value``; a Raw number is written as it is spelt."""
    if isinstance(value, Raw):
        return value.text
    if isinstance(value, list):
        return "[%s]" % ", ".join(to_json(item) for item in value)
    if isinstance(value, dict):
        return "{%s}" % ", ".join("%s: %s" % (json.dumps(name), to_json(item)) for name, item in value.items())
    return json.dumps(value)


def plain(value):
    """``value`` as a JSON parser returns it (Raw numbers become floats)."""
    if isinstance(value, Raw):
        return value.value
    if isinstance(value, list):
        return [plain(item) for item in value]
    if isinstance(value, dict):
        return {name: plain(item) for name, item in value.items()}
    return value


def not_json_text(value):
    """True if ``value`` holds NaN or a lone surrogate: no JSON text (RFC 8259),
    so a gateway refuses the whole body before reading any field."""
    if isinstance(value, str):
        return any(0xD800 <= ord(ch) <= 0xDFFF for ch in value)
    if isinstance(value, list):
        return any(map(not_json_text, value))
    if isinstance(value, dict):
        return any(map(not_json_text, value)) or any(map(not_json_text, value.values()))
    return value is NAN


def as_text(value):
    """A value as a command-line argument: text as is, anything else as JSON."""
    return value if isinstance(value, str) else to_json(value)


def invalid_values(rng, valid, extra=(), tries=TRIES):
    """Up to ``tries`` random values (plus ``extra``) that ``valid`` refuses."""
    values = list(extra) + [random_value(rng) for _ in range(tries)]
    return [value for value in values if not valid(value)]


# ---- what each field accepts (the documented rules) ------------------------------------

def integer_in(low, high):
    return lambda v: isinstance(plain(v), int) and not isinstance(v, bool) and low <= v <= high


def number_in(low, high):
    # NaN fails both comparisons; an integer compares exactly however large.
    return lambda v: isinstance(plain(v), (int, float)) and not isinstance(v, bool) and low <= plain(v) <= high


def optional(rule):
    return lambda v: v is None or rule(v)


def one_of(*choices):
    return lambda v: isinstance(v, str) and v in choices


def is_text(v, blank_ok=False, max_length=200):
    return (isinstance(v, str) and (blank_ok or bool(v.strip())) and len(v) <= max_length
            and not any(ord(ch) < 0x20 or ord(ch) == 0x7F or 0xD800 <= ord(ch) <= 0xDFFF for ch in v))


def is_duration(v):
    match = isinstance(v, str) and re.fullmatch(r"([0-9]{1,12})([smhdw])", v.strip())
    return bool(match) and int(match.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": DAY, "w": 7 * DAY}[
        match.group(2)] <= 100 * 366 * DAY


def is_time(v):
    if not isinstance(v, str):
        return False
    try:
        if len(v) == 10:
            datetime.datetime.strptime(v, "%Y-%m-%d")
        else:
            datetime.datetime.fromisoformat(v.replace("Z", "+00:00"))
    except ValueError:
        return False
    return True


def is_models(v):
    if isinstance(v, str):
        v = [glob.strip() for glob in v.split(",") if glob.strip()]
    return isinstance(v, list) and bool(v) and all(is_text(glob) for glob in v)


def is_metadata(v):
    return isinstance(v, dict) and all(re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", name) and is_text(value, blank_ok=True)
                                       for name, value in v.items())


def is_thresholds(v):
    """Budget alert percentages: a non-empty list of integers from 1 to
    1000, or text of them separated by commas."""
    if isinstance(v, str):
        return all(spells(integer_in(1, 1000))(part.strip()) for part in v.split(","))
    return isinstance(v, list) and bool(v) and all(integer_in(1, 1000)(item) for item in v)


POLICY_RULES = {
    "tier": one_of("default", "premium"),
    "rpm": optional(integer_in(1, 10 ** 12)),
    "tpm": optional(integer_in(1, 10 ** 12)),
    "max_parallel": optional(integer_in(1, 10 ** 12)),
    "max_budget": optional(number_in(0, 10 ** 9)),
    "budget_period": one_of("daily", "weekly", "monthly", "never"),
    "expires_in": optional(is_duration),
    "expires_at": optional(is_time),
    "models": optional(is_models),
    "metadata": optional(is_metadata),
    "log_bodies": lambda v: isinstance(v, bool),
    "alert_thresholds": optional(is_thresholds),
}


def spells(rule):
    """Text that spells a number (as int() or float() read it) the rule takes."""
    def valid(text):
        for convert in (int, float):
            try:
                return rule(convert(text))
            except ValueError:
                pass
        return False
    return valid


def is_group(v):
    return v in ("key", "project", "model", "provider", "day") or bool(re.fullmatch(r"label:[A-Za-z0-9_.-]{1,64}", v))


def is_cursor(v):
    match = re.fullmatch(r"[0-9]{1,12}(?:\.[0-9]{1,20})?:([0-9]{1,19})", v)
    return bool(match) and int(match.group(1)) < 2 ** 63


#: GET routes' query fields (text) and what each accepts.
QUERY_RULES = {
    "/admin/usage-stats": {"by": is_group, "since": is_time, "until": is_time, "format": one_of("json", "csv")},
    "/admin/logs": {"since": is_time, "until": is_time, "limit": spells(integer_in(1, 1000)), "cursor": is_cursor,
                    "format": one_of("json", "csv")},
}


def usd_is_positive(v):
    return number_in(0, 10 ** 9)(v) and int(decimal.Decimal(str(plain(v))) * 10 ** 9) > 0


# ---- the database, before and after ------------------------------------------------------

#: Every table an administrative action writes (not the processes' own bookkeeping).
WRITTEN_TABLES = ("virtual_keys", "key_spend", "provider_keys", "settings", "audit_log", "prices", "usage")


def snapshot(gateway):
    """The rows of WRITTEN_TABLES in ``gateway``'s database."""
    return {table: query(gateway, "SELECT * FROM %s ORDER BY 1" % table) for table in WRITTEN_TABLES}


def assert_admin_refusal(reply, field, value):
    """400, invalid_request, the field in ``param`` and in the message."""
    assert reply.status == 400, (field, value, reply)
    error = reply.json()["error"]
    assert (error["type"], error["code"]) == ("invalid_request_error", "invalid_request"), (field, value, error)
    if not_json_text(value):
        assert error["param"] is None and "body" in error["message"], error
        return
    assert error["param"] is not None and error["param"].startswith(field), (field, value, error)
    assert field in error["message"], (field, value, error)


def assert_cli_refusal(result, names, value):
    """Exit status 1, nothing on stdout, one ``error:`` line naming the field."""
    lines = result.stderr.splitlines()
    assert (result.returncode, result.stdout, len(lines)) == (1, "", 1), (names, value, result)
    assert lines[0].startswith("error: ") and "Traceback" not in result.stderr, (names, value, result)
    assert any(name in lines[0] for name in names), (names, value, lines[0])


# ---- the admin API, fuzzed ------------------------------------------------------------------

@pytest.fixture
def admin_gateway(make_gateway):
    return make_gateway(environ={"LLMGW_ADMIN_TOKEN": ADMIN_TOKEN})


def send_json(gateway, method, path, fields):
    return call(gateway, method, path, raw_body=to_json(fields).encode(),
                headers={"Authorization": "Bearer " + ADMIN_TOKEN})


def test_admin_fields_fuzzed(admin_gateway, upstream):
    gateway, rng = admin_gateway, random.Random(SEED)
    budgeted, _ = gateway.create_key("budgeted", max_budget=5)
    vkey = gateway.create_key("plain")[1]
    key_path = "/admin/virtual-keys/%s" % budgeted["id"]
    before = snapshot(gateway)
    checked = 0
    for value in invalid_values(rng, is_text, [{"t": "x"}, ["p"], 10 ** 400, "\ud800", NAN]):
        assert_admin_refusal(send_json(gateway, "POST", "/admin/virtual-keys", {"project_name": value}),
                             "project_name", value)
        checked += 1
    for field, valid in POLICY_RULES.items():
        for value in invalid_values(rng, valid, [{"t": "x"}, [1], 10 ** 400, INFINITY, NAN]):
            for method, path, body in (("POST", "/admin/virtual-keys", {"project_name": "p", field: value}),
                                       ("PATCH", key_path, {field: value})):
                assert_admin_refusal(send_json(gateway, method, path, body), field, value)
                checked += 1
    for value in invalid_values(rng, is_duration, [{"t": "x"}, 10 ** 400, "9" * 400 + "d"]):
        assert_admin_refusal(send_json(gateway, "POST", key_path + "/rotate", {"grace": value}), "grace", value)
        checked += 1
    for value in invalid_values(rng, usd_is_positive, [10 ** 400, INFINITY, NAN, {"t": "x"}]):
        reply = send_json(gateway, "POST", key_path + "/topup", {"amount": value})
        if number_in(0, 10 ** 9)(value):  # in range but rounds to no nano-dollar
            assert reply.status == 400, (value, reply)
        else:
            assert_admin_refusal(reply, "amount", value)
        checked += 1
    for route, rules in QUERY_RULES.items():
        for field, valid in rules.items():
            extra = ["9999-12-32", "10000-01-01", "label:a b", "\u00b2", "9" * 5000, "1:%d" % 2 ** 63, "1e999"]
            for value in extra + [random_value(rng) for _ in range(TRIES)]:
                query = urllib.parse.quote(as_text(value).encode("utf-8", "surrogatepass"), safe="")
                received = urllib.parse.parse_qs("%s=%s" % (field, query)).get(field, [None])[-1]
                if received is None or valid(received):
                    continue
                assert_admin_refusal(admin(gateway, "GET", "%s?%s=%s" % (route, field, query)), field, received)
                checked += 1
    for value in [random_value(rng) for _ in range(TRIES)]:
        target = "/admin/virtual-keys/" + urllib.parse.quote(as_text(value).encode("utf-8", "surrogatepass"),
                                                             safe="")
        for method in ("GET", "PATCH", "DELETE"):
            reply = admin(gateway, method, target, {} if method == "PATCH" else None)
            assert reply.status in (400, 404), (value, method, reply)
            checked += 1
    assert checked > 500, checked
    assert snapshot(gateway) == before
    assert call(gateway, "GET", "/health").status == 200
    assert_still_serving(gateway, vkey, upstream)


# ---- the CLI, fuzzed --------------------------------------------------------------------------

def write_config_file(path, document):
    with open(str(path), "w", encoding="utf-8") as f:
        f.write(json.dumps(document))  # JSON is YAML


@pytest.fixture
def cli_setup(tmp_path, make_gateway, upstream):
    """A database with one budgeted key and a config.yaml, for ``cli_main``."""
    gateway = make_gateway()
    gateway.database.write_config(tmp_path / "config.yaml", base_config(upstream.url))
    return gateway, gateway.create_key("budgeted", max_budget=5)[0]["id"]


def cli_number_rule(rule):
    """A numeric policy flag: the word none, or text spelling a number the rule takes."""
    return lambda text: text == "none" or spells(rule)(text)


#: flag -> (the names an error may give it, is this text valid?)
POLICY_FLAGS = {
    "--tier": (("tier",), lambda t: t in ("default", "premium")),
    "--rpm": (("rpm",), cli_number_rule(POLICY_RULES["rpm"])),
    "--tpm": (("tpm",), cli_number_rule(POLICY_RULES["tpm"])),
    "--max-parallel": (("max_parallel",), cli_number_rule(POLICY_RULES["max_parallel"])),
    "--budget": (("max_budget", "budget"), cli_number_rule(POLICY_RULES["max_budget"])),
    "--budget-period": (("budget_period",), POLICY_RULES["budget_period"]),
    "--expires-in": (("expires_in",), lambda t: t == "none" or is_duration(t)),
    "--expires-at": (("expires_at",), lambda t: t == "none" or is_time(t)),
    "--models": (("models",), lambda t: t == "none" or is_models(t)),
    "--label": (("metadata", "label"), lambda t: t == "none" or (
        "=" in t and is_metadata(dict([t.split("=", 1)])))),
    "--alert-thresholds": (("alert_thresholds",), lambda t: t == "none" or is_thresholds(t)),
}


def test_cli_flags_fuzzed(cli_setup, cli_main, tmp_path):
    gateway, key_id = cli_setup
    rng = random.Random(SEED)
    before = snapshot(gateway)
    checked = 0

    def refused(names, valid, command, extra=()):
        nonlocal checked
        for value in list(extra) + [random_value(rng) for _ in range(CLI_TRIES)]:
            text = as_text(value)
            if not valid(text):
                assert_cli_refusal(cli_main(*command(text)), names, value)
                checked += 1

    refused(("project_name", "name"), is_text, lambda t: ["keys", "create", "--", t], ["\ud800", ""])
    for flag, (names, valid) in POLICY_FLAGS.items():
        for command in (["keys", "create", "p"], ["keys", "update", key_id]):
            refused(names, valid, lambda t: command + ["%s=%s" % (flag, t)], ["1e999", "NaN", "9" * 400, "\udcff"])
    refused(("--grace", "grace"), is_duration, lambda t: ["keys", "rotate", key_id, "--grace=" + t])
    refused(("amount",), spells(usd_is_positive),
            lambda t: ["keys", "topup", key_id, "--", t], ["1e999", "nan", "9" * 5000])
    # An empty --since or --until sets no bound.
    refused(("--since", "since"), lambda t: t == "" or is_time(t), lambda t: ["stats", "--since=" + t],
            ["10000-01-01"])
    refused(("--until", "until"), lambda t: t == "" or is_time(t), lambda t: ["stats", "--until=" + t],
            ["2026-02-30"])
    refused(("by",), is_group, lambda t: ["stats", "--by=" + t])
    refused(("--limit", "limit"), spells(integer_in(1, 10 ** 6)), lambda t: ["audit", "--limit=" + t],
            [str(2 ** 64)])
    refused(("since",), lambda t: t == "" or is_time(t), lambda t: ["logs", "--since=" + t], ["10000-01-01"])
    refused(("until",), lambda t: t == "" or is_time(t), lambda t: ["logs", "--until=" + t], ["2026-02-30"])
    refused(("limit",), lambda t: t == "" or spells(integer_in(1, 1000))(t), lambda t: ["logs", "--limit=" + t],
            ["\u00b2", "9" * 5000])
    refused(("cursor",), lambda t: t == "" or is_cursor(t), lambda t: ["logs", "--cursor=" + t],
            ["1:%d" % 2 ** 63])
    # Valid ages would prune, valid ports and worker counts would serve: only refused ones are run.
    refused(("--older-than",), is_duration, lambda t: ["prune", "--older-than=" + t], ["5", "1000000000000w"])
    refused(("--port", "port"), spells(integer_in(0, 65535)), lambda t: ["serve", "--port=" + t],
            ["70000", "-1"])
    refused(("--workers", "workers"), spells(integer_in(1, 1024)), lambda t: ["serve", "--workers=" + t],
            ["0", "10000"])
    assert checked > 200, checked
    assert snapshot(gateway) == before


# ---- config.yaml, fuzzed ------------------------------------------------------------------------

def config_rules():
    """(path of the key, is this value valid?) for every config key."""
    rules = {("server", "host"): lambda v: is_text(v, blank_ok=True, max_length=253)}
    for field in dataclasses.fields(llmgw.ServerConfig):
        if field.name == "port":
            rules[("server", "port")] = integer_in(0, 65535)
        elif field.name == "max_memory_mb":
            rules[("server", field.name)] = integer_in(0, 1 << 24)
        elif field.type is int:
            rules[("server", field.name)] = integer_in(1, 2 ** 31 - 1)
        elif field.type is float:
            rules[("server", field.name)] = number_in(0.001, 10 ** 6)
    rules.update({
        ("database", "synchronous"): one_of("normal", "full"),
        ("budgets", "max_output_tokens"): integer_in(1, 2 ** 31 - 1),
        ("logging", "level"): lambda v: isinstance(v, str) and v.upper() in (
            "DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"),
        ("logging", "file"): optional(lambda v: isinstance(v, str)),
        ("logging", "retention_days"): optional(integer_in(1, 36600)),
        # Any http(s) URL may be valid: only other values are tried.
        ("providers", "openai", "base_url"): lambda v: isinstance(v, str) and v.startswith(("http://", "https://")),
        ("providers", "openai", "api_key"): optional(lambda v: isinstance(v, str) and bool(v) and (
            bool(re.fullmatch(r"\$\{[A-Za-z_][A-Za-z0-9_]*\}", v)) or all(0x21 <= ord(ch) <= 0x7E for ch in v))),
        ("providers", "openai", "format"): optional(one_of("openai", "anthropic")),
        ("providers", "openai", "models"): optional(lambda v: isinstance(v, list)
                                                    and all(isinstance(glob, str) for glob in v)),
        ("providers", "openai", "allow_link_local"): lambda v: isinstance(v, bool),
        ("rate_limits", "default"): integer_in(1, 10 ** 12),
        ("routing", "retries"): integer_in(0, 10),
        ("routing", "affinity"): one_of("key", "session", "none"),
        ("routing", "retry_on"): lambda v: isinstance(v, list) and all(
            item in ("connect", "timeout") or (type(item) is int and 400 <= item <= 599) for item in v),
        ("pricing", "m", "input"): number_in(0, 10 ** 6),
        ("pricing", "m", "output"): number_in(0, 10 ** 6),
    })
    for field in ("cached_input", "cache_write", "cache_write_1h"):
        rules[("pricing", "m", field)] = optional(number_in(0, 10 ** 6))
    for field in ("backoff_initial", "backoff_max", "deadline", "first_byte_timeout", "cooldown", "cooldown_max",
                  "affinity_ttl"):
        rules[("routing", field)] = number_in(0.001, 10 ** 6)
    return rules


def config_with(path, value):
    document = base_config("http://127.0.0.1:9", pricing={"m": {"input": 1, "output": 2}})
    section = document
    for name in path[:-1]:
        section = section.setdefault(name, {})
    section[path[-1]] = value
    return document


@pytest.fixture
def database(tmp_path):
    llmgw.SQLiteStore(str(tmp_path / "gateway.db")).close()


def test_config_keys_fuzzed(tmp_path, cli_main, database):
    rng = random.Random(SEED)
    checked = through_cli = 0
    for path, valid in config_rules().items():
        where = ".".join(path)
        # A key with bad characters is named by its provider, never echoed.
        names = (where, "API key for provider openai") if path[-1] == "api_key" else (where,)
        for index, value in enumerate(invalid_values(rng, valid, [10 ** 400, INFINITY, NAN, {"t": "x"}, [1]])):
            with pytest.raises(llmgw.ConfigError) as info:
                llmgw.parse_config(plain(config_with(path, value)))
            message = info.value.message
            assert any(name in message for name in names) and "\n" not in message, (where, value, message)
            checked += 1
            if index >= CLI_CONFIG_TRIES:
                continue
            # The same through config.yaml and the CLI, where YAML can carry the value.
            document = plain(config_with(path, value))
            try:
                text = yaml.safe_dump(document, sort_keys=False)
                round_trip = repr(yaml.safe_load(text)) == repr(document)
            except yaml.YAMLError:
                round_trip = False
            if round_trip:
                (tmp_path / "config.yaml").write_text(text, encoding="utf-8")
                assert_cli_refusal(cli_main("prices", "list"), names, value)
                through_cli += 1
    assert checked > 300 and through_cli > 50, (checked, through_cli)


# ---- price packs, fuzzed --------------------------------------------------------------------

OUR_PRICE_FIELDS = ("input_per_mtok", "output_per_mtok", "cached_input_per_mtok", "cache_read_per_mtok",
                    "cache_write_per_mtok", "cache_write_1h_per_mtok")
LITELLM_PRICE_FIELDS = ("input_cost_per_token", "output_cost_per_token", "cache_read_input_token_cost",
                        "cache_creation_input_token_cost", "cache_creation_input_token_cost_above_1hr")


def test_price_pack_fields_fuzzed(cli_setup, cli_main, tmp_path):
    gateway, _ = cli_setup
    rng = random.Random(SEED)
    pack_path = tmp_path / "pack.json"
    before = snapshot(gateway)
    checked = 0

    def refused(pack, names, value):
        nonlocal checked
        pack_path.write_text(to_json(pack), encoding="utf-8")
        assert_cli_refusal(cli_main("prices", "import", str(pack_path)), names, value)
        checked += 1

    good = {"good-model": {"input_per_mtok": 1, "output_per_mtok": 2}}
    for field in OUR_PRICE_FIELDS:
        bad = invalid_values(rng, optional(number_in(0, 10 ** 6)), [10 ** 400, INFINITY, NAN, -1], CLI_TRIES)
        for value in bad:
            entry = {"input_per_mtok": 1, "output_per_mtok": 2, field: value}
            refused({"models": dict(good, m=entry)}, ("m.%s" % field,), value)
    for value in invalid_values(rng, lambda v: isinstance(v, dict), [1, "x", None], CLI_TRIES):
        refused({"models": dict(good, m=value)}, ("models.m",), value)
    litellm_good = {"good-model": {"mode": "chat", "input_cost_per_token": 1e-6, "output_cost_per_token": 2e-6}}
    for field in LITELLM_PRICE_FIELDS:
        for value in invalid_values(rng, optional(number_in(0, 1)), [10 ** 400, NAN, 2], CLI_TRIES):
            entry = {"mode": "chat", "input_cost_per_token": 1e-6, "output_cost_per_token": 2e-6, field: value}
            refused(dict(litellm_good, m=entry), ("m.%s" % field,), value)
    for name in [random_text(rng) for _ in range(CLI_TRIES)] + ["\ud800", " ", "x" * 201]:
        if not is_text(name):
            refused({"models": dict(good, **{name: {"input_per_mtok": 1, "output_per_mtok": 2}})},
                    ("model name",), name)
    assert checked > 100, checked
    assert snapshot(gateway) == before


# ---- regressions: one per case the fuzzing found ---------------------------------------------

def test_a_mapping_or_list_where_a_policy_string_belongs_is_400(admin_gateway):
    # Was a 500 (TypeError: unhashable type: 'dict' in parse_key_policy).
    for field, value in (("tier", {"t": "x"}), ("tier", ["default"]), ("budget_period", {"p": 1}),
                         ("project_name", {"n": "x"}), ("expires_in", ["30d"]), ("models", {"gpt-4o": True}),
                         ("metadata", ["team"])):
        body = {"project_name": "fz", field: value}
        reply = admin(admin_gateway, "POST", "/admin/virtual-keys", body)
        assert_admin_refusal(reply, field, value)
    assert admin_gateway.store.list_keys() == []


def test_huge_integers_are_400_naming_the_range(admin_gateway):
    # Was a 500 (OverflowError: int too large to convert to float, in parse_usd).
    reply = admin(admin_gateway, "POST", "/admin/virtual-keys", {"project_name": "p", "max_budget": 10 ** 400})
    assert_admin_refusal(reply, "max_budget", 10 ** 400)
    assert "from 0 to 1000000000" in reply.json()["error"]["message"]
    key_id = admin_gateway.create_key("b", max_budget=1)[0]["id"]
    before = snapshot(admin_gateway)
    reply = admin(admin_gateway, "POST", "/admin/virtual-keys/%s/topup" % key_id, {"amount": 10 ** 400})
    assert_admin_refusal(reply, "amount", 10 ** 400)
    assert snapshot(admin_gateway) == before


def test_huge_integer_in_a_price_pack_is_one_line_error(cli_setup, cli_main, tmp_path):
    # Was a traceback (OverflowError in _valid_prices).
    gateway, _ = cli_setup
    before = snapshot(gateway)
    pack = tmp_path / "pack.json"
    pack.write_text(json.dumps({"models": {"m": {"input_per_mtok": 10 ** 400, "output_per_mtok": 1}}}))
    result = cli_main("prices", "import", str(pack))
    assert_cli_refusal(result, ("models.m.input_per_mtok",), 10 ** 400)
    assert "from 0 to 1000000" in result.stderr
    assert snapshot(gateway) == before


@pytest.mark.parametrize("text, named", [
    ("pricing: {m: {input: %d, output: 1}}" % 10 ** 400, "pricing.m.input"),
    ("server: {header_timeout: %d}" % 10 ** 400, "server.header_timeout"),
    ("rate_limits: {default: %d}" % 10 ** 40, "rate_limits.default"),
    ("server: {port: %s}" % ("1" * 5000), "config.yaml"),
], ids=["price", "timeout", "rate limit", "5000 digits"])
def test_huge_number_in_config_is_one_line_error(tmp_path, cli_main, database, text, named):
    # Were a traceback (OverflowError in the config number check; ValueError
    # from PyYAML past Python's 4300-digit limit), or accepted (rate limit).
    (tmp_path / "config.yaml").write_text(text)
    assert_cli_refusal(cli_main("prices", "list"), (named,), text)


def test_until_the_last_day_of_year_9999(admin_gateway, cli_setup, cli_main, tmp_path):
    # Was a 500 and a traceback (OverflowError: date value out of range in parse_time_bound).
    reply = admin(admin_gateway, "GET", "/admin/usage-stats?until=9999-12-31")
    assert (reply.status, reply.json()) == (200, [])
    assert cli_main("stats", "--until", "9999-12-31", "--output", "json").returncode == 0
    reply = admin(admin_gateway, "GET", "/admin/usage-stats?since=10000-01-01")
    assert_admin_refusal(reply, "since", "10000-01-01")
    assert_cli_refusal(cli_main("stats", "--since", "10000-01-01"), ("--since",), "10000-01-01")


def test_an_expiry_at_the_end_of_the_calendar_means_never(admin_gateway):
    # Was a 500 after the key was written (ValueError: year 10000 is out of range, showing it).
    for expires_at in ("9999-12-31T23:59:59-05:00", "9999-12-31T23:59:59", "9999-06-01"):
        reply = admin(admin_gateway, "POST", "/admin/virtual-keys", {"project_name": "p", "expires_at": expires_at})
        assert reply.status == 201, reply
        assert reply.json()["expires_at"] is None
    assert admin(admin_gateway, "GET", "/admin/virtual-keys").status == 200
    before = snapshot(admin_gateway)
    for expires_at in ("10000-01-01T00:00:00Z", "9999-12-32", "+10000-01-01"):
        reply = admin(admin_gateway, "POST", "/admin/virtual-keys", {"project_name": "p", "expires_at": expires_at})
        assert_admin_refusal(reply, "expires_at", expires_at)
        assert "years 1 to 9999" in reply.json()["error"]["message"]
    assert snapshot(admin_gateway) == before


def test_a_moment_before_year_1_utc_is_400(admin_gateway):
    # Year 1 with an offset east of UTC is before year 1 in UTC: it used to be
    # written, then the reply and every listing of the keys was a 500
    # (ValueError: year 0 is out of range, showing it).
    before = snapshot(admin_gateway)
    for expires_at in ("0001-01-01T00:00:00+14:00", "0001-01-01T05:00:00+05:01"):
        reply = admin(admin_gateway, "POST", "/admin/virtual-keys", {"project_name": "p", "expires_at": expires_at})
        assert_admin_refusal(reply, "expires_at", expires_at)
        assert "years 1 to 9999" in reply.json()["error"]["message"]
    assert snapshot(admin_gateway) == before
    assert admin(admin_gateway, "GET", "/admin/virtual-keys").status == 200
    reply = admin(admin_gateway, "GET", "/admin/logs?since=" + urllib.parse.quote("0001-01-01T00:00:00+14:00"))
    assert_admin_refusal(reply, "since", "0001-01-01T00:00:00+14:00")
    reply = admin(admin_gateway, "POST", "/admin/virtual-keys", {"project_name": "p",
                                                                  "expires_at": "0001-01-01T00:00:00Z"})
    assert reply.status == 201 and reply.json()["expires_at"] == "0001-01-01T00:00:00Z", reply


class Clock:
    def __init__(self, now):
        self.now = now

    def __call__(self):
        return self.now


@pytest.mark.parametrize("period, moment", [("monthly", "9999-12-20T00:00:00"), ("weekly", "9999-12-31T12:00:00"),
                                            ("daily", "9999-12-31T12:00:00")])
def test_a_budget_period_at_the_end_of_year_9999(make_gateway, period, moment):
    # Was a 500 on every budgeted call (OverflowError in budget_period_bounds).
    clock = Clock(llmgw.parse_time_bound(moment))
    gateway = make_gateway(clock=clock, environ={"LLMGW_ADMIN_TOKEN": ADMIN_TOKEN})
    record, secret = gateway.create_key("p", max_budget=5, budget_period=period)
    reply = post(gateway, CHAT, body_for(CHAT), secret)
    assert reply.status == 200, reply
    reply = admin(gateway, "GET", "/admin/virtual-keys/%s" % record["id"])
    assert reply.status == 200, reply


def test_nan_and_infinity_in_a_price_pack_refuse_the_pack(cli_setup, cli_main, tmp_path):
    # Were skipped without a word: the rest of the pack was imported.
    gateway, _ = cli_setup
    before = snapshot(gateway)
    for literal in ("NaN", "Infinity", "1e999"):
        pack = tmp_path / "pack.json"
        pack.write_text('{"models": {"good": {"input_per_mtok": 1, "output_per_mtok": 2},'
                        ' "m": {"input_per_mtok": %s, "output_per_mtok": 1}}}' % literal)
        assert_cli_refusal(cli_main("prices", "import", str(pack)), ("models.m.input_per_mtok",), literal)
    assert snapshot(gateway) == before


def test_infinity_in_admin_json_names_the_field_and_range(admin_gateway):
    for field in ("max_budget", "rpm"):
        reply = send_json(admin_gateway, "POST", "/admin/virtual-keys", {"project_name": "p", field: INFINITY})
        assert_admin_refusal(reply, field, INFINITY)
        assert re.search(r"from \d+ to \d+", reply.json()["error"]["message"]), reply
    assert admin_gateway.store.list_keys() == []


# ---- regressions: the same class, found elsewhere ------------------------------------------------

def test_a_missing_price_is_refused_in_config(tmp_path, cli_main):
    # ``input: null`` was accepted, then every call to the model was a 500 (None * tokens).
    with pytest.raises(llmgw.ConfigError) as info:
        llmgw.parse_config({"pricing": {"m": {"input": None, "output": 1}}})
    assert "pricing.m.input" in info.value.message


@pytest.mark.parametrize("falsy", [False, 0, "", []])
def test_a_falsy_provider_format_or_models_is_refused(falsy):
    # ``format: false`` or ``models: 0`` read as "not given".
    for field in ("format", "models") if falsy != [] else ("format",):  # models: [] is an empty list
        document = config_with(("providers", "openai", field), falsy)
        with pytest.raises(llmgw.ConfigError) as info:
            llmgw.parse_config(document)
        assert "providers.openai.%s" % field in info.value.message


@pytest.mark.parametrize("args, named", [
    (["audit", "--limit", str(2 ** 64)], "--limit"),
    (["serve", "--port", "70000"], "--port"),
    (["serve", "--port", "http"], "--port"),
    (["stats", "--project", "\udcff"], "project"),
    (["keys", "topup", "vk_0", "lots"], "amount"),
], ids=["audit limit", "port range", "port text", "undecodable argument", "topup text"])
def test_cli_arguments_once_a_traceback(cli_setup, cli_main, args, named):
    # Were tracebacks (OverflowError in SQLite, AttributeError in server_close
    # after a failed bind, UnicodeEncodeError in SQLite) or argparse's usage.
    gateway, _ = cli_setup
    before = snapshot(gateway)
    assert_cli_refusal(cli_main(*args), (named,), args)
    assert snapshot(gateway) == before


@pytest.mark.parametrize("limits", [{"max_tokens": 10 ** 400}, {"max_tokens": 5, "n": 10 ** 400},
                                    {"max_completion_tokens": 10 ** 400, "n": 10 ** 400}],
                         ids=["max_tokens", "n", "both"])
def test_a_huge_max_tokens_on_a_budgeted_key_is_a_budget_refusal(make_gateway, upstream, limits):
    # The proxy path's one case of the class: was a 500 (OverflowError
    # turning the worst-case cost into USD for the 429's message).
    gateway = make_gateway()
    record, secret = gateway.create_key("p", max_budget=5)
    reply = post(gateway, CHAT, body_for(CHAT, **limits), secret)
    assert (reply.status, reply.json()["error"]["code"]) == (429, "budget_exceeded"), reply
    assert_still_serving(gateway, secret, upstream)


def test_an_address_that_cannot_be_bound_is_one_line_error(cli_setup, tmp_path):
    # Was a traceback (AttributeError in server_close, after the failed bind).
    # A child process: serve sets up logging for the whole process.
    result = run_cli(["serve", "--host", "192.0.2.1", "--port", "0"], tmp_path, paths_env(tmp_path))
    assert_cli_refusal(result, ("cannot listen on '192.0.2.1'",), "192.0.2.1")


def test_a_price_pack_nested_too_deep_is_one_line_error(cli_setup, cli_main, tmp_path):
    # Was a traceback (RecursionError from json.load).
    gateway, _ = cli_setup
    before = snapshot(gateway)
    pack = tmp_path / "pack.json"
    pack.write_text("[" * 100000 + "]" * 100000)
    assert_cli_refusal(cli_main("prices", "import", str(pack)), ("price pack",), "deep")
    assert snapshot(gateway) == before


def test_a_host_with_a_nul_is_one_line_error(tmp_path, cli_main, database):
    # Was a traceback (TypeError: host name must not contain null character, from bind).
    document = base_config("http://127.0.0.1:9", server={"host": "127.0.0.1\x00", "port": 0})
    write_config_file(tmp_path / "config.yaml", document)
    assert_cli_refusal(cli_main("serve"), ("server.host",), "NUL")


@pytest.mark.parametrize("args, named", [
    (["logs", "--limit", "\u00b2"], "limit"),
    (["logs", "--limit", "9" * 5000], "limit"),
    (["logs", "--cursor", "1:%d" % 2 ** 63], "cursor"),
    (["logs", "--since", "10000-01-01"], "since"),
], ids=["superscript digit", "5000 digits", "cursor past SQLite", "since"])
def test_request_log_arguments(cli_setup, cli_main, admin_gateway, args, named):
    # Were tracebacks and 500s (int() of a digit Python cannot read; a row
    # id SQLite cannot bind), or an error naming no field.
    assert_cli_refusal(cli_main(*args), (named,), args)
    reply = admin(admin_gateway, "GET", "/admin/logs?%s=%s" % (args[1][2:], urllib.parse.quote(args[2])))
    assert_admin_refusal(reply, named, args[2])


def test_a_retention_past_a_century_is_refused(tmp_path, cli_main, database):
    # Was a traceback from prune (a cut-off before year 1).
    write_config_file(tmp_path / "config.yaml", base_config("http://127.0.0.1:9", logging={"retention_days": 10 ** 9}))
    assert_cli_refusal(cli_main("prune"), ("logging.retention_days",), 10 ** 9)
