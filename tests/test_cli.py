"""cli.py: the README sequence end to end, init, keys, provider keys, stats, errors.

Most commands run as real subprocesses (``run_cli``) with CONFIG_PATH and
DB_PATH under ``tmp_path``; a few use ``cli.main([...])`` in process with
``capsys``. Gateways are the real server: ``python cli.py serve`` as a child
process, or the in-process ``gateway`` fixture sharing the database file.
"""

import ast
import datetime
import errno
import hashlib
import http.client
import json
import os
import re
import stat
import subprocess
import sys
import time

import pytest

from conftest import (ADMIN_TOKEN, ROOT, GatewayProcess, admin, call, cli_env, paths_env, post, query,
                      reported_tokens, run_cli, stored_bytes, two_projects_usage)

import cli
import llmgw

KEY_SECRET = re.compile(r"llmgw-(?!admin-)[A-Za-z0-9_-]{20,}")
ADMIN_LINE = re.compile(r"^Admin token: (\S+)$", re.M)
CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}

pytestmark = pytest.mark.usefixtures("clean_environment")


def cli_run(tmp_path, *args, env=None, check=False):
    """``python cli.py ARGS`` in tmp_path with its config.yaml and gateway.db."""
    return run_cli(list(args), tmp_path, dict(paths_env(tmp_path), **(env or {})), check=check)


@pytest.fixture
def database(configured, db):
    """An empty database where config.yaml and DB_PATH point (on the test's
    backend), as ``init`` leaves it."""
    db.open_store().close()
    return db


def write_config(path, upstream_url, providers=None, **sections):
    """A config.yaml whose providers point at the fake upstream (no keys)."""
    document = {
        "server": {"host": "127.0.0.1", "port": 0},
        "providers": providers or {"openai": {"base_url": upstream_url},
                                   "anthropic": {"base_url": upstream_url}},
    }
    document.update(sections)
    with open(str(path), "w", encoding="utf-8") as f:
        f.write(json.dumps(document))  # JSON is YAML
    return path


def template_for(upstream_url):
    """The init template with both providers pointed at the fake upstream."""
    text = llmgw.CONFIG_TEMPLATE
    assert "https://api.openai.com\n" in text and "https://api.anthropic.com\n" in text
    return (text.replace("https://api.openai.com\n", upstream_url + "\n")
                .replace("https://api.anthropic.com\n", upstream_url + "\n"))


def assert_one_line_error(result, *fragments):
    """Exit status 1 and exactly one stderr line, ``error: ...``, naming the problem."""
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1, (result.returncode, result.stdout, result.stderr)
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def mode(path):
    return stat.S_IMODE(os.stat(str(path)).st_mode)


def stored_admin_token_hash(db):
    """The admin token hash in the database, as [(value,)]."""
    return query(db, "SELECT value FROM settings WHERE name = ?", (llmgw.ADMIN_TOKEN_SETTING,))


# ---- the README, word for word ---------------------------------------------

@pytest.mark.sqlite_only("the README's first session: init writes the template and creates gateway.db "
                         "(on PostgreSQL: test_postgres test_the_cli_and_doctor_work_on_postgresql)")
def test_readme_sequence(tmp_path, upstream):
    openai_key = "sk-README-openai-0123456789abcdef"
    anthropic_key = "sk-ant-README-anthropic-0123456789"

    # python cli.py init   (default paths: config.yaml and gateway.db in the working directory)
    init = run_cli(["init"], tmp_path, check=True)
    assert len(ADMIN_LINE.findall(init.stdout)) == 1
    assert os.path.exists(tmp_path / "config.yaml") and os.path.exists(tmp_path / "gateway.db")
    config_text = (tmp_path / "config.yaml").read_text()
    (tmp_path / "config.yaml").write_text(template_for(upstream.url))
    assert config_text == llmgw.CONFIG_TEMPLATE

    run_cli(["config", "set-key", "openai", openai_key], tmp_path, check=True)
    run_cli(["config", "set-key", "anthropic", anthropic_key], tmp_path, check=True)
    created = run_cli(["keys", "create", "My Project"], tmp_path, check=True)
    secrets_shown = KEY_SECRET.findall(created.stdout)
    assert len(secrets_shown) == 1 and created.stdout.count(secrets_shown[0]) == 1, created.stdout
    vkey = secrets_shown[0]

    server = GatewayProcess(tmp_path, {}, name="serve").start()
    port = server.port
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("POST", "/v1/chat/completions",
                     json.dumps({"model": "gpt-3.5-turbo", "messages": [{"role": "user", "content": "Hello!"}]}),
                     {"Content-Type": "application/json", "Authorization": "Bearer " + vkey})
        response = conn.getresponse()
        chat = json.loads(response.read())
        assert response.status == 200, chat
        assert chat["choices"][0]["message"]["content"] == "Hello from the fake upstream."
        conn.request("POST", "/v1/messages",
                     json.dumps({"model": "claude-3-sonnet-20240229", "max_tokens": 1024,
                                 "messages": [{"role": "user", "content": "Hello, Claude"}]}),
                     {"Content-Type": "application/json", "x-api-key": vkey,
                      "anthropic-version": "2023-06-01"})
        response = conn.getresponse()
        message = json.loads(response.read())
        assert response.status == 200, message
        assert message["type"] == "message"
        conn.close()

        assert [r["path"] for r in upstream.requests] == ["/v1/chat/completions", "/v1/messages"]
        assert upstream.requests[0]["headers"]["authorization"] == "Bearer " + openai_key
        assert upstream.requests[1]["headers"]["x-api-key"] == anthropic_key
        assert vkey not in json.dumps([r["headers"] for r in upstream.requests])

        chat_in, chat_out = reported_tokens(upstream.reported[0])
        msg_in, msg_out = reported_tokens(upstream.reported[1])
        # List prices (USD per million tokens): gpt-3.5-turbo 0.5/1.5, claude-3-sonnet 3/15.
        cost_nanousd = chat_in * 500 + chat_out * 1500 + msg_in * 3000 + msg_out * 15000

        listed = json.loads(run_cli(["keys", "list", "--output", "json"], tmp_path, check=True).stdout)
        assert [k["project_name"] for k in listed] == ["My Project"]
        key_id = listed[0]["id"]

        table = run_cli(["stats"], tmp_path, check=True).stdout
        assert re.search(r"^%s\s+My Project\s+2\s+0\s+0\s+%d\s+%d\s+%.6f$"
                         % (key_id, chat_in + msg_in, chat_out + msg_out, cost_nanousd / 1e9),
                         table, re.M), table
        stats = json.loads(run_cli(["stats", "--output", "json"], tmp_path, check=True).stdout)
        assert len(stats) == 1
        row = stats[0]
        assert {k: row[k] for k in ("virtual_key_id", "project_name", "requests", "errors", "request_tokens",
                                    "response_tokens", "estimated_cost")} == {
            "virtual_key_id": key_id, "project_name": "My Project", "requests": 2, "errors": 0,
            "request_tokens": chat_in + msg_in, "response_tokens": chat_out + msg_out,
            "estimated_cost": round(cost_nanousd / 1e9, 9)}
    finally:
        log = server.stop(10)
    for secret in (vkey, openai_key, anthropic_key):
        assert secret not in log


def test_llmgw_py_serves(tmp_path, upstream, db):
    write_config(tmp_path / "config.yaml", upstream.url, server={"host": "127.0.0.1", "port": 0}, **db.config())
    server = GatewayProcess(tmp_path, paths_env(tmp_path), entry="llmgw", name="llmgw").start()
    port = server.port
    try:
        health = call("http://127.0.0.1:%d" % port, "GET", "/health")
        assert (health.status, health.json()) == (200, {"status": "ok", "version": llmgw.__version__})
        created = json.loads(cli_run(tmp_path, "keys", "create", "p", "--output", "json", check=True).stdout)
        reply = post("http://127.0.0.1:%d" % port, "/v1/chat/completions", CHAT, key=created["key"])
        # No provider key anywhere: the gateway says how to set one.
        assert reply.status == 503
        assert reply.json()["error"]["code"] == "provider_key_missing"
    finally:
        server.stop(10)


# ---- init ----------------------------------------------------------------------

@pytest.mark.sqlite_only("init without a config.yaml: the template (no database.url) and gateway.db's mode "
                         "(on PostgreSQL: test_init_twice_keeps_config_and_token, test_postgres)")
def test_init_creates_private_config_database_and_admin_token(tmp_path, db):
    result = cli_run(tmp_path, "init", check=True)
    assert (tmp_path / "config.yaml").read_text() == llmgw.CONFIG_TEMPLATE
    assert mode(tmp_path / "config.yaml") == 0o600
    assert mode(tmp_path / "gateway.db") == 0o600
    tokens = ADMIN_LINE.findall(result.stdout)
    assert len(tokens) == 1
    token = tokens[0]
    assert token.startswith(llmgw.ADMIN_TOKEN_PREFIX) and len(token) >= 40
    assert result.stdout.count(token) == 1
    assert stored_admin_token_hash(db) == [(hashlib.sha256(token.encode()).hexdigest(),)]
    assert token.encode() not in stored_bytes(db)


def test_init_twice_keeps_config_and_token(tmp_path, db):
    db.write_config(tmp_path / "config.yaml", {"server": {"port": 8000}})
    first = cli_run(tmp_path, "init", check=True)
    token = ADMIN_LINE.findall(first.stdout)[0]
    assert token.encode() not in stored_bytes(db)
    custom = json.dumps(db.config({"server": {"port": 8123}})) + "\n# my own edit\n"
    (tmp_path / "config.yaml").write_text(custom)
    os.chmod(str(tmp_path / "config.yaml"), 0o644)

    second = cli_run(tmp_path, "init", check=True)
    assert "Admin token:" not in second.stdout
    assert token not in second.stdout
    assert "admin token already exists" in second.stdout.lower()
    assert (tmp_path / "config.yaml").read_text() == custom
    assert mode(tmp_path / "config.yaml") == 0o600
    assert stored_admin_token_hash(db) == [(hashlib.sha256(token.encode()).hexdigest(),)]
    third = cli_run(tmp_path, "init", check=True)
    assert "Admin token:" not in third.stdout


def test_init_keeps_existing_config_and_keys(tmp_path, upstream, cli_main, db):
    write_config(tmp_path / "config.yaml", upstream.url, **db.config())
    before = (tmp_path / "config.yaml").read_bytes()
    cli_run(tmp_path, "init", check=True)
    created = json.loads(cli_main("keys", "create", "kept", "--output", "json", check=True).stdout)
    cli_run(tmp_path, "init", check=True)
    assert (tmp_path / "config.yaml").read_bytes() == before
    listed = json.loads(cli_main("keys", "list", "--output", "json", check=True).stdout)
    assert [(k["id"], k["is_active"]) for k in listed] == [(created["id"], True)]


def test_init_keeps_a_config_it_may_not_change(tmp_path, upstream, cli_main, monkeypatch):
    """Found by tests/check_docker.py: a config mounted read-only into the container
    (``-v config.yaml:/app/config.yaml:ro``) made ``init`` crash on its chmod, so the
    image's ``init && serve`` never served."""
    write_config(tmp_path / "config.yaml", upstream.url)
    os.chmod(str(tmp_path / "config.yaml"), 0o644)
    config_path, chmod = str(tmp_path / "config.yaml"), os.chmod

    def read_only_config(path, *args, **kwargs):
        if str(path) == config_path:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), config_path)
        return chmod(path, *args, **kwargs)
    monkeypatch.setattr(os, "chmod", read_only_config)
    result = cli_main("init", check=True)
    assert "Kept existing %s (mode left as it is: Read-only file system)" % config_path in result.stdout
    assert "Admin token:" in result.stdout
    assert mode(tmp_path / "gateway.db") == 0o600


def test_init_reports_a_broken_existing_config(tmp_path):
    (tmp_path / "config.yaml").write_text("bogus_section: {}\n")
    result = cli_run(tmp_path, "init")
    assert_one_line_error(result, "bogus_section")
    assert (tmp_path / "config.yaml").read_text() == "bogus_section: {}\n"


def test_admin_token_command_prints_a_new_token_once(tmp_path, db):
    db.write_config(tmp_path / "config.yaml")
    first = ADMIN_LINE.findall(cli_run(tmp_path, "init", check=True).stdout)[0]
    result = cli_run(tmp_path, "admin-token", check=True)
    tokens = ADMIN_LINE.findall(result.stdout)
    assert len(tokens) == 1 and tokens[0] != first
    assert result.stdout.count(tokens[0]) == 1
    assert tokens[0].startswith(llmgw.ADMIN_TOKEN_PREFIX)
    store = db.open_store()
    try:
        assert store.get_setting(llmgw.ADMIN_TOKEN_SETTING) == hashlib.sha256(tokens[0].encode()).hexdigest()
    finally:
        store.close()


# ---- keys ------------------------------------------------------------------------

@pytest.fixture
def configured(tmp_path, upstream, db):
    """config.yaml in tmp_path pointing at the fake upstream and naming the test's database."""
    write_config(tmp_path / "config.yaml", upstream.url, **db.config())
    return tmp_path


def test_keys_create_json_and_only_the_hash_is_stored(configured, database):
    tmp_path = configured
    result = cli_run(tmp_path, "keys", "create", "Billing Team", "--output", "json", check=True)
    created = json.loads(result.stdout)
    assert set(created) >= {"id", "key", "project_name", "created_at", "is_active", "tier"}
    assert created["project_name"] == "Billing Team"
    assert created["is_active"] is True
    assert created["tier"] == "default"
    assert re.match(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z$", created["created_at"])
    secret = created["key"]
    assert secret.startswith(llmgw.VIRTUAL_KEY_PREFIX) and len(secret) >= 40
    assert KEY_SECRET.fullmatch(secret)

    raw = stored_bytes(database)
    assert secret.encode() not in raw
    assert secret[len(llmgw.VIRTUAL_KEY_PREFIX):].encode() not in raw
    rows = query(database, "SELECT id, key_hash FROM virtual_keys")
    assert rows == [(created["id"], hashlib.sha256(secret.encode()).hexdigest())]


def test_keys_create_table_output_shows_the_key_once(configured, database):
    result = cli_run(configured, "keys", "create", "Table Project", check=True)
    shown = KEY_SECRET.findall(result.stdout)
    assert len(shown) == 1
    assert result.stdout.count(shown[0]) == 1
    assert "Table Project" in result.stdout


def test_keys_create_tier_and_rpm(configured, cli_main, database):
    premium = json.loads(cli_main("keys", "create", "P", "--tier", "premium", "--output", "json",
                                  check=True).stdout)
    assert (premium["tier"], premium["rpm"]) == ("premium", None)
    limited = json.loads(cli_main("keys", "create", "R", "--rpm", "7", "--output", "json", check=True).stdout)
    assert (limited["tier"], limited["rpm"]) == ("default", 7)


@pytest.mark.parametrize("args, fragment", [
    (["--tier", "gold"], "gold"),
    (["--rpm", "0"], "rpm"),
])
def test_keys_create_rejects_bad_options(configured, cli_main, args, fragment, database):
    result = cli_main("keys", "create", "X", *args)
    assert_one_line_error(result, fragment)
    assert json.loads(cli_main("keys", "list", "--output", "json", check=True).stdout) == []


def test_keys_list_never_shows_secrets(configured, cli_main, database):
    created = [json.loads(cli_main("keys", "create", name, "--output", "json", check=True).stdout)
               for name in ("alpha", "beta")]
    hashes = [hashlib.sha256(c["key"].encode()).hexdigest() for c in created]
    table = cli_run(configured, "keys", "list", check=True).stdout
    as_json = cli_main("keys", "list", "--output", "json", check=True).stdout
    for output in (table, as_json):
        for c, digest in zip(created, hashes):
            assert c["key"] not in output
            assert c["key"][len(llmgw.VIRTUAL_KEY_PREFIX):][:-4] not in output
            assert digest not in output
    listed = json.loads(as_json)
    assert [(k["id"], k["project_name"], k["is_active"]) for k in listed] == [
        (created[0]["id"], "alpha", True), (created[1]["id"], "beta", True)]
    for entry in listed:
        assert "key" not in entry and "key_hash" not in entry
    for c in created:
        assert re.search(r"^%s\s+%s\s" % (c["id"], c["project_name"]), table, re.M), table


def test_keys_list_when_empty(cli_main, database):
    result = cli_main("keys", "list", check=True)
    assert "No virtual keys yet" in result.stdout
    assert json.loads(cli_main("keys", "list", "--output", "json", check=True).stdout) == []


def test_keys_revoke(configured, cli_main, database):
    created = json.loads(cli_main("keys", "create", "gone", "--output", "json", check=True).stdout)
    result = cli_run(configured, "keys", "revoke", created["id"], check=True)
    assert created["id"] in result.stdout
    listed = json.loads(cli_main("keys", "list", "--output", "json", check=True).stdout)
    assert [(k["id"], k["is_active"]) for k in listed] == [(created["id"], False)]
    assert listed[0]["revoked_at"] is not None
    # Revoking twice is fine.
    assert cli_main("keys", "revoke", created["id"]).returncode == 0


def test_keys_revoke_unknown_id(tmp_path, database):
    result = cli_run(tmp_path, "keys", "revoke", "vk_doesnotexist")
    assert_one_line_error(result, "vk_doesnotexist")
    assert result.stdout == ""


def test_revoke_from_another_process_holds_at_once(tmp_path, gateway, upstream):
    record, secret = gateway.create_key("soon revoked")
    assert post(gateway, "/v1/chat/completions", CHAT, key=secret).status == 200  # now cached as valid
    run_cli(["keys", "revoke", record["id"]], tmp_path, cli_env(gateway, tmp_path), check=True)
    reply = post(gateway, "/v1/chat/completions", CHAT, key=secret)
    assert reply.status == 401
    assert reply.json()["error"]["type"] == "authentication_error"
    assert len(upstream.requests) == 1


# ---- provider keys ---------------------------------------------------------------

def test_set_key_stores_in_database_not_config(configured, database):
    before = (configured / "config.yaml").read_bytes()
    secret = "sk-stored-in-db-0123456789abcdef"
    result = cli_run(configured, "config", "set-key", "openai", secret, check=True)
    assert secret not in result.stdout
    assert "sk-...cdef" in result.stdout
    assert (configured / "config.yaml").read_bytes() == before
    assert query(database, "SELECT provider, api_key FROM provider_keys") == [("openai", secret)]


def test_set_key_unknown_provider(configured):
    result = cli_run(configured, "config", "set-key", "nosuchprovider", "sk-0123456789abcdef")
    assert_one_line_error(result, "nosuchprovider")
    assert "sk-0123456789abcdef" not in result.stderr


def test_set_key_rejects_whitespace(configured):
    result = cli_run(configured, "config", "set-key", "openai", "sk-bad key 0123456789")
    assert_one_line_error(result, "openai")
    assert "sk-bad key" not in result.stderr


def test_set_key_notes_config_precedence(tmp_path, upstream, database):
    write_config(tmp_path / "config.yaml", upstream.url, **database.config(),
                 providers={"openai": {"base_url": upstream.url, "api_key": "sk-from-config-0123456789"}})
    result = cli_run(tmp_path, "config", "set-key", "openai", "sk-from-db-0123456789abcd", check=True)
    assert "takes precedence" in result.stdout


def test_set_key_reaches_a_running_gateway(tmp_path, upstream, make_gateway):
    providers = {"openai": {"base_url": upstream.url}, "anthropic": {"base_url": upstream.url}}
    env_key = "sk-from-environment-0123456789"
    gateway = make_gateway(environ={"OPENAI_API_KEY": env_key}, providers=providers)
    key = gateway.create_key()[1]
    anthropic_reply = post(gateway, "/v1/messages", {"model": "claude-haiku-4-5", "max_tokens": 5,
                                                     "messages": [{"role": "user", "content": "hi"}]}, key=key)
    assert anthropic_reply.status == 503
    assert anthropic_reply.json()["error"]["type"] == "overloaded_error"
    assert "python cli.py config set-key anthropic" in anthropic_reply.json()["error"]["message"]
    assert post(gateway, "/v1/chat/completions", CHAT, key=key).status == 200
    assert upstream.requests[-1]["headers"]["authorization"] == "Bearer " + env_key

    env = cli_env(gateway, tmp_path, {"providers": providers})
    db_key, db_anthropic = "sk-from-database-0123456789", "sk-ant-from-database-0123456789"
    run_cli(["config", "set-key", "openai", db_key], tmp_path, env, check=True)
    run_cli(["config", "set-key", "anthropic", db_anthropic], tmp_path, env, check=True)

    deadline = time.monotonic() + 1.0
    while True:
        reply = post(gateway, "/v1/chat/completions", CHAT, key=key)
        assert reply.status == 200
        if upstream.requests[-1]["headers"]["authorization"] == "Bearer " + db_key or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    # database beats environment
    assert upstream.requests[-1]["headers"]["authorization"] == "Bearer " + db_key
    reply = post(gateway, "/v1/messages", {"model": "claude-haiku-4-5", "max_tokens": 5,
                                           "messages": [{"role": "user", "content": "hi"}]}, key=key)
    assert reply.status == 200
    assert upstream.requests[-1]["headers"]["x-api-key"] == db_anthropic


def test_list_keys_masks_and_names_the_source(tmp_path, upstream, database):
    keys = {
        "config_literal": "sk-config-literal-0123456789abcd",
        "config_env": "sk-ant-config-env-0123456789wxyz",
        "database": "sk-database-0123456789qrst",
        "database_loser": "sk-database-loser-0123456789lost",
        "environment": "sk-environment-0123456789mnop",
        "environment_loser": "sk-environment-loser-0123456789",
    }
    url = upstream.url
    write_config(tmp_path / "config.yaml", url, **database.config(), providers={
        "openai": {"base_url": url, "api_key": keys["config_literal"]},
        "anthropic": {"base_url": url, "api_key": "${MY_ANTHROPIC_KEY}"},
        "mistral": {"base_url": url, "format": "openai"},
        "deepseek": {"base_url": url, "format": "openai"},
        "groq": {"base_url": url, "format": "openai"},
    })
    cli_run(tmp_path, "config", "set-key", "openai", keys["database_loser"], check=True)
    cli_run(tmp_path, "config", "set-key", "mistral", keys["database"], check=True)
    env = {"MY_ANTHROPIC_KEY": keys["config_env"], "OPENAI_API_KEY": keys["environment_loser"],
           "MISTRAL_API_KEY": keys["environment_loser"], "DEEPSEEK_API_KEY": keys["environment"]}
    result = cli_run(tmp_path, "config", "list-keys", env=env, check=True)
    rows = {}
    for line in result.stdout.splitlines()[1:]:
        provider, key, source, base_url = line.split()
        rows[provider] = (key, source, base_url)
    assert rows == {
        "openai": ("sk-...abcd", "config", url),
        "anthropic": ("sk-...wxyz", "config", url),
        "mistral": ("sk-...qrst", "database", url),
        "deepseek": ("sk-...mnop", "environment", url),
        "groq": ("(none)", "-", url),
    }
    for secret in keys.values():
        assert secret not in result.stdout
    assert result.stdout.splitlines()[0].split() == ["PROVIDER", "KEY", "SOURCE", "BASE", "URL"]


def list_keys_rows(stdout):
    return {line.split()[0]: tuple(line.split()[1:3]) for line in stdout.splitlines()[1:]}


def test_list_keys_environment_then_database(configured, cli_main, database):
    env_key, db_key = "sk-env-openai-0123456789abcd", "sk-db-openai-0123456789wxyz"
    result = cli_main("config", "list-keys", env={"OPENAI_API_KEY": env_key}, check=True)
    assert list_keys_rows(result.stdout) == {"openai": ("sk-...abcd", "environment"),
                                             "anthropic": ("(none)", "-")}
    cli_main("config", "set-key", "openai", db_key, check=True)
    result = cli_main("config", "list-keys", env={"OPENAI_API_KEY": env_key}, check=True)
    assert list_keys_rows(result.stdout) == {"openai": ("sk-...wxyz", "database"),
                                             "anthropic": ("(none)", "-")}
    assert env_key not in result.stdout and db_key not in result.stdout


# ---- stats -----------------------------------------------------------------------

@pytest.fixture
def usage(gateway, upstream, tmp_path):
    """Two projects' usage on ``gateway``: alpha 2 OpenAI calls, beta 1 Anthropic call."""
    alpha, beta = two_projects_usage(gateway)
    tokens = [reported_tokens(entry) for entry in upstream.reported]
    assert len(tokens) == 3
    return {"alpha": alpha, "beta": beta, "tokens": tokens, "env": cli_env(gateway, tmp_path),
            "day": datetime.datetime.fromtimestamp(gateway.rows()[0]["started_at"],
                                                   datetime.timezone.utc).strftime("%Y-%m-%d")}


def stats_json(capsys, monkeypatch, env, *args):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert cli.main(["stats", "--output", "json"] + list(args)) == 0
    return json.loads(capsys.readouterr().out)


def totals(rows, *fields):
    return [tuple(row[f] for f in fields) for row in rows]


def test_stats_by_key_project_model_provider_day(usage, capsys, monkeypatch):
    (a1_in, a1_out), (a2_in, a2_out), (b_in, b_out) = usage["tokens"]
    fields = ("requests", "errors", "request_tokens", "response_tokens")
    by_key = stats_json(capsys, monkeypatch, usage["env"])
    assert sorted(totals(by_key, "virtual_key_id", "project_name", *fields)) == sorted([
        (usage["alpha"]["id"], "alpha", 2, 0, a1_in + a2_in, a1_out + a2_out),
        (usage["beta"]["id"], "beta", 1, 0, b_in, b_out)])
    by_project = stats_json(capsys, monkeypatch, usage["env"], "--by", "project")
    assert totals(by_project, "project_name", *fields) == [
        ("alpha", 2, 0, a1_in + a2_in, a1_out + a2_out), ("beta", 1, 0, b_in, b_out)]
    by_model = stats_json(capsys, monkeypatch, usage["env"], "--by", "model")
    assert totals(by_model, "model", *fields) == [
        ("claude-haiku-4-5", 1, 0, b_in, b_out), ("gpt-4o-mini", 2, 0, a1_in + a2_in, a1_out + a2_out)]
    by_provider = stats_json(capsys, monkeypatch, usage["env"], "--by", "provider")
    assert totals(by_provider, "provider", *fields) == [
        ("anthropic", 1, 0, b_in, b_out), ("openai", 2, 0, a1_in + a2_in, a1_out + a2_out)]
    by_day = stats_json(capsys, monkeypatch, usage["env"], "--by", "day")
    assert totals(by_day, "day", *fields) == [
        (usage["day"], 3, 0, a1_in + a2_in + b_in, a1_out + a2_out + b_out)]
    # gpt-4o-mini 0.15/0.6, claude-haiku-4-5 1/5 USD per million tokens
    alpha_cost = ((a1_in + a2_in) * 150 + (a1_out + a2_out) * 600) / 1e9
    beta_cost = (b_in * 1000 + b_out * 5000) / 1e9
    assert [row["estimated_cost"] for row in by_project] == [round(alpha_cost, 9), round(beta_cost, 9)]


def test_stats_date_range_and_project_filter(usage, capsys, monkeypatch):
    day = datetime.datetime.strptime(usage["day"], "%Y-%m-%d")
    before = (day - datetime.timedelta(days=1)).strftime("%Y-%m-%d")
    after = (day + datetime.timedelta(days=1)).strftime("%Y-%m-%d")
    db = usage["env"]
    everything = stats_json(capsys, monkeypatch, db, "--by", "project")
    assert stats_json(capsys, monkeypatch, db, "--by", "project", "--since", usage["day"],
                      "--until", usage["day"]) == everything
    assert stats_json(capsys, monkeypatch, db, "--by", "project", "--since", after) == []
    assert stats_json(capsys, monkeypatch, db, "--by", "project", "--until", before) == []
    assert stats_json(capsys, monkeypatch, db, "--by", "project", "--since", before, "--until", after) == everything
    only_beta = stats_json(capsys, monkeypatch, db, "--project", "beta")
    assert totals(only_beta, "virtual_key_id", "project_name", "requests") == [(usage["beta"]["id"], "beta", 1)]
    assert stats_json(capsys, monkeypatch, db, "--project", "nobody") == []


def test_stats_table_output(usage, capsys, monkeypatch):
    for name, value in usage["env"].items():
        monkeypatch.setenv(name, value)
    assert cli.main(["stats", "--by", "project"]) == 0
    out = capsys.readouterr().out
    (a1_in, a1_out), (a2_in, a2_out), (b_in, b_out) = usage["tokens"]
    assert out.splitlines()[0].split() == ["PROJECT", "REQUESTS", "OTHER", "CALLS", "ERRORS", "REQUEST", "TOKENS",
                                           "RESPONSE", "TOKENS", "COST", "(USD)"]
    assert re.search(r"^alpha\s+2\s+0\s+0\s+%d\s+%d\s+\d+\.\d{6}$" % (a1_in + a2_in, a1_out + a2_out), out,
                     re.M), out
    assert re.search(r"^beta\s+1\s+0\s+0\s+%d\s+%d\s+\d+\.\d{6}$" % (b_in, b_out), out, re.M), out


def test_stats_without_usage(tmp_path, cli_main, database):
    result = cli_run(tmp_path, "stats", check=True)
    assert result.stdout.strip() == "No usage recorded yet."
    assert json.loads(cli_main("stats", "--output", "json", check=True).stdout) == []


def test_stats_rejects_a_bad_date(tmp_path, database):
    assert_one_line_error(cli_run(tmp_path, "stats", "--since", "yesterday"), "yesterday")


# ---- errors ------------------------------------------------------------------------

CONFIG_COMMANDS = [
    ["serve"],
    ["keys", "create", "X"],
    ["config", "set-key", "openai", "sk-0123456789abcdef"],
    ["config", "list-keys"],
]


@pytest.mark.parametrize("args", CONFIG_COMMANDS, ids=lambda a: " ".join(a[:2]))
def test_missing_config_file(tmp_path, cli_main, args):
    missing = str(tmp_path / "nowhere" / "config.yaml")
    assert_one_line_error(cli_main(*args, env={"CONFIG_PATH": missing}), missing, "not found")


@pytest.mark.parametrize("args", CONFIG_COMMANDS + [["init"]], ids=lambda a: " ".join(a[:2]))
def test_invalid_config_file(tmp_path, cli_main, args):
    (tmp_path / "config.yaml").write_text("server:\n  port: 8000\nsurprise: true\n")
    assert_one_line_error(cli_main(*args), "surprise")


def test_serve_config_errors_as_a_process(tmp_path):
    missing = str(tmp_path / "nowhere.yaml")
    assert_one_line_error(cli_run(tmp_path, "serve", env={"CONFIG_PATH": missing}), missing, "not found")
    (tmp_path / "config.yaml").write_text("providers:\n  openai: {base_url: ftp://example.com}\n")
    assert_one_line_error(cli_run(tmp_path, "serve"), "providers.openai.base_url")


def test_llmgw_py_reports_a_missing_config(tmp_path):
    env = dict(os.environ, **paths_env(tmp_path, CONFIG_PATH=str(tmp_path / "absent.yaml")))
    result = subprocess.run([sys.executable, os.path.join(ROOT, "llmgw.py")], cwd=str(tmp_path), env=env,
                            capture_output=True, text=True, timeout=30)
    assert_one_line_error(result, "absent.yaml")


def test_unknown_command_fails():
    result = run_cli(["frobnicate"], ROOT)
    assert result.returncode == 2
    assert "invalid choice" in result.stderr


# ---- the files themselves -------------------------------------------------------------

def test_help(capsys):
    result = run_cli(["--help"], ROOT, check=True)
    for command in ("init", "serve", "keys", "config", "stats", "admin-token"):
        assert command in result.stdout
    for sub in (["keys", "--help"], ["config", "--help"], ["stats", "--help"], ["serve", "--help"]):
        with pytest.raises(SystemExit) as exit_info:
            cli.main(sub)
        assert exit_info.value.code == 0
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip().endswith("llmgw " + llmgw.__version__)


def test_import_is_silent_and_writes_nothing(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT, PYTHONDONTWRITEBYTECODE="1")
    result = subprocess.run([sys.executable, "-c", "import llmgw, cli"], cwd=str(tmp_path), env=env,
                            capture_output=True, text=True, timeout=30)
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")
    assert os.listdir(str(tmp_path)) == []


@pytest.mark.parametrize("name", ["llmgw.py", "cli.py"])
def test_imports_only_stdlib_and_yaml(name):
    """The standard library and PyYAML; pg8000 only inside a function (the
    PostgreSQL backend's, run only when a postgresql:// URL is configured),
    so importing llmgw and cli loads no pg8000."""
    if not hasattr(sys, "stdlib_module_names"):
        pytest.skip("sys.stdlib_module_names is Python 3.10+")
    with open(os.path.join(ROOT, name), encoding="utf-8") as f:
        tree = ast.parse(f.read())
    allowed = set(sys.stdlib_module_names) | {"yaml", "llmgw"}

    def imports(nodes):
        found = set()
        for node in nodes:
            if isinstance(node, ast.Import):
                found.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                assert node.level == 0, "relative import in %s" % name
                found.add(node.module.split(".")[0])
        return found
    lazy = {id(inner) for node in ast.walk(tree) if isinstance(node, ast.FunctionDef) for inner in ast.walk(node)}
    at_import_time = imports(node for node in ast.walk(tree) if id(node) not in lazy)
    in_functions = imports(node for node in ast.walk(tree) if id(node) in lazy)
    assert at_import_time and at_import_time <= allowed, at_import_time - allowed
    assert in_functions <= allowed | {"pg8000"}, in_functions - allowed
    loaded = subprocess.run([sys.executable, "-c", "import sys, llmgw, cli; print('pg8000' in sys.modules)"],
                            cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert loaded.stdout.strip() == "False", loaded


@pytest.mark.sqlite_only("whether the SQLite file is created (a PostgreSQL database is created by its operator)")
def test_commands_other_than_init_never_create_the_database(tmp_path):
    write_config(tmp_path / "config.yaml", "http://127.0.0.1:9")
    for args in (("keys", "list"), ("stats",), ("admin-token",), ("keys", "revoke", "vk_x")):
        assert_one_line_error(cli_run(tmp_path, *args), "not found", "cli.py init")
    assert not (tmp_path / "gateway.db").exists()


def test_set_key_reads_the_key_from_stdin(tmp_path, database):
    """``config set-key PROVIDER -`` keeps the key out of argv (ps, shell history)."""
    write_config(tmp_path / "config.yaml", "http://127.0.0.1:9", **database.config())
    secret = "sk-from-stdin-0123456789abcdef"
    result = subprocess.run([sys.executable, os.path.join(ROOT, "cli.py"), "config", "set-key", "openai", "-"], input=secret + "\n",
                            cwd=str(tmp_path), env=dict(os.environ, **paths_env(tmp_path)), capture_output=True,
                            text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert secret not in result.stdout
    store = database.open_store()
    try:
        assert store.provider_keys() == {"openai": secret}
    finally:
        store.close()


def test_cli_uses_only_the_names_llmgw_exports():
    """cli.py reaches into llmgw only through ``__all__`` (and __version__),
    and every exported name exists."""
    with open(cli.__file__, encoding="utf-8") as f:
        tree = ast.parse(f.read())
    used = {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name) and node.value.id == "llmgw"}
    assert used - {"__version__"} <= set(llmgw.__all__), sorted(used - set(llmgw.__all__))
    assert all(hasattr(llmgw, name) for name in llmgw.__all__)


def test_cli_and_admin_api_refuse_alike(make_gateway, monkeypatch, capsys, tmp_path):
    """One administration function per action: the same failure is the
    same message from the CLI (one line, exit 1) and the admin API."""
    gateway = make_gateway(environ={"LLMGW_ADMIN_TOKEN": ADMIN_TOKEN})
    plain = gateway.create_key("plain")[0]["id"]
    for name, value in cli_env(gateway, tmp_path, {"logging": {"level": "INFO"}}).items():
        monkeypatch.setenv(name, value)
    cases = [(["keys", "revoke", "vk_000000000000"], "DELETE", "/admin/virtual-keys/vk_000000000000", None),
             (["keys", "rotate", "vk_000000000000"], "POST", "/admin/virtual-keys/vk_000000000000/rotate", {}),
             (["keys", "topup", plain, "5"], "POST", "/admin/virtual-keys/%s/topup" % plain, {"amount": 5}),
             (["keys", "update", "vk_000000000000", "--rpm", "5"], "PATCH", "/admin/virtual-keys/vk_000000000000",
              {"rpm": 5}),
             (["keys", "rotate", plain, "--grace", "soon"], "POST", "/admin/virtual-keys/%s/rotate" % plain,
              {"grace": "soon"})]
    for argv, method, path, body in cases:
        assert cli.main(argv) == 1
        line = capsys.readouterr().err.strip()
        reply = admin(gateway, method, path, body)
        assert reply.status in (400, 404), (argv, reply)
        assert line == "error: " + reply.json()["error"]["message"], argv
