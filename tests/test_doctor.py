"""`sandspawn doctor` diagnoses made-up hostile environments with the true reason, from outside
the test process: a seccomp filter that blocks unshare, and a user namespace whose
user.max_user_namespaces is 0 (what bwrap --disable-userns and Flatpak do)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from forked import NOBODY

# Installs our default seccomp filter (which answers EPERM to unshare), then execs the doctor.
UNDER_SECCOMP = """
import os, sys
from sandspawn.confine import _libc, seccomp
_libc.set_no_new_privs()
seccomp.load_bpf(seccomp.compile_bpf(seccomp.SyscallPolicy()))
os.execv(sys.executable, [sys.executable, "-m", "sandspawn", "doctor", "--json"])
"""

# Enters a new user namespace (mapped to root inside), sets max_user_namespaces to 0 there, and
# execs the doctor: creating any further user namespace then fails with ENOSPC.
IN_CAPPED_USERNS = """
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
uid, gid = os.getuid(), os.getgid()
if libc.unshare(0x10000000) != 0:
    raise OSError(ctypes.get_errno(), "unshare")
open("/proc/self/setgroups", "w").write("deny")
open("/proc/self/uid_map", "w").write(f"0 {uid} 1")
open("/proc/self/gid_map", "w").write(f"0 {gid} 1")
open("/proc/sys/user/max_user_namespaces", "w").write("0")
os.execv(sys.executable, [sys.executable, "-m", "sandspawn", "doctor", "--json"])
"""


def users() -> list[list[str]]:
    drop = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
    return [[], drop] if os.geteuid() == 0 else [[]]


def doctor(prefix: list[str], script: str) -> dict[str, dict[str, object]]:
    res = subprocess.run([*prefix, sys.executable, "-c", script], capture_output=True,
                         text=True, timeout=60, cwd="/")
    assert res.returncode == 0, res.stderr
    return {f["name"]: f for f in json.loads(res.stdout)["facts"]}


@pytest.mark.parametrize("prefix", users(), ids=lambda p: "nobody" if p else "self")
def test_doctor_under_seccomp_blocking_unshare(prefix: list[str]) -> None:
    facts = doctor(prefix, UNDER_SECCOMP)
    userns = facts["userns"]
    assert not userns["available"]
    assert userns["step"] == "unshare" and userns["errno"] == 1  # EPERM
    assert "seccomp" in str(userns["reason"]) and userns["remedy"]
    assert not facts["seccomp_active"]["available"]
    assert "Seccomp: 2" in str(facts["seccomp_active"]["reason"])
    assert facts["landlock"]["available"]  # the landlock engine still works here
    bwrap = facts["bwrap"]
    if shutil.which("bwrap"):
        # The filter answers EPERM to clone(CLONE_NEWUSER): bubblewrap says "No permissions to
        # create new namespace" (its 0.8 wording), and the cause is the filter, not a sysctl.
        assert not bwrap["available"], bwrap
        assert "seccomp filter blocks creating namespaces" in str(bwrap["reason"]), bwrap
        assert "unprivileged_userns_clone" not in str(bwrap["remedy"]) and bwrap["remedy"]


@pytest.mark.parametrize("prefix", users(), ids=lambda p: "nobody" if p else "self")
def test_doctor_in_userns_with_max_user_namespaces_zero(prefix: list[str]) -> None:
    facts = doctor(prefix, IN_CAPPED_USERNS)
    userns = facts["userns"]
    assert not userns["available"]
    assert userns["errno"] == 28  # ENOSPC
    assert "max_user_namespaces" in str(userns["reason"]) and userns["remedy"]
    bwrap = facts["bwrap"]
    if shutil.which("bwrap"):
        # root in this namespace: bwrap is tried as the engine runs it, as uid 65534, which the
        # namespace does not map (it maps only the caller, and denies setgroups)
        assert not bwrap["available"], bwrap
        assert "cannot run as uid 65534" in str(bwrap["detail"]) and bwrap["remedy"]


UNDER_SECCOMP_RUN = """
import os, sys
from sandspawn.confine import _libc, seccomp
_libc.set_no_new_privs()
seccomp.load_bpf(seccomp.compile_bpf(seccomp.SyscallPolicy()))
os.execv(sys.executable, [sys.executable, "-m", "sandspawn", "run", "--json", *sys.argv[1:]])
"""


@pytest.mark.parametrize("prefix", users(), ids=lambda p: "nobody" if p else "self")
def test_auto_falls_back_to_landlock_and_says_why(prefix: list[str]) -> None:
    """Where user namespaces are blocked (here: a Docker/Flatpak-like seccomp filter), `auto`
    takes the landlock engine; strict is refused naming the real cause, and runs when the
    caller accepts the weaker processes meaning."""
    base = [*prefix, sys.executable, "-c", UNDER_SECCOMP_RUN]
    refused = subprocess.run([*base, "--profile", "strict", "--", "true"], capture_output=True,
                             text=True, timeout=60, cwd="/")
    assert refused.returncode == 125
    assert "engine landlock" in refused.stderr
    assert "userns" in refused.stderr and "seccomp" in refused.stderr
    weak = subprocess.run([*base, "--profile", "strict", "--allow-weaker", "processes", "--",
                           "sh", "-c", "exit 3"], capture_output=True, text=True, timeout=60,
                          cwd="/")
    assert weak.returncode == 3, weak.stderr
    report = json.loads(weak.stderr)
    assert report["engine"] == "landlock"
    lines = {r["restriction"]: r["status"] for r in report["restrictions"]}
    assert lines["processes"] == "weakened"
    assert all(s == "enforced" for name, s in lines.items() if name != "processes")
