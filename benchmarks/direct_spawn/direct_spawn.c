/* Measurement prototype, not part of sandspawn: start a payload from the caller itself.
 *
 * A vfork-style child (clone CLONE_VM|CLONE_VFORK on its own stack) makes only raw system
 * calls: setsid, the uid change (raw setgroups/setresgid/setresuid: glibc's wrappers would
 * signal every thread of the caller, with which this child shares memory), no_new_privs,
 * landlock_restrict_self on a ruleset fd made beforehand, seccomp with the policy's BPF, then
 * execve. The failing step and errno are left in the request (shared memory).
 * Left out here, needed for real use: capability sets and bounding set, fd placement and
 * closing, chdir, rlimits, signal dispositions, and the lifetime (see benchmarks/README.md).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <sched.h>
#include <signal.h>
#include <stddef.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <pthread.h>

struct req {
    const char *path; char *const *argv; char *const *envp;
    int ruleset_fd; const struct sock_fprog *prog; int uid;
    int step; int err;
};

static int child(void *arg) {
    struct req *r = arg;
    sigset_t none; sigemptyset(&none);
    r->step = 1; if (syscall(SYS_setsid) < 0) goto fail;
    if (r->uid >= 0) {
        r->step = 2; if (syscall(SYS_setgroups, 0, NULL) < 0) goto fail;
        if (syscall(SYS_setresgid, r->uid, r->uid, r->uid) < 0) goto fail;
        if (syscall(SYS_setresuid, r->uid, r->uid, r->uid) < 0) goto fail;
    }
    r->step = 3; if (syscall(SYS_prctl, PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0) goto fail;
    r->step = 4; if (r->ruleset_fd >= 0 && syscall(SYS_landlock_restrict_self, r->ruleset_fd, 0) < 0) goto fail;
    r->step = 5; if (r->prog && syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER, 0, r->prog) < 0) goto fail;
    syscall(SYS_rt_sigprocmask, SIG_SETMASK, &none, NULL, 8);
    r->step = 6; execve(r->path, r->argv, r->envp);
fail:
    r->err = errno;
    _exit(127);
}

int ss_spawn(struct req *r) {
    size_t sz = 64 * 1024;
    char *stack = mmap(NULL, sz, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_STACK, -1, 0);
    if (stack == MAP_FAILED) return -1;
    sigset_t all, old; sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    r->err = 0;
    int pid = clone(child, stack + sz, CLONE_VM | CLONE_VFORK | SIGCHLD, r);
    int e = errno;
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    munmap(stack, sz);
    if (pid < 0) { r->err = e; return -1; }
    return pid;
}
