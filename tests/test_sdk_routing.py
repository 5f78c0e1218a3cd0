"""The official SDKs through routing (issue 10): aliases, fallbacks before
the commit point, streams, and how the SDKs' own retries combine with the
gateway's. Skipped when the ``openai`` or ``anthropic`` package is not
installed (they are test-only: ``pip install openai anthropic``).
"""

import pytest

from conftest import ANTHROPIC_KEY, OPENAI_KEY
from fake_upstream import FakeUpstream

openai = pytest.importorskip("openai")
anthropic = pytest.importorskip("anthropic")

pytestmark = pytest.mark.usefixtures("clean_environment")


@pytest.fixture
def pair(make_gateway):
    """A failing provider and a healthy one behind one alias per API; the
    failing one first (weight 1000 to 1)."""
    broken, healthy = FakeUpstream(faults="fail500").start(), FakeUpstream().start()
    providers = {
        "broken": {"base_url": broken.url, "api_key": OPENAI_KEY},
        "healthy": {"base_url": healthy.url, "api_key": OPENAI_KEY},
        "broken-claude": {"base_url": broken.url, "api_key": ANTHROPIC_KEY, "format": "anthropic"},
        "healthy-claude": {"base_url": healthy.url, "api_key": ANTHROPIC_KEY, "format": "anthropic"},
    }
    models = {"gpt": [{"target": "broken/gpt-4o-mini", "weight": 1000}, {"target": "healthy/gpt-4o-mini"}],
              "claude": [{"target": "broken-claude/claude-haiku-4-5", "weight": 1000},
                         {"target": "healthy-claude/claude-haiku-4-5"}]}
    gateway = make_gateway(providers=providers, models=models,
                           routing={"backoff_initial": 0.01, "backoff_max": 1, "cooldown": 0.01})
    gateway.key = gateway.create_key()[1]
    yield gateway, broken, healthy
    broken.stop()
    healthy.stop()


def test_openai_sdk_chat_and_stream_through_an_alias(pair):
    gateway, _, _ = pair
    client = openai.OpenAI(base_url=gateway.url + "/v1", api_key=gateway.key, max_retries=0)
    for _ in range(3):
        completion = client.chat.completions.with_raw_response.create(
            model="gpt", messages=[{"role": "user", "content": "hi"}])
        assert completion.headers["x-llmgw-served-by"] == "healthy/gpt-4o-mini"
        assert completion.parse().choices[0].message.content == "Hello from the fake upstream."
    with client.chat.completions.stream(model="gpt", messages=[{"role": "user", "content": "hi"}]) as stream:
        final = stream.get_final_completion()
    assert final.choices[0].message.content == "Hello from the fake upstream."
    assert "gpt" in [model.id for model in client.models.list()]


def test_anthropic_sdk_message_and_stream_through_an_alias(pair):
    gateway, _, _ = pair
    client = anthropic.Anthropic(base_url=gateway.url, api_key=gateway.key, max_retries=0)
    message = client.messages.create(model="claude", max_tokens=16, messages=[{"role": "user", "content": "hi"}])
    assert message.content[0].text == "Hello from the fake upstream."
    with client.messages.stream(model="claude", max_tokens=16,
                                messages=[{"role": "user", "content": "hi"}]) as stream:
        final = stream.get_final_message()
    assert final.content[0].text == "Hello from the fake upstream."
    assert "claude" in [model.id for model in client.models.list()]


def test_sdk_retries_on_top_of_the_gateway_stay_bounded(make_gateway):
    """A provider that always fails: the SDK's 2 retries times the gateway's
    2 attempts is 6 upstream calls, each a usage row; then the SDK raises."""
    with FakeUpstream(faults="fail500").start() as broken:
        gateway = make_gateway(providers={"openai": {"base_url": broken.url, "api_key": OPENAI_KEY}},
                               routing={"backoff_initial": 0.01, "backoff_max": 1})
        key = gateway.create_key()[1]
        client = openai.OpenAI(base_url=gateway.url + "/v1", api_key=key, max_retries=2)
        with pytest.raises(openai.InternalServerError):
            client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
        assert len(broken.requests) == 6
        rows = gateway.rows()
        assert len(rows) == 6 and len({row["logical_request_id"] for row in rows}) == 3
