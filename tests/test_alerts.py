"""Budget threshold alerts: a real webhook receiver (http.server in a thread)
gets one signed JSON POST per key, period and threshold reached; failed
deliveries are retried with backoff and given up; every attempt is audited;
a webhook that hangs never holds a request up.
"""

import hashlib
import hmac
import http.server
import json
import threading
import time

import pytest
import yaml

from conftest import ADMIN_TOKEN, CHAT, admin, base_config, database_section, post, query, wait_until

import llmgw

pytestmark = [pytest.mark.usefixtures("clean_environment"), pytest.mark.both_backends]

SECRET = "whsec-CANARY-0123456789"
DAY = 86400
T0 = 1793577600 + 3600  # 2026-11-02T01:00:00Z


class Receiver:
    """A webhook endpoint: records each POST, answers from ``statuses``
    (then 200), or holds the connection while ``hold`` is set."""

    def __init__(self):
        self.received = []
        self.statuses = []
        self.hold = threading.Event()
        self.holding = threading.Event()
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["content-length"]))
                receiver.received.append((dict((k.lower(), v) for k, v in self.headers.items()), body))
                while receiver.hold.is_set():
                    receiver.holding.set()
                    time.sleep(0.02)
                status = receiver.statuses.pop(0) if receiver.statuses else 200
                self.send_response(status)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = "http://127.0.0.1:%d/hooks/llmgw" % self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()

    def payloads(self):
        return [json.loads(body) for _, body in self.received]


@pytest.fixture
def receiver():
    endpoint = Receiver()
    yield endpoint
    endpoint.hold.clear()
    endpoint.server.shutdown()
    endpoint.server.server_close()


class Clock:
    def __init__(self, now):
        self.now = now

    def __call__(self):
        return self.now


def spend_until(gateway, key, record, percent, clock=None):
    """Make calls until the key's settled spend reaches ``percent`` of its budget."""
    for number in range(200):
        spend = gateway.store.key_spend(gateway.store.find_key_by_id(record["id"]), gateway.gateway.clock())
        if spend["spent_nanousd"] * 100 >= percent * spend["allowance_nanousd"]:
            return spend
        reply = post(gateway, CHAT, {"model": "gpt-4o-mini", "max_tokens": 16,
                                     "messages": [{"role": "user", "content": "x%d" % number}]}, key=key)
        assert reply.status == 200, reply
    raise AssertionError("spend never reached %d%%" % percent)


def outbox_settled(gateway):
    """True once every queued alert was delivered or given up: none is due
    or being sent (the outbox, as another process would read it)."""
    return query(gateway, "SELECT count(*) FROM budget_alerts WHERE next_attempt_at IS NOT NULL")[0][0] == 0


def audit(gateway, action):
    return [entry for entry in gateway.store.audit_log(1000) if entry["action"] == action]


def test_thresholds_fire_once_per_key_and_period_signed(make_gateway, receiver):
    clock = Clock(T0)
    gateway = make_gateway(clock=clock, environ={"LLMGW_ALERT_SECRET": SECRET},
                           alerts={"webhook_url": receiver.url, "thresholds": [50, 25]})
    record, key = gateway.create_key("alerted", max_budget=0.001, budget_period="daily", rpm=10000)
    quiet, quiet_key = gateway.create_key("quiet", max_budget=10)
    spend_until(gateway, quiet_key, quiet, 0.0001)  # one call: far below its thresholds
    spend = spend_until(gateway, key, record, 50)
    wait_until(lambda: len(receiver.received) >= 2)
    spend_until(gateway, key, record, 60)  # no threshold crossed again
    assert wait_until(lambda: outbox_settled(gateway))  # an alert queued by those calls would be sent by now
    assert [p["threshold_pct"] for p in receiver.payloads()] == [25, 50]
    first = receiver.payloads()[1]
    assert first["type"] == "budget.threshold" and first["key_id"] == record["id"]
    assert first["project"] == "alerted" and first["budget_usd"] == 0.001 and first["budget_period"] == "daily"
    assert first["period_start"] == "2026-11-02T00:00:00Z" and first["period_end"] == "2026-11-03T00:00:00Z"
    assert first["used_pct"] >= 50 and first["spent_usd"] <= llmgw.nanousd_to_usd(spend["spent_nanousd"])
    assert first["alert_id"] == "%s/2026-11-02T00:00:00Z/50" % record["id"]
    for headers, body in receiver.received:
        assert headers["content-type"] == "application/json"
        assert headers["x-llmgw-event"] == "budget.threshold"
        expected = hmac.new(SECRET.encode(), headers["x-llmgw-timestamp"].encode() + b"." + body,
                            hashlib.sha256).hexdigest()
        assert headers["x-llmgw-signature"] == "sha256=" + expected
    assert SECRET not in json.dumps(gateway.store.audit_log(1000))
    wait_until(lambda: len(audit(gateway, "alert_delivered")) == 2)
    assert {entry["target"] for entry in audit(gateway, "alert_delivered")} == {record["id"]}
    # The next day is a new period: the thresholds fire again.
    clock.now = T0 + DAY
    spend_until(gateway, key, record, 25)
    wait_until(lambda: len(receiver.received) == 3)
    assert receiver.payloads()[2]["period_start"] == "2026-11-03T00:00:00Z"
    assert receiver.payloads()[2]["threshold_pct"] == 25


def test_without_a_secret_nothing_is_signed(make_gateway, receiver):
    gateway = make_gateway(alerts={"webhook_url": receiver.url, "thresholds": [1]})
    record, key = gateway.create_key("p", max_budget=0.01, rpm=10000)
    spend_until(gateway, key, record, 1)
    wait_until(lambda: receiver.received)
    assert "x-llmgw-signature" not in receiver.received[0][0]


def test_failed_deliveries_are_retried_with_backoff_then_given_up(make_gateway, receiver):
    receiver.statuses = [500, 503]
    gateway = make_gateway(alerts={"webhook_url": receiver.url, "thresholds": [1, 2], "retry_backoff": 0.05,
                                   "attempts": 3})
    record, key = gateway.create_key("p", max_budget=0.01, rpm=10000)
    spend_until(gateway, key, record, 1)
    wait_until(lambda: audit(gateway, "alert_delivered"))
    retrying = audit(gateway, "alert_retrying")
    assert [entry["detail"].split(": ", 1)[1] for entry in reversed(retrying)] == ["HTTP 500", "HTTP 503"]
    assert audit(gateway, "alert_delivered")[0]["detail"].endswith("attempt 3: HTTP 200")
    assert len(receiver.received) == 3 and len({body for _, body in receiver.received}) == 1
    # A receiver that keeps failing: given up after `attempts`, and audited so.
    receiver.statuses = [500] * 10
    spend_until(gateway, key, record, 2)
    wait_until(lambda: audit(gateway, "alert_abandoned"))
    assert wait_until(lambda: outbox_settled(gateway))  # given up: not due again
    assert len(receiver.received) == 6
    assert audit(gateway, "alert_abandoned")[0]["detail"].endswith("attempt 3: HTTP 500")


def test_a_hanging_webhook_never_holds_a_request(make_gateway, receiver):
    receiver.hold.set()
    gateway = make_gateway(alerts={"webhook_url": receiver.url, "thresholds": [1], "timeout": 30})
    record, key = gateway.create_key("p", max_budget=0.01, rpm=10000)
    spend_until(gateway, key, record, 1)
    assert receiver.holding.wait(5), "the alert never reached the webhook"
    # The webhook holds its connection; requests are answered meanwhile.
    for number in range(3):
        assert post(gateway, CHAT, {"model": "gpt-4o-mini", "max_tokens": 16,
                                    "messages": [{"role": "user", "content": "y%d" % number}]}, key=key).status == 200
    assert receiver.hold.is_set() and not audit(gateway, "alert_delivered")
    receiver.hold.clear()
    wait_until(lambda: audit(gateway, "alert_delivered"))


@pytest.mark.parametrize("alerts, fragment", [
    ({"webhook_url": "http://169.254.169.254/latest"}, "link-local"),
    ({"webhook_url": "http://[fe80::1]/x"}, "link-local"),
    ({"webhook_url": "file:///etc/passwd"}, "http(s)"),
    ({"webhook_url": "https://user:pw@hooks.example.com/"}, "credentials"),
    ({"thresholds": []}, "thresholds"),
    ({"thresholds": [50, "80"]}, "thresholds"),
    ({"attempts": 0}, "attempts"),
    ({"secret": "x"}, "unknown key"),
])
def test_alert_config_is_checked(alerts, fragment):
    with pytest.raises(llmgw.ConfigError, match="alerts") as error:
        llmgw.parse_config({"alerts": alerts})
    assert fragment in error.value.message


def test_a_key_may_have_thresholds_of_its_own(make_gateway, receiver, cli_main, tmp_path):
    """Per-key ``alert_thresholds`` (admin API, ``--alert-thresholds``)
    replace the config's for that key alone; cleared, the key falls back
    to them."""
    gateway = make_gateway(environ={"LLMGW_ADMIN_TOKEN": ADMIN_TOKEN},
                           alerts={"webhook_url": receiver.url, "thresholds": [50]})
    own = admin(gateway, "POST", "/admin/virtual-keys", {"project_name": "own", "max_budget": 0.001, "rpm": 10000,
                                                         "alert_thresholds": [20, 10, 20]})
    assert own.status == 201 and own.json()["alert_thresholds"] == [10, 20], own.body
    record, key = own.json(), own.json()["key"]
    fallback, fallback_key = gateway.create_key("fallback", max_budget=0.001, rpm=10000)
    assert fallback["alert_thresholds"] is None
    spend_until(gateway, key, record, 25)
    spend_until(gateway, fallback_key, fallback, 25)
    assert wait_until(lambda: outbox_settled(gateway) and len(receiver.received) == 2)
    assert [(p["key_id"], p["threshold_pct"]) for p in receiver.payloads()] == [(record["id"], 10), (record["id"], 20)]
    spend_until(gateway, fallback_key, fallback, 50)
    assert wait_until(lambda: outbox_settled(gateway) and len(receiver.received) == 3)
    assert (receiver.payloads()[2]["key_id"], receiver.payloads()[2]["threshold_pct"]) == (fallback["id"], 50)
    # The CLI sets and clears them; a cleared key uses the config's again.
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(base_config("http://127.0.0.1:9",
                                                                     **database_section(gateway.database_url))))
    updated = json.loads(cli_main("keys", "update", record["id"], "--alert-thresholds", "30, 100", check=True).stdout)
    assert updated["alert_thresholds"] == [30, 100]
    spend_until(gateway, key, record, 35)
    assert wait_until(lambda: outbox_settled(gateway) and len(receiver.received) == 4)
    assert receiver.payloads()[3]["threshold_pct"] == 30
    cleared = json.loads(cli_main("keys", "update", record["id"], "--alert-thresholds", "none", check=True).stdout)
    assert cleared["alert_thresholds"] is None
    spend_until(gateway, key, record, 50)
    assert wait_until(lambda: outbox_settled(gateway) and len(receiver.received) == 5)
    assert receiver.payloads()[4]["threshold_pct"] == 50


@pytest.mark.parametrize("thresholds", [[], [0], [1001], ["50"], [50.5], "fifty", True, {"a": 1}])
def test_bad_key_thresholds_are_refused(make_gateway, thresholds):
    gateway = make_gateway(environ={"LLMGW_ADMIN_TOKEN": ADMIN_TOKEN})
    reply = admin(gateway, "POST", "/admin/virtual-keys", {"project_name": "p", "alert_thresholds": thresholds})
    assert reply.status == 400 and reply.json()["error"]["param"].startswith("alert_thresholds"), reply.body
