"""OpenAI-compatible providers as config alone: README's recipes, as written.

Each recipe block under "Provider recipes" in README.md is parsed and run
against a fake provider serving the API under the recipe's own base path
(``FakeUpstream(root=...)``) in that provider's quirks (PROTOCOLS.md
section 4): Gemini's usage repeated on every chunk, DeepSeek's cache-hit
fields, OpenRouter's cost fields and keep-alive comments, Groq's
``x_groq.usage``, Mistral's usage on the last chunk, Ollama's and vLLM's
``/v1`` root. Plain, streamed, error and model-list calls; usage and cost
exact to the token and nano-dollar.
"""

import json
import os
import re
import urllib.parse

import pytest
import yaml

import llmgw

from conftest import (CHAT, EMBEDDINGS, MESSAGES, ROOT, RunningGateway, assert_json_error, call, expected_cost, post,
                      settled_rows, sse_events, tokens_of, TOKEN_COLUMNS)
from fake_upstream import FakeUpstream

pytestmark = pytest.mark.usefixtures("clean_environment")

#: recipe -> (model the client sends, the provider's quirk tokens on the fake)
RECIPES = {
    "gemini": ("gemini-2.5-flash", "everychunk"),
    "openrouter": ("openrouter/anthropic/claude-sonnet-4.5", "orcost"),
    "groq": ("llama-3.3-70b-versatile", "xgroq"),
    "together": ("together/meta-llama/Llama-3.3-70B-Instruct-Turbo", ""),
    "deepseek": ("deepseek-chat", "deepseekcache"),
    "mistral": ("mistral-large-latest", "usagelast"),
    "ollama": ("ollama/llama3.2", ""),
    "vllm": ("vllm/Qwen/Qwen3-8B", "everychunk"),
}
#: Test prices (USD per million) for every recipe's model, so cost is exact.
PRICE = {"input": 1.25, "output": 10, "cached_input": 0.125}


def readme_recipes():
    """provider name -> config entry, from the yaml blocks of README's
    "Provider recipes" section."""
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as handle:
        text = handle.read()
    section = text.split("### Provider recipes", 1)[1].split("\n## ", 1)[0]
    providers = {}
    for block in re.findall(r"```yaml\n(.*?)```", section, re.S):
        providers.update(yaml.safe_load(block)["providers"])
    return providers


RECIPE_CONFIG = readme_recipes()


def upstream_model(model):
    name = model.split("/", 1)
    return name[1] if name[0] in RECIPES else model


def expected_columns(usage):
    """A row's token columns for an OpenAI-compatible ``usage``, computed
    here: cache hits from prompt_tokens_details or DeepSeek's fields."""
    cached = usage.get("prompt_tokens_details", {}).get("cached_tokens", usage.get("prompt_cache_hit_tokens", 0))
    columns = dict.fromkeys(TOKEN_COLUMNS, 0)
    columns.update(request_tokens=usage["prompt_tokens"], response_tokens=usage["completion_tokens"],
                   input_tokens=usage["prompt_tokens"] - cached, cache_read_tokens=cached,
                   output_tokens=usage["completion_tokens"],
                   reasoning_tokens=usage.get("completion_tokens_details", {}).get("reasoning_tokens", 0))
    return columns


@pytest.fixture(params=sorted(RECIPES))
def recipe(request, db):
    """(name, gateway, fake provider, model, key): the README recipe's
    provider pointed at a fake at the recipe's own path."""
    name = request.param
    entry = dict(RECIPE_CONFIG[name])
    base = urllib.parse.urlsplit(entry["base_url"])
    model, quirks = RECIPES[name]
    fake = FakeUpstream(root=base.path or "/v1", faults=quirks).start()
    entry["base_url"] = fake.url + base.path
    key = entry.get("api_key") or "sk-%s-0123456789abcdef" % name
    document = {"server": {"host": "127.0.0.1", "port": 0, "drain_timeout": 2},
                "providers": {name: entry}, "pricing": {upstream_model(model): PRICE}}
    gateway = RunningGateway(db.config(document), db.db_path, environ={"%s_API_KEY" % name.upper(): key})
    try:
        yield name, gateway, fake, model, key
    finally:
        gateway.stop()
        fake.stop()
        gateway.assert_books_balanced()


def test_every_provider_of_the_issue_has_a_recipe():
    assert set(RECIPE_CONFIG) == set(RECIPES) | {"deepseek-anthropic", "azure", "azure-v1"}


def test_plain_call_goes_to_the_recipes_path_and_is_metered_exactly(recipe):
    name, gateway, fake, model, key = recipe
    vkey = gateway.create_key()[1]
    response = post(gateway, CHAT, {"model": model, "messages": [{"role": "user", "content": "hi"}]}, vkey)
    assert response.status == 200, response
    sent = fake.requests[-1]
    root = urllib.parse.urlsplit(RECIPE_CONFIG[name]["base_url"]).path or "/v1"
    assert sent["path"] == root + "/chat/completions"
    assert sent["headers"]["authorization"] == "Bearer " + key
    assert sent["json"]["model"] == upstream_model(model)
    usage = response.json()["usage"]
    assert usage == fake.reported[-1]["usage"]  # the client's body unchanged, quirks and all
    (row,) = settled_rows(gateway)
    columns = expected_columns(usage)
    assert (row["status"], row["usage_source"], row["provider"]) == ("ok", "reported", name)
    assert tokens_of(row) == columns
    assert row["cost_nanousd"] == expected_cost(columns, PRICE["input"], PRICE["output"], PRICE["cached_input"])


def test_stream_is_metered_once_from_the_providers_last_usage(recipe):
    name, gateway, fake, model, key = recipe
    vkey = gateway.create_key()[1]
    response = post(gateway, CHAT, {"model": model, "stream": True,
                                    "messages": [{"role": "user", "content": "hello"}]}, vkey)
    assert response.status == 200, response
    assert fake.requests[-1]["json"]["stream_options"] == {"include_usage": True}
    events = sse_events(response.body)
    assert events[-1] == (None, "[DONE]")
    chunks = [json.loads(data) for _, data in events[:-1] if data]  # not OpenRouter's comment
    text = "".join(choice["delta"].get("content") or "" for chunk in chunks for choice in chunk["choices"])
    assert text == "Hello from the fake upstream."
    # The client did not ask for usage: no usage-only chunk reaches it.
    assert not any(chunk["choices"] == [] and chunk.get("usage") for chunk in chunks)
    final = fake.reported[-1]["usage"]
    (row,) = settled_rows(gateway)
    columns = expected_columns(final)
    assert (row["status"], row["usage_source"]) == ("ok", "reported")
    assert tokens_of(row) == columns
    assert row["cost_nanousd"] == expected_cost(columns, PRICE["input"], PRICE["output"], PRICE["cached_input"])
    if "everychunk" in RECIPES[name][1]:  # repeated, cumulative: the last one counts, never a sum
        repeated = [chunk["usage"]["completion_tokens"] for chunk in chunks if chunk.get("usage")]
        assert len(repeated) > 2 and repeated[-1] == final["completion_tokens"] < sum(repeated)
    if name == "openrouter":
        assert response.body.startswith(b": OPENROUTER PROCESSING\n\n")


def test_provider_error_reaches_the_client_in_its_shape(recipe):
    name, gateway, fake, model, key = recipe
    vkey = gateway.create_key()[1]
    fake.script = ["fail400"]
    response = post(gateway, CHAT, {"model": model, "messages": [{"role": "user", "content": "hi"}]}, vkey)
    payload = assert_json_error(response, 400)
    assert "fail400" in payload["error"]["message"]
    (row,) = settled_rows(gateway)
    assert (row["status"], row["http_status"], row["request_tokens"]) == ("upstream_error", 400, 0)


def test_model_list_comes_from_the_recipes_path(recipe):
    name, gateway, fake, model, key = recipe
    vkey = gateway.create_key()[1]
    response = call(gateway, "GET", "/v1/models", key=vkey)
    assert response.status == 200, response
    root = urllib.parse.urlsplit(RECIPE_CONFIG[name]["base_url"]).path or "/v1"
    assert fake.requests[-1]["path"] == root + "/models"


def test_anthropic_format_base_path_is_followed_by_the_whole_path(db):
    """DeepSeek's Anthropic-format endpoint: base .../anthropic, and the
    Anthropic SDK's /v1/messages after it."""
    entry = dict(RECIPE_CONFIG["deepseek-anthropic"])
    base_path = urllib.parse.urlsplit(entry["base_url"]).path
    with FakeUpstream(root=base_path + "/v1") as fake:
        entry["base_url"] = fake.url + base_path
        document = {"server": {"host": "127.0.0.1", "port": 0, "drain_timeout": 2},
                    "providers": {"deepseek-anthropic": entry}}
        gateway = RunningGateway(db.config(document), db.db_path,
                                 environ={"DEEPSEEK_ANTHROPIC_API_KEY": "sk-deepseek-0123456789"})
        try:
            vkey = gateway.create_key()[1]
            response = post(gateway, MESSAGES, {"model": "deepseek-chat", "max_tokens": 16,
                                                "messages": [{"role": "user", "content": "hi"}]},
                            vkey, headers={"anthropic-version": "2023-06-01"})
            assert response.status == 200, response
            assert fake.requests[-1]["path"] == "/anthropic/v1/messages"
            assert fake.requests[-1]["headers"]["x-api-key"] == "sk-deepseek-0123456789"
            (row,) = settled_rows(gateway)
            assert row["request_tokens"] == fake.reported[-1]["usage"]["input_tokens"]
        finally:
            gateway.stop()


def test_host_only_base_url_still_means_v1(db):
    with FakeUpstream() as fake:
        document = {"server": {"host": "127.0.0.1", "port": 0, "drain_timeout": 2},
                    "providers": {"openai": {"base_url": fake.url + "/", "api_key": "sk-plain-0123456789"}}}
        gateway = RunningGateway(db.config(document), db.db_path)
        try:
            vkey = gateway.create_key()[1]
            response = post(gateway, CHAT, {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x"}]},
                            vkey)
            assert response.status == 200, response
            assert fake.requests[-1]["path"] == "/v1/chat/completions"
        finally:
            gateway.stop()


# ---- Azure OpenAI --------------------------------------------------------------------

AZURE_KEY = "azure-key-0123456789abcdef"
#: Built-in list prices of gpt-4o: Azure usage is priced by the model's name, not its deployment's.
GPT_4O = (2.5, 10, 1.25)


@pytest.fixture(params=["azure", "azure-v1"])
def azure(request, db):
    """(name, gateway, fake, README entry): the README's Azure recipe against
    a fake Azure: the classic API's deployment paths and api-version, or
    the v1 API's root."""
    name = request.param
    entry = dict(RECIPE_CONFIG[name])
    base_path = urllib.parse.urlsplit(entry["base_url"]).path
    classic = "api_version" in entry
    fake = FakeUpstream(root=base_path, azure=classic).start()
    document = {"server": {"host": "127.0.0.1", "port": 0, "drain_timeout": 2},
                "providers": {name: dict(entry, base_url=fake.url + base_path)}, "routing": {"retries": 0}}
    gateway = RunningGateway(db.config(document), db.db_path,
                             environ={"%s_API_KEY" % name.upper().replace("-", "_"): AZURE_KEY})
    try:
        yield name, gateway, fake, RECIPE_CONFIG[name]
    finally:
        gateway.stop()
        fake.stop()
        gateway.assert_books_balanced()


def azure_target(entry, path, model):
    """Where Azure serves ``path`` for ``model``, worked out here from the recipe."""
    base = urllib.parse.urlsplit(entry["base_url"]).path
    deployment = entry["deployments"].get(model, model)
    if "api_version" not in entry:
        return base + path[3:]
    if path in (CHAT, EMBEDDINGS):
        base += "/deployments/" + deployment
    return "%s%s?api-version=%s" % (base, path[3:], entry["api_version"])


def test_azure_call_goes_to_the_deployment_with_the_api_key_header(azure):
    name, gateway, fake, entry = azure
    model = sorted(entry["deployments"])[0]
    vkey = gateway.create_key()[1]
    response = post(gateway, CHAT, {"model": model, "messages": [{"role": "user", "content": "hi"}]}, vkey)
    assert response.status == 200, response
    sent = fake.requests[-1]
    assert sent["path"] == azure_target(entry, CHAT, model)
    assert sent["deployment"] == (entry["deployments"][model] if "api_version" in entry else None)
    assert sent["headers"]["api-key"] == AZURE_KEY
    assert "authorization" not in sent["headers"]
    assert sent["json"]["model"] == entry["deployments"][model]  # the v1 API takes the deployment as model
    (row,) = settled_rows(gateway)
    columns = expected_columns(fake.reported[-1]["usage"])
    assert (row["provider"], row["model"], row["status"]) == (name, model, "ok")
    assert tokens_of(row) == columns
    if model == "gpt-4o":
        assert row["cost_nanousd"] == expected_cost(columns, *GPT_4O)
    assert response.header("x-llmgw-served-by") == "%s/%s" % (name, model)


def test_azure_stream_with_content_filter_chunks_is_metered_exactly(azure):
    name, gateway, fake, entry = azure
    model = sorted(entry["deployments"])[0]
    vkey = gateway.create_key()[1]
    fake.faults = "azurefilter cache"
    response = post(gateway, CHAT, {"model": model, "stream": True,
                                    "messages": [{"role": "user", "content": "stream"}]}, vkey)
    assert response.status == 200, response
    assert fake.requests[-1]["path"] == azure_target(entry, CHAT, model)
    chunks = [json.loads(data) for _, data in sse_events(response.body)[:-1]]
    assert chunks[0]["choices"] == [] and "prompt_filter_results" in chunks[0]  # Azure's, passed through
    assert not any(chunk.get("usage") for chunk in chunks)  # the usage chunk the client did not ask for
    (row,) = settled_rows(gateway)
    columns = expected_columns(fake.reported[-1]["usage"])
    assert columns["cache_read_tokens"] > 0
    assert tokens_of(row) == columns
    if model == "gpt-4o":
        assert row["cost_nanousd"] == expected_cost(columns, *GPT_4O)


def test_azure_model_without_a_mapping_is_its_own_deployment(azure):
    name, gateway, fake, entry = azure
    vkey = gateway.create_key()[1]
    model = "gpt-4o-mini-embed" if name == "azure" else "gpt-4.1-embed"
    response = post(gateway, EMBEDDINGS, {"model": model, "input": ["a", "b"]}, vkey)
    assert response.status == 200, response
    assert fake.requests[-1]["path"] == azure_target(entry, EMBEDDINGS, model)
    assert fake.requests[-1]["json"]["model"] == model
    (row,) = settled_rows(gateway)
    assert row["request_tokens"] == fake.reported[-1]["usage"]["prompt_tokens"]


def test_azure_model_list_is_versioned_not_deployed(azure):
    name, gateway, fake, entry = azure
    vkey = gateway.create_key()[1]
    response = call(gateway, "GET", "/v1/models", key=vkey)
    assert response.status == 200, response
    assert fake.requests[-1]["path"] == azure_target(entry, "/v1/models", None)


@pytest.mark.parametrize("fault, status", [("fail400", 400), ("fail429", 429), ("fail500", 500)])
def test_azure_errors_reach_the_client(azure, fault, status):
    name, gateway, fake, entry = azure
    model = sorted(entry["deployments"])[0]
    vkey = gateway.create_key()[1]
    fake.script = [fault]
    response = post(gateway, CHAT, {"model": model, "messages": [{"role": "user", "content": "hi"}]}, vkey)
    payload = assert_json_error(response, status)
    assert fault in payload["error"]["message"]
    if status == 429:
        assert response.header("retry-after") == "7"
    (row,) = settled_rows(gateway)
    assert (row["status"], row["http_status"], row["request_tokens"]) == ("upstream_error", status, 0)


@pytest.mark.parametrize("change, named", [
    ({"format": "openai"}, "providers.azure.api_version: only for format: azure"),
    ({"api_version": 20241021}, "providers.azure.api_version"),
    ({"api_version": "2024-10-21/../x"}, "providers.azure.api_version"),
    ({"deployments": {"gpt-4o": "../admin"}}, "providers.azure.deployments"),
    ({"deployments": ["gpt-4o"]}, "providers.azure.deployments"),
    ({"base_url": "https://my-resource.openai.azure.com/"}, "providers.azure.base_url: give Azure's path too"),
])
def test_bad_azure_settings_are_named(change, named):
    entry = dict(RECIPE_CONFIG["azure"], **change)
    with pytest.raises(llmgw.ConfigError) as error:
        llmgw.parse_config({"providers": {"azure": entry}})
    assert named in str(error.value)


def test_openai_sdk_through_each_recipe(recipe):
    """The official openai SDK, unchanged, through each recipe: a call, and a
    stream that asks for usage (Gemini's repeated usage, Groq's x_groq and
    Mistral's finish-chunk usage included). Skipped without the package."""
    openai = pytest.importorskip("openai")
    name, gateway, fake, model, key = recipe
    client = openai.OpenAI(base_url=gateway.url + "/v1", api_key=gateway.create_key()[1], max_retries=0)
    messages = [{"role": "user", "content": "sdk"}]
    completion = client.chat.completions.create(model=model, messages=messages)
    assert completion.choices[0].message.content == "Hello from the fake upstream."
    assert completion.usage.prompt_tokens == fake.reported[-1]["usage"]["prompt_tokens"]
    chunks = list(client.chat.completions.create(model=model, messages=messages, stream=True,
                                                 stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Hello from the fake upstream."
    rows = settled_rows(gateway, 2)
    assert tokens_of(rows[-1]) == expected_columns(fake.reported[-1]["usage"])


def test_openai_sdk_through_azure(azure):
    openai = pytest.importorskip("openai")
    name, gateway, fake, entry = azure
    model = sorted(entry["deployments"])[0]
    client = openai.OpenAI(base_url=gateway.url + "/v1", api_key=gateway.create_key()[1], max_retries=0)
    chunks = list(client.chat.completions.create(model=model, messages=[{"role": "user", "content": "sdk"}],
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].usage.completion_tokens == fake.reported[-1]["usage"]["completion_tokens"]
    assert fake.requests[-1]["path"] == azure_target(entry, CHAT, model)
    (row,) = settled_rows(gateway)
    assert tokens_of(row) == expected_columns(fake.reported[-1]["usage"])
