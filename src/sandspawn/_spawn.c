/* sandspawn's direct spawn: the payload started by the caller itself.
 *
 * ss_spawn() clones a child that shares the caller's memory and is suspended-for (CLONE_VM |
 * CLONE_VFORK), born in the sandbox's cgroup (CLONE_INTO_CGROUP) with a pidfd (CLONE_PIDFD).
 * The child runs only the raw system calls below, then execs the payload:
 *
 *   signal dispositions to default → setsid → bounding set, groups, gid, uid → capability sets
 *   → no_new_privs → Landlock → seccomp → fds → chdir → rlimits → signal mask → execve
 *
 * Into a namespace sandbox (the native engine: ns_fds, its pid 1's /proc/self/ns files, user
 * first) the clone goes in two steps, since joining a pid namespace only places the joiner's
 * children in it (man 2 setns):
 *
 *   caller --clone(CLONE_VM|CLONE_VFORK|CLONE_FILES)--> outer: signals, groups/gid/uid (a root
 *   caller's), setns(each of ns_fds) --clone(CLONE_VM|CLONE_VFORK|CLONE_PARENT|CLONE_PIDFD)-->
 *   payload: setns(ns_cgroup_fd) → the steps above, bounding set included (it holds every
 *   capability of the sandbox's user namespace until it drops them)
 *
 * Namespace files rather than one setns on a pidfd of pid 1: that needs ptrace read access to
 * pid 1 (kernel/nsproxy.c validate_nsset(), Linux 6.18), which is non-dumpable.
 *
 * CLONE_PARENT makes the payload the caller's child; CLONE_FILES puts its pidfd in the
 * caller's fd table. The cgroup namespace is joined by the payload itself, once born in the
 * sandbox's cgroup: CLONE_INTO_CGROUP from inside it would not see the caller's cgroup
 * (kernel/cgroup/cgroup.c, cgroup_procs_write_permission(): ENOENT, Linux 6.18).
 *
 * Raw syscalls only: the child shares the caller's memory, so glibc's set*id wrappers (which
 * signal every thread of "this process") and anything that allocates or takes a lock are out.
 * A failing step leaves its number and errno in the request (shared memory) and the child
 * exits 127; the caller reaps it. This file has no Python in it: it is loaded with ctypes.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <signal.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>
#include <linux/capability.h>
#include <linux/filter.h>
#include <linux/sched.h>
#include <linux/seccomp.h>

#ifndef SYS_clone3
#define SYS_clone3 435 /* arch/x86/entry/syscalls/syscall_64.tbl, Linux 5.3 */
#endif
#ifndef SYS_close_range
#define SYS_close_range 436 /* Linux 5.9 */
#endif
#ifndef SYS_landlock_restrict_self
#define SYS_landlock_restrict_self 446 /* Linux 5.13 */
#endif
#ifndef CLONE_INTO_CGROUP
#define CLONE_INTO_CGROUP 0x200000000ULL /* include/uapi/linux/sched.h, Linux 5.7 */
#endif
#ifndef P_PIDFD
#define P_PIDFD 3 /* include/uapi/linux/wait.h, Linux 5.4 */
#endif
#define SS_CLOSE_RANGE_CLOEXEC (1U << 2) /* include/uapi/linux/close_range.h, Linux 5.11 */
#define SS_MAX_FDS 256
#define SS_MAX_LIMITS 16
#define SS_STACK 16384

/* Step numbers, named in sandspawn/_direct.py (STEPS). */
enum { ST_NONE, ST_CLONE, ST_CGROUP, ST_SETSID, ST_IDENTITY, ST_CAPS, ST_NNP, ST_LANDLOCK,
       ST_SECCOMP, ST_FDS, ST_CHDIR, ST_RLIMITS, ST_EXECVE, ST_SIGNALS, ST_SETNS,
       ST_CLONE_NS };

struct ss_rlimit { int resource; uint64_t value; };

/* Mirrored by _Request in sandspawn/_direct.py: keep the two in step. */
struct ss_request {
    const char *path;
    char *const *argv;
    char *const *envp;
    int uid, gid;            /* -1: keep the caller's; in a namespace sandbox, ids inside it */
    int bounding_last;       /* drop the bounding set 0..this (needs CAP_SETPCAP); -1: keep */
    int ruleset_fd;          /* Landlock ruleset to restrict to; -1: none */
    const struct sock_fprog *prog; /* seccomp filter; NULL: none */
    int cgroup_fd;           /* the sandbox cgroup's directory (CLONE_INTO_CGROUP); -1: none */
    int nns;                 /* namespaces to join (0: none) */
    const int *ns_fds;       /* their files, the user namespace first */
    int ns_cgroup_fd;        /* the cgroup namespace, joined by the payload; -1: none */
    int cgroup_procs_fd;     /* its cgroup.procs, written from the child if clone3 cannot
                              * (-1: opened here from cgroup_fd when needed) */
    int no_clone3;           /* tests: take the fallback path (clone + cgroup.procs) */
    int nfds;
    const int *fd_src, *fd_dst; /* the payload gets fd_src[i] as fd_dst[i], and nothing else */
    const char *cwd;         /* NULL: stay */
    int cwd_fallback;        /* a cwd the sandbox may not enter becomes "/" */
    int nlimits;
    const struct ss_rlimit *limits; /* soft = hard = value */
    /* out */
    int step, err;
    int pidfd;
    int ns_pid;              /* the payload's pid, from the outer child */
    /* internal */
    int cgroup_in_child;     /* the child joins through cgroup_procs_fd (no clone3) */
    int procs_opened;        /* cgroup_procs_fd was opened here: closed after the spawn */
};

struct ss_kernel_sigaction { /* the kernel's struct sigaction (x86_64, arm64 layout) */
    void *handler;
    unsigned long flags;
    void *restorer;
    uint64_t mask;
};

static long sc(long nr, long a, long b, long c, long d, long e) {
    /* syscall() sets errno, which lives in the caller's thread: our caller reads it only when
     * the clone itself failed, never after the child ran. */
    return syscall(nr, a, b, c, d, e);
}

static int fail(struct ss_request *r, int step) {
    r->step = step;
    r->err = errno ? errno : EIO;
    syscall(SYS_exit_group, 127);
    return 127;
}

static void reset_signals(void) {
    struct ss_kernel_sigaction dfl = { (void *)SIG_DFL, 0, NULL, 0 };
    int sig;
    /* No handler of the caller's may run here (they would run Python in shared memory): the
     * caller blocked every signal before the clone; we reset them all before unblocking. */
    for (sig = 1; sig < 65; sig++)
        if (sig != SIGKILL && sig != SIGSTOP)
            sc(SYS_rt_sigaction, sig, (long)&dfl, 0, 8, 0);
}

static int drop_bounding_set(struct ss_request *r) {
    int i;
    for (i = 0; i <= r->bounding_last; i++)
        if (sc(SYS_prctl, PR_CAPBSET_DROP, i, 0, 0, 0) < 0 && errno != EINVAL)
            return -1;
    return 0;
}

static int set_ids(struct ss_request *r) {
    return (sc(SYS_setresgid, r->gid, r->gid, r->gid, 0, 0) < 0 ||
            sc(SYS_setresuid, r->uid, r->uid, r->uid, 0, 0) < 0) ? -1 : 0;
}

static int set_identity(struct ss_request *r) {
    return (sc(SYS_setgroups, 0, 0, 0, 0, 0) < 0 || set_ids(r) < 0) ? -1 : 0;
}

/* From the capability sets to the execve: the steps every payload takes last. */
static int lock_down_and_exec(struct ss_request *r) {
    uint64_t none = 0;
    int i, top;
    {
        struct __user_cap_header_struct hdr = { _LINUX_CAPABILITY_VERSION_3, 0 };
        struct __user_cap_data_struct data[2];
        memset(data, 0, sizeof data);
        if (sc(SYS_prctl, PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0) < 0 ||
            sc(SYS_capset, (long)&hdr, (long)data, 0, 0, 0) < 0)
            return fail(r, ST_CAPS);
    }
    if (sc(SYS_prctl, PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0)
        return fail(r, ST_NNP);
    if (r->ruleset_fd >= 0 && sc(SYS_landlock_restrict_self, r->ruleset_fd, 0, 0, 0, 0) < 0)
        return fail(r, ST_LANDLOCK);
    if (r->prog && sc(SYS_seccomp, SECCOMP_SET_MODE_FILTER, 0, (long)r->prog, 0, 0) < 0)
        return fail(r, ST_SECCOMP);

    /* fds: lift every source above all targets (close-on-exec), mark everything close-on-exec,
     * then place the targets (dup3 without O_CLOEXEC: exactly they survive the execve). */
    {
        int lifted[SS_MAX_FDS], targets[3] = { 0, 0, 0 };
        top = 3;
        for (i = 0; i < r->nfds; i++)
            if (r->fd_dst[i] >= top)
                top = r->fd_dst[i] + 1;
        for (i = 0; i < r->nfds; i++) {
            lifted[i] = (int)sc(SYS_fcntl, r->fd_src[i], F_DUPFD_CLOEXEC, top, 0, 0);
            if (lifted[i] < 0)
                return fail(r, ST_FDS);
        }
        if (sc(SYS_close_range, 3, ~0U, SS_CLOSE_RANGE_CLOEXEC, 0, 0) < 0)
            return fail(r, ST_FDS);
        for (i = 0; i < r->nfds; i++) {
            if (sc(SYS_dup3, lifted[i], r->fd_dst[i], 0, 0, 0) < 0)
                return fail(r, ST_FDS);
            if (r->fd_dst[i] < 3)
                targets[r->fd_dst[i]] = 1;
        }
        for (i = 0; i < 3; i++)
            if (!targets[i])
                sc(SYS_close, i, 0, 0, 0, 0);
    }
    if (r->cwd && sc(SYS_chdir, (long)r->cwd, 0, 0, 0, 0) < 0) {
        if (!r->cwd_fallback || sc(SYS_chdir, (long)"/", 0, 0, 0, 0) < 0)
            return fail(r, ST_CHDIR);
    }
    for (i = 0; i < r->nlimits; i++) {
        uint64_t lim[2] = { r->limits[i].value, r->limits[i].value };
        if (sc(SYS_prlimit64, 0, r->limits[i].resource, (long)lim, 0, 0) < 0)
            return fail(r, ST_RLIMITS);
    }
    if (sc(SYS_rt_sigprocmask, SIG_SETMASK, (long)&none, 0, 8, 0) < 0)
        return fail(r, ST_SIGNALS);
    sc(SYS_execve, (long)r->path, (long)r->argv, (long)r->envp, 0, 0);
    return fail(r, ST_EXECVE);
}

static int join_cgroup_procs(struct ss_request *r) {
    return (r->cgroup_in_child &&
            sc(SYS_write, r->cgroup_procs_fd, (long)"0", 1, 0, 0) != 1) ? -1 : 0;
}

/* The landlock engine's payload. */
static int child(void *arg) {
    struct ss_request *r = arg;

    reset_signals();
    if (join_cgroup_procs(r) < 0)
        return fail(r, ST_CGROUP);
    if (sc(SYS_setsid, 0, 0, 0, 0, 0) < 0)
        return fail(r, ST_SETSID);
    if (r->uid >= 0 && (drop_bounding_set(r) < 0 || set_identity(r) < 0))
        return fail(r, ST_IDENTITY);
    return lock_down_and_exec(r);
}

/* A namespace sandbox's payload, cloned by ns_outer() inside the namespaces it joined. */
static int ns_payload(void *arg) {
    struct ss_request *r = arg;

    if (join_cgroup_procs(r) < 0)
        return fail(r, ST_CGROUP);
    if (r->ns_cgroup_fd >= 0 && sc(SYS_setns, r->ns_cgroup_fd, CLONE_NEWCGROUP, 0, 0, 0) < 0)
        return fail(r, ST_SETNS);
    /* A root caller's clone is still host uid 0 (unmapped here): the payload's ids, mapped to
     * the host uid/gid it runs as, now that it is born in the cgroup (see ns_outer). */
    if (r->uid >= 0 && set_ids(r) < 0)
        return fail(r, ST_IDENTITY);
    if (sc(SYS_setsid, 0, 0, 0, 0, 0) < 0)
        return fail(r, ST_SETSID);
    /* Every capability of the sandbox's user namespace is ours until dropped here. */
    if (drop_bounding_set(r) < 0)
        return fail(r, ST_CAPS);
    return lock_down_and_exec(r);
}

static long clone_payload(struct ss_request *r, char *stack, size_t size);

/* Joins the sandbox's namespaces, then clones the payload into its pid namespace. */
static int ns_outer(void *arg) {
    struct ss_request *r = (struct ss_request *)((void **)arg)[0];
    char *stack = (char *)((void **)arg)[1];
    long pid;
    int i;

    reset_signals();
    /* A root caller drops its groups here (inside, setgroups is denied) but stays uid 0 until
     * the payload is born: CLONE_INTO_CGROUP checks write access to cgroup.procs of the
     * common ancestor (kernel/cgroup/cgroup.c cgroup_procs_write_permission(), Linux 6.18),
     * which is root's. Nothing but this code runs as uid 0 in the namespaces, where nothing
     * else runs yet but their pid 1 (ours: a sandbox serves one payload). */
    if (r->uid >= 0 && sc(SYS_setgroups, 0, 0, 0, 0, 0) < 0)
        return fail(r, ST_IDENTITY);
    for (i = 0; i < r->nns; i++)
        if (sc(SYS_setns, r->ns_fds[i], 0, 0, 0, 0) < 0)
            return fail(r, ST_SETNS);
    pid = clone_payload(r, stack, SS_STACK);
    if (pid < 0) {
        errno = (int)-pid;
        return fail(r, ST_CLONE_NS);
    }
    r->ns_pid = (int)pid;
    syscall(SYS_exit, 0);
    return 0;
}

#if defined(__x86_64__)
/* clone3 with a stack of its own, on which the child calls fn(arg) and exits: glibc 2.36 has
 * no clone3() wrapper, and the syscall() wrapper cannot be used (the child would return
 * through the caller's stack frame). */
static long clone3_run(struct clone_args *args, int (*fn)(void *), void *arg) {
    long ret;
    register void *fn_reg asm("r12") = (void *)fn;
    register void *arg_reg asm("r13") = arg;
    asm volatile(
        "syscall\n\t"
        "test %%rax, %%rax\n\t"
        "jnz 1f\n\t"
        "xor %%ebp, %%ebp\n\t"     /* the child: a fresh, 16-byte aligned stack */
        "mov %%r13, %%rdi\n\t"
        "call *%%r12\n\t"
        "mov %%eax, %%edi\n\t"
        "mov %[exit], %%eax\n\t"
        "syscall\n\t"
        "hlt\n"
        "1:\n\t"
        : "=a"(ret)
        : "a"((long)SYS_clone3), "D"(args), "S"(sizeof *args), "r"(fn_reg), "r"(arg_reg),
          [exit] "i"(SYS_exit)
        : "rcx", "r11", "memory");
    return ret;
}
#define SS_HAVE_CLONE3_RUN 1
#endif

/* Whether this build clones straight into the cgroup: elsewhere the child joins it after the
 * clone, which waits for an RCU grace period (~10 ms here), slower than pre-forked children. */
int ss_clones_into_cgroup(void) {
#ifdef SS_HAVE_CLONE3_RUN
    return 1;
#else
    return 0;
#endif
}

/* The payload's clone: clone3 into the sandbox's cgroup where this build has it (returns -errno
 * on failure), else glibc's clone, the child then joining the cgroup through cgroup.procs. In
 * a namespace sandbox (ns_fd) it runs ns_payload as the caller's child (CLONE_PARENT). */
static long clone_payload(struct ss_request *r, char *stack, size_t size) {
    int ns = r->nns > 0;
    int (*fn)(void *) = ns ? ns_payload : child;
    long pid;
#ifdef SS_HAVE_CLONE3_RUN
    if (!r->no_clone3) {
        struct clone_args args;
        memset(&args, 0, sizeof args);
        args.flags = CLONE_VM | CLONE_VFORK | CLONE_PIDFD | (ns ? CLONE_PARENT : 0);
        args.pidfd = (uint64_t)(uintptr_t)&r->pidfd;
        args.exit_signal = ns ? 0 : SIGCHLD; /* CLONE_PARENT: the parent's own (clone3 rule) */
        args.stack = (uint64_t)(uintptr_t)stack;
        args.stack_size = size;
        if (r->cgroup_fd >= 0) {
            args.flags |= CLONE_INTO_CGROUP;
            args.cgroup = (uint64_t)r->cgroup_fd;
        }
        pid = clone3_run(&args, fn, r);
        /* ENOSYS: no clone3 (before Linux 5.3); E2BIG: no CLONE_INTO_CGROUP (before 5.7). */
        if (pid != -ENOSYS && pid != -E2BIG)
            return pid;
    }
#endif
    if (r->cgroup_fd >= 0 && r->cgroup_procs_fd < 0) {
        r->cgroup_procs_fd = r->procs_opened =
            (int)sc(SYS_openat, r->cgroup_fd, (long)"cgroup.procs", O_WRONLY | O_CLOEXEC, 0, 0);
        if (r->cgroup_procs_fd < 0)
            return -errno;
    }
    r->cgroup_in_child = r->cgroup_fd >= 0;
    pid = clone(fn, stack + size,
                CLONE_VM | CLONE_VFORK | CLONE_PIDFD | (ns ? CLONE_PARENT : SIGCHLD), r,
                &r->pidfd);
    return pid < 0 ? -errno : pid;
}

static void reap(int pid, int pidfd) {
    siginfo_t info;
    while (syscall(SYS_waitid, pidfd >= 0 ? P_PIDFD : P_PID, pidfd >= 0 ? pidfd : pid, &info,
                   WEXITED | __WALL, NULL) < 0 && errno == EINTR)
        ;
}

/* Returns the payload's pid (r->pidfd its pidfd), or -1 with r->step and r->err set; a
 * child that failed has been reaped. */
int ss_spawn(struct ss_request *r) {
    /* The children's stacks: in our own frame, which stays put while we are suspended. */
    char stack[SS_STACK] __attribute__((aligned(16)));
    char stack2[SS_STACK] __attribute__((aligned(16)));
    sigset_t all, old;
    long pid;
    int outer = 0;

    r->step = ST_NONE;
    r->err = 0;
    r->pidfd = -1;
    r->ns_pid = -1;
    r->cgroup_in_child = 0;
    r->procs_opened = -1;
    if (r->nfds < 0 || r->nfds > SS_MAX_FDS || r->nlimits < 0 || r->nlimits > SS_MAX_LIMITS ||
        r->nns < 0) {
        r->step = ST_CLONE;
        r->err = EINVAL;
        return -1;
    }
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    if (r->nns > 0) {
        void *outer_arg[2] = { r, stack2 };
        pid = clone(ns_outer, stack + sizeof stack, CLONE_VM | CLONE_VFORK | CLONE_FILES | SIGCHLD,
                    outer_arg);
        if (pid < 0) {
            pid = -errno;
        } else {
            outer = (int)pid;
            pid = r->step == ST_NONE ? r->ns_pid : -1;
        }
    } else {
        pid = clone_payload(r, stack, sizeof stack);
    }
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (r->procs_opened >= 0) {
        close(r->procs_opened);
        r->cgroup_procs_fd = r->procs_opened = -1;
    }
    if (outer > 0)
        reap(outer, -1);
    if (pid < 0 && r->step == ST_NONE) {
        r->step = ST_CLONE;
        r->err = (int)-pid;
    }
    if (r->step != ST_NONE) { /* a child failed before its execve: reap it */
        if (r->pidfd >= 0) {
            reap(-1, r->pidfd);
            close(r->pidfd);
        }
        r->pidfd = -1;
        return -1;
    }
    return (int)pid;
}
