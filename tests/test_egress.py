"""No hidden egress: llmgw contacts its configured providers and nothing else.

Every gateway start-up, proxied call and CLI command runs under
tests/egress_guard.py, whose audit hook logs each socket connect and DNS
lookup; the only allowed peers are the fake upstream and, on PostgreSQL, the
database server.
"""

import json
import os
import signal
import subprocess
import sys
import urllib.parse

import yaml

from conftest import LISTENING, ROOT, post, run_cli, wait_until

GUARD = os.path.join(ROOT, "tests", "egress_guard.py")


def guarded(log, *args):
    """The command line running ``python ARGS`` under the egress guard."""
    return [sys.executable, GUARD, str(log), os.path.join(ROOT, args[0])] + list(args[1:])


def egress(log):
    if not log.exists():
        return []
    return [json.loads(line) for line in log.read_text().splitlines()]


def only_upstream(events, upstream_port, database):
    """Events that touch anything but the fake upstream on loopback (and
    the PostgreSQL server of ``database``, if it is one)."""
    allowed = {"('127.0.0.1', %d)" % upstream_port, "'127.0.0.1'"}
    if database.database_url is not None:
        server = urllib.parse.urlsplit(database.database_url)
        allowed.add(repr((server.hostname, server.port)))
    return [e for e in events if e.get("address", e.get("host")) not in allowed]


def shipped_config():
    with open(os.path.join(ROOT, "config.yaml")) as f:
        return yaml.safe_load(f)


def test_cli_commands_open_no_connection(tmp_path, upstream, db):
    db.write_config(tmp_path / "config.yaml", shipped_config())
    env = dict(os.environ, CONFIG_PATH=str(tmp_path / "config.yaml"), DB_PATH=db.db_path)
    env.pop("LLMGW_ADMIN_TOKEN", None)
    log = tmp_path / "egress.log"
    pack = tmp_path / "pack.json"
    pack.write_text(json.dumps({"models": {"m1": {"input_per_mtok": 1, "output_per_mtok": 2}}}))
    commands = [["cli.py", "init"], ["cli.py", "admin-token"], ["cli.py", "config", "set-key", "openai", "sk-x-123456789"],
                ["cli.py", "config", "list-keys"], ["cli.py", "keys", "create", "P", "--output", "json"],
                ["cli.py", "keys", "list"], ["cli.py", "stats"], ["cli.py", "stats", "--reprice"],
                ["cli.py", "prices", "import", str(pack)], ["cli.py", "prices", "list"], ["cli.py", "doctor"]]
    if db.database_url is None:  # PostgreSQL is backed up with pg_dump, not the CLI
        commands += [["cli.py", "backup", str(tmp_path / "backup.db")], ["cli.py", "restore", str(tmp_path / "backup.db")]]
    key_id = None
    for command in commands:
        result = subprocess.run(guarded(log, *command), env=env, cwd=str(tmp_path),
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, (command, result.stderr)
        if command[1:3] == ["keys", "create"]:
            key_id = json.loads(result.stdout)["id"]
    result = subprocess.run(guarded(log, "cli.py", "keys", "revoke", key_id), env=env,
                            cwd=str(tmp_path), capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert only_upstream(egress(log), upstream.port, db) == []


def test_gateway_contacts_only_its_provider(tmp_path, upstream, db):
    config = db.config(shipped_config())
    config["server"] = {"host": "127.0.0.1", "port": 0}
    for provider in config["providers"].values():
        provider["base_url"] = upstream.url
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    env = dict(os.environ, CONFIG_PATH=str(tmp_path / "config.yaml"), DB_PATH=db.db_path,
               OPENAI_API_KEY="sk-test-openai-1234", ANTHROPIC_API_KEY="sk-ant-test-1234")
    run_cli(["init"], tmp_path, env, timeout=60, check=True)
    created = run_cli(["keys", "create", "P", "--output", "json"], tmp_path, env, check=True)
    key = json.loads(created.stdout)["key"]
    log = tmp_path / "egress.log"
    output = tmp_path / "gateway.log"
    with open(str(output), "wb") as sink:
        server = subprocess.Popen(guarded(log, "llmgw.py"), env=env, cwd=str(tmp_path), stdout=sink,
                                  stderr=subprocess.STDOUT)
    try:
        bound = wait_until(lambda: LISTENING.findall(output.read_text()), timeout=15)
        assert bound, output.read_text()
        url = "http://127.0.0.1:%s" % bound[0]
        assert post(url, "/v1/chat/completions", {"model": "gpt-4o", "messages": []}, key).status == 200
        assert post(url, "/v1/messages", {"model": "claude-3-sonnet-20240229", "max_tokens": 5, "stream": True,
                                          "messages": []}, key).status == 200
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(10)
    events = egress(log)
    assert any(e["event"] == "socket.connect" for e in events), "the guard saw the provider calls"
    assert only_upstream(events, upstream.port, db) == []
