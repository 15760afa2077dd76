"""The environment matrix (issue 4): in each environment, recreated with real kernel mechanisms
(envs.py), `sandspawn run --profile strict` either runs with the engine matrix.py expects or
exits 125 naming the real cause; with --allow-weaker for exactly the refused restrictions it
runs, and a probe inside checks that every report line holds (checks.py). `sandspawn doctor`
names the cause and a remedy. docs/environments.md is the rendering of the same data.

Each (environment, caller) runs at most three commands (strict, strict --allow-weaker, doctor),
cached for the session. The caller is root and uid 65534 when the suite runs as root, else
the unprivileged user running it.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import checks
import envs
import harness
import matrix
import pytest
from matrix import EXPECTED, EXPECTED_BY_ROW, Doctor, Expect, render

HERE = Path(__file__).resolve().parent
CALLERS = ["root", "nobody"] if os.geteuid() == 0 else ["nobody"]
_RUNS: dict[tuple[str, str, str], harness.Result] = {}


def _strict_cli(e: Expect, weaker: bool) -> list[str]:
    cli = ["run", "--profile", "strict", "--json"]
    if e.flag:
        cli += ["--engine", e.flag]
    for name in e.refused if weaker else ():
        cli += ["--allow-weaker", name]
    return cli


def run_of(runner: harness.Runner, row: str, caller: str, kind: str) -> harness.Result:
    """kind: "strict" (plain), "weaker" (with --allow-weaker for the refused restrictions),
    "doctor"; the probe is the payload of both runs."""
    key = (row, caller, kind)
    if key not in _RUNS:
        e = EXPECTED_BY_ROW[row]
        env = envs.ENV_BY_NAME[e.env]
        if kind == "doctor":
            _RUNS[key] = runner.run(env, caller, ["doctor", "--json"])
        elif kind == "weaker" and not e.refused:
            _RUNS[key] = run_of(runner, row, caller, "strict")
        else:
            _RUNS[key] = runner.run(env, caller, _strict_cli(e, kind == "weaker"), probe=True)
    return _RUNS[key]


def cases(want: Any = None, gap: Any = None) -> list[Any]:
    """(row, caller) params; a known sandspawn bug for that caller, or `gap(e)`, marks the case
    xfail(strict=True), so it fails as soon as the behaviour changes."""
    out = []
    for e in EXPECTED:
        for caller in CALLERS:
            if caller not in e.callers or (want is not None and not want(e)):
                continue
            reason = e.bugs.get(caller) or (gap(e) if gap else None)
            marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
            out.append(pytest.param(e.row, caller, id=f"{e.row}-{caller}", marks=marks))
    return out


def _host_ns() -> dict[str, str]:
    return {n: os.readlink(f"/proc/self/ns/{n}") for n in ("pid", "net", "ipc", "mnt", "user",
                                                           "uts")}


def _tmpdir_gone(path: str | None, grace: float = 3.0) -> bool | None:
    if not path:
        return None
    deadline = time.monotonic() + grace
    while os.path.lexists(path) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not os.path.lexists(path)


def seen_for(runner: harness.Runner, e: Expect, caller: str, res: harness.Result
             ) -> checks.Seen:
    assert res.probe is not None
    token = json.loads(res.argv[-1])["token"]
    tops = {"usr", "bin", "sbin", "lib", "lib64", "lib32", "libx32", "etc",
            Path(runner.targets.root).parts[1]}
    return checks.Seen(
        host_ns=_host_ns(),
        caller_setpcap=caller == "root" and envs.ENV_BY_NAME[e.env].outer is None,
        killed_caller=res.killed_caller,
        survivors=res.survivors,
        received=runner.targets.drain(),
        token=token,
        granted_tops=tops,
        tmpdir_gone=_tmpdir_gone(res.probe.get("tmpdir")),
        # start_new_session: the command line leads its own session
        caller_sid=res.pid if envs.ENV_BY_NAME[e.env].outer is None else None,
        payload_uids=res.payload_uids,
    )


# ---------------------------------------------------------------------------------------------
# The engine, or the refusal


@pytest.mark.parametrize(("row", "caller"), cases())
def test_strict_runs_or_exits_125(runner: harness.Runner, row: str, caller: str) -> None:
    e = EXPECTED_BY_ROW[row]
    res = run_of(runner, row, caller, "strict")
    assert res.report is not None, res.stderr
    lines = res.lines()
    assert res.report["engine"] == e.engine
    if e.refused:
        assert res.code == 125, res.stderr
        assert res.probe is None, "a refused sandbox ran its payload"
        assert res.refusal() == (f"sandspawn: cannot enforce {', '.join(e.refused)} with "
                                 f"engine {e.engine}")
        refused = [r for r, ln in lines.items() if ln["status"] == "refused"]
        assert refused == list(e.refused)
        for name in e.refused:
            assert lines[name]["reason"] and lines[name]["remedy"], lines[name]
            if e.runs:  # a weaker meaning exists: the remedy offers it
                assert f"--allow-weaker {name}" in lines[name]["remedy"]
        if not e.runs:
            got = {r: (ln["status"], ln["mechanism"]) for r, ln in lines.items()}
            assert got == e.lines_for(caller)
    else:
        assert res.probe is not None, res.stderr
        # the command line was SIGKILLed once the probe had reported (the lifetime check)
        assert res.killed_caller and res.code == -9, res.stderr


@pytest.mark.parametrize(("row", "caller"),
                         cases(lambda e: bool(e.refused), gap=lambda e: e.cause_gap))
def test_refusal_names_the_real_cause(runner: harness.Runner, row: str, caller: str) -> None:
    e = EXPECTED_BY_ROW[row]
    lines = run_of(runner, row, caller, "strict").lines()
    assert set(e.cause) == set(e.refused), "matrix.py: a cause for every refused line"
    for name, words in e.cause.items():
        reason = lines[name]["reason"].lower()
        missing = [w for w in words if w.lower() not in reason]
        assert not missing, f"{name}: {lines[name]['reason']!r} lacks {missing}"


# ---------------------------------------------------------------------------------------------
# Every report line holds, seen from inside


@pytest.mark.parametrize(("row", "caller"), cases(lambda e: e.runs))
def test_every_report_line_holds(runner: harness.Runner, row: str, caller: str) -> None:
    e = EXPECTED_BY_ROW[row]
    res = run_of(runner, row, caller, "weaker")
    assert res.report is not None and res.probe is not None, res.stderr
    assert res.report["engine"] == e.engine
    got = {ln["restriction"]: (ln["status"], ln["mechanism"])
           for ln in res.report["restrictions"]}
    assert got == e.lines_for(caller)
    problems = checks.check_report(res.report, res.probe, seen_for(runner, e, caller, res))
    assert not problems, json.dumps(problems, indent=2)


# ---------------------------------------------------------------------------------------------
# sandspawn doctor


def _doctor_cases() -> list[Any]:
    out = []
    for e in EXPECTED:
        for caller in CALLERS:
            if caller not in e.callers:
                continue
            for d in e.doctor:
                marks = [pytest.mark.xfail(strict=True, reason=d.gap)] if d.gap else []
                out.append(pytest.param(e.row, caller, d, id=f"{e.row}-{caller}-{d.fact}",
                                        marks=marks))
    return out


@pytest.mark.parametrize(("row", "caller", "want"), _doctor_cases())
def test_doctor_names_cause_and_remedy(runner: harness.Runner, row: str, caller: str,
                                       want: Doctor) -> None:
    res = run_of(runner, row, caller, "doctor")
    assert res.code == 0, res.stderr
    facts = {f["name"]: f for f in json.loads(res.stdout)["facts"]}
    fact = facts[want.fact]
    assert fact["available"] is want.available, fact
    if not want.available:
        assert fact["remedy"], fact
        reason = str(fact["reason"]).lower()
        missing = [w for w in want.words if w.lower() not in reason]
        assert not missing, f"{fact['reason']!r} lacks {missing}"
    if want.errno is not None:
        assert fact["errno"] == want.errno, fact


# ---------------------------------------------------------------------------------------------
# The checker itself, and the docs


def test_unsandboxed_probe_fails_every_restricting_check(runner: harness.Runner) -> None:
    """Control: the probe run without a sandbox (as the payload's uid) must fail every
    predicate that restricts something, so a sandbox weaker than its report cannot pass."""
    t = runner.targets
    token = "control-" + str(os.getpid())
    cmd = [harness.PAYLOAD_PYTHON, "-c", harness.PROBE_SOURCE, json.dumps(t.args(token, None))]
    if os.geteuid() == 0:
        cmd = ["setpriv", f"--reuid={envs.NOBODY}", f"--regid={envs.NOBODY}", "--clear-groups",
               *cmd]
    master, slave = os.openpty()
    try:
        res = subprocess.run(cmd, stdin=slave, capture_output=True, text=True, timeout=60,
                             cwd="/", env={**runner.caller_env(), "TMPDIR": str(t.rw)})
    finally:
        os.close(master)
        os.close(slave)
    obs = json.loads(res.stdout.splitlines()[0])
    seen = checks.Seen(host_ns=_host_ns(), caller_setpcap=True, killed_caller=True,
                       survivors=["(not checked)"], received=t.drain(), token=token,
                       granted_tops={"usr"}, tmpdir_gone=False)
    passed = []
    for restriction, by_mechanism in checks.CHECKS.items():
        for mechanism, pred in by_mechanism.items():
            if pred is checks.not_restricted:
                continue
            requested = {"syscalls": "default", "environment": "cleared"}.get(restriction, "")
            line = {"restriction": restriction, "mechanism": mechanism, "requested": requested}
            if not pred(obs, seen, line):
                passed.append(f"{restriction} / {mechanism}")
    assert not passed, f"these checks pass without any sandbox: {passed}"


def test_a_mechanism_without_a_predicate_fails() -> None:
    line = {"restriction": "processes", "requested": "isolated", "status": "enforced",
            "mechanism": "some future engine", "meaning": "whatever"}
    problems = checks.check_line(line, {}, None)  # type: ignore[arg-type]
    assert problems and "no predicate" in problems[0]


def test_deny_filter_builder() -> None:
    """envs.build_filter answers as declared, checked with the test suite's BPF interpreter."""
    sys.path.insert(0, str(HERE.parent))
    import bpf_interp as bi

    nums = {"unshare": 272, "clone": 56, "clone3": 435}
    rules = (envs.Deny("unshare", "EPERM"), envs.Deny("clone3", "ENOSYS"),
             envs.Deny("clone", "EPERM", envs.CLONE_NEWUSER))
    bpf = envs.build_filter(rules, "x86_64", nums)
    arch = bi.AUDIT_ARCH_X86_64

    def verdict(nr: int, *args: int, a: int = arch) -> int:
        return bi.run(bpf, bi.SeccompData(nr, a, args))

    assert verdict(272) == bi.SECCOMP_RET_ERRNO | errno.EPERM
    assert verdict(435) == bi.SECCOMP_RET_ERRNO | errno.ENOSYS
    assert verdict(56, envs.CLONE_NEWUSER | 0x11) == bi.SECCOMP_RET_ERRNO | errno.EPERM
    assert verdict(56, 0x11) == bi.SECCOMP_RET_ALLOW  # plain fork-like clone
    assert verdict(0) == bi.SECCOMP_RET_ALLOW
    assert verdict(272, a=bi.AUDIT_ARCH_I386) == bi.SECCOMP_RET_ALLOW


def test_docs_environments_md_is_the_rendered_matrix() -> None:
    from sandspawn.policy import RESTRICTIONS

    assert matrix.RESTRICTIONS == RESTRICTIONS
    repo = Path(os.environ.get("SANDSPAWN_REPO", HERE.parent.parent))
    doc = repo / "docs" / "environments.md"
    assert doc.read_text() == render(), (
        "docs/environments.md is stale: python tests/hostile/render_table.py > "
        "docs/environments.md")
