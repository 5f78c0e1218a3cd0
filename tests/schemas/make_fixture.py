"""Make tests/schemas/vN-REV.db: a small database written by an earlier llmgw.

    python tests/schemas/make_fixture.py REV N

takes llmgw.py as it was at git revision REV (schema version N), lets its
own Store create the database, and adds the same few rows to every version:
a virtual key (secret FIXTURE_SECRET), a provider key, two settled usage
rows. tests/test_operations.py migrates each fixture with today's llmgw.
Run it with the revision just before a schema change, for the version that
change leaves behind (the test names the command when a fixture is missing).

Version 1 is five schemas, all stamped user_version 1 (the schema grew
before versions were counted): 3e280e4, 2640d82, 17e20fc, fdaa333, 77e64b7.
"""

import hashlib
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURE_SECRET = "llmgw-fixture-secret-0123456789abcdefghijklmnop"
KEY_ID = "vk_fixture0001"
#: (request id, model, request tokens, response tokens, cost in nano-USD)
USAGE_ROWS = [("req-fixture-1", "gpt-4o-mini", 120, 30, 36000),
              ("req-fixture-2", "claude-haiku-4-5", 200, 50, 450000)]

#: Run by the old llmgw's interpreter: its Store (SQLiteStore since the
#: PostgreSQL backend) makes the schema; these columns exist in every version.
WRITE = r"""
import sqlite3, sys
import llmgw
path, key_hash, key_id, rows = sys.argv[1], sys.argv[2], sys.argv[3], eval(sys.argv[4])
getattr(llmgw, "SQLiteStore", llmgw.Store)(path).close()
conn = sqlite3.connect(path)
with conn:
    conn.execute("INSERT INTO virtual_keys (id, key_hash, key_hint, project_name, tier, rpm, is_active, created_at)"
                 " VALUES (?, ?, 'llmgw-...mnop', 'fixture project', 'default', NULL, 1, 1764000000.0)",
                 (key_id, key_hash))
    conn.execute("INSERT INTO provider_keys (provider, api_key, updated_at) VALUES ('openai', 'sk-fixture-123456', 1764000000.0)")
    for number, (request_id, model, request_tokens, response_tokens, cost) in enumerate(rows):
        conn.execute("INSERT INTO usage (request_id, virtual_key_id, provider, endpoint, model, streamed, status,"
                     " http_status, usage_source, request_tokens, response_tokens, input_tokens, output_tokens,"
                     " cost_nanousd, started_at, finished_at, latency_ms)"
                     " VALUES (?, ?, 'openai', '/v1/chat/completions', ?, 0, 'ok', 200, 'reported', ?, ?, ?, ?, ?, ?, ?, 12.5)",
                     (request_id, key_id, model, request_tokens, response_tokens, request_tokens, response_tokens,
                      cost, 1764000000.0 + number, 1764000001.0 + number))
    if hasattr(llmgw, "ROLL_UP_ALL"):  # schema 2 on: settled rows are in the rollups too
        for statement in [llmgw.ROLL_UP_ALL] if isinstance(llmgw.ROLL_UP_ALL, str) else llmgw.ROLL_UP_ALL:
            conn.execute(statement)
conn.execute("PRAGMA journal_mode = DELETE")
conn.execute("PRAGMA page_size = 1024")
conn.execute("VACUUM")
conn.close()
"""


def make(revision, version):
    target = os.path.join(HERE, "v%d-%s.db" % (version, revision))
    if os.path.exists(target):
        os.unlink(target)
    source = subprocess.run(["git", "show", "%s:llmgw.py" % revision], cwd=HERE, check=True,
                            capture_output=True).stdout
    with tempfile.TemporaryDirectory() as scratch:
        with open(os.path.join(scratch, "llmgw.py"), "wb") as f:
            f.write(source)
        subprocess.run([sys.executable, "-c", WRITE, target, hashlib.sha256(FIXTURE_SECRET.encode()).hexdigest(),
                        KEY_ID, repr(USAGE_ROWS)], cwd=scratch, check=True,
                       env=dict(os.environ, PYTHONPATH=scratch, PYTHONDONTWRITEBYTECODE="1"))
    return target


if __name__ == "__main__":
    print(make(sys.argv[1], int(sys.argv[2])))
