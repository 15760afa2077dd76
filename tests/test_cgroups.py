"""confine.cgroups: detection (parsed from synthetic /proc texts over a fake tree, and on this
host), and per-sandbox cgroups on the real cgroup2 hierarchy as far as the host allows.

This host mounts cgroup2 at /sys/fs/cgroup/unified with memory, pids and cpu bound to cgroup v1,
so only the core files (cgroup.procs, cgroup.kill, cgroup.events, cpu.stat) can be exercised;
the controller tests skip naming the missing controller.
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import sandspawn
from forked import NOBODY, both_users, in_child
from procs import alive
from sandspawn.confine import cgroups
from sandspawn.confine.cgroups import CgroupError, SandboxCgroup

PYTHON = "/usr/bin/python3"

V1_HOST_MOUNTINFO = """\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,xattr,name=systemd
"""
PROC_CGROUPS = """\
#subsys_name\thierarchy\tnum_cgroups\tenabled
cpu\t1\t1\t1
memory\t4\t23\t1
pids\t8\t1\t1
hugetlb\t0\t1\t1
"""
PROC_CGROUPS_V2 = """\
#subsys_name\thierarchy\tnum_cgroups\tenabled
cpu\t0\t80\t1
memory\t0\t80\t1
pids\t0\t80\t1
"""


# --- parsing -----------------------------------------------------------------------------------


def test_parse_mountinfo_unescapes_and_splits_options() -> None:
    text = ("41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n"
            "50 23 0:40 /a\\040b /mnt/my\\040cg ro,nosuid shared:5 - cgroup2 none rw,nsdelegate\n"
            "garbage line\n")
    a, b = cgroups.parse_mountinfo(text)
    assert (a.root, a.mountpoint, a.fstype, a.options) == ("/", "/sys/fs/cgroup/unified",
                                                           "cgroup2", ("rw", "relatime"))
    assert (b.root, b.mountpoint, b.options, b.super_options) == (
        "/a b", "/mnt/my cg", ("ro", "nosuid"), ("rw", "nsdelegate"))


def test_parse_own_cgroup_and_proc_cgroups() -> None:
    assert cgroups.parse_own_cgroup("4:memory:/x\n0::/user.slice/a.scope\n") == \
        "/user.slice/a.scope"
    assert cgroups.parse_own_cgroup("4:memory:/x\n") is None
    states = cgroups.parse_proc_cgroups(PROC_CGROUPS)
    assert states["memory"] == cgroups.ControllerState("memory", 4, True)
    assert states["hugetlb"].hierarchy == 0


def test_v1_bound_names_the_v1_mount() -> None:
    bound = cgroups.v1_bound(cgroups.parse_mountinfo(V1_HOST_MOUNTINFO),
                             cgroups.parse_proc_cgroups(PROC_CGROUPS))
    assert bound == {"cpu": "/sys/fs/cgroup/cpu", "memory": "/sys/fs/cgroup/memory",
                     "pids": "/sys/fs/cgroup/pids"}
    # Bound but not mounted here (e.g. in a container): only /proc/cgroups knows.
    assert cgroups.v1_bound([], cgroups.parse_proc_cgroups(PROC_CGROUPS)) == {
        "cpu": "a cgroup v1 hierarchy", "memory": "a cgroup v1 hierarchy",
        "pids": "a cgroup v1 hierarchy"}


# --- detection over a fake tree (plain directories standing in for cgroupfs) --------------------


def fake_cgroup(path: Path, controllers: str = "", subtree: str = "", procs: str = "",
                kind: str | None = "domain") -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "cgroup.controllers").write_text(controllers + "\n")
    (path / "cgroup.subtree_control").write_text(subtree + "\n")
    (path / "cgroup.procs").write_text(procs)
    if kind is not None:
        (path / "cgroup.type").write_text(kind + "\n")
    return path


def mountinfo_for(mnt: Path, root: str = "/", opts: str = "rw,relatime", v1: bool = False
                  ) -> str:
    return (V1_HOST_MOUNTINFO if v1 else "") + \
        f"60 23 0:99 {root} {mnt} {opts} - cgroup2 cgroup2 rw\n"


def test_detect_without_cgroup2_names_v1() -> None:
    sup = cgroups.detect(mountinfo=V1_HOST_MOUNTINFO, proc_cgroup="0::/\n",
                         proc_cgroups=PROC_CGROUPS)
    assert not sup.ok and sup.base is None and sup.usable == ()
    assert "no cgroup v2 hierarchy" in (sup.reason or "")
    assert "systemd.unified_cgroup_hierarchy=1" in (sup.remedy or "")
    assert sup.why_not("memory") == "bound to cgroup v1 at /sys/fs/cgroup/memory"


def test_detect_delegated_subtree_needs_a_leaf(tmp_path: Path) -> None:
    fake_cgroup(tmp_path / "mnt" / "user.slice" / "app.scope", "cpu memory pids io",
                procs="123\n456\n")
    sup = cgroups.detect(mountinfo=mountinfo_for(tmp_path / "mnt", v1=True),
                         proc_cgroup="0::/user.slice/app.scope\n", proc_cgroups=PROC_CGROUPS_V2)
    assert sup.ok and sup.writable and not sup.is_root
    assert sup.base == str(tmp_path / "mnt" / "user.slice" / "app.scope")
    assert sup.usable == ("memory", "pids", "cpu") and sup.enabled == ()
    assert sup.needs_leaf  # our cgroup holds processes and must enable controllers
    assert not sup.kill  # a plain directory has no cgroup.kill
    assert "cgroup.kill" in (sup.reason or "") and "5.14" in (sup.reason or "")
    assert not [n for n in os.listdir(sup.base) if n.startswith(cgroups.PREFIX)]  # probe gone


def test_detect_in_our_leaf_uses_the_parent(tmp_path: Path) -> None:
    mnt = tmp_path / "mnt"
    fake_cgroup(mnt / "svc", "memory pids cpu", subtree="memory pids cpu")
    fake_cgroup(mnt / "svc" / cgroups.LEAF, "memory pids cpu", procs="1\n")
    sup = cgroups.detect(mountinfo=mountinfo_for(mnt), proc_cgroup=f"0::/svc/{cgroups.LEAF}\n",
                         proc_cgroups=PROC_CGROUPS_V2)
    assert sup.base == str(mnt / "svc") and sup.path == str(mnt / "svc" / cgroups.LEAF)
    assert sup.enabled == ("memory", "pids", "cpu") and not sup.needs_leaf


def test_detect_a_mount_of_a_subtree(tmp_path: Path) -> None:
    """cgroup2 mounted from a subtree (a container's view), not at /sys/fs/cgroup."""
    fake_cgroup(tmp_path / "cg" / "inner", "memory")
    sup = cgroups.detect(mountinfo=mountinfo_for(tmp_path / "cg", root="/outer/ctr"),
                         proc_cgroup="0::/outer/ctr/inner\n", proc_cgroups=PROC_CGROUPS_V2)
    assert sup.base == str(tmp_path / "cg" / "inner") and sup.usable == ("memory",)
    assert sup.why_not("pids") == (f"not enabled for our cgroup by {tmp_path / 'cg'}/"
                                   "cgroup.subtree_control (not delegated with it)")
    assert "subtree_control" in (sup.reason or "") and "Delegate=yes" in (sup.remedy or "")


def test_detect_negative_answers(tmp_path: Path) -> None:
    mnt = tmp_path / "mnt"
    fake_cgroup(mnt / "a", "memory pids cpu")
    # outside our cgroup namespace's root
    sup = cgroups.detect(mountinfo=mountinfo_for(mnt), proc_cgroup="0::/../x\n",
                         proc_cgroups=PROC_CGROUPS_V2)
    assert sup.base is None and "outside every cgroup2 mount" in (sup.reason or "")
    # read-only mount
    sup = cgroups.detect(mountinfo=mountinfo_for(mnt, opts="ro,nosuid"), proc_cgroup="0::/a\n",
                         proc_cgroups=PROC_CGROUPS_V2)
    assert not sup.ok and sup.usable == () and "read-only" in (sup.reason or "")
    assert sup.why_not("memory") == "the cgroup2 mount is read-only"
    # no 0:: line
    sup = cgroups.detect(mountinfo=mountinfo_for(mnt), proc_cgroup="1:cpu:/\n",
                         proc_cgroups=PROC_CGROUPS_V2)
    assert sup.base is None and "0::" in (sup.reason or "")
    # disabled at boot, not built in
    states = "#subsys_name\thierarchy\tnum_cgroups\tenabled\ncpu\t0\t1\t1\nmemory\t0\t1\t0\n"
    fake_cgroup(mnt / "b", "cpu")
    sup = cgroups.detect(mountinfo=mountinfo_for(mnt), proc_cgroup="0::/b\n",
                         proc_cgroups=states)
    assert sup.usable == ("cpu",)
    assert sup.why_not("memory") == "disabled on the kernel command line (cgroup_disable=memory)"
    assert sup.why_not("pids") == "not built into this kernel (CONFIG_CGROUP_PIDS)"
    # threaded cgroups cannot host memory or pids
    fake_cgroup(mnt / "t", "memory pids cpu", kind="threaded")
    sup = cgroups.detect(mountinfo=mountinfo_for(mnt), proc_cgroup="0::/t\n",
                         proc_cgroups=PROC_CGROUPS_V2)
    assert sup.usable == () and "threaded" in (sup.reason or "")


def test_detect_root_cgroup_needs_no_leaf(tmp_path: Path) -> None:
    fake_cgroup(tmp_path / "mnt", "memory pids cpu", procs="1\n", kind=None)
    sup = cgroups.detect(mountinfo=mountinfo_for(tmp_path / "mnt"), proc_cgroup="0::/\n",
                         proc_cgroups=PROC_CGROUPS_V2)
    assert sup.is_root and sup.has_processes and not sup.needs_leaf


# --- detection on this host -----------------------------------------------------------------------


@pytest.mark.parametrize("as_nobody", both_users())
def test_detect_on_this_host(as_nobody: bool) -> None:
    def body() -> dict[str, object]:
        sup = cgroups.detect()
        with open("/proc/cgroups") as fh:
            v1 = {c: s.hierarchy != 0
                  for c, s in cgroups.parse_proc_cgroups(fh.read()).items()}
        return {"ok": sup.ok, "reason": sup.reason, "remedy": sup.remedy, "base": sup.base,
                "path": sup.path, "cgroup": sup.cgroup, "usable": list(sup.usable),
                "why": {c: sup.why_not(c) for c in cgroups.CONTROLLERS}, "v1": v1,
                "base_writable": sup.base is not None and os.access(sup.base, os.W_OK),
                "uid": os.geteuid()}

    res = in_child(body, as_nobody=as_nobody)
    assert res.error is None, res.error
    out = res.value
    if out["base"] is None:
        assert out["reason"] and out["remedy"]
        return
    with open("/proc/self/cgroup") as fh:
        assert out["cgroup"] == cgroups.parse_own_cgroup(fh.read())
    for c in cgroups.CONTROLLERS:
        if out["v1"].get(c):
            # the negative answer names the true cause: cgroup v1 holds the controller
            assert c not in out["usable"]
            assert "bound to cgroup v1" in out["why"][c] or "v1" in out["why"][c]
    if not out["base_writable"]:
        assert not out["ok"]
        assert f"not delegated to uid {out['uid']}" in out["reason"]
        assert "Delegate=yes" in out["remedy"]


def test_detect_as_nobody_is_not_writable_here() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to compare with uid 65534")
    sup = cgroups.detect()
    if sup.base is None or os.stat(sup.base).st_uid == NOBODY:
        pytest.skip("no cgroup2 directory owned by another uid on this host")

    def body() -> list[object]:
        s = cgroups.detect()
        return [s.ok, s.writable, s.reason, s.remedy, list(s.usable)]

    res = in_child(body, as_nobody=True)
    assert res.error is None, res.error
    ok, writable, reason, remedy, usable = res.value
    assert not ok and not writable and usable == []
    assert f"not delegated to uid {NOBODY}" in reason and "EACCES" in reason
    assert "Delegate=yes" in remedy


# --- a real sandbox cgroup -----------------------------------------------------------------------


@pytest.fixture()
def support() -> cgroups.CgroupSupport:
    sup = cgroups.detect()
    if not sup.ok:
        pytest.skip(f"no writable cgroup v2 subtree for uid {os.geteuid()}: {sup.reason}")
    return sup


@pytest.fixture()
def cg(support: cgroups.CgroupSupport) -> Iterator[SandboxCgroup]:
    assert support.base is not None
    group = SandboxCgroup.create(support.base)
    try:
        yield group
    finally:
        group.remove()


def _sh_tree(cg: SandboxCgroup, script: str) -> tuple[subprocess.Popen[bytes], list[int]]:
    """Start `sh`, move it into `cg` before it forks anything, then let it run `script` (which
    prints one pid per line, then "ready")."""
    proc = subprocess.Popen(["sh", "-c", f"read go\n{script}\necho ready\nwait"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    cg.add(proc.pid)
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(b"go\n")
    proc.stdin.flush()
    pids = []
    while (line := proc.stdout.readline().strip()) != b"ready":
        pids.append(int(line))
    return proc, pids


def _session(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as fh:
        return int(fh.read().rsplit(")", 1)[1].split()[3])


@pytest.mark.parametrize("use_cgroup_kill", [True, False], ids=["cgroup.kill", "signals"])
def test_create_move_kill_remove(cg: SandboxCgroup, use_cgroup_kill: bool) -> None:
    if use_cgroup_kill and not cg.has("cgroup.kill"):
        pytest.skip("cgroup.kill not available on this host (Linux < 5.14)")
    assert os.path.basename(cg.path).startswith(cgroups.PREFIX)
    assert cg.procs() == [] and not cg.populated()
    proc, pids = _sh_tree(cg, "sleep 60 & echo $!\nsetsid sleep 60 & echo $!\n"
                              "(sleep 60 & wait) &")
    assert len(pids) == 2
    deadline = time.monotonic() + 10
    while len(cg.procs()) < 5 and time.monotonic() < deadline:
        time.sleep(0.01)  # the subshell and its sleep start in the background
    assert set(pids) | {proc.pid} <= set(cg.procs()) and len(cg.procs()) == 5
    pids = [p for p in cg.procs() if p != proc.pid]
    assert cg.populated()
    cg.kill(use_cgroup_kill=use_cgroup_kill)
    assert proc.wait(10) == -signal.SIGKILL
    assert cg.wait_empty(10)
    assert not any(alive(p) for p in pids)  # the setsid'd one and the grandchild too
    assert cg.procs() == []
    path = cg.path
    cg.remove()
    assert not os.path.exists(path)
    cg.remove()  # idempotent


def test_remove_kills_what_is_left(cg: SandboxCgroup) -> None:
    proc, pids = _sh_tree(cg, "sleep 60 & echo $!")
    with pytest.raises(CgroupError) as info:
        cg.remove(kill=False, timeout=0.2)
    assert info.value.errno == errno.EBUSY and info.value.step == "remove cgroup"
    cg.remove()
    assert not os.path.exists(cg.path)
    assert proc.wait(10) == -signal.SIGKILL and not alive(pids[0])


def test_names_are_unique_and_child_cgroups_are_removed(support: cgroups.CgroupSupport) -> None:
    assert support.base is not None
    a, b = SandboxCgroup.create(support.base), SandboxCgroup.create(support.base)
    try:
        assert a.path != b.path
        nested = SandboxCgroup.create(a.path, "inner")
        proc, _ = _sh_tree(nested, "sleep 60 &")
        assert a.populated()  # populated counts descendants
        a.remove()
        assert proc.wait(10) == -signal.SIGKILL
        assert not os.path.exists(a.path)
    finally:
        a.remove()
        b.remove()


def test_add_self_cpu_usage_and_outcome(cg: SandboxCgroup) -> None:
    """A process joins by itself (as the zygote's child will, before it forks anything); the
    core cpu.stat counts its CPU time even without the cpu controller."""
    def body() -> list[object]:
        cg.add_self()
        with open("/proc/self/cgroup") as fh:
            own = cgroups.parse_own_cgroup(fh.read())
        end = time.process_time() + 0.3
        while time.process_time() < end:
            pass
        return [own]

    res = in_child(body)
    assert res.error is None, res.error
    (own,) = res.value
    assert own is not None and cg.path.endswith(own)
    usage = cg.cpu_usage_usec()
    assert usage is not None and usage >= 250_000
    out = cg.outcome()
    assert out.cpu_usage_usec == usage
    if "memory" not in cg.controllers():
        assert out.oom_kills is None and not out.memory_exceeded
    if "pids" not in cg.controllers():
        assert out.pids_max_hits is None
    assert "cpu_usage_usec" in out.to_json()


def test_open_dir_lets_a_child_join_by_fd(cg: SandboxCgroup) -> None:
    fd = cg.open_dir()
    try:
        def body() -> bool:
            cfd = os.open("cgroup.procs", os.O_WRONLY, dir_fd=fd)
            os.write(cfd, b"0")
            os.close(cfd)
            return os.getpid() in cg.procs()

        res = in_child(body)
        assert res.error is None and res.value is True
    finally:
        os.close(fd)


def test_limits_without_their_controller_name_it(cg: SandboxCgroup) -> None:
    for controller, setter in (("memory", lambda: cg.set_memory_max(1 << 28)),
                               ("pids", lambda: cg.set_pids_max(64)),
                               ("cpu", lambda: cg.set_cpu_max(50_000))):
        if controller in cg.controllers():
            continue
        with pytest.raises(CgroupError) as info:
            setter()
        assert info.value.errno == errno.ENOENT
        assert f"the {controller} controller is not enabled" in str(info.value)


def test_a_sandbox_escaping_its_session_is_killed_by_its_cgroup(cg: SandboxCgroup) -> None:
    """The landlock engine kills a sandbox's process group; a descendant that calls setsid()
    escapes that. In the sandbox's cgroup, cgroup.kill reaches it (the zygote integration)."""
    with sandspawn.Popen(["sh", "-c", "read go; setsid sleep 60 & echo $!; wait"], "strict",
                         engine="landlock", allow_weaker=["processes"], cwd="/",
                         stdin=sandspawn.PIPE, stdout=sandspawn.PIPE) as proc:
        cg.add(proc.pid)
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(b"go\n")
        proc.stdin.flush()
        escaped = int(proc.stdout.readline())
        assert escaped in cg.procs()
        deadline = time.monotonic() + 10
        while _session(escaped) != escaped and time.monotonic() < deadline:
            time.sleep(0.01)  # until setsid(1) has called setsid()
        assert _session(escaped) == escaped
        cg.kill()
        assert proc.wait(10) == -signal.SIGKILL
    assert cg.wait_empty(10) and not alive(escaped)


# --- enabling controllers: the no-internal-process rule, shown with a free controller -----------


def test_enable_controllers_moves_our_processes_into_a_leaf() -> None:
    """On this host the only controller free for cgroup v2 is hugetlb; it stands in for memory,
    pids and cpu: the mechanics (EBUSY while the parent holds processes, the move into LEAF,
    +controller in cgroup.subtree_control, the sandbox cgroup getting it) are the same."""
    sup = cgroups.detect(("hugetlb",))
    if not (sup.ok and sup.is_root and os.geteuid() == 0):
        pytest.skip("needs root at the root of a writable cgroup v2 hierarchy")
    if "hugetlb" not in sup.available:
        pytest.skip("no controller free for cgroup v2 on this host (hugetlb is bound to v1)")
    assert sup.base is not None
    root = sup.base
    added = "hugetlb" not in sup.enabled
    if added:
        cgroups.write_file(os.path.join(root, "cgroup.subtree_control"), "+hugetlb")
    parent = os.path.join(root, f"sandspawn-test-{os.getpid()}")
    os.mkdir(parent)

    def body() -> dict[str, object]:
        out: dict[str, object] = {}
        SandboxCgroup(parent).add_self()  # we are the only process of `parent` now
        try:
            s = cgroups.detect(("hugetlb",))
            out["before"] = [s.base, list(s.usable), s.needs_leaf, s.is_root]
            try:
                cgroups.write_file(os.path.join(parent, "cgroup.subtree_control"), "+hugetlb")
                out["direct"] = 0
            except OSError as exc:
                out["direct"] = exc.errno
            out["enabled"] = list(cgroups.enable_controllers(s))
            with open("/proc/self/cgroup") as fh:
                out["own"] = cgroups.parse_own_cgroup(fh.read())
            box = SandboxCgroup.create(parent)
            out["box"] = list(box.controllers())
            again = cgroups.detect(("hugetlb",))
            out["again"] = [again.base, list(again.enabled), again.needs_leaf]
            box.remove()
        finally:
            SandboxCgroup(root).add_self()
        return out

    try:
        res = in_child(body)
        assert res.error is None, res.error
        out = res.value
        assert out["before"] == [parent, ["hugetlb"], True, False]
        assert out["direct"] == errno.EBUSY  # no internal processes
        assert out["enabled"] == ["hugetlb"]
        assert out["own"] == f"/sandspawn-test-{os.getpid()}/{cgroups.LEAF}"
        assert out["box"] == ["hugetlb"]
        assert out["again"] == [parent, ["hugetlb"], False]
    finally:
        SandboxCgroup(parent).remove()
        if added:
            cgroups.write_file(os.path.join(root, "cgroup.subtree_control"), "-hugetlb")


# --- the controllers themselves (where the host has them on cgroup v2) ----------------------------


def controller_base(controller: str) -> str:
    """A directory whose new children get `controller`, without moving this test's processes."""
    sup = cgroups.detect()
    if controller not in sup.usable:
        why = sup.why_not(controller) or "unknown"
        pytest.skip(f"cgroup v2 {controller} controller not available on this host ({why})")
    if sup.needs_leaf:
        pytest.skip(f"cgroup v2 {controller} controller not enabled for children here, and "
                    "enabling it would move this test's processes into a leaf")
    assert sup.base is not None
    if controller not in sup.enabled:
        cgroups.enable_controllers(sup, [controller])
    return sup.base


def _run_in(cg: SandboxCgroup, code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["sh", "-c", 'echo 0 > "$1/cgroup.procs" && exec "$2" -c "$3"', "sh",
                           cg.path, PYTHON, code], capture_output=True, text=True, timeout=60)


def test_memory_max_oom_kills_a_2gib_allocation() -> None:
    with SandboxCgroup.create(controller_base("memory")) as cg:
        cg.set_memory_max(256 << 20)
        res = _run_in(cg, "b = bytearray(2 << 30)\nprint('survived')")
        assert res.returncode == -signal.SIGKILL and "survived" not in res.stdout
        out = cg.outcome()
        assert out.oom_kills is not None and out.oom_kills >= 1 and out.memory_exceeded
        assert out.memory_peak is None or out.memory_peak <= (256 << 20) + (1 << 20)


def test_pids_max_contains_a_fork_bomb() -> None:
    bomb = ("import os, time\nn = 0\nwhile True:\n    try:\n        pid = os.fork()\n"
            "    except OSError as e:\n        print(e.errno, flush=True); break\n"
            "    if pid == 0:\n        time.sleep(30); os._exit(0)\n")
    with SandboxCgroup.create(controller_base("pids")) as cg:
        cg.set_pids_max(64)
        res = _run_in(cg, bomb)
        assert res.stdout.split()[:1] == [str(errno.EAGAIN)]
        assert (cg.outcome().pids_max_hits or 0) >= 1
        assert subprocess.run(["true"]).returncode == 0  # we can still fork


def test_cpu_max_throttles() -> None:
    with SandboxCgroup.create(controller_base("cpu")) as cg:
        cg.set_cpu_max(10_000)  # 10 ms per 100 ms
        _run_in(cg, "import time\nend = time.time() + 1\nwhile time.time() < end: pass")
        usage = cg.cpu_usage_usec()
        assert usage is not None and usage < 400_000


FORK_INTO = """
import json, os, sys
from sandspawn.confine import clone
fd = os.open(sys.argv[1], os.O_RDONLY | os.O_DIRECTORY)
r, w = os.pipe()
pid = clone.fork_with(0, fd)
if pid == 0:
    with open("/proc/self/cgroup") as f:
        os.write(w, f.read().encode())
    os._exit(7)
os.close(w)
child = os.read(r, 4096).decode()
_, status = os.waitpid(pid, 0)
with open("/proc/self/cgroup") as f:
    print(json.dumps([child, f.read(), os.waitstatus_to_exitcode(status)]))
"""


def test_fork_into_cgroup_is_born_there(cg: SandboxCgroup) -> None:
    """The zygote's clone3(CLONE_INTO_CGROUP): the child starts in the cgroup (no migration),
    its parent stays where it was, and the child runs Python normally after the fork."""
    import json
    import sys

    out = subprocess.run([sys.executable, "-c", FORK_INTO, cg.path], capture_output=True,
                         text=True, check=True).stdout
    child, parent, code = json.loads(out)

    def v2(proc_cgroup: str) -> str:  # the "0::/path" line (cgroups(7))
        return next(line[3:] for line in proc_cgroup.splitlines() if line.startswith("0::"))

    name = os.path.basename(cg.path)
    assert v2(child).endswith("/" + name)
    assert not v2(parent).endswith("/" + name)
    assert code == 7


def test_fork_into_cgroup_refuses_a_threaded_process(cg: SandboxCgroup) -> None:
    import threading

    from sandspawn.confine import clone

    stop = threading.Event()
    helper = threading.Thread(target=stop.wait)
    helper.start()
    fd = cg.open_dir()
    try:
        with pytest.raises(OSError) as info:
            clone.fork_with(0, fd)
        assert info.value.errno == errno.EDEADLK
    finally:
        os.close(fd)
        stop.set()
        helper.join()
