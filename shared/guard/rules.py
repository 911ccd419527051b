"""The runtime guard's rule catalogue: the single source of every rule's name, number, severity, whether the
kernel denies it where it can, and how each mode sees it.

Two modes (the loader picks one at start, `Mode`):
- enforce: BPF LSM hooks. A rule marked `enforced` is denied there (-EPERM: the syscall fails) and reported.
- observe: syscall and sched tracepoints, for kernels that refuse BPF LSM programs (no BPF trampolines,
  lockdown). Every rule is reported, none is denied: `Finding.enforced` is then false, whatever the rule
  says, and the node-agent's answer (stop the job, revoke the node) comes from user space after the fact.
`Rule.enforced` says what enforce mode does; `Rule.enforced_in(mode)` what a finding in a mode will say.

The BPF program and the loader never spell a rule themselves: `build.py` writes `rules.h` from this table
(`rules_header()`), so a rule's number, its name in the loader's JSON and whether its hook returns -EPERM
cannot drift from what Python reports. Numbers are part of the wire format between the BPF program and the
loader only (both are rebuilt together), but they stay stable so a finding's rule never changes meaning
between builds. Names are at most 32 characters (they end up in events and metrics labels).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum
from typing import Literal

__all__ = ["MODES", "RULES", "Mode", "Rule", "Severity", "rule_by_id", "rules_header", "rules_table"]

Mode = Literal["enforce", "observe"]
"""What a running guard does: enforce (BPF LSM: deny and report) or observe (tracepoints: report only)."""

MODES: tuple[Mode, ...] = ("enforce", "observe")

MAX_NAME = 32


class Severity(StrEnum):
    INFO = "info"
    WARNING = "warning"
    CRITICAL = "critical"


@dataclass(frozen=True)
class Rule:
    """One thing the guard watches. `enforced`: in enforce mode the BPF LSM hook returns -EPERM (the syscall
    fails) as well as reporting; otherwise it only reports (the syscall goes on). Observe mode never denies.
    `enforce` and `observe`: what each mode watches to see it."""

    name: str
    id: int
    severity: Severity
    enforced: bool
    description: str
    enforce: str
    observe: str

    def enforced_in(self, mode: Mode) -> bool:
        """Whether a finding of this rule, in `mode`, had its syscall denied."""
        return self.enforced and mode == "enforce"


_PROC = "/proc/<pid>/{mem,pagemap,fd/*,map_files/*} (and task/<tid>/...), absolute paths"

_RULES = (
    Rule("vmm_exec", 1, Severity.CRITICAL, True,
         "a task of a watched VMM (or one it forked) calls execve: a VMM never needs a new program",
         "lsm/bprm_check_security (before the exec: it fails)",
         "sched/sched_process_exec (after a successful exec, with its file name)"),
    Rule("host_ptrace_vmm", 2, Severity.CRITICAL, True,
         "a host task other than the agent ptraces or reads the memory of a watched VMM (PTRACE_ATTACH, "
         "/proc/<pid>/mem, process_vm_readv, /proc/<pid>/maps and other ptrace-checked /proc files)",
         "lsm/ptrace_access_check (every ptrace-checked access)",
         "sys_enter_ptrace, sys_enter_process_vm_readv/writev (any thread id of the VMM), sys_enter_open/"
         f"openat/openat2/creat of {_PROC}"),
    Rule("vmm_ptrace", 3, Severity.CRITICAL, True,
         "a task of a watched VMM ptraces, or asks to be traced by, another task",
         "lsm/ptrace_access_check, lsm/ptrace_traceme",
         f"sys_enter_ptrace (PTRACE_TRACEME too), sys_enter_process_vm_readv/writev, opens of {_PROC} of "
         "another process"),
    Rule("vmm_mount", 4, Severity.CRITICAL, True,
         "a task of a watched VMM mounts or moves a mount",
         "lsm/sb_mount, lsm/move_mount",
         "sys_enter_mount, sys_enter_fsmount, sys_enter_move_mount"),
    Rule("vmm_bpf", 5, Severity.CRITICAL, True,
         "a task of a watched VMM calls bpf()",
         "lsm/bpf", "sys_enter_bpf"),
    Rule("vmm_module", 6, Severity.CRITICAL, True,
         "a task of a watched VMM loads a kernel module or makes the kernel request one",
         "lsm/kernel_load_data, lsm/kernel_read_file, lsm/kernel_module_request",
         "sys_enter_init_module, sys_enter_finit_module (where the kernel has them; implicit module requests "
         "are not seen)"),
    Rule("vmm_kexec", 7, Severity.CRITICAL, True,
         "a task of a watched VMM loads a kexec kernel or initramfs",
         "lsm/kernel_load_data, lsm/kernel_read_file",
         "sys_enter_kexec_load, sys_enter_kexec_file_load (where the kernel has them)"),
    Rule("vmm_setuid", 8, Severity.WARNING, False,
         "a task of a watched VMM changes its user ids (reported, not denied; observe mode: user or group ids, "
         "on the attempt)",
         "lsm/task_fix_setuid (the old and new euid)",
         "sys_enter_set{,re,res,fs}{uid,gid}, sys_enter_setgroups (the id asked for)"),
    Rule("host_reads_instance_file", 9, Severity.CRITICAL, True,
         "a task that is neither the agent nor the instance's VMM opens one of the instance's protected files "
         "(its volume, its scratch files)",
         "lsm/file_open (by device and inode: every name of the file)",
         "sys_enter_open/openat/openat2/creat whose path is exactly one of the file's protected absolute paths"),
    Rule("vmm_connect", 10, Severity.WARNING, False,
         "a task of a watched VMM connects a socket (reported with the address family, not denied)",
         "lsm/socket_connect", "sys_enter_connect (the address from the VMM's memory)"),
    Rule("vmm_fork", 11, Severity.INFO, False,
         "a task of a watched VMM forks a process, which joins the instance (an audit record: from then on "
         "every rule applies to it too)",
         "tp_btf/sched_process_fork (the process tree tracking)",
         "tp_btf/sched_process_fork (the process tree tracking)"),
)

RULES: dict[str, Rule] = {r.name: r for r in _RULES}
"""Every rule by name."""

_BY_ID = {r.id: r for r in _RULES}


def rule_by_id(rule_id: int) -> Rule | None:
    return _BY_ID.get(rule_id)


def _check() -> None:
    """Fail at import on a malformed table, so a bad edit cannot reach the compiler or the wire."""
    if len(_BY_ID) != len(_RULES) or len(RULES) != len(_RULES):
        raise ValueError("guard rules: duplicate name or id")
    for r in _RULES:
        if not re.fullmatch(r"[a-z][a-z0-9_]*", r.name) or len(r.name) > MAX_NAME:
            raise ValueError(f"guard rule {r.name!r}: names are [a-z0-9_], at most {MAX_NAME} characters")
        if not 0 < r.id < 256:
            raise ValueError(f"guard rule {r.name!r}: id must be 1..255")
        if not r.enforce or not r.observe or any(c in r.enforce + r.observe for c in "\t\n"):
            raise ValueError(f"guard rule {r.name!r}: say, on one line each, what each mode watches")


_check()


def rules_table() -> str:
    """A canonical text form of the catalogue (part of the guard build's digest: a change in a severity, in
    what is enforced or in what a mode watches is a different guard)."""
    return "".join(f"{r.id}\t{r.name}\t{r.severity.value}\t{int(r.enforced)}\t{r.enforce}\t{r.observe}\n"
                   for r in sorted(_RULES, key=lambda r: r.id))


def rules_header() -> str:
    """The C header both the BPF program and the loader include: `QVM_RULE_<NAME>` (the number),
    `QVM_ENFORCE_<NAME>` (1 when the hook denies) and, for the loader, the names indexed by number."""
    top = max(_BY_ID)
    lines = ["/* Generated from shared/guard/rules.py by build.py: do not edit. */",
             "#ifndef QVM_GUARD_RULES_H", "#define QVM_GUARD_RULES_H", ""]
    for r in sorted(_RULES, key=lambda r: r.id):
        lines.append(f"#define QVM_RULE_{r.name.upper()} {r.id}")
        lines.append(f"#define QVM_ENFORCE_{r.name.upper()} {int(r.enforced)}")
    lines += ["", f"#define QVM_RULE_MAX {top}", "", "#ifdef QVM_RULE_NAMES",
              "static const char *const qvm_rule_names[QVM_RULE_MAX + 1] = {"]
    lines += [f'\t[{r.id}] = "{r.name}",' for r in sorted(_RULES, key=lambda r: r.id)]
    lines += ["};", "#endif", "", "#endif", ""]
    return "\n".join(lines)
