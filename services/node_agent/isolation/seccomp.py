"""A seccomp allow-list for the VMM, loaded in the child just before exec (libseccomp via pyseccomp).

The list is what QEMU's microvm machine was seen to call here (strace over boot, workload, QMP quit,
forced stop) plus what its error, signal and KVM paths need. Anything else kills the VMM with SIGSYS;
the kernel logs the syscall (audit type 1326) and the agent reports `instance.failed` with reason
`seccomp_violation`.
"""

from __future__ import annotations

import signal
from typing import Any

import pyseccomp as seccomp

__all__ = ["QEMU_ALLOW", "install", "prepare"]

QEMU_ALLOW: frozenset[str] = frozenset(
    """
access arch_prctl brk clock_gettime clock_nanosleep clone clone3 close close_range dup dup2 dup3 epoll_create1
epoll_ctl epoll_pwait epoll_wait eventfd2 execve exit exit_group fallocate fchdir fcntl fdatasync fstat
fstatfs fsync ftruncate futex get_mempolicy getcwd getdents64 getegid geteuid getgid getpeername getpid
getppid getrandom getrlimit getsockname getsockopt gettid gettimeofday getuid io_uring_enter io_uring_register
io_uring_setup ioctl kill lseek madvise mbind membarrier memfd_create mlock mlockall mmap mprotect mremap
munmap nanosleep newfstatat openat pipe2 poll ppoll prctl pread64 preadv preadv2 prlimit64 pwrite64 pwritev
pwritev2 read readlink readlinkat readv recvfrom recvmsg restart_syscall rseq rt_sigaction rt_sigprocmask
rt_sigreturn rt_sigtimedwait sched_getaffinity sched_setaffinity sched_yield seccomp sendmsg sendto
set_mempolicy set_robust_list set_tid_address setsockopt shutdown sigaltstack signalfd4 statfs statx sysinfo
tgkill timerfd_create timerfd_settime uname unlink unlinkat write writev
"""  # noqa: SIM905 - one name per word reads better than a 100-item list
    .split()
)

VIOLATION_SIGNAL = signal.SIGSYS


def prepare(allow: frozenset[str] = QEMU_ALLOW) -> Any:
    """Build the filter in the agent (before fork): the child then only loads it, without importing or
    compiling anything between fork and exec. Unknown names (other architectures) are skipped."""
    f = seccomp.SyscallFilter(defaction=seccomp.KILL_PROCESS)
    for name in sorted(allow):
        try:
            f.add_rule(seccomp.ALLOW, name)
        except (ValueError, OSError):
            continue
    return f


def install(allow: frozenset[str] = QEMU_ALLOW) -> None:
    """Load the filter into the calling process (sets no_new_privs)."""
    prepare(allow).load()
