"""Metering you can bill from: price packs, re-pricing, unpriced models.

The token-exactness tests per endpoint live in test_proxy.py and
test_streaming.py; these cover how prices reach the books.
"""

import json

import yaml

import llmgw
from conftest import CHAT, cli_env, expected_columns, expected_cost, post, run_cli

LITELLM_PACK = {
    "sample_spec": {"input_cost_per_token": 0.0, "output_cost_per_token": 0.0, "mode": "chat"},
    "gpt-4o": {"litellm_provider": "openai", "mode": "chat", "input_cost_per_token": 2e-06,
               "output_cost_per_token": 8e-06, "cache_read_input_token_cost": 5e-07},
    "mistral/mistral-large-latest": {"litellm_provider": "mistral", "mode": "chat",
                                     "input_cost_per_token": 5e-07, "output_cost_per_token": 1.5e-06},
    "text-embedding-9": {"mode": "embedding", "input_cost_per_token": 1e-07},
    "dall-e-3": {"mode": "image_generation", "input_cost_per_token": 1.0, "output_cost_per_token": 1.0},
    "half-known": {"mode": "chat", "input_cost_per_token": 1e-06},
}


def template_env(gateway, tmp_path):
    """The CLI on the gateway's database, with the shipped config.yaml's settings."""
    return cli_env(gateway, tmp_path, yaml.safe_load(llmgw.CONFIG_TEMPLATE))


def chat_cost(usage, input_price, output_price, cached_price):
    """nano-USD for an OpenAI chat usage object at per-million prices."""
    return expected_cost(expected_columns(CHAT, usage), input_price, output_price, cached=cached_price)


def test_litellm_pack_parsed_per_million_and_skipping_unknowns():
    prices = llmgw.parse_price_pack(LITELLM_PACK)
    assert prices["gpt-4o"]["input"] == "2" and prices["gpt-4o"]["output"] == "8"
    assert prices["gpt-4o"]["cached_input"] == "0.5"
    assert prices["mistral-large-latest"] == prices["mistral/mistral-large-latest"]  # bare name priced too
    assert prices["text-embedding-9"]["output"] == "0"
    assert "sample_spec" not in prices and "dall-e-3" not in prices
    assert "half-known" not in prices  # an unknown output price is not zero


def test_own_pack_format_is_the_shared_reference_format():
    pack = {"_meta": {}, "models": {"m": {"provider": "x", "input_per_mtok": 1.5, "output_per_mtok": 3,
                                          "cache_read_per_mtok": 0.15, "cache_write_per_mtok": 1.875}}}
    assert llmgw.parse_price_pack(pack) == {"m": {"input": 1.5, "output": 3, "cached_input": 0.15,
                                                  "cache_write": 1.875, "cache_write_1h": None}}


def test_imported_litellm_prices_reach_a_running_gateway(gateway, upstream, vkey, tmp_path):
    first = post(gateway, "/v1/chat/completions", {"model": "gpt-4o", "messages": []}, vkey)
    assert first.status == 200
    pack = tmp_path / "model_prices_and_context_window.json"
    pack.write_text(json.dumps(dict(LITELLM_PACK, **{"gpt-4o-cache": LITELLM_PACK["gpt-4o"]})))
    result = run_cli(["prices", "import", str(pack)], tmp_path, env=template_env(gateway, tmp_path))
    assert result.returncode == 0, result.stderr
    second = post(gateway, "/v1/chat/completions", {"model": "gpt-4o-cache", "messages": [{"role": "user",
                                                                                         "content": "x"}]}, vkey)
    assert second.status == 200
    rows = gateway.rows()
    usage = upstream.reported[-1]["usage"]
    assert rows[-1]["cost_nanousd"] == chat_cost(usage, 2, 8, 0.5)
    assert rows[0]["cost_nanousd"] == chat_cost(upstream.reported[0]["usage"], 2.5, 10, 1.25)

    listing = run_cli(["prices", "list", "--output", "json"], tmp_path, env=template_env(gateway, tmp_path))
    by_model = {row["model"]: row for row in json.loads(listing.stdout)}
    assert by_model["gpt-4o"]["source"].startswith("imported model_prices_and_context_window.json")
    assert by_model["gpt-4o"]["input"] == 2.0
    assert by_model["claude-3-sonnet-20240229"]["source"].startswith("built-in")


def test_config_pricing_beats_imported_and_built_in(make_gateway, upstream, tmp_path):
    gateway = make_gateway(pricing={"gpt-4o": {"input": 1, "output": 1}})
    gateway.store.import_prices(llmgw.parse_price_pack(LITELLM_PACK), "imported pack")
    key = gateway.create_key()[1]
    assert post(gateway, "/v1/chat/completions", {"model": "gpt-4o", "messages": []}, key).status == 200
    usage = upstream.reported[-1]["usage"]
    assert gateway.rows()[-1]["cost_nanousd"] == (usage["prompt_tokens"] + usage["completion_tokens"]) * 1000


def test_reprice_shows_old_and_new_totals_and_applies(gateway, upstream, vkey, tmp_path):
    for model in ("gpt-4o", "gpt-4o-cache", "claude-3-sonnet-20240229"):
        assert post(gateway, "/v1/chat/completions", {"model": model, "messages": []}, vkey).status == 200
    old_total = sum(row["cost_nanousd"] for row in gateway.rows())
    new_list = {"input": 1, "output": 2, "cached_input": 0.5}
    gateway.store.import_prices({"gpt-4o": new_list, "gpt-4o-cache": new_list}, "new list")
    env = template_env(gateway, tmp_path)

    dry = json.loads(run_cli(["stats", "--reprice", "--output", "json"], tmp_path, env=env).stdout)
    assert dry["rows"] == 3 and dry["changed_rows"] == 2 and not dry["applied"]
    assert dry["old_cost"] == llmgw.nanousd_to_usd(old_total)
    assert sum(row["cost_nanousd"] for row in gateway.rows()) == old_total  # nothing written

    table = run_cli(["stats", "--reprice"], tmp_path, env=env).stdout
    assert "Old total" in table and "New total" in table and "--apply" in table

    applied = json.loads(run_cli(["stats", "--reprice", "--apply", "--output", "json"], tmp_path, env=env).stdout)
    rows = gateway.rows()
    reported = {r["request_index"]: r["usage"] for r in upstream.reported}
    assert rows[0]["cost_nanousd"] == chat_cost(reported[0], 1, 2, 0.5)
    assert rows[1]["cost_nanousd"] == chat_cost(reported[1], 1, 2, 0.5)
    assert applied["new_cost"] == llmgw.nanousd_to_usd(sum(row["cost_nanousd"] for row in rows))
    again = json.loads(run_cli(["stats", "--reprice", "--output", "json"], tmp_path, env=env).stdout)
    assert again["changed_rows"] == 0


def test_unpriced_models_are_listed_with_their_tokens(gateway, vkey, tmp_path, caplog):
    for _ in range(2):
        assert post(gateway, "/v1/chat/completions", {"model": "nopricemodel", "messages": []}, vkey).status == 200
    rows = gateway.rows()
    assert [row["priced"] for row in rows] == [0, 0] and [row["cost_nanousd"] for row in rows] == [0, 0]
    output = run_cli(["stats"], tmp_path, env=template_env(gateway, tmp_path)).stdout
    section = output.split("Unpriced models")[1]
    assert "nopricemodel" in section
    assert str(sum(row["request_tokens"] for row in rows)) in section
    warnings = [r for r in caplog.records if "nopricemodel" in r.getMessage() and r.levelname == "WARNING"]
    assert len(warnings) == 1  # once per model, not per request
