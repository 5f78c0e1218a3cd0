"""Usage normalisation and cost: pure functions, table-driven.

Rules: PROTOCOLS.md section 0 (metering) and section 5 (prices). Two end-to-end
tests check that the gateway charges config prices and records unpriced models
at cost 0 without failing the call.
"""

import decimal
import json
import math
import re
import os

import pytest

import llmgw
from conftest import CHAT, MESSAGES, ROOT, body_for, expected_columns, expected_cost, post

D = decimal.Decimal
PRICES_JSON = os.path.normpath(os.path.join(ROOT, "..", "shared", "prices.json"))
SQLITE_MAX_INTEGER = 2 ** 63 - 1


def usage(input=0, read=0, write=0, write_1h=0, output=0, reasoning=0, source="reported"):
    return llmgw.Usage(input_tokens=input, cache_read_tokens=read, cache_write_tokens=write,
                       cache_write_1h_tokens=write_1h, output_tokens=output, reasoning_tokens=reasoning,
                       source=source)


GARBAGE = ["12", -5, True, False, None, [3], {"n": 3}, float("nan"), float("inf"), float("-inf"), -0.5]
GARBAGE_IDS = ["string", "negative", "true", "false", "none", "list", "mapping", "nan", "inf", "-inf",
               "negative float"]


# ---- OpenAI chat / completions / embeddings -------------------------------------

OPENAI_CASES = [
    ("plain", {"prompt_tokens": 100, "completion_tokens": 50, "total_tokens": 150},
     usage(input=100, output=50)),
    ("cached and reasoning (spec example)",
     {"prompt_tokens": 1200, "completion_tokens": 300, "total_tokens": 1500,
      "prompt_tokens_details": {"cached_tokens": 1024, "audio_tokens": 0, "cache_write_tokens": 0},
      "completion_tokens_details": {"reasoning_tokens": 128, "rejected_prediction_tokens": 0}},
     usage(input=176, read=1024, output=300, reasoning=128)),
    ("cache write inside prompt",
     {"prompt_tokens": 1000, "completion_tokens": 10,
      "prompt_tokens_details": {"cached_tokens": 200, "cache_write_tokens": 300}},
     usage(input=500, read=200, write=300, output=10)),
    ("all cached", {"prompt_tokens": 64, "completion_tokens": 1, "prompt_tokens_details": {"cached_tokens": 64}},
     usage(input=0, read=64, output=1)),
    ("details missing", {"prompt_tokens": 7, "completion_tokens": 3}, usage(input=7, output=3)),
    ("details null", {"prompt_tokens": 7, "completion_tokens": 3, "prompt_tokens_details": None,
                      "completion_tokens_details": None}, usage(input=7, output=3)),
    ("details empty", {"prompt_tokens": 7, "completion_tokens": 3, "prompt_tokens_details": {},
                       "completion_tokens_details": {}}, usage(input=7, output=3)),
    ("details not objects", {"prompt_tokens": 7, "completion_tokens": 3, "prompt_tokens_details": [5],
                             "completion_tokens_details": "x"}, usage(input=7, output=3)),
    ("embeddings", {"prompt_tokens": 8, "total_tokens": 8}, usage(input=8)),
    ("deepseek hit/miss",
     {"prompt_tokens": 100, "completion_tokens": 20, "prompt_cache_hit_tokens": 60, "prompt_cache_miss_tokens": 40,
      "completion_tokens_details": {"reasoning_tokens": 15}},
     usage(input=40, read=60, output=20, reasoning=15)),
    ("deepseek hit with zero cached_tokens",
     {"prompt_tokens": 100, "completion_tokens": 20, "prompt_cache_hit_tokens": 60,
      "prompt_tokens_details": {"cached_tokens": 0}},
     usage(input=40, read=60, output=20)),
    ("float counts", {"prompt_tokens": 10.0, "completion_tokens": 4.0}, usage(input=10, output=4)),
    ("empty", {}, usage()),
    ("unknown fields ignored", {"prompt_tokens": 5, "completion_tokens": 5, "total_tokens": 10,
                                "cost": 1.5, "x_groq": {"id": "x"}}, usage(input=5, output=5)),
]


@pytest.mark.parametrize("raw, expected", [c[1:] for c in OPENAI_CASES], ids=[c[0] for c in OPENAI_CASES])
def test_openai_usage(raw, expected):
    got = llmgw.openai_usage(raw)
    assert got == expected
    assert got.request_tokens == expected.input_tokens + expected.cache_read_tokens + expected.cache_write_tokens
    assert got.response_tokens == expected.output_tokens


def test_openai_request_tokens_equal_prompt_tokens():
    raw = {"prompt_tokens": 1200, "completion_tokens": 300,
           "prompt_tokens_details": {"cached_tokens": 1024, "cache_write_tokens": 100},
           "completion_tokens_details": {"reasoning_tokens": 300}}
    got = llmgw.openai_usage(raw)
    assert (got.request_tokens, got.response_tokens) == (1200, 300)


@pytest.mark.parametrize("bad", GARBAGE, ids=GARBAGE_IDS)
def test_openai_garbage_counts_as_zero(bad):
    raw = {"prompt_tokens": bad, "completion_tokens": bad,
           "prompt_tokens_details": {"cached_tokens": bad, "cache_write_tokens": bad},
           "completion_tokens_details": {"reasoning_tokens": bad}, "prompt_cache_hit_tokens": bad}
    assert llmgw.openai_usage(raw) == usage()
    # One bad field does not spoil the good ones.
    raw = {"prompt_tokens": 50, "completion_tokens": 9,
           "prompt_tokens_details": {"cached_tokens": bad}, "completion_tokens_details": {"reasoning_tokens": bad}}
    assert llmgw.openai_usage(raw) == usage(input=50, output=9)


# ---- OpenAI Responses API ----------------------------------------------------------

RESPONSES_CASES = [
    ("spec example",
     {"input_tokens": 1200, "input_tokens_details": {"cached_tokens": 1024, "cache_write_tokens": 0},
      "output_tokens": 300, "output_tokens_details": {"reasoning_tokens": 128}, "total_tokens": 1500},
     usage(input=176, read=1024, output=300, reasoning=128)),
    ("cache write", {"input_tokens": 1000, "input_tokens_details": {"cached_tokens": 100, "cache_write_tokens": 400},
                     "output_tokens": 5}, usage(input=500, read=100, write=400, output=5)),
    ("no details", {"input_tokens": 12, "output_tokens": 34, "total_tokens": 46}, usage(input=12, output=34)),
    ("null details", {"input_tokens": 12, "output_tokens": 34, "input_tokens_details": None,
                      "output_tokens_details": None}, usage(input=12, output=34)),
    ("chat field names are not read", {"prompt_tokens": 12, "completion_tokens": 34}, usage()),
    ("empty", {}, usage()),
]


@pytest.mark.parametrize("raw, expected", [c[1:] for c in RESPONSES_CASES], ids=[c[0] for c in RESPONSES_CASES])
def test_responses_usage(raw, expected):
    got = llmgw.responses_usage(raw)
    assert got == expected
    assert got.request_tokens == expected.input_tokens + expected.cache_read_tokens + expected.cache_write_tokens
    assert got.response_tokens == expected.output_tokens


@pytest.mark.parametrize("bad", GARBAGE, ids=GARBAGE_IDS)
def test_responses_garbage_counts_as_zero(bad):
    raw = {"input_tokens": bad, "output_tokens": bad, "total_tokens": bad,
           "input_tokens_details": {"cached_tokens": bad, "cache_write_tokens": bad},
           "output_tokens_details": {"reasoning_tokens": bad}}
    assert llmgw.responses_usage(raw) == usage()
    raw = {"input_tokens": 30, "output_tokens": 3, "input_tokens_details": {"cached_tokens": bad}}
    assert llmgw.responses_usage(raw) == usage(input=30, output=3)


# ---- Anthropic Messages --------------------------------------------------------------

ANTHROPIC_CASES = [
    ("plain", {"input_tokens": 21, "output_tokens": 393}, usage(input=21, output=393)),
    ("sdk example (5m only)",
     {"input_tokens": 21, "cache_creation_input_tokens": 188086, "cache_read_input_tokens": 0,
      "cache_creation": {"ephemeral_5m_input_tokens": 188086, "ephemeral_1h_input_tokens": 0},
      "output_tokens": 393, "output_tokens_details": {"thinking_tokens": 120},
      "server_tool_use": {"web_search_requests": 0}, "service_tier": "standard"},
     usage(input=21, write=188086, output=393, reasoning=120)),
    ("5m/1h split",
     {"input_tokens": 10, "cache_creation_input_tokens": 1000, "cache_read_input_tokens": 5000,
      "cache_creation": {"ephemeral_5m_input_tokens": 400, "ephemeral_1h_input_tokens": 600}, "output_tokens": 7},
     usage(input=10, read=5000, write=400, write_1h=600, output=7)),
    ("1h only", {"input_tokens": 1, "cache_creation_input_tokens": 50,
                 "cache_creation": {"ephemeral_5m_input_tokens": 0, "ephemeral_1h_input_tokens": 50},
                 "output_tokens": 2},
     usage(input=1, write_1h=50, output=2)),
    ("no split object: all 5m", {"input_tokens": 3, "cache_creation_input_tokens": 40, "cache_read_input_tokens": 9,
                                 "output_tokens": 2},
     usage(input=3, read=9, write=40, output=2)),
    ("null split and nulls", {"input_tokens": 3, "cache_creation_input_tokens": None, "cache_read_input_tokens": None,
                              "cache_creation": None, "output_tokens": 2},
     usage(input=3, output=2)),
    ("1h larger than total is capped",
     {"input_tokens": 3, "cache_creation_input_tokens": 40,
      "cache_creation": {"ephemeral_1h_input_tokens": 90}, "output_tokens": 2},
     usage(input=3, write_1h=40, output=2)),
    ("thinking is inside output", {"input_tokens": 5, "output_tokens": 100,
                                   "output_tokens_details": {"thinking_tokens": 80}},
     usage(input=5, output=100, reasoning=80)),
    ("openai field names are not read", {"prompt_tokens": 5, "completion_tokens": 5}, usage()),
    ("empty", {}, usage()),
]


@pytest.mark.parametrize("raw, expected", [c[1:] for c in ANTHROPIC_CASES], ids=[c[0] for c in ANTHROPIC_CASES])
def test_anthropic_usage(raw, expected):
    got = llmgw.anthropic_usage(raw)
    assert got == expected
    # Total input is the sum of input, cache writes and cache reads (input excludes cache).
    assert got.request_tokens == sum(raw.get(name) or 0 for name in (
        "input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens"))
    assert got.response_tokens == (raw.get("output_tokens") or 0)


@pytest.mark.parametrize("bad", GARBAGE, ids=GARBAGE_IDS)
def test_anthropic_garbage_counts_as_zero(bad):
    raw = {"input_tokens": bad, "output_tokens": bad, "cache_creation_input_tokens": bad,
           "cache_read_input_tokens": bad, "output_tokens_details": {"thinking_tokens": bad},
           "cache_creation": {"ephemeral_5m_input_tokens": bad, "ephemeral_1h_input_tokens": bad}}
    assert llmgw.anthropic_usage(raw) == usage()
    raw = {"input_tokens": 8, "output_tokens": 4, "cache_creation_input_tokens": 30,
           "cache_creation": {"ephemeral_1h_input_tokens": bad}}
    assert llmgw.anthropic_usage(raw) == usage(input=8, write=30, output=4)


@pytest.mark.parametrize("normalise, raw", [
    (llmgw.openai_usage, {"prompt_tokens": 10 ** 30, "completion_tokens": 1e300}),
    (llmgw.responses_usage, {"input_tokens": 10 ** 30, "output_tokens": 1e300}),
    (llmgw.anthropic_usage, {"input_tokens": 10 ** 30, "output_tokens": 1e300, "cache_read_input_tokens": 10 ** 19}),
], ids=["openai", "responses", "anthropic"])
def test_absurd_counts_fit_the_ledger(normalise, raw):
    """A provider's absurd count must not make the usage row unstorable."""
    got = normalise(raw)
    assert 0 <= got.request_tokens <= SQLITE_MAX_INTEGER
    assert 0 <= got.response_tokens <= SQLITE_MAX_INTEGER
    price = llmgw.PriceTable.build().lookup("o1-pro")
    assert 0 <= llmgw.cost_nanousd(price, got) <= SQLITE_MAX_INTEGER


# ---- cost in integer nano-dollars ----------------------------------------------------------

COST_CASES = [
    # (id, model, usage, expected nano-USD); USD per Mtok * tokens = micro-USD; * 1000 = nano-USD.
    ("gpt-4o uncached+cached+out", "gpt-4o", usage(input=1000, read=500, output=200),
     (1000 * 2500 + 500 * 1250 + 200 * 10000)),
    ("gpt-4o reasoning is already in output", "gpt-4o", usage(input=10, output=100, reasoning=90),
     10 * 2500 + 100 * 10000),
    ("gpt-4o-mini one cached token", "gpt-4o-mini", usage(read=1), 75),
    ("gpt-5-nano cheapest token", "gpt-5-nano", usage(read=1), 5),
    ("deepseek-flash hits", "deepseek-flash", usage(input=3, read=7, output=2), 3 * 300 + 7 * 6 + 2 * 1200),
    ("claude-3-5-sonnet cache 5m/1h/read", "claude-3-5-sonnet-20241022",
     usage(input=1000, read=10000, write=2000, write_1h=400, output=500),
     1000 * 3000 + 10000 * 300 + 2000 * 3750 + 400 * 6000 + 500 * 15000),
    ("claude-haiku-5-5 fractional prices", "claude-haiku-5-5",
     usage(input=1, read=1, write=1, write_1h=1, output=1), 100 + 10 + 125 + 200 + 500),
    ("gpt-3.5-turbo no cached price: reads at input", "gpt-3.5-turbo", usage(input=100, read=1000, output=10),
     100 * 500 + 1000 * 500 + 10 * 1500),
    ("gpt-3.5-turbo no write price: writes at input", "gpt-3.5-turbo", usage(write=1000, write_1h=10),
     1000 * 500 + 10 * 500),
    ("claude-3-opus no 1h price: 1h at 5m price", "claude-3-opus-20240229", usage(write=100, write_1h=1000),
     100 * 18750 + 1000 * 18750),
    ("claude-3-sonnet no cache prices: all at input", "claude-3-sonnet-20240229",
     usage(input=1, read=10, write=100, write_1h=1000, output=2), (1 + 10 + 100 + 1000) * 3000 + 2 * 15000),
    ("gpt-5.6 openai cache write price", "gpt-5.6", usage(input=10, read=20, write=30, output=40),
     10 * 4000 + 20 * 400 + 30 * 5000 + 40 * 20000),
    ("embedding output is free", "text-embedding-3-small", usage(input=1000000, output=5), 1000000 * 20),
    ("large counts stay exact", "claude-opus-4-20250514", usage(input=123456789, output=98765432),
     123456789 * 15000 + 98765432 * 75000),
    ("nothing used", "gpt-4o", usage(), 0),
    # Long-context tiers: the whole request at the tier's prices once the
    # prompt (uncached + cache reads + cache writes) is past the threshold.
    ("gpt-6-sol at 272k: standard", "gpt-6-sol", usage(input=272000, output=1000), 272000 * 2000 + 1000 * 10000),
    ("gpt-6-sol past 272k: all at the tier", "gpt-6-sol", usage(input=272001, output=1000),
     272001 * 4000 + 1000 * 15000),
    ("cache reads count toward the threshold", "gpt-6-sol", usage(input=1, read=272000), 4000 + 272000 * 400),
    ("claude-haiku-5-5 past 100k, 5m and 1h writes apart", "claude-haiku-5-5",
     usage(input=50000, write=30000, write_1h=20001, output=10), 50000 * 500 + 30000 * 625 + 20001 * 1000 + 10 * 2500),
    ("gemini-2.5-pro past 200k, cached", "gemini-2.5-pro", usage(input=150000, read=60000, output=100),
     150000 * 2500 + 60000 * 250 + 100 * 15000),
    ("gpt-6.2-sol past 272k (OpenAI's model page)", "gpt-6.2-sol", usage(input=300000, read=1000, output=10),
     300000 * 4000 + 1000 * 200 + 10 * 15000),
]


@pytest.mark.parametrize("model, used, expected", [c[1:] for c in COST_CASES], ids=[c[0] for c in COST_CASES])
def test_cost_nanousd(model, used, expected):
    price = llmgw.PriceTable.build().lookup(model)
    assert price is not None, model
    cost = llmgw.cost_nanousd(price, used)
    assert type(cost) is int
    assert cost == expected


@pytest.mark.parametrize("fields, used, expected", [
    ({"input": 0.1, "output": 0.2}, usage(input=7, output=7), 700 + 1400),
    ({"input": 0.3, "output": 0}, usage(input=1000000), 300000000),
    ({"input": 1e-6, "output": 0}, usage(input=1), 0),          # 0.001 nano-USD rounds to 0
    ({"input": 0.0015, "output": 0}, usage(input=1), 2),        # 1.5 -> 2 (half even)
    ({"input": 0.0025, "output": 0}, usage(input=1), 2),        # 2.5 -> 2 (half even)
    ({"input": 1, "output": 2, "cached_input": 0, "cache_write": 0}, usage(input=1, read=50, write=60, output=1),
     1000 + 2000),
    ({"input": 1, "output": 2, "cache_write": 4}, usage(write=1, write_1h=1), 4000 + 4000),
    ({"input": 1, "output": 2, "cache_write_1h": 8}, usage(write=1, write_1h=1), 1000 + 8000),
    # Only the prompt tokens past the threshold at the tier's prices, in the
    # prompt's order (cache reads, writes, uncached input); output at base.
    ({"input": 1, "output": 2, "long_context": {"above_tokens": 10, "charge": "excess", "input": 3, "output": 4}},
     usage(input=5, read=8, output=3), (8 + 2) * 1000 + 3 * 3000 + 3 * 2000),
    ({"input": 1, "output": 2, "cached_input": 0.5,
      "long_context": {"above_tokens": 10, "charge": "excess", "input": 3, "output": 4, "cached_input": 1.5}},
     usage(read=15, input=5, output=1), 10 * 500 + 5 * 1500 + 5 * 3000 + 1 * 2000),
    ({"input": 1, "output": 2, "long_context": {"above_tokens": 10, "input": 3, "output": 4}},
     usage(input=10, output=1), 10 * 1000 + 2000),
    ({"input": 1, "output": 2, "long_context": {"above_tokens": 10, "input": 3, "output": 4}},
     usage(input=9, write=1, write_1h=1, output=1), 11 * 3000 + 4000),
], ids=["decimal not float", "0.3 exactly", "tiny rounds to zero", "half even up", "half even down",
        "free cache", "1h falls back to 5m write", "5m falls back to input", "excess in prompt order",
        "excess cache reads at the tier's cached price", "at the threshold: standard", "whole is the default"])
def test_cost_of_config_prices(fields, used, expected):
    price = llmgw.PriceTable.build({"m": fields}).lookup("m")
    assert llmgw.cost_nanousd(price, used) == expected


@pytest.mark.parametrize("model, expected, source", [
    ("gpt-3.5-turbo", ("0.5", "1.5", None, None, None), llmgw.LITELLM),
    ("claude-3-sonnet-20240229", ("3", "15", None, None, None), llmgw.RETIRED),
    ("gpt-4o", ("2.5", "10", "1.25", None, None), llmgw.LITELLM),
    ("claude-3-5-sonnet-20241022", ("3", "15", "0.3", "3.75", "6"), llmgw.RETIRED),
    # Models clients use by default (Codex), missing before 2026-12-03.
    ("gpt-5-codex", ("1.25", "10", "0.125", None, None), llmgw.LITELLM),
    ("gpt-5.1-codex", ("1.25", "10", "0.125", None, None), llmgw.LITELLM),
    ("gpt-6-astra", ("10", "50", "1", "12.5", None), llmgw.LITELLM),
    ("gpt-6.1-sol", ("2", "10", "0.1", "2.5", None), llmgw.LITELLM),
    ("gpt-6.1-terra", ("1", "5", "0.05", "1.25", None), llmgw.LITELLM),
    ("gpt-6.2-sol", ("2", "10", "0.1", "2.5", None), llmgw.OPENAI_MODEL_PAGE),
    # Claude Code's cost display shows $3/$15; Anthropic's model and pricing
    # pages say $2/$10 (the announced rise to $3/$15 was called off).
    ("claude-sonnet-5", ("2", "10", "0.2", "2.5", "4"), llmgw.LITELLM),
])
def test_historical_and_current_list_prices(model, expected, source):
    price = llmgw.PriceTable.build().lookup(model)
    assert tuple(getattr(price, field) for field in llmgw.PRICE_FIELDS) == tuple(
        None if value is None else D(value) for value in expected)
    assert price.source == source


def _shared_prices():
    if not os.path.exists(PRICES_JSON):
        return []
    with open(PRICES_JSON, encoding="utf-8") as f:
        return sorted(json.load(f)["models"].items())


SHARED_PRICES = _shared_prices()


@pytest.mark.skipif(not SHARED_PRICES, reason="../shared/prices.json not found")
@pytest.mark.parametrize("model, entry", SHARED_PRICES, ids=[model for model, _ in SHARED_PRICES])
def test_builtin_prices_match_prices_json(model, entry):
    assert model in llmgw.BUILTIN_PRICES
    cached = entry.get("cached_input_per_mtok", entry.get("cache_read_per_mtok"))
    expected = (entry["input_per_mtok"], entry["output_per_mtok"], cached,
                entry.get("cache_write_per_mtok"), entry.get("cache_write_1h_per_mtok"))
    price = llmgw.PriceTable.build().lookup(model)
    assert tuple(getattr(price, field) for field in llmgw.PRICE_FIELDS) == tuple(
        None if value is None else D(str(value)) for value in expected)


#: Built-in entries that shared/prices.json (compiled 2026-11-27, read-only
#: here) does not have, and why: each is a newer published list price.
NEWER_THAN_PRICES_JSON = {
    "gpt-5-codex": "Codex's default model; OpenAI's list price as LiteLLM 1.110.2 carries it",
    "gpt-5.1-codex": "Codex's default model; OpenAI's list price as LiteLLM 1.110.2 carries it",
    "gpt-6-astra": "OpenAI's list price as LiteLLM 1.110.2 carries it, not yet in prices.json",
    "gpt-6.1-sol": "published after prices.json (cached input $0.10, half gpt-6-sol's); LiteLLM 1.110.2",
    "gpt-6.1-terra": "published after prices.json; LiteLLM 1.110.2",
    "gpt-6.2-sol": "published after LiteLLM 1.110.2 too: OpenAI's model page, read 2026-12-03",
}

#: Long-context tiers. prices.json's flat fields leave them out (its first
#: caveat says so); where its notes state one, the built-in tier says the
#: same (model -> words in the notes). The other built-in tiers are newer
#: than prices.json: LiteLLM 1.110.2's *_above_272k_tokens prices.
TIERS_IN_PRICES_JSON_NOTES = {
    "gpt-5.5": "input>272k tokens billed 10.00 in / 45.00 out / 1.00 cached",
    "claude-haiku-5-5": "> 100,000 tokens the whole request bills 0.50 in / 2.50 out / 0.625 cw5m / 1.00 cw1h "
                        "/ 0.05 cache read",
    "gemini-2.5-pro": "prompts >200k tokens: 2.50 in / 15.00 out / 0.25 cached",
    "gemini-3.1-pro-preview": "prompts >200k tokens: 4.00 in / 18.00 out",
}


@pytest.mark.skipif(not SHARED_PRICES, reason="../shared/prices.json not found")
def test_builtin_prices_outside_prices_json_are_the_newer_ones():
    shared = dict(SHARED_PRICES)
    assert sorted(set(llmgw.BUILTIN_PRICES) - set(shared)) == sorted(NEWER_THAN_PRICES_JSON)
    assert set(shared) <= set(llmgw.BUILTIN_PRICES)


@pytest.mark.skipif(not SHARED_PRICES, reason="../shared/prices.json not found")
@pytest.mark.parametrize("model", sorted(llmgw.BUILTIN_LONG_CONTEXT))
def test_long_context_tiers_agree_with_prices_json_notes(model):
    shared = dict(SHARED_PRICES)
    notes = shared.get(model, {}).get("notes", "")
    if model in TIERS_IN_PRICES_JSON_NOTES:
        assert TIERS_IN_PRICES_JSON_NOTES[model] in notes
        above_tokens, charge, prices = llmgw.BUILTIN_LONG_CONTEXT[model]
        assert charge == "whole" and "%dk" % (above_tokens // 1000) in notes.replace(",000", "k")
        stated = [D(number) for number in re.findall(r"\d+\.\d+", TIERS_IN_PRICES_JSON_NOTES[model])]
        assert all(number in {D(price) for price in prices if price is not None} for number in stated)
    else:
        assert "272k" not in notes and "TIERED" not in notes  # newer than prices.json


def test_builtin_prices_are_well_formed():
    for model, values in llmgw.BUILTIN_PRICES.items():
        assert model == model.lower() == model.strip(), model
        assert len(values) == len(llmgw.PRICE_FIELDS) + 1, model
        assert values[-1] in (llmgw.LITELLM, llmgw.OPENAI_MODEL_PAGE, llmgw.RETIRED), model
        parsed = [None if v is None else D(v) for v in values[:-1]]
        assert all(v is None or (v.is_finite() and v >= 0) for v in parsed), model
        assert parsed[0] is not None and parsed[1] is not None, model


# ---- PriceTable ---------------------------------------------------------------

@pytest.mark.parametrize("name, model", [
    ("gpt-4o", "gpt-4o"),
    ("openai/gpt-4o", "gpt-4o"),
    ("GPT-4o", "gpt-4o"),
    ("gpt-4o-2024-08-06", "gpt-4o"),
    ("gpt-4o-mini-2024-07-18", "gpt-4o-mini"),
    ("openai/gpt-4o-2024-11-20", "gpt-4o"),
    ("claude-3-5-sonnet-20241022", "claude-3-5-sonnet-20241022"),
    ("claude-sonnet-4-5-20250929", "claude-sonnet-4-5"),
    ("anthropic/claude-haiku-4-5-20251001", "claude-haiku-4-5"),
    ("claude-opus-4-1-20250805", "claude-opus-4-1-20250805"),
    ("o3-mini-2025-01-31", "o3-mini"),
    ("gemini/gemini-2.5-pro", "gemini-2.5-pro"),
    ("deepseek/deepseek-chat", "deepseek-chat"),
])
def test_lookup_finds(name, model):
    table = llmgw.PriceTable.build()
    assert table.lookup(name) is table.lookup(model) is not None
    assert table.lookup(name) == llmgw.Price.from_fields(llmgw.builtin_price_fields(model),
                                                         llmgw.BUILTIN_PRICES[model][-1])


@pytest.mark.parametrize("name", [
    "nopricemodel", "gpt-4o-unknownmodel-xyz", "gpt-4", "gpt-4o-2024", "gpt-4o-2024-08-06-extra",
    "gpt", "", None, "openai/", "/", "gpt-4o/", "ft:gpt-4o:org::abc",
])
def test_lookup_unknown_is_none(name):
    assert llmgw.PriceTable.build().lookup(name) is None


def test_config_prices_replace_and_add():
    config = llmgw.parse_config({"pricing": {
        "gpt-4o": {"input": 1, "output": 2},
        "my-local-model": {"input": 0, "output": 0},
        "ft-model": {"input": 0.5, "output": 1.5, "cached_input": 0.25, "cache_write": 0.75, "cache_write_1h": 1},
    }})
    table = llmgw.PriceTable.build(config.pricing)
    gpt4o = table.lookup("gpt-4o")
    assert (gpt4o.input, gpt4o.output, gpt4o.cached_input, gpt4o.source) == (D(1), D(2), None, "config.yaml")
    # The override applies under every name that finds the model.
    assert table.lookup("openai/gpt-4o-2024-08-06") is gpt4o
    assert table.lookup("my-local-model").source == "config.yaml"
    assert llmgw.cost_nanousd(table.lookup("my-local-model"), usage(input=10 ** 6, output=10 ** 6)) == 0
    ft = table.lookup("ft-model")
    assert tuple(getattr(ft, f) for f in llmgw.PRICE_FIELDS) == (D("0.5"), D("1.5"), D("0.25"), D("0.75"), D(1))
    # Other built-ins are untouched.
    mini = table.lookup("gpt-4o-mini")
    assert (mini.input, mini.source) == (D("0.15"), llmgw.LITELLM)
    # The built-in table itself is not changed by building another one.
    assert llmgw.PriceTable.build().lookup("gpt-4o").input == D("2.5")
    # Override with cached reads falling back to the overriding input price.
    assert llmgw.cost_nanousd(gpt4o, usage(input=1000, read=500, output=200)) == 1000 * 1000 + 500 * 1000 + 200 * 2000


def test_price_table_items_and_sources():
    table = llmgw.PriceTable.build({"gpt-4o": {"input": 1, "output": 2}, "zz-new": {"input": 3, "output": 4}})
    items = dict(table.items())
    assert set(items) == set(llmgw.BUILTIN_PRICES) | {"zz-new"}
    sources = {model: price.source for model, price in items.items()}
    assert sources["gpt-4o"] == sources["zz-new"] == "config.yaml"
    assert {source for model, source in sources.items() if model not in ("gpt-4o", "zz-new")} == {
        llmgw.LITELLM, llmgw.OPENAI_MODEL_PAGE, llmgw.RETIRED}
    assert items["zz-new"].as_dict() == {"input": 3.0, "output": 4.0, "cached_input": None, "cache_write": None,
                                         "cache_write_1h": None, "long_context": None}


# ---- end to end ----------------------------------------------------------------------

def chat(model):
    return {"model": model, "messages": [{"role": "user", "content": "price me"}]}


def settled(gateway, count):
    rows = gateway.wait_for_rows(lambda rows: len(rows) == count and all(r["status"] != "pending" for r in rows))
    assert len(rows) == count
    return rows


def test_gateway_charges_config_prices(make_gateway, upstream):
    gateway = make_gateway(pricing={"gpt-4o": {"input": 1, "output": 2},
                                    "house-cache-model": {"input": 4, "output": 8, "cached_input": 0.5}})
    key = gateway.create_key()[1]
    for model in ("gpt-4o", "house-cache-model"):
        response = post(gateway, "/v1/chat/completions", chat(model), key=key)
        assert response.status == 200, response.body
    rows = settled(gateway, 2)
    plain, cached = (report["usage"] for report in upstream.reported)
    assert (rows[0]["model"], rows[0]["input_tokens"], rows[0]["output_tokens"]) == (
        "gpt-4o", plain["prompt_tokens"], plain["completion_tokens"])
    assert rows[0]["cost_nanousd"] == plain["prompt_tokens"] * 1000 + plain["completion_tokens"] * 2000
    hits = cached["prompt_tokens_details"]["cached_tokens"]
    assert hits > 0
    assert (rows[1]["input_tokens"], rows[1]["cache_read_tokens"], rows[1]["request_tokens"]) == (
        cached["prompt_tokens"] - hits, hits, cached["prompt_tokens"])
    assert rows[1]["cost_nanousd"] == ((cached["prompt_tokens"] - hits) * 4000 + hits * 500
                                       + cached["completion_tokens"] * 8000)
    assert [row["priced"] for row in rows] == [1, 1]


def test_unpriced_model_is_recorded_at_cost_zero(gateway, vkey, upstream):
    response = post(gateway, "/v1/chat/completions", chat("nopricemodel"), key=vkey)
    assert response.status == 200, response.body
    assert response.json()["usage"] == upstream.reported[0]["usage"]
    response = post(gateway, "/v1/chat/completions", chat("gpt-4o"), key=vkey)
    assert response.status == 200, response.body
    rows = settled(gateway, 2)
    reported = upstream.reported[0]["usage"]
    assert {k: rows[0][k] for k in ("model", "status", "http_status", "request_tokens", "response_tokens",
                                    "cost_nanousd", "priced", "usage_source")} == {
        "model": "nopricemodel", "status": "ok", "http_status": 200,
        "request_tokens": reported["prompt_tokens"], "response_tokens": reported["completion_tokens"],
        "cost_nanousd": 0, "priced": 0, "usage_source": "reported"}
    assert rows[1]["priced"] == 1 and rows[1]["cost_nanousd"] > 0
    by_model = {entry["model"]: entry for entry in gateway.store.usage_stats(group_by="model")}
    assert by_model["nopricemodel"]["unpriced_requests"] == 1
    assert by_model["nopricemodel"]["estimated_cost"] == 0
    assert by_model["gpt-4o"]["unpriced_requests"] == 0
    totals = gateway.store.usage_stats(group_by="provider")
    assert [(t["provider"], t["requests"], t["unpriced_requests"]) for t in totals] == [("openai", 2, 1)]
    assert math.isclose(totals[0]["estimated_cost"], rows[1]["cost_nanousd"] / 1e9)


def test_gateway_charges_long_context_tiers(make_gateway, upstream):
    """A config tier past every prompt the fake reports (11 tokens or more):
    whole on chat (cache reads included), excess on Messages (the prompt
    past the threshold, in order: cache reads, 5m writes, 1h writes, input)."""
    tier = {"above_tokens": 10, "input": 3, "output": 4, "cached_input": 1.5, "cache_write": 6, "cache_write_1h": 9}
    gateway = make_gateway(pricing={
        "acme-whole-cache": {"input": 1, "output": 2, "cached_input": 0.5, "long_context": tier},
        "acme-excess-cache": {"input": 1, "output": 2, "cached_input": 0.5, "cache_write": 1.25,
                              "cache_write_1h": 2, "long_context": dict(tier, charge="excess")}})
    key = gateway.create_key()[1]
    reply = post(gateway, CHAT, body_for(CHAT, model="acme-whole-cache"), key=key)
    assert reply.status == 200, reply.body
    reply = post(gateway, MESSAGES, body_for(MESSAGES, model="acme-excess-cache"), key=key,
                 headers={"anthropic-version": "2023-06-01"})
    assert reply.status == 200, reply.body
    rows = settled(gateway, 2)
    whole, excess = (expected_columns(report["path"], report["usage"]) for report in upstream.reported)
    assert whole["cache_read_tokens"] > 0 and whole["request_tokens"] > 10
    assert rows[0]["cost_nanousd"] == expected_cost(whole, 3, 4, cached=1.5)
    assert excess["cache_read_tokens"] + excess["cache_write_tokens"] + excess["cache_write_1h_tokens"] > 0
    room, below, above = 10, {}, {}
    for column in ("cache_read_tokens", "cache_write_tokens", "cache_write_1h_tokens", "input_tokens"):
        below[column] = min(excess[column], room)
        above[column] = excess[column] - below[column]
        room -= below[column]
    usd_per_mtok = (below["cache_read_tokens"] * D("0.5") + below["cache_write_tokens"] * D("1.25")
                    + below["cache_write_1h_tokens"] * 2 + below["input_tokens"] * 1 + excess["output_tokens"] * 2
                    + above["cache_read_tokens"] * D("1.5") + above["cache_write_tokens"] * 6
                    + above["cache_write_1h_tokens"] * 9 + above["input_tokens"] * 3)
    assert rows[1]["cost_nanousd"] == int((usd_per_mtok * 1000).to_integral_value(decimal.ROUND_HALF_EVEN))


@pytest.mark.parametrize("entry, message", [
    ({"input": 1, "output": 2, "long_context": {"input": 3, "output": 4}},
     "pricing.m.long_context.above_tokens: missing"),
    ({"input": 1, "output": 2, "long_context": {"above_tokens": 10, "charge": "part", "input": 3, "output": 4}},
     "pricing.m.long_context.charge: 'part' is not one of whole, excess"),
    ({"input": 1, "output": 2, "long_context": {"above_tokens": 0, "input": 3, "output": 4}},
     "pricing.m.long_context.above_tokens: expected an integer from 1 to 1000000000000, got 0"),
    ({"input": 1, "output": 2, "long_context": {"above_tokens": 10, "input": 3}},
     "pricing.m.long_context.output: missing"),
    ({"input": 1, "output": 2, "long_context": {"above_tokens": 10, "input": -3, "output": 4}},
     "pricing.m.long_context.input: expected a number from 0 to 1000000, got -3"),
    ({"input": 1, "output": 2, "long_context": {"above_tokens": 9, "input": 3, "output": 4, "long_context": {}}},
     "pricing.m.long_context: unknown key 'long_context'"),
    ({"input": 1, "output": 2, "above_tokens": 9}, "pricing.m: unknown key 'above_tokens'"),
    ({"input": 1, "output": 2, "long_context": [1]}, "pricing.m.long_context: expected a mapping"),
])
def test_bad_long_context_tiers_are_named(entry, message):
    with pytest.raises(llmgw.ConfigError) as caught:
        llmgw.parse_config({"pricing": {"m": entry}})
    assert str(caught.value).startswith(message), str(caught.value)
