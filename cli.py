#!/usr/bin/env python3
"""llmgw's command line: set up, run and manage the gateway.

    python cli.py init                          create config.yaml, the database, the admin token
    python cli.py serve [--host H] [--port P] [--workers N]   run the gateway (N processes)
    python cli.py keys create NAME [policy flags] [--output json]
    python cli.py keys update ID [policy flags]
    python cli.py keys list [--output json]
    python cli.py keys revoke ID
    python cli.py keys rotate ID [--grace 24h]  new secret; the old one works for the grace period
    python cli.py keys topup ID AMOUNT          add USD to the current budget period (or balance)
      policy flags: --tier T --rpm N --tpm N --max-parallel N --budget USD
                    --budget-period daily|weekly|monthly|never --expires-in 30d | --expires-at ISO
                    --models "gpt-4o*,claude-*" --label team=search (repeatable)
                    --log-bodies | --no-log-bodies   --alert-thresholds 50,80,100
                    --admission strict|estimate; "none" clears
    python cli.py config set-key PROVIDER KEY [--name NAME]
                                                store a provider key in the database (KEY - : from stdin);
                                                with --name, one more key: a deployment of its own
    python cli.py config list-keys              each provider's key, masked, and its source
    python cli.py deployments [--output json]   every provider key, masked, and its cooldown
    python cli.py stats [--by key|project|model|provider|day] [--since D] [--until D]
                        [--project NAME] [--output table|json|csv]
                        [--reprice [--apply]]
    python cli.py logs [--key ID] [--project P] [--provider P] [--model M] [--status S]
                       [--since D] [--until D] [--limit N] [--cursor C] [--output table|json|csv]
    python cli.py logs --id N [--bodies]        one entry; with --bodies what a --log-bodies key kept
    python cli.py prune [--older-than 90d]    delete old request-log rows (rollups stay)
    python cli.py prices list [--output json]   prices in force and where each came from
    python cli.py prices import FILE            load a price pack (ours or LiteLLM's JSON)
    python cli.py admin-token                   issue a new admin token, retiring the old one
    python cli.py metrics-token                 issue a token that reads /metrics only (for a scraper)
    python cli.py audit [--limit N] [--output json]   administrative actions, newest first
    python cli.py doctor [--reach]              check config, files, database, clock, keys (and providers)
    python cli.py backup PATH                   a consistent copy of the database (0600), gateways running
    python cli.py restore PATH                  replace the database with a backup (gateways stopped)
    python cli.py migrate-db --from URL --to URL   copy a database into an empty one (sqlite:///PATH, postgresql://...)

Files: config.yaml (CONFIG_PATH) and gateway.db (DB_PATH). Each command is a
few lines over one call into llmgw; errors print one line and exit 1.
"""

import argparse
import json
import os
import sys
import time

import llmgw


def _store(create=False):
    """The configured database (config.yaml's database.url, else the file
    at DB_PATH); only ``init`` may create the file."""
    return llmgw.open_store(llmgw.load_database_config(), create=create)


def _print_json(value):
    print(json.dumps(value, indent=2))


def _print_table(rows, columns):
    """Rows of dicts as aligned text columns: (field, heading) pairs."""
    cells = [[heading for _, heading in columns]]
    for row in rows:
        cells.append(["-" if row.get(field) is None else str(row[field]) for field, _ in columns])
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    for line in cells:
        print("  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip())


def cmd_init(args):
    config_path = llmgw.config_path_from_env()
    if os.path.exists(config_path):
        try:
            os.chmod(config_path, 0o600)
            print("Kept existing %s (mode 0600)." % config_path)
        except OSError as error:  # a read-only mount (a container's config) or another user's file
            print("Kept existing %s (mode left as it is: %s)." % (config_path, error.strerror))
    else:
        llmgw.write_private_file(config_path, llmgw.CONFIG_TEMPLATE)
        print("Created %s (mode 0600)." % config_path)
    llmgw.load_config(config_path)  # a broken file is reported now, not at serve
    store = _store(create=True)
    print("Database ready at %s%s." % (store.path, " (mode 0600)" if isinstance(store, llmgw.SQLiteStore) else ""))
    if os.environ.get(llmgw.ADMIN_TOKEN_ENV):
        print("The admin token comes from %s in the environment; none generated." % llmgw.ADMIN_TOKEN_ENV)
    elif store.get_setting(llmgw.ADMIN_TOKEN_SETTING):
        print("An admin token already exists and was kept (python cli.py admin-token issues a new one).")
    else:
        print("Admin token: %s" % llmgw.issue_admin_token(store))
        print("(Shown once. Only its hash is stored.)")
    print("\nNext steps:\n"
          "  python cli.py config set-key openai sk-...\n"
          "  python cli.py config set-key anthropic sk-ant-...\n"
          "  python cli.py keys create \"My Project\"\n"
          "  python cli.py serve")
    return 0


def _print_new_token(what, token, environment_variable, scope=""):
    print("%s token: %s" % (what, token))
    print("(Shown once.%s The previous one no longer works.)" % scope)
    if os.environ.get(environment_variable):
        print("Note: %s is set in this environment; gateways that see it use it instead." % environment_variable)
    return 0


def cmd_admin_token(args):
    return _print_new_token("Admin", llmgw.issue_admin_token(_store()), llmgw.ADMIN_TOKEN_ENV)


def cmd_metrics_token(args):
    return _print_new_token("Metrics", llmgw.issue_metrics_token(_store()), llmgw.METRICS_TOKEN_ENV,
                            " It reads GET /metrics and nothing else.")


def _whole_number(text, flag, low, high):
    return llmgw.check_number(llmgw.number_in_text(text), flag, low, high, integer=True)


def cmd_serve(args):
    port = None if args.port is None else _whole_number(args.port, "--port", 0, 65535)
    workers = _whole_number(args.workers, "--workers", 1, MAX_WORKERS)
    llmgw.serve(llmgw.load_config(), host=args.host, port=port, processes=workers)
    return 0


KEY_COLUMNS = [("id", "ID"), ("project_name", "PROJECT"), ("tier", "TIER"), ("rpm", "RPM"),
               ("max_budget", "BUDGET"), ("budget_period", "PERIOD"), ("expires_at", "EXPIRES"),
               ("is_active", "ACTIVE"), ("created_at", "CREATED"), ("last_used_at", "LAST USED"),
               ("key_hint", "KEY")]


#: (argparse destination, policy field) of the shared key flags.
POLICY_FLAGS = [("tier", "tier"), ("rpm", "rpm"), ("tpm", "tpm"), ("max_parallel", "max_parallel"),
                ("budget", "max_budget"), ("budget_period", "budget_period"), ("expires_in", "expires_in"),
                ("expires_at", "expires_at"), ("models", "models"), ("log_bodies", "log_bodies"),
                ("alert_thresholds", "alert_thresholds"), ("admission", "budget_admission")]
MAX_WORKERS = 1024
MAX_AUDIT_ENTRIES = 10 ** 6


def _policy_fields(args):
    """The policy flags given on the command line; the word none clears one."""
    texts = {field: getattr(args, destination) for destination, field in POLICY_FLAGS
             if getattr(args, destination) is not None}
    return llmgw.policy_from_text(texts, args.label or ())


def cmd_keys_create(args):
    config = llmgw.load_config()
    record, secret = llmgw.create_virtual_key(_store(), config, args.name, _policy_fields(args))
    if args.output == "json":
        _print_json(dict(record, key=secret))
        return 0
    print("Created virtual key %s for project %r (tier %s)." % (record["id"], record["project_name"],
                                                               record["tier"]))
    print("Key (shown once, store it now): %s" % secret)
    return 0


def cmd_keys_update(args):
    _print_json(llmgw.update_key(_store(), llmgw.load_config(), args.id, _policy_fields(args)))
    return 0


def cmd_keys_rotate(args):
    record = llmgw.rotate_key(_store(), args.id, args.grace)
    print("New key for %s (shown once, store it now): %s" % (args.id, record["key"]))
    print("The previous key works until %s." % record["previous_key_valid_until"])
    return 0


def cmd_keys_topup(args):
    llmgw.topup_key(_store(), args.id, llmgw.number_in_text(args.amount))
    print("Added USD %s to %s's current budget period." % (args.amount, args.id))
    return 0


def cmd_keys_list(args):
    keys = _store().list_keys()
    if args.output == "json":
        _print_json(keys)
    elif not keys:
        print("No virtual keys yet: python cli.py keys create NAME")
    else:
        _print_table(keys, KEY_COLUMNS)
    return 0


def cmd_keys_revoke(args):
    llmgw.revoke_key(_store(), args.id)
    print("Revoked %s; running gateways refuse it from their next request." % args.id)
    return 0


def cmd_config_set_key(args):
    config = llmgw.load_config()
    provider = config.providers.get(args.provider)
    if provider is None:
        raise llmgw.ConfigError("unknown provider %r (configured: %s)"
                                % (args.provider, ", ".join(config.providers) or "none"))
    key = sys.stdin.readline().strip() if args.key == "-" else args.key
    llmgw.check_provider_key(args.provider, key)
    name = None if args.name in (None, llmgw.DEFAULT_DEPLOYMENT) else args.name
    if name is not None and not llmgw.DEPLOYMENT_NAME.match(name):
        raise llmgw.ConfigError("%r is not a deployment name (letters, digits, . _ -)" % name)
    _store().set_provider_key(args.provider, key, name=name)
    print("Stored the %s key%s in the database (%s); running gateways use it within a second."
          % (args.provider, "" if name is None else " " + name, llmgw.mask_secret(key)))
    if provider.api_key is not None and name is None:
        print("Note: config.yaml sets providers.%s.api_key, which takes precedence." % args.provider)
    return 0


def cmd_config_list_keys(args):
    config = llmgw.load_config()
    stored = _store().provider_keys()
    rows = []
    for name, provider in config.providers.items():
        try:
            key, source = llmgw.resolve_provider_key(provider, stored)
        except llmgw.ConfigError as exc:
            key, source = None, "invalid: %s" % exc.message
        rows.append({"provider": name, "key": llmgw.mask_secret(key) if key else "(none)",
                     "source": source or "-", "base_url": provider.base_url or "(the %s endpoint of its region)"
                     % provider.format})
    _print_table(rows, [("provider", "PROVIDER"), ("key", "KEY"), ("source", "SOURCE"),
                        ("base_url", "BASE URL")])
    return 0


def cmd_deployments(args):
    rows = llmgw.list_deployments(llmgw.load_config(), _store())
    if args.output == "json":
        _print_json(rows)
        return 0
    _print_table(rows, [("deployment", "DEPLOYMENT"), ("key", "KEY"), ("source", "SOURCE"), ("state", "STATE"),
                        ("cooldown_seconds", "COOLDOWN (S)"), ("failures", "FAILURES"), ("reason", "REASON")])
    return 0


STATS_COLUMNS = {
    "key": [("virtual_key_id", "KEY ID"), ("project_name", "PROJECT")],
    "project": [("project_name", "PROJECT")],
    "model": [("model", "MODEL")],
    "provider": [("provider", "PROVIDER")],
    "day": [("day", "DAY")],
}
STATS_TOTAL_COLUMNS = [("requests", "REQUESTS"), ("other_calls", "OTHER CALLS"), ("errors", "ERRORS"),
                       ("request_tokens", "REQUEST TOKENS"), ("response_tokens", "RESPONSE TOKENS"),
                       ("cost", "COST (USD)")]


def _price_table(store):
    return llmgw.PriceTable.build(llmgw.load_config().pricing, store.imported_prices())


def cmd_stats(args):
    store = _store()
    window = (args.since and llmgw.parse_time_bound(args.since, name="--since"),
              args.until and llmgw.parse_time_bound(args.until, end=True, name="--until"), args.project)
    if args.reprice:
        return _reprice(store, window, args)
    rows = llmgw.usage_stats(store, args.by, *window)
    if args.output == "json":
        _print_json(rows)
        return 0
    if args.output == "csv":
        sys.stdout.write(llmgw.csv_text(rows))
        return 0
    if not rows:
        print("No usage recorded yet.")
        return 0
    for row in rows:
        row["cost"] = "%.6f" % row["estimated_cost"]
    columns = STATS_COLUMNS.get(args.by, [("label", args.by.upper())]) + STATS_TOTAL_COLUMNS
    if args.by == "key" and any(row["max_budget"] is not None for row in rows):
        columns += [("max_budget", "BUDGET (USD)"), ("budget_used_pct", "BUDGET USED %")]
    _print_table(rows, columns)
    estimated = sum(row["estimated_usage_requests"] for row in rows)
    if estimated:
        print("\n%d request(s) carry estimated usage (USD %.6f of the cost): the provider reported none."
              % (estimated, sum(row["estimated_usage_cost"] for row in rows)))
    unpriced = [row for row in store.usage_stats("model", *window) if row["unpriced_requests"]]
    if unpriced:
        print("\nUnpriced models (counted at cost 0; add them under pricing: in config.yaml):")
        _print_table(unpriced, [("model", "MODEL"), ("unpriced_requests", "REQUESTS"),
                                ("request_tokens", "REQUEST TOKENS"), ("response_tokens", "RESPONSE TOKENS")])
    return 0


def _reprice(store, window, args):
    totals = llmgw.reprice_usage(store, _price_table(store), *window, apply=args.apply)
    if args.output == "json":
        _print_json(totals)
        return 0
    print("Re-priced %d usage row(s) with today's prices: %d would change."
          % (totals["rows"], totals["changed_rows"]))
    print("Old total: USD %.6f\nNew total: USD %.6f" % (totals["old_cost"], totals["new_cost"]))
    print("Applied." if args.apply else "Nothing written; add --apply to store the new costs.")
    return 0


LOG_COLUMNS = [("id", "ID"), ("time", "TIME"), ("virtual_key_id", "KEY ID"), ("project_name", "PROJECT"),
               ("endpoint", "ROUTE"), ("model", "MODEL"), ("status", "STATUS"), ("http_status", "HTTP"),
               ("request_tokens", "IN"), ("response_tokens", "OUT"), ("cost", "COST (USD)"),
               ("latency_ms", "MS"), ("request_id", "REQUEST ID")]


def cmd_logs(args):
    if args.id is not None:
        return _log_entry(args)
    if args.bodies:
        raise llmgw.ConfigError("--bodies needs --id N: bodies are shown one entry at a time")
    options = {name: getattr(args, name) for name in list(llmgw.LOG_FILTERS) + ["limit", "cursor"]
               if getattr(args, name) is not None}
    page = llmgw.request_log(_store(), options)
    if args.output == "json":
        _print_json(page)
    elif args.output == "csv":
        sys.stdout.write(llmgw.csv_text(page["data"]))
    elif not page["data"]:
        print("No requests logged in that range.")
    else:
        _print_table(page["data"], LOG_COLUMNS)
    if page["next_cursor"] and args.output != "json":
        print("More: add --cursor %s" % page["next_cursor"], file=sys.stderr)
    return 0


def _log_entry(args):
    """``logs --id N``: one entry; its kept bodies with ``--bodies``."""
    entry = llmgw.request_log_entry(_store(), args.id)
    bodies = entry.pop("bodies")
    if args.bodies:
        entry["bodies"] = bodies
    if args.output == "json":
        _print_json(entry)
        return 0
    if args.output == "csv":
        sys.stdout.write(llmgw.csv_text([entry]))
        return 0
    width = max(len(name) for name in entry)
    for name, value in entry.items():
        if name != "bodies":
            print("%s  %s" % (name.ljust(width), "-" if value is None else json.dumps(value) if isinstance(
                value, (dict, list)) else value))
    if args.bodies:
        if bodies is None:
            print("\nNo bodies kept (the key does not log bodies, or they were pruned).")
        for part in ("request", "response") if bodies else ():
            print("\n---- %s body: %s bytes, the first %d kept ----" % (part, bodies[part + "_bytes"] or 0,
                                                                      bodies["kept_bytes_each"]))
            print(bodies[part] or "")
    return 0


def cmd_prune(args):
    store = _store()
    if args.older_than is not None:
        age = llmgw.parse_duration(args.older_than, "--older-than")
    else:
        days = llmgw.load_config().logging.retention_days
        if days is None:
            raise llmgw.ConfigError("give --older-than (e.g. 90d) or set logging.retention_days in config.yaml")
        age = days * 86400
    deleted = store.prune_usage(time.time() - age)
    print("Pruned %d request-log row(s) that started before %s; rollups (stats, charts, budgets) are kept."
          % (deleted, llmgw.iso_time((time.time() - age) // 3600 * 3600)))
    return 0


def cmd_prices_list(args):
    store = _store()
    rows = llmgw.price_rows(_price_table(store))
    if args.output == "json":
        _print_json(rows)
        return 0
    for row in rows:
        tier = row["long_context"]
        row["long_context"] = tier and "above %d: %s %g/%g" % (tier["above_tokens"], tier["charge"], tier["input"],
                                                               tier["output"])
    _print_table(rows, [("model", "MODEL"), ("input", "INPUT"), ("output", "OUTPUT"),
                        ("cached_input", "CACHED INPUT"), ("cache_write", "CACHE WRITE"),
                        ("cache_write_1h", "CACHE WRITE 1H"), ("long_context", "LONG CONTEXT"),
                        ("source", "SOURCE")])
    print("USD per million tokens. Precedence: config.yaml, then imported packs, then built-in. Long context: "
          "past that many prompt tokens, the whole request (or the excess) at input/output.")
    return 0


def cmd_prices_import(args):
    try:
        with open(args.file, encoding="utf-8") as f:
            document = json.load(f)
    except (OSError, ValueError, RecursionError) as exc:  # RecursionError: nested too deep
        raise llmgw.ConfigError("cannot read price pack %s: %s" % (args.file, exc)) from None
    prices = llmgw.parse_price_pack(document)
    if not prices:
        raise llmgw.ConfigError("%s holds no usable prices (our format or LiteLLM's)" % args.file)
    source = "imported %s (%s)" % (os.path.basename(args.file), llmgw.iso_time(os.path.getmtime(args.file))[:10])
    _store().import_prices(prices, source)
    print("Imported prices for %d model(s) from %s; running gateways use them from their next request."
          % (len(prices), args.file))
    return 0


def cmd_audit(args):
    entries = _store().audit_log(_whole_number(args.limit, "--limit", 1, MAX_AUDIT_ENTRIES))
    if args.output == "json":
        _print_json(entries)
    elif not entries:
        print("No administrative actions recorded yet.")
    else:
        _print_table(entries, [("at", "WHEN"), ("actor", "WHO"), ("action", "ACTION"), ("target", "TARGET"),
                               ("detail", "DETAIL")])
    return 0


def cmd_doctor(args):
    findings = llmgw.check_installation(llmgw.config_path_from_env(), llmgw.db_path_from_env(), reach=args.reach)
    _print_table([dict(zip(("level", "topic", "text"), finding)) for finding in findings],
                 [("level", "RESULT"), ("topic", "CHECK"), ("text", "DETAIL")])
    return 1 if any(level == "FAIL" for level, _, _ in findings) else 0


def cmd_backup(args):
    store = _store()
    store.backup(args.path)
    print("Backed up %s to %s (mode 0600)." % (store.path, args.path))
    return 0


def cmd_restore(args):
    if not os.path.exists(args.path):
        raise llmgw.ConfigError("backup %s not found" % args.path)
    store = _store(create=True)
    store.restore(args.path, time.time())
    print("Restored %s from %s; start the gateways again." % (store.path, args.path))
    return 0


def _database_url(url):
    """(DatabaseConfig, None) for a postgresql:// URL (its password from
    PGPASSWORD), (None, PATH) for ``sqlite:///PATH``."""
    if url.startswith("sqlite:///"):
        return None, url[len("sqlite:///"):]
    return llmgw.parse_config({"database": {"url": url}}).database, None


def cmd_migrate_db(args):
    stores = []
    for url, create in ((args.source, False), (args.target, True)):
        database, path = _database_url(url)
        if path is not None and not create and not os.path.exists(path):
            raise llmgw.ConfigError("database %s not found" % path)
        stores.append(llmgw.SQLiteStore(path) if path is not None else llmgw.PostgresStore(database))
    source, target = stores
    totals = llmgw.copy_database(source, target, time.time())
    print("Copied %s to %s; the totals agree:" % (source.path, target.path))
    _print_table([{"what": what, "total": total} for what, total in totals], [("what", "WHAT"), ("total", "TOTAL")])
    return 0


def _add_policy_flags(parser):
    parser.add_argument("--tier", help="rate-limit tier from config.yaml (default: default)")
    parser.add_argument("--rpm", help="requests per minute, overriding the tier")
    parser.add_argument("--tpm", help="tokens per minute")
    parser.add_argument("--max-parallel", dest="max_parallel", help="requests in flight at once")
    parser.add_argument("--budget", help="maximum spend in USD per budget period")
    parser.add_argument("--budget-period", dest="budget_period", help="daily, weekly, monthly (default) or never")
    parser.add_argument("--expires-in", dest="expires_in", help="e.g. 30d, 12h")
    parser.add_argument("--expires-at", dest="expires_at", help="ISO 8601 time (UTC unless it says)")
    parser.add_argument("--models", help="comma-separated model names or globs this key may use")
    parser.add_argument("--label", action="append", help="NAME=VALUE label for stats (repeatable)")
    parser.add_argument("--log-bodies", dest="log_bodies", action="store_const", const=True,
                        help="keep this key's request and response bodies (first %d KiB each, for "
                             "logging.body_retention_days), shown only by logs --id N --bodies"
                             % (llmgw.BODY_LOG_BYTES // 1024))
    parser.add_argument("--no-log-bodies", dest="log_bodies", action="store_const", const=False,
                        help="stop keeping this key's bodies")
    parser.add_argument("--alert-thresholds", dest="alert_thresholds",
                        help="budget alert percentages for this key, e.g. 50,80,100 (none: alerts.thresholds)")
    parser.add_argument("--admission", help="strict or estimate: how a budgeted call is admitted "
                                            "(none: budgets.admission in config.yaml)")


def build_parser():
    parser = argparse.ArgumentParser(prog="python cli.py", description="llmgw: a self-hosted LLM API gateway.")
    parser.add_argument("--version", action="version", version="llmgw " + llmgw.__version__)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True

    commands.add_parser("init", help="create config.yaml, the database and an admin token").set_defaults(
        run=cmd_init)
    commands.add_parser("admin-token", help="issue a new admin token").set_defaults(run=cmd_admin_token)
    commands.add_parser("metrics-token", help="issue a token for GET /metrics only").set_defaults(
        run=cmd_metrics_token)
    serve = commands.add_parser("serve", help="run the gateway")
    serve.add_argument("--host", help="address to listen on (default: server.host in config.yaml)")
    serve.add_argument("--port", help="port to listen on (default: server.port)")
    serve.add_argument("--workers", default="1",
                       help="gateway processes sharing the port and the database (default 1)")
    serve.set_defaults(run=cmd_serve)

    keys = commands.add_parser("keys", help="manage virtual keys").add_subparsers(dest="keys", metavar="ACTION")
    keys.required = True
    create = keys.add_parser("create", help="create a virtual key (printed once)")
    create.add_argument("name", help="project name")
    _add_policy_flags(create)
    create.add_argument("--output", choices=("table", "json"), default="table")
    create.set_defaults(run=cmd_keys_create, tier="default")
    update = keys.add_parser("update", help="change a key's limits, budget, expiry, models or labels")
    update.add_argument("id")
    _add_policy_flags(update)
    update.set_defaults(run=cmd_keys_update)
    rotate = keys.add_parser("rotate", help="issue a new secret for a key, keeping its id, history and budget")
    rotate.add_argument("id")
    rotate.add_argument("--grace", default="0s", help="how long the old secret keeps working (e.g. 24h)")
    rotate.set_defaults(run=cmd_keys_rotate)
    topup = keys.add_parser("topup", help="add USD to a key's current budget period (or balance)")
    topup.add_argument("id")
    topup.add_argument("amount")
    topup.set_defaults(run=cmd_keys_topup)
    listing = keys.add_parser("list", help="list virtual keys (never their secrets)")
    listing.add_argument("--output", choices=("table", "json"), default="table")
    listing.set_defaults(run=cmd_keys_list)
    revoke = keys.add_parser("revoke", help="revoke a virtual key by id")
    revoke.add_argument("id")
    revoke.set_defaults(run=cmd_keys_revoke)

    config = commands.add_parser("config", help="provider keys").add_subparsers(dest="config", metavar="ACTION")
    config.required = True
    set_key = config.add_parser("set-key", help="store a provider's API key in the database")
    set_key.add_argument("provider")
    set_key.add_argument("key", help="the key, or - to read it from standard input (keeps it out of ps "
                                     "and shell history)")
    set_key.add_argument("--name", help="store one more key for the provider under this name (a deployment)")
    set_key.set_defaults(run=cmd_config_set_key)
    config.add_parser("list-keys", help="show provider keys, masked, with their source").set_defaults(
        run=cmd_config_list_keys)

    deployments = commands.add_parser("deployments", help="provider keys (deployments), masked, and cooldowns")
    deployments.add_argument("--output", choices=("table", "json"), default="table")
    deployments.set_defaults(run=cmd_deployments)

    stats = commands.add_parser("stats", help="usage and cost per virtual key")
    stats.add_argument("--by", default="key", help="key (default), project, model, provider, day or label:NAME")
    stats.add_argument("--since", help="from this date (YYYY-MM-DD, UTC) or ISO time")
    stats.add_argument("--until", help="up to and including this date, or before this ISO time")
    stats.add_argument("--project", help="only this project")
    stats.add_argument("--output", choices=("table", "json", "csv"), default="table")
    stats.add_argument("--reprice", action="store_true",
                       help="recompute costs from the stored token counts with today's prices")
    stats.add_argument("--apply", action="store_true", help="with --reprice: write the new costs")
    stats.set_defaults(run=cmd_stats)

    logs = commands.add_parser("logs", help="the request log, newest first (one page)")
    for name in ("key", "project", "provider", "model", "status"):
        logs.add_argument("--" + name, help="only this %s" % name)
    logs.add_argument("--since", help="from this date (YYYY-MM-DD, UTC) or ISO time")
    logs.add_argument("--until", help="up to and including this date, or before this ISO time")
    logs.add_argument("--limit", help="rows per page (default 50, at most %d)" % llmgw.LOG_PAGE_LIMIT)
    logs.add_argument("--cursor", help="the next page: the cursor the previous page printed")
    logs.add_argument("--output", choices=("table", "json", "csv"), default="table")
    logs.add_argument("--id", help="one entry, by the ID the list shows")
    logs.add_argument("--bodies", action="store_true",
                      help="with --id: the request and response bodies kept for a key created with --log-bodies")
    logs.set_defaults(run=cmd_logs)
    prune = commands.add_parser("prune", help="delete old request-log rows; rollups stay")
    prune.add_argument("--older-than", dest="older_than",
                       help="age like 90d (default: logging.retention_days in config.yaml)")
    prune.set_defaults(run=cmd_prune)

    prices = commands.add_parser("prices", help="model prices").add_subparsers(dest="prices", metavar="ACTION")
    prices.required = True
    price_list = prices.add_parser("list", help="the prices in force, with their source")
    price_list.add_argument("--output", choices=("table", "json"), default="table")
    price_list.set_defaults(run=cmd_prices_list)
    price_import = prices.add_parser("import", help="load a price pack (our JSON format or LiteLLM's)")
    price_import.add_argument("file")
    price_import.set_defaults(run=cmd_prices_import)
    audit = commands.add_parser("audit", help="administrative actions: keys, provider keys, tokens, prices")
    audit.add_argument("--limit", default="100", help="how many entries (default 100)")
    audit.add_argument("--output", choices=("table", "json"), default="table")
    audit.set_defaults(run=cmd_audit)
    doctor = commands.add_parser("doctor", help="check config, file modes, database, clock and provider keys")
    doctor.add_argument("--reach", action="store_true",
                        help="also connect to each configured provider host (no key is sent)")
    doctor.set_defaults(run=cmd_doctor)
    backup = commands.add_parser("backup", help="copy the database, consistently, while gateways serve")
    backup.add_argument("path", help="the copy to create (must not exist)")
    backup.set_defaults(run=cmd_backup)
    restore = commands.add_parser("restore", help="replace the database with a backup (stop the gateways first)")
    restore.add_argument("path", help="a file made by backup")
    restore.set_defaults(run=cmd_restore)
    migrate = commands.add_parser("migrate-db", help="copy every key, usage row, price, setting and audit entry into "
                                                     "an empty database (stop the gateways first)")
    migrate.add_argument("--from", dest="source", required=True, help="sqlite:///PATH or postgresql://...")
    migrate.add_argument("--to", dest="target", required=True, help="postgresql://... or sqlite:///PATH (empty)")
    migrate.set_defaults(run=cmd_migrate_db)
    return parser


def main(argv=None):
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        for name, value in vars(args).items():  # bytes the locale could not decode would reach SQLite
            if isinstance(value, str) and any(0xD800 <= ord(ch) <= 0xDFFF for ch in value):
                raise llmgw.ConfigError("%s: not valid text in this locale's encoding" % name)
        return args.run(args)
    except llmgw.GatewayError as exc:
        print("error: %s" % exc.message, file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
