"""The command line: the parser of every command and flag, and `main()`. The commands themselves
are in `tokenomics.commands`, one module per group, each importing what it needs only when it
runs."""

import argparse
import contextlib
import os
import sys

from . import __version__
from .commands import err, out, print_json
from .commands.completion import cmd_completion
from .commands.demo import cmd_demo
from .commands.doctor import cmd_doctor
from .commands.guard import cmd_guard
from .commands.ledger import cmd_ledger
from .commands.provider import cmd_provider
from .commands.run import _usage_line, cmd_init, cmd_run
from .commands.serve import cmd_remote, cmd_serve, cmd_start, cmd_status, cmd_stop
from .commands.token import cmd_token
from .commands.zipapp import build_zipapp
from .errors import ProxyError, RuntimeFailure, UsageError

# What other code imports from here: the console script's main, `make pyz`'s build_zipapp.
__all__ = ["main", "build_parser", "build_zipapp", "_usage_line"]


def _proxy_url_arg(value: str) -> str:
    """--proxy-url as argparse parses it: an http:// or https:// URL with a host and a valid port."""
    import urllib.parse
    example = "e.g. --proxy-url http://127.0.0.1:8080"
    try:
        parts = urllib.parse.urlsplit(value)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{value!r} is not a valid URL ({exc}); {example}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise argparse.ArgumentTypeError(f"{value!r} is not a URL with a scheme http:// or https:// and a host; "
                                         f"{example}")
    return value


def _port_arg(value: str) -> int:
    """--port / --https-port as argparse parses them: 0 (off) to 65535."""
    try:
        port = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a port number; give 1 to 65535, or 0 to disable") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is not a port number; give 1 to 65535, or 0 to disable")
    return port


def _workers_arg(value: str) -> int:
    try:
        workers = int(value)
    except ValueError:
        workers = 0
    if workers < 1:
        raise argparse.ArgumentTypeError(f"{value!r}: give a whole number of at least 1")
    return workers


def cmd_version(args) -> int:
    if getattr(args, "json", False):
        print_json({"version": __version__, "python": sys.version.split()[0]})
    else:
        out(f"tokenomics {__version__}")
    return 0


def _common_options(parser: argparse.ArgumentParser, suppress: bool) -> None:
    default = argparse.SUPPRESS if suppress else None
    parser.add_argument("--config", metavar="PATH", default=default, help="config file (default ./config.yaml, "
                        "then {dir}/config.yaml)")
    parser.add_argument("--dir", metavar="PATH", default=default, help="data directory (default "
                        "$TOKENOMICS_DIR, else ~/.tokenomics)")


def _serve_parser(commands, common) -> None:
    serve = commands.add_parser("serve", parents=[common], help="run the proxy in the foreground")
    serve.add_argument("--host", help="listen address (default 127.0.0.1)")
    serve.add_argument("--port", type=_port_arg, help="HTTP port (default 8080, 0 disables)")
    serve.add_argument("--https-port", type=_port_arg, help="HTTPS port (default 8443, 0 disables)")
    serve.add_argument("--no-tls", action="store_true", help="serve no HTTPS listener")
    serve.add_argument("--upstream-url", help="default upstream (server.upstream_url)")
    serve.add_argument("--workers", type=_workers_arg, default=None,
                       help="worker processes on one port (default server.workers, 1; more need the redis backend)")
    serve.set_defaults(func=cmd_serve)


def _token_parser(commands, common) -> None:
    token = commands.add_parser("token", parents=[common], help="manage wrapper tokens")
    token_cmds = token.add_subparsers(dest="token_cmd", metavar="ACTION")
    token_cmds.required = True
    create = token_cmds.add_parser("create", parents=[common], help="create a token (shown once)")
    create.add_argument("--policy", required=True, help="policy JSON, or @FILE")
    create.add_argument("--expires", help="24h, 7d, 30d, 1y or an RFC 3339 time")
    create.add_argument("--label", help="a name to recognise the token by")
    create.add_argument("--json", action="store_true")
    for name, text in (("get", "show one token"), ("delete", "revoke a token")):
        sub = token_cmds.add_parser(name, parents=[common], help=text)
        sub.add_argument("--hash", required=True, help="the token hash or a unique prefix (8+ chars)")
        sub.add_argument("--json", action="store_true")
    update = token_cmds.add_parser("update", parents=[common], help="change a token's policy, expiry or label")
    update.add_argument("--hash", required=True, help="the token hash or a unique prefix (8+ chars)")
    update.add_argument("--policy", help="policy JSON, or @FILE")
    update.add_argument("--expires", help="24h, 7d, 30d, 1y, an RFC 3339 time, or clear")
    update.add_argument("--label")
    update.add_argument("--json", action="store_true")
    listing = token_cmds.add_parser("list", parents=[common], help="list tokens")
    listing.add_argument("--json", action="store_true")
    listing.add_argument("--wide", action="store_true", help="full hashes, times and values (wider than 100 columns)")
    token.set_defaults(func=cmd_token)


def _run_parser(commands, common) -> None:
    run = commands.add_parser("run", parents=[common], help="wrap a command in an ephemeral proxy",
                              usage="tokenomics run [options] -- CMD [ARGS...]")
    run.add_argument("--token", help="the wrapper token (default $TOKENOMICS_KEY)")
    run.add_argument("--provider", help="also export this provider's variables (gemini, azure, all)")
    run.add_argument("--proxy-url", type=_proxy_url_arg, help="use this running proxy instead of starting one")
    run.add_argument("--tls", action="store_true", help="serve HTTPS with the local CA and trust it in CMD")
    run.add_argument("--print-env", action="store_true", help="show the exported variables on stderr")
    run.add_argument("--admin", action="store_true", help="also serve the admin UI")
    run.add_argument("--upstream-url", help="default upstream (server.upstream_url)")
    run.add_argument("cmd", nargs=argparse.REMAINDER, help="the command to run, after --")
    run.set_defaults(func=cmd_run, host=None, port=None, https_port=None, no_tls=False)


def _start_parser(commands, common) -> None:
    start = commands.add_parser("start", parents=[common], help="run the proxy in the background")
    start.add_argument("--host")
    start.add_argument("--port", type=_port_arg)
    start.add_argument("--https-port", type=_port_arg)
    start.add_argument("--no-tls", action="store_true")
    start.add_argument("--upstream-url")
    start.add_argument("--workers", type=_workers_arg, default=None,
                       help="worker processes on one port (default server.workers, 1; more need the redis backend)")
    start.set_defaults(func=cmd_start)


def _stop_parser(commands, common) -> None:
    commands.add_parser("stop", parents=[common], help="stop the background proxy").set_defaults(func=cmd_stop)


def _report_parser(name: str, help: str, func):
    """The parser builder of a command whose only option is --json (status, doctor)."""
    def build(commands, common) -> None:
        report = commands.add_parser(name, parents=[common], help=help)
        report.add_argument("--json", action="store_true")
        report.set_defaults(func=func)
    return build


def _init_parser(commands, common) -> None:
    init = commands.add_parser("init", parents=[common], help="print the variables that point a client at a proxy")
    init.add_argument("--output", choices=("shell", "dotenv", "json"), default="shell")
    init.add_argument("--dotenv", metavar="FILE", help="write a .env file instead of printing")
    init.add_argument("--proxy-url", type=_proxy_url_arg, help="the proxy's base URL (http:// or https://)")
    init.add_argument("--provider")
    init.add_argument("--token")
    init.add_argument("--insecure", action="store_true", help="skip TLS verification of an HTTPS proxy (Node)")
    init.set_defaults(func=cmd_init)


def _remote_parser(commands, common) -> None:
    remote = commands.add_parser("remote", parents=[common], help="central token server for proxies on other hosts")
    remote.add_argument("--addr", required=True, metavar="HOST:PORT", help="listen address, e.g. 127.0.0.1:9090")
    remote.add_argument("--api-key-env", metavar="NAME", help="variable holding the API key clients send as "
                        "a bearer token (default TOKENOMICS_REMOTE_KEY; required beyond loopback)")
    remote.add_argument("--tls", action="store_true", help="serve HTTPS with the data dir's certificate")
    remote.set_defaults(func=cmd_remote)


def _completion_parser(commands, common) -> None:
    completion = commands.add_parser("completion", parents=[common], help="shell completion script")
    completion.add_argument("shell", choices=("bash", "zsh", "fish"))
    completion.set_defaults(func=cmd_completion, full_parser=build_parser)  # the script lists every command


def _provider_parser(commands, common) -> None:
    provider = commands.add_parser("provider", parents=[common], help="inspect the provider catalog")
    provider_cmds = provider.add_subparsers(dest="provider_cmd", metavar="ACTION")
    provider_cmds.required = True
    sub = provider_cmds.add_parser("list", parents=[common], help="providers, their upstreams and key state")
    sub.add_argument("--json", action="store_true")
    sub = provider_cmds.add_parser("models", parents=[common], help="the catalog's models")
    sub.add_argument("name", nargs="?", help="only this provider")
    sub.add_argument("--json", action="store_true")
    sub = provider_cmds.add_parser("test", parents=[common], help="check connectivity and credentials")
    sub.add_argument("names", nargs="*", help="providers to test (default: those with a key set)")
    sub.add_argument("--json", action="store_true")
    provider.set_defaults(func=cmd_provider)


def _ledger_parser(commands, common) -> None:
    ledger = commands.add_parser("ledger", parents=[common], help="read the session ledger")
    ledger_cmds = ledger.add_subparsers(dest="ledger_cmd", metavar="ACTION")
    ledger_cmds.required = True
    for name, text in (("summary", "totals and rollups by model, provider, token and branch"),
                       ("sessions", "one line per proxy session")):
        sub = ledger_cmds.add_parser(name, parents=[common], help=text)
        sub.add_argument("--json", action="store_true")
        sub.add_argument("--since", help="RFC 3339 date/time, or a duration ago (7d)")
        sub.add_argument("--until", help="RFC 3339 date/time, or a duration ago")
        sub.add_argument("--branch", help="only sessions run on this git branch")
    show = ledger_cmds.add_parser("show", parents=[common], help="one session with its requests")
    show.add_argument("id", help="session id or a prefix of 4+ characters")
    show.add_argument("--json", action="store_true")
    for sub in ledger_cmds.choices.values():
        sub.add_argument("--token", metavar="HASH-PREFIX", help="only requests made with this token")
        sub.add_argument("--label", metavar="TEXT", help="only requests made with the token(s) labelled TEXT")
    ledger.set_defaults(func=cmd_ledger)


def _guard_parser(commands, common) -> None:
    guard = commands.add_parser("guard", parents=[common], help="try a policy's guardrail rules offline")
    guard_cmds = guard.add_subparsers(dest="guard_cmd", metavar="ACTION")
    guard_cmds.required = True
    check = guard_cmds.add_parser("check", parents=[common], help="run a policy's rules on texts: a verdict per "
                                  "text, and recall, false-positive rate and a confusion table on labelled texts")
    check.add_argument("--policy", required=True, help="policy JSON, or @FILE")
    check.add_argument("--jsonl", metavar="FILE", help='JSON lines {"text": ..., "label": ...} (label optional: '
                       "attack/benign, 1/0, true/false, flag/pass); - reads stdin")
    check.add_argument("--text-file", metavar="FILE", help="one text per line; - reads stdin")
    check.add_argument("--scope", choices=("input", "output"), default="input",
                       help="which rules apply: input (default) or output (and those of scope both)")
    check.add_argument("--model", help="also apply the rules of the provider policy matching this model")
    check.add_argument("--rule", action="append", metavar="NAME", help="check only this rule (repeatable)")
    check.add_argument("--summary", action="store_true", help="print only the summary")
    check.add_argument("--json", action="store_true")
    check.add_argument("texts", nargs="*", metavar="TEXT", help="texts to check (instead of a file)")
    guard.set_defaults(func=cmd_guard)


def _demo_parser(commands, common) -> None:
    commands.add_parser("demo", parents=[common], help="a walkthrough on the built-in mock provider "
                        "(no key, no network)").set_defaults(func=cmd_demo)


def _version_parser(commands, common) -> None:
    version = commands.add_parser("version", parents=[common], help="print the version")
    version.add_argument("--json", action="store_true")
    version.set_defaults(func=cmd_version)


# Every command's parser, in the order `tokenomics --help` lists them.
_COMMAND_PARSERS = {
    "serve": _serve_parser,
    "token": _token_parser,
    "run": _run_parser,
    "start": _start_parser,
    "stop": _stop_parser,
    "status": _report_parser("status", "is the background proxy running?", cmd_status),
    "init": _init_parser,
    "remote": _remote_parser,
    "doctor": _report_parser("doctor", "check the set-up", cmd_doctor),
    "completion": _completion_parser,
    "provider": _provider_parser,
    "ledger": _ledger_parser,
    "guard": _guard_parser,
    "demo": _demo_parser,
    "version": _version_parser,
}


def _named_command(argv: list[str]) -> str | None:
    """The command a command line names, when only global options come before it; None when in
    doubt (an abbreviated option, -h, --version, a typo): then the whole parser is built."""
    i = 0
    while i < len(argv):
        word = argv[i]
        if word in ("--config", "--dir"):
            i += 2
        elif word.startswith(("--config=", "--dir=")):
            i += 1
        else:
            return word if word in _COMMAND_PARSERS else None
    return None


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser of every command, or with `command` of that one alone: parsing one command
    line needs no other, and building all of them takes longer than `--version` takes to run."""
    common = argparse.ArgumentParser(add_help=False)
    _common_options(common, suppress=True)
    parser = argparse.ArgumentParser(
        prog="tokenomics", description="A guardrail proxy for LLM traffic: scoped wrapper tokens, budgets, "
        "rate limits, content rules and a cost ledger in front of OpenAI- and Anthropic-compatible APIs.")
    _common_options(parser, suppress=False)
    parser.add_argument("--version", action="version", version=f"tokenomics {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True
    for name, add in _COMMAND_PARSERS.items():
        if command is None or name == command:
            add(commands, common)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(_named_command(argv))
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    try:
        return args.func(args)
    except UsageError as exc:
        err(f"tokenomics: {exc}")
        return 2
    except (RuntimeFailure, ProxyError) as exc:
        err(f"tokenomics: {exc}")
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `tokenomics ... | head`: the reader left; that is not an error
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception as exc:  # the safety net: a bug still ends in one line, not a traceback
        if os.environ.get("TOKENOMICS_DEBUG"):
            raise
        err(f"tokenomics: internal error ({type(exc).__name__}); run with TOKENOMICS_DEBUG=1 for details "
             "and please report it")
        return 1

