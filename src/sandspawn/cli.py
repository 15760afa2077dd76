"""The `sandspawn` command line: run, doctor, explain, profiles.

Exit status of `run`: the command's own status, 128+N when it died from signal N, 124 when the
policy's timeout killed it, and 125 for sandspawn's own errors (bad policy, a restriction that
cannot be enforced, a failed sandbox setup), with a one-line reason on stderr.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from collections.abc import Sequence
from typing import Any

from . import policy as policy_mod
from .errors import PolicyError, SandspawnError
from .paths import check_host_paths
from .plan import ENGINES, CannotEnforce, Report, make_plan
from .policy import NETWORK_MODES, RESTRICTIONS, PathRule, Policy

EXIT_OWN_ERROR = 125
EXIT_TIMEOUT = 124
_CMDLINE = "<command line>"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # argparse's usage errors are our errors too: 125
        self.print_usage(sys.stderr)
        print(f"sandspawn: {message}", file=sys.stderr)
        raise SystemExit(EXIT_OWN_ERROR)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="sandspawn", description="Run programs under declared restrictions.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def policy_args(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--profile", default="strict",
                        help="built-in profile name or TOML file (default: strict)")
        sp.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                        help="value of a profile parameter, e.g. --param input=photo.png")
        for mode in ("ro", "rw", "exec"):
            sp.add_argument(f"--{mode}", action="append", default=[], metavar="PATH",
                            help=f"also allow PATH ({mode})")
        sp.add_argument("--network", choices=NETWORK_MODES, help="override the network mode")
        sp.add_argument("--tcp-port", action="append", type=int, default=[], metavar="PORT",
                        help="with --network tcp-connect: a TCP port that may be connected to")
        sp.add_argument("--allow-weaker", action="append", default=[], metavar="RESTRICTION",
                        choices=RESTRICTIONS,
                        help="accept a weaker meaning for this restriction (repeatable)")
        sp.add_argument("--engine", choices=ENGINES, default="auto")
        sp.add_argument("--uid", type=int, default=65534,
                        help="host uid the payload runs as when the caller is root")
        sp.add_argument("--gid", type=int, default=65534)
        sp.add_argument("--json", action="store_true", help="machine-readable report")

    run = sub.add_parser("run", help="run a command in a sandbox")
    policy_args(run)
    run.add_argument("--report", action="store_true", help="print the report to stderr")
    run.add_argument("--cwd", help="working directory of the command (default: the current "
                     "one, or / when the sandbox may not enter it)")
    run.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- CMD ARGS...")

    doctor = sub.add_parser("doctor", help="what this host offers, with reasons and remedies")
    doctor.add_argument("--json", action="store_true")

    explain = sub.add_parser("explain", help="what a profile would get here, without running")
    policy_args(explain)

    profiles = sub.add_parser("profiles", help="list or show built-in profiles")
    profiles.add_argument("action", nargs="?", choices=("list", "show"), default="list")
    profiles.add_argument("name", nargs="?")
    return p


def _policy(args: argparse.Namespace) -> Policy:
    params: dict[str, str] = {}
    for item in args.param:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise PolicyError(f"bad --param {item!r}", source=_CMDLINE, key="--param",
                              value=item, allowed=("NAME=VALUE",))
        params[name] = value
    extra = [PathRule(policy_mod.caller_path(path, _CMDLINE, f"--{mode}"), mode)
             for mode in ("ro", "rw", "exec") for path in getattr(args, mode)]
    ports: list[int] = args.tcp_port
    mode = args.network
    if ports:
        for port in ports:
            if not 1 <= port <= 65535:
                raise PolicyError(f"bad port {port}", source=_CMDLINE, key="--tcp-port",
                                  value=port, allowed=("1..65535",))
        if mode not in (None, "tcp-connect"):
            given = " ".join(f"--tcp-port {p}" for p in ports)
            raise PolicyError(f"{given} conflicts with --network {mode}: only "
                              "--network tcp-connect takes TCP ports", source=_CMDLINE,
                              key="--network/--tcp-port", value=ports,
                              allowed=("--tcp-port only with --network tcp-connect",))
    pol = Policy.load(args.profile, params)
    if extra:
        pol = pol.with_paths(extra)
        check_host_paths(pol, origins={r: (_CMDLINE, f"--{r.access}") for r in extra})
    if ports and mode is None and pol.network.mode != "tcp-connect":
        given = " ".join(f"--tcp-port {p}" for p in ports)
        raise PolicyError(f"{given} conflicts with network mode {pol.network.mode!r} of profile "
                          f"{args.profile}: only tcp-connect takes TCP ports", source=_CMDLINE,
                          key="--network/--tcp-port", value=ports,
                          allowed=("--tcp-port only with --network tcp-connect",))
    if mode or ports:
        pol = pol.with_network(mode or pol.network.mode, ports)
    return pol


def _print_report(report: Report, as_json: bool) -> None:
    if as_json:
        print(json.dumps(report.to_json(), indent=2), file=sys.stderr)
    else:
        print(report.format_table(), file=sys.stderr)


def _refusal(exc: CannotEnforce, as_json: bool) -> int:
    names = ", ".join(ln.restriction for ln in exc.refused)
    print(f"sandspawn: cannot enforce {names} with engine {exc.report.engine}", file=sys.stderr)
    if as_json:
        print(json.dumps(exc.report.to_json(), indent=2), file=sys.stderr)
    else:
        for ln in exc.refused:
            print(f"  {ln.restriction}: {ln.reason}", file=sys.stderr)
            print(f"    remedy: {ln.remedy}", file=sys.stderr)
    return EXIT_OWN_ERROR


def _cmd_run(args: argparse.Namespace) -> int:
    from .process import Popen

    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not cmd:
        print("sandspawn: run needs a command after --", file=sys.stderr)
        return EXIT_OWN_ERROR
    proc = Popen(cmd, _policy(args), allow_weaker=args.allow_weaker, engine=args.engine,
                 uid=args.uid, gid=args.gid, cwd=args.cwd)
    if args.report or args.json:
        _print_report(proc.report, args.json)

    def forward(sig: int, _frame: object) -> None:
        proc.send_signal(sig)

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, forward)
    code = proc.wait()
    if proc.timed_out:
        print(f"sandspawn: killed after the policy's timeout of {proc.plan.timeout:g} s",
              file=sys.stderr)
        return EXIT_TIMEOUT
    return 128 - code if code < 0 else code


def _cmd_doctor(args: argparse.Namespace) -> int:
    from .probe import format_facts, probe_host

    probe = probe_host()
    if args.json:
        print(json.dumps(probe.to_json(), indent=2))
    else:
        print(format_facts(probe))
    return 0


def _cmd_explain(args: argparse.Namespace) -> int:
    from .probe import probe_host

    plan = make_plan(_policy(args), probe_host(), engine=args.engine,
                     allow_weaker=args.allow_weaker, uid=args.uid, gid=args.gid)
    if args.json:
        print(json.dumps(plan.report.to_json(), indent=2))
    else:
        print(plan.report.format_table())
    return 0


def _cmd_profiles(args: argparse.Namespace) -> int:
    if args.action == "show":
        if not args.name:
            print("sandspawn: profiles show needs a NAME", file=sys.stderr)
            return EXIT_OWN_ERROR
        print(policy_mod.builtin_profile_text(args.name), end="")
        return 0
    for name in policy_mod.builtin_profiles():
        text = policy_mod.builtin_profile_text(name)
        desc = next((ln.split("=", 1)[1].strip().strip('"') for ln in text.splitlines()
                     if ln.startswith("description")), "")
        print(f"{name:<16} {desc}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    as_json = bool(getattr(args, "json", False))
    try:
        handler = {"run": _cmd_run, "doctor": _cmd_doctor, "explain": _cmd_explain,
                   "profiles": _cmd_profiles}[args.command]
        return handler(args)
    except CannotEnforce as exc:
        return _refusal(exc, as_json)
    except SandspawnError as exc:
        print(f"sandspawn: {exc}", file=sys.stderr)
        return EXIT_OWN_ERROR
    except KeyboardInterrupt:
        return 128 + signal.SIGINT


if __name__ == "__main__":
    raise SystemExit(main())
