/* sandspawn's direct spawn: the landlock engine's payload started by the caller itself.
 *
 * ss_spawn() clones a child that shares the caller's memory and is suspended-for (CLONE_VM |
 * CLONE_VFORK), born in the sandbox's cgroup (CLONE_INTO_CGROUP) with a pidfd (CLONE_PIDFD).
 * The child runs only the raw system calls below, then execs the payload:
 *
 *   signal dispositions to default → setsid → bounding set, groups, gid, uid → capability sets
 *   → no_new_privs → Landlock → seccomp → fds → chdir → rlimits → signal mask → execve
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
       ST_SECCOMP, ST_FDS, ST_CHDIR, ST_RLIMITS, ST_EXECVE, ST_SIGNALS };

struct ss_rlimit { int resource; uint64_t value; };

/* Mirrored by _Request in sandspawn/_direct.py: keep the two in step. */
struct ss_request {
    const char *path;
    char *const *argv;
    char *const *envp;
    int uid, gid;            /* -1: keep the caller's */
    int bounding_last;       /* drop the bounding set 0..this (needs CAP_SETPCAP); -1: keep */
    int ruleset_fd;          /* Landlock ruleset to restrict to; -1: none */
    const struct sock_fprog *prog; /* seccomp filter; NULL: none */
    int cgroup_fd;           /* the sandbox cgroup's directory (CLONE_INTO_CGROUP); -1: none */
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

static int child(void *arg) {
    struct ss_request *r = arg;
    struct ss_kernel_sigaction dfl = { (void *)SIG_DFL, 0, NULL, 0 };
    uint64_t none = 0;
    int sig, i, top;

    /* No handler of the caller's may run here (they would run Python in shared memory): the
     * caller blocked every signal before the clone; we reset them all before unblocking. */
    for (sig = 1; sig < 65; sig++)
        if (sig != SIGKILL && sig != SIGSTOP)
            sc(SYS_rt_sigaction, sig, (long)&dfl, 0, 8, 0);

    if (r->cgroup_procs_fd >= 0 && sc(SYS_write, r->cgroup_procs_fd, (long)"0", 1, 0, 0) != 1)
        return fail(r, ST_CGROUP);
    if (sc(SYS_setsid, 0, 0, 0, 0, 0) < 0)
        return fail(r, ST_SETSID);
    if (r->uid >= 0) {
        for (i = 0; i <= r->bounding_last; i++)
            if (sc(SYS_prctl, PR_CAPBSET_DROP, i, 0, 0, 0) < 0 && errno != EINVAL)
                return fail(r, ST_IDENTITY);
        if (sc(SYS_setgroups, 0, 0, 0, 0, 0) < 0 ||
            sc(SYS_setresgid, r->gid, r->gid, r->gid, 0, 0) < 0 ||
            sc(SYS_setresuid, r->uid, r->uid, r->uid, 0, 0) < 0)
            return fail(r, ST_IDENTITY);
    }
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

/* Returns the payload's pid (r->pidfd its pidfd), or -1 with r->step and r->err set; a
 * child that failed has been reaped. */
int ss_spawn(struct ss_request *r) {
    /* The child's stack: in our own frame, which stays put while we are suspended for it. */
    char stack[SS_STACK] __attribute__((aligned(16)));
    sigset_t all, old;
    int pid = -1, err = 0, cgroup_in_child = 0, procs_fd = r->cgroup_procs_fd;

    r->step = ST_NONE;
    r->err = 0;
    r->pidfd = -1;
    if (r->nfds < 0 || r->nfds > SS_MAX_FDS || r->nlimits < 0 || r->nlimits > SS_MAX_LIMITS) {
        r->step = ST_CLONE;
        r->err = EINVAL;
        return -1;
    }
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
#ifdef SS_HAVE_CLONE3_RUN
    if (!r->no_clone3) {
        struct clone_args args;
        memset(&args, 0, sizeof args);
        args.flags = CLONE_VM | CLONE_VFORK | CLONE_PIDFD;
        args.pidfd = (uint64_t)(uintptr_t)&r->pidfd;
        args.exit_signal = SIGCHLD;
        args.stack = (uint64_t)(uintptr_t)stack;
        args.stack_size = sizeof stack;
        if (r->cgroup_fd >= 0) {
            args.flags |= CLONE_INTO_CGROUP;
            args.cgroup = (uint64_t)r->cgroup_fd;
        }
        r->cgroup_procs_fd = -1; /* the child is born in the cgroup */
        pid = (int)clone3_run(&args, child, r);
        if (pid < 0) {
            err = (int)-pid;
            pid = -1;
        }
    }
    /* ENOSYS: no clone3 (before Linux 5.3); E2BIG: no CLONE_INTO_CGROUP (before 5.7). */
    if (r->no_clone3 || err == ENOSYS || err == E2BIG)
#endif
    {
        err = 0;
        /* Without clone3: glibc's clone, and the child joins the cgroup by writing to
         * cgroup.procs (a migration, slower than being born there). */
        int opened = -1;
        cgroup_in_child = r->cgroup_fd >= 0;
        if (cgroup_in_child && procs_fd < 0)
            procs_fd = opened = openat(r->cgroup_fd, "cgroup.procs", O_WRONLY | O_CLOEXEC);
        if (cgroup_in_child && procs_fd < 0) {
            err = errno;
        } else {
            r->cgroup_procs_fd = cgroup_in_child ? procs_fd : -1;
            pid = clone(child, stack + sizeof stack,
                        CLONE_VM | CLONE_VFORK | CLONE_PIDFD | SIGCHLD, r, &r->pidfd);
            if (pid < 0)
                err = errno;
        }
        if (opened >= 0) {
            close(opened);
            procs_fd = -1;
        }
    }
    r->cgroup_procs_fd = procs_fd;
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (pid < 0) {
        r->step = ST_CLONE;
        r->err = err;
        r->pidfd = -1;
        return -1;
    }
    if (r->step != ST_NONE) { /* it failed before its execve: reap it */
        siginfo_t info;
        while (syscall(SYS_waitid, P_PIDFD, r->pidfd, &info, WEXITED, NULL) < 0 && errno == EINTR)
            ;
        close(r->pidfd);
        r->pidfd = -1;
        return -1;
    }
    return pid;
}
